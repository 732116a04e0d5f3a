"""The cheapest (or fastest) way to run a job: search methods, precisions, optimizers, checkpointing,
micro-batch x accumulation, GPU type, GPU count and layout; keep what fits; rank by cost or time.

Every candidate's memory comes from the estimator (one GPU) or :func:`vramplan.parallel.estimate_parallel`
(several), its time and money from :mod:`vramplan.perf`. Nothing is estimated twice: a workload and a
layout are evaluated once and compared with every GPU of the pool (the GPU type does not change the
bytes), and micro-batches are tried smallest first, stopping once no GPU of the pool could hold the next
(memory never falls as the batch grows).

The summary follows the question people ask: the *minimum consumer setup* (fewest, then smallest
consumer GPUs that fit, with the highest-fidelity method they allow) and the *recommended data-centre
setup* (the highest-fidelity method any data-centre plan allows, then the best by cost or time), or
``None`` with the reason.

Known limits: one node (up to 8 GPUs); layouts the parallel estimator does not support are skipped (and
counted); communication is not overlapped with compute; prices are the catalog's indicative ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import WorkloadError
from .estimator import estimate
from .hardware import GPU, list_gpus
from .parallel import FSDPMode, Layout, estimate_parallel
from .params import count_params
from .perf import (
    EngineProfile,
    StepWork,
    ThroughputModel,
    allreduce_seconds,
    decode_seconds,
    decode_work,
    engine_overhead_s,
    engine_profile,
    inference_work,
    link_bandwidth_bytes_per_s,
    load_throughput_model,
    ring_allreduce_bytes,
    step_time,
    training_work,
)
from .spec import ModelSpec
from .units import GiB
from .workload import Attention, Method, Optimizer, Precision, Task, WeightsQuant, Workload

__all__ = ["VISION_NO_TIME", "Plan", "PlanRequest", "PlanResult", "PlanTask", "SortKey", "plan", "plan_vision"]

_SECONDS_PER_HOUR = 3600.0
GPU_COUNTS = (1, 2, 4, 8)
CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal ~20 tokens per parameter
DEFAULT_FINETUNE_TOKENS = 100_000_000
DEFAULT_GENERATED_TOKENS = 1_000_000
DEFAULT_GLOBAL_BATCH = {"train": 256, "finetune": 32}
MAX_MICRO_BATCH = 64
# Micro-batches of more tokens than this are not tried: the fitted step-time model is then within a few
# per cent of compute-bound (launch overhead is per micro-batch), so they only add memory.
MAX_MICRO_BATCH_TOKENS = 16384
INFER_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Fidelity: lower is closer to the full-precision result (the recommendation prefers it).
_METHOD_RANK = {Method.FULL: 0, Method.LORA: 1, Method.QLORA: 2, Method.FREEZE: 3}
_QUANT_RANK = {WeightsQuant.NONE: 0, WeightsQuant.FP8: 1, WeightsQuant.INT8: 2, WeightsQuant.NF4: 3}


class PlanTask(StrEnum):
    TRAIN = "train"  # pre-training from scratch: every weight trains
    FINETUNE = "finetune"  # full, LoRA, QLoRA or freeze
    INFER = "infer"  # serving: generate tokens


class SortKey(StrEnum):
    COST = "cost"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What to plan. Empty restriction tuples mean "search all"."""

    task: PlanTask = PlanTask.FINETUNE
    seq_len: int = 2048
    new_tokens: int = 256
    tokens: int | None = None  # tokens to train on, or to generate (infer)
    epochs: float | None = None
    dataset_tokens: int | None = None
    global_batch: int | None = None  # sequences per optimizer step
    max_gpus: int = 8
    gpu_class: str = "any"
    sort: SortKey = SortKey.COST
    budget_usd: float | None = None
    methods: tuple[Method, ...] = ()
    precisions: tuple[Precision, ...] = ()
    optimizers: tuple[Optimizer, ...] = ()
    weights_quants: tuple[WeightsQuant, ...] = ()
    gradient_checkpointing: bool | None = None
    micro_batches: tuple[int, ...] = ()
    attention: Attention = Attention.SDPA
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: try peft's default and all-linear
    top: int = 20
    engine: str = "transformers"  # infer: the serving engine whose decode speed ranks the plans

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_gpus", "top", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("tokens", "dataset_tokens", "global_batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.new_tokens < 0:
            raise WorkloadError(f"new-tokens must not be negative, got {self.new_tokens}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise WorkloadError(f"epochs must be a positive number, got {self.epochs!r}")
        if (self.epochs is None) != (self.dataset_tokens is None):
            raise WorkloadError("give --epochs together with --dataset-tokens (or --tokens alone)")
        if self.tokens is not None and self.epochs is not None:
            raise WorkloadError("give either --tokens or --epochs with --dataset-tokens, not both")
        if self.budget_usd is not None and not (self.budget_usd >= 0 and math.isfinite(self.budget_usd)):
            raise WorkloadError(f"budget must be a non-negative number of dollars, got {self.budget_usd!r}")
        if self.gpu_class not in ("any", "consumer", "workstation", "datacenter"):
            raise WorkloadError(f"gpu class {self.gpu_class!r} is not one of: any, consumer, workstation, datacenter")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.micro_batches):
            raise WorkloadError("micro-batch sizes must be positive integers")
        if self.task is PlanTask.TRAIN and self.methods and set(self.methods) != {Method.FULL}:
            raise WorkloadError("--task train trains every weight (method full); use --task finetune for "
                                "LoRA, QLoRA or freeze")


