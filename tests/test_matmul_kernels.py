"""Every weight format says how its matrix products run (issue 13): a separate dequantization costs a pass over
the weights in the time model, a fused or fp8 kernel does not."""

from __future__ import annotations

import pytest

from vramplan import get_model
from vramplan.perf.work import MATMUL_KERNELS, inference_work, matmul_path
from vramplan.workload import Task, WeightsQuant, Workload

PATHS = {"none", "dequantize", "fused", "load", "fp8"}


def test_every_weight_format_states_its_kernel_with_a_source() -> None:
    assert set(MATMUL_KERNELS) == set(WeightsQuant)
    for q, k in MATMUL_KERNELS.items():
        assert k.transformers in PATHS and k.engines in PATHS, q
        assert k.source.strip(), q


@pytest.mark.parametrize("q", list(WeightsQuant))
@pytest.mark.parametrize("engine", ["transformers", "vllm", "llama.cpp"])
def test_only_a_separate_dequantization_costs_traffic(q: WeightsQuant, engine: str) -> None:
    spec = get_model("llama-3.1-8b").spec
    work = inference_work(spec, Workload(task=Task.INFER, weights_quant=q, seq_len=1024), engine)
    assert (work.dequant_bytes > 0) == (matmul_path(q, engine) == "dequantize")
    assert (work.dtype == "fp8") == (matmul_path(q, engine) == "fp8")


def test_engines_fuse_what_transformers_dequantizes() -> None:
    assert matmul_path(WeightsQuant.HQQ_INT4) == "dequantize"
    assert matmul_path(WeightsQuant.HQQ_INT4, "vllm") == "fused"
    assert matmul_path(WeightsQuant.NF4, "vllm") == "dequantize"  # vLLM calls bitsandbytes' own matmul
    assert matmul_path(WeightsQuant.GPTQ_INT4, "llama.cpp") == "fused"  # GGUF types: MMQ
