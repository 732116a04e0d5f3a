"""Inkling's text decoder (vramplan.inkling): relative-position bias as SDPA's float mask, short convolutions, the MoE
block with shared experts scored by the router."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.params import count_params

# InklingTextConfig's library defaults (transformers 5.24), the cut the coverage runs (one sliding, one full layer)
INKLING: dict[str, Any] = {
    "model_type": "inkling_text", "vocab_size": 201024, "hidden_size": 6144, "num_hidden_layers": 66,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "swa_num_attention_heads": 64,
    "swa_num_key_value_heads": 16, "swa_head_dim": 128, "sliding_window_size": 512, "d_rel": 16, "rel_extent": 1024,
    "log_scaling_n_floor": None, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "conv_kernel_size": 4,
    "intermediate_size": 24576, "hidden_act": "silu", "moe_intermediate_size": 3072, "n_routed_experts": 256,
    "num_experts_per_tok": 6, "n_shared_experts": 2, "shared_expert_sink": True, "route_scale": 8.0,
    "logits_mup_width_multiplier": 24.0, "attention_dropout": 0.0,
    "layer_types": ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(66)],
    "mlp_layer_types": ["sparse"] * 66,
}
SMALL = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "swa_num_attention_heads": 8, "swa_num_key_value_heads": 4, "swa_head_dim": 32, "intermediate_size": 1024,
         "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1024,
         "sliding_window_size": 64, "rel_extent": 128}


def _cut(**change: Any) -> dict[str, Any]:
    return {**cut_layers(INKLING, 2), **change}


def test_cut_has_one_layer_of_each_kind() -> None:
    spec = spec_from_config(_cut())
    assert spec.num_layers == 2 and spec.sliding_layers == (0,) and spec.moe_layers == (0, 1)
    assert spec.layer(0).num_kv_heads == 16 and spec.layer(1).num_kv_heads == 8


@pytest.mark.parametrize("change", [{}, {"mlp_layer_types": ["dense", "sparse"]}, {"layer_types": None},
                                    {"d_rel": 8, "rel_extent": 256, "conv_kernel_size": 3, "n_shared_experts": 1},
                                    {"layer_types": ["hybrid", "hybrid"], "num_hidden_layers": 2}])
def test_parameters_match_the_meta_model(change: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    cfg = {**_cut(), **SMALL, **change}
    if cfg.get("layer_types") is None:
        cfg.pop("layer_types")
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_default_parameters() -> None:
    # the cut library default as the meta-device model counts it (benchmarks/coverage_results.json)
    assert count_params(spec_from_config(_cut())).total == 31942717954


def test_position_bias_is_dense_per_head() -> None:
    """The prefill's attention temporaries grow with heads x prompt^2: the full layer's fp32 scores and softmax of
    the math kernel, beside the bf16 bias and its masked copy."""
    spec = spec_from_config(_cut())
    act = {}
    for s in (1024, 2048):
        ph = estimate(spec, make_workload(task="infer", batch_size=1, seq_len=s, new_tokens=0)).phases[0]
        act[s] = ph.breakdown.as_dict()[MemoryKind.ACTIVATIONS]
    scores = 64 * 2048 * 2048
    assert act[2048] >= scores * (4 + 4 + 2 + 2)
    assert act[2048] - act[1024] >= 0.75 * scores * (4 + 4 + 2 + 2)


def test_refuses_what_it_does_not_model() -> None:
    with pytest.raises(ConfigError, match="log_scaling_n_floor"):
        spec_from_config(_cut(log_scaling_n_floor=4096))
    with pytest.raises(ConfigError, match="unpadded_vocab_size"):
        spec_from_config(_cut(unpadded_vocab_size=200000))
    with pytest.raises(ConfigError, match="layer_types"):
        spec_from_config(_cut(layer_types=["hybrid", "full_attention"]))


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "lora", "infer"])
def test_inkling_estimate_matches_trace(wname: str) -> None:
    pytest.importorskip("torch")
    from .trace_match import SMALL_WORKLOADS, assert_matches_trace

    cfg = {**_cut(), **SMALL}
    assert_matches_trace(cfg, {**SMALL_WORKLOADS[wname], "seq_len": 256}, ssm_kernel="torch")


# Inkling2TextConfig's library defaults (transformers 5.24)
INKLING2: dict[str, Any] = {
    "model_type": "inkling2_text", "vocab_size": 201024, "unpadded_vocab_size": 200058, "hidden_size": 4608,
    "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
    "swa_num_attention_heads": 48, "swa_num_key_value_heads": 8, "swa_head_dim": 128, "sliding_window_size": 1024,
    "d_rel": 16, "rel_extent": 1024, "log_scaling_n_floor": 128000, "max_position_embeddings": 1048576,
    "conv_kernel_size": 4, "hidden_act": "silu", "moe_intermediate_size": 2304, "n_routed_experts": 384,
    "num_experts_per_tok": 8, "route_scale": 8.0, "n_layers_per_attn_res_block": 6, "mlp_gate_softcap": 4.0,
    "mlp_up_softcap": 25.0, "final_logit_softcapping": 30.0, "scoring_func": "sigmoid",
    "layer_types": ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(48)],
}
SMALL2 = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
          "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 32, "moe_intermediate_size": 64,
          "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1024, "unpadded_vocab_size": 1000,
          "sliding_window_size": 64, "rel_extent": 128, "max_position_embeddings": 4096}


def _cut2(**change: Any) -> dict[str, Any]:
    return {**cut_layers(INKLING2, 2), **change}


@pytest.mark.parametrize("change", [{}, {"num_hidden_layers": 7, "n_layers_per_attn_res_block": 2,
                                         "layer_types": ["hybrid_sliding", "hybrid"] * 3 + ["hybrid"]},
                                    {"d_rel": 8, "conv_kernel_size": 3}])
def test_inkling2_parameters_match_the_meta_model(change: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    cfg = {**_cut2(), **SMALL2, **change}
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_inkling2_block_states_grow_at_boundaries() -> None:
    """Every block boundary adds the (batch, seq, hidden) state the layer started from to block_states, and every
    block residual after it attends over one more block in fp32: more boundaries, more saved activations."""
    w = make_workload(batch_size=1, seq_len=512)
    kinds = ["hybrid_sliding"] * 6

    def fwd_act(every: int) -> int:
        spec = spec_from_config({**_cut2(), **SMALL2, "num_hidden_layers": 6, "layer_types": kinds,
                                 "n_layers_per_attn_res_block": every})
        return estimate(spec, w).phases[0].breakdown.as_dict()[MemoryKind.ACTIVATIONS]

    assert fwd_act(1) > fwd_act(2) > fwd_act(6)


def test_inkling2_head_softcaps_fp32_logits() -> None:
    """lm_head(...).float() then the tanh soft-cap in fp32: the training forward keeps fp32 logits-sized tensors."""
    spec = spec_from_config(_cut2())
    w = make_workload(batch_size=1, seq_len=1024)
    logits = estimate(spec, w).phases[0].breakdown.as_dict()[MemoryKind.LOGITS_LOSS]
    assert logits >= 3 * 1024 * 200058 * 4  # the fp32 logits, the saved tanh, the fp32 log-softmax


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "lora", "infer"])
def test_inkling2_estimate_matches_trace(wname: str) -> None:
    pytest.importorskip("torch")
    from .trace_match import SMALL_WORKLOADS, assert_matches_trace

    # LoRA with checkpointing peaks at the loss on the library widths; at toy widths its peak is a layer's
    # recomputation, whose many small fp32 temporaries of the dynamic short convolutions' backward are not all
    # modelled (-2.7%)
    cfg = _cut2() if wname == "lora" else {**_cut2(), **SMALL2}
    opts = {**SMALL_WORKLOADS[wname], "seq_len": 256}
    if wname == "lora":
        opts["lora_targets"] = "all-linear"
    assert_matches_trace(cfg, opts, ssm_kernel="torch")


@pytest.mark.parametrize("cfg", [INKLING, INKLING2], ids=["inkling", "inkling2"])
def test_flash_attention_refused_as_transformers_does(cfg: dict[str, Any]) -> None:
    from vramplan.errors import WorkloadError

    spec = spec_from_config(cut_layers(cfg, 2))
    with pytest.raises(WorkloadError, match="FlashAttention"):
        estimate(spec, make_workload(batch_size=1, seq_len=256, attention="flash"))


@pytest.mark.parametrize("cfg", [{**cut_layers(INKLING, 2), **SMALL}, {**cut_layers(INKLING2, 2), **SMALL2},
                                 {**cut_layers(INKLING2, 2), **SMALL2, "num_hidden_layers": 3,
                                  "layer_types": ["hybrid", "hybrid_sliding", "hybrid"]}],
                         ids=["inkling", "inkling2", "inkling2-3"])
def test_fp32_parameters_match_the_model(cfg: dict[str, Any]) -> None:
    """The parameters transformers keeps in fp32 in a bf16 model (_keep_in_fp32_modules_strict)."""
    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    assert spec_from_config(cfg).fp32_params == fp32


# Inkling2LoopTextConfig's library defaults (transformers 5.24): layers 6..17 run three times
INKLING2_LOOP: dict[str, Any] = {
    **INKLING2, "model_type": "inkling2_loop_text", "hidden_size": 2304, "num_hidden_layers": 24,
    "num_attention_heads": 24, "swa_num_attention_heads": 24, "log_scaling_n_floor": 8192,
    "moe_intermediate_size": 1152, "n_routed_experts": 128, "loop_layer_index_start": 6, "loop_layer_index_end": 18,
    "loop_num_passes": 3, "loop_gate_rank": 64,
    "layer_types": ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(24)],
}


def _cut_loop(**change: Any) -> dict[str, Any]:
    return {**cut_layers(INKLING2_LOOP, 2), **change}


def test_loop_cut_keeps_layers_before_inside_and_after_the_loop() -> None:
    """The loop range is a kind: one sliding and one full layer before, inside and after it, re-indexed, with a block
    size that keeps each kept layer's block boundary (0, 6, 18 were boundaries; 5, 11, 23 were not)."""
    cut = _cut_loop()
    assert cut["num_hidden_layers"] == 6
    assert (cut["loop_layer_index_start"], cut["loop_layer_index_end"]) == (2, 4)
    assert cut["n_layers_per_attn_res_block"] == 2
    assert cut["layer_types"] == ["hybrid_sliding", "hybrid"] * 3
    # no range: the block size stays (Inkling 2)
    assert cut_layers(INKLING2, 2)["n_layers_per_attn_res_block"] == 6


