"""Model directories and GGUF files are read with bounded reads of regular files only (never a pipe or device)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from vramplan.checkpoint import load_model_dir, read_checkpoint
from vramplan.errors import ConfigError
from vramplan.gguf import read_gguf

_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
           "max_position_embeddings": 512}

fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform == "win32", reason="needs named pipes")


@fifo
def test_a_pipe_named_safetensors_is_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_CONFIG))
    os.mkfifo(tmp_path / "model.safetensors")  # opening it for reading would wait for a writer forever
    with pytest.raises(ConfigError, match="pipe, device or socket"):
        load_model_dir(tmp_path)


@fifo
def test_a_pipe_as_the_index_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    with pytest.raises(ConfigError, match="pipe, device or socket"):
        read_checkpoint(tmp_path)


def test_an_oversized_index_is_refused_by_what_is_read(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    with index.open("w") as fh:  # sparse: the size is real, the bytes are not stored
        fh.truncate((64 << 20) + 1)
    with pytest.raises(ConfigError, match="implausibly large"):
        read_checkpoint(tmp_path)


def test_a_directory_named_safetensors_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_CONFIG))
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        load_model_dir(tmp_path)


@fifo
def test_a_pipe_named_gguf_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(ConfigError, match="pipe, device or socket"):
        read_gguf(tmp_path / "model.gguf")


def test_a_device_is_refused(tmp_path: Path) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    link = tmp_path / "model.gguf"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="pipe, device or socket"):
        read_gguf(link)
