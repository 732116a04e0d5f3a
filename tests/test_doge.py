"""Doge (modeling_doge.py): dynamic mask attention (a float SDPA mask per key-value head computed from the values,
top-k beyond keep_window_size) and trainable residual scales, against the fake-tensor trace."""

from __future__ import annotations

from typing import Any

import pytest

from tests.trace_match import SMALL_WORKLOADS, assert_matches_trace
from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

SMALL: dict[str, Any] = {"model_type": "doge", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
                         "keep_window_size": 2048}


def test_parameters_count_dt_proj_a_and_the_residual_weights() -> None:
    plain = count_params(spec_from_config({**SMALL, "model_type": "qwen3"})).layers[0].total
    mine = count_params(spec_from_config(SMALL)).layers[0].total
    kv = 2 * 64
    assert mine - plain == kv * 2 + 2 + 2 * 256  # dt_proj (kv_dim -> kv heads), A, two residual vectors


def test_the_dynamic_mask_is_one_float_tensor_per_key_value_head_and_grows_with_the_keys() -> None:
    """Inference holds the (batch, kv heads, q, kv) mask in the model dtype: quadrupling the sequence adds at least
    15 x that mask's size at 128 tokens."""
    def peak(s: int) -> int:
        return estimate(spec_from_config(SMALL), make_workload(task="infer", batch_size=2, seq_len=s,
                                                               new_tokens=1)).peak_allocated_bytes
    assert peak(512) - peak(128) >= 15 * 2 * 2 * 128 * 128 * 2


def test_cross_domain_moe_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"cross-domain MoE.*vramplan trace"):
        spec_from_config({**SMALL, "is_moe": True})


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SMALL, {**SMALL, "keep_window_size": 64, "num_key_value_heads": 4}],
                         ids=["within-window", "top-k"])
@pytest.mark.parametrize("wname", list(SMALL_WORKLOADS))
def test_estimate_matches_trace(cfg: dict[str, Any], wname: str) -> None:
    assert_matches_trace(cfg, SMALL_WORKLOADS[wname])
