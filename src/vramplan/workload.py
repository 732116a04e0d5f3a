"""What the user wants to run: task, method, precision, optimizer, shapes.

A :class:`Workload` is validated on construction, so every estimator function can trust it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache

from .errors import WorkloadError

__all__ = [
    "Attention",
    "LogitsMode",
    "Loss",
    "Method",
    "Optimizer",
    "Precision",
    "Task",
    "Trainer",
    "WeightsQuant",
    "Workload",
    "check_int_fields",
]


class Task(StrEnum):
    TRAIN = "train"
    INFER = "infer"


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    FREEZE = "freeze"
    DORA = "dora"  # peft LoraConfig(use_dora=True): LoRA plus a trained magnitude vector per adapted linear


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AMP_BF16 = "amp-bf16"
    AMP_FP16 = "amp-fp16"

    @property
    def is_amp(self) -> bool:
        return self in (Precision.AMP_BF16, Precision.AMP_FP16)

    @property
    def param_bytes(self) -> int:
        """Bytes per element of the parameters as stored (AMP keeps fp32 parameters)."""
        return 2 if self in (Precision.BF16, Precision.FP16) else 4

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations (AMP computes matmuls in 16-bit)."""
        return 4 if self is Precision.FP32 else 2


class WeightsQuant(StrEnum):
    """Storage of the base linear weights; the exact tensor layouts are in :mod:`vramplan.quant`."""

    NONE = "none"
    INT8 = "int8"  # bitsandbytes LLM.int8 (Linear8bitLt)
    NF4 = "nf4"  # bitsandbytes Linear4bit NF4 (double quantization: --double-quant; on for qlora)
    FP4 = "fp4"  # bitsandbytes Linear4bit FP4 (BitsAndBytesConfig's default 4-bit type)
    FP8 = "fp8"  # 8-bit float weights with per-tensor scales
    FP8_BLOCK = "fp8-block"  # fp8 with 128x128 block scales (DeepSeek-V3, FineGrainedFP8)
    GPTQ_INT4 = "gptq-int4"
    GPTQ_INT8 = "gptq-int8"
    AWQ_INT4 = "awq-int4"
    W4A16 = "w4a16"  # compressed-tensors pack-quantized int4
    W8A8_INT8 = "w8a8-int8"  # compressed-tensors int8 weights, per-channel scales
    W8A8_FP8 = "w8a8-fp8"  # compressed-tensors fp8 weights, per-channel scales
    NVFP4 = "nvfp4"  # compressed-tensors nvfp4-pack-quantized
    MXFP4 = "mxfp4"  # gpt-oss: MoE experts in MXFP4
    HQQ_INT4 = "hqq-int4"
    TORCHAO_INT4 = "torchao-int4"

    @property
    def dequantizes(self) -> bool:
        """The transformers forward dequantizes the weight into a 16-bit temporary (no low-bit GEMM)."""
        return self in (WeightsQuant.NF4, WeightsQuant.FP4, WeightsQuant.GPTQ_INT4, WeightsQuant.GPTQ_INT8,
                        WeightsQuant.AWQ_INT4, WeightsQuant.W4A16, WeightsQuant.NVFP4, WeightsQuant.MXFP4,
                        WeightsQuant.HQQ_INT4, WeightsQuant.TORCHAO_INT4)


    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes layers: they replace nn.Linear modules only, never the fused 3-D MoE expert parameters."""
        return self in (WeightsQuant.INT8, WeightsQuant.NF4, WeightsQuant.FP4)


# the transformers release the shipped memory programs and derived recipes model (the pinned one)
MODELLED_TRANSFORMERS = "5.25.0"

# how the weights reach the GPU (Workload.load): from_config on the device (the calibration harness),
# from_pretrained(..., device_map=...), from_pretrained on the CPU then model.to("cuda")
LOADS = ("config", "device-map", "to-device")


def release(text: str) -> tuple[int, ...]:
    """``"5.17.0"`` -> (5, 17, 0); a pre-release or local suffix (``"5.26.0.dev0"``, ``"5.25.0+cu"``) is dropped."""
    out = []
    for p in text.split("+")[0].split("."):
        digits = re.match(r"\d+", p)
        if digits is None:
            break
        out.append(int(digits.group()))
        if digits.end() != len(p):
            break
    return tuple(out)


@lru_cache(maxsize=1)
def default_transformers() -> str:
    """The transformers release a workload runs unless it says otherwise: the installed one (package metadata only,
    nothing imported), else the one the shipped programs model (MODELLED_TRANSFORMERS). Releases differ in what some
    families allocate (``Workload.transformers_release``), and the shipped recipes follow the installed release too
    (``recipes.versioned_data``)."""
    from ._files import installed_version

    have = installed_version("transformers")
    return have if have and release(have) else MODELLED_TRANSFORMERS


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_FUSED = "adamw-fused"
    ADAMW_8BIT = "adamw-8bit"
    SGD = "sgd"
    ADAFACTOR = "adafactor"
    LION = "lion"
    PAGED_ADAMW = "paged-adamw"  # bitsandbytes PagedAdamW32bit: fp32 states in CUDA unified memory
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"  # bitsandbytes PagedAdamW8bit
    GALORE = "galore"  # GaLore AdamW: Adam moments on rank-r projected gradients of the 2-D weights
    MUON = "muon"  # torch.optim.Muon on the 2-D hidden weights, AdamW on the rest
    APOLLO = "apollo"  # APOLLO AdamW: Adam moments in a rank-r random projection, channel-wise scaling


class Trainer(StrEnum):
    """The training loop around the model (which tensors are alive at each moment of a step)."""

    PLAIN = "plain"  # a hand-written loop that keeps the model output until after optimizer.step()
    HF = "hf"  # transformers Trainer.training_step: outputs dropped when compute_loss returns
    TRL_SFT = "trl-sft"  # TRL SFTTrainer.compute_loss: HF's loop plus entropy / token-accuracy metrics


class Loss(StrEnum):
    """How the causal-LM loss is computed from the last hidden state."""

    AUTO = "auto"  # the trainer's default: chunked under trl-sft (TRL >= 1.8 loss_type), standard otherwise
    STANDARD = "standard"  # lm_head over every token, logits.float(), cross_entropy (transformers ForCausalLMLoss)
    CHUNKED = "chunked"  # TRL chunked_nll: lm_head + CE per chunk of tokens under checkpoint, logits never whole
    LIGER_FUSED = "liger-fused"  # Liger LigerFusedLinearCrossEntropy: gradients computed chunk-wise in forward
    CCE = "cce"  # Apple Cut Cross-Entropy: blockwise log-sum-exp, logits never materialized


class Attention(StrEnum):
    SDPA = "sdpa"  # torch scaled_dot_product_attention: flash / memory-efficient kernels where eligible
    FLASH = "flash"  # flash-attn 2 package (transformers attn_implementation="flash_attention_2")
    EAGER = "eager"  # explicit softmax(QK^T)V: the (batch, heads, seq, seq) scores are materialized


class LogitsMode(StrEnum):
    ALL = "all"  # logits for every prompt token (model(input_ids))
    LAST = "last"  # only the last position (generate(), logits_to_keep=1)


_MAX_TOKENS = 1 << 24  # 16M tokens in one sequence or batch: beyond any real context
_MAX_BATCH = 1 << 20


def check_int_fields(obj: object, ranges: tuple[tuple[str, int, int], ...]) -> None:
    """Each named field of ``obj`` is an integer (not a bool) within its (low, high) range."""
    for name, lo, hi in ranges:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkloadError(f"{name} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise WorkloadError(f"{name} = {value} is out of range; use {lo}..{hi}")


@dataclass(frozen=True, slots=True)
class Workload:
    """One training step or one generation request, as a script would run it."""

    task: Task = Task.TRAIN
    method: Method = Method.FULL
    precision: Precision = Precision.BF16
    weights_quant: WeightsQuant = WeightsQuant.NONE
    optimizer: Optimizer = Optimizer.ADAMW
    batch_size: int = 1
    seq_len: int = 2048
    new_tokens: int = 32
    logits: LogitsMode = LogitsMode.LAST
    gradient_checkpointing: bool = False
    attention: Attention = Attention.SDPA
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # peft LoraConfig's default; dropout > 0 keeps a mask per adapted layer
    lora_targets: tuple[str, ...] = ("default",)  # peft's default for the family (q_proj,v_proj for LLaMA)
    trainable_layers: int | None = None  # freeze: the last N decoder layers train (default: a quarter)
    gradient_accumulation: int = 1
    quant_group_size: int | None = None  # gptq/awq/w4a16/hqq/torchao group size (default: the format's, 128/64)
    double_quant: bool | None = None  # bitsandbytes 4-bit: None = transformers' default (off), qlora included
    trainer: Trainer = Trainer.HF
    loss: Loss = Loss.AUTO
    loss_chunk: int = 0  # tokens per chunk for --loss chunked (0: the implementation's default)
    packing: bool = False  # padding-free packing: the micro-batch is one row of real tokens (FlashAttention varlen)
    avg_seq_len: int | None = None  # with packing: the mean real length of a sequence (default: seq_len)
    checkpointing: str = "none"  # none | full | every:N; gradient_checkpointing=True means full
    activation_offload: bool = False  # saved activations of the decoder layers live in pinned host memory
    rslora: bool = False  # peft use_rslora: scaling alpha/sqrt(r) (no memory change)
    lora_modules_to_save: tuple[str, ...] = ()  # peft modules_to_save: trained full copies (embed_tokens, lm_head)
    optimizer_rank: int = 128  # galore / apollo: rank of the projection
    galore_update_gap: int = 200  # galore: steps between SVD updates of the projection
    ssm_kernel: str = "fused"  # SSM layers: "fused" (mamba_ssm / causal_conv1d kernels) or "torch" (transformers'
    # plain-PyTorch fallback, what a machine without those packages runs; vramplan.ssm)
    # transformers' hub kernels (from_pretrained's default from transformers 5.25 on CUDA, use_kernels=True): the
    # RMSNorm classes decorated use_kernel_forward_from_hub("RMSNorm") run LigerRMSNorm (vramplan.data hub_kernels.json)
    hub_kernels: bool = False
    # how the weights reach the GPU (what the caching allocator holds afterwards: one of LOADS, vramplan.alloc_stream):
    # "config" from_config under torch.device("cuda") (the calibration harness, `vramplan measure`), "device-map"
    # from_pretrained(..., device_map=...), "to-device" from_pretrained on the CPU then model.to("cuda") (the Trainer)
    load: str = "config"
    alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF of the run (e.g. "expandable_segments:True")
    # the transformers release the run uses, where releases differ in what a family allocates (None: the installed
    # release, else the one the shipped programs and recipes model, MODELLED_TRANSFORMERS: default_transformers())
    transformers: str | None = None
    # Vision-language models (vramplan.multimodal): images per sample (None: 1 for a VLM; a text model refuses any)
    images: int | None = None
    image_size: int | None = None  # image side in pixels (None: the processor's default for the model)
    freeze_vision: bool = False  # the vision tower does not train (the projector does, under full fine-tuning)
    text_only: bool = False  # a VLM on text alone (no images; a tower transformers builds counts as idle weights)

    @property
    def transformers_release(self) -> tuple[int, ...]:
        """The transformers release modelled: the run's, else the installed one, else the one the programs model."""
        return release(self.transformers or default_transformers())

    @property
    def transformers_version(self) -> str:
        """The transformers release modelled, as text (see :attr:`transformers_release`)."""
        return self.transformers or default_transformers()

    def __post_init__(self) -> None:
        enums: tuple[tuple[str, type[StrEnum]], ...] = (
            ("task", Task), ("method", Method), ("precision", Precision), ("weights_quant", WeightsQuant),
            ("optimizer", Optimizer), ("logits", LogitsMode), ("attention", Attention))
        for name, kind in enums:
            value = getattr(self, name)
            if not isinstance(value, kind):  # Workload(task="infer"): the enum's value, as the CLI spells it
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    choices = ", ".join(m.value for m in kind)
                    raise WorkloadError(f"{name} {value!r} is not one of: {choices}") from None
        if self.transformers is not None and (not isinstance(self.transformers, str) or
                                              not re.fullmatch(r"\d{1,3}\.\d{1,3}(\.\d{1,4})?", self.transformers)):
            raise WorkloadError(f"transformers {self.transformers!r} is not a release number like 5.24 or 5.17.0")
        if self.load not in LOADS:
            raise WorkloadError(f"load {self.load!r} is not one of: {', '.join(LOADS)}")
        if self.ssm_kernel not in ("fused", "torch"):
            raise WorkloadError(f"ssm_kernel {self.ssm_kernel!r} is not one of: fused, torch")
        if not isinstance(self.gradient_checkpointing, bool):
            raise WorkloadError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        if not (isinstance(self.lora_targets, tuple) and all(isinstance(t, str) for t in self.lora_targets)):
            raise WorkloadError(f"lora_targets must be a tuple of module names, got {self.lora_targets!r}")
        if self.trainable_layers is not None and (isinstance(self.trainable_layers, bool)
                                                  or not isinstance(self.trainable_layers, int)):
            raise WorkloadError(f"trainable_layers must be an integer, got {self.trainable_layers!r}")
        check_int_fields(self, (("batch_size", 1, _MAX_BATCH), ("seq_len", 1, _MAX_TOKENS),
                                ("new_tokens", 0, _MAX_TOKENS), ("lora_rank", 1, 1 << 16),
                                ("lora_alpha", 1, 1 << 20), ("gradient_accumulation", 1, 1 << 20),
                                ("loss_chunk", 0, _MAX_TOKENS), ("optimizer_rank", 1, 1 << 16),
                                ("galore_update_gap", 1, 1 << 30)))
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float) or \
                not 0.0 <= self.lora_dropout < 1.0:
            raise WorkloadError(f"lora_dropout = {self.lora_dropout!r} must be a number in [0, 1)")
        if self.quant_group_size is not None and (isinstance(self.quant_group_size, bool) or
                                                  not isinstance(self.quant_group_size, int) or
                                                  not 1 <= self.quant_group_size <= 1 << 16):
            raise WorkloadError(f"quant_group_size = {self.quant_group_size!r} must be an integer in 1..65536")
        if self.trainable_layers is not None and not 0 <= self.trainable_layers <= 4096:
            raise WorkloadError(f"trainable_layers = {self.trainable_layers} is out of range")
        if self.batch_size * (self.seq_len + self.new_tokens) > (1 << 31):
            raise WorkloadError("batch_size x sequence length exceeds 2**31 tokens; reduce one of them")
        if not self.lora_targets:
            raise WorkloadError("lora_targets is empty; name modules (q_proj,v_proj) or use all-linear")
        if self.method is Method.QLORA and self.weights_quant not in (WeightsQuant.NONE, WeightsQuant.NF4):
            raise WorkloadError("qlora quantizes the base weights to nf4; drop --weights-quant or use nf4")
        if self.is_train and self.weights_quant not in (WeightsQuant.NONE, WeightsQuant.NF4, WeightsQuant.FP4,
                                                        WeightsQuant.INT8, WeightsQuant.FP8):
            raise WorkloadError(f"training on {self.weights_quant.value} weights is not modelled; use --task infer "
                                "or nf4/int8 for LoRA on a quantized base")
        if self.task is Task.TRAIN and self.method is Method.FULL and self.weights_quant is not WeightsQuant.NONE:
            raise WorkloadError("full fine-tuning cannot train quantized weights; use --method qlora or lora")
        if self.avg_seq_len is not None and (isinstance(self.avg_seq_len, bool) or
                                             not isinstance(self.avg_seq_len, int) or
                                             not 1 <= self.avg_seq_len <= self.seq_len):
            raise WorkloadError(f"avg_seq_len = {self.avg_seq_len!r} must be an integer in 1..seq_len "
                                f"({self.seq_len})")
        _checkpoint_every(self.checkpointing)  # validates
        for name, lo, hi in (("images", 1, 4096), ("image_size", 14, 16384)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
                raise WorkloadError(f"{name.replace('_', '-')} = {value!r} must be an integer in {lo}..{hi}")
        for name in ("freeze_vision", "text_only"):
            if not isinstance(getattr(self, name), bool):
                raise WorkloadError(f"{name.replace('_', '-')} must be true or false")
        if self.text_only and (self.images is not None or self.image_size is not None or self.freeze_vision):
            raise WorkloadError("--text-only runs the language model without images: drop --images, --image-size "
                                "and --freeze-vision")
        if (self.gradient_checkpointing and self.checkpointing == "none") or self.checkpointing == "every:1":
            object.__setattr__(self, "checkpointing", "full")
        object.__setattr__(self, "gradient_checkpointing", self.checkpointing != "none")
        bad = [m for m in self.lora_modules_to_save if m not in ("embed_tokens", "lm_head")]
        if bad:
            raise WorkloadError(f"lora_modules_to_save {', '.join(bad)}: use embed_tokens and/or lm_head")
        if self.lora_modules_to_save and not self.uses_adapters:
            raise WorkloadError("--lora-modules-to-save needs an adapter method (lora, qlora, dora)")
        if not isinstance(self.alloc_conf, str):
            raise WorkloadError(f"alloc_conf must be a PYTORCH_CUDA_ALLOC_CONF string, got {self.alloc_conf!r}")
        from .allocator import parse_alloc_conf

        parse_alloc_conf(self.alloc_conf)  # a bad setting is an error here, not at estimate time

    @property
    def checkpoint_every(self) -> int:
        """Gradient checkpointing of the decoder layers: 0 none, 1 every layer, N every N-th layer."""
        return _checkpoint_every(self.checkpointing)

    @property
    def resolved_loss(self) -> Loss:
        """``auto`` resolved: TRL >= 1.8 SFTConfig.loss_type defaults to chunked_nll; transformers' loss otherwise."""
        if self.loss is not Loss.AUTO:
            return self.loss
        return Loss.CHUNKED if self.trainer is Trainer.TRL_SFT else Loss.STANDARD

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch as the model sees them: batch x seq_len padded, or the packed real tokens."""
        if self.packing:
            return self.batch_size * (self.avg_seq_len or self.seq_len)
        return self.batch_size * self.seq_len

    @property
    def vision_options(self) -> bool:
        """Whether any vision-language option is set (a text model refuses them)."""
        return self.images is not None or self.image_size is not None or self.freeze_vision or self.text_only

    @property
    def is_train(self) -> bool:
        return self.task is Task.TRAIN

    @property
    def uses_adapters(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA, Method.DORA)

    @property
    def base_quant(self) -> WeightsQuant:
        """How the frozen/served base weights are stored."""
        if self.method is Method.QLORA:
            return WeightsQuant.NF4
        return self.weights_quant

    @property
    def uses_double_quant(self) -> bool:
        """bitsandbytes 4-bit double quantization: only when asked (BitsAndBytesConfig's
        bnb_4bit_use_double_quant defaults to False, for QLoRA too)."""
        return bool(self.double_quant)

    def with_(self, **changes: object) -> Workload:
        if "gradient_checkpointing" in changes and "checkpointing" not in changes:
            changes["checkpointing"] = "full" if changes["gradient_checkpointing"] else "none"
        return replace(self, **changes)  # type: ignore[arg-type]


def _checkpoint_every(text: str) -> int:
    if not isinstance(text, str):
        raise WorkloadError(f"checkpointing {text!r} must be none, full or every:N")
    if text == "none":
        return 0
    if text == "full":
        return 1
    if text.startswith("every:"):
        try:
            n = int(text[6:])
        except ValueError:
            n = 0
        if 1 <= n <= 4096:
            return n
    if text.startswith("selective"):
        # torch.utils.checkpoint.create_selective_checkpoint_contexts with a policy (torchtitan's op-level SAC
        # saves matmul / attention outputs, recomputes the rest): which tensors a layer keeps depends on the policy
        # applied op by op to the replay, which the estimator does not run yet
        raise WorkloadError("selective (op-level) checkpointing is not modelled; use --checkpointing full or "
                            "every:N (torchtitan's layer-level selective AC is every:N)")
    raise WorkloadError(f"checkpointing {text!r} must be none, full or every:N (N >= 1)")
