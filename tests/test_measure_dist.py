"""vramplan measure --gpus N: multi-GPU layouts under torchrun, checked on the CPU (VRAMPLAN_MEASURE_SMOKE=1,
gloo) with a tiny llama: the harness, the launch and the per-rank CSV rows; nothing is measured."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 128,
        "tie_word_embeddings": False}
RUN = ["--seq-len", "16", "--batch-size", "1", "--steps", "1"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["VRAMPLAN_MEASURE_SMOKE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=180, check=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_ddp_under_torchrun(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp.csv"
    p = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vramplan", "measure",
              str(config), "--gpus", "2", *RUN, "--csv", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0:" in p.stdout and "rank 1:" in p.stdout
    rows = _rows(out)
    assert [(r["rank"], r["world_size"], r["layout"]) for r in rows] == [("0", "2", "ddp"), ("1", "2", "ddp")]
    assert all(r["seq"] == "16" and int(r["params"]) > 0 for r in rows)


def test_fsdp_full_relaunches_itself_under_torchrun(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp.csv"
    p = _run(["-m", "vramplan", "measure", str(config), "--gpus", "2", "--fsdp", "full", "--precision", "amp-bf16",
              *RUN, "--csv", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out)
    assert [(r["rank"], r["world_size"], r["layout"]) for r in rows] == [("0", "2", "fsdp-full"),
                                                                         ("1", "2", "fsdp-full")]
    assert rows[0]["params"] == rows[1]["params"]  # every rank reports the whole model's parameter count
    assert rows[0]["name"].endswith("-fsdp-fullx2")


@pytest.mark.parametrize("flags", [["--zero", "2"], ["--tp", "2"]])
def test_unsupported_layout_is_one_line_exit_2(config: Path, tmp_path: Path, flags: list[str]) -> None:
    p = _run(["-m", "vramplan", "measure", str(config), "--gpus", "2", *flags, *RUN], tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "measure supports DDP and FSDP layouts" in lines[0], p.stderr


def test_relaunch_arguments_round_trip() -> None:
    from vramplan.cli import build_parser as _build_parser
    from vramplan.cli.measure import _argv_of

    argv = ["measure", "tiny.json", "--gpus", "4", "--fsdp", "grad-op", "--gradient-checkpointing",
            "--precision", "amp-bf16", "--seq-len", "512", "--steps", "2", "--csv", "out.csv"]
    ns = _build_parser().parse_args(argv)
    again = _build_parser().parse_args(["measure", *_argv_of(ns)])
    assert vars(again) == vars(ns)
