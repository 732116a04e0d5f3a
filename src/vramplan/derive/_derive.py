"""Derive a model type's recipe from the installed transformers code (needs torch and transformers).

A recipe says that a model type's decoder computes, operation for operation, what a family the estimator
already has a memory program for computes, and how to read its config. It is found by differential testing
against the real library code, never by a list of names:

1. the library-default config of the type (``CONFIG_MAPPING[model_type]()``), shrunk to small dimensions and
   a short stack that keeps one layer of each kind (:func:`~vramplan.derive._configs.cut_layers`), and
   perturbed copies (other prime-valued widths, a ``head_dim`` that is not ``hidden_size / heads``, every
   boolean field flipped one at a time) are built on the meta device, for the type and, from the *same*
   config dictionary, for every family of the estimator (``hfconfig._FAMILIES``);
2. a family whose parameters have the same names and shapes as the type's on every variant is a candidate;
3. a candidate is accepted when, with the type's weights loaded into it, a training step (forward, loss,
   backward) and an inference step (prefill with cache, one decode step), with eager and with SDPA
   attention, in bf16, dispatch the same sequence of ATen operations with the same output shapes and dtypes
   as the type's own model (recorded with a ``TorchDispatchMode``; views are left out: they allocate nothing)
   — so its memory program (``blocks.py``) replays the type's allocations;
4. the estimator's pure-Python reader, run on each variant with the candidate's facts and the type's config
   defaults, must give the type's exact parameter count.

A type for which no family passes is refused, with the first difference found (the recipe is not written).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._configs import cut_layers

__all__ = ["DeriveResult", "derive", "library_defaults"]

# Widths of the two shrunk variants: small and distinct, multiples of 8 where grouped GEMMs need 16-byte strides;
# the second has a head_dim that is not hidden_size / heads.
# Multi-head latent attention sizes (q_lora_rank, kv_lora_rank, the nope / rope parts of a q/k head, v_head_dim) differ
# between the two as well, so a reader that swaps two of them miscounts.
_VARIANTS: tuple[dict[str, int], ...] = (
    {"hidden": 64, "heads": 4, "kv": 2, "head_dim": 16, "inter": 88, "moe_inter": 40, "vocab": 131, "experts": 4,
     "topk": 2, "window": 5, "q_lora": 24, "kv_lora": 16, "rope": 8, "nope": 8, "v_head": 12},
    {"hidden": 96, "heads": 6, "kv": 3, "head_dim": 24, "inter": 120, "moe_inter": 56, "vocab": 137, "experts": 6,
     "topk": 2, "window": 7, "q_lora": 40, "kv_lora": 24, "rope": 4, "nope": 12, "v_head": 20},
)
_SEQ = 12  # tokens of the test step: longer than the sliding windows above
# boolean config fields that say nothing about the architecture (flipping them tests nothing)
_NOT_ARCH = {"use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
             "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
             "chunk_size_feed_forward",
             "use_return_dict", "output_router_logits", "_attn_implementation_autoset", "pruned_heads",
             "tf_legacy_loss", "use_bfloat16"}


class DeriveResult:
    """What the derivation found for one model type: a recipe, or why there is none."""

    def __init__(self, model_type: str, recipe: dict[str, Any] | None, reason: str = "",
                 tried: list[str] | None = None) -> None:
        self.model_type = model_type
        self.recipe = recipe
        self.reason = reason
        self.tried = tried or []

    @property
    def ok(self) -> bool:
        return self.recipe is not None

    def __repr__(self) -> str:
        what = f"reads as {self.recipe.get('reads_as')}" if self.recipe else self.reason
        return f"DeriveResult({self.model_type!r}, {what})"


def _config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]  # type: ignore[no-any-return]


def _causal_lm_class(config_cls: type) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
    except KeyError:
        # the text sub-config of a composite type whose causal-LM class is its language model alone (Emu3TextConfig:
        # Emu3ForCausalLM, MllamaTextConfig: MllamaForCausalLM): that class, built on this config
        text_only = text_sub_config_class(config_cls)
        if text_only is None:
            raise
        return text_only
    return cls[0] if isinstance(cls, (list, tuple)) else cls  # type: ignore[no-any-return]


def text_sub_config_class(config_cls: type) -> type | None:
    """The causal-LM class whose ``config_class`` is ``config_cls`` though the causal-LM mapping does not key on it
    (it keys on the composite config; transformers' auto classes swap in ``get_text_config()``), or None."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is not None and getattr(cls, "config_class", None) is config_cls:
            return cls  # type: ignore[no-any-return]
    return None


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def completed_default(model_type: str) -> dict[str, Any]:
    """The type's library-default config as a dict, completed where the class leaves unset what its model reads
    and every published checkpoint states (not a guess at sizes: no memory depends on what is filled in).

    - ``rope_parameters`` left empty by a config whose rotary embedding looks it up per layer type
      (CohereCompassTextConfig: ``convert_rope_params_to_dict`` keeps ``{}``; ``CohereCompassRotaryEmbedding``
      reads ``rope_parameters[layer_type]``): one default entry per layer type, as
      ``PreTrainedConfig.standardize_rope_params`` writes for a single type (rope_type "default", theta 10000)."""
    d = _config_class(model_type)().to_dict()
    types = d.get("layer_types")
    if d.get("rope_parameters") == {} and isinstance(types, list) and types and all(isinstance(t, str) for t in types):
        d["rope_parameters"] = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in dict.fromkeys(types)}
    return d


