"""Vision-language models: vision tower + projector + language model, with images in the workload.

A multimodal config.json (``text_config`` + ``vision_config``) is read into the language model's
:class:`~vramplan.spec.ModelSpec` (by the text readers of :mod:`vramplan.hfconfig`) plus a :class:`MultimodalSpec`:
the vision tower and projector as transformers 5.24 builds them (``modeling_clip.py``, ``modeling_siglip.py``,
``modeling_qwen2_vl.py``, ``modeling_qwen2_5_vl.py``, ``modeling_llava.py``, ``modeling_llava_next.py``,
``modeling_gemma3.py``, ``modeling_paligemma.py``).

The tower's forward is recorded op by op on the image models' replay (:mod:`vramplan.vision._layers`), which also
registers every parameter: the tower's parameter count is that of the module tree, checked against the meta device.
The estimate composes it with the language model's, which sees ``seq_len`` text tokens plus the image tokens the
projector inserts (the processor's expansion of the image placeholder), so its activations and KV cache grow with
them:

* forward: the token embeddings are alive while the tower runs (transformers embeds the ids first, then scatters
  the image features into them); what the tower saves for backward stays alive through the language model's forward
  and backward; ``pixel_values`` (fp32, as the processor returns them) live for the whole step;
* backward: the language model's backward, then the tower's (its gradient arrives through ``masked_scatter``);
* optimizer step: the tower's gradients and optimizer states join the language model's.

Fine-tuning recipes: with an adapter method (LoRA, DoRA) the adapters go on the language model only and the tower
and projector stay frozen (LLaMA-Factory's defaults); full fine-tuning trains everything unless ``freeze_vision``
(the tower frozen, the projector trained).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ._engine.numerics import MEM_EFF_MASK_ALIGNMENT
from .errors import ConfigError, WorkloadError
from .kinds import MemoryKind, Phase
from .result import Breakdown, Estimate, PhasePeak
from .spec import ModelSpec
from .workload import Method, WeightsQuant, Workload

if TYPE_CHECKING:
    from ._engine.numerics import Numerics
    from .allocator import AllocStats

__all__ = ["MULTIMODAL_TYPES", "TEXT_ONLY_CAUSAL_LM", "MultimodalSpec", "VisionTower", "estimate_multimodal",
           "multimodal_from_config", "text_only_class", "tower_parameters"]

K = MemoryKind


@dataclass(frozen=True, slots=True)
class VisionTower:
    """A ViT-style vision encoder and the projector that maps its features into the language model."""

    style: str  # clip | siglip | qwen2_vl | qwen2_5_vl | qwen3_vl
    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    image_size: int  # the config's image size (position table), also the processor's default
    channels: int = 3
    act: str = "gelu"  # gelu | gelu_tanh | quick_gelu | silu
    temporal_patch: int = 1  # Qwen-VL: frames per patch (an image is repeated to 2)
    merge: int = 1  # Qwen-VL: spatial merge of the merger (2 x 2 patches per token)
    use_head: bool = False  # SigLIP's attention-pooling head (built, unused by the VLMs)
    window: int = 0  # Qwen2.5-VL: window attention side in pixels
    full_attention_blocks: tuple[int, ...] = ()
    pos_embeds: int = 0  # Qwen3-VL: rows of the learned position table, bilinearly resampled to each image's grid
    deepstack: tuple[int, ...] = ()  # Qwen3-VL: blocks whose output a merger of its own feeds to the language model
    patch_bias: bool = False  # Qwen3-VL: the Conv3d patch embedding has a bias
    # the tower model resolves get_input_embeddings (its patch embedding), so enable_input_require_grads hooks it;
    # Qwen3VLVisionModel names no _input_embed_layer: get_input_embeddings raises and the hook skips it
    # (modeling_utils.py PreTrainedModel.get_input_embeddings / enable_input_require_grads)
    input_embeddings: bool = True
    # projector
    projector: str = "llava"  # llava | llava_next | paligemma | gemma3 | qwen_merger
    text_hidden: int = 0
    projector_hidden: int = 0  # qwen: merger output; paligemma: projection_dim
    projector_bias: bool = True
    tokens_per_image: int = 0  # gemma3: mm_tokens_per_image
    scale_factor: int = 1  # Idefics 3 / SmolVLM pixel shuffle; InternVL: 1 / downsample_ratio
    attention_bias: bool = True  # InternViT's q/k/v bias
    feature_layer: int = -1  # llava: vision_feature_layer (hidden states of all layers are collected)
    keep_cls: bool = False  # llava: vision_feature_select_strategy "full"


@dataclass(frozen=True, slots=True)
class MultimodalSpec:
    """What a vision-language config adds to its language model."""

    model_type: str
    tower: VisionTower | None  # None: a vision tower this module does not model (the estimate refuses images)
    notes: tuple[str, ...] = ()

    @property
    def vision(self) -> VisionTower:
        if self.tower is None:
            raise WorkloadError(f"the vision tower of {self.model_type} is not modelled by vramplan estimate "
                                f"(modelled: {', '.join(MULTIMODAL_TYPES)}); add --text-only for its language model "
                                "alone, or run `vramplan trace`, which runs the whole model with images")
        return self.tower

    def image_tokens(self, size: int) -> int:
        """Tokens one image of ``size`` x ``size`` pixels adds to the language model's sequence."""
        t = self.vision
        g = size // t.patch
        if t.projector == "qwen_merger":
            return (g // t.merge) ** 2
        if t.projector == "gemma3":
            return t.tokens_per_image
        if t.projector == "llava_next":
            return _llava_next_tokens(t, size)
        if t.projector in ("idefics3", "internvl", "mistral3"):
            return (g // t.scale_factor) ** 2
        return g * g + (1 if t.keep_cls and t.style == "clip" else 0)

    def default_size(self) -> int:
        return 448 if self.vision.style.startswith("qwen") else self.vision.image_size

    def check_size(self, size: int) -> None:
        t = self.vision
        unit = t.patch * (t.merge if t.style.startswith("qwen") else t.scale_factor)
        if t.style.startswith("qwen"):
            if size % unit:
                raise WorkloadError(f"--image-size {size} must be a multiple of {unit} px for {self.model_type} (patch "
                                    f"{t.patch} x merge {t.merge}), as its processor resizes images")
        elif t.style == "pixtral":
            if size % unit or size > t.image_size:
                raise WorkloadError(f"--image-size {size} must be a multiple of {unit} px up to {t.image_size} for "
                                    f"{self.model_type} (patch {t.patch} x merge {t.scale_factor})")
        elif size != t.image_size:
            raise WorkloadError(f"{self.model_type} resizes every image to {t.image_size} px (its position table); "
                                f"drop --image-size or give {t.image_size}")


LLAVA_NEXT_CROPS = 3  # a square image at the tower's size: the base image plus the 1 x 2 pinpoint's two tiles


def _llava_next_tokens(t: VisionTower, size: int) -> int:
    """LLaVA-NeXT anyres for a square image at the tower's size: the base image's patches plus the best grid
    pinpoint's tiles, unpadded to the image's aspect, with one newline token per row (modeling_llava_next.py
    pack_image_features, select_best_resolution of image_processing_llava_next.py)."""
    g = t.image_size // t.patch
    # the processor picks the pinpoint with the largest effective resolution, then the least padding: for a square
    # image at the tower's size every pinpoint upscales to >= the image, so the smallest canvas wins (2 tiles)
    base = g * g
    return base + g * g + g


def tower_parameters(t: VisionTower | None) -> int:
    """Parameters of the vision tower and projector, as ``sum(p.numel() for p in ...)`` over their modules."""
    from ._engine.numerics import Numerics
    from .vision._layers import Layers

    if t is None:
        raise WorkloadError("this vision tower is not modelled; run `vramplan trace` for its parameter count")
    L = Layers(Numerics(False, 2, 2, False))
    _build(L, t, 1, t.image_size if not t.style.startswith("qwen") else 4 * t.patch * t.merge, True, True, False)
    return L.parameters


def _register_tables(L: Any, t: VisionTower, tr: bool, proj_tr: bool) -> None:
    """Parameters that are not read op by op: position tables, class token, post-norm, SigLIP head, newline."""
    d = t.hidden
    n = (t.image_size // t.patch) ** 2
    if t.style == "internvit":
        L.register("embeddings.cls_token", (d,), tr)
        L.register("embeddings.position_embeddings", ((n + 1) * d,), tr)
    elif t.style == "clip":
        L.register("embeddings.class_embedding", (d,), tr)
        L.register("embeddings.position_embedding", ((n + 1) * d,), tr)
        # CLIPVisionTransformer.post_layernorm normalizes the pooled class token, which LLaVA's
        # get_image_features never reads (it takes hidden_states[vision_feature_layer]): no gradient
        L.register("post_layernorm", (d, d), tr, off_path=True)
    elif t.style == "siglip":
        L.register("embeddings.position_embedding", (n * d,), tr)
        if t.use_head:
            i = t.intermediate
            L.register("head", (d, 3 * d * d, 3 * d, d * d, d, d, d, d * i, i, i * d, d), tr, off_path=True)
    if t.projector == "llava_next":
        L.register("image_newline", (t.text_hidden,), proj_tr)


def _act(L: Any, x: Any, act: str) -> Any:
    if act == "quick_gelu":  # QuickGELUActivation: x * sigmoid(1.702 x)
        s = L.scale(x)
        sg = L.unary(s, save_out=True)
        return L.mul(x, sg)
    return L.unary(x, save_in=True)  # gelu / gelu_tanh / silu: one kernel that saves its input


def _norm(L: Any, x: Any, d: int, rms: bool, tr: bool, name: str) -> Any:
    return L.rms_norm(x, d, trainable=tr, name=name) if rms else L.layer_norm(x, d, trainable=tr, name=name)


def _block(L: Any, t: VisionTower, x: Any, rows: int, seqs: list[int], tr: bool, name: str, rope: Any,
           mask: Any = None) -> Any:
    """One encoder layer: pre-norm attention and MLP with residuals (CLIPEncoderLayer, SiglipEncoderLayer,
    Idefics3EncoderLayer, InternVLVisionLayer with its layer scales, PixtralAttentionLayer, Qwen2VLVisionBlock,
    Qwen2_5_VLVisionBlock)."""
    d, heads = t.hidden, t.heads
    hd = d // heads
    style = t.style
    qwen = style.startswith("qwen")
    rms = style in ("qwen2_5_vl", "pixtral")
    bias = style != "pixtral"
    n = _norm(L, x, d, rms, tr, name + ".norm1")
    if qwen:
        qkv = L.linear(n, d, 3 * d, name + ".attn.qkv", trainable=tr)
        q, k, v = L.view(qkv, qkv.numel // 3), L.view(qkv, qkv.numel // 3), L.view(qkv, qkv.numel // 3)
    else:
        qkv_bias = t.attention_bias if style == "internvit" else bias
        q = L.linear(n, d, d, name + ".q_proj", bias=qkv_bias, trainable=tr)
        k = L.linear(n, d, d, name + ".k_proj", bias=qkv_bias, trainable=tr)
        v = L.linear(n, d, d, name + ".v_proj", bias=qkv_bias, trainable=tr)
    if rope is not None:
        # rotary embedding of q and k: (x * cos) + (rotate_half(x) * sin); Qwen-VL computes it in fp32
        # (apply_rotary_pos_emb_vision), Pixtral in the activations' dtype
        outs = []
        for z in (q, k):
            zc = L.cast(z, 4) if qwen else z
            a = L.mul(zc, rope)
            half = L.cat((L.scale(L.view(zc, zc.numel // 2)), L.view(zc, zc.numel // 2)))
            b2 = L.mul(half, rope)
            outs.append(L.cast(L.add(a, b2), z.elem))
        q, k = outs
    padded = None
    if style == "pixtral" and rows % MEM_EFF_MASK_ALIGNMENT:
        # the block mask (1, 1, N, N) reaches the memory-efficient kernel with a last dim that is not a multiple of 8:
        # preprocess_mask pads it (pad_bias: a (1, 1, N, N + pad) copy) and only then expands it over the batch and
        # heads as a view (aten/src/ATen/native/transformers/attention.cpp, torch 2.4+; torch 2.0-2.3 padded the
        # per-head expansion, 16x larger here), which the kernel's backward keeps as its bias
        # (made from the mask the layer is called with: under checkpointing the checkpoint holds that argument for
        # the layer's backward, as it holds every input)
        align = MEM_EFF_MASK_ALIGNMENT
        padded = L.op(rows * (rows + align - rows % align), 2 if L.num.amp else L.num.act,
                      (mask,) if mask is not None else (), rg=False)
    elif mask is not None:
        L.scratch(0, (mask,))  # the layer reads the mask: a checkpoint holds it
    parts = []
    for s in seqs:  # Qwen-VL: one attention call per image (or window) of the packed sequence
        frac = s / rows
        qi = L.view(q, int(q.numel * frac)) if len(seqs) > 1 else q
        ki = L.view(k, int(k.numel * frac)) if len(seqs) > 1 else k
        vi = L.view(v, int(v.numel * frac)) if len(seqs) > 1 else v
        parts.append(L.attention(qi, ki, vi, batch=1 if qwen else rows // s, heads=heads, sq=s, sk=s, head_dim=hd,
                                 has_mask=style == "pixtral"))
    if padded is not None:
        L.hold(padded)
        if parts[0].rg and L.num.training:
            i = len(L.ops) - 1
            L.ops[i].saved += (padded,)
            padded.saved_by.append(i)
    o = L.cat(tuple(parts)) if len(parts) > 1 else parts[0]
    o = L.copy(o)  # attn_output.transpose(1, 2).contiguous() / reshape
    o = L.linear(o, d, d, name + ".o_proj", bias=bias, trainable=tr)
    L.hold(n)
    if style == "internvit":  # lambda_1 * attention output
        o = L.op(o.numel, o.elem, (o,), save=(o,) if tr else (), params=L.param(name + ".lambda_1", d, tr),
                 rg=o.rg or tr)
        L.register(name + ".lambda_1", (d,), tr)
    x = L.add(x, o)
    m = _norm(L, x, d, rms, tr, name + ".norm2")
    i = t.intermediate
    if style in ("qwen2_5_vl", "pixtral"):
        g = L.linear(m, d, i, name + ".mlp.gate_proj", bias=bias, trainable=tr)
        u = L.linear(m, d, i, name + ".mlp.up_proj", bias=bias, trainable=tr)
        h = L.mul(_act(L, g, t.act), u)
        y = L.linear(h, i, d, name + ".mlp.down_proj", bias=bias, trainable=tr)
    else:
        h1 = L.linear(m, d, i, name + ".mlp.fc1", trainable=tr)
        h2 = _act(L, h1, t.act)
        y = L.linear(h2, i, d, name + ".mlp.fc2", trainable=tr)
    L.hold(m)
    if style == "internvit":
        y = L.op(y.numel, y.elem, (y,), save=(y,) if tr else (), params=L.param(name + ".lambda_2", d, tr),
                 rg=y.rg or tr)
        L.register(name + ".lambda_2", (d,), tr)
    return L.add(x, y)


def _register_merger(L: Any, t: VisionTower, name: str, tr: bool, post_shuffle: bool) -> None:
    """A Qwen3-VL patch merger's parameters (registered up front: a deepstack merger past the depth is built but
    never runs)."""
    d4 = t.hidden * t.merge * t.merge
    n = d4 if post_shuffle else t.hidden
    L.register(name + ".norm", (n, n), tr)
    L.register(name + ".linear_fc1", (d4 * d4, d4), tr)
    L.register(name + ".linear_fc2", (d4 * t.projector_hidden, t.projector_hidden), tr)


def _resampled_positions(L: Any, t: VisionTower, x: Any, rows: int, tr: bool) -> Any:
    """Qwen3-VL's learned positions, bilinearly resampled to the image's grid (modeling_qwen3_vl.py
    Qwen3VLVisionModel.forward): ``(pos_embed(idx) * weights[:, :, None]).sum(1)`` over the 4 nearest table rows
    of each patch, the fp32 weights promoting the product and the sum to fp32, cast back, added to the patches."""
    d = t.hidden
    L.register("pos_embed", (t.pos_embeds * d,), tr)
    e = L.op(rows * 4 * d, L.num.act, (), params=L.param("pos_embed", t.pos_embeds * d, tr), rg=tr and L.num.training)
    w = L.op(rows * 4, 4, (), rg=False)  # the bilinear weights (N, 4)
    pe = L.mul(e, w, elem=4)
    pe = L.op(rows * d, 4, (pe,), passthrough=True)  # .sum(1)
    return L.add(x, L.cast(pe, x.elem))


def _build(L: Any, t: VisionTower, images: int, size: int, tower_tr: bool, proj_tr: bool, ckpt: bool,
           input_rg: bool = False) -> Any:
    """Record the tower and projector forward for ``images`` images of ``size`` px; returns the features."""
    return _build_all(L, t, images, size, tower_tr, proj_tr, ckpt, input_rg)[0]


def _build_all(L: Any, t: VisionTower, images: int, size: int, tower_tr: bool, proj_tr: bool, ckpt: bool,
               input_rg: bool = False) -> tuple[Any, list[Any]]:
    """Record the tower and projector forward for ``images`` images of ``size`` px; returns the features and the
    DeepStack features (Qwen3-VL: one per ``deepstack`` block the depth reaches, added to the language model's
    first layers' outputs).

    ``input_rg``: the patch embedding's output requires grad although no weight of the tower trains: transformers'
    ``enable_input_require_grads`` (called for adapters with gradient checkpointing) hooks the input embeddings of
    every sub-model, the vision tower's included (modeling_utils.py), so the tower keeps a graph for its input
    gradient and its layers are checkpointed like the language model's."""
    deep: list[Any] = []
    return _tower(L, t, images, size, tower_tr, proj_tr, ckpt, input_rg, deep), deep


def _tower(L: Any, t: VisionTower, images: int, size: int, tower_tr: bool, proj_tr: bool, ckpt: bool,
           input_rg: bool, deep: list[Any]) -> Any:
    ckpt = ckpt and (tower_tr or input_rg)
    d = t.hidden
    g = size // t.patch
    patches = g * g
    pix = L.input(images * t.channels * size * size * t.temporal_patch, 4)
    _register_tables(L, t, tower_tr, proj_tr)
    x = L.cast(pix, L.num.act if not L.num.amp else 4)  # pixel_values.to(the tower's dtype)
    if t.style.startswith("qwen"):
        rows = images * patches
        x = L.conv(x, t.channels, d, (t.temporal_patch * t.patch, t.patch), 1, "patch_embed.proj",
                   bias=t.patch_bias, trainable=tower_tr, batch=rows)
        x.rg = x.rg or (input_rg and L.num.training)
        if t.pos_embeds:
            x = _resampled_positions(L, t, x, rows, tower_tr)
        # rotary tables: cos and sin of the (rows, head_dim) fp32 embedding, alive for every block
        rope = L.op(rows * (d // t.heads), 4, (), rg=False)
        rope2 = L.op(rows * (d // t.heads), 4, (), rg=False)
        L.hold(rope2)
        if t.window:
            x = L.copy(x)  # hidden_states[window_index]: the patches reordered into windows
        win = (t.window // t.patch // t.merge) * t.merge if t.window else 0
        m2 = t.merge * t.merge
        for j in range(len(t.deepstack)):  # built whatever the depth: the mergers of indexes past it never run
            # part of the tower (visual.deepstack_merger_list): --freeze-vision freezes them with the blocks, the
            # projector being visual.merger alone (LLaMA-Factory's Qwen3-VL vision keys, and the trace's)
            _register_merger(L, t, f"deepstack_merger_list.{j}", tower_tr, post_shuffle=True)
        for i in range(t.layers):
            if t.window and i not in t.full_attention_blocks:
                w = win * win
                seqs = [w] * (rows // w) + ([rows % w] if rows % w else [])
            else:
                seqs = [patches] * images
            with L.checkpoint(ckpt):
                x = _block(L, t, x, rows, seqs, tower_tr, f"blocks.{i}", rope)
            if i in t.deepstack:
                # Qwen3VLVisionPatchMerger(use_postshuffle_norm=True) on the block's output: LayerNorm over the
                # d * merge**2 features of each merged token, Linear, GELU, Linear (modeling_qwen3_vl.py)
                name = f"deepstack_merger_list.{t.deepstack.index(i)}"
                f = L.layer_norm(L.view(x), d * m2, trainable=tower_tr, name=name + ".norm")
                h = L.linear(f, d * m2, d * m2, name + ".linear_fc1", trainable=tower_tr)
                h = _act(L, h, "gelu")
                deep.append(L.linear(h, d * m2, t.projector_hidden, name + ".linear_fc2", trainable=tower_tr))
        L.hold(rope)
        # merger: ln_q, view(-1, d * merge**2), Linear, GELU, Linear (modeling_qwen2_vl.py PatchMerger,
        # modeling_qwen3_vl.py Qwen3VLVisionPatchMerger: the same with LayerNorm names norm / linear_fc1 / linear_fc2)
        x = _norm(L, x, d, t.style == "qwen2_5_vl", proj_tr, "merger.ln_q")
        h = L.linear(x, d * m2, d * m2, "merger.mlp.0", trainable=proj_tr)
        h = _act(L, h, "gelu")
        out = L.linear(h, d * m2, t.projector_hidden, "merger.mlp.2", trainable=proj_tr)
        if t.window:
            out = L.copy(out)  # [reverse_indices]
        return out
    cls = t.style in ("clip", "internvit")
    seq = patches + (1 if cls else 0)
    x = L.conv(x, t.channels, d, t.patch, patches, "embeddings.patch_embedding",
               bias=t.style not in ("clip", "pixtral"), trainable=tower_tr, batch=images)
    x.rg = x.rg or (input_rg and L.num.training)
    x = L.copy(x)  # flatten(2).transpose(1, 2) then the position add / class-token cat
    rope = mask = None
    if cls:
        x = L.cat((x,))  # torch.cat([class_embeds, patch_embeds])
    if t.style == "pixtral":
        x = L.rms_norm(x, d, trainable=tower_tr, name="ln_pre")
        # 2-D rotary cos/sin (patches, head_dim) and the block-diagonal attention mask (1, 1, N, N) in the
        # activations' dtype (modeling_pixtral.py generate_block_attention_mask), alive for every layer
        rope = L.op(2 * images * patches * (d // t.heads), L.num.act, (), rg=False)
        mask = L.op(seq * seq * images * images, L.num.act, (), rg=False)
    else:
        x = L.op(x.numel, x.elem, (x,), passthrough=True)  # + position_embedding
    if t.style == "clip":
        x = L.layer_norm(x, d, trainable=tower_tr, name="pre_layrnorm")
    rows = images * seq
    states = [x]
    for i in range(t.layers):
        with L.checkpoint(ckpt):
            x = _block(L, t, x, rows, [seq] if t.style != "pixtral" else [rows], tower_tr, f"encoder.layers.{i}",
                       rope, mask)
        states.append(x)
    if t.style == "pixtral":
        L.hold(rope, mask, *states)  # Mistral 3 asks the tower for every layer's hidden states
    if t.projector in ("llava", "llava_next"):
        # output_hidden_states=True: every layer's output is in the tower's output, which the model keeps until its
        # forward returns
        L.keep(*states)
        sel = states[t.feature_layer] if -len(states) <= t.feature_layer < len(states) else x
        feats = images * patches if not t.keep_cls else rows
        f = L.view(sel, feats * d)  # [:, 1:] for the "default" strategy
        f = L.copy(f) if not t.keep_cls else f
        h = L.linear(f, d, t.text_hidden, "multi_modal_projector.linear_1", bias=t.projector_bias,
                     trainable=proj_tr)
        h = _act(L, h, "gelu")
        out = L.linear(h, t.text_hidden, t.text_hidden, "multi_modal_projector.linear_2", bias=t.projector_bias,
                       trainable=proj_tr)
        if t.projector == "llava_next":
            # pack_image_features: per image, the base crop's features and the tiles' unpadded grid with a newline
            # per row (a list the model keeps), then torch.cat of the list
            per = L.op(images // LLAVA_NEXT_CROPS * _llava_next_tokens(t, size) * t.text_hidden, out.elem, (out,),
                       passthrough=True)
            L.keep(per)
            out = L.copy(per)
        return out
    if t.projector == "internvl":
        # last_hidden_state[:, 1:], pixel_shuffle (downsample 0.5: views and two contiguous copies), then
        # InternVLMultiModalProjector: LayerNorm(4d), linear_1, GELU, linear_2
        f = L.copy(L.view(x, images * patches * d))
        f = L.copy(f)
        f = L.layer_norm(f, 4 * d, trainable=proj_tr, name="multi_modal_projector.layer_norm")
        h = L.linear(f, 4 * d, t.text_hidden, "multi_modal_projector.linear_1", trainable=proj_tr)
        h = _act(L, h, "gelu")
        return L.linear(h, t.text_hidden, t.text_hidden, "multi_modal_projector.linear_2", trainable=proj_tr)
    if t.projector == "mistral3":
        # Mistral3MultiModalProjector: RMSNorm, patch merger (unfold 2 x 2 patches: a copy, Linear(4d, d)),
        # linear_1, GELU, linear_2
        f = L.rms_norm(x, d, trainable=proj_tr, name="multi_modal_projector.norm")
        f = L.copy(f)
        f = L.copy(f)
        f = L.linear(f, 4 * d, d, "multi_modal_projector.patch_merger.merging_layer", bias=False, trainable=proj_tr)
        h = L.linear(f, d, t.text_hidden, "multi_modal_projector.linear_1", bias=t.projector_bias, trainable=proj_tr)
        h = _act(L, h, "gelu")
        return L.linear(h, t.text_hidden, t.text_hidden, "multi_modal_projector.linear_2", bias=t.projector_bias,
                        trainable=proj_tr)
    x = L.layer_norm(x, d, trainable=tower_tr, name="post_layernorm")  # SiglipVisionTransformer.post_layernorm
    if t.projector == "idefics3":
        # Idefics3Connector: pixel_shuffle (views and permutes: two copies), Linear(d * s**2, text, no bias)
        f = L.copy(x)
        f = L.copy(f)
        s2 = t.scale_factor * t.scale_factor
        return L.linear(f, d * s2, t.text_hidden, "connector.modality_projection.proj", bias=False,
                        trainable=proj_tr)
    if t.projector == "paligemma":
        out = L.linear(x, d, t.projector_hidden, "multi_modal_projector.linear", trainable=proj_tr)
        return L.scale(out)  # image_features / sqrt(hidden)
    # Gemma 3: transpose, reshape, AvgPool2d to tokens_per_image, flatten, RMSNorm, @ mm_input_projection_weight;
    # get_image_features returns the tower's output with the projection as its pooler_output: the model's forward
    # holds last_hidden_state (the post-norm output) until it returns (modeling_gemma3.py)
    L.keep(x)
    tok = images * t.tokens_per_image
    y = L.copy(x)
    y = L.op(tok * d, y.elem, (y,))
    y = L.copy(y)
    y = L.rms_norm(y, d, trainable=proj_tr, name="multi_modal_projector.mm_soft_emb_norm")
    L.register("multi_modal_projector.mm_input_projection_weight", (d * t.text_hidden,), proj_tr)
    return L.op(tok * t.text_hidden, y.elem, (y,), save=(y,) if proj_tr else (),
                params=L.param("multi_modal_projector.mm_input_projection_weight", d * t.text_hidden, proj_tr),
                rg=y.rg or proj_tr, grad_to=(y,))


# ---- reading configs ----------------------------------------------------------------------------------------------

MULTIMODAL_TYPES = ("llava", "llava_next", "gemma3", "paligemma", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5",
                    "qwen3_5_moe", "idefics3", "smolvlm", "internvl", "mistral3")
# Composite configs whose causal-LM class in transformers 5.24 (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
# models/auto/modeling_auto.py) is the language model alone: its ``config_class`` is the text sub-config's, so
# ``AutoModelForCausalLM`` builds it on ``config.get_text_config()`` (models/auto/auto_factory.py) and no vision
# tower exists. tests/test_multimodal.py checks this table against the installed transformers.
TEXT_ONLY_CAUSAL_LM = {"dots3_note": "Dots3NoteForCausalLM", "emu3": "Emu3ForCausalLM", "llama4": "Llama4ForCausalLM",
                       "mllama": "MllamaForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM",
                       "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "qwen4_exp": "Qwen4ExpForCausalLM"}


def text_only_class(raw: Mapping[str, Any]) -> str | None:
    """The causal-LM class transformers builds on this composite config's text_config alone, or None when it builds
    the whole model. Resolved as the trace resolves it (vramplan.trace._resolve.model_class): ``architectures``
    naming the causal-LM class, or naming no other model class (no ``...ForConditionalGeneration``), leaves the
    causal-LM mapping's class; an image-text class in ``architectures`` builds the whole model."""
    cls = TEXT_ONLY_CAUSAL_LM.get(str(raw.get("model_type")))
    if cls is None:
        return None
    archs = raw.get("architectures")
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if cls in names or not any(a.endswith("ForConditionalGeneration") for a in names):
        return cls
    return None


# the language model's reader for text configs that only exist inside a multimodal config
TEXT_ALIASES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2",
                "qwen3_vl_text": "qwen3"}


def _int(c: Mapping[str, Any], key: str, default: Any, where: str) -> int:
    v = c.get(key, default)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 22:
        raise ConfigError(f"{where}: vision_config field {key!r} must be a positive integer, got {v!r}")
    return v


def multimodal_from_config(raw: Mapping[str, Any], text_hidden: int, name: str) -> MultimodalSpec | None:
    """The vision tower of a vision-language config, or None for a model type this module does not model."""
    mt = raw.get("model_type")
    vc = raw.get("vision_config")
    if not isinstance(vc, Mapping):
        return None
    if mt not in MULTIMODAL_TYPES:
        return MultimodalSpec(str(mt), None)
    w = f"{name}: vision_config"
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        q25 = mt == "qwen2_5_vl"
        embed = _int(vc, "hidden_size" if q25 else "embed_dim", 3584 if q25 else 1280, w)
        heads = _int(vc, "num_heads", 16, w)
        inter = _int(vc, "intermediate_size", 3420, w) if q25 else embed * _int(vc, "mlp_ratio", 4, w)
        out = _int(vc, "out_hidden_size", 3584, w) if q25 else _int(vc, "hidden_size", 3584, w)
        full = vc.get("fullatt_block_indexes", [7, 15, 23, 31]) if q25 else []
        if not isinstance(full, list) or not all(isinstance(x, int) for x in full):
            raise ConfigError(f"{w}: fullatt_block_indexes must list block indices")
        tower = VisionTower(
            style=mt, hidden=embed, layers=_int(vc, "depth", 32, w), heads=heads, intermediate=inter,
            patch=_int(vc, "patch_size", 14, w), image_size=448, channels=_int(vc, "in_channels", 3, w),
            act=str(vc.get("hidden_act", "silu" if q25 else "quick_gelu")),
            temporal_patch=_int(vc, "temporal_patch_size", 2, w), merge=_int(vc, "spatial_merge_size", 2, w),
            window=_int(vc, "window_size", 112, w) if q25 else 0, full_attention_blocks=tuple(full),
            projector="qwen_merger", text_hidden=text_hidden, projector_hidden=out)
        if out != text_hidden:
            raise ConfigError(f"{name}: the vision merger's output ({out}) is not the language model's width "
                              f"({text_hidden}); check vision_config")
        return MultimodalSpec(mt, tower)
    if mt in ("qwen3_vl", "qwen3_5", "qwen3_5_moe"):
        # Qwen3VLVisionConfig (configuration_qwen3_vl.py): LayerNorm blocks with a fused qkv, a GELU-tanh MLP, a
        # learned position table resampled per image, and DeepStack mergers; Qwen3.5's tower is the same without
        # DeepStack (Qwen3_5VisionModel, modeling_qwen3_5.py)
        out = _int(vc, "out_hidden_size", 3584, w)
        deep = vc.get("deepstack_visual_indexes", [8, 16, 24]) if mt == "qwen3_vl" else []
        if not isinstance(deep, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                 for x in deep):
            raise ConfigError(f"{w}: deepstack_visual_indexes must list block indices")
        tower = VisionTower(
            style="qwen3_vl", hidden=_int(vc, "hidden_size", 1152, w), layers=_int(vc, "depth", 27, w),
            heads=_int(vc, "num_heads", 16, w), intermediate=_int(vc, "intermediate_size", 4304, w),
            patch=_int(vc, "patch_size", 16, w), image_size=448, channels=_int(vc, "in_channels", 3, w),
            act=str(vc.get("hidden_act", "gelu_pytorch_tanh")), temporal_patch=_int(vc, "temporal_patch_size", 2, w),
            merge=_int(vc, "spatial_merge_size", 2, w), pos_embeds=_int(vc, "num_position_embeddings", 2304, w),
            deepstack=tuple(deep), patch_bias=True, input_embeddings=False, projector="qwen_merger",
            text_hidden=text_hidden, projector_hidden=out)
        if out != text_hidden:
            raise ConfigError(f"{name}: the vision merger's output ({out}) is not the language model's width "
                              f"({text_hidden}); check vision_config out_hidden_size")
        if tower.hidden % tower.heads or tower.act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu"):
            raise ConfigError(f"{w}: hidden_size must divide into num_heads, and hidden_act be a GELU or SiLU")
        return MultimodalSpec(mt, tower)
    style = {"llava": "clip", "llava_next": "clip", "internvl": "internvit", "mistral3": "pixtral"}.get(mt, "siglip")
    hidden = _int(vc, "hidden_size", 1024 if style == "clip" else 1152, w)
    scale = 1
    if mt in ("idefics3", "smolvlm"):
        scale = _int(raw, "scale_factor", 2, name)
    elif mt == "internvl":
        ratio = raw.get("downsample_ratio", 0.5)
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or not float(1 / ratio).is_integer():
            raise ConfigError(f"{name}: downsample_ratio must be 1/N, got {ratio!r}")
        scale = int(1 / ratio)
    elif mt == "mistral3":
        scale = _int(raw, "spatial_merge_size", 2, name)
    tower = VisionTower(
        style=style, hidden=hidden, layers=_int(vc, "num_hidden_layers", 24 if style == "clip" else 27, w),
        heads=_int(vc, "num_attention_heads", 16, w), intermediate=_int(vc, "intermediate_size", 4096, w),
        patch=_int(vc, "patch_size", 14, w), image_size=_int(vc, "image_size", 336 if style == "clip" else 224, w),
        channels=_int(vc, "num_channels", 3, w),
        act=str(vc.get("hidden_act", {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}.get(style, "gelu"))),
        # SiglipVisionConfig's default builds the attention-pooling head; Idefics 3's vision model has none
        use_head=bool(vc.get("vision_use_head", True)) and mt in ("gemma3", "paligemma"),
        projector={"smolvlm": "idefics3"}.get(mt, mt), scale_factor=scale,
        attention_bias=bool(vc.get("attention_bias", False)) if style == "internvit" else True,
        text_hidden=text_hidden,
        projector_hidden=_int(vc, "projection_dim", text_hidden, w) if mt == "paligemma" else text_hidden,
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        tokens_per_image=_int(raw, "mm_tokens_per_image", 256, name) if mt == "gemma3" else 0,
        feature_layer=raw.get("vision_feature_layer", -2) if isinstance(raw.get("vision_feature_layer", -2), int)
        else -2,
        # defaults of the configs: InternVL and Mistral 3 read the last layer, LLaVA the second to last
        keep_cls=raw.get("vision_feature_select_strategy", "default") == "full")
    if tower.projector == "gemma3":
        g = tower.image_size // tower.patch
        side = math.isqrt(tower.tokens_per_image)
        if side * side != tower.tokens_per_image or not side or g % side:
            raise ConfigError(f"{name}: {g} x {g} patches do not pool to mm_tokens_per_image "
                              f"{tower.tokens_per_image}; check vision_config image_size / patch_size")
    if style == "internvit" and (vc.get("norm_type", "layer_norm") != "layer_norm" or vc.get("use_qk_norm")
                                 or vc.get("use_mean_pooling", True) is not True):
        raise ConfigError(f"{w}: InternViT with rms_norm, q/k norms or a final layernorm is not modelled; use "
                          "`vramplan trace`")
    if tower.act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", "gelu_new"):
        raise ConfigError(f"{w}: hidden_act {tower.act!r} is not modelled for the vision tower")
    return MultimodalSpec(mt, tower)


# ---- the estimate -------------------------------------------------------------------------------------------------

def _vec(d: Mapping[MemoryKind, int]) -> tuple[int, ...]:
    return tuple(d.get(k, 0) for k in MemoryKind)


def _add(*vs: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sum(x) for x in zip(*vs, strict=True))


def _kinds(b: Breakdown) -> tuple[int, ...]:
    return tuple(b[k] for k in MemoryKind)


def _phase(phase: Phase, v: tuple[int, ...]) -> PhasePeak:
    return PhasePeak(phase, sum(v), Breakdown.of(dict(zip(MemoryKind, v, strict=True))))


def _text_only(spec: ModelSpec, w: Workload, name: str) -> ModelSpec:
    """The language model of ``spec`` as ``--text-only`` runs it. transformers' causal-LM class for this config is the
    image-text class (the types with a text-only class never get here: hfconfig drops their tower), so the model is
    built whole: the tower's and projector's weights count, and on text tokens they run nothing, so they get no
    gradient and no optimizer state (idle). With quantized weights (the tower's linears quantized too) they are
    left out, as before."""
    mm = spec.multimodal
    assert mm is not None
    text = replace(spec, multimodal=None)
    if mm.tower is None or w.base_quant is not WeightsQuant.NONE:
        return text
    n = tower_parameters(mm.tower)
    note = (f"{name}: --text-only runs the language model on text tokens, but transformers builds the whole "
            f"{mm.model_type} model: the vision tower and projector ({n / 1e6:.0f}M parameters) count as weights; "
            "they run nothing and get no gradient or optimizer state")
    return replace(text, extra_params=text.extra_params + n, idle_params=text.idle_params + n, notes=(note,))


def route(spec: ModelSpec, w: Workload, name: str, reserved: bool = True) -> Estimate:
    """``estimate`` for a spec with a vision tower or a workload with vision options. ``reserved``: as
    :func:`vramplan.estimator.estimate` takes it, for ``--text-only`` (the whole model never replays)."""
    from . import estimator

    if spec.multimodal is None:
        raise WorkloadError(f"{name} is a text model: --images, --image-size, --freeze-vision and --text-only apply to "
                            "vision-language models; drop them")
    if w.text_only:
        return estimator.estimate(_text_only(spec, w, name), w.with_(text_only=False), name=name, reserved=reserved)
    _ = spec.multimodal.vision  # refuses a tower that is not modelled, saying what to do
    return _estimate_multimodal_cached(spec, w, name, reserved)


def check_workload(spec: ModelSpec, w: Workload) -> None:
    """What a vision-language estimate refuses, with what to do instead."""
    mm = spec.multimodal
    assert mm is not None
    if w.base_quant is not WeightsQuant.NONE:
        raise WorkloadError(f"{spec.name}: quantized weights (qlora, --weights-quant) are not modelled with the vision "
                            "tower; add --text-only for the language model alone, or run `vramplan trace`")
    if w.packing:
        raise WorkloadError("--packing is not modelled for vision-language models; drop it")
    if w.image_size is not None:
        mm.check_size(w.image_size)


def estimate_multimodal(spec: ModelSpec, w: Workload, name: str, reserved: bool = True) -> Estimate:
    """The whole vision-language model: tower + projector + language model with the image tokens."""
    return _estimate_multimodal_cached(spec, w, name, reserved)


@dataclass(frozen=True, slots=True)
class _TowerRun:
    """What the whole-model estimate takes from the vision tower's program (it does not depend on the text)."""

    deep: int  # DeepStack levels the tower makes
    idle: int  # trainable parameters the backward never reaches (unused DeepStack mergers, LLaVA's last CLIP layers...)
    idle_sizes: tuple[int, ...]  # their tensors' element counts (no gradient, so no optimizer state)
    params: int
    trainable: int
    sizes: tuple[int, ...]  # the trainable tensors' element counts
    kept: int  # bytes the model keeps referenced after the tower's forward
    peak: tuple[int, ...]  # the tower's forward peak by kind
    end: tuple[int, ...]  # what its forward leaves by kind
    backward: tuple[int, ...]  # its backward's peak by kind (where it leaves a graph), else ()
    out_bytes: int  # the features the language model uses (their gradients arrive in backward)


def _tower_tape(t: VisionTower, num: Numerics, crops: int, size: int, tower_tr: bool, proj_tr: bool, ckpt: bool,
                input_rg: bool, text_layers: int) -> tuple[Any, list[Any], int]:
    """The tower + projector recorded for ``crops`` images: (the tape, the outputs the language model uses, whose
    gradients seed the tower's backward, the DeepStack levels it adds)."""
    from .vision._layers import Layers

    L = Layers(num)
    feats, deep = _build_all(L, t, crops, size, tower_tr, proj_tr, ckpt, input_rg)
    used = min(len(deep), text_layers)
    outs = [feats, *deep]
    if t.projector == "qwen_merger":
        # Qwen-VL: get_image_features splits the merger's output per image (views), the model's forward joins them
        # with torch.cat (a copy; each DeepStack level too, modeling_qwen3_vl.py Qwen3VLModel.forward)
        outs = [L.copy(f) for f in outs]
    # the model's forward holds the features (the encoder outputs and what it makes of them) until it returns
    L.keep(feats, *deep, *outs)
    return L, outs[:1 + used], used


@lru_cache(maxsize=256)
def _tower_run(t: VisionTower, num: Numerics, crops: int, size: int, tower_tr: bool, proj_tr: bool, ckpt: bool,
               input_rg: bool, text_layers: int, graph: bool, accumulating: bool) -> _TowerRun:
    """The tower + projector program recorded and replayed once per shape: a new text length reuses it."""
    from ._engine.replay import backward as replay_backward
    from ._engine.replay import forward as replay_forward
    from ._engine.tape import ZERO

    L, outs, used = _tower_tape(t, num, crops, size, tower_tr, proj_tr, ckpt, input_rg, text_layers)
    # DeepStack levels past the language model's depth are computed but never added (Qwen3VLTextModel.forward adds
    # level i after layer i): no gradient reaches them or their mergers
    # (nor to the mergers of indexes past the tower's depth, which never run)
    ran = [t.deepstack.index(i) for i in range(t.layers) if i in t.deepstack]
    idle_names = {n for j in range(len(t.deepstack)) if j not in ran[:used]
                  for n in (f"deepstack_merger_list.{j}.{m}" for m in ("norm", "linear_fc1", "linear_fc2"))}
    # every trainable parameter the backward from those never reaches gets no gradient: those mergers, the layers
    # after LLaVA's vision_feature_layer (computed, unused), modules registered off the path (CLIP's post_layernorm,
    # SigLIP's attention-pooling head)
    idle_names |= L.params_without_grad(outs) | L.off_path_names
    idle_sizes = tuple(x for n in sorted(idle_names & L.trainable_names) for x in L.param_tensors[n]) \
        if num.training else ()
    fwd = replay_forward(L, ZERO)
    kept = sum(x.nbytes for x in L.tensors if x.keep and not x.external and x.base is None)
    bpeak = replay_backward(L, fwd, outs, param_grads_exist=accumulating)[0].kinds if graph else ()
    return _TowerRun(used, sum(idle_sizes), idle_sizes, L.parameters, L.trainable_parameters,
                     tuple(L.trainable_tensor_sizes()) if num.training and L.trainable_parameters else (), kept,
                     fwd.peak.kinds, fwd.end.kinds, bpeak, sum(f.nbytes for f in outs))


@lru_cache(maxsize=1024)
def _estimate_multimodal_cached(spec: ModelSpec, w: Workload, name: str, reserved: bool = True) -> Estimate:
    """The whole vision-language model: tower + projector + language model with the image tokens. ``reserved``:
    replay the whole model's allocation stream (:func:`_whole_model_stream`), else the calibration slack."""
    from . import estimator
    from ._engine.numerics import Numerics
    from ._engine.step import ALLOCATOR_SLACK_FRACTION, CUDA_CONTEXT_BYTES, finish, workload_dict
    from .memory import _optimizer_bytes
    from .units import GiB

    mm = spec.multimodal
    assert mm is not None
    check_workload(spec, w)
    t = mm.vision
    images = w.images or 1
    size = w.image_size or mm.default_size()
    per = mm.image_tokens(size) * images
    text = replace(spec, multimodal=None, notes=())
    tw = w.with_(seq_len=w.seq_len + per, images=None, image_size=None, freeze_vision=False)
    base_bd = estimator.stage_base(text, tw)  # what the step starts from
    # the language model alone, without its allocator replay: the whole model's reserve is the allocated peak + the
    # calibration slack (below), so the replay's figures would not be used (only its assumption line is replaced)
    text_est = estimator.estimate(text, tw, name=name, reserved=False)
    replay_note = estimator.reserve_note(text, estimator.runs_as(text, tw), False) if estimator.replays(text) else None

    train = w.is_train
    full = w.method is Method.FULL
    tower_tr = train and full and not w.freeze_vision
    proj_tr = train and full
    num_ = estimator.numerics(w)
    num = Numerics(train, num_.act, w.precision.param_bytes, w.precision.is_amp)
    n_img = w.batch_size * images
    input_rg = train and w.uses_adapters and w.gradient_checkpointing and t.input_embeddings
    crops = n_img * (LLAVA_NEXT_CROPS if t.projector == "llava_next" else 1)  # the tower sees every anyres crop
    accumulating = w.gradient_accumulation > 1
    graph = train and (tower_tr or proj_tr or input_rg)  # the tower's forward leaves a graph for backward
    tower = _tower_run(t, num, crops, size, tower_tr, proj_tr, train and w.gradient_checkpointing, input_rg,
                       text.num_layers, graph, accumulating)
    deep, idle, params, kept = tower.deep, tower.idle, tower.params, tower.kept
    trainable = tower.trainable if train else 0
    pbytes = w.precision.param_bytes
    weights = params * pbytes
    master = 0
    if w.precision.is_amp:
        master, weights = params * 4, 0
    grads = (trainable - idle) * pbytes if trainable else 0
    state = temp = 0
    if trainable:
        # the optimizer creates state for, and steps, the parameters that have a gradient (torch/optim/adam.py
        # _init_group passes over grad None): not the idle ones
        sizes = Counter(tower.sizes)
        sizes.subtract(tower.idle_sizes)
        state, temp, _ = _optimizer_bytes(w.optimizer, trainable - idle, pbytes, +sizes)
    states_fb = _vec({K.WEIGHTS: weights, K.MASTER_WEIGHTS: master, K.OPTIMIZER_STATE: state,
                      K.GRADIENTS: grads if accumulating else 0})
    states_step = _vec({K.WEIGHTS: weights, K.MASTER_WEIGHTS: master, K.OPTIMIZER_STATE: state + temp,
                        K.GRADIENTS: grads})
    pixels = crops * t.channels * size * size * t.temporal_patch * 4
    # tensors of the tower that outlive its forward: in the forward, everything it left (saved for backward, the
    # pixels, the features and the outputs the model keeps referenced until it returns); in the backward, what
    # it saved for backward
    held_fwd = tower.end
    held_fwd = _add(held_fwd, _vec({K.ACTIVATIONS: language_model_extra(t, text, w.batch_size, w.seq_len + per,
                                                                         num_.act, deep > 0)}))
    saved = tuple(a - b for a, b in zip(tower.end, _vec({K.ACTIVATIONS: kept}), strict=True))
    held = saved if graph else _vec({K.ACTIVATIONS: pixels})
    embeds = _vec({K.ACTIVATIONS: w.batch_size * (w.seq_len + per) * text.hidden_size * num_.norm_param})
    base = _kinds(base_bd)

    phases: list[PhasePeak] = []
    for ph in text_est.phases:
        v = _add(_kinds(ph.breakdown), states_step if ph.phase is Phase.OPTIMIZER_STEP else states_fb,
                 held_fwd if ph.phase in (Phase.FORWARD, Phase.PREFILL) else
                 held if ph.phase is Phase.BACKWARD else _vec({}))
        if ph.phase in (Phase.FORWARD, Phase.PREFILL):
            tower_fwd = _add(base, states_fb, embeds, tower.peak)
            v = max(v, tower_fwd, key=sum)
        if ph.phase is Phase.BACKWARD and graph:
            # after the language model's backward: its gradients exist, its activations are gone
            step = next(p for p in text_est.phases if p.phase is Phase.OPTIMIZER_STEP)
            lm_end = _add(_kinds(step.breakdown), _vec({K.OPTIMIZER_STATE: -_text_temp(text, tw)}), states_fb)
            grad_feats = _vec({K.ACTIVATIONS: tower.out_bytes})
            v = max(v, _add(lm_end, grad_feats, tower.backward), key=sum)
        phases.append(_phase(ph.phase, v))
    stats = _whole_model_stream(spec, w, text, tw, crops, size, tower_tr, proj_tr, input_rg, graph, tower) \
        if reserved else None
    recipe = ("the vision tower and projector train" if tower_tr else
              "the vision tower is frozen, the projector trains" if proj_tr else
              "the vision tower and projector are frozen (adapters on the language model only)"
              + ("; enable_input_require_grads makes the tower keep a graph for its input gradient, its layers "
                 "checkpointed" if input_rg else "") if train else
              "inference")
    assumptions = (
        f"vision-language model {mm.model_type}: {images} image(s) of {size} x {size} px per sample add {per} image "
        f"tokens to each sequence ({w.seq_len} text + {per} image tokens reach the language model)",
        f"vision tower + projector: {params:,} parameters ({t.style}, {t.layers} layers of width {t.hidden}); "
        f"{recipe}",
        "the tower runs before the language model, with the token embeddings alive; what it saves for backward "
        "lives through the language model's forward and backward",
        # the language model's own line says its reserve comes from a replay: not so for the whole model
        *(a if a != replay_note else
          f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB (H200, CUDA 13); reserved memory from a replay of the "
          "whole model's allocation stream (the tower's forward before the language model's, its backward after, "
          "its parameters built first) through a model of PyTorch's caching allocator"
          + (", over the 3 steps of the calibration loop" if train else "")
          if stats is not None else
          f"CUDA context {CUDA_CONTEXT_BYTES / GiB:.3f} GiB (H200, CUDA 13); reserved memory: the allocated peak + "
          f"{ALLOCATOR_SLACK_FRACTION:.0%} (the calibration median), not a replay"
          for a in text_est.assumptions),
    )
    warnings = tuple(x for x in text_est.warnings) + mm.notes
    if stats is not None and w.load != "config":
        # (alloc_stream's load applies to the language model's stream; the tower's tensors are spliced in before it)
        assumptions += (f"--load {w.load}: the language model's tensors are placed as that load places them; the "
                        "tower's are allocated one by one before them (their share of a warm-up block not modelled)",)
    if w.uses_adapters and train:
        # the LoRA lines of the language model's estimate name its own model_type; peft looks the default targets up
        # by the whole model's (the vision-language config's)
        note, warning = estimator.lora_notes(spec, tw)
        assumptions = tuple(note if a.startswith(estimator.LORA_NOTE_PREFIXES) else a for a in assumptions)
        warnings = tuple(x for x in warnings if not x.startswith(estimator.LORA_NOTE_PREFIXES)) + \
            ((warning,) if warning else ())
    trainable_total = text_est.trainable_parameters + trainable
    return finish(name, phases, parameters=text_est.parameters + params, trainable=trainable_total,
                  assumptions=assumptions, warnings=warnings, workload=workload_dict(w),
                  host_bytes=text_est.host_bytes, host_traffic_bytes=0, reserved=stats, guess_reserved=stats is None)


def language_model_extra(t: VisionTower, text: ModelSpec, batch: int, tokens: int, act: int, deepstack: bool) -> int:
    """Bytes the language model's forward holds with images beyond what it holds on text alone."""
    extra = 0
    if t.projector == "gemma3" and len(text.sliding_layers) < text.num_layers:
        # image tokens attend to each other both ways (create_masks_for_vision_model, modeling_gemma3.py): the
        # full-attention layers' mask is OR(causal, blockwise), materialized (batch, 1, tokens, tokens) bool where a
        # text-only forward passes none; it lives through the language model's forward
        extra += batch * tokens * tokens
    if deepstack:
        # DeepStack (Qwen3VLTextModel.forward): after each of the first layers the hidden states are cloned and the
        # level's features added at the image positions; the loop's `layer_outputs` still references the layer's
        # own output while the next layer runs on the clone: one more (batch, tokens, hidden) tensor in the forward
        extra += batch * tokens * text.hidden_size * act
    return extra


def _text_temp(text: ModelSpec, w: Workload) -> int:
    from .memory import model_states

    return model_states(text, w).step_temporaries if w.is_train else 0


def _whole_model_stream(spec: ModelSpec, w: Workload, text: ModelSpec, tw: Workload, crops: int, size: int,
                        tower_tr: bool, proj_tr: bool, input_rg: bool, graph: bool,
                        tower: _TowerRun) -> AllocStats | None:
    """The vision-language model's allocation stream replayed through the caching-allocator model: the language
    model's stream (:mod:`vramplan.alloc_stream`, on the text plus image tokens) with the tower's spliced in where
    the model runs it. None where the language model's own stream is not replayed (:func:`estimator.replays`).

    * build: the tower and projector are constructed before the language model (``Qwen2_5_VLModel.__init__``:
      ``visual`` then ``language_model``; LLaVA, Gemma 3: ``vision_tower``, ``multi_modal_projector``, then the
      language model), one tensor per parameter; the pixel values are the script's input, held throughout;
    * each forward (training) or prefill (inference) starts with the tower's forward (``get_image_features``); what
      the model keeps referenced (the features and what it makes of them) dies when the forward returns, what the
      tower saved for backward when its backward has run;
    * each backward ends with the tower's backward (the features' gradients arrive from ``masked_scatter``), its
      parameter gradients kept (accumulated into from the second micro-batch on) until ``zero_grad``;
    * the optimizer creates the tower's states (AdamW: before the language model's, in parameter order) and its
      ``_foreach_sqrt`` temporaries live with the language model's."""
    from . import allocator as A
    from . import estimator
    from ._engine.numerics import Numerics
    from ._engine.replay import backward as replay_backward
    from ._engine.replay import forward as replay_forward
    from ._engine.tape import ZERO
    from .alloc_stream import _optimizer_tensors, infer_events, train_events
    from .memory import model_states

    mm = spec.multimodal
    assert mm is not None
    t = mm.vision
    text_b = estimator.built_as(text, tw)
    tw_r = estimator.runs_as(text_b, tw)
    if not estimator.replays(text_b):
        return None
    num_t = estimator.numerics(tw_r)
    states = model_states(text_b, tw_r)
    lm = train_events(text_b, tw_r, states, num_t, 3) if tw_r.is_train else infer_events(text_b, tw_r, states, num_t)

    train = w.is_train
    num_ = estimator.numerics(w)
    num = Numerics(train, num_.act, w.precision.param_bytes, w.precision.is_amp)

    L, seeds, _ = _tower_tape(t, num, crops, size, tower_tr, proj_tr, train and w.gradient_checkpointing, input_rg,
                              text.num_layers)
    fwd_ev: list[tuple[object, int]] = []
    fr = replay_forward(L, ZERO, ev=fwd_ev)
    bwd_first: list[tuple[object, int]] = []
    bwd_acc: list[tuple[object, int]] = []
    if graph:
        replay_backward(L, fr, seeds, ev=bwd_first)
        if w.gradient_accumulation > 1:  # from the second micro-batch on the gradients exist: added into
            replay_backward(L, replay_forward(L, ZERO), seeds, ev=bwd_acc, param_grads_exist=True)
    kept = [x for x in L.tensors if x.keep and not x.external and x.base is None and x.nbytes]
    pbytes = 4 if w.precision.is_amp else w.precision.param_bytes
    sizes = L.tensor_sizes()
    counts = Counter(tower.sizes)
    counts.subtract(tower.idle_sizes)  # what the backward never reaches (_tower_run): no gradient, no state
    trained = [n * pbytes for n in (+counts).elements()] if train else []
    opt_states, opt_temps = _optimizer_tensors(w.optimizer, trained) if trained else ([], [])

    out: list[tuple[object, int]] = [(("vt_w", j), n * pbytes) for j, n in enumerate(sizes)]
    out += [(("vt_in", j), x.nbytes) for j, x in enumerate(L.tensors) if x.external and x.base is None and x.nbytes]
    live: set[object] = set()
    grads: set[object] = set()

    def emit(items: list[tuple[object, int]], tag: object) -> None:
        for k, n in items:
            is_grad = isinstance(k, tuple) and k[0] == "p"
            key: object = ("vt_g", k[1]) if isinstance(k, tuple) and is_grad else ("vt", tag, k)
            if n >= 0:
                if key in live:
                    continue
                live.add(key)
                if is_grad:
                    grads.add(key)
                out.append((key, n))
            elif n == A.FREE and key in live:
                live.discard(key)
                out.append((key, A.FREE))

    def free_kept(tag: object) -> None:
        for x in kept:
            key = ("vt", tag, x)
            if key in live:
                live.discard(key)
                out.append((key, A.FREE))

    step = micro = 0
    opt_made = False
    phase: object = None
    for key, n in lm:
        if n == A.PHASE:
            if phase == "backward" and graph:
                emit(bwd_acc if micro > 1 and bwd_acc else bwd_first, (step, micro))
            out.append((key, n))
            if key in ("forward", "prefill"):
                micro += 1
                emit(fwd_ev, (step, micro))
            elif key in ("backward", "decode"):
                free_kept((step, micro))  # the model's forward returned: what it referenced dies
            elif key == "optimizer_step":
                if not opt_made:  # the first step creates the states
                    out += [(("vt_opt", j), m) for j, m in enumerate(opt_states)]
                    opt_made = True
                out += [(("vt_tmp", step, j), m) for j, m in enumerate(opt_temps)]
            phase = key
            continue
        if n == A.PROBE:  # a step's end: zero_grad(set_to_none=True), the temporaries gone
            out += [(("vt_tmp", step, j), A.FREE) for j in range(len(opt_temps)) if phase == "optimizer_step"]
            for g in sorted(grads, key=str):
                if g in live:
                    live.discard(g)
                    out.append((g, A.FREE))
            for k2 in [k2 for k2 in live if isinstance(k2, tuple) and k2[0] == "vt"]:
                live.discard(k2)
                out.append((k2, A.FREE))
            step, micro, phase = step + 1, 0, None
        out.append((key, n))
    if phase == "backward" and graph:
        emit(bwd_first, (step, micro))
    return A.simulate(out, A.parse_alloc_conf(w.alloc_conf))
