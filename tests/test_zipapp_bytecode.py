"""Zipapp bytecode (issue 14): the built zipapps start from bytecode from their first start on.
build.sh asks shiv for --compile-pyc: the start that unpacks a zipapp compiles every bundled
module for the Python running it (in worker processes), so even the agent's first start after
an install does not keep the compiler's memory (bench/ask.py --zipapp measures its RSS).
Another Python version later finds no bytecode of its own and writes it as usual: nothing
breaks."""

from __future__ import annotations

import subprocess


import patchwire
from test_package import run_zipapp
from zipapps import APPS, built_zipapps, python_for  # noqa: F401 (built_zipapps: fixture)


def cache_tag(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_first_start_compiles_every_bundled_module_and_other_versions_still_run(built_zipapps, tmp_path):
    first, second = python_for("3.9"), python_for("3.13")
    pyz = built_zipapps["patchwire-agent"]
    result = run_zipapp(first, pyz, ["--version"], tmp_path)
    assert (result.returncode, result.stdout) == (0, f"patchwire-agent {patchwire.__version__}\n"), result.stderr
    [site] = list(tmp_path.glob("patchwire-agent_*/site-packages"))
    sources = sorted(p for p in site.rglob("*.py"))
    assert {p.stem for p in sources} >= set(APPS.values()) and any("tomli_w" in p.parts for p in sources)
    tag = cache_tag(first)
    # tomli_w and most of tomli are not imported by --version: only a compile of the whole
    # unpacked tree leaves their bytecode
    missing = [str(p.relative_to(site)) for p in sources
               if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()]
    assert missing == []
    # the same unpacked copy under another version: it runs, and adds that version's bytecode
    result = run_zipapp(second, pyz, ["--version"], tmp_path, PYTHONDONTWRITEBYTECODE="")  # if set here
    assert (result.returncode, result.stdout) == (0, f"patchwire-agent {patchwire.__version__}\n"), result.stderr
    assert (site / "__pycache__" / f"patchwire_agent.{cache_tag(second)}.pyc").exists()
