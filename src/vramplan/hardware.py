"""The GPU catalog: memory, bandwidth, peak throughput, interconnect and indicative prices.

Pure standard library. The catalog (``data/gpus.json``) is read on first use, never at import, and
nothing here touches the network. ``detect_local_gpus`` uses ``pynvml`` only when it is importable.

Units are in the field names: bytes, bytes per second, TFLOPS (dense, no sparsity; ``int8`` is TOPS),
watts, US dollars per GPU-hour. ``None`` always means "not published / not offered", never zero.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from vramplan._files import FileTooLarge, NotAFile, package_data, read_text_limited
from vramplan.errors import UnknownNameError, VramplanError

__all__ = [
    "CLASSES",
    "DTYPES",
    "GPU",
    "Interconnect",
    "Link",
    "Price",
    "PriceOverrideError",
    "Throughput",
    "detect_local_gpus",
    "get_gpu",
    "get_link",
    "gpu_choice_note",
    "intra_node_link",
    "list_gpus",
    "list_links",
    "load_price_overrides",
    "with_prices",
]

CLASSES = ("consumer", "workstation", "datacenter")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")

_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "tensorfloat32": "tf32", "bfloat16": "bf16", "float16": "fp16",
    "half": "fp16", "float8": "fp8", "e4m3": "fp8", "e5m2": "fp8", "float8e4m3fn": "fp8",
    "float8e5m2": "fp8", "nvfp4": "fp4", "mxfp4": "fp4", "float4": "fp4",
}
# Vendor and brand words that people type or that drivers report in front of a model number.
_PREFIXES = ("nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel", "habana")
_PRICE_KEYS = ("on_demand", "reserved", "source")
_LIST_HINT = "(vramplan gpus lists all)"


class PriceOverrideError(VramplanError):
    """A price-override file that cannot be read or holds an impossible price."""


@dataclass(frozen=True, slots=True)
class Throughput:
    """Dense peak throughput in TFLOPS (``int8`` in TOPS); ``None`` where absent or not published."""

    fp32: float | None
    tf32: float | None
    bf16: float | None
    fp16: float | None
    fp8: float | None
    int8: float | None
    fp4: float | None

    def get(self, dtype: str) -> float | None:
        value: float | None = getattr(self, _canonical_dtype(dtype))
        return value


@dataclass(frozen=True, slots=True)
class Link:
    """One kind of GPU link (``data/interconnects.json``); bandwidth is what one GPU can send in one direction
    at peak. The one source of link bandwidth: the memory model's communication and the time model read it."""

    name: str
    display_name: str
    kind: str
    scope: str  # intra-node or inter-node
    bandwidth_per_direction_bytes_per_s: int
    note: str
    source: str
    retrieved: str
    nccl: NcclLinkTopology | None = None  # what NCCL builds over it (None: NCCL does not run there)


@dataclass(frozen=True, slots=True)
class NcclLinkTopology:
    """What NCCL's topology search builds over one kind of link (``nccl`` of ``data/interconnects.json``).

    ``coll_channels``: channels of rings and trees (``comm->nChannels``); ``p2p_channels_per_peer``: channels a
    send/recv peer uses over it (intra-node links; 0 for the network, whose p2p buffers are shared);
    ``p2p_read``: NCCL's P2P read mode (the Simple buffer on the sender's side); ``nvls_channels``: NVLink
    SHARP channels (0 without an NVSwitch that does multicast); ``device_buffers``: network buffers live in
    device memory (GPUDirect RDMA) rather than host memory."""

    coll_channels: int
    p2p_channels_per_peer: int = 0
    p2p_read: bool = False
    nvls_channels: int = 0
    device_buffers: bool = True
    note: str = ""
    source: str = ""
    ring_channels: int = 0  # channels of NCCL's ring graph (after duplication, before ncclTopoPostset doubles them)
    ring_channel_gbps: float = 0.0  # bandwidth NCCL's search assigns each ring channel (GB/s); 0 where not recorded


