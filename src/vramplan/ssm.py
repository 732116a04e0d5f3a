"""State-space (Mamba-2) mixers and the hybrid families built from them: sizes, parameters, memory programs
and the cache they keep for generation.

A Mamba-2 mixer (transformers 5.24 ``models/mamba2/modeling_mamba2.py`` ``Mamba2Mixer``; Bamba, Granite 4.0
(``granitemoehybrid``), Nemotron-H and Zamba2 copy it) projects the hidden states once (``in_proj``: gate z, the
convolved x/B/C and one dt per head), runs a depthwise causal ``conv1d`` over x/B/C, the selective scan
(structured state-space duality, chunked), a gated group RMSNorm and ``out_proj``. Its generation cache is two
fixed-size tensors per layer — the last ``conv_kernel`` inputs of the convolution and the SSM state
(heads x head_dim x state, fp32) — whatever the sequence length.

Two implementations are modelled, chosen with the workload's ``ssm_kernel``:

* ``fused`` (what a GPU install with ``mamba_ssm`` and ``causal_conv1d`` runs): training calls
  ``mamba_split_conv1d_scan_combined`` (mamba_ssm/ops/triton/ssd_combined.py, ``MambaSplitConv1dScanCombinedFn``),
  one autograd node that saves only the projection ``zxbcdt``, the scan output ``out_x`` and the norm's ``rstd``
  and recomputes the rest in backward; inference runs ``causal_conv1d_fn`` + ``mamba_chunk_scan_combined``, whose
  Triton kernels keep chunk states and the chunk's C·B products, never the (chunk x chunk) decay matrices.
* ``torch``: transformers' plain-PyTorch fallback (``mamba2_chunk_scan``, ``causal_conv1d_fn``), which
  materialises the (batch, heads, sequence, chunk) decay ``L``, the scores ``G`` and ``M = G * L`` in fp32 and
  keeps them for backward. This is what ``vramplan trace`` runs on a machine without those packages, so estimate
  and trace are compared on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._engine.numerics import Kernel
from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .spec import ModelSpec

__all__ = ["SSM_KERNELS", "SSMSpec", "conv_extra_params", "conv_linears", "layer_state_bytes", "mamba1_extra_params",
           "mamba1_linears", "mamba1_mixer", "mamba1_state_bytes", "mamba2_extra_params", "mamba2_linears",
           "mamba2_state_bytes", "short_conv_mixer", "ssm_state_bytes"]

SSM_KERNELS = ("fused", "torch")
KV = MemoryKind.KV_CACHE


@dataclass(frozen=True, slots=True)
class SSMSpec:
    """The sizes of one family's Mamba-2 mixer, as its configuration class names them. For a short-conv mixer
    (LFM2) only ``d_inner`` (the hidden size), ``d_conv`` and ``conv_bias`` are read."""

    d_inner: int  # intermediate_size = expand * hidden (Falcon-H1: mamba_d_ssm)
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    chunk: int
    conv_bias: bool = True
    proj_bias: bool = False
    gated_norm: bool = True  # MambaRMSNormGated before out_proj (Falcon-H1 can drop it: mamba_rms_norm)
    out_bias: bool | None = None  # out_proj's bias when it differs from in_proj's (Falcon-H1: projectors_bias)
    mup: bool = False  # Falcon-H1: input * ssm_in_multiplier and projection * mup_vector (a copy each)
    dt_rank: int = 0  # Mamba-1 (mixer "mamba"): time_step_rank, the width of x_proj's dt part and dt_proj's input
    # RMSNorms on dt, B and C before the scan: "" none (Mamba), "weightless" (Falcon-Mamba), "rms" (Jamba: weighted)
    bcdt_norm: str = ""
    inner_fn: bool = True  # Mamba-1 training calls mamba_inner_fn (Mamba, Falcon-Mamba); Jamba never does
    # gated DeltaNet (mixer "gdn", vramplan.gdn): how the projections are split ("qkvz", "split", "olmo"), and
    # OLMo Hybrid's allow_neg_eigval (beta * 2)
    gdn_layout: str = ""
    neg_eigval: bool = False
    gated_norm_fp32: bool = False  # Lara-mini's RMSNormGated: weight.to(fp32) * the fp32 normed values (no cast back)

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj(self) -> int:
        """Width of ``in_proj``: gate (d_inner), x/B/C (conv_dim) and one dt per head."""
        return self.d_inner + self.conv_dim + self.n_heads


def mamba2_linears(ss: SSMSpec, hidden: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of a Mamba-2 mixer's ``nn.Linear`` modules."""
    return [("in_proj", hidden, ss.in_proj, 1), ("out_proj", ss.d_inner, hidden, 1)]


def mamba2_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements of the linears, other parameters): conv1d weight (+ bias), dt_bias, A_log, D and the gated
    norm's weight (``Mamba2Mixer.__init__``)."""
    out_bias = ss.proj_bias if ss.out_bias is None else ss.out_bias
    bias = (ss.in_proj if ss.proj_bias else 0) + (hidden if out_bias else 0)
    other = ss.conv_dim * ss.d_conv + (ss.conv_dim if ss.conv_bias else 0) + 3 * ss.n_heads
    if ss.gated_norm:
        other += ss.d_inner
    return bias, other


def mamba2_state_bytes(ss: SSMSpec, batch: int, act: int) -> int:
    """One layer's generation cache (transformers cache_utils.py ``LinearAttentionLayer``): the conv state
    (batch, conv_dim, conv_kernel) in the activations' dtype and the SSM state (batch, heads, head_dim, state),
    which ``zeros_like`` makes in the fp32 of the chunked scan's final state."""
    return batch * ss.conv_dim * ss.d_conv * act + batch * ss.n_heads * ss.head_dim * ss.d_state * 4


# ---- memory programs --------------------------------------------------------------------------------------------

def _live_until_end(bld: _B, *tensors: Tensor) -> None:
    """A function's locals stay referenced until it returns."""
    end = len(bld.tp.ops) - 1
    for t in tensors:
        root = t.base if t.base is not None else t
        root.last_use = max(root.last_use, end)


