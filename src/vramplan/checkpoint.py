"""Read the files people have: a model directory's config.json plus its safetensors headers.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every tensor's
dtype, shape and byte range (huggingface/safetensors, ``docs/source/index.mdx``: "Format"). Only that header
is read — never the weights — so the exact bytes of every tensor, quantized or not, come from the files
themselves. A sharded checkpoint is found through ``model.safetensors.index.json``; when shards are missing
its ``metadata.total_size`` still gives the total. Every size read is checked against the file's length;
anything malformed raises :class:`ConfigError` with one line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._files import FileTooLarge, NotAFile, open_regular, read_text_limited
from .errors import ConfigError
from .quant import DTYPE_BYTES
from .spec import ModelSpec

__all__ = ["CheckpointWeights", "TensorInfo", "load_model_dir", "read_safetensors_header", "summarize"]

MAX_HEADER_BYTES = 100 << 20  # safetensors refuses headers above 100 MB (MAX_HEADER_SIZE)
MAX_SHARDS = 4096
MAX_INDEX_BYTES = 64 << 20  # a weight map of every tensor name is a few MB even for the largest models

# Tensor names (last component) that hold quantization metadata rather than weights.
_CONSTANT_SUFFIXES = ("scales", "qzeros", "g_idx", "weight_scale", "weight_scale_inv", "weight_zero_point",
                      "weight_g_idx", "weight_shape", "input_scale", "input_global_scale", "weight_global_scale",
                      "absmax", "nested_absmax", "quant_map", "nested_quant_map", "SCB", "weight_format", "k_scale",
                      "v_scale", "scale", "zero", "scale_and_zero", "input_zero_point")
# Buffers some checkpoints carry that transformers does not load into the model.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_constant(self) -> bool:
        last = self.name.rsplit(".", 1)[-1]
        return last in _CONSTANT_SUFFIXES or last.endswith("_scales") or ".quant_state." in self.name or \
            "quant_state" in last

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True, slots=True)
class CheckpointWeights:
    """What a checkpoint's headers say, summed: exact bytes, split as the estimator needs them."""

    files: int
    tensors: int
    total_bytes: int  # every tensor's data, as stored
    dense_numel: int  # floating-point weights that are not quantization metadata (loaded in the model dtype)
    dense_bytes: int  # … as stored
    quantized_bytes: int  # packed / low-bit weight tensors (qweight, weight_packed, fp8 weight, *_blocks …)
    constant_bytes: int  # scales, zeros, g_idx, absmax, quant maps …
    dtypes: tuple[tuple[str, int], ...]  # (dtype, bytes) over the checkpoint
    exact: bool = True  # False: some shards were absent and total_bytes comes from the index's total_size

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "tensors": self.tensors, "total_bytes": self.total_bytes,
                "dense_bytes": self.dense_bytes, "quantized_bytes": self.quantized_bytes,
                "constant_bytes": self.constant_bytes, "dtypes": dict(self.dtypes), "exact": self.exact}


def _fail(path: Path | str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {what}")


def read_safetensors_header(path: str | Path) -> list[TensorInfo]:
    """The tensors a .safetensors file holds, from its header alone (bounded reads, sizes checked)."""
    p = Path(path)
    try:
        with open_regular(p) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _fail(p, "too short to be a safetensors file (no 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise _fail(p, f"header length {n} does not fit the file ({size} bytes); the file is truncated or "
                               "not safetensors")
            text = f.read(n)
    except NotAFile as exc:
        raise ConfigError(f"{exc}; give a model directory of safetensors files") from None
    except OSError as exc:
        raise _fail(p, f"cannot read ({exc.strerror})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail(p, "the safetensors header is not valid JSON; re-download the file") from None
    if not isinstance(header, dict):
        raise _fail(p, "the safetensors header is not a JSON object")
    data_len = size - 8 - n
    out: list[TensorInfo] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _fail(p, f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _fail(p, f"tensor {name!r}: dtype {dtype!r} is not supported; supported: "
                           f"{', '.join(sorted(DTYPE_BYTES))}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                                  for d in shape):
            raise _fail(p, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        t = TensorInfo(str(name), dtype, tuple(shape))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise _fail(p, f"tensor {name!r}: data_offsets {offsets!r} fall outside the file's {data_len} data bytes")
        if offsets[1] - offsets[0] != t.nbytes:
            raise _fail(p, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored but {dtype} {shape} needs "
                           f"{t.nbytes}")
        out.append(t)
    return out


def summarize(tensors: list[TensorInfo], files: int, exact: bool = True,
              total_override: int | None = None) -> CheckpointWeights:
    dense_numel = dense = quantized = const = 0
    by_dtype: dict[str, int] = {}
    for t in tensors:
        if t.name.endswith(_SKIPPED_SUFFIXES):
            continue
        b = t.nbytes
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + b
        if t.is_constant:
            const += b
        elif t.is_float:
            dense_numel += t.numel
            dense += b
        else:
            quantized += b
    total = dense + quantized + const
    return CheckpointWeights(files, len(tensors), total_override if total_override is not None else total,
                             dense_numel, dense, quantized, const, tuple(sorted(by_dtype.items())), exact)


def _read_index(path: Path) -> tuple[list[str], int | None]:
    try:
        if not path.is_file():  # a pipe would block the read: only regular files are opened
            raise NotAFile(f"{path} is a pipe, device or socket, not a file")
        raw = json.loads(read_text_limited(path, MAX_INDEX_BYTES))
    except FileTooLarge:
        raise _fail(path, "index file is implausibly large (over 64 MiB)") from None
    except NotAFile as exc:
        raise ConfigError(f"{exc}; give a model directory with its model.safetensors.index.json") from None
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail(path, "not valid JSON; re-download model.safetensors.index.json") from None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise _fail(path, "no weight_map object mapping tensor names to shard files")
    shards = sorted(set(wm.values()))
    if len(shards) > MAX_SHARDS or any(os.sep in s or s.startswith("..") for s in shards):
        raise _fail(path, "weight_map names shard files outside the model directory")
    total = raw.get("metadata", {}).get("total_size") if isinstance(raw.get("metadata"), dict) else None
    return shards, total if isinstance(total, int) and total >= 0 else None


def read_checkpoint(directory: str | Path) -> CheckpointWeights | None:
    """Headers of the directory's safetensors files (via the index when sharded); None when it has none."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards, total = _read_index(index)
        present = [s for s in shards if (d / s).is_file()]
        tensors: list[TensorInfo] = []
        for s in present:
            tensors += read_safetensors_header(d / s)
        if len(present) == len(shards):
            return summarize(tensors, len(shards))
        if total is None:
            raise _fail(index, f"{len(shards) - len(present)} of {len(shards)} shards are missing and the index has "
                               "no metadata.total_size; download the shards (headers are enough)")
        return summarize(tensors, len(shards), exact=False, total_override=total)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    tensors = []
    for f in files:
        tensors += read_safetensors_header(f)
    return summarize(tensors, len(files))


def load_model_dir(directory: str | Path) -> ModelSpec:
    """A spec from ``directory/config.json`` (with its quantization_config) and its safetensors headers."""
    from .hfconfig import load_config_file

    spec = load_config_file(directory)
    ckpt = read_checkpoint(directory)
    return replace(spec, checkpoint=ckpt) if ckpt is not None else spec
