"""The ``time`` object of ``vramplan estimate … --gpu NAME --json`` (and of the API).

Keys (always present; ``null`` where they do not apply):

* ``step_seconds``: one optimizer step (training), all micro-batches and communication included;
* ``train_tokens_per_second_per_gpu``;
* ``prefill_seconds``: one forward over the batch's prompts (inference);
* ``decode_seconds_per_token``: one decode step of the whole batch;
* ``decode_tokens_per_second``: tokens the whole batch generates per second;
* ``mfu``: model FLOPs utilisation (PaLM's definition; training);
* ``method``: ``"mechanism"`` (the time model) or ``"measured-mfu"`` (``--efficiency``),

plus ``gpu``, ``gpus``, ``engine``, ``efficiency`` (the fractions used and their sources), ``breakdown``
and ``assumptions``.
"""

from __future__ import annotations

from typing import Any

from ..hardware import GPU
from ..spec import ModelSpec
from ..workload import Workload
from .efficiency import gpu_efficiency
from .timing import inference_time, training_time

__all__ = ["time_object", "untimed"]


def untimed(gpu: str, gpus: int, reason: str | None) -> dict[str, Any]:
    """The ``time`` object with every figure empty (``reason``: why there is none)."""
    return {"step_seconds": None, "train_tokens_per_second_per_gpu": None, "prefill_seconds": None,
            "decode_seconds_per_token": None, "decode_tokens_per_second": None, "mfu": None, "method": "mechanism",
            "gpu": gpu, "gpus": gpus, "engine": None, "efficiency": None, "breakdown": None, "assumptions": [],
            "reason": reason}


def time_object(spec: ModelSpec, w: Workload, gpu: GPU, *, gpus: int = 1, tp: int = 1, pp: int = 1,
                sharded: bool = False, comm_bytes_per_step: float | None = None, engine: str | None = None,
                measured_mfu: float | None = None, attention_kernel: str = "flash2") -> dict[str, Any]:
    """The ``time`` JSON object for one workload on ``gpus`` x ``gpu`` (tensor x pipeline ``tp`` x ``pp``;
    ``sharded``: ZeRO / FSDP share the optimizer states over the data-parallel GPUs; ``attention_kernel``: the
    fused attention kernel a training framework runs, ``flash2`` or ``flash1``)."""
    split = max(1, tp * pp)
    dp = max(1, gpus // split)
    eff = gpu_efficiency(gpu, measured_mfu=measured_mfu)
    out = untimed(gpu.name, gpus, None)
    out["method"] = "measured-mfu" if measured_mfu is not None else "mechanism"
    out["efficiency"] = eff.to_dict()
    if w.is_train:
        tokens = dp * w.batch_size * w.seq_len * w.gradient_accumulation
        tt = training_time(spec, w, gpu, tokens=tokens, gpus=gpus, comm_bytes_per_step=comm_bytes_per_step,
                           split=split, shard=dp if sharded else 1, measured_mfu=measured_mfu,
                           attention_kernel=attention_kernel)
        out["assumptions"] = list(tt.assumptions)
        out["reason"] = tt.reason if tt.time_s is None else None
        if tt.time_s is not None and tt.tokens_per_s is not None:
            out["step_seconds"] = tt.time_s / tt.steps
            out["train_tokens_per_second_per_gpu"] = tt.tokens_per_s / gpus
            out["mfu"] = tt.mfu
            out["breakdown"] = tt.step.to_dict() if tt.step else None
        return out
    it = inference_time(spec, w, gpu, split=split, engine=engine or "transformers")
    out["engine"] = it.engine
    out["assumptions"] = list(it.assumptions)
    out["reason"] = it.reason
    if measured_mfu is not None:
        out["assumptions"].append("--efficiency applies to training; inference uses the mechanism model")
        out["method"] = "mechanism"
    out["prefill_seconds"] = it.prefill_s
    out["decode_seconds_per_token"] = it.decode_s_per_token
    out["decode_tokens_per_second"] = it.decode_tokens_per_s
    out["breakdown"] = {"decode_overhead_s": it.decode_overhead_s, "decode_allreduce_s": it.decode_allreduce_s,
                        "decode_bound": it.decode_bound, "request_s": it.request_s}
    return out
