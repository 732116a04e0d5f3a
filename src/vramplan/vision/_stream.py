"""The ordered allocation/free stream of an image-model run, for the caching-allocator model.

Built from the same recorded program the estimate replays (:mod:`vramplan._engine.replay`, with event
emission) in the order of the calibration harness (``measure.py``: ``run_unet``, ``run_vision``):

* the model is created on the device in fp32 (``torch.device("cuda")`` with the default dtype), one
  tensor per parameter; ``model.to(dtype)`` then makes each 16-bit copy before the fp32 tensor dies;
* the script's inputs, then the cuBLAS workspaces at the first matmul;
* inference: three forwards under ``inference_mode`` (the output dropped each time);
* training: three steps of forward, ``backward``, ``optimizer.step()`` (AdamW's ``exp_avg``/``exp_avg_sq``
  per trained tensor in the first step, ``_foreach_sqrt``'s temporaries), ``zero_grad(set_to_none=True)``
  and ``del pred, loss``;
* peft adapters (``late_params``) are created on the device after the base model's cast, in their dtype
  (``_estimate.adapter_elem``: the base's, fp32 under fp16 mixed precision);
* with gradient accumulation, each step runs its micro-batches before the optimizer: the gradients of the
  first are kept and the later ones accumulate into them (a computed gradient added in place), and a
  micro-batch's output and loss die when the script rebinds them; the stream repeats from the second
  micro-batch on, so two stand for any number (as :mod:`vramplan.alloc_stream` does for language models);
* ``zero_grad(set_to_none=False)`` (``keep_grads``): the zeroed gradients stay allocated and later steps
  accumulate into them.

The peaks are reset before the last step, as the harness does before every step.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import allocator as A
from .._engine.loop import training_steps
from .._engine.replay import Event
from .._engine.replay import backward as replay_backward
from .._engine.replay import forward as replay_forward
from .._engine.step import CUBLAS_WORKSPACE_BYTES as CUBLAS_WORKSPACE
from .._engine.tape import ZERO, Tape, Tensor
from ..workload import Optimizer

__all__ = ["vision_events"]


class _Versions:
    """Maps the replay's keys to unique integers: a key allocated again (a recomputed tensor) is a new
    allocation; a free of a key that is not live is dropped."""

    def __init__(self) -> None:
        self.ev: list[Event] = []
        self.live: dict[object, int] = {}
        self.order: dict[int, None] = {}
        self._n = 0

    def alloc(self, key: object, n: int) -> None:
        self._n += 1
        if key in self.live:
            key = (key, self._n)
        self.live[key] = self._n
        self.order[self._n] = None
        self.ev.append((self._n, n))

    def free(self, key: object) -> None:
        g = self.live.pop(key, None)
        if g is not None:
            del self.order[g]
            self.ev.append((g, A.FREE))

    def add(self, items: list[Event], tag: object) -> list[object]:
        """Append the replay's events under ``tag`` (one step); returns the keys of parameter gradients."""
        grads: list[object] = []
        for key, n in items:
            k = (tag, key)
            if n >= 0:
                self.alloc(k, n)
                if isinstance(key, tuple) and key[0] == "p":
                    grads.append(k)
            else:
                self.free(k)
        return grads


