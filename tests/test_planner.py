"""vramplan.planner: every listed plan fits, the ranking, the search's shortcuts, the JSON contract."""

from __future__ import annotations

import json
import math

import pytest

from vramplan import get_model
from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.estimator import estimate
from vramplan.hardware import get_gpu, list_gpus
from vramplan.parallel import FSDPMode, Layout, estimate_parallel, links_for_gpu
from vramplan.planner import Plan, PlanRequest, PlanResult, PlanTask, SortKey, plan
from vramplan.planner.search import _memory_twin
from vramplan.workload import LogitsMode, Loss, Method, Optimizer, Precision, Task, WeightsQuant, Workload


def _plan(model: str, **kw: object) -> PlanResult:
    return plan(get_model(model).spec, PlanRequest(**kw), name=model)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def finetune_8b() -> PlanResult:
    return _plan("llama-3.1-8b", task=PlanTask.FINETUNE)


@pytest.fixture(scope="module")
def infer_8b() -> PlanResult:
    return _plan("llama-3.1-8b", task=PlanTask.INFER, new_tokens=256)


def _layout(p: Plan) -> Layout:
    n = p.gpu_count
    return {"single": Layout(), "replicas": Layout(), "ddp": Layout(gpus=n), "tp": Layout(gpus=n, tp=n),
            "fsdp": Layout(gpus=n, fsdp=FSDPMode.FULL)}[p.layout]


def _recheck(model: str, p: Plan, seq_len: int, new_tokens: int = 256) -> int:
    """The plan's per-GPU total, recomputed from scratch through the public estimators."""
    spec = get_model(model).spec
    if p.method == "inference":
        w = Workload(task=Task.INFER, precision=Precision(p.precision), weights_quant=WeightsQuant(p.weights_quant),
                     batch_size=p.micro_batch, seq_len=seq_len, new_tokens=new_tokens, logits=LogitsMode.LAST)
    else:
        assert p.optimizer is not None
        w = Workload(method=Method(p.method), precision=Precision(p.precision), optimizer=Optimizer(p.optimizer),
                     batch_size=p.micro_batch, seq_len=seq_len, gradient_checkpointing=p.gradient_checkpointing,
                     gradient_accumulation=p.gradient_accumulation,
                     loss=Loss(p.saver.removeprefix("--loss ")) if (p.saver or "").startswith("--loss") else Loss.AUTO,
                     activation_offload=p.saver == "--activation-offload")
    layout = _layout(p)
    if layout.is_single:
        return estimate(spec, w).total_bytes
    # NCCL's buffers over the plan's GPU's own links (PCIe for an RTX 4090, NVLink 4 for an H100)
    return estimate_parallel(spec, w, layout, links_for_gpu(p.gpu, layout.gpus_per_node)).total_bytes


def test_every_plan_fits_and_the_top_plan_is_rechecked(finetune_8b: PlanResult, infer_8b: PlanResult) -> None:
    for result in (finetune_8b, infer_8b):
        assert result.plans
        for p in result.plans:
            assert p.fits and p.total_bytes <= p.usable_memory_bytes
            assert p.usable_memory_bytes == get_gpu(p.gpu).usable_memory_bytes
        top = result.plans[0]
        if top.method == "inference" or top.optimizer is not None:
            total = _recheck("llama-3.1-8b", top, result.seq_len)
            assert total == top.total_bytes
            assert total <= get_gpu(top.gpu).usable_memory_bytes


@pytest.mark.parametrize(("model", "task"), [("llama-2-13b", "finetune"), ("falcon-40b", "infer"),
                                             ("llama-2-70b", "finetune"), ("qwen2.5-0.5b", "train")])
def test_top_plan_never_one_that_does_not_fit(model: str, task: str) -> None:
    r = _plan(model, task=PlanTask(task), max_gpus=8)
    for p in r.plans:
        assert p.fits
    for rec in (r.consumer, r.datacenter):
        assert rec is None or rec.fits
    if r.plans:
        top = r.plans[0]
        assert _recheck(model, top, r.seq_len) <= get_gpu(top.gpu).usable_memory_bytes


