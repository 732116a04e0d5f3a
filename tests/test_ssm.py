"""State-space and hybrid families (vramplan.ssm): readers, cache sizing, kernel choice, and estimate against the
fake-tensor trace of transformers' plain-PyTorch fallback."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError, WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.ssm import mamba1_state_bytes, mamba2_state_bytes

MAMBA2: dict[str, Any] = {"model_type": "mamba2", "hidden_size": 512, "num_hidden_layers": 4, "num_heads": 16,
                          "head_dim": 64, "n_groups": 2, "state_size": 64, "vocab_size": 4096, "chunk_size": 64}
BAMBA: dict[str, Any] = {"model_type": "bamba", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 4096,
                         "mamba_n_heads": 16, "mamba_d_state": 64, "mamba_chunk_size": 64, "attn_layer_indices": [2]}


def test_layer_pattern_from_config() -> None:
    spec = spec_from_config(BAMBA)
    assert spec.mixers == ("mamba2", "mamba2", "attention", "mamba2")
    assert spec.attention_layers == 1 and not spec.mlp_free_layers
    m = spec_from_config(MAMBA2)
    assert m.mixers == ("mamba2",) * 4 and m.mlp_free_layers == (0, 1, 2, 3) and m.residual_fp32


def test_cache_is_constant_in_sequence_length() -> None:
    """A Mamba-2 model's generation cache is conv state + SSM state per layer, whatever the prompt length."""
    spec = spec_from_config(MAMBA2)
    assert spec.ssm is not None
    per_layer = mamba2_state_bytes(spec.ssm, 2, 2)
    # conv state (batch, conv_dim, kernel) bf16 + SSM state (batch, heads, head_dim, state) fp32
    assert per_layer == 2 * (1024 + 2 * 2 * 64) * 4 * 2 + 2 * 16 * 64 * 64 * 4
    assert _decode_caches(spec, (256, 4096), 16) == {4 * per_layer}


def _decode_caches(spec: Any, seqs: tuple[int, ...], new_tokens: int) -> set[int]:
    """The KV-cache bytes at the decode peak of batch-2 generation, one entry per distinct value over ``seqs``."""
    caches = set()
    for seq in seqs:
        est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=seq, new_tokens=new_tokens))
        decode = next(p for p in est.phases if p.phase.value == "decode")
        caches.add(decode.breakdown.as_dict().get(MemoryKind.KV_CACHE, 0))
    return caches


def test_hybrid_cache_counts_attention_layers_only() -> None:
    spec = spec_from_config(BAMBA)
    assert spec.ssm is not None
    short = estimate(spec, make_workload(task="infer", batch_size=1, seq_len=1024, new_tokens=1))
    long = estimate(spec, make_workload(task="infer", batch_size=1, seq_len=2048, new_tokens=1))

    def kv(e: Any) -> int:
        return int(next(p for p in e.phases if p.phase.value == "decode").breakdown.as_dict()[MemoryKind.KV_CACHE])

    # one attention layer of 2 KV heads x 64 dims, bf16: 1024 more tokens add its keys and values, twice at the
    # decode peak (the cache and torch.cat's new copy of the growing layer); the Mamba layers add nothing
    assert kv(long) - kv(short) == 2 * 1024 * 2 * 2 * 64 * 2


def test_fused_kernel_keeps_less_than_the_fallback() -> None:
    spec = spec_from_config(MAMBA2)
    fused = estimate(spec, make_workload(batch_size=2, seq_len=1024))
    torch_path = estimate(spec, make_workload(batch_size=2, seq_len=1024, ssm_kernel="torch"))
    assert fused.peak_allocated_bytes < torch_path.peak_allocated_bytes
    with pytest.raises(WorkloadError):
        make_workload(ssm_kernel="triton")


def test_peft_refuses_lora_on_mamba_out_proj() -> None:
    spec = spec_from_config(MAMBA2)
    with pytest.raises(WorkloadError, match="out_proj"):
        estimate(spec, make_workload(method="lora", lora_targets="all-linear"))
    est = estimate(spec, make_workload(method="lora", lora_targets="in_proj"))
    assert est.trainable_parameters == 4 * 16 * (512 + (1024 + 1024 + 2 * 2 * 64 + 16))


def test_bad_ssm_configs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="span the intermediate"):
        spec_from_config({**MAMBA2, "head_dim": 48})
    with pytest.raises(ConfigError, match="n_groups"):
        spec_from_config({**MAMBA2, "n_groups": 3})
    with pytest.raises(ConfigError, match="attn_layer_indices"):
        spec_from_config({**BAMBA, "attn_layer_indices": [9]})


