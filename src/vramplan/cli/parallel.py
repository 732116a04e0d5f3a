"""``vramplan export`` (engine configs and launch commands), and the ``per_gpu`` table of ``vramplan estimate``.

The layout flags are :func:`vramplan.cli._flags.add_parallel_flags`; the numbers come from
:func:`vramplan.service.estimate` and :func:`vramplan.service.export`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..serving.cli import add_export_serving_flags
from ._flags import add_parallel_flags, add_workload_flags, options

__all__ = ["print_parallel", "register"]


def print_parallel(section: dict[str, Any]) -> None:
    """A short table of the ``per_gpu`` section (rich)."""
    from rich.table import Table

    from ..render import console as _console
    from ..units import format_bytes

    t = Table(title=f"per GPU (most loaded: stage {section['stage']}) — {section['engine']}, "
                    f"{section['gpus']} GPUs: dp {section['dp']} x tp {section['tp']} x pp {section['pp']}")
    t.add_column("kind")
    t.add_column("bytes", justify="right")
    for kind, v in section["breakdown"].items():
        if v:
            t.add_row(kind, format_bytes(v))
    t.add_row("peak allocated", format_bytes(section["peak_allocated_bytes"]))
    t.add_row("total (nvidia-smi)", format_bytes(section["total_bytes"]))
    if section["host_bytes"]:
        t.add_row("host RAM per node", format_bytes(section["host_bytes"]))
    comm = section["communication"]
    t.add_row("communication / step", f"{format_bytes(comm['bytes_per_step'])}, "
                                      f"{comm['seconds_per_step'] * 1e3:.1f} ms at peak bandwidth")
    if comm["bubble_fraction"]:
        t.add_row("pipeline bubble", f"{comm['bubble_fraction']:.1%}")
    console = _console()
    console.print(t)
    for w in section["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _cmd_export(ns: argparse.Namespace) -> int:
    from ..render import note_gpu_choice
    from ..service import ExportQuery, export

    out = export(ExportQuery.of(ns.model, options(ns)))
    if ns.gpu:
        note_gpu_choice(ns.gpu)
    if ns.output and ns.output != "-":
        with open(ns.output, "w", encoding="utf-8") as fh:
            fh.write(out.text)
        sys.stderr.write(f"wrote {ns.output}; run: {out.command.replace(out.filename, ns.output)}\n")
    else:
        sys.stdout.write(out.text)
    return 0


def register(sub: Any) -> None:
    """Add ``vramplan export``."""
    p = sub.add_parser("export", help="write the engine config / launch command for a workload and layout "
                                      "(DeepSpeed JSON, accelerate FSDP YAML, torchrun, vllm serve)")
    p.add_argument("model", metavar="MODEL", help="catalog name, HF id, or path to a config.json")
    p.add_argument("--engine", required=True, choices=["deepspeed", "fsdp", "torchrun", "vllm", "sglang", "llama.cpp"])
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    p.add_argument("--gpu", default=None,
                   help="vllm/sglang/llama.cpp: the GPU (vramplan gpus): the context and concurrency that fit it")
    p.add_argument("--script", default="train.py", help="training script the launch command runs")
    add_workload_flags(p)
    add_parallel_flags(p)
    add_export_serving_flags(p)
    p.set_defaults(handler=_cmd_export)