def test_search_size_and_contract(finetune_8b: PlanResult) -> None:
    # >= 10,000 with every layout modelled (fewer while the parallel estimator skips sharded layouts)
    assert finetune_8b.candidates_evaluated >= (10_000 if finetune_8b.layouts_unsupported == 0 else 5_000)
    assert finetune_8b.feasible >= len(finetune_8b.plans)
    data = finetune_8b.to_dict()
    assert data.keys() >= {"candidates_evaluated", "plans", "recommendation", "assumptions"}
    assert data["recommendation"].keys() >= {"consumer", "datacenter"}
    for p in data["plans"]:
        assert p.keys() >= {"gpu", "gpu_count", "method", "precision", "peak_allocated_bytes", "time_hours",
                            "cost_usd"}
    json.dumps(data)  # serialisable


def test_ranking_by_cost_then_by_time() -> None:
    by_cost = _plan("llama-3.2-1b", task=PlanTask.FINETUNE, top=50)
    costs = [p.cost_usd if p.cost_usd is not None else math.inf for p in by_cost.plans]
    assert costs == sorted(costs)
    by_time = _plan("llama-3.2-1b", task=PlanTask.FINETUNE, top=50, sort=SortKey.TIME)
    times = [p.time_hours if p.time_hours is not None else math.inf for p in by_time.plans]
    assert times == sorted(times)


def test_restrictions_are_respected() -> None:
    r = _plan("mistral-7b", task=PlanTask.FINETUNE, methods=(Method.LORA,), max_gpus=2, gpu_class="datacenter",
              budget_usd=50.0)
    assert r.plans
    assert {p.method for p in r.plans} == {"lora"}
    assert all(p.gpu_count <= 2 and p.gpu_class == "datacenter" for p in r.plans)
    assert all(p.cost_usd is not None and p.cost_usd <= 50.0 for p in r.plans)
    assert r.consumer is None and r.consumer_reason and "excludes" in r.consumer_reason
    train = _plan("qwen2.5-0.5b", task=PlanTask.TRAIN, max_gpus=1)
    assert {p.method for p in train.plans} == {"full"}
    assert train.tokens == 20 * train.parameters  # Chinchilla default


def test_token_budget_from_epochs() -> None:
    r = _plan("qwen2.5-0.5b", task=PlanTask.FINETUNE, epochs=3.0, dataset_tokens=10_000_000, max_gpus=1,
              gpu_class="datacenter", methods=(Method.LORA,))
    assert r.tokens == 30_000_000
    with pytest.raises(WorkloadError):
        PlanRequest(epochs=3.0)
    with pytest.raises(WorkloadError):
        PlanRequest(tokens=5, epochs=1.0, dataset_tokens=5)


def test_time_halves_with_twice_the_tokens() -> None:
    a = _plan("qwen2.5-0.5b", task=PlanTask.FINETUNE, tokens=10**8, max_gpus=1)
    b = _plan("qwen2.5-0.5b", task=PlanTask.FINETUNE, tokens=2 * 10**8, max_gpus=1)
    pa, pb = a.plans[0], b.plans[0]
    assert pa.gpu == pb.gpu and pa.time_hours is not None and pb.time_hours is not None
    assert pb.time_hours == pytest.approx(2 * pa.time_hours, rel=0.01)


def test_infeasible_everywhere_gives_reasons_with_numbers() -> None:
    pool = [get_gpu("rtx-4090"), get_gpu("h100-sxm")]
    r = plan(get_model("llama-3.1-405b").spec, PlanRequest(task=PlanTask.FINETUNE, max_gpus=1), gpus=pool)
    assert not r.plans and r.feasible == 0
    assert r.consumer is None and r.consumer_reason is not None
    assert r.consumer_reason.startswith("not feasible on consumer GPUs") and "GiB" in r.consumer_reason
    assert r.datacenter is None and r.datacenter_reason is not None and "GiB" in r.datacenter_reason


