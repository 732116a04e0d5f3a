"""LoRA and bitsandbytes on transformers 5's fused MoE layers, as peft 0.21 and transformers 5.24 treat them.

* ``all-linear`` on a MoE type peft knows (data/peft_moe_targets.json) adapts the fused expert stacks and the
  router with ``lora.ParamWrapper`` (rank doubled on gate_up_proj), and drops the dense / shared-expert MLP
  projections it maps to those v4 names;
* bitsandbytes quantizes nn.Linear modules only: the 3-D expert stacks stay unquantized, and QLoRA's
  prepare_model_for_kbit_training holds them in fp32.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.memory import lora_params, lora_targets, model_states
from vramplan.quant import flag_quantization

MIXTRAL = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 1024}
DEEPSEEK = {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
            "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
            "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
            "v_head_dim": 32, "vocab_size": 1024}


def test_all_linear_adapts_the_fused_experts_and_router() -> None:
    spec = spec_from_config(MIXTRAL)
    targets = lora_targets(spec, ("all-linear",))
    assert {"experts.gate_up_proj", "experts.down_proj", "router"} <= targets
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= targets
    # A (experts x 2r, hidden) and B (2 x intermediate, 2r x experts) on gate_up; r on down_proj; the router r x
    # (hidden + experts); the four attention projections: counted as peft 0.21 builds them on the meta device
    r, h, i, e, kv = 8, 256, 512, 4, 2 * 64
    per_layer = 2 * r * (h + 2 * i) * e + r * (i + h) * e + r * (h + e) + r * (h + h) * 2 + r * (h + kv) * 2
    assert lora_params(spec, targets, r) == 2 * per_layer


def test_qwen2_moe_pattern_drops_the_dense_and_shared_mlp_adapters() -> None:
    """Under peft's Qwen2-MoE mapping a module called gate_proj/up_proj/down_proj moves to target_parameters, so the
    dense first layer's MLP and the shared expert lose their adapters (checked on the meta device in peft 0.21.2)."""
    spec = spec_from_config(DEEPSEEK)
    targets = lora_targets(spec, ("all-linear",))
    assert not targets & {"gate_proj", "up_proj", "down_proj", "shared_gate_proj", "shared_up_proj",
                          "shared_down_proj"}
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "experts.gate_up_proj",
            "experts.down_proj", "router"} <= targets


def test_named_v4_expert_targets_move_to_the_fused_stacks() -> None:
    """Named targets go through the same rewrite as all-linear (peft's _convert_peft_config_moe applies to lists):
    Mixtral's w1/w3 become the fused gate_up stack, w2 the down stack; Qwen2-MoE-pattern names also take the dense
    and shared MLP projections of that leaf name out of the targets; half of a fused pair is refused."""
    spec = spec_from_config(MIXTRAL)
    assert lora_targets(spec, ("q_proj", "v_proj", "w1", "w2", "w3")) == \
        {"q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"}
    assert lora_targets(spec, ("q_proj", "gate")) == {"q_proj", "router"}
    with pytest.raises(WorkloadError, match="without w3"):
        lora_targets(spec, ("q_proj", "w1"))
    ds = spec_from_config(DEEPSEEK)
    assert lora_targets(ds, ("o_proj", "gate_proj", "up_proj", "down_proj")) == \
        {"o_proj", "experts.gate_up_proj", "experts.down_proj"}


def test_types_peft_leaves_alone_keep_module_targets() -> None:
    """qwen2_moe itself is not in peft's conversion table: its fused experts take no adapter."""
    cfg = {**MIXTRAL, "model_type": "qwen2_moe", "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256,
           "num_experts": 4}
    spec = spec_from_config(cfg)
    targets = lora_targets(spec, ("all-linear",))
    assert "router" not in targets and not any(t.startswith("experts.") for t in targets)


def test_expert_adapters_cost_a_whole_stack_copy_and_its_gradient() -> None:
    """Every forward parametrizes each adapted expert stack into a new tensor of the whole stack (saved for
    backward) and backward materializes its gradient: all-linear peaks above attention-only LoRA by more than
    one layer's expert stacks."""
    spec = spec_from_config(MIXTRAL)
    w = dict(method="lora", seq_len=256, batch_size=1)
    attn = estimate(spec, make_workload(lora_targets="q_proj,k_proj,v_proj,o_proj", **w))
    every = estimate(spec, make_workload(lora_targets="all-linear", **w))
    stack = 3 * 256 * 512 * 4 * 2  # gate_up + down of one layer, bf16
    assert every.peak_allocated_bytes - attn.peak_allocated_bytes > stack
    assert any("ParamWrapper" in a for a in every.assumptions)


