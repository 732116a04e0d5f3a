"""The web page in headless Chromium: what it shows equals the API's and the CLI's answers.

Needs the ``[web]`` extra, Playwright for Python, and Debian's ``chromium`` (no browser is downloaded:
Playwright drives ``/usr/bin/chromium``); skips cleanly without them. A screenshot of the page is
saved in the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from vramplan.charts import KIND_LABELS  # noqa: E402
from vramplan.cli import main  # noqa: E402
from vramplan.kinds import MemoryKind  # noqa: E402
from vramplan.units import GiB  # noqa: E402

from .conftest import CALIBRATION, CHROMIUM  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    refused = "Failed to load resource: the server responded with a status of 422"  # shown on the page instead

    def on_console(msg: Any) -> None:
        if msg.type == "error" and not msg.text.startswith(refused):
            errors.append(msg.text)

    pg.on("console", on_console)
    yield pg
    context.close()
    assert errors == [], errors


def api(base: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def wait_for(page: Any, expected: dict[str, Any]) -> None:
    """Until the page shows the result of exactly this request body."""
    page.wait_for_function(
        """(expected) => {
            const r = document.querySelector('#results');
            if (r.dataset.state !== 'ready' || !r.dataset.request) return false;
            const got = JSON.parse(r.dataset.request);
            const keys = Object.keys(expected);
            return keys.length === Object.keys(got).length
                && keys.every((k) => JSON.stringify(got[k]) === JSON.stringify(expected[k]));
        }""", arg=expected, timeout=30_000)


def shown(page: Any) -> dict[str, Any]:
    """The numbers the page shows, read from the DOM."""
    return {
        "total_bytes": int(page.get_attribute("#total", "data-bytes")),
        "peak_allocated_bytes": int(page.get_attribute("#peak", "data-bytes")),
        "peak_phase": page.get_attribute("#phase", "data-phase"),
        "parameters": int(page.get_attribute("#params", "data-count")),
        "breakdown": {row.get_attribute("data-kind"): int(row.get_attribute("data-bytes"))
                      for row in page.query_selector_all("#breakdown-table tbody tr[data-kind]")},
        "total_text": page.inner_text("#total"),
    }


def chart_bars(page: Any, chart: str) -> list[tuple[str, str, float]]:
    """The bars of a rendered chart as (row, kind label, GiB), from their SVG aria-labels."""
    page.wait_for_selector(f"#{chart} svg", state="attached")
    labels = page.eval_on_selector_all(f"#{chart} svg path[aria-roledescription='bar']",
                                       "els => els.map(e => e.getAttribute('aria-label'))")
    bars = []
    for label in labels:
        m = re.fullmatch(r"(.+) — (.+): ([\d.]+) GiB", label)
        assert m, label
        bars.append((m[1], m[2], float(m[3])))
    return bars


def assert_page_matches(page: Any, est: dict[str, Any]) -> None:
    got = shown(page)
    for key in ("total_bytes", "peak_allocated_bytes", "peak_phase", "parameters"):
        assert got[key] == est[key], key
    assert got["breakdown"] == {k: v for k, v in est["breakdown"].items() if v}
    assert got["total_text"] == f"{est['total_bytes'] / GiB:,.2f} GiB"
    bars = {kind: value for row, kind, value in chart_bars(page, "chart-breakdown") if row == "total (nvidia-smi)"}
    assert bars == {KIND_LABELS[MemoryKind(k)]: round(v / GiB, 3) for k, v in est["breakdown"].items() if v}


def test_page_shows_the_api_and_cli_numbers(server: str, page: Any, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    page.goto(server + "/")
    wait_for(page, {"model": "llama-3.1-8b"})
    est = api(server, "/api/estimate", {"model": "llama-3.1-8b"})
    assert est == cli(capsys, "estimate", "llama-3.1-8b")
    assert_page_matches(page, est)
    assert page.inner_text("#cli") == "vramplan estimate llama-3.1-8b"

    # change model, task and batch size as a person would
    page.select_option("#model", "mistral-7b")
    page.click("label:has(input[name=task][value=infer])")
    page.fill("#opt-batch_size", "4")
    body = {"model": "mistral-7b", "task": "infer", "batch_size": 4}
    wait_for(page, body)
    est = api(server, "/api/estimate", body)
    assert est == cli(capsys, "estimate", "mistral-7b", "--task", "infer", "--batch-size", "4")
    assert_page_matches(page, est)
    assert est["breakdown"]["kv_cache"] > 0 and page.get_attribute("#phase", "data-phase") in ("prefill", "decode")
    assert page.inner_text("#cli") == "vramplan estimate mistral-7b --task infer --batch-size 4"
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 50_000

    # the state is in the URL: the link reproduces the result
    query = page.evaluate("location.search")
    assert re.fullmatch(r"\?model=mistral-7b&task=infer&batch_size=4", query), query
    page.goto(server + "/" + query)
    wait_for(page, body)
    assert_page_matches(page, est)


def test_fit_table_and_sweep_capacity_lines(server: str, page: Any) -> None:
    body = {"model": "llama-3.1-8b", "method": "qlora"}
    page.goto(server + "/?model=llama-3.1-8b&method=qlora&gpu=rtx-4090")
    wait_for(page, body)
    table = api(server, "/api/headroom", body)
    rows = {r.get_attribute("data-gpu"): r for r in page.query_selector_all("#fit-table tbody tr")}
    assert set(rows) == {g["name"] for g in table["gpus"]}
    for g in table["gpus"]:
        assert rows[g["name"]].get_attribute("data-fits") == str(g["fits"]).lower()
        assert int(rows[g["name"]].get_attribute("data-headroom")) == g["headroom_bytes"]
    # the seq-len sweep draws the chosen GPU; clicking a row adds another
    assert "RTX 4090" in page.inner_text("#chart-seq")
    rows["h200"].click()
    wait_for(page, body)
    page.wait_for_function("() => document.querySelector('#chart-seq').textContent.includes('H200')")
    assert "gpu=rtx-4090%2Ch200" in page.evaluate("location.search")
    # the class filter keeps the table to one class
    page.click("label:has(input[name=gpu_class][value=consumer])")
    page.wait_for_function("() => [...document.querySelectorAll('#fit-table tbody tr')].length < 20")
    classes = page.eval_on_selector_all("#fit-table tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
    assert set(classes) == {"consumer"}


def test_uploaded_config_matches_the_cli_on_the_file(server: str, page: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = CALIBRATION / "configs" / "llama-3.2-1b.json"
    page.goto(server + "/")
    wait_for(page, {"model": "llama-3.1-8b"})
    page.click("label:has(input[name=source][value=config])")
    page.set_input_files("#config-file", str(path))
    config = json.loads(path.read_text(encoding="utf-8"))
    body = {"config": config, "config_name": path.name}
    wait_for(page, body)
    est = cli(capsys, "estimate", str(path))
    assert api(server, "/api/estimate", body) == est
    assert_page_matches(page, est)
    # the link carries the config itself
    query = page.evaluate("location.search")
    assert "config=" in query
    page.goto(server + "/" + query)
    wait_for(page, body)
    assert_page_matches(page, est)


def test_bad_input_shows_the_api_message(server: str, page: Any) -> None:
    page.goto(server + "/?model=gpt2&seq_len=1024")
    wait_for(page, {"model": "gpt2", "seq_len": 1024})
    page.fill("#opt-seq_len", "4096")
    page.wait_for_function("() => document.querySelector('#results').dataset.state === 'error'")
    message = page.inner_text("#error")
    assert "1024 positions" in message


def test_fit_plan_and_layouts_when_installed(server: str, page: Any) -> None:
    """The sections of the other modules (vramplan fit / plan, vramplan.parallel) show their API answers."""
    with urllib.request.urlopen(f"{server}/api/schema", timeout=30) as r:
        features = json.loads(r.read())["features"]
    if not (features["fit"] or features["plan"] or features["parallel"]):
        pytest.skip("this install has neither vramplan fit, plan nor parallel layouts")
    body = {"model": "llama-3.1-8b", "method": "lora"}
    page.goto(server + "/?method=lora")
    wait_for(page, body)
    if features["fit"]:
        fit = api(server, "/api/fit", {**body, "gpu": "rtx-4090"})
        page.wait_for_selector("#fit-result tr[data-key='fits']")
        assert page.inner_text("#fit-result tr[data-key='fits'] td") == ("yes" if fit["fits"] else "no")
        assert page.inner_text("#fit-result tr[data-key='total_bytes'] td") == f"{fit['total_bytes'] / GiB:,.2f} GiB"
    if features["plan"]:
        plan = api(server, "/api/plan", {"model": "llama-3.1-8b", "method": "lora"})  # plans follow the job
        page.wait_for_function("() => document.querySelectorAll('#plan-table tbody tr').length > 0", timeout=60_000)
        assert plan["plans"] and {p["method"] for p in plan["plans"]} == {"lora"}
        assert page.inner_text("#plan-table tbody tr td") == plan["plans"][0]["summary"]
    chart = api(server, "/api/chart/parallel", {**body, "gpus": 8, "gpu": ["rtx-4090", "a100-40gb-sxm", "h100-sxm"]})
    if features["parallel"] and chart["spec"] is not None:
        page.wait_for_selector("#parallel:not([hidden]) #chart-parallel svg")
        expected = {(d["row"], d["label"]): d["gib"] for d in chart["spec"]["data"]["values"]}
        assert {(row, kind): value for row, kind, value in chart_bars(page, "chart-parallel")} == expected
