"""vramplan.trace on any architecture transformers can build: class resolution, transformers' config reader
(special floats, sub-configs), refusal of remote code, MoE routing assumptions, SSM state as cache, and the CLI
no longer gated by the estimator's config reader. Tiny configs: a few seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from vramplan.errors import VramplanError
from vramplan.kinds import MemoryKind, Phase
from vramplan.trace import decode_special_floats, load_trace_config, read_config_file

GiB = 2**30


def test_special_floats_decoded_like_transformers(tmp_path: Path) -> None:
    raw = {"model_type": "x", "a": {"__float__": "Infinity"}, "b": [{"__float__": "-Infinity"}],
           "c": {"d": {"__float__": "NaN"}}, "e": {"__float__": "other"}, "f": {"__float__": "Infinity", "g": 1}}
    out = decode_special_floats(raw)
    assert out["a"] == math.inf and out["b"] == [-math.inf] and math.isnan(out["c"]["d"])
    assert out["e"] == {"__float__": "other"} and out["f"] == {"__float__": "Infinity", "g": 1}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(raw))
    assert read_config_file(tmp_path)["a"] == math.inf  # a directory holding config.json
    assert load_trace_config(str(p))[0]["a"] == math.inf


def test_unreadable_config_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(VramplanError, match="not valid JSON"):
        read_config_file(p)
    p.write_text("[1, 2]")
    with pytest.raises(VramplanError, match="not a JSON object"):
        read_config_file(p)
    with pytest.raises(VramplanError, match="cannot read"):
        read_config_file(tmp_path / "missing.json")


# ---- below needs the [torch] extra ---------------------------------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.trace import trace_workload  # noqa: E402
from vramplan.trace._resolve import hf_config, model_class  # noqa: E402
from vramplan.workload import Method, Task, Workload  # noqa: E402

TINY_LLAMA: dict[str, Any] = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=512)
INFER = Workload(task=Task.INFER, batch_size=2, seq_len=64, new_tokens=4)


def test_model_class_from_the_auto_mapping() -> None:
    cfg, warns = hf_config(TINY_LLAMA, "t")
    assert type(cfg).__name__ == "LlamaConfig" and not warns
    assert model_class(cfg, "t").__name__ == "LlamaForCausalLM"
    # a vision-language config the causal-LM mapping does not hold: the image-text-to-text mapping builds it
    llava, _ = hf_config({"model_type": "llava"}, "t")
    assert model_class(llava, "t").__name__ == "LlavaForConditionalGeneration"
    # gemma3: the architectures field picks among the mapping's classes as transformers does
    g3, _ = hf_config({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "t")
    assert model_class(g3, "t").__name__ == "Gemma3ForConditionalGeneration"


def test_unknown_model_type_resolved_through_architectures() -> None:
    """A model_type transformers does not ship, whose architectures class it does (the exaone/internlm3 case)."""
    cfg, warns = hf_config({**TINY_LLAMA, "model_type": "not-a-real-type", "architectures": ["LlamaForCausalLM"]},
                           "t")
    assert type(cfg).__name__ == "LlamaConfig"
    assert any("'llama'" in w for w in warns)
    with pytest.raises(VramplanError, match="not known to transformers"):
        hf_config({**TINY_LLAMA, "model_type": "not-a-real-type"}, "t")


def test_remote_code_is_refused_in_one_line() -> None:
    raw = {**TINY_LLAMA, "model_type": "my_custom_llm",
           "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    with pytest.raises(VramplanError) as err:
        trace_workload(raw, INFER, name="custom")
    msg = str(err.value)
    assert "\n" not in msg and "trust_remote_code stays off" in msg and "auto_map" in msg
    # auto_map on a model_type transformers ships: transformers uses its built-in classes, and so does the trace
    est = trace_workload({**TINY_LLAMA, "auto_map": {"AutoConfig": "x.Y"}}, INFER, name="t")
    assert any("auto_map" in w for w in est.warnings)


def test_special_float_config_traces() -> None:
    """A transformers >= 5 config with {"__float__": "Infinity"} (the falcon_h1 / mamba2 case)."""
    raw = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8, "head_dim": 16,
           "state_size": 16, "n_groups": 1, "vocab_size": 256, "expand": 2, "chunk_size": 32,
           "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    est = trace_workload(raw, INFER, name="m2")
    assert est.peak_allocated_bytes > 0
    # recurrent and convolution state are cache, not activations: per layer a conv state (batch, intermediate
    # + 2 x groups x state, conv kernel) and an SSM state (batch, heads, head_dim, state)
    decode = next(p for p in est.phases if p.phase is Phase.DECODE).breakdown
    conv = 2 * (128 + 2 * 16) * 4
    ssm = 2 * 8 * 16 * 16
    assert decode[MemoryKind.KV_CACHE] >= 2 * 2 * (conv + ssm)  # 2 layers, at least 2 bytes per element
    assert any("plain-PyTorch fallback" in a for a in est.assumptions)
    assert any("plain-PyTorch fallback" in w for w in est.warnings)


def _dbrx() -> dict[str, Any]:
    return {"model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256, "max_seq_len": 256,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}}


def test_moe_loop_dispatch_runs_under_a_stated_routing() -> None:
    """dbrx dispatches with one_hot + nonzero + torch.where: data-dependent shapes answered from the routing."""
    w = Workload(task=Task.INFER, batch_size=2, seq_len=128, new_tokens=2)
    bal = trace_workload(_dbrx(), w, name="dbrx")
    worst = trace_workload(_dbrx(), w, name="dbrx", routing="worst")
    note = next(a for a in bal.assumptions if a.startswith("MoE routing assumption: balanced"))
    assert "MoE tokens per expert (balanced)" in note
    assert any(a.startswith("MoE routing assumption: worst") for a in worst.assumptions)
    # all tokens on the same top_k experts: each of those experts processes every token (bigger transients)
    assert worst.peak_allocated_bytes >= bal.peak_allocated_bytes
    with pytest.raises(VramplanError, match="routing"):
        trace_workload(_dbrx(), w, name="dbrx", routing="random")


def test_moe_routing_counts_in_the_tracker() -> None:
    """The nonzero answers themselves: balanced E experts hit and T*k/E tokens each; worst k hit, T tokens each."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.trace._tracker import MemoryTracker

    tokens, k, experts = 96, 2, 8
    for routing, hit, per_expert in (("balanced", experts, tokens * k // experts), ("worst", k, tokens)):
        tracker = MemoryTracker()
        tracker.routing = routing
        with FakeTensorMode(), tracker, torch.inference_mode():
            ids = torch.zeros(tokens, k, dtype=torch.long)
            mask = torch.nn.functional.one_hot(ids, num_classes=experts).permute(2, 1, 0)
            assert torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().shape[0] == hit
            rows, _ = torch.where(mask[3])
            assert rows.shape[0] == per_expert
            assert torch.ones(5, dtype=torch.bool).nonzero().shape[0] == 5  # no routing meaning: all-true


def test_lora_training_on_moe_loop_model() -> None:
    est = trace_workload(_dbrx(), Workload(method=Method.FULL, batch_size=1, seq_len=64), name="dbrx")
    assert est.peak_allocated_bytes > 0 and any("MoE routing" in a for a in est.assumptions)


def test_versions_stated() -> None:
    import peft
    import torch
    import transformers

    est = trace_workload(TINY_LLAMA, INFER, name="t")
    line = est.assumptions[0]
    for v in (torch.__version__, transformers.__version__, peft.__version__):
        assert v in line


def test_cli_trace_takes_configs_the_estimator_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vramplan.cli import main

    p = tmp_path / "config.json"
    p.write_text(json.dumps(_dbrx()))
    assert main(["trace", str(p), "--task", "infer", "--batch-size", "1", "--seq-len", "32", "--new-tokens", "1",
                 "--json", "--routing", "worst"]) == 0
    out = json.loads(capsys.readouterr().out)
    import transformers

    assert out["versions"]["transformers"] == transformers.__version__
    assert out["peak_allocated_bytes"] > 0 and any("worst" in a for a in out["assumptions"])
    p.write_text(json.dumps({"model_type": "x-custom", "auto_map": {"AutoConfig": "a.B"}}))
    assert main(["trace", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auto_map" in err and "Traceback" not in err


def test_vision_language_model_built_whole_with_a_warning() -> None:
    raw = {"model_type": "llava", "text_config": {**TINY_LLAMA},
           "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                             "projection_dim": 32}}
    # --text-only: the whole model is built, but only text tokens run (a warning says the tower is not traced)
    est = trace_workload(raw, INFER.with_(text_only=True), name="llava-tiny")
    assert any("LlavaForConditionalGeneration" in a for a in est.assumptions)
    assert any("vision_config" in w and "not traced" in w for w in est.warnings)
    text_only = trace_workload(TINY_LLAMA, INFER, name="t")
    assert est.parameters > text_only.parameters  # the vision tower and projector are counted
    # by default one image per sample runs through the tower: its 16 patch tokens join each sequence
    with_image = trace_workload(raw, INFER, name="llava-tiny")
    assert any("16 image tokens" in a for a in with_image.assumptions)
    assert not any("not traced" in w for w in with_image.warnings)
    assert with_image.peak_allocated_bytes > est.peak_allocated_bytes


def test_moe_token_counts_read_back_by_tolist() -> None:
    """JetMoeTopKGating: ``zeros(tokens, E).scatter(1, topk(logits).indices, 1).long().sum(0).tolist()`` gives the
    per-expert counts its ``split`` needs: answered from the routing assumption (they sum to tokens x k)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.trace._tracker import MemoryTracker

    tokens, k, experts = 100, 2, 8
    for routing, want in (("balanced", [25] * 8), ("worst", [100, 100] + [0] * 6)):
        tracker = MemoryTracker()
        tracker.routing = routing
        with FakeTensorMode(), tracker, torch.inference_mode():
            logits = torch.zeros(tokens, experts)
            _, idx = logits.topk(k, dim=1)
            gates = torch.zeros(tokens, experts).scatter(1, idx, 1)
            counts = gates.long().sum(0).tolist()
            assert counts == want
            assert sum(len(p) for p in torch.zeros(tokens * k, 4).split(counts)) == tokens * k
            assert torch.nonzero(gates).shape[0] == tokens * k  # the (tokens, E) mask: top_k per row
    # uneven: the first experts take one more
    tracker = MemoryTracker()
    with FakeTensorMode(), tracker, torch.inference_mode():
        _, idx = torch.zeros(7, 4).topk(1, dim=1)
        assert torch.zeros(7, 4).scatter(1, idx, 1).long().sum(0).tolist() == [2, 2, 2, 1]


def test_deepcopy_of_a_fake_constant_tensor() -> None:
    """copy.deepcopy of a fake tensor made by torch.tensor (what Inkling2LoopTextModel's cache copies hold) is a clone
    in the trace, not the storage re-pointing that fails on fake tensors."""
    import copy

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.trace._engine import _trace_environment

    with _trace_environment(), FakeTensorMode():
        t = torch.tensor(5, dtype=torch.long)
        c = copy.deepcopy(t)
        assert c.shape == t.shape and c.dtype == t.dtype and c is not t
