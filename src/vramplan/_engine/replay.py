"""The one replay of a recorded program (:mod:`.tape`) as the CUDA caching allocator sees it.

* **forward**: outputs are allocated, Python references die after their last use, what autograd saves
  stays until backward;
* **backward** (reverse order): input gradients are allocated, output gradients and the op's saved
  tensors are freed, parameter gradients are allocated once and kept (``AccumulateGrad``).

On top of that, what networks that are not stacks of identical layers need:

* **checkpoint regions** (``torch.utils.checkpoint``, non-reentrant, as transformers and diffusers call
  it): ops inside a region save nothing in the forward; the region's inputs are held by the checkpoint
  until the region's backward is done. In backward, the first op of the region that is reached
  recomputes the region's forward (with saving, stopping after the last op that saves: the early stop of
  ``torch.utils.checkpoint``), then the backward frees the recomputed tensors as usual;
* **gradient buffers shared between inputs** (``torch/csrc/autograd/input_buffer.cpp``): a pass-through
  op (``add``, reshapes, ``cat``'s narrow views) hands its output gradient on without allocating; a
  gradient that arrives at a tensor that already has one is added in place when the existing buffer is
  not shared, out of place otherwise;
* **create_graph** (:func:`create_graph_bytes`): what a double-backward pass leaves alive.

A pass can be replayed on top of a base (weights, optimizer states: image models replay whole networks
once) or relative to its start (language models replay one layer and stack identical layers in closed
form, :mod:`vramplan.estimator`). Each pass returns its peak with a per-kind breakdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..kinds import MemoryKind
from .tape import ZERO, Moment, Tape, Tensor, _Op, root

__all__ = ["Event", "ForwardResult", "GradBuf", "Pass", "as_pass", "backward", "create_graph_bytes", "forward",
           "layer_backward", "layer_forward", "layer_passes", "layer_recompute"]

_IDX = {k: i for i, k in enumerate(MemoryKind)}
_ACT = _IDX[MemoryKind.ACTIVATIONS]
_GRAD = _IDX[MemoryKind.GRADIENTS]


@dataclass(frozen=True, slots=True)
class Pass:
    """One pass over a block, relative to the memory at its start."""

    peak: int  # highest (current - start) seen
    peak_kinds: tuple[int, ...]  # per-kind delta at that moment
    end: int  # (memory at end - start)
    end_kinds: tuple[int, ...]
    # backward only: the memory when the first op that unpacks a saved tensor is reached, which is when a
    # checkpointed block's recomputation runs (the ops after it have already made their input gradients)
    unpack_kinds: tuple[int, ...] = ()


Event = tuple[object, int]  # (key, bytes) for an allocation, (key, -1) for its free


class _State:
    """Live bytes by kind, the highest moment seen, and (when ``ev`` is given) every allocation and free in
    program order: the stream :mod:`vramplan.allocator` replays. Keys are the tensors themselves, gradient
    buffers (:class:`GradBuf`), ``("p", param id)`` for parameter gradients, ``("s", ...)`` for temporaries."""

    def __init__(self, base: Moment, ev: list[Event] | None = None) -> None:
        self.cur = list(base.kinds)
        self.total = base.total
        self.peak = base
        self.at = -1  # op index of the peak
        self.i = -1
        self.ev = ev
        self._temps: list[object] = []

    def add(self, kind: int, n: int) -> None:
        self.cur[kind] += n
        self.total += n

    def alloc(self, key: object, kind: int, n: int) -> None:
        self.cur[kind] += n
        self.total += n
        if self.ev is not None and n:
            self.ev.append((key, n))

    def free(self, key: object, kind: int, n: int) -> None:
        self.cur[kind] -= n
        self.total -= n
        if self.ev is not None and n:
            self.ev.append((key, -1))

    def temporary(self, key: object, n: int) -> None:
        """A kernel's workspace: allocated and freed inside the call."""
        if self.ev is not None and n:
            self.ev.append((key, n))
            self.ev.append((key, -1))

    def hold_temporary(self, n: int) -> None:
        """A gradient computed before it is added into an existing buffer: lives until the op's backward ends."""
        if self.ev is not None and n:
            key = ("s", self.i, len(self._temps))
            self._temps.append(key)
            self.ev.append((key, n))

    def release_temporaries(self) -> None:
        if self.ev is not None:
            self.ev.extend((k, -1) for k in self._temps)
        self._temps.clear()

    def check(self, act: int = 0, grad: int = 0) -> None:
        """A candidate peak with ``act`` and ``grad`` bytes of temporaries on top."""
        if self.total + act + grad > self.peak.total:
            v = list(self.cur)
            v[_ACT] += act
            v[_GRAD] += grad
            self.peak = Moment(self.total + act + grad, tuple(v))
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


