"""Attention output gates and the type's own q/k norms in the part-by-part composition (``vramplan.derive._compose``),
the gate's memory program and parameters, and the fp32 scores of a sigmoid router with fp32 routing weights."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.hfconfig import _Cfg, _Facts, _llama_like
from vramplan.params import count_params

_RAW: dict[str, Any] = dict(model_type="x", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1000, intermediate_size=512, gating=True)
_GATE = _Facts(version="5.24", qk_norm="head", attn_gate="softplus_fp32", attn_gate_heads=True, attn_gate_name="g_proj",
               attn_gate_heads_key="gating")


def _layer_ops(spec: Any, training: bool = True) -> list[tuple[int, int]]:
    """(numel, elem) of every tensor one attention block's program makes, batch 1 x 16."""
    from vramplan._engine.tape import Tape
    from vramplan.blocks import _B, LayerPlan
    from vramplan.estimator import numerics
    from vramplan.workload import Workload

    w = Workload()
    plan = LayerPlan(trainable=True, input_rg=True, lora_targets=frozenset(), lora_rank=16, quant=w.base_quant,
                     attention=w.attention)
    tp = Tape(training)
    bld = _B(tp, spec, numerics(w), 1, 16, plan)
    x = tp.input(16 * spec.hidden_size, 2, True)
    bld.self_attention(x)
    return [(t.numel, t.elem) for op in tp.ops for t in op.outputs]


def test_gate_reader_and_parameters() -> None:
    spec = _llama_like(_Cfg(_RAW, "x"), "x", _GATE)
    assert spec.attn_gate == "softplus_fp32" and spec.attn_gate_heads and spec.attn_gate_name == "g_proj"
    plain = _llama_like(_Cfg(_RAW, "x"), "x", replace(_GATE, attn_gate=""))
    # one bias-free linear hidden -> heads per layer
    assert count_params(spec).total - count_params(plain).total == 2 * 256 * 4
    # gating false: one gate per channel (heads x head_dim)
    full = _llama_like(_Cfg({**_RAW, "gating": False}, "x"), "x", _GATE)
    assert not full.attn_gate_heads
    assert count_params(full).total - count_params(plain).total == 2 * 256 * 256
    # a per-head gate bias (modeling_beam.py gate_bias)
    beam = _llama_like(_Cfg(_RAW, "x"), "x", replace(_GATE, attn_gate="sigmoid", attn_gate_bias=True))
    assert count_params(beam).total - count_params(spec).total == 2 * 4
    from vramplan.errors import ConfigError

    with pytest.raises(ConfigError, match="gating"):
        _llama_like(_Cfg({**_RAW, "gating": "per-element"}, "x"), "x", _GATE)


def test_gate_program_tensors() -> None:
    """The gate adds its projection, the activation (fp32 copy, fp32 softplus, cast back for Laguna's) and the
    product at the attention output's size; an ungated attention has none of them."""
    t = 16
    plain = _llama_like(_Cfg(_RAW, "x"), "x", replace(_GATE, attn_gate=""))
    soft = _llama_like(_Cfg(_RAW, "x"), "x", _GATE)
    extra = list(_layer_ops(soft))
    for op in _layer_ops(plain):
        extra.remove(op)
    assert sorted(extra) == sorted([(t * 4, 2), (t * 4, 4), (t * 4, 4), (t * 4, 2), (t * 256, 2)])
    sig = _llama_like(_Cfg({**_RAW, "gating": False}, "x"), "x", replace(_GATE, attn_gate="sigmoid",
                                                                        attn_gate_early=True))
    extra = list(_layer_ops(sig))
    for op in _layer_ops(plain):
        extra.remove(op)
    assert sorted(extra) == sorted([(t * 256, 2)] * 3)  # projection, sigmoid, product


