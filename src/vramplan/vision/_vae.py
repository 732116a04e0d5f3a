"""diffusers ``AutoencoderKL`` encoder and decoder, recorded op by op (``autoencoders/vae.py``,
``autoencoders/autoencoder_kl.py``, ``UNetMidBlock2D``/``DownEncoderBlock2D``/``UpDecoderBlock2D``).

The decoder runs at the full image resolution in its last blocks: at 1024 x 1024 one 128-channel
activation is 128 Mi elements, and a ResnetBlock2D keeps its input, the GroupNorm and SiLU outputs and
a convolution output alive at once, which is why the decode is often the peak of a pipeline. The
mid block's single-head attention (head_dim = 512: too wide for the fused kernels) runs the
memory-efficient SDPA kernel; its ``to_q/k/v`` read a transposed view, so ``matmul`` first makes a
contiguous copy of it (``reshape`` of a non-contiguous tensor).
"""

from __future__ import annotations

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import VAESpec

__all__ = ["build_vae_decoder", "build_vae_encoder"]


class _V:
    def __init__(self, L: Layers, spec: VAESpec, batch: int, prefix: str, trainable: bool = False) -> None:
        self.L, self.s, self.b, self.p, self.tr = L, spec, batch, prefix, trainable

    def resnet(self, x: Tensor, cin: int, cout: int, hw: int, name: str) -> Tensor:
        L, b, g = self.L, self.b, self.s.norm_num_groups
        n = self.p + name
        h = L.group_norm(x, cin, g, b, trainable=self.tr, name=n + ".norm1")
        h = L.silu(h)
        h = L.conv(h, cin, cout, 3, hw, n + ".conv1", trainable=self.tr, batch=b)
        h = L.group_norm(h, cout, g, b, trainable=self.tr, name=n + ".norm2")
        h = L.silu(h)
        h = L.conv(h, cout, cout, 3, hw, n + ".conv2", trainable=self.tr, batch=b)
        if cin != cout:
            x2 = L.conv(x, cin, cout, 1, hw, n + ".conv_shortcut", trainable=self.tr, batch=b)
        else:
            x2 = x
        out = L.add(x2, h)
        out = L.scale(out)
        L.hold(x, h)  # ``input_tensor`` and ``hidden_states`` locals until the block returns
        return out

    def attention(self, x: Tensor, c: int, hw: int, name: str) -> Tensor:
        L, b = self.L, self.b
        n = self.p + name
        h = L.group_norm(x, c, self.s.norm_num_groups, b, trainable=self.tr, name=n + ".group_norm")
        qs = []
        for proj in ("to_q", "to_k", "to_v"):
            hc = L.copy(h)  # matmul's reshape of the transposed (B, HW, C) view
            qs.append(L.linear(hc, c, c, n + "." + proj, trainable=self.tr))
            L.hold(hc)
        q, k, v = qs
        o = L.attention(L.view(q), L.view(k), L.view(v), batch=b, heads=1, sq=hw, sk=hw, head_dim=c)
        o = L.linear(o, c, c, n + ".to_out.0", trainable=self.tr)
        o = L.copy(o)  # transpose(-1, -2).reshape(batch, channel, height, width)
        o = L.add(o, x)  # residual_connection
        out = L.scale(o)  # / rescale_output_factor
        L.hold(x, h, q, k, v)
        return out

    def mid(self, x: Tensor, c: int, hw: int, name: str) -> Tensor:
        x = self.resnet(x, c, c, hw, name + ".resnets.0")
        x = self.attention(x, c, hw, name + ".attentions.0")
        return self.resnet(x, c, c, hw, name + ".resnets.1")

    def decode(self, z: Tensor, h: int, w: int) -> Tensor:
        L, s, b = self.L, self.s, self.b
        chans = s.block_out_channels
        top = chans[-1]
        if s.use_post_quant_conv:
            z = L.conv(z, s.latent_channels, s.latent_channels, 1, h * w, self.p + "post_quant_conv",
                       trainable=self.tr, batch=b)
        x = L.conv(z, s.latent_channels, top, 3, h * w, self.p + "decoder.conv_in", trainable=self.tr, batch=b)
        x = self.mid(x, top, h * w, "decoder.mid_block")
        rev = tuple(reversed(chans))
        prev = rev[0]
        for i, cout in enumerate(rev):
            block_in = x
            for j in range(s.layers_per_block + 1):
                x = self.resnet(x, prev if j == 0 else cout, cout, h * w, f"decoder.up_blocks.{i}.resnets.{j}")
            if i < len(rev) - 1:
                up = L.upsample_nearest(x)
                L.hold(x)
                h, w = h * 2, w * 2
                x = L.conv(up, cout, cout, 3, h * w, f"{self.p}decoder.up_blocks.{i}.upsamplers.0.conv",
                           trainable=self.tr, batch=b)
                L.hold(up)
            L.hold(block_in)
            prev = cout
        x = L.group_norm(x, chans[0], s.norm_num_groups, b, trainable=self.tr, name=self.p + "decoder.conv_norm_out")
        x = L.silu(x)
        return L.conv(x, chans[0], s.out_channels, 3, h * w, self.p + "decoder.conv_out", trainable=self.tr,
                      batch=b)

    def encode(self, img: Tensor, h: int, w: int) -> Tensor:
        L, s, b = self.L, self.s, self.b
        chans = s.block_out_channels
        x = L.conv(img, s.in_channels, chans[0], 3, h * w, self.p + "encoder.conv_in", trainable=self.tr, batch=b)
        prev = chans[0]
        for i, cout in enumerate(chans):
            block_in = x
            for j in range(s.layers_per_block):
                x = self.resnet(x, prev if j == 0 else cout, cout, h * w, f"encoder.down_blocks.{i}.resnets.{j}")
            if i < len(chans) - 1:
                padded = L.op(b * cout * (h + 1) * (w + 1), x.elem, (x,), passthrough=False)  # F.pad(0, 1, 0, 1)
                L.hold(x)
                h, w = h // 2, w // 2
                x = L.conv(padded, cout, cout, 3, h * w, f"{self.p}encoder.down_blocks.{i}.downsamplers.0.conv",
                           trainable=self.tr, batch=b)
            L.hold(block_in)
            prev = cout
        x = self.mid(x, chans[-1], h * w, "encoder.mid_block")
        x = L.group_norm(x, chans[-1], s.norm_num_groups, b, trainable=self.tr, name=self.p + "encoder.conv_norm_out")
        x = L.silu(x)
        x = L.conv(x, chans[-1], 2 * s.latent_channels, 3, h * w, self.p + "encoder.conv_out", trainable=self.tr,
                   batch=b)
        if s.use_quant_conv:
            x = L.conv(x, 2 * s.latent_channels, 2 * s.latent_channels, 1, h * w, self.p + "quant_conv",
                       trainable=self.tr, batch=b)
        # DiagonalGaussianDistribution: chunk, clamp(logvar), std = exp(0.5 logvar), var = exp(logvar);
        # sample = mean + std * randn
        n = b * s.latent_channels * h * w
        lv = L.op(n, x.elem, (x,))
        std = L.op(n, x.elem, (lv,))
        var = L.op(n, x.elem, (lv,))
        noise = L.op(n, x.elem, ())
        ns = L.op(n, x.elem, (std, noise))
        z = L.op(n, x.elem, (x, ns))
        L.hold(lv, std, var)
        return z


def build_vae_decoder(L: Layers, spec: VAESpec, z: Tensor, batch: int, h: int, w: int, prefix: str = "vae.") -> Tensor:
    """``vae.decode(latents)``: latents (B, C, h, w) -> image (B, 3, h * factor, w * factor)."""
    return _V(L, spec, batch, prefix).decode(z, h, w)


def build_vae_encoder(L: Layers, spec: VAESpec, img: Tensor, batch: int, h: int, w: int,
                      prefix: str = "vae.") -> Tensor:
    """``vae.encode(images).latent_dist.sample()``: image (B, 3, H, W) -> latents (B, C, H/f, W/f)."""
    return _V(L, spec, batch, prefix).encode(img, h, w)
