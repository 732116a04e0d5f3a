"""``vramplan fit`` and ``vramplan plan``: which GPU, how many, how long, how much money.

Registered by :mod:`vramplan.cli`. Everything heavy is imported inside the handlers so that
``vramplan --help`` stays instant; numbers come from :func:`vramplan.service.fit` and
:func:`vramplan.service.plan`, and are only formatted here.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .._argtypes import fraction, non_negative_float, positive_float, positive_int
from ..serving.cli import add_serving_flags
from ._flags import add_image_flags, add_parallel_flags, add_workload_flags, options

if TYPE_CHECKING:
    from ..fit import FitResult, VisionFitResult
    from ..planner import Plan, PlanResult

__all__ = ["register"]

def register(sub: Any) -> None:
    """Add the ``fit`` and ``plan`` sub-commands to ``sub`` (argparse sub-parsers)."""
    f = sub.add_parser("fit", help="does a workload fit a GPU; largest batch, longest sequence, concurrent "
                                   "sequences (vLLM KV budget)")
    f.add_argument("model", metavar="MODEL", help="catalog name (vramplan models), HF id, or path to a config.json")
    f.add_argument("--gpu", required=True, help="GPU name (vramplan gpus lists them)")
    add_workload_flags(f)
    f.add_argument("--gpu-memory-utilization", type=fraction, default=None,
                   help="inference: share of GPU memory a vLLM-style server reserves (default 0.9; SGLang: "
                        "mem_fraction_static)")
    f.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="inference: tokens of the profiling forward that sizes the KV budget (default 8192; with "
                        "--engine vllm: vLLM's default for the GPU)")
    add_serving_flags(f)
    add_image_flags(f)
    add_parallel_flags(f, skip=("tp", "pp"))  # --tp/--pp are the serving engine's here
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(handler=_cmd_fit)

    p = sub.add_parser("plan", conflict_handler="resolve",
                       help="the cheapest (or fastest) GPUs, layout and settings for a job, with time and cost")
    p.add_argument("model", metavar="MODEL", help="catalog name (vramplan models), HF id, or path to a config.json")
    add_workload_flags(p)
    # the workload flags pin a dimension of the search when given; unset, the planner searches it
    p.set_defaults(method=None, precision=None, optimizer=None, weights_quant=None, batch_size=None,
                   gradient_checkpointing=None, lora_targets=None, trainable_layers=None, gradient_accumulation=None,
                   new_tokens=256, lora_alpha=None, logits=None)
    p.add_argument("--task", choices=["train", "finetune", "infer"], default="finetune",
                   help="train: pre-train every weight; finetune: full, LoRA, QLoRA or freeze; infer: serve")
    p.add_argument("--budget-usd", type=non_negative_float, default=None, help="drop plans costing more (on demand)")
    p.add_argument("--max-gpus", type=positive_int, default=8, help="at most this many GPUs (1, 2, 4, 8 tried)")
    p.add_argument("--gpu-class", choices=["consumer", "workstation", "datacenter", "any"], default="any")
    p.add_argument("--gpu", action="append", default=None, metavar="NAME",
                   help="only this GPU (repeat for several); custom:memory=96GiB,bf16_tflops=…,bandwidth=… describes "
                        "one the catalog lacks")
    p.add_argument("--sort", choices=["cost", "time"], default="cost")
    p.add_argument("--engine", default="transformers",
                   choices=["transformers", "vllm", "sglang", "tensorrt-llm", "lmdeploy", "llama.cpp", "gpt-fast"],
                   help="infer: the serving engine whose prefill/decode speed ranks the plans (as estimate --engine)")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="tokens to train on (train/finetune) or to generate (infer)")
    p.add_argument("--epochs", type=positive_float, default=None, help="with --dataset-tokens instead of --tokens")
    p.add_argument("--dataset-tokens", type=positive_int, default=None)
    p.add_argument("--global-batch", type=positive_int, default=None,
                   help="sequences per optimizer step (default 32 for finetune, 256 for train)")
    p.add_argument("--prices", metavar="FILE", default=None,
                   help='JSON price overrides, e.g. {"h100-sxm": {"on_demand": 2.5, "reserved": 1.8}}')
    p.add_argument("--top", type=positive_int, default=20, help="plans to list (default 20)")
    p.add_argument("--no-savers", dest="savers", action="store_false",
                   help="do not search the memory savers (fused/chunked loss, activation offloading, paged "
                        "8-bit AdamW) on one GPU")
    add_image_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_plan)


# ----------------------------------------------------------------------------------------- fit


def _cmd_fit(ns: argparse.Namespace) -> int:
    from ..fit import VisionFitResult
    from ..render import note_gpu_choice
    from ..service import FitQuery, ServedFit, fit
    from ..serving.cli import print_serving

    query = FitQuery.of(ns.model, options(ns))
    result = fit(query)
    note_gpu_choice(ns.gpu)
    if ns.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif isinstance(result, ServedFit):
        if result.fit is not None:
            _print_fit(result.fit)
        print_serving(dict(result.serving))
        if result.launch_command:
            print(f"launch: {result.launch_command}")
    elif isinstance(result, VisionFitResult):
        _print_vision_fit(result)
    else:
        _print_fit(result)
        if not result.fits and result.per_gpu is None:
            from ..render import print_hints

            print_hints(query, result.estimate)
    return 0


def _print_vision_fit(result: VisionFitResult) -> None:
    w = result.estimate.workload
    c = _fit_header(result, f"batch {w.get('batch_size')} at {result.resolution} px")
    c.print(f"largest batch at {result.resolution} px: [bold]{result.max_batch_size:,}[/bold]")
    c.print(f"largest resolution at batch {w.get('batch_size')}: [bold]{result.max_resolution:,}[/bold] px")
    _print_notes(c, result.assumptions, result.warnings)


def _fit_header(r: Any, shape: str) -> Any:
    """The lines every fit report starts with: the job on the GPU, and whether it fits. Returns the console."""
    from ..render import console as _console

    c = _console()
    w = r.estimate.workload
    per_gpu = getattr(r, "per_gpu", None)
    where = f"{per_gpu.layout.gpus}x " if per_gpu is not None else ""
    layout = f" ({per_gpu.engine.value})" if per_gpu is not None else ""
    c.print(f"[bold]{r.model}[/bold] on [bold]{where}{r.gpu_display_name}[/bold]{layout} "
            f"({_gib(r.usable_memory_bytes)} usable{' each' if per_gpu is not None else ''}): "
            f"task={w.get('task')}, method={w.get('method')}, "
            f"precision={w.get('precision')}, {shape}")
    verdict = "[green]fits[/green]" if r.fits else "[red]does not fit[/red]"
    each = " on the most loaded GPU" if per_gpu is not None else ""
    reserved = r.estimate.peak_reserved_bytes if per_gpu is None else 0
    c.print(f"{verdict}: needs {_gib(r.total_bytes)}{each} (peak allocated {_gib(r.peak_allocated_bytes)}"
            + (f", reserved {_gib(reserved)}, nvidia-smi {_gib(r.total_bytes)}" if reserved else "")
            + f"); headroom (OOM margin) {_gib(r.headroom_bytes)}"
            + (f"; one GPU would need {_gib(r.estimate.total_bytes)}" if per_gpu is not None else ""))
    return c


def _print_notes(c: Any, assumptions: tuple[str, ...], warnings: tuple[str, ...]) -> None:
    c.print("[bold]assumptions[/bold]")
    for a in assumptions:
        c.print(f"  - {a}")
    for warn in warnings:
        c.print(f"[yellow]warning:[/yellow] {warn}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _print_fit(r: FitResult) -> None:
    w = r.estimate.workload
    c = _fit_header(r, f"batch {w.get('batch_size')} x {w.get('seq_len')} tokens")
    unit = " per data-parallel rank" if r.per_gpu is not None else ""
    c.print(f"largest batch{unit} at {w.get('seq_len')} tokens: [bold]{r.max_batch_size:,}[/bold]")
    limit = f" (the model was trained for {r.context_limit:,})" if r.context_limit else ""
    c.print(f"longest sequence at batch {w.get('batch_size')}: [bold]{r.max_seq_len:,}[/bold] tokens{limit}")
    if r.kv is not None:
        kv = r.kv
        c.print(f"concurrent sequences of {kv.sequence_tokens:,} tokens (vLLM method, "
                f"gpu_memory_utilization {kv.gpu_memory_utilization}): [bold]{kv.max_concurrent_sequences:,}[/bold] "
                f"— KV budget {_gib(kv.kv_budget_bytes)} = {kv.num_blocks:,} blocks of {kv.block_tokens} tokens "
                f"({kv.kv_bytes_per_token:,} bytes per token)")
    if r.step_time_s is not None and w.get("task") == "train":
        tps = f", {r.tokens_per_s:,.0f} tokens/s" if r.tokens_per_s else ""
        c.print(f"step time on this GPU: {r.step_time_s:.3f} s{tps} (vramplan.perf)")
    elif r.step_time_s is not None:
        tps = f"; decode {r.tokens_per_s:,.0f} tokens/s for the batch (vramplan.perf)" if r.tokens_per_s else ""
        c.print(f"prefill on this GPU: {r.step_time_s:.3f} s{tps}")
    _print_notes(c, r.assumptions, r.warnings)


# ----------------------------------------------------------------------------------------- plan


def _cmd_plan(ns: argparse.Namespace) -> int:
    from ..render import note_gpu_choice
    from ..service import PlanQuery, plan

    result = plan(PlanQuery.of(ns.model, options(ns)))
    note_gpu_choice(*(ns.gpu or ()))
    if ns.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_plan(result)
    return 0


def _hours(h: float | None) -> str:
    if h is None:
        return "—"
    if h < 1:
        return f"{h * 60:,.1f} min"
    return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} d"


def _money(x: float | None) -> str:
    return "—" if x is None else f"${x:,.2f}"


def _print_plan(r: PlanResult) -> None:
    from rich.table import Table

    from ..render import console as _console

    c = _console()
    if r.resolution is not None:
        c.print(f"[bold]{r.model}[/bold] ({r.parameters:,} parameters), task {r.task}: images of {r.resolution} px"
                + (f", {r.global_batch} per optimizer step" if r.global_batch else ""))
    else:
        c.print(f"[bold]{r.model}[/bold] ({r.parameters:,} parameters), task {r.task}: {r.tokens:,} tokens"
                + (f", global batch {r.global_batch} x {r.seq_len} tokens" if r.global_batch else
                   f", prompts of {r.seq_len} tokens"))
    c.print(f"[dim]{r.candidates_evaluated:,} candidates evaluated in {r.elapsed_s:.2f} s; {r.feasible:,} fit; "
            f"ranked by {r.sort}[/dim]")
    if r.plans:
        t = Table(show_edge=False, pad_edge=False)
        for col in ("#", "GPUs", "method and settings", "batch", "GiB/GPU", "time", "cost"):
            numeric = col in ("#", "batch", "GiB/GPU", "time", "cost")  # never cut; words wrap instead
            t.add_column(col, justify="right" if numeric and col != "batch" else "left", no_wrap=numeric,
                         overflow="fold")
        for i, p in enumerate(r.plans, 1):
            method = p.method if p.weights_quant == "none" else f"{p.method} {p.weights_quant}"
            settings = " ".join(x for x in (method, p.precision, p.optimizer, "ckpt" if p.gradient_checkpointing
                                            else "", (p.saver or "").removeprefix("--")) if x and x != "none")
            layout = "" if p.layout == "single" else f" {p.layout}"
            batch = f"{p.micro_batch}" if p.method == "inference" else f"{p.micro_batch}x{p.gradient_accumulation}"
            t.add_row(str(i), f"{p.gpu_count}x {p.gpu}{layout}", settings, batch,
                      f"{p.total_bytes / 2**30:,.1f}/{p.usable_memory_bytes / 2**30:,.0f}", _hours(p.time_hours),
                      _money(p.cost_usd))
        c.print(t)
    else:
        c.print("[red]no plan fits[/red]")
    c.print(f"[bold]minimum consumer setup:[/bold] {_summary(r.consumer, r.consumer_reason)}")
    c.print(f"[bold]recommended data-centre setup:[/bold] {_summary(r.datacenter, r.datacenter_reason)}")
    for note in r.saver_notes:
        c.print(f"[bold]memory savers:[/bold] {note}")
    c.print("[bold]assumptions[/bold]")
    for a in r.assumptions:
        c.print(f"  - {a}")
    for warn in r.warnings:
        c.print(f"[yellow]warning:[/yellow] {warn}")


def _summary(p: Plan | None, reason: str | None) -> str:
    if p is None:
        return reason or "none"
    if p.time_hours is None and getattr(p, "resolution", None) is not None:
        extra = "; time and cost not modelled for image models (ranked by the GPU's hourly price)"
    elif p.time_hours is None:
        extra = "; no time estimate"
    else:
        extra = f"; {_hours(p.time_hours)}, {_money(p.cost_usd)}" + ("" if p.cost_usd is not None else " (unpriced)")
    return f"{p.describe()} — {p.total_bytes / 2**30:,.1f} of {p.usable_memory_bytes / 2**30:,.1f} GiB per GPU{extra}"
