"""A whole network's forward program on a :class:`~vramplan._tape.Tape`, and its replay with checkpointing.

The language-model estimator records one decoder layer and combines identical layers in closed form.
Vision and diffusion networks are not stacks of identical layers (a UNet changes resolution and width
at every level and keeps skip connections across the whole network), so here the *whole* network is
recorded as one program on the same :class:`~vramplan._tape.Tape`, with the same rules for what each
op allocates and what autograd saves for backward (PyTorch ``derivatives.yaml``), and replayed once.

Two things the language-model replay does not need are added:

* **Checkpoint regions** (``torch.utils.checkpoint``, non-reentrant, as diffusers and transformers call
  it): ops inside a region save nothing in the forward pass; the region's inputs are held by the
  checkpoint until the region's backward is done. In backward, the first op of the region that is
  reached recomputes the region's forward (with saving, stopping after the last op that saves: the
  early-stop of ``torch.utils.checkpoint``), then the backward frees the recomputed tensors as usual.
* **Gradient buffers shared between inputs** (``torch/csrc/autograd/input_buffer.cpp``): ops whose
  backward passes the output gradient through unchanged (``add``, reshapes, ``cat``'s narrow views) do
  not allocate; a gradient that arrives at a tensor that already has one is added in place when the
  existing buffer is not shared, out of place otherwise.

The replay reports the peak of each pass with a per-kind breakdown (:class:`Moment`), on top of a base
(weights, optimizer states) that the caller supplies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .._tape import ZERO, Moment, Tape, Tensor
from ..kinds import MemoryKind

__all__ = ["ZERO", "Moment", "Net", "Numerics", "create_graph_bytes", "replay_backward", "replay_forward"]

_KINDS = tuple(MemoryKind)
_IDX = {k: i for i, k in enumerate(_KINDS)}
ACT = MemoryKind.ACTIVATIONS
_ACT = _IDX[ACT]
_GRAD = _IDX[MemoryKind.GRADIENTS]


@dataclass(frozen=True, slots=True)
class Numerics:
    """Dtypes (bytes per element) of one network's run.

    ``act``: outputs of convolutions and matmuls (2 under bf16/fp16 or autocast, 4 in fp32);
    ``param``: parameters as stored; ``amp``: the forward runs under ``torch.autocast`` (16-bit
    matmuls and convolutions, fp32 normalization, weight copies cached for trainable leaves).
    """

    training: bool
    act: int
    param: int
    amp: bool




class Net:
    """Records a network's forward program: a :class:`Tape` plus per-op facts the replay needs.

    ``passthrough[i]``: op ``i``'s backward hands its output gradient to its inputs without a new
    allocation (same-shaped ``add``, ``cat``, a cast to the same dtype). ``region[i]``: the
    checkpoint region op ``i`` belongs to, or -1.
    """

    def __init__(self, num: Numerics) -> None:
        self.num = num
        self.tp = Tape(num.training)
        self.inputs: list[tuple[Tensor, ...]] = []
        self.passthrough: list[bool] = []
        self.region: list[int] = []
        self.region_inputs: dict[int, list[Tensor]] = {}
        self._producer_region: dict[int, int] = {}
        self._current = -1
        self._regions = 0
        self._param_ids: dict[str, int] = {}
        self.own_grad: set[int] = set()  # results of in-place ops: share a storage, not a gradient

    # ---- recording ---------------------------------------------------------------------------------
    def input(self, numel: int, elem: int, rg: bool = False, kind: MemoryKind = ACT) -> Tensor:
        """A tensor the script creates before the network runs and holds throughout (inputs, targets)."""
        t = self.tp.input(numel, elem, rg, kind)
        t.keep = True
        self._producer_region[id(t)] = -2
        return t

    def op(self, numel: int, elem: int, inputs: tuple[Tensor, ...] = (), *, save: tuple[Tensor, ...] = (),
           params: tuple[tuple[int, int], ...] = (), rg: bool | None = None, kind: MemoryKind = ACT,
           fwd_scratch: int = 0, bwd_scratch: int = 0, grad_to: tuple[Tensor, ...] | None = None,
           passthrough: bool = False) -> Tensor:
        """Record one op (see :meth:`Tape.op`); ``passthrough`` as in the class docstring."""
        out = self.tp.op(numel, elem, inputs, save=save, params=params, rg=rg, kind=kind,
                         fwd_scratch=fwd_scratch, bwd_scratch=bwd_scratch, grad_to=grad_to)
        self._record(inputs, passthrough)
        self._producer_region[id(out)] = self._current
        return out

    def scratch(self, nbytes: int, inputs: tuple[Tensor, ...] = ()) -> None:
        """A temporary that lives only inside one kernel (workspace, a fused op's internal buffer)."""
        self.tp.scratch(nbytes, inputs)
        self._record(inputs, False)

    def view(self, base: Tensor, numel: int | None = None) -> Tensor:
        """A view of ``base`` (reshape, transpose, slice): no allocation."""
        t = self.tp.view(base, base.numel if numel is None else numel)
        root = base.base if base.base is not None else base
        self._producer_region[id(t)] = self._producer_region.get(id(root), -2)
        return t

    def hold(self, *tensors: Tensor) -> None:
        """A Python reference keeps ``tensors`` alive up to the op recorded last (a local variable that
        outlives its last use, a tuple of skip connections)."""
        last = len(self.tp.ops) - 1
        for t in tensors:
            root = t.base if t.base is not None else t
            root.last_use = max(root.last_use, last)

    def keep(self, *tensors: Tensor) -> None:
        """The script holds ``tensors`` after the network returns (its output, the loss)."""
        self.tp.keep(*tensors)

    def param(self, name: str, numel: int, trainable: bool) -> tuple[tuple[int, int], ...]:
        """The gradient a trainable parameter receives (``AccumulateGrad``), in the parameter dtype."""
        if not trainable or not self.num.training:
            return ()
        pid = self._param_ids.setdefault(name, len(self._param_ids))
        return ((pid, numel * self.num.param),)

    @contextmanager
    def checkpoint(self, enabled: bool = True) -> Iterator[None]:
        """Ops recorded inside run under ``torch.utils.checkpoint`` (non-reentrant) when ``enabled``."""
        if not enabled or not self.num.training or self._current >= 0:
            yield
            return
        self._current = self._regions
        self.region_inputs[self._current] = []
        self._regions += 1
        try:
            yield
        finally:
            self._current = -1

    def _record(self, inputs: tuple[Tensor, ...], passthrough: bool) -> None:
        self.inputs.append(inputs)
        self.passthrough.append(passthrough)
        self.region.append(self._current)
        if self._current >= 0:
            held = self.region_inputs[self._current]
            for t in inputs:
                root = t.base if t.base is not None else t
                if self._producer_region.get(id(root), -2) != self._current and all(h is not root for h in held):
                    held.append(root)

    # ---- helpers for the replay ----------------------------------------------------------------------
    def effective_saves(self) -> list[tuple[Tensor, ...]]:
        """What each op keeps for backward in the forward pass: nothing inside a checkpoint region, except
        that the region's first op stands for the checkpoint, which holds the region's inputs."""
        out: list[tuple[Tensor, ...]] = []
        first_of: dict[int, int] = {}
        for i, r in enumerate(self.region):
            if r >= 0 and r not in first_of:
                first_of[r] = i
        for i, op in enumerate(self.tp.ops):
            r = self.region[i]
            if r < 0:
                out.append(op.saved)
            elif first_of[r] == i and self.num.training:
                out.append(tuple(self.region_inputs[r]))
            else:
                out.append(())
        return out


def _root(t: Tensor) -> Tensor:
    return t.base if t.base is not None else t


class _State:
    """Live bytes by kind, and the highest moment seen."""

    def __init__(self, base: Moment) -> None:
        self.cur = list(base.kinds)
        self.total = base.total
        self.peak = base
        self.at = -1  # op index of the peak
        self.i = -1

    def add(self, kind: int, n: int) -> None:
        self.cur[kind] += n
        self.total += n

    def check(self, transient: int = 0, transient_kind: int = _ACT) -> None:
        if self.total + transient > self.peak.total:
            v = list(self.cur)
            v[transient_kind] += transient
            self.peak = Moment(self.total + transient, tuple(v))
            self.at = self.i

    def moment(self) -> Moment:
        return Moment(self.total, tuple(self.cur))


@dataclass(slots=True)
class ForwardResult:
    peak: Moment
    peak_op: int  # index of the op at which the peak happens
    end: Moment  # base + everything alive after the forward (saved for backward, kept by the script)
    alive: set[int]  # ids of tensors alive at the end
    holders: dict[int, int]  # id -> number of ops still holding the tensor for backward


def replay_forward(net: Net, base: Moment, ev: list[tuple[object, int]] | None = None) -> ForwardResult:
    """Replay the forward pass on top of ``base``; tensors die at their last use unless saved or kept.

    ``ev``: when given, the allocations and frees of the pass are appended in order (the stream of
    :mod:`vramplan.allocator`; keys are the tensors, ``("s", i)`` for kernel temporaries). The script's
    inputs are not in it: they are allocated before the network runs."""
    tp = net.tp
    saves = net.effective_saves()
    holders: dict[int, int] = {}
    for sv in saves:
        for t in sv:
            holders[id(t)] = holders.get(id(t), 0) + 1
    by_last: dict[int, list[Tensor]] = {}
    for t in tp.tensors:
        if t.base is None:
            by_last.setdefault(t.last_use, []).append(t)
    st = _State(base)
    alive: set[int] = set()
    for t in tp.tensors:
        if t.external and t.base is None:  # the script's inputs: allocated before the network runs
            alive.add(id(t))
            st.add(t.kind, t.nbytes)
    st.check()
    for i, op in enumerate(tp.ops):
        st.i = i
        for t in op.outputs:
            st.add(t.kind, t.nbytes)
            alive.add(id(t))
            if ev is not None and t.nbytes:
                ev.append((t, t.nbytes))
        st.check(op.fwd_scratch)
        if ev is not None and op.fwd_scratch:
            ev.append((("s", i), op.fwd_scratch))
            ev.append((("s", i), -1))
        for t in by_last.get(i, ()):
            if t.keep or holders.get(id(t), 0) or id(t) not in alive:
                continue
            if t.external:
                continue
            st.add(t.kind, -t.nbytes)
            alive.discard(id(t))
            if ev is not None and t.nbytes:
                ev.append((t, -1))
        for t in op.outputs:
            if t.last_use < 0 and not t.keep and not holders.get(id(t), 0):
                st.add(t.kind, -t.nbytes)
                alive.discard(id(t))
                if ev is not None and t.nbytes:
                    ev.append((t, -1))
    return ForwardResult(st.peak, st.at, st.moment(), alive, holders)


class _Buf:
    __slots__ = ("kind", "nbytes", "refs")

    def __init__(self, nbytes: int, kind: int) -> None:
        self.nbytes = nbytes
        self.kind = kind
        self.refs = 0


def replay_backward(net: Net, fwd: ForwardResult, seeds: Sequence[Tensor],
                    param_grads_exist: bool = False,
                    ev: list[tuple[object, int]] | None = None) -> tuple[Moment, Moment]:
    """Replay ``loss.backward()`` after :func:`replay_forward`; returns (peak, end).

    ``seeds`` are the tensors whose gradient the caller provides (the loss: a scalar). Parameter
    gradients are allocated at their first contribution and kept (``AccumulateGrad``); with
    ``param_grads_exist`` they accumulate into existing ``.grad`` tensors (gradient accumulation).
    """
    tp = net.tp
    ops = tp.ops
    st = _State(fwd.end)
    alive = set(fwd.alive)
    holders = dict(fwd.holders)
    grads: dict[int, _Buf] = {}

    def free_tensor(t: Tensor) -> None:
        if id(t) in alive and not t.keep and not t.external:
            alive.discard(id(t))
            st.add(t.kind, -t.nbytes)
            if ev is not None and t.nbytes:
                ev.append((t, -1))

    def release(t: Tensor) -> None:
        n = holders.get(id(t), 0) - 1
        holders[id(t)] = n
        if n <= 0:
            free_tensor(t)

    def give(t: Tensor, buf: _Buf) -> None:
        buf.refs += 1
        grads[id(t)] = buf

    def drop(tid: int) -> None:
        buf = grads.pop(tid, None)
        if buf is not None:
            buf.refs -= 1
            if buf.refs == 0:
                st.add(buf.kind, -buf.nbytes)
                if ev is not None and buf.nbytes:
                    ev.append((buf, -1))

    def new_buf(t: Tensor) -> _Buf:
        buf = _Buf(t.numel * t.elem, _ACT)
        st.add(buf.kind, buf.nbytes)
        if ev is not None and buf.nbytes:
            ev.append((buf, buf.nbytes))
        return buf

    for s in seeds:
        give(s, new_buf(s))
    st.check()

    regions_done: set[int] = set()
    region_ops: dict[int, list[int]] = {}
    for i, r in enumerate(net.region):
        if r >= 0:
            region_ops.setdefault(r, []).append(i)
    recomputed_holders: dict[int, int] = {}
    seen_params: set[int] = set()
    if param_grads_exist:
        seen_params = {p for op in ops for p, _ in op.params}
    saves = net.effective_saves()

    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        reached = any(id(t) in grads for t in op.outputs)
        r = net.region[i]
        if reached and r >= 0 and r not in regions_done:
            regions_done.add(r)
            _recompute(net, region_ops[r], st, alive, recomputed_holders, ev)
        if reached:
            transient = op.bwd_scratch
            temps: list[int] = []
            out_buf = grads.get(id(op.outputs[0])) if op.outputs else None
            for t in op.grad_inputs:
                own = id(t) in net.own_grad
                partial = not own and t.base is not None and t.numel < t.base.numel
                target = t if own else _root(t)
                existing = grads.get(id(target))
                if net.passthrough[i] and not partial and out_buf is not None and \
                        target.numel * target.elem == out_buf.nbytes:
                    if existing is None:
                        give(target, out_buf)
                    elif existing.refs == 1 and existing is not out_buf:
                        pass  # added in place into the existing buffer
                    else:
                        drop(id(target))
                        give(target, new_buf(target))
                    continue
                if existing is None:
                    give(target, new_buf(target))
                elif existing.refs == 1:
                    transient += t.numel * t.elem  # computed, then added in place
                    temps.append(t.numel * t.elem)
                else:
                    transient += t.numel * t.elem
                    temps.append(t.numel * t.elem)
                    drop(id(target))
                    give(target, new_buf(target))
            ptrans = 0
            for pid, nb in op.params:
                if pid in seen_params:
                    ptrans += nb
                    temps.append(nb)
                else:
                    seen_params.add(pid)
                    st.add(_GRAD, nb)
                    if ev is not None and nb:
                        ev.append((("p", pid), nb))
            st.check(transient + ptrans, _ACT if transient >= ptrans else _GRAD)
            if ev is not None:
                if op.bwd_scratch:
                    temps.append(op.bwd_scratch)
                for j, n in enumerate(temps):
                    if n:
                        ev.append((("s", i, j), n))
                for j, n in enumerate(temps):
                    if n:
                        ev.append((("s", i, j), -1))
            for t in op.outputs:
                drop(id(t))
        for t in saves[i]:
            release(t)
        if r in regions_done:
            for t in op.saved:
                if id(t) in recomputed_holders:
                    recomputed_holders[id(t)] -= 1
                    if recomputed_holders[id(t)] == 0:
                        del recomputed_holders[id(t)]
                        free_tensor(t)
    return st.peak, st.moment()


def create_graph_bytes(net: Net, fwd: ForwardResult, seeds: Sequence[Tensor]) -> int:
    """Bytes a ``torch.autograd.grad(..., create_graph=True)`` pass over ``net`` leaves alive for the
    second-order backward: every input gradient and every intermediate product it computes is an op of the
    new graph and is kept by it (parameter gradients are not computed: ``only_inputs``)."""
    grads: set[int] = {id(s) for s in seeds}
    total = 0
    for i in range(len(net.tp.ops) - 1, -1, -1):
        op = net.tp.ops[i]
        if not any(id(t) in grads for t in op.outputs):
            continue
        total += op.bwd_scratch
        for t in op.grad_inputs:
            own = id(t) in net.own_grad
            target = t if own else _root(t)
            if id(target) not in grads or net.passthrough[i]:
                if not net.passthrough[i]:
                    total += t.numel * t.elem
                grads.add(id(target))
    _ = fwd
    return total


def _recompute(net: Net, idxs: list[int], st: _State, alive: set[int], held: dict[int, int],
               ev: list[tuple[object, int]] | None = None) -> None:
    """Recompute a checkpoint region's forward (saving), on top of the current state."""
    ops = net.tp.ops
    region = net.region[idxs[0]]
    inside: set[int] = set()
    for i in idxs:
        for t in ops[i].outputs:
            inside.add(id(t))
    last_saver = max((i for i in idxs if ops[i].saved), default=-1)
    if last_saver < 0:
        return
    run = [i for i in idxs if i <= last_saver]
    saved_count: dict[int, int] = {}
    for i in run:
        for t in ops[i].saved:
            if id(t) in inside:
                saved_count[id(t)] = saved_count.get(id(t), 0) + 1
    last_in: dict[int, int] = {}
    for i in run:
        for t in net.inputs[i]:
            root = _root(t)
            if id(root) in inside:
                last_in[id(root)] = i
    tensors: dict[int, Tensor] = {}
    for i in run:
        for t in ops[i].outputs:
            tensors[id(t)] = t
    by_last: dict[int, list[Tensor]] = {}
    for tid, i in last_in.items():
        by_last.setdefault(i, []).append(tensors[tid])
    for i in run:
        op = ops[i]
        for t in op.outputs:
            st.add(t.kind, t.nbytes)
            if ev is not None and t.nbytes:
                ev.append((t, t.nbytes))
        st.check(op.fwd_scratch)
        if ev is not None and op.fwd_scratch:
            ev.append((("s", i), op.fwd_scratch))
            ev.append((("s", i), -1))
        for t in by_last.get(i, ()):
            if id(t) not in saved_count:
                st.add(t.kind, -t.nbytes)
                if ev is not None and t.nbytes:
                    ev.append((t, -1))
        for t in op.outputs:
            if id(t) not in last_in and id(t) not in saved_count:
                st.add(t.kind, -t.nbytes)
                if ev is not None and t.nbytes:
                    ev.append((t, -1))
    for tid, n in saved_count.items():
        held[tid] = n
        alive.add(tid)
    _ = region
