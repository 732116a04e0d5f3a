"""Kimi Delta Attention token mixers (mixer kind ``"gdn"`` with ``gdn_layout`` "kda" or "kda_full"): Kimi Linear,
Ling 3 (``bailing_hybrid``).

Kimi Delta Attention (transformers 5.24 ``models/kimi_linear/modeling_kimi_linear.py`` ``KimiLinearDeltaAttention``;
``BailingHybridLinearAttention`` in ``modeling_bailing_hybrid.py`` differs only in its gates) is a gated DeltaNet
whose decay is per channel instead of per head: ``q_proj``, ``k_proj``, ``v_proj`` (``num_heads x head_dim`` each)
concatenated, a depthwise causal ``conv1d`` (no bias) + SiLU, a forget gate ``g`` of the same width as the keys, a
write strength ``beta = sigmoid(b_proj(x))`` per head, the delta rule, and a gated RMSNorm over each head (fp32
weight, ``* sigmoid(gate.float())``) before ``o_proj``.

* "kda" (Kimi): ``KimiLinearForgetGate``: ``f_b_proj(f_a_proj(x))`` (a rank-``head_dim`` pair), ``.float() +
  dt_bias``, ``-exp(A_log) * where(g > 20, g, log(1 + exp(g)))`` in fp32; the output gate ``g_b_proj(g_a_proj(x))``.
* "kda_full" (Ling 3): ``f_proj(x).float() + dt_bias``; with ``kda_safe_gate``, ``lower_bound * sigmoid(exp(A_log) *
  g)``, else ``-exp(A_log) * softplus(g)``; cast back to the activation dtype; the output gate ``g_proj(x)``; the
  conv1d's weight is fp32 (``_keep_in_fp32_modules_strict``), so the convolution runs on an fp32 copy.

The sizes travel in :class:`vramplan.ssm.SSMSpec` as for :mod:`vramplan.gdn`: ``n_heads`` = ``n_groups`` = the heads,
``head_dim`` = ``d_state`` = the head size, ``d_inner`` = heads x head size; the generation cache is the same two
tensors (the conv state and the fp32 (batch, heads, head_dim, head_dim) recurrent state).

Only transformers' plain-PyTorch ``chunk_kimi_delta_attention`` is modelled (what ``vramplan trace`` runs on a
machine without flash-linear-attention, and what runs on a GPU without it): it copies q, k, v, beta and g to fp32,
L2-normalises q and k, pads to a multiple of 64, and materialises the per-channel intra-chunk decay ``exp(g_i -
g_j)`` as a (batch, heads, chunks, 64, 64, head_dim) fp32 tensor, the (64 x 64 x head_dim) products of the keys
with it, a row-by-row in-place solve whose clones autograd keeps, and a Python loop over the chunks that makes
one such (64 x 64 x head_dim) product per chunk. fla's ``chunk_kda`` (a GPU install with flash-linear-attention)
is refused: its saved tensors are not modelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .ssm import SSMSpec

__all__ = ["KDA_CHUNK", "kda_extra_params", "kda_linears", "kda_mixer"]

KDA_CHUNK = 64  # chunk_kimi_delta_attention's chunk_size default
KV = MemoryKind.KV_CACHE
_ROWS = range(1, KDA_CHUNK)  # the in-place solve's rows (for i in range(1, chunk_size))
_ROW_CLONES = sum(i + i * i for i in _ROWS)  # elements of the row and block clones autograd keeps, per chunk


def kda_linears(ss: SSMSpec, hidden: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of a KDA mixer's ``nn.Linear`` modules (none has a bias)."""
    nh, d = ss.n_heads, ss.head_dim
    q = nh * d
    out = [("q_proj", hidden, q, 1), ("k_proj", hidden, q, 1), ("v_proj", hidden, q, 1)]
    if ss.gdn_layout == "kda":  # KimiLinearForgetGate f_a/f_b, b_proj, the low-rank output gate g_a/g_b
        out += [("f_a_proj", hidden, d, 1), ("f_b_proj", d, q, 1), ("b_proj", hidden, nh, 1),
                ("g_a_proj", hidden, d, 1), ("g_b_proj", d, q, 1)]
    else:  # BailingHybridForgetGate f_proj, b_proj, g_proj
        out += [("f_proj", hidden, q, 1), ("b_proj", hidden, nh, 1), ("g_proj", hidden, q, 1)]
    return [*out, ("o_proj", q, hidden, 1)]


