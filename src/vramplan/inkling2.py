"""Inkling 2's text decoder (modeling_inkling2.py, transformers 5.24: Inkling2ForCausalLM on Inkling2TextConfig).

What it adds to Inkling's (vramplan.inkling), op for op where the sizes are large:

* **block attention residuals** (Inkling2BlockAttentionResidual): the model loop keeps ``block_states``, the hidden
  states entering every ``n_layers_per_attn_res_block``-th layer stacked along a new axis (``torch.cat``: a new
  (batch, seq, blocks, hidden) tensor each time). Each sublayer's input is an attention over
  ``cat([block_states, partial])``: the stack upcast to fp32 and RMS-normed without weight, a learned query per token
  (three for a full layer's q/k/v inputs), eager attention over the blocks, the (batch, queries, seq, hidden) fp32
  output. The same closes the stack (``final_input``) before the final norm;
* the attention runs eager only (``_supports_sdpa = False``): per-token sinks (``sink_proj``) concatenated to the
  bf16 scores, ``.float()`` and softmax over scores + sink in fp32, the weights cut back and cast; the relative-position
  bias from its own normed states; q scaled and L2-clipped (and log-scaled on full layers) in fp32, keys L2-clipped,
  values RMS-normed; the output gated by ``sigmoid(gate_proj(x).float())``;
* full layers' keys and values through a dynamic short convolution (per-token taps from ``weight_proj``: the
  (batch, seq, heads, head_dim, kernel) windows and weights in fp32), sliding layers' through the static one, every
  short convolution scaled by ``1 / sqrt(taps + 1)``;
* MoE-only layers: an fp32 sigmoid router (fp32 weight) and grouped-GEMM experts whose SwiGLU soft-caps the gate
  factor and ``up`` in fp32 (Inkling2SoftcappedSwiGLU);
* the head: ``lm_head`` over the unpadded vocabulary, ``.float()``, then a tanh soft-cap in fp32.

The whole stack is one program (its block states cross the layers): :func:`build_body`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._engine.tape import Tape, Tensor
from .blocks import LayerPlan, Numerics, resid_elem
from .errors import ConfigError
from .inkling import short_conv
from .kinds import MemoryKind
from .loops import _Scoped
from .spec import LayerOverride, MLPKind, ModelSpec, NormKind, PositionKind

__all__ = ["INKLING2_CLASSES", "INKLING2_READERS", "build_body", "inkling2_linears"]

KV = MemoryKind.KV_CACHE


GATES = ("q_message_gate", "k_message_gate", "v_message_gate", "mlp_message_gate")


def loop_range(spec: ModelSpec) -> tuple[int, int, int, int]:
    """Inkling-2-Loop's (first looped layer, the layer past the last, passes, message-gate rank); (0, 0, 1, 0) for
    Inkling 2."""
    if len(spec.inkling) < 10:
        return 0, 0, 1, 0
    a, b, passes, rank = spec.inkling[6:10]
    return a, b, passes, rank


def gate_linears(spec: ModelSpec) -> list[tuple[str, int, int, int]]:
    """A loop layer's four Inkling2LoopMessageGate modules: ``down_proj`` (2 hidden -> rank, the model's dtype), the
    fp32 ``forget_gate_proj`` and ``message_gate_proj`` (rank -> hidden)."""
    h, r = spec.hidden_size, loop_range(spec)[3]
    return [lin for g in GATES for lin in ((f"{g}.down_proj", 2 * h, r, 1), (f"{g}.forget_gate_proj", r, h, 1),
                                           (f"{g}.message_gate_proj", r, h, 1))]


def inkling2_linears(spec: ModelSpec, full: bool, index: int = -1) -> list[tuple[str, int, int, int]]:
    """The attention's nn.Linear modules (peft's all-linear adapts them), and a loop layer's message gates;
    ``spec`` is the layer's."""
    h, q, kv, nh = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.num_heads
    d_rel, kernel = spec.inkling[0], spec.inkling[2]
    out = [("q_proj.linear", h, q, 1), ("k_proj.linear", h, kv, 1), ("v_proj.linear", h, kv, 1),
           ("o_proj.gate_proj", h, q, 1), ("o_proj.linear", q, h, 1), ("sink_proj", h, nh, 1),
           ("relative_position_bias.linear", h, nh * d_rel, 1)]
    if full:  # the dynamic short convolutions' weight_proj (one tap set per key/value head)
        out += [("k_proj.sconv.weight_proj", h, spec.num_kv_heads * kernel, 1),
                ("v_proj.sconv.weight_proj", h, spec.num_kv_heads * kernel, 1)]
    a, b, _, _ = loop_range(spec)
    if index < 0 and a < b:  # any layer (peft's target names): the loop layers' gates are among them
        index = a
    if a <= index < b:
        out += gate_linears(spec)
    return out


