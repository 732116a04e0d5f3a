"""MoE types read by hand-written families from their modeling files (transformers 5.24): HunYuan MoE V1, Aria's
language model, LFM2-MoE, DBRX, and the library defaults of dots1, HunYuan MoE V1, LFM2-MoE and DBRX completed where
transformers cannot build them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
ROOT = Path(__file__).resolve().parents[1]
HUNYUAN: dict[str, Any] = {"model_type": "hunyuan_v1_moe", "hidden_size": 1024, "intermediate_size": 512,
                           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
                           "vocab_size": 32000, "num_experts": 8, "moe_topk": 2}


ARIA: dict[str, Any] = {"model_type": "aria_text", "hidden_size": 1024, "intermediate_size": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                        "moe_num_experts": 8, "moe_topk": 2, "moe_num_shared_experts": 3}


def test_aria_moe_block_facts() -> None:
    s = spec_from_config(ARIA, "a")
    assert s.moe_layers == (0, 1) and s.num_experts == 8 and s.experts_per_token == 2 and s.router_topk_first
    assert s.moe_intermediate_size == 256 and s.shared_expert_intermediate_size == 3 * 256
    assert not s.router_bias and not s.shared_expert_first
    with pytest.raises(ConfigError, match="mlp_bias"):
        spec_from_config({**ARIA, "mlp_bias": True}, "a")


LFM2_MOE: dict[str, Any] = {"model_type": "lfm2_moe", "hidden_size": 512, "intermediate_size": 1024,
                            "moe_intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                            "num_key_value_heads": 2, "vocab_size": 4096, "num_experts": 8, "num_experts_per_tok": 2,
                            "num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv", "full_attention"]}


def test_lfm2_moe_layers_and_router() -> None:
    s = spec_from_config(LFM2_MOE, "l")
    assert s.mixers == ("conv", "attention", "conv", "attention") and s.moe_layers == (1, 2, 3)
    assert s.intermediate_size == 1024 and s.moe_intermediate_size == 256 and s.router_sigmoid and not s.router_fp32
    with pytest.raises(ConfigError, match="layer_types"):  # Lfm2MoeConfig's own default (None) cannot build
        spec_from_config({k: v for k, v in LFM2_MOE.items() if k != "layer_types"}, "l")


def test_bf16_sigmoid_router_keeps_bf16_weights() -> None:
    """Lfm2MoeTopKRouter gathers its weights from a bf16 sigmoid: the weighted expert outputs stay bf16, where an fp32
    router (DeepSeek-V3's) makes them fp32 (pairs x hidden x 4 bytes)."""
    from dataclasses import replace

    from vramplan.api import estimate, make_workload

    s = spec_from_config(LFM2_MOE, "l")
    w = make_workload(task="infer", precision="bf16", batch_size=4, seq_len=2048, new_tokens=4)
    bf16 = estimate(s, w).peak_allocated_bytes
    fp32 = estimate(replace(s, router_fp32=True), w).peak_allocated_bytes
    assert fp32 - bf16 >= 4 * 2048 * 2 * 512 * 2  # the weighted pairs in fp32 instead of bf16


def test_hunyuan_moe_block_facts() -> None:
    s = spec_from_config(HUNYUAN, "h")
    assert s.moe_layers == (0, 1) and s.num_experts == 8 and s.experts_per_token == 2
    assert s.moe_intermediate_size == s.shared_expert_intermediate_size == 512 and s.shared_expert_first
    assert s.router_fp32 and s.router_weights_fp32 and s.qk_norm and s.qk_norm_after_rope
    with pytest.raises(ConfigError, match="per layer"):
        spec_from_config({**HUNYUAN, "moe_topk": [2, 2]}, "h")


@pytest.mark.parametrize("t", ["hunyuan_v1_moe", "aria_text", "lfm2_moe", "dbrx"])
def test_coverage_within_two_percent_of_trace(t: str) -> None:
    cells = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"][t]["cells"]
    for w in ("full", "lora", "infer"):
        assert abs(cells[w]["estimate_vs_trace_pct"]) <= 2.0, (t, w, cells[w])


def test_fixed_defaults_are_said_in_the_result() -> None:
    types = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"]
    assert types["dots1"]["default_fixed"] == {"n_routed_experts": 128, "num_experts_per_tok": 6,
                                               "n_shared_experts": 2}
    assert types["hunyuan_v1_moe"]["default_fixed"] == {"head_dim": 128}
    assert types["dbrx"]["default_fixed"] == {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8}}
    assert types["lfm2_moe"]["layers"] == {"num_hidden_layers": 2}
    assert "layer_types" in types["lfm2_moe"]["default_fixed"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("cfg", [HUNYUAN, ARIA, LFM2_MOE], ids=["hunyuan_v1_moe", "aria_text", "lfm2_moe"])
def test_parameter_count_equals_meta_model(cfg: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_params(spec_from_config(cfg, "x")).total == sum(p.numel() for p in model.parameters())


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("t", ["dots1", "hunyuan_v1_moe", "lfm2_moe"])
def test_fixed_default_builds_and_counts_exactly(t: str) -> None:
    """transformers' own default does not build; the completed one does, and the reader counts its parameters."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from coverage_report import default_config

    with pytest.raises((TypeError, ValueError)), torch.device("meta"):
        AutoModelForCausalLM.from_config(CONFIG_MAPPING[t]())
    cfg = default_config(t, 2, False)
    config = CONFIG_MAPPING[t].from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_params(spec_from_config(cfg, t)).total == sum(p.numel() for p in model.parameters())


DBRX: dict[str, Any] = {"model_type": "dbrx", "d_model": 1024, "n_heads": 8, "n_layers": 2, "vocab_size": 32000,
                        "max_seq_len": 4096,
                        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 500000.0},
                        "ffn_config": {"hidden_size": 1024, "ffn_hidden_size": 1536, "moe_num_experts": 8,
                                       "moe_top_k": 2, "moe_jitter_eps": 0.01}}


def test_dbrx_facts() -> None:
    s = spec_from_config(DBRX, "d")
    assert (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.num_layers) == (1024, 8, 2, 128, 2)
    assert s.qkv_fused and s.qkv_name == "Wqkv" and s.o_name == "out_proj" and s.qkv_clamp
    assert s.moe_experts_loop and s.router_softmax_native and s.router_jitter and s.moe_layers == (0, 1)
    assert (s.num_experts, s.experts_per_token, s.moe_intermediate_size) == (8, 2, 1536)
    plain = spec_from_config({**DBRX, "attn_config": {"kv_n_heads": 2}, "ffn_config": {**DBRX["ffn_config"],
                                                                                          "moe_jitter_eps": None}}, "d")
    assert not plain.qkv_clamp and not plain.router_jitter


def test_dbrx_expert_loop_scatters_each_slice_gradient_into_a_stack() -> None:
    """A full fine-tune's backward holds, per expert matmul, a zero-filled buffer of the whole stacked weight
    (select_backward of ``w1.view(...)[expert]``): the grouped_mm program, which has no such buffer, peaks lower."""
    from dataclasses import replace

    from vramplan.api import estimate, make_workload
    from vramplan.result import Phase

    s = spec_from_config({**DBRX, "vocab_size": 1000}, "d")  # a small head: the backward peaks in the experts
    w = make_workload(task="train", method="full", precision="bf16", optimizer="adamw", batch_size=1, seq_len=512)
    loop = estimate(s, w).phase_peak(Phase.BACKWARD)
    grouped = estimate(replace(s, moe_experts_loop=False), w).phase_peak(Phase.BACKWARD)
    assert loop - grouped >= 8 * 1536 * 1024 * 2  # one stack-sized bf16 buffer


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_dbrx_parameter_count_equals_meta_model() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**DBRX)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_params(spec_from_config(DBRX, "d")).total == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_dbrx_estimate_matches_trace_with_jitter_and_top2() -> None:
    """DBRX-base's router (top-k of several experts, training jitter) against the fake-tensor trace: the backward of a
    full fine-tune and the prefill within 2%."""
    from vramplan.api import estimate, make_workload
    from vramplan.result import Phase
    from vramplan.trace import trace_workload

    w = make_workload(task="train", method="full", precision="bf16", optimizer="adamw", batch_size=1, seq_len=1024)
    tr, es = trace_workload(DBRX, w, name="d"), estimate(spec_from_config(DBRX, "d"), w)
    for ph in (Phase.FORWARD, Phase.BACKWARD):
        assert abs(es.phase_peak(ph) / tr.phase_peak(ph) - 1) <= 0.02, ph
    w = make_workload(task="infer", precision="bf16", batch_size=4, seq_len=2048, new_tokens=16)
    tr, es = trace_workload(DBRX, w, name="d"), estimate(spec_from_config(DBRX, "d"), w)
    assert abs(es.peak_allocated_bytes / tr.peak_allocated_bytes - 1) <= 0.02
