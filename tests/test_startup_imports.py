"""What the core imports to answer an estimate: no torch/numpy (pure Python), and none of the standard-library
modules it used to pull in only to read package data and versions (importlib.metadata with the email parser,
importlib.resources with zipfile and tempfile: ~25 ms of every CLI call)."""

from __future__ import annotations

import subprocess
import sys

from vramplan._files import installed_version, package_data


def test_estimate_imports_no_heavy_modules() -> None:
    code = ("import sys, vramplan; vramplan.estimate('llama-3.1-8b'); vramplan.estimate('sdxl');"
            "print([m for m in ('torch', 'numpy', 'transformers', 'importlib.metadata', 'email', 'zipfile',"
            " 'tempfile', 'importlib.resources') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_installed_version_agrees_with_importlib_metadata() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pytest", "hypothesis", "vramplan", "transformers", "no-such-distribution-xyz"):
        try:
            want: str | None = version(dist)
        except PackageNotFoundError:
            want = None
        assert installed_version(dist) == want, dist


def test_package_data_is_found() -> None:
    assert package_data("data", "gpus.json").is_file()
    assert package_data("data", "recipes").is_dir()
