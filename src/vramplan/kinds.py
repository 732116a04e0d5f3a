"""The one list of memory kinds and phases that every estimate, table, JSON and chart uses."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DEVICE_KINDS", "MemoryKind", "Phase"]


class MemoryKind(StrEnum):
    WEIGHTS = "weights"
    MASTER_WEIGHTS = "master_weights"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    LOGITS_LOSS = "logits_loss"
    KV_CACHE = "kv_cache"
    QUANTIZATION_CONSTANTS = "quantization_constants"
    WORKSPACE = "workspace"
    CUDA_CONTEXT = "cuda_context"
    ALLOCATOR_SLACK = "allocator_slack"


# Kinds that live inside torch.cuda.max_memory_allocated (the rest are on top of it).
DEVICE_KINDS = tuple(k for k in MemoryKind if k not in (MemoryKind.CUDA_CONTEXT, MemoryKind.ALLOCATOR_SLACK))


class Phase(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"
    PREFILL = "prefill"
    DECODE = "decode"
