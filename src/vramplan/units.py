"""Byte units. Integer bytes inside; units only at display, named for what they divide by."""

from __future__ import annotations

__all__ = ["GiB", "KiB", "MiB", "TiB", "format_bytes", "parse_bytes"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {
    "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}


def format_bytes(n: int, unit: str = "GiB", digits: int = 2) -> str:
    """Render ``n`` bytes in a binary (GiB = 2**30) or decimal (GB = 10**9) unit."""
    try:
        div = _UNITS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}; use one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB") from None
    return f"{n / div:,.{digits}f} {unit}"


def parse_bytes(text: str) -> int:
    """Parse '24GiB', '80 GB', '1024' (bytes). Unknown units are rejected, never guessed."""
    s = text.strip().replace(" ", "").lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):] or "b"
    if unit not in _UNITS:
        raise ValueError(f"unknown unit in {text!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value < 0:
        raise ValueError(f"negative size: {text!r}")
    return int(value * _UNITS[unit])
