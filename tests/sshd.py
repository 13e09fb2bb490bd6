"""A real OpenSSH server on a loopback port, for tests.

`SSHServer.start(tmpdir)` generates everything inside `tmpdir`: a host key, a client key, an
`authorized_keys`, an `sshd_config`, a client `ssh_config` with the host alias `pwtest`, and a
`known_hosts` pinning the generated host key. It then runs `/usr/sbin/sshd -D -e` as a child
process (never daemonized, so `stop()` can end it) on a free port of 127.0.0.1 and waits until the
port accepts TCP connections.

Clients use it exactly as Patchwire's users use their servers:

    ssh -F <server.config_path> pwtest 'echo ok'
    rsync -a -e "ssh -F <server.config_path>" src/ pwtest:/tmp/dest/

Layout of `tmpdir`:

    host_ed25519[.pub]    the server's host key
    client_ed25519[.pub]  the only key in authorized_keys
    authorized_keys, sshd_config, sshd.pid, sshd.log (sshd's stderr)
    ssh_config, known_hosts

Commands over ssh run in a fresh login environment whose PATH is sshd's compiled-in default
(/usr/local/bin:/usr/bin:/bin:...), so /usr/bin/rsync is found without any SetEnv.

Nothing starts at import time and the module holds no mutable state: each `SSHServer` owns its
files and its process, so a test may run several at once. `stop()` also ends the per-connection
sshd processes (they call setsid(), so they are not in the listener's process group), which
matters when a client keeps a ControlMaster connection open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import random
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

# ---------------------------------------------------------------------------------------- constants

SSHD_PATH = "/usr/sbin/sshd"
HOST_ALIAS = "pwtest"
LOOPBACK = "127.0.0.1"
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
PORT_ATTEMPTS = 3
LOG_TAIL_CHARS = 2000
PORT_TAKEN = b"Address already in use"

MISSING_SSHD = (f"{SSHD_PATH} is not installed; install openssh-server "
                "(apt-get install openssh-server) to run the sshd tests")

SSHD_CONFIG = """\
ListenAddress {address}
Port {port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin {permit_root}
AllowUsers {user}
StrictModes no
UsePAM no
PrintMotd no
PrintLastLog no
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY yes
UseDNS no
MaxStartups 50
MaxSessions 50
Subsystem sftp internal-sftp
LogLevel ERROR
"""

SSH_CONFIG = """\
Host {alias}
    HostName {address}
    Port {port}
    User {user}
    IdentityFile {identity_file}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    UpdateHostKeys no
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
"""

# ---------------------------------------------------------------------------------------- helpers


class SSHDError(RuntimeError):
    """sshd could not be started; the message carries the tail of its log."""


def require_sshd() -> None:
    """Skip the calling test when sshd is missing, or fail it when CI=true."""
    if os.access(SSHD_PATH, os.X_OK):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(MISSING_SSHD)
    pytest.skip(MISSING_SSHD)


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (a server binds it soon after), below the
    range the kernel hands to outgoing connections: with two test workers, a port from bind(0)
    (in that range) was taken by another test's client before the agent bound it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default; macOS hands out 49152 and up
    for _ in range(200):
        port = random.randrange(10000, max(first, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=POLL_INTERVAL * 4):
            return True
    except OSError:
        return False


def generate_key(path: Path, comment: str) -> str:
    """Write an unencrypted ed25519 key pair at `path`; return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    return path.with_suffix(".pub").read_text().strip()


def write_private(path: Path, text: str) -> Path:
    """Write `text` readable by the owner only (ssh refuses group/world-writable configs)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


def children_by_parent() -> dict[int, list[int]]:
    """Map each pid to its child pids, read from /proc (empty where /proc is absent)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree = children_by_parent()
    found, pending = [], list(tree.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(tree.get(child, []))
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_pids(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# ---------------------------------------------------------------------------------------- server


@dataclasses.dataclass
class SSHServer:
    """One running sshd and the client files that reach it; see the module docstring."""

    tmpdir: Path
    port: int
    user: str
    process: subprocess.Popen
    alias: str = HOST_ALIAS
    address: str = LOOPBACK
    start_seconds: float = 0.0

    @property
    def config_path(self) -> Path:
        return self.tmpdir / "ssh_config"

    @property
    def ssh_options(self) -> list[str]:
        return ["-F", str(self.config_path)]

    @property
    def ssh_command(self) -> str:
        """The value for `rsync -e` (or any tool wanting one ssh command string)."""
        return shlex.join(["ssh", *self.ssh_options])

    @property
    def client_key(self) -> Path:
        return self.tmpdir / "client_ed25519"

    @property
    def host_key(self) -> Path:
        return self.tmpdir / "host_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.tmpdir / "known_hosts"

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "sshd.log"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, tmpdir: Path) -> SSHServer:
        """Generate keys and configs in `tmpdir`, start sshd, and wait until it listens."""
        tmpdir = Path(tmpdir).resolve()
        tmpdir.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        host_pub = generate_key(tmpdir / "host_ed25519", "patchwire-test-host")
        client_pub = generate_key(tmpdir / "client_ed25519", "patchwire-test-client")
        write_private(tmpdir / "authorized_keys", client_pub + "\n")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        log_path = tmpdir / "sshd.log"
        for _ in range(PORT_ATTEMPTS):
            log_size = log_path.stat().st_size if log_path.exists() else 0
            server = cls._launch(tmpdir, user, free_port())
            if server is not None:
                server.write_client_files(host_pub)
                return server
            with open(log_path, "rb") as log:
                log.seek(log_size)
                if PORT_TAKEN not in log.read():
                    break
        raise SSHDError(f"sshd exited at start; its log ({log_path}) ends with:\n"
                        f"{log_tail(log_path)}\nRun {SSHD_PATH} -t -f {tmpdir / 'sshd_config'} "
                        "to check the configuration.")

    @classmethod
    def _launch(cls, tmpdir: Path, user: str, port: int) -> SSHServer | None:
        """Start sshd on `port`; None if it exited early (e.g. someone took the port)."""
        config = write_private(tmpdir / "sshd_config", SSHD_CONFIG.format(
            address=LOOPBACK, port=port, host_key=tmpdir / "host_ed25519",
            pid_file=tmpdir / "sshd.pid", authorized_keys=tmpdir / "authorized_keys",
            permit_root="prohibit-password" if user == "root" else "no", user=user))
        began = time.monotonic()
        with open(tmpdir / "sshd.log", "ab") as log:
            process = subprocess.Popen([SSHD_PATH, "-D", "-e", "-f", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       cwd=tmpdir, start_new_session=True)
        server = cls(tmpdir=tmpdir, port=port, user=user, process=process)
        deadline = began + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return None
            if port_accepts(port):
                server.start_seconds = time.monotonic() - began
                return server
            time.sleep(POLL_INTERVAL)
        server.stop()
        raise SSHDError(f"sshd did not accept connections on {LOOPBACK}:{port} within "
                        f"{START_TIMEOUT:.0f} s; its log ({server.log_path}) ends with:\n"
                        f"{log_tail(server.log_path)}")

    def write_client_files(self, host_pub: str) -> None:
        key_type, key_data = host_pub.split()[:2]
        write_private(self.known_hosts, f"[{self.address}]:{self.port} {key_type} {key_data}\n")
        self.write_client_config(self.config_path, self.client_key)

    def write_client_config(self, path: Path, identity_file: Path) -> Path:
        """Write an ssh_config for this server with another identity (e.g. a wrong key)."""
        return write_private(Path(path), SSH_CONFIG.format(
            alias=self.alias, address=self.address, port=self.port, user=self.user,
            identity_file=identity_file, known_hosts=self.known_hosts))

    def run(self, cmd: str, timeout: float = COMMAND_TIMEOUT,
            extra_options: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on the server through the client config; output is captured as text."""
        argv = ["ssh", *self.ssh_options, *(extra_options or []), self.alias, cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """End the listener and every per-connection sshd it forked; idempotent."""
        sessions = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.terminate()
        signal_pids(sessions, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(pid_alive(pid) for pid in sessions) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        signal_pids([pid for pid in sessions if pid_alive(pid)], signal.SIGKILL)

    def __enter__(self) -> SSHServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_sshd(tmpdir: Path) -> Iterator[SSHServer]:
    """`with running_sshd(tmp_path) as server:` starts sshd and always stops it."""
    require_sshd()
    server = SSHServer.start(tmpdir)
    try:
        yield server
    finally:
        server.stop()
