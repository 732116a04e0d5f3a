"""The typed service layer: one function per command, a frozen query in, a frozen result out.

``estimate / fit / plan / sweep / export / measure`` (and the ``models`` / ``gpus`` listings) are what the
CLI (:mod:`vramplan.cli`) and the web app (:mod:`vramplan.web`) both call; every result's ``to_dict()`` is
the command's ``--json`` output and the API's answer. Queries are built from plain options keyed as the
CLI's flags are (``Query.of(model, options)``, e.g. ``vars(namespace)`` or a JSON body): workload options
(:class:`~vramplan.workload.Workload` fields, image models' ``resolution`` and ``pipeline``) go to
``workload``, a command's own options to its fields, anything else is ignored. :func:`answer` runs a
command by name and returns its JSON object (what the web app's worker processes call).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ._values import as_int
from .api import IMAGE_OPTIONS, LAYOUT_OPTIONS, ModelRef, image_options, layout_of, make_workload, resolve
from .api import estimate as _estimate
from .errors import VramplanError, WorkloadError
from .result import Estimate
from .workload import Workload

if TYPE_CHECKING:
    from .charts import Sweep
    from .export import Export
    from .fit import FitResult, VisionFitResult
    from .hardware import GPU
    from .planner import PlanResult
    from .spec import ModelSpec

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


# ----------------------------------------------------------------------------------------- fit


@dataclass(frozen=True, slots=True)
class FitQuery(Query):
    gpu: str = ""
    gpu_memory_utilization: float | None = None  # None: 0.9 (vLLM's default)
    max_num_batched_tokens: int | None = None  # None: 8192
    serving: Mapping[str, Any] = field(default_factory=dict)  # --engine and its settings: adds ``serving``
    layout: Mapping[str, Any] = field(default_factory=dict)  # gpus, fsdp, zero, …: fit the most loaded GPU


@dataclass(frozen=True, slots=True)
class ServedFit:
    """``fit --engine``: the fit of the workload (None for a GGUF file) and the serving engine's memory."""

    model: str
    gpu: str
    fit: FitResult | None
    serving: Mapping[str, Any]
    launch_command: str | None = None  # the engine's launch command sized by this model (vramplan export)

    def to_dict(self) -> dict[str, Any]:
        extra = {"serving": dict(self.serving), "launch_command": self.launch_command}
        if self.fit is None:
            return {"model": self.model, "gpu": self.gpu, "fits": self.serving["fits"]} | extra
        return self.fit.to_dict() | extra


