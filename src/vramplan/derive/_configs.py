"""Config helpers shared by the derivation and ``benchmarks/coverage_report.py``: cutting a config's decoder
stack to a few layers while keeping one layer of each kind (pure Python, no torch)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["LAYER_KEYS", "cut_layers"]

# integer fields that count the last layers of the stack (those layers are a kind of their own)
TAIL_COUNT_KEYS = ("num_kv_shared_layers",)
# the depth of each of several layer stacks that the forward runs in cycles, from which the config class derives
# num_hidden_layers (one cache slot per stack invocation: modeling_hrm_text.py HrmTextConfig.num_layers_per_stack)
STACK_KEY = "num_layers_per_stack"
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
# layer kinds whose layers tie one module to the first layer of the kind, which transformers refuses to build with a
# single such layer: a cut keeps two of them (modeling_zamba.py ZambaModel: the hybrid layers' shared_transf are
# tied to the first one's by a _tied_weights_keys pattern that must match another layer)
TIED_KINDS: dict[str, tuple[str, ...]] = {"zamba": ("hybrid",)}
# the number of layers per block of a stack whose layer ``i`` closes a block when ``i % size == 0``
# (modeling_inkling2.py: ``is_block_boundary = layer_idx % n_layers_per_attn_res_block == 0``)
BLOCK_SIZE_KEYS = ("n_layers_per_attn_res_block",)


def _layer_ranges(d: dict[str, Any], n: int) -> dict[str, tuple[str, int, int]]:
    """Ranges of layers a config names by a first index and an index past the last (Inkling-2-Loop's
    ``loop_layer_index_start`` / ``loop_layer_index_end``: the layers its forward runs several times), by the range's
    stem: where a layer sits (before, inside, after) is part of its kind."""
    out = {}
    for k, v in d.items():
        if not (k.endswith("_start") and "layer" in k):
            continue
        end = k[: -len("_start")] + "_end"
        w = d.get(end)
        if isinstance(v, int) and isinstance(w, int) and not isinstance(v, bool) and not isinstance(w, bool) and \
                0 <= v <= w <= n:
            out[k[: -len("_start")]] = (end, v, w)
    return out


def _block_size(d: dict[str, Any], idx: list[int], ends: list[int]) -> dict[str, int]:
    """The block sizes (BLOCK_SIZE_KEYS) of the cut stack: the configured one where it still makes the kept layers
    the block boundaries they were, else the smallest that does and divides the re-indexed range ends (which
    transformers requires to fall on block boundaries: Inkling2LoopTextConfig.validate_architecture)."""
    out = {}
    for k in BLOCK_SIZE_KEYS:
        size = d.get(k)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            continue
        was = [i % size == 0 for i in idx]
        for cand in (size, *range(1, len(idx) + 1)):
            if [j % cand == 0 for j in range(len(idx))] == was and all(e % cand == 0 for e in ends):
                out[k] = cand
                break
    return out


def _is_pointer_list(k: str, v: Any, n: int) -> bool:
    """A per-layer list of layer indices, entry ``i`` naming the layer whose state layer ``i`` reads, most layers
    themselves (Kolibri 1.1's ``kv_source_layers``: indexed-attention layers reading an earlier indexer's keys and
    values): re-indexed by the cut, and a layer kept keeps the layer it reads."""
    return (isinstance(v, list) and len(v) == n and n > 1 and "layer" in k and v != list(range(n))
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v)
            and sum(x == i for i, x in enumerate(v)) > n // 2)


def _per_layer(d: dict[str, Any], n: int) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in ("architectures",) or n < 2 or _is_pointer_list(k, v, n):
            continue
        patterned = isinstance(v, str) and any(w in k for w in ("pattern", "layer", "block"))
        if (isinstance(v, list) or patterned) and len(v) == n and not _all_indices(k, v, n):
            out[k] = v
        elif _is_periodic(k, v, n):  # a pattern the config class tiles over the stack (RecurrentGemma block_types:
            # ``(block_types * 100)[:num_hidden_layers]``): one entry per layer; the cut writes the kept layers' kinds
            out[k] = [v[i % len(v)] for i in range(n)]
    return out


def _is_periodic(k: str, v: Any, n: int) -> bool:
    """A list of layer kinds shorter than the stack that the config class repeats over it (``block_types``)."""
    return (isinstance(v, list) and 1 < len(v) < n and any(w in k for w in ("pattern", "block_type"))
            and all(isinstance(x, str) for x in v))


def _all_indices(k: str, v: Any, n: int) -> bool:
    """An index list that names every layer (Llama 4's ``moe_layers`` with interleave_moe_layer_step 1: [0 .. n-1]),
    not a per-layer list whose values would make every layer a kind of its own."""
    return isinstance(v, list) and v == list(range(n)) and n > 1 and any(w in k for w in ("layer", "idx", "indices"))


def _is_index_list(k: str, v: Any, n: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``attn_layer_indices``), as opposed to a per-layer list."""
    return (isinstance(v, list) and bool(v) and (len(v) != n or _all_indices(k, v, n))
            and any(w in k for w in ("layer", "idx", "indices"))
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v))


