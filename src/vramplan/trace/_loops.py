"""The training loops people run, traced: transformers' ``Trainer.training_step`` itself, TRL's ``SFTTrainer``
metrics and chunked loss (transcribed: TRL is not a dependency), activation offloading and every-N-layers
checkpointing. :func:`vramplan.trace._engine._train_loop` calls :func:`hf_train_loop` for ``--trainer hf`` and
``trl-sft``."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kinds import MemoryKind, Phase
from ..workload import Loss, Trainer, Workload
from ._tracker import MemoryTracker

__all__ = ["apply_checkpoint_every", "hf_train_loop", "patch_chunked_loss"]

# trl/trainer/utils.py entropy_from_logits (v1.9.0): rows per chunk
ENTROPY_CHUNK = 128
# trl/trainer/sft_trainer.py _CHUNKED_LM_HEAD_CHUNK_SIZE (v1.8.0-v1.9.0)
CE_CHUNK = 256
# trl/models/activation_offloading.py OffloadActivations(min_offload_size=1024)
MIN_OFFLOAD_BYTES = 1024



# markers in MemoryTracker.events around the untracked state-creating step (see harness_stream)
MARK = -5  # vramplan.allocator.simulate skips event codes it does not know
OPT_STATE_BEGIN = "optimizer state: begin"
OPT_STATE_END = "optimizer state: end"


def harness_stream(events: list[tuple[object, int]], workspaces: int, steps: int = 3) -> list[tuple[object, int]]:
    """The traced allocation stream as the calibration loop (measure.py) runs it, for the allocator model.

    The trace creates the optimizer state by one untracked step on zero gradients and then traces one step that
    stands for every later one; what the caching allocator reserves depends on the history, so the stream is
    rebuilt as the harness runs it: the parameters, a first step whose ``optimizer.step()`` creates the state
    (the tensors the state-creating step left live, allocated where the traced step's optimizer phase starts),
    then the traced step again up to ``steps``, the peaks reset at each later step's start. The cuBLAS
    workspaces (``workspaces`` x 32 MiB) are allocated at the first step's start, as the estimate's stream does.
    Without the markers (inference) the stream is returned with the workspaces before the first phase."""
    from ..allocator import FREE, PHASE, RESET

    ws = [(("cublas", i), 32 << 20) for i in range(workspaces)]
    names = [k for k, n in events if n == MARK]
    if OPT_STATE_BEGIN not in names or OPT_STATE_END not in names:
        first = next((i for i, (_, n) in enumerate(events) if n == PHASE), len(events))
        return events[:first] + ws + events[first:]
    i0 = next(i for i, e in enumerate(events) if e == (OPT_STATE_BEGIN, MARK))
    i1 = next(i for i, e in enumerate(events) if e == (OPT_STATE_END, MARK))
    prefix, create, step = events[:i0], events[i0 + 1:i1], events[i1 + 1:]
    live: dict[object, int] = {}
    for k, n in create:
        if n >= 0:
            live[k] = n
        elif n == FREE:
            live.pop(k, None)
    state = list(live.items())
    before = {k for k, n in prefix if n >= 0} | set(live)
    opt_at = next((i for i, (k, n) in enumerate(step) if n == PHASE and k == "optimizer_step"), len(step))
    out = prefix + ws
    for c in range(steps):
        if c:
            out.append((None, RESET))
        mine: set[object] = set()
        for i, (k, n) in enumerate(step):
            if c == 0 and i == opt_at:
                out.extend(state)
            if n >= 0:
                mine.add(k)
                out.append(((c, k), n))
            elif n == FREE:
                if k in mine:
                    out.append(((c, k), n))
                elif k in before and c == 0:
                    out.append((k, n))
            else:
                out.append((k, n))
        if c == 0 and opt_at == len(step):
            out.extend(state)
    return out


def create_optimizer_state(opt: torch.optim.Optimizer, params: list[nn.Parameter], tracker: MemoryTracker) -> None:
    """Steady state: the optimizer state exists. One untracked step on zero gradients creates it (the first real
    step differs from the later ones only in that), and the tracker marks it as optimizer state."""
    tracker.set_phase(None)
    tracker.events.append((OPT_STATE_BEGIN, MARK))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker.events.append((OPT_STATE_END, MARK))
    mark_optimizer_state(opt, tracker)


def drop_state_without_grad(opt: torch.optim.Optimizer, params: list[nn.Parameter], tracker: MemoryTracker) -> None:
    """After the traced step's backward: the parameters backward gave no gradient (a layer the forward skips, a
    module it never calls) get no optimizer state in a real run. torch's optimizers create a parameter's state in
    its first ``step()`` and only for a parameter whose ``grad`` is not None (torch/optim/adam.py ``_init_group``,
    which AdamW inherits; sgd.py, _adafactor.py, _muon.py alike; bitsandbytes' ``Optimizer8bit.step``), so the state
    :func:`create_optimizer_state` made for every trainable parameter is taken back for those: out of the optimizer,
    out of every phase peak recorded since (it was live through all of them) and out of the state-creating events
    (``harness_stream`` allocates the rest where the first step's ``optimizer.step()`` begins, in creation order,
    which is the parameters' order as in ``_init_group``)."""
    idle = [p for p in params if p.grad is None]
    if not idle:
        return
    tensors: list[torch.Tensor] = []
    for o in (opt, *getattr(opt, "parts", ())):
        for p in idle:
            state = o.state.pop(p, None)
            if state:
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    keys = tracker.retract(tensors)
    del tensors
    ev = tracker.events
    i0 = next(i for i, e in enumerate(ev) if e == (OPT_STATE_BEGIN, MARK))
    i1 = next(i for i in range(i0, len(ev)) if ev[i] == (OPT_STATE_END, MARK))
    drop: set[int] = set()
    for i in range(i1 - 1, i0, -1):  # the latest allocation of a key in the creating step is the live state's
        k, n = ev[i]
        if n >= 0 and isinstance(k, int) and k in keys:
            keys.discard(k)
            drop.add(i)
    tracker.events = [e for i, e in enumerate(ev) if i not in drop]


def mark_optimizer_state(opt: torch.optim.Optimizer, tracker: MemoryTracker) -> None:
    tracker.mark([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)],
                 MemoryKind.OPTIMIZER_STATE)


def traced_backward(loss: torch.Tensor, params: list[nn.Parameter], tracker: MemoryTracker) -> None:
    """``loss.backward()`` as the backward phase; the parameters' gradients marked as such."""
    tracker.where = "backward"
    tracker.set_phase(Phase.BACKWARD)
    loss.backward()
    tracker.region = MemoryKind.ACTIVATIONS
    tracker.mark([p.grad for p in params if p.grad is not None], MemoryKind.GRADIENTS)


def traced_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], tracker: MemoryTracker) -> None:
    """measure.py's ``optimizer.step()`` then ``zero_grad(set_to_none=True)`` as the optimizer-step phase (the
    state of a parameter backward gave no gradient taken back first: :func:`drop_state_without_grad`)."""
    drop_state_without_grad(opt, params, tracker)
    tracker.where = "optimizer.step"
    tracker.set_phase(Phase.OPTIMIZER_STEP)
    opt.step()
    mark_optimizer_state(opt, tracker)
    opt.zero_grad(set_to_none=True)

