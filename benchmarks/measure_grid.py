"""Measure a grid of new cases on a CUDA GPU and write them in the calibration CSV format.

usage: python benchmarks/measure_grid.py OUT_DIR [--budget-s 420] [--set 1|2]
Writes OUT_DIR/measured.csv (calibration columns + trainable_layers) and OUT_DIR/configs/<model>.json,
and prints each case next to `vramplan estimate`'s prediction. Families and shapes deliberately differ
from the 45 calibration runs, so the grid tests generalisation.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import traceback
from pathlib import Path

from vramplan import get_model, make_workload
from vramplan.estimator import estimate
from vramplan.measure import measure_workload

GiB = 2**30
CASES: list[tuple[str, str, dict[str, object]]] = [
    ("g-qwen3-0.6b-bf16-b4s2048", "qwen3-0.6b", dict(batch_size=4, seq_len=2048)),
    ("g-qwen3-0.6b-amp-b2s2048-ckpt", "qwen3-0.6b", dict(precision="amp-bf16", batch_size=2, seq_len=2048,
                                                          gradient_checkpointing=True)),
    ("g-gemma2-2b-bf16-b2s1024", "gemma-2-2b", dict(batch_size=2, seq_len=1024)),
    ("g-gemma2-2b-bf16-b2s1024-eager", "gemma-2-2b", dict(batch_size=2, seq_len=1024, attention="eager")),
    ("g-phi3mini-lora-all-b1s2048", "phi-3-mini", dict(method="lora", lora_targets="all-linear", batch_size=1,
                                                       seq_len=2048)),
    ("g-pythia1.4b-fp32-b2s1024", "pythia-1.4b", dict(precision="fp32", batch_size=2, seq_len=1024)),
    ("g-opt1.3b-amp-b4s1024", "opt-1.3b", dict(precision="amp-bf16", batch_size=4, seq_len=1024)),
    ("g-gpt2medium-bf16-b8s1024-eager", "gpt2-medium", dict(batch_size=8, seq_len=1024, attention="eager")),
    ("g-llama3b-freeze7-b4s2048", "llama-3.2-3b", dict(method="freeze", trainable_layers=7, batch_size=4,
                                                       seq_len=2048)),
    ("g-llama1b-fp16-fused-b4s2048", "llama-3.2-1b", dict(precision="fp16", optimizer="adamw-fused",
                                                          batch_size=4, seq_len=2048)),
    ("g-qwen2.5-1.5b-lora-qv-b4s2048-ckpt", "qwen2.5-1.5b", dict(method="lora", batch_size=4, seq_len=2048,
                                                                 gradient_checkpointing=True)),
    ("g-mistral7b-lora-amp-b2s2048", "mistral-7b", dict(method="lora", precision="amp-bf16", batch_size=2,
                                                        seq_len=2048)),
    ("g-qwen1.5moe-lora-b2s1024", "qwen1.5-moe-a2.7b", dict(method="lora", batch_size=2, seq_len=1024)),
    ("gi-qwen2.5-1.5b-bf16-b16s2048-all", "qwen2.5-1.5b", dict(task="infer", batch_size=16, seq_len=2048,
                                                                logits="all")),
    ("gi-gemma3-1b-bf16-b8s4096-last", "gemma-3-1b", dict(task="infer", batch_size=8, seq_len=4096)),
    ("gi-llama8b-bf16-b1s16384-last", "llama-3.1-8b", dict(task="infer", batch_size=1, seq_len=16384)),
    ("gi-qwen3-8b-bf16-b4s4096-last", "qwen3-8b", dict(task="infer", batch_size=4, seq_len=4096)),
    ("gi-phi3mini-fp32-b4s1024-all", "phi-3-mini", dict(task="infer", precision="fp32", batch_size=4,
                                                         seq_len=1024, logits="all")),
]

# second round: families whose transformers code has no SDPA path, eager variants, MoE inference
CASES_2: list[tuple[str, str, dict[str, object]]] = [
    ("gi-gptj6b-fp16-b4s2000-all-eager", "gpt-j-6b", dict(task="infer", precision="fp16", batch_size=4,
                                                          seq_len=2000, logits="all", attention="eager")),
    ("g-gptj6b-lora-b1s2048-eager", "gpt-j-6b", dict(method="lora", batch_size=1, seq_len=2048,
                                                     attention="eager")),
    ("g-pythia1.4b-bf16-b4s1024-eager", "pythia-1.4b", dict(batch_size=4, seq_len=1024, attention="eager")),
    ("g-opt1.3b-bf16-b4s1024-eager", "opt-1.3b", dict(batch_size=4, seq_len=1024, attention="eager")),
    ("g-falcon7b-bf16-b1s1024-ckpt", "falcon-7b", dict(batch_size=1, seq_len=1024, gradient_checkpointing=True)),
    ("gi-qwen3-30b-a3b-bf16-b4s2048-last", "qwen3-30b-a3b", dict(task="infer", batch_size=4, seq_len=2048)),
    ("gi-gemma2-9b-bf16-b2s8192-last", "gemma-2-9b", dict(task="infer", batch_size=2, seq_len=8192)),
    ("g-phi4-lora-ckpt-b2s4096", "phi-4", dict(method="lora", lora_targets="all-linear", batch_size=2,
                                               seq_len=4096, gradient_checkpointing=True)),
    ("g-qwen2.5-0.5b-sgd-fp32-b8s1024", "qwen2.5-0.5b", dict(precision="fp32", optimizer="sgd", batch_size=8,
                                                             seq_len=1024)),
]
# third round: gradient accumulation, autocast inference, freeze with tied embeddings, sliding-window training,
# MoE training
CASES_3: list[tuple[str, str, dict[str, object]]] = [
    ("g-llama1b-bf16-b4s2048-ga4", "llama-3.2-1b", dict(batch_size=4, seq_len=2048, gradient_accumulation=4)),
    ("gi-llama1b-amp-b8s2048-last", "llama-3.2-1b", dict(task="infer", precision="amp-bf16", batch_size=8,
                                                         seq_len=2048)),
    ("g-llama1b-freeze4-b4s2048", "llama-3.2-1b", dict(method="freeze", trainable_layers=4, batch_size=4,
                                                       seq_len=2048)),
    ("g-gemma3-1b-bf16-b2s4096", "gemma-3-1b", dict(batch_size=2, seq_len=4096)),
    ("g-mistral7b-lora-b1s8192-ckpt", "mistral-7b", dict(method="lora", batch_size=1, seq_len=8192,
                                                         gradient_checkpointing=True)),
    ("g-qwen3-30b-a3b-lora-b1s2048-ckpt", "qwen3-30b-a3b", dict(method="lora", batch_size=1, seq_len=2048,
                                                                 gradient_checkpointing=True)),
    ("g-qwen1.5moe-lora-all-b1s1024", "qwen1.5-moe-a2.7b", dict(method="lora", lora_targets="all-linear",
                                                               batch_size=1, seq_len=1024)),
    ("gi-mistral7b-fp16-b2s8192-all", "mistral-7b", dict(task="infer", precision="fp16", batch_size=2,
                                                          seq_len=8192, logits="all")),
]
SETS = {"1": CASES, "2": CASES_2, "3": CASES_3}

COLUMNS = ["name", "task", "model", "method", "precision", "optim", "batch", "seq", "res", "ckpt", "attn", "r",
           "targets", "new_tokens", "last_logits", "nf4", "train", "device", "torch", "cuda_context_gib", "params",
           "trainable", "weights_gib", "peak_alloc_gib", "peak_reserved_gib", "step_s", "prefill_s",
           "decode_s_per_token", "source", "trainable_layers", "gradient_accumulation", "transformers", "estimate_gib"]


def row_of(name: str, model: str, opts: dict[str, object], m: object, est_bytes: int) -> dict[str, object]:
    w = make_workload(**opts)
    import transformers

    targets = w.lora_targets
    return {
        "name": name, "task": w.task.value, "model": model,
        "method": "" if w.method.value == "full" else w.method.value,
        "precision": w.precision.value, "optim": "" if w.optimizer.value == "adamw" else w.optimizer.value,
        "batch": w.batch_size, "seq": w.seq_len, "res": "", "ckpt": "True" if w.gradient_checkpointing else "",
        "attn": w.attention.value, "r": w.lora_rank if w.uses_adapters else "",
        "targets": "" if targets == ("default",) else "+".join(targets),
        "new_tokens": w.new_tokens if w.task.value == "infer" else "",
        "last_logits": "True" if w.task.value == "infer" and w.logits.value == "last" else "",
        "nf4": "", "train": "", "device": m.device, "torch": m.torch_version,  # type: ignore[attr-defined]
        "cuda_context_gib": round(m.cuda_context_bytes / GiB, 3), "params": m.params,  # type: ignore[attr-defined]
        "trainable": m.trainable or "", "weights_gib": round(m.weights_bytes / GiB, 3),  # type: ignore[attr-defined]
        "peak_alloc_gib": round(m.peak_allocated_bytes / GiB, 3),  # type: ignore[attr-defined]
        "peak_reserved_gib": round(m.peak_reserved_bytes / GiB, 3),  # type: ignore[attr-defined]
        "step_s": round(m.step_s, 4), "prefill_s": round(m.prefill_s, 4),  # type: ignore[attr-defined]
        "decode_s_per_token": round(m.decode_s_per_token, 5),  # type: ignore[attr-defined]
        "source": "vramplan measure_grid", "trainable_layers": w.trainable_layers or "",
        "gradient_accumulation": w.gradient_accumulation if w.gradient_accumulation > 1 else "",
        "transformers": transformers.__version__, "estimate_gib": round(est_bytes / GiB, 3),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    budget = float(argv[argv.index("--budget-s") + 1]) if "--budget-s" in argv else 420.0
    cases = SETS[argv[argv.index("--set") + 1]] if "--set" in argv else CASES
    (out / "configs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    path = out / "measured.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        for name, model, opts in cases:
            if time.time() - t_start > budget:
                print(f"{name}: skipped (time budget)", flush=True)
                continue
            entry = get_model(model)
            config = entry.config_dict()
            (out / "configs" / f"{model}.json").write_text(json.dumps(config, indent=1))
            w = make_workload(**opts)
            est = estimate(entry.spec, w).peak_allocated_bytes
            t0 = time.time()
            try:
                m = measure_workload(config, w)
            except Exception as exc:  # record and go on: one bad case must not lose the rest
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                traceback.print_exc(limit=3)
                continue
            row = row_of(name, model, opts, m, est)
            writer.writerow(row)
            fh.flush()
            err = (est / m.peak_allocated_bytes - 1) * 100
            print(f"{name:40s} measured {m.peak_allocated_bytes / GiB:7.2f} GiB  estimate {est / GiB:7.2f} GiB "
                  f"({err:+.1f}%)  {time.time() - t0:.0f}s", flush=True)
    print(f"done in {time.time() - t_start:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main(sys.argv[1:]))
