"""Image models against real GPU peaks (the calibration set's vision/unet rows) and published figures."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from vramplan.calibration import read_rows

from .conftest import CALIBRATION

_SPEC = importlib.util.spec_from_file_location(
    "vision_accuracy", Path(__file__).resolve().parents[1] / "benchmarks" / "vision_accuracy.py")
assert _SPEC is not None and _SPEC.loader is not None
va = importlib.util.module_from_spec(_SPEC)
sys.modules["vision_accuracy"] = va
_SPEC.loader.exec_module(va)

ROWS = va.vision_rows(read_rows(CALIBRATION / "measured.csv"))
CASES = {c.name: c for c in va.calibration_cases(CALIBRATION / "measured.csv")}


def test_every_vision_and_diffusion_row_is_estimated() -> None:
    assert len(ROWS) == len(CASES) >= 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_within_15_percent(name: str) -> None:
    c = CASES[name]
    assert abs(c.error) <= 0.15, f"{name}: {c.error:+.1%}"


def test_aggregate() -> None:
    errors = sorted(abs(c.error) for c in CASES.values())
    assert statistics.median(errors) <= 0.07
    # the bar is 15% per case and 7% median; we hold ourselves to 5% so that a regression shows early
    assert errors[-1] <= 0.05, [(c.name, f"{c.error:+.1%}") for c in CASES.values()]


@pytest.mark.parametrize("case", va.published_cases(), ids=lambda c: c.name)
def test_published_figures(case: va.Case) -> None:
    assert abs(case.error) <= case.tolerance, f"{case.name}: {case.error:+.1%} (tolerance {case.tolerance:.0%})"


def test_stylegan_memory_follows_the_published_shape() -> None:
    """README: 7.2 GB at 128^2 (batch 32) > 5.0 GB at 256^2 (batch 16): the per-sample modulated weights of the
    small resolutions grow with the batch; 512^2 and 1024^2 grow again with the image."""
    by = {c.name.split()[0]: c.predicted_gib for c in va.published_cases() if c.name.startswith("stylegan")}
    assert by["stylegan2-ada-128"] > by["stylegan2-ada-256"] < by["stylegan2-ada-512"]


# ---- cross-checks against a fake-tensor trace of the libraries' own code -------------------------------------
# Not GPU measurements: the real diffusers 0.42.1 modules (and torchvision's ResNet/ViT/ConvNeXt code) run on
# fake tensors (torch 2.13 CPU) under vramplan.trace's allocator tracker and CUDA emulation (SDPA kernel choice,
# autocast policies and cache, fused-attention backward buffers); that trace reproduced the calibration rows
# within 1-2.7%. These pin the op-by-op recording to the library code where no GPU row exists (fp32, eager
# attention, LoRA, other resolutions, inference, whole pipelines). (model, options, phase, trace GiB)
TRACE = [
    ("sd15-unet", {"batch_size": 2, "precision": "fp32"}, "forward", 13.174),
    ("sd15-unet", {"batch_size": 2, "precision": "fp32"}, "backward", 13.929),
    ("sd15-unet", {"batch_size": 4, "precision": "amp-bf16"}, "forward", 15.969),
    ("sd15-unet", {"batch_size": 4, "precision": "amp-bf16"}, "backward", 16.000),
    ("sd15-unet", {"batch_size": 1, "precision": "bf16", "attention": "eager"}, "forward", 7.285),
    ("sd15-unet", {"batch_size": 1, "precision": "bf16", "attention": "eager"}, "backward", 7.591),
    ("sd15-unet", {"batch_size": 2, "precision": "bf16", "attention": "eager", "task": "infer"}, "forward", 2.686),
    ("sd15-unet", {"batch_size": 2, "precision": "fp32", "resolution": 768, "task": "infer"}, "forward", 3.805),
    ("sdxl-unet", {"batch_size": 1, "precision": "bf16"}, "forward", 20.854),
    ("sdxl-unet", {"batch_size": 1, "precision": "bf16"}, "backward", 20.910),
    ("sd15-unet", {"batch_size": 2, "precision": "amp-bf16", "method": "lora", "lora_rank": 4}, "backward", 3.735),
    ("sd15-unet", {"batch_size": 2, "precision": "amp-bf16", "method": "lora", "lora_rank": 4,
                   "gradient_checkpointing": True}, "backward", 2.168),
    ("resnet50", {"batch_size": 32, "precision": "fp32"}, "backward", 2.940),
    ("resnet18", {"batch_size": 64, "precision": "bf16"}, "backward", 0.845),
    ("vit-l-16", {"batch_size": 8, "precision": "bf16"}, "backward", 2.947),
    ("convnext-tiny", {"batch_size": 32, "precision": "amp-bf16"}, "backward", 2.279),
    ("resnet50", {"batch_size": 64, "precision": "bf16", "task": "infer"}, "forward", 0.408),
    ("vit-b-16", {"batch_size": 64, "precision": "fp32", "task": "infer"}, "forward", 0.859),
    ("convnext-tiny", {"batch_size": 32, "precision": "bf16", "task": "infer"}, "forward", 0.273),
    ("sd15", {"batch_size": 1, "precision": "fp32", "task": "infer"}, "peak", 4.755),  # whole pipeline, 2 steps
]


@pytest.mark.parametrize(("model", "options", "phase", "trace_gib"), TRACE,
                         ids=[f"{m}-{ph}-{i}" for i, (m, _, ph, _) in enumerate(TRACE)])
def test_matches_the_library_trace(model: str, options: dict[str, object], phase: str, trace_gib: float) -> None:
    from vramplan import Phase
    from vramplan.vision import estimate_vision

    est = estimate_vision(model, **{"task": "train", **options})
    got = est.peak_allocated_bytes if phase == "peak" else est.phase_peak(Phase(phase))
    assert got / 2**30 == pytest.approx(trace_gib, rel=0.03)


# Diffusion transformers with fewer layers (the per-block memory is what the recording must get right).
# (kind, layers, single layers, batch, resolution, task, trace GiB of the peak)
DIT_TRACE = [
    ("dit-xl-2-transformer", 4, 0, 8, 512, "train", 2.193), ("dit-xl-2-transformer", 4, 0, 8, 512, "infer", 0.447),
    ("pixart-alpha-transformer", 4, 0, 2, 1024, "train", 2.365),
    ("pixart-alpha-transformer", 4, 0, 2, 1024, "infer", 0.442),
    ("sd3-medium-transformer", 4, 0, 2, 1024, "train", 4.262),
    ("sd3-medium-transformer", 4, 0, 2, 1024, "infer", 1.066),
    ("flux-dev-transformer", 2, 4, 1, 1024, "train", 12.269), ("flux-dev-transformer", 2, 4, 1, 1024, "infer", 2.929),
]


@pytest.mark.parametrize(("name", "layers", "single", "batch", "res", "task", "trace_gib"), DIT_TRACE)
def test_transformer_blocks_match_the_library_trace(name: str, layers: int, single: int, batch: int, res: int,
                                                    task: str, trace_gib: float) -> None:
    import dataclasses

    from vramplan._engine.numerics import Numerics
    from vramplan._engine.replay import forward as replay_forward
    from vramplan._engine.step import states_moment as state_moment
    from vramplan._engine.tape import Moment
    from vramplan.kinds import MemoryKind
    from vramplan.vision._catalog import get_vision_model
    from vramplan.vision._dit import DiTRun, build_dit
    from vramplan.vision._layers import Layers
    from vramplan.vision._specs import dit_from_config
    from vramplan.vision._states import model_states
    from vramplan.vision._steps import train_step
    from vramplan.workload import Optimizer

    spec = dataclasses.replace(dit_from_config(get_vision_model(name).config), num_layers=layers,
                               num_single_layers=single)
    train = task == "train"
    L = Layers(Numerics(train, 2, 2, False))
    lat = res // 8
    n = batch * (lat // 2) ** 2 * spec.in_channels if spec.kind == "flux" else batch * spec.in_channels * lat * lat
    x = L.input(n, 2)
    text = L.input(batch * spec.text_len * spec.joint_attention_dim, 2) if spec.joint_attention_dim else None
    pooled = L.input(batch * spec.pooled_projection_dim, 2) if spec.pooled_projection_dim else None
    out = build_dit(L, spec, DiTRun(batch, lat, lat), x, text, pooled)
    st = model_states([], 2, L.tensor_sizes(), 2, amp=False, training=train, optimizer=Optimizer.ADAMW)
    bufs = Moment.of({MemoryKind.WEIGHTS: 2 * sum(L.buffers.values())})
    if train:
        loss = L.mse_loss(out, x)
        r = train_step(L, st, (loss,), bufs)
        got = max(r.forward.total, r.backward.total, r.step.total)
    else:
        got = replay_forward(L, state_moment(st, workspace_handles=1) + bufs).peak.total
    assert got / 2**30 == pytest.approx(trace_gib, rel=0.03)
