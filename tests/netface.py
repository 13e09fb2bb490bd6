"""Shared helpers for the tests of the agent's network face (issue 9): an agent started with
[server] keys of the test's choosing, raw HTTP exchanges from a chosen loopback source address
(127.0.0.2, 127.0.0.3, ... are all this machine), and the agent's audit log."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.parse
from pathlib import Path
from typing import List, Optional, Tuple

from conftest import AgentProcess, tomli_w, tomllib


def configure_server(agent: AgentProcess, **server) -> AgentProcess:
    """Set [server] keys in a not yet started agent's config."""
    data = tomllib.loads(agent.config.read_text())
    data["server"].update(server)
    agent.config.write_text(tomli_w.dumps(data))
    return agent


def start_with(make_agent, server: dict, **kw) -> AgentProcess:
    return configure_server(make_agent(start=False, **kw), **server).start()


def address(agent: AgentProcess) -> Tuple[str, int]:
    netloc = urllib.parse.urlsplit(agent.url).netloc
    host, port = netloc.rsplit(":", 1)
    return host.strip("[]"), int(port)


def connect(agent: AgentProcess, source: str = "127.0.0.1", timeout: float = 15) -> socket.socket:
    """A TCP connection to the agent from the loopback address `source`."""
    return socket.create_connection(address(agent), timeout=timeout, source_address=(source, 0))


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def exchange(agent: AgentProcess, data: bytes, source: str = "127.0.0.1", timeout: float = 15) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until the server closes."""
    with connect(agent, source, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (413, 400) and close before reading everything
        return read_all(sock)


def request(agent: AgentProcess, method: str, path: str, token: Optional[str] = None, body: bytes = b"",
            source: str = "127.0.0.1", headers: Tuple[str, ...] = ()) -> Tuple[int, dict, bytes]:
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", *headers]
    if token:
        head.append("Authorization: Bearer " + token)
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return split_response(exchange(agent, ("\r\n".join(head) + "\r\n\r\n").encode() + body, source))


def split_response(raw: bytes) -> Tuple[int, dict, bytes]:
    """(status, {lower-case header: value}, body) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:300]
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def audit_lines(agent: AgentProcess, name: str = "audit.log") -> List[dict]:
    path: Path = agent.state_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []




class HealthWatch(threading.Thread):
    """GET /v1/health every 0.1 s from its own address while the test runs."""

    def __init__(self, agent):
        super().__init__(daemon=True)
        self.agent, self.stop = agent, threading.Event()
        self.answers: List[Tuple[int, float]] = []
        self.open_seen: List[int] = []  # connections open, as health reported them

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, _, body = request(self.agent, "GET", "/v1/health", source="127.0.0.254")
            except (OSError, AssertionError):  # no answer, or no HTTP answer
                status, body = 0, b""
            self.answers.append((status, time.monotonic() - started))
            if status == 200:
                self.open_seen.append(json.loads(body)["connections"]["open"])
            self.stop.wait(0.1)

    def finish(self) -> str:
        self.stop.set()
        self.join(timeout=30)
        assert self.answers, "health was never asked"
        assert all(status == 200 for status, _ in self.answers), self.answers
        ms = sorted(seconds * 1000 for _, seconds in self.answers)
        return (f"health: {len(ms)} answers, median {statistics.median(ms):.1f} ms, "
                f"p95 {ms[int(len(ms) * 0.95)]:.1f} ms, max {ms[-1]:.1f} ms, "
                f"{sum(m >= 100 for m in ms)} at or over 100 ms")
