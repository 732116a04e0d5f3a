"""Inkling's text decoder (modeling_inkling.py, transformers 5.24: InklingForCausalLM on InklingTextConfig).

A layer is ``x + attn_sconv(attn(norm(x)))``, then ``+ mlp_sconv(mlp(norm(.)))``, where:

* the attention has no rotary embedding: q/k RMS-normalized per head, keys and values each through a depthwise causal
  short convolution (InklingShortConvolution: an fp32 copy, ``F.conv1d`` with ``kernel - 1`` padding cut back to the
  sequence, the fp32 copy added back, cast to the input dtype); a relative-position bias
  (InklingRelativeLogits: ``r_proj`` states of ``d_rel`` per head times a (d_rel, rel_extent) bank, gathered by
  distance into a dense (batch, heads, q, kv) tensor and zeroed beyond ``rel_extent``) that SDPA takes as a float
  mask (integrations/sdpa_attention.py ``create_position_bias_mask``: ``torch.where`` of the causal or window mask
  over it). A full-attention layer has no mask when the GQA decision is made, so SDPA gets ``enable_gqa`` with that
  float mask: the math kernel; a sliding layer's boolean window mask repeats k/v first: the memory-efficient kernel;
* the MLP is a gated MLP times a scalar, or the MoE block (InklingMoE): an fp32 sigmoid router that also scores the
  shared experts, grouped-GEMM routed experts, and the shared experts as ``bmm`` over a (shared, tokens, hidden)
  expansion summed in fp32;
* sliding-window layers (``layer_types`` "hybrid_sliding") have their own head counts and head size
  (spec.layer_overrides) and a relative extent of the window.

The embeddings are RMS-normed (InklingNormedEmbedding), the final hidden states divided by the muP width multiplier
before the head. Parameters outside the programs' linears (short convolutions, q/k norms, bias banks, scales, the
router's shared-expert rows) are counted by :func:`extra_params`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._engine.numerics import Kernel, sdpa_kernel
from ._engine.tape import Tensor
from .blocks import _B, window_masked
from .errors import ConfigError
from .kinds import MemoryKind
from .spec import LayerOverride, MLPKind, ModelSpec, NormKind, PositionKind
from .workload import Attention

__all__ = ["INKLING_CLASSES", "INKLING_READERS", "inkling_layer", "inkling_linears"]


def inkling_linears(spec: ModelSpec, index: int = -1) -> list[tuple[str, int, int, int]]:
    """The attention's nn.Linear modules (q, k, v, the relative-state r_proj, o); ``spec`` is the layer's (Inkling 2:
    vramplan.inkling2)."""
    if len(spec.inkling) > 4 and spec.inkling[4] == 2:
        from .inkling2 import inkling2_linears

        return inkling2_linears(spec, index not in spec.sliding_layers, index)
    h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
    return [("q_proj", h, q, 1), ("k_proj", h, kv, 1), ("v_proj", h, kv, 1),
            ("r_proj", h, spec.num_heads * _d_rel(spec), 1), ("o_proj", q, h, 1)]


def _d_rel(spec: ModelSpec) -> int:
    return spec.inkling[0]


def _extent(spec: ModelSpec, sliding: bool) -> int:
    """InklingAttention.rel_extent: the window on sliding layers, ``rel_extent`` on the others."""
    return (spec.sliding_window or 0) if sliding else spec.inkling[1]


def extra_params(spec: ModelSpec, kernel: int, shared: int) -> int:
    """Per layer: the four short convolutions (k and v over the KV width, attention and MLP outputs over hidden; a
    (channels, 1, kernel) weight, no bias), the per-head q/k norms' weights, the relative bias bank
    (d_rel x extent), and the MLP's scalar ``global_scale`` or the router's shared-expert rows and its scale."""
    total = 0
    for i in range(spec.num_layers):
        ls = spec.layer(i)
        total += kernel * (2 * ls.kv_dim + 2 * spec.hidden_size) + 2 * ls.head_dim
        total += _d_rel(spec) * _extent(spec, i in spec.sliding_layers)
        total += 1 + (shared * spec.hidden_size if i in spec.moe_layers else 0)
    return total


def short_conv(bld: _B, x: Tensor, kernel: int, scaled: bool = False) -> Tensor:
    """InklingShortConvolution.forward without a cache (training, prefill: ``cache.update_conv_state`` keeps only the
    last ``kernel`` positions): ``x.float()`` (the residual), causal_conv1d_fn over the transposed view (transformers'
    fallback: ``F.conv1d(..., padding=kernel - 1)``, its output ``kernel - 1`` positions longer, then sliced),
    ``+ residual``, ``.to(input dtype)``. The convolution saves its fp32 input for the weight's gradient."""
    tp = bld.tp
    x32 = bld.cast(x, 4)
    if x32 is x:  # already fp32: .float() returns the tensor itself
        x32 = x
    rows = x.numel // (bld.b * bld.s)  # channels
    tr = bld.plan is not None and bld.plan.trainable
    pg = bld.param_grad(f"sconv{len(tp.ops)}", rows * kernel, 4) if tr else ()
    # the fallback's padded output; causal_conv1d's fused kernel (a GPU install with it) writes the sequence only
    length = bld.s + kernel - 1 if bld.plan is None or bld.plan.ssm_kernel == "torch" else bld.s
    conv = tp.op(bld.b * rows * length, 4, (x32,), save=(x32,) if (x32.rg or tr) else (),
                 params=pg, rg=x32.rg or tr)
    y = bld.add(conv, x32)
    if scaled:  # Inkling2ShortConvolution: (hidden_states + residual) / sqrt(taps + 1)
        y = tp.op(y.numel, 4, (y,))
    return bld.cast(y, x.elem)


