"""DeepSeek-V4 (vramplan.dsv4): the reader, the parameter count against the meta-device model, the mechanisms'
memory (the Sinkhorn steps' saved divisions, the indexer's tensors dying with it, parameters without gradient, the
prefill's cache) and estimate against the fake-tensor trace."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError, VramplanError, WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.memory import model_states
from vramplan.params import count_params

from .trace_match import assert_matches_trace, meta_parameters

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
DSV4: dict[str, Any] = {
    "model_type": "deepseek_v4", "vocab_size": 2048, "hidden_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 64, "q_lora_rank": 96, "num_experts_per_tok": 2,
    "n_routed_experts": 8, "hc_mult": 4, "hc_sinkhorn_iters": 6, "sliding_window": 32, "o_groups": 2,
    "o_lora_rank": 32, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16,
    "compress_rates": {CSA: 4, HCA: 16}, "layer_types": [HCA, CSA, "sliding_attention"],
    "mlp_layer_types": ["hash_moe", "moe", "moe"], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
# every linear peft's all-linear adapts but o_a_proj (DeepseekV4GroupedLinear), which peft cannot wrap
TARGETS = "down_proj,gate_proj,kv_proj,o_b_proj,q_a_proj,q_b_proj,up_proj,weights_proj"


def _phase(spec: Any, opts: dict[str, Any], phase: str) -> int:
    return int(next(p for p in estimate(spec, make_workload(**opts)).phases
                    if p.phase.value == phase).peak_allocated_bytes)


def test_reads_deepseek_v4() -> None:
    spec = spec_from_config(DSV4)
    assert spec.hc_mult == 4 and spec.sinks_fp32 and spec.attention_sinks and not spec.sdpa
    assert [spec.layer(i).compress_rate for i in range(3)] == [16, 4, 0]
    assert [spec.layer(i).hash_routed for i in range(3)] == [True, False, False]
    assert spec.dsv4[:6] == (2, 32, 6, 4, 16, 8)  # rope: qk_rope_head_dim / head_dim (64 / 512) of 64 channels
    # the config class's defaults: two HCA layers, then CSA / HCA interleaved; three hash layers
    default = spec_from_config({"model_type": "deepseek_v4", "num_hidden_layers": 6})
    assert [default.layer(i).compress_rate for i in range(6)] == [128, 128, 128, 4, 128, 4]
    assert [default.layer(i).hash_routed for i in range(6)] == [True] * 3 + [False] * 3
    legacy = spec_from_config({k: v for k, v in DSV4.items() if k != "layer_types"} | {"compress_ratios": [0, 4, 128]})
    assert [legacy.layer(i).compress_rate for i in range(3)] == [0, 4, 16]
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config(DSV4 | {"layer_types": ["full_attention"] * 3})
    with pytest.raises(ConfigError, match="o_groups"):
        spec_from_config(DSV4 | {"o_groups": 3})


def test_parameters_equal_the_meta_model() -> None:
    assert count_params(spec_from_config(DSV4)).total == meta_parameters(DSV4)


def test_sinkhorn_steps_are_saved_for_backward() -> None:
    """Each Sinkhorn-Knopp step divides the (tokens, hc, hc) comb by its sums and saves both operands: more steps,
    more of the forward kept for backward (and nothing more at inference)."""
    spec = spec_from_config(DSV4)
    more = replace(spec, dsv4=(*spec.dsv4[:2], 20, *spec.dsv4[3:]))
    full = {"batch_size": 2, "seq_len": 256}
    t, n, steps = 2 * 256, 4, 2 * (20 - 6)
    grown = _phase(more, full, "forward") - _phase(spec, full, "forward")
    # two hyper-connections per layer, three layers: each step an fp32 comb and its fp32 sums
    assert grown >= 3 * 2 * steps * t * (n * n + n) * 4
    infer = {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4}
    assert _phase(more, infer, "prefill") - _phase(spec, infer, "prefill") < grown // 10


def test_indexer_gets_no_gradient() -> None:
    """The Lightning Indexer's output is integer indices: its parameters get no gradient, so no optimizer state
    (torch/optim/adam.py _init_group creates it for a parameter with a grad), and the step's temporaries skip them."""
    spec = spec_from_config(DSV4)
    w = make_workload(batch_size=1, seq_len=256)
    states, every = model_states(spec, w), model_states(replace(spec, idle_params=0), w)
    assert spec.idle_params > 0
    assert every.gradients - states.gradients == 2 * spec.idle_params
    assert every.optimizer_state - states.optimizer_state == 2 * 2 * spec.idle_params  # two bf16 AdamW moments
    assert every.step_temporaries > states.step_temporaries
    # peft's adapters on the indexer's linears (leaf names kv_proj, gate_proj, q_b_proj, weights_proj) get none either
    lora = model_states(spec, make_workload(method="lora", batch_size=1, seq_len=256, lora_targets="weights_proj"))
    assert lora.trainable_parameters == 16 * (256 + 4) and lora.gradients == 0


