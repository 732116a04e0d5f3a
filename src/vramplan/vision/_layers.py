"""The ops of vision and diffusion networks, recorded as PyTorch runs them on CUDA.

Each helper mirrors one module or functional call: the tensors it allocates (dtype and size), what
autograd saves for backward (``tools/autograd/derivatives.yaml``: ``convolution`` saves input and
weight whenever its node exists; ``mm``/``addmm`` save an operand only when the other side needs a
gradient; ``silu``/``gelu`` save their input; ``softmax`` and an in-place ``relu_`` their result;
``native_group_norm``/``native_layer_norm``/``cudnn_batch_norm`` their input and statistics;
``max_pool2d_with_indices`` its input and int64 indices), what ``torch.autocast`` casts
(``aten/src/ATen/autocast_mode.cpp``: convolutions and matmuls to 16-bit, with a cache of the 16-bit
copies of trainable fp32 weights for the rest of the forward; ``group_norm``, ``layer_norm``,
``upsample_nearest2d``, ``softmax`` and losses to fp32), and which attention kernel
``scaled_dot_product_attention`` takes (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``).
"""

from __future__ import annotations

from .._engine.numerics import Kernel, Numerics, sdpa_kernel
from .._engine.ops import fused_sdpa, lora_branch, math_sdpa, native_layer_norm, rms_normalize
from .._engine.tape import Tape, Tensor
from ..kinds import MemoryKind

__all__ = ["Layers"]

WEIGHTS = MemoryKind.WEIGHTS
LOSS = MemoryKind.LOGITS_LOSS


