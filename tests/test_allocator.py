"""The caching-allocator model (vramplan.allocator) and the reserved memory of estimates."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import allocator as A
from vramplan.api import estimate
from vramplan.calibration import read_rows, workload_of_row
from vramplan.errors import WorkloadError
from vramplan.estimator import estimate as estimate_spec
from vramplan.hfconfig import load_config_file
from vramplan.units import GiB

MiB = 1 << 20
DATA = Path(__file__).parent / "data"


def test_rounding_follows_round_size() -> None:
    assert A.round_size(1) == 512
    assert A.round_size(513) == 1024
    conf = A.parse_alloc_conf("roundup_power2_divisions:4")
    # 1200 is below 512 x 4: plain 512-byte rounding; 5000 lies in [4096, 8192): quarters of 1024
    assert A.round_size(1200, conf) == 1536
    assert A.round_size(5000, conf) == 5120
    assert A.round_size(4096, conf) == 4096


def test_segment_sizes_by_request() -> None:
    # small requests share 2 MiB segments, 1-10 MiB requests 20 MiB ones, larger ones round to 2 MiB
    assert A.simulate([(1, 100), (2, 100)]).peak_reserved_bytes == 2 * MiB
    assert A.simulate([(1, 5 * MiB), (2, 5 * MiB)]).peak_reserved_bytes == 20 * MiB
    assert A.simulate([(1, 11 * MiB)]).peak_reserved_bytes == 12 * MiB


def test_freed_blocks_are_cached_and_reused_best_fit() -> None:
    ev = [(1, 100 * MiB), (2, 50 * MiB), (1, A.FREE), (2, A.FREE), (3, 40 * MiB), (4, 90 * MiB)]
    s = A.simulate(ev)
    # 40 MiB takes the 50 MiB block (best fit, split: remainder > 1 MiB), 90 MiB the 100 MiB one
    assert s.peak_reserved_bytes == 150 * MiB
    assert s.segments == 2


def test_large_remainder_of_at_most_1mib_is_not_split() -> None:
    half = 512 * 1024
    # a 0.5 MiB remainder stays with the block: the next 1.5 MiB request needs a new 20 MiB segment
    s = A.simulate([(1, 100 * MiB), (1, A.FREE), (2, 100 * MiB - half), (3, 3 * half)])
    assert s.peak_reserved_bytes == 120 * MiB
    # a 2 MiB remainder is split off and serves it
    s = A.simulate([(1, 100 * MiB), (1, A.FREE), (2, 98 * MiB), (3, 2 * MiB)])
    assert s.peak_reserved_bytes == 100 * MiB


def test_merge_on_free() -> None:
    ev = [(1, 30 * MiB), (1, A.FREE), (2, 10 * MiB), (3, 10 * MiB), (2, A.FREE), (3, A.FREE), (4, 30 * MiB)]
    assert A.simulate(ev).peak_reserved_bytes == 30 * MiB


def test_max_split_size_keeps_oversize_blocks_whole() -> None:
    ev = [(1, 200 * MiB), (1, A.FREE), (2, 30 * MiB)]
    assert A.simulate(ev).peak_reserved_bytes == 200 * MiB
    conf = A.parse_alloc_conf("max_split_size_mb:128")
    assert A.simulate(ev, conf).peak_reserved_bytes == 230 * MiB


def test_expandable_segments_grow_one_segment() -> None:
    ev = [(1, 5 * MiB), (2, 5 * MiB), (1, A.FREE), (3, 30 * MiB)]
    default = A.simulate(ev).peak_reserved_bytes
    expandable = A.simulate(ev, A.parse_alloc_conf("expandable_segments:True")).peak_reserved_bytes
    assert default == 50 * MiB
    assert expandable == 40 * MiB


@pytest.mark.parametrize("text", ["foo:1", "max_split_size_mb:10", "expandable_segments:yes",
                                  "roundup_power2_divisions:3", "max_split_size_mb", "max_split_size_mb:x"])
def test_bad_settings_are_errors(text: str) -> None:
    with pytest.raises(WorkloadError):
        A.parse_alloc_conf(text)


def test_settings_parse() -> None:
    c = A.parse_alloc_conf("expandable_segments:True, max_split_size_mb:256,roundup_power2_divisions:[256:1,>:4]")
    assert c.expandable_segments and c.max_split_size == 256 * MiB
    assert c.divisions(100 * MiB) == 1 and c.divisions(1 << 30) == 4
    assert A.parse_alloc_conf("garbage_collection_threshold:0.6") == A.DEFAULT_CONF


_sizes = st.integers(1, 64 * MiB)


@st.composite
def _streams(draw: st.DrawFn) -> list[tuple[object, int]]:
    ops = draw(st.lists(st.tuples(st.booleans(), _sizes), min_size=1, max_size=60))
    live: list[int] = []
    ev: list[tuple[object, int]] = []
    for i, (free, size) in enumerate(ops):
        if free and live:
            ev.append((live.pop(size % len(live)), A.FREE))
        else:
            ev.append((i, size))
            live.append(i)
    return ev


@settings(max_examples=150, deadline=None)
@given(_streams())
def test_reserved_never_below_allocated(ev: list[tuple[object, int]]) -> None:
    for conf in (A.DEFAULT_CONF, A.parse_alloc_conf("expandable_segments:True"),
                 A.parse_alloc_conf("max_split_size_mb:32,roundup_power2_divisions:4")):
        s = A.simulate(ev, conf)
        assert s.peak_reserved_bytes >= s.peak_allocated_bytes
        assert s.peak_allocated_bytes >= max((n for _, n in ev if n > 0), default=0)


# ---- estimates ---------------------------------------------------------------------------------------

def test_estimate_reports_reserved_and_total() -> None:
    e = estimate("llama-3.2-1b", batch_size=2, seq_len=512)
    assert e.peak_reserved_bytes >= e.peak_allocated_bytes
    d = e.to_dict()
    assert d["peak_reserved_bytes"] == e.peak_reserved_bytes
    assert set(d["reserved_phases"]) >= {"forward", "backward", "optimizer_step"}
    from vramplan.kinds import MemoryKind

    assert e.breakdown[MemoryKind.ALLOCATOR_SLACK] == e.peak_reserved_bytes - e.peak_allocated_bytes
    assert e.breakdown.total == e.total_bytes


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["llama-3.2-1b", "qwen2.5-0.5b", "gpt2"]), st.sampled_from(["train", "infer"]),
       st.integers(1, 4), st.sampled_from([128, 256, 512]))
def test_expandable_segments_do_not_reserve_more(model: str, task: str, batch: int, seq: int) -> None:
    # the calibration harness's loop (plain); for the HF loop see the counterexample below
    base = estimate(model, task=task, batch_size=batch, seq_len=seq, new_tokens=4, trainer="plain")
    exp = estimate(model, task=task, batch_size=batch, seq_len=seq, new_tokens=4, trainer="plain",
                   alloc_conf="expandable_segments:True")
    # pages are 20 MiB in the large pool and 2 MiB in the small one: at most one partly used page each
    assert exp.peak_reserved_bytes <= base.peak_reserved_bytes + 22 * MiB
    assert exp.peak_allocated_bytes == base.peak_allocated_bytes


def test_expandable_segments_counterexample_is_named() -> None:
    """Not a theorem: one growable segment cannot hand a hole to a larger request either, and it grows in
    20 MiB pages where a fresh segment is rounded to 2 MiB. GPT-2 under the HF loop (logits die before
    backward) leaves holes the default allocator's separate segments happen to avoid: +76 MiB."""
    base = estimate("gpt2", batch_size=2, seq_len=512)
    exp = estimate("gpt2", batch_size=2, seq_len=512, alloc_conf="expandable_segments:True")
    assert 0 < exp.peak_reserved_bytes - base.peak_reserved_bytes <= 4 * 20 * MiB


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["llama-3.2-1b", "qwen2.5-0.5b"]), st.sampled_from(["train", "infer"]),
       st.integers(1, 3), st.sampled_from([128, 256, 512]))
