"""StyleGAN2-ADA / StyleGAN3 generator and discriminator, recorded op by op, and their training phases.

Follows NVlabs ``stylegan2-ada-pytorch`` (``training/networks.py``, ``training/loss.py``,
``training/training_loop.py``, ``torch_utils/ops``): the custom CUDA ops' autograd functions decide what
is kept for backward — ``bias_act`` keeps its output for ``lrelu`` and nothing for ``linear``;
``upfirdn2d`` keeps nothing; ``fma`` (noise injection) keeps its first operand; the convolutions keep
input and weight. In training the generator's modulated convolutions are not fused
(``fused_modconv = not training``): the activations are scaled by the styles before the convolution
(a copy, kept), and demodulation computes per-sample weights ``w = weight * styles`` of shape
(B, O, I, k, k) in fp32, kept by ``w.square()`` — at 512 channels that is 9.4 MB per image per
layer, which is why small resolutions with large batches are not cheap. The ``num_fp16_res`` highest
resolutions run in fp16.

The training iteration runs four phases with lazy regularization: ``Gmain`` (G and D forward, backward
into G), ``Greg`` every 4th iteration (path-length penalty at half batch: a ``create_graph`` gradient
through the synthesis network, then its backward), ``Dmain`` (D on generated images, G without a
graph; then D on real images), ``Dreg`` every 16th (R1: a ``create_graph`` gradient of D w.r.t. the
real images). The regularization passes are estimated as the forward's saved tensors plus a second,
equally large set kept by the gradient graph for the second-order backward.
"""

from __future__ import annotations

from math import ceil, log2

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import StyleGANSpec

__all__ = ["build_discriminator", "build_generator", "channels"]


