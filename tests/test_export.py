"""``vramplan export``: the engine files are read back by the engines' own loaders where they install here
(DeepSpeed's ``DeepSpeedConfig``, accelerate's ``ClusterConfig`` and ``accelerate launch`` argument handling,
torchrun's argument parser), and checked against a schema of the documented fields otherwise (always for
vLLM, whose package needs CUDA)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from vramplan import WorkloadError, get_model
from vramplan.api import make_workload
from vramplan.export import (
    ExportEngine,
    accelerate_fsdp_config,
    deepspeed_config,
    export,
    torchrun_command,
    vllm_serve_command,
)
from vramplan.parallel import FSDPMode, Layout, Offload
from vramplan.serving.vllm import ServingConfig

LLAMA8 = get_model("llama-3.1-8b").spec
H = LLAMA8.hidden_size
TRAIN = make_workload(precision="amp-bf16", batch_size=2, gradient_accumulation=4, gradient_checkpointing=True)
ZERO3 = Layout(gpus=16, nodes=2, zero=3, offload=Offload.OPTIMIZER_PARAMS)


# ---- DeepSpeed -------------------------------------------------------------------------------------------
def test_deepspeed_config_schema_and_values() -> None:
    cfg = deepspeed_config(LLAMA8, TRAIN, ZERO3)
    json.dumps(cfg)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * 16
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == H * H and z["stage3_prefetch_bucket_size"] == int(0.9 * H * H)
    assert z["stage3_param_persistence_threshold"] == 10 * H and z["overlap_comm"] is True
    assert "activation_checkpointing" in cfg
    z1 = deepspeed_config(LLAMA8, make_workload(precision="fp16"), Layout(gpus=4, zero=1))
    assert z1["fp16"]["enabled"] and "offload_optimizer" not in z1["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in z1["zero_optimization"]
    assert "activation_checkpointing" not in z1


def test_deepspeed_parses_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    dsc = pytest.importorskip("deepspeed.runtime.config")
    # DeepSpeedConfig checks train_batch_size against the data-parallel world size of a running job
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dsc.dist, "get_world_size", lambda *a, **k: ZERO3.dp)
    c = dsc.DeepSpeedConfig(deepspeed_config(LLAMA8, TRAIN, ZERO3))
    assert c.zero_optimization_stage == 3
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (128, 2, 4)
    assert c.bfloat16_config.enabled
    z = c.zero_config
    assert z.offload_optimizer.device == "cpu" and z.offload_param.device == "cpu"
    assert z.reduce_bucket_size == H * H and z.prefetch_bucket_size == int(0.9 * H * H)
    assert z.max_live_parameters == 10**9 and z.overlap_comm


# ---- accelerate / FSDP ------------------------------------------------------------------------------------
FSDP_HYBRID = Layout(gpus=16, nodes=2, fsdp=FSDPMode.HYBRID)


def test_accelerate_config_schema_and_values() -> None:
    cfg = accelerate_fsdp_config(LLAMA8, TRAIN, FSDP_HYBRID)
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "bf16"
    assert (cfg["num_processes"], cfg["num_machines"]) == (16, 2)
    f = cfg["fsdp_config"]
    assert f["fsdp_version"] == 2 and f["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert f["fsdp_reshard_after_forward"] is True and f["fsdp_activation_checkpointing"] is True
    assert cfg["parallelism_config"]["parallelism_config_dp_replicate_size"] == 2
    assert cfg["parallelism_config"]["parallelism_config_dp_shard_size"] == 8
    grad_op = accelerate_fsdp_config(LLAMA8, TRAIN, Layout(gpus=4, fsdp=FSDPMode.GRAD_OP))
    assert grad_op["fsdp_config"]["fsdp_reshard_after_forward"] is False and "parallelism_config" not in grad_op
    off = accelerate_fsdp_config(LLAMA8, TRAIN, Layout(gpus=4, fsdp=FSDPMode.FULL, offload=Offload.OPTIMIZER_PARAMS))
    assert off["fsdp_config"]["fsdp_offload_params"] is True


def test_accelerate_reads_the_yaml(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    out = export("fsdp", "meta-llama/Llama-3.1-8B", LLAMA8, TRAIN, FSDP_HYBRID)
    path = tmp_path / out.filename
    path.write_text(out.text, encoding="utf-8")
    assert yaml.safe_load(out.text) == accelerate_fsdp_config(LLAMA8, TRAIN, FSDP_HYBRID)  # our writer round-trips
    c = ClusterConfig.from_yaml_file(str(path))
    assert c.distributed_type.value == "FSDP" and c.num_processes == 16 and c.num_machines == 2
    assert c.fsdp_config["fsdp_version"] == 2 and c.mixed_precision == "bf16"
    argv = shlex.split(out.command.replace(out.filename, str(path)))
    assert argv[:2] == ["accelerate", "launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    assert args.use_fsdp and args.fsdp_version == 2 and args.num_processes == 16 and args.num_machines == 2
    assert args.fsdp_reshard_after_forward and args.mixed_precision == "bf16"
    assert args.fsdp_transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
    assert args.parallelism_config_dp_replicate_size == 2 and args.parallelism_config_dp_shard_size == 8


def test_torchrun_parses_the_command() -> None:
    layout = Layout(gpus=16, nodes=2)
    command = torchrun_command(layout, "train.py", "--lr 1e-4")
    # the shell fills in each node's rank and the rendezvous host
    argv = shlex.split(command.replace("${NODE_RANK}", "1").replace("${MASTER_ADDR}", "10.0.0.1"))
    assert argv[0] == "torchrun"
    run = pytest.importorskip("torch.distributed.run")
    args = run.get_args_parser().parse_args(argv[1:])
    assert args.nnodes == "2" and args.nproc_per_node == "8" and args.node_rank == 1
    assert args.rdzv_endpoint == "10.0.0.1:29500" and args.training_script == "train.py"
    assert args.training_script_args == ["--lr", "1e-4"]


# ---- vLLM --------------------------------------------------------------------------------------------------
def _vllm_parser() -> argparse.ArgumentParser:
    """The flags vramplan writes, with the types and choices of vLLM's engine arguments
    (docs.vllm.ai, "Engine Arguments"); unknown flags are an error."""
    p = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    p.add_argument("model")
    p.add_argument("--tensor-parallel-size", type=int, required=True)
    p.add_argument("--pipeline-parallel-size", type=int, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, required=True)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e5m2", "fp8_e4m3"])
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    p.add_argument("--quantization", choices=["aqlm", "awq", "fp8", "gptq", "bitsandbytes", "gptq_marlin", "marlin"])
    return p


def _parse_vllm(cmd: list[str]) -> argparse.Namespace:
    assert cmd[:2] == ["vllm", "serve"]
    try:
        from vllm.engine.arg_utils import EngineArgs  # pragma: no cover - needs CUDA wheels
        from vllm.utils import FlexibleArgumentParser  # pragma: no cover
    except ImportError:
        return _vllm_parser().parse_args(cmd[2:])
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())  # pragma: no cover
    parser.add_argument("model_tag")  # pragma: no cover
    return parser.parse_args([*cmd[3:], "--model", cmd[2]])  # pragma: no cover


def test_vllm_serve_command_values() -> None:
    w = make_workload(task="infer")
    layout = Layout(gpus=8, tp=4, pp=2)
    gpu = 80 * 2**30
    cfg = ServingConfig(max_model_len=8192 + 1024, max_num_seqs=16)
    cmd = vllm_serve_command("meta-llama/Llama-3.1-8B", LLAMA8, w, layout, gpu_memory_bytes=gpu, serving=cfg)
    ns = _parse_vllm(cmd)
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == (4, 2)
    assert ns.max_model_len == 8192 + 1024 and ns.max_num_seqs == 16
    assert ns.dtype == "bfloat16" and ns.kv_cache_dtype == "auto" and ns.quantization is None
    assert ns.gpu_memory_utilization == 0.90
    q = _parse_vllm(vllm_serve_command("m", LLAMA8, w.with_(weights_quant="fp8"), Layout(gpus=2, tp=2)))
    assert q.quantization == "fp8" and q.gpu_memory_utilization == 0.90


def test_vllm_command_numbers_come_from_the_serving_model() -> None:
    # the realistic load: 70B on 4 H100s, 64 sequences of 8192 tokens — vLLM chunks prefill, so only
    # one request of max_model_len has to fit the KV cache
    spec = get_model("llama-3.1-70b").spec
    h100 = int(79.19 * 2**30)
    cfg = ServingConfig(max_model_len=8192, max_num_seqs=64)
    ns = _parse_vllm(vllm_serve_command("m", spec, make_workload(task="infer"), Layout(gpus=4, tp=4),
                                        gpu_memory_bytes=h100, serving=cfg, gpu_name="h100-sxm"))
    assert ns.max_model_len == 8192 and ns.max_num_seqs == 64
    # without --max-model-len: the largest the KV cache holds, capped by the model's context; vLLM's max_num_seqs
    ns = _parse_vllm(vllm_serve_command("m", spec, make_workload(task="infer"), Layout(gpus=4, tp=4),
                                        gpu_memory_bytes=h100, gpu_name="h100-sxm"))
    assert ns.max_model_len == spec.max_position_embeddings and ns.max_num_seqs == 1024
    # two GPUs: vLLM's default 1024 sequences' sampler warm-up leaves no KV cache; 64 leave a shorter context
    with pytest.raises(WorkloadError, match="no KV cache"):
        vllm_serve_command("m", spec, make_workload(task="infer"), Layout(gpus=2, tp=2), gpu_memory_bytes=h100,
                           gpu_name="h100-sxm")
    ns = _parse_vllm(vllm_serve_command("m", spec, make_workload(task="infer"), Layout(gpus=2, tp=2),
                                        gpu_memory_bytes=h100, gpu_name="h100-sxm",
                                        serving=ServingConfig(max_num_seqs=64)))
    assert 0 < ns.max_model_len < spec.max_position_embeddings and ns.max_num_seqs == 64


def test_vllm_refuses_a_gpu_that_is_too_small() -> None:
    w = make_workload(task="infer")
    with pytest.raises(WorkloadError, match="does not fit"):
        vllm_serve_command("m", get_model("llama-3.1-70b").spec, w, Layout(), gpu_memory_bytes=24 * 2**30)
    with pytest.raises(WorkloadError, match="--max-model-len"):
        vllm_serve_command("m", LLAMA8, w, Layout(), gpu_memory_bytes=24 * 2**30,
                           serving=ServingConfig(max_model_len=1 << 20))


# ---- errors and the command -----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine, workload, layout, message", [
    ("deepspeed", TRAIN, Layout(gpus=4), "add --zero"),
    ("deepspeed", make_workload(task="infer"), Layout(gpus=4, zero=3), "--task train"),
    ("fsdp", TRAIN, Layout(gpus=4, zero=2), "drop --zero"),
    ("vllm", TRAIN, Layout(gpus=2, tp=2), "--task infer"),
    ("vllm", make_workload(task="infer"), Layout(gpus=4, tp=2), "replicas"),
    ("vllm", make_workload(task="infer"), Layout(gpus=3, tp=3), "not divisible"),
])
def test_export_errors(engine: str, workload: Any, layout: Layout, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        export(engine, "m", LLAMA8, workload, layout)


def test_every_engine_names_its_file_and_command() -> None:
    infer = make_workload(task="infer")
    for engine, w, layout in ((ExportEngine.DEEPSPEED, TRAIN, ZERO3), (ExportEngine.FSDP, TRAIN, FSDP_HYBRID),
                              (ExportEngine.TORCHRUN, TRAIN, Layout(gpus=8)),
                              (ExportEngine.VLLM, infer, Layout(gpus=2, tp=2))):
        out = export(engine, "meta-llama/Llama-3.1-8B", LLAMA8, w, layout)
        assert out.text.endswith("\n") and out.filename and "meta-llama/Llama-3.1-8B" in out.command