def mamba2_mixer(bld: _B, n: Tensor) -> Tensor:
    """``Mamba2Mixer.forward`` (modeling_mamba2.py, transformers 5.24) on the normed hidden states ``n``."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    h = spec.hidden_size
    tr = plan.trainable
    if ss.mup:  # FalconH1Mixer: hidden_states * ssm_in_multiplier
        n = bld.tp.op(n.numel, n.elem, (n,))
    pj = bld.linear(n, h, ss.in_proj, "in_proj", bias=ss.proj_bias, trainable=tr, quant=plan.quant,
                    lora_rank=plan.lora_rank if "in_proj" in plan.lora_targets else 0)
    if ss.mup:  # projected_states * mup_vector (a buffer in the model dtype)
        pj = bld.tp.op(pj.numel, pj.elem, (pj,))
    if plan.ssm_kernel == "fused":
        out = _mamba2_fused(bld, pj)
    else:
        out = _mamba2_torch(bld, pj)
    out = bld.cast(out, n.elem)  # self.out_proj(scan_output.to(dtype)): the mixer input's dtype
    o = bld.linear(out, ss.d_inner, h, "out_proj", bias=ss.proj_bias if ss.out_bias is None else ss.out_bias,
                   trainable=tr, quant=plan.quant,
                   lora_rank=plan.lora_rank if "out_proj" in plan.lora_targets else 0)
    _live_until_end(bld, pj, out)  # projected_states and scan_output are locals of forward
    return o


def _mamba2_fused(bld: _B, pj: Tensor) -> Tensor:
    """The fused path. Training: ``MambaSplitConv1dScanCombinedFn`` (mamba_ssm ssd_combined.py) saves ``zxbcdt``
    (the in_proj output), ``out_x`` (the scan output before the norm, activation dtype) and the norm's fp32
    ``rstd``; its forward allocates the convolved x/B/C, the chunked scan's fp32 dt/dA cumsum (batch, heads,
    chunks, chunk), chunk states (batch, chunks, heads, head_dim, state) and C·B (batch, chunks, groups, chunk,
    chunk), and the normed output; backward recomputes them and allocates the gradient of ``zxbcdt`` (the
    replay's input gradient) besides the gradient of x/B/C. The out_proj is transformers' (the mixer passes
    its weight, the kernel applies it; same memory as the ``nn.Linear``). Inference: ``causal_conv1d_fn`` and
    ``mamba_chunk_scan_combined`` allocate the same scan buffers, transiently."""
    spec, tp, num = bld.spec, bld.tp, bld.num
    ss = spec.ssm
    assert ss is not None
    b, s = bld.b, bld.s
    t = b * s
    e = pj.elem
    chunks = -(-s // ss.chunk)
    scan_tmp = (2 * b * ss.n_heads * chunks * ss.chunk * 4 + b * chunks * ss.n_heads * ss.head_dim * ss.d_state * 4
                + b * chunks * ss.n_groups * ss.chunk * ss.chunk * 4)
    xbc = t * ss.conv_dim * e
    if not num.training or not pj.rg:
        if not num.training:
            _cache_states(bld, pj)
        # conv output and the scan output live until the norm; the scan's buffers inside the kernels
        conv = tp.op(t * ss.conv_dim, e, (pj,))
        y = tp.op(t * ss.d_inner, e, (conv, pj), fwd_scratch=scan_tmp)
        return _gated_norm(bld, y, pj) if ss.gated_norm else y
    rstd = tp.op(t * ss.n_groups, 4, (), rg=False)
    out_x = tp.op(t * ss.d_inner, e, (pj,), rg=False)
    normed = tp.op(t * ss.d_inner, e, (pj, out_x, rstd), save=(pj, out_x, rstd), grad_to=(pj,),
                   fwd_scratch=xbc + scan_tmp,
                   bwd_scratch=2 * xbc + scan_tmp + 2 * t * ss.d_inner * e)
    return normed


def _cache_states(bld: _B, pj: Tensor) -> None:
    """Prefill writes the layer's conv state and the scan's final state into the cache (kept)."""
    ss = bld.spec.ssm
    assert ss is not None
    conv_state = bld.tp.op(bld.b * ss.conv_dim * ss.d_conv, pj.elem, (), rg=False, kind=KV)
    ssm_state = bld.tp.op(bld.b * ss.n_heads * ss.head_dim * ss.d_state, 4, (), rg=False, kind=KV)
    bld.tp.keep(conv_state, ssm_state)


def _gated_norm(bld: _B, y: Tensor, pj: Tensor) -> Tensor:
    """``MambaRMSNormGated(y, gate)``: y.to(fp32) * silu(gate.to(fp32)), a group RMSNorm, ``weight *
    h.to(input dtype)`` (the input dtype is fp32 in the torch fallback: the scan returns fp32)."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    t = bld.t
    tr = plan.trainable
    gate = tp.view(pj, t * ss.d_inner)
    y32 = bld.cast(y, 4)
    g32 = bld.cast(gate, 4)
    sg = tp.op(t * ss.d_inner, 4, (g32,), save=(g32,) if g32.rg else ())  # silu saves its input
    hm = bld.mul(y32, sg)
    # pow(2): its backward (FunctionsManual.cpp pow_backward: grad * (2 * x.pow(1))) makes x.pow(1) and 2 * that
    sq = tp.op(hm.numel, 4, (hm,), save=(hm,) if hm.rg else (), bwd_scratch=2 * hm.numel * 4)
    var = tp.op(t * ss.n_groups, 4, (sq,))
    rs = bld.ew(var, save_out=True)
    hn = bld.mul(hm, rs)
    hc = bld.cast(hn, y.elem)
    pg = bld.param_grad(f"gnorm{len(tp.ops)}", ss.d_inner, bld.num.norm_param) if tr else ()
    return tp.op(t * ss.d_inner, max(bld.num.norm_param, hc.elem), (hc,), save=(hc,) if tr else (), params=pg,
                 rg=hc.rg or tr)


def _mamba2_torch(bld: _B, pj: Tensor) -> Tensor:
    """transformers' fallback: ``causal_conv1d_fn`` (F.conv1d with padding conv_kernel - 1, sliced, silu) and
    ``mamba2_chunk_scan`` (modeling_mamba2.py), op by op with what autograd saves."""
    spec, tp, num, plan = bld.spec, bld.tp, bld.num, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    b, s = bld.b, bld.s
    t = b * s
    tr = plan.trainable
    e = pj.elem
    nh, hp, g, n, q, k = ss.n_heads, ss.head_dim, ss.n_groups, ss.d_state, ss.chunk, ss.d_conv
    di = ss.d_inner
    chunks = -(-s // q)
    sp = chunks * q  # padded length
    x_heads = b * sp * nh  # (batch, padded tokens, heads)

    def pg(name: str, numel: int) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, bld.num.param) if tr else ()

    if not num.training:
        _cache_states(bld, pj)
    # 2. depthwise causal conv over x/B/C (conv saves its input: the projection stays alive) and silu
    xbc = tp.view(pj, t * ss.conv_dim)
    conv = tp.op(b * ss.conv_dim * (s + k - 1), e, (xbc,), save=(xbc,), params=pg("conv1d", ss.conv_dim * k))
    act = tp.op(t * ss.conv_dim, e, (conv,), save=(conv,) if conv.rg else ())
    # dt: + dt_bias, softplus (saves its input), clamp to time_step_limit (saves its input)
    dtv = tp.view(pj, t * nh)
    dtb = tp.op(t * nh, e, (dtv,), params=pg("dt_bias", nh))
    spl = tp.op(t * nh, e, (dtb,), save=(dtb,) if dtb.rg else ())
    dt = tp.op(t * nh, e, (spl,), save=(spl,) if spl.rg else ())
    # 3. the chunked scan (mamba2_chunk_scan)
    x32 = bld.cast(tp.view(act, t * di), 4)  # hidden_states.float()
    bg = bld.cast(tp.view(act, t * g * n), 4)
    cg = bld.cast(tp.view(act, t * g * n), 4)
    if nh != g:  # repeat_interleave to every head: expand + reshape copies
        bg = tp.op(t * nh * n, 4, (bg,))
        cg = tp.op(t * nh * n, 4, (cg,))
    xpad = tp.op(b * sp * di, 4, (x32,))  # pad_tensor_by_size (constant_pad_nd allocates even for 0)
    d_res = tp.op(b * sp * di, 4, (xpad,), save=(xpad,) if tr else (), params=pg("D", nh))  # D * x
    dt_a = bld.cast(dt, 4)  # dt[..., None].float()
    xdt = bld.mul(x32, dt_a)
    dt_b = bld.cast(dt, 4)  # dt.float()
    a_dt = tp.op(t * nh, 4, (dt_b,), save=(dt_b,) if tr else (), params=pg("A_log", nh))  # A * dt
    # reshape_into_chunks: a padded copy of each
    xc = tp.op(b * sp * di, 4, (xdt,))
    ac = tp.op(x_heads, 4, (a_dt,))
    bc = tp.op(x_heads * n, 4, (bg,))
    cc = tp.op(x_heads * n, 4, (cg,))
    a_cum = tp.op(x_heads, 4, (ac,))  # cumsum
    # segment_sum(A): expand to (.., chunk, chunk), masked_fill, cumsum, masked_fill(-inf); L = exp(...)
    mask = tp.op(2 * q * q, 1, (), rg=False)  # tril(ones) and its negation
    m1 = tp.op(x_heads * q, 4, (ac, mask), save=(mask,) if ac.rg else (), grad_to=(ac,))
    m2 = tp.op(x_heads * q, 4, (m1,))
    m3 = tp.op(x_heads * q, 4, (m2, mask), save=(mask,) if m2.rg else (), grad_to=(m2,))
    big_l = bld.ew(m3, save_out=True)
    # G = einsum(C, B): bmm over (batch, chunk, head) of copies laid out for it
    c_g = tp.op(x_heads * n, 4, (cc,))
    b_g = tp.op(x_heads * n, 4, (bc,))
    gm = tp.op(x_heads * q, 4, (c_g, b_g), save=(c_g, b_g) if (c_g.rg or b_g.rg) else (), grad_to=(c_g, b_g))
    mm = bld.mul(gm, big_l)
    x_d = tp.op(b * sp * di, 4, (xc,))  # hidden states laid out for the Y_diag bmm
    y_diag = tp.op(b * sp * di, 4, (mm, x_d), save=(mm, x_d) if (mm.rg or x_d.rg) else (), grad_to=(mm, x_d))
    # B_decay and the chunk states
    dsub = tp.op(x_heads, 4, (a_cum,))
    decay = bld.ew(dsub, save_out=True)
    b_dec = bld.mul(bc, decay)
    b_s = tp.op(x_heads * n, 4, (b_dec,))
    x_s = tp.op(b * sp * di, 4, (xc,))
    state_numel = b * chunks * nh * hp * n
    states = tp.op(state_numel, 4, (b_s, x_s), save=(b_s, x_s) if (b_s.rg or x_s.rg) else (), grad_to=(b_s, x_s))
    zeros = tp.op(b * nh * hp * n, 4, (), rg=False)
    cat = tp.op(state_numel + b * nh * hp * n, 4, (zeros, states), grad_to=(states,))
    # decay_chunk = exp(segment_sum(pad(A_cumsum[..., -1]))): (batch, heads, chunks + 1, chunks + 1)
    dc_n = b * nh * (chunks + 1) ** 2
    dpad = tp.op(b * nh * (chunks + 1), 4, (a_cum,))
    d1 = tp.op(dc_n, 4, (dpad,))
    d2 = tp.op(dc_n, 4, (d1,))
    d3 = tp.op(dc_n, 4, (d2,))
    dchunk = bld.ew(d3, save_out=True)
    new_states = tp.op(cat.numel, 4, (dchunk, cat), save=(dchunk, cat), grad_to=(dchunk, cat))
    sdo = bld.ew(a_cum, save_out=True)  # state_decay_out = exp(A_cumsum)
    c_s = tp.op(x_heads * n, 4, (cc,))
    st_s = tp.op(state_numel, 4, (new_states,))  # states[:, :-1] laid out for the bmm
    cts = tp.op(b * sp * di, 4, (c_s, st_s), save=(c_s, st_s) if (c_s.rg or st_s.rg) else (), grad_to=(c_s, st_s))
    y_off = bld.mul(cts, sdo)
    y = bld.add(y_diag, y_off)
    y = tp.op(y.numel, 4, (y,))  # .contiguous(): the sum keeps the einsums' permuted layout, so it copies
    y = bld.add(y, d_res)
    # (inference: the final state, a view of new_states, is copied into the cache's state made by _cache_states)
    _live_until_end(bld, xc, ac, bc, cc, a_cum, big_l, gm, mm, y_diag, decay, b_dec, zeros, dchunk, new_states, sdo,
                    cts, y_off, d_res)
    _live_until_end(bld, act)  # torch_forward's hidden_states_B_C: split into x, B, C views, bound to its end
    if sp != s:
        y = tp.view(y, t * di)
    if not ss.gated_norm:  # Falcon-H1 without mamba_rms_norm: scan_output * silu(gate)
        gate = tp.view(pj, t * di)
        sg = tp.op(t * di, e, (gate,), save=(gate,) if gate.rg else ())
        return bld.mul(y, sg, elem=4)
    return _gated_norm(bld, y, pj)


@dataclass(frozen=True, slots=True)
class SharedBlock:
    """Zamba2's shared transformer block (modeling_zamba2.py ``Zamba2AttentionDecoderLayer``): ``num_mem_blocks``
    sets of attention + MLP weights reused in turn by the hybrid layers, each hybrid layer with its own low-rank
    adapters (``adapter_rank``) on the MLP's gate_up_proj and, with ``use_shared_attention_adapter``, on q/k/v.
    Zamba's (modeling_zamba.py ``ZambaAttentionDecoderLayer``) is one block tied across the hybrid layers, without
    adapters, with a gate/up/down MLP."""

    num_mem_blocks: int
    adapter_rank: int
    attention_adapters: bool
    intermediate: int
    # len(hybrid_layer_ids): each block holds adapters for the hybrid indices i < this with i % num_mem_blocks
    # equal to its own index (Zamba2MLP / Zamba2Attention ``num_fwd_mem_blocks``)
    adapter_slots: int
    # Zamba2MLP's one gate_up_proj; Zamba's ZambaMLP has gate_proj and up_proj (and no adapters: adapter_rank 0)
    fused_gate_up: bool = True

    def adapters_of_block(self, block: int) -> int:
        """How many adapter sets block ``block`` holds."""
        return len(range(block, self.adapter_slots, self.num_mem_blocks))


def zamba2_hybrid_layer(bld: _B, x: Tensor) -> Tensor:
    """``Zamba2HybridLayer.forward`` (modeling_zamba2.py, transformers 5.24): the shared transformer on
    ``cat([x, original embeddings])`` (RMSNorm over 2 x hidden; q/k/v from 2 x hidden with heads of 2 x hidden /
    heads, + adapters; o_proj to hidden; pre_ff RMSNorm; gate_up_proj + its adapter, act(gate) * up, down_proj),
    then ``linear``; then the Mamba-2 decoder layer on ``x + that`` (input_layernorm, mixer, ``+ x``). The
    original embeddings are an input held by the model (``torch.clone(inputs_embeds)``, counted with the
    embeddings); their gradient is not modelled."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None and spec.shared_block is not None
    sb = spec.shared_block
    h, b, s = spec.hidden_size, bld.b, bld.s
    t, h2 = b * s, 2 * h
    tr = plan.trainable
    qd, kvd, r = spec.q_dim, spec.kv_dim, sb.adapter_rank

    lin = bld.proj

    def adapted(v: Tensor, base: Tensor, fout: int, name: str) -> Tensor:  # base + Linear(r, out)(Linear(in, r)(v))
        a = bld.linear(v, v.numel // t, r, name + "_adapter.0", bias=False, trainable=tr)
        return bld.add(base, bld.linear(a, r, fout, name + "_adapter.1", bias=False, trainable=tr))

    orig = tp.input(t * h, x.elem, False)
    cat = tp.op(t * h2, x.elem, (x, orig), grad_to=(x,), passthrough=True)
    n1 = bld.norm(cat, h2, tr)

    def attention(n: Tensor) -> Tensor:
        q, k, v = lin(n, h2, qd, "q_proj"), lin(n, h2, kvd, "k_proj"), lin(n, h2, kvd, "v_proj")
        if sb.attention_adapters:
            q, k, v = adapted(n, q, qd, "linear_q"), adapted(n, k, kvd, "linear_k"), adapted(n, v, kvd, "linear_v")
        q, k = bld.call(bld.rope, q), bld.call(bld.rope, k)
        if not num.training:  # DynamicCache.update: the cache holds copies of keys and values
            k = tp.op(b * bld.kv_len * kvd, k.elem, (k,), kind=KV)
            v = tp.op(b * bld.kv_len * kvd, k.elem, (v,), kind=KV)
            tp.keep(k, v)
        kernel = bld.kernel_for(False)
        if num.amp and kernel is not Kernel.EAGER:
            q, k, v = bld.cast(q, 2), bld.cast(k, 2), bld.cast(v, 2)
        out = bld.attention_core(q, k, v, kernel, spec.num_kv_heads)
        if kernel in (Kernel.EAGER, Kernel.MATH):
            out = tp.op(out.numel, out.elem, (out,))  # transpose(1, 2).contiguous() copies
        return lin(out, qd, h, "o_proj")

    a = bld.call(attention, n1)
    n2 = bld.norm(a, h, tr)

    def mlp(n: Tensor) -> Tensor:
        if not sb.fused_gate_up:  # ZambaMLP: down_proj(act(gate_proj(x)) * up_proj(x))
            g = lin(n, h, sb.intermediate, "gate_proj")
            return lin(bld.mul(bld.activation(g), lin(n, h, sb.intermediate, "up_proj")), sb.intermediate, h,
                       "down_proj")
        gu = adapted(n, lin(n, h, 2 * sb.intermediate, "gate_up_proj"), 2 * sb.intermediate, "gate_up_proj")
        g, u = tp.view(gu, gu.numel // 2), tp.view(gu, gu.numel // 2)
        return lin(bld.mul(bld.activation(g), u), sb.intermediate, h, "down_proj")

    m = bld.call(mlp, n2)
    th = lin(m, h, h, "linear")
    # Zamba(2)MambaDecoderLayer: residual = x; norm(x + transformer_hidden_states); mixer; residual + mixer
    xin = bld.add(x, th)
    nrm = bld.norm(xin, h, tr)
    mixer = mamba1_mixer if spec.ssm is not None and spec.ssm.dt_rank else mamba2_mixer
    mix = bld.call(lambda v: mixer(bld, v), nrm)
    y = bld.add(x, mix)
    _live_until_end(bld, x, th)  # the hybrid layer's locals: its input and transformer_hidden_states
    tp.keep(y)
    return y


def mamba_block(bld: _B, x: Tensor) -> Tensor:
    """``Mamba2Block.forward`` (and ``NemotronHBlock.forward``, whose block holds a Mamba-2 mixer, attention or an
    MLP): ``residual = x``; ``norm(x.to(norm dtype))``; the residual upcast to fp32 when ``residual_in_fp32``;
    ``residual + mixer(...)``."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None
    xin = bld.cast(x, bld.num.norm_param)
    nrm = bld.norm(xin, spec.hidden_size, plan.trainable)
    res = bld.cast(x, 4) if spec.residual_fp32 else x
    if plan.mixer in ("zamba_hybrid", "zamba_tied"):  # Zamba2: the shared transformer, then a Mamba-2 layer
        return zamba2_hybrid_layer(bld, x)
    if plan.mixer == "none":  # an MLP-only block (Nemotron-H "-")
        m = bld.call(bld.mlp, nrm)
    elif plan.mixer == "attention":  # an attention-only block (Nemotron-H "*")
        m = bld.call(bld.self_attention, nrm)
    elif plan.mixer == "mamba":
        m = bld.call(lambda v: mamba1_mixer(bld, v), nrm)
    else:
        m = bld.call(lambda v: mamba2_mixer(bld, v), nrm)
    y = bld.add(res, m)
    _live_until_end(bld, res)
    bld.tp.keep(y)
    return y


def layer_state_bytes(spec: ModelSpec, index: int, batch: int, act: int) -> int:
    """Layer ``index``'s fixed-size generation cache: Mamba-2's conv + SSM state, a short conv's last
    ``conv_kernel`` inputs (LFM2: ``Lfm2ShortConv``, conv state only), nothing for attention."""
    ss = spec.ssm
    kind = spec.mixer(index)
    if kind == "rwkv":
        from .rwkv import rwkv_state_bytes

        return rwkv_state_bytes(spec, batch, act)
    if kind == "lightning":
        from .lightning import lightning_state_bytes

        return lightning_state_bytes(spec, batch, act)
    if ss is None or kind in ("attention", "none"):
        return 0
    if kind == "conv":
        return batch * ss.d_inner * ss.d_conv * act
    if kind == "mamba" or (kind in ("zamba_hybrid", "zamba_tied") and ss.dt_rank):  # Zamba: Mamba-1 mixers
        return mamba1_state_bytes(ss, batch, act)
    if kind == "gdn":
        from .gdn import gdn_state_bytes

        return gdn_state_bytes(ss, batch, act)
    if kind == "rglru":
        from .rglru import rglru_state_bytes

        return rglru_state_bytes(ss, batch, act)
    return mamba2_state_bytes(ss, batch, act)


def ssm_state_bytes(spec: ModelSpec, batch: int, act: int) -> int:
    """The generation cache of every SSM / short-conv layer of ``spec`` (constant in the sequence length)."""
    if spec.ssm is None and not {"rwkv", "lightning"} & set(spec.mixers):
        return 0
    return sum(layer_state_bytes(spec, i, batch, act) for i in range(spec.num_layers))


def conv_linears(hidden: int) -> list[tuple[str, int, int, int]]:
    """LFM2's short-conv mixer: ``in_proj`` (B, C and x) and ``out_proj`` (modeling_lfm2.py ``Lfm2ShortConv``)."""
    return [("in_proj", hidden, 3 * hidden, 1), ("out_proj", hidden, hidden, 1)]


def conv_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements of the linears, other parameters) of a short-conv mixer: ``conv_bias`` gives both linears and
    the depthwise conv a bias."""
    bias = 4 * hidden if ss.conv_bias else 0
    return bias, hidden * ss.d_conv + (hidden if ss.conv_bias else 0)


def short_conv_mixer(bld: _B, n: Tensor) -> Tensor:
    """``Lfm2ShortConv.forward`` (modeling_lfm2.py, transformers 5.24): ``BCx = in_proj(x).transpose``; ``B * x``
    (saves both halves: the projection stays alive); the depthwise causal conv (``causal_conv1d_fn``: F.conv1d
    with padding conv_kernel - 1, sliced; it saves its input); ``C * conv`` (saves both); ``.transpose
    .contiguous()`` (a copy); ``out_proj``. The fused causal_conv1d kernel returns the unpadded output and saves
    the same input."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    h, b, s = spec.hidden_size, bld.b, bld.s
    t = b * s
    tr = plan.trainable
    bias = ss.conv_bias

    def lin(x: Tensor, fin: int, fout: int, name: str) -> Tensor:
        return bld.proj(x, fin, fout, name, bias)

    bcx = lin(n, h, 3 * h, "in_proj")
    e = bcx.elem
    bv, cv, xv = tp.view(bcx, t * h), tp.view(bcx, t * h), tp.view(bcx, t * h)
    bx = bld.mul(bv, xv)
    if not num.training:
        conv_state = tp.op(b * h * ss.d_conv, e, (), rg=False, kind=KV)
        tp.keep(conv_state)
    pg = bld.param_grad(f"conv{len(tp.ops)}", h * ss.d_conv, bld.num.param) if tr else ()
    out_len = s if plan.ssm_kernel == "fused" else s + ss.d_conv - 1
    conv = tp.op(b * h * out_len, e, (bx,), save=(bx,), params=pg)
    y = bld.mul(cv, conv)
    yc = tp.op(t * h, e, (y,))  # transpose(-1, -2).contiguous()
    o = lin(yc, h, h, "out_proj")
    _live_until_end(bld, bcx, bx)
    return o


