"""Compose a recipe part by part when no single family computes what a model type computes.

The decoder of a LLaMA-class model is a few parts: norms, attention, MLP, the residual glue between them
inside a layer, and what runs outside the layers (embedding, rotary tables, masks, final norm, head, loss).
For each part the type's own modules are run on the inputs they received in a real forward pass of the
shrunk model (captured with module hooks), and compared ATen op for ATen op (non-view ops, output shapes and
dtypes) with the same part of each family of the estimator, built from the same config dictionary and holding
the same weights:

* outside the layers and the glue inside them, and the order the layer calls its parts in: the *base* family
  (embedding scale, soft-capping, masks and sliding layers, residual layout);
* attention (projections, biases, q/k norms, rotary embedding, eager and SDPA kernels): the family whose
  attention facts are taken (bias keys, qk-norm, rope style, partial rotary, NoPE layers); multi-head latent
  attention families (DeepSeek-V2/V3, GLM-4.7-Flash, MiniCPM3) are candidates for this part only, built with
  dense MLPs;
* MLP: the family whose MLP facts are taken (fused gate/up, bias key);
* each norm: LlamaRMSNorm, GemmaRMSNorm, CohereLayerNorm, torch's LayerNorm (with or without bias), or a
  LayerNorm without parameters on an fp32 copy (OLMo).

Each part must match on every variant (shrunk default, other widths with the whole default stack, flipped
boolean flags); the reader's parameter count must be exact. A part that matches no family is named in the
refusal. A MoE block is compared as a whole with the MoE block of each MoE family (see _compare_moe), and
the config keys of its sizes and MoE layers are found on perturbed configs.
"""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import torch

from ._derive import (
    _SEQ,
    DeriveResult,
    _build,
    _causal_lm_class,
    _config_class,
    _first_difference,
    _jsonable,
    _OpLog,
    _variants,
    kernels,
    library_defaults,
)

__all__ = ["compose"]

_ATTN_FIELDS = ("qkv_bias", "bias_key", "bias_default", "o_bias", "qk_norm", "qk_norm_key", "rope", "rope_cat",
                "rope_interleave_fp32", "partial_rotary", "qkv_fused", "nope", "qk_norm_after_rope", "attn_temperature",
                "mla", "mla_defaults")
_MLP_FIELDS = ("gate_up_fused", "mlp_bias_key", "mlp_bias_default", "mlp_plain", "mlp_names")


def _is_moe(mod: torch.nn.Module) -> bool:
    """A mixture-of-experts block: it holds the experts as one 3-D parameter (transformers 5.x) next to a router."""
    return any(p.dim() == 3 for p in mod.parameters()) and any(p.dim() == 2 for p in mod.parameters())


def _role(name: str, mod: torch.nn.Module) -> str:
    cls = type(mod).__name__
    if isinstance(mod, torch.nn.LayerNorm) or "Norm" in cls:
        return "norm"
    if _is_moe(mod):
        return "moe"
    if cls.endswith("Attention"):
        return "attn"
    if cls.endswith("MLP"):
        return "mlp"
    if isinstance(mod, (torch.nn.Dropout, torch.nn.Identity)):
        return "dropout"
    return f"other:{name}:{cls}"


