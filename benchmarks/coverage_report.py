"""Coverage of every causal-LM model type of the installed transformers: does `estimate` answer, does `trace`
answer, and how far apart are they.

usage: python benchmarks/coverage_report.py [--types T1,T2] [--workloads full,lora,infer] [--no-trace]
                                            [--no-estimate] [--layers N] [--timeout S] [--jobs J]
                                            [--out benchmarks/coverage_results.json] [--fresh]

For each entry of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES the library-default config
(``CONFIG_MAPPING[model_type]()``) is cut to ``--layers`` decoder layers (2) keeping one layer of each kind
(see ``cut_layers``) and run through three workloads:

* full: full fine-tune, bf16 weights, AdamW, batch 1 x 1024
* lora: LoRA r16 on q_proj,v_proj (all-linear where the model has no q_proj/v_proj; in_proj where peft refuses
  all-linear, as for Mamba; else peft's default targets for the family), gradient checkpointing, batch 2 x 1024
* infer: inference, batch 4, prompt 2048 + 64 new tokens

Types are split into decoder-only (text), multimodal (a vision tower), encoder (an encoder model run as a decoder,
or the decoder half of an encoder-decoder: BERT, RoBERTa, BART, Whisper, TrOCR...) and other (audio, music,
speech). The
fake-tensor trace does not compute, so its cost depends on the op count, not on hidden sizes: the default
widths are kept (``--shrink`` divides widths by 4 where a run must be quicker).

Results are cached per type in ``--out`` (JSON, merged with what is there unless ``--fresh``) so that other
readers get per-type answers without re-running; the printed table and summary are made from that file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vramplan.derive._configs import LAYER_KEYS, cut_layers  # noqa: E402

GiB = 2**30
DEFAULT_OUT = ROOT / "benchmarks" / "coverage_results.json"
WORKLOADS: dict[str, dict[str, Any]] = {
    "full": {"task": "train", "method": "full", "precision": "bf16", "optimizer": "adamw", "batch_size": 1,
             "seq_len": 1024},
    "lora": {"task": "train", "method": "lora", "precision": "bf16", "optimizer": "adamw", "batch_size": 2,
             "seq_len": 1024, "lora_rank": 16, "lora_targets": "q_proj,v_proj", "gradient_checkpointing": True},
    "infer": {"task": "infer", "precision": "bf16", "batch_size": 4, "seq_len": 2048, "new_tokens": 64},
}
WIDTH_KEYS = ("hidden_size", "intermediate_size", "n_embd", "d_model", "ffn_dim", "n_inner", "moe_intermediate_size",
              "shared_expert_intermediate_size", "d_ff", "dim", "hidden_dim")


# Vision-language models people fine-tune whose classes are in transformers' image-text-to-text mapping only (not
# the causal-LM one): run with the causal-LM types, as multimodal (one image per sample at the processor's size)
VLM_TYPES = ("qwen2_5_vl", "qwen2_vl", "gemma3", "mllama", "llava", "llava_next", "idefics3", "smolvlm", "paligemma",
             "qwen3_vl", "internvl", "mistral3", "llama4")


def _config_fields(cls: type) -> set[str]:
    """The fields a config class declares (its dataclass fields, else its __init__ parameters): read without
    instantiating the class, whose defaults do not always build."""
    import inspect

    fields = getattr(cls, "__dataclass_fields__", None)
    return set(fields) if fields else set(inspect.signature(cls.__init__).parameters)


def category(model_type: str) -> str:
    """multimodal (a vision tower or image tokenizer), other (audio / music / speech), encoder (see below) or
    decoder-only."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as ma

    subs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    keys = " ".join(subs)
    if any(w in keys for w in ("vision", "vq", "image")):
        return "multimodal"
    if any(w in keys for w in ("audio", "text_encoder", "speech")):
        return "other"
    # an encoder that transformers also runs as a decoder (it has a masked-LM head: BERT, RoBERTa, ELECTRA...), the
    # decoder of a sequence-to-sequence model (BART, Marian, Whisper), or a decoder built to sit under an encoder
    # (BertGenerationDecoder; TrOCR's decoder_* config of VisionEncoderDecoderModel)
    causal = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    seq2seq = {**ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, **ma.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES}
    if (model_type in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type in seq2seq or causal.endswith("Decoder")
            or "decoder_layers" in _config_fields(CONFIG_MAPPING[model_type])):
        return "encoder"
    return "decoder-only"


