"""ZAYA (vramplan.zaya): Compressed Convolutional Attention, the fp32 residual stream with its residual scalings, the
router state carried from layer to layer, the MoE with a skip expert."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

# ZayaConfig's library defaults (transformers 5.24), cut to the coverage's two layers
ZAYA: dict[str, Any] = {
    "model_type": "zaya", "vocab_size": 262272, "hidden_size": 2048, "num_hidden_layers": 40,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "moe_intermediate_size": 2048, "num_experts_per_tok": 1, "num_experts": 16, "router_hidden_size": 256,
    "cca_time0": 2, "cca_time1": 2, "layer_types": ["hybrid"] * 40,
    "rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
                        "hybrid_sliding": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
}
SMALL = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "moe_intermediate_size": 128, "num_experts": 4, "router_hidden_size": 64, "vocab_size": 1024}


def _cut(**change: Any) -> dict[str, Any]:
    return {**cut_layers(ZAYA, 2), **change}


@pytest.mark.parametrize("change", [{}, SMALL, {**SMALL, "cca_time0": 3, "cca_time1": 4},
                                    {**SMALL, "num_hidden_layers": 3, "layer_types": ["hybrid"] * 3,
                                     "tie_word_embeddings": False}])
def test_parameters_match_the_meta_model(change: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    cfg = _cut(**change)
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_lora_on_q_proj_v_proj_adapts_q_proj_only_as_peft_does() -> None:
    """CCA's value projections are v_proj_current / v_proj_delayed: peft's "q_proj,v_proj" matches q_proj only (it
    raises only when no target matches), and the estimate says so."""
    spec = spec_from_config(_cut(**SMALL))
    est = estimate(spec, make_workload(method="lora", lora_targets="q_proj,v_proj", lora_rank=8, seq_len=128))
    layers, h, q = 2, SMALL["hidden_size"], SMALL["num_attention_heads"] * SMALL["head_dim"]
    assert est.trainable_parameters == layers * 8 * (h + q)
    assert any("v_proj matches no linear" in w for w in est.warnings)
    from vramplan.errors import WorkloadError

    with pytest.raises(WorkloadError, match="not a linear"):
        estimate(spec, make_workload(method="lora", lora_targets="v_proj", seq_len=128))


def test_residual_stream_is_fp32() -> None:
    """The stack's residual stream is fp32 (residual_in_fp32): the activations grow faster with depth than a bf16
    stream's would (each layer's saved residual scalings are fp32 hidden-sized tensors)."""
    w = make_workload(batch_size=1, seq_len=512)

    def fwd(layers: int) -> int:
        spec = spec_from_config(_cut(**SMALL, num_hidden_layers=layers, layer_types=["hybrid"] * layers))
        return estimate(spec, w).phases[0].breakdown.as_dict()["activations"]  # type: ignore[index]

    per_layer = fwd(3) - fwd(2)
    assert per_layer >= 4 * 512 * SMALL["hidden_size"] * 4  # at least four fp32 hidden-sized tensors a layer


def test_refuses_what_transformers_or_estimate_does_not_run() -> None:
    with pytest.raises(ConfigError, match="sliding-window"):
        spec_from_config(_cut(sliding_window=128, layer_types=["hybrid_sliding", "hybrid"]))
    with pytest.raises(ConfigError, match="num_experts_per_tok 1 only"):
        spec_from_config(_cut(num_experts_per_tok=2))


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "lora", "infer"])
def test_estimate_matches_trace(wname: str) -> None:
    pytest.importorskip("torch")
    from .trace_match import SMALL_WORKLOADS, assert_matches_trace

    assert_matches_trace(_cut(**SMALL), {**SMALL_WORKLOADS[wname], "seq_len": 256})
