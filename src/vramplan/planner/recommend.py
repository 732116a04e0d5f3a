"""Plans, their ranking, and the two recommendations (minimum consumer, data-centre setup)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..hardware import GPU
from ..units import GiB
from ..workload import Method, Optimizer, WeightsQuant
from .space import _METHOD_RANK, _QUANT_RANK, PlanRequest, SortKey


@dataclass(frozen=True, slots=True)
class Plan:
    """One configuration that fits, with its per-GPU memory, time and money."""

    gpu: str
    gpu_display_name: str
    gpu_class: str
    gpu_count: int
    layout: str  # "single", "ddp", "zero2", "fsdp", "tp", "replicas"
    method: str  # full / lora / qlora / freeze, or "inference"
    precision: str
    optimizer: str | None
    weights_quant: str
    gradient_checkpointing: bool
    micro_batch: int  # sequences per GPU per forward (concurrent requests, for inference)
    gradient_accumulation: int
    global_batch: int  # sequences per optimizer step (0 for inference)
    seq_len: int
    peak_allocated_bytes: int  # per GPU (the most loaded one)
    total_bytes: int
    usable_memory_bytes: int
    time_hours: float | None
    gpu_hours: float | None
    cost_usd: float | None  # on demand
    cost_reserved_usd: float | None
    cost_reason: str | None
    tokens_per_s: float | None
    mfu: float | None
    resolution: int | None = None  # image models: pixels per side (seq_len is then 0)
    saver: str | None = None  # the memory saver this plan turns on (its CLI flag), if any
    host_bytes: int = 0  # host memory the plan needs besides the GPU's (offloaded activations, paged states)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_memory_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_memory_bytes - self.total_bytes

    def describe(self) -> str:
        """One line: '2x NVIDIA H100 SXM (fsdp): lora, bf16, adamw, micro-batch 4 x 2, checkpointing'."""
        hw = f"{self.gpu_count}x {self.gpu_display_name}" + (f" ({self.layout})" if self.gpu_count > 1 else "")
        parts = [self.method, self.precision]
        if self.weights_quant != "none":
            parts.append(f"{self.weights_quant} weights")
        if self.optimizer:
            parts.append(self.optimizer)
        if self.resolution is not None:
            parts.append(f"{self.micro_batch} image{'s' if self.micro_batch != 1 else ''} of {self.resolution} px"
                         + ("" if self.method == "inference" else f" x {self.gradient_accumulation} accumulation"))
        elif self.method == "inference":
            parts.append(f"{self.micro_batch} concurrent sequences")
        else:
            parts.append(f"micro-batch {self.micro_batch} x {self.gradient_accumulation} accumulation")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.saver:
            parts.append(self.saver + (f" ({self.host_bytes / GiB:.1f} GiB of host memory)" if self.host_bytes else ""))
        return f"{hw}: {', '.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "gpu_display_name": self.gpu_display_name, "gpu_class": self.gpu_class,
                "gpu_count": self.gpu_count, "layout": self.layout, "method": self.method,
                "precision": self.precision, "optimizer": self.optimizer, "weights_quant": self.weights_quant,
                "gradient_checkpointing": self.gradient_checkpointing, "micro_batch": self.micro_batch,
                "gradient_accumulation": self.gradient_accumulation, "global_batch": self.global_batch or None,
                "seq_len": self.seq_len, "peak_allocated_bytes": self.peak_allocated_bytes,
                "total_bytes": self.total_bytes, "usable_memory_bytes": self.usable_memory_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "time_hours": self.time_hours,
                "gpu_hours": self.gpu_hours, "cost_usd": self.cost_usd, "cost_reserved_usd": self.cost_reserved_usd,
                "cost_reason": self.cost_reason, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "summary": self.describe(), "saver": self.saver, "host_bytes": self.host_bytes} | \
            ({"resolution": self.resolution} if self.resolution is not None else {})


@dataclass(frozen=True, slots=True)
class PlanResult:
    model: str
    parameters: int
    task: str
    tokens: int
    seq_len: int
    global_batch: int
    sort: str
    candidates_evaluated: int
    feasible: int
    layouts_unsupported: int
    elapsed_s: float
    plans: tuple[Plan, ...]  # ranked, the best per GPU type, count, layout, method and weight format
    consumer: Plan | None
    consumer_reason: str | None
    datacenter: Plan | None
    datacenter_reason: str | None
    assumptions: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    resolution: int | None = None  # image models: pixels per side (tokens and seq_len are then 0)
    saver_notes: tuple[str, ...] = ()  # which memory saver turned a "does not fit" into a recommended plan

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"resolution": self.resolution} if self.resolution is not None else {}
        extra["savers"] = list(self.saver_notes)
        return {"model": self.model, "parameters": self.parameters, "task": self.task, "tokens": self.tokens,
                "seq_len": self.seq_len, "global_batch": self.global_batch or None, "sort": self.sort,
                "candidates_evaluated": self.candidates_evaluated, "feasible": self.feasible,
                "layouts_unsupported": self.layouts_unsupported, "elapsed_s": self.elapsed_s,
                "plans": [p.to_dict() for p in self.plans],
                "recommendation": {
                    "consumer": self.consumer.to_dict() if self.consumer else None,
                    "consumer_reason": self.consumer_reason,
                    "datacenter": self.datacenter.to_dict() if self.datacenter else None,
                    "datacenter_reason": self.datacenter_reason,
                },
                "assumptions": list(self.assumptions), "warnings": list(self.warnings)} | extra


def _rank_key(sort: SortKey) -> Any:
    inf = float("inf")

    def key(p: Plan) -> tuple[float, ...]:
        t = p.time_hours if p.time_hours is not None else inf
        c = p.cost_usd if p.cost_usd is not None else inf
        first, second = (c, t) if sort is SortKey.COST else (t, c)
        return (first, second, p.gpu_count, p.total_bytes)

    return key


def _fidelity(p: Plan) -> int:
    if p.method == "inference":
        return _QUANT_RANK.get(WeightsQuant(p.weights_quant), len(_QUANT_RANK))
    return _METHOD_RANK.get(Method(p.method), _METHOD_RANK[Method.LORA])  # DoRA ranks with LoRA


def _dedupe(ranked: Sequence[Plan]) -> list[Plan]:
    seen: set[tuple[str, int, str, str, str]] = set()
    out = []
    for p in ranked:
        key = (p.gpu, p.gpu_count, p.layout, p.method, p.weights_quant)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _recommend(cls: str, ranked: Sequence[Plan], pool: Sequence[GPU], min_need: dict[str, tuple[int, str]],
               req: PlanRequest, feasible: int) -> tuple[Plan | None, str | None]:
    word = "consumer" if cls == "consumer" else "data-centre"
    in_class = [g for g in pool if g.gpu_class == cls]
    if not in_class:
        why = f"--gpu-class {req.gpu_class}" if req.gpu_class != "any" else "the GPU selection"
        return None, f"no {word} GPUs to plan for ({why} excludes them)"
    plans = [p for p in ranked if p.gpu_class == cls]
    if not plans:
        need = min_need.get(cls)
        biggest = max(in_class, key=lambda g: g.usable_memory_bytes)
        if need is not None and need[0] > biggest.usable_memory_bytes:
            return None, (f"not feasible on {word} GPUs: the leanest configuration tried needs "
                          f"{need[0] / GiB:.1f} GiB per GPU ({need[1]}), more than the "
                          f"{biggest.display_name}'s {biggest.usable_memory_bytes / GiB:.1f} GiB")
        if req.budget_usd is not None and feasible:
            return None, (f"no {word} plan fits within the ${req.budget_usd:,.2f} budget (unpriced GPUs "
                          "cannot be checked)")
        return None, f"not feasible on {word} GPUs with the options searched"
    if cls == "consumer":
        # the minimum setup: fewest GPUs, then the smallest (memory, then price to buy)
        def hw_key(p: Plan) -> tuple[float, ...]:
            g = next(x for x in in_class if x.name == p.gpu)
            return (p.gpu_count, g.usable_memory_bytes, g.msrp_usd if g.msrp_usd is not None else float("inf"))
        least = min(hw_key(p) for p in plans)
        plans = [p for p in plans if hw_key(p) == least]
    best_fidelity = min(_fidelity(p) for p in plans)
    return next(p for p in plans if _fidelity(p) == best_fidelity), None


def _saver_notes(ranked: Sequence[Plan], picks: Sequence[Plan | None]) -> tuple[str, ...]:
    """For each recommended plan that turns a saver on: the saver, when no plan without one fits that GPU setup
    with that method (the saver turned a no into a yes)."""
    notes: list[str] = []
    for p in picks:
        if p is None or not p.saver:
            continue
        if not any(q.gpu == p.gpu and q.gpu_count == p.gpu_count and q.method == p.method and not q.saver
                   for q in ranked):
            host = f", {p.host_bytes / GiB:.1f} GiB of host memory" if p.host_bytes else ""
            notes.append(f"{p.method} on {p.gpu_count}x {p.gpu_display_name} fits with {p.saver} (not without it"
                         f"{host})")
    return tuple(dict.fromkeys(notes))


def _vision_rank_key(sort: SortKey, prices: dict[str, float | None]) -> Any:
    """Without a throughput model: the GPU's hourly price (sort cost), then fewest memory savers
    (checkpointing, 8-bit optimizer states), then the most images per step, then the least memory."""
    inf = float("inf")

    def key(p: Plan) -> tuple[float, ...]:
        savers = int(p.gradient_checkpointing) + int(p.optimizer == Optimizer.ADAMW_8BIT.value)
        hourly = prices.get(p.gpu)
        price = inf if hourly is None else hourly
        first = price if sort is SortKey.COST else 0.0
        return (first, savers, -p.micro_batch, price, p.total_bytes)

    return key
