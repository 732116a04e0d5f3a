"""vramplan measure times warm runs only: the first call's one-off costs (cuBLAS/cuDNN handles and workspace,
lazy kernel loading, allocator growth) are paid by an untimed warm-up, as the calibration harness leaves its
first training step out of ``step_s``. Checked on the CPU (the harness's smoke mode) with a clock that charges
the process's first forward call 100 s and every later one 1 s."""

from __future__ import annotations

from typing import Any

import pytest

from vramplan import make_workload

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256}
COLD, WARM = 100.0, 1.0


@pytest.fixture
def clocked(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vramplan import measure

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            return cls.now

    def charge(*_: Any) -> None:
        Clock.now += COLD if Clock.now == 0.0 else WARM

    build = measure._build

    def build_charged(*args: Any) -> Any:
        model, tcfg = build(*args)
        model.register_forward_pre_hook(charge)
        return model, tcfg

    monkeypatch.setattr(measure, "_SMOKE", True)
    monkeypatch.setattr(measure, "_DEV", "cpu")
    monkeypatch.setattr(measure, "time", Clock)
    monkeypatch.setattr(measure, "_build", build_charged)
    return measure


def test_inference_times_a_warm_prefill_and_decode(clocked: Any) -> None:
    w = make_workload(task="infer", precision="fp32", seq_len=16, new_tokens=4)
    m = clocked.measure_workload(TINY, w)
    assert m.prefill_s == WARM
    assert m.decode_s_per_token == WARM


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_training_never_times_the_first_step(clocked: Any, steps: int) -> None:
    w = make_workload(precision="fp32", seq_len=16)
    m = clocked.measure_workload(TINY, w, steps=steps)
    assert m.step_s == (0.0 if steps == 1 else WARM)  # one step is the warm-up alone: no step time
