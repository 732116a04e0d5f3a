"""Model states of an image model: weights, master weights, gradients, optimizer states and step temporaries.

Optimizer rules are :mod:`vramplan.memory`'s (torch foreach AdamW's ``sqrt(v)`` temporary, bitsandbytes
8-bit blockwise states, SGD momentum, Adafactor, Lion). On top, every parameter-sized tensor is
accounted the way the CUDA caching allocator accounts it (:func:`block_bytes`): image models have many
weight tensors whose sizes are not multiples of the allocator's 2 MiB rounding (SDXL's 25 MiB GEGLU
projections take 26 MiB blocks), and weights, gradients, both AdamW moments and the ``sqrt`` temporary
each pay it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..memory import _optimizer_bytes
from ..units import MiB
from ..workload import Optimizer

__all__ = ["States", "block_bytes", "model_states"]

_MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to 512 bytes
_SMALL = 1 * MiB  # kSmallSize: requests up to 1 MiB come from the small pool
_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: larger requests get their own segment ...
_ROUND_LARGE = 2 * MiB  # kRoundLarge: ... rounded up to 2 MiB


def block_bytes(nbytes: int) -> int:
    """Bytes ``torch.cuda.memory_allocated`` counts for one request of ``nbytes`` on a fresh segment.

    ``c10/cuda/CUDACachingAllocator.cpp``: requests are rounded to 512 bytes; a request of 10 MiB or
    more gets a segment rounded up to 2 MiB, and the remainder is split off as a free block only if
    it exceeds 1 MiB (``should_split``) — otherwise the whole segment is the allocated block.
    """
    if nbytes <= 0:
        return 0
    n = -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK
    if n >= _MIN_LARGE_ALLOC:
        seg = -(-n // _ROUND_LARGE) * _ROUND_LARGE
        if seg - n <= _SMALL:
            return seg
    return n


def _blocks(sizes: Sequence[int], elem: int) -> int:
    return sum(block_bytes(n * elem) for n in sizes)


@dataclass(frozen=True, slots=True)
class States:
    """Bytes of everything that lives across steps, plus the optimizer step's temporaries."""

    parameters: int
    trainable_parameters: int
    weights: int  # weights the forward reads (16-bit, or fp32 without autocast), frozen parts included
    master_weights: int  # fp32 trained parameters under autocast
    gradients: int
    optimizer_state: int
    step_temporaries: int
    notes: tuple[str, ...]


def model_states(frozen: Sequence[int], frozen_elem: int, trained: Sequence[int], train_elem: int, *,
                 amp: bool, training: bool, optimizer: Optimizer, adapters: Sequence[int] = ()) -> States:
    """States of one model: ``frozen``/``trained``/``adapters`` are per-tensor element counts.

    Trained base tensors are stored in ``train_elem`` bytes (fp32 under AMP, where they count as master
    weights); LoRA adapters are fp32 (peft's ``autocast_adapter_dtype``, diffusers' ``cast_training_params``).
    """
    notes: list[str] = []
    weights = _blocks(frozen, frozen_elem)
    master = 0
    if not training:
        weights += _blocks(trained, train_elem) + _blocks(adapters, 4)
        total = sum(frozen) + sum(trained) + sum(adapters)
        return States(total, 0, weights, 0, 0, 0, 0, ())
    if amp:
        master = _blocks(trained, 4) + _blocks(adapters, 4)
        notes.append("AMP: fp32 trained parameters (master weights); autocast's 16-bit copies count as weights")
    else:
        weights += _blocks(trained, train_elem) + _blocks(adapters, 4)
    grads = _blocks(trained, train_elem) + _blocks(adapters, 4)
    state = temp = 0
    for sizes, elem in ((trained, train_elem), (adapters, 4)):
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
    return States(sum(frozen) + sum(trained) + sum(adapters), trainable, weights, master, grads, state, temp,
                  tuple(notes))
