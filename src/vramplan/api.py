"""The convenience entry point: ``vramplan.estimate("llama-3.1-8b", method="lora")``."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from .catalog import resolve_model
from .errors import WorkloadError
from .estimator import estimate as _estimate
from .result import Estimate
from .spec import ModelSpec
from .workload import Workload

__all__ = ["estimate", "make_workload"]


def make_workload(**options: Any) -> Workload:
    """Build a :class:`Workload` from plain values (strings for enums, as the CLI and JSON API pass them)."""
    fields = Workload.__dataclass_fields__
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in fields:
            raise WorkloadError(f"unknown workload option {key!r}; known: {', '.join(sorted(fields))}")
        ftype = _ENUMS.get(key)
        if ftype is not None and not isinstance(value, ftype):
            try:
                value = ftype(str(value).lower())
            except ValueError:
                choices = ", ".join(m.value for m in ftype)
                raise WorkloadError(f"{key.replace('_', '-')} {value!r} is not one of: {choices}") from None
        if key in ("lora_targets", "lora_modules_to_save") and isinstance(value, str):
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        elif key in ("lora_targets", "lora_modules_to_save"):
            value = tuple(value)
        elif key == "loss_chunk" and value is None:
            continue
        kwargs[key] = value
    return Workload(**kwargs)


def _enum_fields() -> dict[str, type[StrEnum]]:
    out = {}
    for name, f in Workload.__dataclass_fields__.items():
        default = f.default
        if isinstance(default, StrEnum):
            out[name] = type(default)
    return out


_ENUMS = _enum_fields()


def estimate(model: str | ModelSpec, workload: Workload | None = None, **options: Any) -> Estimate:
    """Estimate a workload for a catalog name, a config.json path, or a :class:`ModelSpec`.

    Options are the workload's fields (``task="infer"``, ``method="lora"``, ``batch_size=4``, …).
    """
    if isinstance(model, ModelSpec):
        spec, name = model, model.name
    else:
        spec, entry = resolve_model(model)
        name = entry.name if entry else spec.name
    if workload is None:
        workload = make_workload(**options)
    elif options:
        workload = make_workload(**{**_as_options(workload), **options})
    return _estimate(spec, workload, name=name)


def _as_options(w: Workload) -> dict[str, Any]:
    return {f: getattr(w, f) for f in Workload.__dataclass_fields__}
