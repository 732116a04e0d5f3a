"""The typed service layer: one function per command, a frozen query in, a frozen result out.

``estimate / fit / plan / sweep / export / measure`` (and the ``models`` / ``gpus`` listings) are what the
CLI (:mod:`vramplan.cli`) and the web app (:mod:`vramplan.web`) both call; every result's ``to_dict()`` is
the command's ``--json`` output and the API's answer. Queries are built from plain options keyed as the
CLI's flags are (``Query.of(model, options)``, e.g. ``vars(namespace)`` or a JSON body): workload options
(:class:`~vramplan.workload.Workload` fields, image models' ``resolution`` and ``pipeline``) go to
``workload``, a command's own options to its fields, anything else is ignored. :func:`answer` runs a
command by name and returns its JSON object (what the web app's worker processes call). The commands other than
``estimate`` are defined in :mod:`vramplan._commands` and reached through this module, imported when first used.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from ._values import as_int
from .api import IMAGE_OPTIONS, LAYOUT_OPTIONS, ModelRef, make_workload, resolve
from .api import estimate as _estimate
from .errors import WorkloadError
from .result import Estimate
from .workload import Workload

if TYPE_CHECKING:
    from ._commands import (
        ExportQuery,
        FitQuery,
        Measured,
        MeasureQuery,
        PlanQuery,
        ServedFit,
        SweepQuery,
        export,
        fit,
        measure,
        plan,
        sweep,
    )
    from ._commands import config_of as config_of
    from ._commands import gpu_pool as gpu_pool
    from .hardware import GPU

__all__ = ["COMMANDS", "EstimateQuery", "ExportQuery", "FitQuery", "MeasureQuery", "Measured", "ModelInfo", "PlanQuery",
           "Query", "ServedFit", "SweepQuery", "answer", "estimate", "export", "fit", "gpus", "measure", "models",
           "plan", "sweep"]

WORKLOAD_KEYS = frozenset(Workload.__dataclass_fields__) | frozenset(IMAGE_OPTIONS)
# A serving engine's settings (``fit --engine``, ``export --engine vllm|sglang|llama.cpp``; vramplan.serving).
_SERVING_DEFAULTS: Mapping[str, Any] = {
    "engine": None, "tp": 1, "pp": 1, "max_model_len": None, "max_num_seqs": None, "kv_cache_dtype": "auto",
    "enforce_eager": False, "engine_version": None, "ctx": None, "parallel": 1, "n_gpu_layers": None, "ubatch": 512,
    "no_flash_attn": False, "kv_unified": False}
SERVING_OPTIONS = frozenset(_SERVING_DEFAULTS)
# estimate's time section (--gpu, --gpu-spec, --engine, --efficiency, --attention-kernel; vramplan.perf)
TIME_OPTIONS = frozenset({"time_gpu", "gpu_spec", "engine", "efficiency", "attention_kernel"})
# engines that hold their own KV-cache pool: their memory is fit --engine's answer, not one generate() call
_POOLED_ENGINES = ("vllm", "sglang", "tensorrt-llm", "lmdeploy")
# fit, plan, sweep, export and measure live in vramplan._commands, imported on first use (module __getattr__, COMMANDS):
# building their query and result classes is ~5% of a ``vramplan estimate`` run, which needs none of them
_ELSEWHERE = frozenset({"ExportQuery", "FitQuery", "MeasureQuery", "Measured", "PlanQuery", "ServedFit", "SweepQuery",
                        "config_of", "export", "fit", "gpu_pool", "measure", "plan", "sweep"})


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        from . import _commands

        return getattr(_commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _serving_args(q: Any, **extra: Any) -> argparse.Namespace:
    """The serving settings of a query as :mod:`vramplan.serving.cli` reads them."""
    return argparse.Namespace(**{**_SERVING_DEFAULTS, **q.serving, "model": q.model, "gpu": q.gpu,
                                 "gpu_memory_utilization": q.gpu_memory_utilization,
                                 "max_num_batched_tokens": q.max_num_batched_tokens, **extra})


@dataclass(frozen=True, slots=True)
class Query:
    """A model and its workload options. ``config``: an uploaded config.json object, named ``model``."""

    model: str
    workload: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    local_files: bool = True  # whether ``model`` may name a local config.json (the web API: never)

    @classmethod
    def of(cls, model: str, options: Mapping[str, Any], config: Mapping[str, Any] | None = None,
           local_files: bool = True) -> Self:
        """The query for ``options`` keyed as the CLI's flags (``None`` values: the default)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        own = fields - {"model", "workload", "config", "layout", "serving", "timing", "local_files"}
        kw: dict[str, Any] = {k: v for k, v in options.items() if k in own and v is not None}
        kw["workload"] = {k: v for k, v in options.items() if k in WORKLOAD_KEYS - own and v is not None}
        for group, keys in (("layout", LAYOUT_OPTIONS), ("serving", SERVING_OPTIONS), ("timing", TIME_OPTIONS)):
            if group in fields:
                kw[group] = {k: v for k, v in options.items() if k in keys and k not in own and v is not None}
        return cls(model=model, config=config, local_files=local_files, **kw)

    def ref(self) -> ModelRef:
        return resolve(self.model, self.config, local_files=self.local_files)


