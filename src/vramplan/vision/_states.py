"""Model states of an image model: weights, master weights, gradients, optimizer states and step temporaries.

Optimizer rules are :mod:`vramplan.memory`'s (torch foreach AdamW's ``sqrt(v)`` temporary, bitsandbytes
8-bit blockwise states, SGD momentum, Adafactor, Lion). On top, every parameter-sized tensor is
accounted the way the CUDA caching allocator accounts it (:func:`vramplan.allocator.block_bytes`): image
models have many
weight tensors whose sizes are not multiples of the allocator's 2 MiB rounding (SDXL's 25 MiB GEGLU
projections take 26 MiB blocks), and weights, gradients, both AdamW moments and the ``sqrt`` temporary
each pay it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..allocator import block_bytes
from ..memory import ModelStates, _optimizer_bytes
from ..workload import Optimizer

__all__ = ["model_states"]

def _blocks(sizes: Sequence[int], elem: int) -> int:
    """Bytes the parameter-sized tensors ``sizes`` (element counts) take as blocks: each distinct size once
    (an SDXL UNet has ~1700 tensors of a few dozen sizes)."""
    return sum(block_bytes(n * elem) * k for n, k in Counter(sizes).items())


def model_states(frozen: Sequence[int], frozen_elem: int, trained: Sequence[int], train_elem: int, *,
                 amp: bool, training: bool, optimizer: Optimizer, adapters: Sequence[int] = (),
                 adapter_elem: int = 4) -> ModelStates:
    """States of one model: ``frozen``/``trained``/``adapters`` are per-tensor element counts.

    Trained base tensors are stored in ``train_elem`` bytes (fp32 under AMP, where they count as master
    weights). LoRA adapters, their gradients and optimizer states are stored in ``adapter_elem`` bytes: the dtype
    diffusers' ``add_adapter`` leaves them in (the frozen base's), fp32 where the scripts call
    ``cast_training_params`` (``_estimate.adapter_elem``). They are trained directly, never as master weights.
    """
    notes: list[str] = []
    weights = _blocks(frozen, frozen_elem)
    master = 0
    if not training:
        weights += _blocks(trained, train_elem) + _blocks(adapters, adapter_elem)
        total = sum(frozen) + sum(trained) + sum(adapters)
        return _states(total, 0, weights, 0, 0, 0, 0, ())
    if amp:
        master = _blocks(trained, 4)
        notes.append("AMP: fp32 trained parameters (master weights); autocast's 16-bit copies count as weights")
    else:
        weights += _blocks(trained, train_elem)
    weights += _blocks(adapters, adapter_elem)
    grads = _blocks(trained, train_elem) + _blocks(adapters, adapter_elem)
    state = temp = 0
    for sizes, elem in ((trained, train_elem), (adapters, adapter_elem)):
        if not sizes:
            continue
        numel = sum(sizes)
        s, t, note = _optimizer_bytes(optimizer, numel, elem, Counter(sizes))
        extra = _blocks(sizes, elem) - numel * elem  # allocator rounding of each parameter-sized tensor
        if optimizer in (Optimizer.ADAMW, Optimizer.ADAMW_FUSED):
            s += 2 * extra
        elif optimizer is Optimizer.SGD:
            s += extra
        if t and optimizer is Optimizer.ADAMW:
            t += extra
        state += s
        temp += t
        if note not in notes:
            notes.append(note)
    trainable = sum(trained) + sum(adapters)
    return _states(sum(frozen) + sum(trained) + sum(adapters), trainable, weights, master, grads, state, temp,
                  tuple(notes))


def _states(parameters: int, trainable: int, weights: int, master: int, grads: int, state: int, temp: int,
            notes: tuple[str, ...]) -> ModelStates:
    return ModelStates(parameters=parameters, trainable_parameters=trainable, weights=weights, master_weights=master,
                       quant_constants=0, gradients=grads, optimizer_state=state, step_temporaries=temp,
                       trainable_layers=0, notes=notes)
