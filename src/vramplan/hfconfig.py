"""Read a Hugging Face ``config.json`` into a :class:`~vramplan.spec.ModelSpec`.

Every field is read with its type and range checked, and with the default that the family's
``transformers`` configuration class uses when the key is absent (``LlamaConfig``,
``GPT2Config``, … in transformers 5.x). Anything unreadable raises :class:`ConfigError` with
one line saying which field and what to do. No network, no remote code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ._files import FileTooLarge, NotAFile, read_text_limited
from .errors import ConfigError
from .spec import Activation, LayerOverride, MLPKind, ModelSpec, NormKind, PositionKind

__all__ = ["PROGRAMS_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES", "installed_transformers", "load_config_file",
           "spec_from_config", "version_warning"]

MAX_CONFIG_BYTES = 4 << 20  # a real config.json is a few KiB; refuse anything absurd
_MAX_DIM = 1 << 22  # 4M: above any real hidden/vocab/intermediate size
_MAX_LAYERS = 4096
_MISSING: Any = object()

_ACTIVATIONS = {
    "silu": Activation.SILU, "swish": Activation.SILU,
    "gelu": Activation.GELU, "gelu_python": Activation.GELU,
    "gelu_new": Activation.GELU_NEW, "gelu_fast": Activation.GELU_NEW,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "relu": Activation.RELU, "relu2": Activation.RELU2,
    "xielu": Activation.XIELU,  # ReLUSquaredActivation (activations.py)
}


class _Cfg:
    """Typed, range-checked access to a config mapping."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def with_defaults(self, defaults: Mapping[str, Any]) -> _Cfg:
        """The config with ``defaults`` (a configuration class's ``__init__`` defaults) for the keys it lacks; a key
        it sets to null stays null. Keys keep the config's order, the added ones after them."""
        raw = dict(self.raw)
        for key, value in defaults.items():
            raw.setdefault(key, value)
        return _Cfg(raw, self.where)

    def _get(self, keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
        for k in keys:
            if k in self.raw and self.raw[k] is not None:
                return k, self.raw[k]
        if default is _MISSING:
            raise ConfigError(f"{self.where}: missing field {keys[0]!r}; add it to config.json "
                              "(copy it from the model's Hugging Face page)")
        return keys[0], default

    def int_(self, *keys: str, default: Any = _MISSING, lo: int = 1, hi: int = _MAX_DIM) -> int:
        k, v = self._get(keys, default)
        if v is None:
            return None  # type: ignore[return-value]  # only opt_int passes default=None
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ConfigError(f"{self.where}: field {k!r} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{self.where}: field {k!r} = {v} is outside the plausible range {lo}..{hi}")
        return v

    def opt_int(self, *keys: str, lo: int = 1, hi: int = _MAX_DIM) -> int | None:
        return self.int_(*keys, default=None, lo=lo, hi=hi)

    def float_(self, *keys: str, default: Any = _MISSING, lo: float = 0.0, hi: float = 1e9) -> float:
        k, v = self._get(keys, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{self.where}: field {k!r} must be a number, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{self.where}: field {k!r} = {v} is outside {lo}..{hi}")
        return float(v)

    def opt_float(self, *keys: str) -> float | None:
        _, v = self._get(keys, None)
        if v is None:
            return None
        return self.float_(*keys)

    def bool_(self, *keys: str, default: Any = _MISSING) -> bool:
        k, v = self._get(keys, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.where}: field {k!r} must be true or false, got {v!r}")
        return v

    def str_(self, *keys: str, default: Any = _MISSING) -> str:
        k, v = self._get(keys, default)
        if not isinstance(v, str):
            raise ConfigError(f"{self.where}: field {k!r} must be a string, got {v!r}")
        return v

    def activation(self, *keys: str, default: str) -> Activation:
        name = self.str_(*keys, default=default)
        try:
            return _ACTIVATIONS[name]
        except KeyError:
            raise ConfigError(f"{self.where}: activation {name!r} is not supported; "
                              f"supported: {', '.join(sorted(_ACTIVATIONS))}") from None

    def int_list(self, key: str) -> list[int]:
        v = self.raw.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{self.where}: field {key!r} must be a list of integers")
        return list(v)


def _check_heads(c: _Cfg, hidden: int, heads: int, kv: int, head_dim: int | None, floor: bool = False) -> int:
    if kv > heads or heads % kv:
        raise ConfigError(f"{c.where}: num_attention_heads ({heads}) must be a multiple of the key/value "
                          f"heads ({kv})")
    if head_dim is None:
        if hidden % heads and not floor:
            raise ConfigError(f"{c.where}: hidden_size ({hidden}) is not divisible by num_attention_heads "
                              f"({heads}); set head_dim")
        head_dim = hidden // heads
    return head_dim


def _layer_types(c: _Cfg, n_layers: int, window: int | None, default_every: int = 0, full_at: int = -1,
                 full_lead: int = 0, full_last: bool = False) -> tuple[int, ...]:
    """Indices of sliding-window layers: from ``layer_types`` when given, else a fixed pattern."""
    if window is None:
        return ()
    types = c.raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{c.where}: layer_types must list one string per layer ({n_layers})")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if default_every:
        # Gemma 2: even layers are local; Gemma 3: 5 local then 1 global (sliding_window_pattern); Granite SWA:
        # global where i % 4 == 0
        # (the first full_lead layers global as well: MiMo-V2-Flash 1, Flint 2; and the last: Flint)
        full = full_at % default_every
        return tuple(i for i in range(n_layers) if i % default_every != full and i >= full_lead
                     and not (full_last and i == n_layers - 1))
    return tuple(range(n_layers))


# ---- families ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Facts:
    """What a LLaMA-class family's modeling file fixes beyond its config (transformers 5.24 ``modeling_*.py``).

    Every difference between these families that decides memory is a field here, read by one reader
    (:func:`_llama_like`) into the spec: the block programs branch on the spec's fields, never on names.
    """

    gemma: bool = False  # GemmaRMSNorm (1 + w), sqrt(hidden) embedding scale, tied by default
    tie: bool = False  # default of tie_word_embeddings
    qkv_bias: bool | None = None  # fixed q/k/v bias (Qwen2: True); None: the config's bias key
    bias_key: str = "attention_bias"  # config key of the q/k/v/o bias flag
    bias_default: bool = False  # its default (Glm4Config: True)
    o_bias: bool = True  # whether that flag also gives o_proj a bias
    mlp_bias_key: str = "mlp_bias"
    mlp_bias_default: bool = False  # its default (Phi: the MLP always has biases)
    lm_head_bias: bool = False  # Phi: lm_head has a bias
    lm_head_bias_key: str = ""  # config flag that gives lm_head a bias (PhiMoE lm_head_bias)
    layout: str = "pre"  # pre: norm -> sublayer; post: sublayer -> norm (OLMo 2); sandwich: both (Gemma 2)
    parallel: bool = False  # attention and MLP read one normed input and add to the residual (Cohere)
    post_norm_key: str = ""  # config flag that adds a norm after each sublayer (HyperCLOVA X use_post_norm: sandwich)
    norm_bias: bool = False  # the norms are nn.LayerNorm with a bias (Jais 2)
    qk_norm: str = ""  # "head": RMSNorm over head_dim; "full": over all heads' q / k (OLMo 2)
    qk_norm_key: str = ""  # config flag that turns the per-head q/k norm on (GLM-4.5: use_qk_norm)
    qk_norm_head_weights: bool = False  # the per-head q/k norms hold one weight row per head, no bias (Cohere
    # use_qk_norm: CohereLayerNorm((heads, head_dim)); StableLM qk_layernorm: one LayerNorm per head)
    qk_norm_split: bool = False  # StableLmLayerNormPerHead: torch.split into heads, a norm each, torch.cat back
    held_through_mlp: tuple[str, ...] = ()  # StableLM: the layer keeps its normed input and attention output
    # through the MLP
    parallel_key: str = ""  # config flag that makes the block parallel (StableLM use_parallel_residual)
    embed_norm: bool = False  # a norm of the embeddings before the first layer (NanoChat: the final norm's module)
    softcap_default: float | None = None  # final_logit_softcapping when the config leaves it out (NanoChat: 15)
    o_name: str = ""  # the attention output projection's name where the layout's default is not it (Persimmon: dense)
    qk_norm_default: bool = False  # the qk_norm_key's default in the config class (Persimmon: True)
    refuse_keys: tuple[str, ...] = ()  # config keys whose non-null value changes what the facts model (refused)
    act_default: str = ""  # hidden_act when the config leaves it out, where not silu (NemotronConfig: relu2)
    rotary_default: float = 1.0  # partial_rotary_factor when the config leaves it out (the config class's default)
    qk_norm_after_rope: bool = False  # HunYuan dense V1: query_layernorm / key_layernorm on the rotated q/k
    attn_temperature: bool = False  # Ministral 3: q scaled by get_llama_4_attn_scale after RoPE
    qk_l2_key: str = ""  # config flag of Llama 4's weightless L2 norm of the rotated q/k on RoPE layers (use_qk_norm)
    eager_softmax_native: bool = False  # eager softmax in the scores' dtype (Llama 4)
    nope_temperature_key: str = ""  # config flag of Llama 4's fp32 query temperature on NoPE layers
    # (attn_temperature_tuning)
    gate_up_fused: bool = False
    mlp_plain: bool = False  # down_proj(act(up_proj(x))) without a gate (NemotronMLP: Arcee)
    sub_norms: bool = False  # BitNet: RMSNorm of the attention output before o_proj and of act(gate) * up before
    # down_proj (attn_sub_norm, ffn_sub_norm)
    mlp_names: tuple[str, ...] = ()  # the ungated MLP's two linears when not up_proj/down_proj (StarCoder 2)
    dropout_key: str = ""  # config key of the residual dropout after attention and MLP (StarCoder 2)
    embed_dropout_key: str = ""  # config key of the dropout on the embeddings
    qkv_fused: bool = False
    rope: str = "half"  # half | interleave (GLM cos/sin repeat_interleave) | fp32 (ERNIE, Cohere: q.float())
    # | fp32_tables (OLMo: the rotary module returns fp32 cos/sin, apply_rotary_pos_emb casts back)
    rope_interleave_fp32: bool = False  # ERNIE 4.5: both
    rope_cat: bool = False  # apply_rotary_pos_emb concatenates the rotated part with the pass-through rest even when
    # that is empty (torch.cat([q_embed, q_pass]): GLM-4.5, GLM-4, Nemotron, Phi-3)
    dynamic_mask: bool = False  # Doge's dynamic mask attention (ModelSpec.dynamic_mask)
    residual_weights: bool = False  # Doge's trainable residual scales (ModelSpec.residual_weights)
    nope: str = ""  # layers without RoPE: "no_rope_layers" (SmolLM3), "global" (EXAONE 4, Cohere 2 full layers),
    # "rope_params_none" (a layer type whose rope_parameters entry is None: Cohere Compass)
    sliding: str = ""  # "all" (Mistral), "qwen" (use_sliding_window + max_window_layers), "types" (layer_types,
    # else a pattern of sliding_window_pattern)
    sliding_every: int = 0  # default pattern when layer_types is absent (Gemma 2: 2, Gemma 3: 6)
    sliding_pattern_key: str = ""
    softcap: bool = False  # Gemma 2 final/attention logit soft-capping
    multipliers: bool = False  # Granite: embedding/residual multipliers and logits scaling
    logit_scale_key: str = ""  # Cohere: logits * logit_scale
    norm: NormKind = NormKind.RMSNORM
    moe: str = ""  # "mixtral" | "qwen" (reader of the MoE fields)
    # a derived recipe whose MoE block computes, op for op, what this family's block computes (vramplan.derive
    # ._compose): the block program's flags are that family's; the sizes are read from the type's own keys
    moe_family: str = ""
    moe_keys: tuple[tuple[str, str], ...] = ()  # (spec field, config key): num_experts, experts_per_token,
    # moe_intermediate_size, shared_expert_intermediate_size, or shared_experts (a count of expert-wide MLPs)
    moe_rule: tuple[tuple[str, ...], ...] = ()  # which layers hold the MoE block: every condition holds (_moe_rule)
    moe_flags: tuple[tuple[str, Any], ...] = ()  # (spec field, value): a block composed from its parts (no family's)
    moe_rule_default: tuple[tuple[str, ...], ...] = ()  # the rule when the config leaves out the per-layer list the
    # first one reads (the config class then builds that list from other keys)
    moe_only: bool = False  # the derivation saw MoE blocks and no dense MLP layer: a config whose rule leaves a layer
    # dense (Cohere2-MoE's prefix_dense layers, MiniMax M3's "dense" mlp_layer_types) is refused, not read as this MLP
    layer_kinds: tuple[str, ...] = ()  # the layer_types entries the derivation checked: another kind (MiniMax M3's
    # "minimax_m3_sparse" indexer layers) is refused
    partial_rotary: bool = False  # reads partial_rotary_factor
    aliases: tuple[tuple[str, str], ...] = ()  # transformers attribute_map: (config key, canonical key)
    mla: bool = False  # multi-head latent attention (DeepSeek-V3)
    # the MLA fields' defaults where the config omits them (the config class's): q_lora_rank (0: a plain q_proj),
    # kv_lora_rank (0: required), qk_nope_head_dim, qk_rope_head_dim, v_head_dim (0: hidden_size // heads)
    mla_defaults: tuple[int, int, int, int, int] = (0, 0, 128, 64, 128)
    mlp_types: int = -1  # >= 0: the MoE layers are the "sparse" entries of mlp_layer_types, whose default has this
    # many leading dense layers (GLM-4.7-Flash: first_k_dense_replace is not read); -2: the same, its default from
    # first_k_dense_replace (DeepSeek-V3.2); -1: first_k_dense_replace
    dsa: bool = False  # DeepSeek Sparse Attention's indexer (index_n_heads, index_head_dim, index_topk, indexer_types)
    head_scale: bool = False  # MiniCPM3: hidden_states / logits_scaling before lm_head (embedding and residual
    # scales as Granite's multipliers)
    sdpa: bool = True  # the model class accepts attn_implementation="sdpa" (``_supports_sdpa``)
    sinks: bool = False  # gpt-oss: attention sinks, eager attention only (no SDPA path)
    diff_attn: bool = False  # DiffLlama's differential attention
    sink_lse: bool = False  # Granite SWA: the sink as a sigmoid(logsumexp - sink) scale of the attention output
    sliding_full_at: int = -1  # default pattern's full layer within each sliding_every (-1: the last; Granite SWA: 0)
    sdpa_removed_in: str = ""  # the first transformers release checked to have no SDPA path for the family
    version: str = "5.17"  # the transformers release whose modeling file the program was written from and checked on
    # an attention output gate (derived: vramplan.derive._compose _GATES): o_proj(out * act(gate_proj(x))), act
    # "sigmoid" or "softplus_fp32" ("": none); early: the gate's projection runs after v_proj and is held through the
    # attention (AFMoE); heads: one gate per head (Laguna), else one per channel; bias: a per-head bias added to the
    # projection first (Beam); name: the gate linear's module name; heads_key: the boolean config key that makes it
    # one per head when True and one per channel when False (Laguna gating)
    # (list key, scalar key): a per-layer list the config may hold whose every entry must be the scalar's value
    # (Laguna's num_attention_heads_per_layer: per-layer head counts are not modelled)
    uniform_keys: tuple[tuple[str, str], ...] = ()
    embed_scale_key: str = ""  # boolean config key that scales the embeddings by sqrt(hidden) (AFMoE mup_enabled)
    attn_gate: str = ""
    attn_gate_early: bool = False
    attn_gate_heads: bool = False
    attn_gate_bias: bool = False
    attn_gate_name: str = ""
    attn_gate_heads_key: str = ""
    # MiMo-V2-Flash (modeling_mimo_v2_flash.py MiMoV2FlashAttention): the sliding layers alone have learned sinks and
    # sliding_kv_mult x num_key_value_heads KV heads
    sliding_sinks: bool = False
    sliding_full_lead: int = 0  # the default layer pattern makes the first N layers global as well (MiMo-V2-Flash: 1,
    # Flint: 2)
    sliding_full_last: bool = False  # ... and the last layer (Flint)
    sliding_kv_mult: int = 1
    v_head_key: str = ""  # config key of the value heads' width where it differs from head_dim (v_head_dim)
    window_size_key: str = ""  # config key of the window without the query token, which sets sliding_window to it + 1
    value_scale: bool = False  # the values are multiplied by a constant after v_proj (attention_value_scale)
    eager_max_softmax: bool = False  # eager attention: scores - row max, softmax in their dtype (ModelSpec field)
    sink_fp32: bool = False  # the sink attention's scores, sinks and softmax in fp32 (Flint; ModelSpec.sink_fp32)
    # Beam (modeling_beam.py): ModelSpec.residual_depth_scale, nope_query_scale, mlp_glu_fp32, logit_softcap_fp32
    residual_depth_scale: bool = False
    nope_query_scale: bool = False
    mlp_glu_fp32: bool = False
    softcap_fp32: bool = False
    # the query projection also makes a per-channel sigmoid output gate, Qwen3-Next's layout (heads, 2 x head_dim)
    # chunked into query and gate, under this module name ("": none; MiniCPM5-MoE: q_gate_proj)
    q_gate_name: str = ""
    # DeepSeek-style MoE keys' defaults where the config class's differ from DeepSeek-V3's: n_shared_experts, and
    # first_k_dense_replace when mlp_layer_types is absent (-1: the reader's own)
    shared_experts_default: int = 0
    first_dense_default: int = -1


_FAMILIES: dict[str, _Facts] = {
    "llama": _Facts(),
    "mistral": _Facts(sliding="all"),
    "ministral": _Facts(sliding="types"),
    "mixtral": _Facts(sliding="all", moe="mixtral"),
    "granitemoe": _Facts(version="5.24", multipliers=True, moe="granitemoe"),
    "granitemoeshared": _Facts(version="5.24", multipliers=True, moe="granitemoe"),
    "glm4_moe": _Facts(version="5.24", o_bias=False, partial_rotary=True, rope_cat=True, qk_norm_key="use_qk_norm",
                       moe="deepseek"),
    "deepseek_v3": _Facts(version="5.24", moe="deepseek", mla=True),
    # DeepSeek-V2 / V2-Lite (modeling_deepseek_v2.py): DeepSeek-V3's MLA with the complex rotary of apply_rotary_emb
    # (q/k rotary parts as fp32 complex numbers times freqs_cis, cast back), and a softmax router in fp32
    # (DeepseekV2TopkRouter: greedy or group_limited_greedy top-k, the weights times routed_scaling_factor stay fp32)
    "deepseek_v2": _Facts(version="5.24", moe="deepseek_v2", mla=True, rope="complex"),
    # GLM-4.7-Flash (modeling_glm4_moe_lite.py): DeepSeek-V3's MLA, router and experts; its MoE layers are the
    # "sparse" entries of mlp_layer_types (default: layer 0 dense)
    "glm4_moe_lite": _Facts(version="5.24", moe="deepseek", mla=True, mlp_types=1),
    # DeepSeek-V3.2 (modeling_deepseek_v32.py): DeepSeek-V3's MLA and MoE with the DSA lightning indexer (no_grad:
    # fp32 per-head scores of every key, ReLU, weighted sum, top-k) whose selection masks the attention
    "deepseek_v32": _Facts(version="5.24", moe="deepseek", mla=True, dsa=True, mlp_types=-2,
                           mla_defaults=(1536, 512, 128, 64, 128)),
    # GLM-5 (modeling_glm_moe_dsa.py): DeepSeek-V3.2's layer, the indexer's RoPE interleaved; indexer_types "shared"
    # layers (reusing the previous layer's top-k) are refused
    "glm_moe_dsa": _Facts(version="5.24", moe="deepseek", mla=True, dsa=True, mlp_types=-2,
                          mla_defaults=(2048, 512, 192, 64, 256)),
    # MiniCPM3 (modeling_minicpm3.py): a dense LLaMA layer with DeepSeek's MLA (RoPE on halves, not interleaved),
    # embeddings * scale_emb, each residual branch * scale_depth / sqrt(layers), the final hidden states /
    # (hidden_size / dim_model_base) before a tied lm_head
    "minicpm3": _Facts(version="5.24", tie=True, mla=True, mla_defaults=(768, 256, 64, 32, 0), head_scale=True),
    "ernie4_5_moe": _Facts(version="5.24", tie=True, bias_key="use_bias", mlp_bias_key="use_bias",
                           rope="interleave", rope_interleave_fp32=True, moe="ernie"),
    "qwen2": _Facts(qkv_bias=True, o_bias=False, sliding="qwen"),
    "qwen2_moe": _Facts(qkv_bias=True, o_bias=False, sliding="qwen", moe="qwen"),
    "qwen3": _Facts(qk_norm="head", sliding="qwen"),
    "qwen3_moe": _Facts(qk_norm="head", sliding="qwen", moe="qwen"),
    "gemma": _Facts(gemma=True, tie=True),
    # transformers 5.24's Gemma2PreTrainedModel sets _supports_sdpa = False ("sdpa does not support softcapping"):
    # SDPA falls back to eager; 5.17 (the release the calibration and grid rows ran) had the SDPA path
    "gemma2": _Facts(gemma=True, tie=True, layout="sandwich", sliding="types", sliding_every=2, softcap=True,
                     sdpa_removed_in="5.24"),
    "gemma3_text": _Facts(gemma=True, tie=True, layout="sandwich", qk_norm="head", sliding="types",
                          sliding_every=6, sliding_pattern_key="sliding_window_pattern"),
    "phi3": _Facts(qkv_fused=True, gate_up_fused=True, sliding="all", partial_rotary=True),
    # LlamaForCausalLM under other names (transformers' attribute_map renames their keys)
    "exaone": _Facts(aliases=(("num_layers", "num_hidden_layers"), ("layer_norm_epsilon", "rms_norm_eps"),
                              ("activation_function", "hidden_act"))),
    "internlm3": _Facts(aliases=(("qkv_bias", "attention_bias"), ("bias", "mlp_bias"))),
    "iquestcoder": _Facts(),
    # 2025 LLaMA-class families
    "olmo2": _Facts(version="5.24", layout="post", qk_norm="full"),
    # modeling_gpt_oss.py: attention sinks (eager only: _supports_sdpa False), sliding/full layer_types, RoPE on
    # chunk halves, RMSNorm multiplying its fp32 states by the weight before the cast, a top-k-then-softmax router with
    # a bias, clamped-GLU experts with biases (grouped_mm, transposed, interleaved gate/up)
    "gpt_oss": _Facts(version="5.24", bias_default=True, sliding="types", sliding_every=2, rope="chunk",
                      norm=NormKind.FP32_WEIGHT_RMSNORM, moe="gpt_oss", sinks=True),
    # modeling_olmoe.py: LLaMA's layout, q/k RMSNorm over all heads, every MLP a MoE block (Qwen-style router)
    "olmoe": _Facts(version="5.24", qk_norm="full", moe="olmoe"),
    # modeling_dots1.py: Qwen3's attention (per-head q/k norm, sliding layer_types) with DeepSeek-V3's MoE (fp32 sigmoid
    # router with correction bias and groups, shared experts after the routed ones, first_k_dense_replace)
    "dots1": _Facts(version="5.24", qk_norm="head", sliding="types", moe="deepseek"),
    # modeling_flex_olmo.py: OLMo 2's post-norm layout with OLMoE's MoE block
    "flex_olmo": _Facts(version="5.24", layout="post", qk_norm="full", moe="olmoe",
                        norm=NormKind.FP32_WEIGHT_RMSNORM,  # (weight * fp32 states).to(input dtype)
                        aliases=(("num_local_experts", "num_experts"),)),
    "olmo3": _Facts(version="5.24", layout="post", qk_norm="full", sliding="types", sliding_every=4),
    "smollm3": _Facts(version="5.24", tie=True, nope="no_rope_layers", sliding="qwen"),
    "granite": _Facts(version="5.24", multipliers=True),
    "glm4": _Facts(version="5.24", bias_default=True, o_bias=False, layout="sandwich", gate_up_fused=True,
                   rope="interleave", partial_rotary=True, rope_cat=True),
    "ernie4_5": _Facts(version="5.24", tie=True, bias_key="use_bias", mlp_bias_key="use_bias", rope="interleave",
                       rope_interleave_fp32=True),
    "exaone4": _Facts(version="5.24", layout="post", qk_norm="head", nope="global", sliding="types", sliding_every=4,
                      sliding_pattern_key="sliding_window_pattern"),
    "cohere2": _Facts(version="5.24", tie=True, parallel=True, norm=NormKind.COHERE_LAYERNORM, rope="fp32",
                      nope="global", sliding="types", sliding_every=4, sliding_pattern_key="sliding_window_pattern",
                      logit_scale_key="logit_scale"),
    # Cohere Compass's text decoder (modular_cohere_compass.py, transformers 5.24): Cohere 2's parallel layers,
    # LayerNorm and logit scale, with Qwen3's rotate-half RoPE applied in the model dtype and its tables per layer
    # type (CohereCompassRotaryEmbedding: M-RoPE sections recomposed to one (batch, seq, head_dim) table); a layer
    # type whose rope_parameters entry is None has no RoPE
    "cohere_compass_text": _Facts(version="5.24", tie=True, parallel=True, norm=NormKind.COHERE_LAYERNORM,
                                  nope="rope_params_none", sliding="types", logit_scale_key="logit_scale"),
    # Doge (modeling_doge.py, transformers 5.24): per-head q/k RMSNorms, dynamic mask attention (dt_proj over the
    # values, exp(A * softplus) per key added to the always-materialised causal mask: SDPA's float mask), residuals
    # scaled by trainable vectors (input_residual, post_attention_residual); the cross-domain MoE (is_moe) refused
    "doge": _Facts(version="5.24", qk_norm="head", dynamic_mask=True, residual_weights=True),
    "helium": _Facts(version="5.24"),
    # StableLM (modeling_stablelm.py): LLaMA's gated MLP with biased LayerNorms, q/k/v biases by use_qkv_bias
    # (o_proj none), partial rotary on the first rotary_ndims of each head (0.25 by default), use_parallel_residual
    # (one norm feeding attention and MLP), qk_layernorm (a LayerNorm per head over split heads, concatenated); the
    # layer's locals hold the normed input and the attention output through the MLP;
    # the nn.Dropout(hidden_dropout) after the MLP is 0 in the published configs and not modelled
    "stablelm": _Facts(version="5.24", norm=NormKind.LAYERNORM, norm_bias=True, bias_key="use_qkv_bias",
                       o_bias=False, partial_rotary=True, rotary_default=0.25, qk_norm_key="qk_layernorm",
                       qk_norm_head_weights=True, qk_norm_split=True, parallel_key="use_parallel_residual",
                       held_through_mlp=("normed", "attn")),
    # Nemotron-4 / Minitron (modeling_nemotron.py): LayerNorm1P (F.layer_norm with weight + 1 and a bias, outside
    # autocast), partial rotary (0.5 by default), attention_bias on q/k/v/o, an ungated up_proj -> relu2 -> down_proj
    # MLP with mlp_bias
    "nemotron": _Facts(version="5.24", norm=NormKind.LAYERNORM, norm_bias=True, partial_rotary=True,
                       rotary_default=0.5, rope_cat=True, mlp_plain=True, act_default="relu2"),
    # Command-R (modeling_cohere.py): Cohere 2's parallel block, CohereLayerNorm, interleaved fp32 RoPE and
    # logit_scale, without sliding layers (every layer applies RoPE); use_qk_norm adds CohereLayerNorms of q and k
    # over head_dim whose weights are (heads, head_dim)
    "cohere": _Facts(version="5.24", tie=True, parallel=True, norm=NormKind.COHERE_LAYERNORM, rope="fp32",
                     logit_scale_key="logit_scale", qk_norm_key="use_qk_norm", qk_norm_head_weights=True),
    # HunYuan dense V1 (modeling_hunyuan_v1_dense.py): per-head RMSNorm of q and k after RoPE
    "hunyuan_v1_dense": _Facts(version="5.24", qk_norm="head", qk_norm_after_rope=True),
    # Ministral 3 (modeling_ministral3.py): Mistral with q scaled by a position temperature after RoPE
    "ministral3": _Facts(version="5.24", sliding="all", attn_temperature=True),
    # Arcee AFM (modeling_arcee.py): LLaMA with NemotronMLP, up_proj -> ReLU² -> down_proj, no gate
    "arcee": _Facts(version="5.24", mlp_plain=True),
    # HyperCLOVA X (modeling_hyperclovax.py): Granite with a norm after each sublayer when use_post_norm
    "hyperclovax": _Facts(version="5.24", multipliers=True, post_norm_key="use_post_norm"),
    # StarCoder 2 (modeling_starcoder2.py): Mistral's attention with use_bias on every projection, LayerNorms
    # with bias, an ungated c_fc -> act -> c_proj MLP, residual and embedding dropout
    "starcoder2": _Facts(version="5.24", sliding="all", norm=NormKind.LAYERNORM, norm_bias=True, bias_key="use_bias",
                         bias_default=True, mlp_plain=True, mlp_names=("c_fc", "c_proj"), mlp_bias_key="use_bias",
                         dropout_key="residual_dropout", embed_dropout_key="embedding_dropout"),
    # BitNet b1.58 (modeling_bitnet.py): LLaMA with sub-norms before o_proj and down_proj (unpacked bf16 weights)
    "bitnet": _Facts(version="5.24", sub_norms=True),
    # Phi-1/1.5/2 (modeling_phi.py): one biased LayerNorm feeding attention and an ungated fc1/fc2 MLP in parallel,
    # every projection and lm_head with a bias, partial rotary, optional per-head LayerNorm of q and k
    "phi": _Facts(version="5.24", parallel=True, norm=NormKind.LAYERNORM, norm_bias=True, bias_default=True,
                  mlp_plain=True, mlp_names=("fc1", "fc2"), mlp_bias_default=True, lm_head_bias=True,
                  partial_rotary=True, qk_norm_key="qk_layernorm", dropout_key="resid_pdrop",
                  embed_dropout_key="embd_pdrop"),
    # OLMo (modeling_olmo.py): LLaMA's layer with parameter-free fp32 LayerNorms and fp32 rotary tables
    "olmo": _Facts(version="5.24", norm=NormKind.LAYERNORM_NO_AFFINE, rope="fp32_tables"),
    "seed_oss": _Facts(version="5.24", o_bias=False),
    # Apertus (modeling_apertus.py): Qwen 3's per-head q/k RMSNorm before RoPE, an ungated up_proj -> xIELU ->
    # down_proj MLP (NemotronMLP), LLaMA's layout (attention_layernorm, feedforward_layernorm)
    "apertus": _Facts(version="5.24", qk_norm="head", mlp_plain=True, act_default="xielu"),
    # Apertus 1.5's language model (modeling_apertus1p5.py Apertus1p5TextForCausalLM): Apertus with a vocabulary
    # extended by visual and audio codes; a head pruned to output_vocab_size rows is not modelled (refused)
    "apertus1p5_text": _Facts(version="5.24", qk_norm="head", mlp_plain=True, act_default="xielu",
                              refuse_keys=("output_vocab_size",)),
    # Persimmon (modeling_persimmon.py): one biased query_key_value laid out (heads, 3, head_dim) (q/k/v strided
    # views), per-head biased LayerNorms of q and k (qk_layernorm, on by default), partial rotary 0.5, a biased dense
    # output, an ungated relu2 dense_h_to_4h -> dense_4h_to_h MLP with biases, biased LayerNorms
    "persimmon": _Facts(version="5.24", norm=NormKind.LAYERNORM, norm_bias=True, qkv_fused=True, bias_default=True,
                        mlp_plain=True, mlp_names=("dense_h_to_4h", "dense_4h_to_h"), mlp_bias_default=True,
                        partial_rotary=True, rotary_default=0.5, qk_norm_key="qk_layernorm", qk_norm_default=True,
                        act_default="relu2", o_name="dense"),
    # NanoChat (modeling_nanochat.py): Llama4TextL2Norm everywhere (no weights), also on the embeddings before the
    # first layer and on q/k after RoPE, an ungated fc1 -> relu2 -> fc2 MLP, Gemma 2's final logit soft-capping (15)
    # DiffLlama (modeling_diffllama.py): LLaMA with differential attention (two attention calls sharing q and k over
    # the halves of v, lambda re-weighting, a weightless RMSNorm per 2 x head_dim group); attention_dropout must be 0
    "diffllama": _Facts(version="5.24", diff_attn=True),
    # Aria's language model (modeling_aria.py AriaTextForCausalLM): LLaMA's attention and layout with a MoE block on
    # every layer (top-k-then-softmax router without bias, transposed grouped_mm experts, shared experts after them)
    "aria_text": _Facts(version="5.24", moe="aria"),
    # HunYuan MoE V1 (modeling_hunyuan_v1_moe.py): HunYuan dense V1's attention (per-head q/k RMSNorm after RoPE) with
    # a MoE block on every layer: the shared MLP first, an fp32 gate (wg), experts as wide as the shared MLP
    "hunyuan_v1_moe": _Facts(version="5.24", qk_norm="head", qk_norm_after_rope=True, moe="hunyuan"),
    # Granite SWA (modeling_granite_swa.py): Granite's multipliers (attention_multiplier is the softmax scale) with
    # sliding layers (layer_types; default global where i % 4 == 0), NoPE where layer_rope_theta is 0, and a learned
    # per-head sink applied as sigmoid(logsumexp(scores) - sink) times the output (eager only: _supports_sdpa False)
    "granite_swa": _Facts(version="5.24", tie=True, multipliers=True, sliding="types", sliding_every=4,
                          sliding_full_at=0,
                          nope="rope_theta_zero", sinks=True, sink_lse=True),
    # GraniteMoeSWA (modeling_granitemoe_swa.py): GraniteMoeShared's MoE block and shared MLP with Granite SWA's
    # attention
    "granitemoe_swa": _Facts(version="5.24", multipliers=True, sliding="types", sliding_every=4, sliding_full_at=0,
                             nope="rope_theta_zero", sinks=True, sink_lse=True, moe="granitemoe"),
    # Llama 4's language model (modeling_llama4.py Llama4ForCausalLM): complex fp32 RoPE (freqs_cis), a weightless L2
    # norm of the rotated q/k on the RoPE layers (use_qk_norm), NoPE layers (no_rope_layers, every 4th by default) with
    # an fp32 query temperature (attn_temperature_tuning), chunked attention on the RoPE layers (a sliding-window
    # cache of attention_chunk_size), dense-dispatch MoE with a shared expert on moe_layers (every
    # interleave_moe_layer_step-th by default) and a dense MLP of intermediate_size_mlp elsewhere
    "llama4_text": _Facts(version="5.24", moe="llama4", rope="complex", nope="no_rope_layers", sliding="chunked",
                          qk_l2_key="use_qk_norm", nope_temperature_key="attn_temperature_tuning",
                          eager_softmax_native=True),
    # MiMo-V2-Flash (modeling_mimo_v2_flash.py): GLM-4.5's partial rotary (rope_cat; per-layer-type tables, 0.334 of
    # the 192-wide q/k heads) with values of v_head_dim scaled by attention_value_scale; the sliding layers
    # (layer_types, default full at i == 0 and every 6th) hold twice the KV heads and a learned sink per head; eager
    # only (_supports_sdpa False), the row max subtracted and softmax in the scores' dtype on every layer; DeepSeek-V3's
    # router (fp32 sigmoid, correction bias, groups) and experts without shared experts on the "sparse" entries of
    # mlp_layer_types (default: layer 0 dense)
    "mimo_v2_flash": _Facts(version="5.24", o_bias=False, sliding="types", sliding_every=6, sliding_full_lead=1,
                            partial_rotary=True, rotary_default=0.334,
                            rope_cat=True, moe="deepseek", mlp_types=1, sdpa=False, sliding_sinks=True,
                            sliding_kv_mult=2, v_head_key="v_head_dim", value_scale=True, eager_max_softmax=True,
                            window_size_key="sliding_window_size",
                            aliases=(("num_local_experts", "n_routed_experts"),)),
    # Flint (modeling_flint.py): Qwen3-MoE's attention and layer (per-head q/k norms) with GptOssRMSNorm everywhere,
    # RoPE on the sliding layers only (layer_types; the full ones are NoPE), a learned fp32 sink per head with fp32
    # scores and softmax (eager only: _supports_sdpa False); a sigmoid-routed MoE block with an always-on shared
    # expert (moe "flint")
    "flint": _Facts(version="5.24", qk_norm="head", norm=NormKind.FP32_WEIGHT_RMSNORM, sliding="types",
                    sliding_every=4, sliding_full_at=1, sliding_full_lead=2, sliding_full_last=True,
                    nope="sliding_only", sinks=True, sink_fp32=True, sdpa=False, moe="flint"),
    # Beam (modeling_beam.py): per-head q/k norms (Qwen3-MoE's attention) with BeamRMSNorm (Olmo3RMSNorm: the weight
    # times the fp32 normed states, then the cast) everywhere; four norms per layer whose residual adds are
    # depth-scaled; RoPE with fp32 tables on the sliding layers (layer_types: every 6th and the last full), the full
    # layers NoPE (rope_parameters None) with an fp32 position scale of q; a per-channel sigmoid output gate with a
    # per-head bias; an fp32 SwiGLU in the dense MLP and the experts; the fp32-router MoE block ("beam"); final logit
    # soft-capping on fp32 logits
    "beam": _Facts(version="5.24", qk_norm="head", norm=NormKind.FP32_WEIGHT_RMSNORM, layout="sandwich",
                   sliding="types", sliding_every=6, sliding_full_last=True, nope="rope_none", rope="fp32_tables",
                   moe="beam", softcap=True, softcap_default=30.0, softcap_fp32=True, residual_depth_scale=True,
                   nope_query_scale=True, mlp_glu_fp32=True, attn_gate="sigmoid", attn_gate_bias=True,
                   attn_gate_name="gate_proj"),
    "nanochat": _Facts(version="5.24", norm=NormKind.RMSNORM_NO_WEIGHT, qk_norm="head", qk_norm_after_rope=True,
                       mlp_plain=True, mlp_names=("fc1", "fc2"), act_default="relu2", embed_norm=True, softcap=True,
                       softcap_default=15.0),
    # MiniCPM5-MoE (modular_minicpm5_moe.py, transformers 5.25): LLaMA's attention with q_gate_proj making the query
    # and a per-channel gate (chunked per head, the gate reshaped: a copy; out * sigmoid(gate) before o_proj), no q/k
    # norms; DeepSeek-V3's sigmoid router (fp32 logits), experts and shared expert on the "sparse" entries of
    # mlp_layer_types (default: first_k_dense_replace, 1, dense layers first)
    "minicpm5_moe": _Facts(version="5.25", moe="deepseek", mlp_types=-2, q_gate_name="q_gate_proj",
                           shared_experts_default=1, first_dense_default=1),
}
# the transformers class each family builds (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), for configs that name the class
# in ``architectures`` under a model_type this reader does not know
_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3", "SmolLM3ForCausalLM": "smollm3", "GraniteForCausalLM": "granite",
    "Glm4ForCausalLM": "glm4", "Ernie4_5ForCausalLM": "ernie4_5", "Exaone4ForCausalLM": "exaone4",
    "Cohere2ForCausalLM": "cohere2", "CohereForCausalLM": "cohere", "StableLmForCausalLM": "stablelm",
    "CohereCompassForCausalLM": "cohere_compass_text", "DogeForCausalLM": "doge",
    "NemotronForCausalLM": "nemotron", "GraniteMoeForCausalLM": "granitemoe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe", "OlmoForCausalLM": "olmo",
    "OlmoeForCausalLM": "olmoe", "FlexOlmoForCausalLM": "flex_olmo", "Dots1ForCausalLM": "dots1",
    "GptOssForCausalLM": "gpt_oss",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense", "ArceeForCausalLM": "arcee",
    "HyperCLOVAXForCausalLM": "hyperclovax", "NanoChatForCausalLM": "nanochat", "ApertusForCausalLM": "apertus",
    "PersimmonForCausalLM": "persimmon", "DiffLlamaForCausalLM": "diffllama",
    "Apertus1p5TextForCausalLM": "apertus1p5_text",
    "PhiForCausalLM": "phi", "BitNetForCausalLM": "bitnet",
    "Starcoder2ForCausalLM": "starcoder2", "Ministral3ForCausalLM": "ministral3",
    "DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2",
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite", "MiniCPM3ForCausalLM": "minicpm3",
    "DeepseekV32ForCausalLM": "deepseek_v32", "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
    "Llama4ForCausalLM": "llama4_text", "DbrxForCausalLM": "dbrx", "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
    "GraniteSWAForCausalLM": "granite_swa", "AriaTextForCausalLM": "aria_text",
    "GraniteMoeSWAForCausalLM": "granitemoe_swa", "MiMoV2FlashForCausalLM": "mimo_v2_flash",
    "FlintForCausalLM": "flint", "BeamForCausalLM": "beam", "MiniCPM5MoeForCausalLM": "minicpm5_moe",
    "GPT2LMHeadModel": "gpt2", "GPTBigCodeForCausalLM": "gpt_bigcode", "GPTNeoForCausalLM": "gpt_neo",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPTJForCausalLM": "gptj", "OPTForCausalLM": "opt", "BloomForCausalLM": "bloom",
    "FalconForCausalLM": "falcon",
}


def _sliding(c: _Cfg, f: _Facts, layers: int) -> tuple[int | None, tuple[int, ...]]:
    """The sliding window and the layers that use it, as the family's modeling file decides."""
    if f.sliding == "all":
        window = c.opt_int("sliding_window")
        return window, tuple(range(layers)) if window else ()
    if f.sliding == "qwen":
        if not c.bool_("use_sliding_window", default=False):
            return None, ()
        window = c.opt_int("sliding_window")
        max_window = c.int_("max_window_layers", default=layers, lo=0, hi=_MAX_LAYERS)
        return window, tuple(i for i in range(layers) if i >= max_window) if window else ()
    if f.sliding == "chunked":
        # Llama 4: the "chunked_attention" layers of layer_types (default: the RoPE layers, when attention_chunk_size
        # is set) attend within chunks of attention_chunk_size; transformers caches them in a
        # DynamicSlidingWindowLayer of that size (cache_utils.py) and masks them only beyond it, as sliding layers
        if "attention_chunk_size" in c.raw and c.raw["attention_chunk_size"] is None:
            return None, ()
        window = c.int_("attention_chunk_size", default=8192)
        types = c.raw.get("layer_types")
        if isinstance(types, list) and len(types) >= layers:
            return window, tuple(i for i in range(layers) if types[i] == "chunked_attention")
        nope = _nope_layers(c, f, layers, (), None)
        return window, tuple(i for i in range(layers) if i not in nope)
    if f.sliding == "types":
        window = c.opt_int("sliding_window")
        if f.window_size_key and c.raw.get(f.window_size_key) is not None:
            # the window without the query token: the config class adds one (MiMoV2FlashConfig sliding_window_size)
            window = c.int_(f.window_size_key, lo=0) + 1
        every = c.int_(f.sliding_pattern_key, default=f.sliding_every, hi=_MAX_LAYERS) \
            if f.sliding_pattern_key else f.sliding_every
        return window, _layer_types(c, layers, window, default_every=every, full_at=f.sliding_full_at,
                                    full_lead=f.sliding_full_lead, full_last=f.sliding_full_last)
    return None, ()


def _rotary_fraction(c: _Cfg, default: float = 1.0) -> float:
    """partial_rotary_factor: top level, or inside rope_parameters / rope_scaling (transformers >= 5)."""
    for key in ("rope_parameters", "rope_scaling"):
        sub = c.raw.get(key)
        if isinstance(sub, Mapping) and "partial_rotary_factor" in sub:
            return _Cfg(sub, f"{c.where}: {key}").float_("partial_rotary_factor", lo=0.0, hi=1.0)
        kinds = c.raw.get("layer_types")
        if isinstance(sub, Mapping) and isinstance(kinds, list) and sub and all(
                isinstance(v, Mapping) or v is None for v in sub.values()):
            # rotary parameters per layer type (Laguna: full layers rotate half of each head, sliding ones all of it):
            # the fraction of the layer types in use; where they differ, the largest (the rotary temporaries are
            # then an upper bound)
            used = [sub.get(k) for k in dict.fromkeys(kinds) if isinstance(k, str)]
            fracs = [_Cfg(v, f"{c.where}: {key}").float_("partial_rotary_factor", default=default, lo=0.0, hi=1.0)
                     for v in used if isinstance(v, Mapping)]
            if fracs:
                return max(fracs)
    return c.float_("partial_rotary_factor", default=default, lo=0.0, hi=1.0)


def _nope_layers(c: _Cfg, f: _Facts, layers: int, sliding: tuple[int, ...], window: int | None) -> tuple[int, ...]:
    if f.nope == "no_rope_layers":
        flags = c.int_list("no_rope_layers")  # SmolLM3: 1 = use RoPE, 0 = NoPE
        if flags:
            if len(flags) < layers:
                raise ConfigError(f"{c.where}: no_rope_layers lists {len(flags)} flags for {layers} layers")
            return tuple(i for i in range(layers) if not flags[i])
        every = c.int_("no_rope_layer_interval", default=4, hi=_MAX_LAYERS)
        return tuple(i for i in range(layers) if (i + 1) % every == 0)
    if f.nope == "rope_theta_zero":  # Granite SWA: layer_rope_theta, 0 = NoPE (default: the global theta everywhere)
        thetas = c.raw.get("layer_rope_theta")
        if thetas is None:
            return ()
        if not isinstance(thetas, list) or len(thetas) < layers or not all(
                isinstance(t, int | float) and not isinstance(t, bool) for t in thetas[:layers]):
            raise ConfigError(f"{c.where}: layer_rope_theta must list one number per layer ({layers})")
        return tuple(i for i in range(layers) if thetas[i] == 0)
    if f.nope == "sliding_only":  # Flint: RoPE only where the layer has a window (none without sliding_window)
        return tuple(i for i in range(layers) if i not in sliding)
    if f.nope == "rope_none":  # Beam: rope_parameters keyed by layer type, None for a type without RoPE (default: the
        # full layers)
        params = c.raw.get("rope_parameters")
        if not isinstance(params, Mapping) or not any(isinstance(v, Mapping) or v is None for v in params.values()):
            params = {"sliding_attention": {}, "full_attention": None}
        kinds = ["sliding_attention" if i in sliding else "full_attention" for i in range(layers)]
        return tuple(i for i, k in enumerate(kinds) if k in params and params[k] is None)
    if f.nope == "rope_params_none":  # rope_parameters per layer type, None for a type without RoPE
        params, types = c.raw.get("rope_parameters"), c.raw.get("layer_types")
        if isinstance(params, Mapping) and isinstance(types, list) and len(types) >= layers:
            return tuple(i for i in range(layers) if types[i] in params and params[types[i]] is None)
        return ()
    if f.nope == "global" and window is not None:
        # EXAONE 4 / Command-R7B: with a sliding window, only the sliding layers apply RoPE
        return tuple(i for i in range(layers) if i not in sliding)
    return ()


def _moe_rule(c: _Cfg, rule: tuple[tuple[str, ...], ...], layers: int) -> tuple[int, ...]:
    """The MoE layers of a derived recipe: those where every condition holds. Conditions (found by the derivation
    on perturbed configs): ``all``; ``ge K`` (index >= K: first_k_dense_replace); ``step K`` ((index + 1) % K == 0:
    decoder_sparse_step); ``every K`` (index % K == 0: moe_layer_freq); ``not_in K`` / ``in K`` (index lists:
    mlp_only_layers, moe_layers); ``eq K V`` (a per-layer list, mlp_layer_types[i] == V)."""
    keep = set(range(layers))
    for cond in rule:
        op, key = cond[0], cond[1] if len(cond) > 1 else ""
        if op == "all":
            continue
        if op in ("ge", "step", "every"):
            # "#K": a constant the config class uses where no key sets it (the derivation's "ge #1")
            v = int(key[1:]) if key.startswith("#") and key[1:].isdigit() else \
                c.int_(key, lo=0 if op == "ge" else 1, hi=_MAX_LAYERS)
            sel = {i for i in range(layers) if (i >= v if op == "ge" else (i + 1) % v == 0 if op == "step"
                                               else i % v == 0)}
        elif op in ("in", "not_in"):
            idx = set(c.int_list(key))
            sel = {i for i in range(layers) if (i in idx) == (op == "in")}
        elif op == "eq":
            kinds = c.raw.get(key)
            if not isinstance(kinds, list) or len(kinds) < layers:
                raise ConfigError(f"{c.where}: {key} must list one entry per layer ({layers})")
            sel = {i for i in range(layers) if kinds[i] == cond[2]}
        else:
            raise ConfigError(f"{c.where}: unknown MoE layer rule {op!r} in the recipe; re-derive it")
        keep &= sel
    return tuple(sorted(keep))


def _moe_derived(c: _Cfg, f: _Facts, layers: int) -> dict[str, Any]:
    """A derived recipe's MoE fields: sizes from the keys the derivation found, the program's flags from the family
    whose block computes the same ops (``f.moe_family``)."""
    keys = dict(f.moe_keys)
    e = c.int_(keys["num_experts"])
    inter = c.int_(keys["moe_intermediate_size"])
    if "shared_expert_intermediate_size" in keys:
        si = c.int_(keys["shared_expert_intermediate_size"], default=0, lo=0)
    elif "shared_experts" in keys:
        si = inter * c.int_(keys["shared_experts"], default=0, lo=0)
    else:
        si = 0
    rule = f.moe_rule
    if f.moe_rule_default and any(cond[0] == "eq" and c.raw.get(cond[1]) is None for cond in rule):
        rule = f.moe_rule_default
    for field, key in f.moe_keys:
        if field == "no_shared_experts" and c.int_(key, default=0, lo=0):
            raise ConfigError(f"{c.where}: {key} adds shared experts, which the {c.raw.get('model_type')} recipe was "
                              "not derived with; run vramplan trace on this config")
    out: dict[str, Any] = {"num_experts": e, "experts_per_token": c.int_(keys["experts_per_token"]),
                           "moe_intermediate_size": inter, "moe_layers": _moe_rule(c, rule, layers)}
    if f.moe_only and len(out["moe_layers"]) != layers:
        dense = [i for i in range(layers) if i not in out["moe_layers"]]
        raise ConfigError(f"{c.where}: layers {dense[:8]} have a dense MLP, which the {c.raw.get('model_type')} recipe "
                          "was derived without (its library default has MoE blocks only); run `vramplan trace` on "
                          "this config")
    if si:
        out["shared_expert_intermediate_size"] = si
    flags = dict(f.moe_flags) if f.moe_flags else _moe_flags(f.moe, f.moe_family, e, si)
    for name, v in list(flags.items()):
        if isinstance(v, str) and v.startswith("config:"):  # a flag the config switches (derive._compose._keyed_flags)
            key = v.removeprefix("config:")
            flags[name] = c.bool_(key.lstrip("!"), default=False) != key.startswith("!")
        elif isinstance(v, str) and v.startswith("experts:"):  # N vectors of num_experts (frozen correction biases)
            flags[name] = e * int(v.removeprefix("experts:"))
    if not si:
        flags.pop("shared_expert_gate", None)
        flags.pop("shared_expert_first", None)
        flags.pop("shared_expert_bias", None)
        flags.pop("shared_expert_glu", None)
    return out | flags


def _moe_flags(kind: str, family: str, experts: int, shared: int) -> dict[str, Any]:
    """The block program's flags of a MoE family (what its modeling file fixes beyond the sizes)."""
    if kind == "mixtral":  # MixtralTopKRouter returns softmax(logits.float()) top-k values without a cast back
        return {"router_weights_fp32": True}
    if kind == "qwen" and family == "qwen2_moe":
        return {"shared_expert_gate": bool(shared), "shared_expert_first": True}
    if kind == "gpt_oss":
        return {"router_bias": True, "expert_bias": True, "expert_glu": "clamped", "router_topk_first": True}
    if kind == "deepseek":
        return {"router_fp32": True, "router_sigmoid": True}
    if kind == "ernie":
        return {"router_fp32": True, "moe_extra_params": experts, "shared_expert_first": True}
    return {}


def _moe(c: _Cfg, f: _Facts, family: str, layers: int) -> dict[str, Any]:
    """The MoE fields of a spec, read the way each family's config names them (empty: a dense model)."""
    if not f.moe:
        return {}
    if f.moe_keys:
        return _moe_derived(c, f, layers)
    out: dict[str, Any] = {}
    if f.moe in ("mixtral", "granitemoe", "phimoe"):
        out = {"num_experts": c.int_("num_local_experts", default=8), "experts_per_token":
               c.int_("num_experts_per_tok", default=2), "moe_intermediate_size": c.int_("intermediate_size"),
               "moe_layers": tuple(range(layers)),
               # MixtralTopKRouter returns softmax(logits.float()) top-k values without a cast back
               "router_weights_fp32": f.moe == "mixtral"}
        if f.moe == "granitemoe" and c.raw.get("shared_intermediate_size"):
            out["shared_expert_intermediate_size"] = c.int_("shared_intermediate_size", lo=0)
    elif f.moe == "qwen":
        step = c.int_("decoder_sparse_step", default=1, hi=_MAX_LAYERS)
        dense_only = set(c.int_list("mlp_only_layers"))
        # (Qwen3MoeConfig maps num_experts to num_local_experts: a config saved by transformers 5.x holds the latter)
        out = {"num_experts": c.int_("num_experts", "num_local_experts", default=60 if family == "qwen2_moe" else 128),
               "experts_per_token": c.int_("num_experts_per_tok", default=4 if family == "qwen2_moe" else 8),
               "moe_intermediate_size": c.int_("moe_intermediate_size"),
               "moe_layers": tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)}
        if family == "qwen2_moe":
            si = c.int_("shared_expert_intermediate_size", default=0, lo=0)
            out |= {"shared_expert_intermediate_size": si, "shared_expert_gate": bool(si), "shared_expert_first": True}
    elif f.moe == "gpt_oss":  # GptOssMLP: every layer; intermediate_size is the expert width
        out = {"num_experts": c.int_("num_local_experts", default=128),
               "experts_per_token": c.int_("num_experts_per_tok", default=4),
               "moe_intermediate_size": c.int_("intermediate_size"), "moe_layers": tuple(range(layers)),
               "router_bias": True, "expert_bias": True, "expert_glu": "clamped", "router_topk_first": True}
    elif f.moe == "olmoe":  # OlmoeSparseMoeBlock: every layer; intermediate_size is the expert width
        out = {"num_experts": c.int_("num_experts", default=64), "experts_per_token": c.int_("num_experts_per_tok",
                                                                                              default=8),
               "moe_intermediate_size": c.int_("intermediate_size"), "moe_layers": tuple(range(layers))}
        if c.raw.get("clip_qkv") is not None:
            raise ConfigError(f"{c.where}: clip_qkv (in-place clamps of q/k/v) is not modelled; "
                              "run vramplan trace")
    elif f.moe == "deepseek":  # DeepSeek-V3 / Kimi-K2 / GLM-4.5: sigmoid router in fp32, shared experts
        inter = c.int_("moe_intermediate_size")
        first_dense = c.int_("first_k_dense_replace", default=f.first_dense_default if f.first_dense_default >= 0
                             else 3 if f.mlp_types == -2 else 0, lo=0, hi=_MAX_LAYERS)
        every = c.int_("moe_layer_freq", default=1, hi=_MAX_LAYERS)
        moe_layers = tuple(i for i in range(layers) if i >= first_dense and i % every == 0)
        if f.mlp_types != -1:
            types = c.raw.get("mlp_layer_types")
            if types is None:
                dense = min(first_dense if f.mlp_types == -2 else f.mlp_types, layers)
                types = ["dense"] * dense + ["sparse"] * (layers - dense)
            # the decoder layer reads mlp_layer_types[layer_idx]: entries past the last layer are not read
            if not isinstance(types, list) or len(types) < layers or not set(types[:layers]) <= {"dense", "sparse"}:
                raise ConfigError(f"{c.where}: mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} "
                                  "layers")
            moe_layers = tuple(i for i, t in enumerate(types[:layers]) if t == "sparse")
        out = {"num_experts": c.int_("n_routed_experts"), "experts_per_token": c.int_("num_experts_per_tok"),
               "moe_intermediate_size": inter,
               "shared_expert_intermediate_size": inter * c.int_("n_shared_experts", default=f.shared_experts_default,
                                                                 lo=0),
               "moe_layers": moe_layers, "router_fp32": True, "router_sigmoid": True}
    elif f.moe == "deepseek_v2":  # DeepseekV2TopkRouter: fp32 logits, softmax, top-k; fp32 weights * scaling factor
        inter = c.int_("moe_intermediate_size")
        first_dense = c.int_("first_k_dense_replace", default=0, lo=0, hi=_MAX_LAYERS)
        out = {"num_experts": c.int_("n_routed_experts", default=64),
               "experts_per_token": c.int_("num_experts_per_tok"), "moe_intermediate_size": inter,
               "shared_expert_intermediate_size": inter * c.int_("n_shared_experts", default=2, lo=0),
               "moe_layers": tuple(range(first_dense, layers)), "router_fp32": True, "router_weights_fp32": True}
    elif f.moe == "hunyuan":  # HunYuanMoEV1Moe: every layer; the shared MLP first, both intermediate_size wide; the
        # gate's fp32 wg on an fp32 copy of the hidden states, softmax, top-k, renormalised fp32 weights
        for key in ("num_experts", "moe_topk"):
            if isinstance(c.raw.get(key), list):
                raise ConfigError(f"{c.where}: {key} per layer is not modelled by estimate; run vramplan trace")
        inter = c.int_("intermediate_size")
        out = {"num_experts": c.int_("num_experts", default=1), "experts_per_token": c.int_("moe_topk", default=1),
               "moe_intermediate_size": inter, "shared_expert_intermediate_size": inter, "shared_expert_first": True,
               "moe_layers": tuple(range(layers)), "router_fp32": True, "router_weights_fp32": True}
    elif f.moe == "aria":  # AriaTextMoELayer: every layer; top-k of the logits, softmax over the k (the logits'
        # dtype); grouped_mm experts (SiLU); the shared experts (moe_num_shared_experts x intermediate_size) after them
        if c.bool_("mlp_bias", default=False):
            raise ConfigError(f"{c.where}: mlp_bias (biased shared experts) is not modelled by estimate; run vramplan "
                              "trace")
        inter = c.int_("intermediate_size")
        out = {"num_experts": c.int_("moe_num_experts", default=8), "experts_per_token": c.int_("moe_topk", default=2),
               "moe_intermediate_size": inter,
               "shared_expert_intermediate_size": inter * c.int_("moe_num_shared_experts", default=2, lo=0),
               "moe_layers": tuple(range(layers)), "router_topk_first": True}
    elif f.moe == "llama4":  # Llama4TextMoe (every expert on every token, a shared expert as wide as each expert)
        step = c.int_("interleave_moe_layer_step", default=1, hi=_MAX_LAYERS)
        listed = c.raw.get("moe_layers")
        inter = c.int_("intermediate_size", default=8192)
        out = {"num_experts": c.int_("num_local_experts", default=16),
               "experts_per_token": c.int_("num_experts_per_tok", default=1), "moe_intermediate_size": inter,
               "shared_expert_intermediate_size": inter, "moe_dense_dispatch": True,
               "moe_layers": tuple(i for i in c.int_list("moe_layers") if i < layers) if listed is not None
               else tuple(range(step - 1, layers, step)),
               # the dense layers' Llama4TextMLP is intermediate_size_mlp wide
               "intermediate_size": c.int_("intermediate_size_mlp", default=16384)}
    elif f.moe == "flint":  # FlintSparseMoeBlock (modeling_flint.py): Qwen3-MoE's layer placement (mlp_only_layers,
        # default [0, 1]; decoder_sparse_step) and experts; FlintTopKRouter's fp32 logits of an fp32 copy of the hidden
        # states, sigmoid, top-k of the scores renormalised, fp32 weights into the experts; an always-on gated shared
        # expert of shared_expert_intermediate_size added after them
        step = c.int_("decoder_sparse_step", default=1, hi=_MAX_LAYERS)
        dense_only = set(c.int_list("mlp_only_layers")) if c.raw.get("mlp_only_layers") is not None else {0, 1}
        out = {"num_experts": c.int_("num_experts", default=256),
               "experts_per_token": c.int_("num_experts_per_tok", default=6),
               "moe_intermediate_size": c.int_("moe_intermediate_size", default=512),
               "shared_expert_intermediate_size": c.int_("shared_expert_intermediate_size", default=1024, lo=0),
               "moe_layers": tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0),
               "router_fp32": True, "router_sigmoid": True, "router_sigmoid_plain": True}
    elif f.moe == "beam":  # BeamMoE (modeling_beam.py): DeepSeek-V3's fp32 sigmoid router (correction bias, groups)
        # on the "sparse" entries of mlp_layer_types (default: the first three layers dense), experts with an fp32
        # SwiGLU (DeepseekV4Experts._apply_gate overridden), their sum times routed_scaling_factor; no shared experts
        types = c.raw.get("mlp_layer_types")
        if types is None:
            dense = min(3, layers)
            types = ["dense"] * dense + ["sparse"] * (layers - dense)
        if not isinstance(types, list) or len(types) < layers or not set(types[:layers]) <= {"dense", "sparse"}:
            raise ConfigError(f"{c.where}: mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} "
                              "layers")
        out = {"num_experts": c.int_("num_experts", default=256),
               "experts_per_token": c.int_("num_experts_per_tok", default=8),
               "moe_intermediate_size": c.int_("moe_intermediate_size", default=2560),
               "moe_layers": tuple(i for i, t in enumerate(types[:layers]) if t == "sparse"),
               "router_fp32": True, "router_sigmoid": True, "expert_glu": "fp32", "moe_output_scale": True}
    elif f.moe == "ernie":
        inter = c.int_("moe_intermediate_size")
        start = c.int_("moe_layer_start_index", default=1, lo=0, hi=_MAX_LAYERS)
        end = c.int_("moe_layer_end_index", default=layers - 1, lo=-1, hi=_MAX_LAYERS)
        every = c.int_("moe_layer_interval", default=1, hi=_MAX_LAYERS)
        if end < 0:
            end = layers - 1
        out = {"num_experts": c.int_("moe_num_experts", default=64), "experts_per_token": c.int_("moe_k", default=6),
               "moe_intermediate_size": inter,
               "shared_expert_intermediate_size": inter * c.int_("moe_num_shared_experts", default=0, lo=0),
               "moe_layers": tuple(i for i in range(layers) if (i + 1) % every == 0 and start <= i <= end),
               "router_fp32": True, "moe_extra_params": c.int_("moe_num_experts", default=64),
               "shared_expert_first": True}
    return out