@pytest.mark.parametrize("kw, what", [({"lora_dropout": 0.05}, "lora_dropout"), ({"method": "dora"}, "DoRA"),
                                      ({"weights_quant": "gptq-int4"}, "gptq-int4")])
def test_param_wrapper_refusals(kw: dict[str, object], what: str) -> None:
    spec = spec_from_config(MIXTRAL)
    args: dict[str, object] = {"method": "lora", "lora_targets": "all-linear", "seq_len": 128, **kw}
    with pytest.raises(WorkloadError, match=what):
        estimate(spec, make_workload(**args))


def test_bitsandbytes_leaves_fused_experts_unquantized() -> None:
    nf4 = flag_quantization("nf4")
    assert nf4.scheme_for("model.layers.0.mlp.experts.0.gate_proj") is None
    assert nf4.scheme_for("model.layers.0.self_attn.q_proj") is not None
    assert flag_quantization("gptq-int4").scheme_for("model.layers.0.mlp.experts.0.gate_proj") is not None


def test_qlora_holds_expert_stacks_in_fp32() -> None:
    """prepare_model_for_kbit_training casts every parameter bitsandbytes did not quantize to fp32: on a MoE model
    that is the expert stacks too."""
    spec = spec_from_config(MIXTRAL)
    states = model_states(spec, make_workload(method="qlora", lora_targets="q_proj,v_proj", seq_len=128))
    experts = 2 * 3 * 256 * 512 * 4
    assert states.weights >= experts * 4


def test_peft_table_matches_installed_peft() -> None:
    """The shipped table is what the installed peft and transformers do (regenerate it when they change)."""
    conv = pytest.importorskip("peft.utils.transformers_weight_conversion")
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    table = json.loads((resources.files("vramplan") / "data" / "peft_moe_targets.json").read_text())
    import peft
    import transformers

    versions = table["versions"]
    checked = (versions["transformers"], *versions.get("also_checked", {}).get("transformers", ()))
    if peft.__version__ != versions["peft"] or transformers.__version__ not in checked:
        pytest.skip("installed peft/transformers differ from the table's")
    live = {t: p for t, p in sorted(conv._MODEL_TO_CONVERSION_PATTERN.items())
            if p in conv._MOE_TARGET_MODULE_MAPPING and conv._MOE_FUSED_TARGETS.get(p)
            and get_checkpoint_conversion_mapping(t) is not None and t.islower()}
    assert table["types"] == live
    for name, pat in table["patterns"].items():
        assert pat["targets"] == conv._MOE_TARGET_MODULE_MAPPING[name]


@pytest.mark.slow
@pytest.mark.parametrize("method, targets, ckpt, precision", [
    ("lora", "all-linear", False, "bf16"), ("qlora", "all-linear", True, "bf16"),
    ("qlora", "q_proj,v_proj", False, "bf16"),
    ("lora", "all-linear", False, "amp-bf16"), ("lora", "q_proj,v_proj", False, "amp-bf16"),
    ("lora", "q_proj,k_proj,v_proj,o_proj,w1,w2,w3", True, "bf16")])
def test_fused_moe_adapters_agree_with_trace(method: str, targets: str, ckpt: bool, precision: str) -> None:
    """Estimate vs the fake-tensor trace of peft 0.21 / transformers 5.24 on a small Mixtral (under AMP the grouped
    GEMM is not autocast: transformers casts the input to the fp32 stack instead)."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    cfg = {**MIXTRAL, "hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8}
    w = make_workload(method=method, lora_targets=targets, gradient_checkpointing=ckpt, seq_len=256, batch_size=2,
                      precision=precision)
    est = estimate(spec_from_config(cfg), w)
    traced = trace_workload(cfg, w, name="mixtral-small")
    assert est.trainable_parameters == traced.trainable_parameters
    assert abs(est.peak_allocated_bytes / traced.peak_allocated_bytes - 1) < 0.02
