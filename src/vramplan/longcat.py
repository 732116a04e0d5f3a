"""LongCat-Flash (modeling_longcat_flash.py, transformers 5.24 and 5.25): the reader, the layer's parameters and its
memory program.

``LongcatFlashDecoderLayer`` holds two attention sublayers (``self_attn[0]``, ``self_attn[1]``: DeepSeek-V3.2's MLA
without the indexer, the query halves and the normed kv latent scaled by sqrt(hidden / lora rank)), two dense SwiGLU
MLPs (``mlps[0]``, ``mlps[1]``), four RMSNorms, and one MoE block (``mlp``: ``LongcatFlashMoE``) that reads the first
pair's normed MLP input; its output (the shortcut) is added to the residual at the end of the layer::

    h1 = x + attn0(norm_in0(x));  n = norm_post0(h1);  shortcut = moe(n);  h2 = h1 + mlps0(n)
    h3 = h2 + attn1(norm_in1(h2));  y = h3 + mlps1(norm_post1(h3)) + shortcut

The MoE router (``LongcatFlashTopkRouter``) is ``F.linear`` of an fp32 copy of the hidden states with an fp32 copy of
``classifier.weight`` (the module itself is never called, so peft's adapter on it computes nothing), a softmax, the
top-k of the scores plus a correction bias (no grad), the scores gathered and times ``routed_scaling_factor``. It
scores ``n_routed_experts + zero_expert_num`` experts; ``LongcatFlashExperts`` loops over every expert hit: the
routed ones run ``F.linear`` with their slice of ``gate_up_proj`` (which holds a row block for every expert, the
zero-compute ones included) and ``down_proj``; the zero-compute ones pass the gathered tokens through; each result
times its fp32 routing weights, cast back and ``index_add_``-ed into a ``zeros_like`` output.

transformers 5.25 rewrote the experts (``LongcatFlashMoE`` / ``LongcatFlashExperts``): ``gate_up_proj`` holds the
routed experts' rows only, and the experts run under ``@use_experts_implementation`` (the grouped_mm path every MoE
family takes by default). The zero-compute experts are taken out before them: their summed routing weights times the
hidden states (``identity_output``, fp32: 16-bit states times fp32 weights), the pairs routed to them re-pointed at
routed experts (``dummy_indices``) with weight 0, and ``identity_output`` cast back and added to the experts' output.
``spec.moe_experts_loop`` says which release's experts a spec models (:func:`at_release`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .spec import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._engine.tape import Tensor
    from .blocks import _B
    from .hfconfig import _Cfg
    from .params import LayerParams

__all__ = ["LONGCAT_CLASSES", "LONGCAT_READERS", "at_release", "longcat_layer", "longcat_layer_params",
           "longcat_linears"]

# the first transformers release whose LongcatFlashExperts run the grouped_mm experts path with the zero-compute
# experts outside them (modeling_longcat_flash.py 5.25; 5.24 loops over every expert hit, identity experts included)
GROUPED_EXPERTS = (5, 25)


def at_release(spec: ModelSpec, have: tuple[int, ...]) -> ModelSpec:
    """The LongCat-Flash spec as transformers release ``have`` builds it (its experts; any other spec unchanged)."""
    if not spec.dual_sublayers:
        return spec
    loop = have < GROUPED_EXPERTS
    return spec if spec.moe_experts_loop == loop else replace(spec, moe_experts_loop=loop)

# configuration_longcat_flash.py LongcatFlashConfig's defaults
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 6144, "num_attention_heads": 64, "ffn_hidden_size": 12288,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "moe_topk": 12, "n_routed_experts": 512, "zero_expert_num": 256, "expert_ffn_hidden_size": 2048,
    "max_position_embeddings": 131072}


def _longcat_flash(c: _Cfg, family: str) -> ModelSpec:
    """LongcatFlashConfig: ``num_layers`` decoder layers (``num_hidden_layers`` is twice that: the attention
    sublayers), MLA sizes, ``ffn_hidden_size`` for the dense MLPs, ``expert_ffn_hidden_size`` for the experts."""
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like
    from .workload import default_transformers, release

    cc = c.with_defaults(_DEFAULTS)
    if cc.raw["zero_expert_num"] is None:  # LongcatFlashExperts: config.zero_expert_num or 0
        cc = _Cfg({**cc.raw, "zero_expert_num": 0}, c.where)
    raw = cc.raw
    if raw.get("num_layers") is None and raw.get("num_hidden_layers") is not None:
        layers = cc.int_("num_hidden_layers", hi=2 * _MAX_LAYERS) // 2  # the config's setter: num_layers = n // 2
    else:
        layers = cc.int_("num_layers", default=28, hi=_MAX_LAYERS)
    nope, rope = cc.int_("qk_nope_head_dim"), cc.int_("qk_rope_head_dim")
    if raw.get("qk_head_dim") is not None and cc.int_("qk_head_dim") != nope + rope:
        raise ConfigError(f"{c.where}: qk_head_dim other than qk_nope_head_dim + qk_rope_head_dim is not modelled by "
                          "estimate; run vramplan trace")
    if cc.int_("q_lora_rank", lo=1) <= 0:
        raise ConfigError(f"{c.where}: LongCat-Flash needs a positive q_lora_rank")
    experts = cc.int_("n_routed_experts", lo=1)
    zero = cc.int_("zero_expert_num", default=0, lo=0)
    top_k = cc.int_("moe_topk")
    if top_k > experts + zero:
        raise ConfigError(f"{c.where}: moe_topk ({top_k}) exceeds the experts ({experts} + {zero} zero-compute)")
    base = {k: v for k, v in raw.items() if k not in ("num_layers", "ffn_hidden_size", "expert_ffn_hidden_size")}
    base |= {"num_hidden_layers": layers, "intermediate_size": cc.int_("ffn_hidden_size"),
             "num_key_value_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"]}
    facts = _Facts(version="5.24", mla=True, mla_defaults=(1536, 512, 128, 64, 128))
    spec = _llama_like(_Cfg(base, c.where), family, facts)
    return replace(spec, num_experts=experts, zero_experts=zero, experts_per_token=top_k,
                   moe_intermediate_size=cc.int_("expert_ffn_hidden_size"), moe_layers=tuple(range(layers)),
                   router_bias=cc.bool_("router_bias", default=False), router_fp32=True,
                   # the experts as the installed transformers builds them (a workload of another release:
                   # at_release)
                   moe_experts_loop=release(default_transformers()) < GROUPED_EXPERTS,
                   dual_sublayers=True, mla_lora_scale=True, program_version="5.24")


LONGCAT_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {"longcat_flash": _longcat_flash}
LONGCAT_CLASSES: dict[str, str] = {"LongcatFlashForCausalLM": "longcat_flash"}


# ---- parameters ---------------------------------------------------------------------------------------------------

def longcat_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(module name, in, out, count) of one layer's linears: both attention sublayers' and both dense MLPs' (count 2),
    the experts (``gate_up_proj`` holds every expert's rows in 5.24, the zero-compute ones included, the routed ones
    only from 5.25; ``down_proj`` the routed ones only) and the router's classifier over every expert."""
    from .params import attention_linears, mlp_linears

    h, i, e, z = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.zero_experts
    dense = replace(spec, dual_sublayers=False)
    out = [(n, fi, fo, 2 * k) for n, fi, fo, k in attention_linears(dense) + mlp_linears(dense, False)]
    gu = e + z if spec.moe_experts_loop else e
    return [*out, ("experts.gate_proj", h, i, gu), ("experts.up_proj", h, i, gu),
            ("experts.down_proj", i, h, e), ("router", h, e + z, 1)]


