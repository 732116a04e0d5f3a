"""How fast an estimate answers, against the targets: a warm estimate < 1 ms, ``vramplan estimate MODEL`` < 200 ms.

    python benchmarks/speed.py              # llama-3.1-8b, the default training workload (the CLI's default)
    python benchmarks/speed.py -n 30        # more repetitions
    python benchmarks/speed.py --catalog    # the warm new-workload figures for every model of the catalog

Measured (each the minimum over repetitions, and the median beside it; the machine's load average is printed,
since other processes inflate every figure; in brackets the CPU time the measured process itself spent,
``time.process_time`` and, for the CLI, the child's user + system time, which waiting for a shared core does not
count: the steadier figure on a busy machine):

* cold import: ``import vramplan`` in a fresh interpreter;
* first estimate: the first ``vramplan.estimate(MODEL)`` in that interpreter (resolves the model, builds the
  programs, replays the allocator);
* warm estimate, new workload: same process, model resolved, a workload not seen before (a new sequence length),
  with the reserved-memory replay (what ``estimate`` returns) and without it (``reserved=False``, the analytic path
  the plan search uses);
* warm estimate, same workload: the answer is memoized (``estimator._estimate_cached``);
* the CLI: ``vramplan estimate MODEL --json`` end to end (interpreter start included);
* ``--catalog``: the two warm new-workload figures for every model of the catalog (training, sequence lengths from
  512 so that every model takes them), with how many are under the target and the slowest.

The package is byte-compiled first (``compileall``), as an install does: with ``PYTHONDONTWRITEBYTECODE`` set and no
``__pycache__``, every CLI run would compile ~100 modules (+300 ms) and measure that instead.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import vramplan
from vramplan import get_model
from vramplan.estimator import estimate

WARM_TARGET_MS = 1.0
CLI_TARGET_MS = 200.0


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


Sample = tuple[float, float]  # (wall seconds, CPU seconds)


def cold(model: str, n: int) -> tuple[list[Sample], list[Sample]]:
    """(import times, first-estimate times) in fresh interpreters."""
    code = ("import time; c = time.process_time; t0, c0 = time.perf_counter(), c(); import vramplan;"
            f"t1, c1 = time.perf_counter(), c(); vramplan.estimate({model!r}); t2, c2 = time.perf_counter(), c();"
            "print(t1 - t0, c1 - c0, t2 - t1, c2 - c1)")
    imports, firsts = [], []
    for _ in range(n):
        a, b, c, d = (float(x) for x in _fresh(code).split())
        imports.append((a, b))
        firsts.append((c, d))
    return imports, firsts


def _timed(fn: Callable[[], object]) -> Sample:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def warm(model: str, n: int, reserved: bool, offset: int) -> list[float]:
    spec = get_model(model).spec
    vramplan.estimate(model)  # resolved, programs built
    times = []
    for i in range(n):
        w = vramplan.make_workload(seq_len=2048 + offset + 8 * (i + 1))  # new workload every time: no cache hit
        times.append(_timed(lambda: estimate(spec, w, name=model, reserved=reserved)))  # noqa: B023 (called at once)
    return times


def cached(model: str, n: int) -> list[Sample]:
    vramplan.estimate(model)
    return [_timed(lambda: vramplan.estimate(model)) for _ in range(n)]


def cli(model: str, n: int) -> list[Sample]:
    """Wall time, and the child's CPU time (user + system)."""
    times = []
    for _ in range(n):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vramplan", "estimate", model, "--json"], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime))
    return times


def catalog(n: int) -> None:
    from vramplan.catalog import list_models

    rows = []
    for entry in list_models():
        name, spec = entry.name, entry.spec
        try:
            estimate(spec, vramplan.make_workload(seq_len=500), name=name)
        except vramplan.VramplanError:
            continue
        row = [name]
        for reserved, offset in ((False, 0), (True, 8 * (n + 1))):
            times = []
            for i in range(n):
                w = vramplan.make_workload(seq_len=512 + offset + 8 * i)  # new every time
                t0 = time.perf_counter()
                estimate(spec, w, name=name, reserved=reserved)
                times.append(time.perf_counter() - t0)
            row.append(min(times) * 1e3)
        rows.append(row)
    for col, label in ((1, "reserved=False"), (2, "with the replay")):
        rows.sort(key=lambda r: r[col])
        met = sum(r[col] < WARM_TARGET_MS for r in rows)
        print(f"catalog, warm estimate, new workload ({label}): {met} of {len(rows)} models < {WARM_TARGET_MS:g} ms; "
              f"median {statistics.median(r[col] for r in rows):.3f} ms; slowest: "
              + ", ".join(f"{r[0]} {r[col]:.1f} ms" for r in rows[-5:]))


def _row(label: str, samples: list[Sample], target_ms: float | None = None) -> str:
    wall, cpu = [s[0] * 1e3 for s in samples], [s[1] * 1e3 for s in samples]
    lo, mid = min(wall), statistics.median(wall)
    verdict = "" if target_ms is None else f"  target < {target_ms:g} ms: {'met' if lo < target_ms else 'MISSED'}"
    return (f"{label:<52} min {lo:9.3f} ms  median {mid:9.3f} ms  (cpu min {min(cpu):8.3f}  median "
            f"{statistics.median(cpu):8.3f}){verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("-n", type=int, default=10, help="repetitions of each measurement")
    ap.add_argument("--catalog", action="store_true", help="the warm new-workload figures of every catalog model")
    args = ap.parse_args()
    compileall.compile_dir(str(Path(vramplan.__file__).parent), quiet=1)
    print(f"load average (1, 5, 15 min) before: {os.getloadavg()}; {os.cpu_count()} CPUs")
    if args.catalog:
        catalog(max(3, args.n // 3))
        print(f"load average after: {os.getloadavg()}")
        return
    imports, firsts = cold(args.model, args.n)
    print(_row("cold import vramplan", imports))
    print(_row(f"first estimate {args.model} (fresh interpreter)", firsts))
    print(_row("warm estimate, new workload (with the replay)", warm(args.model, args.n * 3, True, 0), WARM_TARGET_MS))
    print(_row("warm estimate, new workload (reserved=False)", warm(args.model, args.n * 3, False, 10_000),
               WARM_TARGET_MS))
    print(_row("warm estimate, same workload (memoized)", cached(args.model, args.n * 10), WARM_TARGET_MS))
    print(_row(f"vramplan estimate {args.model} --json", cli(args.model, args.n), CLI_TARGET_MS))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
