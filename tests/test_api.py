"""The agent's HTTP API, spoken to the real agent process with real clients: urllib,
http.client, raw sockets and curl. The AI is the stand-in claude, scripted through the
prompt; the project is synced by the real laptop CLI (local rsync)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import List

import pytest

import patchwire
from conftest import ROOT, Laptop, ask_body, make_repo, script

PROJECT = "laptop"  # the project name the CLI derives from the folder name


# ------------------------------------------------------------------ helpers


@pytest.fixture
def synced(laptop) -> Laptop:
    """The `laptop` fixture's project, synced to the agent's mirror."""
    laptop.run("sync", check=0)
    return laptop


def sync_laptop(tmp_path: Path, agent, name: str = "laptop") -> Laptop:
    """Like the `laptop` fixture, for an agent made with `make_agent(...)`."""
    root = make_repo(tmp_path / name, {"README.md": b"# demo\n", "src/app.py": b"print('hello')\n"})
    lap = Laptop(root)
    lap.init(agent)
    lap.run("sync", check=0)
    return lap


def post_ask(agent, body: dict) -> dict:
    status, answer = agent.json("POST", "/v1/ask", body)
    assert status == 202, answer
    return answer


def wait_for_event(agent, job: str, kind: str, timeout: float = 30) -> List[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = agent.events(job)
        if any(e["type"] == kind for e in events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event in job {job} after {timeout}s: {agent.events(job)}")


def address(agent) -> tuple:
    host, port = urllib.parse.urlsplit(agent.url).netloc.rsplit(":", 1)
    return host, int(port)


def raw_exchange(agent, data: bytes, timeout: float = 15) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(address(agent), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def split_response(raw: bytes) -> tuple:
    """(status, {lower-case header: value}, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def assert_json_error(status, headers, body, expect_status, *, code=None, words=()):
    assert status == expect_status, body
    assert headers["Content-Type"] == "application/json", headers
    answer = json.loads(body)
    assert isinstance(answer["error"], str) and answer["error"], answer
    if code:
        assert answer["code"] == code, answer
    for word in words:
        assert word in answer["error"], answer
    return answer


def job_ids(agent) -> List[str]:
    status, answer = agent.json("GET", "/v1/jobs")
    assert status == 200
    return [j["id"] for j in answer["jobs"]]


# ------------------------------------------------------------------ health and auth

AUTH_ENDPOINTS = [
    ("GET", "/v1/me?project=demo"),
    ("GET", "/v1/me"),
    ("POST", "/v1/ask"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/abc123"),
    ("DELETE", "/v1/jobs/abc123"),
    ("GET", "/v1/jobs/abc123/events?after=0"),
    ("GET", "/v1/jobs/abc123/diff"),
]


def test_health_needs_no_token(agent):
    status, headers, body = agent.request("GET", "/v1/health", token=None)
    assert status == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["version"] == patchwire.__version__
    assert health["queue_depth"] == 0
    assert health["ai_found"] is True  # the stand-in is sys.executable, which exists
    # a bad token does not make health fail either
    assert agent.request("GET", "/v1/health", token="nope")[0] == 200


def test_health_says_when_the_ai_command_is_missing(make_agent, tmp_path):
    agent = make_agent(ai_command=[str(tmp_path / "no-such-claude"), "--print"])
    status, health = agent.json("GET", "/v1/health", token=None)
    assert status == 200 and health["ai_found"] is False


def test_every_other_endpoint_wants_the_bearer_token(agent):
    wrong = {"no header": None, "wrong token": "pw_not_the_token", "Basic": "Basic"}
    for method, path in AUTH_ENDPOINTS:
        body = {} if method == "POST" else None
        for label, token in wrong.items():
            headers = {"Authorization": "Basic YWxpY2U6cHc="} if label == "Basic" else None
            status, hdrs, data = agent.request(method, path, body, token=None if label == "Basic" else token,
                                               headers=headers)
            where = f"{method} {path} with {label}"
            assert status == 401, f"{where}: {status} {data!r}"
            assert hdrs["WWW-Authenticate"].startswith("Bearer"), where
            assert hdrs["Content-Type"] == "application/json", where
            answer = json.loads(data)
            assert answer["code"] == "unauthorized" and answer["error"], where
            assert "pw_not_the_token" not in data.decode(), where
        # the right token gets past auth (any answer but 401)
        assert agent.request(method, path, {} if method == "POST" else None)[0] != 401, path


def test_non_ascii_token_is_refused_not_crashed(agent):
    for token in ("t\u00f6k\u00e9n".encode("utf-8"), b"\xff\xfe\x80", agent.token.encode() + "\u00e9".encode()):
        raw = raw_exchange(agent, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                           + b"\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response(raw)
        assert status == 401, raw
        assert headers["www-authenticate"].startswith("Bearer")
        assert json.loads(body)["error"] == "invalid token"
    assert agent.request("GET", "/v1/health")[0] == 200
    assert "Traceback" not in agent.read_log()


def test_the_token_scheme_is_case_insensitive_and_the_token_exact(agent):
    assert agent.request("GET", "/v1/jobs", token=None, headers={"Authorization": "bearer " + agent.token})[0] == 200
    assert agent.request("GET", "/v1/jobs", token=agent.token[:-1])[0] == 401
    assert agent.request("GET", "/v1/jobs", token=agent.token + "x")[0] == 401
    assert agent.request("GET", "/v1/jobs", token=None, headers={"Authorization": "Bearer"})[0] == 401


# ------------------------------------------------------------------ /v1/me


def test_me_names_the_user_and_creates_the_mirror(agent):
    status, me = agent.json("GET", "/v1/me?project=demo")
    assert status == 200
    assert me["user"] == "alice"
    mirror = Path(me["mirror"])
    assert mirror == agent.state_dir / "users" / "alice" / "mirror" / "demo"
    assert mirror.is_dir()


def test_me_refuses_invalid_project_names(agent):
    for project in ("../x", "a" * 65, ".hidden", "-dash", "a/b", "a b", "..", "x\x00y", "caf\u00e9"):
        status, headers, body = agent.request("GET", "/v1/me?project=" + urllib.parse.quote(project, safe=""))
        answer = assert_json_error(status, headers, body, 400, code="bad_request",
                                   words=("project must be a name", "at most 64"))
        assert "mirror" not in answer, project
    assert list((agent.state_dir / "users").rglob("*/mirror/*")) == []  # no folder made for any


def test_me_accepts_a_64_character_name(agent):
    status, me = agent.json("GET", "/v1/me?project=" + "a" * 64)
    assert status == 200 and Path(me["mirror"]).name == "a" * 64


def test_me_refuses_an_empty_project_name(agent):
    status, headers, body = agent.request("GET", "/v1/me?project=")
    assert_json_error(status, headers, body, 400, code="bad_request", words=("project must be a name",))


def test_me_refuses_a_name_with_a_trailing_newline(agent):
    status, headers, body = agent.request("GET", "/v1/me?project=x%0A")
    assert_json_error(status, headers, body, 400, code="bad_request")
    assert list((agent.state_dir / "users").rglob("*/mirror/*")) == []


# ------------------------------------------------------------------ jobs


def test_ask_without_streaming_queues_a_job_that_finishes(synced, agent):
    first = post_ask(agent, ask_body(synced, script({"say": "first"})))
    assert first["status"] in ("queued", "running", "done")
    assert len(first["id"]) == 12 and first["project"] == PROJECT
    assert "user" not in first
    assert agent.wait_job(first["id"])["status"] == "done"
    second = post_ask(agent, ask_body(synced, script({"say": "second"})))
    assert agent.wait_job(second["id"])["status"] == "done"

    # newest first
    assert job_ids(agent) == [second["id"], first["id"]]
    # a unique prefix finds the job
    job = second["id"]
    prefix = next(job[:n] for n in range(1, 13) if not first["id"].startswith(job[:n]))
    status, found = agent.json("GET", f"/v1/jobs/{prefix}")
    assert status == 200 and found["id"] == job and found["status"] == "done"
    assert found["prompt"] == script({"say": "second"})
    # an id of nobody's job, and a malformed one
    other = "".join("0" if c != "0" else "1" for c in job)
    for missing in (other, "zzz", "0" * 40):
        status, headers, body = agent.request("GET", f"/v1/jobs/{missing}")
        assert_json_error(status, headers, body, 404, code="not_found")


def test_an_ambiguous_prefix_is_refused(synced, agent):
    body = ask_body(synced, script({"say": "hi"}))
    ids = [post_ask(agent, body)["id"] for _ in range(17)]
    # 17 ids over 16 first characters: some first character is shared
    firsts = [j[0] for j in ids]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    status, headers, body = agent.request("GET", f"/v1/jobs/{shared}")
    assert_json_error(status, headers, body, 409, code="ambiguous", words=("ambiguous",))


def test_other_users_jobs_are_invisible(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    lap = sync_laptop(tmp_path, agent)
    job = post_ask(agent, ask_body(lap, script({"say": "mine"})))["id"]
    agent.wait_job(job)
    bob = agent.tokens["bob"]
    assert agent.json("GET", "/v1/jobs", token=bob) == (200, {"jobs": []})
    for method, path in (("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/diff"),
                         ("GET", f"/v1/jobs/{job}/events"), ("DELETE", f"/v1/jobs/{job}")):
        status, headers, body = agent.request(method, path, token=bob)
        assert_json_error(status, headers, body, 404, code="not_found")
    assert agent.json("GET", "/v1/me", token=bob)[1]["user"] == "bob"


def curl_stream(agent, body_file: Path, header_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-sN", "--max-time", "60", "-D", str(header_file),
         "-H", "Accept: application/x-ndjson", "-H", "Content-Type: application/json",
         "-H", "Authorization: Bearer " + agent.token,
         "--data-binary", "@" + str(body_file), agent.url + "/v1/ask"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ask_streams_events_as_they_happen(synced, agent, tmp_path):
    body_file = tmp_path / "ask.json"
    body_file.write_text(json.dumps(ask_body(synced, script(
        {"say": "Looking at the project."}, {"sleep": 1.5},
        {"write": "notes/out.txt", "text": "one\ntwo\nthree\n"}))))
    proc = curl_stream(agent, body_file, tmp_path / "headers.txt")
    events, seen_while_running = [], {}
    try:
        for line in proc.stdout:
            if not line.strip():
                continue
            event = json.loads(line)
            events.append(event)
            if event["type"] in ("queued", "started", "text"):
                # the finished event does not exist yet: the job is still under way
                status, job = agent.json("GET", f"/v1/jobs/{event['job']}")
                stored = [e["type"] for e in agent.events(event["job"])]
                seen_while_running[event["type"]] = (job["status"], "finished" in stored)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    types = [e["type"] for e in events]
    assert types[0] == "queued" and "started" in types and "text" in types, types
    assert types.index("queued") < types.index("started") < types.index("text") < types.index("finished")
    assert seen_while_running["text"] == ("running", False), seen_while_running
    assert seen_while_running["started"] == ("running", False), seen_while_running
    assert seen_while_running["queued"][1] is False
    text = next(e for e in events if e["type"] == "text")
    assert text["text"] == "Looking at the project."

    # numbered 1..N, one job, and the same as what the store keeps
    job = events[0]["job"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["job"] for e in events} == {job}
    assert agent.events(job) == events
    last = events[-1]
    assert last["type"] == "finished" and last["status"] == "done"
    assert {k: last["stats"][k] for k in ("files", "added", "removed")} == {"files": 1, "added": 3, "removed": 0}

    # ?after=N continues exactly where a client left off
    for after in (0, 1, 2, len(events) - 1, len(events)):
        status, headers, data = agent.request("GET", f"/v1/jobs/{job}/events?after={after}")
        assert status == 200
        assert [json.loads(l) for l in data.splitlines() if l.strip()] == events[after:]

    headers = (tmp_path / "headers.txt").read_text().lower()
    assert headers.startswith("http/1.1 200")
    assert "content-type: application/x-ndjson" in headers
    assert "transfer-encoding: chunked" in headers
    assert "content-length" not in headers


def test_events_of_a_live_job_follow_until_it_ends(synced, agent):
    job = post_ask(agent, ask_body(synced, script({"say": "early"}, {"sleep": 1.0}, {"say": "late"})))["id"]
    wait_for_event(agent, job, "text")
    # a client that lost the stream after the first text continues with ?after=N, live
    seen = agent.events(job)
    after = next(e["seq"] for e in seen if e["type"] == "text")
    status, headers, data = agent.request("GET", f"/v1/jobs/{job}/events?after={after}")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    rest = [json.loads(l) for l in data.splitlines() if l.strip()]
    assert [e["seq"] for e in rest] == list(range(after + 1, after + 1 + len(rest)))
    assert any(e["type"] == "text" and e["text"] == "late" for e in rest)
    assert rest[-1]["type"] == "finished"
    status, headers, body = agent.request("GET", f"/v1/jobs/{job}/events?after=-1")
    assert_json_error(status, headers, body, 400, code="bad_request", words=("after",))


def test_diff_is_the_patch_the_cli_prints(synced, agent):
    job = post_ask(agent, ask_body(synced, script(
        {"write": "README.md", "text": "# demo, edited\n"}, {"write": "new.txt", "text": "new\n"})))["id"]
    assert agent.wait_job(job)["status"] == "done"
    status, headers, patch = agent.request("GET", f"/v1/jobs/{job}/diff")
    assert status == 200 and headers["Content-Type"] == "text/x-diff"
    assert int(headers["Content-Length"]) == len(patch)
    assert b"diff --git a/README.md b/README.md" in patch and b"+# demo, edited\n" in patch
    assert b"diff --git a/new.txt b/new.txt" in patch and b"new file mode 100644" in patch
    cli = synced.run("diff", job, check=0)
    assert cli.stdout == patch
    # full blob ids on every index line: the laptop's 3-way merge finds the preimages by them
    index_lines = [l for l in patch.splitlines() if l.startswith(b"index ")]
    assert len(index_lines) == 2
    assert all(re.fullmatch(rb"index [0-9a-f]{40}\.\.[0-9a-f]{40}( \d+)?", l) for l in index_lines)


def test_diff_of_a_failed_job_is_refused(synced, agent):
    job = post_ask(agent, ask_body(synced, script({"write": "README.md", "text": "x\n"}, {"exit": 3})))["id"]
    assert agent.wait_job(job)["status"] == "failed"
    status, headers, body = agent.request("GET", f"/v1/jobs/{job}/diff")
    answer = assert_json_error(status, headers, body, 409, code="no_diff", words=(job, "failed"))
    assert "exited with status 3" in answer["hint"]


# ------------------------------------------------------------------ 409: the box's copy differs


def test_a_file_never_synced_is_a_tree_mismatch(synced, agent):
    before = job_ids(agent)
    (synced.root / "never.txt").write_text("only on the laptop\n")
    body = ask_body(synced, script({"say": "x"}), extra_paths=["never.txt"])
    assert any(path == "never.txt" for _, _, path in body["files"])
    status, headers, data = agent.request("POST", "/v1/ask", body)
    answer = assert_json_error(status, headers, data, 409, code="tree_mismatch", words=("1 file(s)",))
    assert answer["paths"] == ["never.txt"]
    assert "sync" in answer["hint"]
    assert job_ids(agent) == before
    assert agent.json("GET", "/v1/health")[1]["queue_depth"] == 0


def test_a_changed_blob_is_a_tree_mismatch(synced, agent):
    before = job_ids(agent)
    (synced.root / "src/app.py").write_text("print('changed after the sync')\n")
    body = ask_body(synced, script({"say": "x"}))
    status, headers, data = agent.request("POST", "/v1/ask", body)
    answer = assert_json_error(status, headers, data, 409, code="tree_mismatch")
    assert answer["paths"] == ["src/app.py"]
    assert job_ids(agent) == before
    # after a sync the same ask is accepted
    synced.run("sync", check=0)
    job = post_ask(agent, ask_body(synced, script({"say": "x"})))["id"]
    assert job_ids(agent) == [job] + before


# ------------------------------------------------------------------ cancel


def test_cancel_of_a_finished_job_is_refused(synced, agent):
    job = post_ask(agent, ask_body(synced, script({"say": "quick"})))["id"]
    agent.wait_job(job)
    status, headers, body = agent.request("DELETE", f"/v1/jobs/{job}")
    assert_json_error(status, headers, body, 409, code="finished", words=("already done",))
    assert agent.json("GET", f"/v1/jobs/{job}")[1]["status"] == "done"


def test_cancel_of_a_running_job_ends_it_and_keeps_what_was_said(synced, agent):
    job = post_ask(agent, ask_body(synced, script({"say": "Before the cancel."}, {"sleep": 30},
                                                  {"write": "late.txt", "text": "never\n"})))["id"]
    wait_for_event(agent, job, "text")
    status, cancelled = agent.json("DELETE", f"/v1/jobs/{job}")
    assert status == 200
    assert cancelled["status"] == "cancelled" and cancelled["reason"] == "cancelled by alice"
    events = agent.events(job)
    assert any(e["type"] == "text" and e["text"] == "Before the cancel." for e in events)
    assert events[-1]["type"] == "cancelled" and events[-1]["reason"] == "cancelled by alice"
    assert "finished" not in [e["type"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    status, headers, body = agent.request("GET", f"/v1/jobs/{job}/diff")
    assert_json_error(status, headers, body, 409, code="no_diff")
    # cancelling twice says it is over
    status, headers, body = agent.request("DELETE", f"/v1/jobs/{job}")
    assert_json_error(status, headers, body, 409, code="finished", words=("already cancelled",))


def test_cancel_of_a_queued_job_never_starts_it(make_agent, tmp_path):
    agent = make_agent(jobs={"workers": 1})
    lap = sync_laptop(tmp_path, agent)
    long = post_ask(agent, ask_body(lap, script({"say": "busy"}, {"sleep": 30})))["id"]
    wait_for_event(agent, long, "started")
    queued = post_ask(agent, ask_body(lap, script({"write": "q.txt", "text": "q\n"})))
    assert queued["status"] == "queued"
    assert agent.json("GET", "/v1/health")[1]["queue_depth"] == 1
    status, cancelled = agent.json("DELETE", f"/v1/jobs/{queued['id']}")
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["started"] is None
    assert agent.json("GET", "/v1/health")[1]["queue_depth"] == 0
    # end the long job: the worker is free, and the cancelled job still never ran
    assert agent.json("DELETE", f"/v1/jobs/{long}")[1]["status"] == "cancelled"
    # a job asked after it runs to its end on the one worker: the queue has been served past it
    after = post_ask(agent, ask_body(lap, script({"say": "after"})))["id"]
    assert agent.wait_job(after)["status"] == "done"
    types = [e["type"] for e in agent.events(queued["id"])]
    assert types[0] == "queued" and types[-1] == "cancelled"
    assert "started" not in types and "text" not in types and "tool" not in types
    assert agent.json("GET", f"/v1/jobs/{queued['id']}")[1]["started"] is None


# ------------------------------------------------------------------ hardening


def bad_ask(**fields) -> dict:
    body = {"project": PROJECT, "tree": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "files": [["100644", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391", "a.txt"]],
            "prompt": "hello"}
    body.update(fields)
    return body


BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


BAD_ASKS = [
    (b"{not json", ("not valid JSON",)),
    (b"[1, 2]", ("JSON object",)),
    (b'"a string"', ("JSON object",)),
    (b"\xff\xfe", ("not valid JSON",)),
    (b"", ("JSON object",)),
    (bad_ask(files=[["100644", BLOB, "../etc/passwd"]]), ("unsafe path", "../etc/passwd")),
    (bad_ask(files=[["100644", BLOB, ".git/config"]]), ("unsafe path", ".git/config")),
    (bad_ask(files=[["100644", BLOB, "sub/.git/hooks/x"]]), ("unsafe path",)),
    (bad_ask(files=[["100644", BLOB, "/etc/passwd"]]), ("unsafe path",)),
    (bad_ask(files=[["100600", BLOB, "a.txt"]]), ("bad entry in files", "100600")),
    (bad_ask(files=[["100644", BLOB]]), ("bad entry in files",)),
    (bad_ask(files="a.txt"), ("files must be a list",)),
    (bad_ask(timeout_s=7201), ("timeout_s must be 1..7200",)),
    (bad_ask(timeout_s=0), ("timeout_s",)),
    (bad_ask(timeout_s="60"), ("timeout_s",)),
    (bad_ask(timeout_s=True), ("timeout_s",)),
    (bad_ask(tree="HEAD"), ("tree must be a git tree id",)),
    (bad_ask(prompt="  "), ("prompt must be a non-empty string",)),
    (bad_ask(project="../x"), ("project must be a name",)),
]


def test_bad_asks_are_400(agent):
    for body, words in BAD_ASKS:
        status, headers, data = agent.request("POST", "/v1/ask", body)
        assert_json_error(status, headers, data, 400, code="bad_request", words=words)
    assert job_ids(agent) == []
    assert not (agent.state_dir / "users" / "alice" / "projects").exists()  # refused before any snapshot


def test_chunked_request_body_is_411(agent):
    # Sent in one write: the agent answers 411 without reading the body and may close before a
    # client that sends chunk by chunk has finished (a BrokenPipe in that client, not a bug here).
    raw = raw_exchange(agent, b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + agent.token.encode() + b"\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                       b"c\r\n{\"project\": \r\n9\r\n\"laptop\"}\r\n0\r\n\r\n")
    status, headers, body = split_response(raw)
    answer = assert_json_error(status, {"Content-Type": headers["content-type"]}, body, 411, code="length_required")
    assert "Content-Length" in answer["error"]


def test_a_post_without_content_length_is_411(agent):
    raw = raw_exchange(agent, b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + agent.token.encode() + b"\r\nConnection: close\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 411 and json.loads(body)["code"] == "length_required"


def test_an_oversized_body_is_413_without_reading_it(agent):
    """The header announces 64 MiB + 1 but only 2 bytes come: the answer comes at once,
    and the server hangs up rather than wait for the rest."""
    raw = raw_exchange(agent, b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + agent.token.encode() + b"\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n{}" % (64 * 1024 * 1024 + 1))
    status, headers, body = split_response(raw)
    assert status == 413, raw
    assert json.loads(body) == {"error": "request body over 64 MiB", "code": "too_large"}
    assert agent.request("GET", "/v1/health")[0] == 200


def test_unknown_paths_are_404_json(agent):
    for path in ("/", "/v1", "/v1/nope", "/v1/jobs/abc/other", "/v2/health", "/v1/health/"):
        status, headers, body = agent.request("GET", path)
        assert_json_error(status, headers, body, 404, code="not_found", words=("no such endpoint",))
    # no token needed to learn that a path does not exist, and no crash either
    assert agent.request("GET", "/v1/nope", token=None)[0] == 404


def test_wrong_methods(agent):
    # a method the route table knows, on a path that exists: 405 in JSON
    for method, path in (("POST", "/v1/jobs/abc"), ("GET", "/v1/ask"), ("DELETE", "/v1/jobs"),
                         ("POST", "/v1/health"), ("DELETE", "/v1/jobs/abc/diff")):
        status, headers, body = agent.request(method, path, b"{}" if method == "POST" else None)
        assert_json_error(status, headers, body, 405, code="method_not_allowed", words=(method, path))
    # a method http.server has no do_* for: its own 501, and the server lives on
    for method in ("PUT", "PATCH", "BREW"):
        status, headers, body = agent.request(method, "/v1/ask", b"{}")
        assert status == 501, (method, status, body)
        assert f"Unsupported method ('{method}')".encode() in body
    assert agent.request("GET", "/v1/health")[0] == 200


def test_garbage_on_the_wire_does_not_hurt(agent):
    for data in (b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"GET /v1/health HTTP/9.9\r\n\r\n",
                 b"GET /v1/health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"):
        raw = raw_exchange(agent, data)
        # http.server's own error page (without a status line when it took the request
        # for HTTP/0.9), never a hang-up without an answer
        assert re.search(rb"Error code: (400|431|505)\b", raw), raw[:300]
    assert agent.request("GET", "/v1/health")[0] == 200
    assert "Traceback" not in agent.read_log()


def test_expected_failures_leave_no_traceback_and_no_dead_thread(synced, agent):
    token = agent.token.encode()
    auth = b"Authorization: Bearer " + token + b"\r\n"
    raw_exchange(agent, b"POST /v1/ask HTTP/1.1\r\nHost: x\r\n" + auth
                 + b"Content-Length: 999999999999\r\n\r\n{}")
    raw_exchange(agent, b"POST /v1/ask HTTP/1.1\r\nHost: x\r\n" + auth
                 + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")
    raw_exchange(agent, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\r\n"
                 b"Connection: close\r\n\r\n")
    for body in (b"{", b"[]", bad_ask(files=[["100644", BLOB, "../etc/passwd"]]), bad_ask(timeout_s=10 ** 9)):
        assert agent.request("POST", "/v1/ask", body)[0] == 400
    agent.request("PUT", "/v1/ask", b"{}")
    agent.request("POST", "/v1/jobs/x", b"{}")
    agent.request("GET", "/v1/jobs/../../etc/passwd")
    agent.request("GET", "/v1/me?project=%2e%2e")
    agent.request("GET", "/v1/jobs/abc/events?after=x")
    (synced.root / "README.md").write_text("changed\n")
    assert agent.request("POST", "/v1/ask", ask_body(synced, "x"))[0] == 409
    # every connection thread survived, and the workers still run jobs
    assert agent.request("GET", "/v1/health")[0] == 200
    synced.run("sync", check=0)
    job = post_ask(agent, ask_body(synced, script({"say": "still alive"})))["id"]
    assert agent.wait_job(job)["status"] == "done"
    assert agent.proc.poll() is None
    log = agent.read_log()
    assert "Traceback" not in log and "internal error" not in log, log


def test_an_unread_body_does_not_become_the_next_request(agent):
    conn = http.client.HTTPConnection(*address(agent), timeout=15)
    conn.request("POST", "/v1/ask", body=b'{"project": "demo"}', headers={"Authorization": "Bearer wrong"})
    first = conn.getresponse()
    assert first.status == 401
    first.read()
    # same connection unless the server said Connection: close: health must answer
    if first.will_close:
        conn.close()
        conn = http.client.HTTPConnection(*address(agent), timeout=15)
    conn.request("GET", "/v1/health")
    second = conn.getresponse()
    assert second.status == 200, second.read()
    assert json.loads(second.read())["version"] == patchwire.__version__
    conn.close()


PIPELINED_HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("request_head, body, status", [
    (b"POST /v1/ask HTTP/1.1\r\nAuthorization: Bearer wrong\r\nContent-Length: 2\r\n", b"{}", 401),
    (b"POST /v1/nope HTTP/1.1\r\nContent-Length: 2\r\n", b"{}", 404),
    (b"POST /v1/jobs/abc HTTP/1.1\r\nContent-Length: 2\r\n", b"{}", 405),
    (b"POST /v1/ask HTTP/1.1\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n",
     b"2\r\n{}\r\n0\r\n\r\n", 411),
], ids=["401", "404", "405", "411-chunked"])
def test_a_pipelined_request_after_an_error_is_answered_or_the_connection_closed(
        agent, request_head, body, status):
    head = request_head.replace(b"{token}", agent.token.encode()) + b"Host: x\r\n\r\n"
    raw = raw_exchange(agent, head + body + PIPELINED_HEALTH)
    first_status, first_headers, rest = split_response(raw)
    assert first_status == status, raw
    assert b"Bad request syntax" not in raw, raw
    length = int(first_headers["content-length"])
    after = rest[length:]
    if first_headers.get("connection", "").lower() == "close":
        assert after == b"", raw
    else:  # kept open: the next thing on the wire is the health answer
        assert after.startswith(b"HTTP/1.1 200 "), raw
        assert json.loads(split_response(after)[2])["ok"] is True


# ------------------------------------------------------------------ the token stays secret


def test_the_token_is_never_echoed_nor_logged(make_agent, tmp_path):
    """With -v the agent logs every request; the token appears in no answer and no log line."""
    verbose = [sys.executable, "-c", "import sys, patchwire_agent; "
               "sys.exit(patchwire_agent.main(sys.argv[1:] + ['-v']))"]
    agent = make_agent(program=verbose, env={"PYTHONPATH": str(ROOT)})
    lap = sync_laptop(tmp_path, agent, name="verbose-laptop")
    token = agent.token
    wrong = "pw_wrong_" + token[9:]
    bodies: List[bytes] = []

    def call(method, path, body=None, **kw):
        status, headers, data = agent.request(method, path, body, **kw)
        bodies.append(data + str(dict(headers)).encode())
        return status, data

    body = ask_body(lap, script({"say": "token?"}, {"write": "t.txt", "text": "t\n"}), project="verbose-laptop")
    status, data = call("POST", "/v1/ask", body)
    assert status == 202, data
    job = json.loads(data)["id"]
    agent.wait_job(job)
    for method, path in (("GET", "/v1/health"), ("GET", "/v1/me?project=verbose-laptop"), ("GET", "/v1/jobs"),
                         ("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/events"),
                         ("GET", f"/v1/jobs/{job}/diff"), ("DELETE", f"/v1/jobs/{job}"),
                         ("GET", "/v1/nope"), ("POST", "/v1/ask")):
        call(method, path, b"{" if method == "POST" else None)
        call(method, path, b"{" if method == "POST" else None, token=wrong)
    call("GET", "/v1/jobs", token=None, headers={"Authorization": "Basic " + token})
    lap.run("jobs", check=0)
    lap.run("show", job, check=0)
    agent.stop()
    log = agent.read_log()
    assert "GET /v1/jobs" in log and "POST /v1/ask" in log, log  # -v did log the requests
    for secret in (token, wrong, token[3:20]):
        assert secret not in log
        assert not any(secret.encode() in b for b in bodies)
    assert token not in (agent.state_dir / "jobs.sqlite3").read_bytes().decode("latin-1")
