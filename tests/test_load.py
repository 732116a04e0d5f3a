"""How the weights reach the GPU (``--load``): what the caching allocator holds after the load, and the
trace's emulation of the same loads (transformers 5.25 modeling_utils.caching_allocator_warmup,
core_model_loading.convert_and_load_state_dict_in_model; torch.nn.Module._apply)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan.alloc_stream import infer_events, train_events
from vramplan.allocator import FREE, PHASE, simulate
from vramplan.api import estimate, make_workload
from vramplan.errors import WorkloadError
from vramplan.estimator import built_as, model_states, numerics, runs_as
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

MiB = 1 << 20

TIED: dict[str, Any] = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                            tie_word_embeddings=True, max_position_embeddings=32768)
UNTIED: dict[str, Any] = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              tie_word_embeddings=False)


def _build_prefix(cfg: dict[str, Any], **opts: Any) -> list[tuple[object, int]]:
    """The events before the first phase: the weights (and the adapters) as the load put them."""
    w = make_workload(**opts)
    spec = built_as(spec_from_config(dict(cfg)), w)
    w = runs_as(spec, w)
    states = model_states(spec, w)
    ev = train_events(spec, w, states, numerics(w)) if w.is_train else infer_events(spec, w, states, numerics(w))
    return ev[:next(i for i, (_, n) in enumerate(ev) if n == PHASE)]


def test_unknown_load_is_refused() -> None:
    with pytest.raises(WorkloadError, match="config, device-map, to-device"):
        make_workload(load="pretrained")


def test_device_map_loads_into_one_warmup_block() -> None:
    """caching_allocator_warmup: one block of the state dict's bytes (a tied head once), freed; every tensor over
    1 MiB then splits it, so what the large pool reserves after the load is that block."""
    spec = spec_from_config(dict(TIED))
    prefix = _build_prefix(TIED, task="infer", load="device-map")
    warm = prefix[0][1]
    assert prefix[1] == (prefix[0][0], FREE)
    counts = count_params(spec)
    assert warm == counts.total * 2  # bf16, the tied head counted once
    weights = [e for e in prefix[2:] if isinstance(e[1], int) and e[1] > 0]
    large = sum(n for _, n in weights if n > MiB)
    assert large <= warm
    # the large pool holds the warm-up block alone (2 MiB granularity); the small pool 2 MiB segments
    reserved = simulate([e for e in prefix if e[1] >= FREE]).peak_reserved_bytes
    small = sum(n for _, n in weights if n <= MiB)
    block = -(-warm // (2 * MiB)) * 2 * MiB
    cublas = 64 * MiB  # the workspaces, allocated at the first step's start (before the first phase)
    assert block <= reserved <= block + (small // (2 * MiB) + 2) * 2 * MiB + cublas


def test_config_keeps_the_untied_head_and_the_loads_do_not() -> None:
    """from_config makes a tied model's head weight and drops it (its block stays cached); from_pretrained never
    allocates it: after the load one head's block less is reserved, and at the peak at most that (later requests
    reuse part of the cached block)."""
    head = -(-TIED["vocab_size"] * TIED["hidden_size"] * 2 // (2 * MiB)) * 2 * MiB

    def after_build(load: str) -> int:
        return simulate([e for e in _build_prefix(TIED, task="infer", load=load) if e[1] >= FREE]).peak_reserved_bytes

    assert after_build("config") - after_build("to-device") == head
    spec = spec_from_config(dict(TIED))
    res = {load: estimate(spec, make_workload(task="infer", batch_size=2, seq_len=512, load=load)).peak_reserved_bytes
           for load in ("config", "device-map", "to-device")}
    assert head // 2 < res["config"] - res["to-device"] <= head
    assert head // 2 < res["config"] - res["device-map"] <= head + 16 * MiB


def test_to_device_moves_adapters_with_their_layers() -> None:
    prefix = _build_prefix(UNTIED, method="lora", lora_rank=512, load="to-device")  # adapters over 1 MiB
    sizes = [n for _, n in prefix if n > 0]
    config = [n for _, n in _build_prefix(UNTIED, method="lora", lora_rank=512) if n > 0]
    assert sorted(sizes) == sorted(config)  # the same tensors...
    assert sizes != config  # ...in module order: each layer's adapters right after its weights
    adapter = 512 * 2048 * 4  # lora_A of q_proj, fp32
    first = sizes.index(adapter)
    assert first < len(sizes) // 2  # layer 0's adapters before layer 1's weights


@settings(max_examples=12, deadline=None)
@given(load=st.sampled_from(["device-map", "to-device"]),
       opts=st.sampled_from([dict(task="infer", batch_size=2, seq_len=256), dict(method="lora", seq_len=256),
                             dict(method="full", seq_len=256), dict(method="qlora", seq_len=256),
                             dict(method="lora", seq_len=256, gradient_checkpointing=True)]),
       cfg=st.sampled_from([TIED, UNTIED]))
def test_the_load_changes_what_is_reserved_not_what_is_allocated(load: str, opts: dict[str, Any],
                                                                 cfg: dict[str, Any]) -> None:
    spec = spec_from_config(dict(cfg))
    a = estimate(spec, make_workload(**opts))
    b = estimate(spec, make_workload(load=load, **opts))
    assert b.peak_allocated_bytes == a.peak_allocated_bytes
    assert b.peak_reserved_bytes >= b.peak_allocated_bytes


def test_parallel_layouts_say_they_ignore_the_load() -> None:
    e = estimate("llama-3.1-8b", load="device-map", gpus=4, zero=3)
    assert e.per_gpu is not None
    assert any("--load device-map" in w for w in e.per_gpu.warnings)


@pytest.mark.parametrize(("cfg", "opts"), [
    (TIED, dict(task="infer", batch_size=2, seq_len=512)),
    (TIED, dict(method="full", seq_len=512)),
    (UNTIED, dict(method="lora", batch_size=2, seq_len=512, gradient_checkpointing=True)),
])
@pytest.mark.parametrize("load", ["config", "device-map", "to-device"])
def test_estimate_follows_the_traced_load(cfg: dict[str, Any], opts: dict[str, Any], load: str) -> None:
    """The trace places the real model's tensors as each load does (its state dict in checkpoint-key order after
    the warm-up block; Module._apply's order; from_config with the untied head) and replays them through the same
    allocator model: the estimate's reserved within 1%."""
    pytest.importorskip("transformers")
    from vramplan.trace import trace_workload

    w = make_workload(load=load, **opts)
    est = estimate(spec_from_config(dict(cfg)), w)
    tr = trace_workload(dict(cfg), w)
    assert est.peak_allocated_bytes == pytest.approx(tr.peak_allocated_bytes, rel=0.002)
    assert est.peak_reserved_bytes == pytest.approx(tr.peak_reserved_bytes, rel=0.01)
    if load != "config":
        assert any(f"--load {load}" in a for a in tr.assumptions)