def extra_params(spec: ModelSpec, embed_rows: int) -> int:
    """Parameters outside the programs' linears: per layer the block-residual queries (a full layer's attention input
    has three; layer 0 has none), the q and relative-state scales, the relative bias bank, the static short
    convolutions (sliding k/v: (channels, 1, taps); full k/v: (taps, channels)) and the two output convolutions, a
    full layer's three extra input norms; the final block residual's query; the embedding's rows beyond the head's
    (the head holds the unpadded vocabulary) and its norm."""
    h, d_rel, kernel = spec.hidden_size, spec.inkling[0], spec.inkling[2]
    total = h + (embed_rows - spec.vocab_size) * h + h
    for i in range(spec.num_layers):
        ls = spec.layer(i)
        full = i not in spec.sliding_layers
        total += (3 if full else 1) * h * (i > 0) + h  # attention_input, mlp_input queries
        total += ls.num_heads * ls.head_dim + ls.num_heads * d_rel  # q scale, relative-state scale
        total += d_rel * ((spec.sliding_window or 0) if not full else spec.inkling[1])
        total += 2 * ls.kv_dim * kernel + 2 * h * kernel
        total += 2 * h if full else 0  # q/k/v input norms beside the post-attention norm (the program's two)
    # Inkling2LoopMessageAttentionResidual's queries: four per loop layer the config names (built or not)
    return total + (spec.inkling[10] * 4 * h if len(spec.inkling) > 10 else 0)


class _Named(_Scoped):
    """A builder whose parameter gradients are named by the physical layer, the parameter's name and its occurrence
    among the layer's uses of that name: every call of a layer names the same gradients, whether or not a later
    loop pass adds its message gates (the autograd InputBuffer of each parameter's one AccumulateGrad)."""

    seen: dict[str, int]

    def param_grad(self, name: str, numel: int, elem: int) -> tuple[tuple[int, int], ...]:
        if self.scope == -1:
            return super().param_grad(name, numel, elem)
        if name.startswith("sconv"):  # short_conv names its weight by the op's position: the occurrence names it here
            name = "sconv"
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        pid = hash(("inkling2", self.scope, name, k))
        if name not in ("p", "sconv"):  # the linears' and experts' weights: their gradients are transposed views
            self.tp.view_grads.add(pid)
        return ((pid, numel * elem),)


