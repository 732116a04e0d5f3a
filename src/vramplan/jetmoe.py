"""JetMoE (modeling_jetmoe.py, transformers 5.24: JetMoeForCausalLM): a LLaMA-style stack whose attention is a
mixture of attention heads and whose MLP a mixture of experts, both built on JetMoeParallelExperts.

Op for op where the sizes are large:

* routing (JetMoeTopKGating): ``layer(x).float()`` logits, ``topk``, softmax over the k logits cast back, a
  (tokens, experts) scatter of ones whose column sums are read back with ``.tolist()`` (the per-expert token counts:
  balanced under the routing the trace assumes), the (token, expert) pairs sorted by expert, the gates gathered;
* JetMoeParallelExperts: the gathered inputs ``split`` by those counts, one ``F.linear`` per expert on a slice
  ``weight[i]`` of the (experts, out, in) parameter (its gradient scattered into a zero-filled stack-sized buffer,
  select_backward, then accumulated), the outputs ``cat`` together;
* attention (JetMoeMoA): ``map`` gives each token top_k query groups (each ``num_key_value_heads`` heads of
  ``kv_channels``) from its experts' input_linear, put back in token order by ``zeros.index_add``; keys and values
  from one ``kv_proj`` (chunked views); RoPE; the keys and values ``repeat``-ed top_k times (copies) for the
  ``top_k x num_key_value_heads`` query heads; then ``reduce``: each head group gathered in expert order, the expert's
  output_linear, times the gate, ``index_add`` into a (tokens, hidden) zeros, plus a bias;
* the MLP (JetMoeMoE): the same routing, input_linear to ``2 x intermediate_size``, ``act(gate) * up``, output_linear,
  gated, ``index_add``, plus a bias.

JetMoePreTrainedModel.supports_gradient_checkpointing is False: transformers refuses gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._engine.tape import Tensor
from .blocks import _B
from .kinds import MemoryKind
from .params import LayerParams
from .spec import ModelSpec

__all__ = ["JETMOE_CLASSES", "JETMOE_READERS", "jetmoe_layer", "jetmoe_layer_params", "jetmoe_linears"]


def jetmoe_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count) of a layer's weights: the attention experts, its router and kv_proj, the MLP's experts
    and router (the expert stacks are parameters, not nn.Linear: peft's all-linear adapts the other three)."""
    h, e, kvs, i = spec.hidden_size, spec.num_experts, spec.kv_dim, spec.moe_intermediate_size
    return [("experts.input_linear", h, kvs, e), ("experts.output_linear", kvs, h, e),
            ("experts.router.layer", h, e, 1), ("kv_proj", h, 2 * kvs, 1),
            ("mlp.input_linear", h, 2 * i, e), ("mlp.output_linear", i, h, e), ("mlp.router.layer", h, e, 1)]


