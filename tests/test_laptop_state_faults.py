"""The laptop's own state against faults: a full disk, a command killed half way, a closed
terminal, a torn or foreign state file. The user's files are never left half changed without a
way back, and every such case ends in one clear line, never a traceback. Real agent on
127.0.0.1:0, the stand-in AI, the real CLI, a real full disk (a small tmpfs, root only)."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import patchwire
from conftest import ROOT, Laptop, fill_disk, make_repo, script

LINES = "".join(f"line {i}\n" for i in range(1, 30))


def project(tmp_path: Path, agent, files=None) -> Laptop:
    root = make_repo(tmp_path / "proj", files or {f"f{i}.txt": LINES.encode() for i in range(4)})
    lap = Laptop(root)
    lap.init(agent)
    return lap


def four_files_job(lap: Laptop) -> str:
    steps = [{"write": f"f{i}.txt", "text": LINES.replace("line 5\n", f"line 5 AI {i}\n")} for i in range(4)]
    lap.ask(script(*steps), "--no-apply", check=0)
    return lap.last_job()


def changed_count(lap: Laptop) -> int:
    """How many of the four files hold the AI's change."""
    return sum("AI" in (lap.root / f"f{i}.txt").read_text() for i in range(4))


def as_before(lap: Laptop) -> bool:
    return all((lap.root / f"f{i}.txt").read_text() == LINES for i in range(4))


def state(lap: Laptop) -> Path:
    return patchwire.Project(lap.root, "any").private_dir


def killed_at(lap: Laptop, args, after_writes: int, how: str = "os._exit(9)") -> subprocess.CompletedProcess:
    """Run the CLI in a child that dies (os._exit, as SIGKILL would; or `how`) at its
    `after_writes`+1-th write of a project file: what a kill half way through an apply or an
    undo leaves."""
    code = f"""
import errno, os, sys
sys.path.insert(0, {str(ROOT)!r})
import patchwire
real, count = patchwire.write_worktree, [0]
def dying(*a, **k):
    if count[0] == {after_writes}:
        {how}
    count[0] += 1
    return real(*a, **k)
patchwire.write_worktree = dying
sys.exit(patchwire.main({list(args)!r}))
"""
    return subprocess.run([sys.executable, "-c", code], cwd=lap.root, env=lap.env, capture_output=True, text=True)


def test_an_apply_killed_half_way_is_refused_until_undone_then_undone_whole(tmp_path, agent):
    lap = project(tmp_path, agent)
    job = four_files_job(lap)
    lap.run("diff", job, check=0)  # kept for review
    assert killed_at(lap, ["apply", job, "--yes"], after_writes=2).returncode == 9
    assert changed_count(lap) == 2  # half written: what the kill left
    again = lap.run("apply", job, "--yes")
    assert again.returncode == int(patchwire.ExitStatus.PATCH), again.err
    assert f"an earlier apply of job {job} was stopped before it finished" in again.err
    assert "`patchwire apply --undo` puts back every file it wrote" in again.err and "Traceback" not in again.err
    undone = lap.run("apply", "--undo", check=0)
    assert f"before the apply of job {job} that was stopped half way" in undone.err
    assert changed_count(lap) == 0 and as_before(lap)
    log = lap.run("log", check=0)
    assert "Traceback" not in log.err
    lap.run("apply", job, "--yes", check=0)
    assert changed_count(lap) == 4


def applied(tmp_path: Path, agent) -> Tuple[Laptop, str]:
    """A project with the four files' job applied."""
    lap = project(tmp_path, agent)
    job = four_files_job(lap)
    lap.run("apply", job, "--yes", check=0)
    return lap, job


def test_an_undo_killed_half_way_finishes_when_run_again(tmp_path, agent):
    lap, _ = applied(tmp_path, agent)
    assert killed_at(lap, ["apply", "--undo"], after_writes=1).returncode == 9
    assert changed_count(lap) == 3
    lap.run("apply", "--undo", check=0)
    assert changed_count(lap) == 0 and as_before(lap)


def test_a_full_state_disk_leaves_no_half_kept_diff(tmp_path, agent, small_disk, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(small_disk / "state"))
    lap = project(tmp_path, agent)
    job = four_files_job(lap)
    kept = state(lap) / "diffs" / f"{job}.patch"
    kept.unlink(missing_ok=True)
    filler = fill_disk(small_disk)
    try:
        failed = lap.run("apply", job, "--yes", "--json")
        assert failed.returncode == 1 and "Traceback" not in failed.err, failed.err
        assert "No space left on device" in failed.err and "free some space there" in failed.err
        said = json.loads(failed.out.splitlines()[-1])  # VS Code reads the same on stdout
        assert "No space left on device" in said["error"] and said["hint"].startswith("free some space there")
        assert not kept.exists() and not list(kept.parent.glob("*.part"))
        assert changed_count(lap) == 0 and as_before(lap)
    finally:
        filler.unlink()
    lap.run("apply", job, "--yes", check=0)
    assert changed_count(lap) == 4


