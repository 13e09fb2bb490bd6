"""Team mode (issue 11) with the real agent process and several users: the fair queue, isolation
of every endpoint, per-user policy, users added, rotated and removed on a running server.
The AI is the stand-in claude; jobs that must wait hold on a gate file the test creates."""

from __future__ import annotations

import json
import os
import shutil
import re
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

import patchwire_agent as AGENT
from conftest import Laptop, ask_body, make_repo, script, tomli_w, tomllib, wait_until, write_config
from test_api import assert_json_error, post_ask, wait_for_event


# ------------------------------------------------------------------ helpers


def synced_laptop(tmp_path: Path, agent, user: str, project: str = "laptop") -> Laptop:
    """A project of `user`'s, synced to the box with the real CLI."""
    root = make_repo(tmp_path / user / project, {"README.md": f"# {user}\n".encode(), "src/app.py": b"x = 1\n"})
    lap = Laptop(root)
    lap.init(agent, user=user)
    lap.run("sync", check=0)
    return lap


def ask_as(agent, user: str, body: dict) -> dict:
    status, answer = agent.json("POST", "/v1/ask", body, token=agent.tokens[user])
    assert status == 202, answer
    return answer


def gated(gate: Path, text: str = "held") -> str:
    return script({"say": text}, {"wait_file": str(gate)}, {"say": "released"})


def events_as(agent, user: str, job: str) -> List[dict]:
    _, _, data = agent.request("GET", f"/v1/jobs/{job}/events?after=0&follow=0", token=agent.tokens[user])
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def wait_event(agent, user: str, job: str, kind: str) -> None:
    wait_until(lambda: any(e["type"] == kind for e in events_as(agent, user, job)), what=f"{kind} in {job}")


def job_of(agent, user: str, job: str) -> dict:
    return agent.json("GET", f"/v1/jobs/{job}", token=agent.tokens[user])[1]


def ended(agent, user: str, job: str) -> Optional[dict]:
    info = job_of(agent, user, job)
    return info if info["status"] in ("done", "failed", "cancelled") else None


def finish_all(agent, jobs: Dict[str, str]) -> Dict[str, dict]:
    """{job: job info} once every job (job -> user) has ended."""
    return {job: wait_until(lambda: ended(agent, user, job), what=f"job {job}")  # noqa: B023 (called at once)
            for job, user in jobs.items()}


def edit_config(agent, change) -> None:
    data = tomllib.loads(agent.config.read_text())
    change(data)
    agent.config.write_text(tomli_w.dumps(data))


# ------------------------------------------------------------------ fair queue


def test_a_light_user_waits_for_at_most_one_heavy_job(make_agent, tmp_path):
    agent = make_agent(users=("heavy", "light"), jobs={"workers": 1})
    heavy = ask_body(synced_laptop(tmp_path, agent, "heavy"), script({"say": "heavy"}))
    light = ask_body(synced_laptop(tmp_path, agent, "light"), script({"say": "light"}))
    gate = tmp_path / "gate"
    first = ask_as(agent, "heavy", {**heavy, "prompt": gated(gate)})["id"]
    wait_for_event(agent, first, "started")
    rest = [ask_as(agent, "heavy", heavy)["id"] for _ in range(19)]
    mine = ask_as(agent, "light", light)["id"]
    # while it waits, the stream says where it is: first in line, ahead of 19 heavy jobs
    queued = [e for e in events_as(agent, "light", mine) if e["type"] == "queued"]
    assert queued[0]["position"] == 0 and "estimate_s" in queued[0]
    last = [e for e in agent.events(rest[-1]) if e["type"] == "queued"]
    assert last[0]["position"] == 18

    gate.write_text("go")
    jobs = {first: "heavy", mine: "light", **{j: "heavy" for j in rest}}
    infos = finish_all(agent, jobs)
    assert all(i["status"] == "done" for i in infos.values()), infos
    started = sorted(infos, key=lambda j: infos[j]["started"])
    assert started[:2] == [first, mine]  # the light job ran right after the one heavy job
    assert started[2:] == rest  # first come, first served within the heavy user


