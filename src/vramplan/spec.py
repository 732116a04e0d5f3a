"""The typed description of a decoder language model that every estimator function reads.

A :class:`ModelSpec` says what a Hugging Face ``*ForCausalLM`` module holds and how its forward
pass computes, in the few dozen facts that decide memory: sizes, which projections exist and
have biases, how the MLP and norms are built, and where attention differs from layer to layer.
It is built from a config.json by :mod:`vramplan.hfconfig` and never from guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import CheckpointWeights
    from .multimodal import MultimodalSpec
    from .quant import Quantization
    from .ssm import SharedBlock, SSMSpec

__all__ = ["ATTENTION_MIXERS", "MAMBA2_MIXERS", "Activation", "LayerOverride", "MLPKind", "ModelSpec", "NormKind",
           "PositionKind", "StackRun"]

# Layer mixers that hold an attention (a KV cache that grows), and those that run a Mamba-2 mixer: Falcon-H1's
# "parallel" layers have both, as do Zamba2's hybrid layers (the shared transformer, then a Mamba-2 layer;
# "zamba_tied" reuses the weights of an earlier hybrid layer's block)
ATTENTION_MIXERS = ("attention", "parallel", "zamba_hybrid", "zamba_tied", "inkling")
MAMBA2_MIXERS = ("mamba2", "parallel", "zamba_hybrid", "zamba_tied")


class NormKind(StrEnum):
    RMSNORM = "rmsnorm"  # LlamaRMSNorm: upcasts to fp32, scales by weight
    GEMMA_RMSNORM = "gemma_rmsnorm"  # GemmaRMSNorm: fp32 throughout, scales by (1 + weight)
    LAYERNORM = "layernorm"  # torch.nn.LayerNorm (weight and, where the config says so, bias)
    COHERE_LAYERNORM = "cohere_layernorm"  # CohereLayerNorm: mean/variance in fp32 Python ops, weight only
    LAYERNORM_NO_AFFINE = "layernorm_no_affine"  # OlmoLayerNorm: F.layer_norm on an fp32 copy, no weight/bias
    RMSNORM_NO_WEIGHT = "rmsnorm_no_weight"  # Llama4TextL2Norm (NanoChat): x.float() * rsqrt(mean(x^2) + eps), cast
    # back; no parameters
    FP32_WEIGHT_RMSNORM = "rmsnorm_fp32_weight"  # NemotronHRMSNorm: weight.to(fp32) * the fp32 normed states, then cast


class MLPKind(StrEnum):
    GATED = "gated"  # down(act(gate(x)) * up(x)) — LLaMA, Mistral, Qwen, Gemma, Phi-3
    PLAIN = "plain"  # fc2(act(fc1(x))) — GPT-2, GPT-J, NeoX, OPT, BLOOM, Falcon


class Activation(StrEnum):
    SILU = "silu"
    GELU = "gelu"  # exact erf GELU, one native kernel
    GELU_TANH = "gelu_tanh"  # F.gelu(approximate="tanh"), one native kernel (gelu_pytorch_tanh)
    GELU_NEW = "gelu_new"  # transformers' NewGELUActivation: a Python composite of 8 kernels
    BLOOM_GELU = "bloom_gelu"  # BLOOM's custom autograd GELU (saves its input only)
    RELU = "relu"
    XIELU = "xielu"  # transformers' XIELUActivation, Python path (Apertus): two trained scalars, a where of two
    # polynomial/expm1 branches
    RELU2 = "relu2"  # transformers' ReLUSquaredActivation: square(relu(x)) (Nemotron-H)


class PositionKind(StrEnum):
    ROPE = "rope"
    LEARNED = "learned"
    ALIBI = "alibi"
    NONE = "none"  # no position encoding (Mamba: the recurrence orders the tokens)


@dataclass(frozen=True, slots=True)
class LayerOverride:
    """What a group of layers changes from the model-wide facts (transformers' ``per_layer_config`` and the
    per-layer choices its modeling file makes from it: Gemma 4's global layers with a wider head, fewer KV heads
    and values taken from the key projection; its KV-sharing layers with no K/V of their own). 0 / None: the
    spec's value."""

    layers: tuple[int, ...]
    head_dim: int = 0
    num_kv_heads: int = 0
    intermediate_size: int = 0
    v_from_k: bool | None = None
    kv_shared: bool | None = None
    kv_store: bool | None = None
    act_sparsity: bool | None = None
    attn_norm: bool | None = None
    num_heads: int = 0  # MLA layers with their own head count and latent width (Dots 3's sliding layers)
    kv_lora_rank: int = 0
    dsa: bool | None = None  # False: the layer has no DSA indexer (Dots 3's sliding layers)
    index_shared: bool | None = None  # True: the layer reuses the previous indexer's top-k (HY-V4 "shared" layers)
    attention_sinks: bool | None = None  # the layer's attention has learned sink logits (MiMo-V2-Flash: only the
    # sliding layers)
    compress_rate: int = 0  # DeepSeek-V4: the layer's KV compression rate (its attention's compressor)
    hash_routed: bool | None = None  # DeepSeek-V4: the layer's MoE routes by a token-id table (DeepseekV4HashRouter)


