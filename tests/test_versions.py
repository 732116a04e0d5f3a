"""The transformers release a run uses decides what some families allocate: ``Workload.transformers``."""

from __future__ import annotations

import pytest

from vramplan.api import estimate, make_workload
from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.estimator import has_sdpa, runs_as
from vramplan.hfconfig import spec_from_config
from vramplan.workload import MODELLED_TRANSFORMERS, Attention, Workload, default_transformers, release

GEMMA2 = {"model_type": "gemma2", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 4096}


def test_gemma2_lost_its_sdpa_path_in_524() -> None:
    """transformers 5.24 sets Gemma2PreTrainedModel._supports_sdpa = False (softcapping): SDPA falls back to eager,
    and the (batch, heads, seq, seq) fp32 softmax is back; 5.17 ran SDPA."""
    spec = spec_from_config(GEMMA2)
    new = make_workload(task="infer", seq_len=2048, batch_size=4)
    old = make_workload(task="infer", seq_len=2048, batch_size=4, transformers="5.17.0")
    assert not has_sdpa(spec, new) and has_sdpa(spec, old)
    assert runs_as(spec, new).attention is Attention.EAGER and runs_as(spec, old).attention is Attention.SDPA
    scores = 4 * 8 * 2048 * 2048 * 4
    assert estimate(spec, **_kw(new)).peak_allocated_bytes - estimate(spec, **_kw(old)).peak_allocated_bytes > scores
    assert any(f"{new.transformers_version} has no SDPA path" in a for a in estimate(spec, **_kw(new)).assumptions)


def _kw(w: Workload) -> dict[str, object]:
    return {"task": "infer", "seq_len": 2048, "batch_size": 4, "transformers": w.transformers}


@pytest.mark.parametrize("bad", ["latest", "5", "5.x", "", "5.24.0.1"])
def test_release_must_be_a_number(bad: str) -> None:
    with pytest.raises(WorkloadError, match="release number"):
        make_workload(transformers=bad)


def test_cli_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "gemma-2-2b", "--task", "infer", "--transformers", "five"]) == 2
    assert "release number" in capsys.readouterr().err


def test_gptj_gained_an_sdpa_path_in_524() -> None:
    """GPTJAttention calls ALL_ATTENTION_FUNCTIONS in 5.24; 5.17's own _attn was eager with fp32 scores."""
    spec = spec_from_config({"model_type": "gptj", "n_embd": 512, "n_head": 8, "n_layer": 2, "rotary_dim": 32,
                             "vocab_size": 4096})
    new = make_workload(task="infer", seq_len=2048, batch_size=2)
    old = make_workload(task="infer", seq_len=2048, batch_size=2, transformers="5.17")
    assert runs_as(spec, new).attention is Attention.SDPA and runs_as(spec, old).attention is Attention.EAGER
    assert estimate(spec, task="infer", seq_len=2048, batch_size=2, transformers="5.17").peak_allocated_bytes > \
        estimate(spec, task="infer", seq_len=2048, batch_size=2).peak_allocated_bytes + 2 * 8 * 2048 * 2048 * 4


def test_the_default_release_is_the_installed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workload that names no release runs the installed transformers (package metadata), else the modelled one."""
    from vramplan import _files, workload

    assert make_workload().transformers_release == release(default_transformers())
    assert make_workload(transformers="5.17").transformers_release == (5, 17)
    for have, want in (("5.25.0", "5.25.0"), (None, MODELLED_TRANSFORMERS), ("5.26.0.dev0", "5.26.0.dev0")):
        monkeypatch.setattr(_files, "installed_version", lambda dist, v=have: v)
        workload.default_transformers.cache_clear()
        assert default_transformers() == want
    workload.default_transformers.cache_clear()
    assert release("5.26.0.dev0") == (5, 26, 0) and release("5.25.0+local") == (5, 25, 0)


FALCON = {"model_type": "falcon", "hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 2,
          "multi_query": True, "parallel_attn": True, "alibi": False, "bias": False, "vocab_size": 1000}


def test_falcon_moved_onto_the_attention_interface_in_525() -> None:
    """5.24's FalconAttention called SDPA itself without enable_gqa: its single key/value head sent a bf16 batch to the
    math kernel (fp32 (batch, heads, seq, seq) scores); 5.25 repeats the keys for the materialised causal mask and
    runs the memory-efficient kernel."""
    spec = spec_from_config(FALCON)
    kw = {"task": "infer", "seq_len": 2048, "batch_size": 4}
    old = estimate(spec, **kw, transformers="5.24").peak_allocated_bytes
    new = estimate(spec, **kw, transformers="5.25").peak_allocated_bytes
    assert old - new > 4 * 8 * 2048 * 2048 * 4


def test_hub_kernels_default_is_stated_from_525() -> None:
    """transformers 5.25 kernelizes at from_pretrained by default; the estimate says it follows the PyTorch layers."""
    spec = spec_from_config(GEMMA2)
    notes = {v: estimate(spec, task="infer", seq_len=128, transformers=v).assumptions for v in ("5.24", "5.25")}
    assert not any("hub kernels" in a for a in notes["5.24"])
    assert any("hub kernels" in a and "use_kernels=False" in a for a in notes["5.25"])
