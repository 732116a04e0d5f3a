"""Serving engines against the figures vLLM, SGLang and llama.cpp printed in published logs
(tests/data/serving_published.json, each with its source), and the mechanisms' own invariants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vramplan.catalog import resolve_model
from vramplan.errors import WorkloadError
from vramplan.estimator import CUDA_CONTEXT_BYTES
from vramplan.gguf import read_gguf
from vramplan.hfconfig import spec_from_config
from vramplan.serving.llamacpp import llamacpp_memory
from vramplan.serving.vllm import ServingConfig, serve_memory
from vramplan.spec import ModelSpec

from .gguf_writer import llama_like

GiB, MiB = 1 << 30, 1 << 20
DATA = json.loads((Path(__file__).parent / "data" / "serving_published.json").read_text())
VLLM = {c["id"]: c for c in DATA["vllm"]}
LCPP = {c["id"]: c for c in DATA["llama.cpp"]}


def _spec(case: dict[str, Any]) -> ModelSpec:
    if "config" in case:
        return spec_from_config(case["config"], name=case["id"])
    return resolve_model(case["model"])[0]


@pytest.mark.parametrize("case_id", [k for k, c in VLLM.items() if "weights_gib" in c["checks"]])
def test_vllm_weights_per_gpu(case_id: str) -> None:
    case = VLLM[case_id]
    spec = _spec(case)
    for key, gib in case["checks"]["weights_gib"].items():
        tp = int(key[2:])
        r = serve_memory(spec, ServingConfig(tp=tp, max_model_len=4096), total_memory_bytes=80 * GiB)
        assert r.weights_bytes / GiB == pytest.approx(gib, rel=0.01), (case_id, key)


def test_vllm_08_l40s_llama_kv_tokens() -> None:
    case = VLLM["vllm-pr-17122-llama31-8b-l40s"]
    r = serve_memory(_spec(case), ServingConfig(max_model_len=32768, engine_version="0.8"),
                     total_memory_bytes=int(case["total_memory_gib"] * GiB), gpu_name="l40s")
    assert (r.max_num_batched_tokens, r.max_num_seqs) == (8192, 1024)
    assert r.kv_tokens == pytest.approx(case["checks"]["kv_tokens"], rel=0.05)
    assert r.max_concurrency == pytest.approx(case["checks"]["max_concurrency"], rel=0.05)


def test_vllm_and_sglang_qwen3_235b_fp8_tp4() -> None:
    case = VLLM["vllm-issue-21348-qwen3-235b-fp8-tp4"]
    spec = _spec(case)
    total = int(case["total_memory_gib"] * GiB)
    r = serve_memory(spec, ServingConfig(tp=4), total_memory_bytes=total, gpu_name="h100-sxm")
    assert r.kv_bytes_per_token == 94 * 2 * 1 * 128 * 2  # one KV head per rank, bf16
    assert r.kv_cache_bytes / GiB == pytest.approx(case["checks"]["kv_cache_gib"], rel=0.10)
    assert r.kv_tokens == pytest.approx(case["checks"]["kv_tokens"], rel=0.10)
    # the sampler over 1024 x 151,936 fp32 logits dominates the profile run, not the 8192-token forward
    assert r.sampler_peak_bytes > 5 * r.forward_peak_bytes
    s = serve_memory(spec, ServingConfig(engine="sglang", tp=4, gpu_memory_utilization=0.93),
                     total_memory_bytes=total, gpu_name="h100-sxm")
    assert s.kv_tokens == pytest.approx(case["checks"]["sglang_tokens"], rel=0.05)


def test_sampler_scales_with_max_num_seqs_times_vocab() -> None:
    spec = resolve_model("llama-3.1-8b")[0]
    a = serve_memory(spec, ServingConfig(max_num_seqs=256, max_model_len=8192), total_memory_bytes=80 * GiB)
    b = serve_memory(spec, ServingConfig(max_num_seqs=512, max_model_len=8192), total_memory_bytes=80 * GiB)
    u = 256 * spec.vocab_size * 4
    assert b.sampler_peak_bytes - a.sampler_peak_bytes == pytest.approx(9.5 * u, rel=0.01)
    assert a.gpu_blocks > b.gpu_blocks
    # fp8 KV halves the bytes per token and about doubles the blocks
    c = serve_memory(spec, ServingConfig(max_num_seqs=256, max_model_len=8192, kv_cache_dtype="fp8"),
                     total_memory_bytes=80 * GiB)
    assert c.kv_bytes_per_token * 2 == a.kv_bytes_per_token and c.gpu_blocks in (2 * a.gpu_blocks, 2 * a.gpu_blocks + 1)


def test_tp_and_version_change_the_budget() -> None:
    spec = resolve_model("llama-3.1-70b")[0]
    one = serve_memory(spec, ServingConfig(tp=4, max_model_len=8192), total_memory_bytes=int(79.19 * GiB),
                       gpu_name="h100-sxm")
    assert one.fits and one.max_model_len_fit >= 8192 and one.max_concurrency > 32
    old = serve_memory(spec, ServingConfig(tp=4, max_model_len=8192, engine_version="0.8"),
                       total_memory_bytes=int(79.19 * GiB), gpu_name="h100-sxm")
    assert old.kv_cache_bytes < one.kv_cache_bytes  # 0.8 also subtracts the CUDA context
    # PR 19312 (0.9.2) changed the budget; PR 17885 (0.9.0) the defaults on A100s
    h100 = int(79.19 * GiB)
    v091 = serve_memory(spec, ServingConfig(tp=4, max_model_len=8192, engine_version="0.9.1"),
                        total_memory_bytes=h100, gpu_name="h100-sxm")
    v092 = serve_memory(spec, ServingConfig(tp=4, max_model_len=8192, engine_version="v0.9.2"),
                        total_memory_bytes=h100, gpu_name="h100-sxm")
    assert v092.kv_cache_bytes - v091.kv_cache_bytes == CUDA_CONTEXT_BYTES
    a100 = int(79.15 * GiB)
    assert serve_memory(spec, ServingConfig(tp=4, engine_version="0.8.5"), total_memory_bytes=a100,
                        gpu_name="a100-80gb-sxm").max_num_seqs == 1024
    assert serve_memory(spec, ServingConfig(tp=4, engine_version="0.10.1"), total_memory_bytes=a100,
                        gpu_name="a100-80gb-sxm").max_num_seqs == 256
    with pytest.raises(WorkloadError, match="engine-version"):
        ServingConfig(engine_version="0.5")
    with pytest.raises(WorkloadError, match="divide"):
        serve_memory(spec, ServingConfig(tp=3), total_memory_bytes=80 * GiB)
    tiny = serve_memory(spec, ServingConfig(tp=1), total_memory_bytes=int(79.19 * GiB))
    assert not tiny.fits and tiny.gpu_blocks == 0 and tiny.warnings


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("case_id", list(LCPP))
def test_llamacpp_published(case_id: str, gguf_dir: Path) -> None:
    case = LCPP[case_id]
    path = gguf_dir / f"{case_id}.gguf"
    llama_like(path, **case["gguf"])
    g = read_gguf(path)
    r = llamacpp_memory(g, n_ctx=case["settings"]["n_ctx"], flash_attn=case["settings"].get("flash_attn", True))
    checks = case["checks"]
    assert r.gpu_kv_bytes / MiB == checks["kv_mib"]
    if "compute_mib" in checks:
        assert r.gpu_compute_bytes / MiB == pytest.approx(checks["compute_mib"], abs=0.01)
    else:
        assert int(r.gpu_compute_bytes / MiB) == checks["compute_mib_floor"]
    if "host_compute_mib" in checks:
        assert r.host_compute_bytes / MiB == pytest.approx(checks["host_compute_mib"], abs=0.02)


def test_llamacpp_kv_types_offload_and_padding(gguf_dir: Path) -> None:
    path = gguf_dir / "llama8b.gguf"
    total = llama_like(path, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
    g = read_gguf(path)
    assert g.tensor_bytes == total
    f16 = llamacpp_memory(g, n_ctx=8000)
    assert f16.n_ctx == 8192  # padded to 256
    assert f16.k_bytes == 32 * 1024 * 2 * 8192
    q8 = llamacpp_memory(g, n_ctx=8192, type_k="q8_0", type_v="q8_0")
    assert q8.k_bytes == 32 * (1024 // 32 * 34) * 8192  # 34-byte blocks of 32
    q4 = llamacpp_memory(g, n_ctx=8192, type_k="q4_0", type_v="q4_0")
    assert q4.k_bytes == 32 * (1024 // 32 * 18) * 8192
    with pytest.raises(WorkloadError, match="flash attention"):
        llamacpp_memory(g, n_ctx=8192, type_v="q8_0", flash_attn=False)
    # every tensor is on the GPU or in host memory; the embedding stays in host memory
    emb = next(t for t in g.tensors if t.name == "token_embd.weight").nbytes
    assert f16.gpu_model_bytes + f16.host_model_bytes == total and f16.host_model_bytes == emb
    half = llamacpp_memory(g, n_ctx=8192, n_gpu_layers=16)
    assert half.gpu_kv_bytes == half.host_kv_bytes and half.layers_on_gpu == 16
    # --parallel 4 without a unified cache: four streams of n_ctx/4 cells, same total
    par = llamacpp_memory(g, n_ctx=8192, n_parallel=4)
    assert par.kv_cells == 8192 and par.gpu_kv_bytes == f16.gpu_kv_bytes


def test_llamacpp_sliding_window_cache(gguf_dir: Path) -> None:
    path = gguf_dir / "gemma.gguf"
    llama_like(path, arch="gemma2", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000,
               sliding_window=4096)
    r = llamacpp_memory(read_gguf(path), n_ctx=32768)
    # layers 0 and 2 slide: GGML_PAD(min(32768, 4096 + 512), 256) = 4608 cells; layers 1 and 3 keep 32768
    per_cell = 2 * 64 * 2
    assert r.k_bytes == per_cell * (2 * 4608 + 2 * 32768)


@pytest.mark.parametrize("blob, message", [
    (b"NOPE" + bytes(40), "no 'GGUF' magic"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "version 1"),
    (b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + bytes(8), "tensors"),
    (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little") + (1 << 30).to_bytes(8, "little"),
     "a string of"),
])
def test_malformed_gguf_one_line_errors(tmp_path: Path, blob: bytes, message: str) -> None:
    from vramplan.errors import ConfigError

    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(ConfigError, match=message):
        read_gguf(p)


# ---- command line ------------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from vramplan.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


SERVING_KEYS = {"engine", "weights_bytes", "profile_peak_bytes", "non_torch_bytes", "cuda_graph_bytes",
                "kv_cache_bytes", "kv_bytes_per_token", "block_size", "gpu_blocks", "max_concurrency",
                "max_model_len_fit"}


def test_cli_fit_engine_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["fit", "llama-3.1-70b", "--gpu", "h100-sxm", "--task", "infer", "--engine", "vllm", "--tp", "4",
                       "--max-model-len", "8192", "--kv-cache-dtype", "fp8", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert set(d["serving"]) >= SERVING_KEYS and d["serving"]["tp"] == 4 and d["max_batch_size"] >= 0
    assert d["serving"]["kv_bytes_per_token"] == 80 * 2 * 2 * 128 * 1
    rc, out, _ = _cli(["fit", "qwen2.5-7b", "--gpu", "rtx-4090", "--task", "infer", "--engine", "sglang", "--json"],
                      capsys)
    assert rc == 0 and json.loads(out)["serving"]["engine"] == "sglang"


def test_cli_gguf_estimate_fit_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.gguf"
    llama_like(path, n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000, ctx_train=8192)
    rc, out, _ = _cli(["estimate", str(path), "--ctx", "2048", "--kv-cache-dtype", "q8_0", "--json"], capsys)
    assert rc == 0 and json.loads(out)["serving"]["type_k"] == "q8_0"
    rc, out, _ = _cli(["fit", str(path), "--gpu", "rtx-4090", "--json"], capsys)
    assert rc == 0 and json.loads(out)["fits"] is True
    rc, out, _ = _cli(["export", str(path), "--engine", "llama.cpp", "--gpu", "rtx-4090"], capsys)
    assert rc == 0 and "-c 8192" in out  # the whole training context fits
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(3))
    rc, _, err = _cli(["estimate", str(tmp_path / "bad.gguf")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "GGUF" in err


@pytest.mark.parametrize("argv, message", [
    (["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--engine", "vllm"], "--task infer"),
    (["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--task", "infer", "--engine", "vllm", "--kv-cache-dtype", "q4_0"],
     "llama.cpp"),
    (["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--task", "infer", "--engine", "llama.cpp"], "GGUF"),
    (["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--task", "infer", "--engine", "vllm", "--engine-version", "0.4"],
     "engine-version"),
    (["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--task", "infer", "--engine", "vllm", "--ctx", "4096"], "--ctx"),
    (["estimate", "llama-3.1-8b", "--kv-cache-dtype", "q8_0"], ".gguf"),
    (["estimate", "llama-3.1-8b", "--parallel", "4"], "--parallel"),
])
def test_cli_serving_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
