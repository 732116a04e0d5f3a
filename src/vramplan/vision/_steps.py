"""Phases of a training step or an inference pass over recorded networks, and the resulting Estimate.

A training step is the calibration harness's loop (``measure.py``): forward (under autocast for AMP),
loss, ``loss.backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, with the model
output and loss still referenced until the next step; the optimizer states exist from the first step
on, so the steady state (step 2 onwards) is what is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._engine.replay import backward as replay_backward
from .._engine.replay import forward as replay_forward
from .._engine.step import states_moment as state_moment
from .._engine.tape import ZERO, Moment, Tape, Tensor
from ..kinds import MemoryKind
from ..memory import ModelStates

__all__ = ["StepResult", "infer_pass", "train_step"]

K = MemoryKind


@dataclass(frozen=True, slots=True)
class StepResult:
    forward: Moment
    backward: Moment
    step: Moment


def train_step(net: Tape, states: ModelStates, seeds: Sequence[Tensor], extra: Moment = ZERO, *,
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


def infer_pass(net: Tape, base: Moment) -> Moment:
    """Peak of one inference forward (``torch.inference_mode``) on top of ``base``."""
    return replay_forward(net, base).peak
