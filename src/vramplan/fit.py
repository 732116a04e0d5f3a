"""Does a workload fit a GPU, with what headroom, and how far can it grow?

Every answer is solved on the estimator, not guessed: memory never falls as the batch or the sequence
grows (``tests/test_properties.py`` checks that invariant), so the largest batch and the longest
sequence that fit are found exactly by exponential then binary search over
:func:`vramplan.estimator.estimate`. "Fits" means the whole process (``total_bytes``: peak allocated
+ allocator slack + CUDA context) is within the GPU's usable memory.

For inference, :func:`kv_capacity` also answers the serving question the way vLLM sizes its KV cache:
profile one forward of ``max_num_batched_tokens`` tokens (weights + activation peak), reserve
``gpu_memory_utilization`` of the GPU's memory, and cut what is left after the profile peak and the
CUDA context into blocks of 16 tokens (``vllm/v1/worker/gpu_worker.py: determine_available_memory``,
``vllm/v1/core/kv_cache_utils.py``).

Known limits: one GPU; the KV budget follows vLLM's method but vramplan's estimator, not vLLM's own
profile (its CUDA graphs, sampler and custom kernels are not modelled); every layer's KV is sized for
the full length (vLLM's hybrid allocator can give sliding-window layers less).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import WorkloadError
from .estimator import CUDA_CONTEXT_BYTES, estimate, peak_allocated
from .hardware import GPU
from .kinds import MemoryKind, Phase
from .result import Estimate
from .spec import MAMBA2_MIXERS, ModelSpec
from .units import GiB
from .workload import LogitsMode, Precision, Task, WeightsQuant, Workload

__all__ = ["VLLM_BLOCK_TOKENS", "FitResult", "KVCapacity", "VisionFitResult", "check_fit", "check_vision_fit",
           "kv_capacity", "largest_confirmed", "largest_fitting"]

VLLM_BLOCK_TOKENS = 16  # vLLM's default block_size (tokens per KV block) on CUDA
_MAX_BATCH = 1 << 20  # Workload's own limits
_MAX_SEQ = 1 << 24
_MAX_TOKENS = 1 << 31


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest ``n`` in 1..cap with ``fits(n)``, for ``fits`` true up to some n and false after; 0 if none.

    Exponential search for a bracket, then bisection: about 2 log2(answer) calls.
    """
    if cap < 1 or not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        if fits(cap):
            return cap
        hi = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_confirmed(cheap: Callable[[int], int | None], total: Callable[[int], int | None], budget: int,
                      cap: int) -> int:
    """The largest ``n`` in 1..cap with ``total(n) <= budget`` (0 if none), for ``total`` monotone and
    expensive and ``cheap`` a lower bound of it that is close up to a slowly varying factor: the answer for
    ``cheap`` scaled by the factor of the last ``total`` is refined a few times, then confirmed with
    ``total`` on both sides of the boundary."""

    lo, hi = 0, cap + 1  # largest n known to fit, smallest known not to
    last: list[int | None] = [None]

    def fits(k: int) -> bool:
        nonlocal lo, hi
        t = last[0] = total(k)
        ok = t is not None and t <= budget
        if ok:
            lo = max(lo, k)
        else:
            hi = min(hi, k)
        return ok

    ratio = 1.0
    n = 0
    for _ in range(3):
        def guess(k: int, r: float = ratio) -> bool:
            c = cheap(k)
            return c is not None and c * r <= budget

        n = largest_fitting(guess, cap)
        if not lo < n < hi:
            break
        c = cheap(n)
        fits(n)
        t = last[0]
        if t is None or not c:
            break
        ratio = t / c
    # bracket the boundary with ``total`` from the last guess outwards, then bisect
    step = 1
    while hi > cap and lo < cap:
        fits(min(cap, lo + step))
        step *= 2
    step = 1
    while lo == 0 and hi > 1:
        fits(max(1, hi - step))
        step *= 2
    if hi - lo > 2 and lo and hi <= cap:
        step = 1
        while lo + step < hi and fits(lo + step):
            step *= 2
        step = 1
        while hi - step > lo and not fits(hi - step):
            step *= 2
    while hi - lo > 1:
        fits((lo + hi) // 2)
    return lo


ENVELOPE_EXACT_BATCH = 16  # up to this batch, every smaller batch is estimated; above it a ladder of 16


def _batch_ladder(b: int) -> list[int]:
    """The batches 1..b: all of them up to ENVELOPE_EXACT_BATCH, else that many evenly spread ones (b included)."""
    if b <= ENVELOPE_EXACT_BATCH:
        return list(range(1, b + 1))
    return sorted({-(-b * j // ENVELOPE_EXACT_BATCH) for j in range(1, ENVELOPE_EXACT_BATCH + 1)})


def batch_envelope(total: Callable[[int], int | None], b: int) -> int:
    """The largest ``total(b')`` over the batches ``b' <= b`` (0 for b < 1; a batch that cannot be built counts
    as 0): what fit decides on, so that the OOM margin never grows with the batch."""
    return max((t for k in _batch_ladder(b) if (t := total(k)) is not None), default=0)


def first_failure(total: Callable[[int], int | None], budget: int, cap: int) -> int:
    """The smallest batch in 1..cap (on :func:`_batch_ladder`) whose total exceeds ``budget``; cap + 1 if none."""
    for k in _batch_ladder(cap):
        t = total(k)
        if t is None or t > budget:
            return k
    return cap + 1


def _total(spec: ModelSpec, w: Workload, name: str) -> int | None:
    """Process memory of ``w``; None if the workload cannot be built at that size."""
    try:
        return estimate(spec, w, name=name).total_bytes
    except WorkloadError:
        return None


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """How many sequences of ``sequence_tokens`` tokens a vLLM-style KV budget holds."""

    gpu_memory_utilization: float
    block_tokens: int
    profile_tokens: int
    profile_peak_bytes: int  # weights + activation peak of the profiling forward (without its KV)
    non_torch_bytes: int  # CUDA context
    kv_bytes_per_token: int
    kv_budget_bytes: int
    num_blocks: int
    sequence_tokens: int
    max_concurrent_sequences: int

    @property
    def max_tokens_in_cache(self) -> int:
        return self.num_blocks * self.block_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"method": "vllm", "gpu_memory_utilization": self.gpu_memory_utilization,
                "block_tokens": self.block_tokens, "profile_tokens": self.profile_tokens,
                "profile_peak_bytes": self.profile_peak_bytes, "non_torch_bytes": self.non_torch_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "kv_budget_bytes": self.kv_budget_bytes,
                "num_blocks": self.num_blocks, "max_tokens_in_cache": self.max_tokens_in_cache,
                "sequence_tokens": self.sequence_tokens, "max_concurrent_sequences": self.max_concurrent_sequences}


def kv_bytes_per_token(spec: ModelSpec, elem: int) -> int:
    """Keys and values of one token over every attention layer: 2 x kv_heads x head_dim x bytes x layers (the
    Mamba layers of a hybrid keep a fixed state per sequence instead: :func:`state_bytes_per_sequence`)."""
    return spec.kv_cache_layers_per_token * elem


def state_bytes_per_sequence(spec: ModelSpec, elem: int) -> int:
    """The fixed-size cache one sequence holds in the SSM layers (conv + recurrent state), whatever its length
    (vLLM's MambaSpec: one page per request, the state in the model dtype with mamba_ssm_cache_dtype "auto")."""
    ss = spec.ssm
    if ss is None:
        return 0
    total = 0
    for i in range(spec.num_layers):
        kind = spec.mixer(i)
        if kind == "conv":  # LFM2 short conv: the conv state only
            total += ss.d_inner * ss.d_conv * elem
        elif kind == "mamba" or (kind in MAMBA2_MIXERS and ss.dt_rank):  # Mamba-1 (Zamba's hybrid layers too)
            total += ss.d_inner * (ss.d_conv + ss.d_state) * elem
        elif kind in MAMBA2_MIXERS or kind == "gdn":  # gated DeltaNet: the same conv width and state (vramplan.gdn)
            total += (ss.conv_dim * ss.d_conv + ss.n_heads * ss.head_dim * ss.d_state) * elem
    return total


def kv_capacity(spec: ModelSpec, w: Workload, gpu: GPU, *, gpu_memory_utilization: float = 0.9,
                max_num_batched_tokens: int = 8192, name: str | None = None) -> KVCapacity:
    """vLLM's KV-cache budget for serving ``w``'s model and precision on ``gpu``.

    budget = usable memory x utilisation - (weights + activation peak of one profiling forward of
    min(max_num_batched_tokens, sequence) tokens) - CUDA context; blocks = budget // (16 tokens x KV
    bytes per token); sequences = blocks // ceil((prompt + new tokens) / 16).
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise WorkloadError(f"gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_num_batched_tokens < 1:
        raise WorkloadError("max-num-batched-tokens must be at least 1")
    seq_tokens = w.seq_len + w.new_tokens
    profile_tokens = min(max_num_batched_tokens, seq_tokens)
    profile_w = w.with_(task=Task.INFER, batch_size=1, seq_len=profile_tokens, new_tokens=0,
                        logits=LogitsMode.LAST, gradient_accumulation=1)
    est = estimate(spec, profile_w, name=name or spec.name)
    prefill = next(p for p in est.phases if p.phase is Phase.PREFILL)
    profile_peak = prefill.peak_allocated_bytes - prefill.breakdown[MemoryKind.KV_CACHE]
    elem = 4 if w.precision is Precision.FP32 and w.base_quant is WeightsQuant.NONE else 2  # the model dtype
    per_token = kv_bytes_per_token(spec, elem)
    budget = int(gpu.usable_memory_bytes * gpu_memory_utilization) - profile_peak - CUDA_CONTEXT_BYTES
    block_bytes = VLLM_BLOCK_TOKENS * per_token
    per_seq = -(-seq_tokens // VLLM_BLOCK_TOKENS)
    state = state_bytes_per_sequence(spec, elem)
    if state:  # hybrid / state-space: each sequence also holds its SSM state
        seqs = max(0, budget) // (per_seq * block_bytes + state)
        blocks = seqs * per_seq if block_bytes else 0
        return KVCapacity(gpu_memory_utilization, VLLM_BLOCK_TOKENS, profile_tokens, profile_peak,
                          CUDA_CONTEXT_BYTES, per_token, budget, blocks, seq_tokens, seqs)
    blocks = max(0, budget) // block_bytes if block_bytes else 0
    return KVCapacity(gpu_memory_utilization, VLLM_BLOCK_TOKENS, profile_tokens, profile_peak, CUDA_CONTEXT_BYTES,
                      per_token, budget, blocks, seq_tokens, blocks // per_seq if per_seq else 0)


@dataclass(frozen=True, slots=True)
class _FitAnswer:
    """What a fit says for every model kind: ``estimate`` against ``gpu``'s usable memory, and the largest batch
    that fits (at the workload's sequence length or resolution; 0 when even batch 1 does not fit)."""

    model: str
    gpu: str
    gpu_display_name: str
    usable_memory_bytes: int
    estimate: Estimate
    fits: bool
    headroom_bytes: int  # usable memory minus total_bytes (negative: short by that much)
    max_batch_size: int

    @property
    def peak_allocated_bytes(self) -> int:
        return self.estimate.peak_allocated_bytes

    @property
    def total_bytes(self) -> int:
        return self.estimate.total_bytes

    def _memory_dict(self) -> dict[str, Any]:
        """The first keys of ``to_dict``, the same for every model kind."""
        return {"model": self.model, "gpu": self.gpu, "gpu_display_name": self.gpu_display_name,
                "fits": self.fits, "usable_memory_bytes": self.usable_memory_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes, "total_bytes": self.total_bytes,
                "headroom_bytes": self.headroom_bytes, "oom_margin_bytes": self.headroom_bytes,
                "peak_reserved_bytes": self.estimate.peak_reserved_bytes,
                "nvidia_smi_bytes": self.total_bytes}  # reserved + CUDA context: what nvidia-smi shows


@dataclass(frozen=True, slots=True)
class FitResult(_FitAnswer):
    """Whether ``estimate`` fits ``gpu``, and the largest batch and sequence that would."""

    max_seq_len: int  # at the workload's batch size; 0 when even one token does not fit
    context_limit: int | None  # the model's max_position_embeddings
    kv: KVCapacity | None
    step_time_s: float | None  # training step (or inference prefill) time on this GPU, from vramplan.perf
    tokens_per_s: float | None  # training tokens per second, or (inference) generated tokens per second

    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    per_gpu: Any = None  # with a layout: the ParallelEstimate of the most loaded GPU (fits is judged on it)
    # does not fit, but would with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: its total_bytes (else None)
    expandable_total_bytes: int | None = None

    @property
    def peak_allocated_bytes(self) -> int:
        return self.per_gpu.peak_allocated_bytes if self.per_gpu is not None else self.estimate.peak_allocated_bytes

    @property
    def total_bytes(self) -> int:
        return self.per_gpu.total_bytes if self.per_gpu is not None else self.estimate.total_bytes

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.per_gpu is None else {"gpus": self.per_gpu.layout.gpus, "per_gpu": self.per_gpu.to_dict(),
                                                 "single_gpu_total_bytes": self.estimate.total_bytes}
        return extra | self._memory_dict() | {
            "alloc_conf_suggestion": "expandable_segments:True" if self.expandable_total_bytes else None,
            "expandable_total_bytes": self.expandable_total_bytes, "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len, "context_limit": self.context_limit,
            "kv_cache": self.kv.to_dict() if self.kv else None, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s, "workload": dict(self.estimate.workload),
            "assumptions": list(self.assumptions), "warnings": list(self.warnings)}


def check_fit(spec: ModelSpec, w: Workload, gpu: GPU, *, name: str | None = None,
              gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 8192,
              layout: Any = None, links: Any = None) -> FitResult:
    """Fit, headroom, largest batch, longest sequence (and for inference the vLLM KV capacity) of ``w``.

    With a :class:`~vramplan.parallel.Layout` (``vramplan fit --gpus 8 --fsdp full``) every answer is for the
    most loaded GPU of ``layout.gpus`` of ``gpu``: fits and headroom on its memory, the largest micro-batch per
    data-parallel rank and the longest sequence under the layout (:func:`vramplan.parallel.estimate_parallel`).
    """
    label = name or spec.name
    # decide on what the process holds on this GPU: the estimate's total (reserved + the calibration GPU's
    # CUDA context) with this GPU's context instead, against what CUDA reports as its total
    usable = gpu.usable_memory_bytes - ((gpu.cuda_context_bytes or CUDA_CONTEXT_BYTES) - CUDA_CONTEXT_BYTES)
    est = estimate(spec, w, name=label)
    per_gpu = None
    from .parallel import estimate_parallel
    from .parallel.streams import replays

    if layout is not None:
        per_gpu = estimate_parallel(spec, w, layout, links)

    def total_of(x: Workload) -> int | None:
        if layout is None:
            return _total(spec, x, label)
        try:
            # several GPUs: a rank whose allocation stream is modelled (FSDP, ZeRO, TP) is replayed; the other
            # layouts use the calibration slack, so their single-GPU reference needs no allocator replay
            return estimate_parallel(spec, x, layout, links,
                                     reserved=layout.is_single or replays(layout, x)).total_bytes
        except WorkloadError:
            return None

    def fits_batch(b: int) -> bool:
        t = total_of(w.with_(batch_size=b))
        return t is not None and t <= usable

    def fits_seq(s: int) -> bool:
        t = total_of(w.with_(seq_len=s))
        return t is not None and t <= usable

    # one GPU and a replayed rank: the searches guess without the allocator replay (one GPU: the allocated peak;
    # a rank: the layout's analytic total), scaled by the reserved/allocated ratio of the last full estimate, then
    # confirm the boundary with full totals
    def guess_of(x: Workload) -> int | None:
        try:
            if layout is None:
                return peak_allocated(spec, x) + CUDA_CONTEXT_BYTES
            return estimate_parallel(spec, x, layout, links, reserved=False).total_bytes
        except WorkloadError:
            return None

    extra = 0 if w.is_train else w.new_tokens
    cap_b = min(_MAX_BATCH, _MAX_TOKENS // (w.seq_len + extra))
    cap_s = min(_MAX_SEQ, _MAX_TOKENS // w.batch_size - extra)
    if layout is None or (not layout.is_single and replays(layout, w)):
        max_batch = largest_confirmed(lambda b: guess_of(w.with_(batch_size=b)),
                                      lambda b: total_of(w.with_(batch_size=b)), usable, cap_b)
        max_seq = largest_confirmed(lambda s: guess_of(w.with_(seq_len=s)),
                                    lambda s: total_of(w.with_(seq_len=s)), usable, cap_s)
    else:
        max_batch = largest_fitting(fits_batch, cap_b)
        max_seq = largest_fitting(fits_seq, cap_s)
    # what the allocator reserves is not monotone in the batch: the largest batch is the largest b whose every
    # smaller batch fits as well (the first failure from below caps it)
    max_batch = min(max_batch, first_failure(lambda b: total_of(w.with_(batch_size=b)), usable, max_batch) - 1)
    one_gpu = layout is None
    kv = None if w.is_train or not one_gpu else kv_capacity(
        spec, w, gpu, gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
        name=label)
    step_s, tps = _speed(spec, w, gpu) if one_gpu else (None, None)
    total = est.total_bytes if per_gpu is None else per_gpu.total_bytes
    # decide on the running maximum over the smaller batches at this sequence length (monotone in the batch)
    total = max(total, batch_envelope(lambda b: total_of(w.with_(batch_size=b)), w.batch_size - 1))
    where = "" if per_gpu is None else f" on the most loaded of {per_gpu.layout.gpus} GPUs ({per_gpu.engine.value})"
    sampled = "" if w.batch_size - 1 <= ENVELOPE_EXACT_BATCH else f" (sampled above batch {ENVELOPE_EXACT_BATCH})"
    assumptions = [
        f"fits: total_bytes (what the caching allocator reserves + CUDA context"
        f"{'' if per_gpu is None else ' + NCCL buffers'}){where}, and that of every "
        f"smaller batch at this sequence length{sampled}, <= {gpu.display_name}'s usable memory, "
        f"{usable / GiB:.2f} GiB; OOM margin {(usable - total) / GiB:+.2f} GiB "
        "(reserved memory is not monotone in the batch: cached blocks of one step serve the next step's tensors "
        "or do not, so a smaller batch can reserve more; the margin is monotone in the batch)",
        "largest batch: the largest batch whose every smaller batch fits; longest sequence: exponential + binary "
        "search on the estimator at this batch (the allocated peak is monotone in both, what is reserved is not: "
        "a shorter sequence can reserve more)",
    ]
    if kv is not None:
        assumptions.append(
            f"concurrent sequences (vLLM method): {gpu_memory_utilization:.0%} of usable memory, minus the "
            f"weights + activation peak of one {kv.profile_tokens}-token profiling forward and the CUDA "
            f"context, in KV blocks of {VLLM_BLOCK_TOKENS} tokens; each sequence holds "
            f"ceil({kv.sequence_tokens}/{VLLM_BLOCK_TOKENS}) blocks")
    if not one_gpu:
        assumptions.append("several GPUs: the batch is the micro-batch of one data-parallel rank; step time and "
                           "the vLLM KV budget are answered for one GPU only (vramplan plan times layouts)")
    warnings = list(est.warnings) + ([] if per_gpu is None else list(per_gpu.warnings))
    limit = spec.max_position_embeddings
    if limit and max_seq > limit:
        warnings.append(f"memory allows {max_seq:,} tokens but the model was trained for {limit:,} positions")
    expandable = None
    if one_gpu and total > usable and est.peak_reserved_bytes and "expandable_segments:true" not in \
            w.alloc_conf.replace(" ", "").lower() and est.total_bytes - est.peak_reserved_bytes + \
            est.peak_allocated_bytes <= usable:
        # one growable segment per pool instead of fixed ones (PyTorch's advice against fragmentation): does
        # the same workload then fit?
        conf = ",".join(x for x in (w.alloc_conf, "expandable_segments:True") if x)
        we = w.with_(alloc_conf=conf)
        alt = max(estimate(spec, we, name=label).total_bytes,
                  batch_envelope(lambda b: _total(spec, we.with_(batch_size=b), label), w.batch_size - 1))
        if alt <= usable:
            expandable = alt
            warnings.append(f"with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True it would fit: "
                            f"{alt / GiB:.2f} GiB (--alloc-conf expandable_segments:True)")
    return FitResult(label, gpu.name, gpu.display_name, usable, est, total <= usable,
                     usable - total, max_batch, max_seq, limit, kv, step_s, tps,
                     tuple(assumptions) + est.assumptions, tuple(warnings), per_gpu, expandable)


def _speed(spec: ModelSpec, w: Workload, gpu: GPU) -> tuple[float | None, float | None]:
    """Step (or prefill) seconds and tokens per second from :mod:`vramplan.perf`."""
    from .perf import inference_time, training_time

    if w.is_train:
        tt = training_time(spec, w, gpu, tokens=w.batch_size * w.seq_len * w.gradient_accumulation)
        return (tt.step.total_s if tt.step else None), tt.tokens_per_s
    it = inference_time(spec, w, gpu)
    return it.prefill_s, it.decode_tokens_per_s


# ----------------------------------------------------------------------------------------- image models

_VISION_MAX_BATCH = 1 << 16  # VisionWorkload's own limits
_VISION_MAX_RES = 1 << 15


@dataclass(frozen=True, slots=True)
class VisionFitResult(_FitAnswer):
    """Whether an image model's workload fits ``gpu``, and the largest batch and resolution that would.

    ``to_dict`` has the keys of :class:`FitResult` (the sequence, KV and speed ones ``None``: image models
    have no tokens, and vramplan has no throughput model for them yet) plus the resolution answers.
    """

    max_resolution: int  # at the workload's batch size; 0 when even the smallest valid resolution does not fit
    resolution_step: int | None  # valid resolutions are multiples of this from the smallest; None: fixed size
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def resolution(self) -> int:
        return int(self.estimate.workload["resolution"])

    def to_dict(self) -> dict[str, Any]:
        return self._memory_dict() | {
            "alloc_conf_suggestion": None, "expandable_total_bytes": None, "max_batch_size": self.max_batch_size,
            "max_seq_len": None, "context_limit": None, "kv_cache": None, "step_time_s": None,
            "tokens_per_s": None, "resolution": self.resolution, "max_resolution": self.max_resolution,
            "resolution_step": self.resolution_step, "workload": dict(self.estimate.workload),
            "assumptions": list(self.assumptions), "warnings": list(self.warnings)}


def check_vision_fit(name: str, gpu: GPU, **options: Any) -> VisionFitResult:
    """Fit, headroom, largest batch (at the resolution) and largest resolution (at the batch) of an image
    model (:func:`vramplan.vision.estimate_vision` options), solved exactly with :func:`largest_fitting`."""
    from .vision import estimate_vision, resolution_grid

    usable = gpu.usable_memory_bytes
    est = estimate_vision(name, **options)
    res = int(est.workload["resolution"])
    batch = int(est.workload["batch_size"])

    def fits_with(**changes: Any) -> bool:
        try:
            return estimate_vision(name, **{**options, **changes}).total_bytes <= usable
        except WorkloadError:  # a resolution past the model's position table, a batch past the limit
            return False

    max_batch = largest_fitting(lambda b: fits_with(batch_size=b, resolution=res), _VISION_MAX_BATCH)
    grid = resolution_grid(name)
    assumptions = [f"fits: total_bytes (peak allocated + allocator slack + CUDA context) <= {gpu.display_name}'s "
                   f"usable memory; the largest batch and resolution are searched on the estimator (memory never "
                   f"falls as either grows)"]
    if grid is None:
        max_res = res if est.total_bytes <= usable else 0
        assumptions.append(f"{est.model} generates one image size ({res} px): max_resolution is that size when it "
                           "fits")
    else:
        step, smallest = grid
        cap = (_VISION_MAX_RES - smallest) // step + 1
        k = largest_fitting(lambda i: fits_with(batch_size=batch, resolution=smallest + (i - 1) * step), cap)
        max_res = 0 if k == 0 else smallest + (k - 1) * step
        assumptions.append(f"resolutions searched: {smallest}, {smallest + step}, … (multiples of {step} pixels "
                           "the architecture takes)")
    return VisionFitResult(est.model, gpu.name, gpu.display_name, usable, est, est.total_bytes <= usable,
                           usable - est.total_bytes, max_batch, max_res, None if grid is None else grid[0],
                           tuple(assumptions) + est.assumptions, est.warnings)
