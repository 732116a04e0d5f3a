"""Gemma 4's language model (gemma4_text): the reader's per-layer facts, the mechanisms of its memory program, and
parameter counts against the meta-device model (modeling_gemma4.py, transformers 5.24)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind as K
from vramplan.params import count_params, layer_linears

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
ROOT = Path(__file__).resolve().parents[1]

# a small Gemma 4 text config written out the way transformers 5.24 saves one (per_layer_config keys zero-padded)
SMALL: dict[str, Any] = {
    "model_type": "gemma4_text", "vocab_size": 4096, "vocab_size_per_layer_input": 2048, "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 128, "sliding_window": 128, "max_position_embeddings": 8192, "hidden_size_per_layer_input": 64,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2,
    "per_layer_config": {"05": {"head_dim": 256}, "11": {"head_dim": 256}},
}
INFER = {"task": "infer", "precision": "bf16", "batch_size": 2, "seq_len": 1024, "new_tokens": 16}
FULL = {"task": "train", "method": "full", "precision": "bf16", "optimizer": "adamw", "batch_size": 1,
        "seq_len": 512}


def spec(**kw: Any) -> Any:
    return spec_from_config({**SMALL, **kw}, "g4")


def names(s: Any, i: int) -> set[str]:
    return {n for n, *_ in layer_linears(s, i)}


def test_per_layer_heads_from_per_layer_config_and_from_global_head_dim() -> None:
    s = spec()
    assert s.layer(0).head_dim == 128 and s.layer(5).head_dim == 256 and s.layer(11).head_dim == 256
    assert s.sliding_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    # a config saved without per_layer_config (the release checkpoints): global_head_dim, and with k_eq_v the
    # global layers' KV heads
    raw = {k: v for k, v in SMALL.items() if k != "per_layer_config"}
    s2 = spec_from_config({**raw, "global_head_dim": 256, "attention_k_eq_v": True, "num_global_key_value_heads": 1},
                          "g4")
    assert s2.layer(5).head_dim == 256 and s2.layer(5).num_kv_heads == 1 and s2.layer(4).num_kv_heads == 2
    assert s2.layer(5).v_from_k and not s2.layer(4).v_from_k
    assert "v_proj" not in names(s2, 5) and "v_proj" in names(s2, 4)


def test_kv_sharing_layers_have_no_kv_projections_or_cache_and_a_double_wide_mlp() -> None:
    s = spec(num_kv_shared_layers=4, use_double_wide_mlp=True)
    for i in range(8, 12):
        assert s.layer(i).kv_shared and {"k_proj", "v_proj"}.isdisjoint(names(s, i))
        assert s.layer(i).intermediate_size == 2 * SMALL["intermediate_size"]
    # the last earlier layer of each type stores its keys and values
    assert s.layer(7).kv_store and s.layer(5).kv_store and not s.layer(6).kv_store
    # 8 caching layers: 7 sliding (2 KV heads of 128) and 1 global (256)
    assert s.kv_cache_layers_per_token == 7 * 2 * 2 * 128 + 2 * 2 * 256
    decode = next(p for p in estimate(s, make_workload(**INFER)).phases if p.phase == "decode")
    plain = next(p for p in estimate(spec(), make_workload(**INFER)).phases if p.phase == "decode")
    assert decode.breakdown[K.KV_CACHE] < plain.breakdown[K.KV_CACHE]
    with pytest.raises(ConfigError, match="stores them"):
        spec(num_kv_shared_layers=7)  # no global layer is left to store the global layers' keys and values


def test_per_layer_inputs_branch_and_table() -> None:
    on, off = spec(), spec(hidden_size_per_layer_input=0)
    assert {"per_layer_input_gate", "per_layer_projection"} <= names(on, 0)
    assert not {"per_layer_input_gate", "per_layer_projection"} & names(off, 0)
    width = 12 * 64
    assert count_params(on).embedding - count_params(off).embedding == 2048 * width + 512 * width + 64
    # the per-layer inputs (batch x seq x layers x width) are held through the prefill
    a_on = estimate(on, make_workload(**INFER)).phases[0].breakdown[K.ACTIVATIONS]
    a_off = estimate(off, make_workload(**INFER)).phases[0].breakdown[K.ACTIVATIONS]
    assert a_on - a_off >= 2 * 1024 * width * 2


def test_moe_block_beside_the_dense_mlp() -> None:
    s = spec(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=256)
    n = names(s, 3)
    assert {"gate_proj", "up_proj", "down_proj", "experts.gate_proj", "router"} <= n
    dense = spec()
    extra = count_params(s).layer_total - count_params(dense).layer_total
    # per layer: experts, router (proj, scale, per_expert_scale), three more norms
    assert extra == 12 * (8 * 3 * 512 * 256 + 512 * 8 + 512 + 8 + 3 * 512)
    e_moe = estimate(s, make_workload(**FULL)).peak_allocated_bytes
    assert e_moe > estimate(dense, make_workload(**FULL)).peak_allocated_bytes
    with pytest.raises(ConfigError, match="top_k_experts"):
        spec(enable_moe_block=True, num_experts=2, top_k_experts=4, moe_intermediate_size=256)


def test_wide_heads_with_gqa_repeat_kv_for_sdpa() -> None:
    """transformers 5.24 passes enable_gqa to SDPA only for head_dim <= 256 (use_gqa_in_sdpa): the 512-wide global
    heads get k/v repeated and run the memory-efficient kernel, not the math path's materialised scores."""
    from vramplan.blocks import attention_kernel
    from vramplan.workload import Attention

    s = spec(per_layer_config={"05": {"head_dim": 512}, "11": {"head_dim": 512}})
    assert attention_kernel(s.layer(5), Attention.SDPA, 2, False).value == "efficient"
    assert attention_kernel(s.layer(0), Attention.SDPA, 2, False).value == "flash"


