"""Typed, frozen results. Every client (CLI table, JSON, web page, planner) reads these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .kinds import MemoryKind, Phase

if TYPE_CHECKING:
    from .parallel import ParallelEstimate

__all__ = ["Breakdown", "Estimate", "PhasePeak", "ReservedPhase"]


_KINDS = tuple(MemoryKind)  # (iterating the enum itself is slower)


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Bytes by memory kind; kinds not present are zero."""

    bytes_by_kind: tuple[tuple[MemoryKind, int], ...]

    @classmethod
    def of(cls, mapping: Mapping[MemoryKind, int]) -> Breakdown:
        return cls(tuple([(k, int(mapping.get(k, 0))) for k in _KINDS]))

    def __getitem__(self, kind: MemoryKind) -> int:
        for k, v in self.bytes_by_kind:
            if k is kind:
                return v
        return 0

    @property
    def total(self) -> int:
        return sum(v for _, v in self.bytes_by_kind)

    def as_dict(self) -> dict[str, int]:
        return {k.value: v for k, v in self.bytes_by_kind}


@dataclass(frozen=True, slots=True)
class PhasePeak:
    phase: Phase
    peak_allocated_bytes: int
    breakdown: Breakdown


@dataclass(frozen=True, slots=True)
class ReservedPhase:
    """The allocator during one phase: highest allocated and reserved bytes (blocks rounded as the
    allocator rounds them), and the share of reserved memory not in use at the reserved peak."""

    phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int

    @property
    def fragmentation(self) -> float:
        if not self.peak_reserved_bytes:
            return 0.0
        return max(0.0, 1.0 - self.peak_allocated_bytes / self.peak_reserved_bytes)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Peak GPU memory of one workload on one GPU.

    ``peak_allocated_bytes`` predicts ``torch.cuda.max_memory_allocated()``; ``total_bytes`` is what
    nvidia-smi shows for the process (peak + allocator slack + CUDA context). ``breakdown`` is taken at
    the moment of the peak and covers every kind, so ``breakdown.total == total_bytes``. ``per_gpu``: the
    most loaded GPU of a multi-GPU layout, when one was given.
    """

    model: str
    parameters: int
    trainable_parameters: int
    peak_allocated_bytes: int
    total_bytes: int
    peak_phase: Phase
    breakdown: Breakdown
    phases: tuple[PhasePeak, ...]
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    workload: Mapping[str, Any] = field(default_factory=dict)
    per_gpu: ParallelEstimate | None = None
    # what the caching allocator reserves (torch.cuda.max_memory_reserved) from the modelled
    # allocation stream (vramplan.allocator); 0 where no stream is modelled
    peak_reserved_bytes: int = 0
    reserved_phases: tuple[ReservedPhase, ...] = ()
    host_bytes: int = 0  # pinned host memory the step needs (activation offloading)
    host_traffic_bytes: int = 0  # bytes over PCIe per optimizer step for that host memory (both directions)
    # step time / prefill / decode on a GPU (vramplan.perf.report.time_object), when the query named one
    time: Mapping[str, Any] | None = None

    def phase_peak(self, phase: Phase) -> int:
        for p in self.phases:
            if p.phase is phase:
                return p.peak_allocated_bytes
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract of ``vramplan estimate --json`` (``per_gpu`` only with a layout, ``time`` only with
        a GPU)."""
        out: dict[str, Any] = {
            "model": self.model,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "total_bytes": self.total_bytes,
            "peak_phase": self.peak_phase.value,
            "breakdown": self.breakdown.as_dict(),
            "phases": {p.phase.value: p.peak_allocated_bytes for p in self.phases},
            "phase_breakdowns": {p.phase.value: p.breakdown.as_dict() for p in self.phases},
            "workload": dict(self.workload),
            "assumptions": list(self.assumptions),
            "warnings": list(self.warnings),
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "reserved_phases": {p.phase: {"peak_allocated_bytes": p.peak_allocated_bytes,
                                          "peak_reserved_bytes": p.peak_reserved_bytes,
                                          "fragmentation": round(p.fragmentation, 4)}
                                for p in self.reserved_phases},
            "host_bytes": self.host_bytes,
            "host_traffic_bytes": self.host_traffic_bytes,
        }
        if self.per_gpu is not None:
            out["per_gpu"] = self.per_gpu.to_dict()
        if self.time is not None:
            out["time"] = dict(self.time)
        return out