def test_gate_facts_follow_a_flipped_key() -> None:
    pytest.importorskip("torch")
    from vramplan.derive._compose import _gate_facts

    g = (("attn_gate", "softplus_fp32"), ("attn_gate_bias", False), ("attn_gate_early", False),
         ("attn_gate_heads", True), ("attn_gate_name", "g_proj"))
    off = tuple((k, False if k == "attn_gate_heads" else v) for k, v in g)
    facts, err = _gate_facts({"default": {g}, "widths": {g}, "gating=False": {off}})
    assert not err and dict(facts)["attn_gate_heads_key"] == "gating" and dict(facts)["attn_gate_heads"]
    assert _gate_facts({"default": {g}, "widths": {off}})[1]  # a width change on no boolean flip: refused
    assert _gate_facts({"default": {g, off}})[1]  # layers that differ: refused
    assert _gate_facts({"default": {()}, "widths": {()}}) == ((), "")


def test_sigmoid_router_with_fp32_weights_scores_in_fp32() -> None:
    """MiniMaxM2TopKRouter: sigmoid(router_logits.float()): the scores are fp32 (t x experts), and so are the weights
    that reach the experts (the weighted expert outputs are then fp32)."""
    from vramplan._engine.tape import Tape
    from vramplan.blocks import _B, LayerPlan
    from vramplan.estimator import numerics
    from vramplan.workload import Workload

    facts = _Facts(version="5.24", moe="composed", moe_rule=(("all",),),
                   moe_keys=(("num_experts", "n_experts"), ("experts_per_token", "top_k"),
                             ("moe_intermediate_size", "expert_width")),
                   moe_flags=(("router_sigmoid", True), ("router_weights_fp32", True)))
    raw = {**_RAW, "n_experts": 8, "top_k": 2, "expert_width": 64}
    spec = _llama_like(_Cfg(raw, "x"), "x", facts)
    w = Workload()
    plan = LayerPlan(trainable=True, input_rg=True, lora_targets=frozenset(), lora_rank=16, quant=w.base_quant,
                     attention=w.attention)
    tp = Tape(True)
    bld = _B(tp, spec, numerics(w), 1, 16, plan)
    _idx, wts = bld.router(tp.input(16 * 256, 2, True), 16, 8, 2, True)
    assert wts.elem == 4
    assert (16 * 8, 4) in [(t.numel, t.elem) for op in tp.ops for t in op.outputs]  # the fp32 scores


# ---- against the installed transformers (needs torch) -------------------------------------------------------

_SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=88,
              moe_intermediate_size=40, num_hidden_layers=1, vocab_size=131, num_experts=4, num_local_experts=4,
              num_experts_per_tok=2, max_position_embeddings=64, mlp_only_layers=[0], mlp_layer_types=["dense"],
              layer_types=["full_attention"], num_attention_heads_per_layer=[4])


def _attn(model: Any) -> Any:
    from vramplan.derive._compose import _child, _layers

    return _child(_layers(model)[0], "attn")[1]


def test_minimax_m2_qk_norms_are_adopted_and_classified() -> None:
    """MiniMax-M2's q/k norms span all heads, as OLMoE's: compared with OLMoE's attention (the concatenating rotary
    application), they are classified LLaMA-style RMSNorms."""
    torch = pytest.importorskip("torch")
    from vramplan.derive._compose import _attn_compare, _moe_attention_config, _record
    from vramplan.derive._derive import _build, _quiet

    d = {**_SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    with _quiet(), torch.no_grad():
        mm = _build("minimax_m2", d, "eager", meta=False)
        rec = _record(mm)
        key = next(k for k in rec.inputs if k.endswith("self_attn"))
        fd = _moe_attention_config("olmoe", d)
        assert fd is not None
        olmoe = _build("olmoe", fd, "eager", meta=False)
        cat, why, gate, kinds, nope = _attn_compare(_attn(mm), _attn(olmoe), rec.inputs[key], rec.buckets[key])
        assert cat is True and not nope, why
        assert gate == ()
        assert kinds == {("rmsnorm", False)}


def test_recipes_of_the_gated_types_read() -> None:
    """The shipped recipes of the types this composition answers read and count their parameters."""
    from vramplan.recipes import recipe_for

    for t in ("minimax_m2", "laguna"):
        r = recipe_for(t)
        assert r is not None, t


def test_packed_sequence_check_is_left_out_of_the_outside_ops() -> None:
    """LLaMA passes position_ids to its mask builder (masking_utils runs find_packed_sequence_indices on them), Mistral
    does not: without a sliding window both build the same causal mask, and their ops outside the layers compare
    equal once the packed-sequence check's (batch, seq) integers are left out."""
    torch = pytest.importorskip("torch")
    from vramplan.derive._compose import _record
    from vramplan.derive._derive import _build, _quiet

    d = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=88,
             num_hidden_layers=1, vocab_size=131, max_position_embeddings=64, sliding_window=None)
    with _quiet(), torch.no_grad():
        llama, mistral = _record(_build("llama", d, "eager", meta=False)), _record(_build("mistral", d, "eager",
                                                                                           meta=False))
    assert llama.outside() == mistral.outside()
    assert not any(op[0] == "aten.diff.default" or op[0] == "aten.cumsum.default" for op in llama.outside())


