"""The service layer and the one front door: every model through ``vramplan.estimate``, results == CLI JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

import vramplan
from vramplan import service
from vramplan.cli import main
from vramplan.errors import WorkloadError


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_image_models_through_the_python_front_door(capsys: pytest.CaptureFixture[str]) -> None:
    est = vramplan.estimate("sdxl", task="infer", precision="fp16")
    assert est.model == "sdxl" and est.peak_allocated_bytes > 4 * 2**30 and est.per_gpu is None
    assert est.to_dict() == cli_json(capsys, "estimate", "sdxl", "--task", "infer", "--precision", "fp16")
    with pytest.raises(WorkloadError, match="language models"):
        vramplan.estimate("sdxl", seq_len=4096)
    with pytest.raises(WorkloadError, match="image models"):
        vramplan.estimate("gpt2", resolution=256)
    with pytest.raises(WorkloadError, match="layouts"):
        vramplan.estimate("sdxl", gpus=8, fsdp="full")


def test_per_gpu_through_the_python_front_door(capsys: pytest.CaptureFixture[str]) -> None:
    est = vramplan.estimate("llama-3.1-70b", method="lora", gpus=8, fsdp="full")
    assert est.per_gpu is not None and est.per_gpu.engine.value == "fsdp"
    assert est.to_dict() == cli_json(capsys, "estimate", "llama-3.1-70b", "--method", "lora", "--gpus", "8",
                                     "--fsdp", "full")


@pytest.mark.parametrize("argv", [
    ["estimate", "mistral-7b", "--task", "infer", "--batch-size", "4"],
    ["estimate", "sd15", "--task", "train", "--method", "lora", "--precision", "amp-fp16"],
    ["estimate", "llama-3.1-8b", "--gpus", "4", "--zero", "3"],
    ["fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora"],
    ["fit", "sd15-unet", "--gpu", "rtx-4090", "--resolution", "512"],
    ["plan", "llama-3.2-1b", "--task", "infer", "--gpu", "l4"],
    ["sweep", "sdxl", "--over", "batch-size", "--range", "1:4", "--gpu", "rtx-4090"],
    ["sweep", "llama-3.2-1b", "--over", "seq-len", "--range", "512:4096", "--method", "lora"],
])
def test_service_results_are_the_cli_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    from vramplan.cli import build_parser
    from vramplan.cli._flags import options

    ns = build_parser().parse_args(argv)
    got = service.answer(argv[0], ns.model, options(ns))
    want = cli_json(capsys, *argv)
    got.pop("elapsed_s", None), want.pop("elapsed_s", None)
    assert got == want


def test_models_lists_every_model_with_its_kind(capsys: pytest.CaptureFixture[str]) -> None:
    every = cli_json(capsys, "models")
    llm, image = cli_json(capsys, "models", "--kind", "llm"), cli_json(capsys, "models", "--kind", "image")
    assert every == llm + image and len(llm) >= 60 and len(image) >= 30
    assert {m["kind"] for m in llm} == {"llm"} and {m["kind"] for m in image} == {"image"}
    assert {"sdxl", "sd15-unet", "flux-dev", "resnet50", "stylegan2-1024"} <= {m["name"] for m in image}
    assert not any(m["family"] in ("image: vae", "image: text_encoder") for m in image)
    for m in every:  # every listed model is one `vramplan estimate` takes
        assert service.resolve(m["name"]).kind == m["kind"]
    with pytest.raises(SystemExit):
        main(["models", "--kind", "video"])


def test_sweep_of_an_image_model(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "sweep", "sdxl", "--over", "batch-size", "--range", "1:4")
    assert data["values"] == [1, 2, 4] and data["model"] == "sdxl"
    totals = [p["total_bytes"] for p in data["points"]]
    assert totals == sorted(totals)
    assert main(["sweep", "sdxl", "--over", "seq-len", "--range", "512:1024"]) == 2
    assert "batch-size" in capsys.readouterr().err


def test_public_list_models_is_every_model_estimate_takes() -> None:
    """vramplan.list_models() is the service's listing: language and image models, as `vramplan models` prints."""
    from vramplan.api import resolve
    from vramplan.catalog import list_models as language_catalog

    listed = vramplan.list_models()
    assert listed == service.models()
    kinds = {m.kind for m in listed}
    assert kinds == {"llm", "image"}
    assert [m.name for m in listed if m.kind == "llm"] == [e.name for e in language_catalog()]
    assert vramplan.list_models(kind="image") == tuple(m for m in listed if m.kind == "image")
    for m in listed:
        assert resolve(m.name).kind == m.kind  # every row is a name estimate takes, of the kind it says
