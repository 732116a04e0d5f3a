"""Looped layer stacks (vramplan.loops): HRM-Text's H/L reasoning cycles as data (StackRun), replayed as one program."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.derive._configs import cut_layers
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind
from vramplan.loops import cache_calls, hrm_runs
from vramplan.params import count_params
from vramplan.spec import StackRun

# HrmTextConfig's library defaults as transformers 5.24 saves them (num_hidden_layers rewritten by __post_init__)
HRM: dict[str, Any] = {
    "model_type": "hrm_text", "vocab_size": 151808, "hidden_size": 1536, "intermediate_size": 4096,
    "num_hidden_layers": 128, "num_layers_per_stack": 16, "num_attention_heads": 12, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "attention_bias": False, "mlp_bias": False,
    "H_cycles": 2, "L_cycles": 3, "L_bp_cycles": [2], "embedding_scale": 50.0, "prefix_lm": True,
}
FULL = {"batch_size": 1, "seq_len": 1024}
INFER = {"task": "infer", "batch_size": 4, "seq_len": 2048, "new_tokens": 64}


def _cut(**change: Any) -> dict[str, Any]:
    return {**cut_layers(HRM, 2), **change}


def test_schedule_follows_the_forward() -> None:
    # default: H cycle 0 runs one L call with autograd (L_bp_cycles [2] left-padded with 1), cycle 1 two
    runs = hrm_runs(16, 2, 3, [2])
    assert [(r.first, r.grad) for r in runs] == [(0, False), (0, False), (0, True), (16, True),
                                                  (0, False), (0, True), (0, True), (16, True)]
    assert {r.state for r in runs if r.first == 0} == {1} and {r.state for r in runs if r.first == 16} == {0}
    # beyond the padded list every H cycle keeps one L call with autograd
    assert [r.grad for r in hrm_runs(1, 1, 2, [2, 2])[:2]] == [True, True]


def test_cut_keeps_the_per_stack_count() -> None:
    cut = cut_layers(HRM, 2)
    assert cut["num_hidden_layers"] == 2 and cut["num_layers_per_stack"] is None
    spec = spec_from_config(cut)
    assert spec.num_layers == 4 and len(spec.stack_runs) == 8
    assert len(cache_calls(spec)) == 16  # one cache slot per call: 2 per stack x H_cycles x (L_cycles + 1)


def test_saved_config_is_read_like_the_cut_one() -> None:
    a, b = spec_from_config(HRM), spec_from_config({**HRM, "num_hidden_layers": 16, "num_layers_per_stack": None})
    assert a.num_layers == b.num_layers == 32 and a.stack_runs == b.stack_runs
    # the stacks are built from num_layers_per_stack whatever the total says (it sizes the cache only)
    assert spec_from_config({**HRM, "num_hidden_layers": 4}).num_layers == 32
    with pytest.raises(ConfigError, match="L_bp_cycles"):
        spec_from_config({**HRM, "L_bp_cycles": [5]})


def test_every_autograd_call_saves_its_activations() -> None:
    """One more L call with autograd (L_bp_cycles [2] -> [3]) adds one L stack call's saved activations to the forward,
    and the no_grad calls add nothing: compared with a spec whose no_grad calls are dropped."""
    w = make_workload(**FULL)

    def fwd_act(spec: Any) -> int:
        ph = estimate(spec, w).phases[0]
        return ph.breakdown.as_dict()[MemoryKind.ACTIVATIONS]

    base = spec_from_config(_cut())
    more = spec_from_config(_cut(L_bp_cycles=[3]))
    assert sum(r.grad for r in more.stack_runs) == sum(r.grad for r in base.stack_runs) + 1
    step = fwd_act(more) - fwd_act(base)
    assert step > 0
    # the same step again: linear in the number of calls with autograd
    assert fwd_act(spec_from_config(_cut(L_bp_cycles=[2, 3]))) - fwd_act(more) == step
    # calls under no_grad leave nothing behind
    graded = replace(base, stack_runs=tuple(r for r in base.stack_runs if r.grad))
    assert fwd_act(graded) == fwd_act(base)
    # and a plain stack of the same layers (every call once, autograd on) keeps less than the looped one
    assert fwd_act(replace(base, stack_runs=(StackRun(0, 2, True, 1), StackRun(2, 2, True, 0)))) < fwd_act(base)


def test_parameter_gradients_are_allocated_once() -> None:
    """Calls of the same layers share their parameters' gradients: the step's gradients are the parameters' size, and
    more calls with autograd do not add any."""
    w = make_workload(**FULL)
    for cfg in (_cut(), _cut(L_bp_cycles=[3, 3], H_cycles=3)):
        spec = spec_from_config(cfg)
        e = estimate(spec, w)
        grads = max(p.breakdown.as_dict()[MemoryKind.GRADIENTS] for p in e.phases)
        assert grads == e.parameters * 2 - spec.hidden_size * 2 or grads == e.parameters * 2


def test_inference_caches_every_call() -> None:
    spec = spec_from_config(_cut())
    kv = estimate(spec, make_workload(**INFER)).phases[0].breakdown.as_dict()[MemoryKind.KV_CACHE]
    per_call = 4 * 2048 * 2 * 12 * 128 * 2  # batch x prompt x (k, v) x heads x head_dim x bf16
    assert kv == 16 * per_call


def test_parameters_match_the_meta_model() -> None:
    pytest.importorskip("torch")
    from .trace_match import meta_parameters

    for cfg in (_cut(), _cut(H_cycles=3, L_cycles=1, L_bp_cycles=[1])):
        assert count_params(spec_from_config(cfg)).total == meta_parameters(cfg)


def test_reader_matches_the_real_forward() -> None:
    """vramplan.derive._loops runs the real model and records every stack call and its grad mode."""
    pytest.importorskip("torch")
    from vramplan.derive._loops import check_loops

    assert check_loops("hrm_text") == []


def test_loop_check_catches_a_wrong_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from vramplan import loops
    from vramplan.derive._loops import check_loops

    # a reader that ignores the left padding of L_bp_cycles (every H cycle with the last entry's count)
    monkeypatch.setattr(loops, "hrm_runs", lambda per, hc, lc, bp: tuple(
        r for _ in range(hc) for r in (*[StackRun(0, per, i >= lc - bp[-1], 1) for i in range(lc)],
                                        StackRun(per, per, True, 0))))
    assert any("calls the stacks" in p for p in check_loops("hrm_text"))


@pytest.mark.slow
@pytest.mark.parametrize("wname", ["full", "infer"])
def test_hrm_estimate_matches_trace(wname: str) -> None:
    pytest.importorskip("torch")
    from .trace_match import assert_matches_trace

    opts = {"full": FULL, "infer": {**INFER, "new_tokens": 0}}[wname]
    assert_matches_trace(_cut(max_position_embeddings=2112), opts)


def test_prefix_lm_refuses_flash_attention() -> None:
    from vramplan.errors import WorkloadError

    w = make_workload(**FULL, attention="flash")
    with pytest.raises(WorkloadError, match="prefix-LM"):
        estimate(spec_from_config(_cut()), w)
    assert estimate(spec_from_config(_cut(prefix_lm=False)), w).peak_allocated_bytes > 0


def test_cache_walk_leaves_no_reference_cycle() -> None:
    """The trace's cache walk must not keep a step's cache tensors alive (a recursive closure did, until Python's
    cyclic collector ran: the first decode step's keys outlived the grown cache, -16.6% on HRM-Text's decode)."""
    torch = pytest.importorskip("torch")
    import gc
    import weakref

    from transformers import DynamicCache

    from vramplan.trace._engine import _cache_tensors

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    old = weakref.ref(cache.layers[0].keys)
    gc.disable()
    try:
        assert len(_cache_tensors(cache)) >= 2
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 0)  # torch.cat: new keys, the old ones dropped
        assert old() is None
    finally:
        gc.enable()


def test_reused_weight_gradient_second_contribution_is_added_out_of_place() -> None:
    """A weight used twice in one graph whose gradients are views (Tape.view_grads: a linear's weight gradient is the
    transpose of its matmul output): the InputBuffer adds the second contribution out of place, so backward holds
    the first, the second and their sum at once; a third is added in place. Other reused parameters (a gradient
    scattered into a fresh buffer) are added in place."""
    from vramplan._engine.replay import layer_backward
    from vramplan._engine.tape import Tape

    nb = 1 << 20

    def peak(view: bool, uses: int) -> int:
        tp = Tape(True)
        x = tp.input(16, 2, rg=True)
        pid = 12345
        if view:
            tp.view_grads.add(pid)
        y = x
        for _ in range(uses):
            y = tp.op(16, 2, (y,), save=(y,), params=((pid, nb),))
        tp.keep(y)
        return layer_backward(tp).peak

    assert peak(True, 2) - peak(False, 2) == nb
    assert peak(True, 3) - peak(False, 3) == nb
    assert peak(False, 2) >= 2 * nb
