"""The search: every candidate of the space evaluated once, against every GPU of the pool."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import VramplanError, WorkloadError
from ..estimator import estimate, runs_as
from ..hardware import GPU, list_gpus
from ..parallel import Layout, estimate_parallel, links_for_gpu, nccl_memory
from ..parallel.streams import replays
from ..params import count_params
from ..perf import (
    EngineProfile,
    StepWork,
    ThroughputModel,
    allreduce_seconds,
    decode_seconds,
    decode_traffic,
    engine_overhead_s,
    engine_profile,
    fp8_gemms,
    inference_work,
    link_bandwidth_bytes_per_s,
    load_throughput_model,
    ring_allreduce_bytes,
    step_time,
    training_work,
)
from ..spec import ModelSpec
from ..workload import Attention, Loss, Method, Optimizer, Precision, Task, WeightsQuant, Workload
from .recommend import Plan, PlanResult, _dedupe, _rank_key, _recommend, _saver_notes, _vision_rank_key
from .space import (
    _SECONDS_PER_HOUR,
    _SINGLE,
    _VISION_PRECISIONS,
    CHINCHILLA_TOKENS_PER_PARAMETER,
    DEFAULT_FINETUNE_TOKENS,
    DEFAULT_GENERATED_TOKENS,
    DEFAULT_GLOBAL_BATCH,
    INFER_CONCURRENCY,
    SAVERS,
    VISION_BATCHES,
    VISION_NO_TIME,
    PlanRequest,
    PlanTask,
    SortKey,
    _Config,
    _configs,
    _family,
    _layouts,
    _micro_batches,
    _runs,
)

# ----------------------------------------------------------------------------------------- the planner


# (per-GPU peak, total, comm bytes, split, bubble, host bytes, host traffic per micro-batch) of a (workload, layout)
_Eval = tuple[int, int, int, int, float, int, int]


@dataclass
class _Memo:
    """:data:`_Eval` of each (workload, layout) evaluated; None: unsupported."""

    results: dict[tuple[Workload, Layout], _Eval | None] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    errors: dict[str, None] = field(default_factory=dict)  # workloads the estimator rejects (ordered set)
    evaluations: int = 0
    nccl_bytes: dict[tuple[object, ...], int] = field(default_factory=dict)

    def get(self, spec: ModelSpec, w: Workload, layout: Layout, label: str,
            name: str) -> _Eval | None:
        w = _memory_twin(spec, w)
        if label == "ddp" and layout.gpus > 2:
            # A DDP replica's memory does not depend on how many replicas there are; only the ring
            # all-reduce volume does, 2 (n - 1) / n of the gradients (Patarasuk & Yuan 2009).
            two = self.get(spec, w, Layout(gpus=2), label, name)
            if two is None:
                return None
            n = layout.gpus
            return (two[0], two[1], int(two[2] * (n - 1) / n * 2), two[3], two[4], two[5], two[6])
        key = (w, layout)
        if key in self.results:
            return self.results[key]
        self.evaluations += 1
        res: _Eval | None
        if layout.is_single or label == "replicas":
            try:
                # the analytic path: a plan search evaluates thousands of candidates (the allocator replay
                # decides in estimate and fit)
                est = estimate(spec, w, name=name, reserved=False)
            except WorkloadError as exc:  # e.g. longer than a learned position table
                self.errors.setdefault(str(exc), None)
                res = None
            else:
                res = (est.peak_allocated_bytes, est.total_bytes, 0, 1, 0.0, est.host_bytes,
                       est.host_traffic_bytes // w.gradient_accumulation)
        else:
            try:
                pe = estimate_parallel(spec, w, layout, reserved=False)
            except WorkloadError as exc:
                self.unsupported.setdefault(label, str(exc))
                res = None
            else:
                bubble = float(getattr(pe, "bubble_fraction", 0.0) or 0.0)
                # NCCL's buffers depend on the GPU's links: added per GPU (:meth:`nccl`)
                res = (pe.peak_allocated_bytes, pe.total_bytes - pe.nccl_bytes, int(pe.comm_bytes_per_step),
                       layout.tp * layout.pp, bubble, 0, 0)
        self.results[key] = res
        return res

    def nccl(self, spec: ModelSpec, w: Workload, layout: Layout, label: str, gpu: GPU) -> int:
        """NCCL's device memory of one GPU of ``layout`` over ``gpu``'s own links (0 for one GPU or replicas,
        and for a GPU with no catalog link)."""
        if layout.is_single or label == "replicas":
            return 0
        try:
            links = links_for_gpu(gpu.name, layout.gpus_per_node)
        except VramplanError:
            return 0
        key = (layout, w.is_train, spec.is_moe, links.intra_node, links.inter_node)
        if key not in self.nccl_bytes:
            self.nccl_bytes[key] = nccl_memory(layout, w, spec, intra_node=links.intra_node,
                                               inter_node=links.inter_node).total_bytes
        return self.nccl_bytes[key]


_SAME_BYTES = {Precision.FP16: Precision.BF16, Precision.AMP_FP16: Precision.AMP_BF16}


class _Confirm:
    """One-GPU plans are searched on the analytic path (peak + the calibration slack); those shown or
    recommended are confirmed with the allocator replay (:func:`vramplan.estimator.estimate`): their total
    becomes what the caching allocator reserves + the CUDA context, and a plan that then does not fit is
    dropped for the next one. Multi-GPU plans whose ranks' allocation streams are modelled
    (:func:`vramplan.parallel.streams.replays`: FSDP, ZeRO, tensor parallel) are confirmed the same way with
    :func:`vramplan.parallel.estimate_parallel` over the plan's GPU's links; the others keep the calibration
    slack."""

    def __init__(self, spec: ModelSpec, name: str, one_gpu: dict[int, Workload],
                 sharded: dict[int, tuple[Workload, Layout]] | None = None) -> None:
        self.spec, self.name, self.one_gpu = spec, name, one_gpu
        self.sharded = sharded or {}
        self.totals: dict[Workload, int] = {}
        self.parallel_totals: dict[tuple[Workload, Layout, str], int] = {}
        self.checked: dict[int, Plan | None] = {}

    def __call__(self, p: Plan) -> Plan | None:
        if id(p) in self.checked:
            return self.checked[id(p)]
        w = self.one_gpu.get(id(p))
        out: Plan | None = p
        if w is not None:
            t = self.totals.get(w)
            if t is None:
                t = self.totals[w] = estimate(self.spec, w, name=self.name).total_bytes
            out = dataclasses.replace(p, total_bytes=t)
            out = out if out.fits else None
        elif id(p) in self.sharded:
            w, layout = self.sharded[id(p)]
            key = (w, layout, p.gpu)
            t = self.parallel_totals.get(key)
            if t is None:
                try:
                    links = links_for_gpu(p.gpu, layout.gpus_per_node)
                except VramplanError:  # a GPU with no catalog link: its plan keeps the search's total
                    t = p.total_bytes
                else:
                    t = estimate_parallel(self.spec, w, layout, links).total_bytes
                self.parallel_totals[key] = t
            out = dataclasses.replace(p, total_bytes=t)
            out = out if out.fits else None
        self.checked[id(p)] = out
        return out

    def top(self, ranked: Sequence[Plan], n: int) -> list[Plan]:
        kept: list[Plan] = []
        seen: set[tuple[str, int, str, str, str]] = set()
        for p in ranked:  # as _dedupe: the first plan of each (hardware, layout, method, weights) that fits
            if len(kept) >= n:
                break
            key = (p.gpu, p.gpu_count, p.layout, p.method, p.weights_quant)
            if key in seen:
                continue
            q = self(p)
            if q is not None:
                seen.add(key)
                kept.append(q)
        return kept

    def recommend(self, cls: str, ranked: Sequence[Plan], pool: Sequence[GPU],
                  min_need: dict[str, tuple[int, str]], req: PlanRequest,
                  feasible: int) -> tuple[Plan | None, str | None]:
        left = list(ranked)
        while True:
            rec, why = _recommend(cls, left, pool, min_need, req, feasible)
            if rec is None:
                return rec, why
            q = self(rec)
            if q is not None:
                return q, why
            left = [p for p in left if p is not rec]


def _memory_twin(spec: ModelSpec, w: Workload) -> Workload:
    """The workload whose memory equals ``w``'s, in a canonical form, so identical estimates run once.

    fp16 and bf16 have the same element size, and outside eager attention the estimator reads only element
    sizes (``Precision.param_bytes`` / ``compute_bytes``; eager softmax differs: ATen's fused half_to_float
    kernel takes fp16, bf16 is first copied to fp32); gradient accumulation keeps the gradients from the
    first micro-batch on, so any count above one holds the same bytes. ``tests/test_planner.py`` checks
    both equalities on the estimator itself.
    """
    twin = _SAME_BYTES.get(w.precision) if runs_as(spec, w).attention is not Attention.EAGER else None
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
    one_gpu: dict[int, Workload] = {}  # plans on one GPU (each GPU on its own): their workload, for confirm
    sharded: dict[int, tuple[Workload, Layout]] = {}  # plans whose ranks' streams are replayed (FSDP, ZeRO, TP)
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
                    peak, total, comm_bytes, split, bubble, host_bytes, traffic = res
                    desc = _describe_need(cfg, mb, layout, lay_label, req.seq_len)
                    ctx = None
                    if total <= max_usable:  # the GPU-independent work, once, where some GPU can hold it
                        ctx = _Context(spec, w, layout, lay_label, replicas, global_batch, peak, total, comm_bytes,
                                       split, bubble, tokens, req.new_tokens, model,
                                       training_work(spec, w) if w.is_train else inference_work(spec, w, engine.name),
                                       (0, 0.0) if w.is_train else decode_traffic(
                                           spec, w, context=w.seq_len + w.new_tokens // 2, batch=w.batch_size,
                                           engine=engine),
                                       None if w.is_train else engine, host_bytes, traffic,
                                       _saver_of(w, req))
                    for g in fgpus:
                        if cfg.quant is WeightsQuant.FP8 and g.peak_tflops("fp8") is None:
                            continue  # fp8 GEMMs need fp8 tensor cores (Ada, Hopper and later)
                        candidates += 1
                        g_total = total + memo.nccl(spec, w, layout, lay_label, g)
                        old = min_need.get(g.gpu_class)
                        if old is None or g_total < old[0]:
                            min_need[g.gpu_class] = (g_total, desc)
                        if ctx is not None and g_total <= g.usable_memory_bytes:
                            plan = _make_plan(ctx, g)
                            plans.append(plan if g_total == total else dataclasses.replace(plan, total_bytes=g_total))
                            if layout.is_single or lay_label == "replicas":
                                one_gpu[id(plans[-1])] = w
                            elif replays(layout, w):
                                sharded[id(plans[-1])] = (w, layout)
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
    confirm = _Confirm(spec, label, one_gpu, sharded)
    shown = confirm.top(ranked, req.top)
    consumer, consumer_reason = confirm.recommend("consumer", ranked, pool, min_need, req, feasible)
    datacenter, datacenter_reason = confirm.recommend("datacenter", ranked, pool, min_need, req, feasible)
    saver_notes = _saver_notes(ranked, (consumer, datacenter))
    for lay, err in sorted(memo.unsupported.items()):
        warnings.append(f"{lay} layouts skipped: {err}")
    assumptions = (
        f"job: {tokens_note}" + ("" if infer else f"; global batch {global_batch} sequences of {req.seq_len} tokens"),
        "fits: total_bytes (peak allocated + allocator slack + CUDA context, + NCCL's buffers over the GPU's own "
        "links for several GPUs) of the most loaded GPU <= the GPU's usable memory; the search ranks one-GPU "
        "candidates with a slack of 10% of the peak, and every one-GPU, FSDP, ZeRO or tensor-parallel plan shown or "
        "recommended is confirmed with the caching-allocator replay (reserved + context)",
        model.assumption(),
        "multi-GPU: one node; communication from the parallel estimator's volumes at the catalog's link bandwidth, "
        "overlapped with compute for data parallelism (DDP buckets, FSDP prefetch), on the critical path for tensor "
        "parallelism; ZeRO / FSDP divide the optimizer step by the data-parallel degree",
        f"inference: {req.engine} prefill and decode (vramplan.perf engine profile), as estimate --engine computes",
        "cost: GPU-hours x the catalog's indicative on-demand price (reserved alongside); unpriced GPUs have no "
        "cost and rank after priced ones",
        *(() if infer else (
            f"training loop: {req.trainer.value}; memory savers searched on one GPU: "
            f"{', '.join(SAVERS if req.savers is None else req.savers) or 'none'}; activation offloading's PCIe "
            "traffic is added to the step time, not overlapped; paged optimizer states live in host-backed unified "
            "memory (stated as host memory)",)),
        "recommendation: consumer = fewest, then smallest consumer GPUs that fit, with the highest-fidelity method "
        "(full > LoRA > QLoRA > freeze; 16-bit > fp8 > int8 > nf4 weights) they allow; data centre = the "
        f"highest-fidelity method any data-centre plan allows, then the best by {req.sort.value}",
    )
    return PlanResult(label, parameters, req.task.value, tokens, req.seq_len, global_batch, req.sort.value,
                      candidates, feasible, sum(1 for v in memo.results.values() if v is None),
                      time.perf_counter() - t0, tuple(shown), consumer, consumer_reason,
                      datacenter, datacenter_reason, assumptions, tuple(warnings), saver_notes=saver_notes)


def _workload(req: PlanRequest, cfg: _Config, mb: int, accum: int) -> Workload:
    if req.task is PlanTask.INFER:
        return Workload(task=Task.INFER, precision=cfg.precision, weights_quant=cfg.quant, batch_size=mb,
                        seq_len=req.seq_len, new_tokens=req.new_tokens, attention=req.attention)
    return Workload(task=Task.TRAIN, method=cfg.method, precision=cfg.precision,
                    optimizer=cfg.optimizer or Optimizer.ADAMW, batch_size=mb, seq_len=req.seq_len,
                    gradient_checkpointing=cfg.ckpt, attention=req.attention, lora_rank=req.lora_rank,
                    lora_targets=cfg.targets, gradient_accumulation=accum, trainer=req.trainer,
                    loss=_SAVER_LOSS.get(cfg.saver, req.loss),
                    activation_offload=cfg.saver == "--activation-offload" or req.activation_offload)


_SAVER_LOSS = {"--loss liger-fused": Loss.LIGER_FUSED}


def _saver_of(w: Workload, req: PlanRequest) -> str | None:
    """The saver flag a training workload turns on beyond what the request pinned, or None."""
    if not w.is_train:
        return None
    if w.loss is not req.loss:
        return f"--loss {w.loss.value}"
    if w.activation_offload and not req.activation_offload:
        return "--activation-offload"
    if w.optimizer is Optimizer.PAGED_ADAMW_8BIT and not req.optimizers:
        return "--optimizer paged-adamw-8bit"
    return None


def _offload_seconds(host_traffic_bytes: int, gpu: GPU) -> float:
    """Activation offloading's host traffic of one step over PCIe x16 (2**(gen-3) x 15.75 GB/s per direction,
    gen 4 where the catalog does not say), half each way, not overlapped with compute: an upper bound on what it
    adds (TRL overlaps the copies on a side stream where it can)."""
    if not host_traffic_bytes:
        return 0.0
    gen = gpu.interconnect.pcie_gen or 4
    return host_traffic_bytes / 2 / (15.75e9 * 2.0 ** (gen - 3))


def _describe_need(cfg: _Config, mb: int, layout: Layout, lay_label: str, seq: int) -> str:
    parts = [cfg.method.value if cfg.optimizer else "inference", cfg.precision.value]
    if cfg.quant is not WeightsQuant.NONE:
        parts.append(f"{cfg.quant.value} weights")
    if cfg.optimizer:
        parts.append(cfg.optimizer.value)
    if cfg.ckpt:
        parts.append("gradient checkpointing")
    if cfg.saver:
        parts.append(cfg.saver)
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
    host_bytes: int = 0  # host memory a saver needs (offloaded activations, paged optimizer states)
    host_traffic: int = 0  # bytes over PCIe per micro-batch (activation offloading, both directions)
    saver: str | None = None  # the memory saver the plan turns on (a CLI flag)


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
            per_step += _offload_seconds(c.host_traffic * w.gradient_accumulation, gpu)
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
            quant_kernels = work.quant_kernels if fp8_gemms(gpu, work.dtype) else 0
            decode_s = roof + engine_overhead_s(c.spec, eng, c.model, quant_kernels) + 2 * c.spec.num_layers * ar
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
                None if time_s is None else time_s / _SECONDS_PER_HOUR, gpu_hours, od, rs, reason, tps, mfu,
                saver=c.saver, host_bytes=c.host_bytes)


def plan_vision(name: str, request: PlanRequest | None = None, *, gpus: Sequence[GPU] | None = None,
                resolution: int | None = None, pipeline: bool = False) -> PlanResult:
    """The plans for an image model (:mod:`vramplan.vision`) on one GPU of each type of the pool.

    A reduced search: method (full, and LoRA where the model has it, for ``finetune``), precision (bf16,
    fp16, amp-bf16, fp32 where the GPU has the type), gradient checkpointing, AdamW or (full training)
    8-bit AdamW, and
    batches of 1-64 images at ``resolution``. Memory comes from :func:`vramplan.vision.estimate_vision`;
    time and cost are ``None`` (:data:`VISION_NO_TIME`), never guessed.
    """
    from ..vision import estimate_vision

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