SSM_KERNEL = "fused" if importlib.util.find_spec("mamba_ssm") else "torch"
# gated DeltaNet layers run fla's chunk_gated_delta_rule where flash-linear-attention is installed (transformers'
# hub_kernels.py use_kernel_func_from_hub_with_fallback), whatever mamba_ssm says
GDN_KERNEL = "fused" if importlib.util.find_spec("fla") and importlib.util.find_spec("causal_conv1d") else "torch"
GDN_TYPES = frozenset({"qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "lara_mini", "kimi_linear",
                       "bailing_hybrid"})
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length")
LONGEST = 2048 + 64  # the inference workload's prompt + new tokens


def fit_positions(d: dict[str, Any]) -> dict[str, Any]:
    """A default position table shorter than the workloads (bert's 512, gpt2's 1024) is enlarged to hold them:
    the workloads are fixed, and a checkpoint with that many positions is what such a run would use."""
    d = dict(d)
    for k in POSITION_KEYS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < LONGEST:
            d[k] = LONGEST
    return d


# transformers' own default configs that cannot build, completed from the published checkpoint's config.json
# (not tuning: without these the library itself raises before any memory is allocated).
DEFAULT_FIXES: dict[str, dict[str, Any]] = {
    # DbrxAttention reads attn_config.rope_theta, absent from DbrxAttentionConfig's defaults, and clamps with
    # clip_qkv (None by default: torch.clamp refuses both bounds None); databricks/dbrx-base: 500000, 8
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8}},
    # BambaConfig's default has no attention layer (attn_layer_indices None), and transformers 5.24's prefill then
    # fails in create_causal_mask (get_seq_length on a cache of linear-attention layers only);
    # ibm-ai-platform/Bamba-9B: attention at layers 9, 18, 27
    "bamba": {"attn_layer_indices": [9, 18, 27]},
    # the same for Granite 4.0's default (every layer Mamba): one attention layer makes it the hybrid the published
    # Granite 4.0-H checkpoints are (the cut keeps one layer of each kind, so where it sits does not matter)
    "granitemoehybrid": {"layer_types": ["linear_attention"] * 5 + ["full_attention"] + ["linear_attention"] * 26},
    # Lfm2Config's default makes every layer attention (full_attn_idxs: all); LiquidAI/LFM2-1.2B: attention at
    # 2, 5, 8, 10, 12, 14, short convolutions elsewhere
    "lfm2": {"full_attn_idxs": [2, 5, 8, 10, 12, 14], "layer_types": None},
    # Lfm2MoeConfig leaves layer_types None (its decoder layer indexes it); LiquidAI/LFM2-8B-A1B: attention every
    # fourth layer from layer 2, short convolutions elsewhere (the cut keeps one layer of each kind)
    "lfm2_moe": {"layer_types": ["full_attention" if i % 4 == 2 else "conv" for i in range(32)]},
    # HunYuanDenseV1Config leaves head_dim None and its attention computes head_dim ** -0.5 from it;
    # tencent/Hunyuan-7B-Instruct: head_dim 128 (= hidden_size / heads of the default)
    "hunyuan_v1_dense": {"head_dim": 128},
    # the same defect in HunYuanMoEV1Config (head_dim None); tencent/Hunyuan-A13B-Instruct: head_dim 128
    "hunyuan_v1_moe": {"head_dim": 128},
    # NemotronConfig leaves num_key_value_heads None and NemotronAttention divides by it; nvidia/Minitron-8B-Base and
    # Nemotron-4-340B: 8 key/value heads
    "nemotron": {"num_key_value_heads": 8},
    # DeepseekV2Config leaves num_experts_per_tok None (topk(k=None) fails), and its moe_intermediate_size 1407 gives
    # the grouped GEMM rows that are not a multiple of 16 bytes (torch._grouped_mm refuses them);
    # deepseek-ai/DeepSeek-V2-Lite: 6 routed experts per token, moe_intermediate_size 1408
    "deepseek_v2": {"num_experts_per_tok": 6, "moe_intermediate_size": 1408},
    # Dots1Config leaves n_routed_experts, n_shared_experts and num_experts_per_tok None (Dots1Experts'
    # torch.empty(None, ...) fails); rednote-hilab/dots.llm1.base (technical report arXiv 2506.05767): 128 routed
    # experts, 6 per token, 2 shared
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2},
    # CohereCompassTextConfig leaves rope_parameters empty while CohereCompassRotaryEmbedding reads it per layer type
    # (KeyError 'full_attention'); the published checkpoints state one entry per type. The rotary base does not
    # change any allocation: transformers' default theta (derive.completed_default completes it the same way)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # vision-language defaults whose towers do not fit together (the projector's output is not the text width, or
    # the SigLIP grid does not pool to mm_tokens_per_image): the published checkpoints' values
    # Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct: text width 3584, 28 heads, 4 KV heads, MLP 18944
    "qwen2_vl": {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                 "num_key_value_heads": 4}},
    "qwen2_5_vl": {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                   "num_key_value_heads": 4}},
    # Qwen/Qwen3-VL-8B-Instruct: vision out_hidden_size 4096 = the text width
    "qwen3_vl": {"vision_config": {"out_hidden_size": 4096}},
    # google/gemma-3-4b-it: SigLIP at 896 px, patch 14 (64 x 64 patches pooled 4 x 4 to 256 tokens)
    "gemma3": {"vision_config": {"image_size": 896, "patch_size": 14}},
    # HuggingFaceM4/Idefics3-8B-Llama3 (364 px, patch 14, pixel shuffle 2); HuggingFaceTB/SmolVLM-Instruct (384 px,
    # patch 14, pixel shuffle 3): the defaults' 224 px / patch 32 grid does not shuffle
    "idefics3": {"vision_config": {"image_size": 364, "patch_size": 14}},
    "smolvlm": {"vision_config": {"image_size": 384, "patch_size": 14}, "scale_factor": 3},
}


