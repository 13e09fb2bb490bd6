"""The agent's job engine with real processes: warm job folders, slots, cancel, Ctrl-C,
SIGKILL of the agent, results, pluggable AI commands and their environment."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Laptop, ask_body, pid_alive, script, tree_digest, wait_until


def slot_dir(agent, slot: int, project: str = "laptop", user: str = "alice") -> Path:
    return agent.state_dir / "users" / user / "projects" / project / "slots" / f"slot{slot}"




def start_ask(laptop: Laptop, prompt: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(laptop.program + ["ask", prompt, *extra], cwd=laptop.root,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=laptop.env, preexec_fn=ctrl_c_as_on_a_terminal)


def ctrl_c_as_on_a_terminal() -> None:
    """SIGINT back to its default in the child, as in a terminal. A suite started in the
    background of a non-interactive shell (`pytest ... &`) runs with SIGINT ignored, every
    child inherits that, and Python then never raises KeyboardInterrupt: the Ctrl-C tests
    waited 30 s for a warning that could not come (the 'flakes under load')."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(stream, *needles: str, timeout: float = 30) -> str:
    """What `stream` gave up to the first of `needles`."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not any(needle.encode() in seen for needle in needles):
        left = deadline - time.monotonic()
        assert left > 0, f"{needles!r} not seen in: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"stream ended before {needles!r}: {seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


# ------------------------------------------------------------------ warm job folders


def test_build_cache_survives_and_strays_are_gone(laptop, agent):
    laptop.ask(script({"write": "build/cache.bin", "text": "incremental\n"},
                      {"write": "stray.txt", "text": "left behind\n"}), "--no-apply", check=0)
    first = laptop.last_job()
    slot = agent.json("GET", f"/v1/jobs/{first}")[1]["slot"]
    folder = slot_dir(agent, slot)
    (folder / ".dart_tool").mkdir()
    (folder / "src" / "scratch.py").write_bytes(b"stray edit\n")
    # the laptop moves on: one file changes
    (laptop.root / "src/app.py").write_bytes(b"print('v2')\n")
    laptop.ask(script({"say": "checking"}), "--no-apply", check=0)
    second = agent.json("GET", f"/v1/jobs/{laptop.last_job()}")[1]
    assert second["slot"] == slot
    assert (folder / "build/cache.bin").read_bytes() == b"incremental\n"  # ignored: survives
    assert not (folder / "stray.txt").exists()  # not ignored: gone
    assert not (folder / "src/scratch.py").exists()
    assert (folder / "src/app.py").read_bytes() == b"print('v2')\n"


def test_a_broken_job_folder_is_rebuilt(laptop, agent):
    laptop.ask(script({"say": "one"}), "--no-apply", check=0)
    slot = agent.json("GET", f"/v1/jobs/{laptop.last_job()}")[1]["slot"]
    gitdir = agent.state_dir / "users/alice/projects/laptop/git/worktrees" / f"slot{slot}"
    (gitdir / "index").write_bytes(b"this is not an index")
    (gitdir / "HEAD").write_bytes(b"garbage\n")
    laptop.ask(script({"write": "README.md", "text": "# rebuilt\n"}), "--yes", check=0)
    assert (laptop.root / "README.md").read_bytes() == b"# rebuilt\n"
    assert "rebuilding it" in agent.read_log()


def test_parallel_jobs_get_their_own_slots(laptop, make_agent, tmp_path):
    box = make_agent(jobs={"workers": 2, "slots": 2})
    laptop.init(box)
    laptop.run("sync", check=0)
    a = start_ask(laptop, script({"sleep": 5}, {"write": "a.txt", "text": "a\n"}), "--no-apply")
    read_until(a.stderr, "AI started")
    b = start_ask(laptop, script({"write": "b.txt", "text": "b\n"}), "--no-apply")
    assert b.wait(60) == 0 and a.wait(60) == 0
    jobs = box.json("GET", "/v1/jobs")[1]["jobs"]
    assert sorted(j["slot"] for j in jobs[:2]) == [0, 1]
    # a third job reuses a slot
    laptop.ask(script({"say": "again"}), "--no-apply", check=0)
    assert box.json("GET", "/v1/jobs")[1]["jobs"][0]["slot"] in (0, 1)
    assert not slot_dir(box, 2).exists()


# ------------------------------------------------------------------ cancel, Ctrl-C


def test_cancel_a_running_job_ends_its_process_group(laptop, agent, tmp_path):
    pidfile = tmp_path / "pids"
    proc = start_ask(laptop, script({"say": "starting"}, {"hang": True, "pidfile": str(pidfile)}), "--yes")
    read_until(proc.stderr, "Thinking for a long time")
    job = laptop.last_job()
    cancelled = laptop.run("cancel", job[:5], check=0)
    assert "is cancelled" in cancelled.err
    assert proc.wait(30) == 4
    leader, child = map(int, pidfile.read_text().split())
    wait_until(lambda: not pid_alive(leader) and not pid_alive(child), what="AI processes to end")
    info = agent.json("GET", f"/v1/jobs/{job}")[1]
    assert info["status"] == "cancelled" and "cancelled by alice" in info["reason"]
    texts = [e.get("text") for e in agent.events(job) if e["type"] == "text"]
    assert "starting" in texts  # what the AI said is kept
    status, body = agent.json("DELETE", f"/v1/jobs/{job}")
    assert status == 409 and "already cancelled" in body["error"]


def test_cancel_ignoring_term_gets_killed(laptop, agent, tmp_path):
    pidfile = tmp_path / "pids"
    proc = start_ask(laptop, script({"hang": True, "pidfile": str(pidfile), "ignore_term": True}), "--yes")
    read_until(proc.stderr, "Thinking for a long time")
    agent.json("DELETE", f"/v1/jobs/{laptop.last_job()}")
    leader, _ = map(int, pidfile.read_text().split())
    wait_until(lambda: not pid_alive(leader), timeout=20, what="KILL after the grace period")
    assert proc.wait(30) == 4


def test_cancel_a_queued_job(laptop, make_agent):
    box = make_agent(jobs={"workers": 1})
    laptop.init(box)
    laptop.run("sync", check=0)
    status, running = box.json("POST", "/v1/ask", ask_body(laptop, script({"sleep": 30})))
    status, queued = box.json("POST", "/v1/ask", ask_body(laptop, script({"say": "never"})))
    assert box.json("GET", f"/v1/jobs/{queued['id']}")[1]["status"] == "queued"
    assert box.json("DELETE", f"/v1/jobs/{queued['id']}")[1]["status"] == "cancelled"
    assert [e["type"] for e in box.events(queued["id"])] == ["queued", "cancelled"]
    box.json("DELETE", f"/v1/jobs/{running['id']}")


def test_ctrl_c_leaves_and_the_job_runs_on(laptop, agent):
    proc = start_ask(laptop, script({"hang": True}), "--yes")
    read_until(proc.stderr, "Thinking for a long time")
    job = laptop.last_job()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert f"patchwire cancel {job}" in proc.stderr.read().decode()
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["status"] == "running"
    agent.json("DELETE", f"/v1/jobs/{job}")


# ------------------------------------------------------------------ crash recovery


def test_sigkill_of_the_agent_mid_job(laptop, make_agent, tmp_path):
    box = make_agent(jobs={"workers": 1})
    laptop.init(box)
    laptop.run("sync", check=0)
    mirror = box.state_dir / "users/alice/mirror/laptop"
    before = tree_digest(mirror)
    pidfile = tmp_path / "pids"
    status, running = box.json("POST", "/v1/ask", ask_body(
        laptop, script({"write": "half.txt", "text": "half\n"}, {"hang": True, "pidfile": str(pidfile)})))
    status, queued = box.json("POST", "/v1/ask", ask_body(laptop, script({"write": "q.txt", "text": "q\n"})))
    wait_until(pidfile.exists, what="the AI to start")
    box.kill()
    leader, child = map(int, pidfile.read_text().split())
    assert pid_alive(leader) and pid_alive(child)  # the AI's group outlives a SIGKILLed agent
    box.start()
    wait_until(lambda: not pid_alive(leader) and not pid_alive(child), what="recovery to end the AI")
    info = box.wait_job(running["id"])
    assert info["status"] == "failed" and info["reason"] == "agent restarted while the job ran"
    assert box.wait_job(queued["id"])["status"] == "done"  # the queued job ran, it did not vanish
    assert b"+q" in box.request("GET", f"/v1/jobs/{queued['id']}/diff")[2]
    assert b"half" not in box.request("GET", f"/v1/jobs/{queued['id']}/diff")[2]
    assert not (slot_dir(box, 0) / "half.txt").exists()
    assert tree_digest(mirror) == before


# ------------------------------------------------------------------ results


def test_results_are_recorded(laptop, agent):
    laptop.ask(script({"write": "README.md", "text": "# one\n# two\n"}), "--no-apply", check=0)
    job = agent.json("GET", f"/v1/jobs/{laptop.last_job()}")[1]
    result = job["result"]
    assert result["exit_code"] == 0 and result["is_error"] is False
    assert result["num_turns"] == 2 and result["tokens_in"] == 120 and result["tokens_out"] == 45
    assert result["cost_usd"] == 0.0123 and result["session_id"] and result["duration_s"] > 0
    assert job["stats"] == {"files": 1, "added": 2, "removed": 1, "binary": 0}
    listing = laptop.run("jobs", check=0).out
    assert listing.splitlines()[1].startswith(job["id"]) and "done" in listing and "+2 -1" in listing
    shown = laptop.run("show", job["id"][:6], check=0)
    assert "status:   done" in shown.out and "> Write README.md" in shown.err


def test_timeout_per_ask_is_capped(laptop, make_agent):
    box = make_agent(ai={"timeout_s": 30, "max_timeout_s": 60})
    laptop.init(box)
    result = laptop.ask("x", "--timeout", "61", "--yes")
    assert result.returncode == 3 and "timeout_s must be 1..60 seconds" in result.err
    result = laptop.ask(script({"sleep": 10}), "--timeout", "1", "--yes")
    assert result.returncode == 4 and "timed out after 1 s" in result.err


# ------------------------------------------------------------------ pluggable AI


PLAIN_AI = r"""
import os, sys
prompt = sys.stdin.read()
print("plain agent got: " + prompt.strip())
open("plain.txt", "w").write("written by a plain agent\n")
print("env:", ",".join(sorted(k for k in os.environ if k.startswith(("PATCHWIRE", "GIT_", "EXTRA")))))
print("EXTRA_SETTING=" + os.environ.get("EXTRA_SETTING", ""))
"""


def test_any_cli_runs_and_plain_text_passes_through(laptop, make_agent, tmp_path):
    program = tmp_path / "plain_ai.py"
    program.write_text(PLAIN_AI)
    box = make_agent(ai_command=[sys.executable, str(program)], ai={"env": {"EXTRA_SETTING": "on"}},
                     env={"PATCHWIRE_SECRET": "agent-only", "GIT_DIR": "/nonexistent"})
    laptop.init(box)
    result = laptop.ask("hello plain", "--yes", env={"PATCHWIRE_LAPTOP_ONLY": "1"}, check=0)
    assert "plain agent got: hello plain" in result.err
    assert (laptop.root / "plain.txt").read_bytes() == b"written by a plain agent\n"
    outputs = [e["text"] for e in box.events(laptop.last_job()) if e["type"] == "output"]
    assert "env: EXTRA_SETTING" in outputs  # no PATCHWIRE_* or GIT_* reached the AI
    assert "EXTRA_SETTING=on" in outputs


def test_stand_in_sees_only_the_allowed_environment(laptop, make_agent, tmp_path):
    log = tmp_path / "ai.log"
    box = make_agent(ai={"env": {"STAND_IN_LOG": str(log)}}, env={"AGENT_ONLY_VAR": "1", "LC_TIME": "C"})
    laptop.init(box)
    laptop.ask(script({"say": "hi"}), "--yes", env={"LAPTOP_ONLY_VAR": "1"}, check=0)
    seen = json.loads(log.read_text().splitlines()[-1])
    # an allowlist: the agent's own variables stay with the agent, the laptop's never arrive
    assert "AGENT_ONLY_VAR" not in seen["env"] and "LAPTOP_ONLY_VAR" not in seen["env"]
    assert {"PATH", "HOME", "LC_TIME", "STAND_IN_LOG"} <= set(seen["env"])
    assert seen["cwd"] == str(slot_dir(box, 0))
    assert seen["argv"][:5] == ["--print", "--output-format", "stream-json", "--verbose", "--permission-mode"]


def test_background_children_of_the_ai_do_not_outlive_the_job(laptop, make_agent, tmp_path):
    pidfile = tmp_path / "bg.pid"
    ai = ["sh", "-c", f"cat >/dev/null; sleep 300 & echo $! > {pidfile}; echo made > made.txt"]
    box = make_agent(ai_command=ai)
    laptop.init(box)
    laptop.ask("go", "--yes", check=0)
    assert (laptop.root / "made.txt").read_bytes() == b"made\n"
    wait_until(lambda: not pid_alive(int(pidfile.read_text())), what="the background sleep to end")


def test_the_box_users_global_git_excludes_do_not_hide_the_ais_files(laptop, make_agent, tmp_path):
    home = tmp_path / "boxhome"
    (home / ".config/git").mkdir(parents=True)
    (home / ".config/git/ignore").write_text("*.log\n")
    (home / ".gitconfig").write_text("[core]\n\texcludesFile = ~/.config/git/ignore\n\tautocrlf = true\n")
    box = make_agent(env={"HOME": str(home)})
    laptop.init(box)
    laptop.ask(script({"write": "run.log", "text": "kept\r\n"}), "--yes", check=0)
    assert (laptop.root / "run.log").read_bytes() == b"kept\r\n"
