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

Known limits: NCCL's own buffers (allocated outside PyTorch's caching allocator) are not counted;
DeepSpeed and FSDP bucket sizes are the values Hugging Face's integrations fill in for ``"auto"``;
pipeline stages are balanced by layer count, not by measured memory; communication time is the sum of
the collectives' volumes over the peak link bandwidth, with no overlap with compute.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from functools import cache
from importlib import resources
from typing import Any

from .errors import UnknownNameError, WorkloadError
from .estimator import ALLOCATOR_SLACK_FRACTION, CUDA_CONTEXT_BYTES, StageMoments, estimate, stage_moments
from .kinds import MemoryKind, Phase
from .memory import ModelStates, model_states
from .params import ParamCounts, count_params, mlp_linears
from .result import Breakdown, Estimate, PhasePeak
from .spec import ModelSpec
from .units import MiB
from .workload import Method, Precision, Workload

__all__ = [
    "Collective", "Communication", "Engine", "FSDPMode", "GPUStates", "Layout", "Link", "Links", "Offload",
    "ParallelEstimate", "StageLoad", "check_layout", "estimate_parallel", "get_link", "links_for_gpu",
    "list_links", "pipeline_bubble", "stage_layers",
]

K = MemoryKind
_ACT_KINDS = (K.ACTIVATIONS, K.LOGITS_LOSS, K.KV_CACHE)

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


# ---- interconnects -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Link:
    """One kind of GPU link; bandwidth is what one GPU can send in one direction at peak."""

    name: str
    display_name: str
    kind: str
    scope: str  # intra-node or inter-node
    bandwidth_per_direction_bytes_per_s: int
    note: str
    source: str
    retrieved: str


@dataclass(frozen=True, slots=True)
class Links:
    """The links a layout communicates over: inside a node, and between nodes."""

    intra_node: str = "nvlink-4"
    inter_node: str = "ib-ndr"


@cache
def _links() -> Mapping[str, Link]:
    raw = json.loads(resources.files("vramplan").joinpath("data/interconnects.json").read_text("utf-8"))
    if raw.get("schema") != 1:
        raise UnknownNameError("data/interconnects.json: unsupported schema")
    return {r["name"]: Link(r["name"], r["display_name"], r["kind"], r["scope"],
                            int(r["bandwidth_per_direction_bytes_per_s"]), r["note"], r["source"], r["retrieved"])
            for r in raw["links"]}


def list_links() -> tuple[Link, ...]:
    return tuple(_links().values())


def get_link(name: str) -> Link:
    """A link by name (``nvlink-4``, ``pcie-5``, ``ib-ndr``, ``roce-400``, …); unknown names get suggestions."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    links = _links()
    if key in links:
        return links[key]
    close = difflib.get_close_matches(key, list(links), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownNameError(f"unknown interconnect {name!r}{hint} (known: {', '.join(links)})")


def links_for_gpu(gpu: str, gpus_per_node: int, inter_node: str = "ib-ndr") -> Links:
    """The intra-node link of a catalog GPU (``vramplan gpus``): NVLink generation for SXM parts; a 2-way
    bridge only when a node holds two GPUs; otherwise the card's PCIe generation."""
    from .hardware import get_gpu

    ic = get_gpu(gpu).interconnect
    kind = ic.kind.lower()
    if "nvlink" in kind and "bridge" not in kind:
        gen = "".join(c for c in kind if c.isdigit())[:1]
        return Links(f"nvlink-{gen}", inter_node)
    if "bridge" in kind and gpus_per_node <= 2:
        return Links("nvlink-bridge", inter_node)
    pcie = ic.pcie_gen or (5 if "5.0" in ic.note else 4)
    return Links(f"pcie-{min(max(pcie, 3), 5)}", inter_node)


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GPUStates:
    """Model states of one GPU under a layout, in bytes.

    ``model_states_bytes`` (weights + master weights + quantization constants + gradients + optimizer
    state) is what the ZeRO paper's per-GPU figures count. ``step_temporaries`` exist only during the
    optimizer step (DeepSpeed's fp32 copy of the gradient partition, the optimizer's own temporaries);
    ``gathered`` only during forward/backward (ZeRO-3/FSDP unsharded layers). In backward, gradients
    as autograd makes them stay unsharded up to ``unsharded_gradients`` bytes (the layer or module being
    reduced, FSDP's root module until the end of backward) before they are reduced into ``gradients``;
    ``gradient_transient`` (reduce buckets, the reduce-scatter input) exists once reduction starts.
    ``buffers`` exist always (DDP's gradient buckets); ``offloaded`` lives in host memory instead.
    """

    weights: int
    master_weights: int
    quantization_constants: int
    gradients: int
    optimizer_state: int
    step_temporaries: int = 0
    gathered: int = 0
    gradient_transient: int = 0
    buffers: int = 0
    offloaded: int = 0
    unsharded_gradients: int | None = None  # None: every gradient stays where autograd made it
    gradients_always: bool = False  # a gradient buffer allocated once and kept through forward (Megatron)

    @property
    def model_states_bytes(self) -> int:
        return self.weights + self.master_weights + self.quantization_constants + self.gradients + \
            self.optimizer_state

    def to_dict(self) -> dict[str, int | bool | None]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__} | \
            {"model_states_bytes": self.model_states_bytes}


@dataclass(frozen=True, slots=True)
class StageLoad:
    """One pipeline stage: its share of the model and the peak of one of its GPUs."""

    index: int
    layers: int
    parameters: int  # parameters of the stage before tensor-parallel splitting
    embedding: bool
    head: bool
    in_flight_micro_batches: float
    peak_allocated_bytes: int