def inkling_attention(bld: _B, n: Tensor) -> Tensor:
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, qd, kvd, d = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.head_dim
    b, s, skv, nh = bld.b, bld.s, bld.kv_len, spec.num_heads
    tr = plan.trainable
    kernel_size = spec.inkling[2]
    q = bld.proj(n, h, qd, "q_proj")
    k = short_conv(bld, bld.proj(n, h, kvd, "k_proj"), kernel_size)
    v = short_conv(bld, bld.proj(n, h, kvd, "v_proj"), kernel_size)
    r = bld.proj(n, h, nh * _d_rel(spec), "r_proj")
    q = bld.norm(q, d, tr)
    k = bld.norm(k, d, tr)
    if not bld.num.training:  # DynamicCache.update: torch.cat copies of the keys and values
        k = tp.op(b * skv * kvd, k.elem, (k,), kind=MemoryKind.KV_CACHE)
        v = tp.op(b * skv * kvd, v.elem, (v,), kind=MemoryKind.KV_CACHE)
        tp.keep(k, v)
    # InklingRelativeLogits: (b, s, heads, d_rel) @ (d_rel, extent), gathered by distance to (b, heads, s, kv), then
    # masked_fill beyond the extent; matmul saves the states, gather its int64 (s, kv) index, masked_fill its mask
    extent = _extent(spec, plan.sliding)
    bank_g = bld.param_grad("rel_bank", _d_rel(spec) * extent, bld.num.param) if tr else ()
    rel = tp.op(b * s * nh * extent, r.elem, (r,), save=(r,) if (r.rg or tr) else (), params=bank_g, rg=r.rg or tr)
    dist = tp.op(s * skv, 8, (), rg=False)
    idx = tp.op(s * skv, 8, (dist,), rg=False)
    scores = b * nh * s * skv
    gathered = tp.op(scores, rel.elem, (rel, idx), save=(idx,) if rel.rg else (), grad_to=(rel,))
    outside = tp.op(s * skv, 1, (dist,), rg=False)
    bias = tp.op(scores, rel.elem, (gathered, outside), save=(outside,) if gathered.rg else (), grad_to=(gathered,))
    attn = plan.attention
    masked = plan.sliding and window_masked(spec, skv)
    elem = q.elem
    if attn is Attention.EAGER:
        kern = Kernel.EAGER
    elif masked:  # a boolean mask: repeat_kv, then heads match
        kern = sdpa_kernel(elem, d, True)
    else:  # no mask at the GQA decision: enable_gqa with the bias mask
        kern = sdpa_kernel(elem, d, True, heads_match=spec.num_kv_heads == nh, enable_gqa=spec.num_kv_heads != nh)
    heads_kv = spec.num_kv_heads
    if kern is not Kernel.EAGER:
        if masked and heads_kv != nh:  # repeat_kv: expand + reshape copies
            k = tp.op(b * skv * qd, k.elem, (k,))
            v = tp.op(b * skv * qd, v.elem, (v,))
            heads_kv = nh
        # create_position_bias_mask: torch.where(mask, position_bias, min) (a new (b, heads, s, kv) tensor)
        fmask = tp.op(scores, bias.elem, (bias,), save=(), grad_to=(bias,), passthrough=False)
        out = bld.attention_core(q, k, v, kern, heads_kv, bias=fmask)
        tp.hold(bias)  # the attention's position_bias local
    else:
        out = bld.attention_core(q, k, v, kern, heads_kv, bias=bias)
    return bld.proj(out, qd, h, "o_proj")


