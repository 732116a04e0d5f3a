"""Which tensors are alive at the peak of a workload, on a real GPU (torch memory history).

usage: python benchmarks/peak_probe.py MODEL [workload options as key=value ...]
Prints the live allocations at the moment of max_memory_allocated with the Python frames that
made them — the ground truth for explaining a gap between estimate and measurement.
"""

from __future__ import annotations

import sys
from typing import Any

from vramplan import get_model, make_workload
from vramplan.measure import measure_workload

GiB = 2**30


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str]) -> int:
    import torch

    model = argv[0]
    opts = {k: _value(v) for k, v in (a.split("=", 1) for a in argv[1:])}
    torch.cuda.memory._record_memory_history(max_entries=200000)
    m = measure_workload(get_model(model).config_dict(), make_workload(**opts), steps=2)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][0]
    live: dict[int, tuple[int, list[dict[str, Any]]]] = {}
    cur = best = 0
    best_live: dict[int, tuple[int, list[dict[str, Any]]]] = {}
    for ev in events:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            cur += ev["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    print(f"{model} {opts}: measured peak {m.peak_allocated_bytes / GiB:.3f} GiB; "
          f"traced peak {best / GiB:.3f} GiB ({len(best_live)} live blocks)")
    groups: dict[str, list[int]] = {}
    for size, frames in best_live.values():
        py = [f for f in frames if f["filename"].endswith(".py") and "site-packages/torch/" not in f["filename"]]
        where = " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in py[:3])
        groups.setdefault(where or "(no python frame)", []).append(size)
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(f"{sum(sizes) / GiB:8.3f} GiB  {len(sizes):4d} x  {where}  "
              f"[{', '.join(f'{x / 2**20:.0f}M' for x in sorted(sizes, reverse=True)[:4])}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
