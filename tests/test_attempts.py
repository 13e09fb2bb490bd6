"""Several attempts at once (`patchwire ask -n N`, POST /v1/ask with "attempts"): sibling jobs
of one snapshot grouped by an ask id, queued fairly, followed as a group, and one change built
from the attempts, whole or file by file, with the same strict reading and vetting as one job.
The stand-in AI answers per attempt (its `by_attempt` step reads PATCHWIRE_ATTEMPT)."""

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

import patchwire
import patchwire_agent as AGENT

from conftest import STAND_IN_COMMAND, Laptop, ask_body, drive_pty, make_repo, script, wait_until
from test_team import ask_as, edit_config, finish_all, gated, synced_laptop


def per_attempt(**steps: list) -> str:
    """A prompt whose attempt K runs steps[f"a{K}"]."""
    return script({"by_attempt": {key[1:]: value for key, value in steps.items()}})


def group_of(agent, user: str, ask: str) -> dict:
    status, group = agent.json("GET", f"/v1/asks/{ask}", token=agent.tokens[user])
    assert status == 200, group
    return group


# ------------------------------------------------------------------ the box


def test_an_ask_of_three_attempts_is_a_group_of_sibling_jobs_with_its_own_routes(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 3})
    lap = synced_laptop(tmp_path, agent, "alice")
    prompt = per_attempt(a1=[{"write": "a.txt", "text": "one\n"}], a2=[{"write": "a.txt", "text": "two\n"}],
                         a3=[{"error": "scripted failure"}])
    group = first = ask_as(agent, "alice", ask_body(lap, prompt, attempts=3))
    assert group["attempts"] == 3 and [j["attempt"] for j in group["jobs"]] == [1, 2, 3]
    ids = [j["id"] for j in group["jobs"]]
    assert len(set(ids)) == 3 and {j["ask_id"] for j in group["jobs"]} == {group["id"]}
    assert len({j["snapshot"] for j in group["jobs"]}) == 1  # one snapshot for all
    finish_all(agent, dict.fromkeys(ids, "alice"))
    group = group_of(agent, "alice", group["id"][:6])
    assert group["status"] == "ended"
    assert [j["status"] for j in group["jobs"]] == ["done", "done", "failed"]
    assert group["jobs"][0]["stats"]["files"] == 1 and group["jobs"][0]["result"]["cost_usd"] is not None
    assert len({j["slot"] for j in group["jobs"]}) >= 2  # each in its own job folder
    diffs = [agent.request("GET", f"/v1/jobs/{j}/diff")[2] for j in ids[:2]]
    assert b"+one" in diffs[0] and b"+two" in diffs[1]
    # the group's stream: every attempt's events, each naming its job, to every last event
    _, _, data = agent.request("GET", f"/v1/asks/{group['id']}/events?follow=0")
    events = [json.loads(line) for line in data.splitlines() if line.strip()]
    assert {e["job"] for e in events} == set(ids)
    assert sorted(e["job"] for e in events if e["type"] in ("finished", "failed")) == sorted(ids)
    # the API document lists the routes; another user sees no such ask
    doc = agent.json("GET", "/v1/openapi.json", token=None)[1]
    assert "/v1/asks/{ask}" in doc["paths"] and "/v1/asks/{ask}/events" in doc["paths"]
    import jsonschema
    for name, answer in (("AskAnswer", first), ("AskGroup", group)):
        jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                         "components": doc["components"]}).validate(answer)
    assert agent.json("GET", f"/v1/asks/{'0' * 12}")[0] == 404


