"""``vramplan fit``, ``vramplan plan`` and the web API for image and diffusion models (vramplan.vision)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.fit import check_vision_fit
from vramplan.hardware import get_gpu
from vramplan.planner import VISION_NO_TIME, PlanRequest, PlanTask, plan_vision
from vramplan.vision import estimate_vision, resolution_grid

FIT_KEYS = {"model", "gpu", "gpu_display_name", "fits", "usable_memory_bytes", "peak_allocated_bytes", "total_bytes",
            "headroom_bytes", "max_batch_size", "max_seq_len", "context_limit", "kv_cache", "step_time_s",
            "tokens_per_s", "workload", "assumptions", "warnings"}


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _fits(name: str, usable: int, **options: Any) -> bool:
    try:
        return estimate_vision(name, **options).total_bytes <= usable
    except WorkloadError:
        return False


# ----------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize(("name", "gpu", "options"), [
    ("sd15-unet", "rtx-4090", {"task": "train"}),
    ("sd15-unet", "rtx-3060-12gb", {"task": "infer", "resolution": 768, "batch_size": 2}),
    ("sdxl", "rtx-4090", {"task": "infer", "pipeline": True, "precision": "fp16"}),
    ("vit-b-16", "t4", {"task": "train", "precision": "amp-bf16"}),
    ("resnet50", "rtx-4090", {"task": "infer", "batch_size": 8}),
])
def test_fit_is_exact(name: str, gpu: str, options: dict[str, Any]) -> None:
    g = get_gpu(gpu)
    usable = g.usable_memory_bytes
    r = check_vision_fit(name, g, **options)
    assert r.fits == (r.total_bytes <= usable)
    assert r.headroom_bytes == usable - r.total_bytes
    res = r.resolution
    # the largest batch at the resolution: N fits, N + 1 does not
    assert r.max_batch_size >= 1
    assert _fits(name, usable, **{**options, "batch_size": r.max_batch_size, "resolution": res})
    assert not _fits(name, usable, **{**options, "batch_size": r.max_batch_size + 1, "resolution": res})
    # the largest resolution at the batch: R fits, the next valid resolution does not
    grid = resolution_grid(name)
    assert grid is not None and r.resolution_step == grid[0]
    step, smallest = grid
    assert r.max_resolution >= smallest and (r.max_resolution - smallest) % step == 0
    batch = r.estimate.workload["batch_size"]
    assert _fits(name, usable, **{**options, "batch_size": batch, "resolution": r.max_resolution})
    assert not _fits(name, usable, **{**options, "batch_size": batch, "resolution": r.max_resolution + step})
    assert r.to_dict().keys() >= FIT_KEYS | {"resolution", "max_resolution", "resolution_step"}


def test_fit_fixed_resolution_and_too_big() -> None:
    r = check_vision_fit("stylegan2-1024", get_gpu("rtx-4090"))
    assert r.resolution_step is None and r.max_resolution == 1024 and r.fits
    big = check_vision_fit("flux-dev", get_gpu("rtx-3060-12gb"), task="train")
    assert not big.fits and big.headroom_bytes < 0 and big.max_batch_size == 0 and big.max_resolution == 0


def test_resolution_grid_from_the_validation() -> None:
    assert resolution_grid("sd15-unet") == (64, 64)
    assert resolution_grid("vit-b-16") == (16, 32)
    assert resolution_grid("stylegan2-512") is None
    with pytest.raises(WorkloadError, match="multiple of 64"):
        estimate_vision("sd15-unet", resolution=96)


def test_fit_cli(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "fit", "sd15-unet", "--gpu", "rtx-4090", "--task", "infer", "--resolution", "768",
                    "--batch-size", "2")
    r = check_vision_fit("sd15-unet", get_gpu("rtx-4090"), task="infer", resolution=768, batch_size=2,
                         lora_rank=16)  # the CLI's --lora-rank default
    assert data == json.loads(json.dumps(r.to_dict()))
    assert data["workload"]["resolution"] == 768 and data["max_seq_len"] is None
    assert main(["fit", "sd15-unet", "--gpu", "rtx-4090"]) == 0  # the table
    assert "largest resolution" in capsys.readouterr().out


def test_fit_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "sd15-unet", "--gpu", "rtx-4090", "--resolution", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main(["fit", "sd15-unet", "--gpu", "rtx-4090", "--method", "qlora"]) == 2
    assert "full or lora" in capsys.readouterr().err
    assert main(["fit", "llama-3.2-1b", "--gpu", "rtx-4090", "--resolution", "512"]) == 2
    assert "image models" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- plan

POOL = [get_gpu(n) for n in ("rtx-3060-12gb", "rtx-4090", "t4", "a100-80gb-sxm", "h100-sxm")]


def test_plan_fits_and_recommends() -> None:
    r = plan_vision("sd15-unet", PlanRequest(task=PlanTask.FINETUNE), gpus=POOL)
    assert r.plans and r.feasible >= len(r.plans) and r.resolution == 512
    for p in r.plans:
        assert p.fits and p.gpu_count == 1 and p.layout == "single" and p.resolution == 512
        assert p.time_hours is None and p.cost_usd is None and p.cost_reason == VISION_NO_TIME
        # the plan's bytes are the estimator's
        est = estimate_vision("sd15-unet", task="train", method=p.method, precision=p.precision,
                              optimizer=p.optimizer, batch_size=p.micro_batch,
                              gradient_checkpointing=p.gradient_checkpointing, lora_rank=16)
        assert est.total_bytes == p.total_bytes
    assert r.consumer is not None and r.consumer.gpu == "rtx-3060" and r.consumer.method == "full"
    assert r.datacenter is not None and r.datacenter.gpu_class == "datacenter"
    # t4 has no bf16: no bf16 plan on it
    assert not any(p.gpu == "t4" and "bf16" in p.precision for p in r.plans)


def test_plan_infeasible_on_consumer_and_infer() -> None:
    r = plan_vision("flux-dev", PlanRequest(task=PlanTask.FINETUNE), gpus=POOL)
    assert r.consumer is None and r.consumer_reason and "not feasible on consumer" in r.consumer_reason
    assert r.datacenter is not None and r.datacenter.usable_memory_bytes >= 70 * 2**30
    inf = plan_vision("sdxl", PlanRequest(task=PlanTask.INFER), gpus=POOL, resolution=1024, pipeline=True)
    assert inf.plans and all(p.method == "inference" and p.optimizer is None for p in inf.plans)
    assert "images of 1024 px" in inf.plans[0].describe()


def test_plan_cli_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "plan", "resnet50", "--gpu", "rtx-4090", "--gpu", "h100-sxm", "--task", "train")
    assert data.keys() >= {"model", "parameters", "task", "tokens", "seq_len", "global_batch", "candidates_evaluated",
                           "plans", "recommendation", "assumptions", "warnings", "resolution"}
    assert data["recommendation"].keys() >= {"consumer", "consumer_reason", "datacenter", "datacenter_reason"}
    for p in data["plans"]:
        assert p["fits"] and p["time_hours"] is None and p["cost_reason"] == VISION_NO_TIME
    assert main(["plan", "resnet50", "--method", "qlora", "--json"]) == 2
    assert "full or lora" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- web == CLI


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    pytest.importorskip("starlette")
    import warnings

    from starlette.testclient import TestClient

    from vramplan.web.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TestClient(create_app(), raise_server_exceptions=False) as c:
            yield c


CASES = [
    ("sd15-unet", {"task": "train", "resolution": 768, "batch_size": 2, "gradient_checkpointing": True}),
    ("sdxl", {"task": "infer", "pipeline": True, "resolution": 1024, "precision": "fp16"}),
    ("vit-l-16", {"task": "train", "resolution": 384, "optimizer": "adamw-8bit"}),
]


def _flags(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in options.items():
        out += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.mark.parametrize(("name", "options"), CASES)
def test_api_estimate_and_fit_equal_the_cli(client: Any, capsys: pytest.CaptureFixture[str], name: str,
                                            options: dict[str, Any]) -> None:
    est = client.post("/api/estimate", json={"model": name, **options})
    assert est.status_code == 200, est.text
    assert est.json() == cli_json(capsys, "estimate", name, *_flags(options))
    fit = client.post("/api/fit", json={"model": name, "gpu": "rtx-4090", **options})
    assert fit.status_code == 200, fit.text
    assert fit.json() == cli_json(capsys, "fit", name, "--gpu", "rtx-4090", *_flags(options))
    assert fit.json()["workload"]["resolution"] == options["resolution"]


def test_api_plan_equals_the_cli(client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    body = {"model": "vit-b-16", "task": "infer", "resolution": 384, "gpu": ["rtx-4090", "h100-sxm"]}
    got = client.post("/api/plan", json=body)
    assert got.status_code == 200, got.text
    want = cli_json(capsys, "plan", "vit-b-16", "--task", "infer", "--resolution", "384", "--gpu", "rtx-4090",
                    "--gpu", "h100-sxm")
    api = got.json()
    assert api.pop("elapsed_s") >= 0 and want.pop("elapsed_s") >= 0
    assert api == want


def test_api_vision_models_and_errors(client: Any) -> None:
    models = client.get("/api/vision-models").json()
    names = {m["name"] for m in models}
    assert {"sd15-unet", "sdxl-unet", "sd15", "sdxl", "flux-dev", "resnet50", "vit-b-16", "stylegan2-1024"} <= names
    assert all(m["family"].startswith("image: ") and m["parameters"] > 0 for m in models)
    assert not any(m["kind"] in ("vae", "text_encoder") for m in models)
    assert client.get("/api/schema").json()["features"]["vision"] is True
    bad = client.post("/api/fit", json={"model": "sd15-unet", "gpu": "rtx-4090", "resolution": 100})
    assert bad.status_code == 422 and "multiple of 64" in bad.json()["error"]
