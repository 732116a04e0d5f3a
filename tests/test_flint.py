"""Flint (modeling_flint.py, transformers 5.24): the reader's layer kinds (the default layer_types: global on the first
two layers, every fourth from 1 and the last; RoPE on the sliding layers only), the sigmoid-routed MoE block with an
always-on shared expert, and the fp32 sink attention (fp32 scores and softmax, the masked scores held by the
``attn_weights`` local until the cast back is assigned)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

from .trace_match import WIDE_WORKLOADS, assert_matches_trace, meta_parameters

ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {"model_type": "flint", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024,
                         "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256,
                         "num_hidden_layers": 7, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                         "num_experts": 8, "num_experts_per_tok": 2, "sliding_window": 129,
                         "max_position_embeddings": 4096}


def test_layer_kinds() -> None:
    s = spec_from_config(SMALL, "f")
    # FlintConfig: full where i < 2 or i % 4 == 1 or i is the last layer; MoE outside mlp_only_layers ([0, 1])
    assert s.sliding_layers == (2, 3, 4) and s.nope_layers == (0, 1, 5, 6)
    assert s.moe_layers == (2, 3, 4, 5, 6) and s.shared_expert_intermediate_size == 256
    assert s.attention_sinks and s.sink_fp32 and not s.sdpa and s.router_sigmoid_plain and s.router_fp32
    s = spec_from_config({**SMALL, "layer_types": ["sliding_attention"] * 7, "mlp_only_layers": [3]}, "f")
    assert s.sliding_layers == tuple(range(7)) and s.nope_layers == () and s.moe_layers == (0, 1, 2, 4, 5, 6)
    # without a window no layer applies RoPE (FlintAttention.sliding_window is None on every layer)
    assert spec_from_config({**SMALL, "sliding_window": None}, "f").nope_layers == tuple(range(7))


def test_fp32_scores_held_through_the_softmax() -> None:
    """In inference the prefill peak is the last layer's softmax: the fp32 masked scores, the fp32 cat with the
    sinks and the fp32 softmax are alive together (three (batch, heads, seq, seq) fp32 tensors)."""
    s = spec_from_config(SMALL, "f")
    w = make_workload(task="infer", batch_size=4, seq_len=1024, new_tokens=4)
    est = estimate(s, w).peak_allocated_bytes
    scores = 4 * 8 * 1024 * 1024 * 4
    assert est - 2 * count_params(s).total > 3 * scores
    # the bf16 sink attention (gpt-oss's) holds less
    assert estimate(replace(s, sink_fp32=False), w).peak_allocated_bytes < est - scores


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WIDE_WORKLOADS))
def test_small_config_matches_trace(wname: str) -> None:
    assert_matches_trace(SMALL, WIDE_WORKLOADS[wname])


def test_parameter_count_equals_meta_model() -> None:
    pytest.importorskip("transformers")
    for cfg in (SMALL, {**SMALL, "mlp_only_layers": [], "layer_types": ["full_attention"] * 7}):
        assert count_params(spec_from_config(cfg, "f")).total == meta_parameters(cfg)


@pytest.mark.parametrize("w", ["full", "lora", "infer"])
def test_coverage_within_two_percent_of_trace(w: str) -> None:
    cell = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"]["flint"]["cells"][w]
    assert abs(cell["estimate_vs_trace_pct"]) <= 2.0, cell
