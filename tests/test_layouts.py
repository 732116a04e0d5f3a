"""GPT-style layouts read from data (vramplan.layouts): parameter counts checked against the meta-device model,
estimates against the fake-tensor trace of the library's own code, and the refusals transformers makes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.api import estimate
from vramplan.errors import ConfigError, WorkloadError
from vramplan.hfconfig import spec_from_config
from vramplan.layouts import layout_types
from vramplan.workload import Method, Task, Workload

from .trace_match import assert_workload_matches_trace

# small vocabularies, so that the layers' mechanisms decide the peak rather than the logits
LAYOUTS: dict[str, dict[str, Any]] = {
    # ALiBi added in fp32 to the eager scores, boolean masked_fill, the scores and the fused qkv held by the
    # attention's locals, the weights returned and held by the model loop; LayerNorms without bias
    "mpt": dict(model_type="mpt", d_model=1024, n_heads=8, n_layers=2, vocab_size=1000, max_seq_len=4096),
    # qkv_proj in mp_num blocks, rotate-every-two rotary on fp32 sin/cos (cast back), a parallel block, biased head
    "codegen": dict(model_type="codegen", n_embd=1024, n_head=8, n_layer=2, vocab_size=1000, n_positions=4096,
                    rotary_dim=32),
    # pre-norm fairseq layer with fc1/fc2 called inline, dropouts of 0.1, scaled embeddings, (1, seq) learned positions
    "biogpt": dict(model_type="biogpt", hidden_size=1024, num_attention_heads=8, num_hidden_layers=2, vocab_size=1000,
                   max_position_embeddings=4096, intermediate_size=4096),
    # the same layer with XGLMAttention (eager: scaled q, reshape copies, clamped bf16 scores, weights held by the
    # layer) and sinusoidal positions from a buffer
    "xglm": dict(model_type="xglm", d_model=1024, attention_heads=8, num_layers=2, vocab_size=1000, ffn_dim=4096),
    # separate biased Wq/Wk/Wv, a Sequential ReLU FFN, the normed input and attention output held by the layer's
    # locals, the sinusoidal table as a buffer (no gradient checkpointing)
    "ctrl": dict(model_type="ctrl", n_embd=1024, n_head=8, n_layer=2, vocab_size=1000, n_positions=4096, dff=4096),
    # post-LN blocks, three (B, H, S, S) score tensors alive together against the causal buffer, no KV cache (the last
    # generate step re-runs the whole sequence), no gradient checkpointing
    "openai-gpt": dict(model_type="openai-gpt", n_embd=1024, n_head=8, n_layer=2, vocab_size=1000, n_positions=4096),
    # baddbmm against a held zeros tensor, bf16 softmax, masked scores and fused qkv held, attention weights held by
    # the loop, the layer's normed input held to its end, the last layer's dense_bias (no gradient checkpointing)
    "gpt_neox_japanese": dict(model_type="gpt_neox_japanese", hidden_size=1024, num_attention_heads=8,
                              num_hidden_layers=2, vocab_size=1000, max_position_embeddings=4096),
    # a LLaMA-class family (hfconfig._FAMILIES): differential attention, two attention calls over the halves of the
    # values, lambda re-weighting and a weightless RMSNorm per 2 x head_dim group
    "diffllama": dict(model_type="diffllama", hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096, intermediate_size=2816),
}
NO_CHECKPOINTING = ("ctrl", "openai-gpt", "gpt_neox_japanese")
LORA_TARGETS = {"mpt": ("Wqkv",), "codegen": ("qkv_proj",)}
WORKLOADS = {
    "full": Workload(batch_size=2, seq_len=1024),
    "lora-ckpt": Workload(method=Method.LORA, batch_size=4, seq_len=2048, gradient_checkpointing=True),
    "infer": Workload(task=Task.INFER, batch_size=4, seq_len=2048, new_tokens=8),
}
# cells still outside 2% at these widths (the library-default coverage cells are within): named, strict, so that a fix
# shows
_OFF = {("mpt", "lora-ckpt"): "+2.7%: the recomputed layer's backward holds ~48 MiB more than the trace, not found yet",
        ("codegen", "lora-ckpt"): "+2.6%: the recomputed layer's backward, not found yet",
        ("biogpt", "lora-ckpt"): "-2.3%: ~12 MiB of the recomputed layer's backward, not found (default cell -0.2%)",
        # CTRLModel.forward rebinds self.pos_encoding to a 16-bit copy; the trace still holds the fp32 table it was
        # built with (16 MiB here) where a real run frees it: the rest is within 0.5%
        ("ctrl", "full"): "-3.7%: the fp32 pos_encoding table the trace keeps beside its bf16 copy",
        ("ctrl", "infer"): "-4.1%: the fp32 pos_encoding table the trace keeps beside its bf16 copy"}
CELLS = [pytest.param(c, w, marks=pytest.mark.xfail(strict=True, reason=_OFF[c, w]) if (c, w) in _OFF else ())
         for c in sorted(LAYOUTS) for w in sorted(WORKLOADS) if not (c in NO_CHECKPOINTING and w == "lora-ckpt")]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "wname"), CELLS)
def test_layout_estimate_matches_trace(case: str, wname: str) -> None:
    cfg, w = LAYOUTS[case], WORKLOADS[wname]
    if w.method is Method.LORA:
        w = replace(w, lora_targets=LORA_TARGETS.get(case, ("q_proj", "v_proj")))
    assert_workload_matches_trace(cfg, w, name=case, label=f"{case} {wname}")


@pytest.mark.parametrize("model_type", layout_types())
def test_layout_counts_match_the_meta_model(model_type: str) -> None:
    """Library default and a copy per config key the layout reads: the reader counts what transformers builds."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vramplan.derive._layouts import check_layout

    assert check_layout(model_type) == []


