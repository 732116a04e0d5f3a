"""The estimator: peak GPU memory of one workload, by kind and by phase.

Model states come from :mod:`vramplan.memory`; activations, logits and the KV cache come from
replaying the forward (and backward) programs of :mod:`vramplan.blocks` on a
:class:`~vramplan._engine.tape.Tape`. A stack of identical decoder layers is combined in closed form:
every layer adds the same saved bytes in forward and frees them in backward, so the peak of a
pass sits at its first or last layer.

Known limits: one GPU; the layout of the calibration harness (the model output is kept alive until
after ``optimizer.step()``); cuBLAS workspaces sized for Hopper; allocator slack from the median of
the calibration set rather than a model of fragmentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from ._engine.replay import Pass, as_pass, forward, layer_backward, layer_forward, layer_passes, layer_recompute
from ._engine.step import (
    ALLOCATOR_SLACK_FRACTION,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    finish,
    phase_peak,
    states_moment,
    workload_dict,
)
from ._engine.tape import Moment, Tape, kinds_dict
from .allocator import AllocStats, parse_alloc_conf, simulate
from .blocks import Kernel, LayerPlan, Numerics, attention_kernel, build_embed, build_head, build_layer, resid_elem
from .errors import WorkloadError
from .hfconfig import CHECKED_TRANSFORMERS, version_warning
from .kinds import MemoryKind, Phase
from .loops import cache_calls
from .memory import (
    ModelStates,
    default_lora_targets,
    lora_targets,
    model_states,
    peft_default_key,
    peft_default_targets,
    unmatched_lora_targets,
)
from .params import ParamCounts, count_params
from .result import Breakdown, Estimate, PhasePeak
from .spec import ATTENTION_MIXERS, ModelSpec, NormKind, PositionKind
from .units import GiB
from .workload import (
    Attention,
    LogitsMode,
    Loss,
    Method,
    Precision,
    Task,
    Trainer,
    WeightsQuant,
    Workload,
    release,
)

__all__ = ["CUDA_CONTEXT_BYTES", "StageMoments", "check_positions", "estimate", "numerics", "peak_allocated",
           "reserved_stats", "stage_moments"]

# The allocator replay runs every layer of 3 steps (~1 ms per layer); deeper stacks than any published model
# (Llama 3.1 405B has 126 layers) take the calibration slack instead of a multi-second replay.
MAX_REPLAY_LAYERS = 256

K = MemoryKind


_KINDS = tuple(MemoryKind)  # (iterating the enum itself is slower)


def _vec(d: dict[MemoryKind, int]) -> tuple[int, ...]:
    return tuple([d.get(k, 0) for k in _KINDS])


def _plus(*vs: Iterable[int]) -> tuple[int, ...]:
    return tuple(map(sum, zip(*vs, strict=True)))


def _scale(v: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(x * n for x in v)


@dataclass(slots=True)
class _Sink:
    """Every candidate moment of every phase, for per-GPU modelling (:func:`stage_moments`)."""

    moments: list[tuple[Phase, tuple[int, ...]]] = field(default_factory=list)
    base: tuple[int, ...] = ()
    forward_end: tuple[int, ...] = ()


class _Best:
    """The highest candidate moment of one phase (the first on ties); each candidate also goes to a sink."""

    __slots__ = ("moment", "phase", "sink")

    def __init__(self, phase: Phase, sink: _Sink | None) -> None:
        self.phase = phase
        self.sink = sink
        self.moment: Moment | None = None

    def offer(self, kinds: tuple[int, ...]) -> None:
        if self.sink is not None:
            self.sink.moments.append((self.phase, kinds))
        total = sum(kinds)
        if self.moment is None or total > self.moment.total:
            self.moment = Moment(total, kinds)

    def peak(self) -> PhasePeak:
        assert self.moment is not None
        return phase_peak(self.phase, self.moment)


def embed_grads_exist(accumulating: bool, tied: bool) -> bool | frozenset[int]:
    """Which of the embedding program's parameters already have a gradient when its backward runs: all of them from
    the second micro-batch of an accumulation on; otherwise a tied embedding's alone (the head made it), not the
    others (Gemma 3n's and Gemma 4's per-layer embedding table and projection, position tables)."""
    return True if accumulating else frozenset({hash("embed")}) if tied else False


def tied_gradient_sum(spec: ModelSpec, num: Numerics, embed_trainable: bool, head_trainable: bool) -> bool:
    """Whether a tied weight's two gradients meet as a sum made out of place: the head's (a transposed view, TBackward0)
    waits in the AccumulateGrad's InputBuffer and the embedding's is added to it with ``aten.add``
    (torch/csrc/autograd/input_buffer.cpp accumulate). Under autocast the head's gradient is the weight cast's own
    tensor (ToCopyBackward0) and is added into in place."""
    return spec.tie_word_embeddings and head_trainable and embed_trainable and not num.amp


def numerics(w: Workload) -> Numerics:
    """Dtypes of what flows through the model for this workload (see :class:`blocks.Numerics`)."""
    prec = w.precision
    qlora = w.method is Method.QLORA
    amp = prec.is_amp
    act = 2 if (amp or qlora or w.base_quant is not WeightsQuant.NONE) else prec.compute_bytes
    param = prec.param_bytes
    norm_param = 4 if qlora else param
    fp16 = prec in (Precision.FP16, Precision.AMP_FP16)
    return Numerics(training=w.is_train, act=act, param=param, norm_param=norm_param, amp=amp, fp16=fp16)


def _plan(spec: ModelSpec, w: Workload, trainable: bool, input_rg: bool, moe: bool, sliding: bool,
          rope: bool = True, attention: Attention | None = None,
          kind: tuple[str, bool, bool, int] = ("attention", True, False, -1)) -> LayerPlan:
    targets = lora_targets(spec, w.lora_targets) if w.uses_adapters and w.is_train else frozenset()
    mixer, mlp, fp32_in, variant = kind
    return LayerPlan(trainable=trainable, input_rg=input_rg, lora_targets=targets, lora_rank=w.lora_rank,
                     quant=w.base_quant, attention=attention or w.attention, sliding=sliding, moe=moe,
                     lora_dropout=w.lora_dropout if w.uses_adapters else 0.0, rope=rope,
                     dora=w.method is Method.DORA, mixer=mixer, mlp=mlp, ssm_kernel=w.ssm_kernel,
                     input_fp32=fp32_in, variant=variant, release=w.transformers_release)


def _kind(spec: ModelSpec, i: int) -> tuple[str, bool, bool, int]:
    """(mixer, has an MLP, input is the fp32 residual, group in spec.layer_overrides) of layer ``i`` (hybrid and
    state-space models; heterogeneous stacks)."""
    return spec.mixer(i), i not in spec.mlp_free_layers, spec.residual_fp32 and i > 0, spec.variant(i)


@dataclass(frozen=True, slots=True)
class _LayerSim:
    count: int
    fwd: Pass  # forward with saving
    fwd_nosave: Pass  # forward of a checkpointed layer
    bwd: Pass
    x_bytes: int
    y_bytes: int
    x_saved: bool
    ckpt: bool = False  # recomputed in backward (gradient checkpointing)
    recompute: Pass | None = None  # the recomputation's forward, stopped after the last op that saves


@lru_cache(maxsize=4096)  # workloads that differ in optimizer or accumulation count replay the same layers
def _simulate_layer(spec: ModelSpec, num: Numerics, plan: LayerPlan, b: int, s: int, count: int,
                    kv_len: int | None = None, ckpt: bool = False, grads_exist: bool = False,
                    keep_input: bool | None = None) -> _LayerSim:
    """``ckpt``: also replay the forward without saving (a checkpointed or offloaded layer); ``keep_input``
    (default ``ckpt``): the layer is checkpointed, so the checkpoint holds its input."""
    keep_input = ckpt if keep_input is None else keep_input
    tp = Tape(num.training)
    y = build_layer(tp, spec, num, plan, b, s, kv_len)
    x = tp.tensors[0]
    if keep_input:
        x.keep = True  # the checkpoint holds the layer's input
    tp.unpacked_saves = ckpt and keep_input  # its backward runs on the recomputed forward's tensors
    fwd, bwd = layer_passes(tp, param_grads_exist=grads_exist)
    fwd_nosave = layer_forward(tp, save=False) if ckpt else fwd
    return _LayerSim(count, fwd, fwd_nosave, bwd, x.nbytes, y.nbytes, bool(x.saved_by) and num.training,
                     ckpt=keep_input and ckpt, recompute=layer_recompute(tp) if keep_input and ckpt else None)


def has_body(spec: ModelSpec) -> bool:
    """Whether the decoder stack is replayed as one program: looped stacks (vramplan.loops), Inkling 2's block
    attention residuals across layers (vramplan.inkling2)."""
    return bool(spec.stack_runs) or spec.inkling[4:5] == (2,) or bool(spec.zaya)


@lru_cache(maxsize=1024)
def _simulate_body(spec: ModelSpec, num: Numerics, plan: LayerPlan, b: int, s: int, kv_len: int | None = None,
                   ckpt_every: int = 0, grads_exist: bool = False) -> _LayerSim:
    """The whole stack as one block (:func:`vramplan.loops.build_body`, :func:`vramplan.inkling2.build_body`); it
    holds its input (inputs_embeds) itself to the forward's end, so nothing else is added for it (``x_saved``)."""
    if spec.stack_runs:
        from .loops import build_body
    elif spec.zaya:  # the router state carried from layer to layer (vramplan.zaya)
        from .zaya import build_body
    else:
        from .inkling2 import build_body

    tp = Tape(num.training)
    y = build_body(tp, spec, num, plan, b, s, kv_len, ckpt_every)
    x = tp.tensors[0]
    fwd, bwd = layer_passes(tp, param_grads_exist=grads_exist)
    return _LayerSim(1, fwd, fwd, bwd, x.nbytes, y.nbytes, True)


