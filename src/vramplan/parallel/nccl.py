"""NCCL's device memory of a layout: the communicator buffers outside PyTorch's caching allocator.

Each process group a GPU belongs to is one NCCL communicator with its own buffers (NVIDIA/nccl#986: more
communicators, more memory, unless they share resources through ``ncclCommSplit``, which PyTorch does not ask
for by default). Inside a communicator the memory is a number of *connections* times a fixed size per connection,
plus the NVLink SHARP buffers on NVSwitch systems. Read in NCCL 2.30.7 (NVIDIA/nccl), the same mechanism since
2.19 (cuMem allocations, ``NCCL_CUMEM_ENABLE``) and 2.22 (connections made when an algorithm first runs,
``NCCL_RUNTIME_CONNECT=1``):

- **Protocol buffers** (``src/init.cc``, ``computeBuffSizes``): LL = 8 lines per thread x 512 threads x
  ``NCCL_STEPS`` (8) x 16 bytes = 512 KiB; LL128 = 120 elements per thread x 640 threads x 8 steps x 8 bytes =
  4,915,200 bytes; Simple = ``NCCL_BUFFSIZE`` = 4 MiB.
- **A connection inside a node** (``src/transport/p2p.cc``, ``p2pRecvSetup`` / ``p2pSendSetup``): the receiver
  allocates a 4 KiB ``ncclRecvMem`` plus the three protocol buffers; the sender a 4 KiB ``ncclSendMem``; each
  rounded up to ``CUDA_IPC_MIN`` (2 MiB) - 10 MiB and 2 MiB, the two sizes NVIDIA/nccl#1685 lists. In P2P read
  mode (SM80 over NVLink, ``ncclTopoCheckP2p``) the Simple buffer moves to the sender: 6 MiB and 6 MiB.
- **A connection over the network** (``src/transport/net.cc``, ``sendProxySetup`` / ``recvProxySetup``): with
  GPUDirect RDMA the sender keeps LL128 and Simple in device memory, the receiver all three (both rounded to
  2 MiB); without it they are in host memory.
- **Which connections**: a ring connects each rank to its previous and next rank on every channel (one receive
  and one send connection; the same peer when there are 2 ranks); a tree (all-reduce) adds the other direction
  to both chain neighbours inside a node (``connect.cc``; connections on the same peer and channel are shared),
  and its parent and children across nodes (``ncclGetDtree``). Send/receive (pipeline stages) and all-to-all
  (expert parallel) connect every peer on ``p2pnChannelsPerPeer`` channels (``paths.cc``,
  ``ncclTopoGetNchannels``: 2 per NVLink of the path, a power of two, capped at the p2p channels), or share
  one buffer pool per direction for peers across the network (``sharedNetBuffersInit``: p2p channels x 16 steps
  x 128 KiB).
- **NVLink SHARP** (``src/transport/nvls.cc``, ``ncclNvlsBufferSetup``): NVLS channels (16 on SM90, 24 on SM100)
  x 2 x ``NCCL_NVLS_CHUNKSIZE`` (128 KiB) x 8 steps x one head per GPU of the communicator on the node.
- **Channels** per link: ``data/interconnects.json`` (``nccl``), from NCCL's topology search.

Every algorithm NCCL can choose for a group's collectives is counted as connected (ring for all of them, tree
for all-reduce, NVLS on NVSwitch systems for all-reduce, reduce-scatter and all-gather): what
``NCCL_RUNTIME_CONNECT=0`` connects at init, and the most ``=1`` connects once a run has used every message size.
Not counted: NCCL's per-communicator structures and kernels, CollNet/SHARP, user-buffer registration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..hardware import Link, NcclLinkTopology, get_link
from ..spec import ModelSpec
from ..units import KiB, MiB
from ..workload import Workload
from .layout import Engine, FSDPMode, Layout

__all__ = ["NCCL_VERSION", "CommBuffers", "Communicator", "NcclConfig", "NcclMemory", "communicators",
           "connection_bytes", "nccl_memory", "nvls_bytes"]

NCCL_VERSION = "NCCL 2.22+ (read in 2.30.7: cuMem allocations, connections made when an algorithm first runs)"

# ---- constants, each where NCCL defines it -------------------------------------------------------------
NCCL_STEPS = 8  # src/include/device.h
LL_BUFFSIZE = 8 * 512 * NCCL_STEPS * 16  # NCCL_LL_LINES_PER_THREAD x NCCL_LL_MAX_NTHREADS x steps x ncclLLFifoLine
LL128_BUFFSIZE = 120 * 640 * NCCL_STEPS * 8  # NCCL_LL128_ELEMS_PER_THREAD x NCCL_LL128_MAX_NTHREADS x steps x 8 B
SIMPLE_BUFFSIZE = 4 * MiB  # DEFAULT_BUFFSIZE (src/init.cc), NCCL_BUFFSIZE
CONN_HEADER = 4096  # sizeof(ncclSendMem) == sizeof(ncclRecvMem): padded to MEM_ALIGN (src/include/comm.h)
CUDA_IPC_MIN = 2 * MiB  # src/include/comm.h: every P2P/net device buffer is rounded up to it
NVLS_CHUNKSIZE = 128 * KiB  # NCCL_NVLS_CHUNKSIZE default (src/transport/nvls.cc)
NET_P2P_CHUNKSIZE = 128 * KiB  # NCCL_P2P_NET_CHUNKSIZE default (src/init.cc)
NCCL_SHARED_STEPS = 16  # src/transport/net.cc
MAX_CHANNELS = 64  # MAXCHANNELS (src/include/device.h)

_COLLECTIVES = frozenset({"all-reduce", "reduce-scatter", "all-gather", "broadcast", "barrier"})
_NVLS_COLLECTIVES = frozenset({"all-reduce", "reduce-scatter", "all-gather"})
_P2P = frozenset({"send/recv", "all-to-all"})


@dataclass(frozen=True, slots=True)
class NcclConfig:
    """NCCL's settings that change its memory, as the environment variables name them (None: NCCL's default)."""

    buffsize: int = SIMPLE_BUFFSIZE  # NCCL_BUFFSIZE
    ll_buffsize: int = LL_BUFFSIZE  # NCCL_LL_BUFFSIZE
    ll128_buffsize: int = LL128_BUFFSIZE  # NCCL_LL128_BUFFSIZE
    nvls: bool = True  # NCCL_NVLS_ENABLE (used where the NVSwitch supports multicast)
    max_channels: int | None = None  # NCCL_MAX_NCHANNELS
    max_p2p_channels: int | None = None  # NCCL_MAX_P2P_NCHANNELS
    nvls_channels: int | None = None  # NCCL_NVLS_NCHANNELS
    p2p_read: bool | None = None  # NCCL_P2P_READ_ENABLE

    def __post_init__(self) -> None:
        for name in ("buffsize", "ll_buffsize", "ll128_buffsize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 34:
                raise ValueError(f"NCCL {name} must be a byte count, got {v!r}")
        for name in ("max_channels", "max_p2p_channels", "nvls_channels"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_CHANNELS):
                raise ValueError(f"NCCL {name} must be 1..{MAX_CHANNELS}, got {v!r}")


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def connection_bytes(cfg: NcclConfig = NcclConfig(), *, read: bool = False, net: bool = False,
                     device_buffers: bool = True) -> tuple[int, int]:
    """Device bytes of one connection: (on the sending GPU, on the receiving GPU).

    Inside a node (``p2p.cc``): the receiver holds its ``ncclRecvMem`` and the LL, LL128 and Simple buffers,
    the sender its ``ncclSendMem``; in P2P read mode the Simple buffer is on the sender. Over the network
    (``net.cc``, GPUDirect RDMA): the sender holds LL128 and Simple, the receiver all three. Each side is rounded
    up to ``CUDA_IPC_MIN``.
    """
    if net:
        if not device_buffers:
            return 0, 0
        return (_align(cfg.ll128_buffsize + cfg.buffsize, CUDA_IPC_MIN),
                _align(cfg.ll_buffsize + cfg.ll128_buffsize + cfg.buffsize, CUDA_IPC_MIN))
    send = CONN_HEADER + (cfg.buffsize if read else 0)
    recv = CONN_HEADER + cfg.ll_buffsize + cfg.ll128_buffsize + (0 if read else cfg.buffsize)
    return _align(send, CUDA_IPC_MIN), _align(recv, CUDA_IPC_MIN)


def nvls_bytes(channels: int, local_ranks: int, chunk: int = NVLS_CHUNKSIZE) -> int:
    """NVLink SHARP buffers of one GPU (``ncclNvlsBufferSetup``): channels x 2 (reduce and broadcast) x
    chunk x ``NCCL_STEPS``, once per head - every GPU of the communicator on the node is one."""
    if channels <= 0 or local_ranks < 2:
        return 0
    return _align(channels * 2 * chunk * NCCL_STEPS * local_ranks, CUDA_IPC_MIN)


def _pow2_up(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---- communicators of a layout ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Communicator:
    """One process group a GPU belongs to, as NCCL sees it."""

    group: str  # tensor, data, shard, replicate, pipeline, expert, expert-data
    ranks: int
    local_ranks: int  # ranks of the group on this GPU's node
    ops: tuple[str, ...]  # what the engine runs on it
    p2p_peers: int = 0  # send/recv peers of this GPU (pipeline neighbours, all-to-all peers)

    @property
    def nodes(self) -> int:
        return max(1, self.ranks // max(1, self.local_ranks))


def _placed(group: str, ranks: int, stride: int, gpn: int, ops: tuple[str, ...], peers: int = 0) -> Communicator:
    """A group of ``ranks`` ranks ``stride`` apart (Megatron's order: tensor-parallel ranks adjacent, then data,
    then pipeline): how many of them share a node of ``gpn`` GPUs (ranks 0, stride, 2·stride, … of one node)."""
    return Communicator(group, ranks, min(ranks, -(-gpn // stride)), ops, peers)


def communicators(layout: Layout, w: Workload, spec: ModelSpec | None = None,
                  stage: int | None = None) -> tuple[Communicator, ...]:
    """The NCCL communicators one GPU of ``layout`` belongs to and the collectives its engine runs on each.

    PyTorch DDP: one data-parallel group (all-reduce, and the broadcast at construction). FSDP: the shard group
    (all-gather, reduce-scatter), with ``hybrid`` a replicate group across nodes (all-reduce). DeepSpeed ZeRO: the
    data-parallel group (reduce-scatter or all-reduce of gradient buckets, all-gather of parameters, all-reduce of
    the overflow check and gradient norm). Megatron: tensor group (all-reduce; sequence parallel adds
    reduce-scatter and all-gather), data group (all-reduce), pipeline group (send/recv with the stages before and
    after), expert group (all-to-all) and expert-data group (all-reduce of the experts' gradients), and the
    embedding group of the first and last stage when the head is tied to the embedding (Megatron-LM
    ``_allreduce_embedding_grads``). Where no group is the whole world, the world group too: frameworks
    synchronise on it (``torch.distributed.barrier``, a one-element all-reduce: a ring). ``stage``: the pipeline
    stage of the GPU (None: the most connected one, a middle stage with the embedding group as well).
    """
    gpn = layout.gpus_per_node
    tp, pp, dp, ep = layout.tp, layout.pp, layout.dp, layout.ep
    out: list[Communicator] = []
    ops: tuple[str, ...]
    if tp > 1:
        ops = ("all-reduce", "reduce-scatter", "all-gather") if layout.sequence_parallel else ("all-reduce",)
        out.append(_placed("tensor", tp, 1, gpn, ops))
    eng = layout.engine
    if dp > 1 and (w.is_train or layout.zero == 3 or layout.fsdp is not None):
        if not w.is_train:
            out.append(_placed("data", dp, tp, gpn, ("all-gather",)))
        elif eng is Engine.FSDP:
            n = layout.shard_degree
            out.append(_placed("shard", n, tp, gpn, ("all-gather", "reduce-scatter")))
            if layout.fsdp is FSDPMode.HYBRID and dp // n > 1:
                out.append(_placed("replicate", dp // n, tp * n, gpn, ("all-reduce",)))
        elif eng is Engine.DEEPSPEED:
            out.append(_placed("data", dp, tp, gpn, ("all-reduce", "reduce-scatter", "all-gather")))
        else:  # DDP, Megatron
            ops = ("all-reduce", "broadcast") if eng is Engine.DDP else ("all-reduce",)
            out.append(_placed("data", dp, tp, gpn, ops))
    if pp > 1:
        peers = min(2, pp - 1) if stage is None else int(stage > 0) + int(stage < pp - 1)
        out.append(_placed("pipeline", pp, tp * dp, gpn, ("send/recv",), peers=peers))
        ends = stage is None or stage in (0, pp - 1)
        if w.is_train and ends and spec is not None and spec.tie_word_embeddings:
            out.append(_placed("embedding", 2, tp * dp * (pp - 1), gpn, ("all-reduce",)))
    if ep > 1 and (spec is None or spec.is_moe):
        out.append(_placed("expert", ep, tp, gpn, ("all-to-all",), peers=ep - 1))
        if w.is_train and dp // ep > 1:
            out.append(_placed("expert-data", dp // ep, tp * ep, gpn, ("all-reduce",)))
    if layout.gpus > 1 and not any(c.ranks == layout.gpus and set(c.ops) & _COLLECTIVES for c in out):
        out.append(_placed("world", layout.gpus, 1, gpn, ("barrier",)))
    return tuple(out)


# ---- bytes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CommBuffers:
    """NCCL's device memory of one communicator on one GPU."""

    communicator: Communicator
    channels: int  # ring/tree channels
    connections: int  # send and receive connections this GPU holds (ring, tree, p2p)
    ring_tree_bytes: int
    p2p_bytes: int
    nvls_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.ring_tree_bytes + self.p2p_bytes + self.nvls_bytes

    def to_dict(self) -> dict[str, Any]:
        c = self.communicator
        return {"group": c.group, "ranks": c.ranks, "local_ranks": c.local_ranks, "nodes": c.nodes,
                "ops": list(c.ops), "p2p_peers": c.p2p_peers, "channels": self.channels,
                "connections": self.connections, "ring_tree_bytes": self.ring_tree_bytes,
                "p2p_bytes": self.p2p_bytes, "nvls_bytes": self.nvls_bytes, "total_bytes": self.total_bytes}


@dataclass(frozen=True, slots=True)
class NcclMemory:
    """NCCL's device memory on one GPU of a layout, by communicator."""

    communicators: tuple[CommBuffers, ...]
    intra_node: str
    inter_node: str
    modelled: bool = True  # False: a link NCCL does not run over (AMD, Gaudi): not counted

    @property
    def total_bytes(self) -> int:
        return sum(c.total_bytes for c in self.communicators)

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "nccl_version": NCCL_VERSION, "modelled": self.modelled,
                "intra_node_link": self.intra_node, "inter_node_link": self.inter_node,
                "communicators": [c.to_dict() for c in self.communicators]}