def test_attempts_are_bounded_by_policy_and_count_once_for_the_rate_limit(make_agent, tmp_path):
    agent = make_agent(start=False, jobs={"workers": 1})
    edit_config(agent, lambda d: d.update(policy={"max_attempts": 2, "rate_limit": "2/hour"}))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "alice")
    status, answer = agent.json("POST", "/v1/ask", ask_body(lap, "hi", attempts=3))
    assert status == 403 and answer["limit"] == "max_attempts", answer
    assert agent.json("POST", "/v1/ask", ask_body(lap, "hi", attempts=0))[0] == 400
    assert agent.json("POST", "/v1/ask", ask_body(lap, "hi", attempts=2))[0] == 202
    assert agent.json("POST", "/v1/ask", ask_body(lap, "hi"))[0] == 202  # 3 jobs, 2 asks
    status, answer = agent.json("POST", "/v1/ask", ask_body(lap, "hi"))
    assert status == 429 and answer["limit"] == "rate_limit", answer


def test_another_user_asking_meanwhile_waits_for_one_attempt_at_most(make_agent, tmp_path):
    agent = make_agent(users=("heavy", "light"), jobs={"workers": 1, "slots": 4})
    heavy = synced_laptop(tmp_path, agent, "heavy")
    light = synced_laptop(tmp_path, agent, "light")
    gate = tmp_path / "gate"
    group = ask_as(agent, "heavy", ask_body(heavy, gated(gate), attempts=4))
    ids = [j["id"] for j in group["jobs"]]
    mine = ask_as(agent, "light", ask_body(light, script({"say": "light"})))["id"]
    gate.write_text("go")
    infos = finish_all(agent, {**dict.fromkeys(ids, "heavy"), mine: "light"})
    started = sorted(infos, key=lambda j: infos[j]["started"])
    assert started[1] == mine, started  # after the attempt already running, before the other three


def test_an_old_state_database_gains_the_attempt_columns(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(str(state / "jobs.sqlite3"))
    db.executescript(AGENT.SCHEMA_SQL)
    db.execute("INSERT INTO jobs (id, user, project, prompt, status, created) VALUES "
               "('abc123abc123', 'alice', 'p', 'hi', 'done', 1.0)")
    db.commit()
    db.close()
    store = AGENT.Store(Path(state))
    job = store.job("abc123abc123")
    assert job["ask_id"] is None and job["attempt"] is None
    store.close()


# ------------------------------------------------------------------ the laptop: ask -n, then choose


def outcome_of(result) -> dict:
    lines = [json.loads(line) for line in result.out.splitlines() if line.strip()]
    return next(line for line in lines if line.get("type") == "outcome")


def applied_log(lap) -> list:
    path = patchwire.Project(lap.root, "laptop").state_file("applied.log")
    return [json.loads(line) for line in path.read_text().splitlines()]


TWO_WAYS = per_attempt(
    a1=[{"write": "lib/a.dart", "text": "a from one\n"}, {"write": "lib/b.dart", "text": "b from one\n"}],
    a2=[{"write": "lib/a.dart", "text": "a from two\n"}, {"write": "lib/b.dart", "text": "b from two\n"},
        {"write": "README.md", "text": "# two\n"}],
    a3=[{"error": "scripted failure of attempt 3"}])


def test_pick_applies_attempt_two_whole_byte_for_byte_and_continue_goes_on_from_it(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 3})
    lap = synced_laptop(tmp_path, agent, "alice")
    result = lap.ask(TWO_WAYS, "-n", "3", "--pick", "2", "--json", check=0)
    outcome = outcome_of(result)
    rows = outcome["attempts"]
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert "scripted failure" in rows[2]["problem"] and rows[1]["files"] == 3
    assert outcome["differences"] == [{"attempts": [1, 2], "paths": ["README.md", "lib/a.dart", "lib/b.dart"]}]
    assert outcome["applied"] and outcome["apply"]["ask"] == outcome["ask"]
    assert (lap.root / "lib/a.dart").read_bytes() == b"a from two\n"
    assert (lap.root / "lib/b.dart").read_bytes() == b"b from two\n"
    assert (lap.root / "README.md").read_bytes() == b"# two\n"
    entry = applied_log(lap)[-1]
    assert entry["job"] == rows[1]["job"] and entry["ask"] == outcome["ask"]
    assert set(entry["parts"].values()) == {2}
    # the job list names the ask and each attempt
    jobs = lap.run("jobs", check=0).out
    assert f"ask {outcome['ask'][:6]} #2" in jobs
    shown = lap.run("show", rows[0]["job"], check=0).out
    assert f"ask_id:   {outcome['ask']}" in shown and f"attempt 2: job {rows[1]['job']} done, 3 file(s)" in shown
    assert f"attempt 1: job {rows[0]['job']} done, 2 file(s) +2 -0 (this one)" in shown
    # --continue goes on from the attempt applied
    assert lap.last_job() == rows[1]["job"]
    follow = lap.ask(script({"say": "more"}), "--continue", "--no-apply", "--json", check=0)
    job = outcome_of(follow)["job"]
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["parent"] == rows[1]["job"]


