"""Slow clients (issue 9): 100 connections trickling a byte every 2 s from five loopback
addresses (127.0.0.2 to 127.0.0.6), reopened whenever the agent drops them, while another
user asks through the real CLI and a monitor polls /v1/health. Each request head has a total
budget (4 s here), so a trickler holds its slot for that long at most; at the overall cap a
new client takes the place of a waiting connection of the address holding the most."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List

import patchwire_agent as pa
from conftest import Laptop, ask_body, make_repo, script
from conftest import wait_until
from netface import HealthWatch, address, start_with

SOURCES = [f"127.0.0.{n}" for n in range(2, 7)]
PER_SOURCE = 20  # 100 in all, past the per-address cap (16) and the overall one (64)
HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000


class Tricklers(threading.Thread):
    """PER_SOURCE connections from each address, each sending the next byte of an endless
    request head every `every` seconds; one the agent closes or answers is opened again
    (at most `max_opens` times in all)."""

    def __init__(self, agent, every: float = 2.0, max_opens: int = 3000):
        super().__init__(daemon=True)
        self.agent, self.every, self.max_opens = agent, every, max_opens
        self.stop = threading.Event()
        self.opens = 0
        self.dropped = 0  # connections the agent answered (408, 503) or closed
        self.timed_out = 0  # ... of which answered 408: cut at their budget
        self.socks: Dict[socket.socket, int] = {}  # socket -> bytes sent

    def open_missing(self) -> None:
        """(Re)open every missing connection; one that cannot be made now is tried next round."""
        missing, self.missing = self.missing, []
        for source in missing:
            if self.opens >= self.max_opens:
                return
            self.opens += 1
            try:
                sock = socket.create_connection(address(self.agent), timeout=1, source_address=(source, 0))
            except OSError:
                self.missing.append(source)
                continue
            sock.setblocking(False)
            self.socks[sock] = 0
            self.source_of[sock] = source

    def run(self) -> None:
        self.source_of: Dict[socket.socket, str] = {}
        self.missing: List[str] = [source for source in SOURCES for _ in range(PER_SOURCE)]
        while not self.stop.is_set():
            self.open_missing()
            ended = select.select(list(self.socks), [], [], 0)[0] if self.socks else []
            for sock in ended:
                self.dropped += 1
                try:
                    self.timed_out += sock.recv(64).startswith(b"HTTP/1.1 408 ")
                except OSError:
                    pass
                self.close(sock)
            for sock, sent in list(self.socks.items()):
                try:
                    sock.send(HEAD[sent:sent + 1])
                    self.socks[sock] = sent + 1
                except OSError:
                    self.dropped += 1
                    self.close(sock)
            self.stop.wait(self.every)
        for sock in list(self.socks):
            sock.close()

    def close(self, sock: socket.socket) -> None:
        self.missing.append(self.source_of.pop(sock))
        del self.socks[sock]
        sock.close()


def test_a_hundred_trickling_connections_do_not_stop_another_users_ask(make_agent, tmp_path):
    agent = start_with(make_agent, {"header_timeout_s": 4, "max_connections": 64, "max_connections_per_client": 16},
                       users=("alice", "bob"))
    lap = Laptop(make_repo(tmp_path / "bob-laptop", {"a.txt": b"a\n"}))
    lap.init(agent, user="bob")
    watch = HealthWatch(agent)
    watch.start()
    attack = Tricklers(agent)
    attack.start()
    try:
        # the attack is real: the agent's connection table fills up to its cap, and the
        # tricklers are cut at their budget and come back (a full round of it)
        wait_until(lambda: max(watch.open_seen, default=0) >= 60, what="the connection cap nearly reached")
        wait_until(lambda: attack.timed_out >= 40, timeout=30, what="tricklers cut at their budget")
        result = lap.ask(script({"write": "a.txt", "text": "b\n"}, {"say": "done despite the crowd"}), "--yes",
                         timeout=120)
        assert result.returncode == 0, result.err
        assert (lap.root / "a.txt").read_text() == "b\n"
        assert "done despite the crowd" in result.err
        assert attack.is_alive() and attack.opens < attack.max_opens  # still at it all along
    finally:
        attack.stop.set()
        attack.join(timeout=30)
    print(watch.finish(), f"| open connections seen up to {max(watch.open_seen)}; "
          f"{attack.opens} trickling connections opened, {attack.dropped} dropped by the agent, "
          f"{attack.timed_out} of them with a 408")
    assert max(watch.open_seen) == 64
    assert "Traceback" not in agent.read_log()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_team_mates_dense_bodies_are_refused_before_they_are_parsed(make_agent):
    """A team mate with a valid token posts bodies of 12 MB of empty lists, three at once:
    parsed, 64 MB of them took 3.2 GB of the agent's memory each and held the interpreter
    for seconds while other users waited. Each is now refused (413) by its count of JSON
    values before any parsing, bodies over 4 MB are handled two at a time, and the agent
    grows by little more than the bodies' bytes while another user's requests are answered.
    A first ask's manifest of 100,000 files stays well within the count."""
    agent = make_agent(users=("alice", "bob"))
    pid = agent.proc.pid
    idle = rss_kb(pid)
    body = b'{"project": "p", "x": [' + b"[]," * (4 * 2 ** 20) + b"[]]}"
    answers: List[tuple] = []
    peak = [idle]
    sending = [threading.Thread(target=lambda: answers.append(agent.request("POST", "/v1/ask", body,
                                                                            token=agent.tokens["bob"], timeout=60)))
               for _ in range(3)]
    for thread in sending:
        thread.start()
    while any(thread.is_alive() for thread in sending):
        peak[0] = max(peak[0], rss_kb(pid))
        assert agent.json("GET", "/v1/me", token=agent.tokens["alice"], timeout=30)[0] == 200
        time.sleep(0.02)
    assert [status for status, _, _ in answers] == [413] * 3, answers
    assert all(b"JSON values in" in text and b'"too_large"' in text for _, _, text in answers), answers
    assert peak[0] - idle < (3 * len(body) + 64 * 2 ** 20) // 1024, (idle, peak[0])
    manifest = json.dumps({"project": "p", "tree": "0" * 40, "prompt": "x", "files": [
        ["100644", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391", f"lib/f{i}.dart"] for i in range(100_000)]}).encode()
    assert pa.json_values(manifest, 0) < len(manifest) // pa.BODY_BYTES_PER_VALUE
    # what a string holds is one value: a prompt of 100,000 pasted numbers, in a body of 5 MB
    numbers = json.dumps({"project": "p", "tree": pa.pw.EMPTY_TREE, "files": [],
                          "prompt": script({"say": "sum"}) + ",".join(map(str, range(100_000)))}).encode()
    assert pa.json_values(numbers, 0) == 5  # the object, its empty list, three commas
    padded = numbers + b" " * pa.LARGE_BODY_BYTES
    assert agent.request("POST", "/v1/ask", padded, token=agent.tokens["alice"])[0] == 202


def test_dense_bodies_under_the_large_size_are_counted_too(make_agent):
    """Just under 4 MB of empty lists took 170 MB each, parsed, and were not counted (only
    bodies over 4 MB were), sixteen at once from one address: every body is counted now, and
    the parse's depth check holds a stack of the depth, not one entry per value."""
    agent = make_agent(users=("alice", "bob"))
    for size in (4 * 2 ** 20 - 64, 100_000):
        body = b'{"project": "p", "x": [' + b"[]," * (size // 3) + b"[]]}"
        status, _, text = agent.request("POST", "/v1/ask", body, token=agent.tokens["bob"], timeout=60)
        assert status == 413 and b"JSON values in" in text, (size, status, text[:300])
    wide = json.loads("[" + "[]," * 200_000 + "[]]")
    tracemalloc.start()
    try:
        assert not pa.pw.json_too_deep(wide, pa.MAX_JSON_DEPTH)
        assert tracemalloc.get_traced_memory()[1] < 64 * 1024
    finally:
        tracemalloc.stop()


def test_large_asks_give_back_their_place_once_their_job_is_made(make_agent, tmp_path):
    """A first ask of a big project sends a body over 4 MB, and streams its job for as long as
    the AI runs: the place it took among the two is given back once the job is made, not when
    the stream ends (before, a third such ask waited body_timeout_s, then 503)."""
    agent = make_agent(server={"body_timeout_s": 3})
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# demo\n"}))
    lap.init(agent)
    assert lap.run("ask", "--no-apply", script({"say": "hi"})).returncode == 0
    base = ask_body(lap, "x")

    def large(prompt: str) -> bytes:  # valid JSON, past LARGE_BODY_BYTES
        return json.dumps({**base, "prompt": prompt}).encode() + b" " * (pa.LARGE_BODY_BYTES + 100)

    streamed: List[int] = []
    slow = [threading.Thread(target=lambda: streamed.append(agent.request(
        "POST", "/v1/ask", large(script({"sleep": 8})), headers={"Accept": "application/x-ndjson"}, timeout=60)[0]))
        for _ in range(2)]
    for thread in slow:
        thread.start()
    wait_until(lambda: len([j for j in agent.json("GET", "/v1/jobs")[1]["jobs"] if j["status"] != "done"]) == 2,
               timeout=30, what="two streamed asks with their jobs made")
    status, _, answer = agent.request("POST", "/v1/ask", large(script({"say": "third"})), timeout=30)
    assert status == 202, answer
    for thread in slow:
        thread.join(60)
    assert streamed == [200, 200]

