"""Command-line pieces for time: ``--gpu``, ``--gpu-spec``, ``--engine``, ``--efficiency`` and
``--attention-kernel`` on ``vramplan estimate``, and the table of the ``time`` section they add to its answer
(:func:`vramplan.service.estimate`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

__all__ = ["add_time_flags", "print_time"]

# vramplan.perf.efficiency.ENGINES (not imported here: the parser stays light; tests/test_cli.py checks they agree)
ENGINE_CHOICES = ("transformers", "vllm", "sglang", "tensorrt-llm", "lmdeploy", "llama.cpp", "gpt-fast")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v > 1 and v <= 100:
        v /= 100  # "45" means 45 %
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"a model FLOPs utilisation between 0 and 1 (or 1-100 %), got {text!r}")
    return v


def add_time_flags(p: argparse.ArgumentParser) -> None:
    """Flags for the ``time`` section; each is added only if another part has not defined it already."""
    have = set(p._option_string_actions)
    g = p.add_argument_group("time (adds a time section: step time, prefill, decode speed, MFU)")
    if "--gpu" not in have:
        # dest time_gpu: the web page maps a ?gpu= link parameter to its capacity lines, not to this flag
        g.add_argument("--gpu", dest="time_gpu", default=None, metavar="NAME",
                       help="GPU to time on: a catalog name (vramplan gpus) or custom:memory=96GiB,bf16_tflops=…,"
                            "bandwidth=…")
    if "--gpu-spec" not in have:
        g.add_argument("--gpu-spec", default=None, metavar="FILE", help="JSON file describing a GPU the catalog lacks")
    if "--engine" not in have:
        g.add_argument("--engine", default=None, choices=ENGINE_CHOICES,
                       help="serving engine whose prefill/decode speed to model (default transformers generate())")
    if "--efficiency" not in have:
        g.add_argument("--efficiency", type=_fraction, default=None, metavar="MFU",
                       help="your measured model FLOPs utilisation (0-1): training time = FLOPs / (peak x MFU)")
    if "--attention-kernel" not in have:
        g.add_argument("--attention-kernel", default=None, metavar="KERNEL",
                       help="fused attention kernel your training framework runs: flash2 (default: FlashAttention-2, "
                            "PyTorch SDPA) or flash1 (FlashAttention v1 or its Triton port)")


# the figures of the time section: (label, key, format)
_ROWS = (("step", "step_seconds", "{:.3f} s"),
         ("training tokens/s per GPU", "train_tokens_per_second_per_gpu", "{:,.0f}"),
         ("MFU", "mfu", "{:.1%}"), ("prefill", "prefill_seconds", "{:.3f} s"),
         ("decode step (whole batch)", "decode_seconds_per_token", "{:.4f} s"),
         ("decode tokens/s (whole batch)", "decode_tokens_per_second", "{:,.1f}"))


def print_time(t: Mapping[str, Any]) -> None:
    """A short table of the ``time`` section (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if all(t.get(key) is None for _, key, _ in _ROWS):
        console.print(f"[yellow]no time:[/yellow] {t.get('reason') or 'not modelled for this workload'}")
        return
    title = f"time on {t['gpus']} x {t['gpu']}" + (f" ({t['engine']})" if t.get("engine") else "") + \
        f" — {t['method']}"
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for label, key, fmt in _ROWS:
        if t.get(key) is not None:
            table.add_row(label, fmt.format(t[key]))
    console.print(table)
    if t.get("reason"):
        console.print(f"[yellow]no time:[/yellow] {t['reason']}")