def _layer_key(k: Any, n: int) -> int | None:
    """A layer index used as a dict key: an int, or its decimal string (transformers' ``per_layer_config``
    serialises its keys zero-padded: ``"05"``)."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k if 0 <= k < n else None
    if isinstance(k, str) and k.isdigit():
        return int(k) if int(k) < n else None
    return None


def _is_index_dict(v: Any, n: int) -> bool:
    """A dict keyed by layer indices (``per_layer_config``: per-layer attribute overrides)."""
    return isinstance(v, dict) and bool(v) and all(_layer_key(k, n) is not None for k in v)


NESTED_LAYER_LISTS = "linear_attn_config"  # Kimi-Linear: 1-based ``full_attn_layers`` / ``kda_layers`` inside it
_NESTED_KINDS = "_nested_layer_kinds"


def cut_layers(d: dict[str, Any], target: int = 2) -> dict[str, Any]:
    """:func:`_cut_layers`, with the 1-based layer lists nested in Kimi-Linear's ``linear_attn_config``
    (configuration_kimi_linear.py: ``full_attn_layers``, ``kda_layers``) read as a per-layer kind and re-written for
    the kept layers (left long, the class's ``__post_init__`` indexes past the cut stack)."""
    lac = d.get(NESTED_LAYER_LISTS)
    n = d.get("num_hidden_layers")
    full = lac.get("full_attn_layers") if isinstance(lac, dict) else None
    if not (isinstance(n, int) and isinstance(full, list) and full
            and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= n for x in full)):
        return _cut_layers(d, target)
    assert isinstance(lac, dict)
    cut = _cut_layers({**d, _NESTED_KINDS: ["full" if i + 1 in full else "linear" for i in range(n)]}, target)
    kinds = cut.pop(_NESTED_KINDS)
    lists = {"full_attn_layers": [i + 1 for i, k in enumerate(kinds) if k == "full"]}
    if "kda_layers" in lac:
        lists["kda_layers"] = [i + 1 for i, k in enumerate(kinds) if k != "full"]
    cut[NESTED_LAYER_LISTS] = {**lac, **lists}
    return cut


