"""Per-user usage (issue 12), /metrics, the OpenAPI document and the README's curl lines,
against one real agent with three users (alice is an admin) and jobs that end every way,
across a restart and after a user is removed from the config."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import (AgentProcess, Laptop, STAND_IN_COMMAND, ask_body, make_repo, program_argv, script,
                      tomli_w, tomllib)
import patchwire
import patchwire_agent

FIGURES = [name for name, _ in patchwire_agent.USAGE_FIGURES]


def post(agent: AgentProcess, user: str, prompt: str, project: str = "app") -> str:
    status, job = agent.json("POST", "/v1/ask", ask_body(None, prompt, project=project), token=agent.tokens[user])
    assert status == 202, job
    return job["id"]


def job_of(agent: AgentProcess, user: str, job: str) -> dict:
    return agent.json("GET", f"/v1/jobs/{job}", token=agent.tokens[user])[1]


def wait_job(agent: AgentProcess, user: str, job: str, until=("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = job_of(agent, user, job)
        if info["status"] in until:
            return info
        time.sleep(0.05)
    raise AssertionError(f"job {job} still {info['status']}")


def set_users(agent: AgentProcess, users: List[str], admins=("alice",)) -> None:
    """Rewrite the config's [users] (the way `user add/remove` will): tokens kept, admins marked."""
    data = tomllib.loads(agent.config.read_text())
    digests = {**{n: t["token_sha256"] for n, t in data["users"].items()},
               **{n: patchwire_agent.token_digest(agent.tokens[n]).hex() for n in users}}
    data["users"] = {n: {"token_sha256": digests[n], **({"admin": True} if n in admins else {})} for n in users}
    agent.config.write_text(tomli_w.dumps(data))


def expected_figures(jobs: List[dict]) -> Dict[str, float]:
    """The sum over jobs, computed from what GET /v1/jobs/{id} says of each."""
    out = dict.fromkeys(FIGURES, 0)
    for job in jobs:
        result, stats = job.get("result") or {}, job.get("stats") or {}
        out["asks"] += 1
        if job["status"] in ("done", "failed", "cancelled"):
            out[job["status"]] += 1
        out["ai_minutes"] += (result.get("duration_s") or 0) / 60
        for name, key in (("turns", "num_turns"), ("tokens_in", "tokens_in"), ("tokens_out", "tokens_out"),
                          ("cache_read_tokens", "cache_read_tokens"), ("cache_write_tokens", "cache_write_tokens"),
                          ("cost_usd", "cost_usd")):
            out[name] += result.get(key) or 0
        for name, key in (("files_changed", "files"), ("lines_added", "added"), ("lines_removed", "removed")):
            out[name] += stats.get(key) or 0
        out["queue_wait_minutes"] += ((job["started"] or job["finished"]) - job["created"]) / 60
    return out


def assert_figures(got: dict, want: dict) -> None:
    for name in FIGURES:
        assert got[name] == pytest.approx(want[name], abs=1e-5), name


# ------------------------------------------------------------------ the scenario, run once


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """alice (admin), bob and carol ask; one restart; carol is then removed from the config.
    One worker, so that a job can wait in the queue (and be cancelled there)."""
    home = tmp_path_factory.mktemp("usage-home")
    env = {"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C.UTF-8"}
    agent = AgentProcess(tmp_path_factory.mktemp("usage-box"), STAND_IN_COMMAND,
                         users=("alice", "bob", "carol"), jobs={"workers": 1}, env=env)
    set_users(agent, ["alice", "bob", "carol"])
    data = tomllib.loads(agent.config.read_text())
    data["notify"] = {"allow": ["127.0.0.1:9"]}  # the discard port: nothing answers, nothing leaves the machine
    agent.config.write_text(tomli_w.dumps(data))
    agent.start()
    jobs: Dict[str, List[str]] = {"alice": [], "bob": [], "carol": []}
    jobs["alice"].append(post(agent, "alice", script(
        {"usage": {"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 1000,
                   "cache_creation_input_tokens": 50}, "cost": 0.25},
        {"write": "a.txt", "text": "one\ntwo\n"}, {"write": "b.txt", "text": "three\n"}), "app"))
    jobs["alice"].append(post(agent, "alice", script({"usage": {"input_tokens": 7, "output_tokens": 3},
                                                      "cost": 0.01}, {"error": "overloaded"}), "web"))
    jobs["bob"].append(post(agent, "bob", script(
        {"usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 3,
                   "cache_creation_input_tokens": 4}, "cost": 0.5}, {"write": "x.txt", "text": "x\n"}), "other"))
    hung = post(agent, "bob", script({"hang": True}), "other")
    jobs["bob"].append(hung)
    for user, job in (("alice", jobs["alice"][0]), ("alice", jobs["alice"][1]), ("bob", jobs["bob"][0])):
        wait_job(agent, user, job)
    wait_job(agent, "bob", hung, until=("running",))
    waiting = post(agent, "bob", script({"say": "never runs"}), "other")
    jobs["bob"].append(waiting)
    for job in (waiting, hung):  # one cancelled in the queue, one while it ran
        assert agent.json("DELETE", f"/v1/jobs/{job}", token=agent.tokens["bob"])[1]["status"] == "cancelled"
    # a restart: totals must still add up
    agent.stop()
    agent.start()
    jobs["carol"].append(post(agent, "carol", script({"write": "c.txt", "text": "c\n"}), "app"))
    wait_job(agent, "carol", jobs["carol"][0])
    infos = {user: [job_of(agent, user, j) for j in ids] for user, ids in jobs.items()}
    # carol leaves: her history stays
    set_users(agent, ["alice", "bob"])
    agent.stop()
    agent.start()
    agent.infos = infos
    yield agent
    agent.stop()


