"""Command line: parses flags, asks :mod:`vramplan.service`, renders the result (:mod:`vramplan.render`).

Commands are registered explicitly from this package's modules (``register(sub)`` each); those modules
import only the shared flags (:mod:`._flags`) and keep their heavy imports inside the handlers, so
``vramplan --help`` stays fast. Every error the user can cause ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn, cast

from .._argtypes import non_negative_float
from ..errors import VramplanError
from ..serving.cli import add_gguf_flags
from . import hardware, measure, parallel, web
from ._flags import add_image_flags, add_parallel_flags, add_workload_flags, options

__all__ = ["build_parser", "main"]


def _columns() -> int:
    """``shutil.get_terminal_size().columns``, the width argparse's formatter asks for (``$COLUMNS``, else the
    terminal of stdout, else 80), without importing :mod:`shutil` and the compression modules it imports (a
    formatter is made for every flag added; ~1% of a ``vramplan estimate`` run)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return columns


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: ``(default: 2048)``, ``(default: off)`` for switches."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "default" in text.lower() \
                or action.dest in ("help", "version", "json"):
            return text
        shown = "off" if action.default is False else "on" if action.default is True else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


class _Unbuilt:
    """Stands for the parser of a command this run does not parse (:class:`_Commands`): takes every flag and keeps
    none."""

    _actions: ClassVar[tuple[argparse.Action, ...]] = ()  # (the flag checks of add_gguf_flags, add_time_flags)
    _option_string_actions: ClassVar[Mapping[str, argparse.Action]] = MappingProxyType({})

    def __getattr__(self, name: str) -> Any:
        return self._take

    def _take(self, *args: Any, **kwargs: Any) -> Any:
        return self


class _Commands:
    """The parser's subcommands, each added with its flags; with ``only``, that command alone gets its parser and
    flags, and the others are listed by name and help (what ``vramplan --help`` and an ``invalid choice`` error
    show), as ``argparse._SubParsersAction.add_parser`` lists them, without a parser (argparse takes ~0.5 ms to make
    one and the ~440 flags of all commands ~15 ms more: a third of a ``vramplan estimate`` run's own time)."""

    def __init__(self, action: Any, only: str | None) -> None:
        self.action, self.only = action, only

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self.only is None or name == self.only:
            parser: argparse.ArgumentParser = self.action.add_parser(name, **kwargs)
            return parser
        if "help" in kwargs:
            self.action._choices_actions.append(self.action._ChoicesPseudoAction(name, (), kwargs["help"]))
        unbuilt: Any = _Unbuilt()
        self.action._name_parser_map[name] = unbuilt
        return cast(argparse.ArgumentParser, unbuilt)


