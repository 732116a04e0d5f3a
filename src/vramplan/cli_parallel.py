"""Command-line pieces for multi-GPU layouts: the parallel flags, the ``per_gpu`` section of
``vramplan estimate``, and ``vramplan export`` (engine configs and launch commands).

``vramplan.cli`` imports this module (``_COMMAND_MODULES``) and calls :func:`register`; the ``estimate``
command adds :func:`add_parallel_flags` and puts :func:`parallel_section` under ``per_gpu``. Heavy work
is imported inside the functions, so ``vramplan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ._argtypes import positive_int

__all__ = ["add_parallel_flags", "estimate_section", "layout_from_args", "parallel_section", "print_parallel",
           "register"]

_FLAGS = ("gpus", "nodes", "zero", "fsdp", "tp", "pp", "ep", "micro_batches", "offload", "sequence_parallel",
          "virtual_stages")


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-GPU flags; all default to None (or off) so that a plain single-GPU call has no ``per_gpu``."""
    g = parser.add_argument_group("multi-GPU layout (adds a per_gpu section: the most loaded GPU)")
    g.add_argument("--gpus", type=positive_int, default=None, help="GPUs in total (= tp x pp x data-parallel)")
    g.add_argument("--nodes", type=positive_int, default=None, help="machines the GPUs are spread over")
    g.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None,
                   help="DeepSpeed ZeRO stage: 1 optimizer, 2 + gradients, 3 + parameters sharded")
    g.add_argument("--fsdp", choices=["full", "grad-op", "hybrid"], default=None,
                   help="PyTorch FSDP2: full shard, shard gradients and optimizer only, or shard within a node")
    g.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel size (Megatron-style)")
    g.add_argument("--pp", type=positive_int, default=None, help="pipeline-parallel stages (1F1B)")
    g.add_argument("--ep", type=positive_int, default=None, help="expert-parallel size (MoE)")
    g.add_argument("--micro-batches", type=positive_int, default=None,
                   help="micro-batches per optimizer step (pipeline micro-batches / gradient accumulation)")
    g.add_argument("--virtual-stages", type=positive_int, default=None,
                   help="model chunks per GPU: > 1 selects the interleaved 1F1B schedule")
    g.add_argument("--offload", choices=["none", "optimizer", "optimizer+params"], default=None,
                   help="move optimizer states (and ZeRO-3/FSDP parameters) to host memory")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norm/dropout activations over the tensor-parallel group (needs --tp > 1)")
    g.add_argument("--intra-node-link", default=None, help="GPU link inside a node (default nvlink-4)")
    g.add_argument("--inter-node-link", default=None, help="network between nodes (default ib-ndr)")


def layout_from_args(ns: argparse.Namespace) -> Any:
    """The :class:`~vramplan.parallel.Layout` the flags describe, or None when none was given."""
    from .parallel import FSDPMode, Layout, Offload

    given = {f: getattr(ns, f, None) for f in _FLAGS}
    if not given["sequence_parallel"]:  # a plain switch: off is the same as not given
        given["sequence_parallel"] = None
    if all(v is None for v in given.values()):
        return None
    tp, pp = given["tp"] or 1, given["pp"] or 1
    gpus = given["gpus"] or tp * pp  # Layout checks gpus = tp x pp x dp
    return Layout(
        gpus=gpus, nodes=given["nodes"] or 1, tp=tp, pp=pp, ep=given["ep"] or 1, zero=given["zero"] or 0,
        fsdp=FSDPMode(given["fsdp"]) if given["fsdp"] else None, micro_batches=given["micro_batches"] or 1,
        offload=Offload(given["offload"] or "none"), sequence_parallel=bool(given["sequence_parallel"]),
        virtual_stages=given["virtual_stages"] or 1,
    )


