"""The vision and diffusion catalog (``vramplan/data/vision_models.json``): models by the names people use.

Each record holds the model's own configuration (diffusers / transformers config.json fields, torchvision
constructor arguments, StyleGAN2-ADA ``--cfg=auto`` settings), its exact parameter count (checked against
the libraries, see ``params_source``), its source and the date it was retrieved. Pure standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from .._files import package_data, read_text_limited
from ..errors import ConfigError, UnknownNameError
from ..hfconfig import MAX_CONFIG_BYTES

__all__ = ["VisionEntry", "get_vision_model", "list_vision_models", "lookup"]

_KINDS = ("unet", "dit", "pipeline", "vae", "text_encoder", "backbone", "stylegan")


@dataclass(frozen=True, slots=True)
class VisionEntry:
    name: str
    kind: str  # one of _KINDS
    params: int
    config: Mapping[str, Any]
    aliases: tuple[str, ...] = ()
    hf_id: str = ""
    source: str = ""
    pipeline: str = ""  # denoisers: the pipeline they belong to

    @property
    def estimable(self) -> bool:
        """Whether ``vramplan estimate`` takes this entry directly (VAEs and text encoders are components)."""
        return self.kind not in ("vae", "text_encoder")


@cache
def _load() -> dict[str, VisionEntry]:
    text = package_data("data", "vision_models.json").read_text(encoding="utf-8")
    data = json.loads(text)
    out: dict[str, VisionEntry] = {}
    for rec in data["models"]:
        e = VisionEntry(name=rec["name"], kind=rec["kind"], params=int(rec["params"]), config=rec["config"],
                        aliases=tuple(rec.get("aliases", ())), hf_id=rec.get("hf_id", ""), source=rec.get("source", ""),
                        pipeline=rec.get("pipeline", ""))
        if e.kind not in _KINDS:
            raise ConfigError(f"vision catalog: unknown kind {e.kind!r} for {e.name}")
        out[e.name] = e
    return out


@cache
def _index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for e in _load().values():
        for key in (e.name, *e.aliases, e.hf_id if e.kind == "pipeline" else ""):
            if key:
                idx.setdefault(key.lower(), e.name)
    return idx


def lookup(name: str) -> VisionEntry | None:
    """The entry for a name, alias or (for pipelines) Hugging Face id, case-insensitively; None if unknown."""
    key = _index().get(name.strip().lower())
    return _load()[key] if key else None


def get_vision_model(name: str) -> VisionEntry:
    e = lookup(name)
    if e is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(_index()), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown vision model {name!r}{hint} (vramplan models lists all)")
    return e


def list_vision_models(kind: str | None = None) -> list[VisionEntry]:
    return [e for e in _load().values() if kind is None or e.kind == kind]


def component(name: str) -> VisionEntry:
    e = _load().get(name)
    if e is None:
        raise ConfigError(f"vision catalog: missing component {name}")
    return e


def config_file_entry(path: str) -> VisionEntry | None:
    """A diffusers model config.json (UNet2DConditionModel, a transformer) given by path, as an entry."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not (p.endswith(".json") and os.path.isfile(p)):
        return None
    try:
        data = json.loads(read_text_limited(p, MAX_CONFIG_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    cls = data.get("_class_name")
    kind = {"UNet2DConditionModel": "unet", "Transformer2DModel": "dit", "PixArtTransformer2DModel": "dit",
            "SD3Transformer2DModel": "dit", "FluxTransformer2DModel": "dit"}.get(str(cls))
    if kind is None:
        return None
    name = os.path.basename(os.path.dirname(os.path.abspath(p))) or str(cls)
    return VisionEntry(name=name, kind=kind, params=0, config=data)
