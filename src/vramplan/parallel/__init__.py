"""Multi-GPU layouts: memory of the most loaded GPU, host memory, communication and the pipeline bubble.

``estimate_parallel(spec, workload, layout) -> ParallelEstimate`` models one optimizer step (or one
generation request) spread over ``layout.gpus`` GPUs:

* **Tensor parallel** (Megatron-LM, Shoeybi et al. 2019): attention heads, KV heads, MLP columns and the
  vocabulary (vocab-parallel embedding and output) are split ``tp`` ways; norms, residuals and dropout
  stay replicated. The activations of one GPU come from replaying the core estimator on that shard of
  the model. With **sequence parallelism** (Korthikanti et al. 2022) the replicated activations are split
  too, so every activation of a layer is divided by ``tp`` (their Table 2: ``sbh(34/t + 5as/ht)``).
* **Pipeline parallel**: layers split evenly into ``pp`` stages (the remainder to the stages after the
  first); the embedding lives on the first stage and the final norm and head on the last (a tied
  embedding is duplicated there, as Megatron does). Under 1F1B the stage ``r`` keeps the activations of
  ``min(m, pp - r)`` micro-batches; the interleaved schedule with ``v`` model chunks keeps
  ``((pp - r - 1)·2 + (v - 1)·pp + 1) / v`` (Megatron-LM ``schedules.py``, warm-up micro-batches).
* **Data parallel**, by engine: PyTorch DDP (full replica plus the reducer's gradient buckets, a second
  copy of every gradient unless ``gradient_as_bucket_view``); DeepSpeed ZeRO-1/2/3 (16-bit weights and
  gradients, fp32 master weights and optimizer states inside the optimizer: 2 + 2 + 12 bytes per
  parameter before sharding; ZeRO-3 gathers parameters module by module within the prefetch bucket);
  PyTorch FSDP2 (sharded parameters in their stored dtype, 16-bit copies gathered for the current and
  the next layer, the root module's parameters kept gathered through forward and backward).
* **Expert parallel**: experts split ``ep`` ways inside the data-parallel group; expert parameters are
  sharded by ZeRO/FSDP over ``dp / ep`` ranks.
* **Offload** of optimizer states (and ZeRO-3/FSDP parameters) to host memory.

The activations of a step are those of the single-GPU estimator (``estimator.stage_moments``) for the
shard of the model one GPU runs, at every moment a phase can peak; model states are replaced by the
engine's per-GPU states at each of those moments, and the highest moment of the most loaded GPU is
reported.

* **Reserved memory** (:mod:`.streams`): FSDP2, DeepSpeed ZeRO-1/2/3 and tensor-parallel ranks replay their own
  allocation stream (the single-GPU programs inside the engine's gathers, buckets and shards) through the
  caching-allocator model, each CUDA stream a pool of its own; other layouts add the calibration slack.
* **NCCL buffers** (:mod:`.nccl`): the device memory of every communicator a GPU belongs to, outside
  PyTorch's caching allocator (connections x protocol buffers per channel, NVLink SHARP buffers), added to
  ``total_bytes`` as the ``nccl_buffers`` kind.

Known limits: DeepSpeed and FSDP bucket sizes are the values Hugging Face's integrations fill in for ``"auto"``;
pipeline stages are balanced by layer count, not by measured memory; communication time is the sum of
the collectives' volumes over the peak link bandwidth, with no overlap with compute.

The package by concern: :mod:`.layout` (layouts, engines, checks, the pipeline schedule), :mod:`.sharding`
(the model one GPU holds), :mod:`.engines` (each engine's per-GPU model states, host memory), :mod:`.comm`
(interconnects and collectives) and :mod:`.estimate` (the entry point and its result).
"""

from __future__ import annotations

from ..hardware import Link, get_link, list_links
from .comm import Collective, Communication, Links, links_for_gpu, ring_bytes, ring_factor
from .engines import GPUStates
from .estimate import ParallelEstimate, StageLoad, estimate_parallel
from .layout import (
    DDP_BUCKET_CAP_BYTES,
    ZERO3_MAX_LIVE_PARAMETERS,
    Engine,
    FSDPMode,
    Layout,
    Offload,
    check_layout,
    in_flight_micro_batches,
    pipeline_bubble,
    stage_layers,
    zero_auto_buckets,
)
from .nccl import NcclConfig, NcclMemory, nccl_memory

__all__ = [
    "DDP_BUCKET_CAP_BYTES", "ZERO3_MAX_LIVE_PARAMETERS", "Collective", "Communication", "Engine", "FSDPMode",
    "GPUStates", "Layout", "Link", "Links", "NcclConfig", "NcclMemory", "Offload", "ParallelEstimate", "StageLoad",
    "check_layout", "estimate_parallel", "get_link", "in_flight_micro_batches", "links_for_gpu", "list_links",
    "nccl_memory", "pipeline_bubble", "ring_bytes", "ring_factor", "stage_layers", "zero_auto_buckets",
]
