"""Build the real transformers (and peft) model for a workload, on fake tensors, the way the calibration
harness (``measure.py``) builds it on the GPU."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import VramplanError
from ..workload import Attention, Method, Optimizer, Precision, Task, WeightsQuant, Workload
from ._quant import AdamW8bitEmulation, Lion, QuantLinear, quantize_linears
from ._resolve import build_config, hf_config, model_class

__all__ = ["BuiltModel", "build_model", "make_optimizer", "param_dtype"]

def param_dtype(precision: Precision) -> torch.dtype:
    """bf16/fp16 keep 16-bit weights; fp32 and AMP keep fp32 weights (AMP casts in autocast)."""
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision, torch.float32)


def compute_dtype(precision: Precision) -> torch.dtype:
    return torch.float16 if precision in (Precision.FP16, Precision.AMP_FP16) else torch.bfloat16


@dataclass
class BuiltModel:
    model: nn.Module
    config: Any
    head: nn.Module | None
    quant_modules: list[QuantLinear]
    attn_implementation: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The longest ModuleList of the model (its decoder layers) and the module holding it."""
    best: tuple[nn.Module, nn.ModuleList] | None = None
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and (best is None or len(child) > len(best[1])):
                best = (parent, child)
    if best is None:
        raise VramplanError("cannot find the decoder layers of this model to freeze")
    return best