def test_take_builds_one_change_from_two_attempts_and_undo_puts_it_back(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 3})
    lap = synced_laptop(tmp_path, agent, "alice")
    before = (lap.root / "README.md").read_bytes()
    result = lap.ask(TWO_WAYS, "-n", "3", "--take", "2:lib/a.dart,1:lib/b.dart", "--json", check=0)
    outcome = outcome_of(result)
    assert (lap.root / "lib/a.dart").read_bytes() == b"a from two\n"
    assert (lap.root / "lib/b.dart").read_bytes() == b"b from one\n"
    assert (lap.root / "README.md").read_bytes() == before  # attempt 2's other file stays out
    assert applied_log(lap)[-1]["parts"] == {"lib/a.dart": 2, "lib/b.dart": 1}
    assert outcome["apply"]["parts"] == {"lib/a.dart": 2, "lib/b.dart": 1}
    log = lap.run("log", check=0).out
    assert f"from ask {outcome['ask']} (attempt 2: lib/a.dart; attempt 1: lib/b.dart)" in log
    lap.run("apply", "--undo", check=0)
    assert not (lap.root / "lib/a.dart").exists() and not (lap.root / "lib/b.dart").exists()


def test_the_same_file_from_two_attempts_is_refused_and_nothing_changes(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 2})
    lap = synced_laptop(tmp_path, agent, "alice")
    prompt = per_attempt(a1=[{"write": "lib/a.dart", "text": "one\n"}], a2=[{"write": "lib/a.dart", "text": "two\n"}])
    result = lap.ask(prompt, "-n", "2", "--take", "1:lib/a.dart,2:lib/a.dart")
    assert result.returncode == 2, result.err
    assert "lib/a.dart is taken from attempts 1 and 2" in result.err and "Traceback" not in result.err
    assert not (lap.root / "lib/a.dart").exists()
    # attempt numbers outside -n are refused before anything is sent
    result = lap.ask(prompt, "-n", "2", "--pick", "3")
    assert result.returncode == 2 and "no attempt 3 of 2" in result.err


def test_a_cancelled_attempt_is_shown_and_the_others_still_apply(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 2})
    lap = synced_laptop(tmp_path, agent, "alice")
    prompt = per_attempt(a1=[{"write": "one.txt", "text": "one\n"}],
                         a2=[{"wait_file": str(tmp_path / "never"), "max_s": 60}])
    proc = subprocess.Popen(lap.program + ["ask", prompt, "-n", "2", "--pick", "1", "--json"], cwd=lap.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lap.env)
    try:
        def second_running():
            jobs = agent.json("GET", "/v1/jobs")[1]["jobs"]
            return next((j for j in jobs if j.get("attempt") == 2 and j["status"] == "running"), None)
        job = wait_until(second_running, what="attempt 2 running")
        assert agent.json("DELETE", f"/v1/jobs/{job['id']}")[0] == 200
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    outcome = next(line for line in lines if line.get("type") == "outcome")
    assert [r["status"] for r in outcome["attempts"]] == ["done", "cancelled"]
    assert "cancelled by alice" in outcome["attempts"][1]["problem"]
    assert (lap.root / "one.txt").read_bytes() == b"one\n"


