"""General mechanisms of the part-by-part composition (``vramplan.derive._compose``) and the program facts they
produce: mask builds compared in a fixed order, the concatenating rotary application, block flags a config key
switches, a shared expert with biases, the fp32-product RMSNorm, dropouts a family adds from its own defaults."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.hfconfig import _Cfg, _Facts, _llama_like
from vramplan.params import count_params

_BASE: dict[str, Any] = dict(model_type="x_moe", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, intermediate_size=96, n_experts=8, top_k=2,
                             expert_width=32, n_shared=1, fp32_combine=True, mlp_bias=False)
_FACTS = _Facts(version="5.24", moe="composed",
                moe_keys=(("num_experts", "n_experts"), ("experts_per_token", "top_k"),
                          ("moe_intermediate_size", "expert_width"), ("shared_experts", "n_shared")),
                moe_rule=(("all",),),
                moe_flags=(("moe_fp32_combine", "config:fp32_combine"), ("router_sigmoid", True),
                           ("shared_expert_bias", "config:mlp_bias")))


def test_canonical_outside_orders_mask_builds() -> None:
    """Masks built for set(layer_types) come in string-hash order: two runs that differ only in that order compare
    equal; ops outside mask builds keep their places."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _canonical_outside

    full = [("aten.le", 1), ("aten.where", 2)]
    sliding = [("aten.new_ones", 3), ("aten.sub", 4), ("aten.gt", 5)]
    a_ops = [("embed", 0), *full, *sliding, ("rotary", 9)]
    a_tags = [None, *[("create_causal_mask", 1)] * 2, *[("create_sliding_window_causal_mask", 2)] * 3, None]
    b_ops = [("embed", 0), *sliding, *full, ("rotary", 9)]
    b_tags = [None, *[("create_sliding_window_causal_mask", 7)] * 3, *[("create_causal_mask", 8)] * 2, None]
    assert a_ops != b_ops
    assert _canonical_outside(a_ops, a_tags) == _canonical_outside(b_ops, b_tags)
    # a non-mask op between two builds is a boundary: the builds on either side are not swapped across it
    c_ops = [*full, ("embed", 0), *sliding]
    c_tags = [*[("create_causal_mask", 1)] * 2, None, *[("create_sliding_window_causal_mask", 2)] * 3]
    d_ops = [*sliding, ("embed", 0), *full]
    d_tags = [*[("create_sliding_window_causal_mask", 2)] * 3, None, *[("create_causal_mask", 1)] * 2]
    assert _canonical_outside(c_ops, c_tags) != _canonical_outside(d_ops, d_tags)


def test_mask_call_names_the_outermost_mask_build() -> None:
    pytest.importorskip("torch")
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    from vramplan.derive._compose import _Recorder

    class _M(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x

    cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=10)
    cfg._attn_implementation = "eager"
    m = torch.nn.Module()
    m.model = torch.nn.Module()  # type: ignore[assignment]
    m.model.layers = torch.nn.ModuleList()  # type: ignore[assignment]
    rec = _Recorder(m)
    emb = torch.zeros(1, 5, 16)
    with rec:
        _ = emb + 1
        create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None,
                           position_ids=torch.arange(5)[None])
    rec.close()
    tags = rec.outside_tags
    assert tags[0] is None and len(tags) > 1
    assert {t[0] for t in tags[1:] if t is not None} == {"create_causal_mask"}


def test_rope_cat_reference_computes_like_glm4_moe() -> None:
    """The concatenating application built on LLaMA's apply_rotary_pos_emb dispatches the ops GLM-4.5's own does
    at full rotary (two copies more than LLaMA's)."""
    pytest.importorskip("torch")
    import torch
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb as glm
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama

    from vramplan.derive._compose import _apply_rope_cat
    from vramplan.derive._derive import _OpLog

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)

    def ops(fn: Any) -> list[Any]:
        with _OpLog() as log:
            fn(q, k, cos, sin)
        return log.ops

    assert ops(_apply_rope_cat(llama)) == ops(glm)
    assert len(ops(glm)) == len(ops(llama)) + 2