def test_scaled_embedding_and_o_proj_bias() -> None:
    torch = pytest.importorskip("torch")
    from vramplan.derive._compose import _bias_o_proj, _scaled_embedding

    emb = ("aten.embedding.default", (((2, 12, 64), "torch.bfloat16"),))
    mask = ("aten.where.self", (((2, 1, 12, 12), "torch.bfloat16"),))
    mul = ("aten.mul.Tensor", (((2, 12, 64), "torch.bfloat16"),))
    head = ("aten.mm.default", (((24, 131), "torch.bfloat16"),))
    assert _scaled_embedding([emb, mask, mul, head], [emb, mask, head], 64)
    assert not _scaled_embedding([emb, mask, mul, head], [emb, mask, head], 96)  # not the embeddings' width
    assert not _scaled_embedding([mul, emb, mask, head], [emb, mask, head], 64)  # before the embedding
    assert not _scaled_embedding([emb, mask, mul, mul, head], [emb, mask, head], 64)

    class _Attn(torch.nn.Module):
        def __init__(self, bias: bool) -> None:
            super().__init__()
            self.o_proj = torch.nn.Linear(8, 8, bias=bias)

    theirs = _Attn(False)
    assert _bias_o_proj(_Attn(True), theirs) and theirs.o_proj.bias is not None
    assert not _bias_o_proj(_Attn(False), _Attn(False))


def test_rotary_fraction_per_layer_type_and_uniform_head_lists() -> None:
    """Laguna's rope_parameters per layer type: the fraction of the layer types in use (the largest where they
    differ); a per-layer head list that repeats num_attention_heads reads, one that differs is refused."""
    from vramplan.errors import ConfigError
    from vramplan.hfconfig import _rotary_fraction

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}}
    assert _rotary_fraction(_Cfg({"rope_parameters": rope, "layer_types": ["full_attention"] * 2}, "x")) == 0.5
    assert _rotary_fraction(_Cfg({"rope_parameters": rope, "layer_types": ["full_attention",
                                                                           "sliding_attention"]}, "x")) == 1.0
    facts = _Facts(version="5.24", uniform_keys=(("num_attention_heads_per_layer", "num_attention_heads"),))
    assert _llama_like(_Cfg({**_RAW, "num_attention_heads_per_layer": [4, 4]}, "x"), "x", facts).num_heads == 4
    with pytest.raises(ConfigError, match="num_attention_heads_per_layer"):
        _llama_like(_Cfg({**_RAW, "num_attention_heads_per_layer": [4, 8]}, "x"), "x", facts)


def test_shrunk_variants_keep_per_layer_head_lists_consistent() -> None:
    pytest.importorskip("torch")
    from vramplan.derive._derive import _VARIANTS, _shrink

    base = {"hidden_size": 2048, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
            "num_attention_heads_per_layer": [48, 48, 48], "other_list": [48, 48]}
    d = _shrink(base, _VARIANTS[0], False)
    assert d["num_attention_heads_per_layer"] == [_VARIANTS[0]["heads"]] * 3
    assert d["other_list"] == [48, 48]  # not a head count
