"""Derived architecture recipes (``vramplan derive``, ``vramplan.recipes``): shipped data read without torch,
exact parameter counts against the meta device, and staleness against the installed transformers."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest

from vramplan import hfconfig
from vramplan.api import estimate, make_workload
from vramplan.errors import ConfigError
from vramplan.hfconfig import _FAMILIES, _Facts, spec_from_config
from vramplan.params import count_params
from vramplan.recipes import _load, recipe_for, recipe_types, recipes_version

TYPES = recipe_types()


def _config(model_type: str) -> dict[str, Any]:
    r = recipe_for(model_type)
    assert r is not None
    return {**r.defaults, "model_type": model_type}


def test_recipes_are_shipped_and_well_formed() -> None:
    assert len(TYPES) >= 1
    assert recipes_version()
    names = {f.name for f in fields(_Facts)}
    for t in TYPES:
        r = recipe_for(t)
        assert r is not None
        assert r.reads_as in _FAMILIES, t
        assert t not in hfconfig._READERS, f"{t} has a hand-written reader and a recipe"
        assert set(r.facts) <= names, t


@pytest.mark.parametrize("model_type", TYPES)
def test_recipe_types_estimate_without_torch(model_type: str) -> None:
    spec = spec_from_config(_config(model_type), model_type)
    assert spec.family == model_type
    est = estimate(spec, make_workload(task="infer", batch_size=1, seq_len=256))
    assert est.peak_allocated_bytes > 0


def test_config_without_the_defaults_uses_the_types_own() -> None:
    """A config.json that leaves a key out gets the type's library default (from the recipe), not the family's."""
    t = TYPES[0]
    full = spec_from_config(_config(t), t)
    cfg = _config(t)
    cfg.pop("tie_word_embeddings", None)
    assert spec_from_config(cfg, t).tie_word_embeddings == full.tie_word_embeddings


def test_unknown_type_still_refused() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        spec_from_config({"model_type": "no_such_arch", "hidden_size": 8}, "x")


def test_version_warning_when_installed_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    t = TYPES[0]
    spec = spec_from_config(_config(t), t)
    assert spec.program_version == ".".join(recipes_version().split(".")[:2])
    monkeypatch.setattr(hfconfig, "installed_transformers", lambda: "9.1.0")
    warning = hfconfig.version_warning(spec)
    assert warning is not None and "9.1.0" in warning


def test_recipe_file_names_its_versions() -> None:
    version, recipes = _load()
    assert version and recipes
    from importlib import resources

    folder = resources.files("vramplan") / "data" / "recipes"
    data = json.loads((folder / f"transformers-{version}.json").read_text())
    assert data["transformers"] == version and data["torch"]
    assert set(data["recipes"]) == set(recipes)


# ---- against the installed transformers (needs torch) -------------------------------------------------------

@pytest.mark.parametrize("model_type", TYPES)
def test_recipe_param_counts_match_meta_device(model_type: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    from tests.test_arch_params import _library_default, _meta_count

    cfg = _library_default(model_type)
    assert count_params(spec_from_config(cfg, model_type)).total == _meta_count(cfg)
    del torch


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES[:3])
def test_shipped_recipes_are_not_stale(model_type: str) -> None:
    """Re-derive a sample with the installed transformers: the shipped recipe must be what it derives."""
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != recipes_version():
        pytest.skip(f"recipes derived with transformers {recipes_version()}, {transformers.__version__} installed")
    from vramplan.derive import derive_types

    (r,) = list(derive_types([model_type]))
    shipped = recipe_for(model_type)
    assert r.ok, r.reason
    assert shipped is not None
    assert r.recipe["reads_as"] == shipped.reads_as
    # a facts field added since (with its default) does not make a recipe stale: compare what the reader builds
    v = recipes_version()
    assert hfconfig._facts_from(r.recipe["facts"], v) == hfconfig._facts_from(shipped.facts, v)
    assert r.recipe["defaults"] == shipped.defaults


def test_a_carried_recipe_follows_the_release_it_was_derived_with() -> None:
    """A release's file may carry a recipe not yet re-derived with it: its program follows the release it names."""
    from importlib import resources

    version, _ = _load()
    data = json.loads((resources.files("vramplan") / "data" / "recipes" / f"transformers-{version}.json").read_text())
    for t, r in data["recipes"].items():
        want = r.get("transformers", version)
        assert recipe_for(t) is not None and recipe_for(t).transformers == want, t  # type: ignore[union-attr]
        spec = spec_from_config(_config(t), t)
        assert spec.program_version == ".".join(str(want).split(".")[:2]), t


def test_a_newer_release_keeps_every_recipe_of_the_previous_one() -> None:
    """A release's recipes file derives, carries (naming the release it came from) or refuses every type the previous
    file has: none is dropped (emu3's text model was, once)."""
    import itertools
    import json

    from vramplan._files import package_data

    folder = package_data("data", "recipes")
    files = sorted((p for p in folder.iterdir() if p.name.startswith("transformers-")),
                   key=lambda p: tuple(int(x) for x in p.name.removeprefix("transformers-").removesuffix(".json")
                                       .split(".")))
    for old, new in itertools.pairwise(files):
        a, b = json.loads(old.read_text(encoding="utf-8")), json.loads(new.read_text(encoding="utf-8"))
        missing = set(a["recipes"]) - set(b["recipes"]) - set(b.get("refused", {}))
        assert not missing, f"{new.name} drops {sorted(missing)} of {old.name}"
