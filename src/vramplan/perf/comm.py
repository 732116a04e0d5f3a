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

__all__ = ["allreduce_seconds", "comm_time_s", "exposed_comm_s", "link_bandwidth_bytes_per_s", "ring_allreduce_bytes"]


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
