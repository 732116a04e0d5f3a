"""The op library both model kinds are recorded with: what an ATen kernel or a library layer allocates and saves,
independent of the model that calls it.

The language recipes (:mod:`vramplan.blocks`) and the image-model layers (:mod:`vramplan.vision._layers`) build their
modules from these; a kernel's behaviour (which tensors ``scaled_dot_product_attention`` keeps, what
``native_layer_norm`` saves, what peft's LoRA branch allocates) is written once here.
"""

from __future__ import annotations

from collections.abc import Callable

from .numerics import Kernel
from .tape import Tape, Tensor

__all__ = ["fused_sdpa", "lora_branch", "math_sdpa", "native_layer_norm", "rms_normalize"]


def native_layer_norm(tp: Tape, xin: Tensor, rows: int, *, params: tuple[tuple[int, int], ...],
                      node: bool) -> Tensor:
    """``aten::native_layer_norm`` over ``rows`` rows of ``xin``: a new output in the input's dtype and the fp32 mean
    and rstd, which the backward node saves with the input (``tools/autograd/derivatives.yaml``). ``node``: the
    backward node exists (the input needs a gradient or the affine parameters are trained)."""
    stats = tp.op(2 * rows, 4, (), rg=False)
    return tp.op(xin.numel, xin.elem, (xin, stats), save=(xin, stats) if node else (), params=params,
                 rg=node, grad_to=(xin,))


