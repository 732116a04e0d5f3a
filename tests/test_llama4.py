"""Llama 4's language model (llama4_text, modeling_llama4.py in transformers 5.24): the reader's facts, the mechanisms
of its memory program (dense-dispatch MoE, weightless q/k L2 norm on RoPE layers, fp32 query temperature on NoPE layers,
chunked layers cached as sliding ones, eager softmax in the scores' dtype), parameter counts against the meta-device
model, and estimate vs the fake-tensor trace."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.catalog import get_model
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
ROOT = Path(__file__).resolve().parents[1]
INFER = {"task": "infer", "precision": "bf16", "batch_size": 2, "seq_len": 1024, "new_tokens": 8}


def small(name: str, **kw: Any) -> dict[str, Any]:
    cfg = dict(get_model(name).config)
    cfg.update(num_hidden_layers=4, hidden_size=1024, intermediate_size=512, intermediate_size_mlp=1536,
               num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, num_local_experts=4, **kw)
    return cfg


def test_scout_and_maverick_layers() -> None:
    scout = get_model("llama-4-scout-17b-16e").spec
    assert scout.moe_layers == tuple(range(48)) and scout.moe_dense_dispatch
    assert scout.nope_layers == tuple(range(3, 48, 4))
    # chunked attention on the RoPE layers: a sliding-window cache of attention_chunk_size
    assert scout.sliding_window == 8192 and scout.sliding_layers == tuple(i for i in range(48) if i % 4 != 3)
    assert scout.qk_l2_norm and not scout.qk_norm and scout.nope_temperature and scout.rope_style == "complex"
    assert scout.intermediate_size == 16384 and scout.moe_intermediate_size == 8192
    assert scout.shared_expert_intermediate_size == 8192 and scout.num_experts == 16
    mav = get_model("llama-4-maverick-17b-128e").spec
    assert mav.moe_layers == tuple(range(1, 48, 2)) and not mav.qk_l2_norm and mav.num_experts == 128
    no_chunk = spec_from_config({**get_model("llama-4-scout-17b-16e").config, "attention_chunk_size": None}, "x")
    assert no_chunk.sliding_layers == () and no_chunk.sliding_window is None
    listed = spec_from_config({**get_model("llama-4-scout-17b-16e").config, "moe_layers": [5, 9]}, "x")
    assert listed.moe_layers == (5, 9)


def test_dense_dispatch_runs_every_expert_on_every_token() -> None:
    """Llama4TextMoe repeats the hidden states once per expert: the prefill's activations grow with the experts, not
    with top-k (a grouped dispatch would gather top-k x tokens rows)."""
    s = spec_from_config(small("llama-4-scout-17b-16e"), "x")
    w = make_workload(**INFER)
    dense = estimate(s, w).peak_allocated_bytes
    grouped = estimate(replace(s, moe_dense_dispatch=False), w).peak_allocated_bytes
    t, h = 2 * 1024, 1024
    # at least the repeated hidden states scaled by the scores (experts x tokens x hidden, bf16) beyond top-k rows
    assert dense - grouped >= (4 - 1) * t * h * 2
    more = estimate(spec_from_config(small("llama-4-scout-17b-16e", num_experts_per_tok=1) | {"num_local_experts": 8},
                                     "x"), w).peak_allocated_bytes
    assert more - dense >= 4 * t * h * 2


def test_eager_softmax_in_the_scores_dtype() -> None:
    s = spec_from_config(small("llama-4-scout-17b-16e"), "x")
    w = make_workload(**INFER, attention="eager")
    native = estimate(s, w).peak_allocated_bytes
    fp32 = estimate(replace(s, eager_softmax_native=False), w).peak_allocated_bytes
    scores = 2 * 8 * 1024 * 1024
    assert fp32 - native >= scores * 2  # an fp32 copy of the (batch, heads, seq, seq) scores that Llama 4 never makes


def test_nope_temperature_and_qk_l2_norm_are_per_layer_kind() -> None:
    """The fp32 query temperature runs on the NoPE layers only; removing it, or the L2 norm, changes the training
    activations."""
    cfg = small("llama-4-scout-17b-16e")
    w = make_workload(task="train", method="full", precision="bf16", optimizer="adamw", batch_size=1, seq_len=512)
    s = spec_from_config(cfg, "x")

    def fwd(spec: Any) -> int:
        from vramplan.result import Phase

        return estimate(spec, w).phase_peak(Phase.FORWARD)

    base = fwd(s)
    # the fp32 product q * scales (batch x seq x heads x head_dim x 4 bytes) saved nothing but lives at the forward
    assert fwd(replace(s, nope_temperature=False)) < base
    # the L2 norm's fp32 copies of q and k
    assert fwd(replace(s, qk_l2_norm=False)) < base
    assert fwd(replace(s, nope_layers=())) != base  # every layer with RoPE, the L2 norm and no temperature


@pytest.mark.parametrize("t", ["llama4_text", "dots1"])
def test_coverage_within_two_percent_of_trace(t: str) -> None:
    cells = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"][t]["cells"]
    for w in ("full", "lora", "infer"):
        assert abs(cells[w]["estimate_vs_trace_pct"]) <= 2.0, (t, w, cells[w])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("name", ["llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"])
def test_parameter_count_equals_meta_model(name: str) -> None:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = small(name)
    config = Llama4TextConfig.from_dict({k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = Llama4ForCausalLM._from_config(config)
    assert count_params(spec_from_config(cfg, "x")).total == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("name", ["llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"])
def test_estimate_matches_trace(name: str) -> None:
    """A small Scout (every layer MoE, q/k L2 norm) and Maverick (dense and MoE layers interleaved, no q/k norm) against
    the fake-tensor trace of the real modeling code: full fine-tune and eager training within 2%."""
    from vramplan.trace import trace_workload

    cfg = small(name)
    for attn in ("sdpa", "eager"):
        w = make_workload(task="train", method="full", precision="bf16", optimizer="adamw", batch_size=1,
                          seq_len=1024, attention=attn)
        tr = trace_workload(cfg, w, name="x").peak_allocated_bytes
        es = estimate(spec_from_config(cfg, "x"), w).peak_allocated_bytes
        assert abs(es / tr - 1) <= 0.02, (attn, es, tr)
