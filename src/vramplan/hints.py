"""One-line hints: a single switch that would change the answer a lot.

A user who expected 17–20 GiB for an 8B LoRA run and sees 29 GiB usually has one default in mind that
vramplan does not assume (gradient checkpointing off, 16-bit base weights). For each such switch the
estimate is run again with only that switch flipped; a switch that lowers ``total_bytes`` by at least
:data:`MIN_SAVING` of it is named, with the new figure — computed, never a rule of thumb.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import VramplanError
from .result import Estimate
from .spec import ModelSpec
from .units import GiB
from .workload import LogitsMode, Method, Optimizer, Precision, Task, Workload

__all__ = ["MIN_SAVING", "Hint", "hints"]

MIN_SAVING = 0.2  # a fifth of the total: a difference that decides whether a GPU class fits
MAX_HINTS = 2


@dataclass(frozen=True, slots=True)
class Hint:
    flag: str  # the CLI switch, as typed
    total_bytes: int  # nvidia-smi total with the switch
    saving: float  # share of the current total it saves

    def text(self) -> str:
        return f"{self.flag} would need {self.total_bytes / GiB:,.1f} GiB ({self.saving:.0%} less)"

    def to_dict(self) -> dict[str, object]:
        return {"flag": self.flag, "total_bytes": self.total_bytes, "saving": round(self.saving, 4),
                "text": self.text()}


def _switches(w: Workload) -> list[tuple[str, Callable[[Workload], Workload]]]:
    out: list[tuple[str, Callable[[Workload], Workload]]] = []
    if w.task is Task.TRAIN:
        if not w.gradient_checkpointing:
            out.append(("--gradient-checkpointing", lambda x: x.with_(gradient_checkpointing=True)))
        if w.method is Method.LORA:
            out.append(("--method qlora", lambda x: x.with_(method=Method.QLORA)))
        if w.method is Method.FULL:
            out.append(("--method lora", lambda x: x.with_(method=Method.LORA)))
        if w.method is Method.FULL and w.optimizer in (Optimizer.ADAMW, Optimizer.ADAMW_FUSED):
            out.append(("--optimizer adamw-8bit", lambda x: x.with_(optimizer=Optimizer.ADAMW_8BIT)))
        if w.precision is Precision.FP32:
            out.append(("--precision bf16", lambda x: x.with_(precision=Precision.BF16)))
    elif w.logits is LogitsMode.ALL:
        out.append(("--logits last", lambda x: x.with_(logits=LogitsMode.LAST)))
    return out


def hints(spec: ModelSpec, workload: Workload, est: Estimate,
          run: Callable[[ModelSpec, Workload], Estimate] | None = None) -> tuple[Hint, ...]:
    """At most :data:`MAX_HINTS` single switches that lower the total by :data:`MIN_SAVING` or more."""
    if run is None:
        from .estimator import estimate as _estimate

        def run(s: ModelSpec, w: Workload) -> Estimate:
            return _estimate(s, w, name=est.model)

    found = []
    for flag, flip in _switches(workload):
        try:
            other = run(spec, flip(workload))
        except VramplanError:
            continue
        saving = 1 - other.total_bytes / est.total_bytes if est.total_bytes else 0.0
        if saving >= MIN_SAVING:
            found.append(Hint(flag, other.total_bytes, saving))
    found.sort(key=lambda h: -h.saving)
    return tuple(found[:MAX_HINTS])
