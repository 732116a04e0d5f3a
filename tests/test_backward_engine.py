"""The training backward as autograd's engine runs it: which gradient buffers it allocates, shares and adds into.

``torch/csrc/autograd/input_buffer.cpp`` adds a second gradient into the first in place only when the first holds its
storage alone; a gradient that is a view (``ViewBackward0``'s reshape of a linear's input gradient, ``TBackward0``'s
transpose of a weight gradient) keeps its base referenced, so the sum is a new buffer (checked on real CPU tensors
through data pointers). ``AddBackward0`` hands its output gradient itself to both inputs."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan._engine.replay import Event, layer_backward
from vramplan._engine.tape import Tape, Tensor
from vramplan.alloc_stream import train_events
from vramplan.allocator import FREE, PHASE
from vramplan.api import estimate, make_workload
from vramplan.estimator import numerics, runs_as
from vramplan.hfconfig import spec_from_config
from vramplan.memory import model_states

TIED: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": True}


def _allocs(ev: list[Event], n: int) -> int:
    return sum(1 for _, m in ev if m == n)


def _shared_input(view: bool) -> tuple[Tape, Tensor]:
    """Two projections of one normed input (the MLP's gate and up, attention's q/k/v)."""
    tp = Tape(True)
    x = tp.input(8192, 2, rg=True)
    h = tp.op(8192, 2, (x,))
    outs = []
    for _ in range(2):
        outs.append(tp.op(1024, 2, (h,), save=(h,)))
        tp.ops[-1].view_grad_in = view
    tp.keep(tp.op(1024, 2, tuple(outs)))
    return tp, h


def test_a_view_gradient_is_added_out_of_place() -> None:
    size = 8192 * 2
    plain_ev: list[Event] = []
    view_ev: list[Event] = []
    plain = layer_backward(_shared_input(False)[0], ev=plain_ev)
    tp, h = _shared_input(True)
    view = layer_backward(tp, ev=view_ev)
    # in place: the first gradient, then the second added into it; out of place: a third buffer holds the sum
    assert _allocs(view_ev, size) == _allocs(plain_ev, size) + 1
    # the sum is made once the node has returned: after the saved input it held is released
    sum_at = max(j for j, (_, n) in enumerate(view_ev) if n == size)
    assert next(j for j, (k, n) in enumerate(view_ev) if k is h and n == FREE) < sum_at
    assert view.peak == plain.peak


def test_an_add_hands_its_gradient_to_both_inputs() -> None:
    tp = Tape(True)
    x = tp.input(1024, 2, rg=True)
    a = tp.op(1024, 2, (x,), save=(x,))
    out = tp.op(1024, 2, (x, a))
    tp.ops[-1].add_like = True
    tp.keep(out)
    ev: list[Event] = []
    layer_backward(tp, ev=ev)
    # AddBackward0 allocates nothing; the op on ``a`` computes x's second gradient and adds it in place
    # (the shared buffer is held alone by then)
    assert _allocs(ev, 1024 * 2) == 1


def _backward_of_step(spec: Any, w: Any, step: int) -> list[Event]:
    w2 = runs_as(spec, w)
    ev = list(train_events(spec, w2, model_states(spec, w2), numerics(w2), 3))
    out: list[Event] = []
    seen, on = 0, False
    for k, n in ev:
        if n == PHASE:
            seen += k == "backward"
            on = k == "backward" and seen == step
            continue
        if on:
            out.append((k, n))
    return out


@pytest.mark.parametrize("amp", [False, True])
def test_tied_embedding_gradients_meet_in_the_accumulate_grad_buffer(amp: bool) -> None:
    spec = spec_from_config(dict(TIED))
    w = make_workload(method="full", batch_size=1, seq_len=128, **({"precision": "amp-bf16"} if amp else {}))
    elem = 4 if amp else 2
    table = 32000 * 512 * elem
    bwd = _backward_of_step(spec, w, 2)
    sizes: dict[object, int] = {}
    for k, n in bwd:
        if n >= 0:
            sizes[k] = n
    made = _allocs(bwd, table)
    died = sum(1 for k, n in bwd if n == FREE and sizes.get(k) == table)
    if amp:
        # the head's gradient is the weight cast's (ToCopyBackward0, a tensor of its own): the embedding's is added
        # into it in place
        assert (made, died) == (2, 1)
    else:
        # the head's (TBackward0: a view), the embedding's, their sum; the sum stays as .grad, the other two die
        assert (made, died) == (3, 2)


@pytest.mark.slow
def test_tied_training_reserved_follows_the_trace() -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    w = make_workload(method="full", batch_size=2, seq_len=1024)
    traced = trace_workload(dict(TIED), w)
    est = estimate(spec_from_config(dict(TIED)), w)
    assert abs(est.peak_allocated_bytes / traced.peak_allocated_bytes - 1) < 0.01
    assert abs(est.peak_reserved_bytes / traced.peak_reserved_bytes - 1) < 0.02, \
        (est.peak_reserved_bytes / 2**30, traced.peak_reserved_bytes / 2**30)
