"""Looped layer stacks: a forward that calls groups of decoder layers several times, some of the calls under
``torch.no_grad`` (modeling_hrm_text.py, transformers 5.24: HRM-Text's two stacks in nested H/L reasoning cycles).

The spec keeps the physical layers (their parameters, adapters and optimizer states count once) and lists the calls
as :class:`~vramplan.spec.StackRun` data; :func:`build_body` records the whole schedule on one tape:

* the carried states: state 0 is the scaled embeddings, the others a fresh contiguous copy of a frozen initial
  vector (``z_L_init.expand_as(z_H).contiguous()``); each call's input is their sum (one ``add`` per extra state),
  its output (after the stack's weightless final norm) replaces its state, and the Python variables hold each state
  until it is replaced;
* a call under ``torch.no_grad`` is recorded with autograd off (nothing saved, no parameter gradient, outputs that
  do not require grad), its dropout still on;
* every call of one physical layer names the same parameters: backward allocates each gradient at its first
  contribution and adds the later ones into it (the autograd InputBuffer of the parameter's one AccumulateGrad);
* in inference every call stores its own keys and values (``cache.update(..., layer_idx + cycle_offset)``: one
  DynamicCache slot per call, ``num_hidden_layers = layers per stack x H_cycles x (L_cycles + 1)``).

The schedule is read from the config the way the model's forward computes it (:func:`hrm_runs`);
``vramplan.derive._loops`` checks it against the real forward (the stack calls and their grad mode).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._engine.tape import Tape, Tensor
from .blocks import _B, LayerPlan, Numerics, resid_elem
from .errors import ConfigError
from .spec import ModelSpec, NormKind, StackRun

__all__ = ["LOOP_CLASSES", "LOOP_READERS", "build_body", "cache_calls", "hrm_runs"]


class _Scoped(_B):
    """A builder whose parameter gradients are named by the physical layer and the order of the calls within one
    invocation of it: every call of the layer makes the same sequence of parameter gradients."""

    scope = -1
    calls = 0

    def param_grad(self, name: str, numel: int, elem: int) -> tuple[tuple[int, int], ...]:
        if self.scope < 0:
            return super().param_grad(name, numel, elem)
        self.calls += 1
        return ((hash(("loop", self.scope, self.calls)), numel * elem),)


def build_body(tp: Tape, spec: ModelSpec, num: Numerics, plan: LayerPlan, batch: int, seq: int,
               kv_len: int | None = None, ckpt_every: int = 0) -> Tensor:
    """Record every stack call of ``spec.stack_runs`` in order; the tape's input is the scaled embeddings (state 0),
    held by the base model's ``inputs_embeds`` until its forward returns; returns the last state 0 (kept: the head's
    input). ``ckpt_every`` N: the layers whose index is a multiple of N run under ``torch.utils.checkpoint`` in the
    calls that record autograd."""
    h = spec.hidden_size
    t = batch * seq
    bld = _Scoped(tp, spec, num, batch, seq, plan, kv_len)
    x = tp.input(t * h, resid_elem(num), plan.input_rg)
    states = [x] + [tp.op(t * h, x.elem, (), rg=False) for _ in range(spec.carried_states - 1)]
    training = tp.training
    for run in spec.stack_runs:
        tp.training = training and run.grad
        try:
            y = states[0]
            for other in states[1:]:
                y = bld.add(other, y) if run.state else bld.add(y, other)
            for li in range(run.first, run.first + run.count):
                bld.scope, bld.calls = li, 0
                inp = y
                with tp.checkpoint(bool(ckpt_every) and li % ckpt_every == 0):
                    y = bld.layer(inp)
                (y.base or y).keep = False  # the next call's input, not the caller's: it dies at its last use
                inp.last_use = max(inp.last_use, len(tp.ops) - 1)  # ``hidden_states = layer(hidden_states)``
            bld.scope = -1
            y = bld.norm(y, h, False)  # the stack's final_norm (no weight)
        finally:
            tp.training = training
        old = states[run.state]
        tp.hold(old)  # the variable holds the previous state until the call returns
        states[run.state] = y
    tp.hold(x, *states)  # inputs_embeds and the states stay bound to the end of the forward
    tp.keep(states[0])
    return states[0]


def cache_calls(spec: ModelSpec) -> list[int]:
    """The physical layer of every attention call that writes a cache slot, in order (Inkling-2-Loop: the loop layers'
    cache copies of the later passes come after the model's layers, Inkling2LoopTextModel.forward)."""
    if not spec.stack_runs:
        extra: list[int] = []
        if spec.inkling[6:8] and spec.inkling[6] < spec.inkling[7]:
            start, end, passes = spec.inkling[6:9]
            extra = [i for _ in range(passes - 1) for i in range(start, end)]
        return list(range(spec.num_layers)) + extra
    return [li for run in spec.stack_runs for li in range(run.first, run.first + run.count)]


def hrm_runs(per_stack: int, h_cycles: int, l_cycles: int, bp: list[int]) -> tuple[StackRun, ...]:
    """HrmTextModel.forward's schedule: for each H cycle, ``L_cycles`` calls of the L stack (layers 0 .. per_stack - 1,
    built first) of which the trailing ``L_bp_cycles_padded[h]`` record autograd (the earlier ones run under
    ``torch.no_grad``; the list is left-padded with 1 to H_cycles, and 1 beyond it), then one H stack call (layers
    per_stack .. 2 per_stack - 1) with autograd. z_L is state 1, z_H state 0."""
    padded = [1] * max(0, h_cycles - len(bp)) + list(bp)
    runs: list[StackRun] = []
    for hc in range(h_cycles):
        grad_calls = padded[hc] if hc < len(padded) else 1
        threshold = l_cycles - grad_calls
        runs += [StackRun(0, per_stack, lc >= threshold, 1) for lc in range(l_cycles)]
        runs.append(StackRun(per_stack, per_stack, True, 0))
    return tuple(runs)


def _hrm_text(c: Any, family: str) -> ModelSpec:
    """HRM-Text (modeling_hrm_text.py): two stacks of LLaMA-style layers with weightless RMSNorms (HrmTextRMSNorm), a
    per-channel sigmoid output gate from ``gate_proj`` computed beside q/k/v (held through the attention), MHA, the
    embeddings times ``embedding_scale``, each stack closed by its own weightless norm, no model-level norm, and the
    frozen ``z_L_init`` vector (a parameter outside the layers)."""
    from .hfconfig import _MAX_LAYERS, _Cfg, _Facts, _llama_like

    assert isinstance(c, _Cfg)
    per = c.opt_int("num_layers_per_stack", hi=_MAX_LAYERS)
    total = c.int_("num_hidden_layers", hi=_MAX_LAYERS * 64)
    h_cycles = c.int_("H_cycles", default=2, hi=64)
    l_cycles = c.int_("L_cycles", default=3, hi=64)
    # HrmTextConfig.__post_init__: num_hidden_layers is the per-stack count on first construction; a saved config
    # holds both, the total only sizing the cache (the stacks are built from num_layers_per_stack)
    per = total if per is None else per
    bp = c.int_list("L_bp_cycles") or [2]
    if any(not 0 <= n <= l_cycles for n in bp):
        raise ConfigError(f"{c.where}: L_bp_cycles {bp} must count between 0 and L_cycles ({l_cycles}) inner calls")
    raw = {k: v for k, v in c.raw.items() if k not in ("num_key_value_heads",)}
    raw["num_hidden_layers"] = 2 * per
    facts = _Facts(version="5.24", norm=NormKind.RMSNORM_NO_WEIGHT, attn_gate="sigmoid", attn_gate_early=True,
                   attn_gate_heads=False, attn_gate_name="gate_proj")
    spec = _llama_like(_Cfg(raw, c.where), family, facts)
    # HrmTextPreTrainedModel._check_and_adjust_attn_implementation: FlashAttention cannot represent the prefix-LM mask
    refused = "with prefix_lm, FlashAttention cannot represent the prefix-LM 4-D mask" if \
        c.bool_("prefix_lm", default=True) else ""
    return replace(spec, embed_scale=True, final_norm=False, extra_params=spec.hidden_size,
                   stack_runs=hrm_runs(per, h_cycles, l_cycles, bp), carried_states=2, flash_refused=refused)


LOOP_READERS = {"hrm_text": _hrm_text}
LOOP_CLASSES = {"HrmTextForCausalLM": "hrm_text"}
