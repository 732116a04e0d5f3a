"""The service's commands other than ``estimate`` (:mod:`vramplan.service` is where they are called from):
``fit``, ``plan``, ``sweep``, ``export`` and ``measure``, their queries and results.

They live apart so that importing :mod:`vramplan.service` (every ``vramplan`` command, ``import vramplan``) does not
build their query classes; ``vramplan.service.FitQuery`` and the others are this module's, imported on first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._values import as_int
from .api import estimate as _estimate
from .api import image_options, layout_of, make_workload
from .errors import VramplanError, WorkloadError
from .result import Estimate
from .service import Query, _language_only, _serving_args
from .workload import Workload

if TYPE_CHECKING:
    from .charts import Sweep
    from .export import Export
    from .fit import FitResult, VisionFitResult
    from .hardware import GPU
    from .planner import PlanResult
    from .spec import ModelSpec

__all__ = ["ExportQuery", "FitQuery", "MeasureQuery", "Measured", "PlanQuery", "ServedFit", "SweepQuery", "config_of",
           "export", "fit", "gpu_pool", "measure", "plan", "sweep"]


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
