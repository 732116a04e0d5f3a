"""LoRA on image denoisers follows diffusers' LoRA training scripts: ``add_adapter`` leaves the adapters in the frozen
base's dtype, and only fp16 mixed precision casts them to fp32 (``cast_training_params``); their gradients and AdamW
states follow them. The activations they save are checked against the trace in ``test_trace_vision.py``."""

from __future__ import annotations

import pytest

from vramplan import MemoryKind, Phase
from vramplan.vision import estimate_vision
from vramplan.vision._estimate import adapter_elem
from vramplan.workload import Precision


def _lora(precision: str, model: str = "sd15-unet", **kw: object) -> tuple[int, int, int, tuple[str, ...]]:
    """(trainable parameters, gradient bytes, optimizer-state bytes at the optimizer step, assumptions)."""
    e = estimate_vision(model, task="train", method="lora", precision=precision, batch_size=1, resolution=256, **kw)
    step = next(p for p in e.phases if p.phase is Phase.OPTIMIZER_STEP).breakdown
    return e.trainable_parameters, step[MemoryKind.GRADIENTS], step[MemoryKind.OPTIMIZER_STATE], e.assumptions


def test_adapter_dtype_is_the_scripts() -> None:
    # weight_dtype by --mixed_precision, add_adapter after the cast, cast_training_params under "fp16" only
    assert {p: adapter_elem(p) for p in Precision} == {
        Precision.FP32: 4, Precision.AMP_FP16: 4, Precision.AMP_BF16: 2, Precision.BF16: 2, Precision.FP16: 2}


@pytest.mark.parametrize("model", ["sd15-unet", "sdxl-unet"])
@pytest.mark.parametrize("precision", ["fp32", "amp-fp16", "amp-bf16", "bf16", "fp16"])
def test_adapter_gradients_and_adamw_states_follow_the_adapter_dtype(model: str, precision: str) -> None:
    trainable, grads, state, notes = _lora(precision, model)
    elem = adapter_elem(Precision(precision))
    assert 0 < trainable < 10_000_000
    # each adapter tensor is a few KiB: the allocator's 512-byte rounding is all that separates the two
    assert grads == pytest.approx(trainable * elem, rel=0.01)
    # AdamW's exp_avg, exp_avg_sq (and foreach's sqrt temporary in the step) in the parameter's dtype: the same
    # multiple of the gradients as with fp32 adapters
    _, grads32, state32, _ = _lora("fp32", model)
    assert state >= 2 * trainable * elem
    assert state / grads == pytest.approx(state32 / grads32, rel=0.01)
    dtype = {4: "fp32", 2: "fp16" if "fp16" in precision else "bf16"}[elem]
    assert any("add_adapter" in n and n.endswith(f"AdamW states in {dtype}") for n in notes), notes


def test_sixteen_bit_adapters_are_smaller_at_every_phase() -> None:
    """bf16 mixed precision against fp16 mixed precision: the same base, autocast and activations' dtype, only the
    adapters differ (bf16 vs fp32), so no phase may grow."""
    bf = estimate_vision("sd15-unet", task="train", method="lora", precision="amp-bf16", batch_size=1, resolution=256)
    fp = estimate_vision("sd15-unet", task="train", method="lora", precision="amp-fp16", batch_size=1, resolution=256)
    for p in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP):
        assert bf.phase_peak(p) < fp.phase_peak(p)


def test_pipeline_training_adapters_follow_the_same_rule() -> None:
    """DreamBooth-style LoRA (train_dreambooth_lora.py), with the text encoder's adapters too."""
    for precision in ("amp-bf16", "amp-fp16"):
        e = estimate_vision("sd15", task="train", pipeline=True, method="lora", precision=precision,
                            train_text_encoder=True, resolution=256)
        step = next(p for p in e.phases if p.phase is Phase.OPTIMIZER_STEP).breakdown
        elem = adapter_elem(Precision(precision))
        assert step[MemoryKind.GRADIENTS] == pytest.approx(e.trainable_parameters * elem, rel=0.01)
