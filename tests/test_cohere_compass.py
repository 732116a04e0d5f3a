"""Cohere Compass's text decoder (cohere_compass_text): Cohere 2's parallel layers with per-layer-type RoPE tables,
read by hand; its library default leaves rope_parameters empty, which the derivation completes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.trace_match import SMALL_WORKLOADS, assert_matches_trace
from vramplan.hfconfig import spec_from_config
from vramplan.spec import NormKind

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
SMALL: dict[str, Any] = {"model_type": "cohere_compass_text", "hidden_size": 256, "intermediate_size": 512,
                         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                         "vocab_size": 4096, "sliding_window": 64,
                         "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                                         "full_attention"],
                         "rope_parameters": {"sliding_attention": ROPE, "full_attention": None}}


def test_reads_as_parallel_cohere_layers_with_nope_where_rope_parameters_say_none() -> None:
    spec = spec_from_config(SMALL)
    assert spec.family == "cohere_compass_text" and spec.norm is NormKind.COHERE_LAYERNORM
    assert spec.nope_layers == (3,)  # the full layer's rope_parameters entry is None
    assert spec.sliding_layers == (0, 1, 2) and spec.sliding_window == 64
    with_rope = spec_from_config({**SMALL, "rope_parameters": {"sliding_attention": ROPE, "full_attention": ROPE}})
    assert with_rope.nope_layers == ()


def test_derivation_completes_the_empty_default_rope_parameters() -> None:
    pytest.importorskip("transformers")
    from vramplan.derive._derive import completed_default

    d = completed_default("cohere_compass_text")
    assert set(d["rope_parameters"]) == set(d["layer_types"])
    assert all(v == {"rope_type": "default", "rope_theta": 10000.0} for v in d["rope_parameters"].values())


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(SMALL_WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    assert_matches_trace(SMALL, SMALL_WORKLOADS[wname])