def test_reserved_grows_with_batch_and_sequence(model: str, task: str, batch: int, seq: int) -> None:
    e = estimate(model, task=task, batch_size=batch, seq_len=seq, new_tokens=4)
    more_b = estimate(model, task=task, batch_size=batch + 1, seq_len=seq, new_tokens=4)
    more_s = estimate(model, task=task, batch_size=batch, seq_len=2 * seq, new_tokens=4)
    # what is allocated grows, and what is reserved never falls below it; reserved itself is not monotone
    # (see the counterexample below)
    assert more_b.peak_allocated_bytes >= e.peak_allocated_bytes
    assert more_s.peak_allocated_bytes >= e.peak_allocated_bytes
    assert more_b.peak_reserved_bytes >= more_b.peak_allocated_bytes
    assert more_s.peak_reserved_bytes >= more_s.peak_allocated_bytes


def test_reserved_is_not_monotone_in_batch() -> None:
    """The caching allocator's reserve depends on how freed blocks of one size serve requests of another:
    Llama-3.2-1B full training at 256 tokens reserves more at batch 7 than at batch 8 (the first step's
    activations leave cached blocks that batch 8's tensors fill and batch 7's do not). fit and plan therefore
    decide on the largest reserve over the smaller batches and sequences (vramplan.fit), not on this one."""
    b7 = estimate("llama-3.2-1b", batch_size=7, seq_len=256)
    b8 = estimate("llama-3.2-1b", batch_size=8, seq_len=256)
    assert b8.peak_allocated_bytes > b7.peak_allocated_bytes
    assert b8.peak_reserved_bytes < b7.peak_reserved_bytes


