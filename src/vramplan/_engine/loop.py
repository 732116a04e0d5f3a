"""The order of a training step's phases over an allocation stream, for every model kind.

The calibration harness (``/work/shared/calibration/measure.py``, repeated by ``vramplan measure``) runs each step
as: every micro-batch's forward and ``loss.backward()`` (the gradients of the first kept, the later ones adding
into them), ``optimizer.step()``, ``optimizer.zero_grad()``, then ``del out, loss``: what the step made and did not
keep dies. The language-model stream (:mod:`vramplan.alloc_stream`) and the image-model stream
(:mod:`vramplan.vision._stream`) both run their recorded programs through :func:`training_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from typing import Protocol

__all__ = ["StepStream", "training_steps"]


class StepStream(Protocol):
    """An allocation stream being built: the keys now allocated, in allocation order, and a free that drops
    keys which are not live."""

    @property
    def live(self) -> Mapping[object, object]: ...

    def free(self, key: object) -> None: ...


def training_steps(st: StepStream, steps: int, micro: int, *, begin: Callable[[int], None],
                   micro_batch: Callable[[int, int, bool], Sequence[object]],
                   optimizer_step: Callable[[int], None] | None, persistent: Container[object] = (),
                   keep_grads: bool = False) -> Iterator[int]:
    """Run ``steps`` steps of ``micro`` micro-batches each on ``st``, yielding each step's index once it ends.

    ``begin(step)``: the step's markers (peak resets, probes); ``micro_batch(step, mb, grads_exist)``: one forward
    and backward (``grads_exist``: the parameter gradients are already allocated, so the backward accumulates into
    them), returning the keys of the parameter gradients it made, in order; ``optimizer_step(step)`` (None:
    inference) allocates the optimizer's states (step 0) and temporaries. Then ``zero_grad``: with
    ``set_to_none=True`` every gradient dies, in parameter order (the reverse of backward's); ``keep_grads``
    (``set_to_none=False``) keeps them allocated for the next steps. Last, whatever the step allocated that is not
    a kept gradient or ``persistent`` (the optimizer's states) dies."""
    kept: set[object] = set()  # gradients zero_grad(set_to_none=False) leaves allocated
    for step in range(steps):
        before = set(st.live)
        begin(step)
        grads: list[object] = []
        for mb in range(micro):
            grads += micro_batch(step, mb, mb > 0 or bool(kept))
        if optimizer_step is not None:
            optimizer_step(step)
        if keep_grads:
            kept.update(grads)
        else:
            for key in reversed(grads):
                st.free(key)
        for key in [k for k in st.live if k not in before and k not in kept and k not in persistent]:
            st.free(key)
        yield step