def _links(ns: argparse.Namespace) -> Any:
    from .parallel import Links, get_link

    intra = getattr(ns, "intra_node_link", None) or Links().intra_node
    inter = getattr(ns, "inter_node_link", None) or Links().inter_node
    return Links(get_link(intra).name, get_link(inter).name)


def parallel_section(ns: argparse.Namespace, spec: Any, workload: Any) -> dict[str, Any] | None:
    """The ``per_gpu`` JSON section for ``vramplan estimate`` (None without parallel flags): the most loaded
    GPU's ``peak_allocated_bytes``, ``total_bytes``, ``breakdown`` (the same kind keys), ``host_bytes``, and
    the layout, model states, pipeline stages and communication behind them."""
    from .parallel import estimate_parallel

    layout = layout_from_args(ns)
    if layout is None:
        return None
    section: dict[str, Any] = estimate_parallel(spec, workload, layout, _links(ns)).to_dict()
    return section


def estimate_section(ns: argparse.Namespace) -> dict[str, Any] | None:
    """:func:`parallel_section` for ``vramplan estimate``'s namespace (model and workload flags read from it)."""
    if layout_from_args(ns) is None:
        return None
    from .api import make_workload
    from .catalog import resolve_model
    from .cli import _workload_options

    spec, _ = resolve_model(ns.model)
    return parallel_section(ns, spec, make_workload(**_workload_options(ns)))


def print_parallel(section: dict[str, Any]) -> None:
    """A short table of the ``per_gpu`` section (rich)."""
    from rich.console import Console
    from rich.table import Table

    from .units import format_bytes

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
    console = Console()
    console.print(t)
    for w in section["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _cmd_export(ns: argparse.Namespace) -> int:
    from .api import make_workload
    from .catalog import resolve_model
    from .cli import _workload_options
    from .export import export
    from .parallel import Layout
    from .serving.cli import export_gguf, is_gguf

    if is_gguf(ns.model) or ns.engine == "llama.cpp":
        from .errors import WorkloadError

        if not is_gguf(ns.model) or ns.engine != "llama.cpp":
            raise WorkloadError("llama.cpp serves GGUF files: give MODEL.gguf with --engine llama.cpp")
        text, command = export_gguf(ns)
        _write(ns, text, command, "serve.sh")
        return 0
    spec, entry = resolve_model(ns.model)
    model_id = entry.hf_id if entry is not None else ns.model
    workload = make_workload(**_workload_options(ns))
    layout = layout_from_args(ns) or Layout()
    gpu_bytes = None
    gpu_name = ""
    if ns.gpu:
        from .hardware import get_gpu

        gpu = get_gpu(ns.gpu)
        gpu_bytes, gpu_name = gpu.usable_memory_bytes, gpu.name
    serving = None
    if ns.engine in ("vllm", "sglang"):
        from .serving.vllm import ServingConfig

        serving = ServingConfig(engine=ns.engine, tp=layout.tp, pp=layout.pp,
                                gpu_memory_utilization=ns.gpu_memory_utilization, max_model_len=ns.max_model_len,
                                max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                                kv_cache_dtype=ns.kv_cache_dtype, enforce_eager=ns.enforce_eager,
                                engine_version=ns.engine_version)
    out = export(ns.engine, model_id, spec, workload, layout, gpu_memory_bytes=gpu_bytes, script=ns.script,
                 serving=serving, gpu_name=gpu_name)
    _write(ns, out.text, out.command, out.filename)
    return 0


def _write(ns: argparse.Namespace, text: str, command: str, filename: str) -> None:
    if ns.output and ns.output != "-":
        with open(ns.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        sys.stderr.write(f"wrote {ns.output}; run: {command.replace(filename, ns.output)}\n")
    else:
        sys.stdout.write(text)


def register(sub: Any, add_workload_flags: Callable[[argparse.ArgumentParser], None]) -> None:
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
    from .serving.cli import add_export_serving_flags

    add_export_serving_flags(p)
    p.set_defaults(handler=_cmd_export)
