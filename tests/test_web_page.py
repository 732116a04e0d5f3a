"""The page as people meet it (issue 15), in headless Chromium at desktop (1400×1000) and phone (390×844) width.

Several GPUs lead with the most loaded GPU's memory; the form never covers the results on a phone and every
field is reachable on a desktop; errors clear the previous answer and name the right file; plans follow the
job and show its size; image models get subtitles and a reason where a section is empty. Screenshots of each
view are saved in the test's temporary directory (``docs/make_figures.py`` makes the README's).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from .conftest import CHROMIUM  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")

DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
MULTI = "?model=llama-3.1-8b&method=lora&gpus=8&fsdp=full"


def _page(browser: Any, viewport: dict[str, int]) -> Any:
    context = browser.new_context(viewport=viewport)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    return pg


@pytest.fixture
def desktop(browser: Any) -> Iterator[Any]:
    pg = _page(browser, DESKTOP)
    yield pg
    pg.context.close()
    assert pg.errors == []


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    pg = _page(browser, PHONE)
    yield pg
    pg.context.close()
    assert pg.errors == []


def api(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, method="GET" if body is None else "POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def ready(page: Any, state: str = "ready") -> None:
    page.wait_for_selector(f'#results[data-state="{state}"]', state="attached", timeout=90_000)


def plans_shown(page: Any) -> None:
    page.wait_for_function("() => document.querySelectorAll('#plan-table tbody tr').length > 0 "
                           "|| document.querySelector('#plan-summary').textContent.length > 0", timeout=120_000)


# ----------------------------------------------------------------------------------------- item 1


def test_several_gpus_lead_with_the_most_loaded_gpu(server: str, desktop: Any, tmp_path: Path) -> None:
    est = api(server, "/api/estimate", {"model": "llama-3.1-8b", "method": "lora", "gpus": 8, "fsdp": "full"})
    per_gpu = est["per_gpu"]
    assert per_gpu["total_bytes"] < est["total_bytes"]
    desktop.goto(server + "/" + MULTI)
    ready(desktop)
    assert int(desktop.get_attribute("#total", "data-bytes")) == per_gpu["total_bytes"]
    assert desktop.get_attribute("#total", "data-scope") == "per-gpu"
    assert "per GPU" in desktop.inner_text("#total-label")
    assert f"{est['total_bytes'] / 2**30:,.2f}" in desktop.inner_text("#per-gpu-text")  # the one-GPU figure, small
    # the chosen GPUs are judged by the per-GPU memory: 21 GiB fits a 24 GiB RTX 4090
    verdict = desktop.inner_text("#verdict")
    assert "RTX 4090: fits" in verdict, verdict
    row = desktop.query_selector("#fit-table tbody tr[data-gpu='rtx-4090']")
    assert row.get_attribute("data-fits") == "true"
    # the fit section never shows a raw API error for the layout
    desktop.wait_for_selector("#fit-result tbody tr")
    assert "unknown option" not in desktop.inner_text("#fit-result")
    desktop.screenshot(path=str(tmp_path / "multi-gpu.png"))


def test_fit_section_fits_the_layout_when_fit_takes_gpus(server: str, desktop: Any) -> None:
    schema = api(server, "/api/schema")
    if "gpus" not in {o["name"] for o in schema["commands"].get("fit", [])}:
        pytest.skip("this install's fit answers one GPU only")
    fit = api(server, "/api/fit", {"model": "llama-3.1-8b", "method": "lora", "gpus": 8, "fsdp": "full",
                                   "gpu": "rtx-4090"})
    desktop.goto(server + "/" + MULTI)
    ready(desktop)
    desktop.wait_for_selector("#fit-result tr[data-key='fits']")
    assert desktop.inner_text("#fit-result tr[data-key='fits'] td") == ("yes" if fit["fits"] else "no")
    assert "8 GPUs" in desktop.inner_text("#fit-title")


# ----------------------------------------------------------------------------------------- item 2


def test_phone_form_is_not_sticky_and_nothing_scrolls_sideways(server: str, phone: Any, tmp_path: Path) -> None:
    phone.goto(server + "/" + MULTI)
    ready(phone)
    assert phone.evaluate("getComputedStyle(document.querySelector('#form')).position") == "static"
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide at {PHONE['width']} px"
    # scrolled to the results, the form is out of the way
    phone.evaluate("document.querySelector('#results').scrollIntoView()")
    top = phone.evaluate("document.querySelector('#total').getBoundingClientRect().top")
    form_bottom = phone.evaluate("document.querySelector('#form').getBoundingClientRect().bottom")
    assert form_bottom <= top
    phone.screenshot(path=str(tmp_path / "phone.png"))
    # the plans (the widest table) do not widen the page either
    plans_shown(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_desktop_every_field_is_reachable_with_all_options_open(server: str, desktop: Any) -> None:
    desktop.goto(server + "/" + MULTI)
    ready(desktop)
    desktop.evaluate("document.querySelector('#more').open = true; document.querySelector('#multi').open = true")
    form = desktop.query_selector("#form")
    assert desktop.evaluate("(f) => f.getBoundingClientRect().height <= window.innerHeight", form)
    for selector in ("#opt-gpus", "#opt-fsdp", "#gpu-chips", "#reset", "#opt-lora_rank"):
        box = desktop.eval_on_selector(selector, "e => { e.scrollIntoView({block: 'center'}); "
                                                 "const r = e.getBoundingClientRect(); return [r.top, r.bottom]; }")
        assert box[0] >= 0 and box[1] <= DESKTOP["height"], (selector, box)
    # the options are grouped: several GPUs on their own, image options apart from the rest
    assert desktop.query_selector("#group-parallel #opt-gpus") and desktop.query_selector("#group-parallel #opt-fsdp")
    assert desktop.query_selector("#group-image #opt-resolution")
    assert not desktop.query_selector("#group-extra #opt-gpus")


# ----------------------------------------------------------------------------------------- item 3


def test_an_error_clears_the_previous_answer(server: str, desktop: Any) -> None:
    desktop.goto(server + "/?model=llama-3.1-8b")
    ready(desktop)
    assert desktop.inner_text("#total") != "—"
    desktop.fill("#opt-batch_size", "0")
    ready(desktop, "error")
    assert "batch_size" in desktop.inner_text("#error") or "batch" in desktop.inner_text("#error")
    assert desktop.inner_text("#total") == "—"
    assert desktop.get_attribute("#total", "data-bytes") is None
    assert desktop.query_selector_all("#breakdown-table tbody tr") == []
    assert desktop.query_selector_all("#fit-table tbody tr") == []
    assert desktop.query_selector("#chart-breakdown svg") is None


def test_uploads_name_their_own_file(server: str, desktop: Any, tmp_path: Path) -> None:
    from vramplan.catalog import get_model

    good = tmp_path / "llama-3.2-3b.json"
    good.write_text(json.dumps(get_model("llama-3.2-3b").config_dict()))
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    garbage = tmp_path / "notes.txt"
    garbage.write_text("this is not json {")
    desktop.goto(server + "/")
    ready(desktop)
    desktop.click("label:has(input[name=source][value=config])")
    desktop.set_input_files("#config-file", str(good))
    desktop.wait_for_function("() => document.querySelector('#results').dataset.request?.includes('config')")
    ready(desktop)
    assert "llama-3.2-3b.json" in desktop.inner_text("#cli")
    desktop.set_input_files("#config-file", str(bert))
    ready(desktop, "error")
    message = desktop.inner_text("#error")
    assert "bert" in message and "llama-3.2-3b.json" not in message, message
    assert desktop.inner_text("#total") == "—"
    desktop.set_input_files("#config-file", str(garbage))
    desktop.wait_for_function("() => document.querySelector('#error').textContent.includes('notes.txt')")
    message = desktop.inner_text("#error")
    assert "not a config.json" in message and "Unexpected" not in message, message
    # pasted text is not the last file: the command line says path/to/config.json
    desktop.fill("#config-text", json.dumps(get_model("llama-3.2-3b").config_dict()))
    ready(desktop)
    assert "path/to/config.json" in desktop.inner_text("#cli")
    assert "notes.txt" not in desktop.inner_text("#cli")


# ----------------------------------------------------------------------------------------- item 4


def test_plans_follow_the_job_and_show_its_size(server: str, desktop: Any) -> None:
    desktop.goto(server + "/?model=llama-3.1-8b&method=lora")
    ready(desktop)
    plans_shown(desktop)
    rows = desktop.eval_on_selector_all("#plan-table tbody tr td:first-child", "els => els.map(e => e.textContent)")
    assert rows and all(": lora" in r for r in rows), rows
    job = desktop.inner_text("#plan-job")
    assert "tokens" in job and "per optimizer step" in job, job


def test_inference_plans_show_times_not_zero_hours(server: str, desktop: Any) -> None:
    desktop.goto(server + "/?model=llama-3.1-8b&task=infer")
    ready(desktop)
    plans_shown(desktop)
    times = desktop.eval_on_selector_all("#plan-table tbody tr td:nth-child(3)", "els => els.map(e => e.textContent)")
    assert times and all(t == "—" or t.split()[-1] in ("s", "min", "h", "d") for t in times), times
    assert not any(t.strip() in ("0", "0 h", "0.0 h") for t in times), times
    assert "generated tokens" in desktop.inner_text("#plan-job")
    plan = api(server, "/api/plan", {"model": "llama-3.1-8b", "task": "infer"})
    assert plan["global_batch"] is None and all(p["global_batch"] is None for p in plan["plans"])


# ----------------------------------------------------------------------------------------- item 5


def test_image_models_get_subtitles_and_reasons(server: str, desktop: Any) -> None:
    schema = api(server, "/api/schema")
    if not schema["features"].get("vision"):
        pytest.skip("no image models in this install")
    desktop.goto(server + "/?model=sd15-unet")
    ready(desktop)
    desktop.wait_for_selector("#chart-breakdown svg")
    assert "None" not in desktop.inner_text("#chart-breakdown")
    assert "512 px" in desktop.inner_text("#chart-breakdown")
    seq_drawn = desktop.query_selector("#chart-seq svg") is not None
    if not seq_drawn:
        assert desktop.is_visible("#sweep-note") and desktop.inner_text("#sweep-note")
    plans_shown(desktop)
    assert "not modelled" in desktop.inner_text("#plan-job") or "min" in desktop.inner_text("#plan-table")


# ----------------------------------------------------------------------------------------- the serving job


def test_an_inference_job_shows_the_serving_engine(server: str, desktop: Any) -> None:
    """The 'Serve it' section shows fit --engine's serving object and launch command, as the API answers them."""
    desktop.goto(server + "/?model=llama-3.1-8b&task=infer")
    ready(desktop)
    desktop.wait_for_function("() => document.querySelector('#serve-command').textContent.includes('vllm serve')",
                              timeout=120_000)
    fit = api(server, "/api/fit", {"model": "llama-3.1-8b", "task": "infer", "gpu": "h100-sxm", "engine": "vllm"})
    cells = dict(zip(desktop.eval_on_selector_all("#serve-result tr", "els => els.map(e => e.dataset.key)"),
                     desktop.eval_on_selector_all("#serve-result td", "els => els.map(e => e.textContent)"),
                     strict=True))
    assert cells["gpu_blocks"] == f"{fit['serving']['gpu_blocks']:,}"
    assert cells["max_model_len_fit"] == f"{fit['serving']['max_model_len_fit']:,}"
    assert "max_concurrency" in cells and "kv_cache_bytes" in cells and "decode_tokens_per_s" in cells
    assert desktop.inner_text("#serve-command") == fit["launch_command"]
    desktop.select_option("#serve-engine", "sglang")
    desktop.wait_for_function("() => document.querySelector('#serve-command').textContent.includes('sglang')",
                              timeout=120_000)
    desktop.goto(server + "/?model=llama-3.1-8b")
    ready(desktop)
    assert desktop.eval_on_selector("#serve-section", "e => e.hidden")
