"""Command-line wiring of the serving models: flags, the ``serving`` JSON object of ``fit``, and
``vramplan estimate MODEL.gguf``. Kept apart from the command modules so they only call in."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._argtypes import non_negative_int, positive_int
from ..errors import WorkloadError
from ..units import GiB

__all__ = ["add_export_serving_flags", "add_gguf_flags", "add_serving_flags", "export_gguf", "gguf_estimate",
           "is_gguf", "print_serving", "reject_gguf_flags", "serving_section"]

_ENGINE_CHOICES = ["vllm", "sglang", "transformers", "llama.cpp"]
_KV_CHOICES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def add_gguf_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("llama.cpp (a .gguf model)")
    g.add_argument("--ctx", type=non_negative_int, default=None,
                   help="llama.cpp -c: context cells (default 4096; 0: the model's training context)")
    g.add_argument("--parallel", type=positive_int, default=1, help="llama.cpp -np: sequences (default 1)")
    g.add_argument("--n-gpu-layers", type=int, default=None,
                   help="llama.cpp -ngl: layers on the GPU (default: all, and the output layer)")
    g.add_argument("--ubatch", type=positive_int, default=512, help="llama.cpp -ub (default 512)")
    g.add_argument("--no-flash-attn", action="store_true", help="llama.cpp -fa off (default: on where supported)")
    g.add_argument("--kv-unified", action="store_true", help="llama.cpp --kv-unified: one KV stream for all sequences")
    if not any(a.dest == "kv_cache_dtype" for a in p._actions):
        g.add_argument("--kv-cache-dtype", choices=_KV_CHOICES, default="auto",
                       help="KV cache type: llama.cpp -ctk/-ctv f16|q8_0|q4_0…; vLLM auto|fp8|fp8_e5m2")


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    """``fit --task infer --engine …`` flags (``--gpu-memory-utilization`` and ``--max-num-batched-tokens``
    belong to ``fit`` already)."""
    g = p.add_argument_group("serving engine (--task infer)")
    g.add_argument("--engine", choices=_ENGINE_CHOICES, default=None,
                   help="model the server: vLLM's profile run and KV blocks, SGLang's token pool, llama.cpp's buffers "
                        "(a .gguf model), or transformers' generate()")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel GPUs of one server")
    g.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel stages of one server")
    _engine_knobs(g)
    add_gguf_flags(p)


def add_export_serving_flags(p: argparse.ArgumentParser) -> None:
    """``export --engine vllm|sglang|llama.cpp`` flags (the layout's --tp/--pp come from the parallel flags)."""
    from .._argtypes import fraction

    g = p.add_argument_group("serving engine (export --engine vllm|sglang|llama.cpp)")
    g.add_argument("--gpu-memory-utilization", type=fraction, default=None,
                   help="vLLM --gpu-memory-utilization (default 0.90) / SGLang --mem-fraction-static")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    _engine_knobs(g)
    add_gguf_flags(p)


def _engine_knobs(g: Any) -> None:
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="vLLM --max-model-len (default: the model's context)")
    g.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="vLLM --max-num-seqs (default: 1024 on >=70 GiB GPUs but A100, else 256)")
    g.add_argument("--kv-cache-dtype", choices=_KV_CHOICES, default="auto")
    g.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    g.add_argument("--engine-version", default=None, help="vLLM version modelled: 0.8, 0.9, 0.10, 0.11 (default 0.11)")


def _gguf_result(ns: argparse.Namespace, path: str) -> Any:
    from ..gguf import read_gguf
    from .llamacpp import llamacpp_memory

    kv = ns.kv_cache_dtype if ns.kv_cache_dtype not in (None, "auto") else "f16"
    if kv.startswith("fp8"):
        raise WorkloadError(f"--kv-cache-dtype {kv} is vLLM's; llama.cpp takes f16, bf16, q8_0, q4_0, q4_1, q5_0, "
                            "q5_1, iq4_nl")
    return llamacpp_memory(read_gguf(path), n_ctx=4096 if ns.ctx is None else ns.ctx, n_parallel=ns.parallel,
                           n_gpu_layers=ns.n_gpu_layers, type_k=kv, type_v=kv, flash_attn=not ns.no_flash_attn,
                           n_ubatch=ns.ubatch, kv_unified=ns.kv_unified)


def reject_gguf_flags(ns: argparse.Namespace) -> None:
    """One line instead of silently ignoring llama.cpp flags given with a Hugging Face model."""
    given = [flag for flag, dest, default in (("--ctx", "ctx", None), ("--parallel", "parallel", 1),
                                              ("--n-gpu-layers", "n_gpu_layers", None), ("--ubatch", "ubatch", 512),
                                              ("--no-flash-attn", "no_flash_attn", False),
                                              ("--kv-unified", "kv_unified", False))
             if getattr(ns, dest, default) != default]
    if given:
        raise WorkloadError(f"{', '.join(given)} apply to llama.cpp and a .gguf model; {ns.model} is not one "
                            "(for vLLM use fit --task infer --engine vllm)")


