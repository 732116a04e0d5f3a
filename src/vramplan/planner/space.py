"""The search space of a plan: the request, the settings and layouts tried, the micro-batch sizes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from ..errors import WorkloadError
from ..hardware import GPU
from ..parallel import FSDPMode, Layout
from ..workload import Attention, Loss, Method, Optimizer, Precision, Trainer, WeightsQuant

_SECONDS_PER_HOUR = 3600.0
GPU_COUNTS = (1, 2, 4, 8)
CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal ~20 tokens per parameter
DEFAULT_FINETUNE_TOKENS = 100_000_000
DEFAULT_GENERATED_TOKENS = 1_000_000
DEFAULT_GLOBAL_BATCH = {"train": 256, "finetune": 32}
MAX_MICRO_BATCH = 64
# Micro-batches of more tokens than this are not tried: the fitted step-time model is then within a few
# per cent of compute-bound (launch overhead is per micro-batch), so they only add memory.
MAX_MICRO_BATCH_TOKENS = 16384
INFER_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Fidelity: lower is closer to the full-precision result (the recommendation prefers it).
_METHOD_RANK = {Method.FULL: 0, Method.LORA: 1, Method.QLORA: 2, Method.FREEZE: 3}
_ADAPTERS = (Method.LORA, Method.QLORA, Method.DORA)
_QUANT_RANK = {WeightsQuant.NONE: 0, WeightsQuant.FP8: 1, WeightsQuant.INT8: 2, WeightsQuant.NF4: 3}


class PlanTask(StrEnum):
    TRAIN = "train"  # pre-training from scratch: every weight trains
    FINETUNE = "finetune"  # full, LoRA, QLoRA or freeze
    INFER = "infer"  # serving: generate tokens


class SortKey(StrEnum):
    COST = "cost"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What to plan. Empty restriction tuples mean "search all"."""

    task: PlanTask = PlanTask.FINETUNE
    seq_len: int = 2048
    new_tokens: int = 256
    tokens: int | None = None  # tokens to train on, or to generate (infer)
    epochs: float | None = None
    dataset_tokens: int | None = None
    global_batch: int | None = None  # sequences per optimizer step
    max_gpus: int = 8
    gpu_class: str = "any"
    sort: SortKey = SortKey.COST
    budget_usd: float | None = None
    methods: tuple[Method, ...] = ()
    precisions: tuple[Precision, ...] = ()
    optimizers: tuple[Optimizer, ...] = ()
    weights_quants: tuple[WeightsQuant, ...] = ()
    gradient_checkpointing: bool | None = None
    micro_batches: tuple[int, ...] = ()
    attention: Attention = Attention.SDPA
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: try peft's default and all-linear
    top: int = 20
    engine: str = "transformers"  # infer: the serving engine whose decode speed ranks the plans
    trainer: Trainer = Trainer.HF  # the training loop (what it holds at the peak: vramplan.workload.Trainer)
    savers: tuple[str, ...] | None = None  # memory savers to search on one GPU (None: SAVERS; (): none)
    loss: Loss = Loss.AUTO  # pinned loss (--loss): every candidate uses it, and no loss saver is searched
    activation_offload: bool = False  # pinned (--activation-offload): every single-GPU candidate offloads

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_gpus", "top", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("tokens", "dataset_tokens", "global_batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.new_tokens < 0:
            raise WorkloadError(f"new-tokens must not be negative, got {self.new_tokens}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise WorkloadError(f"epochs must be a positive number, got {self.epochs!r}")
        if (self.epochs is None) != (self.dataset_tokens is None):
            raise WorkloadError("give --epochs together with --dataset-tokens (or --tokens alone)")
        if self.tokens is not None and self.epochs is not None:
            raise WorkloadError("give either --tokens or --epochs with --dataset-tokens, not both")
        if self.budget_usd is not None and not (self.budget_usd >= 0 and math.isfinite(self.budget_usd)):
            raise WorkloadError(f"budget must be a non-negative number of dollars, got {self.budget_usd!r}")
        if self.gpu_class not in ("any", "consumer", "workstation", "datacenter"):
            raise WorkloadError(f"gpu class {self.gpu_class!r} is not one of: any, consumer, workstation, datacenter")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.micro_batches):
            raise WorkloadError("micro-batch sizes must be positive integers")
        unknown = [x for x in self.savers or () if x not in SAVERS]
        if unknown:
            raise WorkloadError(f"memory saver {unknown[0]!r} is not one of: {', '.join(SAVERS)}")
        if self.task is PlanTask.TRAIN and self.methods and set(self.methods) != {Method.FULL}:
            raise WorkloadError("--task train trains every weight (method full); use --task finetune for "
                                "LoRA, QLoRA or freeze")


