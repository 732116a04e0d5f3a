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
    if entry.kind == "pipeline":
        from ..vision._catalog import component

        if w.is_train:
            return (f"{n}: pipeline training (DreamBooth-style, frozen VAE and text encoders) is not traced yet; the "
                    "trace runs a pipeline's inference call, or a denoiser alone (vramplan estimate models training)")
        if component(str(entry.config["denoiser"])).kind != "unet":
            return (f"{n}: pipelines around a diffusion transformer are not traced yet (the transformer alone is, and "
                    "the UNet pipelines sd15, sd21, sdxl, sdxl-refiner); vramplan estimate models them")
        if any(component(str(t)).config.get("model_type") != "clip_text_model"
               for t in entry.config.get("text_encoders", ())):
            return f"{n}: only CLIP text encoders are traced in a pipeline"
        return None
    if w.pipeline:
        return f"{n} has no pipeline in the catalog; --pipeline applies to the diffusion denoisers"
    if entry.kind == "stylegan":
        return (f"{n}: StyleGAN's training loop (NVlabs' custom CUDA ops, G and D phases) is not traced; vramplan "
                "estimate models it")
    if entry.kind in ("vae", "text_encoder"):
        return f"{n} is a pipeline component ({entry.kind}); trace a denoiser or a backbone"
    if entry.kind == "dit" and w.eager_attention:
        return f"{n}: --attention eager is traced on UNets (diffusers AttnProcessor); diffusion transformers run SDPA"
    if w.is_train and w.method is not VisionMethod.FULL and entry.kind != "unet":
        return (f"{n}: the image trace runs full training here (LoRA is traced on UNets); --method {w.method.value} "
                "is not traced")
    if w.gradient_accumulation > 1 or not w.set_grads_to_none:
        return f"{n}: the image trace runs the calibration loop (one micro-batch, zero_grad(set_to_none=True))"
    if entry.kind == "backbone" and w.gradient_checkpointing:
        return f"{n}: torchvision backbones have no gradient checkpointing switch; drop --gradient-checkpointing"
    if entry.kind == "backbone" and w.eager_attention:
        return f"{n}: torchvision's ViT attention is nn.MultiheadAttention; --attention applies to diffusers models"
    return None
