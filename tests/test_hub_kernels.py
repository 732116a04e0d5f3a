"""transformers' hub kernels (``--hub-kernels``): RMSNorm as kernels-community's LigerRMSNorm.

transformers >= 5.25 kernelizes models in ``from_pretrained`` by default on CUDA; the estimate follows the PyTorch
layers unless the workload says ``hub_kernels``. Checked here: the shipped list of model types is the installed
transformers' (when it is the release the list was written from), the estimate against the trace's emulation of
LigerRMSNorm's allocations (``trace._cuda._LigerRMSNorm``), and the mechanism's direction (less saved for backward).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramplan.api import estimate, make_workload
from vramplan.errors import WorkloadError
from vramplan.estimator import HUB_KERNELS_NONE_NOTE, HUB_KERNELS_ON_NOTE, hub_rmsnorm
from vramplan.hfconfig import spec_from_config
from vramplan.kinds import MemoryKind

DATA = Path(__file__).resolve().parents[1] / "src" / "vramplan" / "data" / "hub_kernels.json"
SMALL_LLAMA: dict[str, Any] = dict(model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)


def test_shipped_list_is_the_installed_transformers_own() -> None:
    transformers = pytest.importorskip("transformers")
    from vramplan.derive.hub_kernels import rmsnorm_kernel_types

    shipped = json.loads(DATA.read_text())
    if shipped["transformers"] != transformers.__version__:
        pytest.skip(f"list written from transformers {shipped['transformers']}, {transformers.__version__} installed")
    models = Path(transformers.__file__).parent / "models"
    assert rmsnorm_kernel_types(models) == shipped["rmsnorm"]


def test_listed_families() -> None:
    def spec(mt: str, **extra: Any) -> Any:
        return spec_from_config({**SMALL_LLAMA, "model_type": mt, **extra})

    assert hub_rmsnorm(spec("llama")) and hub_rmsnorm(spec("qwen2")) and hub_rmsnorm(spec("mistral"))
    # looked up by the config's own model_type, not by the program that reads it: Mllama's text model reads as
    # llama, but MllamaTextRMSNorm is not decorated; Emu3's text model's Emu3RMSNorm is
    mllama_text = spec_from_config({**SMALL_LLAMA, "model_type": "mllama_text_model", "cross_attention_layers": []})
    assert mllama_text.family == "llama" and not hub_rmsnorm(mllama_text)
    assert hub_rmsnorm(spec("emu3_text_model"))
    # norms the decoder layer names otherwise (Apertus' attention_layernorm) are found too
    table = json.loads(DATA.read_text())["rmsnorm"]
    assert "apertus" in table and "lfm2" in table and "mllama" not in table
    gemma2 = spec_from_config(dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000))
    assert not hub_rmsnorm(gemma2)  # GemmaRMSNorm (1 + weight) is not decorated


@pytest.mark.parametrize("opts", [
    dict(method="full", batch_size=2, seq_len=256),
    dict(method="lora", batch_size=2, seq_len=256),
])
def test_liger_norm_saves_less_than_pytorch_norm(opts: dict[str, Any]) -> None:
    spec = spec_from_config(SMALL_LLAMA)
    off = estimate(spec, make_workload(**opts))
    on = estimate(spec, make_workload(**opts, hub_kernels=True))
    assert HUB_KERNELS_ON_NOTE in on.assumptions and HUB_KERNELS_ON_NOTE not in off.assumptions
    # PyTorch's LlamaRMSNorm saves its fp32 copy (4 bytes per element); Liger saves the 16-bit input (2)
    assert on.breakdown[MemoryKind.ACTIVATIONS] < off.breakdown[MemoryKind.ACTIVATIONS]
    assert on.peak_allocated_bytes < off.peak_allocated_bytes


def test_unlisted_family_is_unchanged_and_says_so() -> None:
    cfg = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000, sliding_window=32)
    spec = spec_from_config(cfg)
    off = estimate(spec, make_workload(batch_size=2, seq_len=64))
    on = estimate(spec, make_workload(batch_size=2, seq_len=64, hub_kernels=True))
    assert on.peak_allocated_bytes == off.peak_allocated_bytes
    assert HUB_KERNELS_NONE_NOTE in on.assumptions


def test_switch_is_checked() -> None:
    assert make_workload(hub_kernels="false").hub_kernels is False
    with pytest.raises(WorkloadError, match="hub_kernels must be true or false"):
        make_workload(hub_kernels="sometimes")


def test_cli_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "vramplan", "estimate", "llama-3.1-8b", "--method", "lora",
                          "--hub-kernels", "--json"], capture_output=True, text=True, check=True).stdout
    assert any("LigerRMSNorm" in a for a in json.loads(out)["assumptions"])


@pytest.mark.parametrize("opts", [
    dict(method="full", batch_size=2, seq_len=256),
    dict(method="lora", batch_size=2, seq_len=256),
    dict(method="lora", batch_size=2, seq_len=256, gradient_checkpointing=True),
    dict(task="infer", batch_size=2, seq_len=256, new_tokens=4),
])
def test_estimate_matches_the_traced_liger_norm(opts: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from vramplan.trace import trace_workload

    w = make_workload(**opts, hub_kernels=True)
    traced = trace_workload(dict(SMALL_LLAMA), w)
    assert any("LigerRMSNorm" in a and a.startswith("hub kernels: 5 ") for a in traced.assumptions)
    est = estimate(spec_from_config(dict(SMALL_LLAMA)), w)
    assert abs(est.peak_allocated_bytes / traced.peak_allocated_bytes - 1) < 0.005
    plain = trace_workload(dict(SMALL_LLAMA), make_workload(**opts))
    if opts.get("task") != "infer":
        assert traced.peak_allocated_bytes < plain.peak_allocated_bytes


def test_parallel_layouts_build_the_model_the_same_way() -> None:
    from vramplan.parallel import Layout, estimate_parallel

    spec = spec_from_config(SMALL_LLAMA)
    for layout in (Layout(gpus=2), Layout(gpus=2, zero=3)):
        off = estimate_parallel(spec, make_workload(method="full", batch_size=2, seq_len=256), layout)
        on = estimate_parallel(spec, make_workload(method="full", batch_size=2, seq_len=256, hub_kernels=True), layout)
        assert on.peak_allocated_bytes < off.peak_allocated_bytes
        assert on.total_bytes < off.total_bytes  # (the rank replay builds it as the estimate does)

