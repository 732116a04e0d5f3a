"""Measure a workload for real on a CUDA GPU: the ground truth ``estimate`` and ``trace`` answer to.

Runs what the calibration harness runs (``shared/calibration/measure.py``): the model is built from
its config with random weights (no download), then three training steps (forward with the model's own
loss, backward, optimizer step, ``zero_grad(set_to_none=True)``, the output kept until after the step)
or one prefill plus decode steps under ``inference_mode``. Needs the ``[torch]`` extra and a CUDA
device; bitsandbytes for nf4/int8, QLoRA and 8-bit AdamW.

Times are of warm runs: the first call in a process pays one-off costs (cuBLAS/cuDNN handles and workspace,
lazy loading of each kernel, cuBLAS heuristics per GEMM shape, the allocator's first cudaMalloc of each
segment) that the time model does not predict. Training's first step is the warm-up, as in the harness
(``step_s``: the harness's statistic over steps 2..N; 0.0 with one step); inference runs the request once
untimed, then again timed (the harness times its first and only run: its prefill/decode times are cold).
The memory figures are of the first run, a fresh allocator (the harness's and the estimate's replay).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import VramplanError
from .workload import LogitsMode, Method, Optimizer, Precision, Task, WeightsQuant, Workload

__all__ = ["Measurement", "measure_workload"]


@dataclass(frozen=True, slots=True)
class Measurement:
    device: str
    torch_version: str
    cuda_context_bytes: int
    params: int
    trainable: int
    weights_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    step_s: float
    prefill_s: float
    decode_s_per_token: float


# VRAMPLAN_MEASURE_SMOKE=1 runs the same code on the CPU with the CUDA statistics stubbed out: it checks
# the harness before spending GPU time and measures nothing.
_SMOKE = os.environ.get("VRAMPLAN_MEASURE_SMOKE") == "1"
_DEV = "cpu" if _SMOKE else "cuda"


class _NoCuda:
    """The few torch.cuda calls measure makes, answering zeros (smoke mode only)."""

    @staticmethod
    def get_device_name(_: int = 0) -> str:
        return "cpu (smoke)"

    def __getattr__(self, name: str) -> Any:
        values: dict[str, Any] = {"mem_get_info": (0, 0)}
        return lambda *a, **k: values.get(name, 0)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise VramplanError("vramplan measure needs the [torch] extra: pip install 'vramplan[torch]'") from None
    if _SMOKE:
        return torch
    if not _cuda(torch).is_available():
        raise VramplanError("vramplan measure needs a CUDA GPU, and none is visible here; "
                            "use vramplan estimate or vramplan trace instead")
    return torch


def _cuda(torch: Any) -> Any:
    return _NoCuda() if _SMOKE else torch.cuda


def _build(config: Mapping[str, Any], w: Workload, torch: Any) -> Any:
    import transformers as tf

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    tcfg = tf.AutoConfig.for_model(model_type, **cfg)
    attn = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}[w.attention.value]
    # 16-bit precisions store 16-bit weights; fp32 and AMP keep fp32 parameters (calibration harness)
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(w.precision, torch.float32)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(_DEV):
            model = tf.AutoModelForCausalLM.from_config(tcfg, attn_implementation=attn)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)
    model.config.use_cache = False
    return model, tcfg


def _quantize(model: Any, quant: WeightsQuant, torch: Any, double_quant: bool = True) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise VramplanError(f"measuring {quant.value} weights needs bitsandbytes: pip install bitsandbytes") \
            from None
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                if quant is WeightsQuant.NF4:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                                            quant_type="nf4", device="meta")
                    new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                   compress_statistics=double_quant).to(_DEV)
                else:
                    raise VramplanError(f"measure supports nf4 quantization only, not {quant.value}")
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, cname, new)
    gc.collect()
    _cuda(torch).empty_cache()
    return model


def _optimizer(w: Workload, params: list[Any], torch: Any) -> Any:
    opt = w.optimizer
    if opt is Optimizer.ADAMW:
        return torch.optim.AdamW(params, lr=1e-5)
    if opt is Optimizer.ADAMW_FUSED:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if opt is Optimizer.SGD:
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    if opt is Optimizer.ADAFACTOR:
        return torch.optim.Adafactor(params, lr=1e-5)
    if opt is Optimizer.ADAMW_8BIT:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise VramplanError("adamw-8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    raise VramplanError(f"measure does not run the {opt.value} optimizer")


def measure_workload(config: Mapping[str, Any], w: Workload, steps: int = 3,
                     wrap: Callable[[Any], Any] | None = None) -> Measurement:
    """Run ``w`` on the current CUDA device and return what the caching allocator saw.

    ``wrap`` (training only) receives the model once it is ready to train (adapters, frozen layers and
    checkpointing applied) and returns the module to train, e.g. wrapped in DDP or sharded with FSDP
    (:mod:`vramplan.measure_dist`); the weights are counted and the optimizer built after it.
    """
    from .estimator import check_positions
    from .hfconfig import spec_from_config

    check_positions(spec_from_config(dict(config)), w)
    torch = _torch()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.empty(1, device=_DEV)
    gc.collect()
    _cuda(torch).empty_cache()
    free, total = _cuda(torch).mem_get_info()
    context = total - free - _cuda(torch).memory_reserved()
    _cuda(torch).reset_peak_memory_stats()
    model, tcfg = _build(config, w, torch)
    if w.base_quant is not WeightsQuant.NONE:
        model = _quantize(model, w.base_quant, torch, w.uses_double_quant)
    if w.task is Task.TRAIN:
        return _train(model, tcfg, w, torch, steps, context, wrap)
    if wrap is not None:
        raise VramplanError("measure runs multi-GPU layouts for training only")
    return _infer(model, tcfg, w, torch, context)


def _train(model: Any, tcfg: Any, w: Workload, torch: Any, steps: int, context: int,
           wrap: Callable[[Any], Any] | None = None) -> Measurement:
    if w.method is Method.QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=w.gradient_checkpointing)
    if w.uses_adapters:
        from peft import LoraConfig, get_peft_model

        from .hfconfig import spec_from_config
        from .memory import lora_targets

        spec = spec_from_config({"model_type": tcfg.model_type, **tcfg.to_dict()})
        targets: Any = "all-linear" if "all-linear" in w.lora_targets else sorted(lora_targets(spec, w.lora_targets))
        model = get_peft_model(model, LoraConfig(r=w.lora_rank, lora_alpha=w.lora_alpha, target_modules=targets,
                                                 lora_dropout=w.lora_dropout, task_type="CAUSAL_LM"))
    if w.method is Method.FREEZE:
        layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else None
        if layers is None:
            raise VramplanError("measure --method freeze supports models with model.layers only")
        k = w.trainable_layers if w.trainable_layers is not None else max(1, len(layers) // 4)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in model.model.norm.parameters():
            p.requires_grad_(True)
        if not tcfg.tie_word_embeddings:
            for p in model.lm_head.parameters():
                p.requires_grad_(True)
    if w.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if w.uses_adapters:
            model.enable_input_require_grads()
    model.train()
    if wrap is not None:
        model = wrap(model)
    _cuda(torch).synchronize()
    weights = _cuda(torch).memory_allocated()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    opt = _optimizer(w, params, torch)
    ids = torch.randint(0, tcfg.vocab_size, (w.batch_size, w.seq_len), device=_DEV)
    amp = w.precision.is_amp
    amp_dtype = torch.float16 if w.precision is Precision.AMP_FP16 else torch.bfloat16
    peaks, times = [], []
    for _ in range(steps):
        _cuda(torch).reset_peak_memory_stats()
        _cuda(torch).synchronize()
        t0 = time.perf_counter()
        out = None
        for _ in range(w.gradient_accumulation):
            # each micro-batch's output is dropped after its backward, except the last one's, which the
            # loop keeps through the optimizer step (as the calibration harness does)
            out = None
            with torch.autocast(_DEV, dtype=amp_dtype, enabled=amp):
                out = model(input_ids=ids, labels=ids)
            (out.loss / w.gradient_accumulation).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        _cuda(torch).synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append(_cuda(torch).max_memory_allocated())
    warm = sorted(times[1:])  # step 1 warms up (and creates the optimizer states): never timed
    step_s = warm[len(warm) // 2] if warm else 0.0  # the calibration harness's statistic (run_train)
    res = Measurement(_cuda(torch).get_device_name(0), torch.__version__, context, n_params, n_train, weights,
                      max(peaks), _cuda(torch).max_memory_reserved(), step_s, 0.0, 0.0)
    del model, opt, params, ids
    gc.collect()
    _cuda(torch).empty_cache()
    return res


def _infer(model: Any, tcfg: Any, w: Workload, torch: Any, context: int) -> Measurement:
    model.eval()
    model.config.use_cache = True
    _cuda(torch).synchronize()
    weights = _cuda(torch).memory_allocated()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, tcfg.vocab_size, (w.batch_size, w.seq_len), device=_DEV)
    _cuda(torch).reset_peak_memory_stats()
    _generate(model, ids, w, torch)  # the warm-up: its memory is what a fresh allocator holds (as the harness's)
    peak_allocated, peak_reserved = _cuda(torch).max_memory_allocated(), _cuda(torch).max_memory_reserved()
    prefill_s, decode_s = _generate(model, ids, w, torch)
    res = Measurement(_cuda(torch).get_device_name(0), torch.__version__, context, n_params, 0, weights,
                      peak_allocated, peak_reserved, 0.0, prefill_s, decode_s)
    del model, ids
    gc.collect()
    _cuda(torch).empty_cache()
    return res


def _generate(model: Any, ids: Any, w: Workload, torch: Any) -> tuple[float, float]:
    """One request: a prefill over ``ids`` and ``w.new_tokens`` decode steps (a plain forward loop, as the
    calibration harness runs); the prefill's seconds and the decode's seconds per token."""
    amp = w.precision.is_amp
    _cuda(torch).synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(_DEV, dtype=torch.bfloat16, enabled=amp):
        if w.logits is LogitsMode.LAST:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        else:
            out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        _cuda(torch).synchronize()
        t1 = time.perf_counter()
        for _ in range(w.new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            del out
        _cuda(torch).synchronize()
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(w.new_tokens, 1)
