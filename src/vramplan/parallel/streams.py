"""One rank's allocation stream under a sharded layout, replayed through the caching-allocator model.

The single-GPU training stream (:mod:`vramplan.alloc_stream`: the recorded programs of every block, in the
calibration loop's order) runs the decoder layers, the embedding and the head as one GPU computes them; a
:class:`~vramplan.alloc_stream.RankHooks` object adds what the engine allocates and frees around them on one
rank, in the order its hooks run on the host (which is the order the caching allocator sees):

* :class:`FsdpRank`, PyTorch FSDP2 ``fully_shard`` on every decoder layer and the root, as accelerate and
  ``vramplan measure --fsdp`` wrap a model (torch/distributed/fsdp/_fully_shard/, read in torch 2.13):
  - build: ``fully_shard`` moves each unit's parameters to the device, makes a padded shard of every one
    (``FSDPParam._init_sharded_param``: ``new_zeros(padded_sharded_size)``) and the unsharded tensors die when
    it returns;
  - unshard (``foreach_all_gather``): on the all-gather copy-in stream, a flat copy of the shards in
    ``param_dtype`` when a ``MixedPrecisionPolicy`` casts them (``_get_param_all_gather_inputs``), then the
    all-gather output (world size x the flat input); the copy-out (``foreach_all_gather_copy_out``) allocates
    every unsharded parameter on the compute stream. In forward the output stays referenced until the next
    unit's copy-out (``AllGatherState``, freed at the root's post-forward); in backward it dies after the copy-out;
  - reshard: after forward (FULL_SHARD; never for the root, ``_auto_reshard_after_forward``) and after backward
    the unsharded parameters are freed; ``pre_backward`` prefetches the unit before in post-forward order
    (``_backward_prefetch``);
  - ``post_backward`` (``foreach_reduce``): the reduce-scatter input (padded, ``reduce_dtype``) on the compute
    stream, then autograd's unsharded gradients die, and the reduce-scatter output on the reduce-scatter
    stream becomes the sharded gradients (views of it, freed by ``zero_grad``; added and freed under
    accumulation); the previous unit's input is freed before (``reduce_scatter_max_input_buffers`` = 1) and
    the last one at the end of backward. The root (embedding, final norm, head) reduces last, in the
    final callback, since its inputs need no gradient.
  - the optimizer keeps its states for the shards.

The caching allocator never hands a block of one stream to a request on another
(c10/cuda/CUDACachingAllocator.cpp: free blocks are searched by ``(stream, size)``, and a segment belongs to
the stream that created it), so the copy-in, reduce-scatter and compute streams are replayed as separate
allocators; what is reserved is their sum (each one only grows within a run: no ``empty_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .. import allocator as A
from ..alloc_stream import (
    ROOT,
    _adapters_by_layer,
    _base_trains,
    _optimizer,
    _optimizer_step,
    _param_tensors,
    _Stream,
    train_events,
)
from ..allocator import AllocConf, parse_alloc_conf, round_size, simulate
from ..estimator import _first_trainable, numerics, runs_as
from ..memory import ModelStates, model_states
from ..spec import ModelSpec
from ..workload import Method, Precision, WeightsQuant, Workload
from .layout import Engine, FSDPMode, Layout, Offload, zero_auto_buckets
from .sharding import _tp_shard

__all__ = ["FsdpRank", "MegatronRank", "RankReplay", "Zero3Rank", "ZeroRank", "rank_replay", "replays"]

COMPUTE, COPY_IN, REDUCE_SCATTER = 0, 1, 2  # the CUDA streams a rank allocates on


@dataclass(frozen=True, slots=True)
class RankReplay:
    """What one rank's stream gives: its allocated peak (``max_memory_allocated``) and what the allocator reserves,
    in total and per stream (compute, all-gather copy-in, reduce-scatter)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    reserved_by_stream: tuple[int, ...]
    engine: str


@dataclass(slots=True)
class _Param:
    numel: int
    stored: int  # bytes per element as the rank stores it
    gathered: int  # bytes per element when gathered for compute
    trainable: bool
    group: str = "layer"  # "embed" / "head" for the root's parameters


@dataclass(slots=True)
class _Unit:
    params: list[_Param] = field(default_factory=list)


