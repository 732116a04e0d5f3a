"""Derive architecture recipes from the installed transformers code (``vramplan derive``; needs the [torch]
extra). Importing this package needs no torch; :func:`derive_types` imports it.

See :mod:`vramplan.derive._derive` for the method and :mod:`vramplan.recipes` for how the estimator reads
the recipes it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["RECIPES_DIR", "decoder_only_types", "derive_types", "recipe_file", "write_recipes"]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "data" / "recipes"


def decoder_only_types() -> list[str]:
    """The causal-LM model types of the installed transformers whose config has no vision/audio sub-config."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        subs = " ".join(getattr(CONFIG_MAPPING[t], "sub_configs", None) or {})
        if not any(w in subs for w in ("vision", "vq", "image", "audio", "text_encoder", "speech")):
            out.append(t)
    return out


def derive_types(types: Iterable[str]) -> Iterator[Any]:
    """Derive each type in turn (a :class:`~vramplan.derive._derive.DeriveResult` per type)."""
    from ..loops import LOOP_READERS
    from ._compose import compose
    from ._derive import DeriveResult, _quiet, derive

    for t in types:
        with _quiet():
            try:
                if t in LOOP_READERS:  # looped stacks: the reader's schedule and parameters against the real forward
                    from ._loops import _VARIANTS as LOOP_VARIANTS
                    from ._loops import check_loops

                    problems = check_loops(t)
                    yield DeriveResult(t, None if problems else {
                        "reads_as": f"{t}, looped layer stacks (vramplan.loops): the stack calls, their grad mode and "
                                    "the parameter count checked against the real forward by vramplan.derive._loops",
                        "checked": [f"cycles {v or 'default'}" for v in LOOP_VARIANTS]},
                        "; ".join(problems)[:900])
                    continue
                whole = derive(t)
                if whole.ok:
                    yield whole
                    continue
                parts = compose(t)  # no family computes the whole type: compose it part by part
                yield parts if parts.ok else DeriveResult(
                    t, None, f"as one family: {whole.reason}; part by part: {parts.reason}"[:900], whole.tried)
            except Exception as exc:  # a model the library cannot run at all: refused, with the reason
                msg = " ".join(str(exc).split())[:200]
                yield DeriveResult(t, None, f"derivation failed: {type(exc).__name__}: {msg}")


def recipe_file(version: str) -> Path:
    return RECIPES_DIR / f"transformers-{version}.json"


def write_recipes(results: Iterable[Any], path: Path, version: str, torch_version: str) -> dict[str, Any]:
    """Merge accepted recipes into ``path`` (and drop types now refused); returns the file's content."""
    data: dict[str, Any] = {"transformers": version, "torch": torch_version, "recipes": {}, "refused": {}}
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("refused", {})
    from ..hfconfig import _READERS

    data.setdefault("hand_written", {})
    for r in results:
        if r.model_type in _READERS:  # a hand-written family: the derivation checks it, the reader stays
            data["hand_written"][r.model_type] = (f"derived: reads as {r.recipe['reads_as']}" if r.ok
                                                  else f"not derived: {r.reason}")
            data["refused"].pop(r.model_type, None)  # estimate reads it by hand: not a refusal
            continue
        if r.ok:
            rec = {k: v for k, v in r.recipe.items() if k not in ("model_type", "transformers", "torch")}
            data["recipes"][r.model_type] = rec
            data["refused"].pop(r.model_type, None)
        else:
            data["recipes"].pop(r.model_type, None)
            data["refused"][r.model_type] = r.reason
    data["recipes"] = dict(sorted(data["recipes"].items()))
    data["refused"] = dict(sorted(data["refused"].items()))
    data["hand_written"] = dict(sorted(data["hand_written"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return data
