"""A tiny model of PyTorch autograd's memory behaviour over one block of a network.

A block's forward pass is recorded as a list of ops over abstract tensors that carry only a
size, a memory kind and whether they require grad. Each op states which tensors autograd saves
for backward, following the rules in PyTorch's ``tools/autograd/derivatives.yaml`` (e.g.
``mm`` saves ``self`` only when ``mat2`` requires grad; ``softmax`` saves its result). Replaying
the list gives what the CUDA caching allocator sees:

* forward: outputs are allocated, Python references die after their last use, saved tensors stay;
* backward (reverse order): input gradients are allocated, output gradients and the op's saved
  tensors are freed, parameter gradients are allocated once and kept (``AccumulateGrad``).

The replay returns the peak and the net change of each pass with a per-kind breakdown, so that a
stack of identical layers can be combined in closed form (see :mod:`vramplan.estimator`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import MemoryKind

__all__ = ["ZERO", "Moment", "Pass", "Tape", "Tensor"]

_KINDS = tuple(MemoryKind)
_NK = len(_KINDS)
_IDX = {k: i for i, k in enumerate(_KINDS)}
_ACT = _IDX[MemoryKind.ACTIVATIONS]
_GRAD = _IDX[MemoryKind.GRADIENTS]


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
        self.external = external  # allocated before the block (its input) — not the block's to free
        self.keep = False  # referenced after the block (its output, caches)
        self.last_use = -1
        self.saved_by: list[int] = []


@dataclass(frozen=True, slots=True)
class Pass:
    """Result of replaying one pass over a block: relative to the memory at its start."""

    peak: int  # highest (current - start) seen
    peak_kinds: tuple[int, ...]  # per-kind delta at that moment
    end: int  # (memory at end - start)
    end_kinds: tuple[int, ...]


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
        return {k: self.kinds[i] for i, k in enumerate(_KINDS) if self.kinds[i]}


ZERO = Moment(0, (0,) * len(_KINDS))


class _Op:
    __slots__ = ("bwd_scratch", "fwd_scratch", "grad_inputs", "outputs", "params", "saved")

    def __init__(self, outputs: tuple[Tensor, ...], grad_inputs: tuple[Tensor, ...], saved: tuple[Tensor, ...],
                 params: tuple[tuple[int, int], ...], fwd_scratch: int, bwd_scratch: int) -> None:
        self.outputs = outputs
        self.grad_inputs = grad_inputs  # inputs that receive a gradient from this op
        self.saved = saved
        self.params = params  # (param id, grad bytes) of trainable parameters used
        self.fwd_scratch = fwd_scratch
        self.bwd_scratch = bwd_scratch


class Tape:
    """Records ops; :meth:`forward` and :meth:`backward` replay them."""

    def __init__(self, training: bool) -> None:
        self.training = training
        self.ops: list[_Op] = []
        self.tensors: list[Tensor] = []
        self._param_seen: set[int] = set()

    # ---- recording ------------------------------------------------------------------------
    def input(self, numel: int, elem: int, rg: bool, kind: MemoryKind = MemoryKind.ACTIVATIONS) -> Tensor:
        t = Tensor(numel, elem, _IDX[kind], rg and self.training, external=True)
        self.tensors.append(t)
        return t

    def op(self, numel: int, elem: int, inputs: tuple[Tensor, ...] = (), *, save: tuple[Tensor, ...] = (),
           params: tuple[tuple[int, int], ...] = (), rg: bool | None = None,
           kind: MemoryKind | int = MemoryKind.ACTIVATIONS, fwd_scratch: int = 0, bwd_scratch: int = 0,
           grad_to: tuple[Tensor, ...] | None = None) -> Tensor:
        """Record an op producing one new tensor of ``numel`` elements of ``elem`` bytes.

        ``save`` lists what autograd keeps for backward; ``params`` the trainable parameters whose
        gradient this op produces; ``rg`` whether the output requires grad (default: any input does,
        or a trainable parameter is used).
        """
        idx = len(self.ops)
        if rg is None:
            rg = any(t.rg for t in inputs) or bool(params)
        rg = rg and self.training
        outs = (Tensor(numel, elem, kind if isinstance(kind, int) else _IDX[kind], rg),)
        self.tensors.extend(outs)
        for t in inputs:
            t.last_use = idx
            if t.base is not None:
                t.base.last_use = idx
        if not self.training:
            save, params = (), ()
        save = tuple(t.base if t.base is not None else t for t in save)
        for t in save:
            t.saved_by.append(idx)
        gin = tuple(t for t in (inputs if grad_to is None else grad_to) if t.rg)
        self.ops.append(_Op(outs, gin, save, params if self.training else (), fwd_scratch,
                            bwd_scratch if self.training else 0))
        return outs[0]

    def save_output(self, t: Tensor) -> None:
        """The last op keeps its own output for backward (softmax, tanh, rsqrt, relu, log_softmax)."""
        if self.training:
            self.ops[-1].saved += (t,)
            t.saved_by.append(len(self.ops) - 1)

    def view(self, base: Tensor, numel: int) -> Tensor:
        """A view (slice, reshape, transpose) of ``base``: no allocation."""
        root = base.base if base.base is not None else base
        t = Tensor(numel, base.elem, base.kind, base.rg, base=root)
        self.tensors.append(t)
        return t

    def scratch(self, nbytes: int, inputs: tuple[Tensor, ...] = ()) -> None:
        """A temporary that lives only inside one kernel (e.g. a workspace)."""
        idx = len(self.ops)
        for t in inputs:
            t.last_use = idx
        self.ops.append(_Op((), (), (), (), nbytes, 0))

    def keep(self, *tensors: Tensor) -> None:
        for t in tensors:
            (t.base if t.base is not None else t).keep = True

    # ---- replay -----------------------------------------------------------------------------
    def forward(self, save: bool = True, ev: list[tuple[object, int]] | None = None) -> Pass:
        """Replay the forward pass. ``save=False`` models a checkpointed block (nothing kept).

        ``ev``: when given, every allocation and free is appended in program order as ``(key, nbytes)``
        and ``(key, -1)`` (the event stream of :mod:`vramplan.allocator`); keys are the tensors themselves
        and ``("s", i)`` for kernel temporaries.
        """
        cur = [0] * _NK
        total = 0
        peak = 0
        peak_k = tuple(cur)
        last_use: dict[int, list[Tensor]] = {}
        for t in self.tensors:
            last_use.setdefault(t.last_use, []).append(t)
        for i, op in enumerate(self.ops):
            for t in op.outputs:
                cur[t.kind] += t.nbytes
                total += t.nbytes
                if ev is not None and t.nbytes:
                    ev.append((t, t.nbytes))
            if total + op.fwd_scratch > peak:
                peak = total + op.fwd_scratch
                peak_k = tuple(cur)
                if op.fwd_scratch:
                    peak_k = _add(peak_k, _ACT, op.fwd_scratch)
            if ev is not None and op.fwd_scratch:
                ev.append((("s", 0), op.fwd_scratch))
                ev.append((("s", 0), -1))
            for t in last_use.get(i, ()):
                if t.external or t.keep:
                    if t.external and not t.keep and not (save and t.saved_by):
                        # the block's input dies here unless something saved it
                        cur[t.kind] -= t.nbytes
                        total -= t.nbytes
                        if ev is not None and t.nbytes:
                            ev.append((t, -1))
                    continue
                if save and t.saved_by:
                    continue
                cur[t.kind] -= t.nbytes
                total -= t.nbytes
                if ev is not None and t.nbytes:
                    ev.append((t, -1))
            # outputs never used and not kept die at once
            for t in op.outputs:
                if t.last_use < 0 and not t.keep and not (save and t.saved_by):
                    cur[t.kind] -= t.nbytes
                    total -= t.nbytes
                    if ev is not None and t.nbytes:
                        ev.append((t, -1))
        return Pass(peak, peak_k, total, tuple(cur))

    def backward(self, param_grads_exist: bool = False, ev: list[tuple[object, int]] | None = None) -> Pass:
        """Replay backward after :meth:`forward` (with saving). Start: outputs' grads exist.

        Memory at start includes everything the forward kept; the returned deltas are relative to it.
        The block's kept outputs (the next block's input) are assumed freed by their consumer.
        ``ev`` as in :meth:`forward`; gradient keys are ``("g", tensor)``, parameter gradients
        ``("p", param id)``, transients ``("s", i)``.
        """
        cur = [0] * _NK
        total = 0
        peak = 0
        peak_k = tuple(cur)
        grads: dict[int, Tensor] = {}  # id(tensor) -> tensor whose gradient is alive
        remaining_saves: dict[int, int] = {}
        for op in self.ops:
            for t in op.saved:
                remaining_saves[id(t)] = remaining_saves.get(id(t), 0) + 1
        # gradients of the block's kept outputs arrive from the consumer: part of the starting memory
        for t in self.tensors:
            if t.keep and t.rg and not t.external:
                grads[id(t)] = t
        seen_params: set[int] = set() if not param_grads_exist else {p for op in self.ops for p, _ in op.params}
        for op in reversed(self.ops):
            if not any(id(t) in grads for t in op.outputs):
                for t in op.saved:  # never reached by backward: freed with the graph
                    remaining_saves[id(t)] -= 1
                    if remaining_saves[id(t)] == 0 and not t.keep:
                        cur[t.kind] -= t.nbytes
                        total -= t.nbytes
                        if ev is not None and t.nbytes:
                            ev.append((t, -1))
                continue
            new = 0
            transient = 0
            tkeys: list[object] = []
            for t in op.grad_inputs:
                if t.base is not None:
                    # a view's gradient is materialized at its base's size (e.g. slice_backward)
                    # and accumulated there: the base's producer receives it
                    t = t.base
                if id(t) in grads:
                    transient += t.nbytes  # computed, then added into the existing buffer
                    if ev is not None and t.nbytes:
                        tkeys.append(("s", len(ev)))
                        ev.append((tkeys[-1], t.nbytes))
                else:
                    grads[id(t)] = t
                    cur[t.kind] += t.nbytes
                    new += t.nbytes
                    if ev is not None and t.nbytes:
                        ev.append((("g", t), t.nbytes))
            pnew = 0
            ptrans = 0
            for pid, nb in op.params:
                if pid in seen_params:
                    ptrans += nb
                    if ev is not None and nb:
                        tkeys.append(("s", len(ev)))
                        ev.append((tkeys[-1], nb))
                else:
                    seen_params.add(pid)
                    pnew += nb
                    if ev is not None and nb:
                        ev.append((("p", pid), nb))
            cur[_GRAD] += pnew
            total += new + pnew
            moment = total + transient + ptrans + op.bwd_scratch
            if moment > peak:
                peak = moment
                peak_k = _add(_add(tuple(cur), _ACT, transient + op.bwd_scratch), _GRAD, ptrans)
            if ev is not None:
                if op.bwd_scratch:
                    ev.append((("s", -1), op.bwd_scratch))
                    ev.append((("s", -1), -1))
                for k in tkeys:  # transients die once added into their buffers
                    ev.append((k, -1))
            # free output grads and saved tensors
            for t in op.outputs:
                g = grads.pop(id(t), None)
                if g is not None:
                    cur[g.kind] -= g.nbytes
                    total -= g.nbytes
                    if ev is not None and g.nbytes:
                        ev.append((("g", g), -1))
            for t in op.saved:
                remaining_saves[id(t)] -= 1
                if remaining_saves[id(t)] == 0 and not t.keep:
                    cur[t.kind] -= t.nbytes
                    total -= t.nbytes
                    if ev is not None and t.nbytes:
                        ev.append((t, -1))
        return Pass(peak, peak_k, total, tuple(cur))


def _add(v: tuple[int, ...], i: int, n: int) -> tuple[int, ...]:
    if not n:
        return v
    lst = list(v)
    lst[i] += n
    return tuple(lst)


def kinds_dict(v: tuple[int, ...]) -> dict[MemoryKind, int]:
    return {k: v[i] for i, k in enumerate(_KINDS) if v[i]}