def test_rope_cat_program_copies_q_and_k() -> None:
    """At full rotary the concatenating application still copies the rotated q (a tensor of q's size more)."""
    from vramplan._engine.tape import Tape
    from vramplan.blocks import _B, LayerPlan
    from vramplan.estimator import numerics
    from vramplan.workload import Workload

    raw = dict(model_type="x", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=1000, intermediate_size=512)
    plain = _llama_like(_Cfg(raw, "x"), "x", _Facts(version="5.24"))
    cat = _llama_like(_Cfg(raw, "x"), "x", _Facts(version="5.24", rope_cat=True, partial_rotary=True))
    assert cat.rope_cat and not plain.rope_cat and cat.rotary_fraction == 1.0
    w = Workload()

    def rope_ops(spec: Any) -> list[int]:
        plan = LayerPlan(trainable=True, input_rg=True, lora_targets=frozenset(), lora_rank=16, quant=w.base_quant,
                         attention=w.attention)
        tp = Tape(True)
        bld = _B(tp, spec, numerics(w), 1, 16, plan)
        x = tp.input(16 * spec.q_dim, 2, True)
        n = len(tp.ops)
        bld.rope(x)
        return [t.numel for op in tp.ops[n:] for t in op.outputs]

    assert rope_ops(cat) == [*rope_ops(plain), 16 * 256]


def test_block_flags_follow_config_keys() -> None:
    spec = _llama_like(_Cfg(_BASE, "x"), "x_moe", _FACTS)
    assert spec.moe_fp32_combine and spec.router_sigmoid and not spec.shared_expert_bias
    off = _llama_like(_Cfg({**_BASE, "fp32_combine": False, "mlp_bias": True}, "x"), "x_moe", _FACTS)
    assert not off.moe_fp32_combine and off.shared_expert_bias
    neg = replace(_FACTS, moe_flags=(("moe_fp32_combine", "config:!fp32_combine"),))
    assert not _llama_like(_Cfg(_BASE, "x"), "x_moe", neg).moe_fp32_combine
    # the shared expert's biases: gate, up (32 each) and down (64) on each of the 4 MoE layers
    assert count_params(off).total - count_params(spec).total == 4 * (32 + 32 + 64) + 4 * (96 + 96 + 64) * 0


def test_keyed_flags_from_variants() -> None:
    pytest.importorskip("torch")
    from vramplan.derive._compose import _keyed_flags

    base = (("moe_fp32_combine", True), ("router_sigmoid", True), ("shared_expert_bias", False))
    parts = [("default", base, ""), ("widths", base, ""),
             ("enable_fp32=False", (("moe_fp32_combine", False), ("router_sigmoid", True),
                                    ("shared_expert_bias", False)), ""),
             ("mlp_bias=True", (("moe_fp32_combine", True), ("router_sigmoid", True), ("shared_expert_bias", True)),
              "")]
    flags, err = _keyed_flags(parts)
    assert not err
    assert dict(flags) == {"moe_fp32_combine": "config:enable_fp32", "router_sigmoid": True,
                           "shared_expert_bias": "config:mlp_bias"}
    # a difference on a variant that flips no key (other widths) is refused
    _, err = _keyed_flags([("default", base, ""), ("widths", (("router_sigmoid", True),), "")])
    assert "differ between variants" in err


def test_fp32_weight_rmsnorm_is_recognised() -> None:
    """AFMoE's / Beam's RMSNorm ((weight * fp32 states).to(dtype)) reads as NormKind.FP32_WEIGHT_RMSNORM; LLaMA's
    stays rmsnorm."""
    pytest.importorskip("torch")
    import torch
    from transformers.models.afmoe.modeling_afmoe import AfmoeRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from vramplan.derive._compose import _classify_norm

    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert _classify_norm(AfmoeRMSNorm(16).to(torch.bfloat16), ((x,), {})) == ("rmsnorm_fp32_weight", False)
    assert _classify_norm(LlamaRMSNorm(16).to(torch.bfloat16), ((x,), {})) == ("rmsnorm", False)


def test_family_dropout_defaults_are_not_added() -> None:
    pytest.importorskip("torch")
    from vramplan.derive._compose import _no_foreign_dropout

    # SeedOssConfig's residual_dropout (0.1) is not in a type's config that has no such dropout
    assert _no_foreign_dropout("seed_oss", {"attention_dropout": 0.0}) == {"residual_dropout": 0.0}
    assert _no_foreign_dropout("seed_oss", {"attention_dropout": 0.0, "residual_dropout": 0.2}) == {}