@dataclass(frozen=True, slots=True)
class Plan:
    """One configuration that fits, with its per-GPU memory, time and money."""

    gpu: str
    gpu_display_name: str
    gpu_class: str
    gpu_count: int
    layout: str  # "single", "ddp", "zero2", "fsdp", "tp", "replicas"
    method: str  # full / lora / qlora / freeze, or "inference"
    precision: str
    optimizer: str | None
    weights_quant: str
    gradient_checkpointing: bool
    micro_batch: int  # sequences per GPU per forward (concurrent requests, for inference)
    gradient_accumulation: int
    global_batch: int  # sequences per optimizer step (0 for inference)
    seq_len: int
    peak_allocated_bytes: int  # per GPU (the most loaded one)
    total_bytes: int
    usable_memory_bytes: int
    time_hours: float | None
    gpu_hours: float | None
    cost_usd: float | None  # on demand
    cost_reserved_usd: float | None
    cost_reason: str | None
    tokens_per_s: float | None
    mfu: float | None
    resolution: int | None = None  # image models: pixels per side (seq_len is then 0)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_memory_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_memory_bytes - self.total_bytes

    def describe(self) -> str:
        """One line: '2x NVIDIA H100 SXM (fsdp): lora, bf16, adamw, micro-batch 4 x 2, checkpointing'."""
        hw = f"{self.gpu_count}x {self.gpu_display_name}" + (f" ({self.layout})" if self.gpu_count > 1 else "")
        parts = [self.method, self.precision]
        if self.weights_quant != "none":
            parts.append(f"{self.weights_quant} weights")
        if self.optimizer:
            parts.append(self.optimizer)
        if self.resolution is not None:
            parts.append(f"{self.micro_batch} image{'s' if self.micro_batch != 1 else ''} of {self.resolution} px"
                         + ("" if self.method == "inference" else f" x {self.gradient_accumulation} accumulation"))
        elif self.method == "inference":
            parts.append(f"{self.micro_batch} concurrent sequences")
        else:
            parts.append(f"micro-batch {self.micro_batch} x {self.gradient_accumulation} accumulation")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        return f"{hw}: {', '.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "gpu_display_name": self.gpu_display_name, "gpu_class": self.gpu_class,
                "gpu_count": self.gpu_count, "layout": self.layout, "method": self.method,
                "precision": self.precision, "optimizer": self.optimizer, "weights_quant": self.weights_quant,
                "gradient_checkpointing": self.gradient_checkpointing, "micro_batch": self.micro_batch,
                "gradient_accumulation": self.gradient_accumulation, "global_batch": self.global_batch,
                "seq_len": self.seq_len, "peak_allocated_bytes": self.peak_allocated_bytes,
                "total_bytes": self.total_bytes, "usable_memory_bytes": self.usable_memory_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "time_hours": self.time_hours,
                "gpu_hours": self.gpu_hours, "cost_usd": self.cost_usd, "cost_reserved_usd": self.cost_reserved_usd,
                "cost_reason": self.cost_reason, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "summary": self.describe()} | ({"resolution": self.resolution} if self.resolution is not None else {})


@dataclass(frozen=True, slots=True)
class PlanResult:
    model: str
    parameters: int
    task: str
    tokens: int
    seq_len: int
    global_batch: int
    sort: str
    candidates_evaluated: int
    feasible: int
    layouts_unsupported: int
    elapsed_s: float
    plans: tuple[Plan, ...]  # ranked, the best per GPU type, count, layout, method and weight format
    consumer: Plan | None
    consumer_reason: str | None
    datacenter: Plan | None
    datacenter_reason: str | None
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    resolution: int | None = None  # image models: pixels per side (tokens and seq_len are then 0)

    def to_dict(self) -> dict[str, Any]:
        extra = {"resolution": self.resolution} if self.resolution is not None else {}
        return {"model": self.model, "parameters": self.parameters, "task": self.task, "tokens": self.tokens,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "sort": self.sort,
                "candidates_evaluated": self.candidates_evaluated, "feasible": self.feasible,
                "layouts_unsupported": self.layouts_unsupported, "elapsed_s": self.elapsed_s,
                "plans": [p.to_dict() for p in self.plans],
                "recommendation": {
                    "consumer": self.consumer.to_dict() if self.consumer else None,
                    "consumer_reason": self.consumer_reason,
                    "datacenter": self.datacenter.to_dict() if self.datacenter else None,
                    "datacenter_reason": self.datacenter_reason,
                },
                "assumptions": list(self.assumptions), "warnings": list(self.warnings)} | extra


# ----------------------------------------------------------------------------------------- the search space


@dataclass(frozen=True, slots=True)
class _Config:
    method: Method
    precision: Precision
    optimizer: Optimizer | None
    quant: WeightsQuant
    ckpt: bool
    targets: tuple[str, ...] = ("default",)


