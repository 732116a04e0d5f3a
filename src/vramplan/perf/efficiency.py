"""Efficiency data: what fraction of a GPU's catalog peaks real kernels reach, and the calibrated
coefficients of the transformers training/prefill path (``data/mfu.json``).

Every coefficient is a physical quantity with a source:

* per GPU (or its generation): the achievable fraction of the dense peak for large matrix products
  (published maximum-achievable-matmul measurements), of FlashAttention-2 (its papers), and of the
  memory bandwidth (copy measurements);
* per execution mode and serving engine: kernels per decoder layer and the device-side cost of a
  CUDA-graph-replayed kernel, the latency of a tensor-parallel all-reduce;
* the calibration on the reference GPU (H200): attention efficiency of PyTorch SDPA under transformers,
  host launch seconds per layer pass of eager PyTorch, and the number of elementwise passes over the
  attention scores, MLP intermediates, optimizer states, dequantized weights and adapter activations.
  The logits traffic is counted kernel by kernel (:func:`vramplan.perf.work.logits_bytes_per_element`)
  and streamed at the measured copy bandwidth, not fitted.

Another GPU's time scales each term by its own efficiencies relative to the reference GPU's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from ..errors import UnknownNameError, VramplanError
from ..hardware import GPU
from .gemm import shape_factor
from .work import StepWork

__all__ = [
    "COEFFICIENTS",
    "ENGINES",
    "FEATURES",
    "MEASURED_COPY_EFFICIENCY",
    "MEASURED_GEMM_EFFICIENCY",
    "EngineProfile",
    "GPUEfficiency",
    "ThroughputModel",
    "attention_kernel_factor",
    "engine_profile",
    "feature_row",
    "gpu_efficiency",
    "load_throughput_model",
    "matmul_dtype",
]

FEATURES = ("gemm", "attention", "score", "logits", "activation", "optimizer", "dequant", "adapter_bytes",
            "layer_passes", "expert_passes", "adapter_passes")
# The JSON names of the coefficients, in FEATURES order; efficiencies are stored as such (coefficient = 1/eff).
COEFFICIENTS = ("gemm_efficiency", "attention_efficiency", "score_passes", "logits_passes", "activation_passes",
                "optimizer_passes", "dequant_passes", "adapter_passes", "launch_s_per_layer_pass",
                "launch_s_per_expert_pass", "launch_s_per_adapter_pass")
_EFFICIENCIES = frozenset({0, 1})
_COMPUTE = (0, 1)
_MEMORY = (2, 3, 4, 6, 7)
_OPTIMIZER = 5
_LAUNCH = (8, 9, 10)
LOGITS = 3

# Pinned, not fitted: an 8192x8192x8192 bf16 matrix product ran at 788 TFLOP/s (random data, PyTorch
# 2.11) on the H200 machine lent to this workplace (device notes), 2026-10-28: 0.796 of the catalog's
# 989.5 TFLOPS dense bf16 peak.
MEASURED_GEMM_EFFICIENCY = 788.0 / 989.5
# A device-to-device copy moved 4.3 TB/s (read + written) on the same kind of machine: 0.896 of 4.8 TB/s.
MEASURED_COPY_EFFICIENCY = 4.3 / 4.8
# Counted bytes (logits) stream at the measured copy bandwidth: one pass is 1 / MEASURED_COPY_EFFICIENCY.
COUNTED_BYTES_COEFFICIENT = 1.0 / MEASURED_COPY_EFFICIENCY

ENGINES = ("transformers", "vllm", "sglang", "tensorrt-llm", "lmdeploy", "llama.cpp", "gpt-fast")


@dataclass(frozen=True, slots=True)
class GPUEfficiency:
    """Achievable fractions of one GPU's catalog peaks, and where each figure came from."""

    gpu: str
    generation: str
    matmul: float  # large dense matrix products / dense peak of the dtype
    attention: float  # FlashAttention-2 forward + backward / dense peak
    bandwidth: float  # streaming copy / catalog memory bandwidth
    sources: tuple[str, ...]
    measured_mfu: float | None = None  # the user's measured model FLOPs utilisation (--efficiency)
    matmul_fp8: float | None = None  # fp8 matrix products / dense fp8 peak, where published (else ``matmul``)

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "generation": self.generation, "matmul": self.matmul, "matmul_fp8": self.matmul_fp8,
                "attention": self.attention, "bandwidth": self.bandwidth, "measured_mfu": self.measured_mfu,
                "sources": list(self.sources)}


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """How a serving engine runs a decode step: execution mode, kernels per layer, all-reduce latency."""

    name: str
    mode: str  # "eager" or "cuda-graphs"
    kernels_per_layer: int | None  # None: eager (launch cost calibrated per layer pass)
    kernel_s: float | None  # device-side seconds per graph-replayed kernel
    allreduce_latency_s: float  # one small tensor-parallel all-reduce
    fused_elementwise: bool  # activation/gating fused into one kernel
    source: str
    step_s: float = 0.0  # host work per decode step outside the layers (scheduling, sampling, output processing)
    fused_attention: bool = False  # runs its own fused causal attention kernel (no materialised scores)
    kv_cache_copies: float = 0.0  # extra passes over the whole KV cache per decode step (a cache rebuilt by torch.cat)
    step_layer_passes: float = 0.0  # eager engines: host work per decode step outside the layers, in layer passes
    allreduce: str = "custom"  # tensor-parallel all-reduce: "nccl" (NCCL's ring, perf.comm.nccl_allreduce_seconds)
    # or "custom" (the engine's one-shot kernel: allreduce_latency_s + ring bytes over the link)
    fused_gated_mlp: bool = True  # gate and up projections run as one product (one fp8 input quantization)
    custom_allreduce_max_bytes: int = 0  # larger all-reduces leave the custom kernel for NCCL (0: no limit)
    host_enqueue_s_per_layer: float = 0.0  # host seconds to enqueue one decoder layer where no CUDA graph replays it
    host_enqueued: bool = False  # every step enqueued kernel by kernel by the host (a session without CUDA graphs)

    @property
    def per_layer_s(self) -> float | None:
        """Seconds of fixed per-kernel cost per decoder layer per step (None for eager: see the calibration)."""
        if self.kernels_per_layer is None or self.kernel_s is None:
            return None
        return self.kernels_per_layer * self.kernel_s


