"""The built-in catalog: well-known models by the short names people use.

Each entry holds the architecture fields of the model's published Hugging Face ``config.json``
and its exact parameter count (checked against transformers by
``benchmarks/verify_catalog_counts.py``). ``get_model("llama-3.1-8b")`` finds an entry by name,
alias or Hugging Face id, case-insensitively; an entry's ``variants`` are the Hugging Face ids of other checkpoints
(instruct, chat, reasoning releases) whose config.json was read and found equal in every field that moves memory, or
whose model card states the entry's architecture, each with where it was read; they find the entry too.
``resolve_model`` also accepts a path to a local ``config.json``. Pure standard library: no torch, no network.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._files import package_data
from .errors import UnknownNameError
from .hfconfig import load_config_file, spec_from_config
from .spec import ModelSpec

__all__ = ["CatalogEntry", "get_model", "list_models", "resolve_model"]

_DATA = "data/models.json"
_SCHEMA = 1
_HINT = "vramplan models lists all; or pass a path to a config.json"


def _freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become ``MappingProxyType``, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The plain-JSON form of a frozen value (dicts and lists), as ``spec_from_config`` reads it."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model of the catalog; ``config`` holds its Hugging Face config.json fields (read-only)."""

    name: str
    hf_id: str
    aliases: tuple[str, ...]
    params: int
    source: str
    retrieved: str
    config: Mapping[str, Any] = field(hash=False)
    variants: tuple[str, ...] = ()  # Hugging Face ids of checkpoints with this config (data file: id -> where read)
    _spec_cache: dict[str, ModelSpec] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def config_dict(self) -> dict[str, Any]:
        """A plain, mutable copy of the config.json fields."""
        return dict(_thaw(self.config))

    @property
    def spec(self) -> ModelSpec:
        """The model's :class:`ModelSpec`, built from ``config`` on first use and cached."""
        spec = self._spec_cache.get("spec")
        if spec is None:
            spec = spec_from_config(_thaw(self.config), name=self.name)
            self._spec_cache["spec"] = spec
        return spec


def _entry(record: Mapping[str, Any]) -> CatalogEntry:
    return CatalogEntry(
        name=str(record["name"]), hf_id=str(record["hf_id"]),
        aliases=tuple(str(a) for a in record.get("aliases", ())), params=int(record["params"]),
        source=str(record["source"]), retrieved=str(record["retrieved"]), config=_freeze(record["config"]),
        variants=tuple(str(v) for v in record.get("variants", {})),
    )


def _keys(name: str, aliases: tuple[str, ...], hf_id: str, variants: tuple[str, ...]) -> list[str]:
    """Every lowercase string that finds an entry: name, aliases, and each Hugging Face id (hf_id, variants) with
    and without the org."""
    ids = (hf_id, *variants)
    keys = [name, *aliases, *ids, *(i.rpartition("/")[2] for i in ids)]
    return [k.lower() for k in keys]


@cache
def _load() -> tuple[tuple[Mapping[str, Any], ...], Mapping[str, int]]:
    """The data file's records, sorted by name, and the position of the record every key finds. An entry is built
    from its record when it is first asked for (:func:`_entry_at`): one estimate needs one of them."""
    text = package_data(*_DATA.split("/")).read_text(encoding="utf-8")
    doc = json.loads(text)
    if not isinstance(doc, Mapping) or doc.get("schema") != _SCHEMA:
        raise RuntimeError(f"vramplan {_DATA}: expected schema {_SCHEMA}")
    records = tuple(sorted(doc["models"], key=lambda r: str(r["name"])))
    index: dict[str, int] = {}
    for i, r in enumerate(records):
        for key in _keys(str(r["name"]), tuple(str(a) for a in r.get("aliases", ())), str(r["hf_id"]),
                         tuple(str(v) for v in r.get("variants", {}))):
            other = index.setdefault(key, i)
            if other != i:
                raise RuntimeError(f"vramplan {_DATA}: {key!r} names both {records[other]['name']} and {r['name']}")
    return records, MappingProxyType(index)


_ENTRIES: dict[int, CatalogEntry] = {}  # position -> the entry built from that record (one object per entry)


def _entry_at(i: int) -> CatalogEntry:
    entry = _ENTRIES.get(i)
    if entry is None:
        entry = _ENTRIES.setdefault(i, _entry(_load()[0][i]))
    return entry


@cache
def list_models() -> tuple[CatalogEntry, ...]:
    """Every catalog entry, sorted by name."""
    return tuple(_entry_at(i) for i in range(len(_load()[0])))


def _suggestions(query: str, n: int = 3) -> list[str]:
    import difflib

    owner: dict[str, str] = {}
    for entry in list_models():
        for key in (entry.name, *entry.aliases):
            owner.setdefault(key.lower(), entry.name)
    out: list[str] = []
    for match in difflib.get_close_matches(query, list(owner), n=3 * n, cutoff=0.6):
        name = owner[match]
        if name not in out:
            out.append(name)
    return out[:n]


def get_model(name: str) -> CatalogEntry:
    """The entry whose name, alias or Hugging Face id (with or without the org) is ``name``.

    Case-insensitive. Raises :class:`UnknownNameError` with close matches when there is none.
    """
    query = name.strip().lower()
    i = _load()[1].get(query)
    if i is not None:
        return _entry_at(i)
    close = _suggestions(query.rpartition("/")[2] if "/" in query else query)
    maybe = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownNameError(f"unknown model {name!r}{maybe} ({_HINT})")


def resolve_model(name_or_path: str) -> tuple[ModelSpec, CatalogEntry | None]:
    """A spec from a local config.json (file, or directory holding one) or from the catalog.

    Returns the spec and the catalog entry it came from (``None`` for a local file). An existing
    path wins over a catalog name; a name ending in ``.json`` is always read as a file.
    """
    if not isinstance(name_or_path, str) or len(name_or_path) > 4096 or "\x00" in name_or_path:
        raise UnknownNameError(f"model must be a catalog name or a config.json path, got {str(name_or_path)[:60]!r}"
                               f"{'…' if len(str(name_or_path)) > 60 else ''} ({_HINT})")
    path = Path(name_or_path)
    with contextlib.suppress(RuntimeError):  # ~user that does not exist: keep the name as given
        path = path.expanduser()
    if _exists(path, "dir") and _exists(path / "config.json", "file"):
        from .checkpoint import load_model_dir

        return load_model_dir(path), None  # config.json + the safetensors headers beside it
    if name_or_path.lower().endswith(".json") or _exists(path, "file"):
        return load_config_file(path), None
    if _exists(path, "dir") and name_or_path.strip().lower() not in _load()[1]:
        return load_config_file(path), None  # a directory without config.json: say so
    entry = get_model(name_or_path)
    return entry.spec, entry


def _exists(path: Path, kind: str) -> bool:
    """``path.is_file()``/``is_dir()`` that answers False for names the OS refuses (too long, bad bytes)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False
