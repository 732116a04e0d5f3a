"""Image models: ``vramplan estimate`` against ``vramplan trace`` (and the H200 where a calibration row exists).

usage: python benchmarks/image_trace_report.py [MEASURED.csv]   (needs the [torch,image-trace] extras; ~5 min)

1. The vision and diffusion rows of the calibration set (``task`` vision / unet: ``measure.py``'s ``run_vision`` and
   ``run_unet`` on one H200, torch 2.11, diffusers 0.42.1): measured, estimated and traced peak allocated / reserved.
2. Cases no GPU row covers: LoRA on sd15-unet and sdxl-unet, the diffusion transformers, whole UNet pipelines at
   inference.

Prints one line per case (GiB, estimate vs trace in %); the README's image-model tables come from this script.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from vision_accuracy import MODELS, options_of_row, vision_rows  # the calibration rows as measure.py runs them
from vramplan.calibration import read_rows
from vramplan.trace import trace_vision
from vramplan.vision import estimate_vision

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "tests/data/calibration/measured.csv"

EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("sd15-unet", {"method": "lora", "precision": "amp-fp16", "batch_size": 4, "resolution": 512}),
    ("sd15-unet", {"method": "lora", "precision": "amp-bf16", "batch_size": 4, "resolution": 512}),
    ("sd15-unet", {"method": "lora", "precision": "bf16", "batch_size": 4, "resolution": 512}),
    ("sd15-unet", {"method": "lora", "precision": "fp32", "batch_size": 4, "resolution": 512}),
    ("sdxl-unet", {"method": "lora", "precision": "bf16", "batch_size": 1, "resolution": 512}),
    ("dit-xl-2-transformer", {"precision": "bf16", "batch_size": 8}),
    ("dit-xl-2-transformer", {"precision": "bf16", "batch_size": 8, "task": "infer"}),
    ("pixart-alpha-transformer", {"precision": "bf16", "batch_size": 1, "resolution": 512}),
    ("sd3-medium-transformer", {"precision": "bf16", "batch_size": 1, "resolution": 512}),
    ("flux-dev-transformer", {"precision": "bf16", "batch_size": 1, "resolution": 512, "task": "infer"}),
    ("sd15", {"task": "infer", "precision": "fp16", "batch_size": 1}),
    ("sd15", {"task": "infer", "precision": "fp16", "batch_size": 8}),
    ("sdxl", {"task": "infer", "precision": "fp16", "batch_size": 1}),
    ("sdxl", {"task": "infer", "precision": "fp16", "batch_size": 4}),
]


def _line(label: str, name: str, opts: dict[str, Any], measured: tuple[float, float] | None) -> None:
    t0 = time.perf_counter()
    tr = trace_vision(name, **opts)
    est = estimate_vision(name, **opts)
    ea, er = est.peak_allocated_bytes / GiB, (est.peak_reserved_bytes or 0) / GiB
    ta, tr_ = tr.peak_allocated_bytes / GiB, (tr.peak_reserved_bytes or 0) / GiB
    meas = f"measured {measured[0]:.3f} / {measured[1]:.3f}  " if measured else ""
    print(f"{label:45s} {meas}estimate {ea:.3f} / {er:.3f}  trace {ta:.3f} / {tr_:.3f}  "
          f"estimate vs trace {100 * (ea / ta - 1):+.2f}% / {100 * (er / tr_ - 1):+.2f}%  "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else CSV
    rows = vision_rows(read_rows(path))
    print("calibration rows (peak allocated / reserved, GiB)")
    for r in rows:
        _line(r["name"], MODELS[r["model"]], options_of_row(r),
              (float(r["peak_alloc_gib"]), float(r["peak_reserved_gib"])))
    print("\nno GPU row")
    for name, opts in EXTRA:
        label = name + " " + " ".join(f"{k}={v}" for k, v in opts.items())
        _line(label, name, opts, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