def fit(q: FitQuery) -> FitResult | VisionFitResult | ServedFit:
    """``vramplan fit``: fits?, headroom, largest batch and sequence (resolution for image models), KV budget;
    with ``serving["engine"]``, the serving engine's own memory model."""
    from .fit import check_fit, check_vision_fit
    from .hardware import get_gpu
    from .serving.cli import is_gguf, reject_gguf_flags, serving_section

    gpu, engine = get_gpu(q.gpu), q.serving.get("engine")
    if is_gguf(q.model) or engine == "llama.cpp":
        if not is_gguf(q.model) or engine not in (None, "llama.cpp") or not q.local_files:
            raise WorkloadError("llama.cpp serves GGUF files: give MODEL.gguf with --engine llama.cpp")
        return ServedFit(q.model, gpu.name, None, serving_section(_serving_args(q, engine="llama.cpp"), None, gpu,
                                                                  None, None),
                         _launch_command(q, "llama.cpp"))
    reject_gguf_flags(_serving_args(q))  # llama.cpp's --ctx/--parallel/… mean nothing for a Hugging Face model
    ref = q.ref()
    # fit's --tp/--pp size a serving engine (--engine); its training layout is data-parallel, ZeRO or FSDP
    training_layout = {k: v for k, v in q.layout.items() if k not in ("tp", "pp")}
    layout = layout_of(training_layout) if training_layout else None
    if layout is not None and any(as_int(k, q.layout.get(k) or 1) > 1 for k in ("tp", "pp")):
        raise WorkloadError("fit with --gpus and --tp/--pp: tensor and pipeline layouts are answered by vramplan "
                            "estimate --gpus N --tp …; fit's --tp/--pp size a serving engine (--engine)")
    if layout is not None and (engine or ref.image is not None):
        raise WorkloadError("fit with several GPUs (--gpus, --fsdp, …) is modelled for language models without "
                            "--engine; use vramplan estimate for the layout")
    if ref.image is not None:
        if engine:
            raise WorkloadError(f"--engine {engine} serves language models; {ref.name} is an image model")
        return check_vision_fit(q.model, gpu, **image_options(q.workload))
    w = make_workload(**_language_only(ref, q.workload))
    if engine and w.is_train:
        raise WorkloadError(f"--engine {engine} serves a model: add --task infer")
    spec = ref.language_spec("fit")
    util = q.gpu_memory_utilization if q.gpu_memory_utilization is not None else 0.9
    links = layout[1] if layout else None
    if layout is not None and links is not None and not q.layout.get("intra_node_link"):
        # the GPU's own link inside a node (NVLink generation, bridge or PCIe): communication and NCCL buffers
        from .parallel import links_for_gpu

        with contextlib.suppress(VramplanError):  # a user-described GPU without a catalog link
            links = links_for_gpu(gpu.name, layout[0].gpus_per_node, links.inter_node)
    result = check_fit(spec, w, gpu, name=ref.name, gpu_memory_utilization=util,
                       max_num_batched_tokens=q.max_num_batched_tokens or 8192,
                       layout=layout[0] if layout else None, links=links)
    if not engine:
        return result
    tp = as_int("tp", q.layout.get("tp") or 1)
    return ServedFit(ref.name, gpu.name, _engine_speed(result, spec, w, gpu, engine, tp),
                     serving_section(_serving_args(q), spec, gpu, w, result.total_bytes), _launch_command(q, engine))


def _launch_command(q: FitQuery, engine: str) -> str | None:
    """What ``vramplan export --engine ENGINE`` writes for the same model, GPU, layout and settings."""
    if engine not in ("vllm", "sglang", "llama.cpp"):
        return None
    tp, pp = (as_int(k, q.layout.get(k) or 1) for k in ("tp", "pp"))
    layout = {"gpus": tp * pp, "tp": tp, "pp": pp} if tp * pp > 1 else {}
    return export(ExportQuery(model=q.model, workload=q.workload, config=q.config, local_files=q.local_files,
                              engine=engine, layout=layout, gpu=q.gpu,
                              gpu_memory_utilization=q.gpu_memory_utilization,
                              max_num_batched_tokens=q.max_num_batched_tokens, serving=q.serving)).command


def _engine_speed(result: FitResult, spec: ModelSpec, w: Workload, gpu: GPU, engine: str, tp: int) -> FitResult:
    """``result`` with the prefill time and decode speed of ``engine`` (its per-layer per-token cost, CUDA graphs,
    tensor-parallel all-reduces with their latency: :func:`vramplan.perf.inference_time`), not transformers'."""
    from .perf import inference_time

    it = inference_time(spec, w, gpu, split=tp, engine=engine)
    note = (f"speed: {it.engine} prefill and decode" + (f", tensor-parallel over {tp} GPUs" if tp > 1 else "")
            + f" (vramplan.perf: decode {it.decode_overhead_s * 1e3:.2f} ms per step of engine overhead"
            + (f", {it.decode_allreduce_s * 1e3:.2f} ms of all-reduces" if tp > 1 else "") + ")")
    return dataclasses.replace(result, step_time_s=it.prefill_s, tokens_per_s=it.decode_tokens_per_s,
                               assumptions=(*result.assumptions, note))


