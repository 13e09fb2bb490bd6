"""Sync over SSH with real parts: a real sshd on 127.0.0.1 (tests/sshd.py), the real rsync and
ssh clients, the real agent process and the laptop CLI as a process.

The laptop's .patchwire.toml names the box as `ssh = "pwtest"` (the alias of the test server's
ssh_config) and passes `[sync] ssh_options = ["-F", <ssh_config>]`, exactly as a user whose
server needs its own ssh settings would. Each test gets its own sshd, so an SSH master
connection (ControlPersist) left by one test can never carry another test's traffic.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

import patchwire
from conftest import Laptop, make_repo, script, snapshot_tree, tomli_w, tomllib, tree_digest, wait_until, write_config
from sshd import SSHServer, generate_key, running_sshd

pytestmark = pytest.mark.slow

SSH_TIMEOUT = 30

FILES = {
    "README.md": b"# over ssh\n",
    "src/app.py": b"print('hello')\r\nprint('crlf kept')\r\n",
    "gone.txt": b"delete me\n",
    "docs/with space/na\u00efve.txt": b"spaces and UTF-8 in the path\n",
    ".gitignore": b"build/\n",
}
SECRETS = {".env": b"API_KEY=supersecret-over-ssh\n", "certs/box.pem": b"-----BEGIN PRIVATE KEY-----\n"}
IGNORED = {"build/out.o": b"\x7fELF object"}


# ------------------------------------------------------------------ helpers


@pytest.fixture
def sshd(tmp_path):
    with running_sshd(tmp_path / "sshd") as server:
        try:
            yield server
        finally:
            close_master(server)


def control_path(server: SSHServer, options: List[str] = ()) -> List[str]:
    """ssh options naming the ControlPath patchwire uses, for `ssh -O check|exit`."""
    options = list(options or server.ssh_options)
    return [*options, "-o", f"ControlPath={patchwire.control_socket(['ssh', *options], server.alias)}"]


def master(server: SSHServer, command: str, options: List[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *control_path(server, options), "-O", command, server.alias],
                          capture_output=True, text=True, timeout=SSH_TIMEOUT, stdin=subprocess.DEVNULL)


def close_master(server: SSHServer) -> None:
    master(server, "exit")


def control_sockets() -> Dict[str, int]:
    """{name: inode} of the sockets in patchwire's control folder."""
    folder = Path(patchwire.control_dir())
    return {p.name: p.stat().st_ino for p in folder.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)}


def write_sync_options(lap: Laptop, **sync) -> None:
    path = lap.root / ".patchwire.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("sync", {}).update(sync)
    write_config(lap.root, tomli_w.dumps(data))


def ssh_laptop(tmp_path: Path, agent, server: SSHServer, ssh: str = "", options: List[str] = ()) -> Laptop:
    """A committed project with secrets and ignored files, configured to sync over SSH."""
    root = make_repo(tmp_path / "laptop", FILES)
    for rel, data in {**SECRETS, **IGNORED}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    lap = Laptop(root)
    lap.init(agent, "--ssh", ssh or server.alias)
    write_sync_options(lap, ssh_options=list(options or server.ssh_options))
    return lap


def mirror_of(agent, project: str = "laptop") -> Path:
    return agent.state_dir / "users" / "alice" / "mirror" / project


def listed(lap: Laptop) -> set:
    return set(json.loads(lap.run("sync", "--dry-run", "--json", check=0).out)["files"])


def laptop_files(lap: Laptop) -> Dict[str, bytes]:
    """{path: bytes} of what `patchwire sync` sends from the laptop."""
    return {rel: (lap.root / rel).read_bytes() for rel in listed(lap)}


def files_under(folder: Path) -> Dict[str, bytes]:
    return {rel: data for rel, (_, _, data) in snapshot_tree(folder).items()} if folder.exists() else {}


# ------------------------------------------------------------------ the loop over SSH


