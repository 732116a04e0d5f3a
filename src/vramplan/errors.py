"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations

__all__ = ["ConfigError", "UnknownNameError", "VramplanError", "WorkloadError"]


class VramplanError(Exception):
    """Base class. The CLI prints ``str(err)`` on one line and exits with status 2."""


class ConfigError(VramplanError):
    """A model config.json that cannot be read or describes an impossible model."""


class UnknownNameError(VramplanError):
    """A model, GPU or option name that is not known; the message carries suggestions."""


class WorkloadError(VramplanError):
    """A workload that cannot run as described (bad sizes, incompatible options)."""
