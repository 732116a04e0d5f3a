"""Check every catalog entry's exact parameter count two independent ways.

(a) vramplan: ``count_params(spec_from_config(config)).total`` (pure Python, from the config).
(b) transformers: build the model on the meta device from the same config and sum
    ``p.numel()`` over ``model.parameters()`` (no memory, no download).

Both must equal the ``params`` recorded in ``src/vramplan/data/models.json``, and, where a figure is
widely published (model cards, papers, hub metadata), that figure too. Prints a table; exits 1 on
any mismatch.

    /work/tvenv/bin/python benchmarks/verify_catalog_counts.py [--json PATH] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vramplan.hfconfig import spec_from_config  # noqa: E402
from vramplan.multimodal import MULTIMODAL_TYPES, tower_parameters  # noqa: E402
from vramplan.params import count_params  # noqa: E402

CATALOG = ROOT / "src" / "vramplan" / "data" / "models.json"

# Widely published totals (PyTorch parameter counts as model cards / hub metadata report them).
PUBLISHED: dict[str, int] = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "gpt-j-6b": 6_050_882_784,
    "gpt-neox-20b": 20_554_567_680,
    "pythia-160m": 162_322_944,
    "pythia-1.4b": 1_414_647_808,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "opt-350m": 331_196_416,
    "opt-1.3b": 1_315_758_080,
    "opt-6.7b": 6_658_473_984,
    "bloom-560m": 559_214_592,
    "bloom-7b1": 7_069_016_064,
    "bloom-176b": 176_247_271_424,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-30b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "mixtral-8x7b": 46_702_792_704,
    "mixtral-8x22b": 140_620_634_112,
    "falcon-7b": 6_921_720_704,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    "qwen3-0.6b": 596_049_920,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-1b": 999_885_952,
    "phi-3-mini": 3_821_079_552,
    "phi-3-medium": 13_960_238_080,
    "phi-4": 14_659_507_200,
    # the Hub's safetensors totals as debaditc/kvfit src/kvfit/data/models.json (bd4ccabf91) records them
    "phi-4-mini": 3_836_021_760,
    "nemotron-nano-9b-v2": 8_888_227_328,
}


def vramplan_count(name: str, config: dict[str, Any]) -> int:
    spec = spec_from_config(dict(config), name=name)
    mm = spec.multimodal  # a vision-language model: its tower and projector too
    return count_params(spec).total + (tower_parameters(mm.tower) if mm is not None else 0)


def transformers_count(config: dict[str, Any]) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    # a vision-language config: the image-text class (vision tower + projector + language model)
    auto = AutoModelForImageTextToText if model_type in MULTIMODAL_TYPES else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = auto.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=CATALOG, help="catalog file (default: the packaged one)")
    ap.add_argument("--only", nargs="*", default=None, help="check only these names")
    args = ap.parse_args(argv)

    import transformers

    data = json.loads(args.json.read_text(encoding="utf-8"))
    records = data["models"] if isinstance(data, dict) else data
    if args.only:
        records = [r for r in records if r["name"] in set(args.only)]
    print(f"transformers {transformers.__version__}; {len(records)} models from {args.json}")
    header = f"{'model':<20} {'vramplan':>17} {'transformers':>17} {'catalog':>17} {'published':>17}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for rec in records:
        name, config = rec["name"], rec["config"]
        try:
            a: int | str = vramplan_count(name, config)
        except Exception as exc:  # report and keep going
            a = f"error: {exc}"
        try:
            b: int | str = transformers_count(config)
        except Exception as exc:
            b = f"error: {type(exc).__name__}: {exc}"
        cat = rec.get("params")
        pub = PUBLISHED.get(name)
        problems = []
        if not isinstance(a, int) or not isinstance(b, int):
            problems.append("error")
        elif a != b:
            problems.append(f"vramplan-transformers={a - b:+,}")
        if isinstance(b, int) and cat is not None and cat != b:
            problems.append("catalog differs")
        if isinstance(b, int) and pub is not None and pub != b:
            problems.append(f"published differs by {b - pub:+,}")
        failures += bool(problems)

        def fmt(x: object) -> str:
            return f"{x:,}" if isinstance(x, int) else ("-" if x is None else "ERR")

        print(f"{name:<20} {fmt(a):>17} {fmt(b):>17} {fmt(cat):>17} {fmt(pub):>17}  "
              f"{'; '.join(problems) or 'ok'}")
        for x in (a, b):
            if isinstance(x, str):
                print(f"    {x}")
    print(f"\n{len(records) - failures}/{len(records)} ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