def shrink_widths(d: dict[str, Any], factor: int = 4) -> dict[str, Any]:
    d = dict(d)
    for k in WIDTH_KEYS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 256:
            d[k] = v // factor
    return d


def default_config(model_type: str, layers: int, shrink: bool) -> dict[str, Any]:
    from transformers import CONFIG_MAPPING

    d = CONFIG_MAPPING[model_type]().to_dict()
    for k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        d.pop(k, None)
    for key, fix in DEFAULT_FIXES.get(model_type, {}).items():
        d[key] = {**d[key], **fix} if isinstance(d.get(key), dict) and isinstance(fix, dict) else fix
    d = fit_positions(cut_layers(d, layers))
    for sub in ("text_config", "vision_config", "decoder_config", "global_config", "encoder_config"):
        if isinstance(d.get(sub), dict):
            d[sub] = cut_layers(d[sub], layers)
            if sub != "vision_config":
                d[sub] = fit_positions(d[sub])
            if shrink and sub == "text_config":
                d[sub] = shrink_widths(d[sub])
    if shrink:
        d = shrink_widths(d)
    return d


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:300]


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(tb):
        if "transformers" in fr.filename or "peft" in fr.filename or "torch" in fr.filename:
            return f"{Path(fr.filename).name}:{fr.lineno} {fr.name}"
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].name}" if tb else ""


