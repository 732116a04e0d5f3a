"""ModernBERT's decoder (``model_type`` ``modernbert-decoder``), read as a LLaMA-class layout.

transformers 5.24 ``models/modernbert_decoder/modeling_modernbert_decoder.py``: ``ModernBertDecoderEmbeddings``
(token embeddings, a LayerNorm, dropout; the un-normed lookup is a temporary of the expression, not held; the
mask arguments hold the normed embeddings through the forward),
pre-norm layers of ``nn.LayerNorm`` (``norm_bias``) whose first layer has no attention norm (``nn.Identity``),
separate q/k/v projections and ``Wo`` (``attention_bias``), RoPE with a theta per layer type on two fp32 copies
of each of q and k (``(q.float() * cos) + (rotate_half(q.float()) * sin)``, cast back once both are rotated),
sliding layers (``local_attention // 2`` tokens) except every ``global_attn_every_n_layers``-th, the GLU
``Wo(act(input) * gate)`` of one fused ``Wi`` (``mlp_bias``), a final norm, and the prediction head
``norm(act(dense(x)))`` before the tied ``decoder`` (``decoder_bias``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .errors import ConfigError
from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like
from .spec import LayerOverride, ModelSpec, NormKind

__all__ = ["MODERNBERT_CLASSES", "MODERNBERT_READERS"]

_FACTS = _Facts(version="5.24", tie=True, norm=NormKind.LAYERNORM, gate_up_fused=True, o_name="Wo",
                embed_norm=True)


def _modernbert_decoder(c: _Cfg, family: str) -> ModelSpec:
    layers = c.int_("num_hidden_layers", default=22, hi=_MAX_LAYERS)
    every = c.int_("global_attn_every_n_layers", default=3, lo=1)
    types = c.raw.get("layer_types")
    if types is None:
        types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise ConfigError(f"{c.where}: layer_types must list sliding_attention / full_attention once per layer "
                          f"({layers})")
    act = c.activation("hidden_activation", default="gelu")
    if c.activation("classifier_activation", default="gelu") is not act:
        raise ConfigError(f"{c.where}: a classifier_activation other than hidden_activation is not modelled by "
                          "vramplan estimate; run vramplan trace")
    raw: dict[str, Any] = {k: v for k, v in c.raw.items() if k not in ("layer_types", "sliding_window")}
    for key, default in (("vocab_size", 50368), ("hidden_size", 768), ("intermediate_size", 1152),
                         ("num_hidden_layers", layers), ("num_attention_heads", 12),
                         ("max_position_embeddings", 8192)):
        raw.setdefault(key, default)
    raw.pop("head_dim", None)
    spec = _llama_like(_Cfg(raw, c.where), family, _FACTS)
    local = c.opt_int("local_attention", hi=1 << 30) if "local_attention" in c.raw else 128
    window = local // 2 if local else None
    return replace(spec, activation=act, rope_style="fp32_each", norm_bias=c.bool_("norm_bias", default=False),
                   lm_head_bias=c.bool_("decoder_bias", default=True), head_transform=True,
                   head_transform_bias=c.bool_("classifier_bias", default=False), raw_embeds_held=False,
                   layer_overrides=(LayerOverride((0,), attn_norm=False),),
                   sliding_window=window,
                   sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ())


MODERNBERT_READERS = {"modernbert-decoder": _modernbert_decoder}
MODERNBERT_CLASSES = {"ModernBertDecoderForCausalLM": "modernbert-decoder"}
