"""A pure-Python reader of GGUF headers: metadata and tensor types, never the tensor data.

The format is ggml's ``docs/gguf.md``: magic ``GGUF``, version (2 or 3), tensor count and metadata count as
uint64, the metadata key/value pairs (typed: integers, floats, bool, strings, arrays), then one record per
tensor (name, dimensions, ggml type, data offset), then the data aligned to ``general.alignment`` (32).
Tensor bytes follow ggml's block layouts (``ggml/src/ggml.c: type_traits``, block structs in
``ggml/src/ggml-common.h``): a row of ``ne0`` elements takes ``ne0 / block_size * type_size`` bytes.

Every read is bounded and every count, length and offset is checked against the file's size; a malformed
file raises :class:`ConfigError` with one line. Big arrays (the tokenizer's vocabulary) are skipped, not
kept: only their length is recorded.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._files import NotAFile, open_regular
from .errors import ConfigError

__all__ = ["GGML_TYPES", "GGUFFile", "GGUFTensor", "read_gguf"]

# ggml type id: (name, elements per block, bytes per block) — ggml.h enum ggml_type and ggml-common.h blocks
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
TYPE_BY_NAME = {name.lower(): (tid, bs, ts) for tid, (name, bs, ts) in GGML_TYPES.items()}

_MAGIC = b"GGUF"
_MAX_STRING = 1 << 24  # no metadata string is 16 MiB
_MAX_ARRAY = 1 << 26
_MAX_TENSORS = 1 << 20
_MAX_KV = 1 << 16
_MAX_DIMS = 4
_KEEP_ARRAY = 4096  # arrays up to this length are kept (per-layer head counts …); longer ones are skipped
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def row_bytes(type_id: int, ne0: int) -> int:
    """``ggml_row_size``: bytes of a row of ``ne0`` elements of ``type_id``."""
    _, bs, ts = GGML_TYPES[type_id]
    return ts * ne0 // bs


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # ggml order: ne0 (the contiguous row) first

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def nbytes(self) -> int:
        _, bs, ts = GGML_TYPES[self.type_id]
        return math.prod(self.shape[1:]) * (self.shape[0] // bs) * ts


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any] = field(hash=False)
    array_lengths: dict[str, int] = field(hash=False)  # skipped arrays: their lengths
    tensors: tuple[GGUFTensor, ...]
    file_bytes: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ConfigError(f"{self.path}: no general.architecture in the GGUF metadata")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        """``{arch}.key`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class _Reader:
    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {what}; the GGUF file is malformed or truncated")

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise self.fail(f"a field of {n} bytes runs past the end of the file at byte {self.f.tell()}")
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail("short read")
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise self.fail(f"a string of {n} bytes")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.scalar("<Q")
        if n > _MAX_STRING or self.f.tell() + n > self.size:
            raise self.fail(f"a string of {n} bytes")
        self.f.seek(n, 1)

    def value(self, vtype: int, key: str, lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype = self.scalar("<I")
            n = self.scalar("<Q")
            if n > _MAX_ARRAY:
                raise self.fail(f"metadata array {key!r} claims {n} items")
            lengths[key] = n
            if itype in _SCALARS:
                width = struct.calcsize(_SCALARS[itype])
                if n > _KEEP_ARRAY:
                    self.read_skip(n * width)
                    return None
                return list(struct.unpack(f"<{n}{_SCALARS[itype][1]}", self.read(n * width)))
            if itype == 8:
                if n > _KEEP_ARRAY:
                    for _ in range(n):
                        self.skip_string()
                    return None
                return [self.string() for _ in range(n)]
            raise self.fail(f"metadata array {key!r} has item type {itype}")
        raise self.fail(f"metadata {key!r} has unknown value type {vtype}")

    def read_skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise self.fail(f"an array of {n} bytes runs past the end of the file")
        self.f.seek(n, 1)


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor records of a GGUF file (headers only; sizes checked against the file)."""
    p = Path(path)
    try:
        f = open_regular(p)
        size = os.fstat(f.fileno()).st_size
    except NotAFile as exc:
        raise ConfigError(f"{exc}; give a .gguf model file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    with f:
        r = _Reader(f, str(p), size)
        if size < 24 or r.read(4) != _MAGIC:
            raise ConfigError(f"{p}: not a GGUF file (no 'GGUF' magic); give a .gguf model file")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ConfigError(f"{p}: GGUF version {version} is not supported (2 or 3); re-convert the model")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
            raise r.fail(f"{n_tensors} tensors / {n_kv} metadata entries")
        meta: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I"), key, lengths)
        records: list[tuple[GGUFTensor, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            type_id = r.scalar("<I")
            offset = r.scalar("<Q")
            if type_id not in GGML_TYPES:
                raise ConfigError(f"{p}: tensor {name!r} has ggml type {type_id}, unknown to vramplan "
                                  f"(known: {', '.join(n for n, _, _ in GGML_TYPES.values())})")
            if shape[0] % GGML_TYPES[type_id][1] or any(d > 1 << 40 for d in shape):
                raise r.fail(f"tensor {name!r} shape {list(shape)} does not fit its {GGML_TYPES[type_id][0]} blocks")
            records.append((GGUFTensor(name, type_id, shape), offset))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise r.fail(f"general.alignment {align!r} is not a power of two")
        data_start = -(-f.tell() // align) * align
        for t, offset in records:
            if data_start + offset + t.nbytes > size:
                raise r.fail(f"tensor {t.name!r} ({t.nbytes} bytes at offset {offset}) runs past the end of the file")
    return GGUFFile(str(p), version, meta, lengths, tuple(t for t, _ in records), size)