@dataclass(frozen=True, slots=True)
class StackRun:
    """One call of a layer stack in a looped forward (:attr:`ModelSpec.stack_runs`): layers ``first`` ..
    ``first + count - 1`` run in order on the sum of the carried states, with autograd recording them (``grad``) or
    under ``torch.no_grad``; the stack's own weightless final norm closes the call and its output replaces carried
    state ``state`` (modeling_hrm_text.py HrmTextModel.forward: ``z_L = L_module(z_L + z_H)``, then
    ``z_H = H_module(z_H + z_L)``)."""

    first: int
    count: int
    grad: bool
    state: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only causal language model as transformers builds it."""

    name: str
    family: str  # the config's model_type
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    norm: NormKind
    mlp: MLPKind
    activation: Activation
    position: PositionKind
    max_position_embeddings: int | None = None
    norm_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    qkv_fused: bool = False  # one projection for q, k and v (GPT-2 c_attn, Falcon, NeoX, BLOOM, Phi-3)
    attn_fp32: bool = False  # eager attention casts q and k to fp32 before the scores (GPT-Neo; GPT-J by family)
    # BloomAttention: ``attention_scores = alibi.baddbmm(q, k, alpha=inv_norm_factor)``: the scaling is folded into
    # the score GEMM and the raw scores stay referenced by that local until the attention returns
    scores_kept: bool = False
    returns_attn_weights: bool = False  # the layer returns its eager attention weights and the model loop holds them
    # until the next layer returns (GPT-Neo)
    scores_bias_fp32: bool = False  # eager scores plus an fp32 position bias (MPT's ALiBi tensor): the sum is fp32, the
    # boolean-mask masked_fill and the softmax stay fp32, the weights are cast back
    qkv_copies: bool = False  # q, k and v are reshaped out of the fused projection with copies (CodeGen's qkv_proj in
    # mp_num blocks: the split views are not head-contiguous)
    extra_params: int = 0  # parameters outside the programs' modules (GPT-NeoX-Japanese: the last layer's dense_bias)
    scores_zeros: bool = False  # eager scores from baddbmm against a zeros (B*H, S, S) tensor the attention's locals
    # hold to its end, the scaling folded in (GPTNeoXJapaneseAttention._attn)
    diff_attention: bool = False  # DiffLlama: two attention calls over the two halves of the values (each repeated to
    # every KV head), their outputs concatenated, the second half scaled by lambda and subtracted, a weightless
    # RMSNorm over 2 x head_dim, times (1 - lambda_init)
    attn_gpt1: bool = False  # OpenAI GPT's Attention: scores divided, multiplied by the causal buffer and shifted
    # (three (B, H, S, S) tensors alive together), softmax in the scores' dtype, strided q/k/v copied by matmul
    causal_buffer: bool = False  # the attention masks with its own causal buffer: no 4-D mask is built (OpenAI GPT)
    post_ln: bool = False  # classic post-LN block: norm(x + attn(x)), then norm(n + mlp(n)); no final norm (OpenAI GPT)
    kv_cache: bool = True  # False: the model keeps no cache and generate re-runs the whole sequence for every token
    mlp_inline: bool = False  # the MLP's linears are called in the layer's own forward (BioGPT, XGLM): its normed
    # input is not held by a module call to the MLP's end
    attn_fairseq: bool = False  # XGLMAttention: q scaled after q_proj, q/k/v reshaped to (batch x heads, seq, d) with
    # copies, bmm scores plus the mask clamped with torch.max (which saves the sum), softmax in the scores' dtype, the
    # weights held by the layer to its end
    scores_held: bool = False  # the masked eager scores (and a fused qkv's views) stay referenced by the attention's
    # locals until it returns (MptAttention.attention_scores, GPTNeoXJapaneseAttention._attn)
    mask_bool: bool = False  # the eager causal mask is converted to bool before the layers (MptModel: .to(torch.bool))
    # ZAYA (vramplan.zaya): (router_hidden_size, cca_time0, cca_time1); the stack is one program; empty: not ZAYA
    zaya: tuple[int, ...] = ()
    moa: bool = False  # JetMoE (vramplan.jetmoe): a mixture of attention heads and a MoE MLP on
    # JetMoeParallelExperts; the layer is vramplan.jetmoe's program
    gradient_checkpointing: bool = True  # False: transformers refuses to checkpoint the model
    # (supports_gradient_checkpointing False: CTRL, CPM-Ant, XLNet, OpenAI GPT, GPT-NeoX-Japanese)
    buffer_bytes: int = 0  # buffers the model holds beside its parameters (GPTBigCodeModel: a max_positions^2 bool
    # causal mask)
    qkv_names: tuple[str, ...] = ()  # the separate q/k/v projections' module names where not q_proj/k_proj/v_proj
    # (CTRL: Wq, Wk, Wv)
    qkv_name: str = ""  # the fused q/k/v projection's module name where the family's default is not it
    o_name: str = ""  # the attention output projection's module name where the family's default is not it
    gate_up_fused: bool = False  # Phi-3's gate_up_proj
    mlp_names: tuple[str, ...] = ()  # a plain MLP's two linears when not the family's own names (Arcee: up_proj,
    # down_proj, NemotronMLP)
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-J, NeoX, Falcon)
    norms_per_layer: int = 2  # 1 for GPT-J / Falcon-7B, 4 for Gemma 2/3 (pre and post norms)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    sub_norms: bool = False  # BitNet: a norm on the attention output before o_proj and on the gated product
    # before down_proj
    qk_norm_after_rope: bool = False  # the q/k norms apply to the rotated q/k (HunYuan dense V1)
    eager_softmax_native: bool = False  # eager attention's softmax keeps the scores' dtype (modeling_llama4.py
    # eager_attention_forward: softmax(attn_weights, dim=-1), no fp32)
    qk_l2_norm: bool = False  # Llama4TextL2Norm of the rotated q and k (no weight), on the layers that apply RoPE
    nope_temperature: bool = False  # Llama 4 attn_temperature_tuning: on the NoPE layers, q * an fp32 scale per
    # position (the product promotes to fp32) cast back to q's dtype
    attn_temperature: bool = False  # q * (1 + beta * log(1 + floor(pos / original_max))) after RoPE (Ministral 3,
    # Llama 4's attention temperature: get_llama_4_attn_scale)
    qk_norm_head_weights: bool = False  # per-head q/k norms with one weight row per head and no bias (Cohere
    # use_qk_norm: CohereLayerNorm((heads, head_dim)); StableLM qk_layernorm: a LayerNorm per head)
    held_through_mlp: tuple[str, ...] = ()  # what the layer's Python locals keep alive through the MLP: "normed"
    # (the attention's normed input: StableLmDecoderLayer), "attn" (the attention output: StableLM, GPTBigCodeBlock's
    # attn_outputs tuple)
    qk_norm_split: bool = False  # the per-head norms run on torch.split slices and torch.cat joins them (StableLM)
    qk_norm_full: bool = False  # the q/k norms span all heads (OLMo 2: RMSNorm(q_dim) before the head split)
    pre_norm: bool = True  # False: the norms apply to the sublayers' outputs only (OLMo 2, EXAONE 4)
    rope_style: str = "half"  # fp32_each (ModernBERT: q.float() twice, once per product), half (LLaMA), interleave
    # (GLM: repeat_interleave'd cos/sin), fp32 (q.float()
    # first: ERNIE 4.5, Cohere), interleave_fp32 (both), fp32_tables (fp32 cos/sin, the rotated q/k cast back:
    # OLMo), complex (DeepSeek-V2: fp32 complex product with freqs_cis, cast back)
    nope_layers: tuple[int, ...] = ()  # layers that skip RoPE (SmolLM3, EXAONE 4 / Command-R7B global layers)
    residual_scale: bool = False  # Granite: residual + sublayer * residual_multiplier
    residual_depth_scale: bool = False  # sublayer * (1 / sqrt(i)) + residual * sqrt((i - 1) / i), i the residual add's
    # depth (modeling_beam.py depth_scaled_residual_add): two scaled copies, then their sum
    nope_query_scale: bool = False  # on the NoPE layers, (q.float() * scale).to(q.dtype) with an fp32 (1, 1, seq, 1)
    # scale made once outside the layers (modeling_beam.py compute_attention_scaling)
    mlp_glu_fp32: bool = False  # the dense MLP's (act(gate.float()) * up.float()).to(dtype) (BeamMLP); gate and up stay
    # referenced to its end
    logit_softcap_fp32: bool = False  # the soft-capping runs on logits.float() (BeamForCausalLM)
    logit_scale: bool = False  # Granite logits / logits_scaling, Cohere logits * logit_scale
    head_input_scale: bool = False  # MiniCPM3: hidden_states / logits_scaling before lm_head (before the last-token
    # slice)
    rotary_fraction: float = 1.0  # partial rotary (NeoX rotary_pct, GPT-J rotary_dim)
    rope_cat: bool = False  # the rotated part is concatenated with the pass-through part even at rotary_fraction 1
    # (modeling_glm4_moe.py apply_rotary_pos_emb: torch.cat([q_embed, q_pass], dim=-1), a copy of q and of k)
    learned_position_offset: int = 0  # OPT stores max_position_embeddings + 2 rows
    max_learned_positions: int = 0  # rows of the learned position table
    positions_unbatched: bool = False  # the learned lookup is (1, seq, hidden) and held by the forward (GPTBigCode)
    # RoPE's cos/sin come from position_ids (1, seq) (the base model's ``cache_position.unsqueeze(0)`` when the caller
    # passes none): one (1, seq, head_dim) pair, broadcast over the batch (Gemma 1-4: checked against the trace)
    rope_tables_unbatched: bool = False
    # the RMSNorm's ``forward(self, x)`` keeps its 16-bit input bound until it returns (GemmaRMSNorm and kin:
    # ``self._norm(x.float())`` ... ``.type_as(x)``, where LlamaRMSNorm rebinds ``hidden_states`` to the fp32 copy)
    norm_input_held: bool = False
    # the RMSNorm runs kernels-community's LigerRMSNorm (transformers' hub kernels: estimator.built_as, Workload
    # hub_kernels): a new output, the fp32 inverse RMS per row, and the input saved for backward (blocks.liger_rms_norm)
    norm_kernel: bool = False
    # the (text) config's own model_type as transformers reads it, where ``family`` names the program that reads it
    # (a Mllama text config reads as llama; a VLM's text config is its language model's type)
    model_type: str = ""
    embedding_layernorm: bool = False  # BLOOM's word_embeddings_layernorm
    final_norm: bool = True
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden)
    logit_softcap: float | None = None  # Gemma 2: tanh soft-capping of the final logits
    attn_logit_softcap: float | None = None  # Gemma 2: soft-capping of attention scores (eager only)
    embed_proj_dim: int | None = None  # OPT-350m projects embeddings in and out
    # Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): kv_lora_rank > 0; head_dim is the q/k head size
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0  # (also a grouped attention's value heads where narrower than head_dim: MiMo-V2-Flash)
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): MLA with a lightning indexer whose top-k selection masks the
    # attention (index_heads > 0)
    index_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # Mixture of experts
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert
    shared_expert_gate: bool = False
    shared_expert_first: bool = False  # the shared expert runs before the router (Qwen2-MoE, ERNIE 4.5)
    shared_expert_bias: bool = False  # the shared expert's linears have biases (HY-V3 HYV3MLP with mlp_bias)
    shared_expert_glu: str = ""  # "clamped": the shared expert is one fused gate_up_proj with gpt-oss's clamped GLU
    # on its chunk(2) halves, then down_proj (modeling_minimax_m3_vl.py MiniMaxM3VLDenseMLP)
    router_bias: bool = False
    router_fp32: bool = False  # the router runs on an fp32 copy of the hidden states (DeepSeek-V3, ERNIE 4.5)
    router_weights_fp32: bool = False  # the top-k weights reach the experts in fp32 (Mixtral: no cast back)
    router_sigmoid: bool = False  # sigmoid scores + correction bias + group-limited top-k (DeepSeek-V3, GLM-4.5)
    router_sigmoid_plain: bool = False  # the sigmoid router picks its top-k of the scores themselves: no correction
    # bias, no groups (FlintTopKRouter)
    moe_extra_params: int = 0  # per MoE layer: ERNIE 4.5's moe_statics correction bias
    expert_bias: bool = False  # gpt-oss: gate_up_proj_bias / down_proj_bias per expert
    expert_glu: str = ""  # "": act(gate) * up of gate_up.chunk(2); "clamped" (gpt-oss): interleaved, clamped GLU;
    # "fp32": act(gate.float()) * up.float(), cast back (Beam);
    # "none": non-gated experts and shared expert, down(act(up(x))) (Nemotron-H: has_gate=False)
    moe_latent_size: int = 0  # Nemotron-H: fc1_latent_proj to this width before the experts, fc2 back after
    moe_fp32_combine: bool = False  # (routed.float() + shared.float()).to(dtype): HY-V3 enable_moe_fp32_combine
    moe_output_scale: bool = False  # the routed experts' sum times routed_scaling_factor in the block (Laguna, Beam)
    moe_post_norm: bool = False  # the block norms its output (the routed + shared sum) with the config's norm
    # (modeling_axk1.py AXK1MoE.post_mlp_layernorm)
    router_topk_first: bool = False  # top-k of the logits, then softmax over the k in the logits' dtype (gpt-oss)
    moe_experts_loop: bool = False  # a Python loop over the experts hit (DbrxExperts): each expert's tokens gathered,
    # matmuls with slices of the stacked weights (select_backward scatters each slice's gradient into a zero-filled
    # stack-sized buffer), the weighted result index_add_-ed into a zeros_like output
    router_softmax_native: bool = False  # the router's softmax keeps the logits' dtype (DbrxFFN: dtype=logits.dtype)
    router_jitter: bool = False  # training multiplies the router input in place by uniform noise (moe_jitter_eps):
    # the noise is saved for backward
    qkv_clamp: bool = False  # the fused q/k/v projection clamped to +-clip_qkv (DBRX, OLMo): clamp saves its input
    moe_dense_dispatch: bool = False  # every expert runs every token (Llama4TextMoe): top-k of the logits scattered
    # into a -inf row, sigmoid in fp32 cast back; hidden.repeat(experts) * scores; two bmm over the experts; the
    # shared expert after them and the experts' sum over experts added in place
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit concatenated to the scores before softmax
    eager_max_softmax: bool = False  # eager attention subtracts the row max from the (masked) scores and runs softmax
    # in their dtype on every layer, a sink column concatenated first only where the layer has sinks; the Python
    # locals are rebound at each step, so no earlier scores stay referenced (modeling_mimo_v2_flash.py
    # eager_attention_forward)
    sink_fp32: bool = False  # the sink attention in fp32 (modeling_flint.py eager_attention_forward): q and the
    # repeated k cast to fp32 for the scores, fp32 sinks concatenated, softmax in fp32 (no max subtraction), the
    # sliced weights cast back to the values' dtype (a copy)
    value_scale: bool = False  # v_proj(x) * attention_value_scale: a new value tensor (MiMoV2FlashAttention.v_scale)
    sink_lse: bool = False  # the sink as an output scale instead (Granite SWA): sigmoid(logsumexp(scores) - sink) in
    # fp32 times the attention output (eager_attention_forward of modeling_granite_swa.py)
    attn_output_gate: bool = False  # Qwen3-Next / Qwen3.5: q_proj also makes a per-head gate; o_proj(out * sigmoid)
    attn_head_gate: bool = False  # LFM3: out * sigmoid(g_proj(x)), one gate per head from its own linear
    # Doge's dynamic mask attention (modeling_doge.py DogeAttention): per key-value head and key, dt_proj(values) ->
    # exp(A * softplus(.)) added to the materialised causal mask as SDPA's float mask (batch, kv heads, q, kv), which
    # requires grad; beyond ``keep_window`` keys only the top-k stay unmasked
    dynamic_mask: bool = False
    keep_window: int = 0
    residual_weights: bool = False  # Doge: input_residual * residual + sublayer (a trainable vector per residual)
    # a derived attention output gate: o_proj(out * act(attn_gate_name(x))) with act "sigmoid" or "softplus_fp32"
    # (F.softplus(g.float()).to(dtype): modeling_laguna.py); "": none. early: the projection runs after v_proj and its
    # output is held through the attention (modeling_afmoe.py gate_states); heads: one gate per head broadcast over
    # head_dim, else one per channel; bias: a per-head bias added to the projection (modeling_beam.py gate_bias)
    attn_gate: str = ""
    attn_gate_early: bool = False
    attn_gate_heads: bool = False
    attn_gate_bias: bool = False
    attn_gate_name: str = "gate_proj"
    mla_q_gate: bool = False  # MLA whose query projection also makes a per-channel output gate: q_gate_proj of
    # cat([q_resid, q_compressed]) gives (heads, qk + v) per token; out * sigmoid(gate.float()) (AXK2Attention)
    gated_norm_rank: int = 0  # the layer's pre-attention norm (and the MoE layers' pre-MLP norm) is RMSNorm times
    # sigmoid(fc2(silu(fc1(y))).float()), fc1 of this rank (AXK2GatedRMSNorm)
    mla_head_gate: str = ""  # MLA output times sigmoid(g_proj(x)), one gate per head: "fp32" (the sigmoid of
    # g_proj(x).float(), cast back: Ling 3's BailingHybridAttention), "native" (in the activation dtype: Dots 3)
    mla_latent_scale: bool = False  # Dots3NoteTextAttention: q_resid * sqrt(hidden / q_lora_rank), the contiguous
    # kv latent normed then * sqrt(hidden / kv_lora_rank), an RMSNorm over the shared rotary key (k_rope_only_layernorm)
    flash_refused: str = ""  # why transformers refuses FlashAttention for the model ("": it does not)
    sdpa: bool = True  # False: transformers has no SDPA path for the family (gpt-oss, VaultGemma:
    # _supports_sdpa False), eager runs
    sdpa_removed_in: str = ""  # the first transformers release without the family's SDPA path ("": none)
    sdpa_added_in: str = ""  # the first transformers release checked to have it ("": every modelled release)
    moe_layers: tuple[int, ...] = ()  # indices of layers whose MLP is a MoE block (empty: none)
    # Attention pattern
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers that use the sliding window (empty: none)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # residual / embedding dropout in training
    embedding_dropout: float | None = None  # the embeddings' own dropout where it differs (None: hidden_dropout)
    source: str = ""
    quantization: Quantization | None = None  # the checkpoint's quantization_config (vramplan.quant)
    checkpoint: CheckpointWeights | None = None  # the checkpoint's safetensors headers, summed (vramplan.checkpoint)
    # State-space / hybrid models (vramplan.ssm): the mixer of each layer ("attention", "mamba2"); empty: every
    # layer is attention. Layers listed in mlp_free_layers have no MLP (a pure Mamba block).
    mixers: tuple[str, ...] = ()
    mlp_free_layers: tuple[int, ...] = ()
    # Layers the model builds (their parameters count, adapters attach) but its forward skips: MllamaTextModel skips
    # its cross-attention layers when no image states are given (modeling_mllama.py). No activations, no cache, no
    # gradients; ``idle_params`` are their parameters outside the programs' modules (included in extra_params).
    idle_layers: tuple[int, ...] = ()
    idle_params: int = 0
    ssm: SSMSpec | None = None
    shared_block: SharedBlock | None = None  # Zamba2's shared transformer block (vramplan.ssm)
    residual_fp32: bool = False  # Mamba blocks' residual_in_fp32: the residual stream is fp32 after layer 0
    logits_fp32: bool = False  # the CausalLM casts the logits with .float() (Mamba-2, Nemotron-H)
    mlp_multipliers: bool = False  # Falcon-H1: gate_proj(x) * gate_multiplier, down_proj(y) * down_multiplier
    key_multiplier: bool = False  # Falcon-H1: key states * key_multiplier
    program_version: str = "5.17"  # the transformers release whose modeling code the block program follows
    notes: tuple[str, ...] = ()  # what the spec leaves out (a multimodal config's vision tower), shown as warnings
    multimodal: MultimodalSpec | None = None  # a vision-language model's tower and projector (vramplan.multimodal)
    # Heterogeneous stacks (modeling_gemma4.py, transformers 5.24): groups of layers whose attention or MLP differs
    # (LayerOverride); :meth:`layer` gives the spec one layer is built from
    layer_overrides: tuple[LayerOverride, ...] = ()
    v_from_k: bool = False  # attention_k_eq_v: no v_proj; the values are the key projection (before the k norm)
    v_norm: bool = False  # a scale-free RMSNorm on the values (Gemma4TextAttention.v_norm, with_scale=False)
    kv_shared: bool = False  # the layer reuses the keys/values an earlier layer of its type stored: no k/v
    # projections, norms or cache of its own (Gemma 4 / Gemma 3n num_kv_shared_layers, kv_sharing_modes "reuse")
    kv_store: bool = False  # the layer's keys/values are held for the sharing layers until the forward returns
    per_layer_input: int = 0  # hidden_size_per_layer_input: per-layer embeddings (PLE) feeding a gated branch per
    # layer (Gemma 3n / Gemma 4); 0: none
    per_layer_vocab: int = 0  # rows of the per-layer embedding table (vocab_size_per_layer_input)
    # Gemma 3n (vramplan.gemma3n): AltUp copies of the residual stream (0: none), LAuReL's rank, the scaled
    # correction of copy 0, Gaussian top-k sparsity of the MLP's gate (per layer: LayerOverride.act_sparsity), and
    # whether a prefill slices KV-sharing layers to the last token (Gemma 4 does; Gemma 3n does not)
    altup_inputs: int = 0
    laurel_rank: int = 0
    altup_correct_scale: bool = False
    act_sparsity: bool = False
    kv_shared_prefill_slice: bool = True
    # MiniMax (vramplan.lightning): the layer's residuals are its normed input, scaled by alpha/beta factors; the
    # lightning attention layers' block size
    normed_residual: bool = False
    # ModernBERT decoder: layer 0 has no attention norm (nn.Identity); the head runs norm(act(dense(x))) before the
    # output projection; the un-normed embeddings are not held by the forward (no ``inputs_embeds`` variable: its
    # mask kwargs hold the normed ones, as other families' ``inputs_embeds``)
    attn_norm: bool = True
    head_transform: bool = False
    head_transform_bias: bool = False
    raw_embeds_held: bool = True
    lightning_block: int = 256
    moe_beside_mlp: bool = False  # the MoE block runs beside the dense MLP on the same residual, with its own norms
    # and a scaled, scale-free-normed router input (Gemma 4 enable_moe_block: Gemma4TextRouter, Gemma4TextExperts)
    # Looped stacks (vramplan.loops): the forward calls groups of the spec's layers several times, some under
    # torch.no_grad (StackRun), instead of every layer once; ``carried_states`` hidden-state tensors carry between the
    # calls: state 0 starts as the scaled embeddings, the others as a fresh copy of a frozen initial vector
    # (HrmTextModel.z_L_init.expand_as(...).contiguous()). Each call writes its own cache slot. Empty: a plain stack.
    stack_runs: tuple[StackRun, ...] = ()
    carried_states: int = 0
    # Inkling (vramplan.inkling): the layers' own sizes, (d_rel, the full layers' relative extent, the short
    # convolutions' kernel, the shared experts, the generation (1: Inkling, 2: Inkling 2), Inkling 2's layers per
    # block-attention-residual block); empty: not an Inkling model
    inkling: tuple[int, ...] = ()
    # LongCat-Flash (vramplan.longcat, modeling_longcat_flash.py): each decoder layer runs two attention + dense MLP
    # sublayer pairs, and a MoE block on the first pair's normed MLP input whose output is added at the layer's end
    # (the shortcut); its router also scores ``zero_experts`` identity experts (zero-compute: the token itself, times
    # its routing weight); its MLA scales the query halves and the normed kv latent by sqrt(hidden / lora rank)
    dual_sublayers: bool = False
    zero_experts: int = 0
    mla_lora_scale: bool = False
    # Hyper-connections (vramplan.hyper; modeling_hy_v4.py HYV4HyperConnection, modeling_deepseek_v4.py): the residual
    # stream is hc_mult copies of the hidden state; each sublayer reads their weighted sum (fp32 weights from a linear
    # of the flattened, RMS-scaled streams) and writes its output back to every copy times a per-copy weight; an
    # HC head collapses the copies before the final norm. 0: a plain residual stream
    hc_mult: int = 0
    # parameters transformers keeps in fp32 whatever the load dtype (_keep_in_fp32_modules_strict: HY-V4's
    # hyper-connection weights, router weight, indexer weights_proj and k_norm, sinks; its lm_head), and an fp32
    # lm_head (the hidden states cast to fp32 before it: fp32 logits)
    fp32_params: int = 0
    head_fp32: bool = False
    sinks_fp32: bool = False  # the eager attention's sink logits are fp32: the concatenated scores promote to fp32
    mla_out_gate: bool = False  # MLA output times sigmoid(gate_proj(x)), one gate per value channel, computed before
    # the attention and held through it (HYV4Attention gate_states)
    index_shared: bool = False  # the layer reuses the previous indexer layer's top-k (HY-V4 indexer_types "shared"):
    # no indexer of its own, the same index mask built from the held indices
    index_fp32_weights: bool = False  # the indexer's k_norm and weights_proj run in fp32 on fp32 copies (HYV4Indexer)
    # DeepSeek-V4 (vramplan.dsv4, modeling_deepseek_v4.py): (o_groups, o_lora_rank, hc_sinkhorn_iters, the CSA
    # compression rate, the HCA one, qk_rope_head_dim); empty: not DeepSeek-V4. Per layer (layer_overrides): the
    # attention's compression rate (0: sliding only, the CSA rate: compressor and Lightning Indexer, the HCA rate:
    # compressor only) and whether its MoE routes by the token-id table
    dsv4: tuple[int, ...] = ()
    compress_rate: int = 0
    hash_routed: bool = False

    # ---- heterogeneous stacks --------------------------------------------------------
    def variant(self, index: int) -> int:
        """Which :attr:`layer_overrides` group layer ``index`` belongs to (-1: none)."""
        for j, o in enumerate(self.layer_overrides):
            if index in o.layers:
                return j
        return -1

    def layer(self, index: int) -> ModelSpec:
        """The spec layer ``index`` is built from: the model-wide facts with its group's overrides."""
        return self.at_variant(self.variant(index)) if self.layer_overrides else self

    def at_variant(self, variant: int) -> ModelSpec:
        return _at_variant(self, variant) if variant >= 0 else self

    @property
    def kv_cache_layers_per_token(self) -> int:
        """Elements every layer together caches per token (layers that share another's keys and values cache
        nothing; the others by their own head sizes)."""
        return sum(self.layer(i).kv_cache_per_token for i in range(self.num_layers)
                   if self.mixer(i) in ATTENTION_MIXERS and not self.layer(i).kv_shared and i not in self.idle_layers)

    # ---- derived sizes --------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_cache_per_token(self) -> int:
        """Elements one layer caches per token: keys and values, or MLA's compressed latent and rotary key."""
        per = 2 if self.dual_sublayers else 1  # LongCat-Flash: two attention sublayers, two caches per layer
        if self.kv_lora_rank:
            return per * (self.kv_lora_rank + self.qk_rope_head_dim)
        return per * (self.kv_dim + self.v_dim)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def value_head_dim(self) -> int:
        """A value head's width: ``v_head_dim`` where the values are narrower than the q/k heads (MLA; MiMo-V2-Flash's
        grouped attention), else ``head_dim``."""
        return self.v_head_dim or self.head_dim

    @property
    def v_dim(self) -> int:
        """Width of the value projection of a non-MLA attention (KV heads x value head width)."""
        return self.num_kv_heads * self.value_head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def mixer(self, index: int) -> str:
        """The token mixer of layer ``index``: "attention", "mamba2", "mamba" (Mamba-1), "conv" (LFM2), "gdn" (gated
        DeltaNet: Qwen3-Next, Qwen3.5), "rglru" (RecurrentGemma's RG-LRU block) or "parallel" (Falcon-H1: attention
        and Mamba-2 side by side)."""
        return self.mixers[index] if self.mixers else "attention"

    @property
    def attention_layers(self) -> int:
        """Layers that keep a KV cache."""
        return sum(1 for i in range(self.num_layers) if self.mixer(i) in ATTENTION_MIXERS and i not in self.idle_layers)

    @property
    def num_sliding_layers(self) -> int:
        return len(self.sliding_layers)


@lru_cache(maxsize=1024)
def _at_variant(spec: ModelSpec, variant: int) -> ModelSpec:
    o = spec.layer_overrides[variant]
    changes: dict[str, object] = {}
    for name in ("head_dim", "num_kv_heads", "intermediate_size", "num_heads", "kv_lora_rank"):
        if getattr(o, name):
            changes[name] = getattr(o, name)
    if o.dsa is False:
        changes["index_heads"] = 0
    if o.compress_rate:
        changes["compress_rate"] = o.compress_rate
    for name in ("v_from_k", "kv_shared", "kv_store", "act_sparsity", "attn_norm", "index_shared", "attention_sinks",
                 "hash_routed"):
        if getattr(o, name) is not None:
            changes[name] = getattr(o, name)
    return replace(spec, **changes)  # type: ignore[arg-type]