def _units(spec: ModelSpec, w: Workload, wc: Workload) -> dict[int, _Unit]:
    """Every decoder layer's and the root's parameters, as the user's workload stores them and as the GPU computes
    with them (``wc``: FSDP's ``param_dtype`` under a ``MixedPrecisionPolicy``)."""
    states = model_states(spec, w)
    elem, gelem = w.precision.param_bytes, wc.precision.param_bytes
    first = _first_trainable(spec, w, states)
    units: dict[int, _Unit] = {i: _Unit() for i in range(spec.num_layers)}
    units[ROOT] = _Unit()
    for group, n in _param_tensors(spec, w, states):
        unit = ROOT if group in ("embed", "head") else int(group[5:])
        units[unit].params.append(_Param(max(1, n // elem), elem, gelem, _base_trains(w, group, first) and w.is_train,
                                         group if unit == ROOT else "layer"))
    mixed = w.precision.is_amp
    for i, sizes in enumerate(_adapters_by_layer(spec, w)):
        for n in sizes:  # peft's fp32 adapters: cast to param_dtype by a MixedPrecisionPolicy, else gathered as fp32
            units[i].params.append(_Param(n // 4, 4, gelem if mixed else 4, True))
    return units


def _run_layers(spec: ModelSpec) -> list[int]:
    """The decoder layers the forward runs, bottom to top. A layer it skips (``spec.idle_layers``, as
    ``alloc_stream._layer_order`` leaves it out) never calls its module's forward: an engine's hooks never fire for
    it, so its parameters are never gathered and it makes no gradient to reduce."""
    return [i for i in range(spec.num_layers) if i not in spec.idle_layers]


def _unit_before(spec: ModelSpec) -> dict[int, int]:
    """The unit whose forward ran just before each running layer's (none for the first) and the root's head (the
    last running layer): what backward runs next, and prefetches (FSDP2 ``_backward_prefetch`` follows the
    post-forward order, so a skipped layer is passed over)."""
    run = _run_layers(spec)
    return dict(zip([*run[1:], ROOT], run, strict=True))


class _StreamKeys:
    """Keys of a rank's allocations, with the CUDA stream each is made on where it is not the compute stream (the
    caching allocator keeps every stream's blocks apart)."""

    stream: dict[int, int]

    def _key(self, st: _Stream, stream: int) -> int:
        k = st.fresh(0)
        if stream != COMPUTE:
            self.stream[k] = stream
        return k


class _WholeModelHooks(_StreamKeys):
    """Hooks of an engine that holds every parameter for the whole step: nothing happens around a unit's forward or
    before its backward."""

    def pre_forward(self, st: _Stream, unit: int) -> None:
        pass

    def post_forward(self, st: _Stream, unit: int) -> None:
        pass

    def pre_backward(self, st: _Stream, unit: int) -> None:
        pass


class FsdpRank(_StreamKeys):
    """The :class:`~vramplan.alloc_stream.RankHooks` of one FSDP2 rank (see the module's docstring)."""

    per_param_grads = False  # a unit's gradients are taken in its post-backward hook

    def __init__(self, spec: ModelSpec, w: Workload, wc: Workload, layout: Layout) -> None:
        self.n = max(1, layout.shard_degree)
        self.units = _units(spec, w, wc)
        self.layers = spec.num_layers
        self.before = _unit_before(spec)
        self.mixed = w.precision.is_amp  # a MixedPrecisionPolicy casts the gathered parameters
        self.reshard_after_forward = layout.fsdp is not FSDPMode.GRAD_OP
        # MixedPrecisionPolicy(reduce_dtype=float32) under AMP, as the estimator's fsdp_states assumes
        self.reduce_elem = 4 if self.mixed else 0
        self.stream: dict[int, int] = {}
        self.unsharded: dict[int, list[int]] = {}
        self.pending: dict[int, int] = {}  # prefetched all-gather outputs, by unit
        self.ag_state: int | None = None
        self.rs_state: int | None = None
        self.w = w
        self.spec = spec

    # ---- sizes -------------------------------------------------------------------------------------------
    def _shard(self, p: _Param) -> int:
        return -(-p.numel // self.n)

    # ---- RankHooks -----------------------------------------------------------------------------------------
    def build(self, st: _Stream) -> None:
        for unit in [*range(self.layers), ROOT]:
            params = self.units[unit].params
            full = [self._key(st, COMPUTE) for _ in params]
            for k, p in zip(full, params, strict=True):
                st.alloc(k, p.numel * p.stored)
            for j, p in enumerate(params):
                st.alloc(st.key(("fsdp_shard", unit, j)), self._shard(p) * p.stored)
            for k in full:
                st.free(k)

    def _unshard(self, st: _Stream, unit: int) -> int:
        params = self.units[unit].params
        flat = sum(self._shard(p) for p in params)
        gelem = max((p.gathered for p in params), default=2)
        copy = None
        if self.mixed:  # the shards cast to param_dtype into one flat all-gather input
            copy = self._key(st, COPY_IN)
            st.alloc(copy, flat * gelem)
        out = self._key(st, COPY_IN)
        st.alloc(out, flat * self.n * gelem)
        if copy is not None:
            st.free(copy)
        return out

    def _copy_out(self, st: _Stream, unit: int) -> None:
        keys = []
        for p in self.units[unit].params:
            k = self._key(st, COMPUTE)
            st.alloc(k, self._shard(p) * self.n * p.gathered)
            keys.append(k)
        self.unsharded[unit] = keys

    def _reshard(self, st: _Stream, unit: int) -> None:
        for k in self.unsharded.pop(unit, []):
            st.free(k)

    def pre_forward(self, st: _Stream, unit: int) -> None:
        if unit in self.unsharded or not self.units[unit].params:
            return
        out = self._unshard(st, unit)
        if self.ag_state is not None:  # the previous unit's all-gather output, kept for the overlap
            st.free(self.ag_state)
        self._copy_out(st, unit)
        self.ag_state = out

    def post_forward(self, st: _Stream, unit: int) -> None:
        if unit == ROOT:
            if self.ag_state is not None:
                st.free(self.ag_state)
                self.ag_state = None
            return
        if self.reshard_after_forward:
            self._reshard(st, unit)

    def pre_backward(self, st: _Stream, unit: int) -> None:
        if unit not in self.unsharded and self.units[unit].params:
            out = self.pending.pop(unit, None)
            if out is None:
                out = self._unshard(st, unit)
            self._copy_out(st, unit)
            st.free(out)
        target = self.before.get(unit, -1)
        if target >= 0 and target not in self.unsharded and target not in self.pending and \
                self.units[target].params:
            self.pending[target] = self._unshard(st, target)

    def post_backward(self, st: _Stream, unit: int, grads: list[int], accumulate: bool) -> None:
        self._reshard(st, unit)
        if self.rs_state is not None:
            st.free(self.rs_state)
            self.rs_state = None
        trained = [p for p in self.units[unit].params if p.trainable]
        if trained:
            padded = sum(self._shard(p) * self.n for p in trained)
            elem = self.reduce_elem or max(p.gathered for p in trained)
            rs_in = self._key(st, COMPUTE)
            st.alloc(rs_in, padded * elem)
            for k in grads:
                st.free(k)
            rs_out = self._key(st, REDUCE_SCATTER)
            st.alloc(rs_out, padded // self.n * elem)
            if accumulate:  # added into the sharded gradients of the earlier micro-batches
                st.free(rs_out)
            self.rs_state = rs_in
        else:
            for k in grads:
                st.free(k)
        if unit == ROOT and self.rs_state is not None:  # the final callback releases the last input
            st.free(self.rs_state)
            self.rs_state = None

    def grad_ready(self, st: _Stream, key: int, nbytes: int) -> None:
        pass  # FSDP2 takes a unit's gradients in its post-backward hook

    def optimizer_tensors(self) -> tuple[list[int], list[int]]:
        sizes = [self._shard(p) * p.stored for u in self.units.values() for p in u.params if p.trainable]
        return _optimizer(self.w.optimizer, sizes, _sharded_states(model_states(self.spec, self.w), self.n))

    def optimizer_step(self, st: _Stream, step: int) -> None:
        _optimizer_step(st, *self.optimizer_tensors(), step)


class ZeroRank(_WholeModelHooks):
    """The :class:`~vramplan.alloc_stream.RankHooks` of one rank of DeepSpeed ZeRO-1/2 (runtime/zero/stage_1_and_2.py,
    read in DeepSpeed 0.19.6), the last rank of the data-parallel group: its partition holds the head and the last
    layers, whose gradients backward makes first.

    * build: the engine casts the module to bf16/fp16 and moves it to the device parameter by parameter; the
      optimizer flattens the trainable parameters into one aligned buffer (``flatten_dense_tensors_aligned``, on the
      device when it fits) that they become views of; the fp32 master partition is a clone of this rank's slice
      (``.clone().to(fp32)``); ``initialize_optimizer_states`` sets a zero fp32 gradient partition and drops it;
    * backward: the first gradient hook allocates the reduce bucket (``setup_buckets``: ``reduce_bucket_size``
      elements, a second one with ``overlap_comm``); ZeRO-2 copies each gradient into the bucket as autograd makes it
      (the gradient dies; one larger than the bucket is reduced by itself and dies at that bucket's reduction), and a
      full bucket is reduced into the contiguous gradient partition (``grads_in_partition``, allocated at the first
      reduction, on the reduction stream with ``overlap_comm``); ZeRO-1 keeps autograd's gradients to the end of
      backward and then runs the same buckets over them in parameter order (``reduce_gradients``); the epilogue frees
      the buckets (``_release_ipg_buffers``);
    * step: the partition's gradients flattened (a copy), then converted to fp32 (``single_grad_partition``), the
      16-bit gradients released, the optimizer's step over the fp32 partition (states created in the first step),
      the fp32 gradient released; the updated weights are all-gathered in place.
    """

    per_param_grads = True

    def __init__(self, spec: ModelSpec, w: Workload, wc: Workload, layout: Layout) -> None:
        self.stage = layout.zero
        self.n = max(1, layout.shard_degree)
        self.elem = wc.precision.param_bytes  # the engine's module dtype
        units = _units(spec, wc, wc)
        self.params = [p for u in [ROOT, *range(spec.num_layers)] for p in units[u].params]  # embedding first
        trained = sum(p.numel for p in self.params if p.trainable)
        align = 2 * self.n  # nccl_start_alignment_factor x world size
        self.flat = -(-trained // align) * align
        self.partition = self.flat // self.n
        # the last rank's partition: the parameters that reach into its slice count whole (params_in_partition)
        start, off, held = (self.n - 1) * self.partition, 0, 0
        for p in self.params:
            if p.trainable:
                if off + p.numel > start:
                    held += p.numel
                off += p.numel
        self.held = held
        self.trained = trained
        reduce_bucket, _, _ = zero_auto_buckets(spec.hidden_size)
        self.bucket = layout.reduce_bucket_size or reduce_bucket
        self.overlap = layout.overlap_comm if layout.overlap_comm is not None else self.stage == 3
        self.stream: dict[int, int] = {}
        self.buffers: list[int] = []
        self.elements = 0
        self.extra: list[int] = []
        self.pending: list[tuple[int, int]] = []
        self.gip: list[int] = []
        self.w, self.spec = w, spec

    def build(self, st: _Stream) -> None:
        keys = []
        for j, p in enumerate(self.params):
            keys.append(st.key(("zero_param", j)))
            st.alloc(keys[-1], p.numel * self.elem)
        if not self.trained:
            return
        st.ev.append((None, A.EMPTY))  # empty_cache() before flattening (stage_1_and_2.py __init__)
        st.alloc(st.key("zero_flat"), self.flat * self.elem)
        for k, p in zip(keys, self.params, strict=True):
            if p.trainable:
                st.free(k)
        clone = self._key(st, COMPUTE)
        if self.elem != 4:
            st.alloc(clone, self.partition * self.elem)
        st.alloc(st.key("zero_fp32_partition"), self.partition * 4)
        st.free(clone)
        zeros = self._key(st, COMPUTE)
        st.alloc(zeros, self.partition * 4)
        st.free(zeros)

    def _setup(self, st: _Stream) -> None:
        if not self.buffers:
            for _ in range(2 if self.overlap else 1):
                self.buffers.append(self._key(st, COMPUTE))
                st.alloc(self.buffers[-1], self.bucket * self.elem)

    def _reduce(self, st: _Stream) -> None:
        if self.elements and len(self.gip) < self.micro:  # the first reduction allocates the gradient partition
            self.gip.append(self._key(st, REDUCE_SCATTER if self.overlap else COMPUTE))
            st.alloc(self.gip[-1], self.held * self.elem)
        for k in self.extra:
            st.free(k)
        self.extra.clear()
        self.elements = 0

    def _take(self, st: _Stream, key: int, nbytes: int) -> None:
        numel = max(1, nbytes // self.elem)
        if self.elements + numel > self.bucket:
            self._reduce(st)
        if numel > self.bucket:
            self.extra.append(key)  # reduced by itself, from where autograd made it
        else:
            st.free(key)  # copied into the bucket
        self.elements += numel

    micro = 1

    def grad_ready(self, st: _Stream, key: int, nbytes: int) -> None:
        self._setup(st)
        if self.stage == 2:
            self._take(st, key, nbytes)
        else:
            self.pending.append((key, nbytes))

    def post_backward(self, st: _Stream, unit: int, grads: list[int], accumulate: bool) -> None:
        if unit != ROOT:
            return
        if accumulate:
            self.micro = 2
        for key, nbytes in reversed(self.pending):  # ZeRO-1: every gradient, in parameter order
            self._take(st, key, nbytes)
        self.pending.clear()
        self._reduce(st)
        for k in self.buffers:
            st.free(k)
        self.buffers.clear()
        if accumulate and len(self.gip) > 1:  # this micro-batch's partition added into the earlier one's
            st.free(self.gip.pop())

    def optimizer_step(self, st: _Stream, step: int) -> None:
        if not self.trained:
            return
        flat = self._key(st, COMPUTE)
        st.alloc(flat, self.partition * self.elem)
        fp32 = self._key(st, COMPUTE)
        st.alloc(fp32, self.partition * 4)
        st.free(flat)
        for k in self.gip:
            st.free(k)
        self.gip.clear()
        self.micro = 1
        states = model_states(self.spec, self.w.with_(precision=Precision.FP32), flat=True)
        _optimizer_step(st, *_optimizer(self.w.optimizer, [self.partition * 4], _sharded_states(states, self.n)), step)
        st.free(fp32)


class Zero3Rank(_StreamKeys):
    """The :class:`~vramplan.alloc_stream.RankHooks` of one rank of DeepSpeed ZeRO-3 (runtime/zero/stage3.py,
    partition_parameters.py, partitioned_param_coordinator.py; DeepSpeed 0.19.6), with the bucket sizes transformers
    fills in for ``"auto"`` (reduce bucket hidden², prefetch bucket 0.9·hidden², persistence threshold 10·hidden) and
    DeepSpeed's defaults for the rest (``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` 1e9,
    ``sub_group_size`` 1e9, ``overlap_comm`` and ``contiguous_gradients`` on):

    * build: ``zero.Init`` partitions every parameter as its module is built (the whole tensor, then its
      ``ceil(numel / n)`` partition); parameters up to the persistence threshold (norms, biases) are gathered once and
      kept; the optimizer copies the trained partitions into one contiguous buffer (``defragment``), makes an fp32
      partition per sub-group, creates the optimizer states at once over a zero fp32 gradient buffer
      (``_initialize_optimizer_states``), and allocates the reduce bucket and the flat gradient partition buffer
      (``grad_partitions_flat_buffer``);
    * forward and backward: parameters are all-gathered module by module on the all-gather stream and released after
      the module ran; at any moment a layer holds its module and the prefetch bucket's worth of the modules after it
      (the largest such window over the layer is what it holds while its activations live). Once the first step has
      traced the module order, a parameter used again within ``max_reuse_distance`` gathered elements is not released
      (``__params_to_release``): the head from forward into backward, and on small models the last layers;
    * gradients: each one is copied into the reduce bucket as autograd makes it (one larger than the bucket stays
      where it is until its bucket is reduced); a full bucket is reduce-scattered on the reduction stream (a flat
      copy and the rank's output) into the flat gradient partition;
    * step, per sub-group: the 16-bit gradient partition converted to fp32 (``_prepare_fp32_grad_for_sub_group``),
      the optimizer's step, the fp32 gradient released.
    """

    per_param_grads = True

    def __init__(self, spec: ModelSpec, w: Workload, wc: Workload, layout: Layout) -> None:
        self.n = max(1, layout.shard_degree)
        self.elem = wc.precision.param_bytes
        units = _units(spec, wc, wc)
        self.units = units
        self.layers = spec.num_layers
        run = _run_layers(spec)
        self.first, self.last = (run[0], run[-1]) if run else (-1, -1)
        self.after = {k: nxt for nxt, k in _unit_before(spec).items() if nxt != ROOT}  # the next layer that runs
        reduce_bucket, prefetch, persist = zero_auto_buckets(spec.hidden_size)
        self.bucket = layout.reduce_bucket_size or reduce_bucket
        self.prefetch, self.persist = prefetch, persist
        self.max_live = self.reuse = 10**9
        self.sub_group = 10**9
        self.stream: dict[int, int] = {}
        self.held: dict[object, int] = {}  # gathered parameters by what holds them ("embed", "head", a layer)
        self.elements = 0
        self.extra: list[int] = []
        self.traced = False
        self.w, self.spec = w, spec
        trained = [p for u in [ROOT, *range(spec.num_layers)] for p in units[u].params if p.trainable]
        self.part = [-(-p.numel // self.n) for p in trained]
        # sub-groups of at most sub_group_size elements (stage3.py _create_fp16_sub_groups), as partition sizes
        self.groups: list[int] = []
        size = full = 0
        for p, part in zip(trained, self.part, strict=True):
            if full and full + p.numel > self.sub_group:
                self.groups.append(size)
                size = full = 0
            size += part
            full += p.numel
        if size:
            self.groups.append(size)
        # the order modules run in, forward then backward, for the reuse distance: (holder, numel)
        self.window = {k: self._window(k) for k in range(spec.num_layers)}
        self.retained = self._retained()

    # ---- sizes -----------------------------------------------------------------------------------------
    def _gathered(self, p: _Param) -> bool:
        return p.numel > self.persist

    def _layer_numel(self, k: int) -> int:
        return sum(p.numel for p in self.units[k].params if self._gathered(p))

    def _root_numel(self, group: str) -> int:
        return sum(p.numel for p in self.units[ROOT].params if p.group == group and self._gathered(p))

    def _window(self, k: int) -> int:
        """The most elements layer ``k`` holds gathered at once: a module and the prefetch bucket's worth of the
        modules after it (the prefetch stops once it holds at least the bucket)."""
        mods = [p.numel for p in self.units[k].params if self._gathered(p)]
        nxt = [p.numel for p in self.units[self.after[k]].params if self._gathered(p)] if k in self.after else \
            [p.numel for p in self.units[ROOT].params if p.group == "head" and self._gathered(p)]
        seq = mods + nxt
        best = 0
        for i in range(len(mods)):
            live, j = seq[i], i + 1
            ahead = 0
            while j < len(seq) and ahead < self.prefetch:
                ahead += seq[j]
                j += 1
            best = max(best, min(self.max_live, live + ahead))
        return best

    def _retained(self) -> set[object]:
        """What forward leaves gathered for backward (``__params_to_release``): a module whose parameters come again
        within ``max_reuse_distance`` elements of the module order after it. Forward ends with the head; backward
        runs the head, then the layers from the last."""
        head = self._root_numel("head")
        out: set[object] = {"head"} if head else set()
        after = head  # forward after layer k: the later layers and the head; then backward: the head, later layers
        for k in reversed(_run_layers(self.spec)):
            if after + head + (after - head) >= self.reuse:
                break
            out.add(k)
            after += self._layer_numel(k)
        return out

    def _gather(self, st: _Stream, holder: object, numel: int) -> None:
        if holder in self.held or numel <= 0:
            return
        k = self._key(st, COPY_IN)
        st.alloc(k, -(-numel // self.n) * self.n * self.elem)
        self.held[holder] = k

    def _release(self, st: _Stream, holder: object, keep: bool = False) -> None:
        if holder in self.held and not keep:
            st.free(self.held.pop(holder))

    # ---- RankHooks ---------------------------------------------------------------------------------------
    def build(self, st: _Stream) -> None:
        parts: list[tuple[int, _Param]] = []
        for u in [ROOT, *range(self.layers)]:
            for p in self.units[u].params:
                full = self._key(st, COMPUTE)
                st.alloc(full, p.numel * self.elem)
                part = st.key(("z3_part", len(parts)))
                st.alloc(part, -(-p.numel // self.n) * self.elem)
                st.free(full)
                parts.append((part, p))
        persistent = sum(p.numel for _, p in parts if not self._gathered(p))
        if persistent:  # gathered at their first use and kept (ds_persist)
            st.alloc(st.key("z3_persistent"), persistent * self.elem)
        if not self.part:
            return
        st.alloc(st.key("z3_lp_buffer"), sum(self.part) * self.elem)  # defragment()
        for k, p in parts:
            if p.trainable:
                st.free(k)
        for i, size in enumerate(self.groups):
            tmp = self._key(st, COMPUTE)
            st.alloc(tmp, size * 4)
            st.alloc(st.key(("z3_fp32", i)), size * 4)
            st.free(tmp)
        grad = self._key(st, COMPUTE)
        st.alloc(grad, max(self.groups) * 4)
        states = model_states(self.spec, self.w.with_(precision=Precision.FP32), flat=True)
        opt, tmps = _optimizer(self.w.optimizer, [g * 4 for g in self.groups], _sharded_states(states, self.n))
        _optimizer_step(st, opt, tmps, 0)  # the states exist from here on
        st.free(grad)
        st.alloc(st.key("z3_bucket"), self.bucket * self.elem)
        st.alloc(st.key("z3_grad_partitions"), sum(self.part) * self.elem)

    def pre_forward(self, st: _Stream, unit: int) -> None:
        if unit == ROOT:
            self._gather(st, "embed", self._root_numel("embed"))
            return
        if unit == self.first:
            self._release(st, "embed")
        self._gather(st, unit, self.window[unit])

    def post_forward(self, st: _Stream, unit: int) -> None:
        if unit == ROOT:
            self._release(st, "head", keep=self.traced and "head" in self.retained)
            return
        if self.traced and unit in self.retained:  # every module of the layer ran and stays gathered
            self._release(st, unit)
            self._gather(st, unit, self._layer_numel(unit))
        else:
            self._release(st, unit)
        if unit == self.last:
            self._gather(st, "head", self._root_numel("head"))

    def pre_backward(self, st: _Stream, unit: int) -> None:
        if unit == ROOT:
            self._gather(st, "head", self._root_numel("head"))
            return
        if unit == self.last:
            self._release(st, "head")
        self._gather(st, unit, self.window[unit])

    def grad_ready(self, st: _Stream, key: int, nbytes: int) -> None:
        numel = max(1, nbytes // self.elem)
        if self.elements and self.elements + numel > self.bucket:
            self._reduce(st)
        if self.elements + numel <= self.bucket:
            st.free(key)  # copied into the bucket
        else:
            self.extra.append(key)
        self.elements += numel

    def _reduce(self, st: _Stream) -> None:
        if not self.elements:
            return
        flat = self._key(st, REDUCE_SCATTER)
        st.alloc(flat, self.elements * self.elem)
        out = self._key(st, REDUCE_SCATTER)
        st.alloc(out, -(-self.elements // self.n) * self.elem)
        st.free(flat)
        st.free(out)  # copied into the flat gradient partition
        for k in self.extra:
            st.free(k)
        self.extra.clear()
        self.elements = 0

    def post_backward(self, st: _Stream, unit: int, grads: list[int], accumulate: bool) -> None:
        if unit == ROOT:
            self._reduce(st)  # the epilogue
            self._release(st, "embed")
            for holder in list(self.held):
                self._release(st, holder)
            self.traced = True  # the first iteration recorded the module order
            return
        self._release(st, unit)
        if unit == self.first:  # the embedding's backward fetches its weight
            self._gather(st, "embed", self._root_numel("embed"))

    def optimizer_step(self, st: _Stream, step: int) -> None:
        states = model_states(self.spec, self.w.with_(precision=Precision.FP32), flat=True)
        for size in self.groups:
            fp32 = self._key(st, COMPUTE)
            st.alloc(fp32, size * 4)
            _, tmps = _optimizer(self.w.optimizer, [size * 4], _sharded_states(states, self.n))
            _optimizer_step(st, [], tmps, 1)
            st.free(fp32)


class MegatronRank(_WholeModelHooks):
    """The :class:`~vramplan.alloc_stream.RankHooks` of one tensor-parallel rank as Megatron-LM runs it with bf16/fp16
    (megatron/core/distributed/param_and_grad_buffer.py, megatron/core/optimizer/optimizer.py
    ``Float16OptimizerWithFloat16Params``): the stream is the single-GPU programs of the rank's shard of every layer
    (column- and row-parallel linears, vocab-parallel embedding and head; the all-reduces work in place on the layer's
    output); the module's 16-bit parameters, then one contiguous fp32 ``main_grad`` buffer for every trained
    parameter (``grad_data``, allocated once and zeroed in place); the optimizer's fp32 master copy of each parameter
    (``param.detach().clone().float()``); each 16-bit gradient autograd makes is added into ``main_grad`` and dropped
    by the parameter's backward hook; the step runs on the master copies with ``main_grad`` as their gradients (no
    copy: it is already fp32), its states created in the first step. Without AMP the workload's own precision, as
    the estimator's ``megatron_states`` takes it: the parameters train as a single GPU's would (gradients where
    autograd makes them, freed by ``zero_grad``)."""

    per_param_grads = True

    def __init__(self, spec: ModelSpec, w: Workload, wc: Workload, layout: Layout) -> None:
        self.elem = wc.precision.param_bytes
        self.mixed = w.precision.is_amp
        units = _units(spec, wc, wc)
        self.params = [p for u in [ROOT, *range(spec.num_layers)] for p in units[u].params]
        self.trained = [p for p in self.params if p.trainable]
        self.stream: dict[int, int] = {}
        self.w, self.spec = w, spec

    def build(self, st: _Stream) -> None:
        for j, p in enumerate(self.params):
            st.alloc(st.key(("tp_param", j)), p.numel * self.elem)
        if not self.trained or not self.mixed:
            return
        st.alloc(st.key("tp_main_grad"), sum(p.numel for p in self.trained) * 4)
        for j, p in enumerate(self.trained):
            clone = st.fresh(0)
            st.alloc(clone, p.numel * self.elem)
            st.alloc(st.key(("tp_master", j)), p.numel * 4)
            st.free(clone)

    def grad_ready(self, st: _Stream, key: int, nbytes: int) -> None:
        if self.mixed:
            st.free(key)  # added into main_grad by the parameter's backward hook

    def post_backward(self, st: _Stream, unit: int, grads: list[int], accumulate: bool) -> None:
        pass

    def optimizer_step(self, st: _Stream, step: int) -> None:
        elem = 4 if self.mixed else self.elem
        states = model_states(self.spec, self.w.with_(precision=Precision.FP32) if self.mixed else self.w, flat=True)
        _optimizer_step(st, *_optimizer(self.w.optimizer, [p.numel * elem for p in self.trained], states), step)


def _sharded_states(s: ModelStates, n: int) -> ModelStates:
    from dataclasses import replace

    return replace(s, optimizer_state=-(-s.optimizer_state // n), step_temporaries=-(-s.step_temporaries // n))


# ---- replay ---------------------------------------------------------------------------------------------------------
def _allocated_peak(events: list[tuple[object, int]], conf: AllocConf) -> int:
    """``max_memory_allocated`` of a stream after its last reset: the blocks' rounded sizes, whatever the stream."""
    live: dict[object, int] = {}
    cur = peak = 0
    for key, n in events:
        if n >= 0:
            size = round_size(n, conf) if n else 0
            live[key] = size
            cur += size
            peak = max(peak, cur)
        elif n == A.FREE:
            cur -= live.pop(key, 0)
        elif n == A.RESET:
            peak = cur
    return peak


def _split(events: list[tuple[object, int]], stream: dict[int, int], count: int) -> list[list[tuple[object, int]]]:
    out: list[list[tuple[object, int]]] = [[] for _ in range(count)]
    for ev in events:
        key, n = ev
        if n >= 0 or n == A.FREE:
            out[stream.get(key, COMPUTE) if isinstance(key, int) else COMPUTE].append(ev)
        else:  # phase, reset, probe and empty-cache markers apply to every stream
            for sub in out:
                sub.append(ev)
    return out


def replays(layout: Layout, w: Workload) -> bool:
    """Whether :func:`rank_replay` models ``layout`` for ``w`` (else the estimate keeps the calibration slack)."""
    sharded = (layout.engine is Engine.FSDP or layout.zero in (1, 2, 3)) and layout.tp == 1
    tensor = layout.engine is Engine.MEGATRON and layout.tp > 1 and not layout.sequence_parallel
    return ((sharded or tensor) and layout.pp == 1 and layout.ep == 1 and layout.offload is Offload.NONE and
            w.is_train and w.base_quant is WeightsQuant.NONE and w.method is not Method.QLORA and
            not w.activation_offload)


@lru_cache(maxsize=256)
def rank_replay(spec: ModelSpec, w: Workload, wc: Workload, layout: Layout) -> RankReplay:
    """One rank of ``layout`` (see :func:`replays`) over the calibration loop's 3 steps, the last one measured.
    ``w`` is the workload as asked, ``wc`` as the GPU computes it (``parallel.sharding._compute_workload``)."""
    hooks: FsdpRank | ZeroRank | Zero3Rank | MegatronRank
    if layout.engine is Engine.MEGATRON:  # the rank's shard of every layer (parallel/sharding.py)
        spec = _tp_shard(spec, layout.tp, layout.ep)
    wc = runs_as(spec, wc)
    if layout.engine is Engine.FSDP:
        hooks = FsdpRank(spec, w, wc, layout)
    elif layout.engine is Engine.MEGATRON:
        hooks = MegatronRank(spec, w, wc, layout)
    else:
        hooks = Zero3Rank(spec, w, wc, layout) if layout.zero == 3 else ZeroRank(spec, w, wc, layout)
    states = model_states(spec, wc)
    events = train_events(spec, wc, states, numerics(wc), 3, hooks=hooks)
    conf = parse_alloc_conf(w.alloc_conf)
    parts = _split(events, hooks.stream, 3)
    reserved = tuple(simulate(p, conf).peak_reserved_bytes if any(n >= 0 for _, n in p) else 0 for p in parts)
    return RankReplay(_allocated_peak(events, conf), sum(reserved), reserved, layout.engine.value)