def test_torn_and_foreign_state_files_are_read_as_none(tmp_path, agent):
    lap, job = applied(tmp_path, agent)
    log = state(lap) / "applied.log"
    with open(log, "a") as f:
        f.write('{"time": 1, "job": "abc", "ho')  # half a line: a full disk, a kill
    with open(log, "a") as f:
        f.write('[1]\n{"x": 1}\n')
    shown = lap.run("log", check=0)
    assert job in shown.out and "Traceback" not in shown.err
    lap.run("apply", "--undo", check=0)  # its line starts on a line of its own
    entries = [json.loads(line) for line in log.read_text().splitlines()[-1:]]
    assert entries[-1]["how"] == "undo" and entries[-1]["job"] == job
    # a record of the last sync, job trees and an undo log of the wrong shape
    (state(lap) / "last_sync.json").write_text("[]")
    (state(lap) / "job_trees.json").write_text(json.dumps({job: 5}))
    lap.run("sync", check=0)
    assert "Traceback" not in lap.run("diff", job).err
    (state(lap) / "undo.json").write_text("[1]")
    damaged = lap.run("apply", "--undo")
    assert damaged.returncode == int(patchwire.ExitStatus.PATCH) and "the undo log" in damaged.err
    assert "is damaged: nothing can be undone from it" in damaged.err and "Traceback" not in damaged.err


def test_a_lock_git_left_in_the_record_does_not_stop_every_sync(tmp_path, agent):
    lap = project(tmp_path, agent)
    lap.run("sync", check=0)
    (state(lap) / "index.lock").write_text("")  # a sync killed while git wrote the record's index
    (lap.root / "f0.txt").write_text("changed\n")
    lap.run("sync", check=0)


def test_a_closed_terminal_leaves_the_job_running_and_says_so(tmp_path, agent):
    lap = project(tmp_path, agent)
    proc = subprocess.Popen(lap.program + ["ask", script({"sleep": 30})], cwd=lap.root, env=lap.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said: list = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(b"AI started" in line for line in said):
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)  # the terminal it runs in is closed
    assert proc.wait(timeout=60) == int(patchwire.ExitStatus.INTERRUPTED), said
    reader.join(10)
    job = next(j["id"] for j in agent.json("GET", "/v1/jobs")[1]["jobs"] if j["status"] == "running")
    assert f"left job {job}; it keeps running on the box" in b"".join(said).decode()
    agent.request("DELETE", f"/v1/jobs/{job}")


def test_an_apply_that_fails_and_puts_everything_back_keeps_the_last_undo(tmp_path, agent):
    lap, _ = applied(tmp_path, agent)
    steps = [{"write": f"f{i}.txt", "text": "second\n"} for i in range(4)]
    lap.ask(script(*steps), "--no-apply", check=0)
    second = lap.last_job()
    failed = killed_at(lap, ["apply", second, "--yes"], after_writes=2,
                       how='count[0] += 1; raise OSError(errno.ENOSPC, "No space left on device")')
    assert failed.returncode == int(patchwire.ExitStatus.PATCH), failed.stderr
    assert "the files written so far were put back, nothing was changed" in failed.stderr
    assert changed_count(lap) == 4  # the first apply's
    lap.run("apply", "--undo", check=0)  # undoes the first apply: its undo log was kept
    assert changed_count(lap) == 0 and as_before(lap)


def test_an_undo_after_a_stopped_apply_never_takes_an_edit_made_since(tmp_path, agent):
    lap = project(tmp_path, agent)
    job = four_files_job(lap)
    assert killed_at(lap, ["apply", job, "--yes"], after_writes=2).returncode == 9
    written = next(i for i in range(4) if "AI" in (lap.root / f"f{i}.txt").read_text())
    (lap.root / f"f{written}.txt").write_text("my edit since\n")
    refused = lap.run("apply", "--undo")
    assert refused.returncode == int(patchwire.ExitStatus.PATCH) and f"f{written}.txt" in refused.err, refused.err
    assert (lap.root / f"f{written}.txt").read_text() == "my edit since\n"


def test_an_apply_refused_before_writing_keeps_the_last_undo_and_blocks_nothing(tmp_path, agent):
    lap, first = applied(tmp_path, agent)
    lap.ask(script({"write": "f0.txt", "text": LINES.replace("line 5 AI 0\n", "line 5 OTHER\n")}), "--no-apply", check=0)
    second = lap.last_job()
    (lap.root / "f0.txt").write_text(LINES.replace("line 5\n", "line 5 MINE\n"))  # overlaps the AI's
    assert lap.run("apply", second, "--yes").returncode == int(patchwire.ExitStatus.PATCH)
    (lap.root / "f0.txt").write_text(LINES.replace("line 5\n", "line 5 AI 0\n"))
    lap.run("apply", "--undo", check=0)  # the first apply's undo, kept
    assert as_before(lap)
    assert "Traceback" not in lap.run("log", check=0).err


def test_nohup_keeps_an_apply_going_when_the_terminal_closes(tmp_path, agent):
    lap = project(tmp_path, agent)
    proc = subprocess.Popen(lap.program + ["ask", script({"sleep": 1.5}, {"write": "f0.txt", "text": "x\n"}), "--yes"],
                            cwd=lap.root, env=lap.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup starts it
    time.sleep(1.0)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (lap.root / "f0.txt").read_text() == "x\n"


def test_a_log_line_without_its_time_is_skipped(tmp_path, agent):
    lap, job = applied(tmp_path, agent)
    with open(state(lap) / "applied.log", "a") as f:
        f.write(json.dumps({"job": "abc", "how": "plain", "files": ["a"], "conflicts": []}) + "\n")
    shown = lap.run("log", check=0)
    assert job in shown.out and "abc" not in shown.out and "Traceback" not in shown.err
