"""MiMo-V2-Flash (modeling_mimo_v2_flash.py, transformers 5.24): the reader's layer kinds (sliding layers with twice
the KV heads and a learned sink, layer 0 global), values narrower than the q/k heads and scaled, the eager attention
that subtracts the row max and keeps the softmax in the scores' dtype, and the eager weights the decoder layer keeps
in its ``_`` local through the MLP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import attention_linears, count_params

from .trace_match import assert_matches_trace

ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {"model_type": "mimo_v2_flash", "vocab_size": 4096, "hidden_size": 512,
                         "intermediate_size": 1024, "moe_intermediate_size": 128, "num_hidden_layers": 7,
                         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 96, "v_head_dim": 64,
                         "n_routed_experts": 8, "num_experts_per_tok": 2, "sliding_window": 129,
                         "max_position_embeddings": 4096}


def test_layer_kinds_and_heads() -> None:
    s = spec_from_config(SMALL, "m")
    # MiMoV2FlashConfig's default layer_types: global at layer 0 and every 6th layer; mlp_layer_types: layer 0 dense
    assert s.sliding_layers == (1, 2, 3, 4, 6) and s.moe_layers == (1, 2, 3, 4, 5, 6)
    assert not s.sdpa and s.eager_max_softmax and s.value_scale and s.v_head_dim == 64
    full, sliding = s.layer(0), s.layer(1)
    assert (full.num_kv_heads, full.attention_sinks) == (2, False)
    assert (sliding.num_kv_heads, sliding.attention_sinks) == (4, True)
    # k_proj and v_proj per KV head: 96 and 64 wide; o_proj reads heads x 64
    assert dict((n, (i, o)) for n, i, o, _ in attention_linears(sliding)) == {
        "q_proj": (512, 768), "k_proj": (512, 384), "v_proj": (512, 256), "o_proj": (512, 512)}
    assert sliding.kv_cache_per_token == 4 * (96 + 64) and full.kv_cache_per_token == 2 * (96 + 64)
    # the sinks: one per head on each sliding layer
    assert count_params(s).total - count_params(replace(s, layer_overrides=(
        replace(s.layer_overrides[0], attention_sinks=False),))).total == 5 * 8
    with pytest.raises(ConfigError, match="KV heads"):
        spec_from_config({**SMALL, "num_key_value_heads": 8}, "m")  # 16 sliding KV heads for 8 query heads


@pytest.mark.slow
@pytest.mark.parametrize("opts", [
    {"task": "infer", "batch_size": 4, "seq_len": 1024, "new_tokens": 4},
    {"batch_size": 1, "seq_len": 1024},
], ids=["infer", "full"])
def test_small_config_matches_trace(opts: dict[str, Any]) -> None:
    """Against the fake-tensor trace of the real model. Inference fails without the eager weights the decoder layer
    keeps in its ``_`` local (``hidden_states, _ = self.self_attn(...)``) through the MoE block."""
    assert_matches_trace(SMALL, opts)


def test_kv_cache_holds_each_layers_own_heads_and_value_width() -> None:
    """The prefill's cache: 96-wide keys and 64-wide values, 2 KV heads on the 2 global layers, 4 on the 5 sliding
    ones (the trace of this config records the same 30 MiB)."""
    s = spec_from_config(SMALL, "m")
    w = make_workload(task="infer", batch_size=4, seq_len=1024, new_tokens=4)
    kv = dict(estimate(s, w).phases[0].breakdown.bytes_by_kind)[MemoryKind.KV_CACHE]
    assert kv == 4 * 1024 * 2 * (2 * 2 * (96 + 64) + 5 * 4 * (96 + 64))


@pytest.mark.parametrize("w", ["full", "lora", "infer"])
def test_coverage_within_two_percent_of_trace(w: str) -> None:
    cell = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"]["mimo_v2_flash"]["cells"][w]
    assert abs(cell["estimate_vs_trace_pct"]) <= 2.0, cell
