"""Gated DeltaNet hybrids (vramplan.gdn): Qwen3-Next, Qwen3.5, OLMo Hybrid. Readers, parameter counts against the
meta-device model, the fixed-size cache, the kernel choice, and estimate against the fake-tensor trace of
transformers' plain-PyTorch fallback."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.gdn import gdn_state_bytes
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import count_params

from .trace_match import assert_matches_trace, meta_parameters

_LINEAR = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
           "linear_value_head_dim": 48, "linear_conv_kernel_dim": 4}
QWEN3_NEXT: dict[str, Any] = {
    "model_type": "qwen3_next", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 2048, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 96, "shared_expert_intermediate_size": 128,
    "layer_types": ["linear_attention", "full_attention", "linear_attention"], **_LINEAR}
QWEN3_5: dict[str, Any] = {
    "model_type": "qwen3_5_text", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 2048,
    "layer_types": ["linear_attention", "full_attention"], **_LINEAR}
OLMO_HYBRID: dict[str, Any] = {
    "model_type": "olmo_hybrid", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 512, "vocab_size": 2048, "pad_token_id": 0, "eos_token_id": 1,
    "layer_types": ["linear_attention", "full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **_LINEAR}
LARA_MINI: dict[str, Any] = {
    "model_type": "lara_mini", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 96, "shared_expert_intermediate_size": 128, "sliding_window": 128,
    "eos_token_id": 1, "layer_types": ["linear_attention", "sliding_attention", "full_attention"], **_LINEAR}
CONFIGS = [QWEN3_NEXT, QWEN3_5, OLMO_HYBRID, LARA_MINI]
IDS = ["qwen3_next", "qwen3_5_text", "olmo_hybrid", "lara_mini"]


def test_layer_pattern_and_sizes() -> None:
    spec = spec_from_config(QWEN3_NEXT)
    assert spec.mixers == ("gdn", "attention", "gdn") and spec.attention_layers == 1
    assert spec.attn_output_gate and spec.rotary_fraction == 0.25 and spec.moe_layers == (0, 1, 2)
    assert spec.shared_expert_gate and spec.shared_expert_first
    ss = spec.ssm
    assert ss is not None and ss.gdn_layout == "qkvz"
    assert ss.conv_dim == 2 * 2 * 32 + 4 * 48  # q, k (key heads) and v (value heads) go through the conv
    # without layer_types: full attention where (i + 1) % full_attention_interval == 0
    cfg = {k: v for k, v in QWEN3_NEXT.items() if k != "layer_types"} | {"num_hidden_layers": 8}
    assert spec_from_config(cfg).mixers == ("gdn", "gdn", "gdn", "attention") * 2
    olmo = spec_from_config({k: v for k, v in OLMO_HYBRID.items() if k != "layer_types"} | {"num_hidden_layers": 6})
    assert olmo.mixers == ("gdn", "gdn", "gdn", "attention", "gdn", "gdn")
    assert olmo.ssm is not None and olmo.ssm.neg_eigval and not olmo.pre_norm
    lara = spec_from_config(LARA_MINI)
    assert lara.mixers == ("gdn", "attention", "attention") and lara.sliding_layers == (1,)
    assert lara.ssm is not None and lara.ssm.gated_norm_fp32 and lara.router_fp32 and not lara.shared_expert_gate
    default = spec_from_config({k: v for k, v in LARA_MINI.items() if k != "layer_types"} | {"num_hidden_layers": 5})
    assert default.mixers == ("gdn", "attention", "gdn", "attention", "attention")
    assert default.sliding_layers == (1, 4)


def test_bad_configs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="multiple of linear_num_key_heads"):
        spec_from_config({**QWEN3_5, "linear_num_key_heads": 3})
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config({**QWEN3_5, "layer_types": ["linear_attention", "mamba"]})
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config({**QWEN3_5, "layer_types": ["linear_attention"]})


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_parameters_equal_the_meta_model(cfg: dict[str, Any]) -> None:
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=IDS[:3])
def test_cache_is_conv_and_recurrent_state_whatever_the_length(cfg: dict[str, Any]) -> None:
    """A gated DeltaNet layer caches (batch, conv_dim, kernel) in bf16 and an fp32 (batch, v heads, head_k_dim,
    head_v_dim) state; only the attention layer's cache grows with the sequence."""
    spec = spec_from_config(cfg)
    assert spec.ssm is not None
    per_layer = gdn_state_bytes(spec.ssm, 2, 2)
    assert per_layer == 2 * (2 * 2 * 32 + 4 * 48) * 4 * 2 + 2 * 4 * 32 * 48 * 4
    gdn_layers = spec.mixers.count("gdn")

    def decode_kv(seq: int) -> int:
        est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=seq, new_tokens=4))
        decode = next(p for p in est.phases if p.phase.value == "decode")
        return int(decode.breakdown.as_dict()[MemoryKind.KV_CACHE])

    # one attention layer (2 KV heads x 64; OLMo Hybrid: 4), bf16 keys and values of batch 2, held twice at the
    # decode peak (the cache and torch.cat's new copy of the growing layer); the gated DeltaNet layers' states
    kv_tok = 2 * spec.num_kv_heads * spec.head_dim * 2 * 2
    assert decode_kv(1024) - decode_kv(512) == 2 * 512 * kv_tok
    assert decode_kv(512) == kv_tok * (512 + 4 - 1) + kv_tok * (512 + 4) + gdn_layers * per_layer


