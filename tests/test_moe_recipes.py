"""MoE blocks in derived recipes (``vramplan.derive._compose``): the pure-Python reading of a recipe's MoE keys and
MoE-layer rule, and (slow, torch) the composition of MoE types against the families' blocks."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.errors import ConfigError
from vramplan.hfconfig import _Cfg, _Facts, _llama_like, _moe_rule
from vramplan.params import count_params

_BASE: dict[str, Any] = dict(model_type="x_moe", hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, intermediate_size=96, n_experts=8, top_k=2,
                             expert_width=32, n_shared=1, first_dense=2, sparse_every=2, dense_list=[1, 4],
                             kinds=["dense", "sparse", "sparse", "dense", "sparse", "sparse"])


def _layers(rule: tuple[tuple[str, ...], ...], **over: Any) -> tuple[int, ...]:
    return _moe_rule(_Cfg({**_BASE, **over}, "x"), rule, 6)


def test_rule_conditions() -> None:
    assert _layers((("all",),)) == (0, 1, 2, 3, 4, 5)
    assert _layers((("ge", "first_dense"),)) == (2, 3, 4, 5)  # first_k_dense_replace
    assert _layers((("step", "sparse_every"),)) == (1, 3, 5)  # decoder_sparse_step: (i + 1) % step == 0
    assert _layers((("every", "sparse_every"),)) == (0, 2, 4)  # moe_layer_freq: i % freq == 0
    assert _layers((("not_in", "dense_list"),)) == (0, 2, 3, 5)  # mlp_only_layers
    assert _layers((("in", "dense_list"),)) == (1, 4)  # llama4 moe_layers
    assert _layers((("eq", "kinds", "sparse"),)) == (1, 2, 4, 5)  # mlp_layer_types
    # a conjunction: DeepSeek's first_k_dense_replace and moe_layer_freq
    assert _layers((("ge", "first_dense"), ("every", "sparse_every"))) == (2, 4)
    assert _layers((("ge", "first_dense"),), first_dense=0) == (0, 1, 2, 3, 4, 5)


def test_rule_needs_its_per_layer_list() -> None:
    with pytest.raises(ConfigError, match="one entry per layer"):
        _layers((("eq", "kinds", "sparse"),), kinds=["sparse"])
    with pytest.raises(ConfigError, match="unknown MoE layer rule"):
        _layers((("sometimes", "kinds"),))


_FACTS = _Facts(version="5.24", moe="deepseek", moe_family="glm4_moe",
                moe_keys=(("num_experts", "n_experts"), ("experts_per_token", "top_k"),
                          ("moe_intermediate_size", "expert_width"), ("shared_experts", "n_shared")),
                moe_rule=(("ge", "first_dense"),))


def test_recipe_reads_moe_sizes_from_its_keys() -> None:
    spec = _llama_like(_Cfg(_BASE, "x"), "x_moe", _FACTS)
    assert (spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size) == (8, 2, 32)
    assert spec.shared_expert_intermediate_size == 32  # one expert-wide shared expert
    assert spec.moe_layers == (2, 3, 4, 5)
    # the program's flags are the block family's (DeepSeek-V3's fp32 sigmoid router)
    assert spec.router_fp32 and spec.router_sigmoid and not spec.shared_expert_first
    dense = _llama_like(_Cfg({**_BASE, "first_dense": 6}, "x"), "x_moe", _FACTS)
    per_expert = 3 * 64 * 32
    assert count_params(spec).total - count_params(dense).total == 4 * (
        8 * per_expert + 64 * 8 + per_expert - 3 * 64 * 96)


def test_recipe_qwen2_moe_block_flags_follow_the_block_family() -> None:
    facts = _Facts(version="5.24", moe="qwen", moe_family="qwen2_moe",
                   moe_keys=(("num_experts", "n_experts"), ("experts_per_token", "top_k"),
                             ("moe_intermediate_size", "expert_width"),
                             ("shared_expert_intermediate_size", "intermediate_size")),
                   moe_rule=(("all",),))
    spec = _llama_like(_Cfg(_BASE, "x"), "x_moe", facts)
    assert spec.shared_expert_gate and spec.shared_expert_first and spec.shared_expert_intermediate_size == 96
    assert spec.moe_layers == tuple(range(6))


def _first_moe_block(model_type: str) -> tuple[Any, Any, dict[str, Any]]:
    from vramplan.derive._compose import _layers, _moe_child, _record
    from vramplan.derive._derive import _build, _variants

    d = _variants(model_type)[0][1]
    model = _build(model_type, d, "eager", meta=False)
    rec = _record(model)
    for i, layer in enumerate(_layers(model)):
        child = _moe_child(layer)
        if child is not None:
            return child[1], rec.inputs[f"L{i}.{child[0]}"], d
    raise AssertionError("no MoE layer")


@pytest.mark.slow
def test_compose_finds_the_moe_keys_and_layer_rule() -> None:
    """Keys found by changing each candidate and watching the built model: Solar Open's shared expert is
    n_shared_experts expert-wide MLPs (not moe_intermediate_size, which also changes it); AFMoE's first
    num_dense_layers layers are dense."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _moe_layer_rule, _moe_size_keys
    from vramplan.derive._derive import _quiet, _variants

    with _quiet():
        v = _variants("solar_open")
        keys, err = _moe_size_keys("solar_open", v[0][1])
        assert not err and dict(keys)["shared_experts"] == "n_shared_experts"
        assert dict(keys)["num_experts"] == "n_routed_experts"
        v = _variants("afmoe")
        rule, err = _moe_layer_rule("afmoe", v[1][1])
        assert not err and rule == (("ge", "num_dense_layers"),)


