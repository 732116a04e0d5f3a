"""The entry point: memory of the most loaded GPU of a layout, host memory, communication."""


from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from .._engine.step import ALLOCATOR_SLACK_FRACTION, CUDA_CONTEXT_BYTES
from ..estimator import StageMoments, built_as, estimate, reserved_stats, stage_moments
from ..estimator import replays as spec_replays
from ..kinds import MemoryKind, Phase
from ..memory import model_states
from ..result import Breakdown, Estimate, PhasePeak
from ..spec import ModelSpec
from ..workload import Precision, Workload
from .comm import Communication, Links, _communication, _reduced_gradient_bytes
from .engines import GPUStates, _engine_states, _host_bytes, _shard_info
from .layout import Engine, FSDPMode, Layout, Offload, check_layout, in_flight_micro_batches, stage_layers
from .nccl import NcclConfig, NcclMemory, nccl_memory, nccl_note
from .sharding import _compute_workload, _stage_counts, _stage_spec, _stage_workload, _tp_shard
from .streams import RankReplay, rank_replay, replays

K = MemoryKind
_ACT_KINDS = (K.ACTIVATIONS, K.LOGITS_LOSS, K.KV_CACHE)


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
class ParallelEstimate:
    """Memory of the most loaded GPU of a layout, plus host memory and communication per step.

    ``peak_allocated_bytes`` predicts that GPU's ``torch.cuda.max_memory_allocated()``; ``total_bytes``
    adds allocator slack and the CUDA context as the single-GPU estimate does, and NCCL's communicator buffers
    (``nccl``, outside the caching allocator); ``breakdown`` is taken at the peak. ``host_bytes`` is host RAM
    per node: offloaded states, or loading the model, whichever is larger (``host_bytes_per_gpu`` the
    offloaded part of one GPU's process).
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
    nccl: NcclMemory | None = None
    replay: RankReplay | None = None  # the rank's own allocation stream, where it is modelled (FSDP, ZeRO)

    @property
    def nccl_bytes(self) -> int:
        return self.nccl.total_bytes if self.nccl is not None else 0

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
            "nccl_bytes": self.nccl_bytes, "nccl": self.nccl.to_dict() if self.nccl is not None else None,
            "peak_reserved_bytes": self.peak_allocated_bytes + self.breakdown[K.ALLOCATOR_SLACK],
            "replay": None if self.replay is None else {
                "engine": self.replay.engine, "peak_allocated_bytes": self.replay.peak_allocated_bytes,
                "peak_reserved_bytes": self.replay.peak_reserved_bytes,
                "reserved_by_stream": dict(zip(("compute", "all_gather_copy_in", "reduce_scatter"),
                                               self.replay.reserved_by_stream, strict=False))},
        }


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


# ---- the entry point -----------------------------------------------------------------------------------------
def estimate_parallel(spec: ModelSpec, workload: Workload, layout: Layout,
                      links: Links | None = None, *, reserved: bool = True,
                      nccl_config: NcclConfig | None = None) -> ParallelEstimate:
    """Per-GPU memory of ``workload`` under ``layout``: the most loaded GPU, host memory, communication.

    ``workload.batch_size`` is the micro-batch of one data-parallel rank. ``links`` picks the interconnects
    for the communication times (default NVLink 4 inside a node, InfiniBand NDR between nodes).
    ``reserved=False``: the single-GPU reference without the allocator replay (searches). ``nccl_config``: NCCL's
    settings (``NCCL_BUFFSIZE``, ``NCCL_MAX_NCHANNELS``, ``NCCL_NVLS_ENABLE``, …) for its buffers.
    """
    spec = built_as(spec, workload)  # as the single-GPU estimate builds it (hub kernels, release-dependent builds)
    check_layout(spec, workload, layout)
    # a sharded rank replays its own stream: the single-GPU reference then needs no allocator replay of its own
    rank_stream = reserved and spec_replays(spec) and not layout.is_single and replays(layout, workload)
    single = estimate(spec, workload, reserved=reserved and not rank_stream)
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
    replayed = ""
    rank: RankReplay | None = None
    if layout.is_single and peak == single.peak_allocated_bytes and single.peak_reserved_bytes:
        slack = single.peak_reserved_bytes - peak  # one GPU: the single-GPU allocator replay
        replayed = "one GPU"
    elif reserved and single.peak_reserved_bytes and _ddp_replica(layout, workload):
        # a DDP rank runs the single-GPU stream plus the reducer's buckets: replay that
        stats = reserved_stats(spec, workload, ddp=True)
        slack = max(0, stats.peak_reserved_bytes - peak)
        replayed = "DDP"
    elif rank_stream:
        # a sharded rank: the single-GPU programs with the engine's gathers, reductions and shards around them
        rank = rank_replay(spec, workload, _compute_workload(workload, layout.engine), layout)
        slack = max(0, rank.peak_reserved_bytes - peak)
        replayed = layout.engine.value
    else:  # per-GPU allocation streams of ZeRO, FSDP, TP and PP are not modelled: the calibration median
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
    # NCCL's communicator buffers: device memory outside the caching allocator, on top of what it reserves
    nccl = nccl_memory(layout, workload, spec, intra_node=links.intra_node, inter_node=links.inter_node,
                       stage=top.index, config=nccl_config)
    kinds[K.NCCL_BUFFERS] = nccl.total_bytes
    return ParallelEstimate(
        single=single, layout=layout, peak_allocated_bytes=peak,
        total_bytes=peak + slack + CUDA_CONTEXT_BYTES + nccl.total_bytes,
        breakdown=Breakdown.of(kinds), host_bytes=host, comm_bytes_per_step=comm.bytes_per_step,
        assumptions=(*_assumptions(spec, workload, layout, links), nccl_note(nccl, nccl_config),
                     _reserved_note(replayed)),
        peak_phase=peak_phase.phase,
        phases=top.phases, states=top.states, stage=top.index, stages=tuple(r.load for r in results),
        communication=comm, host_bytes_per_gpu=top.host, warnings=_warnings(spec, workload, layout), nccl=nccl,
        replay=rank,
    )


def _ddp_replica(layout: Layout, w: Workload) -> bool:
    """A rank of plain DDP training with default buckets: the single-GPU program plus the reducer's buckets."""
    return (layout.engine is Engine.DDP and layout.dp > 1 and layout.tp == 1 and layout.pp == 1 and
            layout.ep == 1 and not layout.ddp_bucket_view and layout.offload is Offload.NONE and w.is_train and
            layout.micro_batches <= max(1, w.gradient_accumulation))