def test_three_users_interleave_round_robin(make_agent, tmp_path):
    users = ("ann", "ben", "cat")
    agent = make_agent(users=users, jobs={"workers": 1})
    bodies = {u: ask_body(synced_laptop(tmp_path, agent, u), script({"say": u})) for u in users}
    gate = tmp_path / "gate"
    ids = {u: [] for u in users}
    ids["ann"].append(ask_as(agent, "ann", {**bodies["ann"], "prompt": gated(gate)})["id"])
    wait_for_event(agent, ids["ann"][0], "started")
    for user in users:  # each user's jobs in one burst, user after user
        while len(ids[user]) < 5:
            ids[user].append(ask_as(agent, user, bodies[user])["id"])
    gate.write_text("go")
    infos = finish_all(agent, {j: u for u in users for j in ids[u]})
    assert all(i["status"] == "done" for i in infos.values())  # no job starves
    started = sorted(infos, key=lambda j: infos[j]["started"])
    expected = [ids[u][n] for n in range(5) for u in users]
    assert started == expected
    # a waiting job heard its place move up, with an estimate once runs had been timed
    positions = [e for e in events_as(agent, "cat", ids["cat"][4]) if e["type"] in ("queued", "position")]
    assert [e["position"] for e in positions] == sorted((e["position"] for e in positions), reverse=True)
    assert positions[0]["position"] == 13 and positions[-1]["position"] == 0
    assert any(isinstance(e.get("estimate_s"), int) for e in positions), positions


def test_queue_order_is_the_order_of_service_and_a_returning_user_goes_first():
    queue = AGENT.FairQueue()

    def put(job, user):
        queue.put(AGENT.QueueItem(job, user, "p"))

    for n in range(3):
        put(f"a{n}", "alice")
    put("b0", "bob")
    assert queue.order() == ["a0", "b0", "a1", "a2"]
    taken = [queue.take(lambda i: True).job_id for _ in range(2)]
    assert taken == ["a0", "b0"]
    put("c0", "carol")  # never served: ahead of alice, who was
    put("b1", "bob")  # back after a pause, but served after alice: behind her
    assert queue.order() == ["c0", "a1", "b1", "a2"]
    assert [queue.take(lambda i: True).job_id for _ in range(4)] == ["c0", "a1", "b1", "a2"]


def test_queue_skips_a_user_at_their_limit_without_losing_their_turn():
    queue = AGENT.FairQueue()
    for job, user in (("a0", "alice"), ("a1", "alice"), ("b0", "bob")):
        queue.put(AGENT.QueueItem(job, user, "p"))
    assert queue.take(lambda i: i.user != "alice").job_id == "b0"  # alice at max_running
    assert queue.order() == ["a0", "a1"]
    assert queue.jobs_of("alice") == ["a0", "a1"] and queue.jobs_of("bob") == []


# ------------------------------------------------------------------ isolation


def route_paths(job: str) -> List[tuple]:
    """(method, path) of every authenticated route, with alice's job id (or name) filled in."""
    out = []
    for method, pattern, _, auth in AGENT.ROUTES:
        if not auth:
            continue
        path = pattern.pattern.strip("^$")
        path = re.sub(r"\(\?P<job>[^)]*\)", job, path)
        path = re.sub(r"\(\?P<\w+>[^)]*\)", "alice", path)
        out.append((method, path.replace("\\", "")))
    return out