@dataclass(frozen=True, slots=True)
class ThroughputModel:
    """Calibrated coefficients of the step-time model (``data/mfu.json``), in :data:`FEATURES` order.

    ``coefficients[0]`` and ``[1]`` are 1 / efficiency of the matrix products and of attention on the
    reference GPU; the traffic coefficients count passes over each byte at its catalog bandwidth; the
    launch coefficients are host seconds per run.
    """

    coefficients: tuple[float, ...]
    decode_bandwidth_efficiency: float  # achieved / catalog memory bandwidth when streaming weights
    fitted_on: str
    method: str

    @classmethod
    def from_named(cls, named: Mapping[str, float], decode_bandwidth_efficiency: float, fitted_on: str = "",
                   method: str = "") -> ThroughputModel:
        coeffs = tuple(1.0 / float(named[k]) if i in _EFFICIENCIES else float(named[k])
                       for i, k in enumerate(COEFFICIENTS))
        return cls(coeffs, decode_bandwidth_efficiency, fitted_on, method)

    def named(self) -> dict[str, float]:
        return {k: (1.0 / c if i in _EFFICIENCIES else c) for i, (k, c) in enumerate(
            zip(COEFFICIENTS, self.coefficients, strict=True))}

    @property
    def gemm_efficiency(self) -> float:
        return 1.0 / self.coefficients[0]

    @property
    def launch_s_per_layer_pass(self) -> float:
        return self.coefficients[_LAUNCH[0]]

    def assumption(self) -> str:
        n = self.named()
        return (f"time: matrix products at the GPU's achievable matmul fraction ({n['gemm_efficiency']:.0%} on the "
                f"reference H200), attention at {n['attention_efficiency']:.0%} there (scaled by each GPU's "
                "FlashAttention-2 fraction), logits and loss traffic counted kernel by kernel at the measured "
                f"copy bandwidth, elementwise passes (attention scores x{n['score_passes']:.1f}, MLP "
                f"x{n['activation_passes']:.1f}, optimizer x{n['optimizer_passes']:.1f}, dequantization "
                f"x{n['dequant_passes']:.1f}, adapters x{n['adapter_passes']:.1f}) over bandwidth, plus host launch "
                f"cost ({n['launch_s_per_layer_pass'] * 1e3:.2f} ms per layer pass in eager PyTorch); "
                f"{self.method}, {self.fitted_on}")


