"""Fake image inputs for vision-language models: what a processor hands the model for N images per sample.

For every sample the trace feeds ``pixel_values`` of the stated count and size (and the extra tensors the model's
forward reads: Qwen-VL's ``image_grid_thw``, LLaVA-NeXT's and Mistral 3's ``image_sizes``, Gemma 3 / PaliGemma's
``token_type_ids``, Idefics 3's ``pixel_attention_mask``, Mllama's tile masks) and puts as many image placeholder
tokens in ``input_ids`` as the model's own ``get_image_features`` returns features (called once on fake tensors,
outside the memory tracker), so the language model sees ``seq_len`` text tokens plus the image tokens, as after
the processor's expansion. The shapes follow each model's processor defaults (transformers 5.24
``image_processing_*.py``): one tile / one crop per image at the stated size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import VramplanError

__all__ = ["ImageInputs", "default_image_size", "image_inputs", "is_multimodal"]

# Qwen2-VL / 2.5-VL / 3-VL processors keep an image's own size (between min_pixels and max_pixels); 448 x 448 is
# the common fine-tuning resize (LLaMA-Factory image_max_pixels 768*768 rounds 448 to a 32 x 32 patch grid).
QWEN_DEFAULT_SIZE = 448


def is_multimodal(config: Any) -> bool:
    """A config with a vision tower (``vision_config``) that the trace can feed images."""
    return getattr(config, "vision_config", None) is not None


# processors that return flattened patches with image_grid_thw, and models that take mm_token_type_ids
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")


def _vision_size(config: Any) -> int | None:
    vc = getattr(config, "vision_config", None)
    size = getattr(vc, "image_size", None)
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) and size > 0 else None


def default_image_size(config: Any) -> int:
    """The processor's default image side in pixels for this config."""
    mt = getattr(config, "model_type", "")
    if mt.startswith("qwen") or _vision_size(config) is None:
        return QWEN_DEFAULT_SIZE
    return _vision_size(config) or QWEN_DEFAULT_SIZE


@dataclass
class ImageInputs:
    ids: torch.Tensor  # input_ids with the image placeholders
    kwargs: dict[str, Any] = field(default_factory=dict)  # pixel_values and the model's other image inputs
    image_tokens: int = 0  # placeholder tokens per sample
    notes: list[str] = field(default_factory=list)


