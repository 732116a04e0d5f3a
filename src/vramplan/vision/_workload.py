"""What the user wants to run on a vision or diffusion model; validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from ..errors import WorkloadError
from ..workload import Optimizer, Precision, Task, check_int_fields

__all__ = ["VisionMethod", "VisionWorkload"]


class VisionMethod(StrEnum):
    FULL = "full"  # every parameter of the trained network (the denoiser, the backbone, G and D)
    LORA = "lora"  # peft LoRA on the denoiser's attention projections; the base stays frozen


_MAX_BATCH = 1 << 16
_MAX_RES = 1 << 15


@dataclass(frozen=True, slots=True)
class VisionWorkload:
    """One training step or one inference request of an image model.

    ``resolution``: image pixels per side (``None``: the model's native resolution). ``pipeline``:
    diffusion models only — the whole pipeline (text encoders and VAE on the GPU beside the denoiser;
    for inference a full sampling loop ending in the VAE decode; for training DreamBooth-style
    fine-tuning that encodes images and prompts with the frozen VAE and text encoders at every step,
    unless ``cached_latents``). ``guidance``: classifier-free guidance doubles the denoiser's batch.
    """

    task: Task = Task.TRAIN
    method: VisionMethod = VisionMethod.FULL
    precision: Precision = Precision.BF16
    optimizer: Optimizer = Optimizer.ADAMW
    batch_size: int = 1
    resolution: int | None = None
    gradient_checkpointing: bool = False
    eager_attention: bool = False
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA training scripts
    pipeline: bool = False
    guidance: bool = True
    cached_latents: bool = False
    train_text_encoder: bool = False
    gradient_accumulation: int = 1
    set_grads_to_none: bool = True  # optimizer.zero_grad(set_to_none=...): False keeps zeroed grads (torch < 2.0)

    def __post_init__(self) -> None:
        check_int_fields(self, (("batch_size", 1, _MAX_BATCH), ("lora_rank", 1, 1 << 12),
                                ("gradient_accumulation", 1, 1 << 16)))
        if not self.lora_targets:
            raise WorkloadError("lora_targets is empty; name attention projections (to_q,to_k,to_v,to_out.0)")
        if self.resolution is not None:
            if isinstance(self.resolution, bool) or not isinstance(self.resolution, int):
                raise WorkloadError(f"resolution must be an integer, got {self.resolution!r}")
            if not 8 <= self.resolution <= _MAX_RES:
                raise WorkloadError(f"resolution = {self.resolution} is out of range; use 8..{_MAX_RES} pixels")

    @property
    def is_train(self) -> bool:
        return self.task is Task.TRAIN

    @property
    def grads_persist(self) -> bool:
        """Gradients stay allocated through the forward and backward: zero_grad(set_to_none=False) keeps them,
        and with gradient accumulation every micro-batch after the first accumulates into the gradients of the
        ones before (zero_grad runs only after optimizer.step())."""
        return not self.set_grads_to_none or self.gradient_accumulation > 1

    def with_(self, **changes: object) -> VisionWorkload:
        return replace(self, **changes)  # type: ignore[arg-type]
