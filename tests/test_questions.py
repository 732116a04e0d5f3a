"""The questions people ask, answered by the planner (never by a hand-written table).

Each test pins properties of the planner's answer and re-derives the deciding number from the estimator
(the weights of a 13B model in 16-bit, the leanest full fine-tuning configuration, ...), so the answers
follow the estimator when it changes rather than copied numbers.
"""

from __future__ import annotations

import pytest

from vramplan import MemoryKind, get_model
from vramplan.estimator import estimate
from vramplan.hardware import GPU, get_gpu, list_gpus
from vramplan.planner import PlanRequest, PlanResult, PlanTask, plan
from vramplan.units import GiB
from vramplan.workload import Method, Optimizer, Precision, Task, Workload


def ask(model: str, req: PlanRequest, gpus: list[GPU] | None = None) -> PlanResult:
    return plan(get_model(model).spec, req, name=model, gpus=gpus)


def weights_16bit(model: str) -> int:
    """Bytes of the model's weights in bf16, from the estimator's breakdown."""
    est = estimate(get_model(model).spec, Workload(task=Task.INFER, batch_size=1, seq_len=16, new_tokens=0))
    return est.breakdown[MemoryKind.WEIGHTS]


# ----------------------------------------------------------------------------------------- 7B on 24 GB


@pytest.mark.parametrize("model", ["llama-2-7b", "mistral-7b"])
def test_can_i_finetune_a_7b_model_on_a_24gb_card(model: str) -> None:
    cards = [g for g in list_gpus() if g.memory_bytes == 24 * GiB]
    assert {"rtx-3090", "rtx-4090"} <= {g.name for g in cards}
    r = ask(model, PlanRequest(task=PlanTask.FINETUNE, max_gpus=1, top=500), cards)
    methods = {p.method for p in r.plans}
    # LoRA and QLoRA: yes
    assert {"lora", "qlora"} <= methods
    # full fine-tuning: no, and the estimator says why: even its leanest configuration (16-bit weights,
    # Adafactor, checkpointing, one sequence) needs more than the card has
    assert "full" not in methods
    spec = get_model(model).spec
    leanest = Workload(method=Method.FULL, precision=Precision.BF16, optimizer=Optimizer.ADAFACTOR,
                       gradient_checkpointing=True, batch_size=1, seq_len=r.seq_len, gradient_accumulation=2)
    assert estimate(spec, leanest).total_bytes > max(g.usable_memory_bytes for g in cards)
    # what it takes: the recommended consumer setup is one 24 GB card with the best method that fits
    rec = r.consumer
    assert rec is not None and rec.gpu_count == 1 and rec.method in ("lora", "qlora")
    assert rec.total_bytes <= rec.usable_memory_bytes == get_gpu(rec.gpu).usable_memory_bytes
    assert rec.method == "lora"  # 16-bit LoRA fits, so the planner does not fall back to 4-bit


# ----------------------------------------------------------------------------------------- 13B LoRA on a 4090


def test_13b_lora_on_one_rtx_4090() -> None:
    gpu = get_gpu("rtx-4090")
    r = ask("llama-2-13b", PlanRequest(task=PlanTask.FINETUNE, methods=(Method.LORA, Method.QLORA), max_gpus=1),
            [gpu])
    # 16-bit LoRA: no, the frozen 16-bit weights alone are larger than the card
    assert weights_16bit("llama-2-13b") > gpu.usable_memory_bytes
    assert all(p.method != "lora" for p in r.plans)
    # QLoRA: yes
    assert any(p.method == "qlora" for p in r.plans)
    rec = r.consumer
    assert rec is not None and rec.method == "qlora" and rec.gpu == "rtx-4090" and rec.gpu_count == 1
    assert rec.total_bytes <= gpu.usable_memory_bytes
    assert rec.time_hours is not None and rec.time_hours > 0


# ----------------------------------------------------------------------------------------- 30B on a consumer GPU


