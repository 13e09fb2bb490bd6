#!/usr/bin/env python3
"""What the gateway costs: the AI's API call and a 10 MB download through the job's way out, against
a direct connection in the same run, and the gateway's memory with 50 connections open.

    python3 bench/gateway.py              # 30 rounds each (about 20 s here)
    python3 bench/gateway.py --quick      # 5 rounds, 10 connections: smoke run (tests/test_bench.py)

The path measured is the real one: a client on loopback -> the forwarder (GATEWAY_FORWARDER, run by
this Python with -I -S, as the sandbox runs it) -> the job's Unix socket -> the gateway
(JobGateway, in its own process so that its memory is its own) -> the upstream, a plain HTTP
server on 127.0.0.3. The sandbox's namespace is left out: it adds no hop. Direct is the same
client to the same upstream. Rounds alternate direct and gateway; medians are printed with ratios.

- "AI line": POST /v1/messages in origin form (how the AI's CLI calls its API through the
  gateway: credential swapped, forwarded to api_upstream), answered with one short SSE event; the
  time from sending the request to the first byte of that event.
- "10 MB": GET of a 10 MB body as a proxied absolute-form request (what curl, pub or npm do over
  http; HTTPS goes through CONNECT, a byte relay of the same kind), to its last byte.
- "memory": the gateway process's VmRSS idle, then with N CONNECT tunnels open and idle.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import patchwire_agent as pa  # noqa: E402

BIG = 10 * 1024 * 1024
SSE = b"event: message_start\ndata: {\"type\": \"message_start\"}\n\n"
GATEWAY_SERVER = """
import sys, threading
sys.path.insert(0, sys.argv[1])
import patchwire_agent as pa
upstream = __import__("urllib.parse").parse.urlsplit(sys.argv[3])
# the upstream is on loopback: reached only through an allow entry naming its address
policy = pa.NetworkPolicy("allowlist", [upstream.netloc], "bench", "bench")
gw = pa.JobGateway(__import__("pathlib").Path(sys.argv[2]), policy, sys.argv[3],
                   pa.Credential("api_key", "sk-ant-bench"), pa.EgressReport(lambda e: None))
print(gw.path, flush=True)
sys.stdin.read()
"""


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    big = b"x" * BIG

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(SSE)))
        self.end_headers()
        self.wfile.write(SSE)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(BIG))
        self.end_headers()
        self.wfile.write(self.big)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(address: Tuple[str, int], request: bytes, until: int) -> float:
    """Seconds from sending `request` to having `until` bytes of the answer's body."""
    with socket.create_connection(address, timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        got = len(data.partition(b"\r\n\r\n")[2])
        while got < until:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        return time.perf_counter() - started


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, connections = (5, 10) if args.quick else (30, 50)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.3", 0), Upstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up = upstream.server_address[:2]
    with tempfile.TemporaryDirectory(prefix="pwgw-", dir="/tmp") as folder:
        gateway = subprocess.Popen([sys.executable, "-c", GATEWAY_SERVER, str(ROOT), folder,
                                    f"http://{up[0]}:{up[1]}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        sock_path = gateway.stdout.readline().decode().strip()
        port = free_port()
        forwarder = subprocess.Popen([sys.executable, "-I", "-S", "-c", pa.GATEWAY_FORWARDER, sock_path, str(port),
                                      sys.executable, "-c", "import time; time.sleep(3600)"],
                                     start_new_session=True)
        try:
            wait_for_port(port)
            report(rounds, connections, up, ("127.0.0.1", port), gateway.pid)
        finally:
            os.killpg(forwarder.pid, signal.SIGKILL)  # the forwarder and the child it runs
            gateway.kill()
            upstream.shutdown()
    return 0


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit("the forwarder did not listen")


def report(rounds: int, connections: int, up: Tuple[str, int], via: Tuple[str, int], gateway_pid: int) -> None:
    body = b'{"model": "bench", "stream": true}'
    api_direct = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
    big_direct = b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    big_proxied = (f"GET http://{up[0]}:{up[1]}/big HTTP/1.1\r\nHost: {up[0]}\r\n"
                   "Connection: close\r\n\r\n").encode()
    times = {"ai_direct": [], "ai_gateway": [], "big_direct": [], "big_gateway": []}
    for n in range(rounds):
        pairs = [("ai_direct", up, api_direct, len(SSE)), ("ai_gateway", via, api_direct, len(SSE)),
                 ("big_direct", up, big_direct, BIG), ("big_gateway", via, big_proxied, BIG)]
        for name, address, request, until in (pairs if n % 2 else pairs[1::-1] + pairs[3:1:-1]):
            times[name].append(exchange(address, request, until))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    idle = rss_kb(gateway_pid)
    held: List[socket.socket] = []
    for _ in range(connections):
        s = socket.create_connection(via, timeout=30)
        s.sendall(f"CONNECT {up[0]}:{up[1]} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        held.append(s)
    time.sleep(0.5)
    busy = rss_kb(gateway_pid)
    for s in held:
        s.close()
    print(f"gateway cost, medians of {rounds} rounds (ms):")
    print("| | direct | through the gateway | ratio | added |")
    print("|---|---|---|---|---|")
    for label, key in (("AI line (API call to first event)", "ai"), ("10 MB download", "big")):
        d, g = med[f"{key}_direct"], med[f"{key}_gateway"]
        print(f"| {label} | {d:.2f} | {g:.2f} | {g / d:.2f}x | {g - d:+.2f} ms |")
    print(f"gateway memory: {idle / 1024:.1f} MB idle, {busy / 1024:.1f} MB with {connections} tunnels open "
          f"({(busy - idle) / connections:.0f} kB each)")


if __name__ == "__main__":
    sys.exit(main())
