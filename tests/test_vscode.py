"""The VS Code extension without a VS Code: its node unit tests, its .vsix (contents,
reproducible, offline), the CLI option it reads files with (`diff JOB --file PATH --side`), and
its CLI layer (editors/vscode/lib/cli.js) driving the REAL patchwire CLI and agent.

The extension inside a real VS Code is tests/test_vscode_e2e.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, Laptop, git, make_repo, script

EXTENSION = ROOT / "editors" / "vscode"
# What the .vsix holds, and nothing else: no tests, no node_modules, no lock file.
VSIX_NAMES = sorted([
    "[Content_Types].xml", "extension.vsixmanifest", "extension/LICENSE.txt", "extension/extension.js",
    "extension/lib/cli.js", "extension/lib/commands.js", "extension/lib/present.js",
    "extension/package.json", "extension/readme.md",
])


def need_node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed: CI must run the VS Code extension's tests")
        pytest.skip("node is not installed")
    return node


# ------------------------------------------------------------------ the extension alone


def test_node_unit_tests_pass():
    """`npm test` in editors/vscode, as an extension developer runs it: test/*.test.js (parsing,
    command flows, cancellation, error display), and not their helpers beside them."""
    need_node()
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("npm is not installed: CI must run the VS Code extension's tests")
        pytest.skip("npm is not installed")
    proc = subprocess.run([npm, "test"], cwd=EXTENSION, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # The summary: "# pass 42" from the tap reporter (Node 18-22 without a terminal), "ℹ pass 42"
    # from spec (the default from Node 23 on).
    counts = dict(re.findall(r"^(?:#|\u2139) (pass|fail) (\d+)$", proc.stdout, re.MULTILINE))
    assert counts.get("fail") == "0", proc.stdout[-2000:]
    assert int(counts.get("pass", 0)) >= 30, proc.stdout[-2000:]
    assert "fake-patchwire" not in proc.stdout  # a helper is not a test file


def package(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(EXTENSION / "package.sh"), str(out)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_vsix_holds_only_the_extension_and_builds_offline_byte_identical(tmp_path):
    need_node()
    first = package(tmp_path / "first.vsix", dict(os.environ))  # installs vsce if not there yet
    assert first.returncode == 0, first.stdout + first.stderr
    # From the cached node_modules: no registry (an unreachable one, and npm told to stay offline).
    offline = {**os.environ, "npm_config_offline": "true", "npm_config_registry": "http://127.0.0.1:9/"}
    again = package(tmp_path / "again.vsix", offline)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing" not in again.stdout
    assert (tmp_path / "again.vsix").read_bytes() == (tmp_path / "first.vsix").read_bytes()

    with zipfile.ZipFile(tmp_path / "again.vsix") as z:
        assert sorted(z.namelist()) == VSIX_NAMES
        manifest = json.loads(z.read("extension/package.json"))
        assert z.read("extension/extension.js") == (EXTENSION / "extension.js").read_bytes()
        assert z.read("extension/lib/cli.js") == (EXTENSION / "lib" / "cli.js").read_bytes()
        dates = {info.date_time for info in z.infolist()}
    assert manifest["name"] == "patchwire-vscode" and manifest["engines"]["vscode"]
    assert "dependencies" not in manifest  # no runtime dependencies
    assert len(dates) == 1  # one fixed time (SOURCE_DATE_EPOCH), not the build's


def test_vsce_is_pinned_with_a_lock_file():
    manifest = json.loads((EXTENSION / "package.json").read_text())
    pin = manifest["devDependencies"]["@vscode/vsce"]
    assert pin[0].isdigit(), "an exact version, not a range"
    lock = json.loads((EXTENSION / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@vscode/vsce"]["version"] == pin


def test_code_server_install_without_network_skips_the_e2e_loudly(tmp_path, capsys):
    """The only reason the e2e test may skip: the registry cannot be reached (here: a dead port)."""
    from test_vscode_e2e import install_code_server
    installer = TESTS / "install_code_server.sh"
    target = tmp_path / "cache" / "code-server"
    env = {**os.environ, "npm_config_registry": "http://127.0.0.1:9/", "npm_config_fetch_retries": "0",
           "PATCHWIRE_CODE_SERVER_DIR": str(target)}
    with pytest.warns(UserWarning, match="NO NETWORK"), pytest.raises(pytest.skip.Exception, match="NO NETWORK"):
        install_code_server(installer, env)
    assert "the npm registry cannot be reached" in capsys.readouterr().err
    assert not (target / "bin").exists()


# ------------------------------------------------------------------ diff JOB --file PATH --side


@pytest.fixture
def project(tmp_path, agent) -> Laptop:
    root = make_repo(tmp_path / "proj", {"README.md": b"# demo\n", "src/app.py": b"print('hello')\n",
                                         "logo.bin": b"\x89PNG\x00\x01"})
    lap = Laptop(root)
    lap.init(agent)
    return lap


def side(lap: Laptop, path: str, which: str, *extra: str) -> dict:
    proc = lap.run("diff", "--file", path, "--side", which, "--json", *extra, check=0)
    return json.loads(proc.out)


def test_diff_file_gives_each_side_of_each_file(project):
    lap = project
    lap.ask(script({"write": "src/app.py", "text": "print('hi')\n"}, {"write": "new.txt", "text": "new\n"},
                   {"delete": "README.md"}, {"write": "logo.bin", "b64": base64.b64encode(b"\xff\xfe\x00").decode()}),
            "--no-apply", check=0)
    job = lap.last_job()
    status_before = git(lap.root, "status", "--porcelain")
    app_old, app_new = side(lap, "src/app.py", "old"), side(lap, "src/app.py", "new")
    assert (app_old["text"], app_new["text"]) == ("print('hello')\n", "print('hi')\n")
    assert app_new == {"job": job, "path": "src/app.py", "side": "new", "exists": True, "mode": "100644",
                       "binary": False, "text": "print('hi')\n"}
    assert side(lap, "new.txt", "old")["exists"] is False and side(lap, "new.txt", "new")["text"] == "new\n"
    assert side(lap, "README.md", "old")["text"] == "# demo\n" and side(lap, "README.md", "new")["exists"] is False
    logo = side(lap, "logo.bin", "new")
    assert logo["binary"] is True and base64.b64decode(logo["base64"]) == b"\xff\xfe\x00"
    assert side(lap, "src", "old")["exists"] is False  # a folder is not a file
    raw = lap.run("diff", job, "--file", "src/app.py", check=0)
    assert raw.stdout == b"print('hi')\n"
    # Nothing here changed: the worktree, the user's index, no throwaway index left behind.
    assert (lap.root / "src" / "app.py").read_bytes() == b"print('hello')\n"
    assert git(lap.root, "status", "--porcelain") == status_before
    assert not list((lap.root / ".git" / "patchwire").glob("show-*.index"))


def test_diff_file_of_a_job_from_elsewhere_says_so(project, tmp_path, agent):
    project.ask(script({"write": "src/app.py", "text": "x\n"}), "--no-apply", check=0)
    job = project.last_job()
    other = make_repo(tmp_path / "other", {"a.txt": b"a\n"})
    lap = Laptop(other)
    lap.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file()),
            "--project", "proj", check=0)
    proc = lap.run("diff", job, "--file", "src/app.py", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.out)["error"] == f"the files job {job} started from are not recorded in this project"
    assert "run this in the project the job was asked from" in proc.err
    assert "Traceback" not in proc.err


# ------------------------------------------------------------------ lib/cli.js against the real CLI


def drive(lap: Laptop, scenario: str, prompt: str = "") -> dict:
    program = lap.root.parent / "bin" / "patchwire"
    if not program.exists():
        program.parent.mkdir(exist_ok=True)
        program.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(lap.program))
        program.chmod(0o755)
    proc = subprocess.run([need_node(), str(TESTS / "vscode_cli_drive.js"), str(program), scenario],
                          cwd=lap.root, input=prompt, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_extension_cli_layer_asks_reviews_applies_selected_and_undoes(project):
    lap = project
    weird = "src/we*ird[1].py"  # a name, not a pattern: the extension passes it after --
    result = drive(lap, "review", script({"say": "on it"}, {"write": "src/app.py", "text": "print('hi')\n"},
                                         {"write": weird, "text": "w\n"}))
    asked, job = result["asked"], result["asked"]["job"]
    assert asked["code"] == 0
    assert asked["types"][:2] == ["queued", "started"] and asked["types"][-2:] == ["finished", "outcome"]
    assert "text" in asked["types"] and "tool" in asked["types"]
    assert any(line.startswith("synced ") for line in result["stderr"])
    assert sorted(f["path"] for f in result["diff"]["files"]) == ["src/app.py", weird]
    assert result["sides"]["src/app.py"]["old"]["text"] == "print('hello')\n"
    assert result["sides"]["src/app.py"]["new"]["text"] == "print('hi')\n"
    assert result["applied"]["ok"]["files"] == [weird] and result["applied"]["ok"]["partial"] is True
    assert (lap.root / weird).read_text() == "w\n"
    assert (lap.root / "src" / "app.py").read_text() == "print('hello')\n"
    assert [job, "done"] in result["jobs"]
    undone = drive(lap, "undo")
    assert undone["ok"] == {"restored": [weird]}
    assert not (lap.root / weird).exists()


def test_extension_cli_layer_cancels_a_running_job_on_the_box(project, agent):
    result = drive(project, "cancel", script({"say": "thinking"}, {"hang": True}))
    job = result["asked"]["job"]
    assert result["cancel"]["ok"]["job"]["id"] == job
    assert result["asked"]["types"][-2] == "cancelled"
    assert result["asked"]["last"]["error"].startswith(f"job {job} cancelled")  # the CLI's error line
    assert result["asked"]["code"] == 4  # the CLI: the AI run did not finish
    assert agent.wait_job(job)["status"] == "cancelled"


def test_extension_cli_layer_shows_refusals_in_the_clis_words(project, agent):
    agent.stop()
    result = drive(project, "refused")
    assert result["apply"]["cliError"] is True and result["apply"]["exitStatus"] == 3
    assert result["apply"]["error"].startswith(f"cannot reach the agent at {agent.url}")
    assert "patchwire-agent serve" in result["apply"]["hint"]
    checks = {c["name"]: c["ok"] for c in result["doctor"]["ok"]["checks"]}
    assert checks["git"] is True and checks["agent"] is False


def test_extension_cli_layer_reviews_and_trusts_a_config_it_did_not_write(project):
    """An untrusted .patchwire.toml: the refusal carries the code the extension offers Review
    and Trust for; `trust --show` gives the settings and their hash; a hash of other settings
    trusts nothing; the hash shown trusts, and the CLI then uses the file."""
    (project.root / ".patchwire.toml").write_text((project.root / ".patchwire.toml").read_text() + "# edited\n")
    trust_file = Path(os.environ["XDG_STATE_HOME"]) / "patchwire" / "trusted.json"
    trust_file.unlink()  # as if the file had come with the repository
    result = drive(project, "trust")
    assert result["before"]["code"] == "untrusted" and result["before"]["exitStatus"] == 2, result["before"]
    assert "is not trusted here" in result["before"]["error"]
    shown = result["shown"]["ok"]
    assert shown["config"] == str(project.root / ".patchwire.toml") and shown["trusted"] is False
    assert shown["settings"]["agent"].startswith("http://127.0.0.1:") and "sync.allow" in shown["settings"]
    assert re.fullmatch(r"[0-9a-f]{64}", shown["sha256"])
    assert result["stale"]["code"] == "changed" and "nothing was trusted" in result["stale"]["error"]
    assert result["trusted"]["ok"]["trusted"] is True and result["trusted"]["ok"]["sha256"] == shown["sha256"]
    assert "jobs" in result["after"]["ok"], result["after"]

