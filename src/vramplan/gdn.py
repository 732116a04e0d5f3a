"""Gated DeltaNet token mixers (mixer kind ``"gdn"``): Qwen3-Next, Qwen3.5, OLMo Hybrid, Lara-mini.

A gated DeltaNet layer (transformers 5.24 ``models/qwen3_next/modeling_qwen3_next.py`` ``Qwen3NextGatedDeltaNet``;
``Qwen3_5GatedDeltaNet``, ``OlmoHybridGatedDeltaNet`` and ``LaraMiniGatedDeltaNet`` differ only in how they project)
projects the normed hidden states to queries and keys (``num_k_heads x head_k_dim``), values and an output gate
(``num_v_heads x head_v_dim``) and one ``b`` (write strength, ``beta = sigmoid(b)``) and one ``a`` (decay, ``g =
-exp(A_log) * softplus(a + dt_bias)``) per value head; runs a depthwise causal ``conv1d`` (kernel
``linear_conv_kernel_dim``, no bias) + SiLU over q/k/v; the gated delta rule with L2-normed q and k; a gated
RMSNorm over each value head (norm first, then ``* silu(gate)``); and the output projection.

Its generation cache is two fixed-size tensors per layer (cache_utils.py ``LinearAttentionLayer``): the last
``conv_kernel`` inputs of the convolution, (batch, 2 key_dim + value_dim, kernel) in the activation dtype, and the
recurrent state (batch, num_v_heads, head_k_dim, head_v_dim), fp32 on both paths.

The sizes travel in :class:`vramplan.ssm.SSMSpec` with the Mamba-2 names mapped onto them (the conv width and the
state then come out the same): ``d_inner`` = value_dim, ``n_heads`` = num_v_heads, ``head_dim`` = head_v_dim,
``n_groups`` = num_k_heads, ``d_state`` = head_k_dim, ``d_conv`` = the conv kernel, ``chunk`` = 64; ``gdn_layout``
says how the projections are split ("qkvz": Qwen3-Next's fused ``in_proj_qkvz`` + ``in_proj_ba``; "split": Qwen3.5's
``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``; "olmo": ``q_proj`` ... ``g_proj`` and ``o_proj``).

Two implementations, chosen with the workload's ``ssm_kernel``:

* ``fused`` (a GPU install with ``flash-linear-attention`` and ``causal-conv1d``: transformers' hub_kernels.py
  ``use_kernel_func_from_hub_with_fallback`` picks ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` and
  ``causal_conv1d.causal_conv1d_fn``): fla's ``ChunkGatedDeltaRuleFunction`` (fla/ops/gated_delta_rule/chunk.py) is
  one autograd node that saves the L2-normed q and k with their fp32 rstd, v, the chunk-local cumsum of g (fp32),
  beta and the solved (chunk x chunk) WY matrix ``A`` in the input dtype, and recomputes ``w``, ``u``, the chunk
  states ``h`` and ``v_new`` in backward.
* ``torch``: transformers' ``torch_chunk_gated_delta_rule``, which copies q/k/v/beta to fp32 (repeating q and k to
  every value head), pads to a multiple of 64, builds the (chunk x chunk) decay, the UT system and the intra-chunk
  scores in fp32, solves two triangular systems and runs a Python loop over the chunks whose per-chunk values and
  states autograd keeps. This is what ``vramplan trace`` runs on a machine without those packages, so estimate
  and trace are compared on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .ssm import SSMSpec

__all__ = ["GDN_CHUNK", "gdn_extra_params", "gdn_linears", "gdn_mixer", "gdn_state_bytes"]

GDN_CHUNK = 64  # torch_chunk_gated_delta_rule's chunk_size default; fla's chunk_local_cumsum(chunk_size=64)
KV = MemoryKind.KV_CACHE


def _dims(ss: SSMSpec) -> tuple[int, int, int, int, int, int]:
    """(num_k_heads, num_v_heads, head_k_dim, head_v_dim, key_dim, value_dim)."""
    nk, nv, hk, hv = ss.n_groups, ss.n_heads, ss.d_state, ss.head_dim
    return nk, nv, hk, hv, nk * hk, nv * hv


def gdn_linears(ss: SSMSpec, hidden: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of a gated DeltaNet's ``nn.Linear`` modules, in its layout's names."""
    if ss.gdn_layout.startswith("kda"):
        from .kda import kda_linears

        return kda_linears(ss, hidden)
    _, nv, _, _, kd, vd = _dims(ss)
    if ss.gdn_layout == "qkvz":  # Qwen3NextGatedDeltaNet
        return [("in_proj_qkvz", hidden, 2 * kd + 2 * vd, 1), ("in_proj_ba", hidden, 2 * nv, 1),
                ("out_proj", vd, hidden, 1)]
    if ss.gdn_layout == "olmo":  # OlmoHybridGatedDeltaNet
        return [("q_proj", hidden, kd, 1), ("k_proj", hidden, kd, 1), ("v_proj", hidden, vd, 1),
                ("a_proj", hidden, nv, 1), ("b_proj", hidden, nv, 1), ("g_proj", hidden, vd, 1),
                ("o_proj", vd, hidden, 1)]
    # Qwen3_5GatedDeltaNet / LaraMiniGatedDeltaNet
    return [("in_proj_qkv", hidden, 2 * kd + vd, 1), ("in_proj_z", hidden, vd, 1), ("in_proj_b", hidden, nv, 1),
            ("in_proj_a", hidden, nv, 1), ("out_proj", vd, hidden, 1)]