def apply_checkpoint_every(model: nn.Module, every: int) -> None:
    """Keep gradient checkpointing on decoder layers 0, N, 2N, ... only (transformers' GradientCheckpointingLayer
    reads its own ``gradient_checkpointing`` flag)."""
    from ._build import _decoder_layers

    _, layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i % every == 0


def _entropy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """TRL 1.9 ``SFTTrainer.compute_loss`` (loss_type nll): entropy and token accuracy of the shifted logits under
    no_grad; the entropy runs ``log_softmax`` / ``exp`` / product per chunk of 128 flattened rows."""
    with torch.no_grad():
        shift_logits = logits[..., :-1, :]
        shift_labels = labels[..., 1:]
        flat = shift_logits.reshape(-1, shift_logits.shape[-1])
        parts = []
        for chunk in flat.split(ENTROPY_CHUNK, dim=0):
            logp = F.log_softmax(chunk, dim=-1)
            parts.append(-(torch.exp(logp) * logp).sum(-1))
        entropy = torch.cat(parts, dim=0).reshape(shift_logits.shape[:-1])
        del flat, parts
        predictions = shift_logits.argmax(dim=-1)
        mask = shift_labels != -100
        (entropy * mask).sum()
        ((predictions == shift_labels) & mask).sum()


