"""Stand-ins for bitsandbytes' quantized layers and 8-bit optimizer, whose CUDA kernels cannot run on fake
tensors. Each stand-in stores exactly what the real one keeps on the GPU and allocates the same
temporaries in its forward and backward (bitsandbytes 0.50: ``Linear4bit`` / ``MatMul4Bit``,
``Linear8bitLt`` / ``MatMul8bitLt``, ``AdamW8bit``); the arithmetic itself is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "AdamW8bitEmulation", "EmulatedLinear4bit", "EmulatedLinear8bit", "EmulatedLinearFP8", "Lion",
    "QuantLinear", "quantize_linears",
]

NF4_BLOCK = 64  # Linear4bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: the absmax values are quantized to 8 bits in blocks of 256


class QuantLinear(nn.Linear):
    """Base of the stand-ins: an ``nn.Linear`` (so peft and "all-linear" treat it as one) without a
    full-size weight."""

    compute_dtype: torch.dtype

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    def constants(self) -> list[torch.Tensor]:
        """Quantization constants held on the device (not parameters)."""
        return []

    def dequantized(self) -> torch.Tensor:
        """The 16-bit weight temporary a kernel materializes (int8 and fp8 backward, nf4 everywhere)."""
        return torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype,
                           device=self.weight.device)


class _DequantMatmul(torch.autograd.Function):
    """bitsandbytes MatMul4Bit / MatMul8bitLt: dequantize the weight to a temporary, matmul, and in backward
    dequantize again for the input gradient. The input is not saved."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, marker: torch.Tensor, module: QuantLinear,
                bias: torch.Tensor | None) -> torch.Tensor:
        w = module.dequantized()
        out = torch.nn.functional.linear(a, w.to(a.dtype), bias)
        ctx.module = module
        ctx.dtype_a = a.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.matmul(grad_output, ctx.module.dequantized().to(grad_output.dtype))
        return grad_a, None, None, None


