"""Following a job from `ask` (issue 22): Ctrl-C on a real terminal leaves at once and the job
runs on; an agent restarted mid-job (SIGTERM with grace, then a start on the same port) costs
one reconnect line and the ask still ends with the job's result. Real pseudo-terminal, real
agent, real signals."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

from conftest import AgentProcess, Laptop, make_repo, script
from sshd import free_port
from test_jobs import read_until, start_ask


def read_pty(fd: int, out: bytearray, until: bytes, timeout: float = 30) -> None:
    """Read the terminal into `out` until `until` shows (or the child closes it)."""
    deadline = time.monotonic() + timeout
    while until not in out:
        assert time.monotonic() < deadline, out.decode(errors="replace")
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            out += chunk


def ask_on_a_terminal(lap: Laptop, prompt: str) -> "tuple[int, int]":
    """(pid, terminal fd) of `patchwire ask PROMPT` with a pty as its controlling terminal."""
    pid, fd = pty.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal, even under a background suite
        os.chdir(lap.root)
        os.execvpe(lap.program[0], lap.program + ["ask", prompt], {**lap.env, "TERM": "dumb"})
    return pid, fd


def test_the_first_ctrl_c_leaves_at_once_the_job_finishes_and_wait_applies_it(laptop, agent, tmp_path):
    gate = tmp_path / "gate"
    pid, fd = ask_on_a_terminal(laptop, script({"say": "Thinking for a long time"}, {"wait_file": str(gate)},
                                                {"write": "after.txt", "text": "finished on the box\n"}))
    out = bytearray()
    try:
        read_pty(fd, out, b"Thinking for a long time")
        job = laptop.last_job()
        os.write(fd, b"\x03")  # the terminal sends SIGINT to its foreground process group
        t0 = time.monotonic()
        read_pty(fd, out, b"\0never", timeout=8)  # until the CLI has left and closed the terminal
        left = time.monotonic() - t0
    finally:
        ended = os.waitpid(pid, os.WNOHANG)  # reaps it when it has left already
        if ended == (0, 0):
            os.kill(pid, signal.SIGKILL)  # it did not leave: the failure is reported above
            ended = os.waitpid(pid, 0)
        status = ended[1]
    text = out.decode(errors="replace")
    assert left < 5
    assert os.waitstatus_to_exitcode(status) == 130, text
    assert f"left job {job}; it keeps running on the box" in text
    for command in ("wait", "show", "apply", "cancel"):
        assert f"`patchwire {command} {job}`" in text
    assert "Traceback" not in text and "Enter applies" not in text
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["status"] == "running"
    gate.write_text("open")
    assert agent.wait_job(job)["status"] == "done"  # nobody attached: it ran to its end on the box
    assert not (laptop.root / "after.txt").exists()
    laptop.run("wait", job, "--yes", check=0)
    assert (laptop.root / "after.txt").read_text() == "finished on the box\n"



def test_an_agent_restarted_mid_job_costs_one_reconnect_line_and_the_ask_applies(tmp_path, make_agent):
    box, lap = restartable_agent_and_laptop(tmp_path, make_agent)
    proc = start_ask(lap, script({"say": "working"}, {"run": ["sleep", "1.5"], "out": "slept.txt"},
                                 {"write": "new.txt", "text": "made\n"}), "--yes")
    seen = read_until(proc.stderr, "working")
    assert box.stop() == 0  # SIGTERM: the job finishes within the grace, the agent exits
    box.start()
    out, err = proc.communicate(timeout=60)
    said_one_reconnect_and_applied(lap, proc, seen + err.decode(errors="replace"))


def test_a_laptop_asleep_while_the_agent_restarts_after_the_job_costs_one_line_and_the_ask_applies(
        tmp_path, make_agent):
    """The job ends while the laptop is stopped (SIGSTOP: a closed lid); the agent restarts
    after the job's end and is down when the laptop wakes, before it fetched the diff. The
    laptop says so once, tries again, and applies the job's result from the restarted agent."""
    box, lap = restartable_agent_and_laptop(tmp_path, make_agent)
    gate = tmp_path / "gate"
    proc = start_ask(lap, script({"write": "new.txt", "text": "made\n"}, {"say": "written"},
                                 {"wait_file": str(gate)}), "--yes")
    try:
        seen = read_until(proc.stderr, "written")
        job = lap.last_job()
        proc.send_signal(signal.SIGSTOP)
        gate.write_text("open")
        assert box.wait_job(job)["status"] == "done"
        assert box.stop() == 0  # the agent is down when the laptop wakes
        proc.send_signal(signal.SIGCONT)
        seen += read_until(proc.stderr, "lost the event stream", "trying again")
        box.start()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failure above: do not leave it stopped
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    said_one_reconnect_and_applied(lap, proc, seen + err.decode(errors="replace"))


def restartable_agent_and_laptop(tmp_path, make_agent) -> "tuple[AgentProcess, Laptop]":
    """An agent on a port of its own (it starts again on the same one) that lets running jobs
    finish for 30 s when stopped, and a one-file project set up for it."""
    box = make_agent(server={"listen": f"127.0.0.1:{free_port()}", "shutdown_grace_s": 30})
    lap = Laptop(make_repo(tmp_path / "lap", {"README.md": b"# demo\n"}))
    lap.init(box)
    return box, lap


def said_one_reconnect_and_applied(lap: Laptop, proc: subprocess.Popen, err: str) -> None:
    assert proc.returncode == 0, err
    assert err.count("lost the event stream") + err.count("trying again") == 1, err
    assert "patchwire: " not in err and "applied job" in err, err
    assert (lap.root / "new.txt").read_text() == "made\n"
