"""Multi-head latent attention types other than DeepSeek-V3: DeepSeek-V2 (complex rotary, softmax router), GLM-4.7-Flash
(mlp_layer_types), MiniCPM3 (dense MLA with MiniCPM's scales), DeepSeek-V3.2 and GLM-5 (DSA indexer), and the
derivation's shrunk MLA variants."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate
from vramplan.catalog import get_model
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params
from vramplan.workload import Attention, Method, Task, Workload

_COMMON = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000,
               max_position_embeddings=4096, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
               v_head_dim=96)
MLA: dict[str, dict[str, Any]] = {
    # softmax router in fp32, complex fp32 rotary, q_proj without a low-rank pair (V2-Lite's q_lora_rank null)
    "deepseek_v2": dict(model_type="deepseek_v2", intermediate_size=1024, moe_intermediate_size=768,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                        q_lora_rank=None, **_COMMON),
    # DeepSeek-V3's MLA and MoE, the MoE layers from mlp_layer_types
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", intermediate_size=1024, moe_intermediate_size=768,
                          n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                          q_lora_rank=384, mlp_layer_types=["dense", "sparse"], **_COMMON),
    # dense MLA, embedding / residual scales, hidden states / logits_scaling before a tied lm_head
    "minicpm3": dict(model_type="minicpm3", intermediate_size=2048, q_lora_rank=384, scale_emb=12, scale_depth=1.4,
                     dim_model_base=256, **_COMMON),
}
_DSA = dict(intermediate_size=1024, moe_intermediate_size=768, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=384, index_n_heads=8,
            index_head_dim=64, index_topk=256, **_COMMON)
# DeepSeek Sparse Attention: the indexer's fp32 scores (and matmul's broadcast copy of its keys) dominate at 1-2K tokens
DSA: dict[str, dict[str, Any]] = {"deepseek_v32": dict(model_type="deepseek_v32", **_DSA),
                                  "glm_moe_dsa": dict(model_type="glm_moe_dsa", **_DSA)}
DSA_WORKLOADS = {
    "full": Workload(batch_size=2, seq_len=1024),
    "eager": Workload(batch_size=2, seq_len=1024, attention=Attention.EAGER),
    "lora-ckpt": Workload(method=Method.LORA, lora_targets=("kv_a_proj_with_mqa", "o_proj"), batch_size=4,
                          seq_len=2048, gradient_checkpointing=True),
    # prefill only: transformers 5.24's indexer cannot decode under the trace's generation loop (its 4-D mask spans
    # prompt + new tokens, the indexer's key cache only the tokens seen)
    "prefill": Workload(task=Task.INFER, batch_size=4, seq_len=2048, new_tokens=1),
}
WORKLOADS = {
    "full": Workload(batch_size=2, seq_len=1024),
    "lora-ckpt": Workload(method=Method.LORA, lora_targets=("kv_a_proj_with_mqa", "o_proj"), batch_size=4,
                          seq_len=2048, gradient_checkpointing=True),
    "infer": Workload(task=Task.INFER, batch_size=4, seq_len=2048, new_tokens=8),
}


def _meta_params(cfg: dict[str, Any]) -> int:
    torch = pytest.importorskip("torch")
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = CONFIG_MAPPING[cfg["model_type"]].from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(MLA))
def test_parameters_equal_the_meta_device_model(family: str) -> None:
    cfg = MLA[family]
    assert count_params(spec_from_config(cfg, name=family)).total == _meta_params(cfg)


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "minicpm3-4b", "glm-4.7-flash"])
def test_catalog_entries_build_with_their_counts(name: str) -> None:
    entry = get_model(name)
    assert _meta_params(entry.config_dict()) == entry.params == count_params(entry.spec).total


# one quick case runs in the default suite; the rest are slow
_CASES = [pytest.param(f, w, marks=() if (f, w) == ("deepseek_v2", "infer") else pytest.mark.slow)
          for f in sorted(MLA) for w in sorted(WORKLOADS)]


@pytest.mark.parametrize(("family", "wname"), _CASES)
def test_mla_estimate_matches_trace(family: str, wname: str) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    cfg, w = MLA[family], WORKLOADS[wname]
    traced = trace_workload(cfg, w, name=family).peak_allocated_bytes
    est = estimate(spec_from_config(cfg, name=family), w).peak_allocated_bytes
    assert abs(est / traced - 1) < 0.02, f"{family} {wname}: estimate {est / 2**30:.3f} vs trace {traced / 2**30:.3f}"


@pytest.mark.parametrize(("family", "wname"), [
    pytest.param(f, w, marks=() if (f, w) == ("deepseek_v32", "full") else pytest.mark.slow)
    for f in sorted(DSA) for w in sorted(DSA_WORKLOADS)])
def test_dsa_estimate_matches_trace(family: str, wname: str) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    cfg, w = DSA[family], DSA_WORKLOADS[wname]
    traced = trace_workload(cfg, w, name=family).peak_allocated_bytes
    est = estimate(spec_from_config(cfg, name=family), w).peak_allocated_bytes
    assert abs(est / traced - 1) < 0.02, f"{family} {wname}: estimate {est / 2**30:.3f} vs trace {traced / 2**30:.3f}"


@pytest.mark.parametrize("family", sorted(DSA))
def test_dsa_parameters_and_refusals(family: str) -> None:
    """The indexer's wq_b, wk, weights_proj and k_norm (a LayerNorm with a bias) are counted; GLM-5's "shared" indexer
    layers, which reuse the previous layer's top-k, are refused with what to do."""
    cfg = DSA[family]
    spec = spec_from_config(cfg, name=family)
    assert count_params(spec).total == _meta_params(cfg)
    assert spec.index_heads == 8 and spec.index_head_dim == 64 and spec.index_topk == 256
    assert {"wq_b", "wk", "weights_proj"} <= {n for n, *_ in spec_layer_linears(spec)}
    from vramplan.errors import ConfigError

    with pytest.raises(ConfigError, match="shared"):
        spec_from_config({**cfg, "indexer_types": ["full", "shared"]}, name=family)