class Layers(Tape):
    """A :class:`~vramplan._engine.tape.Tape` with the layers vision and diffusion models are built from."""

    def __init__(self, num: Numerics) -> None:
        super().__init__(num.training)
        self.num = num
        self._cached: dict[str, Tensor] = {}
        self.param_tensors: dict[str, tuple[int, ...]] = {}  # module name -> its parameter tensors' sizes
        self.trainable_names: set[str] = set()
        # registered modules whose output never reaches what the caller uses (no gradient: see off_path)
        self.off_path_names: set[str] = set()
        self.buffers: dict[str, int] = {}  # registered buffers (elements): weights memory, not parameters

    def input(self, numel: int, elem: int, rg: bool = False, kind: MemoryKind = MemoryKind.ACTIVATIONS, *,
              held: bool = True) -> Tensor:
        """A tensor the script creates before the network runs and holds throughout (inputs, targets)."""
        return super().input(numel, elem, rg, kind, held=held)

    def param(self, name: str, numel: int, trainable: bool) -> tuple[tuple[int, int], ...]:
        """The gradient a trainable parameter receives (``AccumulateGrad``), in the parameter dtype."""
        if not trainable or not self.num.training:
            return ()
        return ((self.param_id(name), numel * self.num.param),)

    def register(self, name: str, sizes: tuple[int, ...], trainable: bool, *, off_path: bool = False) -> None:
        """Record a module's parameters (for exact counts and per-tensor optimizer and allocator rules).
        ``off_path``: the model builds (and may call) the module, but its output never reaches the loss, so its
        parameters get no gradient (not recorded op by op: its activations are left out)."""
        if name in self.param_tensors:
            return
        self.param_tensors[name] = tuple(n for n in sizes if n)
        if trainable:
            self.trainable_names.add(name)
        if off_path:
            self.off_path_names.add(name)

    def buffer(self, name: str, numel: int) -> None:
        """A floating-point buffer the model keeps on the GPU in the parameter dtype (a position table)."""
        self.buffers[name] = numel

    @property
    def parameters(self) -> int:
        return sum(sum(v) for v in self.param_tensors.values())

    @property
    def trainable_parameters(self) -> int:
        return sum(sum(self.param_tensors[n]) for n in self.trainable_names)

    def trainable_tensor_sizes(self) -> list[int]:
        return [n for name in sorted(self.trainable_names) for n in self.param_tensors[name]]

    def tensor_sizes(self) -> list[int]:
        return [n for v in self.param_tensors.values() for n in v]

    # ---- dtypes ------------------------------------------------------------------------------------
    def lower(self, x: Tensor) -> Tensor:
        """Autocast's cast of an activation to 16-bit before a convolution or matmul."""
        return self.cast(x, 2) if self.num.amp else x

    def fp32(self, x: Tensor) -> Tensor:
        """Autocast's cast to fp32 before an op on its fp32 list (norms, upsampling, losses)."""
        return self.cast(x, 4) if self.num.amp else x

    def weight_copy(self, name: str, numel: int, trainable: bool) -> Tensor | None:
        """Under autocast, the 16-bit copy of an fp32 weight a convolution or matmul uses.

        Copies of leaves that require grad (trainable here; parameters also require grad in inference
        unless frozen explicitly) are cached until autocast exits (the end of the forward); frozen weights
        are cast at every call. Weights already stored in 16-bit are used as they are.
        """
        if not self.num.amp or self.num.param == 2:
            return None
        if trainable:
            hit = self._cached.get(name)
            if hit is None:
                hit = self.op(numel, 2, (), rg=False, kind=WEIGHTS)
                self._cached[name] = hit
            return hit
        return self.op(numel, 2, (), rg=False, kind=WEIGHTS)

    def end_autocast(self) -> None:
        """Autocast exits: its cached weight copies are dropped (those saved for backward live on)."""
        self.hold(*self._cached.values())
        self._cached.clear()

    # ---- convolutions and linears -------------------------------------------------------------------
    def conv(self, x: Tensor, cin: int, cout: int, k: int | tuple[int, int], out_positions: int, name: str, *,
             bias: bool = True, trainable: bool = True, groups: int = 1, batch: int = 1,
             lora_rank: int = 0) -> Tensor:
        """``nn.Conv2d``: ``out_positions`` output pixels per image. ConvolutionBackward saves input and
        weight whenever the node exists (one backward formula for all inputs)."""
        kh, kw = (k, k) if isinstance(k, int) else k
        wn = cout * (cin // groups) * kh * kw
        pn = wn + (cout if bias else 0)
        self.register(name, (wn, cout if bias else 0), trainable)
        xin = self.lower(x)
        wc = self.weight_copy(name, pn, trainable)
        node = xin.rg or (trainable and self.num.training)
        save = ((xin,) + ((wc,) if wc is not None else ())) if node else ()
        ins = (xin,) + ((wc,) if wc is not None else ())
        amp_grad = wn * 2 if (wc is not None and trainable) else 0  # 16-bit weight grad, then cast to fp32
        y = self.op(batch * cout * out_positions, self._out_elem(xin), ins, save=save,
                    params=self.param(name, pn, trainable), rg=xin.rg or trainable, grad_to=(xin,),
                    bwd_scratch=amp_grad)
        if lora_rank:
            y = self._lora_conv(x, y, cin, cout, kh * kw, out_positions, batch, lora_rank, name)
        return y

    def linear(self, x: Tensor, fin: int, fout: int, name: str, *, bias: bool = True, trainable: bool = True,
               lora_rank: int = 0) -> Tensor:
        """``nn.Linear`` over the last dim (``addmm``/``mm`` on the flattened input)."""
        rows = x.numel // fin
        pn = fin * fout + (fout if bias else 0)
        self.register(name, (fin * fout, fout if bias else 0), trainable)
        xin = self.lower(x)
        wc = self.weight_copy(name, pn, trainable)
        tr = trainable and self.num.training
        save = ((xin,) if tr else ()) + ((wc,) if (wc is not None and xin.rg) else ())
        ins = (xin,) + ((wc,) if wc is not None else ())
        amp_grad = fin * fout * 2 if (wc is not None and tr) else 0
        y = self.op(rows * fout, self._out_elem(xin), ins, save=save, params=self.param(name, pn, trainable),
                    rg=xin.rg or trainable, grad_to=(xin,), bwd_scratch=amp_grad)
        if lora_rank:
            y = self._lora_linear(x, y, fin, fout, lora_rank, name)
        return y

    def _out_elem(self, xin: Tensor) -> int:
        return 2 if self.num.amp else xin.elem

    def _lora_linear(self, x: Tensor, y: Tensor, fin: int, fout: int, r: int, name: str) -> Tensor:
        """peft ``lora.Linear``: ``result + lora_B(lora_A(x.to(adapter dtype))) * scaling``; adapters in
        ``num.lora_param`` (the dtype diffusers' LoRA scripts leave them in: ``_estimate.adapter_elem``)."""
        _, bs = lora_branch(self, x, x.numel // fin, fout, r, adapter_elem=self.num.lora_param, amp=self.num.amp,
                            params_a=self._adapter(name + ".lora_A", r * fin),
                            params_b=self._adapter(name + ".lora_B", fout * r))
        return self._plus_adapter(y, bs)

    def _lora_conv(self, x: Tensor, y: Tensor, cin: int, cout: int, kk: int, positions: int, batch: int,
                   r: int, name: str) -> Tensor:
        """peft ``lora.Conv2d``: the same branch with ``lora_A`` a ``kk``-tap convolution and ``lora_B`` a 1x1 one."""
        _, bs = lora_branch(self, x, batch * positions, cout, r, adapter_elem=self.num.lora_param, amp=self.num.amp,
                            params_a=self._adapter(name + ".lora_A", r * cin * kk),
                            params_b=self._adapter(name + ".lora_B", cout * r), view_grad=False)
        return self._plus_adapter(y, bs)

    def _plus_adapter(self, y: Tensor, bs: Tensor) -> Tensor:
        """``result + adapter output``, then cast back to the result's dtype."""
        s = self.op(y.numel, max(y.elem, bs.elem), (y, bs), passthrough=y.elem == bs.elem)
        return self.cast(s, y.elem)

    def _adapter(self, name: str, numel: int) -> tuple[tuple[int, int], ...]:
        self.register(name, (numel,), True)
        if not self.num.training:
            return ()
        pid = self._param_ids.setdefault(name, len(self._param_ids))
        return ((pid, numel * self.num.lora_param),)  # AccumulateGrad: the gradient in the adapter's dtype

    # ---- normalization ------------------------------------------------------------------------------
    def group_norm(self, x: Tensor, channels: int, groups: int, batch: int, *, trainable: bool = True,
                   name: str = "gn") -> Tensor:
        """``nn.GroupNorm`` (``native_group_norm``): saves input, mean and rstd; fp32 under autocast."""
        self.register(name, (channels, channels), trainable)
        xin = self.fp32(x)
        node = xin.rg or (trainable and self.num.training)
        stats = self.op(2 * batch * groups, 4, (), rg=False)
        return self.op(x.numel, xin.elem, (xin, stats), save=(xin, stats) if node else (),
                       params=self.param(name, 2 * channels, trainable), rg=xin.rg or trainable,
                       grad_to=(xin,))

    def layer_norm(self, x: Tensor, dim: int, *, trainable: bool = True, affine: bool = True, bias: bool = True,
                   name: str = "ln") -> Tensor:
        """``nn.LayerNorm`` (``native_layer_norm``): saves input, mean and rstd (fp32); fp32 under autocast."""
        if affine:
            self.register(name, (dim, dim if bias else 0), trainable)
        xin = self.fp32(x)
        has_params = affine and trainable and self.num.training
        pn = dim * (2 if bias else 1) if affine else 0
        return native_layer_norm(self, xin, x.numel // dim, params=self.param(name, pn, affine and trainable),
                                 node=xin.rg or has_params)

    def rms_norm(self, x: Tensor, dim: int, *, trainable: bool = True, name: str = "rms") -> Tensor:
        """diffusers ``RMSNorm``: ``x.float().pow(2).mean(-1)``, ``x * rsqrt(var + eps)``, cast back, ``* weight``."""
        self.register(name, (dim,), trainable)
        n = rms_normalize(self, x, dim)
        n = self.cast(n, x.elem)
        node = n.rg or (trainable and self.num.training)
        return self.op(x.numel, x.elem, (n,), save=(n,) if (trainable and self.num.training) else (),
                       params=self.param(name, dim, trainable), rg=node, grad_to=(n,))

    def batch_norm(self, x: Tensor, channels: int, *, trainable: bool = True, name: str = "bn") -> Tensor:
        """``nn.BatchNorm2d`` in training mode (``cudnn_batch_norm``): a new output; saves the input and
        per-channel statistics. Not on autocast's lists: runs in the input's dtype."""
        self.register(name, (channels, channels), trainable)
        node = x.rg or (trainable and self.num.training)
        if self.num.training:
            stats = self.op(2 * channels, 4, (), rg=False)
            return self.op(x.numel, x.elem, (x, stats), save=(x, stats) if node else (),
                           params=self.param(name, 2 * channels, trainable), rg=node, grad_to=(x,))
        return self.op(x.numel, x.elem, (x,))

    # ---- elementwise --------------------------------------------------------------------------------
    def silu(self, x: Tensor) -> Tensor:
        return self.unary(x, save_in=True)

    def gelu(self, x: Tensor) -> Tensor:
        return self.unary(x, save_in=True)

    def inplace(self, x: Tensor, *, save_result: bool = False, others: tuple[Tensor, ...] = (),
                passthrough: bool = False) -> Tensor:
        """An in-place op (``relu_``, ``add_``): the result shares ``x``'s storage (nothing is allocated)
        but is a new node for autograd, which receives its own gradient."""
        out = self.op(x.numel, x.elem, (x, *others), passthrough=passthrough)
        root = x.base if x.base is not None else x
        out.base = root
        out.nbytes = 0
        self.own_grad.add(id(out))
        if save_result and out.rg:
            self.save_output(root)
        return out

    def relu_(self, x: Tensor) -> Tensor:
        """``nn.ReLU(inplace=True)``: in place; ``threshold_backward`` reads the result."""
        return self.inplace(x, save_result=True)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        """``a + b`` (broadcasting): the gradient passes through to same-shaped inputs."""
        big = a if a.numel >= b.numel else b
        return self.op(big.numel, max(a.elem, b.elem), (a, b), passthrough=True)

    def scale(self, x: Tensor) -> Tensor:
        """``x * c`` or ``x / c`` with a Python number: a new tensor, nothing saved."""
        return self.op(x.numel, x.elem, (x,))

    def cat(self, xs: tuple[Tensor, ...]) -> Tensor:
        """``torch.cat``: a new tensor; its backward hands each input a narrow view of the gradient."""
        elem = max(t.elem for t in xs)
        return self.op(sum(t.numel for t in xs), elem, xs, passthrough=True)

    def copy(self, x: Tensor) -> Tensor:
        """``.contiguous()`` of a permuted tensor (or ``reshape`` that must copy)."""
        return self.op(x.numel, x.elem, (x,), passthrough=True)

    def upsample_nearest(self, x: Tensor, factor: int = 2) -> Tensor:
        """``F.interpolate(mode="nearest")``: a new tensor ``factor**2`` larger (fp32 under autocast)."""
        xin = self.fp32(x)
        return self.op(x.numel * factor * factor, xin.elem, (xin,))

    # ---- attention ------------------------------------------------------------------------------------
    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, batch: int, heads: int, sq: int, sk: int,
                  head_dim: int, eager: bool = False, upcast_softmax: bool = False,
                  has_mask: bool = False) -> Tensor:
        """Attention over (B, H, Sq, d) queries and (B, H, Sk, d) keys/values; returns (B, Sq, H*d).

        ``scaled_dot_product_attention`` runs the kernel :func:`~vramplan._engine.numerics.sdpa_kernel` picks, as
        :mod:`vramplan._engine.ops` records it for every model. The eager path is diffusers'
        ``AttnProcessor``: heads are moved into the batch (copies), ``baddbmm`` into an empty
        (B*H, Sq, Sk) tensor, softmax, ``bmm``, heads moved back (a copy).
        """
        elem = q.elem
        if self.num.amp:
            q, k, v = self.lower(q), self.lower(k), self.lower(v)
            elem = 2
        scores = batch * heads * sq * sk
        if eager:
            qb = self.copy(q)
            kb = self.copy(k)
            vb = self.copy(v)
            empty = self.op(scores, elem, (), rg=False)
            att = self.op(scores, elem, (qb, kb, empty), save=((qb,) if kb.rg else ()) + ((kb,) if qb.rg else ()),
                          grad_to=(qb, kb))
            self.hold(empty)
            if upcast_softmax and elem != 4:
                att = self.cast(att, 4)
            pelem = 4 if self.num.amp else att.elem  # autocast runs softmax in fp32
            probs = self.op(scores, pelem, (att,))
            if probs.rg:
                self.save_output(probs)
            probs = self.cast(probs, elem)
            o = self.op(batch * heads * sq * head_dim, elem, (probs, vb),
                        save=((probs,) if vb.rg else ()) + ((vb,) if probs.rg else ()))
            return self.copy(o)
        kernel = sdpa_kernel(elem, head_dim, has_mask)
        if kernel is Kernel.MATH:  # (the heads moved back: a copy)
            return self.copy(math_sdpa(self, q, k, v, batch=batch, heads=heads, sq=sq, skv=sk, head_dim=head_dim,
                                       value_dim=head_dim, heads_kv=heads))
        return fused_sdpa(self, q, k, v, kernel, batch=batch, heads=heads, sq=sq, skv=sk, head_dim=head_dim,
                          value_dim=head_dim, heads_kv=heads)

    # ---- losses -------------------------------------------------------------------------------------
    def mse_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """``F.mse_loss(pred.float(), target.float())``: both fp32 copies saved; a scalar loss."""
        p = self.cast(pred, 4)
        t = self.cast(target, 4)
        loss = self.op(1, 4, (p, t), save=(p, t) if p.rg else (), kind=LOSS)
        self.keep(loss)
        return loss

    def cross_entropy(self, logits: Tensor, classes: int) -> Tensor:
        """``F.cross_entropy(logits.float(), y)``: log_softmax saves its fp32 result, then nll_loss."""
        l32 = self.cast(logits, 4)
        ls = self.op(l32.numel, 4, (l32,), kind=LOSS)
        if ls.rg:
            self.save_output(ls)
        loss = self.op(1, 4, (ls,), save=(ls,) if ls.rg else (), kind=LOSS)
        self.keep(loss)
        _ = classes
        return loss