@dataclass(frozen=True, slots=True)
class Collective:
    """One kind of communication of a step: bytes each GPU sends, over which link, and the time at peak."""

    group: str  # data, tensor, pipeline, expert
    op: str  # all-reduce, reduce-scatter, all-gather, send/recv, all-to-all
    bytes_per_step: int
    link: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Communication:
    collectives: tuple[Collective, ...]
    bubble_fraction: float  # idle share of a pipeline step: (p - 1) / (v·m + p - 1)

    @property
    def bytes_per_step(self) -> int:
        return sum(c.bytes_per_step for c in self.collectives)

    @property
    def seconds_per_step(self) -> float:
        """All collectives back to back at peak link bandwidth (no overlap with compute, no latency)."""
        return sum(c.seconds for c in self.collectives)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_per_step": self.bytes_per_step, "seconds_per_step": self.seconds_per_step,
                "bubble_fraction": self.bubble_fraction,
                "collectives": [{"group": c.group, "op": c.op, "bytes_per_step": c.bytes_per_step,
                                 "link": c.link, "seconds": c.seconds} for c in self.collectives]}


@dataclass(frozen=True, slots=True)
class ParallelEstimate:
    """Memory of the most loaded GPU of a layout, plus host memory and communication per step.

    ``peak_allocated_bytes`` predicts that GPU's ``torch.cuda.max_memory_allocated()``; ``total_bytes``
    adds allocator slack and the CUDA context as the single-GPU estimate does; ``breakdown`` is taken at
    the peak. ``host_bytes`` is host RAM per node: offloaded states, or loading the model, whichever is
    larger (``host_bytes_per_gpu`` the offloaded part of one GPU's process).
    """

    single: Estimate  # the same workload on one GPU, for reference
    layout: Layout
    peak_allocated_bytes: int
    total_bytes: int
    breakdown: Breakdown
    host_bytes: int
    comm_bytes_per_step: int
    assumptions: tuple[str, ...]
    peak_phase: Phase = Phase.FORWARD
    phases: tuple[PhasePeak, ...] = ()
    states: GPUStates = field(default_factory=lambda: GPUStates(0, 0, 0, 0, 0))
    stage: int = 0
    stages: tuple[StageLoad, ...] = ()
    communication: Communication = field(default_factory=lambda: Communication((), 0.0))
    host_bytes_per_gpu: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def engine(self) -> Engine:
        return self.layout.engine

    @property
    def bubble_fraction(self) -> float:
        return self.communication.bubble_fraction

    def to_dict(self) -> dict[str, Any]:
        """The ``per_gpu`` section of ``vramplan estimate --json``."""
        lay = self.layout
        return {
            "gpus": lay.gpus, "nodes": lay.nodes, "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep,
            "zero": lay.zero, "fsdp": lay.fsdp.value if lay.fsdp else None, "offload": lay.offload.value,
            "micro_batches": lay.micro_batches, "sequence_parallel": lay.sequence_parallel,
            "virtual_stages": lay.virtual_stages, "engine": self.engine.value,
            "peak_allocated_bytes": self.peak_allocated_bytes, "total_bytes": self.total_bytes,
            "peak_phase": self.peak_phase.value, "breakdown": self.breakdown.as_dict(),
            "phases": {p.phase.value: p.peak_allocated_bytes for p in self.phases},
            "host_bytes": self.host_bytes, "host_bytes_per_gpu": self.host_bytes_per_gpu,
            "model_states": self.states.to_dict(), "stage": self.stage,
            "stages": [{"index": s.index, "layers": s.layers, "parameters": s.parameters,
                        "embedding": s.embedding, "head": s.head,
                        "in_flight_micro_batches": s.in_flight_micro_batches,
                        "peak_allocated_bytes": s.peak_allocated_bytes} for s in self.stages],
            "comm_bytes_per_step": self.comm_bytes_per_step, "communication": self.communication.to_dict(),
            "assumptions": list(self.assumptions), "warnings": list(self.warnings),
        }


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


# ---- the model one GPU holds ---------------------------------------------------------------------------
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


