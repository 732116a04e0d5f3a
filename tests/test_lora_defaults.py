"""``--lora-targets default``: peft's own default for the model's top-level model_type, or an assumption said out loud
where peft has none (``LoraConfig(target_modules=None)`` raises there)."""

from __future__ import annotations

import json

import pytest

import vramplan
from vramplan._files import package_data
from vramplan.hfconfig import spec_from_config
from vramplan.memory import default_lora_targets, peft_default_key, peft_default_targets


def test_table_is_the_installed_peft_s() -> None:
    constants = pytest.importorskip("peft.utils.constants")
    table = json.loads(package_data("data", "peft_lora_defaults.json").read_text(encoding="utf-8"))
    want = {k: (v if isinstance(v, str) else sorted(v))
            for k, v in constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()}
    assert {k: (v if isinstance(v, str) else sorted(v)) for k, v in table["targets"].items()} == want


def test_peft_s_default_is_named() -> None:
    est = vramplan.estimate("llama-3.1-8b", method="lora")
    assert "LoRA r=16 on q_proj, v_proj (peft's default for llama)" in est.assumptions
    assert not any("peft has no default" in w for w in est.warnings)


@pytest.mark.parametrize(("model", "key"), [("qwen3-30b-a3b", "qwen3_moe"), ("mistral-small-3.1-24b", "mistral3"),
                                            ("qwen2.5-vl-7b", "qwen2_5_vl")])
def test_no_peft_default_is_a_stated_assumption(model: str, key: str) -> None:
    """A vision-language model is looked up by its own model_type (mistral3), not its language model's (mistral)."""
    est = vramplan.estimate(model, method="lora")
    assert any(w.startswith(f"peft has no default LoRA targets for {key}") for w in est.warnings)
    assert any(a.startswith("LoRA r=16 on q_proj, v_proj (assumed") for a in est.assumptions)
    named = vramplan.estimate(model, method="lora", lora_targets="q_proj,v_proj")
    assert not any("peft has no default" in w for w in named.warnings)
    assert named.peak_allocated_bytes == est.peak_allocated_bytes


def test_peft_s_table_decides_the_targets() -> None:
    """Phi (1.5 / 2): peft's default adds the MLP's fc1 and fc2 to q_proj and v_proj."""
    spec = spec_from_config({"model_type": "phi", "hidden_size": 256, "intermediate_size": 1024,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
                             "max_position_embeddings": 512})
    assert peft_default_key(spec) == "phi"
    assert set(default_lora_targets(spec)) == {"q_proj", "v_proj", "fc1", "fc2"}
    qv = vramplan.estimate(spec, method="lora", lora_targets="q_proj,v_proj")
    default = vramplan.estimate(spec, method="lora")
    assert default.trainable_parameters > qv.trainable_parameters


def test_gemma4_s_expression_gives_its_alternatives() -> None:
    spec = vramplan.get_model("gemma-4-31b").spec
    from dataclasses import replace

    from vramplan.multimodal import MultimodalSpec

    as_gemma4 = replace(spec, multimodal=MultimodalSpec(model_type="gemma4", tower=None))
    assert peft_default_targets(as_gemma4) == ("q_proj", "v_proj")
