"""Ask and walk away: `ask --detach` queues and leaves; `wait`, in another process, follows the
job from where it is and applies exactly what `ask` would; a wait that took long enough ends with
a desktop notification whose box text is sanitised (a fake `notify-send` first on PATH records
its argv). Real agent, real laptop CLI, the stand-in AI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from conftest import Laptop, make_repo, script, tree_digest, wait_until


def fake_notify_send(folder: Path) -> Path:
    """A `notify-send` that appends its argv (one JSON line per call) to a file."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "calls.jsonl"
    program = folder / "notify-send"
    program.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                       f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return record


def desktop_env(folder: Path) -> dict:
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nowhere"}


def with_notify(lap: Laptop, table: str) -> None:
    config = lap.root / ".patchwire.toml"
    config.write_text(config.read_text() + "\n[notify]\n" + table)


def test_detach_then_wait_in_another_process_applies_the_same_bytes(tmp_path, make_agent):
    box = make_agent()
    gate = tmp_path / "gate"
    steps = ({"wait_file": str(gate)}, {"write": "src/new.py", "text": "x = 1\n"},
             {"append": "README.md", "text": "more\n"})
    # the same job through a plain attached `ask --yes`, for the bytes to compare with
    plain = Laptop(make_repo(tmp_path / "plain", {"README.md": b"# demo\n"}))
    plain.init(box)
    gate.write_text("open")
    plain.ask(script(*steps), "--yes", check=0)
    gate.unlink()

    lap = Laptop(make_repo(tmp_path / "lap", {"README.md": b"# demo\n"}))
    lap.init(box)
    detached = lap.ask(script(*steps), "--detach", check=0)
    job = lap.last_job()
    assert f"`patchwire wait {job}`" in detached.err and f"`patchwire cancel {job}`" in detached.err
    assert not (lap.root / "src/new.py").exists()
    assert box.json("GET", f"/v1/jobs/{job}")[1]["status"] in ("queued", "running")

    err = tmp_path / "wait.err"
    with open(err, "wb") as stderr:  # a new process, no JOB: all of mine here
        waiting = subprocess.Popen(lap.program + ["wait", "--yes"], cwd=lap.root, env=lap.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_until(lambda: f"following job {job}".encode() in err.read_bytes(), 30, "wait to follow the job")
        gate.write_text("open")  # the job goes on only once `wait` follows it
        assert waiting.wait(timeout=60) == 0, err.read_text()
    assert f"applied job {job}" in err.read_text()
    own = (".git", ".patchwire.toml")  # the config names each project
    assert tree_digest(lap.root, own) == tree_digest(plain.root, own)
    assert (lap.root / "src/new.py").read_bytes() == b"x = 1\n"
    elsewhere = lap.run("wait", plain.last_job())  # its change belongs to the other project's files
    assert elsewhere.returncode == 2 and "is of project plain, not lap" in elsewhere.err


def test_wait_with_nothing_running_says_so_and_a_finished_job_is_still_offered(laptop, agent):
    nothing = laptop.run("wait", check=0)
    assert "no queued or running job of yours" in nothing.err
    laptop.ask(script({"write": "done.txt", "text": "ok\n"}), "--detach", check=0)
    job = laptop.last_job()
    agent.wait_job(job)
    later = laptop.run("wait", "--json", "--yes", check=0)  # ended before `wait`: still found, as detached here
    outcome = json.loads(later.out.splitlines()[-1])
    assert outcome["type"] == "outcome" and outcome["applied"] and outcome["files"] == ["done.txt"]
    assert (laptop.root / "done.txt").read_text() == "ok\n"
    again = laptop.run("wait", job[:6], "--yes", check=0)  # by prefix; never applied twice
    assert f"job {job} is already applied here" in again.err and "applied job" not in again.err
    assert "no queued or running" in laptop.run("wait", check=0).err  # offered once: no longer "detached here"


def test_a_long_wait_ends_with_a_desktop_notification_of_sanitised_text(tmp_path, laptop):
    record = fake_notify_send(tmp_path / "bin")
    with_notify(laptop, "after_s = 0\n")
    laptop.ask(script({"write": "a.txt", "text": "a\n"}, {"write": "b.txt", "text": "b\n"}), "--yes", check=0,
               env=desktop_env(tmp_path / "bin"))
    job = laptop.last_job()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [["--app-name=Patchwire", "--", f"Patchwire: job {job} done", "laptop: 2 file(s) changed"]]

    hostile = "boom \x1b]0;owned\x07\x1b[2J <a href='https://evil.example/'>sign in</a> & <img src='file:///etc/passwd'/>"
    failed = laptop.ask(script({"error": hostile}), "--yes", env=desktop_env(tmp_path / "bin"))
    assert failed.returncode == 4
    title, body = json.loads(record.read_text().splitlines()[-1])[2:]
    assert title == f"Patchwire: job {laptop.last_job()} failed"
    assert "boom ^[]0;owned^G^[[2J" in body and "\x1b" not in body and "\x07" not in body
    # the body is markup to notification daemons: the box's tags show as text, none is read
    assert "&lt;a href='https://evil.example/'&gt;sign in&lt;/a&gt; &amp; &lt;img" in body and "<" not in body


def test_a_short_wait_or_desktop_off_shows_nothing(tmp_path, laptop):
    record = fake_notify_send(tmp_path / "bin")
    laptop.ask(script({"write": "a.txt", "text": "a\n"}), "--yes", check=0, env=desktop_env(tmp_path / "bin"))
    with_notify(laptop, "desktop = false\nafter_s = 0\n")
    laptop.ask(script({"write": "b.txt", "text": "b\n"}), "--yes", check=0, env=desktop_env(tmp_path / "bin"))
    assert not record.exists()  # the first took under the default 30 s, the second had it off


def test_ctrl_c_message_and_cancel_name_the_detached_job(laptop, agent, tmp_path):
    gate = tmp_path / "never"
    laptop.ask(script({"wait_file": str(gate)}), "--detach", check=0)
    job = laptop.last_job()
    wait_until(lambda: agent.json("GET", f"/v1/jobs/{job}")[1]["status"] == "running", 30, "the job to start")
    laptop.run("cancel", job, check=0)
    ended = laptop.run("wait", job)
    assert ended.returncode == 4 and f"job {job} cancelled" in ended.err, ended.err
