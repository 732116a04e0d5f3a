"""Seconds: a training step, a prefill and a decode step on a GPU, from the work and the efficiencies.

Training and prefill (one micro-batch, then the optimizer step)::

    step_s = matmul FLOPs / (peak[dtype] x achievable matmul fraction x the step's tile/wave quantization)
           + attention FLOPs / (peak x attention fraction)
           + memory traffic (counted logits bytes, calibrated elementwise passes) / (bandwidth)
           + launch cost (eager: host seconds per layer pass; CUDA-graph engines: kernels x device floor)
           + optimizer step / (tensor x pipeline x shard degree)      (ZeRO / FSDP shard the states)
           + the communication the framework does not overlap

Decode (one step of a batch)::

    decode_s = max(weights + KV cache bytes / (bandwidth x copy fraction), FLOPs / (peak x matmul fraction))
             + layers x the engine's per-layer cost (eager: the calibrated host launch per layer pass;
               CUDA graphs: kernels per layer x a graph-replayed kernel's device floor)
             + 2 x layers x (all-reduce latency + ring bytes / link)   (tensor parallel)

Known limits: one node; the calibrated coefficients come from one GPU (H200) and are carried to others by
their published achievable fractions; fp8 matrix products use the bf16 fraction of the fp8 peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from ..errors import VramplanError
from ..hardware import GPU
from ..spec import ModelSpec
from ..workload import Method, Workload
from .comm import (
    allreduce_seconds,
    comm_time_s,
    exposed_comm_s,
    link_bandwidth_bytes_per_s,
    nccl_allreduce_seconds,
    ring_allreduce_bytes,
)
from .cost import Cost, cost_of
from .efficiency import (
    _LAUNCH,
    _MEMORY,
    _OPTIMIZER,
    COUNTED_BYTES_COEFFICIENT,
    EngineProfile,
    ThroughputModel,
    attention_kernel_factor,
    engine_profile,
    feature_row,
    gpu_efficiency,
    load_throughput_model,
    matmul_dtype,
    scale_factors,
)
from .gemm import GemmShape, collective_ctas, gpu_tiling, overlap_rate, shape_factor, tensor_parallel
from .work import (
    StepWork,
    compute_dtype,
    decode_work,
    fp8_activation_quant,
    inference_work,
    kv_bytes_per_token,
    repeated_kv_bytes,
    training_work,
)

__all__ = ["DecodeStep", "InferenceTime", "StepTime", "TrainingTime", "decode_seconds", "decode_step", "decode_traffic",
           "engine_overhead_s", "fp8_gemms", "host_enqueue_s", "inference_time", "ridge_rows", "step_time",
           "tp_allreduce_s", "training_time"]

_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class StepTime:
    """One optimizer step on each GPU of a layout, in seconds, by what bounds it."""

    compute_s: float
    memory_s: float
    launch_s: float
    optimizer_s: float
    comm_s: float  # the communication the step waits for (after overlap)
    micro_batches: int
    comm_total_s: float = 0.0  # all communication, overlapped or not
    contention_s: float = 0.0  # compute slowed while overlapped collectives hold SMs (perf.gemm.overlap_rate)

    @property
    def total_s(self) -> float:
        return (self.micro_batches * (self.compute_s + self.memory_s + self.launch_s) + self.optimizer_s + self.comm_s
                + self.contention_s)

    def to_dict(self) -> dict[str, float]:
        return {"total_s": self.total_s, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "launch_s": self.launch_s, "optimizer_s": self.optimizer_s, "comm_s": self.comm_s,
                "comm_total_s": self.comm_total_s, "micro_batches": self.micro_batches,
                "contention_s": self.contention_s}


@lru_cache(maxsize=4096)
def _step_shapes(shapes: tuple[GemmShape, ...], dims: tuple[str, ...], split: int,
                 ridge: float) -> tuple[GemmShape, ...]:
    """Each GPU's shard of ``shapes`` (:func:`vramplan.perf.gemm.tensor_parallel`), those below ``ridge`` rows not
    charged tile and wave quantization (:func:`ridge_rows`)."""
    exact = tuple(replace(g, tp_dim=d) for g, d in zip(shapes, dims, strict=True))
    return tuple(replace(g, quantized=False) if g.quantized and g.m < ridge else g
                 for g in tensor_parallel(exact, split))


def ridge_rows(gpu: GPU, dtype: str) -> float:
    """Rows M below which a linear's product is bound by its weight stream, not its math: a product of M rows
    does 2 M FLOPs per weight element and reads the weight once, so it is math-bound where
    2 M / bytes-per-weight >= achievable FLOP/s / achievable bandwidth (the roofline's ridge point; Williams,
    Waterman & Patterson 2009). Below it the weights stream behind the math (step_time's weight term) and the
    idle SMs of a part-empty last wave do not lengthen the product, so tile and wave quantization is not
    charged there. 0 without a peak figure."""
    peak = gpu.peak_tflops(dtype)
    if not peak:
        return 0.0
    eff = gpu_efficiency(gpu)
    fm = eff.matmul_fp8 if dtype == "fp8" and eff.matmul_fp8 is not None else eff.matmul
    weight_bytes = {"fp8": 1, "tf32": 4}.get(dtype, 2)
    return peak * 1e12 * fm / (gpu.memory_bandwidth_bytes_per_s * eff.bandwidth) * weight_bytes / 2


def fp8_gemms(gpu: GPU, dtype: str) -> bool:
    """Whether fp8-weight matrix products run as fp8 GEMMs on ``gpu`` (and so quantize their activations): a GPU
    without fp8 tensor cores runs them weight-only at the 16-bit rate (:func:`vramplan.perf.efficiency.matmul_dtype`:
    vLLM's fp8 Marlin), with 16-bit activations."""
    return dtype == "fp8" and matmul_dtype(gpu, dtype) == "fp8"


def _launch_s(row: tuple[float, ...], c: tuple[float, ...], work: StepWork, engine: EngineProfile | None,
              quant_kernels: int) -> float:
    if engine is None or engine.per_layer_s is None:  # eager PyTorch: the calibrated host launch cost
        return sum(row[i] * c[i] for i in _LAUNCH)
    # CUDA-graph engines: their kernels per layer, plus the fp8 activation-quantization kernels where they run
    return work.layer_passes * (engine.per_layer_s + quant_kernels * (engine.kernel_s or 0.0))


def step_time(work: StepWork, gpu: GPU, model: ThroughputModel | None = None, *, micro_batches: int = 1,
              split: int = 1, shard: int = 1, comm_s: float = 0.0, overlapped: bool = False,
              engine: EngineProfile | None = None, num_layers: int | None = None,
              attention_kernel: str = "flash2", collective_ctas: int = 0) -> StepTime | None:
    """Seconds of one optimizer step of ``micro_batches`` x ``work`` on ``gpu``; None without a peak figure.

    ``split`` divides each GPU's FLOPs and traffic (tensor / pipeline parallel degree); ``shard`` further
    divides the optimizer step (ZeRO-1/2/3 and FSDP give each GPU 1/shard of the states to update:
    DeepSpeed ``stage_1_and_2.py`` steps only the partition, FSDP steps its flat-parameter shard).
    ``comm_s`` is the step's communication; with ``overlapped`` only the part compute cannot hide counts.
    ``engine`` replaces eager launch cost with the engine's per-layer cost and fuses its elementwise kernels.
    ``attention_kernel`` names the fused attention kernel (``flash2``: FlashAttention-2 / PyTorch SDPA flash;
    ``flash1``: FlashAttention v1 or its Triton port), whose achievable fraction scales the attention term.
    ``collective_ctas``: SMs each overlapped collective holds while it runs (NCCL: one CTA per channel); the
    compute beside it runs on the other SMs (:func:`vramplan.perf.gemm.overlap_rate`), so a window of
    overlapped communication ``T`` costs ``T x (1 - rate)`` of compute-bound time more.
    """
    if split < 1 or shard < 1:
        raise VramplanError(f"split and shard degrees must be at least 1, got {split} and {shard}")
    m = model or load_throughput_model()
    if work.gemm_shapes and (split > 1 or work.weight_bytes):
        # each GPU multiplies its shard of every linear (perf.gemm.tensor_parallel). Where the pass charges the
        # weight stream (prefill: work.weight_bytes), a product below the roofline's ridge is charged that stream
        # and its unquantized math, not tile and wave quantization on top (ridge_rows)
        ridge = ridge_rows(gpu, matmul_dtype(gpu, work.dtype)) if work.weight_bytes else 0.0
        dims = tuple(g.tp_dim for g in work.gemm_shapes)  # part of the key: GemmShape equality leaves it out
        work = replace(work, gemm_shapes=_step_shapes(work.gemm_shapes, dims, split, ridge))
    row = feature_row(work, gpu, attention_kernel=attention_kernel)
    if row is None:
        return None
    c = m.coefficients
    gemm = row[0] * c[0]
    if work.weight_bytes:
        # a forward pass streams every weight once. A tiled GEMM with few token rows cannot hide that stream
        # behind its math (each weight tile is used by only ``tokens`` rows), so the stream adds to the math:
        # a short prompt is bandwidth-bound, a long one compute-bound (the additive form of the roofline)
        fb = scale_factors(gpu, matmul_dtype(gpu, work.dtype))[2]
        gemm += fb * COUNTED_BYTES_COEFFICIENT * work.weight_bytes / gpu.memory_bandwidth_bytes_per_s
    compute = (gemm + row[1] * c[1]) / split
    memory = sum(row[i] * c[i] for i in _MEMORY) / split
    if work.quant_bytes and fp8_gemms(gpu, work.dtype):
        # fp8 GEMMs: each input quantized in a kernel of its own, a counted pass at the measured copy bandwidth
        # (perf.work.fp8_activation_quant), not a fitted one
        fq = scale_factors(gpu, "fp8")[2]
        memory += fq * COUNTED_BYTES_COEFFICIENT * work.quant_bytes / gpu.memory_bandwidth_bytes_per_s / split
    if engine is not None and engine.fused_elementwise and work.activation_bytes:
        # an engine that fuses the activation and the gating runs one elementwise kernel, not the eager count
        memory -= row[4] * c[4] / split * (1 - 1 / max(1, work.activation_kernels))
    launch = _launch_s(row, c, work, engine, work.quant_kernels if fp8_gemms(gpu, work.dtype) else 0)
    optimizer = row[_OPTIMIZER] * c[_OPTIMIZER] / (split * shard)
    hidden_behind = micro_batches * (compute + memory)
    waited = exposed_comm_s(comm_s, hidden_behind, num_layers or work.num_layers, overlapped=overlapped)
    contention = 0.0
    if overlapped and collective_ctas > 0 and comm_s > waited and compute > 0:
        rate = overlap_rate(work.gemm_shapes, gpu, collective_ctas)
        window = min(comm_s - waited, hidden_behind)  # the traffic that runs beside compute
        contention = window * (1 - rate) * compute / (compute + memory)
    return StepTime(compute, memory, launch, optimizer, waited, micro_batches, comm_s, contention)


@dataclass(frozen=True, slots=True)
class TrainingTime:
    """Time and money to train ``tokens`` tokens with a workload on ``gpu_count`` GPUs."""

    gpu: str
    gpu_count: int
    tokens: int
    tokens_per_step: int
    steps: int
    step: StepTime | None
    time_s: float | None
    tokens_per_s: float | None
    model_flops: float  # over the whole run
    mfu: float | None  # PaLM's model FLOPs utilisation (no recomputation)
    hfu: float | None  # hardware FLOPs utilisation (recomputation included)
    cost: Cost | None
    assumptions: tuple[str, ...]
    reason: str | None = None  # why time (or cost) is missing
    method: str = "mechanism"  # "mechanism" or "measured-mfu"

    @property
    def time_hours(self) -> float | None:
        return None if self.time_s is None else self.time_s / _SECONDS_PER_HOUR

    @property
    def step_seconds(self) -> float | None:
        return None if self.time_s is None else self.time_s / self.steps

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "gpu_count": self.gpu_count, "tokens": self.tokens,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps,
                "step": self.step.to_dict() if self.step else None, "time_s": self.time_s,
                "time_hours": self.time_hours, "tokens_per_s": self.tokens_per_s, "model_flops": self.model_flops,
                "mfu": self.mfu, "hfu": self.hfu, "cost": self.cost.to_dict() if self.cost else None,
                "method": self.method, "reason": self.reason, "assumptions": list(self.assumptions)}


def training_time(spec: ModelSpec, w: Workload, gpu: GPU, *, tokens: int, gpus: int = 1,
                  comm_bytes_per_step: float | None = None, split: int = 1, shard: int = 1,
                  overlapped: bool | None = None, model: ThroughputModel | None = None,
                  measured_mfu: float | None = None, attention_kernel: str = "flash2") -> TrainingTime:
    """Time and cost of training ``tokens`` tokens with ``w`` (micro-batch ``batch_size``, accumulation
    ``gradient_accumulation``) over ``gpus`` GPUs of one node.

    ``comm_bytes_per_step``: bytes each GPU sends per optimizer step (default: a ring all-reduce of the
    gradients when ``gpus > 1``). ``split``: tensor x pipeline degree dividing each GPU's work. ``shard``:
    how many GPUs share the optimizer states (ZeRO / FSDP data-parallel degree). ``overlapped``: whether the
    framework overlaps the traffic with compute (default: yes for data parallelism, no with ``split > 1``).
    ``measured_mfu``: a measured model FLOPs utilisation replaces the mechanism model (time = model FLOPs
    / (GPUs x peak x MFU)). ``attention_kernel``: the fused attention kernel the framework runs
    (:func:`vramplan.perf.efficiency.attention_kernel_factor`).
    """
    if tokens < 1:
        raise VramplanError(f"tokens must be at least 1, got {tokens}")
    m = model or load_throughput_model()
    work = training_work(spec, w)
    replicas = max(1, gpus // split)
    per_step = replicas * w.gradient_accumulation * work.tokens
    steps = math.ceil(tokens / per_step)
    eff = gpu_efficiency(gpu, measured_mfu=measured_mfu)
    assumptions = [m.assumption(), _flops_assumption(w), _dtype_assumption(work.dtype),
                   f"{gpu.display_name}: matmul {eff.matmul:.0%}, attention {eff.attention:.0%}, bandwidth "
                   f"{eff.bandwidth:.0%} of the catalog peaks ({'; '.join(eff.sources)})"]
    tiling = gpu_tiling(gpu)
    if tiling is not None:
        assumptions.append(
            f"matrix products at {shape_factor(work.gemm_shapes, gpu):.1%} of the matmul ceiling after tile and wave "
            f"quantization of this step's shapes ({tiling.tile[0]}x{tiling.tile[1]} or half-size CTA tiles on "
            f"{tiling.sms} SMs; data/gemm_tiles.json)")
    kernel_factor = attention_kernel_factor(attention_kernel)
    if kernel_factor != 1.0:
        assumptions.append(f"attention kernel {attention_kernel}: {kernel_factor:.2f} x FlashAttention-2's achievable "
                           "fraction (data/mfu.json attention_kernels)")
    run_flops = work.model_flops * w.gradient_accumulation * replicas * steps
    peak = gpu.peak_tflops(matmul_dtype(gpu, work.dtype))
    if measured_mfu is not None:
        gpu_flops_per_step = work.model_flops * w.gradient_accumulation * replicas
        if peak is None:
            return TrainingTime(gpu.name, gpus, tokens, per_step, steps, None, None, None, run_flops, None, None,
                                None, tuple(assumptions), f"no dense {work.dtype} throughput for {gpu.display_name}",
                                "measured-mfu")
        step_s = gpu_flops_per_step / (gpus * peak * 1e12 * measured_mfu)
        measured = StepTime(step_s, 0.0, 0.0, 0.0, 0.0, 1)
        time_s = steps * step_s
        cost = cost_of(gpu, time_s * gpus / _SECONDS_PER_HOUR)
        assumptions.append(f"time from the measured model FLOPs utilisation {measured_mfu:.1%} (--efficiency)")
        return TrainingTime(gpu.name, gpus, tokens, per_step, steps, measured, time_s, steps * per_step / time_s,
                            run_flops,
                            measured_mfu, measured_mfu * work.executed_flops / work.model_flops, cost,
                            tuple(assumptions), cost.reason, "measured-mfu")
    comm_bytes = ring_allreduce_bytes(work.gradient_bytes, replicas) if comm_bytes_per_step is None \
        else comm_bytes_per_step
    comm = comm_time_s(comm_bytes, gpu, gpus)
    over = (split == 1) if overlapped is None else overlapped
    if gpus > 1:
        assumptions.append(
            f"multi-GPU: {link_bandwidth_bytes_per_s(gpu, gpus) or 0:.3g} B/s per direction per GPU; "
            + ("communication overlapped with compute (DDP bucketed all-reduce / FSDP prefetch), one layer's share "
               "exposed" if over else "communication on the critical path (tensor / pipeline parallel)")
            + (f"; optimizer step sharded {shard} ways (ZeRO / FSDP)" if shard > 1 else ""))
    ctas = 0
    if gpus > 1 and over:
        from ..hardware import intra_node_link

        ctas = collective_ctas(intra_node_link(gpu.interconnect, gpus))
        if ctas:
            assumptions.append(f"overlapped collectives hold {ctas} SMs each while they run (NCCL channels); the "
                               "compute beside them runs on the rest (data/interconnects.json nccl.coll_channels)")
    st = None if comm is None else step_time(work, gpu, m, micro_batches=w.gradient_accumulation, split=split,
                                             shard=shard, comm_s=comm, overlapped=over,
                                             attention_kernel=attention_kernel, collective_ctas=ctas)
    if st is None or peak is None:
        reason = (f"no dense {work.dtype} throughput for {gpu.display_name} in the catalog" if comm is not None
                  else f"no interconnect bandwidth for {gpu.display_name} in the catalog")
        return TrainingTime(gpu.name, gpus, tokens, per_step, steps, None, None, None, run_flops, None, None, None,
                            tuple(assumptions), reason)
    time_s = steps * st.total_s
    mfu = run_flops / (time_s * gpus * peak * 1e12)
    hfu = mfu * work.executed_flops / work.model_flops
    cost = cost_of(gpu, time_s * gpus / _SECONDS_PER_HOUR)
    return TrainingTime(gpu.name, gpus, tokens, per_step, steps, st, time_s, steps * per_step / time_s, run_flops,
                        mfu, hfu, cost, tuple(assumptions), cost.reason)


def _flops_assumption(w: Workload) -> str:
    base = {Method.FULL: "6N per token (Kaplan et al. 2020)",
            Method.LORA: "4N per token: frozen base, forward 2N + input gradients 2N, no weight gradients",
            Method.QLORA: "4N per token: frozen 4-bit base dequantized per pass, no weight gradients",
            Method.DORA: "4N per token: frozen base, no weight gradients (DoRA's B@A and weight norms not counted)",
            Method.FREEZE: "2N forward + 4N backward through the trainable top layers only"}[w.method]
    extra = " + one recomputed forward (2N) per token (gradient checkpointing)" if w.gradient_checkpointing else ""
    return (f"FLOPs: {base}{extra}; attention 12·L·H·Q·T per token forward+backward (PaLM appendix B; executed: "
            "a fused kernel's backward recomputes QK^T, 2.5 x the forward, FlashAttention-2 Algorithm 2), halved "
            "for causal kernels that skip the masked half")


def _dtype_assumption(dtype: str) -> str:
    note = " (fp32 matmuls on TF32 tensor cores: allow_tf32 as the calibration harness sets it)" \
        if dtype == "tf32" else ""
    return f"peak: the catalog's dense {dtype} TFLOPS{note}"


# ---------------------------------------------------------------------------- decode


@dataclass(frozen=True, slots=True)
class DecodeStep:
    bytes_read: int
    flops: float
    seconds: float | None
    bound: str  # "memory", "compute" or "host" (the host's enqueue of a step without CUDA graphs)
    roofline_s: float | None = None  # max(bytes / bandwidth, FLOPs / peak)
    overhead_s: float = 0.0  # the engine's per-layer cost (launches / kernel floors)
    allreduce_s: float = 0.0  # tensor-parallel all-reduces


def decode_seconds(bytes_read: float, flops: float, gpu: GPU, dtype: str,
                   model: ThroughputModel | None = None) -> tuple[float | None, str]:
    """Roofline time of a decode step: max(bytes / (bandwidth x copy fraction), FLOPs / (peak x matmul fraction))."""
    m = model or load_throughput_model()
    dtype = matmul_dtype(gpu, dtype)
    peak = gpu.peak_tflops(dtype)
    if peak is None:
        return None, "unknown"
    eff = gpu_efficiency(gpu)
    fm, _fa, _fb = scale_factors(gpu, dtype)
    t_mem = bytes_read / (gpu.memory_bandwidth_bytes_per_s * eff.bandwidth)
    t_fl = flops * fm / (peak * 1e12 * m.gemm_efficiency)
    return max(t_mem, t_fl), ("memory" if t_mem >= t_fl else "compute")


def engine_overhead_s(spec: ModelSpec, engine: EngineProfile, model: ThroughputModel | None = None,
                      quant_kernels: int = 0) -> float:
    """Fixed seconds per decode step: eager engines pay the calibrated host launch cost per layer, CUDA-graph
    engines their kernels per layer x the device-side floor of a replayed kernel (plus ``quant_kernels`` fp8
    activation-quantization kernels per layer: :func:`vramplan.perf.work.fp8_activation_quant`); both add the
    engine's host work per step (scheduling, sampling)."""
    if engine.per_layer_s is None:  # eager: the layers' launches and generate()'s own per-step ops, in layer passes
        passes = spec.num_layers + engine.step_layer_passes
        return passes * (model or load_throughput_model()).launch_s_per_layer_pass + engine.step_s
    per_layer = engine.per_layer_s + quant_kernels * (engine.kernel_s or 0.0)
    return spec.num_layers * per_layer + engine.step_s


def decode_traffic(spec: ModelSpec, w: Workload, *, context: int, batch: int,
                   engine: str | EngineProfile = "transformers") -> tuple[int, float]:
    """(bytes read and written, FLOPs) of one decode step under ``engine``: the weights and the KV cache once
    (:func:`vramplan.perf.work.decode_work`), a cache rebuilt by ``torch.cat`` once more (``kv_cache_copies``),
    and the grouped keys and values transformers expands to every head where it does
    (:func:`vramplan.perf.work.repeated_kv_bytes`). The planner prices decode with the same bytes."""
    prof = engine if isinstance(engine, EngineProfile) else engine_profile(engine)
    bytes_read, flops = decode_work(spec, w, context=context, batch=batch)
    if prof.kv_cache_copies:
        bytes_read += int(prof.kv_cache_copies * batch * kv_bytes_per_token(spec, w, context))
    bytes_read += batch * repeated_kv_bytes(spec, w, context, prof.name)
    return bytes_read, flops


def tp_allreduce_s(size: float, tp: int, gpu: GPU, engine: EngineProfile) -> float | None:
    """One tensor-parallel all-reduce of ``size`` bytes under ``engine``: NCCL's ring as NCCL prices it where the
    engine all-reduces with NCCL (``EngineProfile.allreduce``; :func:`vramplan.perf.comm.nccl_allreduce_seconds`)
    or the message exceeds its custom kernel's buffer (``custom_allreduce_max_bytes``), else the engine's latency
    plus the ring bytes over the link (:func:`vramplan.perf.comm.allreduce_seconds`)."""
    too_big = 0 < engine.custom_allreduce_max_bytes < size  # vLLM/SGLang hand larger messages to NCCL
    if engine.allreduce == "nccl" or too_big:
        t = nccl_allreduce_seconds(size, tp, gpu)
        if t is not None:
            return t
    return allreduce_seconds(size, tp, gpu, engine.allreduce_latency_s)


def decode_step(spec: ModelSpec, w: Workload, gpu: GPU, *, context: int, batch: int,
                model: ThroughputModel | None = None, engine: str | EngineProfile = "transformers",
                tp: int = 1) -> DecodeStep:
    """One decode step of ``batch`` sequences at ``context`` tokens on ``gpu``, tensor-parallel over ``tp`` GPUs.

    The roofline divides by ``tp``; the per-layer cost does not (each GPU runs every layer's kernels); each
    layer adds two all-reduces of batch x hidden activations (after attention and after the MLP;
    Megatron-LM's row-parallel linears, Shoeybi et al. 2019). An engine whose cache is rebuilt every step
    (transformers' DynamicCache: ``torch.cat``) reads and writes the whole KV cache once more."""
    prof = engine if isinstance(engine, EngineProfile) else engine_profile(engine)
    bytes_read, flops = decode_traffic(spec, w, context=context, batch=batch, engine=prof)
    roof, bound = decode_seconds(bytes_read / tp, flops / tp, gpu, compute_dtype(w, prof.name), model)
    if roof is None:
        return DecodeStep(bytes_read, flops, None, bound)
    quant_kernels = (fp8_activation_quant(spec, w, 1, prof.name, prof.fused_gated_mlp)[1]
                     if fp8_gemms(gpu, compute_dtype(w, prof.name)) else 0)
    overhead = engine_overhead_s(spec, prof, model, quant_kernels)
    ar = 0.0
    if tp > 1:
        one = tp_allreduce_s(batch * spec.hidden_size * 2, tp, gpu, prof)
        if one is None:
            return DecodeStep(bytes_read, flops, None, bound, roof, overhead)
        ar = 2 * spec.num_layers * one
    seconds = roof + overhead + ar
    host = host_enqueue_s(spec, prof)
    if host > seconds - prof.step_s:  # the host enqueues the step's kernels slower than the GPU runs them
        seconds, bound = host + prof.step_s, "host"
    return DecodeStep(bytes_read, flops, seconds, bound, roof, overhead, ar)


def host_enqueue_s(spec: ModelSpec, engine: EngineProfile) -> float:
    """Host seconds to enqueue one step of ``spec``'s decoder layers where the engine runs it without a CUDA graph
    (``EngineProfile.host_enqueued``: TensorRT-LLM 0.5's ``GptSession`` enqueues the TensorRT context every prefill,
    ``executeContext``, and every generation step unless built and run with ``--enable_cuda_graph``): the step takes
    at least this long whatever the GPU, since the GPU cannot run a kernel before the host has enqueued it. 0 where
    the engine replays graphs or no per-layer enqueue cost is known (``data/mfu.json``
    ``engines.*.host_enqueue_s_per_layer``, with its derivation)."""
    if not engine.host_enqueued:
        return 0.0
    return spec.num_layers * engine.host_enqueue_s_per_layer


@dataclass(frozen=True, slots=True)
class InferenceTime:
    """Prefill latency and decode throughput of ``batch`` concurrent requests on one GPU (or a TP group)."""

    gpu: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float | None
    decode_s_per_token: float | None  # one step for the whole batch, at the mean context
    decode_tokens_per_s: float | None  # generated tokens per second, whole batch
    request_s: float | None  # prefill + all decode steps
    tokens_per_s: float | None  # generated tokens per second including prefill
    decode_bound: str
    assumptions: tuple[str, ...]
    reason: str | None = None
    engine: str = "transformers"
    decode_overhead_s: float = 0.0  # per step: the engine's per-layer cost
    decode_allreduce_s: float = 0.0  # per step: tensor-parallel all-reduces

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "decode_s_per_token": self.decode_s_per_token, "decode_tokens_per_s": self.decode_tokens_per_s,
                "request_s": self.request_s, "tokens_per_s": self.tokens_per_s, "decode_bound": self.decode_bound,
                "engine": self.engine, "decode_overhead_s": self.decode_overhead_s,
                "decode_allreduce_s": self.decode_allreduce_s, "reason": self.reason,
                "assumptions": list(self.assumptions)}


def inference_time(spec: ModelSpec, w: Workload, gpu: GPU, *, split: int = 1, model: ThroughputModel | None = None,
                   engine: str = "transformers", allreduce: str | None = None,
                   fused_mlp: bool | None = None, host_enqueued: bool | None = None) -> InferenceTime:
    """Prefill and decode of ``w`` on ``gpu`` with a serving ``engine``, tensor-parallel over ``split`` GPUs.
    ``allreduce`` (``nccl`` or ``custom``) overrides the engine's tensor-parallel all-reduce (a release or build
    without the engine's own kernel: TensorRT-LLM 0.5 engines built without ``--use_custom_all_reduce``);
    ``fused_mlp=False``: a build that runs the gate and up projections as two products (TensorRT-LLM 0.5 without
    ``--use_fused_mlp``); ``host_enqueued=True``: a session whose host enqueues every step kernel by kernel, without
    CUDA graphs (TensorRT-LLM 0.5's ``GptSession``): prefill and decode steps take at least the host's enqueue time
    (:func:`host_enqueue_s`)."""
    m = model or load_throughput_model()
    prof = engine_profile(engine)
    if allreduce is not None:
        if allreduce not in ("nccl", "custom"):
            raise VramplanError(f"allreduce is nccl or custom, got {allreduce!r}")
        prof = replace(prof, allreduce=allreduce)
    if fused_mlp is not None:
        prof = replace(prof, fused_gated_mlp=fused_mlp)
    if host_enqueued is not None:
        prof = replace(prof, host_enqueued=host_enqueued)
    work = inference_work(spec, w, prof.name, prof.fused_gated_mlp)
    eff = gpu_efficiency(gpu)
    mode = ("eager PyTorch: the calibrated host launch cost per layer" if prof.per_layer_s is None else
            f"CUDA graphs: {prof.kernels_per_layer} kernels per layer x {prof.kernel_s or 0:.1e} s")
    assumptions: tuple[str, ...] = (
        m.assumption(),
        f"decode ({prof.name}): weights + KV cache read once per step at {eff.bandwidth:.0%} of the catalog "
        f"bandwidth, plus {mode}" + ((", plus 2 all-reduces per layer (NCCL's ring as NCCL 2.18's tuning model "
                                      "prices it)" if prof.allreduce == "nccl" else
                                      f", plus 2 all-reduces per layer ({prof.allreduce_latency_s * 1e6:.0f} us "
                                      "latency + ring bytes over the link)") if split > 1 else "")
        + f"; {prof.source}",
        _dtype_assumption(work.dtype),
    )
    if work.quant_bytes and fp8_gemms(gpu, work.dtype):
        assumptions += (f"fp8 GEMMs: each linear's 16-bit input quantized in a kernel of its own ({work.quant_kernels} "
                        "per layer; read 16-bit, write fp8) at the copy bandwidth (perf.work.fp8_activation_quant)",)
    context = w.seq_len + w.new_tokens // 2
    if repeated_kv_bytes(spec, w, context, prof.name):
        assumptions += ("decode: transformers expands the grouped keys and values to every query head before "
                        "attention (repeat_kv), 2 x n_rep x the cache per step (perf.work.repeated_kv_bytes)",)
    host = host_enqueue_s(spec, prof)
    if host:
        assumptions += (f"no CUDA graphs: the host enqueues every step's kernels, "
                        f"{prof.host_enqueue_s_per_layer * 1e6:.0f} us per layer ({host * 1e3:.2f} ms a step), a floor "
                        "under prefill and decode whatever the GPU (data/mfu.json engines.*.host_enqueue_source)",)
    if prof.per_layer_s is None and prof.step_layer_passes:
        assumptions += (f"decode: generate()'s own per-step ops counted as {prof.step_layer_passes:g} layer passes "
                        "of eager launches (data/mfu.json engines.transformers.step_source)",)
    prefill_comm = 0.0
    if split > 1:
        one = tp_allreduce_s(work.tokens * spec.hidden_size * 2, split, gpu, prof)
        prefill_comm = 2 * spec.num_layers * one if one is not None else math.inf
    st = step_time(work, gpu, m, split=split, comm_s=prefill_comm,
                   engine=None if prof.per_layer_s is None else prof)
    b, s, n = w.batch_size, w.seq_len, w.new_tokens
    dec = decode_step(spec, w, gpu, context=s + n // 2, batch=b, model=m, engine=prof, tp=split)
    if st is None or dec.seconds is None or not math.isfinite(st.total_s):
        peak = gpu.peak_tflops(matmul_dtype(gpu, work.dtype))
        why = (f"no dense {work.dtype} throughput for {gpu.display_name}" if peak is None
               else f"no GPU-to-GPU link bandwidth for {gpu.display_name} (tensor parallel over {split}; "
                    "a described GPU takes link=…)")
        return InferenceTime(gpu.name, b, s, n, None, None, None, None, None, dec.bound, assumptions, why, prof.name)
    prefill = max(st.total_s, host)  # the host's enqueue of the context step bounds it from below
    per_step = dec.seconds
    request = prefill + n * per_step
    return InferenceTime(gpu.name, b, s, n, prefill, per_step, b / per_step, request,
                         b * n / request if n else None, dec.bound, assumptions, None, prof.name, dec.overhead_s,
                         dec.allreduce_s)

