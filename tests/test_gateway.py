"""The gateway on its own: a job's Unix socket, spoken to as the forwarder inside the sandbox would
(raw HTTP/1.1 over the socket), in front of a small "internet" on 127.0.0.2 (HTTPS, a test CA)
and 127.0.0.3 (plain HTTP), and a stand-in API upstream that records the credential it got."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import tempfile
import shutil
import time
from pathlib import Path
from typing import List

import pytest

import patchwire_agent as pa
from internet import Internet
from conftest import wait_until
from sshd import free_port


@pytest.fixture
def internet(tmp_path):
    net = Internet(tmp_path / "internet")
    yield net
    net.close()


@pytest.fixture
def gateway(tmp_path):
    made: List[pa.JobGateway] = []

    def factory(mode="allowlist", allow=(), upstream=None, credential=None, key=None):
        events: List[dict] = []
        report = pa.EgressReport(events.append)
        policy = pa.NetworkPolicy(mode, list(allow), f'[network] mode = "{mode}"', "[network]")
        folder = Path("/tmp") if len(str(tmp_path)) > 80 else tmp_path
        gw = pa.JobGateway(folder, policy, upstream, credential, report, key=key)
        gw.events = events  # type: ignore[attr-defined]
        made.append(gw)
        return gw
    yield factory
    for gw in made:
        gw.close()


def talk(gw: pa.JobGateway, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_INET if gw.key else socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", gw.port) if gw.key else str(gw.path))
    sock.sendall(head.encode() + body)
    return sock


def read_all(sock) -> bytes:
    data = b""
    for chunk in iter(lambda: sock.recv(65536), b""):
        data += chunk
    return data


def read_response_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, data
        data += chunk
    return data


def test_connect_to_an_allowed_host_is_a_tls_tunnel(gateway, internet):
    host, port = internet.https
    gw = gateway(allow=[f"{host}:{port}"])
    sock = talk(gw, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n")
    assert read_response_head(sock).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(internet.ca)).wrap_socket(sock, server_hostname=host)
    tls.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    answer = read_all(tls)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from 127.0.0.2\n")
    report = gw.report.summary()
    assert report["contacted"][host]["allowed"] == 1 and report["contacted"][host]["received"] > len(answer)
    assert gw.events == [{"type": "network", "host": host}]


def test_a_host_not_allowed_gets_an_answer_naming_it_and_the_setting(gateway, internet):
    host, port = internet.http
    gw = gateway(allow=[f"{internet.https[0]}:{internet.https[1]}"])
    for _ in range(3):
        answer = read_all(talk(gw, f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 403 Forbidden")
        assert f"{host}:{port} is not allowed ([network] mode = \"allowlist\")".encode() in answer
        assert f'add "{host}" to [network] allow = [...]'.encode() in answer
    answer = read_all(talk(gw, f"GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 403") and not internet.http_seen
    assert gw.report.summary()["refused"] == {host: 4}
    assert [e["type"] for e in gw.events] == ["network_refused"] * 4 and gw.events[-1]["count"] == 4


def test_plain_http_is_forwarded_one_request_per_connection(gateway, internet):
    host, port = internet.http
    gw = gateway(allow=[f"{host}:{port}"])
    answer = read_all(talk(gw, f"GET http://{host}:{port}/path?q=1 HTTP/1.1\r\nHost: {host}\r\n"
                               "Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from 127.0.0.3\n")
    method, path, headers = internet.http_seen[-1]
    assert (method, path) == ("GET", "/path?q=1")
    assert headers["connection"] == "close" and "proxy-authorization" not in headers
    # what goes up counts in the job's report, the request's head and the body read with it
    body = b'{"SECRET.txt": "' + b"x" * 5000 + b'"}'
    read_all(talk(gw, f"POST http://{host}:{port}/up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n",
                  body))
    assert gw.report.summary()["contacted"][host]["sent"] > len(body)


def test_mode_none_refuses_everything_and_open_allows_anything(gateway, internet):
    host, port = internet.http
    answer = read_all(talk(gateway(mode="none", allow=[f"{host}:{port}"]), f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n"))
    assert b"the network is off for this job ([network] mode = \"none\")" in answer
    # "open" allows any host on the internet; the "internet" here is loopback, named itself
    gw = gateway(mode="open", allow=[f"{host}:{port}"])
    answer = read_all(talk(gw, f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert answer.endswith(b"hello from 127.0.0.3\n")


@pytest.mark.parametrize("kind,secret,header,value", [
    ("api_key", "sk-ant-api03-REAL", "x-api-key", "sk-ant-api03-REAL"),
    ("oauth", "sk-ant-oat01-REAL", "authorization", "Bearer sk-ant-oat01-REAL"),
])
def test_the_api_call_gets_the_box_credential_and_the_ai_never_holds_it(gateway, internet, kind, secret, header, value):
    host, port = internet.http
    internet.servers[1].body = b'{"ok": true}'
    gw = gateway(mode="none", upstream=f"http://{host}:{port}", credential=pa.Credential(kind, secret))
    body = json.dumps({"model": "x"}).encode()
    answer = read_all(talk(gw, f"POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n"
                               f"x-api-key: {pa.GATEWAY_PLACEHOLDER_KEY}\r\nanthropic-beta: tools-1\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n", body))
    assert answer.endswith(b'{"ok": true}')
    method, path, headers = internet.http_seen[-1]
    assert (method, path) == ("POST", "/v1/messages?beta=true")
    assert headers[header] == value and headers["host"] == f"{host}:{port}"
    assert pa.GATEWAY_PLACEHOLDER_KEY not in json.dumps(headers)
    if kind == "oauth":
        assert "x-api-key" not in headers and headers["anthropic-beta"] == f"tools-1,{pa.OAUTH_BETA}"
    assert gw.report.summary()["contacted"][host]["allowed"] == 1  # counted even with mode "none"


def test_a_keyed_port_serves_only_requests_carrying_its_jobs_key(gateway, internet):
    """sandbox-exec's gateway: a port on the box's shared loopback, so every process of the box
    can connect; only the job's environment holds the key its requests must carry."""
    host, port = internet.http
    internet.servers[1].body = b'{"ok": true}'
    key = pa.GatewayKey()
    gw = gateway(allow=[f"{host}:{port}"], upstream=f"http://{host}:{port}",
                 credential=pa.Credential("api_key", "sk-ant-api03-REAL"), key=key)
    assert gw.port and not gw.path.exists()
    env = pa.gateway_env(gw.port, key)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == f"http://patchwire:{key.secret}@127.0.0.1:{gw.port}"
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{gw.port}" and env["ANTHROPIC_API_KEY"] == key.placeholder
    get = f"GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}\r\n"
    basic = base64.b64encode(f"patchwire:{key.secret}".encode()).decode()
    other = base64.b64encode(f"patchwire:{pa.GatewayKey().secret}".encode()).decode()
    for proof in ("", f"Proxy-Authorization: Basic {other}\r\n"):
        answer = read_all(talk(gw, get + proof + "\r\n"))
        assert answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required"), answer
        assert b"this port serves one job" in answer
    for placeholder in ("", pa.GATEWAY_PLACEHOLDER_KEY, pa.GatewayKey().placeholder):
        answer = read_all(talk(gw, f"POST /v1/messages HTTP/1.1\r\nx-api-key: {placeholder}\r\n"
                                   "Content-Length: 0\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized"), answer
    assert not internet.http_seen  # nothing went out for a request without the key
    assert read_all(talk(gw, get + f"Proxy-Authorization: Basic {basic}\r\n\r\n")).endswith(b'{"ok": true}')
    answer = read_all(talk(gw, f"POST /v1/messages HTTP/1.1\r\nx-api-key: {key.placeholder}\r\n"
                               "Content-Length: 0\r\n\r\n"))
    assert answer.endswith(b'{"ok": true}')
    sent = [headers for _, _, headers in internet.http_seen]
    assert "proxy-authorization" not in sent[0] and sent[1]["x-api-key"] == "sk-ant-api03-REAL"
    assert key.secret not in json.dumps(sent)  # the key never leaves the box
    gw.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=5)


