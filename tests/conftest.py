"""Fixtures that start real things: git repos under a neutral HOME, the real agent as a
process on 127.0.0.1:0, the laptop CLI as a process, and the stand-in `claude`.

The AI is the only stand-in: tests/stand_in_claude.py speaks Claude Code's stream-json and
does what the prompt's `#pw-script` line says (see `script()`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
STAND_IN = TESTS / "stand_in_claude.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

import patchwire  # noqa: E402
import patchwire_agent  # noqa: E402

try:
    import tomllib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]
import tomli_w  # noqa: E402

STAND_IN_COMMAND = [sys.executable, str(STAND_IN), "--print", "--output-format", "stream-json",
                    "--verbose", "--permission-mode", "acceptEdits"]

# PATCHWIRE_TEST_PYTHON=/path/to/python3.9 runs the suite against the BUILT zipapps under that
# interpreter (.ci/run does it for 3.9 and 3.13); by default the modules run under this Python.
TEST_PYTHON = os.environ.get("PATCHWIRE_TEST_PYTHON")


def program_argv(name: str) -> List[str]:
    """argv of the laptop CLI ("patchwire") or the agent ("patchwire-agent")."""
    if not TEST_PYTHON:
        return [sys.executable, str(ROOT / (name.replace("-", "_") + ".py"))]
    from zipapps import _build
    failure = _build()
    assert not failure, failure
    return [TEST_PYTHON, str(ROOT / "dist" / name)]


def wait_until(predicate, timeout: float = 60, what: str = "condition"):
    """Poll `predicate` until it returns something true; that value. A test waits on a
    condition, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------ environment


@pytest.fixture(autouse=True)
def neutral_env(tmp_path_factory, monkeypatch):
    """No user git config, no Patchwire token, a HOME of the test's own."""
    home = tmp_path_factory.mktemp("home")
    for key in list(os.environ):
        if key.startswith(("GIT_", "PATCHWIRE_")) or key in ("NO_COLOR", "PAGER"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))  # sync records, apply log
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("SHIV_ROOT", str(tmp_path_factory.getbasetemp() / "shiv"))
    return home


@pytest.fixture
def srv_place(monkeypatch):
    """A folder the test account (pw-walls, tests/test_box_walls.py) can reach, unlike pytest's
    tmp_path (root's, mode 700), with the HOME of the laptop CLI and of Patchwire's state
    (the sync record, the undo log) in it."""
    path = Path(tempfile.mkdtemp(prefix="pw-srv-", dir="/srv" if os.access("/srv", os.W_OK) else None))
    os.chmod(path, 0o755)
    home = path / "home"
    home.mkdir()
    for key, value in {"HOME": home, "XDG_CACHE_HOME": home / ".cache",
                       "XDG_STATE_HOME": home / ".local/state"}.items():
        monkeypatch.setenv(key, str(value))
    yield path
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)  # the tests' read-only folders
    shutil.rmtree(path, ignore_errors=True)


