"""Time and cost (vramplan.perf): FLOP formulas, the fitted step-time model against measured H200 step
times, roofline bounds for inference, prices."""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import pytest

from vramplan import get_model
from vramplan._engine.tape import Tape
from vramplan.blocks import _B, LayerPlan
from vramplan.calibration import read_rows, workload_of_row
from vramplan.estimator import numerics, runs_as
from vramplan.hardware import get_gpu, list_gpus
from vramplan.hfconfig import load_config_file
from vramplan.params import count_params
from vramplan.perf import (
    MEASURED_GEMM_EFFICIENCY,
    ThroughputModel,
    attention_kernel,
    cost_of,
    fit_throughput_model,
    inference_time,
    inference_work,
    layer_matmul_weights,
    link_bandwidth_bytes_per_s,
    load_throughput_model,
    refit,
    training_time,
    training_work,
)
from vramplan.workload import Attention, Method, Precision, Task, WeightsQuant, Workload

from .conftest import DATA

CSVS = [DATA / "calibration" / "measured.csv", DATA / "h200-grid" / "measured.csv"]


def _rows(task: str) -> list[tuple[str, Path, dict[str, str], Workload]]:
    out = []
    for csv in CSVS:
        for row in read_rows(csv):
            w = workload_of_row(row)
            if w is not None and w.task.value == task:
                out.append((row["name"], csv.parent / "configs" / f"{row['model']}.json", row, w))
    return out


TRAIN_ROWS = _rows("train")
INFER_ROWS = _rows("infer")


# ----------------------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize(("name", "config", "row", "w"), TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_calibration_step_times_within_27_percent(name: str, config: Path, row: dict[str, str], w: Workload) -> None:
    """Every measured H200 step time within ±27%, using the catalog's H200 figures. (The bar was 25% while the
    logits traffic was a free coefficient fitted at 16.6 passes; counted kernel by kernel it costs 2 points.)"""
    spec = load_config_file(config)
    tt = training_time(spec, w, get_gpu("h200"), tokens=w.batch_size * w.seq_len * w.gradient_accumulation)
    assert tt.steps == 1 and tt.step is not None
    measured = float(row["step_s"])
    assert tt.step.total_s == pytest.approx(measured, rel=0.27), f"{name}: {tt.step.total_s:.4f} s vs {measured} s"
    assert any("fitted on" in a for a in tt.assumptions)  # the method is stated in the result


def test_enough_calibration_rows() -> None:
    assert len(TRAIN_ROWS) >= 45


def test_stored_fit_reproduces_from_the_measurements() -> None:
    """data/mfu.json is what ``python -m vramplan.perf`` computes from the CSVs it names (provenance)."""
    doc = json.loads((resources.files("vramplan") / "data" / "mfu.json").read_text(encoding="utf-8"))["calibration"]
    root = DATA.parent.parent
    paths = [root / p for p in doc["fit"]["files"]]
    fresh = refit(paths)
    if list(fresh["fit"]["files"].values()) != list(doc["fit"]["files"].values()):
        pytest.skip("the calibration CSVs changed since data/mfu.json was fitted: rerun "
                    "`python -m vramplan.perf tests/data/calibration/measured.csv tests/data/h200-grid/measured.csv`")
    for key, value in doc["coefficients"].items():
        assert fresh["coefficients"][key] == pytest.approx(value, rel=1e-6), key
    assert fresh["fit"]["max_abs_rel_error"] == pytest.approx(doc["fit"]["max_abs_rel_error"], abs=1e-4)


def test_throughput_model_is_physical() -> None:
    m = load_throughput_model()
    named = m.named()
    assert named["gemm_efficiency"] == pytest.approx(MEASURED_GEMM_EFFICIENCY)  # pinned to the measured ceiling
    assert 0 < named["attention_efficiency"] < named["gemm_efficiency"] <= 1
    assert all(v >= 0 for v in m.coefficients)
    assert 0 < m.decode_bandwidth_efficiency <= 1
    assert named["launch_s_per_layer_pass"] < 5e-3  # host launch cost of one layer: sub-millisecond scale


def test_refit_recovers_known_coefficients() -> None:
    truth = (1.25, 4.0, 0.0, 2.0)
    feats = [(1.0 + i % 3, 0.1 * i, 0.5, 1.0 / (1 + i)) for i in range(20)]
    samples = [(f, sum(a * b for a, b in zip(f, truth, strict=True))) for f in feats]
    for minimax in (False, True):
        got = fit_throughput_model(samples, fixed={0: 1.25}, minimax=minimax)
        assert got == pytest.approx(truth, abs=1e-6)


# ----------------------------------------------------------------------------------------- FLOPs


