"""LongCat-Flash (vramplan.longcat): the reader, the parameter count against the meta-device model, the mechanisms'
memory (two attention/MLP pairs per layer, the shortcut MoE with zero-compute experts, MLA's LoRA scaling, peft's
wrapped expert stacks) and estimate against the fake-tensor trace."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.longcat import GROUPED_EXPERTS, at_release
from vramplan.memory import lora_params, lora_targets
from vramplan.params import count_params

from .trace_match import assert_matches_trace, meta_parameters

# head_dim is the rotary width (LongcatFlashRotaryEmbedding reads it): the config class's default 64 equals its
# qk_rope_head_dim
CFG: dict[str, Any] = {
    "model_type": "longcat_flash", "hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 512,
    "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "head_dim": 16, "n_routed_experts": 8, "zero_expert_num": 4, "moe_topk": 3, "expert_ffn_hidden_size": 64,
    "num_layers": 2, "vocab_size": 2048}
NO_ZERO = CFG | {"zero_expert_num": 0}
BIASED = CFG | {"attention_bias": True, "router_bias": True}


def _phase(spec: Any, opts: dict[str, Any], phase: str) -> int:
    return int(next(p for p in estimate(spec, make_workload(**opts)).phases
                    if p.phase.value == phase).peak_allocated_bytes)


def _allocated(spec: Any) -> int:
    """Bytes one layer's forward program allocates (batch 2 x 256 tokens, full fine-tuning)."""
    from vramplan._engine.tape import Tape
    from vramplan.blocks import build_layer
    from vramplan.estimator import _plan, numerics

    w = make_workload(batch_size=2, seq_len=256)
    tp = Tape(True)
    build_layer(tp, spec, numerics(w), _plan(spec, w, True, True, True, False), 2, 256)
    return sum(t.nbytes for t in tp.tensors)


def test_reads_the_dual_layer() -> None:
    spec = spec_from_config(CFG)
    assert spec.num_layers == 2 and spec.dual_sublayers and spec.mla_lora_scale
    assert (spec.num_experts, spec.zero_experts, spec.experts_per_token) == (8, 4, 3)
    assert spec.moe_layers == (0, 1) and spec.intermediate_size == 512 and spec.moe_intermediate_size == 64
    assert spec.head_dim == 48 and spec.kv_lora_rank == 64
    # two attention sublayers per layer: two latent caches
    assert spec.kv_cache_layers_per_token == 2 * 2 * (64 + 16)
    # the config's num_hidden_layers setter halves it into num_layers
    assert spec_from_config({k: v for k, v in CFG.items() if k != "num_layers"} | {"num_hidden_layers": 6}) \
        .num_layers == 3
    # LongcatFlashExperts: ``config.zero_expert_num or 0`` (an absent key is the class default, 256)
    assert spec_from_config(CFG | {"zero_expert_num": None}).zero_experts == 0
    assert spec_from_config({k: v for k, v in CFG.items() if k != "zero_expert_num"}).zero_experts == 256
    with pytest.raises(ConfigError, match="q_lora_rank"):
        spec_from_config(CFG | {"q_lora_rank": None})
    with pytest.raises(ConfigError, match="moe_topk"):
        spec_from_config(CFG | {"moe_topk": 13})
    with pytest.raises(ConfigError, match="qk_head_dim"):
        spec_from_config(CFG | {"qk_head_dim": 64})


@pytest.mark.parametrize("cfg", [CFG, NO_ZERO, BIASED], ids=["default", "no-zero-experts", "biases"])
def test_parameters_equal_the_meta_model(cfg: dict[str, Any]) -> None:
    assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


RELEASES = [(5, 24), (5, 25)]


def test_the_installed_release_builds_its_experts() -> None:
    """The reader builds the experts of the installed transformers (5.24: the loop with gate_up rows for the
    zero-compute experts; 5.25 on: grouped_mm, routed rows only); a workload of another release rebuilds them."""
    from vramplan.estimator import built_as
    from vramplan.longcat import GROUPED_EXPERTS
    from vramplan.workload import default_transformers, release

    spec = spec_from_config(CFG)
    assert spec.moe_experts_loop == (release(default_transformers()) < GROUPED_EXPERTS)
    assert built_as(spec, make_workload(transformers="5.24")).moe_experts_loop
    assert not built_as(spec, make_workload(transformers="5.25")).moe_experts_loop
    old, new = (estimate(spec, make_workload(batch_size=2, seq_len=256, transformers=v)) for v in ("5.24", "5.25"))
    assert old.parameters - new.parameters == spec.num_layers * 4 * 2 * 64 * 256


