"""vLLM (V1 engine) and SGLang serving memory: weights per GPU, the profile-run peak, the KV budget and blocks.

vLLM, transcribed from its source (vllm-project/vllm; versions modelled: V1 engine 0.8.0 - 0.11.x):

* defaults — ``vllm/engine/arg_utils.py`` (``_set_default_args`` / ``get_batch_defaults``): with chunked
  prefill (V1's default) ``vllm serve`` takes ``max_num_batched_tokens`` 8192 and ``max_num_seqs`` 1024 on GPUs
  of 70 GiB or more that are not A100s, else 2048 and 256 (0.9.0+, PR 17885; 0.8.x: 8192 and 1024 everywhere),
  and
  ``max_num_seqs = min(max_num_seqs, max_num_batched_tokens)``.
* profile run — ``vllm/v1/worker/gpu_model_runner.py``: ``profile_run`` runs ``_dummy_run(max_num_tokens)``
  (one forward of ``max_num_batched_tokens`` tokens spread over ``min(max_num_seqs, tokens)`` requests), then
  ``_dummy_sampler_run`` on the last token of each request: ``compute_logits`` ([R, vocab] in the model dtype,
  all-gathered under TP) and the sampler with dummy metadata (temperature 0.5, top_p 0.9, top_k vocab-1, no
  penalties). ``vllm/v1/sample/sampler.py`` casts the logits to fp32; ``ops/topk_topp_sampler.py
  (apply_top_k_top_p)`` sorts them: ``logits.sort`` gives fp32 values and int64 indices, and PyTorch's CUDA sort
  (``aten/src/ATen/native/cuda/SortStable.cu``: ``segmented_sort_pairs``) allocates int64 reverse indices plus
  CUB's alternate key (fp32) and value (int64) buffers; with fewer than 128 rows it sorts by a full sort with two
  int2 index buffers instead. At the sort, live: bf16 logits 0.5U, fp32 logits 1U, values 1U, indices 2U,
  reverse indices 2U, CUB buffers 3U = 9.5U (11.5U under 128 rows), U = R x vocab x 4 bytes — more than the
  later steps (top-k/top-p masks, softmax, cumsum, scatter, the final softmax and exponential draw: <= 8U).
* forward peak — vLLM's decoder layer: hidden and residual [T, H] live throughout, plus the larger of attention
  (qkv [T, (q+2kv)/tp] and the attention output [T, q/tp]) and the MLP (gate_up [T, 2I/tp] and SiluAndMul
  [T, I/tp]); MoE layers use ``fused_moe.py``'s workspaces (a shared [M, top_k, max(2I/tp, H)] cache and
  [M x top_k, I/tp]).
* budget — ``vllm/v1/worker/gpu_worker.py: determine_available_memory``: 0.9.2+ (``memory_profiling``,
  ``vllm/utils``): requested = total x gpu_memory_utilization; KV = requested - (weights + torch peak increase of
  the profile run + non-torch memory increase since the worker started), the CUDA context excluded; 0.8.0-0.9.1
  subtract the whole non-torch memory (CUDA context included) and the torch peak from the device's total use.
* KV — ``vllm/v1/core/kv_cache_utils.py``: page = block_size x 2 x kv_heads/tp x head_dim x dtype bytes per
  layer; blocks = available // (page x layers); "GPU KV cache size" = blocks x block_size tokens; "Maximum
  concurrency" = blocks / ceil(max_model_len / block_size); the largest max_model_len is what
  ``_check_enough_kv_cache_memory`` accepts.
* CUDA graphs — captured after the KV cache is allocated (``compile_or_warm_up_model``), so not in the budget:
  they must fit in the (1 - utilization) headroom. vramplan reports the graphs' shared memory pool (one forward
  at the largest capture size, ``max_cudagraph_capture_size`` = min(2 x max_num_seqs, 512)); the driver's
  per-graph memory is not modelled (published logs show 6-28 MiB per captured size, 0.1-1.5 GiB in all:
  vllm PRs 11349, 22897), so ``cuda_graph_bytes`` is a lower bound. vLLM 0.21+ profiles graph memory and
  subtracts it (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS): outside the versions modelled.

Not modelled: the FlashInfer sampler (VLLM_USE_FLASHINFER_SAMPLER=1: no sort), speculative decoding, LoRA,
multimodal encoders, hybrid (Mamba) and sliding-window page sharing, V0.

SGLang (``python/sglang/srt/server_args.py``: ``mem_fraction_static`` defaults 0.88/0.87/0.85/0.81/0.79 for
TP 1/2/4/8/16; ``model_executor/model_runner.py: profile_max_num_token``): token pool = (free memory after the
weights - memory at start x (1 - mem_fraction_static)) // (kv_heads/tp x head_dim x layers x 2 x dtype bytes),
the memory at start being what is free after the CUDA context and (several GPUs) NCCL's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._engine.step import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES
from ..errors import WorkloadError
from ..memory import model_states
from ..spec import ATTENTION_MIXERS, ModelSpec
from ..units import GiB, MiB
from ..workload import Task, WeightsQuant, Workload

__all__ = ["ENGINES", "ServingConfig", "ServingResult", "serve_memory", "sglang_mem_fraction", "vllm_defaults"]

ENGINES = ("vllm", "sglang", "transformers", "llama.cpp")
VLLM_VERSIONS = ("0.8", "0.9", "0.10", "0.11")  # V1 engine; "X.Y" or "X.Y.Z"
DEFAULT_VLLM_VERSION = "0.11.0"
_PROFILING_UTIL = (0, 9, 2)  # PR 19312: V1 sizes the KV cache with vllm/utils memory_profiling from 0.9.2
_HW_DEFAULTS = (0, 9, 0)  # PR 17885: defaults by GPU (>= 70 GiB and not A100: 8192 / 1024) from 0.9.0
KV_DTYPES = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bf16": 2, "fp16": 2, "float16": 2, "bfloat16": 2}
VOCAB_PAD = 64  # vllm/model_executor/layers/vocab_parallel_embedding.py: DEFAULT_VOCAB_PADDING_SIZE
# Non-torch memory that appears after the worker's first snapshot: lazily loaded kernels and cuBLASLt/cuDNN handles,
# and — the snapshot is taken before init_worker_distributed_environment — NCCL's communicator buffers and the
# custom all-reduce buffers when several GPUs talk. Driver-level, not derivable from vLLM's Python source: taken
# from published logs. One GPU: 0.16 GiB (vllm PR 12126, H100). NCCL over NVLink: +1.79 GiB (vllm PR 10511, H100:
# non_torch_memory 3.58 GiB at TP 2 against 1.79 GiB at TP 1); over PCIe: +0.14 GiB (vllm issue 15815, L40S TP 2:
# 0.30 GiB).
NON_TORCH_ONE_GPU = int(0.16 * GiB)
NCCL_NVLINK = int(1.79 * GiB)
NCCL_PCIE = int(0.14 * GiB)


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """A ``vllm serve`` / ``sglang.launch_server`` command line (None: the engine's default)."""

    engine: str = "vllm"
    tp: int = 1
    pp: int = 1
    gpu_memory_utilization: float | None = None  # vLLM 0.9; SGLang: mem_fraction_static
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    enforce_eager: bool = False
    engine_version: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ("vllm", "sglang"):
            raise WorkloadError(f"engine {self.engine!r}: the serving model covers vllm and sglang (llama.cpp reads a "
                                "GGUF file: vramplan estimate MODEL.gguf)")
        for name in ("tp", "pp", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
                raise WorkloadError(f"--{name.replace('_', '-')} must be an integer in 1..1024, got {v!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 24):
                raise WorkloadError(f"--{name.replace('_', '-')} must be an integer in 1..16777216, got {v!r}")
        u = self.gpu_memory_utilization
        if u is not None and not (isinstance(u, int | float) and 0 < u <= 1):
            raise WorkloadError(f"--gpu-memory-utilization must be in (0, 1], got {u!r}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise WorkloadError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of: {', '.join(KV_DTYPES)} "
                                "(q8_0/q4_0 are llama.cpp's: use a .gguf model)")
        if self.engine == "vllm" and self.engine_version is not None and \
                ".".join(self.version.split(".")[:2]) not in VLLM_VERSIONS:
            raise WorkloadError(f"--engine-version {self.engine_version!r}: vLLM versions modelled are "
                                f"{', '.join(VLLM_VERSIONS)} (V1 engine)")

    @property
    def version(self) -> str:
        """``X.Y.Z`` (a bare ``X.Y`` means its first release, ``X.Y.0``)."""
        v = (self.engine_version or DEFAULT_VLLM_VERSION).strip().lstrip("v")
        parts = v.split(".")
        if not (2 <= len(parts) <= 3) or not all(p.isdigit() for p in parts):
            raise WorkloadError(f"--engine-version {self.engine_version!r}: give a vLLM version such as 0.10 or 0.9.2")
        return ".".join([*parts, "0"][:3])

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split("."))


@dataclass(frozen=True, slots=True)
class ServingResult:
    """What the engine allocates on the most loaded GPU, and what its KV cache holds."""

    engine: str
    engine_version: str
    gpu_name: str
    total_memory_bytes: int  # what the driver reports (torch.cuda.mem_get_info()[1])
    tp: int
    pp: int
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    weights_bytes: int  # per GPU
    profile_peak_bytes: int  # torch peak increase of the profile run (forward + sampler)
    forward_peak_bytes: int
    sampler_peak_bytes: int
    non_torch_bytes: int  # what the engine subtracts besides torch memory
    cuda_graph_bytes: int  # not in the budget: must fit in the headroom
    kv_cache_bytes: int  # the budget the KV cache gets
    kv_bytes_per_token: int  # per GPU
    kv_cache_dtype: str
    block_size: int
    gpu_blocks: int
    kv_tokens: int
    max_concurrency: float  # requests of max_model_len tokens
    max_model_len_fit: int  # the largest max_model_len the KV budget accepts (capped by the model's context)
    fits: bool
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "engine_version": self.engine_version, "gpu": self.gpu_name,
                "total_memory_bytes": self.total_memory_bytes, "tp": self.tp, "pp": self.pp,
                "gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "weights_bytes": self.weights_bytes, "profile_peak_bytes": self.profile_peak_bytes,
                "forward_peak_bytes": self.forward_peak_bytes, "sampler_peak_bytes": self.sampler_peak_bytes,
                "non_torch_bytes": self.non_torch_bytes, "cuda_graph_bytes": self.cuda_graph_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_cache_dtype": self.kv_cache_dtype, "block_size": self.block_size, "gpu_blocks": self.gpu_blocks,
                "kv_tokens": self.kv_tokens, "max_concurrency": round(self.max_concurrency, 2),
                "max_model_len_fit": self.max_model_len_fit, "fits": self.fits,
                "assumptions": list(self.assumptions), "warnings": list(self.warnings)}


def vllm_defaults(total_memory_bytes: int, gpu_name: str, version: tuple[int, ...]) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) ``vllm serve`` picks (vllm/engine/arg_utils.py)."""
    if version < _HW_DEFAULTS or (total_memory_bytes >= 70 * GiB and "a100" not in gpu_name.lower()):
        return 8192, 1024
    return 2048, 256


def sglang_mem_fraction(tp: int) -> float:
    """SGLang's default ``mem_fraction_static`` by tensor-parallel size (server_args.py)."""
    return 0.79 if tp >= 16 else 0.81 if tp >= 8 else 0.85 if tp >= 4 else 0.87 if tp >= 2 else 0.88