def _language_only(ref: ModelRef, workload: Mapping[str, Any]) -> dict[str, Any]:
    for key in IMAGE_OPTIONS:
        if workload.get(key):
            raise WorkloadError(f"--{key} applies to image models; {ref.name} is a language model")
    return {k: v for k, v in workload.items() if k not in IMAGE_OPTIONS}


# ----------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True, slots=True)
class EstimateQuery(Query):
    layout: Mapping[str, Any] = field(default_factory=dict)  # gpus, zero, fsdp, tp, pp, …: adds ``per_gpu``
    timing: Mapping[str, Any] = field(default_factory=dict)  # time_gpu / gpu_spec, engine, …: adds ``time``


def estimate(q: EstimateQuery) -> Estimate:
    """``vramplan estimate``: peak memory by kind and phase (``per_gpu`` with a layout, ``time`` with a GPU)."""
    ref = q.ref()
    est = _estimate(ref, **q.workload, **q.layout)
    timing = _time_of(q, ref, est)
    if timing is None:
        return est
    engine = timing.get("engine")
    if engine in _POOLED_ENGINES and est.per_gpu is None:
        est = dataclasses.replace(est, warnings=(*est.warnings, _pooled_note(ref.name, engine, timing["gpu"])))
    return dataclasses.replace(est, time=timing)


def _time_of(q: EstimateQuery, ref: ModelRef, est: Estimate) -> dict[str, Any] | None:
    """The ``time`` object (:func:`vramplan.perf.report.time_object`) of ``q`` on its GPU; None without one."""
    t = q.timing
    name, spec_file = t.get("time_gpu"), t.get("gpu_spec")
    if not name and not spec_file:
        for flag in ("engine", "efficiency", "attention_kernel"):
            if t.get(flag) is not None:
                why = "the MFU is relative to a GPU's peak" if flag == "efficiency" else "it sets the time section"
                raise WorkloadError(f"--{flag.replace('_', '-')} needs --gpu NAME (or --gpu-spec FILE): {why}")
        return None
    if spec_file and not q.local_files:
        raise WorkloadError("gpu_spec names a file on this machine: describe the GPU inline with "
                            "gpu=custom:memory=…,bf16_tflops=…,bandwidth=…")
    from .perf.custom import resolve_gpu
    from .perf.efficiency import ENGINES
    from .perf.report import time_object, untimed

    engine = t.get("engine")
    if engine is not None and engine not in ENGINES:
        raise WorkloadError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    gpu = resolve_gpu(name, spec_file)
    if ref.image is not None:
        return untimed(gpu.name, 1, f"time is modelled for language models; {ref.name} is an image model")
    layout = q.layout
    tp, pp = (as_int(k, layout.get(k) or 1) for k in ("tp", "pp"))
    gpus = as_int("gpus", layout.get("gpus") or tp * pp)
    sharded = bool(layout.get("fsdp")) or bool(layout.get("zero"))
    comm = None
    if est.per_gpu is not None and gpus > 1:
        comm = float(est.per_gpu.to_dict().get("communication", {}).get("bytes_per_step") or 0) or None
    spec = ref.language_spec("a time estimate")
    w = make_workload(**_language_only(ref, q.workload))
    return time_object(spec, w, gpu, gpus=gpus, tp=tp, pp=pp, sharded=sharded, comm_bytes_per_step=comm,
                       engine=engine, measured_mfu=t.get("efficiency"),
                       attention_kernel=t.get("attention_kernel") or "flash2")


