"""What the image-model trace runs and what it refuses, decided without torch (the CLI answers at once)."""

from __future__ import annotations

from ..vision._catalog import VisionEntry
from ..vision._workload import VisionMethod, VisionWorkload

__all__ = ["IMAGE_TRACE_MISSING", "vision_refusal"]

IMAGE_TRACE_MISSING = ("vramplan trace of image models needs torchvision (backbones) or diffusers (UNets): "
                       "pip install 'vramplan[torch,image-trace]'")

def vision_refusal(entry: VisionEntry, w: VisionWorkload) -> str | None:
    """Why the trace does not run ``w`` on ``entry`` (one line), or None where it does."""
    n = entry.name
    if entry.kind == "pipeline" or w.pipeline:
        return (f"{n}: whole diffusion pipelines (text encoders + denoiser + VAE) are not traced yet; the trace runs "
                "a denoiser (UNet) or a torchvision backbone alone (vramplan estimate models the pipeline)")
    if entry.kind == "stylegan":
        return (f"{n}: StyleGAN's training loop (NVlabs' custom CUDA ops, G and D phases) is not traced; vramplan "
                "estimate models it")
    if entry.kind in ("vae", "text_encoder"):
        return f"{n} is a pipeline component ({entry.kind}); trace a denoiser or a backbone"
    if entry.kind == "dit":
        return (f"{n}: diffusion transformers are not traced yet (UNets and torchvision backbones are); vramplan "
                "estimate models them")
    if w.is_train and w.method is not VisionMethod.FULL:
        return f"{n}: the image trace runs full training; --method {w.method.value} is not traced yet"
    if w.gradient_accumulation > 1 or not w.set_grads_to_none:
        return f"{n}: the image trace runs the calibration loop (one micro-batch, zero_grad(set_to_none=True))"
    if entry.kind == "backbone" and w.gradient_checkpointing:
        return f"{n}: torchvision backbones have no gradient checkpointing switch; drop --gradient-checkpointing"
    if entry.kind == "backbone" and w.eager_attention:
        return f"{n}: torchvision's ViT attention is nn.MultiheadAttention; --attention applies to diffusers models"
    return None
