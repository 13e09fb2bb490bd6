"""The agent's network face under slow, crowding and guessing clients (issue 9): total time
budgets for a request's head and body, caps per address and overall with /v1/health still
answered, failed auth slowed per address, where the agent may listen (private addresses,
IPv6), TLS with the handshake in the connection's thread, and the audit log. All against the
real agent process with real sockets, curl and urllib."""

from __future__ import annotations

import json
import re
import os
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import patchwire_agent
from conftest import Laptop, make_repo, script, write_config
from conftest import wait_until
from netface import (address, audit_lines, configure_server, connect, exchange, read_all, request,
                     split_response, start_with)

HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def trickle(sock: socket.socket, data: bytes, every: float) -> int:
    """Send `data` one byte every `every` seconds until the server hangs up; how many bytes
    went out before it did (len(data) when it never did)."""
    for n, byte in enumerate(data):
        ready, _, _ = select.select([sock], [], [], every)
        if ready:  # the server answered or hung up: the request is over for it
            return n
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return n
    return len(data)


# ------------------------------------------------------------------ total time budgets


def test_a_trickled_request_head_is_cut_at_its_total_budget_not_per_byte(make_agent):
    """One byte every 0.3 s never trips a per-read timeout of 1.5 s; the total budget of
    1.5 s for request line and headers ends it after a handful of bytes, with a 408."""
    agent = start_with(make_agent, {"header_timeout_s": 1.5})
    head = b"GET /v1/health HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 40
    with connect(agent) as sock:
        sent = trickle(sock, head, every=0.3)
        answer = read_all(sock)
    assert sent < len(head), "the server waited for every trickled byte"
    status, headers, body = split_response(answer)
    assert status == 408 and json.loads(body)["code"] == "timeout", answer
    assert headers["connection"] == "close"
    # the attempt is on record, and the agent is fine
    assert any(r["event"] == "request" and r["status"] == 408 for r in audit_lines(agent))
    assert agent.request("GET", "/v1/health")[0] == 200
    assert "Traceback" not in agent.read_log()


def test_a_request_head_that_stops_halfway_is_answered_at_its_budget(make_agent):
    """No byte after the first line: the read waits only for what is left of the budget (1 s),
    not for a per-read or per-connection timeout."""
    agent = start_with(make_agent, {"header_timeout_s": 1})
    with connect(agent, timeout=20) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = split_response(read_all(sock))
    assert status == 408 and json.loads(body)["code"] == "timeout"