def longcat_layer_params(spec: ModelSpec) -> LayerParams:
    """One LongcatFlashDecoderLayer: its linears, four hidden-sized RMSNorms, each MLA's q_a/kv_a norms, the biases
    attention_bias gives each MLA (q_a_proj, kv_a_proj_with_mqa, o_proj) and the router's."""
    from .params import LayerParams, _norm_params

    lin = longcat_linears(spec)
    attn = [x for x in lin[:len(lin) - 4] if x[0] not in ("gate_proj", "up_proj", "down_proj")]
    mlp = [x for x in lin if x not in attn]
    bias = 2 * (spec.q_lora_rank + spec.kv_lora_rank + spec.qk_rope_head_dim + spec.hidden_size) \
        if spec.qkv_bias else 0
    if spec.router_bias:
        bias += spec.num_experts + spec.zero_experts
    norm = 4 * _norm_params(spec, spec.hidden_size) + 2 * (spec.q_lora_rank + spec.kv_lora_rank)
    return LayerParams(sum(a * b * k for _, a, b, k in attn), sum(a * b * k for _, a, b, k in mlp), bias, norm,
                       tuple(lin))


# ---- memory program -----------------------------------------------------------------------------------------------

def longcat_layer(bld: _B, x: Tensor) -> Tensor:
    """LongcatFlashDecoderLayer.forward (see the module docstring)."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    dense_plan = replace(plan, moe=False)

    def dense(v: Tensor) -> Tensor:  # mlps[j]: the plan's MLP with moe off (the layer is a MoE layer)
        bld.plan = dense_plan
        try:
            return bld.mlp(v)
        finally:
            bld.plan = plan

    h1 = bld.add(x, bld.call(bld.self_attention, bld.norm(x, h, tr)))
    n = bld.norm(h1, h, tr)
    shortcut = bld.call(lambda v: longcat_moe(bld, v), n)
    h2 = bld.add(h1, bld.call(dense, n))
    h3 = bld.add(h2, bld.call(bld.self_attention, bld.norm(h2, h, tr)))
    y = bld.add(bld.add(h3, bld.call(dense, bld.norm(h3, h, tr))), shortcut)
    bld.tp.keep(y)
    return y


def longcat_moe(bld: _B, n: Tensor) -> Tensor:
    """LongcatFlashMoE.forward: the router, then LongcatFlashExperts' loop over every expert hit (under the balanced
    routing the trace assumes, every one of the routed and zero-compute experts, each with tokens x top-k / experts
    tokens)."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None
    h, i, e, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.experts_per_token
    et = e + spec.zero_experts
    t = n.numel // h
    act, tr = n.elem, plan.trainable

    # router: F.linear(hidden.float(), classifier.weight.float()); the weight's fp32 copy (ToCopyBackward carries
    # its gradient to the parameter) is saved for the input's gradient, the input's copy for the weight's
    x32 = bld.cast(n, 4)
    w32 = tp.op(et * h, 4, (), rg=tr, params=bld.param_grad("router", et * h, num.param) if tr else ())
    logits = tp.op(t * et, 4, (x32, w32), save=((x32,) if w32.rg else ()) + ((w32,) if x32.rg else ()),
                   grad_to=(x32, w32))
    # (a router_bias adds classifier.bias, which this F.linear never reads: a parameter without a gradient)
    probs = tp.op(t * et, 4, (logits,))  # softmax saves its result
    if probs.rg:
        tp.save_output(probs)
    choice = tp.op(t * et, 4, (probs,), rg=False)  # scores + e_score_correction_bias (no_grad)
    tp.op(t * k, 4, (choice,), rg=False)  # topk values (dropped)
    idx = tp.op(t * k, 8, (choice,), rg=False)
    w = tp.op(t * k, 4, (probs, idx), save=(idx,) if probs.rg else (), grad_to=(probs,))  # scores.gather
    w = tp.op(t * k, 4, (w,))  # * routed_scaling_factor
    if not spec.moe_experts_loop:
        return _grouped(bld, n, idx, w)

    # experts: peft's ParamWrapper (all-linear) replaces a fused stack, for the module's call, by W + s * B @ A;
    # each expert's F.linear then reads a slice of it, and the slice's gradient is scattered into a stack-sized
    # zero buffer (select_backward) before it is accumulated into the stack's gradient
    wrapped: dict[str, Tensor] = {}
    stacks = {"experts.gate_up_proj": (h, 2 * i, et, 2), "experts.down_proj": (i, h, e, 1)}
    for name, (fin, fout, count, fused) in stacks.items():
        if name in plan.lora_targets:
            wrapped[name] = bld.wrapped_param(fin, fout, name, plan.lora_rank * fused, count, num.param)

    def mm(v: Tensor, name: str) -> Tensor:
        fin, fout, count, _ = stacks[name]
        stack = fin * fout * count * num.param
        if name in wrapped:
            wv = tp.view(wrapped[name], fin * fout)
            y = tp.op(v.numel // fin * fout, num.param, (v, wv), save=(v, wv), grad_to=(v, wv),
                      bwd_scratch=stack if v.rg or wv.rg else 0)
            return y
        y = bld.linear(v, fin, fout, name, bias=False, trainable=tr, quant=plan.quant)
        if tr and num.training:  # the slice's gradient: a stack-sized zero-filled buffer, then accumulated
            tp.ops[-1].params = bld.param_grad(name, fin * fout * count, num.param)
            tp.ops[-1].bwd_scratch += stack
        return y

    te = -(-t * k // et)
    out = tp.op(t * h, act, (), rg=False)  # zeros_like(hidden_states)
    mask = tp.op(t * k * et, 8, (idx,), rg=False)  # one_hot(top_k_index, total_experts), permuted (a view)
    hit = tp.op(et, 8, (mask,), rg=False)  # expert_mask.sum(...) > 0, nonzero
    written: list[Tensor] = []
    for ex in range(et):
        tok = tp.op(te, 8, (mask,), rg=False)  # torch.where(expert_mask[expert_idx]): token indices
        pos = tp.op(te, 8, (mask,), rg=False)  # and top-k positions
        xg = tp.op(te * h, act, (n, tok), save=(tok,) if n.rg else (), grad_to=(n,))  # hidden_states[token_idx]
        if ex < e:
            gu = mm(xg, "experts.gate_up_proj")
            g, u = tp.split(gu, 2)  # .chunk(2, dim=-1)
            d = mm(bld.mul(bld.activation(g), u), "experts.down_proj")
        else:  # a zero-compute expert: nn.Identity
            d = xg
        wg = tp.op(te, w.elem, (w, tok, pos), save=(tok, pos) if w.rg else (), grad_to=(w,))
        st = bld.cast(bld.mul(d, wg), act)  # (states * weights[..., None]) in fp32, .to(hidden dtype)
        # index_add_ writes into the output's storage; its backward (derivatives.yaml: grad.index_select(dim,
        # index).expand_as(source)) keeps the source as well as the index
        acc = tp.op(te * h, act, (st, tok), save=(tok, st) if st.rg else (), grad_to=(st,))
        acc.nbytes = 0
        written.append(acc)
    out.last_use = len(tp.ops) - 1
    res = tp.op(t * h, act, tuple(written), grad_to=tuple(written))
    tp.hold(mask, hit, *wrapped.values())
    return res


def _grouped(bld: _B, n: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """LongcatFlashMoE.forward of transformers 5.25 after the router (see the module docstring): the zero-compute
    experts' share (``identity_output``), the re-pointed indices and zeroed weights, the grouped_mm experts
    (:meth:`vramplan.blocks._B.moe` with this routing), and ``identity_output`` cast back and added."""
    spec, tp = bld.spec, bld.tp
    h, k = spec.hidden_size, spec.experts_per_token
    t = n.numel // h
    if spec.zero_experts:
        ident = tp.op(t * k, 1, (idx,), rg=False)  # identity_mask = topk_indices >= num_routed_experts
        inv = tp.op(t * k, 1, (ident,), rg=False)  # ~identity_mask
        # masked_fill saves the mask for its backward; the sum over k keeps nothing
        kept = tp.op(t * k, w.elem, (w, inv), save=(inv,) if w.rg else (), grad_to=(w,))
        iw = tp.op(t, w.elem, (kept,))
        # hidden_states * identity_weights: 16-bit states times fp32 weights, an fp32 product saving both
        io = tp.op(t * h, 4, (n, iw), save=(n, iw) if n.rg or iw.rg else (), grad_to=(n, iw))
        dummy = idx
        for _ in range(3):  # (topk_indices - routed) * routed // zero: int64
            dummy = tp.op(t * k, 8, (dummy,), rg=False)
        idx = tp.op(t * k, 8, (ident, dummy, idx), rg=False)  # torch.where(identity_mask, dummy, topk_indices)
        w = tp.op(t * k, w.elem, (w, ident), save=(ident,) if w.rg else (), grad_to=(w,))  # masked_fill(mask, 0)
    out = bld.moe(n, (idx, w))
    if spec.zero_experts:
        out = bld.add(out, bld.cast(io, n.elem))  # + identity_output.to(hidden_states.dtype)
        tp.hold(ident)
    return out
