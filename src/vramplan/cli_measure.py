"""``vramplan measure`` (a real GPU run) and ``vramplan calibrate`` (estimate vs a measurements file)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import VramplanError

__all__ = ["register"]

_CSV_COLUMNS = ["name", "task", "model", "method", "precision", "optim", "batch", "seq", "res", "ckpt", "attn", "r",
                "targets", "new_tokens", "last_logits", "nf4", "train", "device", "torch", "cuda_context_gib",
                "params", "trainable", "weights_gib", "peak_alloc_gib", "peak_reserved_gib", "step_s", "prefill_s",
                "decode_s_per_token", "source", "trainable_layers", "gradient_accumulation"]


def register(sub: Any, add_workload_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    m = sub.add_parser("measure", help="run the workload for real on this machine's CUDA GPU (vramplan[torch])")
    m.add_argument("model", metavar="MODEL", help="catalog name or path to a config.json (random weights)")
    add_workload_flags(m)
    m.add_argument("--steps", type=int, default=3, help="training steps (the peak is usually in step 2)")
    m.add_argument("--csv", metavar="OUT", help="append a row in the calibration measured.csv format")
    m.add_argument("--json", action="store_true")
    m.set_defaults(handler=_measure)

    c = sub.add_parser("calibrate", help="error of estimate (and trace) against a measured.csv file")
    c.add_argument("file", metavar="FILE.csv")
    c.add_argument("--configs", metavar="DIR", help="folder of <model>.json configs (default: FILE's configs/)")
    c.add_argument("--trace", action="store_true", help="also trace every case (needs vramplan[torch]; slow)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_calibrate)


def _config_of(model: str) -> tuple[dict[str, Any], str]:
    from .catalog import resolve_model

    _, entry = resolve_model(model)
    if entry is not None:
        return entry.config_dict(), entry.name
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data, Path(path).parent.name


def _measure(ns: argparse.Namespace) -> int:
    from .api import make_workload
    from .cli import _workload_options
    from .estimator import estimate
    from .hfconfig import spec_from_config
    from .measure import measure_workload

    if ns.steps < 1:
        raise VramplanError("--steps must be at least 1")
    config, name = _config_of(ns.model)
    w = make_workload(**_workload_options(ns))
    est = estimate(spec_from_config(dict(config), name=name), w)
    m = measure_workload(config, w, steps=ns.steps)
    gib = 2**30
    result = {"model": name, "device": m.device, "torch": m.torch_version,
              "measured_peak_allocated_bytes": m.peak_allocated_bytes,
              "measured_peak_reserved_bytes": m.peak_reserved_bytes,
              "measured_device_bytes": m.peak_reserved_bytes + m.cuda_context_bytes,
              "estimate_peak_allocated_bytes": est.peak_allocated_bytes, "estimate_total_bytes": est.total_bytes,
              "error": est.peak_allocated_bytes / m.peak_allocated_bytes - 1}
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{name} on {m.device} (torch {m.torch_version})")
        print(f"  measured peak allocated {m.peak_allocated_bytes / gib:8.2f} GiB   reserved "
              f"{m.peak_reserved_bytes / gib:8.2f} GiB   device (+context) "
              f"{(m.peak_reserved_bytes + m.cuda_context_bytes) / gib:8.2f} GiB")
        print(f"  estimate peak allocated {est.peak_allocated_bytes / gib:8.2f} GiB   total    "
              f"{est.total_bytes / gib:8.2f} GiB   error {result['error']:+.1%}")
    if ns.csv:
        _append_row(ns.csv, name, w, m)
    return 0


def _append_row(path: str, name: str, w: Any, m: Any) -> None:
    gib = 2**30
    row = {
        "name": f"{name}-{w.task.value}-{w.method.value}-{w.precision.value}-b{w.batch_size}s{w.seq_len}",
        "task": w.task.value, "model": name, "method": "" if w.method.value == "full" else w.method.value,
        "precision": w.precision.value, "optim": "" if w.optimizer.value == "adamw" else w.optimizer.value,
        "batch": w.batch_size, "seq": w.seq_len, "ckpt": "True" if w.gradient_checkpointing else "",
        "attn": w.attention.value, "r": w.lora_rank if w.uses_adapters else "",
        "targets": "" if w.lora_targets == ("default",) else "+".join(w.lora_targets),
        "new_tokens": w.new_tokens if w.task.value == "infer" else "",
        "last_logits": "True" if w.task.value == "infer" and w.logits.value == "last" else "",
        "nf4": "True" if w.weights_quant.value == "nf4" and w.task.value == "infer" else "",
        "device": m.device, "torch": m.torch_version, "cuda_context_gib": round(m.cuda_context_bytes / gib, 3),
        "params": m.params, "trainable": m.trainable or "", "weights_gib": round(m.weights_bytes / gib, 3),
        "peak_alloc_gib": round(m.peak_allocated_bytes / gib, 3),
        "peak_reserved_gib": round(m.peak_reserved_bytes / gib, 3), "step_s": round(m.step_s, 4),
        "prefill_s": round(m.prefill_s, 4), "decode_s_per_token": round(m.decode_s_per_token, 5),
        "source": "vramplan measure", "trainable_layers": w.trainable_layers or "",
        "gradient_accumulation": w.gradient_accumulation if w.gradient_accumulation > 1 else "",
    }
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, _CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _calibrate(ns: argparse.Namespace) -> int:
    from .calibration import compare, read_rows
    from .estimator import estimate

    path = Path(ns.file)
    if not path.is_file():
        raise VramplanError(f"{ns.file}: no such file; give a measured.csv (see vramplan measure --csv)")
    configs = Path(ns.configs) if ns.configs else path.parent / "configs"
    try:
        rows = read_rows(path)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise VramplanError(f"{ns.file}: not a readable CSV ({exc})") from None
    needed = {"name", "task", "model", "batch", "seq", "peak_alloc_gib"}
    if rows and not needed <= rows[0].keys():
        raise VramplanError(f"{ns.file}: missing columns {', '.join(sorted(needed - rows[0].keys()))}")
    results, skipped = compare(rows, configs, estimate)
    traced: dict[str, float] = {}
    if ns.trace:
        from .hfconfig import load_config_file
        from .trace import trace_workload

        def via_trace(spec: Any, w: Any) -> Any:
            cfg = json.loads((configs / f"{spec.name}.json").read_text())
            return trace_workload(cfg, w, name=spec.name)

        tres, _ = compare(rows, configs, via_trace)
        traced = {r.name: r.error for r in tres}
        del load_config_file
    if not results:
        raise VramplanError(f"{ns.file}: no language-model rows could be estimated ({len(skipped)} skipped)")
    errors = [abs(r.error) for r in results]
    if ns.json:
        print(json.dumps({"cases": [{"name": r.name, "measured_bytes": r.measured_bytes,
                                     "estimate_bytes": r.predicted_bytes, "error": r.error,
                                     "trace_error": traced.get(r.name)} for r in results],
                          "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
                          "skipped": skipped}, indent=2))
        return 0
    gib = 2**30
    print(f"{'case':44s} {'measured':>9s} {'estimate':>9s} {'error':>7s}" + ("  trace" if traced else ""))
    for r in results:
        t = f"  {traced[r.name]:+6.1%}" if r.name in traced else ""
        print(f"{r.name:44s} {r.measured_bytes / gib:9.2f} {r.predicted_bytes / gib:9.2f} {r.error:+7.1%}{t}")
    print(f"{len(results)} cases: median |error| {statistics.median(errors):.2%}, worst {max(errors):.2%}")
    for s in skipped:
        print(f"skipped: {s}")
    return 0
