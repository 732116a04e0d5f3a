"""torchvision classification backbones, recorded op by op (torchvision 0.2x ``models/``).

* ResNet (``resnet.py``): BatchNorm after every convolution, ``ReLU(inplace=True)`` (the result
  replaces the BatchNorm output and is what backward reads), Bottleneck with the stride on the 3x3
  convolution (v1.5), the residual added in place (``out += identity``), max-pool with int64 indices.
* ViT (``vision_transformer.py``): 16x16 (or 14/32) patch convolution, a class token concatenated in
  fp32 (type promotion with the fp32 parameter), ``nn.MultiheadAttention`` with ``need_weights=False``
  (``F.multi_head_attention_forward``: one packed in-projection, a contiguous copy that separates q/k/v,
  SDPA, a contiguous copy back, the out-projection), pre-norm LayerNorms, GELU MLP.
* ConvNeXt (``convnext.py``): 7x7 depthwise convolution, channels-last LayerNorm and MLP, layer scale,
  stochastic depth (row mode) and an in-place residual add.
"""

from __future__ import annotations

from .._engine.tape import Tensor
from ._layers import Layers
from ._specs import BackboneSpec

__all__ = ["build_backbone"]


def _out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


class _ResNet:
    def __init__(self, L: Layers, spec: BackboneSpec, batch: int, tr: bool) -> None:
        self.L, self.s, self.b, self.tr = L, spec, batch, tr

    def cbr(self, x: Tensor, cin: int, cout: int, k: int, hw: int, name: str, relu: bool = True,
            stride: int = 1) -> Tensor:
        L = self.L
        y = L.conv(x, cin, cout, k, hw, name, bias=False, trainable=self.tr, batch=self.b)
        y = L.batch_norm(y, cout, trainable=self.tr, name=name.replace("conv", "bn"))
        return L.relu_(y) if relu else y

    def forward(self, x: Tensor, res: int) -> Tensor:
        L, b = self.L, self.b
        h = _out(res, 7, 2, 3)
        y = self.cbr(x, 3, 64, 7, h * h, "conv1")
        h2 = _out(h, 3, 2, 1)
        idx = L.op(b * 64 * h2 * h2, 8, (), rg=False)  # max_pool2d_with_indices: int64 indices
        y = L.op(b * 64 * h2 * h2, y.elem, (y, idx), save=(y, idx) if y.rg else (), grad_to=(y,))
        h = h2
        inplanes = 64
        exp = 4 if self.s.bottleneck else 1
        for stage, blocks in enumerate(self.s.layers):
            planes = 64 * 2**stage
            stage_in = y
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                name = f"layer{stage + 1}.{i}"
                hout = _out(h, 3, stride, 1)
                identity = y
                if self.s.bottleneck:
                    o = self.cbr(y, inplanes, planes, 1, h * h, name + ".conv1")
                    o = self.cbr(o, planes, planes, 3, hout * hout, name + ".conv2")
                    o = self.cbr(o, planes, planes * exp, 1, hout * hout, name + ".conv3", relu=False)
                else:
                    o = self.cbr(y, inplanes, planes, 3, hout * hout, name + ".conv1")
                    o = self.cbr(o, planes, planes, 3, hout * hout, name + ".conv2", relu=False)
                if stride != 1 or inplanes != planes * exp:
                    identity = L.conv(y, inplanes, planes * exp, 1, hout * hout, name + ".downsample.0",
                                      bias=False, trainable=self.tr, batch=b)
                    identity = L.batch_norm(identity, planes * exp, trainable=self.tr, name=name + ".downsample.1")
                o = L.inplace(o, others=(identity,), passthrough=True)  # out += identity
                block_in = y
                y = L.relu_(o)
                L.hold(block_in)  # the block's ``x`` (and Sequential's ``input``) until it returns
                inplanes = planes * exp
                h = hout
            L.hold(stage_in)  # ``x = self.layer1(x)``: the stage's input until the stage returns
        c = inplanes
        pooled = L.op(b * c, y.elem, (y,), save=(y,) if y.rg else ())  # adaptive_avg_pool2d saves its input
        return L.linear(pooled, c, self.s.num_classes, "fc", trainable=self.tr)


