"""Text encoders of diffusion pipelines, recorded op by op (transformers 5.x ``modeling_clip.py``,
``modeling_t5.py``).

CLIP: token + position embeddings, pre-LayerNorm blocks (q/k/v/out projections with bias, SDPA with
the causal mask: the memory-efficient kernel), an MLP with quick-GELU (OpenAI CLIP-L) or GELU
(OpenCLIP), a final LayerNorm and, for ``CLIPTextModelWithProjection``, a bias-free projection. T5
v1.1 encoder: RMS norms computed in fp32, eager attention with the relative position bias added to the
(B, H, S, S) scores and an fp32 softmax, a gated-GELU feed-forward. Pipelines run them at 77 (CLIP)
or 256/512 (T5) tokens, so their weights, not their activations, are what matters.
"""

from __future__ import annotations

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import TextEncoderSpec

__all__ = ["build_text_encoder"]


def _clip(L: Layers, s: TextEncoderSpec, ids: Tensor, b: int, p: str, tr: bool, lora: int) -> Tensor:
    d, n = s.hidden_size, s.max_length
    elem = L.num.param if not L.num.amp else 4
    L.register(p + "embeddings.token_embedding", (s.vocab_size * d,), tr)
    L.register(p + "embeddings.position_embedding", (s.max_length * d,), tr)
    tok = L.op(b * n * d, elem, (ids,), rg=tr, params=L.param(p + "embeddings.token_embedding", s.vocab_size * d, tr))
    h = L.op(b * n * d, elem, (tok,), rg=tr, passthrough=True,
             params=L.param(p + "embeddings.position_embedding", s.max_length * d, tr))
    mask = L.op(b * n * n, 4, (), rg=False)  # 4-D causal mask
    heads = s.num_heads
    for i in range(s.num_layers):
        q = f"{p}encoder.layers.{i}."
        x = h
        a = L.layer_norm(h, d, trainable=tr, name=q + "layer_norm1")
        qq = L.linear(a, d, d, q + "self_attn.q_proj", trainable=tr, lora_rank=lora)
        kk = L.linear(a, d, d, q + "self_attn.k_proj", trainable=tr)
        vv = L.linear(a, d, d, q + "self_attn.v_proj", trainable=tr, lora_rank=lora)
        o = L.attention(L.view(qq), L.view(kk), L.view(vv), batch=b, heads=heads, sq=n, sk=n, head_dim=d // heads,
                        has_mask=True)
        L.hold(mask)
        o = L.linear(o, d, d, q + "self_attn.out_proj", trainable=tr)
        h = L.add(x, o)
        x = h
        m = L.layer_norm(h, d, trainable=tr, name=q + "layer_norm2")
        f = L.linear(m, d, s.intermediate_size, q + "mlp.fc1", trainable=tr)
        if s.activation == "quick_gelu":  # x * sigmoid(1.702 x)
            sg = L.unary(L.scale(f), save_out=True)
            f = L.mul(f, sg)
        else:
            f = L.gelu(f)
        f = L.linear(f, s.intermediate_size, d, q + "mlp.fc2", trainable=tr)
        h = L.add(x, f)
    h = L.layer_norm(h, d, trainable=tr, name=p + "final_layer_norm")
    if s.projection_dim:
        pooled = L.op(b * d, h.elem, (h,))
        L.hold(h)
        L.linear(pooled, d, s.projection_dim, p + "text_projection", bias=False, trainable=tr)
    return h


def _t5(L: Layers, s: TextEncoderSpec, ids: Tensor, b: int, p: str, tr: bool) -> Tensor:
    d, n, heads, dk = s.hidden_size, s.max_length, s.num_heads, s.head_dim
    inner = heads * dk
    elem = L.num.param if not L.num.amp else 4
    L.register(p + "shared", (s.vocab_size * d,), tr)
    h = L.op(b * n * d, elem, (ids,), rg=tr, params=L.param(p + "shared", s.vocab_size * d, tr))
    L.register(p + "block.0.layer.0.SelfAttention.relative_attention_bias", (s.relative_buckets * heads,), tr)
    bias = L.op(heads * n * n, elem, (), rg=tr)  # position_bias (1, H, S, S), computed once, reused by every layer
    for i in range(s.num_layers):
        q = f"{p}encoder.block.{i}.layer."
        x = h
        a = L.rms_norm(h, d, trainable=tr, name=q + "0.layer_norm")
        qq = L.linear(a, d, inner, q + "0.SelfAttention.q", bias=False, trainable=tr)
        kk = L.linear(a, d, inner, q + "0.SelfAttention.k", bias=False, trainable=tr)
        vv = L.linear(a, d, inner, q + "0.SelfAttention.v", bias=False, trainable=tr)
        sc = L.op(b * heads * n * n, qq.elem, (qq, kk), save=(qq, kk) if qq.rg else ())
        sc = L.add(sc, bias)
        pr = L.op(sc.numel, 4, (sc,))  # softmax(scores.float())
        if pr.rg:
            L.save_output(pr)
        pr = L.cast(pr, qq.elem)  # .type_as(scores)
        o = L.op(b * n * inner, qq.elem, (pr, vv), save=(pr, vv) if pr.rg else ())
        o = L.copy(o)  # transpose(1, 2).contiguous().view(batch, -1, inner)
        o = L.linear(o, inner, d, q + "0.SelfAttention.o", bias=False, trainable=tr)
        h = L.add(x, o)
        x = h
        m = L.rms_norm(h, d, trainable=tr, name=q + "1.layer_norm")
        g = L.linear(m, d, s.intermediate_size, q + "1.DenseReluDense.wi_0", bias=False, trainable=tr)
        g = L.unary(g, save_in=True)  # gelu_new (tanh approximation, fused here)
        u = L.linear(m, d, s.intermediate_size, q + "1.DenseReluDense.wi_1", bias=False, trainable=tr)
        gu = L.mul(g, u)
        f = L.linear(gu, s.intermediate_size, d, q + "1.DenseReluDense.wo", bias=False, trainable=tr)
        h = L.add(x, f)
    L.hold(bias)
    return L.rms_norm(h, d, trainable=tr, name=p + "encoder.final_layer_norm")


def build_text_encoder(L: Layers, spec: TextEncoderSpec, batch: int, prefix: str, *, trainable: bool = False,
                       lora_rank: int = 0) -> Tensor:
    """Record one text-encoder forward over ``batch`` prompts padded to ``spec.max_length`` tokens."""
    ids = L.input(batch * spec.max_length, 8)
    if spec.kind == "t5":
        return _t5(L, spec, ids, batch, prefix, trainable)
    return _clip(L, spec, ids, batch, prefix, trainable and not lora_rank, lora_rank)