class _Prog:
    """The recording helpers of one layer (or the model glue) on the shared tape."""

    def __init__(self, bld: _Scoped, distance: tuple[Tensor, Tensor]) -> None:
        self.bld = bld
        self.tp = bld.tp
        self.distance = distance  # get_relative_distance of the full and the sliding layers

    def f32(self, x: Tensor) -> Tensor:
        return self.bld.cast(x, 4)

    def param(self, numel: int, elem: int = 4) -> Tensor:
        """A small trained parameter used as an operand (a scale, a query); its gradient comes from its use."""
        bld = self.bld
        tr = bld.plan is not None and bld.plan.trainable
        pg = bld.param_grad("p", numel, elem) if tr else ()
        return self.tp.op(numel, elem, (), params=pg, rg=tr)

    def rms_unweighted(self, x: Tensor, dim: int) -> Tensor:
        """x.float() * rsqrt(x.float().square().mean(-1) + eps), cast back (Inkling2UnweightedRMSNorm)."""
        tp = self.tp
        x32 = self.f32(x)
        sq = tp.op(x32.numel, 4, (x32,), save=(x32,) if x32.rg else ())
        rows = x.numel // dim
        rs = self.bld.ew(tp.op(rows, 4, (sq,)), save_out=True)
        return self.bld.cast(self.bld.mul(x32, rs), x.elem)

    def l2_clip(self, x32: Tensor, dim: int) -> Tensor:
        """x * (threshold / (vector_norm(x) + eps)).clamp(max=1) on fp32 ``x`` (vector_norm saves its input and
        result, clamp its input)."""
        tp, rows = self.tp, x32.numel // dim
        nrm = tp.op(rows, 4, (x32,), save=(x32,) if x32.rg else ())
        if nrm.rg:
            tp.save_output(nrm)
        f = tp.op(rows, 4, (nrm,))  # + eps, threshold / ..
        f = tp.op(rows, 4, (f,), save=(f,) if f.rg else ())  # .clamp(max=1.0)
        return self.bld.mul(x32, f)

    def scaled_clip(self, x: Tensor, heads: int, dim: int, log: bool) -> Tensor:
        """Inkling2ScaledL2Clip (and the log-scaled one of full layers: the clipped states cast back, then
        ``.float() * tau`` and cast again)."""
        x32 = self.f32(x)
        y = self.bld.mul(x32, self.param(heads * dim))
        out = self.bld.cast(self.l2_clip(y, dim), x.elem)
        if log:
            tau = self.tp.op(self.bld.s, 4, (), rg=False)
            out = self.bld.cast(self.bld.mul(self.f32(out), tau), x.elem)
        return out

    def dynamic_conv(self, x: Tensor, dyn: Tensor, heads: int, kernel: int) -> Tensor:
        """Inkling2DynamicShortConvolution without a cache: taps ``weight_proj(dyn).float()`` plus the static ones
        broadcast to (batch, seq, heads, head_dim, taps) in fp32; the fp32 input (the residual) padded, unfolded and
        flipped into windows of the same shape; ``(windows * weights).sum(-1)``, ``(+ residual) / sqrt(2 taps + 1)``,
        cast back."""
        bld, tp = self.bld, self.tp
        c = x.numel // (bld.b * bld.s)
        tw = self.f32(bld.proj(dyn, bld.spec.hidden_size, heads * kernel, "sconv.weight_proj"))
        weights = tp.op(bld.b * bld.s * c * kernel, 4, (tw, self.param(kernel * c)))
        x32 = self.f32(x)
        ctx = tp.op(bld.b * c * (bld.s + kernel - 1), 4, (x32,))  # F.pad
        win = tp.op(bld.b * bld.s * c * kernel, 4, (ctx,))  # unfold + flip (a copy) ...
        win = tp.op(win.numel, 4, (win,))  # ... reshape of the transposed view (a copy)
        prod = bld.mul(win, weights)
        sm = tp.op(bld.b * bld.s * c, 4, (prod,))
        y = tp.op(sm.numel, 4, (bld.add(sm, x32),))  # / sqrt(2 * taps + 1)
        return bld.cast(y, x.elem)

    def block_residual(self, blocks: Tensor | None, nblocks: int, partial: Tensor, queries: int) -> Tensor:
        """Inkling2BlockAttentionResidual: ``cat([block_states, partial.unsqueeze(-2)]).float()``, RMS-normed without
        weight, attended by the learned queries (eager attention over the blocks, in fp32); returns the
        (batch, queries, seq, hidden) fp32 output (``unbind`` gives views of it)."""
        bld, tp = self.bld, self.tp
        h, t = bld.spec.hidden_size, bld.b * bld.s
        n = nblocks + 1
        elem = max(partial.elem, blocks.elem) if blocks is not None else partial.elem
        stacked = tp.op(t * n * h, elem, (partial,) + ((blocks,) if blocks is not None else ()), passthrough=False)
        s32 = self.rms_unweighted(self.f32(stacked), h)
        q = self.param(queries * h)
        sc = tp.op(t * queries * n, 4, (q, s32), save=((s32,) if q.rg else ()) + ((q,) if s32.rg else ()))
        sc = tp.op(sc.numel, 4, (sc,))  # * scaling
        pr = bld.ew(sc, save_out=True)  # softmax(dtype=float32)
        o = tp.op(t * queries * h, 4, (pr, s32), save=(pr, s32) if (pr.rg or s32.rg) else ())
        return tp.op(o.numel, 4, (o,))  # transpose(1, 2).contiguous()

    def attention(self, n: Tensor, kn: Tensor, vn: Tensor, full: bool) -> Tensor:
        bld, tp = self.bld, self.tp
        spec, plan = bld.spec, bld.plan
        assert plan is not None
        h, qd, kvd, d, nh = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.head_dim, spec.num_heads
        b, s, skv = bld.b, bld.s, bld.kv_len
        d_rel, kernel = spec.inkling[0], spec.inkling[2]
        q = self.scaled_clip(bld.proj(n, h, qd, "q_proj.linear"), nh, d, full)
        kl = bld.proj(kn, h, kvd, "k_proj.linear")
        vl = bld.proj(vn, h, kvd, "v_proj.linear")
        if full:
            k = self.dynamic_conv(kl, kn, spec.num_kv_heads, kernel)
            v = self.dynamic_conv(vl, vn, spec.num_kv_heads, kernel)
        else:
            k = short_conv(bld, kl, kernel, scaled=True)
            v = short_conv(bld, vl, kernel, scaled=True)
        k = bld.cast(self.l2_clip(self.f32(k), d), k.elem)
        v = self.rms_unweighted(v, d)
        if not bld.num.training:  # DynamicCache.update: torch.cat copies
            k = tp.op(b * skv * kvd, k.elem, (k,), kind=KV)
            v = tp.op(b * skv * kvd, v.elem, (v,), kind=KV)
            tp.keep(k, v)
        # the relative-position bias from its own normed states (Inkling2RelativePositionBias)
        r = self.scaled_clip(bld.proj(n, h, nh * d_rel, "relative_position_bias.linear"), nh, d_rel, full)
        extent = spec.inkling[1] if full else (spec.sliding_window or 0)
        tr = plan.trainable
        rel = tp.op(b * s * nh * extent, r.elem, (r,), save=(r,) if (r.rg or tr) else (),
                    params=bld.param_grad("rel_bank", d_rel * extent, bld.num.param) if tr else (), rg=r.rg or tr)
        scores = b * nh * s * skv
        rd = self.distance[0 if full else 1]
        idx = tp.op(s * skv, 8, (rd,), rg=False)  # relative_distance.clamp(0, extent - 1)
        gathered = tp.op(scores, rel.elem, (rel, idx), save=(idx,) if rel.rg else (), grad_to=(rel,))
        outside = tp.op(s * skv, 1, (tp.op(s * skv, 1, (rd,), rg=False), tp.op(s * skv, 1, (rd,), rg=False)),
                        rg=False)  # (d < 0) | (d >= extent)
        bias = tp.op(scores, rel.elem, (gathered, outside), save=(outside,) if gathered.rg else (),
                     grad_to=(gathered,))
        sinks = bld.proj(n, h, nh, "sink_proj")
        # eager_attention_forward: repeat_kv copies, scores * scaling + bias + mask, cat with the sinks, .float(),
        # softmax, [..., :-1].to(dtype), @ v, transpose.contiguous()
        if spec.num_kv_heads != nh:
            k = tp.op(b * skv * qd, k.elem, (k,))
            v = tp.op(b * skv * qd, v.elem, (v,))
        rg = q.rg or k.rg
        att = tp.op(scores, q.elem, (q, k), save=(q, k) if rg else ())
        att = tp.op(scores, q.elem, (att,))  # * scaling
        att = tp.op(scores, q.elem, (att, bias))  # + position_bias
        att = tp.op(scores, q.elem, (att,))  # + attention_mask
        wide = b * nh * s * (skv + 1)
        cat = tp.op(wide, q.elem, (att, sinks))
        c32 = self.f32(cat)
        probs = tp.op(wide, 4, (c32,))
        if probs.rg:
            tp.save_output(probs)
        pw = tp.op(scores, q.elem, (probs,))  # [..., :-1].to(query.dtype)
        tp.hold(att)  # attn_weights stays bound until it is rebound to the cast weights
        out = tp.op(b * s * qd, q.elem, (pw, v), save=(pw, v) if (pw.rg or v.rg) else ())
        tp.hold(c32)  # combined_logits: a local of eager_attention_forward to its return
        out = tp.op(out.numel, out.elem, (out,))  # transpose(1, 2).contiguous()
        tp.hold(bias)  # position_bias: a local of the attention to its end
        # Inkling2GatedOutputProjection: sigmoid(gate_proj(x).float()); (out.float() * gate).to(dtype); linear
        g = bld.ew(self.f32(bld.proj(n, h, qd, "o_proj.gate_proj")), save_out=True)
        gated = bld.cast(bld.mul(self.f32(out), g), out.elem)
        return bld.proj(gated, qd, h, "o_proj.linear")

    def moe(self, n: Tensor) -> Tensor:
        """Inkling2SparseMoeBlock: the fp32 router (an fp32 weight) over an fp32 copy, sigmoid scores, top-k of scores
        plus the correction bias, the chosen scores normalised and scaled; the grouped-GEMM experts with the
        soft-capped SwiGLU (blocks.moe, expert_glu "softcap_fp32")."""
        bld, tp = self.bld, self.tp
        spec, plan = bld.spec, bld.plan
        assert plan is not None
        h, e, k = spec.hidden_size, spec.num_experts, spec.experts_per_token
        t = n.numel // h
        tr = plan.trainable
        x32 = self.f32(n)
        logits = tp.op(t * e, 4, (x32,), save=(x32,) if tr else (),
                       params=bld.param_grad("router", e * h, 4) if tr else (), rg=x32.rg or tr)
        sc = bld.ew(logits, save_out=True)
        idx = tp.op(t * k, 8, (tp.op(t * e, 4, (sc,), rg=False),), rg=False)
        w = tp.op(t * k, 4, (sc, idx), save=(idx,) if sc.rg else (), grad_to=(sc,))
        w = tp.op(t * k, 4, (w,), save=(w,) if w.rg else ())  # / (sum + eps)
        w = tp.op(t * k, 4, (w,))  # * routed_scaling_factor
        return bld.moe(n, routed=(idx, w))

    def gate(self, x: Tensor, msg: Tensor, name: str) -> Tensor:
        """Inkling2LoopMessageGate on fp32 ``x`` and a message (a view of the messages): ``cat`` of both RMS-normed
        without weight, cast to ``down_proj``'s dtype, ``down_proj``, ``.float()``, the fp32 forget and message gate
        projections each through tanh, ``(1 - forget) * x + message_gate * msg``."""
        bld, tp = self.bld, self.tp
        plan = bld.plan
        assert plan is not None
        h, r = bld.spec.hidden_size, loop_range(bld.spec)[3]
        t = x.numel // h
        cat = tp.op(t * 2 * h, 4, (self.rms_unweighted(x, h), self.rms_unweighted(msg, h)))
        d = self.f32(bld.proj(bld.cast(cat, bld.num.param), 2 * h, r, f"{name}.down_proj"))
        fg, mg = (bld.ew(bld.linear(d, r, h, f"{name}.{g}", bias=False, trainable=plan.trainable,
                                    lora_rank=plan.lora_rank if f"{name}.{g}" in plan.lora_targets else 0,
                                    weight_elem=4), save_out=True)
                  for g in ("forget_gate_proj", "message_gate_proj"))
        keep = tp.op(t * h, 4, (fg,))  # 1 - forget_gate
        return bld.add(bld.mul(keep, x), bld.mul(mg, msg))

    def layer(self, x: Tensor, blocks: Tensor | None, nblocks: int, index: int, boundary: bool,
              msgs: Tensor | None = None) -> Tensor:
        """One decoder layer; ``msgs``: the (batch, seq, 4, hidden) fp32 messages of a later loop pass (the layer
        gates its q, k, v and MLP inputs with them: Inkling2Loop{Sliding,Full}LoopDecoderLayer)."""
        bld, tp = self.bld, self.tp
        spec, plan = bld.spec, bld.plan
        assert plan is not None
        h, tr = spec.hidden_size, plan.trainable
        t = bld.b * bld.s
        full = index not in spec.sliding_layers
        dt = x.elem
        kernel = spec.inkling[2]
        m = [tp.view(msgs, t * h) for _ in range(4)] if msgs is not None else []
        if full:
            if index > 0:
                qkv = self.block_residual(blocks, nblocks, x, 3)
                ins = [tp.view(qkv, t * h) for _ in range(3)]
            else:
                ins = [x, x, x]
            if m:  # the gated q/k/v inputs stay bound to the layer's locals to its end
                ins += [self.gate(i, mi, g) for i, mi, g in zip(ins, m, GATES, strict=False)]
            n, kn, vn = (bld.cast(bld.norm(i, h, tr), dt) for i in ins[-3:])
        else:
            ins = [tp.view(self.block_residual(blocks, nblocks, x, 1), t * h) if index > 0 else x]
            if m:  # three gated states, each through input_layernorm (the normed fp32 states stay bound)
                normed = [bld.norm(self.gate(ins[0], mi, g), h, tr) for mi, g in zip(m[:3], GATES, strict=False)]
                ins += normed
                n, kn, vn = (bld.cast(i, dt) for i in normed)
            else:
                n = kn = vn = bld.cast(bld.norm(ins[0], h, tr), dt)
        a = self.attention(n, kn, vn, full)
        tp.hold(*ins)  # the block residual's outputs stay bound to the layer's locals through the attention
        a = short_conv(bld, a, kernel, scaled=True)
        res = self.f32(a)
        if boundary:  # block_states = cat([block_states, block_residual.unsqueeze(-2)])
            blocks = tp.op(bld.b * bld.s * (nblocks + 1) * h, dt, (x,) + ((blocks,) if blocks is not None else ()))
            nblocks += 1
        else:
            res = bld.add(self.f32(x), res)
        m_in = tp.view(self.block_residual(blocks, nblocks, res, 1), t * h)
        if m:
            m_in = self.gate(m_in, m[3], GATES[3])
        mo = self.moe(bld.cast(bld.norm(m_in, h, tr), dt))
        mo = short_conv(bld, mo, kernel, scaled=True)
        y = bld.cast(bld.add(res, mo), dt)
        if m:
            tp.hold(*ins)
        return y


