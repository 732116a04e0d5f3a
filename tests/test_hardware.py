"""The GPU catalog: schema of every record, lookups, suggestions, price overrides, local detection."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import types
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from vramplan import hardware
from vramplan.errors import UnknownNameError, VramplanError
from vramplan.hardware import (
    CLASSES,
    DTYPES,
    GPU,
    PriceOverrideError,
    detect_local_gpus,
    get_gpu,
    list_gpus,
    list_links,
    load_price_overrides,
    with_prices,
)
from vramplan.units import GiB

RAW: dict[str, Any] = json.loads(
    (resources.files("vramplan") / "data" / "gpus.json").read_text(encoding="utf-8")
)
RECORDS: list[dict[str, Any]] = RAW["gpus"]
IDS = [r["name"] for r in RECORDS]

# Every GPU the catalog promises, by the id it is stored under.
REQUIRED = [
    "rtx-3060", "rtx-3070", "rtx-3080-10gb", "rtx-3080-12gb", "rtx-3090", "rtx-3090-ti", "rtx-4060-ti-16gb",
    "rtx-4070-ti-super", "rtx-4080", "rtx-4080-super", "rtx-4090", "rtx-5080", "rtx-5090",
    "rtx-a6000", "rtx-6000-ada", "rtx-pro-6000",
    "t4", "v100-16gb", "v100-32gb", "a10", "a10g", "l4", "l40s", "a100-40gb-pcie", "a100-40gb-sxm",
    "a100-80gb-pcie", "a100-80gb-sxm", "h100-pcie", "h100-sxm", "h100-nvl", "h200", "b200", "gb200",
    "mi250x", "mi300x", "mi325x", "gaudi3",
]

TOP_KEYS = {
    "name", "display_name", "aliases", "vendor", "class", "architecture", "memory_bytes",
    "memory_bytes_reported", "memory_bytes_usable", "memory_usable_kind", "memory_usable_source",
    "memory_note", "memory_type", "memory_bandwidth_bytes_per_s", "tflops",
    "tflops_note", "interconnect", "tdp_watts", "price_usd_per_hour", "msrp_usd", "source", "retrieved",
}
MEMORY_TYPES = {"GDDR6", "GDDR6X", "GDDR7", "HBM2", "HBM2e", "HBM3", "HBM3e"}


def _is_date(text: object) -> bool:
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    day = dt.date.fromisoformat(text)
    return dt.date(2020, 1, 1) <= day <= dt.date(2100, 1, 1)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_usable_capacity_has_provenance(record: dict[str, Any]) -> None:
    usable, nominal = record["memory_bytes_usable"], record["memory_bytes"]
    assert _is_pos_int(usable) and 0.9 * nominal <= usable <= nominal
    assert record["memory_usable_kind"] in ("reported", "derived", "nominal")
    assert record["memory_usable_source"]
    if record["memory_bytes_reported"] is not None:
        assert usable == record["memory_bytes_reported"] and record["memory_usable_kind"] == "reported"


def test_cuda_context_by_architecture() -> None:
    ctx = RAW["cuda_context"]
    assert ctx["default"]["bytes"] > 0 and ctx["default"]["source"]
    for arch, entry in ctx.items():
        if isinstance(entry, dict):
            assert _is_pos_int(entry["bytes"]) and entry["kind"] in ("measured", "assumed"), arch


def test_document_header() -> None:
    assert RAW["schema"] == 1
    assert _is_date(RAW["prices_retrieved"])
    assert len(RECORDS) >= 30


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_record_schema(record: dict[str, Any]) -> None:
    assert set(record) == TOP_KEYS
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", record["name"])
    assert isinstance(record["display_name"], str) and record["display_name"]
    assert isinstance(record["aliases"], list)
    assert all(isinstance(a, str) and a and a == a.lower() for a in record["aliases"])
    assert record["vendor"] in {"NVIDIA", "AMD", "Intel"}
    assert record["class"] in CLASSES
    assert isinstance(record["architecture"], str) and record["architecture"]
    assert record["memory_type"] in MEMORY_TYPES
    for note in ("memory_note", "tflops_note"):
        assert isinstance(record[note], str) and record[note]

    mem = record["memory_bytes"]
    assert _is_pos_int(mem)
    assert 4 * GiB <= mem <= 512 * GiB
    reported = record["memory_bytes_reported"]
    assert reported is None or (_is_pos_int(reported) and 0.85 * mem <= reported <= mem)
    bandwidth = record["memory_bandwidth_bytes_per_s"]
    assert _is_pos_int(bandwidth)
    assert 100 * 10**9 <= bandwidth <= 20 * 10**12

    tflops = record["tflops"]
    assert set(tflops) == set(DTYPES)
    for dtype, value in tflops.items():
        assert value is None or (_is_number(value) and 0 < value < 50_000), dtype
    assert any(tflops[d] is not None for d in ("bf16", "fp16")), "every part has a 16-bit tensor rate"
    if tflops["bf16"] is not None and tflops["fp8"] is not None:
        assert tflops["bf16"] <= tflops["fp8"]
    if tflops["fp8"] is not None and tflops["fp4"] is not None:
        assert tflops["fp8"] <= tflops["fp4"]

    ic = record["interconnect"]
    assert set(ic) == {"type", "link", "pair_link", "pcie_gen", "note"}  # bandwidth comes from the link catalog
    assert isinstance(ic["type"], str) and ic["type"]
    links = {link.name for link in list_links()}
    assert ic["link"] in links and (ic["pair_link"] is None or ic["pair_link"] in links)
    assert ic["pcie_gen"] is None or ic["pcie_gen"] in {3, 4, 5, 6}
    assert isinstance(ic["note"], str) and ic["note"]

    assert record["tdp_watts"] is None or (_is_pos_int(record["tdp_watts"]) and record["tdp_watts"] <= 2000)

    price = record["price_usd_per_hour"]
    assert set(price) == {"on_demand", "reserved", "source", "retrieved"}
    for key in ("on_demand", "reserved"):
        assert price[key] is None or (_is_number(price[key]) and 0 < price[key] < 100)
    if price["on_demand"] is not None and price["reserved"] is not None:
        assert price["reserved"] <= price["on_demand"]
    assert isinstance(price["source"], str) and price["source"]
    assert _is_date(price["retrieved"])

    msrp = record["msrp_usd"]
    assert msrp is None or (_is_number(msrp) and 100 <= msrp <= 100_000)
    if record["class"] == "consumer":
        assert record["vendor"] == "NVIDIA"
    assert isinstance(record["source"], str) and record["source"].startswith("https://")
    assert _is_date(record["retrieved"])


def test_names_and_aliases_are_unique_after_normalising() -> None:
    owner: dict[str, str] = {}
    for record in RECORDS:
        for label in (record["name"], record["display_name"], *record["aliases"]):
            key = hardware._key(label)
            assert owner.setdefault(key, record["name"]) == record["name"], (label, owner[key])
    assert len(set(IDS)) == len(IDS)


def test_every_promised_gpu_is_present() -> None:
    missing = sorted(set(REQUIRED) - set(IDS))
    assert not missing


def test_catalog_loads_into_typed_objects() -> None:
    gpus = list_gpus()
    assert len(gpus) == len(RECORDS)
    for gpu in gpus:
        assert isinstance(gpu, GPU)
        assert isinstance(gpu.memory_bytes, int)
        assert isinstance(gpu.memory_bandwidth_bytes_per_s, int)
        assert gpu.usable_memory_bytes <= gpu.memory_bytes
        for dtype in DTYPES:
            value = gpu.peak_tflops(dtype)
            assert value is None or isinstance(value, float)


# ------------------------------------------------------------------------------------ figures


def test_well_known_figures() -> None:
    h100 = get_gpu("h100-sxm")
    assert h100.memory_bytes == 80 * GiB
    assert h100.memory_bandwidth_bytes_per_s == 3_350 * 10**9
    assert h100.peak_tflops("bf16") == pytest.approx(989.5)
    assert h100.peak_tflops("fp8") == pytest.approx(1979)
    assert h100.peak_tflops("fp4") is None
    assert h100.interconnect.bandwidth_bytes_per_s == 900 * 10**9
    assert get_gpu("a100-80gb-sxm").peak_tflops("bf16") == pytest.approx(312)
    assert get_gpu("a100-80gb-sxm").peak_tflops("fp8") is None
    assert get_gpu("rtx-4090").memory_bytes == 24 * GiB
    assert get_gpu("t4").peak_tflops("bf16") is None
    assert get_gpu("mi300x").memory_bytes == 192 * GiB
    assert get_gpu("b200").peak_tflops("fp4") == pytest.approx(9000)


def test_peak_tflops_accepts_torch_style_names_and_rejects_unknown() -> None:
    gpu = get_gpu("h100")
    assert gpu.peak_tflops("bfloat16") == gpu.peak_tflops("bf16")
    assert gpu.peak_tflops("float32") == gpu.peak_tflops("fp32")
    with pytest.raises(UnknownNameError, match="unknown dtype"):
        gpu.peak_tflops("fp7")


# ------------------------------------------------------------------------------------ lookup


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("rtx-4090", "rtx-4090"),
        ("4090", "rtx-4090"),
        ("RTX 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("geforce_rtx_4090", "rtx-4090"),
        ("h100", "h100-sxm"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("nvidia-h100-pcie", "h100-pcie"),
        ("A100-80G", "a100-80gb-sxm"),
        ("a100_80gb_pcie", "a100-80gb-pcie"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb-sxm"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100-16gb"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
        ("AMD Instinct MI300X", "mi300x"),
        ("Intel Gaudi 3", "gaudi3"),
        ("GB200 (per GPU)", "gb200"),
    ],
)
def test_lookup(query: str, expected: str) -> None:
    assert get_gpu(query).name == expected


def test_unknown_gpu_suggests_near_misses() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_gpu("rtx-4900")
    message = str(info.value)
    assert message.startswith("unknown GPU 'rtx-4900'; did you mean rtx-4090")
    assert message.endswith("(vramplan gpus lists all)")
    assert "\n" not in message
    assert isinstance(info.value, VramplanError)


def test_unknown_gpu_without_near_miss() -> None:
    with pytest.raises(UnknownNameError, match=r"^unknown GPU 'zzzzzz' \(vramplan gpus lists all\)$"):
        get_gpu("zzzzzz")


# ------------------------------------------------------------------------------------ listing


def test_list_sorted_by_memory_then_price() -> None:
    gpus = list_gpus()
    keys = [(g.memory_bytes, g.price.on_demand is None, g.price.on_demand or 0.0) for g in gpus]
    assert keys == sorted(keys)


def test_list_filters() -> None:
    consumer = list_gpus(cls="consumer")
    assert consumer and all(g.gpu_class == "consumer" for g in consumer)
    assert {g.gpu_class for g in list_gpus(cls="Datacentre")} == {"datacenter"}
    big = list_gpus(min_memory_bytes=80 * GiB)
    assert big and all(g.memory_bytes >= 80 * GiB for g in big)
    assert "rtx-4090" not in {g.name for g in big}
    amd = list_gpus(vendor="amd")
    assert {g.name for g in amd} == {"mi250x", "mi300x", "mi325x"}
    both = list_gpus(cls="datacenter", vendor="NVIDIA", min_memory_bytes=100 * GiB)
    assert {g.name for g in both} == {"h200", "b200", "gb200"}


def test_list_rejects_unknown_class_and_vendor() -> None:
    with pytest.raises(UnknownNameError, match="unknown GPU class 'gaming'"):
        list_gpus(cls="gaming")
    with pytest.raises(UnknownNameError, match="unknown GPU vendor 'acme'"):
        list_gpus(vendor="acme")


# ------------------------------------------------------------------------------------ prices


def test_price_override_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    overrides = {"h100-sxm": {"on_demand": 2.5, "reserved": 1.8}, "RTX 4090": {"on_demand": 0}}
    path.write_text(json.dumps(overrides))
    before = list_gpus()
    after = with_prices(before, load_price_overrides(path))
    by_name = {g.name: g for g in after}
    assert by_name["h100-sxm"].price.on_demand == 2.5
    assert by_name["h100-sxm"].price.reserved == 1.8
    assert by_name["h100-sxm"].price.source.startswith("user override")
    assert by_name["h100-sxm"].price.retrieved is None
    assert by_name["rtx-4090"].price.on_demand == 0.0
    assert by_name["rtx-4090"].price.reserved == get_gpu("rtx-4090").price.reserved
    # The catalog itself is untouched and everything else is the same object.
    assert not get_gpu("h100-sxm").price.source.startswith("user override")
    assert by_name["a10"] is get_gpu("a10")
    assert [g.name for g in after] == [g.name for g in before]


@pytest.mark.parametrize(
    ("content", "error", "pattern"),
    [
        ({"h100-sxm": {"on_demand": -1}}, PriceOverrideError, "negative"),
        ({"h100-sxm": {"on_demand": "cheap"}}, PriceOverrideError, "must be a number"),
        ({"h100-sxm": {"on_demand": True}}, PriceOverrideError, "must be a number"),
        ({"h100-sxm": {"spot": 1.0}}, PriceOverrideError, "unknown key 'spot'"),
        ({"h100-sxm": {}}, PriceOverrideError, "neither on_demand nor reserved"),
        ({"h100-sxm": 2.5}, PriceOverrideError, "must map to an object"),
        ([1, 2], PriceOverrideError, "must hold an object"),
        ({"h100": {"on_demand": 1}, "h100-sxm": {"on_demand": 2}}, PriceOverrideError, "given twice"),
        ({"h1000-sxm": {"on_demand": 1}}, UnknownNameError, "did you mean h100-sxm"),
    ],
)
def test_bad_price_overrides(tmp_path: Path, content: object, error: type[Exception], pattern: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(content))
    with pytest.raises(error, match=pattern) as info:
        with_prices(list_gpus(), load_price_overrides(path))
    assert isinstance(info.value, VramplanError)
    assert "\n" not in str(info.value)


def test_unreadable_price_files(tmp_path: Path) -> None:
    with pytest.raises(PriceOverrideError, match="not found"):
        load_price_overrides(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"h100-sxm": {"on_demand": 2.5,}}')
    with pytest.raises(PriceOverrideError, match=r"not valid JSON \(line 1"):
        load_price_overrides(bad)


# ------------------------------------------------------------------------------------ local GPUs


def test_detect_local_gpus_never_raises() -> None:
    result = detect_local_gpus()
    assert isinstance(result, tuple)
    assert all(g is None or isinstance(g, GPU) for g in result)


def _fake_pynvml(devices: list[tuple[object, int]], fail_init: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: devices[h][0]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=devices[h][1])  # type: ignore[attr-defined]
    return module


def test_detect_maps_driver_names(monkeypatch: pytest.MonkeyPatch) -> None:
    devices: list[tuple[object, int]] = [
        ("NVIDIA H100 80GB HBM3", 81559 * 2**20),
        (b"NVIDIA GeForce RTX 3080", 12288 * 2**20),  # old pynvml returns bytes; the 12 GB twin
        ("NVIDIA GeForce RTX 3080", 10240 * 2**20),
        ("Tesla T4", 15360 * 2**20),
        ("NVIDIA GeForce RTX 3060", 8192 * 2**20),  # the 8 GB variant is not in the catalog
        ("NVIDIA Future GPU", 200 * GiB),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices))
    names = [g.name if g else None for g in detect_local_gpus()]
    assert names == ["h100-sxm", "rtx-3080-12gb", "rtx-3080-10gb", "t4", None, None]


def test_detect_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail_init=True))
    assert detect_local_gpus() == ()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert detect_local_gpus() == ()


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_memory_and_time_models_use_the_same_link(gpus: int) -> None:
    """One source of link bandwidth: the layout's communication (parallel) and the time model (perf) read the
    same catalog link for every GPU, including 2-way bridges beyond a pair, x8 cards and AMD/Intel parts."""
    from vramplan.hardware import get_link
    from vramplan.parallel import links_for_gpu
    from vramplan.perf import link_bandwidth_bytes_per_s

    for gpu in list_gpus():
        link = get_link(links_for_gpu(gpu.name, gpus).intra_node)
        assert link_bandwidth_bytes_per_s(gpu, gpus) == link.bandwidth_per_direction_bytes_per_s, gpu.name


def test_links_follow_the_hardware() -> None:
    from vramplan.parallel import links_for_gpu

    assert links_for_gpu("a100-80gb-pcie", 2).intra_node == "nvlink-3-bridge"  # not the GeForce bridge
    assert links_for_gpu("a100-80gb-pcie", 4).intra_node == "pcie-4"
    assert links_for_gpu("h100-nvl", 2).intra_node == "nvlink-4-bridge"
    assert links_for_gpu("rtx-4060-ti-16gb", 2).intra_node == "pcie-4-x8"
    assert links_for_gpu("mi300x", 8).intra_node == "infinity-fabric-mi300"
    assert get_gpu("h100-sxm").interconnect.bandwidth_bytes_per_s == 900 * 10**9  # as NVIDIA quotes it