def falcon_h1_layer(bld: _B, x: Tensor) -> Tensor:
    """``FalconH1DecoderLayer.forward`` (modeling_falcon_h1.py, transformers 5.24): one RMSNorm feeds the Mamba-2
    mixer and, in parallel, attention (on ``h * attention_in_multiplier``; keys scaled by ``key_multiplier``); the
    mixer's output times ``ssm_out_multiplier`` plus attention's times ``attention_out_multiplier`` joins the
    residual; then pre_ff_layernorm and the MLP (``up * act(gate * gate_multiplier)``, ``down * down_multiplier``).
    Every multiplier is an elementwise op that makes a new tensor."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    n1 = bld.norm(x, h, tr)
    m = bld.call(lambda v: mamba2_mixer(bld, v), n1)
    m = tp.op(m.numel, m.elem, (m,))  # * ssm_out_multiplier
    a_in = tp.op(n1.numel, n1.elem, (n1,))  # * attention_in_multiplier
    a = bld.call(bld.self_attention, a_in)
    a = tp.op(a.numel, a.elem, (a,))  # * attention_out_multiplier
    _live_until_end(bld, n1)
    hmid = bld.add(x, bld.add(m, a))
    n2 = bld.norm(hmid, h, tr)
    out = bld.call(bld.mlp, n2)
    y = bld.add(hmid, out)
    tp.keep(y)
    return y


# ---- Mamba-1 (selective scan) ----------------------------------------------------------------------------------

def mamba1_linears(ss: SSMSpec, hidden: int) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of a Mamba-1 mixer's ``nn.Linear`` modules (modeling_mamba.py ``MambaMixer``):
    ``in_proj`` (x and the gate z), ``x_proj`` (dt, B, C), ``dt_proj`` and ``out_proj``."""
    di, n, r = ss.d_inner, ss.d_state, ss.dt_rank
    if ss.n_heads > 1:  # Zamba: x_proj / dt_proj are per-head 3-D parameters (x_proj_weight, dt_proj_weight)
        return [("in_proj", hidden, 2 * di, 1), ("out_proj", di, hidden, 1)]
    return [("in_proj", hidden, 2 * di, 1), ("x_proj", di, r + 2 * n, 1), ("dt_proj", r, di, 1),
            ("out_proj", di, hidden, 1)]