def test_tied_embedding_gradients_summed_out_of_place() -> None:
    """The head's weight gradient and the embedding's meet in one InputBuffer and are summed out of place: at the
    end of backward three vocab x hidden buffers exist beside the other gradients."""
    s = spec(hidden_size_per_layer_input=0, vocab_size=65536)
    est = estimate(s, make_workload(**{**FULL, "seq_len": 16}))  # a short sequence: the end of backward peaks
    bwd = next(p for p in est.phases if p.phase == "backward")
    table = 65536 * 512 * 2
    assert bwd.breakdown[K.GRADIENTS] >= count_params(s).total * 2 + 2 * table


def test_cut_keeps_per_layer_structures_consistent() -> None:
    d = {**SMALL, "num_kv_shared_layers": 4}
    c = cut_layers(d, 2)
    assert c["num_hidden_layers"] == 4
    assert c["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert c["per_layer_config"] == {1: {"head_dim": 256}, 3: {"head_dim": 256}}
    assert c["num_kv_shared_layers"] == 2
    s = spec_from_config(c, "cut")
    assert s.layer(3).kv_shared and s.layer(1).kv_store and not s.layer(1).kv_shared


def test_coverage_within_two_percent_of_trace() -> None:
    cells = json.loads((ROOT / "benchmarks" / "coverage_results.json").read_text())["types"]["gemma4_text"]["cells"]
    for w in ("full", "lora", "infer"):
        assert abs(cells[w]["estimate_vs_trace_pct"]) <= 2.0, (w, cells[w])


VARIANTS = {
    "default": {},
    "k_eq_v": {"attention_k_eq_v": True, "num_global_key_value_heads": 1},
    "moe": {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 128},
    "no_ple": {"hidden_size_per_layer_input": 0},
    "kv_shared": {"num_kv_shared_layers": 4, "use_double_wide_mlp": True},
    "all": {"attention_k_eq_v": True, "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 4,
            "top_k_experts": 2, "moe_intermediate_size": 128, "num_kv_shared_layers": 4, "use_double_wide_mlp": True,
            "attention_bias": True, "tie_word_embeddings": False},
}


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_meta_device(variant: str) -> None:
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    kw = {k: v for k, v in SMALL.items() if k not in ("model_type", "per_layer_config")}
    for cut in (False, True):
        d = Gemma4TextConfig(**{**kw, **VARIANTS[variant]}, global_head_dim=256).to_dict()
        if cut:
            d = cut_layers(d, 2)
        cfg = Gemma4TextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
        with torch.device("meta"):
            model = Gemma4ForCausalLM(cfg)
        assert count_params(spec_from_config(d, variant)).total == sum(p.numel() for p in model.parameters())


def test_unknown_per_layer_override_refused() -> None:
    with pytest.raises(ConfigError, match="intermediate_size"):
        spec(per_layer_config={"05": {"head_dim": 256, "intermediate_size": 7}})
    with pytest.raises(ConfigError, match="bidirectional"):
        spec(use_bidirectional_attention="all")
    assert replace(spec(), layer_overrides=()).layer(5).head_dim == 128


def test_kv_sharing_layers_run_on_the_last_token_in_prefill() -> None:
    """Gemma4TextModel._maybe_slice_kv_shared_inputs: with one token's logits kept (generate), the layers that reuse
    keys and values run on the last position only: their double-wide MLP does not reach the prefill peak."""
    from vramplan.estimator import kv_shared_sliced

    s = spec(num_kv_shared_layers=4, use_double_wide_mlp=True, intermediate_size=8192)
    w = make_workload(**INFER)
    assert kv_shared_sliced(s, w, ("attention", True, False, s.variant(11)))
    assert not kv_shared_sliced(s, w, ("attention", True, False, s.variant(3)))
    assert not kv_shared_sliced(s, make_workload(**INFER, attention="flash"), ("attention", True, False, s.variant(11)))
    sliced = estimate(s, w).phases[0].breakdown[K.ACTIVATIONS]
    whole = estimate(s, make_workload(**INFER, logits="all")).phases[0].breakdown[K.ACTIVATIONS]
    plain = estimate(spec(intermediate_size=8192), w).phases[0].breakdown[K.ACTIVATIONS]
    assert sliced <= plain < whole


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_unified_text_parameter_count_equals_meta_device() -> None:
    """gemma4_unified_text: Gemma 4's attention and KV sharing without per-layer embeddings or MoE."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    kw = {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 1000, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "attention_k_eq_v": True, "num_global_key_value_heads": 1,
          "num_kv_shared_layers": 12, "use_double_wide_mlp": True}
    cfg = CONFIG_MAPPING["gemma4_unified_text"](**kw)
    with torch.device("meta"):
        model = transformers.Gemma4UnifiedForCausalLM(cfg)
    s = spec_from_config(cfg.to_dict(), "unified")
    assert s.per_layer_input == 0 and s.sliding_window == 1024
    assert count_params(s).total == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
@pytest.mark.parametrize("variant", ["k_eq_v", "moe", "kv_shared"])
def test_variants_within_two_percent_of_trace(variant: str) -> None:
    """Each mechanism switched on in the library default (cut to one layer of each kind) against the fake-tensor
    trace of the installed transformers, on the coverage workloads."""
    import sys

    from transformers import Gemma4TextConfig

    from vramplan.trace import trace_workload

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from coverage_report import WORKLOADS

    over = {"k_eq_v": {"attention_k_eq_v": True, "num_global_key_value_heads": 2},
            "moe": {"enable_moe_block": True, "num_experts": 16, "top_k_experts": 4, "moe_intermediate_size": 1024},
            "kv_shared": {"num_kv_shared_layers": 12, "use_double_wide_mlp": True}}[variant]
    d = {k: v for k, v in Gemma4TextConfig(**over).to_dict().items()
         if k not in ("transformers_version", "dtype", "_name_or_path")}
    d = cut_layers(d, 2)
    for name, opts in WORKLOADS.items():
        opts = {k: v for k, v in opts.items() if name == "lora" or k != "lora_targets"}
        w = make_workload(**opts)
        traced = trace_workload(d, w, name=variant).peak_allocated_bytes
        est = estimate(spec_from_config(d, variant), w).peak_allocated_bytes
        assert abs(est / traced - 1) <= 0.02, (variant, name, est / traced - 1)


def test_serving_kv_bytes_per_token_layer_by_layer() -> None:
    """vLLM's KV pages and `fit`'s KV per token: each caching layer by its own head sizes; sharing layers none."""
    from vramplan.fit import kv_bytes_per_token
    from vramplan.serving.vllm import ServingConfig, serve_memory

    shared, plain = spec(num_kv_shared_layers=4), spec()
    assert kv_bytes_per_token(plain, 2) == (10 * 2 * 2 * 128 + 2 * 2 * 2 * 256) * 2
    assert kv_bytes_per_token(shared, 2) == (7 * 2 * 2 * 128 + 2 * 2 * 256) * 2
    served = serve_memory(shared, ServingConfig(), total_memory_bytes=80 << 30)
    assert served.kv_bytes_per_token == kv_bytes_per_token(shared, 2)


# the shape of Gemma-4-31B's inference peak (the catalog's gemma-4-31b): a global layer's query (heads x 512) in its
# q_norm, with the keys as values and an MLP too narrow to peak
QUERY_PEAK: dict[str, Any] = {
    "model_type": "gemma4_text", "vocab_size": 1024, "vocab_size_per_layer_input": 1024, "hidden_size": 256,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 64, "global_head_dim": 512, "attention_k_eq_v": True, "num_global_key_value_heads": 1,
    "sliding_window": 128, "max_position_embeddings": 4096, "hidden_size_per_layer_input": 0,
    "layer_types": ["sliding_attention", "full_attention"],
}


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_global_query_norm_peak_within_two_percent_of_trace() -> None:
    """Gemma4RMSNorm keeps its 16-bit input bound until it returns (``self._norm(x.float())`` ... ``type_as(x)``), and
    Gemma4TextAttention norms and rotates the query before it projects the keys and values: without both the
    estimate of this peak was 7.9% low (Gemma-4-31B's real shapes, cut to 2 layers: -1.7%)."""
    from .trace_match import assert_matches_trace

    assert_matches_trace(QUERY_PEAK, {"task": "infer", "precision": "bf16", "batch_size": 2, "seq_len": 1024,
                                      "new_tokens": 4})
