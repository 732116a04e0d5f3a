"""JetMoE (vramplan.jetmoe): the mixture of attention heads and the MoE MLP on JetMoeParallelExperts."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import count_params

# JetMoeConfig's library defaults (transformers 5.24), cut to the coverage's two layers
JETMOE: dict[str, Any] = {
    "model_type": "jetmoe", "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 12,
    "num_key_value_heads": 16, "kv_channels": 128, "intermediate_size": 5632, "max_position_embeddings": 4096,
    "activation_function": "silu", "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}
SMALL = {"hidden_size": 256, "num_key_value_heads": 4, "kv_channels": 32, "intermediate_size": 384,
         "vocab_size": 1024, "num_local_experts": 4}


def _cut(**change: Any) -> dict[str, Any]:
    return {**cut_layers(JETMOE, 2), **change}


@pytest.mark.parametrize("change", [{}, SMALL, {**SMALL, "num_experts_per_tok": 1, "tie_word_embeddings": False},
                                    {**SMALL, "num_local_experts": 6, "num_experts_per_tok": 3}])
def test_parameters_match_the_meta_model(change: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    cfg = _cut(**change)
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_query_heads_are_top_k_groups_of_the_key_value_heads() -> None:
    spec = spec_from_config(_cut())
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 16, 128)


def test_gradient_checkpointing_refused_as_transformers_does() -> None:
    with pytest.raises(WorkloadError, match="gradient checkpointing"):
        estimate(spec_from_config(_cut()), make_workload(method="lora", gradient_checkpointing=True,
                                                         lora_targets="all-linear"))


def test_lora_targets_are_its_linears() -> None:
    """peft's all-linear adapts kv_proj and the two routers' nn.Linear; the expert stacks are parameters."""
    from vramplan.memory import lora_targets

    spec = spec_from_config(_cut())
    assert lora_targets(spec, ("all-linear",)) == {"kv_proj", "experts.router.layer", "mlp.router.layer"}


def test_decode_repeats_the_cache_top_k_times() -> None:
    """Every decode step repeats the layer's whole cache top_k times for the query heads (copies): with the same
    cache and weights, one more expert per token is one more layer's keys and values at the decode peak."""
    w = make_workload(task="infer", batch_size=4, seq_len=2048, new_tokens=8)

    def decode(k: int) -> tuple[int, int]:
        d = estimate(spec_from_config(_cut(**{**SMALL, "num_experts_per_tok": k})), w).phases[-1]
        return d.peak_allocated_bytes, d.breakdown.as_dict()[MemoryKind.KV_CACHE]

    (p1, c1), (p2, c2) = decode(1), decode(2)
    layer_kv = 4 * (2048 + 8) * SMALL["num_key_value_heads"] * SMALL["kv_channels"] * 2 * 2
    assert c2 - c1 == p2 - p1 == layer_kv


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "infer"])
def test_estimate_matches_trace(wname: str) -> None:
    pytest.importorskip("torch")
    from .trace_match import SMALL_WORKLOADS, assert_matches_trace

    assert_matches_trace(_cut(**SMALL), {**SMALL_WORKLOADS[wname], "seq_len": 256})
