"""Kimi Delta Attention hybrids (vramplan.kda): Kimi Linear and Ling 3 (bailing_hybrid). Readers, parameter counts
against the meta-device model, the refused fla kernel, the per-channel decay tensors of transformers' fallback, and
estimate against the fake-tensor trace of that fallback."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kda import KDA_CHUNK
from vramplan.params import count_params
from vramplan.spec import PositionKind

from .trace_match import SMALL_WORKLOADS, assert_matches_trace, meta_parameters

_MLA = {"kv_lora_rank": 64, "q_lora_rank": None, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32}
_MOE = {"num_experts": 8, "num_experts_per_token": 2, "moe_intermediate_size": 64, "num_shared_experts": 1,
        "num_expert_group": 1, "topk_group": 1}
KIMI: dict[str, Any] = {
    "model_type": "kimi_linear", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 1, "linear_head_dim": 32,
    "linear_num_heads": 4, "linear_conv_kernel_dim": 4, "mlp_layer_types": ["dense", "sparse", "sparse"],
    "layer_types": ["linear_attention", "linear_attention", "full_attention"], **_MLA, **_MOE}
BAILING: dict[str, Any] = {
    "model_type": "bailing_hybrid", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "head_dim": 32,
    "short_conv_kernel_size": 4, "layer_group_size": 3, "first_k_dense_replace": 1, "eos_token_id": 1,
    "pad_token_id": 0, **_MLA, **_MOE}
CONFIGS = [KIMI, BAILING]
IDS = ["kimi_linear", "bailing_hybrid"]


def test_layer_pattern_and_sizes() -> None:
    kimi = spec_from_config(KIMI)
    assert kimi.mixers == ("gdn", "gdn", "attention") and kimi.moe_layers == (1, 2)
    assert kimi.position is PositionKind.NONE and kimi.kv_lora_rank == 64 and not kimi.q_lora_rank
    assert kimi.router_sigmoid and kimi.shared_expert_intermediate_size == 64
    ss = kimi.ssm
    assert ss is not None and ss.gdn_layout == "kda" and ss.conv_dim == 3 * 4 * 32
    # a checkpoint's linear_attn_config (1-indexed full_attn_layers) and the class's pattern without layer_types
    lac = {k: v for k, v in KIMI.items() if k != "layer_types"} | {
        "num_hidden_layers": 4, "mlp_layer_types": ["dense"] * 4,
        "linear_attn_config": {"full_attn_layers": [2, 4], "kda_layers": [1, 3], "head_dim": 16, "num_heads": 2}}
    spec = spec_from_config(lac)
    assert spec.mixers == ("gdn", "attention", "gdn", "attention")
    assert spec.ssm is not None and (spec.ssm.n_heads, spec.ssm.head_dim) == (2, 16)
    default = {k: v for k, v in KIMI.items() if k not in ("layer_types", "mlp_layer_types")} | {"num_hidden_layers": 5}
    spec = spec_from_config(default)
    assert spec.mixers == ("gdn", "gdn", "gdn", "gdn", "attention") and spec.moe_layers == (1, 2, 3, 4)
    ling = spec_from_config(BAILING)
    assert ling.mixers == ("gdn", "gdn", "attention") and ling.mla_head_gate and ling.position is PositionKind.ROPE
    assert ling.ssm is not None and ling.ssm.gdn_layout == "kda_full" and ling.ssm.neg_eigval  # kda_safe_gate
    # BailingHybridConfig: linear_* keys (as to_dict saves them) win over head_dim
    assert spec_from_config(BAILING | {"linear_head_dim": 16}).ssm.head_dim == 16  # type: ignore[union-attr]


def test_bad_layer_types_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config(KIMI | {"layer_types": ["linear_attention", "mamba", "full_attention"]})
    with pytest.raises(ConfigError, match="full_attn_layers"):
        spec_from_config({k: v for k, v in KIMI.items() if k != "layer_types"}
                         | {"linear_attn_config": {"full_attn_layers": [0]}})


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_parameters_equal_the_meta_model(cfg: dict[str, Any]) -> None:
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_fla_kernel_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="--ssm-kernel torch"):
        estimate(spec_from_config(KIMI), make_workload(batch_size=1, seq_len=256))
    est = estimate(spec_from_config(KIMI), make_workload(batch_size=1, seq_len=256, ssm_kernel="torch"))
    assert any("plain-PyTorch fallback" in a for a in est.assumptions)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_the_fallback_materialises_per_channel_decay(cfg: dict[str, Any]) -> None:
    """chunk_kimi_delta_attention's inference prefill holds three (batch, heads, chunks, 64, 64, head_dim) fp32
    tensors at once (the decay mask, the keys' outer product with k_beta and its product with the decay): the
    prefill peak grows by at least that much per doubling of the sequence, for each KDA layer (one at a time)."""
    spec = spec_from_config(cfg)
    assert spec.ssm is not None
    heads, d = spec.ssm.n_heads, spec.ssm.head_dim

    def prefill(seq: int) -> int:
        est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=seq, new_tokens=1, ssm_kernel="torch"))
        return int(next(p for p in est.phases if p.phase.value == "prefill").peak_allocated_bytes)

    big = 2 * heads * 1024 * KDA_CHUNK * d * 4  # one such tensor at 1024 tokens
    assert prefill(2048) - prefill(1024) >= 3 * big


# LoRA + checkpointing at these widths: the trace holds ~4.5 MiB more activations than the estimate at its backward
# peak (decay_mask's select_backward, once the trace adds the chunks' gradients in place as a GPU does), not found yet
_LORA_OFF = pytest.mark.xfail(strict=True, reason="-2.7%: 4.5 MiB more live in the trace at select_backward")


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("wname", [pytest.param(w, marks=_LORA_OFF) if w == "lora" else w for w in SMALL_WORKLOADS])
def test_estimate_matches_trace_of_the_torch_fallback(cfg: dict[str, Any], wname: str) -> None:
    assert_matches_trace(cfg, SMALL_WORKLOADS[wname], ssm_kernel="torch")


def test_cut_of_a_published_kimi_config_rewrites_its_nested_layer_lists() -> None:
    """The released Kimi-Linear config names its layers in ``linear_attn_config`` (1-based ``kda_layers`` /
    ``full_attn_layers``); the 2-layer cut keeps one of each and re-writes both lists for the kept layers."""
    from vramplan.catalog import get_model
    from vramplan.derive._configs import cut_layers

    published = get_model("kimi-linear-48b-a3b").config_dict()
    cut = cut_layers(published, 2)
    lac = cut["linear_attn_config"]
    assert cut["num_hidden_layers"] == 2
    assert sorted(lac["kda_layers"] + lac["full_attn_layers"]) == [1, 2]
    assert lac["full_attn_layers"] and lac["kda_layers"]
    assert lac["head_dim"] == published["linear_attn_config"]["head_dim"]
    spec = spec_from_config(cut, name="kimi-cut")  # refused while the lists named layers past the cut
    assert spec.num_layers == 2