def test_dsa_indexer_scores_grow_with_the_square_of_the_context() -> None:
    """The indexer's transient (B, S, D_idx, T) fp32 key copy and (B, S, H_idx, T) scores: a prefill at 4x the tokens
    adds about 16x that term, so the prefill peak grows much faster than the MLA cache."""
    spec = spec_from_config(DSA["deepseek_v32"], name="deepseek_v32")
    small = estimate(spec, Workload(task=Task.INFER, batch_size=1, seq_len=1024, new_tokens=1)).peak_allocated_bytes
    big = estimate(spec, Workload(task=Task.INFER, batch_size=1, seq_len=4096, new_tokens=1)).peak_allocated_bytes
    key_copy = 4096 * 64 * 4096 * 4  # (S, D_idx, T) fp32 at 4096 tokens
    assert big - small > key_copy


def spec_layer_linears(spec: Any) -> list[tuple[str, int, int, int]]:
    from vramplan.params import attention_linears

    return attention_linears(spec)


def test_mlp_layer_types_decide_the_moe_layers() -> None:
    """Glm4MoeLiteDecoderLayer builds a MoE block where mlp_layer_types says "sparse"; the config's default is layer 0
    dense and the rest sparse, whatever first_k_dense_replace says (transformers does not read it)."""
    cfg = {**MLA["glm4_moe_lite"], "num_hidden_layers": 4}
    given = spec_from_config({**cfg, "mlp_layer_types": ["sparse", "dense", "sparse", "dense"]})
    assert given.moe_layers == (0, 2)
    default = spec_from_config({**{k: v for k, v in cfg.items() if k != "mlp_layer_types"},
                                "first_k_dense_replace": 3})
    assert default.moe_layers == (1, 2, 3)
    from vramplan.errors import ConfigError

    with pytest.raises(ConfigError, match="mlp_layer_types"):
        spec_from_config({**cfg, "mlp_layer_types": ["dense", "sparse"]})


def test_deepseek_v2_rotary_and_router_facts() -> None:
    spec = spec_from_config(MLA["deepseek_v2"])
    assert spec.rope_style == "complex" and spec.kv_lora_rank == 256 and spec.q_lora_rank == 0
    assert spec.router_fp32 and spec.router_weights_fp32 and not spec.router_sigmoid
    assert spec.moe_layers == (1,) and spec.shared_expert_intermediate_size == 2 * 768


def test_minicpm3_scales() -> None:
    """MiniCPM3 scales the embeddings, each residual branch, and the final hidden states (not the logits) before
    lm_head: no logits-sized tensor beyond the head's own."""
    spec = spec_from_config(MLA["minicpm3"])
    assert spec.embed_scale and spec.residual_scale and spec.head_input_scale and not spec.logit_scale
    assert spec.tie_word_embeddings and spec.v_head_dim == 96
    # v_head_dim absent: MiniCPM3Config takes hidden_size // heads
    no_v = spec_from_config({k: v for k, v in MLA["minicpm3"].items() if k != "v_head_dim"})
    assert no_v.v_head_dim == 1024 // 8


def test_shrunk_mla_variants_are_consistent() -> None:
    """The derivation's shrunk configs keep MLA's k/v heads equal to the query heads (kv_b_proj expands every head:
    a grouped variant makes repeat_kv fail), head_dim equal to the rotary part and qk_head_dim = nope + rope, as the
    config classes set them; the two widths use different MLA sizes."""
    pytest.importorskip("torch")
    from vramplan.derive._derive import _variants

    for t in ("youtu", "minicpm3", "deepseek_v3"):
        variants = dict(_variants(t))
        sizes = set()
        for d in (variants["default"], variants["widths"]):
            assert d["num_key_value_heads"] == d["num_attention_heads"]
            assert d["head_dim"] == d["qk_rope_head_dim"]
            assert d["qk_head_dim"] == d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
            sizes.add((d["q_lora_rank"], d["kv_lora_rank"], d["qk_nope_head_dim"], d["qk_rope_head_dim"],
                       d["v_head_dim"]))
        assert len(sizes) == 2
    # a grouped-query default keeps its grouped variant
    llama = dict(_variants("mistral"))["default"]
    assert llama["num_key_value_heads"] < llama["num_attention_heads"]