def mamba1_extra_params(ss: SSMSpec, hidden: int) -> tuple[int, int]:
    """(bias elements of the linears, other parameters) of a Mamba-1 mixer: ``use_bias`` gives in_proj and out_proj a
    bias, dt_proj always has one; the depthwise conv1d (d_inner x 1 x conv_kernel, + bias), ``A_log`` (d_inner x
    state) and ``D``. Falcon-Mamba's B/C/dt norms hold buffers, not parameters."""
    di = ss.d_inner
    bias = di + ((2 * di + hidden) if ss.proj_bias else 0)
    norms = ss.dt_rank + 2 * ss.d_state if ss.bcdt_norm == "rms" else 0  # Jamba's dt/b/c_layernorm weights
    heads = di * (ss.dt_rank + 2 * ss.d_state) + ss.dt_rank * di if ss.n_heads > 1 else 0  # Zamba's 3-D weights
    return bias, di * ss.d_conv + (di if ss.conv_bias else 0) + di * ss.d_state + di + norms + heads


def mamba1_state_bytes(ss: SSMSpec, batch: int, act: int) -> int:
    """One Mamba-1 layer's generation cache (cache_utils.py ``LinearAttentionLayer``): the conv state (batch, d_inner,
    conv_kernel) in the activations' dtype and the recurrent state (batch, d_inner, state), ``zeros_like`` the scan's
    last state, which is fp32 on both paths (the torch loop's state; the kernel's fp32 intermediates)."""
    return batch * ss.d_inner * ss.d_conv * act + batch * ss.d_inner * ss.d_state * 4