@cache
def _mfu_document() -> dict[str, Any]:
    text = (resources.files("vramplan") / "data" / "mfu.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    if doc.get("schema") != 2:
        raise VramplanError("the bundled time model (data/mfu.json) is not schema 2; reinstall vramplan")
    return doc


@cache
def load_throughput_model() -> ThroughputModel:
    """The calibrated coefficients bundled in ``data/mfu.json``."""
    cal = _mfu_document()["calibration"]
    fit = cal["fit"]
    return ThroughputModel.from_named(
        cal["coefficients"], float(cal["decode"]["bandwidth_efficiency"]),
        fitted_on=f"fitted on {fit['rows']} measured {fit['gpu']} step times (data/mfu.json)",
        method=str(fit["method"]))


def _generation_of(architecture: str) -> dict[str, Any]:
    gens: dict[str, Any] = _mfu_document()["generations"]
    if architecture in gens:
        return dict(gens[architecture])
    return dict(gens["Hopper"]) | {"sources": {"matmul": f"no efficiency data for the {architecture or 'unknown'} "
                                                        "generation: Hopper's fractions assumed"}}


def gpu_efficiency(gpu: GPU, *, measured_mfu: float | None = None) -> GPUEfficiency:
    """The achievable fractions for ``gpu``: its own matmul and bandwidth figures where published (the bandwidth
    fraction belongs to the GPU's memory: technology and controllers, HBM3e on the H200, GDDR6 on the L40S), else
    its generation's.

    A GPU described by the user (``--gpu-spec`` / ``--gpu custom:…``) may carry its own fractions
    (``matmul_efficiency``, ``attention_efficiency``, ``bandwidth_efficiency`` in its ``tflops_note``-free
    spec); ``measured_mfu`` is the user's measured model FLOPs utilisation (it replaces the compute model).
    """
    if measured_mfu is not None and not 0 < measured_mfu <= 1:
        raise VramplanError(f"--efficiency is a model FLOPs utilisation between 0 and 1, got {measured_mfu!r}")
    custom = _CUSTOM.get(gpu.name)
    return _efficiency(gpu.name, gpu.architecture, measured_mfu, tuple(sorted(custom.items())) if custom else ())


@lru_cache(maxsize=1024)  # a plan search asks tens of thousands of times for the same few GPUs
def _efficiency(name: str, architecture: str, measured_mfu: float | None,
                custom_items: tuple[tuple[str, float], ...]) -> GPUEfficiency:
    """:func:`gpu_efficiency` of what it reads of the GPU (its name, generation and user-given fractions)."""
    gen = _generation_of(architecture)
    srcs = dict(gen.get("sources", {}))
    matmul = float(gen["matmul"])
    attention, bandwidth = float(gen["attention"]), float(gen["bandwidth"])
    own = _mfu_document()["gpus"].get(name)
    if own is not None:
        if "matmul" in own:
            matmul = float(own["matmul"])
            srcs["matmul"] = str(own["source"])
        if "bandwidth" in own:  # the GPU's own memory (technology, controllers) where a copy figure is published
            bandwidth = float(own["bandwidth"])
            srcs["bandwidth"] = str(own["bandwidth_source"])
    custom = dict(custom_items)
    if custom:
        matmul = custom.get("matmul", matmul)
        attention = custom.get("attention", attention)
        bandwidth = custom.get("bandwidth", bandwidth)
        for k in custom:
            srcs[k] = "given by the user"
    fp8 = gen.get("matmul_fp8")
    if custom and "matmul" in custom:
        fp8 = None  # the user's own fraction applies to every dtype
    return GPUEfficiency(name, architecture, matmul, attention, bandwidth,
                         tuple(f"{k}: {v}" for k, v in sorted(srcs.items())), measured_mfu,
                         None if fp8 is None else float(fp8))


# Efficiencies attached to user-described GPUs (by catalog-unique name), filled by vramplan.perf.custom.
_CUSTOM: dict[str, dict[str, float]] = {}


def register_custom_efficiency(name: str, values: Mapping[str, float]) -> None:
    _CUSTOM[name] = {k: float(v) for k, v in values.items()}


@cache
def _reference() -> GPUEfficiency:
    from ..hardware import get_gpu

    return gpu_efficiency(get_gpu(str(_mfu_document()["reference_gpu"])))


def attention_kernel_factor(kernel: str) -> float:
    """Achievable fraction of a fused attention kernel relative to FlashAttention-2's (``data/mfu.json``
    ``attention_kernels``): the per-GPU attention fractions are FlashAttention-2 figures; an older kernel
    (FlashAttention v1, or its Triton port that llm-foundry runs with ``attn_impl: triton``) reaches less."""
    kernels = {k: v for k, v in _mfu_document()["attention_kernels"].items() if isinstance(v, dict)}
    key = kernel.strip().lower()
    if key not in kernels:
        raise UnknownNameError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(sorted(kernels))}")
    return float(kernels[key]["relative"])