def test_without_a_credential_of_its_own_the_gateway_passes_the_ais_login_on(gateway, internet):
    host, port = internet.http
    gw = gateway(mode="none", upstream=f"http://{host}:{port}", key=pa.GatewayKey())
    answer = read_all(talk(gw, "POST /v1/messages HTTP/1.1\r\nAuthorization: Bearer sk-ant-oat01-THE-AIS\r\n"
                               "Content-Length: 0\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200")
    assert internet.http_seen[-1][2]["authorization"] == "Bearer sk-ant-oat01-THE-AIS"


def test_host_patterns():
    assert pa.host_matches("pub.dev", "pub.dev", 443) and pa.host_matches("pub.dev", "PUB.dev.", 80)
    assert not pa.host_matches("pub.dev", "pub.dev", 8443) and pa.host_matches("pub.dev:8443", "pub.dev", 8443)
    assert pa.host_matches("*.github.com", "api.github.com", 443)
    assert pa.host_matches("*.github.com", "a.b.github.com", 443)
    assert not pa.host_matches("*.github.com", "github.com", 443)
    assert not pa.host_matches("*.github.com", "evilgithub.com", 443)
    assert not pa.host_matches("pub.dev", "pub.dev.evil.example", 443)
    # IPv6 entries with a port are written in brackets; before, a pattern of more than one colon
    # never had its port split off, and `[::1]:8080` matched nothing (in [network] and [notify])
    assert pa.host_matches("[::1]:8080", "::1", 8080) and not pa.host_matches("[::1]:8080", "::1", 443)
    assert pa.host_matches("[2001:db8::5]", "2001:db8::5", 443) and pa.host_matches("::1", "::1", 80)
    assert pa.is_ip_literal("[::1]:8080", "::1") and not pa.is_ip_literal("[::1]:8080", "::2")
    assert pa.is_ip_literal("[FE80::1]", "fe80::1")
    assert not pa.host_matches("[::1]x", "::1", 443) and not pa.host_matches("[::1", "::1", 443)  # malformed: nothing


def test_network_config_layers_and_errors(tmp_path):
    path = tmp_path / "agent.toml"
    net = pa.NetworkConfig(path, {"presets": ["pub"], "allow": ["internal.example"],
                                  "users": {"ann": {"allow": ["ann.example"]}},
                                  "projects": {"secret-*": {"mode": "none"}}})
    ann = net.policy("ann", "web")
    assert ann.mode == "allowlist" and ann.allows("pub.dev", 443) and ann.allows("ann.example", 443)
    assert ann.allows("internal.example", 443) and not net.policy("ben", "web").allows("ann.example", 443)
    assert not ann.allows("api.anthropic.com", 443)  # presets replace the default list when given
    assert pa.NetworkConfig(path, {}).policy("x", "y").allows("api.anthropic.com", 443)  # the default preset
    locked = net.policy("ann", "secret-app")
    assert locked.mode == "none" and 'mode = "none"' in locked.refusal("pub.dev", 443)
    assert '[network.users.ann] allow' in ann.refusal("evil.example", 443)
    assert pa.NetworkConfig(path, None).configured is False
    for bad, words in (({"mode": "closed"}, "network.mode must be one of open, allowlist, none"),
                       ({"presets": ["pypy"]}, "has no preset 'pypy'"),
                       ({"users": {"ann": {"mode": "x"}}}, "network.users.ann.mode must be one of"),
                       ({"api_upstream": "ftp://x"}, "must be an http:// or https:// URL")):
        with pytest.raises(pa.PatchwireError, match=words):
            pa.NetworkConfig(path, bad)



@pytest.mark.slow
@pytest.mark.parametrize("kind,secret,header,value", [
    ("api_key", "sk-ant-api03-REAL", "x-api-key", "sk-ant-api03-REAL"),
    ("oauth", "sk-ant-oat01-REAL", "authorization", "Bearer sk-ant-oat01-REAL"),
])
def test_the_real_cli_reaches_its_api_through_the_forwarder_and_the_gateway(gateway, tmp_path, kind, secret,
                                                                             header, value):
    """The forwarder as the sandbox runs it (the agent's Python, -I -S), the real Claude Code CLI
    as its child with the gateway's environment: the stand-in Messages API sees the box's
    credential, in the headers that credential's kind needs, and never the placeholder."""
    import subprocess
    import sys
    from claude_cli import claude_env, require_claude_cli
    from messages_api import FakeMessagesAPI
    cli = require_claude_cli()
    with FakeMessagesAPI([[{"type": "text", "text": "hello through the gateway"}]]) as api:
        gw = gateway(mode="none", upstream=api.base_url, credential=pa.Credential(kind, secret))
        port = free_port()
        env = {**claude_env(tmp_path / "home", "unused"), **pa.gateway_env(port)}
        out = subprocess.run([sys.executable, "-I", "-S", "-c", pa.GATEWAY_FORWARDER, str(gw.path), str(port),
                              cli, "--print", "--output-format", "json", "say hello"],
                             env=env, cwd=tmp_path, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["result"] == "hello through the gateway"
        sent = [c for c in api.credentials if header in c]
        assert sent and all(c[header] == value for c in sent), api.credentials
        assert pa.GATEWAY_PLACEHOLDER_KEY not in json.dumps(api.credentials)
        if kind == "oauth":
            assert all(pa.OAUTH_BETA in c["anthropic-beta"].split(",") for c in sent)
    summary = gw.report.summary()
    assert summary["contacted"]["127.0.0.1"]["allowed"] >= 1
    # the gateway's own count of tokens equals what the CLI reported from the same answers
    reported = json.loads(out.stdout)["usage"]
    assert summary["api_tokens"]["output"] == reported["output_tokens"] > 0
    assert summary["api_tokens"]["input"] >= reported["input_tokens"] > 0


@pytest.mark.slow
def test_the_real_cli_reaches_its_api_through_a_keyed_gateway_port(gateway, tmp_path):
    """The macOS wiring: no forwarder, the real CLI talks to the gateway's own loopback port
    with the keyed environment, and its placeholder key is the proof the gateway takes."""
    import subprocess
    from claude_cli import claude_env, require_claude_cli
    from messages_api import FakeMessagesAPI
    cli = require_claude_cli()
    key = pa.GatewayKey()
    with FakeMessagesAPI([[{"type": "text", "text": "hello through the keyed port"}]]) as api:
        gw = gateway(mode="none", upstream=api.base_url, credential=pa.Credential("api_key", "sk-ant-api03-REAL"),
                     key=key)
        env = {**claude_env(tmp_path / "home", "unused"), **pa.gateway_env(gw.port, key)}
        out = subprocess.run([cli, "--print", "--output-format", "json", "say hello"],
                             env=env, cwd=tmp_path, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["result"] == "hello through the keyed port"
        assert api.credentials and all(c.get("x-api-key") == "sk-ant-api03-REAL" for c in api.credentials)
        assert key.secret not in json.dumps(api.credentials)


def sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("encoding", ["plain", "chunked"])
def test_the_gateway_counts_the_apis_own_tokens_in_a_streamed_answer(encoding):
    body = sse({"type": "message_start", "message": {"usage": {"input_tokens": 120, "output_tokens": 1,
                                                               "cache_read_input_tokens": 30,
                                                               "cache_creation_input_tokens": 7}}},
               {"type": "content_block_delta", "delta": {"text": "data: {\"usage\": 999}"}},
               {"type": "message_delta", "usage": {"output_tokens": 10}},
               {"type": "message_delta", "usage": {"output_tokens": 45}},
               {"type": "message_stop"})
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    wire = (head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, 37) if encoding == "chunked"
            else head + b"\r\n" + body)
    scanner = pa.UsageScanner()
    for i in range(0, len(wire), 13):  # relayed in pieces that cut lines and chunk headers anywhere
        scanner.feed(wire[i:i + 13])
    assert scanner.close() == {"input": 120, "output": 45, "cache_read": 30, "cache_write": 7}


def test_the_gateway_counts_the_tokens_of_a_plain_json_answer():
    scanner = pa.UsageScanner()
    scanner.feed(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
    scanner.feed(json.dumps({"usage": {"input_tokens": 5, "output_tokens": 6}}).encode())
    assert scanner.close() == {"input": 5, "output": 6, "cache_read": 0, "cache_write": 0}


def test_the_box_itself_is_out_of_reach_even_in_open_mode(gateway):
    """The gateway runs in the box's own network: a prompt-injected AI must not use it to reach
    the agent's API or another service on the box's loopback, by address in mode "open", nor
    by a name that resolves there (DNS under the attacker's control, or "localhost")."""
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen(5)
    port = service.getsockname()[1]
    try:
        for gw, target in ((gateway(mode="open"), f"127.0.0.1:{port}"),
                           (gateway(allow=[f"localhost:{port}"]), f"localhost:{port}")):
            answer = read_all(talk(gw, f"CONNECT {target} HTTP/1.1\r\n\r\n"))
            assert answer.startswith(b"HTTP/1.1 403") and b"is 127.0.0.1, not an internet address" in answer, answer
            assert gw.report.summary()["refused"] == {target.split(":")[0]: 1}
        service.settimeout(0.5)
        with pytest.raises(socket.timeout):
            service.accept()  # nothing came through
        # an admin who means it names the address
        answer = talk(gateway(allow=[f"127.0.0.1:{port}"]), f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")
        assert read_response_head(answer).startswith(b"HTTP/1.1 200")
        answer.close()
    finally:
        service.close()


def test_a_client_trickling_its_request_is_cut_off(gateway, monkeypatch):
    monkeypatch.setattr(pa, "GATEWAY_HEAD_BUDGET_S", 1.0)
    sock = talk(gateway(mode="open"), "CONN")
    started = time.monotonic()
    try:
        for byte in b"ECT example.com:443 HTTP/1.1\r\n":  # a byte every 0.2 s: never a whole head in time
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
    except OSError:
        pass  # the gateway hung up
    answer = read_all(sock)
    assert b"no whole request head within 1 s" in answer and time.monotonic() - started < 8


def test_a_job_cannot_open_connections_without_end(gateway, monkeypatch):
    monkeypatch.setattr(pa, "GATEWAY_MAX_CONNECTIONS", 3)
    gw = gateway(mode="open")
    held = [talk(gw, "CONNECT") for _ in range(3)]  # heads never finished: each holds a slot
    wait_until(lambda: gw.open_connections == 3, timeout=20, what="the gateway to take the three")
    for delay in (0, 0.5):  # a client that writes at once, one slow to write (answered before it)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(20)
        sock.connect(str(gw.path))
        time.sleep(delay)
        with contextlib.suppress(BrokenPipeError):  # the gateway may have answered and closed
            sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 503") and b"3 connections open already" in answer
    for sock in held:
        sock.close()


def test_a_deep_temporary_folder_still_gets_the_job_a_socket(tmp_path, monkeypatch):
    """TMPDIR too deep for a Unix socket's 107 bytes (pytest's own folders under xdist made
    every job fail with "AF_UNIX path too long"): the gateway's folder goes to /tmp instead, and
    a gateway binds and answers there; a short TMPDIR is used as it is."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(pa.tempfile, "tempdir", str(deep))
    folder = pa.socket_folder("pw-gateway-")
    try:
        assert folder.parent == Path("/tmp") and folder.name.startswith("pw-gateway-")
        assert folder.stat().st_mode & 0o777 == 0o700
        gw = pa.JobGateway(folder, pa.NetworkPolicy("none", [], '[network] mode = "none"', "[network]"),
                           None, None, pa.EgressReport(lambda e: None), own_folder=True)
        answer = read_all(talk(gw, "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"))
        gw.close()
        assert answer.startswith(b"HTTP/1.1 403") and not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert list(deep.iterdir()) == []  # the deep candidate was made, found too long, and removed
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own folder may be too long already
    try:
        monkeypatch.setattr(pa.tempfile, "tempdir", str(short))
        assert pa.socket_folder("pw-gateway-").parent == short
    finally:
        shutil.rmtree(short)


@pytest.mark.parametrize("address", ["64:ff9b::a9fe:a9fe", "64:ff9b:1::a", "2002:7f00:1::", "::127.0.0.1",
                                     "::ffff:169.254.169.254", "::ffff:0:a9fe:a9fe"])
def test_an_ipv6_address_that_carries_a_private_ipv4_one_is_not_the_internet(gateway, address):
    """NAT64 (64:ff9b::a9fe:a9fe is 169.254.169.254, the cloud's metadata, through the
    network's NAT64 gateway), 6to4 and IPv4-compatible addresses: Python's is_global says yes;
    judged by the IPv4 address they carry, even mode "open" refuses them. Nothing connects."""
    answer = read_all(talk(gateway(mode="open"), f"CONNECT [{address}]:443 HTTP/1.1\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 403") and b"not an internet address" in answer, answer
    assert not pa.on_the_internet(address) and pa.on_the_internet("64:ff9b::808:808")
    assert pa.delivery_address(f"https://[{address}]/hook", [])[1].endswith(
        "not an internet address: only a [notify] allow entry naming that address itself reaches it")
