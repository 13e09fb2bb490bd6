"""patchwire-agent: the box's side of Patchwire. Runs Claude Code on a clean checkout of a
synced project and returns a git diff.

Data flow for one ask:

    laptop rsyncs files     -> mirror/<user>/<project>/            (never the AI's cwd)
    POST /v1/ask            -> snapshot: a commit of exactly the files listed in the ask
                               (a private index over the mirror); 409 when its tree id
                               differs from the laptop's, naming the paths
                            -> fair queue (round robin over users)
                            -> a warm job folder (git worktree) moved to the snapshot,
                               cleaned and checked clean before the AI starts
                            -> [ai] command, prompt on stdin, own process group, timeout
                            -> events (NDJSON, numbered) stored as they happen
                            -> git add -A; git diff --cached --binary --full-index -M snap
                               -> stored patch, stats

Commands:
    patchwire-agent init -c CONFIG [--user NAME] [--token-file PATH]
        write a commented starter config with one user; print its token once
    patchwire-agent serve -c CONFIG
        run the HTTP server

HTTP API (JSON; `Authorization: Bearer TOKEN` on all but health):
    GET    /v1/health                       version, queue depth, whether the AI is found
    GET    /v1/me?project=P                 your user name and the folder to rsync P into
    POST   /v1/ask {project,tree,files,prompt[,timeout_s]}
                                            202 {job} or, with Accept: application/x-ndjson,
                                            the job's events streamed as they happen
    GET    /v1/jobs                         your jobs, newest first
    GET    /v1/jobs/{id}                    one job (a unique id prefix is enough)
    GET    /v1/jobs/{id}/events?after=N     its events after N (NDJSON, follows a live job)
    GET    /v1/jobs/{id}/diff               the patch, as bytes
    DELETE /v1/jobs/{id}                    cancel a queued or running job

Exit codes: 0 ok, 1 error (bad config, cannot listen), 2 usage.

Environment: the AI inherits the agent's environment minus PATCHWIRE_* and GIT_*
variables, plus `[ai] env`. Nothing from the laptop's environment reaches it.

Threat model: tokens are stored only as sha256 digests and compared in constant time;
the laptop reaches the box through SSH keys (rsync) and the bearer token (HTTP), ideally
inside a private network. Requests are size-capped and time-limited; connections are
capped. The AI never runs in the mirror, and a failed run leaves the mirror untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import patchwire as pw
from patchwire import Git, PatchwireError, UsageError

__version__ = pw.__version__
log = logging.getLogger("patchwire-agent")

# ================================================================== constants

DEFAULT_LISTEN = "127.0.0.1:7433"
CLAUDE_COMMAND = ["claude", "--print", "--output-format", "stream-json", "--verbose",
                  "--permission-mode", "acceptEdits"]
MAX_BODY = 64 * 1024 * 1024
MAX_CONNECTIONS = 64
MAX_CONNECTIONS_PER_CLIENT = 16
HEADER_TIMEOUT = 10  # seconds for a request line and headers, and between requests
CONNECTION_TIMEOUT = 60
KILL_GRACE_S = 5.0
HEARTBEAT_S = 15
MAX_EVENT_TEXT = 16 * 1024
TERMINAL = ("done", "failed", "cancelled")
LAST_EVENTS = ("finished", "failed", "cancelled")  # the event that ends a job's stream
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._/~+@-]+$")

AGENT_DESCRIPTION = ("the box's side of Patchwire: runs Claude Code on a clean checkout of a "
                     "synced project and returns a git diff")
AGENT_EPILOG = """\
typical use:  patchwire-agent init -c agent.toml --user alice   (prints alice's token once)
              patchwire-agent serve -c agent.toml
API: GET /v1/health, /v1/me, /v1/jobs[/ID[/events|/diff]]; POST /v1/ask; DELETE /v1/jobs/ID
exit codes: 0 ok, 1 error (bad config, cannot listen), 2 usage
"""

CONFIG_TEMPLATE = """\
# patchwire-agent configuration. Reference: README.md, "Agent config".

[server]
# host:port to listen on. Keep it on loopback or a private network (Tailscale).
{server}
[ai]
# The AI command (argv); the prompt arrives on stdin, the cwd is a clean job folder.
# Claude Code headless by default; any CLI that edits files in its cwd works.
{ai}
[jobs]
# workers: AI runs at once on this box; slots: warm job folders per user and project.
{jobs}
# One table per user. Only the sha256 of each token is stored here.
{users}"""


# ================================================================== errors


class HTTPFailure(PatchwireError):
    """An expected failure answered as a JSON error with its HTTP status."""

    def __init__(self, status: int, message: str, hint: str = "", code: str = "error", **details):
        super().__init__(message, hint, http_status=status, code=code, details=details)


# ================================================================== config

SERVER_SCHEMA = {"listen": (str, DEFAULT_LISTEN), "state_dir": (str, None)}
AI_SCHEMA = {"command": ("str_list", CLAUDE_COMMAND), "timeout_s": (int, 1800),
             "max_timeout_s": (int, 7200), "env": ("str_table", {}),
             "resume_args": ("str_list", ["--resume", "{session_id}"])}
JOBS_SCHEMA = {"workers": (int, 2), "slots": (int, 2)}
USER_SCHEMA = {"token_sha256": (str, None), "admin": (bool, False)}
TOP_SCHEMA = {"server": (dict, {}), "ai": (dict, {}), "jobs": (dict, {}), "users": (dict, {})}


class AgentConfig:
    """The agent's TOML config, validated: every error names the file and the key."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        top = pw.Schema(path, "", TOP_SCHEMA).read(data)
        server = pw.Schema(path, "server", SERVER_SCHEMA).read(top["server"])
        ai = pw.Schema(path, "ai", AI_SCHEMA).read(top["ai"])
        jobs = pw.Schema(path, "jobs", JOBS_SCHEMA).read(top["jobs"])
        self.host, self.port = parse_listen(path, server["listen"])
        state = Path(os.path.expanduser(server["state_dir"] or "patchwire-state"))
        self.state_dir = state if state.is_absolute() else (path.parent / state).resolve()
        if not SAFE_PATH_RE.match(str(self.state_dir)):
            raise PatchwireError(f"{path}: server.state_dir {str(self.state_dir)!r} has characters "
                                 "that remote shells would split", "use a path of letters, digits and ./_-")
        if not ai["command"]:
            raise PatchwireError(f"{path}: ai.command must not be empty")
        self.ai_command: List[str] = ai["command"]
        self.timeout_s: int = ai["timeout_s"]
        self.max_timeout_s: int = max(ai["max_timeout_s"], ai["timeout_s"])
        self.ai_env: Dict[str, str] = ai["env"]
        self.resume_args: List[str] = ai["resume_args"]
        self.workers: int = jobs["workers"]
        self.slots: int = jobs["slots"]
        self.users: Dict[str, bytes] = {}
        self.admins: Set[str] = set()  # users whose token also reads everyone's usage and metrics
        for name, table in top["users"].items():
            if not pw.NAME_RE.fullmatch(name):
                raise PatchwireError(f"{path}: user name {name!r} is not valid",
                                     "use letters, digits, '.', '_' and '-'")
            user = pw.Schema(path, f"users.{name}", USER_SCHEMA).read(table)
            digest = user["token_sha256"] or ""
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise PatchwireError(f"{path}: users.{name}.token_sha256 must be 64 hex digits",
                                     "create users with `patchwire-agent init`")
            self.users[name] = bytes.fromhex(digest)
            if user["admin"]:
                self.admins.add(name)

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        return cls(path, pw.load_toml(path))


def parse_listen(path: Path, listen: str) -> Tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise PatchwireError(f"{path}: server.listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# ================================================================== store (sqlite3 + files)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, project TEXT NOT NULL, prompt TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, created REAL NOT NULL, started REAL, finished REAL,
    snapshot TEXT, tree TEXT, timeout_s INTEGER, result TEXT, stats TEXT, parent TEXT,
    slot INTEGER, pgid INTEGER, last_seq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user, created);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (job, seq));
