"""The cheapest (or fastest) way to run a job: search methods, precisions, optimizers, checkpointing,
micro-batch x accumulation, GPU type, GPU count and layout; keep what fits; rank by cost or time.

Every candidate's memory comes from the estimator (one GPU) or :func:`vramplan.parallel.estimate_parallel`
(several), its time and money from :mod:`vramplan.perf`. Nothing is estimated twice: a workload and a
layout are evaluated once and compared with every GPU of the pool (the GPU type does not change the
bytes), and micro-batches are tried smallest first, stopping once no GPU of the pool could hold the next
(memory never falls as the batch grows).

The summary follows the question people ask: the *minimum consumer setup* (fewest, then smallest
consumer GPUs that fit, with the highest-fidelity method they allow) and the *recommended data-centre
setup* (the highest-fidelity method any data-centre plan allows, then the best by cost or time), or
``None`` with the reason.

Known limits: one node (up to 8 GPUs); layouts the parallel estimator does not support are skipped (and
counted); data-parallel communication overlaps compute (one layer's share exposed); prices are the
catalog's indicative ones.

The package by concern: :mod:`.space` (the request and what is tried), :mod:`.search` (evaluating it:
:func:`plan`, :func:`plan_vision`) and :mod:`.recommend` (plans, ranking, the recommendations).
"""

from __future__ import annotations

from .recommend import Plan, PlanResult
from .search import plan, plan_vision
from .space import VISION_BATCHES, VISION_NO_TIME, PlanRequest, PlanTask, SortKey

__all__ = ["VISION_BATCHES", "VISION_NO_TIME", "Plan", "PlanRequest", "PlanResult", "PlanTask", "SortKey", "plan",
           "plan_vision"]
