"""patchwire: run Claude Code on a bigger machine, review and apply its diff here.

The laptop is the source of truth. `patchwire ask "PROMPT"` does the whole job:

    1. list the project's files with git's own ignore rules (wherever the project's root is:
       a repository's top, a folder inside one, a folder without git), minus a deny-list of
       secrets, `[sync] exclude` and files over `[sync] max_file_mb`; after the first sync,
       only what changed, found with git's stat cache and untracked cache kept in the
       record's own index (`Project.scan_quick`, else `Project.scan_changes`)
    2. record exactly what is sent as a git tree in Patchwire's own store (a bare repository
       under ~/.local/state/patchwire that reads the user's objects through alternates; the
       user's repository holds nothing of it), so every preimage of the returned diff and
       the 3-way merge base exist here
    3. rsync the files that changed since the last sync (by content), and only listed files,
       to the agent box (over SSH, or locally); files that move meanwhile are sent again
    4. POST /v1/ask {project, tree, base, changed, deleted, prompt} (what changed since the
       box's last snapshot; the whole file list after a first or forced sync, or when the
       box answers 409 because it holds something else) with a bearer token
       and the project's [box] (setup before the AI, checks on its result)
    5. stream the setup's, the AI's and the checks' progress (NDJSON events) to stderr
    6. fetch the diff, preview it (the checks' verdict, once the receipt's sha256 is this
       patch's; per-file summary, coloured diff, intra-line highlights)
    7. on Enter, `git apply`: all or nothing (git checks every hunk before it writes)

Commands (`patchwire COMMAND --help` for each):
    init     write .patchwire.toml for this project (never the token itself)
    sync     send the project to the agent box (--dry-run: what would go, and why not)
    ask      sync, ask the AI, stream progress, preview, apply on Enter (--detach: queue and leave;
             -n N: several attempts, then --pick K or --take K:PATH,... builds one change from them)
    wait     follow your running jobs again, then preview and apply as ask does
    diff     print a job's patch
    apply    preview and apply a job's patch (the last job by default; --yes skips asking)
    jobs     list your jobs on the agent box
    show     show one job with its events
    cancel   cancel a queued or running job
    notify   where the box tells you a job ended: add URL, list, remove ID, test [ID]
    log      what was applied here, when, from which job
    doctor   check every link (git, rsync, ssh, agent, token, AI, clock) and say how to fix it
    usage    your asks, AI minutes, tokens and cost on the box (--by project|day, --csv)

Several attempts (`ask -n N`, section "several attempts"): N sibling jobs of one sync and
one snapshot; the chooser applies one whole, or one change built from files or hunks of
several (overlapping hunks are alternatives, never merged), vetted as a single job's patch
is (Session.vet, apply_job).

Exit codes:
    0 ok, 1 error, 2 usage, 3 agent unreachable or refused, 4 AI run failed,
    5 patch does not apply, 6 checks failed (ask --require-checks), 130 interrupted.
    (ExitStatus; a test keeps this in step)

Environment:
    PATCHWIRE_TOKEN   the bearer token (overrides token_file in .patchwire.toml)
    NO_COLOR          no colour in the preview
    PAGER             pager for long previews (default: less -R)
    PATCHWIRE_TIMEOUT seconds a whole request to the agent may take (default 30; README: Threat model)

Threat model: the token is read from a file or the environment and sent only in the
Authorization header; it is never written to .patchwire.toml, printed or logged. Files
matching the secret deny-list never leave this machine, whatever git says about them.
Everything the box sends is hostile data (README: Threat model): a patch is read strictly
and refused as a whole unless every byte is what `git diff` writes and every path and
symlink stays inside the project, out of .git and off Patchwire's own settings; files are
read and written here without following symlinks; the 3-way merge base is this laptop's
own record; a file of yours where the patch puts a new file or a rename (untracked,
ignored: never reviewed) is replaced only when you say so (asked on a terminal, else
`--overwrite-untracked`), its bytes kept for undo; every string from the box is sanitised
before it reaches a terminal, and every answer is read within a size cap and a deadline, as
strict JSON whose fields are type-checked (HTTP client). An https agent is verified against
the system's CAs, or `ca_file` in .patchwire.toml.

This module is also the shared base of patchwire_agent.py. What both programs use (the
protocol's constants, the error base, the one subprocess runner, `Git`, config schemas, the
no-follow file access, terminal-safe output) is the SHARED part at the top; the agent
imports nothing below the LAPTOP banner (tests/test_structure.py), so changing the laptop's
apply code cannot change the agent by accident.

Map: the banner sections, top to bottom, in the order data flows (tests/test_structure.py
keeps it in step). SHARED first, then the LAPTOP's own:
    constants and the protocol ........................ NAME_RE, JOB_ENDS, LAST_EVENTS, GIT_NEUTRAL, ExitStatus, STATUS_EXITS
    errors ............................................ PatchwireError and its kinds (UsageError, PatchError, ...)
    processes ......................................... run, spawn, in_parallel
    git ............................................... Git (every git call goes through it), set_index_paths
    config files ...................................... Schema, load_toml, check_box ([box])
    files, never through a symlink .................... read_worktree, write_worktree
    what reaches the terminal ......................... sanitize, say, clip_words
    usage reports (`patchwire usage`, `patchwire-agent usage`) .. usage_table
    command line ...................................... run_command, output
    constants ......................................... CONFIG_NAME, DEFAULT_DENY, HELP_EPILOG
    config ............................................ LaptopConfig (.patchwire.toml)
    files: what leaves the laptop ..................... PathMatcher, SyncRules, FileList, Project (the record)
    sync (rsync) ...................................... rsync_argv, send_files
    HTTP client ....................................... Client, EventStream, Deadline, the answers' shapes
    the job, laptop side .............................. Session, JobFollower, stream_job, apply_job
    progress: the job's events on the terminal ........ Style, ProgressPrinter
    telling you it is done (desktop) .................. notify_desktop
    reading a patch, strictly ......................... PatchParser, FilePatch, split_patch
    vetting: a patch against the files here, its results computed .. vet_on_disk, compute_results, PatchReading
    preview: what deserves a second look, and the diff .. look_closely, diff_lines, page
    choosing what to apply ............................ Chooser, Selection, Hunk
    apply and undo .................................... Applier, ThreeWayMerge, UndoLog, settle_in_the_way
    several attempts .................................. ask -n: the group followed, compared, picked or built
    doctor ............................................ Doctor
    commands .......................................... cmd_<name>, COMMANDS, main
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import difflib
import enum
import errno
import fcntl
import fnmatch
import functools
import gc
import glob
import hashlib
import heapq
import io
import itertools
import json
import operator
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
import urllib.parse
import zlib
from http import HTTPStatus
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set,
                    Tuple, Union)
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at run time, imported where a request is made (start-up: see http_client)
    import http.client
    import ssl

__version__ = "0.3.0"

# ##################################################################################################
# SHARED: both programs. patchwire_agent.py imports these names and nothing below the
# LAPTOP banner (tests/test_structure.py keeps it so): a change here changes the agent too.
# ##################################################################################################

# ================================================================== constants and the protocol


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # use fullmatch

# The protocol both programs speak (README: API; the agent serves it at /v1/openapi.json).
# A job's status ends as one of JOB_ENDS, and its event stream with one of LAST_EVENTS; a
# refusal is JSON {"error", "hint", "code", ...}, and these codes are the ones the laptop acts on.
JOB_ENDS = ("done", "failed", "cancelled")
LAST_EVENTS = ("finished", "failed", "cancelled")
CODE_NOT_FOUND = "not_found"  # no such job, project or route: not a refusal
CODE_TREE_MISMATCH = "tree_mismatch"  # the box's copy is not what the laptop recorded: sync again
# An ask of changes may carry small changed files itself (`content`), instead of an rsync before
# it: the agent writes them into its mirror, then hashes them as it would rsync's copies. At most
# this many bytes in all; the agent says so in /v1/me (`inline_max_bytes`), an older one does not.
INLINE_MAX_BYTES = 1024 * 1024
# In a stream, where the agent left out the middle of the AI's output ([jobs] max_output_mb):
# {"type": OUTPUT_DROPPED, "events": N, "bytes": N, "limit": "[jobs] max_output_mb = 16"}
OUTPUT_DROPPED = "output_dropped"
# The routes both programs know, each once: (method, path template, name, needs a token). The
# agent matches requests against them (its Handler's route_<name>) and the OpenAPI document
# describes them; the laptop's Client builds its paths from them (route_path).
ROUTE_TABLE = (
    ("GET", "/v1/health", "health", False),
    ("GET", "/v1/me", "me", True),
    ("POST", "/v1/ask", "ask", True),
    ("GET", "/v1/jobs", "jobs", True),
    ("GET", "/v1/jobs/{job}", "job", True),
    ("DELETE", "/v1/jobs/{job}", "cancel", True),
    ("GET", "/v1/jobs/{job}/events", "events", True),
    ("GET", "/v1/jobs/{job}/diff", "diff", True),
    ("GET", "/v1/asks/{ask}", "ask_group", True),
    ("GET", "/v1/asks/{ask}/events", "ask_events", True),
    ("GET", "/v1/usage", "usage", True),
    ("GET", "/v1/notify", "notify_list", True),
    ("POST", "/v1/notify", "notify_add", True),
    ("DELETE", "/v1/notify/{target}", "notify_remove", True),
    ("POST", "/v1/notify/{target}/test", "notify_test", True),
    ("GET", "/v1/openapi.json", "openapi", False),
    ("GET", "/metrics", "metrics", True),
)
ROUTE_TEMPLATES = {name: template for _, template, name, _ in ROUTE_TABLE}


def route_path(name: str, query: Optional[Dict[str, Any]] = None, **params: str) -> str:
    """The path of route `name` with its parameters filled in (each quoted whole: a job id
    holding "/" stays one segment), and `query` appended."""
    path = ROUTE_TEMPLATES[name].format(**{k: urllib.parse.quote(str(v), safe="") for k, v in params.items()})
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


# Every type of event a job's stream carries, in the order a job can emit them; the agent's
# OpenAPI document describes each, and the laptop's ProgressPrinter has an on_<type> for those
# it shows (tests/test_structure.py keeps all three in step). Anything else from a box is not
# the protocol: the laptop shows it as nothing more than an unknown event.
EVENT_TYPES = ("queued", "position", "setup", "started", "session", "text", "tool", "tool_error", "output",
               OUTPUT_DROPPED, "network", "network_refused", "links_removed", "result", "repositories_left_out",
               "check", *LAST_EVENTS)


# Settings that make git's bytes the same on every machine, whatever the user's config.
GIT_NEUTRAL = (
    "-c", "core.autocrlf=false", "-c", "core.safecrlf=false", "-c", "core.fileMode=true",
    "-c", "core.symlinks=true", "-c", "core.quotePath=false", "-c", "core.precomposeUnicode=true",
    "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=", "-c", "color.ui=false",
    "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false", "-c", "diff.external=",
    "-c", "diff.relative=false", "-c", "commit.gpgSign=false", "-c", "gc.auto=0",
    "-c", "advice.detachedHead=false", "-c", "init.defaultBranch=main",
    # the laptop reads patches strictly (split_patch): git's own a/ b/ prefixes (git 2.45 made
    # them configurable) and a space on empty context lines, whatever the box user's config says
    "-c", "diff.srcPrefix=a/", "-c", "diff.dstPrefix=b/", "-c", "diff.suppressBlankEmpty=false",
    # `git apply` writes the lines as the patch has them: no whitespace "fixed", none ignored
    "-c", "apply.whitespace=nowarn", "-c", "apply.ignoreWhitespace=no",
)


# Written to info/attributes of every git dir Patchwire uses, it overrides any in-tree
# .gitattributes (higher precedence): `* text=auto eol=crlf` or an LFS filter in the project
# would otherwise change what `git add` stores and what checkout writes. With it, content is
# stored and checked out byte for byte (tested with CRLF files under `* text=auto eol=crlf`).
NEUTRAL_ATTRIBUTES = b"* -text -eol -filter -ident -working-tree-encoding !diff !merge\n"
# For the indexes Patchwire keeps itself (the laptop's record, the box's snapshot index and
# job folders), never the user's: a split index, so a command that changes a few entries of
# a 100,000-file index writes those, not all of it (update-index 50 -> 20 ms, checkout -f
# 140 -> 110 ms at that size); and racy-git safety, so a file rewritten with the same size
# and mtime is still seen by its new ctime, whatever the user's core.trustctime says.
INDEX_CONFIG = {"core.splitIndex": "true", "core.trustctime": "true", "core.checkStat": "default"}


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "patchwire", "GIT_AUTHOR_EMAIL": "patchwire@localhost",
    "GIT_COMMITTER_NAME": "patchwire", "GIT_COMMITTER_EMAIL": "patchwire@localhost",
    "GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_COMMITTER_DATE": "1700000000 +0000",
}


class ExitStatus(enum.IntEnum):
    """The laptop's exit codes; `--help` is written from this table, nowhere else."""

    OK = 0
    ERROR = 1
    USAGE = 2
    AGENT = 3
    AI_FAILED = 4
    PATCH = 5
    CHECKS = 6
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        return EXIT_MEANINGS[self]


EXIT_MEANINGS = {
    ExitStatus.OK: "ok", ExitStatus.ERROR: "error", ExitStatus.USAGE: "usage",
    ExitStatus.AGENT: "agent unreachable or refused", ExitStatus.AI_FAILED: "AI run failed",
    ExitStatus.PATCH: "patch does not apply", ExitStatus.CHECKS: "checks failed (ask --require-checks)",
    ExitStatus.INTERRUPTED: "interrupted",
}

# The agent's HTTP answer -> the laptop's exit status, the one table of it (as httpie's
# status.py): keyed by (status, the refusal's code) or the status alone; anything else the
# agent refuses is exit 3. "Nothing by that name" (404 not_found) is the user's mistake, not a
# refusal. tests/test_structure.py keeps status-to-exit mappings out of the rest of the code.
STATUS_EXITS: Dict[Union[int, Tuple[int, str]], ExitStatus] = {
    (HTTPStatus.NOT_FOUND, CODE_NOT_FOUND): ExitStatus.ERROR,
}


def exit_for_status(http_status: int, code: str = "") -> ExitStatus:
    """The exit status for the agent's answer `http_status` (a refusal with `code`)."""
    return STATUS_EXITS.get((http_status, code), STATUS_EXITS.get(http_status, ExitStatus.AGENT))


# ================================================================== errors


class PatchwireError(Exception):
    """An expected failure: reported as one plain message, never a traceback.

    `hint` says what to do next; `exit_status` is the laptop's exit code and
    `http_status` the agent's HTTP answer for the same failure.
    """

    exit_status: int = ExitStatus.ERROR
    http_status: int = HTTPStatus.BAD_REQUEST
    code = "error"

    def __init__(self, message: str, hint: str = "", *, exit_status: Optional[int] = None,
                 http_status: Optional[int] = None, code: Optional[str] = None,
                 details: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_status is not None:
            self.exit_status = exit_status
        if http_status is not None:
            self.http_status = http_status
        if code is not None:
            self.code = code
        self.details = details or {}

    def __str__(self) -> str:
        return self.message + (f"\n  {self.hint}" if self.hint else "")


class UsageError(PatchwireError):
    exit_status = ExitStatus.USAGE


class AgentError(PatchwireError):
    """The agent could not be reached, or refused the request."""
    exit_status = ExitStatus.AGENT


class AIFailed(PatchwireError):
    exit_status = ExitStatus.AI_FAILED


class PatchError(PatchwireError):
    exit_status = ExitStatus.PATCH


class ProcessError(PatchwireError):
    """A subprocess failed: argv[0], the exit code and the tail of its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: bytes, hint: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = fold_returns(stderr.decode("utf-8", "replace")).strip()[-800:]
        name = " ".join(_short_argv(argv))
        super().__init__(f"{name} failed (exit {returncode})" + (f": {tail}" if tail else ""), hint)


def fold_returns(text: str) -> str:
    """What a terminal shows of a program's stderr: ssh and rsync end lines with \\r\\n when
    they think they talk to one, and redraw progress with a lone \\r, which would reach a
    message as ^M. Each line keeps its last redraw."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def _short_argv(argv: Sequence[str]) -> List[str]:
    """argv[0] and its subcommand, without -c settings: enough to say what failed."""
    words = [os.path.basename(str(argv[0]))]
    rest = [str(a) for a in argv[1:]]
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 2 if rest[i] in ("-c", "-C", "--git-dir", "--work-tree") else 1
    return words + rest[i:i + 1]


# ================================================================== processes


def run(argv: Sequence[str], *, cwd: Optional[os.PathLike] = None, env: Optional[dict] = None,
        input: Optional[bytes] = None, timeout: Optional[float] = 600, check: bool = True,
        hint: str = "", capture: bool = True, stdout: Optional[BinaryIO] = None,
        max_file_bytes: Optional[int] = None) -> subprocess.CompletedProcess:
    """Run a command to completion: the one place that calls subprocess.run.

    Output is captured as bytes (`capture=False`: it goes to this process's own stdout and
    stderr, as a pager's must; `stdout`: an open file gets it, so output of any size never
    passes through this process's memory). `max_file_bytes` caps every file the command
    writes (RLIMIT_FSIZE: past it the kernel ends it with SIGXFSZ). A missing program, a
    timeout or (with check) a non-zero exit raises PatchwireError naming the command, with
    the tail of its stderr.
    """
    out = subprocess.PIPE if capture else None
    try:
        proc = subprocess.run(list(argv), cwd=cwd, env=env, input=input, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              stdout=stdout if stdout is not None else out, stderr=out,
                              preexec_fn=_file_size_limit(max_file_bytes))
    except FileNotFoundError:
        raise PatchwireError(f"{argv[0]} is not installed or not on PATH",
                             hint or f"install {os.path.basename(str(argv[0]))} and try again")
    except subprocess.TimeoutExpired:
        raise PatchwireError(f"{' '.join(_short_argv(argv))} took longer than {timeout or 0:g} s", hint,
                             code="timeout")
    if check and proc.returncode != 0:
        raise ProcessError(argv, proc.returncode, proc.stderr or b"", hint)
    return proc


def _file_size_limit(limit: Optional[int]) -> Optional[Callable[[], None]]:
    """A preexec_fn that caps the size of files the child writes, or None (no cap)."""
    if limit is None:
        return None
    import resource  # POSIX only: here, not at the top, which a laptop without it also runs

    def cap() -> None:  # runs in the child between fork and exec: nothing but the syscall
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return cap


def spawn(argv: Sequence[str], *, cwd: os.PathLike, env: dict, terminal: bool = False) -> subprocess.Popen:
    """Start a long-running child in its own process group (so the whole group can be
    ended), with pipes for stdin, stdout and stderr. The agent's AI runs this way. With
    `terminal` (a pager), only stdin is a pipe and the child stays in this session: it
    writes to the terminal and reads its keys from it."""
    if terminal:
        return subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.PIPE)
    return subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


class Background:
    """A call run in a thread from now on; result() waits for it and returns its value or
    raises its exception."""

    def __init__(self, call: Callable[[], Any]):
        self._result: List[Any] = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._result.append((True, call()))
        except BaseException as e:  # noqa: B036 - handed to the thread that waits
            self._result.append((False, e))

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._result[0]
        if not ok:
            raise value
        return value


def in_parallel(*calls: Callable[[], Any]) -> List[Any]:
    """The results of `calls`, run at once (each mostly waits on a git process, so two cores
    do two at a time): the first in this thread, the rest in Background; once all have
    ended, the first exception in the order of `calls` is raised."""
    later = [Background(call) for call in calls[1:]]
    results: List[Any] = []
    errors: List[BaseException] = []
    for get in [calls[0], *(b.result for b in later)]:
        try:
            results.append(get())
        except BaseException as e:  # noqa: B036 - raised once every call has ended
            results.append(None)
            errors.append(e)
    if errors:
        raise errors[0]
    return results


def json_too_deep(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit`, walked without recursion (the
    depth is what is being checked) and in memory of the depth, not of the values (a list of
    a million empty lists): both programs read JSON from the other side."""
    stack = [iter((value,))]  # one iterator per open container: its length is the depth
    while stack:
        for item in stack[-1]:
            if isinstance(item, (dict, list)):
                if len(stack) > limit:
                    return True
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                break
        else:
            stack.pop()
    return False


def clean_env(extra: Optional[dict] = None) -> dict:
    """This process's environment without git's and Patchwire's own variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "PATCHWIRE_"))}
    env.update(extra or {})
    return env


# ================================================================== git

# The user's own repository is read with its own settings (ignore rules, sparse checkout,
# case), but a program its config names never runs from Patchwire's calls: a `.git` that came
# in an archive, or a vendored repository inside the project, would run it as the user.
GIT_NO_PROGRAMS = ("-c", "core.fsmonitor=", "-c", "core.hooksPath=/dev/null")


class Git:
    """Every git call goes through here. `git_dir`/`work_tree` are explicit, so a
    repository's own `.git` file (which an AI could rewrite) is never trusted; `neutral`
    adds the byte-exact settings, `config` more settings (`-c`) for this repository's own
    use (INDEX_CONFIG), `env` extra variables (GIT_INDEX_FILE and the like)."""

    def __init__(self, *, cwd: Optional[os.PathLike] = None, git_dir: Optional[os.PathLike] = None,
                 work_tree: Optional[os.PathLike] = None, env: Optional[dict] = None,
                 neutral: bool = True, config: Optional[Dict[str, str]] = None):
        self.cwd = Path(cwd or work_tree or git_dir or ".")
        self.git_dir = git_dir
        self.work_tree = work_tree
        self.neutral = neutral
        self.config = dict(config or {})
        self.env = clean_env({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
                              "GIT_LITERAL_PATHSPECS": "1", **GIT_IDENTITY, **(env or {})})

    def with_env(self, **env: str) -> "Git":
        return Git(cwd=self.cwd, git_dir=self.git_dir, work_tree=self.work_tree,
                   env={**self._own_env(), **env}, neutral=self.neutral, config=self.config)

    def with_config(self, **config: str) -> "Git":
        """This git with more `-c` settings (dots in names written as `__`)."""
        more = {key.replace("__", "."): value for key, value in config.items()}
        return Git(cwd=self.cwd, git_dir=self.git_dir, work_tree=self.work_tree,
                   env=self._own_env(), neutral=self.neutral, config={**self.config, **more})

    def _own_env(self) -> dict:
        return {k: v for k, v in self.env.items() if k.startswith("GIT_")}

    def argv(self, args: Sequence[str]) -> List[str]:
        argv = ["git", *(GIT_NEUTRAL if self.neutral else GIT_NO_PROGRAMS)]
        for key, value in self.config.items():
            argv += ["-c", f"{key}={value}"]
        if self.git_dir is not None:
            argv += ["--git-dir", str(self.git_dir)]
        if self.work_tree is not None:
            argv += ["--work-tree", str(self.work_tree)]
        return argv + list(args)

    def run(self, *args: str, input: Optional[bytes] = None, check: bool = True,
            timeout: float = 600, hint: str = "", stdout: Optional[BinaryIO] = None,
            max_file_bytes: Optional[int] = None) -> subprocess.CompletedProcess:
        return run(self.argv(args), cwd=self.cwd, env=self.env, input=input, check=check,
                   timeout=timeout, hint=hint, stdout=stdout, max_file_bytes=max_file_bytes)

    def __call__(self, *args: str, input: Optional[bytes] = None, timeout: float = 600) -> bytes:
        return self.run(*args, input=input, timeout=timeout).stdout

    def text(self, *args: str, input: Optional[bytes] = None) -> str:
        return self(*args, input=input).decode("utf-8", "surrogateescape").strip()

    def large(self, *args: str) -> bytes:
        """The output of a command that grows with the project (a listing of every file),
        through a temporary file: read from a pipe, it is held twice as it ends (the pieces,
        then their join), 12 MB instead of 6 for a listing of 100,000 files."""
        return self.large_and_errors(*args)[0]

    def large_and_errors(self, *args: str) -> Tuple[bytes, bytes]:
        """`large`, and the command's stderr (warnings of a command that succeeded)."""
        import tempfile
        with tempfile.TemporaryFile() as out:
            errors = self.run(*args, stdout=out).stderr or b""
            out.seek(0)
            return out.read(), errors

    def write_blobs(self, datas: Sequence[bytes]) -> List[str]:
        """Store each of `datas` as a blob; their ids. Written as git writes a loose object
        (zlib of "blob LEN\\0" + the bytes, in a temporary file renamed into objects/XX/),
        with no process at all: an undo log of 1,600 files was 1,600 `hash-object` runs."""
        if self.git_dir is None:
            return [self.text("hash-object", "-w", "--stdin", input=data) for data in datas]
        return [write_object(Path(str(self.git_dir)), b"blob", data) for data in datas]

    def has_tree(self, tree: str) -> bool:
        """Whether `tree` names a tree in this repository (a commit's id does not count)."""
        return bool(tree) and self.run("cat-file", "-e", tree + "^{tree}", check=False).returncode == 0

    def write_tree(self) -> str:
        """The id of the tree the index holds (written into the object store)."""
        return self.text("write-tree")

    def rev_parse(self, rev: str) -> Optional[str]:
        """The object id `rev` names, or None (`-q --verify`: no error for a missing one, such
        as HEAD in a repository without commits)."""
        found = self.run("rev-parse", "-q", "--verify", rev, check=False)
        return found.stdout.decode().strip() if found.returncode == 0 else None

    def update_ref(self, ref: str, value: str) -> None:
        self("update-ref", ref, value)

    def delete_refs(self, refs: Sequence[str]) -> None:
        """Delete every ref of `refs` in one process (`update-ref --stdin`)."""
        if refs:
            self("update-ref", "--stdin", input="".join(f"delete {r}\n" for r in refs).encode())

    def refs(self, prefix: str) -> List[str]:
        """The names of the refs under `prefix` (e.g. "refs/jobs/")."""
        return self.text("for-each-ref", "--format=%(refname)", prefix).split()

    def keep_refs(self, prefix: str, ids: Iterable[str]) -> None:
        """Make the refs under `prefix` exactly one per id of `ids` (PREFIX/ID -> ID), in one
        `update-ref --stdin`: what a ref names, prune keeps."""
        want = {f"{prefix}{i}": i for i in ids}
        have = set(self.refs(prefix))
        lines = [f"delete {ref}\n" for ref in sorted(have - set(want))]
        lines += [f"create {ref} {i}\n" for ref, i in sorted(want.items()) if ref not in have]
        if lines:
            self("update-ref", "--stdin", input="".join(lines).encode())

    def missing_objects(self, ids: Sequence[bytes]) -> List[bytes]:
        """Those of `ids` this repository cannot read, all in one `cat-file --batch-check`."""
        if not ids:
            return []
        check = self("cat-file", "--batch-check", input=b"\n".join(ids) + b"\n")
        return [line.split()[0] for line in check.splitlines() if line.endswith(b" missing")]

    def changed_entries(self, old_tree: str, tree: str) -> List[Tuple[bytes, bytes, bytes, bytes]]:
        """(status letter, mode, blob, path) in `tree` of every file that differs from `old_tree`
        to `tree`, renames not looked for; git skips each folder whose tree id is the same in
        both. (`-z` raw records: ":OLDMODE NEWMODE OLDBLOB NEWBLOB STATUS\0PATH\0".)"""
        out = self("diff-tree", "-r", "-z", "--no-renames", old_tree, tree).split(b"\0")
        entries = []
        for meta, path in zip(out[0::2], out[1::2]):
            fields = meta.split()
            if len(fields) == 5:
                entries.append((fields[4][:1], fields[1], fields[3], path))
        return entries

    def tree_after_patch(self, tree: str, patch: bytes, index: Path) -> Tuple[Optional[str], bytes]:
        """(the tree `patch` makes of `tree`, None when it does not apply; git's stderr): git's
        own apply in a throwaway `index` (removed after), never a worktree, so there is no second
        patch applier."""
        git = self.with_env(GIT_INDEX_FILE=str(index))
        try:
            git("read-tree", tree)
            applied = git.run("apply", "--cached", "--binary", "-", input=patch, check=False)
            return (git.text("write-tree") if applied.returncode == 0 else None), applied.stderr
        finally:
            index.unlink(missing_ok=True)

    def read_blobs(self, ids: Sequence[str]) -> Dict[str, Optional[bytes]]:
        """{id: its bytes, None when there is no such blob}, all in one `cat-file --batch`."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        out = self("cat-file", "--batch", input="".join(i + "\n" for i in wanted).encode())
        found: Dict[str, Optional[bytes]] = {}
        at = 0
        for blob in wanted:  # "<id> blob <size>\n<bytes>\n", or "<id> missing\n"
            end = out.index(b"\n", at)
            head = out[at:end].split(b" ")
            at = end + 1
            if len(head) == 3 and head[1] == b"blob":
                size = int(head[2])
                found[blob], at = out[at:at + size], at + size + 1
            else:
                found[blob] = None  # missing, ambiguous, or not a blob (a tree's body is skipped)
                at += int(head[2]) + 1 if len(head) == 3 else 0
        return found

    def have_objects(self, ids: Sequence[str]) -> set:
        """Which of `ids` name an object here, in one `cat-file --batch-check` (nothing inflated)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return set()
        out = self("cat-file", "--batch-check", input="".join(i + "\n" for i in wanted).encode())
        return {line.split(b" ")[0].decode() for line in out.splitlines() if not line.endswith(b" missing")} & set(wanted)

    def ls_files_stage(self) -> Dict[str, Tuple[str, str]]:
        """{path: (mode, blob)} of the index."""
        entries = {}
        for rec in self("ls-files", "-s", "-z").split(b"\0"):
            if rec:
                meta, path = rec.split(b"\t", 1)
                mode, sha, _stage = meta.decode().split()
                entries[path.decode("utf-8", "surrogateescape")] = (mode, sha)
        return entries


def prepare_private_git_dir(path: Path, bare: bool = True) -> None:
    """A git dir of Patchwire's own with neutral attributes (idempotent)."""
    if not (path / "HEAD").exists():
        path.mkdir(parents=True, exist_ok=True)
        Git(cwd=path)("init", "-q", "--bare" if bare else "-q", str(path))
    info = path / "info"
    info.mkdir(exist_ok=True)
    attributes = info / "attributes"
    if not attributes.exists() or attributes.read_bytes() != NEUTRAL_ATTRIBUTES:
        attributes.write_bytes(NEUTRAL_ATTRIBUTES)
    exclude = info / "exclude"
    if exclude.exists() and exclude.stat().st_size:
        exclude.write_bytes(b"")


def write_object(git_dir: Path, kind: bytes, data: bytes) -> str:
    """Store a loose object as git writes one (zlib of "<kind> <size>\\0" + data, in a
    temporary file renamed into objects/XX/, read-only), with no process; its sha1 id."""
    header = b"%s %d\0" % (kind, len(data))
    digest = hashlib.sha1(header)
    digest.update(data)  # not header + data: that copies the file
    sha = digest.hexdigest()
    path = git_dir / "objects" / sha[:2] / sha[2:]
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f"tmp_obj_{os.getpid()}_{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(zlib.compress(header + data, 1))
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    return sha


def write_commit(git_dir: Path, tree: str, parent: Optional[str], message: str) -> str:
    """The commit `git commit-tree TREE [-p PARENT] -m MESSAGE` makes with GIT_IDENTITY (the
    same bytes, so the same id), written without a process."""
    ident = "patchwire <patchwire@localhost> 1700000000 +0000"
    head = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "") + f"author {ident}\ncommitter {ident}\n"
    return write_object(git_dir, b"commit", f"{head}\n{message}\n".encode())


def check_relative_path(path: str) -> str:
    """A safe repository-relative path, or UsageError."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\0" in path
            or any(p in ("", ".", "..") for p in parts) or ".git" in parts):
        raise UsageError(f"unsafe path in file list: {path!r}")
    return path


def set_index_paths(git: Git, paths: Sequence[str]) -> None:
    """Make the index hold exactly `paths`, re-hashing only files whose stat changed: O(changed)
    plus a stat per file. (Not `git add --pathspec-from-file`: that is quadratic.) Both ends
    use it for a whole listing, the laptop's full scan and the box's full form of an ask."""
    update_index_paths(git, paths, sorted(set(git.ls_files_stage()) - set(paths)))


def update_index_paths(git: Git, changed: Sequence[str], removed: Sequence[str]) -> None:
    """Re-hash `changed` into the index (added, rewritten, or gone: then dropped) and drop
    `removed`: O(changed), the other entries keep their stat data and blobs."""
    if removed:
        git("update-index", "--force-remove", "-z", "--stdin",
            input=b"".join(encode_path(p) + b"\0" for p in removed))
    if changed:
        git("update-index", "--add", "--remove", "-z", "--stdin",
            input=b"".join(encode_path(p) + b"\0" for p in changed))


def encode_path(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# What git says of a path it may not read, on stderr, however far it got: update-index
# `error: open("X"): Permission denied` (a file) or `error: lstat("X"): ...` (its folder),
# diff-files `X: Permission denied`, ls-files `warning: could not open directory 'X/': ...`.
GIT_UNREADABLE = re.compile(rb"^(?:error: (?:open|lstat)\(\"(.+)\"\)"
                            rb"|warning: could not open directory '(.+)'"
                            rb"|(?!(?:error|fatal|warning): )(.+))"
                            rb": (Permission denied|Operation not permitted|Too many open files)$", re.M)


def git_unreadable(stderr: bytes) -> Dict[str, str]:
    """{path: why} of what git's `stderr` says this user may not read."""
    return {_dec(a or b or c): _dec(why) for a, b, c, why in GIT_UNREADABLE.findall(stderr)}


def records_tagged(listing: bytes, tag: bytes) -> Iterator[bytes]:
    """The records of a NUL-separated git listing that start with `tag` ("120000 " in `ls-files
    -s`, "S " in `ls-files -t`), whole: found by bytes.find, in C, so 100,000 records with a few
    such cost a few ms, not a loop over all of them. A record starts the listing or follows a
    NUL (no path holds one), so `tag` inside a path is never taken for it."""
    needle = b"\0" + tag
    found = listing.find(needle)
    at = 0 if listing.startswith(tag) else (found + 1 if found >= 0 else -1)
    while at >= 0:
        end = listing.find(b"\0", at)
        end = len(listing) if end < 0 else end
        yield listing[at:end]
        found = listing.find(needle, end)
        at = found + 1 if found >= 0 else -1


def index_header(index: Path) -> Optional[Tuple[int, int]]:
    """(version, entries) of the git index file at `index` (its own part, when split); None
    when it cannot be read or is not one."""
    try:
        with open(index, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"DIRC":
        return None
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[8:12], "big")


# ================================================================== config files


def parse_toml(text: str, path: Path) -> dict:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PatchwireError(f"{path}: not valid TOML: {e}", "fix the file and try again")


def load_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PatchwireError(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        raise PatchwireError(f"{path}: cannot read it: {e}")
    return parse_toml(text, path)


def dump_toml(data: dict) -> str:
    import tomli_w
    return tomli_w.dumps(data)


class Schema:
    """Validates a TOML table against {key: (type, default)}; errors name file and key."""

    def __init__(self, path: Path, table: str, spec: Dict[str, Tuple[Any, Any]]):
        self.path, self.table, self.spec = path, table, spec

    def read(self, data: Any) -> dict:
        where = f"[{self.table}]" if self.table else "top level"
        if not isinstance(data, dict):
            raise PatchwireError(f"{self.path}: {where} must be a table")
        unknown = sorted(set(data) - set(self.spec))
        if unknown:
            raise PatchwireError(f"{self.path}: unknown key {unknown[0]!r} in {where}",
                                 f"known keys: {', '.join(sorted(self.spec))}")
        out = {}
        for key, (kind, default) in self.spec.items():
            # a default is copied: configs that change their list or table must not share it
            value = data[key] if key in data else copy.deepcopy(default)
            if value is not None and not _is_kind(value, kind):
                raise PatchwireError(
                    f"{self.path}: {self.table + '.' if self.table else ''}{key} must be "
                    f"{_kind_name(kind)}, not {value!r}")
            out[key] = value
        return out


def _is_kind(value: Any, kind: Any) -> bool:
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "str_table":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "int>=0":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "num>=0":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return isinstance(value, kind)


def _kind_name(kind: Any) -> str:
    return {"str_list": "a list of strings", "str_table": "a table of strings",
            int: "a positive integer", "int>=0": "a whole number, 0 or more",
            "num>=0": "a number, 0 or more", float: "a positive number", str: "a string",
            bool: "true or false", dict: "a table", list: "a list"}.get(kind, str(kind))


# --- [box]: the project's setup and checks on the box (both programs read this)
#
# The laptop reads [box] from .patchwire.toml and sends it with the ask; the agent checks it
# again (the laptop is not the only client). `setup` runs in the warm job folder before the AI,
# only when a hash of the setup commands and of the files `setup_when` names changed since the
# last setup that succeeded there; `checks` run after the AI, on its result.

BOX_SCHEMA = {"setup": ("str_list", []), "setup_when": ("str_list", []), "setup_timeout_s": (int, 1800),
              "checks": ("str_list", []), "check_timeout_s": (int, 600)}
MAX_BOX_COMMANDS = 20  # setup commands, and checks, each
MAX_BOX_COMMAND_CHARS = 4000
MAX_BOX_GLOBS = 50
MAX_GLOB_FOLDERS = 32  # names between slashes in one setup_when glob
MAX_BOX_TIMEOUT_S = 86400
# Words that run a tool rather than name it: `flutter test` is the check "test", `npm run lint`
# "lint", `python3 -m pytest -q` "pytest" (the laptop shows "checks: test ok, lint FAILED").
CHECK_RUNNERS = {"dart", "flutter", "npm", "npx", "pnpm", "yarn", "bun", "run", "python", "python3", "-m",
                 "uv", "poetry", "pipenv", "bundle", "exec", "cargo", "go", "make", "sh", "bash", "fvm",
                 "./gradlew", "gradle", "node", "deno", "mix", "dotnet", "swift", "env"}


def check_box(path: Any, data: Any) -> dict:
    """[box] validated (PatchwireError naming `path` and the key): lists of at most
    MAX_BOX_COMMANDS commands of at most MAX_BOX_COMMAND_CHARS characters, no NUL or newline
    in one (a command is one shell line), timeouts of 1..MAX_BOX_TIMEOUT_S seconds."""
    box = Schema(path, "box", BOX_SCHEMA).read(data)
    for key, most in (("setup", MAX_BOX_COMMANDS), ("checks", MAX_BOX_COMMANDS), ("setup_when", MAX_BOX_GLOBS)):
        if len(box[key]) > most:
            raise PatchwireError(f"{path}: box.{key} has {len(box[key])} entries; at most {most}")
        for item in box[key]:
            if not item.strip() or len(item) > MAX_BOX_COMMAND_CHARS or re.search(r"[\x00\n\r]", item):
                raise PatchwireError(f"{path}: box.{key} holds {item[:60]!r}: each entry is one non-empty "
                                     f"line of at most {MAX_BOX_COMMAND_CHARS} characters")
    for pattern in box["setup_when"]:
        if pattern.count("/") >= MAX_GLOB_FOLDERS:
            raise PatchwireError(f"{path}: box.setup_when holds {pattern[:60]!r}: a glob names at most "
                                 f"{MAX_GLOB_FOLDERS} folders and file")
    for key in ("setup_timeout_s", "check_timeout_s"):
        if box[key] > MAX_BOX_TIMEOUT_S:
            raise PatchwireError(f"{path}: box.{key} must be at most {MAX_BOX_TIMEOUT_S} seconds")
    return box


def check_names(commands: Sequence[str]) -> List[str]:
    """A short name per check, from its command: the first word that is not a runner
    (CHECK_RUNNERS) nor an option; a repeated name gets "#2", "#3"."""
    names: List[str] = []
    for command in commands:
        words = [w for w in command.split() if w not in CHECK_RUNNERS and not w.startswith("-")]
        base = re.sub(r"[^A-Za-z0-9._:-]", "", os.path.basename(words[0]) if words else "")[:32] or "check"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return names


class Globs:
    """`setup_when` globs, matched against a path from the project root: `*` and `?` within
    one folder, `**` as a whole folder name any folders (none too; at the end, everything
    below); elsewhere `**` is `*`, as in git. Matched folder by folder, a folder's name by
    fnmatch's expression (which never backtracks without end): the time is in proportion to
    the glob's and the path's sizes. One regular expression for the whole glob backtracked
    exponentially on `**/a/**/a/...` and a deep path, and `re` holds the GIL: one user's
    glob held every thread of the agent."""

    ANY = None  # the token of a `**` folder

    def __init__(self, patterns: Sequence[str]):
        self.globs: List[List[Any]] = []
        for pattern in patterns:
            tokens: List[Any] = []
            for name in pattern.lstrip("/").split("/"):
                if name == "**":
                    if not tokens or tokens[-1] is not Globs.ANY:  # a/**/**/b is a/**/b
                        tokens.append(Globs.ANY)
                elif any(c in name for c in "*?["):
                    tokens.append(re.compile(fnmatch.translate(name.replace("[", "[[]"))).match)
                else:
                    tokens.append(name)
            self.globs.append(tokens)

    def match(self, path: str) -> bool:
        names, name = None, path.rpartition("/")[2]
        for tokens in self.globs:  # the file's name first: most paths end there
            if tokens[-1] is Globs.ANY or Globs._name(tokens[-1], name):
                names = names or path.split("/")
                if self._match(tokens, names):
                    return True
        return False

    @staticmethod
    def _name(token: Any, name: str) -> bool:
        return token == name if isinstance(token, str) else bool(token(name))

    @staticmethod
    def _match(tokens: List[Any], names: List[str]) -> bool:
        if Globs.ANY not in tokens:
            return len(tokens) == len(names) and all(map(Globs._name, tokens, names))
        last = len(tokens)

        def closure(states: Set[int]) -> Set[int]:  # a `**` before the end may match no folder
            out = set(states)
            for i in states:
                while i < last - 1 and tokens[i] is Globs.ANY:
                    i += 1
                    out.add(i)
            return out
        states = closure({0})
        for name in names:
            states = closure({j for i in states if i < last
                              for j in ((i, i + 1) if tokens[i] is Globs.ANY else
                                        (i + 1,) if Globs._name(tokens[i], name) else ())})
            if not states:
                return False
        return last in states


# ================================================================== files, never through a symlink
# The 3-way path, undo and the agent's pruning write files themselves. `open(root / rel)` follows a symlink in any
# parent folder (an ignored `data -> /elsewhere` in the project, or a link a patch just made)
# and would write outside the project; git's own "beyond a symbolic link" check only guards
# plain `git apply`. So every read, write and delete here walks down from the project root
# one folder at a time with O_NOFOLLOW and works relative to that folder's descriptor: a
# symlink in the way is an error, never followed, even if it appears mid-way.


class UnsafePath(PatchwireError):
    exit_status = ExitStatus.PATCH


Root = Union[Path, int]  # a folder's path, or a descriptor of it (opened by open_folder)


def _open_root(root: Root) -> int:
    if isinstance(root, int):
        return os.dup(root)
    return os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _open_parent(root: Root, rel: str, create: bool = False) -> Tuple[int, str]:
    """(descriptor of rel's folder, reached without following a link; rel's last name)."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing the path {sanitize(rel)!r}")
    fd = _open_root(root)
    try:
        for name in parts[:-1]:
            try:
                child = _open_folder_at(fd, name, create)
            except OSError:
                if stat.S_ISLNK(_lstat_at(fd, name)):
                    raise UnsafePath(f"{sanitize(rel)}: {sanitize(name)} on its way is a symlink; Patchwire "
                                     "never reads, writes or deletes through one")
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def _open_folder_at(fd: int, name: str, create: bool) -> int:
    """The folder `name` in folder `fd`, never through a link; made first when missing and
    `create` (tried as it is first: most folders of a write are there already)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0)
    try:
        return os.open(name, flags, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o777, dir_fd=fd)
    except FileExistsError:
        pass
    return os.open(name, flags, dir_fd=fd)


def open_folder(root: Path, rel: str) -> int:
    """A descriptor of the folder root/rel, reached from `root` one real folder at a time: a
    symlink anywhere on the way, rel's own last name included, is UnsafePath naming it, never
    followed. Work relative to the descriptor afterwards, and a link put in the way later
    cannot redirect that work either."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing the path {sanitize(rel)!r}")
    fd = _open_root(root)
    for n, name in enumerate(parts):
        try:
            child = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0), dir_fd=fd)
        except OSError:
            link = stat.S_ISLNK(_lstat_at(fd, name))
            os.close(fd)
            if link:
                raise UnsafePath(f"{sanitize('/'.join(parts[:n + 1]))} is a symlink; Patchwire never "
                                 "follows one there")
            raise
        os.close(fd)
        fd = child
    return fd


def make_folder(root: Path, rel: str, mode: int = 0o700) -> None:
    """Make root/rel and the folders on its way where missing, never through a symlink."""
    fd, name = _open_parent(root, rel, create=True)
    try:
        os.mkdir(name, mode, dir_fd=fd)
    except FileExistsError:
        pass
    finally:
        os.close(fd)


def lstat_beneath(root: Root, rel: str) -> int:
    """The st_mode of root/rel itself (0 when absent), never through a symlink on the way."""
    try:
        fd, name = _open_parent(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        return _lstat_at(fd, name)
    finally:
        os.close(fd)


def _lstat_at(fd: int, name: str) -> int:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return 0


def read_worktree(root: Root, rel: str) -> Optional[Tuple[bytes, str]]:
    """(bytes, git mode) of a file or symlink, None when absent."""
    try:
        fd, name = _open_parent(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        mode = _lstat_at(fd, name)
        if stat.S_ISLNK(mode):
            return os.readlink(os.fsencode(name), dir_fd=fd), "120000"
        if not stat.S_ISREG(mode):
            return None
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as f:
            return f.read(), "100755" if mode & 0o100 else "100644"
    finally:
        os.close(fd)


def remove_file(root: Root, rel: str) -> None:
    """Delete one file (or link) and the folders it leaves empty, never `root` or above,
    never through a symlink."""
    try:
        fd, name = _open_parent(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        mode = _lstat_at(fd, name)
        if mode and not stat.S_ISDIR(mode):
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    parts = rel.split("/")
    for n in range(len(parts) - 1, 0, -1):
        fd, name = _open_parent(root, "/".join(parts[:n]))
        try:
            os.rmdir(name, dir_fd=fd)  # a link in the way is ENOTDIR, never followed
        except OSError:
            return
        finally:
            os.close(fd)


def write_worktree(root: Root, rel: str, data: Optional[bytes], mode: str, mtime_ns: Optional[int] = None,
                   by_rename: bool = True) -> None:
    """Write or delete one file; empty folders left behind go too. Never through a symlink
    (the new file is created O_EXCL|O_NOFOLLOW in its folder, opened link-free). `by_rename`:
    written beside and renamed over the old file, so a reader sees the old bytes or the new;
    otherwise as git's checkout and apply write, the old file unlinked and the new one
    created in its place, for a caller that holds the old bytes to put back itself (900
    files: 0.16 s against 0.23 s by rename, measured here). `mtime_ns`: the file's
    modification time (a copy made as `rsync -a` makes one)."""
    if data is None:
        remove_file(root, rel)
        return
    fd, name = _open_parent(root, rel, create=True)
    made = f".{name}.patchwire-tmp" if by_rename else name
    try:
        here = _lstat_at(fd, name)
        if stat.S_ISDIR(here):
            raise IsADirectoryError(f"{rel} is a folder")
        in_the_way = _lstat_at(fd, made) if by_rename else here  # a temporary left over, or the old file
        if in_the_way:
            os.unlink(made, dir_fd=fd)
        _create_at(fd, made, data, mode, mtime_ns)
        if by_rename:
            os.replace(made, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        if by_rename and _lstat_at(fd, made):
            os.unlink(made, dir_fd=fd)
        os.close(fd)


def _create_at(fd: int, name: str, data: bytes, mode: str, mtime_ns: Optional[int]) -> None:
    """A new file (or symlink, mode 120000) `name` in the folder `fd`; FileExistsError if
    anything is there, a link included."""
    if mode == "120000":
        os.symlink(os.fsdecode(data), name, dir_fd=fd)
        return
    perm = 0o755 if mode == "100755" else 0o644
    with os.fdopen(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm, dir_fd=fd), "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), perm)  # the umask narrowed the mode open() gave
        if mtime_ns is not None:
            f.flush()  # the time is set after the last write, or the write sets it again
            os.utime(f.fileno(), ns=(mtime_ns, mtime_ns))


# ================================================================== what reaches the terminal
# Every string that came from the box (the AI's text, tool names, file names, diff lines,
# error messages) is data. A terminal obeys the escape sequences in it: ESC[2J clears the
# screen so a fake preview can be drawn over the real one, OSC 0 sets the window title,
# OSC 52 writes the clipboard. So control characters are shown the way less shows them
# (^[ for ESC, ^M for CR), C1 controls and bidirectional overrides as <U+XXXX>, bytes that
# are not UTF-8 as \xNN; tab stays.
#
# Beyond controls, what a reader cannot see is shown too: Unicode's format characters (bidi
# marks such as U+061C, zero-width joiners, tag characters U+E0000.. that hide ASCII inside
# one visible glyph), the line and paragraph separators U+2028/U+2029 (some terminals and
# editors break the line there), and the letters and marks that draw nothing: Hangul fillers
# U+3164/U+FFA0/U+115F/U+1160, the blank braille pattern U+2800, the combining grapheme
# joiner U+034F, Khmer's invisible vowels, Mongolian variation selectors and the
# supplementary variation selectors. A name written with them looks like another name.
# Unicode's format characters and default-ignorable code points (assigned or not), and the
# variation selectors: `allowed\ufe00` is another name than `allowed` to Python and JavaScript,
# drawn the same. FE0E/FE0F stay after an emoji-like symbol (no identifier holds one), where
# they pick text or emoji style.
_INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e"
              "\u2060-\u206f\u2800\u3164\ufe00-\ufe0d\ufeff\uffa0\ufff0-\ufffb\u0600-\u0605\u06dd"
              "\u070f\u0890\u0891\u08e2\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
              "\U0001d173-\U0001d17a\U000e0000-\U000e0fff")
# the emoji that take a style selector: none a letter (kana, Kelvin sign, Roman numerals are)
_EMOJI_BASES = ("\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf"
                "\u23e9-\u23f3\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf"
                "\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299\U0001f000-\U0001faff")
_LONE_VARIATION = f"(?<![{_EMOJI_BASES}])[\ufe0e\ufe0f]"
_UNSAFE_FOR_TERMINAL = re.compile(f"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff{_INVISIBLE}]|{_LONE_VARIATION}")
_UNSAFE_KEEP_NEWLINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff{_INVISIBLE}]|{_LONE_VARIATION}")
# With newlines kept, a line of box text must not start at column 0, where it could pass for
# the program's own line ("patchwire: applied job ..."): continuation lines are indented.
_LINE_AT_COLUMN_0 = re.compile("\n(?=[^ \t\n])")


def sanitize(text: str, keep_newlines: bool = False) -> str:
    """`text` with every control and invisible character made visible: safe to print to a
    terminal. With `keep_newlines`, each line after the first starts indented."""
    if not keep_newlines:
        return _UNSAFE_FOR_TERMINAL.sub(_visible, str(text))
    return _LINE_AT_COLUMN_0.sub("\n  ", _UNSAFE_KEEP_NEWLINES.sub(_visible, str(text)))


def _visible(m: "re.Match") -> str:
    code = ord(m.group())
    if code < 0x20 or code == 0x7F:
        return "^" + chr(code ^ 0x40)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, carried by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"<U+{code:04X}>"


def clip_words(text: str, limit: int, keep_end: bool = False) -> str:
    """`text` in at most about `limit` characters, cut between words (a file or module name cut
    in half reads as another name), "..." where it was cut; `keep_end` keeps the end (the
    tail of a program's stderr) instead of the start. A single word longer than half the
    limit is cut where it must be."""
    if len(text) <= limit:
        return text
    if keep_end:
        part = text[-limit:]
        space = re.search(r"\s", part)
        return "..." + (part[space.end():] if space and space.start() < limit // 2 else part).lstrip()
    part = text[:limit]
    spaces = [m.start() for m in re.finditer(r"\s", part)]
    return (part[:spaces[-1]] if spaces and spaces[-1] > limit // 2 else part).rstrip() + " ..."


def csv_cell(value: Any) -> Any:
    """A cell for a spreadsheet: a string starting with = + - @ (or a tab or CR) is a formula
    to Excel, LibreOffice and Sheets (`=HYPERLINK(...)`, `=cmd|...`), so it gets a leading
    apostrophe, which they show as text; control characters are escaped. Numbers stay."""
    if not isinstance(value, str):
        return value
    text = sanitize(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def say(*parts: str) -> None:
    print(*parts, file=sys.stderr, flush=True)


def output(args, result: Any, human=None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, default=str), flush=True)
    elif human:
        human(result)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_wait(seconds: int) -> str:
    """A wait as a person plans it: seconds under two minutes, then minutes, then hours."""
    if seconds < 120:
        return f"{seconds} s"
    minutes = -(-seconds // 60)  # rounded up: "try again in 12 min" must not be too early
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


def in_minutes(text: str) -> str:
    """Every "N s" of the box's words (a rate limit's window and wait) as human_wait says it."""
    return re.sub(r"\b(\d{1,7}) s\b", lambda m: human_wait(int(m.group(1))), text)


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def describe_apply_failure(stderr: bytes) -> str:
    lines = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("error: "):
            lines.append("  " + line[len("error: "):])
    return "\n".join(dict.fromkeys(lines)) or "  " + stderr.decode("utf-8", "replace").strip()


def print_checks(checks: List[dict], stream=None) -> None:
    stream = stream or sys.stderr
    for c in checks:
        print(sanitize(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}"), file=stream)
        if not c["ok"] and c.get("fix"):
            print(sanitize(f"     fix: {c['fix']}"), file=stream)


# ================================================================== usage reports (`patchwire usage`, `patchwire-agent usage`)


# Usage reports, shared with patchwire-agent's `usage`: the figures of GET /v1/usage in
# table order, with their headings.
USAGE_HEADINGS = (("asks", "asks"), ("done", "done"), ("failed", "failed"), ("cancelled", "cancel"),
                  ("ai_minutes", "AI min"), ("turns", "turns"), ("tokens_in", "tok in"),
                  ("tokens_out", "tok out"), ("cache_read_tokens", "cache rd"),
                  ("cache_write_tokens", "cache wr"), ("cost_usd", "cost $"), ("files_changed", "files"),
                  ("lines_added", "+lines"), ("lines_removed", "-lines"), ("queue_wait_minutes", "wait min"),
                  ("checked", "checked"), ("checks_passed", "passed"))
USAGE_SINCE_CHECKS = ("checked", "checks_passed")  # figures an older box does not send


def usage_rows(report: dict) -> List[List[str]]:
    """Header, one row per group and the total, as strings (the CSV and the table)."""
    key = {"user": "user", "project": "user/project", "day": "day (UTC)"}[report["group"]]
    out = [[key] + [heading for _, heading in USAGE_HEADINGS]]
    for row in report["rows"] + [dict(report["total"], key="total")]:
        name = sanitize(row["key"]) + (" (removed)" if row.get("user_removed") else "")  # the box's text
        out.append([name] + [_figure(field, row[field]) for field, _ in USAGE_HEADINGS])
    return out


def _figure(field: str, value: Any) -> str:
    if field == "cost_usd":
        return f"{value:.4f}"  # a small ask costs cents
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# A usage table fits USAGE_WIDTH columns (a terminal beside an editor) unless --wide: the
# columns read least go first, in this order, and a last line names them.
USAGE_WIDTH = 100
USAGE_DROPPED_FIRST = ("cache wr", "cache rd", "turns", "wait min", "checked", "passed", "-lines", "+lines", "cancel", "files",
                       "tok out", "tok in", "failed")


def usage_table(report: dict, wide: bool = False, left_out: Optional[List[str]] = None) -> List[str]:
    """The table's lines; the headings of the columns left out go to `left_out`."""
    rows = usage_rows(report)
    keep = list(range(len(rows[0])))
    left_out = [] if left_out is None else left_out
    for heading in USAGE_DROPPED_FIRST:
        if wide or _table_width(rows, keep) <= USAGE_WIDTH:
            break
        keep.remove(rows[0].index(heading))
        left_out.append(heading)
    rows = [[r[i] for i in keep] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return lines[:-1] + ["-" * len(lines[0])] + lines[-1:]


def _table_width(rows: List[List[str]], columns: List[int]) -> int:
    return sum(max(len(r[i]) for r in rows) for i in columns) + 2 * (len(columns) - 1)


def usage_csv(report: dict) -> str:
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([report["group"]] + [f for f, _ in USAGE_HEADINGS] + ["user_removed"])
    for row in report["rows"] + [dict(report["total"], key="total")]:
        removed = {True: "yes", False: "no"}.get(row.get("user_removed"), "")
        writer.writerow([csv_cell(row["key"])] + [csv_cell(row[f]) for f, _ in USAGE_HEADINGS] + [removed])
    return buffer.getvalue()


def print_usage(args, report: dict) -> None:
    """--json, --csv or a table (with the time range above it)."""
    if getattr(args, "csv", False):
        sys.stdout.write(usage_csv(report))
        return
    def human(r: dict) -> None:
        span = [time.strftime("%Y-%m-%d %H:%M", time.gmtime(r[k])) for k in ("since", "until")]
        print(f"usage from {span[0]} to {span[1]} UTC" + (f", user {sanitize(r['user'])}" if r.get("user") else ""))
        left_out: List[str] = []
        print("\n".join(usage_table(r, getattr(args, "wide", False), left_out)))
        if left_out:  # on stderr: stdout stays the table
            say(f"left out to fit {USAGE_WIDTH} columns: {', '.join(left_out)}; --wide shows them")
    output(args, report, human)


def add_usage_arguments(parser: argparse.ArgumentParser, by: str) -> None:
    """Shared by `patchwire usage` and `patchwire-agent usage`."""
    parser.add_argument("--since", default="30d", help="7d, 12h, 2026-11-01 or an ISO time (default %(default)s)")
    parser.add_argument("--until", help="the end, same forms (a bare day counts whole; default now)")
    parser.add_argument("--by", choices=("user", "project", "day"), default=by,
                        help="one row per user, project or UTC day (default %(default)s)")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout")
    parser.add_argument("--wide", action="store_true",
                        help=f"every column, however wide (the table fits {USAGE_WIDTH} columns otherwise)")


# ================================================================== command line


def run_command(prog: str, commands: dict, args, on_error=None) -> int:
    """Run the chosen cmd_*: an expected failure becomes one line on stderr and its exit
    status, never a traceback. Both programs' main() end here."""
    try:
        try:
            return commands[args.command][0](args)
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            raise os_failure(e) from None
    except PatchwireError as e:
        say(sanitize(f"{prog}: {e}", keep_newlines=True))  # messages may quote the box or git
        if on_error:
            on_error(e)
        return int(e.exit_status)
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        return 0


def os_failure(e: OSError) -> "PatchwireError":
    """An OSError that reached the top (a full disk, a folder it may not write) as one line
    naming the file and the way out, never a traceback."""
    where = f" ({e.filename})" if e.filename else ""
    code = errno.errorcode.get(e.errno or 0, "")
    fix = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there",
           errno.EACCES: "check that folder's owner and mode", errno.EROFS: "that disk is read-only"}.get(
               e.errno or 0, "fix the cause")
    return PatchwireError(f"{e.strerror or e}{where}" + (f" [{code}]" if code and e.errno not in (
        errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS) else ""), f"{fix}, then run it again")


# Where the agent keeps a project's mirror, under its state folder (the agent's mirror_root);
# the laptop refuses to rsync into any other place (local_mirror_problem).
MIRROR_LAYOUT = ("users", "{user}", "mirror", "{project}")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """The parsed arguments, or the exit status argparse chose (help, version, usage)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)


# ##################################################################################################
# LAPTOP: the `patchwire` command. Nothing below is imported by the agent.
# ##################################################################################################


# ================================================================== constants

CONFIG_NAME = ".patchwire.toml"
DEFAULT_AGENT_URL = "http://127.0.0.1:7433"

# Secrets never leave the laptop, whatever git says. Matched case-insensitively, in one
# compiled expression (`PathMatcher`): a pattern without "/" matches a file's name at any
# depth, one ending in "/" a folder (everything under it), one with "/" elsewhere the end of
# the path at any depth ("*" there crosses folders), one starting with "/" from the project
# root. `[sync] deny` adds, `[sync] allow` lets a matching path through (".env.example").
DEFAULT_DENY = (
    ".env", ".env.*", ".env_*", ".env-*", "*.env", "env.local", ".envrc", ".dev.vars", ".dev.vars.*",
    "*.pem", "*.key", "*.key.bak", "*.key.old", "*.pem.bak", "*.p12", "*.pfx", "*.keystore",
    "*.jks", "*.der", "*.crt", "*.ppk", "*.asc", "AuthKey_*.p8", "*.p8",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    ".netrc", ".pgpass", ".npmrc", ".pypirc", ".yarnrc.yml", "*.kdbx", ".htpasswd",
    ".git-credentials", ".docker/config.json", ".kube/config", "settings.xml", "settings-security.xml",
    "terraform.tfstate", "terraform.tfstate.*", "*.tfstate", "*.tfvars", "*.tfvars.json",
    "credentials", "credentials.json", "*credentials*.json", "client_secret*.json",
    "service-account*.json", "service_account*.json", "serviceAccountKey*.json",
    "*firebase-adminsdk*.json", "*keyfile*.json", "keystore.properties",
    ".aws/*", ".ssh/*", ".gnupg/*", "secrets/", ".secrets/",
    "secrets.*", "*.secret", "*.secrets",
    "google-services.json", "GoogleService-Info.plist", "key.properties",
    # keys, tokens and keystores under other names they commonly have
    "deploy_key*", "*_rsa", "*_dsa", "*_ecdsa", "*_ed25519", "ssh_host_*_key", "*.bks", "*.pkcs12",
    "*.jks.*", "*.keystore.*", "*.p12.*", ".vault-token", "*.keytab", "kubeconfig", "*.kubeconfig",
    ".terraformrc", "terraform.rc", ".s3cfg", ".my.cnf", "_netrc", ".yarnrc", "pip.conf", "*.ovpn",
    "auth.json", "token.json", "token.pickle", "*-key.json", "*_key.json", "secret.json", "secret.yaml",
    "secret.yml", ".cargo/credentials", ".cargo/credentials.toml", ".gradle/gradle.properties",
    ".config/gcloud/*", ".azure/*", ".config/gh/hosts.yml", ".*_history",
)
# A file's first bytes that mark a private key or a keystore, whatever its name
SECRET_MARKS = (b"PRIVATE KEY-----", b"PuTTY-User-Key-File", b"\xfe\xed\xfe\xed")
SNIFF_BYTES = 128
SNIFF_MAX_BYTES = 64 * 1024  # larger files without an extension are not read
DEFAULT_MAX_FILE_MB = 50
# Folders that are usually build output or downloaded dependencies: the dry run warns when git
# does not ignore them (`[sync] exclude` leaves them out for Patchwire only).
HEAVY_FOLDERS = ("node_modules", "Pods", "build", ".dart_tool", ".gradle", ".venv", "venv",
                 "target", "DerivedData", ".next", "dist")
# Sync records kept in Patchwire's store per project (a job's 3-way merge base is one of them).
RECORDS_KEPT = 30
RECORDS_PRUNE_AT = 40
# `details.code` of apply's JSON error when files are in the way of a new file or a rename
# (the VS Code extension offers to replace them: apply --overwrite-untracked).
CODE_IN_THE_WAY = "in_the_way"


HELP_EPILOG = (textwrap.fill("exit codes: " + ", ".join(f"{int(s)} {s.meaning}".replace(" ", "\0")
                                                          for s in ExitStatus),  # \0: never split an entry
                             width=88, subsequent_indent="            ").replace("\0", " ")
               + "\nenvironment: PATCHWIRE_TOKEN (bearer token), PATCHWIRE_TIMEOUT (seconds a request may take), "
                 "NO_COLOR, PAGER\n")


# ================================================================== config


LAPTOP_SCHEMA = {
    "agent": (str, DEFAULT_AGENT_URL), "token_file": (str, None), "ssh": (str, None), "ca_file": (str, None),
    "project": (str, None), "sync": (dict, {}), "notify": (dict, {}), "box": (dict, {}),
}
SYNC_SCHEMA = {"deny": ("str_list", []), "allow": ("str_list", []), "exclude": ("str_list", []),
               "max_file_mb": (float, DEFAULT_MAX_FILE_MB), "submodules": (bool, False),
               "ssh_options": ("str_list", []), "rsync": (str, "rsync")}
# [notify]: a desktop notification when an attached ask or wait took at least after_s
NOTIFY_SCHEMA = {"desktop": (bool, True), "after_s": ("num>=0", 30)}


class LaptopConfig:
    """The project's .patchwire.toml."""

    def __init__(self, root: Path, data: dict, path: Path):
        top = Schema(path, "", LAPTOP_SCHEMA).read(data)
        sync = Schema(path, "sync", SYNC_SCHEMA).read(top["sync"])
        notify = Schema(path, "notify", NOTIFY_SCHEMA).read(top["notify"])
        self.notify_desktop: bool = notify["desktop"]
        self.notify_after_s: float = notify["after_s"]
        self.root, self.path = root, path
        self.agent = top["agent"].rstrip("/")
        self.token_file = top["token_file"]
        # an https agent with its own (self-signed) certificate: the PEM file to trust
        self.ca_file = str(root / os.path.expanduser(top["ca_file"])) if top["ca_file"] else None
        self.ssh, self.ssh_port = parse_ssh_destination(top["ssh"], path)
        self.project = top["project"] or default_project_name(root)
        if not NAME_RE.fullmatch(self.project):
            raise PatchwireError(f"{path}: project {self.project!r} is not a valid name",
                                 "use letters, digits, '.', '_' and '-' (at most 64)")
        if urllib.parse.urlsplit(self.agent).scheme not in ("http", "https"):
            raise PatchwireError(f"{path}: agent must be an http:// or https:// URL, "
                                 f"not {self.agent!r}")
        self.deny = list(DEFAULT_DENY) + sync["deny"] + self._token_inside()
        self.allow = sync["allow"]
        self.exclude = sync["exclude"]
        self.max_file_mb = sync["max_file_mb"]
        self.submodules = sync["submodules"]
        self.ssh_options = sync["ssh_options"]
        self.rsync = sync["rsync"]
        self.box = check_box(path, top["box"])  # setup and checks on the box, sent with each ask
        self.box_written = set(top["box"])  # what the ask sends: a timeout left out is the box's to set

    def ssh_argv(self) -> List[str]:
        """`ssh` with the user's options and the port, without the destination."""
        return ["ssh", *self.ssh_options, *(["-p", str(self.ssh_port)] if self.ssh_port else [])]

    def _token_inside(self) -> List[str]:
        """A token file kept inside the project never leaves with it."""
        if not self.token_file:
            return []
        path = Path(os.path.expanduser(self.token_file))
        try:
            rel = (path if path.is_absolute() else self.root / path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return []
        return ["/" + glob.escape(rel.as_posix())]

    @classmethod
    def find(cls, start: Optional[Path] = None, trusted: bool = True) -> "LaptopConfig":
        """The nearest .patchwire.toml here or above; `trusted`: its settings that say where
        the token and files go and what runs must be as this account wrote or trusted them."""
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            path = folder / CONFIG_NAME
            if path.is_symlink():
                raise UsageError(f"{path} is a symlink: Patchwire reads only a .patchwire.toml that is a file "
                                 "of its own (a repository can ship a link to any file of yours)",
                                 "replace it by the file itself, or write one: `patchwire init --force ...`")
            if path.is_file():
                data = load_toml(path)
                cfg = cls(folder, data, path)  # a broken file says first what is broken
                if trusted and not Trust.holds(path, data):
                    raise Trust.refusal(path)
                return cfg
        raise UsageError(f"no {CONFIG_NAME} here or in any parent folder",
                         "run `patchwire init --agent URL --token-file PATH` in the project root")

    def token_path(self) -> Optional[Path]:
        if not self.token_file:
            return None
        path = Path(os.path.expanduser(self.token_file))
        return path if path.is_absolute() else self.root / path

    def token_source(self) -> str:
        """Where the token comes from, for messages: PATCHWIRE_TOKEN wins over token_file."""
        if os.environ.get("PATCHWIRE_TOKEN", "").strip():
            return "PATCHWIRE_TOKEN"
        return f"the token file {self.token_path()}"

    def token(self) -> str:
        token = os.environ.get("PATCHWIRE_TOKEN", "").strip()
        if token:
            return token
        path = self.token_path()
        if path is None:
            raise UsageError("no token: set PATCHWIRE_TOKEN or token_file in " + str(self.path))
        put_it_there = (f"the box printed your token once (`patchwire-agent init` or `user add`): "
                        f"put it in {path} (mkdir -p {shlex.quote(str(path.parent))}; "
                        f"install -m 600 /dev/null {shlex.quote(str(path))}), or set PATCHWIRE_TOKEN")
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read the token file {path}: {e.strerror}", put_it_there) from None
        if not token:
            raise UsageError(f"the token file {path} is empty", put_it_there)
        warn_if_shared(path)
        return token


class Trust:
    """Which .patchwire.toml files this account wrote (`init`) or trusted (`patchwire trust`),
    as direnv's `allow` does: a repository can ship one, and its `agent`, `token_file`,
    `ssh_options` and `rsync` would send the token and the project where it says and run its
    programs as you, its `allow` would let secrets through. Kept by the file's real path with
    a sha256 of those settings (their values as written: other edits need no new trust)."""

    KEYS = ("agent", "token_file", "ssh", "ca_file", "project")
    SYNC_KEYS = ("ssh_options", "rsync", "allow", "max_file_mb", "submodules")

    @classmethod
    def digest(cls, data: dict) -> str:
        sync = data.get("sync") if isinstance(data.get("sync"), dict) else {}
        picked = {**{k: data.get(k) for k in cls.KEYS}, **{"sync." + k: sync.get(k) for k in cls.SYNC_KEYS}}
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()

    @staticmethod
    def _file() -> Path:
        return state_dir() / "trusted.json"

    @classmethod
    def _read(cls) -> Dict[str, str]:
        try:
            kept = json.loads(cls._file().read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: nothing is trusted, and trusting again mends it
        return {k: v for k, v in kept.items() if isinstance(v, str)} if isinstance(kept, dict) else {}

    @staticmethod
    def key(path: Path) -> str:
        """The file's own path (its folder resolved, the file itself not): a link elsewhere
        is never the file it points to (LaptopConfig.find refuses links anyway)."""
        return str(path.parent.resolve() / path.name)

    @classmethod
    def holds(cls, path: Path, data: dict) -> bool:
        return cls._read().get(cls.key(path)) == cls.digest(data)

    @classmethod
    def record(cls, path: Path, data: dict) -> None:
        folder = state_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = {**cls._read(), cls.key(path): cls.digest(data)}
        write_whole(cls._file(), json.dumps(kept, indent=1))

    @classmethod
    def refusal(cls, path: Path) -> UsageError:
        return UsageError(
            f"{path} is not trusted here: `patchwire init` did not write it, nor did you trust it, or its "
            "agent, token_file, ssh, ca_file, project or [sync] ssh_options, rsync, allow, max_file_mb or submodules "
            "changed since. They say where your token and files go and which programs run, and a repository "
            "can ship this file; nothing was sent or run (a project set up before configs needed trust: trust it once)",
            f"read it; if those settings are yours, run `patchwire trust` in {shlex.quote(str(path.parent))}; "
            "or write your own: `patchwire init --force --agent URL --token-file PATH [--ssh USER@HOST]`",
            details={"code": "untrusted", "config": str(path)})


SSH_DESTINATION_RE = re.compile(
    r"(?:ssh://)?(?P<dest>(?:[^@/\s:]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^@/\s:\[\]]+))(?::(?P<port>\d{1,5}))?/?")


def parse_ssh_destination(value: Optional[str], path: Path) -> Tuple[Optional[str], Optional[int]]:
    """`host`, `user@host`, `user@host:port` or `ssh://user@host[:port]` -> (user@host, port).

    ssh itself takes the port only as `-p` or from ~/.ssh/config; `host:2222` handed to it as
    is fails much later as "Could not resolve hostname host:2222"."""
    if not value:
        return None, None
    m = SSH_DESTINATION_RE.fullmatch(value.strip())
    if m and m.group("dest").startswith("-"):  # `-oProxyCommand=...`, `ssh://-o...`: an option to ssh
        m = None
    if not m or (m.group("port") and not 0 < int(m.group("port")) < 65536):
        raise PatchwireError(
            f"{path}: ssh = {value!r} is not an SSH destination",
            "use USER@HOST, USER@HOST:PORT, ssh://USER@HOST:PORT or a Host alias from ~/.ssh/config "
            "(the folder on the box comes from the agent, not from this setting)")
    dest = m.group("dest")  # an IPv6 address keeps its brackets: rsync needs them, ssh drops them
    return dest, int(m.group("port")) if m.group("port") else None


SSH_FAILURES = (  # what ssh says on stderr -> what to do about it
    (("Connection refused",),
     "nothing accepts SSH connections at {where}: is sshd running on the box, and is the port "
     "right? (ssh = \"USER@HOST:PORT\" in .patchwire.toml, or Port in ~/.ssh/config)"),
    (("Could not resolve hostname", "Name or service not known", "nodename nor servname"),
     "{host} is not a known host name: check the spelling, or describe it as a Host in ~/.ssh/config"),
    (("Connection timed out", "Operation timed out", "No route to host"),
     "the box does not answer at {where}: is it on and reachable (Tailscale up)?"),
    (("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED"),
     "the box's host key is unknown or has changed: run `{ssh}` once, check the fingerprint and "
     "accept it (or fix the old line in ~/.ssh/known_hosts)"),
    # rsync's own refusals on the box ("mkdir \"...\" failed: Permission denied (13)") carry
    # ssh's words too: a folder of the box's state the box account cannot write, not the login
    (("failed: Permission denied", "failed: Read-only file system"),
     "the box logged you in, but its folder for your projects is not writable by its account: "
     "ask the box's admin to run `patchwire-agent doctor` there (it names the folder and the fix)"),
    (("Permission denied", "Too many authentication failures"),
     "the box refused the login: set up a key (ssh-copy-id {copy_id}), check the user name, and "
     "check that `{ssh}` works without a password"),
    (("rsync: command not found", "rsync: not found", "rsync: No such file"),
     "rsync is missing on the box: install it there (Debian/Ubuntu: sudo apt install rsync)"),
)


def ssh_failure_hint(cfg: "LaptopConfig", stderr: str) -> str:
    """The fix for an SSH failure, from what ssh said; a general one when it is unclear."""
    ssh = " ".join(shlex.quote(a) for a in [*cfg.ssh_argv(), cfg.ssh or ""])
    host = (cfg.ssh or "").rpartition("@")[2]
    where = f"{host} port {cfg.ssh_port}" if cfg.ssh_port else host
    copy_id = " ".join(shlex.quote(a) for a in (["-p", str(cfg.ssh_port)] if cfg.ssh_port else [])
                       + [cfg.ssh or ""])
    for needles, hint in SSH_FAILURES:
        if any(n in stderr for n in needles):
            return hint.format(where=where, host=host, ssh=ssh, copy_id=copy_id)
    return f"check that `{ssh}` works without a password and that rsync is installed on the box"


def warn_if_shared(path: Path) -> None:
    """A token others can read is a leaked token: say so on every command (doctor fails on it)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        say(f"warning: the token file {path} is readable by other users of this machine; "
            f"fix: chmod 600 {shlex.quote(str(path))}")


def default_project_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip(".-_") or "project"
    return name[:64]


# ================================================================== files: what leaves the laptop


class PathMatcher:
    """Shell-style patterns with the rules written at DEFAULT_DENY, compiled once into four
    case-insensitive expressions (by kind of pattern), so 20,000 paths cost a few regex runs
    each rather than 1.5 M fnmatch calls. `match` returns the first pattern that matches."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)
        kinds: Dict[str, List[str]] = {"name": [], "folder": [], "tail": [], "root": []}
        for i, pattern in enumerate(self.patterns):
            kind, regex = _pattern_regex(pattern)
            kinds[kind].append(f"(?P<p{i}>{regex})")
        self._name = _alternation(kinds["name"])  # the file's name, whole
        self._root = _alternation(kinds["root"])  # the whole path
        self._tail = _alternation(kinds["tail"], r"(?:^|/)(?:", r")\Z")  # the path's end
        self._folder = _alternation(kinds["folder"])  # any one folder name on the path
        self._folders: Dict[str, Optional[str]] = {}  # folder -> pattern: files share folders

    def match(self, path: str) -> Optional[str]:
        if not self.patterns:
            return None
        folder, _, name = path.rpartition("/")
        m = ((self._name and self._name.fullmatch(name)) or (self._root and self._root.fullmatch(path))
             or (self._tail and self._tail.search(path)))
        if m:
            return self._which(m)
        return self._folder_match(folder) if folder and self._folder else None

    def _folder_match(self, folder: str) -> Optional[str]:
        todo = []  # the folders not seen yet, deepest first: a loop, however deep the path
        while folder and folder not in self._folders:
            todo.append(folder)
            folder = folder.rpartition("/")[0]
        hit = self._folders[folder] if folder else None
        for one in reversed(todo):
            if hit is None:
                m = self._folder.fullmatch(one.rpartition("/")[2])
                hit = self._which(m) if m else None
            self._folders[one] = hit
        return hit

    def _which(self, m: "re.Match") -> str:
        return self.patterns[int(m.lastgroup[1:])]


def _alternation(parts: List[str], head: str = "(?:", tail: str = ")") -> Optional["re.Pattern"]:
    return re.compile(head + "|".join(parts) + tail, re.IGNORECASE | re.DOTALL) if parts else None


def _pattern_regex(pattern: str) -> Tuple[str, str]:
    """(kind, regex) of one pattern; see DEFAULT_DENY for what each kind matches."""
    body = pattern.strip("/")
    below = "/.*" if pattern.endswith("/") else ""
    if pattern.startswith("/"):
        return "root", _glob_regex(body, ".*") + below
    if "/" in body:
        return "tail", _glob_regex(body, ".*") + below
    if below:
        return "folder", _glob_regex(body, "[^/]*")
    return "name", _glob_regex(body, "[^/]*")


def _glob_regex(pattern: str, star: str) -> str:
    """fnmatch's syntax (*, ?, [seq], [!seq]) as a regex; `star` is what * may cross."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(star)
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + (pattern[i:i + 1] == "!")
            j += pattern[j:j + 1] == "]"
            j = pattern.find("]", j)
            if j < 0:
                out.append(r"\[")
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            body = re.sub(r"([\\\[\]&~|^])", r"\\\1", body[negate:])
            out.append("[" + ("^" if negate else "") + body + "]")
        else:
            out.append(re.escape(c))
    return "".join(out)


class SyncRules:
    """What `[sync]` says about the files git lists, compiled once per command."""

    def __init__(self, deny: Sequence[str] = DEFAULT_DENY, allow: Sequence[str] = (),
                 exclude: Sequence[str] = (), max_file_mb: float = DEFAULT_MAX_FILE_MB,
                 submodules: bool = False):
        self.deny = PathMatcher(deny)
        self.allow = PathMatcher(allow)
        # exclude works like a .gitignore line: a bare name is a file or a folder
        self.exclude = PathMatcher([CONFIG_NAME] + [q for p in exclude for q in ((p,) if "/" in p else (p, p + "/"))])
        # the ones git can apply itself while walking (so it never enters node_modules/)
        self.git_excludes = [p for p in exclude if "/" not in p.rstrip("/") and not p.startswith("!")]
        self.max_file_mb = max_file_mb
        self.max_bytes = int(max_file_mb * 1024 * 1024)
        self.submodules = submodules
        # what a listing depends on besides the files: a scan kept under other rules is no base
        self.fingerprint = hashlib.sha256(json.dumps(
            [list(deny), list(allow), list(exclude), max_file_mb, submodules]).encode()).hexdigest()

    @classmethod
    def of(cls, cfg: "LaptopConfig") -> "SyncRules":
        return cls(cfg.deny, cfg.allow, cfg.exclude, cfg.max_file_mb, cfg.submodules)


Stat = Tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode: what says "it moved"


def stat_key(st: os.stat_result) -> Stat:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class FileList:
    """A project's listing: the paths to send (with their stat data, to notice files that
    change while they are sent), what is held back and why, and notes for the dry run."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: List[str] = []
        self.stats: Dict[str, Stat] = {}
        self.held: Dict[str, str] = {}
        self.links = 0
        self.heavy: Dict[str, List[int]] = {}  # untracked heavy folder -> [files, bytes]
        self.unused_allow: List[str] = []
        # A listing of changes only (Project.scan_changes): `paths` then holds just the new and
        # changed files (to re-hash and send), `removed` what leaves the record, `total` the
        # number of files in the record afterwards. None: `paths` is the whole listing.
        self.removed: Optional[List[str]] = None
        self.total = 0
        # tracked files not in the worktree (deleted, not `git rm`-ed): watched by the next
        # quick scan, as git's untracked cache never lists a tracked file coming back
        self.absent: List[str] = []
        # tracked files outside a sparse checkout (skip-worktree, not here): never sent
        self.outside_sparse = 0
        # what the next scan_quick checks to build on this listing (QuickKey), when it can
        self.quick: Optional[dict] = None
        # the repositories inside the project whose files go ("a/b/"): scan_changes lists each
        self.nested: List[str] = []
        self.linked_folders: Dict[str, bool] = {}  # folder -> whether it, or one above it, is a symlink

    @property
    def count(self) -> int:
        """How many files the project sends in all."""
        return len(self.paths) if self.removed is None else self.total

    def add(self, path: str, st: os.stat_result, tracked: bool) -> None:
        self.paths.append(path)
        self.stats[path] = stat_key(st)
        self.links += stat.S_ISLNK(st.st_mode)
        if not tracked and "/" in path:
            parts = path.split("/")[:-1]
            for i, part in enumerate(parts):
                if part in HEAVY_FOLDERS:
                    totals = self.heavy.setdefault("/".join(parts[:i + 1]) + "/", [0, 0])
                    totals[0] += 1
                    totals[1] += st.st_size
                    break

    def size(self, path: str) -> int:
        return self.stats[path][0]

    def note(self, paths: Iterable[str]) -> None:
        """Take the stat data of `paths` the listing did not look at (a listing of changes
        leaves out files recorded by an earlier sync that were not sent then)."""
        for path in paths:
            if path not in self.stats:
                try:
                    self.stats[path] = stat_key(os.lstat(os.path.join(self.root, path)))
                except OSError:
                    pass

    def moved(self, paths: Iterable[str]) -> List[str]:
        """Paths whose stat data differ from the listing's (rewritten, or gone)."""
        moved, root = [], str(self.root)
        for path in paths:
            try:
                now = stat_key(os.lstat(os.path.join(root, path)))
            except OSError:
                now = None
            if now != self.stats.get(path):
                moved.append(path)
        return moved


class ListingOrder(Exception):
    """git's listing is not in the order ListingWalk relies on."""


def nul_records(data: bytes, piece: int = 2 ** 18) -> Iterator[bytes]:
    """The non-empty NUL-separated records of `data`, split a piece at a time: a whole split
    of a 100,000-file listing is ~9 MB of objects at once."""
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\0", start + piece)
        end = size if end < 0 else end
        yield from filter(None, data[start:end].split(b"\0"))
        start = end + 1


# the quick scan (Project.scan_quick): its file of ignore patterns in the store, and how many
# absent tracked files it watches at most
QUICK_EXCLUDES = "sync-excludes"
QUICK_MAX_ABSENT = 1000


def tracked_part(listing: bytes) -> bytes:
    """The tracked files' records of `ls-files -z -t --others --cached` (git lists the
    untracked ones, tagged "? ", first): the bytes `ls-files -z -t --cached` prints."""
    at = 0
    while listing.startswith(b"? ", at):
        at = listing.index(b"\0", at) + 1
    return listing[at:]


def skip_worktree_paths(listing: bytes) -> Set[str]:
    """The paths `ls-files -z -t` tags "S " (skip-worktree: outside a sparse checkout, where
    git keeps no file)."""
    return {_dec(record[2:]) for record in records_tagged(listing, b"S ")}


def not_skipped(listing: bytes, absent: List[str]) -> List[str]:
    """The files of `absent` (tracked, not here) that the user deleted, without the ones
    `listing` tags skip-worktree: a sparse checkout leaves those out on purpose. Counted as
    absent, the 36,000 files outside a sparse monorepo's 4,000-file cone kept every sync from
    the quick scan (over QUICK_MAX_ABSENT): a sync of one change took 2.08x as long as in a
    project of the cone's files (bench/sparse.py). Nor need the quick scan watch them: a change
    of the sparse checkout rewrites the user's index and the tags it checks."""
    if not absent or not (listing.startswith(b"S ") or b"\0S " in listing):
        return absent
    skipped = skip_worktree_paths(listing)
    return [path for path in absent if path not in skipped]


def quick_ignore_digest(sources: Tuple[str, bytes]) -> str:
    return hashlib.sha256(sources[0].encode() + b"\0" + sources[1]).hexdigest()


class TrackedPaths:
    """Whether a path is in `ls-files -z -t --cached`'s records ("H path\\0"): searched in
    the bytes for the first FIND_MAX questions (a set of 100,000 paths would be 25 MB of the
    laptop's peak, for the few a sync of changes asks about), then from a set."""
    FIND_MAX = 256

    def __init__(self, records: bytes):
        self.records = records
        self.asked = 0
        self.paths: Optional[set] = None

    def __call__(self, raw: bytes) -> bool:
        self.asked += 1
        if self.asked > self.FIND_MAX:
            if self.paths is None:
                self.paths = {rec[2:] for rec in self.records.split(b"\0") if len(rec) > 2}
            return raw in self.paths
        needle = b" " + raw + b"\0"
        at = self.records.find(needle)
        while at > 0 and not (at == 1 or self.records[at - 2] == 0):  # a record's tag, then the path
            at = self.records.find(needle, at + 1)
        return at > 0


class ListingWalk:
    """git's listing of the project (`ls-files -z -t`, untracked files tagged "? ") against
    the record's index (`ls-files -z`), walked side by side in one pass, never held as sets:
    at 100,000 files those were 45 MB of the laptop's peak. Both come sorted by path bytes
    (the index always is; ls-files prints the untracked files sorted, then the tracked ones
    sorted), so the two runs of the listing merge; ListingOrder if anything is out of order.
    Kept: `listed` {path: tracked} of paths new to the record or in `watch`, `gone` the
    recorded paths no longer listed (sorted), `kept` the watched paths listed and recorded,
    `recorded` how many paths the record held."""

    def __init__(self, listing: bytes, recorded: bytes, watch: set):
        self.listed: Dict[bytes, bool] = {}
        self.gone: List[bytes] = []
        self.kept: set = set()
        self.recorded = 0
        records = self._sorted(nul_records(recorded))
        current = next(records, None)
        for raw, tracked in self._merged(listing):
            while current is not None and current < raw:
                self.gone.append(current)
                current = self._next(records)
            if current == raw:
                current = self._next(records)
                if raw in watch:
                    self.listed[raw] = tracked
                    self.kept.add(raw)
            else:
                self.listed[raw] = tracked
        while current is not None:
            self.gone.append(current)
            current = self._next(records)

    def _next(self, records: Iterator[bytes]) -> Optional[bytes]:
        self.recorded += 1
        return next(records, None)

    def _merged(self, listing: bytes) -> Iterator[Tuple[bytes, bool]]:
        """(path, tracked) of the listing in path order, each path once (a conflicted file
        is listed once per merge stage)."""
        untracked = (rec[2:] for rec in nul_records(listing) if rec[:1] == b"?" and len(rec) > 2)
        tracked = (rec[2:] for rec in nul_records(listing) if rec[:1] != b"?" and len(rec) > 2)
        pairs = heapq.merge(((raw, False) for raw in self._sorted(untracked)),
                            ((raw, True) for raw in self._sorted(tracked)))
        last = None
        for raw, is_tracked in pairs:
            if raw != last:
                yield raw, is_tracked
            last = raw

    @staticmethod
    def _sorted(paths: Iterator[bytes]) -> Iterator[bytes]:
        last = b""
        for raw in paths:
            if raw < last:
                raise ListingOrder(raw)
            yield raw
            last = raw


class Project:
    """The user's project folder, wherever its root is (a git repository's top, a folder
    inside one, or a folder without git): which files go, and Patchwire's own git store
    for it, which records what was sent (the 3-way merge base of a job's diff).

    The store is a bare repository under Patchwire's state folder. It reads the user's
    objects through alternates, so files already in the user's history are not copied, and
    nothing points the other way: the user's repository holds no ref, object or config of
    Patchwire's, so `git push --mirror`, `clone` and `gc` there never see it."""

    def __init__(self, root: Path, project: str):
        self.root = root
        self.name = project
        self.user_git: Optional[Git] = None
        self.user_objects: Optional[Path] = None
        # the user's git dir (a linked worktree's common one) when `root` is its worktree's top
        self.user_common: Optional[Path] = None
        self.user_index: Optional[Path] = None  # its index file, then
        # the user's own git (not neutral): their core.excludesFile and the like decide the listing
        probe = Git(cwd=root, neutral=False).run("rev-parse", "--is-inside-work-tree", "--git-dir",
                                                 "--git-common-dir", "--show-prefix", check=False)
        lines = probe.stdout.decode("utf-8", "surrogateescape").splitlines()[:4]
        key = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.private_dir = state_dir() / "projects" / f"{default_project_name(root)}-{key}"
        prepare_private_git_dir(self.private_dir)
        env = {"GIT_INDEX_FILE": str(self.private_dir / "index")}
        self.own_git = Git(cwd=root, git_dir=self.private_dir, work_tree=root, env=env, config=INDEX_CONFIG)
        if probe.returncode == 0 and len(lines) >= 3 and lines[0] == "true" and not _ignored_folder(root, lines):
            self.user_git = Git(cwd=root, neutral=False)
            # the quick scan sees the .gitignore files under `root` only: not for a subfolder
            self.user_common = (root / lines[2]).resolve() if len(lines) > 3 and not lines[3] else None
            self.user_index = (root / lines[1]).resolve() / "index" if self.user_common else None
            self.user_objects = (root / lines[2]).resolve() / "objects"
            env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = quote_alternate(self.user_objects)
            self._forget_legacy_record((root / lines[1]).resolve())
        self.git = Git(cwd=root, git_dir=self.private_dir, work_tree=root, env=env, config=INDEX_CONFIG)
        self._lock_depth = 0

    @contextlib.contextmanager
    def record_lock(self) -> Iterator[None]:
        """Hold this project's record for one command: two syncs or asks at once would both
        write the record's index (git refuses the second: `index.lock: File exists`) and its
        state files, and two asks would each tell the box a base the other has just moved on
        from (a 409, then a checksummed send of everything). flock, not a lock file: the OS
        drops it when the process dies, so a killed command never leaves the project locked.
        Re-entrant within a process (an ask's sync holds it already)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = os.open(self.private_dir / "record.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            # git's own lock on the record's indexes, left by a command killed while git wrote:
            # no other Patchwire process can be writing them now, and git would refuse every sync
            for stale in ("index.lock", "listing.index.lock", "merge.index.lock"):
                with contextlib.suppress(FileNotFoundError):
                    (self.private_dir / stale).unlink()
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)  # closing the last descriptor releases the lock

    @property
    def is_git_repo(self) -> bool:
        return self.user_git is not None

    # --- listing

    def scan(self, rules: SyncRules) -> FileList:
        """Tracked files plus untracked ones git does not ignore, by git's own rules (nested
        .gitignore, a parent folder's too, negations, info/exclude, core.excludesFile), minus
        `[sync] exclude`, the secret deny-list and files over `[sync] max_file_mb`."""
        files, pending = FileList(self.root), [""]
        used_allow: set = set()
        top = self._listing(rules)
        files.quick = self._quick_key(rules, top, None if rules.git_excludes else self.ignore_sources())
        nested_skipped: Set[str] = set()  # outside the sparse checkout of a repository inside
        while pending:
            prefix = pending.pop()
            listing = self._listing(rules, prefix) if prefix else top
            if prefix:
                files.nested.append(prefix)
                nested_skipped |= {prefix + path for path in skip_worktree_paths(listing)}
            for path, tracked in self._list(prefix, rules, listing):
                if path not in files.stats:  # (a conflicted file is listed once per merge stage)
                    self._consider(path, tracked, rules, files, pending, used_allow)
            if pending:
                files.quick = None  # a repository inside the project: its own git lists it
        files.paths.sort()
        files.unused_allow = [p for p in rules.allow.patterns if p not in used_allow]
        deleted = [path for path in not_skipped(top, files.absent) if path not in nested_skipped]
        files.outside_sparse, files.absent = len(files.absent) - len(deleted), deleted
        return files

    def _consider(self, path: str, tracked: bool, rules: SyncRules, files: FileList, pending: List[str],
                  used_allow: set) -> bool:
        """Put one listed path in `files` (to send) or `files.held` (and why); False if it
        goes neither way (excluded, gone, a folder)."""
        if rules.exclude.match(path):
            return False
        try:
            st = os.lstat(os.path.join(self.root, path))
        except PermissionError as e:  # a folder above it this user cannot search: not a deleted file
            raise FilesUnreadable(self.root, {path: e.strerror or "Permission denied"}) from None
        except OSError:
            if tracked:
                files.absent.append(path)
            return False  # deleted from the worktree: it goes from the snapshot too
        if stat.S_ISDIR(st.st_mode):
            self._nested(path.rstrip("/"), tracked, rules, files, pending)
            return False
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            files.held[path] = "not a regular file"
            return False
        if self._beneath_link(path.rpartition("/")[0], files.linked_folders):  # rsync would follow it
            files.held[path] = "beneath a folder that is a symlink: the file lies elsewhere, maybe outside the project"
            return False
        if not path.isascii() and not is_utf8_name(path):
            files.held[path] = NOT_UTF8
            return False
        if path.count("/") >= MAX_FOLDERS_DEEP:
            files.held[path] = TOO_DEEP
            return False
        allowed = rules.allow.match(path)
        if allowed:
            used_allow.add(allowed)
        else:
            why = held_reason(path, st, tracked, rules) or self._secret_inside(path, st)
            if why:
                files.held[path] = why
                return False
        files.add(path, st, tracked)
        return True

    def _beneath_link(self, folder: str, seen: Dict[str, bool]) -> bool:
        """Whether `folder` (relative), or a folder above it, is a symlink; once per folder."""
        # a loop down from the first folder not seen yet, not a call per level: a path 1,200
        # folders deep (git takes it) is no RecursionError
        todo = []
        while folder and folder not in seen:
            todo.append(folder)
            folder = folder.rpartition("/")[0]
        linked = seen.get(folder, False) if folder else False
        for one in reversed(todo):
            linked = seen[one] = linked or os.path.islink(os.path.join(self.root, one))
        return linked

    def _secret_inside(self, path: str, st: os.stat_result) -> Optional[str]:
        """A private key or keystore under a name the deny-list does not know (`deploy_key`,
        `ci/github_rsa`): a small file without an extension is read for its first bytes."""
        name = path.rpartition("/")[2].lstrip(".")
        if not stat.S_ISREG(st.st_mode) or "." in name or st.st_size > SNIFF_MAX_BYTES:
            return None
        try:  # its folders are no links (_beneath_link), and O_NOFOLLOW for the file itself
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO put in its place never blocks
            with os.fdopen(os.open(os.path.join(self.root, path), flags), "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError:
            return None
        for mark in SECRET_MARKS:
            if mark in head:
                return f"holds a private key or keystore ({mark.decode(errors='replace').strip('- ')})"
        return None

    def scan_changes(self, rules: SyncRules, also: Iterable[str] = ()) -> Optional[FileList]:
        """What changed since the last record, found the way `git status` finds it: in one
        pass each, git lists the project and compares every recorded file's stat data with
        the record's index (both in C, at once). Python looks only at what is new, changed,
        held back, or in `also`. Each repository inside the project that the last scan sent
        (`[sync] submodules`) is listed whole by its own git and walked the same way
        (_nested_changes). None when only a full scan can tell: no kept scan, other `[sync]`
        rules, a record changed meanwhile, a repository inside the project come or gone."""
        kept = self._kept_scan()
        if not kept or kept.get("rules") != rules.fingerprint or not self._holds(kept):
            return None
        nested = [str(p) for p in kept.get("nested") or []]
        inside = tuple(encode_path(p) for p in nested)
        if any(a != b and a.startswith(b) for a in inside for b in inside):
            return None  # a repository inside one inside the project: the full scan lists it
        listing, recorded, dirty, sources = in_parallel(
            lambda: self._listing(rules), lambda: self.git.large("ls-files", "-z"),
            lambda: self._dirty(rules), self.ignore_sources)
        watch = set(dirty.split(b"\0")) | {encode_path(p) for p in [*kept.get("held", {}), *kept.get("absent", []),
                                                                      *also]}
        watch.discard(b"")
        top_watch = {raw for raw in watch if not raw.startswith(inside)} if inside else watch
        try:
            walked = ListingWalk(listing, recorded, top_watch)
        except ListingOrder:
            return None  # a git that lists in another order: the full scan tells
        files = FileList(self.root)
        pending: List[str] = []
        gone = [raw for raw in walked.gone if not raw.startswith(inside)] if inside else walked.gone
        files.removed = sorted(_dec(p) for p in gone)
        entries = {raw.rstrip(b"/") + b"/" for raw in walked.listed if raw.startswith(inside) or raw + b"/" in inside}
        if entries != set(inside):
            return None  # one is no repository any more, or another took its place
        for raw in sorted(set(walked.listed) | (top_watch - set(gone))):
            if inside and raw.rstrip(b"/") + b"/" in entries:
                continue  # a repository inside the project: below, by its own git
            path = _dec(raw)
            if raw not in walked.listed or not self._consider(path, walked.listed[raw], rules, files, pending, set()):
                if raw in walked.kept:
                    files.removed.append(path)
        kept_paths = set(walked.kept)
        for prefix in nested:
            if not self._nested_changes(prefix, rules, walked.gone, watch, files, pending, kept_paths):
                return None
        if pending:
            return None  # a repository inside the project: its own git lists it (full scan)
        files.absent = not_skipped(listing, files.absent)
        files.nested = nested
        files.total = walked.recorded - len(files.removed) + sum(encode_path(p) not in kept_paths for p in files.paths)
        if nested:
            return files  # no quick scan: git's untracked cache sees no repository inside
        files.quick = self._quick_key(rules, listing, sources)
        return files

    def _nested_changes(self, prefix: str, rules: SyncRules, gone: List[bytes], watch: set, files: FileList,
                        pending: List[str], kept_paths: set) -> bool:
        """scan_changes for the repository inside the project at `prefix` ("a/b/"): its own
        listing against the recorded paths beneath it (which the project's walk found `gone`,
        its listing showing only the folder), walked as the project's is; what is new, changed
        or gone goes into `files`, the recorded paths still listed into `kept_paths`. False
        when its git lists out of order (the full scan tells)."""
        if not real_folder(self.root, prefix) or not os.path.lexists(os.path.join(self.root, prefix, ".git")):
            return False  # a link now, or not checked out any more: the full scan says what it is
        raw_prefix, cut = encode_path(prefix), len(encode_path(prefix))
        listing = self._listing(rules, prefix)
        recorded = b"\0".join(raw[cut:] for raw in gone if raw.startswith(raw_prefix))
        beneath = {raw[cut:] for raw in watch if raw.startswith(raw_prefix)}
        try:
            walked = ListingWalk(listing, recorded, beneath)
        except ListingOrder:
            return False
        absent_before = len(files.absent)
        files.removed += [prefix + _dec(raw) for raw in walked.gone]
        for raw in sorted(set(walked.listed) | (beneath - set(walked.gone))):
            path = prefix + _dec(raw)
            if raw not in walked.listed or not self._consider(path, walked.listed[raw], rules, files, pending, set()):
                if raw in walked.kept:
                    files.removed.append(path)
        outside = {prefix + path for path in skip_worktree_paths(listing)}
        files.absent[absent_before:] = [path for path in files.absent[absent_before:] if path not in outside]
        kept_paths.update(raw_prefix + raw for raw in walked.kept)
        return True

    # --- the quick scan: git's untracked cache, kept in the record's own index
    #
    # `git status` with the untracked cache reads only the folders whose stat data changed
    # since it last looked, where a listing (`ls-files --others`) reads every folder of the
    # project: run on the record's index it says in one pass what changed since the last
    # record (files edited or deleted, untracked files new to it). What it cannot see, it is
    # not asked: a quick scan builds on the last listing only while the user's index lists
    # the same tracked files (their bytes hashed) and the same ignore rules apply (the user's
    # core.excludesFile, info/exclude and core.ignoreCase, put in a file of the store's own;
    # a .gitignore that changes is itself a change); else scan_changes, then scan.

    def ignore_sources(self) -> Optional[Tuple[str, bytes]]:
        """(core.ignoreCase, the patterns of the user's core.excludesFile then info/exclude: in
        one file, git weighs them as it weighs the two) of this project; None outside git."""
        if self.user_git is None or self.user_common is None:
            return None
        found = self.user_git.run("config", "-z", "--get-regexp", r"^core\.(excludesfile|ignorecase)$", check=False)
        settings: Dict[str, str] = {}
        for rec in found.stdout.split(b"\0"):
            key, _, value = rec.partition(b"\n")
            if key:
                settings[_dec(key).lower()] = _dec(value)  # the last one wins, as for git
        default = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "git" / "ignore"
        excludes = settings.get("core.excludesfile")
        patterns = b""
        for path in (Path(os.path.expanduser(excludes)) if excludes else default, self.user_common / "info" / "exclude"):
            with contextlib.suppress(OSError):
                patterns += (self.root / path).read_bytes().rstrip(b"\n") + b"\n"
        ignorecase = settings.get("core.ignorecase", "false").strip().lower() in ("true", "yes", "on", "1")
        return ("true" if ignorecase else "false"), patterns

    def _quick_key(self, rules: SyncRules, listing: bytes, sources: Optional[Tuple[str, bytes]]) -> Optional[dict]:
        """What a later scan_quick checks before it builds on this listing (None: it cannot),
        and the store's file of ignore patterns made to match."""
        if sources is None or rules.git_excludes:
            return None
        ignorecase, patterns = sources
        path = self.private_dir / QUICK_EXCLUDES
        try:
            same = path.read_bytes() == patterns
        except OSError:
            same = False
        if not same:
            part = path.with_name(path.name + ".part")
            part.write_bytes(patterns)
            os.replace(part, path)
        return {"tracked": hashlib.sha256(tracked_part(listing)).hexdigest(), "ignorecase": ignorecase,
                "ignore": quick_ignore_digest(sources), "index": self._user_index_key()}

    def scan_quick(self, rules: SyncRules, also: Sequence[str] = ()) -> Optional[FileList]:
        """scan_changes in one pass of git's (`status` with the untracked cache) and no listing
        of the project; None when it cannot tell (see above): scan_changes then."""
        kept = self._kept_scan()
        key = kept.get("quick")
        if (not isinstance(key, dict) or also or rules.git_excludes or kept.get("rules") != rules.fingerprint
                or not isinstance(kept.get("count"), int) or not self._holds(kept)):
            return None
        status_now = functools.partial(self._quick_status, key.get("ignorecase") == "true")
        same_index = key.get("index") == self._user_index_key()
        # the user's index written since (a checkout, say): its listing first, no `status` for nothing
        status, tracked, sources = (in_parallel(status_now, self._user_tracked, self.ignore_sources) if same_index
                                    else (None, self._user_tracked(), None))
        listed_same = hashlib.sha256(tracked).hexdigest() == key.get("tracked")
        if listed_same and not same_index:
            status, sources = in_parallel(status_now, self.ignore_sources)
        if not listed_same or status is None or sources is None or quick_ignore_digest(sources) != key.get("ignore"):
            return None
        recorded, new = status
        if any(raw.rstrip(b"/").rsplit(b"/", 1)[-1] == b".gitignore" for raw in [*recorded, *new]):
            return None  # other ignore rules: what they now leave out, only a listing tells
        is_tracked = TrackedPaths(tracked)
        watch = set(recorded) | set(new) | {encode_path(p) for p in [*kept.get("held", {}), *kept.get("absent", [])]}
        files = FileList(self.root)
        pending: List[str] = []
        files.removed = []
        for raw in sorted(watch):
            path = _dec(raw)
            if not self._consider(path, is_tracked(raw.rstrip(b"/")), rules, files, pending, set()) and raw in recorded:
                files.removed.append(path)
        if pending:
            return None  # a repository inside the project: its own git lists it (full scan)
        files.total = kept["count"] - len(files.removed) + sum(encode_path(p) not in recorded for p in files.paths)
        files.quick = {**key, "index": self._user_index_key()}
        return files

    def _user_tracked(self) -> bytes:
        """`ls-files -z -t --cached` of the user's index: the tracked files' records."""
        assert self.user_git is not None
        return self.user_git.run("ls-files", "-z", "-t", "--cached").stdout

    def _user_index_key(self) -> Optional[List[int]]:
        """The stat data of the user's index file (git writes a new file each time): while they
        are the same, so are the files it lists."""
        try:
            return list(stat_key(os.stat(self.user_index))) if self.user_index else None
        except OSError:
            return None

    def _quick_status(self, ignorecase: bool) -> Optional[Tuple[set, List[bytes]]]:
        """(recorded paths that changed or went, untracked paths new to the record) by `git
        status` of the record's index; None on any warning (a folder it cannot read: the
        listing names it)."""
        git = self.git.with_config(core__untrackedCache="true", status__showUntrackedFiles="all",
                                   core__excludesFile=str(self.private_dir / QUICK_EXCLUDES),
                                   core__ignoreCase="true" if ignorecase else "false")
        proc = git.run("status", "--porcelain", "-z", "--no-renames", "--ignore-submodules=all", check=False)
        if proc.returncode or proc.stderr:
            return None
        recorded, new = set(), []
        for rec in proc.stdout.split(b"\0"):
            if rec[:2] == b"??":
                new.append(rec[3:])
            elif len(rec) > 3 and rec[1:2] != b" ":
                recorded.add(rec[3:])
        return recorded, new

    def changes_since_record(self, rules: SyncRules, also: Iterable[str] = ()) -> Optional[FileList]:
        """The quick scan, else the listing of changes; None: only a full scan can tell."""
        also = list(also)
        return self.scan_quick(rules, also) or self.scan_changes(rules, also)

    def _dirty(self, rules: SyncRules) -> bytes:
        """The recorded paths whose stat data changed (NUL-separated). A file git cannot
        lstat (its folder unreadable) it says only on stderr, and leaves out: it is named."""
        proc = self.git.run("diff-files", "--name-only", "-z", "--no-renames")
        self._refuse_unreadable(proc.stderr or b"", rules)
        return proc.stdout

    def _refuse_unreadable(self, stderr: bytes, rules: SyncRules, prefix: str = "") -> None:
        """FilesUnreadable for what git's `stderr` says it could not read, but what
        `[sync] exclude` leaves out anyway (git itself skips only the patterns without '/')."""
        unreadable = {prefix + path: why for path, why in git_unreadable(stderr).items()
                      if not rules.exclude.match(prefix + path.rstrip("/"))}
        if unreadable:
            raise FilesUnreadable(self.root, unreadable)

    def _holds(self, kept: dict) -> bool:
        """Whether the store's index still holds the kept scan's tree: its file untouched
        since, or else by `write-tree` (which reads all of it)."""
        try:
            if list(stat_key(os.stat(self.private_dir / "index"))) == kept.get("index"):
                return True
        except OSError:
            return False
        return self.git.write_tree() == kept.get("tree")

    def _kept_scan(self) -> dict:
        try:
            kept = json.loads(self.state_file("scan.json").read_text())
        except (OSError, ValueError):
            return {}
        return kept if isinstance(kept, dict) else {}

    def file_list(self, deny: Sequence[str], allow: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
        """(paths to send, {path: why held back}) with these deny and allow patterns."""
        files = self.scan(SyncRules(deny, allow))
        return files.paths, files.held

    def _list(self, prefix: str, rules: SyncRules, listing: Optional[bytes] = None) -> Iterator[Tuple[str, bool]]:
        """(path, tracked) of what git lists under `prefix` (a submodule's or nested
        repository's folder, or "" for the project); `listing`: that listing, made already."""
        for rec in (self._listing(rules, prefix) if listing is None else listing).split(b"\0"):
            if len(rec) > 2:
                yield prefix + _dec(rec[2:]), rec[:1] != b"?"

    def _listing(self, rules: SyncRules, prefix: str = "") -> bytes:
        """git's listing under `prefix`, NUL-separated; `-t` tags untracked files with "? "."""
        args = ["ls-files", "-z", "-t", "--others", "--exclude-standard",
                *("--exclude=" + p for p in rules.git_excludes)]
        if prefix:
            git = Git(cwd=self.root / prefix, neutral=False)
        elif self.user_git:
            git = self.user_git
        else:  # no repository: a throwaway index gives git's ignore rules all the same
            git = self.own_git.with_env(GIT_INDEX_FILE=str(self.private_dir / "listing.index"))
        # A folder git cannot open it leaves out of the listing with a warning: its files
        # are not gone, and a sync without them would take them from the box's copy
        listing, errors = git.large_and_errors(*args, *(["--cached"] if (prefix or self.user_git) else []))
        self._refuse_unreadable(errors, rules, prefix)
        return listing

    def _nested(self, path: str, tracked: bool, rules: SyncRules, files: FileList, pending: List[str]) -> None:
        """A submodule (tracked) or a repository inside the project (untracked): its files
        go with `[sync] submodules = true`, listed by its own git."""
        kind = "a submodule" if tracked else "a git repository inside the project"
        if not os.path.lexists(os.path.join(self.root, path, ".git")):
            files.held[path + "/"] = f"{kind} that is not checked out (git submodule update --init)"
        elif rules.submodules and path.count("/") < 16:
            pending.append(path + "/")
        else:
            files.held[path + "/"] = f"{kind}: set `submodules = true` under [sync] to send its files"

    # --- the sync record

    def record(self, files: FileList, rules: SyncRules, upkeep: bool = True) -> str:
        """Record exactly the files of `files` as a tree in Patchwire's store (re-hashing only
        what changed) and return its id. The tree stays readable (`recorded`,
        `recorded_file`) for the last RECORDS_KEPT syncs (`keep_record`, here unless
        `upkeep` is False: the caller then runs it); the scan is kept for the next
        `scan_changes`."""
        try:
            if files.removed is None:
                set_index_paths(self.git, files.paths)
            else:
                update_index_paths(self.git, files.paths, files.removed)
        except ProcessError as e:  # a file that shrank or vanished while git hashed it
            unreadable = git_unreadable(e.stderr)
            if unreadable:  # or one this user cannot read: no file that moved
                raise FilesUnreadable(self.root, unreadable) from None
            moving = RECORD_MOVED.findall(e.stderr)
            if not moving:
                raise
            raise FilesMoved(sorted({_dec(a or b) for a, b in moving})) from None
        tree = self.git.write_tree()
        # HEAD: a commit of the record, so that `status` (scan_quick) finds the index no change
        commit = write_commit(self.private_dir, tree, None, "sync record")
        part = self.private_dir / "HEAD.part"
        part.write_text(commit + "\n")
        os.replace(part, self.private_dir / "HEAD")
        quick = files.quick if len(files.absent) <= QUICK_MAX_ABSENT else None
        self.state_file("scan.json").write_text(json.dumps(
            {"rules": rules.fingerprint, "tree": tree, "held": files.held, "absent": files.absent, "nested": files.nested,
             "count": files.count, "quick": quick, "index": list(stat_key(os.stat(self.private_dir / "index")))}))
        if upkeep:
            self.keep_record(tree)
        return tree

    def keep_record(self, tree: str) -> None:
        """The record's upkeep: its blobs owned here, its ref against pruning. Nothing of the
        sync waits on it (a sync runs it while rsync sends), but it ends before the sync does."""
        self._own_borrowed(tree)
        self._keep(tree)

    def record_paths(self, paths: Sequence[str]) -> Tuple[str, List[List[str]]]:
        """Record exactly `paths` (no listing, no rules) and return (tree, manifest): the full
        form of an ask, for tools and tests that build one by hand."""
        files = FileList(self.root)
        files.paths = sorted(paths)
        return self.record(files, SyncRules()), self.manifest()

    def manifest(self) -> List[List[str]]:
        """[mode, blob, path] of every file in the last record (the agent's full form of an ask)."""
        return [[mode, sha, path] for path, (mode, sha) in sorted(self.git.ls_files_stage().items())]

    def pin_record(self, job: str, tree: str, jobs: Iterable[str]) -> None:
        """Keep the record `tree` of `job` while the job may still be applied (3-way, against
        that record), however many syncs come after; pins of jobs no longer in `jobs` (the
        ones still kept) go, and their records with the next pruning."""
        self.git.update_ref(f"refs/jobs/{job}", tree)
        keep = {f"refs/jobs/{j}" for j in jobs}
        self.git.delete_refs([r for r in self.git.refs("refs/jobs/") if r not in keep])

    def recorded(self, tree: str) -> bool:
        """Whether `tree` (a job's base) is a sync record this store can read."""
        return self.git.has_tree(tree)

    def recorded_entries(self, tree: str, paths: Sequence[str]) -> Dict[str, Tuple[str, str]]:
        """{path: (git mode, blob id)} of the files of `paths` that `tree` (a sync record)
        holds, in one `ls-tree` per 100 KB of paths (a patch's paths may be 4 KB each: a
        thousand would pass the system's limit on a command line); a path it lacks, or holds
        as a folder, is not in it."""
        out: Dict[str, Tuple[str, str]] = {}
        wanted = set(paths)
        for part in batched_by_size(paths, 100_000):
            listing = self.git("ls-tree", "-r", "-z", tree, "--", *part)
            for record in listing.split(b"\0"):
                meta, _, raw = record.partition(b"\t")
                fields = meta.decode().split()
                path = _dec(raw)
                if len(fields) == 3 and fields[1] == "blob" and path in wanted:
                    out[path] = (fields[0], fields[2])
        return out

    def recorded_file(self, tree: str, path: str) -> Optional[Tuple[bytes, str]]:
        """(bytes, git mode) of the file `path` in `tree` (a sync record, or a tree made from
        one); None if it is absent or not a file."""
        entry = self.recorded_entries(tree, [path]).get(path)
        return (self.git("cat-file", "blob", entry[1]), entry[0]) if entry else None

    def changes(self, old_tree: str, tree: str) -> Tuple[List[str], List[str]]:
        """(paths added or changed by content or mode, paths deleted) from one record to the
        next: git compares the two trees, skipping every folder whose tree id is the same."""
        changed, deleted = self.changed_entries(old_tree, tree)
        return list(changed), deleted

    def changed_entries(self, old_tree: str, tree: str) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
        """changes(), the changed paths with their (mode, blob) in `tree`, from one `diff-tree`."""
        changed: Dict[str, Tuple[str, str]] = {}
        deleted: List[str] = []
        for status, mode, blob, raw in self.git.changed_entries(old_tree, tree):
            if status == b"D":
                deleted.append(_dec(raw))
            else:
                changed[_dec(raw)] = (mode.decode(), blob.decode())
        return changed, deleted

    def _own_borrowed(self, tree: str) -> None:
        """Copy into Patchwire's store the recorded blobs it finds only in the user's store
        but not in the user's HEAD (staged edits, dangling blobs): the user's `git gc` may
        drop those. Blobs in HEAD stay the user's: history keeps them."""
        if not self.user_git:
            return
        base = self.user_git.rev_parse("HEAD:./") or EMPTY_TREE
        out = self.git("diff-tree", "-r", "-z", "--no-renames", "--diff-filter=AMT", base, tree)
        blobs = [rec.split()[3] for rec in out.split(b"\0")[0::2]
                 if rec.startswith(b":") and rec.split()[1] != b"160000"]  # not submodule commits
        missing = self.own_git.missing_objects(blobs)
        if missing:  # read through the alternates, written without them: a local copy
            pack = self.git("pack-objects", "-q", "--stdout", input=b"\n".join(missing) + b"\n")
            self.own_git("unpack-objects", "-q", input=pack)

    def _keep(self, tree: str) -> None:
        """A ref per record keeps it from Patchwire's own pruning; beyond RECORDS_PRUNE_AT
        records the oldest go, and so do blobs no record uses any more (after an hour, so a
        sync running in parallel keeps what it has just written)."""
        path = self.state_file("records.json")
        try:
            records = [r for r in json.loads(path.read_text()) if r != tree]
        except (OSError, ValueError):
            records = []
        self.git.update_ref(f"refs/records/{tree}", tree)
        records.append(tree)
        if len(records) > RECORDS_PRUNE_AT:
            self.git.delete_refs([f"refs/records/{old}" for old in records[:-RECORDS_KEPT]])
            records = records[-RECORDS_KEPT:]
            self.git.keep_refs("refs/undo/", self._undo_blobs())
            self.git("prune", "--expire=1.hour.ago")
        path.write_text(json.dumps(records))

    def _undo_blobs(self) -> List[str]:
        """The blobs `apply --undo` would put back (the last apply's): loose objects no record
        names, or a record's own blobs, which pruning old records would otherwise take, and
        an undo an hour and forty syncs later would find nothing to restore. Those this store
        cannot read (gone already) are left out: a ref to them cannot be made."""
        ids = UndoLog(self).blobs()
        missing = set(self.git.missing_objects([i.encode() for i in ids]))
        return [i for i in ids if i.encode() not in missing]

    def _forget_legacy_record(self, git_dir: Path) -> None:
        """Patchwire 0.3 kept its record inside the user's repository (.git/patchwire, and a
        ref refs/patchwire/NAME/synced that `git push --mirror` carried away with untracked
        files' blobs). Keep its state files, drop the rest."""
        legacy = git_dir / "patchwire"
        if not (legacy / "HEAD").is_file():
            return
        for name in ("last_job", "applied.log", "undo.json"):
            if (legacy / name).is_file() and not self.state_file(name).exists():
                shutil.copy2(legacy / name, self.state_file(name))
        self.user_git.delete_refs([ref for ref in self.user_git.refs("refs/patchwire/") if ref.endswith("/synced")])
        shutil.rmtree(legacy)

    def state_file(self, name: str) -> Path:
        return self.private_dir / name

    def write_state(self, name: str, data: Union[str, bytes]) -> None:
        """Replace a state file whole (write_whole): a command reading it without the record's
        lock (an apply reading job_trees.json) sees the old content or the new, never half."""
        write_whole(self.state_file(name), data)


def _ignored_folder(root: Path, probe: List[str]) -> bool:
    """A folder inside a repository that ignores it (a home folder kept in git with `*` in its
    .gitignore) is a project without git: its files are none of that repository's."""
    if len(probe) < 4 or not probe[3]:
        return False  # the repository's top level
    git = Git(cwd=root, neutral=False).with_env(GIT_LITERAL_PATHSPECS="0")  # check-ignore refuses it
    return git.run("check-ignore", "-q", ".", check=False).returncode == 0


class FilesMoved(PatchwireError):
    """Files changed while git recorded them (`paths`): the sync lists the project again."""

    def __init__(self, paths: List[str]):
        super().__init__(f"{', '.join(paths)} changed while being recorded")
        self.paths = paths


class FilesUnreadable(PatchwireError):
    """Files (or folders) of the project this user cannot read, {path: why}: named with the
    fix; the sync stops before it changes its record or the box's copy."""

    def __init__(self, root: Path, unreadable: Dict[str, str]):
        path, why = sorted(unreadable.items())[0]
        folder = unsearchable_folder(root, path)
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        if why == "Too many open files":  # git's descriptors, one a folder level, ran out
            super().__init__(f"git ran out of open files listing {sanitize(path)}{more}: nothing was sent",
                             "raise the limit (`ulimit -n 4096`, then sync again), or leave that deep folder "
                             "out: `exclude = [...]` under [sync] in .patchwire.toml",
                             details={"paths": sorted(unreadable)})
            return
        if folder is not None:
            what, fix = f"the folder {sanitize(folder)}", f"chmod u+rx {shlex.quote(sanitize(folder))}"
        else:
            what, fix = sanitize(path), f"chmod u+r {shlex.quote(sanitize(path))}"
        super().__init__(f"cannot read {what}{more}: {why}",
                         f"make it readable (`{fix}`), or leave it out of the sync: `exclude = [...]` under "
                         "[sync] in .patchwire.toml, or .gitignore; then sync again",
                         details={"paths": sorted(unreadable)})


def unsearchable_folder(root: Path, path: str) -> Optional[str]:
    """The outermost folder of `path` (relative to `root`; "d/" is the folder d) that this
    user cannot list or enter, or None."""
    parts = [p for p in path.split("/") if p]
    folders = parts if path.endswith("/") else parts[:-1]
    for depth in range(1, len(folders) + 1):
        folder = "/".join(folders[:depth])
        if not os.access(os.path.join(root, folder), os.R_OK | os.X_OK):
            return folder
    return None


# `git update-index` on a file rewritten under it: "error: short read while indexing X",
# "error: X: failed to insert into database", "fatal: Unable to process path X".
RECORD_MOVED = re.compile(rb"^(?:error: (.+): failed to insert into database|fatal: Unable to process path (.+))$", re.M)
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
def quote_alternate(path: Path) -> str:
    """GIT_ALTERNATE_OBJECT_DIRECTORIES separates by ':'; such a path is C-quoted."""
    text = str(path)
    return json.dumps(text) if (":" in text or text.startswith('"')) else text


def held_reason(path: str, st: os.stat_result, tracked: bool, rules: SyncRules) -> Optional[str]:
    """Why a listed file stays here, or None: the deny-list (matched with the name's control
    characters left out too: `.env` and a newline is a `.env`), then the size cap."""
    pattern = rules.deny.match(path) or (_PATH_CONTROL.search(path) and rules.deny.match(_PATH_CONTROL.sub("", path)))
    if pattern:
        why = f"secret deny-list: {pattern}"
        if tracked:
            why += f"; tracked in git: probably not a secret; allow with `[sync] allow = [{json.dumps(path)}]`"
        return why
    if stat.S_ISREG(st.st_mode) and st.st_size > rules.max_bytes:
        return (f"{human_bytes(st.st_size)}, over [sync] max_file_mb = {rules.max_file_mb:g}: raise it, "
                f"or add the path to [sync] allow, to send it")
    return None


def denied_by(path: str, deny: Sequence[str], allow: Sequence[str]) -> Optional[str]:
    """The deny pattern that holds `path` back (None when an allow pattern lets it through).
    For one path; a listing compiles its patterns once (SyncRules)."""
    if PathMatcher(allow).match(path):
        return None
    return PathMatcher(deny).match(path)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "patchwire"


# rsync 3.2-3.5 stops past ~1,000 folders deep ("Cannot allocate memory", exit 23), which
# git takes: such a file is held back, named, and the rest of the project still goes
MAX_FOLDERS_DEEP = 512
TOO_DEEP = f"{MAX_FOLDERS_DEEP} folders deep or more: rsync cannot carry it"
def write_whole(path: Path, data: Union[str, bytes], mode: int = 0o600) -> None:
    """Replace `path` whole: a part file beside it (created new, never through a link), then
    renamed over it (over a link too, never through it). A full disk or an error leaves the
    old file and no part; a kill, the old file and a part."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


NOT_UTF8 = "its name is not UTF-8, which the box's API carries names as: rename it to send it"


def is_utf8_name(path: str) -> bool:
    """A name as read from the disk (surrogateescape) that was valid UTF-8 there."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def state_dir() -> Path:
    """Patchwire's own state on this machine (sync records, apply log, undo)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "patchwire"


# ================================================================== sync (rsync)


def rsync_argv(cfg: LaptopConfig, dest: str, checksum: bool = False, ignore_times: bool = False) -> List[str]:
    """Options that macOS's rsync 2.6.9, openrsync and rsync 3 all accept. `ignore_times`
    (-I) sends the listed files even when size and mtime match: Patchwire already knows by
    content which ones changed. `checksum` compares every listed file by content."""
    argv = [cfg.rsync, "-a", "--files-from=-", "--from0", "--stats"]
    if checksum:
        argv.append("--checksum")
    if ignore_times:
        argv.append("-I")
    if cfg.ssh:
        ssh = [*cfg.ssh_argv(), "-o", "BatchMode=yes",
               "-o", "ControlMaster=auto", "-o", f"ControlPath={control_socket(cfg.ssh_argv(), cfg.ssh)}",
               "-o", "ControlPersist=60"]
        argv += ["-e", " ".join(shlex.quote(a) for a in ssh)]
        return argv + ["./", f"{cfg.ssh}:{dest}/"]
    return argv + ["./", dest + "/"]


# Without `ssh`, the laptop's own rsync writes into the folder the agent names: an agent of
# another account (or a lying one) must not be able to point it at another of the user's
# folders. The agent's layout (MIRROR_LAYOUT, shared) is what local_mirror_problem checks.


def local_mirror_problem(mirror: str, user: str, project: str, root: Path) -> Optional[str]:
    """Why the laptop's rsync must not write into `mirror`, or None."""
    path = Path(mirror)
    layout = [part.format(user=user, project=project) for part in MIRROR_LAYOUT]
    real, here = Path(os.path.realpath(mirror)), root.resolve()
    # the layout as written and as it resolves: a link named like a mirror (made by an agent of
    # another account) that leads to another folder of the user's is no mirror
    if (not path.is_absolute() or os.path.normpath(mirror) != mirror or list(path.parts[-4:]) != layout
            or list(real.parts[-4:]) != layout):
        return f"it is not an absolute path ending in {'/'.join(layout)}, as the agent's mirrors do"
    if real == here or here in real.parents or real in here.parents:
        return f"it is the project folder {here}, or inside it, or above it"
    return None


def control_socket(ssh_argv: List[str], destination: str) -> str:
    """The ControlPath of a project's SSH master. ssh's %C hashes the host, port and user,
    not the key: two projects that reach one box account with different keys (two
    ~/.ssh/config aliases of one host, or their own -i/-F options) would share a master, and
    the second would sync with the first's key, into that key's rrsync folder. The options
    and the destination as written are hashed in too."""
    mark = hashlib.sha256("\0".join([*ssh_argv, destination]).encode()).hexdigest()[:10]
    return f"{control_dir()}/%C-{mark}"


CONTROL_TMP = Path("/tmp")  # not $TMPDIR: macOS's is too long for a socket's path


def control_dir() -> str:
    """A short private folder for SSH control sockets (their paths are length-limited):
    $XDG_RUNTIME_DIR/patchwire when the session has one (private by design), else
    /tmp/patchwire-UID, checked without following a link: another account that made it first
    (or a link of theirs to a folder of yours, which they could point elsewhere later) would
    hold the sockets every sync of yours goes through."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    private_runtime = bool(runtime) and private_folder(Path(runtime))
    path = Path(runtime) / "patchwire" if private_runtime else CONTROL_TMP / f"patchwire-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    if not private_folder(path):
        raise PatchwireError(
            f"{path} (for SSH's connection sockets) is not a private folder of yours: it is a link, "
            "another account's, or open to others; nothing was sent",
            f"if it is yours: chmod 700 {path}; if not (/tmp keeps others' files): set XDG_RUNTIME_DIR "
            "to a private folder of yours with a short path, or ask an admin to remove it")
    return str(path)


def private_folder(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


RSYNC_COUNTS = (
    ("files", re.compile(rb"Number of (?:regular )?files transferred: ([\d,.]+)")),
    ("bytes", re.compile(rb"Total transferred file size: ([\d,.]+)")),
)
# Exit 23 (some files not transferred) and 24 (some vanished) name the files on stderr:
# `link_stat "X" failed`, `file has vanished: "X"` (gone), `send_files failed to open "X":
# Permission denied` (unreadable here). rsync 3 tags the side ([sender] is this machine).
# A file that vanished, or a folder on its path replaced (link_stat: not "No such file" alone)
RSYNC_GONE = re.compile(rb'(?:link_stat "([^"\n]+)" failed: (?!Permission denied|Operation not permitted)'
                        rb'|file has vanished: "([^"\n]+)")')
# A file it may not open, or one in a folder it may not enter (link_stat: Permission denied)
RSYNC_UNREADABLE = re.compile(rb'(?:send_files failed to open "([^"\n]+)": ([^\n(]+)'
                              rb'|link_stat "([^"\n]+)" failed: (Permission denied|Operation not permitted))')
RSYNC_PARTIAL = (23, 24)


def rsync_counts(stdout: bytes) -> Dict[str, int]:
    counts = {}
    for key, pattern in RSYNC_COUNTS:
        m = pattern.search(stdout)
        if m:
            counts[key] = int(re.sub(rb"[,.]", b"", m.group(1)) or 0)
    return counts


def rsync_failures(stderr: bytes, root: Path) -> Tuple[List[str], Dict[str, str]]:
    """(paths that vanished, {path: why unreadable}) from rsync's stderr, relative to root."""
    def rel(raw: bytes) -> str:
        path = os.path.normpath(_dec(raw))
        return os.path.relpath(path, str(root)) if os.path.isabs(path) else path
    gone = [rel(m.group(1) or m.group(2)) for m in RSYNC_GONE.finditer(stderr)]
    unreadable = {rel(m.group(1) or m.group(3)): _dec(m.group(2) or m.group(4)).strip()
                  for m in RSYNC_UNREADABLE.finditer(stderr)}
    return gone, unreadable


# Many files go by RSYNC_STREAMS rsyncs at once, each a contiguous part of the sorted list
# (so mostly folders of its own; over SSH each a session of the one ControlMaster connection,
# and rrsync runs with -no-lock). The receiver's file creation is most of a big sync: a branch
# switch's 2,500 files over SSH took 1.68 s with one rsync, 1.24 s with two (three or four: no
# faster on two cores). Below RSYNC_SPLIT_MIN_FILES a second rsync's start costs more than it saves.
RSYNC_STREAMS = 2
RSYNC_SPLIT_MIN_FILES = 1000


def send_files(cfg: LaptopConfig, paths: Sequence[str], dest: str, checksum: bool = False,
               ignore_times: bool = False) -> Dict[str, Any]:
    """rsync exactly `paths`; {"files", "bytes"} sent, and "gone": paths that vanished on the
    way (exit 23/24 with nothing else wrong: the caller lists the project again)."""
    if not shutil.which(cfg.rsync):
        raise PatchwireError(f"{cfg.rsync} is not installed on this machine",
                             "install rsync (macOS ships it; Debian/Ubuntu: apt install rsync)")
    size = max(1, -(-len(paths) // (RSYNC_STREAMS if len(paths) >= RSYNC_SPLIT_MIN_FILES else 1)))
    parts = [paths[i:i + size] for i in range(0, len(paths), size)] or [[]]
    argv = rsync_argv(cfg, dest, checksum, ignore_times)
    procs = in_parallel(*(functools.partial(run, argv, cwd=cfg.root, timeout=3600, check=False,
                                            input=b"".join(encode_path(p) + b"\0" for p in part)) for part in parts))
    counts: Dict[str, Any] = {"gone": []}
    for proc in procs:
        for key, value in rsync_counts(proc.stdout).items():
            counts[key] = counts.get(key, 0) + value
        counts["gone"] += rsync_gone(cfg, proc)
    return counts


def rsync_gone(cfg: LaptopConfig, proc: subprocess.CompletedProcess) -> List[str]:
    """The paths one rsync of send_files found vanished; any other failure raised."""
    if proc.returncode == 0:
        return []
    if proc.returncode in RSYNC_PARTIAL:
        gone, unreadable = rsync_failures(proc.stderr, cfg.root)
        if unreadable:
            raise FilesUnreadable(cfg.root, unreadable)
        if gone or proc.returncode == 24:  # 24 only ever means files vanished here
            return gone
    tail = fold_returns(proc.stderr.decode("utf-8", "replace")).strip()[-1500:]
    hint = ssh_failure_hint(cfg, tail) if cfg.ssh else "check that the mirror folder is writable"
    raise AgentError(f"rsync failed (exit {proc.returncode}): {tail}", hint)


# Small changed files go with the ask itself (POST /v1/ask `content`) instead of by an rsync
# before it: rsync's start is most of a small ask's sync (its processes, 2 x 20 ms it sleeps
# waiting for them, and over SSH a remote rsync). Past these figures rsync's own transfer wins.
INLINE_SEND_MAX_BYTES = 256 * 1024
INLINE_SEND_MAX_FILES = 64
# A listing of changes of this many files or more starts rsync before the record hashes them
SEND_AHEAD_MIN_FILES = 200


def inline_content(root: Path, wanted: Dict[str, Tuple[str, str]], cap: int) -> Tuple[Optional[List[list]], int]:
    """([[path, mode, mtime_ns, base64], ...], their bytes) of the files `wanted` ({path: (mode,
    blob)} as the record holds them), read without following a link: what an ask carries
    (`content`). (None, 0) when they go by rsync instead: too many or too big, a symlink, or a
    file whose bytes are not the recorded blob any more (it moved since: rsync's round sends
    it again, or says so)."""
    room = min(cap, INLINE_SEND_MAX_BYTES)
    if not wanted or len(wanted) > INLINE_SEND_MAX_FILES:
        return None, 0
    out: List[list] = []
    for path, (mode, blob) in sorted(wanted.items()):
        found = read_small_file(root, path, room) if mode in ("100644", "100755") else None
        if found is None or blob_id(found[0], blob) != blob:
            return None, 0
        room -= len(found[0])
        out.append([path, mode, found[1], base64.b64encode(found[0]).decode("ascii")])
    return out, min(cap, INLINE_SEND_MAX_BYTES) - room


def read_small_file(root: Path, rel: str, cap: int) -> Optional[Tuple[bytes, int]]:
    """(bytes, mtime in ns) of the regular file root/rel when it holds at most `cap` bytes,
    reached without following a link; else None."""
    try:
        fd, name = _open_parent(root, rel)
    except (OSError, UnsafePath):
        return None
    try:
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
                return None
            data = f.read(cap + 1)
            return (data, st.st_mtime_ns) if len(data) <= cap else None
    except OSError:
        return None
    finally:
        os.close(fd)


# ================================================================== HTTP client
# The box's answers, read strictly and within bounds. A lying box can answer with anything:
# a body that never ends, one line of a gigabyte, a byte every few seconds, JSON nested a
# million deep, NaN, 1e400, a number with 5,000 digits, a list where an object belongs. Each
# of those becomes one clear AgentError (exit 3), never a MemoryError, a traceback or a wait
# without end: bodies and lines have caps, every request a deadline for the whole of it (a
# socket timeout alone restarts with each byte), and every field the laptop or the editor
# extension reads is type-checked before anything uses it.

MAX_DIFF_BYTES = 32 * 2 ** 20  # a job's patch; base85 binaries included, AI edits stay far below
MAX_JSON_BYTES = 16 * 2 ** 20  # a JSON answer (a job list of 500 jobs with long prompts fits)
MAX_EVENT_LINE = 2 ** 20  # one NDJSON event; the agent clips event text to 16 KiB
MAX_BOX_JSON_DEPTH = 32  # the agent's answers nest 4 deep
MAX_INT_DIGITS = 19  # a 64-bit integer: seq, sizes, token counts
# Seconds a whole request may take (PATCHWIRE_TIMEOUT overrides); a diff gets DIFF_DEADLINES
# of them. An event stream has no end time (the AI may think for an hour) but must send a
# line (the agent's heartbeat comes every 15 s of quiet) within STREAM_SILENCES of them.
DEFAULT_TIMEOUT_S = 30.0
DIFF_DEADLINES = 4
STREAM_SILENCES = 2
STILL_WAITING_S = 10.0  # `ask` says it is still waiting after this long without an event
# Event types only this laptop writes (`ask --json` ends with its "outcome"; the extension
# reads "unparsed" as a line it could not read): the box may not send them.
LAPTOP_EVENT_TYPES = ("outcome", "unparsed")
EVENT_TYPE_RE = re.compile(r"[a-z][a-z_]{0,39}")
BOX_HINT = "is the URL in .patchwire.toml your patchwire-agent? a box that answers like this is not to be trusted"


class AnswerRefused(AgentError):
    """The box's answer is refused as a whole (too big, too slow, malformed): asking the same
    again would get the same, so a stream is not reconnected after it."""


def request_timeout() -> float:
    """PATCHWIRE_TIMEOUT, or the default: seconds a whole request to the agent may take."""
    text = os.environ.get("PATCHWIRE_TIMEOUT", "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"PATCHWIRE_TIMEOUT must be a number of seconds, not {sanitize(text)[:20]!r}") from None
    if not 0 < value <= 86400:
        raise UsageError("PATCHWIRE_TIMEOUT must be between 0 and 86400 seconds")
    return value


class _NotAllowed(ValueError):
    """A JSON number the laptop does not take (raised from the json module's hooks)."""


def _no_constant(name: str) -> Any:
    raise _NotAllowed(f"{name} (not JSON, though Python's reader takes it)")


def _box_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotAllowed(f"a number of {len(text)} digits")
    return int(text)


def _box_float(text: str) -> float:
    value = float(text) if len(text) <= 40 else float("inf")
    if value in (float("inf"), float("-inf")):
        raise _NotAllowed(f"a number too large for the laptop ({sanitize(text)[:20]}...)")
    return value


def box_json(data: bytes, what: str) -> Any:
    """`data` parsed as strict JSON: no NaN or Infinity, no number beyond 64 bits or a
    double, nesting at most MAX_BOX_JSON_DEPTH deep; else AnswerRefused naming `what`."""
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_int=_box_int, parse_float=_box_float)
    except _NotAllowed as e:
        raise AnswerRefused(f"the agent's {what} holds {e}", BOX_HINT) from None
    except RecursionError:  # the C reader recurses per level: deeper than the stack goes
        raise AnswerRefused(f"the agent's {what} nests deeper than {MAX_BOX_JSON_DEPTH} levels", BOX_HINT) from None
    except ValueError:
        raise AnswerRefused(f"the agent's {what} is not JSON", BOX_HINT) from None
    if json_too_deep(value, MAX_BOX_JSON_DEPTH):
        raise AnswerRefused(f"the agent's {what} nests deeper than {MAX_BOX_JSON_DEPTH} levels", BOX_HINT)
    return value


# --- the shapes of the box's answers: {field: kind}. A kind is a type or a tuple of types
# (bool is never an int here), a nested shape (a dict), or ("list", kind). Fields not named
# pass through unchecked; a field named is checked wherever it appears.
NUMBER = (int, float)
STATS_SHAPE = {"files": int, "added": int, "removed": int, "binary": int}
JOB_SHAPE: Dict[str, Any] = {
    "id": str, "status": str, "project": str, "prompt": str, "created": NUMBER, "reason": (str, type(None)),
    "started": (*NUMBER, type(None)), "finished": (*NUMBER, type(None)), "tree": (str, type(None)),
    "snapshot": (str, type(None)), "parent": (str, type(None)), "timeout_s": (int, type(None)),
    "slot": (int, type(None)), "events": int, "stats": (dict, type(None)), "result": (dict, type(None)),
    "ask_id": (str, type(None)), "attempt": (int, type(None)), "profile": (str, type(None))}
EVENT_SHAPE: Dict[str, Any] = {
    "type": str, "seq": int, "job": str, "position": int, "estimate_s": (int, type(None)), "count": int,
    "paths": ("list", str), "text": str, "name": (str, type(None)), "detail": str, "status": str,
    "reason": str, "stats": (dict, type(None)), "project": str, "step": str, "command": str,
    "exit_code": (int, type(None)), "duration_ms": NUMBER, "ok": bool, "checks": dict, "setup": dict}
# A job's checks (its result's and its finished event's `checks`): what ran on which result.
CHECK_RUN_SHAPE = {"name": str, "command": str, "exit_code": (int, type(None)), "duration_ms": NUMBER,
                   "ok": bool, "tail": str, "timed_out": bool}
CHECKS_SHAPE = {"patch_sha256": str, "tree": str, "commit": str, "source": str,
                "runs": ("list", CHECK_RUN_SHAPE)}
SETUP_SHAPE = {"ran": bool, "why": str, "hash": str, "duration_ms": NUMBER, "source": str,
               "runs": ("list", {"command": str, "exit_code": (int, type(None)), "duration_ms": NUMBER,
                                 "tail": str, "timed_out": bool})}
MAX_CHECK_TAIL = 16 * 1024  # characters of a check's or setup command's output the box may send back
HEALTH_SHAPE = {"version": str, "time": NUMBER, "queue_depth": int, "ai_found": bool, "ai_command": str,
                "sandbox": str, "sandbox_warning": str}
ME_SHAPE = {"user": str, "mirror": str, "inline_max_bytes": int}
TARGET_SHAPE = {"id": str, "kind": str, "url": str, "events": ("list", str), "include": ("list", str),
                "created": NUMBER}
TEST_SHAPE = {"ok": bool, "status": (int, type(None)), "error": (str, type(None))}
USAGE_FIGURES = {field: NUMBER for field, _ in USAGE_HEADINGS}
USAGE_SHAPE = {"since": NUMBER, "until": NUMBER, "group": str, "user": (str, type(None)),
               "rows": ("list", {"key": str, "user_removed": bool, **USAGE_FIGURES}), "total": USAGE_FIGURES}


def checked(value: Any, shape: Dict[str, Any], what: str, required: Sequence[str] = ()) -> dict:
    """`value` if it is an object whose fields have the kinds `shape` names; else AnswerRefused."""
    if not isinstance(value, dict):
        raise AnswerRefused(f"the agent's {what} is {_json_kind(value)}, not a JSON object", BOX_HINT)
    for key in required:
        if key not in value:
            raise AnswerRefused(f"the agent's {what} has no {key}", BOX_HINT)
    for key, kind in shape.items():
        if key in value and not _box_kind(value[key], kind, f"{what}'s {key}"):
            raise AnswerRefused(f"the agent's {what} has a {key} that is {_json_kind(value[key])}", BOX_HINT)
    return value


def _box_kind(value: Any, kind: Any, what: str) -> bool:
    if isinstance(kind, dict):
        checked(value, kind, what)  # refuses with the nested field's own name
        return True
    if isinstance(kind, tuple) and kind[:1] == ("list",):
        return isinstance(value, list) and all(_box_kind(v, kind[1], what) for v in value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def checked_job(value: Any, what: str = "job record") -> dict:
    job = checked(value, JOB_SHAPE, what, required=("id", "status"))
    check_job_id(job["id"])
    if job.get("stats") is not None:
        checked(job["stats"], STATS_SHAPE, f"{what}'s stats")
    result = job.get("result") or {}
    if result.get("checks") is not None:
        checked_receipt(result["checks"], f"{what}'s checks")
    if result.get("setup") is not None:
        checked_setup(result["setup"], f"{what}'s setup")
    return job


def checked_receipt(value: Any, what: str) -> dict:
    """A job's checks as the box reports them: at most MAX_BOX_COMMANDS runs, each named,
    its output's tail capped; the patch hash 64 hex digits and the tree an object id (the
    laptop compares the hash with the patch it previews before it believes a word)."""
    receipt = checked(value, CHECKS_SHAPE, what, required=("patch_sha256", "tree", "runs"))
    if not re.fullmatch(r"[0-9a-f]{64}", receipt["patch_sha256"]) or not re.fullmatch(
            r"[0-9a-f]{40}(?:[0-9a-f]{24})?", receipt["tree"]):
        raise AnswerRefused(f"the agent's {what} has a patch hash or tree that is no hex id", BOX_HINT)
    _check_runs(receipt["runs"], what, ("name", "command", "ok"))
    for run in receipt["runs"]:
        if not 0 < len(run["name"]) <= 64:
            raise AnswerRefused(f"the agent's {what} has a check named with {len(run['name'])} characters", BOX_HINT)
    return receipt


def checked_setup(value: Any, what: str) -> dict:
    setup = checked(value, SETUP_SHAPE, what, required=("ran",))
    _check_runs(setup.get("runs") or [], what, ("command",))
    return setup


def _check_runs(runs: List[dict], what: str, required: Sequence[str]) -> None:
    if len(runs) > MAX_BOX_COMMANDS:
        raise AnswerRefused(f"the agent's {what} lists {len(runs)} commands; at most {MAX_BOX_COMMANDS} run", BOX_HINT)
    for run in runs:
        checked(run, {}, what, required=required)
        if len(run.get("tail") or "") > MAX_CHECK_TAIL or len(run.get("command") or "") > MAX_BOX_COMMAND_CHARS:
            raise AnswerRefused(f"the agent's {what} holds an output tail or command over its size", BOX_HINT)


def checked_event(line: bytes) -> dict:
    """One NDJSON line of a job's stream, as an event the laptop may act on and pass on."""
    event = checked(box_json(line, "event"), EVENT_SHAPE, "event", required=("type",))
    if not EVENT_TYPE_RE.fullmatch(event["type"]) or event["type"] in LAPTOP_EVENT_TYPES:
        raise AnswerRefused(f"the agent sent an event of type {sanitize(event['type'])[:40]!r}, which only "
                            "this laptop writes or no agent sends", BOX_HINT)
    if "job" in event:
        check_job_id(event["job"])
    if event.get("stats") is not None:
        checked(event["stats"], STATS_SHAPE, "event's stats")
    if event.get("checks") is not None:
        checked_receipt(event["checks"], "event's checks")
    if event.get("setup") is not None:
        checked_setup(event["setup"], "event's setup")
    return event


def checked_usage(value: Any) -> dict:
    """GET /v1/usage: every figure a number, every row keyed (the table reads them all)."""
    report = checked(value, USAGE_SHAPE, "usage report", required=("since", "until", "group", "rows", "total"))
    if report["group"] not in ("user", "project", "day"):
        raise AnswerRefused(f"the agent's usage report is grouped by {sanitize(report['group'])[:20]!r}", BOX_HINT)
    for row in [*report["rows"], report["total"]]:
        for field in USAGE_SINCE_CHECKS:  # a box from before [box] checks counts none
            row.setdefault(field, 0)
        missing = [f for f, _ in USAGE_HEADINGS if f not in row] + (["key"] if row is not report["total"]
                                                                      and "key" not in row else [])
        if missing:
            raise AnswerRefused(f"the agent's usage report has a row without {missing[0]}", BOX_HINT)
    for key in ("since", "until"):
        if not 0 <= report[key] < 2 ** 40:  # a time the clock can print
            raise AnswerRefused(f"the agent's usage report has {key} {report[key]!r}", BOX_HINT)
    return report


# --- deadlines for a whole request


class Deadline:
    """Ends a request that takes longer than `seconds` in all: when the time is up, the
    sockets it opened (a redirect opens a second) are shut down, so a read blocked on a box
    that trickles a byte every few seconds returns at once. `fire()` ends it early."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.fired = False
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.fire) if seconds else None
        if self._timer:
            self._timer.daemon = True
            self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            self._shut(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    def cancel(self) -> None:
        """The answer has been read in time: the timer stops, the sockets stay as they are."""
        if self._timer:
            self._timer.cancel()

    @staticmethod
    def _shut(sock) -> None:
        import socket
        try:  # shutdown, not close: a thread blocked in recv() on it wakes up with EOF
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def read_capped(resp, cap: int, what: str) -> bytes:
    """The body, refused past `cap` bytes: at once when Content-Length says so, else once
    that many have arrived (a body without a length may never end). Read in 1 MiB pieces,
    so a refused body never costs more than `cap` of memory."""
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and (len(length) > 15 or int(length) > cap):
        raise AnswerRefused(f"the agent's {what} is over the laptop's limit of {human_bytes(cap)} "
                            f"(it announces {human_bytes(int(length)) if len(length) <= 15 else length + ' bytes'})",
                            BOX_HINT)
    chunks: List[bytes] = []
    total = 0
    while True:
        chunk = resp.read(min(2 ** 20, cap + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise AnswerRefused(f"the agent's {what} is over the laptop's limit of {human_bytes(cap)}", BOX_HINT)


class EventStream:
    """A job's NDJSON events as they arrive, read by a thread of its own, so the waiting side
    can tell time: it says it is still waiting (`on_wait`) every STILL_WAITING_S without an
    event, and gives up when no line at all (not even the agent's heartbeat) has come for
    `silence` seconds, a box trickling one byte at a time included. A line over
    MAX_EVENT_LINE is refused after that many bytes, never held whole."""

    def __init__(self, resp, deadline: Deadline, silence: float, on_wait: Optional[Callable[[float], None]]):
        import queue
        self.resp, self.deadline, self.silence, self.on_wait = resp, deadline, silence, on_wait
        self.lines: "queue.Queue[Tuple[str, Any]]" = queue.Queue(maxsize=8)  # bounded: the reader waits
        threading.Thread(target=self._read, daemon=True, name="patchwire-events").start()

    def _read(self) -> None:
        try:
            while True:
                line = self.resp.readline(MAX_EVENT_LINE + 1)
                if len(line) > MAX_EVENT_LINE:
                    self._put(("error", AnswerRefused(
                        f"the agent sent an event line over the laptop's limit of {human_bytes(MAX_EVENT_LINE)}",
                        BOX_HINT)))
                    return
                self._put(("line", line) if line else ("end", None))
                if not line:
                    return
        except BaseException as e:  # handed to the waiting side, which raises it there
            self._put(("error", e))

    def _put(self, item: Tuple[str, Any]) -> None:
        """Waits while the queue is full, until the waiting side stops listening (it fires)."""
        import queue
        while not self.deadline.fired:
            try:
                return self.lines.put(item, timeout=0.5)
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[dict]:
        import queue
        every = min(STILL_WAITING_S, self.silence / 3)  # at least two notes before it gives up
        last_line = quiet_since = time.monotonic()
        next_note = quiet_since + every if self.on_wait else float("inf")
        try:
            while True:
                now = time.monotonic()
                if now - last_line >= self.silence:
                    raise AnswerRefused(f"the agent sent no whole line for {now - last_line:.0f} s (not even its "
                                        "heartbeat); stopped waiting", "is the box still up? `patchwire show "
                                        "JOB` follows the job again")
                if self.on_wait and now >= next_note:
                    self.on_wait(now - quiet_since)
                    next_note = now + every
                try:
                    kind, value = self.lines.get(timeout=max(0.05, min(next_note, last_line + self.silence) - now))
                except queue.Empty:
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                last_line = time.monotonic()
                if value.strip():  # a blank line is the agent's heartbeat, not news
                    quiet_since, next_note = last_line, last_line + (every if self.on_wait else float("inf"))
                    yield checked_event(value.strip())
        finally:
            self.deadline.fire()  # the reader thread, blocked in recv(), ends with the socket
            self.resp.close()


def http_client():
    """The http.client module, imported when first needed: it costs start-up time (it pulls in
    email and ssl) that `--help`, `--version` and the work before the first request should not
    pay. A local import, so nothing at module level is rebound."""
    import http.client
    return http.client


def ssl_module():
    import ssl
    return ssl


# Redirects are followed as urllib's urlopen follows them (a box behind a front that moves it
# keeps working): a GET or HEAD on any of these, a POST on 301-303 (it becomes a GET without its
# body); at most MAX_REDIRECTS, only to http(s), and never with the token.
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10


def follows_redirect(method: str, status: int) -> bool:
    return (method in ("GET", "HEAD") and status in REDIRECTS) or (method == "POST" and status in REDIRECTS[:3])


class Client:
    """Talks to patchwire-agent: JSON requests, NDJSON streams, bearer token. Every answer is
    read within a cap and a deadline and checked (above) before it is handed on. Plain
    http.client, no proxy: the agent is reached directly, as its URL says."""

    def __init__(self, base_url: str, token: str, timeout: Optional[float] = None, ca_file: Optional[str] = None,
                 token_source: str = "the token"):
        self.base = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout or request_timeout()
        self.token_source = token_source
        self.on_wait: Optional[Callable[[float], None]] = None  # `ask` sets it: says it still waits
        self._tls: Optional["ssl.SSLContext"] = None
        if ca_file:
            ssl = ssl_module()
            try:
                self._tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise PatchwireError(f"cannot read the agent's certificate ca_file {ca_file}: "
                                     f"{getattr(e, 'strerror', None) or e}",
                                     "point ca_file in .patchwire.toml at the agent's PEM certificate") from None

    def _request(self, method: str, path: str, body: Optional[dict] = None, accept: str = "application/json",
                 deadline_s: Optional[float] = None, read_timeout: Optional[float] = None):
        """(response, its Deadline); the deadline keeps running while the body is read. An
        answer other than 2xx is raised as the agent's refusal (_refused)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept, "User-Agent": f"patchwire/{__version__}", "Connection": "close"}
        token = {"Authorization": "Bearer " + self._token}
        deadline = Deadline(deadline_s or self.timeout)
        url = self.base + path
        try:
            for _ in range(MAX_REDIRECTS + 1):
                content = {"Content-Type": "application/json"} if data is not None else {}
                resp = self._send(method, url, data, {**headers, **content, **token}, deadline,
                                  read_timeout or deadline_s or self.timeout)
                location = resp.getheader("Location") if follows_redirect(method, resp.status) else None
                target = urllib.parse.urljoin(url, location or "")
                if not location or urllib.parse.urlsplit(target).scheme not in ("http", "https"):
                    break
                resp.close()
                url, token = target, {}  # the token goes to the agent's own URL only
                method, data = ("HEAD" if method == "HEAD" else "GET"), None
        except (OSError, http_client().HTTPException) as e:
            deadline.cancel()
            raise self._unreachable(e, deadline) from None
        if 200 <= resp.status < 300:
            return resp, deadline
        try:
            raise self._refused(resp, deadline) from None
        finally:
            deadline.cancel()
            resp.close()

    def _send(self, method: str, url: str, data: Optional[bytes], headers: Dict[str, str], deadline: Deadline,
              timeout: float) -> "http.client.HTTPResponse":
        """One request on a connection of its own, watched by `deadline`; the response owns
        the socket (closing it closes the connection)."""
        client = http_client()
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        conn: "http.client.HTTPConnection"
        if parts.scheme == "https":
            conn = client.HTTPSConnection(host, timeout=timeout, context=self._tls)
        else:
            conn = client.HTTPConnection(host, timeout=timeout)
        try:
            conn.connect()
            deadline.watch(conn.sock)
            conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), data, headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        # http.client keeps the socket for another request unless the server said close:
        # drop the connection's hold, so the response's close is the socket's (as urllib does)
        if conn.sock:
            conn.sock.close()
            conn.sock = None
        return resp

    def _unreachable(self, e: Exception, deadline: Deadline) -> AgentError:
        if deadline.fired:
            return AnswerRefused(f"the agent at {self.base} did not answer within {deadline.seconds:.0f} s; "
                                 "stopped waiting", "is the box overloaded, or the network to it slow? try "
                                 "again (PATCHWIRE_TIMEOUT sets the seconds)")
        if isinstance(e, ssl_module().SSLCertVerificationError):
            return AgentError(f"the agent's TLS certificate at {self.base} is not trusted: "
                              f"{e.verify_message}",
                              "set ca_file in .patchwire.toml to the agent's certificate (PEM), "
                              "or give the agent a certificate this machine trusts")
        return AgentError(f"cannot reach the agent at {self.base}: {e}",
                          "is `patchwire-agent serve` running there, and is the URL in "
                          ".patchwire.toml right? (`patchwire-agent` prints it at start)")

    def _refused(self, e: "http.client.HTTPResponse", deadline: Deadline) -> PatchwireError:
        status = e.status
        try:
            body = box_json(self._read(e, deadline, MAX_JSON_BYTES, "refusal") or b"{}", "refusal")
        except AnswerRefused:
            body = {}
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            return AgentError(f"{self.base} answered HTTP {status} {sanitize(str(e.reason))[:80]}, not as a "
                              "patchwire-agent would", "check `agent` in .patchwire.toml: it is the URL "
                              "`patchwire-agent serve` prints when it starts", code=str(status),
                              http_status=status, exit_status=exit_for_status(status))
        message, hint, code = body["error"], str(body.get("hint", "")), str(body.get("code", status))
        exit_status = exit_for_status(status, code)
        if status == HTTPStatus.UNAUTHORIZED:  # unknown, or revoked by the box's admin: only they can give one
            hint = (f"the agent does not know the token from {self.token_source}: put in the token "
                    "the box printed for you" + (" (or unset PATCHWIRE_TOKEN to use token_file)"
                                                 if self.token_source == "PATCHWIRE_TOKEN" else "")
                    + "; if it worked before, it was revoked or replaced: ask the box's admin for "
                    "a new one (`patchwire-agent user rotate NAME` on the box)")
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            message, hint = in_minutes(message), in_minutes(hint) + self._retry_after(e, hint)
        if exit_status != ExitStatus.AGENT:  # not a refusal (STATUS_EXITS): nothing by that name
            return AgentError(message, hint or "`patchwire jobs` lists your jobs", details=body, code=code,
                              http_status=status, exit_status=exit_status)
        return AgentError(f"the agent refused: {message}", hint, details=body, code=code, http_status=status,
                          exit_status=exit_status)

    @staticmethod
    def _retry_after(e: "http.client.HTTPResponse", hint: str) -> str:
        """The Retry-After header in words, unless the box's hint gives the wait already."""
        retry = e.headers.get("Retry-After", "") if e.headers else ""
        if not retry.isdigit() or len(retry) >= 8 or " in " in hint:
            return ""
        return ("; " if hint else "") + f"the agent says: try again in {human_wait(int(retry))}"

    def json(self, method: str, path: str, body: Optional[dict] = None, what: str = "answer") -> Any:
        resp, deadline = self._request(method, path, body)
        try:
            data = self._read(resp, deadline, MAX_JSON_BYTES, what)
        finally:
            deadline.cancel()
            resp.close()
        return box_json(data, what)

    def raw(self, path: str, what: str) -> bytes:
        resp, deadline = self._request("GET", path, accept="*/*", deadline_s=self.timeout * DIFF_DEADLINES)
        try:
            return self._read(resp, deadline, MAX_DIFF_BYTES, what)
        finally:
            deadline.cancel()
            resp.close()

    def _read(self, resp, deadline: Deadline, cap: int, what: str) -> bytes:
        # a body cut short by the deadline's shutdown may read as a short body, not an error
        # (http.client returns what came before EOF): the deadline is checked either way
        try:
            data, broken = read_capped(resp, cap, what), None
        except (OSError, http_client().HTTPException) as e:
            data, broken = b"", e
        if deadline.fired:
            raise AnswerRefused(f"the agent's {what} did not arrive within {deadline.seconds:.0f} s; "
                                "stopped waiting", "is the box overloaded, or the network to it slow? "
                                "try again (PATCHWIRE_TIMEOUT sets the seconds)")
        length = (resp.headers.get("Content-Length") or "").strip()
        if broken is not None or (length.isdigit() and int(length) != len(data)):
            raise AgentError(f"the connection to the agent broke: {broken or 'the answer was cut short'}",
                             "try again")
        return data

    def stream(self, method: str, path: str, body: Optional[dict] = None) -> Iterator[dict]:
        """NDJSON events as they arrive (EventStream: caps, silence, still-waiting notes)."""
        silence = self.timeout * STREAM_SILENCES
        resp, deadline = self._request(method, path, body, accept="application/x-ndjson",
                                       deadline_s=self.timeout * DIFF_DEADLINES, read_timeout=silence + 5)
        deadline.cancel()  # the answer has begun: from here on, silence is what is timed
        if "ndjson" not in resp.headers.get("Content-Type", ""):
            try:
                yield checked_event(self._read(resp, deadline, MAX_JSON_BYTES, "event"))
            finally:
                resp.close()
            return
        yield from EventStream(resp, deadline, silence, self.on_wait)

    # --- one method per route of patchwire-agent (its ROUTES table); ids and names are quoted

    def health(self) -> dict:
        return checked(self.json("GET", route_path("health"), what="health answer"), HEALTH_SHAPE, "health answer")

    def me(self, project: str) -> dict:
        what = "answer to /v1/me"
        return checked(self.json("GET", route_path("me", {"project": project}), what=what),
                       ME_SHAPE, what, required=("user", "mirror"))

    def ask(self, body: dict) -> Iterator[dict]:
        return self.stream("POST", route_path("ask"), body)

    def jobs(self) -> List[dict]:
        answer = checked(self.json("GET", route_path("jobs"), what="job list"), {"jobs": ("list", dict)}, "job list",
                         required=("jobs",))
        return [checked_job(job, "job list's job") for job in answer["jobs"]]

    def job(self, job: str) -> dict:
        return checked_job(self.json("GET", route_path("job", job=job), what="job record"))

    def cancel(self, job: str) -> dict:
        return checked_job(self.json("DELETE", route_path("cancel", job=job), what="answer to a cancel"),
                           "answer to a cancel")

    def events(self, job: str, after: int = 0, follow: bool = True) -> Iterator[dict]:
        return self.stream("GET", route_path("events", {"after": int(after), **({} if follow else {"follow": 0})}, job=job))

    def diff(self, job: str) -> bytes:
        return self.raw(route_path("diff", job=job), "diff")

    def usage(self, query: Dict[str, str]) -> dict:
        return checked_usage(self.json("GET", route_path("usage", query), what="usage report"))

    def ask_group(self, ask: str) -> dict:
        return checked_group(self.json("GET", route_path("ask_group", ask=ask), what="ask group"), ask)

    def ask_events(self, ask: str, follow: bool = True) -> Iterator[dict]:
        return self.stream("GET", route_path("ask_events", None if follow else {"follow": 0}, ask=ask))
    def notify_targets(self) -> List[dict]:
        answer = checked(self.json("GET", route_path("notify_list"), what="target list"), {"targets": ("list", TARGET_SHAPE)},
                         "target list", required=("targets",))
        return [checked(t, TARGET_SHAPE, "target", required=("id", "kind", "url")) for t in answer["targets"]]

    def notify_add(self, body: dict) -> dict:
        what = "answer to notify add"
        return checked(self.json("POST", route_path("notify_add"), body, what=what), {"target": TARGET_SHAPE, "secret": str},
                       what, required=("target",))

    def notify_remove(self, target: str) -> dict:
        what = "answer to notify remove"
        return checked(self.json("DELETE", route_path("notify_remove", target=target), what=what), {"target": TARGET_SHAPE},
                       what, required=("target",))

    def notify_test(self, target: str) -> dict:
        what = "answer to notify test"
        return checked(self.json("POST", route_path("notify_test", target=target), {}, what=what), TEST_SHAPE, what,
                       required=("ok",))


def http_errors() -> tuple:
    """http.client's exception base, imported when first needed: the code that catches it may
    run before any Client was made (start-up stays free of network modules)."""
    return (http_client().HTTPException,)


# ================================================================== the job, laptop side


class Synced:
    """What a sync left on the box: the record `tree` the mirror now holds and, since `base`
    (the tree of the box's last snapshot of the project), the paths changed and deleted.
    Without a base (a first or forced sync, or paths sent again after a mismatch) the agent
    gets the whole listing."""

    def __init__(self, tree: str, base: Optional[str], changed: List[str], deleted: List[str], counts: dict,
                 content: Optional[List[list]] = None, mirror: str = "", upkeep: Optional["Background"] = None):
        self.tree, self.base, self.changed, self.deleted, self.counts = tree, base, changed, deleted, counts
        # the files the ask itself carries (inline_content): the mirror holds `tree` only once
        # the box has accepted the ask (Session.mark_indexed); the record's upkeep ends later
        self.content, self.mirror, self.upkeep = content, mirror, upkeep

    def ask_fields(self, project: "Project") -> dict:
        """The files part of POST /v1/ask: O(changed) with a base, else every [mode, blob, path]."""
        if self.base is None:
            return {"tree": self.tree, "files": project.manifest()}
        return {"tree": self.tree, "base": self.base, "changed": self.changed, "deleted": self.deleted,
                **({"content": self.content} if self.content else {})}

    def settle(self) -> None:
        """Wait for the record's upkeep, when it runs beside the ask (its error raised here)."""
        upkeep, self.upkeep = self.upkeep, None
        if upkeep is not None:
            upkeep.result()


# What an apply of several attempts' work records beside the job (log_origin says it):
# the ask, path -> attempt of each file taken whole, path -> [[attempt, hunk], ...] of each
# file built hunk by hunk.
ATTEMPT_ORIGIN = ("ask", "parts", "hunks")


class Session:
    """One command's view of the project, its config and the agent."""

    def __init__(self, cfg: LaptopConfig):
        self.cfg = cfg
        # nearly every command talks to the agent: http.client (~15 ms of imports) loads in a
        # thread while git looks at the project, most of which is waiting for git processes
        threading.Thread(target=http_client, daemon=True, name="patchwire-import").start()
        self.project = Project(cfg.root, cfg.project)
        self._client: Optional[Client] = None
        self._rules: Optional[SyncRules] = None

    @classmethod
    def here(cls) -> "Session":
        return cls(LaptopConfig.find())

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.cfg.agent, self.cfg.token(), ca_file=self.cfg.ca_file,
                                  token_source=self.cfg.token_source())
        return self._client

    @property
    def rules(self) -> SyncRules:
        if self._rules is None:
            self._rules = SyncRules.of(self.cfg)
        return self._rules

    def sync(self, force: bool = False, resend: Sequence[str] = (), inline: bool = False) -> "Synced":
        """Send what changed since the last sync, found by content (the two records' trees
        differ), even when size and mtime did not change; with `force`, every file, compared
        by checksum. Files that change or vanish while they are sent are sent again once;
        if they still move, say which and why. `resend`: paths the box says differ (the
        agent then re-reads the whole listing: no `base`). `inline` (an ask's sync): a few
        small changed files may go with the ask itself instead (Synced.content; the caller
        POSTs the ask, then settles the Synced). One sync of a project at a time
        (`record_lock`): a second one waits, then finds what the first sent already there."""
        with self.project.record_lock():
            return self._sync(force, resend, inline)

    def _sync(self, force: bool, resend: Sequence[str], inline: bool = False) -> "Synced":
        last = self._last_sync()
        unsure = set(last.get("unsure", [])) | set(resend)
        # The agent's answer, the last record's check and the listing of changes need nothing
        # of each other: at once (a listing made for nothing, when the mirror moved, is dropped)
        me, known, early = in_parallel(
            lambda: self.client.me(self.cfg.project), lambda: self.project.recorded(last.get("tree") or ""),
            lambda: None if force or not last else self.project.changes_since_record(self.rules, unsure))
        problem = None if self.cfg.ssh else local_mirror_problem(me["mirror"], me["user"], self.cfg.project,
                                                                     self.cfg.root)
        if problem:
            raise AnswerRefused(f"the agent names {sanitize(me['mirror'])} as the folder to sync into, and "
                                f"{problem}: nothing was sent", BOX_HINT)
        if force or last.get("mirror") != me["mirror"] or not known:
            last, early = {}, None  # send every listed file: rsync compares them with the box's copy
            unsure = set(resend)
        inline_cap = me.get("inline_max_bytes", 0) if inline and not resend else 0
        moved: List[str] = []
        for attempt in (1, 2):
            listed = early if attempt == 1 else (last and self.project.changes_since_record(self.rules, unsure))
            files = listed or self.project.scan(self.rules)
            if attempt == 1:
                say_held(files)
                if not files.count:
                    say(f"note: no file of {self.cfg.root} goes: git ignores them all, or they are held "
                        "back (see `patchwire sync --dry-run`)")
            sending = self._send_ahead(files, bool(last), me["mirror"], unsure, force)
            try:
                tree = self.project.record(files, self.rules, upkeep=False)
            except FilesMoved as e:
                moved = e.paths
                if sending:
                    moved = sorted(set(moved) | set(sending.result()[2]))  # sent again, with the rest
            except BaseException:
                if sending:
                    with contextlib.suppress(Exception):
                        sending.result()  # no rsync left running behind an error
                raise
            else:
                synced, todo, moved = self._send_and_keep(files, last, tree, bool(resend), unsure, force, me["mirror"],
                                                          0 if sending else inline_cap, sending)
                if synced:
                    return synced
                unsure |= set(todo)
                self._save_sync(last.get("tree"), me["mirror"], sorted(unsure), indexed=last.get("indexed"))
            if attempt == 1:
                say(f"{describe_paths(moved)} changed while being sent; sending again")
        raise moved_error(moved, files)

    def _send_ahead(self, files: FileList, incremental: bool, mirror: str, unsure: set,
                    force: bool) -> Optional[Background]:
        """rsync started before the record, which then hashes the files meanwhile, when what
        it sends is known from the listing alone: every listed file (no last sync to build on:
        a 43,737-file first sync hashes for ~2 s), or the new and changed files of a listing
        of changes when they are SEND_AHEAD_MIN_FILES or more (a branch switch: the record's
        2,500 files ~0.13 s), too many to go with the ask. The record can only find a subset
        of those changed (it re-hashes just them); _send_recorded sends what it did not."""
        if not incremental:
            return Background(functools.partial(self._send, files, None, mirror, set(unsure), force))
        if files.removed is None or len(files.paths) < SEND_AHEAD_MIN_FILES:
            return None
        return Background(functools.partial(self._send, files, (files.paths, []), mirror, set(unsure), force))

    def _send_and_keep(self, files: FileList, last: dict, tree: str, resend: bool, unsure: set, force: bool,
                       mirror: str, inline_cap: int, sending: Optional[Background] = None,
                       ) -> Tuple[Optional["Synced"], List[str], List[str]]:
        """_send_recorded, with the record's upkeep at the same time (rsync mostly waits). When
        the files go with the ask, the upkeep goes on beside its POST (Synced.settle).
        `sending`: the rsync of every file, started before the record (a full sync)."""
        upkeep = Background(lambda: self.project.keep_record(tree))
        sent: Optional[Tuple[Optional[Synced], List[str], List[str]]] = None
        try:
            sent = self._send_recorded(files, last, tree, resend, unsure, force, mirror, inline_cap, sending)
        finally:
            synced = sent[0] if sent else None
            if synced is not None and synced.content:
                synced.upkeep = upkeep
            else:
                upkeep.result()
        return sent

    def _send_recorded(self, files: FileList, last: dict, tree: str, resend: bool, unsure: set, force: bool,
                       mirror: str, inline_cap: int = 0, sending: Optional[Background] = None,
                       ) -> Tuple[Optional["Synced"], List[str], List[str]]:
        """Bring the box's mirror to the record `tree`: (what the sync left, [], []) once it
        holds it, else (None, paths given to rsync, paths that moved while sent). With
        `inline_cap`, a few small changed files may go with the ask instead (Synced.content)."""
        ahead = self._sent_ahead(files, sending) if sending else None
        if ahead and ahead[2]:
            return None, ahead[1], ahead[2]
        entries = self.project.changed_entries(last["tree"], tree) if last.get("tree") else None
        since_last = (list(entries[0]), entries[1]) if entries else None
        base, changed, deleted = self._since_indexed(last, tree, resend, since_last)
        if last.get("tree") == tree and not unsure:
            say(f"synced: nothing changed since the last sync ({files.count} files)")
            return Synced(tree, base, changed, deleted, {
                "sent_files": 0, "sent_bytes": 0, "skipped": True, "held_back": files.held,
                "files": files.count}), [], []
        content, size = self._inline(files, entries, unsure, base, inline_cap)
        if content is not None:
            say(f"synced {len(content)} of {files.count} file(s), {human_bytes(size)} with the ask")
            return Synced(tree, base, changed, deleted, {
                "sent_files": len(content), "sent_bytes": size, "skipped": False, "held_back": files.held,
                "files": files.count}, content=content, mirror=mirror), [], []
        if ahead:
            counts, todo, moved = self._send_rest(files, ahead, since_last, mirror, force)
        else:
            counts, todo, moved = self._send(files, since_last, mirror, unsure, force)
        if moved:
            return None, todo, moved
        self._save_sync(tree, mirror, indexed=last.get("indexed"))
        return Synced(tree, base, changed, deleted, {
            "sent_files": counts["sent"], "sent_bytes": counts.get("bytes"), "skipped": False,
            "held_back": files.held, "files": files.count}), [], []

    def _sent_ahead(self, files: FileList, sending: Background) -> Tuple[dict, List[str], List[str]]:
        """What rsync sent ahead of the record, once it ended, with the files that moved looked
        for again: rsync's own look came when it ended, maybe before the record hashed them, and
        a file rewritten between the two would be recorded with bytes the box never got."""
        counts, todo, moved = sending.result()
        return counts, todo, sorted(set(moved) | set(files.moved(todo)))

    def _send_rest(self, files: FileList, ahead: Tuple[dict, List[str], List[str]],
                   since_last: Optional[Tuple[List[str], List[str]]], mirror: str,
                   force: bool) -> Tuple[dict, List[str], List[str]]:
        """What rsync sent ahead of the record (a listing of changes) and, after it, what the
        record's diff names besides: files a sync killed after its record had recorded
        but not sent. A full sync's (no last tree) are all its files: nothing else."""
        counts, todo, moved = ahead
        rest = sorted(set(since_last[0] if since_last else []) - set(todo))
        if rest:
            more, todo_more, moved = self._send(files, (rest, []), mirror, set(), force)
            counts = {**counts, "sent": counts["sent"] + more["sent"],
                      "bytes": counts.get("bytes", 0) + more.get("bytes", 0)}
            todo = todo + todo_more
        return counts, todo, moved

    def _inline(self, files: FileList, entries: Optional[Tuple[Dict[str, Tuple[str, str]], List[str]]],
                unsure: set, base: Optional[str], cap: int) -> Tuple[Optional[List[list]], int]:
        """The ask's `content` and its bytes (inline_content) when the files this sync sends
        are few and small, and the ask is of changes (a `base`); else None (rsync)."""
        if not cap or base is None or entries is None:
            return None, 0
        if any(path not in entries[0] for path in unsure & set(files.paths)):
            return None, 0  # unsure paths whose blob this sync did not name: rsync sends them
        return inline_content(self.cfg.root, entries[0], cap)

    def _since_indexed(self, last: dict, tree: str, resend: bool,
                       since_last: Optional[Tuple[List[str], List[str]]]) -> Tuple[Optional[str], List[str], List[str]]:
        """(base, changed, deleted) for the agent: what changed since the tree its last
        snapshot of this project was made from (`indexed`, which a sync without an ask leaves
        behind the mirror; usually the last sync's, whose changes `since_last` are). No base
        after a full sync, or when paths are sent again."""
        indexed = last.get("indexed")
        if resend or not indexed:
            return None, [], []
        if indexed == last.get("tree") and since_last is not None:
            return (indexed, *since_last)
        if not self.project.recorded(indexed):
            return None, [], []
        return (indexed, *self.project.changes(indexed, tree))

    def _send(self, files: FileList, since_last: Optional[Tuple[List[str], List[str]]], mirror: str,
              unsure: set, force: bool) -> Tuple[dict, List[str], List[str]]:
        """rsync what this sync needs: what changed since the last sync (`since_last`), or
        every file; (counts, paths given to rsync, paths that moved)."""
        incremental = since_last is not None
        if since_last is not None:
            todo = sorted(set(since_last[0]) | (unsure & set(files.paths)))
        else:
            todo = files.paths
        files.note(todo)
        t0 = time.monotonic()
        if todo:
            counts = send_files(self.cfg, todo, mirror, checksum=force, ignore_times=incremental)
        else:  # only deletions: the agent deletes them from its copy
            counts = {"files": 0, "bytes": 0, "gone": []}
        # with -I every listed path went; otherwise rsync's count, which leaves out symlinks
        counts["sent"] = len(todo) if incremental else counts.get("files", 0) + (0 if force else files.links)
        say(f"synced {counts['sent']} of {files.count} file(s), "
            f"{human_bytes(counts.get('bytes', 0))} in {time.monotonic() - t0:.1f}s")
        moved = sorted(set(files.moved(todo)) | set(counts["gone"]))
        return counts, todo, moved

    def _last_sync(self) -> dict:
        """The last sync's record, or {} (a full sync next) for none or one of the wrong shape."""
        try:
            last = json.loads(self.project.state_file("last_sync.json").read_text())
        except (OSError, ValueError):
            return {}
        shape: Dict[str, Any] = {"tree": (str, type(None)), "indexed": (str, type(None)), "mirror": str, "unsure": list}
        if not isinstance(last, dict) or any(k in last and not isinstance(last[k], t) for k, t in shape.items()):
            return {}
        return last if all(isinstance(p, str) for p in last.get("unsure", [])) else {}

    def _save_sync(self, tree: Optional[str], mirror: str, unsure: Sequence[str] = (),
                   indexed: Optional[str] = None) -> None:
        """The last tree the mirror is known to hold, paths whose copy there is unsure (sent
        while they moved: the next sync sends those again), and the tree of the agent's last
        snapshot (`indexed`: the base of the next ask's changes)."""
        self.project.write_state("last_sync.json", json.dumps(
            {"tree": tree, "mirror": mirror, "time": time.time(), "unsure": list(unsure), "indexed": indexed}))

    def mark_indexed(self, synced: "Synced") -> None:
        """The agent made a snapshot of `synced.tree` (it accepted an ask of it), and wrote the
        files the ask carried into its mirror, which now holds that tree."""
        if synced.content:
            self._save_sync(synced.tree, synced.mirror, indexed=synced.tree)
            return
        last = self._last_sync()
        if last.get("tree") == synced.tree:
            self._save_sync(synced.tree, last["mirror"], last.get("unsure", []), indexed=synced.tree)

    def log_apply(self, result: dict) -> None:
        entry = {"time": time.time(), "job": result["job"], "how": result["how"],
                 "files": result["files"], "conflicts": result["conflicts"],
                 "partial": result.get("partial", False), **({"interrupted": True} if result.get("interrupted") else {}),
                 **{k: result[k] for k in ATTEMPT_ORIGIN if k in result}}
        with open(self.project.state_file("applied.log"), "ab+") as f:
            f.seek(0, os.SEEK_END)
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            f.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")  # after half a line: one of its own

    def log_undo(self, restored: List[str]) -> dict:
        """Undo goes back one level: it always reverts the newest apply in the log. The undo's
        entry names what the apply was built from (several attempts), as the apply's does."""
        applies = [e for e in self.applied() if e["how"] != "undo"]
        undone = applies[-1] if applies else {}
        entry = {"job": undone.get("job", ""), "how": "undo", "files": restored, "conflicts": [],
                 **{k: undone[k] for k in ATTEMPT_ORIGIN if k in undone}}
        self.log_apply(entry)
        return entry

    def applied(self) -> List[dict]:
        """The log, oldest first; an apply that a later undo reverted is marked "undone"."""
        try:
            lines = self.project.state_file("applied.log").read_text().splitlines()
        except OSError:
            return []
        entries, open_applies = [e for e in map(log_entry, lines) if e is not None], []
        for entry in entries:
            if entry["how"] != "undo":
                open_applies.append(entry)
            elif open_applies and not entry.get("interrupted"):  # an apply stopped half way was never logged
                open_applies.pop()["undone"] = True
        return entries

    def open_apply(self, job: str) -> Optional[dict]:
        """The log's apply of all of `job` that no undo has reverted, if any."""
        for entry in reversed(self.applied()):
            if entry["job"] == job and entry["how"] in ("plain", "3-way") and not entry.get("undone"):
                return None if entry.get("partial") else entry
        return None

    def remember_job(self, job: str) -> None:
        self.project.state_file("last_job").write_text(check_job_id(job))

    # The merge base of a 3-way apply is the tree this laptop recorded when it sent the job's
    # files, never what the box says (a box answering git's empty tree would make every file
    # "new" and every local file "yours"). Kept by job id beside the apply log.
    def record_job_tree(self, job: str, tree: str) -> None:
        with self.project.record_lock():  # parallel asks would each drop the other's job
            trees = self._job_trees()
            trees.pop(check_job_id(job), None)
            trees[job] = tree
            kept = dict(list(trees.items())[-500:])
            self.project.write_state("job_trees.json", json.dumps(kept))
            self.project.pin_record(job, tree, kept)

    # Jobs `ask --detach` left behind, until a `wait` has offered them: a bare `wait` finds a
    # detached job that ended before it was run, not only the ones still running.
    def remember_detached(self, job: str) -> None:
        with self.project.record_lock():
            self.project.write_state("detached.json", json.dumps(self.detached() + [check_job_id(job)]))

    def forget_detached(self, job: str) -> None:
        with self.project.record_lock():
            self.project.write_state("detached.json", json.dumps([j for j in self.detached() if j != job]))

    def detached(self) -> List[str]:
        try:
            jobs = json.loads(self.project.state_file("detached.json").read_text())
        except (OSError, ValueError):
            return []
        return [j for j in jobs if isinstance(j, str) and JOB_ID_RE.fullmatch(j)][-100:] if isinstance(jobs, list) else []

    def job_tree(self, job: str) -> Optional[str]:
        return self._job_trees().get(job)

    def _job_trees(self) -> Dict[str, str]:
        try:
            trees = json.loads(self.project.state_file("job_trees.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(trees, dict):
            return {}
        return {k: v for k, v in trees.items() if isinstance(k, str) and isinstance(v, str)}

    def protected_paths(self) -> List[str]:
        """Project paths no patch may touch besides .patchwire.toml: a token file kept inside,
        and the files ssh_options names (`-F ssh_config`: a ProxyCommand added there runs at
        the next sync; `-i key`, `-o IdentityFile=`, `-o Include=`, `-o UserKnownHostsFile=`)."""
        names = [self.cfg.token_file] if self.cfg.token_file else []
        names += ssh_option_files(self.cfg.ssh_options)
        out = []
        for name in names:
            path = Path(os.path.expanduser(name))
            try:
                out.append((path if path.is_absolute() else self.cfg.root / path).resolve()
                           .relative_to(self.cfg.root.resolve()).as_posix())
            except (ValueError, OSError):
                continue
        return out

    def vet(self, patch: bytes, job: str = "", whole: bool = True) -> List[FilePatch]:
        """The job's patch (or the part chosen of it: not `whole`) read strictly, checked
        against the files here and its results computed from the synced bytes
        (compute_results), or PatchRefused."""
        return self.reading(patch, job, whole).finish()

    def reading(self, patch: bytes, job: str = "", whole: bool = True) -> "PatchReading":
        """The job's patch with its headers read and vetted, its bodies read and computed
        as a preview reaches them (PatchReading; `finish` before applying)."""
        return PatchReading(self.project, patch, self.protected_paths(), self.job_tree(job) if job else None, whole)

    def job_diff(self, job: str, sha256: Optional[str] = None) -> bytes:
        """A finished job's patch: fetched once and kept in the state folder, so what a later
        apply writes is what was reviewed, whatever the box serves next; with `sha256`, the
        bytes must be those (the hash `diff --json` gave the reviewer, VS Code's Apply)."""
        kept = self.project.state_file(f"diffs/{check_job_id(job)}.patch")
        try:
            patch, fetched = kept.read_bytes(), False
        except OSError:
            patch, fetched = self.client.diff(job), True
        if sha256 and hashlib.sha256(patch).hexdigest() != sha256.lower():
            raise refuse(f"job {job}'s patch is not the one reviewed (its sha256 is "
                         f"{hashlib.sha256(patch).hexdigest()}, not {sha256})")
        if fetched:  # never a copy the hash refused; whole or not at all (a full disk left half of one)
            kept.parent.mkdir(exist_ok=True)
            self.project.write_state(f"diffs/{job}.patch", patch)
        return patch

    # A job named by a prefix is resolved once, to one full id, and everything after goes by
    # that id: the diff kept for review, the box's record (which must be of exactly that id), the
    # apply. Jobs this laptop asked or kept a diff of resolve here, never by the box: a box that
    # answered `diff abc` with one job and `apply abc` with another would apply unreviewed code.
    def known_jobs(self) -> Set[str]:
        """Ids of this project's jobs the laptop asked, or kept the diff of."""
        known = set(self._job_trees()) | set(self.detached())
        with contextlib.suppress(OSError):
            known.update(name[:-len(".patch")] for name in os.listdir(self.project.state_file("diffs"))
                         if name.endswith(".patch"))
        return {job for job in known if JOB_ID_RE.fullmatch(job)}

    def resolve_job(self, given: Optional[str]) -> str:
        """The full id of the job `given` names (the last ask's when none)."""
        asked = self.job_id(given)
        # every known id that starts with it, itself included: a box that named a later job
        # "abc" (the prefix it saw asked) must not take the place of the reviewed "abc111..."
        matches = sorted(job for job in self.known_jobs() if job.startswith(asked))
        if len(matches) > 1:
            raise UsageError(f"{asked} is the start of {len(matches)} jobs here: {', '.join(matches[:5])}",
                             "give more of its digits")
        if matches:
            return matches[0]
        return check_job_id(self.client.job(asked).get("id"), asked)

    def job_record(self, job: str) -> dict:
        """The box's record of the job whose full id is `job`."""
        record = self.client.job(job)
        if record.get("id") != job:
            raise AgentError(f"asked for job {job}, the agent answered with job {sanitize(str(record.get('id')))[:40]}",
                             "is the URL in .patchwire.toml your patchwire-agent?")
        return record

    def job_id(self, given: Optional[str]) -> str:
        if given:
            if not JOB_ID_RE.fullmatch(given):
                raise UsageError(f"{sanitize(given)[:40]!r} is not a job id",
                                 "job ids are hex digits (a unique prefix is enough); `patchwire jobs` lists yours")
            return given
        try:
            return self.project.state_file("last_job").read_text().strip()
        except OSError:
            raise UsageError("no job given and no earlier ask in this project",
                             "name a job (see `patchwire jobs`)")


SSH_FILE_OPTIONS = ("identityfile", "include", "userknownhostsfile", "certificatefile", "controlpath",
                    "identityagent", "globalknownhostsfile")


def ssh_option_files(options: Sequence[str]) -> List[str]:
    """The files ssh reads because of `options` (-F FILE, -i FILE, -o Key=FILE)."""
    out = []
    for flag, value in zip(options, list(options[1:]) + [""]):
        if flag in ("-F", "-i"):
            out.append(value)
        elif flag.startswith(("-F", "-i")) and len(flag) > 2:
            out.append(flag[2:])
        opt = value if flag == "-o" else flag[2:] if flag.startswith("-o") else ""
        key, _, val = opt.replace("=", " ", 1).partition(" ")
        if key.lower() in SSH_FILE_OPTIONS and val.strip():
            out += val.split()
    return [o for o in out if o]


def say_held(files: FileList) -> None:
    """One line for the held-back count; a line of its own for each file held back by size
    (big files are the ones a user expects to go)."""
    if not files.held:
        return
    say(f"held back {len(files.held)} file(s) (see `patchwire sync --dry-run`)")
    for path, why in files.held.items():
        if "max_file_mb" in why:
            say(f"  held back {sanitize(path)}: {why}")


def describe_paths(paths: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sanitize(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def moved_error(moved: Sequence[str], files: FileList) -> PatchwireError:
    """Files that changed or vanished during two syncs in a row: name them and say why."""
    gone = [p for p in moved if not os.path.lexists(files.root / p)]
    changed = [p for p in moved if p not in gone]
    parts = []
    if changed:
        parts.append(f"{describe_paths(changed)} changed while being sent, twice; is a watcher "
                     "running (build_runner watch, an editor's autosave)?")
    if gone:
        parts.append(f"{describe_paths(gone)} vanished while being sent, twice (temporary files?)")
    return PatchwireError("; ".join(parts), "stop what rewrites them, or leave them out with "
                          "`exclude = [...]` under [sync] in .patchwire.toml, then sync again",
                          details={"paths": list(moved)})


JOB_ID_RE = re.compile(r"[0-9a-f]{1,32}")


def check_job_id(job: Any, prefix: Optional[str] = None) -> str:
    """A job id from the box: hex, and the job that was asked for (it starts with `prefix`)."""
    if not isinstance(job, str) or not JOB_ID_RE.fullmatch(job) or (prefix and not job.startswith(prefix)):
        raise AgentError(f"the agent answered with a job id that is not the one asked for: {sanitize(str(job))[:40]!r}",
                         "is the URL in .patchwire.toml your patchwire-agent?")
    return job


class JobLeft(PatchwireError):
    """Ctrl-C while an ask follows its job: the laptop leaves at once, the job runs on."""

    exit_status = ExitStatus.INTERRUPTED

    def __init__(self, job: str):
        super().__init__(f"left job {job}; it keeps running on the box",
                         f"`patchwire wait {job}` follows it again and offers its change, `patchwire show {job}` "
                         f"shows its progress, `patchwire apply {job}` applies it once it is done, "
                         f"`patchwire cancel {job}` stops it", details={"job": job})


# How long `ask` keeps reconnecting to a job's event stream, counting only the waits between
# tries: long enough for an agent restart (its shutdown grace, then a start), bounded so a
# box that is gone for good ends in a message, not a hang.
RECONNECT_FOR_S = 150.0
STILL_RECONNECTING_S = 10.0


def stream_job(session: Session, first: Iterator[dict], on_event, job: Optional[str] = None,
               after: int = 0) -> dict:
    """Follow a job's events to its last one (JobFollower). Ctrl-C leaves at once without
    cancelling (JobLeft, exit 130, naming the commands that pick the job up again); before
    the box has named the job, it stops the ask like any Ctrl-C. `job` and `after`: a job
    already known (`wait`), followed from its event `after`."""
    follower = JobFollower(session, on_event)
    follower.job, follower.seq = job, after
    try:
        return follower.run(first)
    except KeyboardInterrupt:
        if follower.job is None:
            raise
        raise JobLeft(follower.job) from None


class JobFollower:
    """A job's events, across lost connections: the agent restarting (a SIGTERM lets the job
    finish meanwhile), a network change. Each reconnect asks for the events after the last
    one seen (?after=N); the agent replays what it stored, so a job that ended meanwhile
    still ends here with its own last event. One line says the stream was lost, then at most
    one every STILL_RECONNECTING_S; tries back off up to 5 s apart, for RECONNECT_FOR_S."""

    def __init__(self, session: Session, on_event: Callable[[dict], None], patience: float = RECONNECT_FOR_S):
        self.session, self.on_event, self.patience = session, on_event, patience
        self.job: Optional[str] = None
        self.seq = 0

    def run(self, events: Iterator[dict]) -> dict:
        waited, lost, said, tries = 0.0, "", -STILL_RECONNECTING_S, 0
        while True:
            seq = self.seq
            try:
                end = self.follow(events) or self.ended()
                if end is not None:
                    return end
                problem = "the stream ended before the job did"
            except (AgentError, OSError, ValueError, *http_errors()) as e:
                if self.job is None or not reconnectable(e):
                    raise
                problem = str(e).split("\n")[0]
            if self.seq > seq:  # news came before the loss: a fresh loss, a fresh patience
                waited, lost, said, tries = 0.0, "", -STILL_RECONNECTING_S, 0
            if not lost:
                lost = problem
                say(sanitize(f"lost the event stream ({problem}); reconnecting"))
            elif waited - said >= STILL_RECONNECTING_S:
                said = waited
                say(f"still reconnecting ({waited:.0f} s)")
            if waited >= self.patience:
                raise AgentError(f"lost job {self.job}'s event stream for {waited:.0f} s: {sanitize(problem)}",
                                 f"the job may still run on the box: `patchwire show {self.job}`, then "
                                 f"`patchwire apply {self.job}` once it is done")
            delay = min(0.2 * 2 ** tries, 5.0)
            time.sleep(delay)
            waited, tries = waited + delay, tries + 1
            events = self.session.client.events(self.job, self.seq)

    def follow(self, events: Iterator[dict]) -> Optional[dict]:
        """Hand on every event not seen yet; the last one of the job, or None if the stream
        ended first."""
        for event in events:
            self.job = event.get("job") or self.job
            seq = int(event.get("seq", 0))
            if seq and seq <= self.seq:
                continue  # replayed after a reconnect
            self.seq = max(self.seq, seq)
            self.on_event(event)
            if event.get("type") in LAST_EVENTS:
                return event
        return None


    def ended(self) -> Optional[dict]:
        """The job's end from its record, when its stream closed without the last event (the
        agent stopped before it sent it): the job's result is what counts, not the stream."""
        if self.job is None:
            return None
        job = self.session.client.job(self.job)
        ends = {"done": "finished", "failed": "failed", "cancelled": "cancelled"}
        if job.get("status") not in ends:
            return None
        return {"type": ends[job["status"]], "job": self.job, "reason": str(job.get("reason") or "")}


def patiently(call: Callable[[], Any], what: str, patience: float = RECONNECT_FOR_S) -> Any:
    """`call()`, tried again while the agent cannot be reached (it restarts between a job's
    end and the fetch of its diff), with one line saying so and the same backoff."""
    waited, tries = 0.0, 0
    while True:
        try:
            return call()
        except (AgentError, OSError, *http_errors()) as e:
            if not reconnectable(e) or waited >= patience:
                raise
            if not tries:
                say(sanitize(f"cannot fetch {what} ({str(e).splitlines()[0]}); trying again"))
        delay = min(0.2 * 2 ** tries, 5.0)
        time.sleep(delay)
        waited, tries = waited + delay, tries + 1


def reconnectable(e: BaseException) -> bool:
    """A lost or refused connection, or the agent failing: worth another try. An answer the
    laptop refused (too big, too slow, malformed) would be read again; a refusal (401, 404)
    would be given again."""
    if isinstance(e, AnswerRefused):
        return False
    if isinstance(e, PatchwireError):
        return e.code == "error" or e.http_status >= 500
    return True


def read_answer(prompt: str) -> Optional[str]:
    """One line from stdin, stripped; None when there is no input at all. On a terminal the
    answer is typed on the prompt's own line."""
    sys.stderr.write(prompt + (" " if sys.stdin.isatty() else "\n"))
    sys.stderr.flush()
    try:
        line = sys.stdin.readline()
    except (OSError, ValueError):
        return None
    return line.strip() if line else None


def preview(files: Union[Sequence[FilePatch], "PatchReading"], no_color: bool, heading: Sequence[str] = ()) -> None:
    """What will be written, exactly: the checks on the box (`heading`), what deserves a second
    look, the summary, the diff. A PatchReading is read and computed as the diff reaches each
    of its files, and finished before this returns (the rest, when the reader quit the pager
    early): a file refused on the way ends the diff with the refusal, then raises it."""
    style = Style.for_stream(sys.stdout, no_color)
    reading, heads = (files, files.files) if isinstance(files, PatchReading) else (None, files)
    refused: List[PatchRefused] = []
    diff = until_refused(diff_lines(reading.sections() if reading else heads, style), style, refused)
    page(itertools.chain(heading, render_look_closely(heads, style), render_summary(heads, style), [""], diff))
    if refused:
        raise refused[0]
    if reading:
        reading.finish()


def until_refused(lines: Iterator[str], style: Style, refused: List["PatchRefused"]) -> Iterator[str]:
    """`lines` up to a PatchRefused, which ends them with its message (seen in the pager,
    where the diff stops) and is kept in `refused` to be raised once the pager is closed."""
    try:
        yield from lines
    except PatchRefused as e:
        refused.append(e)
        yield from ["", style("red", e.message)]


def choose(files: List[FilePatch], patch: bytes, *, interactive: bool, only: Sequence[str],
           exclude: Sequence[str], style: Style) -> bytes:
    """The part of the patch to apply: all, --only/--exclude, or hunk by hunk."""
    if interactive:
        return Chooser(files, style).run().render()
    if only or exclude:
        return select_paths(files, only, exclude).render()
    return patch


def apply_job(session: Session, job: str, patch: bytes, *, chosen: Optional[bytes] = None,
              read: Optional[List[FilePatch]] = None,
              interactive: bool = False, only: Sequence[str] = (), exclude: Sequence[str] = (),
              keep_conflicts: Optional[bool] = None, overwrite: Optional[bool] = False,
              no_color: bool = False, origin: Optional[dict] = None) -> dict:
    """Choose (unless `chosen` already is), settle the files in the way (`overwrite`: True
    replaces them, False refuses, None asks), apply, log, report. The merge base is the tree
    this laptop recorded for the job, if it asked it. `read`: `patch` as Session.vet read it
    for the preview (a 50 MB patch is read once, not four times)."""
    style = Style.for_stream(sys.stderr, no_color)
    if chosen is None:
        read = read if read is not None else session.vet(patch, job)
        chosen = choose(read, patch, interactive=interactive, only=only, exclude=exclude, style=style)
    settled, replace = settle_in_the_way(session, job, chosen, overwrite, style, read if chosen is patch else None)
    if not settled.strip():
        say("nothing chosen; nothing applied")
        return {"job": job, "how": "none", "files": [], "conflicts": []}
    applier = Applier(session.project, style, session.protected_paths(), job,
                      lambda conflicted: ask_keep_conflicts(conflicted, style, keep_conflicts),
                      lambda path: denied_by(path, session.cfg.deny, session.cfg.allow))
    read = read if settled is patch else None  # the patch as read above, unless a part was chosen
    chosen = settled
    # One apply of a project at a time, from its read of the files to its log entry: two at
    # once would each write results computed from files the other was rewriting (one change
    # lost, logged as applied). The lock is the record's: a sync waits too, never sending
    # files half written. Only the question about conflict markers (a terminal apply whose
    # 3-way merge conflicts) is asked while it is held: a sync started meanwhile waits for it.
    with session.project.record_lock():
        stopped = UndoLog(session.project).pending()
        if stopped is not None:
            raise PatchError(f"an earlier apply{' of job ' + stopped if stopped else ''} was stopped before it "
                             "finished (killed, or its terminal closed): some of its files may be written; "
                             "nothing was applied now", "`patchwire apply --undo` puts back every file it wrote; "
                             "then apply again")
        done = session.open_apply(job) if chosen is patch and not origin else None
        if done:  # applied by another command while this one asked
            say(f"job {job} was applied here meanwhile (at {when(done['time'])}); nothing changed")
            return {"job": job, "how": "already", "files": [], "conflicts": [], "applied_at": done["time"]}
        result = applier.apply(chosen, session.job_tree(job), replace, read)
        result["job"] = job
        result["partial"] = chosen != patch
        result.update(origin or {})  # several attempts: the ask, and which attempt each file came from
        session.log_apply(result)
    how = {"plain": "", "3-way": " (3-way merged with your changes)"}[result["how"]]
    say(f"applied job {job}{how}: {len(applier.files)} file(s) changed")
    if result["replaced"]:
        say(f"replaced {', '.join(map(sanitize, result['replaced']))}: `patchwire apply --undo` puts back "
            "what was there")
    if result["conflicts"]:
        say(style("yellow", "conflict markers to resolve in: " + ", ".join(map(sanitize, result["conflicts"]))))
    if result["partial"]:
        say(f"the rest of the change stays in job {job} (`patchwire apply {job} -i`)")
    if not session.project.is_git_repo:
        say("note: not a git repository, so 3-way merging is not available here")
    return result


# ================================================================== progress: the job's events on the terminal


class Style:
    """ANSI colour, or none (NO_COLOR, --no-color, not a terminal)."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36",
             "red_bg": "41;97", "green_bg": "42;30", "magenta": "35"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream, no_color: bool = False) -> "Style":
        return cls(not no_color and "NO_COLOR" not in os.environ and stream.isatty())

    def __call__(self, name: str, text: str) -> str:
        return f"\x1b[{self.CODES[name]}m{text}\x1b[0m" if self.enabled and text else text

    def each(self, name: str, lines: List[str]) -> List[str]:
        """[self(name, line) for line in lines], joined and split in C: no line holds a newline."""
        if not (self.enabled and lines and all(lines)):
            return [self(name, line) for line in lines]
        on, off = f"\x1b[{self.CODES[name]}m", "\x1b[0m"
        return (on + (off + "\n" + on).join(lines) + off).split("\n")


def sanitized(value: Any) -> Any:
    """A JSON value from the box with every string in it sanitised (newlines kept, not yet
    indented: the printer lays out its lines itself)."""
    if isinstance(value, str):
        return _UNSAFE_KEEP_NEWLINES.sub(_visible, value)
    if isinstance(value, list):
        return [sanitized(v) for v in value]
    if isinstance(value, dict):
        return {sanitize(str(k)): sanitized(v) for k, v in value.items()}
    return value


class ProgressPrinter:
    """Renders the agent's NDJSON events as human progress on stderr. Every event is
    sanitised once, on the way in: nothing the AI writes reaches the terminal raw."""

    def __init__(self, style: Style):
        self.style = style
        self.start = time.monotonic()

    def stamp(self) -> str:
        return self.style("dim", f"{time.monotonic() - self.start:6.1f}s")

    def __call__(self, event: dict) -> None:
        event = sanitized(event)
        kind = event.get("type")
        handler = getattr(self, "on_" + str(kind), None)
        if handler:
            handler(event)

    @staticmethod
    def flat(value: Any) -> str:
        """One line: a newline the AI put in a tool name does not start a fake line."""
        return str(value).replace("\n", "^J")

    def on_queued(self, e: dict) -> None:
        ahead = e.get("position", 0)
        say(self.stamp(), f"queued as job {self.flat(e.get('job'))}" + (f", {self.flat(ahead)} ahead" if ahead else "")
            + _wait_estimate(e))

    def on_position(self, e: dict) -> None:
        say(self.stamp(), f"waiting: {self.flat(e.get('position'))} ahead in the queue" + _wait_estimate(e))

    def on_started(self, e: dict) -> None:
        ai = e.get("ai")  # set when the box runs its built-in stand-in
        say(self.stamp(), "AI started" + (f" ({self.flat(ai)})" if isinstance(ai, str) else ""))

    def on_links_removed(self, e: dict) -> None:
        paths = ["".join(c if c.isprintable() else "?" for c in str(p)) for p in e.get("paths") or []]
        say(self.stamp(), self.style("yellow", f"{e.get('count', len(paths))} symlink(s) pointing outside "
                                     f"the project kept from the AI: {', '.join(paths[:5])}"))

    def on_repositories_left_out(self, e: dict) -> None:
        paths = ["".join(c if c.isprintable() else "?" for c in str(p)) for p in e.get("paths") or []]
        more = f" and {e['count'] - 5} more" if isinstance(e.get("count"), int) and e["count"] > 5 else ""
        say(self.stamp(), self.style("yellow", "git repositories the AI made inside the project, left out of "
                                     f"the change: {', '.join(paths[:5])}{more}"))

    def on_text(self, e: dict) -> None:
        text = str(e.get("text", "")).strip()
        if text:
            lines = text.split("\n")
            say(self.stamp(), lines[0], *(["\n        " + "\n        ".join(lines[1:])] if lines[1:] else []))

    on_output = on_text

    def on_output_dropped(self, e: dict) -> None:
        size = human_bytes(e["bytes"]) if isinstance(e.get("bytes"), int) else "?"
        say(self.stamp(), self.style("yellow", f"... {self.flat(e.get('events'))} event(s) of the AI's output "
                                     f"({size}) not kept by the box: over {self.flat(e.get('limit'))}"))

    def on_network(self, e: dict) -> None:
        say(self.stamp(), self.style("dim", f"network: {self.flat(e.get('host'))}"))

    def on_network_refused(self, e: dict) -> None:
        say(self.stamp(), self.style("yellow", f"network: {self.flat(e.get('host'))} refused by the box's "
                                     f"[network] policy (x{self.flat(e.get('count', 1))})"))

    def on_tool(self, e: dict) -> None:
        say(self.stamp(), self.style("cyan", f"> {self.flat(e.get('name'))}"), self.flat(e.get("detail", "")))

    def on_tool_error(self, e: dict) -> None:
        say(self.stamp(), self.style("yellow", f"  tool error: {self.flat(str(e.get('text', ''))[:200])}"))

    def on_finished(self, e: dict) -> None:
        stats = e.get("stats") or {}
        if not stats.get("files"):
            say(self.stamp(), self.style("bold", "AI finished: no changes"))
        else:
            say(self.stamp(), self.style("bold", f"AI finished: {self.flat(stats['files'])} file(s), +"
                                         f"{self.flat(stats.get('added', 0))} -{self.flat(stats.get('removed', 0))}"))
        self.say_network(e)

    def on_failed(self, e: dict) -> None:
        reason = str(e.get("reason"))
        if reason.startswith("setup failed"):  # its output was streamed just above: its first line
            say(self.stamp(), self.style("red", f"job failed: {self.flat(reason.split(chr(10))[0])}"))
        else:
            say(self.stamp(), self.style("red", f"AI run failed: {self.flat(reason)}"))
        self.say_network(e)

    def say_network(self, e: dict) -> None:
        summary = network_summary(e.get("network"))
        if summary:
            say(self.stamp(), self.style("yellow" if "refused:" in summary else "dim", summary))

    def on_cancelled(self, e: dict) -> None:
        say(self.stamp(), self.style("yellow", f"job cancelled: {self.flat(e.get('reason', ''))}"))

    def on_setup(self, e: dict) -> None:
        self.say_step("setup", e, self.flat(e.get("command", "")))

    def on_check(self, e: dict) -> None:
        self.say_step("check", e, self.flat(e.get("name", "")))

    def say_step(self, what: str, e: dict, name: str) -> None:
        """A setup command's or a check's start, output line or end."""
        step = e.get("step")
        if step == "start":
            say(self.stamp(), self.style("cyan", f"{what}: {name}"))
        elif step == "end":
            ok = e.get("ok", e.get("exit_code") == 0)
            took = f" ({e['duration_ms'] / 1000:.1f} s)" if isinstance(e.get("duration_ms"), (int, float)) else ""
            say(self.stamp(), self.style("green" if ok else "red",
                                         f"{what}: {name} " + ("ok" if ok else f"FAILED, exit {self.flat(e.get('exit_code'))}")
                                         + took))
        elif step == "skipped":
            say(self.stamp(), self.style("dim", f"{what}: skipped ({self.flat(e.get('reason', ''))})"))
        elif "text" in e:
            say(self.stamp(), self.style("dim", "  | " + self.flat(e.get("text", ""))[:500]))


def network_summary(network: Any) -> str:
    """"contacted: api.anthropic.com, pub.dev; refused: evil.example x3" from a job's egress
    report (the box's `network`), "" without one; hosts sanitised by the caller's printer."""
    if not isinstance(network, dict):
        return ""
    contacted = network.get("contacted") if isinstance(network.get("contacted"), dict) else {}
    refused = network.get("refused") if isinstance(network.get("refused"), dict) else {}
    parts = []
    if contacted:
        parts.append("contacted: " + ", ".join(str(h) for h in list(contacted)[:10])
                     + (f" and {len(contacted) - 10} more" if len(contacted) > 10 else ""))
    if refused:
        parts.append("refused: " + ", ".join(f"{h} x{n}" for h, n in list(refused.items())[:10])
                     + (f" and {len(refused) - 10} more" if len(refused) > 10 else ""))
    return "network " + "; ".join(parts) if parts else ""


def _wait_estimate(e: dict) -> str:
    """", starts in about 3 min": the box's estimate from its recent run times."""
    seconds = e.get("estimate_s")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return ""
    return f", starts in about {seconds} s" if seconds < 120 else f", starts in about {round(seconds / 60)} min"


# ================================================================== telling you it is done (desktop)
# A job that took a while ends with a notification, since its user has likely looked away:
# notify-send on a Linux desktop, osascript on macOS, else the terminal's own notification
# (OSC 9, OSC 777) where the terminal is known to show one, else the bell. Its text holds box
# words (a failure's reason) and passes `sanitize` like every other box string; osascript gets
# it as argv of a fixed script (`on run argv`), never spliced into AppleScript source, where a
# quote would end the string and the rest would run as a script.

OSASCRIPT_NOTIFY = ("on run argv", "display notification (item 2 of argv) with title (item 1 of argv)", "end run")
OSC9_TERMINALS = ("iTerm.app", "WezTerm", "ghostty", "WarpTerminal")  # TERM_PROGRAM values that show OSC 9
OSC777_TERMS = ("rxvt", "foot")  # TERM prefixes of terminals that show OSC 777 notify
DESKTOP_SESSION_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")


def notify_desktop(cfg: LaptopConfig, job: str, end: dict, patch: Optional[bytes], elapsed: float) -> None:
    """The notification for a job that ended after `elapsed` seconds of waiting, when
    [notify] desktop is on and the wait reached after_s. Never raises: it is a courtesy."""
    if not cfg.notify_desktop or elapsed < cfg.notify_after_s:
        return
    title, body = desktop_notice(cfg.project, job, end, patch)
    try:
        send_desktop_notice(title, body)
    except (PatchwireError, OSError) as e:
        say(sanitize(f"note: no desktop notification: {str(e).splitlines()[0]}"))


def desktop_notice(project: str, job: str, end: dict, patch: Optional[bytes]) -> Tuple[str, str]:
    """(title, body): the job, how it ended, the files it changed or why it did not."""
    outcome = {"finished": "done", "failed": "failed", "cancelled": "cancelled"}.get(end.get("type", ""), "ended")
    title = f"Patchwire: job {job} {outcome}"
    if patch is not None:
        count = patch.count(b"\ndiff --git ") + patch.startswith(b"diff --git ")
        body = f"{project}: {count} file(s) changed" if count else f"{project}: no changes"
    else:
        body = f"{project}: {clip_words(str(end.get('reason') or outcome), 200)}"
    return sanitize(title), sanitize(body)


def send_desktop_notice(title: str, body: str) -> None:
    """Show it by the first way this machine has (see the section's comment)."""
    if sys.platform == "darwin" and shutil.which("osascript"):
        run(["osascript", *[arg for line in OSASCRIPT_NOTIFY for arg in ("-e", line)], title, body],
            timeout=10, check=False)
    elif (sys.platform.startswith("linux") and shutil.which("notify-send")
          and any(os.environ.get(v) for v in DESKTOP_SESSION_VARIABLES)):
        # the body is markup to most notification daemons (<a href>, <img src>): shown as text
        body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        run(["notify-send", "--app-name=Patchwire", "--", title, body], timeout=10, check=False)
    else:
        terminal_notice(title, body)


def terminal_notice(title: str, body: str) -> None:
    """OSC 9 or OSC 777 to a terminal known to show it, the bell to any other terminal.
    `sanitize` left no control character in the text, and ";" separates OSC 777's fields."""
    stream = next((s for s in (sys.stdout, sys.stderr) if s.isatty()), None)
    if stream is None:
        return
    if os.environ.get("TERM_PROGRAM") in OSC9_TERMINALS or os.environ.get("WT_SESSION"):
        stream.write(f"\x1b]9;{title}: {body}\x07")
    elif os.environ.get("TERM", "").startswith(OSC777_TERMS):
        stream.write(f"\x1b]777;notify;{title.replace(';', ',')};{body.replace(';', ',')}\x07")
    else:
        stream.write("\a")
    stream.flush()


# ================================================================== reading a patch, strictly
# Every path that touches a patch (preview, plain apply, 3-way, -i, --only/--exclude, undo,
# the apply log, `diff --json`) reads it through PatchParser: whole (split_patch), or its
# headers first and each body as the preview reaches it (PatchReading, finished before any
# question). `git apply` is lenient: it
# skips text between sections and applies a plain unified diff found there, and when a
# `diff --git` header names two different files it believes the `---`/`+++` lines. So
# Patchwire accepts exactly what `git diff --binary --full-index -M` writes, every byte
# accounted for, every name said the same way everywhere, and refuses the whole patch
# otherwise: the preview then shows exactly what `git apply` would write.


class PatchRefused(PatchError):
    """A patch refused as a whole, before anything was written."""


def refuse(reason: str) -> PatchRefused:
    return PatchRefused("refused the whole patch, nothing was written: " + sanitize(reason),
                        "the box sent something `git diff` does not write, or something that reaches "
                        "outside the project (README: Threat model); ask again")


GIT_MODES = ("100644", "100755", "120000")
EXTENDED_HEADERS = (  # (prefix, key) of the lines git writes between `diff --git` and the body
    (b"old mode ", "old_mode"), (b"new mode ", "new_mode"), (b"deleted file mode ", "deleted_mode"),
    (b"new file mode ", "new_file_mode"), (b"similarity index ", "similarity"),
    (b"dissimilarity index ", "dissimilarity"), (b"rename from ", "rename_from"),
    (b"rename to ", "rename_to"), (b"copy from ", "copy_from"), (b"copy to ", "copy_to"),
    (b"index ", "index"),
)
INDEX_RE = re.compile(rb"([0-9a-f]{7,64})\.\.([0-9a-f]{7,64})(?: (\d{6}))?")
BASE85_LINE_RE = re.compile(rb"[A-Za-z][0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]+\n")
BINARY_HEAD_RE = re.compile(rb"(literal|delta) (\d{1,18})\n")  # (18 digits: no int() limit, no overflow)
# The most one binary block may inflate to, and the largest file a delta may leave: git's zlib
# data inflates up to 1000 times (a 788 KB patch to 1 GB), so the size a block declares is
# checked before anything is inflated. A file over the default [sync] max_file_mb is one the
# laptop would not even have sent.
MAX_BINARY_BYTES = DEFAULT_MAX_FILE_MB * 2 ** 20
_C_ESCAPES = {ord("a"): 7, ord("b"): 8, ord("t"): 9, ord("n"): 10, ord("v"): 11, ord("f"): 12,
              ord("r"): 13, ord('"'): 34, ord("\\"): 92}
_C_LETTERS = {code: bytes([letter]) for letter, code in _C_ESCAPES.items()}


class FilePatch:
    """One file's part of a git patch, as bytes, with what the preview needs. Built only by
    PatchParser, which has checked every line of it."""

    def __init__(self, first: bytes):
        self.lines = [first]
        self.headers: Dict[str, bytes] = {}
        self.path = self.old_path = ""
        self.added = self.removed = 0
        self.binary = False
        self.kind = "modified"
        self.old_mode: Optional[str] = None  # None: not said (unchanged, whatever it is here)
        self.new_mode: Optional[str] = None
        self._hunks: List[Tuple[int, int, List[bytes]]] = []  # (old start, new start, lines)
        self._kinds: List[bytes] = []  # each hunk's line_kinds, as the reader counted them
        self.body_start = 0  # index in `lines` of the first hunk header (0: no hunks)
        self.link_target: Optional[str] = None  # the new target, when the result is a symlink
        self.result: Optional[bytes] = None  # the text file it leaves, computed here (compute_results)
        self.pre: Optional[bytes] = None  # the synced bytes it was made from, when compute_results read them
        self.unread: Optional[Callable[["FilePatch"], None]] = None  # reads the body (PatchParser.head)

    def read_body(self) -> None:
        """The body (hunks or binary data) read strictly, once, at its first need: PatchRefused
        when it is not what git writes. Until then `added` and `removed` are counted from the
        lines' first bytes, which is what the strict reading finds in any patch it accepts."""
        if self.unread is not None:
            self.unread(self)  # raises again at the next need if it raised: never half read
            self.unread = None

    @property
    def hunks(self) -> List[Tuple[int, int, List[bytes]]]:
        self.read_body()
        return self._hunks

    @property
    def kinds(self) -> List[bytes]:
        self.read_body()
        return self._kinds

    @property
    def bytes(self) -> bytes:
        return b"".join(self.lines)

    def whole_new_content(self) -> Optional[bytes]:  # type: ignore[valid-type]  # the builtin, not the method
        """The new content when the patch holds all of it (a new file, or a rewrite with no
        context lines from the first line on); None when the rest lies in the file here."""
        if self.binary or len(self.hunks) != 1:
            return None
        _old, new_start, lines = self.hunks[0]
        if new_start > 1 or any(line.startswith(b" ") for line in lines):
            return None
        out = bytearray()
        for i, line in enumerate(lines):
            if line.startswith(b"+"):
                no_newline = i + 1 < len(lines) and lines[i + 1].startswith(b"\\")
                out += line[1:-1] if no_newline else line[1:]
        return bytes(out)

    @property
    def label(self) -> str:
        """What the summary calls this change (the JSON `kind` stays git's word)."""
        if self.link_target is not None:
            return {"new": "new symlink", "modified": "symlink"}.get(self.kind, self.kind)
        if self.kind == "new" and self.new_mode == "100755":
            return "new, exec"
        return self.kind


def c_unquote(token: bytes) -> bytes:
    """git's C-style quoting of an unusual name ("a\\tb", "\\303\\251"), read strictly."""
    if len(token) < 2 or not (token.startswith(b'"') and token.endswith(b'"')):
        raise refuse(f"a badly quoted name: {token[:80]!r}")
    body, out, i = token[1:-1], bytearray(), 0
    while i < len(body):
        c = body[i]
        if c == 0x22:
            raise refuse(f"a stray quote in a name: {token[:80]!r}")
        if c != 0x5C:
            out.append(c)
            i += 1
        elif body[i + 1:i + 2] and body[i + 1] in _C_ESCAPES:
            out.append(_C_ESCAPES[body[i + 1]])
            i += 2
        elif re.fullmatch(rb"[0-3][0-7]{2}", body[i + 1:i + 4]):
            out.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raise refuse(f"a bad escape in a name: {token[:80]!r}")
    return bytes(out)


_QUOTED_BYTE = re.compile(rb'["\\\x00-\x1f\x7f]')
_QUOTED_BYTE_FULL = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')


def c_quote(raw: bytes, full: bool) -> bytes:
    """A name as git writes it: quoted when it holds '"', '\\' or a control byte (and with
    core.quotePath, any byte over 0x7f); as is otherwise."""
    if not (_QUOTED_BYTE_FULL if full else _QUOTED_BYTE).search(raw):
        return raw  # most names: no byte to look at one by one
    out, needed = bytearray(), False
    for c in raw:
        if c in _C_LETTERS:
            out += b"\\" + _C_LETTERS[c]
            needed = True
        elif c < 0x20 or c == 0x7F or (full and c >= 0x80):
            out += b"\\%03o" % c
            needed = True
        else:
            out.append(c)
    return b'"' + bytes(out) + b'"' if needed else raw


def spellings(name: bytes) -> set:
    """Every way git may write `name` (with and without core.quotePath)."""
    return {c_quote(name, False), c_quote(name, True)}


def read_name(token: bytes) -> bytes:
    """A name as git wrote it, back to bytes: quoted, or plain when it needs no quoting."""
    if token.startswith(b'"'):
        name = c_unquote(token)
        if token not in spellings(name):
            raise refuse(f"a name quoted in a way git does not: {token[:80]!r}")
        return name
    if c_quote(token, False) != token:
        raise refuse(f"a name git would have quoted: {token[:80]!r}")
    return token


# Names that are `.git` to some filesystem: any case (macOS, Windows), with trailing dots or
# spaces (Windows drops them), NTFS's short name and stream suffix, and HFS+'s ignored code
# points (the spellings git's own verify_path refuses).
_HFS_IGNORED = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")
_PATH_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


# The longest name of one file or folder most disks take (NAME_MAX: ext4, APFS, NTFS), and the
# longest path the system calls take (PATH_MAX): past them the OS answers ENAMETOOLONG.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def folded_name(component: str) -> str:
    """One path component as a case-insensitive, forgiving filesystem sees it."""
    return _HFS_IGNORED.sub("", component).lower().split(":", 1)[0].rstrip(". ")


def folded_path(path: str) -> str:
    """A whole path as a case-insensitive disk that ignores Unicode normalisation (macOS's)
    sees it: two spellings of one file fold to one string."""
    return unicodedata.normalize("NFC", _HFS_IGNORED.sub("", path)).lower()


def is_dot_git(component: str) -> bool:
    return folded_name(component) in (".git", "git~1")


def check_patch_path(path: str) -> str:
    """A path a patch may touch, or PatchRefused naming why not."""
    if not path or path.startswith("/"):
        raise refuse(f"an absolute or empty path: {path!r}")
    if _PATH_CONTROL.search(path):
        raise refuse(f"a control character in the path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise refuse(f"a path with '..', '.' or '//' in it: {path!r}")
    too_long = length_problem(path)
    if too_long:
        raise refuse(f"{too_long}: {path[:100]!r}" + ("..." if len(path) > 100 else ""))
    if any(is_dot_git(p) for p in parts):
        raise refuse(f"a path into git's own folder: {path!r}")
    if any(folded_name(p) == CONFIG_NAME for p in parts):
        raise refuse(f"a change to Patchwire's own settings ({CONFIG_NAME}): {path!r}")
    return path


def length_problem(path: str) -> Optional[str]:
    """Why `path` is longer than a disk here takes (the OS would answer ENAMETOOLONG), or None."""
    name = max((len(encode_path(part)) for part in path.split("/")), default=0)
    if name > MAX_NAME_BYTES:
        return f"a name of {name} bytes in the path, longer than the {MAX_NAME_BYTES} a disk takes"
    if len(encode_path(path)) > MAX_PATH_BYTES:
        return f"a path of {len(encode_path(path))} bytes, longer than the {MAX_PATH_BYTES} the system takes"
    return None


def link_target_problem(link: str, target: str) -> Optional[str]:
    """Why a symlink at `link` pointing at `target` is refused, read lexically (chains
    through the laptop's own links are followed by vet_on_disk)."""
    if not target or _PATH_CONTROL.search(target):
        return "an empty target or one with control characters"
    if length_problem(target):
        return length_problem(target)
    if target.startswith("/"):
        return "an absolute target"
    depth = len(link.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "a target outside the project"
        elif part not in ("", "."):
            if is_dot_git(part):
                return "a target inside .git"
            depth += 1
    return None


def base85_data(line: bytes) -> bytes:
    """The bytes one line of a binary block holds: its first letter says how many (A-Z 1-26,
    a-z 27-52), the rest is base85 of them, padded to whole groups of four; ValueError when
    a group does not decode."""
    size = line[0] - (ord("A") - 1) if line[:1].isupper() else line[0] - (ord("a") - 27)
    return base64.b85decode(line[1:-1])[:size]


def inflate_exactly(data: bytes, size: int) -> Optional[bytes]:
    """zlib `data` inflated when it is one whole stream of exactly `size` bytes, else None;
    never more than `size` + 1 bytes are inflated, whatever the data would make."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, size + 1)  # (a limit of 0 would mean none: size + 1 >= 1)
    except zlib.error:
        return None
    return out if len(out) == size and inflater.eof and not inflater.unused_data else None


def delta_result_size(delta: bytes) -> Optional[int]:
    """The size of the file a git binary delta leaves: the second of the two sizes it starts
    with (the source's, then the result's; 7 bits a byte, low bits first, the top bit set on
    all but a size's last byte). None when the delta is too short to say."""
    sizes: List[int] = []
    value = shift = 0
    for byte in delta[:20]:  # (two sizes of 64 bits take at most 20 bytes)
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            sizes.append(value)
            if len(sizes) == 2:
                return value
            value = shift = 0
    return None


class PatchParser:
    """`git diff --binary --full-index` output, line by line, nothing skipped."""

    def __init__(self, patch: bytes):
        if patch and not patch.endswith(b"\n"):
            raise refuse("it does not end with a newline (cut short?)")
        self.lines = patch_lines(patch)
        # each line's first byte, all in one bytes: a hunk's body is measured by counting its
        # kinds there (C speed), not line by line (a 50 MB patch holds a million lines)
        self.kinds = line_kinds(self.lines)
        self.i = 0
        self.start = 0  # where the section being read starts
        self.backslash = False  # the section's last hunk had a `\ No newline` line

    def peek(self) -> Optional[bytes]:
        return self.lines[self.i] if self.i < len(self.lines) else None

    def take(self) -> bytes:
        line = self.lines[self.i]
        self.i += 1
        return line

    def fail(self, why: str) -> PatchRefused:
        line = self.peek()
        shown = f": {line[:100]!r}" if line is not None else ""
        return refuse(f"line {self.i + 1}: {why}{shown}")

    def files(self) -> List[FilePatch]:
        """Every section read whole: all the headers first, then each body."""
        out = self.heads()
        for fp in out:
            fp.read_body()
        return out

    def heads(self) -> List[FilePatch]:
        """Every section's headers read strictly and settled (names, kind, modes, a symlink's
        target), each body left for FilePatch.read_body: a preview shows its first files
        without reading the last one's hunks. A section starts at each line that starts with
        `diff --git `: no line git writes inside a section can (a hunk's lines start with a
        sign, a header with its own word, binary data holds no space), and read_body
        requires each body to end exactly where the next section starts."""
        starts = list(self.starts_with(b"diff --git "))
        if self.lines and starts[:1] != [0]:
            self.i = 0
            raise self.fail("text outside a `diff --git` section")
        out = [self.head(start, end) for start, end in zip(starts, starts[1:] + [len(self.lines)])]
        owner: Dict[str, int] = {}  # on a case-insensitive disk README and readme are one file
        for n, fp in enumerate(out):
            for path in {fp.old_path, fp.path}:
                first = owner.setdefault(folded_path(path), n)
                if first != n and not (is_type_change(out[first], fp) or is_case_only_move(out[first], fp)):
                    raise refuse(f"{path!r} is changed by two sections")
        return out

    def starts_with(self, prefix: bytes) -> Iterator[int]:
        """The indexes of the lines that start with `prefix` (found by their first byte)."""
        at = self.kinds.find(prefix[:1])
        while at >= 0:
            if self.lines[at].startswith(prefix):
                yield at
            at = self.kinds.find(prefix[:1], at + 1)

    def head(self, start: int, end: int) -> FilePatch:
        """The section from line `start` to `end`: its headers and ---/+++ lines read and
        settled now, its body when FilePatch.read_body is first called (at once for a
        symlink, whose target is its body)."""
        self.i = self.start = start
        fp = FilePatch(self.take())
        while True:
            line = self.peek()
            key = next((k for prefix, k in EXTENDED_HEADERS if line and line.startswith(prefix)), None)
            if key is None:
                break
            if key in fp.headers:
                raise self.fail(f"a second `{key.replace('_', ' ')}` line")
            prefix = next(p for p, k in EXTENDED_HEADERS if k == key)
            fp.headers[key] = self.take()[len(prefix):-1]
        labels = self.labels(fp)
        fp.lines, body = self.lines[start:end], self.i
        if labels:
            fp.added, fp.removed = self.kinds.count(b"+", body, end), self.kinds.count(b"-", body, end)
        fp.unread = lambda read: self.read_body(read, start, body, end)
        self.settle(fp, labels)
        return fp

    def labels(self, fp: FilePatch) -> Optional[Tuple[bytes, bytes]]:
        """The ---/+++ names before a text section's hunks (None: a binary section, or one
        without a body); `fp.body_start` is where its hunks or binary data begin."""
        line = self.peek()
        if line == b"GIT binary patch\n":
            self.take()
            fp.binary = True
            fp.body_start = self.i - self.start
            return None
        if line is not None and line.startswith(b"Binary files "):
            raise self.fail("a binary change without its content (the box must use git diff --binary)")
        if line is None or not line.startswith(b"--- "):
            return None
        old_label = self.take()[4:-1]
        if self.peek() is None or not self.peek().startswith(b"+++ "):
            raise self.fail("a `---` line without its `+++` line")
        new_label = self.take()[4:-1]
        if self.peek() is None or not self.peek().startswith(b"@@ "):
            raise self.fail("file names without a hunk")
        fp.body_start = self.i - self.start
        return old_label, new_label

    def read_body(self, fp: FilePatch, start: int, body: int, end: int) -> None:
        """A section's hunks or binary data, from line `body`; they must end at `end`, where
        the next section starts (git would read what lies between as something else)."""
        self.i, self.start, self.backslash = body, start, False
        fp.added = fp.removed = 0
        fp._hunks, fp._kinds = [], []
        if fp.binary:
            self.binary_block(fp)
            if self.peek() is not None and self.peek().startswith((b"literal ", b"delta ")):
                self.binary_block(fp)
        elif fp.body_start:
            while self.peek() is not None and self.peek().startswith(b"@@ "):
                self.hunk(fp)
        if self.i != end:
            raise self.fail("text git does not write here")

    def hunk(self, fp: FilePatch) -> None:
        header = self.take()
        m = HUNK_RE.match(header)
        if not m or not (m.group(5) == b"\n" or m.group(5).startswith(b" ")):
            raise refuse(f"line {self.i}: a malformed hunk header: {header[:100]!r}")
        # git reads a hunk by the counts in its header (a missing count is 1), not up to the next
        # `@@`: so does this reader, or a line past the count would be shown here as part of
        # the hunk while git reads it as the start of something else
        old_left = int(m.group(2)) if m.group(2) is not None else 1
        new_left = int(m.group(4)) if m.group(4) is not None else 1
        end = self.hunk_end(old_left, new_left)
        if end:
            lines, kinds = self.lines[self.i:end], self.kinds[self.i:end]
            fp.added, fp.removed, self.i = fp.added + kinds.count(b"+"), fp.removed + kinds.count(b"-"), end
        else:
            lines = self.hunk_lines(fp, old_left, new_left)
            kinds = line_kinds(lines)
        # `\ No newline at end of file` strips the newline of the line before it. git writes it
        # only after a side's last line; anywhere else git apply joins that line to the next,
        # so a previewed `sha256sum -c ... || exit 1` line can vanish into a comment
        backslash = b"\\" in kinds
        problem = no_newline_problem(lines) if backslash else None
        if problem or self.backslash:  # a hunk after one that ended without a newline
            raise refuse(f"line {self.i}: a `\\ No newline at end of file` {problem or 'before the last hunk'}: "
                         "git joins the lines around it, so the file written is not the one shown")
        self.backslash = backslash
        fp._hunks.append((int(m.group(1)), int(m.group(3)), lines))
        fp._kinds.append(kinds)

    def hunk_end(self, old_left: int, new_left: int) -> int:
        """Where a hunk's body that holds exactly the lines its counts say ends, measured on
        `kinds` whole slices at a time; 0 when it does not (then hunk_lines reads it line by
        line and names the line that is wrong). A line counts for one side or both, so the
        body is at least as long as the larger count still missing: the window grows by that
        much and never past where the line-by-line reading would stop."""
        kinds, start = self.kinds, self.i
        end = start
        old = new = 0
        while old < old_left or new < new_left:
            grow = max(old_left - old, new_left - new)
            part = kinds[end:end + grow]
            if len(part) < grow:
                return 0  # the patch ends inside the hunk
            both = part.count(b" ") + part.count(b"\n")
            minus, plus, slashes = part.count(b"-"), part.count(b"+"), part.count(b"\\")
            if both + minus + plus + slashes != grow:
                return 0  # a line that is neither context, removed nor added
            old, new, end = old + both + minus, new + both + plus, end + grow
        if old != old_left or new != new_left:
            return 0  # more lines than the header says
        while kinds[end:end + 1] == b"\\" and self.lines[end].startswith(b"\\ "):
            end += 1  # `\ No newline` after the last line belongs to the hunk
        return end if end > start and self.backslashes_fit(start, end) else 0

    def backslashes_fit(self, start: int, end: int) -> bool:
        """Each `\\` line of a body is a `\\ ` line after a line that is not one."""
        at = self.kinds.find(b"\\", start, end)
        while at >= 0:
            if at == start or self.kinds[at - 1] == 0x5C or not self.lines[at].startswith(b"\\ "):
                return False
            at = self.kinds.find(b"\\", at + 1, end)
        return True

    def hunk_lines(self, fp: FilePatch, old_left: int, new_left: int) -> List[bytes]:
        """A hunk's body read line by line, to name the line where it goes wrong."""
        lines: List[bytes] = []
        while old_left > 0 or new_left > 0 or (self.peek() or b"").startswith(b"\\ "):
            line = self.peek()
            if line is None:
                raise refuse("the patch ends inside a hunk")
            sign = line[:1]
            if sign == b"\\":
                if not line.startswith(b"\\ ") or not lines or lines[-1].startswith(b"\\"):
                    raise self.fail("a stray `\\` line")
            elif sign == b" " or line == b"\n":  # an empty context line, as diff.suppressBlankEmpty writes it
                old_left, new_left = old_left - 1, new_left - 1
            elif sign == b"-":
                old_left -= 1
                fp.removed += 1
            elif sign == b"+":
                new_left -= 1
                fp.added += 1
            else:
                raise self.fail("a line in a hunk that is neither context, removed nor added")
            if old_left < 0 or new_left < 0:
                raise self.fail("more lines than the hunk header says")
            lines.append(self.take())
        return lines

    def binary_block(self, fp: FilePatch) -> None:
        """One `literal N` or `delta N` block: base85 lines of zlib data. N, the size the data
        inflates to, is held to MAX_BINARY_BYTES here, before anything inflates it (a few KB of
        zlib data can inflate to gigabytes); binary_literal checks the data inflates to it."""
        line = self.peek()
        m = BINARY_HEAD_RE.fullmatch(line) if line is not None else None
        if not m:
            raise self.fail("a binary patch without `literal` or `delta`")
        if int(m.group(2)) > MAX_BINARY_BYTES:
            raise self.fail(f"a binary block of {human_bytes(int(m.group(2)))}, over the laptop's limit of "
                            f"{human_bytes(MAX_BINARY_BYTES)}")
        self.take()
        count = 0
        while self.peek() not in (b"\n", None):
            self.base85_line()
            count += 1
        if self.peek() is None or not count:
            raise self.fail("binary data that does not end with an empty line")
        self.take()

    def base85_line(self) -> None:
        """One line of binary data, taken when it decodes (base85_data), else PatchRefused."""
        line = self.peek()
        size = line[0] - (ord("A") - 1) if line[:1].isupper() else line[0] - (ord("a") - 27)
        if not BASE85_LINE_RE.fullmatch(line) or len(line) - 2 != (size + 3) // 4 * 5:
            raise self.fail("a malformed line of binary data")
        try:
            base85_data(line)
        except ValueError:  # a group of five characters past 2**32
            raise self.fail("a malformed line of binary data") from None
        self.take()

    def settle(self, fp: FilePatch, labels: Optional[Tuple[bytes, bytes]]) -> None:
        """Names and kind from the section's lines, which must all agree. git apply reads
        some of these lines and ignores others depending on which are present; a section
        where they disagree means what is shown and what git writes can differ, so every
        disagreement is refused rather than resolved."""
        h = fp.headers
        # the box runs `git diff -M`, which never writes a copy: a copy is hand-made, and
        # its source's content would be written without being shown
        if "copy_from" in h or "copy_to" in h:
            raise refuse("a copy (the box's `git diff` never writes one)")
        if ("rename_from" in h) != ("rename_to" in h) or ("old_mode" in h) != ("new_mode" in h):
            raise refuse(f"a half-said rename or mode change in {fp.lines[0][:100]!r}")
        old, new = self.names(fp, labels)
        # mode 160000 is a gitlink: applying it moves a submodule to a commit no preview shows
        index_mode = INDEX_RE.fullmatch(h.get("index", b""))
        if (any(h.get(k) == b"160000" for k in ("old_mode", "new_mode", "deleted_mode", "new_file_mode"))
                or (index_mode and index_mode.group(3) == b"160000")):
            raise refuse(f"a submodule (gitlink) change to {_dec(new)!r}: Patchwire applies files, links and "
                         "modes only; update the submodule yourself (git submodule update)")
        for key in ("old_mode", "new_mode", "deleted_mode", "new_file_mode"):
            if key in h and h[key].decode("ascii", "replace") not in GIT_MODES:
                raise refuse(f"a file mode Patchwire does not apply ({h[key][:20]!r}): "
                             "only files, executables and symlinks")
        # git writes at most one of new/deleted/renamed/mode-changed per section; with two,
        # which one git apply obeys depends on its reading order, not on the preview
        if ("new_file_mode" in h and ("deleted_mode" in h or "rename_from" in h or "old_mode" in h)
                or "deleted_mode" in h and ("rename_from" in h or "old_mode" in h)):
            raise refuse(f"contradicting header lines in {fp.lines[0][:100]!r}")
        fp.old_path, fp.path = check_patch_path(_dec(old)), check_patch_path(_dec(new))
        self.modes(fp)
        if "new_file_mode" in h:
            fp.kind = "new"
        elif "deleted_mode" in h:
            fp.kind = "deleted"
        elif "rename_from" in h:
            fp.kind = "renamed"
        elif "old_mode" in h:
            fp.kind = "mode changed"
        # without the extended lines git apply takes "new" and "deleted" from ---/+++ /dev/null
        if labels and ((labels[0] == b"/dev/null") != (fp.kind == "new")
                       or (labels[1] == b"/dev/null") != (fp.kind == "deleted")):
            raise refuse(f"a new or deleted file whose ---/+++ lines say otherwise: {fp.path!r}")
        if fp.new_mode == "120000" and fp.kind != "deleted":
            self.link(fp)

    def names(self, fp: FilePatch, labels: Optional[Tuple[bytes, bytes]]) -> Tuple[bytes, bytes]:
        """(old, new) name; the header, rename lines and ---/+++ lines must say the same."""
        h = fp.headers
        old = new = None
        if "rename_from" in h:
            old, new = read_name(h["rename_from"]), read_name(h["rename_to"])
        if labels:
            a, b = (self.label_name(label, prefix) for label, prefix in zip(labels, (b"a/", b"b/")))
            if a is None and b is None:
                raise refuse("a section whose ---/+++ lines both say /dev/null")
            a, b = a if a is not None else b, b if b is not None else a
            if old is not None and (a, b) != (old, new):
                raise refuse(f"---/+++ lines that name other files than the rename lines: {a!r}, {b!r}")
            if old is None and a != b:
                raise refuse(f"---/+++ lines that name two files, {a!r} and {b!r}")
            old, new = a, b
        header = fp.lines[0][len(b"diff --git "):-1]
        if old is None:  # no rename, no hunks: "a/X b/X", said the same twice
            old = new = self.header_name(header)
        if header not in {x + b" " + y for x in spellings(b"a/" + old) for y in spellings(b"b/" + new)}:
            raise refuse(f"a `diff --git` line that names other files than the lines after it: {header[:100]!r}")
        return old, new

    @staticmethod
    def label_name(label: bytes, prefix: bytes) -> Optional[bytes]:
        if label == b"/dev/null":
            return None
        if label.endswith(b"\t"):  # git adds a tab after a name with a space in it
            label = label[:-1]
            if b" " not in label:
                raise refuse(f"a tab after a name git would not add: {label[:100]!r}")
        elif b" " in label:
            raise refuse(f"a name with a space but without git's tab after it: {label[:100]!r}")
        name = read_name(label)
        if not name.startswith(prefix):
            raise refuse(f"a name without git's {prefix.decode()} prefix: {label[:100]!r}")
        return name[len(prefix):]

    @staticmethod
    def header_name(header: bytes) -> bytes:
        if header.startswith(b'"'):
            end = _closing_quote(header)
            name = read_name(header[:end + 1]) if end > 0 else b""
        else:
            name = header[:(len(header) - 1) // 2] if len(header) % 2 else b""
        if not name.startswith(b"a/"):
            raise refuse(f"a `diff --git` line Patchwire cannot read: {header[:100]!r}")
        return name[2:]

    def modes(self, fp: FilePatch) -> None:
        h = fp.headers
        index_mode = None
        if "index" in h:
            m = INDEX_RE.fullmatch(h["index"])
            if not m or (m.group(3) and m.group(3).decode() not in GIT_MODES):
                raise refuse(f"a malformed index line: {h['index'][:100]!r}")
            index_mode = m.group(3).decode() if m.group(3) else None
            if index_mode and any(k in h for k in ("old_mode", "new_mode", "deleted_mode", "new_file_mode")):
                # git writes a mode on the index line only for an unchanged one; `git apply`
                # would let it override "new file mode 100644" and make the file executable
                raise refuse(f"an index line whose mode contradicts the mode lines: {h['index'][:100]!r}")
        fp.old_mode = _mode(h, "deleted_mode") or _mode(h, "old_mode") or index_mode
        fp.new_mode = _mode(h, "new_file_mode") or _mode(h, "new_mode") or index_mode
        if "old_mode" in h and (fp.old_mode == fp.new_mode or "120000" in (fp.old_mode, fp.new_mode)):
            raise refuse(f"a change of {fp.path!r} between a file and a symlink in place "
                         "(git diff writes a deletion and a new file)")

    @staticmethod
    def link(fp: FilePatch) -> None:
        content = fp.whole_new_content()
        if content is None:
            raise refuse(f"a symlink change whose whole new target is not in the patch: {fp.path!r}")
        fp.link_target = _dec(content)
        problem = link_target_problem(fp.path, fp.link_target)
        if problem:
            raise refuse(f"a symlink {fp.path!r} -> {fp.link_target!r} with {problem}")


def _closing_quote(token: bytes) -> int:
    """Index of the quote that ends the quoted name `token` starts with (-1: none)."""
    i = 1
    while i < len(token):
        if token[i:i + 1] == b"\\":
            i += 2
        elif token[i:i + 1] == b'"':
            return i
        else:
            i += 1
    return -1


def is_type_change(first: FilePatch, second: FilePatch) -> bool:
    """git writes a file that became a symlink (or back) as a deletion, then a new file."""
    return ((first.kind, second.kind) == ("deleted", "new") and first.path == second.path
            and "120000" in (first.old_mode, second.new_mode))


def is_case_only_move(first: FilePatch, second: FilePatch) -> bool:
    """A rename that changes only case (r.md -> R.md): git writes it as a deletion, then a new
    file, whose paths fold to one on a case-insensitive disk. The deletion comes first, so
    on such a disk the old name is gone before the new one is written."""
    return ((first.kind, second.kind) == ("deleted", "new") and first.path != second.path
            and folded_path(first.path) == folded_path(second.path))


def no_newline_problem(lines: List[bytes]) -> Optional[str]:
    """Where git writes `\\ No newline at end of file`: after the last line of the old side
    (a `-` or context line), of the new side (a `+` or context line), or both. Anywhere else
    `git apply` joins the line before it with the next one (an added check vanishes into a
    comment), so the preview would show two lines where the file gets one."""
    for i, line in enumerate(lines):
        if not line.startswith(b"\\"):
            continue
        sign = b" " if lines[i - 1] == b"\n" else lines[i - 1][:1]
        later = {b" " if l == b"\n" else l[:1] for l in lines[i + 1:] if not l.startswith(b"\\")}
        side = {b" ": {b" ", b"-", b"+"}, b"-": {b" ", b"-"}, b"+": {b" ", b"+"}}[sign]
        if later & side:
            return f"after a {sign.decode()!r} line that is not the last of its side"
    return None


def _mode(headers: Dict[str, bytes], key: str) -> Optional[str]:
    return headers[key].decode() if key in headers else None


def patch_lines(data: bytes) -> List[bytes]:
    """Lines ending in LF, and only LF: a lone CR is part of a line's content (BytesIO splits
    at LF alone, unlike bytes.splitlines)."""
    return io.BytesIO(data).readlines()


def line_kinds(lines: Sequence[bytes]) -> bytes:
    """The first byte of each line (none is empty), in one bytes object."""
    return bytes(map(operator.itemgetter(0), lines))


def split_patch(patch: bytes) -> List[FilePatch]:
    """The patch's files, or PatchRefused: the one reader of patches on the laptop."""
    with collector_paused():
        return PatchParser(patch).files()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector held off: reading a patch makes a few thousand lists (the
    sections, their hunks) beside a million lines, none of them in a cycle, and the
    collections their making set off doubled the reading time of a 50 MB patch. What was
    made is then frozen (gc.freeze: never scanned again, still freed when no longer used),
    or the first collections after would walk the million lines, three times over as they
    age: 40 ms of a 50 MB patch's preview. A cycle among what was frozen is freed only at
    exit: the laptop's commands are short-lived."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


# ================================================================== vetting: a patch against the files here, its results computed


def vet_on_disk(root: Path, files: List["FilePatch"], protected: Sequence[str] = ()) -> List["FilePatch"]:
    """The parsed patch again, or PatchRefused: no path lies beneath a symlink here (unless
    the patch itself removes that link), no path is a protected one, and no symlink the
    patch makes leads out of the project or into .git, even through links already here."""
    gone = removed_links(root, files)
    shielded = {folded_path(p) for p in protected}
    links: Dict[str, str] = {}
    git_dirs: Dict[str, bool] = {}
    for f in files:
        for path in {f.old_path, f.path}:
            if folded_path(path) in shielded:
                raise refuse(f"a change to {path!r}, which Patchwire keeps (your token file, or a file "
                             "your ssh_options name)")
            inside = git_dir_above(root, path, git_dirs)
            if inside:
                raise refuse(f"a change to {path!r}, inside {inside!r}, which holds a git repository's own "
                             "files (HEAD, objects, refs): its config and hooks run at the next git command there")
            # git apply writes through a symlink in a parent folder (it opens the path): a link
            # `lib -> ~/.ssh` here plus a patch to `lib/authorized_keys` writes outside the project
            link = symlink_parent(root, path)
            if link and not beneath(path, gone):
                raise refuse(f"{path!r} lies beyond the symlink {link!r} here: writing there would "
                             "write wherever that link points")
        if f.kind == "deleted":
            continue
        if f.link_target is not None:
            links[f.path] = f.link_target
        elif f.new_mode is None and not beneath(f.old_path, gone):
            # a section with no mode lines keeps the file's type: changing a symlink's "content"
            # changes where it points, though nothing in the section says "symlink"
            was = read_worktree(root, f.old_path)
            if was and was[1] == "120000":  # a link here, kept a link (changed or moved)
                content = f.whole_new_content() if f.hunks else was[0]
                if content is None:
                    raise refuse(f"a change to the symlink {f.path!r} whose whole new target is not in the patch")
                links[f.path] = f.link_target = _dec(content)
                f.new_mode = "120000"
    for path, target in links.items():
        problem = link_target_problem(path, target) or link_chain_problem(root, path, target, links, gone)
        if problem:
            raise refuse(f"a symlink {path!r} -> {target!r} with {problem}")
    return files


def git_dir_above(root: Path, path: str, known: Dict[str, bool]) -> Optional[str]:
    """The folder above `path` here that is a git repository's own folder by git's own test
    (a file HEAD, folders objects and refs; never through a link), or None. A `.git` by any
    name is refused by the patch reader; this finds the others: `git init --separate-git-dir
    sub/gitdata`, a bare repository. `known`: folders answered already."""
    parts = path.split("/")[:-1]
    for n in range(1, len(parts) + 1):
        folder = "/".join(parts[:n])
        if folder not in known:
            try:
                head, objects, refs = (lstat_or_none(root / folder / name) for name in ("HEAD", "objects", "refs"))
            except OSError:  # a folder this account may not search: symlink_parent refuses it, naming why
                return None
            known[folder] = bool(head and stat.S_ISREG(head.st_mode) and objects and stat.S_ISDIR(objects.st_mode)
                                 and refs and stat.S_ISDIR(refs.st_mode))
        if known[folder]:
            return folder
    return None


# --- the result, computed here
#
# `git apply` forgives: a hunk whose lines are not at the line its `@@` names is looked for
# elsewhere (and one without trailing context is anchored at the end of the file), so a box
# can show a change in one function and land it in another. The laptop therefore computes
# every text file's result itself, from the synced bytes the patch's `index` line names (in
# Patchwire's store since the sync), with no offset and no fuzz, and requires its blob id to
# be the one that line names. The preview shows those hunks (their heading text, which the
# box writes, dropped), and apply checks the written files against these bytes.

ZERO_ID = re.compile(r"0+")
SCRIPT_SUFFIXES = (".sh", ".bash", ".zsh", ".py", ".pl", ".rb", ".js", ".mjs", ".cjs", ".ts", ".php",
                   ".ps1", ".bat", ".cmd", ".mk", ".lua", ".fish")


def blob_id(data: bytes, like: str) -> str:
    """git's id of a blob holding `data`, in the hash `like` (an id) is written in."""
    digest = hashlib.new("sha256" if len(like) == 64 else "sha1", b"blob %d\0" % len(data))
    digest.update(data)  # not header + data: that copies the file
    return digest.hexdigest()


def index_ids(fp: FilePatch) -> Optional[Tuple[str, str]]:
    """(old id, new id) from a full `index` line (git diff --full-index); None otherwise."""
    m = INDEX_RE.fullmatch(fp.headers.get("index", b""))
    if not m or len(m.group(1)) not in (40, 64) or len(m.group(2)) != len(m.group(1)):
        return None
    return m.group(1).decode(), m.group(2).decode()


# A hunk's body as runs of one kind of line: removed, added, context (an empty context line is a
# bare LF), or one `\ No newline at end of file`
_HUNK_RUNS = re.compile(rb"-+|\++|[ \n]+|\\")


def hunk_sides(lines: List[bytes], kinds: Optional[bytes] = None) -> Tuple[bytes, int, bytes, int, bool]:
    """(old side's text, its line count, new side's text, its line count, has trailing
    context) of one hunk (`kinds`: its line_kinds, when counted already); a line followed by
    `\\ No newline at end of file` loses its newline. Built a run of lines at a time: a
    rewrite of 100,000 lines is two runs."""
    kinds = line_kinds(lines) if kinds is None else kinds
    old: List[bytes] = []
    new: List[bytes] = []
    old_n = new_n = 0
    went: Tuple[List[bytes], ...] = ()  # the sides the run before went to
    for run in _HUNK_RUNS.finditer(kinds):
        first, end = run.span()
        sign = kinds[first:first + 1]
        if sign == b"\\":
            for side in went:
                side[-1] = side[-1][:-1]
            continue
        went = (old,) if sign == b"-" else (new,) if sign == b"+" else (old, new)
        text = run_text(lines[first:end], sign)
        for side in went:
            side.append(text)
        old_n += end - first if sign != b"+" else 0
        new_n += end - first if sign != b"-" else 0
    trailing = kinds.rstrip(b"\\")[-1:] in (b" ", b"\n")
    return b"".join(old), old_n, b"".join(new), new_n, trailing


_WITHOUT_SIGN = operator.itemgetter(slice(1, None))


def run_text(run: List[bytes], sign: bytes) -> bytes:
    """The text of a run of lines of one kind, their signs dropped. Each removed or added
    line starts with its sign: its slice past it (a quarter faster than the replace below).
    A context run's empty lines may have none (a bare LF): after every LF of the joined run
    the next line's sign goes, and the first line's."""
    if sign in (b"+", b"-"):
        return b"".join(map(_WITHOUT_SIGN, run))
    joined = b"".join(run)
    sign = b" " if sign == b"\n" else sign
    joined = joined[1:] if joined[:1] == sign else joined
    return joined.replace(b"\n" + sign, b"\n")


def post_image(pre: bytes, fp: FilePatch, whole: bool = True) -> bytes:
    """The file `fp` makes of `pre`, every hunk at exactly the line it names, its context and
    removed lines byte for byte those of `pre` there; PatchRefused otherwise. `whole`: the
    new line numbers too (a part chosen by -i renumbers them its own way; git ignores them).
    Lines are compared and copied as whole slices of `pre` (`starts`: where each line begins)."""
    starts, whole_pre = LineStarts(pre), memoryview(pre)  # compared in place, not copied
    count = starts.count
    out: List[bytes] = []
    at = made = 0  # lines of `pre` used, lines of the result made
    kinds = fp.kinds if len(fp.kinds) == len(fp.hunks) else [line_kinds(lines) for _, _, lines in fp.hunks]
    for (old_start, new_start, lines), counted in zip(fp.hunks, kinds):
        gone, gone_n, added, added_n, trailing = hunk_sides(lines, counted)
        start = old_start - 1 if gone_n else old_start  # `-5,0`: insert after line 5
        if start < at or whole_pre[starts[start]:starts[start + gone_n]] != gone:
            raise refuse(f"a hunk of {fp.path!r} whose lines are not those of the synced file at "
                         f"line {old_start} (git would look for them elsewhere and change another place)")
        if not trailing and start + gone_n != count:
            raise refuse(f"a hunk of {fp.path!r} without trailing context that does not end the file "
                         "(git would apply it at the end of the file instead)")
        before = made + start - at
        if whole and new_start != before + (1 if added_n else 0):
            raise refuse(f"a hunk of {fp.path!r} whose new line number {new_start} is not where it lands")
        out += [whole_pre[starts[at]:starts[start]], added]
        made, at = before + added_n, start + gone_n
    # a file rewritten whole is its added text: bytes.join of one bytes returns it, no copy
    return b"".join([piece for piece in [*out, whole_pre[starts[at]:]] if len(piece)])


class LineStarts:
    """Where line N of `data` begins (past the last line: its end). Counted on first need: a
    file rewritten whole has hunks only at its two ends, and needs none of them."""

    def __init__(self, data: bytes):
        self.data = data
        self.count = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        self.starts: Optional[List[int]] = None

    def __getitem__(self, line: int) -> int:
        if line <= 0 or line >= self.count:
            return 0 if line <= 0 else len(self.data)
        if self.starts is None:
            self.starts = [0, *itertools.accumulate(map(len, patch_lines(self.data)))]
        return self.starts[line]


def preimage(project: "Project", fp: FilePatch, base_tree: Optional[str],
             blobs: Optional[Dict[str, Optional[bytes]]] = None) -> Optional[bytes]:
    """The synced bytes a section was made from: the blob its `index` line names (in
    Patchwire's store since the sync; from `blobs` when read already), else the job's
    record here, else the file here."""
    if fp.kind == "new":
        return b""
    ids = index_ids(fp)
    if ids:
        got = blobs[ids[0]] if blobs is not None and ids[0] in blobs else project.git.read_blobs([ids[0]])[ids[0]]
        if got is None:
            raise refuse(f"{fp.old_path!r} as the patch says it was ({ids[0][:12]}) is no version synced "
                         "from here")
        return got
    found = (project.recorded_file(base_tree, fp.old_path) if base_tree and project.recorded(base_tree)
             else read_worktree(project.root, fp.old_path))
    return found[0] if found else None


def compute_results(project: "Project", files: Sequence[FilePatch], base_tree: Optional[str],
                    whole: bool = True, sources_checked: bool = False) -> Sequence[FilePatch]:
    """Each text file's result into `fp.result`, or PatchRefused. `whole`: the patch as the
    box sent it, whose results must be the blobs its `index` lines name (a part chosen
    from it by --only or -i is checked by position only). The blobs the sections name are
    read in one git process, not one each."""
    for fp in files:
        fp.read_body()  # PatchRefused before any blob is read, as for a patch read whole
    if not sources_checked:
        check_synced_sources(project, files, base_tree)
    blobs = synced_blobs(project, files)
    for fp in files:
        if fp.binary:
            problem = binary_problem(fp, preimage(project, fp, base_tree, blobs))
            if problem:
                raise refuse(f"a binary patch to {fp.path!r}, {problem}: what it writes cannot be "
                             "reviewed (ask for a text change)")
            continue
        if not fp.hunks:
            continue
        pre = preimage(project, fp, base_tree, blobs)
        if pre is None:
            raise refuse(f"a change to {fp.old_path!r}, which was not synced from here")
        fp.pre, fp.result = pre, post_image(pre, fp, whole)
        ids = index_ids(fp)
        expected = "" if ids is None or ZERO_ID.fullmatch(ids[1]) else ids[1]
        if whole and ids and (blob_id(fp.result, ids[1]) != expected if expected else fp.result):
            raise refuse(f"the result for {fp.path!r} is not the file its index line names ({ids[1][:12]})")
    return files


class PatchReading:
    """A patch read for a person to review it, and computed as they read it. Before anything
    shows, every section's headers are read strictly and the whole patch is vetted against
    the files here (vet_on_disk: paths, protected files, symlinks) and the job's record
    (check_synced_sources), so the notes and the
    summary at the top are about all of it. Each section's body is read strictly and its
    result computed (compute_results) when the preview reaches it, a batch of sections at a
    time, each batch four times the one before (one git process per batch, not one per
    file): the first screen of a 100,000-line diff needs its first files only. `finish`
    reads and computes the rest, and nothing may be applied before it has returned: the
    preview may show the start of a patch that is refused at its end."""

    def __init__(self, project: "Project", patch: bytes, protected: Sequence[str] = (),
                 base_tree: Optional[str] = None, whole: bool = True):
        self.project, self.base_tree, self.whole = project, base_tree, whole
        with collector_paused():
            self.files = vet_on_disk(project.root, PatchParser(patch).heads(), protected)
        check_synced_sources(project, self.files, base_tree)  # all at once, from the headers
        self.done = 0  # files[:done] are read whole and computed

    def sections(self) -> Iterator[FilePatch]:
        """Each section once its body is read and its result computed, in patch order."""
        for n, fp in enumerate(self.files):
            if n == self.done:
                self.compute(max(1, 4 * n))
            yield fp

    def compute(self, upto: int) -> None:
        batch = self.files[self.done:upto]
        with collector_paused():
            compute_results(self.project, batch, self.base_tree, self.whole, sources_checked=True)
        self.done += len(batch)

    def finish(self) -> List[FilePatch]:
        """Every section read whole, vetted and computed (PatchRefused otherwise)."""
        self.compute(len(self.files))
        return self.files


def check_synced_sources(project: "Project", files: Sequence[FilePatch], base_tree: Optional[str]) -> None:
    """With the record of the job's own sync (`base_tree`), each section that changes, moves,
    copies or deletes a file must start from the file that sync sent: its path in the record,
    and the blob its `index` line names. A box naming another blob of the store (an earlier
    sync's version of the file, or any file's) had its hunks computed and shown against that
    one, while `git apply` placed them in the file here by their lines, elsewhere; a file no
    sync sent (an ignored .env) could be renamed under a name the next sync sends. PatchRefused.
    Without the record, Applier.check_unrecorded holds the files here to the `index` lines."""
    if not base_tree or not project.recorded(base_tree):
        return
    sources = [fp for fp in files if fp.kind != "new"]
    recorded = project.recorded_entries(base_tree, sorted({fp.old_path for fp in sources}))
    for fp in sources:
        entry = recorded.get(fp.old_path)
        if entry is None:
            raise refuse(f"a change to {fp.old_path!r}, which was not synced from here for this job")
        ids = index_ids(fp)
        if ids and ids[0] != entry[1]:
            raise refuse(f"{fp.old_path!r} as the patch says it was ({ids[0][:12]}) is not the version synced "
                         f"for this job ({entry[1][:12]})")


def synced_blobs(project: "Project", files: Sequence[FilePatch]) -> Dict[str, Optional[bytes]]:
    """{id: bytes, None when the store lacks it} of the blobs the sections' `index` lines say
    they were made from. Patchwire's store holds them deflated (packed: as deltas too), and
    inflating 64 MB took 0.4 s, while a file here that still holds those bytes is read and
    hashed in a fifth of that: so a blob the store has is taken from the file here when the
    file hashes to its id (the same bytes, by git's own naming); the rest come from the
    store, all in one `cat-file --batch`."""
    wanted = {ids[0]: fp.old_path for fp, ids in zip(files, map(index_ids, files))
              if ids and not ZERO_ID.fullmatch(ids[0])}
    found: Dict[str, Optional[bytes]] = {}
    for blob in project.git.have_objects(list(wanted)):
        with contextlib.suppress(PatchwireError):  # a path through a symlink: read from the store
            here = read_worktree(project.root, wanted[blob])
            if here is not None and blob_id(here[0], blob) == blob:
                found[blob] = here[0]
    return {**found, **project.git.read_blobs([blob for blob in wanted if blob not in found])}


def binary_problem(fp: FilePatch, pre: Optional[bytes]) -> Optional[str]:
    """Why a binary patch is refused: it turns a text file into base85 the preview cannot
    show (one NUL byte added to a script is enough for git diff to write one), it changes an
    executable or a script, or its literal content is text after all. PatchRefused when its
    data is not what it says (binary_literal)."""
    literal = binary_literal(fp)
    if "100755" in (fp.old_mode, fp.new_mode):
        return "an executable"
    if any(p.lower().endswith(SCRIPT_SUFFIXES) for p in (fp.path, fp.old_path)):
        return "a script"
    if pre and b"\0" not in pre[:8000]:
        return "a text file here"
    if literal is not None and (literal.startswith(b"#!") or b"\0" not in literal[:8000]):
        return "which decodes to text" + (" starting with #!" if literal.startswith(b"#!") else "")
    return None


def binary_literal(fp: FilePatch) -> Optional[bytes]:
    """The content a `literal` binary patch writes (git's base85 of zlib data); None for a delta.
    Every block of the section (the change, then git's reverse of it) must inflate to exactly
    the size its line says, as git apply requires, else PatchRefused; inflating stops one byte
    past that size, which PatchParser.binary_block held to MAX_BINARY_BYTES."""
    content = None
    for n, (kind, declared, data) in enumerate(binary_blocks(fp)):
        inflated = inflated_block(fp.path, kind, declared, data)
        content = inflated if n == 0 and kind == b"literal" else content
    return content


def inflated_block(path: str, kind: bytes, declared: int, data: bytes) -> bytes:
    """One binary block's zlib `data` inflated, when it makes exactly the `declared` bytes;
    a delta must also say it makes a file within MAX_BINARY_BYTES (git apply makes one of the
    size it says). Else PatchRefused."""
    inflated = inflate_exactly(data, declared)
    if inflated is None:
        raise refuse(f"binary data for {path!r} that does not inflate to exactly the {declared} bytes "
                     f"its `{_dec(kind)}` line says")
    made = delta_result_size(inflated) if kind == b"delta" else declared
    if made is None:
        raise refuse(f"a binary delta for {path!r} that does not say the size of the file it makes")
    if made > MAX_BINARY_BYTES:
        raise refuse(f"a binary delta for {path!r} that makes a file of {human_bytes(made)}, over the "
                     f"laptop's limit of {human_bytes(MAX_BINARY_BYTES)}")
    return inflated


def binary_blocks(fp: FilePatch) -> Iterator[Tuple[bytes, int, bytes]]:
    """(`literal` or `delta`, the size it says, its zlib data) of each block of a binary
    section, whose lines PatchParser.binary_block has checked."""
    lines = fp.lines[fp.body_start:]
    at = 0
    while at < len(lines):
        m = BINARY_HEAD_RE.fullmatch(lines[at])
        if not m:
            return
        data = list(itertools.takewhile(lambda line: line != b"\n", lines[at + 1:]))
        yield m.group(1), int(m.group(2)), b"".join(map(base85_data, data))
        at += len(data) + 2  # the head line, the data, the empty line


def unchanged_since_sync(project: "Project", files: Sequence[FilePatch], base_tree: Optional[str],
                         read: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None) -> set:
    """Paths of the text files here that hold exactly the bytes the patch was made from:
    there the result git writes must be the one computed (Applier.check_written). `read`:
    the files here read already."""
    read = read or {}
    out = set()
    for fp in files:
        if fp.result is not None and not fp.binary:
            old = fp.old_path
            here = (read[old] if old in read else read_worktree(project.root, old)) if fp.kind != "new" else None
            pre = fp.pre if fp.pre is not None else preimage(project, fp, base_tree)
            if (here[0] if here else b"" if fp.kind == "new" else None) == pre:
                out.add(fp.path)
    return out


# A file in the way larger than this is refused, not read: replacing it would keep its bytes
# in the undo log, held whole in memory (a 3 GB data file took 9.5 GB).
IN_THE_WAY_MAX_BYTES = 64 << 20


class InTheWay:
    """A file already at a new file's or a rename's destination that the patch would replace:
    what it holds was never synced or reviewed (a file made since the sync, an ignored `.env`).
    `status` is git's word for it: "untracked" or "ignored" (every file outside git is untracked)."""

    def __init__(self, fp: FilePatch, status: str, data: bytes, mode: str):
        self.fp, self.status, self.data, self.mode = fp, status, data, mode

    @property
    def path(self) -> str:
        return self.fp.path

    @property
    def digest(self) -> str:
        """What the user agreed to replace: these bytes, not whatever the path holds later."""
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        kind = f"{self.status} symlink" if self.mode == "120000" else self.status
        return f"{sanitize(self.path)} ({kind}, {size_in_words(len(self.data))})"

    def as_json(self) -> dict:
        return {"path": self.path, "status": self.status, "bytes": len(self.data), "sha256": self.digest}


def size_in_words(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes" if n < 1024 else human_bytes(n)


def files_in_the_way(project: "Project", files: Sequence[FilePatch], job: str = "JOB") -> List[InTheWay]:
    """What a new file or a rename would replace here: a file or link where nothing was synced.
    A file that holds the result already is not in the way. A folder, or a file git tracks
    (the box had it, so a patch calling it new was not made from your files), is never
    replaced: PatchError, before any write; nor is a file outside a sparse checkout that git
    tracks, where nothing is here (`job`: named in that error's hint)."""
    root = project.root
    leaving: Dict[str, List[str]] = {}
    for f in files:
        if f.kind in ("deleted", "renamed"):
            leaving.setdefault(folded_path(f.old_path), []).append(f.old_path)
    found, nothing_here = [], []
    for f in files:
        if (f.kind not in ("new", "renamed") or same_file_leaving(root, f.path, leaving.get(folded_path(f.path), []))
                or symlink_parent(root, f.path)):
            continue
        st = lstat_or_none(root / f.path)
        if st is None:
            nothing_here.append(f.path)
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size > IN_THE_WAY_MAX_BYTES:  # never read whole, nor kept
            raise PatchError(f"{sanitize(f.path)} is here ({size_in_words(st.st_size)}), where the patch puts a new "
                             "file or a rename: too big to be kept for `apply --undo`; nothing was changed",
                             "move it out of the way and apply again, or leave that file out (--exclude PATH)")
        here = read_worktree(root, f.path)
        if here is not None and f.result is not None and here[0] == f.result:
            continue
        status = worktree_status(project, f.path) if here is not None else "a folder"
        if here is None or status == "tracked":
            raise PatchError(f"{sanitize(f.path)} is already here ({status}), where the patch puts a new file "
                             "or a rename: it was not made from the files here; nothing was changed",
                             "if you made it since the ask, move it away and apply again; otherwise ask again")
        found.append(InTheWay(f, status, *here))
    outside = outside_sparse_checkout(project, nothing_here)
    if outside:
        raise outside_sparse_error(outside, job)
    return found


def same_file_leaving(root: Path, path: str, leaving: Sequence[str]) -> bool:
    """Whether `path` is a file the patch moves or deletes (`leaving`: those paths that fold to
    it): the very path, or on a disk that folds case the same file under another case (a
    case-only rename). On a case-sensitive disk `R.md` beside a leaving `r.md` is a file of
    its own, which a new `R.md` would replace."""
    if path in leaving:
        return True
    here = lstat_or_none(root / path)
    for other in leaving:
        there = lstat_or_none(root / other)
        if here is not None and there is not None and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return True
    return False


def outside_sparse_error(paths: Sequence[str], job: str) -> PatchError:
    one = len(paths) == 1
    it, names = "it" if one else "them", " ".join(shlex.quote(sanitize(p)) for p in paths)
    return PatchError(f"{', '.join(map(sanitize, paths))}: tracked by git but outside your sparse checkout, where the "
                      f"patch puts {'a new file' if one else 'new files'}; the box never had {it}, and the AI's "
                      f"{'file' if one else 'files'} would replace the committed {'one' if one else 'ones'} unseen "
                      f"(git would show a change to {it}); nothing was changed",
                      f"widen the checkout to hold {it} (`git sparse-checkout add FOLDER`), sync and ask again; "
                      f"or apply the rest: `patchwire apply {job} --exclude {names}`")


def outside_sparse_checkout(project: "Project", paths: Sequence[str]) -> List[str]:
    """Those of `paths` (nothing is there) that a user's index tracks as skip-worktree: files
    outside a sparse checkout, whose committed content was never synced. The project's own
    repository is asked, or for a path in a repository inside the project (a submodule, a
    nested clone) that one. Compared folded, as the `leaving` paths of files_in_the_way are:
    on a case-insensitive disk that ignores Unicode forms (macOS's), `Other/SHARED.txt` from
    a patch is the file git tracks as `other/shared.txt`. The project's repository is asked
    only when it may have any (index_may_skip)."""
    by_repository: Dict[str, List[str]] = {}
    for path in paths:
        by_repository.setdefault(nested_repository(project.root, path), []).append(path)
    outside = []
    for prefix, group in by_repository.items():
        if prefix:
            listing = Git(cwd=project.root / prefix, neutral=False).run(
                "ls-files", "-z", "-t", "--cached", check=False).stdout or b""
        elif project.user_git is not None and index_may_skip(project.user_index):
            listing = project.user_git.large("ls-files", "-z", "-t", "--cached")
        else:
            continue
        skipped = {folded_path(prefix + path) for path in skip_worktree_paths(listing)}
        outside += [path for path in group if folded_path(path) in skipped]
    return outside


def nested_repository(root: Path, rel: str) -> str:
    """The deepest folder above `rel` inside the project that holds a `.git` (a submodule or a
    repository of its own), as "a/b/"; "" for none. Only real folders are looked in
    (files_in_the_way passes no path beneath a link)."""
    parts, found = rel.split("/"), ""
    for n in range(1, len(parts)):
        folder = os.path.join(root, *parts[:n])
        if not os.path.isdir(folder):
            break
        if os.path.lexists(os.path.join(folder, ".git")):
            found = "/".join(parts[:n]) + "/"
    return found


def index_may_skip(index: Optional[Path]) -> bool:
    """Whether the index at `index` may hold skip-worktree entries: a sparse checkout is set up
    beside it, or it is of version 3 or later (the flag needs the extended flags of version 3).
    Unknown (a project in a subfolder of its repository): True, and git is asked."""
    if index is None:
        return True
    if (index.parent / "info" / "sparse-checkout").exists():
        return True
    header = index_header(index)
    return header is not None and header[0] >= 3


def worktree_status(project: "Project", path: str) -> str:
    """"tracked", "ignored" or "untracked", by the user's own git and its ignore rules."""
    if project.user_git is None:
        return "untracked"
    if project.user_git("ls-files", "-z", "--", path):
        return "tracked"
    ignored = project.user_git("ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--", path)
    return "ignored" if ignored else "untracked"


def check_destinations(project: "Project", files: Sequence[FilePatch], overwrite: Dict[str, str],
                       job: str) -> List[InTheWay]:
    """The files in the way (files_in_the_way) that `overwrite` ({path: sha256 of the bytes
    the user agreed to replace}) lets the patch replace; PatchError naming every other one,
    before any write: git's 3-way fallback would replace them unseen."""
    found = files_in_the_way(project, files, job)
    refused = [w for w in found if overwrite.get(w.path) != w.digest]
    if refused:
        raise in_the_way_error(refused, job)
    return found


def in_the_way_error(found: Sequence[InTheWay], job: str) -> PatchError:
    one = len(found) == 1
    it, names = "it" if one else "them", " ".join(shlex.quote(sanitize(w.path)) for w in found)
    return PatchError(", ".join(w.describe() for w in found) + (" is" if one else " are") + " already here, "
                      f"not part of what you reviewed: the patch would replace {it} (a new file or a rename "
                      "lands there); nothing was changed",
                      f"look at {it}; then `patchwire apply {job} --overwrite-untracked` replaces {it} "
                      f"(`patchwire apply --undo` puts {it} back), or move {it} away, or leave {it} out: "
                      f"`patchwire apply {job} --exclude {names}`",
                      details={"code": CODE_IN_THE_WAY, "in_the_way": [w.as_json() for w in found]})


def lstat_or_none(path: Path) -> Optional[os.stat_result]:
    """os.lstat of `path`, None when nothing is there or nothing can be: a name too long for
    the disk (ENAMETOOLONG), a loop of symlinks on the way (ELOOP)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            return None
        raise


def removed_links(root: Path, files: Sequence["FilePatch"]) -> set:
    """Symlinks here that the patch deletes or moves away."""
    return {f.old_path for f in files if f.kind in ("deleted", "renamed")
            and symlink_parent(root, f.old_path) is None
            and stat.S_ISLNK(lstat_beneath(root, f.old_path))}  # a stat, not a read of the file


def beneath(path: str, folders: set) -> bool:
    """Whether a proper parent folder of `path` is one of `folders`."""
    parts = path.split("/")
    return any("/".join(parts[:n]) in folders for n in range(1, len(parts)))


def real_folder(root: Path, rel: str) -> bool:
    """Whether root/rel is a folder reached through no link: neither it nor a folder above it
    inside `root` is a symlink (a listing of the repository there lists nothing elsewhere)."""
    rel = rel.rstrip("/")  # (a trailing slash would have lstat follow a link)
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(root, rel)).st_mode) and symlink_parent(root, rel) is None
    except (OSError, PatchRefused):  # (a folder above that cannot be looked at: not reached as it should be)
        return False


def symlink_parent(root: Path, rel: str) -> Optional[str]:
    """The first parent folder of `rel` that is a symlink here (never followed), or None;
    PatchRefused when the disk cannot say (a path too long for it, a folder this account may
    not search): a symlink there would go unseen, and git apply writes through one."""
    parts = rel.split("/")
    for n in range(1, len(parts)):
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(root, *parts[:n])).st_mode):
                return "/".join(parts[:n])
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise refuse(f"{rel!r}: cannot tell whether a folder on its way here is a symlink "
                         f"({why_not(e)})") from None
    return None


def link_chain_problem(root: Path, link: str, target: str, links: Dict[str, str], gone: set) -> Optional[str]:
    """Follow `target` component by component through the links here and the patch's own
    (a chain a -> b, b -> ../..), lexically and never on the real filesystem beyond lstat;
    the problem when it leaves the project or enters .git."""
    parts = target.split("/")
    out = link.split("/")[:-1]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return f"a target that leads out of the project (through {link!r})"
            out.pop()
            continue
        if is_dot_git(part):
            return "a target that leads into .git"
        out.append(part)
        here = "/".join(out)
        step = links.get(here)
        if step is None and here not in gone:
            disk = read_worktree(root, here) if symlink_parent(root, here) is None else None
            step = _dec(disk[0]) if disk and disk[1] == "120000" else None
        if step is not None:
            hops += 1
            if hops > 40 or step.startswith("/"):
                return f"a target that leads out of the project through the symlink {here!r}"
            out.pop()
            parts = step.split("/") + parts
    return None


def check_merged_writes(root: Path, merged: Dict[str, Tuple[Optional[bytes], str, int]]) -> None:
    """The 3-way result, vetted like the patch: nothing written beneath a symlink here
    that the result does not delete first."""
    removed = {p for p, (data, _, _) in merged.items() if data is None}
    for path, (data, _, _) in merged.items():
        link = symlink_parent(root, path)
        if data is not None and link and not beneath(path, removed):
            raise refuse(f"{path!r} lies beyond the symlink {link!r} here")


def conflict_excerpt(data: bytes, limit: int = 12) -> List[str]:
    lines = data.decode("utf-8", "replace").splitlines()
    out, inside = [], False
    for line in lines:
        if line.startswith("<<<<<<< "):
            inside = True
        if inside:
            out.append(line)
        if line.startswith(">>>>>>> "):
            inside = False
        if len(out) >= limit:
            out.append("...")
            break
    return out


def confirm_word(prompt: str, word: str, answers=None) -> bool:
    """Whether the line read from `answers` (stdin) is `word`; no input at all is a no."""
    say(prompt)
    try:
        return (answers if answers is not None else sys.stdin).readline().strip().lower() == word
    except (OSError, ValueError):
        return False


# ================================================================== preview: what deserves a second look, and the diff

# Files that run code or configure tools without anyone asking: a change to them acts at the
# next build, `git checkout`, `cd`, editor start, install, CI run or AI run, long after the
# review. By category, each with the reason the preview shows (README: Look closely). This
# tool's users build Flutter, Android and iOS apps: a Gradle wrapper's distributionUrl is a
# program the next `./gradlew` downloads and runs, an Xcode project's build phases are shell
# scripts, a Dart build hook runs at every build.
WRAPPER = "build wrapper or its download"
BUILD = "build script or hook"
CI = "CI"
CONTAINER = "container"
TOOL = "editor or tool configuration"
AI_AGENT = "AI agent configuration"
COMPILED = "compiled code"
_SELF_RUNNING_TABLE = (
    (WRAPPER, r"(^|/)gradle-wrapper\.properties$", "its distributionUrl is a Gradle the next build downloads and runs"),
    (WRAPPER, r"(^|/)(gradle|maven)-wrapper\.jar$", "runs at the next ./gradlew or ./mvnw"),
    (WRAPPER, r"(^|/)(gradlew|gradlew\.bat|mvnw|mvnw\.cmd)$", "the script every build through the wrapper runs"),
    (WRAPPER, r"(^|/)\.mvn/", "Maven wrapper and extensions: downloaded and run by the next Maven build"),
    (WRAPPER, r"(^|/)\.yarn/(releases|plugins)/", "the Yarn code every yarn command runs"),
    (WRAPPER, r"(^|/)\.yarnrc\.yml$", "yarnPath names the Yarn that runs; also the registry and install scripts"),
    (WRAPPER, r"(^|/)\.pnp\.c?js$", "Yarn's loader, run by node in this project"),
    (WRAPPER, r"(^|/)(rust-toolchain(\.toml)?|\.tool-versions|\.?mise\.toml|\.fvmrc|\.fvm/fvm_config\.json)$",
     "names a toolchain that is downloaded and run"),
    (BUILD, r"(^|/)(GNUmakefile|makefile|[^/]+\.mk)$", "make runs its recipes"),
    (BUILD, r"(^|/)(CMakeLists\.txt|[^/]+\.cmake|meson\.build)$", "runs at configure time"),
    (BUILD, r"(^|/)[^/]+\.gradle(\.kts)?$", "Gradle runs it at every build"),
    (BUILD, r"(^|/)gradle\.properties$", "sets the JVM options and settings of every Gradle build"),
    (BUILD, r"(^|/)package\.json$", "npm scripts and dependencies run on install"),
    (BUILD, r"(^|/)(Podfile|[^/]+\.podspec)$", "CocoaPods runs it at pod install"),
    (BUILD, r"\.xcodeproj/project\.pbxproj$", "Xcode project: its build phases run shell scripts"),
    (BUILD, r"\.xcscheme$", "Xcode scheme: its pre- and post-actions run scripts"),
    (BUILD, r"(^|/)pubspec\.yaml$", "Dart and Flutter dependencies, whose build hooks run"),
    (BUILD, r"(^|/)pubspec_overrides\.yaml$", "replaces Dart dependencies with any path or git source"),
    (BUILD, r"(^|/)hook/(build|link)\.dart$", "a Dart build hook: runs at every build"),
    (BUILD, r"(^|/)build\.yaml$", "build_runner builders run at code generation"),
    (BUILD, r"(^|/)(setup\.py|setup\.cfg|conftest\.py|pyproject\.toml|noxfile\.py|tox\.ini)$",
     "Python build or test configuration: runs at install or test time"),
    (BUILD, r"(^|/)(Gemfile|Rakefile|[^/]+\.gemspec|Fastfile)$", "Ruby that bundler, rake or fastlane runs"),
    (BUILD, r"(^|/)(build\.rs|Cargo\.toml)$", "Cargo runs it, or its dependencies' build scripts"),
    (BUILD, r"(^|/)\.cargo/config(\.toml)?$", "sets Cargo's runner, linker and rustc wrapper: programs every build runs"),
    (BUILD, r"(^|/)(Taskfile\.ya?ml|justfile|\.justfile|Jakefile(\.js)?|Gruntfile\.[cm]?[jt]s|gulpfile\.[cm]?[jt]s|"
            r"Earthfile|Tiltfile|magefile\.go|Procfile)$", "a task runner's tasks"),
    (BUILD, r"(^|/)(flake\.nix|shell\.nix|default\.nix|devenv\.nix)$", "Nix runs it when the shell or build starts"),
    (BUILD, r"(^|/)\.gitattributes$", "sets git filters and diff drivers"),
    (BUILD, r"(^|/)\.gitmodules$", "adds or moves git submodules"),
    (BUILD, r"(^|/)\.envrc$", "runs when you cd here (direnv)"),
    (BUILD, r"(^|/)\.husky/", "git hooks (husky)"),
    (BUILD, r"(^|/)(\.pre-commit-config\.yaml|\.?lefthook\.ya?ml)$", "git hooks (pre-commit, lefthook)"),
    (CI, r"^\.github/workflows/", "CI workflow (runs with the repository's secrets)"),
    (CI, r"^\.github/actions/|(^|/)action\.ya?ml$", "a CI action that workflows run (with the repository's secrets)"),
    (CI, r"(^|/)\.gitlab-ci\.ya?ml$|^\.gitlab/", "GitLab CI (runs with the project's secrets)"),
    (CI, r"^\.circleci/", "CircleCI (runs with the project's secrets)"),
    (CI, r"(^|/)bitbucket-pipelines\.ya?ml$", "Bitbucket Pipelines (runs with the repository's secrets)"),
    (CI, r"(^|/)azure-pipelines\.ya?ml$|^\.?azure-pipelines/|^\.azure/", "Azure Pipelines (runs with the project's secrets)"),
    (CI, r"(^|/)Jenkinsfile$", "Jenkins pipeline (runs with its credentials)"),
    (CI, r"(^|/)(\.travis\.yml|\.drone\.ya?ml|appveyor\.ya?ml|\.woodpecker\.ya?ml|codemagic\.ya?ml|bitrise\.ya?ml|"
         r"cloudbuild\.ya?ml)$|^\.(buildkite|woodpecker)/", "CI configuration (runs with the project's secrets)"),
    (CONTAINER, r"(^|/)(Dockerfile|Containerfile)([.-][^/]*)?$|\.[Dd]ockerfile$",
     "its RUN lines run at the next image build"),
    (CONTAINER, r"(^|/)(docker-)?compose([.-][^/]*)?\.ya?ml$", "the containers, mounts and commands compose starts"),
    (CONTAINER, r"(^|/)\.devcontainer/|(^|/)\.devcontainer\.json$", "dev container commands run when the editor opens it"),
    (TOOL, r"(^|/)\.vscode/", "editor tasks and settings run by themselves"),
    (TOOL, r"\.code-workspace$", "a VS Code workspace: its settings and tasks apply when it is opened"),
    (TOOL, r"(^|/)\.idea/", "editor run configurations"),
    (TOOL, r"(^|/)(\.nvim\.lua|\.nvimrc|\.exrc|\.lvimrc)$|\.sublime-project$", "the editor runs it when it opens here"),
    (TOOL, r"(^|/)\.(npmrc|yarnrc|bunfig\.toml)$|(^|/)(bunfig\.toml|pip\.conf|\.bundle/config)$",
     "sets the package registry and install scripts"),
    (AI_AGENT, r"(^|/)\.claude/|(^|/)\.mcp\.json$", "Claude Code settings, hooks and MCP servers: programs the AI's tools start"),
    (AI_AGENT, r"(^|/)(CLAUDE(\.local)?\.md|AGENTS\.md|GEMINI\.md|\.cursorrules|\.windsurfrules|\.clinerules)$"
            r"|^\.github/copilot-instructions\.md$", "instructions the next AI run follows"),
    (AI_AGENT, r"(^|/)\.(cursor|gemini|codex|continue|roo|windsurf|aider[^/]*)(/|$)", "AI tool settings and hooks"),
    # bytes that run without their source, and that the preview cannot show: an unchecked-hash
    # `__pycache__/x.cpython-311.pyc` is imported in place of the reviewed x.py
    (COMPILED, r"(^|/)__pycache__/|\.(pyc|pyo|so|dylib|dll|exe|node|jar|class|wasm|o|a|dex|aar|apk|beam|elc)$",
     "compiled code: it runs, and the preview cannot show what it does"),
)


@functools.lru_cache(maxsize=1)
def self_running() -> Tuple[Tuple["re.Pattern[str]", str, str], ...]:
    """_SELF_RUNNING_TABLE compiled when a preview first needs it, not at every start: its 50
    patterns took 3-5 ms before an ask's first git process (3.9, 3.13), and of every command."""
    return tuple((re.compile(pattern, re.I), category, why) for category, pattern, why in _SELF_RUNNING_TABLE)


MANY_DELETIONS = 3
# A name that looks like another: invisible characters and direction overrides (Trojan Source).
DECEPTIVE_NAME = re.compile(f"[{_INVISIBLE}]|{_LONE_VARIATION}")
# Letters of other scripts drawn like Latin ones (Unicode's confusables for the common ones):
# `src/аpp.py` with a Cyrillic а sits beside `src/app.py` and reads the same.
_LOOKALIKES = str.maketrans("аеіјорсѕухԁԛԝһӏАВЕІЈКМНОРСЅТХУαβεικνορτυχΑΒΕΗΙΚΜΝΟΡΤΥΧΖօոսՏ",
                            "aeijopcsyxdqwhlABEIJKMHOPCSTXYaBeikvoptuxABEHIKMNOPTYXZonuS")
_LATIN_LOOKING = ("CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC", "LISU")


def name_problem(path: str) -> Optional[str]:
    """Why `path` may be mistaken for another name, or None."""
    if DECEPTIVE_NAME.search(path):
        return "its name holds invisible or direction-changing characters"
    if path.isascii():  # no other form, no other script: the rest looks at letters past ASCII
        return None
    if unicodedata.normalize("NFKC", path) != unicodedata.normalize("NFC", path):
        return (f"its name has letters in another form (fullwidth, mathematical) and reads as "
                f"{unicodedata.normalize('NFKC', path)}")
    looks_like = unicodedata.normalize("NFKC", path.translate(_LOOKALIKES))
    if looks_like != path and looks_like.isascii():
        return f"its name has letters of another script that look Latin: it reads as {looks_like}"
    for word in re.findall(r"[^\W\d_]+", path):  # runs of letters: `файл.py` is a Russian name, not a mix
        scripts = {unicodedata.name(c, "?").split(" ")[0] for c in word}
        if "LATIN" in scripts and scripts & set(_LATIN_LOOKING):
            return f"its name mixes Latin and {' and '.join(sorted(scripts & set(_LATIN_LOOKING))).title()} letters"
    return None


def look_closely(files: Sequence[FilePatch]) -> List[dict]:
    """[{path, category, reason}] for the changes a reader should not skim past."""
    out = []
    for f in files:
        if f.link_target is not None:
            out.append({"path": f.path, "category": "symlink",
                        "reason": ("new symlink -> " if f.kind == "new" else "symlink now -> ") + f.link_target})
        elif f.new_mode == "100755" and (f.kind == "new" or f.old_mode not in (None, "100755")):
            out.append({"path": f.path, "category": "executable",
                        "reason": "new executable file" if f.kind == "new" else "becomes executable"})
        if f.kind != "deleted":
            found = next(((category, why) for pattern, category, why in self_running() if pattern.search(f.path)), None)
            if found:
                out.append({"path": f.path, "category": found[0], "reason": found[1]})
            problem = name_problem(f.path)
            if problem:
                out.append({"path": f.path, "category": "lookalike name", "reason": problem})
    deleted = [f.path for f in files if f.kind == "deleted"]
    if len(deleted) > MANY_DELETIONS:
        common = os.path.commonpath(deleted) if len({p.split("/")[0] for p in deleted}) == 1 else "."
        out.append({"path": common, "category": "deletions", "reason": f"deletes {len(deleted)} files"})
    return out


def render_look_closely(files: Sequence[FilePatch], style: Style) -> List[str]:
    notes = look_closely(files)
    if not notes:
        return []
    return [style("yellow", "Look closely:")] + [
        "  " + style("yellow", sanitize(n["path"])) + ": " + sanitize(n["reason"]) + style("dim", f"  [{n['category']}]")
        for n in notes] + [""]


def render_summary(files: Sequence[FilePatch], style: Style) -> List[str]:
    shown = [sanitize(f.path) for f in files]
    width = max((len(p) for p in shown), default=0)
    out = []
    for f, path in zip(files, shown):
        change = "binary" if f.binary else (style("green", f"+{f.added}") + " " + style("red", f"-{f.removed}"))
        out.append(f"  {path.ljust(width)}  {f.label:<12} {change}")
    added = sum(f.added for f in files)
    removed = sum(f.removed for f in files)
    out.append(style("bold", f"  {len(files)} file(s) changed, +{added} -{removed}"))
    return out


def render_diff(files: Sequence[FilePatch], style: Style) -> List[str]:
    return list(diff_lines(files, style))


def diff_lines(files: Iterable[FilePatch], style: Style) -> Iterator[str]:
    """The preview's diff, a line at a time, rendered a file at a time (page() shows the
    first screenful before the rest is rendered)."""
    budget = [DIFFLIB_PAIRS_PER_PREVIEW]
    for f in files:
        yield from file_diff_lines(f, style, budget)


_PLAIN_BYTES = bytes(range(0x20, 0x7F)) + b"\t\n"


def terminal_text(data: bytes) -> str:
    """`data` decoded and sanitised with its newlines kept (sanitize, line by line, gives the
    same): most patches are printable ASCII, found so by one C pass (translate) instead of the
    regex's, which took 0.2 s on 4 MB."""
    if not data.translate(None, _PLAIN_BYTES):
        return data.decode("ascii")
    return _UNSAFE_KEEP_NEWLINES.sub(_visible, data.decode("utf-8", "replace"))


# A section's body by runs of its lines' first bytes: removed lines and the added ones right
# after them (a pair of runs highlighted together), added lines alone, a hunk header, the rest
_RENDER_RUNS = re.compile(rb"(-+)(\+*)|\++|@|[^-+@]+")


_SGR = re.compile("\x1b\\[[0-9;]*m")  # the preview's own colours: the only escapes left after sanitize


def continuation_mark() -> str:
    try:
        "\u21aa".encode(sys.stdout.encoding or "ascii")
        return "\u21aa"
    except (UnicodeEncodeError, LookupError):
        return "\\"


def fold_rows(lines: Iterable[str], columns: int, mark: str) -> Iterator[str]:
    """Each line as rows narrower than the terminal, every row after the first starting with
    `mark` in the line's colour. A terminal (or less) that wraps a long line starts the rest
    at column 0, where `+` and 79 spaces then `-require('child_process')...` shows an added
    line as an empty one and a removed one: wrapped here, no row of a line can pass for a
    line of its own. Tabs and wide characters count as the cells they take."""
    width = max(columns - 1, 8)  # the last column left free: some terminals wrap on writing it
    for line in lines:
        if "\t" not in line and (len(line) <= width if line.isascii() else 2 * len(line) <= width):
            yield line  # as wide as it could be, and narrower than the terminal: most lines
        elif "\t" not in line and line.isascii() and len(_SGR.sub("", line)) <= width:
            yield line  # a coloured line: its escapes take no cell
        else:
            yield from _fold_line(line, width, mark)


def _fold_line(line: str, width: int, mark: str) -> List[str]:
    import unicodedata  # only for lines that may be too wide
    rows: List[str] = []
    row: List[str] = []
    cells, active, pos = 0, "", 0
    for m in itertools.chain(_SGR.finditer(line), [None]):
        for ch in line[pos:m.start()] if m else line[pos:]:
            w = (8 - cells % 8 if ch == "\t" else 0 if unicodedata.combining(ch)
                 else 2 if unicodedata.east_asian_width(ch) in "WFA" else 1)  # A: double in CJK terminals
            if cells + w > width and cells > len(mark):
                rows.append("".join(row) + ("\x1b[0m" if active else ""))
                row, cells = [active, mark], len(mark)
                w = 8 - cells % 8 if ch == "\t" else w
            row.append(ch)
            cells += w
        if m:
            row.append(m.group())
            active = "" if m.group() in ("\x1b[0m", "\x1b[m") else active + m.group()
            pos = m.end()
    rows.append("".join(row))
    return rows


def file_diff_lines(f: FilePatch, style: Style, budget: List[int]) -> List[str]:
    """One section's lines, coloured. The section is decoded and sanitised in one pass and
    coloured a run of lines at a time (a 100,000-line preview took 0.6 s a line at a time);
    only a removed/added pair is looked at on its own, to highlight what changed in it."""
    lines = terminal_text(b"".join(f.lines)).split("\n")[:-1]
    body = f.body_start or len(lines)
    out = [style("bold", line) for line in lines[:body]]
    for run in _RENDER_RUNS.finditer(line_kinds(f.lines[body:])):
        first, end = body + run.start(), body + run.end()
        kind = run.group()[:1]
        if kind == b"@":  # the heading after `@@ ... @@` is the box's words: not shown
            out.append(style("cyan", lines[first][:lines[first].find("@@", 2) + 2]))
        elif kind == b"-":
            split = first + len(run.group(1))
            out += _highlight_pair(lines[first:split], lines[split:end], style, budget)
        elif kind == b"+":
            out += style.each("green", lines[first:end])
        else:
            out += lines[first:end]
    return out


# difflib costs ~100 µs a pair of ordinary lines and grows with the square of a line's length:
# a 10,000-line rewrite took 0.9 s to colour (7 ms uncoloured), and 3,000 one-line edits 0.5 s.
# So difflib judges only the first pairs of each run, the first pairs of a preview (the screens
# read first) and short lines; past that, a pair is highlighted by its common prefix and suffix
# (what git's contrib diff-highlight does), linear in the line's length.
DIFFLIB_PAIRS_PER_RUN = 16
DIFFLIB_PAIRS_PER_PREVIEW = 128
DIFFLIB_MAX_LINE = 400


def _highlight_pair(minus: List[str], plus: List[str], style: Style, budget: Optional[List[int]] = None) -> List[str]:
    """Removed and added lines, with the changed characters highlighted when the two runs
    pair up line by line (difflib decides what changed within each pair, within a budget:
    `budget[0]` pairs left for this preview)."""
    if not style.enabled or len(minus) != len(plus):
        return style.each("red", minus) + style.each("green", plus)
    budget = budget if budget is not None else [DIFFLIB_PAIRS_PER_PREVIEW]
    old_out, new_out = [], []
    for k, (old, new) in enumerate(zip(minus, plus)):
        a, b = old[1:], new[1:]
        if k >= DIFFLIB_PAIRS_PER_RUN or budget[0] <= 0 or max(len(a), len(b)) > DIFFLIB_MAX_LINE:
            old_line, new_line = _highlight_ends(a, b, style)
            old_out.append(old_line)
            new_out.append(new_line)
            continue
        budget[0] -= 1
        matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
        if matcher.ratio() < 0.4:
            old_out.append(style("red", old))
            new_out.append(style("green", new))
            continue
        o, n = [style("red", "-")], [style("green", "+")]
        for op, a1, a2, b1, b2 in matcher.get_opcodes():
            if op == "equal":
                o.append(style("red", a[a1:a2]))
                n.append(style("green", b[b1:b2]))
            else:
                o.append(style("red_bg", a[a1:a2]))
                n.append(style("green_bg", b[b1:b2]))
        old_out.append("".join(o))
        new_out.append("".join(n))
    return old_out + new_out


def _highlight_ends(a: str, b: str, style: Style) -> Tuple[str, str]:
    """One removed/added pair (signs stripped) with the middle between their common prefix
    and suffix highlighted; unhighlighted when less than 40% of the longer line is shared."""
    pre = len(os.path.commonprefix([a, b]))
    suf = len(os.path.commonprefix([a[pre:][::-1], b[pre:][::-1]]))
    if pre + suf < 0.4 * max(len(a), len(b), 1):
        return style("red", "-" + a), style("green", "+" + b)
    ea, eb = len(a) - suf, len(b) - suf
    o = style("red", "-" + a[:pre]) + style("red_bg", a[pre:ea]) + style("red", a[ea:])
    n = style("green", "+" + b[:pre]) + style("green_bg", b[pre:eb]) + style("green", b[eb:])
    return o, n


PAGE_BATCH = 1000  # lines rendered and written at a time, to the pager or the terminal


def page(lines: Iterable[str]) -> None:
    """Print, through a pager when stdout is a terminal and the text is taller than it. Only
    the first screenful is rendered before anything shows; the rest streams to the pager
    as it is rendered (and stops being rendered when the reader quits it). On a terminal a
    line wider than it is folded here (fold_rows), never by the terminal or the pager."""
    size = shutil.get_terminal_size((80, 24))
    rest = fold_rows(lines, size.columns, continuation_mark()) if sys.stdout.isatty() else iter(lines)
    height = size.lines
    head = list(itertools.islice(rest, max(height - 1, 1)))
    pager = os.environ.get("PAGER") or "less -R"
    if sys.stdout.isatty() and len(head) > height - 2 and pager and shutil.which(shlex.split(pager)[0]):
        try:
            proc = spawn(shlex.split(pager), cwd=Path.cwd(), terminal=True,
                         env={**os.environ, "LESS": os.environ.get("LESS", "FRX")})
        except OSError:
            proc = None
        if proc is not None:
            feed_pager(proc, itertools.chain(head, rest))
            return
    for chunk in batched(itertools.chain(head, rest), PAGE_BATCH):
        sys.stdout.write("\n".join(chunk) + "\n")
    sys.stdout.flush()


def feed_pager(proc: subprocess.Popen, lines: Iterator[str]) -> None:
    """Write `lines` to the pager in batches, then wait for the reader to quit it (no time
    limit: they read at their own pace). A reader who quits early ends the writing."""
    assert proc.stdin is not None
    try:
        for chunk in batched(lines, PAGE_BATCH):
            proc.stdin.write(("\n".join(chunk) + "\n").encode("utf-8", "replace"))
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()
        proc.wait()


def batched_by_size(items: Sequence[str], size: int) -> Iterator[List[str]]:
    """`items` in runs of at most `size` bytes (UTF-8), each at least one item."""
    run: List[str] = []
    used = 0
    for item in items:
        length = len(encode_path(item)) + 1
        if run and used + length > size:
            yield run
            run, used = [], 0
        run.append(item)
        used += length
    if run:
        yield run


def batched(items: Iterable[str], size: int) -> Iterator[List[str]]:
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


# ================================================================== choosing what to apply


class ApplyOptions:
    """How a command offers and applies a change, read from its command line once (by the
    command function): the choosing and applying code reads these names, never argparse's
    Namespace. `json` also makes `output` print JSON lines."""

    def __init__(self, *, yes: bool = False, no_apply: bool = False, json: bool = False, no_color: bool = False,
                 require_checks: bool = False):
        self.yes, self.no_apply, self.json = yes, no_apply, json
        self.no_color, self.require_checks = no_color, require_checks

    @classmethod
    def of(cls, args: argparse.Namespace) -> "ApplyOptions":
        """The options of `ask`, `wait` or `diff` (each has only some of these flags)."""
        return cls(**{name: bool(getattr(args, name, False))
                      for name in ("yes", "no_apply", "json", "no_color", "require_checks")})


# Line numbers and counts of at most 18 digits: more are no file's (and past 4300 digits,
# int() itself refuses them), so such a header is malformed, never a traceback.
HUNK_RE = re.compile(rb"^@@ -(\d{1,18})(?:,(\d{1,18}))? \+(\d{1,18})(?:,(\d{1,18}))? @@(.*)$", re.S)


class Hunk:
    """One @@ hunk; its changes grouped into runs separated by context, so a hunk can be
    split ('s') and applied in part: an unchosen group turns back into context."""

    def __init__(self, header: bytes, lines: List[bytes]):
        m = HUNK_RE.match(header)
        if not m:
            raise PatchError(f"malformed hunk header: {header[:80]!r}")
        self.old_start = int(m.group(1))
        self.tail = m.group(5)
        self.lines = lines
        self.group_of: List[Optional[int]] = []
        group, in_change = -1, False
        for line in lines:
            if line.startswith((b"-", b"+")):
                if not in_change:
                    group, in_change = group + 1, True
                self.group_of.append(group)
            elif line.startswith(b"\\"):
                self.group_of.append(self.group_of[-1] if self.group_of else None)
            else:
                in_change = False
                self.group_of.append(None)
        self.groups = group + 1

    @property
    def old_lines(self) -> Tuple[int, int]:
        """(first, past the last) line of the file as synced that this hunk reads, context
        included; a pure insertion (no old lines: git writes -N,0 for "after line N") holds
        the line after N, so two insertions at one place count as overlapping."""
        count = sum(1 for line in self.lines if not line.startswith((b"+", b"\\")))
        first = self.old_start + (1 if count == 0 else 0)
        return first, first + max(count, 1)

    def render(self, chosen: Iterable[int], delta: int) -> Tuple[Optional[bytes], int]:
        """(hunk bytes, change in line count) keeping only the chosen groups."""
        chosen = set(chosen)
        if not chosen:
            return None, 0
        out, old, new, dropped = [], 0, 0, False
        for line, group in zip(self.lines, self.group_of):
            if line.startswith(b"\\"):
                if not dropped:
                    out.append(line)
                continue
            dropped = False
            if group is None or group in chosen:
                out.append(line)
                old += not line.startswith(b"+")
                new += not line.startswith(b"-")
            elif line.startswith(b"-"):
                out.append(b" " + line[1:])
                old, new = old + 1, new + 1
            else:
                dropped = True
        header = b"@@ -%d,%d +%d,%d @@%s" % (self.old_start, old, max(self.old_start + delta, 0 if new == 0 else 1),
                                            new, self.tail)
        return header + b"".join(out), new - old

    def group_text(self, group: Optional[int] = None) -> List[bytes]:
        """The hunk's lines, or one group with the context around it."""
        if group is None:
            return self.lines
        idx = [i for i, g in enumerate(self.group_of) if g == group]
        lo, hi = idx[0], idx[-1] + 1
        while lo > 0 and self.group_of[lo - 1] is None:
            lo -= 1
        while hi < len(self.lines) and self.group_of[hi] is None:
            hi += 1
        return self.lines[lo:hi]


def parse_hunks(fp: "FilePatch") -> Tuple[List[bytes], List[Hunk]]:
    """(header lines, hunks) of a text file's patch; binary patches have no hunks."""
    header: List[bytes] = []
    hunks: List[Hunk] = []
    current: Optional[Tuple[bytes, List[bytes]]] = None
    for line in fp.lines:
        if line.startswith(b"@@ "):
            if current:
                hunks.append(Hunk(*current))
            current = (line, [])
        elif current:
            current[1].append(line)
        else:
            header.append(line)
    if current:
        hunks.append(Hunk(*current))
    return header, hunks


class Selection:
    """What to take from a patch: whole files, or chosen groups of chosen hunks."""

    def __init__(self, files: Sequence["FilePatch"]):
        self.files = list(files)
        self.parsed = {id(f): parse_hunks(f) for f in files}
        self.chosen: Dict[int, Dict[int, set]] = {}  # file index -> hunk index -> groups

    def take_file(self, i: int) -> None:
        _, hunks = self.parsed[id(self.files[i])]
        self.chosen[i] = {h: set(range(hunk.groups)) for h, hunk in enumerate(hunks)}

    def render(self) -> bytes:
        out = []
        for i, fp in enumerate(self.files):
            if i not in self.chosen:
                continue
            header, hunks = self.parsed[id(fp)]
            if not hunks:  # binary, pure rename, mode change, empty new file
                out.append(fp.bytes)
                continue
            section = render_hunks(header, [(hunk, self.chosen[i].get(h, ())) for h, hunk in enumerate(hunks)])
            if section:
                out.append(section)
        return b"".join(out)


def render_hunks(header: List[bytes], picks: Sequence[Tuple[Hunk, Iterable[int]]]) -> Optional[bytes]:
    """One file's section from `picks` ((hunk, its chosen groups), in file order): each
    hunk's new start moved by what the hunks before it added or removed; None when nothing
    is chosen. Hunks of one patch, or of several made from the same file (attempts)."""
    body, delta = [], 0
    for hunk, groups in picks:
        data, change = hunk.render(groups, delta)
        if data:
            body.append(data)
            delta += change
    return b"".join(header) + b"".join(body) if body else None


class ExactName(str):
    """A name given after `--` (`apply JOB -- PATH`, as VS Code passes the files ticked): it
    matches that path alone, never as a pattern or as the folder of another path."""


def select_paths(files: Sequence["FilePatch"], only: Sequence[str], exclude: Sequence[str]) -> Selection:
    """--only / --exclude: shell patterns or folders (or ExactName), matched against old and new paths."""
    def matches(p: str, pat: str) -> bool:
        if isinstance(pat, ExactName):
            return p == pat
        return fnmatch.fnmatchcase(p, pat) or p.startswith(pat.rstrip("/") + "/") or p == pat

    def hit(fp: FilePatch, patterns: Sequence[str]) -> bool:
        return any(matches(p, pat) for p in {fp.path, fp.old_path} for pat in patterns)
    sel = Selection(files)
    for i, fp in enumerate(files):
        if (not only or hit(fp, only)) and not hit(fp, exclude):
            sel.take_file(i)
    return sel


HUNK_HELP = """y - apply this hunk     n - skip this hunk     q - quit; apply what was chosen so far
a - this and all later hunks of the file      d - none of the later hunks of the file
s - split this hunk into smaller ones         ? - this help"""


class Chooser:
    """`git add -p`-style questions on stderr, answers as lines on stdin."""

    def __init__(self, files: Sequence["FilePatch"], style: Style):
        self.sel = Selection(files)
        self.style = style

    def ask(self, question: str, allowed: str) -> str:
        while True:
            sys.stderr.write(self.style("bold", f"{question} [{','.join(allowed)},?]? "))
            sys.stderr.flush()
            answer = sys.stdin.readline()
            if not answer:
                return "q"
            answer = answer.strip().lower()[:1]
            if answer in allowed:
                return answer
            say(HUNK_HELP)

    def run(self) -> Selection:
        for i, fp in enumerate(self.sel.files):
            if self._file(i, fp) == "q":
                break
        return self.sel

    def _file(self, i: int, fp: "FilePatch") -> str:
        header, hunks = self.sel.parsed[id(fp)]
        name = fp.path if fp.old_path == fp.path else f"{fp.old_path} -> {fp.path}"
        say(self.style("bold", f"--- {sanitize(name)} ({fp.label}{', binary' if fp.binary else ''})"))
        for note in look_closely([fp]):
            say(self.style("yellow", "    look closely: " + sanitize(note["reason"])))
        if fp.kind == "new":  # what a new file holds is shown before the question about it
            if fp.binary:
                say("    (binary content, not shown)")
            for hunk in hunks:
                self._show(hunk.lines)
        if not hunks or fp.kind in ("new", "deleted"):
            answer = self.ask(f"Apply this whole file ({fp.kind})", "ynq")
            if answer == "y":
                self.sel.take_file(i)
            return answer
        picked: Dict[int, set] = {}
        self.sel.chosen[i] = picked
        rest = None
        for h, hunk in enumerate(hunks):
            answer = rest or self._hunk(hunk, picked.setdefault(h, set()), h, len(hunks))
            if answer in "ad":
                rest = answer
            if answer in ("y", "a"):
                picked[h] = set(range(hunk.groups))
            if answer == "q":
                return "q"
        return ""

    def _hunk(self, hunk: Hunk, picked: set, h: int, count: int) -> str:
        self._show(hunk.group_text())
        answer = self.ask(f"Apply this hunk ({h + 1}/{count})", "ynadsq" if hunk.groups > 1 else "ynadq")
        if answer != "s":
            return answer
        for g in range(hunk.groups):
            self._show(hunk.group_text(g))
            part = self.ask(f"Apply this part ({g + 1}/{hunk.groups})", "ynq")
            if part == "y":
                picked.add(g)
            if part == "q":
                return "q"
        return "s"

    def _show(self, lines: List[bytes]) -> None:
        show_hunk_lines(lines, self.style)


def show_hunk_lines(lines: Sequence[bytes], style: Style) -> None:
    """A hunk's lines on stderr, sanitised, added lines green and removed ones red."""
    text = [sanitize(l.decode("utf-8", "replace").rstrip("\n")) for l in lines]
    for line in text:
        colour = {"+": "green", "-": "red"}.get(line[:1])
        say(style(colour, line) if colour else line)


# ================================================================== apply and undo


class Applier:
    """Applies a patch to the project: plainly when the files still match what was synced
    (`git apply`, which checks every hunk before it writes: all or nothing); otherwise, in a
    git repository, by 3-way merging each file against the synced version (ThreeWayMerge). What it overwrites
    goes to the UndoLog first, for `patchwire apply --undo`. It asks nothing itself: whether
    to write conflict markers is `keep_conflicts`'s decision ({path: merged bytes} -> keep?),
    which the command passes in (ask_keep_conflicts; no decision: never).

    The patch is vetted first (split_patch, then vet_on_disk): a refused patch changes
    nothing. `protected` names more project paths no patch may touch (a token file)."""

    def __init__(self, project: Project, style: Style, protected: Sequence[str] = (), job: str = "",
                 keep_conflicts: Optional[Callable[[Dict[str, Optional[bytes]]], bool]] = None,
                 held_back: Optional[Callable[[str], Optional[str]]] = None):
        self.project = project
        # the deny-list pattern that keeps a path from every sync (check_unrecorded)
        self.held_back = held_back or (lambda path: denied_by(path, DEFAULT_DENY, ()))
        self.git = project.git
        self.style = style
        self.protected = protected
        self.job = job  # named in hints
        self.keep_conflicts = keep_conflicts or (lambda conflicted: False)
        self.merger = ThreeWayMerge(project)
        self.undo_log = UndoLog(project)
        self.aside: List[dict] = []  # undo entries of the files in the way, moved out
        self.files: List[FilePatch] = []  # what apply() applied, as read
        self.kept_in: Optional[Path] = None  # keep_copy's folder, made at its first copy

    def apply(self, patch: bytes, base_tree: Optional[str], overwrite: Optional[Dict[str, str]] = None,
              read: Optional[List[FilePatch]] = None) -> dict:
        """`overwrite`: the decision on files in the way of a new file or a rename ({path:
        sha256 of the bytes the user agreed to replace}, made by the caller before: this
        code asks nothing); any other file in the way refuses the patch (check_destinations).
        `read`: `patch` as the caller read and computed it already (Session.vet); the files
        here are vetted again all the same (time may have passed since the preview).
        On any failure the files set aside go back, byte for byte."""
        files = vet_on_disk(self.project.root, read if read is not None else split_patch(patch), self.protected)
        if read is None:
            compute_results(self.project, files, base_tree, whole=False)
        self.files = files
        self.aside = self.set_aside(check_destinations(self.project, files, overwrite or {}, self.job))
        try:
            result = self.apply_vetted(patch, files, base_tree)
        except BaseException as e:
            aside = self.undo_log.states(self.aside)
            _, left = self.put_back_rewritten(aside)
            self.undo_log.settle()  # every file as before: the last apply's undo log is back
            if left:
                raise PatchError(f"{e}; and the files set aside could not be put back: " + self.describe_left(
                    left, aside),
                    "put them back as shown") from e
            raise
        result["replaced"] = [e["path"] for e in self.aside]
        return result

    def apply_vetted(self, patch: bytes, files: List[FilePatch], base_tree: Optional[str]) -> dict:
        paths = touched_paths(files)
        gone = removed_links(self.project.root, files)
        # every file is read once before git writes (the undo log, and which ones are as synced)
        # and once after (the check, the undo log's digests), not once per use
        here = self.read_here([path for path in paths if not beneath(path, gone)])
        if not (base_tree and self.project.recorded(base_tree)):
            check_unrecorded(self.project, files, here, self.held_back)
        exact = unchanged_since_sync(self.project, files, base_tree, here)
        before = self.saved(paths, gone, here, synced_ids(files, exact))
        was = {**dict.fromkeys(paths), **here}  # beneath a link the patch removes: nothing of ours
        computed = computed_writes(files, exact, here) if not gone else None
        if computed is not None:  # every file as synced: write the results shown, no git apply
            self.write(computed, was)
            written = {path: (data, mode) if data is not None else None for path, (data, mode, _) in computed.items()}
            return self.done(before, "plain", paths, [], written)
        self.undo_log.expect({f.path: (f.result, "") if f.kind != "deleted" else None  # ("": its mode unknown here)
                              for f in files if f.path in exact and (f.result is not None or f.kind == "deleted")})
        try:  # Ctrl-C reaches git too: it may stop half way, or after it wrote, before the undo log
            plain = self.git_apply(patch)
            now = self.read_here(paths) if plain.returncode == 0 else {}
            if plain.returncode == 0:
                self.check_written(files, exact, was, now)
        except KeyboardInterrupt:
            self.put_back_interrupted(was)
            raise
        if plain.returncode == 0:
            return self.done(before, "plain", paths, [], now)
        self.after_failed_git_apply(plain.stderr, was)
        failure = describe_apply_failure(plain.stderr)
        if not self.project.is_git_repo:
            raise PatchError("the patch does not apply to the files here; nothing was changed:\n"
                             + failure, "3-way merging is not available outside a git repository: "
                             "ask again on the current files")
        if not base_tree:
            raise PatchError("the patch does not apply to the files here, and this job was not asked "
                             "from here, so there is no record of the files it was made from for a "
                             "3-way merge; nothing was changed:\n" + failure,
                             "ask again from this project (the box's word on what the job started "
                             "from is never used)")
        if not self.merger.have(base_tree):
            raise PatchError("the patch does not apply and the synced version is not here for a "
                             "3-way merge; nothing was changed:\n" + failure, "ask again")
        merged = self.merger.merge(patch, base_tree, gone, {f.path: f.result for f in files
                                                            if f.result is not None and f.kind != "deleted"})
        check_merged_writes(self.project.root, merged)
        conflicts = [path for path, (_, _, n) in merged.items() if n]
        if conflicts and not self.keep_conflicts({p: merged[p][0] for p in conflicts}):
            raise PatchError("the AI's change and yours overlap in " + ", ".join(map(sanitize, conflicts)) +
                             "; nothing was changed",
                             f"resolve by hand: `patchwire diff {self.job}` shows the AI's change; "
                             f"or run `patchwire apply {self.job} --keep-conflicts` to get conflict markers")
        here = self.read_here([path for path in merged if not beneath(path, gone)])
        before = self.saved(list(merged), gone, here)
        self.write(merged, {**dict.fromkeys(merged), **here})
        return self.done(before, "3-way", list(merged), conflicts)

    def git_apply(self, patch: bytes) -> subprocess.CompletedProcess:
        """`git apply` of the whole patch, all or nothing: git applies every hunk of every file
        in memory before it writes one (apply.c checks the whole list first), so a patch that
        does not apply leaves the files as they were, and no `--check` run has to read and
        apply it first."""
        return self.git.run("apply", "--binary", "-", input=patch, check=False)

    def put_back_interrupted(self, was: Dict[str, Optional[Tuple[bytes, str]]]) -> None:
        """After a Ctrl-C while `git apply` ran: every file it rewrote goes back, and the user
        is told so (the interrupt then ends the command); PatchError naming what could not."""
        _, left = self.put_back_rewritten(was)
        if left:
            raise PatchError("interrupted while git apply wrote; the files it had written were put back "
                             "except " + self.describe_left(left, was), "put those back as shown")
        say("interrupted while git apply wrote: every file was put back, nothing was changed")

    def after_failed_git_apply(self, stderr: bytes, was: Dict[str, Optional[Tuple[bytes, str]]]) -> None:
        """Nothing, when `git apply` refused the patch before it wrote (it did not apply: the
        3-way merge may still). Otherwise PatchError, once every file it rewrote is put back.
        git checks every hunk before it writes, but then writes file by file, each by unlink
        and create: a folder it may not write (only an ordinary account sees that; root
        writes anywhere), a file where the patch puts a folder, a full disk, stop it half way,
        with the files before that one rewritten."""
        rewritten, left = self.put_back_rewritten(was)
        failed = failed_write(stderr, was)
        if not rewritten and failed is None:
            return
        cause = write_failure_fix(self.project.root, failed or "", list(was))
        again = f"run `patchwire apply {self.job}` again" if self.job else "apply again"
        what = f"git apply failed while writing {sanitize(failed)}" if failed else "git apply failed while writing"
        if left:
            raise PatchError(f"{what}; the files it had written were put back except " + self.describe_left(
                left, was) + ":\n" + describe_apply_failure(stderr),
                f"put those back as shown; then {cause + ' and ' if cause else ''}{again}")
        raise PatchError(f"{what}; every file it had written was put back, nothing was changed:\n"
                         + describe_apply_failure(stderr),
                         f"{cause + ', then ' if cause else 'fix the cause above, then '}{again}")

    def describe_left(self, left: Sequence[Tuple[str, str]], was: Dict[str, Optional[Tuple[bytes, str]]]) -> str:
        """The files a failed write left changed: how each is now, why it could not be put
        back, and the command that puts it back by hand (its old bytes copied to Patchwire's
        state folder: the undo log does not hold them, the apply failed)."""
        out = []
        for path, why in left:
            shown = shlex.quote(sanitize(path))
            now = "it is missing" if held_now(self.project.root, path) is None else "it holds what git wrote"
            state = was.get(path)
            if state is None:
                now += f"; it was not there: `rm {shown}`"
            elif state[1] == "120000":
                now += f"; yours was a link: `ln -sfn {shlex.quote(sanitize(_dec(state[0])))} {shown}`"
            else:
                copy = self.keep_copy(path, *state)
                now += f"; yours: `cp -p {shlex.quote(str(copy))} {shown}`" if copy else ""
            out.append(f"{sanitize(path)} ({sanitize(why)}: {now})")
        return ", ".join(out)

    def keep_copy(self, path: str, data: bytes, mode: str) -> Optional[Path]:
        """A copy of a file's old bytes and mode, in a folder of this apply's own in the state
        folder's not-put-back/ (never over an earlier failure's copy: a second failed apply
        of the same file would hold what git wrote, and the first copy may be the only one
        of the user's bytes); None if it cannot be written there either."""
        import tempfile
        try:
            if self.kept_in is None:
                kept = self.project.state_file("not-put-back")
                kept.mkdir(exist_ok=True)
                self.kept_in = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=kept))
            write_worktree(self.kept_in, path, data, mode)
        except (OSError, PatchwireError):
            return None
        return self.kept_in / path

    def put_back_rewritten(self, was: Dict[str, Optional[Tuple[bytes, str]]]
                           ) -> Tuple[List[str], List[Tuple[str, str]]]:
        """After a write that failed: each path that no longer holds what `was` says ((bytes,
        mode), None: absent) gets it back, a file that was not there is removed (and the folders
        it leaves empty); a path that holds what it held is never written again (it may sit in
        the very folder no one can write). Removals first, deepest first, as UndoLog.undo.
        Every path is tried: (the paths that had changed, [(path, why not)] of those that
        could not be put back)."""
        return restore_states(self.project.root, was)

    def read_here(self, paths: Sequence[str]) -> Dict[str, Optional[Tuple[bytes, str]]]:
        """What each path holds ((bytes, mode), None when absent); never through a symlink
        (read_worktree), so never a path beneath a link the patch removes, before it does."""
        return {path: read_worktree(self.project.root, path) for path in paths}

    def set_aside(self, replaced: Sequence[InTheWay]) -> List[dict]:
        """Move the files the user agreed to replace out of the way, their bytes in the store
        first: `git apply` refuses a new file where one exists, and the 3-way merge would
        take them for the user's side of an add/add conflict."""
        saved = self.undo_log.save([w.path for w in replaced], set())
        if saved:
            self.undo_log.begin(self.job, saved)
        moving = ""
        try:
            for w in replaced:
                moving = w.path
                write_worktree(self.project.root, w.path, None, "")
        except (OSError, PatchwireError, KeyboardInterrupt) as e:  # those moved already come back
            failed = self.set_aside_failed(moving, e, self.undo_log.states(saved))
            self.undo_log.settle()
            raise failed from e
        return saved

    def set_aside_failed(self, path: str, error: BaseException, was: Dict[str, Optional[Tuple[bytes, str]]]
                         ) -> PatchError:
        """The error of a file in the way that could not be moved (a folder this account may
        not write), once the files moved before it are back (`was`: what each held)."""
        _, left = self.put_back_rewritten(was)
        what = f"could not move {sanitize(path)} out of the way ({sanitize(why_not(error))})"
        again = f"run `patchwire apply {self.job} --overwrite-untracked` again" if self.job else "apply again"
        if left:
            return PatchError(f"{what}; the files set aside before it were put back except "
                              + self.describe_left(left, was), f"put those back as shown, fix the cause and {again}")
        cause = write_failure_fix(self.project.root, path, [path])
        return PatchError(f"{what}; the files set aside before it were put back, nothing was changed",
                          f"{cause + ', then ' if cause else 'fix the cause, then '}{again}")

    def saved(self, paths: Sequence[str], gone: set, here: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None,
              synced: Optional[Dict[str, str]] = None) -> List[dict]:
        """What each path holds now (UndoLog.save; `here`: read already; `synced`: the paths
        that hold a synced blob, and its id), a file set aside what it held before: `apply
        --undo` puts those bytes back."""
        aside = {e["path"]: e for e in self.aside}
        before = [aside.get(e["path"], e) for e in self.undo_log.save(paths, gone, here, synced)]
        self.undo_log.begin(self.job, before)  # before the first write: a kill leaves it to undo
        return before

    def write(self, merged: Dict[str, Tuple[Optional[bytes], str, int]],
              was: Dict[str, Optional[Tuple[bytes, str]]]) -> None:
        """All files or none: on any failure (or Ctrl-C) the files written so far go back
        (`was`: what each held). Deletions go first, deepest first: a symlink the patch
        removes is gone before anything is written where it was."""
        written: List[str] = []
        self.undo_log.expect({path: (data, mode) if data is not None else None for path, (data, mode, _) in merged.items()})
        try:
            for path in in_write_order(merged, lambda p: merged[p][0] is None):
                data, mode, _ = merged[path]
                written.append(path)
                # as git apply writes (by_rename=False): `was` holds every old file to put back
                write_worktree(self.project.root, path, data, mode, by_rename=False)
        except (OSError, PatchwireError, KeyboardInterrupt) as e:
            _, left = self.put_back_rewritten(was)
            failed = sanitize(written[-1]) if written else "the project"
            again = f"run `patchwire apply {self.job}` again" if self.job else "apply again"
            if left:
                raise PatchError(f"could not write {failed} ({sanitize(why_not(e))}); the files written so far "
                                 "were put back except " + self.describe_left(left, was),
                                 f"put those back as shown, fix the cause and {again}")
            cause = write_failure_fix(self.project.root, written[-1] if written else "", list(merged))
            raise PatchError(f"could not write {failed} ({sanitize(why_not(e))}); the files "
                             "written so far were put back, nothing was changed",
                             f"{cause + ', then ' if cause else 'fix the cause, then '}{again}")

    def check_written(self, files: Sequence[FilePatch], exact: set, was: Dict[str, Optional[Tuple[bytes, str]]],
                      now: Dict[str, Optional[Tuple[bytes, str]]]) -> None:
        """What `git apply` wrote to each file that was here as synced (`now`: read after it)
        must be the result computed beforehand (the one the preview showed); otherwise
        everything goes back (`was`: what each path held before)."""
        for fp in files:
            if fp.path in exact and fp.result is not None and fp.kind != "deleted":
                written = now[fp.path]
                if written is None or written[0] != fp.result:
                    _, left = self.put_back_rewritten(was)
                    raise refuse(f"git wrote to {fp.path!r} something other than the change shown; " + (
                        "every file was put back" if not left else
                        "the files were put back except " + self.describe_left(left, was)))

    def done(self, before: List[dict], how: str, paths: Sequence[str], conflicts: List[str],
             now: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None) -> dict:
        self.undo_log.record(before, now)
        return {"how": how, "files": list(paths), "conflicts": conflicts}

    def undo(self) -> List[str]:
        return self.undo_log.undo()


# --- the 3-way merge


class ThreeWayMerge:
    """Merges a patch with the files here, file by file, against the synced version the job
    started from (a sync record, whose blobs are in Patchwire's store since the sync):
    computes the merged bytes and counts conflicts, and writes nothing in the project."""

    def __init__(self, project: Project):
        self.project = project
        self.git = project.git

    def have(self, tree: str) -> bool:
        return self.git.has_tree(tree)

    def merge(self, patch: bytes, base_tree: str, gone: set,
              results: Optional[Dict[str, bytes]] = None) -> Dict[str, Tuple[Optional[bytes], str, int]]:
        """{path: (new bytes or None for deleted, mode, conflicts)} for every touched path.
        `gone`: symlinks here the patch deletes; what lies "beneath" them is not read.
        `results`: the files as computed before the preview; the AI's side must be those."""
        theirs_tree, stderr = self.git.tree_after_patch(base_tree, patch, self.project.private_dir / "merge.index")
        if theirs_tree is None:
            raise PatchError("the patch does not even apply to the synced version:\n" + describe_apply_failure(stderr))
        for path, data in (results or {}).items():
            if (self.project.recorded_file(theirs_tree, path) or (None, ""))[0] != data:
                raise refuse(f"git's result for {path!r} on the synced files is not the change shown")
        out: Dict[str, Tuple[Optional[bytes], str, int]] = {}
        for status, old, new in diff_tree(self.git, base_tree, theirs_tree):
            if status == "R":
                out[old] = self.merge_one(old, base_tree, None, gone)
                out[new] = self.merge_one(old, base_tree, (theirs_tree, new), gone, new)
            else:
                out[new] = self.merge_one(new, base_tree, (theirs_tree, new) if status != "D" else None, gone)
        return out

    def merge_one(self, path: str, base_tree: str, theirs: Optional[Tuple[str, str]], gone: set,
                  dest: Optional[str] = None) -> Tuple[Optional[bytes], str, int]:
        """One file: `path` in `base_tree`, the file here, and `theirs` ((tree, path) of the
        AI's version, None when the AI deleted it), ending up at `dest`."""
        base = self.project.recorded_file(base_tree, path)
        other = self.project.recorded_file(*theirs) if theirs else None
        dest = dest or path
        ours = None if beneath(dest, gone) else read_worktree(self.project.root, path)
        # the three-way rules git's own merge follows, file by file: one side unchanged takes
        # the other; equal sides agree; a delete against a change, a link, a binary file or a
        # mode changed on both sides is a conflict that keeps the user's version (counted as 1)
        if ours == base:
            return (other[0], other[1], 0) if other else (None, "", 0)
        if other and ours and ours[0] == other[0] and ours[1] == other[1]:
            return other[0], other[1], 0
        if ours is None and other is None:  # deleted on both sides
            return None, "", 0
        if ours is None or other is None:  # deleted on one side, changed on the other
            return (other or ours)[0], (other or ours)[1], 1
        if "120000" in (ours[1], other[1], base[1] if base else ""):  # a link target is not merged
            return ours[0], ours[1], 1
        mode = other[1] if base and base[1] == ours[1] else ours[1]
        # git's own test for binary: a NUL in the first 8000 bytes (xdiff's buffer_is_binary)
        if b"\0" in (ours[0] + other[0] + (base[0] if base else b""))[:8000]:
            return ours[0], mode, 1
        merged, conflicts = self.merge_file(path, ours[0], base[0] if base else b"", other[0])
        return merged, mode, conflicts

    def merge_file(self, path: str, ours: bytes, base: bytes, theirs: bytes) -> Tuple[bytes, int]:
        """(merged bytes, number of conflicts) of one text file, by `git merge-file`."""
        folder = self.project.private_dir / "merge"
        folder.mkdir(exist_ok=True)
        files = []
        for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
            (folder / name).write_bytes(data)
            files.append(str(folder / name))
        # the user's merge.conflictStyle (diff3, zdiff3) still applies: the markers are theirs to resolve
        proc = self.git.run("merge-file", "-p", "-L", f"{path} (yours)", "-L", f"{path} (synced)",
                            "-L", f"{path} (AI)", *files, check=False)
        if proc.returncode < 0 or proc.returncode > 127:
            raise PatchError(f"git merge-file failed on {sanitize(path)}: "
                             f"{sanitize(proc.stderr.decode(errors='replace'))}")
        return proc.stdout, proc.returncode


# --- the conflict question


def ask_keep_conflicts(conflicted: Dict[str, Optional[bytes]], style: Style, keep: Optional[bool],
                       answers=None) -> bool:
    """Shows where the AI's change and the user's overlap ({path: merged bytes}) and whether
    to write them with conflict markers: `keep` when the command line said, otherwise the
    answer read from `answers` (stdin): "k" keeps, anything else or no input at all does not."""
    say(style("yellow", f"{len(conflicted)} file(s) changed both here and by the AI, in the same place:"))
    for path, data in conflicted.items():
        say(f"  {sanitize(path)}")
        for line in conflict_excerpt(data or b""):
            say("    " + sanitize(line))
    if keep is not None:
        return keep
    return confirm_word("Type k and Enter to apply with conflict markers to resolve; Enter alone "
                        "leaves every file as it was.", "k", answers)


# --- the undo log


class UndoLog:
    """What the last apply overwrote, so `patchwire apply --undo` can put it back: each
    path's bytes before (a blob in Patchwire's store, none for a file that was not there)
    and mode, and a digest of what the apply left, in the project's undo.json. Files are
    read and written without following symlinks (read_worktree, write_worktree)."""

    def __init__(self, project: Project):
        self.root = project.root
        self.git = project.git
        self.path = project.state_file("undo.json")

    def save(self, paths: Sequence[str], gone: set, here: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None,
             synced: Optional[Dict[str, str]] = None) -> List[dict]:
        """What each path holds now (nothing, beneath a link the patch removes); `here`: the
        paths read already; `synced`: {path: id} of paths that hold the sync record's blob `id`,
        which is kept as it is (deflating 64 MB into a copy took a second)."""
        here = here or {}
        states = {path: None if beneath(path, gone) else here[path] if path in here else read_worktree(self.root, path)
                  for path in paths}
        held = [path for path, state in states.items() if state]
        known = {path: blob for path, blob in (synced or {}).items() if states.get(path)}
        fresh = [path for path in held if path not in known]
        blobs = {**known, **dict(zip(fresh, self.git.write_blobs([states[p][0] for p in fresh])))}  # type: ignore[index]
        return [{"path": path, "blob": blobs.get(path), "mode": state[1] if state else None}
                for path, state in states.items()]

    # undo.json is written before the apply's first write, "pending", and again with what
    # each file holds after it, "done": an apply killed half way (SIGKILL, a closed terminal)
    # is undone from it like any other, file by file from what it saved.
    def begin(self, job: str, before: List[dict]) -> None:
        """The journal of an apply about to write, kept with the undo log it replaces: an
        apply that fails and puts everything back (settle) leaves that one as it was."""
        try:
            now = self.load()
        except PatchError:
            now = None  # a damaged one is not kept
        previous = now.get("previous") if now and now["state"] == "pending" else now
        self._write({"job": job, "state": "pending", "entries": before, "previous": previous})

    def expect(self, results: Dict[str, Optional[Tuple[bytes, str]]]) -> None:
        """What the pending apply is about to leave in each of these paths (None: nothing):
        an undo after it was stopped puts back only files that hold that or what was before,
        never an edit made since."""
        log = self.load()
        if not log or log["state"] != "pending":
            return
        for entry in log["entries"]:
            if entry["path"] in results:
                result = results[entry["path"]]
                entry["expected"] = [hashlib.sha256(result[0]).hexdigest(), result[1]] if result else None
        self._write(log)

    def settle(self) -> None:
        """After an apply failed: when every file holds what it held before it, nothing is
        left to undo, and the undo log before it comes back; else the journal stays, for
        `apply --undo`."""
        try:
            log = self.load()
            if not log or log["state"] != "pending":
                return
            before = self.states(log["entries"])
            if any(read_worktree(self.root, path) != state for path, state in before.items()):
                return
        except (OSError, PatchwireError):
            return
        self._restore(log)

    def _restore(self, log: dict) -> None:
        """The undo log `log` replaced, back in its place (or none)."""
        previous = log.get("previous")
        if isinstance(previous, dict):
            self._write(previous)
        else:
            self.path.unlink(missing_ok=True)

    def record(self, before: List[dict], read: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None) -> None:
        """Keep `before` (from save) as the last apply, with what each path holds now (`read`:
        read already, since the apply wrote)."""
        for entry in before:
            path = entry["path"]
            now = read[path] if read is not None and path in read else read_worktree(self.root, path)
            entry["after"] = hashlib.sha256(now[0]).hexdigest() if now else None
            entry["after_mode"] = now[1] if now else None
        job = (self.load() or {}).get("job", "")
        self._write({"job": job, "state": "done", "entries": before})

    def _write(self, log: dict) -> None:
        write_whole(self.path, json.dumps(log))

    def load(self) -> Optional[dict]:
        """{job, state, entries}, None when there is none; PatchError when it is not one
        Patchwire wrote (a list: the form before "pending" existed, done)."""
        try:
            log = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise self.damaged()
        if isinstance(log, list):
            log = {"job": "", "state": "done", "entries": log}
        entries = log.get("entries") if isinstance(log, dict) else None
        if (not isinstance(entries, list) or log.get("state") not in ("pending", "done")
                or not all(self._entry_ok(e, log["state"]) for e in entries)):
            raise self.damaged()
        return log

    @staticmethod
    def _entry_ok(e: Any, state: str) -> bool:
        return (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("blob"), (str, type(None)))
                and isinstance(e.get("mode"), (str, type(None)))
                and (state == "pending" or (isinstance(e.get("after"), (str, type(None)))
                                            and isinstance(e.get("after_mode"), (str, type(None))))))

    def damaged(self) -> PatchError:
        return PatchError(f"the undo log {self.path} is damaged: nothing can be undone from it",
                          f"put the files back with git (`git checkout -- FILE`), then delete {self.path}")

    def blobs(self) -> List[str]:
        """The blobs the journal names, and the undo log it would give back ("previous")."""
        try:
            log = self.load()
        except PatchError:
            return []
        ids = set()
        while log:
            ids |= {e.get("blob") for e in log["entries"] if isinstance(e, dict)}
            previous = log.get("previous")
            log = previous if isinstance(previous, dict) and isinstance(previous.get("entries"), list) else None
        return sorted(i for i in ids if isinstance(i, str) and re.fullmatch(r"[0-9a-f]{40}", i))

    def pending(self) -> Optional[str]:
        """The job of an apply that was stopped before it finished, if any ("" when unknown)."""
        try:
            log = self.load()
        except PatchError:
            return None
        return log["job"] if log and log["state"] == "pending" else None

    def states(self, entries: Iterable[dict]) -> Dict[str, Optional[Tuple[bytes, str]]]:
        """{path: (bytes, mode) or None} of saved entries, their bytes read from the store in
        one `cat-file --batch` (a process per file once made an undo of 1,600 files slow)."""
        entries = list(entries)
        blobs = self.git.read_blobs([e["blob"] for e in entries if e["blob"]])
        out: Dict[str, Optional[Tuple[bytes, str]]] = {}
        for e in entries:
            data = blobs.get(e["blob"]) if e["blob"] else None
            if e["blob"] and data is None:
                raise PatchError(f"the saved copy of {sanitize(e['path'])} is missing from Patchwire's store",
                                 "put the file back with git (`git checkout -- FILE`)")
            out[e["path"]] = (data, e["mode"] or "") if data is not None else None
        return out

    def put_back(self, entries: Iterable[dict], states: Optional[Dict[str, Optional[Tuple[bytes, str]]]] = None) -> None:
        """Write saved entries back, in the order given (`states`: their bytes, read already)."""
        entries = list(entries)
        states = states if states is not None else self.states(entries)
        for entry in entries:
            state = states[entry["path"]]
            write_worktree(self.root, entry["path"], state[0] if state else None, entry["mode"] or "")

    def undo(self) -> List[str]:
        """Put back what the last apply overwrote, unless a file changed since; its paths. A
        file that holds what it held before the apply already is left (an undo stopped half
        way, run again). After an apply that was stopped half way ("pending"), every file goes
        back to what it held before it."""
        log = self.load()
        if log is None:
            raise UsageError("nothing to undo: no apply recorded in this project")
        entries = log["entries"]
        before = self.states(entries)
        changed, applied, todo = [], {}, []
        for e in entries:
            now = applied[e["path"]] = read_worktree(self.root, e["path"])
            if now == before[e["path"]]:
                continue  # as it was before the apply
            todo.append(e)
            held = [hashlib.sha256(now[0]).hexdigest(), now[1]] if now else None
            if log["state"] == "done":
                if held != ([e["after"], e["after_mode"]] if e["after"] is not None else None):
                    changed.append(e["path"])
            elif "expected" in e and not same_as_expected(held, e["expected"]):  # stopped half way: neither
                changed.append(e["path"])  # what it was writing nor what was before: an edit since
        if changed:
            raise PatchError("cannot undo: these files changed since the apply: " + ", ".join(map(sanitize, changed)),
                             "undo those edits first, or restore the files by hand")
        by_path = {e["path"]: e for e in todo}
        for path in in_write_order(by_path, lambda p: not by_path[p]["blob"]):
            try:
                self.put_back([by_path[path]], before)
            except (OSError, PatchwireError) as e:
                raise self.undo_failed(path, e, applied)
        if log["state"] == "pending":
            self._restore(log)  # the apply before the one stopped half way can be undone next
        else:
            self.path.unlink()
        return [e["path"] for e in entries]

    def undo_failed(self, path: str, error: BaseException, applied: Dict[str, Optional[Tuple[bytes, str]]]
                    ) -> PatchError:
        """An undo stopped at `path`: the files undone before it go back to what the apply left
        (`applied`), so the undo log still fits them and the same undo can run again."""
        _, left = restore_states(self.root, applied)
        fix = write_failure_fix(self.root, path, [path])
        hint = f"{fix + ', then ' if fix else 'fix the cause, then '}run `patchwire apply --undo` again"
        if left:
            return PatchError(f"cannot undo: could not write {sanitize(path)} ({sanitize(why_not(error))}); "
                              "these were left undone: " + ", ".join(
                                  f"{sanitize(p)} ({sanitize(why)})" for p, why in left), hint)
        return PatchError(f"cannot undo: could not write {sanitize(path)} ({sanitize(why_not(error))}); "
                          "the files undone before it are as the apply left them, nothing was changed", hint)


def same_as_expected(held: Optional[List[str]], expected: Optional[List[str]]) -> bool:
    """A file's [sha256, mode] (None: no file) against what an apply was writing there (a
    mode of "" when it was not known)."""
    if held is None or expected is None:
        return held == expected
    return held[0] == expected[0] and expected[1] in ("", held[1])


def check_unrecorded(project: "Project", files: Sequence["FilePatch"], here: Dict[str, Optional[Tuple[bytes, str]]],
                     held_back: Callable[[str], Optional[str]]) -> None:
    """A job with no record of its sync here (asked from another clone; its record gone):
    what it was made from is only the box's word, so each file it changes or deletes must be
    here exactly as its `index` line names it (`here`: the files read); a section without one
    has its hunks computed from the file here. A rename or a mode
    change as it is (git writes no `index` line for it) must start from a file a sync would
    send: one git does not ignore, and no deny-list pattern holds back (`held_back`), else a
    secret renamed to a name the next sync sends would leave the laptop. Else nothing is
    written. (With the record, check_synced_sources holds it to the record.)"""
    for fp in files:
        if fp.kind == "new":
            continue
        ids, now = index_ids(fp), here.get(fp.old_path)
        if ids is None and not fp.hunks and not fp.binary and now is not None:
            pattern = held_back(fp.old_path)
            status = worktree_status(project, fp.old_path)
            if pattern is None and status != "ignored":
                continue
            raise refuse(f"a {fp.kind} section of {fp.old_path!r}, which no sync sends ("
                         + (f"the deny-list's {pattern}" if pattern else "git ignores it") + ")")
        if ids is not None and (now is None or blob_id(now[0], ids[0]) != ids[0]):
            raise refuse(f"{fp.old_path!r} here is not exactly the version the patch names, and this job was not "
                         "asked from here: Patchwire has no record of what it was made from")
        # no `index` line: its hunks were computed from the file here, as it is


def computed_writes(files: Sequence["FilePatch"], exact: set,
                    here: Dict[str, Optional[Tuple[bytes, str]]]) -> Optional[Dict[str, Tuple[Optional[bytes], str, int]]]:
    """{path: (bytes, None to delete, git mode, 0)} that leave exactly what `git apply`
    would, when every section's file here is the one the patch was made from (`exact`, by
    new path; `here`: every touched path read): each result is then the one computed and
    shown, whose blob id is the one the box's `index` line names. None when any section
    needs git's own reading: a binary patch, a file here that differs from the synced one
    (git finds hunks at an offset), a mode here the section does not expect, a new file
    or a rename onto something here, or two sections on one path (a type change).
    `git apply` itself takes 0.4 s of a 50 MB patch's 1.3 s, mostly reading it again."""
    out: Dict[str, Tuple[Optional[bytes], str, int]] = {}
    folded: set = set()
    for fp in files:
        ours = {folded_path(fp.old_path), folded_path(fp.path)}
        if fp.binary or ours & folded:
            return None
        folded |= ours
        old = here.get(fp.old_path)
        if fp.kind == "new":
            if here.get(fp.path) is not None or (fp.hunks and fp.path not in exact) or not fp.new_mode:
                return None
            out[fp.path] = (fp.result if fp.hunks else b"", fp.new_mode, 0)
            continue
        # no mode said (a rename as it is): git keeps the mode here, a symlink's too
        if old is None or fp.old_mode not in (None, old[1]) or (fp.path in exact) != bool(fp.hunks):
            return None
        if fp.kind == "deleted":
            if (fp.result if fp.hunks else old[0]):  # git deletes only a file the section empties
                return None
            out[fp.old_path] = (None, "", 0)
            continue
        if fp.old_path != fp.path:
            if here.get(fp.path) is not None:
                return None
            out[fp.old_path] = (None, "", 0)
        out[fp.path] = (fp.result if fp.hunks else old[0], fp.new_mode or old[1], 0)
    return out


def synced_ids(files: Sequence["FilePatch"], exact: set) -> Dict[str, str]:
    """{path: blob id} of the files here that hold the synced bytes (`exact`, by new path):
    the sync's record holds those blobs, in the store or in your repository's objects beside
    it (as it holds every file the 3-way merge starts from), so the undo log points at them
    as they are and neither hashes nor deflates a copy."""
    return {fp.old_path: ids[0] for fp, ids in zip(files, map(index_ids, files))
            if ids and fp.path in exact and fp.kind != "new" and len(ids[0]) == 40}


def touched_paths(files: Sequence["FilePatch"]) -> List[str]:
    return list(dict.fromkeys(p for f in files for p in (f.old_path, f.path)))


def in_write_order(paths: Iterable[str], is_removal) -> List[str]:
    """Removals first, deepest first; then writes, shallowest first."""
    paths = list(paths)
    removals = sorted((p for p in paths if is_removal(p)), key=lambda p: -p.count("/"))
    writes = sorted((p for p in paths if not is_removal(p)), key=lambda p: p.count("/"))
    return removals + writes


def restore_states(root: Path, was: Dict[str, Optional[Tuple[bytes, str]]]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Applier.put_back_rewritten, for any folder: (changed paths, [(path, why not)])."""
    changed = [path for path, state in was.items() if held_now(root, path) != state]
    left = []
    for path in in_write_order(changed, lambda p: was[p] is None):
        state = was[path]
        try:
            write_worktree(root, path, state[0] if state else None, state[1] if state else "")
        except (OSError, PatchwireError) as e:
            left.append((path, why_not(e)))
    return changed, left


def why_not(e: BaseException) -> str:
    """An OSError's reason without its path ("Permission denied"), else the message."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def held_now(root: Path, path: str) -> Optional[Tuple[bytes, str]]:
    """What `path` holds, as read_worktree; None beneath a symlink (nothing of the project's:
    Patchwire never reads through one), or where it cannot be read at all."""
    try:
        return read_worktree(root, path)
    except (OSError, PatchwireError):
        return None


# git apply's words for a file it could not write (apply.c, create_one_file: the name as it is,
# in single quotes)
GIT_WRITE_FAILED = re.compile(rb"^error: unable to write file '(.+)' mode [0-7]+: ", re.MULTILINE)


def failed_write(stderr: bytes, paths: Iterable[str]) -> Optional[str]:
    """The path `git apply` names as the one it could not write, or None: it wrote nothing
    (the patch did not apply), or said so in words not known here."""
    named = GIT_WRITE_FAILED.search(stderr)
    if not named:
        return None
    return next((path for path in paths if os.fsencode(path) == named.group(1)), _dec(named.group(1)))


def write_failure_fix(root: Path, path: str, paths: Sequence[str]) -> str:
    """What keeps `path` (or, not known, any of `paths`) from being written, as the fix: a
    file where the patch puts a folder, or the folder git must write in that this account
    may not write (git unlinks and creates each file, so the folder's mode counts, not the
    file's). "" when neither is the cause."""
    for candidate in [path] if path else paths:
        folder = ""
        for name in candidate.split("/")[:-1]:
            inner = f"{folder}/{name}" if folder else name
            st = lstat_or_none(root / inner)
            if st is None:
                break
            if not stat.S_ISDIR(st.st_mode):
                quoted, kind = shlex.quote(sanitize(inner)), "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
                return (f"{sanitize(inner)} is {kind} where the patch puts a folder: move it away "
                        f"(`mv {quoted} {shlex.quote(sanitize(inner) + '.mine')}`)")
            folder = inner
        if not os.access(root / folder if folder else root, os.W_OK):
            shown = sanitize(folder) if folder else "the project's folder"
            return f"make {shown} writable (`chmod u+w {shlex.quote(sanitize(folder) if folder else '.')}`)"
    return ""


def diff_tree(git: Git, a: str, b: str) -> List[Tuple[str, str, str]]:
    """(status letter, old path, new path) of every change between two trees."""
    fields = git("diff-tree", "-r", "-M", "-z", "--name-status", a, b).split(b"\0")
    out, i = [], 0
    while i < len(fields) - 1:
        status = fields[i].decode()[:1]
        if status in "RC":
            out.append((status, _dec(fields[i + 1]), _dec(fields[i + 2])))
            i += 3
        else:
            out.append((status, _dec(fields[i + 1]), _dec(fields[i + 1])))
            i += 2
    return out


# --- files in the way of a new file or a rename


OVERWRITE_HELP = """y - replace your file with the AI's (`patchwire apply --undo` puts yours back)
n - keep yours: that file of the change is left out (Enter alone)
a - replace this one and every later one      q - apply nothing; every file stays as it is"""


def settle_in_the_way(session: Session, job: str, chosen: bytes, overwrite: Optional[bool],
                      style: Style, read: Optional[List[FilePatch]] = None) -> Tuple[bytes, Dict[str, str]]:
    """The part to apply and the files in the way it may replace ({path: sha256}): with
    `overwrite` True all of them, False none (the Applier then refuses, naming them), None as
    answered on stdin file by file; a file kept leaves its section out of the change, and q
    leaves nothing to apply. Patchwire's own files never get here: vetting refuses them.
    `read`: `chosen` as read and vetted already (none: it is read here when needed)."""
    files = read if read is not None else split_patch(chosen)
    found = (files_in_the_way(session.project, read if read is not None else session.vet(chosen, job, whole=False), job)
             if may_be_in_the_way(session.project.root, files) else [])
    if not found or overwrite is False:
        return chosen, {}
    answers = {w.path: True for w in found} if overwrite else ask_overwrites(found, style)
    if answers is None:
        return b"", {}
    kept = [w.path for w in found if not answers[w.path]]
    if kept:
        say("kept yours, left out of the change: " + ", ".join(map(sanitize, kept)))
    return leave_out(chosen, kept), {w.path: w.digest for w in found if answers[w.path]}


def may_be_in_the_way(root: Path, files: Sequence[FilePatch]) -> bool:
    """Whether something is here where the patch puts a new file or a rename: only then is
    a chosen part vetted again and its results computed."""
    return any(f.kind in ("new", "renamed") and lstat_or_none(root / f.path) for f in files)


def ask_overwrites(found: Sequence[InTheWay], style: Style) -> Optional[Dict[str, bool]]:
    """{path: replace it?} as answered on stdin, or None for q (or no input at all)."""
    say(style("yellow", f"{len(found)} file(s) here would be replaced: the box never had them, and you did "
                        "not review what they hold"))
    answers: Dict[str, bool] = {}
    rest = ""
    for w in found:
        show_replacement(w, style)
        answer = rest or ask_letter(f"overwrite {w.describe()}", "ynaq", "n", OVERWRITE_HELP, style)
        if answer == "q":
            return None
        rest = "y" if answer == "a" else rest
        answers[w.path] = answer in "ya"
    return answers


def show_replacement(w: InTheWay, style: Style, limit: int = 20) -> None:
    """What the AI's change would leave at `w.path`, the first `limit` lines of it."""
    fp = w.fp
    if fp.link_target is not None:
        say(f"  {sanitize(fp.path)} would become a symlink to {sanitize(fp.link_target)}")
    elif fp.result is not None:
        lines = fp.result.decode("utf-8", "replace").splitlines()
        say(f"  {sanitize(fp.path)} would become the AI's file ({size_in_words(len(fp.result))}):")
        for line in lines[:limit]:  # the preview showed the diff; this is the whole file
            say(style("green", "    +" + sanitize(line)))
        if len(lines) > limit:
            say(f"    ... {len(lines) - limit} more line(s)")
    elif fp.binary:
        say(f"  {sanitize(fp.path)} would become the AI's binary file (not shown)")
    elif fp.kind == "renamed":
        say(f"  {sanitize(fp.path)} would become {sanitize(fp.old_path)}, moved there as it is")
    else:
        say(f"  {sanitize(fp.path)} would become an empty file")


def ask_letter(question: str, allowed: str, default: str, help_text: str, style: Style) -> str:
    """One letter of `allowed` read from stdin; Enter alone is `default`, no input at all q."""
    choices = "/".join(c.upper() if c == default else c for c in allowed)
    while True:
        sys.stderr.write(style("bold", f"{question}? [{choices}/?] "))
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        if not line:
            return "q"
        answer = line.strip().lower()[:1] or default
        if answer in allowed:
            return answer
        say(help_text)


def leave_out(patch: bytes, paths: Sequence[str]) -> bytes:
    """The patch without the sections that write `paths` (each section is its own bytes)."""
    return b"".join(fp.bytes for fp in split_patch(patch) if fp.path not in paths) if paths else patch


# ================================================================== several attempts
# `ask -n N`: one sync, one POST with "attempts": N; the box makes N sibling jobs of one
# snapshot under an ask id (GET /v1/asks/ID). Each attempt is an ordinary job: its patch is
# fetched and kept like any job's, read with the strict reader and vetted by Session.vet.
# A change built from several attempts is their files' sections, byte for byte as the box
# sent them (index lines and all), joined into one patch and vetted again whole, exactly
# as one job's: no second patch path. Files from different attempts must not overlap. A
# file built from hunks of several attempts is rendered by the chooser's own code (Hunk,
# render_hunks): the attempts all start from one snapshot, so their hunks' old line numbers
# are of the same file, and hunks that read the same lines are alternatives, never merged.

ASK_GROUP_SHAPE = {"id": str, "project": str, "prompt": str, "created": NUMBER, "status": str,
                   "attempts": int, "jobs": ("list", dict)}


def checked_group(value: Any, asked: str) -> dict:
    """GET /v1/asks/ID: the ask asked for, its attempts numbered 1..N, each a job of it."""
    group = checked(value, ASK_GROUP_SHAPE, "ask group", required=("id", "jobs", "attempts"))
    check_job_id(group["id"], asked)
    jobs = [checked_job(job, "ask group's job") for job in group["jobs"]]
    if [job.get("attempt") for job in jobs] != list(range(1, len(jobs) + 1)) or len(jobs) != group["attempts"]:
        raise AnswerRefused("the agent's ask group does not number its attempts 1..N", BOX_HINT)
    if any(job.get("ask_id") != group["id"] for job in jobs) or len({job["id"] for job in jobs}) != len(jobs):
        raise AnswerRefused("the agent's ask group holds jobs of another ask", BOX_HINT)
    return {**group, "jobs": jobs}


def show_siblings(session: Session, job: dict) -> None:
    """`show` of an attempt: one line for each attempt of its ask."""
    if not isinstance(job.get("ask_id"), str):
        return
    for other in session.client.ask_group(job["ask_id"])["jobs"]:
        stats = other.get("stats") or {}
        change = f", {stats.get('files', 0)} file(s) +{stats.get('added', 0)} -{stats.get('removed', 0)}" if stats else ""
        mark = " (this one)" if other["id"] == job["id"] else ""
        print(sanitize(f"  attempt {other['attempt']}: job {other['id']} {other['status']}{change}{mark}"))


def log_origin(entry: dict) -> str:
    """`patchwire log`: " from ask ID (attempt 2: a.dart; b.dart: hunk 1 of attempt 2, hunk 2
    of attempt 3)" for an apply (or its undo) of several attempts' work, "" for any other."""
    parts, hunks = entry.get("parts"), entry.get("hunks") or {}
    if not isinstance(entry.get("ask"), str) or not isinstance(parts, dict) or not isinstance(hunks, dict):
        return ""
    return f" from ask {entry['ask']} ({describe_origin(parts, hunks)})"


def attempt_label(job: dict) -> str:
    """"ask 1a2b3c #2 " before a job's prompt in `jobs`: the attempts of one ask group."""
    if not isinstance(job.get("ask_id"), str) or not isinstance(job.get("attempt"), int):
        return ""
    return f"ask {job['ask_id'][:6]} #{job['attempt']} "


TAKE_HELP = ("with -n: build one change, each file from the attempt named: 2:lib/a.dart,3:lib/b.dart; "
             "3#2:lib/b.dart takes hunk 2 of attempt 3's change to it (3#1+3:PATH hunks 1 and 3, "
             "numbered as its @@ lines in `patchwire diff JOB`); in PATH write \\, for a comma, "
             "\\\\ for a backslash")


def add_attempt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--attempts", type=int, default=1, metavar="N",
                        help="run N attempts (1-4) of the prompt side by side, then choose")
    parser.add_argument("--pick", type=int, metavar="K", help="with -n: apply attempt K whole, without asking")
    parser.add_argument("--take", metavar="K[#H]:PATH,...", help=TAKE_HELP)
    parser.add_argument("--agents", metavar="NAME,...",
                        help="one attempt per AI profile of the box ([ai.profiles.NAME]), e.g. --agents claude,codex")
    parser.add_argument("--focus", type=int, default=1, metavar="K",
                        help="with -n: the attempt whose AI text is shown (default 1)")


class Part(NamedTuple):
    """A part of a built change: attempt K's change to PATH, whole (no `hunks`), or only
    the hunks numbered (1-based, in the order of the section's @@ lines)."""
    attempt: int
    path: str
    hunks: Tuple[int, ...] = ()


class AttemptOptions:
    """What `ask -n` was told on its command line about the attempts, read once there."""

    def __init__(self, args: argparse.Namespace) -> None:
        agents = [a.strip() for a in (getattr(args, "agents", None) or "").split(",") if a.strip()]
        self.agents = agents
        self.count: int = len(agents) if agents else getattr(args, "attempts", 1)
        self.pick: Optional[int] = getattr(args, "pick", None)
        self.focus: int = getattr(args, "focus", 1)
        self.parts: List[Part] = parse_take(getattr(args, "take", None) or "")

    def fields(self) -> dict:
        """The ask's fields for several attempts: attempts, and the AI profile of each."""
        if self.agents:
            return {"attempts": len(self.agents), "agents": self.agents}
        return {"attempts": self.count} if self.count != 1 else {}


def attempt_fields(args) -> dict:
    """The ask's fields for several attempts: attempts, and the AI profile of each."""
    return AttemptOptions(args).fields()


def check_attempt_args(args) -> AttemptOptions:
    """The command line of `ask -n`, checked before anything is sent."""
    opts = AttemptOptions(args)
    if opts.agents and args.attempts not in (1, len(opts.agents)):
        raise UsageError(f"-n {args.attempts} and --agents with {len(opts.agents)} names disagree",
                         "--agents makes one attempt per name: leave -n out")
    if not 2 <= opts.count <= 4:
        raise UsageError(f"-n {opts.count}: several attempts are 2 to 4", "patchwire ask -n 3 PROMPT")
    if getattr(args, "detach", False):
        raise UsageError("-n does not go with --detach: the choice between the attempts follows them",
                         "ask -n N and stay, or ask --detach for one attempt")
    if opts.pick and opts.parts:
        raise UsageError("--pick and --take do not go together", "apply one attempt whole, or build one change")
    if args.yes and not (opts.pick or opts.parts):
        raise UsageError("with -n, say what to apply without asking: --pick K or --take K:PATH,...")
    for k in [opts.pick or 1, opts.focus] + [part.attempt for part in opts.parts]:
        if not 1 <= k <= opts.count:
            raise UsageError(f"there is no attempt {k} of {opts.count}")
    return opts


TAKE_RE = re.compile(r"(\d+)(?:#(\d+(?:\+\d+)*))?:(.+)", re.S)


def parse_take(text: str) -> List[Part]:
    """"2:lib/a.dart,3#1+2:lib/b.dart" -> [Part(2, "lib/a.dart"), Part(3, "lib/b.dart", (1, 2))].
    Any file name can be written: the attempt and hunks end at the first colon (a path may
    hold more), and in a path a backslash makes the next character plain (\\, a comma,
    \\\\ a backslash); whitespace around an item is dropped unless escaped."""
    parts = []
    for item in split_escaped(text):
        m = TAKE_RE.fullmatch(item)
        if not m:
            raise UsageError(f"--take {sanitize(item)!r} is not K:PATH or K#H:PATH",
                             "e.g. --take 2:lib/a.dart,3#2:lib/b.dart")
        hunks = tuple(int(h) for h in m.group(2).split("+")) if m.group(2) else ()
        if 0 in hunks:
            raise UsageError(f"--take {sanitize(item)!r}: hunks are numbered from 1")
        parts.append(Part(int(m.group(1)), m.group(3), hunks))
    return parts


def split_escaped(text: str) -> List[str]:
    """Split at each comma not escaped by a backslash, the escapes resolved; empty items and
    unescaped whitespace at either end of an item dropped."""
    items: List[List[Tuple[str, bool]]] = [[]]
    chars = iter(text)
    for c in chars:
        if c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise UsageError("--take ends with a lone backslash", "write \\\\ for a backslash in a path")
            items[-1].append((escaped, True))
        elif c == ",":
            items.append([])
        else:
            items[-1].append((c, False))
    out = []
    for item in items:
        while item and not item[0][1] and item[0][0].isspace():
            item.pop(0)
        while item and not item[-1][1] and item[-1][0].isspace():
            item.pop()
        if item:
            out.append("".join(c for c, _ in item))
    return out


# --- following the group


class AttemptProgress:
    """One line per attempt as its state changes (state, turns, files); the focused
    attempt's events in full, through the ProgressPrinter (sanitised there)."""

    def __init__(self, numbers: Dict[str, int], focus: str, printer: ProgressPrinter):
        self.numbers, self.focus, self.printer = numbers, focus, printer
        self.state: Dict[str, Dict[str, Any]] = {job: {"state": "queued", "turns": 0, "files": 0} for job in numbers}

    def __call__(self, event: dict) -> None:
        job = event.get("job")
        if job not in self.numbers:
            return
        if job == self.focus:
            self.printer(event)
        kind, state = event.get("type"), self.state[job]
        if kind == "tool":
            state["turns"] += 1
        elif kind == "result" and isinstance(event.get("num_turns"), int):
            state["turns"] = event["num_turns"]
        elif kind in ("started", "finished", "failed", "cancelled"):
            state["state"] = {"started": "running", "finished": "done"}.get(kind, kind)
            stats = event.get("stats") or {}
            state["files"] = stats.get("files", 0) if isinstance(stats.get("files"), int) else 0
            self.line(job)

    def line(self, job: str) -> None:
        s = self.state[job]
        say(self.printer.stamp(), f"attempt {self.numbers[job]} ({job}): {s['state']}, {s['turns']} turn(s), "
            f"{s['files']} file(s)")


def follow_group(session: Session, ask: str, events: Iterator[dict], on_event: Callable[[dict], None],
                 jobs: Iterable[str]) -> dict:
    """Hand on each attempt's events once (a job's events come in the order of their seq, from
    the start again after a lost connection), across lost connections, until every attempt
    has ended; the group as the box then says it is. Events of other jobs are dropped: what
    is remembered is one number per attempt, however long the stream."""
    last = {job: -1 for job in jobs}  # the seq of each attempt's last event handed on
    waited, tries = 0.0, 0
    while True:
        try:
            for event in events:
                job, seq = str(event.get("job")), int(event.get("seq", 0))
                if seq > last.get(job, seq):
                    last[job] = seq
                    on_event(event)
            group = session.client.ask_group(ask)
            if all(job["status"] in JOB_ENDS for job in group["jobs"]):
                return group
        except (AgentError, OSError, ValueError, *http_errors()) as e:
            if not reconnectable(e) or waited >= RECONNECT_FOR_S:
                raise
            if not tries:
                say(sanitize(f"lost the event stream ({str(e).splitlines()[0]}); reconnecting"))
        delay = min(0.2 * 2 ** tries, 5.0)
        time.sleep(delay)
        waited, tries = waited + delay, tries + 1
        events = session.client.ask_events(ask)


# --- the attempts side by side


class Attempt:
    """One attempt as the chooser sees it: its job, its figures, its patch as read and vetted."""

    def __init__(self, job: dict):
        self.job, self.number, self.id = job, job["attempt"], job["id"]
        self.status: str = job["status"]
        self.patch = b""
        self.files: List[FilePatch] = []
        self.problem = ""  # why its patch cannot be applied here

    @property
    def usable(self) -> bool:
        return self.status == "done" and not self.problem

    def sections(self) -> Dict[str, bytes]:
        """Each path the patch touches -> that file's section, as the box sent it."""
        return {path: fp.bytes for fp in self.files for path in (fp.old_path, fp.path)}

    def row(self) -> dict:
        stats = self.job.get("stats") or {}
        result = self.job.get("result") or {}
        started, finished = self.job.get("started"), self.job.get("finished")
        return {"attempt": self.number, "job": self.id, "status": self.status, "agent": self.job.get("profile"),
                "files": len(self.files) if self.usable else stats.get("files", 0),
                "added": stats.get("added", 0), "removed": stats.get("removed", 0),
                "seconds": round(finished - started, 1) if started and finished else None,
                "cost_usd": box_number(result.get("cost_usd")), "turns": box_number(result.get("num_turns")),
                "paths": [fp.path for fp in self.files],
                "problem": self.problem or (str(self.job.get("reason") or "") if self.status != "done" else "")}


def box_number(value: Any) -> Optional[float]:
    """A figure of a job's result (not checked by JOB_SHAPE): a number, or None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_attempts(session: Session, group: dict) -> List[Attempt]:
    """Every attempt; the patch of each done one fetched, kept and vetted like one job's."""
    attempts = [Attempt(job) for job in group["jobs"]]
    for a in attempts:
        if a.status != "done":
            continue
        try:
            a.patch = patiently(lambda: session.job_diff(a.id), f"job {a.id}'s diff")  # noqa: B023 (called at once)
            a.files = session.vet(a.patch, a.id)
        except PatchError as e:
            a.problem = e.message
    return attempts


def differences(attempts: Sequence[Attempt]) -> List[dict]:
    """For each pair of usable attempts: the paths where their changes differ."""
    usable = [a for a in attempts if a.usable]
    out = []
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            sa, sb = a.sections(), b.sections()
            paths = sorted(p for p in set(sa) | set(sb) if sa.get(p) != sb.get(p))
            out.append({"attempts": [a.number, b.number], "paths": paths})
    return out


def render_attempts(rows: Sequence[dict], diffs: Sequence[dict]) -> List[str]:
    lines = [f"{'#':>2}  {'JOB':<12}  {'STATUS':<9} {'FILES':>5}  {'+/-':<11} {'TIME':>7}  {'COST':>8}  TURNS"]
    for r in rows:
        size = f"+{r['added']} -{r['removed']}" if r["status"] == "done" else ""
        took = f"{r['seconds']:.1f}s" if r["seconds"] is not None else "-"
        cost = f"${r['cost_usd']:.4f}" if r["cost_usd"] is not None else "-"
        turns = f"{r['turns']:g}" if r["turns"] is not None else "-"
        line = f"{r['attempt']:>2}  {r['job']:<12}  {r['status']:<9} {r['files']:>5}  {size:<11} {took:>7}  {cost:>8}  {turns}"
        agent = f"  [{r['agent']}]" if r["agent"] else ""
        lines.append(sanitize(line + agent + (f"  ({r['problem'][:80]})" if r["problem"] else "")))
    for d in diffs:
        a, b = d["attempts"]
        lines.append(f"attempt {b} differs from {a} in {len(d['paths'])} file(s)"
                     + (f": {sanitize(describe_paths(d['paths']))}" if d["paths"] else " (the same change)"))
    return lines


# --- choosing: one attempt whole, or one change built from several


def numbered(attempts: Sequence[Attempt], k: int) -> Attempt:
    a = attempts[k - 1]
    if not a.usable:
        raise UsageError(f"attempt {k} (job {a.id}) is {a.status}" + (f": {sanitize(a.problem)}" if a.problem else ""),
                         "choose a done attempt from the table")
    return a


class Built(NamedTuple):
    """A change built from several attempts: the patch, path -> attempt for each file taken
    whole, and path -> [[attempt, hunk], ...] for each file built hunk by hunk."""
    patch: bytes
    parts: Dict[str, int]
    hunks: Dict[str, List[List[int]]]


def built_change(attempts: Sequence[Attempt], parts: Sequence[Part]) -> Built:
    """The sections `parts` name, joined into one patch. A file taken whole comes byte for
    byte as its attempt's section; a file named with hunks (of one attempt or several) is
    rebuilt from them. The same file whole from two attempts (or a rename of one touching
    the other's) is refused, and so are two hunks that overlap: never merged silently."""
    by_hunk = list(dict.fromkeys(p.path for p in parts if p.hunks))
    chosen: Dict[str, int] = {}
    sections: List[bytes] = []
    for part in parts:
        if part.path not in by_hunk:
            whole_section(attempts, part, chosen, sections)
    hunks: Dict[str, List[List[int]]] = {}
    for path in by_hunk:
        if path in chosen:
            raise UsageError(f"{sanitize(path)} is touched by attempt {chosen[path]}'s change to another file, "
                             "and taken in hunks", "take it whole, from one attempt")
        section, hunks[path] = hunk_section(attempts, path, [p for p in parts if p.path == path])
        sections.append(section)
    return Built(b"".join(sections), chosen, hunks)


def whole_section(attempts: Sequence[Attempt], part: Part, chosen: Dict[str, int], sections: List[bytes]) -> None:
    k, path = part.attempt, part.path
    fp = attempt_file(numbered(attempts, k), path)
    for touched in touched_paths([fp]):
        if chosen.get(touched, k) != k:
            raise UsageError(f"{sanitize(touched)} is taken from attempts {chosen[touched]} and {k}",
                             "take each file from one attempt, or hunks of it from several "
                             "(K#H:PATH; `patchwire diff JOB` shows each)")
    if fp.path not in chosen:
        chosen.update(dict.fromkeys(touched_paths([fp]), k))
        sections.append(fp.bytes)


def attempt_file(a: Attempt, path: str) -> FilePatch:
    fp = next((f for f in a.files if path in (f.path, f.old_path)), None)
    if fp is None:
        raise UsageError(f"attempt {a.number} does not change {sanitize(path)}",
                         f"its files: {sanitize(describe_paths([f.path for f in a.files]))}")
    return fp


def file_hunks(a: Attempt, path: str) -> Tuple[List[bytes], List[Hunk]]:
    """(header, hunks) of attempt `a`'s change to `path`, which must be an edit of a text
    file in place: a new, deleted, renamed, binary or symlink change is taken whole."""
    fp = attempt_file(a, path)
    if fp.kind != "modified" or fp.old_path != fp.path or fp.binary or fp.link_target is not None or not fp.hunks:
        raise UsageError(f"attempt {a.number}'s change to {sanitize(path)} is {fp.label}"
                         f"{' (binary)' if fp.binary else ''}: it cannot be taken in hunks",
                         f"take it whole: --take {a.number}:PATH")
    return parse_hunks(fp)


def same_header(header: List[bytes]) -> List[bytes]:
    """A section's header without its index line (which names each attempt's own result):
    what must agree for hunks of several attempts to go under one header (modes, names)."""
    return [line for line in header if not line.startswith(b"index ")]


def hunk_section(attempts: Sequence[Attempt], path: str, parts: Sequence[Part]) -> Tuple[bytes, List[List[int]]]:
    """`path`'s section built from the hunks `parts` name, in file order, under the first
    attempt's header; [[attempt, hunk], ...] as taken. A part without hunks takes all of
    its attempt's. The same hunk from two attempts (byte for byte) is taken once."""
    header: Optional[List[bytes]] = None
    picked: Dict[Tuple[int, bytes], Tuple[int, int, Hunk]] = {}  # (start, lines) -> (attempt, number, hunk)
    for part in parts:
        head, hunks = file_hunks(numbered(attempts, part.attempt), path)
        if header is not None and same_header(head) != same_header(header):
            raise UsageError(f"attempts {parts[0].attempt} and {part.attempt} change {sanitize(path)}'s mode "
                             "or header differently: its hunks cannot go together", "take it whole, from one attempt")
        header = header or head
        for h in part.hunks or range(1, len(hunks) + 1):
            if h > len(hunks):
                raise UsageError(f"attempt {part.attempt} changes {sanitize(path)} in {len(hunks)} hunk(s): "
                                 f"there is no hunk {h}", f"`patchwire diff {numbered(attempts, part.attempt).id}` "
                                 "numbers them by their @@ lines")
            hunk = hunks[h - 1]
            picked.setdefault((hunk.old_start, b"".join(hunk.lines)), (part.attempt, h, hunk))
    ordered = sorted(picked.values(), key=lambda t: t[2].old_lines)
    for (k1, h1, one), (k2, h2, two) in zip(ordered, ordered[1:]):
        if two.old_lines[0] < one.old_lines[1]:
            raise UsageError(f"hunk {h1} of attempt {k1} and hunk {h2} of attempt {k2} overlap in {sanitize(path)} "
                             f"(lines {two.old_lines[0]}-{min(one.old_lines[1], two.old_lines[1]) - 1} as synced)",
                             "take one of them: overlapping hunks are alternatives, never merged")
    section = render_hunks(header or [], [(hunk, range(hunk.groups)) for _, _, hunk in ordered])
    return section or b"", [[k, h] for k, h, _ in ordered]


def apply_attempts(session: Session, opts: ApplyOptions, ask: str, attempts: Sequence[Attempt],
                   pick: Optional[int], parts: Sequence[Part], overwrite: Optional[bool]) -> dict:
    """Apply attempt `pick` whole, or the change built from `parts`, vetted as one job's
    patch against the tree the attempts were asked on (a file built from hunks: as a part
    chosen of a job's patch, by position); the log and undo record the ask and which
    attempt each file, or each hunk, came from."""
    if pick:
        a = numbered(attempts, pick)
        origin: Dict[str, Any] = {"ask": ask, "parts": {fp.path: a.number for fp in a.files}}
        result = apply_job(session, a.id, a.patch, read=a.files, overwrite=overwrite, no_color=opts.no_color,
                           origin=origin)
        session.remember_job(a.id)
        return result
    built = built_change(attempts, parts)
    first = numbered(attempts, parts[0].attempt)
    # strictly, whole: each section keeps its index line; a file built from hunks has no
    # blob of its own to be checked against, as a part chosen with `apply -i` has none
    files = session.vet(built.patch, first.id, whole=not built.hunks)
    # logged under the first attempt's job: partial unless it is that job's whole patch, so a
    # later `apply` of that job is not answered "already applied" for what it never wrote
    origin = {"ask": ask, "parts": built.parts, **({"hunks": built.hunks} if built.hunks else {}),
              "partial": built.patch != first.patch}
    result = apply_job(session, first.id, built.patch, read=files, overwrite=overwrite, no_color=opts.no_color,
                       origin=origin)
    taken = list(built.parts.values()) + [k for pairs in built.hunks.values() for k, _ in pairs]
    counts = [taken.count(a.number) for a in attempts]
    session.remember_job(attempts[counts.index(max(counts))].id)  # `ask --continue` goes on from it
    say("built from " + describe_origin(built.parts, built.hunks))
    return result


def describe_origin(parts: Dict[str, Any], hunks: Dict[str, Any]) -> str:
    """"attempt 2: lib/a.dart; lib/b.dart: hunk 1 of attempt 2, hunk 2 of attempt 3"."""
    by_attempt: Dict[Any, List[str]] = {}
    for path, k in parts.items():
        by_attempt.setdefault(k, []).append(str(path))
    said = [f"attempt {k}: {describe_paths(paths, 3)}" for k, paths in by_attempt.items()]
    for path, pairs in hunks.items():
        said.append(sanitize(str(path)) + ": " + ", ".join(f"hunk {h} of attempt {k}" for k, h in pairs))
    return "; ".join(said)


def ask_which(attempts: Sequence[Attempt], style: Style) -> List[Part]:
    """On a terminal: a number applies that attempt whole ([Part(K, "")]); t goes file by
    file, each file's different changes offered as alternatives (and, where the attempts
    edit it differently, hunk by hunk: h); anything else keeps them all."""
    answer = read_answer("A number and Enter applies that attempt whole; t and Enter takes files from "
                         "several; anything else keeps them for later.")
    if answer and answer.isdigit() and 1 <= int(answer) <= len(attempts):
        return [Part(int(answer), "")]
    if answer != "t":
        return []
    parts: List[Part] = []
    paths = list(dict.fromkeys(fp.path for a in attempts if a.usable for fp in a.files))
    for path in paths:
        offers = [a for a in attempts if a.usable and path in a.sections()]
        show_alternatives(offers, path, style)
        by_hunk = len({a.sections()[path] for a in offers}) > 1 and hunk_choice_possible(offers, path)
        pick = read_answer(style("bold", sanitize(path)) + f": from attempt {'/'.join(str(a.number) for a in offers)}"
                           + (", h hunk by hunk," if by_hunk else "") + " or Enter to leave it out?")
        if by_hunk and pick == "h":
            parts += ask_hunk_by_hunk(offers, path, style)
        elif pick and pick.isdigit() and int(pick) in [a.number for a in offers]:
            parts.append(Part(int(pick), path))
    return parts


def hunk_choice_possible(offers: Sequence[Attempt], path: str) -> bool:
    """Whether every attempt's change to `path` can be taken in hunks, under one header."""
    try:
        heads = [same_header(file_hunks(a, path)[0]) for a in offers]
    except UsageError:
        return False
    return all(head == heads[0] for head in heads)


def hunk_clusters(offers: Sequence[Attempt], path: str) -> List[List[Tuple[List[int], List[Tuple[int, Hunk]]]]]:
    """The attempts' hunks of `path` in runs that overlap (one run: the hunks of any attempt
    touching the same lines as synced); in each run the alternatives, one per different
    change: ([attempts making it], [(hunk number, hunk), ...])."""
    every = sorted(((a.number, h, hunk) for a in offers for h, hunk in enumerate(file_hunks(a, path)[1], 1)),
                   key=lambda t: t[2].old_lines)
    runs: List[List[Tuple[int, int, Hunk]]] = []
    end = 0  # past the last line the current run reads
    for k, h, hunk in every:
        first, last = hunk.old_lines
        if not runs or first >= end:
            runs.append([])
        end = max(end, last) if runs[-1] else last
        runs[-1].append((k, h, hunk))
    out = []
    for run in runs:
        alike: Dict[bytes, Tuple[List[int], List[Tuple[int, Hunk]]]] = {}
        for a in offers:
            mine = [(h, hunk) for k, h, hunk in run if k == a.number]
            if mine:
                key = b"\0".join(b"%d" % hunk.old_start + b"".join(hunk.lines) for _, hunk in mine)
                alike.setdefault(key, ([], mine))[0].append(a.number)
        out.append(list(alike.values()))
    return out


def ask_hunk_by_hunk(offers: Sequence[Attempt], path: str, style: Style) -> List[Part]:
    """Each run of overlapping hunks once: its alternatives shown, one taken or none."""
    parts = []
    clusters = hunk_clusters(offers, path)
    for i, alternatives in enumerate(clusters, 1):
        for makers, hunks in alternatives:
            say(style("bold", f"attempt {' and '.join(map(str, makers))}, hunk "
                              + "+".join(str(h) for h, _ in hunks) + f" (from line {hunks[0][1].old_start} as synced):"))
            for _, hunk in hunks:
                show_hunk_lines(hunk.lines, style)
        numbers = [k for makers, _ in alternatives for k in makers]
        pick = read_answer(style("bold", f"{sanitize(path)}, part {i}/{len(clusters)}") + ": from attempt "
                           + "/".join(map(str, numbers)) + ", or Enter to leave it out?")
        for makers, hunks in alternatives:
            if pick and pick.isdigit() and int(pick) in makers:
                parts.append(Part(int(pick), path, tuple(h for h, _ in hunks)))
    return parts


def show_alternatives(attempts: Sequence[Attempt], path: str, style: Style) -> None:
    """Each different change the attempts make to `path`, once, naming who makes it."""
    alike: Dict[bytes, List[Attempt]] = {}
    for a in attempts:
        alike.setdefault(a.sections()[path], []).append(a)
    for same in alike.values():
        fp = next(f for f in same[0].files if path in (f.path, f.old_path))
        say(style("bold", "attempt " + " and ".join(str(a.number) for a in same) + ":"))
        say("\n".join(render_diff([fp], style)))


def ask_attempts(session: Session, args, prompt: str) -> int:
    """`patchwire ask -n N`: sync once, post once, follow every attempt, then choose."""
    which, opts = check_attempt_args(args), ApplyOptions.of(args)
    session.client.on_wait = lambda quiet: say(f"still waiting for the box ({quiet:.0f} s without news)")
    first, events, tree = start_ask(session, ask_fields(session, args, prompt))
    known: Dict[str, Any] = {"ask": None, "jobs": [str(first["job"])]}  # what a Ctrl-C from here on names
    try:
        return follow_attempts(session, opts, which, first, events, tree, known)
    except KeyboardInterrupt:
        if known.get("ended"):  # while choosing: nothing runs on
            raise
        raise AttemptsLeft(known["ask"], known["jobs"]) from None


def follow_attempts(session: Session, opts: ApplyOptions, which: "AttemptOptions", first: dict,
                    events: Iterator[dict], tree: str, known: Dict[str, Any]) -> int:
    ask = session.client.job(first["job"]).get("ask_id")
    if not isinstance(ask, str):
        raise AnswerRefused("the agent made one job of an ask of several attempts (is it older than "
                            "Patchwire's several attempts?)", BOX_HINT)
    group = session.client.ask_group(ask)
    numbers = {job["id"]: job["attempt"] for job in group["jobs"]}
    if len(numbers) != which.count or first["job"] not in numbers:
        raise AnswerRefused(f"the agent's ask {ask} is not the {which.count} attempts asked for", BOX_HINT)
    known.update(ask=ask, jobs=list(numbers))
    for job in numbers:
        session.record_job_tree(job, tree)
    say(f"ask {ask}: {len(numbers)} attempts; following attempt {which.focus}'s AI, one line each for the others")
    progress = AttemptProgress(numbers, group["jobs"][which.focus - 1]["id"],
                               ProgressPrinter(Style.for_stream(sys.stderr, opts.no_color)))

    def on_event(event: dict) -> None:
        if event.get("job") in numbers:  # another job's event has no place here
            progress(event)
            output(opts, event)

    def chain():
        yield first
        yield from events
    group = follow_group(session, ask, chain(), on_event, numbers)
    known["ended"] = True
    return choose_attempt(session, opts, ask, load_attempts(session, group), which)


def log_entry(line: str) -> Optional[dict]:
    """One line of applied.log, or None for what is not one (half a line a full disk or a
    kill left, a hand edit): skipped, so the log, apply and undo go on."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(entry, dict) or not isinstance(entry.get("job"), str) or not isinstance(entry.get("how"), str)
            or not isinstance(entry.get("time"), (int, float)) or not isinstance(entry.get("conflicts"), list)
            or not isinstance(entry.get("files"), list) or not all(isinstance(p, str) for p in entry["files"])):
        return None
    return entry


class AttemptsLeft(PatchwireError):
    """Ctrl-C while `ask -n N` follows its attempts (or before it knew them all): they run on."""

    exit_status = ExitStatus.INTERRUPTED

    def __init__(self, ask: Optional[str], jobs: List[str]):
        what = f"ask {ask}" if ask else "the ask"
        super().__init__(f"left {what}; its attempts keep running on the box" +
                         (f" (job {', '.join(jobs)})" if jobs else ""),
                         "`patchwire wait` follows them again and offers their changes, `patchwire cancel JOB` "
                         "stops each", details={"ask": ask, "jobs": jobs})


def choose_attempt(session: Session, opts: ApplyOptions, ask: str, attempts: List[Attempt],
                   which: AttemptOptions) -> int:
    rows, diffs = [a.row() for a in attempts], differences(attempts)
    outcome: Dict[str, Any] = {"type": "outcome", "ask": ask, "attempts": rows, "differences": diffs, "applied": False}
    if not opts.json:
        print("\n".join(render_attempts(rows, diffs)), file=sys.stderr)
    if not any(a.usable for a in attempts):
        output(opts, outcome)
        raise AIFailed(f"no attempt of ask {ask} is done with a change to apply", "see `patchwire show JOB`")
    pick, parts = which.pick, which.parts
    overwrite: Optional[bool] = False
    if not pick and not parts and not opts.json and not opts.no_apply and sys.stdin.isatty():
        parts, overwrite = ask_which(attempts, Style.for_stream(sys.stderr, opts.no_color)), None
        if parts and not parts[0].path:
            pick, parts = parts[0].attempt, []
            preview(numbered(attempts, pick).files, opts.no_color)
    if pick or parts:
        outcome.update(applied=True, apply=apply_attempts(session, opts, ask, attempts, pick, parts, overwrite))
    else:
        say("kept the attempts (" + ", ".join(f"{a.number}: job {a.id}" for a in attempts) + "): `patchwire apply "
            "JOB` applies one, `patchwire ask --on JOB ...` continues one")
    output(opts, outcome)
    return 0


# ================================================================== doctor


class Doctor:
    """Checks each link of the chain, in order; every failure says how to fix it."""

    def __init__(self, cfg: LaptopConfig):
        self.cfg = cfg
        self.checks: List[dict] = []
        self.health: dict = {}
        self.me: dict = {}

    def run(self) -> List[dict]:
        for name, check in (("git", self.git), ("rsync", self.rsync), ("token", self.token),
                            ("agent", self.agent), ("clock", self.clock), ("auth", self.auth),
                            ("ai", self.ai), ("sandbox", self.sandbox), ("ssh", self.ssh),
                            ("mirror", self.mirror)):
            try:
                detail = check()
            except PatchwireError as e:
                self.checks.append({"name": name, "ok": False, "detail": e.message, "fix": e.hint})
                continue
            if detail is not None:
                self.checks.append({"name": name, "ok": True, "detail": detail})
        return self.checks

    def git(self) -> str:
        return Git().run("--version", hint="install git").stdout.decode().strip()

    def rsync(self) -> str:
        if not shutil.which(self.cfg.rsync):
            raise PatchwireError(f"{self.cfg.rsync} is not installed",
                                 "install rsync (macOS has it; Debian/Ubuntu: sudo apt install rsync)")
        first = run([self.cfg.rsync, "--version"], check=False).stdout.decode(errors="replace")
        line = first.splitlines()[0].strip() if first.strip() else "unknown version"
        m = re.search(r"version\s+(\d+\.\d+\.\d+)", line)
        flavour = "openrsync" if "openrsync" in line else f"rsync {m.group(1)}" if m else line
        return f"{flavour} ({shutil.which(self.cfg.rsync)}); Patchwire uses only options it accepts"

    def token(self) -> str:
        self._token = self.cfg.token()
        if os.environ.get("PATCHWIRE_TOKEN", "").strip():
            return "from PATCHWIRE_TOKEN"
        path = self.cfg.token_path()
        if path and path.stat().st_mode & 0o077:
            raise PatchwireError(f"the token file {path} is readable by other users",
                                 f"chmod 600 {shlex.quote(str(path))}")
        return f"from {path}"

    def agent(self) -> str:
        self.health = Client(self.cfg.agent, "", ca_file=self.cfg.ca_file).health()
        version = self.health.get("version")
        note = "" if version == __version__ else f" (this laptop has {__version__}: upgrade the older one)"
        return f"patchwire-agent {version} at {self.cfg.agent}, {self.health.get('queue_depth', 0)} queued{note}"

    def clock(self) -> Optional[str]:
        if "time" not in self.health:
            return None
        skew = time.time() - float(self.health["time"])
        if abs(skew) > 120:
            raise PatchwireError(f"this clock and the box's differ by {abs(skew):.0f} s",
                                 "turn on network time (NTP) on both machines")
        return f"within {abs(skew):.1f} s of the box"

    def auth(self) -> Optional[str]:
        if not self.health or not getattr(self, "_token", None):
            return None
        try:
            self.me = Client(self.cfg.agent, self._token, ca_file=self.cfg.ca_file,
                             token_source=self.cfg.token_source()).me(self.cfg.project)
        except AgentError as e:
            if e.http_status == HTTPStatus.UNAUTHORIZED:
                raise PatchwireError(f"the agent does not accept the token from {self.cfg.token_source()}",
                                     e.hint)
            raise
        return f"accepted as user {self.me['user']}"

    def ai(self) -> Optional[str]:
        if not self.health:
            return None
        if not self.health.get("ai_found"):
            raise PatchwireError(f"the AI command {self.health.get('ai_command')!r} is not found on the box",
                                 "install Claude Code on the box (npm install -g @anthropic-ai/claude-code) "
                                 "or set [ai] command in the agent's config")
        if isinstance(self.health.get("ai"), str):  # the box's built-in stand-in
            return f"the box runs the {self.health['ai']}: each ask adds its prompt to PATCHWIRE_DEMO.md"
        return f"{self.health.get('ai_command')} found on the box"

    def sandbox(self) -> Optional[str]:
        if "sandbox" not in self.health:
            return None
        if self.health.get("sandbox_warning"):
            raise PatchwireError(str(self.health["sandbox_warning"]),
                                 "install bubblewrap on the box (apt install bubblewrap), or set "
                                 '[ai] sandbox = "none" in the agent\'s config to accept it')
        kind = self.health["sandbox"]
        if kind == "none":
            return 'the AI runs unconfined on the box ([ai] sandbox = "none")'
        return f"the AI runs confined to its job folder by {kind}"

    def ssh(self) -> Optional[str]:
        if not self.cfg.ssh:
            return None
        argv = [*self.cfg.ssh_argv(), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                self.cfg.ssh, "rsync", "--version"]
        proc = run(argv, timeout=30, check=False, hint="install OpenSSH's client")
        shown = " ".join(shlex.quote(a) for a in [*self.cfg.ssh_argv(), self.cfg.ssh])
        said = fold_returns(proc.stderr.decode(errors="replace")).strip()[-300:]
        if proc.returncode == 255:
            raise PatchwireError(f"cannot log in with `{shown}`: {said}", ssh_failure_hint(self.cfg, said))
        if proc.returncode != 0 and b"rrsync" in proc.stderr:  # a team box's key runs rrsync only
            return f"{shown} works; this key may only rsync into your folder there (rrsync)"
        if proc.returncode != 0:
            raise PatchwireError(f"rsync is missing on {self.cfg.ssh}",
                                 "install rsync on the box (Debian/Ubuntu: sudo apt install rsync)")
        return f"{shown} works; rsync is installed there"

    def mirror(self) -> Optional[str]:
        stuck = self.me.get("unwritable")
        if stuck and isinstance(stuck, list):
            raise PatchwireError(f"the box cannot write its folder(s) {', '.join(map(str, stuck[:4]))}: "
                                 "syncs and asks there fail",
                                 "ask the box's admin to run `patchwire-agent doctor` there (it names the fix)")
        if self.cfg.ssh or not self.me.get("mirror"):
            return None
        path = Path(self.me["mirror"])
        if not os.access(path, os.W_OK):
            raise PatchwireError(f"the mirror folder {path} is not writable by you",
                                 "run the agent as your user, or use --ssh")
        return f"local mirror {path} is writable"


# ================================================================== commands
# Each cmd_* takes the parsed arguments and returns the exit status. Its result goes through
# output(): one JSON document on stdout with --json, otherwise the human printer it is given;
# progress and warnings go to stderr (say()).


def cmd_init(args) -> int:
    root = Path.cwd()  # where it is run, a monorepo's subfolder too: that folder is the project
    path = root / CONFIG_NAME
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists already", "use --force to replace it")
    if args.token_file is None:
        if not sys.stdin.isatty() or args.json:
            raise UsageError("--token-file is required when not asking interactively",
                             "patchwire init --agent URL --token-file PATH [--ssh USER@HOST]")
        ask_init_values(args, root)
    token_file = Path(os.path.expanduser(args.token_file)).resolve()
    if not token_file.is_file():
        raise UsageError(f"the token file {token_file} does not exist",
                         "the box printed your token once (`patchwire-agent init` or `user add`): put it "
                         f"there (mkdir -p {shlex.quote(str(token_file.parent))}; install -m 600 /dev/null "
                         f"{shlex.quote(str(token_file))}; then paste it in)")
    data: Dict[str, Any] = {"agent": args.agent, "token_file": str(token_file)}
    if args.ssh:
        data["ssh"] = args.ssh
    data["project"] = args.project or default_project_name(root)
    cfg = LaptopConfig(root, data, path)  # validates before anything is written
    warn_broad_root(root, args.interactive_answers)
    if not args.interactive_answers:  # the interactive init runs doctor, which asks the same
        check_project_allowed(cfg)
    if args.interactive_answers:
        checks = Doctor(cfg).run()
        print_checks(checks)
        if not all(c["ok"] for c in checks) and read_answer("Write the config anyway? [y/N]") != "y":
            raise UsageError("nothing written; fix what doctor reported and run init again")
    write_whole(path, "# Patchwire: where this project's AI runs. No secrets here: the token\n"
                "# stays in token_file (or PATCHWIRE_TOKEN).\n" + dump_toml(data), mode=0o644)  # never through a link
    Trust.record(path, data)  # written by you: trusted (Trust)
    say(f"wrote {path} (project {cfg.project}, agent {cfg.agent}, "
        f"{'mirror over ssh ' + cfg.ssh if cfg.ssh else 'local mirror'})")
    say('next: patchwire doctor, patchwire sync --dry-run, then patchwire ask "..."')
    output(args, {"config": str(path), **data})
    return 0


def warn_broad_root(root: Path, interactive: bool) -> None:
    """A project in the home folder or / would send everything under it to the box."""
    if root.resolve() not in (Path.home().resolve(), Path("/")):
        return
    what = "your home folder" if root.resolve() == Path.home().resolve() else "the root folder"
    say(f"warning: {root} is {what}: as a project, every file under it that git does not ignore goes "
        "to the box; run init in the project's own folder")
    if interactive and read_answer(f"Make all of {what} one project? [y/N]") != "y":
        raise UsageError("nothing written; cd into the project's folder and run init there")


def check_project_allowed(cfg: LaptopConfig) -> None:
    """The box's project allowlist, asked before the config is written: a name it refuses is
    an error now, not at the first ask. An agent that cannot be asked yet is only said."""
    try:
        Client(cfg.agent, cfg.token(), ca_file=cfg.ca_file, token_source=cfg.token_source()).me(cfg.project)
    except AgentError as e:
        if e.http_status == HTTPStatus.FORBIDDEN:
            raise UsageError(f"the box does not take project {cfg.project}: {e.message}",
                             "pick a name it allows with --project NAME, or ask the box's admin") from None
        say(f"note: could not check project {cfg.project} with the agent: {e.message}")
    except PatchwireError as e:
        say(f"note: could not check project {cfg.project} with the agent: {e.message} (patchwire doctor tells more)")


def ask_init_values(args, root: Path) -> None:
    """Interactive init: each value with a sensible default (Enter keeps it)."""
    def ask(question: str, default: Optional[str]) -> Optional[str]:
        answer = read_answer(f"{question} [{default or 'none'}]:")
        if answer is None:
            raise UsageError("no answer; nothing written")
        return answer or default
    say("Setting up Patchwire for " + str(root))
    args.agent = ask("Agent URL", args.agent)
    args.token_file = ask("Token file", os.path.join("~", ".config", "patchwire", "token"))
    args.ssh = ask("SSH destination of the box (USER@HOST, none for this machine)", args.ssh)
    if args.ssh in ("none", "-"):
        args.ssh = None
    args.project = ask("Project name on the box", args.project or default_project_name(root))
    args.interactive_answers = True


def cmd_sync(args) -> int:
    if args.list and not args.dry_run:
        raise UsageError("--list goes with --dry-run", "patchwire sync --dry-run --list")
    session = Session.here()
    if args.dry_run:
        report = dry_run_report(session.project.scan(session.rules))
        output(args, report, lambda r: page(render_dry_run(r, args.list)))
        return 0
    synced = session.sync(force=args.force)
    output(args, {"tree": synced.tree, **synced.counts})
    return 0


def dry_run_report(files: FileList) -> dict:
    """What `sync --dry-run` tells: the list, what stays and why, totals by top-level folder,
    and warnings (heavy folders git does not ignore, allow patterns that match nothing)."""
    folders: Dict[str, List[int]] = {}
    for path in files.paths:
        top = path.split("/", 1)[0] + "/" if "/" in path else "./"
        totals = folders.setdefault(top, [0, 0])
        totals[0] += 1
        totals[1] += files.size(path)
    warnings = []
    for folder, (count, size) in sorted(files.heavy.items(), key=lambda kv: -kv[1][1]):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        warnings.append(f"{folder} is not ignored by git: {count} file(s), {human_bytes(size)} would go; "
                        f"to leave it out for Patchwire only, add `exclude = [{json.dumps(name + '/')}]` "
                        "under [sync] in .patchwire.toml")
    for pattern in files.unused_allow:
        warnings.append(f"[sync] allow pattern {json.dumps(pattern)} matches no file git lists: files git "
                        "ignores are never sent (un-ignore them in .gitignore with a `!` line)")
    return {"files": files.paths, "held_back": files.held, "warnings": warnings,
            "totals": {"files": len(files.paths), "bytes": sum(files.size(p) for p in files.paths),
                       "held_back": len(files.held), "outside_sparse_checkout": files.outside_sparse,
                       "folders": {k: {"files": v[0], "bytes": v[1]} for k, v in folders.items()}}}


def render_dry_run(report: dict, full: bool, limit: int = 40) -> List[str]:
    """The dry run for people: the list only when asked, the totals last (they scroll away
    otherwise), every name escaped."""
    lines = [sanitize(p) for p in report["files"]] if full else []
    held = list(report["held_back"].items())
    for path, why in held if full else held[:limit]:
        lines.append(f"held back: {sanitize(path)} ({why})")
    if len(held) > limit and not full:
        lines.append(f"held back: ... and {len(held) - limit} more (--list shows all)")
    lines += ["warning: " + w for w in report["warnings"]]
    totals = report["totals"]
    folders = sorted(totals["folders"].items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
    width = max([len(sanitize(k)) for k, _ in folders[:12]] + [8])
    lines.append("by top-level folder:")
    for name, t in folders[:12]:
        lines.append(f"  {sanitize(name).ljust(width)} {t['files']:>8,} file(s) {human_bytes(t['bytes']):>10}")
    if len(folders) > 12:
        rest = folders[12:]
        lines.append(f"  {'(' + str(len(rest)) + ' more)':<{width}} {sum(t['files'] for _, t in rest):>8,} "
                     f"file(s) {human_bytes(sum(t['bytes'] for _, t in rest)):>10}")
    if totals.get("outside_sparse_checkout"):
        lines.append(f"not here, not sent: {totals['outside_sparse_checkout']:,} tracked file(s) outside your sparse "
                     "checkout (`git sparse-checkout add FOLDER` brings a folder's in)")
    lines.append(f"would send {totals['files']:,} file(s), {human_bytes(totals['bytes'])}; "
                 f"{totals['held_back']} held back" + ("" if full else " (--list lists every file)"))
    return lines


def cmd_ask(args) -> int:
    began = time.monotonic()
    session = Session.here()
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if args.attempts != 1 or args.pick or args.take or args.agents:
        return ask_attempts(session, args, prompt)
    opts = ApplyOptions.of(args)
    session.client.on_wait = lambda quiet: say(f"still waiting for the box ({quiet:.0f} s without news)")
    fields = ask_fields(session, args, prompt)
    job, events = ask_job(session, fields)
    if args.detach:
        session.remember_detached(job)
        return detach(opts, job, events)
    end, patch = follow_job(session, opts, job, events, began)
    failed = [run for run in (end.get("checks") or {}).get("runs", []) if not run["ok"]]
    if args.fix_checks and failed:  # once: the AI gets the failing output and the checks run again
        say(f"{len(failed)} check(s) failed; asking the AI once to fix them (a follow-up of job {job})")
        follow_up = {k: v for k, v in fields.items() if k != "setup"}  # setup ran for the first
        job, events = ask_job(session, {**follow_up, "prompt": fix_checks_prompt(failed), "continue": job})
        end, patch = follow_job(session, opts, job, events, began)
    return offer_change(session, opts, job, patch, end)


def ask_job(session: Session, fields: dict) -> Tuple[str, Iterator[dict]]:
    """Sync and ask (`fields`: ask_fields'): (the job, its events from the first on), the job
    remembered here."""
    first, events, tree = start_ask(session, fields)
    session.remember_job(first["job"])
    session.record_job_tree(first["job"], tree)

    def chain():
        yield first
        yield from events
    return first["job"], chain()


def detach(opts: ApplyOptions, job: str, events: Iterator[dict]) -> int:
    """`ask --detach`: the box holds the job; the laptop lets go of its stream and says how to
    come back (`wait`) and how to stop it (`cancel`)."""
    close = getattr(events, "close", None)
    if close:
        close()  # the stream's reader thread and socket end with it; the job does not
    say(f"job {job} is queued on the box; the laptop can go.\n"
        f"  `patchwire wait {job}` follows it and offers its change when it is done\n"
        f"  `patchwire cancel {job}` stops it")
    output(opts, {"type": "outcome", "job": job, "detached": True, "applied": False})
    return 0


def follow_and_apply(session: Session, opts: ApplyOptions, job: str, events: Iterator[dict], began: float,
                     after: int = 0) -> int:
    """Follow a job to its end, then preview and offer its change: `wait` (and `ask`)."""
    end, patch = follow_job(session, opts, job, events, began, after)
    return offer_change(session, opts, job, patch, end)


def follow_job(session: Session, opts: ApplyOptions, job: str, events: Iterator[dict], began: float,
               after: int = 0) -> Tuple[dict, bytes]:
    """Follow a job's events to its end: (its `finished` event, its patch); AIFailed when it
    failed or was cancelled. A long wait ends with a desktop notification (`notify_desktop`)."""
    printer = ProgressPrinter(Style.for_stream(sys.stderr, opts.no_color))

    def on_event(event: dict) -> None:
        printer(event)
        output(opts, event)
    end = stream_job(session, events, on_event, job=job, after=after)
    patch: Optional[bytes] = None
    try:
        if end["type"] == "finished":
            patch = patiently(lambda: session.job_diff(job), f"job {job}'s diff")
    finally:
        if not opts.json:  # a program reading --json (the editor) tells its user itself
            notify_desktop(session.cfg, job, end, patch, time.monotonic() - began)
    if patch is None:
        raise AIFailed(f"job {job} {end['type']}: {end.get('reason', '')}",
                       f"see `patchwire show {job}`; nothing was changed here")
    return end, patch


def offer_change(session: Session, opts: ApplyOptions, job: str, patch: bytes, end: dict) -> int:
    """A finished job's change: previewed under its checks and applied on Enter (or --yes);
    with --json, the outcome line, applied only with --yes. --require-checks offers nothing
    the box's checks did not pass on this very patch (exit 6)."""
    done = session.open_apply(job)
    if done:  # `wait` for a job applied since: applying it again would merge it with itself
        say(f"job {job} is already applied here (at {when(done['time'])}); nothing changed")
        output(opts, {"type": "outcome", "job": job, "applied": False, "already": True})
        return 0
    reading = session.reading(patch, job)
    files = reading.files
    receipt = end.get("checks")
    outcome = {"type": "outcome", "job": job, "applied": False, "files": [f.path for f in files],
               "look_closely": look_closely(files), **checks_outcome(receipt, patch)}
    held = opts.require_checks and not outcome.get("checks", {}).get("passed")
    if not patch:
        say(f"the AI made no changes (job {job}); nothing to apply")
    elif not opts.json:
        preview(reading, opts.no_color, heading=checks_heading(receipt, patch, Style.for_stream(sys.stdout, opts.no_color)))
    files = reading.finish()  # every file read, vetted and computed before anything is offered
    if patch and held:
        say(f"not offering to apply job {job}: {checks_refusal(receipt, patch)} (--require-checks); see "
            f"`patchwire show {job}`, or apply it anyway with `patchwire apply {job}`")
    elif patch and opts.json and opts.yes:
        outcome.update(applied=True, apply=apply_job(session, job, patch, read=files))
    elif patch and not opts.json:
        outcome["applied"] = confirm_apply(session, opts, job, patch, files)
    output(opts, outcome)
    return ExitStatus.CHECKS if held else 0


def fix_checks_prompt(failed: List[dict]) -> str:
    """The follow-up prompt of `ask --fix-checks`: each failed check's command and output tail
    (the box's own text, going back to the box's AI; capped by the receipt's checks)."""
    parts = ["These checks failed on your change. Fix the code so that they pass; do not change the "
             "checks themselves or weaken the tests."]
    for run in failed:
        said = "timed out" if run.get("timed_out") else f"exited with status {run.get('exit_code')}"
        parts.append(f"$ {run['command']}\n({said}) its output ends with:\n{str(run.get('tail') or '')[-4000:]}")
    return "\n\n".join(parts)


def checks_outcome(receipt: Optional[dict], patch: bytes) -> dict:
    """{"checks": ...} for --json: each check's name, ok, exit code and duration, whether
    all passed, and whether the box's receipt names this very patch (by its sha256)."""
    if receipt is None:
        return {}
    runs = [{k: run.get(k) for k in ("name", "command", "ok", "exit_code", "duration_ms", "timed_out")}
            for run in receipt["runs"]]
    matches = receipt["patch_sha256"] == hashlib.sha256(patch).hexdigest()
    return {"checks": {"passed": matches and all(run["ok"] for run in runs), "matches_patch": matches,
                       "tree": receipt["tree"], "patch_sha256": receipt["patch_sha256"], "runs": runs}}


def checks_summary(receipt: dict) -> str:
    """"checks: format ok, analyze ok, test FAILED" (names from the box: sanitised by the caller)."""
    words = {True: "ok", False: "FAILED"}
    parts = [f"{run['name']} " + ("TIMED OUT" if run.get("timed_out") else words[bool(run["ok"])])
             for run in receipt["runs"]]
    return "checks: " + (", ".join(parts) if parts else "none ran")


def checks_refusal(receipt: Optional[dict], patch: bytes) -> str:
    """Why the checks do not vouch for `patch`, in words."""
    if receipt is None:
        return "the box ran no checks"
    if receipt["patch_sha256"] != hashlib.sha256(patch).hexdigest():
        return "the box's checks ran on another patch than this one"
    failed = [sanitize(run["name"]) for run in receipt["runs"] if not run["ok"]]
    return f"check(s) {', '.join(failed)} failed" if failed else "no check ran"


def checks_heading(receipt: Optional[dict], patch: bytes, style: Style) -> List[str]:
    """The preview's first line: the checks and how they did on this very patch."""
    if receipt is None:
        return []
    passed = checks_outcome(receipt, patch)["checks"]["passed"]
    line = sanitize(checks_summary(receipt) + box_source(receipt))
    if receipt["patch_sha256"] != hashlib.sha256(patch).hexdigest():
        line += " (ran on ANOTHER patch than the one shown: not to be trusted)"
    return [style("green" if passed else "red", line), ""]


def cmd_wait(args) -> int:
    """Reattach to jobs of yours (named, or all queued and running ones of this project), one
    after the other: each is followed from where it is now, then offered as `ask` offers it.
    The exit status is the last failure's (4 when a job failed), else 0."""
    began, opts = time.monotonic(), ApplyOptions.of(args)
    session = Session.here()
    session.client.on_wait = lambda quiet: say(f"still waiting for the box ({quiet:.0f} s without news)")
    jobs = jobs_to_wait_for(session, args.jobs)
    if opts.yes and not args.jobs:  # --yes applies unseen only what this laptop asked for
        known = session.known_jobs()
        elsewhere = [job["id"] for job in jobs if job["id"] not in known]
        if elsewhere:
            say(f"left out {len(elsewhere)} job(s) not asked from here ({', '.join(elsewhere[:5])}): --yes applies "
                "unseen only jobs asked here; name a job to wait for it (`patchwire wait JOB`)")
        jobs = [job for job in jobs if job["id"] in known]
    if not jobs:
        say(f"no queued or running job of yours in project {session.cfg.project}, and none detached "
            "here; `patchwire jobs` lists them all")
        output(args, {"type": "outcome", "jobs": []})
        return 0
    status = 0
    for job in jobs:
        seen = job.get("events", 0)  # a record may leave out what it need not have (checked_job)
        say(sanitize(f"following job {job['id']} ({job['status']}, asked "
                     f"{human_age(time.time() - job.get('created', time.time()))} "
                     f"ago): {clip_words(' '.join(str(job.get('prompt', '')).split()), 60)}"))
        events = session.client.events(job["id"], seen)
        try:
            status = follow_and_apply(session, opts, job["id"], events, began, after=seen) or status
            session.forget_detached(job["id"])
        except AIFailed as e:
            session.forget_detached(job["id"])
            if len(jobs) == 1:
                raise
            say(sanitize(f"patchwire: {e}", keep_newlines=True))
            status = int(e.exit_status)
    return status


def jobs_to_wait_for(session: Session, given: Sequence[str]) -> List[dict]:
    """The named jobs (prefixes resolved once: Session.resolve_job); else every queued and running job of
    this user in this project, and the jobs detached here that ended since, oldest first."""
    if given:
        jobs = [session.job_record(session.resolve_job(name)) for name in given]
        for job in jobs:
            if job.get("project") != session.cfg.project:  # its change belongs to that project's files
                raise UsageError(sanitize(f"job {job['id']} is of project {job.get('project')}, not "
                                          f"{session.cfg.project}"), "run `patchwire wait` in that project's folder")
        return jobs
    detached = set(session.detached())
    mine = [job for job in session.client.jobs() if job.get("project") == session.cfg.project
            and (job["status"] in ("queued", "running") or job["id"] in detached)]
    return sorted(mine, key=lambda job: job.get("created", 0))


def start_ask(session: Session, fields: dict) -> Tuple[dict, Iterator[dict], str]:
    """Sync and POST the ask with the project's record held until the box has accepted it
    (made its snapshot): an ask started meanwhile would tell the box a base this one moves
    the box on from. The AI's run is not held: parallel asks run side by side."""
    with session.project.record_lock():
        return sync_and_post(session, fields)


def sync_and_post(session: Session, fields: dict) -> Tuple[dict, Iterator[dict], str]:
    """Sync, POST the ask; when the box's copy differs (409): after a sync of changes only
    (the box does not hold the record they start from: a new box, its state reset, another
    laptop), send every file compared by checksum; after a full one, send the paths it names
    again. Retry once; if they differ again, they move under our feet: say so."""
    synced = session.sync(inline=True)
    try:
        return post_ask(session, ask_body(session, synced, fields), synced) + (synced.tree,)
    except AgentError as e:
        paths = mismatched_paths(e)
    finally:
        synced.settle()
    if synced.base is not None:
        why = f"differs from what was sent in {describe_paths(paths)}" if paths else "is not the one this laptop last sent"
        say(f"the box's copy {why}; sending every file, compared by checksum")
        synced = session.sync(force=True)
    else:  # the agent names at most 200 paths: past that, compare every file by checksum
        say(f"the box's copy differs from what was sent in {describe_paths(paths)}; sending again")
        synced = session.sync(resend=paths) if 0 < len(paths) < 200 else session.sync(force=True)
    try:
        return post_ask(session, ask_body(session, synced, fields), synced) + (synced.tree,)
    except AgentError as e:
        paths = mismatched_paths(e)
    raise PatchwireError(f"the box's copy still differs from what was sent in {describe_paths(paths)}, "
                         "after sending it again", "did it change while it was being sent (a watcher, "
                         "an editor's autosave)? stop that and ask again", details={"paths": paths})


def ask_body(session: Session, synced: "Synced", fields: dict) -> dict:
    """The POST /v1/ask body: the project, what this sync left on the box, and `fields`."""
    return {"project": session.cfg.project, **synced.ask_fields(session.project), **fields}


def ask_fields(session: Session, args, prompt: str) -> dict:
    """The ask's fields the command line decides, read here once by the command (the code
    below it takes them as they are): the prompt, its timeout, the job it continues, the
    project's [box] and --setup, several attempts."""
    out: dict = {"prompt": prompt}
    if args.timeout:
        out["timeout_s"] = args.timeout
    out.update(box_fields(session.cfg, args))
    if args.on or args.continue_:
        out["continue"] = args.on or session.job_id(None)
    out.update(attempt_fields(args))
    return out


def box_fields(cfg: LaptopConfig, args) -> dict:
    """The ask's `box` ([box] of .patchwire.toml: setup and checks) and `setup` (--setup)."""
    box = cfg.box
    # the box may have setup and checks of its own for the project ([projects.NAME]): --setup
    # and --require-checks without any here are the box's to judge
    fields: dict = {"box": {k: v for k, v in box.items() if k in cfg.box_written}} if box["setup"] or box["checks"] else {}
    if args.setup:
        fields["setup"] = True
    return fields


def post_ask(session: Session, body: dict, synced: Synced) -> Tuple[dict, Iterator[dict]]:
    events = session.client.ask(body)
    first = checked_first(next(events))
    session.mark_indexed(synced)
    return first, events


def mismatched_paths(e: AgentError) -> List[str]:
    """The paths of a 409 tree_mismatch; any other refusal goes on up."""
    if e.code != CODE_TREE_MISMATCH:
        raise e
    return [str(p) for p in e.details.get("paths") or []]


def checked_first(event: dict) -> dict:
    """The ask's first event names the new job: its id becomes a file name and a key here."""
    if not isinstance(event, dict):
        raise AgentError("the agent's first event is not a JSON object")
    check_job_id(event.get("job"))
    return event


def ask_before_applying(job: str) -> Optional[str]:
    """"" to apply, "i" to choose hunks, None to keep the job for later."""
    answer = read_answer("Enter applies this change here; i and Enter chooses files and hunks; anything "
                         f"else keeps it for later (`patchwire apply {job}`).")
    if answer in ("", "i"):
        return answer
    say(f"kept job {job}; apply it with `patchwire apply {job}`")
    return None


def confirm_apply(session: Session, opts: ApplyOptions, job: str, patch: bytes, read: List[FilePatch]) -> bool:
    if opts.no_apply:
        say(f"not applied; apply later with `patchwire apply {job}`")
        return False
    if not opts.yes and not sys.stdin.isatty():  # the same rule as `apply`: no terminal, no yes
        say(f"kept job {job}, not applied: stdin is not a terminal to confirm on; pass --yes to apply "
            f"without asking: `patchwire apply {job} --yes`")
        return False
    answer = "" if opts.yes else ask_before_applying(job)
    if answer is None:
        return False
    apply_job(session, job, patch, read=read, interactive=answer == "i", overwrite=False if opts.yes else None,
              no_color=opts.no_color)
    return True


def cmd_diff(args) -> int:
    session = Session.here()
    job = session.resolve_job(args.job)
    if args.file:
        return show_job_file(session, job, args.file, args.side, as_json=args.json)
    patch = session.job_diff(job)  # kept: what is reviewed now is what a later apply reads
    if not args.json and sys.stdout.isatty():  # a person reads it: sanitised, like the preview
        preview(session.reading(patch, job), args.no_color)
        return 0
    files = session.vet(patch, job)
    if args.json:
        listed = [{"path": f.path, "old_path": f.old_path, "kind": f.kind, "added": f.added,
                   "removed": f.removed, "binary": f.binary} for f in files]
        body = {"sha256": hashlib.sha256(patch).hexdigest()}  # `apply --sha256` applies these bytes only
        try:
            body["patch"] = patch.decode("utf-8")
        except UnicodeDecodeError:
            body["patch_base64"] = base64.b64encode(patch).decode()
        output(args, {"job": job, "files": listed, "look_closely": look_closely(files), **body,
                      **job_review(session, job, patch)})
        return 0
    sys.stdout.buffer.write(patch)  # a pipe gets the exact bytes, for git apply or a file
    sys.stdout.flush()
    return 0


def job_review(session: Session, job_id: str, patch: bytes) -> dict:
    """{"network": the job's egress report, "checks": its checks} for a review beside the diff
    (the VS Code review's quick pick shows them); {} when the job has none, or the box cannot
    be asked now (the diff itself is kept on the laptop and reviewable without the box)."""
    try:
        result = session.job_record(job_id).get("result")
    except PatchwireError:
        return {}
    result = result if isinstance(result, dict) else {}
    network = result.get("network")
    return {**({"network": network} if network_summary(network) else {}),
            **checks_outcome(result.get("checks"), patch)}


def show_job_file(session: Session, job_id: str, path: str, side: str, *, as_json: bool) -> int:
    """`diff JOB --file PATH --side old|new`: one file as it was synced, or as the job leaves
    it, for an editor's side-by-side view (the VS Code extension's diff editor)."""
    tree = session.job_tree(job_id) or ""  # our record, never the box's
    if not session.project.recorded(tree):
        raise PatchwireError(f"the files job {job_id} started from are not recorded in "
                             "this project", "run this in the project the job was asked from")
    if side == "new":
        patch = session.job_diff(job_id)  # the one kept for review, which Apply writes
        session.vet(patch, job_id)  # refused here as everywhere else: the editor shows no other result
        tree = tree_after_patch(session.project, tree, patch, job_id)
    found = session.project.recorded_file(tree, path)
    data, mode = found or (b"", "")
    if not as_json:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    body = {"exists": found is not None, "mode": mode, "binary": b"\0" in data[:8000]}
    try:
        body["text"] = data.decode("utf-8")
    except UnicodeDecodeError:
        body["base64"] = base64.b64encode(data).decode()
    output(ApplyOptions(json=True), {"job": job_id, "path": path, "side": side, **body})
    return 0


def tree_after_patch(project: Project, tree: str, patch: bytes, job: str) -> str:
    """The tree `patch` makes of `tree`: git's own apply in a throwaway index (never the
    worktree), so there is no second patch applier. The index is per process: an editor
    asks for several files at once."""
    after, stderr = project.git.tree_after_patch(tree, patch, project.private_dir / f"show-{os.getpid()}.index")
    if after is None:
        raise PatchError(f"job {job}'s patch does not apply to the files it started from:\n"
                         + describe_apply_failure(stderr))
    return after


def cmd_apply(args) -> int:
    session = Session.here()
    if args.undo:
        return undo_last_apply(session, args)
    if not args.yes and (args.json or not (args.interactive or sys.stdin.isatty())):
        raise UsageError("patchwire apply shows the change and asks before it writes, and stdin is not a "
                         "terminal: run it in a terminal, or pass --yes to apply without asking (scripts)",
                         "patchwire apply JOB --yes [--only PATH ...] [--json]")
    job_id = session.resolve_job(args.job)
    job = session.job_record(job_id)
    if job.get("project", session.cfg.project) != session.cfg.project:
        raise UsageError(f"job {job_id} was asked in project {sanitize(str(job['project']))!r}, not in "
                         f"{sanitize(session.cfg.project)!r} here: nothing was applied",
                         f"run `patchwire apply {job_id}` in that project; to take its change here anyway, "
                         f"`patchwire diff {job_id} > change.patch`, read it, then `git apply change.patch`")
    if job.get("status") != "done":
        raise AIFailed(f"job {job_id} is {sanitize(str(job.get('status')))}: nothing to apply",
                       sanitize(str(job.get("reason") or "")))
    done = None if (args.only or args.exclude or args.interactive) else session.open_apply(job_id)
    if done:  # applying it again would 3-way merge the change with itself
        say(f"job {job_id} is already applied here (at {when(done['time'])}); nothing changed "
            "(`patchwire log` lists applies; `patchwire apply --undo` reverts the last one)")
        output(args, {"job": job_id, "how": "already", "files": [], "conflicts": [], "applied_at": done["time"]})
        return 0
    patch = session.job_diff(job_id, args.sha256)
    if not patch:
        say(f"job {job_id} made no changes; nothing to apply")
        output(args, {"job": job_id, "how": "none", "files": [], "conflicts": []})
        return 0
    reading = session.reading(patch, job_id)
    style = Style.for_stream(sys.stderr, args.no_color)
    chosen, interactive = None, args.interactive
    if not args.yes and not interactive:
        chosen = patch if not (args.only or args.exclude) else choose(
            reading.finish(), patch, interactive=False, only=args.only or (), exclude=args.exclude or (), style=style)
        preview(reading if chosen is patch else split_patch(chosen), args.no_color)
        answer = ask_before_applying(job_id)
        if answer is None:
            output(args, {"job": job_id, "how": "none", "files": [], "conflicts": []})
            return 0
        if answer == "i":
            chosen, interactive = None, True
    # files in the way of a new file or a rename: replaced when the flag says so, asked about on
    # a terminal, refused under --yes (scripts, VS Code) naming them and the flag
    overwrite = True if args.overwrite_untracked else False if args.yes else None
    files = reading.finish()  # every file read, vetted and computed: what preview() left, or all of it
    result = apply_job(session, job_id, patch, chosen=chosen, read=files, interactive=interactive, only=args.only or (),
                       exclude=args.exclude or (), keep_conflicts=args.keep_conflicts or None,
                       overwrite=overwrite, no_color=args.no_color)
    output(args, result, lambda r: print("\n".join(map(sanitize, r["files"]))))
    return 0


def cmd_jobs(args) -> int:
    session = Session.here()
    jobs = session.client.jobs()
    if not jobs:
        say("no jobs yet")
    output(args, {"jobs": jobs, "project": session.cfg.project},  # `project`: this one's name on the box
           lambda r: print("\n".join([JOBS_HEADER] + [job_line(j) for j in r["jobs"]])) if jobs else None)
    return 0


JOBS_HEADER = f"{'JOB':<12}  {'STATUS':<9} {'ASKED':>8}  {'PROJECT':<16} {'CHANGE':<10} PROMPT"


def job_line(job: dict) -> str:
    stats = job.get("stats") or {}
    asked = human_age(time.time() - job.get("created", time.time())) + " ago"
    size = f"+{stats.get('added', 0)} -{stats.get('removed', 0)}" if stats else ""
    prompt = attempt_label(job) + " ".join(str(job.get("prompt", "")).split())[:50]
    return sanitize(f"{job['id']:<12}  {job['status']:<9} {asked:>8}  {job.get('project', ''):<16} {size:<10} {prompt}")


def cmd_show(args) -> int:
    """The job, then its events as they arrive: a job's events may run to hundreds of MB, so
    none is kept once shown (with --json, the one document is written piece by piece)."""
    session = Session.here()
    job = session.client.job(session.job_id(args.job))
    events = session.client.events(job["id"], 0, follow=False)
    if args.json:
        sys.stdout.write('{"job": ' + json.dumps(job) + ', "events": [')
        try:
            for n, event in enumerate(events):
                sys.stdout.write((", " if n else "") + json.dumps(event))
        except PatchwireError:
            print(flush=True)  # the unfinished document ends its line; the error's object follows
            raise
        print("]}", flush=True)
        return 0
    for key in ("id", "status", "project", "reason", "ask_id", "attempt", "prompt"):
        if job.get(key):
            print(f"{key + ':':<9} {sanitize(str(job[key]), keep_newlines=True)}")
    show_siblings(session, job)
    for key, value in (job.get("result") or {}).items():
        if key == "network":
            print(sanitize(network_summary(value).replace("network ", "network: ", 1), keep_newlines=True))
        elif key in ("checks", "setup") and value is not None:
            print(sanitize(box_steps_said(key, value), keep_newlines=True))
        elif value is not None:
            print(sanitize(f"{key + ':':<9} {human_value(value)}", keep_newlines=True))
    printer = ProgressPrinter(Style(False))
    for event in events:
        printer(event)
    return 0


def box_steps_said(key: str, value: dict) -> str:
    """`show`'s lines for a job's setup and checks (their output's tail after a failure)."""
    if key == "setup":
        ran = f"ran ({value.get('why', '')}) in {human_value(value.get('duration_ms', 0) / 1000)} s" if value[
            "ran"] else f"not run ({value.get('why', '')})"
        lines = [f"{'setup:':<9} {ran}" + box_source(value)]
    else:
        lines = [f"{'checks:':<9} {checks_summary(value).partition(': ')[2]} (on tree {value['tree'][:12]}, "
                 f"patch sha256 {value['patch_sha256'][:12]})" + box_source(value)]
    for run in value.get("runs") or []:
        if run.get("ok") is False or (key == "setup" and run.get("exit_code") not in (0, None)):
            tail = str(run.get("tail") or "").rstrip()[-2000:]
            lines.append(f"          {run.get('name') or run.get('command')} exit {run.get('exit_code')}:\n"
                         + "\n".join("            " + line for line in tail.splitlines()))
    return "\n".join(lines)


def box_source(value: dict) -> str:
    """Whose [box] ran: nothing for the project's own, else the box's rule that set it."""
    source = value.get("source")
    return f", set by the box's {source}" if source and source != "project" else ""


def human_value(value: Any) -> str:
    """A JSON value as a person reads it: yes/no, not True/False; no Python reprs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {human_value(v)}" for k, v in value.items() if v is not None) or "-"
    if isinstance(value, list):
        return ", ".join(human_value(v) for v in value) or "-"
    return str(value)


def cmd_cancel(args) -> int:
    session = Session.here()
    job = session.client.cancel(session.job_id(args.job))
    say(sanitize(f"job {job['id']} is {job['status']}"))
    output(args, {"job": job})
    return 0


def cmd_notify(args) -> int:
    """Where the box tells you a job ended: `add URL`, `list`, `remove ID`, `test [ID]`."""
    return NOTIFY_ACTIONS[args.action](Session.here(), args)


def notify_add(session: Session, args) -> int:
    if not args.target:
        raise UsageError("notify add needs the receiver's URL", "patchwire notify add https://HOST/PATH [--kind ...]")
    body: Dict[str, Any] = {"url": args.target, "events": args.on or ["end"], "include": args.include or []}
    if args.kind:
        body["kind"] = args.kind
    answer = session.client.notify_add(body)
    target = answer["target"]
    say(sanitize(f"added {target['kind']} target {target['id']} ({target['url']}): on {', '.join(target['events'])}"
                 + (f", with {', '.join(target['include'])}" if target["include"] else "")))
    if answer.get("secret"):  # shown this once: the box never gives it again
        say("its signing secret, shown only now (keep it where your receiver verifies signatures; "
            "README: \"Verifying a webhook\"):")
    output(args, answer, lambda r: print(sanitize(r["secret"])) if r.get("secret") else None)
    return 0


def notify_list(session: Session, args) -> int:
    targets = session.client.notify_targets()
    if not targets:
        say("no notification targets; `patchwire notify add URL` adds one")
    output(args, {"targets": targets}, lambda r: print("\n".join(sanitize(
        f"{t['id']}  {t['kind']:<7}  {t['url']}  on {','.join(t['events'])}"
        + (f"  with {','.join(t['include'])}" if t["include"] else "")) for t in r["targets"])) if targets else None)
    return 0


def notify_remove(session: Session, args) -> int:
    if not args.target:
        raise UsageError("notify remove needs a target id", "`patchwire notify list` lists them")
    target = session.client.notify_remove(args.target)["target"]
    say(sanitize(f"removed target {target['id']} ({target['url']})"))
    output(args, {"target": target})
    return 0


def notify_test(session: Session, args) -> int:
    """One test delivery to each target (or the one named), sent by the box now."""
    ids = [args.target] if args.target else [t["id"] for t in session.client.notify_targets()]
    if not ids:
        raise UsageError("no notification targets to test", "`patchwire notify add URL` adds one")
    results = []
    for target in ids:
        result = {"target": target, **session.client.notify_test(target)}
        results.append(result)
        said = "delivered" if result["ok"] else f"not delivered: {result.get('error') or result.get('status')}"
        say(sanitize(f"target {target}: {said}"))
    output(args, {"results": results})
    return 0 if all(r["ok"] for r in results) else int(ExitStatus.AGENT)


NOTIFY_ACTIONS: Dict[str, Callable[[Session, Any], int]] = {
    "add": notify_add, "list": notify_list, "remove": notify_remove, "test": notify_test}


def undo_last_apply(session: Session, args) -> int:
    """`apply --undo`: one level back, the newest apply. When it was undone already, say so
    and when (as `log` shows it), not that nothing was ever applied."""
    with session.project.record_lock():  # never beside an apply (apply_job)
        journal = UndoLog(session.project).load()
        if journal is None:
            raise nothing_to_undo(session.applied())
        restored = Applier(session.project, Style(False)).undo()
        if journal["state"] == "pending":  # not in the log: the undo's line names it
            entry = {"job": journal["job"], "how": "undo", "files": restored, "conflicts": [], "interrupted": True}
            session.log_apply(entry)
            say(f"restored {len(restored)} file(s) to what they were before the apply of job {journal['job']} "
                "that was stopped half way")
        else:
            entry = session.log_undo(restored)
            say(f"restored {len(restored)} file(s) to what they were before the last apply{log_origin(entry)}")
    output(args, {"restored": restored}, lambda r: print("\n".join(map(sanitize, r["restored"]))))
    return 0


def nothing_to_undo(log: List[dict]) -> UsageError:
    undos = [e for e in log if e["how"] == "undo"]
    if log and undos and log[-1] is undos[-1]:
        return UsageError(f"nothing to undo: the last apply (job {undos[-1]['job']}) was already undone "
                          f"at {when(undos[-1]['time'])}", "`patchwire log` lists what was applied and undone")
    return UsageError("nothing to undo: no apply recorded in this project")


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def cmd_log(args) -> int:
    entries = list(reversed(Session.here().applied()))

    def human(r: dict) -> None:
        for entry in r["applied"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["time"]))
            if entry["how"] == "undo":
                stopped = " (an apply stopped half way)" if entry.get("interrupted") else ""
                what = f"undo of job {entry['job']}{stopped}{log_origin(entry)}: {len(entry['files'])} file(s) restored: "
            else:
                extra = " partial" if entry.get("partial") else ""
                extra += f" conflicts: {', '.join(entry['conflicts'])}" if entry["conflicts"] else ""
                extra += " (undone)" if entry.get("undone") else ""
                extra += log_origin(entry)
                what = f"job {entry['job']}  {entry['how']}{extra}  {len(entry['files'])} file(s): "
            print(sanitize(f"{when}  {what}" + ", ".join(entry["files"][:6])
                           + (" ..." if len(entry["files"]) > 6 else "")))
    output(args, {"applied": entries}, human)
    return 0


def cmd_doctor(args) -> int:
    checks = Doctor(LaptopConfig.find()).run()
    ok = all(c["ok"] for c in checks)
    output(args, {"ok": ok, "checks": checks}, lambda r: print_checks(r["checks"], sys.stdout))
    return 0 if ok else int(ExitStatus.ERROR)


def cmd_trust(args) -> int:
    """The nearest .patchwire.toml's settings that say where things go and what runs, shown,
    then trusted by this account (Trust): a repository's own file is used only after this.
    `--show` only shows them (and their sha256); `--sha256 H` trusts them only if they are
    still the ones shown (an editor asks first, then trusts what the user read)."""
    cfg = LaptopConfig.find(trusted=False)
    data = load_toml(cfg.path)
    digest = Trust.digest(data)
    shown = {"agent": cfg.agent, "token_file": cfg.token_file, "ssh": cfg.ssh, "ca_file": cfg.ca_file,
             "project": cfg.project, "sync.ssh_options": cfg.ssh_options, "sync.rsync": cfg.rsync,
             "sync.allow": cfg.allow, "sync.max_file_mb": cfg.max_file_mb, "sync.submodules": cfg.submodules}
    if args.sha256 is not None and args.sha256 != digest:
        raise UsageError(f"{cfg.path}'s settings changed since they were shown: nothing was trusted",
                         "look at them again (`patchwire trust --show`), then trust what you read",
                         details={"code": "changed", "config": str(cfg.path)})
    if not args.show:
        Trust.record(cfg.path, data)
        say(f"trusted {cfg.path} with these settings (run `patchwire trust` again after you change them):")
    trusted = Trust.holds(cfg.path, data)
    output(args, {"config": str(cfg.path), "trusted": trusted, "sha256": digest, "settings": shown},
           lambda r: print((f"{cfg.path} is {'' if trusted else 'not '}trusted here; its settings:\n"
                            if args.show else "")
                           + "\n".join(sanitize(f"  {k} = {json.dumps(v)}") for k, v in r["settings"].items())))
    return 0


def cmd_usage(args) -> int:
    session = Session.here()
    query = {k: v for k, v in (("since", args.since), ("until", args.until), ("group", args.by)) if v}
    print_usage(args, session.client.usage(query))
    return 0


COMMANDS = {
    "init": (cmd_init, "write .patchwire.toml for this project (asks for the values without flags)"),
    "trust": (cmd_trust, "show the .patchwire.toml's agent, token file, ssh and sync settings and trust "
                         "them (a file you did not write with init: a cloned repository's)"),
    "sync": (cmd_sync, "send the project's files to the agent box"),
    "ask": (cmd_ask, "sync, ask the AI, stream its progress, preview and apply the diff (-n N: several "
                     "attempts side by side, then choose one, or files from several)"),
    "diff": (cmd_diff, "print a job's patch (the last job by default)"),
    "apply": (cmd_apply, "apply a job's patch here (the last job by default)"),
    "jobs": (cmd_jobs, "list your jobs on the agent box"),
    "show": (cmd_show, "show a job and its events"),
    "cancel": (cmd_cancel, "cancel a queued or running job"),
    "wait": (cmd_wait, "follow your running jobs again (all of this project's, or those named), "
                       "then preview and apply as ask does"),
    "log": (cmd_log, "what was applied here, when, from which job"),
    "notify": (cmd_notify, "where the box tells you a job ended: add URL, list, remove ID, test [ID]"),
    "doctor": (cmd_doctor, "check git, rsync, ssh, the agent, the token and the AI; say how to fix"),
    "usage": (cmd_usage, "your asks, AI time, tokens and cost on the agent box"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchwire", description=__doc__.split("\n")[0].split(": ", 1)[1],
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"patchwire {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="results as JSON on stdout (JSON lines for ask's events)")
    p = {name: sub.add_parser(name, help=help_, description=help_, epilog=HELP_EPILOG, parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
         for name, (_, help_) in COMMANDS.items()}
    p["init"].add_argument("--agent", default=DEFAULT_AGENT_URL, help="agent URL (default %(default)s)")
    p["init"].add_argument("--token-file", help="file holding your token (asked for when missing)")
    p["init"].add_argument("--ssh", help="USER@HOST of the box (default: a mirror on this machine)")
    p["init"].add_argument("--project", help="project name on the box (default: folder name)")
    p["init"].add_argument("--force", action="store_true", help="replace an existing .patchwire.toml")
    p["init"].set_defaults(interactive_answers=False)
    p["trust"].add_argument("--show", action="store_true", help="only show the settings and whether they are trusted")
    p["trust"].add_argument("--sha256", metavar="HASH",
                            help="trust only if the settings are still those `--show --json` gave this hash for")
    p["sync"].add_argument("--dry-run", action="store_true", help="list what would be sent, and why files are held back")
    p["sync"].add_argument("--list", action="store_true", help="with --dry-run: every file that would go")
    p["sync"].add_argument("--force", action="store_true",
                           help="send every file, compared by checksum (when the box's copy is off)")
    p["ask"].add_argument("prompt", help="what to ask the AI ('-' reads it from stdin)")
    p["wait"].add_argument("jobs", nargs="*", metavar="JOB",
                           help="job ids or unique prefixes (default: your queued and running jobs here)")
    for name in ("ask", "wait"):
        group = p[name].add_mutually_exclusive_group()
        group.add_argument("--yes", "-y", action="store_true", help="apply without asking")
        group.add_argument("--no-apply", action="store_true", help="only show the diff")
        if name == "ask":
            group.add_argument("--detach", "-d", action="store_true",
                               help="sync and queue the job, print its id and leave (`patchwire wait JOB` "
                                    "picks it up)")
    p["ask"].add_argument("--timeout", type=int, help="seconds the AI may take (up to the box's maximum)")
    p["ask"].add_argument("--setup", action="store_true",
                          help="run [box] setup before the AI even when its inputs did not change")
    p["ask"].add_argument("--require-checks", action="store_true",
                          help="do not offer to apply unless every [box] check passed on the result (exit 6)")
    p["ask"].add_argument("--fix-checks", action="store_true",
                          help="when a [box] check fails, give the AI its output once (a follow-up) and check again")
    follow = p["ask"].add_mutually_exclusive_group()
    follow.add_argument("--continue", dest="continue_", action="store_true",
                        help="continue the last job: start from its result, resume its AI session")
    follow.add_argument("--on", metavar="JOB", help="continue the given job")
    add_attempt_arguments(p["ask"])
    for name in ("ask", "wait", "diff", "apply"):
        p[name].add_argument("--no-color", action="store_true", help="no colour")
    p["diff"].add_argument("--file", metavar="PATH", help="print one file of the job instead of the patch")
    p["diff"].add_argument("--side", choices=("old", "new"), default="new",
                           help="with --file: as synced (old) or as the job leaves it (new, the default)")
    for name in ("diff", "apply", "show", "cancel"):
        p[name].add_argument("job", nargs="?" if name != "cancel" else None, help="job id (a unique prefix is enough)")
    p["apply"].add_argument("--yes", "-y", action="store_true",
                            help="apply without showing the change and asking (for scripts)")
    p["apply"].add_argument("-i", "--interactive", action="store_true", help="choose files and hunks, like git add -p")
    p["apply"].add_argument("--only", nargs="+", metavar="PATH", help="apply only these files or folders (shell patterns)")
    p["apply"].add_argument("--exclude", nargs="+", metavar="PATH", help="leave these files or folders out")
    p["apply"].add_argument("--keep-conflicts", action="store_true",
                            help="where your edits and the AI's overlap, write conflict markers instead of asking")
    p["apply"].add_argument("--overwrite-untracked", action="store_true",
                            help="replace files of yours (untracked or ignored, so not part of what you "
                            "reviewed) where the change puts a new file or a rename, instead of asking (on a "
                            "terminal) or refusing (--yes); `apply --undo` puts them back")
    p["apply"].add_argument("--undo", action="store_true", help="restore the files the last apply touched")
    p["apply"].add_argument("paths", nargs="*", metavar="-- PATH",
                            help="after --: apply only these files, exact names (a file may be called --undo)")
    p["apply"].add_argument("--sha256", metavar="HEX", help="apply only if the job's patch has this sha256 "
                            "(the one `patchwire diff JOB --json` reported when it was reviewed)")
    add_usage_arguments(p["usage"], "project")
    p["notify"].add_argument("action", choices=("add", "list", "remove", "test"))
    p["notify"].add_argument("target", nargs="?", metavar="URL|ID", help="add: the receiver's URL; remove, test: "
                             "a target id (test without one: every target)")
    p["notify"].add_argument("--kind", choices=("webhook", "ntfy", "slack"),
                             help="add: a JSON webhook signed with HMAC-SHA256 (default; ntfy.sh and "
                                  "hooks.slack.com are recognised), an ntfy topic, a Slack incoming webhook")
    p["notify"].add_argument("--on", nargs="+", choices=("end", "start", "failure"),
                             help="add: when to send: every end (default), starts, failed ends only")
    p["notify"].add_argument("--include", nargs="+", choices=("prompt", "diff"),
                             help="add: also send the prompt or the diff (never sent otherwise)")
    return parser


def stop_as_interrupted(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP (a terminal closed) stop the CLI as Ctrl-C does: an apply puts back
    what it wrote, an ask leaves its job running and says so."""
    raise KeyboardInterrupt


def raise_open_files_limit() -> None:
    """git holds a descriptor open for each folder level it walks: under a soft limit of 1024
    (256 on macOS) its listing of a deep tree stopped with a warning ("Too many open files"),
    and the files below were not sent. Raised to the hard limit, as many tools do."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError):  # macOS: at most OPEN_MAX (10240) whatever the hard limit
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 10240), hard))
    except (ImportError, ValueError, OSError):
        pass  # left as it was: git says so if it runs short (GIT_UNREADABLE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    raise_open_files_limit()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup patchwire ...` keeps running
            signal.signal(sig, stop_as_interrupted)
    if getattr(args, "paths", None):  # exact names, given after `--`: each matches itself alone
        args.only = (args.only or []) + [ExactName(p) for p in args.paths]
    return run_command("patchwire", COMMANDS, args, lambda e: output(args, {
        "error": e.message, "hint": e.hint, "exit_status": int(e.exit_status),
        **({"details": e.details} if e.details else {})}))


if __name__ == "__main__":
    sys.exit(main())