"""
JOB_FIELDS = ("id", "user", "project", "prompt", "status", "reason", "created", "started",
              "finished", "snapshot", "tree", "timeout_s", "result", "stats", "parent", "slot",
              "pgid", "last_seq")


class Store:
    """Jobs and their events in sqlite3, patches as files: all survive a restart.
    One connection, one lock; a condition wakes event streams when something is added."""

    def __init__(self, state_dir: Path):
        self.patch_dir = state_dir / "patches"
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(state_dir / "jobs.sqlite3"), check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA_SQL)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def create_job(self, job: dict) -> None:
        with self.lock:
            cols = ", ".join(job)
            self.db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(job))})",
                            [_to_sql(v) for v in job.values()])

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self.changed:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?",
                            [_to_sql(v) for v in fields.values()] + [job_id])
            self.changed.notify_all()

    def job(self, job_id: str) -> Optional[dict]:
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
        return _job_row(row) if row else None

    def find_jobs(self, user: str, prefix: str = "", limit: int = 100) -> List[dict]:
        with self.lock:
            rows = self.db.execute(
                f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE user = ? AND id LIKE ? "
                "ORDER BY created DESC LIMIT ?", (user, prefix.replace("%", "") + "%", limit)).fetchall()
        return [_job_row(r) for r in rows]

    def jobs_with_status(self, *statuses: str) -> List[dict]:
        with self.lock:
            rows = self.db.execute(
                f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE status IN "
                f"({', '.join('?' * len(statuses))}) ORDER BY created", statuses).fetchall()
        return [_job_row(r) for r in rows]

    def add_event(self, job_id: str, event: dict, **job_fields: Any) -> dict:
        """Append an event, and update the job's fields in the same transaction (so a client
        that sees `finished` also sees the job done)."""
        with self.changed:
            seq = self.db.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] + 1
            event = {"seq": seq, "job": job_id, "time": round(time.time(), 3), **event}
            fields = {**job_fields, "last_seq": seq}
            self.db.execute("BEGIN")
            try:
                self.db.execute("INSERT INTO events (job, seq, data) VALUES (?, ?, ?)",
                                (job_id, seq, json.dumps(event)))
                self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                                [_to_sql(v) for v in fields.values()] + [job_id])
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            self.changed.notify_all()
        return event

    def events(self, job_id: str, after: int) -> List[dict]:
        with self.lock:
            rows = self.db.execute("SELECT data FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                                   (job_id, after)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def patch_path(self, job_id: str) -> Path:
        return self.patch_dir / f"{job_id}.patch"

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _to_sql(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _job_row(row: tuple) -> dict:
    job = dict(zip(JOB_FIELDS, row))
    for key in ("result", "stats"):
        job[key] = json.loads(job[key]) if job[key] else None
    return job


# ================================================================== git: snapshots and job folders


class ProjectRepo:
    """One user's project on the box: the mirror the laptop rsyncs into, a private git dir
    holding snapshots, and warm job folders (worktrees), one per slot."""

    def __init__(self, state_dir: Path, user: str, project: str):
        self.mirror = state_dir / "mirror" / user / project
        self.home = state_dir / "projects" / user / project
        self.git_dir = self.home / "git"
        self.lock = threading.Lock()
        # no system or global config, no ~/.config/git/ignore: what the AI writes must not
        # vanish from the diff because of the box user's own excludes (any git version)
        empty_home = str(state_dir / "git-home")
        self.git_env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                        "HOME": empty_home, "XDG_CONFIG_HOME": empty_home}

    def git(self, work_tree: Optional[Path] = None, **env: str) -> Git:
        return Git(git_dir=self.git_dir, work_tree=work_tree, cwd=self.home, env={**self.git_env, **env})

    def ensure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.mirror.mkdir(parents=True, exist_ok=True)
        pw.prepare_private_git_dir(self.git_dir)

    # --- snapshots

    def snapshot(self, tree: str, manifest: List[Tuple[str, str, str]]) -> str:
        """A commit of exactly the listed files, as they are in the mirror. Files the laptop
        no longer lists are pruned from the mirror first (rsync --files-from never deletes)."""
        with self.lock:
            self.ensure()
            git = self.git(self.mirror, GIT_INDEX_FILE=str(self.home / "snapshot.index"))
            index_paths(git, [path for _, _, path in manifest], self.mirror)
            got = git.text("write-tree")
            if got != tree:
                theirs = {path: (mode, sha) for mode, sha, path in manifest}
                mine = git.ls_files_stage()
                differ = sorted(p for p in set(mine) | set(theirs) if mine.get(p) != theirs.get(p))
                named = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
                raise HTTPFailure(HTTPStatus.CONFLICT, f"the box's copy of the project differs from what the laptop "
                                  f"sent in {len(differ)} file(s): {named}", "sync again (patchwire sync --force)",
                                  code="tree_mismatch", paths=differ[:200])
            return git.text("commit-tree", got, "-m", "patchwire snapshot")

    # --- job folders

    def slot_path(self, slot: int) -> Path:
        return self.home / "slots" / f"slot{slot}"

    def slot_git(self, slot: int) -> Git:
        """Git for a job folder, through its own worktree git dir (never the folder's .git
        file, which the AI could rewrite)."""
        path = self.slot_path(slot)  # also the cwd: `git apply` reads paths relative to it
        return Git(git_dir=self.git_dir / "worktrees" / f"slot{slot}", work_tree=path,
                   cwd=path if path.is_dir() else self.home, env=self.git_env)

    def prepare_slot(self, slot: int, commit: str, carry: Optional[Tuple[str, str]] = None) -> Path:
        """Move the slot's warm worktree to `commit` (O(changed)); ignored files such as build
        caches survive, everything else is exactly the snapshot. A folder that cannot be made
        clean is thrown away and rebuilt. `carry` (base, result) brings an earlier job's
        change along, for a follow-up ask."""
        with self.lock:
            for attempt in (1, 2):
                try:
                    if not self._slot_is_registered(slot):
                        self._create_slot(slot, commit)
                    self._reset_slot(slot, commit)
                    self._check_slot_clean(slot, commit)
                    break
                except (PatchwireError, OSError) as e:
                    if attempt == 2:
                        raise PatchwireError(f"job folder {self.slot_path(slot)} cannot be made clean: {e}")
                    log.warning("job folder %s is not clean (%s); rebuilding it", self.slot_path(slot), e)
                    self._remove_slot(slot)
            if carry:
                self._carry(slot, *carry)
            return self.slot_path(slot)

    def _carry(self, slot: int, base: str, result: str) -> None:
        """Apply an earlier job's change (base..result) on top of the fresh snapshot, unless the
        snapshot already has it (the user applied it and synced)."""
        git = self.slot_git(slot)
        patch = git("diff", "--binary", "--full-index", "-M", "--no-ext-diff", "--no-textconv", base, result)
        if not patch or git.run("apply", "--check", "-R", "--index", "-", input=patch, check=False).returncode == 0:
            return
        applied = git.run("apply", "--index", "--3way", "-", input=patch, check=False)
        if applied.returncode != 0:
            self._reset_slot(slot, "HEAD")
            raise PatchwireError("the earlier job's change does not apply to the project as synced "
                                 "now: " + pw.describe_apply_failure(applied.stderr).strip(),
                                 "apply or drop that change on the laptop, then ask again")

    def _slot_is_registered(self, slot: int) -> bool:
        gitdir = self.git_dir / "worktrees" / f"slot{slot}"
        return self.slot_path(slot).is_dir() and (gitdir / "HEAD").is_file()

    def _create_slot(self, slot: int, commit: str) -> None:
        path = self.slot_path(slot)
        if path.exists():
            remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.git()("worktree", "prune")
        self.git()("worktree", "add", "--detach", "-f", str(path), commit)

    def _reset_slot(self, slot: int, commit: str) -> None:
        gitdir = self.git_dir / "worktrees" / f"slot{slot}"
        for lock in ("index.lock", "HEAD.lock"):
            (gitdir / lock).unlink() if (gitdir / lock).exists() else None
        dotgit = self.slot_path(slot) / ".git"
        if dotgit.is_dir() or dotgit.is_symlink():
            remove_tree(dotgit)
        dotgit.write_text(f"gitdir: {gitdir}\n")  # the AI may have rewritten it
        git = self.slot_git(slot)
        git("checkout", "-q", "-f", "--detach", commit)
        git("clean", "-q", "-ffd")

    def _check_slot_clean(self, slot: int, commit: str) -> None:
        git = self.slot_git(slot)
        if git.text("rev-parse", "HEAD") != commit:
            raise PatchwireError(f"job folder HEAD is not at {commit}")
        stray = git("ls-files", "-z", "--others", "--exclude-standard")
        changed = git.run("diff-files", "--quiet", check=False).returncode
        if stray or changed:
            raise PatchwireError("job folder not clean: " + (stray[:200].decode("utf-8", "replace")
                                                              or "tracked files differ"))

    def _remove_slot(self, slot: int) -> None:
        remove_tree(self.slot_path(slot))
        remove_tree(self.git_dir / "worktrees" / f"slot{slot}")
        self.git()("worktree", "prune")

    def clean_slot(self, slot: int) -> None:
        """Throw away what an interrupted run left in the job folder."""
        with self.lock:
            if self._slot_is_registered(slot):
                try:
                    self._reset_slot(slot, "HEAD")
                except PatchwireError:
                    self._remove_slot(slot)

    # --- results

    def collect(self, slot: int, snapshot: str, job_id: str) -> Tuple[bytes, dict, str]:
        """(patch, stats, result commit) of everything the AI changed in the job folder."""
        git = self.slot_git(slot)
        git("add", "-A")
        diff_args = ("diff", "--cached", "-M", "--no-ext-diff", "--no-textconv", "--no-color")
        patch = git(*diff_args, "--binary", "--full-index", snapshot)
        stats = parse_numstat(git(*diff_args, "--numstat", "-z", snapshot))
        result = git.text("commit-tree", git.text("write-tree"), "-p", snapshot, "-m", f"patchwire job {job_id}")
        self.git()("update-ref", f"refs/patchwire/jobs/{job_id}", result)
        return patch, stats, result


def index_paths(git: Git, paths: List[str], prune_root: Path) -> None:
    """Make the index hold exactly `paths`, then delete every other file from `prune_root`:
    rsync --files-from never deletes on the receiving side."""
    pw.set_index_paths(git, paths)
    for raw in git("ls-files", "-z", "--others").split(b"\0"):  # git's own walk: fast
        if raw:
            pw.remove_file(prune_root, raw.decode("utf-8", "surrogateescape"))


def parse_numstat(out: bytes) -> dict:
    """`git diff --numstat -z`: renames carry two NUL-terminated paths after the counts."""
    fields = out.split(b"\0")
    files = added = removed = binary = 0
    i = 0
    while i < len(fields):
        record = fields[i]
        i += 1
        if not record:
            continue
        plus, minus, path = record.split(b"\t", 2)
        if not path:
            i += 2
        files += 1
        if plus == b"-":
            binary += 1
        else:
            added += int(plus)
            removed += int(minus)
    return {"files": files, "added": added, "removed": removed, "binary": binary}


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with folders an AI made read-only."""
    def retry(func, target, _exc):
        for folder in (os.path.dirname(target), target):
            if not os.path.islink(folder):
                try:
                    os.chmod(folder, 0o700)
                except OSError:
                    pass
        func(target)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry)


