"""The coverage report's split of transformers' causal-LM types: the denominator of issue 11's count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from coverage_report import category


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", "decoder-only"), ("gpt2", "decoder-only"), ("gpt_bigcode", "decoder-only"), ("xlnet", "decoder-only"),
    ("mamba", "decoder-only"),
    ("bert", "encoder"), ("roberta", "encoder"), ("bart", "encoder"), ("whisper", "encoder"),
    ("bert-generation", "encoder"), ("trocr", "encoder"),
    ("gemma3", "multimodal"), ("musicgen", "other"),
])
def test_category(model_type: str, expected: str) -> None:
    assert category(model_type) == expected
