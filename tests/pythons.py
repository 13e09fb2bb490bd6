"""Find an interpreter for a given Python version ("3.9", "3.13") to run the zipapps with.

pyenv installs shims for every version it knows, and a shim fails when that version is not
selected, so a candidate counts only once it has actually run.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess


def _runs(exe: str) -> bool:
    try:
        result = subprocess.run([exe, "-c", "pass"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _pyenv_candidates(version: str) -> list[str]:
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = os.path.join(root, "versions", version + ".*", "bin", "python" + version)
    # Newest patch release first: 3.9.18 before 3.9.9.
    return sorted(glob.glob(pattern), key=_patch_number, reverse=True)


def _patch_number(path: str) -> int:
    patch = path.split(os.sep + "versions" + os.sep)[-1].split(os.sep)[0].split(".")[2]
    return int(patch) if patch.isdigit() else -1


def find_python(version: str) -> str | None:
    """Return the path of a working ``python<version>``, or None if there is none."""
    candidates = [shutil.which("python" + version)] + _pyenv_candidates(version)
    return next((exe for exe in candidates if exe and _runs(exe)), None)
