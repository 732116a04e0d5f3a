"""RWKV(-4) blocks (``model_type`` ``rwkv``; mixer kind ``"rwkv"``).

transformers 5.24 ``models/rwkv/modeling_rwkv.py``: ``RwkvModel`` holds ``embeddings``, ``blocks`` (not
``layers``) and ``ln_out``; block 0 also norms the embeddings (``pre_ln``). A block is ``x + att(ln1(x))`` then
``x + ffn(ln2(x))`` with biased ``nn.LayerNorm``s.

* ``RwkvSelfAttention``: the token shift (``nn.ZeroPad2d((0, 0, 1, -1))``: a new tensor), three mixes
  ``x * mix + shifted * (1 - mix)`` (time_mix_key / value / receptance), ``key`` / ``value`` / ``receptance`` linears
  (no bias), ``sigmoid(receptance)``, the WKV recurrence, ``output(receptance * wkv)``.
* ``RwkvFeedForward``: the token shift, two mixes, ``value(square(relu(key(k))))``, ``sigmoid(receptance(r)) * that``.

The WKV recurrence runs one of two programs (``rwkv_linear_attention``):

* ``fused`` (a CUDA install with ``ninja`` and the ``kernels`` package: ``load_wkv_cuda_kernel`` fetches
  kernels-community/rwkv): ``RwkvLinearAttention`` saves ``-exp(time_decay)`` (fp32), ``time_first``, k, v and
  the output (made contiguous; fp16 inputs are cast to fp32 first) and computes the input gradients in one kernel.
  Sequences longer than ``context_length`` are refused by it.
* ``torch`` (``rwkv_linear_attention_cpu``, what runs without the kernel and what ``vramplan trace`` runs): a Python
  loop over the sequence in fp32 (key cast per step, ``maximum`` / ``exp`` / products / a division per step, each
  saving its inputs or result for backward) that writes each step's output into ``zeros_like(key)``
  (``CopySlices``).

Generation cache: ``state``, five (batch, hidden, layers) tensors (two in the activations' dtype: the last inputs
of the two token shifts; three fp32: the numerator, denominator and max of the recurrence), whatever the length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .spec import ModelSpec

__all__ = ["rwkv_block", "rwkv_extra_params", "rwkv_linears", "rwkv_state_bytes"]

KV = MemoryKind.KV_CACHE


def rwkv_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of a block's linears: attention's key / value / receptance / output, the
    feed-forward's key / receptance / value (no biases). ``spec.head_dim`` carries attention_hidden_size."""
    h, a, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    return [("key", h, a, 1), ("value", h, a, 1), ("receptance", h, a, 1), ("output", a, h, 1),
            ("key", h, f, 1), ("receptance", h, h, 1), ("value", f, h, 1)]


def rwkv_extra_params(spec: ModelSpec) -> int:
    """time_decay and time_first (attention_hidden_size each), five time_mix vectors (hidden each)."""
    return 2 * spec.head_dim + 5 * spec.hidden_size


def rwkv_state_bytes(spec: ModelSpec, batch: int, act: int) -> int:
    """One block's share of ``state``: hidden x (2 x act + 3 x fp32) per sequence."""
    return batch * spec.hidden_size * (2 * act + 3 * 4)


def _mix(bld: _B, x: Tensor, shifted: Tensor, tr: bool, name: str) -> Tensor:
    """``x * mix + shifted * (1 - mix)`` with a trainable (1, 1, hidden) ``mix``: the products save x / shifted for
    the mix's gradient."""
    tp, num = bld.tp, bld.num
    h = bld.spec.hidden_size
    mix = tp.op(h, num.param, (), rg=tr, params=bld.param_grad(f"{name}{len(tp.ops)}", h, num.param) if tr else ())
    p1 = bld.mul(x, mix)
    om = tp.op(h, num.param, (mix,))  # 1 - mix
    p2 = bld.mul(shifted, om)
    return bld.add(p1, p2)