# ------------------------------------------------------------------ units: policy and a box that lies


def test_attempts_beyond_max_running_wait_their_turn_and_beyond_max_queued_are_refused(make_agent, tmp_path):
    """The policy for an ask of more attempts than the user may run at once: each attempt is
    a job, so they run max_running at a time (never more, never refused for it); an ask of
    more attempts than max_queued allows is refused whole (429), starting none."""
    agent = make_agent(start=False, jobs={"workers": 2, "slots": 3})
    edit_config(agent, lambda d: d.update(policy={"max_running": 1, "max_queued": 2}))
    agent.start()
    lap = synced_laptop(tmp_path, agent, "alice")
    status, answer = agent.json("POST", "/v1/ask", ask_body(lap, "hi", attempts=3))
    assert status == 429 and answer["limit"] == "max_queued", answer
    assert agent.json("GET", "/v1/jobs")[1]["jobs"] == []  # none of the three started
    prompt = per_attempt(a1=[{"sleep": 0.3}, {"say": "one"}], a2=[{"sleep": 0.3}, {"say": "two"}])
    group = ask_as(agent, "alice", ask_body(lap, prompt, attempts=2))
    infos = finish_all(agent, {j["id"]: "alice" for j in group["jobs"]})
    runs = sorted((info["started"], info["finished"]) for info in infos.values())
    assert [info["status"] for info in infos.values()] == ["done", "done"]
    assert runs[0][1] <= runs[1][0], runs  # one after the other, on a box with two workers free


def test_max_attempts_is_checked_like_every_policy_key(tmp_path):
    config = tmp_path / "agent.toml"
    AGENT.main(["init", "-c", str(config), "--user", "alice", "--token-file", str(tmp_path / "t"),
                "--listen", "127.0.0.1:0"])
    config.write_text(config.read_text() + "\n[policy]\nmax_attempts = 5\n")
    with pytest.raises(AGENT.PatchwireError, match="max_attempts must be 1..4"):
        AGENT.AgentConfig.load(config)


def test_the_laptop_refuses_an_ask_group_that_does_not_add_up():
    job = {"id": "aaaaaaaaaaaa", "status": "done", "ask_id": "bbbbbbbbbbbb", "attempt": 1}
    good = {"id": "bbbbbbbbbbbb", "project": "p", "prompt": "x", "created": 1.0, "status": "ended",
            "attempts": 2, "jobs": [job, {**job, "id": "cccccccccccc", "attempt": 2}]}
    assert patchwire.checked_group(good, "bbbb")["attempts"] == 2
    lies = [{**good, "id": "dddddddddddd"},  # not the ask asked for
            {**good, "attempts": 3},  # more attempts than jobs
            {**good, "jobs": [job, {**job, "id": "cccccccccccc", "attempt": 3}]},  # numbering
            {**good, "jobs": [job, {**job, "id": "cccccccccccc", "attempt": 2, "ask_id": "eeeeeeeeeeee"}]},
            {**good, "jobs": [job, {**job, "attempt": 2}]},  # the same job twice
            {**good, "jobs": [job, {**job, "id": "cccccccccccc", "attempt": True}]},  # true is no number
            {**good, "jobs": "all of them"}]
    for lie in lies:
        with pytest.raises(patchwire.PatchwireError):
            patchwire.checked_group(lie, "bbbb")


def test_on_a_terminal_each_file_is_offered_from_the_attempts_that_change_it(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 3})
    lap = synced_laptop(tmp_path, agent, "alice")
    before = (lap.root / "README.md").read_bytes()
    out = drive_pty(lap, ["ask", TWO_WAYS, "-n", "3", "--no-color"], ["t", "2", "1", ""],
                    [b"keeps them for later.", b"leave it out?"])
    assert "attempt 2 differs from 1 in 3 file(s)" in out
    assert "attempt 1:" in out and "attempt 2:" in out and "+a from two" in out  # the alternatives, shown
    assert (lap.root / "lib/a.dart").read_bytes() == b"a from two\n"
    assert (lap.root / "lib/b.dart").read_bytes() == b"b from one\n"
    assert (lap.root / "README.md").read_bytes() == before
    assert applied_log(lap)[-1]["parts"] == {"lib/a.dart": 2, "lib/b.dart": 1}


