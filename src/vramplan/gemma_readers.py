"""Config reader of Gemma 4's language model (``gemma4_text``; the text tower of a ``gemma4`` config).

Written from transformers 5.24 ``models/gemma4/configuration_gemma4.py`` (Gemma4TextConfig) and
``modeling_gemma4.py`` (Gemma4TextModel, Gemma4TextDecoderLayer, Gemma4TextAttention, Gemma4TextMLP,
Gemma4TextRouter, Gemma4TextExperts). Gemma 3's layer (sandwich norms, per-head q/k norms, sliding and global
layer types) with:

* per-layer heads: ``per_layer_config`` overrides head_dim / num_key_value_heads of some layers (by default the
  global layers: ``global_head_dim`` 512 and, with ``attention_k_eq_v``, ``num_global_key_value_heads``);
* ``attention_k_eq_v``: global layers have no v_proj, their values are the key projection;
* a scale-free RMSNorm on the values (v_norm), attention scaling 1.0;
* KV sharing (``num_kv_shared_layers``): the last layers reuse the keys and values the last earlier layer of their
  type stored (``kv_sharing_modes`` "store" / "reuse"): no k/v projections, norms or cache; with
  ``use_double_wide_mlp`` their MLP is twice as wide;
* per-layer embeddings (``hidden_size_per_layer_input``): a second token table of num_layers x that width and a
  projection of the embeddings feed a gated branch at the end of every layer;
* ``enable_moe_block``: a routed MoE block beside the dense MLP of every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .errors import ConfigError
from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like
from .spec import LayerOverride, ModelSpec

__all__ = ["GEMMA_CLASSES", "GEMMA_READERS"]

# Gemma4TextConfig: gelu_pytorch_tanh, GemmaRMSNorm-shaped norms (Gemma4RMSNorm scales by the weight, not 1 + w:
# the same tensors), sqrt(hidden) embedding scale, tied head, pre and post norms around both sublayers, per-head
# q/k norms, sliding layers 5:1 with the last layer global, optional final logit soft-capping
_GEMMA4 = _Facts(version="5.24", gemma=True, tie=True, layout="sandwich", qk_norm="head", sliding="types",
                 sliding_every=6, softcap=True)
_OVERRIDABLE = {"head_dim", "num_key_value_heads"}
# Gemma4TextConfig's defaults, for the keys a config.json leaves out
_DEFAULTS: dict[str, Any] = {"vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216,
                             "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 4,
                             "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                             "max_position_embeddings": 131_072, "sliding_window": 512}


def _layer_types(c: _Cfg, layers: int) -> list[str]:
    types = c.raw.get("layer_types")
    if types is None:  # Gemma4TextConfig.__post_init__: 5 sliding then 1 global; the last layer is always global
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"{c.where}: layer_types must list sliding_attention / full_attention once per layer "
                          f"({layers})")
    types = list(types)
    types[-1] = "full_attention"  # forced by the config class (with a warning)
    return types


def _per_layer(c: _Cfg, types: list[str], k_eq_v: bool) -> dict[int, dict[str, int]]:
    """Per-layer head_dim / num_key_value_heads overrides: the saved ``per_layer_config`` (keys are layer indices,
    saved as zero-padded strings), else what the config class derives from ``global_head_dim`` and
    ``num_global_key_value_heads``."""
    raw = c.raw.get("per_layer_config")
    layers = len(types)
    if raw is None:
        over: dict[str, int] = {"head_dim": c.int_("global_head_dim", default=512)}
        if k_eq_v and c.raw.get("num_global_key_value_heads") is not None:
            over["num_key_value_heads"] = c.int_("num_global_key_value_heads")
        return {i: over for i, t in enumerate(types) if t == "full_attention"}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{c.where}: per_layer_config must map layer indices to overrides")
    out: dict[int, dict[str, int]] = {}
    for k, v in raw.items():
        idx = int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else -1
        if not 0 <= idx < layers or not isinstance(v, Mapping):
            raise ConfigError(f"{c.where}: per_layer_config key {k!r} is not a layer index below {layers}")
        unknown = set(v) - _OVERRIDABLE
        if unknown:
            raise ConfigError(f"{c.where}: per_layer_config overrides {', '.join(sorted(unknown))} of layer {idx}, "
                              "which vramplan estimate does not model; run vramplan trace")
        sub = _Cfg(v, f"{c.where}: per_layer_config[{k}]")
        out[idx] = {key: sub.int_(key) for key in v}
    return out


def _kv_sharing(types: list[str], shared: int) -> list[str | None]:
    """Gemma4TextConfig.kv_sharing_modes: the last ``shared`` layers "reuse"; the last earlier layer of each type
    "store"s its keys and values."""
    n = len(types)
    if not shared:
        first = n
    else:
        first = n - shared
    modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
    for t in set(types):
        producers = [i for i in range(first) if types[i] == t]
        if producers:
            modes[producers[-1]] = "store"
    return modes


def _gemma4_text(c: _Cfg, family: str, unified: bool = False) -> ModelSpec:
    """``unified``: Gemma4UnifiedTextConfig / modeling_gemma4_unified.py, the same attention and KV sharing without
    per-layer embeddings or MoE (those attributes are removed from its config), a 1024-token window and 262144
    positions by default."""
    if c.raw.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{c.where}: use_bidirectional_attention 'all' (a non-causal Gemma 4) is not modelled by "
                          "vramplan estimate; run vramplan trace")
    defaults = {**_DEFAULTS, "sliding_window": 1024, "max_position_embeddings": 262_144} if unified else _DEFAULTS
    raw = {k: v for k, v in c.raw.items() if v is not None}
    if unified:
        for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block"):
            raw.pop(k, None)
        raw["hidden_size_per_layer_input"] = 0
    c = _Cfg({**defaults, **raw}, c.where)
    base = _llama_like(c, family, _GEMMA4)
    layers = base.num_layers
    types = _layer_types(c, layers)
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if base.sliding_window else ()
    k_eq_v = c.bool_("attention_k_eq_v", default=False)
    per = _per_layer(c, types, k_eq_v)
    shared = c.int_("num_kv_shared_layers", default=0, lo=0, hi=_MAX_LAYERS)
    if shared > layers:
        raise ConfigError(f"{c.where}: num_kv_shared_layers ({shared}) exceeds num_hidden_layers ({layers})")
    modes = _kv_sharing(types, shared)
    for i, m in enumerate(modes):
        if m == "reuse" and "store" not in [modes[j] for j in range(i) if types[j] == types[i]]:
            raise ConfigError(f"{c.where}: layer {i} reuses the keys/values of a {types[i]} layer, and no earlier "
                              "layer of that type stores them (the layer types producing a cache must include "
                              "those using it)")
    double = c.bool_("use_double_wide_mlp", default=False)
    inter = base.intermediate_size
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(layers):
        o = per.get(i, {})
        hd, kv = o.get("head_dim", base.head_dim), o.get("num_key_value_heads", base.num_kv_heads)
        if base.num_heads % kv:
            raise ConfigError(f"{c.where}: layer {i}: num_attention_heads ({base.num_heads}) must be a multiple of "
                              f"its key/value heads ({kv})")
        reuse = modes[i] == "reuse"
        key = (hd, kv, inter * (2 if double and reuse else 1), k_eq_v and types[i] == "full_attention", reuse,
               modes[i] == "store")
        if key != (base.head_dim, base.num_kv_heads, inter, False, False, False):
            groups.setdefault(key, []).append(i)
    overrides = tuple(LayerOverride(tuple(ix), head_dim=hd, num_kv_heads=kv, intermediate_size=mi, v_from_k=vk,
                                    kv_shared=reuse, kv_store=store)
                      for (hd, kv, mi, vk, reuse, store), ix in groups.items())
    moe: dict[str, Any] = {}
    if c.bool_("enable_moe_block", default=False):
        experts = c.int_("num_experts")
        top_k = c.int_("top_k_experts")
        if top_k > experts:
            raise ConfigError(f"{c.where}: top_k_experts ({top_k}) exceeds num_experts ({experts})")
        # Gemma4TextRouter: softmax(dtype=fp32) of the logits, top-k renormalised and scaled by per_expert_scale
        # (fp32 weights reach the experts); its scale (hidden) and per_expert_scale (experts) are parameters
        moe = {"num_experts": experts, "experts_per_token": top_k,
               "moe_intermediate_size": c.int_("moe_intermediate_size"), "moe_layers": tuple(range(layers)),
               "router_weights_fp32": True, "moe_extra_params": base.hidden_size + experts, "moe_beside_mlp": True}
    ple = c.int_("hidden_size_per_layer_input", default=256, lo=0)
    return replace(base, sliding_layers=sliding, layer_overrides=overrides, v_norm=True, per_layer_input=ple,
                   per_layer_vocab=c.int_("vocab_size_per_layer_input", default=262_144) if ple else 0, **moe)


def _gemma4_unified_text(c: _Cfg, family: str) -> ModelSpec:
    return _gemma4_text(c, family, unified=True)


# Gemma3nTextConfig (configuration_gemma3n.py): Gemma 4's layer kinds (sandwich norms, per-head q/k norms, a
# scale-free v norm, sliding 4:1 with full every fifth layer, KV sharing, per-layer inputs), soft-capped logits
_GEMMA3N = _Facts(version="5.24", gemma=True, tie=True, layout="sandwich", qk_norm="head", sliding="types",
                  sliding_every=5, softcap=True)
_GEMMA3N_DEFAULTS: dict[str, Any] = {"vocab_size": 262_400, "hidden_size": 2048, "num_hidden_layers": 35,
                                     "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
                                     "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
                                     "sliding_window": 512, "final_logit_softcapping": 30.0}


def _gemma3n_text(c: _Cfg, family: str) -> ModelSpec:
    """Gemma 3n's language model (modeling_gemma3n.py, :mod:`vramplan.gemma3n`): ``intermediate_size`` one per layer
    (or one for all), ``activation_sparsity_pattern`` (default: 0.95 on the first 10 layers of a stack deeper than
    10), AltUp (``altup_num_inputs`` copies), LAuReL (``laurel_rank``), KV sharing as Gemma 4, per-layer inputs."""
    raw = {k: v for k, v in c.raw.items() if v is not None}
    c = _Cfg({**_GEMMA3N_DEFAULTS, **raw}, c.where)
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    inter_raw = c.raw.get("intermediate_size", 16_384)
    inter = list(inter_raw) if isinstance(inter_raw, list) else [inter_raw] * layers
    if len(inter) != layers or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in inter):
        raise ConfigError(f"{c.where}: intermediate_size must be one positive integer or one per layer ({layers})")
    sparsity = c.raw.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = [0.95] * (10 if layers > 10 else 0) + [0.0] * (layers - (10 if layers > 10 else 0))
    if not isinstance(sparsity, list) or len(sparsity) != layers or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in sparsity):
        raise ConfigError(f"{c.where}: activation_sparsity_pattern must give a value in [0, 1) for each of the "
                          f"{layers} layers")
    types = c.raw.get("layer_types")
    if types is None:
        types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"{c.where}: layer_types must list sliding_attention / full_attention once per layer "
                          f"({layers})")
    base = _llama_like(_Cfg({**c.raw, "intermediate_size": inter[0], "layer_types": types}, c.where), family,
                       _GEMMA3N)
    shared = c.int_("num_kv_shared_layers", default=15, lo=0, hi=_MAX_LAYERS)
    if shared > layers:
        raise ConfigError(f"{c.where}: num_kv_shared_layers ({shared}) exceeds num_hidden_layers ({layers})")
    modes = _kv_sharing(types, shared)
    if shared and sorted(set(types[:layers - shared])) != sorted(set(types)):
        raise ConfigError(f"{c.where}: the layer types producing a cache must include those using it (every layer "
                          "type of the KV-sharing tail needs an earlier layer of that type)")
    groups: dict[tuple[int, bool, bool, bool], list[int]] = {}
    for i in range(layers):
        key = (inter[i], modes[i] == "reuse", modes[i] == "store", sparsity[i] > 0)
        if key != (base.intermediate_size, False, False, False):
            groups.setdefault(key, []).append(i)
    overrides = tuple(LayerOverride(tuple(ix), intermediate_size=mi, kv_shared=reuse, kv_store=store,
                                    act_sparsity=sparse)
                      for (mi, reuse, store, sparse), ix in groups.items())
    altup = c.int_("altup_num_inputs", default=4, lo=1, hi=64)
    if c.int_("altup_active_idx", default=0, lo=0) >= altup:
        raise ConfigError(f"{c.where}: altup_active_idx must be below altup_num_inputs ({altup})")
    ple = c.int_("hidden_size_per_layer_input", default=256, lo=1)
    return replace(base, layer_overrides=overrides, v_norm=True, per_layer_input=ple,
                   per_layer_vocab=c.int_("vocab_size_per_layer_input", default=262_144), altup_inputs=altup,
                   laurel_rank=c.int_("laurel_rank", default=64), kv_shared_prefill_slice=False,
                   altup_correct_scale=c.bool_("altup_correct_scale", default=True))


GEMMA_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {"gemma4_text": _gemma4_text,
                                                             "gemma4_unified_text": _gemma4_unified_text,
                                                             "gemma3n_text": _gemma3n_text}
GEMMA_CLASSES: dict[str, str] = {"Gemma4ForCausalLM": "gemma4_text", "Gemma4UnifiedForCausalLM": "gemma4_unified_text",
                                 "Gemma3nForCausalLM": "gemma3n_text"}