def _pooled_note(model: str, engine: str, gpu: str) -> str:
    """What the memory of an estimate means when the time is a serving engine's."""
    fit = f"; its pool: vramplan fit {model} --gpu {gpu} --task infer --engine {engine}" \
        if engine in ("vllm", "sglang") else ""
    return (f"the memory above is one transformers generate() call; {engine} reserves a KV-cache pool up to its "
            f"memory utilization (vLLM/SGLang default 0.9 of the GPU){fit}")


# ----------------------------------------------------------------------------------------- listings


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model of the catalogs: ``kind`` is ``llm`` or ``image``."""

    name: str
    kind: str
    hf_id: str
    family: str
    parameters: int
    aliases: tuple[str, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hf_id": self.hf_id, "family": self.family, "parameters": self.parameters,
                "aliases": list(self.aliases), "source": self.source, "kind": self.kind}


def models(kind: str | None = None, family: str | None = None) -> tuple[ModelInfo, ...]:
    """Every model ``estimate`` takes by name: the language models, then the image models (their VAEs and text
    encoders are pipeline components, not listed). ``kind``: ``llm`` or ``image``; ``family``: one family."""
    from .catalog import list_models
    from .vision import list_vision_models

    if kind not in (None, "llm", "image"):
        raise WorkloadError(f"kind {kind!r} is not one of: llm, image")
    out: list[ModelInfo] = []
    if kind in (None, "llm"):
        out += [ModelInfo(m.name, "llm", m.hf_id, m.spec.family, m.params, (*m.aliases, *m.variants), m.source)
                for m in list_models()]
    if kind in (None, "image"):
        out += [ModelInfo(e.name, "image", e.hf_id, f"image: {e.kind}", e.params, e.aliases, e.source)
                for e in list_vision_models() if e.estimable]
    return tuple(m for m in out if not family or m.family == family)


def gpus(gpu_class: str | None = None, min_memory_gib: float | None = None) -> tuple[GPU, ...]:
    """The GPU catalog, optionally one class and a least memory."""
    from .hardware import list_gpus
    from .units import GiB

    min_mem = int(min_memory_gib * GiB) if min_memory_gib is not None else None
    return tuple(list_gpus(cls=gpu_class, min_memory_bytes=min_mem))


def gpu_row(g: GPU) -> dict[str, Any]:
    """A GPU as ``vramplan gpus --json`` lists it."""
    return {"name": g.name, "display_name": g.display_name, "class": g.gpu_class, "memory_bytes": g.memory_bytes,
            "bf16_tflops": g.peak_tflops("bf16"), "price_usd_per_hour": g.price.on_demand}


# ----------------------------------------------------------------------------------------- by name

class _Commands(Mapping[str, tuple[type[Query], Callable[[Any], Any]]]):
    """Each command's query type and function by name; those of :mod:`vramplan._commands` imported when first
    looked up."""

    _NAMES = ("estimate", "fit", "plan", "sweep", "export", "measure")

    def __getitem__(self, name: str) -> tuple[type[Query], Callable[[Any], Any]]:
        if name == "estimate":
            return EstimateQuery, estimate
        if name not in self._NAMES:
            raise KeyError(name)
        from . import _commands

        return getattr(_commands, f"{name.capitalize()}Query"), getattr(_commands, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


COMMANDS: Mapping[str, tuple[type[Query], Callable[[Any], Any]]] = _Commands()


def answer(command: str, model: str, options: Mapping[str, Any], config: Mapping[str, Any] | None = None,
           local_files: bool = True) -> Any:
    """Run ``command`` on ``model`` with ``options`` (keyed as the CLI's flags); its JSON object."""
    query_type, run = COMMANDS[command]
    return run(query_type.of(model, options, config, local_files)).to_dict()