def _token_id(config: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    tc = getattr(config, "text_config", None)
    v = getattr(tc, "image_token_id", None) if tc is not None else None
    if isinstance(v, int):
        return v
    raise VramplanError(f"{type(config).__name__} names no image_token_id; cannot place image tokens")


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        if x.dim() >= 3:
            return x.numel() // x.shape[-1]
        return x.shape[0] if x.dim() == 2 else 1
    if isinstance(x, (list, tuple)):
        return sum(_rows(t) for t in x)
    for attr in ("pooler_output", "image_embeds", "last_hidden_state"):
        v = getattr(x, attr, None)
        if v is not None:
            return _rows(v)
    raise VramplanError(f"cannot count the image features {type(x).__name__} returns")


def _pixels(config: Any, n: int, size: int, dtype: torch.dtype) -> dict[str, Any]:
    """Processor outputs for ``n`` images of ``size`` x ``size`` pixels."""
    mt = config.model_type
    vc = config.vision_config
    if mt in QWEN_VL:
        p = vc.patch_size
        t = getattr(vc, "temporal_patch_size", 2)
        merge = getattr(vc, "spatial_merge_size", 2)
        grid = size // p
        if grid % merge or grid == 0:
            raise VramplanError(f"--image-size {size} is not a multiple of {p * merge} pixels (patch {p} x merge "
                                f"{merge}), which the Qwen-VL processor resizes to")
        chans = getattr(vc, "in_channels", getattr(vc, "in_chans", 3))
        pv = torch.zeros(n * grid * grid, chans * t * p * p, dtype=dtype)
        thw = _real(lambda: torch.tensor([[1, grid, grid]] * n, dtype=torch.long))
        return {"pixel_values": pv, "image_grid_thw": thw}
    if mt == "llava_next" or mt == "llava_onevision":
        # anyres: the base image plus the tiles of the best grid pinpoint for a size x size image
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vsize = _vision_size(config) or size
        patches = image_size_to_num_patches((size, size), config.image_grid_pinpoints, vsize)
        pv = torch.zeros(n, patches, 3, vsize, vsize, dtype=dtype)
        return {"pixel_values": pv, "image_sizes": _real(lambda: torch.tensor([[size, size]] * n, dtype=torch.long))}
    if mt in ("mistral3", "pixtral"):
        return {"pixel_values": torch.zeros(n, 3, size, size, dtype=dtype),
                "image_sizes": _real(lambda: torch.tensor([[size, size]] * n, dtype=torch.long))}
    if mt in ("idefics3", "smolvlm", "idefics2"):
        return {"pixel_values": torch.zeros(n, 1, 3, size, size, dtype=dtype),
                "pixel_attention_mask": _real(lambda: torch.ones(n, 1, size, size, dtype=torch.bool))}
    return {"pixel_values": torch.zeros(n, 3, size, size, dtype=dtype)}


def _reshape_per_sample(mt: str, kw: dict[str, Any], batch: int, images: int) -> dict[str, Any]:
    if mt in ("idefics3", "smolvlm", "idefics2"):
        pv = kw["pixel_values"]
        kw = dict(kw)
        kw["pixel_values"] = pv.reshape(batch, images, *pv.shape[2:])
        pm = kw["pixel_attention_mask"]
        kw["pixel_attention_mask"] = pm.reshape(batch, images, *pm.shape[2:])
    return kw


def _mllama(config: Any, batch: int, images: int, text_len: int, size: int, dtype: torch.dtype) -> ImageInputs:
    """Mllama: one ``<|image|>`` token per image in the text; the image reaches the text model through its
    cross-attention layers (max_num_tiles tiles per image; the processor's 1 x 1 aspect ratio fills one tile)."""
    vc = config.vision_config
    tiles = vc.max_num_tiles
    pv = torch.zeros(batch, images, tiles, 3, size, size, dtype=dtype)
    seq = text_len + images
    tok = _token_id(config)

    def ints() -> tuple[torch.Tensor, ...]:
        ar_ids = torch.ones(batch, images, dtype=torch.long)
        ar_mask = torch.zeros(batch, images, tiles, dtype=torch.long)
        ar_mask[:, :, 0] = 1
        ids = torch.zeros(batch, seq, dtype=torch.long)
        ids[:, :images] = tok
        xmask = torch.zeros(batch, seq, images, tiles, dtype=torch.long)
        xmask[:, :, :, 0] = 1
        return ar_ids, ar_mask, ids, xmask

    ar_ids, ar_mask, ids, xmask = _real(ints)
    kw = {"pixel_values": pv, "aspect_ratio_ids": ar_ids, "aspect_ratio_mask": ar_mask, "cross_attention_mask": xmask}
    return ImageInputs(ids, kw, images, [f"Mllama: {images} image(s) per sample as {tiles} tiles of {size} px "
                                         "(aspect ratio 1:1, one tile used) read by the cross-attention layers"])


def _real(fn: Any) -> Any:
    """Build integer inputs as real tensors (their values matter to the model's bookkeeping)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return fn()


def image_inputs(model: nn.Module, config: Any, batch: int, text_len: int, images: int, size: int | None,
                 dtype: torch.dtype) -> ImageInputs:
    """The inputs of one batch: ``text_len`` text tokens plus ``images`` images of ``size`` px per sample.
    Call under the trace's FakeTensorMode, before the memory tracker starts."""
    size = size or default_image_size(config)
    mt = config.model_type
    if mt == "mllama":
        return _mllama(config, batch, images, text_len, size, dtype)
    n = batch * images
    kw = _pixels(config, n, size, dtype)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_image_features", None)
    if getter is None:
        inner = getattr(base, "model", None)
        getter = getattr(inner, "get_image_features", None)
    if getter is None:
        raise VramplanError(f"{type(base).__name__} has no get_image_features; images cannot be traced for it")
    fkw = _reshape_per_sample(mt, kw, batch, images)
    from ._engine import _scalar_answer
    from ._tracker import MemoryTracker

    counter = MemoryTracker()  # not the trace's: only to run the image bookkeeping on real integers
    counter.real_ints = True
    counter.scalar_answer = _scalar_answer
    cast_note: list[str] = []
    try:
        try:
            with torch.no_grad(), counter:
                feats = getter(**fkw)
        except RuntimeError as exc:
            # a tower that does not cast pixel_values to its weights' dtype (GOT-OCR2's patch embedding): its users
            # pass the processor's output as .to(model.dtype), as its model card does; the trace does the same
            pdtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), dtype)
            if "type" not in str(exc) or pdtype == dtype:
                raise
            fkw = {k: v.to(pdtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in fkw.items()}
            with torch.no_grad(), counter:
                feats = getter(**fkw)
            cast_note.append(f"pixel_values passed in {str(pdtype).removeprefix('torch.')}: the vision tower does "
                             "not cast the processor's fp32 output to its weights' dtype (callers pass "
                             ".to(model.dtype))")
    except VramplanError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise VramplanError(f"{type(base).__name__}: the vision tower does not run on {images} image(s) of {size} px "
                            f"({type(exc).__name__}: {msg}); try another --image-size") from None
    total = _rows(feats)
    if total % batch:
        raise VramplanError(f"{type(base).__name__}: {total} image features do not split over batch {batch}")
    per = total // batch
    kw = dict(fkw)
    tok = _token_id(config)
    start = getattr(config, "vision_start_token_id", None)

    if images > 1 and (per % images or text_len < images):
        raise VramplanError(f"{type(base).__name__}: {per} image tokens per sample do not split over {images} images "
                            f"with a text token before each (--seq-len {text_len})")

    def ints() -> tuple[torch.Tensor, torch.Tensor]:
        # each image's tokens follow a text token of their own (the vision-start token where the config names one),
        # as processors lay them out: Qwen-VL's rope index and Gemma 3's bidirectional blocks go image by image
        ids = torch.zeros(batch, text_len + per, dtype=torch.long)
        types = torch.zeros(batch, text_len + per, dtype=torch.long)
        step = per // images
        for j in range(images):
            at = j * (step + 1)
            if isinstance(start, int):
                ids[:, at] = start
            ids[:, at + 1:at + 1 + step] = tok
            types[:, at + 1:at + 1 + step] = 1
        return ids, types

    ids, types = _real(ints)
    if mt in QWEN_VL:
        kw["mm_token_type_ids"] = _real(lambda: types.int())
    if mt in ("gemma3", "paligemma"):
        kw["token_type_ids"] = types
    notes = [f"{images} image(s) of {size} x {size} px per sample: {per} image tokens inserted in each sequence "
             f"({text_len} text + {per} image tokens)", *cast_note]
    return ImageInputs(ids, kw, per, notes)