class EmulatedLinear4bit(QuantLinear):
    """bitsandbytes ``Linear4bit`` (NF4, double quantization): packed uint8 weight of numel/2 bytes, one
    uint8 absmax per 64 weights, one fp32 absmax per 256 of those, and a 256-entry fp32 code book."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool = True) -> None:
        super().__init__(linear, compute_dtype)
        dev = linear.weight.device
        n = linear.weight.numel()
        self.weight = nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=dev),
                                   requires_grad=False)
        blocks = math.ceil(n / NF4_BLOCK)
        self.double_quant = double_quant
        self.code = torch.empty(16, dtype=torch.float32, device=dev)
        if not double_quant:  # compress_statistics=False: one fp32 absmax per block
            self.absmax = torch.empty(blocks, dtype=torch.float32, device=dev)
            return
        self.absmax = torch.empty(blocks, dtype=torch.uint8, device=dev)
        self.absmax2 = torch.empty(math.ceil(blocks / NESTED_BLOCK), dtype=torch.float32, device=dev)
        self.code2 = torch.empty(256, dtype=torch.float32, device=dev)
        self.offset = torch.empty((), dtype=torch.float32, device=dev)

    def constants(self) -> list[torch.Tensor]:
        if not self.double_quant:
            return [self.absmax, self.code]
        return [self.absmax, self.absmax2, self.code2, self.code, self.offset]

    def _absmax32(self) -> torch.Tensor:
        """dequantize_blockwise(absmax) -> fp32, += offset (double quant); the fp32 absmax as is otherwise."""
        if not self.double_quant:
            return self.absmax
        absmax = torch.empty(self.absmax.numel(), dtype=torch.float32, device=self.weight.device)
        absmax += self.offset
        return absmax

    def dequantized(self) -> torch.Tensor:
        # functional.dequantize_4bit: the fp32 absmax, then the weight
        self._absmax32()
        return torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype,
                           device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if x.numel() == x.shape[-1] and not x.requires_grad:
            # gemv_4bit: single-token inference reads the packed weight directly
            self._absmax32()
            out = x.new_empty(*x.shape[:-1], self.out_features)
            if bias is not None:
                out += bias
        else:
            out = _DequantMatmul.apply(x, self.weight, self, bias)
        return out.to(inp_dtype)


class EmulatedLinear8bit(QuantLinear):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8, no outliers assumed): int8 weight + one fp32 scale per output
    row. Forward quantizes the input row-wise to int8 (from fp16), multiplies into an int32 result and
    dequantizes to fp16."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__(linear, compute_dtype)
        dev = linear.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.int8,
                                               device=dev), requires_grad=False)
        self.scb = torch.empty(self.out_features, dtype=torch.float32, device=dev)

    def constants(self) -> list[torch.Tensor]:
        return [self.scb]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _DequantMatmul.apply(x, self.weight, self, self.bias)
        rows = x.numel() // x.shape[-1]
        a16 = x.to(torch.float16)
        ca = torch.empty(a16.shape, dtype=torch.int8, device=x.device)  # int8_vectorwise_quant
        sca = torch.empty(rows, dtype=torch.float32, device=x.device)
        acc = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.int32, device=x.device)
        del a16
        out16 = torch.empty(acc.shape, dtype=torch.float16, device=x.device)  # int8_mm_dequant
        del acc, ca, sca
        if self.bias is not None:
            out16 += self.bias.to(torch.float16)
        return out16.to(x.dtype)


class EmulatedLinearFP8(QuantLinear):
    """8-bit float weights (e4m3) with one fp32 scale per tensor; the input is cast to fp8 with its own
    scale and multiplied by ``_scaled_mm`` into the compute dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__(linear, compute_dtype)
        dev = linear.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features,
                                               dtype=torch.float8_e4m3fn, device=dev), requires_grad=False)
        self.scale = torch.empty((), dtype=torch.float32, device=dev)

    def constants(self) -> list[torch.Tensor]:
        return [self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _DequantMatmul.apply(x, self.weight, self, self.bias)
        xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=self.compute_dtype, device=x.device)
        del xq
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.to(x.dtype)


_KINDS: dict[str, type[QuantLinear]] = {
    "nf4": EmulatedLinear4bit, "int8": EmulatedLinear8bit, "fp8": EmulatedLinearFP8,
}


def quantize_linears(model: nn.Module, kind: str, compute_dtype: torch.dtype,
                     skip: Iterable[str] = ("lm_head",), double_quant: bool = True) -> int:
    """Swap every ``nn.Linear`` but the output head for a stand-in (as measure.py's ``to_4bit`` does)."""
    cls = _KINDS[kind]
    skip = set(skip)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    count = 0
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.Linear and cname not in skip and child is not head:
                if cls is EmulatedLinear4bit:
                    setattr(mod, cname, EmulatedLinear4bit(child, compute_dtype, double_quant))
                else:
                    setattr(mod, cname, cls(child, compute_dtype))
                count += 1
    return count


# ---- optimizers --------------------------------------------------------------------------------------

class AdamW8bitEmulation(torch.optim.Optimizer):
    """bitsandbytes ``AdamW8bit`` state: tensors of >= 4096 elements keep both moments as uint8 plus one fp32
    absmax per 256-element block (blockwise dynamic quantization); smaller tensors keep fp32 moments. The
    update kernel works in place, so a step allocates nothing but the state on its first call."""

    MIN_8BIT_SIZE = 4096
    BLOCK = 256

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    if p.numel() >= self.MIN_8BIT_SIZE:
                        blocks = math.ceil(p.numel() / self.BLOCK)
                        state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                        state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    else:
                        state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                        state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                p.add_(p.grad, alpha=-group["lr"])


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023) as lion-pytorch implements it: one momentum per parameter, and the update
    ``sign(beta1 * m + (1 - beta1) * g)`` built in a parameter-sized temporary."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.clone().mul_(beta1).add(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
