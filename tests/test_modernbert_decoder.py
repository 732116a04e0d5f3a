"""ModernBERT's decoder (vramplan.modernbert): reader, parameters against the meta-device model, the first layer
without an attention norm, the prediction head, RoPE on fp32 copies, and estimate against the fake-tensor trace."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params, layer_params

from .trace_match import SMALL_WORKLOADS, assert_matches_trace

MB: dict[str, Any] = {"model_type": "modernbert-decoder", "hidden_size": 256, "num_hidden_layers": 3,
                      "num_attention_heads": 4, "intermediate_size": 384, "vocab_size": 512, "pad_token_id": 0,
                      "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2,
                      "local_attention": 64}


def test_reader() -> None:
    spec = spec_from_config(MB)
    assert spec.sliding_layers == (1, 2) and spec.sliding_window == 32  # local_attention // 2; global every 3rd
    assert spec.gate_up_fused and spec.embedding_layernorm and spec.head_transform and spec.lm_head_bias
    assert not spec.layer(0).attn_norm and spec.layer(1).attn_norm and spec.rope_style == "fp32_each"
    # layer 0 holds one LayerNorm (weight only: norm_bias False) fewer than the others
    assert layer_params(spec, 1).norm - layer_params(spec, 0).norm == 256
    with pytest.raises(ConfigError, match="classifier_activation"):
        spec_from_config({**MB, "classifier_activation": "silu"})


def test_parameters_equal_the_meta_model() -> None:
    torch = pytest.importorskip("torch")
    from vramplan.trace._resolve import hf_config, model_class

    config, _ = hf_config(dict(MB), "modernbert-decoder")
    with torch.device("meta"):
        model = model_class(config, "modernbert-decoder")._from_config(config)
    assert count_params(spec_from_config(MB)).total == sum(p.numel() for p in model.parameters())


def test_rope_on_fp32_copies_costs_inference_memory() -> None:
    """The rotated q and k are made from fp32 copies and live in fp32 until both are done: the prefill peak is
    higher than with LLaMA's rotation in the states' dtype."""
    from dataclasses import replace

    spec = spec_from_config(MB)
    w = make_workload(task="infer", batch_size=2, seq_len=512, new_tokens=4)
    assert estimate(spec, w).peak_allocated_bytes > estimate(replace(spec, rope_style="half"), w).peak_allocated_bytes


WORKLOADS = SMALL_WORKLOADS


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    assert_matches_trace(MB, WORKLOADS[wname])
