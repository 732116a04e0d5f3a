from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from vramplan import MemoryKind, estimate
from vramplan.cli import main

from .conftest import CALIBRATION

KEYS = {"parameters", "trainable_parameters", "peak_allocated_bytes", "total_bytes", "breakdown", "phases",
        "assumptions"}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_estimate_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "estimate", "llama-3.1-8b", "--method", "lora", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data.keys() >= KEYS
    assert set(data["breakdown"]) == {k.value for k in MemoryKind}
    assert sum(data["breakdown"].values()) == data["total_bytes"]
    assert set(data["phases"]) == {"forward", "backward", "optimizer_step"}
    assert max(data["phases"].values()) == data["peak_allocated_bytes"]
    api = estimate("llama-3.1-8b", method="lora")
    assert api.to_dict() == data


def test_inference_phases(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "estimate", "mistral-7b", "--task", "infer", "--batch-size", "4", "--json")
    assert rc == 0
    data = json.loads(out)
    assert set(data["phases"]) == {"prefill", "decode"}
    assert data["trainable_parameters"] == 0
    assert data["breakdown"]["kv_cache"] > 0


def test_config_path_and_hf_alias(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "estimate", str(CALIBRATION / "configs" / "llama-3.1-8b.json"), "--json")
    assert rc == 0
    by_path = json.loads(out)["peak_allocated_bytes"]
    rc, out, _ = run(capsys, "estimate", "meta-llama/Llama-3.1-8B", "--json")
    assert rc == 0 and json.loads(out)["peak_allocated_bytes"] == by_path


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "estimate", "gpt2", "--seq-len", "1024")
    assert rc == 0
    assert "peak allocated" in out and "activations" in out and "assumptions" in out


@pytest.mark.parametrize("args, needle", [
    (["estimate", "llama-3.1-7b"], "did you mean"),
    (["estimate", "llama-3.1-8b", "--method", "lora", "--lora-targets", "nonexistent"], "lora"),
    (["estimate", "gpt2", "--seq-len", "99999999999"], "out of range"),
    (["estimate", "gpt2", "--method", "full", "--weights-quant", "nf4"], "qlora"),
    (["estimate", "gpt2", "--seq-len", "2048"], "1024 positions"),
    (["measure", "gpt2", "--seq-len", "512"], "vramplan measure needs"),
    (["calibrate", "missing.csv"], "no such file"),
])
def test_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    rc, _, err = run(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and needle in err.lower()
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [["estimate", "gpt2", "--batch-size", "0"], ["estimate", "gpt2", "--task", "x"],
                                  ["estimate"], ["nonsense"]])
def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1


def test_malformed_config_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": ')
    rc, _, err = run(capsys, "estimate", str(bad))
    assert rc == 2 and "malformed JSON" in err
    bad.write_text('{"model_type": "llama", "hidden_size": -5}')
    rc, _, err = run(capsys, "estimate", str(bad))
    assert rc == 2 and "hidden_size" in err
    bad.write_text('{"model_type": "t5"}')
    rc, _, err = run(capsys, "estimate", str(bad))
    assert rc == 2 and "not supported" in err and "llama" in err


def test_models_and_gpus_listing(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0 and len(json.loads(out)) >= 40
    rc, out, _ = run(capsys, "gpus", "--json", "--class", "consumer")
    assert rc == 0 and all(g["class"] == "consumer" for g in json.loads(out))


def test_console_script_help_is_fast_and_imports_no_torch() -> None:
    code = ("import sys, time; t=time.perf_counter(); import vramplan.cli, vramplan;"
            "vramplan.estimate('llama-3.1-8b');"
            "bad=[m for m in ('torch','numpy','transformers','rich') if m in sys.modules];"
            "print(bad, time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[]")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vramplan", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 5  # generous: this is a smoke check; benchmarks/ holds the target


def _parsed(argv: list[str], command: str | None) -> tuple[object, str, str]:
    """What ``build_parser(command)`` makes of ``argv``: the namespace (handlers by name) or the exit; the output."""
    import contextlib
    import io

    from vramplan.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(build_parser(command).parse_args(argv))
            result: object = {k: getattr(v, "__qualname__", v) for k, v in ns.items()}
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


def test_parser_of_one_command_parses_as_the_whole_parser() -> None:
    """main builds the flags of the command it runs only (the others listed by name): the same namespaces, help
    texts and errors as the parser of every command, for every command."""
    from vramplan.cli import _command_of, build_parser

    commands = list(next(a for a in build_parser()._actions if a.dest == "command").choices)
    assert len(commands) >= 10
    cases = [["--help"], ["--help", "estimate"], ["-h", "fit", "x"], ["--version"], [], ["nope", "x"],
             ["estimate", "--bogus", "x"],
             ["estimate", "llama-3.1-8b", "--json", "--gpus", "2", "--gpu", "h100", "--ctx", "100"],
             ["fit", "llama-3.1-8b", "--gpu", "h100", "--task", "infer"], ["plan", "llama-3.1-8b", "--gpu", "h100"]]
    cases += [[c, *tail] for c in commands for tail in ([], ["--help"], ["llama-3.1-8b"])]
    for argv in cases:
        assert _parsed(argv, _command_of(argv) or None) == _parsed(argv, None), argv


@pytest.mark.parametrize("columns", [None, "60", "200", "0", "wide"])
def test_help_width_is_shutils(monkeypatch: pytest.MonkeyPatch, columns: str | None) -> None:
    """The formatter's width, found without importing shutil, is shutil.get_terminal_size()'s."""
    import shutil

    from vramplan.cli import _columns

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _columns() == shutil.get_terminal_size().columns
