"""Live-storage accounting under fake tensors: what ``torch.cuda.max_memory_allocated`` would report.

A :class:`MemoryTracker` is a ``TorchDispatchMode`` that sits above ``FakeTensorMode``. Every op's
outputs pass through it; an output whose untyped storage it has not seen is a new allocation of
``storage.nbytes()`` rounded up to the CUDA caching allocator's 512-byte blocks, and a weak reference
on that storage (storages keep their Python object alive as long as the C++ storage lives) tells it
when the allocation is freed. Allocations that happen *inside* a CUDA kernel and never surface as a
tensor (attention backward accumulators) are added as transients by the emulation layer.

Each allocation is stamped with the *region* it was made in (activations, or logits/loss while the
output head and the loss run); weights, gradients, optimizer state, KV cache and quantization
constants are marked once they are known, so a snapshot taken at a peak can be broken down by kind
at the end of the trace.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..allocator import K_MIN_BLOCK, round_size
from ..kinds import MemoryKind, Phase

__all__ = ["BLOCK_BYTES", "MemoryTracker", "PeakMark", "block_bytes", "gradient_buffers"]

# c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512; every request is rounded up to a multiple of it
# (round_size), and the allocated-bytes statistic counts the rounded size.
BLOCK_BYTES = K_MIN_BLOCK

aten = torch.ops.aten


def block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator accounts for a request of ``nbytes``."""
    return round_size(nbytes) if nbytes > 0 else 0


class _Rec:
    """One live allocation."""

    __slots__ = ("kind", "nbytes", "origin", "ref", "region")

    def __init__(self, nbytes: int, region: MemoryKind, origin: str = "") -> None:
        self.nbytes = nbytes
        self.region = region
        self.origin = origin  # module and op that allocated it (for reading a peak's live tensors)
        self.kind: MemoryKind | None = None  # set when the storage is known to be a weight, grad, state, ...
        self.ref: weakref.ref[Any] | None = None

    def resolved(self) -> MemoryKind:
        return self.kind if self.kind is not None else self.region


@dataclass
class PeakMark:
    """A snapshot of the live allocations at the highest point of one phase."""

    bytes: int
    recs: list[_Rec]
    transient: int
    where: str

    def breakdown(self) -> dict[MemoryKind, int]:
        out: dict[MemoryKind, int] = {}
        for r in self.recs:
            k = r.resolved()
            out[k] = out.get(k, 0) + r.nbytes
        if self.transient:
            out[MemoryKind.ACTIVATIONS] = out.get(MemoryKind.ACTIVATIONS, 0) + self.transient
        return out


_composite_cache: dict[Any, bool] = {}


def _is_composite(func: Any) -> bool:
    """Ops with a CompositeImplicitAutograd kernel reach a dispatch mode undecomposed under
    inference_mode; decomposing them here keeps their temporaries visible to the tracker."""
    hit = _composite_cache.get(func)
    if hit is None:
        # An op that also has a backend kernel (silu_backward: a fused CUDA kernel, one output) runs that
        # kernel on the GPU; only ops without one are really their decomposition. The CPU kernel stands for the
        # CUDA one (a CPU-only torch cannot be asked about CUDA's).
        try:
            name = func.name()
            hit = (torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
                   and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"))
        except Exception:
            hit = False
        _composite_cache[func] = hit
    return hit


# Ops FakeTensorMode must see whole (metadata queries, or ops whose decomposition is not a real execution).
_NEVER_DECOMPOSE = {
    aten.size.default, aten.stride.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.dim.default,
    aten.is_contiguous.default,
}


# Random draws get the value real data would centre on; these ops then propagate known scalar values so that a
# check like ``torch.rand([]) < layerdrop`` answers as it would on the GPU (almost always false for small p).
_RANDOM_SCALARS = {
    aten.rand.default: 0.5, aten.rand_like.default: 0.5, aten.uniform_.default: 0.5,
    aten.randn.default: 0.0, aten.randn_like.default: 0.0, aten.normal_.default: 0.0,
}
_SCALAR_OPS = {
    getattr(aten, name).default if hasattr(getattr(aten, name), "default") else None
    for name in ("clone", "detach", "_to_copy", "lift_fresh_copy", "logical_not", "all", "any", "neg", "abs")
} | {
    getattr(getattr(aten, name), ov)
    for name in ("lt", "gt", "le", "ge", "eq", "ne", "add", "sub", "mul", "div")
    for ov in ("Tensor", "Scalar") if hasattr(getattr(aten, name), ov)
} | {aten.logical_and.default, aten.logical_or.default}
_SCALAR_OPS.discard(None)


# Ops through which a routing mask keeps its meaning (views, copies, selections of experts).
_ROUTE_PASS = {
    getattr(getattr(aten, name), ov)
    for name, ovs in (("permute", ("default",)), ("select", ("int",)), ("squeeze", ("default", "dim", "dims")),
                      ("unsqueeze", ("default",)), ("view", ("default",)), ("_unsafe_view", ("default",)),
                      ("transpose", ("int",)), ("slice", ("Tensor",)), ("clone", ("default",)),
                      ("_to_copy", ("default",)), ("expand", ("default",)), ("index", ("Tensor",)),
                      ("alias", ("default",)), ("t", ("default",)), ("reshape", ("default",)))
    for ov in ovs if hasattr(aten, name) and hasattr(getattr(aten, name), ov)
}
_ROUTE_SUM = {aten.sum.dim_IntList, aten.sum.default}
_SCATTER = {getattr(aten.scatter, ov) for ov in ("value", "src") if hasattr(aten.scatter, ov)}
_ROUTE_HIT = {aten.gt.Scalar, aten.ne.Scalar, aten.ge.Scalar}


_BOOL_INDEXED = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                 torch.ops.aten._unsafe_index_put.default)
_REAL_NUMEL = 1 << 24  # integer factories up to this size are computed for real (position grids, masks)


