"""vramplan.fit: fit and headroom, exact largest batch and longest sequence, vLLM-style KV capacity."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import get_model
from vramplan.cli import main
from vramplan.errors import WorkloadError
from vramplan.estimator import CUDA_CONTEXT_BYTES, estimate
from vramplan.fit import VLLM_BLOCK_TOKENS, check_fit, kv_bytes_per_token, kv_capacity, largest_fitting
from vramplan.hardware import get_gpu
from vramplan.workload import Method, Task, Workload


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 6000))
def test_largest_fitting_is_exact(threshold: int, cap: int) -> None:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= threshold

    got = largest_fitting(fits, cap)
    assert got == min(threshold, cap)
    assert len(calls) <= 2 * cap.bit_length() + 3  # exponential + binary search, not a scan


CASES = [
    ("llama-3.1-8b", Workload(method=Method.QLORA, gradient_checkpointing=True), "rtx-4090"),
    ("llama-3.2-1b", Workload(), "a100-80gb-sxm"),
    ("mistral-7b", Workload(task=Task.INFER, seq_len=1024, new_tokens=256), "l40s"),
    ("qwen2.5-0.5b", Workload(method=Method.LORA, batch_size=2, seq_len=1024), "rtx-3060"),
]


@pytest.mark.parametrize(("model", "w", "gpu_name"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_limits_are_exact_on_the_estimator(model: str, w: Workload, gpu_name: str) -> None:
    spec = get_model(model).spec
    gpu = get_gpu(gpu_name)
    r = check_fit(spec, w, gpu, name=model)
    usable = gpu.usable_memory_bytes
    # the margin is taken on the largest total over this batch and every smaller one (fit.batch_envelope)
    envelope = max(estimate(spec, w.with_(batch_size=b)).total_bytes for b in range(1, w.batch_size + 1))
    assert r.headroom_bytes == usable - envelope
    assert r.fits == (r.headroom_bytes >= 0)

    def total(x: Workload) -> int:
        return estimate(spec, x).total_bytes

    assert r.max_batch_size >= 1
    assert total(w.with_(batch_size=r.max_batch_size)) <= usable
    assert total(w.with_(batch_size=r.max_batch_size + 1)) > usable
    assert r.max_seq_len >= 1
    assert total(w.with_(seq_len=r.max_seq_len)) <= usable
    assert total(w.with_(seq_len=r.max_seq_len + 1)) > usable
    assert r.fits == (r.max_batch_size >= w.batch_size)


def test_a_workload_that_cannot_fit_reports_zero() -> None:
    spec = get_model("llama-2-70b").spec
    r = check_fit(spec, Workload(), get_gpu("rtx-4090"))
    assert not r.fits and r.headroom_bytes < 0
    assert r.max_batch_size == 0 and r.max_seq_len == 0


def test_kv_capacity_follows_the_vllm_method() -> None:
    spec = get_model("llama-3.1-8b").spec
    gpu = get_gpu("h100-sxm")
    w = Workload(task=Task.INFER, seq_len=1000, new_tokens=24)
    kv = kv_capacity(spec, w, gpu, gpu_memory_utilization=0.9)
    assert kv.kv_bytes_per_token == 2 * spec.num_kv_heads * spec.head_dim * 2 * spec.num_layers == 131072
    assert kv.kv_bytes_per_token == kv_bytes_per_token(spec, 2)
    assert kv.kv_budget_bytes == int(gpu.usable_memory_bytes * 0.9) - kv.profile_peak_bytes - CUDA_CONTEXT_BYTES
    block = VLLM_BLOCK_TOKENS * kv.kv_bytes_per_token
    assert kv.num_blocks * block <= kv.kv_budget_bytes < (kv.num_blocks + 1) * block
    assert kv.sequence_tokens == 1024
    assert kv.max_concurrent_sequences == kv.num_blocks // (1024 // VLLM_BLOCK_TOKENS)
    # the profile holds at least the weights (16 GB of bf16) and no KV cache
    assert kv.profile_peak_bytes > 2 * 8_000_000_000
    more = kv_capacity(spec, w, gpu, gpu_memory_utilization=0.95)
    assert more.max_concurrent_sequences > kv.max_concurrent_sequences
    longer = kv_capacity(spec, w.with_(seq_len=4000), gpu)
    assert longer.max_concurrent_sequences < kv.max_concurrent_sequences
    with pytest.raises(WorkloadError):
        kv_capacity(spec, w, gpu, gpu_memory_utilization=1.5)


def test_inference_fit_includes_kv_and_speed() -> None:
    spec = get_model("mistral-7b").spec
    r = check_fit(spec, Workload(task=Task.INFER, seq_len=2048, new_tokens=128), get_gpu("a100-80gb-sxm"))
    assert r.kv is not None and r.kv.max_concurrent_sequences > 0
    assert r.step_time_s is not None and r.tokens_per_s is not None
    assert any("vLLM" in a for a in r.assumptions)
    d = r.to_dict()
    assert d["kv_cache"]["method"] == "vllm"


def test_fit_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit", "llama-3.1-8b", "--gpu", "RTX 4090", "--method", "qlora", "--gradient-checkpointing",
               "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    data = json.loads(out)
    assert data.keys() >= {"fits", "headroom_bytes", "max_batch_size", "max_seq_len", "total_bytes",
                           "usable_memory_bytes", "assumptions"}
    assert data["fits"] is True and data["gpu"] == "rtx-4090"
    assert data["kv_cache"] is None


def test_fit_cli_text_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "mistral-7b", "--gpu", "h100", "--task", "infer"]) == 0
    out, _ = capsys.readouterr()
    assert "concurrent sequences" in out and "largest batch" in out
    assert main(["fit", "mistral-7b", "--gpu", "rtx-4091"]) == 2
    _, err = capsys.readouterr()
    assert "unknown GPU" in err and "did you mean" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["fit", "mistral-7b", "--gpu", "h100", "--gpu-memory-utilization", "1.5"])
    assert exc.value.code == 2


def test_margin_takes_the_smaller_batch_that_reserves_more() -> None:
    """Llama-3.2-1B full training at 256 tokens reserves more at batch 7 than at batch 8
    (tests/test_allocator.py::test_reserved_is_not_monotone_in_batch); fit's margin at batch 8 is the one of
    batch 7, so it never grows with the batch."""
    spec = get_model("llama-3.2-1b").spec
    gpu = get_gpu("h100-sxm")
    w7, w8 = Workload(batch_size=7, seq_len=256), Workload(batch_size=8, seq_len=256)
    assert estimate(spec, w8).total_bytes < estimate(spec, w7).total_bytes
    r7, r8 = check_fit(spec, w7, gpu), check_fit(spec, w8, gpu)
    assert r8.headroom_bytes == r7.headroom_bytes == gpu.usable_memory_bytes - estimate(spec, w7).total_bytes


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.sampled_from(["gpt2", "qwen2.5-0.5b", "llama-3.2-1b"]), st.sampled_from(["full", "lora"]),
       st.integers(1, 7), st.sampled_from([128, 256, 384, 512]), st.sampled_from(["rtx-4090", "a100-40gb-sxm"]))
def test_oom_margin_is_monotone_in_batch(model: str, method: str, batch: int, seq: int, gpu_name: str) -> None:
    """The property issue 12 asks for: a larger batch never has a larger OOM margin, and fit never says a batch
    fits that the estimate of it (or of a smaller batch) says does not."""
    spec = get_model(model).spec
    gpu = get_gpu(gpu_name)
    w = Workload(method=Method(method), batch_size=batch, seq_len=seq)
    r, r_next = check_fit(spec, w, gpu), check_fit(spec, w.with_(batch_size=batch + 1), gpu)
    assert r_next.headroom_bytes <= r.headroom_bytes
    assert r.headroom_bytes <= gpu.usable_memory_bytes - estimate(spec, w).total_bytes
    assert r.fits == (r.max_batch_size >= batch)
    assert r.max_batch_size > 16 or all(estimate(spec, w.with_(batch_size=b)).total_bytes <= gpu.usable_memory_bytes
                                        for b in range(1, r.max_batch_size + 1))