def _base(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder model inside the causal LM: ``model.model`` (LLaMA-class), else the one child that holds the
    decoder-layer stack (``transformer``, ``biogpt``, ``gpt_neox_japanese``...)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    holders = [c for _, c in model.named_children() if _stacks(c)]
    return holders[0] if len(holders) == 1 else None


def _stacks(mod: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The decoder-layer stacks directly under ``mod``: ModuleLists of one layer class."""
    return [(n, c) for n, c in mod.named_children() if isinstance(c, torch.nn.ModuleList) and len(c) > 0
            and len({type(x) for x in c}) == 1]


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer ModuleList, found by structure: the one stack of same-class layers in the decoder model
    (``model.layers``, ``transformer.h``, ``transformer.blocks``...)."""
    inner = _base(model)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    stacks = _stacks(inner) if inner is not None else []
    if len(stacks) != 1:
        names = [n for _, c in model.named_children() for n, _ in _stacks(c)] + [
            f"{n}.{g}.{m}" for n, c in model.named_children() for g, gc in c.named_children() for m, _ in _stacks(gc)]
        raise LookupError(f"no single decoder-layer stack ({', '.join(names) or 'none found'})")
    return stacks[0][1]


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm after the last layer: ``model.norm`` (LLaMA), else the one norm child of the decoder model
    (``final_layernorm``: Phi, Persimmon; ``ln_f``, ``norm_f``: GPT-style)."""
    inner = _base(model)
    if not isinstance(inner, torch.nn.Module):
        return None
    norm = getattr(inner, "norm", None)
    if isinstance(norm, torch.nn.Module):
        return norm
    norms = [m for n, m in inner.named_children() if _role(n, m) == "norm"]
    return norms[0] if len(norms) == 1 else None


class _Bucketed(_OpLog):
    """An op log that files each op under the innermost place it runs in (``where[-1]``)."""

    where: list[str]
    buckets: dict[str, list[Any]]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        n = len(self.ops)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.ops) > n:
            self.buckets[self.where[-1]].append(self.ops[-1])
        return out


def _mask_call() -> tuple[str, int] | None:
    """The outermost mask-building call of transformers' ``masking_utils`` (``create_causal_mask``,
    ``create_sliding_window_causal_mask``, …) the current op runs in, as (function, frame id); None outside one."""
    f = sys._getframe(2)
    found = None
    while f is not None:
        code = f.f_code
        if code.co_name.startswith("create_") and "mask" in code.co_name and code.co_filename.endswith(
                "masking_utils.py"):
            found = (code.co_name, id(f))
        f = f.f_back
    return found


def _in_packed_detection() -> bool:
    """Whether the current op runs in masking_utils' ``find_packed_sequence_indices``: the packed-sequence check a
    model runs when it passes ``position_ids`` to its mask builder without an attention mask or cache (LLaMA does,
    AFMoE and Mistral do not). Its tensors are (batch, seq) integers freed at once, which no memory program counts:
    the ops outside the layers are compared without them."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "find_packed_sequence_indices" and f.f_code.co_filename.endswith("masking_utils.py"):
            return True
        f = f.f_back
    return False


def _canonical_outside(ops: list[Any], tags: list[tuple[str, int] | None]) -> list[Any]:
    """The ops outside the layers with each run of consecutive mask builds in a fixed order: a model that builds
    its masks for ``set(config.layer_types)`` (Dots1Model, ExaoneMoeModel) builds them in Python's string-hash
    order, which changes from process to process; the masks built, and what they hold, do not."""
    out: list[Any] = []
    run: list[list[Any]] = []
    last: tuple[str, int] | None = None
    for op, tag in zip(ops, tags, strict=True):
        if tag is None:
            out += [o for seg in sorted(run, key=repr) for o in seg]
            run, last = [], None
            out.append(op)
            continue
        if tag != last:
            run.append([])
            last = tag
        run[-1].append(op)
    out += [o for seg in sorted(run, key=repr) for o in seg]
    return out


class _Recorder(_Bucketed):
    """Ops bucketed by where they run: outside the layers, a layer's glue, or one part of a layer."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        n = len(self.buckets["outside"])
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.buckets["outside"]) > n:
            if _in_packed_detection():
                self.buckets["outside"].pop()
            else:
                self.outside_tags.append(_mask_call())
        return out

    def outside(self) -> list[Any]:
        return _canonical_outside(self.buckets["outside"], self.outside_tags)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.where: list[str] = ["outside"]
        self.buckets: dict[str, list[Any]] = {"outside": []}
        self.outside_tags: list[tuple[str, int] | None] = []
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.order: dict[int, list[str]] = {}
        self.handles: list[Any] = []
        rotary = getattr(_base(model), "rotary_emb", None)
        if isinstance(rotary, torch.nn.Module):
            self._hook(rotary, "rotary", None)
        final = _final_norm(model)
        if isinstance(final, torch.nn.Module):
            self._hook(final, "final_norm", None, capture=True)
        for i, layer in enumerate(_layers(model)):
            self.order[i] = []
            self._hook(layer, f"L{i}", None)
            for name, child in layer.named_children():
                self._hook(child, f"L{i}.{name}", (i, name))

    def _hook(self, mod: torch.nn.Module, key: str, part: tuple[int, str] | None, capture: bool = False) -> None:
        def pre(m: torch.nn.Module, args: Any, kwargs: Any) -> None:
            if part is not None:
                self.order[part[0]].append(part[1])
            if (part is not None or capture) and key not in self.inputs:
                self.where.append("recorder")  # the copies of the inputs are the recorder's, not the model's
                self.buckets.setdefault("recorder", [])
                self.inputs[key] = _clone((args, kwargs))
                self.where.pop()
            self.where.append(key)
            self.buckets.setdefault(key, [])

        def post(m: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            self.where.pop()

        self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(mod.register_forward_hook(post, with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()



# ---- attention output gates and the type's own q/k norms ---------------------------------------------------------

# A gated attention multiplies its output, before o_proj, by an activation of a linear projection of the layer's
# input (one gate per head or per channel): (activation, where its projection runs). "early": right after v_proj, held
# through the attention (modeling_afmoe.py gate_proj); "late": just before o_proj (modeling_laguna.py g_proj with a
# softplus in fp32, modeling_beam.py gate_proj plus a per-head bias).
_GATES = (("sigmoid", False), ("sigmoid", True), ("softplus_fp32", False), ("softplus_fp32", True))


def _gate_parts(mine: torch.nn.Module, theirs: torch.nn.Module
                ) -> tuple[str, torch.nn.Linear, str, dict[str, torch.Tensor]] | None:
    """The type's attention ``mine`` is the family's ``theirs`` plus an output gate: (the gate linear's name, the
    linear, the name of a per-head gate bias held by the attention itself or '', the rest of mine's state in order);
    None when the extra parameters are not one bias-free linear of the layer's input to heads or heads x head_dim
    outputs (and at most a per-head bias)."""
    heads = getattr(getattr(theirs, "config", None), "num_attention_heads", None)
    hd = getattr(theirs, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(hd, int):
        return None
    names = dict(theirs.named_children())
    extra = [(n, c) for n, c in mine.named_children() if n not in names]
    if len(extra) != 1 or not isinstance(extra[0][1], torch.nn.Linear) or extra[0][1].bias is not None:
        return None
    gname, gate = extra[0]
    if gate.out_features not in (heads, heads * hd):
        return None
    own_theirs = {n for n, _ in theirs.named_parameters(recurse=False)}
    own = [(n, p) for n, p in mine.named_parameters(recurse=False) if n not in own_theirs]
    if len(own) > 1 or (own and tuple(own[0][1].shape) != (heads,)):
        return None
    bias = own[0][0] if own else ""
    rest = {k: v for k, v in mine.state_dict().items() if not k.startswith(gname + ".") and k != bias}
    return gname, gate, bias, rest


def _install_gate(theirs: torch.nn.Module, gate: torch.nn.Linear, bias: torch.Tensor | None, act: str,
                  early: bool) -> list[Any]:
    """Hooks that make the family's attention ``theirs`` compute the type's output gate (see _GATES); the handles."""
    v_proj, o_proj = getattr(theirs, "v_proj", None), getattr(theirs, "o_proj", None)
    if not isinstance(v_proj, torch.nn.Module) or not isinstance(o_proj, torch.nn.Module):
        raise ValueError("no v_proj / o_proj to gate")
    heads, hd = theirs.config.num_attention_heads, theirs.head_dim
    state: dict[str, Any] = {}

    def capture(m: torch.nn.Module, args: Any, kwargs: Any) -> None:
        state["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def after_v(m: torch.nn.Module, args: Any, out: Any) -> None:
        state["g"] = gate(state["x"])

    def before_o(m: torch.nn.Module, args: Any) -> Any:
        x = args[0]
        g = state.pop("g") if early else gate(state["x"])
        split = (*x.shape[:-1], heads, hd)
        if bias is not None:  # gate_proj(x).view_as(attn_output) + gate_bias[None, None, :, None]
            g = g.view(split) + bias[None, None, :, None]
        a = torch.sigmoid(g) if act == "sigmoid" else torch.nn.functional.softplus(g.float()).to(x.dtype)
        if a.shape[-1] == heads:  # one gate per head, broadcast over head_dim
            return ((x.view(split) * a.unsqueeze(-1)).view(x.shape),)
        return ((x.view(split) * a).view(x.shape),) if a.dim() == x.dim() + 1 else (x * a,)

    hs = [theirs.register_forward_pre_hook(capture, with_kwargs=True), o_proj.register_forward_pre_hook(before_o)]
    if early:
        hs.append(v_proj.register_forward_hook(after_v))
    return hs


def _adopt_qk_norms(mine: torch.nn.Module, theirs: torch.nn.Module) -> set[tuple[str, bool]]:
    """Give the family's attention ``theirs`` the type's own q/k norm modules where they are of another class with
    the same parameters (MiniMax-M2's and AFMoE's q/k norms are not the family's): what the rest of the attention
    computes is compared, and the adopted norms are classified as norms (the block program runs the spec's norm on
    q and k). Returns their kinds; raises ValueError for a norm of no known kind."""
    kinds: set[tuple[str, bool]] = set()
    mine_children = dict(mine.named_children())
    for name, child in list(theirs.named_children()):
        other = mine_children.get(name)
        if _role(name, child) != "norm" or other is None or type(other) is type(child):
            continue
        if [tuple(p.shape) for p in other.parameters()] != [tuple(p.shape) for p in child.parameters()]:
            continue
        w = next(iter(other.parameters()), None)
        width = w.shape[-1] if w is not None else None
        if width is None:
            raise ValueError(f"q/k norm {name} without parameters")
        x = torch.randn(2, _SEQ, 2, width, generator=torch.Generator().manual_seed(3)).to(w.dtype)
        kind = _classify_norm(other, ((x,), {}))
        if kind is None:
            raise ValueError(f"q/k norm {type(other).__name__} computes like no known norm")
        kinds.add(kind)
        setattr(theirs, name, copy.deepcopy(other))
    return kinds


def _part_ops_rope_plain(mod: torch.nn.Module, inputs: tuple[Any, Any]) -> list[Any] | None:
    """The ops of attention module ``mod`` with LLaMA's ``apply_rotary_pos_emb`` (whole heads, no concatenation) in
    place of its modeling file's own; None when that file has none."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as plain

    module = sys.modules.get(type(mod).__module__)
    orig = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or not callable(orig) or orig is plain:
        return None
    module.apply_rotary_pos_emb = plain  # type: ignore[attr-defined]
    try:
        return _part_ops(mod, inputs)
    finally:
        module.apply_rotary_pos_emb = orig  # type: ignore[attr-defined]


def _part_ops_nope(mod: torch.nn.Module, inputs: tuple[Any, Any]) -> list[Any] | None:
    """The ops of attention module ``mod`` with its modeling file's ``apply_rotary_pos_emb`` skipped (a layer that
    applies no rotary embedding: AFMoE's and Flint's full-attention layers); None when the file has none."""
    module = sys.modules.get(type(mod).__module__)
    orig = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or not callable(orig):
        return None
    module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)  # type: ignore[attr-defined]
    try:
        return _part_ops(mod, inputs)
    finally:
        module.apply_rotary_pos_emb = orig  # type: ignore[attr-defined]


def _bias_o_proj(mine: torch.nn.Module, theirs: torch.nn.Module) -> bool:
    """Give the family's attention ``theirs`` an o_proj bias where the type's o_proj has one and the family's has
    none (Laguna's attention_bias biases o_proj too, GLM-4.5's only q/k/v); True when it did."""
    o, to = getattr(mine, "o_proj", None), getattr(theirs, "o_proj", None)
    if not (isinstance(o, torch.nn.Linear) and isinstance(to, torch.nn.Linear) and o.bias is not None
            and to.bias is None and o.weight.shape == to.weight.shape):
        return False
    theirs.o_proj = torch.nn.Linear(to.in_features, to.out_features, bias=True, dtype=to.weight.dtype)
    return True


def _attn_compare(mine: torch.nn.Module, theirs: torch.nn.Module, inputs: tuple[Any, Any], want: list[Any]
                  ) -> tuple[bool | None, str, tuple[tuple[str, Any], ...], set[tuple[str, bool]], bool]:
    """The type's attention ``mine`` against the family's ``theirs`` on ``inputs`` (the type's ops: ``want``):
    (True: it matched with the concatenating rotary application, False: with the family's own, None: neither; the
    first difference; the output gate's facts where the type has one; the kinds of the adopted q/k norms; whether
    it matched only with no rotary embedding applied)."""
    kinds = _adopt_qk_norms(mine, theirs)
    if _bias_o_proj(mine, theirs):
        kinds.add(("o_bias", True))
    gate_facts: tuple[tuple[str, Any], ...] = ()
    gate: torch.nn.Linear | None = None
    bias: torch.Tensor | None = None
    try:
        _load_part(mine, theirs)
        variants: list[tuple[tuple[tuple[str, Any], ...], Any]] = [((), None)]
    except ValueError:
        parts = _gate_parts(mine, theirs)
        if parts is None:
            raise
        gname, gate, bias_name, rest = parts
        keys = list(theirs.state_dict())
        if [tuple(v.shape) for v in rest.values()] != [tuple(theirs.state_dict()[k].shape) for k in keys]:
            raise
        theirs.load_state_dict(dict(zip(keys, rest.values(), strict=True)), strict=True)
        bias = getattr(mine, bias_name) if bias_name else None
        heads = gate.out_features == theirs.config.num_attention_heads
        variants = [((("attn_gate", act), ("attn_gate_early", early), ("attn_gate_heads", heads),
                      ("attn_gate_bias", bias is not None), ("attn_gate_name", gname)), (act, early))
                    for act, early in _GATES]
    why = ""
    for facts, g in variants:
        handles = _install_gate(theirs, gate, bias, *g) if g is not None and gate is not None else []
        try:
            tops = _part_ops(theirs, inputs)
            if tops == want:
                return False, "", facts, kinds, False
            if _part_ops_rope_cat(theirs, inputs) == want:
                return True, "", facts, kinds, False
            if _part_ops_nope(theirs, inputs) == want:
                return False, "", facts, kinds, True
            if _part_ops_rope_plain(theirs, inputs) == want:
                # LLaMA's rotary application in place of a family's concatenating one (AFMoE beside GLM-4.5)
                return False, "", facts, kinds | {("rope_plain", True)}, False
            why = why or _first_difference(want, tops)
        finally:
            for h in handles:
                h.remove()
        gate_facts = facts
    return None, why + (" (with an output gate)" if gate_facts else ""), (), kinds, False


def _attention_matches(layers: torch.nn.ModuleList, rec: _Recorder, tlayers: torch.nn.ModuleList
                       ) -> tuple[bool | None, str, tuple[tuple[str, Any], ...], set[tuple[str, bool]], set[int]]:
    """Each layer's attention of the type, on its captured inputs, against the family's (``tlayers``) holding the same
    weights: (True: with the concatenating rotary application, False: with the family's own, None: neither; the
    first difference; the output gate's facts; the adopted q/k norms' kinds; the layers without rotary embedding)
    (see :func:`_attn_compare`)."""
    cats: set[bool] = set()
    gates: set[tuple[tuple[str, Any], ...]] = set()
    kinds: set[tuple[str, bool]] = set()
    nope: set[int] = set()
    for i, layer in enumerate(layers):
        mine_part, their_part = _child(layer, "attn"), _child(tlayers[i], "attn")
        key = f"L{i}.{mine_part[0]}" if mine_part else ""
        if mine_part is None or their_part is None or key not in rec.inputs:
            return None, f"layer {i} has no attention to compare", (), set(), set()
        try:
            cat, why, gate, k, no_rope = _attn_compare(mine_part[1], their_part[1], rec.inputs[key], rec.buckets[key])
        except Exception as exc:
            return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}", (), set(), set()
        if cat is None:
            return None, why, (), set(), set()
        if no_rope:
            nope.add(i)
        else:
            cats.add(cat)
        gates.add(gate)
        kinds |= k
    if len(gates) > 1:
        return None, "the layers' output gates differ", (), set(), set()
    return (cats.pop() if len(cats) == 1 else None), ("" if len(cats) <= 1 else "rotary application differs"), \
        (gates.pop() if gates else ()), kinds, nope


def _biased_head(mine: torch.nn.Module, theirs: torch.nn.Module) -> bool:
    """Give the family's model ``theirs`` a head with a bias where the type's has one and the family's has none (the
    family's head otherwise computes the same: the outside ops are compared again); True when it did."""
    head, their_head = mine.get_output_embeddings(), theirs.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.bias is not None and isinstance(their_head, torch.nn.Linear)
            and their_head.bias is None and their_head.weight.shape == head.weight.shape):
        return False
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    new.load_state_dict(head.state_dict())
    theirs.set_output_embeddings(new)
    return True