def test_prefill_fills_the_compressed_cache() -> None:
    """The prefill leaves the sliding keys' cat, the compressors' projections (the buffer views keep them) and the
    compressed entries in the cache."""
    spec = spec_from_config(DSV4)
    e = estimate(spec, make_workload(task="infer", batch_size=2, seq_len=256, new_tokens=4))
    prefill = next(p for p in e.phases if p.phase.value == "prefill")
    kv = prefill.breakdown.as_dict()["kv_cache"]
    d, b, s = 64, 2, 256
    # at least the sliding keys of every layer and the HCA and CSA compressors' kv / gate projections
    assert kv >= b * s * d * 2 * 3 + 2 * b * s * d * 2 + 2 * b * s * 2 * d * 2


def test_all_linear_names_the_module_peft_cannot_wrap() -> None:
    spec = spec_from_config(DSV4)
    with pytest.raises(WorkloadError, match="o_a_proj"):
        estimate(spec, make_workload(method="lora", batch_size=1, seq_len=64, lora_targets="all-linear"))
    estimate(spec, make_workload(method="lora", batch_size=1, seq_len=64, lora_targets=TARGETS))


WORKLOADS = {
    "full": {"batch_size": 2, "seq_len": 256},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True,
             "lora_targets": TARGETS},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    assert_matches_trace(DSV4, WORKLOADS[wname])


@pytest.mark.slow
def test_trace_names_the_module_peft_cannot_wrap() -> None:
    """peft 0.21 wraps DeepseekV4GroupedLinear as a plain lora.Linear; the forward fails, and the trace says where."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    with pytest.raises(VramplanError, match=r"o_a_proj.*DeepseekV4GroupedLinear"):
        trace_workload(dict(DSV4), make_workload(method="lora", batch_size=1, seq_len=64, lora_targets="all-linear"))


# the coverage cut (benchmarks/coverage_report.py): DeepseekV4Config's defaults (V4-Flash's widths), three layers
# keeping one of each kind (HCA + hash routing, CSA, HCA), at the coverage workloads
CUT: dict[str, Any] = {"model_type": "deepseek_v4", "num_hidden_layers": 3, "layer_types": [HCA, CSA, HCA],
                       "mlp_layer_types": ["hash_moe", "moe", "moe"]}
COVERAGE = {
    "full": {"batch_size": 1, "seq_len": 1024},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 1024, "gradient_checkpointing": True,
             "lora_targets": TARGETS},
    "infer": {"task": "infer", "batch_size": 4, "seq_len": 2048, "new_tokens": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(COVERAGE))
def test_coverage_cut_matches_trace(wname: str) -> None:
    """The coverage cells at V4-Flash's widths (full -0.0%, LoRA -0.03%, inference -0.1% when written)."""
    assert_matches_trace(CUT, COVERAGE[wname], tol=0.01)


@pytest.mark.parametrize("expert_dtype", ["fp4", "fp8"])
def test_fp8_checkpoint_bytes_equal_transformers_modules(expert_dtype: str) -> None:
    """DeepSeek-V4-Flash ships a fine-grained FP8 checkpoint with FP4 experts: the weights and scales the estimate
    counts are, to the byte, the parameters and buffers of the modules transformers' quantizer swaps in (FP8Linear,
    FP8GroupedLinear for o_a_proj, FP8Experts; the _keep_in_fp32_modules projections left in bf16)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.quantizers.auto import AutoHfQuantizer

    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
          "weight_block_size": [32, 32]}
    cfg = DSV4 | {"quantization_config": qc, "expert_dtype": expert_dtype}
    spec = spec_from_config(cfg)
    states = model_states(spec, make_workload(task="infer", batch_size=1, seq_len=64))
    hf = transformers.AutoConfig.for_model("deepseek_v4", **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    AutoHfQuantizer.from_config(hf.quantization_config, pre_quantized=True).preprocess_model(model)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert states.weights + states.quant_constants == held


def test_catalog_flash_holds_its_quantized_bytes() -> None:
    """deepseek-v4-flash as published (FP8, FP4 experts): 156,016,622,556 bytes of parameters and buffers, what
    transformers 5.24's FP8 quantizer makes of the meta-device model (the test above checks the same rule at small
    widths); the base checkpoint holds bf16 weights and fp32 kept modules."""
    from vramplan.catalog import get_model

    w = make_workload(task="infer", batch_size=1, seq_len=64)
    fp8 = model_states(get_model("deepseek-v4-flash").spec, w)
    assert fp8.weights + fp8.quant_constants == 156_016_622_556
    base = get_model("deepseek-v4-flash-base").spec
    assert model_states(base, w).weights > 2 * count_params(base).total


@pytest.mark.slow
def test_trace_says_it_drops_the_checkpoint_quantization() -> None:
    """The trace builds the weights in the workload's precision; a config's own quantization_config is named in a
    warning instead of passing silently (the estimate counts the FP8 storage)."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    cfg = DSV4 | {"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}}
    tr = trace_workload(dict(cfg), make_workload(task="infer", batch_size=1, seq_len=64, new_tokens=2))
    assert any("quantization_config (fp8) is not traced" in w for w in tr.warnings)