def test_a_trickled_body_is_cut_at_its_total_budget(make_agent):
    agent = start_with(make_agent, {"body_timeout_s": 1.5})
    head = (b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + agent.token.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    with connect(agent) as sock:
        sock.sendall(head)
        sent = trickle(sock, b'{"project": "' + b"p" * 60, every=0.3)
        answer = read_all(sock)
    assert sent < 60
    status, headers, body = split_response(answer)
    assert status == 408, answer
    assert json.loads(body) == {"error": "the body did not arrive within 1.5 s", "hint": "send the body without pauses",
                                "code": "timeout"}
    assert "Traceback" not in agent.read_log()


def test_an_idle_keep_alive_connection_is_closed_after_the_head_budget(make_agent):
    agent = start_with(make_agent, {"header_timeout_s": 1})
    with connect(agent) as sock:  # a user's request: the connection is kept for the next one
        sock.sendall(f"GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n\r\n".encode())
        answer = read_all(sock)  # nothing more is sent: the server must hang up by itself
    status, headers, body = split_response(answer)
    assert status == 200 and "connection" not in headers
    # an idle connection that sent nothing of a next request is closed without an answer
    assert len(body) == int(headers["content-length"]), answer


# ------------------------------------------------------------------ caps


def idle_connections(agent, source: str, n: int) -> list:
    socks = [connect(agent, source) for _ in range(n)]
    # (the health probe is a connection too)
    wait_until(lambda: health(agent)["connections"]["open"] >= n + 1, what=f"{n} connections open")
    return socks


def health(agent, source: str = "127.0.0.1") -> dict:
    status, _, body = request(agent, "GET", "/v1/health", source=source)
    assert status == 200, body
    return json.loads(body)


def test_health_answers_an_address_at_its_cap_and_other_routes_say_busy(make_agent):
    agent = start_with(make_agent, {"max_connections_per_client": 4, "header_timeout_s": 30})
    socks = idle_connections(agent, "127.0.0.2", 4)
    try:
        answer = health(agent, source="127.0.0.2")  # a fifth connection from the same address
        assert answer["ok"] is True
        assert answer["connections"]["open"] == 4 and answer["connections"]["max_per_client"] == 4
        status, headers, body = request(agent, "GET", "/v1/jobs", agent.token, source="127.0.0.2")
        assert status == 503 and json.loads(body)["code"] == "busy", body
        assert "health" in json.loads(body)["hint"]
        # another address is not held back by that one
        assert request(agent, "GET", "/v1/jobs", agent.token, source="127.0.0.3")[0] == 200
    finally:
        for s in socks:
            s.close()


def test_at_the_overall_cap_a_new_client_takes_the_place_of_a_waiting_one(make_agent):
    agent = start_with(make_agent, {"max_connections": 6, "max_connections_per_client": 4,
                                    "header_timeout_s": 30, "backlog": 16})
    crowd = [connect(agent, "127.0.0.2") for _ in range(4)] + [connect(agent, "127.0.0.3") for _ in range(2)]
    try:
        # every slot is held by a client that sends nothing; a user still gets in
        status, _, body = request(agent, "GET", "/v1/jobs", agent.token, source="127.0.0.4")
        assert status == 200, body
        # the one that made room is a waiting connection of the address holding the most
        closed = wait_until(lambda: [s for s in crowd if select.select([s], [], [], 0)[0]], what="one dropped")
        assert len(closed) == 1 and closed[0] in crowd[:4]
        assert read_all(closed[0]) == b""
        assert health(agent)["connections"]["evicted"] >= 1
    finally:
        for s in crowd:
            s.close()


def test_the_caps_and_backlog_are_validated_config(make_agent, tmp_path):
    agent = make_agent(start=False)
    configure_server(agent, max_connections=0)
    with pytest.raises(AssertionError, match="server.max_connections must be a positive integer"):
        agent.start()


# ------------------------------------------------------------------ auth


def test_wrong_tokens_from_one_address_are_slowed_without_slowing_anyone(make_agent):
    agent = make_agent()
    guesser = "127.0.0.7"
    for _ in range(patchwire_agent.AUTH_FREE_FAILURES):
        assert request(agent, "GET", "/v1/jobs", "pw_guess", source=guesser)[0] == 401
    delays = [r.get("auth_delay_s", 0) for r in audit_lines(agent) if r["status"] == 401]
    assert delays == [0] * patchwire_agent.AUTH_FREE_FAILURES
    started = time.monotonic()
    assert request(agent, "GET", "/v1/jobs", "pw_guess", source=guesser)[0] == 401
    assert time.monotonic() - started >= patchwire_agent.AUTH_PENALTY_S  # the answer waited
    for _ in range(3):  # 0.5, 1, 2 s
        request(agent, "GET", "/v1/jobs", "pw_guess", source=guesser)
    # the next guess waits 4 s in its own thread: meanwhile the right token from the same
    # address, and anyone else, are answered at once
    slow = threading.Thread(target=request, args=(agent, "GET", "/v1/jobs", "pw_guess"),
                            kwargs={"source": guesser})
    slow.start()
    wait_until(lambda: health(agent)["connections"]["open"] >= 2, what="the guess in flight")
    assert request(agent, "GET", "/v1/jobs", agent.token, source=guesser)[0] == 200
    assert request(agent, "GET", "/v1/jobs", agent.token, source="127.0.0.8")[0] == 200
    assert slow.is_alive(), "the right token waited for the penalised guess"
    slow.join(timeout=30)
    delays = [r.get("auth_delay_s", 0) for r in audit_lines(agent) if r["status"] == 401]
    assert delays[-5:] == [0.25, 0.5, 1.0, 2.0, 4.0]
    # a missing token is not a guess, and another address starts with a clean slate
    assert request(agent, "GET", "/v1/jobs", None, source=guesser)[0] == 401
    assert request(agent, "GET", "/v1/jobs", "pw_guess", source="127.0.0.9")[0] == 401
    assert [r.get("auth_delay_s", 0) for r in audit_lines(agent) if r["status"] == 401][-2:] == [0, 0]


# ------------------------------------------------------------------ where it listens


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "8.8.8.8:7433", "169.254.1.1:7433"])
def test_a_public_listen_address_is_refused_at_start(make_agent, listen):
    agent = configure_server(make_agent(start=False), listen=listen)
    proc = subprocess.run(agent.program + ["serve", "-c", str(agent.config)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "is not a loopback, private (RFC 1918, IPv6 ULA) or Tailscale address" in proc.stderr
    assert "allow_public = true" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("listen", ["10.1.2.3:1", "172.31.0.1:1", "192.168.0.9:1", "100.64.0.1:1",
                                    "100.127.255.254:1", "[fd7a:115c:a1e0::53]:1", "[fd12::1]:1",
                                    "127.0.0.1:1", "[::1]:1", "localhost:1"])
def test_private_and_tailscale_listen_addresses_are_accepted(tmp_path, listen):
    path = tmp_path / "agent.toml"
    cfg = patchwire_agent.AgentConfig(path, {"server": {"listen": listen, "state_dir": str(tmp_path / "s")}})
    assert cfg.port == 1


@pytest.mark.parametrize("listen, words", [
    ("100.128.0.1:1", "not a loopback"), ("::1:7433", "HOST:PORT or [IPv6]:PORT"),
    ("[::1]:99999", "HOST:PORT"), ("127.0.0.1:\u00b2", "HOST:PORT")])
def test_bad_listen_addresses_are_named(tmp_path, listen, words):
    with pytest.raises(patchwire_agent.PatchwireError, match=re.escape(words)):
        patchwire_agent.AgentConfig(tmp_path / "a.toml", {"server": {"listen": listen}})


def test_allow_public_listens_on_every_address(make_agent):
    agent = start_with(make_agent, {"listen": "0.0.0.0:0", "allow_public": True})
    port = address(agent)[1]
    assert agent.url == f"http://0.0.0.0:{port}"
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/v1/health", timeout=15) as resp:
        assert json.loads(resp.read())["ok"] is True
    assert "allow_public without tls_cert and tls_key" in agent.read_log()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_listen_address_works_with_the_cli(make_agent, tmp_path):
    agent = start_with(make_agent, {"listen": "[::1]:0"})
    assert agent.url.startswith("http://[::1]:")
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", agent.url + "/v1/health"], capture_output=True)
    assert json.loads(proc.stdout)["ok"] is True, proc.stderr
    lap = Laptop(make_repo(tmp_path / "v6", {"a.txt": b"a\n"}))
    lap.init(agent)
    lap.ask(script({"write": "a.txt", "text": "b\n"}), "--yes", check=0)
    assert (lap.root / "a.txt").read_text() == "b\n"
    audit = audit_lines(agent)
    assert {r["address"] for r in audit if r["event"] == "request"} == {"::1"}


# ------------------------------------------------------------------ TLS


def self_signed(folder: Path, name: str = "agent") -> tuple:
    """A certificate for 127.0.0.1 and localhost, and its key, made with the openssl CLI."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=patchwire test", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_agent(make_agent, tmp_path):
    cert, key = self_signed(tmp_path)
    agent = start_with(make_agent, {"tls_cert": str(cert), "tls_key": str(key), "header_timeout_s": 2})
    agent.cert = cert
    return agent


def test_tls_speaks_to_curl_and_urllib_with_the_ca_and_refuses_without(tls_agent, tmp_path):
    agent = tls_agent
    assert agent.url.startswith("https://127.0.0.1:")
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", "--cacert", str(agent.cert),
                           "-H", "Authorization: Bearer " + agent.token, agent.url + "/v1/jobs"], capture_output=True)
    assert json.loads(proc.stdout) == {"jobs": []}, proc.stderr
    context = ssl.create_default_context(cafile=str(agent.cert))
    with urllib.request.urlopen(agent.url + "/v1/health", timeout=15, context=context) as resp:
        assert json.loads(resp.read())["ok"] is True
    # without the CA, curl refuses the certificate; plain HTTP gets no answer and no hang
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", agent.url + "/v1/health"], capture_output=True)
    assert proc.returncode == 60, proc.stderr  # "SSL certificate problem"
    assert b"HTTP/" not in exchange(agent, HEALTH)
    assert "Traceback" not in agent.read_log()


def test_an_idle_tcp_client_does_not_stall_the_tls_handshake_of_others(tls_agent):
    """Wrapping the listening socket would do each handshake inside accept(): one client
    that connects and says nothing would stall everyone."""
    agent = tls_agent
    idle = [connect(agent) for _ in range(3)]
    try:
        context = ssl.create_default_context(cafile=str(agent.cert))
        for _ in range(3):
            with urllib.request.urlopen(agent.url + "/v1/health", timeout=4, context=context) as resp:
                assert resp.status == 200
        # and the idle ones are let go when the budget of a request head (2 s) is spent
        assert all(read_all(s) == b"" for s in idle)
    finally:
        for s in idle:
            s.close()


def test_the_laptop_cli_asks_over_https_with_its_ca_file(tls_agent, tmp_path):
    agent = tls_agent
    lap = Laptop(make_repo(tmp_path / "tls-laptop", {"a.txt": b"a\n"}))
    lap.init(agent)
    proc = lap.ask(script({"write": "a.txt", "text": "b\n"}), "--yes")
    assert proc.returncode != 0
    assert "certificate" in proc.err and "ca_file" in proc.err and "Traceback" not in proc.err, proc.err
    config = lap.root / ".patchwire.toml"
    write_config(config.parent, config.read_text() + f'ca_file = "{agent.cert}"\n')
    lap.ask(script({"write": "a.txt", "text": "b\n"}), "--yes", check=0)
    assert (lap.root / "a.txt").read_text() == "b\n"


def test_mismatched_tls_settings_are_named(make_agent, tmp_path):
    cert, key = self_signed(tmp_path)
    for server, words in (({"tls_cert": str(cert)}, "server.tls_cert and server.tls_key go together"),
                          ({"tls_cert": str(key), "tls_key": str(key)}, "cannot load server.tls_cert")):
        agent = configure_server(make_agent(start=False), **server)
        proc = subprocess.run(agent.program + ["serve", "-c", str(agent.config)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ audit log


def test_every_request_and_job_is_one_audit_line_without_token_or_prompt(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    lap = Laptop(make_repo(tmp_path / "audited", {"a.txt": b"a\n"}))
    lap.init(agent)
    prompt = script({"write": "a.txt", "text": "b\n"}, text="the secret plan 7f3a")
    lap.ask(prompt, "--yes", check=0)
    job = lap.last_job()
    agent.request("GET", "/v1/jobs", token="pw_wrong")
    request(agent, "GET", f"/v1/jobs/{job[:6]}/events?after=%C2%B2", agent.token)
    lines = audit_lines(agent)
    path = agent.state_dir / "audit.log"
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    for secret in (agent.tokens["alice"], agent.tokens["bob"], "pw_wrong", "secret plan 7f3a"):
        assert secret not in text
    requests = [r for r in lines if r["event"] == "request"]
    keys = {"time", "event", "user", "address", "method", "path", "status", "job", "bytes", "bytes_in", "duration_ms"}
    assert all(keys <= set(r) for r in requests), requests
    ask = next(r for r in requests if r["path"] == "/v1/ask")
    assert ask["user"] == "alice" and ask["job"] == job and ask["status"] == 200 and ask["method"] == "POST"
    assert ask["address"] == "127.0.0.1" and ask["bytes"] > 0 and ask["bytes_in"] > 0
    assert [r for r in requests if r["path"] == "/v1/jobs" and r["status"] == 401][0]["user"] is None
    bad = requests[-1]
    assert bad["status"] == 400 and bad["user"] == "alice" and bad["job"] is None
    assert [(r["event"], r["job"]) for r in lines if r["event"].startswith("job_")] == [
        ("job_start", job), ("job_end", job)]
    end = [r for r in lines if r["event"] == "job_end"][0]
    assert end["status"] == "done" and end["user"] == "alice"


def test_the_audit_log_is_rotated_by_size(make_agent):
    agent = start_with(make_agent, {"audit_max_bytes": 2000})
    for n in range(80):  # a user's (a client without a token writes 60 lines, then one a second)
        request(agent, "GET", f"/v1/jobs/0{n:02}", agent.token)
    logs = sorted(p.name for p in agent.state_dir.glob("audit.log*"))
    assert logs == ["audit.log"] + [f"audit.log.{n}" for n in range(1, patchwire_agent.AUDIT_BACKUPS + 1)]
    paths = [agent.state_dir / name for name in logs]
    assert all(p.stat().st_size <= 2000 and p.stat().st_mode & 0o777 == 0o600 for p in paths)
    newest = [json.loads(line)["path"] for p in paths[:2] for line in p.read_text().splitlines()]
    assert "/v1/jobs/079" in newest  # the newest lines are in audit.log, older ones in .1 ...
    assert all(json.loads(line)["event"] == "request" for p in paths for line in p.read_text().splitlines())


def test_penalised_guesses_hold_no_place_another_user_needs(make_agent):
    """Wrong tokens on every connection a few addresses may open: each connection waits out
    its penalty evictable, so a user from elsewhere takes one's place and is answered at
    once, not 503 busy until the guessers hang up. (A wrong token's answer ends its
    connection, so the guessers connect again for each guess.)"""
    agent = start_with(make_agent, {"max_connections": 8, "max_connections_per_client": 4, "header_timeout_s": 30})
    guess = b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pw_guess\r\n\r\n"
    socks = []
    try:
        for source in ("127.0.0.21", "127.0.0.22"):  # past the free failures
            for _ in range(patchwire_agent.AUTH_FREE_FAILURES + 1):
                exchange(agent, guess, source=source)
        for source in ("127.0.0.21", "127.0.0.22"):  # each of these now waits its penalty (up to 4 s)
            for _ in range(4):
                sock = connect(agent, source)
                sock.sendall(guess)
                socks.append(sock)
        wait_until(lambda: health(agent, source="127.0.0.23")["connections"]["open"] >= 8, what="the guessers in")
        wait_until(lambda: {r["address"] for r in audit_lines(agent) if r.get("auth_delay_s")} == {"127.0.0.21", "127.0.0.22"},
                   what="both guessing addresses past their free failures")
        status, _, body = request(agent, "GET", "/v1/jobs", agent.token, source="127.0.0.24")
        assert status == 200, body
        assert health(agent, source="127.0.0.23")["connections"]["evicted"] >= 1
    finally:
        for sock in socks:
            sock.close()


def test_pipelined_requests_each_get_their_audit_line(make_agent):
    """Requests sent together on one connection (HTTP/1.1 pipelining) arrive in one read: each
    is answered and each is audited, the guess among them too (only the first was). The guess,
    without a valid token, ends the connection: what follows it is not read."""
    agent = make_agent()
    good = f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n\r\n".encode()
    bad = b"GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pw_guess\r\n\r\n"
    answer = exchange(agent, good + good + bad + good, source="127.0.0.31")
    assert answer.count(b"HTTP/1.1 200") == 2 and answer.count(b"HTTP/1.1 401") == 1, answer[:400]
    wait_until(lambda: len([r for r in audit_lines(agent) if r.get("address") == "127.0.0.31"]) == 3, 10,
               "three audit lines")
    mine = [(r["path"], r["status"]) for r in audit_lines(agent) if r.get("address") == "127.0.0.31"]
    assert mine == [("/v1/jobs", 200), ("/v1/jobs", 200), ("/v1/me", 401)], mine
