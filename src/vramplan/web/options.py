"""Request bodies of the JSON API, checked before anything runs.

A body is one JSON object whose keys are the CLI's options in snake_case (``model``, ``task``,
``batch_size``, …) or, instead of ``model``, ``config``: the parsed config.json as an object (with an
optional ``config_name``, the name the CLI would take from the file's folder). Nothing here touches
the file system: a model is a catalog name or an uploaded object, never a path.
"""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..workload import Workload

if TYPE_CHECKING:
    import argparse

__all__ = [
    "MAX_BODY_BYTES",
    "MODEL_KEYS",
    "WORKLOAD_KEYS",
    "Option",
    "RequestError",
    "catalog_name",
    "check_workload",
    "command_options",
    "model_of",
    "options_for",
    "parse_object",
    "safe_name",
    "workload_schema",
]

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a config.json is a few KiB
MODEL_KEYS = frozenset({"model", "config", "config_name"})
WORKLOAD_KEYS = frozenset(Workload.__dataclass_fields__)
_MAX_TEXT = 200
_MAX_NAMES = 64
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+ -]{0,99}")


class RequestError(Exception):
    """A request the API refuses: answered with ``status`` (4xx) and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Option:
    """One workload option as the page offers it: derived from :class:`Workload`, so never out of date."""

    name: str
    kind: str  # "choice", "int", "float", "optional_int", "bool", "names" or "text"
    default: Any
    choices: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "default": self.default, "choices": list(self.choices)}


def workload_schema() -> tuple[Option, ...]:
    """Every :class:`Workload` field with its kind, default and choices (the CLI's defaults)."""
    out = []
    hints = typing.get_type_hints(Workload)
    for name, f in Workload.__dataclass_fields__.items():
        d = f.default
        if d is None and hints[name] == (bool | None):  # unset means off (e.g. double_quant): a switch
            out.append(Option(name, "bool", False))
        elif isinstance(d, StrEnum):
            out.append(Option(name, "choice", d.value, tuple(m.value for m in type(d))))
        elif isinstance(d, bool):
            out.append(Option(name, "bool", d))
        elif isinstance(d, int):
            out.append(Option(name, "int", d))
        elif isinstance(d, float):
            out.append(Option(name, "float", d))
        elif d is None and hints[name] == (str | None):  # unset means the default (e.g. transformers)
            out.append(Option(name, "text", None))
        elif d is None:
            out.append(Option(name, "optional_int", None))
        elif isinstance(d, tuple):
            out.append(Option(name, "names", ",".join(d)))
        elif isinstance(d, str):
            out.append(Option(name, "text", d))
        else:  # pragma: no cover - a new field type must be taught to the page
            raise TypeError(f"Workload.{name}: no request kind for default {d!r}")
    return tuple(out)


_SCHEMA = {o.name: o for o in workload_schema()}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def parse_object(raw: bytes, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object (UTF-8). Malformed JSON, NaN/Infinity, deep nesting and non-objects are 400s."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"{what} is {len(raw):,} bytes; the limit is {MAX_BODY_BYTES:,} (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, f"{what} is not UTF-8 text") from None
    if not text.strip():
        raise RequestError(400, f"{what} is empty; send a JSON object such as {{\"model\": \"llama-3.1-8b\"}}")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"{what} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") \
            from None
    except ValueError as err:
        raise RequestError(400, f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, f"{what} is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"{what} must be a JSON object, not {type(data).__name__}")
    if "trust_remote_code" in data:
        raise RequestError(422, "trust_remote_code is never honoured: vramplan reads config.json fields and runs "
                                "no model code; drop the key")
    return data


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, f"{name} must be an integer, got {json.dumps(value)[:60]}")
    return value


def check_workload(body: Mapping[str, Any]) -> dict[str, Any]:
    """The workload options of ``body``, with their JSON types checked (ranges are the Workload's to check)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        opt = _SCHEMA.get(key)
        if opt is None or value is None:
            continue
        if opt.kind == "choice":
            if not isinstance(value, str) or len(value) > _MAX_TEXT:
                raise RequestError(422, f"{key} must be one of: {', '.join(opt.choices)}")
        elif opt.kind == "bool":
            if not isinstance(value, bool):
                raise RequestError(422, f"{key} must be true or false, got {json.dumps(value)[:60]}")
        elif opt.kind in ("int", "optional_int"):
            _int(key, value)
        elif opt.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestError(422, f"{key} must be a number, got {json.dumps(value)[:60]}")
        elif opt.kind == "text":
            if not isinstance(value, str) or len(value) > _MAX_TEXT:
                raise RequestError(422, f"{key} must be a short string, got {json.dumps(value)[:60]}")
        elif opt.kind == "names":
            names = value.split(",") if isinstance(value, str) else value
            if not isinstance(names, list) or len(names) > _MAX_NAMES or \
                    not all(isinstance(n, str) and len(n) <= _MAX_TEXT for n in names):
                raise RequestError(422, f"{key} must be a comma-separated string or a list of module names")
        out[key] = value
    return out


def safe_name(text: Any, what: str = "name", allow_json: bool = False) -> str:
    """A name that cannot be read as a path: letters, digits, ``._+ -``, at most 100 characters.

    A model name ending in ``.json`` would be read as a file by the CLI, so only config names
    (``allow_json``: they become a folder name inside a private directory) may end so.
    """
    if not isinstance(text, str) or not _SAFE_NAME.fullmatch(text) or (text.endswith(".json") and not allow_json):
        raise RequestError(422, f"{what} must be a plain name (letters, digits, . _ + -), not a path")
    return text


def catalog_name(name: Any) -> str:
    """The canonical name of a catalog model (language or image) named by name, alias or Hugging Face id;
    never a file."""
    from ..api import resolve

    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_TEXT:
        raise RequestError(422, "model must be a catalog name (GET /api/models lists them)")
    return resolve(name, local_files=False).name


def model_of(body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """The model of a request: a catalog name (``model``), or a config.json object the client uploaded
    (``config``, named ``config_name``) with that name; read by the same reader as the CLI's files."""
    has_model, has_config = body.get("model") is not None, body.get("config") is not None
    if has_model == has_config:
        raise RequestError(422, "give either model (a catalog name) or config (a config.json object), not "
                                f"{'both' if has_model else 'neither'}")
    if has_model:
        return catalog_name(body["model"]), None
    config = body["config"]
    if not isinstance(config, dict):
        raise RequestError(422, "config must be the JSON object of a config.json")
    given = body.get("config_name")
    return ("config.json" if given in (None, "", "config.json") else
            safe_name(given, "config_name", allow_json=True)), config


# ----------------------------------------------------------------------------------------- command options

# Options that name files, or that only present the answer: never taken from a request.
_REFUSED = frozenset({"json", "plot", "help", "version", "csv", "configs", "output", "prices", "file", "trace"})
_PATHISH = re.compile(r"(^|_)(file|path|dir|out|output)s?$")


@cache
def command_options(command: str) -> Mapping[str, argparse.Action]:
    """The options of ``vramplan COMMAND`` a request may set, by destination (the CLI's flags describe them:
    types, choices, defaults), less those that name files."""
    from ..cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]  # type: ignore[index]
    return MappingProxyType({a.dest: a for a in parser._actions if a.option_strings and a.dest not in _REFUSED
                             and not _PATHISH.search(a.dest)})


