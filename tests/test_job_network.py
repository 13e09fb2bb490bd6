"""The AI's network (the gateway, wired in): each job under bwrap in its own network namespace, its
way out the agent's gateway. The real agent, as root and as an ordinary account (test_box_walls'
WallsBox), the stand-in AI running real curl and python; the "internet" is tests/internet.py on
127.0.0.2 (HTTPS, a test CA) and 127.0.0.3 (plain HTTP)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time

import pytest

import patchwire
import patchwire_agent as pa
from conftest import queue_one_job, script
from internet import Internet
from messages_api import FakeMessagesAPI
from test_box_walls import EMPTY_TREE, place, walls_box  # noqa: F401 - fixtures

LISTEN_CODE = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 45678)); s.listen(1); s.settimeout(15)
open(sys.argv[1], "w").write("listening")
try:
    c, _ = s.accept(); print("someone came:", c.recv(100))
except socket.timeout:
    print("nobody came")
"""
CONNECT_CODE = """
import socket, sys
for target in sys.argv[1:]:
    family = socket.AF_UNIX if target.startswith("@") else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(3)
    try:
        s.connect("\\0" + target[1:] if family == socket.AF_UNIX else (target.split(":")[0], int(target.split(":")[1])))
        s.sendall(b"hello from the AI")
        print(target, "connected")
    except OSError as e:
        print(target, "error:", e.strerror or e)
"""


@pytest.fixture
def internet(place):  # noqa: F811
    net = Internet(place / "internet")
    yield net
    net.close()


