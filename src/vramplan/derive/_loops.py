"""Check a looped-stack reader (:mod:`vramplan.loops`) against the installed transformers (needs torch).

The real model is built small on the CPU and run once in training mode: a pre-hook on each decoder-layer stack records
every call of it and whether autograd records it (``torch.is_grad_enabled()``); the calls must be the reader's
:attr:`~vramplan.spec.ModelSpec.stack_runs` (which stack, in which order, with or without autograd). The reader's
parameter count must equal the meta-device model's, on the config and on copies with the cycle counts changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ._derive import _causal_lm_class, _config_class

__all__ = ["check_loops"]

# the config keys that shape the schedule, and copies that change each (the reader must follow the real forward)
_VARIANTS: tuple[dict[str, Any], ...] = (
    {}, {"H_cycles": 3}, {"L_cycles": 2}, {"L_bp_cycles": [1, 3]}, {"L_bp_cycles": [0, 1, 1, 2]},
    {"H_cycles": 1, "L_cycles": 4, "L_bp_cycles": [4]},
)
_TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "head_dim": 16,
         "num_hidden_layers": 2, "max_position_embeddings": 64}


def _stacks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules of the base model that hold a decoder-layer ModuleList (``L_module``, ``H_module``)."""
    base = getattr(model, "model", model)
    return [(n, m) for n, m in base.named_children() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)]


def observed_runs(model_type: str, d: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(first layer, layers, autograd on) of every stack call of one training-mode forward of the real model; the
    stacks' layers are numbered in module order."""
    cls: Any = _config_class(model_type)
    config = cls.from_dict(copy.deepcopy(d))
    torch.manual_seed(0)
    lm: Any = _causal_lm_class(cls)
    model = lm._from_config(config, attn_implementation="eager")
    model.train()
    calls: list[tuple[int, int, bool]] = []
    first = 0
    handles = []
    for _, stack in _stacks(model):
        n = len(stack.layers)  # type: ignore[arg-type]

        def pre(m: torch.nn.Module, args: Any, kwargs: Any, first: int = first, n: int = n) -> None:
            calls.append((first, n, torch.is_grad_enabled()))

        handles.append(stack.register_forward_pre_hook(pre, with_kwargs=True))
        first += n
    try:
        ids = torch.randint(0, int(d["vocab_size"]), (1, 8))
        model(input_ids=ids, labels=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def check_loops(model_type: str) -> list[str]:
    """The problems found with ``model_type``'s looped-stack reader (empty: it checks out)."""
    from ..hfconfig import spec_from_config
    from ..params import count_params

    problems = []
    cls: Any = _config_class(model_type)
    lm: Any = _causal_lm_class(cls)
    base = {k: v for k, v in cls().to_dict().items() if k not in ("transformers_version", "dtype", "torch_dtype",
                                                                  "_name_or_path", "architectures")}
    base.pop("num_layers_per_stack", None)
    for change in _VARIANTS:
        d = {**base, **_TINY, **change}
        try:
            seen = observed_runs(model_type, d)
        except Exception as exc:  # a variant the library itself refuses is not one to check
            problems.append(f"{change}: the model's forward fails: {type(exc).__name__}: {exc}"[:200])
            continue
        saved = cls.from_dict(copy.deepcopy(d)).to_dict()  # what a checkpoint's config.json holds
        spec = spec_from_config(saved, f"{model_type} {change}")
        want = [(r.first, r.count, r.grad) for r in spec.stack_runs]
        if seen != want:
            problems.append(f"{change}: the forward calls the stacks as {seen}, the reader says {want}")
        with torch.device("meta"):
            meta = lm._from_config(cls.from_dict(copy.deepcopy(d)))
        have, real = count_params(spec).total, sum(p.numel() for p in meta.parameters())
        if have != real:
            problems.append(f"{change}: {have} parameters, the meta-device model has {real}")
    return problems
