"""A box that lies: a real HTTP server on loopback that speaks just enough of
patchwire-agent's API (/v1/me, /v1/ask, /v1/jobs/ID[/diff|/events]) to hand the laptop
chosen patches, job records and AI events. The laptop under test is the real CLI, syncing
with real rsync into `mirror`; only the box's answers are chosen by the test."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

# A lie is a callable answer(handler, box) that writes whatever it likes; box.lie(route, answer)
# makes it the box's answer to that route ("GET /v1/jobs", without the query). The helpers
# below make the usual ones: a chosen body, a trickle, an endless or oversized body, a hang.
Lie = Callable[..., None]


def answer(data: bytes, status: int = 200, kind: str = "application/json", length: Optional[str] = "auto") -> Lie:
    """`data` as the body; `length` the Content-Length header as given ("auto": the real one,
    None: none, the body ends when the connection closes)."""
    def lie(handler, box) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        if length is not None:
            handler.send_header("Content-Length", str(len(data)) if length == "auto" else length)
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except OSError:
            pass
    return lie


def trickle(data: bytes, every: float, kind: str = "application/json") -> Lie:
    """A 200 with the right Content-Length, the body one byte every `every` seconds."""
    def lie(handler, box) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for i in range(len(data)):
            try:
                handler.wfile.write(data[i:i + 1])
                handler.wfile.flush()
            except OSError:
                return
            if box.closing.wait(every):
                return
    return lie


def endless(piece: bytes, total: Optional[int] = None, kind: str = "application/octet-stream",
            first: bytes = b"", length: Optional[str] = None) -> Lie:
    """`first`, then `piece` again and again: `total` bytes in all, or until the laptop hangs
    up. Nothing of it is built in memory. No Content-Length unless `length` is given."""
    def lie(handler, box) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        if length is not None:
            handler.send_header("Content-Length", length)
        handler.end_headers()
        sent = 0
        try:
            handler.wfile.write(first)
            sent += len(first)
            while (total is None or sent < total) and not box.closing.is_set():
                handler.wfile.write(piece if total is None else piece[:total - sent])
                sent += len(piece)
        except OSError:
            return
    return lie


def hang(first: bytes = b"", kind: str = "application/x-ndjson") -> Lie:
    """A 200, `first`, then nothing, the connection held open until the box closes."""
    def lie(handler, box) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.end_headers()
        try:
            handler.wfile.write(first)
            handler.wfile.flush()
        except OSError:
            return
        box.closing.wait(300)
    return lie


class FakeBox:
    def __init__(self, state: Path, project: str = "laptop"):
        """`state`: the box's state folder; a project's mirror is where the agent keeps it,
        STATE/users/alice/mirror/PROJECT (the laptop refuses another place to rsync into)."""
        self.state = state
        self.mirror = state / "users" / "alice" / "mirror" / project
        self.mirror.mkdir(parents=True, exist_ok=True)
        self.jobs: Dict[str, dict] = {}
        self.asks: List[str] = []  # job ids the next POST /v1/ask calls hand out, in order
        self.mismatches: List[List[str]] = []  # before those: 409 tree_mismatch naming these paths
        self.ask_bodies: List[dict] = []
        self.requests: List[str] = []
        self.lies: Dict[str, Lie] = {}  # "METHOD /path": the answer given instead of the usual one
        self.closing = threading.Event()  # set by close(): lies that hang or trickle stop
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_job(self, job: str, patch: bytes, *, tree: str = EMPTY_TREE, status: str = "done",
                events: Sequence[dict] = (), ask: bool = False, result: Optional[dict] = None) -> str:
        """A job the box will describe and serve; with `ask`, the next ask creates it."""
        self.jobs[job] = {"patch": patch, "tree": tree, "status": status, "events": list(events),
                          "result": result}
        if ask:
            self.asks.append(job)
        return job

    def lie(self, route: str, answer: Lie) -> None:
        """Answer `route` ("GET /v1/jobs", "POST /v1/ask", ...) with `answer` from now on."""
        self.lies[route] = answer

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self, job: str) -> List[dict]:
        out = [{"type": "queued", "position": 0}, {"type": "started"}, *self.jobs[job]["events"],
               {"type": "finished", "status": "done", "stats": {"files": 1, "added": 1, "removed": 0}}]
        return [{"seq": n + 1, "job": job, **e} for n, e in enumerate(out)]

    def _handler(self):
        box = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def job_json(self, job: str) -> dict:
                info = box.jobs[job]
                return {"id": job, "status": info["status"], "tree": info["tree"], "project": "laptop",
                        "prompt": "do it", "created": time.time(), "reason": None,
                        **({"result": info["result"]} if info["result"] is not None else {})}

            def find(self, prefix: str) -> Optional[str]:
                found = [j for j in box.jobs if j.startswith(prefix)]
                return found[0] if len(found) == 1 else None

            def lied(self, method: str) -> bool:
                lie = box.lies.get(f"{method} {self.path.split('?', 1)[0]}")
                if lie:
                    lie(self, box)
                return lie is not None

            def do_GET(self) -> None:
                box.requests.append("GET " + self.path)
                path = self.path.split("?", 1)[0]
                if self.lied("GET"):
                    return
                if path == "/v1/jobs":
                    return self.send(200, json.dumps({"jobs": [self.job_json(j) for j in box.jobs]}).encode())
                if path == "/v1/me":
                    project = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("project", ["laptop"])[0]
                    mirror = str(box.state / "users" / "alice" / "mirror" / project)
                    return self.send(200, json.dumps({"user": "alice", "mirror": mirror}).encode())
                m = re.fullmatch(r"/v1/jobs/([^/]+)(/diff|/events)?", path)
                job = self.find(m.group(1)) if m else None
                if job is None:
                    return self.send(404, b'{"error": "no such job", "code": "not_found"}')
                if m.group(2) == "/diff":
                    return self.send(200, box.jobs[job]["patch"], "application/octet-stream")
                if m.group(2) == "/events":
                    lines = b"".join(json.dumps(e).encode() + b"\n" for e in box.events(job))
                    return self.send(200, lines, "application/x-ndjson")
                return self.send(200, json.dumps(self.job_json(job)).encode())

            def do_POST(self) -> None:
                box.requests.append("POST " + self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.lied("POST"):
                    return
                if self.path == "/v1/ask":
                    box.ask_bodies.append(json.loads(body))
                if self.path == "/v1/ask" and box.mismatches:
                    paths = box.mismatches.pop(0)
                    return self.send(409, json.dumps({"error": "differs", "code": "tree_mismatch",
                                                      "paths": paths}).encode())
                if self.path != "/v1/ask" or not box.asks:
                    return self.send(404, b'{"error": "nothing to ask", "code": "not_found"}')
                job = box.asks.pop(0)
                lines = b"".join(json.dumps(e).encode() + b"\n" for e in box.events(job))
                return self.send(200, lines, "application/x-ndjson")

            def do_DELETE(self) -> None:
                box.requests.append("DELETE " + self.path)
                if self.lied("DELETE"):
                    return
                m = re.fullmatch(r"/v1/jobs/([^/]+)", self.path)
                job = self.find(m.group(1)) if m else None
                if job is None:
                    return self.send(404, b'{"error": "no such job", "code": "not_found"}')
                box.jobs[job]["status"] = "cancelled"
                return self.send(200, json.dumps(self.job_json(job)).encode())

        return Handler
