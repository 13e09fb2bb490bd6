"""Shared helpers for the tests that run the BUILT zipapps (dist/patchwire, dist/patchwire-agent).

`built_zipapps` is session-scoped and imported by several test modules; pytest registers one
fixture per importing module, so the build itself is cached here: build.sh runs once per session,
and once per run when pytest-xdist's workers share it (the first builds, the others wait on
its lock, then find the run's mark in build/).
"""
from __future__ import annotations

import fcntl
import functools
import os
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from pythons import find_python

ROOT = Path(__file__).resolve().parent.parent
APPS = {"patchwire": "patchwire", "patchwire-agent": "patchwire_agent"}  # zipapp -> module


@functools.lru_cache(maxsize=None)
def _build() -> str:
    """Run build.sh (once per run of several workers); '' when it worked, else what it printed."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    mark = ROOT / "build" / ".tests-built-for-run"
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / ".tests-build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if run and mark.is_file() and mark.read_text() == run:
            return ""
        failure = run_build()
        if not failure and run:
            mark.write_text(run)
        return failure


def run_build() -> str:
    """build.sh, as a developer runs it; '' when it worked, else what it printed."""
    build = subprocess.run(["bash", str(ROOT / "build.sh")], cwd=ROOT, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        return "build.sh failed (exit %d):\n%s%s" % (build.returncode, build.stdout, build.stderr[-4000:])
    return ""


@pytest.fixture(scope="session")
def built_zipapps() -> Dict[str, Path]:
    """Run build.sh once per session; return {"patchwire": dist/patchwire, ...}."""
    failure = _build()
    if failure:
        pytest.fail(failure)
    return {name: ROOT / "dist" / name for name in APPS}


def python_for(version: str) -> str:
    """A working python<version>: skipped when missing, failed when CI=true."""
    exe = find_python(version)
    if exe is None:
        message = "no working python%s (PATH or $PYENV_ROOT/versions)" % version
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must test every supported Python")
        pytest.skip(message)
    return exe
