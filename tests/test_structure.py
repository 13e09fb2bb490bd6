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


# Calls that may run git around `Git`, by qualified name: none.
GIT_OUTSIDE_GIT_ALLOWED: Set[str] = set()


def starts_with_git(node: ast.AST, assigned: Dict[str, ast.AST]) -> bool:
    """Whether an argv expression is a list or tuple whose first element is the literal "git"
    (directly, as the left of a `+`, or through a name assigned such a list)."""
    if isinstance(node, ast.Name) and node.id in assigned:
        return starts_with_git(assigned[node.id], {})
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return starts_with_git(node.left, assigned)
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        first = node.elts[0]
        return isinstance(first, ast.Constant) and first.value == "git"
    return False


def git_run_calls(source: str) -> Set[str]:
    """Qualified names of the functions outside `class Git` that pass run/spawn an argv
    starting with "git"."""
    found: Set[str] = set()

    def visit(node: ast.AST, qualname: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and child.name == "Git" and not qualname:
                continue
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                visit(child, f"{qualname}.{child.name}" if qualname else child.name)
                if isinstance(child, ast.FunctionDef):
                    check_function(child, f"{qualname}.{child.name}" if qualname else child.name)

    def check_function(func: ast.FunctionDef, name: str) -> None:
        assigned = {t.id: n.value for n in ast.walk(func) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        for call in ast.walk(func):
            if not isinstance(call, ast.Call) or not call.args:
                continue
            called = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
            if called in ("run", "spawn") and starts_with_git(call.args[0], assigned):
                found.add(name)

    tree = ast.parse(source)
    visit(tree, "")
    for node in tree.body:  # module-level code
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and call.args and starts_with_git(call.args[0], {}):
                    found.add("<module>")
    return found


def test_every_git_call_goes_through_git():
    """run(["git", ...]) skips the neutral settings (GIT_NEUTRAL): git goes through `Git`,
    with `neutral=False` and a comment where a call must read the user's own config."""
    probe = ('def a():\n    run(["git", "init"])\n'
             'class B:\n    def c(self):\n        argv = ["git"] + more\n        pw.run(argv, cwd=x)\n'
             'class Git:\n    def run(self):\n        return run(["git"])\n'
             'def d():\n    run(["rsync"]); git.run("status"); spawn(["gitk"])\n')
    assert git_run_calls(probe) == {"a", "B.c"}  # the walk finds both spellings, skips Git
    for path in (LAPTOP, AGENT):
        offenders = git_run_calls(path.read_text()) - GIT_OUTSIDE_GIT_ALLOWED
        assert not offenders, f"{path.name}: {sorted(offenders)} run git around `Git` (use Git(...))"


def test_http_threads_and_cancel_wait_on_events_not_sleeps():
    """A cancel waits for the job's end on a threading.Event that finish() sets, and an event
    stream on the store's condition; no request handler polls with time.sleep (a repeatedly
    wrong token is answered late by waiting on its connection's `dropped` Event: Handler.sit_out)."""
    tree = ast.parse(AGENT.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    methods = {f"{c}.{m.name}": m for c in ("Handler", "Agent") for m in classes[c].body
               if isinstance(m, ast.FunctionDef)}
    checked = [name for name in methods if name.startswith("Handler.")] + ["Agent.cancel"]
    sleeping = sorted(name for name in checked
                      for n in ast.walk(methods[name]) if isinstance(n, ast.Call)
                      and isinstance(n.func, ast.Attribute) and n.func.attr == "sleep")
    assert sleeping == [], sleeping
    cancel = methods["Agent.cancel"]
    assert not [n for n in ast.walk(cancel) if isinstance(n, ast.While)], "Agent.cancel loops"
    waits = [n.func.value for n in ast.walk(cancel) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "wait"]
    assert [getattr(w, "id", "") for w in waits] == ["ended"]  # the job's end Event


def test_no_backslash_line_continuations():
    """Outline views and call-graph readers stop at a backslash continuation: brackets instead
    (PEP 8). A backslash ending a line inside a string (a docstring's `\\`) is not one."""
    import io
    import tokenize
    for path in (LAPTOP, AGENT):
        text = path.read_text()
        in_strings = set()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.STRING:
                in_strings.update(range(tok.start[0], tok.end[0]))
        found = [n for n, line in enumerate(text.splitlines(), 1) if line.endswith("\\") and n not in in_strings]
        assert not found, f"{path.name}: backslash continuations on lines {found}"


BANNER = "# " + "=" * 66 + " "


def banners(path: Path) -> list:
    return [line[len(BANNER):].strip() for line in path.read_text().splitlines() if line.startswith(BANNER)]


def mapped(path: Path) -> list:
    """The section titles the module docstring's "Map" lists, in its order."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "\nMap" in doc, f"{path.name}: its docstring has no Map"
    lines = doc.split("\nMap", 1)[1].splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("    ")):]
    out = []
    for line in lines:
        if not line.startswith("    "):
            break
        if not line.startswith("     "):  # a continuation line is indented further
            out.append(re.split(r" \.{2,}", line.strip())[0].strip())
    return out


def test_each_modules_map_lists_its_sections_in_order():
    """A newcomer reads the Map at the end of the docstring to find a section; the banners
    and the Map must say the same, in the same order."""
    for path in (LAPTOP, AGENT):
        assert mapped(path) == banners(path), path.name


def test_the_event_types_are_spelled_once():
    """The protocol's event types live in the SHARED part (EVENT_TYPES): the agent's OpenAPI
    document describes exactly those, the printer handles only those, and every job event
    the agent writes as a literal is one of them."""
    import patchwire
    import patchwire_agent
    events = patchwire.EVENT_TYPES
    described = {branch["properties"]["type"]["const"]
                 for branch in patchwire_agent.openapi_document()["components"]["schemas"]["Event"]["oneOf"]}
    assert described == set(events)
    handled = {name[3:] for name in vars(patchwire.ProgressPrinter) if name.startswith("on_") and name != "on_event"}
    assert handled <= set(events), handled - set(events)
    not_events = {"array", "object", "string", "number", "integer", "boolean", "null",  # JSON schema
                  "assistant", "user", "system", "message", "tool_use", "tool_result",  # Claude's stream-json
                  "http", "test"}  # the OpenAPI security scheme; a notification's test delivery
    literal = set(re.findall(r'"type": "([a-z_]+)"', AGENT.read_text())) - not_events
    assert literal <= set(events), literal - set(events)


def test_route_paths_are_spelled_once():
    """The laptop builds every path from the protocol's ROUTE_TABLE (route_path); the agent
    matches requests against the same table."""
    import patchwire
    import patchwire_agent
    table = [line for line in LAPTOP.read_text().splitlines() if re.search(r'"/(v1/|metrics)', line)]
    assert all(re.match(r'    \("(GET|POST|DELETE)", "/', line) for line in table), table
    assert [(m, r.pattern, n) for m, r, n, _ in patchwire_agent.ROUTES] == [
        (m, patchwire_agent.route_regex(t).pattern, n) for m, t, n, _ in patchwire.ROUTE_TABLE]
    assert patchwire.route_path("events", {"after": 3}, job="a/b") == "/v1/jobs/a%2Fb/events?after=3"


def exit_status_mappings(path: Path) -> list:
    """(line, what) of code outside STATUS_EXITS and exit_for_status that ties an HTTP status
    to an exit status: a call given both `http_status=` and an `exit_status=` that is not
    exit_for_status(...), or a comparison of a status with ExitStatus in one expression."""
    found = []
    tree = ast.parse(path.read_text())
    table = {id(n) for top in tree.body if isinstance(top, ast.AnnAssign)
             and getattr(top.target, "id", "") == "STATUS_EXITS" for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in table:
            continue
        if isinstance(node, ast.Call):
            words = {k.arg: k.value for k in node.keywords}
            chosen = words.get("exit_status")
            if "http_status" in words and chosen is not None and not (
                    isinstance(chosen, ast.Name) or (isinstance(chosen, ast.Call) and getattr(
                        chosen.func, "id", "") == "exit_for_status")):
                found.append((node.lineno, ast.unparse(node)[:100]))
        if isinstance(node, (ast.IfExp, ast.Dict)):
            text = ast.unparse(node)
            if re.search(r"HTTPStatus\.|\b[1-5]\d\d\b", text) and "ExitStatus." in text:
                found.append((node.lineno, text[:100]))
    return found


def test_the_status_to_exit_table_is_written_once():
    """The agent's HTTP status -> the laptop's exit status lives in the SHARED part
    (STATUS_EXITS, exit_for_status, as httpie's status.py); no other code maps one to the other."""
    import patchwire
    assert patchwire.exit_for_status(404, patchwire.CODE_NOT_FOUND) == patchwire.ExitStatus.ERROR
    assert patchwire.exit_for_status(404) == patchwire.exit_for_status(409, "tree_mismatch") == 3
    assert top_level_lines(LAPTOP)["exit_for_status"] < laptop_banner_line()
    source = LAPTOP.read_text()
    table = source[source.index("STATUS_EXITS: Dict"):source.index("def exit_for_status")]
    assert "ExitStatus.ERROR" in table
    for path in (LAPTOP, AGENT):
        assert exit_status_mappings(path) == [], path.name