def library_defaults(model_type: str) -> dict[str, Any]:
    """The type's library-default config as a dict (what transformers uses for a key a config.json omits),
    without bookkeeping keys and without per-layer lists (those follow the number of layers)."""
    d = completed_default(model_type)
    layers = d.get("num_hidden_layers")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures", "model_type",
                 "id2label", "label2id", "auto_map") or k.startswith("_"):
            continue
        if isinstance(v, list) and isinstance(layers, int) and len(v) == layers:
            continue
        if _jsonable(v):
            out[k] = v
    return out


def _set_if(d: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys:
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            d[k] = value


def _shrink(base: dict[str, Any], v: Mapping[str, int], odd_head_dim: bool) -> dict[str, Any]:
    """The config with small widths (the architecture unchanged: same flags, same layer kinds)."""
    d = copy.deepcopy(base)
    mla = isinstance(d.get("kv_lora_rank"), int)
    _set_if(d, ("hidden_size",), v["hidden"])
    _set_if(d, ("num_attention_heads",), v["heads"])
    if isinstance(d.get("num_key_value_heads"), int):
        # multi-head latent attention expands k and v to every query head (kv_b_proj): no grouped variant
        d["num_key_value_heads"] = v["heads"] if mla or d["num_key_value_heads"] == d.get("num_attention_heads") \
            else v["kv"]
    if "head_dim" in d:
        d["head_dim"] = v["head_dim"] if odd_head_dim else v["hidden"] // v["heads"]
    _set_if(d, ("intermediate_size",), v["inter"])
    _set_if(d, ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size"),
            v["moe_inter"])
    _set_if(d, ("vocab_size",), v["vocab"])
    _set_if(d, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), v["experts"])
    _set_if(d, ("num_experts_per_tok", "num_experts_per_token", "moe_k"), v["topk"])
    if "num_experts_per_tok" in d and d["num_experts_per_tok"] is None and isinstance(d.get("n_routed_experts"), int):
        d["num_experts_per_tok"] = v["topk"]  # DeepseekV2Config's default None cannot route (topk(k=None))
    if d.get("n_group") is not None and isinstance(d.get("n_group"), int):
        d["n_group"], d["topk_group"] = 1, 1
    if mla:
        # the MLA sizes, and the fields the config class derives from them kept as the default relates them (MLA
        # configs set head_dim to the rotary part, qk_head_dim to nope + rope)
        rope0, nope0 = base.get("qk_rope_head_dim"), base.get("qk_nope_head_dim")
        for k, val in (("q_lora_rank", v["q_lora"]), ("kv_lora_rank", v["kv_lora"]), ("qk_rope_head_dim", v["rope"]),
                       ("qk_nope_head_dim", v["nope"]), ("v_head_dim", v["v_head"])):
            if isinstance(d.get(k), int):
                d[k] = val
        if isinstance(rope0, int) and base.get("head_dim") == rope0:
            d["head_dim"] = v["rope"]
        if isinstance(rope0, int) and isinstance(nope0, int) and base.get("qk_head_dim") == rope0 + nope0:
            d["qk_head_dim"] = v["rope"] + v["nope"]
    for k, val in base.items():
        # a per-layer list of a head count that repeats the model-wide one (Laguna's num_attention_heads_per_layer
        # of the default) follows it
        for scalar in ("num_attention_heads", "num_key_value_heads"):
            n = base.get(scalar)
            if "head" in k and isinstance(val, list) and val and isinstance(n, int) and all(
                    isinstance(x, int) and not isinstance(x, bool) and x == n for x in val):
                d[k] = [d[scalar]] * len(val)
                break
    if isinstance(d.get("sliding_window"), int):
        d["sliding_window"] = v["window"]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(k), int) and d[k] >= v["vocab"]:
            d[k] = 0
    return d


