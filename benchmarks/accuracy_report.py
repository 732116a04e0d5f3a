"""Accuracy of `vramplan estimate` against the H200 calibration set (torch.cuda.max_memory_allocated).

usage: python benchmarks/accuracy_report.py [MEASURED.csv CONFIGS_DIR]
Defaults to the copy under tests/data/calibration/.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from vramplan.calibration import compare, read_rows
from vramplan.estimator import estimate
from vramplan.units import GiB

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    csv_path = Path(argv[0]) if argv else ROOT / "tests/data/calibration/measured.csv"
    configs = Path(argv[1]) if len(argv) > 1 else csv_path.parent / "configs"
    results, skipped = compare(read_rows(csv_path), configs, estimate)
    print(f"{'case':44s} {'measured':>9s} {'estimate':>9s} {'error':>7s}")
    for r in results:
        print(f"{r.name:44s} {r.measured_bytes / GiB:9.2f} {r.predicted_bytes / GiB:9.2f} {r.error:+7.1%}")
    errs = [abs(r.error) for r in results]
    print(f"\n{len(results)} cases: median |error| {statistics.median(errs):.2%}, worst {max(errs):.2%}")
    for s in skipped:
        print(f"skipped: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
