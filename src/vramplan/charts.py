"""Chart definitions shared by the web page and the CLI: Vega-Lite specifications built from estimates.

One definition, two renderers: the web page draws these specs with vega-embed (the JavaScript bundle
that ``vl-convert-python`` ships), and ``vramplan estimate --plot`` / ``vramplan sweep --plot`` render
the very same specs to SVG or PNG with ``vl-convert-python`` (Vega in an embedded runtime, resvg for
PNG). Building a spec needs only the standard library; rendering needs the ``[web]`` extra.

Charts:

* :func:`breakdown_spec` — the stacked breakdown by memory kind: what nvidia-smi shows at the peak,
  and the allocated peak of every phase.
* :func:`sweep_spec` — memory against sequence length or batch size, stacked by kind, with the usable
  memory of chosen GPUs as lines: where each one runs out of memory.
* :func:`parallel_spec` — memory of the most loaded GPU under each parallel layout
  (from :mod:`vramplan.parallel`, for the layouts it supports).

Colours are fixed per :class:`~vramplan.kinds.MemoryKind`, so a kind has one colour in every chart.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VramplanError, WorkloadError
from .kinds import KIND_LABELS as _KIND_LABELS
from .kinds import MemoryKind
from .units import GiB

if TYPE_CHECKING:
    from .hardware import GPU
    from .result import Estimate
    from .spec import ModelSpec
    from .workload import Workload

__all__ = [
    "KIND_COLORS",
    "KIND_LABELS",
    "SWEEP_AXES",
    "WEB_EXTRA_HINT",
    "Capacity",
    "ParallelRow",
    "Sweep",
    "SweepPoint",
    "breakdown_spec",
    "capacities",
    "headroom_table",
    "parallel_rows",
    "parallel_spec",
    "plot_estimate",
    "plot_sweep",
    "render",
    "run_sweep",
    "sweep_estimates",
    "sweep_spec",
    "sweep_values",
]

WEB_EXTRA_HINT = "pip install 'vramplan[web]'"
_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"  # an identifier only: nothing is fetched
_WIDTH = 640
_MAX_SWEEP_POINTS = 64

KIND_LABELS: Mapping[MemoryKind, str] = _KIND_LABELS
# Model states in blues and greens, what the batch costs in reds and purple, fixed overheads in browns/greys.
KIND_COLORS: Mapping[MemoryKind, str] = {
    MemoryKind.WEIGHTS: "#4c78a8", MemoryKind.MASTER_WEIGHTS: "#9ecae9", MemoryKind.GRADIENTS: "#54a24b",
    MemoryKind.OPTIMIZER_STATE: "#88d27a", MemoryKind.ACTIVATIONS: "#e45756", MemoryKind.LOGITS_LOSS: "#ff9d98",
    MemoryKind.KV_CACHE: "#b279a2", MemoryKind.QUANTIZATION_CONSTANTS: "#72b7b2",
    MemoryKind.WORKSPACE: "#eeca3b", MemoryKind.CUDA_CONTEXT: "#9d755d", MemoryKind.ALLOCATOR_SLACK: "#bab0ac",
    MemoryKind.NCCL_BUFFERS: "#6b6ecf",
}
_GPU_COLORS = ("#1f1f1f", "#d62728", "#7b4ea3", "#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2")

# Shared look: no frame, readable type on the page and in a PNG, long legend labels (GPU names) kept whole.
_CONFIG: Mapping[str, Any] = {
    "view": {"stroke": None},
    "title": {"fontSize": 15, "subtitleFontSize": 12, "subtitleColor": "#5d6678"},
    "axis": {"labelFontSize": 11, "titleFontSize": 12},
    "legend": {"labelFontSize": 11, "titleFontSize": 12, "labelLimit": 420},
}

# The axes a sweep can run over: CLI spelling -> workload field.
SWEEP_AXES: Mapping[str, str] = {"seq-len": "seq_len", "batch-size": "batch_size"}
_AXIS_TITLES = {"seq_len": "sequence length (tokens)", "batch_size": "batch size"}


def _gib(n: int) -> float:
    return round(n / GiB, 3)


def _describe(workload: Mapping[str, Any]) -> str:
    """One line naming the workload, for chart subtitles."""
    w = workload
    if w.get("resolution") is not None or w.get("seq_len") is None:  # an image model: pixels, not tokens
        side = f" × {w['resolution']} px" if w.get("resolution") is not None else ""
        job = "inference" if w.get("task") == "infer" else f"training · {w.get('method')}"
        ckpt = " · checkpointing" if w.get("gradient_checkpointing") else ""
        return f"{job} · {w.get('precision')}{ckpt} · batch {w.get('batch_size')}{side}"
    if w.get("task") == "infer":
        quant = f" · weights {w['weights_quant']}" if w.get("weights_quant", "none") != "none" else ""
        return (f"inference · {w.get('precision')}{quant} · batch {w.get('batch_size')} × "
                f"{w.get('seq_len')} prompt + {w.get('new_tokens')} new tokens")
    ckpt = " · checkpointing" if w.get("gradient_checkpointing") else ""
    return (f"training · {w.get('method')} · {w.get('precision')} · {w.get('optimizer')}{ckpt} · "
            f"batch {w.get('batch_size')} × {w.get('seq_len')} tokens")


def _color_scale(kinds: Sequence[MemoryKind]) -> dict[str, Any]:
    return {"domain": [KIND_LABELS[k] for k in kinds], "range": [KIND_COLORS[k] for k in kinds]}


def _kind_rows(row: str, by_kind: Mapping[MemoryKind, int], **extra: Any) -> list[dict[str, Any]]:
    """One datum per non-zero kind; ``description`` is what screen readers (and the page's tests) read."""
    return [{"row": row, "kind": k.value, "label": KIND_LABELS[k], "order": i, "bytes": v, "gib": _gib(v),
             "description": f"{row} — {KIND_LABELS[k]}: {_gib(v)} GiB", **extra}
            for i, (k, v) in enumerate((k, by_kind.get(k, 0)) for k in MemoryKind) if v > 0]


def _kind_bar(y: dict[str, Any], x_title: str, kinds: Sequence[MemoryKind], horizontal: bool,
              extra_tooltip: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    value = {"field": "gib", "type": "quantitative", "stack": "zero", "title": x_title}
    return {
        "mark": {"type": "bar"},
        "encoding": {
            ("y" if horizontal else "x"): y,
            ("x" if horizontal else "y"): value,
            "color": {"field": "label", "type": "nominal", "scale": _color_scale(kinds),
                      "legend": {"title": "memory kind", "orient": "bottom", "columns": 4}},
            "order": {"field": "order", "type": "quantitative"},
            "description": {"field": "description", "type": "nominal"},
            "tooltip": [{"field": "row", "title": "bar"}, {"field": "label", "title": "kind"},
                        {"field": "gib", "title": "GiB", "format": ".2f"}, *extra_tooltip],
        },
    }


# ----------------------------------------------------------------------------------------- breakdown


def breakdown_spec(est: Estimate | Mapping[str, Any]) -> dict[str, Any]:
    """Stacked bars by kind: the nvidia-smi total at the peak, then the allocated peak of each phase.

    Takes an :class:`Estimate` or its JSON form (what ``vramplan estimate --json`` prints), so any
    estimator with that contract gets the same chart.
    """
    data = est if isinstance(est, Mapping) else est.to_dict()
    total_row = "total (nvidia-smi)"
    rows = _kind_rows(total_row, _by_kind(data["breakdown"]))
    order = [total_row]
    peak_phase = data.get("peak_phase")
    for phase, breakdown in data.get("phase_breakdowns", {}).items():
        name = f"{phase} (peak)" if phase == peak_phase else str(phase)
        order.append(name)
        rows += _kind_rows(name, _by_kind(breakdown))
    kinds = [k for k in MemoryKind if any(r["kind"] == k.value for r in rows)]
    y = {"field": "row", "type": "nominal", "sort": order, "title": None}
    return {
        "$schema": _SCHEMA,
        "title": {"text": f"{data['model']}: {data['total_bytes'] / GiB:,.2f} GiB on the GPU, peak in {peak_phase}",
                  "subtitle": _describe(data.get("workload", {})), "anchor": "start"},
        "width": _WIDTH, "height": {"step": 30},
        "data": {"name": "breakdown", "values": rows},
        "layer": [
            _kind_bar(y, "GiB", kinds, horizontal=True),
            {"mark": {"type": "text", "align": "left", "dx": 4},
             "encoding": {"y": y, "x": {"aggregate": "sum", "field": "gib", "type": "quantitative"},
                          "text": {"aggregate": "sum", "field": "gib", "type": "quantitative", "format": ",.2f"}}},
        ],
        "config": _CONFIG,
    }


def _by_kind(breakdown: Mapping[str, int]) -> dict[MemoryKind, int]:
    """A JSON breakdown (kind value -> bytes) as a mapping by kind; unknown keys are refused."""
    try:
        return {MemoryKind(k): int(v) for k, v in breakdown.items()}
    except ValueError as err:
        raise VramplanError(f"not a breakdown by memory kind: {err}") from None


# ----------------------------------------------------------------------------------------- capacities


@dataclass(frozen=True, slots=True)
class Capacity:
    """One GPU's usable memory: what CUDA reports where observed, else the marketed capacity."""

    name: str
    display_name: str
    gpu_class: str
    usable_memory_bytes: int

    @classmethod
    def of(cls, gpu: GPU) -> Capacity:
        return cls(gpu.name, gpu.display_name, gpu.gpu_class, gpu.usable_memory_bytes)


def capacities(names: Sequence[str]) -> tuple[Capacity, ...]:
    """Catalog GPUs by name (near misses raise with suggestions), duplicates dropped, order kept."""
    from .hardware import get_gpu

    out: dict[str, Capacity] = {}
    for name in names:
        gpu = get_gpu(name)
        out.setdefault(gpu.name, Capacity.of(gpu))
    return tuple(out.values())


def headroom_table(total_bytes: int, gpu_class: str | None = None) -> list[dict[str, Any]]:
    """Every catalog GPU (optionally one class) against one estimate: fits, and headroom = usable − total."""
    from .hardware import list_gpus

    return [{"name": g.name, "display_name": g.display_name, "class": g.gpu_class,
             "usable_memory_bytes": g.usable_memory_bytes, "fits": total_bytes <= g.usable_memory_bytes,
             "headroom_bytes": g.usable_memory_bytes - total_bytes}
            for g in list_gpus(cls=gpu_class)]


def _capacity_layer(labelled: Sequence[tuple[str, Capacity]], axis: str) -> dict[str, Any]:
    """Dashed lines at each GPU's usable memory, one colour and legend entry per GPU."""
    rows = [{"gpu": label, "name": c.name, "gib": _gib(c.usable_memory_bytes)} for label, c in labelled]
    return {
        "data": {"name": "capacity", "values": rows},
        "mark": {"type": "rule", "strokeDash": [6, 4], "strokeWidth": 2},
        "encoding": {
            axis: {"field": "gib", "type": "quantitative"},
            "color": {"field": "gpu", "type": "nominal",
                      "scale": {"domain": [r["gpu"] for r in rows],
                                "range": [_GPU_COLORS[i % len(_GPU_COLORS)] for i in range(len(rows))]},
                      "legend": {"title": "usable GPU memory", "orient": "bottom", "direction": "vertical"}},
            "tooltip": [{"field": "gpu", "title": "GPU"}, {"field": "gib", "title": "GiB", "format": ".2f"}],
        },
    }


# ----------------------------------------------------------------------------------------- sweeps


def sweep_values(lo: int, hi: int, steps: int | None = None) -> tuple[int, ...]:
    """The values of a sweep from ``lo`` to ``hi`` (both included).

    Without ``steps``: ``lo`` doubled until ``hi``. With ``steps``: that many values evenly spaced on a
    log scale, rounded to integers (duplicates dropped). Memory grows with both axes, so a log scale
    shows the small and the large end alike.
    """
    if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int):
        raise WorkloadError("a sweep range needs two integers A:B")
    if lo < 1 or hi < lo:
        raise WorkloadError(f"sweep range {lo}:{hi} is empty; use 1 <= A <= B")
    if steps is not None and not 1 <= steps <= _MAX_SWEEP_POINTS:
        raise WorkloadError(f"sweep steps = {steps} is out of range; use 1..{_MAX_SWEEP_POINTS}")
    if steps is None:
        values = []
        v = lo
        while v < hi:
            values.append(v)
            v *= 2
        values.append(hi)
    elif steps == 1:
        values = [lo]
    else:
        ratio = math.log(hi / lo) / (steps - 1)
        values = [round(lo * math.exp(ratio * i)) for i in range(steps - 1)] + [hi]
    out = tuple(dict.fromkeys(values))
    if len(out) > _MAX_SWEEP_POINTS:
        raise WorkloadError(f"sweep of {len(out)} values is too long; at most {_MAX_SWEEP_POINTS}")
    return out


@dataclass(frozen=True, slots=True)
class SweepPoint:
    value: int
    estimate: Estimate


@dataclass(frozen=True, slots=True)
class Sweep:
    """Estimates of one workload with one field (``seq_len`` or ``batch_size``) swept."""

    model: str
    field: str
    points: tuple[SweepPoint, ...]
    gpus: tuple[Capacity, ...] = ()
    stopped: str | None = None  # why the sweep ended before its last value (the estimator's message)

    def oom_from(self, gpu: Capacity) -> int | None:
        """The first swept value whose nvidia-smi total exceeds the GPU's usable memory."""
        return next((p.value for p in self.points if p.estimate.total_bytes > gpu.usable_memory_bytes), None)

    def fits_up_to(self, gpu: Capacity) -> int | None:
        """The last swept value that fits the GPU (memory grows with the swept field)."""
        fitting = [p.value for p in self.points if p.estimate.total_bytes <= gpu.usable_memory_bytes]
        return fitting[-1] if fitting else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract of ``vramplan sweep --json`` and ``POST /api/sweep``."""
        return {
            "model": self.model,
            "over": self.field,
            "values": [p.value for p in self.points],
            "workload": dict(self.points[0].estimate.workload) if self.points else {},
            "points": [{"value": p.value, "peak_allocated_bytes": p.estimate.peak_allocated_bytes,
                        "total_bytes": p.estimate.total_bytes, "peak_phase": p.estimate.peak_phase.value,
                        "breakdown": p.estimate.breakdown.as_dict()} for p in self.points],
            "gpus": [{"name": g.name, "display_name": g.display_name, "class": g.gpu_class,
                      "usable_memory_bytes": g.usable_memory_bytes, "fits_up_to": self.fits_up_to(g),
                      "oom_from": self.oom_from(g)} for g in self.gpus],
            "stopped": self.stopped,
        }


def run_sweep(spec: ModelSpec, name: str, workload: Workload, over: str, values: Sequence[int],
              gpus: Sequence[Capacity] = ()) -> Sweep:
    """Estimate ``workload`` at each value of ``over`` (``seq-len``/``seq_len`` or ``batch-size``/``batch_size``)."""
    from .estimator import estimate

    field = SWEEP_AXES.get(over, over)
    return sweep_estimates(lambda v: estimate(spec, workload.with_(**{field: v}), name=name), name, over, values,
                           gpus)


def sweep_estimates(estimate_at: Callable[[int], Estimate], name: str, over: str, values: Sequence[int],
                    gpus: Sequence[Capacity] = ()) -> Sweep:
    """The :class:`Sweep` of ``estimate_at(value)`` over ``values`` of ``over`` (any model: the service passes
    the front door's estimate).

    The sweep stops at the first value the estimator refuses (a model's fixed position table, the
    token limit) and says why in ``stopped``; it raises if the first value is refused.
    """
    field = SWEEP_AXES.get(over, over)
    if field not in SWEEP_AXES.values():
        raise WorkloadError(f"cannot sweep over {over!r}; use one of {', '.join(SWEEP_AXES)}")
    points: list[SweepPoint] = []
    stopped = None
    for value in values:
        try:
            est = estimate_at(value)
        except WorkloadError as err:
            if not points:
                raise
            stopped = f"stopped before {field} = {value}: {err}"
            break
        points.append(SweepPoint(value, est))
    return Sweep(name, field, tuple(points), tuple(gpus), stopped)


def sweep_spec(sweep: Sweep) -> dict[str, Any]:
    """Stacked bars by kind for each swept value, with each GPU's usable memory as a dashed line."""
    field = sweep.field
    rows: list[dict[str, Any]] = []
    for p in sweep.points:
        rows += _kind_rows(str(p.value), dict(p.estimate.breakdown.bytes_by_kind), value=p.value,
                           total_gib=_gib(p.estimate.total_bytes))
    kinds = [k for k in MemoryKind if any(r["kind"] == k.value for r in rows)]
    x = {"field": "value", "type": "ordinal", "title": _AXIS_TITLES[field], "axis": {"labelAngle": 0}}
    layers: list[dict[str, Any]] = [
        _kind_bar(x, "GiB (nvidia-smi)", kinds, horizontal=False,
                  extra_tooltip=[{"field": "total_gib", "title": "total GiB", "format": ".2f"}]),
    ]
    if sweep.gpus:
        labelled = []
        for g in sweep.gpus:
            oom = sweep.oom_from(g)
            where = "fits every value" if oom is None else f"out of memory from {oom:,}"
            labelled.append((f"{g.display_name} ({g.usable_memory_bytes / GiB:,.1f} GiB): {where}", g))
        layers.append(_capacity_layer(labelled, axis="y"))
    workload = sweep.points[0].estimate.workload if sweep.points else {}
    described = {**workload, field: "N"}
    subtitle = [_describe(described)]
    if sweep.stopped:
        subtitle.append(sweep.stopped)
    return {
        "$schema": _SCHEMA,
        "title": {"text": f"{sweep.model}: memory vs {_AXIS_TITLES[field]}", "subtitle": subtitle, "anchor": "start"},
        "width": _WIDTH, "height": 320,
        "data": {"name": "sweep", "values": rows},
        "layer": layers,
        "resolve": {"scale": {"color": "independent"}},
        "config": _CONFIG,
    }


# ----------------------------------------------------------------------------------------- parallel layouts


@dataclass(frozen=True, slots=True)
class ParallelRow:
    """Memory of the most loaded GPU under one layout."""

    label: str
    total_bytes: int
    breakdown: Mapping[MemoryKind, int]


# Candidate layouts for a GPU count: label, and Layout keyword arguments (``n`` stands for the count).
_LAYOUTS: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("data parallel (DDP)", {}),
    ("ZeRO-1", {"zero": 1}), ("ZeRO-2", {"zero": 2}), ("ZeRO-3", {"zero": 3}),
    ("FSDP full shard", {"fsdp": "full"}), ("FSDP grad-op", {"fsdp": "grad-op"}),
    ("tensor parallel", {"tp": "n"}), ("pipeline parallel", {"pp": "n", "micro_batches": "n"}),
    ("ZeRO-3 + optimizer offload", {"zero": 3, "offload": "optimizer"}),
)


def parallel_rows(spec: ModelSpec, workload: Workload, gpus: int) -> list[ParallelRow]:
    """Per-GPU memory under each layout :mod:`vramplan.parallel` supports for ``gpus`` GPUs.

    Layouts it refuses (not modelled yet, or impossible for this model) are left out; an empty list
    when the module is absent.
    """
    try:
        from . import parallel
    except ModuleNotFoundError as exc:
        if exc.name != "vramplan.parallel":
            raise
        return []
    rows: list[ParallelRow] = []
    for label, kwargs in _LAYOUTS:
        args: dict[str, Any] = {k: gpus if v == "n" else v for k, v in kwargs.items()}
        if "fsdp" in args:
            args["fsdp"] = parallel.FSDPMode(args["fsdp"])
        if "offload" in args:
            args["offload"] = parallel.Offload(args["offload"])
        try:
            layout = parallel.Layout(gpus=gpus, **args)
            est = parallel.estimate_parallel(spec, workload, layout)
        except (VramplanError, TypeError, ValueError, AttributeError):  # a layout not modelled (yet)
            continue
        rows.append(ParallelRow(label, est.total_bytes, dict(est.breakdown.bytes_by_kind)))
    return rows


def parallel_spec(model: str, workload: Mapping[str, Any], gpus: int, rows: Sequence[ParallelRow],
                  capacity: Sequence[Capacity] = ()) -> dict[str, Any]:
    """Horizontal stacked bars: the most loaded GPU's memory under each layout."""
    data: list[dict[str, Any]] = []
    for r in rows:
        data += _kind_rows(r.label, r.breakdown, total_gib=_gib(r.total_bytes))
    kinds = [k for k in MemoryKind if any(d["kind"] == k.value for d in data)]
    y = {"field": "row", "type": "nominal", "sort": [r.label for r in rows], "title": None}
    layers: list[dict[str, Any]] = [_kind_bar(y, "GiB per GPU (most loaded)", kinds, horizontal=True)]
    if capacity:
        layers.append(_capacity_layer([(f"{c.display_name} ({c.usable_memory_bytes / GiB:,.1f} GiB)", c)
                                       for c in capacity], axis="x"))
    return {
        "$schema": _SCHEMA,
        "title": {"text": f"{model}: memory per GPU on {gpus} GPUs, by layout", "subtitle": _describe(workload),
                  "anchor": "start"},
        "width": _WIDTH, "height": {"step": 30},
        "data": {"name": "parallel", "values": data},
        "layer": layers,
        "resolve": {"scale": {"color": "independent"}},
        "config": _CONFIG,
    }


# ----------------------------------------------------------------------------------------- rendering


_CHILD = ("import json, sys, vl_convert; kw = json.load(sys.stdin); out = getattr(vl_convert, sys.argv[1])(**kw); "
          "sys.stdout.buffer.write(out if isinstance(out, bytes) else out.encode())")


def vl_convert_call(function: str, **kwargs: Any) -> bytes:
    """``vl_convert.<function>(**kwargs)`` in a child process, its output as bytes.

    vl-convert runs Vega in V8, which reserves a large virtual address range when it starts and aborts the
    whole process when it cannot (``ulimit -v`` / ``prlimit --as`` below about 64 GiB): in a child, that is
    an error message here instead of the end of this process (the CLI, or the web server).
    """
    import subprocess
    import sys

    if importlib.util.find_spec("vl_convert") is None:
        raise VramplanError(f"charts need vl-convert-python: {WEB_EXTRA_HINT}")
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, function], input=json.dumps(kwargs).encode(),
                              capture_output=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VramplanError(f"the chart renderer (vl-convert) did not run: {err}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()] or ["?"]
        why = next((ln for ln in lines if "Fatal" in ln or "Error" in ln), lines[-1])
        raise VramplanError(f"the chart renderer (vl-convert's V8) failed ({why[:160]}); it needs a large virtual "
                            "address space: check ulimit -v (64 GiB or more); the numbers are unaffected")
    return proc.stdout


def render(spec: Mapping[str, Any], path: str | Path, scale: float = 2.0) -> Path:
    """Write a chart to ``path``: SVG or PNG by the file's extension (needs ``vl-convert-python``)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise VramplanError(f"cannot plot to {out.name!r}: use a file name ending in .png or .svg")
    if suffix == ".svg":
        data = vl_convert_call("vegalite_to_svg", vl_spec=dict(spec))
    else:
        data = vl_convert_call("vegalite_to_png", vl_spec=dict(spec), scale=scale)
    try:
        out.write_bytes(data)
    except OSError as err:
        raise VramplanError(f"cannot write {out}: {err.strerror or err}") from None
    return out


def plot_estimate(est: Estimate | Mapping[str, Any], path: str | Path) -> Path:
    """``vramplan estimate … --plot FILE``: the breakdown chart of one estimate (or of its JSON form)."""
    return render(breakdown_spec(est), path)


def plot_sweep(sweep: Sweep, path: str | Path) -> Path:
    """``vramplan sweep … --plot FILE``: memory against the swept field, with GPU capacity lines."""
    return render(sweep_spec(sweep), path)