def _family(gpu: GPU) -> str:
    """The 16-bit type a GPU trains and serves in: bf16 where it has bf16 tensor cores, else fp16."""
    return "fp16" if gpu.peak_tflops("bf16") is None and gpu.peak_tflops("fp16") is not None else "bf16"


def _precisions(method: Method, family: str, task: PlanTask) -> tuple[Precision, ...]:
    if task is PlanTask.INFER or method in (Method.LORA, Method.QLORA):
        return (Precision.BF16,) if family == "bf16" else (Precision.FP16,)
    # full / freeze: mixed precision (fp32 master weights) or pure 16-bit (no pure fp16: it needs loss scaling)
    return (Precision.AMP_BF16, Precision.BF16) if family == "bf16" else (Precision.AMP_FP16,)


def _configs(req: PlanRequest, family: str) -> Iterator[_Config]:
    if req.task is PlanTask.INFER:
        quants = req.weights_quants or tuple(_QUANT_RANK)  # what a runtime can quantize a 16-bit checkpoint to
        for prec in req.precisions or _precisions(Method.FULL, family, req.task):
            for q in quants:
                yield _Config(Method.FULL, prec, None, q, False)
        return
    methods = req.methods or ((Method.FULL,) if req.task is PlanTask.TRAIN else tuple(_METHOD_RANK))
    ckpts = (False, True) if req.gradient_checkpointing is None else (req.gradient_checkpointing,)
    for method in methods:
        precs = req.precisions or _precisions(method, family, req.task)
        adapters = method in (Method.LORA, Method.QLORA)
        opts = req.optimizers or ((Optimizer.ADAMW, Optimizer.ADAMW_8BIT) if adapters else
                                  (Optimizer.ADAMW, Optimizer.ADAMW_FUSED, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR,
                                   Optimizer.LION))
        target_sets = ((req.lora_targets,) if req.lora_targets else (("default",), ("all-linear",))) \
            if adapters else (("default",),)
        for prec in precs:
            for opt in opts:
                for ckpt in ckpts:
                    for targets in target_sets:
                        yield _Config(method, prec, opt, WeightsQuant.NONE, ckpt, targets)


_SINGLE = Layout()


def _layouts(req: PlanRequest, cfg: _Config, family: str) -> list[tuple[str, Layout]]:
    """(label, layout) pairs to try for ``cfg`` on 1, 2, 4 and 8 GPUs of one node.

    Inference: independent replicas (throughput) and tensor parallelism (memory). Training: DDP replicas
    (for speed: without checkpointing), FSDP full sharding (ZeRO-3-like) and, for full fine-tuning, tensor
    parallelism (for memory: with checkpointing), each with AdamW in the family's first precision and
    peft's default targets. Sharding, not 8-bit or factored optimizer states, is what makes room on
    several GPUs, and every parallel estimate costs about a millisecond: this keeps the search inside its
    time budget. Options the user pinned are tried on every layout.
    """
    out: list[tuple[str, Layout]] = [("single", Layout())]
    infer = req.task is PlanTask.INFER
    if not infer:
        if cfg.optimizer is not Optimizer.ADAMW and not req.optimizers:
            return out
        if cfg.precision is not _precisions(cfg.method, family, req.task)[0] and not req.precisions:
            return out
        if cfg.targets != ("default",) and not req.lora_targets:
            return out
    pinned = req.gradient_checkpointing is not None
    for n in GPU_COUNTS[1:]:
        if n > req.max_gpus:
            break
        if infer:
            out += [("replicas", Layout(gpus=n)), ("tp", Layout(gpus=n, tp=n))]
            continue
        if pinned or not cfg.ckpt:
            out.append(("ddp", Layout(gpus=n)))
        if pinned or cfg.ckpt:
            out.append(("fsdp", Layout(gpus=n, fsdp=FSDPMode.FULL)))
            if cfg.method is Method.FULL:
                out.append(("tp", Layout(gpus=n, tp=n)))
    return out


