"""The built zipapps: they run under the oldest and newest supported Python, carry their
pure-Python TOML libraries, and build byte for byte the same twice.

These run the real build.sh and the real .pyz files, each with SHIV_ROOT in a temporary folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

import patchwire
from zipapps import APPS, ROOT, built_zipapps, python_for, run_build  # noqa: F401 (built_zipapps: fixture)

PYTHONS = ["3.9", "3.13"]  # oldest and newest supported


def run_zipapp(python: str, pyz: Path, args: list[str], shiv_root: Path, **env: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHIV_")}
    return subprocess.run([python, str(pyz), *args], env={**clean, "SHIV_ROOT": str(shiv_root), **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(APPS))
@pytest.mark.parametrize("version", PYTHONS)
def test_zipapp_prints_its_version(built_zipapps, version, name, tmp_path):
    result = run_zipapp(python_for(version), built_zipapps[name], ["--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "%s %s\n" % (name, patchwire.__version__)


@pytest.mark.parametrize("name", list(APPS))
@pytest.mark.parametrize("version", PYTHONS)
def test_zipapp_imports_its_bundled_toml_libraries(built_zipapps, version, name, tmp_path):
    # SHIV_INTERPRETER runs the code through shiv's own bootstrap, as the entry point would be.
    code = ("import tomli, tomli_w; assert tomli.loads(tomli_w.dumps({'a': [1]})) == {'a': [1]}; "
            "print(tomli.__file__); print(tomli_w.__file__)")
    result = run_zipapp(python_for(version), built_zipapps[name], ["-c", code], tmp_path,
                        SHIV_INTERPRETER="1")
    assert result.returncode == 0, result.stderr
    for module_file in result.stdout.splitlines():
        assert Path(module_file).resolve().is_relative_to(tmp_path.resolve()), "imported from outside the zipapp"


@pytest.mark.parametrize("name", list(APPS))
def test_zipapp_carries_both_modules_and_no_compiled_code(built_zipapps, name):
    pyz = built_zipapps[name]
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(pyz).namelist()
    for module in APPS.values():
        assert "site-packages/%s.py" % module in names
    assert [n for n in names if n.endswith((".so", ".pyd"))] == []


def test_second_build_is_byte_identical(built_zipapps):
    first = {name: sha256(path) for name, path in built_zipapps.items()}
    assert run_build() == ""
    assert {name: sha256(path) for name, path in built_zipapps.items()} == first


def test_sha256sums_match_the_built_files_and_check_with_sha256sum(built_zipapps):
    lines = (ROOT / "dist" / "SHA256SUMS").read_text().splitlines()
    for name, path in built_zipapps.items():
        assert "%s  %s" % (sha256(path), name) in lines
    vsix = ROOT / "dist" / "patchwire-vscode.vsix"
    assert len(lines) == 2 + vsix.exists()  # the extension too, when Node built it
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=ROOT / "dist", capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(lines), check.stdout + check.stderr


def test_build_brings_its_own_pinned_shiv(built_zipapps):
    venv = ROOT / "build" / "venv"
    assert (venv / "requirements-build.txt").read_text() == (ROOT / "requirements-build.txt").read_text()
    pinned = (ROOT / "requirements-build.txt").read_text().split("shiv==")[1].split()[0]
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "shiv", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert pinned in out.stdout + out.stderr
