"""A cancel that lands after a worker took the job from the queue but before the worker made
its run (the gap between `FairQueue.take` and `runs[job] = run`): the job ends cancelled and
the AI never starts. Driven in-process, step by step, so the gap is hit every time. Also in
process: one user's slow listing of their projects holds no other user's request."""

from __future__ import annotations

import sys
import threading
import time

import patchwire_agent as pa
from conftest import queue_one_job


def test_a_cancel_between_the_claim_and_the_run_stops_the_job_before_the_ai(tmp_path):
    marker = tmp_path / "the-ai-ran"
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {
        "server": {"state_dir": str(tmp_path / "state")},
        "ai": {"command": [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"], "sandbox": "none"},
        "users": {"alice": {"token_sha256": pa.token_digest("t").hex()}}})
    agent = pa.Agent(cfg)  # no workers: this test is the worker
    queue_one_job(agent, "abc123")
    item = agent.queue.take(agent._claim)  # a worker has taken it; its run does not exist yet
    assert item is not None and item.job_id == "abc123"

    answer: dict = {}
    cancelling = threading.Thread(target=lambda: answer.update(agent.cancel("alice", "abc")))
    cancelling.start()
    deadline = time.monotonic() + 30
    while "abc123" not in agent.cancel_early and time.monotonic() < deadline:
        time.sleep(0.01)  # until the cancel has been heard
    assert agent.cancel_early == {"abc123": "cancelled by alice"}
    agent.run_job(item)  # the worker goes on: it makes the run, and finds the cancel
    cancelling.join(30)
    assert answer["status"] == "cancelled" and answer["reason"] == "cancelled by alice"
    assert not marker.exists(), "the AI ran after its job was cancelled"
    assert agent.cancel_early == {}
    events = [e["type"] for e in agent.store.events("abc123", 0)]
    assert events[-1] == "cancelled" and "started" not in events
    agent.stop()


def test_one_users_slow_project_listing_holds_no_other_user(tmp_path, monkeypatch):
    """open_project lists the user's mirror root, which that user's rsync key can fill with a
    million folders: while bob's listing is held, alice's project opens at once."""
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {
        "server": {"state_dir": str(tmp_path / "state")}, "ai": {"command": ["true"], "sandbox": "none"},
        "users": {name: {"token_sha256": pa.token_digest(name).hex()} for name in ("alice", "bob")}})
    agent = pa.Agent(cfg)
    listing, held, release = pa.user_projects, threading.Event(), threading.Event()

    def slow_for_bob(state_dir, user):
        if user == "bob":
            held.set()
            release.wait(30)
        return listing(state_dir, user)

    monkeypatch.setattr(pa, "user_projects", slow_for_bob)
    bob = threading.Thread(target=agent.open_project, args=("bob", "web"))
    bob.start()
    assert held.wait(30)
    opened = threading.Thread(target=agent.open_project, args=("alice", "app"))
    opened.start()
    opened.join(10)
    alive = opened.is_alive()
    release.set()
    bob.join(30)
    opened.join(30)
    assert not alive, "alice waited for bob's listing"
    assert (pa.mirror_root(cfg.state_dir, "alice") / "app").is_dir()
    assert (pa.mirror_root(cfg.state_dir, "bob") / "web").is_dir()
    agent.stop()
