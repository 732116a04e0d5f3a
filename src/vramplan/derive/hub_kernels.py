"""Which model types' RMSNorm transformers' hub kernels replace: written from the installed transformers' source text.

    python -m vramplan.derive.hub_kernels          # print the model types
    python -m vramplan.derive.hub_kernels --write  # write vramplan/data/hub_kernels.json

transformers >= 5.25 kernelizes models in ``from_pretrained`` by default (modeling_utils.py: ``use_kernels`` None ->
True unless the environment variable ``USE_HUB_KERNELS`` says no; ``model.train()`` re-kernelizes for training): a
class decorated ``@use_kernel_forward_from_hub("RMSNorm")`` then runs kernels-community's ``LigerRMSNorm``
(integrations/hub_kernels.py ``_build_kernel_mapping``: "liger-kernels", training and inference, CUDA and ROCm).
A model type is listed when the class its decoder layers use for ``input_layernorm`` carries that decorator (the
same class serves the post-attention, final and per-head q/k norms of those files). The source text is read, no
module is imported (no torch needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

_DECORATED = re.compile(r'@use_kernel_forward_from_hub\(\s*"RMSNorm"\s*\)\s*\nclass\s+(\w+)')
_INPUT_NORM = re.compile(r"self\.input_layernorm\s*=\s*(\w+)\(")
DATA = Path(__file__).resolve().parents[1] / "data" / "hub_kernels.json"


def rmsnorm_kernel_types(models_dir: Path) -> dict[str, str]:
    """{model_type directory: the decorated class its decoder layers normalise with}."""
    out: dict[str, str] = {}
    for path in sorted(models_dir.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        decorated = set(_DECORATED.findall(text))
        if not decorated:
            continue
        used = [c for c in _INPUT_NORM.findall(text) if c in decorated]
        if used:
            out.setdefault(path.parent.name, used[0])
    return out


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
            print(f"{t:32s} {cls}")
        return 0
    data = {
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "source": "transformers/models/*/modeling_*.py: the class assigned to input_layernorm decorated "
                  "@use_kernel_forward_from_hub(\"RMSNorm\"); integrations/hub_kernels.py _build_kernel_mapping maps "
                  "RMSNorm to kernels-community/liger-kernels LigerRMSNorm (training and inference, cuda/rocm)",
        "rmsnorm": types,
    }
    DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(types)} model types to {DATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
