"""The time model's mechanisms (vramplan.perf): sharded optimizer, engines' per-layer cost, tensor-parallel
all-reduces, MoE dequantization, per-GPU efficiency data, and two invariants checked with hypothesis."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan import get_model
from vramplan.errors import VramplanError
from vramplan.hardware import get_gpu, list_gpus
from vramplan.perf import (
    ENGINES,
    dequantized_weights,
    engine_profile,
    gpu_efficiency,
    inference_time,
    logits_bytes_per_element,
    step_time,
    training_time,
    training_work,
)
from vramplan.workload import Method, Precision, Task, WeightsQuant, Workload


def test_every_efficiency_has_a_source_and_a_physical_range() -> None:
    doc = json.loads((resources.files("vramplan") / "data" / "mfu.json").read_text(encoding="utf-8"))
    for name, gen in doc["generations"].items():
        for key in ("matmul", "attention", "bandwidth"):
            assert 0 < gen[key] <= 1, (name, key)
            assert gen["sources"][key], (name, key)
    for g in list_gpus():
        eff = gpu_efficiency(g)
        assert 0 < eff.attention < eff.matmul <= 1 and 0 < eff.bandwidth <= 1, g.name
    for name in ENGINES:
        e = engine_profile(name)
        assert e.source and e.allreduce_latency_s > 0
        assert (e.mode == "eager") == (e.per_layer_s is None)


def test_sharded_optimizer_step_is_divided_by_the_shard_degree() -> None:
    spec = get_model("llama-3.1-8b").spec
    w = Workload(batch_size=2, seq_len=2048, gradient_checkpointing=True)
    gpu = get_gpu("h100-sxm")
    work = training_work(spec, w)
    one = step_time(work, gpu)
    eight = step_time(work, gpu, shard=8)
    assert one is not None and eight is not None
    assert eight.optimizer_s == pytest.approx(one.optimizer_s / 8)
    ddp = training_time(spec, w, gpu, tokens=10**7, gpus=8)
    fsdp = training_time(spec, w, gpu, tokens=10**7, gpus=8, shard=8)
    assert fsdp.step is not None and ddp.step is not None and fsdp.step.total_s < ddp.step.total_s


def test_an_older_attention_kernel_slows_only_the_attention_term() -> None:
    """FlashAttention v1 (and llm-foundry's Triton port) reaches half of FlashAttention-2's fraction
    (FlashAttention-2 abstract, data/mfu.json attention_kernels); nothing else in the step changes."""
    spec = get_model("llama-3.1-8b").spec
    w = Workload(batch_size=1, seq_len=8192)
    gpu = get_gpu("a100-80gb-sxm")
    work = training_work(spec, w)
    fa2, fa1 = step_time(work, gpu), step_time(work, gpu, attention_kernel="flash1")
    assert fa2 is not None and fa1 is not None
    assert fa1.memory_s == fa2.memory_s and fa1.optimizer_s == fa2.optimizer_s and fa1.launch_s == fa2.launch_s
    gemm_only = step_time(dataclasses.replace(work, attention_flops=0.0), gpu)
    assert gemm_only is not None
    attention = fa2.compute_s - gemm_only.compute_s
    assert attention > 0
    assert fa1.compute_s - gemm_only.compute_s == pytest.approx(2 * attention)
    tt = training_time(spec, w, gpu, tokens=10**6, attention_kernel="flash1")
    assert any("attention kernel flash1" in a for a in tt.assumptions)
    with pytest.raises(VramplanError, match="unknown attention kernel"):
        step_time(work, gpu, attention_kernel="flash9")


def test_serving_engines_run_their_own_fused_attention() -> None:
    """GPT-J had only eager attention in transformers 5.17 (scores materialised, the full square multiplied); a
    serving engine prefills it with its own fused causal kernel: no score traffic, the masked half skipped."""
    from vramplan.perf import inference_work

    spec = get_model("gpt-j-6b").spec
    w = Workload(task=Task.INFER, precision=Precision.FP16, batch_size=1, seq_len=2048, new_tokens=1,
                 transformers="5.17.0")
    hf, trt = inference_work(spec, w, "transformers"), inference_work(spec, w, "tensorrt-llm")
    assert hf.score_bytes > 0 and trt.score_bytes == 0
    assert trt.attention_flops == pytest.approx(hf.attention_flops * (2048 + 1) / 2 / 2048)
    assert trt.gemm_flops == hf.gemm_flops
    assert engine_profile("tensorrt-llm").fused_attention and not engine_profile("transformers").fused_attention


def test_fp8_gemms_pay_for_quantizing_their_inputs() -> None:
    """An fp8 GEMM takes fp8 activations: each linear's 16-bit input is quantized in a kernel of its own (read 2
    bytes, write 1). transformers quantizes per Linear module (q, k, v each); an engine once per fused input
    (qkv, gate_up). 16-bit weights pay nothing, and the pass slows the prefill on the same GPU."""
    from vramplan.perf import inference_work

    spec = get_model("llama-2-7b").spec
    w = Workload(task=Task.INFER, precision=Precision.FP16, weights_quant=WeightsQuant.FP8, batch_size=1,
                 seq_len=2048, new_tokens=1)
    hf, trt = inference_work(spec, w, "transformers"), inference_work(spec, w, "tensorrt-llm")
    d, f, L = 4096, 11008, 32
    assert hf.quant_kernels == 7 and trt.quant_kernels == 4
    assert hf.quant_bytes == 2048 * L * (6 * d + f) * 3
    assert trt.quant_bytes == 2048 * L * (3 * d + f) * 3
    plain = inference_work(spec, dataclasses.replace(w, weights_quant=WeightsQuant.NONE), "tensorrt-llm")
    assert plain.quant_bytes == 0 and plain.quant_kernels == 0
    gpu = get_gpu("h100-sxm")
    with_quant = step_time(trt, gpu, engine=engine_profile("tensorrt-llm"))
    without = step_time(dataclasses.replace(trt, quant_bytes=0, quant_kernels=0), gpu,
                        engine=engine_profile("tensorrt-llm"))
    assert with_quant is not None and without is not None
    assert with_quant.memory_s > without.memory_s and with_quant.launch_s > without.launch_s
    from vramplan.perf import decode_step

    fp8_step = decode_step(spec, w, gpu, context=2048, batch=1, engine="tensorrt-llm")
    plain_step = decode_step(spec, dataclasses.replace(w, weights_quant=WeightsQuant.NONE), gpu, context=2048,
                             batch=1, engine="tensorrt-llm")
    kernel_s = engine_profile("tensorrt-llm").kernel_s or 0.0
    assert fp8_step.overhead_s - plain_step.overhead_s == pytest.approx(L * 4 * kernel_s)


def test_transformers_decode_rebuilds_its_kv_cache_every_step() -> None:
    """generate()'s DynamicCache grows by torch.cat (transformers cache_utils.py DynamicLayer.update): each step
    reads and writes the whole cache once more; a paged or static cache (vLLM, gpt-fast) writes one slot."""
    from vramplan.perf import decode_step
    from vramplan.perf.work import kv_bytes_per_token

    spec = get_model("llama-3.1-8b").spec
    w = Workload(task=Task.INFER, batch_size=2, seq_len=8192, new_tokens=16)
    gpu = get_gpu("a100-80gb-sxm")
    hf = decode_step(spec, w, gpu, context=8192, batch=2, engine="transformers")
    paged = decode_step(spec, w, gpu, context=8192, batch=2, engine="vllm")
    assert hf.bytes_read - paged.bytes_read == 2 * 2 * kv_bytes_per_token(spec, w, 8192)
    short = decode_step(spec, w, gpu, context=16, batch=2, engine="transformers")
    assert short.seconds is not None and hf.seconds is not None and hf.seconds > short.seconds


def test_an_embedding_lookup_reads_the_rows_of_its_tokens_not_the_table() -> None:
    """F.embedding indexes its table: a forward reads one row per token of an untied input embedding; a tied one is
    read whole anyway, by the output head's matrix product."""
    from vramplan.memory import model_states
    from vramplan.perf.work import weights_read_per_step

    w = Workload(task=Task.INFER, batch_size=1, seq_len=1, new_tokens=1)
    untied = get_model("llama-3.1-8b").spec
    st = model_states(untied, w)
    stored = st.weights + st.master_weights + st.quant_constants
    table = untied.vocab_size * untied.hidden_size * 2
    assert weights_read_per_step(untied, w, 1) == stored - table + untied.hidden_size * 2
    assert weights_read_per_step(untied, w, 8) - weights_read_per_step(untied, w, 1) == 7 * untied.hidden_size * 2
    tied = get_model("qwen2.5-0.5b").spec
    st = model_states(tied, w)
    assert weights_read_per_step(tied, w, 1) == st.weights + st.master_weights + st.quant_constants
    # GPT-2's learned positions are a lookup too (its token table is tied to the head)
    gpt2 = get_model("gpt2").spec
    st = model_states(gpt2, w)
    positions = (gpt2.max_learned_positions - 4) * gpt2.hidden_size * 2
    assert weights_read_per_step(gpt2, w, 4) == st.weights + st.master_weights + st.quant_constants - positions