def rwkv_block(bld: _B, x: Tensor) -> Tensor:
    """One ``RwkvBlock`` (block 0's ``pre_ln`` is recorded with the embeddings)."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, a, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    tr = plan.trainable
    t = bld.t
    lin = bld.proj

    if not bld.num.training:  # the model's ``state`` (made before the first block): this block's share
        tp.keep(tp.op(rwkv_state_bytes(spec, bld.b, bld.num.act), 1, (), rg=False, kind=KV))
    n1 = bld.norm(x, h, tr)
    sh = tp.op(t * h, n1.elem, (n1,))  # time_shift: constant_pad_nd
    km = _mix(bld, n1, sh, tr, "att.time_mix_key")
    vm = _mix(bld, n1, sh, tr, "att.time_mix_value")
    rm = _mix(bld, n1, sh, tr, "att.time_mix_receptance")
    k = lin(km, h, a, "key")
    v = lin(vm, h, a, "value")
    r = bld.ew(lin(rm, h, a, "receptance"), save_out=True)
    tp.hold(sh)  # extract_key_value's ``shifted`` lives until it returns
    wkv = _wkv(bld, k, v)
    att = lin(bld.mul(r, wkv), a, h, "output")
    tp.hold(n1)  # the attention's argument (ln1's output) lives until the call returns
    hmid = bld.add(x, att)

    n2 = bld.norm(hmid, h, tr)
    sh2 = tp.op(t * h, n2.elem, (n2,))
    km2 = _mix(bld, n2, sh2, tr, "ffn.time_mix_key")
    rm2 = _mix(bld, n2, sh2, tr, "ffn.time_mix_receptance")
    kk = lin(km2, h, f, "key")
    rl = bld.ew(kk, save_out=True)  # relu saves its result
    # torch.square is pow(x, 2), which saves its input; its backward (FunctionsManual.cpp pow_backward:
    # grad * (2 * x.pow(1))) makes x.pow(1) and 2 * that before the product that is the input's gradient
    sq = tp.op(rl.numel, rl.elem, (rl,), save=(rl,) if rl.rg else (), bwd_scratch=2 * rl.numel * rl.elem)
    tp.hold(km2)  # ``key`` is rebound once square(relu(...)) has run
    val = lin(sq, f, h, "value")
    rr = bld.ew(lin(rm2, h, h, "receptance"), save_out=True)
    ff = bld.mul(rr, val)
    tp.hold(n2, sh2)  # the feed-forward's argument and ``shifted`` live until it returns
    tp.hold(att)  # RwkvBlock.forward's ``attention`` local stays referenced through the feed-forward
    y = bld.add(hmid, ff)
    tp.keep(y)
    return y


def _wkv(bld: _B, k: Tensor, v: Tensor) -> Tensor:
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None
    a = spec.head_dim
    b, s, t = bld.b, bld.s, bld.t
    tr = plan.trainable
    e = k.elem
    row = b * a
    if not num.training:
        # the loop's running fp32 state (num, den, max) and a step's temporaries; the final state is copied into
        # the model's ``state`` (counted as cache by the estimator)
        return tp.op(t * a, e, (k, v), rg=False, fwd_scratch=12 * row * 4)
    if plan.ssm_kernel == "fused" and s > 1:
        # RwkvLinearAttention: -exp(time_decay) in fp32, k / v / output made contiguous (views here), one kernel
        td = tp.op(a, 4, (), rg=False)
        out = tp.op(t * a, e, (k, v, td), save=(k, v, td), grad_to=(k, v),
                    params=bld.param_grad("time_decay", a, num.param) + bld.param_grad("time_first", a, num.param)
                    if tr else (), rg=True)
        tp.save_output(out)
        return out
    # rwkv_linear_attention_cpu: output = zeros_like(key); num/den/max states fp32 (max: zeros - 1e38); per step
    # the key's fp32 copy, key + time_first, two exps and their products with the states, numerator and
    # denominator (saved by the division), the decayed max and the new max (saved by maximum), two more exps and
    # the new num/den states: twelve fp32 rows saved, eight row temporaries (recorded in chunks of steps)
    from .rglru import scan_chunks, written_into

    ctx = tp.op(t * a, e, (), rg=False)
    max_s = tp.op(row, 4, (tp.op(row, 4, (), rg=False),), rg=False)
    num_s = tp.op(row, 4, (), rg=False)
    den_s = tp.op(row, 4, (), rg=False)
    decay = tp.op(a, num.param, (), rg=tr, params=bld.param_grad("time_decay", a, num.param) if tr else ())
    first = tp.op(a, num.param, (), rg=tr, params=bld.param_grad("time_first", a, num.param) if tr else ())
    state = tp.op(3 * row, 4, (max_s, num_s, den_s, decay, first), rg=tr)  # (the three running states)
    # (e2 * value[:, t] saves the value slice itself: the value projection stays whole)
    written = scan_chunks(bld, s, row, (k, v), state, saved_per_step=12, scratch_per_step=8, out_elem=e,
                          saved_inputs=(v,))
    return written_into(bld, ctx, written)
