"""Speed targets: one uncached estimate in-process < 1 ms; `vramplan estimate llama-3.1-8b` < 300 ms."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from vramplan import Workload, get_model
from vramplan.estimator import _estimate_cached


def in_process(n: int = 300) -> float:
    spec = get_model("llama-3.1-8b").spec
    times = []
    for i in range(n):
        w = Workload(batch_size=1 + i % 16, seq_len=512 + i)  # distinct workloads: no cache hits
        _estimate_cached.cache_clear()
        t0 = time.perf_counter()
        _estimate_cached(spec, w, "llama-3.1-8b")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def end_to_end(n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vramplan", "estimate", "llama-3.1-8b"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    one = in_process()
    cli = end_to_end()
    print(f"in-process estimate (uncached, median): {one * 1e3:.3f} ms  (target < 1 ms)")
    print(f"vramplan estimate llama-3.1-8b end to end (median): {cli * 1e3:.0f} ms  (target < 300 ms)")