def kda_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements, other parameters): the depthwise conv1d (3 x heads x head_dim x kernel, no bias), the forget
    gate's ``dt_bias`` (heads x head_dim) and ``A_log`` (one per head), the gated norm's weight (head_dim)."""
    q = ss.n_heads * ss.head_dim
    return 0, 3 * q * ss.d_conv + q + ss.n_heads + ss.head_dim


def _hold(bld: _B, *tensors: Tensor) -> None:
    bld.tp.hold(*tensors)


def _outer(bld: _B, a: Tensor, b: Tensor, numel: int, elem: int = 4) -> Tensor:
    """``a.unsqueeze(-2) * b.unsqueeze(-3)``: a broadcast product larger than both inputs; each input's gradient is
    computed at the product's size and summed down (the engine's validate_outputs), as :meth:`Tape.mul` counts it."""
    tp = bld.tp
    save = ((b,) if a.rg else ()) + ((a,) if b.rg else ())
    full = numel * elem
    differ = [t for t in (a, b) if t.rg and tp.training]
    out = tp.op(numel, elem, (a, b), save=save, bwd_scratch=sum(full - t.numel * t.elem for t in differ))
    tp.ops[-1].cast_scratch = sum(t.numel * t.elem for t in differ)
    return out


def _mul_sum(bld: _B, a: Tensor, b: Tensor, numel: int, out_numel: int) -> Tensor:
    """``(a * b).sum(-1)`` of two same-size fp32 tensors: the product is a temporary, the sum's backward expands the
    gradient (a view), the product's backward makes one gradient per input at its size."""
    save = ((b,) if a.rg else ()) + ((a,) if b.rg else ())
    return bld.tp.op(out_numel, 4, (a, b), save=save, fwd_scratch=numel * 4)