@pytest.mark.parametrize("model", ["llama-30b", "qwen2.5-32b"])
def test_30b_on_a_consumer_gpu(model: str) -> None:
    consumer = list_gpus(cls="consumer")
    biggest = max(g.usable_memory_bytes for g in consumer)
    # no 16-bit method can run: the weights alone exceed every consumer card
    assert weights_16bit(model) > biggest
    short = ask(model, PlanRequest(task=PlanTask.FINETUNE, seq_len=256, gpu_class="consumer", max_gpus=1, top=500,
                                   savers=()))
    # only with 4-bit and checkpointing at small context (memory savers aside: offloading replaces checkpointing) ...
    assert short.plans
    assert {(p.method, p.gradient_checkpointing) for p in short.plans} == {("qlora", True)}
    assert short.consumer is not None and short.consumer.method == "qlora"
    savers = ask(model, PlanRequest(task=PlanTask.FINETUNE, seq_len=256, gpu_class="consumer", max_gpus=1, top=500))
    assert {p.method for p in savers.plans} == {"qlora"}
    assert all(p.gradient_checkpointing or p.saver for p in savers.plans)
    # ... and not at all at long context, with the numbers
    long = ask(model, PlanRequest(task=PlanTask.FINETUNE, seq_len=8192, gpu_class="consumer", max_gpus=1,
                                  savers=()))
    assert not long.plans and long.consumer is None
    reason = long.consumer_reason
    assert reason is not None and reason.startswith("not feasible on consumer GPUs")
    need = float(reason.split("needs ")[1].split(" GiB")[0])
    assert need * GiB > biggest and "qlora" in reason and f"{biggest / GiB:.1f} GiB" in reason


# ----------------------------------------------------------------------------------------- serving Falcon-40B


def test_what_does_serving_falcon_40b_need() -> None:
    r = ask("falcon-40b", PlanRequest(task=PlanTask.INFER, top=1000))
    w16 = weights_16bit("falcon-40b")
    sixteen = [p for p in r.plans if p.weights_quant == "none"]
    assert sixteen
    for p in sixteen:
        gpu = get_gpu(p.gpu)
        # 16-bit serving: several GPUs sharing the weights, or one card larger than 80 GB
        assert (p.gpu_count > 1 and p.layout == "tp") or (gpu.usable_memory_bytes > w16 > 80 * 10**9)
        assert p.total_bytes <= gpu.usable_memory_bytes
    # no consumer card serves it in 16-bit by itself
    assert not [p for p in sixteen if p.gpu_class == "consumer" and p.layout != "tp"]
    # the recommended data-centre setup serves the 16-bit weights and fits
    rec = r.datacenter
    assert rec is not None and rec.weights_quant == "none" and rec.fits
    assert rec.gpu_count > 1 or get_gpu(rec.gpu).usable_memory_bytes > 80 * GiB
    if not any(p.layout == "tp" for p in r.plans):  # tensor parallelism not (yet) supported: single big cards
        assert all(get_gpu(p.gpu).memory_bytes > 80 * GiB for p in sixteen)


# ----------------------------------------------------------------------------------------- 65B+ inference


@pytest.mark.parametrize("model", ["llama-65b", "llama-2-70b"])
def test_inference_for_65b_and_more(model: str) -> None:
    w16 = weights_16bit(model)
    # one consumer GPU: not even in 4-bit, with the numbers
    one = ask(model, PlanRequest(task=PlanTask.INFER, gpu_class="consumer", max_gpus=1))
    assert not one.plans and one.consumer is None
    assert one.consumer_reason is not None and "GiB" in one.consumer_reason and "nf4" in one.consumer_reason
    r = ask(model, PlanRequest(task=PlanTask.INFER, top=1000))
    for p in r.plans:
        if p.weights_quant == "none" and p.layout != "tp":
            # one GPU (or each replica) holds all 16-bit weights: only cards beyond 80 GB
            assert get_gpu(p.gpu).usable_memory_bytes > w16 > 120 * 10**9
    rec = r.datacenter
    assert rec is not None and rec.weights_quant == "none" and rec.fits
    assert rec.gpu_count > 1 or get_gpu(rec.gpu).usable_memory_bytes > w16
    if r.consumer is not None:  # several consumer cards with tensor parallelism
        assert r.consumer.gpu_count > 1 and r.consumer.layout == "tp" and r.consumer.fits
