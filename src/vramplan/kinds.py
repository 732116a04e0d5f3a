"""The one list of memory kinds and phases that every estimate, table, JSON and chart uses."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DEVICE_KINDS", "KIND_LABELS", "MemoryKind", "Phase"]


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
    NCCL_BUFFERS = "nccl_buffers"  # NCCL communicator buffers of multi-GPU layouts (outside the caching allocator)


# Kinds that live inside torch.cuda.max_memory_allocated (the rest are on top of it).
DEVICE_KINDS = tuple(k for k in MemoryKind if k not in (MemoryKind.CUDA_CONTEXT, MemoryKind.ALLOCATOR_SLACK,
                                                        MemoryKind.NCCL_BUFFERS))


class Phase(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"
    PREFILL = "prefill"
    DECODE = "decode"


# How every client (table, chart, web page) names each kind.
KIND_LABELS = {
    MemoryKind.WEIGHTS: "weights", MemoryKind.MASTER_WEIGHTS: "master weights (fp32)",
    MemoryKind.GRADIENTS: "gradients", MemoryKind.OPTIMIZER_STATE: "optimizer state",
    MemoryKind.ACTIVATIONS: "activations", MemoryKind.LOGITS_LOSS: "logits and loss",
    MemoryKind.KV_CACHE: "KV cache", MemoryKind.QUANTIZATION_CONSTANTS: "quantization constants",
    MemoryKind.WORKSPACE: "workspace (cuBLAS)", MemoryKind.CUDA_CONTEXT: "CUDA context",
    MemoryKind.ALLOCATOR_SLACK: "allocator slack", MemoryKind.NCCL_BUFFERS: "NCCL buffers",
}
