"""MiniMax-Text-01 (``model_type`` ``minimax``): lightning (linear) attention layers beside softmax attention, a
Mixtral MoE in every layer, and residuals taken from the normed input.

transformers 5.24 ``models/minimax/modeling_minimax.py``:

* ``MiniMaxDecoderLayer``: ``h = input_layernorm(x)``; ``h = h * attn_alpha + attn(h) * attn_beta``; ``h =
  post_attention_layernorm(h)``; ``h * mlp_alpha + moe(h) * mlp_beta`` (the residual is the *normed* stream; each
  ``* factor`` is a new tensor, Python factors of 1 included).
* ``MiniMaxLightningAttention`` (mixer ``"lightning"``): ``silu(qkv_proj(x))`` split per head into q, k, v (strided
  views), then a Python loop over blocks of ``block_size`` (256) tokens: the intra-block scores ``q k^T`` (batch,
  heads, block, block) times the fixed decay matrix, times v; the inter-block ``(q * q_decay) @ kv`` with the
  running (batch, heads, d, d) state ``kv``; their sum appended to a list; ``kv = kv * block_decay + (k * k_decay)^T
  @ v``. ``torch.cat`` of the blocks, a transpose-reshape copy, an RMSNorm over all heads, ``sigmoid(output_gate(x))
  *`` that, ``out_proj``. ``matmul`` of these strided 4-D views copies them into bmm's 3-D operands, which bmm
  saves. There is no fused kernel. Generation cache: the final ``kv`` state per lightning layer (activation dtype),
  whatever the length; the softmax layers keep a growing KV cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kinds import MemoryKind

if TYPE_CHECKING:
    from ._engine.tape import Tensor
    from .blocks import _B
    from .spec import ModelSpec

__all__ = ["lightning_extra_params", "lightning_linears", "lightning_state_bytes", "minimax_layer"]

KV = MemoryKind.KV_CACHE


def lightning_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """qkv_proj, output_gate and out_proj (no biases)."""
    h, hd = spec.hidden_size, spec.q_dim
    return [("qkv_proj", h, 3 * hd, 1), ("output_gate", h, hd, 1), ("out_proj", hd, h, 1)]


def lightning_extra_params(spec: ModelSpec) -> int:
    """The RMSNorm over all heads' outputs."""
    return spec.q_dim


def lightning_state_bytes(spec: ModelSpec, batch: int, act: int) -> int:
    """One lightning layer's cache: the (batch, heads, d, d) key-value state."""
    return batch * spec.num_heads * spec.head_dim * spec.head_dim * act


def _lightning(bld: _B, n: Tensor) -> Tensor:
    spec, tp, num = bld.spec, bld.tp, bld.num
    h, heads, d, hd = spec.hidden_size, spec.num_heads, spec.head_dim, spec.q_dim
    b, s, t = bld.b, bld.s, bld.t
    blk = spec.lightning_block
    proj = bld.proj(n, h, 3 * hd, "qkv_proj")
    qkv = bld.activation(proj)  # act_fn(qkv_proj(x)): silu saves its input
    e = qkv.elem
    kv = tp.op(b * heads * d * d, e, (), rg=False)  # torch.zeros(batch, heads, d, d)
    outs: list[Tensor] = []
    start = 0
    while start < s:
        bs = min(blk, s - start)
        rows = b * heads * bs
        q = tp.view(qkv, rows * d)
        k = tp.view(qkv, rows * d)
        v = tp.view(qkv, rows * d)
        # q @ k^T: matmul copies the strided (batch, heads, block, d) views into bmm operands, which bmm saves
        qc = tp.op(rows * d, e, (q,), passthrough=True)
        kc = tp.op(rows * d, e, (k,), passthrough=True)
        sc = tp.op(rows * bs, e, (qc, kc), save=(qc, kc) if (qc.rg or kc.rg) else ())
        sd = tp.op(rows * bs, e, (sc,))  # * diagonal_decay (a buffer: only it is saved)
        vc = tp.op(rows * d, e, (v,), passthrough=True)
        intra = tp.op(rows * d, e, (sd, vc), save=(sd, vc) if (sd.rg or vc.rg) else ())
        qd = tp.op(rows * d, e, (q,))  # q * query_decay
        inter = tp.op(rows * d, e, (qd, kv), save=(qd, kv) if (qd.rg or kv.rg) else ())
        outs.append(bld.add(inter, intra))
        kd = tp.op(rows * d, e, (k,))  # k * key_decay, transposed
        kdc = tp.op(rows * d, e, (kd,), passthrough=True)  # matmul's copy of the transposed view
        vc2 = tp.op(rows * d, e, (v,), passthrough=True)
        nxt = tp.op(b * heads * d * d, e, (kdc, vc2), save=(kdc, vc2) if (kdc.rg or vc2.rg) else ())
        start += bs
        # kv * block_decay + next; the last is the cache (cache.set_linear_cache) at inference
        kv = tp.op(kv.numel, e, (tp.op(kv.numel, e, (kv,)), nxt), kind=KV if start >= s and not num.training else
                   MemoryKind.ACTIVATIONS)
        tp.ops[-1].add_like = True
    if not num.training:
        tp.keep(kv)
    cat = tp.op(t * hd, e, tuple(outs), passthrough=True)  # torch.cat(dim=-2)
    tp.hold(*outs)
    flat = tp.op(t * hd, e, (cat,), passthrough=True)  # transpose(1, 2).reshape: a copy
    normed = bld.norm(flat, hd, bld.plan.trainable if bld.plan is not None else False)
    gate = bld.ew(bld.proj(n, h, hd, "output_gate"), save_out=True)  # sigmoid saves its result
    return bld.proj(bld.mul(gate, normed), hd, h, "out_proj")


def minimax_layer(bld: _B, x: Tensor) -> Tensor:
    """``MiniMaxDecoderLayer.forward``: residuals from the normed stream, each scaled by its factor."""
    spec, tp, plan = bld.spec, bld.tp, bld.plan
    assert plan is not None
    h, tr = spec.hidden_size, plan.trainable
    n1 = bld.norm(x, h, tr)
    a = bld.call((lambda v: _lightning(bld, v)) if plan.mixer == "lightning" else bld.self_attention, n1)
    r1 = tp.op(n1.numel, n1.elem, (n1,))  # residual * attn_alpha_factor
    a2 = tp.op(a.numel, a.elem, (a,))  # hidden_states * attn_beta_factor
    hmid = bld.add(r1, a2)
    n2 = bld.norm(hmid, h, tr)
    m = bld.call(bld.mlp, n2)
    r2 = tp.op(n2.numel, n2.elem, (n2,))  # residual * mlp_alpha_factor
    m2 = tp.op(m.numel, m.elem, (m,))
    y = bld.add(r2, m2)
    tp.keep(y)
    return y