def _variants(model_type: str) -> list[tuple[str, dict[str, Any]]]:
    """The shrunk default config and its perturbed copies, each with a name."""
    base = completed_default(model_type)
    for k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
        base.pop(k, None)
    full = _shrink(base, _VARIANTS[1], True)  # the whole default stack: every layer kind at its own index
    base = cut_layers(base, 2)
    out = [("default", _shrink(base, _VARIANTS[0], False)), ("widths", full)]
    for k, val in sorted(base.items()):
        if isinstance(val, bool) and k not in _NOT_ARCH and not k.startswith("_"):
            d = _shrink(base, _VARIANTS[0], False)
            d[k] = not val
            out.append((f"{k}={not val}", d))
    return out


def kernels(model_type: str, wanted: tuple[str, ...] = ("eager", "sdpa")) -> tuple[str, ...]:
    """The attention implementations of ``wanted`` the type's model accepts: a class with
    ``_supports_sdpa = False`` (VaultGemma: SDPA has no soft-capping) runs eager only, which is also what
    transformers falls back to for it (``PreTrainedModel._check_and_adjust_attn_implementation``)."""
    cls = _causal_lm_class(_config_class(model_type))
    out = tuple(a for a in wanted if a != "sdpa" or getattr(cls, "_supports_sdpa", True))
    return out or ("eager",)


def _build(model_type: str, d: Mapping[str, Any], attn: str, meta: bool) -> torch.nn.Module:
    cfg_cls = _config_class(model_type)
    d = {k: v for k, v in d.items() if k != "model_type"}
    config = cfg_cls.from_dict(copy.deepcopy(dict(d)))
    cls = _causal_lm_class(cfg_cls)
    if meta:
        with torch.device("meta"):
            return cls._from_config(config, attn_implementation=attn)  # type: ignore[no-any-return]
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)  # type: ignore[no-any-return]


def _shapes(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in m.state_dict(keep_vars=True).items()}


def _same_parameters(a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]]) -> bool:
    """The same tensors: by name, or (modules named differently) the same shapes in registration order."""
    return dict(a) == dict(b) or list(a.values()) == list(b.values())


