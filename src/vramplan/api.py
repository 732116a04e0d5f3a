"""The convenience entry point: ``vramplan.estimate("llama-3.1-8b", method="lora")``."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Any

from ._values import as_bool, as_float, as_int, as_name
from .catalog import resolve_model
from .errors import VramplanError, WorkloadError
from .estimator import estimate as _estimate
from .result import Estimate
from .spec import ModelSpec
from .workload import Task, Workload

__all__ = ["estimate", "make_workload"]


def make_workload(**options: Any) -> Workload:
    """Build a :class:`Workload` from plain values (strings for enums, as the CLI and JSON API pass them).

    Every value is checked against its field's type here, at the boundary: ``"false"`` is not a true
    switch, ``"8"`` is the integer 8, and a value of the wrong type is a :class:`WorkloadError` naming the field.
    """
    fields = Workload.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in fields:
            raise WorkloadError(f"unknown workload option {key!r}; known: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(key, value)
    return Workload(**kwargs)


_INT_FIELDS = frozenset({"batch_size", "seq_len", "new_tokens", "lora_rank", "lora_alpha", "gradient_accumulation",
                         "trainable_layers"})


def _coerce(key: str, value: Any) -> Any:
    """One workload option, from what a person or a JSON body gives, to the field's type."""
    try:
        ftype = _ENUMS.get(key)
        if ftype is not None:
            if isinstance(value, ftype):
                return value
            if key == "task" and isinstance(value, str) and value.strip().lower() == "finetune":
                return Task.TRAIN  # plan's vocabulary: fine-tuning is a training step; --method says what trains
            if isinstance(value, str) and value.strip().lower() in {m.value for m in ftype}:
                return ftype(value.strip().lower())
            choices = ", ".join(m.value for m in ftype)
            shown = repr(value) if len(repr(value)) <= 60 else type(value).__name__
            raise WorkloadError(f"{key.replace('_', '-')} {shown} is not one of: {choices}")
        if key in _INT_FIELDS:
            return as_int(key, value)
        if key == "gradient_checkpointing":
            return as_bool(key, value)
        if key == "lora_dropout":
            return as_float(key, value)
        if key == "lora_targets":
            return _targets(value)
    except WorkloadError:
        raise
    except VramplanError as exc:
        raise WorkloadError(str(exc)) from None
    return value


def _targets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise WorkloadError(f"lora_targets must be module names (q_proj,v_proj), all-linear or default; "
                            f"got {type(value).__name__}")
    if len(items) > 256 or not all(isinstance(t, str) and len(t) <= 200 for t in items):
        raise WorkloadError("lora_targets must be at most 256 module names (strings), e.g. q_proj,v_proj")
    return tuple(t.strip() for t in items if t.strip())


def _enum_fields() -> dict[str, type[StrEnum]]:
    out = {}
    for name, f in Workload.__dataclass_fields__.items():
        default = f.default
        if isinstance(default, StrEnum):
            out[name] = type(default)
    return out


_ENUMS = _enum_fields()


def estimate(model: str | os.PathLike[str] | ModelSpec, workload: Workload | None = None, **options: Any) -> Estimate:
    """Estimate a workload for a catalog name, a config.json path, or a :class:`ModelSpec`.

    Options are the workload's fields (``task="infer"``, ``method="lora"``, ``batch_size=4``, …).
    """
    if isinstance(model, ModelSpec):
        spec, name = model, model.name
    else:
        spec, entry = resolve_model(as_name("model", model))
        name = entry.name if entry else spec.name
    if workload is not None and not isinstance(workload, Workload):
        raise WorkloadError(f"workload must be a vramplan.Workload (or pass its fields as keywords), "
                            f"got {type(workload).__name__}")
    if workload is None:
        workload = make_workload(**options)
    elif options:
        workload = make_workload(**{**_as_options(workload), **options})
    return _estimate(spec, workload, name=name)


def _as_options(w: Workload) -> dict[str, Any]:
    return {f: getattr(w, f) for f in Workload.__dataclass_fields__}