def _reserved_errors(folder: Path) -> list[tuple[str, float]]:
    out = []
    for row in read_rows(folder / "measured.csv"):
        w = workload_of_row(row)
        if w is None or int(row.get("world_size") or 1) > 1 or not row.get("peak_reserved_gib"):
            continue
        spec = load_config_file(folder / "configs" / f"{row['model']}.json")
        e = estimate_spec(spec, w)
        out.append((row["name"], e.peak_reserved_bytes / (float(row["peak_reserved_gib"]) * GiB) - 1))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["calibration", "h200-grid"])
def test_reserved_accuracy(folder: str) -> None:
    errs = _reserved_errors(DATA / folder)
    assert errs
    med = statistics.median(abs(e) for _, e in errs)
    worst = max(errs, key=lambda x: abs(x[1]))
    # figures as the README states them (language-model rows); see benchmarks/accuracy_report.py
    assert med <= 0.02, med
    assert abs(worst[1]) <= 0.08, worst  # the target: every row within ±8%


def test_csv_has_reserved_for_every_row() -> None:
    with open(DATA / "calibration" / "measured.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["peak_reserved_gib"] for r in rows)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.sampled_from(["gpt2", "qwen2.5-0.5b", "llama-3.2-1b"]),
       st.sampled_from(["full", "lora", "qlora", "freeze"]), st.integers(1, 3), st.integers(64, 700),
       st.sampled_from(["", "expandable_segments:True"]), st.booleans(), st.sampled_from(["plain", "hf"]))
