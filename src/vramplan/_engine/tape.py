"""The recorder: a program of ops over abstract tensors, with what autograd saves for backward.

A tensor carries only a size, a memory kind and whether it requires grad. Each op states which tensors
autograd saves for backward, following PyTorch's ``tools/autograd/derivatives.yaml`` (``mm`` saves
``self`` only when ``mat2`` requires grad; ``softmax`` saves its result). Language models record one
block at a time (:mod:`vramplan.blocks`), image models a whole network (:mod:`vramplan.vision`); both
are replayed by :mod:`.replay`.

Besides ops, views and kernel temporaries, a program records what the replay needs for networks that are
not stacks of identical layers: **checkpoint regions** (ops run under ``torch.utils.checkpoint``),
**pass-through backward** (``add``, reshapes, ``cat``: the output gradient is handed on without a new
buffer), and results of in-place ops that share a storage but not a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..kinds import MemoryKind

__all__ = ["ZERO", "Moment", "Tape", "Tensor", "kinds_dict"]

_KINDS = tuple(MemoryKind)
_IDX = {k: i for i, k in enumerate(_KINDS)}


class Tensor:
    """An abstract tensor: bytes, kind, requires-grad, and bookkeeping for the replay."""

    __slots__ = ("base", "elem", "external", "keep", "kind", "last_use", "nbytes", "numel", "rg", "saved_by")

    def __init__(self, numel: int, elem: int, kind: int, rg: bool, external: bool = False,
                 base: Tensor | None = None) -> None:
        self.numel = numel
        self.elem = elem  # bytes per element
        self.base = base  # a view shares its base's storage: it allocates nothing, saving it keeps the base
        self.nbytes = 0 if base is not None else numel * elem
        self.kind = kind
        self.rg = rg
        self.external = external  # allocated before the program runs (its input)
        self.keep = False  # referenced after the program (its output, caches, the script's inputs)
        self.last_use = -1
        self.saved_by: list[int] = []


def root(t: Tensor) -> Tensor:
    """The tensor that owns ``t``'s storage."""
    return t.base if t.base is not None else t


@dataclass(frozen=True, slots=True)
class Moment:
    """Bytes in use at one moment, in total and by kind (indexed as :class:`MemoryKind`)."""

    total: int
    kinds: tuple[int, ...]

    @staticmethod
    def of(mapping: dict[MemoryKind, int]) -> Moment:
        v = tuple(mapping.get(k, 0) for k in _KINDS)
        return Moment(sum(v), v)

    def __add__(self, other: Moment) -> Moment:
        v = tuple(a + b for a, b in zip(self.kinds, other.kinds, strict=True))
        return Moment(sum(v), v)

    def as_dict(self) -> dict[MemoryKind, int]:
        return kinds_dict(self.kinds)


ZERO = Moment(0, (0,) * len(_KINDS))


def kinds_dict(v: tuple[int, ...]) -> dict[MemoryKind, int]:
    return {k: v[i] for i, k in enumerate(_KINDS) if v[i]}


class _Op:
    __slots__ = ("add_like", "bwd_scratch", "cast_scratch", "fwd_scratch", "grad_inputs", "inputs", "outputs",
                 "packs_weight", "params", "passthrough", "region", "saved", "view_grad_in", "weight_first")

    def __init__(self, outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], grad_inputs: tuple[Tensor, ...],
                 saved: tuple[Tensor, ...], params: tuple[tuple[int, int], ...], fwd_scratch: int,
                 bwd_scratch: int, passthrough: bool, region: int) -> None:
        self.outputs = outputs
        self.inputs = inputs
        self.grad_inputs = grad_inputs  # inputs that receive a gradient from this op
        self.saved = saved
        self.params = params  # (param id, grad bytes) of trainable parameters used
        self.fwd_scratch = fwd_scratch
        self.bwd_scratch = bwd_scratch
        # the backward makes the parameters' gradients before the inputs' (a bias-free linear: MmBackward0)
        self.weight_first = False
        # the inputs' gradients arrive as views: F.linear of a 3-D input runs on its 2-D view, and ViewBackward0
        # returns the matmul's gradient reshaped (a view that keeps its base: never added into in place)
        self.view_grad_in = False
        # input gradients the engine's validate_outputs makes (cast / summed down) from full-size results while the
        # op's saved tensors may still be referenced (see Tape.unpacked_saves)
        self.cast_scratch = 0
        # autograd saves a parameter for this op's backward (a linear whose input needs a gradient saves its weight):
        # not an activation, but a checkpoint packs it like any saved tensor (recompute trigger and early stop)
        self.packs_weight = False
        # an add: AddBackward0 hands the output gradient itself to both inputs (derivatives.yaml ``self: grad``,
        # ``other: maybe_multiply(grad, alpha)``), which share it until one is added into (see replay)
        self.add_like = False
        self.passthrough = passthrough  # backward hands the output gradient to the inputs unchanged
        self.region = region  # the checkpoint region the op runs in, or -1


