"""Accuracy of `vramplan estimate` against measured H200 runs: allocated and reserved memory, per row.

usage: python benchmarks/accuracy_report.py [DATASET_DIR ...]
Defaults to tests/data/calibration and tests/data/h200-grid. Each data set's MANIFEST.json says who measured
it, with which stack, and whether it was used while developing the estimator (in-sample / development) or
not (held out); the summary lines carry that label. Errors are (predicted - measured) / measured of
``peak_allocated_bytes`` against ``torch.cuda.max_memory_allocated`` and of ``peak_reserved_bytes`` against
``torch.cuda.max_memory_reserved``; for the grid, ``pre-fix`` is the estimate recorded at measurement time.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from vramplan.calibration import read_rows, workload_of_row
from vramplan.errors import VramplanError
from vramplan.estimator import estimate
from vramplan.hfconfig import load_config_file
from vramplan.units import GiB

ROOT = Path(__file__).resolve().parents[1]
DATASETS = (ROOT / "tests/data/calibration", ROOT / "tests/data/h200-grid")


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    alloc_measured: float  # GiB
    alloc_predicted: float
    reserved_measured: float | None
    reserved_predicted: float
    prefix_predicted: float | None  # the estimate recorded when the row was measured

    @property
    def alloc_error(self) -> float:
        return self.alloc_predicted / self.alloc_measured - 1

    @property
    def reserved_error(self) -> float | None:
        return None if not self.reserved_measured else self.reserved_predicted / self.reserved_measured - 1

    @property
    def prefix_error(self) -> float | None:
        return None if self.prefix_predicted is None else self.prefix_predicted / self.alloc_measured - 1


@dataclass(frozen=True, slots=True)
class Summary:
    dataset: str
    rows: tuple[Row, ...]
    skipped: tuple[str, ...]
    manifest: dict[str, object]

    def _stat(self, errs: list[float]) -> tuple[float, float]:
        return statistics.median(abs(e) for e in errs), max(errs, key=abs)

    @property
    def allocated(self) -> tuple[float, float]:
        """(median |error|, worst signed error) of the allocated peak."""
        return self._stat([r.alloc_error for r in self.rows])

    @property
    def reserved(self) -> tuple[float, float]:
        return self._stat([e for r in self.rows if (e := r.reserved_error) is not None])

    @property
    def prefix(self) -> tuple[float, float] | None:
        errs = [e for r in self.rows if (e := r.prefix_error) is not None]
        return self._stat(errs) if errs else None

    def label(self, what: str) -> str:
        dev = self.manifest.get("used_for_development", {})
        text = str(dev.get(what, "")) if isinstance(dev, dict) else ""
        if text.startswith("no, then partly"):
            return "held out, then partly seen"
        return "development (in-sample)" if text.startswith("yes") else "held out" if text.startswith("no") else "?"


def _vision_rows(rows: list[dict[str, str]]) -> list[Row]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vision_accuracy import MODELS, options_of_row  # the image-model rows as measure.py runs them
    from vramplan.vision import estimate_vision

    out = []
    for row in rows:
        if row["task"] not in ("vision", "unet"):
            continue
        est = estimate_vision(MODELS[row["model"]], **options_of_row(row))
        out.append(Row(row["name"], float(row["peak_alloc_gib"]), est.peak_allocated_bytes / GiB,
                       float(row["peak_reserved_gib"]) if row.get("peak_reserved_gib") else None,
                       est.peak_reserved_bytes / GiB, None))
    return out


def summarize(folder: Path) -> Summary:
    manifest_path = folder / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    rows = read_rows(folder / "measured.csv")
    out: list[Row] = []
    skipped: list[str] = []
    for row in rows:
        if int(row.get("world_size") or 1) > 1:
            skipped.append(f"{row['name']}: a per-rank row of a multi-GPU run")
            continue
        w = workload_of_row(row)
        if w is None:
            continue
        try:
            est = estimate(load_config_file(folder / "configs" / f"{row['model']}.json"), w)
        except VramplanError as exc:
            skipped.append(f"{row['name']}: {exc}")
            continue
        out.append(Row(row["name"], float(row["peak_alloc_gib"]), est.peak_allocated_bytes / GiB,
                       float(row["peak_reserved_gib"]) if row.get("peak_reserved_gib") else None,
                       est.peak_reserved_bytes / GiB,
                       float(row["estimate_gib"]) if row.get("estimate_gib") else None))
    out += _vision_rows(rows)
    return Summary(folder.name, tuple(out), tuple(skipped), manifest)


def _pct(e: float | None) -> str:
    return "" if e is None else f"{e:+.1%}"


def main(argv: list[str]) -> int:
    for folder in [Path(a) for a in argv] or list(DATASETS):
        s = summarize(folder)
        print(f"== {s.dataset}: allocated {s.label('peak_allocated')}, reserved {s.label('peak_reserved')}")
        print(f"{'case':44s} {'alloc':>7s} {'pred':>7s} {'error':>7s} {'pre-fix':>7s} | "
              f"{'reserved':>8s} {'pred':>7s} {'error':>7s}")
        for r in s.rows:
            res = f"{r.reserved_measured:8.2f}" if r.reserved_measured else f"{'':8s}"
            print(f"{r.name:44s} {r.alloc_measured:7.2f} {r.alloc_predicted:7.2f} {_pct(r.alloc_error):>7s} "
                  f"{_pct(r.prefix_error):>7s} | {res} {r.reserved_predicted:7.2f} {_pct(r.reserved_error):>7s}")
        am, aw = s.allocated
        rm, rw = s.reserved
        print(f"\n{len(s.rows)} rows. allocated: median |error| {am:.2%}, worst {aw:+.2%} "
              f"[{s.label('peak_allocated')}]")
        if s.prefix:
            pm, pw = s.prefix
            print(f"  allocated at measurement time (pre-fix): median |error| {pm:.2%}, worst {pw:+.2%}")
        print(f"reserved: median |error| {rm:.2%}, worst {rw:+.2%} [{s.label('peak_reserved')}]")
        for sk in s.skipped:
            print(f"skipped: {sk}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
