"""The trace's decode fast-forward grows a sparse-attention indexer's key cache with the layer's keys.

DeepSeek-V3.2 (deepseek_v32) and GLM-5 (glm_moe_dsa) keep their DSA indexer's keys in the cache beside the layer's
own (transformers cache_utils.py ``update_indexer``). The trace stands in for the decode steps between the first and
the last by growing the cache through ``update``; the indexer's keys must grow with them, or the last step's causal
mask (as long as the layer's keys) does not fit the indexer's scores and ``masked_fill`` raises.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vramplan.api import estimate, make_workload  # noqa: E402
from vramplan.hfconfig import spec_from_config  # noqa: E402
from vramplan.trace import trace_workload  # noqa: E402

# small widths of the published shapes' kinds: one dense and one MoE layer, MLA with the indexer
DSA: dict[str, dict[str, Any]] = {
    "deepseek_v32": {
        "model_type": "deepseek_v32", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
        "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16, "vocab_size": 512,
        "max_position_embeddings": 256},
    "glm_moe_dsa": {
        "model_type": "glm_moe_dsa", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse"],
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16,
        "vocab_size": 512, "max_position_embeddings": 256},
}


@pytest.mark.parametrize("model_type", sorted(DSA))
def test_decode_past_the_fast_forward_traces(model_type: str) -> None:
    workload = make_workload(task="infer", batch_size=2, seq_len=48, new_tokens=6)  # steps 2..5 fast-forwarded
    result = trace_workload(dict(DSA[model_type]), workload, name=model_type)
    assert any("grown through its own update()" in a for a in result.assumptions)
    est = estimate(spec_from_config(dict(DSA[model_type]), name=model_type), workload)
    assert est.peak_allocated_bytes == pytest.approx(result.peak_allocated_bytes, rel=0.02)
