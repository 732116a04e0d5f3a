"""A model of PyTorch's CUDA caching allocator: what it *reserves* for a sequence of allocations and frees.

``torch.cuda.max_memory_allocated`` is the sum of live blocks; a run goes out of memory when the
allocator cannot reserve a new segment, and ``max_memory_reserved`` (plus the CUDA context) is what
nvidia-smi shows. This module replays an ordered stream of ``malloc(size)`` / ``free`` events through
the rules of ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x, the ``Native`` backend):

* every request is rounded up to 512 bytes (``round_size``; with ``roundup_power2_divisions`` to the
  next power-of-two division, ``roundup_power2_next_division``);
* requests of at most 1 MiB (``kSmallSize``) come from the small pool, whose segments are 2 MiB
  (``kSmallBuffer``); larger requests from the large pool, whose new segments are 20 MiB
  (``kLargeBuffer``) below 10 MiB (``kMinLargeAlloc``) and the request rounded up to 2 MiB
  (``kRoundLarge``) above (``get_allocation_size``);
* a request takes the smallest cached free block of its pool that fits, lowest address on ties
  (``get_free_block``: ``lower_bound`` in a set ordered by (size, address)); with ``max_split_size_mb``
  a block of at least that size is not used for a smaller request, and a request of at least that size
  takes a cached block only if it is less than 20 MiB larger;
* the block is split when the remainder is at least 512 bytes (small pool) or more than 1 MiB and the
  request is below ``max_split_size`` (large pool) (``should_split``);
* a freed block merges with free neighbours of its segment (``free_block``/``try_merge_blocks``) and
  stays cached: segments are returned to the driver only by ``empty_cache`` or an out-of-memory retry;
* ``expandable_segments:True``: one segment per pool that grows by mapping 2 MiB (small pool) or 20 MiB
  (large pool) pages at its end (``ExpandableSegment``, ``try_allocate_expandable_block``); any remainder
  of at least 512 bytes is split off.

One stream (the default stream, which autograd's backward also uses), an unlimited device (no
out-of-memory retries) and no CUDA graph pools are assumed.
"""

from __future__ import annotations

import bisect
import gc
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import WorkloadError
from .result import ReservedPhase

__all__ = ["DEFAULT_CONF", "EMPTY", "FREE", "PHASE", "PROBE", "RESET", "AllocConf", "AllocStats", "parse_alloc_conf",
           "round_size", "simulate"]

MiB = 1 << 20
K_MIN_BLOCK = 512  # kMinBlockSize
K_SMALL_SIZE = MiB  # kSmallSize
K_SMALL_BUFFER = 2 * MiB  # kSmallBuffer
K_LARGE_BUFFER = 20 * MiB  # kLargeBuffer
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
K_ROUND_LARGE = 2 * MiB  # kRoundLarge
_NO_LIMIT = (1 << 64) - 1  # max_split_size default: SIZE_MAX
_INTERVALS = 17  # roundup_power2_divisions intervals: 1 MiB .. 64 GiB by powers of two


