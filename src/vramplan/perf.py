"""Time and cost: how long a workload runs on a GPU, and what the GPU-hours cost.

Training (one GPU, one micro-batch, then the optimizer step) follows a roofline-style sum of what the
step must do, with the few efficiencies fitted on measured step times (``data/mfu.json``)::

    step_s = executed FLOPs / (peak dense TFLOPS[dtype] x gemm_efficiency)
           + (attention-score, logits, optimizer, dequantization and adapter bytes, each x its fitted
              number of passes) / memory bandwidth
           + layer passes x launch overhead (eager PyTorch runs one layer's kernels per pass)

FLOPs follow Kaplan et al. 2020 (6·N per token: 2·N forward, 4·N backward) and the PaLM paper's
appendix B (attention adds 12·L·H·Q·T per token forward + backward, i.e. 4·L·H·Q·T forward),
with causal attention halved where the kernel skips the masked half (flash / memory-efficient with
``is_causal``; FlashAttention-2, Dao 2023), full recomputation adding one more forward (8·N;
Korthikanti et al. 2022), and frozen weights (LoRA, QLoRA, freeze) skipping their weight-gradient
GEMMs. Model FLOPs utilisation (MFU) is reported as in PaLM (useful 6·N-style FLOPs, without
recomputation, over peak x time) and as in nanoGPT's ``estimate_mfu``.

Inference: prefill is the same sum for one forward pass; decode is the memory-bandwidth roofline
(weights + KV cache read per step over bandwidth x efficiency, or FLOPs if larger), the bound a
serving engine with CUDA graphs approaches. Time x GPU count = GPU-hours, x the catalog's on-demand and
reserved prices = money; a missing price gives no cost (with the reason), never a guess.

Known limits: one calibration GPU (H200) and single-GPU step times; other GPUs scale by their
catalog peak and bandwidth with the same efficiencies, and the launch overhead is taken as host-bound
and equal everywhere. Multi-GPU time adds communication from textbook volumes without overlap (an upper
bound). Tensor-core peaks for GeForce cards are the FP32-accumulate rates the catalog records.
Decode assumes an ideal engine; Hugging Face ``generate()`` in eager mode measured 3-150x slower than
this roofline on the calibration H200 (it is bound by kernel launches).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .blocks import Kernel
from .blocks import attention_kernel as blocks_attention_kernel
from .errors import VramplanError
from .estimator import numerics
from .hardware import GPU
from .memory import ModelStates, lora_params, lora_targets, model_states
from .params import count_params
from .spec import Activation, MLPKind, ModelSpec
from .workload import LogitsMode, Method, Precision, Task, WeightsQuant, Workload

__all__ = [
    "COEFFICIENTS",
    "FEATURES",
    "MEASURED_COPY_EFFICIENCY",
    "MEASURED_GEMM_EFFICIENCY",
    "Cost",
    "DecodeStep",
    "InferenceTime",
    "StepTime",
    "StepWork",
    "ThroughputModel",
    "TrainingTime",
    "attended_keys",
    "attention_kernel",
    "calibration_samples",
    "comm_time_s",
    "compute_dtype",
    "cost_of",
    "decode_seconds",
    "decode_step",
    "decode_work",
    "feature_row",
    "fit_throughput_model",
    "inference_time",
    "inference_work",
    "layer_matmul_weights",
    "link_bandwidth_bytes_per_s",
    "load_throughput_model",
    "refit",
    "ring_allreduce_bytes",
    "step_time",
    "training_time",
    "training_work",
]

_SECONDS_PER_HOUR = 3600.0


# ============================================================================ FLOPs and bytes per step


@lru_cache(maxsize=256)
def layer_matmul_weights(spec: ModelSpec) -> tuple[int, int]:
    """(weights every token multiplies in the decoder layers, in the output side: head and projections).

    MoE layers count the router, the shared expert and ``experts_per_token`` routed experts: the
    active parameters that set the FLOPs (Fedus et al. 2021). Embedding lookups cost no FLOPs; the
    output head does (nanoGPT's ``estimate_mfu`` counts the tied ``wte`` for that reason).
    """
    counts = count_params(spec)
    layers = 0
    for i, layer in enumerate(counts.layers):
        moe = i in spec.moe_layers
        for _name, fin, fout, n in layer.linear_shapes:
            active = spec.experts_per_token if moe and spec.num_experts > 1 and n == spec.num_experts else n
            layers += fin * fout * active
    d = spec.embed_proj_dim or spec.hidden_size
    head = spec.vocab_size * d
    if spec.embed_proj_dim:
        head += 2 * spec.hidden_size * spec.embed_proj_dim  # OPT project_in / project_out
    return layers, head


def _act_bytes(w: Workload) -> int:
    """Bytes per activation element, as the estimator decides it."""
    return numerics(w).act


def attention_kernel(spec: ModelSpec, w: Workload, *, has_mask: bool) -> Kernel:
    """The attention kernel a layer of ``w`` runs (the estimator's own choice)."""
    return blocks_attention_kernel(spec, w.attention, 2 if w.precision.is_amp else _act_bytes(w), has_mask)


def attended_keys(seq: int, window: int | None, skips_masked: bool) -> float:
    """Mean number of keys each query multiplies.

    Kernels that know the mask is causal (flash, memory-efficient with ``is_causal``, or flash with a
    window) skip the masked blocks: (s + 1) / 2 keys on average, fewer with a sliding window
    (FlashAttention-2, Dao 2023, counts causal attention at half the FLOPs). The math and eager paths
    multiply the full square and mask afterwards.
    """
    if not skips_masked:
        return float(seq)
    if window and window < seq:
        return (window * (window + 1) / 2 + (seq - window) * window) / seq
    return (seq + 1) / 2


@dataclass(frozen=True, slots=True)
class _Attention:
    flops_per_token: float  # forward, all layers: 4 x q_dim x attended keys (PaLM appendix B)
    score_elements: int  # materialized (batch, heads, q, k) scores over all layers (math / eager kernels)


def _attention(spec: ModelSpec, w: Workload, batch: int, seq: int) -> _Attention:
    flops = 0.0
    scores = 0
    for i in range(spec.num_layers):
        sliding = i in spec.sliding_layers and bool(spec.sliding_window)
        has_mask = bool(sliding and spec.sliding_window and seq > spec.sliding_window)
        kernel = attention_kernel(spec, w, has_mask=has_mask)
        fused = kernel in (Kernel.FLASH, Kernel.EFFICIENT)
        # SDPA's memory-efficient kernel with an explicit (sliding-window) mask computes every block
        skips = fused and (not has_mask or kernel is Kernel.FLASH)
        keys = attended_keys(seq, spec.sliding_window if sliding else None, skips)
        flops += 4 * spec.q_dim * keys
        if not fused:
            scores += batch * spec.num_heads * seq * seq
    return _Attention(flops, scores)


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one micro-batch step (training) or one prefill (inference) must do; GPU-independent.

    FLOPs are executed FLOPs (recomputation included) split by the kernels that run them; bytes are
    traffic outside the big matrix products, before the fitted pass counts.
    """

    tokens: int
    model_flops: float  # useful FLOPs (PaLM's MFU numerator: no recomputation)
    gemm_flops: float  # executed in cuBLAS matrix products (linears, the head)
    attention_flops: float  # executed in attention (QK^T and PV), all passes
    dtype: str  # catalog throughput key the matrix products run at
    score_bytes: int  # materialized attention scores (math / eager kernels), all passes
    logits_bytes: int  # fp32 logits and the loss over the vocabulary
    activation_bytes: int  # the MLP's elementwise kernels over its intermediate (activation, gating), all passes
    dequant_bytes: int  # 16-bit weight copies made from quantized weights, all passes
    adapter_bytes: int  # LoRA inputs/outputs in fp32 (peft casts to the adapter dtype), all passes
    layer_passes: int  # decoder layers run forward + backward + recomputed
    expert_passes: float  # routed experts run (mean experts hit per MoE layer x layers x passes)
    adapter_passes: int  # adapted linears run (each launches its own small kernels), all passes
    optimizer_bytes: int  # the optimizer step's reads and writes (once per optimizer step)
    gradient_bytes: int  # gradients that data parallelism all-reduces
    parameter_bytes: int  # 16-bit matmul weight bytes (what fully sharded layouts all-gather)
    num_layers: int
    hidden_size: int

    @property
    def executed_flops(self) -> float:
        """What the GPU runs, recomputation included (the hardware FLOPs utilisation numerator)."""
        return self.gemm_flops + self.attention_flops


def _states(spec: ModelSpec, w: Workload) -> ModelStates:
    """:func:`vramplan.memory.model_states`, cached on what it reads (not the batch or the sequence)."""
    return _states_cached(spec, w.with_(batch_size=1, seq_len=1, new_tokens=0, gradient_accumulation=1))


@lru_cache(maxsize=1024)
def _states_cached(spec: ModelSpec, w: Workload) -> ModelStates:
    return model_states(spec, w)


@lru_cache(maxsize=1024)
def _adapters(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> tuple[int, int, int]:
    """(adapter parameters, adapted linears over all layers, sum of their in + out features)."""
    names = lora_targets(spec, targets)
    count = io = 0
    for layer in count_params(spec).layers:
        for name, fin, fout, n in layer.linear_shapes:
            if name in names:
                count += n
                io += (fin + fout) * n
    return lora_params(spec, names, rank), count, io


# Weight formats that are expanded to a 16-bit copy for every matrix product (bitsandbytes nf4; LLM.int8's
# backward); fp8 weights run a scaled fp8 GEMM directly (torch._scaled_mm).
_DEQUANTIZED = frozenset({WeightsQuant.NF4, WeightsQuant.INT8})


def compute_dtype(w: Workload) -> str:
    """The catalog throughput key the matrix products run at.

    fp32 runs on TF32 tensor cores: the calibration harness (``vramplan.measure``) and the Hugging Face
    Trainer's ``--tf32`` set ``torch.backends.cuda.matmul.allow_tf32``. nf4 and int8 weights are
    dequantized to the 16-bit compute dtype (bitsandbytes' ``bnb_4bit_compute_dtype``; LLM.int8's mixed
    decomposition is counted at 16-bit speed, conservatively); fp8 weights run fp8 GEMMs, which need fp8
    tensor cores (a GPU without an fp8 figure gets no time).
    """
    if w.base_quant is WeightsQuant.FP8:
        return "fp8"
    if w.precision is Precision.FP32 and w.base_quant is WeightsQuant.NONE and w.method is not Method.QLORA:
        return "tf32"
    if w.precision in (Precision.FP16, Precision.AMP_FP16):
        return "fp16"
    return "bf16"


def _optimizer_traffic(spec: ModelSpec, w: Workload) -> tuple[int, int]:
    """(bytes the optimizer step reads and writes, gradient bytes).

    Each state is read and written, each gradient read, each trainable parameter read and written,
    each step temporary written and read (torch.optim's foreach AdamW: ``_multi_tensor_adamw``).
    """
    st = _states(spec, w)
    elem = 4 if w.uses_adapters else w.precision.param_bytes
    traffic = 2 * (st.optimizer_state + st.step_temporaries) + st.gradients + 2 * st.trainable_parameters * elem
    return traffic, st.gradients


def training_work(spec: ModelSpec, w: Workload) -> StepWork:
    """FLOPs and traffic of one training micro-batch of ``w`` (its batch size and sequence length)."""
    if not w.is_train:
        raise VramplanError("training_work needs a training workload (task train)")
    return _training_work(spec, w)


def _experts_hit(spec: ModelSpec, tokens: int) -> float:
    """Mean routed experts a layer runs for ``tokens`` tokens: E (1 - (1 - k/E)^tokens) under uniform routing."""
    if not spec.is_moe or spec.num_experts <= 0:
        return 0.0
    e, k = spec.num_experts, spec.experts_per_token
    return e * (1 - (1 - k / e) ** tokens)


def _mlp_elementwise_bytes_per_token(spec: ModelSpec, w: Workload) -> int:
    """Bytes the MLP's elementwise kernels write per token, all layers (one pass).

    Each kernel writes one intermediate-sized tensor: the activation (transformers' ``gelu_new`` is a
    composite of 8 kernels, every other activation one) and, for gated MLPs, the gate x up product.
    """
    kernels = (8 if spec.activation is Activation.GELU_NEW else 1) + (1 if spec.mlp is MLPKind.GATED else 0)
    total = 0
    for i in range(spec.num_layers):
        if i in spec.moe_layers:
            total += spec.experts_per_token * spec.moe_intermediate_size + spec.shared_expert_intermediate_size
        else:
            total += spec.intermediate_size
    return total * kernels * _act_bytes(w)


@lru_cache(maxsize=4096)
def _training_work(spec: ModelSpec, w: Workload) -> StepWork:
    b, s = w.batch_size, w.seq_len
    tokens = b * s
    L = spec.num_layers
    n_layers, n_head = layer_matmul_weights(spec)
    att = _attention(spec, w, b, s)
    a = att.flops_per_token
    ckpt = w.gradient_checkpointing
    adapters = n_adapted = adapted_io = 0
    gemm: float
    if w.method is Method.FULL:
        # Kaplan et al. 2020: 2N forward + 4N backward (input and weight gradients)
        back_layers = L
        gemm = 6 * (n_layers + n_head)
    elif w.method in (Method.LORA, Method.QLORA):
        # frozen base: forward 2N, backward only the input gradients 2N; adapters train (6 x their size)
        adapters, n_adapted, adapted_io = _adapters(spec, w.lora_targets, w.lora_rank)
        back_layers = L
        gemm = 4 * (n_layers + n_head) + 6 * adapters
    else:
        # freeze: the last k layers get 2N + 4N; below them autograd stops; a tied head stays frozen (2N back)
        back_layers = _states(spec, w).trainable_layers
        head_back = 2 if spec.tie_word_embeddings else 4
        gemm = 2 * (n_layers + n_head) + 4 * n_layers * back_layers / L + head_back * n_head
    frac = back_layers / L if L else 0.0
    attention = a * (1 + 2 * frac)  # PaLM appendix B: backward twice the forward
    model_flops = (gemm + attention) * tokens
    if ckpt:  # non-reentrant checkpointing recomputes each backpropagated layer's forward once
        gemm += (2 * n_layers + 2 * adapters) * frac
        attention += a * frac
    passes = L + back_layers + (back_layers if ckpt else 0)
    per_layer = passes / L if L else 0.0
    opt_bytes, grad_bytes = _optimizer_traffic(spec, w)
    return StepWork(
        tokens=tokens, model_flops=model_flops, gemm_flops=gemm * tokens, attention_flops=attention * tokens,
        dtype=compute_dtype(w),
        score_bytes=int(att.score_elements * 4 * per_layer),  # fp32 softmax on these paths
        logits_bytes=tokens * spec.vocab_size * 4 * 3,  # logits.float(), log_softmax, its gradient
        activation_bytes=int(tokens * _mlp_elementwise_bytes_per_token(spec, w) * per_layer),
        dequant_bytes=int(n_layers * 4 * per_layer) if w.base_quant in _DEQUANTIZED else 0,
        adapter_bytes=int(tokens * adapted_io * 4 * per_layer),
        layer_passes=passes, expert_passes=_experts_hit(spec, tokens) * len(spec.moe_layers) * per_layer,
        adapter_passes=round(n_adapted * per_layer), optimizer_bytes=opt_bytes, gradient_bytes=grad_bytes,
        parameter_bytes=2 * (n_layers + n_head), num_layers=L, hidden_size=spec.hidden_size)


def inference_work(spec: ModelSpec, w: Workload) -> StepWork:
    """FLOPs and traffic of the prefill of ``w``: one forward over batch x prompt tokens."""
    return _inference_work(spec, w.with_(task=Task.INFER) if w.is_train else w)


@lru_cache(maxsize=4096)
def _inference_work(spec: ModelSpec, w: Workload) -> StepWork:
    b, s = w.batch_size, w.seq_len
    tokens = b * s
    n_layers, n_head = layer_matmul_weights(spec)
    att = _attention(spec, w, b, s)
    logit_tokens = b if w.logits is LogitsMode.LAST else tokens
    gemm = 2 * n_layers * tokens + 2 * n_head * logit_tokens
    attention = att.flops_per_token * tokens
    return StepWork(
        tokens=tokens, model_flops=gemm + attention, gemm_flops=gemm, attention_flops=attention,
        dtype=compute_dtype(w), score_bytes=att.score_elements * 4,
        logits_bytes=logit_tokens * spec.vocab_size * 4,
        activation_bytes=tokens * _mlp_elementwise_bytes_per_token(spec, w),
        dequant_bytes=n_layers * 4 if w.base_quant in _DEQUANTIZED else 0, adapter_bytes=0,
        layer_passes=spec.num_layers, expert_passes=_experts_hit(spec, tokens) * len(spec.moe_layers),
        adapter_passes=0, optimizer_bytes=0, gradient_bytes=0, parameter_bytes=2 * (n_layers + n_head),
        num_layers=spec.num_layers, hidden_size=spec.hidden_size)


# ============================================================================ the fitted throughput model


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


@dataclass(frozen=True, slots=True)
class ThroughputModel:
    """Coefficients of the step-time model (``data/mfu.json``), in :data:`FEATURES` order.

    ``coefficients[0]`` and ``[1]`` are 1 / efficiency of the matrix products and of attention; the
    traffic coefficients count passes over each byte; the launch coefficients are seconds per run.
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

    def assumption(self) -> str:
        n = self.named()
        return (f"time: matrix products at {n['gemm_efficiency']:.0%} and attention at "
                f"{n['attention_efficiency']:.0%} of the GPU's dense peak for the compute dtype, plus memory "
                f"traffic (attention scores x{n['score_passes']:.1f}, logits x{n['logits_passes']:.1f}, MLP "
                f"elementwise x{n['activation_passes']:.1f}, optimizer "
                f"x{n['optimizer_passes']:.1f}, dequantization x{n['dequant_passes']:.1f}, adapters "
                f"x{n['adapter_passes']:.1f}) over bandwidth, plus launch overhead "
                f"({n['launch_s_per_layer_pass'] * 1e3:.2f} ms per layer pass); {self.method}, {self.fitted_on}")


def feature_row(work: StepWork, gpu: GPU, *, micro_batches: int = 1) -> tuple[float, ...] | None:
    """Inputs of the linear step-time model for one optimizer step of ``micro_batches`` x ``work`` on ``gpu``.

    FLOPs become seconds at the GPU's dense peak, bytes seconds at its bandwidth; None without a peak.
    """
    peak = gpu.peak_tflops(work.dtype)
    if peak is None or peak <= 0:
        return None
    flops_per_s = peak * 1e12
    bw = float(gpu.memory_bandwidth_bytes_per_s)
    m = micro_batches
    return (m * work.gemm_flops / flops_per_s, m * work.attention_flops / flops_per_s, m * work.score_bytes / bw,
            m * work.logits_bytes / bw, m * work.activation_bytes / bw, work.optimizer_bytes / bw,
            m * work.dequant_bytes / bw, m * work.adapter_bytes / bw, float(m * work.layer_passes),
            m * work.expert_passes, float(m * work.adapter_passes))


@cache
def load_throughput_model() -> ThroughputModel:
    """The fitted coefficients bundled in ``data/mfu.json``."""
    doc = _mfu_document()
    fit = doc["fit"]
    return ThroughputModel.from_named(
        doc["coefficients"], float(doc["decode"]["bandwidth_efficiency"]),
        fitted_on=f"fitted on {fit['rows']} measured {fit['gpu']} step times (data/mfu.json)",
        method=str(fit["method"]))


@cache
def _mfu_document() -> dict[str, Any]:
    text = (resources.files("vramplan") / "data" / "mfu.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    if doc.get("schema") != 1:
        raise VramplanError("the bundled throughput model (data/mfu.json) is not schema 1; reinstall vramplan")
    return doc


def fit_throughput_model(samples: Sequence[tuple[tuple[float, ...], float]],
                         fixed: Mapping[int, float] | None = None, *, minimax: bool = True,
                         iterations: int = 300) -> tuple[float, ...]:
    """Coefficients c >= 0 of ``step_s = x . c`` from (:func:`feature_row`, measured seconds) samples.

    The error of a sample is relative: (x . c) / t - 1. ``minimax`` minimises the worst one (a Chebyshev
    fit, the measure the acceptance test applies) by Lawson's iteratively reweighted least squares
    (Lawson 1961; Rice & Usow 1968): weights grow with each sample's error and the best iterate is kept.
    Otherwise it is plain least squares. Each weighted problem is solved by Lawson & Hanson's active-set
    NNLS (Solving Least Squares Problems, 1974, ch. 23). ``fixed`` pins coefficients by index (the
    matrix-product efficiency is a measured ceiling, not a free parameter). Pure Python, deterministic.
    """
    if not samples:
        raise VramplanError("no samples to fit")
    fixed = dict(fixed or {})
    n = len(samples[0][0])
    free = [j for j in range(n) if j not in fixed]
    rows = [[feats[j] / t for j in free] for feats, t in samples]
    rhs = [1.0 - sum(feats[j] * c for j, c in fixed.items()) / t for feats, t in samples]
    weights = [1.0 / len(rows)] * len(rows)
    best: tuple[float, list[float]] | None = None
    for _ in range(iterations if minimax else 1):
        sol = _weighted_nnls(rows, rhs, weights)
        errors = [abs(sum(a * x for a, x in zip(r, sol, strict=True)) - y) for r, y in zip(rows, rhs, strict=True)]
        worst = max(errors)
        if best is None or worst < best[0]:
            best = (worst, sol)
        weights = [max(wt * e, 1e-12) for wt, e in zip(weights, errors, strict=True)]
        total = sum(weights)
        weights = [wt / total for wt in weights]
    assert best is not None
    out = [0.0] * n
    for j, c in fixed.items():
        out[j] = c
    for j, c in zip(free, best[1], strict=True):
        out[j] = c
    return tuple(out)


def _weighted_nnls(rows: list[list[float]], rhs: list[float], weights: list[float]) -> list[float]:
    k = len(rows[0])
    ata = [[sum(wt * r[i] * r[j] for r, wt in zip(rows, weights, strict=True)) for j in range(k)] for i in range(k)]
    atb = [sum(wt * r[i] * y for r, y, wt in zip(rows, rhs, weights, strict=True)) for i in range(k)]
    return _nnls_normal(ata, atb)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            raise VramplanError("singular system in the throughput fit")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _nnls_normal(ata: list[list[float]], atb: list[float]) -> list[float]:
    """Lawson-Hanson NNLS given AᵀA and Aᵀb."""
    n = len(atb)
    scale = max(1.0, max(abs(v) for v in atb))
    x = [0.0] * n
    passive: list[int] = []
    for _ in range(20 * n + 20):
        grad = [atb[i] - sum(ata[i][j] * x[j] for j in range(n)) for i in range(n)]
        active = [i for i in range(n) if i not in passive]
        if not active or max(grad[i] for i in active) <= 1e-10 * scale:
            break
        passive.append(max(active, key=lambda i: grad[i]))
        while True:
            sub = _solve([[ata[i][j] for j in passive] for i in passive], [atb[i] for i in passive])
            if min(sub) > 0:
                x = [0.0] * n
                for i, v in zip(passive, sub, strict=True):
                    x[i] = v
                break
            alpha = min(x[i] / (x[i] - v) for i, v in zip(passive, sub, strict=True) if v <= 0)
            for i, v in zip(passive, sub, strict=True):
                x[i] += alpha * (v - x[i])
            passive = [i for i in passive if x[i] > 1e-15]
            x = [x[i] if i in passive else 0.0 for i in range(n)]
            if not passive:
                break
    return x


# ============================================================================ step, training and inference time


@dataclass(frozen=True, slots=True)
class StepTime:
    """One optimizer step on each GPU of a layout, in seconds, by what bounds it."""

    compute_s: float
    memory_s: float
    launch_s: float
    optimizer_s: float
    comm_s: float
    micro_batches: int

    @property
    def total_s(self) -> float:
        return self.micro_batches * (self.compute_s + self.memory_s + self.launch_s) + self.optimizer_s + self.comm_s

    def to_dict(self) -> dict[str, float]:
        return {"total_s": self.total_s, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "launch_s": self.launch_s, "optimizer_s": self.optimizer_s, "comm_s": self.comm_s,
                "micro_batches": self.micro_batches}


def step_time(work: StepWork, gpu: GPU, model: ThroughputModel | None = None, *, micro_batches: int = 1,
              split: int = 1, comm_s: float = 0.0) -> StepTime | None:
    """Seconds of one optimizer step of ``micro_batches`` x ``work`` on ``gpu``; None without a peak figure.

    ``split`` divides each GPU's FLOPs and traffic (tensor / pipeline parallel degree).
    """
    m = model or load_throughput_model()
    row = feature_row(work, gpu)
    if row is None:
        return None
    c = m.coefficients
    compute = sum(row[i] * c[i] for i in _COMPUTE) / split
    memory = sum(row[i] * c[i] for i in _MEMORY) / split
    launch = sum(row[i] * c[i] for i in _LAUNCH)
    optimizer = row[_OPTIMIZER] * c[_OPTIMIZER] / split
    return StepTime(compute, memory, launch, optimizer, comm_s, micro_batches)


def link_bandwidth_bytes_per_s(gpu: GPU, gpus: int) -> float | None:
    """One direction of the GPU-to-GPU link used by ``gpus`` GPUs in one node.

    The catalog gives both directions combined. A 2-way bridge (NVLink bridge on GeForce/PCIe cards)
    joins only pairs; beyond two GPUs traffic crosses PCIe: 2**(gen-3) x 15.75 GB/s per direction for
    x16 (PCI-SIG: 8, 16, 32 GT/s per lane with 128b/130b coding for gen 3, 4, 5).
    """
    ic = gpu.interconnect
    if gpus > 2 and "2-way" in ic.kind:
        if ic.pcie_gen is None:
            return None
        return 15.75e9 * 2.0 ** (ic.pcie_gen - 3)
    if ic.bandwidth_bytes_per_s is None:
        return None
    return ic.bandwidth_bytes_per_s / 2


def comm_time_s(bytes_per_gpu: float, gpu: GPU, gpus: int) -> float | None:
    """Seconds to move ``bytes_per_gpu`` over each GPU's link (no overlap with compute: an upper bound)."""
    if gpus <= 1 or bytes_per_gpu <= 0:
        return 0.0
    bw = link_bandwidth_bytes_per_s(gpu, gpus)
    if bw is None:
        return None
    return bytes_per_gpu / bw


def ring_allreduce_bytes(size: float, gpus: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of ``size`` bytes: 2 (n - 1) / n x size (Patarasuk & Yuan 2009)."""
    return 2 * (gpus - 1) / gpus * size if gpus > 1 else 0.0


@dataclass(frozen=True, slots=True)
class Cost:
    """Money for ``gpu_hours`` at the catalog's (or the user's) prices; None with ``reason`` when unpriced."""

    gpu_hours: float
    on_demand_usd: float | None
    reserved_usd: float | None
    on_demand_usd_per_hour: float | None
    reserved_usd_per_hour: float | None
    price_source: str
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_hours": self.gpu_hours, "on_demand_usd": self.on_demand_usd, "reserved_usd": self.reserved_usd,
                "on_demand_usd_per_gpu_hour": self.on_demand_usd_per_hour,
                "reserved_usd_per_gpu_hour": self.reserved_usd_per_hour, "price_source": self.price_source,
                "reason": self.reason}


def cost_of(gpu: GPU, gpu_hours: float) -> Cost:
    """GPU-hours times the per-GPU-hour prices; a missing price stays missing, with the reason."""
    p = gpu.price
    od = None if p.on_demand is None else gpu_hours * p.on_demand
    rs = None if p.reserved is None else gpu_hours * p.reserved
    reasons = []
    if p.on_demand is None:
        reasons.append(f"no on-demand price for {gpu.display_name} in the catalog ({p.source})")
    if p.reserved is None:
        reasons.append(f"no reserved price for {gpu.display_name}")
    return Cost(gpu_hours, od, rs, p.on_demand, p.reserved, p.source, "; ".join(reasons) or None)


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

    @property
    def time_hours(self) -> float | None:
        return None if self.time_s is None else self.time_s / _SECONDS_PER_HOUR

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "gpu_count": self.gpu_count, "tokens": self.tokens,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps,
                "step": self.step.to_dict() if self.step else None, "time_s": self.time_s,
                "time_hours": self.time_hours, "tokens_per_s": self.tokens_per_s, "model_flops": self.model_flops,
                "mfu": self.mfu, "hfu": self.hfu, "cost": self.cost.to_dict() if self.cost else None,
                "reason": self.reason, "assumptions": list(self.assumptions)}


def training_time(spec: ModelSpec, w: Workload, gpu: GPU, *, tokens: int, gpus: int = 1,
                  comm_bytes_per_step: float | None = None, split: int = 1,
                  model: ThroughputModel | None = None) -> TrainingTime:
    """Time and cost of training ``tokens`` tokens with ``w`` (micro-batch ``batch_size``, accumulation
    ``gradient_accumulation``) data-parallel over ``gpus`` GPUs of one node.

    ``comm_bytes_per_step``: bytes each GPU sends per optimizer step (default: a ring all-reduce of the
    gradients when ``gpus > 1``). ``split``: tensor/pipeline degree dividing each GPU's work.
    """
    if tokens < 1:
        raise VramplanError(f"tokens must be at least 1, got {tokens}")
    m = model or load_throughput_model()
    work = training_work(spec, w)
    replicas = max(1, gpus // split)
    per_step = replicas * w.gradient_accumulation * work.tokens
    steps = math.ceil(tokens / per_step)
    assumptions = [m.assumption(), _flops_assumption(w), _dtype_assumption(work.dtype)]
    comm_bytes = ring_allreduce_bytes(work.gradient_bytes, replicas) if comm_bytes_per_step is None \
        else comm_bytes_per_step
    comm = comm_time_s(comm_bytes, gpu, gpus)
    if gpus > 1:
        assumptions.append("multi-GPU: communication not overlapped with compute (an upper bound); "
                           f"{link_bandwidth_bytes_per_s(gpu, gpus) or 0:.3g} B/s per direction per GPU")
    st = None if comm is None else step_time(work, gpu, m, micro_batches=w.gradient_accumulation, split=split,
                                             comm_s=comm)
    run_flops = work.model_flops * w.gradient_accumulation * replicas * steps
    if st is None:
        reason = (f"no dense {work.dtype} throughput for {gpu.display_name} in the catalog" if comm is not None
                  else f"no interconnect bandwidth for {gpu.display_name} in the catalog")
        return TrainingTime(gpu.name, gpus, tokens, per_step, steps, None, None, None, run_flops, None, None, None,
                            tuple(assumptions), reason)
    time_s = steps * st.total_s
    peak = gpu.peak_tflops(work.dtype) or 0.0
    mfu = run_flops / (time_s * gpus * peak * 1e12)
    hfu = mfu * work.executed_flops / work.model_flops
    cost = cost_of(gpu, time_s * gpus / _SECONDS_PER_HOUR)
    return TrainingTime(gpu.name, gpus, tokens, per_step, steps, st, time_s, steps * per_step / time_s, run_flops,
                        mfu, hfu, cost, tuple(assumptions), cost.reason)


def _flops_assumption(w: Workload) -> str:
    base = {Method.FULL: "6N per token (Kaplan et al. 2020)",
            Method.LORA: "4N per token: frozen base, forward 2N + input gradients 2N, no weight gradients",
            Method.QLORA: "4N per token: frozen 4-bit base dequantized per pass, no weight gradients",
            Method.FREEZE: "2N forward + 4N backward through the trainable top layers only"}[w.method]
    extra = " + one recomputed forward (2N) per token (gradient checkpointing)" if w.gradient_checkpointing else ""
    return (f"FLOPs: {base}{extra}; attention 12·L·H·Q·T per token forward+backward (PaLM appendix B), halved "
            "for causal kernels that skip the masked half")


def _dtype_assumption(dtype: str) -> str:
    note = " (fp32 matmuls on TF32 tensor cores: allow_tf32 as the calibration harness sets it)" \
        if dtype == "tf32" else ""
    return f"peak: the catalog's dense {dtype} TFLOPS{note}"


# ---------------------------------------------------------------------------- inference


def _kv_bytes_per_token(spec: ModelSpec, w: Workload, context: int) -> int:
    """Keys and values one sequence holds at ``context`` tokens (sliding layers keep only the window)."""
    elem = _act_bytes(w)
    total = 0
    for i in range(spec.num_layers):
        length = context
        if i in spec.sliding_layers and spec.sliding_window:
            length = min(context, spec.sliding_window)
        total += 2 * spec.num_kv_heads * spec.head_dim * elem * length
    return total


def _weights_read_per_step(spec: ModelSpec, w: Workload, batch: int) -> int:
    """Weight bytes one decode step reads: every dense weight, and for MoE the experts the batch routes to.

    With ``k`` of ``E`` experts per token, a batch of ``b`` tokens touches E (1 - (1 - k/E)^b) experts of
    a layer on average (uniform routing).
    """
    st = _states(spec, w.with_(task=Task.INFER) if w.is_train else w)
    total = st.weights + st.master_weights + st.quant_constants
    if not spec.is_moe:
        return total
    e, k = spec.num_experts, spec.experts_per_token
    touched = e * (1 - (1 - k / e) ** batch)
    expert_params = 0
    for i, layer in enumerate(count_params(spec).layers):
        if i in spec.moe_layers:
            expert_params += sum(fin * fout * n for _, fin, fout, n in layer.linear_shapes if n == e)
    per_param = total / max(1, count_params(spec).total)
    return int(total - expert_params * per_param * (1 - touched / e))


@dataclass(frozen=True, slots=True)
class DecodeStep:
    bytes_read: int
    flops: float
    seconds: float | None
    bound: str  # "memory" or "compute"


def decode_work(spec: ModelSpec, w: Workload, *, context: int, batch: int) -> tuple[int, float]:
    """(bytes read, FLOPs) of one decode step of ``batch`` sequences at ``context`` tokens: every weight
    (the experts the batch routes to, for MoE) and the batch's KV cache are read once."""
    bytes_read = _weights_read_per_step(spec, w, batch) + batch * _kv_bytes_per_token(spec, w, context)
    n_layers, n_head = layer_matmul_weights(spec)
    flops = batch * (2 * (n_layers + n_head) + 4 * spec.q_dim * spec.num_layers * context)
    return bytes_read, float(flops)


def decode_seconds(bytes_read: float, flops: float, gpu: GPU, dtype: str,
                   model: ThroughputModel | None = None) -> tuple[float | None, str]:
    """Roofline time of a decode step: max(bytes / (bandwidth x efficiency), FLOPs / (peak x efficiency))."""
    m = model or load_throughput_model()
    peak = gpu.peak_tflops(dtype)
    if peak is None:
        return None, "unknown"
    t_mem = bytes_read / (gpu.memory_bandwidth_bytes_per_s * m.decode_bandwidth_efficiency)
    t_fl = flops / (peak * 1e12 * m.gemm_efficiency)
    return max(t_mem, t_fl), ("memory" if t_mem >= t_fl else "compute")


def decode_step(spec: ModelSpec, w: Workload, gpu: GPU, *, context: int, batch: int,
                model: ThroughputModel | None = None) -> DecodeStep:
    """One decode step of ``batch`` sequences at ``context`` tokens on ``gpu`` (roofline)."""
    bytes_read, flops = decode_work(spec, w, context=context, batch=batch)
    seconds, bound = decode_seconds(bytes_read, flops, gpu, compute_dtype(w), model)
    return DecodeStep(bytes_read, flops, seconds, bound)


@dataclass(frozen=True, slots=True)
class InferenceTime:
    """Prefill latency and decode throughput of ``batch`` concurrent requests on one GPU (or replica)."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "decode_s_per_token": self.decode_s_per_token, "decode_tokens_per_s": self.decode_tokens_per_s,
                "request_s": self.request_s, "tokens_per_s": self.tokens_per_s, "decode_bound": self.decode_bound,
                "reason": self.reason, "assumptions": list(self.assumptions)}


def inference_time(spec: ModelSpec, w: Workload, gpu: GPU, *, split: int = 1,
                   model: ThroughputModel | None = None) -> InferenceTime:
    """Prefill (FLOPs at the fitted efficiency) and decode (bandwidth roofline) of ``w`` on ``gpu``.

    ``split`` (tensor-parallel degree) divides each GPU's FLOPs and bytes; communication is not counted.
    """
    m = model or load_throughput_model()
    work = inference_work(spec, w)
    assumptions = (
        m.assumption(),
        f"decode: memory-bandwidth roofline at {m.decode_bandwidth_efficiency:.0%} of the catalog bandwidth "
        "(weights + KV cache read every step), an ideal engine with CUDA graphs; Hugging Face generate() in "
        "eager mode is launch-bound and measured 3-150x slower on the calibration H200",
        _dtype_assumption(work.dtype),
    )
    st = step_time(work, gpu, m, split=split)
    b, s, n = w.batch_size, w.seq_len, w.new_tokens
    dec = decode_step(spec, w, gpu, context=s + n // 2, batch=b, model=m)
    if st is None or dec.seconds is None:
        return InferenceTime(gpu.name, b, s, n, None, None, None, None, None, dec.bound, assumptions,
                             f"no dense {work.dtype} throughput for {gpu.display_name} in the catalog")
    prefill = st.total_s
    per_step = dec.seconds / split
    request = prefill + n * per_step
    return InferenceTime(gpu.name, b, s, n, prefill, per_step, b / per_step, request,
                         b * n / request if n else None, dec.bound, assumptions)



# ============================================================================ calibration (refit from measurements)

# Pinned, not fitted: an 8192x8192x8192 bf16 matrix product ran at 788 TFLOP/s (random data, PyTorch
# 2.11) on the H200 machine lent to this workplace (device notes), 2026-10-28: 0.796 of the catalog's
# 989.5 TFLOPS dense bf16 peak.
MEASURED_GEMM_EFFICIENCY = 788.0 / 989.5
# A device-to-device copy moved 4.3 TB/s (read + written) on the same kind of machine: 0.896 of 4.8 TB/s.
MEASURED_COPY_EFFICIENCY = 4.3 / 4.8


def calibration_samples(csv_path: str | Path, gpu: GPU) -> list[tuple[str, tuple[float, ...], float]]:
    """(case name, :func:`feature_row`, measured step seconds) of every language-model training row of a
    calibration ``measured.csv`` (configs in the ``configs/`` folder beside it)."""
    from .calibration import read_rows, workload_of_row
    from .hfconfig import load_config_file

    path = Path(csv_path)
    out = []
    for row in read_rows(path):
        w = workload_of_row(row)
        if w is None or not w.is_train or not row.get("step_s") or float(row["step_s"]) <= 0:
            continue
        spec = load_config_file(path.parent / "configs" / f"{row['model']}.json")
        feats = feature_row(training_work(spec, w), gpu, micro_batches=w.gradient_accumulation)
        if feats is None:
            raise VramplanError(f"{row['name']}: no {compute_dtype(w)} peak for {gpu.name}")
        out.append((row["name"], feats, float(row["step_s"])))
    return out


def refit(csv_paths: Sequence[str | Path], gpu_name: str = "h200") -> dict[str, Any]:
    """Fit the step-time model on measured step times; returns the ``coefficients`` and ``fit`` sections."""
    import hashlib

    from .hardware import get_gpu

    gpu = get_gpu(gpu_name)
    samples = [s for p in csv_paths for s in calibration_samples(p, gpu)]
    coeffs = fit_throughput_model([(f, t) for _, f, t in samples], fixed={0: 1.0 / MEASURED_GEMM_EFFICIENCY})
    model = ThroughputModel(coeffs, MEASURED_COPY_EFFICIENCY, "", "")
    errors = {name: sum(x * c for x, c in zip(f, coeffs, strict=True)) / t - 1 for name, f, t in samples}
    files = {}
    for p in csv_paths:
        data = Path(p).read_bytes()
        files[Path(p).as_posix()] = hashlib.sha256(data).hexdigest()
    return {
        "coefficients": {k: round(v, 9) for k, v in model.named().items()},
        "fit": {
            "method": ("minimax relative error (Lawson IRLS over NNLS, 300 iterations, best kept), matrix-product "
                       "efficiency pinned at the measured ceiling"),
            "gpu": gpu.name, "rows": len(samples), "files": files,
            "max_abs_rel_error": round(max(abs(e) for e in errors.values()), 4),
            "rms_rel_error": round(math.sqrt(sum(e * e for e in errors.values()) / len(errors)), 4),
            "residuals": {k: round(v, 4) for k, v in sorted(errors.items())},
        },
    }


if __name__ == "__main__":  # python -m vramplan.perf tests/data/calibration/measured.csv ...
    import sys

    print(json.dumps(refit(sys.argv[1:] or ["tests/data/calibration/measured.csv",
                                            "tests/data/h200-grid/measured.csv"]), indent=1))
