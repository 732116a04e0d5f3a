"""Phases of a training step or an inference pass over recorded networks, and the resulting Estimate.

A training step is the calibration harness's loop (``measure.py``): forward (under autocast for AMP),
loss, ``loss.backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, with the model
output and loss still referenced until the next step; the optimizer states exist from the first step
on, so the steady state (step 2 onwards) is what is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._tape import Tensor
from ..allocator import AllocStats
from ..kinds import MemoryKind, Phase
from ..result import Breakdown, Estimate, PhasePeak
from ..units import GiB, MiB
from ._graph import ZERO, Moment, Net, replay_backward, replay_forward
from ._states import States

__all__ = [
    "ALLOCATOR_SLACK_FRACTION", "CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "finish", "infer_pass",
    "train_step",
]

K = MemoryKind
# Same constants as the language-model estimator (vramplan.estimator): H200, torch 2.11, CUDA 13.
CUDA_CONTEXT_BYTES = int(0.516 * GiB)
CUBLAS_WORKSPACE_BYTES = 32 * MiB  # per cuBLAS handle; training uses two (main and autograd threads)
ALLOCATOR_SLACK_FRACTION = 0.10


@dataclass(frozen=True, slots=True)
class StepResult:
    forward: Moment
    backward: Moment
    step: Moment


def state_moment(states: States, *, workspace_handles: int, grads: bool = False, temporaries: bool = False) -> Moment:
    return Moment.of({
        K.WEIGHTS: states.weights, K.MASTER_WEIGHTS: states.master_weights,
        K.OPTIMIZER_STATE: states.optimizer_state + (states.step_temporaries if temporaries else 0),
        K.GRADIENTS: states.gradients if grads else 0,
        K.WORKSPACE: workspace_handles * CUBLAS_WORKSPACE_BYTES,
    })


def train_step(net: Net, states: States, seeds: Sequence[Tensor], extra: Moment = ZERO, *,
               grads_persist: bool = False) -> StepResult:
    """Forward, backward and optimizer step of one recorded program on top of the model states.

    ``extra``: memory held on top of the states for the whole step (other models' weights).
    ``grads_persist``: ``optimizer.zero_grad(set_to_none=False)`` (PyTorch < 2.0's default) keeps zeroed
    gradient tensors alive through the next forward and backward, which then accumulates into them.
    """
    base = state_moment(states, workspace_handles=2, grads=grads_persist) + extra
    fwd = replay_forward(net, base)
    bwd_peak, bwd_end = replay_backward(net, fwd, seeds, param_grads_exist=grads_persist)
    held = bwd_end.as_dict()  # what the script still references after backward (inputs, output, loss)
    kept = Moment.of({K.ACTIVATIONS: held.get(K.ACTIVATIONS, 0), K.LOGITS_LOSS: held.get(K.LOGITS_LOSS, 0)})
    step = state_moment(states, workspace_handles=2, grads=True, temporaries=True) + extra + kept
    return StepResult(fwd.peak, bwd_peak, step)


def infer_pass(net: Net, base: Moment) -> Moment:
    """Peak of one inference forward (``torch.inference_mode``) on top of ``base``."""
    return replay_forward(net, base).peak


def phase(p: Phase, m: Moment) -> PhasePeak:
    return PhasePeak(p, m.total, Breakdown.of(m.as_dict()))


def finish(name: str, phases: list[PhasePeak], *, parameters: int, trainable: int, assumptions: list[str],
           warnings: list[str], workload: dict[str, object], reserved: AllocStats | None = None) -> Estimate:
    """The Estimate; ``reserved``: the allocator replay's result where the run's stream is modelled,
    otherwise the slack is the calibration set's median fraction of the peak."""
    top = max(phases, key=lambda p: p.peak_allocated_bytes)
    peak = top.peak_allocated_bytes
    slack = int(peak * ALLOCATOR_SLACK_FRACTION) if reserved is None else max(0, reserved.peak_reserved_bytes - peak)
    kinds = {k: v for k, v in top.breakdown.bytes_by_kind}
    kinds[K.CUDA_CONTEXT] = CUDA_CONTEXT_BYTES
    kinds[K.ALLOCATOR_SLACK] = slack
    return Estimate(model=name, parameters=parameters, trainable_parameters=trainable, peak_allocated_bytes=peak,
                    total_bytes=peak + slack + CUDA_CONTEXT_BYTES, peak_phase=top.phase,
                    breakdown=Breakdown.of(kinds), phases=tuple(phases), assumptions=tuple(assumptions),
                    warnings=tuple(warnings), workload=workload, peak_reserved_bytes=peak + slack,
                    reserved_phases=reserved.phases if reserved is not None else ())
