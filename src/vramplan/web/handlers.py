"""What each API endpoint answers, as plain functions of the parsed body (no HTTP here).

A body is checked here (:mod:`.options`: the CLI's own option types, choices and defaults) and becomes a
:class:`Job` for :mod:`vramplan.service`, the layer the CLI calls too, so the API answers exactly what the
command's ``--json`` prints. A job names the catalog or carries an uploaded config: it never reads a file.
The app runs light jobs in a thread and heavy ones (:data:`HEAVY`) in its worker processes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .. import charts, service
from ..api import make_workload, resolve
from ..errors import VramplanError
from ..kinds import MemoryKind
from .options import MODEL_KEYS, WORKLOAD_KEYS, RequestError, command_options, model_of, options_for

__all__ = ["DEFAULT_GPUS", "HEAVY", "Job", "chart_job", "features", "gpus", "headroom", "job", "models", "run",
           "schema", "vision_models"]

DEFAULT_GPUS = ("rtx-4090", "a100-40gb-sxm", "h100-sxm")
_MAX_GPUS = 8
HEAVY = frozenset({"plan", "sweep", "chart/sweep", "chart/parallel"})  # seconds, not milliseconds


@dataclass(frozen=True, slots=True)
class Job:
    """A checked request: the service command (or chart), the model, its options, an uploaded config."""

    command: str
    model: str
    options: Mapping[str, Any]
    config: Mapping[str, Any] | None = None


def run(j: Job) -> Any:
    """The JSON answer of a job (in the app's thread pool or one of its worker processes)."""
    if j.command == "chart/sweep":
        return {"spec": charts.sweep_spec(service.sweep(_query(service.SweepQuery, j)))}
    if j.command == "chart/parallel":
        return _parallel_chart(j)
    return service.answer(j.command, j.model, j.options, j.config, local_files=False)


def _query(kind: type[service.Query], j: Job) -> Any:
    return kind.of(j.model, j.options, j.config, local_files=False)


def features() -> dict[str, bool]:
    """What this install offers: charts need the vl-convert package (looked up, not imported)."""
    return {"fit": True, "plan": True, "parallel": True, "vision": True,
            "charts": importlib.util.find_spec("vl_convert") is not None}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _option(action: Any) -> dict[str, Any]:
    default = _json_value(action.default)
    if action.nargs == 0:
        kind = "bool"
    elif action.choices is not None:
        kind = "choice"
    elif isinstance(default, list):
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

    commands = {c: [_option(a) for dest, a in command_options(c).items() if dest not in WORKLOAD_KEYS]
                for c in ("estimate", "fit", "plan")}
    kinds = [{"name": k.value, "label": charts.KIND_LABELS[k], "color": charts.KIND_COLORS[k]} for k in MemoryKind]
    return {"version": __version__, "workload": [o.to_dict() for o in workload_schema()], "commands": commands,
            "features": features(), "default_gpus": list(DEFAULT_GPUS), "kinds": kinds}


def models() -> list[dict[str, Any]]:
    """``vramplan models --json``: language and image models, each with its ``kind``."""
    return [m.to_dict() for m in service.models()]


def vision_models() -> list[dict[str, Any]]:
    """``GET /api/vision-models`` (kept for older pages): the image models, ``kind`` their architecture."""
    from ..vision import list_vision_models

    return [{"name": e.name, "hf_id": e.hf_id, "family": f"image: {e.kind}", "kind": e.kind, "parameters": e.params,
             "aliases": list(e.aliases), "source": e.source} for e in list_vision_models() if e.estimable]


def gpus(query: Mapping[str, str]) -> list[dict[str, Any]]:
    """``vramplan gpus --json`` with the query's options (``gpu_class``, ``min_memory_gib``)."""
    opts = options_for("gpus", query)
    return [service.gpu_row(g) for g in service.gpus(opts["gpu_class"], opts["min_memory_gib"])]


# ----------------------------------------------------------------------------------------- jobs


def job(command: str, body: Mapping[str, Any]) -> Job:
    """The checked job of ``POST /api/{command}`` (``estimate``, ``fit``, ``plan``, ``sweep``)."""
    model, config = model_of(body)
    if command == "sweep":
        return Job(command, model, {**options_for("sweep", body, skip=frozenset({"range", "over"})),
                                    **_sweep_axes(body)}, config)
    return Job(command, model, options_for(command, body), config)


def _sweep_axes(body: Mapping[str, Any]) -> dict[str, Any]:
    over = body.get("over", "seq-len")
    if not isinstance(over, str) or over.replace("_", "-") not in charts.SWEEP_AXES:
        raise RequestError(422, f"over must be one of {', '.join(charts.SWEEP_AXES)}")
    span = body.get("range")
    if isinstance(span, str):
        lo_text, _, hi_text = span.partition(":")
        try:
            span = [int(lo_text), int(hi_text)]
        except ValueError:
            raise RequestError(422, "range must be 'A:B' with two integers, or [A, B]") from None
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in span)):
        raise RequestError(422, "range must be 'A:B' with two integers, or [A, B]")
    return {"over": over.replace("_", "-"), "value_range": tuple(span)}


