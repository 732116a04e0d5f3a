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
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._files import FileTooLarge, NotAFile, read_text_limited
from .errors import ConfigError
from .spec import Activation, MLPKind, ModelSpec, NormKind, PositionKind

__all__ = ["SUPPORTED_MODEL_TYPES", "load_config_file", "spec_from_config"]

MAX_CONFIG_BYTES = 4 << 20  # a real config.json is a few KiB; refuse anything absurd
_MAX_DIM = 1 << 22  # 4M: above any real hidden/vocab/intermediate size
_MAX_LAYERS = 4096
_MISSING: Any = object()

_ACTIVATIONS = {
    "silu": Activation.SILU, "swish": Activation.SILU,
    "gelu": Activation.GELU, "gelu_python": Activation.GELU,
    "gelu_new": Activation.GELU_NEW, "gelu_fast": Activation.GELU_NEW,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "relu": Activation.RELU,
}


class _Cfg:
    """Typed, range-checked access to a config mapping."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

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


def _check_heads(c: _Cfg, hidden: int, heads: int, kv: int, head_dim: int | None) -> int:
    if kv > heads or heads % kv:
        raise ConfigError(f"{c.where}: num_attention_heads ({heads}) must be a multiple of the key/value "
                          f"heads ({kv})")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{c.where}: hidden_size ({hidden}) is not divisible by num_attention_heads "
                              f"({heads}); set head_dim")
        head_dim = hidden // heads
    return head_dim


def _layer_types(c: _Cfg, n_layers: int, window: int | None, default_every: int = 0) -> tuple[int, ...]:
    """Indices of sliding-window layers: from ``layer_types`` when given, else a fixed pattern."""
    if window is None:
        return ()
    types = c.raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"{c.where}: layer_types must list one string per layer ({n_layers})")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if default_every:
        # Gemma 2: even layers are local; Gemma 3: 5 local then 1 global (sliding_window_pattern).
        return tuple(i for i in range(n_layers) if (i + 1) % default_every)
    return tuple(range(n_layers))


# ---- families ---------------------------------------------------------------------------

def _llama_like(c: _Cfg, family: str) -> ModelSpec:
    """LLaMA and its descendants: Mistral, Mixtral, Qwen2/2.5/3 (+MoE), Gemma 1/2/3, Phi-3/4."""
    hidden = c.int_("hidden_size")
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    heads = c.int_("num_attention_heads")
    kv = c.int_("num_key_value_heads", default=heads)
    head_dim = _check_heads(c, hidden, heads, kv, c.opt_int("head_dim"))
    vocab = c.int_("vocab_size")
    gemma = family.startswith("gemma")
    tie = c.bool_("tie_word_embeddings", default=gemma)  # Gemma configs tie by default; the rest do not
    act_default = "gelu_pytorch_tanh" if gemma else "silu"
    # Gemma: transformers builds gelu_pytorch_tanh from hidden_activation and ignores hidden_act ("gelu")
    act = c.activation("hidden_activation", default=act_default) if gemma else \
        c.activation("hidden_act", default=act_default)
    qkv_bias = family in ("qwen2", "qwen2_moe") or c.bool_("attention_bias", default=False)
    o_bias = c.bool_("attention_bias", default=False) and family not in ("qwen2", "qwen2_moe")
    window: int | None = None
    sliding: tuple[int, ...] = ()
    if family in ("mistral", "mixtral"):
        window = c.opt_int("sliding_window")
        sliding = tuple(range(layers)) if window else ()
    elif family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if c.bool_("use_sliding_window", default=False):
            window = c.opt_int("sliding_window")
            max_window = c.int_("max_window_layers", default=layers, lo=0, hi=_MAX_LAYERS)
            sliding = tuple(i for i in range(layers) if i >= max_window) if window else ()
    elif family == "gemma2":
        window = c.opt_int("sliding_window")
        sliding = _layer_types(c, layers, window, default_every=2)
    elif family == "gemma3_text":
        window = c.opt_int("sliding_window")
        every = c.int_("sliding_window_pattern", default=6, hi=_MAX_LAYERS)
        sliding = _layer_types(c, layers, window, default_every=every)
    elif family == "phi3":
        window = c.opt_int("sliding_window")
        sliding = tuple(range(layers)) if window else ()

    num_experts = 0
    top_k = 0
    moe_inter = 0
    shared_inter = 0
    moe_layers: tuple[int, ...] = ()
    if family == "mixtral":
        num_experts = c.int_("num_local_experts", default=8)
        top_k = c.int_("num_experts_per_tok", default=2)
        moe_inter = c.int_("intermediate_size")
        moe_layers = tuple(range(layers))
    elif family in ("qwen2_moe", "qwen3_moe"):
        num_experts = c.int_("num_experts", default=60 if family == "qwen2_moe" else 128)
        top_k = c.int_("num_experts_per_tok", default=4 if family == "qwen2_moe" else 8)
        moe_inter = c.int_("moe_intermediate_size")
        step = c.int_("decoder_sparse_step", default=1, hi=_MAX_LAYERS)
        dense_only = set(c.int_list("mlp_only_layers"))
        moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        if family == "qwen2_moe":
            shared_inter = c.int_("shared_expert_intermediate_size", default=0, lo=0)
    if num_experts and top_k > num_experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds the number of experts "
                          f"({num_experts})")
    inter = c.int_("intermediate_size", default=moe_inter if moe_inter else _MISSING)
    rotary = 1.0
    if family == "phi3":
        rotary = c.float_("partial_rotary_factor", default=1.0, lo=0.0, hi=1.0)
    return ModelSpec(
        name=c.where, family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=inter,
        tie_word_embeddings=tie, norm=NormKind.GEMMA_RMSNORM if gemma else NormKind.RMSNORM,
        mlp=MLPKind.GATED, activation=act, position=PositionKind.ROPE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=c.bool_("mlp_bias", default=False),
        qkv_fused=family == "phi3", gate_up_fused=family == "phi3",
        norms_per_layer=4 if family in ("gemma2", "gemma3_text") else 2,
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
        rotary_fraction=rotary, embed_scale=gemma,
        logit_softcap=c.opt_float("final_logit_softcapping") if family == "gemma2" else None,
        attn_logit_softcap=c.opt_float("attn_logit_softcapping") if family == "gemma2" else None,
        num_experts=num_experts, experts_per_token=top_k, moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter, shared_expert_gate=bool(shared_inter),
        moe_layers=moe_layers, sliding_window=window, sliding_layers=sliding,
        attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
    )


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
    )


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
    **{t: _llama_like for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt2": _gpt2, "gpt_neox": _gpt_neox, "gptj": _gptj, "opt": _opt, "bloom": _bloom, "falcon": _falcon,
}
_ALIASES = {"RefinedWebModel": "falcon", "RefinedWeb": "falcon", "gemma3": "gemma3_text"}
SUPPORTED_MODEL_TYPES = tuple(sorted(_READERS))


def spec_from_config(raw: object, name: str = "config.json") -> ModelSpec:
    """Build a spec from a parsed config mapping. Raises :class:`ConfigError` on anything unreadable."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: a config.json must hold a JSON object, not {type(raw).__name__}")
    from .quant import quantization_from_config

    quantization = quantization_from_config(raw, name)
    model_type = raw.get("model_type")
    if model_type == "gemma3" and isinstance(raw.get("text_config"), Mapping):
        # Gemma 3 4B+ are image-text models: the language model's config is nested.
        raw = {"model_type": "gemma3_text", **raw["text_config"]}
        model_type = "gemma3_text"
    if not isinstance(model_type, str):
        raise ConfigError(f"{name}: no 'model_type' string; is this a Hugging Face config.json?")
    family = _ALIASES.get(model_type, model_type)
    reader = _READERS.get(family)
    if reader is None:
        raise ConfigError(f"{name}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        spec = reader(_Cfg(raw, name), family)
        return replace(spec, quantization=quantization) if quantization is not None else spec
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError, ZeroDivisionError) as exc:
        raise ConfigError(f"{name}: cannot read the config ({exc}); check its fields") from None


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
