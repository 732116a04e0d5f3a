"""argparse value types shared by every command: one-line messages, no tracebacks."""

from __future__ import annotations

import argparse

__all__ = ["fraction", "integer", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]


def integer(text: str) -> int:
    """Integers as people type them: 2048, 2_048, 1e6 (ranges are the caller's to check)."""
    try:
        return int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1], e.g. a GPU memory utilization."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value
