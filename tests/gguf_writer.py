"""Write GGUF headers (metadata + tensor records) from ggml's docs/gguf.md, with sparse (never written) data."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from vramplan.gguf import GGML_TYPES, TYPE_BY_NAME


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)  # uint32
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _str(v)
    if isinstance(v, list):
        if v and isinstance(v[0], str):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_str(x) for x in v)
        return struct.pack("<IIQ", 9, 4, len(v)) + b"".join(struct.pack("<I", x) for x in v)
    raise TypeError(v)


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    _, bs, ts = TYPE_BY_NAME[type_name.lower()]
    rows = 1
    for d in shape[1:]:
        rows *= d
    return rows * shape[0] // bs * ts


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, str, tuple[int, ...]]],
               alignment: int = 32) -> int:
    """Write a GGUF v3 header; returns the total tensor bytes (the data region is sparse)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        out += _str(k) + _value(v)
    offset = 0
    for name, tname, shape in tensors:
        tid = TYPE_BY_NAME[tname.lower()][0]
        assert tid in GGML_TYPES
        out += _str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", tid, offset)
        offset += -(-tensor_bytes(tname, shape) // alignment) * alignment
    start = -(-len(out) // alignment) * alignment
    with path.open("wb") as f:
        f.write(out)
        f.truncate(start + offset)
    return sum(tensor_bytes(t, s) for _, t, s in tensors)


def llama_like(path: Path, *, arch: str = "llama", n_layer: int, n_embd: int, n_head: int, n_head_kv: int,
               n_ff: int, n_vocab: int, ctx_train: int = 131072, wtype: str = "q4_k", out_type: str = "q6_k",
               tied: bool = False, sliding_window: int | None = None) -> int:
    """A GGUF with a LLaMA-style tensor set (token_embd, blk.N.{attn_*, ffn_*}, output) and metadata."""
    hd = n_embd // n_head
    meta: dict[str, Any] = {
        "general.architecture": arch, f"{arch}.block_count": n_layer, f"{arch}.context_length": ctx_train,
        f"{arch}.embedding_length": n_embd, f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_head_kv,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(n_vocab)],
    }
    if sliding_window:
        meta[f"{arch}.attention.sliding_window"] = sliding_window
    t: list[tuple[str, str, tuple[int, ...]]] = [("token_embd.weight", wtype, (n_embd, n_vocab))]
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", "f32", (n_embd,)), (p + "attn_q.weight", wtype, (n_embd, n_head * hd)),
              (p + "attn_k.weight", wtype, (n_embd, n_head_kv * hd)),
              (p + "attn_v.weight", "q6_k", (n_embd, n_head_kv * hd)),
              (p + "attn_output.weight", wtype, (n_head * hd, n_embd)), (p + "ffn_norm.weight", "f32", (n_embd,)),
              (p + "ffn_gate.weight", wtype, (n_embd, n_ff)), (p + "ffn_up.weight", wtype, (n_embd, n_ff)),
              (p + "ffn_down.weight", "q6_k", (n_ff, n_embd))]
    t.append(("output_norm.weight", "f32", (n_embd,)))
    if not tied:
        t.append(("output.weight", out_type, (n_embd, n_vocab)))
    return write_gguf(path, meta, t)
