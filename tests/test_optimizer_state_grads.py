"""Parameters that never receive a gradient get no optimizer state and no gradient, in the trace and in the estimate.

torch's optimizers create a parameter's state in their first ``step()`` only where ``p.grad is not None``
(torch/optim/adam.py ``_init_group``, which AdamW inherits; sgd.py, _adafactor.py, _muon.py alike), so a layer the
forward skips (Mllama's cross-attention layers on text) holds no AdamW moments. The ground truth here is the real
thing: the same model built on real CPU tensors, one real forward, backward and ``optimizer.step()``, and the bytes
of the state that step created.
"""

from __future__ import annotations

from typing import Any

import pytest

from vramplan import estimate, spec_from_config
from vramplan.api import make_workload
from vramplan.kinds import MemoryKind

# Llama 3.2 Vision's language model, tiny: layer 1 is a cross-attention layer, idle without image states
MLLAMA = {"model_type": "mllama",
          "text_config": {"model_type": "mllama_text_model", "vocab_size": 1000, "hidden_size": 256,
                          "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "cross_attention_layers": [1], "bos_token_id": 1,
                          "eos_token_id": 2, "pad_token_id": 3},
          "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                            "num_global_layers": 1, "attention_heads": 2, "vision_output_dim": 128,
                            "intermediate_layers_indices": [0]}}

# DeepSeek-V3.2 with small widths (one dense, one MoE layer): its DSA indexer's forward is @torch.no_grad()
DSA = {"model_type": "deepseek_v32", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
       "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
       "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
       "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
       "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16, "vocab_size": 512, "max_position_embeddings": 256}
# HY-V4: the same indexer, its weights_proj and k_norm kept in fp32 (_keep_in_fp32_modules_strict); layer 2 "shared"
HY = {"model_type": "hy_v4", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
      "intermediate_size": 512, "moe_intermediate_size": 64, "q_lora_rank": 96, "kv_lora_rank": 64,
      "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "index_n_heads": 4, "index_head_dim": 32,
      "index_topk": 64, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "num_hidden_layers": 3,
      "mlp_layer_types": ["dense", "sparse", "sparse"], "indexer_types": ["full", "full", "shared"], "hc_mult": 4,
      "vocab_size": 2048, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
# LLaVA-1.5's layout with one image: the projector reads hidden_states[-2], so the CLIP tower's last layer runs but
# reaches nothing the loss depends on, nor does its post_layernorm (the pooled class token)
LLAVA = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
         "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 256, "intermediate_size": 512,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 256,
                           "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                           "projection_dim": 128}}
# Fuyu on text: FuyuModel.vision_embed_tokens (a patch embedding) is built, never called
FUYU = {"model_type": "fuyu", "patch_size": 30, "num_channels": 3,
        "text_config": {"model_type": "persimmon", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
                        "num_hidden_layers": 2, "num_attention_heads": 4}}
MODELS: dict[str, tuple[dict[str, Any], str]] = {"mllama": (MLLAMA, "layers.1."), "dsa": (DSA, ".indexer."),
                                                 "hy": (HY, ".indexer."), "llava": (LLAVA, "vision_tower."),
                                                 "fuyu": (FUYU, "vision_embed_tokens")}

CASES = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "lora_targets": "q_proj,v_proj"},
    "freeze": {"method": "freeze", "trainable_layers": 2},  # the idle layer among the trained ones
    "amp": {"method": "full", "precision": "amp-bf16"},
    "sgd": {"method": "full", "optimizer": "sgd"},
    "lion": {"method": "full", "optimizer": "lion"},
    "hf-trainer": {"method": "full", "trainer": "hf"},
}


def _real_first_step(cfg: dict[str, Any], opts: dict[str, Any]) -> tuple[list[str], list[Any], list[Any]]:
    """The model the trace builds, on real tensors: one forward (text, and one image per sample for a VLM other than
    Mllama's language model), backward, the optimizer's first step.
    Returns the trainable parameters left without a gradient, the state tensors the step created and the
    gradients."""
    torch = pytest.importorskip("torch")
    from vramplan.trace._build import build_model, make_optimizer

    w = make_workload(batch_size=2, seq_len=16, **opts)
    prev = torch.get_default_dtype()
    try:
        built = build_model(cfg, w, "m")
    finally:
        torch.set_default_dtype(prev)
    named = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    ids = torch.randint(4, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    extra: dict[str, Any] = {}
    if "vision_config" in cfg and cfg["model_type"] != "mllama":  # one image per sample, as the trace feeds it
        from vramplan.trace._images import image_inputs

        imgs = image_inputs(built.model, built.config, 2, 16, 1, None, torch.bfloat16)
        ids, extra = imgs.ids, imgs.kwargs
    built.model(input_ids=ids, labels=ids, **extra).loss.backward()
    opt, _ = make_optimizer([p for _, p in named], w.optimizer)
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for _, p in named if p.grad is not None]
    return [n for n, p in named if p.grad is None], state, grads


