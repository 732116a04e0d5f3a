"""The RG-LRU recurrent block of RecurrentGemma / Griffin (mixer kind ``"rglru"``).

transformers 5.24 ``models/recurrent_gemma/modeling_recurrent_gemma.py`` ``RecurrentGemmaRecurrentBlock``: two
projections of the normed hidden states to ``lru_width`` (``linear_y``, gelu-tanh'd, and ``linear_x``), a depthwise
``nn.Conv1d`` (kernel ``conv1d_width``, bias, padding ``width - 1``) over ``x``, the Real-Gated Linear Recurrent Unit
(``RecurrentGemmaRglru``: per-head block-diagonal input and recurrence gates by ``baddbmm``, ``a = exp(-8 r
softplus(recurrent_param))``, the input scaled by ``sqrt(1 - a^2)`` through ``SqrtBoundDerivative``), the linear scan
``_rnn_scan``, ``y * scan`` and ``linear_out``. All three linears have biases.

There is no fused kernel: ``_rnn_scan`` is a Python loop over the sequence that every install runs. Each step casts
the step's gate to fp32 and multiplies it with the running fp32 state (autograd keeps both), adds the fp32 copy of
the step's input and copies the bf16 cast into the output (``contextualized_states[:, t] = ...``: ``CopySlices``,
whose backward clones the whole output gradient at every step).

Generation cache (module attributes, set by ``_setup_cache`` and the prefill): the recurrent state (batch,
lru_width) in fp32 and the last ``conv1d_width - 1`` inputs of the convolution (batch, lru_width, width - 1) in the
activations' dtype. The sizes travel in :class:`vramplan.ssm.SSMSpec`: ``d_inner`` = lru_width, ``n_heads`` = the
gate blocks (num_attention_heads), ``head_dim`` = their width, ``d_conv`` = conv1d_width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .ssm import SSMSpec

__all__ = ["SCAN_CHUNKS", "rglru_extra_params", "rglru_linears", "rglru_mixer", "rglru_state_bytes", "scan_chunks",
           "written_into"]

KV = MemoryKind.KV_CACHE


def rglru_linears(ss: SSMSpec, hidden: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of the recurrent block's ``nn.Linear`` modules."""
    return [("linear_y", hidden, ss.d_inner, 1), ("linear_x", hidden, ss.d_inner, 1),
            ("linear_out", ss.d_inner, hidden, 1)]


def rglru_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements of the linears, other parameters): the three linears' biases; the conv's weight
    (lru x 1 x width) and bias; ``recurrent_param`` (lru); the input and recurrence gates' block-diagonal weights
    (heads x block x block) and biases (heads x block)."""
    lru, heads, block = ss.d_inner, ss.n_heads, ss.head_dim
    return 2 * lru + hidden, lru * ss.d_conv + lru + lru + 2 * (heads * block * block + heads * block)


def rglru_state_bytes(ss: SSMSpec, batch: int, act: int) -> int:
    """One layer's generation cache: the fp32 recurrent state and the conv state (``F.pad`` of the prompt's
    ``x`` to its last ``width - 1`` positions)."""
    return batch * ss.d_inner * 4 + batch * ss.d_inner * (ss.d_conv - 1) * act


def rglru_mixer(bld: _B, n: Tensor) -> Tensor:
    """``RecurrentGemmaRecurrentBlock.forward`` on the normed hidden states ``n`` (op by op, with what autograd
    saves: derivatives.yaml)."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    h, lru, heads, block, width = spec.hidden_size, ss.d_inner, ss.n_heads, ss.head_dim, ss.d_conv
    b, s, t = bld.b, bld.s, bld.t
    tr = plan.trainable

    def pg(name: str, numel: int) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, num.param) if tr else ()

    y = bld.proj(n, h, lru, "linear_y", bias=True)
    ya = bld.activation(y)
    x = bld.proj(n, h, lru, "linear_x", bias=True)
    e = x.elem
    if not num.training:  # prefill: conv1d_state = F.pad(x_branch, (width - seq - 1, 0)): the last width - 1 inputs
        tp.keep(tp.op(b * lru * (width - 1), e, (x,), rg=False, kind=KV))
    # conv_1d(x_branch)[..., :seq_len]: the padded output (batch, lru, seq + width - 1); convolution saves its input
    # for the weight's gradient
    conv = tp.op(b * lru * (s + width - 1), e, (x,), save=(x,) if tr else (), params=pg("conv_1d", lru * width + lru))
    act = tp.view(conv, t * lru)  # .transpose(1, 2): a strided view
    # activations.reshape(batch * seq, heads, block): a copy of the strided view
    ra = tp.op(t * lru, e, (act,), passthrough=True)
    gates, res = [], []
    for gate in ("input_gate", "recurrent_gate"):
        # baddbmm(bias[:, None, :], reshape_act, weight) (heads, tokens, block): saves reshape_act for the weight's
        # gradient; .transpose(0, 1).reshape(batch, seq, lru) copies; sigmoid saves its result
        r = tp.op(t * lru, e, (ra,), save=(ra,) if tr else (), params=pg(gate, heads * block * (block + 1)))
        res.append(r)
        rc = tp.op(t * lru, e, (r,), passthrough=True)
        gates.append(bld.ew(rc, save_out=True))
    ig, rgate = gates
    sp = tp.op(lru, e, (), rg=tr, params=pg("recurrent_param", lru))  # softplus(recurrent_param)
    lg = bld.mul(tp.op(t * lru, e, (rgate,)), sp)  # -8.0 * recurrent_gate * softplus(...)
    a = bld.ew(lg, save_out=True)  # recurrent_gate = exp(log_recurrent_gate)
    a2 = bld.ew(tp.op(t * lru, e, (lg,)), save_out=True)  # a_square = exp(2 * log_recurrent_gate)
    gi = bld.mul(act, ig)  # gated_inputs = activations * input_gate
    om = tp.op(t * lru, e, (a2,))  # 1 - a_square
    mult = tp.op(t * lru, e, (om,), save=(om,) if om.rg else ())  # SqrtBoundDerivative saves its input
    not_reset = tp.op(s, 1, (), rg=False)  # ~reset: (1, seq, 1) bool
    m2 = bld.add(tp.op(t * lru, e, (mult, not_reset), save=(not_reset,) if mult.rg else (), grad_to=(mult,)),
                 not_reset)  # reset + ~reset * multiplier
    nx = bld.mul(gi, m2)  # normalized_x
    ag = tp.op(t * lru, e, (a, not_reset), save=(not_reset,) if a.rg else (), grad_to=(a,))  # a * ~reset
    out = _scan(bld, nx, ag)
    # RecurrentGemmaRglru.forward's locals live until it returns (the second baddbmm result, the gates, the
    # log-gate, a_square, the gated and normalised inputs), and the block's x_branch (the conv output) with them
    _hold(bld, conv, ra, res[1], ig, lg, a, a2, gi, m2, nx, ya)
    hs = bld.mul(out, ya)  # x_branch * y_branch
    return bld.proj(hs, lru, h, "linear_out", bias=True)