def test_decode_pays_for_expanding_grouped_keys_and_values_where_transformers_copies_them() -> None:
    """transformers before 4.48 ran Qwen2's and Mistral's FlashAttention-2 path after repeat_kv (a copy of the cache
    for every query head); 5.x passes the grouped cache (flash) or enable_gqa (SDPA without a mask); the eager path
    always copies; serving engines never do. Each copy costs 2 x n_rep x the cache per step."""
    from vramplan.perf.work import kv_bytes_per_token, repeated_kv_bytes
    from vramplan.workload import Attention

    spec = get_model("qwen2.5-14b").spec
    old = Workload(task=Task.INFER, attention=Attention.FLASH, seq_len=30720, new_tokens=2048, transformers="4.46.0")
    n_rep = spec.num_heads // spec.num_kv_heads
    assert repeated_kv_bytes(spec, old, 30720) == 2 * n_rep * kv_bytes_per_token(spec, old, 30720)
    assert repeated_kv_bytes(spec, dataclasses.replace(old, transformers="5.17.0"), 30720) == 0
    assert repeated_kv_bytes(spec, dataclasses.replace(old, attention=Attention.SDPA, transformers=None), 30720) == 0
    assert repeated_kv_bytes(spec, dataclasses.replace(old, attention=Attention.EAGER), 30720) > 0
    assert repeated_kv_bytes(spec, old, 30720, engine="vllm") == 0
    assert repeated_kv_bytes(get_model("llama-3.1-8b").spec, old, 30720) == 0  # Llama's FA2 path never repeated