def jetmoe_adaptable(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """The layer's nn.Linear modules (LoRA targets)."""
    return [lin for lin in jetmoe_linears(spec) if lin[0] in ("experts.router.layer", "kv_proj", "mlp.router.layer")]


def jetmoe_layer_params(spec: ModelSpec) -> LayerParams:
    """The linears, the MoA's and the MoE's output biases, the two RMSNorms."""
    lin = jetmoe_linears(spec)
    attn = sum(i * o * n for name, i, o, n in lin if not name.startswith("mlp."))
    mlp = sum(i * o * n for name, i, o, n in lin if name.startswith("mlp."))
    h = spec.hidden_size
    return LayerParams(attn, mlp, 2 * h, 2 * h, tuple(lin))


def _routing(bld: _B, x: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """JetMoeTopKGating.forward on (tokens, hidden) ``x``: returns (the fp32 logits, index_sorted_experts,
    batch_index, batch_gates)."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, e, k = spec.hidden_size, spec.num_experts, spec.experts_per_token
    t = x.numel // h
    lname = f"{name}.router.layer"
    logits = bld.linear(x, h, e, lname, bias=False, trainable=plan.trainable,
                        lora_rank=plan.lora_rank if lname in plan.lora_targets else 0)
    l32 = bld.cast(logits, 4)
    idx = tp.op(t * k, 8, (l32,), rg=False)  # topk: the indices ...
    top = tp.op(t * k, 4, (l32, idx), save=(idx,) if l32.rg else (), grad_to=(l32,))  # ... and the values
    gates = bld.ew(top, save_out=True)  # softmax(dim=1)
    gates = bld.cast(gates, x.elem)  # .type_as(hidden_states)
    zeros = tp.op(t * e, x.elem, (), rg=False)
    mask = tp.op(t * e, x.elem, (zeros, idx), rg=False)  # scatter(1, top_k_indices, 1)
    counts = tp.op(t * e, 8, (mask,), rg=False)  # .long()
    tp.op(e, 8, (counts,), rg=False)  # .sum(0), read back with .tolist()
    srt = tp.op(t * k, 8, (idx,), rg=False)  # sort: the sorted ids (dropped) ...
    order = tp.op(t * k, 8, (idx,), rg=False)  # ... and index_sorted_experts
    tp.hold(srt)
    batch = tp.op(t * k, 8, (order,), rg=False)  # .div(top_k, rounding_mode="trunc")
    bg = tp.op(t * k, gates.elem, (gates, order), save=(order,) if gates.rg else (), grad_to=(gates,))
    return l32, order, batch, bg


def _experts(bld: _B, x: Tensor, fin: int, fout: int, name: str) -> Tensor:
    """JetMoeParallelExperts.forward on the (pairs, fin) gathered inputs: ``split`` views, one F.linear per expert on
    ``weight[i]`` (its gradient a stack-sized zero-filled buffer, then accumulated), ``cat`` of the outputs (which die
    when the module returns)."""
    spec, tp, plan, num = bld.spec, bld.tp, bld.plan, bld.num
    assert plan is not None
    e = spec.num_experts
    rows = x.numel // fin
    per = [rows // e + (1 if j < rows % e else 0) for j in range(e)]  # the balanced counts the trace answers
    tr = plan.trainable
    stack = fin * fout * e * num.param
    outs = []
    for n in per:
        xi = tp.view(x, n * fin)
        y = bld.linear(xi, fin, fout, name, bias=False, trainable=tr, quant=plan.quant)
        if tr and num.training:
            tp.ops[-1].params = bld.param_grad(name, fin * fout * e, num.param)
            tp.ops[-1].bwd_scratch += stack
        outs.append(y)
    res = tp.op(rows * fout, outs[0].elem if outs else x.elem, tuple(outs), grad_to=tuple(outs))
    return res


def _moa(bld: _B, n: Tensor) -> Tensor:
    """JetMoeAttention.forward: map (experts' query projections), kv_proj, RoPE, the cache, repeated keys and
    values, attention over top_k x num_key_value_heads heads, reduce (experts' output projections)."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, k, kvs = spec.hidden_size, spec.experts_per_token, spec.kv_dim
    b, s, skv = bld.b, bld.s, bld.kv_len
    t = b * s
    act = n.elem
    logits, order, batch, bg = _routing(bld, n, "experts")
    xin = tp.op(t * k * h, act, (n, batch), save=(batch,) if n.rg else (), grad_to=(n,))  # layer_input[batch_index]
    qe = _experts(bld, xin, h, kvs, "experts.input_linear")
    zq = tp.op(t * k * kvs, qe.elem, (), rg=False)
    # index_add: its backward (derivatives.yaml: grad.index_select(dim, index).expand_as(source)) keeps the source too
    q = tp.op(t * k * kvs, qe.elem, (zq, qe, order), save=(order, qe) if qe.rg else (), grad_to=(qe,))
    tp.hold(xin, qe, zq)  # map's locals (expert_inputs, expert_outputs, zeros) until it returns
    kv = bld.proj(n, h, 2 * kvs, "kv_proj")
    kk, vv = tp.split(kv, 2)  # chunk(2, dim=-1)
    q = bld.call(bld.rope, q)
    kk = bld.call(bld.rope, kk)
    if not bld.num.training:  # DynamicCache.update: torch.cat copies of the keys and values
        kk = tp.op(b * skv * kvs, kk.elem, (kk,), kind=MemoryKind.KV_CACHE)
        vv = tp.op(b * skv * kvs, vv.elem, (vv,), kind=MemoryKind.KV_CACHE)
        tp.keep(kk, vv)
    kr = tp.op(b * skv * kvs * k, kk.elem, (kk,))  # key_states.repeat(1, top_k, 1, 1)
    vr = tp.op(b * skv * kvs * k, vv.elem, (vv,))
    out = bld.attention_core(q, kr, vr, bld.kernel_for(False), spec.num_heads)
    # reduce: the (tokens x top_k, kv width) heads gathered in expert order, output_linear, times the gates
    gi = tp.op(t * k * kvs, out.elem, (out, order), save=(order,) if out.rg else (), grad_to=(out,))
    oe = _experts(bld, gi, kvs, h, "experts.output_linear")
    o, zo = _combine(bld, oe, bg, batch, t, act, "experts.bias")
    # reduce's locals (expert_inputs, zeros, the index_add result) and the attention output (``attn_output``, rebound
    # to reduce's return) until reduce returns; router_logits, returned to the decoder layer, held in ``_``
    tp.hold(gi, zo, out, logits)
    return o


def _combine(bld: _B, x: Tensor, gates: Tensor, batch: Tensor, t: int, act: int, bias: str) -> tuple[Tensor, Tensor]:
    """The experts' outputs ``x`` times their gates, index_add-ed into a zeros tensor of the ``t`` tokens (both MoA's
    reduce and the MoE), plus the layer's ``bias``: (the result, the zeros, which the caller's frame holds)."""
    tp, h = bld.tp, bld.spec.hidden_size
    xg = bld.mul(x, gates)
    zo = tp.op(t * h, act, (), rg=False)
    o = tp.op(t * h, act, (zo, xg, batch), save=(batch, xg) if xg.rg else (), grad_to=(xg,))  # index_add
    return _bias(bld, o, bias), zo


def _bias(bld: _B, x: Tensor, name: str) -> Tensor:
    """``layer_output + self.bias``: a new tensor; the bias's gradient is a sum of the output's."""
    plan = bld.plan
    assert plan is not None
    h = bld.spec.hidden_size
    tr = plan.trainable
    return bld.tp.op(x.numel, x.elem, (x,), params=bld.param_grad(name, h, bld.num.param) if tr else (),
                     rg=x.rg or tr)


def _moe(bld: _B, n: Tensor) -> Tensor:
    """JetMoeMoE.forward."""
    spec, tp = bld.spec, bld.tp
    h, k, i = spec.hidden_size, spec.experts_per_token, spec.moe_intermediate_size
    t = n.numel // h
    act = n.elem
    _logits, _order, batch, bg = _routing(bld, n, "mlp")
    xin = tp.op(t * k * h, act, (n, batch), save=(batch,) if n.rg else (), grad_to=(n,))
    gu = _experts(bld, xin, h, 2 * i, "mlp.input_linear")
    g, u = tp.split(gu, 2)  # chunk(2, dim=-1)
    p = bld.mul(bld.activation(g), u)
    d = _experts(bld, p, i, h, "mlp.output_linear")
    y, zo = _combine(bld, d, bg, batch, t, act, "mlp.bias")
    # JetMoeMoE.forward's locals until it returns: expert_inputs, the input_linear output (``chunked_hidden_states``
    # holds its two halves), zeros
    tp.hold(xin, gu, zo)
    return y


def jetmoe_layer(bld: _B, x: Tensor) -> Tensor:
    """JetMoeDecoderLayer.forward: pre-norm residual blocks of the MoA attention and the MoE MLP."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    a = bld.call(lambda v: _moa(bld, v), bld.norm(x, h, tr))
    hmid = bld.add(x, a)
    m = bld.call(lambda v: _moe(bld, v), bld.norm(hmid, h, tr))
    y = bld.add(hmid, m)
    tp.keep(y)
    return y


def _jetmoe(c: Any, family: str) -> ModelSpec:
    """JetMoeConfig (configuration_jetmoe.py): ``num_attention_heads = num_key_value_heads * num_experts_per_tok``
    heads of ``kv_channels``; every layer's MLP is the MoE of ``intermediate_size``-wide experts."""
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like

    assert isinstance(c, _Cfg)
    kvh = c.int_("num_key_value_heads", default=16)
    k = c.int_("num_experts_per_tok", default=2)
    e = c.int_("num_local_experts", default=8)
    if not 0 < k <= e:
        from .errors import ConfigError

        raise ConfigError(f"{c.where}: num_experts_per_tok ({k}) must be between 1 and num_local_experts ({e})")
    raw = dict(c.raw)
    raw.update(num_attention_heads=kvh * k, num_key_value_heads=kvh, head_dim=c.int_("kv_channels", default=128),
               hidden_act=raw.get("activation_function", "silu"),
               tie_word_embeddings=c.bool_("tie_word_embeddings", default=True))
    spec = _llama_like(_Cfg(raw, c.where), family, _Facts(version="5.24"))
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    return replace(spec, num_kv_heads=kvh, num_experts=e, experts_per_token=k,
                   moe_intermediate_size=c.int_("intermediate_size"), moe_layers=tuple(range(layers)), moa=True,
                   gradient_checkpointing=False)


JETMOE_READERS = {"jetmoe": _jetmoe}
JETMOE_CLASSES = {"JetMoeForCausalLM": "jetmoe"}