def _cut_layers(d: dict[str, Any], target: int = 2) -> dict[str, Any]:
    """Cut one (text or vision) config to ``target`` layers, keeping one layer of each kind.

    Kinds come from the config's per-layer fields (lists as long as the stack: ``layer_types``,
    ``layers_block_type``, ``no_rope_layers``, hybrid pattern strings): the first layer of each distinct
    combination is kept. Index lists (``mlp_only_layers``, ``attn_layer_indices``) and dicts keyed by layer index
    (``per_layer_config``) are re-indexed, counts of trailing layers (``num_kv_shared_layers``) re-counted, ranges
    (``loop_layer_index_start``/``_end``) split the stack into before / inside / after kinds and are re-indexed, with
    a block size (``n_layers_per_attn_res_block``) that keeps the kept layers' block boundaries; periodic
    fields (``*_period``/``*_offset``, ``decoder_sparse_step``, ``moe_layer_freq``) keep the stack long enough
    to hold one layer of each kind; ``first_k_dense_replace`` / ``num_dense_layers`` keep one dense layer."""
    d = dict(d)
    if isinstance(d.get(STACK_KEY), int) and not isinstance(d.get(STACK_KEY), bool):
        # the stack's real depth is the per-stack count; the total the class wrote from it is recomputed from the cut
        # count (HrmTextConfig.__post_init__: num_hidden_layers = num_layers_per_stack * H_cycles * (L_cycles + 1))
        d["num_hidden_layers"], d[STACK_KEY] = d[STACK_KEY], None
    key = next((k for k in LAYER_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)
    if key is None:
        return d
    n = d[key]
    per = _per_layer(d, n)
    index_lists = {k: v for k, v in d.items() if k not in per and _is_index_list(k, v, n)}
    # per-layer overrides keyed by layer index (``per_layer_config``): a layer's override is part of its kind,
    # and the kept layers' overrides are re-keyed to their new indices (transformers validates the keys)
    index_dicts = {k: {_layer_key(i, n): o for i, o in v.items()} for k, v in d.items()
                   if k not in per and "layer" in k and _is_index_dict(v, n)}
    # counts of trailing layers (Gemma 3n / Gemma 4 ``num_kv_shared_layers``: the last k layers reuse an earlier
    # layer's keys and values): being one of them is part of a layer's kind, and the count becomes the number kept
    tails = {k: d[k] for k in TAIL_COUNT_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)
             and 0 < d[k] <= n}
    ranges = _layer_ranges(d, n)
    pointers = {k: v for k, v in d.items() if _is_pointer_list(k, v, n)}

    def layer_kind(i: int) -> list[Any]:
        return ([v[i] for v in per.values()] + [i in v for v in index_lists.values()]
                + [v.get(i) for v in index_dicts.values()] + [i >= n - c for c in tails.values()]
                + [(i >= a) + (i >= b) for _, a, b in ranges.values()])

    picked: list[int] = []
    seen: set[str] = set()
    for i in range(n):
        # a layer reading another layer's state is a kind of its own (with the kind of the layer it reads)
        sig = json.dumps(layer_kind(i) + [None if v[i] == i else layer_kind(v[i]) for v in pointers.values()],
                         sort_keys=True, default=str)
        if sig not in seen:
            seen.add(sig)
            picked.append(i)
    picked = sorted({*picked, *(v[i] for v in pointers.values() for i in picked)})  # and the layers they read
    tied = TIED_KINDS.get(str(d.get("model_type")), ())
    for v in per.values():  # a second layer of each tied kind
        for kind in tied:
            where = [i for i in range(n) if v[i] == kind]
            if len(where) > 1 and sum(1 for i in picked if v[i] == kind) == 1:
                picked = sorted({*picked, next(i for i in where if i not in picked)})
    idx = sorted(set(picked) | set(range(min(target, n)))) if len(picked) < target else picked
    need = len(idx)
    if not per and not index_lists and not index_dicts and not tails and not ranges:
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > n:
                continue
            if k.endswith("_offset") and k.replace("_offset", "_period") in d:
                need = max(need, v + 1)
            elif k.endswith(("_period", "_step", "_freq", "_interval")) and k.replace("_period", "_offset") not in d:
                need = max(need, v)
        idx = list(range(min(max(need, len(idx)), n)))
    for k in ("first_k_dense_replace", "num_dense_layers"):  # leading dense layers (DeepSeek, LFM2-MoE): keep one
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 1:
            d[k] = 1
    for k, v in per.items():
        d[k] = "".join(v[i] for i in idx) if isinstance(v, str) else [v[i] for i in idx]
    for k, v in index_lists.items():
        d[k] = [idx.index(x) for x in v if x in idx]
    for k, v in pointers.items():
        d[k] = [idx.index(v[i]) if v[i] in idx else j for j, i in enumerate(idx)]
    for k, v in index_dicts.items():
        d[k] = {idx.index(i): o for i, o in v.items() if i in idx}
    for k, c in tails.items():
        d[k] = sum(1 for i in idx if i >= n - c)
    for stem, (end, a, b) in ranges.items():
        d[stem + "_start"], d[end] = sum(1 for i in idx if i < a), sum(1 for i in idx if i < b)
    if ranges:
        d.update(_block_size(d, idx, [x for stem, (end, _, _) in ranges.items() for x in (d[stem + "_start"], d[end])]))
    d[key] = len(idx)
    return d
