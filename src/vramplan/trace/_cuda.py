"""What a CUDA device does differently from the fake CPU device the trace runs on.

The trace runs on fake *cpu* tensors (a CPU-only torch build aborts on the first backward with fake CUDA
tensors), so every place where PyTorch picks a kernel by device is redirected to the CUDA choice:

* ``scaled_dot_product_attention``: the fused kernel choice of ``sdp::select_sdp_backend``
  (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp). On the calibration H200 (torch 2.11, cuDNN
  9.19) bf16/fp16 attention without a mask runs cuDNN attention (flash when cuDNN declines): both keep only
  the output and an fp32 log-sum-exp (B, H, S) for backward, and their backward allocates an fp32 dQ
  accumulator (B, S, H, D), a (B, H, S) fp32 row sum and, for grouped-query attention, dK/dV at the full
  query head count. fp32 inputs or an explicit mask take the memory-efficient kernel (output + log-sum-exp;
  backward: an fp32 dQ-sized accumulator). Anything else takes the math path, which on torch >= 2.5
  upcasts 16-bit inputs to fp32 and materialises the (B, H, L, S) scores and probabilities.
* ``dropout``: CUDA runs the fused ``native_dropout`` (a 1-byte bool mask is saved), CPU multiplies by a
  noise tensor of the input's dtype.
* autocast: ``torch.autocast("cuda")`` is a no-op on a CPU-only build and the CPU autocast lists differ
  from CUDA's, so the CPU autocast dispatch key is given the CUDA cast policies
  (aten/src/ATen/autocast_mode.cpp), including the cast cache for fp32 leaf tensors that require grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._engine.numerics import MEM_EFF_MASK_ALIGNMENT
from ..blocks import LIGER_SM_COUNT

__all__ = [
    "AutocastEmulation",
    "attention_backward_transient",
    "choose_sdpa_backend",
    "cuda_dropout",
    "cuda_sdpa",
    "grouped_mm_any_dtype",
    "hub_rmsnorm_kernels",
    "index_backward_in_place",
    "register_cuda_kernels",
    "safe_softmax_transient",
]

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


# ---- scaled dot product attention --------------------------------------------------------------------

def _heads_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> bool:
    """check_batch_size_and_num_heads_dense (sdp_utils_cpp.h)."""
    if not (q.size(0) == k.size(0) == v.size(0)):
        return False
    hq, hk, hv = q.size(-3), k.size(-3), v.size(-3)
    if enable_gqa:
        return hk == hv and hq % hk == 0
    return hq == hk == hv


def choose_sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        dropout_p: float, is_causal: bool, enable_gqa: bool) -> str:
    """``fused`` (cuDNN / flash), ``efficient`` or ``math``, as CUDA sm80+ picks them."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not (q.dtype == k.dtype == v.dtype):
        return "math"
    nonzero = q.size(2) > 0 and k.size(2) > 0
    dq, dk, dv = q.size(-1), k.size(-1), v.size(-1)
    strides = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    heads = _heads_ok(q, k, v, enable_gqa)
    if (attn_mask is None and q.dtype in _HALF and dq == dk == dv and dq <= 256
            and not (is_causal and q.size(2) != k.size(2)) and heads and nonzero
            and (strides or dq == 1)):
        return "fused"
    align = 8 if q.dtype in _HALF else 4  # minimum_gemm_alignment on sm80+
    elsize = q.element_size()
    offsets = all((t.storage_offset() * elsize) % (align * elsize) == 0 for t in (q, k, v))
    mask_ok = attn_mask is None or attn_mask.stride(-1) == 1
    # The memory-efficient kernel needs equal head counts: torch 2.11 on the H200 sends fp32 GQA to math.
    same_heads = q.size(-3) == k.size(-3) == v.size(-3)
    if (q.dtype in (*_HALF, torch.float32) and dq == dk and dq % align == 0 and dv % align == 0 and dq > 0
            and offsets and heads and same_heads and nonzero and strides and mask_ok):
        return "efficient"
    return "math"


def _bool_mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """convert_boolean_attn_mask (aten/src/ATen/native/transformers/attention.cpp, torch 2.8+): ``at::where(mask,
    0.0, -inf)``, a new additive mask of the (broadcast) mask's shape in the query dtype."""
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))


