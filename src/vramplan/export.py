"""Write the plan for the engine that runs it: a DeepSpeed config, an accelerate FSDP config, launch
commands, a vLLM ``serve`` command — from the same workload and layout vramplan estimated.

Each writer returns an :class:`Export`: the file's text, the command that runs it and the file name it
suggests. The values are the ones the estimate assumed (ZeRO stage, buckets, offload, micro-batch,
gradient accumulation, precision, checkpointing; for vLLM and SGLang the tensor/pipeline sizes and the context
and concurrency of :mod:`vramplan.serving`), so nobody re-types numbers.

Sources of the formats: DeepSpeed's config reference (deepspeed.ai/docs/config-json, parsed by
``deepspeed.runtime.config.DeepSpeedConfig``); accelerate's ``ClusterConfig`` YAML
(accelerate/commands/config/config_args.py) and ``accelerate launch`` arguments; torchrun's
(torch.distributed.run) arguments; vLLM's ``EngineArgs`` command-line flags (docs.vllm.ai, "Engine
Arguments").
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import WorkloadError
from .parallel import (
    ZERO3_MAX_LIVE_PARAMETERS,
    FSDPMode,
    Layout,
    Offload,
    check_layout,
    zero_auto_buckets,
)
from .serving.vllm import ServingConfig
from .spec import ModelSpec
from .workload import Precision, Workload

__all__ = [
    "Export", "ExportEngine", "accelerate_fsdp_config", "deepspeed_config", "export", "torchrun_command",
    "vllm_serve_command",
]


class ExportEngine(StrEnum):
    DEEPSPEED = "deepspeed"
    FSDP = "fsdp"
    TORCHRUN = "torchrun"
    VLLM = "vllm"
    SGLANG = "sglang"


@dataclass(frozen=True, slots=True)
class Export:
    """What to write (``text``, to ``filename`` unless the user names one) and how to run it."""

    engine: ExportEngine
    text: str
    command: str
    filename: str


# transformers' decoder-layer class per model_type: what FSDP's transformer auto-wrap policy wraps
_LAYER_CLASS = {
    "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "mixtral": "MixtralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer", "qwen2_moe": "Qwen2MoeDecoderLayer", "qwen3": "Qwen3DecoderLayer",
    "qwen3_moe": "Qwen3MoeDecoderLayer", "gemma": "GemmaDecoderLayer", "gemma2": "Gemma2DecoderLayer",
    "gemma3_text": "Gemma3DecoderLayer", "gemma3": "Gemma3DecoderLayer", "phi3": "Phi3DecoderLayer",
    "falcon": "FalconDecoderLayer", "gpt2": "GPT2Block", "gpt_neox": "GPTNeoXLayer", "gptj": "GPTJBlock",
    "opt": "OPTDecoderLayer", "bloom": "BloomBlock",
}


def _layer_class(spec: ModelSpec) -> str:
    return _LAYER_CLASS.get(spec.family, f"{spec.family.title().replace('_', '')}DecoderLayer")


def _accumulation(w: Workload, layout: Layout) -> int:
    """Micro-batches per optimizer step: the pipeline's micro-batches or gradient accumulation."""
    return max(w.gradient_accumulation, layout.micro_batches)


def _half(w: Workload) -> str | None:
    if w.precision in (Precision.BF16, Precision.AMP_BF16):
        return "bf16"
    if w.precision in (Precision.FP16, Precision.AMP_FP16):
        return "fp16"
    return None


def deepspeed_config(spec: ModelSpec, w: Workload, layout: Layout) -> dict[str, Any]:
    """A DeepSpeed config (deepspeed.ai/docs/config-json) for the layout's ZeRO stage, with the bucket
    sizes vramplan assumed (transformers' ``"auto"`` values unless the layout sets them)."""
    if not w.is_train:
        raise WorkloadError("a DeepSpeed training config needs --task train; for serving use --engine vllm")
    ga = _accumulation(w, layout)
    reduce_bucket, prefetch, persistence = zero_auto_buckets(spec.hidden_size)
    if layout.reduce_bucket_size is not None:
        reduce_bucket = layout.reduce_bucket_size
    zero: dict[str, Any] = {
        "stage": layout.zero,
        "contiguous_gradients": True,
        "overlap_comm": layout.overlap_comm if layout.overlap_comm is not None else layout.zero == 3,
        "reduce_scatter": True,
        "reduce_bucket_size": reduce_bucket,
        "allgather_bucket_size": reduce_bucket,
    }
    if layout.offload is not Offload.NONE:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if layout.offload is Offload.OPTIMIZER_PARAMS:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if layout.zero == 3:
        zero |= {"stage3_prefetch_bucket_size": prefetch, "stage3_param_persistence_threshold": persistence,
                 "stage3_max_live_parameters": ZERO3_MAX_LIVE_PARAMETERS,
                 "stage3_max_reuse_distance": ZERO3_MAX_LIVE_PARAMETERS,
                 "stage3_gather_16bit_weights_on_model_save": True}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": w.batch_size,
        "gradient_accumulation_steps": ga,
        "train_batch_size": w.batch_size * ga * layout.dp,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    half = _half(w)
    if half == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif half == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if w.gradient_checkpointing:
        # DeepSpeed's own checkpointing API (deepspeed.checkpointing); Hugging Face models enable theirs
        # with TrainingArguments(gradient_checkpointing=True), which vramplan's estimate assumed
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False,
                                           "synchronize_checkpoint_boundary": False}
    if layout.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": layout.tp}
    return cfg


