"""The project's [box] setup and checks, with the real agent, the real CLI and a real package
manager offline: pip installing a tiny wheel built here from a local folder (--no-index).

Setup runs in the warm job folder before the AI, only when its inputs (the commands and the
files `setup_when` names) changed since the last setup that succeeded there, or on
`ask --setup`; what it writes into ignored folders survives between jobs; a setup that fails
ends the job before the AI starts. Checks run on the AI's result, each on exactly that result,
and their receipt names the patch the laptop previews by its sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import patchwire as pw
from conftest import Laptop, make_repo, script

PY = shlex.quote(sys.executable)


def tiny_wheel(folder: Path, version: str) -> None:
    """A pure-Python wheel of `tinypkg` VERSION, as pip reads one (no build tool needed)."""
    files = {"tinypkg/__init__.py": f"VERSION = {version!r}\n",
             f"tinypkg-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: tinypkg\nVersion: {version}\n",
             f"tinypkg-{version}.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")}
    record = f"tinypkg-{version}.dist-info/RECORD"
    lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"tinypkg-{version}-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


def box_toml(**box) -> str:
    return "\n[box]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in box.items())


def project(tmp_path: Path, agent, files: dict, **box) -> Laptop:
    root = make_repo(tmp_path / "laptop", files)
    lap = Laptop(root)
    lap.init(agent)
    with open(root / ".patchwire.toml", "a") as f:
        f.write(box_toml(**box))
    return lap


def ask_json(lap: Laptop, prompt: str, *extra: str, check: int = 0):
    proc = lap.ask(prompt, "--json", *extra, check=check)
    lines = [json.loads(line) for line in proc.out.splitlines() if line.strip()]
    return proc, lines


def setup_steps(lines) -> list:
    return [e.get("step") for e in lines if e.get("type") == "setup" and e.get("step") in ("start", "skipped")]


# ------------------------------------------------------------------ setup


def test_setup_runs_when_its_inputs_change_and_its_output_folder_survives(tmp_path, agent):
    wheels = tmp_path / "wheels"
    tiny_wheel(wheels, "0.1")
    tiny_wheel(wheels, "0.2")
    install = (f"{PY} -m pip install -q --disable-pip-version-check --no-index --find-links {wheels} "
               "--upgrade --target .deps -r requirements.txt")
    lap = project(tmp_path, agent, {"requirements.txt": b"tinypkg==0.1\n", ".gitignore": b".deps/\n",
                                    "app.py": b"print('hi')\n"},
                  setup=[install], setup_when=["requirements.txt"],
                  checks=[f"{PY} -c \"import sys; sys.path.insert(0, '.deps'); import tinypkg; print(tinypkg.VERSION)\""])

    _, first = ask_json(lap, "one")
    assert setup_steps(first) == ["start"]
    outcome = first[-1]
    assert outcome["checks"]["passed"], first
    job = agent.json("GET", f"/v1/jobs/{outcome['job']}")[1]
    assert job["result"]["setup"]["ran"] and job["result"]["setup"]["why"] == "first setup of this job folder"
    assert "project_setup_ms" in next(e for e in first if e["type"] == "finished")["timings"]

    _, second = ask_json(lap, "two")  # inputs unchanged: no setup, and .deps/ is still there
    assert setup_steps(second) == ["skipped"]
    assert second[-1]["checks"]["passed"], second
    assert any(e.get("text") == "0.1" for e in second if e["type"] == "check")

    (lap.root / "requirements.txt").write_text("tinypkg==0.2\n")  # the lock file changes
    _, third = ask_json(lap, "three")
    assert setup_steps(third) == ["start"]
    assert any(e.get("text") == "0.2" for e in third if e["type"] == "check")
    job = agent.json("GET", f"/v1/jobs/{third[-1]['job']}")[1]
    assert job["result"]["setup"]["why"] == "inputs changed"

    _, fourth = ask_json(lap, "four", "--setup")  # asked for
    assert setup_steps(fourth) == ["start"]
    assert agent.json("GET", f"/v1/jobs/{fourth[-1]['job']}")[1]["result"]["setup"]["why"] == "asked (--setup)"


def test_a_failing_setup_fails_the_job_before_the_ai_starts_and_says_why(tmp_path, agent):
    marker = tmp_path / "ai-ran"
    lap = project(tmp_path, agent, {"a.txt": b"a\n"},
                  setup=["echo fetching packages; echo 'no package named left-pad' >&2; exit 3"])
    proc = lap.ask(script({"write": str(marker), "text": "x"}), "--no-apply", check=4)
    assert not marker.exists()  # the stand-in AI never ran
    assert "setup failed before the AI started" in proc.err and "status 3" in proc.err
    assert "no package named left-pad" in proc.err  # the output's tail says why
    job = agent.json("GET", f"/v1/jobs/{lap.last_job()}")[1]
    assert job["status"] == "failed" and job["result"]["setup"]["runs"][0]["exit_code"] == 3
    assert not [e for e in agent.events(job["id"]) if e["type"] == "started"]
    shown = lap.run("show", job["id"], check=0).out
    assert "setup:" in shown and "left-pad" in shown

    # the next ask runs setup again: a failed setup is no setup
    (lap.root / ".patchwire.toml").write_text((lap.root / ".patchwire.toml").read_text().replace(
        "exit 3", "exit 0"))
    _, lines = ask_json(lap, "again")
    assert setup_steps(lines) == ["start"]


def test_the_box_refuses_a_box_section_that_is_not_valid(agent, laptop):
    from test_jobs import ask_body
    body = ask_body(laptop, "x")
    for box, why in (({"setup": ["a"] * 21}, "at most 20"), ({"checks": ["a\nb"]}, "one non-empty line"),
                     ({"setup_timeout_s": 10 ** 7}, "timeout"), ({"stray": 1}, "unknown key"),
                     ({"setup": "npm ci"}, "list of strings")):
        status, answer = agent.json("POST", "/v1/ask", {**body, "box": box})
        assert status in (400, 403) and why in answer["error"] + answer.get("hint", ""), answer
    status, answer = agent.json("POST", "/v1/ask", {**body, "setup": True})
    assert status == 400 and "neither the ask nor the box has a [box] setup" in answer["error"]


# ------------------------------------------------------------------ checks


def test_checks_run_on_the_result_and_their_receipt_names_the_previewed_patch(tmp_path, agent):
    # the first check rewrites a file (as a formatter would): neither the patch nor the next
    # check may see that
    lap = project(tmp_path, agent, {"src/app.py": b"print('hello')\n"},
                  checks=["sed -i s/hello/HELLO/ src/app.py", "grep -q hello src/app.py", "grep -q added new.txt"])
    _, lines = ask_json(lap, script({"write": "new.txt", "text": "added\n"}))
    outcome = lines[-1]
    runs = outcome["checks"]["runs"]
    assert [(r["name"], r["ok"]) for r in runs] == [("sed", True), ("grep", True), ("grep#2", True)]
    assert outcome["checks"]["passed"] and outcome["checks"]["matches_patch"]
    diff = json.loads(lap.run("diff", outcome["job"], "--json", check=0).out)
    assert diff["checks"]["patch_sha256"] == diff["sha256"]  # the receipt is for the patch reviewed
    assert "HELLO" not in diff["patch"]
    job = agent.json("GET", f"/v1/jobs/{outcome['job']}")[1]
    receipt = job["result"]["checks"]
    # the receipt's tree is the laptop's synced files plus the patch, nothing else
    index = tmp_path / "index"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "read-tree", "HEAD"], cwd=lap.root, env=env, check=True)
    subprocess.run(["git", "apply", "--cached", "-"], cwd=lap.root, env=env, check=True,
                   input=diff["patch"].encode())
    tree = subprocess.run(["git", "write-tree"], cwd=lap.root, env=env, check=True,
                          stdout=subprocess.PIPE).stdout.decode().strip()
    assert receipt["tree"] == tree
    shown = lap.run("show", outcome["job"], check=0).out
    assert "checks:   sed ok, grep ok, grep#2 ok" in shown


def test_require_checks_refuses_to_offer_apply_when_a_check_failed(tmp_path, agent):
    lap = project(tmp_path, agent, {"a.txt": b"a\n"},
                  checks=["true", "grep -q tested a.txt || { echo 3 of 120 failed; exit 1; }"])
    prompt = script({"write": "a.txt", "text": "changed\n"})
    proc = lap.ask(prompt, "--yes", "--require-checks", "--no-color", check=6)
    assert (lap.root / "a.txt").read_bytes() == b"a\n"  # not applied, even with --yes
    assert "not offering to apply" in proc.err and "failed (--require-checks)" in proc.err
    assert "checks: true ok, grep FAILED" in proc.out  # atop the preview
    _, lines = ask_json(lap, prompt, "--yes", "--require-checks", check=6)
    assert lines[-1]["applied"] is False and lines[-1]["checks"]["passed"] is False
    assert lines[-1]["checks"]["runs"][1]["exit_code"] == 1
    shown = lap.run("show", lines[-1]["job"], check=0).out
    assert "grep FAILED" in shown and "3 of 120 failed" in shown
    # without --require-checks the failed check is shown and the patch offered as ever
    lap.ask(prompt, "--yes", check=0)
    assert (lap.root / "a.txt").read_bytes() == b"changed\n"
    total = json.loads(lap.run("usage", "--json", check=0).out)["total"]
    assert (total["checked"], total["checks_passed"]) == (3, 0)  # the pass rate: 0 of 3


def test_require_checks_refuses_when_no_check_ran(laptop):
    proc = laptop.ask("x", "--require-checks", "--yes", check=6)
    assert "the box ran no checks" in proc.err
    assert not (laptop.root / "PATCHWIRE_DEMO.md").exists()


def test_the_boxs_own_setup_and_checks_apply_where_the_project_has_none(tmp_path, make_agent):
    agent = make_agent(start=False)
    with open(agent.config, "a") as f:
        f.write('\n[projects.laptop]\nsetup = ["mkdir -p cache && touch cache/from-the-box"]\n'
                'checks = ["true"]\n')
    agent.start()
    lap = project(tmp_path, agent, {"a.txt": b"a\n", ".gitignore": b"cache/\n"},
                  checks=["test -f cache/from-the-box"])  # the project's checks win over the box's
    _, lines = ask_json(lap, "x")
    assert setup_steps(lines) == ["start"]
    job = agent.json("GET", f"/v1/jobs/{lines[-1]['job']}")[1]
    assert job["result"]["setup"]["source"] == "[projects.laptop]"
    assert job["result"]["checks"]["source"] == "project"
    assert [r["command"] for r in job["result"]["checks"]["runs"]] == ["test -f cache/from-the-box"]
    assert "set by the box's [projects.laptop]" in lap.run("show", job["id"], check=0).out
    status, answer = agent.json("POST", "/v1/ask", {"project": "other", "tree": "0" * 40, "files": [],
                                                     "prompt": "x", "setup": True})
    assert status == 400 and "neither the ask nor the box has a [box] setup" in answer["error"], answer


# ------------------------------------------------------------------ inside the sandbox


def test_setup_runs_inside_the_ais_sandbox(tmp_path, make_agent):
    from test_sandbox import bwrap_or_skip
    bwrap_or_skip()
    agent = make_agent(ai={"sandbox": "bwrap"})
    outside = Path(tempfile.mkdtemp(prefix="outside-", dir=str(Path.home()) if os.access(
        Path.home(), os.W_OK) else None))
    try:
        lap = project(tmp_path, agent, {"a.txt": b"a\n", ".gitignore": b"cache/\n"},
                      setup=[f"touch {outside}/escaped 2>&1 || echo could not write outside",
                             "mkdir -p cache && echo warm > cache/made-by-setup"],
                      checks=["test -f cache/made-by-setup"])
        _, lines = ask_json(lap, "x")
        assert setup_steps(lines) == ["start", "start"]
        assert not (outside / "escaped").exists()
        said = [e.get("text", "") for e in lines if e["type"] == "setup"]
        assert any("could not write outside" in text for text in said), said
        assert lines[-1]["checks"]["passed"], lines
        _, lines = ask_json(lap, "y")
        assert setup_steps(lines) == ["skipped"] and lines[-1]["checks"]["passed"]
    finally:
        for child in outside.iterdir():
            child.unlink()
        outside.rmdir()


# ------------------------------------------------------------------ pure parts


def test_check_names_and_setup_globs():
    assert pw.check_names(["dart format --set-exit-if-changed lib test", "flutter analyze", "flutter test",
                           "npm run lint", "python3 -m pytest -q", "npm test"]) == [
        "format", "analyze", "test", "lint", "pytest", "test#2"]
    wanted = pw.Globs(["pubspec.lock", "**/pubspec.yaml", "package-lock.json"])
    assert [p for p in ("pubspec.lock", "a/pubspec.lock", "pubspec.yaml", "packages/x/pubspec.yaml",
                        "package-lock.json", "web/package-lock.json") if wanted.match(p)] == [
        "pubspec.lock", "pubspec.yaml", "packages/x/pubspec.yaml", "package-lock.json"]
    assert not pw.Globs([]).match("anything")
    cases = {  # glob: (paths it matches, paths it does not)
        "/android/**": (["android/a", "android/b/c.gradle"], ["android", "x/android/a"]),
        "a/**/b/*.lock": (["a/b/x.lock", "a/1/2/b/.lock"], ["a/b/x/y.lock", "b/x.lock", "a/b.lock"]),
        "**": (["x", "a/b/c"], []),
        "**/**/x?.[ch]": (["x1.[ch]", "d/e/xy.[ch]"], ["x1.c", "x12.[ch]"]),
        "src/**.dart": (["src/a.dart"], ["src/a/b.dart"]),  # ** inside a name is *, as in git
    }
    for glob, (yes, no) in cases.items():
        assert [p for p in yes + no if pw.Globs([glob]).match(p)] == yes, glob


def test_a_glob_crafted_to_backtrack_is_matched_in_time_in_proportion_to_its_size():
    """One user's `setup_when` must not hold the agent's threads: `**/a/**/a/...` against a
    path 40 folders deep backtracked exponentially in one regular expression (`re` holds the
    GIL). Matched folder by folder, a million such matches would not finish in a test either:
    this counts the names compared, which the old expression's backtracking exceeded by far."""
    globs = pw.Globs(["**/a/" * 15 + "x", "*a" * 40 + "b"])
    compared = []
    real = pw.Globs._name
    pw.Globs._name = staticmethod(lambda token, name: compared.append(name) or real(token, name))
    try:
        assert not globs.match("a/" * 40 + "f")
        assert not globs.match("a" * 250)
    finally:
        pw.Globs._name = staticmethod(real)
    assert len(compared) <= 41 * 31 + 1, len(compared)
    with pytest.raises(pw.PatchwireError, match="a glob names at most 32 folders"):
        pw.check_box("p", {"setup_when": ["a/" * 32 + "b"]})