def _chunk_ce(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One chunk of TRL's ``_chunk``: fp32 logits of the chunk, log_softmax, nll, argmax accuracy, entropy."""
    logits = h.float() @ w.float().t()
    log_p = F.log_softmax(logits, dim=-1)
    loss = F.nll_loss(log_p, labels, ignore_index=-100, reduction="sum")
    valid = labels != -100
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum().float()
    entropy = (-(log_p.exp() * log_p).sum(dim=-1) * valid).sum()
    return loss, correct, entropy


def _chunked_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> Any:
    """TRL 1.9 ``_chunked_cross_entropy_loss``: shift, gather the valid tokens to the front, and run each chunk
    under non-reentrant checkpoint."""
    hidden = hidden_states[..., :-1, :].reshape(-1, hidden_states.size(-1))
    lbl = labels[..., 1:].reshape(-1)
    valid = lbl != -100
    order = valid.to(torch.int8).argsort(descending=True, stable=True)
    hidden = hidden[order]
    lbl = lbl[order]
    n = hidden.shape[0]
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = hidden.new_zeros((), dtype=torch.float32)
    entropy = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        cl, cc, ce = torch.utils.checkpoint.checkpoint(_chunk_ce, hidden[start:start + chunk], weight,
                                                       lbl[start:start + chunk], use_reentrant=False)
        loss = loss + cl
        correct = correct + cc
        entropy = entropy + ce
    return loss / n, correct, entropy


def patch_chunked_loss(model: nn.Module, chunk: int) -> None:
    """TRL 1.9 ``_patch_chunked_ce_lm_head``: with labels, the forward runs the backbone, skips ``lm_head`` and
    computes the loss by :func:`_chunked_loss` (no logits in the output)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = target.get_output_embeddings()
    original = target.forward

    def forward(input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if labels is None:
            return original(input_ids=input_ids, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("num_items_in_batch", None)
        out = target.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        loss, _, _ = _chunked_loss(out.last_hidden_state, head.weight, labels, chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    target.forward = forward


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    """TRL/torchtune ``OffloadActivations`` without streams: every saved non-parameter tensor of at least 1 KiB
    goes to pinned host memory when autograd packs it (its GPU storage dies with its last reference) and comes
    back as a new allocation when backward unpacks it; the output head is opted out (``NoOpManager``)."""

    def __init__(self, params: set[int]) -> None:
        self.host = 0
        self.enabled = True

        def pack(t: torch.Tensor) -> Any:
            nbytes = t.untyped_storage().nbytes() if t.device.type != "meta" else 0
            if not self.enabled or id(t) in params or nbytes < MIN_OFFLOAD_BYTES or isinstance(t, nn.Parameter):
                return t
            self.host += nbytes
            return ("host", t.shape, t.dtype, t.stride(), t.requires_grad)

        def unpack(p: Any) -> torch.Tensor:
            if isinstance(p, tuple) and p and p[0] == "host":
                _, shape, dtype, stride, _rg = p
                return torch.empty_strided(shape, stride, dtype=dtype)
            return p  # type: ignore[no-any-return]

        super().__init__(pack, unpack)


@contextlib.contextmanager
def _noop_in(module: nn.Module | None, off: _Offload | None) -> Iterator[None]:
    if module is None or off is None:
        yield
        return
    h1 = module.register_forward_pre_hook(lambda *a: setattr(off, "enabled", False))
    h2 = module.register_forward_hook(lambda *a: setattr(off, "enabled", True), always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def hf_train_loop(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, params: list[nn.Parameter],
                  tracker: MemoryTracker, autocast: Any, workload: Workload, head: nn.Module | None,
                  notes: list[str], extra: dict[str, Any] | None = None) -> None:
    """transformers 5.x ``Trainer.training_step`` run for real (trainer.py: compute_loss under the autocast
    context, ``loss / gradient_accumulation_steps``, ``accelerator.backward``), then what ``_inner_training_loop``
    does at a step boundary: ``clip_grad_norm_`` (max_grad_norm 1.0), ``optimizer.step()``, ``model.zero_grad()``.
    For ``trl-sft`` the trainer's ``compute_loss`` adds TRL's metrics (loss standard) or the model's forward is
    TRL's chunked loss (chunked)."""
    import transformers

    sft = workload.trainer is Trainer.TRL_SFT
    loss_kind = workload.resolved_loss
    metrics = sft and loss_kind is Loss.STANDARD

    class _Traced(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if metrics:
                _entropy_metrics(outputs.logits, labels)
            del outputs
            # compute_loss returns only the loss: from here the backward (training_step's accelerator.backward)
            tracker.region = MemoryKind.LOGITS_LOSS
            tracker.where = "backward"
            tracker.set_phase(Phase.BACKWARD)
            return loss

    with tempfile.TemporaryDirectory() as out_dir:
        args = transformers.TrainingArguments(
            output_dir=out_dir, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            gradient_accumulation_steps=workload.gradient_accumulation, max_grad_norm=1.0)
        tracker.set_phase(None)
        trainer = _Traced(model=model, args=args)
    trainer.optimizer = opt
    trainer.current_gradient_accumulation_steps = workload.gradient_accumulation
    # _inner_training_loop counts the target tokens of the accumulated batches (labels != -100 after the shift)
    items = workload.gradient_accumulation * ids.shape[0] * (ids.shape[1] - 1)
    notes.append(f"loop: transformers {transformers.__version__} Trainer.training_step run on the traced model, "
                 "then clip_grad_norm_(1.0), optimizer.step(), model.zero_grad()")
    if metrics:
        notes.append("TRL 1.9 SFTTrainer.compute_loss metrics transcribed (TRL is not installed): entropy in "
                     "128-row chunks and token accuracy from the logits, under no_grad")
    create_optimizer_state(opt, params, tracker)
    offload = _Offload({id(p) for p in model.parameters()}) if workload.activation_offload else None
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast is not None else contextlib.nullcontext()
    for _ in range(min(workload.gradient_accumulation, 2)):
        tracker.set_phase(Phase.FORWARD)
        tracker.region = MemoryKind.ACTIVATIONS
        with ctx, offload if offload is not None else contextlib.nullcontext(), _noop_in(head, offload):
            trainer.training_step(model, {"input_ids": ids, "labels": ids, **(extra or {})},
                                  num_items_in_batch=items)
        tracker.region = MemoryKind.ACTIVATIONS
        tracker.mark([p.grad for p in params if p.grad is not None], MemoryKind.GRADIENTS)
    if offload is not None:
        notes.append(f"activation offloading: {offload.host / 2**30:.3f} GiB of saved tensors went to the host "
                     "per micro-batch")
    drop_state_without_grad(opt, params, tracker)
    tracker.where = "optimizer.step"
    tracker.set_phase(Phase.OPTIMIZER_STEP)
    trainer._clip_grad_norm(model)
    opt.step()
    mark_optimizer_state(opt, tracker)
    model.zero_grad(set_to_none=True)
    tracker.set_phase(None)
