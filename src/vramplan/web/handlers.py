"""What each API endpoint answers, as plain functions of the parsed body (no HTTP here).

``estimate`` answers exactly what ``vramplan estimate --json`` prints for the same options: language
models of the catalog and uploaded configs go straight to the estimator (the CLI's own code path);
anything else (options other modules add to ``estimate``, such as multi-GPU layouts or image
resolution, and models outside the language-model catalog) runs the CLI command itself
(:mod:`.delegate`). ``fit`` and ``plan`` always run the CLI commands, when this install has them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Mapping
from enum import Enum
from functools import lru_cache
from typing import Any

from .. import charts
from ..api import make_workload
from ..errors import UnknownNameError, VramplanError
from ..estimator import estimate as _estimate
from ..kinds import MemoryKind
from . import delegate
from .options import MODEL_KEYS, WORKLOAD_KEYS, ModelRef, RequestError, check_workload, model_ref, safe_name

__all__ = [
    "DEFAULT_GPUS",
    "chart",
    "estimate",
    "features",
    "fit",
    "gpus",
    "headroom",
    "models",
    "plan",
    "schema",
    "sweep",
    "vision_models",
]

DEFAULT_GPUS = ("rtx-4090", "a100-40gb-sxm", "h100-sxm")
_SWEEP_KEYS = frozenset({"over", "range", "steps", "gpu"})
_MAX_GPUS = 8


def _module_present(name: str, attribute: str | None = None) -> bool:
    """Whether ``name`` imports (and has ``attribute``): modules of other issues arrive over time."""
    try:
        if attribute is None:
            return importlib.util.find_spec(name) is not None
        return hasattr(importlib.import_module(name), attribute)
    except Exception:  # a module half-way through its own issue must not break the page
        return False


def features() -> dict[str, bool]:
    """What this install offers, looked up now (other modules may come and go with the extras)."""
    return {
        "fit": delegate.has_command("fit"),
        "plan": delegate.has_command("plan"),
        "parallel": _module_present("vramplan.parallel", "estimate_parallel"),
        "vision": _module_present("vramplan.vision", "is_vision_model"),
        "charts": _module_present("vl_convert"),
    }


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _option(action: argparse.Action) -> dict[str, Any]:
    default = _json_value(action.default)
    if action.nargs == 0:
        kind = "bool"
    elif action.choices is not None:
        kind = "choice"
    elif isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        kind = "list"
    elif isinstance(default, bool):
        kind = "text"
    elif isinstance(default, int):
        kind = "int"
    elif isinstance(default, float):
        kind = "float"
    else:
        kind = "text"
    return {"name": action.dest, "flag": max(action.option_strings, key=len), "kind": kind, "default": default,
            "choices": [_json_value(c) for c in action.choices] if action.choices is not None else [],
            "required": bool(action.required), "help": action.help or ""}


def schema() -> dict[str, Any]:
    """The page's form: workload options (from :class:`Workload`), and the options of the other commands."""
    from .. import __version__
    from .options import workload_schema

    commands: dict[str, list[dict[str, Any]]] = {}
    for command in ("estimate", "fit", "plan"):
        if delegate.has_command(command):
            options = delegate.command_options(command)
            commands[command] = [_option(a) for dest, a in options.items() if dest not in WORKLOAD_KEYS]
    kinds = [{"name": k.value, "label": charts.KIND_LABELS[k], "color": charts.KIND_COLORS[k]} for k in MemoryKind]
    return {"version": __version__, "workload": [o.to_dict() for o in workload_schema()], "commands": commands,
            "features": features(), "default_gpus": list(DEFAULT_GPUS), "kinds": kinds}


@lru_cache(maxsize=1)
def models() -> Any:
    """``vramplan models --json`` (the catalog does not change while the server runs)."""
    return delegate.run_command("models", {})


@lru_cache(maxsize=1)
def vision_models() -> list[dict[str, Any]]:
    """``GET /api/vision-models``: the image and diffusion models ``vramplan estimate``/``fit``/``plan`` take
    by name (the pipelines' VAEs and text encoders are components, not listed); empty without the module."""
    if not features()["vision"]:
        return []
    from ..vision import list_vision_models

    return [{"name": e.name, "hf_id": e.hf_id, "family": f"image: {e.kind}", "kind": e.kind, "parameters": e.params,
             "aliases": list(e.aliases), "source": e.source} for e in list_vision_models() if e.estimable]


@lru_cache(maxsize=16)
def _gpus(query: tuple[tuple[str, str], ...]) -> Any:
    return delegate.run_command("gpus", dict(query))


def gpus(query: Mapping[str, str]) -> Any:
    """``vramplan gpus --json`` with the query's options (``gpu_class``, ``min_memory_gib``)."""
    return _gpus(tuple(sorted(query.items())))


# ----------------------------------------------------------------------------------------- estimates


def _in_catalog(name: Any) -> bool:
    from .options import catalog_entry

    try:
        catalog_entry(name)
    except (UnknownNameError, RequestError):
        return False
    return True


def _model_arg(body: Mapping[str, Any]) -> delegate.ModelArg:
    """The MODEL argument for a CLI command: a catalog name, a plain name for other catalogs, or an upload."""
    from .options import catalog_entry

    if body.get("config") is not None:
        ref = model_ref(body)  # checks the config the way the CLI will
        return delegate.ModelArg(config=ref.config, config_name=ref.config_name)
    name = body.get("model")
    if name is None:
        raise RequestError(422, "give either model (a catalog name) or config (a config.json object)")
    try:
        return delegate.ModelArg(name=catalog_entry(name).name)
    except UnknownNameError:
        if not features()["vision"]:
            raise
    return delegate.ModelArg(name=safe_name(name, "model"))  # the vision catalog, via the CLI