def _comm_buffers(c: Communicator, intra: NcclLinkTopology, inter: NcclLinkTopology, cfg: NcclConfig) -> CommBuffers:
    read = intra.p2p_read if cfg.p2p_read is None else cfg.p2p_read
    p_send, p_recv = connection_bytes(cfg, read=read)
    n_send, n_recv = connection_bytes(cfg, net=True, device_buffers=inter.device_buffers)
    local, nodes = c.local_ranks, c.nodes
    multi = nodes > 1
    collectives = [o for o in c.ops if o in _COLLECTIVES]
    channels = 0
    conns = 0
    ring_tree = 0
    if collectives and c.ranks > 1:
        channels = inter.coll_channels if multi else intra.coll_channels
        if cfg.max_channels is not None:
            channels = min(channels, cfg.max_channels)
        # ring: one receive and one send connection per channel; across nodes this GPU is where the ring
        # enters (receives over the network) on 1/local of the channels and where it leaves on as many
        per_node = math.ceil(channels / local) if multi else 0
        if local == 1 and multi:
            net_ch = channels
        else:
            net_ch = min(channels, per_node)
        ring_tree = net_ch * (n_send + n_recv) + (channels - net_ch) * (p_send + p_recv)
        conns = 2 * channels
        if "all-reduce" in collectives:
            # tree: the other direction to both chain neighbours inside the node (shared with the ring when
            # there are only 2 of them)
            if local >= 3:
                ring_tree += channels * (p_send + p_recv)
                conns += 2 * channels
            if multi:
                # parent and up to two children across nodes (double binary tree, ncclGetDtree) on the channels
                # where this GPU is its node's head, both directions; one of them can be the ring's peer
                heads = channels if local == 1 else per_node
                extra = max(0, min(3, nodes - 1) - 1)
                ring_tree += heads * extra * (n_send + n_recv)
                conns += 2 * heads * extra
    p2p = 0
    if any(o in _P2P for o in c.ops) and c.p2p_peers:
        # p2p channels: the communicator's channels (the network's across nodes) as a power of two
        coll = inter.coll_channels if multi else intra.coll_channels
        ring_like = coll if cfg.max_channels is None else min(coll, cfg.max_channels)
        p2p_channels = _pow2_up(min(MAX_CHANNELS, ring_like if cfg.max_p2p_channels is None
                                    else cfg.max_p2p_channels))
        per_peer = min(p2p_channels, _pow2_up(max(1, intra.p2p_channels_per_peer)))
        intra_peers = min(c.p2p_peers, local - 1) if local > 1 else 0
        net_peers = c.p2p_peers - intra_peers
        p2p = intra_peers * per_peer * (p_send + p_recv)
        conns += 2 * intra_peers * per_peer
        if net_peers and inter.device_buffers:
            # one shared pool per direction for every network peer (sharedNetBuffersInit)
            p2p += 2 * _align(p2p_channels * NCCL_SHARED_STEPS * NET_P2P_CHUNKSIZE, CUDA_IPC_MIN)
    nv = 0
    if cfg.nvls and intra.nvls_channels and any(o in _NVLS_COLLECTIVES for o in c.ops):
        nv = nvls_bytes(cfg.nvls_channels or intra.nvls_channels, local)
    return CommBuffers(c, channels, conns, ring_tree, p2p, nv)