def inkling_moe(bld: _B, n: Tensor) -> Tensor:
    """InklingMoE: the router on an fp32 copy (logits over routed + shared experts; sigmoid, top-k of the routed
    scores plus the correction bias, log-sigmoid weights normalised by logsumexp, times the route scale; cast back),
    the grouped-GEMM routed experts, then InklingSharedExperts: ``bmm`` of the (shared, tokens, hidden) expansion with
    the stacked gate/up weights, ``act(gate) * up * gammas``, ``bmm`` with down, ``.float().sum(0)``, cast back."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, e, k = spec.hidden_size, spec.num_experts, spec.experts_per_token
    shared = spec.inkling[3]
    si = spec.moe_intermediate_size
    t = n.numel // h
    tr = plan.trainable
    x32 = bld.cast(n, 4)
    pg = bld.param_grad("router", (e + shared) * h, 4) if tr else ()
    logits = tp.op(t * (e + shared), 4, (x32,), save=(x32,) if tr else (), params=pg, rg=x32.rg or tr)
    sig = tp.op(t * (e + shared), 4, (logits,), rg=False)
    choice = tp.op(t * e, 4, (sig,), rg=False)
    idx = tp.op(t * k, 8, (choice,), rg=False)
    top = tp.op(t * (k + shared), 4, (logits, idx), save=(idx,) if logits.rg else (), grad_to=(logits,))
    ls = tp.op(top.numel, 4, (top,), save=(top,) if top.rg else ())  # logsigmoid saves its input
    lse = tp.op(t, 4, (ls,), save=(ls,) if ls.rg else ())
    wts = bld.ew(tp.op(top.numel, 4, (ls, lse)), save_out=True)  # exp(...)
    wts = tp.op(top.numel, 4, (wts,))  # * route_scale * global_scale
    wts = bld.cast(wts, n.elem)
    gammas = tp.op(t * shared, n.elem, (wts,))  # [..., -shared:].contiguous()
    w = tp.op(t * k, n.elem, (wts,))  # [..., :top_k].contiguous()
    bld.spec = replace(spec, shared_expert_intermediate_size=0)  # the shared experts follow, as InklingSharedExperts
    try:
        routed = bld.moe(n, routed=(idx, w))
    finally:
        bld.spec = spec
    # shared experts: hidden (shared, t, h) is an expand of n (a view)
    g = bld.linear(n, h, shared * si, "shared_experts.gate_proj", bias=False, trainable=tr)
    u = bld.linear(n, h, shared * si, "shared_experts.up_proj", bias=False, trainable=tr)
    a = bld.activation(g)
    p = bld.mul(bld.mul(a, u), gammas)
    dn = bld.linear(p, si, shared * h, "shared_experts.down_proj", bias=False, trainable=tr)
    d32 = bld.cast(dn, 4)
    sm = tp.op(t * h, 4, (d32,))
    so = bld.cast(sm, n.elem)
    return bld.add(routed, so)


def inkling_layer(bld: _B, x: Tensor) -> Tensor:
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    kernel_size = spec.inkling[2]
    n1 = bld.norm(x, h, tr)
    a = bld.call(lambda v: inkling_attention(bld, v), n1)
    a = short_conv(bld, a, kernel_size)
    hmid = bld.add(x, a)
    n2 = bld.norm(hmid, h, tr)
    if plan.moe:
        m = bld.call(lambda v: inkling_moe(bld, v), n2)
    else:  # InklingMLP: down(act(gate(x)) * up(x)) * global_scale
        m = bld.call(bld.mlp, n2)
        gs = tp.op(1, bld.num.param, (), rg=tr, params=bld.param_grad("mlp.global_scale", 1, bld.num.param)
                   if tr else ())
        m = bld.mul(m, gs)
    m = short_conv(bld, m, kernel_size)
    y = bld.add(hmid, m)
    tp.keep(y)
    return y


def _inkling_text(c: Any, family: str) -> ModelSpec:
    """InklingTextConfig (configuration_inkling.py): layer kinds from ``layer_types`` ("hybrid_sliding" / "hybrid";
    by default every layer whose index + 1 is not a multiple of 6 slides), MLP kinds from ``mlp_layer_types``
    ("dense" / "sparse"; by default every layer sparse)."""
    from .hfconfig import _MAX_LAYERS, _Cfg

    assert isinstance(c, _Cfg)
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    kinds = c.raw.get("layer_types")
    if kinds is None:
        local = set(c.int_list("local_layer_ids")) if c.raw.get("local_layer_ids") is not None else \
            {i for i in range(layers) if (i + 1) % 6}
        kinds = ["hybrid_sliding" if i in local else "hybrid" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) < layers or not set(kinds[:layers]) <= {"hybrid", "hybrid_sliding"}:
        raise ConfigError(f"{c.where}: layer_types must list 'hybrid' or 'hybrid_sliding' for each of the {layers} "
                          "layers")
    mlp_kinds = c.raw.get("mlp_layer_types") or ["sparse"] * layers
    if not isinstance(mlp_kinds, list) or len(mlp_kinds) < layers or \
            not set(mlp_kinds[:layers]) <= {"dense", "sparse"}:
        raise ConfigError(f"{c.where}: mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers")
    if c.raw.get("log_scaling_n_floor") is not None:
        raise ConfigError(f"{c.where}: log_scaling_n_floor (fp32 logit scaling of the full-attention layers) is not "
                          "modelled by estimate; run `vramplan trace` on this config")
    vocab = c.int_("vocab_size")
    unpadded = c.opt_int("unpadded_vocab_size")
    if unpadded is not None and unpadded < vocab:
        raise ConfigError(f"{c.where}: unpadded_vocab_size (logits sliced below the head's rows) is not modelled by "
                          "estimate; run `vramplan trace` on this config")
    if c.raw.get("num_mtp_layers"):
        raise ConfigError(f"{c.where}: multi-token-prediction layers (num_mtp_layers) are not modelled by estimate")
    hidden = c.int_("hidden_size")
    heads, kv, hd = c.int_("num_attention_heads", default=64), c.int_("num_key_value_heads", default=8), \
        c.int_("head_dim", default=128)
    sh, skv, shd = c.int_("swa_num_attention_heads", default=64), c.int_("swa_num_key_value_heads", default=16), \
        c.int_("swa_head_dim", default=128)
    window = c.int_("sliding_window_size", "sliding_window", default=512)
    sliding = tuple(i for i in range(layers) if kinds[i] == "hybrid_sliding")
    moe_layers = tuple(i for i in range(layers) if mlp_kinds[i] == "sparse")
    kernel = c.int_("conv_kernel_size", "sconv_kernel_size", default=4, hi=64)
    shared = c.int_("n_shared_experts", default=2, lo=1, hi=64)
    experts = c.int_("n_routed_experts", "num_local_experts", default=256)
    top_k = c.int_("num_experts_per_tok", default=6)
    if top_k > experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds n_routed_experts ({experts})")
    if sh % skv or heads % kv:
        raise ConfigError(f"{c.where}: attention heads must be a multiple of the key/value heads")
    moe_inter = c.int_("moe_intermediate_size", default=3072)
    spec = ModelSpec(
        name=c.where, family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=c.int_("intermediate_size", default=24576),
        tie_word_embeddings=False, norm=NormKind.RMSNORM, mlp=MLPKind.GATED, activation=c.activation(
            "hidden_act", default="silu"), position=PositionKind.NONE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30), qk_norm=True,
        embedding_layernorm=True, raw_embeds_held=False, head_input_scale=True,
        num_experts=experts, experts_per_token=top_k, moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared * moe_inter, moe_layers=moe_layers,
        sliding_window=window, sliding_layers=sliding,
        layer_overrides=(LayerOverride(layers=sliding, head_dim=shd, num_kv_heads=skv, num_heads=sh),) if sliding
        else (),
        mixers=("inkling",) * layers, attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        program_version="5.24", flash_refused="InklingPreTrainedModel has no FlashAttention path (_supports_flash_attn "
        "False: its relative-position bias needs a float mask)",
        inkling=(c.int_("d_rel", default=16), c.int_("rel_extent", default=1024), kernel, shared),
    )
    # _keep_in_fp32_modules_strict (InklingPreTrainedModel): the four short convolutions, the router's global_scale
    fp32 = sum(kernel * (2 * spec.layer(i).kv_dim + 2 * hidden) + (i in moe_layers) for i in range(layers))
    return replace(spec, extra_params=extra_params(spec, kernel, shared), fp32_params=fp32)


INKLING_READERS = {"inkling_text": _inkling_text}
INKLING_CLASSES = {"InklingForCausalLM": "inkling_text"}
