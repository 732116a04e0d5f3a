"""Communication of a layout: the interconnect catalog (``data/interconnects.json``), the ring formula of
NCCL's collectives, and the bytes and time each GPU spends per step, by group and collective."""


from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import UnknownNameError
from ..hardware import Link, get_link
from ..memory import ModelStates
from ..spec import ModelSpec
from ..workload import Precision, Workload
from .layout import Engine, FSDPMode, Layout, pipeline_bubble
from .sharding import _compute_workload


# ---- interconnects -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Links:
    """The links a layout communicates over: inside a node, and between nodes."""

    intra_node: str = "nvlink-4"
    inter_node: str = "ib-ndr"


def links_for_gpu(gpu: str, gpus_per_node: int, inter_node: str = "ib-ndr") -> Links:
    """The links of a catalog GPU (``vramplan gpus``): its node's link from the GPU catalog (NVLink generation
    for SXM parts, a 2-way bridge only when a node holds two GPUs, otherwise the card's PCIe)."""
    from ..hardware import get_gpu, intra_node_link

    ic = get_gpu(gpu).interconnect
    intra = intra_node_link(ic, gpus_per_node)
    if intra is None:
        raise UnknownNameError(f"{gpu} names no catalog link; pass --intra-node-link")
    return Links(intra, inter_node)


@dataclass(frozen=True, slots=True)
class Collective:
    """One kind of communication of a step: bytes each GPU sends, over which link, and the time at peak."""

    group: str  # data, tensor, pipeline, expert
    op: str  # all-reduce, reduce-scatter, all-gather, send/recv, all-to-all
    bytes_per_step: int
    link: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Communication:
    collectives: tuple[Collective, ...]
    bubble_fraction: float  # idle share of a pipeline step: (p - 1) / (v·m + p - 1)

    @property
    def bytes_per_step(self) -> int:
        return sum(c.bytes_per_step for c in self.collectives)

    @property
    def seconds_per_step(self) -> float:
        """All collectives back to back at peak link bandwidth (no overlap with compute, no latency)."""
        return sum(c.seconds for c in self.collectives)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_per_step": self.bytes_per_step, "seconds_per_step": self.seconds_per_step,
                "bubble_fraction": self.bubble_fraction,
                "collectives": [{"group": c.group, "op": c.op, "bytes_per_step": c.bytes_per_step,
                                 "link": c.link, "seconds": c.seconds} for c in self.collectives]}


# ---- communication -----------------------------------------------------------------------------------------
def ring_factor(op: str, n: int) -> Fraction:
    """The share of a collective's ``B`` bytes each of ``n`` ranks sends in NCCL's ring algorithms: all-reduce
    2(n−1)/n (a reduce-scatter then an all-gather; Patarasuk & Yuan 2009), reduce-scatter and all-gather
    (n−1)/n. The one ring formula of vramplan (:mod:`vramplan.perf` times the same traffic with it)."""
    if n <= 1:
        return Fraction(0)
    return Fraction(2 * (n - 1), n) if op == "all-reduce" else Fraction(n - 1, n)


def ring_bytes(op: str, nbytes: int, n: int) -> int:
    """Bytes one GPU sends in a ring ``op`` of ``nbytes`` over ``n`` ranks (rounded up)."""
    return math.ceil(nbytes * ring_factor(op, n))


