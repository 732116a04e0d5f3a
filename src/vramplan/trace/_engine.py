"""Run one workload's real model code on fake tensors and turn the tracked peak into an Estimate."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .._engine.step import workload_dict
from ..errors import VramplanError
from ..kinds import MemoryKind, Phase
from ..result import Breakdown, Estimate, PhasePeak
from ..workload import Attention, LogitsMode, Loss, Task, Trainer, WeightsQuant, Workload
from ._build import build_model, compute_dtype, make_optimizer
from ._cuda import (
    AutocastEmulation,
    attention_backward_transient,
    choose_sdpa_backend,
    cuda_dropout,
    cuda_sdpa,
    grouped_mm_any_dtype,
    hub_rmsnorm_kernels,
    index_backward_in_place,
    register_cuda_kernels,
    safe_softmax_transient,
)
from ._images import image_inputs, is_multimodal
from ._loops import (
    CE_CHUNK,
    apply_checkpoint_every,
    create_optimizer_state,
    harness_stream,
    hf_train_loop,
    patch_chunked_loss,
    traced_backward,
    traced_step,
)
from ._tracker import MemoryTracker, PeakMark, gradient_buffers

__all__ = ["CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "SLACK_FRACTION", "finish_estimate", "run_trace"]

MiB = 1 << 20
GiB = 1 << 30
# cuBLAS keeps one workspace per handle (CUBLAS_WORKSPACE_CONFIG default :4096:8 = 32 MiB on Hopper), allocated
# through the caching allocator at the first matmul; training uses two handles (the main thread and the
# autograd engine's device thread). Measured on the H200: +32 MiB at the first forward matmul, +32 MiB at the
# first backward.
CUBLAS_WORKSPACE_BYTES = 32 * MiB
CUDA_CONTEXT_BYTES = GiB // 2  # 0.516 GiB measured on the H200 (torch 2.11, CUDA 13)
SLACK_FRACTION = 0.10  # max_memory_reserved / max_memory_allocated - 1: median 9.5% over the calibration runs

aten = torch.ops.aten
_ATTN_BWD = (
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
)


def _scalar_answer(t: torch.Tensor) -> Any:
    """A data-dependent ``.item()``: answer as real data would in the checks models make (``.all()`` of a
    well-formed mask is true; counters are positive)."""
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


class _Patches:
    """Process-wide switches the trace needs, undone afterwards."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self._undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def restore(self) -> None:
        for obj, attr, old in reversed(self._undo):
            setattr(obj, attr, old)
        self._undo.clear()