def test_no_endpoint_shows_or_touches_another_users_work(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    alice = synced_laptop(tmp_path, agent, "alice", project="secret-app")
    synced_laptop(tmp_path, agent, "bob")
    done = ask_as(agent, "alice", ask_body(alice, script({"write": "a.txt", "text": "alice's\n"}),
                                           project="secret-app"))["id"]
    agent.wait_job(done, timeout=60)
    gate = tmp_path / "gate"
    running = ask_as(agent, "alice", ask_body(alice, gated(gate, "alice-private-words"), project="secret-app"))["id"]
    wait_for_event(agent, running, "text")
    bob = agent.tokens["bob"]
    for job in (done, running, done[:4]):
        for method, path in route_paths(job):
            body = {} if method == "POST" else None
            for query in ("", "?after=0&follow=0&user=alice"):
                status, headers, data = agent.request(method, path + query, body, token=bob)
                text = data.decode("utf-8", "replace").replace(f"no job '{job}'", "")  # its own echo
                for secret in (done, running, "alice-private-words", "users/alice", "secret-app"):
                    assert secret not in text, (method, path, query, status, text)
                if job in path:
                    assert_json_error(status, headers, data, 404, code="not_found")
    # every other verb on her job's paths says nothing about the job either
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        for path in {p for _, p in route_paths(running) if running in p}:
            status, _, data = agent.request(method, path, {} if method in ("POST", "PUT", "PATCH") else None, token=bob)
            assert status in (404, 405, 501), (method, path, status)
            said = data.decode("utf-8", "replace").replace(f"no job '{running}'", "").replace(path, "")
            assert running not in said  # beyond echoing what bob asked for
    # continuing alice's job is as unknown to bob as a job that does not exist
    bob_body = ask_body(alice, "go on", project="laptop")
    status, headers, data = agent.request("POST", "/v1/ask", {**bob_body, "continue": done}, token=bob)
    assert_json_error(status, headers, data, 404, code="not_found")
    assert agent.json("GET", "/v1/jobs", token=bob) == (200, {"jobs": []})
    # alice's running job was not cancelled by bob's DELETE; her folders are hers alone
    assert job_of(agent, "alice", running)["status"] == "running"
    gate.write_text("go")
    assert agent.wait_job(running)["status"] == "done"
    users = agent.state_dir / "users"
    assert sorted(p.name for p in (users / "alice" / "mirror").iterdir()) == ["secret-app"]
    assert sorted(p.name for p in (users / "bob" / "mirror").iterdir()) == ["laptop"]
    slot = job_of(agent, "alice", running)["slot"]
    assert (users / "alice" / "projects" / "secret-app" / "slots" / f"slot{slot}" / "README.md").is_file()


# ------------------------------------------------------------------ policy


def test_project_allowlist_refuses_sync_and_ask_naming_the_rule(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"), start=False)
    edit_config(agent, lambda d: d["users"]["bob"].update(projects=["web-*"]))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "bob", project="web-app")  # allowed
    status, headers, data = agent.request("GET", "/v1/me?project=api", token=agent.tokens["bob"])
    answer = assert_json_error(status, headers, data, 403, code="policy",
                               words=("project 'api' is not allowed", '[users.bob] projects = ["web-*"]'))
    assert answer["limit"] == "projects" and answer["value"] == ["web-*"]
    assert not (agent.state_dir / "users/bob/mirror/api").exists()
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(lap, "hi", project="api"),
                                          token=agent.tokens["bob"])
    assert_json_error(status, headers, data, 403, code="policy", words=("not allowed",))
    # the laptop says it, with the hint, and exits 3 (refused by the agent)
    other = make_repo(tmp_path / "bob" / "api", {"a.txt": b"a\n"})
    api = Laptop(other)
    refused = api.run("init", "--agent", agent.url, "--token-file", str(agent.token_file("bob")))
    assert refused.returncode == 2 and "the box does not take project api: " in refused.err
    assert '[users.bob] projects = ["web-*"]' in refused.err and "--project NAME" in refused.err
    assert not (other / ".patchwire.toml").exists()
    # a config from before the rule: sync is refused the same way
    write_config(other, f'agent = "{agent.url}"\ntoken_file = "{agent.token_file("bob")}"\nproject = "api"\n')
    result = api.run("sync")
    assert result.returncode == 3, result.err
    assert '[users.bob] projects = ["web-*"]' in result.err
    assert "patchwire-agent policy bob" in result.err
    # alice has no such rule
    assert agent.json("GET", "/v1/me?project=api")[0] == 200


def test_rate_limit_is_429_with_retry_after_and_survives_a_restart(make_agent, tmp_path):
    agent = make_agent(start=False)
    edit_config(agent, lambda d: d.update(policy={"rate_limit": "2/hour"}))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "alice")
    body = ask_body(lap, script({"say": "hi"}))
    for _ in range(2):
        agent.wait_job(post_ask(agent, body)["id"])

    def refused():
        status, headers, data = agent.request("POST", "/v1/ask", body)
        answer = assert_json_error(status, headers, data, 429, code="policy",
                                   words=('[policy] rate_limit = "2/hour"',))
        assert answer["limit"] == "rate_limit" and answer["value"] == "2/hour"
        retry = int(headers["Retry-After"])
        assert 3500 < retry <= 3600, retry
        assert f"try again in {retry} s" in answer["hint"]
    refused()
    agent.stop()
    agent.start()
    refused()
    lap.init(agent)  # the restarted agent listens on another port
    result = lap.ask(script({"say": "third"}), "--no-apply")
    assert result.returncode == 3, result.err
    assert ('patchwire: the agent refused: user alice asked 2 times in the last 60 min; the limit is '
            '[policy] rate_limit = "2/hour"\n  try again in ') in result.err


