"""The allocation stream the allocator model replays (vramplan.alloc_stream) holds what the analytic estimate counts:
its live bytes at the measured peak equal the analytic allocated peak. Where they differ, the replay's reserved
figure describes another run than the allocated one (the bugs this caught: bitsandbytes builds that quantized linears
a Mamba layer does not have or MoE expert stacks bitsandbytes leaves alone; Gemma 3n's output view kept as cache
and its per-layer embedding gradient made a temporary)."""

from __future__ import annotations

from typing import Any

import pytest

import vramplan
from vramplan import get_model
from vramplan.alloc_stream import infer_events, train_events
from vramplan.allocator import FREE, RESET
from vramplan.catalog import list_models
from vramplan.errors import VramplanError
from vramplan.estimator import built_as, model_states, numerics, peak_allocated, replays, runs_as

WORKLOADS: list[dict[str, Any]] = [
    dict(), dict(method="lora"), dict(method="qlora"), dict(task="infer"), dict(task="infer", weights_quant="nf4"),
    dict(method="lora", gradient_checkpointing=True), dict(method="full", precision="amp-bf16")]
SAMPLE = ("llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b", "gemma-3n-e2b", "mamba-2.8b", "falcon-h1-0.5b",
          "granite-4.0-h-350m", "qwen3-30b-a3b", "gpt2", "lfm2-1.2b")
# (model, workload index) pairs known to differ by more than the tolerance, with the reason
KNOWN: dict[tuple[str, int], str] = {
    ("bloom-560m", 3): "BLOOM inference: the stream misses one (heads, S, S) scores tensor at the peak (-2.1%)",
    ("bloom-560m", 4): "the same with nf4 weights (-3.0%)",
}


def _live_peak(events: list[tuple[object, int]]) -> int:
    """The most bytes live at once after the last peak reset, each request rounded to 512 bytes (the analytic
    estimate's accounting; the allocator's block-size accounting adds unsplit remainders on top)."""
    live: dict[object, int] = {}
    cur = peak = 0
    for key, n in events:
        if n >= 0:
            b = max(512, -(-n // 512) * 512) if n else 0
            live[key] = b
            cur += b
            peak = max(peak, cur)
        elif n == FREE:
            cur -= live.pop(key, 0)
        elif n == RESET:
            peak = cur
    return peak


def _gap(name: str, opts: dict[str, Any]) -> float | None:
    spec0 = get_model(name).spec
    assert spec0 is not None
    try:
        w = vramplan.make_workload(seq_len=1024, **opts)
        spec = built_as(spec0, w)
        w2 = runs_as(spec, w)
        if not replays(spec) or spec.multimodal is not None:
            return None
        states, num = model_states(spec, w2), numerics(w2)
        events = train_events(spec, w2, states, num) if w2.is_train else infer_events(spec, w2, states, num)
        analytic = peak_allocated(spec0, w)
    except VramplanError:
        return None  # a workload the model refuses
    return _live_peak(events) / analytic - 1


@pytest.mark.parametrize("name", SAMPLE)
def test_stream_holds_what_the_estimate_counts(name: str) -> None:
    for j, opts in enumerate(WORKLOADS):
        gap = _gap(name, opts)
        if gap is not None and (name, j) not in KNOWN:
            assert abs(gap) < 0.02, f"{name} {opts}: stream {gap:+.2%} against the analytic peak"


@pytest.mark.slow
def test_stream_holds_what_the_estimate_counts_for_the_catalog() -> None:
    off = []
    for entry in list_models():
        if get_model(entry.name).spec is None:
            continue
        for j, opts in enumerate(WORKLOADS):
            gap = _gap(entry.name, opts)
            if gap is not None and abs(gap) >= 0.02 and (entry.name, j) not in KNOWN:
                off.append(f"{entry.name} {opts} {gap:+.2%}")
    assert not off, off
