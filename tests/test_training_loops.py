"""Training the way people train: trainer loops, fused and chunked losses, packing, checkpointing variants,
activation offloading, optimizers and adapters (issue 14).

The estimate is checked against the trace (the real transformers/peft code on fake tensors; transformers'
``Trainer.training_step`` itself for ``--trainer hf``/``trl-sft``) on small configs, and by invariants."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vramplan import MemoryKind, get_model
from vramplan.api import make_workload
from vramplan.errors import WorkloadError
from vramplan.estimator import check_positions, estimate
from vramplan.hfconfig import spec_from_config
from vramplan.workload import Attention, Loss, Method, Optimizer, Precision, Task, Trainer, Workload

TOL = 0.02  # estimate vs trace

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, vocab_size=32000),
}


def _pair(family: str, **options: Any) -> tuple[int, int]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from vramplan.trace import trace_workload

    cfg = FAMILIES[family]
    w = make_workload(**{"batch_size": 2, "seq_len": 256, **options})
    est = estimate(spec_from_config(cfg, name=family), w).peak_allocated_bytes
    traced = trace_workload(cfg, w, name=family).peak_allocated_bytes
    return est, traced


CASES = [
    ("llama", dict(trainer="hf")),
    ("llama", dict(trainer="trl-sft", method="lora")),  # TRL's default loss: chunked_nll
    ("llama", dict(trainer="trl-sft", loss="standard", precision="fp32")),  # entropy metrics at the forward peak
    ("llama", dict(trainer="hf", method="dora")),
    ("qwen2", dict(trainer="trl-sft")),
    ("qwen2", dict(trainer="hf", method="lora")),
    ("gpt_neox", dict(trainer="hf", method="qlora")),
    ("gpt_neox", dict(trainer="trl-sft", loss="standard", method="lora")),
    ("llama", dict(trainer="hf", packing=True, avg_seq_len=200)),
    ("llama", dict(trainer="hf", method="lora", checkpointing="every:2")),
    ("llama", dict(trainer="hf", activation_offload=True)),
    ("llama", dict(trainer="hf", method="lora", gradient_checkpointing=True)),
]


@pytest.mark.parametrize(("family", "options"), CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES])
def test_estimate_matches_trace(family: str, options: dict[str, Any]) -> None:
    est, traced = _pair(family, **options)
    assert abs(est / traced - 1) <= TOL, (est, traced)


SLOW_CASES = [
    (fam, dict(trainer=tr, method=m)) for fam in FAMILIES for tr in ("hf", "trl-sft") for m in ("full", "lora")
] + [
    ("llama", dict(trainer="hf", method="qlora", double_quant=True)),
    ("llama", dict(trainer="hf", optimizer="muon")),
    ("llama", dict(trainer="hf", method="dora", lora_targets="all-linear")),
    ("llama", dict(trainer="trl-sft", method="lora", precision="amp-bf16")),
    ("qwen2", dict(trainer="hf", packing=True, attention="flash")),
    ("llama", dict(trainer="hf", method="lora", activation_offload=True)),
    ("llama", dict(trainer="hf", checkpointing="every:2")),
    ("llama", dict(trainer="hf", loss="chunked", loss_chunk=510)),  # one chunk
    ("llama", dict(trainer="hf", loss="chunked", batch_size=1)),
    ("llama", dict(trainer="trl-sft", precision="amp-bf16")),
    ("gpt_neox", dict(trainer="hf", loss="chunked", loss_chunk=100, precision="fp32")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "options"), SLOW_CASES)
def test_estimate_matches_trace_more(family: str, options: dict[str, Any]) -> None:
    est, traced = _pair(family, **options)
    assert abs(est / traced - 1) <= TOL, (est, traced)


def test_hf_trainer_drops_the_logits_before_backward() -> None:
    """Trainer.compute_loss returns only the loss: b x s x V x 2 bytes less at the step than the plain loop."""
    spec = get_model("llama-3.1-8b").spec
    w = Workload(batch_size=4, seq_len=2048)
    plain = estimate(spec, w.with_(trainer=Trainer.PLAIN))
    hf = estimate(spec, w.with_(trainer=Trainer.HF))
    logits = 4 * 2048 * spec.vocab_size * 2
    assert plain.phase_peak(plain.phases[2].phase) - hf.phase_peak(hf.phases[2].phase) == logits
    assert hf.peak_allocated_bytes < plain.peak_allocated_bytes


def test_trl_defaults_to_chunked_loss() -> None:
    assert Workload(trainer=Trainer.TRL_SFT).resolved_loss is Loss.CHUNKED
    assert Workload(trainer=Trainer.HF).resolved_loss is Loss.STANDARD
    assert Workload(trainer=Trainer.TRL_SFT, loss=Loss.STANDARD).resolved_loss is Loss.STANDARD


def test_fused_losses_never_materialise_the_logits() -> None:
    spec = get_model("llama-3.1-8b").spec
    w = Workload(method=Method.LORA, batch_size=4, seq_len=4096)
    std = estimate(spec, w)
    for loss in (Loss.LIGER_FUSED, Loss.CCE):
        fused = estimate(spec, w.with_(loss=loss))
        # the standard loss holds fp32 log-probabilities of every token (b x s x V x 4)
        assert std.peak_allocated_bytes - fused.peak_allocated_bytes > 4 * 4096 * spec.vocab_size * 4 // 2


def test_liger_chunk_follows_the_kernel() -> None:
    """fused_linear_cross_entropy_forward: chunk = next_power_of_2(ceil(BT / ceil(V / H)))."""
    from vramplan.blocks import _pow2

    bt, v, h = 8192, 128256, 4096
    assert _pow2(-(-bt // -(-v // h))) == 256
    assert _pow2(1) == 1 and _pow2(5) == 8


def test_double_quant_is_off_unless_asked() -> None:
    spec = get_model("llama-3.1-8b").spec
    off = estimate(spec, Workload(method=Method.QLORA))
    on = estimate(spec, Workload(method=Method.QLORA, double_quant=True))
    # fp32 absmax per 64 weights vs uint8 + fp32 per 256 absmax: about 0.43 bits per weight more
    assert off.breakdown[MemoryKind.QUANTIZATION_CONSTANTS] > 3 * on.breakdown[MemoryKind.QUANTIZATION_CONSTANTS] > 0


def test_modules_to_save_trains_full_copies() -> None:
    spec = get_model("llama-3.1-8b").spec
    base = estimate(spec, Workload(method=Method.LORA))
    both = estimate(spec, Workload(method=Method.LORA, lora_modules_to_save=("embed_tokens", "lm_head")))
    copies = 2 * spec.vocab_size * spec.hidden_size
    assert both.trainable_parameters - base.trainable_parameters == copies
    with pytest.raises(WorkloadError):
        Workload(method=Method.FULL, lora_modules_to_save=("lm_head",))
    with pytest.raises(WorkloadError):
        Workload(method=Method.LORA, lora_modules_to_save=("q_proj",))


def test_dora_adds_a_magnitude_per_output_feature() -> None:
    spec = get_model("llama-3.1-8b").spec
    lora = estimate(spec, Workload(method=Method.LORA))
    dora = estimate(spec, Workload(method=Method.DORA))
    assert dora.trainable_parameters - lora.trainable_parameters == spec.num_layers * (spec.q_dim + spec.kv_dim)
    assert dora.peak_allocated_bytes > lora.peak_allocated_bytes


def test_paged_optimizer_states_leave_the_allocator() -> None:
    spec = get_model("llama-3.1-8b").spec
    est = estimate(spec, Workload(optimizer=Optimizer.PAGED_ADAMW_8BIT))
    eight = estimate(spec, Workload(optimizer=Optimizer.ADAMW_8BIT))
    assert est.peak_allocated_bytes < eight.peak_allocated_bytes
    assert est.host_bytes > 10 * 2**30  # uint8 states of the big tensors, in unified memory


def test_checkpointing_option_forms() -> None:
    assert Workload(gradient_checkpointing=True).checkpointing == "full"
    assert Workload(checkpointing="every:1").checkpointing == "full"
    w = Workload(checkpointing="every:4")
    assert w.gradient_checkpointing and w.checkpoint_every == 4
    assert not w.with_(gradient_checkpointing=False).gradient_checkpointing
    for bad in ("every:0", "every:x", "sometimes", "selective"):
        with pytest.raises(WorkloadError):
            Workload(checkpointing=bad)


def test_offload_reports_host_memory_and_traffic() -> None:
    spec = get_model("llama-3.1-8b").spec
    w = Workload(method=Method.LORA, batch_size=4, seq_len=4096, gradient_accumulation=2)
    off = estimate(spec, w.with_(activation_offload=True))
    assert off.host_bytes > 2**30 and off.host_traffic_bytes == 2 * 2 * off.host_bytes
    assert off.peak_allocated_bytes < estimate(spec, w).peak_allocated_bytes


# ---- invariants ---------------------------------------------------------------------------------------

MODELS = ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "mixtral-8x7b", "gemma-2-2b", "phi-3-mini", "opt-1.3b",
          "pythia-1.4b", "qwen3-0.6b"]
train_workloads = st.builds(
    Workload,
    method=st.sampled_from([Method.FULL, Method.LORA, Method.QLORA, Method.FREEZE, Method.DORA]),
    precision=st.sampled_from(list(Precision)),
    optimizer=st.sampled_from([Optimizer.ADAMW, Optimizer.ADAMW_8BIT, Optimizer.SGD]),
    batch_size=st.integers(1, 8),
    seq_len=st.integers(2, 2048),
    gradient_checkpointing=st.booleans(),
    trainer=st.sampled_from(list(Trainer)),
    lora_rank=st.integers(1, 64),
)


def _peak(model: str, w: Workload) -> int:
    spec = get_model(model).spec
    try:
        check_positions(spec, w)
    except WorkloadError:
        assume(False)
    return estimate(spec, w).peak_allocated_bytes


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODELS), train_workloads,
       st.sampled_from(["liger-fused", "cce", "offload", "packing", "paged", "galore", "apollo"]))
def test_a_saver_never_raises_the_peak(model: str, w: Workload, saver: str) -> None:
    """Savers against the same step without them. (TRL's chunked loss is not one of them: its chunks copy a
    16-bit head weight to fp32, V x H x 4 bytes, which can exceed the logits it avoids; the trace agrees. Nor is
    Liger with a trained head at fewer tokens than the hidden size: see below.)"""
    w = w.with_(loss=Loss.STANDARD)
    if saver == "liger-fused" and w.method in (Method.FULL, Method.FREEZE):
        # Liger allocates the head's gradient (V x H) in the forward: it only saves once the logits it avoids
        # (b x s x V, 16-bit plus fp32) outweigh that, i.e. from about H / 3 tokens on; a kernel property
        assume(w.batch_size * w.seq_len >= get_model(model).spec.hidden_size)
    if saver in ("liger-fused", "cce"):
        changed = w.with_(loss=Loss(saver))
    elif saver == "offload":
        changed = w.with_(activation_offload=True)
    elif saver == "packing":
        w = w.with_(attention=Attention.FLASH)
        assume(get_model(model).spec.family not in ("bloom", "gptj"))
        changed = w.with_(packing=True, avg_seq_len=max(1, w.seq_len // 2))
    elif saver == "paged":
        w = w.with_(optimizer=Optimizer.ADAMW_8BIT)
        changed = w.with_(optimizer=Optimizer.PAGED_ADAMW_8BIT)
    else:
        w = w.with_(method=Method.FULL, optimizer=Optimizer.ADAMW)
        changed = w.with_(optimizer=Optimizer(saver), optimizer_rank=8)
    assert _peak(model, changed) <= _peak(model, w)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODELS), train_workloads)
def test_packing_without_padding_equals_the_padded_step(model: str, w: Workload) -> None:
    """Packing b sequences of the full length into one row is the padded b x s step (FlashAttention keeps no
    (s x s) state either way), for every loss that sees all tokens the same way; except where the RoPE tables come
    from position_ids (1, seq) (Gemma: spec.rope_tables_unbatched), which a packed row gives as (1, b x s)."""
    spec = get_model(model).spec
    assume(spec.family not in ("bloom", "gptj") and not spec.rope_tables_unbatched)
    w = w.with_(attention=Attention.FLASH, loss=Loss.STANDARD, trainer=Trainer.HF)
    assert _peak(model, w.with_(packing=True)) == _peak(model, w)


def test_packing_is_training_only() -> None:
    spec = get_model("llama-3.2-1b").spec
    with pytest.raises(WorkloadError):
        estimate(spec, Workload(task=Task.INFER, packing=True))
    with pytest.raises(WorkloadError):
        Workload(packing=True, seq_len=100, avg_seq_len=200)


# ---- the command line ---------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vramplan", *args], capture_output=True, text=True, timeout=120)


def test_cli_options_and_json() -> None:
    r = _cli("estimate", "llama-3.1-8b", "--method", "lora", "--trainer", "trl-sft", "--loss", "liger-fused",
             "--packing", "--avg-seq-len", "600", "--batch-size", "8", "--activation-offload", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["workload"]["trainer"] == "trl-sft" and out["workload"]["loss"] == "liger-fused"
    assert out["host_bytes"] > 0 and "host_traffic_bytes" in out
    assert any("Liger" in a for a in out["assumptions"])


def test_cli_bad_checkpointing_is_one_line() -> None:
    r = _cli("estimate", "llama-3.1-8b", "--checkpointing", "every:0")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "every:N" in r.stderr



def test_plan_says_which_saver_turned_a_no_into_a_yes() -> None:
    from vramplan.planner import PlanRequest, PlanTask, plan

    spec = get_model("llama-3.1-8b").spec
    # at 4096 tokens LoRA on one RTX 3090 fits only with activation offloading (at 2048 a plan without a saver fits the
    # consumer pick's GPU too, and the pick keeps its saver only because it ranks cheaper: no note then)
    result = plan(spec, PlanRequest(task=PlanTask.FINETUNE, gpu_class="consumer", seq_len=4096), name="llama-3.1-8b")
    assert any(p.saver for p in result.plans)
    assert result.consumer is not None and result.consumer.saver
    assert any(f"fits with {result.consumer.saver} (not without it" in n for n in result.saver_notes)
    assert result.to_dict()["savers"] == list(result.saver_notes)
    assert result.consumer.saver in result.consumer.describe()
    none = plan(spec, PlanRequest(task=PlanTask.FINETUNE, gpu_class="consumer", seq_len=4096, savers=()),
                name="llama-3.1-8b")
    assert not any(p.saver for p in none.plans) and not none.saver_notes
    # without savers the same consumer GPU does not fit that method: the saver turned a no into a yes
    assert not any(p.gpu == result.consumer.gpu and p.gpu_count == result.consumer.gpu_count
                   and p.method == result.consumer.method for p in none.plans)


def test_plan_saver_plans_recheck_through_the_estimator() -> None:
    """Every saver plan's memory and host memory equal a plain estimate with that flag turned on."""
    from vramplan.planner import PlanRequest, PlanTask, plan

    spec = get_model("llama-3.1-8b").spec
    result = plan(spec, PlanRequest(task=PlanTask.FINETUNE, gpu_class="consumer", top=500), name="llama-3.1-8b")
    saver_plans = [p for p in result.plans if p.saver]
    assert {p.saver for p in saver_plans} >= {"--loss liger-fused", "--activation-offload"}
    for p in saver_plans:
        assert p.optimizer is not None
        w = Workload(method=Method(p.method), precision=Precision(p.precision), optimizer=Optimizer(p.optimizer),
                     batch_size=p.micro_batch, seq_len=p.seq_len, gradient_checkpointing=p.gradient_checkpointing,
                     gradient_accumulation=p.gradient_accumulation,
                     loss=Loss(p.saver.removeprefix("--loss ")) if p.saver.startswith("--loss") else Loss.AUTO,
                     activation_offload=p.saver == "--activation-offload")
        est = estimate(spec, w)
        assert est.total_bytes == p.total_bytes
        assert est.host_bytes == p.host_bytes
        if p.saver == "--activation-offload":
            assert p.host_bytes > 0


def test_plan_pinned_savers_and_refused_flags() -> None:
    from vramplan.service import PlanQuery, plan

    pinned = plan(PlanQuery.of("llama-3.1-8b", {"loss": "liger-fused", "gpu_class": "consumer"}))
    assert all(p.saver in (None, "--activation-offload", "--optimizer paged-adamw-8bit") for p in pinned.plans)
    assert plan(PlanQuery.of("llama-3.1-8b", {"savers": False, "gpu_class": "consumer"})).saver_notes == ()
    with pytest.raises(WorkloadError, match="packing"):
        plan(PlanQuery.of("llama-3.1-8b", {"packing": True}))


def test_cli_plan_prints_the_saver_note() -> None:
    r = _cli("plan", "llama-3.1-8b", "--task", "finetune", "--gpu-class", "consumer", "--seq-len", "4096")
    assert r.returncode == 0, r.stderr
    assert "memory savers:" in r.stdout and "fits with --" in r.stdout
