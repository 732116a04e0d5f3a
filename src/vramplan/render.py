"""Human-readable output (rich tables). Formatting decides by type; numbers come from the library."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .kinds import KIND_LABELS as _LABELS
from .units import GiB

if TYPE_CHECKING:
    from .hardware import GPU
    from .result import Estimate
    from .service import ModelInfo

__all__ = ["print_estimate", "print_gpus", "print_models"]



def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def print_estimate(est: Estimate, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    w = est.workload
    head = title or est.model
    console.print(f"[bold]{head}[/bold]: {est.parameters:,} parameters, {est.trainable_parameters:,} trainable")
    desc = ", ".join(f"{k}={v}" for k, v in w.items() if k in (
        "task", "method", "precision", "optimizer", "batch_size", "seq_len", "attention",
        "gradient_checkpointing", "weights_quant", "new_tokens", "logits"))
    console.print(f"[dim]{desc}[/dim]")
    console.print(f"peak allocated [bold]{_gib(est.peak_allocated_bytes)} GiB[/bold] "
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
    console.print(table)
    phases = Table(title="peak by phase (allocated)", show_edge=False)
    phases.add_column("phase")
    phases.add_column("GiB", justify="right")
    for p in est.phases:
        phases.add_row(p.phase.value, _gib(p.peak_allocated_bytes))
    console.print(phases)
    console.print("[bold]assumptions[/bold]")
    for a in est.assumptions:
        console.print(f"  - {a}")
    for warn in est.warnings:
        console.print(f"[yellow]warning:[/yellow] {warn}")


def print_models(models: Iterable[ModelInfo]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("name", "kind", "family", "parameters", "Hugging Face id"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for m in models:
        table.add_row(m.name, m.kind, m.family, f"{m.parameters:,}", m.hf_id)
    Console().print(table)


def print_gpus(gpus: Iterable[GPU]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("name", "class", "memory GiB", "bandwidth GB/s", "bf16 TFLOPS", "$/h on demand"):
        table.add_column(col, justify="left" if col in ("name", "class") else "right")
    for g in gpus:
        bf16 = g.peak_tflops("bf16")
        price = g.price.on_demand
        table.add_row(g.display_name, g.gpu_class, _gib(g.memory_bytes),
                      f"{g.memory_bandwidth_bytes_per_s / 1e9:,.0f}",
                      f"{bf16:,.0f}" if bf16 is not None else "—", f"{price:.2f}" if price is not None else "—")
    Console().print(table)