def _nccl_topology(raw: Mapping[str, object] | None) -> NcclLinkTopology | None:
    if not raw:
        return None
    return NcclLinkTopology(int(str(raw["coll_channels"])), int(str(raw.get("p2p_channels_per_peer", 0))),
                            bool(raw.get("p2p_read", False)), int(str(raw.get("nvls_channels", 0))),
                            bool(raw.get("device_buffers", True)), str(raw.get("note", "")),
                            str(raw.get("source", "")), int(str(raw.get("ring_channels", 0))),
                            float(str(raw.get("ring_channel_gbps", 0.0))))


@cache
def _links() -> Mapping[str, Link]:
    raw = json.loads(package_data("data", "interconnects.json").read_text(encoding="utf-8"))
    if raw.get("schema") != 1:
        raise UnknownNameError("data/interconnects.json: unsupported schema")
    return {r["name"]: Link(r["name"], r["display_name"], r["kind"], r["scope"],
                            int(r["bandwidth_per_direction_bytes_per_s"]), r["note"], r["source"], r["retrieved"],
                            _nccl_topology(r.get("nccl")))
            for r in raw["links"]}


def list_links() -> tuple[Link, ...]:
    return tuple(_links().values())


def get_link(name: str) -> Link:
    """A link by name (``nvlink-4``, ``pcie-5``, ``ib-ndr``, ``roce-400``, …); unknown names get suggestions."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    links = _links()
    if key in links:
        return links[key]
    close = difflib.get_close_matches(key, list(links), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownNameError(f"unknown interconnect {name!r}{hint} (known: {', '.join(links)})")


@dataclass(frozen=True, slots=True)
class Interconnect:
    """GPU-to-GPU link. ``link`` names the link a node of these GPUs communicates over and ``pair_link`` a
    2-way bridge that joins only pairs (both in ``data/interconnects.json``). ``bandwidth_bytes_per_s`` is per
    GPU, both directions combined (the bridge's where there is one, as vendors quote it), derived from the
    link catalog; a user-described GPU (``--gpu custom:…,link=…``) has no catalog link and states it."""

    kind: str
    bandwidth_bytes_per_s: int | None
    pcie_gen: int | None
    note: str
    link: str | None = None
    pair_link: str | None = None


def intra_node_link(ic: Interconnect, gpus: int) -> str | None:
    """The catalog link ``gpus`` GPUs of one node talk over: a 2-way bridge only joins a pair, so larger groups
    cross the card's own link (PCIe). None for a user-described GPU without a catalog link."""
    if ic.pair_link is not None and gpus <= 2:
        return ic.pair_link
    return ic.link


@dataclass(frozen=True, slots=True)
class Price:
    """Indicative USD per GPU-hour. ``retrieved`` is None for user overrides."""

    on_demand: float | None
    reserved: float | None
    source: str
    retrieved: str | None


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    display_name: str
    aliases: tuple[str, ...]
    vendor: str
    gpu_class: str
    architecture: str
    memory_bytes: int
    memory_bytes_reported: int | None
    memory_note: str
    memory_type: str
    memory_bandwidth_bytes_per_s: int
    tflops: Throughput
    tflops_note: str
    interconnect: Interconnect
    tdp_watts: int | None
    price: Price
    msrp_usd: float | None
    source: str
    retrieved: str
    # what CUDA reports as total memory (nvidia-smi's total minus what the driver keeps), with provenance:
    # "reported" (seen in a CUDA report), "derived" (from a sibling's report), or "nominal" (none found)
    memory_bytes_usable: int = 0
    memory_usable_kind: str = "nominal"
    memory_usable_source: str = ""
    cuda_context_bytes: int = 0  # device memory a PyTorch process holds before its first tensor
    cuda_context_source: str = ""

    def peak_tflops(self, dtype: str) -> float | None:
        """Dense peak for 'fp32', 'tf32', 'bf16', 'fp16', 'fp8', 'int8' (TOPS) or 'fp4'; None if absent."""
        return self.tflops.get(dtype)

    @property
    def usable_memory_bytes(self) -> int:
        """What CUDA reports as total memory (see ``memory_usable_kind`` for how it is known)."""
        if self.memory_bytes_usable:
            return self.memory_bytes_usable
        return self.memory_bytes_reported if self.memory_bytes_reported is not None else self.memory_bytes


# ----------------------------------------------------------------------------------------- lookup


def _key(text: str) -> str:
    """'NVIDIA GeForce RTX_4090' -> 'rtx4090': lower case, separators dropped, brand prefixes dropped."""
    s = re.sub(r"[^a-z0-9]", "", text.lower())
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if s.startswith(prefix) and len(s) > len(prefix):
                s = s[len(prefix) :]
                changed = True
    return s


def _canonical_dtype(dtype: str) -> str:
    d = re.sub(r"[^a-z0-9]", "", dtype.lower())
    d = _DTYPE_ALIASES.get(d, d)
    if d not in DTYPES:
        close = difflib.get_close_matches(d, DTYPES, n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown dtype {dtype!r}{hint} (use one of {', '.join(DTYPES)})")
    return d


def _index(gpus: Iterable[GPU]) -> dict[str, GPU]:
    index: dict[str, GPU] = {}
    for gpu in gpus:
        for label in (gpu.name, gpu.display_name, *gpu.aliases):
            index.setdefault(_key(label), gpu)
    return index


def _resolve(name: str, index: Mapping[str, GPU]) -> GPU:
    key = _key(name)
    if key in index:
        return index[key]
    suggestions: list[str] = []
    for match in difflib.get_close_matches(key, list(index), n=8, cutoff=0.6):
        canonical = index[match].name
        if canonical not in suggestions:
            suggestions.append(canonical)
    hint = f"; did you mean {', '.join(suggestions[:3])}?" if suggestions else ""
    raise UnknownNameError(f"unknown GPU {name!r}{hint} {_LIST_HINT}")


def get_gpu(name: str) -> GPU:
    """Find a GPU by name, alias or display name ('RTX 4090', 'nvidia-h100', 'a100_80g', ...)."""
    return _resolve(name, _catalog_index())


def gpu_choice_note(name: str) -> str | None:
    """For a name that is short for several catalog GPUs (``a100``, ``h100``, ``v100``, ``3080``): which one
    :func:`get_gpu` takes and the ids of the others, in one line; ``None`` when the name is unambiguous."""
    index = _catalog_index()
    key = _key(name)
    chosen = index.get(key)
    if chosen is None or key == _key(chosen.name):
        return None  # unknown (get_gpu says so) or the GPU's own id
    others = sorted({g.name for k, g in index.items() if k.startswith(key) and g.name != chosen.name})
    if not others:
        return None
    return (f"{name!r} is taken as {chosen.display_name} ({chosen.name}, {chosen.memory_bytes / 2**30:.0f} GiB); "
            f"for another give its id: {', '.join(others)}")


def list_gpus(
    cls: str | None = None, min_memory_bytes: int | None = None, vendor: str | None = None
) -> tuple[GPU, ...]:
    """Catalog GPUs, filtered, sorted by memory, then on-demand price (unpriced last), then name."""
    gpus = _catalog()
    if cls is not None:
        wanted = cls.strip().lower().replace("-", "").replace(" ", "")
        wanted = {"datacentre": "datacenter", "dc": "datacenter", "server": "datacenter"}.get(wanted, wanted)
        if wanted not in CLASSES:
            raise UnknownNameError(f"unknown GPU class {cls!r}; use one of {', '.join(CLASSES)}")
        gpus = tuple(g for g in gpus if g.gpu_class == wanted)
    if vendor is not None:
        vendors = sorted({g.vendor for g in _catalog()})
        matched = [v for v in vendors if v.lower() == vendor.strip().lower()]
        if not matched:
            raise UnknownNameError(f"unknown GPU vendor {vendor!r}; use one of {', '.join(vendors)}")
        gpus = tuple(g for g in gpus if g.vendor == matched[0])
    if min_memory_bytes is not None:
        gpus = tuple(g for g in gpus if g.memory_bytes >= min_memory_bytes)
    return tuple(sorted(gpus, key=_sort_key))


def _sort_key(gpu: GPU) -> tuple[int, bool, float, str]:
    price = gpu.price.on_demand
    return (gpu.memory_bytes, price is None, price if price is not None else 0.0, gpu.name)


# ----------------------------------------------------------------------------------------- catalog


@cache
def _catalog() -> tuple[GPU, ...]:
    text = package_data("data", "gpus.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("schema") != 1 or not isinstance(doc.get("gpus"), list):
        raise VramplanError("the bundled GPU catalog (data/gpus.json) is not schema 1; reinstall vramplan")
    try:
        ctx = doc.get("cuda_context", {})
        return tuple(_gpu_from_record(r, ctx.get(r["architecture"]) or ctx.get("default")) for r in doc["gpus"])
    except (KeyError, TypeError, ValueError) as err:
        raise VramplanError(f"the bundled GPU catalog (data/gpus.json) is malformed: {err}") from None


@cache
def _catalog_index() -> dict[str, GPU]:
    return _index(_catalog())


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number or null, got {value!r}")
    return float(value)


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or null, got {value!r}")
    return value


def _req_int(value: Any) -> int:
    result = _opt_int(value)
    if result is None:
        raise TypeError("expected an integer, got null")
    return result


def _interconnect(ic: Mapping[str, Any]) -> Interconnect:
    link, pair = str(ic["link"]), None if ic.get("pair_link") is None else str(ic["pair_link"])
    shown = get_link(pair if pair is not None else link)  # unknown names fail here, when the catalog loads
    get_link(link)
    return Interconnect(kind=str(ic["type"]), bandwidth_bytes_per_s=2 * shown.bandwidth_per_direction_bytes_per_s,
                        pcie_gen=_opt_int(ic.get("pcie_gen")), note=str(ic.get("note", "")), link=link,
                        pair_link=pair)


def _gpu_from_record(r: Mapping[str, Any], ctx: Mapping[str, Any] | None = None) -> GPU:
    t = r["tflops"]
    ic = r["interconnect"]
    p = r["price_usd_per_hour"]
    return GPU(
        name=str(r["name"]),
        display_name=str(r["display_name"]),
        aliases=tuple(str(a) for a in r["aliases"]),
        vendor=str(r["vendor"]),
        gpu_class=str(r["class"]),
        architecture=str(r["architecture"]),
        memory_bytes=_req_int(r["memory_bytes"]),
        memory_bytes_reported=_opt_int(r.get("memory_bytes_reported")),
        memory_note=str(r["memory_note"]),
        memory_type=str(r["memory_type"]),
        memory_bandwidth_bytes_per_s=_req_int(r["memory_bandwidth_bytes_per_s"]),
        tflops=Throughput(**{d: _opt_float(t[d]) for d in DTYPES}),
        tflops_note=str(r.get("tflops_note", "")),
        interconnect=_interconnect(ic),
        tdp_watts=_opt_int(r["tdp_watts"]),
        price=Price(
            on_demand=_opt_float(p["on_demand"]),
            reserved=_opt_float(p["reserved"]),
            source=str(p["source"]),
            retrieved=None if p.get("retrieved") is None else str(p["retrieved"]),
        ),
        msrp_usd=_opt_float(r["msrp_usd"]),
        source=str(r["source"]),
        retrieved=str(r["retrieved"]),
        memory_bytes_usable=_opt_int(r.get("memory_bytes_usable")) or 0,
        memory_usable_kind=str(r.get("memory_usable_kind", "nominal")),
        memory_usable_source=str(r.get("memory_usable_source", "")),
        cuda_context_bytes=_opt_int(ctx.get("bytes")) or 0 if ctx else 0,
        cuda_context_source=f"{ctx.get('kind', '')}: {ctx.get('source', '')}" if ctx else "",
    )


# ----------------------------------------------------------------------------------------- prices

PriceOverrides = Mapping[str, Mapping[str, object]]
MAX_PRICE_FILE_BYTES = 1 << 20


def load_price_overrides(path: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Read a JSON file like {"h100-sxm": {"on_demand": 2.5, "reserved": 1.8}}; checks shape, not names."""
    shown = os.fspath(path)
    try:
        doc = json.loads(read_text_limited(path, MAX_PRICE_FILE_BYTES))
    except FileTooLarge:
        raise PriceOverrideError(f"price file {shown!r} is too large (limit 1 MiB) for a price list") from None
    except NotAFile as err:
        raise PriceOverrideError(f"price file: {err}") from None
    except FileNotFoundError:
        raise PriceOverrideError(f"price file {shown!r} not found") from None
    except OSError as err:
        raise PriceOverrideError(f"cannot read price file {shown!r}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise PriceOverrideError(f"price file {shown!r} is not UTF-8 text") from None
    except RecursionError:
        raise PriceOverrideError(f"price file {shown!r} is nested too deeply") from None
    except json.JSONDecodeError as err:
        raise PriceOverrideError(
            f"price file {shown!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise PriceOverrideError(
            f'price file {shown!r} must hold an object like {{"h100-sxm": {{"on_demand": 2.5}}}}'
        )
    out: dict[str, dict[str, object]] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise PriceOverrideError(
                f"price file {shown!r}: {name!r} must map to an object with on_demand and/or reserved"
            )
        out[str(name)] = dict(entry)
    return out


def _check_price(gpu_name: str, key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PriceOverrideError(f"price for {gpu_name} {key} must be a number or null, got {value!r}")
    if value < 0:
        raise PriceOverrideError(f"price for {gpu_name} {key} is negative ({value}); use 0 or more")
    return float(value)


def with_prices(gpus: Iterable[GPU], overrides: PriceOverrides) -> tuple[GPU, ...]:
    """New GPU objects carrying user prices; names resolve like ``get_gpu`` but only among ``gpus``."""
    gpus = tuple(gpus)
    index = _index(gpus)
    new_prices: dict[str, Price] = {}
    for name, entry in overrides.items():
        gpu = _resolve(name, index)
        unknown = sorted(set(entry) - set(_PRICE_KEYS))
        if unknown:
            raise PriceOverrideError(
                f"price for {gpu.name}: unknown key {unknown[0]!r}; use on_demand, reserved or source"
            )
        given = [k for k in ("on_demand", "reserved") if k in entry]
        if not given:
            raise PriceOverrideError(f"price for {gpu.name} sets neither on_demand nor reserved")
        if gpu.name in new_prices:
            raise PriceOverrideError(f"price for {gpu.name} is given twice (as {name!r} and another name)")
        old = gpu.price
        on_demand = (
            _check_price(gpu.name, "on_demand", entry["on_demand"]) if "on_demand" in entry else old.on_demand
        )
        reserved = (
            _check_price(gpu.name, "reserved", entry["reserved"]) if "reserved" in entry else old.reserved
        )
        source_value = entry.get("source")
        if source_value is not None and not isinstance(source_value, str):
            raise PriceOverrideError(f"price for {gpu.name} source must be a string, got {source_value!r}")
        source = source_value or f"user override ({', '.join(given)})"
        kept = [k for k in ("on_demand", "reserved") if k not in entry]
        if kept:
            source += f"; {', '.join(kept)} from catalog: {old.source}"
        new_prices[gpu.name] = Price(on_demand=on_demand, reserved=reserved, source=source, retrieved=None)
    return tuple(replace(g, price=new_prices[g.name]) if g.name in new_prices else g for g in gpus)


# ----------------------------------------------------------------------------------------- local GPUs


def _match_device(name: str, total_bytes: int | None) -> GPU | None:
    """Catalog entry for a driver-reported device name; checks memory so 8 GB and 12 GB twins differ."""
    index = _catalog_index()
    key = _key(name)
    candidates = [g for k, g in index.items() if k == key or (k.startswith(key) and len(key) >= 2)]
    unique = list(dict.fromkeys(candidates))
    if total_bytes is None:
        return index.get(key)
    # Drivers report a little less than the marketed size; anything within 15% is the same card.
    fitting = [g for g in unique if abs(g.memory_bytes - total_bytes) <= 0.15 * g.memory_bytes]
    if not fitting:
        return None
    exact = index.get(key)
    if exact in fitting:
        return exact
    return min(fitting, key=lambda g: abs(g.memory_bytes - total_bytes))


def detect_local_gpus() -> tuple[GPU | None, ...]:
    """One entry per local NVIDIA GPU (None where it is not in the catalog); () without pynvml or driver."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except Exception:
        return ()
    try:
        nvml.nvmlInit()
    except Exception:
        return ()
    try:
        found: list[GPU | None] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            raw = nvml.nvmlDeviceGetName(handle)
            name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            try:
                total: int | None = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            except Exception:
                total = None
            found.append(_match_device(name, total))
        return tuple(found)
    except Exception:
        return ()
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