@contextlib.contextmanager
def _trace_environment() -> Iterator[None]:
    """Two process-wide switches for the duration of a trace.

    * transformers treats fake tensors as 'being traced' and then refuses to skip the causal mask, which sends
      attention to a masked kernel; on the GPU the tensors are real, so fake tensors are reported as real.
    * ``Module.to()`` and peft's adapter moves swap parameters with ``torch.utils.swap_tensors``, which refuses
      fake tensors (FakeTensorMode holds a weak reference to each); re-pointing the parameter at the new data
      is what the swap achieves.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers.utils import import_utils

    swap = torch.utils.swap_tensors

    def swap_fake(t1: torch.Tensor, t2: torch.Tensor) -> None:
        if isinstance(t1, FakeTensor) or isinstance(t2, FakeTensor):
            with torch.no_grad():
                t1.data = t2.data
            return
        swap(t1, t2)

    def deepcopy_fake(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
        # Tensor.__deepcopy__ re-points a new tensor at a copy of the storage with ``set_``, which fails for a fake
        # tensor made by ``torch.tensor`` (a meta tensor beside a real constant): a clone is the same allocation
        # (transformers 5.24's Inkling2LoopTextModel deep-copies cache layers that hold such a tensor)
        with torch.no_grad():
            out = t.clone()
        if t.requires_grad and t.is_leaf:
            out.requires_grad_(True)
        memo[id(t)] = out
        return out

    patches = _Patches()
    patches.set(import_utils, "is_fake_tensor", lambda x: False)
    patches.set(torch.utils, "swap_tensors", swap_fake)
    patches.set(FakeTensor, "__deepcopy__", deepcopy_fake)
    try:
        from transformers import initialization as hf_init
    except ImportError:  # older transformers
        hf_init = None
    table = getattr(hf_init, "TORCH_INIT_FUNCTIONS", None)
    if isinstance(table, dict) and "trunc_normal_" in table:
        # torch's trunc_normal_ reads a value back (``.item()``), which fake tensors cannot give; the values of
        # fake weights do not matter (SigLIP's lecun_normal_ init, Gemma 3 / PaliGemma vision towers)
        fake_init = dict(table)
        fake_init["trunc_normal_"] = lambda tensor, *a, **k: tensor
        patches.set(hf_init, "TORCH_INIT_FUNCTIONS", fake_init)
    try:
        yield
    finally:
        patches.restore()


@contextlib.contextmanager
def _routing_source(tracker: MemoryTracker) -> Iterator[None]:
    """MoE layers that dispatch by a loop over experts build their routing mask with ``F.one_hot(top_k_ids)``;
    with autograd on, one_hot is decomposed before it reaches the tracker, so the mask is tagged here."""
    import torch.nn.functional as F

    one_hot = F.one_hot

    def tagged_one_hot(ids: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
        out = one_hot(ids, num_classes)
        tracker._route_source((ids,), {"num_classes": int(out.shape[-1])}, out)
        return out

    patches = _Patches()
    patches.set(F, "one_hot", tagged_one_hot)
    try:
        yield
    finally:
        patches.restore()


def _closure(fn: Any) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None)
    if code is None or not cells:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True))


def _hub_kernel_info(fn: Any) -> tuple[str, str, bool] | None:
    """(kernel name, package, whether the package's kernel is used) for a function transformers wrapped with
    ``use_kernel_func_from_hub_with_fallback`` (transformers/integrations/hub_kernels.py), else None. Where the
    ``kernels`` package is installed (transformers >= 5.25 requires it), its ``use_kernel_forward_from_hub`` turns the
    wrapped function into an ``nn.Module`` instance whose class ``forward`` calls it (kernels' ``_create_func_module``:
    the function is the forward's ``func`` cell)."""
    seen = 0
    while callable(fn) and seen < 4:
        vals = _closure(fn)
        if {"func_name", "package", "is_new_implementation"} <= set(vals):
            return str(vals["func_name"]), str(vals["package"]), bool(vals["is_new_implementation"])
        inner = _closure(getattr(type(fn), "forward", None)).get("func") if isinstance(fn, nn.Module) else None
        fn = inner if callable(inner) else getattr(fn, "__wrapped__", None)
        seen += 1
    return None


@contextlib.contextmanager
def _kernel_calls(model: nn.Module, called: dict[tuple[str, str, bool], int]) -> Iterator[None]:
    """Count the calls of the model's optional fused kernels (mamba_ssm, causal_conv1d, fla) and whether each
    ran the package's kernel or transformers' plain-PyTorch fallback."""
    import sys

    patches = _Patches()
    mods = {type(m).__module__ for m in model.modules()}
    for mod_name in mods:
        mod = sys.modules.get(mod_name)
        if mod is None or not mod_name.startswith("transformers."):
            continue
        for gname, g in list(vars(mod).items()):
            info = _hub_kernel_info(g) if callable(g) and not isinstance(g, type) else None
            if info is None:
                continue

            def counted(*a: Any, _g: Any = g, _info: tuple[str, str, bool] = info, **k: Any) -> Any:
                called[_info] = called.get(_info, 0) + 1
                return _g(*a, **k)

            patches.set(mod, gname, counted)
    try:
        yield
    finally:
        patches.restore()


class _Recorder:
    """Module and region bookkeeping around the tracker: which module runs, and whether tensors belong to the
    output head and loss."""

    def __init__(self, tracker: MemoryTracker, model: nn.Module, head: nn.Module | None) -> None:
        self.tracker = tracker
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.head = head
        self.sdpa: dict[str, int] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        from torch.nn.modules import module as module_mod

        self.handles.append(module_mod.register_module_forward_pre_hook(self._pre))
        self.handles.append(module_mod.register_module_forward_hook(self._post))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, mod: nn.Module, args: Any) -> None:
        name = self.names.get(id(mod))
        if name is None:
            return
        self.stack.append(name)
        self.tracker.where = name
        if mod is self.head:
            self.tracker.region = MemoryKind.LOGITS_LOSS
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                x.register_hook(self._head_input_grad)

    def _post(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.names.get(id(mod)) is None or not self.stack:
            return
        self.stack.pop()
        self.tracker.where = self.stack[-1] if self.stack else ""

    def _head_input_grad(self, grad: torch.Tensor) -> None:
        # backward has passed the output head: what follows are activation gradients
        self.tracker.region = MemoryKind.ACTIVATIONS

    def count_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, p: float,
                   causal: bool, gqa: bool) -> None:
        b = choose_sdpa_backend(q, k, v, mask, p, causal, gqa)
        self.sdpa[b] = self.sdpa.get(b, 0) + 1


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds: attention keys/values and the fixed-size recurrent and
    convolution states of SSM / linear-attention layers (all of it is cache, not activations), whatever the
    cache or layer class calls them."""
    out: list[torch.Tensor] = []
    _walk_cache(cache, 0, out, set())
    return out


def _walk_cache(obj: Any, depth: int, out: list[torch.Tensor], seen: set[int]) -> None:
    """:func:`_cache_tensors`' walk. A module-level function: a nested recursive closure is a reference cycle (the
    function's cell holds the function) that kept ``out`` — every cache tensor of the step — alive until Python's
    cyclic collector ran, so the first decode step's keys and values outlived the grown cache in the trace."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _walk_cache(item, depth + 1, out, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            _walk_cache(item, depth + 1, out, seen)
    elif not isinstance(obj, (nn.Module, str, bytes, int, float)) and \
            type(obj).__module__.startswith("transformers.") and not hasattr(obj, "to_json_string"):
        for item in vars(obj).values() if hasattr(obj, "__dict__") else ():
            _walk_cache(item, depth + 1, out, seen)


def _lora_forward_error(exc: RuntimeError, model: Any) -> str | None:
    """What went wrong where a peft LoRA layer's own forward raised (None: the error is not there): peft wraps every
    ``nn.Linear`` subclass as a plain ``lora.Linear`` and adds ``lora_B(lora_A(x))``, (..., out_features), to the base
    layer's result, so a subclass whose forward returns another shape (DeepseekV4GroupedLinear: (..., groups,
    out_features / groups)) fails there (peft 0.21.2, tuners/lora/layer.py ``Linear.forward``)."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    tb = exc.__traceback__
    layer = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, LoraLayer):
            layer = candidate
        tb = tb.tb_next
    if layer is None:
        return None
    base_layer = layer.get_base_layer()
    if type(base_layer) is nn.Linear or not isinstance(base_layer, nn.Linear):
        return None  # (a plain nn.Linear, or a layer peft has its own class for: another cause)
    where = next((n for n, m in model.named_modules() if m is layer), "a module")
    base = type(base_layer).__name__
    msg = " ".join(str(exc).split())[:200]
    return (f"{where} ({base}): peft wraps it as a plain lora.Linear, whose adapter output (..., out_features) does "
            f"not match what {base}.forward returns ({msg}); name LoRA targets without "
            f"{where.rsplit('.', 1)[-1]}")


def _phase_peak(mark: PeakMark, workspace: int) -> tuple[int, dict[MemoryKind, int]]:
    by_kind = mark.breakdown()
    by_kind[MemoryKind.WORKSPACE] = by_kind.get(MemoryKind.WORKSPACE, 0) + workspace
    return mark.bytes + workspace, by_kind


# the phases in the order a run goes through them (an image pipeline's text encoding is its PREFILL, its VAE decode
# its DECODE; a language run has either the training phases or prefill and decode); a tie goes to the earlier one
_PHASES = (Phase.PREFILL, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP, Phase.DECODE)


def finish_estimate(tracker: MemoryTracker, *, name: str, workspaces: int, alloc_conf: str | None, parameters: int,
                    trainable: int, assumptions: list[str], warns: Sequence[str], workload: dict[str, Any],
                    t0: float) -> Estimate:
    """The :class:`Estimate` of a finished trace (language and image models alike): each phase's peak with the
    ``workspaces`` cuBLAS workspaces, the highest one, and the allocator slack of the traced allocation stream
    replayed through the same caching-allocator model as the estimate (``vramplan.allocator``), rebuilt as the
    calibration loop runs it, with the cuBLAS workspaces (``_loops.harness_stream``). Appends the peak's place, the
    added terms and the trace's time to ``assumptions``."""
    from ..allocator import parse_alloc_conf, simulate

    phases: list[PhasePeak] = []
    best: tuple[int, Phase, dict[MemoryKind, int], str] | None = None
    for phase in _PHASES:
        mark = tracker.peaks.get(phase)
        if mark is None:
            continue
        peak, by_kind = _phase_peak(mark, workspaces * CUBLAS_WORKSPACE_BYTES)
        phases.append(PhasePeak(phase, peak, Breakdown.of(by_kind)))
        if best is None or peak > best[0]:
            best = (peak, phase, by_kind, mark.where)
    if best is None:
        raise VramplanError(f"{name}: the trace recorded no allocation")
    peak, peak_phase, by_kind, where = best
    reserved = simulate(harness_stream(tracker.events, workspaces), parse_alloc_conf(alloc_conf))
    slack = max(0, reserved.peak_reserved_bytes - peak)
    full = dict(by_kind)
    full[MemoryKind.CUDA_CONTEXT] = CUDA_CONTEXT_BYTES
    full[MemoryKind.ALLOCATOR_SLACK] = slack
    assumptions.append(f"peak at {where} during {peak_phase.value}")
    assumptions.append("CUDA context 0.5 GiB and allocator slack (reserved - allocated, from the traced allocation "
                       "stream replayed through the caching-allocator model) are added to total_bytes")
    assumptions.append(f"trace took {time.perf_counter() - t0:.1f} s ({tracker.ops} ops)")
    return Estimate(
        model=name, parameters=parameters, trainable_parameters=trainable,
        peak_allocated_bytes=peak, total_bytes=peak + CUDA_CONTEXT_BYTES + slack, peak_phase=peak_phase,
        breakdown=Breakdown.of(full), phases=tuple(phases), assumptions=tuple(assumptions),
        warnings=tuple(warns), workload=workload, peak_reserved_bytes=peak + slack,
        reserved_phases=reserved.phases)


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """transformers core_model_loading ``dot_natural_key``: dotted parts, numbers by value before names."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def load_weights(model: torch.nn.Module, quant_modules: Sequence[Any], tracker: MemoryTracker,
                 workload: Workload) -> None:
    """Count the built model's weights in the order ``workload.load`` puts them on the GPU (the allocator replay
    depends on it; what is allocated does not):

    * ``config``: ``from_config`` on the device, parameter order, then the buffers (the calibration harness);
    * ``device-map``: transformers' ``caching_allocator_warmup`` (one block of the state dict's bytes, a tied weight
      once, 4-bit linears at half a byte an element, allocated and freed), then the state dict in
      ``dot_natural_key`` order; a 4-bit linear arrives in 16 bits and is quantized on the GPU
      (``Bnb4bitQuantize``) before the 16-bit copy dies; the non-persistent buffers last;
    * ``to-device``: ``Module._apply`` (children first, then the module's own parameters and buffers), a tied weight
      once. bitsandbytes 4-bit models load as ``device-map`` (its quantizer sets device_map when none is given).
    """
    from ._quant import EmulatedLinear4bit

    quant = {id(m.weight): m for m in quant_modules}
    nf4 = {id(m.weight) for m in quant_modules if isinstance(m, EmulatedLinear4bit)}
    load = "device-map" if workload.load == "to-device" and nf4 else workload.load

    def adopt(t: torch.Tensor) -> None:
        m = quant.get(id(t))
        if m is None:
            tracker.adopt(t, MemoryKind.WEIGHTS)
            return
        on_load = load == "device-map" and id(t) in nf4  # arrives in 16 bits, quantized on the GPU
        if on_load:
            tracker.events.append((("load16", id(t)), m.in_features * m.out_features * 2))
        tracker.adopt(t, MemoryKind.WEIGHTS)
        for c in m.constants():
            tracker.adopt(c, MemoryKind.QUANTIZATION_CONSTANTS)
        if on_load:
            tracker.events.append((("load16", id(t)), -1))

    if load == "config":
        for p in model.parameters():
            tracker.adopt(p, MemoryKind.WEIGHTS)
        for b in model.buffers():
            tracker.adopt(b, MemoryKind.WEIGHTS)
        for m in quant_modules:
            for c in m.constants():
                tracker.adopt(c, MemoryKind.QUANTIZATION_CONSTANTS)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        tied = getattr(head, "weight", None)
        if not quant_modules and tied is not None and tied is getattr(embed, "weight", None):
            # from_config on the device: the head's nn.Linear made its own weight before post_init tied it
            # (alloc_stream.untied_head_bytes); quantizing ends with empty_cache, which returns that block
            tracker.events.append((("untied_head",), tied.numel() * tied.element_size()))
            tracker.events.append((("untied_head",), -1))
        return
    if load == "to-device":
        seen: set[int] = set()

        def walk(mod: torch.nn.Module) -> None:
            for child in mod.children():
                walk(child)
            for t in [*mod._parameters.values(), *mod._buffers.values()]:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    adopt(t)

        walk(model)
        return
    # the state dict less the tied names (named_parameters keeps a tied weight under its first owner, the
    # embedding: the checkpoint's key; get_total_byte_count skips all_tied_weights_keys)
    tensors: dict[int, tuple[str, torch.Tensor]] = {}
    persistent = set(model.state_dict(keep_vars=True))
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if key in persistent and id(t) not in tensors:
            tensors[id(t)] = (key, t)
    total = 0
    for _, t in tensors.values():
        m = quant.get(id(t))
        total += (m.in_features * m.out_features // 2 if m is not None and id(t) in nf4
                  else t.numel() * t.element_size())
    if total >= 2:
        tracker.events.append((("warmup",), total // 2 * 2))
        tracker.events.append((("warmup",), -1))
    for _, t in sorted(tensors.values(), key=lambda kt: _natural_key(kt[0])):
        adopt(t)
    for b in model.buffers():  # non-persistent buffers (rotary tables): built on the device after the load
        tracker.adopt(b, MemoryKind.WEIGHTS)


def run_trace(raw: Mapping[str, Any], workload: Workload, name: str, *, routing: str = "balanced") -> Estimate:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # transformers' deprecation notices (gradient_checkpointing_enable, past_key_values) are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            return _run_trace(raw, workload, name, routing)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _run_trace(raw: Mapping[str, Any], workload: Workload, name: str, routing: str) -> Estimate:
    import peft
    import transformers

    t0 = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    train = workload.task is Task.TRAIN
    reported = workload
    if workload.resolved_loss in (Loss.LIGER_FUSED, Loss.CCE):
        raise VramplanError(f"--loss {workload.resolved_loss.value} runs Triton kernels, which the CPU trace "
                            "cannot run; vramplan estimate transcribes their memory from the kernels' source")
    if workload.packing:
        if not train:
            raise VramplanError("--packing applies to training; drop it")
        # padding-free packing: one row of the real tokens, FlashAttention varlen (its memory does not depend on
        # where the sequences start: traced as one sequence with the fused kernel)
        workload = workload.with_(batch_size=1, seq_len=workload.tokens, attention=Attention.FLASH, packing=False,
                                  avg_seq_len=None)
    assumptions: list[str] = [
        f"traced the real model code on fake tensors: torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}; CUDA kernel choices emulated on the CPU trace",
        "CUDA caching allocator: every allocation rounded up to 512-byte blocks",
    ]
    warns: list[str] = []
    prev_default = torch.get_default_dtype()
    from . import report

    report("building the model on fake tensors")
    with _trace_environment(), fake:
        built = build_model(raw, workload, name)
        model = built.model
        if train and workload.checkpoint_every > 1:
            apply_checkpoint_every(model, workload.checkpoint_every)
            assumptions.append(f"gradient checkpointing on decoder layers 0, {workload.checkpoint_every}, ...")
        if train and workload.resolved_loss is Loss.CHUNKED:
            patch_chunked_loss(model, workload.loss_chunk or CE_CHUNK)
            assumptions.append("loss: TRL 1.9 chunked_nll transcribed (_chunked_cross_entropy_loss, "
                               f"{workload.loss_chunk or CE_CHUNK}-token chunks under non-reentrant checkpoint)")
        torch.set_default_dtype(prev_default)
        params = [p for p in model.parameters() if p.requires_grad]
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in params)
        ids = torch.zeros(workload.batch_size, workload.seq_len, dtype=torch.long)
        extra: dict[str, Any] = {}
        if is_multimodal(built.config) and not workload.text_only:
            report("counting the image tokens")
            imgs = image_inputs(model, built.config, workload.batch_size, workload.seq_len, workload.images or 1,
                                workload.image_size, torch.float32)
            ids, extra = imgs.ids, imgs.kwargs
            assumptions.extend(imgs.notes)
        elif workload.vision_options and not workload.text_only:
            raise VramplanError(f"{name}: --images, --image-size and --freeze-vision apply to vision-language models; "
                                "this config has no vision tower")
        opt = None
        if train:
            if not params:
                raise VramplanError(f"{name}: nothing to train (no parameter requires grad)")
            opt, opt_note = make_optimizer(params, workload.optimizer)
            assumptions.append(f"optimizer: {opt_note}, zero_grad(set_to_none=True)")
    assumptions.extend(built.notes)
    warns.extend(built.warnings)
    qc = raw.get("quantization_config")
    if isinstance(qc, Mapping) and workload.base_quant is WeightsQuant.NONE:
        # (_resolve drops it: the workload says the weights' storage)
        warns.append(f"the config's quantization_config ({qc.get('quant_method', 'unnamed')}) is not traced: the "
                     f"weights are built in {workload.precision.value}; vramplan estimate reads the checkpoint's "
                     "own storage")

    tracker = MemoryTracker()
    tracker.scalar_answer = _scalar_answer
    tracker.routing = routing
    tracker.real_ints = bool(extra)
    recorder = _Recorder(tracker, model, built.head)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        recorder.count_sdpa(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
        return cuda_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    tracker.overrides[aten.scaled_dot_product_attention.default] = sdpa
    tracker.overrides[aten.dropout.default] = cuda_dropout
    tracker.overrides[aten._grouped_mm.default] = grouped_mm_any_dtype
    tracker.overrides[aten.index_put.default] = index_backward_in_place
    for f in _ATTN_BWD:
        tracker.after_op[f] = lambda a, k, o, f=f: attention_backward_transient(f, a)
    tracker.after_op[aten._safe_softmax.default] = lambda a, k, o: safe_softmax_transient(a)

    autocast = AutocastEmulation(compute_dtype(workload.precision)) if workload.precision.is_amp else None
    if autocast is not None:
        assumptions.append(f"AMP: CUDA autocast policies emulated on the CPU autocast key "
                           f"({autocast.lower}), with autocast's weight-cast cache")
    workspaces = 2 if train else 1
    assumptions.append(f"cuBLAS workspace: {workspaces} handle(s) x 32 MiB inside the allocator "
                       f"({'training: main thread + autograd thread' if train else 'inference'})")

    kernels: dict[tuple[str, str, bool], int] = {}
    with _trace_environment(), _routing_source(tracker), _kernel_calls(model, kernels), \
            hub_rmsnorm_kernels(model, workload.hub_kernels) as liger_norms, \
            register_cuda_kernels(autocast, sdpa), fake, tracker, recorder, gradient_buffers(tracker):
        if workload.hub_kernels:
            assumptions.append(f"hub kernels: {liger_norms} RMSNorm module(s) run LigerRMSNorm's allocations "
                               "(kernels-community liger-kernels, as kernelize swaps it in on CUDA); rotary and "
                               "activation kernels not emulated")
        load_weights(model, built.quant_modules, tracker, workload)
        if workload.load != "config":
            assumptions.append(f"weights placed as --load {workload.load} puts them: "
                               + ("the warm-up block, then the state dict in checkpoint-key order"
                                  if workload.load == "device-map" or built.quant_modules else
                                  "module.to() order (children first), a tied weight once"))
        tracker.adopt(ids)
        for t in extra.values():
            tracker.adopt(t)
        try:
            if train and workload.trainer is not Trainer.PLAIN:
                assert opt is not None
                hf_train_loop(model, opt, ids, params, tracker, autocast, workload, built.head, assumptions, extra)
            elif train:
                assert opt is not None
                if workload.activation_offload:
                    raise VramplanError("--activation-offload is traced with --trainer hf or trl-sft")
                _train_loop(model, opt, ids, params, tracker, autocast, workload, extra)
            else:
                assumptions.extend(_infer_loop(model, ids, tracker, autocast, workload, extra))
        except RuntimeError as exc:
            why = _lora_forward_error(exc, model)
            if why is None:
                raise
            raise VramplanError(f"{name}: peft cannot apply LoRA to {why}") from None

    fallback = sorted({(f, pkg) for (f, pkg, new) in kernels if not new})
    if fallback:
        pkgs = sorted({pkg for _, pkg in fallback})
        msg = (f"SSM/linear-attention kernels {', '.join(f for f, _ in fallback)} traced as transformers' "
               f"plain-PyTorch fallback ({', '.join(pkgs)} not installed here); a GPU install with "
               f"{', '.join(pkgs)} runs fused kernels, which do not keep the fallback's chunked-scan intermediates, "
               "so these layers' activations can read high")
        assumptions.append(msg)
        warns.append(msg)
    fused = sorted({f for (f, _, new) in kernels if new})
    if fused:
        assumptions.append(f"SSM/linear-attention kernels {', '.join(fused)}: the installed package's kernels")
    if tracker.data_dependent:
        got = ", ".join(f"{k} x{v}" for k, v in sorted(tracker.data_dependent.items()))
        assumptions.append(
            f"MoE routing assumption: {routing} ("
            + ("every expert gets top_k x tokens / experts tokens" if routing == "balanced"
               else "every token picks the same top_k experts, each processing all tokens")
            + f"); data-dependent shapes answered: {got}")
    if recorder.sdpa:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(recorder.sdpa.items()))
        assumptions.append(f"scaled_dot_product_attention kernels as CUDA sm90 picks them: {kinds} "
                           "(fused = cuDNN/flash: output + fp32 log-sum-exp saved)")
    return finish_estimate(
        tracker, name=name, workspaces=workspaces, alloc_conf=workload.alloc_conf, parameters=total_params,
        trainable=trainable if train else 0, assumptions=assumptions, warns=warns, workload=workload_dict(reported),
        t0=t0)


def _train_loop(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, params: list[nn.Parameter],
                tracker: MemoryTracker, autocast: AutocastEmulation | None, workload: Workload,
                extra: dict[str, Any]) -> None:
    """measure.py run_train, in its steady state: forward with the model's own loss, backward, step, zero_grad;
    the output is kept alive until after the step.

    The first real step differs from the later ones only in that the optimizer state does not exist yet, so the
    state is created up front by one untracked optimizer step on zero gradients, and one tracked step then
    stands for step 2 (and every step after it)."""
    create_optimizer_state(opt, params, tracker)

    # Gradient accumulation: the first micro-step creates the gradients, the later ones run with them alive; two
    # micro-steps stand for any number. Each micro-step's output is dropped after its backward, the last one's
    # after the optimizer step.
    out: Any = None
    for _ in range(min(workload.gradient_accumulation, 2)):
        out = None
        tracker.set_phase(Phase.FORWARD)
        tracker.region = MemoryKind.ACTIVATIONS
        if autocast is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids, **extra)
        else:
            out = model(input_ids=ids, labels=ids, **extra)
        tracker.region = MemoryKind.LOGITS_LOSS
        traced_backward(out.loss, params, tracker)
    traced_step(opt, params, tracker)
    del out
    tracker.set_phase(None)


def _cache_kw(model: nn.Module) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values`` argument to ``cache``."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in sig.parameters else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _fast_forward(cache: Any, tokens: int) -> bool:
    """Grow every layer of ``cache`` by ``tokens`` positions through the cache's own ``update`` (so sliding windows
    and counters behave), standing in for decode steps whose memory only differs by the cache length."""
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "update"):
        return False
    grown = []
    for i, layer in enumerate(layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and v.dim() == 4:
            grown.append((i, k, v))
        elif k is not None or v is not None or not _fixed_state(layer):
            return False  # a layer whose growth the update() call cannot stand for
    for i, k, v in grown:
        cache.update(k.new_empty(k.shape[0], k.shape[1], tokens, k.shape[3]),
                     v.new_empty(v.shape[0], v.shape[1], tokens, v.shape[3]), i)
        _grow_indexer(cache, layers[i], i, tokens)
    return True


def _grow_indexer(cache: Any, layer: Any, index: int, tokens: int) -> None:
    """A sparse-attention indexer's own key cache (DeepSeek-V3.2 / GLM-5 DSA: cache_utils.py ``update_indexer``, keys
    ``[batch, seq, index_head_dim]``, and the positions some models keep beside them) grows with the layer's keys;
    left short, the last step's causal mask is longer than the indexer's keys and ``masked_fill`` refuses them."""
    keys = getattr(layer, "indexer_keys", None)
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or not hasattr(cache, "update_indexer"):
        return
    positions = getattr(layer, "indexer_position_ids", None)
    cache.update_indexer(keys.new_empty(keys.shape[0], tokens, keys.shape[2]), index)
    if isinstance(positions, torch.Tensor):
        layer.indexer_position_ids = torch.cat([positions, positions.new_empty(*positions.shape[:-1], tokens)], -1)


def _fixed_state(layer: Any) -> bool:
    """A cache layer that holds only fixed-size recurrent / convolution state (it does not grow with tokens)."""
    return bool(_cache_tensors(layer)) or hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states")


def _infer_loop(model: nn.Module, ids: torch.Tensor, tracker: MemoryTracker,
                autocast: AutocastEmulation | None, workload: Workload, extra: dict[str, Any]) -> list[str]:
    """measure.py run_infer: prefill with the cache, then single-token decode steps. Decode steps only differ by
    the cache length, so the first one is traced, the cache is grown to its length before the last step, and the
    last one is traced."""
    notes: list[str] = []
    kw = _cache_kw(model)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        tracker.set_phase(Phase.PREFILL)
        tracker.region = MemoryKind.ACTIVATIONS
        if workload.logits is LogitsMode.LAST:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
        else:
            out = model(input_ids=ids, use_cache=True, **extra)
        past = _out_cache(out)
        tracker.mark(_cache_tensors(past), MemoryKind.KV_CACHE)
        tracker.region = MemoryKind.ACTIVATIONS
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        step = 0
        if past is None and workload.new_tokens:
            # a model that keeps no cache (OpenAI GPT): generate feeds it the whole sequence for every new token, so
            # the last step, over prompt + new_tokens - 1 tokens, is the largest: that one is traced
            tracker.set_phase(Phase.DECODE)
            tracker.region = MemoryKind.ACTIVATIONS
            full = torch.cat([ids, ids[:, :1].expand(-1, workload.new_tokens - 1)], dim=1)
            if workload.logits is LogitsMode.LAST:
                out = model(input_ids=full, use_cache=True, logits_to_keep=1, **extra)
            else:
                out = model(input_ids=full, use_cache=True, **extra)
            del out, full
            notes.append("decode: the model keeps no cache; its last generate step, a forward over prompt + "
                         f"{workload.new_tokens - 1} tokens, was traced")
            step = workload.new_tokens
        while step < workload.new_tokens:
            remaining = workload.new_tokens - step
            if step == 1 and remaining > 1:
                tracker.set_phase(None)
                if _fast_forward(past, remaining - 1):
                    notes.append(f"decode: steps 1 and {workload.new_tokens} traced; the KV cache was grown "
                                 "through its own update() for the steps in between")
                    step += remaining - 1
            tracker.set_phase(Phase.DECODE)
            tracker.region = MemoryKind.ACTIVATIONS
            out = model(input_ids=nxt, use_cache=True, **{kw: past})
            past = _out_cache(out)
            tracker.mark(_cache_tensors(past), MemoryKind.KV_CACHE)
            tracker.region = MemoryKind.ACTIVATIONS
            nxt = out.logits[:, -1:].argmax(-1)
            del out
            step += 1
        del past, nxt
    tracker.set_phase(None)
    return notes


