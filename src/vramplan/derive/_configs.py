"""Config helpers shared by the derivation and ``benchmarks/coverage_report.py``: cutting a config's decoder
stack to a few layers while keeping one layer of each kind (pure Python, no torch)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["LAYER_KEYS", "cut_layers"]

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")


def _per_layer(d: dict[str, Any], n: int) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in ("architectures",) or n < 2:
            continue
        patterned = isinstance(v, str) and any(w in k for w in ("pattern", "layer", "block"))
        if (isinstance(v, list) or patterned) and len(v) == n:
            out[k] = v
    return out


def _is_index_list(k: str, v: Any, n: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``attn_layer_indices``), as opposed to a per-layer list."""
    return (isinstance(v, list) and bool(v) and len(v) != n and any(w in k for w in ("layer", "idx", "indices"))
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v))


def cut_layers(d: dict[str, Any], target: int = 2) -> dict[str, Any]:
    """Cut one (text or vision) config to ``target`` layers, keeping one layer of each kind.

    Kinds come from the config's per-layer fields (lists as long as the stack: ``layer_types``,
    ``layers_block_type``, ``no_rope_layers``, hybrid pattern strings): the first layer of each distinct
    combination is kept. Index lists (``mlp_only_layers``, ``attn_layer_indices``) are re-indexed; periodic
    fields (``*_period``/``*_offset``, ``decoder_sparse_step``, ``moe_layer_freq``) keep the stack long enough
    to hold one layer of each kind; ``first_k_dense_replace`` keeps one dense layer."""
    d = dict(d)
    key = next((k for k in LAYER_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)
    if key is None:
        return d
    n = d[key]
    per = _per_layer(d, n)
    index_lists = {k: v for k, v in d.items() if k not in per and _is_index_list(k, v, n)}
    picked: list[int] = []
    seen: set[str] = set()
    for i in range(n):
        sig = json.dumps([v[i] for v in per.values()] + [i in v for v in index_lists.values()])
        if sig not in seen:
            seen.add(sig)
            picked.append(i)
    idx = sorted(set(picked) | set(range(min(target, n)))) if len(picked) < target else picked
    need = len(idx)
    if not per and not index_lists:
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > n:
                continue
            if k.endswith("_offset") and k.replace("_offset", "_period") in d:
                need = max(need, v + 1)
            elif k.endswith(("_period", "_step", "_freq", "_interval")) and k.replace("_period", "_offset") not in d:
                need = max(need, v)
        idx = list(range(min(max(need, len(idx)), n)))
    if isinstance(d.get("first_k_dense_replace"), int) and d["first_k_dense_replace"] > 1:
        d["first_k_dense_replace"] = 1
    for k, v in per.items():
        d[k] = "".join(v[i] for i in idx) if isinstance(v, str) else [v[i] for i in idx]
    for k, v in index_lists.items():
        d[k] = [idx.index(x) for x in v if x in idx]
    d[key] = len(idx)
    return d
