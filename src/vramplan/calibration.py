"""Compare estimates with measured peaks: rows in the format of the calibration ``measured.csv``.

Used by the accuracy report (``benchmarks/accuracy_report.py``), its test, and ``vramplan calibrate``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import VramplanError
from .hfconfig import load_config_file
from .result import Estimate
from .spec import ModelSpec
from .units import GiB
from .workload import Attention, LogitsMode, Method, Optimizer, Precision, Task, Trainer, WeightsQuant, Workload

__all__ = ["CaseResult", "compare", "read_rows", "workload_of_row"]

_OPTIM = {"adamw8bit": Optimizer.ADAMW_8BIT, "adamw-8bit": Optimizer.ADAMW_8BIT}


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def workload_of_row(row: Mapping[str, str]) -> Workload | None:
    """The workload a calibration row ran, as measure.py defines it; None for non-LLM rows."""
    task = row.get("task", "")
    if task not in ("train", "infer"):
        return None
    # measure.py's loop keeps the model output through the step (trainer plain) and quantizes NF4 with
    # bitsandbytes' double quantization
    kw: dict[str, object] = {"task": Task(task), "batch_size": int(row["batch"]), "seq_len": int(row["seq"]),
                             "trainer": Trainer.PLAIN, "double_quant": True}
    if row.get("precision"):
        kw["precision"] = Precision(row["precision"])
    if row.get("optim"):
        kw["optimizer"] = _OPTIM.get(row["optim"]) or Optimizer(row["optim"])
    if row.get("attn"):
        kw["attention"] = Attention(row["attn"])
    # the transformers release the row ran (shared/calibration/README.md: 5.17.0 where the row does not say)
    kw["transformers"] = row.get("transformers") or "5.17.0"
    if row.get("ckpt") == "True":
        kw["gradient_checkpointing"] = True
    if row.get("gradient_accumulation"):
        kw["gradient_accumulation"] = int(row["gradient_accumulation"])
    if row.get("trainable_layers"):
        kw["trainable_layers"] = int(row["trainable_layers"])
    if row.get("method") == "freeze":
        kw["method"] = Method.FREEZE
    elif row.get("method"):
        kw["method"] = Method(row["method"])
        kw["lora_rank"] = int(row.get("r") or 16)
        targets = row.get("targets") or "q_proj+v_proj"
        kw["lora_targets"] = ("all-linear",) if targets == "all-linear" else tuple(targets.split("+"))
    if task == "infer":
        kw["new_tokens"] = int(row.get("new_tokens") or 32)
        kw["logits"] = LogitsMode.LAST if row.get("last_logits") == "True" else LogitsMode.ALL
        if row.get("nf4") == "True":
            kw["weights_quant"] = WeightsQuant.NF4
            kw["double_quant"] = True  # the harness quantizes with compress_statistics=True
    return Workload(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    measured_bytes: int
    predicted_bytes: int

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def compare(rows: Iterable[Mapping[str, str]], configs_dir: str | Path,
            predict: Callable[[ModelSpec, Workload], Estimate]) -> tuple[list[CaseResult], list[str]]:
    """Predict every supported row; returns (results, names of rows skipped with the reason)."""
    results: list[CaseResult] = []
    skipped: list[str] = []
    for row in rows:
        if int(row.get("world_size") or 1) > 1:
            skipped.append(f"{row['name']}: a per-rank row of a {row['world_size']}-GPU run "
                           f"({row.get('layout') or 'multi-GPU'}): compare with estimate --gpus")
            continue
        w = workload_of_row(row)
        if w is None:
            skipped.append(f"{row['name']}: task {row['task']!r} (vision/diffusion) is not a language model")
            continue
        cfg = Path(configs_dir) / f"{row['model']}.json"
        try:
            spec = load_config_file(cfg)
            est = predict(spec, w)
        except VramplanError as exc:
            skipped.append(f"{row['name']}: {exc}")
            continue
        results.append(CaseResult(row["name"], round(float(row["peak_alloc_gib"]) * GiB),
                                  est.peak_allocated_bytes))
    return results, skipped
