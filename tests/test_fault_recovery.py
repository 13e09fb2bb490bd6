"""Faults (issue 9): the AI killed, hanging, printing garbage and 10 MB lines; the agent
killed mid-stream and restarted; a client dropping mid-stream and resuming with ?after=N;
the state folder's disk full. After each: the mirror and the laptop byte-identical to
before, and every job in a stated end state with a reason.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import urllib.parse
from pathlib import Path

import pytest

import patchwire_agent as pa
from conftest import Laptop, ask_body, fill_disk, make_repo, pid_alive, script, tomli_w, tomllib, tree_digest, wait_until
from test_jobs import read_until, start_ask

TERMINAL = {"done", "failed", "cancelled"}


class Before:
    """The mirror's and the laptop's bytes, to compare after a fault."""

    def __init__(self, box, lap: Laptop, project: str = "laptop"):
        self.mirror = box.state_dir / "users/alice/mirror" / project
        self.lap = lap
        self.digests = (tree_digest(self.mirror), tree_digest(lap.root))

    def unchanged(self) -> bool:
        return (tree_digest(self.mirror), tree_digest(self.lap.root)) == self.digests


def all_jobs_ended(box) -> list:
    jobs = box.json("GET", "/v1/jobs")[1]["jobs"]
    assert all(j["status"] in TERMINAL for j in jobs), [(j["id"], j["status"]) for j in jobs]
    assert all(j["reason"] for j in jobs if j["status"] != "done")
    return jobs


def synced(box, tmp_path) -> Laptop:
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# demo\n", "src/app.py": b"print(1)\n"}))
    lap.init(box)
    lap.run("sync", check=0)
    return lap


def processes_in(folder: Path) -> list:
    """Pids whose working directory is in `folder` (what an AI run leaves behind)."""
    found, root = [], os.path.realpath(folder)
    for name in os.listdir("/proc"):
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if name.isdigit() and (cwd == root or cwd.startswith(root + "/")) and pid_alive(int(name)):
            found.append(int(name))
    return found


# ------------------------------------------------------------------ the AI misbehaves


def test_ai_killed_with_sigkill(make_agent, tmp_path):
    box = make_agent()
    lap = synced(box, tmp_path)
    before = Before(box, lap)
    pidfile = tmp_path / "pids"
    proc = start_ask(lap, script({"write": "half.txt", "text": "half\n"}, {"hang": True, "pidfile": str(pidfile)}),
                     "--yes")
    read_until(proc.stderr, "Thinking for a long time")
    leader, child = map(int, pidfile.read_text().split())
    os.kill(leader, signal.SIGKILL)
    assert proc.wait(60) == 4
    err = proc.stderr.read().decode()
    assert "the AI command was killed by signal SIGKILL" in err
    wait_until(lambda: not pid_alive(child), what="the AI's child to be ended with its group")
    assert before.unchanged()
    [job] = all_jobs_ended(box)
    assert job["status"] == "failed" and job["reason"] == "the AI command was killed by signal SIGKILL"


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_ai_hanging_ends_at_its_timeout_with_everything_it_started(make_agent, tmp_path, sandbox):
    if sandbox == "bwrap" and not pa.probe_bwrap()[0]:
        pytest.skip("bubblewrap cannot run here: " + pa.probe_bwrap()[1])
    box = make_agent(ai={"sandbox": sandbox})
    lap = synced(box, tmp_path)
    before = Before(box, lap)
    status, job = box.json("POST", "/v1/ask", ask_body(lap, script({"hang": True}), timeout_s=1))
    job = box.wait_job(job["id"], timeout=30)
    assert job["status"] == "failed" and job["reason"] == "timed out after 1 s"
    slots = box.state_dir / "users/alice/projects/laptop/slots"
    wait_until(lambda: not processes_in(slots), what="the AI and its child to end")
    assert before.unchanged()
    all_jobs_ended(box)


# (line, whether it becomes an `output` event): unexpected shapes do; valid ones are read
GARBAGE = [
    ("plain text, not JSON", True),
    ('{"no_type": 1}', True),  # after the init line this raised KeyError and killed the reader
    ('{"type": 5}', True),
    ('{"type": "assistant", "message": "not an object"}', True),
    ('{"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "Bash", "input": [1]}]}}', True),
    ('{"type": "user", "message": {"content": "a plain string is valid"}}', False),
    ('{"type": "result", "usage": [1], "permission_denials": 5, "subtype": "success", "is_error": false}', False),
    ('{"type": "a_type_from_a_newer_cli"}', False),
    ("[1, 2, 3]", True),
    ("\x01\x1b[31m control characters", True),
]


def test_ai_printing_garbage_and_10_mb_lines(make_agent, tmp_path):
    box = make_agent()
    lap = synced(box, tmp_path)
    steps = [{"raw": line} for line, _ in GARBAGE] + [
        {"raw_big": 10 * 2**20}, {"raw_big": 10 * 2**20}, {"say": "still here"},
        {"write": "after.txt", "text": "written after the garbage\n"}]
    status, job = box.json("POST", "/v1/ask", ask_body(lap, script(*steps), timeout_s=120))
    job = box.wait_job(job["id"], timeout=120)
    assert job["status"] == "done", job
    events = box.events(job["id"])
    outputs = [e["text"] for e in events if e["type"] == "output"]
    for line, output in GARBAGE:
        assert (line in outputs) is output, line
    big = [t for t in outputs if t.startswith("xxxx")]
    assert len(big) == 2 and all(len(t) <= pa.MAX_EVENT_TEXT + 6 and t.endswith(" [...]") for t in big)
    assert "still here" in [e.get("text") for e in events if e["type"] == "text"]
    assert events[-1]["type"] == "finished"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert b"+written after the garbage" in box.request("GET", f"/v1/jobs/{job['id']}/diff")[2]


def test_a_prompt_with_a_lone_surrogate_is_refused_clearly(make_agent, tmp_path):
    box = make_agent()
    lap = synced(box, tmp_path)
    body = ask_body(lap, script({"write": "s.txt", "text": "s\n"}, text="odd \ud800 text"), timeout_s=30)
    status, answer = box.json("POST", "/v1/ask", body)
    assert status == 400 and "not valid Unicode" in answer["error"], answer  # refused with the body
    assert box.json("GET", "/v1/jobs")[1]["jobs"] == []


# ------------------------------------------------------------------ the agent and the client drop


def pin_port(box) -> None:
    """Make the agent come back on the port it has now (the laptop's config names it)."""
    data = tomllib.loads(box.config.read_text())
    data["server"]["listen"] = "127.0.0.1:" + box.url.rsplit(":", 1)[1]
    box.config.write_text(tomli_w.dumps(data))


def test_agent_killed_mid_stream_and_restarted(make_agent, tmp_path):
    box = make_agent()
    pin_port(box)
    lap = synced(box, tmp_path)
    before = Before(box, lap)
    pidfile = tmp_path / "pids"
    proc = start_ask(lap, script({"say": "starting"}, {"hang": True, "pidfile": str(pidfile)}), "--yes")
    read_until(proc.stderr, "Thinking for a long time")
    box.kill()
    box.start()  # same port: the laptop reconnects with ?after=N and sees the job's end
    assert proc.wait(60) == 4
    err = proc.stderr.read().decode()
    assert "lost the event stream" in err and "agent restarted while the job ran" in err
    leader, child = map(int, pidfile.read_text().split())
    wait_until(lambda: not pid_alive(leader) and not pid_alive(child), what="recovery to end the AI")
    assert before.unchanged()
    [job] = all_jobs_ended(box)
    events = box.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "failed" and events[-1]["reason"] == "agent restarted while the job ran"


def test_a_confined_ai_dies_with_a_killed_agent(make_agent, tmp_path):
    """Unconfined, the AI's group outlives a SIGKILLed agent until the restart ends it;
    under bubblewrap (--die-with-parent) it ends with the agent."""
    if not pa.probe_bwrap()[0]:
        pytest.skip("bubblewrap cannot run here: " + pa.probe_bwrap()[1])
    box = make_agent(ai={"sandbox": "bwrap"})
    lap = synced(box, tmp_path)
    before = Before(box, lap)
    status, job = box.json("POST", "/v1/ask", ask_body(lap, script({"say": "starting"}, {"hang": True})))
    slots = box.state_dir / "users/alice/projects/laptop/slots"
    wait_until(lambda: processes_in(slots), what="the AI to start")
    box.kill()
    wait_until(lambda: not processes_in(slots), what="the AI to end with the agent")
    box.start()
    info = box.wait_job(job["id"])
    assert info["status"] == "failed" and info["reason"] == "agent restarted while the job ran"
    assert before.unchanged()


def test_client_drops_mid_stream_and_resumes_with_after(make_agent, tmp_path):
    box = make_agent()
    lap = synced(box, tmp_path)
    url = urllib.parse.urlsplit(box.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    steps = [{"say": f"line {n}"} for n in range(5)] + [{"sleep": 0.3}, {"write": "r.txt", "text": "r\n"}]
    conn.request("POST", "/v1/ask", json.dumps(ask_body(lap, script(*steps))),
                 {"Authorization": "Bearer " + box.token, "Accept": "application/x-ndjson"})
    resp = conn.getresponse()
    first = [json.loads(resp.readline()) for _ in range(3)]
    conn.sock.close()  # the client leaves mid-stream
    conn.close()
    job = first[0]["job"]
    # it comes back: the rest, from where it was
    status, headers, body = box.request("GET", f"/v1/jobs/{job}/events?after={first[-1]['seq']}")
    rest = [json.loads(line) for line in body.splitlines() if line.strip()]
    seqs = [e["seq"] for e in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1]["type"] == "finished"
    assert box.events(job) == first + rest
    assert box.wait_job(job)["status"] == "done"


# ------------------------------------------------------------------ the state folder's disk full


def test_state_folder_disk_full(make_agent, tmp_path, small_disk):
    box = make_agent(start=False)
    data = tomllib.loads(box.config.read_text())
    data["server"]["state_dir"] = str(small_disk / "state")
    box.config.write_text(tomli_w.dumps(data))
    box.state_dir = small_disk / "state"
    box.start()
    lap = synced(box, tmp_path)
    assert lap.ask(script({"write": "ok.txt", "text": "fine\n"}), "--no-apply").returncode == 0
    before = Before(box, lap)

    # the AI fills the disk: its job fails with the reason, its leftovers are thrown away
    result = lap.ask(script({"fill": ["big.bin", 64]}), "--yes")
    assert result.returncode == 4, result.err
    assert "No space left on device" in result.err
    assert before.unchanged()
    assert not (box.state_dir / "users/alice/projects/laptop/slots/slot0/big.bin").exists()

    # something else fills it: asks are refused up front, nothing half made
    filler = fill_disk(small_disk)
    jobs_before = box.json("GET", "/v1/jobs")[1]["jobs"]
    result = lap.ask(script({"write": "never.txt", "text": "no\n"}), "--yes")
    assert result.returncode != 0 and "the box's disk is full" in result.err, result.err
    assert "free space on the box" in result.err and "Traceback" not in result.err
    assert box.json("GET", "/v1/jobs")[1]["jobs"] == jobs_before
    assert before.unchanged()

    # room again: the next ask works
    filler.unlink()
    result = lap.ask(script({"write": "again.txt", "text": "again\n"}), "--yes")
    assert result.returncode == 0, result.err
    assert (lap.root / "again.txt").read_bytes() == b"again\n"
    jobs = all_jobs_ended(box)
    assert [j["status"] for j in jobs] == ["done", "failed", "done"]
    box.stop()
