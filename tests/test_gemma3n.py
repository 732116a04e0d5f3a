"""Gemma 3n's language model (vramplan.gemma3n): the reader's layer groups, parameter counts against the meta-device
model, the AltUp stream, the Gaussian top-k sparsity, the prefill that does not slice KV-sharing layers, and
estimate against the fake-tensor trace."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import spec_from_config
from vramplan.params import count_params

from .trace_match import SMALL_WORKLOADS, assert_matches_trace

_TYPES = ["sliding_attention", "full_attention"] * 3
G3N: dict[str, Any] = {
    "model_type": "gemma3n_text", "vocab_size": 512, "vocab_size_per_layer_input": 512, "hidden_size": 256,
    "intermediate_size": [1024] * 6, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "hidden_size_per_layer_input": 32, "sliding_window": 128, "laurel_rank": 16,
    "layer_types": _TYPES, "num_kv_shared_layers": 2, "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0, 0.0, 0.0]}


def test_reader_groups_layers_by_sparsity_and_kv_sharing() -> None:
    spec = spec_from_config(G3N)
    assert spec.altup_inputs == 4 and spec.laurel_rank == 16 and spec.altup_correct_scale
    assert not spec.kv_shared_prefill_slice and spec.v_norm and spec.per_layer_input == 32
    assert [spec.layer(i).act_sparsity for i in range(6)] == [True, True, False, False, False, False]
    assert [spec.layer(i).kv_shared for i in range(6)] == [False] * 4 + [True] * 2
    assert [spec.layer(i).kv_store for i in range(6)] == [False, False, True, True, False, False]
    # defaults: sparsity on the first 10 layers of a deeper stack, full attention every fifth layer
    deep = spec_from_config({k: v for k, v in G3N.items() if k not in ("activation_sparsity_pattern",
                                                                     "layer_types", "intermediate_size")}
                            | {"num_hidden_layers": 12, "intermediate_size": 1024})
    assert [deep.layer(i).act_sparsity for i in range(12)] == [True] * 10 + [False] * 2
    assert deep.sliding_layers == (0, 1, 2, 3, 5, 6, 7, 8, 10, 11)
    with pytest.raises(ConfigError, match="intermediate_size"):
        spec_from_config({**G3N, "intermediate_size": [1024] * 5})
    with pytest.raises(ConfigError, match="activation_sparsity_pattern"):
        spec_from_config({**G3N, "activation_sparsity_pattern": [0.5]})
    with pytest.raises(ConfigError, match="producing a cache"):
        spec_from_config({**G3N, "layer_types": ["sliding_attention"] * 3 + ["full_attention"] * 3,
                          "num_kv_shared_layers": 4})


def test_parameters_equal_the_meta_model() -> None:
    torch = pytest.importorskip("torch")
    from vramplan.trace._resolve import hf_config, model_class

    config, _ = hf_config(dict(G3N), "gemma3n_text")
    with torch.device("meta"):
        model = model_class(config, "gemma3n_text")._from_config(config)
    assert count_params(spec_from_config(G3N)).total == sum(p.numel() for p in model.parameters())


def _fwd(spec: Any, **kw: Any) -> int:
    est = estimate(spec, make_workload(batch_size=2, seq_len=256, **kw))
    return int(next(p for p in est.phases if p.phase.value == "forward").peak_allocated_bytes)


def test_altup_stream_and_sparsity_cost_activations() -> None:
    """The four-copy AltUp stream is what each layer keeps and passes on; the Gaussian top-k keeps its relu output
    (and std's input) beside the gate projection."""
    spec = spec_from_config(G3N)
    no_sparse = spec_from_config({**G3N, "activation_sparsity_pattern": [0.0] * 6})
    per_token_gate = 1024 * 2  # one bf16 intermediate row
    assert _fwd(spec) - _fwd(no_sparse) >= 2 * 512 * per_token_gate  # two sparse layers, 512 tokens
    one_copy = spec_from_config({**G3N, "altup_num_inputs": 2})
    assert _fwd(spec) - _fwd(one_copy) >= 6 * 2 * 512 * 256 * 2  # 2 more copies of every layer's output at least


WORKLOADS = SMALL_WORKLOADS


@pytest.mark.slow
@pytest.mark.parametrize("wname", list(WORKLOADS))
def test_estimate_matches_trace(wname: str) -> None:
    assert_matches_trace(G3N, WORKLOADS[wname])