# ----------------------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class PlanQuery(Query):
    """``workload`` options pin a dimension of the search (method, precision, …); absent, it is searched."""

    task: str = "finetune"
    budget_usd: float | None = None
    max_gpus: int = 8
    gpu_class: str = "any"
    gpu: tuple[str, ...] | None = None
    sort: str = "cost"
    tokens: int | None = None
    epochs: float | None = None
    dataset_tokens: int | None = None
    global_batch: int | None = None
    prices: str | None = None  # a JSON file of price overrides
    top: int = 20
    engine: str = "transformers"  # infer: the serving engine whose prefill/decode speed ranks the plans
    savers: bool = True  # search the memory savers (fused/chunked loss, activation offloading, paged optimizer)


def gpu_pool(names: Sequence[str] | None = None, prices: str | None = None) -> list[GPU]:
    """The GPU catalog (with ``prices`` overrides), or only the GPUs ``names``."""
    from .hardware import get_gpu, list_gpus, load_price_overrides, with_prices

    pool = list(list_gpus())
    if prices:
        pool = list(with_prices(pool, load_price_overrides(prices)))
    if names:
        from .perf.custom import resolve_gpu

        # custom:… entries describe GPUs the catalog lacks (vramplan.perf.custom); names pick catalog GPUs
        custom = [resolve_gpu(n) for n in names if n.strip().lower().startswith("custom:")]
        wanted = {get_gpu(n).name for n in names if not n.strip().lower().startswith("custom:")}
        pool = [g for g in pool if g.name in wanted] + custom
    return pool


def plan(q: PlanQuery) -> PlanResult:
    """``vramplan plan``: ranked plans (GPU, count, layout, settings) with time and cost, and recommendations."""
    from .planner import PlanRequest, PlanTask, SortKey, plan_vision
    from .planner import plan as plan_language
    from .workload import Attention, Method, Optimizer, Precision, WeightsQuant

    w = q.workload
    for flag in ("trainable_layers", "gradient_accumulation", "lora_alpha", "logits", "packing", "avg_seq_len",
                 "checkpointing", "loss_chunk", "rslora", "lora_modules_to_save", "optimizer_rank",
                 "galore_update_gap", "lora_dropout"):
        if w.get(flag) not in (None, False, 0.0) or (flag == "checkpointing" and w.get(flag) not in (None, "none")):
            hint = " (use --global-batch; the planner chooses micro-batch x accumulation)" \
                if flag == "gradient_accumulation" else ""
            raise WorkloadError(f"--{flag.replace('_', '-')} is not a plan option{hint}")
    task = PlanTask(q.task)
    method, quant = w.get("method"), w.get("weights_quant")
    if task is PlanTask.INFER and method not in (None, "full"):
        raise WorkloadError("--task infer serves the model; drop --method (use --weights-quant for 4/8-bit)")
    if task is not PlanTask.INFER and quant not in (None, "none"):
        raise WorkloadError("--weights-quant applies to --task infer; fine-tuning on 4-bit weights is --method qlora")
    ref = q.ref()
    common: dict[str, Any] = dict(
        task=task, global_batch=q.global_batch, max_gpus=q.max_gpus, gpu_class=q.gpu_class, sort=SortKey(q.sort),
        budget_usd=q.budget_usd, precisions=(Precision(w["precision"]),) if w.get("precision") else (),
        optimizers=(Optimizer(w["optimizer"]),) if w.get("optimizer") else (),
        gradient_checkpointing=w.get("gradient_checkpointing"),
        micro_batches=(w["batch_size"],) if w.get("batch_size") else (),
        attention=Attention(w.get("attention", "sdpa")), lora_rank=w.get("lora_rank", 16), top=q.top)
    pool = gpu_pool(q.gpu, q.prices)
    if ref.image is not None:
        for flag, given in (("tokens", q.tokens), ("epochs", q.epochs), ("dataset_tokens", q.dataset_tokens),
                            ("lora_targets", w.get("lora_targets"))):
            if given is not None:
                raise WorkloadError(f"--{flag.replace('_', '-')} is not a plan option for image models")
        for flag in ("trainer", "loss", "activation_offload"):
            if w.get(flag) not in (None, False):
                raise WorkloadError(f"--{flag.replace('_', '-')} is a language-model training option")
        if method not in (None, "full", "lora"):
            raise WorkloadError(f"--method {method} is not available for image models; use full or lora")
        req = PlanRequest(methods=(Method(method),) if method else (), **common)
        return plan_vision(q.model, req, gpus=pool, resolution=w.get("resolution"), pipeline=bool(w.get("pipeline")))
    _language_only(ref, w)
    targets = w.get("lora_targets")
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    from .workload import Loss, Trainer

    req = PlanRequest(
        trainer=Trainer(w.get("trainer") or "hf"), loss=Loss(w.get("loss") or "auto"),
        activation_offload=bool(w.get("activation_offload")), savers=None if q.savers else (),
        seq_len=w.get("seq_len", 2048), new_tokens=w.get("new_tokens", 256), tokens=q.tokens, epochs=q.epochs,
        dataset_tokens=q.dataset_tokens, methods=(Method(method),) if method and task is not PlanTask.INFER else (),
        weights_quants=(WeightsQuant(quant),) if quant else (),
        lora_targets=None if targets is None else tuple(targets), engine=q.engine or "transformers", **common)
    return plan_language(ref.language_spec("plan"), req, name=ref.name, gpus=pool)


