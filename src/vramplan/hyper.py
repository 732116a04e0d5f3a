"""Hyper-connections: a residual stream of ``hc_mult`` copies of the hidden state (modeling_hy_v4.py, transformers
5.24: ``HYV4HyperConnection``, ``HYV4HyperHead``, ``HYV4DecoderLayer``; the form of DeepSeek-V4's manifold-constrained
hyper-connections without the Sinkhorn-normalised mixing of the copies).

Before each sublayer (attention, MLP) a hyper-connection module reads the (batch, seq, hc_mult, hidden) stream with
autocast off: the flattened copies in fp32, ``F.linear`` with its fp32 ``fn`` (2 x hc_mult outputs) times their
inverse RMS (``HYV4UnweightedRMSNorm`` returns ``rsqrt(mean(x^2) + eps)``), giving per-token ``pre`` and ``post``
weights (sigmoids of scaled logits plus the fp32 ``base``); the sublayer's input is ``sum(pre * streams)`` over the
copies (an fp32 product of the whole stream, summed, cast back). After it, every copy becomes
``(post.float() * out.float() + residual.float()).to(dtype)``: three fp32 stream-sized tensors. The model expands the
embeddings to the copies (``expand(...).contiguous()``) before the first layer, and the HC head collapses them with
one more ``pre`` weighting before the final norm.

The reader of HY-V4 (``hy_v4``) is here too: DeepSeek-V3.2's MLA and DSA indexer (HYV4Indexer: fp32 k_norm and
weights_proj; "shared" layers reuse the previous indexer's top-k), fp32 attention sinks with gpt-oss's eager
attention, a per-channel sigmoid output gate, DeepSeek-V3's sigmoid router (fp32 weight) with a clamped-SwiGLU
grouped-GEMM expert stack and a shared expert, and an fp32 lm_head.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .spec import LayerOverride, ModelSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._engine.tape import Tensor
    from .blocks import _B
    from .hfconfig import _Cfg

__all__ = ["HYPER_CLASSES", "HYPER_READERS", "hc_collapse", "hc_expand", "hc_head_params", "hc_layer",
           "hc_layer_params"]


# ---- parameters ---------------------------------------------------------------------------------------------------

def hc_layer_params(spec: ModelSpec) -> int:
    """The two hyper-connection modules of a layer (attn_hc, ffn_hc): ``fn`` (2 x hc_mult, hc_mult x hidden),
    ``base`` (2 x hc_mult), ``scale`` (2)."""
    n = spec.hc_mult
    return 2 * (2 * n * n * spec.hidden_size + 2 * n + 2) if n else 0


def hc_head_params(spec: ModelSpec) -> int:
    """The HC head: ``hc_fn`` (hc_mult, hc_mult x hidden), ``hc_base`` (hc_mult), ``hc_scale`` (1)."""
    n = spec.hc_mult
    return n * n * spec.hidden_size + n + 1 if n else 0


# ---- memory program -----------------------------------------------------------------------------------------------

def _weights(bld: _B, x: Tensor, outs: int, name: str, trainable: bool) -> tuple[Tensor, Tensor]:
    """``F.linear(flat, fn) * input_norm(flat)`` of the streams ``x`` in fp32: (the fp32 flattened copy, the
    mixes)."""
    tp = bld.tp
    t = x.numel // (bld.spec.hc_mult * bld.spec.hidden_size)
    flat = bld.cast(x, 4)  # hidden_streams.flatten(2).float()
    width = flat.numel // t
    pg = bld.param_grad(name, outs * width, 4) if trainable else ()
    lin = tp.op(t * outs, 4, (flat,), save=(flat,) if trainable else (), params=pg)
    if flat.rg:
        tp.ops[-1].packs_weight = True  # the fp32 fn is saved for the input's gradient
    sq = tp.op(flat.numel, 4, (flat,), save=(flat,) if flat.rg else ())  # x.square() (pow saves its input)
    mean = tp.op(t, 4, (sq,))
    rs = bld.ew(tp.op(t, 4, (mean,)), save_out=True)  # rsqrt(mean + eps) saves its result
    return flat, tp.mul(lin, rs)


def _gate(bld: _B, mixes: Tensor, n: int, name: str, trainable: bool) -> Tensor:
    """``sigmoid(logits * scale + base) (* magnitude) + eps`` of one half of the mixes (fp32, per token and copy)."""
    tp = bld.tp
    t = mixes.numel // (2 * n)
    pg = bld.param_grad(name, 2, 4) if trainable else ()
    v = tp.view(mixes, t * n)
    z = tp.op(t * n, 4, (v,), save=(v,) if trainable else (), params=pg)  # * scale (+ base)
    return tp.op(t * n, 4, (bld.ew(z, save_out=True),))  # sigmoid, + eps


def hc_collapse(bld: _B, x: Tensor, name: str, trainable: bool, post: bool = True) -> tuple[Tensor | None, Tensor]:
    """One hyper-connection module on the streams ``x``: (post weights or None for the head, the collapsed
    (batch, seq, hidden) input cast back to the streams' dtype)."""
    tp, n, h = bld.tp, bld.spec.hc_mult, bld.spec.hidden_size
    t = x.numel // (n * h)
    flat, mixes = _weights(bld, x, 2 * n if post else n, name, trainable)
    pre = _gate(bld, mixes, n, name + ".pre", trainable)
    post_w = _gate(bld, mixes, n, name + ".post", trainable) if post else None
    # (pre.unsqueeze(-1) * hidden_streams): an fp32 stream-sized product, summed over the copies, cast back
    prod = tp.op(t * n * h, 4, (pre, x), save=((x,) if pre.rg else ()) + ((pre,) if x.rg else ()),
                 bwd_scratch=t * n * h * 4 if pre.rg else 0)
    s = tp.op(t * h, 4, (prod,))
    flat.last_use = max(flat.last_use, len(tp.ops) - 1)  # the module's locals live until it returns
    return post_w, bld.cast(s, x.elem)


def hc_mix(bld: _B, post: Tensor, out: Tensor, residual: Tensor) -> Tensor:
    """``(post.float().unsqueeze(-1) * out.float().unsqueeze(-2) + residual.float()).to(dtype)``."""
    tp = bld.tp
    big = residual.numel
    o32 = bld.cast(out, 4)
    # the product broadcasts both inputs to the stream's size: their gradients are summed down from full size
    rg = [t for t in (post, o32) if t.rg]
    m = tp.op(big, 4, (post, o32), save=((o32,) if post.rg else ()) + ((post,) if o32.rg else ()),
              bwd_scratch=sum(big * 4 - t.numel * 4 for t in rg))
    r32 = bld.cast(residual, 4)
    return bld.cast(bld.add(m, r32), residual.elem)


def hc_expand(bld: _B, x: Tensor) -> Tensor:
    """``inputs_embeds.unsqueeze(2).expand(-1, -1, hc_mult, -1).contiguous()``: the stream the layers read."""
    return bld.tp.op(x.numel * bld.spec.hc_mult, x.elem, (x,))


def hc_layer(bld: _B, x: Tensor) -> Tensor:
    """HYV4DecoderLayer.forward: each sublayer between an HC collapse and an HC mix."""
    spec, plan = bld.spec, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    post, c = hc_collapse(bld, x, f"attn_hc{len(bld.tp.ops)}", tr)
    assert post is not None
    a = bld.call(bld.self_attention, bld.norm(c, h, tr))
    x2 = hc_mix(bld, post, a, x)
    post, c = hc_collapse(bld, x2, f"ffn_hc{len(bld.tp.ops)}", tr)
    assert post is not None
    m = bld.call(bld.mlp, bld.norm(c, h, tr))
    y = hc_mix(bld, post, m, x2)
    bld.tp.keep(y)
    return y


# ---- HY-V4's reader -----------------------------------------------------------------------------------------------

# configuration_hy_v4.py HYV4Config's defaults
_HY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 120832, "hidden_size": 2816, "intermediate_size": 6912, "moe_intermediate_size": 768,
    "num_hidden_layers": 34, "num_attention_heads": 32, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 16,
    "hc_mult": 4, "max_position_embeddings": 262144}