def _tp_shard(spec: ModelSpec, tp: int, ep: int) -> ModelSpec:
    """The part of every layer one tensor-parallel rank holds (Megatron: column/row-parallel linears,
    vocab-parallel embedding and head; KV heads replicated when there are fewer than ``tp``, as vLLM does)."""
    if tp == 1 and ep == 1:
        return spec
    return replace(
        spec,
        num_heads=spec.num_heads // tp,
        num_kv_heads=max(1, spec.num_kv_heads // tp),
        intermediate_size=-(-spec.intermediate_size // tp),
        vocab_size=-(-spec.vocab_size // tp),
        moe_intermediate_size=-(-spec.moe_intermediate_size // tp),
        shared_expert_intermediate_size=-(-spec.shared_expert_intermediate_size // tp),
        num_experts=spec.num_experts // ep,
    )


def _stage_spec(spec: ModelSpec, layers: range) -> ModelSpec:
    if len(layers) == spec.num_layers:
        return spec
    return replace(spec, num_layers=len(layers),
                   moe_layers=tuple(i - layers.start for i in spec.moe_layers if i in layers),
                   sliding_layers=tuple(i - layers.start for i in spec.sliding_layers if i in layers))


def _stage_counts(spec: ModelSpec, stage: ModelSpec, embed: bool, head: bool, pp: int) -> ParamCounts:
    """Parameters of a stage: its layers, the embedding on the first, the final norm and head on the last
    (a tied embedding is duplicated on the last stage when it is not also the first)."""
    c = count_params(stage)
    if pp == 1:
        return c
    lm_head = c.lm_head
    if head and not embed and spec.tie_word_embeddings:
        lm_head = stage.vocab_size * (stage.embed_proj_dim or stage.hidden_size)
    return ParamCounts(c.embedding if embed else 0, c.layers, c.final_norm if head else 0, lm_head if head else 0)


def _stage_workload(w: Workload, spec: ModelSpec, layers: range) -> Workload:
    """Freeze: the globally last ``k`` layers train; a stage trains its share of them."""
    if w.method is not Method.FREEZE or len(layers) == spec.num_layers:
        return w
    k = w.trainable_layers if w.trainable_layers is not None else max(1, spec.num_layers // 4)
    first = spec.num_layers - min(k, spec.num_layers)
    return w.with_(trainable_layers=max(0, layers.stop - max(first, layers.start)))


def _compute_workload(w: Workload, engine: Engine) -> Workload:
    """What the GPU computes with. DeepSpeed and Megatron-LM with bf16/fp16 hold a 16-bit module and FSDP's
    MixedPrecisionPolicy gathers 16-bit parameters, so AMP runs as a 16-bit model without autocast."""
    if engine is Engine.DDP or not w.precision.is_amp:
        return w
    return w.with_(precision=Precision.BF16 if w.precision is Precision.AMP_BF16 else Precision.FP16)


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


# ---- per-GPU model states of each engine ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Shard:
    """What one GPU's stage holds, for the engines' formulas."""

    user: ModelStates  # states of the workload as asked (precision as given)
    compute: ModelStates  # states of the workload as the GPU computes it (see _compute_workload)
    fp32: ModelStates  # states with fp32 parameters: DeepSpeed's master copy and optimizer
    root_params: int  # embedding + final norm + head on this stage
    root_trainable: int
    embedding_trainable: int  # part of root_trainable: its gradient comes last in backward
    layer_params: int  # the largest decoder layer
    layer_trainable: int
    largest_module: int  # the largest single module (DeepSpeed ZeRO-3 gathers module by module)
    expert_params: int
    compute_bytes: int  # bytes per gathered (compute-dtype) parameter


def _shard_info(spec: ModelSpec, w: Workload, wc: Workload, counts: ParamCounts) -> _Shard:
    user = model_states(spec, w, counts)
    comp = user if wc is w else model_states(spec, wc, counts)
    fp32 = model_states(spec, w.with_(precision=Precision.FP32), counts) if w.is_train else user
    L = max(1, len(counts.layers))
    root = counts.embedding + counts.final_norm + counts.lm_head
    layer = max((layer.total for layer in counts.layers), default=0)
    # the routed experts' linears (gate, up, down of every expert) of the stage's MoE layers
    expert = len(spec.moe_layers) * sum(fin * fout * n for _, fin, fout, n in mlp_linears(spec, True)[:3]) \
        if spec.is_moe else 0
    full = w.method is Method.FULL
    root_tr = root if full else (counts.final_norm + counts.lm_head if w.method is Method.FREEZE else 0)
    if not w.is_train:
        root_tr = 0
    layer_tr = layer if full and w.is_train else max(0, user.trainable_parameters - root_tr) // L
    elem = 2 if wc.precision is not Precision.FP32 else 4
    embed_tr = counts.embedding if full and w.is_train else 0
    return _Shard(user, comp, fp32, root, root_tr, embed_tr, layer, layer_tr, _largest_module(counts), expert,
                  elem)


def _sharded(nbytes: int, sh: _Shard, n: int, ep: int) -> int:
    """``nbytes`` spread over ``n`` ranks, expert parameters over ``n / ep`` (their data-parallel group)."""
    if n <= 1 or nbytes == 0:
        return nbytes
    total = max(1, sh.user.parameters)
    ne = max(1, n // ep)
    dense = Fraction(total - sh.expert_params, n) + Fraction(sh.expert_params, ne)
    return math.ceil(nbytes * dense / total)


def ddp_states(sh: _Shard, layout: Layout) -> GPUStates:
    """PyTorch DDP (and Megatron-style TP/PP without a distributed optimizer): a full replica of the stage.

    The reducer's buckets hold a flat copy of every gradient (torch/csrc/distributed/c10d/reducer.cpp,
    ``initialize_buckets``; 25 MiB buckets by default) unless ``gradient_as_bucket_view=True`` makes
    the gradients views into them.
    """
    u = sh.user
    buckets = u.gradients if layout.dp > 1 and not layout.ddp_bucket_view else 0
    return GPUStates(u.weights, u.master_weights, u.quant_constants, u.gradients, u.optimizer_state,
                     u.step_temporaries, buffers=buckets)


def megatron_states(sh: _Shard, training: bool) -> GPUStates:
    """Megatron-LM with bf16/fp16 (megatron/core/optimizer/optimizer.py Float16OptimizerWithFloat16Params,
    core/distributed/param_and_grad_buffer.py): a 16-bit module, fp32 ``main_grad`` buffers allocated once
    (``accumulate_allreduce_grads_in_fp32``), fp32 master weights and Adam states: 2 + 4 + 4 + 8 = 18 bytes
    per parameter, as theoretical_memory_usage.py counts. Without AMP the workload's own states."""
    u = sh.user
    if not (training and u.master_weights):
        return GPUStates(u.weights, u.master_weights, u.quant_constants, u.gradients, u.optimizer_state,
                         u.step_temporaries)
    T = u.trainable_parameters
    return GPUStates(sh.compute.weights, 4 * T, sh.compute.quant_constants, 4 * T, sh.fp32.optimizer_state,
                     sh.fp32.step_temporaries, unsharded_gradients=0, gradients_always=True)


def zero_states(sh: _Shard, layout: Layout, spec: ModelSpec, training: bool) -> GPUStates:
    """DeepSpeed ZeRO (Rajbhandari et al. 2019; runtime/zero/stage_1_and_2.py, stage3.py).

    With bf16/fp16 the module holds 16-bit weights and gradients; the optimizer holds fp32 master
    weights and states for its partition (2 + 2 + 12 bytes per trained parameter before sharding). ZeRO-1
    partitions the optimizer, ZeRO-2 also the gradients (16-bit partition, ``grads_in_partition``),
    ZeRO-3 also the parameters, gathering each module's parameters (plus the prefetch bucket) when it
    runs. The optimizer step makes an fp32 copy of the gradient partition (``single_grad_partition`` /
    ``_prepare_fp32_grad_for_sub_group``). Reduce buckets: ``reduce_bucket_size`` elements, doubled
    by ``overlap_comm`` (on by default for ZeRO-3). fp32 training has no master copy.
    """
    z, n, ep = layout.zero, layout.shard_degree, layout.ep
    e = sh.compute_bytes
    mixed = e == 2
    T = sh.user.trainable_parameters if training else 0
    weights, quant = sh.compute.weights, sh.compute.quant_constants
    master = 4 * T if mixed else 0
    grads = e * T
    fp32_grads = 4 * T if mixed else 0
    opt, opt_tmp = sh.fp32.optimizer_state, sh.fp32.step_temporaries
    reduce_bucket, prefetch, _ = zero_auto_buckets(spec.hidden_size)
    if layout.reduce_bucket_size is not None:
        reduce_bucket = layout.reduce_bucket_size
    overlap = layout.overlap_comm if layout.overlap_comm is not None else z == 3
    buckets = 2 if overlap else 1  # overlap_comm double-buffers the reduce bucket
    gathered = transient = 0
    unsharded: int | None = None
    if z == 3:
        weights, quant = _sharded(weights, sh, n, ep), _sharded(quant, sh, n, ep)
        live = min(ZERO3_MAX_LIVE_PARAMETERS, sh.largest_module + prefetch)
        gathered = live * e
        if T:  # a module's gradients wait for the bucket being reduced
            unsharded = sh.largest_module * e
            transient = buckets * reduce_bucket * e
    elif z == 2 and T:
        unsharded = sh.largest_module * e
        transient = buckets * reduce_bucket * e
    grads_kept = grads if z == 1 else _sharded(grads, sh, n, ep)
    master, opt = _sharded(master, sh, n, ep), _sharded(opt, sh, n, ep)
    step_tmp = _sharded(fp32_grads, sh, n, ep) + _sharded(opt_tmp, sh, n, ep)
    offloaded = 0
    if layout.offload is not Offload.NONE and T:
        # offload_optimizer: master, states and the fp32 gradient partition live in host memory; the
        # 16-bit gradient partition is copied out as it is reduced (ZeRO-2/3)
        offloaded += master + opt + step_tmp
        master = opt = step_tmp = 0
        if z >= 2:
            grads_kept = 0
    if layout.offload is Offload.OPTIMIZER_PARAMS:
        offloaded += weights + quant
        weights = quant = 0
    return GPUStates(weights, master, quant, grads_kept, opt, step_tmp, gathered, transient, 0, offloaded,
                     unsharded)


def fsdp_states(sh: _Shard, layout: Layout) -> GPUStates:
    """PyTorch FSDP2 ``fully_shard`` (torch/distributed/fsdp/_fully_shard/).

    Parameters are sharded in their stored dtype (fp32 under AMP, where a ``MixedPrecisionPolicy``
    gathers bf16/fp16 copies); gradients reduce-scatter into sharded gradients of the stored dtype.
    FULL_SHARD keeps the current and the next (prefetched) layer gathered; the root module (embedding,
    final norm, head) stays gathered from forward through backward; SHARD_GRAD_OP keeps every layer
    gathered between forward and backward. In backward a layer's unsharded gradients and the
    reduce-scatter input (in ``reduce_dtype``) exist until the reduce-scatter; the root's gradients wait
    for the end of backward. CPUOffloadPolicy moves sharded parameters, gradients and optimizer steps to
    the host.
    """
    n, ep, e = layout.shard_degree, layout.ep, sh.compute_bytes
    u, c = sh.user, sh.compute
    # bytes of gathered (compute-dtype or quantized) parameters per parameter, from the compute states
    stored = c.weights + c.quant_constants + c.master_weights
    per_param = Fraction(stored, max(1, c.parameters))
    root = math.ceil(sh.root_params * per_param)
    layer = math.ceil(sh.layer_params * per_param)
    layers_gathered = (stored - root) if layout.fsdp is FSDPMode.GRAD_OP else 2 * layer
    gathered = root + max(0, layers_gathered)
    reduce_bytes = 4 if u.master_weights else e  # MixedPrecisionPolicy(reduce_dtype=float32) under AMP
    # the reduce-scatter input (padded flat buffer in reduce_dtype) and output shard of one layer
    transient = sh.layer_trainable * reduce_bytes + -(-sh.layer_trainable // max(1, n)) * reduce_bytes
    # the head's gradients wait for the root's reduce-scatter at the end of backward, next to the layer being
    # reduced, or at the very end next to the embedding's
    head = sh.root_trainable - sh.embedding_trainable
    unsharded = (head + max(sh.layer_trainable, sh.embedding_trainable)) * e
    g = GPUStates(_sharded(u.weights, sh, n, ep), _sharded(u.master_weights, sh, n, ep),
                  _sharded(u.quant_constants, sh, n, ep), _sharded(u.gradients, sh, n, ep),
                  _sharded(u.optimizer_state, sh, n, ep), _sharded(u.step_temporaries, sh, n, ep),
                  gathered, transient, unsharded_gradients=unsharded)
    if layout.offload is Offload.OPTIMIZER_PARAMS:
        off = g.weights + g.master_weights + g.quantization_constants + g.gradients + g.optimizer_state + \
            g.step_temporaries
        g = replace(g, weights=0, master_weights=0, quantization_constants=0, gradients=0, optimizer_state=0,
                    step_temporaries=0, offloaded=off)
    return g


def _engine_states(sh: _Shard, layout: Layout, spec: ModelSpec, training: bool) -> GPUStates:
    if layout.engine is Engine.DEEPSPEED:
        return zero_states(sh, layout, spec, training)
    if layout.engine is Engine.FSDP:
        return fsdp_states(sh, layout)
    if layout.engine is Engine.MEGATRON:
        return megatron_states(sh, training)
    return ddp_states(sh, layout)


# ---- combining activations and states ------------------------------------------------------------------
def _per_gpu(phase: Phase, bd: Breakdown, mom: StageMoments, g: GPUStates, engine: Engine, sp: int,
             extra: Fraction, accumulating: bool) -> dict[MemoryKind, int]:
    """One candidate moment of the single-GPU replay, as one GPU of the layout sees it.

    Activations, logits and KV cache come from the replay (divided by ``sp`` under sequence parallelism,
    plus ``extra`` more micro-batches' worth of what a forward keeps, for pipeline stages); model states
    are the engine's; gradients during backward are the engine's scaled by the share of gradients the
    replay has produced at that moment.
    """
    base = mom.base
    keep = {k: mom.forward_end[k] - base[k] for k in MemoryKind}
    training_pass = phase in (Phase.FORWARD, Phase.BACKWARD)
    out: dict[MemoryKind, int] = {}
    for k in (*_ACT_KINDS, K.WORKSPACE):
        v = Fraction(bd[k], sp if k is not K.WORKSPACE else 1)
        if training_pass and k is not K.WORKSPACE:
            v += extra * Fraction(keep[k], sp)
        out[k] = math.ceil(v)
    # autocast's 16-bit weight copies: made during forward (training), or the inference cache in the base
    inference = phase in (Phase.PREFILL, Phase.DECODE)
    cached = base[K.WEIGHTS] - mom.states.weights - (mom.states.master_weights if inference else 0)
    extra_w = Fraction(max(0, bd[K.WEIGHTS] - base[K.WEIGHTS]) + max(0, cached), sp)
    if training_pass:
        extra_w += extra * Fraction(max(0, keep[K.WEIGHTS]), sp)
    gathered = g.gathered if phase is not Phase.OPTIMIZER_STEP else 0
    out[K.WEIGHTS] = g.weights + gathered + math.ceil(extra_w)
    out[K.MASTER_WEIGHTS] = g.master_weights
    out[K.QUANTIZATION_CONSTANTS] = g.quantization_constants
    grads = 0
    total_grads = mom.states.gradients
    if phase is Phase.OPTIMIZER_STEP:
        grads = g.gradients
    elif phase is Phase.FORWARD:
        grads = g.gradients if accumulating or g.gradients_always else 0
    elif phase is Phase.BACKWARD:
        # gradients autograd has made by this moment (the replay's, in the compute dtype); the part beyond
        # what stays unsharded has been reduced into the engine's (sharded) gradient storage
        made = max(0, bd[K.GRADIENTS] - base[K.GRADIENTS])
        cap = made if g.unsharded_gradients is None else min(made, g.unsharded_gradients)
        reduced = math.ceil(Fraction(made - cap, max(1, total_grads)) * g.gradients)
        if g.unsharded_gradients is None:  # DDP, ZeRO-1: gradients stay whole; scale to the engine's dtype
            cap = math.ceil(Fraction(made, max(1, total_grads)) * g.gradients)
        grads = (g.gradients if accumulating or g.gradients_always else reduced) + cap + \
            (g.gradient_transient if made else 0)
    out[K.GRADIENTS] = grads + g.buffers
    out[K.OPTIMIZER_STATE] = g.optimizer_state + (g.step_temporaries if phase is Phase.OPTIMIZER_STEP else 0)
    out[K.CUDA_CONTEXT] = out[K.ALLOCATOR_SLACK] = 0
    return out


@dataclass(frozen=True, slots=True)
class _StagePeak:
    index: int
    phases: tuple[PhasePeak, ...]
    states: GPUStates
    load: StageLoad
    host: int

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases, key=lambda p: p.peak_allocated_bytes)


def _stage_peak(spec: ModelSpec, w: Workload, layout: Layout, index: int, layers: range) -> _StagePeak:
    engine = layout.engine
    pp = layout.pp
    embed, head = index == 0, index == pp - 1
    wc = _compute_workload(w, engine)
    shard = _tp_shard(spec, layout.tp, layout.ep)
    st_spec = _stage_spec(shard, layers)
    counts = _stage_counts(shard, st_spec, embed, head, pp)
    ws, wcs = _stage_workload(w, spec, layers), _stage_workload(wc, spec, layers)
    sh = _shard_info(st_spec, ws, wcs, counts)
    g = _engine_states(sh, layout, spec, w.is_train)
    sp = layout.tp if layout.sequence_parallel else 1
    if sp > 1:  # activations of the unsplit stage, then divided by tp (Korthikanti et al. 2022, Table 2)
        full_stage = _stage_spec(_tp_shard(spec, 1, layout.ep), layers)
        mom = stage_moments(full_stage, wcs, _stage_counts(spec, full_stage, embed, head, pp), embed=embed,
                            head=head)
    else:
        mom = stage_moments(st_spec, wcs, counts, embed=embed, head=head)
    k = in_flight_micro_batches(index, pp, layout.micro_batches, layout.virtual_stages) if w.is_train \
        else Fraction(1)
    accumulating = w.gradient_accumulation > 1
    identity = engine is Engine.DDP and sp == 1 and k == 1
    best: dict[Phase, dict[MemoryKind, int]] = {}
    for phase, bd in mom.moments:
        if identity:  # a replica: the replay's own moment plus the reducer's buckets
            v = {kk: bd[kk] for kk in MemoryKind}
            v[K.GRADIENTS] += g.buffers
        else:
            v = _per_gpu(phase, bd, mom, g, engine, sp, k - 1, accumulating)
        if phase not in best or sum(v.values()) > sum(best[phase].values()):
            best[phase] = v
    phases = tuple(PhasePeak(ph, sum(v.values()), Breakdown.of(v)) for ph, v in best.items())
    load = StageLoad(index, len(layers), _stage_parameters(spec, layers, embed, head, pp), embed, head,
                     float(k), max(p.peak_allocated_bytes for p in phases))
    return _StagePeak(index, phases, g, load, g.offloaded)


def _stage_parameters(spec: ModelSpec, layers: range, embed: bool, head: bool, pp: int) -> int:
    """Parameters a pipeline stage holds before tensor-parallel splitting (a tied embedding counts on both
    the first and the last stage)."""
    return _stage_counts(spec, _stage_spec(spec, layers), embed, head, pp).total


# ---- host memory -----------------------------------------------------------------------------------------
def _host_bytes(spec: ModelSpec, w: Workload, layout: Layout, per_gpu_offloaded: int) -> int:
    """Host RAM per node: what the GPUs of a node offload, or what loading the model takes, whichever is
    larger. Loading follows DeepSpeed's estimators (estimate_zero2/3_model_states_mem_needs): every
    process materializes the model in fp32, except under ZeRO-3's ``zero.Init`` (one module at a time)
    and FSDP's ``cpu_ram_efficient_loading`` (local rank 0 only)."""
    counts = count_params(spec)
    per_node = layout.gpus_per_node
    if not w.is_train:
        # serving engines (vLLM, transformers with device_map) stream each shard's tensors from memory-mapped
        # safetensors straight to its GPU: no process holds the model in host RAM
        return per_gpu_offloaded * per_node
    # DeepSpeed's estimators assume fp32 loading; otherwise the model loads in its stored dtype
    elem = 4 if layout.engine is Engine.DEEPSPEED else w.precision.param_bytes
    if layout.engine is Engine.DEEPSPEED and layout.zero == 3:
        load = elem * _largest_module(counts) * per_node
    elif layout.engine is Engine.FSDP:
        load = elem * counts.total
    else:
        load = elem * counts.total * per_node
    return max(per_gpu_offloaded * per_node, load)


def _largest_module(counts: ParamCounts) -> int:
    """Parameters of the largest single module (DeepSpeed's ``model_to_params``: a module's own params;
    a fused expert module holds every expert of its layer)."""
    modules = [counts.embedding, counts.lm_head]
    for lp in counts.layers[:1] + counts.layers[-1:]:
        modules += [fin * fout * n for _, fin, fout, n in lp.linear_shapes]
    return max(modules)


# ---- communication -----------------------------------------------------------------------------------------
def _ring(op: str, nbytes: int, n: int) -> int:
    """Bytes one GPU sends in a ring collective of ``nbytes`` over ``n`` ranks (NCCL's algorithms:
    all-reduce 2(n−1)/n·B; reduce-scatter and all-gather (n−1)/n·B)."""
    if n <= 1:
        return 0
    factor = Fraction(2 * (n - 1), n) if op == "all-reduce" else Fraction(n - 1, n)
    return math.ceil(nbytes * factor)


def _communication(spec: ModelSpec, w: Workload, layout: Layout, links: Links, stage_layers_n: int,
                   sh_params: int, sh_trainable: int, grad_bytes: int) -> Communication:
    """Bytes each GPU sends per optimizer step, by collective, and their time at peak link bandwidth.

    Groups are laid out as Megatron does (tensor-parallel ranks adjacent, then data-parallel, then
    pipeline): a group stays inside a node when its span fits ``gpus_per_node``.
    """
    intra, inter = get_link(links.intra_node), get_link(links.inter_node)
    gpn = layout.gpus_per_node
    tp, pp, dp, ep = layout.tp, layout.pp, layout.dp, layout.ep
    wc = _compute_workload(w, layout.engine)
    act = 2 if wc.precision is not Precision.FP32 else 4
    e = act
    m = max(layout.micro_batches, w.gradient_accumulation) if w.is_train else 1
    tokens = w.batch_size * w.seq_len
    hidden_bytes = tokens * spec.hidden_size * act

    def link(span: int) -> Link:
        return intra if span <= gpn else inter

    out: list[Collective] = []

    def add(group: str, op: str, nbytes: int, span: int) -> None:
        if nbytes <= 0:
            return
        lk = link(span)
        out.append(Collective(group, op, nbytes, lk.name, nbytes / lk.bandwidth_per_direction_bytes_per_s))

    # data parallel
    dp_span = tp * dp
    if w.is_train and dp > 1:
        gbytes = grad_bytes
        pbytes = sh_params * e
        eng, z = layout.engine, layout.zero
        if eng in (Engine.DDP, Engine.MEGATRON):
            add("data", "all-reduce", _ring("all-reduce", gbytes, dp), dp_span)
        elif eng is Engine.DEEPSPEED and z in (1, 2):
            reps = 1 if z == 1 else m
            add("data", "reduce-scatter", reps * _ring("reduce-scatter", gbytes, dp), dp_span)
            add("data", "all-gather", _ring("all-gather", sh_trainable * e, dp), dp_span)
        else:
            n = layout.shard_degree
            span = tp * n
            gathers = 1 if layout.fsdp is FSDPMode.GRAD_OP else 2  # forward, and again in backward
            add("data", "all-gather", m * gathers * _ring("all-gather", pbytes, n), span)
            add("data", "reduce-scatter", m * _ring("reduce-scatter", gbytes, n), span)
            if layout.fsdp is FSDPMode.HYBRID and layout.nodes > 1:
                add("data", "all-reduce", _ring("all-reduce", gbytes // max(1, n), layout.nodes), layout.gpus)
    elif not w.is_train and (layout.zero == 3 or layout.fsdp is not None) and dp > 1:
        add("data", "all-gather", _ring("all-gather", sh_params * e, layout.shard_degree), tp * dp)
    # tensor parallel: two all-reduces per layer forward (attention and MLP outputs), two backward, and two
    # more for a recomputed forward (Megatron-LM; sequence parallelism swaps each for a reduce-scatter and an
    # all-gather of the same volume)
    if tp > 1:
        per_layer = 2 if not w.is_train else (6 if w.gradient_checkpointing else 4)
        new_tokens = w.new_tokens if not w.is_train else 0
        tp_bytes = per_layer * stage_layers_n * _ring("all-reduce", hidden_bytes, tp) * m
        if new_tokens:
            tp_bytes += 2 * stage_layers_n * new_tokens * _ring("all-reduce", w.batch_size * spec.hidden_size
                                                                * act, tp)
        add("tensor", "all-reduce" if not layout.sequence_parallel else "reduce-scatter+all-gather", tp_bytes, tp)
    # pipeline: each micro-batch's activations forward and their gradient backward, per stage boundary
    if pp > 1:
        per_mb = hidden_bytes * (2 if w.is_train else 1)
        if not w.is_train and w.new_tokens:
            per_mb += w.new_tokens * w.batch_size * spec.hidden_size * act
        add("pipeline", "send/recv", m * per_mb, layout.gpus)
    # expert parallel: dispatch and combine all-to-alls per MoE layer, forward and backward
    if ep > 1 and spec.is_moe:
        moe_layers = round(len(spec.moe_layers) * stage_layers_n / max(1, spec.num_layers))
        routed = tokens * spec.experts_per_token * spec.hidden_size * act
        passes = 4 if w.is_train else 2
        add("expert", "all-to-all", m * passes * moe_layers * math.ceil(routed * Fraction(ep - 1, ep)),
            tp * ep)
    return Communication(tuple(out), pipeline_bubble(pp, m, layout.virtual_stages) if w.is_train else 0.0)


def _reduced_gradient_bytes(w: Workload, layout: Layout, states: ModelStates) -> int:
    """Gradient bytes the data-parallel group reduces: DDP in the gradients' dtype; DeepSpeed in 16-bit;
    FSDP in ``reduce_dtype`` (fp32 under AMP)."""
    if not w.is_train:
        return 0
    T = states.trainable_parameters
    if layout.engine is Engine.DEEPSPEED:
        return T * (4 if w.precision is Precision.FP32 else 2)
    return states.gradients


# ---- the entry point -----------------------------------------------------------------------------------------
def estimate_parallel(spec: ModelSpec, workload: Workload, layout: Layout,
                      links: Links | None = None) -> ParallelEstimate:
    """Per-GPU memory of ``workload`` under ``layout``: the most loaded GPU, host memory, communication.

    ``workload.batch_size`` is the micro-batch of one data-parallel rank. ``links`` picks the interconnects
    for the communication times (default NVLink 4 inside a node, InfiniBand NDR between nodes).
    """
    check_layout(spec, workload, layout)
    single = estimate(spec, workload)
    if workload.is_train and layout.micro_batches > workload.gradient_accumulation:
        # every micro-batch of a step after the first runs with the gradients of the earlier ones allocated
        workload = workload.with_(gradient_accumulation=layout.micro_batches)
    links = links or Links()
    stages = stage_layers(spec.num_layers, layout.pp)
    # stages with the same shape hold the same memory: compute each shape once, keep the first index
    # stages that hold the same layers, ends and micro-batches in flight hold the same memory: compute once
    seen: dict[tuple[object, ...], _StagePeak] = {}
    results: list[_StagePeak] = []
    for i, layers in enumerate(stages):
        first, last = i == 0, i == layout.pp - 1
        key = (_stage_spec(spec, layers), first, last, _stage_workload(workload, spec, layers),
               in_flight_micro_batches(i, layout.pp, layout.micro_batches, layout.virtual_stages))
        if key not in seen:
            seen[key] = _stage_peak(spec, workload, layout, i, layers)
        sp = seen[key]
        results.append(sp if sp.index == i else replace(sp, index=i, load=replace(
            sp.load, index=i, parameters=_stage_parameters(spec, layers, first, last, layout.pp))))
    top = max(results, key=lambda r: r.peak.peak_allocated_bytes)
    peak_phase = top.peak
    peak = peak_phase.peak_allocated_bytes
    if layout.is_single and peak == single.peak_allocated_bytes:
        slack = single.peak_reserved_bytes - peak  # one GPU: the single-GPU allocator replay
    else:  # per-GPU allocation streams (and NCCL/FSDP buffers) are not modelled yet: the calibration median
        slack = int(peak * ALLOCATOR_SLACK_FRACTION)
    kinds = {k: peak_phase.breakdown[k] for k in MemoryKind}
    kinds[K.CUDA_CONTEXT] = CUDA_CONTEXT_BYTES
    kinds[K.ALLOCATOR_SLACK] = slack
    host = _host_bytes(spec, workload, layout, max(r.host for r in results))
    shard = _tp_shard(spec, layout.tp, layout.ep)
    top_layers = stages[top.index]
    st_counts = _stage_counts(shard, _stage_spec(shard, top_layers), top.index == 0, top.index == layout.pp - 1,
                              layout.pp)
    st_states = model_states(_stage_spec(shard, top_layers), _stage_workload(workload, spec, top_layers), st_counts)
    trainable = st_states.trainable_parameters if workload.is_train else 0
    comm = _communication(spec, workload, layout, links, len(top_layers), st_counts.total, trainable,
                          _reduced_gradient_bytes(workload, layout, st_states))
    return ParallelEstimate(
        single=single, layout=layout, peak_allocated_bytes=peak, total_bytes=peak + slack + CUDA_CONTEXT_BYTES,
        breakdown=Breakdown.of(kinds), host_bytes=host, comm_bytes_per_step=comm.bytes_per_step,
        assumptions=_assumptions(spec, workload, layout, links), peak_phase=peak_phase.phase,
        phases=top.phases, states=top.states, stage=top.index, stages=tuple(r.load for r in results),
        communication=comm, host_bytes_per_gpu=top.host, warnings=_warnings(spec, workload, layout),
    )


def _assumptions(spec: ModelSpec, w: Workload, layout: Layout, links: Links) -> tuple[str, ...]:
    eng = layout.engine
    out = [f"{layout.gpus} GPU(s) on {layout.nodes} node(s): dp {layout.dp} x tp {layout.tp} x pp {layout.pp}"
           + (f", ep {layout.ep}" if layout.ep > 1 else "") + "; the most loaded GPU is reported",
           f"batch size {w.batch_size} is the micro-batch of one data-parallel rank"]
    if eng is Engine.DDP:
        if layout.dp > 1:
            out.append("PyTorch DDP: full replica; the reducer's gradient buckets hold a second copy of the "
                       "gradients" if not layout.ddp_bucket_view else
                       "PyTorch DDP with gradient_as_bucket_view: gradients live in the buckets")
        else:
            out.append("no data-parallel replication")
    elif eng is Engine.MEGATRON:
        out.append("Megatron-LM layout: 16-bit module, fp32 main gradients, fp32 master weights and Adam "
                   "states (18 bytes per parameter)" if w.precision.is_amp else
                   "Megatron-LM layout with the workload's own precision")
    elif eng is Engine.DEEPSPEED:
        out.append(f"DeepSpeed ZeRO-{layout.zero}: 16-bit weights and gradients, fp32 master weights and "
                   "optimizer states in the optimizer, sharded over "
                   f"{layout.shard_degree} ranks; bucket sizes as transformers fills 'auto' (hidden²)"
                   if w.precision is not Precision.FP32 else
                   f"DeepSpeed ZeRO-{layout.zero} in fp32: no master copy")
        if w.precision.is_amp or w.precision in (Precision.BF16, Precision.FP16):
            out.append("DeepSpeed bf16/fp16: the module runs in 16-bit (no autocast)")
    else:
        mode = layout.fsdp.value if layout.fsdp else "full"
        out.append(f"PyTorch FSDP2 ({mode}), sharded over {layout.shard_degree} ranks; current and next layer "
                   "gathered, root module (embedding, head) gathered through forward and backward")
        if w.precision.is_amp:
            out.append("FSDP MixedPrecisionPolicy: fp32 sharded parameters, 16-bit gathered copies, fp32 "
                       "gradient reduction")
    if layout.tp > 1:
        out.append(f"tensor parallel {layout.tp} (Megatron): heads, MLP columns and vocabulary split; "
                   + ("sequence parallel: every activation split" if layout.sequence_parallel else
                      "norm, residual and dropout activations replicated"))
    if layout.pp > 1:
        sched = "1F1B" if layout.virtual_stages == 1 else f"interleaved 1F1B ({layout.virtual_stages} chunks)"
        out.append(f"pipeline parallel {layout.pp}, {sched}, {layout.micro_batches} micro-batches per step; "
                   "embedding on the first stage, head on the last")
    if layout.offload is not Offload.NONE:
        out.append(f"offload {layout.offload.value} to host memory (host bytes per node)")
    out.append(f"communication over {links.intra_node} inside a node and {links.inter_node} between nodes, "
               "at peak bandwidth without overlap")
    out.append("NCCL buffers (outside PyTorch's caching allocator) not counted")
    return tuple(out)


def _warnings(spec: ModelSpec, w: Workload, layout: Layout) -> tuple[str, ...]:
    out = []
    if w.is_train and layout.pp > 1 and layout.micro_batches < layout.pp:
        out.append(f"{layout.micro_batches} micro-batches for {layout.pp} pipeline stages: most of the step is "
                   "bubble; use --micro-batches >= pp")
    if layout.pp > 1 and layout.virtual_stages > 1 and layout.micro_batches % layout.pp:
        out.append("Megatron's interleaved schedule needs micro-batches to be a multiple of pp")
    if layout.fsdp is FSDPMode.HYBRID and layout.nodes == 1:
        out.append("--fsdp hybrid on one node is the same as full sharding")
    if w.is_train and layout.zero and w.optimizer.value == "adamw-8bit":
        out.append("DeepSpeed keeps fp32 optimizer states for its partition; 8-bit optimizers are not "
                   "what it runs by default")
    return tuple(out)