def build_body(tp: Tape, spec: ModelSpec, num: Numerics, plan: LayerPlan, batch: int, seq: int,
               kv_len: int | None = None, ckpt_every: int = 0) -> Tensor:
    """Every layer in order, the block states the model loop keeps between them, and ``final_input`` with the final
    norm; the input is the normed embeddings (inputs_embeds, held to the forward's end); returns the head's input."""
    h, t = spec.hidden_size, batch * seq
    every = spec.inkling[5]
    x = tp.input(t * h, resid_elem(num), plan.input_rg)
    skv = kv_len if kv_len is not None else seq
    # get_relative_distance for full and sliding layers: (q, kv) int64, held by the model's forward
    distance = (tp.op(seq * skv, 8, (), rg=False), tp.op(seq * skv, 8, (), rg=False))
    hidden = x
    blocks: Tensor | None = None
    nblocks = 0

    def run(i: int, msgs: Tensor | None = None) -> None:
        nonlocal hidden, blocks, nblocks
        ls = spec.layer(i)
        lp = replace(plan, sliding=i in spec.sliding_layers, variant=spec.variant(i), moe=True)
        bld = _Named(tp, ls, num, batch, seq, lp, kv_len)
        bld.scope, bld.seen = i, {}
        boundary = i % every == 0
        with tp.checkpoint(bool(ckpt_every) and i % ckpt_every == 0):
            new = _Prog(bld, distance).layer(hidden, blocks, nblocks, i, boundary, msgs)
        hidden.last_use = max(hidden.last_use, len(tp.ops) - 1)
        if boundary:  # the model loop's own cat (the layer's was a local)
            old = blocks
            blocks = tp.op(t * (nblocks + 1) * h, hidden.elem, (hidden,) + ((old,) if old is not None else ()))
            nblocks += 1
        hidden = new

    # Inkling2LoopTextModel.forward: the layers before the loop, its first pass, the later passes (each restarts from
    # the pre-loop states and gets messages from the previous pass's block states and output), the layers after it
    start, end, passes, _ = loop_range(spec)
    if start >= end:
        start = end = spec.num_layers
    for i in range(start):
        run(i)
    pre_hidden, pre_blocks, npre = hidden, blocks, nblocks
    for i in range(start, end):
        run(i)
    held: list[Tensor] = []
    for _ in range(1, passes):
        prev_blocks, prev_n, prev_hidden = blocks, nblocks - npre - 1, hidden
        tp.hold(*held)  # the previous pass's ``previous_*`` variables and last messages until rebound
        held = [t_ for t_ in (prev_blocks, prev_hidden) if t_ is not None]
        hidden, blocks, nblocks = pre_hidden, pre_blocks, npre
        msgs: Tensor | None = None
        for i in range(start, end):
            mb = _Named(tp, spec, num, batch, seq, plan, kv_len)
            mb.scope, mb.seen = -2, {}  # one parameter (loop layers, 4, hidden) for all the calls
            new_msgs = _Prog(mb, distance).block_residual(prev_blocks, max(prev_n, 0), prev_hidden, 4)
            if msgs is not None:
                tp.hold(msgs)  # ``messages`` is rebound only when the next ones are made
            msgs = new_msgs
            run(i, msgs)
        if msgs is not None:
            held.append(msgs)
    for i in range(end, spec.num_layers):
        run(i)
    bld = _Named(tp, spec, num, batch, seq, plan, kv_len)
    bld.scope, bld.seen = spec.num_layers, {}
    prog = _Prog(bld, distance)
    out = tp.view(prog.block_residual(blocks, nblocks, hidden, 1), t * h)
    y = bld.cast(bld.norm(out, h, plan.trainable), x.elem)  # norm(...).to(inputs_embeds.dtype)
    tp.hold(x, *distance, *held)
    if end > start:  # pre_loop_hidden_states, pre_loop_block_states: bound to the forward's end
        tp.hold(pre_hidden, *([pre_blocks] if pre_blocks is not None else []))
    tp.keep(y)
    return y


