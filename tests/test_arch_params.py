"""Exact parameter counts of every architecture ``vramplan estimate`` reads, against the real model.

Reference: transformers builds the model from the library-default config of each model type (cut to a few
layers, shapes shrunk so the meta-device build is instant) on the meta device; ``sum(p.numel())`` must equal
:func:`vramplan.params.count_params` exactly. Skipped without torch/transformers.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from vramplan.hfconfig import SUPPORTED_MODEL_TYPES, spec_from_config
from vramplan.params import count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# the shapes each test config gets (where the type has such a field), to keep the build small
SMALL = {"num_hidden_layers": 4, "n_layer": 4, "num_layers": 4, "n_layers": 4, "vocab_size": 1000}
# model types read under another name: the catalog's configs say "gemma3" for the image-text Gemma 3
SKIP = {"gemma3_text_alias",
        "nemotron_h",  # its library default holds a MoE block, which estimate refuses: see SSM_VARIANTS
        "nemotron",  # NemotronConfig leaves num_key_value_heads None (its attention cannot build): see VARIANTS
        "dots1",  # Dots1Config leaves n_routed_experts unset (transformers cannot build its default): see VARIANTS
        "deepseek_v2",  # DeepseekV2Config leaves num_experts_per_tok None (its forward cannot route): see VARIANTS
        "lfm2_moe",  # Lfm2MoeConfig leaves layer_types None (its decoder layer indexes it): see VARIANTS
        "cohere_compass_text",  # its default leaves rope_parameters empty (cannot build): see VARIANTS
        "zamba",  # a 4-layer cut of the default holds one hybrid layer, whose tie pattern transformers refuses
        "dbrx"}  # DbrxAttentionConfig has no rope_theta default and its layers are n_layers: tests/test_moe_b.py


def _library_default(model_type: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = transformers.AutoConfig.for_model(model_type).to_dict()
    full = next((cfg[k] for k in SMALL if k in cfg and isinstance(cfg[k], int) and k != "vocab_size"), None)
    for k, v in SMALL.items():
        if k in cfg:
            cfg[k] = v
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        # inside the small vocabulary (configs with strict int fields, CWM's, refuse None)
        cfg[k] = 0 if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) else None
    if "head_dim" in cfg and cfg["head_dim"] is None:  # Ministral's default leaves it unset and cannot build
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(over)
    layers = next(cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in cfg)
    # a per-layer list of the default (one entry per layer of its stack: layer kinds, Ling 3's swiglu limits, which
    # transformers 5.25 checks) is cut with the stack; shorter patterns the class tiles over it are tiled below
    for k, v in list(cfg.items()):
        if k != "architectures" and k not in over and isinstance(v, list) and full and full > layers and \
                len(v) == full:
            cfg[k] = v[:layers]
    for k in ("layer_types", "no_rope_layers", "layers_block_type", "mlp_layer_types", "indexer_types",
              "intermediate_size", "activation_sparsity_pattern"):  # (per-layer lists: Gemma 3n's widths, sparsity)
        if isinstance(cfg.get(k), list):
            cfg[k] = (cfg[k] * layers)[:layers]
    if isinstance(cfg.get("num_attention_heads_per_layer"), list):  # Laguna: one head count per layer (the default's
        cfg["num_attention_heads_per_layer"] = [cfg["num_attention_heads"]] * layers  # repeat the model-wide one)
    if isinstance(cfg.get("num_kv_shared_layers"), int):  # a KV-sharing tail (Gemma 3n: 15 of 35) within the cut
        cfg["num_kv_shared_layers"] = min(cfg["num_kv_shared_layers"], layers // 2)
    if "attention_types" in cfg and "attention_types" not in over:  # GPT-Neo: [[kinds], repeats] expands per layer
        cfg["attention_types"] = [[["global", "local"], layers // 2]]
    cfg.pop("attention_layers", None)  # (GPT-Neo recomputes it from attention_types)
    if isinstance(cfg.get("per_layer_config"), dict):  # overrides keyed by layer index (Gemma 4): the kept layers'
        cfg["per_layer_config"] = {k: v for k, v in cfg["per_layer_config"].items() if int(k) < layers}
    return json.loads(json.dumps(cfg, default=str))


def _meta_count(cfg: dict[str, Any]) -> int:
    hf = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(hf)
            except ValueError:  # a text sub-config (emu3_text_model): the causal-LM class built on it
                from vramplan.derive._derive import text_sub_config_class

                cls = text_sub_config_class(type(hf))
                if cls is None:
                    raise
                model = cls._from_config(hf)
    return sum(p.numel() for p in model.parameters())


def _known(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_MODEL_TYPES if t not in SKIP])
def test_count_params_matches_meta_device(model_type: str) -> None:
    if not _known(model_type):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    cfg = _library_default(model_type)
    assert count_params(spec_from_config(cfg, model_type)).total == _meta_count(cfg)


# family facts the library defaults leave off: biases, sliding layers, MoE layout
VARIANTS = [
    ("lfm2_moe", {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1}),
    ("llama4_text", {"interleave_moe_layer_step": 2, "use_qk_norm": False, "moe_layers": None}),
    ("granite_swa", {"layer_rope_theta": [10000.0, 0.0, 10000.0, 0.0]}),
    ("hunyuan_v1_moe", {"num_experts": 4, "moe_topk": 2}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}),
    ("cohere_compass_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    ("cohere_compass_text", {"layer_types": ["sliding_attention", "full_attention"] * 2, "tie_word_embeddings": False,
                             "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "full_attention": None}}),
    ("olmo2", {"attention_bias": True}),
    ("olmo", {"attention_bias": True}),
    ("hyperclovax", {"use_post_norm": False}),
    ("starcoder2", {"use_bias": False}),
    ("phi", {"qk_layernorm": True}),
    ("bitnet", {"attention_bias": True, "intermediate_size": 96}),
    ("hunyuan_v1_dense", {"attention_bias": True}),
    ("smollm3", {"no_rope_layers": [1, 1, 1, 0]}),
    ("ernie4_5", {"use_bias": True}),
    ("glm4", {"attention_bias": False}),
    ("internlm3", {"qkv_bias": True, "bias": True}),
    ("exaone4", {"sliding_window": 128, "sliding_window_pattern": 2}),
    ("deepseek_v2", {"num_experts_per_tok": 6}),
    ("deepseek_v2", {"num_experts_per_tok": 6, "q_lora_rank": None, "first_k_dense_replace": 1,
                     "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}),
    ("glm4_moe_lite", {"mlp_layer_types": ["sparse", "dense", "sparse", "dense"]}),
    ("minicpm3", {"v_head_dim": None, "q_lora_rank": None}),
    ("dots1", {"n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
               "first_k_dense_replace": 1}),
    ("flex_olmo", {"attention_bias": True}),
    ("gpt_oss", {"attention_bias": False}),
    # MiMo-V2-Flash: the sliding layers' doubled KV heads and sinks placed by layer_types, values as wide as q/k
    ("mimo_v2_flash", {"attention_bias": True, "mlp_layer_types": ["sparse", "dense", "sparse", "dense"],
                       "layer_types": ["sliding_attention", "full_attention"] + ["sliding_attention"] * 2}),
    ("mimo_v2_flash", {"v_head_dim": 192, "attention_value_scale": None}),
    ("flint", {"attention_bias": True, "mlp_only_layers": [2], "decoder_sparse_step": 2}),
    ("beam", {"attention_bias": True, "mlp_layer_types": ["sparse", "dense", "sparse", "sparse"],
              "layer_types": ["full_attention", "sliding_attention"] * 2}),
    ("cohere", {"use_qk_norm": True}),  # per-head CohereLayerNorms with (heads, head_dim) weights
    ("stablelm", {"qk_layernorm": True, "use_parallel_residual": True, "use_qkv_bias": True}),
    ("nemotron", {"num_key_value_heads": 8, "attention_bias": True, "mlp_bias": True}),
    ("gpt_bigcode", {"multi_query": False, "n_inner": 1000}),
    ("persimmon", {"qk_layernorm": False}),
    ("gpt_neo", {"attention_types": [[["global"], 4]], "intermediate_size": 1000, "tie_word_embeddings": False}),
]


@pytest.mark.parametrize(("model_type", "over"), VARIANTS)
def test_count_params_variants(model_type: str, over: dict[str, Any]) -> None:
    if not _known(model_type):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    cfg = _library_default(model_type, **over)
    assert count_params(spec_from_config(cfg, model_type)).total == _meta_count(cfg)


# state-space and hybrid families (vramplan.ssm): attention layers placed, biases and groups varied
SSM_VARIANTS = [
    ("mamba2", {"use_bias": True, "n_groups": 1, "use_conv_bias": False}),
    ("bamba", {"attn_layer_indices": [1, 3], "mamba_proj_bias": True, "attention_bias": True}),
    ("granitemoehybrid", {"layer_types": ["mamba", "attention", "mamba", "mamba"], "position_embedding_type": "rope"}),
    ("granitemoehybrid", {"num_local_experts": 0, "layer_types": ["linear_attention", "full_attention"] * 2}),
    ("lfm2", {"layer_types": ["conv", "full_attention", "conv", "conv"], "conv_bias": True,
              "block_ffn_dim_multiplier": 1.5}),
    ("nemotron_h", {"num_hidden_layers": 4, "layers_block_type": ["mamba", "attention", "mlp", "mamba"],
                    "use_bias": True, "mlp_bias": True}),
    ("nemotron_h", {"num_hidden_layers": 4, "layers_block_type": None, "hybrid_override_pattern": "M-M*"}),
    ("falcon_h1", {"mamba_d_ssm": None, "mamba_n_heads": 64, "mamba_d_head": 128, "projectors_bias": True,
                   "attention_bias": True,
                   "head_dim": 64}),
    ("mamba", {"use_bias": True, "use_conv_bias": False, "time_step_rank": 7, "state_size": 8}),
    ("falcon_mamba", {"expand": 3}),
    ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_proj_bias": True}),
    ("jamba", {"num_experts": 1, "attn_layer_period": 4, "attn_layer_offset": 0}),
    ("zamba", {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]}),
    ("zamba", {"layers_block_type": ["hybrid", "hybrid", "mamba", "mamba"], "n_mamba_heads": 4,
               "mamba_proj_bias": True, "num_key_value_heads": 4}),
    ("zamba2", {"layers_block_type": ["mamba", "hybrid", "hybrid", "hybrid"], "num_mem_blocks": 2,
                "use_shared_attention_adapter": True, "num_key_value_heads": 8, "add_bias_linear": True}),
]


@pytest.mark.parametrize(("model_type", "over"), SSM_VARIANTS)
def test_count_params_ssm_variants(model_type: str, over: dict[str, Any]) -> None:
    cfg = _library_default(model_type, **over)
    assert count_params(spec_from_config(cfg, model_type)).total == _meta_count(cfg)