def headroom(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /api/headroom``: the estimate against every catalog GPU (or one ``gpu_class``)."""
    body = dict(body)
    cls = body.pop("gpu_class", None)
    if cls is not None and not isinstance(cls, str):
        raise RequestError(422, "gpu_class must be consumer, workstation or datacenter")
    est = run(job("estimate", body))
    total = int(est["total_bytes"])
    return {"model": est["model"], "total_bytes": total, "gpus": charts.headroom_table(total, cls)}


# ----------------------------------------------------------------------------------------- charts


def chart_job(kind: str, body: Mapping[str, Any]) -> Job | dict[str, Any]:
    """``POST /api/chart/{breakdown,sweep,parallel}``: the job that draws it (or the answer, when quick)."""
    if kind == "breakdown":
        return {"spec": charts.breakdown_spec(run(job("estimate", body)))}
    if kind == "sweep":
        j = job("sweep", body)
        return Job("chart/sweep", j.model, j.options, j.config)
    if kind == "parallel":
        return _parallel_job(body)
    raise RequestError(404, f"no chart {kind!r}; charts: breakdown, sweep, parallel")


def _parallel_job(body: Mapping[str, Any]) -> Job | dict[str, Any]:
    rest = {k: v for k, v in body.items() if k not in ("gpus", "gpu")}
    count = body.get("gpus", 8)
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 4096:
        raise RequestError(422, "gpus must be an integer from 2 to 4096")
    names = body.get("gpu", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or len(names) > _MAX_GPUS or not all(isinstance(n, str) for n in names):
        raise RequestError(422, f"gpu must be a GPU name or a list of at most {_MAX_GPUS} names")
    model, config = model_of(rest)
    image = config is None and resolve(model, local_files=False).image is not None
    if set(rest) - MODEL_KEYS - WORKLOAD_KEYS or image:
        return {"spec": None, "reason": "per-GPU layouts are charted for language models with workload options"}
    return Job("chart/parallel", model, {**options_for("estimate", rest), "count": count, "names": names}, config)


def _parallel_chart(j: Job) -> dict[str, Any]:
    opts = dict(j.options)
    count, names = opts.pop("count"), opts.pop("names")
    est = service.estimate(service.EstimateQuery.of(j.model, opts, j.config, local_files=False))
    ref = resolve(j.model, j.config, local_files=False)
    workload = make_workload(**{k: v for k, v in opts.items() if k in WORKLOAD_KEYS})
    try:
        rows = charts.parallel_rows(ref.language_spec("a per-GPU chart"), workload, count)
    except VramplanError as err:
        return {"spec": None, "reason": str(err)}
    if len(rows) < 2:
        return {"spec": None, "reason": "vramplan.parallel models fewer than two layouts for this workload"}
    return {"spec": charts.parallel_spec(ref.name, est.workload, count, rows, charts.capacities(names))}