_LayerKey = tuple[bool, bool, bool, bool, bool, tuple[str, bool, bool, int], bool]
_Group = tuple[int, bool, bool, bool, bool, bool, tuple[str, bool, bool, int], bool]


def _layer_key(spec: ModelSpec, i: int, first_trainable: int, ckpt_every: int = 0,
               no_grad_input: int = -1) -> _LayerKey:
    """What makes decoder layer ``i`` the same as another: (base weights train, moe, sliding, rope, checkpointed,
    kind, input without grad); layers from ``first_trainable`` on train their base weights (0: full fine-tuning;
    num_layers: none); with ``ckpt_every`` N, layers 0, N, 2N, ... are checkpointed (torchtitan's ``ac_freq``
    convention); ``kind`` is :func:`_kind` (mixer, MLP, fp32 input, layer-override group); ``no_grad_input``: the
    layer that trains although its input does not require grad (:func:`_no_grad_input`)."""
    return (i >= first_trainable, i in spec.moe_layers, i in spec.sliding_layers, i not in spec.nope_layers,
            bool(ckpt_every) and i % ckpt_every == 0, _kind(spec, i), i == no_grad_input)


@lru_cache(maxsize=1024)  # worked out once per model: every workload asks again
def _layer_groups(spec: ModelSpec, first_trainable: int, ckpt_every: int = 0,
                  no_grad_input: int = -1) -> tuple[_Group, ...]:
    """(count, *:func:`_layer_key`) groups of identical layers, bottom to top, by first occurrence."""
    # identical layers: one replay
    counts: dict[_LayerKey, int] = {}
    for i in range(spec.num_layers):
        if i in spec.idle_layers:  # built, never run (spec.idle_layers)
            continue
        key = _layer_key(spec, i, first_trainable, ckpt_every, no_grad_input)
        counts[key] = counts.get(key, 0) + 1
    return tuple((n, *key) for key, n in counts.items())


def _first_trainable(spec: ModelSpec, w: Workload, states: ModelStates) -> int:
    if w.method is Method.FULL:
        return 0
    if w.method is Method.FREEZE:
        return spec.num_layers - states.trainable_layers
    return spec.num_layers  # adapters: the base weights are frozen


def _no_grad_input(spec: ModelSpec, w: Workload, first_trainable: int) -> int:
    """The decoder layer that trains although its input does not require grad, or -1: the first layer under adapters
    whose frozen embedding's output does not require grad (no gradient checkpointing, which would call
    ``enable_input_require_grads``: the embedding program's ``out_rg``), the first trainable layer under freeze (the
    frozen layers below hand it a tensor without grad). There, every op whose saving depended on its input requiring
    grad saves less (``mul`` keeps the other factor only for that factor's gradient, ``pow`` its base only when the
    base needs one) and no input gradient is made."""
    embed, _, _, layers_rg = _trainable_parts(spec, w)
    if not w.is_train or not layers_rg or embed or has_body(spec) or w.method is Method.FULL:
        return -1
    if w.method is Method.FREEZE:
        return first_trainable if first_trainable < spec.num_layers else -1
    return -1 if w.checkpoint_every else 0


@dataclass(slots=True)
class _Host:
    """Activation offloading: pinned host bytes and PCIe bytes of one step."""

    nbytes: int = 0
    traffic: int = 0


def _trainable_parts(spec: ModelSpec, w: Workload) -> tuple[bool, bool, bool, bool]:
    """Which parts take gradients: (embedding, norms, head, decoder layers' outputs require grad). The estimate
    and the allocation stream (:mod:`vramplan.alloc_stream`) both read them from here."""
    full = w.method is Method.FULL
    embed = full or "embed_tokens" in w.lora_modules_to_save
    norm = full or w.method is Method.FREEZE
    head = full or (w.method is Method.FREEZE and not spec.tie_word_embeddings) or \
        "lm_head" in w.lora_modules_to_save or (spec.tie_word_embeddings and embed)
    return embed, norm, head, full or w.uses_adapters or w.method is Method.FREEZE


