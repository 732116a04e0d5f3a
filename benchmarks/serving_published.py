"""Print vramplan's serving model against the published engine logs of tests/data/serving_published.json."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gguf_writer import llama_like  # noqa: E402

from vramplan.catalog import resolve_model  # noqa: E402
from vramplan.gguf import read_gguf  # noqa: E402
from vramplan.hfconfig import spec_from_config  # noqa: E402
from vramplan.serving.llamacpp import llamacpp_memory  # noqa: E402
from vramplan.serving.vllm import ServingConfig, serve_memory  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20


def main() -> None:
    data = json.loads((ROOT / "tests" / "data" / "serving_published.json").read_text())
    rows: list[tuple[str, str, float, float]] = []
    for c in data["vllm"]:
        spec = spec_from_config(c["config"], name=c["id"]) if "config" in c else resolve_model(c["model"])[0]
        total = int(c.get("total_memory_gib", 80) * GiB)
        for key, gib in c["checks"].get("weights_gib", {}).items():
            r = serve_memory(spec, ServingConfig(tp=int(key[2:]), max_model_len=4096), total_memory_bytes=total)
            rows.append((c["id"], f"weights/GPU {key} (GiB)", gib, r.weights_bytes / GiB))
        s = c.get("settings", {})
        if "kv_tokens" in c["checks"]:
            version = "0.8" if c["engine_version"].startswith("0.8") else None
            r = serve_memory(spec, ServingConfig(tp=c.get("tp", 1), max_model_len=s.get("max_model_len"),
                                                 engine_version=version), total_memory_bytes=total,
                             gpu_name=c.get("gpu", ""))
            rows.append((c["id"], "KV tokens", c["checks"]["kv_tokens"], r.kv_tokens))
            if "kv_cache_gib" in c["checks"]:
                rows.append((c["id"], "KV cache (GiB)", c["checks"]["kv_cache_gib"], r.kv_cache_bytes / GiB))
            if "max_concurrency" in c["checks"]:
                rows.append((c["id"], "max concurrency", c["checks"]["max_concurrency"], r.max_concurrency))
        if "sglang_tokens" in c["checks"]:
            r = serve_memory(spec, ServingConfig(engine="sglang", tp=c["tp"],
                                                 gpu_memory_utilization=s["sglang_mem_fraction_static"]),
                             total_memory_bytes=total, gpu_name=c.get("gpu", ""))
            rows.append((c["id"], "SGLang pool tokens", c["checks"]["sglang_tokens"], r.kv_tokens))
    with tempfile.TemporaryDirectory() as d:
        for c in data["llama.cpp"]:
            path = Path(d) / "m.gguf"
            llama_like(path, **c["gguf"])
            r = llamacpp_memory(read_gguf(path), n_ctx=c["settings"]["n_ctx"],
                                flash_attn=c["settings"].get("flash_attn", True))
            rows.append((c["id"], "KV buffer (MiB)", c["checks"]["kv_mib"], r.gpu_kv_bytes / MiB))
            published = c["checks"].get("compute_mib", c["checks"].get("compute_mib_floor"))
            rows.append((c["id"], "compute buffer (MiB)", published, r.gpu_compute_bytes / MiB))
    print(f"{'source':<40} {'figure':<26} {'published':>12} {'vramplan':>12} {'error':>8}")
    for src, what, pub, pred in rows:
        print(f"{src:<40} {what:<26} {pub:>12,.2f} {pred:>12,.2f} {(pred - pub) / pub:>+8.1%}")


if __name__ == "__main__":
    main()
