"""Chart definitions (vramplan.charts): data that sums to the estimate, sweeps, and rendering to files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vramplan import MemoryKind, Workload, estimate, get_model
from vramplan.charts import (
    KIND_COLORS,
    KIND_LABELS,
    Capacity,
    breakdown_spec,
    capacities,
    headroom_table,
    parallel_rows,
    parallel_spec,
    plot_estimate,
    plot_sweep,
    render,
    run_sweep,
    sweep_spec,
    sweep_values,
)
from vramplan.cli import main
from vramplan.errors import UnknownNameError, VramplanError, WorkloadError
from vramplan.units import GiB


def _rows(spec: dict[str, Any], row: str) -> list[dict[str, Any]]:
    return [r for r in spec["data"]["values"] if r["row"] == row]


def test_every_kind_has_one_label_and_one_colour() -> None:
    assert set(KIND_LABELS) == set(MemoryKind) == set(KIND_COLORS)
    assert len(set(KIND_COLORS.values())) == len(MemoryKind)
    assert len(set(KIND_LABELS.values())) == len(MemoryKind)


@pytest.mark.parametrize("options", [{}, {"method": "lora"}, {"task": "infer", "batch_size": 8}])
def test_breakdown_bars_sum_to_the_estimate(options: dict[str, Any]) -> None:
    est = estimate("llama-3.1-8b", **options)
    spec = breakdown_spec(est)
    assert spec == breakdown_spec(est.to_dict())  # an Estimate and its JSON make the same chart
    total = _rows(spec, "total (nvidia-smi)")
    assert sum(r["bytes"] for r in total) == est.total_bytes
    assert [r["kind"] for r in total] == [k.value for k in MemoryKind if est.breakdown[k] > 0]
    for p in est.phases:
        name = f"{p.phase.value} (peak)" if p.phase is est.peak_phase else p.phase.value
        assert sum(r["bytes"] for r in _rows(spec, name)) == p.peak_allocated_bytes
    assert f"{est.total_bytes / GiB:,.2f} GiB" in spec["title"]["text"]
    # the colour scale names only kinds that occur, each with its fixed colour
    color = spec["layer"][0]["encoding"]["color"]["scale"]
    assert dict(zip(color["domain"], color["range"], strict=True)) == {
        KIND_LABELS[k]: KIND_COLORS[k] for k in MemoryKind if any(r["kind"] == k.value for r in spec["data"]["values"])}
    json.dumps(spec)  # plain JSON: the page fetches it


def test_breakdown_refuses_unknown_kinds() -> None:
    data = estimate("gpt2", seq_len=512).to_dict()
    data["breakdown"] = {**data["breakdown"], "mystery": 1}
    with pytest.raises(VramplanError, match="memory kind"):
        breakdown_spec(data)


def test_sweep_values() -> None:
    assert sweep_values(512, 4096) == (512, 1024, 2048, 4096)
    assert sweep_values(1, 6) == (1, 2, 4, 6)
    assert sweep_values(7, 7) == (7,)
    assert sweep_values(100, 10000, steps=3) == (100, 1000, 10000)
    assert sweep_values(1, 4, steps=10) == (1, 2, 3, 4)  # rounded, duplicates dropped
    for lo, hi, steps in ((0, 8, None), (9, 8, None), (1, 8, 0), (1, 8, 65)):
        with pytest.raises(WorkloadError):
            sweep_values(lo, hi, steps)


def test_sweep_grows_and_says_where_each_gpu_runs_out() -> None:
    spec = get_model("llama-3.1-8b").spec
    gpus = capacities(["rtx-4090", "H100 SXM", "rtx-4090"])  # aliases resolve, duplicates go
    assert [g.name for g in gpus] == ["rtx-4090", "h100-sxm"]
    sweep = run_sweep(spec, "llama-3.1-8b", Workload(method=_lora()), "seq-len", sweep_values(256, 16384), gpus)
    totals = [p.estimate.total_bytes for p in sweep.points]
    assert totals == sorted(totals) and len(totals) == 7
    for g in gpus:
        oom, fits = sweep.oom_from(g), sweep.fits_up_to(g)
        for p in sweep.points:
            assert (p.estimate.total_bytes <= g.usable_memory_bytes) == (oom is None or p.value < oom)
        if fits is not None and oom is not None:
            assert fits < oom
    data = sweep.to_dict()
    assert data["over"] == "seq_len" and data["values"] == list(sweep_values(256, 16384))
    assert [p["total_bytes"] for p in data["points"]] == totals
    chart = sweep_spec(sweep)
    capacity = chart["layer"][1]["data"]["values"]
    assert [c["name"] for c in capacity] == ["rtx-4090", "h100-sxm"]
    assert all("out of memory from" in c["gpu"] or "fits every value" in c["gpu"] for c in capacity)
    for p in sweep.points:
        assert sum(r["bytes"] for r in _rows(chart, str(p.value))) == p.estimate.total_bytes


def _lora() -> Any:
    from vramplan.workload import Method

    return Method.LORA


def test_sweep_stops_where_the_model_cannot_go() -> None:
    spec = get_model("gpt2").spec
    sweep = run_sweep(spec, "gpt2", Workload(), "seq-len", sweep_values(256, 4096))
    assert [p.value for p in sweep.points] == [256, 512, 1024]
    assert sweep.stopped is not None and "2048" in sweep.stopped
    with pytest.raises(WorkloadError):
        run_sweep(spec, "gpt2", Workload(), "seq-len", (4096,))
    with pytest.raises(WorkloadError, match="cannot sweep"):
        run_sweep(spec, "gpt2", Workload(), "lora-rank", (1, 2))
    with pytest.raises(UnknownNameError):
        capacities(["rtx-9999"])


def test_headroom_table() -> None:
    est = estimate("llama-3.1-8b", method="qlora")
    rows = headroom_table(est.total_bytes)
    assert {r["class"] for r in rows} == {"consumer", "workstation", "datacenter"}
    for r in rows:
        assert r["headroom_bytes"] == r["usable_memory_bytes"] - est.total_bytes
        assert r["fits"] == (r["headroom_bytes"] >= 0)
    assert all(r["class"] == "consumer" for r in headroom_table(est.total_bytes, "consumer"))


def test_parallel_rows_and_chart() -> None:
    spec = get_model("llama-3.1-8b").spec
    rows = parallel_rows(spec, Workload(), 8)
    assert rows, "data parallel is always modelled"
    ddp = rows[0]
    assert ddp.label.startswith("data parallel")
    assert ddp.total_bytes >= estimate("llama-3.1-8b").total_bytes  # a full replica on every GPU (+ DDP buckets)
    from vramplan.parallel import Layout, estimate_parallel

    assert ddp.total_bytes == estimate_parallel(spec, Workload(), Layout(gpus=8)).total_bytes
    chart = parallel_spec("llama-3.1-8b", estimate("llama-3.1-8b").workload, 8, rows,
                          [Capacity("x", "X", "datacenter", 80 * GiB)])
    for r in rows:
        assert sum(d["bytes"] for d in _rows(chart, r.label)) == sum(r.breakdown.values())
    assert chart["layer"][1]["data"]["values"][0]["gib"] == 80.0


def test_cli_sweep_json_matches_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sweep", "mistral-7b", "--over", "batch-size", "--range", "1:8", "--task", "infer",
               "--gpu", "rtx-4090", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(out)
    spec = get_model("mistral-7b").spec
    from vramplan.api import make_workload

    expected = run_sweep(spec, "mistral-7b", make_workload(task="infer"), "batch-size", (1, 2, 4, 8),
                         capacities(["rtx-4090"])).to_dict()
    assert data == expected
    assert data["workload"]["batch_size"] == 1 and data["gpus"][0]["name"] == "rtx-4090"


def test_cli_sweep_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "gpt2", "--over", "seq-len", "--range", "8:2"]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "gpt2", "--over", "seq-len", "--range", "abc"])
    assert "A:B" in capsys.readouterr().err
    assert main(["sweep", "gpt2", "--over", "seq-len", "--range", "256:512", "--gpu", "rtx-40900"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_cli_sweep_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "gpt2", "--over", "seq-len", "--range", "256:2048", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert "nvidia-smi GiB" in out and "T4" in out and "stopped before seq_len = 2048" in out


# ----------------------------------------------------------------------------------------- rendering


def test_render_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(VramplanError, match=r"\.png or \.svg"):
        render({}, tmp_path / "chart.pdf")


def test_render_without_the_extra_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # import fails as if not installed
    with pytest.raises(VramplanError, match=r"pip install 'vramplan\[web\]'"):
        plot_estimate(estimate("gpt2", seq_len=512), tmp_path / "x.svg")


def test_plot_estimate_svg_and_png(tmp_path: Path) -> None:
    pytest.importorskip("vl_convert")
    est = estimate("llama-3.1-8b", method="lora")
    svg = plot_estimate(est, tmp_path / "breakdown.svg").read_text(encoding="utf-8")
    assert svg.startswith("<svg") and "llama-3.1-8b" in svg
    # the bars carry their values: the weights bar of the total row says its GiB
    weights = round(est.breakdown[MemoryKind.WEIGHTS] / GiB, 3)
    assert f'aria-label="total (nvidia-smi) — weights: {weights} GiB"' in svg
    png = plot_estimate(est, tmp_path / "breakdown.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_sweep_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vl_convert")
    out = tmp_path / "sweep.svg"
    assert main(["sweep", "llama-3.1-8b", "--over", "seq-len", "--range", "512:8192", "--method", "lora",
                 "--gpu", "rtx-4090", "--plot", str(out)]) == 0
    svg = out.read_text(encoding="utf-8")
    assert "memory vs sequence length" in svg and "RTX 4090" in svg
    assert capsys.readouterr().out == ""  # --plot alone prints nothing
    spec = get_model("llama-3.1-8b").spec
    sweep = run_sweep(spec, "llama-3.1-8b", Workload(method=_lora()), "seq-len", (512, 1024), capacities(["t4"]))
    assert plot_sweep(sweep, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_estimate_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vramplan estimate … --plot FILE`` (the hook in cli.py calls charts.plot_estimate)."""
    pytest.importorskip("vl_convert")
    out = tmp_path / "est.svg"
    try:
        rc = main(["estimate", "gpt2", "--seq-len", "512", "--plot", str(out), "--json"])
    except SystemExit:
        if "--plot" in capsys.readouterr().err:
            pytest.skip("vramplan estimate has no --plot yet (cli.py hook)")
        raise
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    svg = out.read_text(encoding="utf-8")
    assert f"{data['total_bytes'] / GiB:,.2f} GiB on the GPU" in svg


# ----------------------------------------------------------------------------------------- vramplan serve


def test_serve_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the [web] extra were not installed
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'vramplan[web]'" in err


def test_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--port", "70000"])
    assert "not a port number" in capsys.readouterr().err
    from vramplan.cli.web import DEFAULT_HOST, _is_loopback

    assert DEFAULT_HOST == "127.0.0.1"
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
