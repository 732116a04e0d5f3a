"""The flags several commands share: the workload, the multi-GPU layout, image models' resolution."""

from __future__ import annotations

import argparse
from typing import Any

from .._argtypes import non_negative_int, positive_int, unit_interval
from ..workload import LOADS

__all__ = ["add_image_flags", "add_parallel_flags", "add_workload_flags", "options"]

# What only presents the answer (or routes the command), never part of a query.
_PRESENTATION = frozenset({"command", "handler", "json", "plot", "output"})


def options(ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as the service's options (keyed by destination), less presentation flags."""
    return {k: v for k, v in vars(ns).items() if k not in _PRESENTATION}


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--task", choices=["train", "finetune", "infer"], default="train",
                   help="a training step (train and finetune alike: --method says what trains) or inference")
    g.add_argument("--method", choices=["full", "lora", "qlora", "freeze", "dora"], default="full",
                   help="train every weight, LoRA adapters, LoRA on 4-bit NF4 weights, or the last layers only")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"], default="bf16",
                   help="bf16/fp16: weights, grads and optimizer states in 16-bit; amp-*: fp32 master "
                        "weights + autocast")
    from ..workload import WeightsQuant

    g.add_argument("--weights-quant", choices=[q.value for q in WeightsQuant], default="none",
                   help="storage of the base linear weights (inference, or LoRA on a quantized base); a "
                        "checkpoint's own quantization_config is read from its config.json")
    g.add_argument("--quant-group-size", type=positive_int, default=None,
                   help="gptq/awq/w4a16/hqq/torchao: weights per scale (default: the format's, 128 or 64)")
    g.add_argument("--double-quant", action="store_true", default=None,
                   help="bitsandbytes 4-bit: quantize the absmax constants too (BitsAndBytesConfig "
                        "bnb_4bit_use_double_quant; off by default, on for --method qlora)")
    g.add_argument("--optimizer", choices=["adamw", "adamw-fused", "adamw-8bit", "sgd", "adafactor", "lion",
                                           "paged-adamw", "paged-adamw-8bit", "galore", "muon", "apollo"],
                   default="adamw", help="torch.optim (foreach) unless named: adamw-8bit is bitsandbytes")
    g.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step (per micro-batch)")
    g.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (the prompt, for infer)")
    g.add_argument("--new-tokens", type=non_negative_int, default=32, help="tokens generated after the prompt")
    g.add_argument("--logits", choices=["all", "last"], default="last",
                   help="inference: logits for every prompt token, or only the last (as generate() does)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations")
    g.add_argument("--attention", choices=["sdpa", "flash", "eager"], default="sdpa",
                   help="torch SDPA kernels, flash-attn 2, or eager (materialized scores)")
    g.add_argument("--ssm-kernel", choices=["fused", "torch"], default="fused",
                   help="Mamba / short-conv / gated DeltaNet layers: the mamba_ssm, causal_conv1d and fla kernels a "
                        "GPU install runs, or transformers' plain-PyTorch fallback (what `vramplan trace` runs "
                        "without those packages)")
    g.add_argument("--hub-kernels", action="store_true", default=None,
                   help="transformers' hub kernels, as from_pretrained loads them by default from transformers 5.25 "
                        "on CUDA: RMSNorm runs kernels-community's LigerRMSNorm (default: the PyTorch layers, "
                        "use_kernels=False / USE_HUB_KERNELS=0)")
    g.add_argument("--load", choices=list(LOADS), default="config",
                   help="how the weights reach the GPU, which decides how the caching allocator lays them out: "
                        "config = from_config on the device (the calibration harness), device-map = "
                        "from_pretrained(..., device_map=...) (one warm-up block of the checkpoint's size), "
                        "to-device = from_pretrained on the CPU, then model.to('cuda') (the HF Trainer's move)")
    g.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA r")
    g.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA alpha (no effect on memory)")
    g.add_argument("--lora-dropout", type=unit_interval, default=0.0,
                   help="peft lora_dropout: above 0 each adapted layer keeps a dropout mask")
    g.add_argument("--lora-targets", default="default",
                   help="comma-separated module names, all-linear, or default (peft's choice for the family: "
                        "q_proj,v_proj for LLaMA-style models)")
    g.add_argument("--trainable-layers", type=non_negative_int, default=None,
                   help="--method freeze: how many of the last decoder layers train (default: a quarter of them)")
    g.add_argument("--gradient-accumulation", type=positive_int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--transformers", default=None, metavar="VERSION",
                   help="the transformers release the run uses where releases allocate differently (default: the "
                        "installed one, else the one the shipped programs model; e.g. 5.17 keeps Gemma-2's SDPA "
                        "path, 5.24 LongCat-Flash's expert loop)")
    g.add_argument("--alloc-conf", default=None, metavar="CONF",
                   help="PyTorch caching-allocator settings, the PYTORCH_CUDA_ALLOC_CONF string "
                        "(e.g. expandable_segments:True, max_split_size_mb:128)")
    _add_saver_flags(p)
    _add_vision_flags(p)