def _train(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, *, embed: bool = True,
           head: bool = True, sink: _Sink | None = None, host: _Host | None = None) -> list[PhasePeak]:
    """One training step. ``embed``/``head`` False: a pipeline stage without the embedding / output head
    (its input arrives from the previous stage, its output is sent on and freed, Megatron-style)."""
    b, s = (1, w.tokens) if w.packing else (w.batch_size, w.seq_len)
    every = w.checkpoint_every
    offload = w.activation_offload
    attention = Attention.FLASH if w.packing else w.attention
    full = w.method is Method.FULL
    # With gradient accumulation, every micro-batch after the first runs with all gradients allocated
    # (zero_grad only after the optimizer step); AccumulateGrad then adds into them in place.
    accumulating = w.gradient_accumulation > 1
    base = _step_base(states, w)
    embed_trainable, norm_trainable, head_trainable, layers_rg = _trainable_parts(spec, w)
    loss_kind = w.resolved_loss
    keep_logits = w.trainer is Trainer.PLAIN

    # ---- forward
    et = Tape(True)
    if embed:
        build_embed(et, spec, num, b, s, embed_trainable,
                    out_rg=full or embed_trainable or (w.uses_adapters and bool(every)),
                    attention=attention)
        e_run = forward(et, inputs_counted=False)  # shared with the embedding's backward below
        e_fwd = as_pass(e_run)
    else:  # the stage's input, received from the previous stage
        recv = _vec({K.ACTIVATIONS: b * s * spec.hidden_size * resid_elem(num)})
        e_fwd = Pass(sum(recv), recv, sum(recv), recv)
    sims = []
    if has_body(spec):  # the stack as one program (vramplan.loops, vramplan.inkling2)
        if offload:
            raise WorkloadError(f"activation offloading is not modelled for {spec.family}'s whole-stack program; "
                                "drop --activation-offload or run `vramplan trace`")
        sims.append(_simulate_body(spec, num, _plan(spec, w, full, layers_rg, False, False, True, attention,
                                                    _kind(spec, 0)), b, s, ckpt_every=every,
                                   grads_exist=accumulating))
    first = _first_trainable(spec, w, states)
    for count, trainable, moe, sliding, rope, ck, kind, fresh in () if has_body(spec) else \
            _layer_groups(spec, first, every, _no_grad_input(spec, w, first)):
        rg = layers_rg and (trainable or w.method is not Method.FREEZE)
        plan = _plan(spec, w, trainable, rg and not fresh, moe, sliding, rope, attention, kind)
        sims.append(_simulate_layer(spec, num, plan, b, s, count, ckpt=(ck or offload) and rg,
                                    grads_exist=accumulating, keep_input=ck and rg))
    ht = Tape(True)
    if head:
        build_head(ht, spec, num, b, s, trainable=norm_trainable, head_trainable=head_trainable,
                   input_rg=layers_rg, logits_tokens=b * s, loss=True, keep_logits=keep_logits,
                   loss_kind=loss_kind.value, chunk=w.loss_chunk,
                   metrics=w.trainer is Trainer.TRL_SFT and loss_kind is Loss.STANDARD)
        h_run = forward(ht, inputs_counted=False)  # shared with the head's backward below
        h_fwd = as_pass(h_run)
    else:  # the stage's output is sent to the next stage, then its storage freed
        sent = _neg_act(sims[-1].y_bytes)
        h_fwd = Pass(0, _vec({}), sum(sent), sent)

    if sink is not None:
        sink.base = base
    fwd_peak = _Best(Phase.FORWARD, sink)
    fwd_peak.offer(_plus(base, e_fwd.peak_kinds))
    cur = _plus(base, e_fwd.end_kinds)
    held = _embeds_held(spec, num, b, s, sims[0])
    cur = _plus(cur, held)
    for sim in sims:
        nosave = sim.fwd is not sim.fwd_nosave
        growth = sim.fwd_nosave.end_kinds if nosave else sim.fwd.end_kinds
        peak_k = sim.fwd_nosave.peak_kinds if nosave else sim.fwd.peak_kinds
        if offload and nosave and not sim.ckpt and host is not None:
            # what the layer saves is copied to pinned host memory as autograd packs it; the GPU copy dies with
            # its last Python reference (TRL/torchtune OffloadActivations)
            host.nbytes += sum(_offloaded(sim)) * sim.count
        fwd_peak.offer(_plus(cur, _scale(growth, sim.count - 1), peak_k))
        cur = _plus(cur, _scale(growth, sim.count))
    # the base model's forward returned; its attention masks die with it unless a checkpoint holds them (the
    # non-reentrant checkpoint keeps a layer's inputs, the mask among them, for the recomputation)
    scoped = _forward_scoped(et) if not any(sim.ckpt for sim in sims) else _vec({})
    cur = _plus(cur, _scale(held, -1), scoped)
    fwd_peak.offer(_plus(cur, h_fwd.peak_kinds))
    cur = _plus(cur, h_fwd.end_kinds)
    if sink is not None:
        sink.forward_end = cur

    # ---- backward (the loss's graph first, then the layers top-down, then the embedding)
    if head:
        h_bwd = layer_backward(ht, param_grads_exist=accumulating, fwd=h_run)
    else:  # the gradient of the stage's output arrives from the next stage
        grad = _neg_act(-sims[-1].y_bytes)
        h_bwd = Pass(sum(grad), grad, sum(grad), grad)
    bwd_peak = _Best(Phase.BACKWARD, sink)
    bwd_peak.offer(_plus(cur, h_bwd.peak_kinds))
    cur = _plus(cur, h_bwd.end_kinds)
    for sim in reversed(sims):
        if sim.ckpt:
            # recompute the layer's forward (saving), then its backward; the checkpoint then drops x
            # (torch.utils.checkpoint recomputes when backward first unpacks a saved tensor: the gradients the
            # ops after that one have made are alive through the recomputation)
            recompute_end = _plus(sim.fwd.end_kinds, _neg_act(sim.y_bytes))
            rec = sim.recompute if sim.recompute is not None else sim.fwd
            peak_rel = max((_plus(sim.bwd.unpack_kinds, rec.peak_kinds), _plus(recompute_end, sim.bwd.peak_kinds)),
                           key=sum)
            net = _plus(recompute_end, sim.bwd.end_kinds, _neg_act(sim.x_bytes))
        elif offload:
            # the saved tensors come back from the host, then backward runs as without offloading
            saved = _plus(sim.fwd.end_kinds, _scale(sim.fwd_nosave.end_kinds, -1))
            peak_rel = _plus(saved, sim.bwd.peak_kinds)
            net = _plus(saved, sim.bwd.end_kinds)
        else:
            peak_rel = sim.bwd.peak_kinds
            net = sim.bwd.end_kinds
        bwd_peak.offer(_plus(cur, peak_rel))
        bwd_peak.offer(_plus(cur, _scale(net, sim.count - 1), peak_rel))
        cur = _plus(cur, _scale(net, sim.count))
    if embed:
        tied = spec.tie_word_embeddings and head_trainable
        e_bwd = layer_backward(et, param_grads_exist=embed_grads_exist(accumulating, tied), fwd=e_run)
        # a tied weight's two gradients meet in the autograd InputBuffer of its one AccumulateGrad: the head's waits
        # there through the whole backward, and the embedding's is added to it out of place (aten.add, not add_:
        # seen on real CPU tensors as in the trace; torch/csrc/autograd/input_buffer.cpp accumulate): their sum is
        # a third embedding-sized buffer at the end of backward
        # (under autocast the head's contribution is the weight cast's gradient, ToCopyBackward0's own tensor: added
        # in place, as the trace shows)
        extra = spec.vocab_size * (spec.embed_proj_dim or spec.hidden_size) * num.norm_param \
            if head and tied_gradient_sum(spec, num, embed_trainable, head_trainable) else 0
        bwd_peak.offer(_plus(cur, e_bwd.peak_kinds, _vec({K.GRADIENTS: extra})))
    if host is not None:
        host.traffic = 2 * host.nbytes * w.gradient_accumulation

    # ---- optimizer step: every gradient exists; a hand-written loop still references the model output (logits)
    logits_kept = b * s * spec.vocab_size * (4 if num.norm_param == 4 and not num.amp else num.act) \
        if head and keep_logits and loss_kind is Loss.STANDARD else 0
    step = _plus(states_moment(states, workspace_handles=2, grads=True, temporaries=True).kinds,
                 _vec({K.LOGITS_LOSS: logits_kept}))
    step_peak = _Best(Phase.OPTIMIZER_STEP, sink)
    step_peak.offer(step)
    return [fwd_peak.peak(), bwd_peak.peak(), step_peak.peak()]


