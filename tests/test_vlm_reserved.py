"""Reserved memory of vision-language models from a replay of the whole model's allocation stream (the tower's
forward spliced before the language model's, its backward after, its parameters built first), checked against the
trace of the real model code (transformers) on cut configs of catalog models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import vramplan
from vramplan.catalog import list_models
from vramplan.hfconfig import spec_from_config

ROOT = Path(__file__).resolve().parents[1]


def _cut(name: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from coverage_report import cut_layers

    entry = next(e for e in list_models() if e.name == name)
    c: dict[str, Any] = json.loads(json.dumps(dict(entry.config),
                                              default=lambda o: dict(o) if hasattr(o, "keys") else list(o)))
    for sub in ("text_config", "vision_config"):
        if isinstance(c.get(sub), dict):
            c[sub] = cut_layers(c[sub], 2)
    c = cut_layers(c, 2)
    if "fullatt_block_indexes" in c.get("vision_config", {}):
        c["vision_config"]["fullatt_block_indexes"] = [1]
    return c


def test_a_vision_language_estimate_replays_its_stream() -> None:
    e = vramplan.estimate("qwen2.5-vl-7b", method="lora", lora_targets="q_proj,v_proj", seq_len=1024)
    assert e.reserved_phases, "the whole model's stream was not replayed"
    assert any("replay of the whole model's allocation stream" in a for a in e.assumptions)
    replay_alloc = max(p.peak_allocated_bytes for p in e.reserved_phases)
    assert replay_alloc == pytest.approx(e.peak_allocated_bytes, rel=0.02)  # the stream holds what is counted
    assert e.peak_reserved_bytes >= e.peak_allocated_bytes


def test_the_plan_search_path_skips_the_replay() -> None:
    from vramplan.api import make_workload
    from vramplan.estimator import estimate as core_estimate

    spec = vramplan.get_model("gemma-3-4b-it").spec
    e = core_estimate(spec, make_workload(task="infer"), reserved=False)
    assert not e.reserved_phases


@pytest.mark.parametrize(("name", "opts"), [
    ("gemma-3-4b-it", dict(task="infer", seq_len=512, new_tokens=4)),  # the +10% rule: -32.6%
    ("gemma-3-4b-it", dict(method="full", seq_len=512)),  # -8.7%
    ("llava-1.5-7b", dict(method="lora", seq_len=512, gradient_checkpointing=True, lora_targets="q_proj,v_proj")),
    ("mistral-small-3.1-24b", dict(method="full", seq_len=512, freeze_vision=True)),  # -13.1%
])
def test_reserved_follows_the_trace(name: str, opts: dict[str, Any]) -> None:
    pytest.importorskip("transformers")
    from vramplan.trace import trace_workload

    cfg = _cut(name)
    est = vramplan.estimate(spec_from_config(cfg), **opts)
    tr = trace_workload(cfg, vramplan.make_workload(**opts))
    assert est.peak_reserved_bytes == pytest.approx(tr.peak_reserved_bytes, rel=0.025)