def test_each_ceiling_is_a_clear_refusal(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"), jobs={"workers": 2}, start=False)
    edit_config(agent, lambda d: (d.update(policy={"max_queued": 1, "max_prompt_bytes": 300, "timeout_s": 60,
                                                   "max_projects": 2, "max_running": 2}),
                                  d["users"]["bob"].update(max_running=1, max_prompt_bytes=5000)))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "alice")

    # max_prompt_bytes (413), from [policy] for alice and from [users.bob] for bob
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(lap, "x" * 301))
    answer = assert_json_error(status, headers, data, 413, code="policy",
                               words=("301 bytes", "[policy] max_prompt_bytes = 300"))
    assert (answer["limit"], answer["value"]) == ("max_prompt_bytes", 300)

    # timeout_s: the default is lowered to the ceiling; more is refused naming it
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(lap, "hi", timeout_s=61))
    answer = assert_json_error(status, headers, data, 403, code="policy", words=("[policy] timeout_s = 60",))
    assert (answer["limit"], answer["value"]) == ("timeout_s", 60)
    gate = tmp_path / "gate"
    running = post_ask(agent, ask_body(lap, gated(gate)))
    assert running["timeout_s"] == 60

    # max_queued: one running, one waiting, the third refused
    wait_for_event(agent, running["id"], "started")
    # (both workers busy: a second alice job runs too, so fill it first)
    second = post_ask(agent, ask_body(lap, gated(gate)))["id"]
    wait_for_event(agent, second, "started")
    waiting = post_ask(agent, ask_body(lap, script({"say": "waits"})))["id"]
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(lap, script({"say": "no room"})))
    answer = assert_json_error(status, headers, data, 429, code="policy",
                               words=("1 jobs waiting", "[policy] max_queued = 1"))
    assert (answer["limit"], answer["value"]) == ("max_queued", 1)
    gate.write_text("go")
    finish_all(agent, {running["id"]: "alice", second: "alice", waiting: "alice"})

    # max_running (bob: 1): his second job waits although a worker is free
    gate.unlink()
    bob_lap = synced_laptop(tmp_path, agent, "bob")
    bob1 = ask_as(agent, "bob", ask_body(bob_lap, gated(gate)))["id"]
    wait_event(agent, "bob", bob1, "started")
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(bob_lap, "x" * 301), token=agent.tokens["bob"])
    assert status == 202  # bob's own max_prompt_bytes is larger
    bob2 = json.loads(data)["id"]
    alice_job = post_ask(agent, ask_body(lap, script({"say": "alice runs meanwhile"})))["id"]
    assert agent.wait_job(alice_job)["status"] == "done"
    assert job_of(agent, "bob", bob2)["status"] == "queued"
    gate.write_text("go")
    finish_all(agent, {bob1: "bob", bob2: "bob"})

    # max_projects (2 per user): alice has "laptop"; one more may be made, then 403, and
    # asking again and again makes nothing (each project costs a mirror and a repository)
    assert agent.json("GET", "/v1/me?project=second")[0] == 200
    for n in range(20):
        status, headers, data = agent.request("GET", f"/v1/me?project=new{n}")
        answer = assert_json_error(status, headers, data, 403, code="policy",
                                   words=("has 2 projects", "[policy] max_projects = 2"))
    assert (answer["limit"], answer["value"]) == ("max_projects", 2)
    assert sorted(os.listdir(agent.state_dir / "users/alice/mirror")) == ["laptop", "second"]
    assert agent.json("GET", "/v1/me?project=second")[0] == 200  # an existing one is fine
    # folders rsynced straight into the mirror root make no repositories past the cap
    for name in ("sneaky1", "sneaky2"):
        (agent.state_dir / "users/alice/mirror" / name).mkdir()
    assert agent.request("POST", "/v1/ask", ask_body(lap, "hi", project="sneaky1"))[0] == 409  # empty mirror
    status, headers, data = agent.request("POST", "/v1/ask", ask_body(lap, "hi", project="sneaky2"))
    assert_json_error(status, headers, data, 403, code="policy", words=("has 2 projects", "max_projects = 2"))
    assert sorted(os.listdir(agent.state_dir / "users/alice/projects")) == ["laptop", "sneaky1"]

    # what applies, and where it comes from
    shown = agent.cli("policy", "bob")
    assert shown.returncode == 0, shown.stderr
    lines = {l.split()[0]: l for l in shown.stdout.splitlines()[1:]}
    assert lines["max_running"].split()[1:] == ["1", "from", "[users.bob]"]
    assert lines["max_prompt_bytes"].split()[1:] == ["5000", "from", "[users.bob]"]
    assert lines["max_queued"].split()[1:] == ["1", "from", "[policy]"]
    assert lines["rate_limit"].split()[1:] == ["none", "from", "built-in", "default"]
    assert lines["projects"].split()[1:] == ['["*"]', "from", "built-in", "default"]


