"""Calibration: fit the reference GPU's free coefficients on measured step times.

Only coefficients without an independent measurement are fitted: the attention efficiency of PyTorch
SDPA under transformers, the host launch seconds per layer pass, and the elementwise passes over
scores, MLP intermediates, optimizer states, dequantized weights and adapter activations. The
matrix-product efficiency is the measured ceiling and the logits traffic is counted (pinned).
Run ``python -m vramplan.perf CSV...`` to print the ``calibration`` section of ``data/mfu.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import VramplanError
from ..hardware import GPU
from .efficiency import (
    COUNTED_BYTES_COEFFICIENT,
    LOGITS,
    MEASURED_COPY_EFFICIENCY,
    MEASURED_GEMM_EFFICIENCY,
    ThroughputModel,
    feature_row,
)
from .work import compute_dtype, training_work

__all__ = ["PINNED", "calibration_samples", "fit_throughput_model", "refit"]

# Coefficients with an independent measurement: not fitted.
PINNED = {0: 1.0 / MEASURED_GEMM_EFFICIENCY, LOGITS: COUNTED_BYTES_COEFFICIENT}


def fit_throughput_model(samples: Sequence[tuple[tuple[float, ...], float]],
                         fixed: Mapping[int, float] | None = None, *, minimax: bool = True,
                         iterations: int = 300) -> tuple[float, ...]:
    """Coefficients c >= 0 of ``step_s = x . c`` from (:func:`feature_row`, measured seconds) samples.

    The error of a sample is relative: (x . c) / t - 1. ``minimax`` minimises the worst one (a Chebyshev
    fit, the measure the acceptance test applies) by Lawson's iteratively reweighted least squares
    (Lawson 1961; Rice & Usow 1968): weights grow with each sample's error and the best iterate is kept.
    Otherwise it is plain least squares. Each weighted problem is solved by Lawson & Hanson's active-set
    NNLS (Solving Least Squares Problems, 1974, ch. 23). ``fixed`` pins coefficients by index (the
    matrix-product efficiency is a measured ceiling, not a free parameter). Pure Python, deterministic.
    """
    if not samples:
        raise VramplanError("no samples to fit")
    fixed = dict(fixed or {})
    n = len(samples[0][0])
    free = [j for j in range(n) if j not in fixed]
    rows = [[feats[j] / t for j in free] for feats, t in samples]
    rhs = [1.0 - sum(feats[j] * c for j, c in fixed.items()) / t for feats, t in samples]
    weights = [1.0 / len(rows)] * len(rows)
    best: tuple[float, list[float]] | None = None
    for _ in range(iterations if minimax else 1):
        sol = _weighted_nnls(rows, rhs, weights)
        errors = [abs(sum(a * x for a, x in zip(r, sol, strict=True)) - y) for r, y in zip(rows, rhs, strict=True)]
        worst = max(errors)
        if best is None or worst < best[0]:
            best = (worst, sol)
        weights = [max(wt * e, 1e-12) for wt, e in zip(weights, errors, strict=True)]
        total = sum(weights)
        weights = [wt / total for wt in weights]
    assert best is not None
    out = [0.0] * n
    for j, c in fixed.items():
        out[j] = c
    for j, c in zip(free, best[1], strict=True):
        out[j] = c
    return tuple(out)


def _weighted_nnls(rows: list[list[float]], rhs: list[float], weights: list[float]) -> list[float]:
    k = len(rows[0])
    ata = [[sum(wt * r[i] * r[j] for r, wt in zip(rows, weights, strict=True)) for j in range(k)] for i in range(k)]
    atb = [sum(wt * r[i] * y for r, y, wt in zip(rows, rhs, weights, strict=True)) for i in range(k)]
    return _nnls_normal(ata, atb)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            raise VramplanError("singular system in the throughput fit")
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _nnls_normal(ata: list[list[float]], atb: list[float]) -> list[float]:
    """Lawson-Hanson NNLS given AᵀA and Aᵀb."""
    n = len(atb)
    scale = max(1.0, max(abs(v) for v in atb))
    x = [0.0] * n
    passive: list[int] = []
    for _ in range(20 * n + 20):
        grad = [atb[i] - sum(ata[i][j] * x[j] for j in range(n)) for i in range(n)]
        active = [i for i in range(n) if i not in passive]
        if not active or max(grad[i] for i in active) <= 1e-10 * scale:
            break
        passive.append(max(active, key=lambda i: grad[i]))
        while True:
            sub = _solve([[ata[i][j] for j in passive] for i in passive], [atb[i] for i in passive])
            if min(sub) > 0:
                x = [0.0] * n
                for i, v in zip(passive, sub, strict=True):
                    x[i] = v
                break
            alpha = min(x[i] / (x[i] - v) for i, v in zip(passive, sub, strict=True) if v <= 0)
            for i, v in zip(passive, sub, strict=True):
                x[i] += alpha * (v - x[i])
            passive = [i for i in passive if x[i] > 1e-15]
            x = [x[i] if i in passive else 0.0 for i in range(n)]
            if not passive:
                break
    return x



def calibration_samples(csv_path: str | Path, gpu: GPU) -> list[tuple[str, tuple[float, ...], float]]:
    """(case name, :func:`feature_row`, measured step seconds) of every language-model training row of a
    calibration ``measured.csv`` (configs in the ``configs/`` folder beside it)."""
    from ..calibration import read_rows, workload_of_row
    from ..hfconfig import load_config_file

    path = Path(csv_path)
    out = []
    for row in read_rows(path):
        w = workload_of_row(row)
        if w is None or not w.is_train or not row.get("step_s") or float(row["step_s"]) <= 0:
            continue
        spec = load_config_file(path.parent / "configs" / f"{row['model']}.json")
        feats = feature_row(training_work(spec, w), gpu, micro_batches=w.gradient_accumulation)
        if feats is None:
            raise VramplanError(f"{row['name']}: no {compute_dtype(w)} peak for {gpu.name}")
        out.append((row["name"], feats, float(row["step_s"])))
    return out


def refit(csv_paths: Sequence[str | Path], gpu_name: str = "h200") -> dict[str, Any]:
    """Fit the step-time model on measured step times; returns the ``coefficients`` and ``fit`` sections
    (``calibration`` in ``data/mfu.json``)."""
    import hashlib

    from ..hardware import get_gpu

    gpu = get_gpu(gpu_name)
    samples = [s for p in csv_paths for s in calibration_samples(p, gpu)]
    coeffs = fit_throughput_model([(f, t) for _, f, t in samples], fixed=PINNED)
    model = ThroughputModel(coeffs, MEASURED_COPY_EFFICIENCY, "", "")
    errors = {name: sum(x * c for x, c in zip(f, coeffs, strict=True)) / t - 1 for name, f, t in samples}
    files = {}
    for p in csv_paths:
        data = Path(p).read_bytes()
        files[Path(p).as_posix()] = hashlib.sha256(data).hexdigest()
    return {
        "coefficients": {k: round(v, 9) for k, v in model.named().items()},
        "fit": {
            "method": ("minimax relative error (Lawson IRLS over NNLS, 300 iterations, best kept); matrix-product "
                       "efficiency pinned at the measured ceiling, logits traffic counted and streamed at the "
                       "measured copy bandwidth"),
            "gpu": gpu.name, "rows": len(samples), "files": files,
            "max_abs_rel_error": round(max(abs(e) for e in errors.values()), 4),
            "rms_rel_error": round(math.sqrt(sum(e * e for e in errors.values()) / len(errors)), 4),
            "residuals": {k: round(v, 4) for k, v in sorted(errors.items())},
        },
    }
