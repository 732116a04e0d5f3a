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