def test_me_makes_no_mirror_and_no_repository_past_the_default_cap(agent):
    for n in range(60):
        status, _, _ = agent.request("GET", f"/v1/me?project=p{n}")
        assert status == (200 if n < 50 else 403)
    assert len(os.listdir(agent.state_dir / "users/alice/mirror")) == 50
    assert not (agent.state_dir / "users/alice/projects").exists()  # repositories come with asks


# ------------------------------------------------------------------ users on a running server


def test_users_added_rotated_and_removed_on_a_running_server(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 1})
    bob_file = tmp_path / "bob.token"
    added = agent.cli("user", "add", "bob", "--token-file", str(bob_file))
    assert added.returncode == 0, added.stderr
    bob = bob_file.read_text().strip()
    assert bob not in agent.config.read_text() and bob not in added.stdout + added.stderr
    status, me = agent.json("GET", "/v1/me", token=bob)
    assert status == 200 and me["user"] == "bob" and me["mirror_root"] == str(agent.state_dir / "users/bob/mirror")
    agent.tokens["bob"] = bob
    lap = synced_laptop(tmp_path, agent, "bob")

    # a rotated token is refused at once; the new one works
    rotated = agent.cli("user", "rotate", "bob")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert re.fullmatch(r"pw_[\w-]{40,}", new)
    assert agent.request("GET", "/v1/me", token=bob)[0] == 401
    assert agent.json("GET", "/v1/me", token=new)[0] == 200
    agent.tokens["bob"] = new

    # removed: refused at once; the running job finishes, the queued one ends
    gate = tmp_path / "gate"
    running = ask_as(agent, "bob", ask_body(lap, gated(gate)))["id"]
    wait_event(agent, "bob", running, "started")
    queued = ask_as(agent, "bob", ask_body(lap, script({"say": "never"})))["id"]
    removed = agent.cli("user", "remove", "bob")
    assert removed.returncode == 0, removed.stderr
    assert agent.request("GET", "/v1/me", token=new)[0] == 401
    wait_until(lambda: any(e["type"] == "cancelled" for e in agent_events_as_admin(agent, queued)),
               what="the queued job to end")
    assert "user bob was removed" in agent_events_as_admin(agent, queued)[-1]["reason"]
    gate.write_text("go")
    wait_until(lambda: any(e["type"] == "finished" for e in agent_events_as_admin(agent, running)),
               what="running job finished")
    listed = agent.cli("user", "list")
    assert [l.split()[0] for l in listed.stdout.splitlines()] == ["alice"]


def agent_events_as_admin(agent, job: str) -> List[dict]:
    """A removed user's job events, read from the store on disk (no token can read them)."""
    import sqlite3
    db = sqlite3.connect(str(agent.state_dir / "jobs.sqlite3"))
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT data FROM events WHERE job = ? ORDER BY seq", (job,))]
    finally:
        db.close()