def _add_vision_flags(p: argparse.ArgumentParser) -> None:
    """Vision-language models (LLaVA, Qwen2-VL, Gemma 3, ...): images per sample and what trains."""
    g = p.add_argument_group("vision-language models")
    g.add_argument("--images", type=positive_int, default=None,
                   help="images per sample (default 1 for a vision-language model); their tokens add to --seq-len")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="image side in pixels (default: the model processor's size)")
    g.add_argument("--freeze-vision", action="store_true", default=None,
                   help="full fine-tuning with the vision tower frozen (the projector trains)")
    g.add_argument("--text-only", action="store_true", default=None,
                   help="a vision-language model on text alone, without images (a tower transformers builds "
                        "counts as weights)")


def _add_saver_flags(p: argparse.ArgumentParser) -> None:
    """The training loop and the memory savers people turn on (issue 14); unset flags keep the defaults."""
    g = p.add_argument_group("training loop and memory savers")
    g.add_argument("--trainer", choices=["plain", "hf", "trl-sft"], default=None,
                   help="the loop: plain (keeps the model output through the step), hf (transformers Trainer, "
                        "default), trl-sft (TRL SFTTrainer)")
    g.add_argument("--loss", choices=["auto", "standard", "chunked", "liger-fused", "cce"], default=None,
                   help="auto: chunked under trl-sft (TRL's default chunked_nll), standard otherwise")
    g.add_argument("--loss-chunk", type=positive_int, default=None, help="tokens per chunk for --loss chunked")
    g.add_argument("--packing", action="store_true", default=None,
                   help="padding-free packing: tokens per micro-batch = batch x --avg-seq-len (FlashAttention varlen)")
    g.add_argument("--avg-seq-len", type=positive_int, default=None,
                   help="with --packing: mean real length of a sequence (default: --seq-len)")
    g.add_argument("--checkpointing", default=None, metavar="full|every:N",
                   help="gradient checkpointing of every decoder layer (full) or of layers 0, N, 2N, ...")
    g.add_argument("--activation-offload", action="store_true", default=None,
                   help="saved activations in pinned host memory (TRL activation_offloading)")
    g.add_argument("--rslora", action="store_true", default=None,
                   help="peft use_rslora (scaling alpha/sqrt(r); same memory)")
    g.add_argument("--lora-modules-to-save", default=None, metavar="embed_tokens,lm_head",
                   help="peft modules_to_save: train full copies of the embedding and/or the output head")
    g.add_argument("--optimizer-rank", type=positive_int, default=None, help="galore / apollo projection rank")
    g.add_argument("--galore-update-gap", type=positive_int, default=None,
                   help="galore: steps between SVD updates of the projection")


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="image models: pixels per side (default: the model's native resolution)")
    parser.add_argument("--pipeline", action="store_true",
                        help="diffusion models: the whole pipeline (text encoders, denoiser, VAE), not the denoiser")


def add_parallel_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The multi-GPU flags; all default to None (or off) so that a plain single-GPU call has no ``per_gpu``.
    ``skip``: flags the command already has with another meaning (fit's --tp/--pp size a serving engine)."""
    g = _Skipping(parser.add_argument_group("multi-GPU layout (adds a per_gpu section: the most loaded GPU)"), skip)
    g.add_argument("--gpus", type=positive_int, default=None, help="GPUs in total (= tp x pp x data-parallel)")
    g.add_argument("--nodes", type=positive_int, default=None, help="machines the GPUs are spread over")
    g.add_argument("--zero", type=non_negative_int, choices=[0, 1, 2, 3], default=None,
                   help="DeepSpeed ZeRO stage: 1 optimizer, 2 + gradients, 3 + parameters sharded")
    g.add_argument("--fsdp", choices=["full", "grad-op", "hybrid"], default=None,
                   help="PyTorch FSDP2: full shard, shard gradients and optimizer only, or shard within a node")
    g.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel size (Megatron-style)")
    g.add_argument("--pp", type=positive_int, default=None, help="pipeline-parallel stages (1F1B)")
    g.add_argument("--ep", type=positive_int, default=None, help="expert-parallel size (MoE)")
    g.add_argument("--micro-batches", type=positive_int, default=None,
                   help="micro-batches per optimizer step (pipeline micro-batches / gradient accumulation)")
    g.add_argument("--virtual-stages", type=positive_int, default=None,
                   help="model chunks per GPU: > 1 selects the interleaved 1F1B schedule")
    g.add_argument("--offload", choices=["none", "optimizer", "optimizer+params"], default=None,
                   help="move optimizer states (and ZeRO-3/FSDP parameters) to host memory")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norm/dropout activations over the tensor-parallel group (needs --tp > 1)")
    g.add_argument("--intra-node-link", default=None, help="GPU link inside a node (default nvlink-4)")
    g.add_argument("--inter-node-link", default=None, help="network between nodes (default ib-ndr)")


class _Skipping:
    """An argument group that leaves out the flags named in ``skip``."""

    def __init__(self, group: Any, skip: tuple[str, ...]) -> None:
        self.group, self.skip = group, {f"--{name}" for name in skip}

    def add_argument(self, *names: str, **kwargs: Any) -> None:
        if not self.skip.intersection(names):
            self.group.add_argument(*names, **kwargs)
