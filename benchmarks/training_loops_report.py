"""Estimate vs trace for the training loops and memory savers (issue 14), on the small configs of
``tests/test_training_loops.py``. Needs the [torch] extra; prints one line per case and the worst |error|.

    python benchmarks/training_loops_report.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_training_loops import CASES, SLOW_CASES, _pair


def main() -> int:
    worst = 0.0
    for family, options in CASES + SLOW_CASES:
        t0 = time.perf_counter()
        est, traced = _pair(family, **options)
        err = est / traced - 1
        worst = max(worst, abs(err))
        print(f"{family:9s} {' '.join(f'{k}={v}' for k, v in options.items()):60s} estimate {est / 2**20:8.2f} MiB  "
              f"trace {traced / 2**20:8.2f} MiB  {err:+.2%}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"worst |error| {worst:.2%} over {len(CASES) + len(SLOW_CASES)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
