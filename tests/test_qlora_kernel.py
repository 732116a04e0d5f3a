"""QLoRA's fp32 hidden states reach SDPA in fp32: no flash kernel, and with fewer key/value heads (``enable_gqa``)
no memory-efficient one either, so grouped-query models run the math kernel (the (B, H, S, S) scores)."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config

GQA: dict[str, Any] = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 1024, "intermediate_size": 3584,
    "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 8192, "sliding_window": None, "torch_dtype": "bfloat16"}


def test_gqa_qlora_pays_for_the_scores() -> None:
    """The same model with as many key/value heads as query heads runs the efficient kernel (no scores); with 4 it
    runs the math kernel and holds at least one layer's fp32 (B, H, S, S) scores more, though its k/v projections are
    smaller. (Without this the estimate read 14% under the trace: Mistral, QLoRA, no checkpointing.)"""
    b, s, heads = 2, 1024, GQA["num_attention_heads"]
    w = make_workload(method="qlora", batch_size=b, seq_len=s, lora_targets="q_proj,v_proj")
    gqa = estimate(spec_from_config(dict(GQA)), w).peak_allocated_bytes
    mha = estimate(spec_from_config(dict(GQA, num_key_value_heads=heads)), w).peak_allocated_bytes
    assert gqa - mha > b * heads * s * s * 4


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_gqa_qlora_matches_the_trace(ckpt: bool) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    w = make_workload(method="qlora", batch_size=2, seq_len=1024, gradient_checkpointing=ckpt,
                      lora_targets="q_proj,v_proj")
    traced = trace_workload(dict(GQA), w).peak_allocated_bytes
    est = estimate(spec_from_config(dict(GQA)), w).peak_allocated_bytes
    assert abs(est / traced - 1) < 0.02, (est / 2**30, traced / 2**30)