def _load_into(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load ``src``'s weights into ``dst``: by name, or position by position where the names differ."""
    state = src.state_dict()
    keys = list(dst.state_dict())
    if set(state) != set(keys):
        state = dict(zip(keys, state.values(), strict=True))
    dst.load_state_dict(state, strict=True)


class _OpLog(TorchDispatchMode):
    """Every non-view ATen op with its output shapes and dtypes, in dispatch order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[tuple[tuple[int, ...], str], ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            flat = out if isinstance(out, (tuple, list)) else (out,)
            sig = tuple((tuple(t.shape), str(t.dtype)) for t in flat if isinstance(t, torch.Tensor))
            self.ops.append((str(func), sig))
        return out


def _steps(model: torch.nn.Module) -> Iterator[tuple[str, Callable[[], None]]]:
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, _SEQ), generator=g)

    def train() -> None:
        model.train()
        torch.manual_seed(2)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)

    yield "train", train
    yield "infer", infer


def _op_log(model: torch.nn.Module) -> dict[str, list[Any]]:
    logs: dict[str, list[Any]] = {}
    for name, fn in _steps(model):
        with _OpLog() as log:
            fn()
        logs[name] = log.ops
    return logs


def _first_difference(a: list[Any], b: list[Any]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"op {i}: {x[0]} {x[1]} vs {y[0]} {y[1]}"
    return f"{len(a)} vs {len(b)} ops"


def _facts_dict(ref: str) -> dict[str, Any]:
    from ..hfconfig import _FAMILIES

    out = asdict(_FAMILIES[ref])
    out["norm"] = str(out["norm"])
    out["aliases"] = [list(a) for a in out["aliases"]]
    out["mlp_names"] = list(out["mlp_names"])
    return out


def _reader_params(model_type: str, ref: str, d: Mapping[str, Any], defaults: Mapping[str, Any]) -> int:
    """Parameters the pure-Python reader counts for config ``d`` of ``model_type`` read with ``ref``'s facts."""
    from ..hfconfig import _FAMILIES, _Cfg, _llama_like
    from ..params import count_params

    raw = {**defaults, **{k: v for k, v in d.items() if _jsonable(v)}, "model_type": model_type}
    spec = _llama_like(_Cfg(raw, model_type), model_type, _FAMILIES[ref])
    return count_params(spec).total


def derive(model_type: str, candidates: list[str] | None = None) -> DeriveResult:
    """Find the family whose memory program replays ``model_type``'s allocations (see the module docstring)."""
    import transformers

    from ..hfconfig import _FAMILIES

    refs = candidates or list(_FAMILIES)
    try:
        variants = _variants(model_type)
        mine = {}
        for vname, d in variants:
            try:
                mine[vname] = _shapes(_build(model_type, d, "eager", meta=True))
            except Exception as exc:  # a flipped flag the type cannot build with: that variant tests nothing
                if vname in ("default", "widths"):
                    raise
                mine[vname] = {"error": type(exc).__name__}  # type: ignore[dict-item]
    except Exception as exc:
        return DeriveResult(model_type, None, f"the library-default config does not build: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}")
    defaults = library_defaults(model_type)
    tried: list[str] = []
    reasons: list[str] = []
    for ref in refs:
        if ref == model_type:
            continue
        try:
            same = True
            for vname, d in variants:
                if "error" in mine[vname]:
                    continue
                theirs = _shapes(_build(ref, d, "eager", meta=True))
                if not _same_parameters(mine[vname], theirs):
                    same = False
                    break
        except Exception:
            same = False
        if not same:
            continue
        tried.append(ref)
        why = _compare_ops(model_type, ref, variants, mine)
        if why:
            reasons.append(f"{ref}: {why}")
            continue
        try:
            for vname, d in [*variants[:2], ("library default", cut_layers(library_defaults(model_type), 2))]:
                got = _reader_params(model_type, ref, d, defaults)
                model = _build(model_type, d, "eager", meta=True)
                want = sum(p.numel() for p in model.parameters())
                if got != want:
                    raise ValueError(f"reader counts {got:,} parameters on {vname}, the model has {want:,}")
        except Exception as exc:
            reasons.append(f"{ref}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            continue
        recipe = {
            "model_type": model_type,
            "reads_as": ref,
            "facts": {**_facts_dict(ref), "sdpa": "sdpa" in kernels(model_type)},
            "defaults": defaults,
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "checked": [v for v, _ in variants if "error" not in mine[v]],
            "method": "same parameters and the same ATen op sequence (train step and prefill+decode, eager and "
                      "sdpa, bf16) as the family's model on every variant; reader parameter count exact",
        }
        return DeriveResult(model_type, recipe, tried=tried)
    if not tried:
        return DeriveResult(model_type, None, "no family of the estimator has the same parameters (by name, or "
                            "by shape in order) on the shrunk configs", tried)
    return DeriveResult(model_type, None, "; ".join(reasons)[:600], tried)


def _compare_ops(model_type: str, ref: str, variants: list[tuple[str, dict[str, Any]]],
                 mine: Mapping[str, Any]) -> str:
    """'' when the type and ``ref`` dispatch the same ops on every variant, else the first difference."""
    for vname, d in variants:
        if "error" in mine[vname]:
            continue
        # both kernels on the shrunk default; SDPA (what runs by default) on the whole stack; eager (the longer
        # op sequence: scores, softmax, masks in Python) on the flag flips
        for attn in kernels(model_type, {"default": ("eager", "sdpa"), "widths": ("sdpa",)}.get(vname, ("eager",))):
            try:
                a = _build(model_type, d, attn, meta=False)
                b = _build(ref, d, attn, meta=False)
                _load_into(a, b)
                la, lb = _op_log(a), _op_log(b)
            except Exception as exc:
                return f"{vname}/{attn}: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
            for step in la:
                if la[step] != lb[step]:
                    return f"{vname}/{attn}/{step}: {_first_difference(la[step], lb[step])}"
    return ""


@contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)
