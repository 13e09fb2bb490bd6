"""Workers are shared fairly on a box with several users: by default no user holds every
worker (`[jobs] workers - 1` each), so another user's job starts at once instead of behind
someone's long jobs; the queue's estimates follow the order the jobs will really start in."""

from __future__ import annotations

import patchwire_agent as pa
from conftest import ask_body, script
from test_api import wait_for_event
from test_team import ask_as, edit_config, events_as, finish_all, gated, job_of, synced_laptop


def test_one_user_never_holds_every_worker(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"), jobs={"workers": 2})
    alice = ask_body(synced_laptop(tmp_path, agent, "alice"), script({"say": "alice"}))
    bob = ask_body(synced_laptop(tmp_path, agent, "bob"), script({"say": "bob"}))
    gate = tmp_path / "gate"
    long_ones = [ask_as(agent, "alice", {**alice, "prompt": gated(gate)})["id"] for _ in range(2)]
    wait_for_event(agent, long_ones[0], "started")
    assert job_of(agent, "alice", long_ones[1])["status"] == "queued"  # one worker is kept free
    quick = ask_as(agent, "bob", bob)["id"]
    assert finish_all(agent, {quick: "bob"})[quick]["status"] == "done"  # while alice's gate is shut
    assert job_of(agent, "alice", long_ones[0])["status"] == "running"
    assert job_of(agent, "alice", long_ones[1])["status"] == "queued"
    policy = agent.cli("policy", "alice")
    assert "max_running" in policy.stdout and "[jobs] workers - 1 (a shared box)" in policy.stdout, policy.stdout
    gate.write_text("go")
    assert all(i["status"] == "done" for i in finish_all(agent, {j: "alice" for j in long_ones}).values())


def test_a_policy_key_lets_a_user_take_every_worker(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"), jobs={"workers": 2})
    edit_config(agent, lambda data: data.setdefault("policy", {}).update({"max_running": 2}))
    alice = ask_body(synced_laptop(tmp_path, agent, "alice"), script({"say": "alice"}))
    gate = tmp_path / "gate"
    long_ones = [ask_as(agent, "alice", {**alice, "prompt": gated(gate)})["id"] for _ in range(2)]
    for job in long_ones:
        wait_for_event(agent, job, "started")
    gate.write_text("go")
    finish_all(agent, {j: "alice" for j in long_ones})


def test_a_single_user_box_keeps_every_worker(tmp_path):
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {"jobs": {"workers": 3},
                         "users": {"solo": {"token_sha256": "0" * 64}}})
    policy = cfg.policy("solo")
    assert policy.max_running == 3 and policy.sources["max_running"] == "[jobs] workers"


def test_estimates_follow_the_order_jobs_really_start_in():
    # two workers; alice runs one job (100 s left) and may run one at a time; her three queued
    # jobs come first in the fair order, bob's one after them: bob's starts at once
    order = [("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("a4", "alice")]
    plan = pa.plan_starts(order, [("alice", 100.0)], workers=2, limits={"alice": 1, "bob": 1}, average=60.0)
    assert plan["b1"] == (0, 0.0)
    assert plan["a2"] == (1, 100.0) and plan["a3"] == (2, 160.0) and plan["a4"] == (3, 220.0)
    # without limits in the way the fair order is the start order, a worker at a time
    plan = pa.plan_starts(order, [("alice", 10.0)], workers=2, limits={"alice": 2, "bob": 2}, average=60.0)
    assert [plan[j] for j, _ in order] == [(0, 0.0), (1, 10.0), (2, 60.0), (3, 70.0)]


def test_the_waiting_job_hears_the_real_estimate(make_agent, tmp_path):
    """alice's second job waits for her first (her limit keeps a worker free): its estimate is
    what is left of her first job, not "now" because a worker is idle."""
    agent = make_agent(users=("alice", "bob"), jobs={"workers": 2})
    lap = synced_laptop(tmp_path, agent, "alice")
    timed = ask_as(agent, "alice", ask_body(lap, script({"sleep": 4})))["id"]  # a history: runs take ~4 s
    finish_all(agent, {timed: "alice"})
    gate = tmp_path / "gate"
    first = ask_as(agent, "alice", ask_body(lap, gated(gate)))["id"]
    wait_for_event(agent, first, "started")
    second = ask_as(agent, "alice", ask_body(lap, script({"say": "next"})))["id"]
    queued = [e for e in events_as(agent, "alice", second) if e["type"] == "queued"]
    assert queued[0]["position"] == 0 and queued[0]["estimate_s"] >= 2, queued
    gate.write_text("go")
    finish_all(agent, {first: "alice", second: "alice"})