def _reserved_note(replayed: str) -> str:
    if replayed == "DDP":
        return ("reserved: the rank's allocation stream replayed through the caching-allocator model (the single-GPU "
                "stream, DDP's construction broadcast in 250 MiB buckets, one gradient bucket in the first "
                "iteration, rebuilt into 25 MiB buckets in the second; torch/nn/parallel/distributed.py, "
                "c10d/reducer.cpp)")
    if replayed == Engine.FSDP.value:
        return ("reserved: the rank's allocation stream replayed through the caching-allocator model: the single-GPU "
                "programs inside FSDP2's all-gathers (copy-in stream), unsharded parameters, reduce-scatters "
                "(reduce-scatter stream) and shards, each stream a pool of its own (torch/distributed/fsdp/"
                "_fully_shard/_fsdp_param_group.py, _fsdp_collectives.py)")
    if replayed == Engine.DEEPSPEED.value:
        return ("reserved: the rank's allocation stream replayed through the caching-allocator model: the single-GPU "
                "programs with DeepSpeed ZeRO's buffers (stage 1/2: flat 16-bit parameters built beside the module's "
                "own, fp32 master partition, reduce buckets, contiguous gradient partition, fp32 gradient partition "
                "in the step, deepspeed/runtime/zero/stage_1_and_2.py; stage 3: partitions, module-by-module gathers "
                "on the all-gather stream with the prefetch bucket and the reuse distance, reduce bucket, flat "
                "gradient partition, per-sub-group fp32 gradients, stage3.py and partitioned_param_coordinator.py)")
    if replayed == Engine.MEGATRON.value:
        return ("reserved: the rank's allocation stream replayed through the caching-allocator model: the single-GPU "
                "programs of the rank's tensor-parallel shard of every layer, with Megatron-LM's contiguous fp32 "
                "main_grad buffer and fp32 master copies under AMP (megatron/core/distributed/"
                "param_and_grad_buffer.py, megatron/core/optimizer/optimizer.py)")
    if replayed:
        return "reserved: the allocation stream replayed through the caching-allocator model"
    return (f"reserved: allocated peak + {ALLOCATOR_SLACK_FRACTION:.0%} (the calibration median; this layout's "
            "per-GPU allocation stream is not modelled)")


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
    if w.load != "config" and not _ddp_replica(layout, w):
        out.append(f"--load {w.load} is modelled on one GPU and DDP replicas; this layout's ranks build their "
                   "shards as their engine does")
    return tuple(out)
