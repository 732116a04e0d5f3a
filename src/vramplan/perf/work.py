"""What a step must do, independent of the GPU: FLOPs by kernel family and bytes of memory traffic.

FLOPs follow Kaplan et al. 2020 (6·N per token: 2·N forward, 4·N backward) and the PaLM paper's
appendix B (attention adds 12·L·H·Q·T per token forward + backward, i.e. 4·L·H·Q·T forward; a fused
kernel executes 2.5 x the forward in backward, recomputing QK^T: FlashAttention-2, Algorithm 2),
with causal attention halved where the kernel skips the masked half (flash / memory-efficient with
``is_causal``; FlashAttention-2, Dao 2023), full recomputation adding one more forward (8·N;
Korthikanti et al. 2022), and frozen weights (LoRA, QLoRA, freeze) skipping their weight-gradient
GEMMs. Model FLOPs utilisation (MFU) is reported as in PaLM (useful 6·N-style FLOPs, without
recomputation, over peak x time) and as in nanoGPT's ``estimate_mfu``.

Decode reads every weight (the experts the batch routes to, for MoE; of an embedding table, the rows it looks up)
and the batch's KV cache once per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from ..blocks import Kernel, mask_always, own_falcon_attention, sdpa_repeats_kv, window_masked
from ..blocks import attention_kernel as blocks_attention_kernel
from ..errors import VramplanError
from ..estimator import numerics, runs_as
from ..memory import ModelStates, lora_params, lora_targets, model_states
from ..params import count_params
from ..spec import ATTENTION_MIXERS, Activation, MLPKind, ModelSpec
from ..ssm import ssm_state_bytes
from ..workload import Attention, LogitsMode, Method, Precision, Task, WeightsQuant, Workload
from .gemm import GemmShape

__all__ = ["StepWork", "attended_keys", "attention_kernel", "compute_dtype", "decode_work", "dequantized_weights",
           "fp8_activation_quant", "inference_work", "kv_bytes_per_token", "layer_matmul_weights",
           "logits_bytes_per_element", "mlp_elementwise_kernels", "repeated_kv_bytes", "training_work",
           "weights_read_per_step"]


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
    return blocks_attention_kernel(spec, runs_as(spec, w).attention, 2 if w.precision.is_amp else _act_bytes(w),
                                   has_mask, w.transformers_release)


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


# Backward FLOPs of attention per forward FLOP. The math / eager path multiplies twice (the gradients of QK^T and
# of PV, two products each: PaLM appendix B's "backward twice the forward"). A fused flash / memory-efficient
# kernel keeps no scores, so its backward first recomputes S = QK^T from Q and K and then runs the four gradient
# products: 5 products against the forward's 2, i.e. 2.5 x the forward (Dao 2023, FlashAttention-2, Algorithm 2;
# its benchmark counts backward FLOPs as 2.5 x forward, and its published efficiencies are on that count).
BACKWARD_PER_FORWARD_MATH = 2.0
BACKWARD_PER_FORWARD_FUSED = 2.5


@dataclass(frozen=True, slots=True)
class _Attention:
    flops_per_token: float  # forward, all layers: 4 x q_dim x attended keys (PaLM appendix B)
    score_elements: int  # materialized (batch, heads, q, k) scores over all layers (math / eager kernels)
    backward_flops_per_token: float = 0.0  # executed in backward, all layers (fused kernels recompute QK^T)


def _attention(spec: ModelSpec, w: Workload, batch: int, seq: int, *, engine_fused: bool = False) -> _Attention:
    """Attention work of one pass; ``engine_fused``: a serving engine runs its own fused causal kernel
    (FlashAttention, FlashInfer, TensorRT-LLM's context FMHA) whatever the Hugging Face model supports."""
    flops = 0.0
    backward = 0.0
    scores = 0
    always = mask_always(spec, w.transformers_release) and runs_as(spec, w).attention is not Attention.FLASH
    kernels: dict[bool, Kernel] = {}  # the kernel depends on the layer only through its mask
    for i in range(spec.num_layers):
        sliding = i in spec.sliding_layers and bool(spec.sliding_window)
        has_mask = (sliding and window_masked(spec, seq)) or always
        if has_mask not in kernels:
            kernels[has_mask] = Kernel.FLASH if engine_fused else attention_kernel(spec, w, has_mask=has_mask)
        kernel = kernels[has_mask]
        fused = kernel in (Kernel.FLASH, Kernel.EFFICIENT)
        # SDPA's memory-efficient kernel with an explicit (sliding-window) mask computes every block
        skips = fused and (not has_mask or kernel is Kernel.FLASH)
        keys = attended_keys(seq, spec.sliding_window if sliding else None, skips)
        flops += 4 * spec.q_dim * keys
        backward += 4 * spec.q_dim * keys * (BACKWARD_PER_FORWARD_FUSED if fused else BACKWARD_PER_FORWARD_MATH)
        if not fused:
            scores += batch * spec.num_heads * seq * seq
    return _Attention(flops, scores, backward)


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
    logits_bytes: int  # bytes read + written over the vocabulary-sized tensors (logits, the fp32 loss, its gradient)
    activation_bytes: int  # the MLP's elementwise kernels over its intermediate (activation, gating), all passes
    dequant_bytes: int  # 16-bit weight copies made from quantized weights, all passes
    adapter_bytes: int  # LoRA inputs/outputs in fp32 (peft casts to the adapter dtype), all passes
    layer_passes: int  # host launches in forward-layer units: a forward (or recomputed) layer 1, a backward 2
    expert_passes: float  # routed experts run (mean experts hit per MoE layer x layers x passes)
    adapter_passes: int  # adapted linears run (each launches its own small kernels), all passes
    optimizer_bytes: int  # the optimizer step's reads and writes (once per optimizer step)
    gradient_bytes: int  # gradients that data parallelism all-reduces
    parameter_bytes: int  # 16-bit matmul weight bytes (what fully sharded layouts all-gather)
    num_layers: int
    hidden_size: int
    activation_kernels: int = 1  # eager elementwise kernels over the MLP intermediate (activation_bytes' count)
    weight_bytes: int = 0  # weights a forward pass reads once (prefill: bounds short prompts by bandwidth)
    gemm_shapes: tuple[GemmShape, ...] = ()  # the linears' matrix products (M, N, K), all passes (perf.gemm)
    quant_bytes: int = 0  # fp8 GEMMs: activations quantized to fp8 before each product (read 16-bit, write 8-bit)
    quant_kernels: int = 0  # fp8 GEMMs: quantization kernels per decoder layer (one per quantized input)

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


@dataclass(frozen=True, slots=True)
class MatmulKernel:
    """How a weight format's matrix products run, in transformers and in the serving engines.

    ``dequantize``: the whole weight is expanded to a 16-bit copy before a 16-bit GEMM (a pass over the weights
    per matrix product: time); ``fused``: the GEMM reads the low-bit weight and dequantizes it in registers (no
    copy; 16-bit tensor cores); ``load``: dequantized once while loading (plain 16-bit GEMMs); ``fp8``: an fp8
    tensor-core GEMM on scaled fp8 weights (activations quantized on the fly); ``none``: 16-bit weights.
    """

    transformers: str
    engines: str  # vLLM and SGLang (SGLang reuses vLLM's quantization layers and kernels)
    source: str

    def path(self, engine: str = "transformers") -> str:
        return self.transformers if engine == "transformers" else self.engines


_BNB4 = ("bitsandbytes/autograd/_functions.py MatMul4Bit: dequantize_4bit of the whole weight, then a 16-bit "
         "matmul (gemv_4bit only for a single row); vLLM model_executor/layers/quantization/bitsandbytes.py "
         "calls the same bitsandbytes matmul")
MATMUL_KERNELS: dict[WeightsQuant, MatmulKernel] = {
    WeightsQuant.NONE: MatmulKernel("none", "none", "16-bit weights: cuBLAS GEMMs"),
    WeightsQuant.NF4: MatmulKernel("dequantize", "dequantize", _BNB4),
    WeightsQuant.FP4: MatmulKernel("dequantize", "dequantize", _BNB4),
    WeightsQuant.INT8: MatmulKernel(
        "dequantize", "dequantize",
        "bitsandbytes MatMul8bitLt: int8 GEMM plus 16-bit outlier columns, and the weight dequantized for "
        "backward; counted as a 16-bit copy per product, conservatively"),
    WeightsQuant.FP8: MatmulKernel(
        "fp8", "fp8", "transformers integrations/fbgemm_fp8.py and compressed_tensors.py (torch._scaled_mm, "
        "row-wise scales); vLLM quantization/fp8.py: cutlass_scaled_mm (fp8 Marlin, weight-only, before Ada)"),
    WeightsQuant.FP8_BLOCK: MatmulKernel(
        "fp8", "fp8", "transformers integrations/finegrained_fp8.py: fused activation quantization + fp8 "
        "block-scaled matmul (Triton; the frozen weight is dequantized only in backward); vLLM quantization/fp8.py: "
        "w8a8_block_fp8_matmul / DeepGEMM"),
    WeightsQuant.W8A8_FP8: MatmulKernel(
        "fp8", "fp8", "transformers integrations/compressed_tensors.py _scaled_mm_rowwise; vLLM "
        "compressed_tensors_w8a8_fp8.py: cutlass_scaled_mm"),
    WeightsQuant.W8A8_INT8: MatmulKernel(
        "load", "fused", "transformers integrations/compressed_tensors.py CompressedTensorsDequantize "
        "(decompressed while loading); vLLM compressed_tensors_w8a8_int8.py: cutlass_scaled_mm int8 (counted at "
        "the 16-bit rate: the catalog's int8 figures are not used for time)"),
    WeightsQuant.GPTQ_INT4: MatmulKernel(
        "fused", "fused", "gptqmodel's Marlin / ExLlama kernels (transformers quantizer_gptq.py); vLLM "
        "gptq_marlin.py: Marlin dequantizes in registers inside the GEMM"),
    WeightsQuant.GPTQ_INT8: MatmulKernel("fused", "fused", "as gptq-int4 (Marlin 8-bit)"),
    WeightsQuant.AWQ_INT4: MatmulKernel(
        "fused", "fused", "transformers integrations/awq.py through gptqmodel's AWQ kernels; vLLM awq_marlin.py"),
    WeightsQuant.W4A16: MatmulKernel(
        "load", "fused", "transformers integrations/compressed_tensors.py CompressedTensorsDequantize "
        "(decompressed while loading); vLLM compressed_tensors_wNa16.py: Marlin"),
    WeightsQuant.NVFP4: MatmulKernel(
        "load", "fused", "transformers: decompressed while loading (compressed_tensors.py); vLLM "
        "compressed_tensors_w4a4_nvfp4.py: cutlass fp4 GEMM on Blackwell, fp4 Marlin before (counted at the "
        "16-bit rate)"),
    WeightsQuant.MXFP4: MatmulKernel(
        "fused", "fused", "transformers integrations/mxfp4.py: triton_kernels matmul_ogs reads the mxfp4 blocks "
        "(dequantized while loading where the kernels are missing); vLLM quantization/mxfp4.py: Marlin / "
        "triton_kernels / FlashInfer MoE"),
    WeightsQuant.HQQ_INT4: MatmulKernel(
        "dequantize", "fused", "hqq core/quantize.py HQQLinear.forward: dequantize() then matmul (PyTorch "
        "backend); vLLM hqq_marlin.py"),
    WeightsQuant.TORCHAO_INT4: MatmulKernel(
        "fused", "fused", "torchao Int4WeightOnlyConfig: tinygemm torch.ops.aten._weight_int4pack_mm reads int4 "
        "directly; vLLM quantization/torchao.py runs the same tensor subclass"),
}

# llama.cpp's CUDA backend multiplies every quantized GGUF type (Q4_0…Q8_0, K-quants, IQ types, MXFP4) without
# expanding the weights: ggml/src/ggml-cuda/mmq.cu ggml_cuda_should_use_mmq is true for them on Turing and later
# (activations quantized to q8_1, int8 tensor-core dot products; mmvq.cu for up to 8 rows); F16/BF16/F32 use cuBLAS.
GGUF_MATMUL = "fused"


def matmul_path(q: WeightsQuant, engine: str = "transformers") -> str:
    """``dequantize`` | ``fused`` | ``load`` | ``fp8`` | ``none`` for weight format ``q`` under ``engine``."""
    if engine == "llama.cpp":
        return "none" if q is WeightsQuant.NONE else GGUF_MATMUL
    return MATMUL_KERNELS[q].path(engine)


def _dequantizes(w: Workload, engine: str = "transformers") -> bool:
    return matmul_path(w.base_quant, engine) == "dequantize"


def compute_dtype(w: Workload, engine: str = "transformers") -> str:
    """The catalog throughput key the matrix products run at.

    fp32 runs on TF32 tensor cores: the calibration harness (``vramplan.measure``) and the Hugging Face
    Trainer's ``--tf32`` set ``torch.backends.cuda.matmul.allow_tf32``. nf4 and int8 weights are
    dequantized to the 16-bit compute dtype (bitsandbytes' ``bnb_4bit_compute_dtype``; LLM.int8's mixed
    decomposition is counted at 16-bit speed, conservatively); fp8 formats (:data:`MATMUL_KERNELS`) run fp8
    GEMMs, which need fp8 tensor cores (a GPU without an fp8 figure gets no time); the others run 16-bit GEMMs.
    """
    if matmul_path(w.base_quant, engine) == "fp8":
        return "fp8"
    if w.precision is Precision.FP32 and w.base_quant is WeightsQuant.NONE and w.method is not Method.QLORA:
        return "tf32"
    if w.precision in (Precision.FP16, Precision.AMP_FP16):
        return "fp16"
    return "bf16"


# Linears that read the same input tensor: a serving engine fuses them into one product (vLLM
# QKVParallelLinear and MergedColumnParallelLinear; TensorRT-LLM's fused qkv), so it quantizes that input once.
_SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj", "experts.gate_proj", "experts.up_proj"})


def _shared_inputs(fused_mlp: bool) -> tuple[set[str], ...]:
    """The groups an engine fuses: q/k/v always, gate/up unless the build keeps them apart (``fused_mlp=False``:
    TensorRT-LLM 0.5 engines built without ``--use_fused_mlp`` ran the gate and up projections as two GEMMs)."""
    return _SHARED_INPUT if fused_mlp else _SHARED_INPUT[:1]


def _quant_inputs(spec: ModelSpec, engine: str, fused_mlp: bool = True) -> tuple[float, int]:
    """(activation elements quantized to fp8 per token over all layers, quantization kernels per layer) when the
    linears run fp8 GEMMs.

    An fp8 tensor-core GEMM takes both operands in fp8, so every linear's 16-bit input is scaled and cast first,
    in a kernel of its own that reads the 16-bit activation and writes the fp8 copy: transformers
    ``integrations/fbgemm_fp8.py`` (``quantize_fp8_per_row`` in each ``FbgemmFp8Linear.forward``) and
    ``finegrained_fp8.py`` (``act_quant`` per linear), vLLM ``_custom_ops.scaled_fp8_quant`` before
    ``cutlass_scaled_mm``, TensorRT-LLM ``quantization/layers.py`` (``FP8Linear``: a ``quantize`` layer on the
    input with its activation scale). Norms, rotary, attention and the residual adds stay 16-bit. transformers
    quantizes per linear module; an engine quantizes once per fused input (:data:`_SHARED_INPUT`). A routed
    expert quantizes the tokens routed to it (``experts_per_token`` per token)."""
    elements = 0.0
    kernels = 0
    for i, layer in enumerate(count_params(spec).layers):
        seen: set[int] = set()
        for name, fin, _fout, n in layer.linear_shapes:
            if name == "router":
                continue  # the router stays 16-bit (vLLM ReplicatedLinear without quantization; transformers'
                # modules_to_not_convert)
            group = next((j for j, g in enumerate(_shared_inputs(fused_mlp)) if name in g), None)
            if engine != "transformers" and group is not None:
                if group in seen:
                    continue
                seen.add(group)
            experts = i in spec.moe_layers and spec.num_experts > 1 and n == spec.num_experts
            elements += fin * (spec.experts_per_token if experts else n)
            if i == 0:
                kernels += 1
    return elements, kernels


def fp8_activation_quant(spec: ModelSpec, w: Workload, tokens: int, engine: str = "transformers",
                         fused_mlp: bool = True) -> tuple[int, int]:
    """(bytes, kernels per layer) of quantizing ``tokens`` tokens' GEMM inputs to fp8 (:func:`_quant_inputs`);
    (0, 0) unless the weight format runs fp8 GEMMs under ``engine``. Bytes: each element read at the activation
    width and written as one fp8 byte."""
    if matmul_path(w.base_quant, engine) != "fp8":
        return 0, 0
    elements, kernels = _quant_inputs(spec, engine, fused_mlp)
    return int(tokens * elements * (_act_bytes(w) + 1)), kernels


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


@lru_cache(maxsize=1024)
def dequantized_weights(spec: ModelSpec, tokens: int) -> int:
    """Decoder-layer weights a bitsandbytes-quantized model expands to 16 bits in one pass over ``tokens`` tokens.

    Every quantized linear that runs is dequantized whole before its matrix product
    (``bitsandbytes/autograd/_functions.py``: ``MatMul4Bit`` calls ``dequantize_4bit`` on the full weight).
    A MoE layer runs every expert that receives at least one token, so it dequantizes
    E (1 - (1 - k/E)^tokens) experts (uniform routing), not the k a token activates: at thousands of tokens
    that is all of them.
    """
    counts = count_params(spec)
    hit = _experts_hit(spec, tokens)
    total = 0.0
    for i, layer in enumerate(counts.layers):
        moe = i in spec.moe_layers
        for _name, fin, fout, n in layer.linear_shapes:
            experts = moe and spec.num_experts > 1 and n == spec.num_experts
            total += fin * fout * (hit if experts else n)
    return int(total)


def logits_bytes_per_element(w: Workload, *, training: bool) -> int:
    """Bytes read and written per logit element by the head's output and the loss, counted kernel by kernel.

    transformers' ``ForCausalLMLoss`` (``loss/loss_utils.py``) upcasts the logits (``logits.float()``, a
    copy unless they are fp32 already) and calls ``cross_entropy``: log_softmax reads its input twice (the
    max/sum pass and the normalising pass) and writes once; nll_loss gathers one element per row. Backward:
    nll_loss_backward writes a zero-filled gradient, log_softmax_backward reads the gradient and the
    output and writes the input gradient, and the upcast's backward casts it back. Elements are the
    activation size ``a`` where the head wrote them and 4 bytes in fp32.
    """
    a = numerics(w).act if not w.precision.is_amp else 2
    cast = 0 if a == 4 else a + 4  # logits.float(): read a, write 4 (no copy when already fp32)
    forward = a + cast + 4 * 2 + 4  # head output written; upcast; log_softmax reads twice, writes once
    if not training:
        return a + cast  # generate(): the head's output and its fp32 copy
    backward = 4 + (4 + 4) + 4 + (0 if a == 4 else 4 + a)  # zero-filled grad; softmax backward; cast back
    return forward + backward


def mlp_elementwise_kernels(spec: ModelSpec) -> int:
    """Elementwise kernels eager transformers runs over the MLP intermediate: the activation
    (``gelu_new`` is a composite of 8 kernels in ``activations.py``, every other activation one) and, for
    gated MLPs, the gate x up product. An engine that fuses them runs one."""
    return (8 if spec.activation is Activation.GELU_NEW else 1) + (1 if spec.mlp is MLPKind.GATED else 0)


def _mlp_elementwise_bytes_per_token(spec: ModelSpec, w: Workload) -> int:
    """Bytes the MLP's elementwise kernels write per token, all layers (one pass).

    Each kernel writes one intermediate-sized tensor: the activation (transformers' ``gelu_new`` is a
    composite of 8 kernels, every other activation one) and, for gated MLPs, the gate x up product.
    """
    kernels = mlp_elementwise_kernels(spec)
    total = 0
    for i in range(spec.num_layers):
        if i in spec.moe_layers:
            total += spec.experts_per_token * spec.moe_intermediate_size + spec.shared_expert_intermediate_size
        else:
            total += spec.intermediate_size
    return total * kernels * _act_bytes(w)


# Linears whose input features tensor parallelism splits (Megatron's row-parallel linears: the projection back to
# the hidden size after attention and after the MLP); every other linear is column-parallel (output features split)
_ROW_PARALLEL = frozenset({"o_proj", "out_proj", "down_proj", "experts.down_proj", "shared_down_proj", "fc_out",
                           "fc2", "c_proj", "dense", "dense_4h_to_h", "linear_out"})


@lru_cache(maxsize=1024)  # workloads that differ in precision, optimizer or accumulation share their products
def _gemm_shapes(spec: ModelSpec, tokens: int, *, logit_rows: int, backward: str, back_layers: int = 0,
                 recompute: bool = False, head_grad: bool = True, fused: bool = False,
                 head_quantized: bool = True, fused_mlp: bool = True) -> tuple[GemmShape, ...]:
    """The matrix products of one pass over ``tokens`` tokens, shape by shape.

    Forward: C[tokens, out] = X[tokens, in] @ W. Backward (autograd's linear backward): the input gradient
    dX[tokens, in] = dY[tokens, out] @ W (K = out) and, for trained weights, the weight gradient
    dW[out, in] = dY^T @ X, whose K is the token count (``backward``: ``full`` both, ``input`` the input
    gradient only, ``none``). A MoE layer's experts each multiply the tokens routed to them, tokens x k / E
    on average. ``back_layers`` top layers run backward; ``recompute`` runs their forward again
    (checkpointing). The head runs over ``logit_rows`` rows (the last position only when logits are trimmed;
    ``head_quantized=False`` there: a product of a few rows is a matrix-vector product whose time is its weight
    read, counted as such). ``fused``: a serving engine runs the linears that read one input as one product
    (:data:`_SHARED_INPUT`: vLLM ``QKVParallelLinear`` / ``MergedColumnParallelLinear``, TensorRT-LLM's qkv).
    Each shape records the dimension tensor parallelism splits (:func:`vramplan.perf.gemm.tensor_parallel`).
    """
    out: list[GemmShape] = []
    layers = count_params(spec).layers
    L = len(layers)
    for i, layer in enumerate(layers):
        moe = i in spec.moe_layers and spec.num_experts > 1
        trained = i >= L - back_layers
        linears = list(layer.linear_shapes)
        if fused:
            linears = _fuse_shared_inputs(linears, _shared_inputs(fused_mlp))
        for name, fin, fout, n in linears:
            rows, count, q = tokens, float(n), True
            if moe and n == spec.num_experts:
                # transformers loops over the experts hit, one small product each: their fixed cost is the
                # calibrated per-expert launch term (launch_s_per_expert_pass), not quantization
                rows, q = max(1, round(tokens * spec.experts_per_token / spec.num_experts)), False
            row = name in _ROW_PARALLEL
            passes = 1 + (1 if recompute and trained else 0)
            out.append(GemmShape(rows, fout, fin, count * passes, q, "k" if row else "n"))
            if trained and backward != "none":
                out.append(GemmShape(rows, fin, fout, count, q, "n" if row else "k"))
                if backward == "full":
                    out.append(GemmShape(fout, fin, rows, count, q, "n" if row else "m"))
    d = spec.embed_proj_dim or spec.hidden_size
    out.append(GemmShape(logit_rows, spec.vocab_size, d, 1.0, head_quantized))
    if backward != "none" and back_layers:
        out.append(GemmShape(logit_rows, d, spec.vocab_size, 1.0, True, "k"))
        if head_grad:
            out.append(GemmShape(spec.vocab_size, d, logit_rows, 1.0, True, "m"))
    merged: dict[tuple[int, int, int, bool, str], float] = {}
    for g in out:
        if g.m > 0 and g.n > 0 and g.k > 0:
            key = (g.m, g.n, g.k, g.quantized, g.tp_dim)
            merged[key] = merged.get(key, 0.0) + g.count
    return tuple(GemmShape(m, n, k, c, q, t) for (m, n, k, q, t), c in merged.items())


def _fuse_shared_inputs(linears: list[tuple[str, int, int, int]],
                        groups: tuple[set[str], ...] = _SHARED_INPUT) -> list[tuple[str, int, int, int]]:
    """One product per group of linears that read the same input (``groups``), its N the sum."""
    out: list[tuple[str, int, int, int]] = []
    index: dict[tuple[int, int, int], int] = {}
    for name, fin, fout, n in linears:
        group = next((j for j, g in enumerate(groups) if name in g), None)
        if group is None:
            out.append((name, fin, fout, n))
            continue
        key = (group, fin, n)
        if key in index:
            first = out[index[key]]
            out[index[key]] = (first[0], fin, first[2] + fout, n)
        else:
            index[key] = len(out)
            out.append((name, fin, fout, n))
    return out


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
    elif w.method in (Method.LORA, Method.QLORA, Method.DORA):
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
    # MFU's numerator: PaLM appendix B, backward twice the forward; executed: the kernel's own backward
    model_flops = (gemm + a * (1 + 2 * frac)) * tokens
    attention = a + att.backward_flops_per_token * frac
    if ckpt:  # non-reentrant checkpointing recomputes each backpropagated layer's forward once
        gemm += (2 * n_layers + 2 * adapters) * frac
        attention += a * frac
    passes = L + back_layers + (back_layers if ckpt else 0)
    # autograd launches about two kernels per forward op in backward (input and weight gradients, or the
    # two inputs of an elementwise op), so a backward layer costs two forward layers' launches
    launch_units = L + 2 * back_layers + (back_layers if ckpt else 0)
    per_layer = passes / L if L else 0.0
    opt_bytes, grad_bytes = _optimizer_traffic(spec, w)
    return StepWork(
        tokens=tokens, model_flops=model_flops, gemm_flops=gemm * tokens, attention_flops=attention * tokens,
        dtype=compute_dtype(w),
        score_bytes=int(att.score_elements * 4 * per_layer),  # fp32 softmax on these paths
        logits_bytes=tokens * spec.vocab_size * logits_bytes_per_element(w, training=True),
        activation_bytes=int(tokens * _mlp_elementwise_bytes_per_token(spec, w) * per_layer),
        dequant_bytes=int(dequantized_weights(spec, tokens) * 4 * per_layer) if _dequantizes(w) else 0,
        adapter_bytes=int(tokens * adapted_io * 4 * per_layer),
        layer_passes=launch_units, expert_passes=_experts_hit(spec, tokens) * len(spec.moe_layers) * per_layer,
        adapter_passes=round(n_adapted * per_layer), optimizer_bytes=opt_bytes, gradient_bytes=grad_bytes,
        parameter_bytes=2 * (n_layers + n_head), num_layers=L, hidden_size=spec.hidden_size,
        activation_kernels=mlp_elementwise_kernels(spec),
        gemm_shapes=_gemm_shapes(spec, tokens, logit_rows=tokens,
                                 backward="full" if w.method in (Method.FULL, Method.FREEZE) else "input",
                                 back_layers=back_layers, recompute=ckpt,
                                 head_grad=w.method is Method.FULL or (w.method is Method.FREEZE
                                                                       and not spec.tie_word_embeddings)))


def inference_work(spec: ModelSpec, w: Workload, engine: str = "transformers", fused_mlp: bool = True) -> StepWork:
    """FLOPs and traffic of the prefill of ``w``: one forward over batch x prompt tokens, with ``engine``'s
    matrix-product kernels for the weight format (:data:`MATMUL_KERNELS`)."""
    return _inference_work(spec, w.with_(task=Task.INFER) if w.is_train else w, engine, fused_mlp)


def _engine_fuses_attention(engine: str) -> bool:
    """Whether ``engine`` runs a fused attention kernel of its own (``data/mfu.json`` engines,
    ``fused_attention``); transformers runs the model's own attention (SDPA, flash or eager, as chosen)."""
    if engine == "transformers":
        return False
    from .efficiency import engine_profile  # efficiency imports this module

    return engine_profile(engine).fused_attention


@lru_cache(maxsize=4096)
def _inference_work(spec: ModelSpec, w: Workload, engine: str = "transformers", fused_mlp: bool = True) -> StepWork:
    b, s = w.batch_size, w.seq_len
    tokens = b * s
    n_layers, n_head = layer_matmul_weights(spec)
    att = _attention(spec, w, b, s, engine_fused=_engine_fuses_attention(engine))
    logit_tokens = b if w.logits is LogitsMode.LAST else tokens
    gemm = 2 * n_layers * tokens + 2 * n_head * logit_tokens
    attention = att.flops_per_token * tokens
    quant = fp8_activation_quant(spec, w, tokens, engine, fused_mlp)
    return StepWork(
        tokens=tokens, model_flops=gemm + attention, gemm_flops=gemm, attention_flops=attention,
        dtype=compute_dtype(w, engine), score_bytes=att.score_elements * 4,
        logits_bytes=logit_tokens * spec.vocab_size * logits_bytes_per_element(w, training=False),
        activation_bytes=tokens * _mlp_elementwise_bytes_per_token(spec, w),
        dequant_bytes=dequantized_weights(spec, tokens) * 4 if _dequantizes(w, engine) else 0,
        adapter_bytes=0,
        layer_passes=spec.num_layers, expert_passes=_experts_hit(spec, tokens) * len(spec.moe_layers),
        adapter_passes=0, optimizer_bytes=0, gradient_bytes=0, parameter_bytes=2 * (n_layers + n_head),
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        activation_kernels=mlp_elementwise_kernels(spec), weight_bytes=weights_read_per_step(spec, w, tokens),
        gemm_shapes=_gemm_shapes(spec, tokens, logit_rows=logit_tokens, backward="none",
                                 fused=engine != "transformers", head_quantized=w.logits is not LogitsMode.LAST,
                                 fused_mlp=fused_mlp),
        quant_bytes=quant[0], quant_kernels=quant[1])


# ---------------------------------------------------------------------------- decode


def kv_bytes_per_token(spec: ModelSpec, w: Workload, context: int) -> int:
    """The cache one decode step of one sequence reads at ``context`` tokens: every attention layer's keys and
    values by its own head sizes (MLA: the compressed latent and rotary key; sliding layers: the window; a layer
    that reuses another's keys and values reads those, already counted), and the SSM / linear-attention layers'
    fixed state (the cache the memory model holds: ``ModelSpec.layer``, ``ssm_state_bytes``)."""
    elem = _act_bytes(w)
    total = sum(per_token * elem * length for _, per_token, _, length in _cached_attention_layers(spec, context))
    return total + ssm_state_bytes(spec, 1, elem)


def _cached_attention_layers(spec: ModelSpec, context: int) -> Iterator[tuple[int, int, bool, int]]:
    """(layer, cache elements per token, sliding, tokens held) of every attention layer that keeps its own keys and
    values at ``context`` tokens (a sliding layer holds its window; a layer reusing another's cache is skipped)."""
    for i in range(spec.num_layers):
        if spec.mixer(i) not in ATTENTION_MIXERS:
            continue
        layer = spec.layer(i)
        if layer.kv_shared:
            continue
        window = spec.sliding_window if i in spec.sliding_layers else None
        yield i, layer.kv_cache_per_token, bool(window), min(context, window) if window else context


# transformers releases before the attention-interface refactor (4.48) ran these families' FlashAttention-2 path
# with repeat_kv first: models/mistral/modeling_mistral.py MistralFlashAttention2.forward and
# models/qwen2/modeling_qwen2.py Qwen2FlashAttention2.forward (4.36-4.47, "Copied from Mistral") call
# repeat_kv(key_states, num_key_value_groups) before _flash_attention_forward; Llama's FA2 path never did.
_FA2_REPEATS_KV_BEFORE = (4, 48)
_FA2_REPEAT_FAMILIES = frozenset({"mistral", "qwen2"})


def _decode_repeats_kv(spec: ModelSpec, w: Workload, sliding: bool, context: int) -> bool:
    """Whether a transformers decode step expands this layer's keys and values to every query head before
    attention (``repeat_kv``: ``expand`` + ``reshape``, a copy): the eager path always; SDPA with a mask or
    head_dim > 256 (:func:`vramplan.blocks.sdpa_repeats_kv`); FlashAttention-2 in releases before 4.48 for
    :data:`_FA2_REPEAT_FAMILIES`."""
    has_mask = (sliding and window_masked(spec, context)) or mask_always(spec, w.transformers_release)
    kernel = attention_kernel(spec, w, has_mask=has_mask)
    if kernel is Kernel.EAGER:
        return True
    if kernel is Kernel.FLASH:
        return spec.family in _FA2_REPEAT_FAMILIES and w.transformers_release < _FA2_REPEATS_KV_BEFORE
    if own_falcon_attention(spec, w.transformers_release):
        return False  # Falcon's own attention (before 5.25) broadcasts its single key/value head (no copy)
    return sdpa_repeats_kv(spec, has_mask)


def repeated_kv_bytes(spec: ModelSpec, w: Workload, context: int, engine: str = "transformers") -> int:
    """Extra bytes one decode step of one sequence moves when transformers expands the grouped keys and values to
    every query head (:func:`_decode_repeats_kv`): the copy reads the cache and writes ``n_rep`` times it, and
    attention then reads the expanded copy instead of the cache: ``2 x n_rep x`` the layer's cache. Serving
    engines' kernels read the grouped cache directly (0)."""
    if engine != "transformers" or spec.num_kv_heads >= spec.num_heads:
        return 0
    elem = _act_bytes(w)
    n_rep = spec.num_heads // max(1, spec.num_kv_heads)
    if n_rep <= 1:
        return 0
    repeats = {sliding: _decode_repeats_kv(spec, w, sliding, context) for sliding in (False, True)}
    return sum(2 * n_rep * per_token * elem * length
               for _, per_token, sliding, length in _cached_attention_layers(spec, context) if repeats[sliding])


def _lookup_tables(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(rows, row width) of each table the forward only indexes (``nn.Embedding``): the token embedding when the
    output head does not reuse it (a tied table is read whole by the head's matrix product), the learned position
    embedding, and Gemma 3n's per-layer token embedding (``embed_tokens_per_layer``), as
    :func:`vramplan.params.count_params` counts them."""
    tables = []
    if not spec.tie_word_embeddings:
        tables.append((spec.vocab_size, spec.embed_proj_dim or spec.hidden_size))
    if spec.max_learned_positions:
        tables.append((spec.max_learned_positions, spec.hidden_size))
    if spec.per_layer_input:
        tables.append((spec.per_layer_vocab, spec.num_layers * spec.per_layer_input))
    return tuple(tables)


def weights_read_per_step(spec: ModelSpec, w: Workload, batch: int) -> int:
    """Weight bytes one forward over ``batch`` tokens reads (a decode step: one token per sequence): every dense
    weight, and for MoE the experts the batch routes to.

    With ``k`` of ``E`` experts per token, a batch of ``b`` tokens touches E (1 - (1 - k/E)^b) experts of
    a layer on average (uniform routing). An embedding lookup (``F.embedding``, an index-select) reads only the
    rows of the batch's tokens, not its table (:func:`_lookup_tables`); the tables stay in the dtype the memory
    model stores unquantized parameters in (fp32 after QLoRA's ``prepare_model_for_kbit_training``).
    """
    st = _states(spec, w.with_(task=Task.INFER) if w.is_train else w)
    total = st.weights + st.master_weights + st.quant_constants
    elem = 4 if w.method is Method.QLORA else w.precision.param_bytes
    unread = sum((rows - min(rows, batch)) * width for rows, width in _lookup_tables(spec)) * elem
    if not spec.is_moe:
        return total - unread
    e, k = spec.num_experts, spec.experts_per_token
    touched = e * (1 - (1 - k / e) ** batch)
    expert_params = 0
    for i, layer in enumerate(count_params(spec).layers):
        if i in spec.moe_layers:
            expert_params += sum(fin * fout * n for _, fin, fout, n in layer.linear_shapes if n == e)
    per_param = total / max(1, count_params(spec).total)
    return int(total - expert_params * per_param * (1 - touched / e)) - unread


def decode_work(spec: ModelSpec, w: Workload, *, context: int, batch: int) -> tuple[int, float]:
    """(bytes read, FLOPs) of one decode step of ``batch`` sequences at ``context`` tokens: every weight
    (the experts the batch routes to, for MoE) and the batch's KV cache are read once."""
    bytes_read = weights_read_per_step(spec, w, batch) + batch * kv_bytes_per_token(spec, w, context)
    n_layers, n_head = layer_matmul_weights(spec)
    flops = batch * (2 * (n_layers + n_head) + 4 * spec.q_dim * spec.num_layers * context)
    return bytes_read, float(flops)


