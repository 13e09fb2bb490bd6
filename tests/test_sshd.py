"""The sshd test helper against real ssh, rsync and ssh-keygen."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import wait_until
from sshd import (SSHDError, SSHServer, descendants, generate_key, pid_alive, require_sshd,
                  running_sshd)

TIMEOUT = 30


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory):
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def control_dir():
    # ControlPath sockets must fit in sun_path (~104 bytes), so not under pytest's deep tmp_path.
    path = Path(tempfile.mkdtemp(prefix="pw"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ssh(server: SSHServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *server.ssh_options, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def multiplexing_options(control_dir: Path) -> list[str]:
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C",
            "-o", "ControlPersist=60"]


def test_echo_over_ssh(sshd_server: SSHServer):
    result = sshd_server.run("echo ok")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_client_config_exposes_alias_and_options(sshd_server: SSHServer):
    assert sshd_server.alias == "pwtest"
    assert sshd_server.ssh_options == ["-F", str(sshd_server.config_path)]
    assert sshd_server.port > 0
    known = sshd_server.known_hosts.read_text()
    assert known.startswith(f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 ")
    result = sshd_server.run("id -un")
    assert result.stdout.strip() == sshd_server.user


def test_rsync_is_on_the_remote_path(sshd_server: SSHServer):
    result = sshd_server.run("command -v rsync")
    assert result.returncode == 0 and result.stdout.strip().endswith("/rsync"), result.stderr


def test_rsync_copies_bytes_exactly(sshd_server: SSHServer, tmp_path: Path):
    src = tmp_path / "src"
    (src / "nested dir").mkdir(parents=True)
    files = {
        "binary.bin": bytes(range(256)) * 4096 + os.urandom(12345),
        "nested dir/text.txt": "héllo\r\nwörld\n".encode(),
        "empty": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    dest = tmp_path / "dest"  # same host, so the remote path is readable locally too
    result = subprocess.run(["rsync", "-a", "-e", sshd_server.ssh_command,
                             f"{src}/", f"{sshd_server.alias}:{dest}/"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name


def test_wrong_key_is_refused(sshd_server: SSHServer, tmp_path: Path):
    generate_key(tmp_path / "stranger", "not-authorized")
    config = sshd_server.write_client_config(tmp_path / "ssh_config", tmp_path / "stranger")
    result = subprocess.run(["ssh", "-F", str(config), sshd_server.alias, "echo ok"],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr
    assert result.stdout == ""


def test_multiplexed_connection_is_reused(sshd_server: SSHServer, control_dir: Path):
    mux = multiplexing_options(control_dir)
    try:
        first = ssh(sshd_server, *mux, sshd_server.alias, "echo $SSH_CONNECTION")
        later = [ssh(sshd_server, *mux, sshd_server.alias, "echo $SSH_CONNECTION") for _ in range(3)]
        assert first.returncode == 0, first.stderr
        assert ssh(sshd_server, *mux, "-O", "check", sshd_server.alias).returncode == 0
        # Sessions over one master share its TCP connection, hence the client's source port.
        assert {result.stdout for result in later} == {first.stdout}
        # How much faster it is, is measured by bench/ssh_mux.py, not asserted here.
    finally:
        exited = ssh(sshd_server, *mux, "-O", "exit", sshd_server.alias)
    assert exited.returncode == 0, exited.stderr
    # The master unlinks its socket just after answering -O exit.
    wait_until(lambda: not any(control_dir.iterdir()), timeout=5, what="the master to unlink its socket")


def test_stop_leaves_no_sshd_processes(tmp_path: Path, control_dir: Path):
    require_sshd()
    server = SSHServer.start(tmp_path)
    print(f"sshd started in {server.start_seconds * 1000:.0f} ms")
    mux = multiplexing_options(control_dir)
    try:
        # A persisted master keeps a per-connection sshd alive that stop() must also end.
        assert ssh(server, *mux, server.alias, "true").returncode == 0
        session_pids = descendants(server.pid)
        assert session_pids, "the persisted master should hold a per-connection sshd"
    finally:
        server.stop()
        ssh(server, *mux, "-O", "exit", server.alias)
    assert server.process.returncode is not None
    assert not pid_alive(server.pid)
    assert not any(pid_alive(pid) for pid in session_pids)
    server.stop()  # idempotent


def test_start_failure_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    require_sshd()
    monkeypatch.setattr("sshd.SSHD_CONFIG", "NoSuchDirective yes\n")
    with pytest.raises(SSHDError, match="NoSuchDirective"):
        SSHServer.start(tmp_path)