def _command_of(argv: Sequence[str]) -> str:
    """The command an argument list runs: its first word that is not an option (the top-level parser's options,
    ``--help`` and ``--version``, take no value)."""
    return next((a for a in argv if not a.startswith("-")), "")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``vramplan`` parser; with ``command``, only that command's flags (the others are listed by name): what
    :func:`main` parses with."""
    p = _Parser(prog="vramplan", description="Will this model fit, for this job, on this hardware? "
                                             "GPU memory for training, fine-tuning and inference.")
    p.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    action = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    action.required = True
    sub = _Commands(action, command)

    e = sub.add_parser("estimate", help="peak GPU memory of one workload, by kind and by phase")
    e.add_argument("model", metavar="MODEL", help="catalog name (vramplan models), HF id, or path to a config.json")
    add_workload_flags(e)
    add_image_flags(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--plot", metavar="FILE", help="also draw the breakdown chart: .png or .svg (needs vramplan[web])")
    add_parallel_flags(e)
    add_gguf_flags(e)
    from .time import add_time_flags

    add_time_flags(e)
    e.set_defaults(handler=_cmd_estimate)

    t = sub.add_parser("trace", help="run the real model code on fake tensors (needs vramplan[torch])")
    t.add_argument("model", metavar="MODEL", help="catalog name or config.json of any model transformers can build; "
                   "an image catalog name (torchvision backbone, diffusers UNet) or a diffusers UNet config.json")
    add_workload_flags(t)
    add_image_flags(t)
    t.add_argument("--routing", choices=["balanced", "worst"], default="balanced",
                   help="MoE routing where dispatch depends on the data: balanced, or all tokens on the same experts")
    t.add_argument("--json", action="store_true")
    t.set_defaults(handler=_cmd_trace)

    m = sub.add_parser("models", help="list the built-in model catalog (language and image models)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--kind", choices=["llm", "image"], default=None, help="only language or only image models")
    m.add_argument("--family", help="only this family (llama, qwen2, …; image: unet, …)")
    m.set_defaults(handler=_cmd_models)

    g = sub.add_parser("gpus", help="list the GPU catalog")
    g.add_argument("--json", action="store_true")
    g.add_argument("--class", dest="gpu_class", choices=["consumer", "workstation", "datacenter"])
    g.add_argument("--min-memory-gib", type=non_negative_float, default=None, help="only GPUs with this much memory")
    g.set_defaults(handler=_cmd_gpus)
    for module in (hardware, parallel, measure, web):
        module.register(sub)
    from . import derive

    derive.register(sub)
    return p


def _cmd_estimate(ns: argparse.Namespace) -> int:
    from .. import service
    from ..errors import WorkloadError
    from ..serving.cli import gguf_estimate, is_gguf, reject_gguf_flags

    if is_gguf(ns.model):  # a llama.cpp model file: its buffers, from the GGUF header
        return gguf_estimate(ns)
    reject_gguf_flags(ns)
    if ns.kv_cache_dtype != "auto":
        raise WorkloadError("--kv-cache-dtype applies to a .gguf model (llama.cpp) here; for vLLM's fp8 KV cache use "
                            "vramplan fit MODEL --task infer --engine vllm --kv-cache-dtype fp8")

    query = service.EstimateQuery.of(ns.model, options(ns))
    est = service.estimate(query)
    if ns.plot:  # the breakdown chart of vramplan.charts, as the web page draws it
        from ..charts import plot_estimate

        written = plot_estimate(est, ns.plot)
        sys.stderr.write(f"vramplan: wrote the breakdown chart to {written}\n")
    from ..render import note_gpu_choice
    from .time import print_time

    gpu_name = getattr(ns, "time_gpu", None)
    if gpu_name:
        note_gpu_choice(gpu_name)
    if ns.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from ..render import print_estimate, print_hints, print_per_gpu_headline

        per_gpu = est.per_gpu.to_dict() if est.per_gpu is not None else None
        if per_gpu:  # several GPUs: the answer is the most loaded GPU; the one-GPU table follows
            print_per_gpu_headline(est, per_gpu)
        print_estimate(est, title=f"{est.model} on one GPU" if per_gpu else None)
        if per_gpu:
            parallel.print_parallel(per_gpu)
        else:  # hints compare one-GPU totals
            print_hints(query, est)
        if est.time is not None:
            print_time(est.time)
    return 0


def _cmd_trace(ns: argparse.Namespace) -> int:
    from ..api import make_workload
    from ..service import WORKLOAD_KEYS
    from ..trace import load_trace_config, trace_workload
    from ..vision import find_vision_model

    image = find_vision_model(ns.model)
    opts = {k: v for k, v in vars(ns).items() if k in WORKLOAD_KEYS}
    if image is not None:  # a torchvision backbone or a diffusers UNet: measure.py's run_vision / run_unet
        from ..api import image_options
        from ..trace import trace_vision

        progress = _trace_progress()
        try:
            est = trace_vision(image, progress=progress, **image_options(opts))
        finally:
            if progress is not None:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
        return _print_trace(ns, est, f"trace of {image.name}")
    for key in ("resolution", "pipeline"):
        if opts.pop(key, None):
            raise VramplanError(f"--{key} applies to image models; {ns.model} is a language model")
    # read as transformers reads it, never through the estimator's reader: the trace takes what transformers builds
    config, name, entry_name = load_trace_config(ns.model)
    w = make_workload(**opts)
    progress = _trace_progress()
    try:
        est = trace_workload(config, w, name=name, routing=ns.routing, progress=progress)
    finally:
        if progress is not None:  # the progress line goes; the answer (or the error) takes its place
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    return _print_trace(ns, est, "trace" if entry_name is None else f"trace of {entry_name}")


def _print_trace(ns: argparse.Namespace, est: Any, title: str) -> int:
    if ns.json:
        from ..trace import library_versions

        print(json.dumps(est.to_dict() | {"versions": library_versions()}, indent=2))
    else:
        from ..render import print_estimate

        print_estimate(est, title=title)
    return 0


def _trace_progress() -> Any:
    """In a terminal, the step a trace is in on one stderr line, with the seconds so far (a trace takes
    5-20 s); None when stderr is a pipe or file, which keeps one line per error there."""
    import time

    if not sys.stderr.isatty():
        return None
    start = time.perf_counter()

    def progress(step: str) -> None:
        sys.stderr.write(f"\r\033[Kvramplan trace: {step}… ({time.perf_counter() - start:.1f} s)")
        sys.stderr.flush()

    return progress


def _cmd_models(ns: argparse.Namespace) -> int:
    from ..service import models

    rows = models(ns.kind, ns.family)
    if ns.json:
        print(json.dumps([m.to_dict() for m in rows], indent=2))
    else:
        from ..render import print_models

        print_models(rows)
    return 0


def _cmd_gpus(ns: argparse.Namespace) -> int:
    from ..service import gpu_row, gpus

    rows = gpus(ns.gpu_class, ns.min_memory_gib)
    if ns.json:
        print(json.dumps([gpu_row(g) for g in rows], indent=2))
    else:
        from ..render import print_gpus

        print_gpus(rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(_command_of(args) or None).parse_args(args)
    if getattr(ns, "task", None) == "finetune" and ns.command != "plan":
        ns.task = "train"  # one vocabulary (plan's): fine-tuning is a training step; --method says what trains
    try:
        return int(ns.handler(ns))
    except VramplanError as exc:
        sys.stderr.write(f"vramplan: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file the user named (-o, --plot, --csv) that cannot be written or read
        if exc.filename is None or os.environ.get("VRAMPLAN_DEBUG"):
            raise
        sys.stderr.write(f"vramplan: error: cannot use {exc.filename}: {exc.strerror or exc}\n")
        return 2
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("VRAMPLAN_DEBUG"):
            raise
        sys.stderr.write(f"vramplan: internal error: {type(exc).__name__}: {exc} "
                         "(rerun with VRAMPLAN_DEBUG=1 for the traceback and please report it)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