def rms_normalize(tp: Tape, x: Tensor, dim: int) -> Tensor:
    """``x.float()``, ``pow(2).mean(-1)``, ``x * rsqrt(var + eps)``: the fp32 normalised tensor every RMSNorm
    (transformers' ``LlamaRMSNorm`` and kin, diffusers' ``RMSNorm``) computes before its weight.

    ``pow``'s backward (``torch/csrc/autograd/FunctionsManual.cpp`` ``pow_backward``: ``grad * (exponent *
    self.pow(exponent - 1))``) makes ``x.pow(1)`` and twice that before the product that is the input's gradient.
    """
    x32 = tp.cast(x, 4)
    sq = tp.op(x.numel, 4, (x32,), save=(x32,) if x32.rg else (), bwd_scratch=2 * x.numel * 4)
    var = tp.op(x.numel // dim, 4, (sq,))
    rs = tp.unary(var, save_out=True)
    return tp.mul(x32, rs)


def fused_sdpa(tp: Tape, q: Tensor, k: Tensor, v: Tensor, kernel: Kernel, *, batch: int, heads: int, sq: int,
               skv: int, head_dim: int, value_dim: int, heads_kv: int, extra: tuple[Tensor, ...] = (),
               extra_grads: tuple[Tensor, ...] = ()) -> Tensor:
    """``scaled_dot_product_attention`` on the flash or memory-efficient kernel: returns the (B, Sq, H*dv) output.

    Forward (``aten/src/ATen/native/transformers/cuda/attention.cu``): the output and an fp32 log-sum-exp, which the
    flash kernel always writes (B, H, Sq) and the efficient one only when an input needs a gradient
    (``compute_log_sumexp``), its rows padded to 32. Both keep q, k, v, the output and the log-sum-exp (and the
    efficient kernel's float mask, ``extra``) for backward. Backward allocates an fp32 dQ accumulator and an fp32
    (B, H, Sq) row sum, plus dK and dV at the query head count when key/value heads are fewer (flash-attention's
    ``mha_bwd``: ``dq_accum``, ``softmax_d``, ``dk_expanded``, ``dv_expanded``; measured on the H200 by
    :func:`vramplan.trace._cuda.attention_backward_transient`). ``extra_grads``: extra inputs that receive a gradient
    (a float mask that requires grad).
    """
    rg = q.rg or k.rg or v.rg or any(t.rg for t in extra_grads)
    ins: tuple[Tensor, ...] = (q, k, v)
    if kernel is Kernel.FLASH or rg:
        lse_len = sq if kernel is Kernel.FLASH else -(-sq // 32) * 32
        ins += (tp.op(batch * heads * lse_len, 4, (), rg=False),)
    ins += extra
    out = tp.op(batch * sq * heads * value_dim, q.elem, ins, save=ins if rg else (),
                grad_to=(q, k, v, *extra_grads), rg=rg)
    if rg:
        tp.save_output(out)
        scratch = batch * sq * heads * head_dim * 4 + batch * heads * sq * 4
        if heads_kv != heads:
            scratch += batch * skv * heads * (head_dim + value_dim) * q.elem
        tp.ops[-1].bwd_scratch = scratch
    return out


def math_sdpa(tp: Tape, q: Tensor, k: Tensor, v: Tensor, *, batch: int, heads: int, sq: int, skv: int,
              head_dim: int, value_dim: int, heads_kv: int, enable_gqa: bool = False,
              mask: Callable[[], Tensor | None] = lambda: None,
              dropout: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """``_scaled_dot_product_attention_math`` (``aten/src/ATen/native/transformers/attention.cpp``): returns the
    (B, H, Sq, dv)-sized output in the query's dtype.

    16-bit inputs are upcast to fp32 (torch >= 2.5); q and k are each scaled by sqrt(scale); with ``enable_gqa`` the
    fp32 keys and values are ``repeat_interleave``d to every query head first, otherwise fewer key heads are broadcast
    by the matmul (an expand + reshape copy). ``mask()`` makes the mask the softmax adds, after the scores (None:
    none); ``_safe_softmax`` also builds an ``== -inf`` bool mask of the scores' shape during the kernel. The
    function returns ``attn.to(origin dtype)`` beside the output (discarded by the caller), and its locals (the fp32
    copies and the scaled query) stay referenced until it returns.
    """
    rg = q.rg or k.rg or v.rg
    elem = q.elem
    scores = batch * heads * sq * skv
    q32, k32, v32 = tp.cast(q, 4), tp.cast(k, 4), tp.cast(v, 4)
    locals_: tuple[Tensor, ...] = (q, k, v, q32, k32, v32)
    qs = tp.op(q32.numel, 4, (q32,))
    m = mask()  # is_causal: the tril mask is made after the query is scaled; a local until the function returns
    if m is not None:
        locals_ += (m,)
    if heads_kv != heads and enable_gqa:
        k32 = tp.op(batch * heads * skv * head_dim, 4, (k32,))
        v32 = tp.op(batch * heads * skv * value_dim, 4, (v32,))
        locals_ += (k32, v32)
    elif heads_kv != heads:
        k32 = tp.op(batch * heads * skv * head_dim, 4, (k32,))
    ks = tp.op(k32.numel, 4, (k32,))
    # matmul folds the (B, H, S, d) query to 3-D for bmm: a copy, since the scaled query keeps the strides of the
    # (B, S, H, d) projection it was transposed from; bmm saves that copy (and the scaled keys' view)
    qc = tp.op(qs.numel, 4, (qs,))
    att = tp.op(scores, 4, (qc, ks), save=(qc, ks) if rg else ())
    probs = tp.op(scores, 4, (att,) + ((m,) if m else ()), grad_to=(att,), fwd_scratch=scores)
    if rg:
        tp.save_output(probs)
    probs = dropout(probs)
    if heads_kv != heads and not enable_gqa:
        v32 = tp.op(batch * heads * skv * value_dim, 4, (v32,))
    o32 = tp.op(batch * sq * heads * value_dim, 4, (probs, v32), save=(probs, v32) if rg else ())
    if elem != 4:
        tp.op(scores, elem, (probs,), rg=False)
    out = tp.cast(o32, elem)
    tp.hold(*locals_, qs)
    return out


def lora_branch(tp: Tape, x: Tensor, rows: int, fout: int, r: int, *, adapter_elem: int, amp: bool,
                params_a: tuple[tuple[int, int], ...], params_b: tuple[tuple[int, int], ...],
                dropout: Callable[[Tensor], Tensor] = lambda t: t, view_grad: bool = True) -> tuple[Tensor, Tensor]:
    """peft ``lora.Linear``'s adapter branch (``peft/tuners/lora/layer.py``, 0.21): ``x`` cast to the adapter's dtype
    (``_cast_input_dtype``), dropout, ``lora_A`` then ``lora_B`` (each saving its input; under autocast the fp32
    input is cast to 16-bit again for the matmul), times ``scaling``. Returns (``lora_B``'s output, the scaled
    output); the caller adds the latter to the base layer's result. ``rows``: the positions the adapter runs on (tokens,
    or output pixels of a convolution, whose ``lora_A`` is the convolution and ``lora_B`` a 1x1 one). ``view_grad``:
    ``lora_A``'s input gradient comes back as a view (a linear on a 3-D input; a convolution's does not)."""
    xa = dropout(tp.cast(x, adapter_elem))
    a_in = tp.cast(xa, 2) if amp else xa
    a = tp.op(rows * r, a_in.elem, (a_in,), save=(a_in,), params=params_a, rg=True, grad_to=(a_in,))
    tp.ops[-1].view_grad_in = view_grad  # nn.Linear on the 3-D input: its gradient a view (see _Op.view_grad_in)
    b = tp.op(rows * fout, a.elem, (a,), save=(a,), params=params_b, rg=True)
    return b, tp.op(b.numel, b.elem, (b,))
