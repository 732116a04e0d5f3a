"""Measure a multi-GPU layout for real: one process per GPU under ``torchrun``, one measurement per rank.

Every rank builds and trains the model exactly as :func:`vramplan.measure.measure_workload` does on one
GPU; the only difference is the ``wrap`` step between building and training: DDP
(``DistributedDataParallel`` with its default buckets) for a plain data-parallel layout, FSDP2
(``fully_shard`` on each decoder layer, then the root) for ``--fsdp``. ZeRO (DeepSpeed), tensor and
pipeline parallel are not run. With ``VRAMPLAN_MEASURE_SMOKE=1`` the ranks run on the CPU over gloo and
measure nothing (a check of the harness).

:func:`check_supported` needs no torch, so the launcher can refuse a layout in one line before it starts
any process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from .errors import VramplanError
from .parallel import FSDPMode, Layout, Offload
from .workload import Precision, Workload

__all__ = ["check_supported", "layout_label", "run_rank"]


def layout_label(layout: Layout) -> str:
    """``ddp`` or ``fsdp-full`` / ``fsdp-grad-op`` / ``fsdp-hybrid`` (the CSV ``layout`` column)."""
    return "ddp" if layout.fsdp is None else f"fsdp-{layout.fsdp.value}"


def check_supported(layout: Layout, w: Workload) -> None:
    """Raise :class:`VramplanError` (one line) unless ``measure`` can run ``layout`` for ``w``."""
    if layout.zero or layout.tp > 1 or layout.pp > 1 or layout.ep > 1:
        what = (f"ZeRO-{layout.zero}" if layout.zero else
                ", ".join(f"{k} {v}" for k, v in (("tp", layout.tp), ("pp", layout.pp), ("ep", layout.ep)) if v > 1))
        raise VramplanError(f"measure supports DDP and FSDP layouts only (not {what}); "
                            "use vramplan estimate with the same flags for the others")
    if layout.nodes > 1:
        raise VramplanError("measure runs on one machine; --nodes > 1 is not supported")
    if layout.offload is not Offload.NONE:
        raise VramplanError("measure does not run offloaded layouts; drop --offload")
    if not w.is_train:
        raise VramplanError("measure runs multi-GPU layouts for training only (--task train)")


def _decoder_layers(model: Any) -> list[Any]:
    """The outermost repeated blocks to shard one by one: the model's ``_no_split_modules`` classes (the
    decoder layers), else any module whose class name ends in ``DecoderLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    chosen: list[tuple[str, Any]] = []
    for qual, mod in model.named_modules():
        cls = type(mod).__name__
        if (cls in names or cls.endswith("DecoderLayer")) and not any(qual.startswith(c + ".") for c, _ in chosen):
            chosen.append((qual, mod))
    return [m for _, m in chosen]


def _wrapper(torch: Any, w: Workload, layout: Layout, local_rank: int, smoke: bool) -> Any:
    def wrap(model: Any) -> Any:
        if layout.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model) if smoke else DistributedDataParallel(model, device_ids=[local_rank])
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dev = "cpu" if smoke else "cuda"
        if layout.fsdp is FSDPMode.HYBRID:
            mesh = init_device_mesh(dev, (layout.nodes, layout.gpus_per_node), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(dev, (layout.gpus,))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": layout.fsdp is not FSDPMode.GRAD_OP}
        if w.precision is Precision.AMP_BF16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = _decoder_layers(model)
        if not layers:
            raise VramplanError(f"measure --fsdp found no decoder layers to shard in {type(model).__name__}")
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    return wrap


def run_rank(config: Mapping[str, Any], workload: Workload, layout: Layout, steps: int = 3) -> dict[str, Any]:
    """Run in every process of a ``torchrun`` job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): train
    ``workload`` under ``layout`` and return this rank's measurement (the fields of
    :class:`~vramplan.measure.Measurement` plus ``rank``, ``world_size`` and ``layout``). Rank 0's dict
    also holds ``ranks``: every rank's dict, in rank order."""
    from . import measure
    from .measure import _cuda, _torch, measure_workload

    check_supported(layout, workload)
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise VramplanError("measure --gpus > 1 runs under torchrun (RANK, WORLD_SIZE, LOCAL_RANK unset)") from None
    if world != layout.gpus:
        raise VramplanError(f"--gpus {layout.gpus} but torchrun started {world} processes; make them equal")
    torch = _torch()
    smoke = measure._SMOKE
    if not smoke:
        if _cuda(torch).device_count() <= local:
            raise VramplanError(f"rank {rank} has local rank {local} but only {_cuda(torch).device_count()} "
                                "CUDA GPUs are visible")
        torch.cuda.set_device(local)
    if layout.micro_batches > workload.gradient_accumulation:  # as estimate_parallel counts them
        workload = workload.with_(gradient_accumulation=layout.micro_batches)
    import torch.distributed as dist

    if smoke:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    try:
        m = measure_workload(config, workload, steps, wrap=_wrapper(torch, workload, layout, local, smoke))
        mine: dict[str, Any] = {**asdict(m), "rank": rank, "world_size": world, "layout": layout_label(layout)}
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is not None:
            mine["ranks"] = gathered
        # Every rank waits here before tearing the group down: a rank that leaves while a peer's gloo
        # pair is still sending aborts in the C++ destructor ("terminate called without an active exception").
        dist.barrier()
        return mine
    finally:
        dist.destroy_process_group()