def usage(box: AgentProcess, as_user: str = "alice", **query) -> tuple:
    path = "/v1/usage" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    return box.json("GET", path, token=box.tokens[as_user])


# ------------------------------------------------------------------ usage over HTTP


def test_admin_sees_everyone_and_totals_are_the_sum_of_the_jobs(box):
    status, report = usage(box)
    assert status == 200, report
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["alice", "bob", "carol"]
    assert [rows[u]["user_removed"] for u in rows] == [False, False, True]
    assert report["removed_users"] == ["carol"]
    assert (rows["alice"]["done"], rows["alice"]["failed"], rows["bob"]["cancelled"]) == (1, 1, 2)
    for user, infos in box.infos.items():
        assert_figures(rows[user], expected_figures(infos))
    everything = [j for infos in box.infos.values() for j in infos]
    assert_figures(report["total"], expected_figures(everything))
    # figures the AI reported, by hand: the stand-in's default usage for carol's ask
    assert report["total"]["tokens_in"] == 100 + 7 + 5 + 120
    assert report["total"]["cache_read_tokens"] == 1000 + 3
    assert report["total"]["cache_write_tokens"] == 50 + 4
    assert report["total"]["cost_usd"] == pytest.approx(0.25 + 0.01 + 0.5 + 0.0123)
    assert (report["total"]["files_changed"], report["total"]["lines_added"]) == (4, 5)
    assert report["total"]["asks"] == 6 and report["total"]["queue_wait_minutes"] > 0
    never_ran = box.infos["bob"][2]
    assert never_ran["started"] is None and never_ran["result"] is None  # counted, with its wait


def test_a_user_sees_only_their_own_usage(box):
    status, report = usage(box, "bob")
    assert status == 200 and [r["key"] for r in report["rows"]] == ["bob"]
    assert_figures(report["total"], expected_figures(box.infos["bob"]))
    assert usage(box, "bob", user="bob")[0] == 200
    # another user, existing, removed or unknown: the same refusal, which reveals nothing
    for other in ("alice", "carol", "nobody"):
        status, answer = usage(box, "bob", user=other)
        assert (status, answer["code"]) == (403, "forbidden"), answer
    status, only_bob = usage(box, "alice", user="bob")
    assert status == 200 and [r["key"] for r in only_bob["rows"]] == ["bob"]
    assert box.json("GET", "/v1/usage", token=None)[0] == 401


def test_usage_by_project_and_day_and_time_range(box):
    _, by_project = usage(box, group="project")
    assert [r["key"] for r in by_project["rows"]] == ["alice/app", "alice/web", "bob/other", "carol/app"]
    _, by_day = usage(box, group="day")
    assert [r["key"] for r in by_day["rows"]] == [time.strftime("%Y-%m-%d", time.gmtime())]
    _, total = usage(box)
    assert by_project["total"] == by_day["total"] == total["total"]
    _, future = usage(box, since="2999-01-01")
    assert future["rows"] == [] and future["total"]["asks"] == 0
    _, nothing_yet = usage(box, until="2000-01-01")
    assert nothing_yet["total"]["asks"] == 0
    for bad in ({"group": "week"}, {"since": "yesterday"}):
        status, answer = usage(box, **bad)
        assert status == 400 and answer["code"] == "bad_request", answer