def _communication(spec: ModelSpec, w: Workload, layout: Layout, links: Links, stage_layers_n: int,
                   sh_params: int, sh_trainable: int, grad_bytes: int) -> Communication:
    """Bytes each GPU sends per optimizer step, by collective, and their time at peak link bandwidth.

    Groups are laid out as Megatron does (tensor-parallel ranks adjacent, then data-parallel, then
    pipeline): a group stays inside a node when its span fits ``gpus_per_node``.
    """
    intra, inter = get_link(links.intra_node), get_link(links.inter_node)
    gpn = layout.gpus_per_node
    tp, pp, dp, ep = layout.tp, layout.pp, layout.dp, layout.ep
    wc = _compute_workload(w, layout.engine)
    act = 2 if wc.precision is not Precision.FP32 else 4
    e = act
    m = max(layout.micro_batches, w.gradient_accumulation) if w.is_train else 1
    tokens = w.batch_size * w.seq_len
    hidden_bytes = tokens * spec.hidden_size * act

    def link(span: int) -> Link:
        return intra if span <= gpn else inter

    out: list[Collective] = []

    def add(group: str, op: str, nbytes: int, span: int) -> None:
        if nbytes <= 0:
            return
        lk = link(span)
        out.append(Collective(group, op, nbytes, lk.name, nbytes / lk.bandwidth_per_direction_bytes_per_s))

    # data parallel
    dp_span = tp * dp
    if w.is_train and dp > 1:
        gbytes = grad_bytes
        pbytes = sh_params * e
        eng, z = layout.engine, layout.zero
        if eng in (Engine.DDP, Engine.MEGATRON):
            add("data", "all-reduce", ring_bytes("all-reduce", gbytes, dp), dp_span)
        elif eng is Engine.DEEPSPEED and z in (1, 2):
            reps = 1 if z == 1 else m
            add("data", "reduce-scatter", reps * ring_bytes("reduce-scatter", gbytes, dp), dp_span)
            add("data", "all-gather", ring_bytes("all-gather", sh_trainable * e, dp), dp_span)
        else:
            n = layout.shard_degree
            span = tp * n
            gathers = 1 if layout.fsdp is FSDPMode.GRAD_OP else 2  # forward, and again in backward
            add("data", "all-gather", m * gathers * ring_bytes("all-gather", pbytes, n), span)
            add("data", "reduce-scatter", m * ring_bytes("reduce-scatter", gbytes, n), span)
            if layout.fsdp is FSDPMode.HYBRID and layout.nodes > 1:
                add("data", "all-reduce", ring_bytes("all-reduce", gbytes // max(1, n), layout.nodes), layout.gpus)
    elif not w.is_train and (layout.zero == 3 or layout.fsdp is not None) and dp > 1:
        add("data", "all-gather", ring_bytes("all-gather", sh_params * e, layout.shard_degree), tp * dp)
    # tensor parallel: two all-reduces per layer forward (attention and MLP outputs), two backward, and two
    # more for a recomputed forward (Megatron-LM; sequence parallelism swaps each for a reduce-scatter and an
    # all-gather of the same volume)
    if tp > 1:
        per_layer = 2 if not w.is_train else (6 if w.gradient_checkpointing else 4)
        new_tokens = w.new_tokens if not w.is_train else 0
        tp_bytes = per_layer * stage_layers_n * ring_bytes("all-reduce", hidden_bytes, tp) * m
        if new_tokens:
            tp_bytes += 2 * stage_layers_n * new_tokens * ring_bytes("all-reduce", w.batch_size * spec.hidden_size
                                                                * act, tp)
        add("tensor", "all-reduce" if not layout.sequence_parallel else "reduce-scatter+all-gather", tp_bytes, tp)
    # pipeline: each micro-batch's activations forward and their gradient backward, per stage boundary
    if pp > 1:
        per_mb = hidden_bytes * (2 if w.is_train else 1)
        if not w.is_train and w.new_tokens:
            per_mb += w.new_tokens * w.batch_size * spec.hidden_size * act
        add("pipeline", "send/recv", m * per_mb, layout.gpus)
    # expert parallel: dispatch and combine all-to-alls per MoE layer, forward and backward
    if ep > 1 and spec.is_moe:
        moe_layers = round(len(spec.moe_layers) * stage_layers_n / max(1, spec.num_layers))
        routed = tokens * spec.experts_per_token * spec.hidden_size * act
        passes = 4 if w.is_train else 2
        add("expert", "all-to-all", m * passes * moe_layers * math.ceil(routed * Fraction(ep - 1, ep)),
            tp * ep)
    return Communication(tuple(out), pipeline_bubble(pp, m, layout.virtual_stages) if w.is_train else 0.0)


def _reduced_gradient_bytes(w: Workload, layout: Layout, states: ModelStates) -> int:
    """Gradient bytes the data-parallel group reduces: DDP in the gradients' dtype; DeepSpeed in 16-bit;
    FSDP in ``reduce_dtype`` (fp32 under AMP)."""
    if not w.is_train:
        return 0
    T = states.trainable_parameters
    if layout.engine is Engine.DEEPSPEED:
        return T * (4 if w.precision is Precision.FP32 else 2)
    return states.gradients
