"""Prefill mechanisms of the time model: attention at the 16-bit peak under fp8 weights, each GPU's shard of the
linears under tensor parallelism, tile/wave quantization only above the roofline's ridge, fused engine products, and
NCCL's own cost model for tensor-parallel all-reduces."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from vramplan import get_model
from vramplan.errors import VramplanError
from vramplan.hardware import get_gpu
from vramplan.perf import engine_profile, inference_time
from vramplan.perf.comm import allreduce_seconds, nccl_allreduce_seconds
from vramplan.perf.efficiency import feature_row
from vramplan.perf.gemm import GemmShape, tensor_parallel
from vramplan.perf.timing import ridge_rows, step_time
from vramplan.perf.work import inference_work
from vramplan.workload import Precision, Task, WeightsQuant, Workload


def _prefill(seq: int, quant: WeightsQuant = WeightsQuant.NONE) -> Workload:
    return Workload(task=Task.INFER, precision=Precision.FP16, batch_size=1, seq_len=seq, new_tokens=1,
                    weights_quant=quant)


def test_fp8_weights_leave_attention_at_the_16_bit_peak() -> None:
    spec, h100 = get_model("llama-2-7b").spec, get_gpu("h100-sxm")
    fp16 = feature_row(inference_work(spec, _prefill(2048), "tensorrt-llm"), h100)
    fp8 = feature_row(inference_work(spec, _prefill(2048, WeightsQuant.FP8), "tensorrt-llm"), h100)
    assert fp16 is not None and fp8 is not None
    assert fp8[1] == pytest.approx(fp16[1])  # the same attention FLOPs at the same (16-bit) rate
    assert fp8[0] < 0.75 * fp16[0]  # the matrix products do run at the fp8 peak


def test_tensor_parallel_splits_output_features_of_column_and_input_features_of_row_linears() -> None:
    col, row = GemmShape(128, 12288, 4096), GemmShape(128, 4096, 11008, tp_dim="k")
    c4, r4 = tensor_parallel((col, row), 4)
    assert (c4.m, c4.n, c4.k) == (128, 3072, 4096)
    assert (r4.m, r4.n, r4.k) == (128, 4096, 2752)
    assert tensor_parallel((col,), 1) == (col,)
    odd = tensor_parallel((GemmShape(8, 1000, 64),), 3)[0]
    assert odd.n == math.ceil(1000 / 3)


def test_engines_run_one_product_per_shared_input() -> None:
    spec = get_model("llama-2-7b").spec
    hf = inference_work(spec, _prefill(512), "transformers").gemm_shapes
    trt = inference_work(spec, _prefill(512), "tensorrt-llm").gemm_shapes
    layers = spec.num_layers
    assert GemmShape(512, 3 * 4096, 4096, layers) in trt and GemmShape(512, 2 * 11008, 4096, layers) in trt
    assert GemmShape(512, 4096, 4096, 3 * layers) in hf and GemmShape(512, 11008, 4096, 2 * layers) in hf
    assert sum(g.flops for g in hf) == pytest.approx(sum(g.flops for g in trt))
    # the head multiplies the last position only: a matrix-vector product, not charged tile quantization
    assert any(g.m == 1 and not g.quantized for g in trt)


def test_quantization_is_charged_only_above_the_ridge() -> None:
    a100 = get_gpu("a100-80gb-sxm")
    ridge = ridge_rows(a100, "fp16")
    assert 128 < ridge < 2048  # A100 fp16: ~268 TFLOP/s over ~1.7 TB/s, 2-byte weights
    assert ridge_rows(get_gpu("h100-sxm"), "fp8") > ridge_rows(get_gpu("h100-sxm"), "bf16") / 2
    spec = get_model("gpt-j-6b").spec
    short = inference_work(spec, _prefill(128), "tensorrt-llm")
    long = inference_work(spec, _prefill(2048), "tensorrt-llm")
    # below the ridge the product time is its weight stream plus its unquantized math; above, quantization counts
    trt = engine_profile("tensorrt-llm")
    s, s0 = step_time(short, a100, engine=trt), step_time(dataclasses.replace(short, gemm_shapes=()), a100, engine=trt)
    lg, lg0 = step_time(long, a100, engine=trt), step_time(dataclasses.replace(long, gemm_shapes=()), a100, engine=trt)
    assert s is not None and s0 is not None and s.compute_s == pytest.approx(s0.compute_s)
    assert lg is not None and lg0 is not None and lg.compute_s > 1.01 * lg0.compute_s


def test_nccl_prices_an_allreduce_with_its_own_tuning_model() -> None:
    a100 = get_gpu("a100-80gb-sxm")
    # a tiny message: LL protocol, latency-bound: 6.6 + 2 (n - 1) x 0.6 us on NVLink (NCCL 2.18 tuning.cc)
    assert nccl_allreduce_seconds(8, 4, a100) == pytest.approx((6.6 + 6 * 0.6) * 1e-6, rel=1e-3)
    # a large one: Simple at the ring's 12 x 20 GB/s bus bandwidth, algorithm bandwidth x n / (2 (n - 1))
    big = 64 << 20
    assert nccl_allreduce_seconds(big, 4, a100) == pytest.approx((8.4 + 6 * 3.4) * 1e-6 + big / (240e9 * 4 / 6))
    # slower than the link's peak with a custom kernel's latency
    custom = allreduce_seconds(big, 4, a100, 6e-6)
    nccl = nccl_allreduce_seconds(big, 4, a100)
    assert custom is not None and nccl is not None and nccl > custom
    sizes = [2**i for i in range(4, 28)]
    times = [nccl_allreduce_seconds(s, 8, get_gpu("h100-sxm")) or 0.0 for s in sizes]
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert nccl_allreduce_seconds(big, 1, a100) == 0.0


def test_a_build_without_the_custom_allreduce_pays_nccl_s_price() -> None:
    spec, a100 = get_model("llama-2-70b").spec, get_gpu("a100-80gb-sxm")
    w = _prefill(2048)
    custom = inference_time(spec, w, a100, split=4, engine="tensorrt-llm")
    nccl = inference_time(spec, w, a100, split=4, engine="tensorrt-llm", allreduce="nccl")
    assert custom.prefill_s is not None and nccl.prefill_s is not None
    assert nccl.prefill_s > custom.prefill_s
    single = inference_time(spec, w, a100, split=1, engine="tensorrt-llm", allreduce="nccl")
    assert single.prefill_s == inference_time(spec, w, a100, split=1, engine="tensorrt-llm").prefill_s
    with pytest.raises(VramplanError, match="allreduce"):
        inference_time(spec, w, a100, split=4, engine="tensorrt-llm", allreduce="mpi")


def test_every_engine_says_how_it_all_reduces_and_why() -> None:
    from vramplan.perf import ENGINES
    from vramplan.perf.efficiency import _mfu_document

    engines = _mfu_document()["engines"]
    for name in ENGINES:
        assert engine_profile(name).allreduce in ("nccl", "custom"), name
        assert engines[name]["allreduce_source"], name
    assert engine_profile("gpt-fast").allreduce == "nccl"  # funcol.all_reduce on the NCCL process group


def test_a_build_without_the_fused_mlp_runs_gate_and_up_apart() -> None:
    spec, h100 = get_model("llama-2-7b").spec, get_gpu("h100-sxm")
    w = _prefill(2048, WeightsQuant.FP8)
    fused = inference_work(spec, w, "tensorrt-llm")
    apart = inference_work(spec, w, "tensorrt-llm", fused_mlp=False)
    layers = spec.num_layers
    assert GemmShape(2048, 2 * 11008, 4096, layers) in fused.gemm_shapes
    assert GemmShape(2048, 11008, 4096, 2 * layers) in apart.gemm_shapes
    assert apart.quant_kernels == fused.quant_kernels + 1  # the gate's and the up projection's inputs apart
    a = inference_time(spec, w, h100, engine="tensorrt-llm", fused_mlp=False).prefill_s
    f = inference_time(spec, w, h100, engine="tensorrt-llm").prefill_s
    assert a is not None and f is not None and a > f


def test_a_message_past_the_custom_kernels_buffer_goes_through_nccl() -> None:
    from vramplan.perf.timing import tp_allreduce_s

    a100, vllm = get_gpu("a100-80gb-sxm"), engine_profile("vllm")
    assert vllm.custom_allreduce_max_bytes == 8 << 20  # custom_all_reduce.py max_size
    small, big = 1 << 20, 32 << 20
    assert tp_allreduce_s(small, 4, a100, vllm) == allreduce_seconds(small, 4, a100, vllm.allreduce_latency_s)
    assert tp_allreduce_s(big, 4, a100, vllm) == nccl_allreduce_seconds(big, 4, a100)


def test_a_host_enqueued_step_takes_at_least_the_hosts_enqueue_time() -> None:
    from vramplan.perf.timing import host_enqueue_s

    spec, h100, a100 = get_model("gpt-j-6b").spec, get_gpu("h100-sxm"), get_gpu("a100-80gb-sxm")
    trt = engine_profile("tensorrt-llm")
    assert host_enqueue_s(spec, trt) == 0.0  # graphs replayed (the default): no host floor
    host = host_enqueue_s(spec, dataclasses.replace(trt, host_enqueued=True))
    assert host == pytest.approx(spec.num_layers * trt.host_enqueue_s_per_layer) and host > 0
    short = dataclasses.replace(_prefill(128, WeightsQuant.FP8), new_tokens=128)
    graphs = inference_time(spec, short, h100, engine="tensorrt-llm")
    enq = inference_time(spec, short, h100, engine="tensorrt-llm", host_enqueued=True)
    assert graphs.prefill_s is not None and enq.prefill_s is not None
    assert graphs.decode_s_per_token is not None and enq.decode_s_per_token is not None
    # a 128-token fp8 prompt on an H100 is shorter on the device than on the host: the host sets it
    assert graphs.prefill_s < host and enq.prefill_s == pytest.approx(host)
    assert enq.decode_s_per_token == pytest.approx(host + trt.step_s)
    assert any("no CUDA graphs" in a for a in enq.assumptions)
    # a long prompt on an A100 keeps the GPU busier than the host: the floor does not move it
    long = _prefill(2048)
    assert inference_time(spec, long, a100, engine="tensorrt-llm", host_enqueued=True).prefill_s == \
        inference_time(spec, long, a100, engine="tensorrt-llm").prefill_s
    # other engines carry no enqueue cost to floor with
    vllm = inference_time(spec, short, h100, engine="vllm", host_enqueued=True).prefill_s
    assert vllm == inference_time(spec, short, h100, engine="vllm").prefill_s


def test_the_host_enqueue_cost_is_the_published_decode_rate_less_the_step_work() -> None:
    """The coefficient is sized on the one published TensorRT-LLM v0.5 decode rate the data file marks in-sample:
    (1 / rate - step_s) / layers. Re-derive it from the row, so neither side can drift alone."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parent / "data" / "published_throughput.json").read_text(encoding="utf-8"))
    sized = [r for r in doc["rows"] if r.get("in_sample")]
    assert [r["id"] for r in sized] == ["trtllm-gpt-j-6b-tp1-decode-bs1-h100-fp8"]
    row, trt = sized[0], engine_profile("tensorrt-llm")
    layers = get_model(row["model"]).spec.num_layers
    assert trt.host_enqueue_s_per_layer == pytest.approx((1 / row["value"] - trt.step_s) / layers, rel=1e-3)
    assert row["layout"]["host_enqueued"] is True
    # the same session enqueues the prompt too: every v0.5 first-token row says so
    assert all(r["layout"].get("host_enqueued") for r in doc["rows"] if r.get("engine") == "tensorrt-llm")