def nccl_memory(layout: Layout, w: Workload, spec: ModelSpec | None = None, *, intra_node: str = "nvlink-4",
                inter_node: str = "ib-ndr", config: NcclConfig | None = None, stage: int | None = None) -> NcclMemory:
    """NCCL's device memory on one GPU of ``layout`` (in pipeline stage ``stage``; None: the most connected):
    every communicator it belongs to, over ``intra_node`` inside a node and ``inter_node`` between nodes (names in
    ``data/interconnects.json``). One GPU: nothing."""
    cfg = config or NcclConfig()
    intra_link: Link = get_link(intra_node)
    inter_link: Link = get_link(inter_node)
    if layout.gpus == 1:
        return NcclMemory((), intra_link.name, inter_link.name)
    if intra_link.nccl is None or inter_link.nccl is None:
        return NcclMemory((), intra_link.name, inter_link.name, modelled=False)
    comms = communicators(layout, w, spec, stage)
    return NcclMemory(tuple(_comm_buffers(c, intra_link.nccl, inter_link.nccl, cfg) for c in comms),
                      intra_link.name, inter_link.name)


def nccl_note(mem: NcclMemory, config: NcclConfig | None = None) -> str:
    """The assumption line of an estimate."""
    send, recv = connection_bytes(config or NcclConfig())
    if not mem.modelled:
        return (f"NCCL buffers not counted: {mem.intra_node}/{mem.inter_node} is not a link NCCL runs over "
                "(RCCL and HCCL keep their own buffers)")
    if not mem.communicators:
        return "NCCL buffers: none (one GPU, or no collective between GPUs)"
    parts = ", ".join(f"{c.communicator.group} ({c.communicator.ranks} ranks) {c.total_bytes / MiB:,.0f} MiB"
                      for c in mem.communicators)
    return (f"NCCL buffers outside PyTorch's caching allocator: {mem.total_bytes / MiB:,.0f} MiB - {parts}; "
            f"{NCCL_VERSION}; per connection {recv / MiB:g} MiB on the receiver + {send / MiB:g} MiB on the "
            "sender inside a node (LL 512 KiB, LL128 4.7 MiB, Simple 4 MiB, 2 MiB granularity); "
            "ring, tree for all-reduce and NVLS on NVSwitch counted as connected; "
            "NCCL_BUFFSIZE, NCCL_MAX_NCHANNELS, NCCL_MAX_P2P_NCHANNELS, NCCL_NVLS_ENABLE=0 and "
            "NCCL_RUNTIME_CONNECT change it")