class Tape:
    """Records a program of ops; :mod:`.replay` replays it."""

    def __init__(self, training: bool) -> None:
        self.training = training
        self.ops: list[_Op] = []
        self.tensors: list[Tensor] = []
        self.region_inputs: dict[int, list[Tensor]] = {}  # what each checkpoint holds for its backward
        self.own_grad: set[int] = set()  # results of in-place ops: share a storage, not a gradient
        # parameters whose gradient contributions are views (a linear's weight gradient: the transpose of its matmul
        # output) and that the program uses more than once: autograd adds the first two out of place (replay)
        self.view_grads: set[int] = set()
        # kept tensors whose gradient the program's own ops make (the logits a training loop holds, differentiated
        # through the loss in the same program): not seeds of its backward (replay.layer_backward)
        self.inner_grads: set[int] = set()
        # parameters whose gradient meets, in its AccumulateGrad's InputBuffer, a contribution another program made
        # earlier that is a view (a tied embedding: the head's weight gradient is MmBackward0's result transposed by
        # TBackward0): the two are added out of place (torch/csrc/autograd/input_buffer.cpp accumulate: a view keeps
        # its base referenced, so can_accumulate_inplace fails; seen on real CPU tensors and in the trace)
        self.meets_view_grad: set[int] = set()
        # of those, the ones without a ``.grad`` yet: AccumulateGrad takes the sum as the gradient (the caller frees
        # the earlier contribution's buffer)
        self.sum_is_grad: set[int] = set()
        self._producer_region: dict[int, int] = {}
        self._current = -1
        self._param_ids: dict[str, int] = {}
        # the program is recomputed under non-reentrant torch.utils.checkpoint: its saved tensors are dropped as the
        # backward unpacks them (the checkpoint's unpack hook), before the engine validates the op's gradients
        self.unpacked_saves = False
        # kept tensors the caller releases when the base model's forward returns (attention masks: locals of
        # LlamaModel.forward and its kin that no op saves for backward)
        self.forward_scoped: list[Tensor] = []

    # ---- recording ------------------------------------------------------------------------
    def input(self, numel: int, elem: int, rg: bool = False, kind: MemoryKind = MemoryKind.ACTIVATIONS, *,
              held: bool = False) -> Tensor:
        """A tensor allocated before the program runs: a block's input (dies at its last use unless saved),
        or with ``held`` one the script creates and holds throughout (inputs, targets)."""
        t = Tensor(numel, elem, _IDX[kind], rg and self.training, external=True)
        t.keep = held
        self.tensors.append(t)
        self._producer_region[id(t)] = -2
        return t

    def op(self, numel: int, elem: int, inputs: tuple[Tensor, ...] = (), *, save: tuple[Tensor, ...] = (),
           params: tuple[tuple[int, int], ...] = (), rg: bool | None = None,
           kind: MemoryKind | int = MemoryKind.ACTIVATIONS, fwd_scratch: int = 0, bwd_scratch: int = 0,
           grad_to: tuple[Tensor, ...] | None = None, passthrough: bool = False) -> Tensor:
        """Record an op producing one new tensor of ``numel`` elements of ``elem`` bytes.

        ``save`` lists what autograd keeps for backward; ``params`` the trainable parameters whose
        gradient this op produces; ``rg`` whether the output requires grad (default: any input does,
        or a trainable parameter is used); ``grad_to`` the inputs that receive a gradient (default: every
        input that requires grad); ``passthrough``: backward hands the output gradient on unchanged.
        """
        idx = len(self.ops)
        if rg is None:
            rg = bool(params)
            for t in inputs:
                if t.rg:
                    rg = True
                    break
        rg = rg and self.training
        out = Tensor(numel, elem, kind if isinstance(kind, int) else _IDX[kind], rg)
        self.tensors.append(out)
        for t in inputs:  # (_use, written out: every op of every model comes through here)
            t.last_use = idx
            if t.base is not None:
                t.base.last_use = idx
        if self._current >= 0:
            self._note_region_inputs(inputs)
        if not self.training:
            save, params, bwd_scratch = (), (), 0
        if save:
            save = tuple([t if t.base is None else t.base for t in save])
            for t in save:
                t.saved_by.append(idx)
        else:
            save = ()
        gin = tuple([t for t in (inputs if grad_to is None else grad_to) if t.rg])
        self.ops.append(_Op((out,), inputs, gin, save, params, fwd_scratch, bwd_scratch, passthrough,
                            self._current))
        self._producer_region[id(out)] = self._current
        return out

    # ---- pointwise ops, shared by every model kind -------------------------------------------
    def cast(self, x: Tensor, elem: int) -> Tensor:
        """``x.to(dtype)``: a new tensor of the same kind unless the dtype already matches; saves nothing."""
        if x.elem == elem:
            return x
        return self.op(x.numel, elem, (x,), kind=x.kind)

    def unary(self, x: Tensor, *, save_in: bool = False, save_out: bool = False, elem: int | None = None) -> Tensor:
        """A pointwise op on one tensor (silu/gelu save their input; tanh/rsqrt/sigmoid/softmax their result)."""
        out = self.op(x.numel, elem or x.elem, (x,), save=(x,) if save_in and x.rg else ())
        if save_out and x.rg:
            self.save_output(out)
        return out

    def mul(self, a: Tensor, b: Tensor, elem: int | None = None) -> Tensor:
        """``a * b`` (broadcasting): saves ``b`` if ``a`` needs a gradient and ``a`` if ``b`` does."""
        save = ((b,) if a.rg else ()) + ((a,) if b.rg else ())
        big = a if a.numel >= b.numel else b
        e = elem or max(a.elem, b.elem)
        # MulBackward0 (derivatives.yaml, mul_tensor_backward): each input's gradient is computed as grad * other at
        # the output's shape and dtype; the engine's validate_outputs (torch/csrc/autograd/engine.cpp) then sums a
        # broadcast input's down to its shape and casts a narrower input's to its dtype while both products are
        # still referenced. Zero when neither input broadcasts nor is promoted.
        full = big.numel * e
        differ = [t for t in (a, b) if t.rg and self.training and t.numel * t.elem != full]
        out = self.op(big.numel, e, (a, b), save=save, bwd_scratch=sum(full - t.numel * t.elem for t in differ))
        self.ops[-1].cast_scratch = sum(t.numel * t.elem for t in differ)
        return out

    def save_output(self, t: Tensor) -> None:
        """The last op keeps its own output for backward (softmax, tanh, rsqrt, relu, log_softmax)."""
        if self.training:
            self.ops[-1].saved += (t,)
            t.saved_by.append(len(self.ops) - 1)

    def view(self, base: Tensor, numel: int | None = None) -> Tensor:
        """A view (slice, reshape, transpose) of ``base``: no allocation."""
        r = root(base)
        t = Tensor(base.numel if numel is None else numel, base.elem, base.kind, base.rg, base=r)
        self.tensors.append(t)
        self._producer_region[id(t)] = self._producer_region.get(id(r), -2)
        return t

    def split(self, base: Tensor, parts: int) -> tuple[Tensor, ...]:
        """``base.chunk(parts, -1)`` / ``split``: views in the forward. Their gradients are separate buffers that
        ``SplitBackward0`` (derivatives.yaml ``split_backward``) concatenates once into the base's gradient when all
        have arrived, unlike slicing, where each slice's backward pads its gradient to the base's size."""
        views = tuple(self.view(base, base.numel // parts) for _ in range(parts))
        if not self.training or not base.rg:
            return views
        idx = len(self.ops)
        self._use((base,), idx)
        self.ops.append(_Op(views, (base,), (base,), (), (), 0, 0, False, self._current))
        for v in views:
            self.own_grad.add(id(v))
        return views

    def scratch(self, nbytes: int, inputs: tuple[Tensor, ...] = ()) -> None:
        """A temporary that lives only inside one kernel (a workspace, a fused op's internal buffer)."""
        idx = len(self.ops)
        for t in inputs:
            t.last_use = idx
        self._note_region_inputs(inputs)
        self.ops.append(_Op((), inputs, (), (), (), nbytes, 0, False, self._current))

    def keep(self, *tensors: Tensor) -> None:
        """The caller holds ``tensors`` after the program returns (its output, the loss, caches)."""
        for t in tensors:
            root(t).keep = True

    def keep_for_forward(self, *tensors: Tensor) -> None:
        """Like :meth:`keep`, but the caller frees ``tensors`` when the model's forward returns."""
        self.keep(*tensors)
        self.forward_scoped.extend(root(t) for t in tensors)

    def hold(self, *tensors: Tensor) -> None:
        """A Python reference keeps ``tensors`` alive up to the op recorded last (a local variable that
        outlives its last use, a tuple of skip connections)."""
        last = len(self.ops) - 1
        for t in tensors:
            r = root(t)
            r.last_use = max(r.last_use, last)

    def params_without_grad(self, outs: tuple[Tensor, ...] | list[Tensor]) -> set[str]:
        """The trainable parameters the program's ops use whose gradient a backward from ``outs`` never makes: the
        backward reaches an op only through the gradients of its outputs (walking back from ``outs`` through each
        op's gradient inputs; a view's gradient goes to its base), so the parameters of ops off that path get
        none (torch's engine runs only the nodes the roots reach: torch/csrc/autograd/engine.cpp
        compute_dependencies)."""
        producer: dict[int, _Op] = {}
        for op in self.ops:
            for o in op.outputs:
                producer[id(o)] = op
        reached: set[int] = set()
        seen: set[int] = set()
        stack = list(outs)
        while stack:
            t = stack.pop()
            made = producer.get(id(t)) or (producer.get(id(t.base)) if t.base is not None else None)
            if made is None or id(made) in seen:
                continue
            seen.add(id(made))
            reached.update(pid for pid, _ in made.params)
            stack.extend(made.grad_inputs)
        return {name for name, pid in self._param_ids.items() if pid not in reached}

    def param_id(self, name: str) -> int:
        """A stable id for the trainable parameter ``name`` (its gradient is allocated once, then accumulated)."""
        return self._param_ids.setdefault(name, len(self._param_ids))

    @contextmanager
    def checkpoint(self, enabled: bool = True) -> Iterator[None]:
        """Ops recorded inside run under ``torch.utils.checkpoint`` (non-reentrant) when ``enabled``."""
        if not enabled or not self.training or self._current >= 0:
            yield
            return
        self._current = len(self.region_inputs)
        self.region_inputs[self._current] = []
        try:
            yield
        finally:
            self._current = -1

    def effective_saves(self) -> list[tuple[Tensor, ...]]:
        """What each op keeps for backward in the forward pass: nothing inside a checkpoint region, except
        that the region's first op stands for the checkpoint, which holds the region's inputs."""
        out: list[tuple[Tensor, ...]] = []
        seen: set[int] = set()
        for op in self.ops:
            r = op.region
            if r < 0:
                out.append(op.saved)
            elif r not in seen:
                seen.add(r)
                out.append(tuple(self.region_inputs[r]))
            else:
                out.append(())
        return out

    def _use(self, inputs: tuple[Tensor, ...], idx: int) -> None:
        for t in inputs:
            t.last_use = idx
            if t.base is not None:
                t.base.last_use = idx
        self._note_region_inputs(inputs)

    def _note_region_inputs(self, inputs: tuple[Tensor, ...]) -> None:
        if self._current < 0:
            return
        held = self.region_inputs[self._current]
        for t in inputs:
            r = root(t)
            if self._producer_region.get(id(r), -2) != self._current and all(h is not r for h in held):
                held.append(r)