def gguf_estimate(ns: argparse.Namespace) -> int:
    """``vramplan estimate MODEL.gguf``: what llama.cpp allocates."""
    r = _gguf_result(ns, ns.model)
    if ns.json:
        print(json.dumps({"model": ns.model, "serving": r.to_dict()}, indent=2))
        return 0
    print(f"{ns.model}: llama.cpp, n_ctx {r.n_ctx}, {r.n_seq_max} sequence(s), {r.layers_on_gpu}/{r.n_layer} layers "
          f"on the GPU, KV {r.type_k}/{r.type_v}, flash attention {'on' if r.flash_attn else 'off'}")
    rows = [("model buffer (GPU)", r.gpu_model_bytes), ("KV cache (GPU)", r.gpu_kv_bytes),
            ("compute buffer (GPU)", r.gpu_compute_bytes), ("GPU total", r.gpu_total_bytes),
            ("model buffer (host)", r.host_model_bytes), ("KV cache (host)", r.host_kv_bytes),
            ("compute buffer (host)", r.host_compute_bytes)]
    for label, b in rows:
        print(f"  {label:<24} {b / (1 << 20):>12,.2f} MiB")
    for a in r.assumptions:
        print(f"  - {a}")
    return 0


def serving_section(ns: argparse.Namespace, spec: Any, gpu: Any, w: Any, estimate_total: int | None) -> dict[str, Any]:
    """The ``serving`` object of ``fit --engine``."""
    from .vllm import ServingConfig, serve_memory

    engine = ns.engine
    if engine == "llama.cpp":
        r = _gguf_result(ns, ns.model)
        d = r.to_dict()
        d["fits"] = r.gpu_total_bytes <= gpu.usable_memory_bytes
        d["total_memory_bytes"] = gpu.usable_memory_bytes
        return dict(d)
    if engine == "transformers":
        return {"engine": "transformers", "total_bytes": estimate_total, "fits": estimate_total is not None and
                estimate_total <= gpu.usable_memory_bytes, "note": "one generate() call: see the estimate above"}
    kv = ns.kv_cache_dtype or "auto"
    if kv not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16"):
        raise WorkloadError(f"--kv-cache-dtype {kv} is llama.cpp's; vLLM/SGLang take auto, fp8, fp8_e5m2")
    cfg = ServingConfig(engine=engine, tp=ns.tp, pp=ns.pp, gpu_memory_utilization=ns.gpu_memory_utilization,
                        max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                        max_num_batched_tokens=ns.max_num_batched_tokens, kv_cache_dtype=kv,
                        enforce_eager=ns.enforce_eager, engine_version=ns.engine_version)
    nvlink = "nvlink" in gpu.interconnect.kind.lower() or "sxm" in gpu.name.lower()
    from ..workload import Precision

    elem = 4 if w.precision is Precision.FP32 else 2
    r = serve_memory(spec, cfg, total_memory_bytes=gpu.usable_memory_bytes, gpu_name=gpu.name, nvlink=nvlink,
                     weights_quant=w.base_quant, quant_group_size=w.quant_group_size, dtype_bytes=elem)
    return dict(r.to_dict())


def print_serving(s: dict[str, Any]) -> None:
    g = GiB
    if s["engine"] == "llama.cpp":
        print(f"llama.cpp: model {s['weights_bytes'] / g:.2f} GiB + KV {s['kv_cache_bytes'] / g:.2f} GiB + compute "
              f"{s['compute_buffer_bytes'] / g:.2f} GiB = {s['gpu_total_bytes'] / g:.2f} GiB on the GPU — "
              f"{'fits' if s['fits'] else 'does not fit'}")
        return
    if s["engine"] == "transformers":
        return
    print(f"{s['engine']} {s['engine_version']} (TP {s['tp']}, PP {s['pp']}, "
          f"utilization {s['gpu_memory_utilization']}): "
          f"weights {s['weights_bytes'] / g:.2f} GiB/GPU, profile peak {s['profile_peak_bytes'] / g:.2f} GiB, "
          f"non-torch {s['non_torch_bytes'] / g:.2f} GiB")
    print(f"  KV cache {s['kv_cache_bytes'] / g:.2f} GiB = {s['gpu_blocks']:,} blocks of {s['block_size']} = "
          f"{s['kv_tokens']:,} tokens; max concurrency {s['max_concurrency']}x at max_model_len "
          f"{s['max_model_len']:,}; "
          f"largest max_model_len {s['max_model_len_fit']:,}; CUDA graphs ~{s['cuda_graph_bytes'] / g:.2f} GiB")
    for wmsg in s["warnings"]:
        print(f"  ! {wmsg}")


def export_gguf(ns: argparse.Namespace) -> tuple[str, str]:
    """(text, command) of ``export MODEL.gguf --engine llama.cpp``: llama-server with the largest context that fits."""
    import shlex

    from ..gguf import read_gguf
    from .launch import llama_server_command

    kv = ns.kv_cache_dtype if ns.kv_cache_dtype not in (None, "auto") else "f16"
    gpu_bytes = None
    if ns.gpu:
        from ..hardware import get_gpu

        gpu_bytes = get_gpu(ns.gpu).usable_memory_bytes
    cmd = llama_server_command(ns.model, read_gguf(ns.model), n_ctx=ns.ctx, n_parallel=ns.parallel,
                               n_gpu_layers=ns.n_gpu_layers, kv_type=kv, flash_attn=not ns.no_flash_attn,
                               n_ubatch=ns.ubatch, gpu_memory_bytes=gpu_bytes)
    command = shlex.join(cmd)
    return f"#!/bin/sh\n{command}\n", command
