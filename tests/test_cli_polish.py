"""The CLI as people meet it (issue 15): defaults in --help, complete tables at 80 columns and in pipes, the ids
--gpu takes, which GPU a short name picks, hints, one --task vocabulary, what --plot wrote, a busy port."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import vramplan
from vramplan import VramplanError
from vramplan.cli import main
from vramplan.hardware import gpu_choice_note, list_gpus
from vramplan.hints import hints
from vramplan.render import print_gpus

SRC = Path(vramplan.__file__).resolve().parent.parent


def run(*argv: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "vramplan", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_shows_each_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--batch-size", "1"), ("--seq-len", "2048"), ("--precision", "bf16"),
                          ("--optimizer", "adamw"), ("--task", "train"), ("--gradient-checkpointing", "off"),
                          ("--method", "full"), ("--lora-rank", "16")):
        assert re.search(re.escape(flag) + r".*?\(default: " + re.escape(default) + r"\)", text), flag


def test_gpus_lists_the_ids_gpu_takes_and_fits_80_columns() -> None:
    out = io.StringIO()
    print_gpus(list_gpus(), out=Console(file=out, width=80))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = out.getvalue()
    for g in list_gpus():
        assert g.name in text, g.name
    assert "…" not in text


@pytest.mark.parametrize("argv", [["plan", "llama-3.1-8b", "--task", "infer", "--top", "5"],
                                  ["plan", "llama-3.1-8b", "--method", "qlora", "--top", "5"]])
def test_plan_table_is_complete_at_80_columns_and_piped(argv: list[str]) -> None:
    data = json.loads(run(*argv, "--json").stdout)
    for columns in (80, None):  # a narrow terminal, and a pipe (no COLUMNS)
        r = run(*argv, columns=columns)
        assert r.returncode == 0, r.stderr
        if columns:
            assert max(len(line) for line in r.stdout.splitlines()) <= columns
        text = re.sub(r"\s+", " ", r.stdout.replace("│", " "))
        for p in data["plans"]:
            assert f"{p['gpu_count']}x {p['gpu']}" in text
            assert p["precision"] in text
            assert f"${p['cost_usd']:,.2f}" in text if p["cost_usd"] is not None else True
        assert "…" not in r.stdout


def test_short_gpu_names_say_which_gpu_is_used() -> None:
    note = gpu_choice_note("a100")
    assert note and "a100-80gb-sxm" in note and "a100-40gb-sxm" in note
    assert gpu_choice_note("rtx-4090") is None and gpu_choice_note("h100-sxm") is None
    for command in ("fit", "estimate"):
        r = run(command, "llama-3.1-8b", "--gpu", "a100", "--method", "qlora")
        assert r.returncode == 0 and "a100-80gb-sxm" in r.stderr and "a100-40gb-sxm" in r.stderr, command
    r = run("estimate", "llama-3.1-8b", "--gpu", "h100-sxm", "--method", "qlora", "--json")
    assert r.returncode == 0 and "note:" not in r.stderr  # an exact id needs no note


def test_a_hint_names_the_switch_that_changes_the_answer() -> None:
    from vramplan.api import make_workload
    from vramplan.catalog import get_model

    spec = get_model("llama-3.1-8b").spec
    w = make_workload(method="lora")
    est = vramplan.estimate("llama-3.1-8b", method="lora")
    found = hints(spec, w, est)
    assert found and found[0].flag == "--gradient-checkpointing"
    assert found[0].total_bytes == vramplan.estimate("llama-3.1-8b", method="lora",
                                                     gradient_checkpointing=True).total_bytes
    assert found[0].saving >= 0.2
    r = run("estimate", "llama-3.1-8b", "--method", "lora")
    assert "hint: --gradient-checkpointing would need" in r.stdout
    # nothing to say when no single switch saves a fifth
    est = vramplan.estimate("llama-3.1-8b", method="qlora", gradient_checkpointing=True)
    assert hints(spec, make_workload(method="qlora", gradient_checkpointing=True), est) == ()


def test_one_task_vocabulary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "llama-3.1-8b", "--task", "finetune", "--method", "lora", "--json"]) == 0
    finetune = json.loads(capsys.readouterr().out)
    assert main(["estimate", "llama-3.1-8b", "--task", "train", "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == finetune
    assert vramplan.estimate("llama-3.1-8b", task="finetune").workload["task"] == "train"


def test_plot_says_what_it_wrote(tmp_path: Path) -> None:
    pytest.importorskip("vl_convert")
    out = tmp_path / "b.svg"
    r = run("estimate", "llama-3.1-8b", "--plot", str(out), "--json")
    assert r.returncode == 0 and out.exists() and f"wrote the breakdown chart to {out}" in r.stderr
    out = tmp_path / "s.svg"
    r = run("sweep", "gpt2", "--over", "seq-len", "--range", "128:512", "--plot", str(out))
    assert r.returncode == 0 and out.exists() and f"wrote the sweep chart to {out}" in r.stderr


def test_serve_on_a_busy_port_fails_before_announcing() -> None:
    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--port", str(port))
    assert r.returncode == 2
    assert "serving on" not in r.stderr and "in use" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_export_to_a_missing_folder_is_one_line() -> None:
    r = run("export", "llama-3.1-8b", "--engine", "torchrun", "-o", "/nonexistent/x.json")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "/nonexistent/x.json" in r.stderr


def test_python_api_checks_types_at_its_boundary(tmp_path: Path) -> None:
    e = vramplan.estimate("llama-3.1-8b", gradient_checkpointing="false")
    assert e.workload["gradient_checkpointing"] is False
    assert vramplan.estimate("llama-3.1-8b", method="freeze", trainable_layers="8").workload["trainable_layers"] == 8
    for bad, field in ((dict(lora_targets=5, method="lora"), "lora_targets"), (dict(batch_size="1e400"), "batch_size"),
                       (dict(batch_size=1.5), "batch_size"), (dict(gradient_checkpointing="maybe"),
                                                              "gradient_checkpointing"),
                       (dict(lora_dropout=float("nan")), "lora_dropout")):
        with pytest.raises(VramplanError, match=field):
            vramplan.estimate("llama-3.1-8b", **bad)
    with pytest.raises(VramplanError, match="model"):
        vramplan.estimate("x" * 5000)
    with pytest.raises(VramplanError, match="model"):
        vramplan.estimate(5)  # type: ignore[arg-type]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(vramplan.get_model("gpt2").config_dict()))
    assert vramplan.estimate(config, seq_len=512).parameters == vramplan.estimate("gpt2", seq_len=512).parameters


def test_stylegan_header_says_what_is_modelled() -> None:
    est = vramplan.estimate("stylegan2-1024", batch_size=4)
    assert est.workload["precision"] == "fp32"
    assert not any("bf16" in a for a in est.assumptions)
    assert any("fp16" in a and "highest" in a for a in est.assumptions)