WORKLOADS = {
    "full": {"batch_size": 1, "seq_len": 512},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 512, "gradient_checkpointing": True},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 512, "new_tokens": 8},
}


LFM2: dict[str, Any] = {"model_type": "lfm2", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "intermediate_size": 1536, "vocab_size": 4096,
                        "full_attn_idxs": [1]}
GRANITE4: dict[str, Any] = {"model_type": "granitemoehybrid", "hidden_size": 512, "num_hidden_layers": 3,
                            "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 256,
                            "shared_intermediate_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "vocab_size": 4096, "mamba_n_heads": 16, "mamba_d_state": 64, "mamba_chunk_size": 64,
                            "layer_types": ["mamba", "attention", "mamba"]}

FALCON_H1: dict[str, Any] = {"model_type": "falcon_h1", "hidden_size": 512, "num_hidden_layers": 2,
                             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024,
                             "vocab_size": 4096, "mamba_d_ssm": 512, "mamba_n_heads": 8, "mamba_d_state": 64,
                             "mamba_chunk_size": 64, "embedding_multiplier": 2.0, "key_multiplier": 0.5}

NEMOTRON_H: dict[str, Any] = {"model_type": "nemotron_h", "hidden_size": 512, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024, "vocab_size": 4096,
                              "mamba_num_heads": 16, "mamba_head_dim": 64, "n_groups": 2, "ssm_state_size": 64,
                              "chunk_size": 64, "layers_block_type": ["mamba", "mlp", "attention", "mlp"]}


MAMBA1: dict[str, Any] = {"model_type": "mamba", "hidden_size": 256, "num_hidden_layers": 2, "state_size": 8,
                          "vocab_size": 4096}
FALCON_MAMBA: dict[str, Any] = {**MAMBA1, "model_type": "falcon_mamba", "use_bias": True, "time_step_rank": 24}


def test_mamba1_reads_as_selective_scan_layers() -> None:
    spec = spec_from_config(MAMBA1)
    assert spec.ssm is not None
    assert spec.mixers == ("mamba", "mamba") and spec.mlp_free_layers == (0, 1) and spec.residual_fp32
    assert spec.ssm.d_inner == 512 and spec.ssm.dt_rank == 16 and not spec.ssm.bcdt_norm  # ceil(256 / 16)
    assert spec.ssm.inner_fn
    assert spec.tie_word_embeddings  # MambaConfig ties by default
    falcon = spec_from_config(FALCON_MAMBA)
    assert falcon.ssm is not None and falcon.ssm.bcdt_norm == "weightless" and falcon.ssm.dt_rank == 24