def test_generate_pays_its_own_per_step_work_besides_the_layers() -> None:
    """generate() launches its own ops every step (inputs, logits processors, sampling, stopping criteria): counted
    in layer passes at the calibrated eager launch cost, the same for every model size."""
    from vramplan.perf import engine_overhead_s, load_throughput_model

    hf = engine_profile("transformers")
    launch = load_throughput_model().launch_s_per_layer_pass
    for name in ("qwen2.5-0.5b", "qwen2.5-14b"):
        spec = get_model(name).spec
        assert engine_overhead_s(spec, hf) == pytest.approx((spec.num_layers + hf.step_layer_passes) * launch)
    assert 1 <= hf.step_layer_passes <= 2


def test_logits_bytes_are_counted_not_fitted() -> None:
    bf16 = Workload(precision=Precision.BF16)
    fp32 = Workload(precision=Precision.FP32)
    # bf16: head output 2, upcast 2+4, log_softmax 8+4 | zero grad 4, softmax backward 8+4, cast back 4+2
    assert logits_bytes_per_element(bf16, training=True) == 42
    assert logits_bytes_per_element(fp32, training=True) < logits_bytes_per_element(bf16, training=True)
    assert logits_bytes_per_element(bf16, training=False) == 2 + 2 + 4


def test_moe_dequantizes_every_expert_that_receives_tokens() -> None:
    spec = get_model("mixtral-8x7b").spec
    few, many = dequantized_weights(spec, 1), dequantized_weights(spec, 16384)
    assert many > 3 * few  # 8 experts hit at 16k tokens, 2 for one token
    w = Workload(method=Method.QLORA, batch_size=1, seq_len=8192)
    assert training_work(spec, w).dequant_bytes == pytest.approx(
        4 * many * training_work(spec, w).layer_passes / spec.num_layers, rel=0.35)


