"""vramplan trace on image models: torchvision backbones and diffusers UNets on fake tensors, as the calibration
harness (measure.py run_vision / run_unet) runs them, against the pure-Python image estimator and the measured rows.

The fast tests trace small shapes (a few seconds each); the slow ones trace the calibration rows at their measured
shapes. Refusals need no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramplan.calibration import read_rows
from vramplan.errors import VramplanError
from vramplan.kinds import Phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # the calibration rows' model names and workloads as measure.py runs them (shared with the benchmarks)
    from vision_accuracy import MODELS, options_of_row, vision_rows
finally:
    sys.path.pop(0)

GiB = 2**30
SRC = Path(__file__).resolve().parents[1] / "src"
CALIBRATION = Path(os.environ.get("VRAMPLAN_CALIBRATION", Path(__file__).parent / "data" / "calibration"))
# estimate vs trace of the same workload: both follow one allocation program (the estimate transcribes the libraries'
# code; the trace runs it), so they agree to within a few tenths of a percent on the calibration shapes; small shapes
# give the fixed terms (cuBLAS workspaces, 512-byte block rounding of many small tensors) more weight
TOLERANCE = 0.02
MEASURED_TOLERANCE = 0.05  # the language trace's acceptance against the H200 rows


def _trace(name: str, **options: Any) -> Any:
    from vramplan.trace import trace_vision

    return trace_vision(name, **options)


# ---- refusals: one line, before torch ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options", "needle"), [
    ("sd15", {}, "pipeline training"),
    ("sd15-unet", {"pipeline": True}, "pipeline training"),
    ("flux-dev", {"task": "infer"}, "diffusion transformer"),
    ("resnet50", {"pipeline": True}, "no pipeline"),
    ("stylegan2-256", {}, "StyleGAN"),
    ("dit-xl-2-transformer", {"attention": "eager"}, "diffusion transformers run SDPA"),
    ("sd-vae", {}, "component"),
    ("resnet50", {"method": "lora"}, "lora"),
    ("resnet50", {"gradient_checkpointing": True}, "checkpointing"),
    ("resnet50", {"gradient_accumulation": 2}, "calibration loop"),
])
def test_refusals(name: str, options: dict[str, Any], needle: str) -> None:
    with pytest.raises(VramplanError, match=needle) as err:
        _trace(name, **options)
    assert "\n" not in str(err.value)


def test_cli_refuses_pipeline_exit_2() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "vramplan", "trace", "sd15"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "pipeline training" in r.stderr


def test_cli_refuses_image_flag_on_language_model() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "vramplan", "trace", "gpt2-124m", "--resolution", "256"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--resolution applies to image models" in r.stderr


# ---- estimate vs trace on small shapes ------------------------------------------------------------------------
def _needs(*mods: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util

    for m in mods:  # installed is enough: the trace imports them its own way (see trace/_vision.py)
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed (the [image-trace] extra)")


def _close(name: str, **options: Any) -> tuple[Any, Any]:
    from vramplan.vision import estimate_vision

    est = estimate_vision(name, **options)
    tr = _trace(name, **options)
    for a, b in ((est.peak_allocated_bytes, tr.peak_allocated_bytes), (est.peak_reserved_bytes,
                                                                       tr.peak_reserved_bytes)):
        assert a is not None and b is not None
        assert abs(a / b - 1) <= TOLERANCE, (name, options, a / GiB, b / GiB)
    assert tr.parameters == est.parameters
    return est, tr


@pytest.mark.parametrize(("name", "options"), [
    ("resnet18", {"precision": "amp-bf16", "batch_size": 8, "resolution": 128}),
    ("vit-b-32", {"precision": "amp-bf16", "batch_size": 4}),
    ("resnet18", {"precision": "bf16", "batch_size": 8, "resolution": 128, "task": "infer"}),
])
def test_backbone_estimate_matches_trace(name: str, options: dict[str, Any]) -> None:
    _needs("torchvision")
    _est, tr = _close(name, **options)
    train = options.get("task", "train") == "train"
    assert {p.phase for p in tr.phases} == ({Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP} if train
                                            else {Phase.FORWARD})
    assert tr.trainable_parameters == (tr.parameters if train else 0)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"precision": "bf16", "batch_size": 1, "resolution": 256},
    {"precision": "bf16", "batch_size": 1, "resolution": 256, "task": "infer"},
    {"precision": "bf16", "batch_size": 1, "resolution": 256, "gradient_checkpointing": True},
    # LoRA as diffusers' scripts run it: fp32 adapters under fp16 mixed precision (cast_training_params), the base's
    # bf16 under bf16 mixed precision and bf16 weights (add_adapter alone)
    {"precision": "amp-fp16", "batch_size": 1, "resolution": 256, "method": "lora"},
    {"precision": "amp-bf16", "batch_size": 1, "resolution": 256, "method": "lora"},
    {"precision": "bf16", "batch_size": 2, "resolution": 512, "method": "lora"},
])
def test_unet_estimate_matches_trace(options: dict[str, Any]) -> None:
    _needs("diffusers")
    _needs("peft")
    _close("sd15-unet", **options)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [
    ("dit-xl-2-transformer", {"precision": "bf16", "batch_size": 2}),
    ("sd3-medium-transformer", {"precision": "bf16", "batch_size": 1, "resolution": 256, "task": "infer"}),
])
def test_dit_estimate_matches_trace(name: str, options: dict[str, Any]) -> None:
    """Diffusion transformers through run_unet's loop (DiT's learned variance: the noise half meets the target)."""
    _needs("diffusers")
    _close(name, **options)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [
    ("sd15", {"task": "infer", "precision": "fp16", "batch_size": 2, "resolution": 256}),
    ("sdxl", {"task": "infer", "precision": "fp16", "batch_size": 1, "resolution": 512}),
])
def test_pipeline_estimate_matches_trace(name: str, options: dict[str, Any]) -> None:
    """Text encoders, two guided denoising steps and the VAE decode (SDXL's fp32 upcast under fp16)."""
    _needs("diffusers")
    _est, tr = _close(name, **options)
    assert {p.phase for p in tr.phases} == {Phase.PREFILL, Phase.FORWARD, Phase.DECODE}
    assert tr.peak_phase is Phase.DECODE


def test_unet_config_file(tmp_path: Path) -> None:
    """A diffusers UNet config.json (``_class_name`` UNet2DConditionModel) is traced as the catalog entry is."""
    _needs("diffusers")
    import json

    from vramplan.vision import get_vision_model

    cfg = {**get_vision_model("sd15-unet").config, "_class_name": "UNet2DConditionModel"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    opts = {"task": "infer", "batch_size": 1, "resolution": 128}
    tr = _trace(str(tmp_path / "config.json"), **opts)
    ref = _trace("sd15-unet", **opts)
    assert tr.parameters == ref.parameters == get_vision_model("sd15-unet").params
    # (the first trace in a process can count a few 512-byte blocks more: objects cached once per process)
    assert abs(tr.peak_allocated_bytes - ref.peak_allocated_bytes) <= 8 * 512


def test_trace_follows_batch() -> None:
    """The activations scale with the batch: a trace that ignored the inputs would not see it."""
    _needs("torchvision")
    small = _trace("resnet18", precision="bf16", batch_size=2, resolution=128, task="infer")
    big = _trace("resnet18", precision="bf16", batch_size=16, resolution=128, task="infer")
    assert big.peak_allocated_bytes > small.peak_allocated_bytes + 8 * 2 * 64 * 64 * 64 * 2  # > the stem's growth


# ---- the calibration rows (slow) ------------------------------------------------------------------------------
def _rows() -> list[dict[str, str]]:
    path = CALIBRATION / "measured.csv"
    return vision_rows(read_rows(path)) if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["name"])
def test_calibration_row(row: dict[str, str]) -> None:
    _needs("torchvision" if row["task"] == "vision" else "diffusers")
    tr = _trace(MODELS[row["model"]], **options_of_row(row))
    measured = float(row["peak_alloc_gib"])
    assert abs(tr.peak_allocated_bytes / GiB / measured - 1) <= MEASURED_TOLERANCE
    assert tr.parameters == int(row["params"])