@pytest.mark.parametrize("change", [{}, {"loop_num_passes": 1}, {"loop_gate_rank": 16},
                                    {"loop_layer_index_end": 6}])
def test_inkling2_loop_parameters_match_the_meta_model(change: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    cfg = {**_cut_loop(), **SMALL2, **change}
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_inkling2_loop_fp32_parameters_match_the_model() -> None:
    torch = pytest.importorskip("torch")
    import transformers

    cfg = {**_cut_loop(), **SMALL2}
    hf = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    assert spec_from_config(cfg).fp32_params == sum(p.numel() for p in model.parameters()
                                                    if p.dtype == torch.float32)


def test_inkling2_loop_passes_cost_activations_and_cache() -> None:
    """Every later pass runs the loop layers again on messages: more saved activations in training, one more cache
    copy of the loop layers' keys and values in inference; a loop that runs once is Inkling 2's stack plus gates."""
    train, infer = make_workload(batch_size=1, seq_len=512), make_workload(task="infer", batch_size=1, seq_len=512)

    def run(passes: int) -> tuple[int, int]:
        spec = spec_from_config({**_cut_loop(), **SMALL2, "loop_num_passes": passes})
        fwd = estimate(spec, train).phases[0].breakdown.as_dict()[MemoryKind.ACTIVATIONS]
        return fwd, estimate(spec, infer).phases[-1].breakdown.as_dict()[MemoryKind.KV_CACHE]  # decode

    (a1, k1), (a2, k2), (a3, k3) = run(1), run(2), run(3)
    assert a2 - a1 > 0 and a3 - a2 > 0.9 * (a2 - a1)  # each pass about as much again
    assert k1 < k2 < k3 and k3 - k2 == k2 - k1


def test_inkling2_loop_refuses_a_misplaced_loop() -> None:
    with pytest.raises(ConfigError, match="multiples of n_layers_per_attn_res_block"):  # (validate_architecture)
        spec_from_config({**_cut_loop(), "loop_layer_index_start": 1})


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "lora", "infer"])
def test_inkling2_loop_estimate_matches_trace(wname: str) -> None:
    """The loop passes against the real forward: the later passes' message residual and gates, the pre-loop states
    held, the loop layers' weight gradients accumulated over the passes, one cache copy per pass."""
    pytest.importorskip("torch")
    from .trace_match import SMALL_WORKLOADS, assert_matches_trace

    cfg = _cut_loop() if wname == "lora" else {**_cut_loop(), **SMALL2}
    opts = {**SMALL_WORKLOADS[wname], "seq_len": 256}
    if wname == "lora":
        opts["lora_targets"] = "all-linear"
    assert_matches_trace(cfg, opts, ssm_kernel="torch")