def builds(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Whether transformers builds its own (cut) default config at all, on the meta device."""
    import torch

    from vramplan.trace._resolve import build_config, hf_config, model_class

    try:
        config, _ = hf_config(cfg, model_type)
        cls = model_class(config, model_type)
        with torch.device("meta"):
            cls._from_config(build_config(config, cls))
    except Exception as exc:
        return {"builds": False, "build_error": _reason(exc), "build_error_at": _where(exc)}
    return {"builds": True, "model_class": cls.__name__}


def linear_leaves(cfg: dict[str, Any], model_type: str) -> list[str]:
    """The leaf names of the nn.Linear modules of the model (its output head aside), as peft matches targets."""
    import torch

    from vramplan.trace._resolve import build_config, hf_config, model_class

    config, _ = hf_config(cfg, model_type)
    cls = model_class(config, model_type)
    with torch.device("meta"):
        model = cls._from_config(build_config(config, cls))
    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def trace_cell(cfg: dict[str, Any], model_type: str, wname: str) -> dict[str, Any]:
    from vramplan.api import make_workload
    from vramplan.errors import VramplanError
    from vramplan.trace import trace_workload

    opts = dict(WORKLOADS[wname])
    cell: dict[str, Any] = {}
    # in_proj: peft refuses all-linear on Mamba models (out_proj and conv1d take no LoRA there) and has no default
    attempts: list[str | None] = ["q_proj,v_proj", "all-linear", "in_proj", "default"] if wname == "lora" else [None]
    while attempts:
        attempt = attempts.pop(0)
        if attempt is not None:
            opts["lora_targets"] = attempt
        try:
            tr = trace_workload(cfg, make_workload(**opts), name=model_type)
        except VramplanError as exc:
            cell["trace_error"] = _reason(exc)
            bad = re.search(r"name LoRA targets without (\w+)", str(exc))
            if attempt == "all-linear" and bad:
                # a module peft wraps but whose forward its adapter breaks (DeepSeek-V4's o_a_proj): every other
                # linear, as a user would name them
                attempts.insert(0, ",".join(n for n in linear_leaves(cfg, model_type) if n != bad.group(1)))
                cell["lora_note"] = f"all-linear without {bad.group(1)}: peft cannot adapt it"
                continue
            if attempt in ("q_proj,v_proj", "all-linear", "in_proj") and "peft cannot apply LoRA" in str(exc):
                continue
        except Exception as exc:
            cell["trace_error"] = _reason(exc)
            cell["trace_error_at"] = _where(exc)
        else:
            cell.pop("trace_error", None)
            cell["trace_gib"] = tr.peak_allocated_bytes / GiB
            cell["trace_phase"] = tr.peak_phase.value
            cell["parameters"] = tr.parameters
            cell["trace_notes"] = [a for a in tr.assumptions if a.startswith(("MoE", "SSM", "vision", "model class"))]
            cell["trace_warnings"] = list(tr.warnings)
        break
    if wname == "lora":
        cell["lora_targets"] = opts["lora_targets"]
    return cell


def in_child(fn: Any, timeout: float, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child (a crash or a hang costs one cell, not the report)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target() -> None:
        try:
            out = fn(*args)
        except BaseException as exc:
            out = {"trace_error": _reason(exc)}
        send.send(out)
        send.close()

    proc = ctx.Process(target=target)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    out: dict[str, Any] | None = None
    if recv.poll(timeout):
        try:
            out = recv.recv()
        except EOFError:
            out = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if out is None:
        why = f"timed out after {timeout:.0f} s" if time.perf_counter() - t0 >= timeout else \
            f"child died (exit {proc.exitcode})"
        out = {"trace_error": f"Timeout: {why}" if "timed out" in why else f"Crash: {why}"}
    out["trace_s"] = round(time.perf_counter() - t0, 2)
    return out


def run_type(model_type: str, args: argparse.Namespace, cached: dict[str, Any] | None = None) -> dict[str, Any]:
    from vramplan.api import estimate, make_workload
    from vramplan.errors import VramplanError
    from vramplan.hfconfig import spec_from_config

    rec: dict[str, Any] = {"category": category(model_type), "cells": {}}
    try:
        cfg = default_config(model_type, args.layers, args.shrink)
    except Exception as exc:
        rec["config_error"] = _reason(exc)
        return rec
    rec["layers"] = {k: cfg[k] for k in LAYER_KEYS if k in cfg}
    if model_type in DEFAULT_FIXES:  # said in the result, never silently: the default transformers cannot build
        rec["default_fixed"] = DEFAULT_FIXES[model_type]
    if not args.no_trace:
        rec.update(in_child(builds, args.timeout, cfg, model_type))
        rec.pop("trace_s", None)
        if "trace_error" in rec:
            rec["builds"], rec["build_error"] = False, rec.pop("trace_error")
    for wname in args.workloads:
        opts = dict(WORKLOADS[wname])
        cell: dict[str, Any] = {}
        if not args.no_trace and rec.get("builds"):
            cell = in_child(trace_cell, args.timeout, cfg, model_type, wname)
            opts["lora_targets"] = cell.get("lora_targets", opts.get("lora_targets"))
            if wname != "lora":
                opts.pop("lora_targets", None)
        elif not args.no_trace:
            cell["trace_error"] = "transformers cannot build its default config: " + rec.get("build_error", "")
        elif wname == "lora":  # estimate only: the LoRA targets the cached trace used
            prev = ((cached or {}).get("cells") or {}).get(wname) or {}
            opts["lora_targets"] = prev.get("lora_targets", opts.get("lora_targets"))
        if not args.no_estimate:
            # SSM layers: the estimate models the kernels the trace runs here (transformers' plain-PyTorch fallback
            # unless mamba_ssm is installed); it has no effect on other models
            opts["ssm_kernel"] = GDN_KERNEL if model_type in GDN_TYPES else SSM_KERNEL
            try:
                spec = spec_from_config(cfg, name=model_type)
                est = estimate(spec, make_workload(**opts))
            except VramplanError as exc:
                cell["estimate_error"] = _reason(exc)
            except Exception as exc:
                cell["estimate_error"] = _reason(exc)
                cell["estimate_bug"] = True
            else:
                cell["estimate_gib"] = est.peak_allocated_bytes / GiB
        if "estimate_gib" in cell and "trace_gib" in cell and cell["trace_gib"] > 0:
            cell["estimate_vs_trace_pct"] = round(100 * (cell["estimate_gib"] / cell["trace_gib"] - 1), 2)
        rec["cells"][wname] = cell
    return rec


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "missing"
    return out


# transformers' own refusal of a workload (PreTrainedModel.gradient_checkpointing_enable on a class without
# supports_gradient_checkpointing): the trace raises it and the estimate names it; an answer, not a gap
_REFUSAL = re.compile(r"does not support (activation|gradient) checkpointing")


def library_refusal(cell: dict[str, Any]) -> bool:
    """The trace and the estimate both stopped on the library's own refusal of the workload."""
    return bool(_REFUSAL.search(cell.get("trace_error") or "") and _REFUSAL.search(cell.get("estimate_error") or ""))


def summarize(data: dict[str, Any], workloads: list[str]) -> str:
    lines = [f"{'type':28s} {'category':12s} " + " ".join(f"{w + ' est/trace/diff':>26s}" for w in workloads)]
    counts: dict[str, dict[str, int]] = {}
    within = total_cmp = 0
    for t, rec in sorted(data["types"].items()):
        cat = rec.get("category", "?")
        c = counts.setdefault(cat, {"types": 0, "trace_all": 0, "estimate_all": 0, "trace_any": 0,
                                    "trace_all_or_refused": 0, "estimate_all_or_refused": 0})
        c["types"] += 1
        cells = [rec.get("cells", {}).get(w, {}) for w in workloads]
        if cells and all("trace_gib" in x for x in cells):
            c["trace_all"] += 1
        if any("trace_gib" in x for x in cells):
            c["trace_any"] += 1
        if cells and all("estimate_gib" in x for x in cells):
            c["estimate_all"] += 1
        if cells and all("trace_gib" in x or library_refusal(x) for x in cells):
            c["trace_all_or_refused"] += 1
        if cells and all("estimate_gib" in x or library_refusal(x) for x in cells):
            c["estimate_all_or_refused"] += 1
        row = []
        for x in cells:
            e = "y" if "estimate_gib" in x else "-"
            tr = "y" if "trace_gib" in x else ("-" if x else "?")
            d = f"{x['estimate_vs_trace_pct']:+.1f}%" if "estimate_vs_trace_pct" in x else ""
            if "estimate_vs_trace_pct" in x:
                total_cmp += 1
                within += abs(x["estimate_vs_trace_pct"]) <= 2.0
            row.append(f"{e + '/' + tr + ' ' + d:>26s}")
        lines.append(f"{t:28s} {cat:12s} " + " ".join(row))
    lines.append("")
    for cat, c in sorted(counts.items()):
        lines.append(f"{cat:12s}: {c['types']} types; trace answers all workloads for {c['trace_all']} "
                     f"({100 * c['trace_all'] / max(c['types'], 1):.0f}%), at least one for {c['trace_any']}; "
                     f"estimate answers all for {c['estimate_all']} "
                     f"({100 * c['estimate_all'] / max(c['types'], 1):.0f}%)")
        if c["trace_all_or_refused"] != c["trace_all"] or c["estimate_all_or_refused"] != c["estimate_all"]:
            lines.append(f"{'':12s}  counting the cells where the library itself refuses the workload and both say so "
                         f"as answered: trace {c['trace_all_or_refused']} "
                         f"({100 * c['trace_all_or_refused'] / max(c['types'], 1):.0f}%), estimate "
                         f"{c['estimate_all_or_refused']} "
                         f"({100 * c['estimate_all_or_refused'] / max(c['types'], 1):.0f}%)")
    if total_cmp:
        lines.append(f"estimate within +-2% of trace on {within}/{total_cmp} answered cells")
    lines.append("")
    lines.append("trace failures:")
    for t, rec in sorted(data["types"].items()):
        if "config_error" in rec:
            lines.append(f"  {t:28s} config: {rec['config_error']}")
            continue
        for w, x in rec.get("cells", {}).items():
            if "trace_error" in x:
                lines.append(f"  {t:28s} {w:5s} {x['trace_error'][:150]} [{x.get('trace_error_at', '')}]")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="", help="comma-separated model types (default: all causal-LM types)")
    ap.add_argument("--category", choices=["decoder-only", "multimodal", "encoder", "other"], default=None)
    ap.add_argument("--workloads", default="full,lora,infer")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shrink", action="store_true", help="divide hidden/intermediate widths by 4")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per trace cell")
    ap.add_argument("--no-trace", action="store_true", help="estimate only, against the cached trace of each cell")
    ap.add_argument("--no-estimate", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--fresh", action="store_true", help="drop the cached results first")
    ap.add_argument("--skip-done", action="store_true", help="skip types already in --out")
    ap.add_argument("--summary-only", action="store_true", help="print the table from --out without running")
    ap.add_argument("--reverse", action="store_true", help="run the types in reverse order (a second shard)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="fold these result files (other shards) into --out first")
    args = ap.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; known: {', '.join(WORKLOADS)}")
    data: dict[str, Any] = {"types": {}}
    if args.out.exists() and not args.fresh:
        data = json.loads(args.out.read_text())
        data.setdefault("types", {})
    for extra in args.merge:
        other = json.loads(extra.read_text())
        for t, rec in other.get("types", {}).items():
            data["types"].setdefault(t, rec)
        for key in ("versions", "workloads", "layers", "shrink"):
            data.setdefault(key, other.get(key))
    if args.merge:
        args.out.write_text(json.dumps(data, indent=1, sort_keys=True))
    if not args.summary_only:
        import warnings

        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        transformers.logging.set_verbosity_error()
        warnings.simplefilter("ignore")
        types = [t for t in args.types.split(",") if t] or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + \
            [t for t in VLM_TYPES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        if args.category:
            types = [t for t in types if category(t) == args.category]
        if args.reverse:
            types.reverse()
        data["versions"] = _versions()
        data["workloads"] = WORKLOADS
        data["layers"] = args.layers
        data["shrink"] = args.shrink
        for i, t in enumerate(types):
            if args.skip_done and t in data["types"]:
                continue
            t0 = time.perf_counter()
            rec = run_type(t, args, data["types"].get(t))
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rec["class"] = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(t, "")
            old = data["types"].get(t, {})
            if args.no_trace:  # estimate only: keep the cached trace of each cell (the config is the same)
                for w, cell in rec["cells"].items():
                    prev = old.get("cells", {}).get(w, {})
                    cell.update({k: v for k, v in prev.items() if k.startswith(("trace", "parameters", "lora_"))})
                    if "estimate_gib" in cell and cell.get("trace_gib", 0) > 0:
                        cell["estimate_vs_trace_pct"] = round(100 * (cell["estimate_gib"] / cell["trace_gib"] - 1), 2)
                for k in ("builds", "model_class", "build_error"):
                    if k in old:
                        rec[k] = old[k]
            if old.get("cells"):  # keep workloads not re-run this time
                rec["cells"] = {**old["cells"], **rec["cells"]}
            data["types"][t] = rec
            status = " ".join(f"{w}:{'T' if 'trace_gib' in c else 't'}{'E' if 'estimate_gib' in c else 'e'}"
                              for w, c in rec["cells"].items())
            print(f"[{i + 1}/{len(types)}] {t} ({rec['category']}) {status} {rec['seconds']} s", flush=True)
            args.out.write_text(json.dumps(data, indent=1, sort_keys=True))
    print(summarize(data, args.workloads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