JAMBA: dict[str, Any] = {"model_type": "jamba", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "num_experts": 4,
                         "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                         "expert_layer_offset": 1, "mamba_d_state": 8}


def test_jamba_layer_pattern() -> None:
    """Attention every attn_layer_period layers from attn_layer_offset, Mamba-1 elsewhere; MoE every
    expert_layer_period layers from expert_layer_offset; weighted dt/B/C norms and no mamba_inner_fn."""
    spec = spec_from_config({**JAMBA, "num_hidden_layers": 8, "attn_layer_period": 4, "attn_layer_offset": 2})
    assert spec.mixers == ("mamba", "mamba", "attention", "mamba") * 2
    assert spec.moe_layers == (1, 3, 5, 7) and spec.num_experts == 4 and not spec.mlp_free_layers
    assert spec.ssm is not None and spec.ssm.bcdt_norm == "rms" and not spec.ssm.inner_fn
    dense = spec_from_config({**JAMBA, "num_experts": 1})
    assert dense.moe_layers == () and dense.num_experts == 0


def test_mamba1_cache_is_constant_in_sequence_length() -> None:
    """Mamba-1's generation cache: conv state (batch, d_inner, kernel) in bf16 and the fp32 recurrent state."""
    spec = spec_from_config(MAMBA1)
    assert spec.ssm is not None
    per_layer = mamba1_state_bytes(spec.ssm, 2, 2)
    assert per_layer == 2 * 512 * 4 * 2 + 2 * 512 * 8 * 4
    assert _decode_caches(spec, (128, 1024), 8) == {2 * per_layer}


@pytest.mark.parametrize("model", ["mamba2-2.7b", "mamba-2.8b", "falcon-mamba-7b", "lfm2-1.2b"])
def test_generation_never_grows_ssm_states(model: str) -> None:
    """Decode updates a state-space layer's states in place: the reserved memory of a long generation stays near
    the allocated peak (the allocation stream once grew every state like a key/value cache: 168 GiB reserved for
    12.6 GiB allocated)."""
    est = estimate(model, make_workload(task="infer", batch_size=8, seq_len=8192, new_tokens=32))
    assert est.peak_allocated_bytes <= est.peak_reserved_bytes <= 1.3 * est.peak_allocated_bytes


def test_fused_mamba1_keeps_less_than_the_fallback() -> None:
    """mamba_inner_fn saves the projection, x_dbl, B, C, its fp32 intermediates and the scan output; the fallback
    keeps (batch, d_inner, L, state) fp32 tensors and a state per token."""
    spec = spec_from_config(MAMBA1)
    for opts in ({"seq_len": 1024}, {"task": "infer", "batch_size": 4, "seq_len": 1024, "new_tokens": 8}):
        fused = estimate(spec, make_workload(**opts, ssm_kernel="fused")).peak_allocated_bytes
        torch_path = estimate(spec, make_workload(**opts, ssm_kernel="torch")).peak_allocated_bytes
        assert fused < torch_path


ZAMBA2: dict[str, Any] = {"model_type": "zamba2", "hidden_size": 256, "num_hidden_layers": 2,
                          "layers_block_type": ["mamba", "hybrid"], "num_attention_heads": 4, "n_mamba_heads": 8,
                          "vocab_size": 4096, "mamba_d_state": 16, "chunk_size": 64}


def test_zamba2_shared_blocks_are_counted_once() -> None:
    """The first num_mem_blocks hybrid layers hold the shared transformer blocks, later ones reuse them; every
    hybrid layer has its own linear and adapters; attention heads span 2 x hidden."""
    from vramplan.params import count_params

    cfg = {**ZAMBA2, "num_hidden_layers": 6, "num_mem_blocks": 2, "use_shared_attention_adapter": True,
           "layers_block_type": ["mamba", "hybrid", "hybrid", "mamba", "hybrid", "hybrid"]}
    spec = spec_from_config(cfg)
    assert spec.mixers == ("mamba2", "zamba_hybrid", "zamba_hybrid", "mamba2", "zamba_tied", "zamba_tied")
    assert spec.head_dim == 128 and spec.q_dim == 512 and spec.attention_layers == 4
    counts = count_params(spec)
    h, r, i = 256, 128, 1024
    block = 3 * 512 * 512 + 512 * 256 + 256 * 2 * i + i * 256 + 512 + 256  # q/k/v, o, gate_up, down, two norms
    adapters = h * r + r * 2 * i + 3 * (512 * r + r * 512)  # the MLP's and q/k/v's, one set per hybrid layer
    # block 0 serves hybrid layers 0 and 2, block 1 layers 1 and 3: each holds two adapter sets
    assert counts.layers[1].total - counts.layers[4].total == block + 2 * adapters
    assert counts.layers[4].total - counts.layers[0].total == 256 * 256  # a reusing layer's own linear


ZAMBA: dict[str, Any] = {"model_type": "zamba", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                         "num_key_value_heads": 4, "intermediate_size": 512, "n_mamba_heads": 2,
                         "layers_block_type": ["mamba", "hybrid", "hybrid"], "vocab_size": 4096, "mamba_d_state": 8}


def test_zamba_reads_as_mamba1_heads_with_one_tied_shared_block() -> None:
    """Zamba's hybrid layers share one transformer block (tied weights: counted once, at the first hybrid layer);
    its Mamba-1 mixers hold per-head x_proj / dt_proj weights as 3-D parameters (not linears, so not LoRA or
    quantization targets); the generation cache of every layer is a Mamba-1 state."""
    from vramplan.params import count_params

    spec = spec_from_config(ZAMBA)
    assert spec.mixers == ("mamba", "zamba_hybrid", "zamba_tied")
    assert spec.ssm is not None and spec.ssm.n_heads == 2 and spec.ssm.dt_rank == 16 and spec.head_dim == 128
    counts = count_params(spec)
    names = [n for n, *_ in counts.layers[0].linear_shapes]
    assert names == ["in_proj", "out_proj"]
    h, di, r, n = 256, 512, 16, 8
    mixer = h * 2 * di + di * h + di * 4 + di + di * (r + 2 * n) + r * di + di + di * n + di  # + conv, x/dt, A, D
    assert counts.layers[0].total == mixer + h  # the mixer and the input norm
    block = 3 * 512 * 512 + 512 * h + 3 * h * 512 + 512 + h  # q/k/v over 2 x hidden, o, gate/up/down, two norms
    assert counts.layers[1].total - counts.layers[2].total == block
    assert counts.layers[2].total - counts.layers[0].total == h * h  # each hybrid layer's own linear
    w = make_workload(task="infer", batch_size=2, seq_len=64, new_tokens=4)
    est = estimate(spec, w)
    decode = next(p for p in est.phases if p.phase.value == "decode").breakdown.as_dict()[MemoryKind.KV_CACHE]
    states = 3 * mamba1_state_bytes(spec.ssm, 2, 2)
    kv = 2 * 2 * 512 * 2  # one hybrid layer's keys and values per token (2 x hidden wide), batch 2
    # at the first hybrid layer's torch.cat the old and the grown cache coexist; the second still holds the old one
    assert decode == states + kv * (64 + 4 - 1) + kv * (64 + 4) + kv * (64 + 4 - 1)


def test_zamba_scans_one_head_at_a_time() -> None:
    """transformers' fallback runs one selective scan per Mamba head: inference holds one head's (batch, d_inner /
    heads, L, state) fp32 dA, dB and dBu at a time, so more heads of the same width peak lower."""
    w = make_workload(task="infer", batch_size=2, seq_len=256, new_tokens=1, ssm_kernel="torch")
    one = estimate(spec_from_config({**ZAMBA, "n_mamba_heads": 1}), w).peak_allocated_bytes
    two = estimate(spec_from_config(ZAMBA), w).peak_allocated_bytes
    half = 3 * 2 * 256 * 256 * 8 * 4  # three (batch, 256 channels, L, state) fp32 tensors
    assert one - two >= half


NEMOTRON_H_MOE: dict[str, Any] = {**NEMOTRON_H, "layers_block_type": ["mamba", "moe", "attention", "moe"],
                                  "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                                  "moe_shared_expert_intermediate_size": 384, "moe_latent_size": 128, "n_group": 2,
                                  "topk_group": 1}


def test_nemotron_h_moe_blocks() -> None:
    """An "E" block is an MLP-only block whose MLP is NemotronHMoE: fp32 sigmoid router, non-gated ReLU² experts
    between the latent projections, a non-gated shared expert."""
    spec = spec_from_config(NEMOTRON_H_MOE)
    assert spec.mixers == ("mamba2", "none", "attention", "none") and spec.moe_layers == (1, 3)
    assert spec.expert_glu == "none" and spec.moe_latent_size == 128 and spec.router_sigmoid
    from vramplan.params import count_params

    layer = count_params(spec).layers[1]
    # experts up/down at the latent width, router, fc1/fc2 latent projections, shared up/down, the block's norm
    assert layer.total == 8 * 2 * 128 * 256 + 8 * 512 + 2 * 512 * 128 + 2 * 512 * 384 + 512
    with pytest.raises(ConfigError, match="mlp_bias"):
        spec_from_config({**NEMOTRON_H_MOE, "mlp_bias": True})
    full = estimate(spec, make_workload(batch_size=1, seq_len=256, ssm_kernel="torch"))
    no_latent = estimate(spec_from_config({**NEMOTRON_H_MOE, "moe_latent_size": None}),
                         make_workload(batch_size=1, seq_len=256, ssm_kernel="torch"))
    assert full.peak_allocated_bytes < no_latent.peak_allocated_bytes


LFM3: dict[str, Any] = {"model_type": "lfm3", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 2048,
                        "sliding_window": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                        "layer_types": ["conv", "sliding_attention", "full_attention", "conv"]}


def test_lfm3_reads_as_short_convs_beside_gated_sliding_and_full_attention() -> None:
    """LFM3 keeps LFM2's short convolution; its attention adds a per-head sigmoid gate (g_proj: hidden -> heads),
    fp32 RoPE tables and sandwich norms, and some attention layers slide."""
    spec = spec_from_config(LFM3)
    assert spec.mixers == ("conv", "attention", "attention", "conv") and spec.sliding_layers == (1,)
    assert spec.attn_head_gate and spec.norms_per_layer == 4 and spec.rope_style == "fp32_tables"
    from vramplan.params import count_params

    plain = spec_from_config({**LFM3, "use_attention_gate": False, "use_sandwich_norm": False})
    c, p = count_params(spec), count_params(plain)
    assert c.layers[1].total - p.layers[1].total == 256 * 4 + 2 * 256  # g_proj and the two post norms
    torch = pytest.importorskip("torch")
    from vramplan.trace._resolve import hf_config, model_class

    for cfg in (LFM3, {**LFM3, "use_attention_gate": False, "use_sandwich_norm": False}):
        config, _ = hf_config(dict(cfg), "lfm3")
        with torch.device("meta"):
            model = model_class(config, "lfm3")._from_config(config)
        assert count_params(spec_from_config(cfg)).total == sum(q.numel() for q in model.parameters())


def test_nemotron_h_moe_parameters_equal_the_meta_model() -> None:
    torch = pytest.importorskip("torch")
    from vramplan.params import count_params
    from vramplan.trace._resolve import hf_config, model_class

    for cfg in (NEMOTRON_H_MOE, {**NEMOTRON_H_MOE, "moe_latent_size": None}):
        config, _ = hf_config(dict(cfg), "nemotron_h")
        with torch.device("meta"):
            model = model_class(config, "nemotron_h")._from_config(config)
        assert count_params(spec_from_config(cfg)).total == sum(p.numel() for p in model.parameters())


def test_lfm2_short_conv_cache() -> None:
    spec = spec_from_config(LFM2)
    assert spec.mixers == ("conv", "attention", "conv", "conv")
    est = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=256, new_tokens=4))
    decode = next(p for p in est.phases if p.phase.value == "decode").breakdown.as_dict()[MemoryKind.KV_CACHE]
    conv_states = 3 * 2 * 512 * 3 * 2  # three conv layers: (batch, hidden, L_cache) bf16
    kv = 2 * 2 * 64 * 2 * 2  # one attention layer: keys and values per token, batch 2
    assert decode == conv_states + kv * (256 + 4 - 1) + kv * (256 + 4)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [MAMBA2, BAMBA, LFM2, GRANITE4, FALCON_H1, NEMOTRON_H, MAMBA1, FALCON_MAMBA, JAMBA,
                                 ZAMBA2, NEMOTRON_H_MOE, LFM3, ZAMBA],
                         ids=["mamba2", "bamba", "lfm2", "granite4", "falcon_h1", "nemotron_h", "mamba",
                              "falcon_mamba", "jamba", "zamba2", "nemotron_h_moe", "lfm3", "zamba"])
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace_of_the_torch_fallback(cfg: dict[str, Any], wname: str) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    opts = dict(WORKLOADS[wname])
    if wname == "lora":
        opts["lora_targets"] = "in_proj" if cfg["model_type"] in ("mamba2", "mamba", "falcon_mamba") \
            else "q_proj,v_proj"
    traced = trace_workload(cfg, make_workload(**opts)).peak_allocated_bytes
    spec = spec_from_config(cfg)
    est = estimate(spec, make_workload(**opts, ssm_kernel="torch")).peak_allocated_bytes
    # (the fallback's loop reads dA[:, :, i] and dBu[:, :, i] once per token: backward adds one full-size
    # select_backward gradient per token into a buffer, in place as on a GPU; trace/_tracker.py gradient_buffers)
    assert abs(est / traced - 1) <= 0.02, (est / 2**30, traced / 2**30)


def test_serving_counts_attention_layers_per_token_and_ssm_state_per_sequence() -> None:
    from vramplan.fit import kv_bytes_per_token, state_bytes_per_sequence
    from vramplan.serving.vllm import ServingConfig, serve_memory

    hybrid = spec_from_config(BAMBA)
    assert kv_bytes_per_token(hybrid, 2) == 2 * 2 * 64 * 2  # one attention layer of four
    assert state_bytes_per_sequence(hybrid, 2) == 3 * ((1024 + 2 * 64) * 4 + 16 * 64 * 64) * 2
    pure = spec_from_config(MAMBA2)
    assert kv_bytes_per_token(pure, 2) == 0
    res = serve_memory(pure, ServingConfig(max_model_len=4096), total_memory_bytes=24 << 30)
    state = state_bytes_per_sequence(pure, 2)
    assert res.kv_bytes_per_token == 0
    assert res.max_concurrency == pytest.approx(res.kv_cache_bytes / state)
    longer = serve_memory(pure, ServingConfig(max_model_len=65536), total_memory_bytes=24 << 30)
    assert longer.max_concurrency == res.max_concurrency  # a Mamba request's cache does not grow with its length