def test_agents_run_one_attempt_per_ai_profile_of_the_box(make_agent, tmp_path):
    log = tmp_path / "stand-in.log"
    profiles = {name: {"command": STAND_IN_COMMAND + ["--model", name]} for name in ("quick", "deep")}
    agent = make_agent(jobs={"workers": 2, "slots": 2}, ai={"env": {"STAND_IN_LOG": str(log)}, "profiles": profiles})
    lap = synced_laptop(tmp_path, agent, "alice")
    prompt = per_attempt(a1=[{"write": "a.txt", "text": "quick\n"}], a2=[{"write": "a.txt", "text": "deep\n"}])
    outcome = outcome_of(lap.ask(prompt, "--agents", "quick,deep", "--pick", "2", "--json", check=0))
    assert [(r["attempt"], r["agent"]) for r in outcome["attempts"]] == [(1, "quick"), (2, "deep")]
    assert (lap.root / "a.txt").read_bytes() == b"deep\n"
    models = sorted(run["argv"][run["argv"].index("--model") + 1] for run in map(json.loads, log.read_text().splitlines()))
    assert models == ["deep", "quick"]
    # a profile the box does not have is refused, naming the ones it has
    result = lap.ask(prompt, "--agents", "quick,codex")
    assert result.returncode == 3 and "no AI profile 'codex'" in result.err and "deep, quick" in result.err


# ------------------------------------------------------------------ hunks from several attempts

BASE = b"".join(b"line %d\n" % n for n in range(1, 31))
ODD = "odd,name#1:x.txt"  # every character --take gives a meaning to


def edited(changes: dict) -> str:
    """BASE with lines replaced ({line number: text})."""
    return "".join(f"{changes.get(n, f'line {n}')}\n" for n in range(1, 31))


# attempt 1 changes lines 3 and 25, attempt 2 lines 3 (differently: overlapping) and 14
HUNKY = per_attempt(
    a1=[{"write": "lib/b.dart", "text": edited({3: "three from one", 25: "twenty-five from one"})},
        {"write": ODD, "text": "odd from one\n"}],
    a2=[{"write": "lib/b.dart", "text": edited({3: "three from two", 14: "fourteen from two"})},
        {"write": ODD, "text": "odd from two\n"}])


def hunky_laptop(tmp_path, agent) -> Laptop:
    root = make_repo(tmp_path / "alice" / "laptop", {"README.md": b"# alice\n", "lib/b.dart": BASE})
    lap = Laptop(root)
    lap.init(agent, user="alice")
    lap.run("sync", check=0)
    return lap


