"""The fast paths of the reserved-memory replay give the figures of the slow reference path, bit for bit.

The stream generator filters each block instance by a plan worked out once per case (alloc_stream
``_Stream.add_instance``) and writes decode steps from per-token cache sizes; the replay of the default allocator
runs in one loop (allocator ``_simulate_segments``) and stops training after the first step that reserves nothing
new. ``reference=True`` turns every one of these off."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vramplan import allocator as A
from vramplan.alloc_stream import infer_events, train_events
from vramplan.catalog import get_model
from vramplan.errors import VramplanError
from vramplan.estimator import numerics, peak_allocated, reserved_stats, runs_as
from vramplan.memory import model_states
from vramplan.workload import Workload

MiB = 1 << 20
# one of each kind of stack: dense (tied and untied), MoE, sliding window, MLA, hybrids (SSM, linear attention,
# recurrent), KV sharing, learned positions, attention sinks
MODELS = ["qwen3-0.6b", "llama-3.2-1b", "gemma-3-1b", "gemma-2-2b", "olmoe-1b-7b", "deepseek-v2-lite", "mamba-2.8b",
          "lfm2-1.2b", "jamba-v0.1", "recurrentgemma-2b", "gemma-3n-e2b", "qwen3-next-80b-a3b", "gpt2-medium",
          "bloom-560m", "phi-3-mini", "gpt-oss-20b", "falcon-7b"]
TRAIN = [{}, {"method": "lora"}, {"method": "qlora", "gradient_checkpointing": True},
         {"method": "freeze", "trainable_layers": 2}, {"gradient_accumulation": 2},
         {"precision": "amp-bf16", "checkpointing": "every:2"}, {"activation_offload": True, "method": "lora"},
         {"packing": True, "avg_seq_len": 100}, {"optimizer": "sgd", "trainer": "plain"},
         {"weights_quant": "nf4", "method": "lora"}, {"method": "dora", "lora_targets": ("all-linear",)},
         {"alloc_conf": "max_split_size_mb:64"}, {"alloc_conf": "expandable_segments:True"}]
INFER = [{"task": "infer"}, {"task": "infer", "logits": "all"}, {"task": "infer", "method": "qlora"},
         {"task": "infer", "attention": "eager"}]


def _workload(spec_name: str, options: dict[str, object], batch: int, seq: int, new: int) -> Workload:
    spec = get_model(spec_name).spec
    try:
        w = Workload(**{"batch_size": batch, "seq_len": seq, "new_tokens": new, **options})  # type: ignore[arg-type]
        w = runs_as(spec, w)
        peak_allocated(spec, w)  # the checks an estimate makes
    except VramplanError:
        assume(False)  # refused for this model (no checkpointing / packing path, positions)
    return w


def _fields(r: A.AllocStats) -> tuple[object, ...]:
    return r.peak_allocated_bytes, r.peak_reserved_bytes, r.segments, r.phases


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODELS), st.sampled_from(TRAIN + INFER), st.integers(1, 3), st.integers(1, 900),
       st.integers(0, 40), st.booleans())
def test_fast_replay_equals_reference(model: str, options: dict[str, object], batch: int, seq: int, new: int,
                                      ddp: bool) -> None:
    spec = get_model(model).spec
    w = _workload(model, options, batch, seq, new)
    ddp = ddp and w.is_train
    fast = reserved_stats(spec, w, ddp=ddp)
    ref = reserved_stats(spec, w, ddp=ddp, reference=True)
    assert _fields(fast) == _fields(ref)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.sampled_from(MODELS), st.sampled_from(TRAIN[:6] + INFER), st.integers(1, 2), st.integers(1, 600),
       st.integers(0, 30))
def test_fast_stream_is_the_reference_stream(model: str, options: dict[str, object], batch: int, seq: int,
                                             new: int) -> None:
    """Not only the figures: the event streams are equal, event for event."""
    spec = get_model(model).spec
    w = _workload(model, options, batch, seq, new)
    states, num = model_states(spec, w), numerics(w)
    if w.is_train:
        for ddp in (False, True):
            assert train_events(spec, w, states, num, 3, ddp=ddp) == \
                train_events(spec, w, states, num, 3, ddp=ddp, reference=True)
    else:
        assert infer_events(spec, w, states, num) == infer_events(spec, w, states, num, reference=True)


def _streams() -> st.SearchStrategy[list[tuple[object, int]]]:
    """Random well-formed streams: sizes around the pool and split thresholds, frees in any order, markers."""
    sizes = st.one_of(st.integers(0, 4096), st.integers(MiB - 1024, MiB + 1024), st.integers(1, 12 * MiB),
                      st.integers(9 * MiB, 64 * MiB), st.sampled_from([512, 2 * MiB, 20 * MiB, 10 * MiB - 1]))
    ops = st.lists(st.tuples(st.sampled_from(["a", "a", "f", "p", "r", "e", "b"]), sizes, st.integers(0, 10**6)),
                   max_size=120)

    def build(raw: list[tuple[str, int, int]]) -> list[tuple[object, int]]:
        live: list[int] = []
        out: list[tuple[object, int]] = []
        c = itertools.count()
        for op, n, pick in raw:
            if op == "a" or (op == "f" and not live):
                k = next(c)
                live.append(k)
                out.append((k, n))
            elif op == "f":
                out.append((live.pop(pick % len(live)), A.FREE))
            elif op == "p":
                out.append((f"phase{pick % 3}", A.PHASE))
            elif op == "r":
                out.append((None, A.RESET))
            elif op == "b":
                out.append((None, A.PROBE))
            else:
                out.append((None, A.EMPTY))
        return out

    return ops.map(build)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_streams(), st.sampled_from(["", "max_split_size_mb:21", "max_split_size_mb:40", MiB, 2 * MiB]))
def test_one_loop_replay_equals_block_objects(ev: list[tuple[object, int]], conf: str | int) -> None:
    # (an int: an AllocConf built by hand with a max_split_size that parse_alloc_conf refuses, down in the small pool)
    c = A.AllocConf(max_split_size=conf) if isinstance(conf, int) else A.parse_alloc_conf(conf)
    fast_probe: list[int] = []
    ref_probe: list[int] = []
    assert A.simulate([*ev, (None, A.PROBE)], c, fast_probe) == \
        A.simulate([*ev, (None, A.PROBE)], c, ref_probe, reference=True)
    assert fast_probe == ref_probe