def _llama_like(c: _Cfg, family: str, facts: _Facts | None = None) -> ModelSpec:
    """LLaMA and its descendants (the families of :data:`_FAMILIES`, and model types whose derived recipe
    reads as one of them: ``facts``): one decoder layer of attention and a gated MLP, differing in the facts
    each family's modeling file fixes."""
    f = facts if facts is not None else _FAMILIES[family]
    if f.aliases:
        raw = dict(c.raw)
        for key, canonical in f.aliases:
            if key in raw:  # transformers sets the canonical attribute from its alias
                raw[canonical] = raw.pop(key)
        c = _Cfg(raw, c.where)
    for key in f.refuse_keys:
        if c.raw.get(key) is not None:
            raise ConfigError(f"{c.where}: {key} is not modelled for {family}; run `vramplan trace` on this config")
    kinds = c.raw.get("layer_types")
    if f.layer_kinds and isinstance(kinds, list):
        other = sorted({str(k) for k in kinds} - set(f.layer_kinds))
        if other:
            raise ConfigError(f"{c.where}: layer_types {other} are layers the {c.raw.get('model_type', family)} recipe "
                              f"was not derived with (only {list(f.layer_kinds)}); run `vramplan trace` on this config")
    for key, scalar in f.uniform_keys:
        values, want = c.raw.get(key), c.raw.get(scalar)
        if values is not None and (not isinstance(values, list) or any(x != want for x in values)):
            raise ConfigError(f"{c.where}: {key} other than {scalar} ({want}) on every layer is not modelled for "
                              f"{family}; run `vramplan trace` on this config")
    hidden = c.int_("hidden_size")
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    heads = c.int_("num_attention_heads")
    kv = c.int_("num_key_value_heads", default=heads)
    if f.diff_attn and (kv % 2 or c.float_("attention_dropout", default=0.0, hi=1.0) > 0):
        raise ConfigError(f"{c.where}: DiffLlama needs an even num_key_value_heads (the two attention calls split the "
                          f"values along the KV heads; got {kv}) and attention_dropout 0, as transformers requires")
    mla: dict[str, Any] = {}
    if f.mla:
        q_rank, kv_rank, nope, rope, v_dim = f.mla_defaults
        rope_dim = c.int_("qk_rope_head_dim", default=rope)
        head_dim = c.int_("qk_nope_head_dim", default=nope) + rope_dim
        # q_lora_rank null (DeepSeek-V2-Lite, Kimi): a plain q_proj; absent: the config class's default
        q_rank = 0 if "q_lora_rank" in c.raw and c.raw["q_lora_rank"] is None else q_rank
        mla = {"q_lora_rank": c.int_("q_lora_rank", default=q_rank, lo=0),
               "kv_lora_rank": c.int_("kv_lora_rank", default=kv_rank or _MISSING),
               "qk_rope_head_dim": rope_dim, "v_head_dim": c.int_("v_head_dim", default=v_dim or hidden // heads)}
        if f.dsa:
            kinds = c.raw.get("indexer_types")
            if kinds is not None and (not isinstance(kinds, list) or len(kinds) < layers
                                      or not set(kinds[:layers]) <= {"full", "shared"}):
                raise ConfigError(f"{c.where}: indexer_types must list 'full' or 'shared' for each of the {layers} "
                                  "layers")
            if kinds is not None and "shared" in kinds[:layers]:
                raise ConfigError(f"{c.where}: indexer_types 'shared' (layers reusing the previous indexer's top-k) is "
                                  "not modelled by estimate; run vramplan trace")
            mla |= {"index_heads": c.int_("index_n_heads", default=64), "index_head_dim": c.int_("index_head_dim",
                                                                                                 default=128),
                    "index_topk": c.int_("index_topk", default=2048)}
        kv = heads  # k and v are expanded to every head from the latent
    else:
        # transformers' LLaMA-class attention takes hidden_size // num_attention_heads when head_dim is unset
        head_dim = _check_heads(c, hidden, heads, kv, c.opt_int("head_dim"), floor=True)
    vocab = c.int_("vocab_size")
    gemma = f.gemma
    tie = c.bool_("tie_word_embeddings", default=f.tie)
    act_default = "gelu_pytorch_tanh" if gemma else f.act_default or "silu"
    # Gemma: transformers builds gelu_pytorch_tanh from hidden_activation and ignores hidden_act ("gelu")
    act = c.activation("hidden_activation", default=act_default) if gemma else \
        c.activation("hidden_act", default=act_default)
    bias_flag = c.bool_(f.bias_key, default=f.bias_default)
    qkv_bias = f.qkv_bias if f.qkv_bias is not None else bias_flag
    o_bias = bias_flag and f.o_bias
    window, sliding = _sliding(c, f, layers)
    layout = "sandwich" if f.post_norm_key and c.bool_(f.post_norm_key, default=False) else f.layout
    parallel = f.parallel or (bool(f.parallel_key) and c.bool_(f.parallel_key, default=False))

    moe = _moe(c, f, family, layers)
    num_experts, top_k = moe.get("num_experts", 0), moe.get("experts_per_token", 0)
    if num_experts and top_k > num_experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds the number of experts "
                          f"({num_experts})")
    moe_inter = moe.get("moe_intermediate_size", 0)
    inter = moe.pop("intermediate_size", None) or c.int_("intermediate_size",
                                                         default=moe_inter if moe_inter else _MISSING)
    logit_scale = c.opt_float(f.logit_scale_key) if f.logit_scale_key else None
    extra = _sliding_heads(c, f, heads, kv, head_dim, sliding) if not f.mla else {}
    return ModelSpec(
        name=c.where, family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=inter,
        tie_word_embeddings=tie,
        norm=NormKind.GEMMA_RMSNORM if gemma else f.norm,
        norm_input_held=gemma, rope_tables_unbatched=gemma,
        mlp=MLPKind.PLAIN if f.mlp_plain else MLPKind.GATED, activation=act, position=PositionKind.ROPE,
        mlp_names=(f.mlp_names or ("up_proj", "down_proj")) if f.mlp_plain else (),
        hidden_dropout=c.float_(f.dropout_key, default=0.0, hi=1.0) if f.dropout_key else 0.0,
        embedding_dropout=c.float_(f.embed_dropout_key, default=0.0, hi=1.0) if f.embed_dropout_key else None,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=c.bool_(f.mlp_bias_key, default=f.mlp_bias_default),
        qkv_fused=f.qkv_fused, gate_up_fused=f.gate_up_fused,
        lm_head_bias=f.lm_head_bias or (bool(f.lm_head_bias_key) and c.bool_(f.lm_head_bias_key, default=False)),
        norms_per_layer=4 if layout == "sandwich" else 1 if parallel else 2, norm_bias=f.norm_bias,
        pre_norm=layout != "post", parallel_residual=parallel,
        qk_norm=bool(f.qk_norm) or (bool(f.qk_norm_key) and c.bool_(f.qk_norm_key, default=f.qk_norm_default)),
        o_name=f.o_name,
        qk_norm_full=f.qk_norm == "full", qk_norm_head_weights=f.qk_norm_head_weights, qk_norm_split=f.qk_norm_split,
        held_through_mlp=f.held_through_mlp,
        qk_norm_after_rope=f.qk_norm_after_rope, attn_temperature=f.attn_temperature, sub_norms=f.sub_norms,
        eager_softmax_native=f.eager_softmax_native,
        qk_l2_norm=bool(f.qk_l2_key) and c.bool_(f.qk_l2_key, default=True),
        nope_temperature=bool(f.nope_temperature_key) and c.bool_(f.nope_temperature_key, default=True),
        rotary_fraction=_rotary_fraction(c, f.rotary_default) if f.partial_rotary else 1.0,
        rope_style="interleave_fp32" if f.rope_interleave_fp32 else f.rope, rope_cat=f.rope_cat,
        nope_layers=_nope_layers(c, f, layers, sliding, window),
        embed_scale=gemma or f.multipliers or f.head_scale or (bool(f.embed_scale_key) and
                                                               c.bool_(f.embed_scale_key, default=False)),
        residual_scale=f.multipliers or f.head_scale,
        logit_scale=f.multipliers or logit_scale is not None, head_input_scale=f.head_scale,
        # (an explicit null turns it off: ``if self.config.final_logit_softcapping is not None``)
        logit_softcap=c.float_("final_logit_softcapping", default=f.softcap_default) if f.softcap and (
            (f.softcap_default is not None and "final_logit_softcapping" not in c.raw)
            or c.raw.get("final_logit_softcapping") is not None) else None,
        embedding_layernorm=f.embed_norm,
        attn_logit_softcap=c.opt_float("attn_logit_softcapping") if f.softcap else None,
        **moe, **mla, sliding_window=window, sliding_layers=sliding, attention_sinks=f.sinks, sink_lse=f.sink_lse,
        sdpa=f.sdpa and not f.sinks, sdpa_removed_in=f.sdpa_removed_in, diff_attention=f.diff_attn,
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        program_version=f.version, **_attn_gate(c, f), **_dynamic_mask(c, f), **extra,
        **_q_gate(f),
    )


def _q_gate(f: _Facts) -> dict[str, Any]:
    """A query projection that also makes the output gate (:attr:`_Facts.q_gate_name`), under its module name."""
    return {"attn_output_gate": True, "qkv_names": (f.q_gate_name, "k_proj", "v_proj")} if f.q_gate_name else {}


def _sliding_heads(c: _Cfg, f: _Facts, heads: int, kv: int, head_dim: int, sliding: tuple[int, ...]) -> dict[str, Any]:
    """The value heads' width, the value scale and the sliding layers' own KV heads and sinks (MiMo-V2-Flash's
    facts); empty for a family without them."""
    out: dict[str, Any] = {}
    if f.v_head_key:
        v = c.int_(f.v_head_key, default=head_dim)
        if v != head_dim:
            out["v_head_dim"] = v
    if f.value_scale:
        out["value_scale"] = True
    if f.eager_max_softmax:
        out["eager_max_softmax"] = True
    if f.sink_fp32:
        out["sink_fp32"] = True
    for name in ("residual_depth_scale", "nope_query_scale", "mlp_glu_fp32"):
        if getattr(f, name):
            out[name] = True
    if f.softcap_fp32:
        out["logit_softcap_fp32"] = True
    if f.sliding_sinks and sliding:
        kv_sliding = kv * f.sliding_kv_mult
        if kv_sliding > heads or heads % kv_sliding:
            raise ConfigError(f"{c.where}: the sliding layers' {kv_sliding} KV heads ({f.sliding_kv_mult} x "
                              f"num_key_value_heads) must divide num_attention_heads ({heads})")
        out["layer_overrides"] = (LayerOverride(sliding, num_kv_heads=kv_sliding if kv_sliding != kv else 0,
                                                attention_sinks=True),)
    return out


def _dynamic_mask(c: _Cfg, f: _Facts) -> dict[str, Any]:
    """Doge's dynamic mask attention and residual weights (:attr:`_Facts.dynamic_mask`)."""
    if not (f.dynamic_mask or f.residual_weights):
        return {}
    if c.bool_("is_moe", default=False):
        raise ConfigError(f"{c.where}: Doge's cross-domain MoE (is_moe: DogeCDMoE, product-key retrieval of "
                          "single-neuron experts through embedding lookups) is not modelled by estimate; run vramplan "
                          "trace")
    if c.raw.get("sliding_window") is not None:
        raise ConfigError(f"{c.where}: Doge with a sliding window is not modelled by estimate; run vramplan trace")
    return {"dynamic_mask": f.dynamic_mask, "residual_weights": f.residual_weights,
            "keep_window": c.int_("keep_window_size", default=2048) if f.dynamic_mask else 0}


def _attn_gate(c: _Cfg, f: _Facts) -> dict[str, Any]:
    """The spec's attention output gate from a derived recipe's facts (:attr:`_Facts.attn_gate`)."""
    if not f.attn_gate:
        return {}
    heads = f.attn_gate_heads
    if f.attn_gate_heads_key:
        v = c.raw.get(f.attn_gate_heads_key, heads)
        if not isinstance(v, bool):
            raise ConfigError(f"{c.where}: {f.attn_gate_heads_key}={v!r} is not modelled by estimate (true: one output "
                              "gate per head, false: one per channel); run vramplan trace")
        heads = v
    return {"attn_gate": f.attn_gate, "attn_gate_early": f.attn_gate_early, "attn_gate_heads": heads,
            "attn_gate_bias": f.attn_gate_bias, "attn_gate_name": f.attn_gate_name or "gate_proj"}


def _gpt2(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("n_embd", "hidden_size")
    heads = c.int_("n_head", "num_attention_heads")
    head_dim = _check_heads(c, hidden, heads, heads, None)
    positions = c.int_("n_positions", "max_position_embeddings", default=1024, hi=1 << 24)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50257), hidden_size=hidden,
        num_layers=c.int_("n_layer", "num_hidden_layers", hi=_MAX_LAYERS), num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=c.int_("n_inner", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation_function", default="gelu_new"),
        position=PositionKind.LEARNED, max_position_embeddings=positions, max_learned_positions=positions,
        norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True, qkv_fused=True,
        attention_dropout=c.float_("attn_pdrop", default=0.1, hi=1.0),
        hidden_dropout=c.float_("resid_pdrop", default=0.1, hi=1.0),
        # GPT2Block: ``hidden_states = attn_output + residual`` leaves attn_output bound through the MLP
        held_through_mlp=("attn",),
    )


def _gpt_bigcode(c: _Cfg, family: str) -> ModelSpec:
    """StarCoder / SantaCoder (modeling_gpt_bigcode.py): GPT-2's block with nn.Linear projections, one fused c_attn
    whose key and value are a single head under multi_query (MQA), LLaMA's attention interface (eager: fp32
    softmax, repeat_kv; SDPA with enable_gqa), learned positions, dropouts after embeddings, attention and MLP."""
    hidden = c.int_("n_embd", "hidden_size", default=768)
    heads = c.int_("n_head", "num_attention_heads", default=12)
    kv = 1 if c.bool_("multi_query", default=True) else heads
    head_dim = _check_heads(c, hidden, heads, kv, None)
    positions = c.int_("n_positions", "max_position_embeddings", default=1024, hi=1 << 24)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50257), hidden_size=hidden,
        num_layers=c.int_("n_layer", "num_hidden_layers", default=12, hi=_MAX_LAYERS), num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_size=c.int_("n_inner", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation_function", default="gelu_pytorch_tanh"),
        position=PositionKind.LEARNED, max_position_embeddings=positions, max_learned_positions=positions,
        norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True, qkv_fused=True, qkv_name="c_attn",
        o_name="c_proj", mlp_names=("c_fc", "c_proj"), held_through_mlp=("attn",),
        # self.bias: tril(ones(max_positions, max_positions, dtype=bool))
        positions_unbatched=True, buffer_bytes=positions * positions,
        attention_dropout=c.float_("attn_pdrop", default=0.1, hi=1.0),
        hidden_dropout=c.float_("resid_pdrop", default=0.1, hi=1.0),
        embedding_dropout=c.float_("embd_pdrop", default=0.1, hi=1.0), program_version="5.24",
    )


