"""The shape the next maintainer relies on: the agent imports only the SHARED part of
patchwire.py, every git call goes through `Git`, and every child process through `run`/`spawn`."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent
LAPTOP = ROOT / "patchwire.py"
AGENT = ROOT / "patchwire_agent.py"


def top_level_lines(path: Path) -> Dict[str, int]:
    """{name: line} of what a module defines at its top level."""
    names: Dict[str, int] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.lineno
    return names


def names_the_agent_takes() -> Set[str]:
    tree = ast.parse(AGENT.read_text())
    taken = {n.attr for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "pw"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "patchwire":
            taken.update(alias.name for alias in node.names)
    return taken


def laptop_banner_line() -> int:
    lines = LAPTOP.read_text().splitlines()
    marks = [i + 1 for i, line in enumerate(lines) if line.startswith("# LAPTOP: ")]
    assert len(marks) == 1, "patchwire.py has one LAPTOP banner"
    return marks[0]


def test_the_agent_imports_only_the_shared_part():
    defined, banner = top_level_lines(LAPTOP), laptop_banner_line()
    taken = names_the_agent_takes() - {"__version__"}
    assert len(taken) > 20  # the walk found the agent's uses
    missing = sorted(n for n in taken if n not in defined)
    assert not missing, f"the agent uses names patchwire.py does not define: {missing}"
    below = sorted(n for n in taken if defined[n] > banner)
    assert not below, f"the agent imports laptop-only names (move them above the LAPTOP banner): {below}"


def test_the_shared_part_does_not_reach_into_the_laptop_part():
    """A shared function calling a laptop-only one would make the agent depend on it."""
    defined, banner = top_level_lines(LAPTOP), laptop_banner_line()
    laptop_only = {n for n, line in defined.items() if line > banner}
    tree = ast.parse(LAPTOP.read_text())
    offenders = []
    for node in tree.body:
        if getattr(node, "lineno", banner) >= banner or not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        offenders += [f"{node.name} -> {n}" for n in sorted(used & laptop_only)]
    assert not offenders, offenders


def test_protocol_constants_are_written_once():
    """Event names and error codes the laptop acts on come from the shared part, on both sides."""
    ends = re.compile(r'\(\s*"finished",\s*"failed",\s*"cancelled"\s*\)')
    codes = re.compile(r'code\s*[!=]=\s*"(not_found|tree_mismatch)"|code="(not_found|tree_mismatch)"')
    assert len(ends.findall(LAPTOP.read_text())) == 1  # LAST_EVENTS itself
    assert not ends.search(AGENT.read_text())
    for path in (LAPTOP, AGENT):
        assert not codes.search(path.read_text()), path.name


def test_every_child_process_goes_through_the_one_runner():
    """subprocess.run / Popen appear only inside `run` and `spawn` (patchwire.py)."""
    for path in (LAPTOP, AGENT):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in ("run", "spawn") and path == LAPTOP:
                continue
            calls = [f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(node)
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                     and isinstance(n.func.value, ast.Name) and n.func.value.id == "subprocess"
                     and n.func.attr in ("run", "Popen", "call", "check_call", "check_output")]
            assert not calls, f"{path.name}: {getattr(node, 'name', '?')} calls {calls} (use run/spawn)"