def forward(tp: Tape, base: Moment = ZERO, *, save: bool = True, inputs_counted: bool = True,
            ev: list[Event] | None = None, stop: int | None = None) -> ForwardResult:
    """Replay the forward pass on top of ``base``; tensors die at their last use unless saved or kept.

    ``save=False``: nothing is saved (a checkpointed or offloaded block). ``inputs_counted``: the program's
    inputs are allocated on top of ``base`` before it runs (a whole network); otherwise they are already
    counted by the caller and only their release shows (one block of a stack). ``ev``: the pass's
    allocations and frees are appended (see :class:`_State`); the inputs are not in it.
    """
    holders: dict[int, int] = {}
    if save:
        for sv in tp.effective_saves():
            for t in sv:
                holders[id(t)] = holders.get(id(t), 0) + 1
    by_last: dict[int, list[Tensor]] = {}
    for t in tp.tensors:
        if t.base is None:
            by_last.setdefault(t.last_use, []).append(t)
    # _State's bookkeeping (alloc, free, check, temporary) written out: this loop is most of an analytic estimate
    cur = list(base.kinds)
    total = base.total
    peak, at = base, -1
    alive: set[int] = set()
    for t in tp.tensors:
        if t.external and t.base is None:
            alive.add(id(t))
            if inputs_counted:
                cur[t.kind] += t.nbytes
                total += t.nbytes
    if total > peak.total:
        peak = Moment(total, tuple(cur))
    held = holders.get
    for i, op in enumerate(tp.ops):
        if stop is not None and i > stop:
            break
        for t in op.outputs:
            n = t.nbytes
            cur[t.kind] += n
            total += n
            if ev is not None and n:
                ev.append((t, n))
            alive.add(id(t))
        scratch = op.fwd_scratch
        if total + scratch > peak.total:
            v = list(cur)
            v[_ACT] += scratch
            peak, at = Moment(total + scratch, tuple(v)), i
        if ev is not None and scratch:
            ev.append((("s", i), scratch))
            ev.append((("s", i), -1))
        for t in by_last.get(i, ()):
            if t.keep or held(id(t), 0) or id(t) not in alive:
                continue
            n = t.nbytes
            cur[t.kind] -= n
            total -= n
            if ev is not None and n:
                ev.append((t, -1))
            alive.discard(id(t))
        for t in op.outputs:  # outputs never used and not kept die at once
            if t.last_use < 0 and not t.keep and not held(id(t), 0):
                n = t.nbytes
                cur[t.kind] -= n
                total -= n
                if ev is not None and n:
                    ev.append((t, -1))
                alive.discard(id(t))
    return ForwardResult(peak, at, Moment(total, tuple(cur)), alive, holders)


class GradBuf:
    """A gradient buffer; ``owner`` is the tensor it was created for (inputs may come to share it)."""

    __slots__ = ("kind", "nbytes", "owner", "refs", "view")

    def __init__(self, owner: Tensor) -> None:
        self.owner = owner
        self.nbytes = owner.numel * owner.elem
        self.kind = owner.kind
        self.refs = 0
        self.view = False  # an autograd view of another gradient (see _Op.view_grad_in): never added into in place


