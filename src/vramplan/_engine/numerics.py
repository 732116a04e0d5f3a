"""Dtypes of one run, and the attention kernel CUDA picks: shared by language and image models."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Kernel", "Numerics", "sdpa_kernel"]


@dataclass(frozen=True, slots=True)
class Numerics:
    """Dtypes (bytes per element) of what flows through a network, and whether it trains.

    ``act``: outputs of matmuls and convolutions (2 under bf16/fp16 or autocast, 4 in fp32); ``param``:
    dense parameters as stored; ``amp``: the forward runs under ``torch.autocast`` (16-bit matmuls and
    convolutions, fp32 normalization, weight copies cached for trainable leaves); ``norm_param``: norm /
    embedding / unquantized head parameters (QLoRA keeps them in fp32; 0 means ``param``);
    ``lora_param``: peft adapters (fp32 by default: ``get_peft_model``'s ``autocast_adapter_dtype=True``;
    image models take diffusers' ``add_adapter`` workflow, ``vision._estimate.adapter_elem``); ``fp16``: the 16-bit
    compute dtype is float16, not bfloat16 (ATen's fused half_to_float softmax applies).
    """

    training: bool
    act: int
    param: int
    amp: bool
    norm_param: int = 0
    lora_param: int = 4
    fp16: bool = False

    def __post_init__(self) -> None:
        if not self.norm_param:
            object.__setattr__(self, "norm_param", self.param)


class Kernel(StrEnum):
    FLASH = "flash"  # FlashAttention / cuDNN fused attention: output + fp32 log-sum-exp saved
    EFFICIENT = "efficient"  # memory-efficient (cutlass) attention: output + log-sum-exp
    MATH = "math"  # the composite fallback: the (B, H, Sq, Sk) scores and probabilities materialized
    EAGER = "eager"  # the model's own softmax(QK^T)V (transformers eager, diffusers AttnProcessor)


# preprocess_mask's mem_eff_alignment: the efficient kernel pads a mask whose rows are not a multiple of 8 elements
# (aten/src/ATen/native/transformers/attention.cpp, torch 2.4+)
MEM_EFF_MASK_ALIGNMENT = 8


def sdpa_kernel(elem: int, head_dim: int, has_mask: bool, *, heads_match: bool = True,
                enable_gqa: bool = False) -> Kernel:
    """The kernel ``scaled_dot_product_attention`` runs on an sm80+ GPU (torch 2.5–2.11).

    Fused (flash / cuDNN): 16-bit inputs, head_dim <= 256 (padded inside), no explicit mask, equal head
    counts or ``enable_gqa``. Memory-efficient: fp32 or 16-bit, head_dim a multiple of 4 (fp32) or 8
    (16-bit), masks allowed, equal head counts only. Otherwise the math path.
    ``aten/src/ATen/native/transformers/sdp_utils.cpp``; mirrored on real tensors by
    ``vramplan.trace._cuda.choose_sdpa_backend``.
    """
    if elem == 2 and head_dim <= 256 and not has_mask and (heads_match or enable_gqa):
        return Kernel.FLASH
    if heads_match and head_dim % (8 if elem == 2 else 4) == 0:
        return Kernel.EFFICIENT
    return Kernel.MATH