def _inkling2_text(c: Any, family: str) -> ModelSpec:
    """Inkling2TextConfig (configuration_inkling2.py): layer kinds from ``layer_types`` (by default every sixth layer
    full, the others sliding), every layer MoE."""
    from .hfconfig import _MAX_LAYERS, _Cfg

    assert isinstance(c, _Cfg)
    layers = c.int_("num_hidden_layers", hi=_MAX_LAYERS)
    kinds = c.raw.get("layer_types") or ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) < layers or not set(kinds[:layers]) <= {"hybrid", "hybrid_sliding"}:
        raise ConfigError(f"{c.where}: layer_types must list 'hybrid' or 'hybrid_sliding' for each of the {layers} "
                          "layers")
    if c.str_("scoring_func", default="sigmoid") != "sigmoid":
        raise ConfigError(f"{c.where}: scoring_func other than sigmoid is not modelled by estimate; run vramplan trace")
    vocab = c.int_("vocab_size")
    head_rows = c.int_("unpadded_vocab_size", default=vocab)
    hidden = c.int_("hidden_size")
    heads, kv, hd = c.int_("num_attention_heads", default=48), c.int_("num_key_value_heads", default=8), \
        c.int_("head_dim", default=128)
    sh, skv, shd = c.int_("swa_num_attention_heads", default=48), c.int_("swa_num_key_value_heads", default=8), \
        c.int_("swa_head_dim", default=128)
    if heads % kv or sh % skv:
        raise ConfigError(f"{c.where}: attention heads must be a multiple of the key/value heads")
    sliding = tuple(i for i in range(layers) if kinds[i] == "hybrid_sliding")
    experts = c.int_("n_routed_experts", "num_local_experts", default=384)
    top_k = c.int_("num_experts_per_tok", default=8)
    if top_k > experts:
        raise ConfigError(f"{c.where}: num_experts_per_tok ({top_k}) exceeds n_routed_experts ({experts})")
    kernel = c.int_("conv_kernel_size", "sconv_kernel_size", default=4, hi=64)
    spec = ModelSpec(
        name=c.where, family=family, vocab_size=head_rows, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hd, intermediate_size=c.int_("moe_intermediate_size", default=2304),
        tie_word_embeddings=False, norm=NormKind.FP32_WEIGHT_RMSNORM, mlp=MLPKind.GATED,
        activation=c.activation("hidden_act", default="silu"), position=PositionKind.NONE,
        max_position_embeddings=c.opt_int("max_position_embeddings", hi=1 << 30),
        embedding_layernorm=True, raw_embeds_held=False, final_norm=False, logit_softcap_fp32=True,
        logit_softcap=c.float_("final_logit_softcapping", default=30.0),
        num_experts=experts, experts_per_token=top_k, moe_intermediate_size=c.int_("moe_intermediate_size",
                                                                                    default=2304),
        moe_layers=tuple(range(layers)), expert_glu="softcap_fp32", router_fp32=True,
        sliding_window=c.int_("sliding_window_size", "sliding_window", default=1024), sliding_layers=sliding,
        layer_overrides=(LayerOverride(layers=sliding, head_dim=shd, num_kv_heads=skv, num_heads=sh),) if sliding
        else (),
        mixers=("inkling",) * layers, attention_dropout=c.float_("attention_dropout", default=0.0, hi=1.0),
        sdpa=False, program_version="5.24", flash_refused="Inkling2PreTrainedModel runs eager attention only "
        "(_supports_flash_attn and _supports_sdpa False: per-token attention sinks)",
        inkling=(c.int_("d_rel", default=16), c.int_("rel_extent", default=1024), kernel, 0, 2,
                 c.int_("n_layers_per_attn_res_block", default=6, hi=_MAX_LAYERS)),
    )
    # _keep_in_fp32_modules_strict (Inkling2PreTrainedModel): the routers' weights, the block residuals' queries, the
    # output convolutions and the sliding layers' static k/v convolutions (sconv.conv1d)
    fp32 = hidden + sum(experts * hidden + hidden + (3 if i not in sliding else 1) * hidden * (i > 0)
                        + 2 * hidden * kernel + (2 * spec.layer(i).kv_dim * kernel if i in sliding else 0)
                        for i in range(layers))
    return replace(spec, extra_params=extra_params(spec, vocab), fp32_params=fp32)


