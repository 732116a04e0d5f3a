from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CALIBRATION = DATA / "calibration"


@pytest.fixture(scope="session")
def calibration_dir() -> Path:
    return CALIBRATION
