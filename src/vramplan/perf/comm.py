"""Communication time: bytes over the GPU-to-GPU link, with a latency per collective.

A collective of ``m`` bytes per GPU over ``n`` GPUs in a ring costs ``steps x latency + bytes on the wire /
link bandwidth`` (the alpha-beta model; Thakur, Rabenseifner & Gropp 2005). The bandwidth-only helpers
(:func:`comm_time_s`, :func:`ring_allreduce_bytes`) serve per-step gradient and parameter traffic, where the
latency is negligible; :func:`allreduce_seconds` adds the latency that dominates the small all-reduces a
tensor-parallel decode step runs twice per layer.
"""

from __future__ import annotations

from ..hardware import GPU
from ..parallel.comm import ring_factor

__all__ = ["allreduce_seconds", "comm_time_s", "exposed_comm_s", "link_bandwidth_bytes_per_s", "nccl_allreduce_seconds",
           "ring_allreduce_bytes"]


def link_bandwidth_bytes_per_s(gpu: GPU, gpus: int) -> float | None:
    """One direction of the GPU-to-GPU link used by ``gpus`` GPUs in one node, from the link catalog
    (:func:`vramplan.hardware.intra_node_link`: a 2-way bridge joins only pairs, larger groups cross PCIe) — the
    same link the memory model's communication uses. A user-described GPU without a catalog link gives its
    ``link=`` rate, both directions combined."""
    from ..hardware import get_link, intra_node_link

    name = intra_node_link(gpu.interconnect, gpus)
    if name is not None:
        return float(get_link(name).bandwidth_per_direction_bytes_per_s)
    if gpu.interconnect.bandwidth_bytes_per_s is None:
        return None
    return gpu.interconnect.bandwidth_bytes_per_s / 2


def comm_time_s(bytes_per_gpu: float, gpu: GPU, gpus: int) -> float | None:
    """Seconds to move ``bytes_per_gpu`` over each GPU's link (no overlap with compute: an upper bound)."""
    if gpus <= 1 or bytes_per_gpu <= 0:
        return 0.0
    bw = link_bandwidth_bytes_per_s(gpu, gpus)
    if bw is None:
        return None
    return bytes_per_gpu / bw


def ring_allreduce_bytes(size: float, gpus: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of ``size`` bytes: 2 (n - 1) / n x size, the one ring formula
    (:func:`vramplan.parallel.comm.ring_factor`)."""
    return float(size * ring_factor("all-reduce", gpus))


def allreduce_seconds(size: float, gpus: int, gpu: GPU, latency_s: float) -> float | None:
    """One all-reduce of ``size`` bytes over ``gpus`` GPUs: ``latency_s`` (one kernel's launch and
    synchronisation; NCCL's low-latency protocol or an engine's custom one-shot all-reduce) plus the ring's
    2 (n - 1) / n x size bytes over one direction of the link. None without a link bandwidth."""
    if gpus <= 1:
        return 0.0
    bw = link_bandwidth_bytes_per_s(gpu, gpus)
    if bw is None:
        return None
    return latency_s + ring_allreduce_bytes(size, gpus) / bw


# NCCL 2.18's cost model of a ring all-reduce inside one node over NVLink (src/graph/tuning.cc, tag v2.18.3-1, the
# NCCL of the 2023 containers TensorRT-LLM 0.5 and vLLM 0.2 ran on): per protocol, a base latency plus a per-step hop
# latency (us; 2 (n - 1) steps), and the bus bandwidth the ring's channels reach with that protocol: LL moves 8 bytes
# of which 4 are data and is capped per GPU (llMaxBws: 87.7 GB/s on Ampere and Hopper), LL128 carries 120 of every
# 128 bytes (x 0.92) and is capped per channel (perChMaxRingLL128Bws: 20 GB/s Ampere, 36.7 Hopper), Simple runs
# at the ring's bandwidth. NCCL picks the fastest protocol for the size (ncclTopoGetAlgoTime).
_NCCL_BASE_LATENCY_US = {"LL": 6.6, "LL128": 14.0, "Simple": 8.4}  # baseLat, ring
_NCCL_NVLINK_HOP_US = {"LL": 0.6, "LL128": 1.9, "Simple": 3.4}  # hwLat[NVLINK], ring
_NCCL_LL_MAX_BUS_GBPS = 87.7
_NCCL_LL128_CHANNEL_GBPS = {"Volta": 20.0, "Ampere": 20.0, "Hopper": 36.7}


def nccl_allreduce_seconds(size: float, gpus: int, gpu: GPU) -> float | None:
    """One NCCL ring all-reduce of ``size`` bytes over ``gpus`` GPUs of one node, as NCCL's own tuning model
    prices it (:data:`_NCCL_BASE_LATENCY_US`: ``latency + size / (bus bandwidth x n / (2 (n - 1)))`` for LL,
    LL128 and Simple, the fastest kept). The ring's bus bandwidth is its channels x the per-channel bandwidth of
    NCCL's topology search (``data/interconnects.json`` ``nccl.ring_channels`` / ``ring_channel_gbps``): 240 GB/s
    on A100 NVSwitch, 360 on H100, below the links' 300 / 450 GB/s peaks. None where the link has no recorded
    ring (PCIe, the network, a described GPU): callers fall back to :func:`allreduce_seconds`. Tree and NVLink
    SHARP (NVLS, H100 with NVSwitch) algorithms are not modelled."""
    from ..hardware import get_link, intra_node_link

    if gpus <= 1:
        return 0.0
    name = intra_node_link(gpu.interconnect, gpus)
    topo = None if name is None else get_link(name).nccl
    if topo is None or not topo.ring_channels or not topo.ring_channel_gbps:
        return None
    steps = 2 * (gpus - 1)
    ring = topo.ring_channels * topo.ring_channel_gbps
    arch = "Hopper" if gpu.architecture in ("Hopper", "Blackwell") else (
        "Volta" if gpu.architecture in ("Volta", "Turing") else "Ampere")
    bus = {"LL": min(_NCCL_LL_MAX_BUS_GBPS, ring / 4),
           "LL128": min(ring * 0.92, topo.ring_channels * _NCCL_LL128_CHANNEL_GBPS[arch]),
           "Simple": ring}
    best = min((_NCCL_BASE_LATENCY_US[p] + steps * _NCCL_NVLINK_HOP_US[p]) * 1e-6
               + size / (bus[p] * 1e9 * gpus / steps) for p in bus)
    return best


def exposed_comm_s(comm_s: float, compute_s: float, num_layers: int, *, overlapped: bool) -> float:
    """The part of ``comm_s`` a step waits for.

    DDP all-reduces gradient buckets while backward runs (``torch/nn/parallel/distributed.py``, the reducer's
    bucket hooks) and FSDP / ZeRO-3 prefetch the next layer's all-gather during the current layer's compute
    (``torch/distributed/fsdp``: forward/backward prefetch), so overlapped traffic costs only what exceeds the
    compute it hides behind, plus one layer's share that nothing hides (the first all-gather, the last bucket).
    Tensor- and pipeline-parallel transfers sit on the critical path (``overlapped=False``).
    """
    if not overlapped:
        return comm_s
    first = comm_s / max(1, num_layers)
    return first + max(0.0, comm_s - first - compute_s)
