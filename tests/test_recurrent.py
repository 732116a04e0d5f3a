"""Recurrent mixers replayed step by step: RecurrentGemma's RG-LRU block (vramplan.rglru), RWKV-4 (vramplan.rwkv) and
MiniMax's lightning attention (vramplan.lightning).
Readers, parameter counts against the meta-device model, the fixed-size cache, the per-step saves of the Python
scans, the kernel note, the layer cut of a tiled ``block_types``, and estimate against the fake-tensor trace."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import count_params
from vramplan.rglru import rglru_state_bytes
from vramplan.rwkv import rwkv_state_bytes

from .trace_match import meta_parameters

RG: dict[str, Any] = {"model_type": "recurrent_gemma", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 256,
                      "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 1,
                      "block_types": ["recurrent", "attention"], "attention_window_size": 512}
RWKV: dict[str, Any] = {"model_type": "rwkv", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 256,
                        "intermediate_size": 1024, "context_length": 4096}
MINIMAX: dict[str, Any] = {"model_type": "minimax", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 512,
                           "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 64,
                           "layer_types": ["full_attention", "linear_attention"]}
CONFIGS = [RG, RWKV, MINIMAX]
IDS = ["recurrent_gemma", "rwkv", "minimax"]


def test_readers() -> None:
    spec = spec_from_config({**RG, "num_hidden_layers": 5, "block_types": ["recurrent", "recurrent", "attention"]})
    assert spec.mixers == ("rglru", "rglru", "attention", "rglru", "rglru")
    assert spec.sliding_layers == (2,) and spec.sliding_window == 512 and spec.attention_layers == 1
    assert spec.intermediate_size == 384 and spec.mlp_bias and spec.o_bias and not spec.qkv_bias
    assert spec.rotary_fraction == 0.5 and spec.logit_softcap == 30.0 and spec.embed_scale
    assert spec.ssm is not None and spec.ssm.d_inner == 256 and spec.ssm.head_dim == 64
    rwkv = spec_from_config(RWKV)
    assert rwkv.mixers == ("rwkv", "rwkv") and rwkv.attention_layers == 0 and rwkv.embedding_layernorm
    mm = spec_from_config({k: v for k, v in MINIMAX.items() if k != "layer_types"} | {"num_hidden_layers": 4})
    assert mm.mixers == ("attention", "lightning", "attention", "lightning") and mm.normed_residual
    assert mm.moe_layers == (0, 1, 2, 3) and mm.lightning_block == 64
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config({**MINIMAX, "layer_types": ["full_attention"]})
    with pytest.raises(ConfigError, match="block_types"):
        spec_from_config({**RG, "block_types": ["recurrent", "mlp"]})
    with pytest.raises(ConfigError, match="lru_width"):
        spec_from_config({**RG, "lru_width": 250})


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_parameters_equal_the_meta_model(cfg: dict[str, Any]) -> None:
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_cut_keeps_one_layer_of_each_kind_of_a_tiled_pattern() -> None:
    """RecurrentGemma's block_types is a pattern the config class tiles over the stack: a 2-layer cut of the
    26-layer default keeps a recurrent and an attention layer."""
    cut = cut_layers({"num_hidden_layers": 26, "block_types": ["recurrent", "recurrent", "attention"]}, 2)
    assert cut == {"num_hidden_layers": 2, "block_types": ["recurrent", "attention"]}


def test_cut_keeps_two_layers_of_a_tied_kind() -> None:
    """ZambaModel ties every hybrid layer's shared_transf to the first one's, and transformers refuses a stack with a
    single hybrid layer: the cut keeps two of them (one plain Mamba layer, two hybrid layers)."""
    lat, hyb = "linear_attention", "hybrid"
    types = [lat, lat, hyb, lat, lat, lat, lat, hyb, lat]
    cut = cut_layers({"model_type": "zamba", "num_hidden_layers": 9, "layers_block_type": types}, 2)
    assert cut["num_hidden_layers"] == 3 and cut["layers_block_type"] == [lat, hyb, hyb]
    # another type's hybrid kind is cut to one layer as before
    other = cut_layers({"model_type": "zamba2", "num_hidden_layers": 9, "layers_block_type": types}, 2)
    assert other["layers_block_type"] == [lat, hyb]


def _phase(est: Any, name: str) -> Any:
    return next(p for p in est.phases if p.phase.value == name)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_the_python_scans_keep_per_step_fp32_tensors(cfg: dict[str, Any]) -> None:
    """Training keeps each step's fp32 tensors of the scan (RG-LRU: the gate's fp32 copy and the state it multiplies;
    RWKV: twelve per step), so the forward's end grows by at least that per token."""
    spec = spec_from_config(cfg)

    def fwd(seq: int) -> int:
        return int(_phase(estimate(spec, make_workload(batch_size=1, seq_len=seq, ssm_kernel="torch")),
                          "forward").peak_allocated_bytes)

    per_token = (2 if cfg is RG else 12) * 256 * 4
    assert fwd(256) - fwd(128) >= 128 * per_token