def test_sync_and_ask_round_trip_over_ssh(tmp_path, agent, sshd):
    lap = ssh_laptop(tmp_path, agent, sshd)
    config = tomllib.loads((lap.root / ".patchwire.toml").read_text())
    assert config["ssh"] == "pwtest" and config["sync"]["ssh_options"] == sshd.ssh_options

    # the listed files: the project's own, not its .patchwire.toml (Patchwire's, not the project's)
    assert listed(lap) == set(FILES)
    lap.run("sync", check=0)
    mirror = mirror_of(agent)
    # exactly the listed files, byte for byte; no secret and no ignored file went over the wire
    sent = laptop_files(lap)
    assert set(sent) == set(FILES)
    assert files_under(mirror) == sent
    assert not (mirror / ".env").exists() and not (mirror / "certs").exists()
    assert not (mirror / "build").exists()

    # a local edit after the sync: the ask syncs it over SSH again, and the box's snapshot
    # must equal the laptop's tree (the agent answers 409 otherwise)
    (lap.root / "README.md").write_bytes(b"# over ssh, edited before the ask\n")
    result = lap.ask(script(
        {"write": "src/app.py", "text": "print('hello')\r\nprint('edited by the AI')\r\n"},
        {"write": "src/new module.bin", "b64": "AAEC/w=="},
        {"delete": "gone.txt"},
        {"say": "Done over ssh."},
    ), "--yes", check=0)
    assert "Done over ssh." in result.err
    assert "applied job" in result.err and "3 file(s) changed" in result.err
    root = lap.root
    assert (root / "src/app.py").read_bytes() == b"print('hello')\r\nprint('edited by the AI')\r\n"
    assert (root / "src/new module.bin").read_bytes() == b"\x00\x01\x02\xff"
    assert not (root / "gone.txt").exists()
    assert (root / "README.md").read_bytes() == b"# over ssh, edited before the ask\n"
    for rel, data in SECRETS.items():
        assert (root / rel).read_bytes() == data
    # the mirror holds what the ask sent (the AI worked in a job folder, never in the mirror)
    assert files_under(mirror) == {**sent, "README.md": b"# over ssh, edited before the ask\n"}

    # the next ask sends the applied result; the deleted file goes from the mirror too
    lap.ask(script({"say": "nothing"}), "--yes", check=0)
    expected = laptop_files(lap)
    assert "gone.txt" not in expected and "src/new module.bin" in expected
    assert files_under(mirror) == expected
    assert not any(b"supersecret" in data for data in files_under(mirror).values())


def test_ssh_config_path_with_spaces(tmp_path, agent, sshd):
    # macOS users keep configs in folders like "Application Support": the -e value must quote
    # the option so rsync splits it back into the same words.
    spaced = tmp_path / "ssh settings dir" / "my config"
    spaced.parent.mkdir()
    shutil.copy(sshd.config_path, spaced)
    spaced.chmod(0o600)
    lap = ssh_laptop(tmp_path, agent, sshd, options=["-F", str(spaced)])
    try:
        lap.run("sync", check=0)
        assert files_under(mirror_of(agent)) == laptop_files(lap)
    finally:
        master(sshd, "exit", options=["-F", str(spaced)])


# ------------------------------------------------------------------ multiplexing


