"""Reading the small text files a user names (config.json, price overrides), bounded by what is read.

A size check on ``stat`` is not enough: devices (``/dev/zero``), ``/proc`` files and pipes report 0 bytes.
Here the bytes actually read are counted, and only regular files and pipes are opened at all.
"""

from __future__ import annotations

import os
import stat
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["FileTooLarge", "NotAFile", "installed_version", "open_regular", "package_data", "read_text_limited"]

_PACKAGE_DIR = Path(__file__).parent


def package_data(*parts: str) -> Path | Traversable:
    """A file or folder shipped inside the package (``package_data("data", "gpus.json")``).

    A plain path next to this module when the package lies on disk (every wheel and editable install); the
    ``importlib.resources`` lookup, whose import pulls in ``zipfile`` and ``tempfile``, only for a zipped package."""
    path = _PACKAGE_DIR.joinpath(*parts)
    if path.exists():
        return path
    from importlib import resources

    return resources.files("vramplan").joinpath(*parts)


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


@lru_cache(maxsize=16)
def installed_version(dist: str) -> str | None:
    """The version of the installed distribution ``dist`` from its metadata on ``sys.path`` (the
    ``NAME-VERSION.dist-info/METADATA`` or ``.egg-info/PKG-INFO`` that ``importlib.metadata.version`` reads, first
    match in path order), or None. Nothing is imported, and ``importlib.metadata`` (with the email parser it loads,
    ~20 ms) only for a distribution that is not a plain folder on the path (a zipped egg)."""
    want = _normalized(dist)
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                names = [e.name for e in it]
        except OSError:
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if not dot or suffix not in ("dist-info", "egg-info") or _normalized(stem.partition("-")[0]) != want:
                continue
            meta = os.path.join(entry or ".", name, "METADATA" if suffix == "dist-info" else "PKG-INFO")
            try:
                with open(meta, encoding="utf-8") as fh:
                    for line in fh:
                        if line.startswith("Version:"):
                            return line.partition(":")[2].strip()
                        if not line.strip():
                            break
            except OSError:
                continue
    if any(e.endswith((".egg", ".zip")) for e in sys.path):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    return None


class NotAFile(OSError):
    """The path names a device, socket or directory, not a file to read."""


class FileTooLarge(ValueError):
    """More than the limit could be read."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading, only when it is a regular file (symbolic links followed).

    Binary formats whose header is checked against the file's length (safetensors, GGUF) need a real size: a pipe
    would block the open and report 0 bytes, a device reads forever. :class:`NotAFile` for anything else; the
    caller bounds each read by the sizes it checked.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a pipe, device or socket, not a file"
        raise NotAFile(f"{os.fspath(path)} is {kind}")
    fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # replaced between the two looks
        fh.close()
        raise NotAFile(f"{os.fspath(path)} is not a regular file")
    return fh


def read_text_limited(path: str | os.PathLike[str], limit: int) -> str:
    """The UTF-8 text of ``path``, at most ``limit`` bytes; :class:`FileTooLarge` beyond that.

    Raises :class:`NotAFile` for devices, sockets and directories (symbolic links are followed first),
    ``OSError`` when the file cannot be opened, and ``UnicodeDecodeError`` for text that is not UTF-8.
    """
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device or socket, not a file"
        raise NotAFile(f"{os.fspath(path)} is {kind}")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"{os.fspath(path)} holds more than {limit:,} bytes")
    return data.decode("utf-8")