def vision_events(net: Tape, param_sizes: Sequence[tuple[int, int]], seeds: Sequence[Tensor], *,
                  training: bool, opt_sizes: Sequence[int], optimizer: Optimizer, buffers: Sequence[int] = (),
                  steps: int = 3, late_params: Sequence[int] = (), accumulation: int = 1,
                  keep_grads: bool = False, staged: bool = True) -> list[Event]:
    """``param_sizes``: (elements, bytes per element as used) of every parameter tensor in creation order;
    ``late_params``: bytes of the tensors created after the cast (adapters); ``opt_sizes``: bytes of every trained
    tensor (the optimizer's per-tensor states and temporaries); ``accumulation``: micro-batches per optimizer step;
    ``keep_grads``: ``zero_grad(set_to_none=False)``; ``staged``: the model is created on the device in fp32 and cast
    (the calibration harness), otherwise each tensor arrives in its dtype (``from_pretrained`` on the CPU, then
    ``.to(device, dtype)``, as the diffusers training scripts load their models)."""
    from ..alloc_stream import _optimizer_tensors

    v = _Versions()
    if staged:
        for j, (numel, _elem) in enumerate(param_sizes):
            v.alloc(("w32", j), numel * 4)
        for j, (numel, elem) in enumerate(param_sizes):
            if elem != 4:  # model.to(dtype): the copy, then the fp32 tensor dies
                v.alloc(("w", j), numel * elem)
                v.free(("w32", j))
    else:
        for j, (numel, elem) in enumerate(param_sizes):
            v.alloc(("w", j), numel * elem)
    for j, n in enumerate(late_params):
        v.alloc(("late", j), n)
    for j, n in enumerate(buffers):
        v.alloc(("buf", j), n)
    for t in net.tensors:
        if t.external and t.base is None and t.nbytes:
            v.alloc(("in", id(t)), t.nbytes)
    for h in range(2 if training else 1):
        v.alloc(("cublas", h), CUBLAS_WORKSPACE)
    opt_states, opt_temps = _optimizer_tensors(optimizer, list(opt_sizes)) if training else ([], [])
    opt_keys = {("opt", j) for j in range(len(opt_states))}
    micro = min(accumulation, 2) if training else 1

    def begin(step: int) -> None:
        if step == steps - 1:
            v.ev.append((None, A.RESET))

    def micro_batch(step: int, mb: int, grads_exist: bool) -> list[object]:
        mb_before = set(v.live)
        fwd_ev: list[Event] = []
        fr = replay_forward(net, ZERO, ev=fwd_ev)
        v.add(fwd_ev, (step, mb))
        grads: list[object] = []
        if training:
            bwd_ev: list[Event] = []
            replay_backward(net, fr, seeds, ev=bwd_ev, param_grads_exist=grads_exist)
            grads = v.add(bwd_ev, (step, mb))
        if mb < micro - 1:  # the next micro-batch rebinds pred and loss: what this one left dies
            for key in [k for k in v.live if k not in mb_before and k not in grads]:
                v.free(key)
        return grads

    def optimizer_step(step: int) -> None:
        if step == 0:
            for j, n in enumerate(opt_states):
                v.alloc(("opt", j), n)
        for j, n in enumerate(opt_temps):
            v.alloc(("tmp", step, j), n)
        for j in range(len(opt_temps)):
            v.free(("tmp", step, j))

    for _step in training_steps(v, steps, micro, begin=begin, micro_batch=micro_batch,
                                optimizer_step=optimizer_step if training else None, persistent=opt_keys,
                                keep_grads=keep_grads):
        pass
    return v.ev


def pipeline_events(weights: Sequence[int], passes: Sequence[tuple[Tape, int]], *,
                    upcast: tuple[int, Sequence[tuple[int, int]]] | None = None) -> list[Event]:
    """The allocation stream of a diffusers pipeline call under ``inference_mode``.

    ``weights``: bytes of every parameter tensor as ``from_pretrained(torch_dtype=...)`` and ``pipe.to("cuda")``
    place them, component by component. ``passes``: (recorded program, calls) in order (each text encoder, the
    denoiser over the sampling loop, the VAE decode): the program's inputs are allocated, then its forward runs
    ``calls`` times, each call's outputs dropped when the next call's replace them (the loop rebinds
    ``noise_pred``; every step is the same, so two stand for any number); what a pass leaves is freed before the
    next. ``upcast``: (index of the pass, (bytes fp16, bytes fp32) per tensor, the last tensors of ``weights``)
    where the pipeline converts a component to fp32 first (``vae.to(torch.float32)`` under ``force_upcast``: each
    fp32 copy made before the fp16 tensor dies)."""
    v = _Versions()
    for j, n in enumerate(weights):
        v.alloc(("w", j), n)
    v.alloc(("cublas", 0), CUBLAS_WORKSPACE)
    for i, (tape, calls) in enumerate(passes):
        if upcast is not None and upcast[0] == i:
            for j, (_half, full) in enumerate(upcast[1]):
                v.alloc(("w32", j), full)
                v.free(("w", len(weights) - len(upcast[1]) + j))
        before = set(v.live)
        for t in tape.tensors:
            if t.external and t.base is None and t.nbytes:
                v.alloc(("in", i, id(t)), t.nbytes)
        previous: set[object] = set()
        for call in range(min(calls, 2)):
            start = set(v.live)
            ev: list[Event] = []
            replay_forward(tape, ZERO, ev=ev)
            v.add(ev, (i, call))
            for key in previous:
                v.free(key)
            previous = {k for k in v.live if k not in start}
        for key in [k for k in v.live if k not in before]:
            v.free(key)
    return v.ev
