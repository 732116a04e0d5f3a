"""How well a GEMM of shape (M, N, K) fills a GPU: tile and wave quantization (``data/gemm_tiles.json``).

A cuBLAS / CUTLASS matrix product cuts its M x N output into CTA tiles (128 x 256 for the large bf16
kernels), runs one tile per streaming multiprocessor at a time, and so runs ``ceil(tiles / SMs)`` waves.
Partial tiles (M or N not a multiple of the tile) and a part-empty last wave leave SMs idle (NVIDIA,
*Matrix Multiplication Background User's Guide*, sections 3.1 and 3.2)::

    efficiency = (M x N / tile area) / (ceil(tiles / SMs) x SMs)

It is 1 when the tiles fill whole waves and drops to about one half one tile past a whole wave (two thirds
when the half-size tile is the better fit, as :func:`quantization_efficiency` allows). A grid
smaller than one wave (the weight gradients of small layers, whose M x N is the weight) is split along K
(split-K: CUTLASS ``efficient_gemm.md``, "Parallelized Reductions"), keeping at least
``split_k_min_k`` of K per split.

The GPU's achievable matmul fraction (``data/mfu.json``) was measured on one shape; a step's GEMMs run at
that fraction x their own quantization efficiency / the measured shape's. Pure Python, no imports beyond
the standard library at import time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from ..hardware import GPU

__all__ = ["GemmShape", "GpuTiling", "ceiling_quantization", "collective_ctas", "gpu_tiling", "overlap_rate",
           "quantization_efficiency", "shape_factor", "tensor_parallel"]


@dataclass(frozen=True, slots=True)
class GemmShape:
    """One kind of matrix product in a step: C[m, n] = A[m, k] @ B[k, n], run ``count`` times."""

    m: int
    n: int
    k: int
    count: float = 1.0
    quantized: bool = True  # False: a product whose fixed cost the calibration charges separately (MoE experts)
    # the dimension tensor parallelism splits: "n" (column-parallel forward), "k", or "m" (not part of the shape)
    tp_dim: str = field(default="n", compare=False)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


def tensor_parallel(shapes: Iterable[GemmShape], tp: int) -> tuple[GemmShape, ...]:
    """Each GPU's share of ``shapes`` under ``tp``-way tensor parallelism: a column-parallel linear keeps M and
    K and splits its output features (N in forward), a row-parallel one splits its input features (K in
    forward) and all-reduces its output (Shoeybi et al. 2019, Megatron-LM section 3; vLLM
    ``ColumnParallelLinear`` / ``RowParallelLinear``, TensorRT-LLM ``ColumnLinear`` / ``RowLinear``); backward
    products split the same feature wherever it lands (``GemmShape.tp_dim``). A split that does not divide is
    rounded up (the widest shard sets the time)."""
    if tp <= 1:
        return tuple(shapes)
    out = []
    for s in shapes:
        m, n, k = s.m, s.n, s.k
        if s.tp_dim == "m":
            m = math.ceil(m / tp)
        elif s.tp_dim == "k":
            k = math.ceil(k / tp)
        else:
            n = math.ceil(n / tp)
        out.append(GemmShape(m, n, k, s.count, s.quantized, s.tp_dim))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class GpuTiling:
    """SM count and CTA tile of a GPU's large GEMM kernels."""

    sms: int
    tile: tuple[int, int]
    split_k_min_k: int


