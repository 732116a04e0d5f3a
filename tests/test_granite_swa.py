"""Granite SWA and GraniteMoe SWA (modeling_granite_swa.py / modeling_granitemoe_swa.py, transformers 5.24): the
reader's layer kinds (sliding layers, NoPE layers from layer_rope_theta), the learned sink applied as a
sigmoid(logsumexp - sink) scale of the attention output, and parameter counts against the meta-device model."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {"model_type": "granite_swa", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024,
                         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
                         "sliding_window": 128, "max_position_embeddings": 4096}
MOE = {**SMALL, "model_type": "granitemoe_swa", "num_local_experts": 4, "num_experts_per_tok": 2,
       "intermediate_size": 256, "shared_intermediate_size": 512}


def test_layer_kinds() -> None:
    s = spec_from_config(SMALL, "g")
    # GraniteSWAConfig's default layer_types: full attention where i % 4 == 0
    assert s.sliding_layers == (1, 2, 3, 5, 6, 7) and s.nope_layers == ()
    assert s.attention_sinks and s.sink_lse and not s.sdpa
    s = spec_from_config({**SMALL, "layer_rope_theta": [10000.0, 0, 10000.0, 0, 10000.0, 0, 10000.0, 0]}, "g")
    assert s.nope_layers == (1, 3, 5, 7)
    with pytest.raises(ConfigError):
        spec_from_config({**SMALL, "layer_rope_theta": [0]}, "g")
    m = spec_from_config(MOE, "g")
    assert m.moe_layers == tuple(range(8)) and m.shared_expert_intermediate_size == 512 and m.sink_lse


def test_sink_scale_saves_the_scores_for_logsumexp() -> None:
    """logsumexp's backward needs its input: the masked bf16 scores stay saved beside the softmax's fp32 result,
    so training holds more than with the gpt-oss-style sink (no logsumexp)."""
    s = spec_from_config(SMALL, "g")
    w = make_workload(task="train", method="lora", precision="bf16", optimizer="adamw", batch_size=1, seq_len=1024,
                      lora_rank=16, lora_targets="q_proj,v_proj")
    lse = estimate(s, w).peak_allocated_bytes
    concat = estimate(replace(s, sink_lse=False), w).peak_allocated_bytes
    scores = 8 * 1024 * 1024  # heads x seq x seq, per layer
    assert lse - concat >= scores * 2


@pytest.mark.parametrize("t", ["granite_swa", "granitemoe_swa"])
def test_coverage_within_two_percent_of_trace(t: str) -> None:
    cells = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"][t]["cells"]
    for w in ("full", "lora", "infer"):
        assert abs(cells[w]["estimate_vs_trace_pct"]) <= 2.0, (t, w, cells[w])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("cfg", [SMALL, MOE, {**SMALL, "layer_rope_theta": [1e4, 0] * 4}], ids=["dense", "moe", "nope"])
def test_parameter_count_equals_meta_model(cfg: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_params(spec_from_config(cfg, "g")).total == sum(p.numel() for p in model.parameters())