def _direct(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` is a language-model estimate with workload options only (the estimator's own path)."""
    if set(body) - MODEL_KEYS - WORKLOAD_KEYS:
        return False
    return body.get("config") is not None or _in_catalog(body.get("model")) or not features()["vision"]


def _ref_and_workload(body: Mapping[str, Any]) -> tuple[ModelRef, Any]:
    ref = model_ref(body)
    return ref, make_workload(**check_workload(body))


def estimate(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /api/estimate``: what ``vramplan estimate MODEL [flags] --json`` prints."""
    if _direct(body):
        ref, workload = _ref_and_workload(body)
        return _estimate(ref.spec, workload, name=ref.name).to_dict()
    options = {k: v for k, v in body.items() if k not in MODEL_KEYS}
    result: dict[str, Any] = delegate.run_command("estimate", options, _model_arg(body))
    return result


def headroom(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /api/headroom``: the estimate against every catalog GPU (or one ``gpu_class``)."""
    body = dict(body)
    cls = body.pop("gpu_class", None)
    if cls is not None and not isinstance(cls, str):
        raise RequestError(422, "gpu_class must be consumer, workstation or datacenter")
    est = estimate(body)
    total = int(est["total_bytes"])
    return {"model": est["model"], "total_bytes": total, "gpus": charts.headroom_table(total, cls)}


def _sweep_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], str, tuple[int, ...], list[str]]:
    rest = {k: v for k, v in body.items() if k not in _SWEEP_KEYS}
    over = body.get("over", "seq-len")
    if not isinstance(over, str) or over.replace("_", "-") not in charts.SWEEP_AXES:
        raise RequestError(422, f"over must be one of {', '.join(charts.SWEEP_AXES)}")
    span = body.get("range")
    if isinstance(span, str):
        lo_text, _, hi_text = span.partition(":")
        try:
            lo, hi = int(lo_text), int(hi_text)
        except ValueError:
            raise RequestError(422, "range must be 'A:B' with two integers, or [A, B]") from None
    elif isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in span):
        lo, hi = span
    else:
        raise RequestError(422, "range must be 'A:B' with two integers, or [A, B]")
    steps = body.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise RequestError(422, "steps must be an integer")
    names = body.get("gpu", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or len(names) > _MAX_GPUS or not all(isinstance(n, str) for n in names):
        raise RequestError(422, f"gpu must be a GPU name or a list of at most {_MAX_GPUS} names")
    return rest, over.replace("_", "-"), charts.sweep_values(lo, hi, steps), names


def _run_sweep(body: Mapping[str, Any]) -> charts.Sweep:
    rest, over, values, names = _sweep_request(body)
    extra = set(rest) - MODEL_KEYS - WORKLOAD_KEYS
    if extra:
        raise RequestError(422, f"unknown option {sorted(extra)[0]!r} for sweep")
    ref, workload = _ref_and_workload(rest)
    return charts.run_sweep(ref.spec, ref.name, workload, over, values, charts.capacities(names))


def sweep(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /api/sweep``: what ``vramplan sweep MODEL --over … --range A:B [--gpu …] --json`` prints."""
    return _run_sweep(body).to_dict()


def _delegated(command: str, body: Mapping[str, Any]) -> Any:
    if not delegate.has_command(command):
        raise RequestError(404, f"vramplan {command} is not part of this install")
    options = {k: v for k, v in body.items() if k not in MODEL_KEYS}
    return delegate.run_command(command, options, _model_arg(body))


def fit(body: Mapping[str, Any]) -> Any:
    """``POST /api/fit``: what ``vramplan fit MODEL [flags] --json`` prints."""
    return _delegated("fit", body)


def plan(body: Mapping[str, Any]) -> Any:
    """``POST /api/plan``: what ``vramplan plan MODEL [flags] --json`` prints."""
    return _delegated("plan", body)


# ----------------------------------------------------------------------------------------- charts


def chart(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /api/chart/{breakdown,sweep,parallel}``: the Vega-Lite spec the CLI would render."""
    if kind == "breakdown":
        return {"spec": charts.breakdown_spec(estimate(body))}
    if kind == "sweep":
        return {"spec": charts.sweep_spec(_run_sweep(body))}
    if kind == "parallel":
        return _parallel_chart(body)
    raise RequestError(404, f"no chart {kind!r}; charts: breakdown, sweep, parallel")


def _parallel_chart(body: Mapping[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in body.items() if k not in ("gpus", "gpu")}
    count = body.get("gpus", 8)
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 4096:
        raise RequestError(422, "gpus must be an integer from 2 to 4096")
    names = body.get("gpu", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or len(names) > _MAX_GPUS or not all(isinstance(n, str) for n in names):
        raise RequestError(422, f"gpu must be a GPU name or a list of at most {_MAX_GPUS} names")
    if set(rest) - MODEL_KEYS - WORKLOAD_KEYS or not _direct(rest):
        return {"spec": None, "reason": "per-GPU layouts are charted for language models with workload options"}
    ref, workload = _ref_and_workload(rest)
    try:
        rows = charts.parallel_rows(ref.spec, workload, count)
    except VramplanError as err:
        return {"spec": None, "reason": str(err)}
    if len(rows) < 2:
        return {"spec": None, "reason": "vramplan.parallel models fewer than two layouts for this workload"}
    est = _estimate(ref.spec, workload, name=ref.name)
    return {"spec": charts.parallel_spec(ref.name, est.workload, count, rows, charts.capacities(names))}
