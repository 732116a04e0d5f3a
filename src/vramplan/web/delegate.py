"""Run a CLI command in-process, so that the API answers exactly what the command's ``--json`` prints.

For commands that live in other modules (``fit``, ``plan``, vision estimates, the catalog listings):
the body's keys are mapped onto the command's own argparse flags (so its defaults, choices and checks
apply), the command runs with ``--json`` in an empty private working directory (a bare name can
never find a file), and its output is parsed back. Options that name files are refused, and so is
any value that looks like a path. An uploaded config is written to that private directory and the
command reads it from there. One command runs at a time (capturing swaps the process's stdout).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from functools import cache
from pathlib import Path
from typing import Any

from .options import RequestError

__all__ = ["ALLOWED_COMMANDS", "ModelArg", "argv_for", "command_options", "has_command", "run_command"]

# Commands the API may run: none of them writes files or runs a model.
ALLOWED_COMMANDS = frozenset({"estimate", "fit", "plan", "models", "gpus"})
# Options that name files, or that the API sets itself.
_REFUSED = frozenset({"json", "plot", "help", "version", "csv", "configs", "output", "out", "prices", "price_file",
                      "prices_file", "file", "path", "export", "save", "engine_output", "trace"})
_PATHISH_DEST = re.compile(r"(^|_)(file|path|dir|out|output)s?$")
_PATHISH_METAVAR = re.compile(r"\b(file|path|dir|out)\b", re.IGNORECASE)
_MAX_TEXT = 200
_LOCK = threading.Lock()


@cache
def _commands() -> dict[str, argparse.ArgumentParser]:
    from .. import cli

    parser = cli._build_parser()  # the CLI's own parser, with every registered command module
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {k: v for k, v in action.choices.items() if k in ALLOWED_COMMANDS}
    return {}


def has_command(name: str) -> bool:
    """Whether this install's CLI has ``name`` (``fit`` and ``plan`` come with the hardware module)."""
    return name in _commands()


def _refused(action: argparse.Action) -> bool:
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    return action.dest in _REFUSED or bool(_PATHISH_DEST.search(action.dest) or _PATHISH_METAVAR.search(metavar))


def command_options(command: str) -> dict[str, argparse.Action]:
    """The options a body may set for ``command``: its flags by destination, less the refused ones."""
    parser = _commands().get(command)
    if parser is None:
        raise RequestError(404, f"this vramplan install has no {command!r} command")
    return {a.dest: a for a in parser._actions if a.option_strings and not _refused(a)}


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise RequestError(422, f"{key} must be a finite number")
        return repr(value)
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise RequestError(422, f"{key} must be a string or number of at most {_MAX_TEXT} characters")
    if any(c in value for c in "/\\\x00\n\r") or value.startswith(("~", ".")):
        raise RequestError(422, f"{key} = {value!r} looks like a path; the web API never reads files")
    return value


def argv_for(command: str, options: Mapping[str, Any]) -> list[str]:
    """Flags of ``command`` for the body's options (``model``/``config`` excluded); 422 on unknown keys."""
    known = command_options(command)
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        action = known.get(key)
        if action is None:
            raise RequestError(422, f"unknown option {key!r} for {command}; known: {', '.join(sorted(known))}")
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise RequestError(422, f"{key} must be true or false")
            if value != bool(action.default):
                argv.append(flag)
            continue
        many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
        if isinstance(value, list):
            if not many:
                raise RequestError(422, f"{key} takes one value, not a list")
            if len(value) > 64:
                raise RequestError(422, f"{key}: at most 64 values")
        items = [_text(key, v) for v in (value if isinstance(value, list) else [value])]
        if isinstance(action, argparse._AppendAction) or not many:
            argv += [f"{flag}={t}" for t in items]
        else:
            if any(t.startswith("-") for t in items):
                raise RequestError(422, f"{key}: values may not start with '-'")
            argv += [flag, *items]
    return argv


class ModelArg:
    """The MODEL argument of a command: a checked catalog name, or an uploaded config (written privately)."""

    def __init__(self, name: str | None = None, config: Mapping[str, Any] | None = None,
                 config_name: str = "config.json") -> None:
        self.name = name
        self.config = config
        self.config_name = config_name

    def materialize(self, workdir: Path) -> str:
        if self.config is None:
            assert self.name is not None
            return self.name
        folder = workdir / self.config_name  # the CLI names a config by its folder: tmp/NAME/config.json
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(self.config), encoding="utf-8")
        return str(folder / "config.json")


def _message(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "the command failed"
    line = re.sub(r"^vramplan(?: [\w-]+)?: (?:error|internal error): ", "", line)
    return re.sub(r" \(see vramplan [\w-]+ --help\)$", "", line)


def run_command(command: str, options: Mapping[str, Any], model: ModelArg | None = None) -> Any:
    """Run ``vramplan COMMAND [MODEL] FLAGS --json`` in-process and return its parsed JSON output."""
    from .. import cli

    argv = [command, *argv_for(command, options), "--json"]
    with _LOCK, tempfile.TemporaryDirectory(prefix="vramplan-web-") as tmp:
        workdir = Path(tmp)
        if model is not None:
            argv.insert(1, model.materialize(workdir))
        out, err = io.StringIO(), io.StringIO()
        old = os.getcwd()
        os.chdir(workdir)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    status = cli.main(argv)
                except SystemExit as exc:  # argparse refused a value
                    status = exc.code if isinstance(exc.code, int) else 2
        finally:
            os.chdir(old)
    if status == 2:
        raise RequestError(422, _message(err.getvalue()))
    if status != 0:
        raise RuntimeError(f"vramplan {command} failed: {_message(err.getvalue())}")
    try:
        return json.loads(out.getvalue())
    except json.JSONDecodeError:
        raise RuntimeError(f"vramplan {command} --json printed no JSON") from None