def test_sync_leaves_a_master_connection_that_the_next_sync_reuses(tmp_path, agent, sshd):
    lap = ssh_laptop(tmp_path, agent, sshd)
    before = control_sockets()
    lap.run("sync", check=0)
    folder = Path(patchwire.control_dir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    new = set(control_sockets()) - set(before)
    assert len(new) == 1, f"expected one new control socket in {folder}, got {sorted(new)}"
    first = {n: i for n, i in control_sockets().items() if n in new}
    check = master(sshd, "check")
    assert check.returncode == 0 and "Master running" in check.stderr, check.stderr
    pid_line = check.stderr.strip()

    # From now on no new SSH connection can log in: only the master can carry the next sync.
    (sshd.tmpdir / "authorized_keys").write_text("")
    fresh = sshd.run("true", extra_options=["-o", "ControlPath=none"])
    assert fresh.returncode == 255 and "Permission denied" in fresh.stderr

    (lap.root / "README.md").write_bytes(b"# second sync, through the master\n")
    lap.run("sync", check=0)
    assert (mirror_of(agent) / "README.md").read_bytes() == b"# second sync, through the master\n"
    assert master(sshd, "check").stderr.strip() == pid_line
    assert {n: i for n, i in control_sockets().items() if n in new} == first

    closed = master(sshd, "exit")
    assert closed.returncode == 0, closed.stderr
    # `-O exit` returns once the master has the request; it unlinks its socket just after
    wait_until(lambda: not set(control_sockets()) & new, timeout=10, what="the master's socket to go")
    assert master(sshd, "check").returncode != 0


def test_many_files_go_by_two_rsyncs_at_once_through_the_master(tmp_path, agent, sshd):
    """A sync of RSYNC_SPLIT_MIN_FILES files or more runs RSYNC_STREAMS rsyncs at once, each a
    contiguous part of the list: together they send exactly the listed files, byte for byte,
    over SSH (the second may find the first's master not up yet: it logs in on its own), and
    the sync counts what both sent."""
    count = patchwire.RSYNC_SPLIT_MIN_FILES + 105
    many = {f"lib/part_{i // 100:02d}/f{i:04d}.dart": f"// {i}\n".encode() * (i % 7 + 1) for i in range(count)}
    lap = Laptop(make_repo(tmp_path / "laptop", {**FILES, **many}))
    lap.init(agent, "--ssh", sshd.alias)
    calls = tmp_path / "calls"
    calls.mkdir()
    wrapper = tmp_path / "rsync-tee"
    wrapper.write_text(f'#!/bin/sh\ntee "{calls}/$$" | rsync "$@"\n')  # keeps each rsync's list of files
    wrapper.chmod(0o755)
    write_sync_options(lap, ssh_options=list(sshd.ssh_options), rsync=str(wrapper))

    def parts() -> List[List[str]]:
        found = [sorted(p.read_bytes().decode().split("\0")[:-1]) for p in calls.iterdir()]
        for p in calls.iterdir():
            p.unlink()
        return sorted(found)

    out = lap.run("sync", check=0)
    total = count + len(FILES)
    assert f"synced {total} of {total} file(s)" in out.err, out.err
    first, second = parts()
    assert first and second and first[-1] < second[0]  # contiguous parts of the sorted list
    assert sorted(first + second) == sorted(listed(lap))
    assert files_under(mirror_of(agent)) == laptop_files(lap)

    # a branch-switch-sized change: the changes go by two rsyncs too
    for i, rel in enumerate(sorted(many)):
        if i % 100 < 95:
            (lap.root / rel).write_bytes(b"// switched\n" * (i % 5 + 1))
    out = lap.run("sync", check=0)
    assert f"synced {count - 11 * 5} of {total} file(s)" in out.err, out.err
    assert [len(p) for p in parts()] == [(count - 55) // 2, (count - 55) - (count - 55) // 2]
    assert files_under(mirror_of(agent)) == laptop_files(lap)


# ------------------------------------------------------------------ broken SSH setups


# each breakage: (ssh destination, ssh options, what ssh says, what the hint must say)
def wrong_user(tmp_path, server):
    return "nobody@" + server.alias, server.ssh_options, "Permission denied", "ssh-copy-id nobody@pwtest"


def host_key_mismatch(tmp_path, server):
    # the laptop's known_hosts pins another key for this host:port
    other = generate_key(tmp_path / "other_host_key", "not-the-server").split()
    known = tmp_path / "wrong_known_hosts"
    known.write_text(f"[{server.address}]:{server.port} {other[0]} {other[1]}\n")
    config = tmp_path / "ssh_config_wrong_key"
    config.write_text(server.config_path.read_text().replace(str(server.known_hosts), str(known)))
    config.chmod(0o600)
    return server.alias, ["-F", str(config)], "Host key verification failed", "host key is unknown or has changed"


def sshd_stopped(tmp_path, server):
    server.stop()
    return server.alias, server.ssh_options, "Connection refused", "nothing accepts SSH connections at pwtest:"


def unknown_host(tmp_path, server):
    # a host the ssh_config does not describe; "localhost" resolves from /etc/hosts (no DNS
    # query leaves the machine) to 127.0.0.1:22, where no sshd listens
    return "localhost", server.ssh_options, "Connection refused", "nothing accepts SSH connections at localhost:"


@pytest.mark.parametrize("breakage", [wrong_user, host_key_mismatch, sshd_stopped, unknown_host],
                         ids=lambda f: f.__name__)
def test_broken_ssh_setup_is_a_clear_exit_3(tmp_path, agent, sshd, breakage):
    lap = ssh_laptop(tmp_path, agent, sshd)
    ssh, options, ssh_says, fix = breakage(tmp_path, sshd)
    lap.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file()),
            "--ssh", ssh, check=0)
    write_sync_options(lap, ssh_options=options)
    before = tree_digest(lap.root)
    state = lap.root / ".git" / "patchwire"
    result = lap.run("sync")
    assert result.returncode == 3, result.err
    assert "Traceback" not in result.err
    assert "rsync failed" in result.err and ssh_says in result.err, result.err
    assert fix in result.err, result.err
    assert tree_digest(lap.root) == before
    assert not (state / "last_sync.json").exists()
    assert files_under(mirror_of(agent)) == {}
    # the ask stops at the same place, before the agent queues anything
    asked = lap.ask(script({"write": "README.md", "text": "never\n"}), "--yes")
    assert asked.returncode == 3 and "rsync failed" in asked.err and "Traceback" not in asked.err
    assert not (state / "last_job").exists()
    assert tree_digest(lap.root) == before


