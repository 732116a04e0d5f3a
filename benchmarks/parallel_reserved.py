"""Per-GPU allocated and reserved memory of the replayed multi-GPU layouts (vramplan.parallel.streams).

For each layout: the closed form's allocated peak (``per_gpu.peak_allocated_bytes``), the rank's replayed stream's
allocated and reserved peaks, reserved per CUDA stream, and the replay's time; then the published ms-swift rows
(shared/reference/published.md: Qwen2.5-7B LoRA on 2 GPUs, ``torch.cuda.max_memory_reserved``).

    python benchmarks/parallel_reserved.py [--model llama-3.1-8b] [--gpus 8] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import time

from vramplan import MemoryKind, get_model
from vramplan.api import make_workload
from vramplan.parallel import FSDPMode, Layout, estimate_parallel
from vramplan.units import GiB

LAYOUTS = {
    "fsdp full": lambda n: Layout(gpus=n, fsdp=FSDPMode.FULL),
    "fsdp grad-op": lambda n: Layout(gpus=n, fsdp=FSDPMode.GRAD_OP),
    "zero-1": lambda n: Layout(gpus=n, zero=1),
    "zero-2": lambda n: Layout(gpus=n, zero=2),
    "zero-3": lambda n: Layout(gpus=n, zero=3),
    "tp": lambda n: Layout(gpus=n, tp=n),
}
SWIFT = [("fsdp2", Layout(gpus=2, fsdp=FSDPMode.FULL), False, 14.7),
         ("zero-2", Layout(gpus=2, zero=2, reduce_bucket_size=200_000_000, overlap_comm=True), True, 18.0),
         ("zero-3", Layout(gpus=2, zero=3), True, 16.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    spec = get_model(args.model).spec
    print(f"{args.model}, batch 1 x {args.seq_len}, bf16, {args.gpus} GPUs (GiB)")
    print(f"{'method':6} {'layout':13} {'closed form':>11} {'replay alloc':>12} {'reserved':>9}  by stream"
          f" (compute, all-gather, reduce)  time")
    for method in ("full", "lora"):
        w = make_workload(method=method, batch_size=1, seq_len=args.seq_len)
        for name, make in LAYOUTS.items():
            t = time.perf_counter()
            est = estimate_parallel(spec, w, make(args.gpus))
            dt = time.perf_counter() - t
            r = est.replay
            if r is None:
                print(f"{method:6} {name:13} {est.peak_allocated_bytes / GiB:11.2f}  (not replayed)")
                continue
            streams = ", ".join(f"{x / GiB:.2f}" for x in r.reserved_by_stream)
            print(f"{method:6} {name:13} {est.peak_allocated_bytes / GiB:11.2f} {r.peak_allocated_bytes / GiB:12.2f} "
                  f"{r.peak_reserved_bytes / GiB:9.2f}  {streams:34} {dt:.2f}s")
    print("\nms-swift Qwen2.5-7B LoRA r=8 all-linear, bf16, batch 1, 2 GPUs: max_memory_reserved (GiB)")
    qwen = get_model("qwen2.5-7b").spec
    for name, layout, ckpt, published in SWIFT:
        for seq in (256, 2048):
            w = make_workload(method="lora", lora_rank=8, lora_alpha=32, lora_targets="all-linear", precision="bf16",
                              batch_size=1, seq_len=seq, gradient_checkpointing=ckpt)
            est = estimate_parallel(qwen, w, layout)
            ours = (est.total_bytes - est.breakdown[MemoryKind.CUDA_CONTEXT] - est.nccl_bytes) / GiB
            print(f"  {name:7} {seq:5} tokens: {ours:6.2f} vs {published:5.1f} published ({ours / published - 1:+.1%})")


if __name__ == "__main__":
    main()