def _gpt_neo(c: _Cfg, family: str) -> ModelSpec:
    """GPT-Neo (modeling_gpt_neo.py): GPT-2's block with separate q/k/v projections without bias and a biased
    out_proj, eager attention only, scores from fp32 copies of q and k, no 1/sqrt(d) scaling (a ``where`` against the
    causal buffer instead: the same allocations), local layers masked by their buffer (max_positions^2 bools in every
    layer), learned (1, seq) positions."""
    hidden = c.int_("hidden_size", default=2048)
    heads = c.int_("num_heads", "num_attention_heads", default=16)
    head_dim = _check_heads(c, hidden, heads, heads, None)
    layers = c.int_("num_layers", "num_hidden_layers", default=24, hi=_MAX_LAYERS)
    positions = c.int_("max_position_embeddings", default=2048, hi=1 << 16)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50257), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=c.int_("intermediate_size", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation_function", default="gelu_new"),
        position=PositionKind.LEARNED, max_position_embeddings=positions, max_learned_positions=positions,
        norm_bias=True, qkv_bias=False, o_bias=True, mlp_bias=True, o_name="out_proj", mlp_names=("c_fc", "c_proj"),
        held_through_mlp=("attn",), attn_fp32=True, sdpa=False, positions_unbatched=True, returns_attn_weights=True,
        buffer_bytes=layers * positions * positions,  # each attention's self.bias (1, 1, max_positions, max_positions)
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        hidden_dropout=c.float_("resid_dropout", default=0.0, hi=1.0),
        embedding_dropout=c.float_("embed_dropout", default=0.0, hi=1.0), program_version="5.24",
    )