# ------------------------------------------------------------------ usage on the box and the laptop


def test_box_usage_reads_the_state_while_the_server_runs(box):
    _, api = usage(box)
    as_json = json.loads(box.cli("usage", "--json", check=0).stdout)
    assert as_json["total"] == api["total"] and as_json["rows"] == api["rows"]
    rows = list(csv.DictReader(io.StringIO(box.cli("usage", "--csv", check=0).stdout)))
    assert [r["user"] for r in rows] == ["alice", "bob", "carol", "total"]
    assert rows[2]["user_removed"] == "yes"
    for name in FIGURES:
        assert float(rows[-1][name]) == pytest.approx(api["total"][name]), name
    table = box.cli("usage", "--by", "project", "--user", "alice", check=0)
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["user/project", "asks", "done"]
    assert [l.split()[0] for l in lines[2:]] == ["alice/app", "alice/web", "-" * len(lines[1]), "total"]
    assert box.cli("usage", check=0).stderr.strip().endswith("their history stays): carol")
    assert "carol (removed)" in box.cli("usage", check=0).stdout


def test_laptop_usage_is_ones_own(box, tmp_path):
    lap = Laptop(make_repo(tmp_path / "lap", {"a": b"a\n"}))
    token = tmp_path / "bob.token"
    token.write_text(box.tokens["bob"] + "\n")
    lap.run("init", "--force", "--agent", box.url, "--token-file", str(token), check=0)
    report = json.loads(lap.run("usage", "--json", check=0).out)
    assert [r["key"] for r in report["rows"]] == ["bob/other"]
    assert_figures(report["total"], expected_figures(box.infos["bob"]))
    table = lap.run("usage", "--by", "day", check=0).out.splitlines()
    assert table[0].startswith("usage from ") and table[-1].split()[:5] == ["total", "3", "1", "0", "2"]