def kda_mixer(bld: _B, n: Tensor) -> Tensor:
    """``KimiLinearDeltaAttention.forward`` / ``BailingHybridLinearAttention.forward`` on the normed hidden states
    ``n`` (an unpadded batch: ``apply_mask_to_padding_states`` does nothing)."""
    from .errors import ConfigError

    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    if plan.ssm_kernel == "fused":
        raise ConfigError(f"{spec.name}: Kimi Delta Attention with flash-linear-attention's chunk_kda kernel is not "
                          "modelled; estimate transformers' plain-PyTorch fallback with --ssm-kernel torch (what runs "
                          "without the fla package), or run `vramplan trace` on a machine with fla installed")
    h, b, s, t = spec.hidden_size, bld.b, bld.s, bld.t
    nh, d = ss.n_heads, ss.head_dim
    q_dim = nh * d
    cd = 3 * q_dim
    tr = plan.trainable
    lin = bld.proj
    e = n.elem

    def pg(name: str, numel: int, elem: int | None = None) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, elem or num.param) if tr else ()

    # torch.cat([q_proj(x), k_proj(x), v_proj(x)], -1).transpose(1, 2): the projections die with the cat
    qp = lin(n, h, q_dim, "q_proj")
    kp = lin(n, h, q_dim, "k_proj")
    vp = lin(n, h, q_dim, "v_proj")
    mixed = tp.op(t * cd, e, (qp, kp, vp), passthrough=True)
    if not num.training:  # cache.update_conv_state: lazily zeros (batch, conv_dim, kernel), then copy_ of the inputs
        tp.keep(tp.op(b * cd * ss.d_conv, e, (), rg=False, kind=KV))
    # causal_conv1d_fn: F.conv1d(hidden_states.to(weight.dtype), padding=kernel - 1) saves its input; [..., :seq]; the
    # activation saves its input (the padded output); .to(hidden_states.dtype)
    ce = 4 if ss.gdn_layout == "kda_full" else e  # Ling 3 keeps conv1d in fp32
    xin = bld.cast(mixed, ce)
    conv = tp.op(b * cd * (s + ss.d_conv - 1), ce, (xin,), save=(xin,), params=pg("conv1d", cd * ss.d_conv, ce))
    act = tp.op(t * cd, ce, (conv,), save=(conv,) if conv.rg else ())
    act = bld.cast(act, e)
    _hold(bld, mixed)
    q = tp.view(act, t * q_dim)
    k = tp.view(act, t * q_dim)
    v = tp.view(act, t * q_dim)

    # the forget gate (fp32 per channel)
    a_log = tp.op(nh, 4, (), rg=tr, params=pg("A_log", nh))  # A_log.float() / A_log
    if ss.gdn_layout == "kda":  # KimiLinearForgetGate
        fb = lin(lin(n, h, d, "f_a_proj"), d, q_dim, "f_b_proj")
        f32 = bld.cast(fb, 4)
        g0 = tp.op(t * q_dim, 4, (f32,), params=pg("dt_bias", q_dim, 4), rg=f32.rg or tr)  # + dt_bias.float()
        rate = bld.ew(a_log, save_out=True)  # exp(A_log)
        cond = tp.op(t * q_dim, 1, (g0,), rg=False)  # g > 20.0
        ex = bld.ew(g0, save_out=True)  # torch.exp(g)
        one = tp.op(t * q_dim, 4, (ex,))  # 1.0 + ...
        lg = bld.ew(one, save_in=True)  # torch.log
        sp = tp.op(t * q_dim, 4, (g0, lg, cond), save=(cond,) if (g0.rg or lg.rg) else (), grad_to=(g0, lg))
        neg = tp.op(nh, 4, (rate,))  # -decay_rate
        g = bld.mul(neg, sp)
    else:  # BailingHybridForgetGate
        fp = lin(n, h, q_dim, "f_proj")
        f32 = bld.cast(fp, 4)
        gi = tp.op(t * q_dim, 4, (f32,), params=pg("dt_bias", q_dim, 4), rg=f32.rg or tr)
        rate = bld.ew(a_log, save_out=True)  # A_log.exp()
        if ss.neg_eigval:  # kda_safe_gate: lower_bound * sigmoid(decay_rate * gate_input)
            z = bld.mul(rate, gi)
            sg = bld.ew(z, save_out=True)
            g = tp.op(t * q_dim, 4, (sg,))
        else:  # -decay_rate * F.softplus(gate_input)
            spl = bld.ew(gi, save_in=True)
            g = bld.mul(tp.op(nh, 4, (rate,)), spl)
        g = bld.cast(g, e)  # gate.to(hidden_states.dtype)
    beta = bld.ew(lin(n, h, nh, "b_proj"), save_out=True)  # torch.sigmoid(b_proj(x))

    core = _chunk_kda(bld, q, k, v, g, beta)
    if ss.gdn_layout == "kda":
        gate = lin(lin(n, h, d, "g_a_proj"), d, q_dim, "g_b_proj")
    else:
        gate = lin(n, h, q_dim, "g_proj")
    from .gdn import _norm_gated  # KimiLinearRMSNormGated: fp32 weight, sigmoid gate (saves its result: the same size)

    y = _norm_gated(bld, core, gate)
    _hold(bld, act, g, beta, core, gate)
    return lin(y, q_dim, h, "o_proj")