def _gpt_neox(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("hidden_size")
    heads = c.int_("num_attention_heads")
    head_dim = _check_heads(c, hidden, heads, heads, None)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size"), hidden_size=hidden,
        num_layers=c.int_("num_hidden_layers", hi=_MAX_LAYERS), num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, intermediate_size=c.int_("intermediate_size", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("hidden_act", default="gelu"), position=PositionKind.ROPE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30), norm_bias=True,
        qkv_bias=c.bool_("attention_bias", default=True), o_bias=c.bool_("attention_bias", default=True),
        mlp_bias=True, qkv_fused=True, parallel_residual=c.bool_("use_parallel_residual", default=True),
        rotary_fraction=c.float_("rotary_pct", "partial_rotary_factor", default=0.25, hi=1.0),
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        hidden_dropout=c.float_("hidden_dropout", default=0.0, hi=1.0),
    )


def _gptj(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("n_embd", "hidden_size")
    heads = c.int_("n_head", "num_attention_heads")
    head_dim = _check_heads(c, hidden, heads, heads, None)
    rotary_dim = c.int_("rotary_dim", default=head_dim, hi=head_dim)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50400), hidden_size=hidden,
        num_layers=c.int_("n_layer", "num_hidden_layers", hi=_MAX_LAYERS), num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=c.int_("n_inner", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation_function", default="gelu_new"),
        position=PositionKind.ROPE,
        max_position_embeddings=c.opt_int("n_positions", "max_position_embeddings", hi=1 << 30),
        norm_bias=True, mlp_bias=True, lm_head_bias=True, parallel_residual=True, norms_per_layer=1,
        rotary_fraction=rotary_dim / head_dim,
        attention_dropout=c.float_("attn_pdrop", default=0.0, hi=1.0),
        hidden_dropout=c.float_("resid_pdrop", default=0.0, hi=1.0),
        # GPTJAttention calls ALL_ATTENTION_FUNCTIONS in transformers 5.24 (_supports_sdpa True); 5.17's _attn was
        # its own fp32 eager product
        sdpa_added_in="5.24",
    )


