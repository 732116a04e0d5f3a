"""GPT-style layouts read from data: model types whose decoder is not the LLaMA-class ``model.layers`` stack
(``transformer.blocks``, ``transformer.h``, fairseq-style decoders) but whose parts the block programs already
replay (:mod:`vramplan.blocks`), with a few spec facts of their own (ALiBi added in fp32, rotate-every-two rotary
on fp32 tables, scaled sinusoidal positions...).

A layout (package data ``data/layouts/transformers-<version>.json``) names, per model type, the config keys each
size of the spec is read from (with the config class's defaults) and the spec facts its ``modeling_*.py`` fixes.
``vramplan.derive._layouts`` checks every layout against the installed transformers: the reader's parameter count
must equal the meta-device model's on the library default and on copies with each mapped key changed, and the
defaults must be the config class's. Pure data at estimate time: no torch.

Size forms (spec field -> how): a config key or a list of keys (the first present, non-null one, else the
layout's default for it); or ``{"keys": [...], "of": FIELD, "times": N, "plus": P, "over": FIELD}``: the keys'
value, else FIELD's value, times N plus P (divided by FIELD's value where ``over`` is given).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from functools import lru_cache
from typing import Any

from .errors import ConfigError
from .hfconfig import _MAX_LAYERS, _MISSING, _Cfg, _check_heads
from .spec import Activation, MLPKind, ModelSpec, NormKind, PositionKind

__all__ = ["LAYOUT_CLASSES", "LAYOUT_READERS", "layout_for", "layout_types"]

_INTS = {"hidden_size", "num_heads", "num_kv_heads", "num_layers", "vocab_size", "intermediate_size",
         "max_position_embeddings", "max_learned_positions", "learned_position_offset", "extra_params"}
_FLOATS = {"attention_dropout", "hidden_dropout", "embedding_dropout", "rotary_fraction"}
_BOOLS = {"tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "norm_bias", "lm_head_bias", "embed_scale"}
_ENUMS: dict[str, Callable[[str], Any]] = {"norm": NormKind, "mlp": MLPKind, "activation": Activation,
                                           "position": PositionKind}
_SPEC_FIELDS = {f.name for f in fields(ModelSpec)}


@lru_cache(maxsize=1)
def _load() -> tuple[str, dict[str, dict[str, Any]]]:
    """The layout file for the installed transformers release (same major.minor), else the newest shipped."""
    from .recipes import versioned_data

    data = versioned_data("layouts")
    if data is None:
        return "", {}
    return str(data["transformers"]), dict(data["layouts"])


def layout_for(model_type: str) -> dict[str, Any] | None:
    return _load()[1].get(model_type)


def layout_types() -> tuple[str, ...]:
    return tuple(sorted(_load()[1]))


def _value(c: _Cfg, how: Any, field: str, got: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """One spec field from the config (see the module docstring for the forms)."""
    if isinstance(how, str):
        how = {"keys": [how]}
    elif isinstance(how, list):
        how = {"keys": how}
    keys = tuple(how.get("keys", ()))
    raw: Any = None
    for k in keys:
        v = _dotted(c.raw, k)
        if v is not None:
            raw = v
            break
    if raw is None:
        for k in keys:
            if defaults.get(k) is not None:
                raw = defaults[k]
                break
    if raw is None and "of" in how:
        raw = got[how["of"]]
    if raw is None:
        if field in ("embedding_dropout",):
            return None
        raise ConfigError(f"{c.where}: missing field {keys[0] if keys else field!r}; add it to config.json "
                          "(copy it from the model's Hugging Face page)")
    sub = _Cfg({"v": raw}, f"{c.where} ({'/'.join(keys) or field})")
    if field in _INTS:
        v_int = sub.int_("v", lo=0, hi=1 << 30 if "position" in field else _MAX_LAYERS if field == "num_layers"
                         else 1 << 22)
        if "times_key" in how:  # int(hidden * intermediate_multiple_size) (GPT-NeoX-Japanese)
            k = how["times_key"]
            mult = _dotted(c.raw, k)
            mult = defaults.get(k) if mult is None else mult
            return int(v_int * _Cfg({"v": mult}, f"{c.where} ({k})").float_("v", hi=1e6))
        return v_int * int(how.get("times", 1)) + int(how.get("plus", 0))
    if field in _FLOATS:
        v_float = sub.float_("v", hi=1e9) * float(how.get("times", 1))
        if "over" in how:
            v_float = v_float / got[how["over"]]
        return v_float
    if field in _BOOLS:
        return sub.bool_("v")
    if field == "activation":
        return sub.activation("v", default="gelu")
    raise ConfigError(f"layout: spec field {field} cannot be read from a config key")


def _dotted(raw: Mapping[str, Any], key: str) -> Any:
    """``raw[key]``, where ``a.b`` reads a nested config dict (MPT's attn_config.attn_pdrop)."""
    cur: Any = raw
    for part in key.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def read_layout(c: _Cfg, family: str) -> ModelSpec:
    """The spec of a model type with a shipped layout (see the module docstring)."""
    lay = layout_for(family)
    if lay is None:  # pragma: no cover - the reader is registered for shipped layouts only
        raise ConfigError(f"{c.where}: no layout for {family}")
    defaults = lay.get("defaults", {})
    for key, why in lay.get("refuse", {}).items():
        v = _dotted(c.raw, key)
        if v is not None and v != defaults.get(key, _MISSING):
            raise ConfigError(f"{c.where}: {key} = {v!r} is not modelled for {family} ({why}); run `vramplan trace` on "
                              "this config")
    got: dict[str, Any] = {}
    order = ["hidden_size", "num_heads", "num_layers", "vocab_size"]
    keys = dict(lay["keys"])
    for field in order + [f for f in keys if f not in order]:
        if field in keys:
            if field == "rotary_fraction" and "head_dim" not in got:
                got["head_dim"] = _check_heads(c, got["hidden_size"], got["num_heads"], got.get("num_kv_heads",
                                               got["num_heads"]), None)
            got[field] = _value(c, keys[field], field, got, defaults)
    got.setdefault("num_kv_heads", got["num_heads"])
    got["head_dim"] = _check_heads(c, got["hidden_size"], got["num_heads"], got["num_kv_heads"], None)
    facts: dict[str, Any] = {}
    for k, v in lay["spec"].items():
        if k not in _SPEC_FIELDS:
            raise ConfigError(f"layout of {family}: unknown spec field {k}")
        facts[k] = _ENUMS[k](v) if k in _ENUMS else tuple(v) if isinstance(v, list) else v
    extra = {k: got.pop(k) for k in list(got) if k not in _SPEC_FIELDS}
    if extra:  # pragma: no cover - the data is checked by the derivation
        raise ConfigError(f"layout of {family}: unknown fields {sorted(extra)}")
    # buffers beside the parameters, in bytes per element as the model holds them (16-bit weights): a causal-mask
    # buffer of positions^2 in each attention (OpenAI GPT), a sinusoidal table of positions x hidden (CTRL)
    buf = lay.get("buffer_bytes", {})
    pos = int(got.get("max_learned_positions") or got.get("max_position_embeddings") or 0)
    if "positions" in buf:  # the table's rows from their own key (XGLM: max_position_embeddings + 2)
        pos = _value(c, buf["positions"], "max_position_embeddings", got, defaults)
    facts["buffer_bytes"] = int(buf.get("per_layer_positions_squared", 0)) * got["num_layers"] * pos * pos + \
        int(buf.get("positions_x_hidden", 0)) * pos * got["hidden_size"]
    version = ".".join(_load()[0].split(".")[:2])
    return ModelSpec(name=c.where, family=family, **{**facts, **got}, program_version=version)


def _readers() -> dict[str, Callable[[_Cfg, str], ModelSpec]]:
    return dict.fromkeys(_load()[1], read_layout)


def _classes() -> dict[str, str]:
    return {lay["class"]: t for t, lay in _load()[1].items() if lay.get("class")}


LAYOUT_READERS = _readers()
LAYOUT_CLASSES = _classes()
