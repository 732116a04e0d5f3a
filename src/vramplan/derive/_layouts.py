"""Check the shipped GPT-style layouts (:mod:`vramplan.layouts`) against the installed transformers (needs torch).

For each layout: its ``defaults`` must be the config class's own values; the reader's parameter count must equal the
meta-device model's on the library default (cut to two layers) and on copies where each config key the layout reads
is changed (a wrong key, or a size the modeling file does not take from that key, miscounts); and the class the
layout names must be the type's causal-LM class.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..layouts import _dotted
from ._derive import _causal_lm_class, _config_class

__all__ = ["check_layout"]


def _set(d: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(d)
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def _meta_count(model_type: str, d: dict[str, Any]) -> int:
    cls = _config_class(model_type)
    with torch.device("meta"):
        model = _causal_lm_class(cls)._from_config(cls.from_dict(copy.deepcopy(d)))
    return sum(p.numel() for p in model.parameters())


def _perturbed(key: str, value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int) and value > 0:
        return [value * 2]
    return []


def key_refused(lay: dict[str, Any], variant: str) -> bool:
    return variant.split("=", 1)[0] in lay.get("refuse", {})


def check_layout(model_type: str) -> list[str]:
    """The problems found with ``model_type``'s layout (empty: it checks out)."""
    from ..derive._configs import cut_layers
    from ..hfconfig import _Cfg
    from ..layouts import layout_for, read_layout
    from ..params import count_params

    lay = layout_for(model_type)
    if lay is None:
        return [f"{model_type}: no layout"]
    cls = _config_class(model_type)
    problems = []
    if _causal_lm_class(cls).__name__ != lay.get("class"):
        problems.append(f"class {_causal_lm_class(cls).__name__}, the layout names {lay.get('class')}")
    lib = cls().to_dict()
    for key, want in lay.get("defaults", {}).items():
        have = _dotted(lib, key)
        if have != want:
            problems.append(f"default {key}: the config class has {have!r}, the layout {want!r}")
    base = cut_layers(lib, 2)
    read_keys = {k for how in lay["keys"].values() for k in (
        [how] if isinstance(how, str) else how if isinstance(how, list) else how.get("keys", []))}
    variants: list[tuple[str, dict[str, Any]]] = [("library default", base)]
    # every integer / boolean key of the config, and the keys the layout reads: a size the modeling file takes from
    # a key the layout does not read miscounts on the copy that changes it
    every = {k for k, v in base.items() if isinstance(v, (int, bool)) and not k.endswith("_token_id")}
    for key in sorted(read_keys | every):
        value = _dotted(base, key)
        if key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            continue  # the layer count: the cut's own
        for v in _perturbed(key, value):
            if "head" in key:  # heads must divide the width: halve them instead
                v = max(1, value // 2)
            variants.append((f"{key}={v}", _set(base, key, v)))
    for name, d in variants:
        try:
            want = _meta_count(model_type, d)
        except Exception:
            continue  # a perturbation the library itself refuses (not a layout problem)
        try:
            got = count_params(read_layout(_Cfg(d, model_type), model_type)).total
        except Exception as exc:
            if key_refused(lay, name):
                continue  # a value the layout refuses on purpose (named in its "refuse")
            problems.append(f"{name}: the reader fails: {type(exc).__name__}: {exc}")
            continue
        if got != want:
            problems.append(f"{name}: the reader counts {got:,} parameters, the model has {want:,}")
    return problems
