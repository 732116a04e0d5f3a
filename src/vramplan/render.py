"""Human-readable output (rich tables). Formatting decides by type; numbers come from the library."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .kinds import KIND_LABELS as _LABELS
from .units import GiB

if TYPE_CHECKING:
    from rich.console import Console

    from .hardware import GPU
    from .result import Estimate
    from .service import ModelInfo

__all__ = ["console", "note_gpu_choice", "print_estimate", "print_gpus", "print_hints", "print_models",
           "print_per_gpu_headline"]

_PIPE_WIDTH = 240  # lines written to a pipe or file: no table cut to a terminal's 80 columns



_CORE_FIELDS = ("task", "method", "precision", "optimizer", "batch_size", "seq_len", "attention",
                "gradient_checkpointing", "weights_quant", "new_tokens", "logits")


def _workload_defaults() -> dict[str, object]:
    from ._engine.step import workload_dict
    from .workload import Workload

    return workload_dict(Workload())


_DEFAULTS = _workload_defaults()

def console(*, stderr: bool = False, width: int | None = None) -> Console:
    """The rich console every command prints with: the terminal's width in a terminal; when piped,
    wide enough that tables keep every column (rich would otherwise assume 80 and cut them)."""
    from rich.console import Console

    if width is not None:
        return Console(stderr=stderr, width=width)
    c = Console(stderr=stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, width=_PIPE_WIDTH)
    return c


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def note_gpu_choice(*names: str) -> None:
    """One line on stderr for each GPU name that is short for several (``--gpu a100``): which one is used."""
    import sys

    from .hardware import gpu_choice_note

    for name in names:
        text = gpu_choice_note(name)
        if text:
            sys.stderr.write(f"vramplan: note: {text}\n")


def print_per_gpu_headline(est: Estimate, section: dict[str, object], out: Console | None = None) -> None:
    """The answer of a multi-GPU estimate first: the most loaded GPU's memory; the one-GPU table follows."""
    c = out or console()
    total, peak = int(str(section["total_bytes"])), int(str(section["peak_allocated_bytes"]))
    engine = f", {section['engine']}" if section.get("engine") else ""
    c.print(f"[bold]{est.model}[/bold] on {section.get('gpus')} GPUs{engine}: per GPU (the most loaded) "
            f"[bold]{_gib(total)} GiB[/bold] on the GPU (nvidia-smi), peak allocated {_gib(peak)} GiB")
    host = section.get("host_bytes")
    if host:
        c.print(f"host memory {_gib(int(str(host)))} GiB per node")
    c.print(f"[dim]below: the whole job on one GPU ({_gib(est.total_bytes)} GiB), then the per-GPU detail[/dim]")


def print_estimate(est: Estimate, title: str | None = None, out: Console | None = None) -> None:
    from rich.table import Table

    c = out or console()
    w = est.workload
    head = title or est.model
    c.print(f"[bold]{head}[/bold]: {est.parameters:,} parameters, {est.trainable_parameters:,} trainable")
    desc = ", ".join(f"{k}={v}" for k, v in w.items() if k in _CORE_FIELDS or (
        k in _DEFAULTS and v != _DEFAULTS[k]))  # and every option the run changed
    c.print(f"[dim]{desc}[/dim]")
    c.print(f"peak allocated [bold]{_gib(est.peak_allocated_bytes)} GiB[/bold] "
                  f"(torch.cuda.max_memory_allocated, in the {est.peak_phase.value} phase); "
                  + (f"reserved [bold]{_gib(est.peak_reserved_bytes)} GiB[/bold] (max_memory_reserved); "
                     if est.peak_reserved_bytes else "")
                  + f"nvidia-smi total about [bold]{_gib(est.total_bytes)} GiB[/bold]")
    table = Table(title="memory at the peak", show_edge=False)
    table.add_column("kind")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    for kind, value in est.breakdown.bytes_by_kind:
        if value:
            table.add_row(_LABELS[kind], _gib(value), f"{value / est.total_bytes:.0%}")
    table.add_row("[bold]total[/bold]", f"[bold]{_gib(est.total_bytes)}[/bold]", "")
    c.print(table)
    phases = Table(title="peak by phase (allocated)", show_edge=False)
    phases.add_column("phase")
    phases.add_column("GiB", justify="right")
    for p in est.phases:
        phases.add_row(p.phase.value, _gib(p.peak_allocated_bytes))
    c.print(phases)
    c.print("[bold]assumptions[/bold]")
    for a in est.assumptions:
        c.print(f"  - {a}")
    for warn in est.warnings:
        c.print(f"[yellow]warning:[/yellow] {warn}")


def print_hints(query: Any, est: Estimate, out: Console | None = None) -> None:
    """``hint:`` lines for single switches that would lower the answer a lot (:mod:`vramplan.hints`);
    ``query`` is the :class:`~vramplan.service.EstimateQuery` of ``est``. Language models only."""
    from .api import IMAGE_OPTIONS, make_workload
    from .hints import hints

    ref = query.ref()
    if ref.spec is None:
        return
    w = make_workload(**{k: v for k, v in query.workload.items() if k not in IMAGE_OPTIONS})
    for h in hints(ref.spec, w, est):
        (out or console()).print(f"[cyan]hint:[/cyan] {h.text()}")


def print_models(models: Iterable[ModelInfo], out: Console | None = None) -> None:
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "kind", "family", "parameters", "Hugging Face id"):
        table.add_column(col, justify="right" if col == "parameters" else "left", overflow="fold",
                         no_wrap=col != "Hugging Face id")
    for m in models:
        table.add_row(m.name, m.kind, m.family, f"{m.parameters:,}", m.hf_id)
    (out or console()).print(table)


def print_gpus(gpus: Iterable[GPU], out: Console | None = None) -> None:
    """The GPU catalog; the first column is the id that ``--gpu`` takes."""
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False,
                  caption="--gpu takes the id, or an alias such as 4090 or \"H100 SXM\"; TFLOPS: dense bf16")
    for col, head in (("id", "id (--gpu)"), ("name", "name"), ("class", "class"), ("mem", "GiB"),
                      ("bw", "GB/s"), ("bf16", "TFLOPS"), ("price", "$/h")):
        numeric = col in ("mem", "bw", "bf16", "price")
        table.add_column(head, justify="right" if numeric else "left", no_wrap=col in ("id", "class") or numeric,
                         overflow="fold", min_width=8 if col == "name" else None)
    for g in gpus:
        bf16 = g.peak_tflops("bf16")
        price = g.price.on_demand
        table.add_row(g.name, g.display_name.removeprefix("NVIDIA "), g.gpu_class, _gib(g.memory_bytes),
                      f"{g.memory_bandwidth_bytes_per_s / 1e9:,.0f}",
                      f"{bf16:,.0f}" if bf16 is not None else "—", f"{price:.2f}" if price is not None else "—")
    (out or console()).print(table)
