"""GEMM tile and wave quantization (vramplan.perf.gemm) and the shapes a training step multiplies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import get_model
from vramplan.hardware import get_gpu
from vramplan.perf import step_time, training_time, training_work
from vramplan.perf.efficiency import load_throughput_model
from vramplan.perf.gemm import (
    GemmShape,
    collective_ctas,
    gpu_tiling,
    overlap_rate,
    quantization_efficiency,
    shape_factor,
)
from vramplan.perf.work import layer_matmul_weights
from vramplan.workload import Method, Workload

H200_SMS = 132


def test_whole_waves_are_fully_efficient_and_one_tile_past_drops() -> None:
    # 132 tiles of 128 x 256 fill the H200's 132 SMs in exactly one wave
    full = quantization_efficiency(128, 256 * H200_SMS, 4096, H200_SMS)
    assert full == pytest.approx(1.0)
    assert quantization_efficiency(128 * 4, 256 * H200_SMS, 4096, H200_SMS) == pytest.approx(1.0)  # 4 waves
    # one more tile column: 133 tiles need a second wave; the best tiling (128 x 128: 266 tiles in 3 waves)
    # still leaves a third of the SM time idle
    past = quantization_efficiency(128, 256 * (H200_SMS + 1), 4096, H200_SMS)
    assert past == pytest.approx(266 / 396)
    assert past < 0.7


def test_partial_tiles_waste_their_padding() -> None:
    exact = quantization_efficiency(128 * 33, 256 * 32, 4096, H200_SMS)
    padded = quantization_efficiency(128 * 33 + 1, 256 * 32, 4096, H200_SMS)
    assert padded < exact


def test_a_grid_under_one_wave_is_split_along_k() -> None:
    # the weight gradient of an 896 x 896 projection (K = tokens): 49 tiles of 128 x 128 on 132 SMs
    unsplit = 49 / H200_SMS
    assert quantization_efficiency(896, 896, 512, H200_SMS) == pytest.approx(unsplit)  # K too short to split
    assert quantization_efficiency(896, 896, 8192, H200_SMS) > unsplit


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 20000), n=st.integers(1, 20000), k=st.integers(1, 20000), sms=st.sampled_from([28, 108, 132]))
def test_efficiency_is_a_fraction(m: int, n: int, k: int, sms: int) -> None:
    assert 0 < quantization_efficiency(m, n, k, sms) <= 1


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 6000), extra=st.integers(1, 3000), n=st.sampled_from([896, 2048, 4096, 14336]),
       k=st.sampled_from([896, 2048, 4096]))
def test_more_rows_never_finish_sooner(m: int, extra: int, n: int, k: int) -> None:
    def runtime(rows: int) -> float:
        return rows * n * k / quantization_efficiency(rows, n, k, H200_SMS)

    assert runtime(m + extra) >= runtime(m) * (1 - 1e-12)


def test_the_ceiling_shape_runs_at_the_ceiling() -> None:
    # the H200's pinned fraction was measured on 8192^3: that product keeps exactly the measured fraction
    assert shape_factor([GemmShape(8192, 8192, 8192)], get_gpu("h200")) == pytest.approx(1.0)
    # a published best-shape ceiling (A100 MAMF) is reached by a shape without quantization loss
    assert shape_factor([GemmShape(128 * 54, 256 * 16, 4096)], get_gpu("a100-80gb-sxm")) == pytest.approx(1.0)
    # no SM count (AMD): the ceiling applies as it is
    assert gpu_tiling(get_gpu("mi300x")) is None
    assert shape_factor([GemmShape(100, 100, 100)], get_gpu("mi300x")) == 1.0


def test_the_shapes_add_up_to_the_counted_gemm_flops() -> None:
    spec = get_model("llama-3.2-1b").spec
    for w in (Workload(batch_size=2, seq_len=1024), Workload(batch_size=2, seq_len=1024, gradient_checkpointing=True),
              Workload(batch_size=2, seq_len=1024, method=Method.LORA)):
        work = training_work(spec, w)
        adapters = work.gemm_flops - sum(s.flops for s in work.gemm_shapes)
        if w.method is Method.FULL:
            assert adapters == pytest.approx(0, abs=1e-6 * work.gemm_flops)
        else:  # the LoRA adapters' own products are not in the list (A and B: a few per mille)
            assert 0 <= adapters < 0.01 * work.gemm_flops


def test_weight_gradients_multiply_over_the_tokens_and_frozen_weights_have_none() -> None:
    spec = get_model("llama-3.2-1b").spec
    tokens = 2 * 512
    full = training_work(spec, Workload(batch_size=2, seq_len=512)).gemm_shapes
    lora = training_work(spec, Workload(batch_size=2, seq_len=512, method=Method.LORA)).gemm_shapes
    h, inter, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    assert GemmShape(inter, h, tokens, 2 * layers) in full  # gate and up: dW[out, in] = dY^T X, K = tokens
    # gate and up forward with down's input gradient; down forward with gate's and up's input gradients
    assert GemmShape(tokens, inter, h, 3 * layers) in full
    assert GemmShape(tokens, h, inter, 3 * layers) in full
    assert not [s for s in lora if s.k == tokens]


def test_a_checkpointed_step_costs_a_recomputed_forward() -> None:
    spec = get_model("llama-3.2-1b").spec
    gpu = get_gpu("h100-sxm")
    w = Workload(batch_size=4, seq_len=2048)
    plain, ckpt = training_work(spec, w), training_work(spec, w.with_(gradient_checkpointing=True))
    n_layers, _head = layer_matmul_weights(spec)
    tokens = 4 * 2048
    # executed: one more forward of every decoder layer (2 x layer weights per token), the head not recomputed
    assert ckpt.gemm_flops - plain.gemm_flops == pytest.approx(2 * n_layers * tokens)
    assert ckpt.model_flops == plain.model_flops  # MFU's numerator does not count recomputation
    a, b = step_time(plain, gpu), step_time(ckpt, gpu)
    assert a is not None and b is not None
    # the extra compute is that forward's matrix products at no better than the ceiling, plus its attention
    peak = gpu.peak_tflops("bf16")
    assert peak is not None
    ceiling = load_throughput_model().gemm_efficiency
    forward_gemm_s = 2 * n_layers * tokens / (peak * 1e12 * ceiling)
    extra = b.compute_s - a.compute_s
    assert forward_gemm_s <= extra <= 1.5 * forward_gemm_s


def test_a_collective_holding_sms_slows_the_overlapped_gemms_with_a_tail() -> None:
    h100 = get_gpu("h100-sxm")
    # a grid that fills the 132 SMs exactly: with 24 held by NCCL, 108 SMs need more waves (the tail effect
    # an FSDP all-gather causes), so the products run slower than the 108/132 SM share alone
    exact = [GemmShape(128, 256 * 132, 4096)]
    share = (132 - 24) / 132
    assert overlap_rate(exact, h100, 24) < share
    # many waves: the loss is about the SM share
    big = [GemmShape(8192 * 4, 8192, 8192)]
    assert overlap_rate(big, h100, 24) == pytest.approx(share, rel=0.03)
    assert overlap_rate(big, h100, 0) == 1.0
    # NCCL's channels over the link (data/interconnects.json): 24 on NVSwitch H100 nodes, 2 over PCIe
    assert collective_ctas("nvlink-4") == 24 and collective_ctas("pcie-4") == 2 and collective_ctas(None) == 0


def test_overlapped_fsdp_traffic_costs_contention_and_a_single_gpu_none() -> None:
    spec = get_model("llama-3.1-8b").spec
    gpu = get_gpu("a100-80gb-sxm")
    w = Workload(batch_size=2, seq_len=2048)
    one = training_time(spec, w, gpu, tokens=4096)
    assert one.step is not None and one.step.contention_s == 0.0
    params = 8.03e9
    light = training_time(spec, w, gpu, tokens=8 * 4096, gpus=8, comm_bytes_per_step=0.5 * params, shard=8)
    heavy = training_time(spec, w, gpu, tokens=8 * 4096, gpus=8, comm_bytes_per_step=8 * params, shard=8)
    assert light.step is not None and heavy.step is not None
    assert 0 < light.step.contention_s < heavy.step.contention_s
    # never more than the overlapped traffic itself
    assert heavy.step.contention_s < heavy.step.comm_total_s
    assert "contention_s" in heavy.step.to_dict()
