"""Multi-GPU layouts and per-GPU memory (issue: Multi-GPU). Interface shared by the planner and the CLI.

This module currently implements data-parallel replication only (every GPU holds the full single-GPU
estimate); ZeRO/FSDP, tensor, pipeline and expert parallelism and offload are being added behind the
same interface: ``estimate_parallel(spec, workload, layout) -> ParallelEstimate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import WorkloadError
from .estimator import estimate
from .result import Breakdown, Estimate
from .spec import ModelSpec
from .workload import Workload

__all__ = ["FSDPMode", "Layout", "Offload", "ParallelEstimate", "estimate_parallel"]


class FSDPMode(StrEnum):
    FULL = "full"  # FULL_SHARD (ZeRO-3-like)
    GRAD_OP = "grad-op"  # SHARD_GRAD_OP (ZeRO-2-like)
    HYBRID = "hybrid"  # HYBRID_SHARD: full shard inside a node, replicate across nodes


class Offload(StrEnum):
    NONE = "none"
    OPTIMIZER = "optimizer"
    OPTIMIZER_PARAMS = "optimizer+params"


@dataclass(frozen=True, slots=True)
class Layout:
    """How a job is spread over GPUs. ``dp`` is derived: gpus / (tp * pp)."""

    gpus: int = 1
    nodes: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0
    fsdp: FSDPMode | None = None
    micro_batches: int = 1
    offload: Offload = Offload.NONE
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("gpus", "nodes", "tp", "pp", "ep", "micro_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
                raise WorkloadError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.zero not in (0, 1, 2, 3):
            raise WorkloadError(f"zero stage must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.fsdp is not None:
            raise WorkloadError("choose either --zero (DeepSpeed) or --fsdp (PyTorch FSDP), not both")
        if self.gpus % (self.tp * self.pp):
            raise WorkloadError(f"--gpus {self.gpus} is not a multiple of tp x pp = {self.tp * self.pp}")
        if self.gpus % self.nodes:
            raise WorkloadError(f"--gpus {self.gpus} cannot be split evenly over {self.nodes} nodes")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def is_single(self) -> bool:
        return self.gpus == 1


@dataclass(frozen=True, slots=True)
class ParallelEstimate:
    """Memory of the most loaded GPU of a layout, plus host memory and communication per step."""

    single: Estimate  # the same workload on one GPU, for reference
    layout: Layout
    peak_allocated_bytes: int
    total_bytes: int
    breakdown: Breakdown
    host_bytes: int
    comm_bytes_per_step: int
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``per_gpu`` section of ``vramplan estimate --json``."""
        return {
            "gpus": self.layout.gpus, "nodes": self.layout.nodes, "dp": self.layout.dp, "tp": self.layout.tp,
            "pp": self.layout.pp, "ep": self.layout.ep, "zero": self.layout.zero,
            "fsdp": self.layout.fsdp.value if self.layout.fsdp else None,
            "offload": self.layout.offload.value,
            "peak_allocated_bytes": self.peak_allocated_bytes, "total_bytes": self.total_bytes,
            "breakdown": self.breakdown.as_dict(), "host_bytes": self.host_bytes,
            "comm_bytes_per_step": self.comm_bytes_per_step, "assumptions": list(self.assumptions),
        }


def estimate_parallel(spec: ModelSpec, workload: Workload, layout: Layout) -> ParallelEstimate:
    """Per-GPU memory of ``workload`` under ``layout`` (currently: plain data-parallel replicas)."""
    if layout.tp != 1 or layout.pp != 1 or layout.ep != 1 or layout.zero or layout.fsdp or \
            layout.offload is not Offload.NONE:
        raise WorkloadError("only data-parallel replication is modelled so far; drop the sharding flags")
    single = estimate(spec, workload)
    return ParallelEstimate(single, layout, single.peak_allocated_bytes, single.total_bytes, single.breakdown,
                            0, 0, ("data parallel: every GPU holds a full replica",))