def test_lm_head_bias_key() -> None:
    pytest.importorskip("torch")
    from vramplan.derive._compose import _bias_key

    assert _bias_key({"default": False, "widths": False, "lm_head_bias=True": True}) == "lm_head_bias"
    assert _bias_key({"default": True, "widths": True}) == ""
    assert _bias_key({"default": True, "widths": False}) is None  # on a variant that flips no key
    facts = _Facts(version="5.24", lm_head_bias_key="lm_head_bias")
    raw = dict(model_type="x", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
               intermediate_size=96)
    on, off = (_llama_like(_Cfg({**raw, "lm_head_bias": b}, "x"), "x", facts) for b in (True, False))
    assert on.lm_head_bias and not off.lm_head_bias
    assert count_params(on).total - count_params(off).total == 100


def test_rotary_tables_leave_out_per_frequency_ops() -> None:
    """PhimoeRotaryEmbedding recomputes inv_freq and takes max(position_ids) on every call: ops on scalars and on
    the (head_dim / 2,) frequencies are not compared; the per-position tables are."""
    pytest.importorskip("torch")
    from vramplan.derive._compose import _SEQ, _rotary_tables

    class _Rec:
        def __init__(self, ops: list[Any]) -> None:
            self.buckets = {"rotary": ops}

    table = ("aten.cos.default", (((1, _SEQ, 16), "torch.float32"),))
    freq = ("aten.pow.Scalar", (((8,), "torch.float32"),))
    scalar = ("aten.max.default", (((), "torch.int64"),))
    assert _rotary_tables(_Rec([scalar, freq, table])) == _rotary_tables(_Rec([table])) == [table]  # type: ignore[arg-type]


def test_attention_matches_finds_the_concatenating_rotary() -> None:
    """GLM-4.5's attention at full rotary (no q/k norm) computes as LLaMA's with the concatenating application;
    LLaMA's own computes as LLaMA's; Qwen 3's (q/k norms) as neither."""
    pytest.importorskip("torch")
    import torch

    from vramplan.derive._compose import _attention_matches, _layers, _record
    from vramplan.derive._derive import _build, _quiet

    d = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=88,
             moe_intermediate_size=40, num_hidden_layers=1, first_k_dense_replace=1, vocab_size=131,
             n_routed_experts=4, num_experts_per_tok=2, partial_rotary_factor=1.0, max_position_embeddings=64,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    with _quiet(), torch.no_grad():
        glm = _build("glm4_moe", d, "eager", meta=False)
        llama = _build("llama", d, "eager", meta=False)
        qwen = _build("qwen3", d, "eager", meta=False)
        rec_glm, rec_llama = _record(glm), _record(llama)
        assert _attention_matches(_layers(glm), rec_glm, _layers(llama))[0] is True
        assert _attention_matches(_layers(llama), rec_llama, _layers(llama))[0] is False
        assert _attention_matches(_layers(llama), rec_llama, _layers(qwen))[0] is None


def test_moe_rule_with_a_constant_dense_prefix() -> None:
    """HYV3Config fills a missing mlp_layer_types with one dense layer and sparse ones: the default rule is the
    constant ``ge #1``."""
    from vramplan.hfconfig import _moe_rule

    assert _moe_rule(_Cfg({"num_hidden_layers": 4}, "x"), (("ge", "#1"),), 4) == (1, 2, 3)
    assert _moe_rule(_Cfg({"k": 2}, "x"), (("ge", "k"),), 4) == (2, 3)


def test_shrink_keeps_grouped_kv_grouped() -> None:
    """The shrunk variants keep a grouped default grouped, judged on the default's own head counts: MiMo-V2-Flash's
    4 KV heads of 64 stay fewer than the shrunk query heads (4), so its sliding layers' doubled KV heads still divide
    them; a default with as many KV heads as query heads (LLaMA) stays so."""
    pytest.importorskip("transformers")
    from vramplan.derive._derive import _VARIANTS, _shrink

    grouped = {"num_attention_heads": 64, "num_key_value_heads": _VARIANTS[0]["heads"], "hidden_size": 4096}
    assert _shrink(grouped, _VARIANTS[0], False)["num_key_value_heads"] == _VARIANTS[0]["kv"]
    full = {"num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4096}
    assert _shrink(full, _VARIANTS[0], False)["num_key_value_heads"] == _VARIANTS[0]["heads"]