class _ViT:
    def __init__(self, L: Layers, spec: BackboneSpec, batch: int, tr: bool) -> None:
        self.L, self.s, self.b, self.tr = L, spec, batch, tr

    def forward(self, x: Tensor, res: int) -> Tensor:
        L, s, b = self.L, self.s, self.b
        p, d = s.patch_size, s.hidden_dim
        n = (res // p) ** 2
        seq = n + 1
        y = L.conv(x, 3, d, p, n, "conv_proj", trainable=self.tr, batch=b)
        L.register("class_token", (d,), self.tr)
        L.register("encoder.pos_embedding", (seq * d,), self.tr)
        cls = L.op(0, L.num.param, (), rg=self.tr, params=L.param("class_token", d, self.tr))
        # torch.cat([class_token.expand(n, -1, -1), x], dim=1): type promotion with the fp32 parameter
        h = L.op(b * seq * d, max(y.elem, L.num.param), (cls, y), passthrough=True)
        x_cat = h
        h = L.op(b * seq * d, max(h.elem, L.num.param), (h,), rg=True,
                 params=L.param("encoder.pos_embedding", seq * d, self.tr), passthrough=True)  # + pos_embedding
        x_pos = h
        for i in range(s.layers[0]):
            h = self.block(h, seq, f"encoder.layers.encoder_layer_{i}")
        h = L.layer_norm(h, d, trainable=self.tr, name="encoder.ln")
        L.hold(x_cat, x_pos)  # ``x`` in VisionTransformer.forward and ``input`` in Encoder.forward
        cls_out = L.view(h, b * d)  # x[:, 0]
        return L.linear(cls_out, d, s.num_classes, "heads.head", trainable=self.tr)

    def block(self, x: Tensor, seq: int, name: str) -> Tensor:
        L, s, b = self.L, self.s, self.b
        d, heads = s.hidden_dim, s.heads
        n = L.layer_norm(x, d, trainable=self.tr, name=name + ".ln_1")
        proj = L.linear(n, d, 3 * d, name + ".self_attention.in_proj", trainable=self.tr)
        qkv = L.copy(proj)  # unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = L.view(qkv, qkv.numel // 3), L.view(qkv, qkv.numel // 3), L.view(qkv, qkv.numel // 3)
        # attn_output.permute(2, 0, 1, 3).contiguous(): a no-op after the fused kernels, whose output takes
        # the query's memory layout (sequence-major here); the math path's copy is inside ``attention``
        o = L.attention(q, k, v, batch=b, heads=heads, sq=seq, sk=seq, head_dim=d // heads)
        o = L.linear(o, d, d, name + ".self_attention.out_proj", trainable=self.tr)
        L.hold(n)  # ``self_attention(x, x, x)``: its argument until it returns
        block_in = x
        x = L.add(o, x)
        y0 = L.layer_norm(x, d, trainable=self.tr, name=name + ".ln_2")
        y1 = L.linear(y0, d, s.mlp_dim, name + ".mlp.0", trainable=self.tr)
        y2 = L.gelu(y1)
        L.hold(y1)
        y = L.linear(y2, s.mlp_dim, d, name + ".mlp.3", trainable=self.tr)
        L.hold(y0, y2)  # ``y = self.mlp(y)`` and Sequential's ``input``
        out = L.add(x, y)
        L.hold(block_in)
        return out


class _ConvNeXt:
    def __init__(self, L: Layers, spec: BackboneSpec, batch: int, tr: bool, sd_prob: float) -> None:
        self.L, self.s, self.b, self.tr, self.sd = L, spec, batch, tr, sd_prob

    def ln2d(self, x: Tensor, c: int, name: str) -> Tensor:
        """``LayerNorm2d``: permute to channels-last, ``F.layer_norm`` (which makes its input contiguous), back."""
        L = self.L
        xin = L.fp32(x)
        L.scratch(xin.numel * xin.elem, (xin,))  # native_layer_norm's contiguous copy of the permuted input
        return L.layer_norm(xin, c, trainable=self.tr, name=name)

    def forward(self, x: Tensor, res: int) -> Tensor:
        L, s, b = self.L, self.s, self.b
        w = s.widths
        h = res // 4
        y = L.conv(x, 3, w[0], 4, h * h, "features.0.0", trainable=self.tr, batch=b)
        y = self.ln2d(y, w[0], "features.0.1")
        total = sum(s.layers)
        block_id = 0
        for stage, depth in enumerate(s.layers):
            c = w[stage]
            if stage > 0:
                y = self.ln2d(y, w[stage - 1], f"features.{2 * stage}.0")
                h //= 2
                y = L.conv(y, w[stage - 1], c, 2, h * h, f"features.{2 * stage}.1", trainable=self.tr, batch=b)
            stage_in = y
            for i in range(depth):
                p = self.sd * block_id / (total - 1) if total > 1 else 0.0
                block_in = y
                y = self.block(y, c, h * h, p, f"features.{2 * stage + 1}.{i}")
                L.hold(block_in)
                block_id += 1
            L.hold(stage_in)  # Sequential's ``input`` until the stage returns
        pooled = L.op(b * w[-1], y.elem, (y,), save=(y,) if y.rg else ())
        pooled = self.ln2d(pooled, w[-1], "classifier.0")
        return L.linear(pooled, w[-1], s.num_classes, "classifier.2", trainable=self.tr)

    def block(self, x: Tensor, c: int, hw: int, p: float, name: str) -> Tensor:
        L, b = self.L, self.b
        y = L.conv(x, c, c, 7, hw, name + ".block.0", trainable=self.tr, groups=c, batch=b)
        y = self.ln2d(y, c, name + ".block.2")
        y = L.linear(y, c, 4 * c, name + ".block.3", trainable=self.tr)
        y = L.gelu(y)
        y = L.linear(y, 4 * c, c, name + ".block.5", trainable=self.tr)
        L.register(name + ".layer_scale", (c,), self.tr)
        gamma = L.op(0, L.num.param, (), rg=self.tr, params=L.param(name + ".layer_scale", c, self.tr))
        y = L.mul(gamma, y)
        if p > 0 and L.num.training:
            noise = L.op(b, y.elem, (), rg=False)
            y = L.mul(y, noise)
        return L.inplace(y, others=(x,), passthrough=True)  # result += input


def build_backbone(L: Layers, spec: BackboneSpec, x: Tensor, batch: int, res: int, trainable: bool = True,
                   stochastic_depth: float = 0.1) -> Tensor:
    """Record one backbone forward; returns the logits (B, num_classes)."""
    if spec.kind == "resnet":
        return _ResNet(L, spec, batch, trainable).forward(x, res)
    if spec.kind == "vit":
        return _ViT(L, spec, batch, trainable).forward(x, res)
    return _ConvNeXt(L, spec, batch, trainable, stochastic_depth).forward(x, res)
