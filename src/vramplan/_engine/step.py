"""What a step adds around the replayed programs, and the :class:`~vramplan.result.Estimate` built from
its phases: one set of constants for every model kind (H200, torch 2.11, CUDA 13)."""

from __future__ import annotations

from enum import Enum
from typing import Any

from ..allocator import AllocStats
from ..kinds import MemoryKind, Phase
from ..memory import ModelStates
from ..result import Breakdown, Estimate, PhasePeak
from ..units import GiB, MiB
from .tape import Moment

__all__ = ["ALLOCATOR_SLACK_FRACTION", "CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "finish", "phase_peak",
           "states_moment", "workload_dict"]

# Device memory in use before the first tensor: 0.516 GiB on the calibration H200 (torch 2.11, CUDA 13).
CUDA_CONTEXT_BYTES = int(0.516 * GiB)
# cuBLAS workspace per handle: CUBLAS_WORKSPACE_CONFIG default ":4096:8" on Hopper (32 MiB), allocated
# through the caching allocator (aten/src/ATen/cuda/CublasHandlePool.cpp). Training uses two handles:
# the main thread's and autograd's backward thread.
CUBLAS_WORKSPACE_BYTES = 32 * MiB
# max_memory_reserved exceeds max_memory_allocated by a median 9.5% over the calibration set
# (block rounding, cached free blocks). Where a run's allocation stream is modelled, the allocator is
# replayed instead (vramplan.allocator); this fraction remains for runs without one.
ALLOCATOR_SLACK_FRACTION = 0.10


def workload_dict(w: object, **extra: object) -> dict[str, object]:
    """A workload dataclass as the JSON ``workload`` of an estimate: enums by value, tuples as lists."""
    out: dict[str, object] = {}
    for f in w.__dataclass_fields__:  # type: ignore[attr-defined]
        v = getattr(w, f)
        out[f] = v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
    return out | extra


def states_moment(states: ModelStates, *, workspace_handles: int, grads: bool = False,
                  temporaries: bool = False) -> Moment:
    """What lives across steps (weights, master weights, quantization constants, optimizer states) and the
    cuBLAS workspaces; ``grads``: the gradients exist (the optimizer step, accumulation, zero_grad keeping
    them); ``temporaries``: the optimizer step's temporaries."""
    return Moment.of({
        MemoryKind.WEIGHTS: states.weights, MemoryKind.MASTER_WEIGHTS: states.master_weights,
        MemoryKind.QUANTIZATION_CONSTANTS: states.quant_constants,
        MemoryKind.OPTIMIZER_STATE: states.optimizer_state + (states.step_temporaries if temporaries else 0),
        MemoryKind.GRADIENTS: states.gradients if grads else 0,
        MemoryKind.WORKSPACE: workspace_handles * CUBLAS_WORKSPACE_BYTES,
    })


def phase_peak(phase: Phase, m: Moment) -> PhasePeak:
    """One phase's peak from the moment it happens."""
    return PhasePeak(phase, m.total, Breakdown.of(m.as_dict()))


def finish(name: str, phases: list[PhasePeak] | tuple[PhasePeak, ...], *, parameters: int, trainable: int,
           assumptions: list[str] | tuple[str, ...], warnings: list[str] | tuple[str, ...],
           workload: dict[str, object], reserved: AllocStats | None = None, guess_reserved: bool = False,
           **extra: Any) -> Estimate:
    """The estimate of a step: its highest phase, plus the CUDA context and the allocator slack.

    ``reserved``: the allocator replay of the run's allocation stream, where it is modelled; otherwise the
    slack is :data:`ALLOCATOR_SLACK_FRACTION` of the peak, and ``peak_reserved_bytes`` is 0 (not modelled)
    unless ``guess_reserved`` (then peak + slack). ``extra``: further :class:`Estimate` fields (host memory).
    """
    top = max(phases, key=lambda p: p.peak_allocated_bytes)
    peak = top.peak_allocated_bytes
    if reserved is not None:
        slack = max(0, reserved.peak_reserved_bytes - peak)
        extra.update(peak_reserved_bytes=peak + slack, reserved_phases=reserved.phases)
    else:
        slack = int(peak * ALLOCATOR_SLACK_FRACTION)
        if guess_reserved:
            extra.update(peak_reserved_bytes=peak + slack)
    kinds = dict(top.breakdown.bytes_by_kind)
    kinds[MemoryKind.CUDA_CONTEXT] = CUDA_CONTEXT_BYTES
    kinds[MemoryKind.ALLOCATOR_SLACK] = slack
    return Estimate(model=name, parameters=parameters, trainable_parameters=trainable, peak_allocated_bytes=peak,
                    total_bytes=peak + slack + CUDA_CONTEXT_BYTES, peak_phase=top.phase,
                    breakdown=Breakdown.of(kinds), phases=tuple(phases), assumptions=tuple(assumptions),
                    warnings=tuple(warnings), workload=workload, **extra)
