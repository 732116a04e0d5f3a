"""``vramplan measure`` (a real GPU run) and ``vramplan calibrate`` (estimate vs a measurements file)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from .._argtypes import positive_int
from ..errors import VramplanError
from ._flags import add_parallel_flags, add_workload_flags, options

__all__ = ["register"]

_CSV_COLUMNS = ["name", "task", "model", "method", "precision", "optim", "batch", "seq", "res", "ckpt", "attn", "r",
                "targets", "new_tokens", "last_logits", "nf4", "train", "device", "torch", "cuda_context_gib",
                "params", "trainable", "weights_gib", "peak_alloc_gib", "peak_reserved_gib", "step_s", "prefill_s",
                "decode_s_per_token", "source", "trainable_layers", "gradient_accumulation"]
_RANK_COLUMNS = ["rank", "world_size", "layout"]  # multi-GPU rows (vramplan measure --gpus N)


def _add_measure_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("model", metavar="MODEL", help="catalog name or path to a config.json (random weights)")
    add_workload_flags(m)
    add_parallel_flags(m)
    m.add_argument("--steps", type=positive_int, default=3,
                   help="training steps (the peak is usually in step 2; the first warms up and is not timed)")
    m.add_argument("--csv", metavar="OUT", help="append a row in the calibration measured.csv format")
    m.add_argument("--json", action="store_true")


def register(sub: Any) -> None:
    m = sub.add_parser("measure", help="run the workload for real on this machine's CUDA GPU (vramplan[torch]); "
                                       "with --gpus N, DDP or --fsdp under torchrun, one measurement per rank")
    _add_measure_arguments(m)
    m.set_defaults(handler=_measure)

    c = sub.add_parser("calibrate", help="error of estimate (and trace) against a measured.csv file")
    c.add_argument("file", metavar="FILE.csv")
    c.add_argument("--configs", metavar="DIR", help="folder of <model>.json configs (default: FILE's configs/)")
    c.add_argument("--trace", action="store_true", help="also trace every case (needs vramplan[torch]; slow)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_calibrate)


def _measure(ns: argparse.Namespace) -> int:
    from ..api import layout_of, make_workload
    from ..service import WORKLOAD_KEYS, MeasureQuery, config_of, measure

    if ns.steps < 1:
        raise VramplanError("--steps must be at least 1")
    opts = options(ns)
    found = layout_of(opts)
    layout = found[0] if found is not None else None
    gpus = layout.gpus if layout is not None else 1
    distributed = "WORLD_SIZE" in os.environ and (gpus > 1 or os.environ["WORLD_SIZE"] != "1")
    if distributed or gpus > 1:
        config, name = config_of(ns.model)
        w = make_workload(**{k: v for k, v in opts.items() if k in WORKLOAD_KEYS})
        if not distributed:
            return _launch(ns, config, name, w, layout)
        code = _measure_rank(ns, config, name, w, layout)
        # A torchrun worker leaves without running C++ static destructors: gloo/NCCL threads torn down at
        # interpreter exit abort now and then ("terminate called without an active exception", SIGABRT)
        # after the work is done and the results written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    result = measure(MeasureQuery.of(ns.model, opts))
    m, est, name = result.measurement, result.estimate, result.model
    gib = 2**30
    data = result.to_dict()
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{name} on {m.device} (torch {m.torch_version})")
        print(f"  measured peak allocated {m.peak_allocated_bytes / gib:8.2f} GiB   reserved "
              f"{m.peak_reserved_bytes / gib:8.2f} GiB   device (+context) "
              f"{(m.peak_reserved_bytes + m.cuda_context_bytes) / gib:8.2f} GiB")
        print(f"  estimate peak allocated {est.peak_allocated_bytes / gib:8.2f} GiB   total    "
              f"{est.total_bytes / gib:8.2f} GiB   error "
              + ("n/a" if data["error"] is None else f"{data['error']:+.1%}"))
    if ns.csv:
        _append_row(ns.csv, name, result.workload, m)
    return 0


def _launch(ns: argparse.Namespace, config: dict[str, Any], name: str, w: Any, layout: Any) -> int:
    """Check what can be checked here (one line on error), then rerun this command under torchrun."""
    import subprocess  # here: the CLI imports this module for its flags only

    from .. import measure
    from ..hfconfig import spec_from_config
    from ..measure_dist import check_supported
    from ..parallel import estimate_parallel

    check_supported(layout, w)
    estimate_parallel(spec_from_config(dict(config), name=name), w, layout)  # an impossible layout fails here
    if ns.csv:
        _check_csv(ns.csv, _CSV_COLUMNS + _RANK_COLUMNS)
    torch = measure._torch()  # the [torch] extra and a CUDA GPU (not in smoke mode)
    have = 0 if measure._SMOKE else torch.cuda.device_count()
    if not measure._SMOKE and have < layout.gpus:
        raise VramplanError(f"--gpus {layout.gpus} but this machine has {have} CUDA GPU{'s' * (have != 1)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(layout.gpus),
           "-m", "vramplan", "measure", *_argv_of(ns)]
    return subprocess.run(cmd, check=False).returncode


def _argv_of(ns: argparse.Namespace) -> list[str]:
    """The ``vramplan measure`` arguments that give ``ns`` again (what differs from the defaults)."""
    parser = argparse.ArgumentParser()
    _add_measure_arguments(parser)
    out = [ns.model]
    for action in parser._actions:
        if not action.option_strings or not hasattr(ns, action.dest):
            continue
        value = getattr(ns, action.dest)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        out += [flag] if action.nargs == 0 else [flag, str(value)]
    return out


def _measure_rank(ns: argparse.Namespace, config: dict[str, Any], name: str, w: Any, layout: Any) -> int:
    """Inside torchrun: this rank's run; rank 0 prints and writes one line / row per rank."""
    from ..hfconfig import spec_from_config
    from ..measure import Measurement
    from ..measure_dist import check_supported, run_rank
    from ..parallel import Layout, estimate_parallel

    layout = layout if layout is not None else Layout()
    check_supported(layout, w)
    est = estimate_parallel(spec_from_config(dict(config), name=name), w, layout)
    res = run_rank(config, w, layout, ns.steps)
    if res["rank"] != 0:
        return 0
    gib = 2**30
    fields = Measurement.__dataclass_fields__
    ranks = [(r, Measurement(**{k: r[k] for k in fields})) for r in res["ranks"]]

    def error(m: Any) -> float | None:
        return est.peak_allocated_bytes / m.peak_allocated_bytes - 1 if m.peak_allocated_bytes else None

    if ns.json:
        print(json.dumps({"model": name, "layout": res["layout"], "world_size": res["world_size"],
                          "estimate_peak_allocated_bytes": est.peak_allocated_bytes,
                          "estimate_total_bytes": est.total_bytes,
                          "ranks": [{"rank": r["rank"], "device": m.device, "torch": m.torch_version,
                                     "measured_peak_allocated_bytes": m.peak_allocated_bytes,
                                     "measured_peak_reserved_bytes": m.peak_reserved_bytes,
                                     "measured_device_bytes": m.peak_reserved_bytes + m.cuda_context_bytes,
                                     "step_s": m.step_s, "error": error(m)} for r, m in ranks]}, indent=2))
    else:
        print(f"{name}, {res['layout']} on {res['world_size']} x {ranks[0][1].device} "
              f"(torch {ranks[0][1].torch_version}); estimate per GPU {est.peak_allocated_bytes / gib:.2f} GiB "
              f"allocated, {est.total_bytes / gib:.2f} GiB total")
        for r, m in ranks:
            e = error(m)
            print(f"  rank {r['rank']}: measured peak allocated {m.peak_allocated_bytes / gib:8.2f} GiB   reserved "
                  f"{m.peak_reserved_bytes / gib:8.2f} GiB   step "
                  + (f"{m.step_s:.3f} s" if m.step_s else "untimed (--steps 1)") + "   estimate "
                  f"{est.peak_allocated_bytes / gib:8.2f} GiB   error " + ("n/a" if e is None else f"{e:+.1%}"))
    if ns.csv:
        for r, m in ranks:
            _append_row(ns.csv, name, w, m, {"rank": r["rank"], "world_size": r["world_size"],
                                              "layout": r["layout"]})
    return 0


def _check_csv(path: str, columns: list[str]) -> list[str]:
    """The header rows will be written with: ``columns`` for a new file, else the file's own header, which
    must hold every column of ``columns`` that a multi-GPU row needs."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return columns
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in _RANK_COLUMNS if c in columns and c not in header]
    if missing:
        raise VramplanError(f"{path} has no {'/'.join(missing)} column; write multi-GPU rows to a new file")
    return header


def _append_row(path: str, name: str, w: Any, m: Any, extra: dict[str, Any] | None = None) -> None:
    gib = 2**30
    suffix = f"-{extra['layout']}x{extra['world_size']}" if extra else ""
    row = {
        "name": f"{name}-{w.task.value}-{w.method.value}-{w.precision.value}-b{w.batch_size}s{w.seq_len}{suffix}",
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
        **(extra or {}),
    }
    columns = _check_csv(path, _CSV_COLUMNS + (_RANK_COLUMNS if extra else []))
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _calibrate(ns: argparse.Namespace) -> int:
    import statistics

    from ..calibration import compare, read_rows
    from ..estimator import estimate

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
        from ..hfconfig import load_config_file
        from ..trace import trace_workload

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