# ----------------------------------------------------------------------------------------- sweep


@dataclass(frozen=True, slots=True)
class SweepQuery(Query):
    over: str = "seq-len"
    value_range: tuple[int, int] = (512, 8192)
    steps: int | None = None  # values evenly spaced on a log scale; None: doubling
    gpu: tuple[str, ...] = ()  # GPUs whose usable memory the sweep is checked against


def sweep(q: SweepQuery) -> Sweep:
    """``vramplan sweep``: memory against sequence length or batch size, and where each GPU runs out."""
    from .charts import SWEEP_AXES, capacities, sweep_estimates, sweep_values

    field_ = SWEEP_AXES.get(q.over, q.over)
    values = sweep_values(*q.value_range, q.steps)
    ref = q.ref()
    if ref.image is not None and field_ != "batch_size":
        raise WorkloadError(f"image models sweep over batch-size; {ref.name} has no {q.over}")
    base = dict(q.workload)
    if ref.image is None:
        w = make_workload(**_language_only(ref, base))
        base = {f: getattr(w, f) for f in Workload.__dataclass_fields__}

    def at(value: int) -> Estimate:
        return _estimate(ref, **{**base, field_: value})

    return sweep_estimates(at, ref.name, q.over, values, capacities(q.gpu))


# ----------------------------------------------------------------------------------------- export


@dataclass(frozen=True, slots=True)
class ExportQuery(Query):
    engine: str = "torchrun"
    layout: Mapping[str, Any] = field(default_factory=dict)
    gpu: str | None = None  # vllm/sglang/llama.cpp: the GPU that sizes the context and concurrency
    script: str = "train.py"
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    serving: Mapping[str, Any] = field(default_factory=dict)  # vllm/sglang/llama.cpp settings


