"""Layouts: how a job is spread over GPUs (data, tensor, pipeline, expert parallel; ZeRO, FSDP, offload),
which engine that implies, whether a model can take it, and the pipeline schedule's arithmetic."""


from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from ..errors import WorkloadError
from ..spec import ModelSpec
from ..units import MiB
from ..workload import Workload

# ---- constants of the engines, each where the framework defines it --------------------------------
# torch/nn/parallel/distributed.py: bucket_cap_mb=25 (the first bucket 1 MiB, dist._DEFAULT_FIRST_BUCKET_BYTES).
# The sizes only group gradients; the buckets together hold one copy of every gradient (reducer.cpp,
# Reducer::initialize_buckets: ``bucket.gradients = at::empty({bucketSize}, options)``).
DDP_BUCKET_CAP_BYTES = 25 * MiB
# DeepSpeed runtime/zero/config.py: stage3_max_live_parameters default 1e9 elements.
ZERO3_MAX_LIVE_PARAMETERS = 10**9


def zero_auto_buckets(hidden_size: int) -> tuple[int, int, int]:
    """(reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold) in elements,
    as transformers' DeepSpeed integration fills ``"auto"`` (integrations/deepspeed.py,
    ``trainer_config_finalize``: hidden², 0.9·hidden², 10·hidden)."""
    return hidden_size * hidden_size, int(0.9 * hidden_size * hidden_size), 10 * hidden_size


class FSDPMode(StrEnum):
    FULL = "full"  # FULL_SHARD / FSDP2 reshard_after_forward=True (ZeRO-3-like)
    GRAD_OP = "grad-op"  # SHARD_GRAD_OP / reshard_after_forward=False (ZeRO-2-like)
    HYBRID = "hybrid"  # HYBRID_SHARD: full shard inside a node, replicate across nodes


class Offload(StrEnum):
    NONE = "none"
    OPTIMIZER = "optimizer"
    OPTIMIZER_PARAMS = "optimizer+params"


class Engine(StrEnum):
    """Which framework's memory layout a :class:`Layout` implies."""

    DDP = "ddp"  # PyTorch DistributedDataParallel: replicas, autocast as on one GPU
    MEGATRON = "megatron"  # Megatron-LM tensor/pipeline parallel: 16-bit module, fp32 main grads and master
    DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO stage 1, 2 or 3 (with pipeline parallel: ZeRO-1)
    FSDP = "fsdp"  # PyTorch FSDP2 (fully_shard)