def _opt(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("hidden_size")
    heads = c.int_("num_attention_heads")
    head_dim = _check_heads(c, hidden, heads, heads, None)
    positions = c.int_("max_position_embeddings", default=2048, hi=1 << 24)
    proj = c.int_("word_embed_proj_dim", default=hidden)
    bias = c.bool_("enable_bias", default=True)
    if not c.bool_("layer_norm_elementwise_affine", default=True):
        raise ConfigError(f"{c.where}: OPT without layer-norm affine parameters is not supported")
    pre_norm = c.bool_("do_layer_norm_before", default=True)
    final = pre_norm and not c.bool_("_remove_final_layer_norm", default=False)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=50272), hidden_size=hidden,
        num_layers=c.int_("num_hidden_layers", hi=_MAX_LAYERS), num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, intermediate_size=c.int_("ffn_dim", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation_function", default="relu"),
        position=PositionKind.LEARNED, max_position_embeddings=positions, learned_position_offset=2,
        max_learned_positions=positions + 2, norm_bias=True, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        final_norm=final, embed_proj_dim=proj if proj != hidden else None,
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        hidden_dropout=c.float_("dropout", default=0.1, hi=1.0),
    )


def _bloom(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("hidden_size", "n_embed", default=64)
    heads = c.int_("n_head", "num_attention_heads", default=8)
    head_dim = _check_heads(c, hidden, heads, heads, None)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=250880), hidden_size=hidden,
        num_layers=c.int_("n_layer", "num_hidden_layers", default=2, hi=_MAX_LAYERS), num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=4 * hidden,
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=Activation.BLOOM_GELU, position=PositionKind.ALIBI,
        max_position_embeddings=None, norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True,
        qkv_fused=True, embedding_layernorm=True,
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        hidden_dropout=c.float_("hidden_dropout", default=0.0, hi=1.0),
        # BloomBlock returns (output, attention_probs) and BloomModel's loop keeps the pair until the next block
        # returns (modeling_bloom.py, 5.24): the 16-bit probabilities outlive their layer
        returns_attn_weights=True, scores_kept=True,
    )