def test_fused_kernels_keep_less_than_the_fallback_and_the_result_says_which() -> None:
    spec = spec_from_config(QWEN3_5)
    fused = estimate(spec, make_workload(batch_size=2, seq_len=1024))
    torch_path = estimate(spec, make_workload(batch_size=2, seq_len=1024, ssm_kernel="torch"))

    def fwd(e: Any) -> int:
        return int(next(p for p in e.phases if p.phase.value == "forward").peak_allocated_bytes)

    assert fwd(fused) < fwd(torch_path)
    assert any("fla" in a and "fused" in a for a in fused.assumptions)
    assert any("plain-PyTorch fallback" in a for a in torch_path.assumptions)


def test_the_fallback_keeps_the_chunked_scan_intermediates() -> None:
    """The torch fallback's saved (batch, v heads, padded seq, chunk) fp32 decay and score matrices grow the
    forward's saved activations linearly with the sequence; the fused path saves only the chunk-local WY matrix."""
    spec = spec_from_config(QWEN3_5)

    def saved(seq: int, kernel: str) -> int:
        est = estimate(spec, make_workload(batch_size=1, seq_len=seq, ssm_kernel=kernel))
        return int(next(p for p in est.phases if p.phase.value == "forward").peak_allocated_bytes)

    grow_torch = saved(2048, "torch") - saved(1024, "torch")
    grow_fused = saved(2048, "fused") - saved(1024, "fused")
    assert grow_torch > grow_fused > 0


WORKLOADS = {
    "full": {"batch_size": 1, "seq_len": 500},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 500, "gradient_checkpointing": True,
             "lora_targets": "q_proj,v_proj"},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 500, "new_tokens": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace_of_the_torch_fallback(cfg: dict[str, Any], wname: str) -> None:
    """500 tokens: the fallback pads to 512 (8 chunks of 64)."""
    assert_matches_trace(cfg, WORKLOADS[wname], ssm_kernel="torch")


def test_pipeline_stages_keep_their_own_layer_kinds() -> None:
    """A pipeline stage of a hybrid holds its own layers' mixers: stage 1 of 2 of an 8-layer Qwen3-Next (attention
    at layers 3 and 5) is layers 4..7: gated DeltaNet, attention, DeltaNet, DeltaNet."""
    from vramplan.parallel.sharding import _stage_spec

    lin, full = "linear_attention", "full_attention"
    cfg = QWEN3_NEXT | {"num_hidden_layers": 8, "mlp_only_layers": [5],
                        "layer_types": [lin, lin, lin, full, lin, full, lin, lin]}
    spec = spec_from_config(cfg)
    stage = _stage_spec(spec, range(4, 8))
    assert stage.mixers == ("gdn", "attention", "gdn", "gdn") and stage.num_layers == 4
    assert stage.moe_layers == (0, 2, 3)
    assert count_params(stage).layer_total == sum(lp.total for lp in count_params(spec).layers[4:])
