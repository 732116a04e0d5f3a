"""Shared check of the slow estimate-vs-trace tests: the fake-tensor trace of the installed transformers against
the pure-Python estimate of the same config and workload."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.hfconfig import spec_from_config
from vramplan.workload import Workload


def assert_matches_trace(cfg: Mapping[str, Any], opts: Mapping[str, Any], tol: float = 0.02,
                         **estimate_only: Any) -> None:
    """``estimate_only``: options given to the estimate alone (``ssm_kernel="torch"``: the fallback the trace runs)."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    traced = trace_workload(dict(cfg), make_workload(**opts)).peak_allocated_bytes
    est = estimate(spec_from_config(dict(cfg)), make_workload(**opts, **estimate_only)).peak_allocated_bytes
    assert abs(est / traced - 1) <= tol, (est / 2**30, traced / 2**30)


def assert_workload_matches_trace(cfg: Mapping[str, Any], w: Workload, name: str, label: str,
                                  tol: float = 0.02) -> None:
    """The same check for a built workload and a named config (the layout and dense-type cells)."""
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    traced = trace_workload(dict(cfg), w, name=name).peak_allocated_bytes
    est = estimate(spec_from_config(dict(cfg), name=name), w).peak_allocated_bytes
    assert abs(est / traced - 1) < tol, f"{label}: estimate {est / 2**30:.3f} vs trace {traced / 2**30:.3f}"


# the three coverage workloads at small-config shapes (Gemma 3n, ModernBERT-decoder)
SMALL_WORKLOADS: dict[str, dict[str, Any]] = {
    "full": {"batch_size": 4, "seq_len": 256},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True,
             "lora_targets": "q_proj,v_proj"},
    "infer": {"task": "infer", "batch_size": 2, "seq_len": 256, "new_tokens": 4},
}


# the coverage workloads at 1024 tokens for small-width configs (Beam, Flint): inference, full, LoRA
WIDE_WORKLOADS: dict[str, dict[str, Any]] = {
    "infer": {"task": "infer", "batch_size": 4, "seq_len": 1024, "new_tokens": 4},
    "full": {"batch_size": 1, "seq_len": 1024},
    "lora": {"method": "lora", "batch_size": 2, "seq_len": 512, "gradient_checkpointing": True,
             "lora_targets": "q_proj,v_proj"},
}


def meta_parameters(cfg: Mapping[str, Any]) -> int:
    """Parameters of the model the trace builds from ``cfg`` (its class resolution), on the meta device."""
    torch = pytest.importorskip("torch")
    from vramplan.trace._resolve import build_config, hf_config, model_class

    config, _ = hf_config(dict(cfg), cfg["model_type"])
    cls = model_class(config, cfg["model_type"])
    with torch.device("meta"):
        model = cls._from_config(build_config(config, cls))
    return sum(p.numel() for p in model.parameters())