def git(repo: Path, *args: str, input: Optional[bytes] = None) -> str:
    out = subprocess.run(["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com",
                          "-c", "init.defaultBranch=main", *args], cwd=repo, input=input,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if out.returncode:
        raise AssertionError(f"git {args} failed: {out.stderr.decode()}")
    return out.stdout.decode("utf-8", "surrogateescape")


def write_config(root: Path, text: str) -> None:
    """A project's .patchwire.toml written by hand, as its user would, then trusted as
    `patchwire trust` does (a file `init` did not write is refused until it is)."""
    path = root / ".patchwire.toml"
    path.write_text(text)
    patchwire.Trust.record(path, tomllib.loads(text))


def make_repo(path: Path, files: Dict[str, bytes], commit: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    if commit and files:
        git(path, "add", "-A")
        git(path, "commit", "-qm", "initial")
    return path


def snapshot_tree(root: Path, skip: Sequence[str] = (".git",)) -> Dict[str, tuple]:
    """{relative path: (kind, executable, bytes or link target)} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if name in skip:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", False, os.readlink(full))
            else:
                out[rel] = ("file", bool(st.st_mode & 0o100), Path(full).read_bytes())
    return out


def tree_digest(root: Path, skip: Sequence[str] = (".git",)) -> str:
    return hashlib.sha256(repr(sorted(snapshot_tree(root, skip).items())).encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def script(*steps: dict, text: str = "do the scripted work") -> str:
    """A prompt the stand-in claude executes step by step."""
    return f"{text}\n#pw-script {json.dumps(list(steps))}\n"


# ------------------------------------------------------------------ the agent, as a process

# The agent's CLI from this checkout's source, for commands that need no running agent
AGENT = [sys.executable, str(ROOT / "patchwire_agent.py")]


def agent_source(*args: str) -> subprocess.CompletedProcess:
    """`patchwire-agent ARGS` from source, output as text (init, doctor and the like)."""
    return subprocess.run(AGENT + list(args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


class AgentProcess:
    """The real `patchwire-agent serve` on 127.0.0.1:0, configured by `init` then edited."""

    def __init__(self, workdir: Path, ai_command: Sequence[str], *, users: Sequence[str] = ("alice",),
                 ai: Optional[dict] = None, jobs: Optional[dict] = None, server: Optional[dict] = None,
                 program: Optional[Sequence[str]] = None, env: Optional[dict] = None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "agent.toml"
        self.program = list(program or program_argv("patchwire-agent"))
        self.env = {**os.environ, **(env or {})}
        self.tokens: Dict[str, str] = {}
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self._write_config(users, ai_command, ai or {}, jobs or {}, server or {})

    def _write_config(self, users, ai_command, ai, jobs, server) -> None:
        first = users[0]
        token_file = self.workdir / f"{first}.token"
        code = patchwire_agent.main(["init", "-c", str(self.config), "--user", first,
                                     "--token-file", str(token_file), "--listen", "127.0.0.1:0"])
        assert code == 0
        self.tokens[first] = token_file.read_text().strip()
        data = tomllib.loads(self.config.read_text())
        for name in users[1:]:
            self.tokens[name] = f"pw_test_token_{name}"
            data["users"][name] = {"token_sha256": patchwire_agent.token_digest(self.tokens[name]).hex()}
        # unconfined unless a test asks: these tests watch the AI's pids and files it writes
        # beside the job folder; confinement has its own tests (test_sandbox.py)
        data["ai"].update({"command": list(ai_command), "sandbox": "none", **ai})
        data["jobs"].update(jobs)
        # tests stop agents with jobs still running: cancel them at once, as before 0.3
        data["server"].update({"shutdown_grace_s": 0, **server})
        self.config.write_text(tomli_w.dumps(data))
        self.state_dir = Path(data["server"]["state_dir"])

    def cli(self, *args: str, check: Optional[int] = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """`patchwire-agent ARGS -c CONFIG` as this agent runs (its program and environment),
        output as text; `check`: the exit status it must end with."""
        proc = subprocess.run(self.program + list(args) + ["-c", str(self.config)], capture_output=True, text=True,
                              timeout=60, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stderr}"
        return proc

    @property
    def token(self) -> str:
        return next(iter(self.tokens.values()))

    def token_file(self, user: str = "alice") -> Path:
        path = self.workdir / f"{user}.token"
        path.write_text(self.tokens[user] + "\n")
        return path

    def start(self) -> "AgentProcess":
        self.log = open(self.workdir / "agent.log", "ab")
        self.proc = subprocess.Popen(self.program + ["serve", "-c", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=self.log, env=self.env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listening on " not in line:
            self.proc.kill()
            raise AssertionError(f"agent did not start: {line!r}\n{self.read_log()}")
        self.url = line.split("listening on ")[1].strip()
        return self

    def read_log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    # --- talking to it with a real HTTP client

    def request(self, method: str, path: str, body=None, token: Optional[str] = "default",
                headers: Optional[dict] = None, timeout: float = 30):
        """(status, headers, body bytes) for any answer, errors included."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", "Bearer " + (self.token if token == "default" else token))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, method: str, path: str, body=None, **kw):
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def wait_job(self, job: str, until=("done", "failed", "cancelled"), timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, info = self.json("GET", f"/v1/jobs/{job}")
            if info.get("status") in until:
                return info
            time.sleep(0.05)
        raise AssertionError(f"job {job} still {info.get('status')} after {timeout}s")

    def events(self, job: str, after: int = 0) -> List[dict]:
        _, _, data = self.request("GET", f"/v1/jobs/{job}/events?after={after}&follow=0")
        return [json.loads(l) for l in data.splitlines() if l.strip()]


@pytest.fixture
def make_agent(tmp_path):
    agents: List[AgentProcess] = []

    def factory(ai_command: Sequence[str] = STAND_IN_COMMAND, start: bool = True, **kw) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"box{len(agents)}", ai_command, **kw)
        agents.append(agent)
        return agent.start() if start else agent
    yield factory
    for agent in agents:
        agent.stop()


@pytest.fixture
def agent(make_agent) -> AgentProcess:
    return make_agent()


# ------------------------------------------------------------------ the laptop CLI, as a process


