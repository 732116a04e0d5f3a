"""Target: `trace` of an 8B model's training step in <= 10 s and <= 2 GiB of host RAM (issue: Ground truth).

usage: python benchmarks/trace_speed.py   (needs the [torch] extra)
Runs in a fresh process: reports the import time, the first (cold) and a second (warm) trace of
llama-3.1-8b (bf16, AdamW, batch 1 x 2048), and the process's peak resident memory.
"""

from __future__ import annotations

import resource
import sys
import time


def main() -> int:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from vramplan import Workload, get_model
    from vramplan.trace import trace_workload

    t_import = time.perf_counter() - t0
    config = get_model("llama-3.1-8b").config_dict()
    w = Workload(batch_size=1, seq_len=2048)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        est = trace_workload(config, w, name="llama-3.1-8b")
        times.append(time.perf_counter() - t)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print(f"imports {t_import:.1f} s; trace cold {times[0]:.1f} s, warm {times[1]:.1f} s "
          f"(target <= 10 s); peak host RSS {rss_gib:.2f} GiB (target <= 2 GiB); "
          f"traced peak {est.peak_allocated_bytes / 2**30:.2f} GiB")
    return 0 if times[0] <= 10 and rss_gib <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