def _offloaded(sim: _LayerSim) -> tuple[int, ...]:
    """Bytes one layer leaves on the host under activation offloading: everything it saved for backward. A
    layer under non-reentrant checkpointing keeps its input on the GPU (the checkpoint holds it in a closure,
    not through saved-tensor hooks) and its recomputation runs under the checkpoint's own hooks: nothing moves."""
    if sim.ckpt:
        return _vec({})
    return _plus(sim.fwd.end_kinds, _scale(sim.fwd_nosave.end_kinds, -1))


def _embeds_held(spec: ModelSpec, num: Numerics, b: int, s: int, first: _LayerSim) -> tuple[int, ...]:
    """The embedding lookup's output: transformers' base-model forward keeps ``inputs_embeds``
    referenced until it returns, so it outlives the first layer unless that layer saves it anyway."""
    if first.x_saved and not spec.hc_mult:  # (hyper-connections: the layers read an expanded copy)
        return _vec({})
    return _vec({K.ACTIVATIONS: b * s * (spec.embed_proj_dim or spec.hidden_size) * num.norm_param})


def _forward_scoped(tp: Tape) -> tuple[int, ...]:
    """Minus the bytes the program keeps only until the model's forward returns (attention masks)."""
    v = [0] * len(MemoryKind)
    for t in tp.forward_scoped:
        v[t.kind] -= t.nbytes
    return tuple(v)


def _neg_act(n: int) -> tuple[int, ...]:
    return _vec({K.ACTIVATIONS: -n})


def _kv_bytes(spec: ModelSpec, num: Numerics, b: int, length: int, sliding: bool) -> int:
    """Keys and values of one layer in the DynamicCache (post-RoPE keys, model dtype); ``spec`` is the layer's
    (:meth:`ModelSpec.layer`): a layer that reuses another's keys and values caches nothing."""
    if spec.kv_shared:
        return 0
    if sliding and spec.sliding_window:
        length = min(length, spec.sliding_window)
    elem = max(num.act, resid_elem(num)) if spec.position is PositionKind.ROPE else num.act  # RoPE promotes
    return b * length * spec.kv_cache_per_token * elem


def kv_shared_sliced(spec: ModelSpec, w: Workload, kind: tuple[str, bool, bool, int]) -> bool:
    """Whether a prefill runs a KV-sharing layer on the last token only: Gemma4TextModel._maybe_slice_kv_shared_inputs
    (modeling_gemma4.py, 5.24) slices the hidden states, per-layer inputs, rotary tables and masks to
    ``logits_to_keep`` before the first such layer (they write no cache, so the prompt's other positions are not
    needed) when generate keeps one token's logits, except with flash / flex attention."""
    return spec.at_variant(kind[3]).kv_shared and spec.kv_shared_prefill_slice and w.logits is LogitsMode.LAST and \
        w.seq_len > 1 and w.attention is not Attention.FLASH


def _ssm_kernel_note(kinds: set[str], kernel: str) -> str:
    """Which implementation of the state-space / linear-attention layers the estimate models."""
    if kinds == {"rwkv"}:
        if kernel == "fused":
            return ("RWKV's WKV recurrence: the CUDA kernel a GPU install with ninja and the kernels package runs "
                    "(kernels-community/rwkv); --ssm-kernel torch models transformers' plain-PyTorch loop instead")
        return ("RWKV's WKV recurrence: transformers' plain-PyTorch loop over the sequence (what runs without the "
                "kernels-community/rwkv CUDA kernel); a GPU install with it keeps less")
    if kinds == {"lightning"}:
        return ("lightning attention layers: transformers' plain-PyTorch block loop (there is no fused kernel for "
                "it in transformers)")
    if kinds == {"inkling"}:
        return ("Inkling's short convolutions (causal_conv1d_fn): "
                + ("the fused causal_conv1d kernel a GPU install runs; --ssm-kernel torch models transformers' "
                   "F.conv1d fallback instead" if kernel == "fused" else
                   "transformers' F.conv1d fallback (what runs without causal_conv1d)"))
    if kinds == {"rglru"}:
        return ("recurrent layers (RG-LRU): transformers' plain-PyTorch block, a Python loop over the sequence (there "
                "is no fused kernel for it)")
    pkgs = (["mamba_ssm"] if kinds & {"mamba", "mamba2", "parallel", "zamba_hybrid", "zamba_tied"} else []) + \
        ["causal_conv1d"] + (["fla (flash-linear-attention)"] if "gdn" in kinds else [])
    if kernel == "fused":
        return (f"state-space / linear-attention layers: the fused kernels a GPU install runs ({', '.join(pkgs)}); "
                "--ssm-kernel torch models transformers' plain-PyTorch fallback instead")
    return (f"state-space / linear-attention layers: transformers' plain-PyTorch fallback (what runs without "
            f"{', '.join(pkgs)}); a GPU install with them runs fused kernels that keep less")