def _pad(x: int, n: int) -> int:
    return -(-x // n) * n


def _weights_per_gpu(spec: ModelSpec, w: Workload, tp: int, pp: int, elem: int) -> tuple[int, int]:
    """(bytes on the most loaded GPU, bytes on the last pipeline stage) of vLLM's sharded model."""
    st = model_states(spec, w)
    total = st.weights + st.quant_constants
    h, v, n = spec.hidden_size, spec.vocab_size, spec.num_layers
    d = spec.embed_proj_dim or h
    embed = v * d * elem + spec.max_learned_positions * h * elem
    head = 0 if spec.tie_word_embeddings else v * d * elem
    norm_layer = spec.norms_per_layer * h * elem + (2 * spec.head_dim * elem if spec.qk_norm else 0)
    final_norm = h * elem
    layer = (total - embed - head - n * norm_layer - final_norm) / n  # linears (and biases) of one layer
    kv_rep = 0.0
    if spec.num_kv_heads < tp:  # vLLM replicates KV heads when there are fewer than TP ranks
        kv_rep = 2 * h * spec.head_dim * (1 - spec.num_kv_heads / tp) * elem
    vocab_rank = _pad(v, VOCAB_PAD * tp) // tp * d * elem
    stage_layers = -(-n // pp)
    first = stage_layers * (layer / tp + kv_rep + norm_layer) + vocab_rank
    last_layers = n - (pp - 1) * stage_layers if pp > 1 else n
    last = last_layers * (layer / tp + kv_rep + norm_layer) + final_norm + (
        vocab_rank if (head or pp > 1) else 0)
    if pp == 1:
        both = stage_layers * (layer / tp + kv_rep + norm_layer) + final_norm + vocab_rank + (vocab_rank if head else 0)
        return int(both), int(both)
    return int(max(first, last)), int(last)


def _forward_peak(spec: ModelSpec, tokens: int, tp: int, a: int) -> int:
    """vLLM decoder-layer forward at ``tokens`` tokens, per rank (bytes above the resident weights)."""
    h = spec.hidden_size
    q = spec.q_dim // tp
    kv = max(1, spec.num_kv_heads // tp) * spec.head_dim
    attn = tokens * (q + 2 * kv + q) * a
    inter = spec.intermediate_size // tp
    mlp = tokens * 3 * inter * a
    if spec.is_moe:
        i = spec.moe_intermediate_size // tp
        m = min(tokens, 32768)  # VLLM_FUSED_MOE_CHUNK_SIZE
        k = spec.experts_per_token
        moe = m * k * (max(2 * i, h) + i) * a + tokens * spec.num_experts * 4
        if spec.shared_expert_intermediate_size:
            moe += tokens * 3 * (spec.shared_expert_intermediate_size // tp) * a
        mlp = max(mlp if len(spec.moe_layers) < spec.num_layers else 0, moe)
    return 2 * tokens * h * a + max(attn, mlp)


def _sampler_peak(spec: ModelSpec, tokens: int, reqs: int, a: int) -> int:
    """``_dummy_sampler_run`` over [reqs, vocab] (native top-k/top-p path), plus the hidden states still live."""
    u = reqs * spec.vocab_size * 4
    sort = u * 19 // 2 if reqs >= 128 else u * 23 // 2
    return tokens * spec.hidden_size * a + 2 * reqs * spec.hidden_size * a + sort


def serve_memory(spec: ModelSpec, cfg: ServingConfig, *, total_memory_bytes: int, gpu_name: str = "",
                 nvlink: bool = True, weights_quant: WeightsQuant = WeightsQuant.NONE,
                 quant_group_size: int | None = None, dtype_bytes: int = 2) -> ServingResult:
    """vLLM's (or SGLang's) memory plan for ``spec`` served with ``cfg`` on GPUs of ``total_memory_bytes``."""
    w = Workload(task=Task.INFER, weights_quant=weights_quant, quant_group_size=quant_group_size)
    tp, pp, a = cfg.tp, cfg.pp, dtype_bytes
    if spec.num_layers < pp:
        raise WorkloadError(f"--pp {pp} exceeds the model's {spec.num_layers} layers")
    if spec.num_heads % tp:
        raise WorkloadError(f"--tp {tp} must divide the {spec.num_heads} attention heads")
    version = cfg.version if cfg.engine == "vllm" else "sglang"
    limit = spec.max_position_embeddings or 1 << 20
    max_len = cfg.max_model_len or limit
    warnings: list[str] = []
    if cfg.max_model_len and spec.max_position_embeddings and cfg.max_model_len > spec.max_position_embeddings:
        warnings.append(f"max_model_len {cfg.max_model_len:,} exceeds the model's {limit:,} positions; vLLM refuses it "
                        "unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")
    vt = cfg.version_tuple if cfg.engine == "vllm" else (0, 11, 0)
    old_budget = vt < _PROFILING_UTIL
    d_tokens, d_seqs = vllm_defaults(total_memory_bytes, gpu_name, vt)
    tokens = cfg.max_num_batched_tokens or d_tokens
    seqs = min(cfg.max_num_seqs or d_seqs, tokens)
    reqs = min(seqs, tokens)
    weights, _ = _weights_per_gpu(spec, w, tp, pp, a)
    kv_elem = KV_DTYPES[cfg.kv_cache_dtype] or a
    # hybrid / state-space models: only attention layers grow with the tokens; the SSM layers hold a fixed state per
    # sequence (vLLM V1 MambaSpec pages: conv + SSM state, model dtype)
    attn_layers = -(-spec.attention_layers // pp)
    per_token = attn_layers * 2 * max(1, spec.num_kv_heads // tp) * spec.head_dim * kv_elem
    if spec.layer_overrides:  # layers with their own head sizes, or none of their own (Gemma 4's KV sharing)
        caching = [spec.layer(i) for i in range(spec.num_layers)
                   if spec.mixer(i) in ATTENTION_MIXERS and not spec.layer(i).kv_shared]
        per_token = -(-sum(2 * max(1, x.num_kv_heads // tp) * x.head_dim for x in caching) * kv_elem // pp)
    from ..fit import state_bytes_per_sequence

    state = -(-state_bytes_per_sequence(spec, a) // (pp * tp))
    forward = _forward_peak(spec, tokens, tp, a) + CUBLAS_WORKSPACE_BYTES
    sampler = _sampler_peak(spec, tokens, reqs, a) + CUBLAS_WORKSPACE_BYTES
    profile = max(forward, sampler)  # the last stage samples; earlier stages only run the forward
    non_torch = NON_TORCH_ONE_GPU + ((NCCL_NVLINK if nvlink else NCCL_PCIE) if tp * pp > 1 else 0)
    assumptions: list[str] = []
    graph = 0 if cfg.enforce_eager else _forward_peak(spec, min(2 * seqs, 512, tokens), tp, a)
    if cfg.engine == "sglang":
        frac = cfg.gpu_memory_utilization or sglang_mem_fraction(tp)
        # model_runner.py measures the memory at start after torch.distributed is up: the CUDA context and, with
        # several GPUs, NCCL's buffers are already taken
        non_torch = CUDA_CONTEXT_BYTES + (non_torch - NON_TORCH_ONE_GPU)
        start = total_memory_bytes - non_torch
        budget = int(start * frac) - weights
        util = frac
        profile = forward = sampler = 0
        assumptions.append(f"SGLang: token pool = {frac} x (memory free at start) - weights (mem_fraction_static "
                           f"{'given' if cfg.gpu_memory_utilization else 'default for TP ' + str(tp)}); activations, "
                           "CUDA graphs and the sampler live in the rest")
        graph_pool = graph
    else:
        util = cfg.gpu_memory_utilization if cfg.gpu_memory_utilization is not None else 0.9
        requested = int(total_memory_bytes * util)
        if old_budget:
            non_torch += CUDA_CONTEXT_BYTES
            assumptions.append("vLLM 0.8.0-0.9.1 V1: the budget subtracts all non-torch memory, the CUDA context "
                               "included (gpu_worker.py before PR 19312)")
        else:
            assumptions.append("vLLM >= 0.9.2 V1: the budget subtracts the non-torch increase since the worker started "
                               "(vllm/utils memory_profiling), not the CUDA context")
        budget = requested - weights - profile - non_torch
        if pp > 1:  # every stage sizes its own cache; vLLM keeps the smallest block count
            first_budget = requested - weights - forward - non_torch
            budget = min(budget, first_budget)
        graph_pool = graph
        assumptions.append(
            f"profile run: forward of {tokens} tokens, then the sampler over {reqs} requests x {spec.vocab_size:,} "
            "vocabulary (fp32 logits, sort values + int64 indices + CUDA sort buffers: 9.5 x requests x vocab x 4 "
            "bytes)")
        if cfg.max_num_batched_tokens is None or cfg.max_num_seqs is None:
            assumptions.append(f"defaults of `vllm serve` on this GPU: max_num_batched_tokens {d_tokens}, "
                               f"max_num_seqs {d_seqs} (vllm/engine/arg_utils.py)")
    budget = max(0, budget)
    page = cfg.block_size * per_token
    per_req = -(-max_len // cfg.block_size)
    if state:  # each request: its SSM state plus the attention layers' blocks
        concurrency = budget / (state + per_req * page)
        blocks = int(concurrency) * per_req if page else int(concurrency)
        fit_len = min((budget - state) // per_token if per_token else (limit if budget >= state else 0), limit)
        fit_len = max(0, fit_len)
        assumptions.append(f"SSM layers: a fixed {state / MiB:.1f} MiB state per request (conv + SSM state), not per "
                           "token; only the attention layers' cache grows with the context")
    else:
        blocks = budget // page if page else 0
        concurrency = blocks / per_req if per_req else 0.0
        fit_len = min(budget // per_token if per_token else 0, limit)
    kv_tokens = blocks * cfg.block_size
    headroom = total_memory_bytes - int(total_memory_bytes * util) - (0 if old_budget else CUDA_CONTEXT_BYTES)
    fits = blocks > 0 and fit_len >= max_len and (cfg.engine != "vllm" or graph_pool <= max(headroom, 0))
    if blocks == 0:
        warnings.append("no memory left for the KV cache: the weights and the profile run take the whole budget; "
                        "raise --gpu-memory-utilization, add GPUs (--tp) or lower --max-num-seqs")
    elif fit_len < max_len:
        warnings.append(f"the KV cache holds {kv_tokens:,} tokens: fewer than one request of max_model_len "
                        f"{max_len:,}; vLLM refuses to start — use --max-model-len {fit_len:,} or less")
    if cfg.engine == "vllm" and graph_pool > headroom:
        warnings.append(f"CUDA graphs (~{graph_pool / GiB:.2f} GiB) may not fit in the {1 - util:.0%} headroom; lower "
                        "--gpu-memory-utilization or use --enforce-eager")
    if spec.sliding_layers:
        assumptions.append("sliding-window layers are sized for the full context (vLLM's hybrid allocator can give "
                           "them fewer blocks)")
    return ServingResult(cfg.engine, version, gpu_name, total_memory_bytes, tp, pp, util, max_len, seqs, tokens,
                         weights, profile, forward, sampler, non_torch, graph_pool, budget, per_token,
                         cfg.kv_cache_dtype, cfg.block_size, blocks, kv_tokens, concurrency, fit_len, fits,
                         tuple(assumptions), tuple(warnings))