def test_rotate_with_cancel_jobs_stops_the_running_job(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    lap = synced_laptop(tmp_path, agent, "bob")
    running = ask_as(agent, "bob", ask_body(lap, gated(tmp_path / "never")))["id"]
    wait_event(agent, "bob", running, "started")
    rotated = agent.cli("user", "rotate", "bob", "--cancel-jobs", "--token-file", str(tmp_path / "b.tok"))
    assert rotated.returncode == 0, rotated.stderr
    agent.tokens["bob"] = (tmp_path / "b.tok").read_text().strip()
    info = finish_all(agent, {running: "bob"})[running]
    assert info["status"] == "cancelled" and "cancelled by the admin" in info["reason"]


def test_sighup_reloads_a_change_the_file_watch_cannot_see(make_agent):
    agent = make_agent(users=("alice", "bob"))
    bob = agent.tokens["bob"]
    assert agent.request("GET", "/v1/me", token=bob)[0] == 200
    # same size, same inode, same mtime: only SIGHUP tells the server
    before = os.stat(agent.config)
    text = agent.config.read_text()
    digest = AGENT.token_digest(bob).hex()
    with open(agent.config, "r+") as f:
        f.write(text.replace(digest, "0" * 64))
    os.utime(agent.config, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(agent.config).st_ino == before.st_ino
    assert agent.request("GET", "/v1/me", token=bob)[0] == 200  # not seen yet
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: agent.request("GET", "/v1/me", token=bob)[0] == 401, what="bob refused after SIGHUP")
    assert agent.request("GET", "/v1/me")[0] == 200  # alice unaffected; the server lives on


def test_a_broken_config_keeps_the_old_one_in_force(make_agent):
    agent = make_agent()
    agent.config.write_text(agent.config.read_text() + "\n[policy]\nrate_limit = \"lots\"\n")
    assert agent.request("GET", "/v1/me")[0] == 200
    wait_until(lambda: "config not reloaded" in agent.read_log(), what="the log line")
    assert "rate_limit must be COUNT/UNIT" in agent.read_log()


# ------------------------------------------------------------------ SSH keys restricted by rrsync


def add_key_user(agent, server, tmp_path: Path, name: str) -> Tuple[str, Path]:
    """`user add NAME` with a new SSH key, into the loopback sshd's authorized_keys: (the key's
    line there, an ssh config that connects with the key); the user's token in agent.tokens."""
    from sshd import generate_key
    key = tmp_path / f"{name}_key"
    generate_key(key, f"{name}@laptop")
    agent.cli("user", "add", name, "--token-file", str(tmp_path / f"{name}.token"), "--ssh-key", f"{key}.pub",
              "--authorized-keys", str(server.tmpdir / "authorized_keys"), check=0)
    agent.tokens[name] = (tmp_path / f"{name}.token").read_text().strip()
    line = (server.tmpdir / "authorized_keys").read_text().splitlines()[-1]
    return line, server.write_client_config(tmp_path / f"{name}_ssh_config", key)


@pytest.mark.slow
def test_an_rrsync_key_syncs_its_own_mirror_and_nothing_else(make_agent, tmp_path):
    from sshd import running_sshd
    from test_ssh import close_master, write_sync_options
    if not AGENT.find_rrsync():
        pytest.skip("rrsync is not installed (Debian: apt install rsync)")
    agent = make_agent(users=("alice", "bob"))
    bob_mirror = agent.state_dir / "users/bob/mirror"
    assert agent.json("GET", "/v1/me?project=web", token=agent.tokens["bob"])[0] == 200
    (bob_mirror / "web" / "keep.txt").write_text("bob's\n")
    with running_sshd(tmp_path / "sshd") as server:
        try:
            line, carol_ssh = add_key_user(agent, server, tmp_path, "carol")
            assert line.startswith('restrict,command="') and " -wo " in line
            assert line.endswith("patchwire:carol") and str(agent.state_dir / "users/carol/mirror") in line

            # the laptop's own sync works through the forced rrsync, unchanged
            root = make_repo(tmp_path / "carol" / "app", {"README.md": b"# carol\n", "src/a.py": b"a = 1\n"})
            lap = Laptop(root)
            lap.init(agent, "--ssh", server.alias, user="carol")
            write_sync_options(lap, ssh_options=["-F", str(carol_ssh)])
            lap.run("sync", check=0)
            mine = agent.state_dir / "users/carol/mirror/app"
            assert (mine / "README.md").read_bytes() == b"# carol\n"
            assert (mine / "src/a.py").read_bytes() == b"a = 1\n"
            agent.token_file("carol").chmod(0o600)
            doctor = lap.run("doctor")  # knows a restricted key from a box without rsync
            assert doctor.returncode == 0, doctor.out
            assert "ok   ssh: " in doctor.out and "may only rsync into your folder" in doctor.out, doctor.out

            ssh = f"ssh -F {carol_ssh}"
            bob_before = sorted(str(p.relative_to(bob_mirror)) for p in bob_mirror.rglob("*"))
            evil = tmp_path / "evil.txt"
            evil.write_text("pwned\n")
            attempts = [  # into bob's folder by absolute path, by .., and reading carol's own files
                ["rsync", "-a", "-e", ssh, str(evil), f"{server.alias}:{bob_mirror}/web/"],
                ["rsync", "-a", "-e", ssh, str(evil), f"{server.alias}:../../bob/mirror/web/"],
                ["rsync", "-a", "-e", ssh, f"{server.alias}:{mine}/README.md", str(tmp_path / "stolen")],
            ]
            said = []
            for argv in attempts:
                tried = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
                assert tried.returncode != 0, argv
                said.append(tried.stderr)
            assert sorted(str(p.relative_to(bob_mirror)) for p in bob_mirror.rglob("*")) == bob_before
            assert (bob_mirror / "web" / "keep.txt").read_text() == "bob's\n"
            assert not (tmp_path / "stolen").exists()
            assert "do not use .." in said[1] and "write-only" in said[2]
            # no shell: the forced command runs instead, and refuses
            marker = tmp_path / "shell-ran"
            shell = subprocess.run(["ssh", "-F", str(carol_ssh), server.alias, f"touch {marker}; echo shell-ok"],
                                   capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert shell.returncode != 0 and "shell-ok" not in shell.stdout
            assert "does not run rsync" in shell.stderr
            assert not marker.exists()
            tty = subprocess.run(["ssh", "-F", str(carol_ssh), "-tt", server.alias],
                                 capture_output=True, text=True, timeout=60, input="echo shell-ok\nexit\n")
            assert "shell-ok" not in tty.stdout.replace("echo shell-ok", "")
            # removing the user also drops the key line
            removed = agent.cli("user", "remove", "carol", "--authorized-keys",
                                str(server.tmpdir / "authorized_keys"))
            assert removed.returncode == 0, removed.stderr
            assert "patchwire:carol" not in (server.tmpdir / "authorized_keys").read_text()
            assert (server.tmpdir / "authorized_keys").read_text().strip()  # the fixture's own key stays
        finally:
            close_master(server)


def test_the_config_defaults_to_the_xdg_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert AGENT.main(["init", "--user", "ann", "--token-file", str(tmp_path / "t")]) == 0
    assert (tmp_path / "xdg/patchwire/agent.toml").is_file()
    assert AGENT.main(["user", "add", "ben", "--token-file", str(tmp_path / "b")]) == 0
    assert AGENT.main(["user", "list"]) == 0
    assert [l.split()[0] for l in capsys.readouterr().out.splitlines()] == ["ann", "ben"]


def test_a_state_folder_of_0_3_moves_to_one_folder_per_user(make_agent, tmp_path):
    agent = make_agent()
    lap = synced_laptop(tmp_path, agent, "alice")
    first = post_ask(agent, ask_body(lap, script({"write": "one.txt", "text": "1\n"})))["id"]
    assert agent.wait_job(first)["status"] == "done"
    agent.stop()
    # the 0.3 layout: mirror/alice, projects/alice; worktrees record their folders' paths
    state = agent.state_dir
    os.makedirs(state / "mirror")
    os.makedirs(state / "projects")
    os.replace(state / "users/alice/mirror", state / "mirror/alice")
    os.replace(state / "users/alice/projects", state / "projects/alice")
    for gitdir in (state / "projects/alice/laptop/git/worktrees").glob("*/gitdir"):
        gitdir.write_text(f"{state}/projects/alice/laptop/slots/{gitdir.parent.name}/.git\n")
    shutil.rmtree(state / "users/alice/home")  # 0.3 had no AI home per user
    os.rmdir(state / "users/alice")
    agent.start()
    assert not (state / "mirror").exists() and not (state / "projects").exists()
    assert (state / "users/alice/mirror/laptop/README.md").read_bytes() == b"# alice\n"
    follow = post_ask(agent, ask_body(lap, script({"write": "two.txt", "text": "2\n"}), **{"continue": first}))
    assert agent.wait_job(follow["id"])["status"] == "done"
    queued = next(e for e in agent.events(follow["id"]) if e["type"] == "queued")
    assert queued["estimate_s"] == 0  # run times are read back from the store after a restart
    diff = agent.request("GET", f"/v1/jobs/{follow['id']}/diff")[2]
    assert b"+++ b/one.txt" in diff and b"+++ b/two.txt" in diff  # the earlier result carried along
    listed = subprocess.run(["git", "--git-dir", str(state / "users/alice/projects/laptop/git"), "worktree", "list"],
                            capture_output=True, text=True, check=True).stdout
    assert str(state / "users/alice/projects/laptop/slots") in listed and "prunable" not in listed


def test_a_user_removed_while_the_server_was_down_has_no_job_run(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"), jobs={"workers": 1})
    lap = synced_laptop(tmp_path, agent, "bob")
    running = ask_as(agent, "bob", ask_body(lap, gated(tmp_path / "never")))["id"]
    wait_event(agent, "bob", running, "started")
    queued = ask_as(agent, "bob", ask_body(lap, script({"write": "x.txt", "text": "x\n"})))["id"]
    agent.stop()
    assert agent.cli("user", "remove", "bob").returncode == 0
    agent.start()
    wait_until(lambda: agent_events_as_admin(agent, queued)[-1]["type"] == "cancelled", what="the queued job to end")
    assert "started" not in [e["type"] for e in agent_events_as_admin(agent, queued)]
    assert agent_events_as_admin(agent, queued)[-1]["reason"] == "user bob was removed"


# ------------------------------------------------------------------ limits under concurrency


def test_limits_hold_under_concurrent_requests(make_agent, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    agent = make_agent(jobs={"workers": 1}, start=False)
    edit_config(agent, lambda d: d.update(policy={"max_projects": 4, "max_queued": 3}))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "alice")  # project 1 of 4
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda n: agent.request("GET", f"/v1/me?project=p{n}")[0], range(12)))
    assert sorted(statuses) == [200] * 3 + [403] * 9
    assert len(os.listdir(agent.state_dir / "users/alice/mirror")) == 4

    running = post_ask(agent, ask_body(lap, gated(tmp_path / "gate")))["id"]
    wait_for_event(agent, running, "started")
    body = ask_body(lap, script({"say": "queued"}))
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: agent.request("POST", "/v1/ask", body), range(10)))
    assert sorted(a[0] for a in answers) == [202] * 3 + [429] * 7
    (tmp_path / "gate").write_text("go")
    accepted = [json.loads(a[2])["id"] for a in answers if a[0] == 202]
    assert all(i["status"] == "done" for i in finish_all(agent, {j: "alice" for j in [running] + accepted}).values())