def _infer(spec: ModelSpec, w: Workload, states: ModelStates, num: Numerics, *, embed: bool = True,
           head: bool = True, sink: _Sink | None = None) -> list[PhasePeak]:
    if not spec.kv_cache and w.new_tokens:
        # no cache (OpenAI GPT): generate feeds the whole sequence for every new token; the last step, a prefill of
        # prompt + new_tokens - 1 tokens, is the largest
        full = _infer(spec, replace(w, seq_len=w.seq_len + w.new_tokens - 1, new_tokens=0), states, num, embed=embed,
                      head=head, sink=sink)
        first = _infer(spec, replace(w, new_tokens=0), states, num, embed=embed, head=head, sink=sink)
        return [first[0], replace(full[0], phase=Phase.DECODE)]
    b, s = w.batch_size, w.seq_len
    base = _step_base(states, w)
    if sink is not None:
        sink.base = base
    et = Tape(False)
    raw = False
    if embed:
        xe = build_embed(et, spec, num, b, s, False, out_rg=False, attention=w.attention)
        raw = et.ops[0].outputs[0] is xe  # the first layer's input is inputs_embeds itself
        e = layer_forward(et)
    else:  # a pipeline stage's input, received from the previous stage
        recv = _vec({K.ACTIVATIONS: b * s * spec.hidden_size * resid_elem(num)})
        e = Pass(sum(recv), recv, sum(recv), recv)
    peak = _Best(Phase.PREFILL, sink)
    peak.offer(_plus(base, e.peak_kinds))
    cur = _plus(base, e.end_kinds)
    held = _vec({K.ACTIVATIONS: b * s * (spec.embed_proj_dim or spec.hidden_size) * num.norm_param})
    if embed and spec.embedding_layernorm and spec.raw_embeds_held:
        # the embedding program kept the un-normed inputs_embeds itself (blocks.build_embed): ``held`` stands for it,
        # so that it is counted once and released when the forward returns
        cur = _plus(cur, _scale(held, -1))
    # what the first layer runs beside that is not there yet (or is its own input): the previous layer's
    # attention weights, and inputs_embeds where the first layer's input is that very tensor
    absent = held if raw else _vec({})
    if spec.returns_attn_weights and attention_kernel(spec, w.attention, num.act, True,
                                                          w.transformers_release) is Kernel.EAGER:
        # the previous layer's eager attention weights, held by the model loop's ``outputs`` tuple until the next
        # layer returns (GPTNeoModel.forward): one (batch, heads, seq, seq) tensor beside every layer after the first
        probs = _vec({K.ACTIVATIONS: b * spec.num_heads * s * s * num.act})
        held, absent = _plus(held, probs), _plus(absent, probs)
    if has_body(spec):  # the stack as one program: it holds inputs_embeds itself (vramplan.loops, .inkling2)
        held = absent = _vec({})
        body = _simulate_body(spec, num, _plan(spec, w, False, False, False, False, True, kind=_kind(spec, 0)), b, s,
                              kv_len=s)
        peak.offer(_plus(cur, body.fwd.peak_kinds))
        cur = _plus(cur, body.fwd.end_kinds)
    cur = _plus(cur, held)
    sliced = False
    for i, (count, _tr, moe, sliding, rope, _ck, kind, _fresh) in enumerate(() if has_body(spec) else
                                                                    _layer_groups(spec, spec.num_layers)):
        q = 1 if kv_shared_sliced(spec, w, kind) else s
        sim = _simulate_layer(spec, num, _plan(spec, w, False, False, moe, sliding, rope, kind=kind), b, q, count,
                              kv_len=s)
        if i == 0:  # the first layer (the group's last one is offered below)
            peak.offer(_plus(cur, _scale(absent, -1), sim.fwd.peak_kinds))
        if i > 0 or count > 1:
            peak.offer(_plus(cur, _scale(sim.fwd.end_kinds, count - 1), sim.fwd.peak_kinds))
        cur = _plus(cur, _scale(sim.fwd.end_kinds, count))
        if q != s and not sliced:  # the full-length hidden state the first of them sliced dies with its return
            sliced = True
            cur = _plus(cur, _neg_act(b * (s - 1) * spec.hidden_size * resid_elem(num)))
    cur = _plus(cur, _scale(held, -1), _forward_scoped(et))
    if head:
        ht = Tape(False)
        last = w.logits is LogitsMode.LAST
        hs = 1 if sliced else s  # the last hidden state is already the last token's
        build_head(ht, spec, num, b, hs, trainable=False, input_rg=False, logits_tokens=b if last else b * hs,
                   loss=False)
        h = layer_forward(ht)
        peak.offer(_plus(cur, h.peak_kinds))

    # decode: one token per step; each layer's cache grows by torch.cat (new tensor, then the old is freed)
    total_len = s + w.new_tokens
    attn = [i for i in cache_calls(spec) if spec.mixer(i) in ATTENTION_MIXERS and i not in spec.idle_layers]
    kv_all = sum(_kv_bytes(spec.layer(i), num, b, total_len - 1, i in spec.sliding_layers) for i in attn)
    from .ssm import ssm_state_bytes  # (imported here: a model without such layers needs nothing else of vramplan.ssm)

    kv_all += ssm_state_bytes(spec, b, num.act)  # SSM layers: conv + recurrent state, constant in length
    kv_layer = max((_kv_bytes(spec.layer(i), num, b, total_len, False) for i in attn), default=0)
    if spec.moa:  # JetMoeAttention: the whole cache's keys and values repeated top_k times (copies) every step
        kv_layer *= spec.experts_per_token
    small = (b * spec.vocab_size * num.act if head else 0) + 8 * b * spec.hidden_size * 4 + \
        b * spec.intermediate_size * 3 * num.act
    if spec.dsv4:  # DeepSeek-V4: a sliding window plus compressed entries, not a K/V per token (vramplan.dsv4)
        from .dsv4 import dsv4_decode

        kv_all, copy = dsv4_decode(spec, b, s, total_len, num.act)
        kv_layer, small = 0, small + copy
    dec = _plus(base, _vec({K.KV_CACHE: kv_all + kv_layer, K.ACTIVATIONS: small}))
    phases = [peak.peak()]
    if w.new_tokens:
        decode = _Best(Phase.DECODE, sink)
        decode.offer(dec)
        phases.append(decode.peak())
    return phases




@dataclass(frozen=True, slots=True)
class StageMoments:
    """Every moment at which a phase of one step can peak, by memory kind (for :mod:`vramplan.parallel`).

    ``moments`` holds (phase, breakdown) candidates in program order; the single-GPU estimate takes the
    highest of each phase. ``base`` is what is allocated before the step (model states, workspaces);
    ``forward_end`` is memory when the forward has returned (training): ``forward_end - base`` is what one
    micro-batch keeps for its backward.
    """

    states: ModelStates
    moments: tuple[tuple[Phase, Breakdown], ...]
    base: Breakdown
    forward_end: Breakdown


def _step_base(states: ModelStates, w: Workload) -> tuple[int, ...]:
    """What is allocated before a step, by kind: the model states and the cuBLAS workspaces (2 handles in training:
    the backward runs on a second one; with gradient accumulation the gradients already exist)."""
    if w.task is Task.TRAIN:
        return states_moment(states, workspace_handles=2, grads=w.gradient_accumulation > 1).kinds
    return _vec({K.WEIGHTS: states.weights + states.master_weights,
                 K.QUANTIZATION_CONSTANTS: states.quant_constants, K.WORKSPACE: CUBLAS_WORKSPACE_BYTES})