def test_an_old_state_db_gains_the_usage_columns(tmp_path):
    """A state folder from before usage: columns added, figures filled from each job's result."""
    config = tmp_path / "agent.toml"
    assert patchwire_agent.main(["init", "-c", str(config), "--token-file", str(tmp_path / "t")]) == 0
    state = Path(tomllib.loads(config.read_text())["server"]["state_dir"])
    state.mkdir(exist_ok=True)  # init makes it
    db = sqlite3.connect(str(state / "jobs.sqlite3"))
    db.executescript("""CREATE TABLE jobs (
        id TEXT PRIMARY KEY, user TEXT NOT NULL, project TEXT NOT NULL, prompt TEXT NOT NULL,
        status TEXT NOT NULL, reason TEXT, created REAL NOT NULL, started REAL, finished REAL,
        snapshot TEXT, tree TEXT, timeout_s INTEGER, result TEXT, stats TEXT, parent TEXT,
        slot INTEGER, pgid INTEGER, last_seq INTEGER NOT NULL DEFAULT 0);""")
    result = {"duration_s": 90.0, "num_turns": 4, "tokens_in": 11, "tokens_out": 22, "cost_usd": 0.5}
    db.execute("INSERT INTO jobs (id, user, project, prompt, status, created, started, finished, result, stats) "
               "VALUES ('a1', 'old', 'p', 'x', 'done', 1000, 1060, 1150, ?, ?)",
               (json.dumps(result), json.dumps({"files": 2, "added": 3, "removed": 1, "binary": 0})))
    db.commit()
    db.close()
    proc = subprocess.run(program_argv("patchwire-agent") + ["usage", "-c", str(config), "--json", "--since", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    total = json.loads(proc.stdout)["total"]
    assert (total["asks"], total["done"], total["turns"], total["tokens_in"], total["tokens_out"]) == (1, 1, 4, 11, 22)
    assert (total["ai_minutes"], total["queue_wait_minutes"], total["cost_usd"]) == (1.5, 1.0, 0.5)
    assert (total["files_changed"], total["lines_added"], total["lines_removed"]) == (2, 3, 1)
    assert json.loads(proc.stdout)["removed_users"] == ["old"]


def test_usage_without_state_says_so(tmp_path):
    config = tmp_path / "agent.toml"
    assert patchwire_agent.main(["init", "-c", str(config), "--token-file", str(tmp_path / "t")]) == 0
    proc = subprocess.run(program_argv("patchwire-agent") + ["usage", "-c", str(config)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 1 and "no jobs in" in proc.stderr and "Traceback" not in proc.stderr


def test_time_forms():
    now = 1_800_000_000.0
    assert patchwire_agent.parse_time("7d", 0, now=now) == now - 7 * 86400
    assert patchwire_agent.parse_time("2026-11-01", 0) == 1793491200
    assert patchwire_agent.parse_time("2026-11-01", 0, end_of_day=True) == 1793491200 + 86400
    assert patchwire_agent.parse_time("2026-11-01T01:00Z", 0) == 1793491200 + 3600
    assert patchwire_agent.parse_time("2026-11-01T01:00+01:00", 0) == 1793491200
    assert patchwire_agent.parse_time(None, 5.0) == 5.0
    with pytest.raises(patchwire.UsageError, match="is not a time"):
        patchwire_agent.parse_time("last week", 0)
    # past what the clock and the calendar hold: a clear refusal, never an OverflowError
    for text in ("1" + "0" * 310 + "d", "9999-12-31", "9" * 5000 + "s", "9" * 5000, "1e400", "nan"):
        with pytest.raises(patchwire.UsageError, match="is not a time"):
            patchwire_agent.parse_time(text, 0, end_of_day=True)
    assert [n for n, _ in patchwire.USAGE_HEADINGS] == FIGURES  # the laptop's table shows every figure


# ------------------------------------------------------------------ /metrics


def parse_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, name: str) -> Dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def scrape(box: AgentProcess) -> dict:
    status, headers, data = box.request("GET", "/metrics", token=box.tokens["alice"])
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(data.decode())


FORBIDDEN_USAGE = (("method", "GET"), ("route", "/v1/usage"), ("status", "403"))


def test_metrics_parse_and_count_the_jobs(box):
    before = scrape(box)
    for _ in range(3):
        assert usage(box, "bob", user="alice")[0] == 403
    box.request("GET", "/v1/jobs/0123abcd", token=box.tokens["bob"])
    box.request("GET", "/no/such/path", token=box.tokens["bob"])
    families = scrape(box)
    kinds = {name: f.type for name, f in families.items()}
    assert kinds == {"patchwire_build_info": "gauge", "patchwire_start_time_seconds": "gauge",
                     "patchwire_queue_depth": "gauge", "patchwire_jobs_running": "gauge",
                     "patchwire_workers": "gauge", "patchwire_jobs_finished": "counter",
                     "patchwire_ai_seconds": "counter", "patchwire_asks": "counter",
                     "patchwire_http_requests": "counter", "patchwire_http_request_duration_seconds": "histogram"}
    finished = samples(families["patchwire_jobs_finished"], "patchwire_jobs_finished_total")
    assert finished == {(("status", "done"),): 3, (("status", "failed"),): 1, (("status", "cancelled"),): 2}
    assert sum(finished.values()) == sum(len(i) for i in box.infos.values())
    asks = samples(families["patchwire_asks"], "patchwire_asks_total")
    assert asks == {(("user", "alice"),): 2, (("user", "bob"),): 3, (("user", "carol"),): 1}
    ai_s = sum((j.get("result") or {}).get("duration_s") or 0 for i in box.infos.values() for j in i)
    assert families["patchwire_ai_seconds"].samples[0].value == pytest.approx(ai_s, abs=0.01)
    assert families["patchwire_queue_depth"].samples[0].value == 0
    build = families["patchwire_build_info"].samples[0]
    assert build.labels["version"] == patchwire_agent.__version__ and build.value == 1
    requests = samples(families["patchwire_http_requests"], "patchwire_http_requests_total")
    earlier = samples(before["patchwire_http_requests"], "patchwire_http_requests_total")
    assert requests[FORBIDDEN_USAGE] - earlier.get(FORBIDDEN_USAGE, 0) == 3
    assert requests[(("method", "GET"), ("route", "/v1/jobs/{job}"), ("status", "404"))] >= 1
    assert requests[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] >= 1
    routes = {dict(k)["route"] for k in requests}
    assert routes <= set(patchwire_agent.ROUTE_TEMPLATES.values()) | {"unmatched"}  # never a raw path
    hist = families["patchwire_http_request_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")
               and tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) == FORBIDDEN_USAGE}
    counts = [buckets[le] for le in sorted(buckets, key=float)]
    count = samples(hist, "patchwire_http_request_duration_seconds_count")[FORBIDDEN_USAGE]
    assert counts == sorted(counts) and buckets["+Inf"] == count == requests[FORBIDDEN_USAGE]


def test_metrics_want_an_admin_token(box):
    status, answer = box.json("GET", "/metrics", token=box.tokens["bob"])
    assert (status, answer["code"]) == (403, "forbidden")
    assert box.request("GET", "/metrics", token=None)[0] == 401


# ------------------------------------------------------------------ OpenAPI


def strict(doc: dict) -> dict:
    """The document with additionalProperties false on every object that lists its
    properties: an answer with a field the document does not name fails."""
    doc = copy.deepcopy(doc)
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(doc["components"])
    return doc


def operation(doc: dict, method: str, path: str) -> dict:
    for m, pattern, name, _ in patchwire_agent.ROUTES:
        if m == method and pattern.match(path):
            return doc["paths"][patchwire_agent.ROUTE_TEMPLATES[name]][m.lower()]
    raise AssertionError(f"no route for {method} {path}")


def check_answer(doc: dict, method: str, path: str, status: int, headers, data: bytes) -> None:
    import jsonschema
    answers = operation(doc, method, path.split("?")[0])["responses"]
    assert str(status) in answers, f"{method} {path} answered {status}, not documented"
    media = headers["Content-Type"].split(";")[0]
    content = answers[str(status)]["content"]
    assert media in content, f"{method} {path} {status}: {media} not documented"
    schema = {**content[media]["schema"], "components": doc["components"]}
    if media == "application/json":
        bodies = [json.loads(data)]
    elif media == "application/x-ndjson":
        bodies = [json.loads(line) for line in data.splitlines() if line.strip()]
        assert bodies
    else:
        bodies = [data.decode()]
    for body in bodies:
        jsonschema.Draft202012Validator(schema).validate(body)


def test_openapi_is_valid_and_matches_the_server(box, tmp_path):
    from openapi_spec_validator import validate
    status, served = box.json("GET", "/v1/openapi.json", token=None)
    assert status == 200
    validate(served)
    assert served == json.loads(json.dumps(patchwire_agent.openapi_document()))
    for method, _, name, _ in patchwire_agent.ROUTES:  # every route is described
        assert name in patchwire_agent.OPENAPI_ROUTES, f"describe route {name} in OPENAPI_ROUTES"
        assert method.lower() in served["paths"][patchwire_agent.ROUTE_TEMPLATES[name]]
    events = set(e["properties"]["type"]["const"] for e in served["components"]["schemas"]["Event"]["oneOf"])
    assert events >= set(patchwire_agent.LAST_EVENTS) | {"queued", "started", "text", "tool", "result"}
    doc = strict(served)
    alice, bob = box.tokens["alice"], box.tokens["bob"]
    done = box.infos["alice"][0]["id"]
    failed = box.infos["alice"][1]["id"]
    stream = {"Accept": "application/x-ndjson"}
    calls = [("GET", "/v1/health", None, None, {}), ("GET", "/v1/me?project=app", None, alice, {}),
             ("GET", "/v1/me?project=../x", None, alice, {}), ("GET", "/v1/jobs", None, alice, {}),
             ("GET", f"/v1/jobs/{done}", None, alice, {}), ("GET", f"/v1/jobs/{done}/events?follow=0", None, alice, {}),
             ("GET", f"/v1/jobs/{done}/diff", None, alice, {}), ("GET", f"/v1/jobs/{failed}/diff", None, alice, {}),
             ("GET", f"/v1/jobs/{done}", None, bob, {}), ("GET", "/v1/jobs/zz", None, alice, {}),
             ("DELETE", f"/v1/jobs/{done}", None, alice, {}), ("GET", "/v1/jobs/x/events?after=-1", None, alice, {}),
             ("GET", "/v1/usage?group=day", None, alice, {}), ("GET", "/v1/usage?user=alice", None, bob, {}),
             ("GET", "/v1/usage?since=soon", None, bob, {}), ("GET", "/metrics", None, alice, {}),
             ("GET", "/metrics", None, bob, {}), ("GET", "/v1/jobs", None, "wrong", {}),
             ("POST", "/v1/ask", {"project": "app"}, alice, {}),
             ("POST", "/v1/ask", {**ask_body(None, "x", project="app"), "tree": "0" * 40}, alice, {}),
             ("POST", "/v1/ask", ask_body(None, script({"write": "n.txt", "text": "n\n"}), project="app"), bob, {}),
             ("POST", "/v1/ask", ask_body(None, script({"say": "streamed"}), project="app"), bob, stream),
             ("GET", "/v1/notify", None, alice, {}), ("DELETE", "/v1/notify/zz", None, alice, {}),
             ("POST", "/v1/notify", {"url": "https://nowhere.example/hook"}, alice, {}),
             ("POST", "/v1/notify/zz/test", None, alice, {}),
             ("GET", "/v1/openapi.json", None, None, {})]
    statuses = set()
    for method, path, body, token, headers in calls:
        status, got_headers, data = box.request(method, path, body, token=token, headers=headers)
        check_answer(doc, method, path, status, got_headers, data)
        statuses.add(status)
    assert statuses == {200, 202, 400, 401, 403, 404, 409}
    # an unknown path, or a method a path does not have: the documented Error body
    import jsonschema
    error = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Error", "components": doc["components"]})
    for method, path, expect in (("DELETE", "/v1/jobs", 405), ("GET", "/v2/nothing", 404)):
        status, _, data = box.request(method, path, token=alice)
        assert status == expect and str(expect) in served["info"]["description"]
        error.validate(json.loads(data))


# ------------------------------------------------------------------ the README's curl lines


def readme_curl_lines() -> List[str]:
    text = (Path(patchwire_agent.__file__).parent / "README.md").read_text()
    block = text.split("## HTTP API", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_curl_examples_run(box, tmp_path):
    """Every curl line of the README's HTTP API section, run by bash against the agent with
    the admin's token in ~/.config/patchwire/token; curl fails on any HTTP error."""
    lines = readme_curl_lines()
    setup, commands = lines[0], lines[1:]
    assert setup.startswith("T=$(cat ~/.config/patchwire/token); A=http://127.0.0.1:7433")
    home = tmp_path / "home"
    (home / ".config" / "patchwire").mkdir(parents=True)
    (home / ".config" / "patchwire" / "token").write_text(box.tokens["alice"] + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_curl = subprocess.run(["sh", "-c", "command -v curl"], stdout=subprocess.PIPE, text=True).stdout.strip()
    (bin_dir / "curl").write_text(f'#!/bin/sh\nexec {real_curl} --fail-with-body --max-time 30 "$@"\n')
    (bin_dir / "curl").chmod(0o755)
    work = make_repo(tmp_path / "work", {})
    (work / "ask.json").write_text(json.dumps(ask_body(None, script({"write": "from-readme.txt", "text": "hi\n"}),
                                                      project="my-app")))
    done = box.infos["alice"][0]["id"]
    status, added = box.json("POST", "/v1/notify", {"url": "http://127.0.0.1:9/readme"}, token=box.tokens["alice"])
    assert status == 201, added
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    routes = set()
    running = ""
    status, group = box.json("POST", "/v1/ask", ask_body(None, script({"say": "hi"}), project="my-app", attempts=2),
                             token=box.tokens["alice"])
    assert status == 202, group
    for command in commands:
        command = command.replace("7e57a1b2", added["target"]["id"]).replace(
            "https://hooks.example.com/patchwire", "http://127.0.0.1:9/readme")
        cancels = "-X DELETE" in command and "/v1/jobs/" in command
        if cancels:  # cancel a job that runs (the box has one worker)
            running = post(box, "alice", script({"hang": True}))
            wait_job(box, "alice", running, until=("running",))
        job = running if cancels else done
        command = command.replace("7c2e", group["id"][:6])  # an ask of two attempts
        line = setup.replace("http://127.0.0.1:7433", box.url) + "\n" + command.replace("3fa1", job[:6])
        proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + line], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert proc.returncode == 0, f"{command}\n{proc.stderr.decode()}\n{proc.stdout.decode()[-500:]}"
        for url in re.findall(r"\$A(/[^\s\"'?]*)", command):
            method = "DELETE" if "-X DELETE" in command else "POST" if " -d " in command else "GET"
            path = url.replace("3fa1", job[:6])
            routes |= {name for m, pattern, name, _ in patchwire_agent.ROUTES if m == method and pattern.match(path)}
    assert routes == {name for _, _, name, _ in patchwire_agent.ROUTES}  # every route has its example
    assert job_of(box, "alice", running)["status"] == "cancelled"