def test_engines_pay_a_per_layer_cost_that_tensor_parallelism_does_not_shrink() -> None:
    spec = get_model("llama-2-7b").spec
    gpu = get_gpu("a100-80gb-sxm")
    w = Workload(task=Task.INFER, batch_size=1, seq_len=16, new_tokens=200)
    tp1 = inference_time(spec, w, gpu, engine="gpt-fast")
    tp8 = inference_time(spec, w, gpu, engine="gpt-fast", split=8)
    assert tp1.decode_s_per_token is not None and tp8.decode_s_per_token is not None
    assert tp8.decode_overhead_s == pytest.approx(tp1.decode_overhead_s)
    assert tp8.decode_allreduce_s > 0
    assert tp1.decode_s_per_token / 8 < tp8.decode_s_per_token < tp1.decode_s_per_token
    hf = inference_time(spec, w, gpu)
    assert hf.decode_s_per_token is not None and hf.decode_s_per_token > 2 * tp1.decode_s_per_token


_MODELS = ("llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b")


@settings(max_examples=25, deadline=None)
@given(model=st.sampled_from(_MODELS), batch=st.sampled_from([8, 16, 32, 64]), seq=st.sampled_from([512, 2048]),
       gpus=st.sampled_from([1, 2, 4, 8]), shard=st.booleans())
