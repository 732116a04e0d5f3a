"""Beam (modeling_beam.py, transformers 5.24): the reader's layer kinds (sliding layers with RoPE, the full ones NoPE
where rope_parameters holds None, dense layers from mlp_layer_types), and the mechanisms no other family has: the
depth-scaled residual adds, the fp32 query scale of the NoPE layers, the fp32 SwiGLU of the dense MLP and the
experts, and the final soft-capping on fp32 logits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import count_params

from .trace_match import WIDE_WORKLOADS, assert_matches_trace, meta_parameters

ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {"model_type": "beam", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024,
                         "moe_intermediate_size": 128, "num_hidden_layers": 7, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2,
                         "n_group": 2, "topk_group": 1, "sliding_window": 129, "max_position_embeddings": 4096}
TRAIN = make_workload(batch_size=2, seq_len=1024)


def test_layer_kinds() -> None:
    s = spec_from_config(SMALL, "b")
    # BeamConfig: full attention every 6th layer and on the last; the first three layers dense
    assert s.sliding_layers == (0, 1, 2, 3, 4) and s.nope_layers == (5, 6) and s.moe_layers == (3, 4, 5, 6)
    assert s.norms_per_layer == 4 and s.residual_depth_scale and s.nope_query_scale and s.mlp_glu_fp32
    assert s.expert_glu == "fp32" and s.moe_output_scale and s.logit_softcap == 30.0 and s.logit_softcap_fp32
    assert s.attn_gate == "sigmoid" and s.attn_gate_bias and not s.attn_gate_heads
    # RoPE parameters for the full layers too: no NoPE layer
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert spec_from_config({**SMALL, "rope_parameters": rope}, "b").nope_layers == ()
    s = spec_from_config({**SMALL, "mlp_layer_types": ["sparse"] * 7, "final_logit_softcapping": None}, "b")
    assert s.moe_layers == tuple(range(7)) and s.logit_softcap is None


def test_fp32_softcap_makes_fp32_logits() -> None:
    """``logits.float() / cap``: the soft-capped logits of a training step are fp32 (the loss's upcast is then a
    no-op): the logits memory at the backward peak is that of fp32 logits, not bf16 ones plus an fp32 copy."""
    s = spec_from_config(SMALL, "b")
    fp32 = dict(estimate(s, TRAIN).phases[0].breakdown.bytes_by_kind)[MemoryKind.LOGITS_LOSS]
    bf16 = dict(estimate(replace(s, logit_softcap_fp32=False), TRAIN).phases[0].breakdown.bytes_by_kind)[
        MemoryKind.LOGITS_LOSS]
    assert fp32 != bf16


def test_depth_scaled_adds_and_fp32_mlp_hold_more() -> None:
    s = spec_from_config(SMALL, "b")
    w = make_workload(task="infer", batch_size=4, seq_len=1024, new_tokens=4)
    base = estimate(s, w).peak_allocated_bytes
    assert estimate(replace(s, mlp_glu_fp32=False), w).peak_allocated_bytes < base


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WIDE_WORKLOADS))
def test_small_config_matches_trace(wname: str) -> None:
    assert_matches_trace(SMALL, WIDE_WORKLOADS[wname])


def test_parameter_count_equals_meta_model() -> None:
    pytest.importorskip("transformers")
    for cfg in (SMALL, {**SMALL, "attention_bias": True, "mlp_layer_types": ["sparse", "dense"] * 3 + ["dense"]}):
        assert count_params(spec_from_config(cfg, "b")).total == meta_parameters(cfg)


@pytest.mark.parametrize("w", ["full", "lora", "infer"])
def test_coverage_within_two_percent_of_trace(w: str) -> None:
    cell = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"]["beam"]["cells"][w]
    assert abs(cell["estimate_vs_trace_pct"]) <= 2.0, cell