def stage_base(spec: ModelSpec, w: Workload) -> Breakdown:
    """``stage_moments(spec, w).base`` (the whole model on one GPU) without replaying the step."""
    spec = built_as(spec, w)
    w = runs_as(spec, w)
    check_positions(spec, w)
    return Breakdown.of(kinds_dict(_step_base(model_states(spec, w, count_params(spec)), w)))


def stage_moments(spec: ModelSpec, w: Workload, counts: ParamCounts | None = None, *, embed: bool = True,
                  head: bool = True) -> StageMoments:
    """The candidate peak moments of ``w`` on the part of a model that one GPU runs.

    ``spec`` may be a tensor-parallel shard (fewer heads, a narrower MLP and vocabulary) and hold only a
    pipeline stage's layers; ``counts`` its parameters (default: ``count_params(spec)``); ``embed`` and
    ``head`` say whether the stage holds the embedding and the output head.
    """
    spec = built_as(spec, w)
    w = runs_as(spec, w)
    check_positions(spec, w)
    counts = counts or count_params(spec)
    states = model_states(spec, w, counts)
    num = numerics(w)
    sink = _Sink()
    if w.task is Task.TRAIN:
        _train(spec, w, states, num, embed=embed, head=head, sink=sink)
    else:
        _infer(spec, w, states, num, embed=embed, head=head, sink=sink)

    def bd(v: tuple[int, ...]) -> Breakdown:
        return Breakdown.of(kinds_dict(v))

    return StageMoments(states, tuple((ph, bd(v)) for ph, v in sink.moments), bd(sink.base),
                        bd(sink.forward_end or sink.base))


def has_sdpa(spec: ModelSpec, w: Workload) -> bool:
    """Whether the model class has an SDPA path in the transformers release ``w`` models."""
    have = w.transformers_release
    return spec.sdpa and not (spec.sdpa_removed_in and have >= release(spec.sdpa_removed_in)) and \
        not (spec.sdpa_added_in and have < release(spec.sdpa_added_in))


# transformers 5.25's from_pretrained kernelizes by default (modeling_utils.py: use_kernels None -> True unless
# USE_HUB_KERNELS disables it; model.train() re-kernelizes in training mode): on CUDA, with the Hub reachable, layers
# decorated with use_kernel_forward_from_hub run kernels-community kernels (integrations/hub_kernels.py
# _build_kernel_mapping: Liger's RMSNorm and the rotary kernel in training and inference, activation kernels in
# inference, mamba-ssm / fla kernels for SSM and linear-attention layers), which save other tensors than the PyTorch
# code the programs follow and the trace runs
HUB_KERNELS_BY_DEFAULT = (5, 25)
HUB_KERNELS_NOTE = ("transformers >= 5.25 loads models with hub kernels by default on CUDA (RMSNorm, rotary, "
                    "activations, SSM); the estimate follows the PyTorch layers, which from_pretrained(..., "
                    "use_kernels=False) or USE_HUB_KERNELS=0 keeps; --hub-kernels models the RMSNorm kernel")
HUB_KERNELS_ON_NOTE = ("hub kernels (--hub-kernels): the language model's RMSNorms run kernels-community's "
                       "LigerRMSNorm (saves its input and an fp32 inverse RMS per row; backward writes the input "
                       "gradient into the output gradient), for the model types transformers 5.25.0 decorates; a "
                       "vision tower's norms, the rotary and the activation kernels are not modelled (the PyTorch "
                       "code's tensors are kept)")
HUB_KERNELS_OTHER_NOTE = ("hub kernels (--hub-kernels): transformers swaps this model's norm class for LigerRMSNorm, "
                          "which is not modelled for its norm kind (the PyTorch norm is kept)")
HUB_KERNELS_NONE_NOTE = ("hub kernels (--hub-kernels): transformers maps no kernel to this model's norms "
                         "(use_kernel_forward_from_hub(\"RMSNorm\") is not on its layers' norm class)")


@lru_cache(maxsize=1)
def _hub_rmsnorm_table() -> dict[str, list[str]]:
    """{model type: the norm classes its text decoder layers use that are decorated
    ``use_kernel_forward_from_hub("RMSNorm")``} (``data/hub_kernels.json``, written by
    ``python -m vramplan.derive.hub_kernels --write``)."""
    import json

    from ._files import package_data

    table: dict[str, list[str]] = json.loads(package_data("data", "hub_kernels.json").read_text(encoding="utf-8"))[
        "rmsnorm"]
    return table


@lru_cache(maxsize=1)
def hub_rmsnorm_classes() -> frozenset[str]:
    """The decorated norm classes of every listed model type (the trace swaps these)."""
    return frozenset(c for classes in _hub_rmsnorm_table().values() for c in classes)


def hub_rmsnorm_listed(spec: ModelSpec) -> bool:
    """Whether transformers' hub kernels swap this model's decoder norms for LigerRMSNorm (by the config's own
    model_type; the program's family where the spec was built without one)."""
    return (spec.model_type or spec.family) in _hub_rmsnorm_table()


def hub_rmsnorm(spec: ModelSpec) -> bool:
    """Whether the estimate models LigerRMSNorm for this model: listed, and its norm is Llama's (``weight *
    hidden.to(input_dtype)``, LigerRMSNorm's "llama" casting mode)."""
    return spec.norm is NormKind.RMSNORM and hub_rmsnorm_listed(spec)


def built_as(spec: ModelSpec, w: Workload) -> ModelSpec:
    """The model as the transformers release ``w`` models builds it, where releases build a family differently
    (LongCat-Flash's experts: vramplan.longcat.at_release); the reader builds what the installed release does. With
    ``w.hub_kernels`` a listed model's RMSNorm runs LigerRMSNorm (:func:`hub_rmsnorm`)."""
    if w.hub_kernels and not spec.norm_kernel and hub_rmsnorm(spec):
        spec = replace(spec, norm_kernel=True)
    if spec.dual_sublayers:
        from .longcat import at_release

        return at_release(spec, w.transformers_release)
    return spec


def runs_as(spec: ModelSpec, w: Workload) -> Workload:
    """The workload the model runs: a model class without an SDPA path (``spec.sdpa`` False, or removed in the
    release modelled) gets eager attention where SDPA is asked for, as transformers falls back
    (``PreTrainedModel._check_and_adjust_attn_implementation``, transformers 5.24)."""
    if not has_sdpa(spec, w) and w.attention is Attention.SDPA:
        return replace(w, attention=Attention.EAGER)
    return w


def estimate(spec: ModelSpec, workload: Workload, *, name: str | None = None, reserved: bool = True) -> Estimate:
    """Estimate peak GPU memory of ``workload`` on one GPU for the model described by ``spec``.

    ``reserved=False``: the analytic path only (no allocator replay, well under a millisecond):
    ``peak_reserved_bytes`` is 0 and the slack in ``total_bytes`` is the calibration median
    (:data:`ALLOCATOR_SLACK_FRACTION`), for searches over thousands of candidates."""
    spec = built_as(spec, workload)
    workload = runs_as(spec, workload)
    if spec.multimodal is not None or workload.vision_options:
        from .multimodal import route  # vision-language models: tower + projector + language model

        return route(spec, workload, name or spec.name, reserved)
    return _estimate_cached(spec, workload, name or spec.name, reserved)


