from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"
CALIBRATION = DATA / "calibration"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Debian's chromium, driven by Playwright (no browser is downloaded)
CHROMIUM = os.environ.get("VRAMPLAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def calibration_dir() -> Path:
    return CALIBRATION


def web_load() -> ModuleType:
    """benchmarks/web_load.py as a module: it starts ``vramplan serve`` on a free port and drives it."""
    spec = importlib.util.spec_from_file_location("web_load", BENCHMARKS / "web_load.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["web_load"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A ``vramplan serve`` for the page tests of one module; its base URL."""
    with web_load().serve() as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the page tests of one module (skips without Playwright or chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
