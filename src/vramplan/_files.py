"""Reading the small text files a user names (config.json, price overrides), bounded by what is read.

A size check on ``stat`` is not enough: devices (``/dev/zero``), ``/proc`` files and pipes report 0 bytes.
Here the bytes actually read are counted, and only regular files and pipes are opened at all.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["FileTooLarge", "NotAFile", "open_regular", "read_text_limited"]


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