# ------------------------------------------------------------------ config and presentation


@pytest.mark.parametrize("table, words", [
    ('[policy]\nrate_limit = "30 per hour"', ["policy.rate_limit must be COUNT/UNIT", "30/hour"]),
    ('[policy]\nmax_queued = 0', ["policy.max_queued must be a positive integer"]),
    ('[policy]\nprojects = []', ["policy.projects is empty"]),
    ('[policy]\nmax_projcts = 3', ["unknown key 'max_projcts' in [policy]"]),
    ('[users.zed]\ntoken_sha256 = "' + "a" * 64 + '"\nmax_running = "two"', ["users.zed.max_running must be a positive integer"]),
    ('[users.zed]\ntoken_sha256 = "' + "a" * 64 + '"\nrate_limit = "5/fortnight"', ["users.zed.rate_limit must be COUNT/UNIT"]),
])
def test_bad_policy_is_refused_naming_the_key(tmp_path, table, words):
    path = tmp_path / "agent.toml"
    assert AGENT.main(["init", "-c", str(path), "--token-file", str(tmp_path / "t")]) == 0
    text = path.read_text() + "\n" + table + "\n"
    with pytest.raises(AGENT.PatchwireError) as failure:
        AGENT.AgentConfig(path, AGENT.pw.parse_toml(text, path))
    for word in words:
        assert word in str(failure.value)


