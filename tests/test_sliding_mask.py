"""Sliding-window / chunked attention beyond the window: transformers passes SDPA a materialised boolean mask, which
PyTorch converts to an additive mask and the memory-efficient kernel pads and saves (attention.cpp, torch 2.4+)."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config

from .trace_match import assert_matches_trace

# a 2-layer Mistral whose per-layer (batch, seq, seq) mask is as large as its other activations
TINY_MISTRAL: dict[str, Any] = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 128,
    "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "vocab_size": 1000, "max_position_embeddings": 4096, "sliding_window": 64, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def _peak(cfg: dict[str, Any], **opts: Any) -> int:
    return estimate(spec_from_config(cfg), make_workload(**opts)).peak_allocated_bytes


def test_the_mask_is_kept_per_layer_for_backward() -> None:
    """Training beyond the window keeps one padded (B, S, S + pad) 16-bit mask per sliding layer: the peak grows by
    about layers x that over the same model without a window (the flash kernel, no mask)."""
    no_window = {**TINY_MISTRAL, "sliding_window": None}
    b, s = 2, 1500
    grown = _peak(TINY_MISTRAL, batch_size=b, seq_len=s) - _peak(no_window, batch_size=b, seq_len=s)
    bias = b * s * 1504 * 2
    assert grown >= TINY_MISTRAL["num_hidden_layers"] * bias


def test_trace_pads_the_unexpanded_mask() -> None:
    torch = pytest.importorskip("torch")
    from vramplan.trace._cuda import _bool_mask_to_additive, _preprocess_mask

    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    add = _bool_mask_to_additive(mask, torch.bfloat16)
    assert add.dtype == torch.bfloat16 and add.shape == mask.shape
    q = torch.empty(2, 4, 10, 8, dtype=torch.bfloat16)
    out = _preprocess_mask(add, q, q)
    assert out.shape == (2, 4, 10, 10)
    # padded to 16 columns once for all heads (pad_bias before the expand), not per head
    assert out.untyped_storage().nbytes() == 2 * 1 * 10 * 16 * 2
    k8 = torch.empty(2, 4, 8, 8, dtype=torch.bfloat16)
    aligned = _preprocess_mask(_bool_mask_to_additive(torch.ones(2, 1, 10, 8, dtype=torch.bool), torch.bfloat16), q, k8)
    assert aligned.untyped_storage().nbytes() == 2 * 10 * 8 * 2


@pytest.mark.parametrize("opts", [
    {"batch_size": 2, "seq_len": 1500},
    {"batch_size": 2, "seq_len": 1504},
    {"method": "lora", "batch_size": 2, "seq_len": 1500, "gradient_checkpointing": True,
     "lora_targets": "q_proj,v_proj"},
    {"task": "infer", "batch_size": 2, "seq_len": 1500, "new_tokens": 2},
])
def test_matches_trace_beyond_the_window(opts: dict[str, Any]) -> None:
    assert_matches_trace(TINY_MISTRAL, opts, tol=0.01)


def test_a_window_the_length_of_the_keys_still_builds_the_mask() -> None:
    """transformers skips the mask only while the key length is below the window (kv_length >= window: masked),
    so a 4096-token window at 4096 tokens already runs the masked kernel (QLoRA Mistral-7B at 4096)."""
    at = {**TINY_MISTRAL, "sliding_window": 1504}
    below = {**TINY_MISTRAL, "sliding_window": 1505}
    assert _peak(at, batch_size=2, seq_len=1504) > _peak(below, batch_size=2, seq_len=1504) + 2 * 1504 * 1504 * 2
    assert_matches_trace(at, {"batch_size": 2, "seq_len": 1504}, tol=0.01)


# the math SDPA path (bf16 multi-query attention without enable_gqa: Falcon) holds its fp32 locals and the caller's
# q/k/v (and Falcon its fused_qkv) until it returns
TINY_FALCON: dict[str, Any] = {
    "model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 256, "num_attention_heads": 8,
    "num_hidden_layers": 2, "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False,
    "alibi": False, "bias": False, "vocab_size": 1000, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("opts", [
    {"task": "infer", "batch_size": 4, "seq_len": 512, "new_tokens": 2},
    {"batch_size": 2, "seq_len": 512},
])
def test_math_attention_locals_match_trace(opts: dict[str, Any]) -> None:
    assert_matches_trace(TINY_FALCON, opts, tol=0.01)