MOE: dict[str, Any] = dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                           num_experts=16, num_experts_per_tok=4, vocab_size=32000, tie_word_embeddings=False)


@pytest.mark.parametrize("load", ["config", "device-map", "to-device"])
@pytest.mark.parametrize("opts", [dict(method="qlora", seq_len=256), dict(task="infer", weights_quant="nf4")])
def test_bnb_moe_replay_keeps_the_fused_experts_unquantized(load: str, opts: dict[str, Any]) -> None:
    """bitsandbytes replaces nn.Linear modules only: a transformers 5 MoE layer's fused 3-D expert stacks stay in 16
    bits (fp32 after prepare_model_for_kbit_training) in the allocation stream too, so the replay allocates what the
    analytic estimate counts (it quantized them, and the reserved figure fell back to the allocated one)."""
    from vramplan.estimator import reserved_stats

    w = make_workload(load=load, **opts)
    spec = built_as(spec_from_config(dict(MOE)), w)
    replay = reserved_stats(spec, runs_as(spec, w))
    est = estimate(spec_from_config(dict(MOE)), w)
    assert replay.peak_allocated_bytes == pytest.approx(est.peak_allocated_bytes, rel=0.01)
    assert est.peak_reserved_bytes > est.peak_allocated_bytes


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_fine_tuning_of_a_quantized_checkpoint_is_refused(method: str) -> None:
    """transformers' Trainer refuses a quantized model without adapters (trainer_utils.validate_quantization_for_
    training); the estimate says so instead of counting 16-bit gradients for FP8 weights. MXFP4 (gpt-oss) loads
    dequantized for training and stays answerable; LoRA on the FP8 checkpoint too."""
    with pytest.raises(WorkloadError, match=r"quantized checkpoint \(fp8\).*--method lora"):
        estimate("qwen3-30b-a3b-thinking-2507-fp8", method=method)
    assert estimate("qwen3-30b-a3b-thinking-2507-fp8", method="lora").peak_allocated_bytes > 0
    assert estimate("gpt-oss-20b", method=method).peak_allocated_bytes > 0


def test_the_cli_echoes_the_options_the_run_changed(capsys: pytest.CaptureFixture[str]) -> None:
    from vramplan.cli import main

    assert main(["estimate", "llama-3.2-1b", "--load", "device-map", "--lora-rank", "64", "--method", "lora"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "load=device-map" in line and "lora_rank=64" in line
    assert main(["estimate", "llama-3.2-1b"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "load=" not in line and "lora_rank" not in line


def test_a_fused_gate_up_output_lives_through_down_proj() -> None:
    """Phi3MLP: ``gate, up_states = up_states.chunk(2, dim=-1)`` keeps the local ``gate``, a view of the fused
    output, bound until the MLP returns: under inference (nothing saved) the fused output is freed only after
    down_proj has made its output."""
    from vramplan._engine.tape import Tape
    from vramplan.blocks import build_layer
    from vramplan.estimator import _plan

    spec = spec_from_config(dict(model_type="phi3", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=8, vocab_size=1000))
    w = make_workload(task="infer")
    tp = Tape(False)
    build_layer(tp, spec, numerics(w), _plan(spec, w, False, False, False, False), 2, 64)
    fused = [t for t in tp.tensors if t.numel == 2 * 64 * 2 * 1024]
    down = max(j for j, op in enumerate(tp.ops) if op.outputs and op.outputs[0].numel == 2 * 64 * 512
               and any(x.numel == 2 * 64 * 1024 for x in op.inputs))
    assert fused and fused[0].last_use >= down