def test_broken_ssh_hint_names_the_ssh_options(tmp_path, agent, sshd):
    lap = ssh_laptop(tmp_path, agent, sshd, ssh="nobody@" + sshd.alias)
    result = lap.run("sync")
    assert result.returncode == 3
    assert f"ssh {shlex.join(sshd.ssh_options)} nobody@{sshd.alias}" in result.err


# ------------------------------------------------------------------ rsync's command line

# Options that macOS's rsync 2.6.9, openrsync (macOS 15.4+) and rsync 3 all accept.
PORTABLE = {"-a", "--files-from=-", "--from0", "--stats", "--checksum", "-e"}


def laptop_config(tmp_path, **data) -> patchwire.LaptopConfig:
    return patchwire.LaptopConfig(tmp_path, {"agent": "http://127.0.0.1:1", **data},
                                  tmp_path / ".patchwire.toml")


@pytest.mark.parametrize("checksum", [False, True])
def test_rsync_argv_uses_only_portable_options(tmp_path, checksum):
    cfg = laptop_config(tmp_path, ssh="me@box", sync={"ssh_options": ["-F", "/cfg dir/ssh config",
                                                                      "-p", "2222"]})
    argv = patchwire.rsync_argv(cfg, "/srv/mirror/me/proj", checksum=checksum)
    assert argv[0] == "rsync"
    assert argv[-2:] == ["./", "me@box:/srv/mirror/me/proj/"]
    e_value = argv[argv.index("-e") + 1]
    options = [a for a in argv[1:-2] if a != e_value]
    expected = ["-a", "--files-from=-", "--from0", "--stats"] + (["--checksum"] if checksum else []) + ["-e"]
    assert options == expected
    assert set(options) <= PORTABLE
    words = shlex.split(e_value)
    assert words[0] == "ssh"
    assert words[1:5] == ["-F", "/cfg dir/ssh config", "-p", "2222"]
    settings = dict(w.split("=", 1) for w in words[5:] if w != "-o")
    assert settings["BatchMode"] == "yes"
    assert settings["ControlMaster"] == "auto"
    assert settings["ControlPath"] == patchwire.control_socket(words[:5], "me@box")
    assert settings["ControlPath"].startswith(f"{patchwire.control_dir()}/%C-")
    assert int(settings["ControlPersist"]) > 0
    assert words[5::2] == ["-o"] * len(settings)


def test_rsync_argv_without_ssh_is_local(tmp_path):
    cfg = laptop_config(tmp_path, sync={"rsync": "/opt/bin/rsync"})
    argv = patchwire.rsync_argv(cfg, "/srv/mirror")
    assert argv == ["/opt/bin/rsync", "-a", "--files-from=-", "--from0", "--stats", "./", "/srv/mirror/"]


def test_missing_rsync_is_exit_1_with_a_fix(tmp_path, agent, sshd):
    lap = ssh_laptop(tmp_path, agent, sshd)
    write_sync_options(lap, rsync="/nonexistent/rsync")
    before = tree_digest(lap.root)
    result = lap.run("sync")
    assert result.returncode == 1, result.err
    assert "/nonexistent/rsync is not installed" in result.err
    assert "install rsync" in result.err and "apt install rsync" in result.err
    assert "Traceback" not in result.err
    assert tree_digest(lap.root) == before
    assert files_under(mirror_of(agent)) == {}