def check_positions(spec: ModelSpec, w: Workload) -> None:
    """Models with a fixed position table (learned embeddings; GPT-J's sin/cos buffer) cannot run longer;
    padding-free packing needs a FlashAttention varlen path (training only)."""
    # BLOOM has no FlashAttention path; GPT-J's came with its attention interface (transformers 5.24)
    if w.packing and (not w.is_train or spec.family == "bloom" or (spec.family == "gptj" and not has_sdpa(spec, w))):
        raise WorkloadError("--packing (padding-free) applies to training of models with a FlashAttention path; "
                            f"{spec.name} ({spec.family}) / task {w.task.value} has none: drop --packing")
    if spec.flash_refused and (w.attention is Attention.FLASH or w.packing):
        raise WorkloadError(f"transformers refuses FlashAttention for {spec.name} ({spec.family}): "
                            f"{spec.flash_refused}; use --attention sdpa or eager (and no --packing)")
    if w.is_train and w.gradient_checkpointing and not spec.gradient_checkpointing:
        # PreTrainedModel.gradient_checkpointing_enable raises for a class with supports_gradient_checkpointing False
        raise WorkloadError(f"transformers does not support gradient checkpointing for {spec.family} "
                            f"({spec.name}): drop --gradient-checkpointing")
    q = spec.quantization
    if w.is_train and w.method in (Method.FULL, Method.FREEZE) and q is not None and q.method != "mxfp4":
        # trainer_utils.validate_quantization_for_training (transformers 5.25): a quantized model without adapters
        # is refused unless its quantizer is QAT-trainable (none of the checkpoint formats is); MXFP4 loads
        # dequantized for training (vramplan.memory.effective_quantization)
        raise WorkloadError(f"{spec.name} is a quantized checkpoint ({q.method}): transformers' Trainer refuses to "
                            f"fine-tune its weights without adapters; use --method lora, or estimate the 16-bit "
                            "checkpoint for --method " + w.method.value)
    total = w.seq_len + (0 if w.is_train else w.new_tokens)
    fixed = spec.position is PositionKind.LEARNED or spec.family == "gptj"
    if fixed and spec.max_position_embeddings and total > spec.max_position_embeddings:
        raise WorkloadError(f"{spec.name} has {spec.max_position_embeddings} positions, {total} requested; "
                            "lower --seq-len (and --new-tokens)")


@lru_cache(maxsize=4096)
def _phases(spec: ModelSpec, w: Workload) -> tuple[ModelStates, Numerics, list[PhasePeak], _Host]:
    check_positions(spec, w)
    counts = count_params(spec)
    states = model_states(spec, w, counts)
    num = numerics(w)
    host = _Host()
    phases = _train(spec, w, states, num, host=host) if w.task is Task.TRAIN else _infer(spec, w, states, num)
    return states, num, phases, host


def peak_allocated(spec: ModelSpec, w: Workload) -> int:
    """``estimate(spec, w).peak_allocated_bytes`` without the allocator replay (for searches that only
    need a bound: what is reserved is never less)."""
    spec = built_as(spec, w)
    w = runs_as(spec, w)
    return max(p.peak_allocated_bytes for p in _phases(spec, w)[2])


def replays(spec: ModelSpec) -> bool:
    """Whether an estimate of ``spec`` replays its allocation stream when asked to (``reserved=True``)."""
    return spec.num_layers <= MAX_REPLAY_LAYERS and not has_body(spec)


@lru_cache(maxsize=1024)
def _mixers(spec: ModelSpec) -> frozenset[str]:
    """The token mixers of the model's layers (attention, Mamba, ...)."""
    return frozenset(spec.mixer(i) for i in range(spec.num_layers))


def reserve_note(spec: ModelSpec, w: Workload, replay: bool) -> str:
    """The assumption line that says where the estimate's reserved memory comes from (``replay``: the replay ran)."""
    if replay:
        return (f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB (H200, CUDA 13); reserved memory from a replay of "
                "every allocation and free through a model of PyTorch's caching allocator"
                + (f" ({w.alloc_conf})" if w.alloc_conf else " (default settings)")
                + (", over the 3 steps of the calibration loop" if w.is_train else ""))
    return (f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB (H200, CUDA 13); allocator slack "
            f"{ALLOCATOR_SLACK_FRACTION:.0%} of the peak (no allocator replay on this path"
            + (f": more than {MAX_REPLAY_LAYERS} layers" if spec.num_layers > MAX_REPLAY_LAYERS else
               ": the stack is one program" if has_body(spec) else "") + ")")


@lru_cache(maxsize=4096)
def _estimate_cached(spec: ModelSpec, w: Workload, name: str, replay: bool = True) -> Estimate:
    from .alloc_stream import load_note

    states, num, phases, host = _phases(spec, w)
    replay = replay and replays(spec)
    alloc = reserved_stats(spec, w, states, num) if replay else None
    assumptions = [
        "peak as torch.cuda.max_memory_allocated reports it (PyTorch >= 2.5, one GPU); the "
        f"{spec.family} program was written from transformers {spec.program_version}'s code and is checked against "
        f"the traces of {' and '.join(CHECKED_TRANSFORMERS)}; the run's release: {w.transformers_version}"
        + (" (MoE experts: the grouped_mm path of 5.24)" if spec.is_moe else ""),
        (f"attention: eager (transformers {w.transformers_version} has no SDPA path for "
         f"{spec.family})"
         + ("; sink logits concatenated to the scores, softmax in their dtype" if spec.attention_sinks else "")
         if not has_sdpa(spec, w) and w.attention is not Attention.FLASH else
         f"attention: {w.attention.value}" + (" (flash / memory-efficient kernels where eligible)"
                                              if w.attention is Attention.SDPA else "")),
        f"cuBLAS workspace {2 if w.is_train else 1} x 32 MiB (Hopper default)",
        reserve_note(spec, w, replay),
        *([load_note(spec, w)] if replay else []),
        *states.notes,
    ]
    if spec.norm_kernel:
        assumptions.append(HUB_KERNELS_ON_NOTE)
    elif w.hub_kernels:
        assumptions.append(HUB_KERNELS_OTHER_NOTE if hub_rmsnorm_listed(spec) else HUB_KERNELS_NONE_NOTE)
    elif w.transformers_release >= HUB_KERNELS_BY_DEFAULT:
        assumptions.append(HUB_KERNELS_NOTE)
    kinds = set(_mixers(spec)) - {"attention", "none"}
    if kinds:
        assumptions.append(_ssm_kernel_note(kinds, w.ssm_kernel))
    if w.is_train:
        assumptions.extend(_training_notes(spec, w))
    else:
        assumptions.append(f"inference: prefill {w.seq_len} tokens, logits for "
                           f"{'the last token' if w.logits is LogitsMode.LAST else 'every token'}, "
                           f"then {w.new_tokens} decode steps with a DynamicCache")
    warnings = list(spec.notes)
    unmatched = unmatched_lora_targets(spec, w.lora_targets) if w.uses_adapters and w.is_train else ()
    if w.uses_adapters and w.is_train:
        note, warning = lora_notes(spec, w)
        assumptions.append(note)
        if warning:
            warnings.append(warning)
    if unmatched:  # (peft raises only when no target matches)
        warnings.append(f"LoRA target {', '.join(unmatched)} matches no linear of {spec.family}: peft adapts the "
                        "others only")
    stale = version_warning(spec)
    if stale:
        warnings.append(stale)
    if spec.max_position_embeddings and w.seq_len + (0 if w.is_train else w.new_tokens) > \
            spec.max_position_embeddings:
        warnings.append(f"sequence length exceeds the model's max_position_embeddings "
                        f"({spec.max_position_embeddings})")
    if not w.is_train and w.method in (Method.LORA, Method.FREEZE):
        warnings.append(f"inference ignores --method {w.method.value}: adapters are assumed merged into the weights")
    elif not w.is_train and w.method is Method.QLORA:
        warnings.append("inference with --method qlora: the base weights are NF4, adapters assumed merged")
    if w.is_train and w.method is Method.FREEZE and w.trainable_layers is not None and \
            w.trainable_layers > spec.num_layers:
        warnings.append(f"--trainable-layers {w.trainable_layers} exceeds the model's {spec.num_layers} layers; "
                        "all of them train")
    return finish(name, phases, parameters=states.parameters, trainable=states.trainable_parameters,
                  assumptions=assumptions, warnings=warnings, workload=workload_dict(w), reserved=alloc,
                  host_bytes=host.nbytes + states.paged_state, host_traffic_bytes=host.traffic)