def _inkling2_loop_text(c: Any, family: str) -> ModelSpec:
    """Inkling2LoopTextConfig (modular_inkling2_loop.py): Inkling 2's layers, of which those from
    ``loop_layer_index_start`` to ``loop_layer_index_end`` run ``loop_num_passes`` times (Inkling2LoopTextModel);
    each loop layer has four message gates (Inkling2LoopMessageGate: a ``down_proj`` to ``loop_gate_rank`` and two
    fp32 gate projections back), the model one message residual (fp32 queries: four per loop layer). A nested
    ``loop_config`` (core_start, core_end, num_passes, gate_rank) overrides the flat fields, as its __post_init__
    does."""
    from .hfconfig import _MAX_LAYERS, _Cfg

    assert isinstance(c, _Cfg)
    spec = _inkling2_text(c, family)
    nested = c.raw.get("loop_config")
    raw = dict(c.raw)
    if isinstance(nested, dict):
        for key, field in (("core_start", "loop_layer_index_start"), ("core_end", "loop_layer_index_end"),
                           ("num_passes", "loop_num_passes"), ("gate_rank", "loop_gate_rank")):
            if key in nested:
                raw[field] = nested[key]
    lc = _Cfg(raw, c.where)
    layers, every = spec.num_layers, spec.inkling[5]
    start = lc.int_("loop_layer_index_start", default=6, hi=_MAX_LAYERS)
    end = lc.int_("loop_layer_index_end", default=18, hi=_MAX_LAYERS)
    passes = lc.int_("loop_num_passes", default=3, hi=64)
    rank = lc.int_("loop_gate_rank", default=64)
    # Inkling2LoopTextConfig.validate_architecture
    if passes < 1 or start <= 0 or end < start or start % every or end % every:
        raise ConfigError(f"{c.where}: the loop must run at least once over layers loop_layer_index_start "
                          f"({start}) > 0 to loop_layer_index_end ({end}), both multiples of "
                          f"n_layers_per_attn_res_block ({every})")
    # the loop layers the model builds (``self.layers[start:end]`` of num_hidden_layers); the message queries are
    # sized by the configured range
    queries = end - start
    start, end = min(start, layers), min(max(start, end), layers)
    h, n = spec.hidden_size, end - start
    spec = replace(spec, inkling=(*spec.inkling[:6], start, end, passes, rank, queries))
    # the message residual's queries and the gates' fp32 projections (_keep_in_fp32_modules_strict: message_input,
    # forget_gate_proj, message_gate_proj)
    return replace(spec, extra_params=extra_params(spec, c.int_("vocab_size")),
                   fp32_params=spec.fp32_params + queries * 4 * h + n * 4 * 2 * rank * h)


INKLING2_READERS = {"inkling2_text": _inkling2_text, "inkling2_loop_text": _inkling2_loop_text}
INKLING2_CLASSES = {"Inkling2ForCausalLM": "inkling2_text", "Inkling2LoopForCausalLM": "inkling2_loop_text"}
