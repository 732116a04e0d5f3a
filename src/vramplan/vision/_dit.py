"""Diffusion transformers, recorded op by op (diffusers 0.42).

* DiT (``Transformer2DModel`` with patch inputs and ``ada_norm_zero``): every block has its own
  timestep + class embedding and an ``AdaLayerNormZero`` (6 modulation vectors), self-attention only,
  a tanh-GELU MLP; ``proj_out_1``/``proj_out_2`` and the unpatchify copy at the end.
* PixArt (``PixArtTransformer2DModel``, ``ada_norm_single``): one shared ``AdaLayerNormSingle``, a
  T5 caption projection, self- and cross-attention per block.
* SD3 (``SD3Transformer2DModel``): ``JointTransformerBlock`` — two streams (image and text) with their
  own ``AdaLayerNormZero``, a joint attention over the concatenated sequence (``JointAttnProcessor2_0``:
  the concatenation copies q/k/v, the output is split back), separate MLPs; the last block keeps only
  the image stream.
* Flux (``FluxTransformer2DModel``): 19 double-stream blocks like SD3's plus RMS q/k norms and rotary
  embeddings (``apply_rotary_emb`` computes in fp32), then 38 single-stream blocks over the joint
  sequence (attention and MLP in parallel, concatenated before ``proj_out``).

Gradient checkpointing wraps each transformer block (``_gradient_checkpointing_func``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import DiTSpec

__all__ = ["DiTRun", "build_dit"]


@dataclass(frozen=True, slots=True)
class DiTRun:
    batch: int
    height: int  # latent pixels
    width: int
    trainable: bool = True
    lora_rank: int = 0
    checkpointing: bool = False
    eager: bool = False
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class _D:
    def __init__(self, L: Layers, spec: DiTSpec, run: DiTRun) -> None:
        self.L, self.s, self.r = L, spec, run
        self.b = run.batch
        self.tr = run.trainable and not run.lora_rank
        self.lora = run.lora_rank
        p = spec.patch_size
        self.tokens = (run.height // p) * (run.width // p)

    # ---- shared pieces ------------------------------------------------------------------------------
    def lin(self, x: Tensor, fin: int, fout: int, name: str, bias: bool = True, lora: bool = False) -> Tensor:
        adapted = lora and any(name.endswith("." + t) for t in self.r.lora_targets)
        return self.L.linear(x, fin, fout, name, bias=bias, trainable=self.tr, lora_rank=self.lora if adapted else 0)

    def modulate(self, x: Tensor, dim: int, mods: Tensor) -> Tensor:
        """``norm(x) * (1 + scale[:, None]) + shift[:, None]`` with a LayerNorm without affine parameters;
        scale and shift are chunks of the modulation vector ``mods`` (which needs a gradient in training)."""
        L = self.L
        n = L.layer_norm(x, dim, trainable=False, affine=False)
        scale = L.op(self.b * dim, mods.elem, (mods,))  # 1 + scale_msa[:, None]
        m = L.mul(n, scale)
        out = L.add(m, L.view(mods, self.b * dim))  # + shift_msa[:, None]
        L.hold(n)
        return out

    def ada(self, emb_act: Tensor, dim: int, chunks: int, name: str) -> Tensor:
        """``AdaLayerNormZero``/``...Single``/``...Continuous``: ``linear(silu(emb))`` -> (B, chunks * D)."""
        return self.lin(emb_act, dim, chunks * dim, name)

    def gate(self, g: Tensor, x: Tensor) -> Tensor:
        """``gate.unsqueeze(1) * x``: saves x (the gate needs a gradient) and the gate."""
        return self.L.mul(x, g)

    def ff(self, x: Tensor, dim: int, name: str, inner: int | None = None) -> Tensor:
        """``FeedForward`` with ``gelu-approximate``: Linear, tanh-GELU (saves its input), Linear."""
        L = self.L
        inner = inner or 4 * dim
        h = self.lin(x, dim, inner, name + ".net.0.proj")
        g = L.gelu(h)
        L.hold(h)
        out = self.lin(g, inner, dim, name + ".net.2")
        L.hold(x, g)
        return out

    def rms(self, x: Tensor, dim: int, name: str) -> Tensor:
        """diffusers ``RMSNorm`` with weight: ``x * rsqrt(x.float().pow(2).mean(-1))`` promotes to fp32,
        cast back to the weight dtype, ``* weight``."""
        L = self.L
        L.register(name, (dim,), self.tr)
        x32 = L.cast(x, 4)
        sq = L.op(x.numel, 4, (x32,), save=(x32,) if x32.rg else ())
        var = L.op(x.numel // dim, 4, (sq,))
        rs = L.unary(var, save_out=True)
        n = L.op(x.numel, 4, (x, rs), save=((rs,) if x.rg else ()) + ((x,) if x.rg else ()))
        n = L.cast(n, x.elem)
        tr = self.tr and L.num.training
        return L.op(x.numel, x.elem, (n,), save=(n,) if tr else (), params=L.param(name, dim, self.tr),
                    rg=n.rg or tr, grad_to=(n,))

    def rope(self, x: Tensor) -> Tensor:
        """``apply_rotary_emb`` (Flux): ``(x.float() * cos + x_rotated.float() * sin).to(x.dtype)``."""
        L = self.L
        half = L.op(x.numel // 2, x.elem, (x,))  # -x_imag
        rot = L.op(x.numel, x.elem, (half, x))  # stack([-x_imag, x_real]).flatten(3)
        xf = L.cast(x, 4)
        a = L.op(x.numel, 4, (xf,))  # * cos (cos does not need a gradient: saves cos only)
        rf = L.cast(rot, 4)
        c = L.op(x.numel, 4, (rf,))  # * sin
        s = L.add(a, c)
        out = L.cast(s, x.elem)
        L.hold(x)
        return out

    def attend(self, q: Tensor, k: Tensor, v: Tensor, sq: int) -> Tensor:
        s = self.s
        return self.L.attention(self.L.view(q), self.L.view(k), self.L.view(v), batch=self.b, heads=s.heads, sq=sq,
                                sk=sq, head_dim=s.head_dim, eager=self.r.eager)

    def self_attn(self, n: Tensor, d: int, t: int, name: str) -> Tensor:
        """``Attention`` with ``AttnProcessor2_0``: q/k/v projections, SDPA, ``to_out``, ``/ rescale``; the
        processor's q/k/v locals live until it returns."""
        L = self.L
        q = self.lin(n, d, d, name + ".to_q", lora=True)
        k = self.lin(n, d, d, name + ".to_k", lora=True)
        v = self.lin(n, d, d, name + ".to_v", lora=True)
        o = self.attend(q, k, v, t)
        o = self.lin(o, d, d, name + ".to_out.0", lora=True)
        o = L.scale(o)
        L.hold(n, q, k, v)
        return o

    def timestep_embed(self, dim: int, name: str) -> Tensor:
        """``Timesteps`` (sinusoidal, 256 channels, fp32) + ``TimestepEmbedding`` (Linear, SiLU, Linear)."""
        L = self.L
        t = L.op(self.b * 256, 4, ())
        t = L.cast(t, L.num.act if not L.num.amp else 4)
        e = self.lin(t, 256, dim, name + ".linear_1")
        e = L.silu(e)
        return self.lin(e, dim, dim, name + ".linear_2")

    def patch_embed(self, x: Tensor, dim: int, name: str, pos_tokens: int) -> Tensor:
        """``PatchEmbed``: p x p convolution, flatten/transpose, ``(latent + pos_embed).to(latent.dtype)``."""
        L, s = self.L, self.s
        y = L.conv(x, s.in_channels, dim, s.patch_size, self.tokens, name + ".proj", trainable=self.tr, batch=self.b)
        pe = L.op(self.tokens * dim, L.num.param, (), rg=False)  # the (cropped) sin-cos position table
        z = L.add(y, pe)
        L.hold(y)
        _ = pos_tokens
        return L.cast(z, y.elem)

    # ---- architectures ------------------------------------------------------------------------------
    def dit(self, x: Tensor) -> Tensor:
        L, s, b = self.L, self.s, self.b
        d, t = s.dim, self.tokens
        h = self.patch_embed(x, d, "pos_embed", t)
        cond0: Tensor | None = None
        for i in range(s.num_layers):
            name = f"transformer_blocks.{i}"
            # per-block CombinedTimestepLabelEmbeddings (timestep MLP + class table) and AdaLayerNormZero
            temb = self.timestep_embed(d, name + ".norm1.emb.timestep_embedder")
            L.register(name + ".norm1.emb.class_embedder.embedding_table", ((s.num_classes + 1) * d,), self.tr)
            lab = L.op(b * d, temb.elem, (), rg=self.tr,
                       params=L.param(name + ".norm1.emb.class_embedder.embedding_table",
                                      (s.num_classes + 1) * d, self.tr))
            cond = L.add(temb, lab)
            if cond0 is None:
                cond0 = cond
            with L.checkpoint(self.r.checkpointing):
                mods = self.ada(L.silu(cond), d, 6, name + ".norm1.linear")
                n = self.modulate(h, d, mods)
                o = self.self_attn(n, d, t, name + ".attn1")
                a = self.gate(mods, o)
                x1 = L.add(a, h)
                n3 = self.modulate(x1, d, mods)
                L.hold(n)  # ``norm_hidden_states`` until reassigned
                f = self.ff(n3, d, name + ".ff")
                f = self.gate(mods, f)
                h2 = L.add(f, x1)
                L.hold(h, a, n3)  # the caller's block input; ``attn_output`` and ``norm_hidden_states`` locals
            h = h2
        assert cond0 is not None
        c = L.silu(cond0)
        ss = self.lin(c, d, 2 * d, "proj_out_1")
        n = self.modulate(h, d, ss)
        out = self.lin(n, d, s.patch_size**2 * s.out_channels, "proj_out_2")
        return L.copy(out)  # unpatchify: reshape + einsum copy

    def pixart(self, x: Tensor, text: Tensor) -> Tensor:
        L, s, b = self.L, self.s, self.b
        d, t = s.dim, self.tokens
        h = self.patch_embed(x, d, "pos_embed", t)
        # AdaLayerNormSingle: timestep embedding (+ resolution/aspect embeddings), silu, Linear(d, 6d)
        temb = self.timestep_embed(d, "adaln_single.emb.timestep_embedder")
        if s.use_additional_conditions:
            for nm in ("resolution_embedder", "aspect_ratio_embedder"):
                L.register(f"adaln_single.emb.{nm}.linear_1", (256 * d // 3, d // 3), self.tr)
                L.register(f"adaln_single.emb.{nm}.linear_2", (d // 3 * d // 3, d // 3), self.tr)
        mods = self.ada(L.silu(temb), d, 6, "adaln_single.linear")
        # caption projection: Linear(4096, d), tanh-GELU, Linear(d, d)
        c = self.lin(text, s.joint_attention_dim, d, "caption_projection.linear_1")
        c = L.gelu(c)
        c = self.lin(c, d, d, "caption_projection.linear_2")
        L.register("scale_shift_table", (2 * d,), self.tr)
        for i in range(s.num_layers):
            name = f"transformer_blocks.{i}"
            L.register(name + ".scale_shift_table", (6 * d,), self.tr)
            with L.checkpoint(self.r.checkpointing):
                mm = L.add(mods, L.op(0, mods.elem, ()))  # scale_shift_table[None] + timestep.reshape(...)
                n = self.modulate(h, d, mm)
                o = self.self_attn(n, d, t, name + ".attn1")
                a = self.gate(mm, o)
                x1 = L.add(a, h)
                q2 = self.lin(x1, d, d, name + ".attn2.to_q", lora=True)
                k2 = self.lin(c, d, d, name + ".attn2.to_k", lora=True)
                v2 = self.lin(c, d, d, name + ".attn2.to_v", lora=True)
                o2 = L.attention(L.view(q2), L.view(k2), L.view(v2), batch=b, heads=s.heads, sq=t, sk=s.text_len,
                                 head_dim=s.head_dim, eager=self.r.eager)
                o2 = self.lin(o2, d, d, name + ".attn2.to_out.0", lora=True)
                o2 = L.scale(o2)
                L.hold(q2, k2, v2, a)
                x2 = L.add(o2, x1)
                n2 = self.modulate(x2, d, mm)
                L.hold(n)
                f = self.ff(n2, d, name + ".ff")
                f = self.gate(mm, f)
                h2 = L.add(f, x2)
                L.hold(h, o2, n2)
            h = h2
        n = self.modulate(h, d, mods)
        out = self.lin(n, d, s.patch_size**2 * s.out_channels, "proj_out")
        return L.copy(out)

    def joint_block(self, h: Tensor, c: Tensor, temb_act: Tensor, name: str, last: bool,
                    flux: bool) -> tuple[Tensor, Tensor | None]:
        """SD3 ``JointTransformerBlock`` / Flux ``FluxTransformerBlock``."""
        L, s = self.L, self.s
        d, t, n_txt = s.dim, self.tokens, s.text_len
        mods = self.ada(temb_act, d, 6, name + ".norm1.linear")
        nx = self.modulate(h, d, mods)
        if last:
            cm = self.ada(temb_act, d, 2, name + ".norm1_context.linear")
        else:
            cm = self.ada(temb_act, d, 6, name + ".norm1_context.linear")
        nc = self.modulate(c, d, cm)
        pre = "attn."
        q = self.lin(nx, d, d, name + "." + pre + "to_q", lora=True)
        k = self.lin(nx, d, d, name + "." + pre + "to_k", lora=True)
        v = self.lin(nx, d, d, name + "." + pre + "to_v", lora=True)
        if flux or s.qk_norm:
            q = self.rms(q, s.head_dim, name + ".attn.norm_q")
            k = self.rms(k, s.head_dim, name + ".attn.norm_k")
        cq = self.lin(nc, d, d, name + "." + pre + "add_q_proj")
        ck = self.lin(nc, d, d, name + "." + pre + "add_k_proj")
        cv = self.lin(nc, d, d, name + "." + pre + "add_v_proj")
        if flux or s.qk_norm:
            cq = self.rms(cq, s.head_dim, name + ".attn.norm_added_q")
            ck = self.rms(ck, s.head_dim, name + ".attn.norm_added_k")
        jq = L.cat((cq, q) if flux else (q, cq))
        jk = L.cat((ck, k) if flux else (k, ck))
        jv = L.cat((cv, v) if flux else (v, cv))
        if flux:
            jq = self.rope(jq)
            jk = self.rope(jk)
        o = self.attend(jq, jk, jv, t + n_txt)
        if not flux:
            o = L.copy(o)  # transpose(1, 2).reshape(): q was (B, H, S, d)-contiguous after the cat
        oi = L.view(o, self.b * t * d)
        oc = L.view(o, self.b * n_txt * d)
        if flux or self.b > 1:
            oi = L.copy(oi)  # .contiguous() of the split (or a non-contiguous slice for linear)
        co: Tensor | None = None
        if not last:
            if flux or self.b > 1:
                oc = L.copy(oc)
            co = self.lin(oc, d, d, name + ".attn.to_add_out")
        ho = self.lin(oi, d, d, name + ".attn.to_out.0", lora=True)
        L.hold(cq, ck, cv, o)  # the processor's locals until it returns
        a, n2, h2 = self.gated_tail(h, ho, nx, mods, name + ".ff")
        if last:
            L.hold(h, c, a, n2, nc)
            return h2, None
        assert co is not None
        ca, nc2, c2 = self.gated_tail(c, co, nc, cm, name + ".ff_context")
        L.hold(h, c, a, n2, ca, nc2)
        return h2, c2

    def gated_tail(self, x: Tensor, attn: Tensor, normed: Tensor, mods: Tensor,
                   name: str) -> tuple[Tensor, Tensor, Tensor]:
        """One stream of a joint block after its attention: ``x + gate_msa * attn``, then the feed-forward on that
        modulated and added back under ``gate_mlp`` (diffusers ``JointTransformerBlock`` and
        ``FluxTransformerBlock``, the image and the context streams alike). ``normed``: the stream's modulated
        input, held until the second modulation. Returns the gated attention output, the second modulation and the
        block's output."""
        L, d = self.L, self.s.dim
        a = self.gate(mods, attn)
        x1 = L.add(x, a)
        n2 = self.modulate(x1, d, mods)
        L.hold(normed)
        f = self.gate(mods, self.ff(n2, d, name))
        return a, n2, L.add(x1, f)

    def single_block(self, c: Tensor, img: Tensor, temb_act: Tensor, seq: int, name: str) -> Tensor:
        """Flux ``FluxSingleTransformerBlock``: concatenates text and image tokens (a copy), attention and
        MLP in parallel over the joint sequence, returns the result (sliced back by the caller)."""
        L, s = self.L, self.s
        d = s.dim
        h = L.cat((c, img))
        mods = self.ada(temb_act, d, 3, name + ".norm.linear")
        n = self.modulate(h, d, mods)
        mlp = self.lin(n, d, 4 * d, name + ".proj_mlp")
        mlp_a = L.gelu(mlp)
        L.hold(mlp)
        q = self.lin(n, d, d, name + ".attn.to_q", lora=True)
        k = self.lin(n, d, d, name + ".attn.to_k", lora=True)
        v = self.lin(n, d, d, name + ".attn.to_v", lora=True)
        q = self.rms(q, s.head_dim, name + ".attn.norm_q")
        k = self.rms(k, s.head_dim, name + ".attn.norm_k")
        q = self.rope(q)
        k = self.rope(k)
        o = self.attend(q, k, v, seq)
        L.hold(v)
        cat = L.cat((o, mlp_a))
        out = self.lin(cat, 5 * d, d, name + ".proj_out")
        out = self.gate(mods, out)
        h2 = L.add(h, out)
        L.hold(c, img, h, n, o, mlp_a)
        return h2

    def sd3(self, x: Tensor, text: Tensor, pooled: Tensor) -> Tensor:
        L, s = self.L, self.s
        d = s.dim
        L.buffer("pos_embed.pos_embed", s.pos_embed_max_size**2 * d)
        h = self.patch_embed(x, d, "pos_embed", s.pos_embed_max_size**2)
        temb = self.timestep_embed(d, "time_text_embed.timestep_embedder")
        p = self.lin(pooled, s.pooled_projection_dim, d, "time_text_embed.text_embedder.linear_1")
        p = L.silu(p)
        p = self.lin(p, d, d, "time_text_embed.text_embedder.linear_2")
        temb = L.add(temb, p)
        c: Tensor | None = self.lin(text, s.joint_attention_dim, s.caption_projection_dim, "context_embedder")
        temb_act = L.silu(temb)
        for i in range(s.num_layers):
            assert c is not None
            with L.checkpoint(self.r.checkpointing):
                h, c = self.joint_block(h, c, temb_act, f"transformer_blocks.{i}", i == s.num_layers - 1, False)
        cm = self.ada(temb_act, d, 2, "norm_out.linear")
        n = self.modulate(h, d, cm)
        out = self.lin(n, d, s.patch_size**2 * s.out_channels, "proj_out")
        return L.copy(out)

    def flux(self, x: Tensor, text: Tensor, pooled: Tensor) -> Tensor:
        L, s = self.L, self.s
        d, t = s.dim, self.tokens
        h = self.lin(x, s.in_channels, d, "x_embedder")
        temb = self.timestep_embed(d, "time_text_embed.timestep_embedder")
        if s.guidance_embeds:
            g = self.timestep_embed(d, "time_text_embed.guidance_embedder")
            temb = L.add(temb, g)
        p = self.lin(pooled, s.pooled_projection_dim, d, "time_text_embed.text_embedder.linear_1")
        p = L.silu(p)
        p = self.lin(p, d, d, "time_text_embed.text_embedder.linear_2")
        temb = L.add(temb, p)
        c = self.lin(text, s.joint_attention_dim, d, "context_embedder")
        temb_act = L.silu(temb)
        cc: Tensor | None = c
        for i in range(s.num_layers):
            assert cc is not None
            with L.checkpoint(self.r.checkpointing):
                h, cc = self.joint_block(h, cc, temb_act, f"transformer_blocks.{i}", False, True)
        assert cc is not None
        seq = t + s.text_len
        for i in range(s.num_single_layers):
            with L.checkpoint(self.r.checkpointing):
                joint = self.single_block(cc, h, temb_act, seq, f"single_transformer_blocks.{i}")
            cc, h = L.view(joint, self.b * s.text_len * d), L.view(joint, self.b * t * d)
        cm = self.ada(temb_act, d, 2, "norm_out.linear")
        n = self.modulate(h, d, cm)
        return self.lin(n, d, s.patch_size**2 * s.out_channels, "proj_out")


def build_dit(L: Layers, spec: DiTSpec, run: DiTRun, x: Tensor, text: Tensor | None = None,
              pooled: Tensor | None = None) -> Tensor:
    """Record one transformer forward; returns the prediction (same layout as the input latents)."""
    d = _D(L, spec, run)
    if spec.kind == "dit":
        return d.dit(x)
    assert text is not None
    if spec.kind == "pixart":
        return d.pixart(x, text)
    assert pooled is not None
    if spec.kind == "sd3":
        return d.sd3(x, text, pooled)
    return d.flux(x, text, pooled)