def test_early_stop_equals_full_replay(model: str, method: str, batch: int, seq: int, conf: str, ckpt: bool,
                                       trainer: str) -> None:
    """The estimator stops the 3-step stream once a step reserves nothing new; the figures are those of the
    complete 3-step replay."""
    from vramplan.alloc_stream import train_events
    from vramplan.catalog import get_model
    from vramplan.estimator import numerics, reserved_stats
    from vramplan.memory import model_states
    from vramplan.workload import Workload

    spec = get_model(model).spec
    w = Workload(method=method, batch_size=batch, seq_len=seq, alloc_conf=conf, gradient_checkpointing=ckpt,
                 trainer=trainer)
    states, num = model_states(spec, w), numerics(w)
    full = A.simulate(train_events(spec, w, states, num, steps=3), A.parse_alloc_conf(conf))
    fast = reserved_stats(spec, w, states, num)
    assert (fast.peak_allocated_bytes, fast.peak_reserved_bytes, fast.phases) == \
        (full.peak_allocated_bytes, full.peak_reserved_bytes, full.phases)


def test_fit_suggests_expandable_segments_where_they_turn_no_into_yes() -> None:
    """Llama-3.2-1B full training, batch 3 x 512: the default allocator's cached blocks leave 3 GiB that one
    growable segment does not; on a GPU between the two totals fit says no and names the setting."""
    import dataclasses

    from vramplan.catalog import get_model
    from vramplan.fit import check_fit
    from vramplan.hardware import get_gpu
    from vramplan.workload import Workload

    spec = get_model("llama-3.2-1b").spec
    w = Workload(batch_size=3, seq_len=512)
    default = estimate_spec(spec, w)
    exp = estimate_spec(spec, w.with_(alloc_conf="expandable_segments:True"))
    assert exp.total_bytes < default.total_bytes
    base = get_gpu("h100-sxm")
    ctx = base.cuda_context_bytes or default.total_bytes - default.peak_reserved_bytes
    context_shift = ctx - (default.total_bytes - default.peak_reserved_bytes)
    gpu = dataclasses.replace(base, memory_bytes_usable=(exp.total_bytes + default.total_bytes) // 2 + context_shift)
    r = check_fit(spec, w, gpu)
    assert not r.fits
    d = r.to_dict()
    assert d["alloc_conf_suggestion"] == "expandable_segments:True"
    assert d["expandable_total_bytes"] == exp.total_bytes
    assert d["nvidia_smi_bytes"] == d["total_bytes"] == default.total_bytes
    assert d["oom_margin_bytes"] < 0
    assert any("expandable_segments:True" in x for x in d["warnings"])
    # where the default fits already, nothing is suggested
    assert check_fit(spec, w, base).to_dict()["alloc_conf_suggestion"] is None


@pytest.mark.parametrize("conf", ["", "roundup_power2_divisions:4"])
def test_empty_cache_returns_wholly_free_segments(conf: str) -> None:
    """torch.cuda.empty_cache(): a free segment goes back, a segment with a live block stays whole."""
    from vramplan.allocator import EMPTY, FREE, parse_alloc_conf, simulate

    mib = 1 << 20
    events = [("a", 32 * mib), ("b", 3 * mib), ("c", 3 * mib), ("c", FREE), ("a", FREE), (None, EMPTY),
              ("d", 16 * mib)]
    stats = simulate(events, parse_alloc_conf(conf))
    # a's 32 MiB segment was released; b's 20 MiB segment stays (c's freed part is cached in it) and serves d
    assert stats.segments == 1
    assert stats.peak_reserved_bytes == 52 * mib  # before the release
    probe: list[int] = []
    simulate([*events, (None, -4)], parse_alloc_conf(conf), probe)
    assert probe == [20 * mib]


def test_replay_leaves_the_garbage_collector_as_it_found_it() -> None:
    """simulate pauses Python's cyclic collector while it replays; on, off, and after an error alike it is as before."""
    import gc

    from vramplan.allocator import FREE, simulate

    was = gc.isenabled()
    try:
        for state in (True, False):
            (gc.enable if state else gc.disable)()
            assert simulate([(1, 4096), (1, FREE)]).peak_allocated_bytes == 4096
            assert gc.isenabled() is state
            with pytest.raises(KeyError):
                simulate([(2, FREE)])  # a free of a key never allocated
            assert gc.isenabled() is state
    finally:
        (gc.enable if was else gc.disable)()
