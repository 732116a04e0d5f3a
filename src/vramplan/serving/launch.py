"""Launch commands whose numbers come from the serving models: ``vllm serve``, ``sglang.launch_server`` and
``llama-server``. No batch-prefill check: vLLM and SGLang chunk prefill, so what has to fit is one request of
``max_model_len`` in the KV cache — the limit is the one the engines themselves enforce at start-up.

Flags: vLLM's ``EngineArgs`` (docs.vllm.ai "Engine Arguments"), SGLang's ``ServerArgs``
(python/sglang/srt/server_args.py), llama.cpp's ``common/arg.cpp`` (llama-server).
"""

from __future__ import annotations

from ..errors import WorkloadError
from ..gguf import GGUFFile
from ..spec import ModelSpec
from ..workload import Precision, WeightsQuant, Workload
from .llamacpp import llamacpp_memory
from .vllm import ServingConfig, ServingResult, serve_memory

__all__ = ["llama_server_command", "serving_command"]

_VLLM_QUANT = {WeightsQuant.NF4: "bitsandbytes", WeightsQuant.INT8: "bitsandbytes", WeightsQuant.FP8: "fp8",
               WeightsQuant.FP8_BLOCK: "fp8"}
_DTYPE = {Precision.BF16: "bfloat16", Precision.AMP_BF16: "bfloat16", Precision.FP16: "float16",
          Precision.AMP_FP16: "float16", Precision.FP32: "float32"}


def serving_command(engine: str, model_id: str, spec: ModelSpec, w: Workload, cfg: ServingConfig,
                    total_memory_bytes: int | None, gpu_name: str = "", nvlink: bool = True
                    ) -> tuple[list[str], ServingResult | None]:
    """The argv of a vLLM or SGLang server for ``cfg``; with the GPU's memory, ``max_model_len`` defaults to the
    largest the KV budget holds (capped by the model's context) and a setting that cannot start is an error."""
    if w.is_train:
        raise WorkloadError(f"{engine} serves models; use --task infer (or --engine deepspeed|fsdp for training)")
    result = None
    max_len = cfg.max_model_len
    if total_memory_bytes:
        result = serve_memory(spec, cfg, total_memory_bytes=total_memory_bytes, gpu_name=gpu_name, nvlink=nvlink,
                              weights_quant=w.base_quant, quant_group_size=w.quant_group_size,
                              dtype_bytes=4 if w.precision is Precision.FP32 else 2)
        if result.gpu_blocks == 0:
            raise WorkloadError(f"{spec.name} does not fit {gpu_name or 'this GPU'} with TP {cfg.tp} x PP {cfg.pp}: "
                                f"weights {result.weights_bytes / 2**30:.1f} GiB/GPU leave no KV cache; "
                                "raise --tp/--pp")
        if max_len is not None and result.max_model_len_fit < max_len:
            raise WorkloadError(f"max_model_len {max_len:,} does not fit the KV cache ({result.kv_tokens:,} tokens); "
                                f"use --max-model-len {result.max_model_len_fit:,} or less, or more GPUs")
        max_len = max_len or result.max_model_len_fit
    max_len = max_len or spec.max_position_embeddings
    seqs = cfg.max_num_seqs or (result.max_num_seqs if result else None)
    if engine == "vllm":
        cmd = ["vllm", "serve", model_id, "--tensor-parallel-size", str(cfg.tp), "--pipeline-parallel-size",
               str(cfg.pp)]
        if max_len:
            cmd += ["--max-model-len", str(max_len)]
        if seqs:
            cmd += ["--max-num-seqs", str(seqs)]
        if cfg.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
        cmd += ["--kv-cache-dtype", cfg.kv_cache_dtype, "--dtype", _DTYPE[w.precision]]
        quant = _VLLM_QUANT.get(w.base_quant)
        if quant:
            cmd += ["--quantization", quant]
        cmd += ["--gpu-memory-utilization", f"{cfg.gpu_memory_utilization or 0.90:.2f}"]
        if cfg.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd, result
    if engine == "sglang":
        cmd = ["python", "-m", "sglang.launch_server", "--model-path", model_id, "--tp-size", str(cfg.tp)]
        if cfg.pp > 1:
            cmd += ["--pp-size", str(cfg.pp)]
        if max_len:
            cmd += ["--context-length", str(max_len)]
        if seqs:
            cmd += ["--max-running-requests", str(seqs)]
        if cfg.gpu_memory_utilization:
            cmd += ["--mem-fraction-static", f"{cfg.gpu_memory_utilization:.2f}"]
        if cfg.kv_cache_dtype != "auto":
            cmd += ["--kv-cache-dtype", "fp8_e5m2" if cfg.kv_cache_dtype == "fp8_e5m2" else "fp8_e4m3"]
        cmd += ["--dtype", _DTYPE[w.precision]]
        if cfg.enforce_eager:
            cmd.append("--disable-cuda-graph")
        return cmd, result
    raise WorkloadError(f"no launch command for engine {engine!r}")


def llama_server_command(path: str, g: GGUFFile, *, n_ctx: int | None, n_parallel: int, n_gpu_layers: int | None,
                         kv_type: str, flash_attn: bool, n_ubatch: int, gpu_memory_bytes: int | None) -> list[str]:
    """``llama-server`` with the largest context (multiple of 256) whose buffers fit the GPU when no ``-c`` is given."""
    def total(ctx: int) -> int:
        return llamacpp_memory(g, n_ctx=ctx, n_parallel=n_parallel, n_gpu_layers=n_gpu_layers, type_k=kv_type,
                               type_v=kv_type, flash_attn=flash_attn, n_ubatch=n_ubatch).gpu_total_bytes

    ctx = n_ctx
    if gpu_memory_bytes:
        train = g.get("context_length", 4096)
        train = train if isinstance(train, int) and train > 0 else 4096
        if ctx is None:
            lo, hi = 0, -(-train // 256)
            while lo < hi:  # the largest multiple of 256 (up to the training context) that fits
                mid = (lo + hi + 1) // 2
                if total(mid * 256 * n_parallel) <= gpu_memory_bytes:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0:
                raise WorkloadError(f"{path}: the model does not fit this GPU even at 256 tokens; lower --n-gpu-layers")
            ctx = lo * 256 * n_parallel
        elif total(ctx) > gpu_memory_bytes:
            raise WorkloadError(f"{path}: -c {ctx} needs {total(ctx) / 2**30:.2f} GiB on the GPU; lower --ctx, "
                                "quantize the KV cache (--kv-cache-dtype q8_0) or lower --n-gpu-layers")
    cmd = ["llama-server", "-m", path, "-c", str(ctx or 4096), "-np", str(n_parallel),
           "-ngl", str(999 if n_gpu_layers is None or n_gpu_layers < 0 else n_gpu_layers),
           "-ctk", kv_type, "-ctv", kv_type, "-fa", "on" if flash_attn else "off", "-ub", str(n_ubatch)]
    return cmd
