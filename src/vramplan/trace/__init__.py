"""Trace the real model code on fake tensors and report the peak GPU memory the CUDA caching allocator
would report (``torch.cuda.max_memory_allocated``).

``trace_workload(config, workload)`` builds the transformers (and peft) model for a Hugging Face
``config.json`` without weights, runs the workload's training steps or prefill + decode on fake tensors
(no GPU, no weights), and accounts every allocation with CUDA's rounding, kernel choices and autocast
rules. It needs the ``[torch]`` extra; ``import vramplan.trace`` works without it.

What is emulated (the trace runs on fake *cpu* tensors; a CPU-only torch build cannot run backward on fake
CUDA tensors): CUDA's scaled-dot-product-attention kernel choice (cuDNN/flash, memory-efficient, math) and
the kernels' internal backward buffers, fused dropout, CUDA autocast policies and its weight-cast cache, the
foreach optimizer path, 512-byte allocator blocks, two (training) or one (inference) 32 MiB cuBLAS
workspace, bitsandbytes NF4 / LLM.int8 / 8-bit AdamW (their storage and temporaries; the arithmetic is not
reproduced) and fp8 weights.

Known limits: the trace follows the *installed* torch / transformers / peft code, so version differences
are real differences (e.g. transformers 5.24 drops SDPA for Gemma-2, 5.17 kept it; torch 2.13's
``_safe_softmax`` backward allocates less than 2.11's). Data-dependent ``.item()`` calls are answered as
real data would (random draws at their mean, masks all-true); MoE routing shapes come from the grouped
kernels, which do not depend on routing. One training step stands for the steady state (the optimizer
state is created first); decode steps 1 and N are traced and the KV cache is grown through its own
``update()`` in between. Multi-GPU layouts are not traced. Not thread-safe: a trace installs temporary
kernels on the CPU dispatch keys for its duration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import VramplanError
from ..result import Estimate
from ..workload import Workload

__all__ = ["TORCH_MISSING", "trace_available", "trace_workload"]

TORCH_MISSING = "vramplan trace needs the [torch] extra: pip install 'vramplan[torch]' (torch, transformers, peft)"


def trace_available() -> bool:
    """Whether torch, transformers and peft can be imported."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


_progress: Callable[[str], None] | None = None


def report(step: str) -> None:
    """Tell the caller's ``progress`` callback which step the trace is in (import, build, forward, …)."""
    if _progress is not None:
        _progress(step)


def trace_workload(config: Mapping[str, Any], workload: Workload, *, name: str = "model",
                   progress: Callable[[str], None] | None = None) -> Estimate:
    """Peak GPU memory of ``workload`` on the model described by ``config`` (a config.json mapping).

    ``progress``, when given, is called with each step as it starts: importing torch, building the model,
    then the phases (forward, backward, optimizer step; prefill, decode) — a trace takes seconds.
    """
    global _progress
    _progress = progress
    try:
        report("importing torch, transformers and peft")
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise VramplanError(TORCH_MISSING) from None
        from ._engine import run_trace

        return run_trace(config, workload, name)
    finally:
        _progress = None
