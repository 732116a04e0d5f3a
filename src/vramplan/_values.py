"""Numbers, switches and names as people and JSON give them: checked once, for the CLI, the API and the page.

``parse_*`` take text (a command-line value) and raise ``ValueError`` with the reason; ``as_*`` take
values that arrive typed (the Python API, JSON bodies, query strings) and raise
:class:`~vramplan.errors.VramplanError` naming the field. Both refuse what no size can be: NaN, infinities,
numbers beyond :data:`MAX_NUMBER`, and integers spelled with a fraction.
"""

from __future__ import annotations

import math
import os
from pathlib import PurePath
from typing import Any

from .errors import VramplanError

__all__ = ["MAX_INT", "MAX_NAME", "MAX_NUMBER", "as_bool", "as_float", "as_int", "as_name", "parse_float",
           "parse_int"]

MAX_INT = 1 << 62  # beyond any count of tokens, bytes or GPUs; keeps every product finite as a float
MAX_NUMBER = 1e15  # floats: GiB, epochs, dollars, fractions — a quadrillion is past any real value
MAX_NAME = 1024  # characters in a model name, path or option string


def parse_int(text: str) -> int:
    """Integers as people type them: 2048, 2_048, 1e6, 4.0; ValueError with the reason otherwise."""
    s = text.strip().replace("_", "")
    if len(s) > 64:
        raise ValueError(f"{text[:40]!r}… is not an integer")
    try:
        return _bounded_int(int(s))
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if math.isinf(value):
        raise ValueError(f"{text!r} is out of range (at most {MAX_INT:.3g})")
    if math.isnan(value) or value != int(value):
        raise ValueError(f"{text!r} is not an integer")
    return _bounded_int(int(value))


def _bounded_int(value: int) -> int:
    if abs(value) > MAX_INT:
        raise ValueError(f"{value:.3g} is out of range (at most {MAX_INT:.3g})")
    return value


def parse_float(text: str) -> float:
    """A finite number no larger than :data:`MAX_NUMBER` in magnitude; ValueError with the reason otherwise."""
    s = text.strip()
    if len(s) > 64:
        raise ValueError(f"{text[:40]!r}… is not a number")
    try:
        value = float(s.replace("_", ""))
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    return _bounded_float(value, text)


def _bounded_float(value: float, shown: object) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{shown!r} is not a finite number")
    if abs(value) > MAX_NUMBER:
        raise ValueError(f"{value:.3g} is out of range (at most {MAX_NUMBER:.0e})")
    return value


# ------------------------------------------------------------- values that arrive typed (API, JSON)


def as_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer option from Python or JSON: ints, integral floats and numeric strings; else VramplanError."""
    if isinstance(value, bool):
        raise VramplanError(f"{name} must be an integer, got {value!r}")
    try:
        if isinstance(value, int):
            out = _bounded_int(value)
        elif isinstance(value, float):
            out = parse_int(repr(value))
        elif isinstance(value, str):
            out = parse_int(value)
        else:
            raise ValueError(f"got {type(value).__name__} {_short(value)}")
    except ValueError as exc:
        raise VramplanError(f"{name} must be an integer: {exc}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise VramplanError(f"{name} = {out} is out of range; use {_range(lo, hi)}")
    return out


def as_float(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False) -> float:
    """A number option from Python or JSON: finite, bounded; numeric strings accepted; else VramplanError."""
    if isinstance(value, bool):
        raise VramplanError(f"{name} must be a number, got {value!r}")
    try:
        if isinstance(value, int | float):
            out = _bounded_float(float(value), value)
        elif isinstance(value, str):
            out = parse_float(value)
        else:
            raise ValueError(f"got {type(value).__name__} {_short(value)}")
    except (ValueError, OverflowError) as exc:
        raise VramplanError(f"{name} must be a number: {exc}") from None
    if (lo is not None and (out < lo or (lo_open and out == lo))) or (hi is not None and out > hi):
        low = f"more than {lo}" if lo_open else f"at least {lo}"
        bounds = low if hi is None else f"{low} and at most {hi}" if lo is not None else f"at most {hi}"
        raise VramplanError(f"{name} = {out} is out of range; use a number {bounds}")
    return out


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def as_bool(name: str, value: Any) -> bool:
    """A switch: True/False, 0/1, or the strings true/false/yes/no/on/off — never "any non-empty string"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise VramplanError(f"{name} must be true or false, got {_short(value)}")


def as_name(name: str, value: Any) -> str:
    """A model/GPU name or path: a str or os.PathLike, of sane length, without NUL bytes."""
    if isinstance(value, PurePath | os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) or not isinstance(value, str):
        raise VramplanError(f"{name} must be a name or a path, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise VramplanError(f"{name} is empty; give a catalog name (vramplan models) or a config.json path")
    if len(value) > MAX_NAME:
        raise VramplanError(f"{name} is {len(value):,} characters long; names and paths are at most {MAX_NAME}")
    if "\x00" in value:
        raise VramplanError(f"{name} contains a NUL character")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"