def _micro_batches(req: PlanRequest, per_replica: int) -> list[int]:
    """Divisors of the per-replica batch (micro-batch x accumulation is then exactly the global batch),
    up to MAX_MICRO_BATCH sequences and MAX_MICRO_BATCH_TOKENS tokens; 1 always."""
    if req.micro_batches:
        return sorted(b for b in set(req.micro_batches) if b <= per_replica) or [min(req.micro_batches)]
    cap = min(per_replica, MAX_MICRO_BATCH, max(1, MAX_MICRO_BATCH_TOKENS // req.seq_len))
    return [b for b in range(1, cap + 1) if per_replica % b == 0]


# ----------------------------------------------------------------------------------------- the planner


@dataclass
class _Memo:
    """(per-GPU peak, total, comm bytes, split, bubble) of a (workload, layout); None: unsupported."""

    results: dict[tuple[Workload, Layout], tuple[int, int, int, int, float] | None] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    errors: dict[str, None] = field(default_factory=dict)  # workloads the estimator rejects (ordered set)
    evaluations: int = 0

    def get(self, spec: ModelSpec, w: Workload, layout: Layout, label: str,
            name: str) -> tuple[int, int, int, int, float] | None:
        w = _memory_twin(w)
        if label == "ddp" and layout.gpus > 2:
            # A DDP replica's memory does not depend on how many replicas there are; only the ring
            # all-reduce volume does, 2 (n - 1) / n of the gradients (Patarasuk & Yuan 2009).
            two = self.get(spec, w, Layout(gpus=2), label, name)
            if two is None:
                return None
            n = layout.gpus
            return (two[0], two[1], int(two[2] * (n - 1) / n * 2), two[3], two[4])
        key = (w, layout)
        if key in self.results:
            return self.results[key]
        self.evaluations += 1
        res: tuple[int, int, int, int, float] | None
        if layout.is_single or label == "replicas":
            try:
                est = estimate(spec, w, name=name)
            except WorkloadError as exc:  # e.g. longer than a learned position table
                self.errors.setdefault(str(exc), None)
                res = None
            else:
                res = (est.peak_allocated_bytes, est.total_bytes, 0, 1, 0.0)
        else:
            try:
                pe = estimate_parallel(spec, w, layout)
            except WorkloadError as exc:
                self.unsupported.setdefault(label, str(exc))
                res = None
            else:
                bubble = float(getattr(pe, "bubble_fraction", 0.0) or 0.0)
                res = (pe.peak_allocated_bytes, pe.total_bytes, int(pe.comm_bytes_per_step),
                       layout.tp * layout.pp, bubble)
        self.results[key] = res
        return res


_SAME_BYTES = {Precision.FP16: Precision.BF16, Precision.AMP_FP16: Precision.AMP_BF16}


def _memory_twin(w: Workload) -> Workload:
    """The workload whose memory equals ``w``'s, in a canonical form, so identical estimates run once.

    fp16 and bf16 have the same element size, and the estimator reads only element sizes
    (``Precision.param_bytes`` / ``compute_bytes``); gradient accumulation keeps the gradients from the
    first micro-batch on, so any count above one holds the same bytes. ``tests/test_planner.py`` checks
    both equalities on the estimator itself.
    """
    twin = _SAME_BYTES.get(w.precision)
    if twin is not None or w.gradient_accumulation > 2:
        return w.with_(precision=twin or w.precision, gradient_accumulation=min(w.gradient_accumulation, 2))
    return w


def _tokens(req: PlanRequest, parameters: int) -> tuple[int, str]:
    if req.tokens is not None:
        return req.tokens, f"{req.tokens:,} tokens (--tokens)"
    if req.epochs is not None and req.dataset_tokens is not None:
        n = max(1, round(req.epochs * req.dataset_tokens))
        return n, f"{req.epochs:g} epochs x {req.dataset_tokens:,} tokens"
    if req.task is PlanTask.TRAIN:
        n = CHINCHILLA_TOKENS_PER_PARAMETER * parameters
        return n, f"{n:,} tokens: 20 per parameter, compute-optimal (Hoffmann et al. 2022); set --tokens"
    if req.task is PlanTask.FINETUNE:
        return DEFAULT_FINETUNE_TOKENS, f"{DEFAULT_FINETUNE_TOKENS:,} tokens by default; set --tokens"
    return DEFAULT_GENERATED_TOKENS, f"{DEFAULT_GENERATED_TOKENS:,} generated tokens by default; set --tokens"


def plan(spec: ModelSpec, request: PlanRequest | None = None, *, name: str | None = None,
         gpus: Sequence[GPU] | None = None) -> PlanResult:
    """Search the plans for ``spec`` (see the module docstring); ``gpus`` defaults to the catalog."""
    t0 = time.perf_counter()
    req = request or PlanRequest()
    label = name or spec.name
    pool = list(gpus) if gpus is not None else list(list_gpus())
    if req.gpu_class != "any":
        pool = [g for g in pool if g.gpu_class == req.gpu_class]
    parameters = count_params(spec).total
    tokens, tokens_note = _tokens(req, parameters)
    infer = req.task is PlanTask.INFER
    global_batch = 0 if infer else (req.global_batch or DEFAULT_GLOBAL_BATCH[req.task.value])
    model = load_throughput_model()
    engine = engine_profile(req.engine)
    memo = _Memo()
    candidates = 0
    plans: list[Plan] = []
    min_need: dict[str, tuple[int, str]] = {}  # gpu class -> (least total bytes evaluated, description)
    families = {f: [g for g in pool if _family(g) == f] for f in ("bf16", "fp16")}
    for family, fgpus in families.items():
        if not fgpus:
            continue
        max_usable = max(g.usable_memory_bytes for g in fgpus)
        for cfg in _configs(req, family):
            for lay_label, layout in _layouts(req, cfg, family):
                replicas = layout.gpus if lay_label == "replicas" else layout.dp
                if infer:
                    sizes = list(req.micro_batches) if req.micro_batches else list(INFER_CONCURRENCY)
                else:
                    sizes = _micro_batches(req, -(-global_batch // replicas))
                for mb in sorted(sizes):
                    accum = 1 if infer else -(-global_batch // (replicas * mb))
                    try:
                        w = _workload(req, cfg, mb, accum)
                    except WorkloadError:
                        break
                    if lay_label == "ddp":
                        # a DDP replica holds all that one GPU holds, plus the reducer's buckets: where the
                        # single-GPU estimate fits no GPU of the pool, DDP does not either
                        alone = memo.get(spec, w, _SINGLE, "single", label)
                        if alone is not None and alone[1] > max_usable:
                            break
                    res = memo.get(spec, w, layout, lay_label, label)
                    if res is None:
                        break
                    peak, total, comm_bytes, split, bubble = res
                    desc = _describe_need(cfg, mb, layout, lay_label, req.seq_len)
                    ctx = None
                    if total <= max_usable:  # the GPU-independent work, once, where some GPU can hold it
                        ctx = _Context(spec, w, layout, lay_label, replicas, global_batch, peak, total, comm_bytes,
                                       split, bubble, tokens, req.new_tokens, model,
                                       training_work(spec, w) if w.is_train else inference_work(spec, w),
                                       (0, 0.0) if w.is_train else decode_work(
                                           spec, w, context=w.seq_len + w.new_tokens // 2, batch=w.batch_size),
                                       None if w.is_train else engine)
                    for g in fgpus:
                        if cfg.quant is WeightsQuant.FP8 and g.peak_tflops("fp8") is None:
                            continue  # fp8 GEMMs need fp8 tensor cores (Ada, Hopper and later)
                        candidates += 1
                        old = min_need.get(g.gpu_class)
                        if old is None or total < old[0]:
                            min_need[g.gpu_class] = (total, desc)
                        if ctx is not None and total <= g.usable_memory_bytes:
                            plans.append(_make_plan(ctx, g))
                    if total > max_usable:
                        break  # a larger micro-batch cannot fit any GPU of the pool
    if not candidates and memo.errors:
        raise WorkloadError(next(iter(memo.errors)))
    feasible = len(plans)
    warnings: list[str] = [f"skipped: {e}" for e in memo.errors]
    if req.budget_usd is not None:
        over = [p for p in plans if p.cost_usd is None or p.cost_usd > req.budget_usd]
        if over:
            warnings.append(f"{len(over)} fitting plans dropped: over the ${req.budget_usd:,.2f} budget or unpriced")
        plans = [p for p in plans if p.cost_usd is not None and p.cost_usd <= req.budget_usd]
    ranked = sorted(plans, key=_rank_key(req.sort))
    consumer, consumer_reason = _recommend("consumer", ranked, pool, min_need, req, feasible)
    datacenter, datacenter_reason = _recommend("datacenter", ranked, pool, min_need, req, feasible)
    for lay, err in sorted(memo.unsupported.items()):
        warnings.append(f"{lay} layouts skipped: {err}")
    assumptions = (
        f"job: {tokens_note}" + ("" if infer else f"; global batch {global_batch} sequences of {req.seq_len} tokens"),
        "fits: total_bytes (peak allocated + allocator slack + CUDA context) of the most loaded GPU <= the GPU's "
        "usable memory",
        model.assumption(),
        "multi-GPU: one node; communication from the parallel estimator's volumes at the catalog's link bandwidth, "
        "not overlapped with compute",
        "cost: GPU-hours x the catalog's indicative on-demand price (reserved alongside); unpriced GPUs have no "
        "cost and rank after priced ones",
        "recommendation: consumer = fewest, then smallest consumer GPUs that fit, with the highest-fidelity method "
        "(full > LoRA > QLoRA > freeze; 16-bit > fp8 > int8 > nf4 weights) they allow; data centre = the "
        f"highest-fidelity method any data-centre plan allows, then the best by {req.sort.value}",
    )
    return PlanResult(label, parameters, req.task.value, tokens, req.seq_len, global_batch, req.sort.value,
                      candidates, feasible, sum(1 for v in memo.results.values() if v is None),
                      time.perf_counter() - t0, tuple(_dedupe(ranked)[: req.top]), consumer, consumer_reason,
                      datacenter, datacenter_reason, assumptions, tuple(warnings))


def _workload(req: PlanRequest, cfg: _Config, mb: int, accum: int) -> Workload:
    if req.task is PlanTask.INFER:
        return Workload(task=Task.INFER, precision=cfg.precision, weights_quant=cfg.quant, batch_size=mb,
                        seq_len=req.seq_len, new_tokens=req.new_tokens, attention=req.attention)
    return Workload(task=Task.TRAIN, method=cfg.method, precision=cfg.precision,
                    optimizer=cfg.optimizer or Optimizer.ADAMW, batch_size=mb, seq_len=req.seq_len,
                    gradient_checkpointing=cfg.ckpt, attention=req.attention, lora_rank=req.lora_rank,
                    lora_targets=cfg.targets, gradient_accumulation=accum)


def _describe_need(cfg: _Config, mb: int, layout: Layout, lay_label: str, seq: int) -> str:
    parts = [cfg.method.value if cfg.optimizer else "inference", cfg.precision.value]
    if cfg.quant is not WeightsQuant.NONE:
        parts.append(f"{cfg.quant.value} weights")
    if cfg.optimizer:
        parts.append(cfg.optimizer.value)
    if cfg.ckpt:
        parts.append("gradient checkpointing")
    parts.append(f"batch {mb} x {seq} tokens")
    if layout.gpus > 1:
        parts.append(f"{lay_label} over {layout.gpus} GPUs")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class _Context:
    """One evaluated (workload, layout): everything a plan needs but the GPU."""

    spec: ModelSpec
    w: Workload
    layout: Layout
    label: str
    replicas: int
    global_batch: int
    peak: int
    total: int
    comm_bytes: int
    split: int
    bubble: float
    tokens: int
    new_tokens: int
    model: ThroughputModel
    work: StepWork  # training: one micro-batch; inference: the prefill
    decode: tuple[int, float] = (0, 0.0)  # inference: bytes read and FLOPs of one decode step
    engine: EngineProfile | None = None  # inference: the serving engine


def _make_plan(c: _Context, gpu: GPU) -> Plan:
    w, n = c.w, c.layout.gpus
    time_s: float | None = None
    tps: float | None = None
    mfu: float | None = None
    work = c.work
    if w.is_train:
        comm_bytes = c.comm_bytes
        if comm_bytes == 0 and c.replicas > 1:
            comm_bytes = int(ring_allreduce_bytes(work.gradient_bytes, c.replicas))  # DDP's all-reduce
        bw = link_bandwidth_bytes_per_s(gpu, n) if n > 1 else None
        comm_s = 0.0 if n == 1 else (comm_bytes / bw if bw else None)
        # ZeRO (any stage) and FSDP give each data-parallel rank 1/dp of the optimizer step
        shard = c.replicas if (c.layout.fsdp is not None or c.layout.zero >= 1) else 1
        st = None if comm_s is None else step_time(work, gpu, c.model, micro_batches=w.gradient_accumulation,
                                                   split=c.split, shard=shard, comm_s=comm_s,
                                                   overlapped=c.split == 1)
        if st is not None:
            per_step = st.total_s / (1 - c.bubble) if c.bubble < 1 else st.total_s
            step_tokens = c.replicas * w.gradient_accumulation * work.tokens
            time_s = -(-c.tokens // step_tokens) * per_step
            tps = step_tokens / per_step
            peak_flops = gpu.peak_tflops(work.dtype)
            if peak_flops:
                mfu = work.model_flops * w.gradient_accumulation * c.replicas / (per_step * n * peak_flops * 1e12)
    elif c.new_tokens > 0:
        # a batch of requests: prefill, then new_tokens decode steps (split over tensor-parallel GPUs)
        # the same terms as vramplan.perf.inference_time: roofline + the engine's per-layer cost + 2 all-reduces
        # per layer under tensor parallelism (latency + ring bytes)
        eng = c.engine or engine_profile("transformers")
        prefill = step_time(work, gpu, c.model, split=c.split, engine=None if eng.per_layer_s is None else eng)
        roof, _ = decode_seconds(c.decode[0] / c.split, c.decode[1] / c.split, gpu, work.dtype, c.model)
        ar = allreduce_seconds(w.batch_size * c.spec.hidden_size * 2, c.split, gpu, eng.allreduce_latency_s)
        ar_prefill = allreduce_seconds(work.tokens * c.spec.hidden_size * 2, c.split, gpu, eng.allreduce_latency_s)
        if prefill is not None and roof is not None and ar is not None and ar_prefill is not None:
            decode_s = roof + engine_overhead_s(c.spec, eng, c.model) + 2 * c.spec.num_layers * ar
            request_s = prefill.total_s + 2 * c.spec.num_layers * ar_prefill + c.new_tokens * decode_s
            tps = c.replicas * w.batch_size * c.new_tokens / request_s
            time_s = c.tokens / tps
    gpu_hours = None if time_s is None else time_s * n / _SECONDS_PER_HOUR
    od = rs = None
    reason: str | None = None
    if gpu_hours is None:
        reason = "no time: the catalog lacks a figure this plan needs (dense throughput or link bandwidth)"
    else:
        if gpu.price.on_demand is not None:
            od = gpu_hours * gpu.price.on_demand
        else:
            reason = f"no on-demand price for {gpu.display_name} in the catalog ({gpu.price.source})"
        if gpu.price.reserved is not None:
            rs = gpu_hours * gpu.price.reserved
    return Plan(gpu.name, gpu.display_name, gpu.gpu_class, n, c.label,
                w.method.value if w.is_train else "inference", w.precision.value,
                w.optimizer.value if w.is_train else None, w.base_quant.value,
                w.gradient_checkpointing and w.is_train, w.batch_size, w.gradient_accumulation, c.global_batch,
                w.seq_len, c.peak, c.total, gpu.usable_memory_bytes,
                None if time_s is None else time_s / _SECONDS_PER_HOUR, gpu_hours, od, rs, reason, tps, mfu)


def _rank_key(sort: SortKey) -> Any:
    inf = float("inf")

    def key(p: Plan) -> tuple[float, ...]:
        t = p.time_hours if p.time_hours is not None else inf
        c = p.cost_usd if p.cost_usd is not None else inf
        first, second = (c, t) if sort is SortKey.COST else (t, c)
        return (first, second, p.gpu_count, p.total_bytes)

    return key


def _fidelity(p: Plan) -> int:
    if p.method == "inference":
        return _QUANT_RANK.get(WeightsQuant(p.weights_quant), len(_QUANT_RANK))
    return _METHOD_RANK[Method(p.method)]


def _dedupe(ranked: Sequence[Plan]) -> list[Plan]:
    seen: set[tuple[str, int, str, str, str]] = set()
    out = []
    for p in ranked:
        key = (p.gpu, p.gpu_count, p.layout, p.method, p.weights_quant)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _recommend(cls: str, ranked: Sequence[Plan], pool: Sequence[GPU], min_need: dict[str, tuple[int, str]],
               req: PlanRequest, feasible: int) -> tuple[Plan | None, str | None]:
    word = "consumer" if cls == "consumer" else "data-centre"
    in_class = [g for g in pool if g.gpu_class == cls]
    if not in_class:
        why = f"--gpu-class {req.gpu_class}" if req.gpu_class != "any" else "the GPU selection"
        return None, f"no {word} GPUs to plan for ({why} excludes them)"
    plans = [p for p in ranked if p.gpu_class == cls]
    if not plans:
        need = min_need.get(cls)
        biggest = max(in_class, key=lambda g: g.usable_memory_bytes)
        if need is not None and need[0] > biggest.usable_memory_bytes:
            return None, (f"not feasible on {word} GPUs: the leanest configuration tried needs "
                          f"{need[0] / GiB:.1f} GiB per GPU ({need[1]}), more than the "
                          f"{biggest.display_name}'s {biggest.usable_memory_bytes / GiB:.1f} GiB")
        if req.budget_usd is not None and feasible:
            return None, (f"no {word} plan fits within the ${req.budget_usd:,.2f} budget (unpriced GPUs "
                          "cannot be checked)")
        return None, f"not feasible on {word} GPUs with the options searched"
    if cls == "consumer":
        # the minimum setup: fewest GPUs, then the smallest (memory, then price to buy)
        def hw_key(p: Plan) -> tuple[float, ...]:
            g = next(x for x in in_class if x.name == p.gpu)
            return (p.gpu_count, g.usable_memory_bytes, g.msrp_usd if g.msrp_usd is not None else float("inf"))
        least = min(hw_key(p) for p in plans)
        plans = [p for p in plans if hw_key(p) == least]
    best_fidelity = min(_fidelity(p) for p in plans)
    return next(p for p in plans if _fidelity(p) == best_fidelity), None


# ----------------------------------------------------------------------------------------- image models

VISION_NO_TIME = "no throughput model for image models yet"
VISION_BATCHES = (1, 2, 4, 8, 16, 32, 64)
_VISION_PRECISIONS = (Precision.BF16, Precision.FP16, Precision.AMP_BF16, Precision.FP32)


def _runs(gpu: GPU, precision: Precision) -> bool:
    """Whether ``gpu`` has the 16-bit type ``precision`` computes in (fp32 runs everywhere)."""
    if precision in (Precision.BF16, Precision.AMP_BF16):
        return gpu.peak_tflops("bf16") is not None
    if precision in (Precision.FP16, Precision.AMP_FP16):
        return gpu.peak_tflops("fp16") is not None or gpu.peak_tflops("bf16") is not None
    return True


def _vision_rank_key(sort: SortKey, prices: dict[str, float | None]) -> Any:
    """Without a throughput model: the GPU's hourly price (sort cost), then fewest memory savers
    (checkpointing, 8-bit optimizer states), then the most images per step, then the least memory."""
    inf = float("inf")

    def key(p: Plan) -> tuple[float, ...]:
        savers = int(p.gradient_checkpointing) + int(p.optimizer == Optimizer.ADAMW_8BIT.value)
        hourly = prices.get(p.gpu)
        price = inf if hourly is None else hourly
        first = price if sort is SortKey.COST else 0.0
        return (first, savers, -p.micro_batch, price, p.total_bytes)

    return key


def plan_vision(name: str, request: PlanRequest | None = None, *, gpus: Sequence[GPU] | None = None,
                resolution: int | None = None, pipeline: bool = False) -> PlanResult:
    """The plans for an image model (:mod:`vramplan.vision`) on one GPU of each type of the pool.

    A reduced search: method (full, and LoRA where the model has it, for ``finetune``), precision (bf16,
    fp16, amp-bf16, fp32 where the GPU has the type), gradient checkpointing, AdamW or (full training)
    8-bit AdamW, and
    batches of 1-64 images at ``resolution``. Memory comes from :func:`vramplan.vision.estimate_vision`;
    time and cost are ``None`` (:data:`VISION_NO_TIME`), never guessed.
    """
    from .vision import estimate_vision

    t0 = time.perf_counter()
    req = request or PlanRequest()
    pool = list(gpus) if gpus is not None else list(list_gpus())
    if req.gpu_class != "any":
        pool = [g for g in pool if g.gpu_class == req.gpu_class]
    if any(q is not WeightsQuant.NONE for q in req.weights_quants):
        raise WorkloadError("--weights-quant is not modelled for image models")
    infer = req.task is PlanTask.INFER
    bad = [m.value for m in req.methods if m not in (Method.FULL, Method.LORA)]
    if bad:
        raise WorkloadError(f"--method {bad[0]} is not available for image models; use full or lora")
    methods: tuple[Method | None, ...] = (None,) if infer else (
        req.methods or ((Method.FULL,) if req.task is PlanTask.TRAIN else (Method.FULL, Method.LORA)))
    opts: tuple[Optimizer | None, ...] = (None,) if infer else (req.optimizers or (Optimizer.ADAMW,
                                                                                   Optimizer.ADAMW_8BIT))
    ckpts = (False,) if infer else ((False, True) if req.gradient_checkpointing is None
                                    else (req.gradient_checkpointing,))
    sizes = sorted(set(req.micro_batches)) or list(VISION_BATCHES)
    max_usable = max((g.usable_memory_bytes for g in pool), default=0)
    errors: dict[str, None] = {}
    plans: list[Plan] = []
    min_need: dict[str, tuple[int, str]] = {}
    candidates = 0
    parameters = 0
    label = name
    res_used = resolution
    for method in methods:
        for prec in req.precisions or _VISION_PRECISIONS:
            for opt in opts:
                if method is Method.LORA and opt is Optimizer.ADAMW_8BIT and not req.optimizers:
                    continue  # LoRA's optimizer states are a few MiB: 8-bit states save nothing worth a plan
                for ckpt in ckpts:
                    for mb in sizes:
                        accum = 1 if infer or not req.global_batch else -(-req.global_batch // mb)
                        try:
                            est = estimate_vision(
                                name, task="infer" if infer else "train", method=(method or Method.FULL).value,
                                precision=prec.value, optimizer=opt.value if opt else None, batch_size=mb,
                                resolution=resolution, gradient_checkpointing=ckpt, pipeline=pipeline,
                                attention="eager" if req.attention is Attention.EAGER else "sdpa",
                                lora_rank=req.lora_rank, gradient_accumulation=accum)
                        except WorkloadError as exc:
                            errors.setdefault(str(exc), None)
                            break
                        parameters, label = est.parameters, est.model
                        res_used = int(est.workload["resolution"])
                        desc = ", ".join(x for x in (method.value if method else "inference", prec.value,
                                                     opt.value if opt else "",
                                                     "gradient checkpointing" if ckpt else "",
                                                     f"batch {mb} at {res_used} px") if x)
                        for g in pool:
                            if not _runs(g, prec):
                                continue
                            candidates += 1
                            old = min_need.get(g.gpu_class)
                            if old is None or est.total_bytes < old[0]:
                                min_need[g.gpu_class] = (est.total_bytes, desc)
                            if est.total_bytes <= g.usable_memory_bytes:
                                plans.append(Plan(
                                    g.name, g.display_name, g.gpu_class, 1, "single",
                                    method.value if method else "inference", prec.value,
                                    opt.value if opt else None, WeightsQuant.NONE.value, ckpt, mb, accum,
                                    0 if infer else mb * accum, 0, est.peak_allocated_bytes, est.total_bytes,
                                    g.usable_memory_bytes, None, None, None, None, VISION_NO_TIME,
                                    None, None, res_used))
                        if est.total_bytes > max_usable:
                            break  # a larger batch cannot fit any GPU of the pool
    if not candidates and errors:
        raise WorkloadError(next(iter(errors)))
    ranked = sorted(plans, key=_vision_rank_key(req.sort, {g.name: g.price.on_demand for g in pool}))
    feasible = len(ranked)
    warnings = [f"skipped: {e}" for e in errors]
    if req.budget_usd is not None and ranked:
        warnings.append(f"--budget-usd dropped all {feasible} fitting plans: image-model plans have no cost "
                        f"({VISION_NO_TIME})")
        ranked = []
    consumer, consumer_reason = _recommend("consumer", ranked, pool, min_need, req, feasible)
    datacenter, datacenter_reason = _recommend("datacenter", ranked, pool, min_need, req, feasible)
    assumptions = (
        f"image model: one GPU, batches of {', '.join(map(str, sizes))} images at {res_used} px; "
        + ("inference" if infer else "training: full" + (" or LoRA" if Method.LORA in methods else "")
           + (f", {req.global_batch} images per optimizer step" if req.global_batch else "")),
        "fits: total_bytes (peak allocated + allocator slack + CUDA context) <= the GPU's usable memory",
        f"time and cost: none, {VISION_NO_TIME}; plans are ranked by "
        + ("the GPU's on-demand hourly price, then " if req.sort is SortKey.COST else "")
        + "fewest memory savers (checkpointing, 8-bit optimizer), then the most images per step",
        "recommendation: consumer = fewest, then smallest consumer GPUs that fit, with the highest-fidelity "
        "method (full > LoRA) they allow; data centre = the highest-fidelity method any data-centre plan "
        "allows, then the first by that ranking",
    )
    return PlanResult(label, parameters, req.task.value, 0, 0, 0 if infer else (req.global_batch or 0),
                      req.sort.value, candidates, feasible, 0, time.perf_counter() - t0,
                      tuple(_dedupe(ranked)[: req.top]), consumer, consumer_reason, datacenter, datacenter_reason,
                      assumptions, tuple(warnings), resolution=res_used)