def mamba1_mixer(bld: _B, n: Tensor) -> Tensor:
    """``MambaMixer.forward`` (modeling_mamba.py / modeling_falcon_mamba.py, transformers 5.24) on the normed hidden
    states ``n``: ``in_proj``, then the fused path (training without a cache: ``mamba_inner_fn``) or transformers'
    torch fallback, whichever the workload's ``ssm_kernel`` names."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    h = spec.hidden_size

    lin = bld.proj

    pj = lin(n, h, 2 * ss.d_inner, "in_proj", ss.proj_bias)
    if ss.n_heads > 1:  # Zamba: per-head x_proj / dt_proj weights and scans
        return _zamba_scan(bld, pj, fused=plan.ssm_kernel == "fused")
    if plan.ssm_kernel == "fused" and bld.num.training and ss.inner_fn:
        return _mamba1_inner_fn(bld, pj)
    return _mamba1_scan(bld, pj, lin, fused=plan.ssm_kernel == "fused")


def _mamba1_inner_fn(bld: _B, pj: Tensor) -> Tensor:
    """``MambaInnerFn`` (mamba_ssm/ops/selective_scan_interface.py, ``checkpoint_lvl=1``), one autograd node. The
    transposed in_proj output is not contiguous, so it is copied (``xz.contiguous()``); the forward makes the conv
    output, ``x_dbl`` (x_proj, tokens x (dt_rank + 2 state)), delta, contiguous copies of B and C, the scan output
    ``out``, the fp32 scan intermediates (batch, d_inner, ceil(L / 2048), 2 state) and ``out_z``, and applies the
    out_proj weight itself (a LoRA on out_proj is not called on this path); it saves xz, x_dbl, B, C, the
    intermediates and ``out`` and recomputes the conv output and delta in backward, which also makes ``dxz`` (the
    gradient the replay hands back), ``dout_y``, the scan's du / ddelta / recomputed ``out_z``, fp32 dB and dC and
    ``dx_dbl``."""
    spec, tp = bld.spec, bld.tp
    ss = spec.ssm
    assert ss is not None
    b, s, t = bld.b, bld.s, bld.t
    di, n, r, h = ss.d_inner, ss.d_state, ss.dt_rank, spec.hidden_size
    e = pj.elem
    xz = tp.op(pj.numel, e, (pj,), passthrough=True)  # .contiguous()
    x_dbl = tp.op(t * (r + 2 * n), e, (xz,), rg=False)
    bc = tp.op(2 * b * n * s, e, (x_dbl,), rg=False)  # B and C, contiguous
    inter = tp.op(b * di * -(-s // 2048) * 2 * n, 4, (), rg=False)
    out = tp.op(t * di, e, (xz,), rg=False)
    conv_delta = 2 * t * di * e  # conv1d_out and delta (not saved at checkpoint_lvl 1), out_z
    tr = bld.plan is not None and bld.plan.trainable
    # the weights the node takes: conv1d, x_proj, dt_proj (+ bias), out_proj (+ bias), A_log, D
    numel = (di * ss.d_conv + (di if ss.conv_bias else 0) + di * (r + 2 * n) + r * di + di + h * di
             + (h if ss.proj_bias else 0) + di * n + di)
    pg = bld.param_grad(f"mamba_inner{len(tp.ops)}", numel, bld.num.param) if tr else ()
    y = tp.op(t * h, e, (xz, x_dbl, bc, inter, out), save=(xz, x_dbl, bc, inter, out), grad_to=(xz,), params=pg,
              rg=True, fwd_scratch=conv_delta + t * di * e,
              bwd_scratch=5 * t * di * e + 2 * b * n * s * 4 + t * (r + 2 * n) * e)
    _live_until_end(bld, pj)
    return y


def _bcdt_rms(bld: _B, x: Tensor, dim: int, weighted: bool) -> Tensor:
    """Falcon-Mamba's ``FalconMambaWeightlessRMSNorm`` (``x.float()``, pow(2).mean, ``x * rsqrt``, ``type_as(x)``)
    or Jamba's ``JambaRMSNorm`` (the same, then ``weight * h.to(input dtype)``) on dt, B or C."""
    x32 = bld.cast(x, 4)
    sq = bld.tp.op(x.numel, 4, (x32,), save=(x32,) if x32.rg else ())
    var = bld.tp.op(x.numel // dim, 4, (sq,))
    rs = bld.ew(var, save_out=True)
    out = bld.cast(bld.mul(x32, rs), x.elem)
    if not weighted:
        return out
    plan = bld.plan
    tr = plan is not None and plan.trainable
    pg = bld.param_grad(f"bcdt{len(bld.tp.ops)}", dim, bld.num.norm_param) if tr else ()
    return bld.tp.op(out.numel, max(bld.num.norm_param, out.elem), (out,), save=(out,) if tr else (), params=pg,
                     rg=out.rg or tr)


def _scan_fused(bld: _B, act: Tensor, dt: Tensor, bv: Tensor, cv: Tensor, gate: Tensor, di: int,
                pg: Callable[[str, int], tuple[tuple[int, int], ...]], *, copies: str) -> Tensor:
    """``selective_scan_fn`` (mamba_ssm selective_scan_interface.py ``SelectiveScanFn``) over ``di`` channels: the
    operands not contiguous in their last dim are copied (``copies`` names them: d(elta), b, c, z); the kernel makes
    ``out``, the fp32 intermediates (batch, di, ceil(L / 2048), 2 state) and ``out_z``. Training saves u, delta, B,
    C, z, the intermediates and out; backward makes du, ddelta, dz, the recomputed out_z and fp32 dB, dC."""
    tp, num, spec = bld.tp, bld.num, bld.spec
    assert spec.ssm is not None
    b, s, n, e = bld.b, bld.s, spec.ssm.d_state, act.elem
    t = b * s
    inter_n = b * di * -(-s // 2048) * 2 * n
    if num.training:
        d_c = tp.op(t * di, e, (dt,), passthrough=True) if "d" in copies else dt
        b_c = tp.op(b * n * s, e, (bv,), passthrough=True) if "b" in copies else bv
        c_c = tp.op(b * n * s, e, (cv,), passthrough=True) if "c" in copies else cv
        z_c = tp.op(t * di, e, (gate,), passthrough=True) if "z" in copies else gate
        inter = tp.op(inter_n, 4, (), rg=False)
        o_raw = tp.op(t * di, e, (act,), rg=False)
        params = pg("A_log", di * n) + pg("D", di)
        return tp.op(t * di, e, (act, d_c, b_c, c_c, z_c, inter, o_raw),
                     save=(act, d_c, b_c, c_c, z_c, inter, o_raw), grad_to=(act, d_c, b_c, c_c, z_c),
                     params=params, rg=True, bwd_scratch=t * di * e + 2 * b * n * s * 4)
    made = (t * di * e if "d" in copies else 0) + ((b * n * s * e) if "b" in copies else 0) + \
        ((b * n * s * e) if "c" in copies else 0) + (t * di * e if "z" in copies else 0)
    return tp.op(t * di, e, (dt, bv, cv, gate), rg=False, fwd_scratch=made + t * di * e + inter_n * 4)


def _scan_torch(bld: _B, act: Tensor, dt: Tensor, a_neg: Tensor, bv: Tensor, cv: Tensor, gate: Tensor, di: int,
                pg: Callable[[str, int], tuple[tuple[int, int], ...]]) -> Tensor:
    """transformers' ``mamba_selective_scan`` fallback over ``di`` channels (the softplus'd ``dt`` given): dA =
    exp(A * dt), dB = dt * B, dBu = dB * x as (batch, di, L, state) fp32 tensors, the sequential per-token loop,
    ``torch.stack``, ``+ x * D.float()`` and ``* silu(z)`` in fp32. Returns the fp32 output; the function's locals
    stay referenced until it returns."""
    tp, spec, plan = bld.tp, bld.spec, bld.plan
    assert spec.ssm is not None and plan is not None
    b, s, n, e = bld.b, bld.s, spec.ssm.d_state, act.elem
    t, tr = b * s, plan.trainable
    four = b * di * s * n
    da_mul = tp.op(four, 4, (a_neg, dt), save=(a_neg, dt) if dt.rg or a_neg.rg else ())
    da = bld.ew(da_mul, save_out=True)  # exp
    b32 = bld.cast(bv, 4)
    db = tp.op(four, 4, (dt, b32), save=(dt, b32) if dt.rg or b32.rg else ())
    x32 = bld.cast(act, 4)
    dbu = tp.op(four, 4, (db, x32), save=(db, x32) if db.rg or x32.rg else ())
    state = tp.op(b * di * n, e, (), rg=False)  # zeros, in the input dtype
    steps: list[Tensor] = []
    for _ in range(s):
        da_i = tp.view(da, b * di * n)  # discrete_A[:, :, i]: its gradient is select_backward's full-size tensor
        prod = tp.op(b * di * n, 4, (da_i, state), save=(da_i, state) if (da.rg or state.rg) else ())
        state = tp.op(b * di * n, 4, (prod, tp.view(dbu, b * di * n)), passthrough=True)
        sc = bld.cast(state, e)
        y_i = tp.op(b * di, e, (sc, cv), save=(sc, cv) if (sc.rg or cv.rg) else ())
        steps.append(y_i)
    stacked = tp.op(t * di, e, tuple(steps), passthrough=True)
    d32 = tp.op(di, 4, (), rg=tr, params=pg("D", di))  # D.float()
    xd = tp.op(t * di, 4, (act, d32), save=(act, d32) if tr or act.rg else ())
    y = tp.op(t * di, 4, (stacked, xd), passthrough=True)
    sg = tp.op(t * di, e, (gate,), save=(gate,) if gate.rg else ())  # silu(z)
    y = bld.mul(y, sg, elem=4)
    _live_until_end(bld, dt, da, db, dbu, *steps)  # dt: the softplus'd delta, a local of the scan
    return y


def _zamba_scan(bld: _B, pj: Tensor, *, fused: bool) -> Tensor:
    """``ZambaMambaMixer.forward`` (modeling_zamba.py, transformers 5.24) after ``in_proj``: the projection viewed
    as (batch, d_inner, 2, L) interleaves x and the gate, so x is copied (``.contiguous()``) and the gate stays a
    strided view; ``causal_conv1d_fn``; then per-head 3-D weights applied by broadcasting matmuls
    (``x_proj_weight[:, None] @ x`` and ``dt_proj_weight[:, None] @ time_step^T``: with more than one sequence
    ``matmul`` expands the weight and copies it per sequence, and copies the head-major x, and bmm saves both); the
    fp32 ``dt_proj_bias`` and ``A``; then one selective scan per head over d_inner / n_mamba_heads channels (the
    fallback adds the bias and applies softplus inside it), ``torch.cat`` of the fp32 head outputs, the cast to the
    input dtype and ``out_proj``."""
    spec, tp, num, plan = bld.spec, bld.tp, bld.num, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    b, s, t = bld.b, bld.s, bld.t
    di, n, r, k, h, nh = ss.d_inner, ss.d_state, ss.dt_rank, ss.d_conv, spec.hidden_size, ss.n_heads
    hd, big_r = di // nh, r + 2 * ss.d_state
    tr = plan.trainable
    e = pj.elem

    def pg(name: str, numel: int) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, bld.num.param) if tr else ()

    def head_matmul(x: Tensor, out_numel: int, w_numel: int, name: str, copy_x: bool) -> Tensor:
        wc = tp.op(b * w_numel, e, (), rg=False) if b > 1 else None  # expand(...).reshape: a copy per sequence
        xc = tp.op(x.numel, e, (x,), passthrough=True) if copy_x and b > 1 else x
        save = ((wc,) if wc is not None and xc.rg else ()) + ((xc,) if tr else ())
        return tp.op(out_numel, e, (xc,) + ((wc,) if wc is not None else ()), save=save, params=pg(name, w_numel),
                     rg=xc.rg or tr, grad_to=(xc,), bwd_scratch=b * w_numel * e if tr and b > 1 else 0)

    if not num.training:
        conv_state = tp.op(b * di * k, e, (), rg=False, kind=KV)
        ssm_state = tp.op(b * di * n, 4, (), rg=False, kind=KV)
        tp.keep(conv_state, ssm_state)
    x_c = tp.op(t * di, e, (pj,), passthrough=True)  # hidden_states_B_C.squeeze(2).contiguous()
    gate = tp.view(pj, t * di)
    conv = tp.op(b * di * (s if fused else s + k - 1), e, (x_c,), save=(x_c,), params=pg("conv1d", di * k))
    act = tp.op(t * di, e, (conv,), save=(conv,) if conv.rg else ())
    ssm_p = head_matmul(act, t * nh * big_r, di * big_r, "x_proj_weight", True)
    ts_all = head_matmul(tp.view(ssm_p, t * nh * r), t * di, di * r, "dt_proj_weight", False)
    bias32 = tp.op(di, 4, (), rg=tr, params=pg("dt_proj_bias", di))  # dt_proj_bias.float()
    a32 = tp.op(di * n, 4, (), rg=tr, params=pg("A_log", di * n))  # A = -exp(A_log.float())
    a_exp = bld.ew(a32, save_out=True)
    a_neg = tp.op(di * n, 4, (a_exp,))
    outs: list[Tensor] = []
    for _ in range(nh):
        x_h, ts_h, z_h = tp.view(act, t * hd), tp.view(ts_all, t * hd), tp.view(gate, t * hd)
        b_h, c_h = tp.view(ssm_p, t * n), tp.view(ssm_p, t * n)
        if fused:  # the kernel adds delta_bias and applies softplus; only z (strided) is copied
            outs.append(_scan_fused(bld, x_h, ts_h, b_h, c_h, z_h, hd, pg, copies="z"))
            continue
        bias_h = tp.op(hd, e, (bias32,))  # delta_bias.to(dt.dtype)
        dt = tp.op(t * hd, e, (ts_h, bias_h))
        dt = tp.op(t * hd, e, (dt,), save=(dt,) if dt.rg else ())  # softplus saves its input
        outs.append(_scan_torch(bld, x_h, dt, a_neg, b_h, c_h, z_h, hd, pg))
    cat = tp.op(t * di, outs[0].elem, tuple(outs), passthrough=True)  # torch.cat(scan_outputs, dim=1)
    _live_until_end(bld, pj, act, ssm_p, ts_all, a_neg)
    yc = bld.cast(cat, e)  # scan_output.transpose(1, 2).to(dtype): strides kept
    yc = tp.op(t * di, e, (yc,), passthrough=True)  # the linear reshapes the transposed input: a copy
    return bld.proj(yc, di, h, "out_proj", ss.proj_bias)


def _mamba1_scan(bld: _B, pj: Tensor, linear: Callable[[Tensor, int, int, str, bool], Tensor], *,
                 fused: bool) -> Tensor:
    """The mixer outside ``mamba_inner_fn`` (modeling_mamba.py): ``causal_conv1d_fn`` (the fallback: F.conv1d with
    padding conv_kernel - 1, sliced, silu; the kernel: the unpadded output), ``x_proj`` on the transposed conv
    output (the linear reshapes it: a copy), ``dt_proj.weight @ time_step^T`` (matmul folds the transposed operand:
    a copy), then the scan.

    Fallback (``mamba_selective_scan``): dA = exp(A * dt), dB = dt * B, dBu = dB * x as (batch, d_inner, L, state)
    fp32 tensors, then the sequential loop: per token ``state = dA[:, :, i] * state + dBu[:, :, i]`` in fp32 (the new
    state is saved by the next step's product), its cast to the activation dtype and ``@ C[:, i]`` (both saved),
    then ``torch.stack``, ``+ x * D`` and ``* silu(z)`` in fp32.

    Kernel (``selective_scan_fn``, mamba_ssm selective_scan_interface.py ``SelectiveScanFn``, inference): delta, B, C
    and z are not contiguous in the last dim and are copied; the kernel makes ``out``, the fp32 intermediates
    (batch, d_inner, ceil(L / 2048), 2 state) and ``out_z``. Inference writes the conv and recurrent state into the
    cache."""
    spec, tp, num, plan = bld.spec, bld.tp, bld.num, bld.plan
    assert plan is not None and spec.ssm is not None
    ss = spec.ssm
    b, s, t = bld.b, bld.s, bld.t
    di, n, r, k, h = ss.d_inner, ss.d_state, ss.dt_rank, ss.d_conv, spec.hidden_size
    tr = plan.trainable
    e = pj.elem

    def pg(name: str, numel: int) -> tuple[tuple[int, int], ...]:
        return bld.param_grad(f"{name}{len(tp.ops)}", numel, bld.num.param) if tr else ()

    if not num.training:
        conv_state = tp.op(b * di * k, e, (), rg=False, kind=KV)
        ssm_state = tp.op(b * di * n, 4, (), rg=False, kind=KV)
        tp.keep(conv_state, ssm_state)
    # A = -exp(A_log.float())
    a32 = tp.op(di * n, 4, (), rg=tr, params=pg("A_log", di * n))
    a_exp = bld.ew(a32, save_out=True)
    a_neg = tp.op(di * n, 4, (a_exp,))
    x_half = tp.view(pj, t * di)
    gate = tp.view(pj, t * di)
    conv = tp.op(b * di * (s if fused else s + k - 1), e, (x_half,), save=(x_half,), params=pg("conv1d", di * k))
    act = tp.op(t * di, e, (conv,), save=(conv,) if conv.rg else ())
    xdbl = linear(act, di, r + 2 * n, "x_proj", False)  # a 3-D strided input: matmul expands the weight (bmm)
    ts = tp.view(xdbl, t * r)
    bv = tp.view(xdbl, t * n)
    cv = tp.view(xdbl, t * n)
    if ss.bcdt_norm:  # dt_layernorm, b_layernorm, c_layernorm
        weighted = ss.bcdt_norm == "rms"
        ts = _bcdt_rms(bld, ts, r, weighted)
        bv = _bcdt_rms(bld, bv, n, weighted)
        cv = _bcdt_rms(bld, cv, n, weighted)
    tsc = tp.op(t * r, e, (ts,), passthrough=True)  # matmul folds time_step^T: a contiguous copy
    ts = tp.op(t * di, e, (tsc,), save=(tsc,) if tr else (), params=pg("dt_proj", r * di), rg=tsc.rg or tr,
               grad_to=(tsc,))  # time_step: a local of forward
    if fused:  # selective_scan_fn (delta_bias and softplus inside the kernel): copies of delta, B, C and z
        out = _scan_fused(bld, act, ts, bv, cv, gate, di, pg, copies="dbcz")
        _live_until_end(bld, pj, act, xdbl, ts)
        oc = tp.op(t * di, e, (out,))  # the linear reshapes the transposed output: a copy
        return linear(oc, di, h, "out_proj", ss.proj_bias if ss.out_bias is None else ss.out_bias)
    dt = tp.op(t * di, e, (ts,), params=pg("dt_bias", di), rg=ts.rg or tr)  # + delta_bias.to(dt.dtype)
    dt = tp.op(t * di, e, (dt,), save=(dt,) if dt.rg else ())  # softplus saves its input
    y = _scan_torch(bld, act, dt, a_neg, bv, cv, gate, di, pg)
    _live_until_end(bld, pj, a_neg, act, xdbl, ts)
    yc = bld.cast(y, e)  # scan_output.transpose(1, 2).to(dtype): strides kept
    yc = tp.op(t * di, e, (yc,), passthrough=True)  # the linear reshapes the transposed input: a copy
    return linear(yc, di, h, "out_proj", ss.proj_bias if ss.out_bias is None else ss.out_bias)