def reserved_stats(spec: ModelSpec, w: Workload, states: ModelStates | None = None,
                   num: Numerics | None = None, *, ddp: bool = False, reference: bool = False) -> AllocStats:
    """What the caching allocator holds for ``w``: the workload's allocation stream
    (:mod:`vramplan.alloc_stream`) replayed through :mod:`vramplan.allocator`. ``ddp``: on one rank of
    ``DistributedDataParallel`` (training only). ``reference``: the slow path every shortcut is checked against
    (tests/test_speed_paths.py): the stream filtered event by event, all 3 training steps, and the block-object
    allocator."""
    from .alloc_stream import infer_events, train_events, train_stream

    w = runs_as(spec, w)
    states = states or model_states(spec, w)
    num = num or numerics(w)
    conf = parse_alloc_conf(w.alloc_conf)
    if reference:
        events = train_events(spec, w, states, num, 3, ddp=ddp, reference=True) if w.is_train else \
            infer_events(spec, w, states, num, reference=True)
        return simulate(events, conf, reference=True)
    if not w.is_train:
        return simulate(infer_events(spec, w, states, num), conf)
    # the 3 steps of the calibration loop, the last one measured; the stream stops early once a step reserves
    # nothing new (the later ones repeat it exactly: alloc_stream.train_stream)
    probe: list[int] = []
    return simulate(train_stream(spec, w, states, num, 3, probe, ddp=ddp), conf, probe)


def lora_notes(spec: ModelSpec, w: Workload) -> tuple[str, str | None]:
    """Which linears carry adapters and whose choice that is; and a warning where ``--lora-targets default`` meets a
    model peft has no default for (peft looks it up by the top-level config's model_type:
    :func:`vramplan.memory.peft_default_key`)."""
    chosen = ", ".join(sorted(lora_targets(spec, w.lora_targets)))
    if w.lora_targets != ("default",):
        return f"LoRA r={w.lora_rank} on {chosen}", None
    key = peft_default_key(spec)
    if peft_default_targets(spec) is not None:
        return f"LoRA r={w.lora_rank} on {chosen} (peft's default for {key})", None
    return (f"LoRA r={w.lora_rank} on {chosen} (assumed: peft has no default for {key})",
            f"peft has no default LoRA targets for {key} (LoraConfig without target_modules raises); assumed "
            f"{', '.join(default_lora_targets(spec))}: give --lora-targets (e.g. all-linear)")


LORA_NOTE_PREFIXES = ("LoRA r=", "peft has no default LoRA targets")


def _training_notes(spec: ModelSpec, w: Workload) -> list[str]:
    """What the training-loop options assume, in the order a step runs them."""
    notes = [{
        Trainer.PLAIN: "training loop: a plain script (forward, loss.backward(), optimizer.step(), zero_grad) that "
                       "keeps the model output (logits) alive through backward and the step",
        Trainer.HF: "training loop: transformers 5.x Trainer.training_step (trainer.py): compute_loss returns only "
                    "the loss, so the model output (logits) dies before backward; loss / accumulation steps; "
                    "clip_grad_norm_ (foreach, scalar norms) before optimizer.step()",
        Trainer.TRL_SFT: "training loop: TRL 1.9 SFTTrainer.compute_loss (trl/trainer/sft_trainer.py) over "
                         "transformers' Trainer.training_step; with --loss standard it computes entropy and token "
                         "accuracy from the logits under no_grad (entropy_from_logits, 128-row chunks)",
    }[w.trainer]]
    loss = w.resolved_loss
    if loss is Loss.STANDARD:
        notes.append("loss: transformers ForCausalLMLoss (logits.float(), log_softmax saved in fp32)")
    elif loss is Loss.CHUNKED:
        notes.append(f"loss: TRL chunked_nll (_chunked_cross_entropy_loss): lm_head + cross-entropy per "
                     f"{w.loss_chunk or 256} tokens under non-reentrant checkpoint; a 16-bit head weight is copied "
                     "to fp32 in every chunk")
    elif loss is Loss.LIGER_FUSED:
        notes.append("loss: Liger fused linear cross-entropy (ops/fused_linear_cross_entropy.py): input and head "
                     "gradients computed chunk-wise in the forward, logits never whole")
    else:
        notes.append("loss: Cut Cross-Entropy (apple/ml-cross-entropy cce.py): blockwise log-sum-exp, logits "
                     "never materialized; gradients in backward")
    if w.packing:
        notes.append(f"padding-free packing: one row of {w.tokens} real tokens per micro-batch "
                     f"({w.batch_size} x {w.avg_seq_len or w.seq_len}); attention by FlashAttention varlen "
                     "(TRL padding_free / DataCollatorWithFlattening)")
    if w.checkpoint_every == 1:
        notes.append("gradient checkpointing: non-reentrant, every decoder layer recomputed in backward")
    elif w.checkpoint_every:
        notes.append(f"gradient checkpointing: non-reentrant, every {w.checkpoint_every}th decoder layer "
                     "(0, N, 2N, ...) recomputed in backward, the others keep their activations")
    if w.activation_offload:
        notes.append("activation offloading (TRL activation_offloading / torchtune OffloadActivations): what the "
                     "decoder layers save for backward lives in pinned host memory and comes back for backward "
                     "(checkpointed layers keep their input on the GPU); the forward stash of in-flight copies "
                     "is not counted")
    return notes