@dataclass(frozen=True, slots=True)
class Layout:
    """How a job is spread over GPUs. ``dp`` is derived: gpus / (tp * pp).

    ``micro_batches`` is the number of micro-batches per optimizer step (pipeline micro-batches, or
    gradient accumulation without a pipeline); ``virtual_stages`` > 1 selects the interleaved 1F1B
    schedule with that many model chunks per GPU; ``ddp_bucket_view`` is DDP's
    ``gradient_as_bucket_view`` (False, the default, keeps a second copy of the gradients).
    ``reduce_bucket_size`` (elements) and ``overlap_comm`` are DeepSpeed's settings (None: what
    transformers fills in for ``"auto"``, hidden², and DeepSpeed's default, on for ZeRO-3 only).
    """

    gpus: int = 1
    nodes: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0
    fsdp: FSDPMode | None = None
    micro_batches: int = 1
    offload: Offload = Offload.NONE
    sequence_parallel: bool = False
    virtual_stages: int = 1
    ddp_bucket_view: bool = False
    reduce_bucket_size: int | None = None
    overlap_comm: bool | None = None

    def __post_init__(self) -> None:
        for name in ("gpus", "nodes", "tp", "pp", "ep", "micro_batches", "virtual_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            raise WorkloadError(f"zero stage must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.fsdp is not None:
            raise WorkloadError("choose either --zero (DeepSpeed) or --fsdp (PyTorch FSDP), not both")
        if self.gpus % (self.tp * self.pp):
            raise WorkloadError(f"--gpus {self.gpus} is not a multiple of tp x pp = {self.tp * self.pp} "
                                "(gpus = tp x pp x dp)")
        if self.gpus % self.nodes:
            raise WorkloadError(f"--gpus {self.gpus} cannot be split evenly over {self.nodes} nodes")
        if self.dp % self.ep:
            raise WorkloadError(f"--ep {self.ep} must divide the data-parallel size {self.dp} "
                                "(experts are split inside the data-parallel group)")
        if self.sequence_parallel and self.tp == 1:
            raise WorkloadError("--sequence-parallel splits activations over the tensor-parallel group; "
                                "it needs --tp > 1")
        if self.virtual_stages > 1 and self.pp == 1:
            raise WorkloadError("an interleaved schedule (virtual stages) needs --pp > 1")
        if self.offload is not Offload.NONE and not self.zero and self.fsdp is None:
            raise WorkloadError("offload needs a sharded optimizer: add --zero 1|2|3 or --fsdp")
        if self.offload is Offload.OPTIMIZER_PARAMS and self.zero in (1, 2):
            raise WorkloadError("DeepSpeed offloads parameters only with ZeRO-3; use --zero 3 or --offload optimizer")
        if self.offload is Offload.OPTIMIZER and self.fsdp is not None:
            raise WorkloadError("FSDP offloads parameters, gradients and optimizer states together "
                                "(CPUOffloadPolicy); use --offload optimizer+params")
        if self.reduce_bucket_size is not None and not 1 <= self.reduce_bucket_size <= 1 << 40:
            raise WorkloadError(f"reduce bucket size must be a positive number of elements, got "
                                f"{self.reduce_bucket_size!r}")
        if self.fsdp is FSDPMode.HYBRID and self.dp % self.nodes:
            raise WorkloadError(f"--fsdp hybrid shards inside each node: the data-parallel size {self.dp} "
                                f"must be a multiple of --nodes {self.nodes}")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def is_single(self) -> bool:
        return self.gpus == 1

    @property
    def engine(self) -> Engine:
        if self.zero:
            return Engine.DEEPSPEED
        if self.fsdp is not None:
            return Engine.FSDP
        if self.tp > 1 or self.pp > 1:
            return Engine.MEGATRON
        return Engine.DDP

    @property
    def shard_degree(self) -> int:
        """Ranks that a ZeRO/FSDP shard of the dense parameters is split over (1: not sharded)."""
        if self.fsdp is FSDPMode.HYBRID:
            return self.dp // self.nodes
        return self.dp


# ---- layout checks -------------------------------------------------------------------------------------
def check_layout(spec: ModelSpec, workload: Workload, layout: Layout) -> None:
    """Raise :class:`WorkloadError` (one line) if ``layout`` cannot run ``spec``."""
    tp, pp = layout.tp, layout.pp
    if spec.num_heads % tp:
        raise WorkloadError(f"{spec.num_heads} attention heads are not divisible by --tp {tp}")
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise WorkloadError(f"{spec.num_kv_heads} KV heads cannot be split or replicated over --tp {tp}")
    ffn = spec.moe_intermediate_size if spec.is_moe and not spec.intermediate_size else spec.intermediate_size
    if ffn % tp:
        raise WorkloadError(f"the MLP width {ffn} is not divisible by --tp {tp}")
    if spec.num_layers < pp * layout.virtual_stages:
        raise WorkloadError(f"{spec.num_layers} layers cannot fill --pp {pp}"
                            + (f" x {layout.virtual_stages} virtual stages" if layout.virtual_stages > 1 else "")
                            + " pipeline stages")
    if layout.ep > 1:
        if not spec.is_moe:
            raise WorkloadError(f"--ep {layout.ep} needs a mixture-of-experts model; {spec.name} has no experts")
        if spec.num_experts % layout.ep:
            raise WorkloadError(f"{spec.num_experts} experts are not divisible by --ep {layout.ep}")
    if layout.zero == 3 and layout.pp > 1:
        raise WorkloadError("DeepSpeed does not combine ZeRO-3 with pipeline parallelism; use --zero 1 with --pp")
    if not workload.is_train and layout.zero in (1, 2):
        raise WorkloadError("ZeRO-1/2 shard optimizer states and gradients, which inference does not have; "
                            "use --zero 3 or no --zero")


def stage_layers(num_layers: int, pp: int) -> tuple[range, ...]:
    """Decoder layers of each pipeline stage: an even split, the remainder to the stages after the first
    (which holds the embedding and the most micro-batches in flight)."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for i in range(pp):
        n = base + (1 if 1 <= i <= extra else 0)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


def in_flight_micro_batches(stage: int, pp: int, micro_batches: int, virtual_stages: int = 1) -> Fraction:
    """Micro-batches whose activations stage ``stage`` holds at once (Megatron-LM
    core/pipeline_parallel/schedules.py: 1F1B warm-up ``pp - rank - 1`` plus the one in flight; interleaved
    ``(pp - rank - 1)·2 + (v - 1)·pp`` chunk warm-ups plus one, each chunk 1/v of the stage)."""
    if pp == 1:
        return Fraction(1)
    if virtual_stages == 1:
        return Fraction(min(micro_batches, pp - stage))
    chunks = (pp - stage - 1) * 2 + (virtual_stages - 1) * pp + 1
    return min(Fraction(micro_batches), Fraction(chunks, virtual_stages))


def pipeline_bubble(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a pipelined step: (p − 1)/(v·m + p − 1) (GPipe, Huang et al. 2019; interleaved
    1F1B divides the bubble by v, Narayanan et al. 2021)."""
    if pp == 1:
        return 0.0
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)