def _hy_v4(c: _Cfg, family: str) -> ModelSpec:
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like
    from .params import count_params

    cc = c.with_defaults(_HY_DEFAULTS)
    raw = cc.raw
    layers = cc.int_("num_hidden_layers", hi=_MAX_LAYERS)
    cc.int_("q_lora_rank")  # HYV4Attention always runs q_a_proj / q_b_proj (a null rank does not build)
    kinds = raw.get("indexer_types")
    if kinds is None:  # HYV4Config.__post_init__: layer 0 and every fourth layer from 1 run their own indexer
        kinds = ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) < layers or not set(kinds[:layers]) <= {"full", "shared"} or \
            (layers and kinds[0] != "full"):
        raise ConfigError(f"{c.where}: indexer_types must list 'full' or 'shared' for each of the {layers} layers, "
                          "the first 'full'")
    types = raw.get("layer_types")
    if types is not None and (not isinstance(types, list) or set(types[:layers]) - {"indexed_attention"}):
        raise ConfigError(f"{c.where}: layer_types other than indexed_attention are not modelled for HY-V4; run "
                          "vramplan trace")
    mlp_types = raw.get("mlp_layer_types") or ["dense"] * min(1, layers) + ["sparse"] * max(layers - 1, 0)
    hc = cc.int_("hc_mult", lo=1)
    base = {k: v for k, v in raw.items() if k not in ("indexer_types", "layer_types")}
    base |= {"mlp_layer_types": mlp_types, "num_key_value_heads": raw["num_attention_heads"]}
    facts = _Facts(version="5.24", moe="deepseek", mla=True, dsa=True, mlp_types=1, sinks=True,
                   mla_defaults=(1536, 512, 192, 64, 256))
    spec = _llama_like(_Cfg(base, c.where), family, facts)
    shared = tuple(i for i in range(layers) if kinds[i] == "shared")
    overrides = (LayerOverride(layers=shared, dsa=False, index_shared=True),) if shared else ()
    spec = replace(spec, hc_mult=hc, head_fp32=True, sinks_fp32=True, mla_out_gate=True, index_fp32_weights=True,
                   expert_glu="clamped_silu", layer_overrides=overrides, program_version="5.24")
    # _keep_in_fp32_modules_strict (HYV4PreTrainedModel, HYV4ForCausalLM): the hyper-connections and the HC head, the
    # routers' weights, the indexers' weights_proj and k_norm, the sinks, the lm_head
    h, e = spec.hidden_size, spec.num_experts
    fp32 = layers * hc_layer_params(spec) + hc_head_params(spec) + len(spec.moe_layers) * e * h + \
        layers * spec.num_heads + spec.vocab_size * h + \
        (layers - len(shared)) * (h * spec.index_heads + 2 * spec.index_head_dim)
    spec = replace(spec, fp32_params=fp32)
    count_params(spec)  # reads every layer's spec: fails here, not in the estimate, on an unreadable one
    return spec


HYPER_READERS: dict[str, Callable[[_Cfg, str], ModelSpec]] = {"hy_v4": _hy_v4}
HYPER_CLASSES: dict[str, str] = {"HYV4ForCausalLM": "hy_v4"}
