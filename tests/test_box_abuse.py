"""Another user of the box, or a client without a token, against the agent: an answer to a
request without a valid token ends its connection (a slow reader of pipelined answers once
held every place), the audit log keeps its lines against a flood, lists carry a prompt's first
characters and streams read stored events in batches (100 jobs of 1 MiB prompts once took 3 GB
to list slowly), the job folder is not checked again and again on /v1/me, and a project's
network section never opens a user the admin shut. Real agent on 127.0.0.1:0."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import patchwire_agent
from conftest import Laptop, make_repo, script, wait_until
from netface import audit_lines, connect, exchange


def test_an_answer_without_a_valid_token_ends_its_connection(agent):
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(agent, health * 50, source="127.0.0.41", timeout=5)
    assert answer.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in answer, answer[:400]
    guess = b"GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pw_guess\r\n\r\n"
    assert exchange(agent, guess * 5, source="127.0.0.41", timeout=5).count(b"HTTP/1.1 401") == 1
    assert exchange(agent, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 5,
                    source="127.0.0.41", timeout=5).count(b"HTTP/1.1 404") == 1
    # a user's requests keep their connection
    me = f"GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n\r\n".encode()
    with connect(agent, "127.0.0.42") as sock:
        sock.sendall(me * 3)
        got = b""
        while got.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, got[:400]
            got += chunk
        assert b"Connection: close" not in got


def test_a_flood_without_a_token_cannot_rotate_the_audit_log(make_agent):
    agent = make_agent()
    status, _, _ = agent.request("GET", "/v1/jobs")  # alice's line, which a flood must not push out
    assert status == 200
    flood = b"GET /nowhere-%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for i in range(300):
        exchange(agent, flood % i, source="127.0.0.43")
    time.sleep(2.5)  # two lines' worth of the budget come back
    exchange(agent, flood % 999, source="127.0.0.43")
    wait_until(lambda: any(r.get("path") == "/nowhere-999" for r in audit_lines(agent)), 10, "the last line")
    lines = [r for r in audit_lines(agent) if r.get("address") == "127.0.0.43"]
    burst = patchwire_agent.AUDIT_BURST_ANONYMOUS
    assert burst <= len(lines) <= burst + 10, len(lines)
    last = lines[-1]
    assert last["path"] == "/nowhere-999" and last["unlogged_before"] == 301 - len(lines), last
    assert any(r.get("user") == "alice" and r.get("path") == "/v1/jobs" for r in audit_lines(agent))


def test_notification_target_changes_are_always_audited_and_limited_instead(make_agent):
    """Adding and removing a target in a loop wrote two unbudgeted lines a pair and rotated
    everyone's older lines out of the log; charged to the request budget, a user could spend
    it with cheap requests and then add a target unseen. Each change is written now, and the
    changes themselves are limited (TARGET_CHANGES_BURST, then one a minute: 429)."""
    import http.client
    import tomli_w
    import tomllib
    agent = make_agent(start=False, users=("alice", "bob"))
    data = tomllib.loads(agent.config.read_text())
    data["notify"] = {"allow": ["hooks.example.com"]}
    agent.config.write_text(tomli_w.dumps(data))
    agent.start()
    conn = http.client.HTTPConnection("127.0.0.1", int(agent.url.rsplit(":", 1)[1]), timeout=30)
    auth = {"Authorization": "Bearer " + agent.tokens["bob"], "Content-Type": "application/json"}
    for _ in range(patchwire_agent.AUDIT_BURST_USER):  # the request lines' budget spent first
        conn.request("GET", "/v1/me", headers=auth)
        assert conn.getresponse().read()
    changes, refused = [], None
    for _ in range(patchwire_agent.TARGET_CHANGES_BURST):
        conn.request("POST", "/v1/notify", json.dumps({"url": "https://hooks.example.com/x"}), auth)
        answer = conn.getresponse()
        body = json.loads(answer.read())
        if answer.status != 201:
            refused = (answer.status, body)
            break
        changes.append(("notify_add", body["target"]["id"]))
        conn.request("DELETE", f"/v1/notify/{body['target']['id']}", headers=auth)
        answer = conn.getresponse()
        body = json.loads(answer.read())
        if answer.status != 200:
            refused = (answer.status, body)
            break
        changes.append(("notify_remove", changes[-1][1]))
    conn.close()
    assert len(changes) == patchwire_agent.TARGET_CHANGES_BURST, changes
    assert refused and refused[0] == 429 and refused[1]["code"] == "rate_limited", refused
    logged = [(r["event"], r["target"]) for r in audit_lines(agent) if r.get("event", "").startswith("notify_")]
    assert logged == changes  # every change that happened, though bob's request budget is spent


def test_a_user_is_audited_up_to_a_budget_then_counted():
    budget = patchwire_agent.AuditBudget()
    taken = [budget.take("bob", "127.0.0.1") for _ in range(patchwire_agent.AUDIT_BURST_USER + 50)]
    assert taken.count(None) >= 40 and taken[0] == 0
    assert budget.take("alice", "127.0.0.1") == 0  # another user has a budget of their own
    time.sleep(0.2)
    assert budget.take("bob", "127.0.0.1") == taken.count(None)


def test_lists_carry_a_prompts_first_characters_and_the_job_all_of_it(laptop, agent):
    long_prompt = script({"write": "a.txt", "text": "a\n"}, text="x" * 20000)
    laptop.ask(long_prompt, "--no-apply", check=0)
    job = laptop.last_job()
    listed = agent.json("GET", "/v1/jobs")[1]["jobs"]
    assert len(listed[0]["prompt"]) == patchwire_agent.LIST_PROMPT_CHARS
    assert listed[0]["prompt"] == long_prompt[:patchwire_agent.LIST_PROMPT_CHARS]
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["prompt"] == long_prompt
    # an ask group by a one-character prefix: that ask's jobs, loaded alone
    laptop.ask(script({"write": "b.txt", "text": "b\n"}), "-n", "2", "--pick", "1", "--yes", check=0)
    ask_id = agent.json("GET", f"/v1/jobs/{laptop.last_job()}")[1]["ask_id"]
    group = agent.json("GET", f"/v1/asks/{ask_id[:1]}")[1]
    assert group["id"] == ask_id and [j["attempt"] for j in group["jobs"]] == [1, 2]


def test_a_stream_of_more_stored_events_than_a_batch_sends_them_all_in_order(laptop, agent):
    count = patchwire_agent.FOLLOW_BATCH * 2 + 300
    laptop.ask(script({"lines": [count, 10]}, {"write": "a.txt", "text": "a\n"}), "--no-apply", check=0)
    job = laptop.last_job()
    last = agent.json("GET", f"/v1/jobs/{job}")[1]["events"]
    assert last > 2 * patchwire_agent.FOLLOW_BATCH
    for path in (f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/events?after=5"):
        status, _, body = agent.request("GET", path, headers={"Accept": "application/x-ndjson"})
        assert status == 200
        seqs = [json.loads(line)["seq"] for line in body.splitlines() if line.strip()]
        first = 6 if "after" in path else 1
        assert seqs == list(range(first, last + 1)), (seqs[:3], seqs[-3:], last)


def test_the_job_folder_is_checked_once_however_often_me_is_asked(tmp_path, make_agent):
    logged = tmp_path / "git.log"
    wrap = tmp_path / "bin"
    wrap.mkdir()
    real = next(p for p in os.environ["PATH"].split(":") if (Path(p) / "git").is_file() and p != str(wrap))
    (wrap / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) echo status >> {logged};; esac\n'
                              f'exec {real}/git "$@"\n')
    (wrap / "git").chmod(0o755)
    agent = make_agent(env={"PATH": f"{wrap}:{os.environ['PATH']}"})
    files = {f"src/f{i:05}.txt": b"x\n" for i in range(7000)}
    lap = Laptop(make_repo(tmp_path / "big", {"README.md": b"hi\n", **files}))
    lap.init(agent)
    lap.ask(script({"write": "README.md", "text": "one\n"}), "--no-apply", check=0)
    logged.unlink(missing_ok=True)
    for _ in range(25):
        status, _, _ = agent.request("GET", "/v1/me?project=big")
        assert status == 200
        time.sleep(0.05)
    time.sleep(1.0)
    runs = logged.read_text().count("status") if logged.exists() else 0
    assert runs == 1, runs


def network(tmp_path: Path, text: str) -> patchwire_agent.NetworkConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return patchwire_agent.NetworkConfig(path, patchwire_agent.pw.parse_toml(text, path)["network"])


def test_a_project_name_never_loosens_a_users_own_network_nor_takes_another_users(tmp_path):
    net = network(tmp_path, """