def test_a_job_reaches_only_allowed_hosts_and_never_holds_the_credential(walls_box, internet):  # noqa: F811
    (https_host, https_port), (http_host, http_port) = internet.https, internet.http
    api = FakeMessagesAPI([[{"type": "text", "text": "counted by the gateway"}]]).start()
    upstream = api.base_url.split("//")[1]
    box = walls_box(network={"mode": "allowlist", "presets": [], "allow": [f"{https_host}:{https_port}", upstream],
                             "api_upstream": api.base_url},
                    env={"ANTHROPIC_API_KEY": "sk-ant-api03-THE-BOXES-OWN"})
    call_api = ("curl -sS -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' "
                "-H \"x-api-key: $ANTHROPIC_API_KEY\" -d '" + json.dumps(
                    {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "count me"}]})
                + "' \"$ANTHROPIC_BASE_URL/v1/messages\"")
    job = box.ask("alice",
                  {"run": ["sh", "-c", call_api], "out": "api.txt"},
                  # the AI's own report says next to nothing: usage must hold what the API answered
                  {"usage": {"input_tokens": 1, "output_tokens": 1}},
                  {"write": "ca.crt", "text": internet.ca.read_text()},
                  {"run": ["curl", "-sS", "--cacert", "ca.crt", f"https://{https_host}:{https_port}/a"],
                   "out": "allowed.txt"},
                  {"run": ["curl", "-sS", f"http://{http_host}:{http_port}/b"], "out": "refused.txt"},
                  {"run": ["curl", "-sS", "--cacert", "ca.crt", f"https://{http_host}:{http_port}/c"],
                   "out": "refused-tls.txt"},
                  {"run": ["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{http_host}:{http_port}/d"],
                   "out": "direct.txt"},
                  {"env": "env.txt"})
    assert job["status"] == "done", job
    assert box.added(job, "allowed.txt").startswith("rc=0\nhello from 127.0.0.2")
    refused = box.added(job, "refused.txt")
    assert f"{http_host}:{http_port} is not allowed ([network] mode = \"allowlist\")" in refused
    assert f'add "{http_host}" to [network] allow = [...]' in refused
    assert "rc=0" not in box.added(job, "refused-tls.txt")  # curl: CONNECT refused with 403
    assert "rc=0" not in box.added(job, "direct.txt")  # no route: its own namespace has only loopback
    assert not internet.http_seen and [p for _, p, _ in internet.https_seen] == ["/a"]
    env = dict(line.split("=", 1) for line in box.added(job, "env.txt").splitlines() if "=" in line)
    assert env["ANTHROPIC_API_KEY"] == pa.GATEWAY_PLACEHOLDER_KEY and env["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert b"THE-BOXES-OWN" not in box.diff(job) + box.events_text(job)
    network = box.agent.json("GET", f"/v1/jobs/{job['id']}")[1]["result"]["network"]
    assert network["refused"] == {http_host: 2} and network["contacted"][https_host]["received"] > 0
    kinds = [json.loads(line)["type"] for line in box.events_text(job).splitlines() if line.strip()]
    assert kinds.count("network") == 2 and kinds.count("network_refused") == 2  # the API, the https host
    printer_out = io.StringIO()
    with contextlib.redirect_stderr(printer_out):
        printer = patchwire.ProgressPrinter(patchwire.Style(False))
        for line in box.events_text(job).splitlines():
            printer(json.loads(line))
    assert f"network contacted: 127.0.0.1, {https_host}; refused: {http_host} x2" in printer_out.getvalue()
    assert f"network: {http_host} refused by the box's [network] policy (x2)" in printer_out.getvalue()
    answered = json.loads(box.added(job, "api.txt").split("\n", 1)[1])["usage"]
    api.stop()
    assert [c["x-api-key"] for c in api.credentials] == ["sk-ant-api03-THE-BOXES-OWN"]
    usage = box.agent.json("GET", "/v1/usage", token=box.agent.tokens["alice"])[1]["total"]
    assert (usage["tokens_in"], usage["tokens_out"]) == (answered["input_tokens"], answered["output_tokens"])
    assert answered["input_tokens"] > 1 and answered["output_tokens"] > 1


def test_no_port_or_socket_of_the_box_or_another_job_is_reachable(walls_box):  # noqa: F811
    """Directly (its own namespace) or through the gateway, even with mode "open": the agent's
    API and every other service on the box's loopback stay out of a job's reach."""
    box = walls_box(network={"mode": "open"})
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen(5)
    abstract = socket.socket(socket.AF_UNIX)
    name = f"pw-test-abstract-{os.getpid()}-{time.monotonic_ns()}"
    abstract.bind("\0" + name)
    abstract.listen(5)
    heard: list = []

    def accept(sock) -> None:
        sock.settimeout(30)
        try:
            heard.append(sock.accept()[0].recv(100))
        except OSError:
            pass
    for sock in (service, abstract):
        threading.Thread(target=accept, args=(sock,), daemon=True).start()
    try:
        body = {"project": "p", "tree": EMPTY_TREE, "files": []}
        listener = box.agent.json("POST", "/v1/ask", {**body, "prompt": script(
            {"run": ["python3", "-c", LISTEN_CODE, "/tmp/ready"], "out": "listener.txt"})})[1]
        target = ["python3", "-c", CONNECT_CODE, f"127.0.0.1:{service.getsockname()[1]}", "@" + name,
                  "127.0.0.1:45678"]
        time.sleep(1.5)  # the listener job binds first
        via_gateway = ["curl", "-sS", "-x", "http://127.0.0.1:3128", "--noproxy", "",
                       f"http://127.0.0.1:{service.getsockname()[1]}/", f"{box.agent.url}/v1/health"]
        other = box.ask("bob", {"run": target, "out": "connect.txt"}, {"run": via_gateway, "out": "gateway.txt"})
        said = box.added(other, "connect.txt", user="bob")
        assert said.count("error:") == 3 and "connected" not in said, said
        through = box.added(other, "gateway.txt", user="bob")
        assert through.count("is 127.0.0.1, not an internet address") == 2 and '"ok"' not in through, through
        first = box.agent.wait_job(listener["id"], timeout=60)
        assert "nobody came" in box.added(first, "listener.txt"), box.added(first, "listener.txt")
        assert heard == []
    finally:
        for sock in (service, abstract):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which holds the name
            sock.close()



def test_doctor_proves_from_inside_a_sandbox_that_only_the_gateway_leads_out(tmp_path, capsys):
    from test_box_walls import bwrap_or_skip
    bwrap_or_skip()
    config = tmp_path / "agent.toml"
    assert pa.main(["init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t")]) == 0
    text = config.read_text().replace('sandbox = "auto"', 'sandbox = "bwrap"')
    config.write_text(text)
    capsys.readouterr()
    pa.main(["doctor", "-c", str(config), "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["network"]["ok"], checks["network"]
    assert "neither a port of the box nor api.anthropic.com is reachable directly" in checks["network"]["detail"]
    # a config of an older version, without [network]: the jobs share the box's network
    start, end = text.index("[network]"), text.index("allow = []") + len("allow = []")
    config.write_text(text[:start] + text[end:])
    pa.main(["doctor", "-c", str(config), "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert not checks["network"]["ok"] and "no [network] table" in checks["network"]["detail"]


FAKE_SANDBOX_EXEC = """#!/bin/sh
# sandbox-exec as a Mac has it, minus the enforcing: the profile is kept for the test to read
printf '%s' "$2" > "$PW_PROFILE_OUT"
shift 2
while [ "$1" = -D ]; do shift 2; done
exec "$@"
"""
KEYED_AI = """
out=$1
curl -sS --max-time 10 "http://$2/allowed" > "$out/allowed.txt" 2>&1
curl -sS --max-time 10 -x "http://127.0.0.1:${ANTHROPIC_BASE_URL##*:}" "http://$2/nokey" > "$out/nokey.txt" 2>&1
curl -sS --max-time 10 --compressed -H "x-api-key: $ANTHROPIC_API_KEY" -d '{}' \\
    "$ANTHROPIC_BASE_URL/v1/messages" > "$out/api.txt" 2>&1
env > "$out/env.txt"
"""


def test_under_sandbox_exec_a_job_goes_out_only_through_its_keyed_gateway_port(tmp_path, monkeypatch):
    """The macOS wiring, run here: the job's gateway is a port on the box's loopback (no network
    namespace on a Mac), the profile lets out only to that port, and each request carries the
    job's key. A stand-in sandbox-exec records the profile and runs the AI unconfined: what a Mac
    enforces is the profile's text, checked here to name the port the AI was given."""
    internet = Internet(tmp_path / "internet")
    host, port = internet.http
    internet.servers[1].body = b"from the internet\n"
    fake = tmp_path / "bin" / "sandbox-exec"
    fake.parent.mkdir()
    fake.write_text(FAKE_SANDBOX_EXEC)
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PW_PROFILE_OUT", str(out / "profile.sb"))
    (tmp_path / "credential").write_text("sk-ant-api03-THE-BOXES-OWN\n")
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {
        "server": {"state_dir": str(tmp_path / "state")},
        "ai": {"command": ["sh", "-c", KEYED_AI, "ai", str(out), f"{host}:{port}"], "sandbox": "none",
               "env": {"PW_PROFILE_OUT": str(out / "profile.sb")}},
        "network": {"mode": "allowlist", "presets": [], "allow": [f"{host}:{port}"],
                    "api_upstream": f"http://{host}:{port}", "credential_file": str(tmp_path / "credential")},
        "users": {"alice": {"token_sha256": pa.token_digest("t").hex()}}})
    agent = pa.Agent(cfg)  # no workers: this test is the worker
    agent.sandbox = pa.Sandbox("sandbox-exec", str(fake))
    try:
        job_id = queue_one_job(agent)
        agent.run_job(agent.queue.take(agent._claim))
        assert agent.store.job(job_id)["status"] in ("done", "failed")
    finally:
        agent.stop()
        internet.close()
    env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines() if "=" in line)
    gateway_port = int(env["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1])
    assert (out / "profile.sb").read_text().endswith(
        f'(deny network-outbound)\n(allow network-outbound (remote ip "localhost:{gateway_port}"))\n')
    assert env["HTTPS_PROXY"].startswith("http://patchwire:") and env["HTTPS_PROXY"].endswith(f"@127.0.0.1:{gateway_port}")
    assert env["ANTHROPIC_API_KEY"].startswith("sk-ant-patchwire-") and "THE-BOXES-OWN" not in json.dumps(env)
    assert (out / "allowed.txt").read_text() == "from the internet\n"
    assert "this port serves one job" in (out / "nokey.txt").read_text()
    assert (out / "api.txt").read_text() == "from the internet\n"
    seen = [(path, headers.get("x-api-key")) for _, path, headers in internet.http_seen]
    assert seen == [("/allowed", None), ("/v1/messages", "sk-ant-api03-THE-BOXES-OWN")]
    # a compressed answer would go past the gateway's token count (curl --compressed asked for one)
    assert [headers.get("accept-encoding") for _, path, headers in internet.http_seen if path == "/v1/messages"] \
        == ["identity"]
    with pytest.raises(ConnectionRefusedError):  # gone with the job
        socket.create_connection(("127.0.0.1", gateway_port), timeout=5)