# ----------------------------------------------------------------------------------------- the search space


@dataclass(frozen=True, slots=True)
class _Config:
    method: Method
    precision: Precision
    optimizer: Optimizer | None
    quant: WeightsQuant
    ckpt: bool
    targets: tuple[str, ...] = ("default",)
    saver: str = ""  # one of SAVERS, applied on top of the settings above


# Memory savers the planner tries on one GPU (the flags that turn them on), each one a switch of the loops people
# run: they change what a step holds, not the model or the maths. Liger's fused linear cross-entropy never
# materialises the logits (liger_kernel/ops/fused_linear_cross_entropy.py; transformers TrainingArguments
# use_liger_kernel, TRL likewise); activation offloading moves the saved activations to pinned host memory
# (torch.autograd.graph.saved_tensors_hooks, as TRL's activation_offloading does); bitsandbytes' paged 8-bit AdamW
# keeps its states in CUDA unified memory (bitsandbytes/optim/optimizer.py paged buffers; TrainingArguments
# optim="paged_adamw_8bit"), outside what the allocator holds. TRL's chunked NLL is not searched: it is already
# SFTTrainer's default (--trainer trl-sft) and no option of transformers' Trainer.
SAVERS = ("--loss liger-fused", "--activation-offload", "--optimizer paged-adamw-8bit")


def _family(gpu: GPU) -> str:
    """The 16-bit type a GPU trains and serves in: bf16 where it has bf16 tensor cores, else fp16."""
    return "fp16" if gpu.peak_tflops("bf16") is None and gpu.peak_tflops("fp16") is not None else "bf16"


def _precisions(method: Method, family: str, task: PlanTask) -> tuple[Precision, ...]:
    if task is PlanTask.INFER or method in _ADAPTERS:
        return (Precision.BF16,) if family == "bf16" else (Precision.FP16,)
    # full / freeze: mixed precision (fp32 master weights) or pure 16-bit (no pure fp16: it needs loss scaling)
    return (Precision.AMP_BF16, Precision.BF16) if family == "bf16" else (Precision.AMP_FP16,)


def _configs(req: PlanRequest, family: str) -> Iterator[_Config]:
    if req.task is PlanTask.INFER:
        quants = req.weights_quants or tuple(_QUANT_RANK)  # what a runtime can quantize a 16-bit checkpoint to
        for prec in req.precisions or _precisions(Method.FULL, family, req.task):
            for q in quants:
                yield _Config(Method.FULL, prec, None, q, False)
        return
    methods = req.methods or ((Method.FULL,) if req.task is PlanTask.TRAIN else tuple(_METHOD_RANK))
    ckpts = (False, True) if req.gradient_checkpointing is None else (req.gradient_checkpointing,)
    for method in methods:
        precs = req.precisions or _precisions(method, family, req.task)
        adapters = method in _ADAPTERS
        opts = req.optimizers or ((Optimizer.ADAMW, Optimizer.ADAMW_8BIT) if adapters else
                                  (Optimizer.ADAMW, Optimizer.ADAMW_FUSED, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR,
                                   Optimizer.LION))
        target_sets = ((req.lora_targets,) if req.lora_targets else (("default",), ("all-linear",))) \
            if adapters else (("default",),)
        for prec in precs:
            for opt in opts:
                for ckpt in ckpts:
                    for targets in target_sets:
                        yield _Config(method, prec, opt, WeightsQuant.NONE, ckpt, targets)
    # each saver on top of the leanest standard settings of each method: the first precision, 8-bit AdamW (or the
    # pinned optimizer), peft's default targets; a loss saver only where the loss is not pinned
    for saver in SAVERS if req.savers is None else req.savers:
        if saver.startswith("--loss") and req.loss is not Loss.AUTO:
            continue
        if saver.startswith("--optimizer") and req.optimizers:
            continue
        if saver == "--activation-offload" and req.activation_offload:
            continue
        for method in methods:
            prec = (req.precisions or _precisions(method, family, req.task))[0]
            opt = Optimizer.PAGED_ADAMW_8BIT if saver.startswith("--optimizer") else \
                (req.optimizers[0] if req.optimizers else Optimizer.ADAMW_8BIT)
            for ckpt in ckpts:
                yield _Config(method, prec, opt, WeightsQuant.NONE, ckpt, req.lora_targets or ("default",), saver)