def backward(tp: Tape, fwd: ForwardResult, seeds: Sequence[Tensor], *,
             param_grads_exist: bool | frozenset[int] = False,
             start: Moment | None = None, seeds_counted: bool = True,
             ev: list[Event] | None = None) -> tuple[Moment, Moment]:
    """Replay ``loss.backward()`` after :func:`forward`; returns (peak, end).

    ``seeds`` are the tensors whose gradient the caller provides (the loss; a block's outputs). Parameter
    gradients are allocated at their first contribution and kept (``AccumulateGrad``); with
    ``param_grads_exist`` they accumulate into existing ``.grad`` tensors (gradient accumulation); a set of
    parameter ids: those parameters' only (a tied embedding, whose gradient the head made).
    ``start``: the memory backward starts from (default: the forward's end); ``seeds_counted``: the seeds'
    gradients are allocated here (otherwise they are part of ``start``). A gradient counts under its tensor's
    memory kind (the loss's under logits/loss); temporaries under activations, a parameter's under gradients.
    ``ev`` as in :func:`forward`: a gradient computed into an existing buffer is a temporary that lives until
    the op's backward has run (its workspace comes and goes inside).
    """
    ops = tp.ops
    st = _State(fwd.end if start is None else start, ev)
    ev = st.ev
    alive = set(fwd.alive)
    holders = dict(fwd.holders)
    grads: dict[int, GradBuf] = {}

    def free_tensor(t: Tensor) -> None:
        if id(t) in alive and not t.keep:
            alive.discard(id(t))
            st.free(t, t.kind, t.nbytes)

    def give(t: Tensor, buf: GradBuf) -> None:
        buf.refs += 1
        grads[id(t)] = buf

    def drop(tid: int) -> None:
        buf = grads.pop(tid, None)
        if buf is not None:
            buf.refs -= 1
            if buf.refs == 0:
                st.free(buf, buf.kind, buf.nbytes)

    def new_buf(t: Tensor, counted: bool = True) -> GradBuf:
        buf = GradBuf(t)
        if counted:
            st.alloc(buf, buf.kind, buf.nbytes)
        return buf

    for s in seeds:
        give(s, new_buf(s, seeds_counted))
    st.check()

    regions_done: set[int] = set()
    region_ops: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        if op.region >= 0:
            region_ops.setdefault(op.region, []).append(i)
    recomputed_holders: dict[int, int] = {}
    seen_params: set[int] = {p for op in ops for p, _ in op.params
                             if param_grads_exist is True or (param_grads_exist and p in param_grads_exist)}
    uses: dict[int, int] = {}  # contributions to each parameter's gradient in this backward
    saves = tp.effective_saves()
    own_grad = tp.own_grad
    cur = st.cur  # (give, drop, release and _State's alloc / free written out below: the hot loop of an estimate)

    def param_grads(op: _Op) -> int:
        """Allocate (first time) or hold (accumulated) the op's parameter gradients; the bytes held."""
        ptrans = 0
        for pid, nb in op.params:
            uses[pid] = uses.get(pid, 0) + 1
            if pid in seen_params:
                # computed, then accumulated. A parameter used twice in one graph (a looped layer) meets its
                # second contribution in the autograd InputBuffer, where two weight gradients that are views
                # (Tape.view_grads: the transposes of their matmul outputs) cannot be added in place:
                # ``old + new`` is a third buffer (torch/csrc/autograd/input_buffer.cpp can_accumulate_inplace:
                # the storage's only reference); the sum is then the one added into in place
                n = 2 * nb if uses[pid] == 2 and pid in tp.view_grads else nb
                if pid in tp.meets_view_grad and pid not in tp.sum_is_grad:
                    n += nb  # (Tape.meets_view_grad) this contribution, then the sum, added into .grad
                ptrans += n
                st.hold_temporary(n)
                if pid in tp.sum_is_grad:  # the sum, which AccumulateGrad takes as the gradient
                    st.alloc(("p", pid), _GRAD, nb)
            else:
                seen_params.add(pid)
                st.alloc(("p", pid), _GRAD, nb)
        return ptrans

    for i in range(len(ops) - 1, -1, -1):
        st.i = i
        op = ops[i]
        outputs = op.outputs
        reached = False
        for t in outputs:
            if id(t) in grads:
                reached = True
                break
        r = op.region
        if reached and r >= 0 and r not in regions_done:
            regions_done.add(r)
            _recompute(tp, region_ops[r], st, alive, recomputed_holders)
        if reached:
            scratch = op.bwd_scratch
            if op.cast_scratch:
                # gradients cast or summed down from full-size results; under a checkpoint's recomputation the op's
                # saved tensors are already dropped by then (Tape.unpacked_saves)
                freed = sum(t.nbytes for t in op.saved) if tp.unpacked_saves else 0
                scratch += max(0, op.cast_scratch - freed)
            transient = scratch
            # a bias-free linear of a 3-D input is folded to mm, whose backward computes the weight's gradient
            # (mat2) before the input's (MmBackward0; with a bias, addmm: the input's first)
            ptrans = param_grads(op) if op.weight_first else 0
            out_buf = grads.get(id(outputs[0])) if outputs else None
            deferred: list[Tensor] = []
            contrib = 0
            for t in op.grad_inputs:
                own = id(t) in own_grad
                partial = not own and t.base is not None and t.numel < t.base.numel
                target = t if own else root(t)
                existing = grads.get(id(target))
                if (op.passthrough or op.add_like) and not partial and out_buf is not None and \
                        target.numel * target.elem == out_buf.nbytes:
                    if existing is None:
                        give(target, out_buf)
                    elif existing.refs == 1 and existing is not out_buf and not existing.view:
                        pass  # added in place into the existing buffer (a view's never is: see GradBuf.view)
                    else:
                        drop(id(target))
                        give(target, new_buf(target))
                    continue
                if existing is None:
                    buf = GradBuf(target)
                    buf.view = op.view_grad_in
                    n = buf.nbytes
                    cur[buf.kind] += n
                    st.total += n
                    if ev is not None and n:
                        ev.append((buf, n))
                    buf.refs = 1
                    grads[id(target)] = buf
                    continue
                # computed (a view's at its base's size: slice_backward), then added into the existing buffer once
                # the node has returned (below)
                transient += target.numel * target.elem
                contrib += target.numel * target.elem
                st.hold_temporary(target.numel * target.elem)
                deferred.append(target)
            if not op.weight_first:
                ptrans = param_grads(op)
            if st.total + transient + ptrans > st.peak.total:  # (st.check, written out)
                v = list(cur)
                v[_ACT] += transient
                v[_GRAD] += ptrans
                st.peak = Moment(st.total + transient + ptrans, tuple(v))
                st.at = i
            if ev is not None:
                st.temporary(("s", i, -1), scratch)
            for t in outputs:
                gone = grads.pop(id(t), None)
                if gone is not None:
                    gone.refs -= 1
                    if gone.refs == 0:
                        n = gone.nbytes
                        cur[gone.kind] -= n
                        st.total -= n
                        if ev is not None and n:
                            ev.append((gone, -1))
        for t in saves[i]:
            n = holders.get(id(t), 0) - 1
            holders[id(t)] = n
            if n <= 0 and id(t) in alive and not t.keep:
                alive.discard(id(t))
                n = t.nbytes
                cur[t.kind] -= n
                st.total -= n
                if ev is not None and n:
                    ev.append((t, -1))
        if r in regions_done:
            for t in op.saved:
                if id(t) in recomputed_holders:
                    recomputed_holders[id(t)] -= 1
                    if recomputed_holders[id(t)] == 0:
                        del recomputed_holders[id(t)]
                        free_tensor(t)
        if reached:
            # the node has returned: its incoming gradients and saved tensors are released (engine.cpp call_function,
            # release_variables), then its results are added into the next buffers (InputBuffer::add): in place
            # where the buffer holds its storage alone, out of place into a new buffer where it is still shared or is
            # a view, which keeps its base referenced (input_buffer.cpp accumulate, can_accumulate_inplace)
            for target in deferred:
                existing = grads.get(id(target))
                if existing is not None and (existing.refs > 1 or existing.view):
                    summed = new_buf(target)
                    st.check(contrib)
                    drop(id(target))
                    give(target, summed)
            st.release_temporaries()
    return st.peak, st.moment()