def _bias_key(seen: Mapping[str, bool]) -> str | None:
    """'' when the type's lm_head has a bias on every variant; the boolean config key whose flipped variant alone has
    one (``key=True``); else None."""
    if all(seen.values()):
        return ""
    on = [v for v, b in seen.items() if b]
    if len(on) == 1 and on[0].endswith("=True"):
        return on[0].removesuffix("=True")
    return None


def _rotary_tables(rec: _Recorder) -> list[Any]:
    """The rotary module's ops that make per-position tensors (the cos/sin tables and what they are made from);
    ops on scalars and on the per-frequency vector (PhimoeRotaryEmbedding recomputes inv_freq and takes
    max(position_ids) on every call) allocate a few hundred bytes whatever the batch and sequence."""
    return [op for op in rec.buckets.get("rotary", []) if any(len(s) >= 2 and _SEQ in s for s, _ in op[1])]


def _debug(msg: str) -> None:
    import os

    if os.environ.get("VRAMPLAN_DERIVE_DEBUG"):
        print("derive:", msg)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone(x) for x in obj)
    if isinstance(obj, list):
        return [_clone(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj  # caches and other objects pass through (the decode step is not compared part by part)


def _record(model: torch.nn.Module) -> _Recorder:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, _SEQ), generator=torch.Generator().manual_seed(1))
    model.train()
    rec = _Recorder(model)
    try:
        with rec:
            torch.manual_seed(2)
            model(input_ids=ids, labels=ids, use_cache=False)  # a cache would be mutated by the parts' replays
    finally:
        rec.close()
    return rec


def _part_ops(mod: torch.nn.Module, inputs: tuple[Any, Any]) -> list[Any]:
    args, kwargs = _clone(inputs)
    mod.train()
    with _OpLog() as log:
        torch.manual_seed(2)
        mod(*args, **kwargs)
    return log.ops


def _apply_rope_cat(orig: Any) -> Any:
    """``orig`` (a modeling file's ``apply_rotary_pos_emb``) on the rotary part ``[..., :cos.shape[-1]]`` of q and
    k, each result concatenated with the pass-through rest, which may be empty (modeling_glm4_moe.py
    apply_rotary_pos_emb: ``torch.cat([q_embed, q_pass], dim=-1)`` at any partial_rotary_factor)."""
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any,
              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rd = cos.shape[-1]
        qe, ke = orig(q[..., :rd], k[..., :rd], cos, sin, *args, **kwargs)
        return torch.cat([qe, q[..., rd:]], dim=-1), torch.cat([ke, k[..., rd:]], dim=-1)
    return apply


def _part_ops_rope_cat(mod: torch.nn.Module, inputs: tuple[Any, Any]) -> list[Any] | None:
    """The ops of attention module ``mod`` run with the concatenating rotary application (:func:`_apply_rope_cat`)
    in place of its modeling file's own; None when that file has no ``apply_rotary_pos_emb``."""
    module = sys.modules.get(type(mod).__module__)
    orig = getattr(module, "apply_rotary_pos_emb", None)
    if module is None or not callable(orig):
        return None
    module.apply_rotary_pos_emb = _apply_rope_cat(orig)  # type: ignore[attr-defined]
    try:
        return _part_ops(mod, inputs)
    finally:
        module.apply_rotary_pos_emb = orig  # type: ignore[attr-defined]