def test_layout_check_catches_a_wrong_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import vramplan.layouts as lay
    from vramplan.derive._layouts import check_layout

    version, data = lay._load()
    wrong = {"keys": ["n_inner"], "of": "hidden_size", "times": 2}  # CodeGenBlock: 4 x n_embd without n_inner
    bad = {**data, "codegen": {**data["codegen"], "keys": {**data["codegen"]["keys"], "intermediate_size": wrong}}}
    monkeypatch.setattr(lay, "_load", lambda: (version, bad))
    problems = check_layout("codegen")
    assert any("library default" in p for p in problems), problems


def test_mpt_alibi_scores_are_fp32() -> None:
    """MPT's fp32 ALiBi bias makes the masked scores and the softmax fp32, held to the attention's end: without the
    mechanism a training step holds less. (In inference the prefill peak is the same either way: the bf16 scores'
    fp32 softmax copy takes the place of the fp32 scores.)"""
    spec = spec_from_config(LAYOUTS["mpt"], name="mpt")
    w = WORKLOADS["full"]
    plain = replace(spec, scores_bias_fp32=False, scores_held=False)
    assert estimate(spec, w).peak_allocated_bytes > estimate(plain, w).peak_allocated_bytes
    assert spec.position.value == "alibi" and not spec.sdpa and not spec.norm_bias


def test_mpt_refuses_clip_qkv() -> None:
    with pytest.raises(ConfigError, match="clip_qkv"):
        spec_from_config({**LAYOUTS["mpt"], "attn_config": {"clip_qkv": 8}}, name="mpt")