def scale_factors(gpu: GPU, dtype: str, attention_kernel: str = "flash2") -> tuple[float, float, float]:
    """(matmul, attention, memory) multipliers of the reference GPU's calibrated terms on ``gpu``: each is
    the reference's achievable fraction over this GPU's (1.0 on the reference GPU). The reference's
    attention runs FlashAttention-2 (PyTorch SDPA's flash backend); ``attention_kernel`` names the fused
    kernel the workload runs on ``gpu``."""
    ref, eff = _reference(), gpu_efficiency(gpu)
    # fp8 GEMMs reach a lower fraction of their (doubled) peak than bf16 ones where that is published
    own = eff.matmul_fp8 if dtype == "fp8" and eff.matmul_fp8 is not None else eff.matmul
    attention = eff.attention * attention_kernel_factor(attention_kernel)
    return ref.matmul / own, ref.attention / attention, ref.bandwidth / eff.bandwidth


def matmul_dtype(gpu: GPU, dtype: str) -> str:
    """The peak an fp8-weight GEMM runs at on ``gpu``: fp8 where the GPU has fp8 tensor cores, else bf16 —
    weight-only there (vLLM quantization/fp8.py falls back to fp8 Marlin before Ada; transformers'
    finegrained_fp8 dequantizes while loading)."""
    if dtype == "fp8" and gpu.peak_tflops("fp8") is None and gpu.peak_tflops("bf16") is not None:
        return "bf16"
    return dtype


def feature_row(work: StepWork, gpu: GPU, *, micro_batches: int = 1,
                attention_kernel: str = "flash2") -> tuple[float, ...] | None:
    """Inputs of the linear step-time model for one optimizer step of ``micro_batches`` x ``work`` on ``gpu``.

    FLOPs become seconds at the GPU's dense peak, bytes seconds at its bandwidth, each scaled by the
    GPU's achievable fraction relative to the reference GPU's; None without a peak.
    """
    dtype = matmul_dtype(gpu, work.dtype)
    peak = gpu.peak_tflops(dtype)
    if peak is None or peak <= 0:
        return None
    fm, fa, fb = scale_factors(gpu, dtype, attention_kernel)
    # the ceiling fraction holds for the shape it was measured on; each GEMM's tile and wave quantization
    # on this GPU's SMs scales it (vramplan.perf.gemm)
    fm /= shape_factor(work.gemm_shapes, gpu)
    flops_per_s = peak * 1e12
    # attention runs 16-bit kernels whatever the weights (FlashAttention, PyTorch SDPA, TensorRT-LLM's context
    # FMHA plugin in fp16/bf16): fp8 weights do not move QK^T and PV to the fp8 peak
    attention_per_s = (gpu.peak_tflops("bf16") or peak) * 1e12 if dtype == "fp8" else flops_per_s
    bw = float(gpu.memory_bandwidth_bytes_per_s)
    m = micro_batches
    return (fm * m * work.gemm_flops / flops_per_s, fa * m * work.attention_flops / attention_per_s,
            fb * m * work.score_bytes / bw, fb * m * work.logits_bytes / bw, fb * m * work.activation_bytes / bw,
            fb * work.optimizer_bytes / bw, fb * m * work.dequant_bytes / bw, fb * m * work.adapter_bytes / bw,
            float(m * work.layer_passes), m * work.expert_passes, float(m * work.adapter_passes))


def engine_profile(name: str) -> EngineProfile:
    """The decode behaviour of a serving engine (``data/mfu.json`` ``engines``)."""
    doc = _mfu_document()
    key = name.strip().lower().replace("_", "-")
    key = {"trtllm": "tensorrt-llm", "trt-llm": "tensorrt-llm", "hf": "transformers", "llamacpp": "llama.cpp",
           "llama-cpp": "llama.cpp", "turbomind": "lmdeploy"}.get(key, key)
    engines: dict[str, Any] = doc["engines"]
    if key not in engines:
        raise UnknownNameError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    e = engines[key]
    mode = str(e["mode"])
    kernel_s = doc["execution_modes"][mode]["kernel_s"]
    return EngineProfile(key, mode, e["kernels_per_layer"], None if kernel_s is None else float(kernel_s),
                         float(e["allreduce_latency_s"]), bool(e["fused_elementwise"]), str(e["source"]),
                         float(e.get("step_s", 0.0)), bool(e.get("fused_attention", False)),
                         float(e.get("kv_cache_copies_per_step", 0.0)), float(e.get("step_layer_passes", 0.0)),
                         str(e.get("allreduce", "custom")), True, int(e.get("custom_allreduce_max_bytes", 0)),
                         float(e.get("host_enqueue_s_per_layer", 0.0)))


def with_measured(eff: GPUEfficiency, mfu: float | None) -> GPUEfficiency:
    return replace(eff, measured_mfu=mfu)
