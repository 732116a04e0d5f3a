"""diffusers ``UNet2DConditionModel`` forward, recorded op by op (diffusers 0.42).

Mirrors ``unets/unet_2d_condition.py`` (time embedding, ``conv_in``, down blocks keeping every
output as a skip connection, the cross-attention mid block, up blocks concatenating the skips,
``conv_norm_out``/``conv_act``/``conv_out``), ``unets/unet_2d_blocks.py`` (which modules
``enable_gradient_checkpointing()`` wraps: every resnet of the down and up blocks and the second
resnet of the mid block, and, in ``Transformer2DModel``, every ``BasicTransformerBlock``),
``resnet.py`` (``ResnetBlock2D``), ``transformers/transformer_2d.py``, ``attention.py``
(``BasicTransformerBlock``, ``FeedForward`` with GEGLU), ``attention_processor.py``
(``AttnProcessor2_0``; ``AttnProcessor`` for eager attention) and the up/down samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import UNetSpec

__all__ = ["UNetRun", "build_unet"]

_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' DreamBooth / text-to-image LoRA scripts


@dataclass(frozen=True, slots=True)
class UNetRun:
    """How the UNet runs: shapes, what trains, and the memory savers in use."""

    batch: int
    height: int  # latent pixels
    width: int
    text_len: int = 77
    trainable: bool = True
    lora_rank: int = 0
    checkpointing: bool = False
    eager: bool = False
    lora_targets: tuple[str, ...] = _LORA_TARGETS


class _U:
    def __init__(self, L: Layers, spec: UNetSpec, run: UNetRun) -> None:
        self.L = L
        self.s = spec
        self.r = run
        self.b = run.batch
        self.tr = run.trainable and run.lora_rank == 0

    def lora(self, module: str) -> int:
        return self.r.lora_rank if module in self.r.lora_targets else 0

    # ---- pieces ----------------------------------------------------------------------------------
    def resnet(self, x: Tensor, cin: int, cout: int, hw: int, emb: Tensor, name: str) -> Tensor:
        L, b, g = self.L, self.b, self.s.norm_num_groups
        h = L.group_norm(x, cin, g, b, trainable=self.tr, name=name + ".norm1")
        h = L.silu(h)
        h = L.conv(h, cin, cout, 3, hw, name + ".conv1", trainable=self.tr, batch=b)
        t = L.silu(emb)
        t = L.linear(t, self.s.time_embed_dim, cout, name + ".time_emb_proj", trainable=self.tr)
        h = L.add(h, t)
        h = L.group_norm(h, cout, g, b, trainable=self.tr, name=name + ".norm2")
        h = L.silu(h)
        h = L.conv(h, cout, cout, 3, hw, name + ".conv2", trainable=self.tr, batch=b)
        if cin != cout:
            x = L.conv(x, cin, cout, 1, hw, name + ".conv_shortcut", trainable=self.tr, batch=b)
        out = L.add(x, h)
        out = L.scale(out)  # (input + hidden) / output_scale_factor
        L.hold(h)  # the ``hidden_states`` local until the block returns
        return out

    def attention(self, x: Tensor, dim: int, heads: int, tokens: int, ctx: Tensor | None, ctx_dim: int,
                  name: str) -> Tensor:
        L, b = self.L, self.b
        d = dim // heads
        src = ctx if ctx is not None else x
        q = L.linear(x, dim, dim, name + ".to_q", bias=False, trainable=self.tr, lora_rank=self.lora("to_q"))
        k = L.linear(src, ctx_dim if ctx is not None else dim, dim, name + ".to_k", bias=False, trainable=self.tr,
                     lora_rank=self.lora("to_k"))
        v = L.linear(src, ctx_dim if ctx is not None else dim, dim, name + ".to_v", bias=False, trainable=self.tr,
                     lora_rank=self.lora("to_v"))
        sk = self.r.text_len if ctx is not None else tokens
        o = L.attention(L.view(q), L.view(k), L.view(v), batch=b, heads=heads, sq=tokens, sk=sk, head_dim=d,
                        eager=self.r.eager, upcast_softmax=self.s.upcast_attention)
        o = L.linear(o, dim, dim, name + ".to_out.0", trainable=self.tr, lora_rank=self.lora("to_out.0"))
        out = L.scale(o)  # / rescale_output_factor
        L.hold(x, q, k, v)  # the processor's locals (``residual``, ``query``, ``key``, ``value``) until it returns
        return out

    def basic_block(self, h: Tensor, dim: int, heads: int, tokens: int, ctx: Tensor, name: str) -> Tensor:
        L = self.L
        x = h
        # Python locals (``norm_hidden_states``, ``attn_output``) keep each value until it is reassigned
        n1 = L.layer_norm(h, dim, trainable=self.tr, name=name + ".norm1")
        a1 = self.attention(n1, dim, heads, tokens, None, dim, name + ".attn1")
        h = L.add(a1, h)
        n2 = L.layer_norm(h, dim, trainable=self.tr, name=name + ".norm2")
        L.hold(n1)
        a2 = self.attention(n2, dim, heads, tokens, ctx, self.s.cross_attention_dim, name + ".attn2")
        L.hold(a1)
        h = L.add(a2, h)
        n3 = L.layer_norm(h, dim, trainable=self.tr, name=name + ".norm3")
        L.hold(n2)
        p = L.linear(n3, dim, 8 * dim, name + ".ff.net.0.proj", trainable=self.tr)  # GEGLU: dim -> 2 x 4 dim
        hidden, gate = L.view(p, p.numel // 2), L.view(p, p.numel // 2)
        g = L.gelu(gate)
        m = L.mul(hidden, g)
        f = L.linear(m, 4 * dim, dim, name + ".ff.net.2", trainable=self.tr)
        out = L.add(f, h)
        L.hold(x, n3, a2)  # the caller's reference to the block input; the block's last locals
        return out

    def transformer(self, x: Tensor, dim: int, heads: int, layers: int, hw: int, ctx: Tensor, name: str) -> Tensor:
        L, b, g = self.L, self.b, self.s.norm_num_groups
        h = L.group_norm(x, dim, g, b, trainable=self.tr, name=name + ".norm")
        if self.s.use_linear_projection:
            h = L.copy(h)  # permute(0, 2, 3, 1).reshape(batch, hw, c)
            h = L.linear(h, dim, dim, name + ".proj_in", trainable=self.tr)
        else:
            h = L.conv(h, dim, dim, 1, hw, name + ".proj_in", trainable=self.tr, batch=b)
            h = L.copy(h)
        for i in range(layers):
            with L.checkpoint(self.r.checkpointing):
                h = self.basic_block(h, dim, heads, hw, ctx, f"{name}.transformer_blocks.{i}")
        if self.s.use_linear_projection:
            h = L.linear(h, dim, dim, name + ".proj_out", trainable=self.tr)
            h = L.copy(h)  # reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        else:
            h = L.copy(h)
            h = L.conv(h, dim, dim, 1, hw, name + ".proj_out", trainable=self.tr, batch=b)
        return L.add(h, x)

    # ---- the whole model ---------------------------------------------------------------------------
    def forward(self, sample: Tensor, ctx: Tensor, extra: tuple[Tensor, ...]) -> Tensor:
        L, s, b = self.L, self.s, self.b
        c0 = s.block_out_channels[0]
        ted = s.time_embed_dim
        # time embedding: sinusoidal projection in fp32, cast to the sample dtype, two linears
        tproj = L.op(b * c0, 4, ())
        tproj = L.cast(tproj, sample.elem)
        emb = L.linear(tproj, c0, ted, "time_embedding.linear_1", trainable=self.tr)
        emb = L.silu(emb)
        emb = L.linear(emb, ted, ted, "time_embedding.linear_2", trainable=self.tr)
        if s.addition_embed_type == "text_time":
            text_embeds, time_ids = extra
            tid = L.op(time_ids.numel * s.addition_time_embed_dim, 4, (time_ids,))
            cat = L.cat((text_embeds, tid))
            cat = L.cast(cat, emb.elem)
            a = L.linear(cat, s.projection_class_embeddings_input_dim, ted, "add_embedding.linear_1",
                         trainable=self.tr)
            a = L.silu(a)
            a = L.linear(a, ted, ted, "add_embedding.linear_2", trainable=self.tr)
            emb = L.add(emb, a)

        h, w = self.r.height, self.r.width
        x = L.conv(sample, s.in_channels, c0, 3, h * w, "conv_in", trainable=self.tr, batch=b)
        skips: list[Tensor] = [x]
        cin = c0
        for i, btype in enumerate(s.down_block_types):
            cout = s.block_out_channels[i]
            hw = h * w
            block_in = x
            for j in range(s.layers_per_block[i]):
                name = f"down_blocks.{i}.resnets.{j}"
                with L.checkpoint(self.r.checkpointing):
                    x = self.resnet(x, cin if j == 0 else cout, cout, hw, emb, name)
                if btype == "CrossAttnDownBlock2D":
                    x = self.transformer(x, cout, s.heads[i], s.transformer_layers[i], hw, ctx,
                                         f"down_blocks.{i}.attentions.{j}")
                skips.append(x)
            if i < len(s.down_block_types) - 1:
                h, w = (h + 1) // 2, (w + 1) // 2
                x = L.conv(x, cout, cout, 3, h * w, f"down_blocks.{i}.downsamplers.0.conv", trainable=self.tr,
                           batch=b)
                skips.append(x)
            L.hold(block_in)  # ``sample`` in UNet2DConditionModel.forward until the block returns
            cin = cout

        if s.mid_block:
            c = s.block_out_channels[-1]
            block_in = x
            x = self.resnet(x, c, c, h * w, emb, "mid_block.resnets.0")
            x = self.transformer(x, c, s.heads[-1], s.transformer_layers[-1], h * w, ctx, "mid_block.attentions.0")
            with L.checkpoint(self.r.checkpointing):
                x = self.resnet(x, c, c, h * w, emb, "mid_block.resnets.1")
            L.hold(block_in)

        rev = tuple(reversed(s.block_out_channels))
        rev_heads = tuple(reversed(s.heads))
        rev_layers = tuple(reversed(s.transformer_layers))
        rev_lpb = tuple(reversed(s.layers_per_block))
        prev = rev[0]
        for i, btype in enumerate(s.up_block_types):
            cout = rev[i]
            cskip_in = rev[min(i + 1, len(rev) - 1)]
            n = rev_lpb[i] + 1
            res = skips[-n:]
            del skips[-n:]
            hw = h * w
            block_in = x
            for j in range(n):
                skip = res[-(j + 1)]
                cs = cskip_in if j == n - 1 else cout
                ci = prev if j == 0 else cout
                x = L.cat((x, skip))
                name = f"up_blocks.{i}.resnets.{j}"
                with L.checkpoint(self.r.checkpointing):
                    x = self.resnet(x, ci + cs, cout, hw, emb, name)
                if btype == "CrossAttnUpBlock2D":
                    x = self.transformer(x, cout, rev_heads[i], rev_layers[i], hw, ctx,
                                         f"up_blocks.{i}.attentions.{j}")
            if i < len(s.up_block_types) - 1:
                x = L.upsample_nearest(x)
                h, w = h * 2, w * 2
                x = L.conv(x, cout, cout, 3, h * w, f"up_blocks.{i}.upsamplers.0.conv", trainable=self.tr,
                           batch=b)
            L.hold(*res, block_in)  # ``res_samples`` and ``sample`` are referenced until the up block returns
            prev = cout

        x = L.group_norm(x, c0, s.norm_num_groups, b, trainable=self.tr, name="conv_norm_out")
        x = L.silu(x)
        return L.conv(x, c0, s.out_channels, 3, h * w, "conv_out", trainable=self.tr, batch=b)


def build_unet(L: Layers, spec: UNetSpec, run: UNetRun, sample: Tensor, ctx: Tensor,
               extra: tuple[Tensor, ...] = ()) -> Tensor:
    """Record one UNet forward on ``L``; returns the predicted noise (B, out_channels, h, w)."""
    return _U(L, spec, run).forward(sample, ctx, extra)


def lora_targets() -> tuple[str, ...]:
    return _LORA_TARGETS