_SINGLE = Layout()


def _layouts(req: PlanRequest, cfg: _Config, family: str) -> list[tuple[str, Layout]]:
    """(label, layout) pairs to try for ``cfg`` on 1, 2, 4 and 8 GPUs of one node.

    Inference: independent replicas (throughput) and tensor parallelism (memory). Training: DDP replicas
    (for speed: without checkpointing), FSDP full sharding (ZeRO-3-like) and, for full fine-tuning, tensor
    parallelism (for memory: with checkpointing), each with AdamW in the family's first precision and
    peft's default targets. Sharding, not 8-bit or factored optimizer states, is what makes room on
    several GPUs, and every parallel estimate costs about a millisecond: this keeps the search inside its
    time budget. Options the user pinned are tried on every layout.
    """
    out: list[tuple[str, Layout]] = [("single", Layout())]
    infer = req.task is PlanTask.INFER
    if cfg.saver or req.activation_offload:
        return out  # savers are searched on one GPU (offloading: the parallel estimator does not model it)
    if not infer:
        if cfg.optimizer is not Optimizer.ADAMW and not req.optimizers:
            return out
        if cfg.precision is not _precisions(cfg.method, family, req.task)[0] and not req.precisions:
            return out
        if cfg.targets != ("default",) and not req.lora_targets:
            return out
    pinned = req.gradient_checkpointing is not None
    for n in GPU_COUNTS[1:]:
        if n > req.max_gpus:
            break
        if infer:
            out += [("replicas", Layout(gpus=n)), ("tp", Layout(gpus=n, tp=n))]
            continue
        if pinned or not cfg.ckpt:
            out.append(("ddp", Layout(gpus=n)))
        if pinned or cfg.ckpt:
            out.append(("fsdp", Layout(gpus=n, fsdp=FSDPMode.FULL)))
            if cfg.method is Method.FULL:
                out.append(("tp", Layout(gpus=n, tp=n)))
    return out


def _micro_batches(req: PlanRequest, per_replica: int) -> list[int]:
    """Divisors of the per-replica batch (micro-batch x accumulation is then exactly the global batch),
    up to MAX_MICRO_BATCH sequences and MAX_MICRO_BATCH_TOKENS tokens; 1 always."""
    if req.micro_batches:
        return sorted(b for b in set(req.micro_batches) if b <= per_replica) or [min(req.micro_batches)]
    cap = min(per_replica, MAX_MICRO_BATCH, max(1, MAX_MICRO_BATCH_TOKENS // req.seq_len))
    return [b for b in range(1, cap + 1) if per_replica % b == 0]


# ----------------------------------------------------------------------------------------- image models

VISION_NO_TIME = "no throughput model for image models yet"
VISION_BATCHES = (1, 2, 4, 8, 16, 32, 64)
_VISION_PRECISIONS = (Precision.BF16, Precision.FP16, Precision.AMP_BF16, Precision.FP32)


def _runs(gpu: GPU, precision: Precision) -> bool:
    """Whether ``gpu`` has the 16-bit type ``precision`` computes in (fp32 runs everywhere)."""
    if precision in (Precision.BF16, Precision.AMP_BF16):
        return gpu.peak_tflops("bf16") is not None
    if precision in (Precision.FP16, Precision.AMP_FP16):
        return gpu.peak_tflops("fp16") is not None or gpu.peak_tflops("bf16") is not None
    return True
