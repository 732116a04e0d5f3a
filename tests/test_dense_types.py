"""Dense decoder-only types read through LLaMA-class facts (hfconfig._FAMILIES): estimate against the fake-tensor
trace of the library's own code, with a small vocabulary so that the layers' mechanisms (per-head q/k norms, parallel
blocks, partial rotary, locals held through the MLP) decide the peak rather than the logits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.workload import Method, Task, Workload

from .trace_match import assert_workload_matches_trace

_COMMON = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, vocab_size=1000,
               max_position_embeddings=4096, intermediate_size=2816)
DENSE: dict[str, dict[str, Any]] = {
    # the normed input and the attention output held by the layer's locals through the MLP; partial rotary 0.25
    "stablelm": dict(model_type="stablelm", num_key_value_heads=8, **_COMMON),
    # a LayerNorm per head over torch.split heads, joined by torch.cat; one norm feeding a parallel block; q/k/v bias
    "stablelm-qknorm-parallel": dict(model_type="stablelm", num_key_value_heads=4, qk_layernorm=True,
                                     use_parallel_residual=True, use_qkv_bias=True, **_COMMON),
    # LayerNorm1P, partial rotary 0.5, ungated relu2 MLP
    "nemotron": dict(model_type="nemotron", num_key_value_heads=4, head_dim=128, **_COMMON),
    # parallel block, CohereLayerNorm, fp32 interleaved RoPE, per-head q/k norms with (heads, head_dim) weights
    "cohere-qknorm": dict(model_type="cohere", num_key_value_heads=4, use_qk_norm=True, **_COMMON),
    # GPT-2's block with a multi-query fused c_attn, learned positions (1, seq) held by the forward, the
    # max_positions^2 causal-mask buffer, the attention output held through the MLP, dropouts of 0.1
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=1024, n_layer=2, n_head=8, vocab_size=1000, n_positions=4096),
    # separate q/k/v, fp32 q/k copies for the scores, eager only, per-layer causal buffers, the attention weights
    # returned by every block and held by the model loop until the next block returns
    "gpt_neo": dict(model_type="gpt_neo", hidden_size=1024, num_layers=2, num_heads=8, vocab_size=1000,
                    max_position_embeddings=4096, attention_types=[[["global", "local"], 1]]),
    # parameter-free L2 norms (embeddings, layers, q/k after RoPE, final), relu2 fc1/fc2 MLP, logit soft-capping 15
    "nanochat": dict(model_type="nanochat", hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
                     vocab_size=1000, max_position_embeddings=4096, intermediate_size=4096),
    # per-head q/k RMSNorm, up_proj -> xIELU (a where of polynomial and expm1 branches, two scalars) -> down_proj
    "apertus": dict(model_type="apertus", hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096, intermediate_size=4096),
    # a (heads, 3, head_dim) fused query_key_value, per-head LayerNorms of the strided q/k views, partial rotary 0.5
    "persimmon": dict(model_type="persimmon", hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      vocab_size=1000, max_position_embeddings=4096, intermediate_size=4096),
}
LORA_TARGETS = {"gpt_bigcode": ("c_attn",), "persimmon": ("query_key_value",)}
WORKLOADS = {
    "full": Workload(batch_size=2, seq_len=1024),
    "lora-ckpt": Workload(method=Method.LORA, batch_size=4, seq_len=2048, gradient_checkpointing=True),
    "infer": Workload(task=Task.INFER, batch_size=4, seq_len=2048, new_tokens=8),
}


# cells still outside 2% at these widths (the library-default coverage cells are within): named, strict, so that a fix
# shows
_OFF = {("nemotron", "full"): "-2.3%: not found yet (arcee's relu2 MLP with RMSNorm is +0.1% at the same widths)",
        ("cohere-qknorm", "lora-ckpt"): "+2.6%: the per-head q/k norms under checkpointing, not found yet",
        ("stablelm-qknorm-parallel", "lora-ckpt"): "+3.6%: the per-head q/k norms under checkpointing, not found yet",
        ("gpt_bigcode", "lora-ckpt"): "-2.5%: dropouts under checkpointing; GPT-2's program is -2.1% on the same cell"}
CELLS = [pytest.param(c, w, marks=pytest.mark.xfail(strict=True, reason=_OFF[c, w]) if (c, w) in _OFF else ())
         for c in sorted(DENSE) for w in sorted(WORKLOADS)]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "wname"), CELLS)
def test_dense_type_estimate_matches_trace(case: str, wname: str) -> None:
    cfg, w = DENSE[case], WORKLOADS[wname]
    if w.method is Method.LORA:
        w = replace(w, lora_targets=LORA_TARGETS.get(case, ("q_proj", "v_proj")))
    assert_workload_matches_trace(cfg, w, name=case, label=f"{case} {wname}")


def test_stablelm_facts_read_from_its_config() -> None:
    """The config flags switch the mechanisms on (pure Python: no torch)."""
    plain = spec_from_config(DENSE["stablelm"], "s")
    assert plain.rotary_fraction == 0.25 and not plain.parallel_residual and plain.norms_per_layer == 2
    assert plain.held_through_mlp == ("normed", "attn")
    assert not plain.qk_norm and not plain.qkv_bias and not plain.o_bias
    both = spec_from_config(DENSE["stablelm-qknorm-parallel"], "s")
    assert both.parallel_residual and both.norms_per_layer == 1 and both.qk_norm and both.qk_norm_split
    assert both.qkv_bias and not both.o_bias
    mqa = spec_from_config(DENSE["gpt_bigcode"], "g")
    assert mqa.num_kv_heads == 1 and mqa.qkv_name == "c_attn" and mqa.buffer_bytes == 4096 * 4096
    assert spec_from_config({**DENSE["gpt_bigcode"], "multi_query": False}, "g").num_kv_heads == 8
    nano = spec_from_config(DENSE["nanochat"], "c")
    assert nano.logit_softcap == 15.0 and nano.embedding_layernorm and nano.qk_norm_after_rope
    assert spec_from_config(DENSE["apertus"], "a").activation.value == "xielu"
    with pytest.raises(ConfigError, match="output_vocab_size"):  # a pruned head: refused, not misread
        spec_from_config({**DENSE["apertus"], "model_type": "apertus1p5_text", "output_vocab_size": 500}, "a")
    per = spec_from_config(DENSE["persimmon"], "p")
    assert per.qk_norm and per.rotary_fraction == 0.5 and per.o_name == "dense" and per.qkv_fused
    nem = spec_from_config(DENSE["nemotron"], "n")
    assert nem.rotary_fraction == 0.5 and nem.mlp.value == "plain" and nem.activation.value == "relu2"