[network]
mode = "allowlist"
[network.users.bob]
mode = "none"
[network.users.carol]
mode = "allowlist"
allow = ["registry.carol.example"]
[network.users.ann]
allow = ["ann-registry.example"]
[network.projects."docs-*"]
mode = "open"
[network.projects."webapp"]
allow = ["db.example:5432"]
[network.projects."ann/payments"]
allow = ["10.0.0.5:5432"]
[network.projects."bob/docs-site"]
mode = "allowlist"
[network.projects."secret-*"]
mode = "none"
""")
    assert net.policy("ann", "docs-site").mode == "open"  # ann's section pins no mode: as written
    bob = net.policy("bob", "docs-site")
    assert bob.mode == "allowlist" and 'projects."bob/docs-site"' in bob.mode_rule  # the admin's word for bob
    assert net.policy("bob", "docs-other").mode == "none"  # a bare name never loosens bob's own mode
    carol = net.policy("carol", "webapp")
    assert "db.example:5432" not in carol.patterns and "registry.carol.example" in carol.patterns
    assert "db.example:5432" in net.policy("dave", "webapp").patterns  # no section of his own: as written
    assert "10.0.0.5:5432" in net.policy("ann", "payments").patterns
    assert "10.0.0.5:5432" not in net.policy("cat", "payments").patterns
    assert net.policy("carol", "secret-x").mode == "none"  # a stricter project mode still wins
    assert net.own_network("ann", "payments") and not net.own_network("cat", "payments")
