"""The README's reserved-memory accuracy table is what benchmarks/accuracy_report.py computes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("dataset", ["calibration", "h200-grid"])
def test_readme_reserved_figures_match_the_report(dataset: str) -> None:
    from accuracy_report import summarize

    s = summarize(ROOT / "tests" / "data" / dataset)
    median, worst = s.reserved
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next((line for line in readme.splitlines() if line.startswith(f"| {dataset} ")), None)
    assert row is not None, f"README has no reserved-accuracy row for {dataset}"
    figures = re.findall(r"\*\*([+-]?[0-9.]+)%\*\*", row)
    assert figures == [f"{median:.2%}"[:-1], f"{worst:+.1%}"[:-1]], (row, median, worst)
    assert f"| {len(s.rows)} |" in row
    label = s.label("peak_reserved")
    assert ("held out" in row) == label.startswith("held out")


def test_readme_multi_gpu_page_figures_are_the_estimate() -> None:
    """The figures quoted beside the multi-GPU screenshot are what the API answers for that query."""
    import vramplan

    est = vramplan.estimate("llama-3.1-8b", method="lora", gpus=8, fsdp="full")
    assert est.per_gpu is not None
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    per_gpu, one = est.per_gpu.total_bytes / 2**30, est.total_bytes / 2**30
    quoted = f"FSDP: {per_gpu:.2f} GiB per\nGPU, where one GPU would need {one:.2f})"
    assert quoted in readme, quoted
