"""LoRA targets are the module names peft sees: the estimator's linear names follow transformers' modules."""

from __future__ import annotations

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import WorkloadError
from vramplan.hfconfig import spec_from_config

PHI = {"model_type": "phi", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
       "num_attention_heads": 4, "vocab_size": 4096}


def test_phi_attention_output_is_dense() -> None:
    """PhiAttention calls its output projection ``dense`` (modeling_phi.py): a LoRA on it trains r x (in + out) per
    layer, and ``o_proj`` is not a module of the model."""
    spec = spec_from_config(PHI)
    est = estimate(spec, make_workload(method="lora", lora_targets="dense", lora_rank=8, seq_len=128))
    assert est.trainable_parameters == 2 * 8 * (256 + 256)
    with pytest.raises(WorkloadError, match="dense"):
        estimate(spec, make_workload(method="lora", lora_targets="o_proj", seq_len=128))