def test_more_gpus_never_increase_the_compute_of_the_same_global_batch(model: str, batch: int, seq: int, gpus: int,
                                                                        shard: bool) -> None:
    spec = get_model(model).spec
    gpu = get_gpu("h100-sxm")
    times = []
    for n in (1, gpus):
        w = Workload(batch_size=batch // n, seq_len=seq, gradient_checkpointing=True)
        work = training_work(spec, w)
        stp = step_time(work, gpu, shard=n if shard else 1)
        assert stp is not None
        times.append(stp.total_s - stp.comm_s)
    assert times[1] <= times[0] * (1 + 1e-9)


def _faster(gpu_name: str, factor: float) -> object:
    g = get_gpu(gpu_name)
    tf = g.tflops
    faster = dataclasses.replace(tf, **{k: (None if v is None else v * factor)
                                        for k, v in dataclasses.asdict(tf).items()})
    bandwidth = int(g.memory_bandwidth_bytes_per_s * factor)
    return dataclasses.replace(g, tflops=faster, memory_bandwidth_bytes_per_s=bandwidth)


@settings(max_examples=25, deadline=None)
@given(model=st.sampled_from(_MODELS), gpu=st.sampled_from(["a100-80gb-sxm", "h100-sxm", "rtx-4090", "l40s"]),
       factor=st.floats(1.0, 4.0), infer=st.booleans(),
       engine=st.sampled_from(["transformers", "vllm", "tensorrt-llm"]), host=st.booleans(),
       seq=st.sampled_from([128, 1024]))
def test_a_faster_gpu_is_never_slower(model: str, gpu: str, factor: float, infer: bool, engine: str, host: bool,
                                      seq: int) -> None:
    spec = get_model(model).spec
    base, fast = get_gpu(gpu), _faster(gpu, factor)
    if infer:  # host: steps enqueued by the host (no CUDA graphs), a floor the GPU does not move
        w = Workload(task=Task.INFER, batch_size=4, seq_len=seq, new_tokens=64)
        a = inference_time(spec, w, base, engine=engine, host_enqueued=host)
        b = inference_time(spec, w, fast, engine=engine, host_enqueued=host)  # type: ignore[arg-type]
        assert a.request_s is not None and b.request_s is not None
        assert b.request_s <= a.request_s * (1 + 1e-9)
    else:
        w = Workload(batch_size=2, seq_len=1024)
        ta = training_time(spec, w, base, tokens=10**6)
        tb = training_time(spec, w, fast, tokens=10**6)  # type: ignore[arg-type]
        assert ta.time_s is not None and tb.time_s is not None
        assert tb.time_s <= ta.time_s * (1 + 1e-9)


# ----------------------------------------------------------------------------------------- CLI contract


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from vramplan.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


_TIME_KEYS = {"step_seconds", "train_tokens_per_second_per_gpu", "prefill_seconds", "decode_seconds_per_token",
              "decode_tokens_per_second", "mfu", "method"}


def test_estimate_json_has_a_time_object(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "estimate", "llama-3.2-1b", "--gpu", "h100-sxm", "--batch-size", "2", "--json")
    assert rc == 0
    t = json.loads(out)["time"]
    assert set(t) >= _TIME_KEYS
    assert t["step_seconds"] > 0 and t["train_tokens_per_second_per_gpu"] > 0 and 0 < t["mfu"] < 1
    assert t["prefill_seconds"] is None and t["method"] == "mechanism"
    rc, out, _ = _run(capsys, "estimate", "llama-3.2-1b", "--task", "infer", "--gpu", "h100-sxm", "--engine", "vllm",
                      "--batch-size", "4", "--json")
    t = json.loads(out)["time"]
    assert t["prefill_seconds"] > 0 and t["engine"] == "vllm"
    assert t["decode_tokens_per_second"] == pytest.approx(4 / t["decode_seconds_per_token"])
    rc, out, _ = _run(capsys, "estimate", "llama-3.2-1b", "--json")
    assert "time" not in json.loads(out)  # no GPU, no time: the old contract is unchanged


def test_attention_kernel_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("estimate", "llama-3.2-1b", "--gpu", "a100-80gb-sxm", "--seq-len", "8192", "--batch-size", "1", "--json")
    rc, out, _ = _run(capsys, *args)
    rc1, out1, _ = _run(capsys, *args, "--attention-kernel", "flash1")
    assert rc == rc1 == 0
    assert json.loads(out1)["time"]["step_seconds"] > json.loads(out)["time"]["step_seconds"]
    rc, _, err = _run(capsys, *args, "--attention-kernel", "flash9")
    assert rc == 2 and "unknown attention kernel" in err and "Traceback" not in err


def test_measured_efficiency_sets_the_mfu(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "estimate", "llama-3.2-1b", "--gpu", "a100-80gb-sxm", "--efficiency", "0.45", "--json")
    t = json.loads(out)["time"]
    assert t["method"] == "measured-mfu" and t["mfu"] == pytest.approx(0.45)
    rc, _, err = _run(capsys, "estimate", "llama-3.2-1b", "--efficiency", "0.45")
    assert rc == 2 and "needs --gpu" in err


def test_custom_gpu_inline_and_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = _run(capsys, "estimate", "llama-3.1-8b", "--task", "infer", "--gpu",
                      "custom:memory=96GiB,bf16_tflops=148,bandwidth=4.0TB/s,architecture=Hopper", "--json")
    assert rc == 0
    t = json.loads(out)["time"]
    # 16 GB of weights over 4 TB/s: decode cannot beat 4 ms per step
    assert t["decode_seconds_per_token"] > 16e9 / 4.0e12
    spec_file = tmp_path / "gpu.json"
    spec_file.write_text(json.dumps({"name": "h20", "memory": "96GiB", "bandwidth": "4.0TB/s", "bf16_tflops": 148,
                                     "link": "900GB/s", "price": 1.2, "matmul_efficiency": 0.7}), encoding="utf-8")
    rc, out, _ = _run(capsys, "estimate", "llama-3.1-8b", "--gpu-spec", str(spec_file), "--json")
    t = json.loads(out)["time"]
    assert rc == 0 and t["gpu"] == "h20" and t["efficiency"]["matmul"] == pytest.approx(0.7)
    for bad in ("custom:memory=abc,bandwidth=1TB/s", "custom:bandwidth=1TB/s", "custom:memory=8GiB,speed=3"):
        rc, _, err = _run(capsys, "estimate", "llama-3.2-1b", "--gpu", bad)
        assert rc == 2 and err.count("\n") == 1, bad


def test_a_power_capped_card_is_slower() -> None:
    from vramplan.perf.custom import resolve_gpu

    spec = get_model("llama-3.2-1b").spec
    capped = resolve_gpu("custom:base=a100-80gb-sxm,bf16_tflops=200,name=a100-330w")
    w = Workload(batch_size=4, seq_len=2048)
    full = training_time(spec, w, get_gpu("a100-80gb-sxm"), tokens=10**6)
    slow = training_time(spec, w, capped, tokens=10**6)
    assert full.time_s is not None and slow.time_s is not None and slow.time_s > full.time_s


@pytest.mark.parametrize(("engine", "quant"), [("vllm", WeightsQuant.NONE), ("transformers", WeightsQuant.NONE),
                                                ("vllm", WeightsQuant.FP8)])
def test_plan_ranks_with_the_estimate_numbers(engine: str, quant: WeightsQuant,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The planner prices a request with inference_time's terms, the engine's decode traffic included (transformers
    rebuilds its cache with torch.cat every step) and fp8's quantization kernels."""
    from vramplan.planner import PlanRequest, PlanTask, plan

    spec = get_model("llama-3.2-1b").spec
    gpu = get_gpu("h100-sxm")
    req = PlanRequest(task=PlanTask.INFER, seq_len=8192, new_tokens=128, max_gpus=1, micro_batches=(8,),
                      engine=engine, weights_quants=(quant,))
    res = plan(spec, req, gpus=[gpu])
    p = next(p for p in res.plans if p.gpu_count == 1 and p.micro_batch == 8)
    it = inference_time(spec, Workload(task=Task.INFER, batch_size=8, seq_len=8192, new_tokens=128,
                                       weights_quant=quant), gpu, engine=engine)
    assert it.request_s is not None and p.tokens_per_s is not None
    assert p.tokens_per_s == pytest.approx(8 * 128 / it.request_s, rel=1e-6)


def test_plan_takes_a_described_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "plan", "llama-3.2-1b", "--task", "infer", "--engine", "vllm", "--top", "5", "--json",
                      "--gpu", "custom:memory=96GiB,bf16_tflops=148,bandwidth=4.0TB/s,price=1.5,name=h20")
    assert rc == 0
    plans = json.loads(out)["plans"]
    assert plans and {p["gpu"] for p in plans} == {"h20"} and all(p["tokens_per_s"] for p in plans)


def test_the_bandwidth_fraction_belongs_to_the_gpus_memory() -> None:
    """Where a copy measurement of a GPU's own memory is published, its fraction is the GPU's (GDDR6 on the L40S,
    HBM2 on the A100 40GB, HBM2e on the H100 PCIe), each with a source; other GPUs keep their generation's."""
    doc = json.loads((resources.files("vramplan") / "data" / "mfu.json").read_text(encoding="utf-8"))
    own = {name: g for name, g in doc["gpus"].items() if "bandwidth" in g}
    assert {"l40s", "a100-40gb-sxm", "h100-pcie"} <= set(own)
    for name, g in own.items():
        eff = gpu_efficiency(get_gpu(name))
        assert eff.bandwidth == g["bandwidth"] and 0.5 < eff.bandwidth <= 1, name
        assert any(s.startswith("bandwidth: ") and "gpu-stream" in s for s in eff.sources), name
    gen = doc["generations"]["Ada Lovelace"]["bandwidth"]
    assert gpu_efficiency(get_gpu("rtx-4090")).bandwidth == gen  # GDDR6X: no measurement of its own
    assert gpu_efficiency(get_gpu("l40s")).bandwidth != gen
    # the decode roofline streams at the GPU's own fraction
    from vramplan.perf import decode_step

    spec = get_model("llama-3.1-8b").spec
    l40s = get_gpu("l40s")
    w = Workload(task=Task.INFER, batch_size=1, seq_len=128, new_tokens=1)
    dec = decode_step(spec, w, l40s, context=128, batch=1, engine="vllm")
    achievable = l40s.memory_bandwidth_bytes_per_s * own["l40s"]["bandwidth"]
    assert dec.roofline_s == pytest.approx(dec.bytes_read / achievable)