def test_rwkv_kernel_keeps_less_than_the_loop_and_says_which() -> None:
    spec = spec_from_config(RWKV)
    fused = estimate(spec, make_workload(batch_size=2, seq_len=512))
    loop = estimate(spec, make_workload(batch_size=2, seq_len=512, ssm_kernel="torch"))
    assert _phase(fused, "forward").peak_allocated_bytes < _phase(loop, "forward").peak_allocated_bytes
    assert any("kernels-community/rwkv" in a and "CUDA kernel" in a for a in fused.assumptions)
    assert any("plain-PyTorch loop" in a for a in loop.assumptions)
    rg = estimate(spec_from_config(RG), make_workload(batch_size=2, seq_len=512))
    assert any("RG-LRU" in a and "no fused kernel" in a for a in rg.assumptions)


def test_lightning_layers_cache_one_state_and_keep_their_blocks() -> None:
    """A lightning layer caches one (batch, heads, d, d) state whatever the length (only the softmax layer's cache
    grows); in training each block of 64 tokens keeps its (batch, heads, 64, 64) decayed scores."""
    from vramplan.lightning import lightning_state_bytes

    spec = spec_from_config(MINIMAX)
    assert lightning_state_bytes(spec, 2, 2) == 2 * 4 * 64 * 64 * 2

    def decode_kv(seq: int) -> int:
        est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=seq, new_tokens=4))
        return int(_phase(est, "decode").breakdown.as_dict()[MemoryKind.KV_CACHE])

    kv_tok = 2 * 2 * 64 * 2 * 2  # the softmax layer: 2 KV heads of 64, batch 2, bf16, keys and values
    assert decode_kv(256) - decode_kv(128) == 2 * 128 * kv_tok

    def fwd(seq: int) -> int:
        return int(_phase(estimate(spec, make_workload(batch_size=1, seq_len=seq)), "forward").peak_allocated_bytes)

    assert fwd(512) - fwd(256) >= 4 * (2 * 4 * 64 * 64 * 2)  # four more blocks' scores and decayed scores


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_cache_is_fixed_size_state(cfg: dict[str, Any]) -> None:
    """RG-LRU layers cache an fp32 (batch, lru) state and (batch, lru, width - 1) conv inputs; RWKV's five (batch,
    hidden, layers) state tensors; only an attention layer's cache grows with the prompt."""
    spec = spec_from_config(cfg)

    def decode_kv(seq: int) -> int:
        est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=seq, new_tokens=4))
        return int(_phase(est, "decode").breakdown.as_dict()[MemoryKind.KV_CACHE])

    if cfg is RWKV:
        assert rwkv_state_bytes(spec, 2, 2) == 2 * 256 * (2 * 2 + 3 * 4)
        assert decode_kv(256) == decode_kv(128) == 2 * rwkv_state_bytes(spec, 2, 2)
    else:
        assert spec.ssm is not None
        assert rglru_state_bytes(spec.ssm, 2, 2) == 2 * 256 * 4 + 2 * 256 * 3 * 2
        kv_tok = 2 * 1 * 64 * 2 * 2  # the attention layer: one KV head of 64, batch 2, bf16, keys and values
        assert decode_kv(256) - decode_kv(128) == 2 * 128 * kv_tok


WORKLOADS = {
    "full": {"batch_size": 4, "seq_len": 256},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace(cfg: dict[str, Any], wname: str) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    opts = dict(WORKLOADS[wname])
    if wname == "lora":
        opts["lora_targets"] = "q_proj,v_proj" if cfg is MINIMAX else "all-linear"
    traced = trace_workload(dict(cfg), make_workload(**opts)).peak_allocated_bytes
    est = estimate(spec_from_config(cfg), make_workload(**opts, ssm_kernel="torch")).peak_allocated_bytes
    assert abs(est / traced - 1) <= 0.02, (est / 2**30, traced / 2**30)


@pytest.mark.parametrize(("model_type", "mechanism"), [("xlstm", "mLSTM/sLSTM"), ("blt", "Byte Latent")])
def test_types_still_refused_name_the_missing_mechanism(model_type: str, mechanism: str) -> None:
    with pytest.raises(ConfigError, match=mechanism):
        spec_from_config({"model_type": model_type})
