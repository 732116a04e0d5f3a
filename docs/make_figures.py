"""Regenerate the README's figures with vramplan's own commands.

    python docs/make_figures.py

* ``docs/plot-sweep.png``: ``vramplan sweep llama-3.1-8b --over seq-len --range 512:16384 --method lora
  --gpu rtx-4090 --gpu a100-40gb-sxm --gpu h100-sxm --plot docs/plot-sweep.png``
* ``docs/screenshot-page.png``: ``vramplan serve`` on a free loopback port, the page opened in headless
  Chromium (Debian's ``chromium``, driven by Playwright) with LoRA fine-tuning of Llama 3.1 8B, batch 2.
* ``docs/screenshot-multi-gpu.png``: the same job on 8 GPUs with FSDP (full shard): the most loaded GPU first.
* ``docs/screenshot-phone.png``: the multi-GPU page at phone width (390 × 844), scrolled to the answer.
* ``docs/screenshot-serve.png``: inference of Llama 3.1 8B: the "Serve it" section (vLLM on one H100: KV-cache
  blocks, longest context, concurrency, decode speed and the launch command), scrolled to it.

Needs the ``[web]`` extra, ``playwright`` and ``/usr/bin/chromium``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_QUERY = "?model=llama-3.1-8b&method=lora&batch_size=2"
MULTI_QUERY = "?model=llama-3.1-8b&method=lora&gpus=8&fsdp=full"
SERVE_QUERY = "?model=llama-3.1-8b&task=infer"


def plot_sweep() -> Path:
    out = DOCS / "plot-sweep.png"
    subprocess.run([sys.executable, "-m", "vramplan", "sweep", "llama-3.1-8b", "--over", "seq-len",
                    "--range", "512:16384", "--method", "lora", "--gpu", "rtx-4090", "--gpu", "a100-40gb-sxm",
                    "--gpu", "h100-sxm", "--plot", str(out)], check=True)
    return out


def screenshot_page() -> list[Path]:
    from playwright.sync_api import sync_playwright

    spec = importlib.util.spec_from_file_location("web_load", ROOT / "benchmarks" / "web_load.py")
    assert spec and spec.loader
    web_load = importlib.util.module_from_spec(spec)
    sys.modules["web_load"] = web_load  # dataclasses look their module up while the class is made
    spec.loader.exec_module(web_load)
    shots = [("screenshot-page.png", PAGE_QUERY, {"width": 1400, "height": 1150}, None),
             ("screenshot-multi-gpu.png", MULTI_QUERY, {"width": 1400, "height": 1000}, None),
             ("screenshot-phone.png", MULTI_QUERY, {"width": 390, "height": 844}, "#results"),
             ("screenshot-serve.png", SERVE_QUERY, {"width": 1400, "height": 1000}, "#serve-section")]
    made = []
    with web_load.serve() as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
        for name, query, viewport, scroll_to in shots:
            page = browser.new_page(viewport=viewport, device_scale_factor=1)
            page.goto(base + "/" + query)
            page.wait_for_selector('#results[data-state="ready"]', state="attached", timeout=90_000)
            if scroll_to == "#serve-section":  # the serving answer comes from its own request
                page.wait_for_function("() => document.querySelector('#serve-command').textContent"
                                       ".includes('vllm serve')", timeout=120_000)
            page.wait_for_timeout(300)
            if scroll_to:
                page.eval_on_selector(scroll_to, "e => e.scrollIntoView()")
            out = DOCS / name
            page.screenshot(path=str(out))  # the first screen (or the answer, scrolled to)
            page.close()
            made.append(out)
        browser.close()
    return made


if __name__ == "__main__":
    for made in (plot_sweep(), *screenshot_page()):
        print(f"wrote {made.relative_to(ROOT)} ({made.stat().st_size:,} bytes)")