@dataclass(frozen=True, slots=True)
class AllocConf:
    """The allocator settings of ``PYTORCH_CUDA_ALLOC_CONF`` that change what is reserved."""

    max_split_size: int = _NO_LIMIT
    roundup_power2_divisions: tuple[int, ...] = (0,) * _INTERVALS
    expandable_segments: bool = False
    text: str = field(default="", compare=False)

    def divisions(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the setting of the power-of-two interval of ``size``
        (c10/core/AllocatorConfig.h: intervals start at 1 MiB, the last one holds everything above 32 GiB)."""
        log_size = size.bit_length() - 1
        index = max(0, log_size - 20)
        return self.roundup_power2_divisions[min(index, _INTERVALS - 1)]


DEFAULT_CONF = AllocConf()


@lru_cache(maxsize=256)
def parse_alloc_conf(text: str | None) -> AllocConf:
    """Parse a ``PYTORCH_CUDA_ALLOC_CONF`` string, e.g. ``expandable_segments:True,max_split_size_mb:128``.

    Options that do not change what one process reserves on one stream (``garbage_collection_threshold``,
    which acts only under a memory fraction, ``release_lock_on_cudamalloc``, ``pinned_*``, ``backend``)
    are accepted and ignored; anything else is an error, as in PyTorch.
    """
    if not text or not text.strip():
        return DEFAULT_CONF
    max_split = _NO_LIMIT
    divs = [0] * _INTERVALS
    expandable = False
    ignored = {"garbage_collection_threshold", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
               "pinned_num_register_threads", "pinned_use_background_threads", "backend",
               "graph_capture_record_stream_reuse", "per_process_memory_fraction"}
    # split on commas outside brackets (roundup_power2_divisions:[256:1,512:2,>:4])
    items: list[str] = []
    depth, cur = 0, ""
    for ch in text.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise WorkloadError(f"allocator setting '{item}' needs key:value (e.g. expandable_segments:True)")
        if key == "max_split_size_mb":
            mb = _int(key, value)
            if mb * MiB <= K_LARGE_BUFFER:
                raise WorkloadError(f"max_split_size_mb must be larger than {K_LARGE_BUFFER // MiB}, got {mb}")
            max_split = mb * MiB
        elif key == "roundup_power2_divisions":
            divs = _parse_divisions(value)
        elif key == "expandable_segments":
            if value not in ("True", "False"):
                raise WorkloadError(f"expandable_segments takes True or False, got '{value}'")
            expandable = value == "True"
        elif key in ignored:
            continue
        else:
            raise WorkloadError(f"unknown allocator setting '{key}'; known: max_split_size_mb, "
                                "roundup_power2_divisions, expandable_segments, garbage_collection_threshold")
    return AllocConf(max_split, tuple(divs), expandable, text.strip())


def _int(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise WorkloadError(f"{key} takes a whole number, got '{value}'") from None
    if n < 0:
        raise WorkloadError(f"{key} must not be negative, got {n}")
    return n


def _check_div(n: int) -> int:
    if n & (n - 1):
        raise WorkloadError(f"roundup_power2_divisions must be 0 or a power of two, got {n}")
    return n


def _parse_divisions(value: str) -> list[int]:
    """``N`` for every size, or ``[256:1,512:2,>:4]``: up to 256 MiB 1 division, up to 512 MiB 2, above 4
    (c10/core/AllocatorConfig.cpp ``parseRoundUpPower2Divisions``)."""
    if not value.startswith("["):
        return [_check_div(_int("roundup_power2_divisions", value))] * _INTERVALS
    if not value.endswith("]"):
        raise WorkloadError(f"roundup_power2_divisions list must end with ']': '{value}'")
    divs = [0] * _INTERVALS
    last = 0
    for part in value[1:-1].split(","):
        k, sep, v = part.partition(":")
        k, v = k.strip(), v.strip()
        if not sep:
            raise WorkloadError(f"roundup_power2_divisions entries are size_mb:divisions, got '{part}'")
        n = _check_div(_int("roundup_power2_divisions", v))
        if k == ">":
            for i in range(last, _INTERVALS):
                divs[i] = n
            last = _INTERVALS
            continue
        mb = _int("roundup_power2_divisions", k)
        if mb <= 0 or mb & (mb - 1):
            raise WorkloadError(f"roundup_power2_divisions sizes must be powers of two in MB, got '{k}'")
        idx = min(mb.bit_length() - 1, _INTERVALS - 1)
        for i in range(last, idx + 1):
            divs[i] = n
        last = idx + 1
    return divs


def round_size(size: int, conf: AllocConf = DEFAULT_CONF) -> int:
    """``round_size``: the block size a request of ``size`` bytes occupies."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    if conf is DEFAULT_CONF:
        return K_MIN_BLOCK * -(-size // K_MIN_BLOCK)
    divisions = conf.divisions(size)
    if divisions > 1 and size > K_MIN_BLOCK * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step
    return K_MIN_BLOCK * -(-size // K_MIN_BLOCK)


def block_bytes(nbytes: int) -> int:
    """Bytes ``torch.cuda.memory_allocated`` counts for one request of ``nbytes`` on a fresh segment: its
    rounded size, or the whole segment when the remainder is too small to split off (a large-pool
    request leaves at most ``kSmallSize`` over: ``should_split``). Parameter-sized tensors created once
    are accounted this way (SDXL's 25 MiB GEGLU projections take 26 MiB blocks)."""
    if nbytes <= 0:
        return 0
    n = round_size(nbytes)
    if n >= K_MIN_LARGE_ALLOC:
        seg = _allocation_size(n)
        if seg - n <= K_SMALL_SIZE:
            return seg
    return n


def _allocation_size(size: int) -> int:
    """``get_allocation_size``: the size of the segment a request that found no cached block creates."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-size // K_ROUND_LARGE)


class _Block:
    __slots__ = ("allocated", "next", "prev", "ptr", "size", "small")

    def __init__(self, ptr: int, size: int, small: bool) -> None:
        self.ptr = ptr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Pool:
    """Cached free blocks ordered by (size, address), as ``BlockPool::blocks``: one sorted list of
    ``size << 56 | offset`` integers (addresses are offsets below 2**56 from one base)."""

    __slots__ = ("blocks", "keys")

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.blocks: dict[int, _Block] = {}

    def insert(self, b: _Block) -> None:
        k = b.size << 56 | b.ptr
        bisect.insort(self.keys, k)
        self.blocks[k] = b

    def remove(self, b: _Block) -> None:
        k = b.size << 56 | b.ptr
        del self.keys[bisect.bisect_left(self.keys, k)]
        del self.blocks[k]


@dataclass(frozen=True, slots=True)
class AllocStats:
    """Result of a replay: peaks as ``max_memory_allocated`` / ``max_memory_reserved`` report them
    (allocated counts whole blocks, i.e. rounded sizes), after the last ``reset_peak`` marker."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    segments: int
    phases: tuple[ReservedPhase, ...] = field(default=())
    reserved_at_reset: int = 0  # what was reserved at the last reset marker (0 without one)


class _Allocator:
    def __init__(self, conf: AllocConf) -> None:
        self.conf = conf
        self.small = _Pool()
        self.large = _Pool()
        self.live: dict[object, _Block] = {}
        self.allocated = 0
        self.reserved = 0
        self.segments = 0
        self._next_ptr = 0
        self._plain_rounding = not any(conf.roundup_power2_divisions)
        # expandable segments: the mapped end (bytes) and the tail block of each pool's one segment
        self._es_end = {True: 0, False: 0}
        self._es_base = {True: 1 << 53, False: 1 << 54}
        self._es_tail: dict[bool, _Block | None] = {True: None, False: None}

    # ---- malloc ---------------------------------------------------------------------------------
    def malloc(self, key: object, orig: int) -> None:
        conf = self.conf
        if self._plain_rounding:
            size = (orig + 511) & ~511 if orig > K_MIN_BLOCK else K_MIN_BLOCK
        else:
            size = round_size(orig, conf)
        small = size <= K_SMALL_SIZE
        pool = self.small if small else self.large
        block = self._get_free_block(pool, size, small)
        if block is None:
            block = self._alloc_block(pool, size, small)
        else:
            pool.remove(block)
        remaining = block.size - size
        if small or conf.expandable_segments:
            split = remaining >= K_MIN_BLOCK
        else:
            split = size < conf.max_split_size and remaining > K_SMALL_SIZE
        if split:
            rest = _Block(block.ptr + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.insert(rest)
            if self._es_tail[small] is block:
                self._es_tail[small] = rest
        block.allocated = True
        self.live[key] = block
        self.allocated += block.size

    def _get_free_block(self, pool: _Pool, size: int, small: bool) -> _Block | None:
        keys = pool.keys
        i = bisect.bisect_left(keys, size << 56)
        if i == len(keys):
            return None
        b = pool.blocks[keys[i]]
        if self.conf.expandable_segments and b is self._es_tail[small] and i + 1 < len(keys):
            # the tail of an expandable segment counts as large as it can grow: any other fitting block first
            b = pool.blocks[keys[i + 1]]
        ms = self.conf.max_split_size
        if size < ms <= b.size:
            return None
        if size >= ms and b.size >= size + K_LARGE_BUFFER:
            return None
        return b

    def _alloc_block(self, pool: _Pool, size: int, small: bool) -> _Block:
        if self.conf.expandable_segments:
            return self._expand(pool, size, small)
        seg = _allocation_size(size)
        b = _Block(self._next_ptr, seg, small)
        self._next_ptr += seg + K_SMALL_BUFFER  # distinct, increasing addresses
        self.reserved += seg
        self.segments += 1
        return b

    def _expand(self, pool: _Pool, size: int, small: bool) -> _Block:
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        tail = self._es_tail[small]
        have = 0
        if tail is not None and not tail.allocated:
            have = tail.size
            pool.remove(tail)
        grow = page * -(-(size - have) // page)
        end = self._es_end[small]
        self._es_end[small] = end + grow
        self.reserved += grow
        if end == 0:
            self.segments += 1
        if have:
            assert tail is not None
            tail.size += grow
            return tail
        b = _Block(self._es_base[small] + end, grow, small)
        if tail is not None:
            tail.next, b.prev = b, tail
        self._es_tail[small] = b
        return b

    # ---- empty_cache ----------------------------------------------------------------------------
    def empty_cache(self) -> None:
        for small, pool in ((True, self.small), (False, self.large)):
            for k in list(pool.keys):
                b = pool.blocks[k]
                if b.prev is None and b.next is None and b is not self._es_tail[small]:
                    pool.remove(b)
                    self.reserved -= b.size
                    self.segments -= 1
            tail = self._es_tail[small]
            if tail is not None and not tail.allocated and self.conf.expandable_segments:
                # unmap the free pages at the end of the growable segment
                pool.remove(tail)
                self.reserved -= tail.size
                self._es_end[small] -= tail.size
                p = tail.prev
                if p is not None:
                    p.next = None
                self._es_tail[small] = p
                if p is None:
                    self.segments -= 1

    # ---- free -----------------------------------------------------------------------------------
    def free(self, key: object) -> None:
        b = self.live.pop(key)
        b.allocated = False
        self.allocated -= b.size
        pool = self.small if b.small else self.large
        tail = self._es_tail[b.small]
        p = b.prev
        if p is not None and not p.allocated:
            pool.remove(p)
            b.ptr = p.ptr
            b.size += p.size
            b.prev = p.prev
            if p.prev is not None:
                p.prev.next = b
        n = b.next
        if n is not None and not n.allocated:
            pool.remove(n)
            b.size += n.size
            b.next = n.next
            if n.next is not None:
                n.next.prev = b
            if n is tail:
                self._es_tail[b.small] = b
        pool.insert(b)


# Event stream: (key, nbytes) allocates nbytes under key; (key, FREE) frees the block of key;
# (name, PHASE) starts a phase named name; (None, RESET) resets the peaks (torch.cuda.reset_peak_memory_stats).
# (None, PROBE) appends what is reserved to simulate's ``probe`` list (a stream generator can read it back).
# (None, EMPTY) is torch.cuda.empty_cache(): every cached segment that is wholly free goes back to the driver
# (``release_cached_blocks`` -> ``release_blocks``: blocks that are not split; expandable segments unmap their free
# pages, modelled as returning the free tail).
FREE = -1
PHASE = -2
RESET = -3
PROBE = -4
EMPTY = -6


def simulate(events: Iterable[tuple[object, int]], conf: AllocConf = DEFAULT_CONF,
             probe: list[int] | None = None, *, reference: bool = False) -> AllocStats:
    """Replay ``events`` (see ``FREE``/``PHASE``/``RESET``/``PROBE``) and return the peaks after the last reset.
    ``reference``: through the block-object model (:class:`_Allocator`) even where the one-loop replay
    (:func:`_simulate_segments`) applies; the tests compare the two.

    Python's cyclic garbage collector is paused while the events are replayed (and, for a lazy stream, made): the
    replay allocates a block per segment and split, the stream a tuple per event, and the collector's passes over
    them find nothing to free (the blocks link each other, but stay reachable until the replay returns), ~7% of a
    replay's time. Reference counting frees as before; the collector resumes (if it ran before) on return."""
    if not gc.isenabled():
        return _simulate(events, conf, probe, reference)
    gc.disable()
    try:
        return _simulate(events, conf, probe, reference)
    finally:
        gc.enable()


def _simulate(events: Iterable[tuple[object, int]], conf: AllocConf, probe: list[int] | None,
              reference: bool) -> AllocStats:
    probe = [] if probe is None else probe
    if not reference and not conf.expandable_segments and not any(conf.roundup_power2_divisions) and \
            conf.max_split_size > K_SMALL_BUFFER:  # (a smaller one, refused by parse_alloc_conf, limits small blocks)
        return _simulate_segments(events, conf.max_split_size, probe)
    a = _Allocator(conf)
    peak_alloc = peak_res = at_reset = 0
    phases: dict[str, list[int]] = {}
    cur: list[int] | None = None
    malloc, free = a.malloc, a.free
    for key, n in events:
        if n >= 0:
            malloc(key, n)
            if a.allocated > peak_alloc:
                peak_alloc = a.allocated
            if a.reserved > peak_res:
                peak_res = a.reserved
            if cur is not None:
                if a.allocated > cur[0]:
                    cur[0] = a.allocated
                if a.reserved > cur[1]:
                    cur[1] = a.reserved
        elif n == FREE:
            free(key)
        elif n == PHASE:
            cur = phases.setdefault(str(key), [a.allocated, a.reserved])
        elif n == RESET:
            peak_alloc, peak_res = a.allocated, a.reserved
            at_reset = a.reserved
            phases = {k: [0, 0] for k in phases}
        elif n == PROBE:
            probe.append(a.reserved)
        elif n == EMPTY:
            a.empty_cache()
    return AllocStats(peak_alloc, peak_res, a.segments,
                      tuple(ReservedPhase(k, v[0], v[1]) for k, v in phases.items() if v[1]), at_reset)


def _simulate_segments(events: Iterable[tuple[object, int]], max_split: int, probe: list[int]) -> AllocStats:
    """:func:`simulate` for fixed segments and 512-byte rounding, in one loop (the estimator's hot path).

    The same rules as :class:`_Allocator`; a block is a list ``[ptr, size, small, allocated, prev, next, key]``
    (``key``: its ``size << 56 | ptr`` while it is cached) and each pool a sorted list of those keys; one dict
    maps the keys of both pools to their blocks (addresses are distinct). The large and the small pool have a
    loop branch each (``max_split`` is above the small pool's segment size, so it limits the large pool alone).
    The per-phase peaks are not updated at every malloc: the highest ``allocated`` since the
    last marker is kept (``top``) and folded into the phase's record and the peak at the next marker (phase, reset,
    probe, empty_cache) and at the end; what is reserved only grows between two markers, so its value there is
    the highest any malloc since the last one saw."""
    bisect_left, insort = bisect.bisect_left, bisect.insort
    small_size, min_block, small_buffer = K_SMALL_SIZE, K_MIN_BLOCK, K_SMALL_BUFFER
    large_buffer, min_large, round_large = K_LARGE_BUFFER, K_MIN_LARGE_ALLOC, K_ROUND_LARGE
    limited = max_split != _NO_LIMIT
    keys_s: list[int] = []
    keys_l: list[int] = []
    blks: dict[int, list[Any]] = {}
    live: dict[object, list[Any]] = {}
    live_pop = live.pop
    allocated = reserved = segments = next_ptr = 0
    peak_alloc = peak_res = at_reset = 0
    top = 0  # the largest `allocated` after a malloc since the last marker (0: no malloc since)
    phases: dict[str, list[int]] = {}
    cur: list[int] | None = None
    b: Any  # a block, or None while none is found
    for key, n in events:
        if n >= 0:
            if n > small_size:
                size = (n + 511) & ~511
                keys = keys_l
                i = bisect_left(keys, size << 56)
                if i < len(keys):
                    k = keys[i]
                    b = blks[k]
                    if limited and ((size < max_split <= b[1]) or (size >= max_split and b[1] >= size + large_buffer)):
                        b = None
                    else:
                        del keys[i]
                        del blks[k]
                else:
                    b = None
                if b is None:
                    seg = large_buffer if size < min_large else round_large * -(-size // round_large)
                    b = [next_ptr, seg, False, True, None, None, 0]
                    next_ptr += seg + small_buffer
                    reserved += seg
                    segments += 1
                    if reserved > peak_res:
                        peak_res = reserved
                else:
                    b[3] = True
                remaining = b[1] - size
                if remaining > small_size and size < max_split:
                    nxt = b[5]
                    p = b[0] + size
                    k = remaining << 56 | p
                    rest = [p, remaining, False, False, b, nxt, k]
                    if nxt is not None:
                        nxt[4] = rest
                    b[5] = rest
                    b[1] = size
                    insort(keys, k)
                    blks[k] = rest
            else:
                size = (n + 511) & ~511 if n > 512 else 512
                keys = keys_s
                i = bisect_left(keys, size << 56)
                if i < len(keys):
                    k = keys[i]
                    b = blks[k]
                    del keys[i]
                    del blks[k]
                    b[3] = True
                else:
                    b = [next_ptr, small_buffer, True, True, None, None, 0]
                    next_ptr += small_buffer + small_buffer
                    reserved += small_buffer
                    segments += 1
                    if reserved > peak_res:
                        peak_res = reserved
                remaining = b[1] - size
                if remaining >= min_block:
                    nxt = b[5]
                    p = b[0] + size
                    k = remaining << 56 | p
                    rest = [p, remaining, True, False, b, nxt, k]
                    if nxt is not None:
                        nxt[4] = rest
                    b[5] = rest
                    b[1] = size
                    insort(keys, k)
                    blks[k] = rest
            live[key] = b
            allocated += b[1]
            if allocated > top:
                top = allocated
        elif n == FREE:
            b = live_pop(key)
            b[3] = False
            size = b[1]
            allocated -= size
            keys = keys_s if b[2] else keys_l
            p = b[4]
            if p is not None and not p[3]:
                k = p[6]
                del keys[bisect_left(keys, k)]
                del blks[k]
                b[0] = p[0]
                size += p[1]
                pp = b[4] = p[4]
                if pp is not None:
                    pp[5] = b
            nx = b[5]
            if nx is not None and not nx[3]:
                k = nx[6]
                del keys[bisect_left(keys, k)]
                del blks[k]
                size += nx[1]
                nn = b[5] = nx[5]
                if nn is not None:
                    nn[4] = b
            b[1] = size
            k = b[6] = size << 56 | b[0]
            insort(keys, k)
            blks[k] = b
        else:
            # a marker: what the mallocs since the last one reached goes into the peaks first
            if top:
                if top > peak_alloc:
                    peak_alloc = top
                if cur is not None:
                    if top > cur[0]:
                        cur[0] = top
                    if reserved > cur[1]:
                        cur[1] = reserved
                top = 0
            if n == PHASE:
                cur = phases.setdefault(str(key), [allocated, reserved])
            elif n == RESET:
                peak_alloc, peak_res = allocated, reserved
                at_reset = reserved
                phases = {k2: [0, 0] for k2 in phases}
            elif n == PROBE:
                probe.append(reserved)
            elif n == EMPTY:
                for keys in (keys_s, keys_l):
                    for k in [k for k in keys if blks[k][4] is None and blks[k][5] is None]:
                        del keys[bisect_left(keys, k)]
                        reserved -= blks.pop(k)[1]
                        segments -= 1
    if top:
        if top > peak_alloc:
            peak_alloc = top
        if cur is not None:
            if top > cur[0]:
                cur[0] = top
            if reserved > cur[1]:
                cur[1] = reserved
    return AllocStats(peak_alloc, peak_res, segments,
                      tuple(ReservedPhase(k2, v[0], v[1]) for k2, v in phases.items() if v[1]), at_reset)


def sizes_stream(sizes: Sequence[int]) -> list[tuple[object, int]]:
    """Allocate ``sizes`` in order and keep them (a helper for tests and the trace)."""
    c = itertools.count()
    return [(next(c), s) for s in sizes]
