"""What the reserved-memory model (the caching-allocator replay) costs.

    python benchmarks/reserved_speed.py            # in-process timings and the CLI commands, 3 runs each
    python benchmarks/reserved_speed.py --main DIR # also the same CLI commands on another checkout's src/

In process: one uncached estimate of llama-3.1-8b with the replay (``estimate``) and without it
(``estimate(..., reserved=False)``, the analytic path the plan search uses), and the replay alone, full
(3 steps) and as the estimator runs it (stopping once a step reserves nothing new). End to end: ``vramplan
fit`` and ``vramplan plan`` in fresh interpreters (medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vramplan import Workload, get_model
from vramplan.alloc_stream import train_events
from vramplan.allocator import simulate
from vramplan.estimator import _estimate_cached, _phases, numerics, reserved_stats
from vramplan.memory import model_states

CLI = [
    ["fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--gradient-checkpointing"],
    ["fit", "llama-3.1-8b", "--gpu", "a100-40gb-sxm", "--task", "infer", "--seq-len", "4096"],
    ["plan", "llama-3.1-8b", "--task", "finetune"],
    ["plan", "llama-3.1-8b", "--task", "infer"],
]


def _median_ms(fn: object, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def in_process(n: int) -> None:
    spec = get_model("llama-3.1-8b").spec

    def workload(i: int) -> Workload:
        return Workload(method="lora", batch_size=1 + i % 4, seq_len=1024 + 64 * i)  # distinct: no cache hits

    def uncached(i: int, reserved: bool) -> None:
        _estimate_cached.cache_clear()
        _phases.cache_clear()
        _estimate_cached(spec, workload(i), "llama-3.1-8b", reserved)

    with_replay = _median_ms(lambda i: uncached(i, True), n)
    analytic = _median_ms(lambda i: uncached(i, False), n)
    print(f"estimate llama-3.1-8b LoRA, uncached, with the replay:    {with_replay:8.1f} ms")
    print(f"estimate llama-3.1-8b LoRA, uncached, analytic only:      {analytic:8.1f} ms")
    w = workload(0)
    states, num = model_states(spec, w), numerics(w)
    print(f"replay, full 3 steps:                                     "
          f"{_median_ms(lambda i: simulate(train_events(spec, w, states, num, 3)), n):8.1f} ms")
    print(f"replay, as the estimator runs it (early stop):            "
          f"{_median_ms(lambda i: reserved_stats(spec, w, states, num), n):8.1f} ms")


def end_to_end(src: str, n: int) -> None:
    env = dict(os.environ, PYTHONPATH=src)
    for args in CLI:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vramplan", *args], check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - t0)
        print(f"  vramplan {' '.join(args):75s} {statistics.median(times):6.2f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--main", help="another checkout's root, to time its CLI beside this one")
    a = ap.parse_args()
    in_process(max(a.runs, 5))
    here = str(Path(__file__).resolve().parents[1] / "src")
    print(f"this checkout ({here}):")
    end_to_end(here, a.runs)
    if a.main:
        print(f"{a.main}:")
        end_to_end(str(Path(a.main) / "src"), a.runs)