def test_memory_twins_are_exact() -> None:
    """The planner evaluates fp16 as bf16 and accumulation > 2 as 2: check both on the estimator itself."""
    for model in ("llama-3.2-1b", "gpt2", "gemma-2-2b", "mistral-7b"):
        spec = get_model(model).spec
        for method in Method:
            base = Workload(method=method, batch_size=2, seq_len=512, optimizer=Optimizer.ADAMW)
            for a, b in ((Precision.BF16, Precision.FP16), (Precision.AMP_BF16, Precision.AMP_FP16)):
                if method is Method.QLORA and a.is_amp:
                    continue
                if _memory_twin(spec, base.with_(precision=b)).precision is b:
                    continue  # eager attention (Gemma-2 in transformers 5.24): not twinned
                assert estimate(spec, base.with_(precision=a)).total_bytes == \
                    estimate(spec, base.with_(precision=b)).total_bytes, (model, method, a)
            assert estimate(spec, base.with_(gradient_accumulation=2)).total_bytes == \
                estimate(spec, base.with_(gradient_accumulation=16)).total_bytes
        infer = Workload(task=Task.INFER, batch_size=4, seq_len=512)
        assert estimate(spec, infer).total_bytes == estimate(spec, infer.with_(precision=Precision.FP16)).total_bytes


def test_ddp_memory_does_not_depend_on_the_replica_count() -> None:
    # what PyTorch holds does not (the planner evaluates 2 replicas for every DDP size); NCCL's buffers do: with 2
    # ranks the ring and the tree share their one peer (the planner adds them per layout and GPU)
    spec = get_model("llama-3.2-1b").spec
    w = Workload(batch_size=2, seq_len=1024, gradient_accumulation=2)
    try:
        two = estimate_parallel(spec, w, Layout(gpus=2))
        eight = estimate_parallel(spec, w, Layout(gpus=8))
    except WorkloadError:
        pytest.skip("the parallel estimator does not model DDP")
    assert two.total_bytes - two.nccl_bytes == eight.total_bytes - eight.nccl_bytes
    assert 0 < two.nccl_bytes < eight.nccl_bytes


def test_gpus_without_bf16_plan_in_fp16() -> None:
    r = _plan("qwen2.5-0.5b", task=PlanTask.FINETUNE, max_gpus=1, top=200)
    v100 = [p for p in r.plans if p.gpu.startswith("v100")]
    assert v100 and all(p.precision in ("fp16", "amp-fp16") for p in v100)
    assert all(p.time_hours is not None for p in v100)


def test_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "qwen2.5-0.5b", "--task", "finetune", "--max-gpus", "1", "--gpu-class", "datacenter",
               "--method", "lora", "--top", "5", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    data = json.loads(out)
    assert len(data["plans"]) <= 5 and {p["method"] for p in data["plans"]} == {"lora"}
    assert data["recommendation"]["consumer"] is None
    assert "excludes" in data["recommendation"]["consumer_reason"]
    assert main(["plan", "qwen2.5-0.5b", "--task", "infer", "--max-gpus", "2", "--top", "3"]) == 0
    out, _ = capsys.readouterr()
    assert "minimum consumer setup" in out and "recommended data-centre setup" in out
    assert main(["plan", "qwen2.5-0.5b", "--gradient-accumulation", "4"]) == 2
    _, err = capsys.readouterr()
    assert "--global-batch" in err and err.count("\n") == 1


def test_price_overrides_reach_the_plans(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    prices = Path(str(tmp_path)) / "prices.json"
    prices.write_text(json.dumps({"rtx-4090": {"on_demand": 0.01}}), encoding="utf-8")
    rc = main(["plan", "qwen2.5-0.5b", "--max-gpus", "1", "--gpu", "rtx-4090", "--gpu", "h100-sxm",
               "--prices", str(prices), "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    data = json.loads(out)
    assert data["plans"][0]["gpu"] == "rtx-4090"  # a cent an hour beats any H100 plan
    assert {p["gpu"] for p in data["plans"]} <= {"rtx-4090", "h100-sxm"}


def test_plans_name_catalog_gpus(finetune_8b: PlanResult) -> None:
    names = {g.name for g in list_gpus()}
    assert {p.gpu for p in finetune_8b.plans} <= names
