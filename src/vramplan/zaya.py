"""ZAYA (modeling_zaya.py, transformers 5.24: ZayaForCausalLM), the whole stack as one program (its routers carry a
state from layer to layer).

Op for op where the sizes are large:

* the embeddings ``((inputs_embeds + bias) * scale).to(float32)``: the residual stream is fp32 through the stack; each
  sublayer's input is cast to the norm's dtype first, and the final norm runs on the cast stream;
* Compressed Convolutional Attention (ZayaCCAProjection): q and k projections concatenated, a residual
  ``(q + repeat_kv(k)) * 0.5`` (and its per-group mean for the keys), the concatenation padded and run through a
  depthwise then a grouped causal convolution, sliced and added to the residuals; values half from the current token
  (``v_proj_current``), half from the previous one (``v_proj_delayed`` shifted by a ``cat``); then the L2 q/k norm
  (ZayaQKNorm: ``x * (sqrt(d) / x.norm().clamp_min(eps))``, keys times a per-head ``temp``), partial RoPE, attention;
* ZayaResidualScaling after each sublayer: ``(h + b) * s`` on the sublayer output, ``(r + b') * s'`` on the fp32
  residual, their sum fp32;
* the router (ZayaRouter): ``down_proj`` to ``router_hidden_size``, plus the previous layer's router state times a
  scale (every layer after the first), that state's ``clone`` for the next layer, the router MLP (norm, two GELU
  linears, ``out_proj`` to experts + 1), softmax, top-k of the biased fp32 copy, gather, the skip expert masked;
* ZayaExperts under ``use_experts_implementation``: transformers' grouped_mm experts on every routed pair (a pick of
  the skip expert is sent to expert 0 with weight 0), as blocks.moe records it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._engine.tape import Tape, Tensor
from .blocks import _B, LayerPlan, Numerics, resid_elem
from .errors import ConfigError
from .kinds import MemoryKind
from .params import LayerParams
from .spec import ModelSpec

__all__ = ["ZAYA_CLASSES", "ZAYA_READERS", "build_body", "zaya_layer_params", "zaya_linears"]


def zaya_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count) of a decoder layer's weights (every layer has the same): CCA's projections, o_proj,
    the router's linears and the expert stacks."""
    h, q, kv, r = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.zaya[0]
    e, i = spec.num_experts, spec.moe_intermediate_size
    return [("q_proj", h, q, 1), ("k_proj", h, kv, 1), ("v_proj_current", h, kv // 2, 1),
            ("v_proj_delayed", h, kv // 2, 1), ("o_proj", q, h, 1),
            ("down_proj", h, r, 1), ("fc1", r, r, 1), ("fc2", r, r, 1), ("out_proj", r, e + 1, 1),
            ("experts.gate_up_proj", h, 2 * i, e), ("experts.down_proj", i, h, e)]


def zaya_layer_params(spec: ModelSpec, index: int) -> LayerParams:
    """Linears; biases (the router's down_proj, fc1, fc2); the convolutions' weights and biases, the key temperatures,
    the two residual scalings, the router-state scale (layers after the first), the router MLP's norm and the layer's
    two norms."""
    lin = zaya_linears(spec)
    h, q, kv, r = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.zaya[0]
    t0, t1 = spec.zaya[1], spec.zaya[2]
    c = q + kv
    groups = spec.num_heads + spec.num_kv_heads
    attn = sum(i * o * n for name, i, o, n in lin[:5])
    mlp = sum(i * o * n for name, i, o, n in lin[5:])
    bias = 3 * r
    other = c * t0 + c + c * (c // groups) * t1 + c + spec.num_kv_heads + 2 * 4 * h + (r if index > 0 else 0) + r
    return LayerParams(attn, mlp, bias, 2 * h + other, tuple(lin))


class _Scoped(_B):
    """Parameter gradients named by layer (the whole stack is one tape)."""

    index = -1

    def param_grad(self, name: str, numel: int, elem: int) -> tuple[tuple[int, int], ...]:
        return ((hash(("zaya", self.index, name)), numel * elem),)


class _Layer:
    def __init__(self, bld: _B) -> None:
        self.bld = bld
        self.tp = bld.tp

    def param(self, numel: int, name: str) -> Tensor:
        bld = self.bld
        tr = bld.plan is not None and bld.plan.trainable
        return self.tp.op(numel, bld.num.param, (), params=bld.param_grad(name, numel, bld.num.param) if tr else (),
                          rg=tr)

    def lin(self, x: Tensor, fin: int, fout: int, name: str, bias: bool = False) -> Tensor:
        return self.bld.proj(x, fin, fout, name, bias)

    def scaled(self, x: Tensor, name: str, out_elem: int | None = None) -> Tensor:
        """``(x + bias) * scale`` with (hidden,) parameters in the model dtype."""
        bld, tp = self.bld, self.tp
        h = bld.spec.hidden_size
        y = tp.op(x.numel, x.elem, (x, self.param(h, name + "_bias")))
        sc = self.param(h, name + "_scale")
        return tp.op(x.numel, out_elem or y.elem, (y, sc), save=((y,) if sc.rg else ()) + ((sc,) if y.rg else ()))

    def cca(self, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ZayaCCAProjection.forward without a cache: (query, key, value)."""
        bld, tp = self.bld, self.tp
        spec = bld.spec
        h, qd, kvd = spec.hidden_size, spec.q_dim, spec.kv_dim
        b, s = bld.b, bld.s
        t0, t1 = spec.zaya[1], spec.zaya[2]
        pad = (t0 - 1) + (t1 - 1)
        c = qd + kvd
        pq = self.lin(n, h, qd, "q_proj")
        pk = self.lin(n, h, kvd, "k_proj")
        qk = tp.op(b * s * c, pq.elem, (pq, pk))  # cat([q, k], -1)
        kr = tp.op(b * s * qd, pk.elem, (pk,)) if spec.num_heads != spec.num_kv_heads else pk  # repeat_kv copies
        qr = tp.op(b * s * qd, pq.elem, (pq, kr))  # query_residual + key_residual
        qr = tp.op(qr.numel, qr.elem, (qr,))  # * 0.5
        kres = tp.op(b * s * kvd, qr.elem, (qr,))  # .view(..., groups, d).mean(-2)
        padded = tp.op(b * c * (s + pad), qk.elem, (qk,))  # F.pad(qk.transpose(1, 2), (pad, 0))
        tr = bld.plan is not None and bld.plan.trainable
        conv1 = tp.op(b * c * (s + pad - (t0 - 1)), qk.elem, (padded,), save=(padded,) if (padded.rg or tr) else (),
                      params=bld.param_grad("conv_qk_depthwise", c * t0 + c, bld.num.param) if tr else (),
                      rg=padded.rg or tr)
        conv2 = tp.op(b * c * s, qk.elem, (conv1,), save=(conv1,) if (conv1.rg or tr) else (),
                      params=bld.param_grad("conv_qk_grouped", c * (c // (spec.num_heads + spec.num_kv_heads)) * t1
                                            + c, bld.num.param) if tr else (), rg=conv1.rg or tr)
        q = tp.op(b * s * qd, qk.elem, (tp.view(conv2, b * s * qd), qr))
        k = tp.op(b * s * kvd, qk.elem, (tp.view(conv2, b * s * kvd), kres))
        vc = self.lin(n, h, kvd // 2, "v_proj_current")
        vd = self.lin(n, h, kvd // 2, "v_proj_delayed")
        zeros = tp.op(b * h, n.elem, (), rg=False)  # hidden_states.new_zeros(batch, 1, hidden)
        rec = self.lin(zeros, h, kvd // 2, "v_proj_delayed")
        vdel = tp.op(b * s * kvd // 2, vd.elem, (rec, vd))  # cat([recurrent, delayed[:, :-1]], dim=1)
        v = tp.op(b * s * kvd, vc.elem, (vc, vdel))  # cat([current, delayed], -1)
        tp.hold(qk, pq, pk)  # the projection's locals until it returns
        return q, k, v

    def l2(self, x: Tensor, heads: int) -> Tensor:
        """``x * (sqrt(d) / x.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))``."""
        tp = self.tp
        rows = x.numel // self.bld.spec.head_dim
        nrm = tp.op(rows, x.elem, (x,), save=(x,) if x.rg else ())
        if nrm.rg:
            tp.save_output(nrm)
        cl = tp.op(rows, x.elem, (nrm,), save=(nrm,) if nrm.rg else ())
        f = tp.op(rows, x.elem, (cl,), save=(cl,) if cl.rg else ())
        return tp.op(x.numel, x.elem, (x, f), save=((x,) if f.rg else ()) + ((f,) if x.rg else ()))

    def attention(self, n: Tensor) -> Tensor:
        bld, tp = self.bld, self.tp
        spec = bld.spec
        h, qd, kvd = spec.hidden_size, spec.q_dim, spec.kv_dim
        b, skv = bld.b, bld.kv_len
        q, k, v = self.cca(n)
        q = self.l2(q, spec.num_heads)
        k = self.l2(k, spec.num_kv_heads)
        temp = self.param(spec.num_kv_heads, "temp")
        k = tp.op(k.numel, k.elem, (k, temp), save=((k,) if temp.rg else ()) + ((temp,) if k.rg else ()))
        q = bld.call(bld.rope, q)
        k = bld.call(bld.rope, k)
        if not bld.num.training:  # DynamicCache.update: torch.cat copies
            k = tp.op(b * skv * kvd, k.elem, (k,), kind=MemoryKind.KV_CACHE)
            v = tp.op(b * skv * kvd, v.elem, (v,), kind=MemoryKind.KV_CACHE)
            tp.keep(k, v)
        out = bld.attention_core(q, k, v, bld.kernel_for(False), spec.num_kv_heads)
        return self.lin(out, qd, h, "o_proj")

    def router(self, n: Tensor, state: Tensor | None, first: bool) -> tuple[Tensor, Tensor, Tensor]:
        """ZayaRouter.forward: (top-k indices, weights, the next layer's router state)."""
        bld, tp = self.bld, self.tp
        spec = bld.spec
        h, r, e, k = spec.hidden_size, spec.zaya[0], spec.num_experts, spec.experts_per_token
        t = n.numel // h
        rh = self.lin(n, h, r, "down_proj", True)
        if not first and state is not None:
            sc = self.param(r, "router_states_scale")
            m = tp.op(rh.numel, rh.elem, (state, sc), save=((state,) if sc.rg else ()) + ((sc,) if state.rg else ()))
            rh = bld.add(rh, m)
        nxt = tp.op(rh.numel, rh.elem, (rh,))  # [:, -seq:].clone()
        x = bld.norm(rh, r, bld.plan is not None and bld.plan.trainable)
        x = bld.ew(self.lin(x, r, r, "fc1", True), save_in=True)  # GELU saves its input
        x = bld.ew(self.lin(x, r, r, "fc2", True), save_in=True)
        logits = self.lin(x, r, e + 1, "out_proj")
        probs = bld.ew(logits, save_out=True)  # softmax
        biased = tp.op(t * (e + 1), 4, (probs,), rg=False)  # detach().float() + balancing_biases
        idx = tp.op(t * k, 8, (biased,), rg=False)  # topk
        w = tp.op(t * k, probs.elem, (probs, idx), save=(idx,) if probs.rg else (), grad_to=(probs,))  # gather
        skip = tp.op(t * k, 1, (idx,), rg=False)  # router_indices == num_experts
        w = tp.op(t * k, w.elem, (w, skip), save=(skip,) if w.rg else (), grad_to=(w,))  # masked_fill
        idx = tp.op(t * k, 8, (idx, skip), rg=False)
        tp.hold(rh)
        return idx, w, nxt

    def layer(self, r32: Tensor, state: Tensor | None, first: bool) -> tuple[Tensor, Tensor]:
        """ZayaDecoderLayer.forward on the fp32 residual stream: (the new residual, the router state)."""
        bld = self.bld
        spec, plan = bld.spec, bld.plan
        assert plan is not None
        h, tr = spec.hidden_size, plan.trainable
        dt = bld.num.norm_param
        a = bld.call(self.attention, bld.norm(bld.cast(r32, dt), h, tr))
        r1 = bld.add(self.scaled(a, "post_attention_residual_scale.hidden_states"),
                     self.scaled(r32, "post_attention_residual_scale.residual"))
        n2 = bld.norm(bld.cast(r1, dt), h, tr)
        idx, w, nxt = self.router(n2, state, first)
        # ZayaExperts is decorated with use_experts_implementation: transformers 5.24 runs grouped_mm_experts_forward
        # on the routed pairs (a skip-expert pick is expert 0 with weight 0), not the module's loop
        m = bld.moe(n2, routed=(idx, w))
        bld.tp.hold(n2)  # the layer's ``hidden_states`` until rebound to the MoE block's output
        r2 = bld.add(self.scaled(m, "post_mlp_residual_scale.hidden_states"),
                     self.scaled(r1, "post_mlp_residual_scale.residual"))
        return r2, nxt


def build_body(tp: Tape, spec: ModelSpec, num: Numerics, plan: LayerPlan, batch: int, seq: int,
               kv_len: int | None = None, ckpt_every: int = 0) -> Tensor:
    """ZayaModel.forward from inputs_embeds to the final norm: the embeddings scaled and cast to fp32, every layer
    (the router state passed on), ``norm(hidden.to(norm dtype))``."""
    h, t = spec.hidden_size, batch * seq
    x = tp.input(t * h, resid_elem(num), plan.input_rg)
    bld = _B(tp, spec, num, batch, seq, plan, kv_len)
    r = bld.cast(_Layer(bld).scaled(x, "input_hidden_states"), 4)
    state: Tensor | None = None
    for i in range(spec.num_layers):
        lb = _Scoped(tp, spec, num, batch, seq, plan, kv_len)
        lb.index = i
        with tp.checkpoint(bool(ckpt_every) and i % ckpt_every == 0):
            new, nxt = _Layer(lb).layer(r, state, i == 0)
        r.last_use = max(r.last_use, len(tp.ops) - 1)
        if state is not None:
            state.last_use = max(state.last_use, len(tp.ops) - 1)
        r, state = new, nxt
    y = bld.norm(bld.cast(r, num.norm_param), h, plan.trainable)
    tp.hold(x)
    tp.keep(y)
    return y


def _zaya(c: Any, family: str) -> ModelSpec:
    """ZayaConfig (configuration_zaya.py): every layer CCA attention and a MoE of ``num_experts`` (plus the skip
    expert) with a ``router_hidden_size`` router MLP; partial rotary per layer type."""
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like

    assert isinstance(c, _Cfg)
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    kinds = c.raw.get("layer_types") or ["hybrid"] * layers
    if c.raw.get("sliding_window") is not None and "hybrid_sliding" in kinds[:layers]:
        raise ConfigError(f"{c.where}: ZAYA's sliding-window layers are not modelled by estimate; run vramplan trace")
    rope = c.raw.get("rope_parameters") or {}
    frac = 0.5
    if isinstance(rope, dict) and isinstance(rope.get("hybrid"), dict):
        frac = float(rope["hybrid"].get("partial_rotary_factor", 1.0))
    raw = dict(c.raw)
    raw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": frac},
               layer_types=None, sliding_window=None, intermediate_size=c.int_("moe_intermediate_size"))
    spec = _llama_like(_Cfg(raw, c.where), family, _Facts(version="5.24"))
    e, k = c.int_("num_experts", default=16), c.int_("num_experts_per_tok", default=1)
    if k != 1:  # ZayaConfig.validate_architecture
        raise ConfigError(f"{c.where}: ZAYA supports num_experts_per_tok 1 only (transformers refuses {k})")
    if spec.kv_dim % 2:
        raise ConfigError(f"{c.where}: ZAYA splits each value head in halves: num_key_value_heads x head_dim must be "
                          "even")
    r = c.int_("router_hidden_size", default=256)
    spec = replace(spec, num_experts=e, experts_per_token=k, moe_intermediate_size=c.int_("moe_intermediate_size"),
                   moe_layers=tuple(range(layers)), final_norm=False, rotary_fraction=frac,
                   zaya=(r, c.int_("cca_time0", default=2), c.int_("cca_time1", default=2)),
                   extra_params=3 * spec.hidden_size)  # the embeddings' input scale and bias, the final norm (the
    # program's own: final_norm False keeps the head from norming again)
    return spec


ZAYA_READERS = {"zaya": _zaya}
ZAYA_CLASSES = {"ZayaForCausalLM": "zaya"}