def _freeze(model: nn.Module, head: nn.Module | None, trainable_layers: int | None) -> int:
    """Method freeze: only the last N decoder layers, the final norm and an untied output head train."""
    parent, layers = _decoder_layers(model)
    n = len(layers)
    keep = max(1, n // 4) if trainable_layers is None else min(trainable_layers, n)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[n - keep:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for cname, child in parent.named_children():  # the final norm: norm, ln_f, final_layer_norm
        lowered = cname.lower()
        if "emb" in lowered or child is layers or not ("norm" in lowered or lowered.startswith("ln")):
            continue
        for p in child.parameters():
            p.requires_grad_(True)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and head.weight is not emb.weight:
        head.weight.requires_grad_(True)
    return keep


# Module names of the vision towers and projectors of transformers' vision-language models (5.24 modeling files):
# vision_tower (LLaVA, Gemma 3, PaliGemma, Mistral 3, InternVL), visual (Qwen-VL, whose projector is visual.merger),
# vision_model (Mllama, Idefics 3, SmolVLM, Llama 4); multi_modal_projector / connector are the projectors.
VISION_TOWERS = ("vision_tower", "visual", "vision_model")
PROJECTORS = ("multi_modal_projector", "connector", "merger")
LORA_EXCLUDE = r".*\.(" + "|".join(VISION_TOWERS + PROJECTORS) + r")(\..*)?"


def freeze_vision_tower(model: nn.Module) -> int:
    """``--freeze-vision``: the vision tower stops training, its projector keeps training (LLaMA-Factory's
    freeze_vision_tower). Returns the number of frozen parameters."""
    frozen = 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] not in VISION_TOWERS:
            continue
        for pname, p in mod.named_parameters():
            if any(part in PROJECTORS for part in pname.split(".")):
                continue
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def _lora_class(clone_result: bool) -> type[nn.Module]:
    """peft's LoRA layer for bitsandbytes layers (peft/tuners/lora/bnb.py): the base output is cloned (4-bit
    only), the input cast to the adapter dtype, and the adapter output cast back before the add."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraQuantLinear(LoraLinear):  # type: ignore[misc]
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if clone_result:
                result = result.clone()
            for active in self.active_adapters:
                if active not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[active], self.lora_B[active]
                dropout, scaling = self.lora_dropout[active], self.scaling[active]
                # peft asks torch.is_autocast_enabled() (CUDA); the trace's autocast runs on the CPU key
                requires_conversion = not (torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"))
                if requires_conversion:
                    expected = result.dtype
                    x = self._cast_input_dtype(x, lora_a.weight.dtype)
                if clone_result:
                    output = lora_b(lora_a(dropout(x))) * scaling
                    if requires_conversion:
                        output = output.to(expected)
                else:
                    output = lora_b(lora_a(dropout(x)))
                    if requires_conversion:
                        output = output.to(expected)
                    output = output * scaling
                result = result + output
            return result

    return LoraQuantLinear


def build_model(raw: Mapping[str, Any], workload: Workload, name: str) -> BuiltModel:
    """Build under an active FakeTensorMode (the caller enters it)."""
    import transformers

    cfg, warnings = hf_config(raw, name)
    cls = model_class(cfg, name)
    notes: list[str] = [f"model class {cls.__name__} (transformers' text-generation mapping for "
                        f"{type(cfg).__name__})"]
    whole = cfg
    cfg = build_config(cfg, cls)
    if cfg is not whole:
        towers = [k for k in getattr(whole, "sub_configs", {}) or {} if k != "text_config"]
        notes.append(f"model class {cls.__name__} is the language model alone: transformers builds it on the "
                     f"config's text_config ({type(cfg).__name__}); the {', '.join(towers) or 'other'} tower(s) are "
                     "not built (architectures naming the image-text class would build the whole model)")
    attn = "eager" if workload.attention is Attention.EAGER else "sdpa"
    if workload.attention is Attention.FLASH:
        notes.append("attention flash: traced as SDPA's fused kernel (flash-attn keeps the same output + "
                     "log-sum-exp for backward)")
    dtype = param_dtype(workload.precision)
    try:
        model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype)
    except ValueError as exc:
        if attn != "sdpa" or "attention implementation" not in str(exc):
            raise VramplanError(f"{name}: transformers cannot build this model: {exc}") from None
        attn = "eager"
        warnings.append(f"{type(cfg).__name__.removesuffix('Config')} has no SDPA attention in transformers "
                        f"{transformers.__version__}; traced with eager attention (what transformers falls back to)")
        model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype)
    towers = [k for k in getattr(cfg, "sub_configs", {}) or {} if k != "text_config"
              and getattr(cfg, k, None) is not None and any(w in k for w in ("vision", "audio", "vq", "image"))]
    vision = getattr(cfg, "vision_config", None) is not None
    if towers and (workload.text_only or not vision):
        warnings.append(f"{cls.__name__} is built whole ({', '.join(towers)} included: their weights count) but run "
                        "on text tokens only: the vision/audio tower's activations are not traced")
    head = model.get_output_embeddings()
    train = workload.task is Task.TRAIN
    model.config.use_cache = not train
    quant = workload.base_quant
    qkind = {WeightsQuant.NF4: "nf4", WeightsQuant.INT8: "int8", WeightsQuant.FP8: "fp8"}.get(quant)
    if qkind is not None:
        n = quantize_linears(model, qkind, compute_dtype(workload.precision),
                             double_quant=workload.uses_double_quant)
        notes.append({
            "nf4": f"{n} linear layers as bitsandbytes NF4 Linear4bit (emulated): packed uint8 weight "
                   "(numel/2 bytes), "
                   + ("uint8 absmax per 64 weights + fp32 per 256 absmax (double quant)"
                      if workload.uses_double_quant else "fp32 absmax per 64 weights (no double quant)")
                   + "; forward/backward dequantize to a 16-bit temporary weight",
            "int8": f"{n} linear layers as bitsandbytes LLM.int8 (emulated, no outlier columns): int8 weight + "
                    "fp32 scale per output row; int8 input copy and int32 product per call",
            "fp8": f"{n} linear layers as fp8 e4m3 (emulated): 1 byte per weight + one fp32 scale per tensor; "
                   "fp8 input copy per call",
        }[qkind])
    if train and workload.uses_adapters and qkind is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=workload.gradient_checkpointing)
        notes.append("prepare_model_for_kbit_training: non-quantized parameters (embeddings, norms, output head) "
                     "cast to fp32")
    if train and workload.uses_adapters:
        from peft import LoraConfig, get_peft_model

        targets: Any = list(workload.lora_targets)
        if targets == ["all-linear"]:
            targets = "all-linear"
        elif targets == ["default"]:
            targets = None  # peft's per-family default (q_proj+v_proj for LLaMA, query_key_value for Falcon)
        lcfg = LoraConfig(r=workload.lora_rank, lora_alpha=workload.lora_alpha, target_modules=targets,
                          lora_dropout=workload.lora_dropout, task_type="CAUSAL_LM",
                          use_dora=workload.method is Method.DORA, use_rslora=workload.rslora,
                          modules_to_save=list(workload.lora_modules_to_save) or None,
                          exclude_modules=LORA_EXCLUDE if vision else None)
        if vision:
            notes.append("LoRA on the language model only: the vision tower and projector stay frozen (LLaMA-Factory's "
                         "defaults freeze_vision_tower, freeze_multi_modal_projector)")
        if qkind is not None:
            lcfg._register_custom_module({QuantLinear: _lora_class(clone_result=qkind == "nf4")})
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as exc:
            raise VramplanError(f"{name}: peft cannot apply LoRA to {targets!r}: {exc}") from None
    if train and workload.method is Method.FREEZE:
        keep = _freeze(model, head, workload.trainable_layers)
        notes.append(f"freeze: the last {keep} decoder layers, the final norm and an untied output head train")
    if train and vision and workload.freeze_vision and workload.method is Method.FULL:
        n = freeze_vision_tower(model)
        notes.append(f"--freeze-vision: {n} vision-tower parameters frozen (the projector trains)")
    if train and workload.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if workload.uses_adapters:
            model.enable_input_require_grads()
    if train:
        model.train()
    else:
        model.eval()
    quant_modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return BuiltModel(model, cfg, head, quant_modules, attn, notes, warnings)


def make_optimizer(params: list[nn.Parameter], optimizer: Optimizer) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer measure.py uses, with the implementation CUDA would pick (foreach: fake parameters are not
    in torch's foreach-supported types, so it is requested explicitly)."""
    lr = 1e-5
    if optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(params, lr=lr, foreach=True), "torch.optim.AdamW (foreach)"
    if optimizer is Optimizer.ADAMW_FUSED:
        return torch.optim.AdamW(params, lr=lr, fused=True), "torch.optim.AdamW (fused)"
    if optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True), "torch.optim.SGD momentum 0.9 (foreach)"
    if optimizer is Optimizer.ADAFACTOR:
        return torch.optim.Adafactor(params, lr=lr, foreach=True), "torch.optim.Adafactor (foreach)"
    if optimizer is Optimizer.LION:
        return Lion(params, lr=lr), "Lion (lion-pytorch style: one momentum, one update temporary)"
    if optimizer is Optimizer.MUON:
        return MuonWithAdamW(params, lr=lr), ("torch.optim.Muon on the 2-D weights of the decoder layers, "
                                             "torch.optim.AdamW (foreach) on the rest")
    if optimizer is Optimizer.ADAMW_8BIT:
        return AdamW8bitEmulation(params, lr=lr), (
            "bitsandbytes AdamW8bit emulated: uint8 moments + fp32 absmax per 256 elements for tensors of "
            ">= 4096 elements, fp32 moments below; in-place update")
    raise VramplanError(f"optimizer {optimizer} is not supported by the trace (bitsandbytes paged buffers and the "
                        "galore/apollo projections are modelled by vramplan estimate from their source)")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the 2-D hidden weights, AdamW for embeddings, head, norms and biases, as Muon is used."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        params = list(params)
        big = max((p.numel() for p in params), default=0)
        # the embedding and an untied head are the largest 2-D tensors with a vocabulary-sized side
        mats = [p for p in params if p.ndim == 2 and p.numel() != big]
        rest = [p for p in params if not (p.ndim == 2 and p.numel() != big)]
        super().__init__(params, {"lr": lr})
        self.parts: list[torch.optim.Optimizer] = []
        if mats:
            self.parts.append(torch.optim.Muon(mats, lr=lr))
        if rest:
            self.parts.append(torch.optim.AdamW(rest, lr=lr, foreach=True))
        self.state = {}  # type: ignore[assignment]

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for opt in self.parts:
            opt.step()
        self.state = {k: v for opt in self.parts for k, v in opt.state.items()}  # type: ignore[assignment]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)
