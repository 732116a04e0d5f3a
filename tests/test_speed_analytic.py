"""The shortcuts of the analytic estimate give the figures of the long way, bit for bit.

* a block's forward is replayed once and shared with its backward (``_engine.replay.layer_passes``);
* per-model tables (parameter counts, layer groups, trainable tensor sizes) are worked out once per model;
* a vision-language estimate records the vision tower once per image shape (``multimodal._tower_run``) and takes the
  language model's analytic estimate, whose replay it never used (its reserve is the peak + the calibration slack).

Each is checked against a computation with the shortcut's cache cleared or the pieces run one by one.
"""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vramplan import estimate, make_workload
from vramplan import estimator as E
from vramplan import memory as M
from vramplan import multimodal as MM
from vramplan import params as P
from vramplan._engine.replay import layer_backward, layer_forward, layer_passes
from vramplan._engine.tape import Tape
from vramplan.blocks import build_layer
from vramplan.catalog import get_model
from vramplan.errors import VramplanError

MODELS = ["qwen3-0.6b", "llama-3.2-1b", "gemma-3-1b", "gemma-2-2b", "olmoe-1b-7b", "deepseek-v2-lite", "mamba-2.8b",
          "lfm2-1.2b", "jamba-v0.1", "recurrentgemma-2b", "gemma-3n-e2b", "qwen3-next-80b-a3b", "gpt2-medium",
          "bloom-560m", "phi-3-mini", "gpt-oss-20b", "falcon-7b"]
OPTIONS = [{}, {"method": "lora"}, {"method": "qlora", "gradient_checkpointing": True}, {"gradient_accumulation": 2},
           {"precision": "amp-bf16", "checkpointing": "every:2"}, {"method": "freeze", "trainable_layers": 2},
           {"activation_offload": True, "method": "lora"}, {"task": "infer"}]


def _clear() -> None:
    for f in (E._estimate_cached, E._phases, E._layer_groups, E._simulate_layer, E._simulate_body, P.count_params,
              M._model_tensor_sizes, M._model_states, MM._estimate_multimodal_cached, MM._tower_run):
        f.cache_clear()


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODELS), st.sampled_from(OPTIONS), st.integers(1, 3), st.integers(1, 700))
def test_shared_forward_gives_both_passes(model: str, options: dict[str, object], batch: int, seq: int) -> None:
    spec = get_model(model).spec
    try:
        w = E.runs_as(spec, make_workload(batch_size=batch, seq_len=seq, **options))
        E.peak_allocated(spec, w)
    except VramplanError:
        assume(False)
    num = E.numerics(w)
    assume(num.training)
    states = E.model_states(spec, w)
    layers_rg = E._trainable_parts(spec, w)[3]
    first = E._first_trainable(spec, w, states)
    for _count, trainable, moe, sliding, rope, _ck, kind, fresh in E._layer_groups(
            spec, first, w.checkpoint_every, E._no_grad_input(spec, w, first)):
        rg = layers_rg and (trainable or w.method.value != "freeze")
        plan = E._plan(spec, w, trainable, rg and not fresh, moe, sliding, rope, w.attention, kind)
        for grads in (False, True):
            one, two = Tape(True), Tape(True)
            build_layer(one, spec, num, plan, batch, seq)
            build_layer(two, spec, num, plan, batch, seq)
            assert layer_passes(one, param_grads_exist=grads) == \
                (layer_forward(two), layer_backward(two, param_grads_exist=grads))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODELS), st.sampled_from(OPTIONS), st.sampled_from(OPTIONS), st.integers(1, 3),
       st.integers(1, 700))
def test_warm_estimate_equals_a_cold_one(model: str, options: dict[str, object], before: dict[str, object],
                                         batch: int, seq: int) -> None:
    """The per-model tables cached by an earlier workload (other options, another shape) give the estimate a fresh
    process would."""
    spec = get_model(model).spec
    _clear()
    warm_up = make_workload(batch_size=batch + 1, seq_len=seq + 8, **before)
    w = make_workload(batch_size=batch, seq_len=seq, **options)
    with contextlib.suppress(VramplanError):
        estimate(spec, warm_up, reserved=False)
    try:
        warm: object = estimate(spec, w, reserved=False)
    except VramplanError as e:
        warm = str(e)
    _clear()
    try:
        cold: object = estimate(spec, w, reserved=False)
    except VramplanError as e:
        cold = str(e)
    assert warm == cold


VLM = ["qwen2.5-vl-7b", "gemma-3-4b-it", "llava-1.5-7b", "llava-next-mistral-7b"]
VLM_OPTIONS = [{}, {"images": 2}, {"freeze_vision": True}, {"method": "lora", "gradient_checkpointing": True},
               {"task": "infer", "images": 3}, {"gradient_accumulation": 2, "batch_size": 2}, {"image_size": 448},
               {"precision": "amp-bf16"}]


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VLM), st.sampled_from(VLM_OPTIONS), st.sampled_from(VLM_OPTIONS), st.integers(64, 900))
def test_vision_tower_reused_across_text_lengths(model: str, options: dict[str, object], before: dict[str, object],
                                                 seq: int) -> None:
    """A tower recorded for another text length (and for other options first) gives the figures of a fresh one."""
    spec = get_model(model).spec
    _clear()
    try:
        estimate(spec, make_workload(seq_len=seq + 16, **before))
        estimate(spec, make_workload(seq_len=seq + 16, **options))  # the tower's program is recorded here
        warm = estimate(spec, make_workload(seq_len=seq, **options))
    except VramplanError:
        assume(False)
    _clear()
    assert estimate(spec, make_workload(seq_len=seq, **options)) == warm


def test_vision_language_reserve_line() -> None:
    """The whole model's reserve comes from its own replay, said once; the language model's line is not kept (its
    analytic estimate says 'no allocator replay on this path', which is replaced); without the replay, the peak +
    the slack, said once too."""
    e = estimate(get_model("llava-1.5-7b").spec, make_workload())
    notes = [a for a in e.assumptions if a.startswith("CUDA context")]
    assert len(notes) == 1 and "replay of the whole model's allocation stream" in notes[0], notes
    assert e.peak_reserved_bytes > e.peak_allocated_bytes
    g = E.estimate(get_model("llava-1.5-7b").spec, make_workload(), reserved=False)
    notes = [a for a in g.assumptions if a.startswith("CUDA context")]
    assert len(notes) == 1 and "not a replay" in notes[0], notes
