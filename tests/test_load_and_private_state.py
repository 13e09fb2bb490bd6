"""Load and private state (issue 9): 20 concurrent clients x 10 asks against the real agent
with an instant AI (every job done, every stream ended with its last event, every diff
retrievable), event streams that end with the job's last event every time, and state that
only the agent's user can read whatever the umask.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import stat
import urllib.parse
from pathlib import Path

import patchwire
import patchwire_agent as pa
from conftest import make_repo, tomli_w, tomllib

CLIENTS = 20
ASKS = 10
USERS = 4
# the instant AI: it writes its prompt into the job folder, which the diff then carries
INSTANT_AI = ["sh", "-c", "cat > answer.txt"]


def add_users(box, names) -> None:
    data = tomllib.loads(box.config.read_text())
    for name in names:
        box.tokens[name] = f"pw_load_token_{name}"
        data["users"][name] = {"token_sha256": pa.token_digest(box.tokens[name]).hex()}
    box.config.write_text(tomli_w.dumps(data))


def project_for(box, root: Path, user: str, project: str) -> dict:
    """A laptop repo, its files placed in the box's mirror as rsync would, and the ask body."""
    make_repo(root, {"README.md": f"# {project}\n".encode(), "src/a.py": b"x = 1\n"})
    paths, _ = patchwire.Project(root, project).file_list(patchwire.DEFAULT_DENY, [])
    tree, manifest = patchwire.Project(root, project).record_paths(paths)
    mirror = box.state_dir / "users" / user / "mirror" / project
    for rel in paths:
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, mirror / rel)
    return {"project": project, "tree": tree, "files": manifest}


def stream(conn: http.client.HTTPConnection, token: str, path: str, body: dict) -> list:
    """A whole NDJSON stream; it must end cleanly (the terminating chunk: http.client raises
    IncompleteRead otherwise), and the connection stays open for the next request."""
    conn.request("POST", path, json.dumps(body), {"Authorization": "Bearer " + token,
                                                  "Accept": "application/x-ndjson"})
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 200, data
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def get(conn: http.client.HTTPConnection, token: str, path: str):
    conn.request("GET", path, headers={"Authorization": "Bearer " + token})
    resp = conn.getresponse()
    return resp.status, resp.read()


def connect(url, user: str) -> http.client.HTTPConnection:
    """A kept-alive connection from the user's own address (20 clients on one address would
    pass the per-address cap), accepted by the agent before the load starts: a burst of 20
    connects overflows the agent's listen backlog (5), and the kernel resets some of them."""
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60,
                                      source_address=(f"127.0.0.{2 + int(user[4:])}", 0))
    assert get(conn, "", "/v1/health")[0] == 200
    return conn


def client(box, conn: http.client.HTTPConnection, user: str, base: dict, n: int) -> list:
    """One laptop: ten asks, one after the other, over one connection."""
    problems = []
    try:
        for i in range(ASKS):
            events = stream(conn, box.tokens[user], "/v1/ask", {**base, "prompt": f"client {n} ask {i}\n"})
            job = events[0]["job"]
            if events[-1]["type"] != "finished" or [e["seq"] for e in events] != list(range(1, len(events) + 1)):
                problems.append(f"{job}: stream ended with {events[-1]['type']}, seqs {[e['seq'] for e in events]}")
            status, diff = get(conn, box.tokens[user], f"/v1/jobs/{job}/diff")
            if status != 200 or f"+client {n} ask {i}".encode() not in diff:
                problems.append(f"{job}: diff {status} {diff[:200]!r}")
    finally:
        conn.close()
    return problems


def test_20_clients_x_10_asks(make_agent, tmp_path):
    box = make_agent(INSTANT_AI, start=False, jobs={"workers": 4, "slots": 2})
    users = [f"user{u}" for u in range(USERS)]
    add_users(box, users)
    box.start()
    url = urllib.parse.urlsplit(box.url)
    work = []
    for n in range(CLIENTS):
        user, project = users[n % USERS], f"proj{n // USERS}"
        work.append((user, project_for(box, tmp_path / "laptops" / f"{user}-{project}", user, project), n))
    conns = [connect(url, user) for user, _, _ in work]
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda w: client(box, *w), [(c, *w) for c, w in zip(conns, work)]))
    assert [p for ps in results for p in ps] == []
    jobs = [j for user in users for j in box.json("GET", "/v1/jobs", token=box.tokens[user])[1]["jobs"]]
    assert len(jobs) == CLIENTS * ASKS and {j["status"] for j in jobs} == {"done"}
    assert "Traceback" not in box.read_log()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_is_private_whatever_the_umask(make_agent, tmp_path):
    box = make_agent(INSTANT_AI, start=False)
    box.state_dir.mkdir(parents=True, exist_ok=True)  # init makes it
    os.chmod(box.state_dir, 0o755)  # an existing, too open state folder is tightened
    old = os.umask(0)  # the agent inherits it
    try:
        box.start()
    finally:
        os.umask(old)
    lap_root = tmp_path / "lap"
    body = project_for(box, lap_root, "alice", "lap")
    status, job = box.json("POST", "/v1/ask", {**body, "prompt": "secret prompt\n"})
    assert box.wait_job(job["id"])["status"] == "done"
    assert mode(box.state_dir) == 0o700
    assert mode(box.state_dir / "patches") == 0o700
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", f"patches/{job['id']}.patch"):
        assert mode(box.state_dir / name) == 0o600, name
