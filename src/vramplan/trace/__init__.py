"""Trace the real model code on fake tensors and report the peak GPU memory the CUDA caching allocator
would report (``torch.cuda.max_memory_allocated``).

``trace_workload(config, workload)`` builds the transformers (and peft) model for a Hugging Face
``config.json`` without weights, runs the workload's training steps or prefill + decode on fake tensors
(no GPU, no weights), and accounts every allocation with CUDA's rounding, kernel choices and autocast
rules. It needs the ``[torch]`` extra; ``import vramplan.trace`` works without it.

Known limits: bitsandbytes layers and the 8-bit optimizer are emulated by their storage and temporaries;
data-dependent values (``.item()``) are answered as real data would; MoE routing is whatever the model's
grouped kernels see with fake data (their shapes do not depend on routing); multi-GPU is not traced.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def trace_workload(config: Mapping[str, Any], workload: Workload, *, name: str = "model") -> Estimate:
    """Peak GPU memory of ``workload`` on the model described by ``config`` (a config.json mapping)."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise VramplanError(TORCH_MISSING) from None
    from ._engine import run_trace

    return run_trace(config, workload, name)
