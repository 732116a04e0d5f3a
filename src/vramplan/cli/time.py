"""Command-line pieces for time: ``--gpu``, ``--gpu-spec``, ``--engine``, ``--efficiency`` and
``--attention-kernel`` on ``vramplan estimate``, and the ``time`` section they add to its output
(:mod:`vramplan.perf.report`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_time_flags", "time_section"]

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


def time_section(ns: argparse.Namespace, per_gpu: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``time`` object for ``vramplan estimate``'s namespace; None without ``--gpu`` / ``--gpu-spec``."""
    name = getattr(ns, "time_gpu", None) or getattr(ns, "gpu", None)
    spec_file = getattr(ns, "gpu_spec", None)
    if not name and not spec_file:
        for flag in ("engine", "efficiency"):
            if getattr(ns, flag, None) is not None and flag == "efficiency":
                from ..errors import VramplanError

                raise VramplanError("--efficiency needs --gpu (or --gpu-spec): the MFU is relative to a GPU's peak")
        return None
    from ..api import make_workload
    from ..catalog import resolve_model
    from ..perf.custom import resolve_gpu
    from ..perf.report import time_object
    from ..workload import Workload

    fields = set(Workload.__dataclass_fields__)
    gpu = resolve_gpu(name, spec_file)
    spec, _ = resolve_model(ns.model)
    w = make_workload(**{k: v for k, v in vars(ns).items() if k in fields and v is not None})
    tp, pp = getattr(ns, "tp", None) or 1, getattr(ns, "pp", None) or 1
    gpus = getattr(ns, "gpus", None) or tp * pp
    sharded = bool(getattr(ns, "fsdp", None)) or bool(getattr(ns, "zero", None))
    comm = None
    if per_gpu and gpus > 1:
        comm = float(per_gpu.get("communication", {}).get("bytes_per_step") or 0) or None
    engine = getattr(ns, "engine", None)
    return time_object(spec, w, gpu, gpus=gpus, tp=tp, pp=pp, sharded=sharded, comm_bytes_per_step=comm,
                       engine=engine if engine in ENGINE_CHOICES else None,
                       measured_mfu=getattr(ns, "efficiency", None),
                       attention_kernel=getattr(ns, "attention_kernel", None) or "flash2")


def print_time(t: dict[str, Any]) -> None:
    """A short table of the ``time`` section (rich)."""
    from rich.console import Console
    from rich.table import Table

    title = f"time on {t['gpus']} x {t['gpu']}" + (f" ({t['engine']})" if t.get("engine") else "") + \
        f" — {t['method']}"
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [("step", t["step_seconds"], "{:.3f} s"),
            ("training tokens/s per GPU", t["train_tokens_per_second_per_gpu"], "{:,.0f}"),
            ("MFU", t["mfu"], "{:.1%}"), ("prefill", t["prefill_seconds"], "{:.3f} s"),
            ("decode step (whole batch)", t["decode_seconds_per_token"], "{:.4f} s"),
            ("decode tokens/s (whole batch)", t["decode_tokens_per_second"], "{:,.1f}")]
    for label, value, fmt in rows:
        if value is not None:
            table.add_row(label, fmt.format(value))
    console = Console()
    console.print(table)
    if t.get("reason"):
        console.print(f"[yellow]no time:[/yellow] {t['reason']}")
