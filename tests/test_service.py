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
    ["estimate", "llama-3.1-8b", "--gpus", "8", "--fsdp", "full", "--gpu", "h100-sxm"],
    ["estimate", "qwen2.5-7b", "--task", "infer", "--gpu", "a100-80gb-sxm", "--engine", "vllm"],
    ["estimate", "llama-3.2-1b", "--method", "lora", "--gpu", "custom:memory=96GiB,bf16_tflops=500,bandwidth=3TB/s"],
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


def test_time_is_the_service_s_answer() -> None:
    """The ``time`` section belongs to the estimate the service returns (CLI, API and web alike), not to the CLI."""
    q = service.EstimateQuery.of("llama-3.1-8b", {"time_gpu": "h100-sxm", "gpus": 8, "fsdp": "full"})
    est = service.estimate(q)
    assert est.time is not None and est.time["gpus"] == 8 and est.time["step_seconds"] > 0
    assert est.to_dict()["time"] == dict(est.time)
    one = service.estimate(service.EstimateQuery.of("llama-3.1-8b", {"time_gpu": "h100-sxm"}))
    assert one.time is not None and one.time["gpus"] == 1
    # the same global batch over 8 GPUs: every GPU steps its own micro-batch, the step takes about as long
    assert 0.5 < est.time["step_seconds"] / one.time["step_seconds"] < 2
    assert "time" not in service.estimate(service.EstimateQuery.of("llama-3.1-8b", {})).to_dict()


def test_time_of_an_image_model_says_why_there_is_none() -> None:
    est = service.estimate(service.EstimateQuery.of("sdxl-unet", {"time_gpu": "h100-sxm"}))
    assert est.time is not None and est.time["step_seconds"] is None and "image model" in est.time["reason"]


def test_pooled_serving_engines_say_what_the_memory_is() -> None:
    est = service.estimate(service.EstimateQuery.of("qwen2.5-7b", {"task": "infer", "time_gpu": "l40s",
                                                                   "engine": "vllm"}))
    assert est.time is not None and est.time["engine"] == "vllm"
    assert any("KV-cache pool" in w and "--engine vllm" in w for w in est.warnings)
    plain = service.estimate(service.EstimateQuery.of("qwen2.5-7b", {"task": "infer", "time_gpu": "l40s"}))
    assert not any("KV-cache pool" in w for w in plain.warnings)


@pytest.mark.parametrize(("options", "words"), [
    ({"engine": "vllm", "task": "infer"}, "needs --gpu"),
    ({"efficiency": 0.4}, "needs --gpu"),
    ({"time_gpu": "h100-sxm", "engine": "triton"}, "unknown engine"),
])
def test_time_options_without_their_gpu_are_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(WorkloadError, match=words):
        service.estimate(service.EstimateQuery.of("llama-3.2-1b", options))


def test_a_gpu_spec_file_is_local_only(tmp_path: Any) -> None:
    spec = tmp_path / "gpu.json"
    spec.write_text("{}")
    with pytest.raises(WorkloadError, match="inline"):
        service.estimate(service.EstimateQuery.of("llama-3.2-1b", {"gpu_spec": str(spec)}, local_files=False))


def test_cli_engines_are_the_time_model_s() -> None:
    from vramplan.cli.time import ENGINE_CHOICES
    from vramplan.perf.efficiency import ENGINES

    assert ENGINE_CHOICES == ENGINES