# ================================================================== the AI run


class StreamParser:
    """Turns the AI's stdout into job events. JSON lines are read as Claude Code's
    stream-json (parsed by field, never by text); anything else is passed through."""

    def __init__(self, emit: Callable[[dict], None], cwd: Path):
        self.emit = emit
        self.cwd = str(cwd)
        self.result: Optional[dict] = None
        self.session_id: Optional[str] = None
        self.claude = False  # set by Claude Code's system/init line; other JSON passes through

    def feed(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("type") == "system" and obj.get("subtype") == "init":
            self.claude = True
        if not self.claude or not isinstance(obj, dict):
            self.emit({"type": "output", "text": clip(line)})
            return
        self.session_id = obj.get("session_id") or self.session_id
        handler = getattr(self, "on_" + str(obj["type"]), None)
        if handler:
            handler(obj)

    def on_system(self, obj: dict) -> None:
        if obj.get("subtype") == "init":
            self.emit({"type": "session", "session_id": obj.get("session_id"), "model": obj.get("model")})

    def on_assistant(self, obj: dict) -> None:
        for block in _content(obj):
            if block.get("type") == "text" and str(block.get("text", "")).strip():
                self.emit({"type": "text", "text": clip(block["text"])})
            elif block.get("type") == "tool_use":
                self.emit({"type": "tool", "name": block.get("name"),
                           "detail": self.tool_detail(block.get("input") or {})})

    def on_user(self, obj: dict) -> None:
        for block in _content(obj):
            if block.get("type") == "tool_result" and block.get("is_error"):
                self.emit({"type": "tool_error", "text": clip(_text_of(block.get("content")), 500)})

    def on_result(self, obj: dict) -> None:
        self.result = obj
        self.emit({"type": "result", **{k: obj.get(k) for k in RESULT_KEYS if k in obj}})

    def tool_detail(self, tool_input: dict) -> str:
        for key in ("file_path", "notebook_path", "command", "pattern", "path", "url", "description"):
            value = tool_input.get(key)
            if isinstance(value, str) and value:
                if value.startswith(self.cwd + "/"):
                    value = value[len(self.cwd) + 1:]
                return clip(value, 300)
        return ""


RESULT_KEYS = ("subtype", "is_error", "duration_ms", "num_turns", "session_id",
               "total_cost_usd", "usage")


def _content(obj: dict) -> List[dict]:
    content = (obj.get("message") or {}).get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return str(content or "")


def clip(text: str, limit: int = MAX_EVENT_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


class AIRun:
    """One run of the AI command in a job folder: its own process group, prompt on stdin,
    stdout parsed line by line, stderr's tail kept, ended by timeout or cancel (TERM to the
    whole group, KILL after a grace period)."""

    def __init__(self, argv: List[str], cwd: Path, env: dict, prompt: str, timeout_s: float,
                 emit: Callable[[dict], None], on_spawn: Callable[[int], None] = lambda pid: None):
        self.argv, self.cwd, self.env, self.prompt = argv, cwd, env, prompt
        self.on_spawn = on_spawn
        self.timeout_s = timeout_s
        self.parser = StreamParser(emit, cwd)
        self.stop_reason: Optional[str] = None
        self.proc = None
        self.stderr_tail = b""
        self.exit_code: Optional[int] = None
        self._lock = threading.Lock()

    def run(self) -> Tuple[str, str, dict]:
        """(status, reason, result): status is done, failed or cancelled."""
        try:
            with self._lock:
                if self.stop_reason:
                    return "cancelled", self.stop_reason, {}
                self.proc = pw.spawn(self.argv, cwd=self.cwd, env=self.env)
            self.on_spawn(self.proc.pid)
        except FileNotFoundError:
            return "failed", (f"the AI command {self.argv[0]!r} is not installed on the box or not "
                              "on the agent's PATH; install it or set [ai] command"), {}
        except OSError as e:
            return "failed", f"cannot start the AI command {self.argv[0]!r}: {e.strerror}", {}
        threads = [threading.Thread(target=f, daemon=True) for f in
                   (self._feed_stdin, self._read_stderr, self._read_stdout)]
        for t in threads:
            t.start()
        watchdog = threading.Timer(self.timeout_s, self.stop, (f"timed out after {self.timeout_s:g} s",))
        watchdog.daemon = True
        watchdog.start()
        try:
            code = self.exit_code = self.proc.wait()
        finally:
            watchdog.cancel()
        # whatever the AI left running in the background must not outlive the job (nor write
        # into its diff); it also holds the pipes open
        self._kill_group(self.proc)
        for t in threads:
            t.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        return self.judge(code)

    def stop(self, reason: str) -> None:
        """End the run: TERM to the process group, KILL after a grace period."""
        with self._lock:
            if self.stop_reason:
                return
            self.stop_reason = reason
            proc = self.proc
        if proc is None:
            return
        threading.Thread(target=self._kill_group, args=(proc,), daemon=True).start()

    @staticmethod
    def _kill_group(proc) -> None:
        """TERM the group; KILL whatever is still in it after the grace period."""
        deadline = time.monotonic() + KILL_GRACE_S
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                while sig == signal.SIGTERM and time.monotonic() < deadline:
                    time.sleep(0.05)
                    os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return

    def _feed_stdin(self) -> None:
        try:
            self.proc.stdin.write(self.prompt.encode("utf-8"))
        except OSError:
            pass  # the AI exited without reading its prompt; its exit status says why
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):
            self.stderr_tail = (self.stderr_tail + chunk)[-8192:]

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.parser.feed(line)

    def judge(self, code: int) -> Tuple[str, str, dict]:
        result = self.parser.result or {}
        if self.stop_reason:
            status = "failed" if self.stop_reason.startswith("timed out") else "cancelled"
            return status, self.stop_reason, result
        said = str(result.get("result") or "").strip()[:500]
        stderr = self.stderr_tail.decode("utf-8", "replace").strip()[-500:]
        if result.get("subtype") == "error_max_turns":
            return "failed", ("the AI stopped at its turn limit (--max-turns in [ai] command): ask "
                              "for a smaller step, or raise the limit"), result
        if result.get("is_error") or result.get("subtype", "success") != "success":
            return "failed", f"the AI reported an error: {said or result.get('subtype')}", result
        if code != 0:
            why = said or stderr or "no output"
            return "failed", f"the AI command exited with status {code}: {why}", result
        denials = [d for d in result.get("permission_denials") or [] if isinstance(d, dict)]
        if denials:
            return "failed", describe_denials(denials), result
        if self.parser.claude and not self.parser.result:
            return "failed", "the AI ended without a result line", result
        return "done", "", result


def end_process_group(pgid: Optional[int]) -> None:
    """After a crash: end an AI's process group that outlived the agent, if it still exists
    as a group (its leader alive and leading it)."""
    if not pgid:
        return
    try:
        if os.getpgid(pgid) == pgid:
            os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe_denials(denials: List[dict]) -> str:
    """Which tools (and shell commands) the AI was refused, and the --allowedTools rule."""
    tools = sorted({str(d.get("tool_name", "?")) for d in denials})
    commands = [str((d.get("tool_input") or {}).get("command", "")) for d in denials
                if d.get("tool_name") == "Bash" and (d.get("tool_input") or {}).get("command")]
    text = f"the AI was denied permission to use {', '.join(tools)}"
    if commands:
        first = commands[0].split()[0]
        text += (f" (for example `{clip(commands[0], 80)}`); allow it in [ai] command, for example "
                 f'"--allowedTools", "Bash({first}:*)"')
    else:
        text += '; allow it in [ai] command (for example "--allowedTools", "' + tools[0] + '")'
    return text


def ai_environment(cfg: AgentConfig) -> dict:
    """The agent's own environment, minus Patchwire's and git's variables, plus [ai] env."""
    return pw.clean_env(cfg.ai_env)


# ================================================================== fair queue


class QueueItem:
    __slots__ = ("job_id", "user", "project", "slot", "pin")

    def __init__(self, job_id: str, user: str, project: str, pin: Optional[int] = None):
        self.job_id, self.user, self.project = job_id, user, project
        self.pin = pin  # a follow-up runs in its parent's folder (Claude's session lives there)
        self.slot = -1  # the job folder claimed when the item leaves the queue


class FairQueue:
    """Round robin over users; within a user, first come first served. `take` skips jobs
    whose project has no free job folder, so one busy project never blocks the others."""

    def __init__(self):
        self.cond = threading.Condition()
        self.by_user: Dict[str, Deque[QueueItem]] = {}
        self.turn: List[str] = []  # users in round-robin order; the next one first
        self.closed = False

    def put(self, item: QueueItem) -> None:
        with self.cond:
            if item.user not in self.by_user:
                self.by_user[item.user] = deque()
                self.turn.append(item.user)
            self.by_user[item.user].append(item)
            self.cond.notify_all()

    def take(self, runnable: Callable[[QueueItem], bool]) -> Optional[QueueItem]:
        """The next runnable item, blocking until there is one; None once closed."""
        with self.cond:
            while not self.closed:
                item = self._pop_runnable(runnable)
                if item:
                    return item
                self.cond.wait()
            return None

    def _pop_runnable(self, runnable: Callable[[QueueItem], bool]) -> Optional[QueueItem]:
        for user in list(self.turn):
            for item in self.by_user[user]:
                if runnable(item):
                    self.by_user[user].remove(item)
                    self.turn.remove(user)
                    if self.by_user[user]:
                        self.turn.append(user)
                    else:
                        del self.by_user[user]
                    return item
        return None

    def remove(self, job_id: str) -> bool:
        with self.cond:
            for user, items in list(self.by_user.items()):
                for item in items:
                    if item.job_id == job_id:
                        items.remove(item)
                        if not items:
                            del self.by_user[user]
                            self.turn.remove(user)
                        return True
        return False

    def order(self) -> List[str]:
        """Job ids in the order round robin would serve them (ignoring busy folders)."""
        with self.cond:
            lanes = [list(self.by_user[u]) for u in self.turn]
        out: List[str] = []
        for depth in range(max((len(l) for l in lanes), default=0)):
            out += [lane[depth].job_id for lane in lanes if depth < len(lane)]
        return out

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


# ================================================================== the agent (server object)


class Agent:
    """Owns config, users, store, queue, project repos and workers. No module state:
    several agents can run in one process (tests do)."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.state_dir)
        self.queue = FairQueue()
        self.lock = threading.Lock()
        self.repos: Dict[Tuple[str, str], ProjectRepo] = {}
        self.busy: Dict[Tuple[str, str], set] = {}
        self.runs: Dict[str, AIRun] = {}
        self.workers: List[threading.Thread] = []

    # --- life cycle

    def start(self) -> None:
        self.recover()
        for n in range(self.cfg.workers):
            t = threading.Thread(target=self.work, name=f"worker-{n}", daemon=True)
            t.start()
            self.workers.append(t)

    def stop(self) -> None:
        self.queue.close()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.stop("the agent was stopped while the AI ran")
        for t in self.workers:
            t.join(timeout=KILL_GRACE_S + 5)
        self.store.close()

    def recover(self) -> None:
        """After a crash: running jobs fail with a reason and their folders are cleaned;
        queued jobs go back in the queue (they never vanish)."""
        for job in self.store.jobs_with_status("running"):
            reason = "agent restarted while the job ran"
            end_process_group(job.get("pgid"))
            self.finish(job["id"], "failed", reason)
            slot = job.get("slot")
            if slot is not None:
                try:
                    self.repo(job["user"], job["project"]).clean_slot(slot)
                except PatchwireError as e:
                    log.warning("could not clean the job folder of %s: %s", job["id"], e)
        for job in self.store.jobs_with_status("queued"):
            pin = self.store.job(job["parent"])["slot"] if job["parent"] else None
            self.queue.put(QueueItem(job["id"], job["user"], job["project"], pin))

    # --- users

    def authenticate(self, header: str) -> str:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPFailure(HTTPStatus.UNAUTHORIZED, "missing bearer token", "send Authorization: Bearer TOKEN",
                              code="unauthorized")
        presented = token_digest(token.strip())
        user = None
        for name, digest in self.cfg.users.items():
            if hmac.compare_digest(presented, digest):
                user = name
        if user is None:
            raise HTTPFailure(HTTPStatus.UNAUTHORIZED, "invalid token", "check the token file on the laptop",
                              code="unauthorized")
        return user

    def is_admin(self, user: str) -> bool:
        return user in self.cfg.admins

    def repo(self, user: str, project: str) -> ProjectRepo:
        with self.lock:
            key = (user, project)
            if key not in self.repos:
                self.repos[key] = ProjectRepo(self.cfg.state_dir, user, project)
            return self.repos[key]

    def me(self, user: str, project: Optional[str]) -> dict:
        out = {"user": user, "version": __version__,
               "mirror_root": str(self.cfg.state_dir / "mirror" / user)}
        if project is not None:
            repo = self.repo(user, check_name(project, "project"))
            repo.ensure()
            out["mirror"] = str(repo.mirror)
        return out

    def health(self) -> dict:
        argv0 = self.cfg.ai_command[0]
        found = shutil.which(argv0, path=ai_environment(self.cfg).get("PATH"))
        with self.lock:
            running = len(self.runs)
        return {"ok": True, "version": __version__, "time": time.time(), "queue_depth": len(self.queue.order()),
                "running": running, "workers": self.cfg.workers, "ai_command": argv0,
                "ai_found": bool(found)}

    # --- jobs

    def ask(self, user: str, body: dict) -> dict:
        project = check_name(body.get("project"), "project")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, "prompt must be a non-empty string", code="bad_request")
        tree = body.get("tree")
        if not isinstance(tree, str) or not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", tree):
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, "tree must be a git tree id", code="bad_request")
        manifest = check_manifest(body.get("files"))
        timeout_s = body.get("timeout_s", self.cfg.timeout_s)
        if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or not 0 < timeout_s <= self.cfg.max_timeout_s:
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, f"timeout_s must be 1..{self.cfg.max_timeout_s} seconds",
                              code="bad_request")
        parent = self.parent_job(user, project, body.get("continue"))
        snapshot = self.repo(user, project).snapshot(tree, manifest)
        job = {"id": secrets.token_hex(6), "user": user, "project": project, "prompt": prompt,
               "status": "queued", "created": time.time(), "snapshot": snapshot, "tree": tree,
               "timeout_s": timeout_s, "parent": parent["id"] if parent else None}
        self.store.create_job(job)
        self.queue.put(QueueItem(job["id"], user, project, parent["slot"] if parent else None))
        order = self.queue.order()
        self.store.add_event(job["id"], {"type": "queued", "project": project,
                                         "position": order.index(job["id"]) if job["id"] in order else 0})
        return self.store.job(job["id"])

    def parent_job(self, user: str, project: str, prefix: Any) -> Optional[dict]:
        """The finished job a follow-up ask continues, if any."""
        if prefix is None:
            return None
        parent = self.find_job(user, str(prefix))
        if parent["project"] != project:
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, f"job {parent['id']} belongs to project {parent['project']}, "
                              f"not {project}", code="bad_request")
        if parent["status"] != "done":
            raise HTTPFailure(HTTPStatus.CONFLICT, f"job {parent['id']} is {parent['status']}: only a finished "
                              "job can be continued", code="not_done")
        return parent

    def find_job(self, user: str, prefix: str) -> dict:
        if not re.fullmatch(r"[0-9a-f]{1,32}", prefix or ""):
            raise HTTPFailure(HTTPStatus.NOT_FOUND, f"no job {prefix!r}", code="not_found")
        jobs = self.store.find_jobs(user, prefix, limit=2)
        if not jobs:
            raise HTTPFailure(HTTPStatus.NOT_FOUND, f"no job {prefix!r} of yours", "list them with `patchwire jobs`",
                              code="not_found")
        if len(jobs) > 1:
            raise HTTPFailure(HTTPStatus.CONFLICT, f"job id prefix {prefix!r} is ambiguous", "give more characters",
                              code="ambiguous")
        return jobs[0]

    def cancel(self, user: str, prefix: str) -> dict:
        job = self.find_job(user, prefix)
        if job["status"] in TERMINAL:
            raise HTTPFailure(HTTPStatus.CONFLICT, f"job {job['id']} is already {job['status']}", code="finished")
        reason = "cancelled by " + user
        if self.queue.remove(job["id"]):
            self.finish(job["id"], "cancelled", reason)
        else:
            with self.lock:
                run = self.runs.get(job["id"])
            if run:
                run.stop(reason)
            deadline = time.monotonic() + KILL_GRACE_S + 2
            while time.monotonic() < deadline and self.store.job(job["id"])["status"] not in TERMINAL:
                self.store.wait(0.1)
        return self.store.job(job["id"])

    def finish(self, job_id: str, status: str, reason: str = "", **fields: Any) -> None:
        event = {"done": "finished", "failed": "failed", "cancelled": "cancelled"}[status]
        extra = {"stats": fields.get("stats")} if status == "done" else {"reason": reason}
        self.store.add_event(job_id, {"type": event, "status": status, **extra}, status=status,
                             reason=reason or None, finished=time.time(), **fields)

    # --- workers

    def work(self) -> None:
        while True:
            item = self.queue.take(self._has_free_slot)
            if item is None:
                return
            try:
                self.run_job(item)
            except Exception as e:  # a bug: the job fails with the reason, the worker lives on
                log.exception("job %s crashed", item.job_id)
                self.finish(item.job_id, "failed", f"internal error in the agent: {e!r}")
            finally:
                self._release_slot(item)

    def _has_free_slot(self, item: QueueItem) -> bool:
        """Called under the queue's lock: claims a slot for the item when one is free."""
        with self.lock:
            busy = self.busy.setdefault((item.user, item.project), set())
            free = set(range(self.cfg.slots)) - busy
            if item.pin is not None and item.pin < self.cfg.slots:
                free &= {item.pin}
            if not free:
                return False
            slot = min(free)
            busy.add(slot)
            item.slot = slot
            return True

    def _release_slot(self, item: QueueItem) -> None:
        with self.lock:
            self.busy[(item.user, item.project)].discard(item.slot)
            self.runs.pop(item.job_id, None)
        self.queue.wake()
        self._announce_positions()

    def _announce_positions(self) -> None:
        for position, job_id in enumerate(self.queue.order()):
            self.store.add_event(job_id, {"type": "position", "position": position})

    def run_job(self, item: QueueItem) -> None:
        job = self.store.job(item.job_id)
        slot = item.slot
        repo = self.repo(job["user"], job["project"])
        self.store.update_job(job["id"], status="running", started=time.time(), slot=slot)
        self._announce_positions()
        parent = self.store.job(job["parent"]) if job["parent"] else None
        carry = (parent["snapshot"], parent["result"]["result_commit"]) if parent else None
        run = AIRun(self.ai_argv(parent), repo.slot_path(slot), ai_environment(self.cfg), job["prompt"],
                    job["timeout_s"], lambda e: self.store.add_event(job["id"], e),
                    on_spawn=lambda pid: self.store.update_job(job["id"], pgid=pid))
        with self.lock:
            self.runs[job["id"]] = run  # from here on a cancel reaches the job
        try:
            repo.prepare_slot(slot, job["snapshot"], carry)
        except PatchwireError as e:
            self.finish(job["id"], "failed", f"could not prepare the job folder: {e.message}")
            return
        self.store.add_event(job["id"], {"type": "started", "slot": slot,
                                         **({"continues": parent["id"]} if parent else {})})
        started = time.monotonic()
        status, reason, result = run.run()
        summary = summarize_result(result, time.monotonic() - started, run.exit_code)
        if status != "done":
            self.finish(job["id"], status, reason, result=summary)
            return
        try:
            patch, stats, commit = repo.collect(slot, job["snapshot"], job["id"])
        except PatchwireError as e:
            self.finish(job["id"], "failed", f"could not collect the AI's changes: {e.message}",
                        result=summary)
            return
        self.store.patch_path(job["id"]).write_bytes(patch)
        self.finish(job["id"], "done", result={**summary, "result_commit": commit}, stats=stats)

    def ai_argv(self, parent: Optional[dict]) -> List[str]:
        """The AI command; a follow-up adds `[ai] resume_args` with the parent's session."""
        session = ((parent or {}).get("result") or {}).get("session_id")
        if not session:
            return list(self.cfg.ai_command)
        return self.cfg.ai_command + [a.replace("{session_id}", session) for a in self.cfg.resume_args]


def summarize_result(result: dict, elapsed: float, exit_code: Optional[int]) -> dict:
    usage = result.get("usage") or {}
    return {"exit_code": exit_code, "is_error": bool(result.get("is_error")),
            "subtype": result.get("subtype"), "duration_s": round(elapsed, 3),
            "num_turns": result.get("num_turns"), "session_id": result.get("session_id"),
            "tokens_in": usage.get("input_tokens"), "tokens_out": usage.get("output_tokens"),
            "cost_usd": result.get("total_cost_usd")}


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not pw.NAME_RE.fullmatch(value):
        raise HTTPFailure(HTTPStatus.BAD_REQUEST, f"{what} must be a name of letters, digits, '.', '_' and '-' "
                          f"(at most 64)", code="bad_request")
    return value


def check_manifest(files: Any) -> List[Tuple[str, str, str]]:
    if not isinstance(files, list):
        raise HTTPFailure(HTTPStatus.BAD_REQUEST, "files must be a list of [mode, blob, path]", code="bad_request")
    out = []
    for entry in files:
        if (not isinstance(entry, list) or len(entry) != 3 or not all(isinstance(x, str) for x in entry)
                or entry[0] not in ("100644", "100755", "120000")):
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, f"bad entry in files: {str(entry)[:100]}", code="bad_request")
        try:
            pw.check_relative_path(entry[2])
        except UsageError as e:
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, e.message, code="bad_request")
        out.append((entry[0], entry[1], entry[2]))
    return out