def _preprocess_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """preprocess_mask (attention.cpp, torch 2.4+): a mask whose leading strides are not multiples of 8 elements
    (or whose last stride is not 1) is padded by ``8 - last % 8`` columns (``pad_bias``: a new contiguous tensor of
    the mask's own shape, e.g. (B, 1, L, S + pad)) and sliced back; then expanded, as a view, to (B, H, L, S).
    (torch 2.0-2.3 expanded first and padded the per-head tensor to a multiple of 16.)"""
    align = MEM_EFF_MASK_ALIGNMENT
    if not (all(mask.stride(i) % align == 0 for i in range(mask.dim() - 1)) and mask.stride(-1) == 1):
        last = mask.size(-1)
        mask = torch.nn.functional.pad(mask, (0, align - last % align))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def cuda_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """aten::scaled_dot_product_attention as it runs on CUDA (attention.cpp), on any device."""
    backend = choose_sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if backend == "fused":
        return aten._scaled_dot_product_flash_attention.default(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    mask = _bool_mask_to_additive(attn_mask, query.dtype) if attn_mask is not None else None
    if backend == "efficient":
        if mask is not None:
            mask = _preprocess_mask(mask, query, key)
        needs_lse = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                  or value.requires_grad)
        return aten._scaled_dot_product_efficient_attention.default(
            query, key, value, mask, needs_lse, dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_attention_math.default(
        query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def attention_backward_transient(func: Any, args: tuple[Any, ...]) -> int:
    """Bytes a fused attention backward kernel allocates and frees internally.

    Measured on the H200 (cuDNN 9.19): backward peaks at grads + an fp32 (B, S, Hq, D) dQ accumulator +
    a (B, Hq, S) fp32 row sum, plus dK and dV at the query head count when key/value heads are fewer
    (FlashAttention-2's mha_bwd allocates the same: dq_accum, softmax_d, dk_expanded, dv_expanded).
    """
    grad_out, q, k = args[0], args[1], args[2]
    b, hq, sq, d = q.shape
    sk = k.size(2)
    total = b * hq * sq * d * 4 + b * hq * sq * 4
    if func is aten._scaled_dot_product_flash_attention_backward.default and k.size(1) != hq:
        total += 2 * b * hq * sk * d * grad_out.element_size()
    return total


def safe_softmax_transient(args: tuple[Any, ...]) -> int:
    """aten::_safe_softmax (the math attention path's softmax) on CUDA also builds ``self == -inf`` as a bool
    tensor of the scores' shape to zero fully-masked rows; measured on the H200 (Falcon-7B prefill: scores,
    probabilities and this mask are alive together)."""
    return int(args[0].numel())


def grouped_mm_any_dtype(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> Any:
    """aten::_grouped_mm for every dtype: the meta kernel only accepts bf16, while CUDA (and CPU) fall back to a
    per-group loop for fp32/fp16 (MoE experts under AMP or after prepare_model_for_kbit_training). The output
    is the only allocation either way."""
    from torch.utils._python_dispatch import _disable_current_modes

    if a.dtype == b.dtype == torch.bfloat16:
        return NotImplemented  # the tracker runs the op as is
    with _disable_current_modes():
        def meta(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device="meta")

        shape = aten._grouped_mm.default(meta(a, torch.bfloat16), meta(b, torch.bfloat16), meta(offs),
                                         meta(bias, torch.bfloat16), torch.bfloat16).shape
    return torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)


def index_backward_in_place(self: torch.Tensor, indices: Any, values: torch.Tensor, accumulate: bool = False) -> Any:
    """``index.Tensor``'s backward as it runs on real CUDA tensors. ``index_backward``
    (torch/csrc/autograd/FunctionsManual.cpp) accumulates the gradient into its fresh ``zeros_like(self)`` with the
    in-place ``_index_put_impl_``, and takes the out-of-place ``index_put`` only when ``areAnyTensorSubclassLike``:
    true for fake tensors and whenever a dispatch mode is on, so under the trace it would hold a second buffer of
    the indexed tensor's size (MoE dispatch: ``hidden_states[perm // top_k]``, ``weighted_out[inv_perm]``)."""
    node = torch._C._current_autograd_node()
    if not accumulate or node is None or node.name() != "IndexBackward0":
        return NotImplemented
    return aten.index_put_.default(self, indices, values, True)


# ---- dropout -----------------------------------------------------------------------------------------

def cuda_dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """aten::dropout on CUDA (Dropout.cpp): the fused native_dropout keeps a bool mask for backward."""
    if not train or p == 0 or input.numel() == 0:
        return input
    if p >= 1:
        return input * torch.zeros_like(input)
    return aten.native_dropout.default(input, p, train)[0]


def _dropout_kernel(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return cuda_dropout(input, p, train)


def _sdpa_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                 scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    return cuda_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


# ---- autocast ----------------------------------------------------------------------------------------
# CUDA cast policies, aten/src/ATen/autocast_mode.cpp (AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE).
_LOWER = {
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    "cudnn_convolution", "cudnn_convolution_transpose", "vdot",
}
_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "rms_norm", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa", "binary_cross_entropy",
}
_FP32_SET_OPT_DTYPE = {
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
}
_FP32_APPEND_DTYPE = {"norm.Scalar", "norm.ScalarOpt_dim"}
_PROMOTE = {
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
}


def _op(qualname: str) -> torch._ops.OpOverload:
    name, _, overload = qualname.partition(".")
    packet = getattr(aten, name)
    return getattr(packet, overload or "default")


def _autocast_ops(key: str) -> set[str]:
    """Overload names (without ``aten::``) that have a kernel for an autocast dispatch key."""
    found = set()
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            found.add(name[len("aten::"):])
    return found


class AutocastEmulation:
    """CUDA autocast policies on the CPU autocast key, with CUDA's cast cache."""

    def __init__(self, lower: torch.dtype) -> None:
        self.lower = lower
        self.cache: dict[int, torch.Tensor] = {}

    def _eligible(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        if isinstance(t, (list, tuple)):
            return type(t)(self._cast(x, dtype) for x in t)
        if not self._eligible(t) or t.dtype == dtype:
            return t
        # cached_cast (autocast_mode.cpp): fp32 leaves that require grad, never under inference_mode (#158232)
        cacheable = (dtype == self.lower and t.dtype == torch.float32 and t.requires_grad and t.is_leaf
                     and not t._is_view() and torch.is_autocast_cache_enabled()
                     and not torch.is_inference_mode_enabled())
        if cacheable:
            hit = self.cache.get(id(t))
            if hit is None:
                hit = t.to(dtype)
                self.cache[id(t)] = hit
            return hit
        return t.to(dtype)

    def kernel(self, op: torch._ops.OpOverload, policy: str) -> Callable[..., Any]:
        names = [a.name for a in op._schema.arguments]
        dtype_pos = names.index("dtype") if "dtype" in names else -1
        kwarg_only = dtype_pos >= 0 and op._schema.arguments[dtype_pos].kwarg_only
        excl = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

        def run(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(excl):
                if policy == "lower":
                    args = tuple(self._cast(a, self.lower) for a in args)
                    kwargs = {k: self._cast(v, self.lower) for k, v in kwargs.items()}
                elif policy == "fp32":
                    args = tuple(self._cast(a, torch.float32) for a in args)
                    kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
                elif policy == "fp32_set_opt_dtype":
                    if args and self._eligible(args[0]):
                        if kwarg_only or dtype_pos < 0:
                            if kwargs.get("dtype") is None and dtype_pos >= 0:
                                kwargs = {**kwargs, "dtype": torch.float32}
                        elif dtype_pos < len(args):
                            if args[dtype_pos] is None:
                                args = (*args[:dtype_pos], torch.float32, *args[dtype_pos + 1:])
                        elif kwargs.get("dtype") is None:
                            kwargs = {**kwargs, "dtype": torch.float32}
                elif policy == "fp32_append_dtype":
                    if args and self._eligible(args[0]) and args[0].dtype != torch.float32:
                        args = (args[0].to(torch.float32), *args[1:])
                elif policy == "promote":
                    floats = [a for a in (*args, *kwargs.values()) if self._eligible(a)]
                    if floats:
                        widest = floats[0].dtype
                        for f in floats[1:]:
                            widest = torch.promote_types(widest, f.dtype)
                        args = tuple(self._cast(a, widest) for a in args)
                        kwargs = {k: self._cast(v, widest) for k, v in kwargs.items()}
                return op(*args, **kwargs)

        return run

    def clear(self) -> None:
        self.cache.clear()


def _policy(name: str) -> str | None:
    for policy, names in (("lower", _LOWER), ("fp32", _FP32), ("fp32_set_opt_dtype", _FP32_SET_OPT_DTYPE),
                          ("fp32_append_dtype", _FP32_APPEND_DTYPE), ("promote", _PROMOTE)):
        if name in names:
            return policy
    return None


@contextlib.contextmanager
def register_cuda_kernels(autocast: AutocastEmulation | None,
                          sdpa: Callable[..., torch.Tensor] | None = None) -> Iterator[None]:
    """Install the CUDA behaviours on the CPU dispatch keys for the duration of a trace."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    clear_orig = torch.clear_autocast_cache
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.impl("scaled_dot_product_attention", sdpa or _sdpa_kernel, "AutogradCPU")
            lib.impl("dropout", _dropout_kernel, "AutogradCPU")
            if autocast is not None:
                cuda_ops = _autocast_ops("AutocastCUDA")
                cpu_ops = _autocast_ops("AutocastCPU")
                for name in sorted(cuda_ops | cpu_ops | _LOWER | _FP32 | _FP32_SET_OPT_DTYPE | _PROMOTE):
                    try:
                        op = _op(name)
                    except AttributeError:
                        continue
                    policy = _policy(name)
                    if policy is None:
                        if name in cpu_ops:
                            lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
                        continue
                    lib.impl(name, autocast.kernel(op, policy), "AutocastCPU")

                def clear() -> None:
                    clear_orig()
                    autocast.clear()

                torch.clear_autocast_cache = clear  # torch.autocast.__exit__ calls it at nesting level 0
        yield
    finally:
        torch.clear_autocast_cache = clear_orig
        lib._destroy()


# ---- transformers' hub kernels -----------------------------------------------------------------------------------

class _LigerRMSNorm(torch.autograd.Function):
    """The allocations of kernels-community's LigerRMSNormFunction (liger-kernels ``rms_norm.py``, casting mode
    "llama", ``in_place=True``) on any device: ``ensure_contiguous`` inputs; forward: the output in the input's dtype
    and an fp32 inverse RMS per row, saving the input, the weight and that RSTD; backward: a (SM count, hidden) fp32
    partial weight gradient, the input gradient written into the output gradient, ``_dW.sum(0).to(W.dtype)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.view(-1, x.shape[-1])
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, weight, _ = ctx.saved_tensors
        dy = dy.contiguous()
        partial = torch.empty((LIGER_SM_COUNT, rows.shape[1]), dtype=torch.float32, device=dy.device)
        return dy, partial.sum(dim=0).to(weight.dtype)


@contextlib.contextmanager
def hub_rmsnorm_kernels(model: torch.nn.Module, on: bool) -> Iterator[int]:
    """With ``on``: every module of the language model (``get_decoder()``, as the estimate models it; a vision tower's
    norms are left alone) whose class transformers decorates ``use_kernel_forward_from_hub("RMSNorm")`` runs
    :class:`_LigerRMSNorm`, as ``kernelize`` on CUDA swaps in kernels-community's LigerRMSNorm (transformers
    integrations/hub_kernels.py). The classes are the ones ``data/hub_kernels.json`` lists (read from transformers'
    source), so the swap does not depend on the ``kernels`` package marking them. Yields how many modules run it."""
    swapped: list[torch.nn.Module] = []
    if on:
        from ..estimator import hub_rmsnorm_classes

        classes = hub_rmsnorm_classes()
        root: torch.nn.Module = model
        try:
            decoder = model.get_decoder()  # type: ignore[operator]
            if isinstance(decoder, torch.nn.Module):
                root = decoder
        except (AttributeError, TypeError, NotImplementedError):
            pass
        for m in root.modules():
            weight = getattr(m, "weight", None)
            if type(m).__name__ in classes and isinstance(weight, torch.nn.Parameter):
                m.forward = (lambda hidden_states, *a, _w=weight, **k:  # type: ignore[method-assign]
                             _LigerRMSNorm.apply(hidden_states, _w))
                swapped.append(m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