@pytest.mark.parametrize("have", RELEASES, ids=["5.24", "5.25"])
def test_zero_experts_hold_gate_up_rows_and_router_columns(have: tuple[int, int]) -> None:
    """5.24: gate_up_proj has a row block for every expert, the zero-compute ones too; down_proj only the routed ones.
    5.25: gate_up_proj the routed experts only. The router scores every expert in both."""
    spec = at_release(spec_from_config(CFG), have)
    h, i = spec.hidden_size, spec.moe_intermediate_size
    diff = count_params(spec).total - count_params(replace(spec, zero_experts=0)).total
    assert diff == spec.num_layers * 4 * ((2 * i * h if have < GROUPED_EXPERTS else 0) + h)


@pytest.mark.parametrize("have", RELEASES, ids=["5.24", "5.25"])
def test_all_linear_wraps_the_expert_stacks(have: tuple[int, int]) -> None:
    """peft's Qwen2-MoE pattern (data/peft_moe_targets.json): the fused stacks take ParamWrapper adapters (gate_up at
    twice the rank, over every expert of the stack), the dense MLPs lose theirs, the router's classifier keeps a plain
    one."""
    spec = at_release(spec_from_config(CFG), have)
    names = lora_targets(spec, ("all-linear",))
    assert {"experts.gate_up_proj", "experts.down_proj", "router", "q_b_proj", "kv_b_proj"} <= names
    assert not {"gate_proj", "up_proj", "down_proj"} & names
    r, h, i, e = 16, 256, 64, 8
    et = 12 if have < GROUPED_EXPERTS else e  # the experts gate_up_proj holds
    attn = 2 * r * ((256 + 96) + (96 + 4 * 48) + (256 + 64 + 16) + (64 + 4 * 64) + (4 * 32 + 256))
    experts = 2 * r * (h + 2 * i) * et + r * (i + h) * e + r * (h + 12)
    assert lora_params(spec, names, r) == spec.num_layers * (attn + experts)
    # the wrapped stacks (W + s * B @ A, built for the experts' call and read slice by slice) raise the backward
    opts = {"method": "lora", "batch_size": 2, "seq_len": 256, "lora_targets": "all-linear",
            "transformers": ".".join(map(str, have))}
    plain = {**opts, "lora_targets": "q_b_proj,kv_b_proj"}
    assert _phase(spec, opts, "backward") - _phase(spec, plain, "backward") > 3 * 2 * i * h * et * 2


def test_mechanisms_keep_memory() -> None:
    """The shortcut MoE's output is held to the layer's end, the zero-compute experts keep their gathered tokens
    and cast products for backward, and the LoRA scaling of MLA makes new query and latent tensors."""
    spec = spec_from_config(CFG)
    full = {"batch_size": 2, "seq_len": 256}
    fwd = _phase(spec, full, "forward")
    assert fwd > _phase(replace(spec, zero_experts=0), full, "forward")
    # (the scaled halves are not saved: they show in what the layer allocates, not in its peak)
    assert _allocated(spec) - _allocated(replace(spec, mla_lora_scale=False)) == \
        2 * 2 * 256 * (4 * 48 + 64) * 2
    infer = {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4}
    assert _phase(spec, infer, "decode") > _phase(replace(spec, dual_sublayers=False), infer, "decode")


WORKLOADS = {
    "full": {"batch_size": 2, "seq_len": 256},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True,
             "lora_targets": "all-linear"},
    "lora-nockpt": {"method": "lora", "batch_size": 2, "seq_len": 256, "lora_targets": "all-linear"},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    """(The trace answers every ``expert_idx = int(expert_hit[j].item())`` with 1, so it runs each zero-compute
    expert as routed expert 1; the estimate models the identity experts the real routing runs: within 1% here.)"""
    assert_matches_trace(CFG, WORKLOADS[wname])


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "lora"])
def test_estimate_matches_trace_without_zero_experts(wname: str) -> None:
    assert_matches_trace(NO_ZERO, WORKLOADS[wname], tol=0.005)