@pytest.mark.slow
def test_moe_parts_of_a_block_no_family_has() -> None:
    """Laguna: sigmoid router without fp32 copy, shared expert before the routed ones, routed sum scaled in the
    block; HY-V3: routed and shared outputs added in fp32."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _moe_parts, _moe_sizes
    from vramplan.derive._derive import _quiet

    with _quiet():
        block, inputs, d = _first_moe_block("laguna")
        flags, err = _moe_parts(block, inputs, d, _moe_sizes(block, d["hidden_size"]) or {})
        assert not err
        assert flags["moe_output_scale"] and flags["shared_expert_first"] and flags["router_sigmoid"]
        assert not flags["router_fp32"]
        block, inputs, d = _first_moe_block("hy_v3")
        flags, err = _moe_parts(block, inputs, d, _moe_sizes(block, d["hidden_size"]) or {})
        assert not err and flags["moe_fp32_combine"] and flags["router_fp32"]


def test_rule_falls_back_when_the_per_layer_list_is_left_out() -> None:
    """A config.json without mlp_layer_types: transformers builds the list from other keys; the recipe's second
    rule (found on configs without the list) reads those."""
    from dataclasses import replace

    facts = replace(_FACTS, moe_rule=(("eq", "kinds", "sparse"),), moe_rule_default=(("ge", "first_dense"),))
    assert _llama_like(_Cfg(_BASE, "x"), "x_moe", facts).moe_layers == (1, 2, 4, 5)
    raw = {k: v for k, v in _BASE.items() if k != "kinds"}
    assert _llama_like(_Cfg(raw, "x"), "x_moe", facts).moe_layers == (2, 3, 4, 5)


def test_family_block_config_leaves_out_keys_the_type_sets_to_none() -> None:
    """Cohere2MoeConfig has rms_norm_eps = None (its norms are LayerNorms): Mixtral's strict config class refuses
    None for it, so the family's block is built with its own default for such keys (the block does not read them)."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _family_moe_config

    d = {"hidden_size": 64, "rms_norm_eps": None, "layer_norm_eps": 1e-5, "num_hidden_layers": 2}
    o = _family_moe_config("mixtral", d, {"num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 40,
                                         "shared": 0, "shared_gate": 0})
    assert o is not None and "rms_norm_eps" not in o and o["layer_norm_eps"] == 1e-5 and o["num_local_experts"] == 4


