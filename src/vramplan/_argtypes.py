"""argparse value types shared by every command: one-line messages, no tracebacks (rules in :mod:`vramplan._values`)."""

from __future__ import annotations

import argparse

from ._values import parse_float, parse_int

__all__ = ["fraction", "integer", "non_negative_float", "non_negative_int", "positive_float", "positive_int",
           "unit_interval"]


def integer(text: str) -> int:
    """argparse type: an integer (ranges are the caller's to check)."""
    try:
        return parse_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _float(text: str) -> float:
    try:
        return parse_float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def unit_interval(text: str) -> float:
    """A probability in [0, 1), e.g. a dropout rate."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