def as_pass(f: ForwardResult) -> Pass:
    """The :class:`Pass` figures of a replayed forward."""
    return Pass(f.peak.total, f.peak.kinds, f.end.total, f.end.kinds)


def layer_forward(tp: Tape, save: bool = True, ev: list[Event] | None = None) -> Pass:
    """One block of a stack, relative to its start: its input is counted by the caller."""
    return as_pass(forward(tp, save=save, inputs_counted=False, ev=ev))


def layer_passes(tp: Tape, param_grads_exist: bool | frozenset[int] = False) -> tuple[Pass, Pass]:
    """(:func:`layer_forward`, :func:`layer_backward`) of a block, its forward replayed once for both (the backward
    starts from what that same forward leaves; neither pass changes the tape). A tape recorded for inference has
    no backward: an empty pass that keeps what the forward left."""
    f = forward(tp, inputs_counted=False)
    fwd = as_pass(f)
    if not tp.training:
        return fwd, Pass(0, fwd.end_kinds, 0, fwd.end_kinds)
    return fwd, layer_backward(tp, param_grads_exist, fwd=f)


def layer_recompute(tp: Tape) -> Pass:
    """A checkpointed block's recomputation (non-reentrant ``torch.utils.checkpoint``): its forward with saving,
    stopped once the last tensor the block saves has been packed again (the checkpoint's early stop,
    ``_StopRecomputationError`` from the pack hook), relative to its start."""
    last = max((i for i, op in enumerate(tp.ops) if op.saved or op.packs_weight), default=len(tp.ops) - 1)
    if not any(t is o for t in tp.ops[last].saved for o in tp.ops[last].outputs):
        # the op saves only its inputs: autograd packs them before the kernel runs, and the checkpoint stops there
        last -= 1
    return as_pass(forward(tp, inputs_counted=False, stop=last))