def _load_part(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    state = src.state_dict()
    keys = list(dst.state_dict())
    if [tuple(v.shape) for v in state.values()] != [tuple(dst.state_dict()[k].shape) for k in keys]:
        raise ValueError("different parameters")
    dst.load_state_dict(dict(zip(keys, state.values(), strict=True)), strict=True)


def _child(layer: torch.nn.Module, role: str) -> tuple[str, torch.nn.Module] | None:
    for name, child in layer.named_children():
        if _role(name, child) == role:
            return name, child
    return None


def _norm_refs(dim: int, eps: float, bias: bool) -> list[tuple[str, bool, torch.nn.Module]]:
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # GptOssRMSNorm: (weight * fp32 normed states).to(input dtype), the product promoted to fp32 (T5-style; what
    # NormKind.FP32_WEIGHT_RMSNORM replays)
    return [("rmsnorm", False, LlamaRMSNorm(dim, eps=eps)), ("gemma_rmsnorm", False, GemmaRMSNorm(dim, eps=eps)),
            ("cohere_layernorm", False, CohereLayerNorm(dim, eps=eps)),
            ("layernorm", bias, torch.nn.LayerNorm(dim, eps=eps, bias=bias)),
            ("rmsnorm_fp32_weight", False, GptOssRMSNorm(dim, eps=eps))]


class _LayerNormNoAffine(torch.nn.Module):
    """The reference of a parameter-free LayerNorm: ``F.layer_norm`` over the last dimension of an fp32 copy, no
    weight or bias, cast back to the input dtype (what ``NormKind.LAYERNORM_NO_AFFINE``'s program replays)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x.to(torch.float32), (self.dim,), None, None, 1e-5).to(x.dtype)


def _classify_norm(mod: torch.nn.Module, inputs: tuple[Any, Any]) -> tuple[str, bool] | None:
    params = dict(mod.named_parameters())
    weight = params.get("weight")
    if not params:  # no weight at all: the parameter-free LayerNorm, if it computes like one
        args = inputs[0]
        x = args[0] if args else next(iter(inputs[1].values()), None)
        if not isinstance(x, torch.Tensor):
            return None
        return ("layernorm_no_affine", False) if _part_ops(_LayerNormNoAffine(x.shape[-1]), inputs) == \
            _part_ops(mod, inputs) else None
    if weight is None or weight.dim() != 1:
        return None
    bias = "bias" in params
    eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)) or 1e-6)
    mine = _part_ops(mod, inputs)
    for kind, has_bias, ref in _norm_refs(weight.shape[0], eps, bias):
        ref = ref.to(weight.dtype)
        try:
            _load_part(mod, ref)
            if _part_ops(ref, inputs) == mine:
                return kind, has_bias
        except Exception:
            continue
    return None


def _family_model(ref: str, d: Mapping[str, Any], attn: str) -> torch.nn.Module | None:
    """The family's model from the type's config, uninitialised (its parts get the type's weights; what runs
    outside them does not depend on values). A config without ``head_dim`` gives the type hidden / heads
    (``getattr(config, "head_dim", hidden_size // num_attention_heads)`` in the LLaMA-class attention); the family
    gets that value, not its own config class's default."""
    from transformers.initialization import no_init_weights

    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()) and \
            len({v.get("rope_type") for v in rope.values()}) == 1:
        # rotary parameters per layer type (Mellum: a theta for full and one for sliding layers) computing the same
        # ops: the family, which reads one set, gets the first (the theta changes values, not ops)
        d = {**d, "rope_parameters": next(iter(rope.values()))}
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type") and "partial_rotary_factor" not in rope and \
            "partial_rotary_factor" not in d:
        # the type rotates whole heads (its rotary tables are compared with the family's): a family whose config
        # class defaults to partial rotary (GLM-4.5: 0.5) is built rotating whole heads too
        d = {**d, "rope_parameters": {**rope, "partial_rotary_factor": 1.0}}
    if d.get("head_dim") is None and isinstance(d.get("hidden_size"), int) and \
            isinstance(d.get("num_attention_heads"), int) and d["num_attention_heads"] > 0:
        d = {**d, "head_dim": d["hidden_size"] // d["num_attention_heads"]}
    # a dropout the type's config has no key for is one its model does not run: the family's config class must not
    # add it from its own default (SeedOssConfig's residual_dropout = 0.1)
    d = {**_no_foreign_dropout(ref, d), **d}
    try:
        with no_init_weights():
            return _build(ref, d, attn, meta=False)
    except Exception:
        return None


def _no_foreign_dropout(ref: str, d: Mapping[str, Any]) -> dict[str, float]:
    """The dropout probabilities of family ``ref``'s config class that the type's config ``d`` does not hold, set
    to 0.0."""
    try:
        own = _config_class(ref)().to_dict()
    except Exception:
        return {}
    return {k: 0.0 for k, v in own.items() if "dropout" in k and k not in d and isinstance(v, float) and v > 0}


def _moe_attention_config(ref: str, d: Mapping[str, Any]) -> dict[str, Any] | None:
    """The type's config for MoE family ``ref`` with small MoE blocks: the family is a candidate for the attention
    part only (its attention does not depend on the experts)."""
    for shared in (0, 8):
        o = _family_moe_config(ref, d, {"num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 8,
                                        "shared": shared, "shared_gate": 0})
        if o is not None:
            return o
    return None


def _dense_mlps(d: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every layer's MLP dense (DeepSeek's first_k_dense_replace, GLM's mlp_layer_types): an MLA
    family built only to compare its attention needs no experts."""
    layers = d.get("num_hidden_layers")
    if not isinstance(layers, int):
        return dict(d)
    return {**d, "first_k_dense_replace": layers, "mlp_layer_types": ["dense"] * layers}


def compose(model_type: str) -> DeriveResult:
    """Compose ``model_type``'s facts part by part (see the module docstring)."""
    import transformers

    from ..hfconfig import _FAMILIES
    from ..spec import NormKind

    try:
        variants = _variants(model_type)
    except Exception as exc:
        return DeriveResult(model_type, None, f"the library-default config does not build: {type(exc).__name__}")
    try:  # a part no family has (MoE blocks, linear attention, …) refuses at once, from the meta build
        with torch.device("meta"):
            probe = _causal_lm_class(_config_class(model_type))._from_config(
                _config_class(model_type).from_dict(copy.deepcopy(variants[0][1])))
        for layer in _layers(probe):
            for name, child in layer.named_children():
                if _role(name, child).startswith("other:"):
                    return DeriveResult(model_type, None, f"a decoder-layer part no family has: {name} "
                                        f"({type(child).__name__})")
            roles = [_role(n, c) for n, c in layer.named_children()]
            if "moe" in roles and "mlp" in roles:
                return DeriveResult(model_type, None, "a decoder layer with a MoE block beside a dense MLP")
        # q/k norms in the type's attention: a family whose attention has them only behind a config flag
        # (GLM-4.5's use_qk_norm) is built with the flag on (the type's config has no such key)
        type_qk = any(_role(n, c) == "norm" for layer in _layers(probe) for part in layer.children()
                      if _role("", part) == "attn" for n, c in part.named_children())
    except LookupError as exc:
        return DeriveResult(model_type, None, f"not a LLaMA-class layout ({exc})")
    except Exception as exc:
        return DeriveResult(model_type, None, f"does not build: {type(exc).__name__}")
    dense = [f for f, facts in _FAMILIES.items() if not facts.moe and not facts.mla]
    # multi-head latent attention families are candidates for the attention part only (built with dense MLPs)
    mla = [f for f, facts in _FAMILIES.items() if facts.mla]
    # so are the MoE families (built with small MoE blocks): their attention is one no dense family may have
    moe_attn = [f for f, facts in _FAMILIES.items() if facts.moe and not facts.mla]
    refs = dense + mla + moe_attn
    rope_cat: dict[str, set[bool]] = {r: set() for r in refs}  # the attention matched with the concatenating apply
    base_ok: dict[str, bool] = {r: r in dense for r in refs}  # outside the layers
    glue_ok: dict[str, bool] = {r: r in dense for r in refs}  # the layers' call order and residual glue
    attn_ok: dict[str, bool] = dict.fromkeys(refs, True)
    mlp_ok: dict[str, bool] = {r: r in dense for r in refs}
    moe_refs = [f for f, facts in _FAMILIES.items() if facts.moe and not facts.mla]
    moe_ok: dict[str, bool] = dict.fromkeys(moe_refs, True)
    moe_why: dict[str, str] = {}
    moe_parts: list[tuple[str, tuple[tuple[str, Any], ...], str]] = []
    has_moe = False
    seen_dense = False  # a dense-MLP layer on some variant (else the recipe refuses configs with dense layers)
    layer_kinds: set[str] = set()  # the layer_types entries of the variants
    norms: set[tuple[str, bool]] = set()
    head_bias: dict[str, bool] = {}  # the type's lm_head has a bias, per variant
    attn_why: dict[str, tuple[int, str]] = {}  # each attention candidate's first difference (variant index, what)
    attn_gates: dict[str, dict[str, set[Any]]] = {}  # each attention candidate's output-gate facts, per variant
    attn_norms: dict[str, set[tuple[str, bool]]] = {}  # the kinds of the type's q/k norms a candidate adopted
    embed_scaled: dict[str, dict[str, bool]] = {}  # variants on which the type scales its embeddings, per base
    attn_nope: dict[str, dict[str, set[int]]] = {}  # layers a candidate matched with no rotary embedding, per variant
    why: dict[str, str] = {}
    checked: list[str] = []
    for vi, (vname, d) in enumerate(variants):
        for attn in kernels(model_type, ("eager", "sdpa") if vname in ("default", "widths") else ("eager",)):
            try:
                mine_model = _build(model_type, d, attn, meta=False)
                rec = _record(mine_model)
            except Exception as exc:
                if vname in ("default", "widths"):
                    return DeriveResult(model_type, None, f"{vname}/{attn}: the type's own forward fails: "
                                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}")
                break
            checked.append(f"{vname}/{attn}")
            head = mine_model.get_output_embeddings()
            head_bias[vname] = isinstance(head, torch.nn.Linear) and head.bias is not None
            layers = _layers(mine_model)
            # a MoE block sits where a dense family has its MLP: the glue compares them as one role
            roles = {i: [_role(n, dict(layers[i].named_children())[n]).replace("moe", "mlp") for n in rec.order[i]]
                     for i in rec.order}
            bad = [r for rs in roles.values() for r in rs if r.startswith("other:")]
            if bad:
                return DeriveResult(model_type, None, f"a decoder-layer part no family has: {bad[0].split(':', 1)[1]}")
            if any(r not in ("attn", "mlp") for i in rec.order for n in rec.order[i]
                   for r in [_role(n, dict(layers[i].named_children())[n]).replace("moe", "mlp")]
                   if r not in ("norm", "dropout")):
                return DeriveResult(model_type, None, "decoder layer without attention and MLP")
            # norms of the type's layers and final norm
            parts = [(f"L{i}.{name}", child) for i, layer in enumerate(layers)
                     for name, child in layer.named_children()]
            final = _final_norm(mine_model)
            if final is not None:
                parts.append(("final_norm", final))
            for key, child in parts:
                if _role(key, child) == "norm" and key in rec.inputs:
                    kind = _classify_norm(child, rec.inputs[key])
                    if kind is None:
                        return DeriveResult(model_type, None, f"norm {type(child).__name__} computes like no "
                                            "known norm (LlamaRMSNorm, GemmaRMSNorm, CohereLayerNorm, LayerNorm, "
                                            "GptOssRMSNorm, parameter-free fp32 LayerNorm)")
                    norms.add(kind)
            dense_mlp = any(_moe_child(layer) is None for layer in layers)  # a MoE-only stack compares no MLP
            seen_dense |= dense_mlp
            if isinstance(d.get("layer_types"), list):
                layer_kinds.update(str(k) for k in d["layer_types"])
            odd_head = isinstance(d.get("head_dim"), int) and isinstance(d.get("num_attention_heads"), int) and \
                d["head_dim"] * d["num_attention_heads"] != d.get("hidden_size")
            hd_retry: list[str] = []
            for ref in refs:
                if not (base_ok[ref] or glue_ok[ref] or attn_ok[ref] or (mlp_ok[ref] and dense_mlp)):
                    continue
                fd = _dense_mlps(d) if ref in mla else _moe_attention_config(ref, d) if ref in moe_attn else d
                fd = _with_qk_flag(ref, fd, type_qk)
                theirs = _family_model(ref, fd, attn) if fd is not None else None
                if theirs is None:
                    if attn_ok[ref]:
                        attn_why[ref] = (vi, f"{vname}: does not build from the type's config")
                    base_ok[ref] = glue_ok[ref] = attn_ok[ref] = mlp_ok[ref] = False
                    why.setdefault(ref, f"{vname}: does not build from the type's config")
                    continue
                tlayers = _layers(theirs)
                try:
                    trec = _record(theirs)
                except Exception as exc:
                    if attn_ok[ref] and odd_head:
                        # a model whose attention takes its head size as hidden / heads (OlmoeAttention's q_norm)
                        # does not run at another head_dim: its attention is compared at head_dim = hidden / heads
                        hd_retry.append(ref)
                    base_ok[ref] = glue_ok[ref] = attn_ok[ref] = False
                    why.setdefault(ref, f"{vname}/{attn}: {type(exc).__name__}")
                    trec = None
                if trec is not None:
                    troles = {i: [_role(n, dict(tlayers[i].named_children())[n]) for n in trec.order[i]]
                              for i in trec.order}
                    # (the final norm itself is classified with the other norms above)
                    if base_ok[ref] and trec.outside() != rec.outside() and _biased_head(mine_model, theirs):
                        trec = _record(theirs)  # the family's head with the type's bias (PhiMoE lm_head_bias)
                    if base_ok[ref] and trec.outside() != rec.outside() and \
                            _scaled_embedding(rec.outside(), trec.outside(), int(d["hidden_size"])):
                        # the type scales the embeddings on this variant (AFMoE mup_enabled): a key-switched scale
                        embed_scaled.setdefault(ref, {})[vname] = True
                    elif base_ok[ref] and trec.outside() != rec.outside():
                        base_ok[ref] = False
                        why.setdefault(ref, f"{vname}/{attn}: outside the layers: "
                                       + _first_difference(rec.outside(), trec.outside()))
                    if glue_ok[ref] and troles != roles:
                        _debug(f"{ref} glue {vname}/{attn}: call order {troles} vs mine {roles}")
                    if glue_ok[ref] and (troles != roles or any(trec.buckets.get(f"L{i}") != rec.buckets.get(f"L{i}")
                                                                for i in rec.order)):
                        glue_ok[ref] = False
                    # the rotary tables belong to the attention facts (partial rotary, rope style)
                    if attn_ok[ref] and _rotary_tables(trec) != _rotary_tables(rec):
                        attn_ok[ref] = False
                        attn_why[ref] = (vi, f"{vname}/{attn}: rotary tables: "
                                         + _first_difference(_rotary_tables(rec), _rotary_tables(trec)))
                for role, ok in (("attn", attn_ok), ("mlp", mlp_ok)):
                    if not ok[ref]:
                        continue
                    for i, layer in enumerate(layers):
                        if role == "mlp" and _moe_child(layer) is not None:
                            continue  # compared with the MoE families below
                        mine_part, their_part = _child(layer, role), _child(tlayers[i], role)
                        key = f"L{i}.{mine_part[0]}" if mine_part else ""
                        if mine_part is None or their_part is None or key not in rec.inputs:
                            ok[ref] = False
                            break
                        try:
                            if role == "attn":
                                acat, awhy, agate, akinds, anope = _attn_compare(mine_part[1], their_part[1],
                                                                                 rec.inputs[key], rec.buckets[key])
                                if acat is None:
                                    ok[ref] = False
                                    attn_why[ref] = (vi, f"{vname}/{attn}: {awhy}")
                                    _debug(f"{ref} attn {vname}/{attn}: {awhy}")
                                else:
                                    if anope:
                                        attn_nope.setdefault(ref, {}).setdefault(vname, set()).add(i)
                                    else:
                                        rope_cat[ref].add(acat)
                                    attn_gates.setdefault(ref, {}).setdefault(vname, set()).add(agate)
                                    attn_norms.setdefault(ref, set()).update(akinds)
                            else:
                                _load_part(mine_part[1], their_part[1])
                                tops = _part_ops(their_part[1], rec.inputs[key])
                                if tops != rec.buckets[key]:
                                    ok[ref] = False
                                    _debug(f"{ref} {role} {vname}/{attn}: "
                                           f"{_first_difference(rec.buckets[key], tops)}")
                        except Exception as exc:
                            ok[ref] = False
                            if role == "attn" and odd_head and "different parameters" in str(exc):
                                hd_retry.append(ref)
                            if role == "attn":
                                attn_why[ref] = (vi, f"{vname}/{attn}: {type(exc).__name__}: {exc}"[:160])
                            _debug(f"{ref} {role} {vname}/{attn}: {type(exc).__name__}: {exc}"[:300])
                        if not ok[ref]:
                            break
            if hd_retry:
                # an attention that takes its head size as hidden / heads (OlmoeAttention) cannot hold another head_dim:
                # compared again on the same stack with head_dim = hidden / heads (what head_dim changes beyond the
                # shapes is the reader's, checked by the exact parameter count on this variant)
                d2 = {**d, "head_dim": int(d["hidden_size"]) // int(d["num_attention_heads"])}
                try:
                    m2 = _build(model_type, d2, attn, meta=False)
                    rec2 = _record(m2)
                except Exception:
                    hd_retry = []
                for ref in hd_retry:
                    fd2 = _dense_mlps(d2) if ref in mla else _moe_attention_config(ref, d2) if ref in moe_attn else d2
                    fd2 = _with_qk_flag(ref, fd2, type_qk)
                    theirs2 = _family_model(ref, fd2, attn) if fd2 is not None else None
                    if theirs2 is None:
                        continue
                    trec2 = _record(theirs2)
                    if _rotary_tables(trec2) != _rotary_tables(rec2):
                        continue
                    cat2, why2, gate2, kinds2, nope2 = _attention_matches(_layers(m2), rec2, _layers(theirs2))
                    if cat2 is None:
                        attn_why[ref] = (vi, f"{vname}/{attn} at head_dim = hidden / heads: {why2}")
                        continue
                    attn_ok[ref] = True
                    rope_cat[ref].add(cat2)
                    attn_nope.setdefault(ref, {}).setdefault(vname, set()).update(nope2)
                    attn_gates.setdefault(ref, {}).setdefault(vname, set()).add(gate2)
                    attn_norms.setdefault(ref, set()).update(kinds2)
                    checked.append(f"{vname}/{attn}: attention as {ref}'s at head_dim = hidden / heads")
            if attn == kernels(model_type, ("eager", "sdpa"))[0]:  # the MoE block does not depend on the kernel
                has_moe |= _compare_moe(layers, rec, d, moe_ok, moe_why, vname, moe_parts)
    _debug(f"base {[r for r in dense if base_ok[r]]} glue {[r for r in dense if glue_ok[r]]} "
           f"attn {[r for r in dense if attn_ok[r]]} mlp {[r for r in dense if mlp_ok[r]]} norms {norms}")
    base = next((r for r in dense if base_ok[r]), None)
    glue = next((r for r in dense if glue_ok[r] and base is not None
                 and _FAMILIES[r].multipliers == _FAMILIES[base].multipliers), None)
    # one rotary application on every layer and variant: the family's own, or the concatenating one
    attn_ref = next((r for r in refs if attn_ok[r] and len(rope_cat[r]) == 1), None)
    mlp_ref = next((r for r in dense if mlp_ok[r]), None)
    missing = [what for what, r in (("ops outside the layers", base), ("layer glue and call order", glue),
                                    ("attention", attn_ref), ("MLP", mlp_ref)) if r is None]
    if missing:
        detail = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:3])
        if attn_ref is None and attn_why:  # the attentions that matched longest, where they stopped
            near = sorted(attn_why.items(), key=lambda kv: -kv[1][0])[:3]
            detail = "attention: " + "; ".join(f"{k}: {v[1]}" for k, v in near) + ("; " + detail if base is None
                                                                                     or glue is None else "")
        return DeriveResult(model_type, None, f"no family computes its {', '.join(missing)} ({detail})"[:600])
    o_bias = ("o_bias", True) in attn_norms.get(attn_ref, set()) if attn_ref is not None else False
    rope_plain = ("rope_plain", True) in attn_norms.get(attn_ref, set()) if attn_ref is not None else False
    norms |= {k for k in attn_norms.get(attn_ref, set()) if k[0] not in ("o_bias", "rope_plain")} \
        if attn_ref is not None else set()
    if len(norms) != 1:
        return DeriveResult(model_type, None, f"norms of several kinds: {sorted(norms)}")
    gate, gerr = _gate_facts(attn_gates.get(attn_ref, {}) if attn_ref is not None else {})
    if gerr:
        return DeriveResult(model_type, None, f"its attention computes like {attn_ref}'s with an output gate, but "
                            f"{gerr}")
    (norm_kind, norm_bias), = norms
    moe_ref = next((r for r in moe_refs if moe_ok[r]), None)
    moe_flags: tuple[tuple[str, Any], ...] = ()
    if has_moe and moe_ref is None:
        errs = [err for _, _, err in moe_parts if err]
        keyed, kerr = _keyed_flags(moe_parts)
        if errs or kerr:
            detail = "; ".join(f"{k}: {v}" for k, v in list(moe_why.items())[:3])
            return DeriveResult(model_type, None, f"no family computes its MoE block ({detail}); part by part: "
                                f"{errs[0] if errs else kerr}"[:900])
        moe_flags = keyed
    assert base is not None and glue is not None and attn_ref is not None and mlp_ref is not None
    fb, fg, fa, fm = _FAMILIES[base], _FAMILIES[glue], _FAMILIES[attn_ref], _FAMILIES[mlp_ref]
    # a Gemma family's outside ops go with Gemma's norms; a LLaMA-class base may have Gemma-style norms (MiniMax M3:
    # no embedding scale), replayed as NormKind.GEMMA_RMSNORM
    if fb.gemma and norm_kind != "gemma_rmsnorm":
        return DeriveResult(model_type, None, f"outside the layers it computes like {base}, its norms are {norm_kind}")
    facts = replace(fb, layout=fg.layout, parallel=fg.parallel, post_norm_key=fg.post_norm_key,
                    **{k: getattr(fa, k) for k in _ATTN_FIELDS},
                    **{k: getattr(fm, k) for k in _MLP_FIELDS})
    if any(head_bias.values()) and not fb.lm_head_bias:
        key = _bias_key(head_bias)
        if key is None:
            on = sorted(k for k, v in head_bias.items() if v)
            return DeriveResult(model_type, None, f"its lm_head has a bias on {on} of the variants, following no "
                                "boolean config key")
        facts = replace(facts, lm_head_bias=key == "", lm_head_bias_key=key)
    if gate:
        facts = replace(facts, **dict(gate))
    if rope_plain:  # every rotary layer matched with LLaMA's application: whole heads, no concatenation
        facts = replace(facts, rope_cat=False, partial_rotary=False)
    if o_bias:  # o_proj has a bias when the family's bias key gives q/k/v theirs (the o_proj bias was added to match)
        facts = replace(facts, o_bias=True)
    if fa.qk_norm_key and fa.qk_norm_key not in variants[0][1]:
        # the family's q/k norms were switched on by a flag the type does not have: the type always has them
        facts = replace(facts, qk_norm=fa.qk_norm or "head", qk_norm_key="")
    nope_layers = attn_nope.get(attn_ref, {})
    if any(nope_layers.values()) and not fa.nope:
        # layers without RoPE where the family applies it: the type's non-sliding layers on every variant (AFMoE,
        # Flint: only sliding-window layers rotate) read as EXAONE 4's "global" NoPE layers
        for vname, vd in variants:
            kinds = vd.get("layer_types")
            want_nope = {i for i, k in enumerate(kinds or []) if k != "sliding_attention"} \
                if vd.get("sliding_window") is not None else set()
            seen = nope_layers.get(vname, set())
            if vname in nope_layers or vname in attn_gates.get(attn_ref, {}):
                n = vd.get("num_hidden_layers")
                if isinstance(n, int) and seen != {i for i in want_nope if i < n}:
                    return DeriveResult(model_type, None, f"{vname}: layers {sorted(seen)} apply no rotary embedding, "
                                        f"not the full-attention layers {sorted(want_nope)}")
        facts = replace(facts, nope="global")
    scaled = sorted(embed_scaled.get(base, {}))
    if scaled:
        key, _, val = scaled[0].partition("=")
        if len(scaled) != 1 or val != "True" or fb.gemma or fb.multipliers or fb.head_scale:
            return DeriveResult(model_type, None, f"outside the layers it computes like {base} with its embeddings "
                                f"scaled on {scaled}, which no boolean config key switches on")
        facts = replace(facts, embed_scale_key=key)
    uniform = _uniform_keys(variants)
    if uniform:
        facts = replace(facts, uniform_keys=uniform)
    if rope_cat[attn_ref] == {True}:
        # the concatenating apply takes the rotary width from cos: the rotary module's partial_rotary_factor
        facts = replace(facts, rope_cat=True, partial_rotary=True)
    if not fb.gemma:
        facts = replace(facts, norm=NormKind(norm_kind))
    if norm_bias:  # nn.LayerNorm with its bias: the LAYERNORM program counts and replays it
        facts = replace(facts, norm_bias=True)
    aliases = tuple((k, v) for k, v in getattr(_config_class(model_type), "attribute_map", {}).items()
                    if isinstance(k, str) and isinstance(v, str))
    facts = replace(facts, aliases=aliases, version=".".join(transformers.__version__.split(".")[:2]),
                    sdpa="sdpa" in kernels(model_type), layer_kinds=tuple(sorted(layer_kinds)),
                    moe_only=has_moe and not seen_dense)
    if has_moe:
        keys, err = _moe_size_keys(model_type, variants[0][1])
        rule_default: tuple[tuple[str, ...], ...] = ()
        if not err:
            rule, err = _moe_layer_rule(model_type, variants[1][1])
            lists = {cond[1] for cond in rule if cond[0] == "eq"}
            if not err and lists:  # a config without the per-layer list: the config class builds it from others
                rule_default, err = _moe_layer_rule(
                    model_type, {k: v for k, v in variants[1][1].items() if k not in lists})
        if err:
            return DeriveResult(model_type, None, f"its MoE block computes like {moe_ref or 'its parts'}, but {err}")
        if moe_ref is not None:
            facts = replace(facts, moe=_FAMILIES[moe_ref].moe, moe_family=moe_ref, moe_keys=keys, moe_rule=rule,
                            moe_rule_default=rule_default)
        else:
            facts = replace(facts, moe="composed", moe_flags=moe_flags, moe_keys=keys, moe_rule=rule,
                            moe_rule_default=rule_default)
    defaults = library_defaults(model_type)
    err = _check_counts(model_type, facts, variants, defaults)
    if err:
        return DeriveResult(model_type, None, err)
    fd = asdict(facts)
    fd["norm"] = str(fd["norm"])
    fd["aliases"] = [list(a) for a in fd["aliases"]]
    fd["mlp_names"] = list(fd["mlp_names"])
    fd["moe_keys"] = [list(a) for a in fd["moe_keys"]]
    fd["moe_rule"] = [list(a) for a in fd["moe_rule"]]
    fd["moe_flags"] = [list(a) for a in fd["moe_flags"]]
    fd["moe_rule_default"] = [list(a) for a in fd["moe_rule_default"]]
    fd["layer_kinds"] = list(fd["layer_kinds"])
    fd["uniform_keys"] = [list(a) for a in fd["uniform_keys"]]
    parts = {"base": base, "glue": glue, "attention": attn_ref, "mlp": mlp_ref, "norm": norm_kind}
    if has_moe:
        parts["moe"] = moe_ref or "composed: experts as Mixtral's or gpt-oss's, shared expert as a gated MLP, " \
            "router and block glue by their tokens x hidden tensors"
    recipe = {"model_type": model_type, "reads_as": base, "parts": parts,
              "facts": fd, "defaults": defaults, "transformers": transformers.__version__,
              "torch": torch.__version__.split("+")[0], "checked": checked,
              "method": "composed part by part: outside ops, layer glue and call order as the base family; "
                        "attention, MLP and norms op for op as the named families (train forward, bf16)"}
    return DeriveResult(model_type, recipe, tried=[base, glue, attn_ref, mlp_ref])


def _scaled_embedding(mine: list[Any], theirs: list[Any], hidden: int) -> bool:
    """``mine`` is ``theirs`` with one more product of the embeddings' (batch, seq, hidden) size after the embedding
    (``hidden_states * hidden_size ** 0.5`` before the layers: AFMoE's mup_enabled)."""
    i = next((j for j, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), len(theirs))
    if len(mine) != len(theirs) + 1 or i == 0 or mine[i][0] != "aten.mul.Tensor" or mine[:i] + mine[i + 1:] != theirs:
        return False
    shape = mine[i][1][0][0]
    return any(op[0] == "aten.embedding.default" for op in mine[:i]) and len(shape) == 3 and shape[-1] == hidden


def _with_qk_flag(ref: str, fd: dict[str, Any] | None, type_qk: bool) -> dict[str, Any] | None:
    """``fd`` with family ``ref``'s q/k-norm flag on where the type's attention has q/k norms and its config no such
    key."""
    from ..hfconfig import _FAMILIES

    key = _FAMILIES[ref].qk_norm_key
    if fd is None or not type_qk or not key or key in fd:
        return fd
    return {**fd, key: True}


def _uniform_keys(variants: list[tuple[str, dict[str, Any]]]) -> tuple[tuple[str, str], ...]:
    """(list key, head-count key) of the per-layer head counts that repeat the model-wide one on every variant
    (Laguna's num_attention_heads_per_layer): the reader refuses a config where they differ."""
    out = []
    d0 = variants[0][1]
    for k, v in d0.items():
        for scalar in ("num_attention_heads", "num_key_value_heads"):
            if "head" in k and isinstance(v, list) and v and all(
                    isinstance(vd.get(k), list) and all(x == vd.get(scalar) for x in vd[k]) for _, vd in variants):
                out.append((k, scalar))
                break
    return tuple(out)


def _gate_facts(seen: Mapping[str, set[Any]]) -> tuple[tuple[tuple[str, Any], ...], str]:
    """The output gate's facts from those found on each variant: the shrunk default's, where the gate's width (one
    per head or one per channel) may follow one boolean config key flipped on a variant (Laguna's ``gating``: per head
    when True) and nothing else may change."""
    per: dict[str, tuple[tuple[str, Any], ...]] = {}
    for vname, gates in seen.items():
        if len(gates) != 1:
            return (), f"its gate differs between layers on {vname}"
        per[vname] = next(iter(gates))
    base = per.get("default", ())
    if not base and not any(per.values()):
        return (), ""
    out = dict(base)
    for vname, g in per.items():
        if g == base:
            continue
        mine = dict(g)
        key, _, val = vname.partition("=")
        changed = {k for k in {*out, *mine} if out.get(k) != mine.get(k)}
        if not base or not g or changed != {"attn_gate_heads"} or val not in ("True", "False"):
            return (), f"its gate changes on the variant {vname}: {sorted(base)} vs {sorted(g)}"
        if mine["attn_gate_heads"] != (val == "True") or out.get("attn_gate_heads_key", key) != key:
            return (), f"its gate's width follows {vname} the other way round"
        out["attn_gate_heads_key"] = key  # one gate per head when the key is True, per channel when False
    return tuple(sorted(out.items())), ""


def _check_counts(model_type: str, facts: Any, variants: list[tuple[str, dict[str, Any]]],
                  defaults: Mapping[str, Any]) -> str:
    from ..derive._configs import cut_layers
    from ..hfconfig import _Cfg, _llama_like
    from ..params import count_params

    for vname, d in [*variants[:2], ("library default", cut_layers(dict(defaults), 2))]:
        try:
            with torch.device("meta"):
                model = _causal_lm_class(_config_class(model_type))._from_config(
                    _config_class(model_type).from_dict(copy.deepcopy(d)))
            want = sum(p.numel() for p in model.parameters())
            raw = {**defaults, **{k: v for k, v in d.items() if _jsonable(v)}, "model_type": model_type}
            got = count_params(_llama_like(_Cfg(raw, model_type), model_type, facts)).total
        except Exception as exc:
            return f"{vname}: the reader cannot read it ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
        if got != want:
            return f"{vname}: the reader counts {got:,} parameters, the model has {want:,}"
    return ""



# ---- mixture-of-experts blocks ---------------------------------------------------------------------------------

def _moe_sizes(block: torch.nn.Module, hidden: int) -> dict[str, int] | None:
    """Experts, top-k, expert width and shared-expert width of a MoE block, read from its parameters' shapes and its
    router's ``top_k`` (None when it has no such attribute)."""
    state = block.state_dict(keep_vars=True)
    three = [v for v in state.values() if v.dim() == 3]
    if not three:
        return None
    e = three[0].shape[0]
    inner = [d for v in three for d in v.shape[1:] if d != hidden]
    k = next((getattr(m, a) for m in block.modules() for a in ("top_k", "num_experts_per_tok", "topk")
              if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)), None)
    if k is None:
        return None
    two = [v for v in state.values() if v.dim() == 2 and tuple(v.shape) != (e, hidden) and 1 not in v.shape]
    shared = [d for v in two for d in v.shape if d != hidden]
    return {"num_experts": e, "experts_per_token": k, "moe_intermediate_size": min(inner) if inner else hidden,
            "shared": min(shared) if shared else 0,
            "shared_gate": int(any(v.dim() == 2 and tuple(v.shape) == (1, hidden) for v in state.values()))}


def _family_moe_config(ref: str, d: Mapping[str, Any], z: Mapping[str, int]) -> dict[str, Any] | None:
    """The type's config with the MoE sizes ``z`` under the keys family ``ref``'s config reads (every layer a MoE
    layer); None when the family cannot hold them (a shared expert not a whole number of experts wide)."""
    from ..hfconfig import _FAMILIES

    kind = _FAMILIES[ref].moe
    e, k, i, si = z["num_experts"], z["experts_per_token"], z["moe_intermediate_size"], z["shared"]
    o = {**d, "num_experts_per_tok": k}
    if kind in ("mixtral", "granitemoe", "gpt_oss", "olmoe"):
        if bool(si) != (ref == "granitemoeshared"):
            return None
        o |= {"num_local_experts": e, "num_experts": e, "intermediate_size": i}
        if si:
            o["shared_intermediate_size"] = si
    elif kind == "qwen":
        if bool(si) != (ref == "qwen2_moe"):
            return None
        o |= {"num_experts": e, "num_local_experts": e, "moe_intermediate_size": i, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "shared_expert_intermediate_size": si}
    elif kind in ("deepseek", "ernie"):
        if si % i:
            return None
        if kind == "deepseek":
            o |= {"n_routed_experts": e, "moe_intermediate_size": i, "n_shared_experts": si // i,
                  "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "moe_layer_freq": 1}
        else:
            o |= {"moe_num_experts": e, "moe_k": k, "moe_intermediate_size": i, "moe_num_shared_experts": si // i,
                  "moe_layer_start_index": 0, "moe_layer_interval": 1}
    else:
        return None
    o.pop("mlp_layer_types", None)
    # a key the type leaves None (Cohere2MoeConfig's rms_norm_eps: its norms are LayerNorms) may be one the family's
    # strict config class refuses: the family takes its own default (the MoE block does not read it)
    return {k: v for k, v in o.items() if v is not None}


def _load_by_shape(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load ``src``'s tensors into ``dst``: each of ``dst``'s, in order, takes the first unused one of the same
    shape (the parts of MoE blocks are named differently from family to family)."""
    have = list(src.state_dict().values())
    want = dst.state_dict()
    if len(have) != len(want):
        raise ValueError(f"{len(have)} tensors vs {len(want)}")
    used: set[int] = set()
    out = {}
    for key, v in want.items():
        j = next((j for j, t in enumerate(have) if j not in used and t.shape == v.shape), None)
        if j is None:
            raise ValueError(f"no tensor of shape {tuple(v.shape)} for {key}")
        used.add(j)
        out[key] = have[j]
    dst.load_state_dict(out, strict=True)


def _moe_child(layer: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    return next(((n, c) for n, c in layer.named_children() if _role(n, c) == "moe"), None)


def _family_block(ref: str, d: Mapping[str, Any], z: Mapping[str, int]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(family model, its first MoE block) built from the type's config with the sizes ``z``."""
    o = _family_moe_config(ref, d, z)
    if o is None:
        raise ValueError("its block cannot hold these sizes")
    model = _family_model(ref, o, "eager")
    if model is None:
        raise ValueError("does not build from the type's config")
    for layer in _layers(model):
        child = _moe_child(layer)
        if child is not None:
            return model, child[1]
    raise ValueError("has no MoE layer")


def _observe(model_type: str, d: Mapping[str, Any]) -> tuple[dict[str, int], tuple[int, ...]] | None:
    """The sizes of the first MoE block and the indices of the MoE layers of ``d`` built on the meta device."""
    try:
        with torch.device("meta"):
            model = _causal_lm_class(_config_class(model_type))._from_config(
                _config_class(model_type).from_dict(copy.deepcopy(dict(d))))
        layers = _layers(model)
    except Exception:
        return None
    moe = tuple(i for i, layer in enumerate(layers) if _moe_child(layer) is not None)
    if not moe:
        return {}, ()
    child = _moe_child(layers[moe[0]])
    assert child is not None
    z = _moe_sizes(child[1], int(d["hidden_size"]))
    return (z or {}), moe


def _int_keys(d: Mapping[str, Any]) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool)]


def _moe_size_keys(model_type: str, d: Mapping[str, Any]) -> tuple[tuple[tuple[str, str], ...], str]:
    """Which of the type's config keys set the experts, top-k, expert width and shared experts: each key holding the
    observed value is changed in turn, and the one whose change the built model follows is taken."""
    seen = _observe(model_type, d)
    if not seen or not seen[0]:
        return (), "no MoE block with a router top_k in the shrunk default"
    z = seen[0]
    out: list[tuple[str, str]] = []
    for field, step in (("num_experts", 2), ("experts_per_token", 1), ("moe_intermediate_size", 8)):
        found = None
        for key in _int_keys(d):
            if d[key] != z[field]:
                continue
            got = _observe(model_type, {**d, key: d[key] + step})
            if got and got[0] and got[0][field] == d[key] + step:
                found = key
                break
        if found is None:
            return (), f"no config key sets its {field} ({z[field]})"
        out.append((field, found))
    i, si = z["moe_intermediate_size"], z["shared"]
    used = {k for _, k in out}
    for key in _int_keys(d):  # a width key, or a count of expert-wide shared experts
        v = d[key]
        if key in used or not si:
            continue
        if si and v == si:
            got = _observe(model_type, {**d, key: v + 8})
            if got and got[0] and got[0]["shared"] == v + 8:
                out.append(("shared_expert_intermediate_size", key))
                break
        if v == (si // i if si % i == 0 else -1):
            got = _observe(model_type, {**d, key: v + 1})
            if got and got[0] and got[0]["shared"] == i * (v + 1):
                out.append(("shared_experts", key))
                break
    else:
        if si:
            return (), f"no config key sets its shared experts ({si} wide)"
        for key in _int_keys(d):  # a key that adds shared experts the comparison did not see: the reader refuses it
            if d[key] == 0 and key not in used:
                got = _observe(model_type, {**d, key: 1})
                if got and got[0] and got[0]["shared"]:
                    out.append(("no_shared_experts", key))
    return tuple(out), ""


def _rule_layers(rule: tuple[tuple[str, ...], ...], d: Mapping[str, Any], n: int) -> tuple[int, ...] | None:
    from ..errors import ConfigError
    from ..hfconfig import _Cfg, _moe_rule

    try:
        return _moe_rule(_Cfg(d, "probe"), rule, n)
    except (ConfigError, TypeError, ValueError, ZeroDivisionError):
        return None


def _moe_layer_rule(model_type: str, d: Mapping[str, Any]) -> tuple[tuple[tuple[str, ...], ...], str]:
    """Which layers hold the MoE block, as a rule over the config (:func:`vramplan.hfconfig._moe_rule`): the
    smallest conjunction of conditions that predicts the built model's MoE layers on the whole default stack and on
    copies with each key the candidates read changed."""
    n = d.get("num_hidden_layers")
    seen = _observe(model_type, d)
    if not isinstance(n, int) or seen is None:
        return (), "the whole default stack does not build"
    atoms: list[tuple[str, ...]] = [("all",)]
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int) and 0 <= v <= n:
            atoms.append(("ge", k))
            if v >= 1:
                atoms += [("step", k), ("every", k)]
        elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v) \
                and ("layer" in k or not v):
            atoms += [("not_in", k), ("in", k)]
        elif isinstance(v, list) and len(v) == n and all(isinstance(x, str) for x in v):
            atoms += [("eq", k, x) for x in dict.fromkeys(v)]
    # a number of leading dense layers the config class writes as a constant, from no key (HYV3Config's default
    # mlp_layer_types: one dense layer, then sparse ones)
    atoms += [("ge", f"#{c}") for c in (1, 2, 3) if c < n]
    rules = [(a,) for a in atoms] + [(a, b) for j, a in enumerate(atoms) for b in atoms[j + 1:]
                                     if "all" not in (a[0], b[0]) and a[1] != b[1]]
    probes = [(d, seen[1])]
    rules = [r for r in rules if _rule_layers(r, d, n) == seen[1]]
    tested: set[str] = set()
    for key in dict.fromkeys(a[1] for r in rules for a in r if len(a) > 1 and not a[1].startswith("#")):
        v = d[key]
        if isinstance(v, int):
            changes: list[Any] = [x for x in (v + 1, v - 1, 2, 3) if 0 <= x <= n and x != v]
        elif isinstance(v, list) and len(v) == n and v and all(isinstance(x, str) for x in v):
            others = [x for x in dict.fromkeys(v) if x != v[0]] or ["dense", "sparse"]
            changes = [[o, *v[1:]] for o in others if o != v[0]] + [[v[0], o, *v[2:]] for o in others
                                                                   if n > 1 and o != v[1]]
        elif isinstance(v, list):
            changes = [sorted(set(v) ^ {0}), sorted(set(v) ^ {1})] if n > 1 else []
        else:
            changes = []
        for c in changes:
            p = {**d, key: c}
            got = _observe(model_type, p)
            if got is None:
                continue
            tested.add(key)
            probes.append((p, got[1]))
    rules = [r for r in rules if all(_rule_layers(r, p, n) == want for p, want in probes)]
    if not rules:
        return (), f"no rule over its config predicts which layers are MoE layers ({list(seen[1])} of {n})"
    rules.sort(key=lambda r: (len(r), not all(len(a) == 1 or a[1] in tested for a in r)))
    return rules[0], ""


def _compare_moe(layers: torch.nn.ModuleList, rec: _Recorder, d: Mapping[str, Any], ok: dict[str, bool],
                 why: dict[str, str], vname: str, parts: list[tuple[str, tuple[tuple[str, Any], ...], str]]) -> bool:
    """Compare each MoE block of the type, on its captured inputs, op for op with the block of each MoE family built
    with the same sizes and holding the same weights; clears ``ok`` of the families that differ. True when the
    type has a MoE layer here."""
    found = False
    for i, layer in enumerate(layers):
        child = _moe_child(layer)
        key = f"L{i}.{child[0]}" if child else ""
        if child is None or key not in rec.inputs:
            continue
        found = True
        z = _moe_sizes(child[1], int(d["hidden_size"]))
        for ref in ok:
            if not ok[ref]:
                continue
            if z is None:
                ok[ref] = False
                why.setdefault(ref, f"{vname}: its router has no top_k")
                continue
            try:
                _, block = _family_block(ref, d, z)
                _load_by_shape(child[1], block)
                theirs = _part_ops(block, rec.inputs[key])
            except Exception as exc:
                ok[ref] = False
                why.setdefault(ref, f"{vname}: {type(exc).__name__}: {' '.join(str(exc).split())[:100]}")
                continue
            if theirs != rec.buckets[key]:
                ok[ref] = False
                why.setdefault(ref, f"{vname}: {_first_difference(rec.buckets[key], theirs)}")
        if not any(ok.values()) and z is not None:  # no family's block: its parts
            layer_norms = {type(c) for n, c in layer.named_children() if _role(n, c) == "norm"}
            flags, err = _moe_parts(child[1], rec.inputs[key], d, z, layer_norms)
            parts.append((vname, tuple(sorted(flags.items())), f"{vname}: {err}" if err else ""))
    return found


# ---- a MoE block no family computes as a whole: its parts -------------------------------------------------------

class _BlockRecorder(_Bucketed):
    """The ops of one MoE block bucketed by the child they run in (``glue``: the block's own), the children's call
    order and the inputs each child received."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.where = ["glue"]
        self.buckets: dict[str, list[Any]] = {"glue": [], "recorder": []}
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.order: list[str] = []
        self.handles = []
        for name, child in block.named_children():
            self.handles.append(child.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(child.register_forward_hook(self._post, with_kwargs=True))

    def _post(self, m: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self.where.pop()

    def _pre(self, name: str) -> Any:
        def pre(m: torch.nn.Module, args: Any, kwargs: Any) -> None:
            self.order.append(name)
            if name not in self.inputs:
                self.where.append("recorder")
                self.inputs[name] = _clone((args, kwargs))
                self.where.pop()
            self.where.append(name)
            self.buckets.setdefault(name, [])
        return pre



def _keyed_flags(parts: list[tuple[str, tuple[tuple[str, Any], ...], str]]) -> tuple[tuple[tuple[str, Any], ...], str]:
    """The block program's flags from the parts found on every variant: those of the shrunk default, where a flag
    that changes on a variant with one boolean config key flipped (``key=value``) follows that key: its value is then
    ``"config:key"`` (or ``"config:!key"``, the negation), read from the config at estimate time (HY-V3's
    enable_moe_fp32_combine, a shared expert's biases from mlp_bias). An absent flag is False."""
    base = next((dict(f) for v, f, _ in parts if v == "default"), None)
    if base is None:
        return (), "the shrunk default has no MoE block"
    keyed: dict[str, str] = {}
    for vname, flags, _ in parts:
        mine = dict(flags)
        changed = [k for k in dict.fromkeys([*base, *mine]) if base.get(k, False) != mine.get(k, False)]
        if not changed:
            continue
        key, _, val = vname.partition("=")
        if val not in ("True", "False") or any(not isinstance(base.get(k, False), bool)
                                               or not isinstance(mine.get(k, False), bool) for k in changed):
            return (), f"its parts differ between variants: {sorted(base.items())} vs {vname}: {sorted(mine.items())}"
        for k in changed:  # the flag equals the key where it equals it on the flipped variant
            rule = f"config:{key}" if mine.get(k, False) == (val == "True") else f"config:!{key}"
            if keyed.setdefault(k, rule) != rule:
                return (), f"its {k} follows both {keyed[k]} and {rule}"
    out = {**{k: v for k, v in base.items() if v is not False}, **keyed}
    return tuple(sorted(out.items())), ""


def _record_block(block: torch.nn.Module, inputs: tuple[Any, Any]) -> _BlockRecorder:
    args, kwargs = _clone(inputs)
    block.train()
    rec = _BlockRecorder(block)
    try:
        with rec:
            torch.manual_seed(2)
            block(*args, **kwargs)
    finally:
        for h in rec.handles:
            h.remove()
    return rec


def _numel(sig: tuple[tuple[tuple[int, ...], str], ...]) -> int:
    return max((math.prod(s) for s, _ in sig), default=0)


def _moe_parts(block: torch.nn.Module, inputs: tuple[Any, Any], d: Mapping[str, Any], z: Mapping[str, int],
               layer_norms: set[type] | None = None) -> tuple[dict[str, Any], str]:
    """The program facts of a MoE block from its parts: the experts op for op as a family's experts, the shared
    expert op for op as a gated MLP, and the router and the block's own ops by the tensors that scale with
    tokens x hidden (the router's fp32 copy of the hidden states, its fp32 routing weights, a scaling of the
    routed output); ops of tokens x experts (scores, top-k) are the program's router, not compared op for op.
    A child of the decoder layer's own norm class called last normalises the block's output (AXK1MoE's
    post_mlp_layernorm: ``moe_post_norm``; the program runs the spec's norm, which the layer's norms were classified
    as). Returns (flags, '') or ({}, why not)."""
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    h, e = int(d["hidden_size"]), z["num_experts"]
    rec = _record_block(block, inputs)
    x = inputs[0][0] if inputs[0] else next(iter(inputs[1].values()))
    t = x.numel() // h
    children = dict(block.named_children())
    experts = [n for n, c in children.items() if any(p.dim() == 3 for p in c.parameters())]
    router = [n for n, c in children.items() if n not in experts
              and any(tuple(p.shape) == (e, h) for p in c.parameters())]
    gate = [n for n, c in children.items() if isinstance(c, torch.nn.Linear) and tuple(c.weight.shape) == (1, h)]
    post = [n for n, c in children.items() if layer_norms and type(c) in layer_norms
            and all(tuple(p.shape) == (h,) for p in c.parameters())]
    if len(post) > 1 or (post and rec.order[-1:] != post):
        return {}, f"norms {post} inside the block, not one called last"
    shared = [n for n, c in children.items() if n not in experts + router + gate + post
              and any(True for _ in c.parameters())]
    if len(experts) != 1 or len(router) != 1 or len(shared) > 1:
        return {}, f"parts: experts {experts}, router {router}, other {shared}"
    own = [tuple(p.shape) for p in block.parameters(recurse=False)] + [tuple(b.shape) for b in
                                                                       block.buffers(recurse=False)]
    if any(s != (e,) for s in own):
        return {}, f"the block's own tensors {own}"
    flags: dict[str, Any] = {"moe_post_norm": True} if post else {}
    # experts: op for op as the Mixtral / gpt-oss experts (transformers' grouped_mm experts forward)
    ex = children[experts[0]]
    matched = ""
    for ref, glu in (("mixtral", ""), ("gpt_oss", "clamped"), ("mixtral", "fp32"), ("mixtral", "clamped_chunk")):
        try:
            _, fam_block = _family_block(ref, d, {**z, "shared": 0})
            fam_ex = dict(fam_block.named_children())["experts"]
            _load_by_shape(ex, fam_ex)
            if glu == "fp32":  # the reference of the fp32 GLU: Mixtral's experts with act(gate.float()) * up.float()
                fam_ex._apply_gate = types.MethodType(_fp32_glu, fam_ex)
            elif glu == "clamped_chunk":  # Mixtral's experts with gpt-oss's clamped GLU on the chunk(2) halves
                fam_ex._apply_gate = types.MethodType(_clamped_chunk_glu, fam_ex)
            if _part_ops(fam_ex, rec.inputs[experts[0]]) == rec.buckets[experts[0]]:
                matched = ref
                # the clamped GLU's program reads its halves as views either way (Blocks.clamped_glu)
                flags["expert_glu"] = "clamped" if glu == "clamped_chunk" else glu
                break
        except Exception:
            continue
    if not matched:
        return {}, ("its experts compute like neither Mixtral's, gpt-oss's, an fp32 GLU nor a clamped GLU of chunked "
                    "halves (grouped_mm experts forward)")
    if matched == "gpt_oss":
        flags["expert_bias"] = True
    ex_args = rec.inputs[experts[0]]
    weights = [a for a in (*ex_args[0], *ex_args[1].values()) if isinstance(a, torch.Tensor) and a.is_floating_point()
               and a.dim() == 2 and a.shape[-1] == z["experts_per_token"]]
    if not weights:
        return {}, "no routing weights reach the experts"
    # router: fp32 copy of the hidden states (F.linear(hidden.float(), ...)), sigmoid scores, fp32 weights out
    rops = rec.buckets[router[0]]
    big = [op for op in rops if _numel(op[1]) >= t * h]
    fp32_copy = [op for op in big if op[1][0][1] == "torch.float32"]
    if len(big) != len(fp32_copy) or len(fp32_copy) > 1:
        return {}, f"its router computes tokens x hidden tensors {big}"
    names = " ".join(op[0] for op in rops)
    flags["router_fp32"] = bool(fp32_copy)
    flags["router_sigmoid"] = "sigmoid" in names
    flags["router_weights_fp32"] = weights[0].dtype == torch.float32
    if not flags["router_sigmoid"] and "softmax" not in names:
        return {}, "its router applies neither softmax nor sigmoid"
    topk_at = names.find("topk")
    flags["router_topk_first"] = "softmax" in names and 0 <= topk_at < names.find("softmax")
    rmod = children[router[0]]
    flags["router_bias"] = any(n.endswith("bias") and tuple(p.shape) == (e,) and p.requires_grad
                               for n, p in rmod.named_parameters())
    # per-expert score-correction biases held as frozen parameters, not buffers (LagunaTopKRouter's
    # e_score_correction_bias, AfmoeSparseMoeBlock's expert_bias): parameters the reader counts, num_experts each
    frozen = sum(1 for p in block.parameters() if tuple(p.shape) == (e,) and not p.requires_grad)
    if frozen:
        flags["moe_extra_params"] = f"experts:{frozen}"
    if flags["router_bias"] and not flags["router_topk_first"]:
        return {}, "a router bias outside the top-k-first router"
    # shared expert: op for op as a gated MLP (LlamaMLP) of its width, before or after the routed experts
    if shared:
        sm = children[shared[0]]
        sbias = any(n.endswith("bias") for n, _ in sm.named_parameters())
        cfg = LlamaConfig(hidden_size=h, intermediate_size=z["shared"], hidden_act=d.get("hidden_act", "silu"),
                          mlp_bias=sbias)
        shared_glu: str | None = None
        for sglu, ref_mlp in (("", LlamaMLP(cfg)), ("clamped", _ClampedGluMLP(h, z["shared"], sbias))):
            try:
                ref_mlp = ref_mlp.to(torch.bfloat16)
                _load_by_shape(sm, ref_mlp)
                if _part_ops(ref_mlp, rec.inputs[shared[0]]) == rec.buckets[shared[0]]:
                    shared_glu = sglu
                    break
            except Exception:
                continue
        if shared_glu is None:
            return {}, (f"its shared expert {type(sm).__name__} computes unlike a gated MLP (LlamaMLP) and a fused "
                        "clamped-GLU MLP")
        if shared_glu:
            flags["shared_expert_glu"] = shared_glu
        flags["shared_expert_first"] = rec.order.index(shared[0]) < rec.order.index(experts[0])
        flags["shared_expert_bias"] = sbias
        flags["shared_expert_gate"] = bool(gate)
    elif gate:
        return {}, "a shared-expert gate without a shared expert"
    # the block's own ops of tokens x hidden: the shared expert's add (and gate product), a scaling of the routed sum
    glue = [op for op in rec.buckets["glue"] if _numel(op[1]) >= t * h]
    expect = (1 if shared else 0) + (1 if gate else 0)
    extra = len(glue) - expect
    if extra == 1 and glue[0][0] == "aten.mul.Tensor":
        flags["moe_output_scale"] = True  # routed_scaling_factor on the experts' sum
    elif shared and not gate and [(op[0], op[1][0][1]) for op in glue] == [
            ("aten._to_copy.default", "torch.float32"), ("aten._to_copy.default", "torch.float32"),
            ("aten.add.Tensor", "torch.float32"), ("aten._to_copy.default", str(x.dtype))]:
        flags["moe_fp32_combine"] = True  # (routed.float() + shared.float()).to(dtype)
    elif extra:
        return {}, f"the block's own ops {[op[0] for op in glue]}"
    return flags, ""


def _fp32_glu(self: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """``(act(gate.float()) * up.float()).to(gate.dtype)`` of ``gate_up.chunk(2, -1)`` (modeling_beam.py
    BeamExperts._apply_gate): the reference the ``expert_glu = "fp32"`` program replays."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (self.act_fn(gate.float()) * up.float()).to(gate.dtype)  # type: ignore[operator,no-any-return]


def _clamped_chunk_glu(self: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's clamped GLU on the ``chunk(2, -1)`` halves of ``gate_up`` (modeling_minimax_m3_vl.py
    MiniMaxM3VLExperts._apply_gate): the reference the ``expert_glu = "clamped"`` program replays (the constants change
    values, not ops)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=7.0)
    up = up.clamp(min=-7.0, max=7.0)
    glu = gate * torch.sigmoid(gate * 1.702)
    return (up + 1.0) * glu


class _ClampedGluMLP(torch.nn.Module):
    """A fused gate/up MLP with the clamped GLU (modeling_minimax_m3_vl.py MiniMaxM3VLDenseMLP): the reference of a
    shared expert the ``shared_expert_glu = "clamped"`` program replays."""

    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_clamped_chunk_glu(self, self.gate_up_proj(x)))  # type: ignore[no-any-return]