def _dbrx(c: _Cfg, family: str) -> ModelSpec:
    """DBRX (modeling_dbrx.py, transformers 5.24): ``transformer.blocks``, each a bias-free LayerNorm, a fused
    ``Wqkv`` clamped to +-``attn_config.clip_qkv``, grouped K/V heads (``kv_n_heads``), RoPE, ``out_proj``; a second
    LayerNorm and the FFN: a router (``router.layer``, an nn.Linear; with ``moe_jitter_eps`` training scales its
    input in place by uniform noise), softmax in the logits' dtype, top-k, weights divided by their p-norm
    (``moe_normalize_expert_weights``), and the experts as a Python loop over stacked 2-D weights (w1, v1, w2)."""
    attn = c.raw.get("attn_config") or {}
    ffn = c.raw.get("ffn_config") or {}
    if not isinstance(attn, Mapping) or not isinstance(ffn, Mapping):
        raise ConfigError(f"{c.where}: attn_config and ffn_config must be objects")
    a, f = _Cfg(attn, f"{c.where}: attn_config"), _Cfg(ffn, f"{c.where}: ffn_config")
    hidden = c.int_("d_model", default=2048)
    heads = c.int_("n_heads", default=16)
    kv = a.int_("kv_n_heads", default=1)
    head_dim = _check_heads(c, hidden, heads, kv, None)
    layers = c.int_("n_layers", default=24, hi=_MAX_LAYERS)
    experts = f.int_("moe_num_experts", default=4)
    top_k = f.int_("moe_top_k", default=1)
    if top_k > experts:
        raise ConfigError(f"{c.where}: ffn_config.moe_top_k ({top_k}) exceeds moe_num_experts ({experts})")
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    if not isinstance(act, Mapping):
        raise ConfigError(f"{c.where}: ffn_config.ffn_act_fn must be an object with a name")
    clip = attn.get("clip_qkv")
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=32000), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=f.int_("ffn_hidden_size", default=3584),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=False), norm=NormKind.LAYERNORM,
        mlp=MLPKind.GATED,
        activation=_Cfg(dict(act), f"{c.where}: ffn_config.ffn_act_fn").activation("name", default="silu"),
        position=PositionKind.ROPE, max_position_embeddings=c.opt_int("max_seq_len", hi=1 << 30),
        qkv_fused=True, qkv_name="Wqkv", o_name="out_proj", qkv_clamp=clip is not None,
        num_experts=experts, experts_per_token=top_k, moe_intermediate_size=f.int_("ffn_hidden_size", default=3584),
        moe_layers=tuple(range(layers)), moe_experts_loop=True, router_softmax_native=True,
        router_jitter=ffn.get("moe_jitter_eps") is not None,
        attention_dropout=a.float_("attn_pdrop", default=0.0, hi=1.0),
        hidden_dropout=c.float_("resid_pdrop", default=0.0, hi=1.0),
        embedding_dropout=c.float_("emb_pdrop", default=0.0, hi=1.0), program_version="5.24",
    )


