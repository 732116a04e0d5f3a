"""The estimator against real H200 peaks (tests/data/calibration, copied from shared/calibration)."""

from __future__ import annotations

import statistics

import pytest

from vramplan.calibration import compare, read_rows, workload_of_row
from vramplan.estimator import estimate
from vramplan.hfconfig import load_config_file
from vramplan.params import count_params

from .conftest import CALIBRATION

ROWS = read_rows(CALIBRATION / "measured.csv")
LLM_ROWS = [r for r in ROWS if r["task"] in ("train", "infer")]


def test_every_language_model_row_is_supported() -> None:
    results, skipped = compare(ROWS, CALIBRATION / "configs", estimate)
    assert len(results) == len(LLM_ROWS)
    assert all("not a language model" in s for s in skipped)


def test_aggregate_accuracy() -> None:
    results, _ = compare(ROWS, CALIBRATION / "configs", estimate)
    errors = [abs(r.error) for r in results]
    assert statistics.median(errors) <= 0.05
    # the bar is 15% per case; we hold ourselves to 5% so that a regression shows early
    worst = max(results, key=lambda r: abs(r.error))
    assert abs(worst.error) <= 0.05, f"{worst.name}: {worst.error:+.1%}"


@pytest.mark.parametrize("row", LLM_ROWS, ids=[r["name"] for r in LLM_ROWS])
def test_case_within_tolerance(row: dict[str, str]) -> None:
    w = workload_of_row(row)
    assert w is not None
    spec = load_config_file(CALIBRATION / "configs" / f"{row['model']}.json")
    est = estimate(spec, w)
    measured = float(row["peak_alloc_gib"]) * 2**30
    assert est.peak_allocated_bytes == pytest.approx(measured, rel=0.15)


FULL_PRECISION = {r["model"]: int(r["params"]) for r in LLM_ROWS if not r["method"] and r["nf4"] != "True"}


@pytest.mark.parametrize("model", sorted(FULL_PRECISION))
def test_exact_parameter_counts(model: str) -> None:
    spec = load_config_file(CALIBRATION / "configs" / f"{model}.json")
    assert count_params(spec).total == FULL_PRECISION[model]


@pytest.mark.parametrize("row", [r for r in LLM_ROWS if r["method"] in ("lora", "qlora")],
                         ids=lambda r: r["name"])
def test_trainable_parameters_of_adapters(row: dict[str, str]) -> None:
    w = workload_of_row(row)
    assert w is not None
    spec = load_config_file(CALIBRATION / "configs" / f"{row['model']}.json")
    est = estimate(spec, w)
    assert est.trainable_parameters == int(row["trainable"])
    if row["method"] == "lora":
        assert est.parameters == int(row["params"])


# ---- generalisation: 27 H200 runs this project measured on families and shapes outside the shared set
GRID = CALIBRATION.parent / "h200-grid"
GRID_ROWS = read_rows(GRID / "measured.csv")


def test_generalisation_grid_aggregate() -> None:
    results, skipped = compare(GRID_ROWS, GRID / "configs", estimate)
    assert not skipped and len(results) == len(GRID_ROWS)
    errors = sorted(abs(r.error) for r in results)
    assert statistics.median(errors) <= 0.02
    assert errors[-1] <= 0.10, [(r.name, f"{r.error:+.1%}") for r in results if abs(r.error) > 0.10]


@pytest.mark.parametrize("row", GRID_ROWS, ids=[r["name"] for r in GRID_ROWS])
def test_generalisation_case(row: dict[str, str]) -> None:
    w = workload_of_row(row)
    assert w is not None
    spec = load_config_file(GRID / "configs" / f"{row['model']}.json")
    est = estimate(spec, w)
    assert est.parameters == int(row["params"])  # base model, plus the adapters peft added
    if row["trainable"]:
        assert est.trainable_parameters == int(row["trainable"])
    assert est.peak_allocated_bytes == pytest.approx(float(row["peak_alloc_gib"]) * 2**30, rel=0.10)
