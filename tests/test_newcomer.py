"""What a newcomer meets first: SSH destinations with ports, hints that match the failure,
token trouble named precisely, not-found that is not a refusal, readable listings.

Real parts: a real sshd on a loopback port (tests/sshd.py), the real agent, the laptop CLI as a
process.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

import patchwire
from conftest import Laptop, make_repo, script
from sshd import running_sshd

PORTLESS_CONFIG = """\
Host {address}
    User {user}
    IdentityFile {identity}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
"""


@pytest.mark.parametrize("value, dest, port", [
    ("box", "box", None),
    ("me@box", "me@box", None),
    ("me@box:2222", "me@box", 2222),
    ("ssh://me@box:2222", "me@box", 2222),
    ("ssh://me@box/", "me@box", None),
    ("me@[fd7a:115c:a1e0::1]:2200", "me@[fd7a:115c:a1e0::1]", 2200),
    ("me@box.tail1234.ts.net", "me@box.tail1234.ts.net", None),
])
def test_ssh_destinations_with_and_without_a_port(tmp_path, value, dest, port):
    assert patchwire.parse_ssh_destination(value, tmp_path / "cfg") == (dest, port)


@pytest.mark.parametrize("value", ["box:/srv/mirror", "me@box:0", "me@box:65536", "me@box:22x", "a b",
                                   "me@@box", "ssh://me@box:22/path"])
def test_bad_ssh_destinations_are_refused_with_the_forms_that_work(tmp_path, value):
    with pytest.raises(patchwire.PatchwireError) as e:
        patchwire.parse_ssh_destination(value, tmp_path / "cfg")
    assert "is not an SSH destination" in e.value.message
    assert "USER@HOST:PORT" in e.value.hint and "~/.ssh/config" in e.value.hint


def portless_laptop(tmp_path: Path, agent, server, ssh: str) -> Laptop:
    """A project whose ssh destination carries the port: the ssh_config knows the host but no Port."""
    config = tmp_path / "ssh_config_no_port"
    config.write_text(PORTLESS_CONFIG.format(address=server.address, user=server.user,
                                             identity=server.client_key, known_hosts=server.known_hosts))
    config.chmod(0o600)
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# port\n", "src/a.txt": b"a\n"}))
    lap.init(agent, "--ssh", ssh)
    text = (lap.root / ".patchwire.toml").read_text()
    (lap.root / ".patchwire.toml").write_text(text + f'\n[sync]\nssh_options = ["-F", "{config}"]\n')
    return lap


@pytest.mark.slow
@pytest.mark.parametrize("form", ["{user}@{address}:{port}", "ssh://{user}@{address}:{port}"])
def test_sync_and_doctor_work_with_the_port_in_the_destination(tmp_path, agent, form):
    with running_sshd(tmp_path / "sshd") as server:
        ssh = form.format(user=server.user, address=server.address, port=server.port)
        lap = portless_laptop(tmp_path, agent, server, ssh)
        synced = lap.run("sync")
        assert synced.returncode == 0, synced.err
        mirror = agent.state_dir / "mirror" / "alice" / "laptop"
        assert (mirror / "src" / "a.txt").read_bytes() == b"a\n"
        doctor = lap.run("doctor", "--json", check=0)
        checks = {c["name"]: c for c in json.loads(doctor.out)["checks"]}
        assert checks["ssh"]["ok"], checks["ssh"]
        assert f"-p {server.port}" in checks["ssh"]["detail"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_port_is_named_as_such_not_as_a_missing_key(tmp_path, agent):
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# x\n"}))
    port = free_port()
    lap.init(agent, "--ssh", f"me@127.0.0.1:{port}")
    result = lap.run("sync")
    assert result.returncode == 3, result.err
    assert f"nothing accepts SSH connections at 127.0.0.1 port {port}" in result.err
    assert "ssh-copy-id" not in result.err and "Traceback" not in result.err
    doctor = lap.run("doctor", "--json", check=1)
    ssh = {c["name"]: c for c in json.loads(doctor.out)["checks"]}["ssh"]
    assert not ssh["ok"] and f"127.0.0.1 port {port}" in ssh["fix"] and "ssh-copy-id" not in ssh["fix"]
