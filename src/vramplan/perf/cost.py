"""Money: GPU-hours times the catalog's (or the user's) per-GPU-hour prices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hardware import GPU

__all__ = ["Cost", "cost_of"]


@dataclass(frozen=True, slots=True)
class Cost:
    """Money for ``gpu_hours`` at the catalog's (or the user's) prices; None with ``reason`` when unpriced."""

    gpu_hours: float
    on_demand_usd: float | None
    reserved_usd: float | None
    on_demand_usd_per_hour: float | None
    reserved_usd_per_hour: float | None
    price_source: str
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_hours": self.gpu_hours, "on_demand_usd": self.on_demand_usd, "reserved_usd": self.reserved_usd,
                "on_demand_usd_per_gpu_hour": self.on_demand_usd_per_hour,
                "reserved_usd_per_gpu_hour": self.reserved_usd_per_hour, "price_source": self.price_source,
                "reason": self.reason}


def cost_of(gpu: GPU, gpu_hours: float) -> Cost:
    """GPU-hours times the per-GPU-hour prices; a missing price stays missing, with the reason."""
    p = gpu.price
    od = None if p.on_demand is None else gpu_hours * p.on_demand
    rs = None if p.reserved is None else gpu_hours * p.reserved
    reasons = []
    if p.on_demand is None:
        reasons.append(f"no on-demand price for {gpu.display_name} in the catalog ({p.source})")
    if p.reserved is None:
        reasons.append(f"no reserved price for {gpu.display_name}")
    return Cost(gpu_hours, od, rs, p.on_demand, p.reserved, p.source, "; ".join(reasons) or None)
