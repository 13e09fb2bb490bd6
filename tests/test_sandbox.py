"""Confinement of the AI (issue 9): bubblewrap around the real agent's AI runs, the
sandbox-exec profile as text (no macOS here), symlinks out of the project removed before the
AI starts and put back after, and the same hostile asks run unconfined to show the
difference.

The AI is the stand-in, scripted to do what a prompt-injected AI would: write through a
symlink, write to /tmp/outside-*, write into another user's mirror, read another user's
files and the agent's own database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import patchwire_agent as pa
from conftest import Laptop, ask_body, make_repo, script, tree_digest

SECRET = b"bob's secret: hunter2\n"


def bwrap_or_skip() -> None:
    program, why = pa.probe_bwrap()
    if not program:
        if os.environ.get("CI") == "true":
            pytest.fail(f"bubblewrap is needed here: {why}")
        pytest.skip(f"bubblewrap cannot run here: {why}")


# ------------------------------------------------------------------ the wrappers, as text


def walls(tmp_path, **kw) -> pa.JobWalls:
    state = tmp_path / "state"
    job, git_dir, home = state / "job", state / "git", state / "users/alice/home"
    for folder in (job, git_dir, home):
        folder.mkdir(parents=True, exist_ok=True)
    return pa.JobWalls(job, state, git_dir, home, pa.AILimits(64, 100, 0), **kw)


def test_bwrap_argv_hides_then_binds_back_in_order(tmp_path):
    w = walls(tmp_path)
    argv = pa.bwrap_argv("/usr/bin/bwrap", ["claude", "--print"], w, [])
    text = " ".join(argv)
    s, j, g, h = (os.path.realpath(p) for p in (w.state, w.job, w.git_dir, w.home))
    assert argv[:3] == ["/usr/bin/bwrap", "--ro-bind", "/"]
    assert argv[-5:] == ["--chdir", j, "--", "claude", "--print"]
    # hidden first, bound back after (later mounts win), the hidden folder read-only last
    order = [text.index(x) for x in (f"--size {64 * 2**20} --tmpfs /tmp", "--tmpfs /run", f"--tmpfs {s}",
                                     f"--ro-bind {g} {g}", f"--bind {j} {j}", f"--bind {h} {h}",
                                     f"--remount-ro {s}")]
    assert order == sorted(order), text
    for flag in ("--unshare-user", "--unshare-pid", "--new-session", "--die-with-parent"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL" and "--unshare-net" not in argv


def test_bwrap_argv_binds_back_a_program_installed_under_a_hidden_folder(tmp_path):
    tool = tmp_path / "tools/node_modules/.bin/claude"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    w = walls(tmp_path)
    argv = pa.bwrap_argv("bwrap", [str(tool)], w, [tool, Path("/usr/bin/env")])
    top = os.path.realpath("/tmp") + "/" + os.path.relpath(os.path.realpath(tool), "/tmp").split("/")[0]
    i = argv.index(top)
    assert argv[i - 1:i + 2] == ["--ro-bind", top, top] and argv.count(top) == 2  # the install folder, once
    assert "/usr/bin/env" not in argv  # not hidden: nothing to bind back
    s = os.path.realpath(w.state)  # hidden even though it is inside the folder bound back
    assert argv.index(s) > i and argv[argv.index(s) - 1] == "--tmpfs"
    assert pa.install_folder("/usr/bin/env", ["/tmp", s]) == ""


def test_sandbox_exec_profile_passes_paths_as_parameters(tmp_path):
    home = tmp_path / "we.ird (home)"
    params = {"JOB": tmp_path / "job", "TMP": tmp_path / "tmp", "STATE": tmp_path / "state",
              "GIT_DIR": tmp_path / "git", "HOME": home}
    argv = pa.sandbox_exec_argv("/usr/bin/sandbox-exec", ["claude", "-p"], params)
    assert argv[0] == "/usr/bin/sandbox-exec" and argv[1] == "-p" and argv[-2:] == ["claude", "-p"]
    profile = argv[2]
    assert profile.startswith("(version 1)\n(allow default)\n(deny file-write*)\n")
    for name in ("JOB", "TMP", "HOME", "STATE", "GIT_DIR"):
        assert f'(param "{name}")' in profile
        assert f"{name}={os.path.realpath(params[name])}" in argv
    assert str(tmp_path) not in profile  # paths never spliced into the profile
    assert "(deny file-read-data file-read-xattr (subpath (param \"STATE\")))" in profile
    assert "network" not in profile  # no gateway (no [network]): the box's network, as before


def test_sandbox_exec_profile_with_a_gateway_lets_out_only_to_its_port(tmp_path):
    params = {"JOB": tmp_path / "job", "TMP": tmp_path / "tmp", "STATE": tmp_path / "state",
              "GIT_DIR": tmp_path / "git", "HOME": tmp_path / "home"}
    profile = pa.sandbox_exec_argv("/usr/bin/sandbox-exec", ["claude"], params, gateway_port=40123)[2]
    assert profile.startswith(pa.SANDBOX_PROFILE)  # the file rules unchanged
    assert profile[len(pa.SANDBOX_PROFILE):] == ('(deny network-outbound)\n'
                                                  '(allow network-outbound (remote ip "localhost:40123"))\n')


def test_choosing_a_sandbox(monkeypatch):
    auto = pa.Sandbox.choose("auto", platform="sunos5")
    assert auto.kind == "none" and "UNCONFINED" in auto.warning and 'sandbox = "none"' in auto.warning
    assert pa.Sandbox.choose("none").kind == "none" and not pa.Sandbox.choose("none").warning
    with pytest.raises(pa.PatchwireError, match="'sandbox-exec' is not available on linux"):
        pa.Sandbox.choose("sandbox-exec", platform="linux")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pa.PatchwireError, match="bwrap is not installed") as e:
        pa.Sandbox.choose("bwrap", platform="linux")
    assert "apt install bubblewrap" in e.value.hint
    assert "apt install bubblewrap" in pa.Sandbox.choose("auto", platform="linux").warning


def test_bad_sandbox_value_is_a_config_error(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[ai]\nsandbox = "firejail"\n')
    with pytest.raises(pa.PatchwireError, match="ai.sandbox must be one of auto, bwrap, sandbox-exec, none"):
        pa.AgentConfig.load(cfg)


# ------------------------------------------------------------------ health and doctor


def test_health_and_doctor_warn_when_auto_finds_no_sandbox(make_agent, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with git and sh but no bwrap
    bin_dir.mkdir()
    for tool in ("git", "sh", "rsync"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    box = make_agent(ai={"sandbox": "auto"}, env={"PATH": str(bin_dir)})
    health = box.json("GET", "/v1/health", token=None)[1]
    assert health["sandbox"] == "none" and "UNCONFINED" in health["sandbox_warning"]
    assert "UNCONFINED" in box.read_log()  # logged at start, loudly
    lap = Laptop(make_repo(tmp_path / "lap", {"a.txt": b"a\n"}))
    lap.init(box)
    out = lap.run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["sandbox"]["ok"] is False and "apt install bubblewrap" in checks["sandbox"]["fix"]
    assert out.returncode != 0


def test_an_explicit_sandbox_that_cannot_run_stops_the_agent(make_agent, tmp_path):
    box = make_agent(ai={"sandbox": "bwrap"}, env={"PATH": "/nonexistent"}, start=False)
    with pytest.raises(AssertionError, match="bubblewrap cannot run here"):
        box.start()


# ------------------------------------------------------------------ hostile asks, confined and not


@pytest.fixture
def elsewhere():
    """A folder outside the project and outside /tmp (so a private /tmp does not hide it)."""
    path = Path(tempfile.mkdtemp(prefix="pw-elsewhere-", dir="/var/tmp"))
    outside = Path(tempfile.mkdtemp(prefix="outside-", dir="/tmp"))
    yield path, outside
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(outside, ignore_errors=True)


def hostile_box(make_agent, tmp_path, sandbox: str, elsewhere: Path):
    box = make_agent(users=("alice", "bob"), ai={"sandbox": sandbox})
    bob_mirror = box.state_dir / "users/bob/mirror/secrets"
    bob_mirror.mkdir(parents=True)
    (bob_mirror / "secret.txt").write_bytes(SECRET)
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# demo\n"}))
    os.symlink(str(elsewhere), lap.root / "evil")
    from conftest import git
    git(lap.root, "add", "evil")
    git(lap.root, "commit", "-qm", "a link out of the project")
    lap.init(box)
    lap.run("sync", check=0)
    return box, lap, bob_mirror


def run_ask(box, lap, *steps) -> dict:
    status, job = box.json("POST", "/v1/ask", ask_body(lap, script(*steps)))
    assert status == 202, job
    return box.wait_job(job["id"])


def diff_of(box, job: dict) -> bytes:
    return box.request("GET", f"/v1/jobs/{job['id']}/diff")[2]


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_hostile_asks(make_agent, tmp_path, elsewhere, sandbox):
    if sandbox == "bwrap":
        bwrap_or_skip()
    out_dir, tmp_outside = elsewhere
    box, lap, bob_mirror = hostile_box(make_agent, tmp_path, sandbox, out_dir)
    confined = sandbox == "bwrap"
    assert box.json("GET", "/v1/health", token=None)[1]["sandbox"] == sandbox
    mirror_before = tree_digest(box.state_dir / "users/alice/mirror/laptop")
    laptop_before = tree_digest(lap.root)

    # 1. through the project's own link: removed before the AI starts (both ways), so the
    # write lands in the job folder and shows in the diff
    job = run_ask(box, lap, {"write": "evil/x", "text": "via the link\n"})
    assert job["status"] == "done", job
    removed = [e for e in box.events(job["id"]) if e["type"] == "links_removed"]
    assert removed and removed[0]["paths"] == ["evil"] and removed[0]["count"] == 1
    diff = diff_of(box, job)
    assert b"+++ b/evil/x" in diff and b"deleted file mode 120000" in diff
    assert not (out_dir / "x").exists()

    # 2. a link the AI did not touch is put back: no change in the diff; the laptop is told
    asked = lap.ask(script({"write": "note.txt", "text": "note\n"}), "--no-apply", check=0)
    assert "1 symlink(s) pointing outside the project kept from the AI: evil" in asked.err
    job = box.json("GET", f"/v1/jobs/{lap.last_job()}")[1]
    assert job["status"] == "done" and b"evil" not in diff_of(box, job) and b"note.txt" in diff_of(box, job)

    # 3. a link the AI makes itself, then writes through
    job = run_ask(box, lap, {"link": [str(out_dir), "mine"]}, {"write": "mine/x", "text": "out\n"})
    if confined:  # /var/tmp is hidden from the AI (an empty tmpfs): the link dangles
        assert job["status"] == "failed" and "FileExistsError" in job["reason"], job
        assert not (out_dir / "x").exists()
    else:
        assert (out_dir / "x").read_bytes() == b"out\n"

    # 4. /tmp/outside-*: under bwrap /tmp is the AI's own, the real one is never written
    job = run_ask(box, lap, {"write": str(tmp_outside / "x"), "text": "out\n"})
    assert (tmp_outside / "x").exists() is not confined
    assert job["status"] == "done"

    # 5. another user's mirror
    job = run_ask(box, lap, {"write": str(bob_mirror / "planted.txt"), "text": "planted\n"})
    if confined:
        assert job["status"] == "failed" and "Read-only file system" in job["reason"], job
        assert sorted(os.listdir(bob_mirror)) == ["secret.txt"]
    else:
        assert (bob_mirror / "planted.txt").exists()

    # 6. another user's files and the agent's own database, copied into the diff
    for source in (bob_mirror / "secret.txt", box.state_dir / "jobs.sqlite3"):
        job = run_ask(box, lap, {"copy": [str(source), "stolen"]})
        if confined:
            assert job["status"] == "failed" and "No such file or directory" in job["reason"], job
        else:
            assert job["status"] == "done" and b"diff --git a/stolen b/stolen" in diff_of(box, job)
    if not confined:
        assert SECRET.strip() in diff_of(box, run_ask(box, lap, {"copy": [str(bob_mirror / "secret.txt"), "s.txt"]}))

    assert tree_digest(box.state_dir / "users/alice/mirror/laptop") == mirror_before
    assert tree_digest(lap.root) == laptop_before
    assert (bob_mirror / "secret.txt").read_bytes() == SECRET
    jobs = box.json("GET", "/v1/jobs")[1]["jobs"]
    assert {j["status"] for j in jobs} <= {"done", "failed"}


def test_confined_ai_keeps_its_private_tmp_and_the_job_folder(make_agent, tmp_path):
    """The sandbox lets an ordinary job work: /tmp writable (its own), files in the job
    folder, the stand-in and its Python (maybe under hidden folders) found."""
    bwrap_or_skip()
    box = make_agent(ai={"sandbox": "bwrap"})
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# demo\n"}))
    lap.init(box)
    lap.run("sync", check=0)
    job = run_ask(box, lap, {"write": "/tmp/scratch/t.txt", "text": "tmp\n"}, {"copy": ["/tmp/scratch/t.txt", "from-tmp.txt"]})
    assert job["status"] == "done", job
    assert b"+tmp" in diff_of(box, job)
    started = [e for e in box.events(job["id"]) if e["type"] == "started"]
    assert started[0]["sandbox"] == "bwrap"


def test_a_home_under_home_is_hidden_once_and_the_sandbox_starts(tmp_path, monkeypatch):
    """The README's team setup makes the agent's account with a home under /home: hiding both
    /home/NAME and /home (a tmpfs over a tmpfs) left bwrap unable to finish its mounts, and
    every job failed before the AI started. Only /home is hidden now, and a sandbox starts."""
    bwrap_or_skip()
    if not os.access("/home", os.W_OK):
        pytest.skip("making a folder in /home needs root")
    home = Path(tempfile.mkdtemp(prefix="pw-home-", dir="/home"))
    try:
        monkeypatch.setenv("HOME", str(home))
        w = walls(tmp_path)
        hidden = w.hidden_folders()
        assert "/home" in hidden and str(home) not in hidden
        argv = pa.bwrap_argv(pa.probe_bwrap()[0], ["/bin/sh", "-c", f"ls -A {home}; echo ran"], w, [])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (0, "ran\n"), proc.stderr
    finally:
        home.rmdir()


def test_doctor_builds_a_jobs_own_sandbox_and_names_what_would_fail_every_job(tmp_path, monkeypatch):
    """The sandbox check runs bwrap with a job's own mounts (the hidden folders, the state
    folder, a probe's job folder and home), not a bare probe: a mount that fails (hiding a
    home and /home above it, as before the fix) fails the check with bwrap's own words, where a
    bare probe said all was well and every job failed."""
    bwrap_or_skip()
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n[ai]\nsandbox = "bwrap"\n')
    cfg = pa.AgentConfig.load(config)
    good = pa.check_sandbox(cfg)
    assert good["ok"] is True and "CapEff 0000000000000000" in good["detail"], good
    hidden = tmp_path / "hidden" / "home"
    hidden.mkdir(parents=True)
    monkeypatch.setattr(pa.JobWalls, "hidden_folders", lambda self: [str(hidden), str(hidden.parent)])
    broken = pa.check_sandbox(cfg)
    assert broken["ok"] is False and "bwrap cannot build the AI's sandbox on this box: bwrap:" in broken["detail"], broken
    assert "every job would fail" in broken["fix"]
    assert [p.name for p in state.iterdir()] == []  # the probe's folders are gone
    monkeypatch.undo()
    state.rmdir()  # no state folder (or one this account cannot write): the bare probe, no traceback
    assert pa.check_sandbox(cfg)["ok"] is True


def test_a_home_of_root_still_hides_every_system_folder(tmp_path, monkeypatch):
    """systemd's DynamicUser (or a container user without a passwd entry) has "/" as its home:
    "/" is never hidden, and it must not count as a folder the others sit inside (which left
    the AI /home, /root and /run to read)."""
    monkeypatch.setenv("HOME", "/")
    hidden = walls(tmp_path).hidden_folders()
    expected = sorted(os.path.realpath(f) for f in ("/root", "/home", "/run", "/var/tmp") if os.path.isdir(f))
    assert hidden == sorted(set(expected)) and hidden, hidden
