"""Trace every language-model row of the H200 calibration and compare with the measured peak.

usage: python benchmarks/trace_report.py [--cases SUBSTR] [--json OUT] [--calibration DIR]

DIR holds measured.csv and configs/<model>.json: the H200 calibration copied into tests/data
(default) or the project's own grid, tests/data/h200-grid.

Prints measured / traced / error% per case (peak_alloc_gib, GiB = 2**30) and the aggregate (median and
worst absolute error). Rows the trace cannot run (vision, diffusion) are listed with the reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vramplan.calibration import workload_of_row  # noqa: E402
from vramplan.workload import Workload  # noqa: E402

GiB = 2**30
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "tests" / "data" / "calibration"


def workload_for_row(row: dict[str, str]) -> Workload | str:
    """The Workload a measured.csv row ran (as vramplan.calibration reads it), or why the trace skips it."""
    w = workload_of_row(row)
    if w is None:
        return f"task {row['task']!r} is not a language model (torchvision / diffusers are out of the trace's scope)"
    return w


def run(cases: list[str], calibration: Path) -> dict[str, Any]:
    from vramplan.trace import trace_workload

    with open(calibration / "measured.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for row in rows:
        if cases and not any(c in row["name"] for c in cases):
            continue
        wl = workload_for_row(row)
        if isinstance(wl, str):
            skipped.append({"case": row["name"], "reason": wl})
            continue
        config = json.loads((calibration / "configs" / f"{row['model']}.json").read_text())
        measured = float(row["peak_alloc_gib"])
        t0 = time.perf_counter()
        try:
            est = trace_workload(config, wl, name=row["model"])
        except Exception as exc:  # a failed trace is a finding to report, not a crash
            skipped.append({"case": row["name"], "reason": f"trace failed: {type(exc).__name__}: {exc}"})
            print(f"{row['name']:45s} FAILED {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            continue
        secs = time.perf_counter() - t0
        traced = est.peak_allocated_bytes / GiB
        err = (traced - measured) / measured * 100
        results.append({"case": row["name"], "measured_gib": measured, "traced_gib": round(traced, 4),
                        "error_pct": round(err, 2), "peak_phase": est.peak_phase.value, "seconds": round(secs, 2),
                        "params": est.parameters, "params_measured": int(row["params"] or 0),
                        "trainable": est.trainable_parameters, "trainable_measured": int(row["trainable"] or 0),
                        "breakdown_gib": {k: round(v / GiB, 3) for k, v in est.breakdown.as_dict().items() if v},
                        "where": next((a for a in est.assumptions if a.startswith("peak at")), "")})
        print(f"{row['name']:45s} measured {measured:7.3f}  traced {traced:7.3f}  error {err:+6.2f}%  "
              f"{est.peak_phase.value:14s} {secs:5.1f}s", flush=True)
    errors = [abs(r["error_pct"]) for r in results]
    summary = {
        "cases": len(results),
        "median_abs_error_pct": round(statistics.median(errors), 2) if errors else None,
        "worst_abs_error_pct": round(max(errors), 2) if errors else None,
        "within_5pct": sum(e <= 5 for e in errors),
        "total_seconds": round(sum(r["seconds"] for r in results), 1),
    }
    return {"results": results, "skipped": skipped, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", action="append", default=[], help="only cases whose name contains this")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    args = ap.parse_args()
    report = run(args.cases, args.calibration)
    s = report["summary"]
    print()
    for sk in report["skipped"]:
        print(f"not traced: {sk['case']}: {sk['reason']}")
    print(f"\n{s['cases']} cases: median |error| {s['median_abs_error_pct']}%, worst {s['worst_abs_error_pct']}%, "
          f"{s['within_5pct']} within 5%, {s['total_seconds']} s of tracing")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