def test_policy_values_and_their_sources(tmp_path):
    path = tmp_path / "agent.toml"
    text = ('[ai]\ntimeout_s = 300\nmax_timeout_s = 600\n[jobs]\nworkers = 3\n'
            '[policy]\nrate_limit = "10/minute"\ntimeout_s = 9000\n'
            '[users.ann]\ntoken_sha256 = "' + "a" * 64 + '"\nprojects = ["web-*"]\ntimeout_s = 60\n')
    cfg = AGENT.AgentConfig(path, AGENT.pw.parse_toml(text, path))
    ann = cfg.policy("ann")
    assert (ann.projects, ann.sources["projects"]) == (["web-*"], "[users.ann]")
    assert (ann.rate_window(), ann.sources["rate_limit"]) == ((10, 60), "[policy]")
    assert (ann.timeout_s, ann.max_running, ann.sources["max_running"]) == (60, 3, "[jobs] workers")
    assert ann.allows_project("web-app") and not ann.allows_project("api")
    # a [policy] ceiling above the box's own is the box's own
    assert (cfg.policy("ben").timeout_s, cfg.policy("ben").sources["timeout_s"]) == (600, "[ai] max_timeout_s")
    assert ann.rule("projects") == '[users.ann] projects = ["web-*"]'


def test_the_laptop_shows_place_and_estimate(capsys):
    printer = AGENT.pw.ProgressPrinter(AGENT.pw.Style(False))
    printer({"type": "queued", "job": "abc", "position": 3, "estimate_s": 95})
    printer({"type": "position", "position": 1, "estimate_s": 600})
    printer({"type": "position", "position": 0, "estimate_s": None})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("queued as job abc, 3 ahead, starts in about 95 s")
    assert lines[1].endswith("waiting: 1 ahead in the queue, starts in about 10 min")
    assert lines[2].endswith("waiting: 0 ahead in the queue")