# ================================================================== HTTP server

ROUTES: List[Tuple[str, "re.Pattern[str]", str, bool]] = [
    (method, re.compile("^" + pattern + "$"), name, auth) for method, pattern, name, auth in (
        ("GET", r"/v1/health", "health", False),
        ("GET", r"/v1/me", "me", True),
        ("POST", r"/v1/ask", "ask", True),
        ("GET", r"/v1/jobs", "jobs", True),
        ("GET", r"/v1/jobs/(?P<job>[^/]+)", "job", True),
        ("DELETE", r"/v1/jobs/(?P<job>[^/]+)", "cancel", True),
        ("GET", r"/v1/jobs/(?P<job>[^/]+)/events", "events", True),
        ("GET", r"/v1/jobs/(?P<job>[^/]+)/diff", "diff", True),
    )]


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes, auth and errors in one place; each route is a small `route_<name>`."""

    protocol_version = "HTTP/1.1"
    server_version = f"patchwire-agent/{__version__}"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT
    server: "AgentHTTPServer"

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(HEADER_TIMEOUT)  # slow or idle clients go early

    def dispatch(self, method: str) -> None:
        self.connection.settimeout(CONNECTION_TIMEOUT)
        self.started_response = False
        url = urllib.parse.urlsplit(self.path)
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        self.body_read = False
        try:
            name, params, auth = self.route(method, url.path)
            user = self.agent.authenticate(self.headers.get("Authorization", "")) if auth else ""
            getattr(self, "route_" + name)(user, **params)
        except PatchwireError as e:
            self.fail(e.http_status, {"error": e.message, "hint": e.hint, "code": e.code, **e.details})
        except (ConnectionError, socket.timeout):  # the client left, or was too slow
            self.close_connection = True
        except Exception:
            log.exception("error answering %s %s", method, url.path)
            self.fail(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error in the agent; see its log", "code": "internal"})

    def route(self, method: str, path: str) -> Tuple[str, dict, bool]:
        allowed = []
        for m, pattern, name, auth in ROUTES:
            match = pattern.match(path)
            if match:
                if m == method:
                    return name, match.groupdict(), auth
                allowed.append(m)
        if allowed:
            raise HTTPFailure(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}", code="method_not_allowed")
        raise HTTPFailure(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}", "see the API list in the README",
                          code="not_found")

    # --- request and response helpers

    def read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPFailure(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length", code="length_required")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise HTTPFailure(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", code="length_required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise HTTPFailure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY // 2**20} MiB", code="too_large")
        data = self.rfile.read(int(length))
        self.body_read = True
        try:
            body = json.loads(data or b"null")
        except ValueError:
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, "the body is not valid JSON", code="bad_request")
        if not isinstance(body, dict):
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", code="bad_request")
        return body

    def send_bytes(self, status: int, data: bytes, content_type: str, **headers: str) -> None:
        self.started_response = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, json.dumps(obj).encode() + b"\n", "application/json")

    def fail(self, status: int, obj: dict) -> None:
        if self.started_response:  # mid-stream: nothing better to do than hang up
            self.close_connection = True
            return
        if not self.body_read and (self.headers.get("Content-Length", "0") not in ("", "0")
                                   or "Transfer-Encoding" in self.headers):
            self.close_connection = True  # else the unread body would be read as the next request
        data = json.dumps({k: v for k, v in obj.items() if v not in ("", None)}).encode() + b"\n"
        extra = {"WWW_Authenticate": 'Bearer realm="patchwire"'} if status == HTTPStatus.UNAUTHORIZED else {}
        self.send_bytes(status, data, "application/json", **extra)

    def wants_stream(self) -> bool:
        return "application/x-ndjson" in self.headers.get("Accept", "")

    def stream_events(self, job_id: str, after: int, follow: bool = True) -> None:
        """Numbered NDJSON events, chunked, flushed one by one; ends after the job's last
        event (or at once without `follow`)."""
        self.started_response = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        store = self.agent.store
        quiet_since = time.monotonic()
        while True:
            events = store.events(job_id, after)
            for event in events:
                self.write_chunk(json.dumps(event).encode() + b"\n")
                after = event["seq"]
                if event["type"] in LAST_EVENTS:
                    follow = False
            if not follow or (not events and store.job(job_id)["status"] in TERMINAL):
                break
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > HEARTBEAT_S:
                self.write_chunk(b"\n")  # keeps proxies open and finds clients that left
                quiet_since = time.monotonic()
            else:
                store.wait(1.0)
        self.write_chunk(b"")

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    # --- routes

    def route_health(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, self.agent.health())

    def route_me(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, self.agent.me(user, self.query.get("project")))

    def route_ask(self, user: str) -> None:
        job = self.agent.ask(user, self.read_json())
        if self.wants_stream():
            self.stream_events(job["id"], 0)
        else:
            self.send_json(HTTPStatus.ACCEPTED, public_job(job))

    def route_jobs(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, {"jobs": [public_job(j) for j in self.agent.store.find_jobs(user)]})

    def route_job(self, user: str, job: str) -> None:
        self.send_json(HTTPStatus.OK, public_job(self.agent.find_job(user, job)))

    def route_cancel(self, user: str, job: str) -> None:
        self.send_json(HTTPStatus.OK, public_job(self.agent.cancel(user, job)))

    def route_events(self, user: str, job: str) -> None:
        after = self.query.get("after", "0")
        if not after.isdigit():
            raise HTTPFailure(HTTPStatus.BAD_REQUEST, "after must be a whole number", code="bad_request")
        found = self.agent.find_job(user, job)
        self.stream_events(found["id"], int(after), follow=self.query.get("follow", "1") != "0")

    def route_diff(self, user: str, job: str) -> None:
        found = self.agent.find_job(user, job)
        if found["status"] != "done":
            raise HTTPFailure(HTTPStatus.CONFLICT, f"job {found['id']} is {found['status']}: it has no diff",
                              found.get("reason") or "", code="no_diff")
        self.send_bytes(HTTPStatus.OK, self.agent.store.patch_path(found["id"]).read_bytes(), "text/x-diff")


def public_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k not in ("user", "last_seq", "pgid")}
    out["events"] = job["last_seq"]
    return out


class AgentHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with caps on concurrent connections, in all and per client
    address (503 beyond them)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, agent: Agent, address: Tuple[str, int]):
        self.agent = agent
        self.open: Dict[str, int] = {}
        self.open_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        client = client_address[0]
        with self.open_lock:
            full = (sum(self.open.values()) >= MAX_CONNECTIONS
                    or self.open.get(client, 0) >= MAX_CONNECTIONS_PER_CLIENT)
            if not full:
                self.open[client] = self.open.get(client, 0) + 1
        if full:
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                self.open[client_address[0]] -= 1
                if not self.open[client_address[0]]:
                    del self.open[client_address[0]]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


# ================================================================== commands


def cmd_init(args) -> int:
    path = Path(args.config)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists already", "use --force to replace it")
    if not pw.NAME_RE.fullmatch(args.user):
        raise UsageError(f"user name {args.user!r} is not valid", "use letters, digits, '.', '_' and '-'")
    token = "pw_" + secrets.token_urlsafe(32)
    state_dir = args.state_dir or str(path.resolve().parent / "patchwire-state")
    sections = {
        "server": pw.dump_toml({"listen": args.listen, "state_dir": state_dir}),
        "ai": pw.dump_toml({"command": CLAUDE_COMMAND, "timeout_s": 1800, "max_timeout_s": 7200}),
        "jobs": pw.dump_toml({"workers": 2, "slots": 2}),
        "users": pw.dump_toml({"users": {args.user: {"token_sha256": token_digest(token).hex()}}}),
    }
    text = CONFIG_TEMPLATE.format(**sections)
    AgentConfig(path, pw.parse_toml(text, path))  # what we write must load
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o600)
    if args.token_file:
        write_private(Path(args.token_file), token + "\n")
        pw.say(f"wrote {path}; the token of user {args.user} is in {args.token_file}")
    else:
        pw.say(f"wrote {path}. The token of user {args.user}, shown this once (only its sha256 "
               "is stored): put it in a file on the laptop, chmod 600")
        print(token)
    return 0


def write_private(path: Path, text: str) -> None:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)


def cmd_serve(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    agent = Agent(cfg)
    try:
        server = AgentHTTPServer(agent, (cfg.host, cfg.port))
    except OSError as e:
        raise PatchwireError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}",
                             "pick another [server] listen address, or stop what uses that port")
    agent.start()

    def on_signal(signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    ai = agent.health()
    print(f"patchwire-agent {__version__} listening on {server.url}", flush=True)
    pw.say(f"state in {cfg.state_dir}; {len(cfg.users)} user(s); AI command {cfg.ai_command[0]!r}"
           + ("" if ai["ai_found"] else " NOT FOUND on PATH: asks will fail until it is installed"))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        agent.stop()
    return 0


COMMANDS = {
    "init": (cmd_init, "write a commented starter config with one user and print its token"),
    "serve": (cmd_serve, "run the HTTP server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchwire-agent", description=AGENT_DESCRIPTION,
                                     epilog=AGENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"patchwire-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}
    for name in p:
        p[name].add_argument("-c", "--config", required=True, help="the agent's TOML config file")
    p["init"].add_argument("--user", default=os.environ.get("USER") or "me", help="first user's name")
    p["init"].add_argument("--token-file", help="write the token to this file (mode 600) instead of printing it")
    p["init"].add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (default %(default)s)")
    p["init"].add_argument("--state-dir", help="where jobs, mirrors and job folders live")
    p["init"].add_argument("--force", action="store_true", help="replace an existing config")
    p["serve"].add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = pw.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return pw.run_command("patchwire-agent", COMMANDS, args)


if __name__ == "__main__":
    sys.exit(main())
