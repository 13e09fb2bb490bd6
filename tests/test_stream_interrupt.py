"""Ctrl-C while following a job (stream_job): the first warns, the second cancels the job on
the box wherever it lands. Real SIGINTs to this process, a real agent and a real hanging job;
the second signal is sent at the moment the old code missed: after the warning, while it
reconnects to the event stream (outside the loop's handler, so it exited 130 and the job ran on)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

import patchwire as pw
from conftest import script


class CtrlCOnReconnect(pw.Client):
    """A client that gets the user's second Ctrl-C as it reconnects to the event stream."""

    def events(self, job: str, after: int = 0, follow: bool = True):
        os.kill(os.getpid(), signal.SIGINT)
        return super().events(job, after, follow)


class Interrupted(pw.Session):
    @property
    def client(self) -> pw.Client:
        return CtrlCOnReconnect(self.cfg.agent, self.cfg.token())


def hanging_job(laptop) -> str:
    """A running job whose AI never ends; the CLI that asked it is gone (SIGKILL)."""
    proc = subprocess.Popen(laptop.program + ["ask", script({"hang": True}), "--yes"], cwd=laptop.root,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=laptop.env)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while b"Thinking for a long time" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([proc.stderr], [], [], 1)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return laptop.last_job()


def test_second_ctrl_c_while_reconnecting_cancels_the_job(laptop, agent, capsys):
    job = hanging_job(laptop)
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["status"] == "running"
    session = Interrupted(pw.LaptopConfig.find(laptop.root))

    def first_ctrl_c_after_one_event():
        for event in pw.Client(session.cfg.agent, session.cfg.token()).events(job):
            yield event
            os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as in a terminal, even when this suite runs in the background with SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pw.stream_job(session, first_ctrl_c_after_one_event(), lambda event: None)
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert f"job {job} keeps running on the box. Press Ctrl-C again" in err
    assert f"job {job} is cancelled" in err
    assert agent.wait_job(job)["status"] == "cancelled"