# MllamaTextConfig's defaults (configuration_mllama.py, transformers 5.24) for keys a config.json omits
_MLLAMA_TEXT_DEFAULTS = {"vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                         "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                         "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}


def _mllama_text(c: _Cfg, family: str) -> ModelSpec:
    """Llama 3.2 Vision's language model (modeling_mllama.py MllamaTextModel, MllamaForCausalLM): LLaMA
    self-attention layers, and at ``cross_attention_layers`` cross-attention layers (LLaMA-shaped projections plus
    per-head q/k RMSNorms and two tanh gates) that the forward skips when no image states are given (the text-only
    path, all MllamaForCausalLM runs): built, idle. The token table has 8 rows more than ``vocab_size``."""
    c = _Cfg({**_MLLAMA_TEXT_DEFAULTS, **c.raw}, c.where)
    spec = _llama_like(c, "llama")
    # MllamaTextModel builds layer i as a cross-attention layer when i is in the list: other entries build nothing
    cross = sorted({i for i in c.int_list("cross_attention_layers") if 0 <= i < spec.num_layers})
    idle = len(cross) * (2 * spec.head_dim + 2)  # q_norm, k_norm (head_dim each), cross_attn_attn/mlp_gate
    return replace(spec, idle_layers=tuple(cross), idle_params=idle,
                   extra_params=spec.extra_params + 8 * spec.hidden_size + idle, program_version="5.24")


def _fuyu_patch_embedding(spec: ModelSpec, raw: Mapping[str, Any], where: str) -> ModelSpec:
    """FuyuForCausalLM (modeling_fuyu.py FuyuModel): beside the language model built on text_config, the top-level
    ``vision_embed_tokens``, an nn.Linear from a flattened patch (patch_size x patch_size x num_channels, FuyuConfig
    defaults 30 and 3) to the hidden width, which the forward calls only on image patches: on text its weights count,
    and it gets no gradient and no optimizer state (idle)."""
    c = _Cfg({"patch_size": 30, "num_channels": 3, **raw}, where)
    n = c.int_("patch_size") ** 2 * c.int_("num_channels") * spec.hidden_size + spec.hidden_size
    return replace(spec, extra_params=spec.extra_params + n, idle_params=spec.idle_params + n)


def _falcon(c: _Cfg, family: str) -> ModelSpec:
    hidden = c.int_("hidden_size", default=4544)
    heads = c.int_("num_attention_heads", "n_head", default=71)
    new_arch = c.bool_("new_decoder_architecture", default=False)
    multi_query = c.bool_("multi_query", default=True)
    if new_arch:
        kv = c.int_("num_kv_heads", "n_head_kv", default=heads)
    else:
        kv = 1 if multi_query else heads
    head_dim = _check_heads(c, hidden, heads, kv, c.opt_int("head_dim"))
    parallel = c.bool_("parallel_attn", default=True)
    n_ln = c.opt_int("num_ln_in_parallel_attn", hi=2)
    if new_arch:
        norms = n_ln if n_ln is not None else 2
    else:
        norms = 1 if parallel else 2
    alibi = c.bool_("alibi", default=False)
    bias = c.bool_("bias", default=False)
    return ModelSpec(
        name=c.where, family=family, vocab_size=c.int_("vocab_size", default=65024), hidden_size=hidden,
        num_layers=c.int_("num_hidden_layers", "n_layer", default=32, hi=_MAX_LAYERS), num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_size=c.int_("ffn_hidden_size", default=4 * hidden),
        tie_word_embeddings=c.bool_("tie_word_embeddings", default=True), norm=NormKind.LAYERNORM,
        mlp=MLPKind.PLAIN, activation=c.activation("activation", default="gelu"),
        position=PositionKind.ALIBI if alibi else PositionKind.ROPE,
        max_position_embeddings=c.int_("max_position_embeddings", default=2048, hi=1 << 30), norm_bias=True,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, qkv_fused=True, parallel_residual=parallel or new_arch,
        norms_per_layer=norms,
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        hidden_dropout=c.float_("hidden_dropout", default=0.0, hi=1.0),
    )


_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {
    **{t: _llama_like for t in _FAMILIES},
    "gpt2": _gpt2, "gpt_bigcode": _gpt_bigcode, "gpt_neo": _gpt_neo, "gpt_neox": _gpt_neox, "gptj": _gptj,
    "opt": _opt, "bloom": _bloom,
    "falcon": _falcon, "dbrx": _dbrx, "mllama_text_model": _mllama_text,
}
from .ssm_readers import SSM_CLASSES, SSM_READERS  # noqa: E402  (reads _Cfg above)

_READERS.update(SSM_READERS)
_CLASSES.update(SSM_CLASSES)
from .gemma_readers import GEMMA_CLASSES, GEMMA_READERS  # noqa: E402  (reads _Cfg, _Facts, _llama_like above)

_READERS.update(GEMMA_READERS)
_CLASSES.update(GEMMA_CLASSES)
from .modernbert import MODERNBERT_CLASSES, MODERNBERT_READERS  # noqa: E402  (reads _Cfg, _Facts, _llama_like)

_READERS.update(MODERNBERT_READERS)
_CLASSES.update(MODERNBERT_CLASSES)
from .layouts import LAYOUT_CLASSES, LAYOUT_READERS  # noqa: E402  (GPT-style layouts read from data)

_READERS.update(LAYOUT_READERS)
_CLASSES.update(LAYOUT_CLASSES)
from .longcat import LONGCAT_CLASSES, LONGCAT_READERS  # noqa: E402  (LongCat-Flash: reads _Cfg, _llama_like)

_READERS.update(LONGCAT_READERS)
_CLASSES.update(LONGCAT_CLASSES)
from .hyper import HYPER_CLASSES, HYPER_READERS  # noqa: E402  (HY-V4: reads _Cfg, _Facts, _llama_like)

_READERS.update(HYPER_READERS)
_CLASSES.update(HYPER_CLASSES)
from .dsv4 import DSV4_CLASSES, DSV4_READERS  # noqa: E402  (DeepSeek-V4: reads _Cfg, _Facts, _llama_like)

_READERS.update(DSV4_READERS)
_CLASSES.update(DSV4_CLASSES)
from .loops import LOOP_CLASSES, LOOP_READERS  # noqa: E402  (looped layer stacks: reads _Cfg, _llama_like)

_READERS.update(LOOP_READERS)
_CLASSES.update(LOOP_CLASSES)
from .inkling import INKLING_CLASSES, INKLING_READERS  # noqa: E402  (Inkling's text decoder: reads _Cfg)

_READERS.update(INKLING_READERS)
_CLASSES.update(INKLING_CLASSES)
from .inkling2 import INKLING2_CLASSES, INKLING2_READERS  # noqa: E402  (Inkling 2's text decoder)

_READERS.update(INKLING2_READERS)
_CLASSES.update(INKLING2_CLASSES)
from .jetmoe import JETMOE_CLASSES, JETMOE_READERS  # noqa: E402  (JetMoE: mixture of attention heads)

_READERS.update(JETMOE_READERS)
_CLASSES.update(JETMOE_CLASSES)
from .zaya import ZAYA_CLASSES, ZAYA_READERS  # noqa: E402  (ZAYA: CCA attention, router state across layers)

_READERS.update(ZAYA_READERS)
_CLASSES.update(ZAYA_CLASSES)
_ALIASES = {"RefinedWebModel": "falcon", "RefinedWeb": "falcon", "gemma3": "gemma3_text",
            # the language models of vision-language configs (vramplan.multimodal): Qwen2-VL's text model is Qwen2's
            # decoder with multimodal RoPE, Qwen3-VL's is Qwen3's (with DeepStack adds, vramplan.multimodal)
            "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}
SUPPORTED_MODEL_TYPES = tuple(sorted(_READERS))
# The transformers release whose modeling code the hand-written block programs follow (per family: ModelSpec
# .program_version; families added later were written from, and checked against, a newer release).
PROGRAMS_TRANSFORMERS_VERSION = "5.17"


@lru_cache(maxsize=1)
def installed_transformers() -> str | None:
    """The installed transformers version (package metadata only: nothing is imported), or None."""
    from ._files import installed_version

    return installed_version("transformers")


# The transformers releases every shipped program was checked against (the fake-tensor trace of the release's own
# code: the test suite and benchmarks/coverage_report.py); mechanisms that differ between them follow the workload's
# release (Workload.transformers_release)
CHECKED_TRANSFORMERS = ("5.24", "5.25")


def version_warning(spec: ModelSpec) -> str | None:
    """A warning when the installed transformers is neither the release the spec's program models nor one the shipped
    programs were checked against."""
    have = installed_transformers()
    want = spec.program_version
    if have is None or ".".join(have.split(".")[:2]) in (".".join(want.split(".")[:2]), *CHECKED_TRANSFORMERS):
        return None
    return (f"the {spec.family} memory program follows transformers {want}; transformers {have} is installed and "
            "may allocate differently: `vramplan trace` runs the installed code")
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _special_floats(obj: Any, depth: int = 0) -> Any:
    """transformers >= 5 saves non-finite floats as ``{"__float__": "Infinity"}``; read them back as floats."""
    if depth > 64:
        raise ConfigError("config nested too deeply to be a config.json")
    if isinstance(obj, Mapping):
        if len(obj) == 1 and "__float__" in obj:
            v = obj["__float__"]
            if v in _SPECIAL_FLOATS:
                return _SPECIAL_FLOATS[v]
            raise ConfigError(f"unknown special float {v!r} in config.json")
        return {k: _special_floats(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_special_floats(v, depth + 1) for v in obj]
    return obj


def _resolve(raw: Mapping[str, Any], name: str) -> str:
    """The reader for a config: by model_type, else by the class its ``architectures`` names (transformers
    builds the class; several model types share one, e.g. EXAONE 3 and InternLM 3 are LlamaForCausalLM)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{name}: no 'model_type' string; is this a Hugging Face config.json?")
    family = _ALIASES.get(model_type, model_type)
    if family in _READERS or _derived(family) is not None:
        return family
    archs = raw.get("architectures")
    if isinstance(archs, list):
        for arch in archs:
            if isinstance(arch, str) and arch in _CLASSES:
                return _CLASSES[arch]
    if isinstance(raw.get("auto_map"), Mapping):
        raise ConfigError(f"{name}: model_type {model_type!r} is not supported: it needs the model's own code "
                          "(auto_map), and vramplan never runs code from a config; use a transformers architecture")
    missing = _MISSING_MECHANISMS.get(family)
    if missing:
        raise ConfigError(f"{name}: model_type {model_type!r} is not supported by vramplan estimate: no memory "
                          f"program for {missing}; run `vramplan trace` on this config instead (pip install "
                          "'vramplan[torch]'), which runs the installed transformers' code")
    from .recipes import refusal_for

    why = refusal_for(model_type)
    if why:
        raise ConfigError(f"{name}: model_type {model_type!r} is not supported by vramplan estimate: {why}; run "
                          "`vramplan trace` on this config instead (pip install 'vramplan[torch]'), which runs the "
                          "installed transformers' code")
    raise ConfigError(f"{name}: model_type {model_type!r} is not supported by vramplan estimate (memory programs for "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}); run `vramplan trace` on this config instead "
                      "(pip install 'vramplan[torch]'), which runs the installed transformers' code")


# What the estimator lacks for model types of transformers 5.24 it refuses (their modeling files), named in the error
_MISSING_MECHANISMS = {
    "git": "GIT (modeling_git.py GitForCausalLM): a BERT-style post-LN stack over the CLIP image encoder's tokens "
           "prepended to the text (bidirectional on the image, causal on the text), not a model.layers decoder; "
           "vramplan trace runs it with --text-only (it cannot place its image tokens: no get_image_features)",
    "phi4_multimodal": "Phi-4-multimodal's embed_tokens_extend (Phi4MultimodalFeatureEmbedding: a SigLIP-style image "
                       "encoder with crops and an audio Conformer, built whole inside the causal LM) beside its "
                       "Phi-3-style language model; vramplan trace runs it with --text-only (no get_image_features to "
                       "place its image tokens)",
    "xlstm": "xLSTM's mLSTM/sLSTM blocks (exponential gating, chunked parallel mLSTM; not a model.layers stack), and "
             "transformers 5.24's own xLSTM forward fails in bf16, so no trace checks one",
    "blt": "the Byte Latent Transformer's patcher, local encoder, global transformer and local decoder (byte patches "
           "of data-dependent lengths, cross-attention between bytes and patches)",
}


@lru_cache(maxsize=256)
def _derived(model_type: str) -> Callable[[_Cfg, str], ModelSpec] | None:
    """The reader of a model type with a shipped derived recipe (vramplan.recipes), or None."""
    from .recipes import recipe_for

    recipe = recipe_for(model_type)
    if recipe is None:
        return None
    facts = _facts_from(recipe.facts, recipe.transformers)

    def read(c: _Cfg, family: str) -> ModelSpec:
        # transformers fills a key the config.json omits from the type's own config class defaults
        return _llama_like(_Cfg({**recipe.defaults, **c.raw}, c.where), family, facts)

    return read


def _facts_from(d: Mapping[str, Any], version_: str) -> _Facts:
    fields = dict(d)
    fields["norm"] = NormKind(fields["norm"])
    fields["aliases"] = tuple(tuple(a) for a in fields.get("aliases", ()))
    fields["mlp_names"] = tuple(fields.get("mlp_names", ()))
    fields["moe_keys"] = tuple(tuple(a) for a in fields.get("moe_keys", ()))
    fields["moe_rule"] = tuple(tuple(a) for a in fields.get("moe_rule", ()))
    fields["moe_flags"] = tuple(tuple(a) for a in fields.get("moe_flags", ()))
    fields["moe_rule_default"] = tuple(tuple(a) for a in fields.get("moe_rule_default", ()))
    fields["held_through_mlp"] = tuple(fields.get("held_through_mlp", ()))
    fields["uniform_keys"] = tuple(tuple(a) for a in fields.get("uniform_keys", ()))
    fields["refuse_keys"] = tuple(fields.get("refuse_keys", ()))
    fields["layer_kinds"] = tuple(fields.get("layer_kinds", ()))
    if "mla_defaults" in fields:
        fields["mla_defaults"] = tuple(fields["mla_defaults"])
    fields["version"] = ".".join(version_.split(".")[:2])
    return _Facts(**fields)


def _text_tower(raw: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """A multimodal config's language model, and a note that its other towers are not counted."""
    text = raw.get("text_config")
    if not isinstance(text, Mapping) and isinstance(raw.get("vision_config"), Mapping) and \
            raw.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        # Qwen2-VL / Qwen2.5-VL checkpoints keep the language model's fields at the top level (transformers'
        # Qwen2_5_VLConfig builds its text_config from them)
        text = {k: v for k, v in raw.items() if k != "vision_config"}
        text["model_type"] = f"{raw['model_type']}_text"
    if not isinstance(text, Mapping):
        return raw, ()
    towers = [k.removesuffix("_config") for k in raw if k.endswith("_config") and k != "text_config"
              and isinstance(raw[k], Mapping)]
    model_type = raw.get("model_type")
    sub = dict(text)
    if not isinstance(sub.get("model_type"), str):
        sub["model_type"] = f"{model_type}_text" if isinstance(model_type, str) else None
    if model_type == "gemma3":
        sub["model_type"] = "gemma3_text"
    if "tie_word_embeddings" in raw and ("tie_word_embeddings" not in sub or model_type in ("internvl", "mistral3")):
        # InternVL / Mistral 3 tie by the top-level flag (their ForConditionalGeneration reads the outer config)
        sub["tie_word_embeddings"] = raw["tie_word_embeddings"]
    if not towers:
        return sub, ()
    from .multimodal import text_only_class

    cls = text_only_class(raw)
    if cls is not None:
        # what transformers builds: the language model on text_config (its own tie flag), no tower at all
        sub = {**text, "model_type": sub["model_type"]}
        return sub, (f"{name}: transformers' causal-LM class for {model_type}, {cls}, is the language model alone "
                     f"(built on text_config; the {' and '.join(towers)} tower is not built): estimated as that, "
                     "text tokens only, like `vramplan trace`; architectures naming the image-text class would "
                     "build the whole model",)
    return sub, (f"{name} is a {model_type} model with a {' and '.join(towers)} tower: estimate counts its language "
                 f"model only (weights, activations and cache of the {' and '.join(towers)} tower are missing); "
                 "`vramplan trace` runs the whole model",)


def spec_from_config(raw: object, name: str = "config.json") -> ModelSpec:
    """Build a spec from a parsed config mapping. Raises :class:`ConfigError` on anything unreadable."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: a config.json must hold a JSON object, not {type(raw).__name__}")
    cfg: Mapping[str, Any] = _special_floats(raw)
    cfg_raw = cfg
    quantization = None
    if (cfg.get("quantization_config") or cfg.get("compression_config")) is not None:  # a quantized checkpoint
        from .quant import quantization_from_config  # (imported for one only)

        quantization = quantization_from_config(cfg, name)
    cfg, notes = _text_tower(cfg, name)
    family = _resolve(cfg, name)
    reader = _READERS.get(family) or _derived(family)
    assert reader is not None  # _resolve returned a family with a reader
    try:
        spec = reader(_Cfg(cfg, name), family)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError, ZeroDivisionError) as exc:
        raise ConfigError(f"{name}: cannot read the config ({exc}); check its fields") from None
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type != spec.model_type:
        spec = replace(spec, model_type=model_type)
    if quantization is not None:
        spec = replace(spec, quantization=quantization)
    if cfg_raw.get("model_type") == "fuyu":
        spec = _fuyu_patch_embedding(spec, cfg_raw, name)
    if notes:
        spec = replace(spec, notes=notes)
        from .multimodal import multimodal_from_config, text_only_class

        if text_only_class(cfg_raw) is not None:
            return spec

        mm = multimodal_from_config(_special_floats(raw), spec.hidden_size, name)
        if mm is not None:
            spec = replace(spec, multimodal=mm)
    return spec


def load_config_file(path: str | Path) -> ModelSpec:
    """Read and parse a local config.json (or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = read_text_limited(p, MAX_CONFIG_BYTES)
        raw = json.loads(text)
    except FileTooLarge:
        raise ConfigError(f"{path}: far too large for a config.json (limit 4 MiB)") from None
    except NotAFile as exc:
        raise ConfigError(f"{exc}; give a catalog name or a config.json path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; give a Hugging Face config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to be a config.json") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc}); give a catalog name or a config.json "
                          "path") from None
    return spec_from_config(raw, name=p.parent.name if p.name == "config.json" else p.name)