def _chunk_kda(bld: _B, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
    """transformers' ``chunk_kimi_delta_attention`` (modeling_kimi_linear.py, transformers 5.24), op by op with what
    autograd saves; returns the (batch, seq, heads, head_dim) output in the input dtype."""
    spec, tp, num = bld.spec, bld.tp, bld.num
    ss = spec.ssm
    assert ss is not None
    nh, d = ss.n_heads, ss.head_dim
    b, s = bld.b, bld.s
    c = KDA_CHUNK
    chunks = -(-s // c)
    sp = chunks * c
    e = q.elem
    tn = b * nh * s  # (batch, heads, seq) rows
    pn = b * nh * sp  # padded rows
    big = pn * c * d  # one (batch, heads, chunks, c, c, head_dim) tensor
    att = pn * c  # the (c x c) matrices of every chunk

    def to32(x: Tensor, numel: int) -> Tensor:  # x.transpose(1, 2).contiguous().to(torch.float32)
        xc = tp.op(numel, x.elem, (x,), passthrough=True)
        return bld.cast(xc, 4) if x.elem != 4 else xc

    q32, k32, v32 = to32(q, tn * d), to32(k, tn * d), to32(v, tn * d)
    b32, g32 = to32(beta, tn), to32(g, tn * d)

    def l2norm(x: Tensor) -> Tensor:  # x / sqrt((x * x).sum(-1, keepdim=True) + eps)
        xx = tp.op(x.numel, 4, (x,), save=(x,) if x.rg else ())
        ssum = tp.op(tn, 4, (xx,))
        eps = tp.op(tn, 4, (ssum,))
        nrm = bld.ew(eps, save_out=True)  # sqrt
        return bld.mul(x, nrm)  # the division saves both

    qn = l2norm(q32)
    kn = l2norm(k32)
    # F.pad to a multiple of the chunk (constant_pad_nd allocates even for a zero pad); the query times the scale
    qs = tp.op(pn * d, 4, (tp.op(pn * d, 4, (qn,)),))
    kp = tp.op(pn * d, 4, (kn,))
    vp = tp.op(pn * d, 4, (v32,))
    gp = tp.op(pn * d, 4, (g32,))
    bp = tp.op(pn, 4, (b32,))
    v_beta = bld.mul(vp, bp)
    k_beta = bld.mul(kp, bp)
    cum = tp.op(pn * d, 4, (gp,))  # g.cumsum(dim=-2)
    masks = tp.op(2 * c * c, 1, (), rg=False)  # triu(ones) twice
    # decay_mask = (g[..., None, :] - g[..., None, :, :]).masked_fill(strict_mask, -inf).exp()
    diff = tp.op(big, 4, (cum,))
    mf = tp.op(big, 4, (diff, masks), save=(masks,) if diff.rg else (), grad_to=(diff,))
    decay = bld.ew(mf, save_out=True)
    # attn = -(k_beta[..., None, :] * key[..., None, :, :] * decay_mask).sum(-1).masked_fill(mask, 0)
    kk = _outer(bld, k_beta, kp, big)
    summed = _mul_sum(bld, kk, decay, big, att)
    attn = tp.op(att, 4, (tp.op(att, 4, (summed,)), masks), save=(masks,) if summed.rg else ())
    # for i in range(1, c): row = attn[..., i, :i].clone(); sub = attn[..., :i, :i].clone();
    # attn[..., i, :i] = row + (row.unsqueeze(-1) * sub).sum(-2): autograd keeps every clone (for the product)
    rg = attn.rg
    clones = tp.op(b * nh * chunks * _ROW_CLONES, 4, (attn,), rg=False)
    widest = b * nh * chunks * (c - 1) * (c - 1) * 4  # the last row's product, a temporary
    attn = tp.op(att, 4, (attn, clones), save=(clones,) if rg else (), grad_to=(attn,), fwd_scratch=widest,
                 bwd_scratch=2 * att * 4 if rg else 0)
    attn = tp.op(att, 4, (attn,))  # + eye
    value = tp.op(pn * d, 4, (attn, v_beta), save=(attn, v_beta) if (attn.rg or v_beta.rg) else ())  # attn @ v_beta
    ge = bld.ew(cum, save_out=True)  # g.exp()
    kge = bld.mul(k_beta, ge)
    k_cum = tp.op(pn * d, 4, (attn, kge), save=(attn, kge) if (attn.rg or kge.rg) else ())
    state = tp.op(b * nh * d * d, 4, (), rg=False)  # zeros
    core = tp.op(pn * d, 4, (), rg=False)  # zeros_like(value): the loop writes into it in place
    cn = b * nh * c  # one chunk's rows
    written: list[Tensor] = []
    for _ in range(chunks):
        q_i, k_i, v_i, g_i = (tp.view(qs, cn * d), tp.view(kp, cn * d), tp.view(value, cn * d),
                              tp.view(cum, cn * d))
        kc_i = tp.view(k_cum, cn * d)
        # decay_mask[:, :, i]: a view, recorded as an op (no bytes of its own) whose backward is select_backward's
        # decay-mask-sized zeros with the chunk's gradient written in; the engine's input buffer adds that in place
        # into the gradient so far, which it holds alone (torch/csrc/autograd/input_buffer.cpp
        # can_accumulate_inplace; the replay's transient for a gradient added into an existing buffer)
        dm_i = tp.op(cn * c * d, 4, (decay,))
        dm_i.nbytes = 0
        gie = bld.ew(g_i, save_out=True)  # g_i.exp()
        qg = bld.mul(q_i, gie)
        inter = tp.op(cn * d, 4, (qg, state), save=((state,) if qg.rg else ()) + ((qg,) if state.rg else ()))
        qk = _outer(bld, q_i, k_i, cn * c * d)  # q_i[..., None, :] * k_i[..., None, :, :]
        intra = _mul_sum(bld, qk, dm_i, cn * c * d, cn * c)  # * decay_mask[:, :, i], .sum(-1)
        intra = tp.op(cn * c, 4, (intra, masks), save=(masks,) if intra.rg else (), grad_to=(intra,))
        vpr = tp.op(cn * d, 4, (kc_i, state), save=((state,) if kc_i.rg else ()) + ((kc_i,) if state.rg else ()))
        v_new = tp.op(cn * d, 4, (v_i, vpr))
        iv = tp.op(cn * d, 4, (intra, v_new), save=(intra, v_new) if (intra.rg or v_new.rg) else ())
        # core_attn_out[:, :, i] = attn_inter + attn_intra @ v_new: the sum is a one-chunk temporary copied into
        # core's storage, recorded as that storage's slice (no bytes of its own)
        tot = bld.add(inter, iv)
        tot.nbytes = 0
        written.append(tot)
        gl = bld.ew(tp.view(cum, b * nh * d), save_out=True)  # g_i[:, :, -1].exp()
        sd = bld.mul(state, gl)
        gd = tp.op(cn * d, 4, (g_i,))  # g_i[:, :, -1:] - g_i
        gde = bld.ew(gd, save_out=True)
        kg = bld.mul(k_i, gde)
        kv = tp.op(b * nh * d * d, 4, (kg, v_new), save=(kg, v_new) if (kg.rg or v_new.rg) else ())
        state = bld.add(sd, kv)
    # core_attn_out.reshape(...)[:, :, :seq].transpose(1, 2).contiguous().to(dtype)
    flat = tp.op(tn * d, 4, (core, *written), grad_to=tuple(written))
    out = bld.cast(flat, e)
    if not num.training:  # cache.update_recurrent_state(last_state.to(fp32)): zeros_like + copy_
        tp.keep(tp.op(b * nh * d * d, 4, (), rg=False, kind=KV))
    # the function's locals at its return (query, key, g, beta rebound to their padded / cumulated copies)
    _hold(bld, qs, kp, bp, v_beta, k_beta, cum, masks, decay, attn, value, k_cum, state, core)
    return out