def test_full_finetuning_matches_nanogpt_estimate_mfu() -> None:
    """nanoGPT's estimate_mfu: 6N + 12·L·H·Q·T per token (non-causal attention, as the eager kernel runs it)."""
    spec = get_model("gpt2").spec
    w = Workload(batch_size=4, seq_len=1024, attention=Attention.EAGER)
    work = training_work(spec, w)
    n = count_params(spec).total - spec.max_learned_positions * spec.hidden_size  # get_num_params(): minus wpe
    L, H, Q, T = spec.num_layers, spec.num_heads, spec.head_dim, w.seq_len
    expected = 6 * n + 12 * L * H * Q * T
    per_token = work.model_flops / work.tokens
    # nanoGPT's N also holds biases and LayerNorm weights, which do no matmul FLOPs: within 0.5%
    assert per_token == pytest.approx(expected, rel=5e-3)
    assert work.executed_flops == pytest.approx(work.model_flops)


def test_causal_kernels_halve_attention_and_checkpointing_adds_a_forward() -> None:
    spec = get_model("llama-3.2-1b").spec
    n_layers, n_head = layer_matmul_weights(spec)
    w = Workload(precision=Precision.BF16, batch_size=2, seq_len=2048)
    work = training_work(spec, w)
    attn_fwd = 4 * spec.q_dim * spec.num_layers * (w.seq_len + 1) / 2  # flash with is_causal: half the square
    assert work.model_flops / work.tokens == pytest.approx(6 * (n_layers + n_head) + 3 * attn_fwd)
    ck = training_work(spec, w.with_(gradient_checkpointing=True))
    assert ck.model_flops == pytest.approx(work.model_flops)
    assert (ck.executed_flops - work.executed_flops) / work.tokens == pytest.approx(2 * n_layers + attn_fwd)


def test_frozen_base_skips_weight_gradients() -> None:
    spec = get_model("llama-3.1-8b").spec
    base = Workload(batch_size=1, seq_len=2048)
    full = training_work(spec, base)
    lora = training_work(spec, base.with_(method=Method.LORA))
    qlora = training_work(spec, base.with_(method=Method.QLORA))
    freeze = training_work(spec, base.with_(method=Method.FREEZE, trainable_layers=8))
    n = sum(layer_matmul_weights(spec))
    # full - lora = the 2N of weight gradients (less the adapters' own 6 x r(in+out) FLOPs)
    assert (full.model_flops - lora.model_flops) / full.tokens == pytest.approx(2 * n, rel=1e-2)
    assert lora.model_flops == pytest.approx(qlora.model_flops)
    assert qlora.dequant_bytes > 0 and lora.dequant_bytes == 0
    assert freeze.model_flops < full.model_flops
    assert freeze.layer_passes == spec.num_layers + 2 * 8  # backward layers launch twice a forward's kernels


def test_moe_counts_only_routed_experts() -> None:
    spec = get_model("mixtral-8x7b").spec
    layers, _ = layer_matmul_weights(spec)
    total_linear = sum(layer.linear for layer in count_params(spec).layers)
    assert layers < total_linear * 0.4  # 2 of 8 experts: ~13B active of ~47B


def test_attention_kernel_matches_the_estimator() -> None:
    """perf mirrors blocks._B.kernel_for; this keeps them equal for every catalog family."""
    models = ["gpt2", "llama-3.2-1b", "falcon-7b", "falcon-40b", "gemma-2-2b", "gpt-j-6b", "bloom-560m",
              "mistral-7b", "qwen2.5-0.5b", "phi-3-mini", "opt-1.3b", "mixtral-8x7b"]
    for name in models:
        spec = get_model(name).spec
        for w in (Workload(), Workload(precision=Precision.FP32), Workload(precision=Precision.AMP_BF16),
                  Workload(attention=Attention.EAGER), Workload(task=Task.INFER, weights_quant=WeightsQuant.NF4),
                  Workload(method=Method.QLORA)):
            for has_mask in (False, True):
                plan = LayerPlan(trainable=True, input_rg=True, lora_targets=frozenset(), lora_rank=16,
                                 quant=w.base_quant, attention=runs_as(spec, w).attention,
                                 release=w.transformers_release)
                ref = _B(Tape(w.is_train), spec, numerics(w), 1, 16, plan).kernel_for(has_mask)
                assert attention_kernel(spec, w, has_mask=has_mask) is ref, (name, w, has_mask)


# ----------------------------------------------------------------------------------------- inference


def test_decode_roofline_is_a_lower_bound_of_measured_decode() -> None:
    """No engine decodes faster than reading the weights and the KV cache once per step."""
    h200 = get_gpu("h200")
    for name, config, row, w in INFER_ROWS:
        it = inference_time(load_config_file(config), w, h200)
        assert it.decode_s_per_token is not None
        roofline = it.decode_s_per_token - it.decode_overhead_s - it.decode_allreduce_s
        assert roofline <= float(row["decode_s_per_token"]), name
        assert it.decode_overhead_s > 0  # generate() in eager PyTorch pays the host launch cost per layer