@cache
def _document() -> dict[str, Any]:
    text = (resources.files("vramplan") / "data" / "gemm_tiles.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def gpu_tiling(gpu: GPU) -> GpuTiling | None:
    """The SM count and tile for ``gpu``; None where the catalog has no SM count (AMD, Gaudi, a described GPU)."""
    doc = _document()
    sms = doc["sms"].get(gpu.name)
    arch = doc["architectures"].get(gpu.architecture)
    if sms is None or arch is None:
        return None
    tm, tn = arch["tile"]
    return GpuTiling(int(sms), (int(tm), int(tn)), int(doc["split_k_min_k"]))


@lru_cache(maxsize=65536)  # a plan search asks the same few thousand (shape, GPU) pairs tens of thousands of times
def quantization_efficiency(m: int, n: int, k: int, sms: int, tile: tuple[int, int] = (128, 256),
                            split_k_min_k: int = 1024) -> float:
    """Useful fraction of the SM time a tiled GEMM of (m, n, k) occupies on ``sms`` SMs (0 < e <= 1).

    The library may lay the tile either way round (128 x 256 or 256 x 128: cuBLAS has both) or halve it
    (128 x 128); the best of the four counts, each at the same intrinsic speed (optimistic: a smaller tile
    reuses less data, so this is the least loss the heuristic can reach). A grid under one wave is split
    along K into as many slices as fill the SMs, each at least ``split_k_min_k`` deep.
    """
    if min(m, n, k, sms) <= 0:
        raise ValueError(f"GEMM dimensions and SM count must be positive, got {(m, n, k, sms)}")
    best = 0.0
    half = (tile[0], tile[1] // 2)
    for tm, tn in {tile, (tile[1], tile[0]), half, (half[1], half[0])}:
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        useful = m * n / (tm * tn)
        best = max(best, useful / (math.ceil(tiles / sms) * sms))
        if tiles < sms:
            for split in range(2, max(1, k // split_k_min_k) + 1):
                ctas = tiles * split
                best = max(best, useful * split / (math.ceil(ctas / sms) * sms))
                if ctas >= sms:
                    break
    return min(1.0, best)


def ceiling_quantization(gpu: GPU, tiling: GpuTiling) -> float:
    """Quantization efficiency of the shape the GPU's matmul ceiling was measured on (1 for a best-shape sweep)."""
    ceilings = _document()["ceiling_shapes"]
    shape = ceilings.get(gpu.name, ceilings["default"])["shape"]
    if not shape:
        return 1.0
    m, n, k = (int(x) for x in shape)
    return quantization_efficiency(m, n, k, tiling.sms, tiling.tile, tiling.split_k_min_k)


@lru_cache(maxsize=4096)
def _mean_quantization(shapes: tuple[GemmShape, ...], sms: int, tiling: GpuTiling) -> float:
    """FLOP-weighted harmonic mean of the shapes' quantization efficiency on ``sms`` SMs (1.0 without shapes)."""
    total = time = 0.0
    for s in shapes:
        f = s.flops
        if f <= 0:
            continue
        e = quantization_efficiency(s.m, s.n, s.k, sms, tiling.tile, tiling.split_k_min_k) if s.quantized else 1.0
        total += f
        time += f / e
    return total / time if time > 0 else 1.0


def shape_factor(shapes: Iterable[GemmShape], gpu: GPU) -> float:
    """Achieved over ceiling throughput of a step's GEMMs on ``gpu``: the FLOP-weighted harmonic mean of each
    shape's quantization efficiency over the ceiling shape's (1.0 without shapes or without an SM count).

    Time of the GEMMs = FLOPs / (peak x ceiling fraction x this factor).
    """
    tiling = gpu_tiling(gpu)
    shapes = tuple(shapes)
    if tiling is None or not shapes:
        return 1.0
    return _mean_quantization(shapes, tiling.sms, tiling) / ceiling_quantization(gpu, tiling)


def collective_ctas(link: str | None) -> int:
    """SMs an NCCL collective holds while it runs over ``link``: one CTA per channel, the link's collective
    channels (``data/interconnects.json`` ``nccl.coll_channels``; 0 where NCCL does not run or no link)."""
    if link is None:
        return 0
    from ..hardware import get_link

    nccl = get_link(link).nccl
    return 0 if nccl is None else int(nccl.coll_channels)


def overlap_rate(shapes: Iterable[GemmShape], gpu: GPU, ctas: int) -> float:
    """Throughput of a step's matrix products while a collective holds ``ctas`` SMs, relative to all SMs free.

    The products run on the remaining SMs, in waves sized for those (the tail effect: a grid that filled the
    GPU's SMs exactly needs a second, nearly empty wave): (S - c) x q(S - c) / (S x q(S)). 1.0 without an SM
    count or without a collective.
    """
    tiling = gpu_tiling(gpu)
    if tiling is None or ctas <= 0:
        return 1.0
    free = tiling.sms - ctas
    if free <= 0:
        return 1.0
    shapes = tuple(shapes)
    full = _mean_quantization(shapes, tiling.sms, tiling)
    part = _mean_quantization(shapes, free, tiling)
    return free * part / (tiling.sms * full)
