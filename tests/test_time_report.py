"""benchmarks/time_report.py over the published figures: provenance of every row and regression bars for the
categories the time model covers (see the README's time section for the full table)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("time_report", ROOT / "benchmarks" / "time_report.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["time_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_published_row_has_a_source_a_quote_and_a_value() -> None:
    doc = json.loads((ROOT / "tests/data/published_throughput.json").read_text(encoding="utf-8"))
    assert len(doc["rows"]) >= 40
    ids = [r["id"] for r in doc["rows"]]
    assert len(ids) == len(set(ids))
    for r in doc["rows"]:
        assert r["source"]["url"].startswith("https://") and r["source"]["quote"], r["id"]
        assert r["value"] > 0 and r["metric"], r["id"]


@pytest.fixture(scope="module")
def summary() -> dict[str, dict[str, list[float]]]:
    mod = _report()
    rows = mod.rows()
    assert all(r.predicted is not None for r in rows), [r.name for r in rows if r.predicted is None]
    return dict(mod.summary(rows))


def _median(errs: list[float]) -> float:
    return statistics.median(abs(e) for e in errs)


def test_engines_decode_and_prefill_within_their_bars(summary: dict[str, dict[str, list[float]]]) -> None:
    gpt_fast = summary["decode, gpt-fast (a100-80gb-sxm)"]["out"]
    assert _median(gpt_fast) < 0.10 and max(abs(e) for e in gpt_fast) < 0.20
    assert _median(summary["prefill, tensorrt-llm (a100-80gb-sxm, 16-bit)"]["out"]) < 0.15
    assert _median(summary["decode, vllm (a100-80gb-sxm)"]["out"]) < 0.30


def test_calibration_rows_stay_in_sample(summary: dict[str, dict[str, list[float]]]) -> None:
    cal = summary["train 1 GPU, H200 (calibration)"]
    assert not cal["out"] and len(cal["in"]) >= 45
    assert _median(cal["in"]) < 0.15


def test_training_rows_show_where_the_predicted_step_goes() -> None:
    mod = _report()
    train = [r for r in mod.rows() if r.category.startswith("train")]
    assert train and all(r.split.startswith("compute ") and "optimizer" in r.split and "comm" in r.split
                         for r in train), [r.name for r in train if not r.split]


def test_a_published_row_a_coefficient_was_sized_on_is_in_sample_and_left_out_of_the_figures() -> None:
    mod = _report()
    rows = mod.rows()
    sized = [r for r in rows if r.in_sample and not r.source.startswith("tests/data/")]
    assert [r.name for r in sized] == ["trtllm-gpt-j-6b-tp1-decode-bs1-h100-fp8"]
    kinds = mod.published_by_kind(rows)
    out, ins = kinds["decode"]
    assert ins == [sized[0].error] and sized[0].error not in out
    published = [r for r in rows if r.error is not None and not r.source.startswith("tests/data/")]
    assert sum(len(o) + len(i) for o, i in kinds.values()) == len(published)