@pytest.mark.slow
@pytest.mark.parametrize("case", NO_CHECKPOINTING)
def test_checkpointing_refused_like_transformers(case: str) -> None:
    """transformers refuses gradient checkpointing for these classes; estimate refuses the same workload."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    w = replace(WORKLOADS["lora-ckpt"], lora_targets=("all-linear",))
    with pytest.raises(Exception, match="checkpointing"):
        trace_workload(LAYOUTS[case], w, name=case)
    with pytest.raises(WorkloadError, match="gradient checkpointing"):
        estimate(spec_from_config(LAYOUTS[case], name=case), w)


def test_no_checkpointing_where_transformers_refuses_it() -> None:
    spec = replace(spec_from_config(LAYOUTS["mpt"], name="mpt"), gradient_checkpointing=False)
    with pytest.raises(WorkloadError, match="gradient checkpointing"):
        estimate(spec, replace(WORKLOADS["lora-ckpt"], lora_targets=("Wqkv",)))
    estimate(spec, replace(WORKLOADS["lora-ckpt"], lora_targets=("Wqkv",), gradient_checkpointing=False,
                           checkpointing="none"))


def test_diffllama_refuses_odd_kv_heads() -> None:
    with pytest.raises(ConfigError, match="even num_key_value_heads"):
        spec_from_config({**LAYOUTS["diffllama"], "num_key_value_heads": 3}, name="diffllama")


def test_compose_finds_decoder_stacks_by_structure() -> None:
    """derive's composition finds the decoder-layer stack and final norm by structure (transformer.blocks, norm_f),
    and names the stacks where there is not exactly one (HRM's two)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import copy

    from vramplan.derive._compose import _final_norm, _layers
    from vramplan.derive._configs import cut_layers
    from vramplan.derive._derive import _causal_lm_class, _config_class

    def meta(t: str) -> Any:
        cc = _config_class(t)
        with torch.device("meta"):
            return _causal_lm_class(cc)._from_config(cc.from_dict(copy.deepcopy(cut_layers(cc().to_dict(), 2))))

    mpt = meta("mpt")
    assert _layers(mpt) is mpt.transformer.blocks and _final_norm(mpt) is mpt.transformer.norm_f
    with pytest.raises(LookupError, match=r"L_module\.layers, model\.H_module\.layers"):
        _layers(meta("hrm_text"))


@pytest.mark.parametrize(("model_type", "why"), [("cpmant", "CPM-Ant"), ("xlstm", "mLSTM"),
                                                  ("gemma4_unified_assistant", "draft")])
def test_refusals_name_the_missing_mechanism(model_type: str, why: str) -> None:
    """A type derive refused is refused by estimate with derive's reason (data/recipes ``refused``)."""
    with pytest.raises(ConfigError, match=why):
        spec_from_config({"model_type": model_type, "hidden_size": 64}, name=model_type)


def test_cut_reindexes_layers_that_read_another_layers_state() -> None:
    """A per-layer list of layer indices (Kolibri 1.1's kv_source_layers: indexed-attention layers reading an earlier
    indexer's keys and values) is re-indexed by the cut, and each kept layer keeps the layer it reads (transformers
    5.25's Kolibri11Config refuses a sliding layer reading another layer, or a source outside the stack)."""
    from vramplan.derive._configs import cut_layers

    kinds = ["sliding", "sliding", "indexed", "sliding", "indexed", "indexed", "sliding", "indexed"]
    sources = [0, 1, 2, 3, 4, 2, 6, 4]
    cut = cut_layers({"num_hidden_layers": 8, "layer_types": kinds, "kv_source_layers": sources,
                      "index_layers": [2, 4]}, 2)
    n = cut["num_hidden_layers"]
    assert len(cut["layer_types"]) == len(cut["kv_source_layers"]) == n < 8
    for i, (k, src) in enumerate(zip(cut["layer_types"], cut["kv_source_layers"], strict=True)):
        assert 0 <= src < n and (src == i or (k == "indexed" and cut["layer_types"][src] == "indexed"))
    assert any(src != i for i, src in enumerate(cut["kv_source_layers"]))  # a reading layer is kept, re-pointed
    assert all(cut["kv_source_layers"][i] == i for i in cut["index_layers"])