def export(q: ExportQuery) -> Export:
    """``vramplan export``: the engine config (DeepSpeed, accelerate FSDP) or launch command for a layout."""
    from .export import Export
    from .export import export as write
    from .parallel import Layout
    from .serving.cli import export_gguf, is_gguf

    if is_gguf(q.model) or q.engine == "llama.cpp":
        if not is_gguf(q.model) or q.engine != "llama.cpp" or not q.local_files:
            raise WorkloadError("llama.cpp serves GGUF files: give MODEL.gguf with --engine llama.cpp")
        text, command = export_gguf(_serving_args(q))
        return Export(q.engine, text, command, "serve.sh")  # type: ignore[arg-type]
    ref = q.ref()
    spec = ref.language_spec("export")
    found = layout_of(q.layout)
    layout = found[0] if found else Layout()
    gpu_bytes, gpu_name = None, ""
    if q.gpu:
        from .hardware import get_gpu

        gpu = get_gpu(q.gpu)
        gpu_bytes, gpu_name = gpu.usable_memory_bytes, gpu.name
    serving = None
    if q.engine in ("vllm", "sglang"):
        from .serving.vllm import ServingConfig

        a = _serving_args(q)
        serving = ServingConfig(engine=q.engine, tp=layout.tp, pp=layout.pp, max_model_len=a.max_model_len,
                                gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
                                max_num_batched_tokens=a.max_num_batched_tokens, kv_cache_dtype=a.kv_cache_dtype,
                                enforce_eager=a.enforce_eager, engine_version=a.engine_version)
    model_id = ref.entry.hf_id if ref.entry is not None else q.model
    return write(q.engine, model_id, spec, make_workload(**_language_only(ref, q.workload)), layout,
                 gpu_memory_bytes=gpu_bytes, script=q.script, serving=serving, gpu_name=gpu_name)


# ----------------------------------------------------------------------------------------- measure


@dataclass(frozen=True, slots=True)
class MeasureQuery(Query):
    steps: int = 3


@dataclass(frozen=True, slots=True)
class Measured:
    """One real run on this machine's GPU beside the estimate of the same workload."""

    model: str
    workload: Workload
    measurement: Any  # vramplan.measure.Measurement
    estimate: Estimate

    def to_dict(self) -> dict[str, Any]:
        m, est = self.measurement, self.estimate
        return {"model": self.model, "device": m.device, "torch": m.torch_version,
                "measured_peak_allocated_bytes": m.peak_allocated_bytes,
                "measured_peak_reserved_bytes": m.peak_reserved_bytes,
                "measured_device_bytes": m.peak_reserved_bytes + m.cuda_context_bytes,
                "estimate_peak_allocated_bytes": est.peak_allocated_bytes, "estimate_total_bytes": est.total_bytes,
                "error": est.peak_allocated_bytes / m.peak_allocated_bytes - 1 if m.peak_allocated_bytes else None}


def config_of(model: str) -> tuple[dict[str, Any], str]:
    """A language model's config.json object and name (catalog entry, or a local file or folder)."""
    from .catalog import resolve_model

    _, entry = resolve_model(model)
    if entry is not None:
        return entry.config_dict(), entry.name
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise VramplanError(f"{model}: not a JSON object")
    return data, Path(path).parent.name or Path(path).stem


def measure(q: MeasureQuery) -> Measured:
    """``vramplan measure`` on one GPU: run the workload for real (random weights), beside its estimate."""
    from .estimator import estimate as estimate_spec
    from .hfconfig import spec_from_config
    from .measure import measure_workload

    if q.steps < 1:
        raise VramplanError("--steps must be at least 1")
    config, name = config_of(q.model)
    w = make_workload(**q.workload)
    est = estimate_spec(spec_from_config(dict(config), name=name), w)
    return Measured(name, w, measure_workload(config, w, steps=q.steps), est)


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

COMMANDS: Mapping[str, tuple[type[Query], Callable[[Any], Any]]] = {
    "estimate": (EstimateQuery, estimate), "fit": (FitQuery, fit), "plan": (PlanQuery, plan),
    "sweep": (SweepQuery, sweep), "export": (ExportQuery, export), "measure": (MeasureQuery, measure),
}


def answer(command: str, model: str, options: Mapping[str, Any], config: Mapping[str, Any] | None = None,
           local_files: bool = True) -> Any:
    """Run ``command`` on ``model`` with ``options`` (keyed as the CLI's flags); its JSON object."""
    query_type, run = COMMANDS[command]
    return run(query_type.of(model, options, config, local_files)).to_dict()