def test_take_builds_one_file_from_hunks_of_two_attempts_and_refuses_overlapping_ones(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 2})
    lap = hunky_laptop(tmp_path, agent)
    # hunk 1 of each attempt changes line 3: alternatives, never merged; nothing is written
    result = lap.ask(HUNKY, "-n", "2", "--take", "1#1:lib/b.dart,2#1:lib/b.dart")
    assert result.returncode == 2, result.err
    assert ("hunk 1 of attempt 1 and hunk 1 of attempt 2 overlap in lib/b.dart (lines 1-6 as synced)"
            in result.err and "Traceback" not in result.err)
    assert (lap.root / "lib/b.dart").read_bytes() == BASE and not (lap.root / ODD).exists()
    assert not patchwire.Project(lap.root, "laptop").state_file("applied.log").exists()
    # line 3 and 25 from attempt 1, line 14 from attempt 2; the odd name escaped
    take = "2#2:lib/b.dart, 1#1+2:lib/b.dart, 2:odd\\,name#1:x.txt"
    outcome = outcome_of(lap.ask(HUNKY, "-n", "2", "--take", take, "--json", check=0))
    assert outcome["attempts"][0]["paths"] == ["lib/b.dart", ODD]
    assert (lap.root / "lib/b.dart").read_bytes() == edited(
        {3: "three from one", 14: "fourteen from two", 25: "twenty-five from one"}).encode()
    assert (lap.root / ODD).read_bytes() == b"odd from two\n"
    entry = applied_log(lap)[-1]
    assert entry["parts"] == {ODD: 2} and entry["hunks"] == {"lib/b.dart": [[1, 1], [2, 2], [1, 2]]}
    # built from two attempts: not attempt 2's whole change, so a later `apply` of it is no "already"
    assert entry["partial"] is True and outcome["apply"]["hunks"] == entry["hunks"]
    said = (f"from ask {outcome['ask']} (attempt 2: {ODD}; lib/b.dart: hunk 1 of attempt 1, hunk 2 of attempt 2, "
            "hunk 2 of attempt 1)")
    assert said in lap.run("log", check=0).out
    undone = lap.run("apply", "--undo", check=0)
    assert said in undone.err
    assert (lap.root / "lib/b.dart").read_bytes() == BASE and not (lap.root / ODD).exists()
    assert f"undo of job {entry['job']} {said}" in lap.run("log", check=0).out
    # a hunk the attempt does not have, and a new file asked for in hunks, are refused by name
    result = lap.ask(HUNKY, "-n", "2", "--take", "2#3:lib/b.dart")
    assert result.returncode == 2 and "attempt 2 changes lib/b.dart in 2 hunk(s): there is no hunk 3" in result.err


def test_on_a_terminal_a_file_the_attempts_edit_differently_is_offered_hunk_by_hunk(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 2, "slots": 2})
    lap = hunky_laptop(tmp_path, agent)
    # lib/b.dart: h, then line 3 (attempt 1 or 2) from 2, line 14 (2 only) taken, line 25 (1 only)
    # left out; the odd file from attempt 1
    out = drive_pty(lap, ["ask", HUNKY, "-n", "2", "--no-color"], ["t", "h", "2", "2", "", "1"],
                    [b"keeps them for later.", b"leave it out?"])
    assert "lib/b.dart: from attempt 1/2, h hunk by hunk, or Enter to leave it out?" in out
    assert "attempt 1, hunk 1 (from line 1 as synced):" in out and "attempt 2, hunk 1 (from line 1 as synced):" in out
    assert "lib/b.dart, part 1/3: from attempt 1/2, or Enter" in out
    assert "lib/b.dart, part 3/3: from attempt 1, or Enter" in out
    assert (lap.root / "lib/b.dart").read_bytes() == edited({3: "three from two", 14: "fourteen from two"}).encode()
    assert (lap.root / ODD).read_bytes() == b"odd from one\n"
    entry = applied_log(lap)[-1]
    assert entry["parts"] == {ODD: 1} and entry["hunks"] == {"lib/b.dart": [[2, 1], [2, 2]]}


def test_take_parts_are_read_for_any_file_name():
    parts = patchwire.parse_take("2:lib/a.dart, 3#1+2:a\\,b#c:d.txt,1:x\\\\y,4:\\ sp\\ ")
    assert parts == [patchwire.Part(2, "lib/a.dart"), patchwire.Part(3, "a,b#c:d.txt", (1, 2)),
                     patchwire.Part(1, "x\\y"), patchwire.Part(4, " sp ")]
    for bad, said in (("2", "is not K:PATH"), ("2#0:a", "numbered from 1"), ("a:b", "is not K:PATH"),
                      ("2:a\\", "lone backslash")):
        with pytest.raises(patchwire.UsageError, match=said):
            patchwire.parse_take(bad)