def test_the_laptop_refuses_a_receipt_that_is_not_well_formed():
    good = {"patch_sha256": "0" * 64, "tree": "a" * 40, "runs": [{"name": "test", "command": "t", "ok": True}]}
    assert pw.checked_receipt(good, "checks")
    for bad in ({**good, "patch_sha256": "zz"}, {**good, "runs": [{"name": "", "command": "t", "ok": True}]},
                {**good, "runs": [{"name": "t", "command": "t", "ok": "yes"}]},
                {**good, "runs": [{"name": "t", "command": "t", "ok": True, "tail": "x" * 20000}]},
                {**good, "runs": [good["runs"][0]] * 21}, {**good, "runs": [{"name": "t"}]}):
        with pytest.raises(pw.AnswerRefused):
            pw.checked_receipt(bad, "checks")


def test_the_readme_examples_of_box_are_valid():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```toml\n")[1:] if b.startswith("[box]")]
    assert len(blocks) == 2  # Flutter and web
    for block in blocks:
        box = pw.check_box("README.md", pw.parse_toml(block, Path("README.md"))["box"])
        assert box["setup"] and box["setup_when"] and box["checks"]


def test_fix_checks_gives_the_ai_the_failing_output_once_and_checks_again(tmp_path, agent):
    # the check's output carries a script for the stand-in AI: the follow-up's prompt holds that
    # output, so the stand-in "fixes" what the check wants
    fix = '#pw-script [{"write": "fixed.txt", "text": "ok"}]'
    lap = project(tmp_path, agent, {"a.txt": b"a\n"}, checks=[f"test -f fixed.txt || {{ echo '{fix}'; exit 1; }}"])
    proc, lines = ask_json(lap, "make a change", "--fix-checks", "--yes")
    assert "asking the AI once to fix them" in proc.err
    ends = [e for e in lines if e["type"] == "finished"]
    assert [[r["ok"] for r in e["checks"]["runs"]] for e in ends] == [[False], [True]]
    outcome = lines[-1]
    assert outcome["checks"]["passed"] and outcome["applied"]
    assert (lap.root / "fixed.txt").read_text() == "ok" and (lap.root / "PATCHWIRE_DEMO.md").exists()
    follow_up = agent.json("GET", f"/v1/jobs/{outcome['job']}")[1]
    assert follow_up["parent"] == ends[0]["job"] and "test -f fixed.txt" in follow_up["prompt"]


def test_a_setup_that_times_out_or_is_cancelled_ends_the_job_before_the_ai(agent, laptop):
    from test_jobs import ask_body
    from conftest import wait_until
    slow = {"setup": ["echo started; sleep 30"], "setup_timeout_s": 1}
    laptop.run("sync", check=0)
    status, job = agent.json("POST", "/v1/ask", ask_body(laptop, "x", box=slow))
    assert status == 202
    done = agent.wait_job(job["id"], timeout=30)
    assert done["status"] == "failed" and "timed out after 1 s" in done["reason"], done
    assert done["result"]["setup"]["runs"][0]["timed_out"] is True

    status, job = agent.json("POST", "/v1/ask", ask_body(laptop, "x", box={**slow, "setup_timeout_s": 60}))
    wait_until(lambda: any(e.get("text") == "started" for e in agent.events(job["id"])), 30, "setup output")
    status, _ = agent.json("DELETE", f"/v1/jobs/{job['id']}")
    done = agent.wait_job(job["id"], timeout=30)
    assert done["status"] == "cancelled", done
    assert not [e for e in agent.events(job["id"]) if e["type"] == "started"]  # the AI never started


def test_the_timeout_ceiling_bounds_the_whole_setup_and_all_checks(make_agent, tmp_path):
    """[policy] timeout_s bounds each phase, not only each command: with a ceiling of 3 s,
    setup commands of 2 s each end the job in about 3 s, and the checks of 2 s each run until
    3 s in all, the one past that named in the receipt as not run. Each command alone was
    within the ceiling, so 20 of them held a worker 20 times as long."""
    from test_jobs import ask_body
    from test_team import edit_config
    agent = make_agent(start=False)
    edit_config(agent, lambda d: d.update(policy={"timeout_s": 3}))
    agent.start()
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"hi\n"}))
    lap.init(agent)
    lap.run("sync", check=0)
    two = "sleep 2; echo slept"
    status, job = agent.json("POST", "/v1/ask", ask_body(lap, "x", box={"setup": [two] * 3, "setup_timeout_s": 3}))
    assert status == 202, job
    done = agent.wait_job(job["id"], timeout=60)
    runs = done["result"]["setup"]["runs"]
    assert done["status"] == "failed" and "timed out after 1 s" in done["reason"], done
    assert [r["timed_out"] for r in runs] == [False, True]
    status, job = agent.json("POST", "/v1/ask", ask_body(lap, script({"write": "a.txt", "text": "a\n"}),
                                                        box={"checks": [two] * 3, "check_timeout_s": 3}))
    done = agent.wait_job(job["id"], timeout=60)
    runs = done["result"]["checks"]["runs"]
    assert done["status"] == "done", done
    assert [(r["ok"], r["timed_out"]) for r in runs] == [(True, False), (False, True), (False, True)], runs
    assert runs[2]["exit_code"] is None and "not run: the checks took more than 3 s in all" in runs[2]["tail"]
    # through the laptop: a [box] that leaves its timeouts out sends none, and the box brings
    # its defaults (1,800 and 600 s) down to the ceiling instead of refusing the ask
    (lap.root / ".patchwire.toml").write_text((lap.root / ".patchwire.toml").read_text() + box_toml(setup=["true"]))
    proc, lines = ask_json(lap, script({"write": "b.txt", "text": "b\n"}), "--no-apply")
    assert any(e.get("type") == "finished" and e.get("status") == "done" for e in lines), proc.err