def gdn_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements of the linears, other parameters): none of the linears has a bias; the depthwise conv1d
    (conv_dim x 1 x kernel, no bias), ``dt_bias`` and ``A_log`` (one per value head) and the gated norm's weight
    (head_v_dim)."""
    if ss.gdn_layout.startswith("kda"):
        from .kda import kda_extra_params

        return kda_extra_params(ss, hidden)
    return 0, ss.conv_dim * ss.d_conv + 2 * ss.n_heads + ss.head_dim


def gdn_state_bytes(ss: SSMSpec, batch: int, act: int) -> int:
    """One layer's generation cache: the conv state (batch, conv_dim, kernel) in the activation dtype and the
    recurrent state (batch, num_v_heads, head_k_dim, head_v_dim) in fp32 (``torch_chunk_gated_delta_rule``'s fp32
    state; fla returns its final state in fp32)."""
    return batch * ss.conv_dim * ss.d_conv * act + batch * ss.n_heads * ss.d_state * ss.head_dim * 4


def _hold(bld: _B, *tensors: Tensor) -> None:
    """A function's locals stay referenced until it returns."""
    bld.tp.hold(*tensors)


def gdn_mixer(bld: _B, n: Tensor) -> Tensor:
    """The gated DeltaNet's ``forward`` on the normed hidden states ``n`` (no padding mask: an unpadded batch)."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None and spec.ssm is not None
    if spec.ssm.gdn_layout.startswith("kda"):  # Kimi Delta Attention (vramplan.kda)
        from .kda import kda_mixer

        return kda_mixer(bld, n)
    ss = spec.ssm
    h, b, s, t = spec.hidden_size, bld.b, bld.s, bld.t
    nk, nv, _, _, kd, vd = _dims(ss)
    cd = ss.conv_dim
    tr = plan.trainable
    fused = plan.ssm_kernel == "fused"

    lin = bld.proj

    def pg(name: str, numel: int) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, bld.num.param) if tr else ()

    locals_: list[Tensor] = []
    gate: Tensor | None = None
    if ss.gdn_layout == "qkvz":
        # in_proj_qkvz / in_proj_ba, viewed per key head; fix_query_key_value_ordering's reshapes merge a key-head dim
        # with a stride that is not the next one's extent, so value, z, b, a (and then q, k for the flat reshape)
        # are copies whenever there is more than one key head; torch.cat makes mixed_qkv
        pqkvz = lin(n, h, 2 * kd + 2 * vd, "in_proj_qkvz")
        pba = lin(n, h, 2 * nv, "in_proj_ba")
        e = pqkvz.elem
        locals_ += [pqkvz, pba]
        if nk > 1:
            vc = tp.op(t * vd, e, (pqkvz,), passthrough=True)
            gate = tp.op(t * vd, e, (pqkvz,), passthrough=True)
            bb = tp.op(t * nv, e, (pba,), passthrough=True)
            aa = tp.op(t * nv, e, (pba,), passthrough=True)
            qc = tp.op(t * kd, e, (pqkvz,), passthrough=True)
            kc = tp.op(t * kd, e, (pqkvz,), passthrough=True)
            parts: tuple[Tensor, ...] = (qc, kc, vc)
        else:
            gate, bb, aa = tp.view(pqkvz, t * vd), tp.view(pba, t * nv), tp.view(pba, t * nv)
            parts = (tp.view(pqkvz, t * kd), tp.view(pqkvz, t * kd), tp.view(pqkvz, t * vd))
        mixed = tp.op(t * cd, e, parts, passthrough=True)  # torch.cat
        held = list(parts)  # query / key / value stay bound until the split after the convolution
    elif ss.gdn_layout == "olmo":
        q = lin(n, h, kd, "q_proj")
        k = lin(n, h, kd, "k_proj")
        v = lin(n, h, vd, "v_proj")
        mixed = tp.op(t * cd, q.elem, (q, k, v), passthrough=True)  # torch.cat([...]) (the projections are freed)
        e = mixed.elem
        held = []
        bb = aa = mixed  # set below, after the convolution (b_proj / a_proj are called there)
    else:  # in_proj_qkv is mixed_qkv itself; z, b, a are their own projections
        mixed = lin(n, h, cd, "in_proj_qkv")
        e = mixed.elem
        gate = lin(n, h, vd, "in_proj_z")
        bb = lin(n, h, nv, "in_proj_b")
        aa = lin(n, h, nv, "in_proj_a")
        locals_ += [gate, bb, aa]  # mixed_qkv is rebound to the conv output: the projection goes with the call
        held = []

    # the depthwise causal conv + SiLU over q/k/v (mixed_qkv.transpose(1, 2): a view)
    if not num.training:
        # cache.update_conv_state: lazily zeros (batch, conv_dim, kernel), then copy_ of the last inputs
        conv_state = tp.op(b * cd * ss.d_conv, e, (), rg=False, kind=KV)
        tp.keep(conv_state)
    if fused:
        # causal_conv1d's CausalConv1dFn: the unpadded output with SiLU fused in; saves its input
        act = tp.op(t * cd, e, (mixed,), save=(mixed,), params=pg("conv1d", cd * ss.d_conv))
    else:
        # F.conv1d(padding=kernel - 1) saves its input; [..., :seq_len]; silu saves its input (the padded output)
        conv = tp.op(b * cd * (s + ss.d_conv - 1), e, (mixed,), save=(mixed,), params=pg("conv1d", cd * ss.d_conv))
        act = tp.op(t * cd, e, (conv,), save=(conv,) if conv.rg else ())
    _hold(bld, mixed, *held)
    if ss.gdn_layout == "olmo":
        bb = lin(n, h, nv, "b_proj")
    # beta = b.sigmoid() (saves its result); OLMo Hybrid's allow_neg_eigval: beta * 2.0
    beta = bld.ew(bb, save_out=True)
    if ss.neg_eigval:
        beta = tp.op(t * nv, beta.elem, (beta,))
    if ss.gdn_layout == "olmo":
        aa = lin(n, h, nv, "a_proj")
    # g = -A_log.float().exp() * softplus(a.float() + dt_bias): fp32 (batch, seq, v heads)
    a_log = tp.op(nv, 4, (), rg=tr, params=pg("A_log", nv))
    a_exp = bld.ew(a_log, save_out=True)
    a_neg = tp.op(nv, 4, (a_exp,))
    a32 = bld.cast(aa, 4)
    adt = tp.op(t * nv, 4, (a32,), params=pg("dt_bias", nv), rg=a32.rg or tr)
    spl = tp.op(t * nv, 4, (adt,), save=(adt,) if adt.rg else ())
    g = bld.mul(a_neg, spl)
    q = tp.view(act, t * kd)
    k = tp.view(act, t * kd)
    v = tp.view(act, t * vd)
    if fused:
        core = _chunk_fla(bld, q, k, v, g, beta)
    else:
        core = _chunk_torch(bld, q, k, v, g, beta)
    if ss.gdn_layout == "olmo":
        gate = lin(n, h, vd, "g_proj")
    assert gate is not None
    if ss.gdn_layout == "qkvz" and nk == 1:
        gate = tp.op(t * vd, e, (gate,), passthrough=True)  # z.reshape(-1, head_v_dim) of the strided split
    y = _norm_gated(bld, core, gate)
    _hold(bld, *locals_, act, beta, g, core, gate)
    return lin(y, vd, h, "o_proj" if ss.gdn_layout == "olmo" else "out_proj")


def _norm_gated(bld: _B, x: Tensor, gate: Tensor) -> Tensor:
    """``Qwen3NextRMSNormGated(x, gate)`` over each value head: x.to(fp32); pow(2).mean; x * rsqrt(var + eps);
    ``weight * h.to(input dtype)`` (Lara-mini: ``weight.to(fp32) * h``); ``* silu(gate.to(fp32))``;
    ``.to(input dtype)``."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    tr = plan.trainable
    x32 = bld.cast(x, 4)
    sq = tp.op(x.numel, 4, (x32,), save=(x32,) if x32.rg else (), bwd_scratch=2 * x.numel * 4)
    var = tp.op(x.numel // ss.head_dim, 4, (sq,))
    rs = bld.ew(var, save_out=True)
    n32 = bld.mul(x32, rs)
    pg = bld.param_grad(f"gdn_norm{len(tp.ops)}", ss.head_dim, bld.num.norm_param) if tr else ()
    if ss.gated_norm_fp32:  # LaraMiniRMSNormGated: self.weight.to(float32) * hidden_states, in fp32
        wn = tp.op(x.numel, 4, (n32,), save=(n32,) if tr else (), params=pg, rg=n32.rg or tr)
    else:
        nc = bld.cast(n32, x.elem)
        wn = tp.op(x.numel, max(bld.num.norm_param, nc.elem), (nc,), save=(nc,) if tr else (), params=pg,
                   rg=nc.rg or tr)
    g32 = bld.cast(gate, 4)
    sg = tp.op(gate.numel, 4, (g32,), save=(g32,) if g32.rg else ())  # silu saves its input
    hm = bld.mul(wn, sg)
    return bld.cast(hm, x.elem)


def _chunk_torch(bld: _B, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
    """transformers' ``torch_chunk_gated_delta_rule`` (modeling_qwen3_next.py, transformers 5.24), op by op with
    what autograd saves; returns the (batch, seq, v heads, head_v_dim) output in the input dtype."""
    spec, tp, num = bld.spec, bld.tp, bld.num
    ss = spec.ssm
    assert ss is not None
    nk, nv, hk, hv, _, _ = _dims(ss)
    b, s = bld.b, bld.s
    c = GDN_CHUNK
    chunks = -(-s // c)
    sp = chunks * c
    e = q.elem
    tn = b * nv * s  # (batch, v heads, seq) rows
    pn = b * nv * sp  # padded rows
    if nk != nv:  # repeat_interleave to every value head (index_select: saves only the index)
        q = tp.op(tn * hk, e, (q,))
        k = tp.op(tn * hk, e, (k,))
    # .transpose(1, 2).to(float32, contiguous_format): copies of q, k, v and beta; g is fp32 already (aliases)
    q32, k32, v32, b32 = bld.cast(q, 4), bld.cast(k, 4), bld.cast(v, 4), bld.cast(beta, 4)

    def l2norm(x: Tensor) -> Tensor:  # x * rsqrt((x * x).sum(-1, keepdim=True) + eps)
        xx = tp.op(x.numel, 4, (x,), save=(x,) if x.rg else ())
        ssum = tp.op(tn, 4, (xx,))
        eps = tp.op(tn, 4, (ssum,))
        rs = bld.ew(eps, save_out=True)
        return bld.mul(x, rs)

    qn = l2norm(q32)
    kn = l2norm(k32)
    qs = tp.op(qn.numel, 4, (qn,))  # query * scaling (a Python float: nothing saved)
    # F.pad to a multiple of the chunk (constant_pad_nd allocates even for a zero pad)
    qp = tp.op(pn * hk, 4, (qs,))
    kp = tp.op(pn * hk, 4, (kn,))
    vp = tp.op(pn * hv, 4, (v32,))
    bp = tp.op(pn, 4, (b32,))
    dp = tp.op(pn, 4, (g,))
    v_beta = bld.mul(vp, bp)
    k_beta = bld.mul(kp, bp)
    mask = tp.op(2 * c * c, 1, (), rg=False)  # ones(...).triu(1)
    cum = tp.op(pn, 4, (dp,))  # cumsum
    pw = tp.op(pn * c, 4, (cum,))  # cum[..., :, None] - cum[..., None, :]
    pw = tp.op(pn * c, 4, (pw, mask), save=(mask,) if pw.rg else (), grad_to=(pw,))  # masked_fill(-inf)
    pw = bld.ew(pw, save_out=True)  # exp
    kk = tp.op(pn * c, 4, (k_beta, kp), save=(k_beta, kp))  # k_beta @ key^T
    ut = bld.mul(kk, pw)
    qk = tp.op(pn * c, 4, (qp, kp), save=(qp, kp))  # query @ key^T
    intra = bld.mul(qk, pw)
    ce = bld.ew(cum, save_out=True)  # cum_decay.exp()
    dkb = bld.mul(k_beta, ce)
    # solve_triangular(ut, rhs, unitriangular): linalg_solve_triangular saves the matrix and its result
    new_values = tp.op(pn * hv, 4, (ut, v_beta), save=(ut,) if (ut.rg or v_beta.rg) else ())
    tp.save_output(new_values)
    k_cum = tp.op(pn * hk, 4, (ut, dkb), save=(ut,) if (ut.rg or dkb.rg) else ())
    tp.save_output(k_cum)
    state = tp.op(b * nv * hk * hv, 4, (), rg=False)  # zeros
    core = tp.op(pn * hv, 4, (), rg=False)  # zeros_like(new_values): the loop writes into it in place
    ce2 = bld.ew(cum, save_out=True)
    q_dec = bld.mul(qp, ce2)  # query * cum_decay.exp()
    diff = tp.op(pn, 4, (cum,))  # cum_decay[..., -1:] - cum_decay
    ed = bld.ew(diff, save_out=True)
    k_dec = bld.mul(kp, ed)
    cdec = bld.ew(tp.view(cum, b * nv * chunks), save_out=True)  # cum_decay[..., -1].exp()
    cn = b * nv * c  # one chunk's rows
    written: list[Tensor] = []
    for _ in range(chunks):
        kc_i, nv_i, q_i, in_i, kd_i = (tp.view(k_cum, cn * hk), tp.view(new_values, cn * hv), tp.view(q_dec, cn * hk),
                                       tp.view(intra, cn * c), tp.view(k_dec, cn * hk))
        ks = tp.op(cn * hv, 4, (kc_i, state), save=(kc_i, state) if (kc_i.rg or state.rg) else ())
        v_new = tp.op(cn * hv, 4, (nv_i, ks))
        inter = tp.op(cn * hv, 4, (q_i, state), save=(q_i, state) if (q_i.rg or state.rg) else ())
        iv = tp.op(cn * hv, 4, (in_i, v_new), save=(in_i, v_new) if (in_i.rg or v_new.rg) else ())
        # core_attn_out[:, :, i] = inter + iv: the sum is a one-chunk temporary copied into core's storage; it is
        # recorded as that storage's slice (no bytes of its own), so its gradient is the slice of core's
        tot = bld.add(inter, iv)
        tot.nbytes = 0
        written.append(tot)
        sd = bld.mul(state, tp.view(cdec, b * nv))
        kv = tp.op(b * nv * hk * hv, 4, (kd_i, v_new), save=(kd_i, v_new) if (kd_i.rg or v_new.rg) else ())
        state = bld.add(sd, kv)
    # core_attn_out is zeros_like of solve_triangular's column-major result, so its reshape to (batch, heads, padded
    # seq, head_v_dim) copies; then [:, :, :seq].transpose(1, 2).to(dtype, contiguous_format)
    flat = tp.op(pn * hv, 4, (core, *written), grad_to=tuple(written))
    out = bld.cast(tp.view(flat, b * s * nv * hv), e)
    if not num.training:  # after the call, cache.update_recurrent_state: zeros_like(final state) + copy_
        tp.keep(tp.op(b * nv * hk * hv, 4, (), rg=False, kind=KV))
    _hold(bld, vp, bp, dp, v_beta, k_beta, mask, cum, pw, ut, intra, dkb, new_values, k_cum, q_dec, k_dec,
          cdec, state)
    return out


def _chunk_fla(bld: _B, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
    """fla's ``chunk_gated_delta_rule`` (fla/ops/gated_delta_rule/chunk.py): ``input_guard`` makes q, k and v
    contiguous (they are strided views of the transposed conv output: copies); ``ChunkGatedDeltaRuleFunction``
    L2-norms q and k (``l2norm_fwd``: the normed copy and its fp32 rstd), takes the chunk-local cumsum of g (fp32),
    builds ``A`` (fp32 (batch, seq, v heads, 64)), solves it into the input dtype, makes ``w``, ``u``, the chunk
    states ``h`` (batch, chunks, v heads, head_k_dim, head_v_dim) and ``v_new``, and the output ``o``; it saves q, k
    (normed), their rstd, v, g, beta and A. Backward recomputes w, u, h and v_new and makes ``dv``, ``dh``, ``dv2``,
    dq, dk, dw, fp32 dg and the WY gradients before the inputs' gradients."""
    spec, tp, num = bld.spec, bld.tp, bld.num
    ss = spec.ssm
    assert ss is not None
    nk, nv, hk, hv, kd, vd = _dims(ss)
    b, s, t = bld.b, bld.s, bld.t
    c = GDN_CHUNK
    chunks = -(-s // c)
    e = q.elem
    qc = tp.op(t * kd, e, (q,), passthrough=True)  # .contiguous()
    kc = tp.op(t * kd, e, (k,), passthrough=True)
    vc = tp.op(t * vd, e, (v,), passthrough=True)
    h_bytes = b * chunks * nv * hk * hv * e
    wu = t * nv * (hk + hv) * e  # w, u
    if not num.training or not (qc.rg or kc.rg or vc.rg or g.rg or beta.rg):
        if not num.training:
            state_cache = tp.op(b * nv * hk * hv, 4, (), rg=False, kind=KV)
            tp.keep(state_cache)
        scratch = 2 * t * kd * e + 2 * t * nk * 4 + t * nv * 4 + t * nv * c * (4 + e) + wu + h_bytes + t * vd * e
        return tp.op(t * vd, e, (qc, kc, vc, g, beta), fwd_scratch=scratch)
    qn = tp.op(t * kd, e, (qc,), rg=False)
    kn = tp.op(t * kd, e, (kc,), rg=False)
    rstd = tp.op(2 * t * nk, 4, (), rg=False)
    gc = tp.op(t * nv, 4, (g,), rg=False)  # chunk_local_cumsum
    a_mat = tp.op(t * nv * c, e, (), rg=False)  # solve_tril(output_dtype=k.dtype)
    saved = (qn, kn, rstd, vc, gc, beta, a_mat)
    fwd = t * nv * c * 4 + wu + h_bytes + t * vd * e  # A in fp32, w/u, h, v_new
    bwd = wu + h_bytes + t * vd * e + 2 * t * vd * e + h_bytes + t * nv * hk * e + t * nv * 4 * 2
    return tp.op(t * vd, e, (qc, kc, vc, g, beta, *saved), save=saved, grad_to=(qc, kc, vc, g, beta), rg=True,
                 fwd_scratch=fwd, bwd_scratch=bwd)
