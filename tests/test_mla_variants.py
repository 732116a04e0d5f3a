"""MLA variants: A.X-K1 (a derived recipe: DeepSeek-V3 whose MoE block norms its output, ``moe_post_norm``),
A.X-K2 (DeepSeek-V3.2 with a gated query projection and gated RMSNorms) and Dots 3 Note's language model (MLA
with per-layer sizes on its sliding layers, a DSA indexer on the others, scaled latents and a per-head gate).
Readers, parameter counts against the meta-device model, the mechanisms' memory, and estimate against the
fake-tensor trace."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.memory import lora_targets
from vramplan.params import count_params

from .trace_match import assert_matches_trace, meta_parameters

_MLA = {"kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
        "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 2048, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "num_hidden_layers": 2,
        "mlp_layer_types": ["dense", "sparse"], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
AXK1: dict[str, Any] = {"model_type": "axk1", **_MLA}
AXK2: dict[str, Any] = {"model_type": "axk2", **_MLA, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 64,
                        "gated_norm_rank": 8}
_DOTS_BASE = {k: v for k, v in _MLA.items() if k not in ("n_group", "topk_group")}
DOTS3: dict[str, Any] = {
    "model_type": "dots3_note_text", **_DOTS_BASE, "q_lora_rank": 64, "head_dim": 64, "n_group": 1, "topk_group": 1,
    "index_n_heads": 4, "index_head_dim": 32, "index_topk": 64, "sliding_window": 64,
    "shared_experts_intermediate_size": 48, "layer_types": ["indexed_attention", "sliding_attention"],
    "per_layer_config": {"1": {"num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 96,
                               "qk_nope_head_dim": 48}}}
# without per_layer_config the config class puts its swa_* sizes on the sliding layers
DOTS3_SWA: dict[str, Any] = {k: v for k, v in DOTS3.items() if k != "per_layer_config"} | {
    "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "swa_kv_lora_rank": 96, "swa_q_lora_rank": 64,
    "swa_head_dim": 64, "swa_qk_nope_head_dim": 48, "swa_v_head_dim": 32}
CONFIGS = [AXK1, AXK2, DOTS3, DOTS3_SWA]
IDS = ["axk1", "axk2", "dots3_note_text", "dots3_note_text-swa"]


def test_axk1_reads_its_recipe_with_the_moe_output_norm() -> None:
    spec = spec_from_config(AXK1)
    assert spec.kv_lora_rank == 64 and spec.moe_layers == (1,) and spec.moe_post_norm
    assert spec.router_sigmoid and spec.shared_expert_intermediate_size == 64
    # the post norm is one hidden-sized weight per MoE layer, and one more norm in the MoE layer's program
    plain = replace(spec, moe_post_norm=False)
    assert count_params(spec).total - count_params(plain).total == spec.hidden_size
    w = make_workload(batch_size=1, seq_len=512)

    def fwd(s: Any) -> int:
        return int(next(p for p in estimate(s, w).phases if p.phase.value == "forward").peak_allocated_bytes)

    assert fwd(spec) > fwd(plain)


def test_axk2_reads_the_gates() -> None:
    spec = spec_from_config(AXK2)
    assert spec.mla_q_gate and spec.gated_norm_rank == 8 and spec.index_heads == 4 and spec.moe_layers == (1,)
    # peft's all-linear adapts the gated norms' fc1 / fc2 and the fused q_gate_proj (no q_b_proj)
    names = lora_targets(spec, ("all-linear",))
    assert {"fc1", "fc2", "q_gate_proj"} <= names and "q_b_proj" not in names
    with pytest.raises(ConfigError, match="q_lora_rank"):
        spec_from_config(AXK2 | {"q_lora_rank": None})


def test_axk2_gates_keep_fp32_tensors() -> None:
    """The gated norm's fp32 sigmoid and product and the attention's fp32 output gate add saved activations."""
    spec = spec_from_config(AXK2)
    w = make_workload(batch_size=1, seq_len=512)

    def fwd(s: Any) -> int:
        return int(next(p for p in estimate(s, w).phases if p.phase.value == "forward").peak_allocated_bytes)

    assert fwd(spec) > fwd(replace(spec, gated_norm_rank=0)) > fwd(replace(spec, gated_norm_rank=0, mla_q_gate=False))


def test_dots3_reads_its_per_layer_mla() -> None:
    spec = spec_from_config(DOTS3)
    full, swa = spec.layer(0), spec.layer(1)
    assert (full.num_heads, full.kv_lora_rank, full.head_dim, full.index_heads) == (4, 64, 48, 4)
    assert (swa.num_heads, swa.kv_lora_rank, swa.head_dim, swa.index_heads) == (2, 96, 64, 0)
    assert spec.sliding_layers == (1,) and spec.sliding_window == 64 and spec.mla_head_gate == "native"
    assert spec.shared_expert_intermediate_size == 48 and spec.moe_layers == (1,)
    # the cache holds each layer's own latent and rotary key
    assert spec.kv_cache_layers_per_token == (64 + 16) + (96 + 16)
    with pytest.raises(ConfigError, match="v_head_dim"):
        spec_from_config(DOTS3 | {"per_layer_config": {"1": {"v_head_dim": 64}}})
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config(DOTS3 | {"layer_types": ["indexed_attention", "mamba"]})


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_parameters_equal_the_meta_model(cfg: dict[str, Any]) -> None:
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


WORKLOADS = {
    "full": {"batch_size": 2, "seq_len": 256},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True,
             "lora_targets": "all-linear"},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "wname"), [(AXK1, "full"), (AXK1, "lora"), (AXK1, "infer"), (AXK2, "full"),
                                            (AXK2, "lora"), (DOTS3, "full"), (DOTS3, "lora")],
                         ids=["axk1-full", "axk1-lora", "axk1-infer", "axk2-full", "axk2-lora", "dots3-full",
                              "dots3-lora"])
def test_estimate_matches_trace(cfg: dict[str, Any], wname: str) -> None:
    """(A.X-K2's and Dots 3's decode cannot be traced: transformers 5.24's DSA indexer mask does not fit its
    cache.)"""
    assert_matches_trace(cfg, WORKLOADS[wname])
