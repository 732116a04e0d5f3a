"""Derived architecture recipes: model types the estimator reads through a family it has a program for.

A recipe (package data ``data/recipes/transformers-<version>.json``, written by ``vramplan derive``, see
:mod:`vramplan.derive`) says that a model type of that transformers release computes, ATen op for ATen op,
what one of the hand-written families computes (``reads_as``), and gives the facts (``hfconfig._Facts``) and
the type's own config defaults (what transformers uses for a key a config.json leaves out). It is pure data:
reading it needs no torch. Recipes derived with another transformers release than the installed one are used
with a warning (the spec's ``program_version`` is the release the recipe was derived with). A release's file may
carry a recipe derived with an earlier release, not yet re-derived (its ``transformers`` key names that release).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._files import installed_version, package_data

__all__ = ["Recipe", "recipe_for", "recipe_types", "recipes_version", "refusal_for"]


@dataclass(frozen=True, slots=True)
class Recipe:
    model_type: str
    reads_as: str  # the hand-written family whose program replays this type
    facts: dict[str, Any]  # hfconfig._Facts fields
    defaults: dict[str, Any]  # the type's library-default config (scalars, non-per-layer lists)
    transformers: str  # the release the recipe was derived with


def _version_key(name: str) -> tuple[int, ...]:
    core = name.removeprefix("transformers-").removesuffix(".json")
    return tuple(int(x) if x.isdigit() else 0 for x in core.split("."))


def versioned_data(kind: str) -> dict[str, Any] | None:
    """``data/<kind>/transformers-<release>.json`` for the installed transformers release (same major.minor), else
    the newest shipped; None when none is shipped."""
    # package metadata only (hfconfig.installed_transformers; hfconfig reads the layouts as it loads)
    have = installed_version("transformers")
    folder = package_data("data", kind)
    try:
        names = sorted((p.name for p in folder.iterdir() if p.name.startswith("transformers-")
                        and p.name.endswith(".json")), key=_version_key)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not names:
        return None
    pick = names[-1]
    if have is not None:
        same = [n for n in names if _version_key(n)[:2] == _version_key(have)[:2]]
        if same:
            pick = same[-1]
    data: dict[str, Any] = json.loads((folder / pick).read_text(encoding="utf-8"))
    return data


@lru_cache(maxsize=1)
def _load() -> tuple[str, dict[str, Recipe]]:
    """The recipe file for the installed transformers release (same major.minor), else the newest shipped."""
    data = versioned_data("recipes")
    if data is None:
        return "", {}
    version = str(data["transformers"])
    # a recipe carried over from an earlier release's file (not yet re-derived with this one) names the release it
    # was derived with: its program follows that release
    out = {t: Recipe(model_type=t, reads_as=r["reads_as"], facts=r["facts"], defaults=r["defaults"],
                     transformers=str(r.get("transformers", version))) for t, r in data["recipes"].items()}
    return version, out


def recipe_for(model_type: str) -> Recipe | None:
    """The shipped recipe for ``model_type``, or None."""
    return _load()[1].get(model_type)


def recipe_types() -> tuple[str, ...]:
    return tuple(sorted(_load()[1]))


def recipes_version() -> str:
    """The transformers release of the recipes in use ('' when none are shipped)."""
    return _load()[0]


@lru_cache(maxsize=1)
def _refusals() -> dict[str, str]:
    folder = package_data("data", "recipes")
    version = recipes_version()
    if not version:
        return {}
    try:
        data = json.loads((folder / f"transformers-{version}.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.get("refused", {}).items()}


def refusal_for(model_type: str) -> str | None:
    """Why ``vramplan derive`` refused ``model_type`` (the mechanism it lacks), or None."""
    return _refusals().get(model_type)