class Laptop:
    """A project folder on the 'laptop' and the patchwire CLI run in it."""

    def __init__(self, root: Path, program: Optional[Sequence[str]] = None, env: Optional[dict] = None):
        self.root = root
        self.program = list(program or program_argv("patchwire"))
        self.env = {**os.environ, **(env or {})}

    def run(self, *args: str, input: bytes = b"", timeout: float = 120, env: Optional[dict] = None,
            check: Optional[int] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.program + list(args), cwd=self.root, input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                              env={**self.env, **(env or {})})
        proc.out = proc.stdout.decode("utf-8", "replace")
        proc.err = proc.stderr.decode("utf-8", "replace")
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.err}\n{proc.out}"
        return proc

    def init(self, agent: AgentProcess, *extra: str, user: str = "alice") -> None:
        self.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file(user)), *extra,
                 check=0)

    def ask(self, prompt: str, *extra: str, **kw) -> subprocess.CompletedProcess:
        return self.run("ask", prompt, *extra, **kw)

    def last_job(self) -> str:
        return patchwire.Project(self.root, "any").state_file("last_job").read_text().strip()


@pytest.fixture
def laptop(tmp_path, agent) -> Laptop:
    """A committed git repo with a few files, set up against `agent`."""
    root = make_repo(tmp_path / "laptop", {
        "README.md": b"# demo\n", "src/app.py": b"print('hello')\n", ".gitignore": b"build/\n"})
    lap = Laptop(root)
    lap.init(agent)
    return lap


EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's tree of no files


def ask_body(lap: Optional[Laptop], prompt: str, extra_paths: Sequence[str] = (), project: str = "laptop",
             **fields) -> dict:
    """The body of POST /v1/ask, computed the way the CLI does it: the tree and manifest of the
    files `lap` would sync, with `extra_paths` recorded too whatever the rules say. Without a
    laptop: an empty project, which needs no rsync. "laptop" is the project name the CLI derives
    from the `laptop` fixture's folder name."""
    if lap is None:
        return {"project": project, "tree": EMPTY_TREE, "files": [], "prompt": prompt, **fields}
    files = patchwire.Project(lap.root, project)
    paths, _ = files.file_list(patchwire.DEFAULT_DENY, [])
    tree, manifest = files.record_paths(sorted(set(paths) | set(extra_paths)))
    return {"project": project, "tree": tree, "files": manifest, "prompt": prompt, **fields}


def drive_pty(lap: Laptop, args: Sequence[str], answers: Sequence[str], prompts: Sequence[bytes],
              timeout: float = 60) -> str:
    """Run the CLI on a real pseudo-terminal and send each answer when one more prompt (any of
    `prompts`) has appeared; returns everything the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, with the pty as its terminal
        os.chdir(lap.root)
        os.execvpe(lap.program[0], lap.program + list(args), {"PAGER": "cat", **lap.env, "TERM": "dumb"})
    out, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if answered < len(answers) and sum(out.count(p) for p in prompts) > answered:
                os.write(fd, answers[answered].encode() + b"\n")
                answered += 1
    finally:
        os.waitpid(pid, 0)
    return out.decode("utf-8", "replace")


def queue_one_job(agent, job_id: str = "mac123") -> str:
    """One queued job of alice's on a one-file snapshot, for a test that is its own worker."""
    repo = agent.repo("alice", "demo")
    repo.ensure()
    (repo.mirror / "a.txt").write_bytes(b"a\n")
    with repo.open_mirror() as fd:
        git = repo.snapshot_git(fd)
        git("update-index", "--add", "a.txt")
        tree = git.text("write-tree")
        entries = git.ls_files_stage()
    snapshot = repo.snapshot(tree, [(m, s, p) for p, (m, s) in entries.items()])
    agent.store.create_job({"id": job_id, "user": "alice", "project": "demo", "prompt": "x", "status": "queued",
                            "created": time.time(), "snapshot": snapshot, "tree": tree, "timeout_s": 60,
                            "parent": None})
    agent.queue.put(patchwire_agent.QueueItem(job_id, "alice", "demo"))
    return job_id


# ------------------------------------------------------------------ a really full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs, mounted for the test: a really full file system. Root only; outside CI
    a test without root skips, in CI it fails."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=700", "tmpfs", str(mount)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        message = f"cannot mount a small tmpfs: {proc.stdout.decode().strip()}"
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; the file that does it."""
    filler = folder / "filler"
    # unbuffered: a buffered file's close() would flush what a partial write left over, and
    # raise ENOSPC itself (it did, when the free space was not a multiple of the chunk)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return filler