def accelerate_fsdp_config(spec: ModelSpec, w: Workload, layout: Layout) -> dict[str, Any]:
    """accelerate's FSDP2 config (the YAML ``accelerate config`` writes; ``ClusterConfig`` fields)."""
    if not w.is_train:
        raise WorkloadError("an FSDP config needs --task train; for serving use --engine vllm")
    mode = layout.fsdp or FSDPMode.FULL
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": _half(w) or "no",
        "num_machines": layout.nodes,
        "num_processes": layout.gpus,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "downcast_bf16": "no",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": _layer_class(spec),
            "fsdp_reshard_after_forward": mode is not FSDPMode.GRAD_OP,
            "fsdp_offload_params": layout.offload is Offload.OPTIMIZER_PARAMS,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": w.gradient_checkpointing,
        },
    }
    if mode is FSDPMode.HYBRID or layout.tp > 1:
        cfg["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": layout.nodes if mode is FSDPMode.HYBRID else 1,
            "parallelism_config_dp_shard_size": layout.shard_degree,
            "parallelism_config_tp_size": layout.tp,
            "parallelism_config_cp_size": 1,
        }
    return cfg


def torchrun_command(layout: Layout, script: str = "train.py", args: str = "") -> str:
    """torchrun (torch.distributed.run) for one node of the layout; run it on every node with its rank."""
    parts = ["torchrun", f"--nnodes={layout.nodes}", f"--nproc-per-node={layout.gpus_per_node}"]
    if layout.nodes > 1:
        parts += ["--node-rank=${NODE_RANK}", "--rdzv-backend=c10d", "--rdzv-endpoint=${MASTER_ADDR}:29500"]
    parts.append(script)
    return " ".join(parts) + (f" {args}" if args else "")


def vllm_serve_command(model_id: str, spec: ModelSpec, w: Workload, layout: Layout,
                       gpu_memory_bytes: int | None = None, serving: ServingConfig | None = None,
                       gpu_name: str = "", engine: str = "vllm") -> list[str]:
    """``vllm serve`` (or SGLang's server) for the layout's tensor/pipeline sizes, with the numbers of vramplan's
    serving model (:mod:`vramplan.serving`): given the GPU's memory, the largest ``max_model_len`` the KV cache
    holds and the engine's ``max_num_seqs``; never a whole-batch prefill check (the engines chunk prefill)."""
    if w.is_train:
        raise WorkloadError(f"{engine} serves models; use --task infer (or --engine deepspeed|fsdp for training)")
    if layout.dp * layout.tp * layout.pp != layout.gpus or layout.dp != 1:
        raise WorkloadError(f"one {engine} server spans tp x pp = {layout.tp * layout.pp} GPUs; --gpus {layout.gpus} "
                            "would be several replicas; set --gpus to tp x pp")
    from dataclasses import replace

    from .serving.launch import serving_command

    cfg = replace(serving or ServingConfig(), engine=engine, tp=layout.tp, pp=layout.pp)
    cmd, _ = serving_command(engine, model_id, spec, w, cfg, gpu_memory_bytes, gpu_name)
    return cmd


def _yaml(value: Any, indent: int = 0) -> str:
    """A minimal YAML writer for nested mappings of scalars (what accelerate's config holds)."""
    pad = "  " * indent
    lines = []
    for key, v in value.items():
        if isinstance(v, Mapping):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(v, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(lines)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    s = str(v)
    return json.dumps(s) if not s or s.lower() in ("yes", "no", "true", "false", "null", "on", "off") or \
        any(c in s for c in ":#{}[],&*!|>'\"%@`") else s


def export(engine: ExportEngine | str, model_id: str, spec: ModelSpec, w: Workload, layout: Layout,
           gpu_memory_bytes: int | None = None, script: str = "train.py", serving: ServingConfig | None = None,
           gpu_name: str = "") -> Export:
    """The file and command for ``engine``; ``model_id`` is what the engine loads (a Hugging Face id)."""
    engine = ExportEngine(engine)
    check_layout(spec, w, layout)
    if engine is ExportEngine.DEEPSPEED:
        if not layout.zero:
            raise WorkloadError("--engine deepspeed writes a ZeRO config; add --zero 1|2|3")
        text = json.dumps(deepspeed_config(spec, w, layout), indent=2) + "\n"
        if layout.nodes > 1:
            launcher = f"deepspeed --num_nodes {layout.nodes} --num_gpus {layout.gpus_per_node} --hostfile hostfile"
        else:
            launcher = f"deepspeed --num_gpus {layout.gpus}"
        command = f"{launcher} {script} --model_name_or_path {shlex.quote(model_id)} --deepspeed ds_config.json"
        return Export(engine, text, command, "ds_config.json")
    if engine is ExportEngine.FSDP:
        if layout.zero:
            raise WorkloadError("--engine fsdp writes an FSDP config; drop --zero or use --engine deepspeed")
        command = (f"accelerate launch --config_file fsdp_config.yaml {script} "
                   f"--model_name_or_path {shlex.quote(model_id)}")
        text = f"# vramplan: {command}\n" + _yaml(accelerate_fsdp_config(spec, w, layout)) + "\n"
        return Export(engine, text, command, "fsdp_config.yaml")
    if engine is ExportEngine.TORCHRUN:
        command = torchrun_command(layout, script, f"--model_name_or_path {shlex.quote(model_id)}")
        return Export(engine, f"#!/bin/sh\n{command}\n", command, "launch.sh")
    cmd = vllm_serve_command(model_id, spec, w, layout, gpu_memory_bytes, serving, gpu_name, engine.value)
    command = shlex.join(cmd)
    return Export(engine, f"#!/bin/sh\n{command}\n", command, "serve.sh")
