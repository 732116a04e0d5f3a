"""The serving job (issue 13): fit --engine answers with the engine's speed and its launch command; the page's
'Serve it' section shows the service's numbers."""

from __future__ import annotations

import pytest

from vramplan.service import ExportQuery, FitQuery, export, fit


def _fit(**options: object) -> dict[str, object]:
    return fit(FitQuery.of("llama-3.1-8b", {"gpu": "h100-sxm", "task": "infer", **options})).to_dict()


def test_fit_engine_answers_with_the_engines_decode_speed() -> None:
    plain = _fit()
    vllm = _fit(engine="vllm")
    assert plain["tokens_per_s"] and vllm["tokens_per_s"]
    # CUDA graphs: a serving engine's per-layer cost is below transformers' eager launches
    assert vllm["tokens_per_s"] > plain["tokens_per_s"]
    assert any(a.startswith("speed: vllm prefill and decode") for a in vllm["assumptions"])
    tp2 = _fit(engine="vllm", tp=2)
    assert any("all-reduces" in a for a in tp2["assumptions"])
    # the per-layer overhead does not shrink with TP and all-reduces are added: far from 2x
    assert vllm["tokens_per_s"] < tp2["tokens_per_s"] < 2 * vllm["tokens_per_s"]


def test_fit_engine_carries_the_launch_command_of_export() -> None:
    d = _fit(engine="vllm", max_model_len=8192)
    want = export(ExportQuery(model="llama-3.1-8b", workload={"task": "infer"}, engine="vllm", gpu="h100-sxm",
                              serving={"max_model_len": 8192})).command
    assert d["launch_command"] == want and "vllm serve" in want and "8192" in want
    assert _fit(engine="sglang")["launch_command"].startswith(("python -m sglang", "python3 -m sglang", "sglang"))
    assert "launch_command" not in _fit()


def test_serve_route_rejects_llama_cpp_without_a_gguf() -> None:
    from vramplan.errors import WorkloadError

    with pytest.raises(WorkloadError, match="GGUF"):
        _fit(engine="llama.cpp")