def _state_at_forward(e: Any) -> int:
    """The optimizer state the forward runs beside (the step's temporaries do not exist yet)."""
    return int(next(p for p in e.phases if p.phase.value == "forward").breakdown[MemoryKind.OPTIMIZER_STATE])


@pytest.mark.parametrize(("model", "case"), [("mllama", c) for c in CASES] + [
    ("dsa", "full"), ("dsa", "lora-indexer"), ("dsa", "sgd"), ("hy", "full"), ("llava", "full"), ("fuyu", "full")])
def test_optimizer_state_is_what_the_first_step_creates(model: str, case: str) -> None:
    """Trace and estimate hold the optimizer state a real first step creates: none for the parameters backward left
    without a gradient (Mllama's idle cross-attention layer; DSA's indexer, which runs under no_grad; the CLIP
    layer after LLaVA's feature layer). Before, both made it for every trainable parameter (35% more on the Mllama
    model under full fine-tuning), and the estimate counted the indexer's and the CLIP layer's gradients too."""
    pytest.importorskip("transformers")
    from vramplan.trace import trace_workload
    from vramplan.trace._tracker import block_bytes

    cfg, idle = MODELS[model]
    opts = CASES.get(case) or {"method": "lora", "lora_targets": "q_a_proj,wq_b,wk,weights_proj"}
    nograd, state, grads = _real_first_step(cfg, opts)
    assert nograd and all(idle in n for n in nograd)  # only the idle layer's or the indexers'
    w = make_workload(batch_size=2, seq_len=128, **opts)
    tr = trace_workload(cfg, w, name=model)
    est = estimate(spec_from_config(cfg, model), w)
    # the trace's fake tensors: every storage in 512-byte blocks (AdamW's CPU step counters included)
    assert _state_at_forward(tr) == sum(block_bytes(v.untyped_storage().nbytes()) for v in state)
    # the estimate: the moments' bytes (it does not count AdamW's 0-d step counters, which live on the CPU; nor does it
    # know DeepSeek's router weight is fp32: 1024 parameters here, hence the tolerance)
    moments = sum(v.nbytes for v in state if v.dim() > 0)
    assert _state_at_forward(est) == pytest.approx(moments, rel=0 if model == "mllama" else 1e-3)
    assert est.peak_allocated_bytes == pytest.approx(tr.peak_allocated_bytes, rel=0.01)
    assert est.parameters == tr.parameters
    if model == "llava":  # the whole model's gradients at the step: those backward made
        step = next(p for p in est.phases if p.phase.value == "optimizer_step")
        assert step.breakdown[MemoryKind.GRADIENTS] == sum(v.nbytes for v in grads)

@pytest.mark.parametrize("case", ["full", "lora", "freeze", "sgd"])
def test_allocation_stream_creates_the_state_the_estimate_counts(case: str) -> None:
    """The first step of the allocation stream (what is reserved) creates the state tensors of the parameters with
    a gradient, in their order: as many bytes as the estimate's optimizer state, none for the idle layer."""
    from vramplan.alloc_stream import _adapters, _optimizer, _param_tensors, _stepped, _trainable
    from vramplan.estimator import _first_trainable
    from vramplan.memory import model_states

    spec = spec_from_config(MLLAMA, "mllama")
    w = make_workload(batch_size=2, seq_len=128, **CASES[case])
    states = model_states(spec, w)
    params = _param_tensors(spec, w, states)
    first = _first_trainable(spec, w, states)
    stepped = _stepped(spec, w, params, first)
    created = _optimizer(w.optimizer, stepped, states)[0]
    assert sum(created) == states.optimizer_state
    assert sum(stepped) < sum(_trainable(w, params, _adapters(spec, w), first))  # the idle layer's tensors left out


def test_flat_fp32_optimizers_keep_state_for_every_trainable_parameter() -> None:
    """DeepSpeed ZeRO and Megatron step fp32 copies of every trainable parameter (a flat partition, zeros where
    backward made no gradient), so the idle layer has state there; torch's optimizers make none."""
    from vramplan.memory import model_states
    from vramplan.parallel.engines import _shard_info
    from vramplan.params import count_params
    from vramplan.workload import Precision

    spec = spec_from_config(MLLAMA, "mllama")
    w = make_workload(batch_size=2, seq_len=128, method="full")
    own, flat = model_states(spec, w), model_states(spec, w, flat=True)
    assert flat.gradients == own.gradients
    assert flat.optimizer_state == 2 * 2 * flat.trainable_parameters  # two bf16 AdamW moments for every parameter
    assert own.optimizer_state < flat.optimizer_state
    sh = _shard_info(spec, w, w, count_params(spec))  # what ZeRO's and Megatron's ranks shard
    assert sh.fp32.optimizer_state == model_states(spec, w.with_(precision=Precision.FP32), flat=True).optimizer_state
    assert sh.fp32.optimizer_state == 2 * 4 * flat.trainable_parameters
