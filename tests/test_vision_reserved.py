"""Reserved memory of image-model runs comes from the allocation stream for every training option: LoRA adapters,
gradient accumulation and ``zero_grad(set_to_none=False)`` are replayed through the caching-allocator model, not
covered by a fixed slack."""

from __future__ import annotations

import pytest

import vramplan
from vramplan.units import GiB
from vramplan.vision import _estimate as VE
from vramplan.vision import _estimate_catalog

REPLAYED = "reserved memory from a replay"


def _spied(attr: str, model: str, **kw: object) -> tuple[vramplan.Estimate, int, int]:
    """The estimate, and the allocated and reserved peaks of the stream ``_estimate.<attr>`` replayed last."""
    seen = {}
    orig = getattr(VE, attr)

    def spy(*a: object, **k: object) -> object:
        seen["r"] = r = orig(*a, **k)
        return r

    setattr(VE, attr, spy)
    _estimate_catalog.cache_clear()  # memoized answers would not replay
    try:
        e = vramplan.estimate(model, **kw)
    finally:
        setattr(VE, attr, orig)
    r = seen["r"]
    return e, r.peak_allocated_bytes, r.peak_reserved_bytes


def _with_stream(model: str, **kw: object) -> tuple[vramplan.Estimate, int, int]:
    """A single model's run (``_estimate._reserved``)."""
    return _spied("_reserved", model, **kw)


@pytest.mark.parametrize("kw", [
    {"method": "lora"},
    {"method": "lora", "precision": "amp-fp16"},
    {"gradient_accumulation": 2},
    {"gradient_accumulation": 3, "method": "lora"},
    {"set_grads_to_none": False},
])
def test_training_options_are_replayed(kw: dict[str, object]) -> None:
    e, alloc, reserved = _with_stream("sd15-unet", task="train", **kw)
    assert any(REPLAYED in a for a in e.assumptions), e.assumptions
    # the stream replays the same recorded program: its allocated peak is the estimate's, blocks rounded up
    assert e.peak_allocated_bytes <= alloc <= e.peak_allocated_bytes * 1.02
    assert reserved >= alloc
    assert e.total_bytes >= e.peak_allocated_bytes


def test_accumulation_keeps_gradients_through_the_next_micro_batch() -> None:
    """At batch 4 the forward of the second micro-batch runs with every gradient allocated: the stream reserves more
    than one micro-batch per step, and more micro-batches reserve no more than two (the stream repeats)."""
    _, a1, r1 = _with_stream("sd15-unet", task="train", batch_size=4)
    _, a2, r2 = _with_stream("sd15-unet", task="train", batch_size=4, gradient_accumulation=2)
    _, a4, r4 = _with_stream("sd15-unet", task="train", batch_size=4, gradient_accumulation=4)
    assert a2 > a1 and r2 > r1 + GiB // 2
    assert (a4, r4) == (a2, r2)


def test_lora_adapters_are_created_after_the_cast() -> None:
    """bf16 LoRA: the frozen base in bf16, adapters (created after the cast) and their AdamW states in bf16 too
    (diffusers' add_adapter); the stream's reserved memory stays well below a full fine-tune's."""
    lora, _, r_lora = _with_stream("sd15-unet", task="train", method="lora")
    full, _, r_full = _with_stream("sd15-unet", task="train")
    assert r_lora < r_full / 2
    assert lora.peak_allocated_bytes < full.peak_allocated_bytes / 2


def _pipeline_stream(model: str, **kw: object) -> tuple[vramplan.Estimate, int, int]:
    """Any run, the last stream ``_estimate.simulate`` replayed."""
    return _spied("simulate", model, **kw)


@pytest.mark.parametrize("model", ["sd15", "sdxl", "pixart"])
def test_pipeline_inference_is_replayed(model: str) -> None:
    """A whole pipeline call (text encoders, the denoising loop, the VAE decode, SDXL's VAE upcast to fp32) through
    the allocator model: the stream's allocated peak is the estimate's, and reserved grows with the batch."""
    e1, a1, r1 = _pipeline_stream(model, task="infer", precision="fp16")
    e4, a4, r4 = _pipeline_stream(model, task="infer", precision="fp16", batch_size=4)
    for e, a, r in ((e1, a1, r1), (e4, a4, r4)):
        assert any(REPLAYED in s and "pipeline's dtype" in s for s in e.assumptions), e.assumptions
        assert e.peak_allocated_bytes <= a <= e.peak_allocated_bytes * 1.01
        assert r >= a
    assert r4 > r1


@pytest.mark.parametrize("kw", [{}, {"method": "lora"}, {"method": "lora", "cached_latents": True},
                                {"method": "lora", "gradient_accumulation": 2, "batch_size": 2}])
def test_pipeline_training_is_replayed(kw: dict[str, object]) -> None:
    """DreamBooth-style training (frozen VAE and text encoders loaded in the weight dtype, the denoiser trained): the
    whole step through the allocator model, the stream's allocated peak the estimate's."""
    e, a, r = _pipeline_stream("sd15", task="train", **kw)
    assert any(REPLAYED in s and "training scripts" in s for s in e.assumptions), e.assumptions
    # the stream reads ~30 MB above the estimate in each of these cases, the same with fp32 or bf16 adapters: 22 MiB
    # of it are the helpers' weights (VAE, text encoders) as the stream packs them into segments, above their
    # per-tensor block sizes (not traced further); with 16-bit adapters a LoRA step is small enough for that to pass 1%
    assert e.peak_allocated_bytes <= a <= e.peak_allocated_bytes * 1.01 + 32 * 2**20
    assert r >= a
