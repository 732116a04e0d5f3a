"""``vramplan derive``: derive architecture recipes from the installed transformers (needs vramplan[torch])."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import VramplanError

__all__ = ["register"]

_MISSING = "vramplan derive needs the [torch] extra: pip install 'vramplan[torch]' (torch, transformers)"


def register(sub: Any) -> None:
    d = sub.add_parser("derive", help="derive estimate recipes for model types from the installed transformers "
                                      "(needs vramplan[torch])")
    d.add_argument("model", nargs="*", metavar="MODEL",
                   help="model types (llama, cwm, …) or config.json paths (their model_type is derived)")
    d.add_argument("--all", action="store_true", help="every decoder-only causal-LM type of the installed transformers")
    d.add_argument("--write", action="store_true",
                   help="merge the results into the package's recipe file for the installed transformers")
    d.add_argument("--out", type=Path, default=None, help="merge the results into this recipe file instead")
    d.add_argument("--json", action="store_true", help="print one JSON object per type")
    d.set_defaults(handler=_cmd_derive)


def _model_type(arg: str) -> str:
    p = Path(arg)
    if p.suffix == ".json" or p.is_dir():
        from .._files import read_text_limited
        from ..hfconfig import MAX_CONFIG_BYTES

        path = p / "config.json" if p.is_dir() else p
        try:
            raw = json.loads(read_text_limited(path, MAX_CONFIG_BYTES))
        except (OSError, ValueError) as exc:
            raise VramplanError(f"{arg}: cannot read a config.json ({exc}); give a model type or a config "
                                "path") from None
        t = raw.get("model_type") if isinstance(raw, Mapping) else None
        if not isinstance(t, str):
            raise VramplanError(f"{arg}: no 'model_type' string; give a Hugging Face config.json")
        return t
    return arg


def _cmd_derive(ns: argparse.Namespace) -> int:
    try:
        import torch
        import transformers
    except ImportError:
        raise VramplanError(_MISSING) from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..derive import decoder_only_types, derive_types, recipe_file, write_recipes

    types = decoder_only_types() if ns.all else [_model_type(m) for m in ns.model]
    if not types:
        raise VramplanError("give model types, config.json paths or --all")
    from ..derive._derive import text_sub_config_class

    for t in types:
        if t not in CONFIG_MAPPING or (t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                       and text_sub_config_class(CONFIG_MAPPING[t]) is None):
            raise VramplanError(f"{t!r} is not a causal-LM model type of transformers {transformers.__version__}")
    path = (ns.out or recipe_file(transformers.__version__)) if ns.write or ns.out else None
    for r in derive_types(types):
        if path is not None:  # merged type by type: a long --all run keeps what it has derived so far
            write_recipes([r], path, transformers.__version__, torch.__version__.split("+")[0])
        if ns.json:
            print(json.dumps({"model_type": r.model_type, "ok": r.ok, "recipe": r.recipe, "refused": r.reason or None}))
        elif r.ok:
            print(f"{r.model_type}: reads as {r.recipe['reads_as']} (checked on {len(r.recipe['checked'])} configs)")
        else:
            print(f"{r.model_type}: refused: {r.reason}")
    if path is not None:
        print(f"wrote {path}")
    return 0
