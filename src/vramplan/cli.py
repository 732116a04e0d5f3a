"""Command line: gathers through the library, renders in :mod:`vramplan.render`.

Every error the user can cause ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._argtypes import non_negative_int, positive_int
from .errors import VramplanError

__all__ = ["main"]

_WORKLOAD_FLAGS = ("task", "method", "precision", "weights_quant", "optimizer", "batch_size", "seq_len",
                   "new_tokens", "logits", "gradient_checkpointing", "attention", "lora_rank", "lora_alpha",
                   "lora_dropout", "lora_targets", "trainable_layers", "gradient_accumulation", "quant_group_size",
                   "double_quant", "alloc_conf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--task", choices=["train", "infer"], default="train", help="training step or inference")
    g.add_argument("--method", choices=["full", "lora", "qlora", "freeze"], default="full")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"], default="bf16",
                   help="bf16/fp16: weights, grads and optimizer states in 16-bit; amp-*: fp32 master "
                        "weights + autocast")
    from .workload import WeightsQuant

    g.add_argument("--weights-quant", choices=[q.value for q in WeightsQuant], default="none",
                   help="storage of the base linear weights (inference, or LoRA on a quantized base); a "
                        "checkpoint's own quantization_config is read from its config.json")
    g.add_argument("--quant-group-size", type=positive_int, default=None,
                   help="gptq/awq/w4a16/hqq/torchao: weights per scale (default: the format's, 128 or 64)")
    g.add_argument("--double-quant", action="store_true", default=None,
                   help="bitsandbytes 4-bit: quantize the absmax constants too (BitsAndBytesConfig "
                        "bnb_4bit_use_double_quant; off by default, on for --method qlora)")
    g.add_argument("--optimizer", choices=["adamw", "adamw-fused", "adamw-8bit", "sgd", "adafactor", "lion"],
                   default="adamw")
    g.add_argument("--batch-size", type=positive_int, default=1)
    g.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (the prompt, for infer)")
    g.add_argument("--new-tokens", type=non_negative_int, default=32, help="tokens generated after the prompt")
    g.add_argument("--logits", choices=["all", "last"], default="last",
                   help="inference: logits for every prompt token, or only the last (as generate() does)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--attention", choices=["sdpa", "flash", "eager"], default="sdpa")
    g.add_argument("--lora-rank", type=positive_int, default=16)
    g.add_argument("--lora-alpha", type=positive_int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="peft lora_dropout (default 0): above 0 each adapted layer keeps a dropout mask")
    g.add_argument("--lora-targets", default="default",
                   help="comma-separated module names, all-linear, or default (peft's choice for the family: "
                        "q_proj,v_proj for LLaMA-style models)")
    g.add_argument("--trainable-layers", type=non_negative_int, default=None,
                   help="--method freeze: how many of the last decoder layers train (default: a quarter)")
    g.add_argument("--gradient-accumulation", type=positive_int, default=1)
    g.add_argument("--alloc-conf", default="", metavar="CONF",
                   help="PyTorch caching-allocator settings, the PYTORCH_CUDA_ALLOC_CONF string "
                        "(e.g. expandable_segments:True, max_split_size_mb:128)")


def _workload_options(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in _WORKLOAD_FLAGS if hasattr(ns, k)}


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vramplan", description="Will this model fit, for this job, on this hardware? "
                                             "GPU memory for training, fine-tuning and inference.")
    p.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("estimate", help="peak GPU memory of one workload, by kind and by phase")
    e.add_argument("model", metavar="MODEL", help="catalog name (vramplan models), HF id, or path to a config.json")
    _add_workload_flags(e)
    e.add_argument("--resolution", type=positive_int, default=None,
                   help="image models: pixels per side (default: the model's native resolution)")
    e.add_argument("--pipeline", action="store_true",
                   help="diffusion models: the whole pipeline (text encoders, denoiser, VAE), not the denoiser")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--plot", metavar="FILE", help="also draw the breakdown chart: .png or .svg (needs vramplan[web])")
    from .cli_parallel import add_parallel_flags

    add_parallel_flags(e)
    from .serving.cli import add_gguf_flags

    add_gguf_flags(e)

    t = sub.add_parser("trace", help="run the real model code on fake tensors (needs vramplan[torch])")
    t.add_argument("model", metavar="MODEL", help="catalog name or config.json of any model transformers can build")
    _add_workload_flags(t)
    t.add_argument("--routing", choices=["balanced", "worst"], default="balanced",
                   help="MoE routing where dispatch depends on the data: balanced, or all tokens on the same experts")
    t.add_argument("--image-tokens", type=non_negative_int, default=None,
                   help="vision-language models: image tokens per sequence (default: one image at native size)")
    t.add_argument("--json", action="store_true")

    m = sub.add_parser("models", help="list the built-in model catalog")
    m.add_argument("--json", action="store_true")
    m.add_argument("--family", help="only this model_type (llama, qwen2, …)")

    g = sub.add_parser("gpus", help="list the GPU catalog")
    g.add_argument("--json", action="store_true")
    g.add_argument("--class", dest="gpu_class", choices=["consumer", "workstation", "datacenter"])
    g.add_argument("--min-memory-gib", type=float, default=None)
    import importlib

    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:
                raise
            continue
        mod.register(sub, _add_workload_flags)
    return p


def _cmd_estimate(ns: argparse.Namespace) -> int:
    from .api import estimate
    from .serving.cli import gguf_estimate, is_gguf

    if is_gguf(ns.model):  # a llama.cpp model file: its buffers, from the GGUF header
        return gguf_estimate(ns)

    try:  # vision and diffusion models have their own estimator (vramplan.vision)
        from .vision import estimate_vision_cli, is_vision_model
    except ImportError as exc:
        if exc.name != "vramplan.vision":
            raise
    else:
        if is_vision_model(ns.model):
            return int(estimate_vision_cli(ns))
    est = estimate(ns.model, **_workload_options(ns))
    if ns.plot:  # the breakdown chart of vramplan.charts, as the web page draws it
        from .charts import plot_estimate

        plot_estimate(est, ns.plot)
    from .cli_parallel import estimate_section, print_parallel

    per_gpu = estimate_section(ns)
    if ns.json:
        print(json.dumps(est.to_dict() | ({"per_gpu": per_gpu} if per_gpu else {}), indent=2))
    else:
        from .render import print_estimate

        print_estimate(est)
        if per_gpu:
            print_parallel(per_gpu)
    return 0


def _cmd_trace(ns: argparse.Namespace) -> int:
    from .api import make_workload
    from .trace import load_trace_config, trace_workload

    # read as transformers reads it, never through the estimator's reader: the trace takes what transformers builds
    config, name, entry_name = load_trace_config(ns.model)
    est = trace_workload(config, make_workload(**_workload_options(ns)), name=name, routing=ns.routing,
                         image_tokens=ns.image_tokens)
    if ns.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from .render import print_estimate

        print_estimate(est, title="trace" if entry_name is None else f"trace of {entry_name}")
    return 0


def _cmd_models(ns: argparse.Namespace) -> int:
    from .catalog import list_models

    models = [m for m in list_models() if not ns.family or m.spec.family == ns.family]
    if ns.json:
        print(json.dumps([{"name": m.name, "hf_id": m.hf_id, "family": m.spec.family, "parameters": m.params,
                           "aliases": list(m.aliases), "source": m.source} for m in models], indent=2))
    else:
        from .render import print_models

        print_models(models)
    return 0


def _cmd_gpus(ns: argparse.Namespace) -> int:
    from .hardware import list_gpus
    from .units import GiB

    min_mem = int(ns.min_memory_gib * GiB) if ns.min_memory_gib is not None else None
    gpus = list_gpus(cls=ns.gpu_class, min_memory_bytes=min_mem)
    if ns.json:
        print(json.dumps([{"name": g.name, "display_name": g.display_name, "class": g.gpu_class,
                           "memory_bytes": g.memory_bytes, "bf16_tflops": g.peak_tflops("bf16"),
                           "price_usd_per_hour": g.price.on_demand} for g in gpus], indent=2))
    else:
        from .render import print_gpus

        print_gpus(gpus)
    return 0


_COMMANDS = {"estimate": _cmd_estimate, "trace": _cmd_trace, "models": _cmd_models, "gpus": _cmd_gpus}

# Commands that live in their own modules. Each module defines
#     register(sub, add_workload_flags) -> None
# which adds its sub-parsers and sets ``handler=`` (a function of the parsed namespace returning the
# exit status) with ``set_defaults``. Modules must keep their heavy imports inside the handlers.
_COMMAND_MODULES = ("vramplan.cli_hardware", "vramplan.cli_parallel", "vramplan.cli_measure",
                    "vramplan.cli_web")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    handler = getattr(ns, "handler", None) or _COMMANDS[ns.command]
    try:
        return int(handler(ns))
    except VramplanError as exc:
        sys.stderr.write(f"vramplan: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("VRAMPLAN_DEBUG"):
            raise
        sys.stderr.write(f"vramplan: internal error: {type(exc).__name__}: {exc} "
                         "(rerun with VRAMPLAN_DEBUG=1 for the traceback and please report it)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
