"""Image models: exact parameter counts, the catalog, the CLI contract, errors and invariants."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import Estimate, MemoryKind, Phase
from vramplan._engine.numerics import Numerics
from vramplan.cli import main
from vramplan.errors import UnknownNameError, VramplanError, WorkloadError
from vramplan.vision import (
    estimate_vision,
    get_vision_model,
    is_vision_model,
    list_vision_models,
    make_vision_workload,
)
from vramplan.vision._catalog import component
from vramplan.vision._layers import Layers
from vramplan.vision._specs import text_encoder_from_config, vae_from_config
from vramplan.vision._states import block_bytes
from vramplan.vision._text import build_text_encoder
from vramplan.vision._vae import build_vae_decoder, build_vae_encoder

# ---- exact parameter counts (the issue's list, then the rest of the catalog) -------------------------------
KNOWN = {
    "sd15-unet": 859_520_964,  # diffusers UNet2DConditionModel, SD 1.5 config
    "sdxl-unet": 2_567_463_684,  # SDXL base UNet
    "resnet50": 25_557_032,  # torchvision
    "vit-b-16": 86_567_656,
    "vit-l-16": 304_326_632,
    "sd21-unet": 865_910_724,
    "resnet18": 11_689_512,
    "resnet152": 60_192_808,
    "vit-h-14": 632_045_800,
    "convnext-tiny": 28_589_128,
    "sd3-medium-transformer": 2_028_328_000,
    "flux-dev-transformer": 11_901_408_320,
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_parameter_counts(name: str) -> None:
    assert get_vision_model(name).params == KNOWN[name]
    assert estimate_vision(name, task="infer").parameters == KNOWN[name]


ESTIMABLE = [e.name for e in list_vision_models() if e.estimable]


@pytest.mark.parametrize("name", ESTIMABLE)
def test_recorded_networks_count_the_catalog_parameters(name: str) -> None:
    """The op-by-op recording registers every parameter the library builds (catalog counts come from
    diffusers/transformers/torchvision/NVlabs code on the meta device)."""
    assert estimate_vision(name, task="infer").parameters == get_vision_model(name).params


@pytest.mark.parametrize("name", [e.name for e in list_vision_models() if e.kind in ("vae", "text_encoder")])
def test_component_parameter_counts(name: str) -> None:
    e = component(name)
    L = Layers(Numerics(False, 2, 2, False))
    if e.kind == "vae":
        spec = vae_from_config(e.config)
        build_vae_decoder(L, spec, L.input(spec.latent_channels * 64, 2), 1, 8, 8)
        build_vae_encoder(L, spec, L.input(3 * 64 * 64, 2), 1, 64, 64)
    else:
        build_text_encoder(L, text_encoder_from_config(e.config), 1, name + ".")
    assert L.parameters == e.params


def test_catalog_names_required_by_the_issue() -> None:
    for name in ("sd15-unet", "sdxl-unet", "sd15", "sdxl", "flux-dev", "resnet50", "vit-b-16", "vit-l-16",
                 "stylegan2-512", "stylegan2-1024", "stylegan3-t-1024", "resnet18", "resnet101", "vit-h-14",
                 "convnext-tiny", "sd21", "dit-xl-2", "pixart", "sd3-medium"):
        assert is_vision_model(name), name


def test_catalog_records_have_sources() -> None:
    for e in list_vision_models():
        assert e.params > 0 and e.source.startswith("https://"), e.name


def test_aliases_and_case() -> None:
    assert get_vision_model("SDXL").name == "sdxl"
    assert get_vision_model("vit_b_16").name == "vit-b-16"
    assert get_vision_model("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"
    assert not is_vision_model("llama-3.1-8b")


def test_unknown_name_suggests() -> None:
    with pytest.raises(UnknownNameError, match="did you mean"):
        estimate_vision("sdxl-unett")


# ---- workload validation and errors ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "res"), [("sd15-unet", 500), ("sdxl", 1000), ("vit-b-16", 200), ("flux-dev", 1000),
                                           ("stylegan2-512", 1024), ("convnext-tiny", 240)])
def test_resolution_the_architecture_cannot_take(name: str, res: int) -> None:
    with pytest.raises(WorkloadError, match=str(res)):
        estimate_vision(name, resolution=res)


def test_bad_options() -> None:
    with pytest.raises(WorkloadError):
        make_vision_workload(batch_size=0)
    with pytest.raises(WorkloadError, match="precision"):
        make_vision_workload(precision="int3")
    with pytest.raises(WorkloadError, match="unknown option"):
        make_vision_workload(seq_len=5)
    with pytest.raises(WorkloadError, match="component"):
        estimate_vision("sd-vae")
    with pytest.raises(WorkloadError, match="only full"):
        estimate_vision("resnet50", method="lora")


# ---- results: structure and breakdown -----------------------------------------------------------------------
def _check(est: Estimate) -> None:
    assert est.breakdown.total == est.total_bytes
    assert est.peak_allocated_bytes == max(p.peak_allocated_bytes for p in est.phases)
    assert est.phase_peak(est.peak_phase) == est.peak_allocated_bytes
    device = sum(v for k, v in est.breakdown.bytes_by_kind if k not in (MemoryKind.CUDA_CONTEXT,
                                                                          MemoryKind.ALLOCATOR_SLACK))
    assert device == est.peak_allocated_bytes
    assert all(v >= 0 for _, v in est.breakdown.bytes_by_kind)


def test_training_phases_and_states() -> None:
    est = estimate_vision("sd15-unet", batch_size=4, precision="bf16")
    _check(est)
    assert {p.phase for p in est.phases} == {Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP}
    step = next(p for p in est.phases if p.phase is Phase.OPTIMIZER_STEP).breakdown
    n = 859_520_964
    # bf16 weights, grads and AdamW states (+ the foreach sqrt(v) temporary), with allocator block rounding
    assert 2 * n <= step[MemoryKind.WEIGHTS] < 2.02 * n
    assert 2 * n <= step[MemoryKind.GRADIENTS] < 2.02 * n
    assert 6 * n <= step[MemoryKind.OPTIMIZER_STATE] < 6.06 * n


def test_pipeline_inference_phases() -> None:
    est = estimate_vision("sdxl", task="infer", precision="fp16")
    _check(est)
    assert [p.phase for p in est.phases] == [Phase.PREFILL, Phase.FORWARD, Phase.DECODE]
    # the fp16 SDXL VAE is upcast to fp32 for the decode at 1024 x 1024: the decode is the peak
    assert est.peak_phase is Phase.DECODE
    assert any("force_upcast" in a for a in est.assumptions)
    bf16 = estimate_vision("sdxl", task="infer", precision="bf16")
    assert bf16.phase_peak(Phase.DECODE) < est.phase_peak(Phase.DECODE)


def test_guidance_doubles_the_denoiser_batch() -> None:
    on = estimate_vision("sd15", task="infer", precision="fp16", resolution=768)
    off = estimate_vision("sd15", task="infer", precision="fp16", resolution=768, guidance=False)
    assert on.phase_peak(Phase.FORWARD) > off.phase_peak(Phase.FORWARD)


def test_eager_attention_is_quadratic_in_latent_tokens() -> None:
    def act(res: int, attention: str) -> int:
        est = estimate_vision("sd15-unet", task="infer", batch_size=1, resolution=res, attention=attention)
        return est.breakdown[MemoryKind.ACTIVATIONS]

    sdpa = act(1024, "sdpa") / act(512, "sdpa")
    eager = act(1024, "eager") / act(512, "eager")
    assert sdpa < 5 and eager > 10  # 4x the tokens: linear vs quadratic


def test_lora_and_checkpointing_reduce_training_memory() -> None:
    full = estimate_vision("sdxl-unet", batch_size=1, resolution=1024)
    ckpt = estimate_vision("sdxl-unet", batch_size=1, resolution=1024, gradient_checkpointing=True)
    lora = estimate_vision("sdxl-unet", batch_size=1, resolution=1024, method="lora", precision="amp-bf16")
    assert ckpt.phase_peak(Phase.FORWARD) < full.phase_peak(Phase.FORWARD)
    assert lora.peak_allocated_bytes < full.peak_allocated_bytes
    assert 0 < lora.trainable_parameters < 20_000_000


def test_eight_bit_optimizer_shrinks_the_state() -> None:
    a = estimate_vision("sd15-unet", precision="amp-bf16")
    b = estimate_vision("sd15-unet", precision="amp-bf16", optimizer="adamw-8bit")
    sa = next(p for p in a.phases if p.phase is Phase.OPTIMIZER_STEP).breakdown[MemoryKind.OPTIMIZER_STATE]
    sb = next(p for p in b.phases if p.phase is Phase.OPTIMIZER_STEP).breakdown[MemoryKind.OPTIMIZER_STATE]
    assert sb < sa / 3


def test_stylegan_512_vs_1024_and_inference() -> None:
    s512 = estimate_vision("stylegan2-512", batch_size=8)
    s1024 = estimate_vision("stylegan2-1024", batch_size=8)
    assert s1024.peak_allocated_bytes > s512.peak_allocated_bytes
    inf = estimate_vision("stylegan3-t-1024", task="infer", batch_size=1)
    assert inf.peak_allocated_bytes < 2 * 2**30


def test_dreambooth_pipeline_training_counts_frozen_helpers() -> None:
    est = estimate_vision("sd15", pipeline=True, method="lora", precision="amp-fp16")
    _check(est)
    # frozen UNet + VAE + text encoder in fp16 are resident
    assert est.breakdown[MemoryKind.WEIGHTS] >= 2 * 1_066_235_307
    cached = estimate_vision("sd15", pipeline=True, method="lora", precision="amp-fp16", cached_latents=True)
    assert cached.phase_peak(Phase.FORWARD) <= est.phase_peak(Phase.FORWARD)


def test_block_bytes_follows_the_caching_allocator() -> None:
    MiB = 1 << 20
    assert block_bytes(1) == 512
    assert block_bytes(25 * MiB) == 26 * MiB  # remainder 1 MiB is not split off
    assert block_bytes(12 * MiB + 512 * 1024) == 12 * MiB + 512 * 1024  # remainder 1.5 MiB is split off
    assert block_bytes(3 * MiB + 1) == 3 * MiB + 512


# ---- invariants (hypothesis) ------------------------------------------------------------------------------
SETTINGS = settings(max_examples=25, deadline=None)
MODELS = st.sampled_from(["sd15-unet", "sdxl-unet", "resnet50", "vit-b-16", "convnext-tiny", "dit-xl-2-transformer",
                          "sd15", "stylegan2-256"])
TASKS = st.sampled_from(["train", "infer"])
PRECISIONS = st.sampled_from(["bf16", "fp32", "amp-bf16", "fp16"])


def _res(name: str, k: int) -> int | None:
    if name in ("vit-b-16", "stylegan2-256"):
        return None
    return {"sdxl-unet": 256, "dit-xl-2-transformer": 128}.get(name, 128) * k


@SETTINGS
@given(MODELS, TASKS, PRECISIONS, st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_memory_never_falls_as_batch_grows(name: str, task: str, prec: str, b: int, extra: int, ckpt: bool) -> None:
    kw = {"task": task, "precision": prec, "resolution": _res(name, 2), "gradient_checkpointing": ckpt}
    small = estimate_vision(name, batch_size=b, **kw).peak_allocated_bytes
    assert estimate_vision(name, batch_size=b + extra, **kw).peak_allocated_bytes >= small


@SETTINGS
@given(MODELS, TASKS, PRECISIONS, st.integers(1, 3), st.integers(1, 3))
def test_memory_never_falls_as_resolution_grows(name: str, task: str, prec: str, k: int, extra: int) -> None:
    if _res(name, 1) is None:
        return
    kw = {"task": task, "precision": prec, "batch_size": 2}
    small = estimate_vision(name, resolution=_res(name, k), **kw).peak_allocated_bytes
    assert estimate_vision(name, resolution=_res(name, k + extra), **kw).peak_allocated_bytes >= small


@SETTINGS
@given(st.sampled_from(["sd15-unet", "sdxl-unet", "dit-xl-2-transformer", "sd3-medium-transformer", "sd15"]),
       PRECISIONS, st.integers(1, 4), st.sampled_from(["full", "lora"]))
def test_checkpointing_never_raises_activations(name: str, prec: str, b: int, method: str) -> None:
    kw = {"precision": prec, "batch_size": b, "method": method, "resolution": 256 if "sdxl" not in name else 512,
          "pipeline": name == "sd15"}
    plain = estimate_vision(name, **kw)
    ckpt = estimate_vision(name, gradient_checkpointing=True, **kw)
    assert ckpt.phase_peak(Phase.FORWARD) <= plain.phase_peak(Phase.FORWARD)
    assert ckpt.peak_allocated_bytes <= plain.peak_allocated_bytes * 1.02


# ---- CLI contract -------------------------------------------------------------------------------------------
def test_cli_json_has_the_language_model_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "sdxl-unet", "--task", "train", "--batch-size", "1", "--resolution", "1024",
                 "--precision", "bf16", "--gradient-checkpointing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"model", "parameters", "trainable_parameters", "peak_allocated_bytes", "total_bytes",
                        "peak_phase", "breakdown", "phases", "phase_breakdowns", "workload", "assumptions",
                        "warnings"}
    assert out["workload"]["resolution"] == 1024
    assert set(out["breakdown"]) == {k.value for k in MemoryKind}


def test_cli_pipeline_flag_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "sd15-unet", "--task", "infer", "--pipeline", "--precision", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "sd15" in text and "decode" in text


def test_cli_bad_resolution_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "sd15-unet", "--resolution", "500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multiple of 64" in err


def test_cli_rejects_language_model_only_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "resnet50", "--method", "qlora"]) == 2
    assert "not available for image models" in capsys.readouterr().err


def test_errors_are_vramplan_errors() -> None:
    with pytest.raises(VramplanError):
        estimate_vision("flux-dev", resolution=1000)


def test_zero_grad_without_set_to_none_keeps_gradients_through_the_step() -> None:
    new = estimate_vision("sd15-unet", batch_size=2, precision="fp32")
    old = estimate_vision("sd15-unet", batch_size=2, precision="fp32", set_grads_to_none=False)
    n = 859_520_964
    assert old.phase_peak(Phase.FORWARD) - new.phase_peak(Phase.FORWARD) >= 4 * n
    assert any("set_to_none=False" in a for a in old.assumptions)


def test_image_model_training_keeps_gradients_through_accumulation() -> None:
    # With accumulation every micro-batch after the first runs with all gradients allocated (zero_grad only after
    # optimizer.step()), as for language models; the forward and backward peaks grow by the gradient bytes.
    import vramplan

    one = vramplan.estimate("sd15-unet", batch_size=8, resolution=512)
    four = vramplan.estimate("sd15-unet", batch_size=8, resolution=512, gradient_accumulation=4)
    step = next(p for p in four.phases if p.phase is vramplan.Phase.OPTIMIZER_STEP)
    grads = step.breakdown[vramplan.MemoryKind.GRADIENTS]
    fwd1 = one.phase_peak(vramplan.Phase.FORWARD)
    fwd4 = four.phase_peak(vramplan.Phase.FORWARD)
    assert grads > 0
    assert fwd4 - fwd1 == grads
    assert four.peak_allocated_bytes > one.peak_allocated_bytes