def layer_backward(tp: Tape, param_grads_exist: bool | frozenset[int] = False, ev: list[Event] | None = None,
                   fwd: ForwardResult | None = None) -> Pass:
    """Backward of one block after its forward (with saving), relative to its start: the gradients of the
    block's kept outputs arrive from their consumer; its input's gradient is what it leaves. ``fwd``: that
    forward's result (``forward(tp, inputs_counted=False)``, as :func:`layer_passes` shares it), or None to
    replay it."""
    f = forward(tp, inputs_counted=False) if fwd is None else fwd
    seeds = [t for t in tp.tensors if t.keep and t.rg and not t.external and id(t) not in tp.inner_grads]
    peak, end = backward(tp, f, seeds, param_grads_exist=param_grads_exist, start=ZERO, seeds_counted=False,
                         ev=ev)
    unpack = list(ZERO.kinds)
    unpack[_ACT] = unpack_bytes(tp, seeds)
    return Pass(peak.total, peak.kinds, end.total, end.kinds, tuple(unpack))


def unpack_bytes(tp: Tape, seeds: Sequence[Tensor]) -> int:
    """Gradient bytes made, beyond the seeds' (freed ones subtracted), when backward first reaches an op that
    unpacks a saved tensor (or a saved weight): where non-reentrant ``torch.utils.checkpoint`` recomputes a block.
    Adds and pass-through ops hand their output gradient on (AddBackward0), as autograd does."""
    bufs: dict[int, list[int]] = {id(s): [s.numel * s.elem, 1] for s in seeds}  # tensor -> [bytes, sharers]
    shared: dict[int, list[int]] = {}
    for s in seeds:
        shared[id(s)] = bufs[id(s)]
    extra = 0
    for op in reversed(tp.ops):
        if not any(id(t) in shared for t in op.outputs):
            continue
        if op.saved or op.packs_weight:
            return extra
        out = next((shared[id(t)] for t in op.outputs if id(t) in shared), None)
        for t in op.grad_inputs:
            target = t if id(t) in tp.own_grad else root(t)
            if id(target) in shared:
                continue  # accumulated into the existing buffer
            size = target.numel * target.elem
            if (op.passthrough or op.add_like) and out is not None and size == out[0]:
                out[1] += 1
                shared[id(target)] = out
            else:
                shared[id(target)] = [size, 1]
                extra += size
        for t in op.outputs:
            buf = shared.pop(id(t), None)
            if buf is not None:
                buf[1] -= 1
                if buf[1] == 0:
                    extra -= buf[0]
    return extra


def create_graph_bytes(tp: Tape, seeds: Sequence[Tensor]) -> int:
    """Bytes a ``torch.autograd.grad(..., create_graph=True)`` pass over ``tp`` leaves alive for the
    second-order backward: every input gradient and every intermediate product it computes is an op of the
    new graph and is kept by it (parameter gradients are not computed: ``only_inputs``)."""
    grads: set[int] = {id(s) for s in seeds}
    total = 0
    for op in reversed(tp.ops):
        if not any(id(t) in grads for t in op.outputs):
            continue
        total += op.bwd_scratch
        for t in op.grad_inputs:
            target = t if id(t) in tp.own_grad else root(t)
            if id(target) not in grads or op.passthrough:
                if not op.passthrough:
                    total += t.numel * t.elem
                grads.add(id(target))
    return total


def _recompute(tp: Tape, idxs: list[int], st: _State, alive: set[int], held: dict[int, int]) -> None:
    """Recompute a checkpoint region's forward (saving), on top of the current state."""
    ops = tp.ops
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
        for t in ops[i].inputs:
            r = root(t)
            if id(r) in inside:
                last_in[id(r)] = i
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
            st.alloc(t, t.kind, t.nbytes)
        st.check(op.fwd_scratch)
        st.temporary(("s", i), op.fwd_scratch)
        for t in by_last.get(i, ()):
            if id(t) not in saved_count:
                st.free(t, t.kind, t.nbytes)
        for t in op.outputs:
            if id(t) not in last_in and id(t) not in saved_count:
                st.free(t, t.kind, t.nbytes)
    for tid, n in saved_count.items():
        held[tid] = n
        alive.add(tid)