def channels(spec: StyleGANSpec, res: int) -> int:
    return min(spec.channel_base // res, spec.channel_max)


def _fp16_res(spec: StyleGANSpec) -> int:
    shift = int(log2(spec.resolution)) + 1 - spec.num_fp16_res
    return max(1 << shift if shift >= 0 else 0, 8)


class _G:
    def __init__(self, L: Layers, spec: StyleGANSpec, batch: int, trainable: bool, prefix: str = "G.") -> None:
        self.L, self.s, self.b, self.tr, self.p = L, spec, batch, trainable, prefix

    def fc(self, x: Tensor, fin: int, fout: int, name: str, act: bool) -> Tensor:
        """``FullyConnectedLayer``: addmm for linear, else matmul + ``bias_act`` (lrelu keeps its output)."""
        L = self.L
        y = L.linear(x, fin, fout, self.p + name, trainable=self.tr)
        if act:
            y = L.unary(y, save_out=True)
        return y

    def mapping(self, z: Tensor) -> Tensor:
        L, s = self.L, self.s
        x = L.unary(z, save_in=True)  # normalize_2nd_moment (square/mean/rsqrt/mul on (B, 512))
        for i in range(s.mapping_layers):
            x = self.fc(x, s.z_dim if i == 0 else s.w_dim, s.w_dim, f"mapping.fc{i}", act=True)
        L.buffer(self.p + "mapping.w_avg", s.w_dim)
        return L.op(self.b * self.num_ws() * s.w_dim, 4, (x,), passthrough=False)  # unsqueeze(1).repeat

    def num_ws(self) -> int:
        if self.s.version == 3:
            return 16
        n = 0
        r = 4
        while r <= self.s.resolution:
            n += 1 if r == 4 else 2
            r *= 2
        return n + 1

    def layer(self, x: Tensor, cin: int, cout: int, r_out: int, up: bool, elem: int, name: str) -> Tensor:
        """``SynthesisLayer`` with ``fused_modconv=False``."""
        L, b = self.L, self.b
        n = self.p + name
        styles = L.linear(L.op(b * self.s.w_dim, 4, (), rg=self.tr), self.s.w_dim, cin, n + ".affine",
                          trainable=self.tr)
        L.register(n, (cout * cin * 9, cout, 1), self.tr)
        L.buffer(n + ".noise_const", r_out * r_out)
        wn = cout * cin * 9
        # demodulation: per-sample weights (B, O, I, 3, 3) in fp32, kept by square()
        # backward: grad_styles = (grad_w * weight).sum(...) and grad_weight = (grad_w * styles).sum(0) each
        # build a (B, O, I, k, k) product first
        w = L.op(b * wn, 4, (styles,), save=(styles,), params=L.param(n, wn + cout + 1, self.tr), rg=True,
                 bwd_scratch=2 * b * wn * 4)
        sq = L.op(b * wn, 4, (w,), save=(w,))
        dco = L.op(b * cout, 4, (sq,))
        L.hold(sq)
        xs = L.mul(x, L.cast(styles, elem))  # x * styles.reshape(B, -1, 1, 1): keeps x
        r_in = r_out // 2 if up else r_out
        if up:  # transposed convolution (stride 2), then the 4-tap FIR filter (upfirdn2d keeps nothing)
            t = L.op(b * cout * (2 * r_in + 1) ** 2, elem, (xs,), save=(xs,), grad_to=(xs,))
            y = L.op(b * cout * r_out * r_out, elem, (t,))
        else:
            y = L.op(b * cout * r_out * r_out, elem, (xs,), save=(xs,), grad_to=(xs,))
        noise = L.op(b * r_out * r_out, 4, ())
        y = L.op(y.numel, elem, (y, dco, noise), save=(y, dco))  # fma(x, dcoefs, noise): keeps x
        return L.unary(y, save_out=True)  # bias_act lrelu (+ gain, clamp): keeps its output

    def torgb(self, x: Tensor, cin: int, r: int, elem: int, name: str) -> Tensor:
        L, b = self.L, self.b
        n = self.p + name
        styles = L.linear(L.op(b * self.s.w_dim, 4, (), rg=self.tr), self.s.w_dim, cin, n + ".affine",
                          trainable=self.tr)
        L.register(n, (3 * cin, 3), self.tr)
        xs = L.mul(x, L.cast(styles, elem))
        y = L.op(b * 3 * r * r, elem, (xs,), save=(xs,), params=L.param(n, 3 * cin + 3, self.tr), grad_to=(xs,))
        y = L.op(y.numel, elem, (y,))  # bias_act linear with clamp: a new tensor, keeps nothing
        return L.cast(y, 4)

    def synthesis(self, ws: Tensor) -> Tensor:
        L, s, b = self.L, self.s, self.b
        fp16 = _fp16_res(s)
        x: Tensor | None = None
        img: Tensor | None = None
        r = 4
        while r <= s.resolution:
            c = channels(s, r)
            elem = 2 if r >= fp16 else 4
            name = f"synthesis.b{r}"
            L.buffer(self.p + name + ".resample_filter", 16)
            if x is None:
                L.register(self.p + name + ".const", (c * 16,), self.tr)
                const = L.op(0, 4, (), rg=self.tr, params=L.param(self.p + name + ".const", c * 16, self.tr))
                x = L.op(b * c * 16, elem, (const, ws), grad_to=(const,))  # .to(dtype).repeat(B)
                x = self.layer(x, c, c, r, False, elem, name + ".conv1")
            else:
                x = L.cast(x, elem)
                cin = channels(s, r // 2)
                x = self.layer(x, cin, c, r, True, elem, name + ".conv0")
                x = self.layer(x, c, c, r, False, elem, name + ".conv1")
            if s.version == 2 or r == s.resolution:
                y = self.torgb(x, c, r, elem, name + ".torgb")
                if img is not None:
                    up = L.op(b * 3 * r * r, 4, (img,))  # upfirdn2d.upsample2d(img)
                    img = L.inplace(up, others=(y,), passthrough=True)  # img.add_(y)
                else:
                    img = y
            r *= 2
        assert img is not None
        return img


class _D:
    def __init__(self, L: Layers, spec: StyleGANSpec, batch: int, trainable: bool, prefix: str = "D.") -> None:
        self.L, self.s, self.b, self.tr, self.p = L, spec, batch, trainable, prefix

    def conv(self, x: Tensor, cin: int, cout: int, k: int, r_out: int, name: str, *, act: bool = True,
             bias: bool = True, down: bool = False) -> Tensor:
        """``Conv2dLayer`` via ``conv2d_resample``: with ``down``, an FIR filter first (keeps nothing)."""
        L, b = self.L, self.b
        r_in = r_out * 2 if down else r_out
        if down:
            pad = r_in + 1 if k == 3 else r_out
            x = L.op(b * cin * pad * pad, x.elem, (x,))
        y = L.conv(x, cin, cout, k, r_out * r_out, self.p + name, bias=bias, trainable=self.tr, batch=b)
        if act:
            return L.unary(y, save_out=True)
        return L.op(y.numel, y.elem, (y,))  # bias_act linear with gain: a new tensor

    def forward(self, img: Tensor) -> Tensor:
        L, s, b = self.L, self.s, self.b
        fp16 = _fp16_res(s)
        x: Tensor | None = None
        r = s.resolution
        while r > 4:
            tmp = channels(s, r)
            out = channels(s, r // 2)
            elem = 2 if r >= fp16 else 4
            name = f"b{r}"
            L.buffer(self.p + name + ".resample_filter", 16)
            if x is None:
                im = L.cast(img, elem)
                x = self.conv(im, s.img_channels, tmp, 1, r, name + ".fromrgb")
            else:
                x = L.cast(x, elem)
            y = self.conv(x, tmp, out, 1, r // 2, name + ".skip", act=False, bias=False, down=True)
            h = self.conv(x, tmp, tmp, 3, r, name + ".conv0")
            h = self.conv(h, tmp, out, 3, r // 2, name + ".conv1", down=True)
            x = L.inplace(y, others=(h,), passthrough=True)  # y.add_(x)
            r //= 2
        assert x is not None
        c = channels(s, 4)
        x = L.cast(x, 4)
        if s.mbstd_group_size:
            m = L.op(b * 16, 4, (x,), save=(x,))  # minibatch stddev feature map
            x = L.cat((x, m))
        x = self.conv(x, c + (1 if s.mbstd_group_size else 0), c, 3, 4, "b4.conv")
        x = L.linear(x, c * 16, c, self.p + "b4.fc", trainable=self.tr)
        x = L.unary(x, save_out=True)
        return L.linear(x, c, 1, self.p + "b4.out", trainable=self.tr)


def sg3_schedule(spec: StyleGANSpec) -> list[tuple[int, int, int, int, int, bool]]:
    """StyleGAN3 ``SynthesisNetwork``'s layer plan (networks_stylegan3.py): per layer (in channels, out
    channels, in size, out size, intermediate size after the leaky ReLU's upsampling), for 14 layers + ToRGB
    (config T: 3 x 3 convolutions, cutoff 2 -> res/2, 10-pixel margins, 2 critically sampled layers), and
    whether it runs in fp16 (sampling rate x 2**num_fp16_res > resolution)."""
    n, crit, res = 14, 2, spec.resolution
    first_cut, first_stop, last_rel, margin = 2.0, 2**2.1, 2**0.3, 10
    last_cut = res / 2
    last_stop = last_cut * last_rel
    out: list[tuple[int, int, int, int, int, bool]] = []
    cut, rate, size, ch = [], [], [], []
    for i in range(n + 1):
        e = min(i / (n - crit), 1.0)
        c = first_cut * (last_cut / first_cut) ** e
        st = first_stop * (last_stop / first_stop) ** e
        r = 2 ** ceil(log2(min(st * 2, res)))
        cut.append(c)
        rate.append(r)
        size.append(int(r) + 2 * margin if i < n - 1 else res)
        ch.append(round(min((spec.channel_base / 2) / c, spec.channel_max)) if i < n else spec.img_channels)
    for i in range(n + 1):
        p = max(i - 1, 0)
        torgb = i == n
        k = 1 if torgb else 3
        tmp_rate = max(rate[p], rate[i]) * (1 if torgb else 2)
        up = int(tmp_rate // rate[p])
        tmp = (size[p] + k - 1) * up
        out.append((ch[p], ch[i], size[p], size[i], tmp, rate[i] * 2**spec.num_fp16_res > res))
    return out


class _G3(_G):
    """StyleGAN3 synthesis (alias-free): Fourier-feature input, modulated convolutions as one grouped
    convolution over per-sample weights, ``filtered_lrelu`` (upsample, bias + leaky ReLU, downsample in one
    CUDA op that keeps only 2-bit signs of its intermediate for backward)."""

    def synthesis(self, ws: Tensor) -> Tensor:
        L, s, b = self.L, self.s, self.b
        sched = sg3_schedule(s)
        c0, s0 = sched[0][0], sched[0][2]
        L.register(self.p + "synthesis.input.affine", (s.w_dim * 4, 4), self.tr)
        L.register(self.p + "synthesis.input.weight", (c0 * c0,), self.tr)
        feats = L.op(b * s0 * s0 * c0, 4, (ws,), rg=self.tr)  # sin(grid @ freqs + phases) * amplitudes
        x = L.op(b * s0 * s0 * c0, 4, (feats,), save=(feats,), params=L.param(self.p + "synthesis.input.weight",
                                                                               c0 * c0, self.tr))
        x = L.copy(x)  # permute to (B, C, H, W)
        for i, (cin, cout, sin_, sout, tmp, fp16) in enumerate(sched):
            torgb = i == len(sched) - 1
            k = 1 if torgb else 3
            elem = 2 if fp16 else 4
            n = f"{self.p}synthesis.L{i}"
            styles = L.linear(L.op(b * s.w_dim, 4, (), rg=self.tr), s.w_dim, cin, n + ".affine", trainable=self.tr)
            L.register(n, (cout * cin * k * k, cout), self.tr)
            wn = b * cout * cin * k * k
            w1 = L.op(wn, 4, (styles,), save=(styles,), params=L.param(n, cout * cin * k * k + cout, self.tr),
                      rg=True, bwd_scratch=2 * wn * 4)
            if not torgb:
                sq = L.op(wn, 4, (w1,), save=(w1,))
                dco = L.op(b * cout, 4, (sq,))
                L.hold(sq)
                w1 = L.op(wn, 4, (w1, dco), save=(w1, dco))  # w * dcoefs
            w2 = L.op(wn, 4, (w1,), save=(w1,))  # * input_gain
            wc = L.cast(w2, elem)
            xin = L.cast(x, elem)
            y = L.op(b * cout * (sin_ + k - 1) ** 2, elem, (xin, wc), save=(xin, wc))  # grouped conv
            signs = L.op(b * cout * tmp * tmp // 4, 1, (), rg=False)
            x = L.op(b * cout * sout * sout, elem, (y, signs), save=(signs,), grad_to=(y,))  # filtered_lrelu
        x = L.scale(x)  # * output_scale
        return L.cast(x, 4)


def build_generator(L: Layers, spec: StyleGANSpec, batch: int, trainable: bool, z: Tensor) -> Tensor:
    """Record ``G(z)`` (mapping + synthesis); returns the fp32 image."""
    g = _G(L, spec, batch, trainable) if spec.version == 2 else _G3(L, spec, batch, trainable)
    ws = g.mapping(z)
    return g.synthesis(ws)


def build_discriminator(L: Layers, spec: StyleGANSpec, batch: int, trainable: bool, img: Tensor,
                        augment: bool = True) -> Tensor:
    """Record ``D(augment(img))``; returns the logits (B, 1).

    ADA's geometric augmentations (``augpipe=bgc``) pad the images by reflection, upsample them 2x with
    an FIR filter, resample them with ``grid_sample`` (which keeps its input and the fp32 grid for
    backward) and filter them back down; the color transforms are small matrix products per image.
    """
    if augment:
        r = spec.resolution
        padded = int(r * 1.25)
        p = L.op(batch * 3 * padded * padded, 4, (img,))
        up = L.op(batch * 3 * (2 * padded) ** 2, 4, (p,))
        grid = L.op(batch * (2 * padded) ** 2 * 2, 4, (), rg=False)
        g = L.op(batch * 3 * (2 * padded) ** 2, 4, (up, grid), save=(up, grid) if up.rg else (), grad_to=(up,))
        img = L.op(batch * 3 * r * r, 4, (g,))
        img = L.op(img.numel, 4, (img,))  # color transforms
    return _D(L, spec, batch, trainable).forward(img)
