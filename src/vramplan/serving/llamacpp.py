"""llama.cpp (llama-cli, llama-server, Ollama, LM Studio) memory for a GGUF file: model buffers, KV cache and
compute buffers per device, as llama.cpp allocates them.

Transcribed from llama.cpp's source (ggml-org/llama.cpp, 2025 tree; file references per rule):

* context size — ``src/llama-context.cpp`` (llama_context constructor): ``n_ctx = GGML_PAD(n_ctx, 256)``;
  without a unified KV cache ``n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256)`` cells per sequence stream and
  ``n_seq_max`` streams; unified: one stream of ``n_ctx`` cells. ``n_batch = min(n_ctx, n_batch)``,
  ``n_ubatch = min(n_batch, n_ubatch)``.
* KV cache — ``src/llama-kv-cache.cpp`` (llama_kv_cache constructor): per layer ``k = ggml_new_tensor_3d(type_k,
  n_embd_k_gqa(il), kv_size, n_stream)``, same for v, so bytes = ``ggml_row_size(type, n_embd_gqa) x cells``;
  the tensors live on the layer's device when ``offload_kqv`` (default). Sliding-window layers
  (``src/llama-kv-cache-iswa.cpp``): ``GGML_PAD(min(n_ctx_seq, n_swa x (unified ? n_seq_max : 1) + n_ubatch),
  256)`` cells unless ``--swa-full``.
* layer placement — ``src/llama-model.cpp`` (load_tensors): the last ``n_gpu_layers`` repeating layers go to the
  GPU, the output layer (``output.weight``, ``output_norm``) too when ``n_gpu_layers > n_layer``; the token
  embedding stays in host memory; a tied output is a duplicate of ``token_embd`` on the output's device.
* compute buffers — ``src/llama-context.cpp: graph_reserve`` reserves the worst-case graph of one micro-batch
  (``n_ubatch`` tokens, every token an output) over the full cache, and ``ggml-alloc.c`` (gallocr) gives each
  backend one buffer of that graph's peak of live tensors. vramplan takes the largest of three moments of
  ``src/llama-graph.cpp``: attention (``build_attn_mha``: without flash attention the f32 scores
  ``kq [n_kv, n_ubatch, n_head]`` — soft_max runs in place — with the f32 mask ``[n_kv, n_ubatch]``; with flash
  attention the f16 mask and the f32 output), the FFN (``build_ffn``: f32 up and gate ``[n_ff, n_ubatch]``), and
  the output (``build_inp_out_ids`` + ``lm_head``: f32 logits ``[n_vocab, n_ubatch]`` plus the normed hidden
  state). Each moment adds the residual stream and the current hidden state, f32 ``[n_embd, n_ubatch]``.
  gallocr's reuse of freed blocks is not simulated; the output moment matches llama.cpp's printed
  "compute buffer size" to the 0.01 MiB on the published logs in ``data/serving_published.json``.

Known limits: MLA (DeepSeek) and recurrent/hybrid (Mamba) caches are not modelled; ``n_gpu_layers`` splits
are for one GPU (``--tensor-split`` across several is not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, WorkloadError
from ..gguf import TYPE_BY_NAME, GGUFFile, row_bytes

__all__ = ["KV_TYPES", "LlamaCppResult", "llamacpp_memory"]

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
F32 = 4
MIB = 1 << 20
# iSWA layer patterns llama.cpp sets per architecture (src/llama-model.cpp: hparams.set_swa_pattern)
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2, "llama4": 4}


@dataclass(frozen=True, slots=True)
class LlamaCppResult:
    """Bytes llama.cpp allocates for one GGUF at one context (the buffers it prints at start-up)."""

    n_ctx: int  # after padding
    n_seq_max: int
    n_ubatch: int
    flash_attn: bool
    type_k: str
    type_v: str
    layers_on_gpu: int
    n_layer: int
    gpu_model_bytes: int  # "CUDA0 model buffer size"
    host_model_bytes: int  # "CPU_Mapped model buffer size"
    gpu_kv_bytes: int  # "CUDA0 KV buffer size"
    host_kv_bytes: int
    k_bytes: int
    v_bytes: int
    kv_cells: int  # cells of the full-attention layers, over all streams
    kv_bytes_per_token: int  # K+V bytes per cell over the full-attention layers
    gpu_compute_bytes: int  # "CUDA0 compute buffer size"
    host_compute_bytes: int  # "CUDA_Host compute buffer size" (estimate: the input embedding rows)
    output_bytes: int  # "CUDA_Host output buffer size": logits of n_seq_max outputs
    assumptions: tuple[str, ...]

    @property
    def gpu_total_bytes(self) -> int:
        return self.gpu_model_bytes + self.gpu_kv_bytes + self.gpu_compute_bytes

    def to_dict(self) -> dict[str, Any]:
        mib = {k: round(v / MIB, 2) for k, v in (("gpu_model", self.gpu_model_bytes), ("gpu_kv", self.gpu_kv_bytes),
                                                  ("gpu_compute", self.gpu_compute_bytes))}
        return {"engine": "llama.cpp", "n_ctx": self.n_ctx, "n_seq_max": self.n_seq_max, "n_ubatch": self.n_ubatch,
                "flash_attn": self.flash_attn, "type_k": self.type_k, "type_v": self.type_v,
                "n_gpu_layers": self.layers_on_gpu, "n_layer": self.n_layer,
                "weights_bytes": self.gpu_model_bytes, "host_weights_bytes": self.host_model_bytes,
                "kv_cache_bytes": self.gpu_kv_bytes, "host_kv_cache_bytes": self.host_kv_bytes,
                "k_bytes": self.k_bytes, "v_bytes": self.v_bytes, "kv_cells": self.kv_cells,
                "kv_bytes_per_token": self.kv_bytes_per_token, "compute_buffer_bytes": self.gpu_compute_bytes,
                "host_compute_buffer_bytes": self.host_compute_bytes, "output_buffer_bytes": self.output_bytes,
                "gpu_total_bytes": self.gpu_total_bytes, "mib": mib, "assumptions": list(self.assumptions)}


def _pad(x: int, n: int) -> int:
    return -(-x // n) * n


def _per_layer(g: GGUFFile, key: str, n_layer: int, default: int | None) -> list[int]:
    v = g.get(key, default)
    if isinstance(v, list):
        if len(v) != n_layer or not all(isinstance(x, int) and x >= 0 for x in v):
            raise ConfigError(f"{g.path}: {g.architecture}.{key} must list {n_layer} non-negative integers")
        return list(v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return [v] * n_layer
    raise ConfigError(f"{g.path}: {g.architecture}.{key} is missing or not an integer")


def _int(g: GGUFFile, key: str, default: int | None = None) -> int:
    v = g.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{g.path}: {g.architecture}.{key} is missing or not a non-negative integer")
    return v


def _kv_type(name: str) -> tuple[int, str]:
    key = name.lower()
    if key not in KV_TYPES:
        raise WorkloadError(f"KV cache type {name!r} is not one of: {', '.join(KV_TYPES)}")
    return TYPE_BY_NAME[key][0], key


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        part = name.split(".", 2)[1]
        return int(part) if part.isdigit() else None
    return None


def llamacpp_memory(g: GGUFFile, *, n_ctx: int | None = None, n_parallel: int = 1, n_gpu_layers: int | None = None,
                    type_k: str = "f16", type_v: str = "f16", flash_attn: bool = True, n_batch: int = 2048,
                    n_ubatch: int = 512, kv_unified: bool = False, swa_full: bool = False) -> LlamaCppResult:
    """What llama.cpp allocates for ``g`` with ``-c n_ctx -np n_parallel -ngl n_gpu_layers -ctk -ctv -fa``."""
    arch = g.architecture
    if arch in ("deepseek2", "deepseek3", "mamba", "mamba2", "rwkv6", "rwkv7", "jamba", "falcon-h1", "granitehybrid",
                "qwen3next"):
        raise WorkloadError(f"{g.path}: llama.cpp's {arch} cache (MLA or recurrent state) is not modelled yet")
    n_layer = _int(g, "block_count")
    n_embd = _int(g, "embedding_length")
    heads = _per_layer(g, "attention.head_count", n_layer, None)
    heads_kv = _per_layer(g, "attention.head_count_kv", n_layer, max(heads))
    n_head = max(heads) or 1
    head_k = _int(g, "attention.key_length", n_embd // n_head)
    head_v = _int(g, "attention.value_length", head_k)
    ctx_train = _int(g, "context_length", 4096)
    n_expert_used = _int(g, "expert_used_count", 0)
    ff = _per_layer(g, "feed_forward_length", n_layer, 0)
    n_ff = max(ff)
    if n_expert_used:
        n_ff = max(n_ff, n_expert_used * _int(g, "expert_feed_forward_length", n_ff))
    vocab = g.array_lengths.get("tokenizer.ggml.tokens") or g.get("vocab_size")
    emb = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if not vocab and emb is not None and len(emb.shape) == 2:
        vocab = emb.shape[1]
    if not isinstance(vocab, int) or vocab <= 0:
        raise ConfigError(f"{g.path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens or token_embd)")
    for name, value, lo in (("ctx", n_ctx, 1), ("parallel", n_parallel, 1), ("batch", n_batch, 1),
                            ("ubatch", n_ubatch, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo
                                  or value > 1 << 24):
            raise WorkloadError(f"--{name} must be an integer in {lo}..{1 << 24}, got {value!r}")
    tk, type_k = _kv_type(type_k)
    tv, type_v = _kv_type(type_v)
    if type_v not in ("f16", "f32", "bf16") and not flash_attn:
        raise WorkloadError("llama.cpp needs flash attention (-fa on) for a quantized V cache")

    # ---- context (llama-context.cpp)
    ctx = ctx_train if n_ctx is None or n_ctx == 0 else n_ctx
    ctx = _pad(ctx, 256)
    if kv_unified:
        n_ctx_seq, n_stream = ctx, 1
    else:
        n_ctx_seq = _pad(ctx // n_parallel, 256) if ctx // n_parallel else 0
        if n_ctx_seq == 0:
            raise WorkloadError(f"--ctx {ctx} over --parallel {n_parallel} leaves no cells per sequence")
        ctx, n_stream = n_ctx_seq * n_parallel, n_parallel
    batch = min(ctx, n_batch)
    ub = min(batch, n_ubatch)

    # ---- placement (llama-model.cpp)
    ngl = n_layer + 1 if n_gpu_layers is None or n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    first_gpu = max(n_layer - ngl, 0)
    output_on_gpu = ngl > n_layer
    gpu_w = host_w = 0
    has_output = any(t.name == "output.weight" for t in g.tensors)
    for t in g.tensors:
        il = _layer_of(t.name)
        if il is not None:
            on_gpu = il >= first_gpu and ngl > 0
        elif t.name.startswith("output"):
            on_gpu = output_on_gpu
        else:
            on_gpu = False  # token_embd and the rest of the input layer stay in host memory
        if on_gpu:
            gpu_w += t.nbytes
        else:
            host_w += t.nbytes
        if t.name == "token_embd.weight" and not has_output and output_on_gpu:
            gpu_w += t.nbytes  # tied output: a duplicate of the embedding on the output's device

    # ---- KV cache (llama-kv-cache.cpp, llama-kv-cache-iswa.cpp)
    n_swa = g.get("attention.sliding_window", 0) or 0
    pattern = _SWA_PATTERN.get(arch, 0) if n_swa else 0
    swa_cells = n_ctx_seq
    if pattern and not swa_full:
        swa_cells = _pad(min(n_ctx_seq, n_swa * (n_parallel if kv_unified else 1) + ub), 256)
    k_b = v_b = gpu_kv = host_kv = per_token = 0
    for il in range(n_layer):
        if heads_kv[il] == 0:
            continue  # layers without attention (e.g. DeciLM's linear layers)
        swa = bool(pattern) and (il + 1) % pattern != 0
        cells = (swa_cells if swa else n_ctx_seq) * n_stream
        kb = row_bytes(tk, head_k * heads_kv[il]) * cells
        vb = row_bytes(tv, head_v * heads_kv[il]) * cells
        if not swa:
            per_token += row_bytes(tk, head_k * heads_kv[il]) + row_bytes(tv, head_v * heads_kv[il])
        k_b, v_b = k_b + kb, v_b + vb
        if il >= first_gpu and ngl > 0:
            gpu_kv += kb + vb
        else:
            host_kv += kb + vb

    # ---- compute buffer (llama-context.cpp graph_reserve, llama-graph.cpp)
    n_kv = n_ctx_seq  # the reserve graph attends over the whole cache
    ub_pad = _pad(ub, 64)  # GGML_KQ_MASK_PAD
    hidden = n_embd * ub * F32
    if flash_attn:
        attn = n_kv * ub_pad * 2 + head_v * n_head * ub * F32 + head_k * n_head * ub * F32
    else:
        attn = n_kv * ub * n_head * F32 + n_kv * ub_pad * F32 + head_k * n_head * ub * F32
    mask = n_kv * ub_pad * (2 if flash_attn else F32)
    ffn = 2 * n_ff * ub * F32 + mask
    out = vocab * ub * F32
    layer_peak = max(attn, ffn) + 2 * hidden
    gpu_compute = max(layer_peak, out + hidden) if output_on_gpu else layer_peak
    if ngl == 0:
        gpu_compute = 0
    host_compute = 3 * hidden + (0 if output_on_gpu else out + hidden)
    output_buf = vocab * n_parallel * F32

    ctk = f"K {type_k}, V {type_v}"
    assumptions = (
        f"llama.cpp: n_ctx {ctx} (padded to 256), {n_stream} KV stream(s) of {n_ctx_seq} cells"
        f"{' (unified)' if kv_unified else ''}, n_ubatch {ub}, flash attention {'on' if flash_attn else 'off'}, {ctk}",
        f"{min(ngl, n_layer)}/{n_layer} repeating layers on the GPU"
        f"{', output layer on the GPU' if output_on_gpu else ''}; the token embedding stays in host memory "
        "(llama-model.cpp load_tensors)",
        "compute buffer: the largest of the attention, FFN and output moments of the reserve graph at n_ubatch "
        "tokens (llama-graph.cpp), without gallocr's block reuse",
    ) + ((f"sliding-window layers (every layer but each {pattern}th) hold {swa_cells} cells per stream "
          "(llama-kv-cache-iswa.cpp)",) if pattern else ())
    return LlamaCppResult(ctx, n_parallel, ub, flash_attn, type_k, type_v, min(ngl, n_layer), n_layer, gpu_w,
                          host_w, gpu_kv, host_kv, k_b, v_b, n_ctx_seq * n_stream, per_token, gpu_compute, host_compute,
                          output_buf, assumptions)