def _all_real_ints(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool | None:
    """True: every tensor argument is real (not fake: integer inputs and what was computed from them); None: no
    tensor argument."""
    from torch._subclasses.fake_tensor import FakeTensor

    seen = False
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            if isinstance(t, FakeTensor) or t.device.type == "meta" or isinstance(t, torch.nn.Parameter):
                return False
            seen = True
    return True if seen else None


# ---- the autograd engine's gradient buffers ----------------------------------------------------------------------
# torch/csrc/autograd/input_buffer.cpp: when a second gradient reaches a tensor that already has one, the engine adds
# it in place (``old_var.add_(var)``) if it holds the last reference to the old buffer and its storage, the buffer is
# dense and non-overlapping, and neither tensor is "subclass-like" (``can_accumulate_inplace``); otherwise it makes a
# third buffer (``old_var + var``). ``at::isTensorSubclassLike`` is true for every tensor while a Python dispatch mode
# is active (ATen/TensorSubclassLikeUtils.h), so under this tracker the engine always takes the out-of-place path,
# which a GPU run takes only for shared buffers: a trace would count one extra gradient-sized buffer at every
# accumulation (Mamba's slow scan accumulates 2 x seq_len select_backward gradients of its (batch, d_inner, seq,
# state) fp32 tensors this way). The tracker therefore recognises the engine's accumulation (an ``add`` whose second
# operand a node has just returned, made while that node is current, with grad mode off) and, when the CUDA run
# would add in place, counts the result in the old buffer's storage.

def _hook_nodes(roots: Iterable[Any], made: Callable[[Any, tuple[Any, ...]], None]) -> list[Any]:
    """Register ``made(node, grad_inputs)`` as a post-hook on every node of the graph below ``roots``."""
    handles: list[Any] = []
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not hasattr(node, "variable"):  # AccumulateGrad hands its gradient to .grad, not to a buffer
            handles.append(node.register_hook(lambda gi, go, n=node: made(n, gi)))
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return handles


@functools.cache
def _sole_owner_counts() -> tuple[int, int]:
    """(tensor use count, storage use count) that an engine accumulation's old buffer shows inside a dispatch mode
    when the engine holds its only reference: measured once on a two-gradient probe (the dispatcher's own
    references differ between torch releases)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    seen: list[tuple[int, int]] = []
    fresh: set[int] = set()

    class _Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            if func is aten.add.Tensor and not seen and args[1].untyped_storage()._cdata in fresh:
                seen.append(_owner_counts(args[0]))
            return func(*args, **(kwargs or {}))

    def made(_node: Any, grads: tuple[Any, ...]) -> None:
        fresh.clear()
        fresh.update(_storages(grads))

    with _disable_current_modes(), FakeTensorMode():
        x = torch.zeros(4, 8, requires_grad=True)
        y = x.exp()
        loss = (y[0] * 2 + y[1] * 3).sum()  # two select_backward gradients meet in exp's buffer
        handles = _hook_nodes([loss.grad_fn], made)
        try:
            with _Probe():
                loss.backward()
        finally:
            for h in handles:
                h.remove()
    if not seen:
        raise RuntimeError("the autograd engine made no gradient accumulation on the probe graph")
    return seen[0]


def _storages(grads: tuple[Any, ...]) -> set[int]:
    """The storage keys of a node's returned gradients."""
    return {g.untyped_storage()._cdata for g in grads if isinstance(g, torch.Tensor)}


def _owner_counts(t: torch.Tensor) -> tuple[int, int]:
    return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@contextlib.contextmanager
def gradient_buffers(tracker: MemoryTracker) -> Iterator[None]:
    """For the duration: every ``torch.autograd.backward`` (``loss.backward()``, accelerate's backward) first hooks
    the nodes of its graph, so that the tracker can tell the engine's gradient accumulations (see above)."""
    original = torch.autograd.backward

    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        handles = _hook_nodes([t.grad_fn for t in roots], tracker.node_made)
        try:
            return original(tensors, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            tracker.node_made(None, ())

    tracker.sole_owner = _sole_owner_counts()
    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


class MemoryTracker(TorchDispatchMode):
    """Counts live (fake) device allocations and records the peak of each phase."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, _Rec] = {}
        self.current = 0
        self.phase: Phase | None = None
        self.region = MemoryKind.ACTIVATIONS
        self.peaks: dict[Phase, PeakMark] = {}
        self.where = ""
        self.overrides: dict[Any, Callable[..., Any]] = {}
        self.after_op: dict[Any, Callable[[tuple[Any, ...], dict[str, Any], Any], int]] = {}
        self.scalar_answer: Callable[[torch.Tensor], Any] | None = None
        self.values = WeakIdKeyDictionary()  # tensor -> known Python value (compared by identity)
        # MoE routing: tensors derived from one_hot(top-k expert ids) -> (kind, classes, top_k, full mask numel)
        self.routes = WeakIdKeyDictionary()
        self.routing = "balanced"
        self.data_dependent: dict[str, int] = {}  # what data-dependent shapes were answered, and how often
        self.ops = 0
        # every allocation and free in order, for vramplan.allocator (the reserved-memory model)
        self.events: list[tuple[object, int]] = []
        self._transients = 0
        # Vision-language inputs: integer/bool tensors that hold real values (input_ids, image grids, masks) are
        # computed for real, so the model's data-dependent bookkeeping (placeholder counts, patch grids, rope
        # indices) sees the processor's values; float tensors stay fake.
        self.real_ints = False
        # the node whose gradients were just made and their storages (gradient_buffers), and the owner counts of
        # a buffer the engine holds alone (None: accumulations are not told apart)
        self._made_by: Any = None
        self._made: set[int] = set()
        self.sole_owner: tuple[int, int] | None = None

    def node_made(self, node: Any, grads: tuple[Any, ...]) -> None:
        """A node's post-hook: ``grads`` are what it returned, which the engine now adds into its buffers."""
        self._made_by = node
        self._made = _storages(grads)

    def _accumulates_in_place(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """``add(old, new)`` is the engine adding a node's fresh gradient into a buffer it holds alone: on the GPU
        ``old.add_(new)`` (input_buffer.cpp ``accumulate``)."""
        if kwargs or len(args) != 2 or torch.is_grad_enabled() or self.sole_owner is None:
            return False
        old, new = args
        if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
            return False
        if new.untyped_storage()._cdata not in self._made or torch._C._current_autograd_node() != self._made_by:
            return False
        return (old.shape == new.shape and old.dtype == new.dtype and is_non_overlapping_and_dense_or_false(old)
                and _owner_counts(old) == self.sole_owner)

    def set_phase(self, phase: Phase | None) -> None:
        """Enter a phase; its peak is at least what is live when it starts (a phase can allocate nothing, e.g.
        a fused optimizer step)."""
        if phase is not None and phase is not self.phase:
            from . import report

            report(phase.value.replace("_", " "))
        self.phase = phase
        if phase is not None:
            from ..allocator import PHASE

            self.events.append((phase.value, PHASE))
            self._check_peak(None, 0)

    # ---- allocation bookkeeping ---------------------------------------------------------------
    def _free(self, key: int, _ref: object) -> None:
        rec = self.live.pop(key, None)
        if rec is not None:
            self.current -= rec.nbytes
            self.events.append((key, -1))

    def adopt(self, t: torch.Tensor, kind: MemoryKind | None = None) -> None:
        """Count an existing tensor's storage (and optionally fix its kind)."""
        rec = self._register(t)
        if rec is not None and kind is not None:
            rec.kind = kind

    def mark(self, tensors: Iterable[Any], kind: MemoryKind) -> None:
        """Fix the kind of the storages behind ``tensors`` (grads, optimizer state, KV cache...)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                rec = self.live.get(t.untyped_storage()._cdata)
                if rec is not None:
                    rec.kind = kind

    def retract(self, tensors: Iterable[Any]) -> set[int]:
        """Take back storages that have been live since before the phases now recorded and never should have been:
        they leave the live set and every recorded peak (a constant under every moment of those phases, so each
        peak stays where it was, lower by their bytes). Returns their keys (the caller edits the event list)."""
        gone: dict[int, _Rec] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage()._cdata
                rec = self.live.pop(key, None)
                if rec is not None:
                    gone[key] = rec
                    self.current -= rec.nbytes
        ids = {id(r) for r in gone.values()}
        for mark in self.peaks.values():
            kept = [r for r in mark.recs if id(r) not in ids]
            if len(kept) != len(mark.recs):
                mark.bytes -= sum(r.nbytes for r in mark.recs if id(r) in ids)
                mark.recs = kept
        return set(gone)

    def _register(self, t: torch.Tensor) -> _Rec | None:
        if t.device.type == "meta":
            return None
        st = t.untyped_storage()
        key = st._cdata
        rec = self.live.get(key)
        if rec is not None:
            return rec
        nbytes = block_bytes(st.nbytes())
        if nbytes == 0:
            return None
        rec = _Rec(nbytes, self.region)
        rec.ref = weakref.ref(st, lambda r, k=key: self._free(k, r))
        self.live[key] = rec
        self.current += nbytes
        self.events.append((key, st.nbytes()))
        return rec

    def _note(self, out: Any, func: Any) -> None:
        before = self.current
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                rec = self._register(t)
                if rec is not None and not rec.origin:
                    node = torch._C._current_autograd_node()
                    where = node.name() if node is not None else self.where
                    rec.origin = f"{where} [{getattr(func, '__name__', func)}] {tuple(t.shape)} {t.dtype}"
        if self.current > before:
            self._check_peak(func, 0)

    def transient(self, nbytes: int, func: Any) -> None:
        """An allocation made and freed inside one kernel (workspace, accumulators)."""
        if nbytes > 0:
            self._check_peak(func, nbytes)
            self._transients += 1
            self.events.append((("t", self._transients), nbytes))
            self.events.append((("t", self._transients), -1))

    def _check_peak(self, func: Any, transient: int) -> None:
        phase = self.phase
        if phase is None:
            return
        total = self.current + transient
        mark = self.peaks.get(phase)
        if mark is None or total > mark.bytes:
            node = torch._C._current_autograd_node()
            where = node.name() if node is not None else self.where
            if func is not None:
                where = f"{where} [{getattr(func, '__name__', func)}]"
            self.peaks[phase] = PeakMark(total, list(self.live.values()), transient, where)

    # ---- dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        override = self.overrides.get(func)
        if override is not None:
            with self:
                r = override(*args, **kwargs)
            if r is not NotImplemented:
                return r
        if self.real_ints and func in _BOOL_INDEXED and len(args) > 1 and isinstance(args[1], (list, tuple)) and \
                any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            return self.__torch_dispatch__(func, types, (args[0], self._long_indices(args[1]), *args[2:]), kwargs)
        if self.real_ints:
            real = _all_real_ints(args, kwargs)
            if real is None:  # a factory: integer results (arange, index grids) are made for real
                probe = func(*args, **kwargs)
                real = isinstance(probe, torch.Tensor) and not probe.is_floating_point() and \
                    not probe.is_complex() and probe.numel() <= _REAL_NUMEL
                del probe
            if real:
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():
                    out = func(*args, **kwargs)
                self._note(out, func)
                return out
        if func is aten._local_scalar_dense.default:
            return self._local_scalar(func, args, kwargs)
        if func is aten.nonzero.default:
            return self._nonzero(args[0])
        if func not in _NEVER_DECOMPOSE and _is_composite(func):
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                if func is aten.one_hot.default and isinstance(r, torch.Tensor):
                    self._route_source(args, kwargs, r)
                return r
        if func is aten.add.Tensor and self._made and self._accumulates_in_place(args, kwargs):
            # the sum takes the old buffer's storage: counted as that storage freed, then the result allocated
            self._free(args[0].untyped_storage()._cdata, None)
        out = func(*args, **kwargs)
        self._note(out, func)
        hook = self.after_op.get(func)
        if hook is not None:
            self.transient(hook(args, kwargs, out), func)
        if func in _RANDOM_SCALARS or func in _SCALAR_OPS:
            self._propagate_value(func, args, kwargs, out)
        if func is aten.one_hot.default and isinstance(out, torch.Tensor):
            self._route_source(args, kwargs, out)
        elif func is aten.topk.default:
            self._route_ids(args, kwargs, out)
        elif func in _SCATTER and len(self.routes):
            self._route_scatter(args, out)
        elif func is aten.unbind.int and len(self.routes) and args and isinstance(args[0], torch.Tensor):
            self._route_elements(args[0], out, args[1] if len(args) > 1 else kwargs.get("dim", 0))
        elif len(self.routes) and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            self._route_propagate(func, args[0], out, args)
        return out

    # ---- MoE routing: data-dependent expert dispatch ---------------------------------------------------------
    def _route_source(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        """``one_hot(top_k_ids, num_classes=E)``: a routing mask of E classes, top_k picks per token."""
        ids = args[0]
        classes = kwargs.get("num_classes", args[1] if len(args) > 1 else out.shape[-1])
        if not isinstance(ids, torch.Tensor) or not isinstance(classes, int) or classes < 1:
            return
        top_k = int(ids.shape[-1]) if ids.dim() >= 2 else 1
        self.routes[out] = ("mask", classes, top_k, out.numel())

    def _route_ids(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """``topk(scores, k)``: its indices are top-k expert ids over the scores' last (or ``dim``) axis."""
        scores = args[0]
        k = args[1] if len(args) > 1 else kwargs.get("k")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        if not isinstance(scores, torch.Tensor) or not isinstance(k, int) or scores.dim() < 2 or \
                dim not in (-1, scores.dim() - 1) or not isinstance(out, (tuple, list)) or len(out) != 2:
            return
        classes = int(scores.shape[-1])
        if 0 < k < classes:
            self.routes[out[1]] = ("ids", classes, k, 0)

    def _route_scatter(self, args: tuple[Any, ...], out: Any) -> None:
        """``zeros(tokens, E).scatter(1, top_k_ids, 1)``: a (tokens, E) routing mask with top_k picks per row
        (JetMoeTopKGating); marked with the size a one_hot mask of the same picks would have."""
        if len(args) < 3 or not isinstance(out, torch.Tensor):
            return
        mark = self.routes.get(args[2]) if isinstance(args[2], torch.Tensor) else None
        if mark is None or mark[0] != "ids" or out.dim() != 2 or args[1] not in (1, -1) or \
                int(out.shape[-1]) != mark[1]:
            return
        self.routes[out] = ("mask", mark[1], mark[2], out.numel() * mark[2])

    def _route_elements(self, src: torch.Tensor, outs: Any, dim: Any) -> None:
        """``counts.unbind(0)`` (what ``.tolist()`` runs on a fake tensor): each expert's own count."""
        mark = self.routes.get(src)
        if mark is None or mark[0] != "count" or src.dim() != 1 or dim not in (0, -1) or src.numel() != mark[1]:
            return
        for i, t in enumerate(outs):
            if isinstance(t, torch.Tensor):
                self.routes[t] = ("count_of", *mark[1:], i)

    def _expert_count(self, mark: tuple[Any, ...]) -> int:
        """How many tokens expert ``i`` gets: balanced, the picks spread evenly (the first ones one more where they
        do not divide); worst, all tokens on the first top_k experts."""
        _, classes, top_k, full, i = mark
        picks = full // classes
        if self.routing == "balanced":
            return int(picks // classes + (1 if i < picks % classes else 0))
        return int(picks // top_k) if i < top_k else 0

    def _route_propagate(self, func: Any, src: torch.Tensor, out: torch.Tensor,
                         args: tuple[Any, ...] = ()) -> None:
        mark = self.routes.get(src)
        if mark is None:
            return
        kind = mark[0]
        if kind == "count" and func is aten.select.int and src.dim() == 1 and src.numel() == mark[1] and \
                len(args) > 2 and isinstance(args[2], int):
            self.routes[out] = ("count_of", *mark[1:], args[2] % mark[1])
            return
        if kind == "count_of" and func in _ROUTE_PASS:
            self.routes[out] = mark
            return
        if kind == "mask" and func in _ROUTE_PASS:
            self.routes[out] = mark
        elif kind == "mask" and func in _ROUTE_SUM:
            self.routes[out] = ("count", *mark[1:])
        elif kind == "count" and func in _ROUTE_HIT:
            self.routes[out] = ("hit", *mark[1:])
        elif kind in ("count", "hit") and func in _ROUTE_PASS:
            self.routes[out] = mark

    def _long_indices(self, indices: Any) -> list[Any]:
        """Boolean masks of an index op as the integer indices they select: a real mask (placeholder tokens of
        real input ids) by its real ``nonzero``, a fake one as all-true."""
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._python_dispatch import _disable_current_modes

        out: list[Any] = []
        for i in indices:
            if not (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
                out.append(i)
                continue
            if isinstance(i, FakeTensor):
                nz = self._nonzero(i)
                with self:
                    out.extend(nz.unbind(1))
            else:
                with _disable_current_modes():
                    out.extend(i.nonzero().unbind(1))
        return out

    def _nonzero(self, x: torch.Tensor) -> torch.Tensor:
        """``nonzero`` has a data-dependent length. On a routing mask it is answered from the routing assumption:
        balanced, each of E experts gets top_k x tokens / E picks; worst, all tokens pick the same top_k experts.
        Any other mask is answered as all-true (the most rows it can have)."""
        n = x.numel()
        mark = self.routes.get(x)
        if mark is None:
            count, what = n, "nonzero: all-true mask"
        else:
            kind, classes, top_k, full = mark[:4]
            if kind == "mask" and x.dim() == 2 and int(x.shape[-1]) == classes and n * top_k == full:
                count, what = full // classes, "MoE routing mask"  # a (tokens, experts) mask: top_k per row
            elif kind == "hit":
                count = n if self.routing == "balanced" else min(top_k, n)
                what = f"MoE experts hit ({self.routing})"
            elif n >= full:
                count, what = full // classes, "MoE routing mask"
            else:  # one expert's slice [top_k, tokens]
                count = n // classes if self.routing == "balanced" else n // max(top_k, 1)
                what = f"MoE tokens per expert ({self.routing})"
        self.data_dependent[what] = self.data_dependent.get(what, 0) + 1
        with self:
            return torch.empty((count, x.dim()), dtype=torch.long, device=x.device)

    # ---- data-dependent scalars -------------------------------------------------------------------------
    def _value_of(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t in self.values:
            return self.values[t]
        const = getattr(t, "constant", None)
        if const is not None and const.numel() == 1:
            return const.item()
        raise KeyError

    def _propagate_value(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        target = args[0] if func is aten.uniform_.default or func is aten.normal_.default else out
        if not isinstance(target, torch.Tensor) or target.numel() != 1:
            return
        if func in _RANDOM_SCALARS:
            self.values[target] = _RANDOM_SCALARS[func]
            return
        from torch.utils._python_dispatch import _disable_current_modes

        try:
            vals = [self._value_of(a) for a in args]
            kw = {k: self._value_of(v) for k, v in kwargs.items()}
        except KeyError:
            return
        with _disable_current_modes():
            real = [torch.tensor(v, dtype=a.dtype) if isinstance(a, torch.Tensor) else v for a, v in zip(args, vals,
                                                                                                        strict=True)]
            kw = {k: v for k, v in kw.items() if k not in ("device", "layout", "pin_memory", "memory_format")}
            try:
                result = func(*real, **kw)
            except Exception:
                return
            if isinstance(result, torch.Tensor) and result.numel() == 1:
                self.values[target] = result.item()

    def _local_scalar(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception:
            try:
                return self._value_of(args[0])
            except KeyError:
                pass
            mark = self.routes.get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
            if mark is not None and mark[0] == "count_of":
                what = f"MoE tokens per expert ({self.routing})"
                self.data_dependent[what] = self.data_dependent.get(what, 0) + 1
                return self._expert_count(mark)
            if self.scalar_answer is None:
                raise
            self.data_dependent["item()"] = self.data_dependent.get("item()", 0) + 1
            return self.scalar_answer(args[0])
