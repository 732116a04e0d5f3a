"""MiniCPM5-MoE (modular_minicpm5_moe.py, new in transformers 5.25): LLaMA's attention whose q_gate_proj makes the query
and a per-channel sigmoid output gate (Qwen3-Next's layout), DeepSeek-V3's MoE on the "sparse" layers. The reader's
facts, the parameter count against the meta-device model, and the estimate against the trace of 5.25's own code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

from .trace_match import SMALL_WORKLOADS, assert_matches_trace, meta_parameters

ROOT = Path(__file__).resolve().parents[1]
CFG: dict[str, Any] = {"model_type": "minicpm5_moe", "hidden_size": 512, "intermediate_size": 1536,
                       "moe_intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 8,
                       "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "n_routed_experts": 8,
                       "num_experts_per_tok": 2, "n_shared_experts": 1,
                       "mlp_layer_types": ["dense", "sparse", "sparse"]}


def _has_type() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return False
    from transformers import CONFIG_MAPPING

    return "minicpm5_moe" in CONFIG_MAPPING


needs_525 = pytest.mark.skipif(not _has_type(), reason="needs torch and a transformers with MiniCPM5-MoE (5.25+)")


def test_reads_the_gated_query_and_the_deepseek_moe() -> None:
    s = spec_from_config(CFG, "m")
    assert s.attn_output_gate and s.qkv_names[0] == "q_gate_proj" and not s.qk_norm
    assert s.moe_layers == (1, 2) and s.num_experts == 8 and s.router_sigmoid and s.router_fp32
    assert s.shared_expert_intermediate_size == 256 and s.intermediate_size == 1536


def test_the_config_classs_defaults_where_keys_are_left_out() -> None:
    """MiniCPM5MoeConfig: one shared expert, and first_k_dense_replace (1) dense layers when mlp_layer_types is absent
    (not DeepSeek-V3.2's three)."""
    cfg = {k: v for k, v in CFG.items() if k not in ("n_shared_experts", "mlp_layer_types")}
    s = spec_from_config(cfg, "m")
    assert s.moe_layers == (1, 2) and s.shared_expert_intermediate_size == 256
    assert spec_from_config({**cfg, "first_k_dense_replace": 2}, "m").moe_layers == (2,)


def test_the_gate_is_a_copy_and_lora_finds_q_gate_proj() -> None:
    """The gate's reshape copies (batch x seq x heads x head_dim); LoRA on q_gate_proj adapts the fused projection."""
    s = spec_from_config(CFG, "m")
    plain = estimate(s, make_workload(method="lora", lora_targets="v_proj", batch_size=2, seq_len=256))
    fused = estimate(s, make_workload(method="lora", lora_targets="q_gate_proj,v_proj", batch_size=2, seq_len=256))
    assert fused.trainable_parameters - plain.trainable_parameters == 3 * 16 * (512 + 2 * 8 * 64)


def test_coverage_within_two_percent_of_the_525_trace() -> None:
    cells = json.loads((ROOT / "benchmarks" / "coverage_results-transformers-5.25.0.json").read_text()
                       )["types"]["minicpm5_moe"]["cells"]
    for w in ("full", "lora", "infer"):
        assert abs(cells[w]["estimate_vs_trace_pct"]) <= 2.0, (w, cells[w])


@needs_525
def test_parameter_count_equals_meta_model() -> None:
    assert count_params(spec_from_config(CFG, "m")).total == meta_parameters(CFG)


# under AMP MiniCPM5MoeTopkRouter turns autocast off around its fp32 logits (DeepSeek-V3's would run them in bf16): a
# (tokens, experts) difference, inside the tolerance here (-0.4%)
WORKLOADS = {**SMALL_WORKLOADS, "amp": {"batch_size": 4, "seq_len": 256, "precision": "amp-bf16"}}


@pytest.mark.slow
@needs_525
@pytest.mark.parametrize("wname", sorted(WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    assert_matches_trace(CFG, WORKLOADS[wname])