def test_prefill_against_first_call_measurements() -> None:
    """The calibration prefill times are the first (cold) forward, with one-time CUDA/cuBLAS setup: the
    model should not exceed them by much, and should be close for most rows."""
    h200 = get_gpu("h200")
    ratios = []
    for name, config, row, w in INFER_ROWS:
        it = inference_time(load_config_file(config), w, h200)
        assert it.prefill_s is not None
        ratio = float(row["prefill_s"]) / it.prefill_s
        assert ratio >= 0.75, f"{name}: predicted {it.prefill_s:.3f} s, measured {row['prefill_s']} s"
        ratios.append(ratio)
    assert statistics.median(ratios) <= 2.0


def test_decode_is_memory_bound_at_batch_one_and_batching_raises_throughput() -> None:
    spec = get_model("llama-3.1-8b").spec
    gpu = get_gpu("h100-sxm")
    one = inference_time(spec, Workload(task=Task.INFER, batch_size=1, seq_len=512, new_tokens=128), gpu,
                         engine="vllm")
    many = inference_time(spec, Workload(task=Task.INFER, batch_size=32, seq_len=512, new_tokens=128), gpu,
                          engine="vllm")
    hf = inference_time(spec, Workload(task=Task.INFER, batch_size=1, seq_len=512, new_tokens=128), gpu)
    assert hf.decode_tokens_per_s is not None and one.decode_tokens_per_s is not None
    assert hf.decode_tokens_per_s < one.decode_tokens_per_s / 2  # eager generate() is launch-bound
    assert one.decode_bound == "memory"
    assert one.decode_tokens_per_s is not None and many.decode_tokens_per_s is not None
    assert many.decode_tokens_per_s > 10 * one.decode_tokens_per_s
    # 16 GB of bf16 weights over 3.35 TB/s plus vLLM's per-layer kernel floor: 100-200 tokens per second
    assert 100 < one.decode_tokens_per_s < 200
    assert inference_work(spec, Workload(task=Task.INFER)).optimizer_bytes == 0


# ----------------------------------------------------------------------------------------- time and money


def test_cost_is_gpu_hours_times_price_and_missing_prices_stay_missing() -> None:
    h100 = get_gpu("h100-sxm")
    assert h100.price.on_demand is not None and h100.price.reserved is not None
    c = cost_of(h100, 10.0)
    assert c.on_demand_usd == pytest.approx(10 * h100.price.on_demand)
    assert c.reserved_usd == pytest.approx(10 * h100.price.reserved)
    unpriced = next(g for g in list_gpus() if g.price.on_demand is None)
    u = cost_of(unpriced, 10.0)
    assert u.on_demand_usd is None and u.reason and "no on-demand price" in u.reason


def test_training_time_scales_with_tokens_and_gpus() -> None:
    spec = get_model("llama-3.2-1b").spec
    gpu = get_gpu("h100-sxm")
    w = Workload(batch_size=4, seq_len=2048, gradient_accumulation=4)
    one = training_time(spec, w, gpu, tokens=10**9)
    two = training_time(spec, w, gpu, tokens=2 * 10**9)
    assert one.time_s is not None and two.time_s is not None
    assert two.time_s == pytest.approx(2 * one.time_s, rel=1e-3)
    eight = training_time(spec, w, gpu, tokens=10**9, gpus=8)
    assert eight.time_s is not None and eight.step is not None
    assert one.time_s / 8 < eight.time_s < one.time_s / 4  # faster, but the all-reduce costs something
    assert eight.step.comm_s > 0
    assert one.cost is not None and one.cost.on_demand_usd is not None
    assert one.mfu is not None and 0.1 < one.mfu < MEASURED_GEMM_EFFICIENCY


def test_missing_throughput_figure_gives_no_time_with_reason() -> None:
    spec = get_model("llama-3.2-1b").spec
    v100 = get_gpu("v100-32gb")
    assert v100.peak_tflops("bf16") is None
    tt = training_time(spec, Workload(precision=Precision.BF16), v100, tokens=10**6)
    assert tt.time_s is None and tt.reason and "bf16" in tt.reason
    ok = training_time(spec, Workload(precision=Precision.AMP_FP16), v100, tokens=10**6)
    assert ok.time_s is not None


def test_links() -> None:
    bridge = get_gpu("rtx-3090")
    assert "2-way" in bridge.interconnect.kind
    two = link_bandwidth_bytes_per_s(bridge, 2)
    four = link_bandwidth_bytes_per_s(bridge, 4)
    assert two is not None and four is not None and four < two  # beyond a pair, PCIe 4.0
    assert four == pytest.approx(31.5e9)
    h100 = get_gpu("h100-sxm")
    assert link_bandwidth_bytes_per_s(h100, 8) == pytest.approx(h100.interconnect.bandwidth_bytes_per_s / 2)


def test_model_round_trips_through_named_coefficients() -> None:
    m = load_throughput_model()
    again = ThroughputModel.from_named(m.named(), m.decode_bandwidth_efficiency)
    assert again.coefficients == pytest.approx(m.coefficients)
