"""The config reader takes any JSON and either builds a spec or raises ConfigError — nothing else."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import ConfigError, Workload
from vramplan.errors import VramplanError
from vramplan.estimator import estimate
from vramplan.hfconfig import SUPPORTED_MODEL_TYPES, load_config_file, spec_from_config

from .conftest import CALIBRATION

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
BASE = json.loads((CALIBRATION / "configs" / "llama-3.2-1b.json").read_text())
KEYS = [*sorted(BASE), "n_embd", "n_layer", "n_head", "num_local_experts", "num_experts_per_tok",
        "head_dim", "sliding_window", "layer_types", "text_config", "multi_query"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8), st.sampled_from(SUPPORTED_MODEL_TYPES))
def test_mutated_configs_never_escape(mutation: dict[str, object], model_type: str) -> None:
    raw = {**BASE, **mutation, "model_type": model_type}
    try:
        spec = spec_from_config(raw)
    except ConfigError:
        return
    # a config that reads must also estimate, or fail with a clean error
    with contextlib.suppress(VramplanError):
        estimate(spec, Workload(batch_size=1, seq_len=16))


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_never_escapes(value: object) -> None:
    with pytest.raises(ConfigError):
        spec_from_config(value if not isinstance(value, dict) else {**value, "model_type": 1})


def test_deeply_nested_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError):
        load_config_file(p)


def test_huge_file_rejected(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(" " * (5 << 20))
    with pytest.raises(ConfigError, match="too large"):
        load_config_file(p)


def test_missing_field_names_it() -> None:
    raw = {k: v for k, v in BASE.items() if k != "num_hidden_layers"}
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        spec_from_config(raw)
