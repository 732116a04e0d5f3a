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
refusal. MoE blocks are not composed (refused).
"""

from __future__ import annotations

import copy
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

_ATTN_FIELDS = ("qkv_bias", "bias_key", "bias_default", "o_bias", "qk_norm", "qk_norm_key", "rope",
                "rope_interleave_fp32", "partial_rotary", "qkv_fused", "nope", "qk_norm_after_rope", "attn_temperature",
                "mla", "mla_defaults")
_MLP_FIELDS = ("gate_up_fused", "mlp_bias_key", "mlp_bias_default", "mlp_plain", "mlp_names")


def _role(name: str, mod: torch.nn.Module) -> str:
    cls = type(mod).__name__
    if isinstance(mod, torch.nn.LayerNorm) or "Norm" in cls:
        return "norm"
    if cls.endswith("Attention"):
        return "attn"
    if cls.endswith("MLP"):
        return "mlp"
    if isinstance(mod, (torch.nn.Dropout, torch.nn.Identity)):
        return "dropout"
    return f"other:{name}:{cls}"


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise LookupError("no model.layers ModuleList")
    return layers


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm after the last layer: ``model.norm`` (LLaMA), else the one norm child of the decoder model
    (``final_layernorm``: Phi, Persimmon)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, torch.nn.Module):
        return None
    norm = getattr(inner, "norm", None)
    if isinstance(norm, torch.nn.Module):
        return norm
    norms = [m for n, m in inner.named_children() if _role(n, m) == "norm"]
    return norms[0] if len(norms) == 1 else None


class _Recorder(_OpLog):
    """Ops bucketed by where they run: outside the layers, a layer's glue, or one part of a layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.where: list[str] = ["outside"]
        self.buckets: dict[str, list[Any]] = {"outside": []}
        self.inputs: dict[str, tuple[Any, Any]] = {}
        self.order: dict[int, list[str]] = {}
        self.handles: list[Any] = []
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
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

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        n = len(self.ops)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.ops) > n:
            self.buckets[self.where[-1]].append(self.ops[-1])
        return out


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
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return [("rmsnorm", False, LlamaRMSNorm(dim, eps=eps)), ("gemma_rmsnorm", False, GemmaRMSNorm(dim, eps=eps)),
            ("cohere_layernorm", False, CohereLayerNorm(dim, eps=eps)),
            ("layernorm", bias, torch.nn.LayerNorm(dim, eps=eps, bias=bias))]


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
    outside them does not depend on values)."""
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            return _build(ref, d, attn, meta=False)
    except Exception:
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
    except LookupError as exc:
        return DeriveResult(model_type, None, f"not a LLaMA-class layout ({exc})")
    except Exception as exc:
        return DeriveResult(model_type, None, f"does not build: {type(exc).__name__}")
    dense = [f for f, facts in _FAMILIES.items() if not facts.moe and not facts.mla]
    # multi-head latent attention families are candidates for the attention part only (built with dense MLPs)
    mla = [f for f, facts in _FAMILIES.items() if facts.mla]
    refs = dense + mla
    base_ok: dict[str, bool] = {r: r in dense for r in refs}  # outside the layers
    glue_ok: dict[str, bool] = {r: r in dense for r in refs}  # the layers' call order and residual glue
    attn_ok: dict[str, bool] = dict.fromkeys(refs, True)
    mlp_ok: dict[str, bool] = {r: r in dense for r in refs}
    norms: set[tuple[str, bool]] = set()
    why: dict[str, str] = {}
    checked: list[str] = []
    for vname, d in variants:
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
            layers = _layers(mine_model)
            roles = {i: [_role(n, dict(layers[i].named_children())[n]) for n in rec.order[i]] for i in rec.order}
            bad = [r for rs in roles.values() for r in rs if r.startswith("other:")]
            if bad:
                return DeriveResult(model_type, None, f"a decoder-layer part no family has: {bad[0].split(':', 1)[1]}")
            if any(r not in ("attn", "mlp") for i in rec.order for n in rec.order[i]
                   for r in [_role(n, dict(layers[i].named_children())[n])] if r not in ("norm", "dropout")):
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
                                            "parameter-free fp32 LayerNorm)")
                    norms.add(kind)
            for ref in refs:
                if not (base_ok[ref] or glue_ok[ref] or attn_ok[ref] or mlp_ok[ref]):
                    continue
                theirs = _family_model(ref, _dense_mlps(d) if ref in mla else d, attn)
                if theirs is None:
                    base_ok[ref] = glue_ok[ref] = attn_ok[ref] = mlp_ok[ref] = False
                    why.setdefault(ref, f"{vname}: does not build from the type's config")
                    continue
                tlayers = _layers(theirs)
                try:
                    trec = _record(theirs)
                except Exception as exc:
                    base_ok[ref] = glue_ok[ref] = attn_ok[ref] = False
                    why.setdefault(ref, f"{vname}/{attn}: {type(exc).__name__}")
                    trec = None
                if trec is not None:
                    troles = {i: [_role(n, dict(tlayers[i].named_children())[n]) for n in trec.order[i]]
                              for i in trec.order}
                    # (the final norm itself is classified with the other norms above)
                    if base_ok[ref] and trec.buckets["outside"] != rec.buckets["outside"]:
                        base_ok[ref] = False
                        why.setdefault(ref, f"{vname}/{attn}: outside the layers: "
                                       + _first_difference(rec.buckets["outside"], trec.buckets["outside"]))
                    if glue_ok[ref] and troles != roles:
                        _debug(f"{ref} glue {vname}/{attn}: call order {troles} vs mine {roles}")
                    if glue_ok[ref] and (troles != roles or any(trec.buckets.get(f"L{i}") != rec.buckets.get(f"L{i}")
                                                                for i in rec.order)):
                        glue_ok[ref] = False
                    # the rotary tables belong to the attention facts (partial rotary, rope style)
                    if attn_ok[ref] and trec.buckets.get("rotary") != rec.buckets.get("rotary"):
                        attn_ok[ref] = False
                for role, ok in (("attn", attn_ok), ("mlp", mlp_ok)):
                    if not ok[ref]:
                        continue
                    for i, layer in enumerate(layers):
                        mine_part, their_part = _child(layer, role), _child(tlayers[i], role)
                        key = f"L{i}.{mine_part[0]}" if mine_part else ""
                        if mine_part is None or their_part is None or key not in rec.inputs:
                            ok[ref] = False
                            break
                        try:
                            _load_part(mine_part[1], their_part[1])
                            tops = _part_ops(their_part[1], rec.inputs[key])
                            if tops != rec.buckets[key]:
                                ok[ref] = False
                                _debug(f"{ref} {role} {vname}/{attn}: {_first_difference(rec.buckets[key], tops)}")
                        except Exception as exc:
                            ok[ref] = False
                            _debug(f"{ref} {role} {vname}/{attn}: {type(exc).__name__}: {exc}"[:300])
                        if not ok[ref]:
                            break
    _debug(f"base {[r for r in dense if base_ok[r]]} glue {[r for r in dense if glue_ok[r]]} "
           f"attn {[r for r in dense if attn_ok[r]]} mlp {[r for r in dense if mlp_ok[r]]} norms {norms}")
    base = next((r for r in dense if base_ok[r]), None)
    glue = next((r for r in dense if glue_ok[r] and base is not None
                 and _FAMILIES[r].multipliers == _FAMILIES[base].multipliers), None)
    attn_ref = next((r for r in refs if attn_ok[r]), None)
    mlp_ref = next((r for r in dense if mlp_ok[r]), None)
    missing = [what for what, r in (("ops outside the layers", base), ("layer glue and call order", glue),
                                    ("attention", attn_ref), ("MLP", mlp_ref)) if r is None]
    if missing:
        detail = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:3])
        return DeriveResult(model_type, None, f"no family computes its {', '.join(missing)} ({detail})"[:600])
    if len(norms) != 1:
        return DeriveResult(model_type, None, f"norms of several kinds: {sorted(norms)}")
    (norm_kind, norm_bias), = norms
    assert base is not None and glue is not None and attn_ref is not None and mlp_ref is not None
    fb, fg, fa, fm = _FAMILIES[base], _FAMILIES[glue], _FAMILIES[attn_ref], _FAMILIES[mlp_ref]
    if fb.gemma != (norm_kind == "gemma_rmsnorm"):
        return DeriveResult(model_type, None, f"outside the layers it computes like {base}, its norms are {norm_kind}")
    facts = replace(fb, layout=fg.layout, parallel=fg.parallel, post_norm_key=fg.post_norm_key,
                    **{k: getattr(fa, k) for k in _ATTN_FIELDS},
                    **{k: getattr(fm, k) for k in _MLP_FIELDS})
    if not fb.gemma:
        facts = replace(facts, norm=NormKind(norm_kind))
    if norm_bias:  # nn.LayerNorm with its bias: the LAYERNORM program counts and replays it
        facts = replace(facts, norm_bias=True)
    aliases = tuple((k, v) for k, v in getattr(_config_class(model_type), "attribute_map", {}).items()
                    if isinstance(k, str) and isinstance(v, str))
    facts = replace(facts, aliases=aliases, version=".".join(transformers.__version__.split(".")[:2]),
                    sdpa="sdpa" in kernels(model_type))
    defaults = library_defaults(model_type)
    err = _check_counts(model_type, facts, variants, defaults)
    if err:
        return DeriveResult(model_type, None, err)
    fd = asdict(facts)
    fd["norm"] = str(fd["norm"])
    fd["aliases"] = [list(a) for a in fd["aliases"]]
    fd["mlp_names"] = list(fd["mlp_names"])
    recipe = {"model_type": model_type, "reads_as": base, "parts": {"base": base, "glue": glue, "attention": attn_ref,
                                                                     "mlp": mlp_ref, "norm": norm_kind},
              "facts": fd, "defaults": defaults, "transformers": transformers.__version__,
              "torch": torch.__version__.split("+")[0], "checked": checked,
              "method": "composed part by part: outside ops, layer glue and call order as the base family; "
                        "attention, MLP and norms op for op as the named families (train forward, bf16)"}
    return DeriveResult(model_type, recipe, tried=[base, glue, attn_ref, mlp_ref])


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