@pytest.mark.slow
def test_cohere2_moe_block_composes_with_a_top_k_first_router() -> None:
    """Cohere2MoeTopKRouter: top-k of the bf16 logits, then softmax over the k values, cast back to bf16 (no fp32
    routing weights, unlike Mixtral's); its experts are Mixtral's grouped_mm experts."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _moe_parts, _moe_sizes
    from vramplan.derive._derive import _quiet

    with _quiet():
        block, inputs, d = _first_moe_block("cohere2_moe")
        flags, err = _moe_parts(block, inputs, d, _moe_sizes(block, d["hidden_size"]) or {})
    assert not err, err
    assert flags["router_topk_first"] and flags["expert_glu"] == ""
    assert not flags["router_weights_fp32"] and not flags["router_fp32"] and not flags["router_sigmoid"]


def test_moe_only_recipe_refuses_dense_layers_and_unseen_layer_kinds() -> None:
    """A recipe derived on MoE-only stacks has never compared a dense MLP (Cohere2-MoE's prefix_dense layers and
    MiniMax M3's dense layers have their own widths and GLUs): a config that leaves a layer dense is refused, as is a
    layer_types entry the derivation never checked (MiniMax M3's sparse-indexer layers)."""
    from dataclasses import replace

    facts = replace(_FACTS, moe_rule=(("eq", "kinds", "sparse"),), moe_only=True,
                    layer_kinds=("full_attention",))
    sparse = {**_BASE, "kinds": ["sparse"] * 6, "layer_types": ["full_attention"] * 6}
    assert _llama_like(_Cfg(sparse, "x"), "x_moe", facts).moe_layers == tuple(range(6))
    with pytest.raises(ConfigError, match=r"layers \[0, 3\] have a dense MLP"):
        _llama_like(_Cfg({**sparse, "kinds": _BASE["kinds"]}, "x"), "x_moe", facts)
    with pytest.raises(ConfigError, match="minimax_m3_sparse"):
        _llama_like(_Cfg({**sparse, "layer_types": ["minimax_m3_sparse"] + ["full_attention"] * 5}, "x"), "x_moe",
                    facts)
    # without the facts (a recipe derived with dense layers, or an older one) both are read
    assert _llama_like(_Cfg({**sparse, "kinds": _BASE["kinds"]}, "x"), "x_moe",
                       replace(facts, moe_only=False)).moe_layers == (1, 2, 4, 5)


def test_clamped_shared_expert_is_one_fused_linear_pair() -> None:
    """MiniMaxM3VLDenseMLP as the shared expert: gate_up_proj (hidden x 2 width) and down_proj, the same parameters
    as a gated MLP; its program replays the clamped GLU on the fused output."""
    from dataclasses import replace

    from vramplan.api import estimate, make_workload
    from vramplan.params import mlp_linears

    facts = replace(_FACTS, moe_flags=(("router_sigmoid", True), ("shared_expert_first", True)))
    plain = _llama_like(_Cfg(_BASE, "x"), "x_moe", facts)
    clamped = _llama_like(_Cfg(_BASE, "x"), "x_moe",
                          replace(facts, moe_flags=(*facts.moe_flags, ("shared_expert_glu", "clamped"))))
    assert clamped.shared_expert_glu == "clamped" and count_params(clamped).total == count_params(plain).total
    assert ("shared_gate_up_proj", 64, 64, 1) in mlp_linears(clamped, True)
    w = make_workload(task="train", method="full", batch_size=2, seq_len=64, precision="bf16")
    # clamp (x2), gate * alpha, sigmoid, products and up + 1 hold more than act(gate) * up
    assert estimate(clamped, w).peak_allocated_bytes > estimate(plain, w).peak_allocated_bytes
