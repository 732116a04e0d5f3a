"""GPUs the catalog lacks: ``--gpu custom:memory=96GiB,bf16_tflops=148,bandwidth=4.0TB/s`` or ``--gpu-spec FILE``.

A described GPU is an ordinary :class:`~vramplan.hardware.GPU` (the same estimator, time model and cost
apply). Keys (inline or in the JSON file; the file may also nest ``tflops`` as in ``data/gpus.json``):

* ``memory`` (required): capacity, with a unit (``96GiB``, ``80GB``) or bytes;
* ``bandwidth`` (required for time): memory bandwidth, ``4.0TB/s``, ``900GB/s`` or bytes per second;
* ``bf16_tflops``, ``fp16_tflops``, ``fp8_tflops``, ``tf32_tflops``, ``fp32_tflops``: dense peaks
  (``fp16`` defaults to ``bf16`` and back; ``tf32`` to half of ``bf16``);
* ``architecture``: a generation in ``data/mfu.json`` (Hopper, Ampere, Ada Lovelace, Blackwell, …) whose
  achievable fractions apply (default Hopper);
* ``matmul_efficiency``, ``attention_efficiency``, ``bandwidth_efficiency``: the user's own fractions;
* ``link`` (bytes per second, both directions, or ``900GB/s``), ``price`` (USD per GPU-hour), ``name``.

A power-capped card is its catalog entry with lower peaks: ``custom:base=a100-80gb-sxm,bf16_tflops=250``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import VramplanError
from ..hardware import GPU, Interconnect, Price, Throughput, get_gpu
from ..units import parse_bytes
from .efficiency import register_custom_efficiency

__all__ = ["custom_gpu", "load_gpu_spec", "resolve_gpu"]

_KEYS = {"memory", "bandwidth", "bf16_tflops", "fp16_tflops", "fp8_tflops", "tf32_tflops", "fp32_tflops",
         "int8_tops", "fp4_tflops", "architecture", "matmul_efficiency", "attention_efficiency",
         "bandwidth_efficiency", "link", "price", "name", "base", "tflops", "class"}
_HELP = ("describe the GPU as custom:memory=96GiB,bf16_tflops=148,bandwidth=4.0TB/s (optional: fp8_tflops, "
         "architecture, matmul_efficiency, link, price, base=CATALOG_NAME)")


def _rate(text: Any, what: str) -> int:
    """'4.0TB/s', '900 GB/s', '3.35e12' -> bytes per second."""
    s = str(text).strip().replace(" ", "")
    s = re.sub(r"/s$", "", s, flags=re.IGNORECASE)
    try:
        return parse_bytes(s) if re.search(r"[a-zA-Z]$", s) else int(float(s))
    except ValueError as exc:
        raise VramplanError(f"{what}: {exc}; {_HELP}") from None


def _number(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VramplanError(f"{what} must be a number, got {value!r}; {_HELP}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise VramplanError(f"{what} must be a positive number, got {value!r}")
    return v


def _fraction(value: Any, what: str) -> float:
    v = _number(value, what)
    if v > 1:
        raise VramplanError(f"{what} is a fraction of the peak (0-1], got {value!r}")
    return v


def custom_gpu(fields: Mapping[str, Any]) -> GPU:
    """A :class:`GPU` from the keys in the module docstring; unknown keys and bad values are one-line errors."""
    unknown = sorted(set(fields) - _KEYS)
    if unknown:
        raise VramplanError(f"unknown GPU key(s) {', '.join(unknown)}; {_HELP}")
    base = get_gpu(str(fields["base"])) if "base" in fields else None
    if base is None and "memory" not in fields:
        raise VramplanError(f"a custom GPU needs memory=…; {_HELP}")
    tflops: dict[str, float | None] = {k: None for k in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")}
    if base is not None:
        tflops.update({k: base.tflops.get(k) for k in tflops})
    nested = fields.get("tflops") or {}
    if not isinstance(nested, Mapping):
        raise VramplanError("tflops must be an object like {\"bf16\": 148}")
    for k, v in nested.items():
        if k not in tflops:
            raise VramplanError(f"unknown dtype {k!r} in tflops; use {', '.join(tflops)}")
        tflops[k] = None if v is None else _number(v, f"tflops.{k}")
    for k in tflops:
        key = "int8_tops" if k == "int8" else f"{k}_tflops"
        if key in fields:
            tflops[k] = _number(fields[key], key)
    if tflops["fp16"] is None and tflops["bf16"] is not None:
        tflops["fp16"] = tflops["bf16"]
    if tflops["bf16"] is None and tflops["fp16"] is not None:
        tflops["bf16"] = tflops["fp16"]
    if tflops["tf32"] is None and tflops["bf16"] is not None:
        tflops["tf32"] = tflops["bf16"] / 2  # dense TF32 runs at half the 16-bit tensor rate (Ampere and later)
    try:
        memory = parse_bytes(str(fields["memory"])) if "memory" in fields else (base.memory_bytes if base else 0)
    except ValueError as exc:
        raise VramplanError(f"memory: {exc}") from None
    if memory <= 0:
        raise VramplanError("memory must be positive")
    if "bandwidth" in fields:
        bandwidth = _rate(fields["bandwidth"], "bandwidth")
    elif base is not None:
        bandwidth = base.memory_bandwidth_bytes_per_s
    else:
        raise VramplanError(f"a custom GPU needs bandwidth=… (memory bandwidth); {_HELP}")
    arch = str(fields.get("architecture", base.architecture if base else "Hopper"))
    link = _rate(fields["link"], "link") if "link" in fields else None
    ic = base.interconnect if base is not None and link is None else Interconnect(
        "user-described", link, None, "given by the user (both directions combined)")
    price = _number(fields["price"], "price") if "price" in fields else None
    base_name = base.name if base else "custom"
    name = str(fields.get("name") or f"{base_name}-{memory // 2**30}gib-{int(tflops['bf16'] or 0)}tf")
    gpu = GPU(name=name, display_name=f"{name} (user-described)", aliases=(), vendor=base.vendor if base else "",
              gpu_class=str(fields.get("class", base.gpu_class if base else "datacenter")), architecture=arch,
              memory_bytes=memory, memory_bytes_reported=None, memory_note="given by the user",
              memory_type=base.memory_type if base else "", memory_bandwidth_bytes_per_s=bandwidth,
              tflops=Throughput(**tflops), tflops_note="given by the user", interconnect=ic, tdp_watts=None,
              price=Price(price, None, "given by the user" if price is not None else "no price given", None),
              msrp_usd=None, source="user-described (--gpu custom:… / --gpu-spec)", retrieved="")
    eff = {k.removesuffix("_efficiency"): _fraction(fields[k], k)
           for k in ("matmul_efficiency", "attention_efficiency", "bandwidth_efficiency") if k in fields}
    register_custom_efficiency(gpu.name, eff)
    return gpu


def _parse_inline(text: str) -> dict[str, str]:
    body = text.split(":", 1)[1]
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise VramplanError(f"{part!r} is not key=value; {_HELP}")
        k, v = part.split("=", 1)
        out[k.strip().lower()] = v.strip()
    return out


def load_gpu_spec(path: str | Path) -> GPU:
    """A GPU described in a JSON file (the keys of :func:`custom_gpu`)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VramplanError(f"GPU spec file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VramplanError(f"GPU spec file {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise VramplanError(f"GPU spec file {str(path)!r} must hold one JSON object")
    return custom_gpu(doc)


def resolve_gpu(name: str | None = None, spec_file: str | None = None) -> GPU:
    """``--gpu NAME`` (catalog), ``--gpu custom:…`` or ``--gpu-spec FILE``."""
    if spec_file:
        if name:
            raise VramplanError("give either --gpu or --gpu-spec, not both")
        return load_gpu_spec(spec_file)
    if not name:
        raise VramplanError("no GPU: give --gpu NAME (vramplan gpus lists them), --gpu custom:… or --gpu-spec FILE")
    if name.strip().lower().startswith("custom:"):
        return custom_gpu(_parse_inline(name.strip()))
    return get_gpu(name)