def _value(key: str, value: Any, action: argparse.Action) -> Any:
    """One option's value checked as the CLI would check its flag's text (type, choices); never a path."""
    import argparse

    if isinstance(value, bool) or value is None or not isinstance(value, int | float | str):
        raise RequestError(422, f"{key} must be a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(422, f"{key} must be a finite number")
    text = str(value)
    if len(text) > _MAX_TEXT or any(c in text for c in "/\\\x00\n\r") or text.startswith(("~", ".")):
        raise RequestError(422, f"{key} = {text[:60]!r} looks like a path; the web API never reads files")
    try:
        out = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise RequestError(422, f"{key}: {err}") from None
    if action.choices is not None and out not in action.choices:
        raise RequestError(422, f"{key} {value!r} is not one of: {', '.join(map(str, action.choices))}")
    return out


def options_for(command: str, body: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The options of ``command`` for a request: the CLI's defaults, then the body's values, checked (workload
    options by their JSON type, the rest as the CLI checks its flags); unknown keys are a 422."""
    import argparse

    known = command_options(command)
    out: dict[str, Any] = {dest: a.default for dest, a in known.items()}
    for key, value in body.items():
        if key in MODEL_KEYS or key in skip or value is None:
            continue
        action = known.get(key)
        if action is None:
            raise RequestError(422, f"unknown option {key!r} for {command}; known: {', '.join(sorted(known))}")
        if key in WORKLOAD_KEYS:
            out.update(check_workload({key: value}))
        elif action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise RequestError(422, f"{key} must be true or false")
            out[key] = value
        elif isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            if len(items) > _MAX_NAMES:
                raise RequestError(422, f"{key}: at most {_MAX_NAMES} values")
            out[key] = [_value(key, v, action) for v in items]
        elif isinstance(value, list):
            raise RequestError(422, f"{key} takes one value, not a list")
        else:
            out[key] = _value(key, value, action)
    return out