def _hold(bld: _B, *tensors: Tensor) -> None:
    bld.tp.hold(*tensors)


def _scan(bld: _B, nx: Tensor, ag: Tensor) -> Tensor:
    """``RecurrentGemmaRglru._rnn_scan`` in linear mode: ``contextualized_states = zeros_like(x)``; per step
    ``state = a[:, t].float() * state; state = state + x[:, t].float(); out[:, t] = state.to(x.dtype)``. Inference
    keeps only the running state (the final one is the cache); training keeps each step's fp32 gate copy and the
    state it multiplies."""
    spec, tp, num = bld.spec, bld.tp, bld.num
    assert spec.ssm is not None
    lru = spec.ssm.d_inner
    b, s, t = bld.b, bld.s, bld.t
    e = nx.elem
    row = b * lru
    if not num.training or not (nx.rg or ag.rg):
        # zeros_like(x), the per-step fp32 copies and states (two running states, three step temporaries)
        out = tp.op(t * lru, e, (nx, ag), rg=False, fwd_scratch=5 * row * 4)
        if not num.training:
            tp.keep(tp.op(row, 4, (), rg=False, kind=KV))  # self.recurrent_states: the final state
        return out
    ctx = tp.op(t * lru, e, (), rg=False)  # zeros_like(hidden_states)
    state = tp.op(row, 4, (), rg=False)  # zeros(hidden_states[:, 0].shape, fp32)
    # per step: a[:, t].float() (saved), its product with the state (which it saves), x[:, t].float() and the sum
    # (the next state); the steps are recorded in chunks (scan_chunks)
    written = scan_chunks(bld, s, row, (ag, nx), state, saved_per_step=2, scratch_per_step=2, out_elem=e)
    return written_into(bld, ctx, written)


SCAN_CHUNKS = 16  # a Python scan's steps are recorded in this many groups (their saves accumulate step by step)


def scan_chunks(bld: _B, steps: int, row: int, inputs: tuple[Tensor, ...], state: Tensor, *, saved_per_step: int,
                scratch_per_step: int, out_elem: int, saved_inputs: tuple[Tensor, ...] = ()) -> list[Tensor]:
    """A Python loop over ``steps`` whose every step reads a ``row``-sized slice of each of ``inputs``, keeps
    ``saved_per_step`` fp32 rows for backward, makes ``scratch_per_step`` fp32 row temporaries, carries an fp32
    state and writes a row into a preallocated output. Recorded as :data:`SCAN_CHUNKS` groups of steps: each group's
    saved rows are one tensor the group's carry saves (freed when its backward has run, as the steps' are), its
    written rows one slice of the output (see :func:`written_into`); ``saved_inputs`` are inputs whose step slices
    autograd saves as they are (views: the whole tensor stays). Returns the slices."""
    tp = bld.tp
    chunks = min(steps, SCAN_CHUNKS)
    written: list[Tensor] = []
    for i in range(chunks):
        k = steps // chunks + (1 if i < steps % chunks else 0)
        views = tuple(tp.view(x, k * row) for x in inputs)
        saved = tp.op(saved_per_step * k * row, 4, (*views, state), rg=False)
        state = tp.op(state.numel, 4, (*views, state, saved), save=(saved, *saved_inputs),
                      grad_to=tuple(t for t in (*views, state) if t.rg), fwd_scratch=scratch_per_step * row * 4,
                      rg=True)
        c = tp.op(k * row, out_elem, (state,))  # the steps' casts, copied into the output's slice
        c.nbytes = 0
        written.append(c)
    return written


def written_into(bld: _B, ctx: Tensor, written: list[Tensor]) -> Tensor:
    """A preallocated output after a Python loop wrote each step into its slice (``out[:, t] = step``): the result
    is ``ctx``'s storage with its own gradient, handed to the steps; ``CopySlices``' backward clones the whole
    output gradient at each step (one clone alive at a time)."""
    tp = bld.tp
    full = ctx.numel * ctx.elem
    out = tp.op(ctx.numel, ctx.elem, (ctx, *written), grad_to=tuple(written), bwd_scratch=full)
    out.nbytes = 0
    out.base = ctx  # ctx's storage: saving the result keeps ctx
    tp.own_grad.add(id(out))  # ... but the result has its own gradient (the in-place result of the writes)
    _hold(bld, ctx)
    return out
