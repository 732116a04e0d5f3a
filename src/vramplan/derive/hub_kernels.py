"""Which model types' RMSNorm transformers' hub kernels replace: written from the installed transformers' source text.

    python -m vramplan.derive.hub_kernels          # print the model types and their decorated norm classes
    python -m vramplan.derive.hub_kernels --write  # write vramplan/data/hub_kernels.json

transformers >= 5.25 kernelizes models in ``from_pretrained`` by default (modeling_utils.py: ``use_kernels`` None ->
True unless the environment variable ``USE_HUB_KERNELS`` says no; ``model.train()`` re-kernelizes for training): a
class decorated ``@use_kernel_forward_from_hub("RMSNorm")`` then runs kernels-community's ``LigerRMSNorm``
(integrations/hub_kernels.py ``_build_kernel_mapping``: "liger-kernels", training and inference, CUDA and ROCm).

A model directory is listed when a decorated class is instantiated inside one of its decoder layer classes (a class
named ``...DecoderLayer``, ``...Layer`` or ``...Block`` that is not a vision, audio, patch or encoder class), whatever
the attribute (``input_layernorm``, ``attention_layernorm``, ``operator_norm``, a ``ModuleList`` of them); it is
listed under every ``model_type`` its configuration files declare (a vision-language model's text config included),
with those class names. The source text is read, no module is imported (no torch needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

_DECORATED = re.compile(r'@use_kernel_forward_from_hub\(\s*"RMSNorm"\s*\)\s*\nclass\s+(\w+)')
_CLASS = re.compile(r"^class\s+(\w+)", re.MULTILINE)
_MODEL_TYPE = re.compile(r'^\s+model_type\s*(?::\s*str\s*)?=\s*"([\w-]+)"', re.MULTILINE)
_LAYER_NAME = re.compile(r"(DecoderLayer|Layer|Block)$")
_NOT_TEXT = re.compile(r"Vision|Visual|Audio|Patch|Encoder|Vit|Speech|Image")
DATA = Path(__file__).resolve().parents[1] / "data" / "hub_kernels.json"


def _class_bodies(text: str) -> dict[str, str]:
    starts = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)]
    return {name: text[a:b] for (a, name), (b, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True)}


def decoder_norm_classes(text: str) -> list[str]:
    """The decorated RMSNorm classes a modeling file's text decoder layers instantiate."""
    decorated = set(_DECORATED.findall(text))
    if not decorated:
        return []
    used: set[str] = set()
    for name, body in _class_bodies(text).items():
        if name in decorated or not _LAYER_NAME.search(name) or _NOT_TEXT.search(name):
            continue
        used.update(c for c in decorated if re.search(rf"\b{c}\(", body))
    return sorted(used)


def rmsnorm_kernel_types(models_dir: Path) -> dict[str, list[str]]:
    """{model_type: the decorated norm classes its decoder layers use}, for every model type a listed directory's
    configuration files declare."""
    out: dict[str, list[str]] = {}
    for directory in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        classes: set[str] = set()
        for path in sorted(directory.glob("modeling_*.py")):
            classes.update(decoder_norm_classes(path.read_text(encoding="utf-8", errors="replace")))
        if not classes:
            continue
        types = {directory.name}
        for path in sorted(directory.glob("configuration_*.py")):
            types.update(_MODEL_TYPE.findall(path.read_text(encoding="utf-8", errors="replace")))
        for t in types:
            out[t] = sorted(classes)
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {DATA.name}")
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("error: reading transformers' source needs transformers installed: pip install 'vramplan[torch]'",
              file=sys.stderr)
        return 2
    models = Path(transformers.__file__).parent / "models"
    types = rmsnorm_kernel_types(models)
    if not args.write:
        for t, cls in types.items():
            print(f"{t:32s} {', '.join(cls)}")
        return 0
    data = {
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "source": "transformers/models/*/modeling_*.py: classes decorated @use_kernel_forward_from_hub(\"RMSNorm\") "
                  "that the text decoder layers instantiate, listed under every model_type of the directory's "
                  "configuration files; integrations/hub_kernels.py _build_kernel_mapping maps RMSNorm to "
                  "kernels-community/liger-kernels LigerRMSNorm (training and inference, cuda/rocm)",
        "rmsnorm": types,
    }
    DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(types)} model types to {DATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
