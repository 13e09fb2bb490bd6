"""patchwire-agent: the box's side of Patchwire. Runs Claude Code on a clean checkout of a
synced project and returns a git diff.

Data flow for one ask:

    laptop rsyncs files     -> users/<user>/mirror/<project>/      (never the AI's cwd)
    POST /v1/ask            -> the user's policy: project allowlist, limits (403/413/429)
                            -> snapshot: a commit of exactly the laptop's files (a private
                               index over the mirror, updated for the paths the ask says
                               changed since its base); 409 when its tree id differs from
                               the laptop's, or the index does not hold that base
                            -> fair queue (the user served longest ago first; FIFO
                               within a user; [jobs] workers runs at once)
                            -> a warm job folder (git worktree) moved to the snapshot:
                               by the changed paths when git's status finds it equal to
                               its (sealed) index, else whole (checkout -f, clean -ffd);
                               ignored build caches stay either way
                            -> the ask's [box] setup, in the AI's own sandbox, when its
                               inputs changed since the last setup of that folder
                            -> [ai] command, prompt on stdin, own process group, timeout
                            -> events (NDJSON, numbered) stored as they happen, up to
                               [jobs] max_output_mb: its head and tail, the middle counted
                            -> git add -A of what status names; write-tree; git diff
                               --binary --full-index -M snap tree
                               -> straight into the patch file (never whole in memory),
                               capped at [jobs] max_diff_mb; stats
                            -> the ask's [box] checks, each on exactly the result, in the
                               same sandbox: a receipt (patch sha256, result tree, each
                               check's exit code, duration and output tail)

Commands (-c CONFIG defaults to $XDG_CONFIG_HOME/patchwire/agent.toml):
    patchwire-agent init -c CONFIG [--user NAME] [--token-file PATH] [--listen HOST:PORT]
        [--state-dir DIR] [--account NAME] [--ai claude|stand-in] [--service]
        set the box up: say what it lacks (git, rsync, rrsync, bwrap, the AI) and how to
        install it; make the state folder (700, the agent account's); write a commented
        config with one user; print its token once, and the next step for each developer
    patchwire-agent serve -c CONFIG
        run the HTTP server; SIGHUP (or any change of the file) reloads users and policy;
        SIGTERM lets running jobs finish for [server] shutdown_grace_s, then cancels them;
        queued jobs stay queued and run after the restart
    patchwire-agent user add NAME [--admin] [--ssh-key FILE [--authorized-keys FILE]]
    patchwire-agent user list | remove NAME [--cancel-jobs] [--purge [--yes]] | rotate NAME [--cancel-jobs]
    patchwire-agent user key NAME --ssh-key FILE [--authorized-keys FILE]
        manage users and tokens (only sha256 digests are stored); with --ssh-key, an
        authorized_keys line that may only rsync into the user's own mirror (rrsync)
    patchwire-agent policy NAME | --default [--set KEY=VALUE ...]
        the user's effective policy, and where each value comes from; --set writes
        [users.NAME] (or [policy]) keys, checked as the config is
    patchwire-agent project remove USER PROJECT [--yes]
        delete one project's mirror, repository, job folders and stored patches
    patchwire-agent usage -c CONFIG [--user NAME] [--since 7d|DATE] [--until] [--by user|project|day]
        [--csv|--json]      usage summed from the state db (works while the server runs)
    patchwire-agent status -c CONFIG    running and queued jobs by user, uptime, disk per user
    patchwire-agent doctor -c CONFIG [--sshd-config FILE]
        git, rsync, rrsync, the AI, its sandbox, the state folder, the sshd side (the
        account's authorized_keys, PermitUserEnvironment): ok or the fix
    patchwire-agent gc -c CONFIG [--older-than 30d] [--dry-run]
        prune old jobs' patches and events and unused job folders; say what was freed
    patchwire-agent service -c CONFIG --systemd|--launchd [--install]
        a user-level systemd unit or launchd plist that runs serve and restarts it on failure

Team mode: each user's mirrors, repositories and job folders live under users/<user>/;
a user can reach only their own jobs (any other id is 404, as if it did not exist).
`[policy]` holds defaults, `[users.NAME]` overrides: projects (name patterns), rate_limit
("30/hour", counted from the stored jobs, so it survives a restart; an ask of several
attempts counts once), max_queued, max_running, timeout_s (ceiling), max_prompt_bytes,
max_projects, disk_quota_mb (all of users/<user>/; a running job past it is stopped),
max_attempts (sibling jobs per ask, 1-4, default 4). Each refusal is a JSON error with code
"policy" (507 "quota" for the disk quota) naming the limit, its value and the rule that set it.

HTTP API (JSON; `Authorization: Bearer TOKEN` on all but health):
    GET    /v1/health                       version, queue depth, whether the AI is found,
                                            which sandbox confines it
    GET    /v1/me?project=P                 your user name and the folder to rsync P into
    POST   /v1/ask {project,tree,files,prompt[,timeout_s][,attempts]}
                                            202 {job} or, with Accept: application/x-ndjson,
                                            the job's events streamed as they happen
    GET    /v1/jobs                         your jobs, newest first
    GET    /v1/jobs/{id}                    one job (a unique id prefix is enough)
    GET    /v1/jobs/{id}/events?after=N     its events after N (NDJSON, follows a live job)
    GET    /v1/jobs/{id}/diff               the patch, as bytes
    DELETE /v1/jobs/{id}                    cancel a queued or running job
    GET    /v1/asks/{id}[/events]           an ask of several attempts (POST /v1/ask with
                                            "attempts": N): its jobs, or all their events
    GET    /v1/usage?since=&until=&group=user|project|day[&user=NAME]
                                            usage summed over jobs: yours, or (admin) anyone's
    GET    /v1/notify                       your notification targets (never their secrets)
    POST   /v1/notify {url[,kind,events,include]}
                                            201 {target[,secret]}: a host in [notify] allow; a
                                            webhook's HMAC secret is in this answer only
    DELETE /v1/notify/{id}                  remove a target
    POST   /v1/notify/{id}/test             one test delivery now: {ok, status, error}
    GET    /v1/openapi.json                 this API as OpenAPI 3.1 (no token needed)
    GET    /metrics                         Prometheus text format (admin token)

Exit codes: 0 ok, 1 error (bad config, cannot listen), 2 usage.

Environment: the AI's is an allowlist: PATH, LANG, LC_*, TERM, TZ, TMPDIR and Claude's
credential variables (ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN, CLAUDE_CODE_OAUTH_TOKEN,
ANTHROPIC_BASE_URL) of the agent's environment, plus `[ai] env`; HOME is the user's own AI
home, users/<user>/home. Nothing else of the agent's environment, and nothing from the
laptop's, reaches it.

Threat model: tokens are stored only as sha256 digests and compared in constant time (as
bytes: the digests); wrong tokens from one address are answered ever later. The laptop
reaches the box through SSH keys (rsync) and the bearer token (HTTP or HTTPS), inside a
private network: the agent refuses public listen addresses unless `allow_public = true`.
Requests are size-capped and have a total time budget for their head and their body (a
client trickling bytes gets a 408, not a held slot); connections are capped per address and
overall, and at the cap a waiting connection gives way to a new client, while /v1/health
still answers. Every request and job is a line in state_dir/audit.log (never a token or a
prompt), and so is every notification attempt. Notifications go only to hosts the admin lists
in [notify] allow, from a thread of their own (a dead receiver never slows a job), without
the prompt or the diff unless the user included them; a webhook's signing secret is kept in
the state db (private) and shown to its user once. The AI never runs in the mirror, and a failed run leaves the mirror untouched.
The AI runs confined (section "sandbox"): by default bubblewrap on Linux, sandbox-exec on
macOS; it writes only in its job folder, its own /tmp and its user's AI home (Claude's
settings, hooks, sessions and transcripts: never shared between users), and sees neither the
other users' mirrors, jobs and AI homes nor the agent's state, config and TLS key. Under
bubblewrap it also cannot see the box account's home (~/.ssh, ~/.aws, the admin's ~/.claude:
only the login is bound in, read-only), /run, /var/tmp or the account's Unix sockets, holds
no capability even when the agent is root, and has a sized /tmp, a process cap and (with a
cgroup) a memory cap. With [network] it has its own network namespace too: no other job's
ports, no service or abstract socket of the box; its one way out is the agent's gateway,
which allows only the hosts the policy names and adds the API credential the AI never holds
(section "the gateway"). Tracked symlinks out of the project are removed from the job folder while it runs.
Its output is parsed as untrusted data, and what it can make the box store is capped (its
events, its diff, its user's disk quota); a job that fills the disk still ends recorded
(state/reserve is given up for that) with its folder reset. The state folder is 700 and its
files private, whatever the umask.

Map: the banner sections, top to bottom (tests/test_structure.py keeps it in step):
    constants ......................................... limits, CONFIG_TEMPLATE, AGENT_EPILOG
    errors ............................................ HTTPFailure and its kinds (BadRequest, NotFound, ...)
    config ............................................ AgentConfig, Policy: [server] [ai] [jobs] [users] [policy]
    store (sqlite3 + files) ........................... Store (jobs, events, patches), EventTail
    usage: the jobs table, summed ..................... usage_columns, usage_report
    git: snapshots and job folders .................... ProjectRepo: snapshot, prepare_slot, collect
    sandbox (confining the AI) ........................ Sandbox, JobWalls, bwrap_argv, AILimits, JobCgroup
    the gateway (the AI's only way out) ............... JobGateway, NetworkPolicy, Credential, EgressReport
    the AI run ........................................ AIRun, StreamParser, OutputBudget
    setup and checks (the project's [box]) ............ BoxSteps, CommandRun
    fair queue ........................................ FairQueue, QueueItem
    several attempts .................................. ask groups (attempts, ask_id), AI profiles
    audit log ......................................... AuditLog
    notifications (the box tells you a job ended) ..... Notifier, Delivery
    the agent (server object) ......................... Agent: ask, run_job, cancel, finish
    metrics (Prometheus text format) .................. Metrics
    HTTP server ....................................... Handler (route_<name>), ROUTES, AgentHTTPServer
    OpenAPI document (GET /v1/openapi.json) ........... OPENAPI_SCHEMAS, OPENAPI_ROUTES, openapi_document
    operations: shutdown, service, status, gc ......... drain_jobs, gc_state, the service units
    commands .......................................... cmd_<name>, COMMANDS, main
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import contextlib
import datetime as dt
import fcntl
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import math
import logging
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import IO, AbstractSet, Any, BinaryIO, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar

import patchwire as pw
from patchwire import Git, PatchwireError, ProcessError, UsageError

__version__ = pw.__version__
log = logging.getLogger("patchwire-agent")

# ================================================================== constants

DEFAULT_LISTEN = "127.0.0.1:7433"
CLAUDE_COMMAND = ["claude", "--print", "--output-format", "stream-json", "--verbose",
                  "--permission-mode", "acceptEdits"]
MAX_BODY = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # deeper bodies are refused before anything walks them recursively
# Parsed, a body takes some times its bytes: a first ask's manifest of 100,000 files (7 MB)
# ~4x, each entry a list of three strings every ~70 bytes. 64 MB of empty lists (`[],` each)
# took 3.2 GB, and 4 MB of them 170 MB. So a body may hold one JSON value (counted by its `[`,
# `{` and `,` outside strings) per BODY_BYTES_PER_VALUE bytes at most (BODY_VALUES_FREE more),
# and bodies over LARGE_BODY_BYTES are read and handled
# LARGE_BODIES_AT_ONCE at a time, up to the job's creation (not while it streams); a request
# that waits past body_timeout_s is told to retry.
BODY_BYTES_PER_VALUE = 6
BODY_VALUES_FREE = 4096
LARGE_BODY_BYTES = 256 * 1024  # 4 MiB of `[],[],...` parsed took 170 MB: every body is counted
LARGE_BODIES_AT_ONCE = 2
TARGET_CHANGES_BURST = 30  # notification targets added or removed, then one a minute (always audited)
MAX_QUERY_INT = 10 ** 15  # `after=N` and friends: sqlite integers are 64-bit
CONNECTION_TIMEOUT = 60  # per socket operation once a request is in (a stream's writes)
AT_CAP_SLOTS = 8  # connections past the caps that may still ask for /v1/health ...
AT_CAP_SLOTS_PER_CLIENT = 2
AT_CAP_BUDGET_S = 1.0  # ... within this total time for their request line and headers
AUTH_FREE_FAILURES = 10  # wrong tokens from one address answered at once; then slower
AUTH_PENALTY_S = 0.25  # the first delay, doubled per further failure ...
AUTH_PENALTY_MAX_S = 4.0  # ... up to this
AUTH_FORGET_S = 600  # an address without failures for this long starts afresh
AUDIT_BACKUPS = 5  # audit.log.1 .. audit.log.5
# Request lines written to the audit log per client without a valid token (by address, an
# IPv6 client by its /64) and per user: a burst, then so many a second. Past it the lines are
# counted, not written, and the count goes into that client's next line: 192,000 requests
# without a token once rotated every earlier line out of the log in 22 s.
AUDIT_BURST_ANONYMOUS, AUDIT_RATE_ANONYMOUS = 60, 1.0
AUDIT_BURST_USER, AUDIT_RATE_USER = 600, 10.0
AUDIT_CLIENTS_KEPT = 4096
AHEAD_AT_ONCE = 2  # job folders checked ahead at once (/v1/me), on the whole box
LIST_PROMPT_CHARS = 1000  # a prompt's first characters in lists; GET /v1/jobs/ID has it whole
FOLLOW_BATCH = 1000  # a job's stored events are read this many at a time for a stream
# Where [server] listen may point without `allow_public = true`: loopback, private
# networks (RFC 1918, IPv6 unique local) and Tailscale's ranges.
PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                    "fc00::/7", "100.64.0.0/10", "fd7a:115c:a1e0::/48")
KILL_GRACE_S = 5.0
MIN_FREE_BYTES = 4 * 1024 * 1024  # asks are refused below this much free space for state
HEARTBEAT_S = 15
MAX_EVENT_TEXT = 16 * 1024
MAX_AI_LINE = 4 * 1024 * 1024  # longer stdout lines are cut (and not parsed): bounded memory
MIB = 1024 * 1024
QUOTA_SAMPLE_S = 2.0  # how often a running job's folder is measured against the user's disk quota ...
QUOTA_SAMPLE_SHARE = 0.05  # ... or less often, so the measures take at most this share of a core
RESERVE_BYTES = 4 * MIB  # state/reserve: given up so a job's end, and gc, can be recorded on a full disk
TERMINAL = pw.JOB_ENDS
LAST_EVENTS = pw.LAST_EVENTS
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._/~+@-]+$")

AGENT_DESCRIPTION = ("the box's side of Patchwire: runs Claude Code on a clean checkout of a "
                     "synced project and returns a git diff")
AGENT_EPILOG = """\
typical use:  patchwire-agent init -c agent.toml --user alice   (prints alice's token once)
              patchwire-agent serve -c agent.toml
API: GET /v1/health, /v1/me, /v1/jobs[/ID[/events|/diff]], /v1/asks/ID[/events], /v1/usage, /v1/notify,
     /v1/openapi.json, /metrics; POST /v1/ask, /v1/notify[/ID/test]; DELETE /v1/jobs/ID, /v1/notify/ID
exit codes: 0 ok, 1 error (bad config, cannot listen), 2 usage
"""

CONFIG_TEMPLATE = """\
# patchwire-agent configuration. Reference: README.md, "Configuration" (Box: agent.toml).

[server]
# host:port ([v6]:port) to listen on: loopback or a private network (Tailscale). Public
# addresses need allow_public = true (and tls_cert, tls_key). Caps and budgets: README.md.
{server}
[ai]
# The AI command (argv); the prompt arrives on stdin, the cwd is a clean job folder.
# Claude Code headless by default; any CLI that edits files in its cwd works.
# sandbox: "auto" confines the AI to its job folder (bubblewrap on Linux, sandbox-exec on macOS).
# readable: folders the sandbox hides that the AI may read (a toolchain in this account's home).
# tmp_mb, max_processes, max_memory_mb: each job's /tmp, processes and memory (doctor: what holds).
# [ai.profiles.NAME] command = [...]: other AI commands one ask may try side by side
# (`patchwire ask --agents claude,other`), one attempt each.
{ai}
[jobs]
# workers: AI runs at once on this box; slots: warm job folders per user and project.
# max_output_mb: the AI's events stored per job (the head and the tail; the middle is dropped
# and counted). max_diff_mb: a job's patch; a larger change fails the job. Defaults 16 and 256.
{jobs}
[network]
# Under bwrap each job has its own network namespace: the AI reaches the outside only through
# the agent's gateway, which lets it reach the hosts allowed here. mode: "allowlist", "none"
# (only the AI's own API) or "open". presets: anthropic, github, pub, npm, pypi, maven-google,
# gradle, cocoapods, crates, go (README.md, "Network"). users.NAME and projects."PATTERN"
# tables may set mode, allow and presets again.
mode = "allowlist"
presets = ["anthropic"]
allow = []
# api_upstream = "https://api.anthropic.com"
# credential_file = "claude-credential"  # an API key or a `claude setup-token` token, for the
#                                        # gateway to add to the AI's API calls: the AI never holds it

[notify]
# Hosts users may send job notifications to (`patchwire notify add URL`): "hooks.slack.com",
# "ntfy.sh", "*.example.com", each optionally ":port" (else 80 and 443). Empty: none.
allow = []
# max_targets = 10            # per user
# timeout_s = 10              # one delivery attempt, whole (a slow receiver is cut off, then retried)

# The policy table holds defaults for every user; users.NAME may override each key.
# `patchwire-agent policy NAME` shows what applies. The built-in defaults:
# [policy]  (uncomment to change)
# projects = ["*"]            # allowed project names (patterns)
# rate_limit = "30/hour"      # for example (default: no limit); per second, minute, hour or day
# max_queued = 100            # jobs waiting per user
# max_running = 2             # AI runs at once per user (default: jobs.workers; minus one with several users)
# timeout_s = 7200            # ceiling of an ask's timeout (default: ai.max_timeout_s)
# max_prompt_bytes = 1048576
# max_projects = 50           # projects (mirror + repository) per user on this box
# disk_quota_mb = 10240       # for example (default: none): all of a user's folder on the box
#                             # (mirrors, repositories, job folders); asks over it are refused,
#                             # a job that grows past it is stopped and fails
# max_attempts = 4            # sibling jobs one ask may start (`patchwire ask -n N`), 1-4

# One table per user (`patchwire-agent user add NAME`). Only the sha256 of each token is stored.
{users}"""


# ================================================================== errors


class HTTPFailure(PatchwireError):
    """An expected failure answered as a JSON error with its HTTP status."""

    def __init__(self, status: int, message: str, hint: str = "", code: str = "error", **details):
        super().__init__(message, hint, http_status=status, code=code, details=details)


class NamedFailure(HTTPFailure):
    """An HTTPFailure whose class names its status; `code` defaults to the status's own."""

    status: int = HTTPStatus.BAD_REQUEST
    default_code = "error"

    def __init__(self, message: str, hint: str = "", code: Optional[str] = None, **details):
        super().__init__(self.status, message, hint, code=code or self.default_code, **details)


class BadRequest(NamedFailure):
    status, default_code = HTTPStatus.BAD_REQUEST, "bad_request"


class Conflict(NamedFailure):
    status, default_code = HTTPStatus.CONFLICT, "conflict"


class NotFound(NamedFailure):
    status, default_code = HTTPStatus.NOT_FOUND, pw.CODE_NOT_FOUND


class Unauthorized(NamedFailure):
    status, default_code = HTTPStatus.UNAUTHORIZED, "unauthorized"


class LengthRequired(NamedFailure):
    status, default_code = HTTPStatus.LENGTH_REQUIRED, "length_required"


# ================================================================== config

SERVER_SCHEMA = {"listen": (str, DEFAULT_LISTEN), "state_dir": (str, None), "allow_public": (bool, False),
                 "max_connections": (int, 64), "max_connections_per_client": (int, 16),
                 "backlog": (int, 64), "header_timeout_s": (float, 10), "body_timeout_s": (float, 60),
                 "tls_cert": (str, None), "tls_key": (str, None), "audit_max_bytes": (int, 10 * 2**20),
                 "shutdown_grace_s": ("int>=0", 60)}
AI_SCHEMA = {"command": ("str_list", CLAUDE_COMMAND), "timeout_s": (int, 1800),
             "max_timeout_s": (int, 7200), "env": ("str_table", {}),
             "resume_args": ("str_list", ["--resume", "{session_id}"]), "sandbox": (str, "auto"),
             "readable": ("str_list", []), "tmp_mb": (int, 1024), "max_processes": (int, 1024),
             "max_memory_mb": ("int>=0", 4096), "profiles": (dict, {})}
JOBS_SCHEMA = {"workers": (int, 2), "slots": (int, 2), "max_output_mb": (float, 16),
               "max_diff_mb": (float, 256)}
# Policy keys: defaults in [policy], overrides in [users.NAME]. None means "no limit of its
# own" (max_running: [jobs] workers; timeout_s: [ai] max_timeout_s; rate_limit: none).
POLICY_SCHEMA = {"projects": ("str_list", ["*"]), "rate_limit": (str, None), "max_queued": (int, 100),
                 "max_running": (int, None), "timeout_s": (int, None),
                 "max_prompt_bytes": (int, 1024 * 1024), "max_projects": (int, 50),
                 "disk_quota_mb": (float, None), "max_attempts": (int, 4)}
USER_SCHEMA = {"token_sha256": (str, None), "admin": (bool, False),
               **{key: (kind, None) for key, (kind, _) in POLICY_SCHEMA.items()}}
TOP_SCHEMA: dict = {"server": (dict, {}), "ai": (dict, {}), "jobs": (dict, {}), "users": (dict, {}),
                    "policy": (dict, {}), "network": (dict, None), "notify": (dict, {}),
                    "projects": (dict, {})}
# [notify]: the hosts users may point notification targets at, and how many each may have
NOTIFY_SCHEMA = {"allow": ("str_list", []), "max_targets": (int, 10), "timeout_s": (float, 10.0)}
RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
              "hour": 3600, "d": 86400, "day": 86400}


class AgentConfig:
    """The agent's TOML config, validated: every error names the file and the key."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        top = pw.Schema(path, "", TOP_SCHEMA).read(data)
        server = pw.Schema(path, "server", SERVER_SCHEMA).read(top["server"])
        ai = pw.Schema(path, "ai", AI_SCHEMA).read(top["ai"])
        jobs = pw.Schema(path, "jobs", JOBS_SCHEMA).read(top["jobs"])
        self.host, self.port = parse_listen(path, server["listen"])
        self.shutdown_grace_s: int = server["shutdown_grace_s"]  # on SIGTERM, running jobs may finish
        self.allow_public: bool = server["allow_public"]
        if not self.allow_public:
            check_private_listen(path, self.host)
        # real path: rrsync compares the laptop's absolute mirror path with its own realpath
        self.state_dir = Path(os.path.realpath(config_relative(path, server["state_dir"] or "patchwire-state")))
        if not SAFE_PATH_RE.match(str(self.state_dir)):
            raise PatchwireError(f"{path}: server.state_dir {str(self.state_dir)!r} has characters "
                                 "that remote shells would split", "use a path of letters, digits and ./_-")
        self.stand_in = check_ai_command(path, ai["command"])
        self.ai_command: List[str] = stand_in_argv() if self.stand_in else ai["command"]
        self.ai_label = STAND_IN_LABEL if self.stand_in else repr(self.ai_command[0])
        self.ai_profiles = read_profiles(path, ai["profiles"])  # several attempts: --agents a,b
        self.timeout_s: int = ai["timeout_s"]
        self.max_timeout_s: int = max(ai["max_timeout_s"], ai["timeout_s"])
        self.ai_env: Dict[str, str] = ai["env"]
        self.resume_args: List[str] = ai["resume_args"]
        self.max_connections: int = server["max_connections"]
        self.max_connections_per_client: int = min(server["max_connections_per_client"], self.max_connections)
        self.backlog: int = server["backlog"]
        self.header_timeout_s: float = server["header_timeout_s"]
        self.body_timeout_s: float = server["body_timeout_s"]
        self.audit_max_bytes: int = server["audit_max_bytes"]
        if (server["tls_cert"] is None) != (server["tls_key"] is None):
            raise PatchwireError(f"{path}: server.tls_cert and server.tls_key go together",
                                 "set both (PEM files) for HTTPS, or neither for plain HTTP")
        self.tls: Optional[Tuple[Path, Path]] = None
        if server["tls_cert"]:
            self.tls = (config_relative(path, server["tls_cert"]), config_relative(path, server["tls_key"]))
        if ai["sandbox"] not in SANDBOXES:
            raise PatchwireError(f"{path}: ai.sandbox must be one of {', '.join(SANDBOXES)}, not {ai['sandbox']!r}")
        self.sandbox: str = ai["sandbox"]
        self.limits = AILimits(ai["tmp_mb"], ai["max_processes"], ai["max_memory_mb"])
        self.readable: List[str] = [check_absolute(path, "ai.readable", item) for item in ai["readable"]]
        # files the AI must never read, even when their folder is visible to it
        self.secret_files: List[Path] = [self.path, *(self.tls or ())]
        self.workers: int = jobs["workers"]
        self.slots: int = jobs["slots"]
        self.network = NetworkConfig(path, top["network"])
        notify = pw.Schema(path, "notify", NOTIFY_SCHEMA).read(top["notify"])
        self.notify_allow: List[str] = notify["allow"]  # host, *.domain, each optionally :port
        self.notify_max_targets: int = notify["max_targets"]
        self.notify_timeout_s: float = min(notify["timeout_s"], 120.0)  # one attempt, whole
        # [projects.NAME]: the box's own [box] setup and checks for a project of that name (any
        # user's); an ask's own setup or checks win over them
        self.project_box: Dict[str, dict] = {}
        for name, table in top["projects"].items():
            if not pw.NAME_RE.fullmatch(name):
                raise PatchwireError(f"{path}: project name {name!r} in [projects] is not valid",
                                     "use letters, digits, '.', '_' and '-'")
            self.project_box[name] = pw.check_box(path, table)
        self.max_output_mb: float = jobs["max_output_mb"]  # stored AI events per job (head and tail)
        self.max_diff_mb: float = jobs["max_diff_mb"]  # a job's patch; past it the job fails
        self.users: Dict[str, bytes] = {}
        self.admins: Set[str] = set()  # users whose token also reads everyone's usage and metrics
        self.policy_defaults = pw.Schema(path, "policy", POLICY_SCHEMA).read(top["policy"])
        self.policy_set = set(top["policy"])  # keys [policy] sets itself (for `policy NAME`)
        check_policy(path, "policy", self.policy_defaults)
        self.user_policy: Dict[str, dict] = {}  # per user: the policy keys [users.NAME] sets
        for name, table in top["users"].items():
            if not pw.NAME_RE.fullmatch(name):
                raise PatchwireError(f"{path}: user name {name!r} is not valid",
                                     "use letters, digits, '.', '_' and '-'")
            user = pw.Schema(path, f"users.{name}", USER_SCHEMA).read(table)
            digest = user["token_sha256"] or ""
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise PatchwireError(f"{path}: users.{name}.token_sha256 must be 64 hex digits",
                                     "create users with `patchwire-agent user add`")
            self.users[name] = bytes.fromhex(digest)
            if user["admin"]:
                self.admins.add(name)
            self.user_policy[name] = {k: user[k] for k in POLICY_SCHEMA if user[k] is not None}
            check_policy(path, f"users.{name}", self.user_policy[name])

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        return cls(path, pw.load_toml(path))

    def policy(self, user: str) -> "Policy":
        """What applies to `user`, and where each value comes from."""
        values, sources = {}, {}
        own = self.user_policy.get(user, {})
        for key, (_, default) in POLICY_SCHEMA.items():
            if key in own:
                values[key], sources[key] = own[key], f"[users.{user}]"
            elif key in self.policy_set:
                values[key], sources[key] = self.policy_defaults[key], "[policy]"
            else:
                values[key], sources[key] = default, "built-in default"
        if values["max_running"] is None and self.workers > 1 and len(self.users) > 1:
            # one worker stays free for the others: a user's two-hour jobs never hold them all
            values["max_running"], sources["max_running"] = self.workers - 1, "[jobs] workers - 1 (a shared box)"
        elif values["max_running"] is None:
            values["max_running"], sources["max_running"] = self.workers, "[jobs] workers"
        ceiling = self.max_timeout_s
        if values["timeout_s"] is None or values["timeout_s"] > ceiling:
            values["timeout_s"], sources["timeout_s"] = ceiling, "[ai] max_timeout_s"
        return Policy(user, values, sources)


class Policy:
    """One user's effective policy: `values[key]` and where it comes from, `sources[key]`."""

    def __init__(self, user: str, values: dict, sources: dict):
        self.user, self.values, self.sources = user, values, sources

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def rule(self, key: str) -> str:
        """`[users.bob] max_queued = 5`: the rule as the admin wrote it."""
        return f"{self.sources[key]} {key} = {json.dumps(self.values[key])}"

    def allows_project(self, project: str) -> bool:
        return any(fnmatch.fnmatchcase(project, pattern) for pattern in self.projects)

    def rate_window(self) -> Optional[Tuple[int, int]]:
        """(count, seconds) of `rate_limit`, or None without one."""
        return parse_rate(self.rate_limit) if self.rate_limit else None


def parse_rate(text: str) -> Optional[Tuple[int, int]]:
    """"30/hour" -> (30, 3600); None when it is not of that form."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+?)s?\s*", text or "")
    if not m or int(m.group(1)) < 1 or m.group(2) not in RATE_UNITS:
        return None
    return int(m.group(1)), RATE_UNITS[m.group(2)]


def check_policy(path: Path, table: str, values: dict) -> None:
    if values.get("rate_limit") and not parse_rate(values["rate_limit"]):
        raise PatchwireError(f"{path}: {table}.rate_limit must be COUNT/UNIT, not {values['rate_limit']!r}",
                             'for example "30/hour" (units: second, minute, hour, day)')
    if values.get("projects") == []:
        raise PatchwireError(f"{path}: {table}.projects is empty, so no project is allowed",
                             'list name patterns, for example ["web-*", "api"], or "*" for all')
    check_max_attempts(path, table, values)


def check_ai_command(path: Path, command: List[str]) -> bool:
    """Whether [ai] command is ["stand-in"], the built-in stand-in AI (STAND_IN_SOURCE, run
    by the agent's own Python); an empty command, or the stand-in with arguments, is refused."""
    if not command:
        raise PatchwireError(f"{path}: ai.command must not be empty")
    if command[:1] == [STAND_IN] and command != [STAND_IN]:
        raise PatchwireError(f"{path}: ai.command {json.dumps(command)}: the built-in stand-in takes no "
                             "arguments", f'set command = ["{STAND_IN}"], or the argv of a real AI CLI')
    return command == [STAND_IN]


def check_absolute(path: Path, key: str, value: str) -> str:
    if not os.path.isabs(os.path.expanduser(value)):
        raise PatchwireError(f"{path}: {key} entries must be absolute paths, not {value!r}",
                             "write the full path of the folder, e.g. \"/home/box/flutter\"")
    return os.path.realpath(os.path.expanduser(value))


def config_relative(path: Path, value: str) -> Path:
    """A path from the config: `~` expanded, relative ones taken from the config's folder."""
    target = Path(os.path.expanduser(value))
    return target if target.is_absolute() else (path.parent / target).resolve()


def parse_listen(path: Path, listen: str) -> Tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or NAME:PORT; an IPv6 address needs its brackets."""
    host, _, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) < 65536
            or (":" in host and not bracketed) or not re.fullmatch(r"[A-Za-z0-9.:_%-]+", host)):
        raise PatchwireError(f"{path}: server.listen must be HOST:PORT or [IPv6]:PORT, not {listen!r}")
    return host, int(port)


def check_private_listen(path: Path, host: str) -> None:
    """Refuse to listen where the internet may reach the agent, unless the config says so."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PatchwireError(f"{path}: server.listen host {host!r} does not resolve: {e}") from None
    networks = [ipaddress.ip_network(n) for n in PRIVATE_NETWORKS]
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not any(address in n for n in networks if n.version == address.version):
            raise PatchwireError(
                f"{path}: server.listen {host!r} is not a loopback, private (RFC 1918, IPv6 ULA) "
                f"or Tailscale address ({address}): anyone who reaches it could try tokens",
                "listen on 127.0.0.1, a private or Tailscale address; or set [server] allow_public = "
                "true, ideally with tls_cert and tls_key")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# ================================================================== store (sqlite3 + files)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, project TEXT NOT NULL, prompt TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, created REAL NOT NULL, started REAL, finished REAL,
    snapshot TEXT, tree TEXT, timeout_s INTEGER, result TEXT, stats TEXT, parent TEXT,
    slot INTEGER, pgid INTEGER, last_seq INTEGER NOT NULL DEFAULT 0, box TEXT);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user, created);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (job, seq));
CREATE TABLE IF NOT EXISTS notify_targets (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, kind TEXT NOT NULL, url TEXT NOT NULL, secret TEXT,
    events TEXT NOT NULL, include TEXT NOT NULL, created REAL NOT NULL);
"""
# several attempts: the ask that groups sibling jobs, and which of them a job is (1..N)
ATTEMPT_COLUMNS = {"ask_id": "TEXT", "attempt": "INTEGER", "profile": "TEXT"}
TARGET_FIELDS = ("id", "user", "kind", "url", "secret", "events", "include", "created")
JOB_FIELDS = ("id", "user", "project", "prompt", "status", "reason", "created", "started",
              "finished", "snapshot", "tree", "timeout_s", "result", "stats", "parent", "slot",
              "pgid", "last_seq", "box", *ATTEMPT_COLUMNS)


def job_fields(prompt_chars: int = 0) -> str:
    """JOB_FIELDS for a SELECT; with `prompt_chars`, the prompt's first characters only."""
    cut = f"substr(prompt, 1, {int(prompt_chars)})" if prompt_chars else "prompt"
    return ", ".join(cut if field == "prompt" else field for field in JOB_FIELDS)


class EventTail:
    """The latest events of a job that has not ended, as the lines a stream sends them:
    followers read them here, not from sqlite (which stays the record; a follower further
    behind, or of an ended job, reads it there). Seqs are consecutive: a follower's place
    is an index."""

    def __init__(self, status: Optional[str]):
        self.status = status
        self.lines: List[Tuple[int, str, bytes]] = []  # (seq, type, JSON line)

    def after(self, seq: int) -> Optional[List[Tuple[int, str, bytes]]]:
        """The lines after `seq`; None when the tail does not reach back that far."""
        start = seq + 1 - self.lines[0][0]
        return self.lines[start:] if start >= 0 else None


class Store:
    """Jobs and their events in sqlite3, patches as files: all survive a restart.
    One connection, one lock; a condition wakes event streams when something is added, and
    a generation count lets a stream tell whether anything was added since it last read (a
    notify between its read and its wait would otherwise be missed until the next one).
    Prompts, diffs and events are private: folders 700, files 600, whatever the umask."""

    TAIL_EVENTS = 256  # per job not yet ended, kept in memory for its followers (up to twice that)

    def __init__(self, state_dir: Path):
        self.patch_dir = state_dir / "patches"
        make_private_dir(self.patch_dir)
        db_path = self.db_path = state_dir / "jobs.sqlite3"
        # sqlite gives its -wal and -shm files the mode of the database file (when it makes them)
        os.close(os.open(str(db_path), os.O_RDWR | os.O_CREAT, 0o600))
        new = db_path.stat().st_size == 0
        for path in (db_path, state_dir / "jobs.sqlite3-wal", state_dir / "jobs.sqlite3-shm"):
            if path.exists():
                os.chmod(path, 0o600)
        self.db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        # before the first table (a new database): pages that deletes free can be given back
        # to the file system in place (gc), with no VACUUM's copy of the whole file. Only then:
        # on an existing database sqlite opens a write transaction for it, even when the mode is
        # already set, and fails on a full disk, where `gc` must open the store to free space.
        if new:
            self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        self.db.execute("PRAGMA journal_mode=WAL")
        # sqlite's page cache (2 MB by default) filled as the db grew: about 1 MB of the agent's
        # RSS growth over its first 1,000 asks. Pages it drops are in the OS's cache still.
        self.db.execute("PRAGMA cache_size = -256")
        self.db.executescript(SCHEMA_SQL)
        migrate_usage_columns(self.db)
        if "box" not in _job_columns(self.db):  # a state db from before [box] setup and checks
            self.db.execute("ALTER TABLE jobs ADD COLUMN box TEXT")
        migrate_attempt_columns(self.db)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.generation = 0  # counts changes, under the lock
        self.tails: Dict[str, EventTail] = {}
        self.reserve = state_dir / "reserve"
        self.keep_reserve()

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
            if "status" in fields and job_id in self.tails:
                self.tails[job_id].status = fields["status"]
            self.generation += 1
            self.changed.notify_all()

    def job(self, job_id: str) -> Optional[dict]:
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
        return _job_row(row) if row else None

    def find_jobs(self, user: str, prefix: str = "", limit: int = 100, prompt_chars: int = 0) -> List[dict]:
        """The user's newest jobs (by id prefix); `prompt_chars`: only that many characters of
        each prompt (a list of 100 jobs of 1 MiB prompts once held 100 MB per answer)."""
        fields = job_fields(prompt_chars)
        with self.lock:
            rows = self.db.execute(
                f"SELECT {fields} FROM jobs WHERE user = ? AND id LIKE ? "
                "ORDER BY created DESC LIMIT ?", (user, prefix.replace("%", "") + "%", limit)).fetchall()
        return [_job_row(r) for r in rows]

    def stored_bytes(self, user: str) -> int:
        """What the user's jobs keep outside their folder until `gc`: their stored patches,
        prompts and events (a job's AI may say 16 MiB, its diff be 256 MiB). The disk quota
        counts it (Agent.user_bytes). Read on a connection of its own (WAL: a reader never
        waits for the writer), not under the store's lock: a user with thousands of jobs makes
        their own ask slower, never every other request and job of the box."""
        db = sqlite3.connect(f"file:{urllib.parse.quote(str(self.db_path))}?mode=ro", uri=True)
        try:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE user = ?", (user,))]
            prompts = db.execute("SELECT COALESCE(SUM(LENGTH(CAST(prompt AS BLOB))), 0) FROM jobs "
                                 "WHERE user = ?", (user,)).fetchone()[0]
            events = db.execute("SELECT COALESCE(SUM(LENGTH(CAST(e.data AS BLOB))), 0) FROM events e "
                                "JOIN jobs j ON j.id = e.job WHERE j.user = ?", (user,)).fetchone()[0]
        finally:
            db.close()
        patches = 0
        for job_id in ids:
            with contextlib.suppress(OSError):
                patches += self.patch_path(job_id).stat().st_size
        return prompts + events + patches

    def ask_times(self, user: str, since: float) -> List[float]:
        """When the user's asks since `since` were accepted, oldest first (rate limits: the
        jobs table is the count, so it survives a restart)."""
        with self.lock:
            # the attempts of one ask are one ask (see "several attempts")
            rows = self.db.execute("SELECT MIN(created) FROM jobs WHERE user = ? AND created > ? "
                                   "GROUP BY COALESCE(ask_id, id) ORDER BY 1", (user, since)).fetchall()
        return [r[0] for r in rows]

    def jobs_with_status(self, *statuses: str) -> List[dict]:
        with self.lock:
            rows = self.db.execute(
                f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE status IN "
                f"({', '.join('?' * len(statuses))}) ORDER BY created", statuses).fetchall()
        return [_job_row(r) for r in rows]

    def add_event(self, job_id: str, event: dict, **job_fields: Any) -> dict:
        """Append an event, and update the job's fields in the same transaction (so a client
        that sees `finished` also sees the job done). A job's last event that finds the disk
        full gives up the reserve and is tried again: a job never stays `running` for want
        of the room to say how it ended."""
        with self.changed:
            seq = self.db.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] + 1
            event = {"seq": seq, "job": job_id, "time": round(time.time(), 3), **event}
            fields = {**job_fields, "last_seq": seq}
            data = json.dumps(event)
            try:
                self._insert_event(job_id, seq, data, fields)
            except sqlite3.OperationalError as e:
                if event["type"] not in LAST_EVENTS or not is_disk_full(e) or not self.release_reserve():
                    raise
                log.warning("the state folder's disk is full: gave up %s to record the end of job %s",
                            self.reserve, job_id)
                self._insert_event(job_id, seq, data, fields)
            self._keep_in_tail(job_id, seq, event["type"], data, fields.get("status"))
            self.generation += 1
            self.changed.notify_all()
        return event

    def _insert_event(self, job_id: str, seq: int, data: str, fields: dict) -> None:
        """Under the lock: one transaction, rolled back on any failure, COMMIT's own included
        (sqlite may keep the transaction open after a failed COMMIT, and then every later
        BEGIN would fail: no job could ever end again)."""
        self.db.execute("BEGIN")
        try:
            self.db.execute("INSERT INTO events (job, seq, data) VALUES (?, ?, ?)", (job_id, seq, data))
            self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                            [_to_sql(v) for v in fields.values()] + [job_id])
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def keep_reserve(self) -> None:
        """Hold RESERVE_BYTES in state/reserve, when there is room for it and some to spare: the
        space a full disk gives back for a job's end and for gc. Real zeros, not a sparse file,
        which would hold nothing."""
        if self.reserve.exists() or free_bytes(self.reserve.parent) < 2 * RESERVE_BYTES + MIN_FREE_BYTES:
            return
        try:
            with open(os.open(str(self.reserve), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                for _ in range(RESERVE_BYTES // MIB):
                    f.write(bytes(MIB))
        except FileExistsError:
            pass  # another process made it meanwhile
        except OSError as e:
            log.warning("could not keep a reserve in %s: %s", self.reserve, describe_exception(e))
            self.reserve.unlink(missing_ok=True)

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the file system; whether there was one."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        return True

    def _keep_in_tail(self, job_id: str, seq: int, kind: str, data: str, status: Optional[str]) -> None:
        """Under the lock, after the commit. A job's last event drops its tail."""
        if kind in LAST_EVENTS:
            self.tails.pop(job_id, None)
            return
        tail = self.tails.get(job_id)
        if tail is None:
            row = self.db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            tail = self.tails[job_id] = EventTail(row[0] if row else None)
        elif status is not None:
            tail.status = status
        tail.lines.append((seq, kind, (data + "\n").encode()))
        if len(tail.lines) > 2 * self.TAIL_EVENTS:
            del tail.lines[:-self.TAIL_EVENTS]

    def follow(self, job_id: str, after: int) -> Tuple[List[Tuple[int, str, bytes]], Optional[str], int]:
        """What a stream reads: the job's events after `after` as (seq, type, JSON line), its
        status (read together, as in events_and_status), and the generation to hand to
        wait_change. From the job's tail when it reaches back that far; else from sqlite, at
        most FOLLOW_BATCH of them (a stream of a job's 16 MiB of output is not held whole)."""
        with self.lock:
            tail = self.tails.get(job_id)
            lines = tail.after(after) if tail is not None else None
            if tail is not None and lines is not None:
                return lines, tail.status, self.generation
            rows = self.db.execute("SELECT seq, data FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?",
                                   (job_id, after, FOLLOW_BATCH)).fetchall()
            row = self.db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            generation = self.generation
        return ([(seq, json.loads(data)["type"], (data + "\n").encode()) for seq, data in rows],
                row[0] if row else None, generation)

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Wait until the store's generation is past `seen` (at once if it already is), at
        most `timeout` seconds; whether it is."""
        with self.changed:
            return self.changed.wait_for(lambda: self.generation != seen, timeout)

    def events(self, job_id: str, after: int) -> List[dict]:
        return self.events_and_status(job_id, after)[0]

    def events_and_status(self, job_id: str, after: int) -> Tuple[List[dict], Optional[str]]:
        """A job's events after `after` and its status, read together under the lock that
        add_event holds while it writes both: a stream that sees the job ended has also
        seen its last event (read apart, `finished` could land in between)."""
        with self.lock:
            rows = self.db.execute("SELECT data FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                                   (job_id, after)).fetchall()
            row = self.db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return [json.loads(r[0]) for r in rows], (row[0] if row else None)

    # --- notification targets (a webhook's signing secret is kept here: the agent signs with it)

    def add_target(self, target: dict) -> None:
        with self.lock:
            self.db.execute(f"INSERT INTO notify_targets ({', '.join(TARGET_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(TARGET_FIELDS))})", [_to_sql(target[k]) for k in TARGET_FIELDS])

    def targets(self, user: str) -> List[dict]:
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(TARGET_FIELDS)} FROM notify_targets WHERE user = ? "
                                   "ORDER BY created", (user,)).fetchall()
        return [_target_row(r) for r in rows]

    def remove_targets(self, user: str) -> int:
        with self.lock:
            return self.db.execute("DELETE FROM notify_targets WHERE user = ?", (user,)).rowcount

    def remove_target(self, user: str, target_id: str) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM notify_targets WHERE user = ? AND id = ?",
                                   (user, target_id)).rowcount > 0

    def patch_path(self, job_id: str) -> Path:
        return self.patch_dir / f"{job_id}.patch"

    def write_patch(self, job_id: str, patch: bytes) -> None:
        with self.open_patch(job_id) as f:
            f.write(patch)

    def open_patch(self, job_id: str) -> BinaryIO:
        """The job's patch file, empty and private (600), for git to write into."""
        fd = os.open(str(self.patch_path(job_id)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")

    def close(self) -> None:
        with self.lock:
            self.db.close()


def is_disk_full(e: sqlite3.Error) -> bool:
    return "full" in str(e)  # SQLITE_FULL: "database or disk is full"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def make_private_dir(path: Path) -> None:
    """A folder only this user can enter (700), made or tightened whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def make_state_dir(state_dir: Path) -> None:
    """The state folder, made or tightened to 700 (what doctor expects) by every command that
    needs it; a folder this account cannot make or own is an error naming the admin's fix."""
    try:
        make_private_dir(state_dir)
    except OSError as e:
        raise PatchwireError(f"cannot make the state folder {state_dir}: {e.strerror or e}",
                             state_dir_fix(state_dir))


def state_dir_fix(state_dir: Path) -> str:
    account = pwd.getpwuid(os.geteuid()).pw_name  # state_dir has only safe characters (SAFE_PATH_RE)
    return (f"make it for this account ({account}) as root: sudo install -d -o {account} -m 700 "
            f"{state_dir}, or set [server] state_dir to a folder it can write")


def _to_sql(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _target_row(row: tuple) -> dict:
    target = dict(zip(TARGET_FIELDS, row))
    target["events"], target["include"] = json.loads(target["events"]), json.loads(target["include"])
    return target


def _job_row(row: tuple) -> dict:
    job = dict(zip(JOB_FIELDS, row))
    for key in ("result", "stats", "box"):
        job[key] = json.loads(job[key]) if job[key] else None
    return job


# ================================================================== usage: the jobs table, summed
# Each finished job keeps its figures in columns of its own row, so a report is one GROUP BY
# and its totals are exactly the sum over jobs, whatever restarts or gc happened in between.

USAGE_COLUMNS = {"ai_s": "REAL", "turns": "INTEGER", "tokens_in": "INTEGER", "tokens_out": "INTEGER",
                 "cache_read": "INTEGER", "cache_write": "INTEGER", "cost_usd": "REAL",
                 "files": "INTEGER", "added": "INTEGER", "removed": "INTEGER",
                 "checks": "INTEGER"}  # 1: every [box] check passed, 0: one failed, NULL: none ran
USAGE_GROUPS = ("user", "project", "day")
# what a report row holds, in table order (headings: pw.USAGE_HEADINGS): (key in JSON, SQL over one group)
USAGE_FIGURES = (
    ("asks", "COUNT(*)"),
    ("done", "SUM(status = 'done')"),
    ("failed", "SUM(status = 'failed')"),
    ("cancelled", "SUM(status = 'cancelled')"),
    ("ai_minutes", "SUM(ai_s) / 60.0"),
    ("turns", "SUM(turns)"),
    ("tokens_in", "SUM(tokens_in)"),
    ("tokens_out", "SUM(tokens_out)"),
    ("cache_read_tokens", "SUM(cache_read)"),
    ("cache_write_tokens", "SUM(cache_write)"),
    ("cost_usd", "SUM(cost_usd)"),
    ("files_changed", "SUM(files)"),
    ("lines_added", "SUM(added)"),
    ("lines_removed", "SUM(removed)"),
    # a job cancelled while queued waited until it was cancelled
    ("queue_wait_minutes", "SUM(COALESCE(started, finished) - created) / 60.0"),
    ("checked", "COUNT(checks)"),  # jobs whose result was checked ([box] checks) ...
    ("checks_passed", "SUM(checks)"),  # ... and of those, the ones where every check passed
)
GROUP_SQL = {"user": "user", "project": "user || '/' || project", "day": "date(created, 'unixepoch')"}


def migrate_usage_columns(db: sqlite3.Connection) -> None:
    """Add the usage columns to a state db from before 0.3 and fill them from each job's
    stored result and stats. In one write transaction: a second process (a `usage` on the
    box while the server starts) waits, then finds the columns there."""
    if set(USAGE_COLUMNS) <= _job_columns(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        missing = [c for c in USAGE_COLUMNS if c not in _job_columns(db)]
        for column in missing:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {USAGE_COLUMNS[column]}")
        rows = db.execute("SELECT id, result, stats FROM jobs WHERE result IS NOT NULL OR stats IS NOT NULL")
        for job_id, result, stats in rows.fetchall():
            figures = usage_columns(json.loads(result or "null"), json.loads(stats or "null"))
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in figures)} WHERE id = ?",
                       [*figures.values(), job_id])
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _job_columns(db: sqlite3.Connection) -> Set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(jobs)")}


def usage_columns(result: Optional[dict], stats: Optional[dict]) -> dict:
    """A finished job's usage columns from its result summary and diff stats. The AI's
    figures are data: anything that is not a number counts as unknown (NULL), never as 0."""
    result, stats = result or {}, stats or {}
    def number(value: Any) -> Optional[float]:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    tokens = {"tokens_in": number(result.get("tokens_in")), "tokens_out": number(result.get("tokens_out")),
              "cache_read": number(result.get("cache_read_tokens")),
              "cache_write": number(result.get("cache_write_tokens"))}
    counted = (result.get("network") or {}).get("api_tokens") if isinstance(result.get("network"), dict) else None
    if isinstance(counted, dict):  # the gateway read them from the API's own answers: they win
        tokens = {column: number(counted.get(key)) for column, key in GATEWAY_TOKEN_COLUMNS.items()}
    return {"ai_s": number(result.get("duration_s")), "turns": number(result.get("num_turns")), **tokens,
            "cost_usd": number(result.get("cost_usd")), "files": number(stats.get("files")),
            "added": number(stats.get("added")), "removed": number(stats.get("removed")),
            "checks": checks_passed(result.get("checks"))}


def checks_passed(receipt: Any) -> Optional[int]:
    """A job's `checks` usage column: 1 when every check passed, 0 when one failed, None
    without checks."""
    runs = receipt.get("runs") if isinstance(receipt, dict) else None
    if not isinstance(runs, list) or not runs:
        return None
    return int(all(isinstance(run, dict) and run.get("ok") is True for run in runs))


# usage column <- the gateway's count (UsageScanner): when the AI's API traffic went through the
# gateway, the box counted the tokens from the API's answers itself, so an AI CLI that misreports
# (or a prompt-injected one that prints a made-up result line) cannot change a user's usage
GATEWAY_TOKEN_COLUMNS = {"tokens_in": "input", "tokens_out": "output", "cache_read": "cache_read",
                         "cache_write": "cache_write"}


def usage_report(store: Store, since: float, until: float, group: str, user: Optional[str] = None,
                 users: Sequence[str] = ()) -> dict:
    """Asks and their figures per user, project or (UTC) day for jobs created in
    [since, until), with totals. `users` are the configured ones: a user with history who
    is no longer configured is reported as removed (derived, never stored)."""
    key = GROUP_SQL[group]
    figures = ", ".join(sql for _, sql in USAGE_FIGURES)
    where = "created >= ? AND created < ?" + (" AND user = ?" if user is not None else "")
    params: List[Any] = [since, until] + ([user] if user is not None else [])
    with store.lock:
        rows = store.db.execute(f"SELECT {key}, {figures} FROM jobs WHERE {where} GROUP BY 1 ORDER BY 1",
                                params).fetchall()
        total = store.db.execute(f"SELECT {figures} FROM jobs WHERE {where}", params).fetchone()
        job_users = [r[0] for r in store.db.execute(f"SELECT DISTINCT user FROM jobs WHERE {where}", params)]
    names = [name for name, _ in USAGE_FIGURES]
    out = [_round_figures(dict(zip(["key"] + names, row))) for row in rows]
    for row in out:
        if group != "day":
            row["user"] = row["key"].split("/")[0]
            row["user_removed"] = row["user"] not in users
    return {"since": since, "until": until, "group": group, "user": user, "rows": out,
            "total": _round_figures(dict(zip(names, total))), "removed_users": sorted(set(job_users) - set(users))}


def _round_figures(row: dict) -> dict:
    """SUM over no known value is NULL: report 0. Floats rounded for reading, not summing."""
    for name, _ in USAGE_FIGURES:
        value = row[name] or 0
        row[name] = round(value, 6) if isinstance(value, float) else value
    return row


def usage_answer(agent: "Agent", user: str, query: Dict[str, str]) -> dict:
    """GET /v1/usage: a user sees their own usage; an admin everyone's, or one user's. Asking
    for another user without being an admin is 403 whether or not that user exists."""
    group = query.get("group", "user")
    if group not in USAGE_GROUPS:
        raise BadRequest(f"group must be one of {', '.join(USAGE_GROUPS)}")
    wanted = query.get("user")
    if wanted is not None and wanted != user:
        require_admin(agent, user, "other users' usage")
    if not agent.is_admin(user):
        wanted = user
    try:
        since = parse_time(query.get("since"), 0.0)
        until = parse_time(query.get("until"), time.time() + 1, end_of_day=True)
    except UsageError as e:
        raise BadRequest(e.message, e.hint)
    return usage_report(agent.store, since, until, group, wanted, list(agent.cfg.users))


def require_admin(agent: "Agent", user: str, what: str) -> None:
    if not agent.is_admin(user):
        raise HTTPFailure(HTTPStatus.FORBIDDEN, f"only an admin may read {what}",
                          "ask the box's admin, or use an admin token ([users.NAME] admin = true)",
                          code="forbidden")


TIME_RE = re.compile(r"^(\d{1,12})([smhdw])$")  # 10^12 weeks: long before any date
TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: Optional[str], default: float, end_of_day: bool = False, now: Optional[float] = None) -> float:
    """A point in time from `7d` / `12h` (that long ago), `2026-11-01` (a UTC day: its start, or
    its end for an --until), an ISO date and time (UTC unless it names an offset), or Unix
    seconds."""
    if text is None or text == "":
        return default
    now = time.time() if now is None else now
    relative = TIME_RE.match(text.strip())
    if relative:
        return now - int(relative.group(1)) * TIME_UNITS[relative.group(2)]
    try:
        seconds = float(text) if len(text) <= 64 else math.nan
        if math.isfinite(seconds):
            return seconds
    except ValueError:
        pass
    try:  # a day past 9999-12-30 overflows datetime; so does an offset at the ends of its range
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
            return (day + dt.timedelta(days=1 if end_of_day else 0)).timestamp()
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))  # 3.9 reads no Z
        return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()
    except (ValueError, OverflowError):
        raise UsageError(f"{clip(text, 40)!r} is not a time",
                         "use 7d, 12h, 2026-11-01, 2026-11-01T09:30 or Unix seconds") from None


# ================================================================== git: snapshots and job folders


# Everything of one user lives under state/users/NAME (so a sandbox or an rrsync key can be
# given exactly one user's folder):
#     users/NAME/mirror/PROJECT/                        what the laptop rsyncs (rrsync's DIR)
#     users/NAME/projects/PROJECT/git                   snapshots, job results (bare git dir)
#     users/NAME/projects/PROJECT/slots/slotN/          warm job folders, the AI's cwd


def user_root(state_dir: Path, user: str) -> Path:
    return state_dir / "users" / user


def box_folder_unwritable(folder: Any, why: str) -> PatchwireError:
    """A folder of the state folder the agent's account cannot write: the box admin's to fix,
    so the answer names the folder and their command (a bare 500 told the developer nothing)."""
    account = pwd.getpwuid(os.geteuid()).pw_name
    return PatchwireError(f"the box cannot write its folder {folder} ({why})",
                          f"ask the box's admin to give it back to the agent's account ({account}): "
                          f"sudo chown -R {account} {folder}; `patchwire-agent doctor` checks this",
                          http_status=HTTPStatus.SERVICE_UNAVAILABLE, code="box_folder")


def mirror_root(state_dir: Path, user: str) -> Path:
    """STATE/users/USER/mirror: the laptop knows the layout (pw.MIRROR_LAYOUT) to check it."""
    return state_dir.joinpath(*(part.format(user=user) for part in pw.MIRROR_LAYOUT[:-1]))


def user_projects(state_dir: Path, user: str) -> Set[str]:
    """The user's projects: those with a mirror or a repository on the box."""
    names: Set[str] = set()
    for folder in (mirror_root(state_dir, user), user_root(state_dir, user) / "projects"):
        try:
            names.update(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            pass
    return names


def migrate_layout(state_dir: Path) -> None:
    """Move a 0.3 state folder (mirror/NAME, projects/NAME) to users/NAME. Worktrees record
    their folder's absolute path: point them at the new place."""
    for old, new in (("mirror", "mirror"), ("projects", "projects")):
        top = state_dir / old
        if not top.is_dir() or top.is_symlink():
            continue
        for user in os.listdir(top):
            target = user_root(state_dir, user) / new
            if pw.NAME_RE.fullmatch(user) and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(top / user, target)
                log.warning("moved %s to %s (one folder per user)", top / user, target)
        if not os.listdir(top):
            top.rmdir()
    for gitdir_file in state_dir.glob("users/*/projects/*/git/worktrees/*/gitdir"):
        slot = gitdir_file.parent.name
        home = gitdir_file.parents[3]
        moved = f"{home / 'slots' / slot / '.git'}\n"
        if gitdir_file.read_text() != moved:
            gitdir_file.write_text(moved)


# the stores' upkeep (ProjectRepo.maintain): one `git gc` in the whole agent at a time, its
# settings from the command line whatever a store's own config says (an AI that reached it
# unconfined cannot make gc run a hook or prune what is younger than two weeks)
UPKEEP_ONE_AT_A_TIME = threading.Lock()
UPKEEP_CONFIG = {"gc.autoDetach": "false", "gc.pruneExpire": "2.weeks.ago", "gc.worktreePruneExpire": "3.months.ago"}
# what the upkeep keeps: the last snapshot (its ref), each job's result until `patchwire-agent
# gc` prunes the job (JOB_REFS + id), and what the job folders' indexes hold
SNAPSHOT_REF = "refs/patchwire/snapshot"
JOB_REFS = "refs/patchwire/jobs/"
CHECK_AHEAD_WAIT_S = 10.0  # a job waits this long at most for its folder's check ahead to end


class ProjectRepo:
    """One user's project on the box: the mirror the laptop rsyncs into, a private git dir
    holding snapshots, and warm job folders (worktrees), one per slot."""

    # below this much index (about 5,000 files) two git processes over every file cost less
    # than four over the changed paths: the folder is reset whole and `add -A` collects
    # (bench/prepare.py: at 2,000 files 34 against 36 ms, at 20,000 files 132 against 59 ms)
    BY_PATHS_MIN_INDEX_BYTES = 512 * 1024
    # from this many files a project's first job folder is the mirror itself, moved into place
    # (_adopt_mirror), not a checkout of every file (bench/first_snapshot.py: 43,737 files, 4.8 s)
    ADOPT_MIN_FILES = 5000

    def __init__(self, state_dir: Path, user: str, project: str):
        self.state_dir = state_dir
        self.mirror = mirror_root(state_dir, user) / project
        self.mirror_rel = str(self.mirror.relative_to(state_dir))
        self.home = user_root(state_dir, user) / "projects" / project
        self.git_dir = self.home / "git"
        self.lock = threading.Lock()
        # no system or global config, no ~/.config/git/ignore: what the AI writes must not
        # vanish from the diff because of the box user's own excludes (any git version)
        empty_home = str(state_dir / "git-home")
        self.git_env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                        "HOME": empty_home, "XDG_CONFIG_HOME": empty_home}
        # the snapshot commit the mirror was found to be by the last full snapshot, with the
        # snapshot index's stat data, until anything else touches either (under self.lock)
        self._mirror_is: Optional[str] = None
        self._upkept_at = -float("inf")  # time.monotonic() of the last `maintain`
        # per slot: how often the folder was taken or reset (prepare_slot, clean_slot,
        # reset_slot_to), and a check ahead that holds (check_ahead): (that count, index stat)
        self._uses: Dict[int, int] = {}
        self._ahead: Dict[int, Tuple[int, List[int]]] = {}
        self._checking: Dict[int, threading.Event] = {}  # set when the slot's running check ends

    def git(self, work_tree: Optional[Path] = None, config: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None, **env: str) -> Git:
        return Git(git_dir=self.git_dir, work_tree=work_tree, cwd=Path(cwd) if cwd else self.home,
                   env={**self.git_env, **env},
                   config=config)

    # git's upkeep of the store: every ask leaves a few loose objects (the changed files'
    # blobs, their folders' trees, commits; a first snapshot one tree per folder), and the
    # agent's git runs with gc.auto=0. `gc --auto` packs them past git's own threshold (about
    # 300 asks) and prunes the unreachable ones older than two weeks; at most once an hour
    UPKEEP_LOOSE = 6700
    UPKEEP_EVERY_S = 3600.0

    def maintain(self) -> None:
        """`git gc --auto` of the project's store when it is due (it returns at once below
        UPKEEP_LOOSE loose objects), after a job has ended (Agent.run_job): no job waits on
        it; a second call while one runs returns."""
        if time.monotonic() - self._upkept_at < self.UPKEEP_EVERY_S or not UPKEEP_ONE_AT_A_TIME.acquire(blocking=False):
            return  # another project's upkeep runs (one user's many projects never run many gc at once)
        try:
            self._upkept_at = time.monotonic()
            done = self.git(config={**UPKEEP_CONFIG, "gc.auto": str(self.UPKEEP_LOOSE)}).run(
                "gc", "--auto", "--quiet", check=False)
            if done.returncode:
                log.warning("git gc of %s failed: %s", self.git_dir, done.stderr.decode("utf-8", "replace")[-500:])
        finally:
            UPKEEP_ONE_AT_A_TIME.release()

    def ensure(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            self.make_mirror()
            pw.prepare_private_git_dir(self.git_dir)
        except OSError as e:  # e.g. a folder root made or chowned: the developer cannot fix it
            raise box_folder_unwritable(e.filename or self.home, e.strerror or str(e))

    def make_mirror(self) -> None:
        """The mirror folder, made where missing without following a link on the way (one is
        refused later, by open_mirror, with its name)."""
        try:
            pw.make_folder(self.state_dir, self.mirror_rel)
        except pw.UnsafePath:
            pass

    # --- snapshots

    @contextlib.contextmanager
    def open_mirror(self):
        """A descriptor of the mirror folder, reached from the state folder without following a
        link (pw.open_folder). The user's SSH key can rsync a symlink over their own project
        folder (`app -> ../../bob/mirror/web`): followed, an ask would hash bob's files into
        this user's store, delete or prune them. Such a link is refused, and the project's
        own is replaced by an empty folder, so the laptop's fallback full sync refills it."""
        try:
            fd = pw.open_folder(self.state_dir, self.mirror_rel)
        except pw.UnsafePath as e:
            if self._mirror_is_a_link():
                self.mirror.unlink()
                self.mirror.mkdir(mode=0o700)
                (self.home / "snapshot.tree").unlink(missing_ok=True)  # the next ask is a full one
                hint = "sync again (patchwire sync --force); the box put an empty folder in its place"
            else:
                hint = f"the box's admin: replace that link with a real folder under {self.state_dir}"
            raise Conflict(f"{e.message}: the box's copy of the project cannot be read", hint,
                           code=pw.CODE_TREE_MISMATCH, paths=[])
        try:
            yield fd
        finally:
            os.close(fd)

    def _mirror_is_a_link(self) -> bool:
        """Whether the project folder itself is the link (rsync can put one there), not a
        folder further up (that is the admin's to mend)."""
        try:
            return stat.S_ISLNK(pw.lstat_beneath(self.state_dir, self.mirror_rel))
        except pw.UnsafePath:
            return False

    def snapshot_git(self, mirror_fd: int, first: bool = False) -> Git:
        """Git on the mirror with the snapshot index (INDEX_CONFIG: an ask of changes rewrites only
        the entries it changed, not all of a 100,000-file index). Its work tree is the folder
        the descriptor holds, not a path looked up again: git starts in it (on Linux through
        /proc/self/fd, which the child inherits) and takes "." as its work tree. `first`: the
        project's first snapshot, whose blobs go into one pack (FIRST_SNAPSHOT_CONFIG)."""
        config = {**pw.INDEX_CONFIG, **(FIRST_SNAPSHOT_CONFIG if first and bulk_checkin_works() else {})}
        return self.git(Path("."), config, cwd=pinned_folder(mirror_fd, self.mirror),
                        GIT_INDEX_FILE=str(self.home / "snapshot.index"))

    def snapshot(self, tree: str, manifest: List[Tuple[str, str, str]]) -> str:
        """A commit of exactly the listed files, as they are in the mirror. Files the laptop
        no longer lists are pruned from the mirror first (rsync --files-from never deletes)."""
        with self.lock:
            self.ensure()
            with self.open_mirror() as fd:
                first = not (self.home / "snapshot.index").exists()
                git = self.snapshot_git(fd)
                kept = self._kept_entries(git, manifest)
                links = [path for mode, _, path in manifest if mode == "120000" and path not in kept]
                try:
                    index_paths(git, fd, [path for _, _, path in manifest], links, kept,
                                first=self.snapshot_git(fd, first=True) if first else None)
                except ProcessError as e:  # a folder or a fifo where a file is listed: not what was sent
                    (self.home / "snapshot.tree").unlink(missing_ok=True)  # the index may hold part of it
                    drop_partial_packs(self.git_dir)
                    raise Conflict(f"the box's copy of the project cannot hold what the laptop sent: {e.message}",
                                   "sync again (patchwire sync --force)", code=pw.CODE_TREE_MISMATCH,
                                   paths=[path for _, _, path in manifest][:200])
                got = self._write_snapshot_tree(git)
                if got != tree:
                    theirs = {path: (mode, sha) for mode, sha, path in manifest}
                    mine = git.ls_files_stage()
                    differ = sorted(p for p in set(mine) | set(theirs) if mine.get(p) != theirs.get(p))
                    named = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
                    raise Conflict(f"the box's copy of the project differs from what the laptop "
                                   f"sent in {len(differ)} file(s): {named}", "sync again (patchwire sync --force)",
                                   code=pw.CODE_TREE_MISMATCH, paths=differ[:200])
                commit = self._snapshot_commit(got)
                self._mirror_is = commit if len(manifest) >= self.ADOPT_MIN_FILES and not kept else None
                if not kept:
                    self._sparse_mark().unlink(missing_ok=True)
                return commit

    def _sparse_mark(self) -> Path:
        """Present while the mirror lacks files the snapshot index holds (_adopt_mirror moved
        them into a job folder)."""
        return self.home / "mirror.sparse"

    def _kept_entries(self, git: Git, manifest: List[Tuple[str, str, str]]) -> Set[str]:
        """In a mirror that lacks files (_sparse_mark), the listed paths it lacks whose mode and
        blob the snapshot index holds already: the snapshot keeps those entries, as an ask of
        changes keeps every unchanged one (the box hashed them itself from what the laptop
        sent). Any other missing file is dropped, and the tree then differs: 409."""
        if not self._sparse_mark().exists():
            return set()
        missing = {raw.decode("utf-8", "surrogateescape")
                   for raw in git("ls-files", "-z", "--deleted").split(b"\0") if raw}
        indexed = git.ls_files_stage()
        return {path for mode, sha, path in manifest if path in missing and indexed.get(path) == (mode, sha)}

    def snapshot_changes(self, tree: str, base: str, changed: List[str], deleted: List[str],
                         content: Sequence[Tuple[str, str, int, bytes]] = ()) -> str:
        """The same commit in O(changed): the index the last snapshot left must hold `base`
        (else 409: a new box, a reset state folder, another laptop's sync in between); the
        deleted paths go from it and from the mirror, the files the ask carries (`content`,
        check_content) are written into the mirror, the changed ones are hashed from the
        mirror, and the result must be `tree`. Files in the mirror that the laptop did not
        send are never read: the snapshot's other blobs are the ones already recorded."""
        with self.lock:
            self.ensure()
            self._mirror_is = None
            with self.open_mirror() as fd:
                if self._indexed() != base:
                    raise Conflict("the box's copy of the project is not the one the laptop last sent "
                                   "(a new box, a reset state folder, or another laptop's sync)",
                                   "sync again (patchwire sync --force)", code=pw.CODE_TREE_MISMATCH, paths=[])
                git = self.snapshot_git(fd)
                for path in deleted:
                    try:
                        pw.remove_file(fd, path)
                    except (OSError, PatchwireError):
                        pass  # already gone, or beneath a link: the index drops it all the same
                try:
                    write_content(fd, content)
                    update_mirror_index(git, fd, changed, deleted)
                except (ProcessError, pw.UnsafePath, OSError) as e:  # a folder, or beneath a link: not what was sent
                    (self.home / "snapshot.tree").unlink(missing_ok=True)  # the index may hold part of it
                    why = e.message if isinstance(e, PatchwireError) else f"{e.filename or ''}: {e.strerror or e}"
                    raise Conflict(f"the box's copy of the project cannot hold what the laptop sent: {why}",
                                   "sync again (patchwire sync --force)", code=pw.CODE_TREE_MISMATCH,
                                   paths=changed[:200])
                got = self._write_snapshot_tree(git)
                if got != tree:
                    raise Conflict(f"the box's copy of the project differs from what the laptop sent in "
                                   f"{len(changed)} changed file(s)", "sync again (patchwire sync --force)",
                                   code=pw.CODE_TREE_MISMATCH, paths=changed[:200])
                return self._snapshot_commit(got)

    def _snapshot_commit(self, tree: str) -> str:
        """The snapshot's commit, and SNAPSHOT_REF at it: the snapshot index's blobs stay
        reachable for git's upkeep once no job's ref holds them (gc dropped old jobs' refs, a
        job failed before its result), as the job folders' indexes are."""
        commit = pw.write_commit(self.git_dir, tree, None, "patchwire snapshot")
        write_ref(self.git_dir, SNAPSHOT_REF, commit)
        return commit

    def _indexed(self) -> Optional[str]:
        """The tree the snapshot index holds, as written beside it by the last snapshot (reading
        the file costs nothing; `write-tree` reads the whole index)."""
        try:
            return (self.home / "snapshot.tree").read_text().strip() or None
        except OSError:
            return None

    def _write_snapshot_tree(self, git: Git) -> str:
        keep_split_small(git, self.home / "snapshot.index")
        tree = git.text("write-tree")
        (self.home / "snapshot.tree").write_text(tree)
        return tree

    # --- job folders

    def slot_path(self, slot: int) -> Path:
        return self.home / "slots" / f"slot{slot}"

    def slot_git(self, slot: int, **env: str) -> Git:
        """Git for a job folder, through its own worktree git dir (never the folder's .git
        file, which the AI could rewrite)."""
        path = self.slot_path(slot)  # also the cwd: `git apply` reads paths relative to it
        return Git(git_dir=self.git_dir / "worktrees" / f"slot{slot}", work_tree=path,
                   cwd=path if path.is_dir() else self.home, env={**self.git_env, **env}, config=SLOT_INDEX_CONFIG)

    def prepare_slot(self, slot: int, commit: str, carry: Optional[Tuple[str, str]] = None) -> Path:
        """Move the slot's warm worktree to `commit` (O(changed)); ignored files such as build
        caches survive, everything else is exactly the snapshot. A folder that cannot be made
        clean is thrown away and rebuilt. `carry` (base, result) brings an earlier job's
        change along, for a follow-up ask."""
        checking = self._checking.get(slot)
        if checking is not None:  # a check ahead still runs (the ask came fast): its answer, not a second status
            checking.wait(CHECK_AHEAD_WAIT_S)
        with self.lock:
            self._make_slot(slot, commit)
            if carry:
                self._carry(slot, *carry)
                self._seal_index(slot, None)  # `apply --index` wrote it
            return self.slot_path(slot)

    def _make_slot(self, slot: int, commit: str) -> None:
        checked = self._checked_ahead(slot)
        self._used(slot)
        for attempt in (1, 2):
            try:
                if not self._slot_is_registered(slot) and not self._adopt_mirror(slot, commit):
                    self._create_slot(slot, commit)
                if not self._move_slot(slot, commit, checked=checked and attempt == 1):
                    self._reset_slot(slot, commit)
                self._check_slot_clean(slot, commit)
                return
            except (PatchwireError, OSError) as e:
                if attempt == 2:
                    raise PatchwireError(f"job folder {self.slot_path(slot)} cannot be made clean: {e}")
                log.warning("job folder %s is not clean (%s); rebuilding it", self.slot_path(slot), e)
                self._remove_slot(slot)

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
        self._register_slot(slot, commit, checkout=True)
        self._seal_index(slot, commit)  # a fresh index, written by the agent over a fresh folder

    def _register_slot(self, slot: int, commit: str, checkout: bool) -> Path:
        """A new worktree at the slot's path (whatever was there removed, never through a
        link), at `commit`: its files checked out, or none (`checkout` False); its path."""
        path = self.slot_path(slot)
        if path.exists() or path.is_symlink():
            remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.git()("worktree", "prune")
        how = [] if checkout else ["--no-checkout"]
        self.git(config=PARALLEL_CHECKOUT)("worktree", "add", *how, "--detach", "-f", str(path), commit)
        return path

    def _adopt_mirror(self, slot: int, commit: str) -> bool:
        """A project's first job folder, made by moving the mirror into its place when the mirror
        is `commit` (the full snapshot just hashed it, ADOPT_MIN_FILES or more): one rename
        instead of writing every file again, and the snapshot index's stat data are the folder's
        (the same inodes, ctimes and mtimes). _make_slot then checks the folder against that
        index as for any warm folder (`status`; a file rsync changed since, a link rrsync
        munged: reset whole). The mirror starts again empty: later syncs send whole files into
        it (rsync has nothing to diff against), a full sync (409) sends every file. False, and
        nothing changed, when it cannot be done: the job folder is then checked out."""
        if self._mirror_is != commit:
            return False
        self._mirror_is = None  # whatever happens next, the mirror is not known to be it any more
        path, gitdir = self._register_slot(slot, commit, checkout=False), self._slot_gitdir(slot)
        (path / ".git").unlink()  # written again by _mend_slot_links
        path.rmdir()
        index = gitdir / "index"  # the snapshot index whole (no shared part: that is beside the git dir)
        shutil.copy2(self.home / "snapshot.index", index)
        self.git(GIT_INDEX_FILE=str(index), config={"core.splitIndex": "false"})("update-index", "--no-split-index")
        if not self._move_mirror_to(path):
            self._remove_slot(slot)
            return False
        self._mend_slot_links(slot)
        self._seal_index(slot, commit)
        log.info("job folder %s: the project's first, moved from its mirror", path)
        return True

    def _move_mirror_to(self, path: Path) -> bool:
        """Rename the mirror to `path` (beneath descriptors: never through a link the user's
        rsync put on the way) and make a new, empty mirror. The mirror must then be a folder of
        the agent's own, and no process may have its working folder in it (an rsync still
        writing: its files would land in the job folder), else it goes back."""
        parent = pw.open_folder(self.state_dir, str(Path(self.mirror_rel).parent))
        try:
            os.rename(self.mirror.name, path, src_dir_fd=parent)
        except OSError as e:  # another file system, say
            log.info("the mirror %s cannot become a job folder (%s): checked out instead", self.mirror, e)
            return False
        finally:
            os.close(parent)
        found = os.lstat(path)
        taken = stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid() and not processes_within(path)
        if not taken and stat.S_ISDIR(found.st_mode):
            with contextlib.suppress(OSError):
                os.rename(path, self.mirror)  # back, unless a new sync made the mirror meanwhile
        if not self.mirror.is_dir() or self.mirror.is_symlink():  # the files went: syncs refill it
            self._sparse_mark().write_text("the mirror's files went into a job folder; syncs refill it\n")
            self.make_mirror()
        return taken

    def _slot_gitdir(self, slot: int) -> Path:
        return self.git_dir / "worktrees" / f"slot{slot}"

    def _mend_slot_links(self, slot: int) -> Path:
        """Drop stale locks and write the folder's .git file again (the AI may have rewritten
        it; the agent's own git calls never read it). The worktree's git dir."""
        gitdir = self._slot_gitdir(slot)
        for lock in ("index.lock", "HEAD.lock"):
            (gitdir / lock).unlink() if (gitdir / lock).exists() else None
        dotgit = self.slot_path(slot) / ".git"
        with contextlib.suppress(FileNotFoundError):  # a FIFO would block the write for ever, a
            if stat.S_ISDIR(os.lstat(dotgit).st_mode):  # hard link write through to its twin
                remove_tree(dotgit)
        replace_file(dotgit, f"gitdir: {gitdir}\n".encode())
        return gitdir

    def _reset_slot(self, slot: int, commit: str) -> None:
        """The whole folder back to `commit`: one stat pass (checkout -f) and one walk (clean
        -ffd). An index the agent did not write last (its seal differs: the AI reached the git
        dir, or an agent's run ended half way) is not trusted for its stat data: it is read
        again from `commit` and every file compared by content (refresh), so that a file the
        AI changed behind forged stat data is rewritten too."""
        self._mend_slot_links(slot)
        git = self.slot_git(slot)
        if not self._index_is_sealed(slot):
            self._rebuild_index(slot, commit)
        for step in (("checkout", "-q", "-f", "--detach", commit), ("clean", "-q", "-ffd")):
            done = unstalled(self.slot_path(slot), lambda: git.run(*step))  # noqa: B023 (called at once)
            refuse_unread_folders(done.stderr)  # clean_slot then makes it anew
        self._seal_index(slot, self._head(slot))

    def _head(self, slot: int) -> str:
        """The job folder's HEAD, read from its file (a detached HEAD holds the commit's id)."""
        try:
            return (self._slot_gitdir(slot) / "HEAD").read_text().strip()
        except OSError:
            return ""

    def _rebuild_index(self, slot: int, commit: str) -> None:
        gitdir = self._slot_gitdir(slot)
        for old in [gitdir / "index", *gitdir.glob("sharedindex.*")]:
            old.unlink(missing_ok=True)
        git = self.slot_git(slot)
        git("read-tree", commit)
        git.run("update-index", "-q", "--refresh", check=False)  # exits 1 when files differ: checkout mends them

    # --- the seal of a job folder's index: which index the agent wrote last, by the index file's
    # inode, size, mtime and ctime (the kernel sets ctime on every write; no process can set
    # it back), kept beside the project's git dir, out of the sandbox's sight. An index the
    # AI rewrote (it can reach the git dir when it runs unconfined) could claim a file it
    # changed is the snapshot's, with stat data that match: `checkout -f` would keep it.

    def _seal_path(self, slot: int) -> Path:
        return self.home / f"slot{slot}.seal"

    def _index_stat(self, slot: int) -> List[int]:
        found = os.stat(self._slot_gitdir(slot) / "index")
        return [found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns]

    def _seal_index(self, slot: int, tree: Optional[str]) -> None:
        """Seal the index the agent just wrote; `tree`: the tree (or commit) it holds, when known."""
        try:
            replace_file(self._seal_path(slot), json.dumps({"stat": self._index_stat(slot), "tree": tree}).encode())
        except OSError:
            self._seal_path(slot).unlink(missing_ok=True)

    def _sealed(self, slot: int) -> Optional[dict]:
        """The seal, when the index is still the one the agent wrote last (else None)."""
        try:
            seal = json.loads(self._seal_path(slot).read_bytes())
            return seal if isinstance(seal, dict) and seal.get("stat") == self._index_stat(slot) else None
        except (OSError, ValueError):
            return None

    def _index_is_sealed(self, slot: int) -> bool:
        return self._sealed(slot) is not None

    def _move_slot(self, slot: int, commit: str, checked: bool = False) -> bool:
        """Move the folder to `commit` by the paths that differ, when its index is the agent's
        and holds a known tree, and the folder is exactly that index: `status` (one stat pass;
        with git's untracked cache only the folders whose stat data changed are read; none
        when `checked` ahead, check_ahead), one `diff-tree` between the two trees, then those
        paths alone (_move_paths). False when it cannot be done so (a .gitignore or a nested
        repository changed, a path in the way): the folder is then reset whole."""
        seal = self._sealed(slot)
        if seal is None or not seal.get("tree") or not self._large(slot):
            return False
        gitdir = self._mend_slot_links(slot)
        git = self.slot_git(slot)
        if not checked and not folder_is_its_index(git):
            return False
        raw = git.run("diff-tree", "-r", "-z", "--no-renames", seal["tree"], commit, check=False)
        if raw.returncode:
            return False
        moved = parse_raw_diff(raw.stdout)
        if any(ignore_rules_move(path, old, new) for old, new, _, path in moved):
            return False
        try:
            self._move_paths(slot, git, moved, seal["tree"], commit)
        except (PatchwireError, OSError) as e:
            log.info("job folder %s: moving by the changed paths failed (%s); resetting it whole",
                     self.slot_path(slot), e)
            self._seal_index(slot, None)  # the agent's own writes: trusted, the tree unknown
            return False
        replace_file(gitdir / "HEAD", f"{commit}\n".encode())  # a detached HEAD: the commit's id
        self._seal_index(slot, commit)
        return True

    # --- the job folder checked ahead: the `status` of _move_slot made while the laptop still
    # scans and sends (its GET /v1/me comes first: Agent.check_ahead), not after its ask came.
    # Between the check and the job only a process an earlier job of this project left running
    # could write there, and it could as well while the AI runs: its writes would show in the
    # diff either way, never silently. The check holds while the index is the one checked
    # (inode, size, mtime, ctime) and the folder was not taken or reset since (`_uses`).

    def check_ahead(self, slot: int) -> bool:
        """Check the folder as _move_slot would, without writing its index; remembered for the
        next prepare_slot of `slot` when it is clean. Whether it was."""
        with self.lock:
            seal = self._sealed(slot)
            if seal is None or not seal.get("tree") or not self._large(slot) or slot in self._checking:
                return False  # prepare_slot would not move it by paths, or a check runs
            uses, index_then = self._uses.get(slot, 0), self._current_index_stat(slot)
            if index_then is None:
                return False
            if self._ahead.get(slot) == (uses, index_then):
                return True  # checked since the folder was last taken, and its index unchanged
            self._checking[slot] = threading.Event()
        clean = False
        try:
            clean = folder_is_its_index(self.slot_git(slot, GIT_OPTIONAL_LOCKS="0"))
        finally:
            with self.lock:
                if clean and self._uses.get(slot, 0) == uses and self._current_index_stat(slot) == index_then:
                    self._ahead[slot] = (uses, index_then)
                else:
                    clean = False
                self._checking.pop(slot).set()
        return clean

    def _checked_ahead(self, slot: int) -> bool:
        """(under self.lock) Whether a check ahead of the folder still holds; it is used once."""
        found = self._ahead.pop(slot, None)
        return found is not None and found == (self._uses.get(slot, 0), self._current_index_stat(slot))

    def _used(self, slot: int) -> None:
        """(under self.lock) The folder is taken or reset: a check ahead no longer holds."""
        self._ahead.pop(slot, None)
        self._uses[slot] = self._uses.get(slot, 0) + 1

    def _current_index_stat(self, slot: int) -> Optional[List[int]]:
        try:
            return self._index_stat(slot)
        except OSError:
            return None

    def _large(self, slot: int) -> bool:
        """Whether the folder's index (with its shared part) is over BY_PATHS_MIN_INDEX_BYTES."""
        return self._index_bytes(slot) >= self.BY_PATHS_MIN_INDEX_BYTES

    def _index_bytes(self, slot: int) -> int:
        gitdir = self._slot_gitdir(slot)
        try:
            return sum(path.stat().st_size for path in [gitdir / "index", *gitdir.glob("sharedindex.*")])
        except OSError:
            return 0

    # A move of many paths (a twentieth of the index's entries or more: a branch switch) goes by
    # git's two-tree merge; fewer by the paths alone. The merge reads every entry of both trees
    # (a 20,000-file folder: 31 ms against 13 ms for one changed file), but keeps the index's
    # cache of trees whole, where updating it by paths leaves each changed folder's tree to the
    # result's `write-tree` after the job (2,500 files moved: 6-10 ms against 27-72 ms)
    MERGE_MOVE_SHARE = 20
    INDEX_ENTRY_BYTES = 64  # about, of a path of some 20 characters

    def _move_paths(self, slot: int, git: Git, moved: List[Tuple[str, str, str, bytes]], tree: str,
                    commit: str) -> None:
        """The index and the folder from `tree` to `commit` by the paths that differ (`moved`).
        Many: git's two-tree merge, as a branch switch does it (`read-tree -m -u`), which removes
        what went and puts a file where a folder was or the other way round, never through a
        link, and refuses (the folder is then reset whole) when a file the index does not hold
        and no .gitignore names stands in the way. Few: paths whose type changed or that went
        are removed first, never through a link; then the index and the files take the new
        tree's entries. Either writes the files with a worker per core."""
        if not moved:
            return
        if len(moved) * self.MERGE_MOVE_SHARE >= self._index_bytes(slot) // self.INDEX_ENTRY_BYTES:
            git("read-tree", "-m", "-u", tree, commit)
            return
        folder = self.slot_path(slot)
        for old, new, _, path in moved:
            if old != "000000" and new != old:
                pw.remove_file(folder, path.decode("utf-8", "surrogateescape"))
        git("update-index", "-z", "--index-info",
            input=b"".join(b"%s %s\t%s\0" % (new.encode(), (blob if new != "000000" else "0" * 40).encode(), path)
                           for _, new, blob, path in moved))
        written = b"".join(path + b"\0" for _, new, _, path in moved if new != "000000")
        if written:
            git("checkout-index", "-u", "-f", "-z", "--stdin", input=written)

    def _check_slot_clean(self, slot: int, commit: str) -> None:
        """`checkout -f` (one stat pass) and `clean -ffd` (one walk) exit non-zero on whatever
        they could not write or remove; that they did their work is not walked again (two
        more passes over every file, 0.2 s at 100,000 files). HEAD must be the snapshot: read
        from its file (a detached HEAD holds the commit's id), no process."""
        if self._head(slot) != commit:
            raise PatchwireError(f"job folder HEAD is not at {commit}")

    def _remove_slot(self, slot: int) -> None:
        remove_tree(self.slot_path(slot))
        remove_tree(self.git_dir / "worktrees" / f"slot{slot}")
        self.git()("worktree", "prune")

    def clean_slot(self, slot: int) -> None:
        """Throw away what an interrupted run left in the job folder."""
        with self.lock:
            self._used(slot)
            if self._slot_is_registered(slot):
                try:
                    self._reset_slot(slot, "HEAD")
                except (PatchwireError, OSError):
                    self._remove_slot(slot)

    # --- [box] setup: its inputs and the hash of the last one that succeeded here

    def setup_inputs(self, slot: int, commands: List[str], globs: List[str]) -> str:
        """A hash of the setup commands and of each file `globs` names, by its blob id in the
        job folder's index (what the snapshot holds: no file is read)."""
        digest = hashlib.sha256(json.dumps(commands).encode())
        wanted = pw.Globs(globs)
        for entry in self.slot_git(slot)("ls-files", "-s", "-z").split(b"\0"):
            meta, _, path = entry.partition(b"\t")
            name = path.decode("utf-8", "surrogateescape")
            if path and wanted.match(name):
                digest.update(meta.split(b" ")[1] + b" " + path + b"\0")
        return digest.hexdigest()

    def _setup_stamp(self, slot: int) -> Path:
        return self.git_dir / "worktrees" / f"slot{slot}" / SETUP_STAMP

    def last_setup(self, slot: int) -> Optional[str]:
        try:
            return self._setup_stamp(slot).read_text().strip() or None
        except OSError:
            return None

    def remember_setup(self, slot: int, digest: str) -> None:
        self._setup_stamp(slot).write_text(digest + "\n")

    def forget_setup(self, slot: int) -> None:
        self._setup_stamp(slot).unlink(missing_ok=True)

    def changed_paths(self, slot: int) -> List[str]:
        """Paths in the job folder that differ from its index and git does not ignore."""
        # no optional locks: status would write a refreshed index, breaking its seal
        out = unstalled(self.slot_path(slot), lambda: self.slot_git(slot, GIT_OPTIONAL_LOCKS="0")(
            "status", "--porcelain", "-z", "--untracked-files=all", "--no-renames", "--ignore-submodules=all"))
        return [entry[3:].decode("utf-8", "replace") for entry in out.split(b"\0") if entry]

    def reset_slot_to(self, slot: int, commit: str) -> None:
        """The job folder exactly at `commit` again (a check may have rewritten files);
        ignored files stay."""
        with self.lock:
            self._used(slot)
            if not self._move_slot(slot, commit):
                self._reset_slot(slot, commit)

    def tree_of(self, commit: str) -> str:
        return self.git().text("rev-parse", commit + "^{tree}")

    # --- symlinks out of the project

    def remove_escaping_links(self, slot: int) -> Dict[str, str]:
        """Remove the tracked symlinks that resolve outside the job folder, before the AI
        starts: through `evil -> /elsewhere` an AI writing `evil/x` would write outside, and
        nothing of it would show in the diff. {path: target} of those removed."""
        root = real(self.slot_path(slot))
        removed = {}
        for path in symlink_entries(self.slot_git(slot)("ls-files", "-s", "-z")):
            full = os.path.join(root, path)
            if os.path.islink(full) and not is_within(os.path.realpath(full), root):
                removed[path] = os.readlink(full)
                os.unlink(full)
        return removed

    def restore_links(self, slot: int, links: Dict[str, str]) -> None:
        """Put back the removed links the AI did not replace (so they are no change in the
        diff); a path the AI wrote keeps what the AI wrote."""
        root = self.slot_path(slot)
        for path, target in links.items():
            full = root / path
            if not os.path.lexists(full) and full.parent.is_dir() and is_within(
                    os.path.realpath(full.parent), real(root)):  # never through a link the AI made
                os.symlink(target, full)

    # --- results

    def _leave_out_repositories(self, git: Git, nested: List[str]) -> str:
        """Drop from the job folder's index the repositories the AI made inside it (`git add`
        records each as a gitlink; a snapshot never holds one); the tree then written. With a
        gitlink in its index, a later `status` of the folder outside the AI's sandbox would run
        the repository's own programs (its config's filters). Its files stay in the folder until
        the next reset; the change goes without them (stats["repositories_left_out"])."""
        log.info("job folder: left out of the change the repositories the AI made: %s", ", ".join(nested[:10]))
        git("update-index", "--force-remove", "-z", "--stdin",
            input=b"".join(path.encode("utf-8", "surrogateescape") + b"\0" for path in nested))
        return git.text("write-tree")

    def collect(self, slot: int, snapshot: str, job_id: str, patch: BinaryIO, max_bytes: int) -> Tuple[dict, str]:
        """(stats, result commit) of everything the AI changed in the job folder. Its patch goes
        from git's stdout straight into the file `patch`: a change of any size never passes
        through the agent's memory. Past `max_bytes` ([jobs] max_diff_mb) git is stopped by the
        kernel (RLIMIT_FSIZE) and DiffTooLarge raised: a 1 GB file costs no GB of patch."""
        if not self._index_is_sealed(slot):  # the index is not the one the agent wrote: not trusted
            self._rebuild_index(slot, snapshot)
        git = self.slot_git(slot)
        # objects and the index written by `add` are capped too, with room for a big project's
        # index: a file whose compressed blob is over the cap makes a diff over it as well
        index = self.git_dir / "worktrees" / f"slot{slot}" / "index"
        room = 2 * (index.stat().st_size if index.exists() else 0) + 64 * MIB
        # what the AI changed: one stat pass, and (untracked cache) only the folders whose stat
        # data changed are read; `add -A` of those paths alone (a new folder: all it holds)
        empty: List[str] = []  # repositories the AI made without a commit: git cannot add them
        folder = self.slot_path(slot)
        if not self._large(slot):
            empty = unstalled(folder, lambda: add_all(git, max(max_bytes, room)))
        else:
            listed = unstalled(folder, lambda: git.run("status", "--porcelain", "-z", "--no-renames", "-unormal",
                                                       "--ignore-submodules=all"))
            refuse_unread_folders(listed.stderr)
            touched = worktree_paths(listed.stdout)
            if touched:
                empty = unstalled(folder, lambda: add_all(git, max(max_bytes, room), "--pathspec-from-file=-",
                                                          "--pathspec-file-nul",
                                                          input=b"".join(path + b"\0" for path in touched)))
        # the result's tree first (cache-tree: O(changed)), then diffs of tree against tree, which
        # skip every subtree whose id is the same; `diff --cached` compared the whole index
        tree = git.text("write-tree")
        diff_args = ("diff", "-M", "--no-ext-diff", "--no-textconv", "--no-color")
        nested, stats, written = raw_and_numstat(git(*diff_args, "--raw", "--numstat", "-z", snapshot, tree))  # small
        if nested:
            tree = self._leave_out_repositories(git, nested)
            nested_again, stats, written = raw_and_numstat(git(*diff_args, "--raw", "--numstat", "-z", snapshot, tree))
            if nested_again:
                raise PatchwireError(f"a repository inside the job folder stayed in its index: {nested_again[0]}")
        refuse_huge_files(folder, written, max_bytes)
        run_capped(git, max_bytes, *diff_args, "--binary", "--full-index", snapshot, tree, stdout=patch)
        if nested or empty:
            stats["repositories_left_out"] = sorted(empty + nested)
        result = pw.write_commit(self.git_dir, tree, snapshot, f"patchwire job {job_id}")
        write_ref(self.git_dir, JOB_REFS + job_id, result)
        self._seal_index(slot, tree)  # `add -A`: the index is the folder, and holds `tree`
        return stats, result


GITLINK_MODE = "160000"  # git's mode of a repository inside another (a submodule's commit)


def raw_and_numstat(out: bytes) -> Tuple[List[str], dict, List[str]]:
    """(paths that became a repository, a gitlink; the counts of parse_numstat; the paths of
    the files the result adds or changes) from one `git diff --raw --numstat -z`: its raw
    records (":old new oldid newid status\0path\0", a second path after a rename's or copy's)
    come first, then the numstat's."""
    nested: List[str] = []
    written: List[str] = []
    at = 0
    while out.startswith(b":", at):
        end = out.index(b"\0", at)
        meta = out[at + 1:end].decode().split(" ")
        at = end + 1
        for _ in range(2 if meta[4][:1] in ("R", "C") else 1):
            end = out.index(b"\0", at)
            path = out[at:end]
            at = end + 1
        if meta[1] == GITLINK_MODE:
            nested.append(path.decode("utf-8", "surrogateescape"))
        elif meta[4][:1] != "D" and meta[2] != meta[3]:  # not a pure rename or mode change
            written.append(path.decode("utf-8", "surrogateescape"))
    return nested, parse_numstat(out[at:]), written


def refuse_huge_files(folder: Path, written: List[str], max_bytes: int) -> None:
    """`git diff --binary` holds each blob whole: a 3 GB sparse file (`truncate -s 3G`, which
    costs the AI neither disk nor memory) took git 3 GB and compresses to nothing, so the
    patch's own cap never fired. A file written over BLOB_FACTOR times [jobs] max_diff_mb
    (at least 64 MiB) fails the job as too large, before any diff reads it. Its size is its
    blob's (no filter or conversion runs in a job folder), read without a process."""
    cap = max(BLOB_FACTOR * max_bytes, 64 * MIB)
    for path in written:
        with contextlib.suppress(OSError):
            size = os.lstat(folder / path).st_size
            if size > cap:
                raise DiffTooLarge(f"{path} holds {size} bytes, over {cap}")


BLOB_FACTOR = 4


class DiffTooLarge(PatchwireError):
    """A job's change is over [jobs] max_diff_mb (the job fails with the reason)."""


# `git add` of a repository made inside the folder that has no commit yet (an AI's `git init`)
EMPTY_REPOSITORY = re.compile(rb"^error: '(.+?)/?' does not have a commit checked out$")


def add_all(git: Git, max_bytes: int, *args: str, input: Optional[bytes] = None) -> List[str]:
    """`git add -A` (capped as run_capped) of the job folder, past the repositories the AI
    made without a commit (git stops at one: "does not have a commit checked out"), which
    are left out and returned; any other error fails as before."""
    proc = run_capped(git, max_bytes, "add", "-A", "--ignore-errors", *args, input=input, check=False)
    refuse_unread_folders(proc.stderr)
    if not proc.returncode:
        return []
    errors = [line for line in proc.stderr.splitlines() if line.startswith(b"error: ")]
    empty = [m.group(1).decode("utf-8", "surrogateescape") for m in map(EMPTY_REPOSITORY.match, errors) if m]
    if not empty or len(empty) != len(errors):
        raise ProcessError(git.argv(["add", "-A", *args]), proc.returncode, proc.stderr)
    return empty


def run_capped(git: Git, max_bytes: int, *args: str, stdout: Optional[BinaryIO] = None,
               input: Optional[bytes] = None, check: bool = True) -> "pw.subprocess.CompletedProcess":
    """Run git with every file it writes capped at `max_bytes`. Past the cap the kernel sends
    SIGXFSZ (subprocess restores its default action, which ends git), or a write fails with
    EFBIG where it is ignored: either is DiffTooLarge, any other failure a ProcessError
    (without `check`: the process, for the caller to judge)."""
    proc = git.run(*args, check=False, stdout=stdout, max_file_bytes=max_bytes, input=input)
    if proc.returncode == -signal.SIGXFSZ or (proc.returncode and b"File too large" in proc.stderr):
        raise DiffTooLarge(f"git {args[0]} passed {max_bytes} bytes")
    if proc.returncode and check:
        raise ProcessError(git.argv(args), proc.returncode, proc.stderr)
    return proc


# the job folders' index also keeps git's untracked cache: `status` then reads only the folders
# whose stat data changed (ctime too: no process can set it back), not all of them. Checkouts
# of more than 100 files write them with one worker per core (git 2.32+; older gits ignore
# it): a first job folder of 20,000 files took 7.6-9.2 s with one, 4.7-5.6 s with two cores
PARALLEL_CHECKOUT = {"checkout.workers": "0"}
# A project's first snapshot hashes every file of the mirror. As loose objects that is one
# deflated file per blob (43,737 files of a real npm tree: 150 MB on disk); with every blob
# over one byte "big" (bulk checkin), `update-index` streams them into ONE pack, deflated at
# level 1: 43 MB, no 40,000 file creations, and the job folder's checkout reads one mmapped
# pack (bench/first_snapshot.py). Only that command gets it: for diffs, bigFileThreshold
# would also mean "binary". update-index checks blobs in one transaction from git 2.39 here
# (before, each big blob could become a pack of its own): older gits keep loose objects.
FIRST_SNAPSHOT_CONFIG = {"core.bigFileThreshold": "1", "core.compression": "1"}
BULK_CHECKIN_GIT = (2, 39)


@functools.lru_cache(maxsize=1)
def bulk_checkin_works() -> bool:
    """Whether this box's git packs a first snapshot's blobs in one transaction (BULK_CHECKIN_GIT)."""
    found = re.search(rb"(\d+)\.(\d+)", pw.Git().run("--version", check=False).stdout)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= BULK_CHECKIN_GIT
SLOT_INDEX_CONFIG = {**pw.INDEX_CONFIG, "core.untrackedCache": "true", **PARALLEL_CHECKOUT}


def folder_is_its_index(git: Git) -> bool:
    """Whether `status` of a job folder finds nothing that differs from its index, nor a file it
    does not hold and no .gitignore names (one stat pass; with git's untracked cache only the
    folders whose stat data changed are read). A folder it cannot read, say: False."""
    status = unstalled(Path(git.cwd), lambda: git.run("status", "--porcelain", "-z", "--no-renames", "-unormal",
                                                      "--ignore-submodules=all", check=False))
    return not status.returncode and not worktree_changes(status.stdout)


def worktree_changes(status: bytes) -> bool:
    """Whether `git status --porcelain -z --no-renames` lists a file the folder has and its
    index does not ("??") or one that differs from its index (Y not " "); what the index
    holds against HEAD (X) does not count."""
    return bool(worktree_paths(status))


def worktree_paths(status: bytes) -> List[bytes]:
    """The paths of worktree_changes: untracked ones ("dir/" for a new folder) and those that
    differ from the index."""
    return [entry[3:] for entry in status.split(b"\0") if entry and (entry[:2] == b"??" or entry[1:2] != b" ")]


def parse_raw_diff(raw: bytes) -> List[Tuple[str, str, str, bytes]]:
    """[(old mode, new mode, new blob, path)] of `git diff-tree -r -z --no-renames` (records
    ":oldmode newmode oldblob newblob status\0path\0")."""
    fields = raw.split(b"\0")
    out = []
    for meta, path in zip(fields[::2], fields[1::2]):
        old, new, _, blob, _ = meta.lstrip(b":").decode().split(" ")
        out.append((old, new, blob, path))
    return out


def ignore_rules_move(path: bytes, old: str, new: str) -> bool:
    """A changed .gitignore (what was ignored may not be any longer: `clean` must look again)
    or a nested repository (a gitlink, 160000): for the whole reset."""
    return path.rsplit(b"/", 1)[-1] == b".gitignore" or "160000" in (old, new)


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it), private."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def symlink_entries(listing: bytes) -> List[str]:
    """The symlinks' paths in `git ls-files -s -z` ("120000 <blob> <stage>\t<path>\0" each)."""
    return [record.partition(b"\t")[2].decode("utf-8", "surrogateescape")
            for record in pw.records_tagged(listing, b"120000 ")]


def index_paths(git: Git, mirror_fd: int, paths: List[str], links: List[str], kept: AbstractSet[str] = frozenset(),
                first: Optional[Git] = None) -> None:
    """Make the index hold exactly `paths`, then delete every other file from the mirror:
    rsync --files-from never deletes on the receiving side. `links`: the paths the laptop
    says are symlinks (the only ones that may be). `kept`: paths whose entries stay as they
    are, not read from the mirror (ProjectRepo._kept_entries). `first`: the index is new and
    empty; import_files fills it when every file is a plain one, else this git (bulk checkin:
    ProjectRepo.snapshot_git) hashes them."""
    try:
        index_links = link_entries(git, mirror_fd, links)
    except pw.UnsafePath as e:
        raise Conflict(f"the box's copy of the project cannot hold what the laptop sent: {e.message}",
                       "sync again (patchwire sync --force)", code=pw.CODE_TREE_MISMATCH, paths=links[:200])
    linked = {path for path, _ in index_links}
    stale = sorted(set(git.ls_files_stage()) - set(paths))
    todo = [p for p in paths if p not in linked and p not in kept]
    if not (first and not stale and import_files(git, mirror_fd, todo)):
        pw.update_index_paths(first or git, todo, stale)
    add_link_entries(git, index_links)
    for raw in git("ls-files", "-z", "--others").split(b"\0"):  # git's own walk: fast
        if raw:
            pw.remove_file(mirror_fd, raw.decode("utf-8", "surrogateescape"))


# A first snapshot's files, stored by `git fast-import` (one pack, no search for deltas, deflate
# level 1) from what the agent reads itself: `update-index --add` looks for every new blob among
# the objects and packs first (about 20 system calls each, none found), 6.5 s for 43,737 files
# against 2.7 s so (bench/first_snapshot.py).
# (unpackLimit 0: a pack however few the files, never a loose object each)
FAST_IMPORT = ("-c", "core.compression=1", "-c", "pack.compression=1", "-c", "fastimport.unpackLimit=0",
               "fast-import", "--quiet", "--depth=0")
IMPORT_CHUNK = 1 << 20


def import_files(git: Git, mirror_fd: int, paths: List[str]) -> bool:
    """Store the plain files `paths` of the mirror in one pack and make the (new, empty) index
    hold them, with their stat data (`update-index --refresh`): what `update-index --add`
    makes of them, faster. Each file is opened beneath the mirror's descriptor, no link
    followed on the way or at the end (BeneathReader); its blob id is the sha1 of what was
    read. False, the index untouched, when a path is anything but a plain file there (a
    link, a folder, a fifo, gone) or changes size while read: update-index then does it all."""
    entries: List[bytes] = []
    proc = pw.spawn(git.argv(FAST_IMPORT), cwd=git.cwd, env=git.env)  # --quiet: it writes nothing back
    reader = BeneathReader(mirror_fd)
    try:
        for path in paths:
            found = reader.read_into(path, proc.stdin)
            if found is None:
                return False
            entries.append(b"%s %s\t%s\0" % (found[0].encode(), found[1].encode(), pw.encode_path(path)))
        proc.stdin.close()
        if proc.wait() != 0:
            log.info("fast-import failed (%s): the first snapshot is hashed by update-index", proc.stderr.read()[-500:])
            return False
    except (OSError, ValueError):  # fast-import gone (a full disk), a file unreadable: update-index says
        return False
    finally:
        reader.close()
        if proc.poll() is None:  # given up half way: no pack of half the files
            proc.kill()
            proc.wait()
            drop_partial_packs(Path(str(git.git_dir)))
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
    git("update-index", "-z", "--index-info", input=b"".join(entries))
    git.run("update-index", "-q", "--refresh", check=False)  # stat data; 1 when a file changed since: kept so
    return True


# An index in split mode (INDEX_CONFIG) writes its own part whole at every write and leaves
# the rest in a shared part. git writes a new shared part only when enough entries are new
# to it; an entry whose stat data or blob changed is "replaced" in the own part and never
# counted. After a first snapshot's refresh every entry was: the snapshot index's own part
# held all 20,000 (1.3 MB), written twice by every ask (update-index, write-tree: ~25 ms
# each here). Past RESPLIT_ENTRIES entries in its own part it is split again, once.
RESPLIT_ENTRIES = 2000


def keep_split_small(git: Git, index: Path) -> None:
    """`update-index --split-index` (a new shared part: one whole write) when the index's own
    part (its header's count of entries) holds more than RESPLIT_ENTRIES."""
    header = pw.index_header(index)
    if header is not None and header[1] > RESPLIT_ENTRIES:
        git.run("update-index", "--split-index", check=False)


def drop_partial_packs(git_dir: Path) -> None:
    """Remove the pack a git process was writing when it was stopped or failed (fast-import
    given up, `update-index` with bulk checkin refusing a path): garbage of up to every file."""
    for partial in (git_dir / "objects" / "pack").glob("tmp_pack_*"):
        partial.unlink(missing_ok=True)


class BeneathReader:
    """Files read beneath a folder's descriptor in path order, each folder opened once (the
    paths of one folder are together in git's order), never through a link: every component
    is opened with O_NOFOLLOW; the file must be a plain one before it is opened (never a fifo
    or a device) and after (fstat; O_NONBLOCK: one swapped in between never blocks)."""

    def __init__(self, root_fd: int):
        self.stack: List[Tuple[str, int]] = [("", root_fd)]

    def close(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop()[1])

    def _folder(self, parent: str) -> int:
        while self.stack[-1][0] and not (parent + "/").startswith(self.stack[-1][0] + "/"):
            os.close(self.stack.pop()[1])
        here = self.stack[-1][0]
        for name in filter(None, parent[len(here):].split("/")):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.stack[-1][1])
            here = f"{here}/{name}" if here else name
            self.stack.append((here, fd))
        return self.stack[-1][1]

    def read_into(self, path: str, out: IO[bytes]) -> Optional[Tuple[str, str]]:
        """(git mode, blob id) of the plain file `path`, its bytes written to `out` as a
        fast-import blob; None when it is not a plain file or changed size while read."""
        parent, _, name = path.rpartition("/")
        try:
            folder = self._folder(parent)
            if not stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                return None  # a fifo or a device rsync made is never opened (a writer would wake)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=folder)
        except OSError:
            return None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                return None
            size = found.st_size
            digest = hashlib.sha1(b"blob %d\0" % size)
            out.write(b"blob\ndata %d\n" % size)
            left = size
            while left:
                chunk = os.read(fd, min(left, IMPORT_CHUNK))
                if not chunk:
                    return None  # shrank while read: fast-import's stream is spoiled too; given up
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
            if os.read(fd, 1):
                return None  # grew while read
            out.write(b"\n")
            return ("100755" if found.st_mode & stat.S_IXUSR else "100644"), digest.hexdigest()
        finally:
            os.close(fd)


def write_content(mirror_fd: int, content: Sequence[Tuple[str, str, int, bytes]]) -> None:
    """Write the files an ask carries into the mirror, as `rsync -a` would have (bytes, the
    executable bit, the modification time), each by rename, never through a link: one in the
    way on a path's folders is UnsafePath, and one at the path itself is replaced, not
    followed. The user's own mirror: what rsync over the user's key may write there anyway."""
    for path, mode, mtime_ns, data in content:
        pw.write_worktree(mirror_fd, path, data, mode, mtime_ns=mtime_ns)


def update_mirror_index(git: Git, mirror_fd: int, changed: List[str], deleted: List[str]) -> None:
    """Re-hash `changed` from the mirror and drop `deleted` (an ask of changes): the changed
    paths that are symlinks are read by the agent itself (link_entries), the rest by git."""
    links = {p for p in changed if stat.S_ISLNK(pw.lstat_beneath(mirror_fd, p))}
    index_links = link_entries(git, mirror_fd, sorted(links))
    pw.update_index_paths(git, [p for p in changed if p not in links], deleted)
    add_link_entries(git, index_links)


# rrsync -munge (the key line's) stores a link the laptop sent as "/rsyncd-munged/" + its
# target, so that no link in a mirror resolves; the snapshot takes the target the laptop sent.
MUNGE_PREFIX = b"/rsyncd-munged/"


def link_entries(git: Git, mirror_fd: int, paths: List[str]) -> List[Tuple[str, str]]:
    """[(path, blob)] of the paths that are symlinks in the mirror, each blob the link's target
    as the laptop sent it, read with readlink beneath the mirror's descriptor (never resolved)
    and written into the store. A path that is not a link there is left to git."""
    out = []
    for path in paths:
        found = pw.read_worktree(mirror_fd, path) if stat.S_ISLNK(pw.lstat_beneath(mirror_fd, path)) else None
        if found:
            target = found[0][len(MUNGE_PREFIX):] if found[0].startswith(MUNGE_PREFIX) else found[0]
            out.append((path, write_blob(Path(str(git.git_dir)), target)))
    return out


def add_link_entries(git: Git, entries: List[Tuple[str, str]]) -> None:
    if entries:
        git("update-index", "-z", "--index-info",
            input=b"".join(b"120000 %s\t%s\0" % (blob.encode(), pw.encode_path(path)) for path, blob in entries))


def write_blob(git_dir: Path, data: bytes) -> str:
    """Store `data` as a loose blob (zlib over "blob <size>\\0" + data, named by its sha1: git's
    own format) and return its id; one write per link, no process."""
    return pw.write_object(git_dir, b"blob", data)


def write_ref(git_dir: Path, name: str, commit: str) -> None:
    """A new loose ref (`refs/...` holding the id: git's files backend), as `update-ref` writes it."""
    path = git_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, f"{commit}\n".encode())


def pinned_folder(fd: int, path: Path) -> str:
    """A cwd for a child process that is the folder `fd` holds: /proc/self/fd/N in the child
    (inherited across fork, resolved by the kernel, never by name). Without /proc (macOS) the
    path itself, which open_folder checked a moment before."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)


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


def processes_within(folder: Path) -> List[int]:
    """Processes of this account whose working folder is `folder` or beneath it (Linux:
    /proc/PID/cwd; others' are not readable, and none of them can write here). On a system
    without /proc, the agent's own account's processes cannot be seen: [] ."""
    inside, found = os.path.realpath(folder), []
    for pid in os.listdir("/proc") if os.path.isdir("/proc/self") else []:
        if pid.isdigit():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == inside or cwd.startswith(inside + os.sep):
                found.append(int(pid))
    return found


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with folders an AI made read-only or unreadable (open_up)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    try:
        shutil.rmtree(path)
    except OSError:
        open_up(path)
        shutil.rmtree(path)


def open_up(top: Path) -> None:
    """u+rwx on `top` and every folder beneath it (an AI's `chmod 0` or `chmod 300`), no link
    followed: what git and rmtree need to see and remove everything in it."""
    def open_folder(folder: str) -> None:
        with contextlib.suppress(OSError):
            mode = os.lstat(folder).st_mode  # (no O_NOFOLLOW open: a folder of mode 0 cannot be opened)
            if stat.S_ISDIR(mode):  # not a link put in its place: never followed
                os.chmod(folder, stat.S_IMODE(mode) | 0o700)
    open_folder(str(top))
    for entry in entries_beneath(top):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                open_folder(entry.path)  # before the walk enters it


# git opens each `.gitignore` (and `.gitattributes`) it passes: one the AI made a FIFO blocks
# it until a writer comes, which none does. While a job folder's git runs past GIT_STALL_S,
# the folder's FIFOs are let go (opened for writing and closed: git reads an empty file) and
# removed with its sockets (never part of a diff), every GIT_STALL_S; git itself runs on.
GIT_STALL_S = float(os.environ.get("PATCHWIRE_GIT_STALL_S", "10"))  # the environment: for tests
T = TypeVar("T")


def unstalled(folder: Path, run: Callable[[], T]) -> T:
    done = threading.Event()

    def watch() -> None:
        while not done.wait(GIT_STALL_S):
            if release_special_files(folder):
                log.warning("git stalled in %s on a FIFO the AI left: let go and removed", folder)
    threading.Thread(target=watch, name="git-stall-watch", daemon=True).start()
    try:
        return run()
    finally:
        done.set()


def release_special_files(top: Path) -> int:
    """Let go of and remove every FIFO, socket and device file beneath `top` (no link
    followed); how many."""
    removed = 0
    for entry in entries_beneath(top):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink():
                continue
        with contextlib.suppress(OSError):  # ENXIO: nobody reads it
            os.close(os.open(entry.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW))
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed += 1
    return removed


# git only warns of a folder it cannot read (`add -A`, `status`, `clean`), and goes on as if it
# were empty: what the AI hid there would be left out of the diff and kept for the next job
def refuse_unread_folders(stderr: bytes) -> None:
    """The laptop's reading of git's warnings (pw.git_unreadable), as a job's failure."""
    unread = pw.git_unreadable(stderr or b"")
    if unread:
        raise PatchwireError(f"the AI left a folder the agent cannot read ({sorted(unread)[0]}):"
                             " what it holds cannot be collected; the job folder is made anew")


# ================================================================== sandbox (confining the AI)
#
# Claude Code refuses writes outside its cwd itself (DESIGN.md), but not what an allowed command
# runs (a build, a test suite, `make`), and other agent CLIs have no such guard. The outer
# sandbox is what makes the job folder a boundary:
#   bwrap (Linux, bubblewrap): system folders read-only; hidden under empty tmpfs: the box
#     account's home (and /root, /home), /run, /var/tmp (where its secrets, its session and
#     agent sockets and other programs' scratch live) and the agent's state folder (every user's
#     mirror, job folders, jobs and diffs); the agent's config and TLS files and every other
#     Unix socket the account has bound covered by /dev/null. Then, later mounts winning, bound
#     back: the AI program's install folder and `[ai] readable` (read-only), the project's own
#     snapshot store (read-only: git in the job folder reads it, and hooks written there would
#     run as the agent), the job folder and the user's own AI home (writable; HOME points
#     there), and the admin's Claude login read-only inside it. /tmp and /dev/shm are the
#     AI's own, sized tmpfs. A user namespace with every capability dropped (even when the
#     agent runs as root, the AI holds none: no remount, no mount over its walls), its own
#     session (no TIOCSTI into a terminal) and PID namespace, killed with the agent. With
#     [network], its own network namespace too: the gateway's socket the one way out.
#   sandbox-exec (macOS): a generated profile with the same boundary for writes: only in the
#     job folder, a private TMPDIR and the user's AI home; the state folder unreadable except
#     the job folder, the snapshot store and that home. It does not hide the account's home
#     (the AI's programs live there on a Mac). With [network], outbound connections only to
#     the job's keyed gateway port (section "the gateway"). Only the profile text is tested
#     (no macOS in CI).
#
# Per-user AI state: Claude Code keeps settings, hooks, CLAUDE.md, sessions and transcripts in
# ~/.claude and ~/.claude.json; shared between users, one user's AI reads another's transcripts
# and plants hooks that run in their next job. So HOME is users/NAME/home, and only the box
# admin's credential enters it: bound read-only under bwrap, written afresh before each job
# otherwise (nothing else confines the AI then, and a copy it rewrites is its own user's).

SANDBOXES = ("auto", "bwrap", "sandbox-exec", "none")
SANDBOX_EXEC = "/usr/bin/sandbox-exec"
SANDBOX_PROFILE = """\
(version 1)
(allow default)
(deny file-write*)
(allow file-write*
    (subpath (param "JOB"))
    (subpath (param "TMP"))
    (subpath (param "HOME"))
    (literal "/dev/null") (literal "/dev/zero") (literal "/dev/dtracehelper")
    (regex #"^/dev/tty") (regex #"^/dev/fd/"))
(deny file-read-data file-read-xattr (subpath (param "STATE")))
(allow file-read-data file-read-xattr
    (subpath (param "JOB"))
    (subpath (param "TMP"))
    (subpath (param "HOME"))
    (subpath (param "GIT_DIR")))
"""
SANDBOX_NETWORK = """\
(deny network-outbound)
(allow network-outbound (remote ip "localhost:{port}"))
"""
# Where the box account keeps what is its own: secrets (~/.ssh, ~/.aws, ~/.netrc, ~/.claude),
# session and agent sockets (/run/user/UID/bus, gpg, ssh-agent), other programs' scratch.
HIDDEN_SYSTEM_FOLDERS = ("/root", "/home", "/run", "/var/run", "/var/tmp")
# System files that may be links into a hidden folder (systemd-resolved's stub lives in /run):
# bound back, or the AI cannot resolve its API's host name.
NEEDED_SYSTEM_FILES = ("/etc/resolv.conf",)
# The AI's environment is an allowlist: the agent's own may hold tokens for anything.
AI_ENV_NAMES = ("PATH", "LANG", "TERM", "TZ", "TMPDIR")
AI_CREDENTIAL_NAMES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
                       "ANTHROPIC_BASE_URL")
CREDENTIALS_FILE = ".credentials.json"  # Claude Code's login, in its config dir
MAX_HIDDEN_SOCKETS = 256


class Sandbox:
    """Which confinement the AI runs under, and the argv that applies it. `warning` says,
    loudly, when "auto" found none."""

    def __init__(self, kind: str, program: str = "", warning: str = ""):
        self.kind, self.program, self.warning = kind, program, warning

    @classmethod
    def choose(cls, setting: str, platform: str = sys.platform) -> "Sandbox":
        """The sandbox for `[ai] sandbox`: an explicit one that cannot run here is an error
        (the agent does not start); "auto" falls back to none with a warning."""
        if setting == "none":
            return cls("none")
        if setting in ("auto", "bwrap") and platform.startswith("linux"):
            program, why = probe_bwrap()
            if program:
                return cls("bwrap", program)
            if setting == "bwrap":
                raise PatchwireError(f'[ai] sandbox = "bwrap", but bubblewrap cannot run here: {why}',
                                     'install it (apt install bubblewrap) or set [ai] sandbox = "none"')
            return cls("none", warning=f"the AI runs UNCONFINED: bubblewrap cannot run here ({why}); "
                                       "install it (apt install bubblewrap), or set [ai] sandbox = \"none\" "
                                       "to accept this")
        if setting in ("auto", "sandbox-exec") and platform == "darwin" and os.access(SANDBOX_EXEC, os.X_OK):
            return cls("sandbox-exec", SANDBOX_EXEC)
        if setting == "auto":
            return cls("none", warning=f"the AI runs UNCONFINED: no sandbox is known on {platform}; set "
                                       "[ai] sandbox = \"none\" to accept this")
        raise PatchwireError(f"[ai] sandbox = {setting!r} is not available on {platform}",
                             'use "auto", or "none" to run the AI unconfined')

    def wrap(self, argv: List[str], env: dict, walls: "JobWalls", scratch: Path) -> Tuple[List[str], dict]:
        """(argv, env) that run `argv` inside `walls`. `scratch`: a private temporary folder
        (sandbox-exec; bwrap mounts a fresh /tmp)."""
        found = shutil.which(argv[0], path=env.get("PATH"))
        if self.kind == "none" or not found:  # not found: AIRun says so in its own words
            return argv, env
        if self.kind == "bwrap":
            programs = [Path(p) for p in (found, os.path.realpath(found), *argv[1:]) if os.path.isabs(p)]
            inner = process_limit_argv(walls.limits)
            if walls.gateway:  # the forwarder runs the AI as its child: the agent's own Python
                inner += [sys.executable, "-I", "-S", "-c", GATEWAY_FORWARDER, GATEWAY_SOCKET, str(GATEWAY_PORT)]
                programs += [Path(sys.executable), Path(os.path.realpath(sys.executable))]
            return bwrap_argv(self.program, inner + argv, walls, programs), {**env, "TMPDIR": "/tmp"}
        scratch.mkdir(parents=True, exist_ok=True)
        params = {"JOB": walls.job, "TMP": scratch, "STATE": walls.state, "GIT_DIR": walls.git_dir,
                  "HOME": walls.home}
        return (sandbox_exec_argv(self.program, argv, params, walls.gateway_port), {**env, "TMPDIR": real(scratch)})


class AILimits:
    """[ai] tmp_mb, max_processes and max_memory_mb (0: no limit). `processes_by` and
    `memory_by` say what enforces each on this box ("" when nothing can)."""

    def __init__(self, tmp_mb: int, max_processes: int, max_memory_mb: int):
        self.tmp_mb, self.max_processes, self.max_memory_mb = tmp_mb, max_processes, max_memory_mb
        self.processes_by, self.memory_by = "", ""

    def probe(self) -> "AILimits":
        """Find what enforces the limits here. The kernel never applies RLIMIT_NPROC to uid 0
        (a user namespace does not change the kernel's uid), so as root only a pids cgroup
        limits processes; an ordinary account gets `prlimit --nproc` inside its own user
        namespace, where it counts only the sandbox's processes. Memory is never RLIMIT_AS
        (JavaScript runtimes reserve far more address space than they use): a cgroup or none."""
        if cgroup_folder("pids"):
            self.processes_by = "cgroup"
        elif os.geteuid() != 0 and shutil.which("prlimit"):
            self.processes_by = "prlimit"
        if self.max_memory_mb and cgroup_folder("memory"):
            self.memory_by = "cgroup"
        return self

    def summary(self) -> dict:
        """What holds for a job, for its `started` event and doctor: None is "no limit"."""
        return {"tmp_mb": self.tmp_mb, "max_processes": self.max_processes if self.processes_by else None,
                "max_memory_mb": self.max_memory_mb if self.memory_by else None}

    def unlimited(self) -> str:
        """Why a limit does not hold, or ""."""
        why = []
        if not self.processes_by:
            why.append("processes are not limited (RLIMIT_NPROC never applies to root, and no "
                       "pids cgroup is writable)")
        if self.max_memory_mb and not self.memory_by:
            why.append("memory is unlimited (no writable memory cgroup: run the agent as root "
                       "on cgroup v1, or give it a delegated cgroup)")
        return "; ".join(why)


class JobWalls:
    """What one job's sandbox shows the AI: its job folder and its user's AI home writable,
    the project's snapshot store read-only, the program's folders and `readable` read-only;
    hidden: the state folder, the account's home and session folders, `secret_files`."""

    def __init__(self, job: Path, state: Path, git_dir: Path, home: Path, limits: AILimits,
                 secret_files: Sequence[Path] = (), readable: Sequence[str] = (),
                 credentials: Optional[Path] = None, gateway: Optional[Path] = None, gateway_port: int = 0):
        self.job, self.state, self.git_dir, self.home, self.limits = job, state, git_dir, home, limits
        self.secret_files, self.readable, self.credentials = list(secret_files), list(readable), credentials
        self.gateway = gateway  # bwrap: the job's gateway socket; its own network namespace, this the way out
        self.gateway_port = gateway_port  # sandbox-exec: the gateway's loopback port, the only way out

    def hidden_folders(self) -> List[str]:
        """System folders hidden under an empty tmpfs: the account's homes, /run, /var/tmp;
        never / itself, each once (/var/run is usually /run), and none inside another (a home
        under /home: a tmpfs on /home covering one on /home/NAME left bwrap unable to finish
        mounting the second, and every job failed)."""
        homes = [os.environ.get("HOME") or "", os.path.expanduser("~"), pwd.getpwuid(os.geteuid()).pw_dir]
        # the agent's own TMPDIR too: other jobs' gateway sockets are made there (socket_folder)
        homes.append(tempfile.gettempdir())
        kept = {folder for folder in (real(Path(p)) for p in (*homes, *HIDDEN_SYSTEM_FOLDERS) if p)
                if folder != "/" and os.path.isdir(folder) and not is_within(folder, "/tmp")}
        # nesting among those kept only: a home of "/" (systemd's DynamicUser) holds them all
        return sorted(folder for folder in kept if not any(o != folder and is_within(folder, o) for o in kept))


def real(path: Path) -> str:
    return os.path.realpath(str(path))


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def ai_home(state_dir: Path, user: str, project: Optional[str] = None) -> Path:
    """The user's own HOME for the AI: Claude Code's settings, sessions, transcripts and tool
    caches, never shared with another user. A project with a network of its own
    ([network.projects."P"]) has a home of its own too (`project`): a home shared with the
    user's other projects would carry what the AI planted there (a .pth file, a Claude Code
    hook) into that project's jobs, and its files out through another project's network."""
    return user_root(state_dir, user) / ("home" if project is None else f"homes/{project}")


def agent_credentials(environ: Optional[Dict[str, str]] = None) -> Optional[Path]:
    """The box admin's Claude Code login (`claude login`), when there is one: in
    $CLAUDE_CONFIG_DIR or ~/.claude of the agent's own environment."""
    environ = dict(os.environ) if environ is None else environ
    folder = environ.get("CLAUDE_CONFIG_DIR") or os.path.join(environ.get("HOME") or os.path.expanduser("~"),
                                                               ".claude")
    path = Path(folder) / CREDENTIALS_FILE
    return path if path.is_file() else None


def prepare_ai_home(state_dir: Path, user: str, credentials: Optional[Path], bound: bool,
                    project: Optional[str] = None) -> Path:
    """Make the user's AI home (700) and put the admin's login where Claude Code looks for it:
    an empty file for bwrap to bind the real one read-only onto (`bound`), or a fresh copy
    (600) written before every job. A copy left from an earlier job is replaced, never kept."""
    home = ai_home(state_dir, user, project)
    if project is not None:
        make_private_dir(home.parent)
    claude_dir, target = home / ".claude", home / ".claude" / CREDENTIALS_FILE
    for path in (claude_dir, target):  # the AI may have left a link, a file, a FIFO or a folder there
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(path).st_mode) and path == target:
                remove_tree(path)
            elif not stat.S_ISDIR(os.lstat(path).st_mode) or path == target:
                path.unlink()  # .claude as a file (mkdir would fail) or link; any credentials file
    make_private_dir(claude_dir)
    os.chmod(home, 0o700)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    if credentials:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            if not bound:
                f.write(credentials.read_bytes())
    return home


def bare_sandbox(bwrap: str, argv: List[str]) -> List[str]:
    """`argv` in a sandbox of bwrap's bare essentials: whether bwrap runs here at all."""
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
            "--unshare-user", "--cap-drop", "ALL", "--die-with-parent", *argv]


def probe_bwrap() -> Tuple[str, str]:
    """(path of bwrap, "") when it can make a sandbox here, else ("", why not)."""
    program = shutil.which("bwrap")
    if not program:
        return "", "bwrap is not installed"
    proc = pw.run(bare_sandbox(program, ["true"]), timeout=30, check=False)
    if proc.returncode != 0:
        return "", "bwrap fails: " + proc.stderr.decode("utf-8", "replace").strip()[-300:]
    return program, ""


def bwrap_argv(bwrap: str, argv: List[str], walls: JobWalls, programs: List[Path]) -> List[str]:
    """bubblewrap's argv. Mount order matters, later mounts win: the AI's own sized /tmp and
    /dev/shm; the hidden system folders; what the AI needs from inside them bound back; the
    state folder hidden (even inside what was bound back); then what the AI may use in it;
    last the secret files covered, and the hidden folders made read-only."""
    size = str(walls.limits.tmp_mb * 1024 * 1024)
    out = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm"]
    system = walls.hidden_folders()
    for folder in system:
        out += ["--tmpfs", folder]
    hidden = ["/tmp", *system]
    bound = bound_back(walls, programs, hidden)
    for path in bound:
        out += ["--ro-bind", path, path]
    state = real(walls.state)
    out += ["--tmpfs", state, "--ro-bind", real(walls.git_dir), real(walls.git_dir),
            "--bind", real(walls.job), real(walls.job), "--bind", real(walls.home), real(walls.home)]
    if walls.credentials:
        out += ["--ro-bind", real(walls.credentials), real(walls.home / ".claude" / CREDENTIALS_FILE)]
    for path in covered_files(walls, hidden + [state], bound):
        out += ["--ro-bind", "/dev/null", path]
    for folder in system + [state]:  # empty and read-only: writes there fail loudly, not into a void
        out += ["--remount-ro", folder]
    if walls.gateway:  # its own loopback only; the gateway's socket (in the private /tmp) the way out
        out += ["--unshare-net", "--bind", str(walls.gateway), GATEWAY_SOCKET]
    return out + ["--unshare-user", "--cap-drop", "ALL", "--unshare-pid", "--unshare-ipc", "--new-session",
                  "--die-with-parent", "--chdir", real(walls.job), "--"] + argv


def bound_back(walls: JobWalls, programs: List[Path], hidden: List[str]) -> List[str]:
    """What lies in a hidden folder and is bound back read-only: the AI program's install
    folders, `[ai] readable`, and system files that link into a hidden folder."""
    folders = {install_folder(real(p), hidden) for p in programs}
    folders |= {p for p in walls.readable if os.path.exists(p)}
    folders |= {real(Path(f)) for f in NEEDED_SYSTEM_FILES
                if os.path.exists(f) and any(is_within(real(Path(f)), h) for h in hidden)}
    return sorted(folders - {""})


def covered_files(walls: JobWalls, hidden: List[str], bound: List[str]) -> List[str]:
    """Files the AI could still see that it must not: the agent's config and TLS files and
    the account's Unix sockets (connect() works through a read-only bind), each covered
    by /dev/null unless a hidden folder already hides it."""
    def visible(path: str) -> bool:
        return not any(is_within(path, h) for h in hidden) or any(is_within(path, b) for b in bound)
    paths = [real(p) for p in walls.secret_files if p.exists()] + account_sockets()
    return sorted({p for p in paths if visible(p)})


def account_sockets() -> List[str]:
    """The Unix sockets on a path that this account owns (from /proc/net/unix: abstract ones,
    "@name", have no path and are issue 20's)."""
    try:
        lines = Path("/proc/net/unix").read_text(errors="replace").splitlines()[1:]
    except OSError:
        return []
    found: Set[str] = set()
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7].startswith("/") and len(found) < MAX_HIDDEN_SOCKETS:
            with contextlib.suppress(OSError):
                st = os.lstat(fields[7])
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
                    found.add(real(Path(fields[7])))
    return sorted(found)


def install_folder(path: str, hidden: List[str]) -> str:
    """What to bind back (read-only) for a program at `path` under a hidden folder: the
    folder it was installed in, one level below the hidden one (`/tmp/tools` for
    `/tmp/tools/node_modules/.bin/claude`: the package's own files come along); "" when
    `path` is not hidden or does not exist."""
    root = next((h for h in hidden if is_within(path, h) and path != h), "")
    if not root or not os.path.exists(path):
        return ""
    return os.path.join(root, os.path.relpath(path, root).split("/")[0])


def process_limit_argv(limits: AILimits) -> List[str]:
    """`prlimit` before the AI command when an RLIMIT_NPROC is what limits its processes
    (an ordinary account without a pids cgroup): inside the sandbox's own user namespace the
    kernel counts only the sandbox's processes against it."""
    if limits.processes_by != "prlimit":
        return []
    n = limits.max_processes
    return ["prlimit", f"--nproc={n}:{n}", "--"]


CGROUP_ROOT = Path("/sys/fs/cgroup")
# Runs before bwrap: puts itself (then, by exec, bwrap and all it starts) into the job's
# cgroups, so no process of the AI ever runs outside them (no preexec_fn: the agent is threaded).
CGROUP_ENTER = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def cgroup_folder(controller: str) -> Optional[Path]:
    """The cgroup v1 hierarchy of `controller` when this agent may make cgroups in it (as
    root, here), else None. Unified (v2) hierarchies are not used yet: a delegated one needs
    the agent's own processes moved out of its cgroup first."""
    folder = CGROUP_ROOT / controller
    if (folder / "cgroup.procs").is_file() and os.access(folder, os.W_OK):
        return folder
    return None


class JobCgroup:
    """The cgroups one job's AI runs in (pids.max, memory.limit_in_bytes), made before the
    run and removed after; `hit()` names the config key whose limit the AI reached."""

    LIMITS = {"pids": ("pids.max", "max_processes"), "memory": ("memory.limit_in_bytes", "max_memory_mb")}

    def __init__(self, limits: AILimits, name: str):
        self.limits, self.name = limits, name
        self.folders: Dict[str, Path] = {}

    def create(self) -> None:
        wanted = {"pids": self.limits.max_processes if self.limits.processes_by == "cgroup" else 0,
                  "memory": self.limits.max_memory_mb * 2**20 if self.limits.memory_by == "cgroup" else 0}
        for controller, value in wanted.items():
            root = cgroup_folder(controller) if value else None
            if root:
                folder = root / "patchwire" / self.name
                folder.mkdir(parents=True, exist_ok=True)
                (folder / self.LIMITS[controller][0]).write_text(str(value))
                self.folders[controller] = folder

    def wrap(self, argv: List[str]) -> List[str]:
        if not self.folders:
            return argv
        procs = [str(f / "cgroup.procs") for f in self.folders.values()]
        return ["/bin/sh", "-c", CGROUP_ENTER, "patchwire-cgroup", *procs, "--", *argv]

    def hit(self) -> str:
        """"[ai] max_processes = N" when a fork failed at pids.max, "[ai] max_memory_mb = N"
        when the kernel killed for memory; "" otherwise."""
        checks = {"pids": ("pids.events", "max"), "memory": ("memory.oom_control", "oom_kill")}
        for controller, folder in self.folders.items():
            name, field = checks[controller]
            with contextlib.suppress(OSError, ValueError):
                counts = dict(line.split() for line in (folder / name).read_text().splitlines())
                if int(counts.get(field, 0)):
                    key = self.LIMITS[controller][1]
                    return f"[ai] {key} = {getattr(self.limits, key)}"
        return ""

    def remove(self) -> None:
        """rmdir each cgroup (it must be empty: the AI's processes may take a moment to go)."""
        for folder in self.folders.values():
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def sandbox_exec_argv(program: str, argv: List[str], params: Dict[str, Path], gateway_port: int = 0) -> List[str]:
    """sandbox-exec's argv: the profile, with the paths passed as parameters (-D) so that no
    path is ever spliced into the profile's own syntax. With a gateway, every outbound
    connection but the one to its port is denied (TCP, UDP and Unix sockets alike: the box's
    services, other jobs' ports, DNS); the port, an integer the agent chose, is the one value
    written into the profile (SBPL reads a network filter's address as a literal)."""
    profile = SANDBOX_PROFILE
    if gateway_port:
        profile += SANDBOX_NETWORK.format(port=int(gateway_port))
    out = [program, "-p", profile]
    for name, path in params.items():
        out += ["-D", f"{name}={real(path)}"]
    return out + argv


# ================================================================== the gateway (the AI's only way out)
#
# Under bwrap each job has its own network namespace (--unshare-net): only its own loopback, no
# other job's ports, no service of the box, no abstract socket. Its one way out is this gateway,
# run by the agent: a Unix socket per job, bound into the sandbox, and a forwarder inside
# (GATEWAY_FORWARDER, run by the agent's own Python: it needs nothing the box lacks, where socat
# may be missing) that listens on a loopback port and passes each connection to the socket.
# HTTPS_PROXY and HTTP_PROXY point there, so curl, npm, pub, gradle and git's https reach the
# outside through CONNECT (TLS end to end: the gateway sees the host, never the content) or
# plain absolute-form requests, and only to hosts [network] allows. The AI's own API calls go
# to the same port in origin form (ANTHROPIC_BASE_URL): the gateway adds the box's credential
# and forwards them to [network] api_upstream, so the AI holds a placeholder key, never the
# credential. Every connection is counted per host for the job's egress report.
# Under sandbox-exec (a Mac: no network namespace) the gateway is a port of the job's own on
# the box's loopback, the profile lets out only to it, and each request carries the job's key
# (GatewayKey), since every local process can reach that port.

NETWORK_MODES = ("open", "allowlist", "none")
NETWORK_STRICTNESS = {mode: n for n, mode in enumerate(NETWORK_MODES)}
# Named host lists for what this tool's users build with (README.md, "Network").
NETWORK_PRESETS: Dict[str, Tuple[str, ...]] = {
    "anthropic": ("api.anthropic.com", "statsig.anthropic.com"),
    "github": ("github.com", "*.github.com", "*.githubusercontent.com", "codeload.github.com"),
    "pub": ("pub.dev", "*.pub.dev", "pub.dartlang.org", "storage.googleapis.com"),
    "npm": ("registry.npmjs.org", "*.npmjs.org", "registry.yarnpkg.com"),
    "pypi": ("pypi.org", "files.pythonhosted.org"),
    "maven-google": ("maven.google.com", "dl.google.com"),
    "gradle": ("services.gradle.org", "plugins.gradle.org", "plugins-artifacts.gradle.org",
               "downloads.gradle.org", "repo.maven.apache.org", "repo1.maven.org"),
    "cocoapods": ("cdn.cocoapods.org", "trunk.cocoapods.org", "github.com", "*.githubusercontent.com"),
    "crates": ("crates.io", "index.crates.io", "static.crates.io"),
    "go": ("proxy.golang.org", "sum.golang.org", "storage.googleapis.com"),
}
NETWORK_SCHEMA = {"mode": (str, "allowlist"), "allow": ("str_list", []), "presets": ("str_list", ["anthropic"]),
                  "api_upstream": (str, None), "credential_file": (str, None), "users": (dict, {}),
                  "projects": (dict, {})}
NETWORK_OVERRIDE_SCHEMA = {"mode": (str, None), "allow": ("str_list", None), "presets": ("str_list", None)}
NETWORK_MISSING = ("the config has no [network] table: every job shares the box's network (other jobs' "
                   "ports, the box's services, the whole internet) and holds the API credential; add "
                   '[network] mode = "allowlist" (README.md, "Network")')
GATEWAY_PORT = 3128  # the forwarder's port on the job's own loopback (nothing else is there)
GATEWAY_SOCKET = "/tmp/.patchwire-gateway.sock"  # where the job's socket appears in the sandbox
GATEWAY_PLACEHOLDER_KEY = "sk-ant-patchwire-gateway-placeholder"
GATEWAY_HEAD_MAX = 64 * 1024
GATEWAY_HEAD_BUDGET_S = 10.0
GATEWAY_MAX_CONNECTIONS = 64  # open at once, per job (each holds two threads of the agent)
GATEWAY_REFUSE_WAIT_S = 0.2  # for a refused connection's first bytes (holds that job's accepts)
EGRESS_EVENTS = 200  # network events per job; the summary counts everything
GATEWAY_CONNECT_TIMEOUT_S = 10
CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
OAUTH_BETA = "oauth-2025-04-20"  # Anthropic's API takes a Claude login's token with this beta
# Run inside the sandbox as `python -I -S -c GATEWAY_FORWARDER SOCKET PORT AI_ARGV...`: listen on
# the job's loopback, pass each connection to the gateway's socket, run the AI as a child and
# end with its exit status (the forwarder's threads die with it).
GATEWAY_FORWARDER = """
import os, socket, sys, threading
path, port, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(128)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
        try:
            s.shutdown(how)
        except OSError:
            pass
def accept():
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
pid = os.fork()
if pid == 0:
    listener.close()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        sys.stderr.write("cannot start the AI command %r: %s\\n" % (argv[0], e.strerror))
        os._exit(127)
status = os.waitpid(pid, 0)[1]
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


class NetworkPolicy:
    """Where one user's job in one project may connect: `mode`, host patterns, and the rule
    that set each (for the refusal's text)."""

    def __init__(self, mode: str, patterns: List[str], mode_rule: str, allow_rule: str):
        self.mode, self.patterns, self.mode_rule, self.allow_rule = mode, patterns, mode_rule, allow_rule

    def names_address(self, address: str, port: int) -> bool:
        """Whether an allow entry is this IP address itself (not a name, not a wildcard)."""
        return any(host_matches(p, address, port) for p in self.patterns if is_ip_literal(p, address))

    def allows(self, host: str, port: int) -> bool:
        if self.mode == "open":
            return True
        if self.mode == "none":
            return False
        return any(host_matches(pattern, host, port) for pattern in self.patterns)

    def refusal(self, host: str, port: int) -> str:
        if self.mode == "none":
            return (f"patchwire gateway: {host}:{port} refused: the network is off for this job "
                    f"({self.mode_rule}); the box's admin can allow hosts there")
        return (f"patchwire gateway: {host}:{port} is not allowed ({self.mode_rule}); the box's admin can "
                f'add "{host}" to {self.allow_rule} allow = [...] or use a preset (README.md, "Network")')


def split_pattern(pattern: str) -> Tuple[str, str]:
    """(host, port or "") of an allow entry: `host`, `host:port`, `[v6]`, `[v6]:port`, or a
    bare IPv6 address (its colons are no port)."""
    if pattern.startswith("["):
        name, close, rest = pattern[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return pattern, ""  # `[::1`, `[::1]x`: no host has that name
        return name, rest[1:]
    if pattern.count(":") == 1:
        name, _, port = pattern.partition(":")
        return name, port
    return pattern, ""


def is_ip_literal(pattern: str, address: str) -> bool:
    return split_pattern(pattern.lower())[0] == address.lower()


def host_matches(pattern: str, host: str, port: int) -> bool:
    """`host`, `*.domain` (any depth below it), `[v6]`, each optionally `:port` (else 80 and 443)."""
    name, want = split_pattern(pattern.lower())
    host = host.lower().rstrip(".").strip("[]")
    ports = {int(want)} if want.isdigit() else {80, 443}
    if port not in ports:
        return False
    if name.startswith("*."):
        return host.endswith(name[1:])
    return host == name


class NetworkConfig:
    """[network], read once: defaults, per-user and per-project (name pattern) overrides. The
    most specific `mode` wins (project, then user, then [network]); allow and presets add up."""

    def __init__(self, path: Path, data: Optional[dict]):
        self.configured = data is not None  # an older config without [network]: the box's network
        table = pw.Schema(path, "network", NETWORK_SCHEMA).read(data or {})
        self.base = self._check(path, "network", table)
        self.users = {name: self._check(path, f"network.users.{name}",
                                        pw.Schema(path, f"network.users.{name}", NETWORK_OVERRIDE_SCHEMA).read(t))
                      for name, t in table["users"].items()}
        self.projects = {pattern: self._check(path, f"network.projects.{pattern}", pw.Schema(
            path, f"network.projects.{pattern}", NETWORK_OVERRIDE_SCHEMA).read(t))
            for pattern, t in table["projects"].items()}
        self.api_upstream: Optional[str] = table["api_upstream"]
        self.credential_file = config_relative(path, table["credential_file"]) if table["credential_file"] else None
        if self.api_upstream and urllib.parse.urlsplit(self.api_upstream).scheme not in ("http", "https"):
            raise PatchwireError(f"{path}: network.api_upstream must be an http:// or https:// URL")

    @staticmethod
    def _check(path: Path, where: str, table: dict) -> dict:
        if table["mode"] is not None and table["mode"] not in NETWORK_MODES:
            raise PatchwireError(f"{path}: {where}.mode must be one of {', '.join(NETWORK_MODES)}, "
                                 f"not {table['mode']!r}")
        unknown = sorted(set(table["presets"] or ()) - set(NETWORK_PRESETS))
        if unknown:
            raise PatchwireError(f"{path}: {where}.presets has no preset {unknown[0]!r}",
                                 f"known presets: {', '.join(NETWORK_PRESETS)}")
        return table

    @staticmethod
    def names(pattern: str, user: str, project: str) -> bool:
        """A [network.projects."P"] pattern: `P` matches a project of that name of any user,
        `USER/P` (a "/" in it) only that user's."""
        return fnmatch.fnmatchcase(f"{user}/{project}" if "/" in pattern else project, pattern)

    def own_network(self, user: str, project: str) -> bool:
        """Whether a [network.projects."P"] section names `project` (its AI home is its own)."""
        return self.configured and any(self.names(p, user, project) for p in self.projects)

    def policy(self, user: str, project: str) -> NetworkPolicy:
        """The most specific `mode` wins (a project's, then the user's, then [network]), and
        allow lists and presets add up. But a user chooses their projects' names: for a user
        whose own [network.users.NAME] section sets a `mode`, a project section without "/"
        (any user's project of that name) only narrows, never loosens: a stricter mode, none
        of its hosts. `[network.projects."USER/P"]`, the admin's word for that user, applies
        whole."""
        own = self.users.get(user)
        layers = [("[network]", self.base, True)] + ([(f"[network.users.{user}]", own, True)] if own else [])
        pinned = own is not None and own["mode"] is not None  # the admin set this user's mode
        layers += [(f'[network.projects."{p}"]', t, not pinned or "/" in p)
                   for p, t in self.projects.items() if self.names(p, user, project)]
        mode, mode_rule, allow_rule = "allowlist", "", "[network]"
        patterns: List[str] = []
        for rule, table, whole in layers:
            if table["mode"] is not None and (whole or NETWORK_STRICTNESS[table["mode"]] > NETWORK_STRICTNESS[mode]):
                mode, mode_rule = table["mode"], f'{rule} mode = "{table["mode"]}"'
            if not whole:
                continue  # a bare project name adds no host to a user the admin gave a section
            for preset in table["presets"] or ():
                patterns += NETWORK_PRESETS[preset]
            patterns += table["allow"] or []
            if table["allow"] is not None or table["presets"] is not None:
                allow_rule = rule
        return NetworkPolicy(mode, patterns, mode_rule, allow_rule)


class Credential:
    """The box's API credential, as the gateway adds it: an API key (`x-api-key`) or a Claude
    login's long-lived token from `claude setup-token` (`Authorization: Bearer`, with the OAuth
    beta). Read from [network] credential_file (only the agent can read it), else from the
    agent's environment; the AI only ever holds GATEWAY_PLACEHOLDER_KEY."""

    def __init__(self, kind: str, secret: str):
        self.kind, self.secret = kind, secret

    @classmethod
    def find(cls, net: "NetworkConfig", env: Dict[str, str]) -> Optional["Credential"]:
        secret = ""
        if net.credential_file:
            try:
                secret = net.credential_file.read_text().strip()
            except OSError as e:
                raise PatchwireError(f"cannot read network.credential_file {net.credential_file}: {e.strerror}")
        secret = secret or env.get("ANTHROPIC_API_KEY", "") or env.get("CLAUDE_CODE_OAUTH_TOKEN", "") or env.get(
            "ANTHROPIC_AUTH_TOKEN", "")
        if not secret:
            return None
        return cls("oauth" if secret.startswith("sk-ant-oat") or env.get("CLAUDE_CODE_OAUTH_TOKEN") == secret
                   else "api_key", secret)

    def headers(self) -> List[Tuple[str, str]]:
        if self.kind == "api_key":
            return [("x-api-key", self.secret)]
        return [("authorization", f"Bearer {self.secret}")]


class EgressReport:
    """Per job: hosts contacted (allowed and refused), with counts and bytes, and the API's
    token counts as the gateway saw them."""

    def __init__(self, emit: Callable[[dict], Any]):
        self.emit = emit
        self.lock = threading.Lock()
        self.hosts: Dict[str, Dict[str, int]] = {}
        self.tokens: Dict[str, int] = {}  # the API's own count of the job's tokens, as the gateway saw it
        self.told = 0

    def record(self, host: str, allowed: bool, sent: int = 0, received: int = 0) -> None:
        with self.lock:
            entry = self.hosts.setdefault(host, {"allowed": 0, "refused": 0, "sent": 0, "received": 0})
            first = not entry["allowed" if allowed else "refused"]
            entry["allowed" if allowed else "refused"] += 1
            entry["sent"] += sent
            entry["received"] += received
        if (first or not allowed and entry["refused"] <= 20) and self._told_enough():
            self.emit({"type": "network" if allowed else "network_refused", "host": host,
                       **({} if allowed else {"count": entry["refused"]})})

    def _told_enough(self) -> bool:
        """At most EGRESS_EVENTS events a job (an AI trying 10,000 hosts is in the summary)."""
        with self.lock:
            self.told += 1
            return self.told <= EGRESS_EVENTS

    def add_bytes(self, host: str, sent: int, received: int) -> None:
        with self.lock:
            entry = self.hosts.setdefault(host, {"allowed": 0, "refused": 0, "sent": 0, "received": 0})
            entry["sent"] += sent
            entry["received"] += received

    def add_tokens(self, tokens: Dict[str, int]) -> None:
        with self.lock:
            for key, value in tokens.items():
                self.tokens[key] = self.tokens.get(key, 0) + value

    def summary(self) -> dict:
        with self.lock:
            return {"contacted": {h: dict(e) for h, e in sorted(self.hosts.items()) if e["allowed"]},
                    "refused": {h: e["refused"] for h, e in sorted(self.hosts.items()) if e["refused"]},
                    **({"api_tokens": dict(self.tokens)} if self.tokens else {})}


class UsageScanner:
    """Reads an API response as it is relayed (its bytes pass unchanged) for the tokens the
    model's answer reports: a streamed answer's `message_start` and last `message_delta`, or a
    plain JSON answer's `usage`. De-chunks `Transfer-Encoding: chunked`; bounded memory."""

    LIMIT = 4 * 1024 * 1024

    def __init__(self):
        self.head, self.body, self.chunked, self.pending = b"", b"", False, -1
        self.raw = b""
        self.tokens = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0}

    def feed(self, data: bytes) -> None:
        if not self.head:
            self.raw += data
            if b"\r\n\r\n" not in self.raw:
                self.raw = self.raw[-self.LIMIT:]
                return
            self.head, _, data = self.raw.partition(b"\r\n\r\n")
            self.raw = b""
            self.chunked = b"chunked" in self.head.lower()
        self._body(self._dechunk(data) if self.chunked else data)

    def _dechunk(self, data: bytes) -> bytes:
        self.raw += data
        out = b""
        while True:
            if self.pending < 0:
                line, sep, rest = self.raw.partition(b"\r\n")
                if not sep:
                    return out
                self.pending = int(line.split(b";")[0] or b"0", 16) + 2  # the chunk and its CRLF
                self.raw = rest
            take = self.raw[:self.pending]
            out += take[:max(0, self.pending - 2)]  # the chunk's data, not its closing CRLF
            self.pending -= len(take)
            self.raw = self.raw[len(take):]
            if self.pending:
                return out
            self.pending = -1

    def _body(self, data: bytes) -> None:
        self.body = (self.body + data)[-self.LIMIT:]
        if self.body.startswith(b"{"):
            return  # a plain JSON answer: read whole by close()
        while b"\n" in self.body:  # SSE: `event:` lines, `data: {...}` lines, blank lines
            line, _, self.body = self.body.partition(b"\n")
            if line.startswith(b"data:"):
                self._event(line[5:])

    def _event(self, text: bytes) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        usage = (event.get("message") or {}).get("usage") if event.get("type") == "message_start" else event.get("usage")
        if isinstance(usage, dict):
            self._count(usage, delta=event.get("type") == "message_delta")

    def _count(self, usage: dict, delta: bool) -> None:
        def number(key: str) -> int:
            value = usage.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
        if delta:  # a message_delta's output_tokens is the total so far: the last one counts
            self.tokens["output"] = self.last_output_base + number("output_tokens")
            return
        self.tokens["input"] += number("input_tokens")
        self.tokens["cache_read"] += number("cache_read_input_tokens")
        self.tokens["cache_write"] += number("cache_creation_input_tokens")
        self.tokens["output"] += number("output_tokens")
        self.last_output_base = self.tokens["output"] - number("output_tokens")

    last_output_base = 0

    def close(self) -> Dict[str, int]:
        """The tokens counted; a plain JSON answer is read whole here."""
        if self.body.startswith(b"{"):
            self._event(self.body)
        return self.tokens


class JobGateway:
    """One job's way out, served by threads of the agent: a Unix socket the sandbox gets (bwrap),
    or with a `key`, a port on the box's loopback (sandbox-exec: a Mac has no network namespace,
    so every local process can reach that port, and each request must prove it is the job's:
    GatewayKey). Each connection is read up to its request head, judged, then relayed byte for
    byte."""

    def __init__(self, folder: Path, policy: NetworkPolicy, upstream: Optional[str],
                 credential: Optional[Credential], report: EgressReport, own_folder: bool = False,
                 key: Optional["GatewayKey"] = None):
        self.policy, self.upstream, self.credential, self.report = policy, upstream, credential, report
        self.folder = folder if own_folder else None  # removed by close()
        self.path = folder / f"gw-{secrets.token_hex(6)}.sock"
        self.key, self.port = key, 0
        if key:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(self.path))
        self.sock.listen(128)
        self.closed = False
        self.lock = threading.Lock()
        self.open_connections = 0
        threading.Thread(target=self._accept, name="gateway", daemon=True).start()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.path.unlink(missing_ok=True)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:  # an AI opening connections without end must not exhaust the agent
                full = self.open_connections >= GATEWAY_MAX_CONNECTIONS
                self.open_connections += not full
            if full:
                refuse_busy(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head, rest = read_head(conn)
            method, target, headers = parse_head(head)
            if self.key and not self.key.proven(target, headers, self.credential is not None):
                self.key.refuse(conn, target)
            elif method == "CONNECT":
                self._tunnel(conn, target, rest)
            elif target.startswith("/"):
                self._api(conn, method, target, headers, rest)
            else:
                self._plain(conn, method, target, headers, rest)
        except (OSError, ValueError, ssl.SSLError) as e:
            with contextlib.suppress(OSError):
                gateway_answer(conn, HTTPStatus.BAD_REQUEST, f"patchwire gateway: {describe_exception(e)}")
        finally:
            conn.close()
            with self.lock:
                self.open_connections -= 1

    def _tunnel(self, conn: socket.socket, target: str, rest: bytes) -> None:
        host, port = split_host_port(target, 443)
        address = self._destination(conn, host, port)
        if not address:
            return
        upstream = socket.create_connection(address, timeout=GATEWAY_CONNECT_TIMEOUT_S)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._relay(conn, upstream, host, rest)

    def _plain(self, conn: socket.socket, method: str, target: str, headers: List[Tuple[str, str]],
               rest: bytes) -> None:
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            gateway_answer(conn, HTTPStatus.BAD_REQUEST, f"patchwire gateway: cannot forward {target!r}")
            return
        address = self._destination(conn, url.hostname, url.port or 80)
        if not address:
            return
        host = url.hostname
        upstream = socket.create_connection(address, timeout=GATEWAY_CONNECT_TIMEOUT_S)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._relay(conn, upstream, host, build_head(method, path, close_headers(headers)) + rest)  # counted sent

    def _api(self, conn: socket.socket, method: str, path: str, headers: List[Tuple[str, str]],
             rest: bytes) -> None:
        """The AI's own API call: its placeholder credential out, the box's in, on to
        api_upstream over TLS (whatever the mode: the AI cannot work without it)."""
        if not self.upstream:
            gateway_answer(conn, HTTPStatus.BAD_GATEWAY, "patchwire gateway: no [network] api_upstream")
            return
        url = urllib.parse.urlsplit(self.upstream)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        # identity: a compressed answer would be opaque to the token count (UsageScanner), and an
        # AI asking for one would spend the box's credential uncounted
        kept = [(k, v) for k, v in close_headers(headers) if k.lower() != "accept-encoding"]
        kept.append(("Accept-Encoding", "identity"))
        if self.credential:  # else the AI's own login goes on as it came
            kept = [(k, v) for k, v in kept if k.lower() not in ("x-api-key", "authorization")]
            kept += self.credential.headers()
            if self.credential.kind == "oauth":
                kept = add_beta(kept, OAUTH_BETA)
        kept = [(k, v) if k.lower() != "host" else (k, url.netloc) for k, v in kept]
        upstream: socket.socket = socket.create_connection((host, port), timeout=GATEWAY_CONNECT_TIMEOUT_S)
        if url.scheme == "https":
            upstream = ssl.create_default_context().wrap_socket(upstream, server_hostname=host)
        self.report.record(host, True)
        scanner = UsageScanner()
        self._relay(conn, upstream, host, build_head(method, url.path.rstrip("/") + path, kept) + rest, scanner.feed)
        self.report.add_tokens(scanner.close())

    def _destination(self, conn: socket.socket, host: str, port: int) -> Optional[Tuple[str, int]]:
        """The address to connect to for an allowed host, resolved once here and connected to as
        resolved (a second lookup could answer differently). An address that is not on the
        internet (the box's loopback: the agent's own API, other services; its private
        network; link-local cloud metadata) is reached only when an allow entry names that
        address itself: a host name that resolves there, or mode "open", never does."""
        refusal = "" if self.policy.allows(host, port) else self.policy.refusal(host, port)
        address = ""
        if not refusal:
            try:
                address = str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
            except (OSError, UnicodeError) as e:
                gateway_answer(conn, HTTPStatus.BAD_GATEWAY, f"patchwire gateway: cannot resolve {host}: {e}")
                return None
            if not on_the_internet(address) and not self.policy.names_address(address, port):
                refusal = (f"patchwire gateway: {host}:{port} is {address}, not an internet address (the box "
                           "or its network): only an allow entry naming that address itself reaches it")
        self.report.record(host, not refusal)
        if refusal:
            gateway_answer(conn, HTTPStatus.FORBIDDEN, refusal)
            return None
        return address, port

    def _relay(self, conn: socket.socket, upstream: socket.socket, host: str, first: bytes,
               watch: Callable[[bytes], None] = lambda chunk: None) -> None:
        """Both directions until each side is done; bytes counted for the report, and what comes
        back shown to `watch`."""
        conn.settimeout(None)
        upstream.settimeout(None)
        if first:
            upstream.sendall(first)
            self.report.add_bytes(host, len(first), 0)

        def pump(src: socket.socket, dst: socket.socket, sent: bool) -> None:
            try:
                for chunk in iter(lambda: src.recv(65536), b""):
                    self.report.add_bytes(host, len(chunk) if sent else 0, 0 if sent else len(chunk))
                    dst.sendall(chunk)
                    if not sent:
                        watch(chunk)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        back = threading.Thread(target=pump, args=(upstream, conn, False), daemon=True)
        back.start()
        pump(conn, upstream, True)
        back.join()
        upstream.close()


class GatewayKey:
    """A loopback port's proof that a request comes from its job (sandbox-exec): a secret only
    the job's environment holds. A proxy request carries it as proxy credentials (the proxy
    URLs are http://patchwire:KEY@127.0.0.1:PORT: curl, git, Node and Dart send them); the AI's
    API call carries it as its placeholder key, which the gateway replaces with the box's
    credential. Without it another account of the box could spend that credential or use the
    job's allowlist; when the AI holds its own key, its API calls need no proof (they spend
    only what the caller holds)."""

    USER = "patchwire"

    def __init__(self, secret: str = ""):
        self.secret = secret or secrets.token_urlsafe(24)

    @property
    def placeholder(self) -> str:
        return f"sk-ant-patchwire-{self.secret}"

    def proxy_url(self, port: int) -> str:
        return f"http://{self.USER}:{self.secret}@127.0.0.1:{port}"

    def proven(self, target: str, headers: List[Tuple[str, str]], gateway_holds_credential: bool) -> bool:
        if target.startswith("/"):  # the AI's API call
            if not gateway_holds_credential:
                return True
            wanted = {("x-api-key", self.placeholder), ("authorization", f"Bearer {self.placeholder}")}
        else:
            basic = base64.b64encode(f"{self.USER}:{self.secret}".encode()).decode()
            wanted = {("proxy-authorization", f"Basic {basic}")}
        return any(hmac.compare_digest(f"{k.lower()}\n{v}".encode(), f"{name}\n{value}".encode())
                   for k, v in headers for name, value in wanted if k.lower() == name)

    def refuse(self, conn: socket.socket, target: str) -> None:
        status = HTTPStatus.UNAUTHORIZED if target.startswith("/") else HTTPStatus.PROXY_AUTHENTICATION_REQUIRED
        gateway_answer(conn, status, "patchwire gateway: this port serves one job; its requests carry the "
                       "job's key (HTTPS_PROXY and ANTHROPIC_API_KEY of its environment)")


UNIX_SOCKET_PATH_MAX = 107  # bytes: sun_path is 108 on Linux (104 on macOS, whose TMPDIR is short)
GATEWAY_SOCKET_NAME = "gw-" + "0" * 12 + ".sock"  # JobGateway's name, as long


def socket_folder(prefix: str) -> Path:
    """A private new folder for a job's Unix socket: in the temporary folder, or in /tmp when
    TMPDIR is too long a path for a socket (a deep TMPDIR made every job fail with "AF_UNIX
    path too long")."""
    for base in (None, "/tmp"):
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        if len(os.fsencode(folder / GATEWAY_SOCKET_NAME)) <= UNIX_SOCKET_PATH_MAX:
            return folder
        folder.rmdir()
    raise PatchwireError(f"no folder short enough for the job's network socket: {tempfile.gettempdir()} "
                         f"and /tmp leave under {UNIX_SOCKET_PATH_MAX} bytes for its path",
                         "start the agent with TMPDIR set to a short folder, such as /tmp")


def refuse_busy(conn: socket.socket) -> None:
    """Answer a connection past GATEWAY_MAX_CONNECTIONS without a thread for it. What it sends
    first is read (waiting GATEWAY_REFUSE_WAIT_S at most): closing on unread bytes would reset it
    before it read the answer, and closing before it wrote would fail its write (EPIPE) instead."""
    with contextlib.suppress(OSError):
        conn.settimeout(GATEWAY_REFUSE_WAIT_S)
        with contextlib.suppress(socket.timeout):
            conn.recv(GATEWAY_HEAD_MAX)
        conn.settimeout(None)
        gateway_answer(conn, HTTPStatus.SERVICE_UNAVAILABLE, "patchwire gateway: this job has "
                       f"{GATEWAY_MAX_CONNECTIONS} connections open already; close some")
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def read_head(conn: socket.socket) -> Tuple[bytes, bytes]:
    """(request head, what came after it), the head at most GATEWAY_HEAD_MAX bytes and in at
    most GATEWAY_HEAD_BUDGET_S in all: a byte every few seconds does not hold a thread."""
    data, deadline = b"", time.monotonic() + GATEWAY_HEAD_BUDGET_S
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"no whole request head within {GATEWAY_HEAD_BUDGET_S:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            raise ValueError(f"no whole request head within {GATEWAY_HEAD_BUDGET_S:g} s") from None
        if not chunk:
            raise ValueError("the connection ended inside the request head")
        data += chunk
        if len(data) > GATEWAY_HEAD_MAX:
            raise ValueError("request head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head: bytes) -> Tuple[str, str, List[Tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError("a malformed header line")
        headers.append((name.strip(), value.strip()))
    return parts[0].upper(), parts[1], headers


def build_head(method: str, target: str, headers: List[Tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def close_headers(headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The headers with `Connection: close`: one request per connection, so that every
    request passes the gateway's judgement (a kept-alive one would be relayed unseen)."""
    hop = {"connection", "proxy-connection", "keep-alive", "proxy-authorization"}
    return [(k, v) for k, v in headers if k.lower() not in hop] + [("Connection", "close")]


def add_beta(headers: List[Tuple[str, str]], beta: str) -> List[Tuple[str, str]]:
    betas = [v for k, v in headers if k.lower() == "anthropic-beta"]
    merged = ",".join(b for b in [*betas, beta] if b)
    return [(k, v) for k, v in headers if k.lower() != "anthropic-beta"] + [("anthropic-beta", merged)]


def split_host_port(target: str, default_port: int) -> Tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return target.strip("[]"), default_port
    return host.strip("[]"), int(port)


def gateway_answer(conn: socket.socket, status: HTTPStatus, text: str) -> None:
    body = (text + "\n").encode("utf-8")
    conn.sendall(f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1") + body)


def gateway_ai_environment(env: Dict[str, str], holds_credential: bool, port: int = GATEWAY_PORT,
                           key: Optional[GatewayKey] = None) -> Dict[str, str]:
    """The AI's environment behind the gateway: the proxies and the API through it; when the
    gateway holds the credential, the AI's own credential variables go and a placeholder
    comes (the CLI wants some key)."""
    out = {**env, **gateway_env(port, key)}
    if not holds_credential:
        out.pop("ANTHROPIC_API_KEY")
        if "ANTHROPIC_API_KEY" in env:
            out["ANTHROPIC_API_KEY"] = env["ANTHROPIC_API_KEY"]
        return out
    for name in CREDENTIAL_VARIABLES:
        out.pop(name, None)
    out["ANTHROPIC_API_KEY"] = key.placeholder if key else GATEWAY_PLACEHOLDER_KEY
    return out


def gateway_env(port: int = GATEWAY_PORT, key: Optional[GatewayKey] = None) -> Dict[str, str]:
    """What the AI and the tools it runs get: the proxies (both spellings: curl reads only the
    lower-case http_proxy), the API through the gateway, a placeholder key. With a `key` (a
    port on the box's shared loopback) the proxies carry it and the placeholder is it."""
    url = f"http://127.0.0.1:{port}"
    proxy = key.proxy_url(port) if key else url
    return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
            "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": key.placeholder if key else GATEWAY_PLACEHOLDER_KEY}


# ================================================================== the AI run


class StreamParser:
    """Turns the AI's stdout into job events. JSON lines are read as Claude Code's
    stream-json (parsed by field, never by text); anything else is passed through.
    The AI's output is data from outside: a line of an unexpected shape (no "type", a
    message that is not an object, ...) becomes an `output` event, never an exception.
    Types it does not know (newer CLIs add some) are skipped."""

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
        if not self.claude or not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            self.emit({"type": "output", "text": clip(line)})
            return
        if isinstance(obj.get("session_id"), str):
            self.session_id = obj["session_id"]
        handler = getattr(self, "on_" + obj["type"], None)
        if handler:
            try:
                handler(obj)
            except (AttributeError, KeyError, TypeError, ValueError):
                self.emit({"type": "output", "text": clip(line)})

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
        usage = obj.get("usage")
        denials = obj.get("permission_denials")
        obj = {**obj, "usage": usage if isinstance(usage, dict) else {},
               "permission_denials": denials if isinstance(denials, list) else []}
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
    message = obj.get("message")
    if not isinstance(message, dict):
        raise ValueError("a message that is not an object")  # the line becomes an `output` event
    content = message.get("content")  # a plain string is valid (the API allows it): no blocks
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return str(content or "")


def clip(text: str, limit: int = MAX_EVENT_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


class OutputBudget:
    """Keeps the AI's events stored for one job within `max_bytes` (of their JSON): the first
    half is stored as it comes; after that only the latest events, up to the other half, are
    held (in memory, so memory stays bounded too) and stored by `flush` when the run ends,
    behind an `output_dropped` event that counts what was left out in between. An AI that
    prints without end (48 MB, or a loop) costs the store and the agent that much at most."""

    def __init__(self, emit: Callable[[dict], Any], max_bytes: int, rule: str):
        self.emit, self.rule = emit, rule
        self.head_left = max_bytes // 2
        self.tail_max = max_bytes - max_bytes // 2
        self.tail: Deque[Tuple[dict, int]] = deque()
        self.tail_bytes = self.dropped_events = self.dropped_bytes = 0
        self.lock = threading.Lock()  # the stdout reader adds, run_job flushes

    def __call__(self, event: dict) -> None:
        size = len(json.dumps(event))
        with self.lock:
            if not self.tail and size <= self.head_left:
                self.head_left -= size
            else:
                self._hold({"time": round(time.time(), 3), **event}, size)
                return
        self.emit(event)

    def _hold(self, event: dict, size: int) -> None:
        self.head_left = 0  # once events are held, none is stored ahead of them: the order holds
        self.tail.append((event, size))
        self.tail_bytes += size
        while self.tail_bytes > self.tail_max and len(self.tail) > 1:
            _, dropped = self.tail.popleft()
            self.tail_bytes -= dropped
            self.dropped_events += 1
            self.dropped_bytes += dropped

    def flush(self) -> None:
        """Store the held tail, after saying how much of the middle was dropped."""
        with self.lock:
            held, self.tail, self.tail_bytes = list(self.tail), deque(), 0
            dropped = (self.dropped_events, self.dropped_bytes)
            self.dropped_events = self.dropped_bytes = 0
        if dropped[0]:
            self.emit({"type": pw.OUTPUT_DROPPED, "events": dropped[0], "bytes": dropped[1], "limit": self.rule})
        for event, _ in held:
            self.emit(event)


class AIRun:
    """One run of the AI command in a job folder: its own process group, prompt on stdin,
    stdout parsed line by line, stderr's tail kept, ended by timeout or cancel (TERM to the
    whole group, KILL after a grace period)."""

    def __init__(self, argv: List[str], cwd: Path, env: dict, prompt: str, timeout_s: float,
                 emit: Callable[[dict], Any], on_spawn: Callable[[int], None] = lambda pid: None,
                 watch: Optional[Callable[[], Optional[str]]] = None):
        self.argv, self.cwd, self.env, self.prompt = argv, cwd, env, prompt
        self.on_spawn = on_spawn
        self.watch = watch  # sampled every QUOTA_SAMPLE_S while it runs: a reason ends the run
        self.timeout_s = timeout_s
        self.parser = StreamParser(emit, cwd)
        self.stop_reason: Optional[str] = None
        self.stop_status = "cancelled"
        self.proc: Any = None  # the Popen, once spawned
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
        watchdog = threading.Timer(self.timeout_s, self.stop, (f"timed out after {self.timeout_s:g} s", "failed"))
        watchdog.daemon = True
        watchdog.start()
        ended = threading.Event()
        threading.Thread(target=self._watch, args=(ended,), daemon=True).start()
        try:
            code = self.exit_code = self.proc.wait()
        finally:
            watchdog.cancel()
            ended.set()
        # whatever the AI left running in the background must not outlive the job (nor write
        # into its diff); it also holds the pipes open
        self._kill_group(self.proc)
        for t in threads:
            t.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        return self.judge(code)

    def stop(self, reason: str, status: str = "cancelled") -> None:
        """End the run: TERM to the process group, KILL after a grace period. The run ends
        as `status` (cancelled, or failed for a timeout or a broken reader)."""
        with self._lock:
            if self.stop_reason:
                return
            self.stop_reason, self.stop_status = reason, status
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
                    if not group_has_live_members(proc.pid):
                        return
            except ProcessLookupError:
                return

    def _watch(self, ended: threading.Event) -> None:
        """Ask `watch` every QUOTA_SAMPLE_S whether the run must end (a disk quota); when one
        measure takes long (a job folder of 100,000 files: 0.18 s) the next waits longer, so
        they never take more than QUOTA_SAMPLE_SHARE of a core. A measure that fails is
        logged and tried again: it never ends the run, nor kills this thread."""
        pause = QUOTA_SAMPLE_S
        while self.watch is not None and not ended.wait(pause):
            started = time.monotonic()
            try:
                reason = self.watch()
            except Exception:
                log.exception("measuring a job's folder failed")
                continue
            if reason:
                self.stop(reason, "failed")
                return
            pause = max(QUOTA_SAMPLE_S, (time.monotonic() - started) / QUOTA_SAMPLE_SHARE)

    def _feed_stdin(self) -> None:
        try:
            # a prompt is JSON from the network: a lone surrogate must not kill this thread
            self.proc.stdin.write(self.prompt.encode("utf-8", "replace"))
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
        """Feed stdout to the parser line by line. If this fails (the store cannot take
        the event: disk full; or a bug), the run ends as failed with the reason: a reader
        that died silently would leave the AI blocked on a full pipe until the timeout."""
        try:
            for line in self._lines():
                self.parser.feed(line)
        except Exception as e:
            log.exception("reading the AI's output failed")
            self.stop(f"the agent could not record the AI's output: {describe_exception(e)}", "failed")
            try:
                for _ in iter(lambda: self.proc.stdout.read(65536), b""):
                    pass  # keep the pipe drained until the process group is gone
            except (OSError, ValueError):
                pass  # closed by run(): the process is gone

    def _lines(self):
        """stdout's lines, each at most MAX_AI_LINE bytes: the start of a longer line is kept
        (it becomes an `output` event, clipped) and the rest skipped."""
        skipping = False
        for piece in iter(lambda: self.proc.stdout.readline(MAX_AI_LINE), b""):
            if not skipping:
                yield piece
            skipping = not piece.endswith(b"\n")

    def judge(self, code: int) -> Tuple[str, str, dict]:
        """(status, reason, result line) of an ended run. Claude Code's own word comes first:
        its `result` line says max-turns or an error even when it exits 0, and `claude -p`
        exits 1 with the reason in that line, not on stderr; then the exit status; then
        permission denials (the job did not do what was asked, though everything "worked");
        last, a Claude run that printed stream-json but no result line was cut off."""
        result = self.parser.result or {}
        if self.stop_reason:
            return self.stop_status, self.stop_reason, result
        said = pw.clip_words(str(result.get("result") or "").strip(), 500)
        stderr = pw.clip_words(pw.fold_returns(self.stderr_tail.decode("utf-8", "replace")).strip(), 500, keep_end=True)
        if result.get("subtype") == "error_max_turns":
            return "failed", ("the AI stopped at its turn limit (--max-turns in [ai] command): ask "
                              "for a smaller step, or raise the limit"), result
        if result.get("is_error") or result.get("subtype", "success") != "success":
            return "failed", f"the AI reported an error: {said or result.get('subtype')}", result
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return "failed", f"the AI command was killed by signal {name}", result
        if code != 0:
            why = said or stderr or "no output"
            return "failed", f"the AI command exited with status {code}: {why}", result
        denials = [d for d in result.get("permission_denials") or [] if isinstance(d, dict)]
        if denials:
            return "failed", describe_denials(denials), result
        if self.parser.claude and not self.parser.result:
            return "failed", "the AI ended without a result line", result
        return "done", "", result


def group_has_live_members(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie. bwrap leaves its
    PID-namespace init as a zombie for whoever adopts it to reap, which may take a while
    (1-2 s seen under a slow init); a zombie runs nothing. Without /proc: any member."""
    os.killpg(pgid, 0)  # ProcessLookupError when the group is empty
    if not os.path.isdir("/proc/self"):
        return True
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


def describe_exception(e: BaseException) -> str:
    """A short reason for a job's failure: the OS's own words for OS and sqlite errors."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


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


# --- the built-in stand-in AI: `[ai] command = ["stand-in"]` (`init --ai stand-in`)
#
# For trying a box and for teaching, without a Claude login: it speaks Claude Code's real
# stream-json (system/init, assistant text and tool_use, the user's tool_result, result), so
# every part of a job runs as it would with Claude, and it makes one small, deterministic
# change: the prompt, on one line, appended to PATCHWIRE_DEMO.md. Its source runs as
# `python -I -S -c STAND_IN_SOURCE`, the agent's own Python: no file to find, so it works
# from the .pyz and inside the sandbox alike. Everything it says carries STAND_IN_LABEL.

STAND_IN = "stand-in"
STAND_IN_LABEL = "stand-in AI, not Claude"
STAND_IN_FILE = "PATCHWIRE_DEMO.md"
STAND_IN_SOURCE = """
import json, os, sys, uuid
LABEL, FILE = %r, %r
args = sys.argv[1:]
session = args[args.index("--resume") + 1] if "--resume" in args[:-1] else str(uuid.uuid4())
prompt = " ".join(sys.stdin.read().split())[:200] or "(an empty request)"
def emit(obj):
    sys.stdout.write(json.dumps(dict(obj, session_id=session)) + "\\n")
    sys.stdout.flush()
def say(block):
    emit({"type": "assistant", "parent_tool_use_id": None, "message": {"id": "msg_stand_in",
          "type": "message", "role": "assistant", "model": LABEL, "content": [block]}})
emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "tools": ["Edit"], "model": LABEL,
      "permissionMode": "acceptEdits", "apiKeySource": "none"})
say({"type": "text", "text": "[%%s] I add your request, on one line, to %%s." %% (LABEL, FILE)})
line = "- " + prompt + "\\n"
head = "" if os.path.exists(FILE) else "# Requests noted by Patchwire's " + LABEL + "\\n\\n"
with open(FILE, "a") as f:
    f.write(head + line)
say({"type": "tool_use", "id": "toolu_stand_in", "name": "Edit", "input": {
    "file_path": os.path.abspath(FILE), "old_string": "", "new_string": line}})
emit({"type": "user", "parent_tool_use_id": None, "message": {"role": "user", "content": [
    {"tool_use_id": "toolu_stand_in", "type": "tool_result", "content": "ok", "is_error": False}]}})
done = "[%%s] Added one line to %%s. For real work, set [ai] command to Claude Code." %% (LABEL, FILE)
say({"type": "text", "text": done})
emit({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 0, "duration_api_ms": 0,
      "num_turns": 1, "result": done, "total_cost_usd": 0, "usage": {"input_tokens": 0, "output_tokens": 0},
      "permission_denials": []})
""" % (STAND_IN_LABEL, STAND_IN_FILE)


def stand_in_argv() -> List[str]:
    return [sys.executable, "-I", "-S", "-c", STAND_IN_SOURCE]


def ai_environment(cfg: AgentConfig, home: Optional[Path] = None, environ: Optional[Dict[str, str]] = None) -> dict:
    """The AI's environment, an allowlist: PATH, LANG, LC_*, TERM, TZ, TMPDIR and Claude's
    credential variables from the agent's environment, then `[ai] env`; HOME is the user's
    own AI home. Nothing else of the agent's environment (tokens for other services, agent
    sockets, CLAUDE_CONFIG_DIR) and nothing from the laptop's reaches the AI."""
    environ = dict(os.environ) if environ is None else environ
    env = {key: value for key, value in environ.items()
           if key in AI_ENV_NAMES or key in AI_CREDENTIAL_NAMES or key.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    env.update(cfg.ai_env)
    if home is not None:
        env["HOME"] = str(home)
    return env


# ================================================================== setup and checks (the project's [box])
#
# Setup (`flutter pub get`, `npm ci`) runs in the warm job folder before the AI, in the AI's own
# walls (Agent.confine: sandbox, network gateway, user home, limits), only when its inputs
# changed since the last setup that succeeded in that folder: a hash of the commands and of the
# blob ids of the files `setup_when` names, read from the job folder's index (the snapshot),
# never from files the AI or a setup could have rewritten. The hash is kept in the folder's own
# worktree git dir, which the sandbox shows read-only; a folder rebuilt from scratch has none,
# so its setup runs again. What setup writes into ignored folders (.dart_tool/, node_modules/)
# survives between jobs: the reset before each job is `clean -ffd`, which keeps ignored files.
#
# Checks run after the diff is taken, each on exactly the result: the folder is reset to the
# result commit before every check and after the last one, so a check that rewrites files
# (a formatter) changes neither the patch nor what the next check sees. The receipt names the
# patch's sha256 and the result's tree: the laptop compares the hash with what it previews.

SETUP_STAMP = "patchwire-setup"  # in a job folder's worktree git dir: the hash of its last setup
MAX_STEP_TAIL = 4000  # characters of a command's output kept for the job's record
MAX_STEP_LINE = 2000  # characters of one output line in an event


class LineParser(StreamParser):
    """A setup command's or check's output (stdout and stderr as one stream): each line an
    event of `kind`, the tail kept for the job's record."""

    def __init__(self, emit: Callable[[dict], None], cwd: Path, kind: str, label: dict):
        super().__init__(emit, cwd)
        self.kind, self.label = kind, label
        self.tail = ""

    def feed(self, raw: bytes) -> None:
        line = pw.fold_returns(raw.decode("utf-8", "replace")).rstrip("\r\n")
        self.tail = (self.tail + line + "\n")[-MAX_STEP_TAIL:]
        self.emit({"type": self.kind, **self.label, "text": clip(line, MAX_STEP_LINE)})


class CommandRun(AIRun):
    """One setup command or check, `sh -c`, run and stopped as the AI is (process group,
    timeout, cancel, disk quota); done when it exits 0."""

    def __init__(self, argv: List[str], cwd: Path, env: dict, timeout_s: float, emit: Callable[[dict], Any],
                 kind: str, label: dict, **kw: Any):
        super().__init__(argv, cwd, env, "", timeout_s, emit, **kw)
        self.parser = self.lines = LineParser(emit, cwd, kind, label)

    def judge(self, code: int) -> Tuple[str, str, dict]:
        if self.stop_reason:
            return self.stop_status, self.stop_reason, {}
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return "failed", f"was killed by signal {name}", {}
        if code != 0:
            return "failed", f"exited with status {code}", {}
        return "done", "", {}

    def record(self, command: str, started: float) -> dict:
        """What the job keeps of the run: command, exit code, duration, output tail."""
        tail = self.lines.tail or self.stderr_tail.decode("utf-8", "replace")[-MAX_STEP_TAIL:]
        return {"command": command, "exit_code": self.exit_code, "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "tail": tail, "timed_out": bool(self.stop_reason and self.stop_reason.startswith("timed out"))}


MAX_BOX_PHASE_S = pw.MAX_BOX_TIMEOUT_S  # a job without the ceiling's phase_s (never from an ask)


class BoxSteps:
    """One job's [box] setup and checks, each command confined like the AI (Agent.confine)."""

    def __init__(self, agent: "Agent", job: dict, repo: "ProjectRepo", slot: int,
                 gateway: Optional["JobGateway"], output: OutputBudget):
        self.agent, self.job, self.repo, self.slot, self.gateway, self.output = agent, job, repo, slot, gateway, output
        self.box: dict = job.get("box") or {}
        self.count = 0

    def setup(self) -> Tuple[str, str, Optional[dict]]:
        """(status, reason, report): setup run when its inputs changed (or `ask --setup`),
        else skipped; None without [box] setup."""
        commands = self.box.get("setup") or []
        if not commands:
            return "done", "", None
        digest = self.repo.setup_inputs(self.slot, commands, self.box.get("setup_when") or [])
        last = self.repo.last_setup(self.slot)
        if last == digest and not self.box.get("force_setup"):
            self.output({"type": "setup", "step": "skipped", "reason": "its inputs are unchanged since the last "
                         "setup of this job folder"})
            return "done", "", {"ran": False, "why": "inputs unchanged", "hash": digest,
                                "source": self.box.get("setup_source", "project")}
        why = ("asked (--setup)" if self.box.get("force_setup") else
               "first setup of this job folder" if last is None else "inputs changed")
        self.repo.forget_setup(self.slot)  # a setup that fails half way is no setup
        started, runs = time.monotonic(), []  # type: float, List[dict]
        for command in commands:
            left = self.time_left(started)
            if left <= 0:
                return "failed", (f"setup failed before the AI started: the whole setup took more than "
                                  f"{self.box.get('phase_s', MAX_BOX_PHASE_S)} s, the box's timeout ceiling for you, before "
                                  f"`{clip(command, 200)}`"), {
                    "ran": True, "why": why, "hash": digest, "runs": runs, "source": self.box.get("setup_source", "project"),
                    "duration_ms": round((time.monotonic() - started) * 1000, 1)}
            record, status, reason = self.command("setup", command, min(self.box["setup_timeout_s"], left), {})
            runs.append(record)
            if status != "done":
                report = {"ran": True, "why": why, "hash": digest, "runs": runs,
                          "source": self.box.get("setup_source", "project"),
                          "duration_ms": round((time.monotonic() - started) * 1000, 1)}
                tail = record["tail"].strip()[-1500:]
                return status, (f"setup failed before the AI started: `{clip(command, 200)}` {reason}"
                                + (f"; its output ends:\n{tail}" if tail else "")), report
        self._keep(digest)
        return "done", "", {"ran": True, "why": why, "hash": digest, "runs": runs,
                            "source": self.box.get("setup_source", "project"),
                            "duration_ms": round((time.monotonic() - started) * 1000, 1)}

    def _keep(self, digest: str) -> None:
        """Remember the setup, unless it changed files git does not ignore: those would be
        cleaned away before the next job (and are in this job's diff), so it must run again."""
        changed = self.repo.changed_paths(self.slot)
        if not changed:
            self.repo.remember_setup(self.slot, digest)
            return
        self.output({"type": "setup", "step": "warning", "text": (
            f"setup changed {len(changed)} path(s) git does not ignore ({', '.join(changed[:5])}): they "
            "are part of this job's diff, and setup runs again next time; add them to .gitignore")})

    def checks(self, commit: str, patch: Path) -> Tuple[str, str, Optional[dict]]:
        """(status, reason, receipt): each check run on exactly the result `commit`; a check
        that fails or times out is recorded and the next one runs; a cancel ends them."""
        commands = self.box.get("checks") or []
        if not commands:
            return "done", "", None
        runs: List[dict] = []
        receipt = {"patch_sha256": file_sha256(patch), "tree": self.repo.tree_of(commit), "commit": commit,
                   "source": self.box.get("checks_source", "project"), "runs": runs}
        status, reason, started = "done", "", time.monotonic()
        for name, command in zip(pw.check_names(commands), commands):
            left = self.time_left(started)
            if left <= 0:  # recorded as not run: the receipt still names every check
                phase = self.box.get("phase_s", MAX_BOX_PHASE_S)
                runs.append({"name": name, "ok": False, "command": command, "exit_code": None, "duration_ms": 0,
                             "timed_out": True, "tail": f"not run: the checks took more than {phase} s "
                             "in all, the box's timeout ceiling for you"})
                continue
            self.repo.reset_slot_to(self.slot, commit)
            record, status, reason = self.command("check", command, min(self.box["check_timeout_s"], left),
                                                  {"name": name})
            runs.append({"name": name, "ok": status == "done", **record})
            if status == "cancelled":
                break
        self.repo.reset_slot_to(self.slot, commit)
        return ("cancelled", reason, receipt) if status == "cancelled" else ("done", "", receipt)

    def time_left(self, started: float) -> int:
        """Whole seconds left of the phase (the whole setup, or all checks) begun at `started`
        (a part of one counts as one), 0 when none; a command's timeout is at most that."""
        left = self.box.get("phase_s", MAX_BOX_PHASE_S) - (time.monotonic() - started)
        return max(0, math.ceil(left))

    def command(self, kind: str, command: str, timeout_s: int, label: dict) -> Tuple[dict, str, str]:
        """Run one command in the job's walls: (record, status, reason)."""
        self.count += 1
        job, agent, folder = self.job, self.agent, self.repo.slot_path(self.slot)
        argv, env, cgroup = agent.confine(job, self.repo, self.slot, None, self.gateway,
                                          command=["/bin/sh", "-c", "exec 2>&1\n" + command],
                                          name=f"{job['id']}-{kind}{self.count}")
        run = CommandRun(argv, folder, env, timeout_s, self.output, kind, label,
                         on_spawn=lambda pid: agent._record_pgid(job["id"], pid),
                         watch=agent.quota_watch(job, folder))
        agent._swap_run(job["id"], run)
        self.output({"type": kind, "step": "start", "command": command, **label})
        started = time.monotonic()
        status, reason, _ = limited_run(run, cgroup)
        record = run.record(command, started)
        self.output({"type": kind, "step": "end", "command": command, **label, "exit_code": record["exit_code"],
                     "duration_ms": record["duration_ms"], "ok": status == "done"})
        agent._flush_output(job["id"], self.output)
        return record, status, reason


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def ask_box(policy: "Policy", body: dict, default: Optional[dict], rule: str) -> Optional[dict]:
    """The job's [box]: the ask's setup and checks, checked as the laptop checks them, each
    timeout within the user's timeout ceiling; where the ask has none, the box's own `default`
    ([projects.NAME], named by `rule`). `setup: true` (ask --setup) runs setup whatever its
    inputs. None when neither has any."""
    force = body.get("setup", False)
    if not isinstance(force, bool):
        raise BadRequest("setup must be true or false")
    asked = None
    if body.get("box") is not None:
        try:
            asked = pw.check_box("the ask's", body["box"])
        except PatchwireError as e:
            raise BadRequest(e.message, e.hint) from None
        for key in ("setup_timeout_s", "check_timeout_s"):
            if asked[key] > policy.timeout_s and key not in body["box"]:  # a default: within the ceiling
                asked[key] = policy.timeout_s
            elif asked[key] > policy.timeout_s:
                raise policy_refusal(HTTPStatus.FORBIDDEN, policy, "timeout_s",
                                     f"box.{key} {asked[key]} is over the ceiling",
                                     f"set {key} to {policy.timeout_s} or less under [box]")
    box = merge_box(asked, default, rule)
    if force and not (box and box["setup"]):
        raise BadRequest("setup is true, but neither the ask nor the box has a [box] setup for this project")
    # the ceiling bounds the whole setup and all checks, each phase, not only each command:
    # 20 commands each up to the ceiling held a worker 41 times as long as the AI may run
    return {**box, "force_setup": force, "phase_s": policy.timeout_s} if box else None


def merge_box(asked: Optional[dict], default: Optional[dict], rule: str) -> Optional[dict]:
    """Setup, and checks, each from the ask when it has them, else from the box's `default`;
    `setup_source` and `checks_source` say whose ("project": the laptop's .patchwire.toml)."""
    if not asked and not default:
        return None
    box: dict = {}
    for part, keys in (("setup", ("setup", "setup_when", "setup_timeout_s")),
                       ("checks", ("checks", "check_timeout_s"))):
        use_default = bool(default and default[part] and not (asked and asked[part]))
        source = default if use_default else asked or default
        box.update({key: (source or {}).get(key, pw.BOX_SCHEMA[key][1]) for key in keys})
        box[f"{part}_source"] = rule if use_default else "project"
    return box


# ================================================================== fair queue


class QueueItem:
    __slots__ = ("job_id", "user", "project", "slot", "pin")

    def __init__(self, job_id: str, user: str, project: str, pin: Optional[int] = None):
        self.job_id, self.user, self.project = job_id, user, project
        self.pin = pin  # a follow-up runs in its parent's folder (Claude's session lives there)
        self.slot = -1  # the job folder claimed when the item leaves the queue


class FairQueue:
    """Fair across users, first come first served within a user. Each user carries the
    number of the last turn they were served in; the waiting user served longest ago goes
    next (one never served, or back after a pause, goes first), so a user with 20 queued
    jobs delays another's single job by at most the job already running. `take` skips jobs
    that cannot run yet (busy job folders, a user's max_running), so they block nobody."""

    def __init__(self):
        self.cond = threading.Condition()
        self.by_user: Dict[str, Deque[QueueItem]] = {}
        self.served: Dict[str, int] = {}  # user -> turn number of their last job taken
        self.arrived: Dict[str, int] = {}  # user -> when their lane opened (ties: first come)
        self.turns = 0
        self.closed = False

    def put(self, item: QueueItem) -> None:
        with self.cond:
            if item.user not in self.by_user:
                self.by_user[item.user] = deque()
                self.turns += 1
                self.arrived[item.user] = self.turns
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

    def _turn_order(self, served: Dict[str, int], users) -> List[str]:
        return sorted(users, key=lambda u: (served.get(u, 0), self.arrived.get(u, 0)))

    def _pop_runnable(self, runnable: Callable[[QueueItem], bool]) -> Optional[QueueItem]:
        for user in self._turn_order(self.served, self.by_user):
            for item in self.by_user[user]:
                if runnable(item):
                    self._drop(user, item)
                    self.turns += 1
                    self.served[user] = self.turns
                    return item
        return None

    def _drop(self, user: str, item: QueueItem) -> None:
        self.by_user[user].remove(item)
        if not self.by_user[user]:
            del self.by_user[user]
            del self.arrived[user]

    def remove(self, job_id: str) -> bool:
        with self.cond:
            for user, items in list(self.by_user.items()):
                for item in items:
                    if item.job_id == job_id:
                        self._drop(user, item)
                        return True
        return False

    def jobs_of(self, user: str) -> List[str]:
        with self.cond:
            return [item.job_id for item in self.by_user.get(user, ())]

    def order(self) -> List[str]:
        """Job ids in the order they would be served (ignoring busy folders and limits)."""
        return [job for job, _ in self.items()]

    def items(self) -> List[Tuple[str, str]]:
        """(job, user) in the order they would be served (ignoring busy folders and limits)."""
        with self.cond:
            lanes = {u: deque(items) for u, items in self.by_user.items()}
            served, turns = dict(self.served), self.turns
            out: List[Tuple[str, str]] = []
            while lanes:
                user = self._turn_order(served, lanes)[0]
                out.append((lanes[user].popleft().job_id, user))
                turns += 1
                served[user] = turns
                if not lanes[user]:
                    del lanes[user]
            return out

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


# ================================================================== several attempts
# `"attempts": N` in an ask makes N sibling jobs of one snapshot, grouped by an ask id. Each is
# an ordinary job (its own job folder, events, patch); the group is only the `ask_id` and
# `attempt` columns. The fair queue needs nothing new: it is fair across users, first come
# first served within one, so a user's three attempts wait behind each other, never in front
# of another user's job. Counted against the policy: `max_attempts` bounds N, each attempt
# is a job for `max_queued` and `max_running`, and the ask counts once for `rate_limit` (the
# user asked once; what the attempts cost the box is held by the queue and max_running).
# The AI of attempt K sees PATCHWIRE_ATTEMPT=K (a wrapper may vary the model or the temperature).

MAX_ATTEMPTS = 4


def check_max_attempts(path: Path, table: str, values: dict) -> None:
    value = values.get("max_attempts")
    if value is not None and not 1 <= value <= MAX_ATTEMPTS:
        raise PatchwireError(f"{path}: {table}.max_attempts must be 1..{MAX_ATTEMPTS}, not {value}",
                             "the number of sibling jobs one ask may start (`patchwire ask -n N`)")


def check_attempts(policy: "Policy", body: dict, known: Dict[str, List[str]]) -> Tuple[int, List[str]]:
    """The ask's number of attempts (1 unless it says, at most the user's max_attempts) and
    the AI profile of each (`agents`: one name per attempt), or no profiles."""
    profiles = check_profiles(body.get("agents"), known)
    attempts = body.get("attempts", len(profiles) or 1)
    if profiles and attempts != len(profiles):
        raise BadRequest("agents names one profile per attempt", "send attempts equal to the number of agents")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= MAX_ATTEMPTS:
        raise BadRequest(f"attempts must be a whole number 1..{MAX_ATTEMPTS}")
    if attempts > 1 and body.get("continue") is not None:
        raise BadRequest("an ask continuing a job makes one attempt",
                         "continue the attempt you chose, without attempts")
    if attempts > policy.max_attempts:
        raise policy_refusal(HTTPStatus.FORBIDDEN, policy, "max_attempts",
                             f"{attempts} attempts is over the limit of user {policy.user}",
                             f"ask with -n {policy.max_attempts} or fewer")
    return attempts, profiles


def check_profiles(agents: Any, known: Dict[str, List[str]]) -> List[str]:
    if agents is None:
        return []
    if not isinstance(agents, list) or not agents or not all(isinstance(a, str) for a in agents):
        raise BadRequest("agents must be a list of AI profile names")
    for name in agents:
        if name not in known:
            raise BadRequest(f"no AI profile {clip(name, 40)!r} on this box",
                             "its [ai.profiles.NAME] tables: " + (", ".join(sorted(known)) or "none"),
                             code="no_profile")
    return agents


def attempt_jobs(job: dict, attempts: int, profiles: Sequence[str] = ()) -> List[dict]:
    """The jobs of one ask: `job` alone, or N siblings of its snapshot under one ask id."""
    if attempts == 1:
        return [{**job, "profile": profiles[0]} if profiles else job]
    ask_id = secrets.token_hex(6)
    ids = [job["id"]] + [secrets.token_hex(6) for _ in range(attempts - 1)]
    return [{**job, "id": job_id, "ask_id": ask_id, "attempt": n, **({"profile": profiles[n - 1]} if profiles else {})}
            for n, job_id in enumerate(ids, 1)]


def read_profiles(path: Path, tables: dict) -> Dict[str, List[str]]:
    """[ai.profiles.NAME] command = [...]: other AI commands an ask may name (`--agents`)."""
    profiles = {}
    for name, table in tables.items():
        if not pw.NAME_RE.fullmatch(name):
            raise PatchwireError(f"{path}: AI profile name {name!r} is not valid", "use letters, digits, '.', '_' and '-'")
        command = pw.Schema(path, f"ai.profiles.{name}", {"command": ("str_list", None)}).read(table)["command"]
        if not command:
            raise PatchwireError(f"{path}: ai.profiles.{name}.command must be a non-empty list of strings")
        profiles[name] = stand_in_argv() if command == [STAND_IN] else command
    return profiles


def profile_command(cfg: AgentConfig, job: Optional[dict], parent: Optional[dict]) -> List[str]:
    """The job's AI command: its profile's (a follow-up: its parent's), else [ai] command.
    A profile removed from the config since the ask falls back to [ai] command."""
    name = (job or {}).get("profile") or (parent or {}).get("profile")
    return cfg.ai_profiles.get(name, cfg.ai_command) if name else cfg.ai_command


def attempt_environment(job: dict) -> Dict[str, str]:
    return {"PATCHWIRE_ATTEMPT": str(job["attempt"])} if job.get("attempt") else {}


def migrate_attempt_columns(db: sqlite3.Connection) -> None:
    """Add the ask_id and attempt columns (a state db from before several attempts: its jobs
    are asks of one attempt, NULL in both)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for column in [c for c in ATTEMPT_COLUMNS if c not in _job_columns(db)]:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {ATTEMPT_COLUMNS[column]}")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_ask ON jobs (ask_id)")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def ask_jobs(store: "Store", user: str, prefix: str) -> List[dict]:
    """The attempts of the user's ask (a unique prefix of its id is enough), in order."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", prefix or ""):
        raise NotFound(f"no ask {prefix!r}")
    with store.lock:  # which asks first (two tell it is ambiguous): a short prefix loads no prompts
        asks = [r[0] for r in store.db.execute("SELECT DISTINCT ask_id FROM jobs WHERE user = ? AND ask_id LIKE ? "
                                               "LIMIT 2", (user, prefix + "%"))]
        if len(asks) > 1:
            raise Conflict(f"ask id prefix {prefix!r} is ambiguous", "give more characters", code="ambiguous")
        rows = store.db.execute(f"SELECT {job_fields()} FROM jobs WHERE user = ? AND ask_id = ? "
                                "ORDER BY attempt", (user, asks[0])).fetchall() if asks else []
    if not rows:
        raise NotFound(f"no ask {prefix!r} of yours", "`patchwire jobs` lists your jobs with their ask ids")
    return [_job_row(r) for r in rows]


def ask_group(jobs: List[dict]) -> dict:
    """GET /v1/asks/ID: the ask and its attempts, each a job record (status, stats: the files
    changed, created/started/finished, result: turns, tokens, cost)."""
    first = jobs[0]
    live = [job for job in jobs if job["status"] not in TERMINAL]
    return {"id": first["ask_id"], "project": first["project"], "prompt": first["prompt"],
            "created": first["created"], "status": "running" if live else "ended",
            "attempts": len(jobs), "jobs": [public_job(job) for job in jobs]}


# ================================================================== audit log


class AuditLog:
    """`audit.log` in the state folder, mode 600: one JSON line per request and per job start
    and end (time, user, address, method, path, status, job, bytes, duration). Never a token,
    never a prompt. Rotated by size: audit.log.1 is the newest old part, up to AUDIT_BACKUPS."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.lock = threading.Lock()
        self.fd: Optional[int] = None

    def _open(self) -> int:
        fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask, and for a file made by an older version
        return fd

    def write(self, record: dict) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = (json.dumps({"time": stamp, **record}, separators=(",", ":"), default=str) + "\n").encode()
        with self.lock:
            try:
                if self.fd is None:
                    self.fd = self._open()
                if os.fstat(self.fd).st_size + len(line) > self.max_bytes:
                    self._rotate()
                os.write(self.fd, line)
            except OSError as e:  # a full disk must not take requests down with it
                log.warning("cannot write the audit log %s: %s", self.path, e)

    def _rotate(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for n in range(AUDIT_BACKUPS - 1, 0, -1):
            older = Path(f"{self.path}.{n}")
            if older.exists():
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self.fd = self._open()

    def job(self, job_id: str, event: str, **fields: Any) -> None:
        self.write({"event": event, "job": job_id, **fields})

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


# ================================================================== notifications (the box tells you a job ended)
# Each user may name a few targets (POST /v1/notify, `patchwire notify add URL`): a generic
# JSON webhook signed with HMAC-SHA256, an ntfy topic, or a Slack incoming webhook. Their
# hosts must be in the admin's `[notify] allow`, checked when a target is added and again at
# each delivery (a host taken off the list gets nothing more). A job's start and end only
# put a note on the Notifier's own schedule; its thread builds and sends the deliveries, so
# a slow or dead receiver never holds a worker or a request. A delivery is tried
# NOTIFY_ATTEMPTS times with growing waits, each attempt a line in the audit log. What is
# sent is the job's id, project, status, reason and change counts: never the prompt or the
# diff unless the target was added with them (`include`). Redirects are not followed (the
# allowlist names where a delivery goes) and no proxy is used.

NOTIFY_KINDS = ("webhook", "ntfy", "slack")
NOTIFY_EVENTS = ("end", "start", "failure")  # end: every end; failure: failed ends only; start
NOTIFY_INCLUDES = ("prompt", "diff")
NOTIFY_ATTEMPTS = 4
NOTIFY_BACKOFF_S = (1.0, 5.0, 30.0)  # the waits before the 2nd, 3rd and 4th attempts
NOTIFY_TIMEOUT_S = 10.0  # one attempt, connecting and answering
NOTIFY_PENDING_MAX = 1000  # notes and deliveries waiting; past it new ones are dropped (logged)
NOTIFY_PENDING_PER_USER = 200  # ... and of one user
NOTIFY_SENDERS = 4  # threads sending at once; one user's deliveries go one at a time
NOTIFY_DIFF_MAX = 256 * 1024  # `include = diff`: the patch up to this, else cut and said so
NOTIFY_REASON_MAX = 2000
SIGNATURE_HEADER = "X-Patchwire-Signature"  # "sha256=" + hex HMAC-SHA256(secret, TIMESTAMP + "." + body)
TIMESTAMP_HEADER = "X-Patchwire-Timestamp"  # seconds since the epoch, signed with the body
TARGET_ID_RE = re.compile(r"[0-9a-f]{8}")


def notify_host_allowed(allow: Sequence[str], url: str) -> bool:
    """Whether `url`'s host and port match a `[notify] allow` entry (as the gateway's: a host
    or *.domain, optionally :port, else 80 and 443)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return bool(parts.hostname) and any(host_matches(p, parts.hostname or "", port) for p in allow)


def redacted_url(url: str) -> str:
    """A target's URL as lists and the audit log show it: an ntfy topic and a Slack webhook's
    path are its password, so only the host and the path's last 4 characters."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}/" + (f"...{path[-4:]}" if len(path) > 5 else path.lstrip("/"))


def check_target_request(cfg: AgentConfig, body: dict, count: int) -> dict:
    """A new target from POST /v1/notify's body, validated; refusals name what to change."""
    url = body.get("url")
    if not isinstance(url, str) or len(url) > 2048:
        raise BadRequest("url must be an http:// or https:// URL (at most 2048 characters)")
    try:
        parts = urllib.parse.urlsplit(url)
        bad = parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password
        parts.port  # noqa: B018 - raises on a port that is no number ("http://h:x/")
    except ValueError:  # "http://[::1/x", a port that is no number
        bad = True
    if bad:
        raise BadRequest(f"{url[:100]!r} is not an http:// or https:// URL with a host and no user:password",
                         "give the receiver's URL; a secret belongs in its path (ntfy, Slack) or in "
                         "the signature this box adds (webhook)")
    if not notify_host_allowed(cfg.notify_allow, url):
        raise HTTPFailure(HTTPStatus.FORBIDDEN, f"{parts.netloc} is not a host this box sends notifications to "
                          f"([notify] allow = {json.dumps(cfg.notify_allow)})",
                          f'the box\'s admin can add "{parts.hostname}" to [notify] allow in the agent\'s config',
                          code="policy", limit="[notify] allow")
    if count >= cfg.notify_max_targets:
        raise HTTPFailure(HTTPStatus.FORBIDDEN, f"you have {count} notification targets, the most this box keeps "
                          f"([notify] max_targets = {cfg.notify_max_targets})", "remove one first (`patchwire "
                          "notify remove ID`)", code="policy", limit="[notify] max_targets")
    kind = body.get("kind") or guess_kind(parts.hostname or "")
    events, include = body.get("events", ["end"]), body.get("include", [])
    for name, value, allowed in (("kind", [kind], NOTIFY_KINDS), ("events", events, NOTIFY_EVENTS),
                                 ("include", include, NOTIFY_INCLUDES)):
        if not isinstance(value, list) or not all(v in allowed for v in value) or (name == "events" and not value):
            raise BadRequest(f"{name} must be {'one' if name == 'kind' else 'a list'} of {', '.join(allowed)}")
    return {"id": secrets.token_hex(4), "kind": kind, "url": url, "events": sorted(set(events)),
            "include": sorted(set(include)), "created": time.time(),
            "secret": secrets.token_urlsafe(32) if kind == "webhook" else None}


def guess_kind(host: str) -> str:
    if host == "hooks.slack.com":
        return "slack"
    return "ntfy" if host == "ntfy.sh" or host.startswith("ntfy.") else "webhook"


def public_target(target: dict) -> dict:
    """A target as its user sees it: never the secret, the URL redacted."""
    return {"id": target["id"], "kind": target["kind"], "url": redacted_url(target["url"]),
            "events": target["events"], "include": target["include"], "created": target["created"]}


def wants(target: dict, event: str, status: Optional[str]) -> bool:
    """Whether `target` asked for this: a start, an end (any), or a failed end."""
    if event == "start":
        return "start" in target["events"]
    return "end" in target["events"] or (status == "failed" and "failure" in target["events"])


def job_payload(job: dict, event: str, target: dict, patch_path: Path) -> dict:
    """The generic webhook's JSON body for `job` (also what the other kinds summarise)."""
    kind = "job.started" if event == "start" else f"job.{job['status']}"
    record = {k: job.get(k) for k in ("id", "project", "status", "created", "started", "finished", "stats")}
    record["reason"] = (job.get("reason") or "")[:NOTIFY_REASON_MAX] or None
    if "prompt" in target["include"]:
        record["prompt"] = job.get("prompt")
    if "diff" in target["include"] and job.get("status") == "done":
        record.update(read_diff_for_notify(patch_path))
    return {"type": kind, "user": job.get("user"), "job": record}


def read_diff_for_notify(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(NOTIFY_DIFF_MAX + 1)
    except OSError:
        return {"diff": None}
    return {"diff": data[:NOTIFY_DIFF_MAX].decode("utf-8", "replace"), "diff_cut": len(data) > NOTIFY_DIFF_MAX}


def summary_line(payload: dict) -> str:
    """One line for people (ntfy, Slack): the job, its project and how it ended."""
    job = payload["job"]
    if payload["type"] == "test":
        return "Patchwire: a test notification from the box"
    stats = job.get("stats") or {}
    what = {"job.started": "started", "job.done": "done", "job.failed": "failed",
            "job.cancelled": "cancelled"}.get(payload["type"], payload["type"])
    line = f"Patchwire: job {job['id']} in {job.get('project')} {what}"
    if stats:
        line += f": {stats.get('files', 0)} file(s), +{stats.get('added', 0)} -{stats.get('removed', 0)}"
    elif job.get("reason"):
        line += f": {clip(job['reason'], 300)}"
    return line


def encode_delivery(target: dict, payload: dict) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers) for the target's kind; a webhook's are signed at each attempt (sign)."""
    if target["kind"] == "slack":
        text = summary_line(payload).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return json.dumps({"text": text}).encode(), {"Content-Type": "application/json"}
    if target["kind"] == "ntfy":
        title = payload["type"].encode("ascii", "replace").decode()
        return summary_line(payload).encode(), {"Content-Type": "text/plain; charset=utf-8",
                                                "Title": f"Patchwire {title}", "Tags": "robot"}
    return json.dumps(payload).encode(), {"Content-Type": "application/json",
                                          "X-Patchwire-Event": payload["type"]}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The webhook's signature header value (README: "Verifying a webhook")."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Delivery:
    """One message to one target, with its attempts so far."""

    def __init__(self, target: dict, payload: dict, job: Optional[str]):
        self.target, self.job = target, job
        self.id = secrets.token_hex(8)  # the same on every attempt: a receiver can drop repeats
        self.body, self.headers = encode_delivery(target, payload)
        self.event = payload["type"]
        self.attempt = 0


class Notifier:
    """Sends notifications from threads of its own, on a schedule (per user, a heap of due
    times): a job's start or end is a note that a thread turns into deliveries; a failed
    attempt goes back on the schedule after its backoff. `post` is the one place that sends.
    NOTIFY_SENDERS threads send at once, taking users in turn, one delivery of a user at a
    time: a user whose receivers never answer (and who ends jobs without end) holds one
    thread and their own queue, never another user's notifications."""

    def __init__(self, store: "Store", audit: Callable[[str, dict], None], config: Callable[[], AgentConfig]):
        self.store, self.audit, self.config = store, audit, config  # audit: Agent.audit_line
        self._heaps: Dict[str, List[Tuple[float, int, Any]]] = {}
        self._sending: Set[str] = set()  # users with a delivery in flight
        self._last = ""  # the user served last: the next is the one after, by name
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for n in range(NOTIFY_SENDERS):
            self._threads.append(threading.Thread(target=self._run, name=f"notifier-{n}", daemon=True))
            self._threads[-1].start()

    def close(self) -> None:
        """Stop taking notes; a delivery in flight may finish (a moment), then the agent closes
        the store. One still pending is not sent (README: When it's done)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + 2
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def job_event(self, user: str, job_id: str, event: str) -> None:
        """A job of `user` started or ended: at once, never blocking its caller (a worker)."""
        self._schedule(user, 0.0, ("job", job_id, event))

    def _schedule(self, user: str, delay: float, item: Any) -> None:
        with self._cond:
            heap = self._heaps.setdefault(user, [])
            waiting = sum(len(h) for h in self._heaps.values())
            if len(heap) >= NOTIFY_PENDING_PER_USER or waiting >= NOTIFY_PENDING_MAX:
                log.warning("notifications: %d of user %s waiting already (%d in all); dropped %s",
                            len(heap), user, waiting, item[0])
                return
            self._count += 1
            heapq.heappush(heap, (time.monotonic() + delay, self._count, item))
            self._cond.notify()

    def _next(self) -> Optional[Tuple[str, Any]]:
        """(user, item) due now, of a user with nothing in flight, in turn; None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                free = [user for user, heap in self._heaps.items() if heap and user not in self._sending]
                due = [user for user in free if self._heaps[user][0][0] <= now]
                if due:
                    user = min(due, key=lambda u: (u <= self._last, u))
                    self._last = user
                    item = heapq.heappop(self._heaps[user])[2]
                    if not self._heaps[user]:
                        del self._heaps[user]
                    self._sending.add(user)
                    return user, item
                self._cond.wait(min(self._heaps[u][0][0] for u in free) - now if free else None)
        return None

    def _run(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            user, item = got
            try:
                if item[0] == "job":
                    self._fan_out(item[1], item[2])
                else:
                    self._attempt(item[1])
            except Exception as e:  # a bug must not end the deliveries of everyone after it
                if self._closed:  # the agent stopped under it (the store may be closed): not a bug
                    log.info("notification %r not sent: the agent stopped (%s)", item[:2], e)
                    return
                log.exception("notification %r failed", item[:2])
            finally:
                with self._cond:
                    self._sending.discard(user)
                    self._cond.notify_all()

    def _fan_out(self, job_id: str, event: str) -> None:
        job = self.store.job(job_id)
        if job is None or job["user"] not in self.config().users:  # a removed user is told nothing more
            return
        for target in self.store.targets(job["user"]):
            if wants(target, event, job["status"]):
                payload = job_payload(job, event, target, self.store.patch_path(job_id))
                self._attempt(Delivery(target, payload, job_id))

    def _attempt(self, delivery: Delivery) -> None:
        delivery.attempt += 1
        sent = self.post(delivery)
        if not sent["ok"] and sent["retry"] and delivery.attempt < NOTIFY_ATTEMPTS:
            self._schedule(delivery.target["user"], NOTIFY_BACKOFF_S[delivery.attempt - 1], ("delivery", delivery))

    def test(self, target: dict) -> dict:
        """POST /v1/notify/ID/test: one attempt now, in the caller's thread; what happened."""
        delivery = Delivery(target, {"type": "test", "user": target["user"], "job": None}, None)
        delivery.attempt = 1
        sent = self.post(delivery)
        return {"ok": sent["ok"], "status": sent["status"], "error": sent["error"]}

    def post(self, delivery: Delivery) -> dict:
        """Send one attempt: {ok, retry (worth another try), status, error}, as an audit line."""
        target, started = delivery.target, time.monotonic()
        status, error = None, ""
        if not notify_host_allowed(self.config().notify_allow, target["url"]):
            error = "the host is no longer in [notify] allow"
        else:
            status, error = send_delivery(delivery, self.config().notify_allow, self.config().notify_timeout_s)
        ok = status is not None and 200 <= status < 300
        sent = {"ok": ok, "retry": not ok and (status is None or status >= 500 or status in (408, 429)),
                "status": status, "error": error or None}
        self.audit(target["user"], {
            "event": "notify", "user": target["user"], "target": target["id"], "kind": target["kind"],
            "url": redacted_url(target["url"]), "job": delivery.job, "type": delivery.event,
            "delivery": delivery.id, "attempt": delivery.attempt, "status": status,
            "error": sent["error"], "ms": round((time.monotonic() - started) * 1000, 1)})
        return sent


def send_delivery(delivery: Delivery, allow: Sequence[str], timeout: float = NOTIFY_TIMEOUT_S
                  ) -> Tuple[Optional[int], str]:
    """POST it (a webhook's body signed now, with this attempt's time): (HTTP status or None,
    what went wrong), all of it within `timeout`. Its host is resolved once here and connected
    to as resolved, and an address off the internet is reached only when an allow entry names
    that address itself (as the gateway judges the AI's connections): an allowed name that a
    DNS answer points at the box's loopback or its private network does not make the agent
    post there."""
    target = delivery.target
    address, refusal = delivery_address(target["url"], allow)
    if not address:
        return None, refusal
    headers = dict(delivery.headers, **{"User-Agent": f"patchwire-agent/{__version__}",
                                        "X-Patchwire-Delivery": delivery.id})
    if target["kind"] == "webhook" and target.get("secret"):
        stamp = int(time.time())
        headers[TIMESTAMP_HEADER] = str(stamp)
        headers[SIGNATURE_HEADER] = sign(target["secret"], stamp, delivery.body)
    request = urllib.request.Request(target["url"], data=delivery.body, headers=headers, method="POST")
    with Cutoff(timeout) as cutoff:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirects(),
                                             *pinned_handlers(address, cutoff))
        try:
            with opener.open(request, timeout=timeout) as answer:
                answer.read(64 * 1024)
                return answer.status, ""
        except urllib.error.HTTPError as e:
            e.close()
            return e.code, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if cutoff.expired:
                return None, f"no whole answer within {timeout:g} s ([notify] timeout_s)"
            return None, clip(str(getattr(e, "reason", e)), 200)


class Cutoff:
    """Ends a delivery at its deadline whatever the receiver does. A socket timeout bounds each
    wait, not their sum: a receiver answering a byte every few seconds would otherwise hold the
    one notifier thread, and so every user's deliveries, for as long as it liked. At the
    deadline the connection's sockets are shut down, which ends any read or write on them."""

    def __init__(self, seconds: float):
        self.sockets: List[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True

    def __enter__(self) -> "Cutoff":
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self.lock:
            self.sockets.append(sock)
            late = self.expired
        if late:  # the deadline passed while connecting
            self.cut()
        return sock

    def cut(self) -> None:
        with self.lock:
            self.expired = True
            sockets = list(self.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                # the plain socket's shutdown, also for a TLS one: its SSL object stays with the
                # thread reading it, which sees the end of the stream
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # a network's own NAT64: whatever it reaches
EMBEDS_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"),  # NAT64, IPv4-compatible,
               ipaddress.ip_network("::ffff:0:0:0/96"))  # SIIT's IPv4-translated


def on_the_internet(address: str) -> bool:
    """Whether `address` is on the internet, judged by the IPv4 address an IPv6 one carries
    (mapped, NAT64's 64:ff9b::/96, 6to4's 2002::/16, the old IPv4-compatible ::/96): Python
    calls 64:ff9b::a9fe:a9fe global, and a NAT64 gateway takes it to 169.254.169.254."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if any(ip in net for net in EMBEDS_IPV4) else None)
        if embedded is not None:
            return embedded.is_global
    return ip.is_global


def delivery_address(url: str, allow: Sequence[str]) -> Tuple[str, str]:
    """(the address to post `url` to, "") or ("", why not)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, UnicodeError) as e:
        return "", f"cannot resolve {host}: {e}"
    named = any(host_matches(p, address, port) for p in allow if is_ip_literal(p, address))
    if not on_the_internet(address) and not named:
        return "", (f"{host} is {address}, not an internet address: only a [notify] allow entry naming "
                    "that address itself reaches it")
    return address, ""


def pinned_handlers(address: str, cutoff: Cutoff) -> List[urllib.request.BaseHandler]:
    """urllib handlers whose connections go to `address` (TLS still checks the URL's host),
    their sockets watched by `cutoff`."""

    class Pinned(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = cutoff.watch(socket.create_connection((address, self.port), self.timeout))

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = cutoff.watch(socket.create_connection((address, self.port), self.timeout))
            self.sock = cutoff.watch(ssl.create_default_context().wrap_socket(sock, server_hostname=self.host))

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(Pinned, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(PinnedTLS, req)
    return [HTTP(), HTTPS()]


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a way elsewhere: the allowlist names where deliveries go."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


# ================================================================== the agent (server object)


class Agent:
    """Owns config, users, store, queue, project repos and workers. No module-level state:
    everything a request or a worker needs hangs off this object."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        make_state_dir(cfg.state_dir)  # mirrors, job folders, prompts and diffs: all below it
        migrate_layout(cfg.state_dir)
        self.store = Store(cfg.state_dir)
        self.audit = AuditLog(cfg.state_dir / "audit.log", cfg.audit_max_bytes)
        self.audit_budget = AuditBudget()  # every line a client causes: its requests', its deliveries'
        self.target_changes = AuditBudget(TARGET_CHANGES_BURST, 1 / 60)
        self.sandbox = Sandbox.choose(cfg.sandbox)
        if self.sandbox.warning:
            log.warning("%s", self.sandbox.warning)
        self.credential = Credential.find(cfg.network, dict(os.environ))
        if self.sandbox.kind != "none" and not cfg.network.configured:
            log.warning("%s", NETWORK_MISSING)
        self.queue = FairQueue()
        self.lock = threading.Lock()
        self.repos: Dict[Tuple[str, str], ProjectRepo] = {}
        self.busy: Dict[Tuple[str, str], set] = {}
        self.checking_ahead: Set[Tuple[str, str]] = set()  # projects whose job folder check_ahead checks
        self.runs: Dict[str, AIRun] = {}
        self.ended: Dict[str, threading.Event] = {}  # job -> set by finish(), for a cancel that waits
        # job -> reason: cancelled after a worker took it from the queue, before its run existed
        self.cancel_early: Dict[str, str] = {}
        self.running: Dict[str, int] = {}  # user -> jobs of theirs holding a worker
        self.run_began: Dict[str, Tuple[str, float]] = {}  # job holding a worker -> (user, monotonic)
        self.recent_runs: Deque[float] = deque(maxlen=20)  # seconds, for queue estimates
        self.announced: Dict[str, Tuple[int, Optional[int]]] = {}  # job -> last (position, estimate)
        self.announce_lock = threading.Lock()
        self.admission = threading.Lock()  # checks and enqueue of one ask at a time
        self.large_bodies = threading.BoundedSemaphore(LARGE_BODIES_AT_ONCE)
        self.user_locks: Dict[str, threading.Lock] = {}  # open_project's check-and-create, per user
        self.config_stamp = config_stamp(cfg.path)
        self.reload_lock = threading.Lock()
        self.workers: List[threading.Thread] = []
        self.metrics = Metrics()  # request counts and latencies, for GET /metrics
        self.started_at = time.time()
        self.notifier = Notifier(self.store, self.audit_line, lambda: self.cfg)  # its own thread: never a worker's

    # --- life cycle

    def start(self) -> None:
        self.notifier.start()
        self.recover()
        for job in self.store.jobs_with_status("done", "failed")[-self.recent_runs.maxlen:]:
            if job["started"] and job["finished"]:  # estimates right after a restart too
                self.recent_runs.append(job["finished"] - job["started"])
        for user in sorted({job["user"] for job in self.store.jobs_with_status("queued")} - set(self.cfg.users)):
            self.cancel_user_jobs(user, f"user {user} was removed", running=False)
        self.apply_cancel_requests()
        for n in range(self.cfg.workers):
            t = threading.Thread(target=self.work, name=f"worker-{n}", daemon=True)
            t.start()
            self.workers.append(t)
        threading.Thread(target=self.watch_config, name="config-watch", daemon=True).start()

    def stop(self) -> None:
        self.queue.close()
        self.notifier.close()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.stop("the agent was stopped while the AI ran")
        for t in self.workers:
            t.join(timeout=KILL_GRACE_S + 5)
        self.store.close()
        self.audit.close()

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

    # --- config reload (SIGHUP, or the file changed: `patchwire-agent user ...` rewrites it)

    def watch_config(self) -> None:
        """Picks up a changed config within a second even when no request comes (a removed
        user's queued jobs end); requests also check it, so a removed token fails at once."""
        while not self.queue.closed:
            time.sleep(1.0)
            self.maybe_reload()

    def maybe_reload(self) -> None:
        if config_stamp(self.cfg.path) != self.config_stamp:
            self.reload()

    def reload(self) -> None:
        """Read the config again. Users, tokens and policy apply at once; [server] and the
        number of workers need a restart. A config that does not load changes nothing."""
        with self.reload_lock:
            stamp = config_stamp(self.cfg.path)
            try:
                new = AgentConfig.load(self.cfg.path)
            except PatchwireError as e:
                if stamp != self.config_stamp:
                    log.error("config not reloaded, the old one stays in force: %s", e)
                self.config_stamp = stamp
                return
            old = self.cfg
            if (new.host, new.port, new.state_dir, new.workers) != (old.host, old.port, old.state_dir, old.workers):
                log.warning("[server] and [jobs] workers changes apply after a restart")
            new.host, new.port, new.state_dir, new.workers = old.host, old.port, old.state_dir, old.workers
            self.cfg, self.config_stamp = new, stamp
            log.warning("config reloaded: %d user(s)", len(new.users))
            for user in sorted(set(old.users) - set(new.users)):
                self.cancel_user_jobs(user, f"user {user} was removed", running=False)
            self.apply_cancel_requests()
            self.queue.wake()  # policy limits may have changed

    def apply_cancel_requests(self) -> None:
        """`user remove|rotate --cancel-jobs` leaves a request file for the running server."""
        folder = cancel_requests_dir(self.cfg.state_dir)
        for request in sorted(folder.glob("*")) if folder.is_dir() else ():
            request.unlink()
            if pw.NAME_RE.fullmatch(request.name):
                self.cancel_user_jobs(request.name, f"cancelled by the admin (user {request.name})",
                                      running=True)

    def cancel_user_jobs(self, user: str, reason: str, running: bool) -> None:
        """End the user's queued jobs; with `running`, stop their running ones too."""
        for job_id in self.queue.jobs_of(user):
            if self.queue.remove(job_id):
                self.finish(job_id, "cancelled", reason)
        if running:
            with self.lock:
                runs = [run for job_id, run in self.runs.items() if self.store.job(job_id)["user"] == user]
            for run in runs:
                run.stop(reason)

    # --- users

    def authenticate(self, header: str) -> str:
        self.maybe_reload()
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token", "send Authorization: Bearer TOKEN")
        presented = token_digest(token.strip())
        user = None
        for name, digest in self.cfg.users.items():
            if hmac.compare_digest(presented, digest):
                user = name
        if user is None:
            raise Unauthorized("invalid token", "check the token file on the laptop")
        return user

    def is_admin(self, user: str) -> bool:
        return user in self.cfg.admins

    def repo(self, user: str, project: str) -> ProjectRepo:
        with self.lock:
            key = (user, project)
            if key not in self.repos:
                self.repos[key] = ProjectRepo(self.cfg.state_dir, user, project)
            return self.repos[key]

    # --- notification targets (section "notifications")

    def audit_line(self, user: str, record: dict, address: str = "") -> None:
        """A line a client caused (a request, a target added or removed, a test delivery), within
        its AuditBudget: one user adding and removing targets in a loop wrote two lines a
        request beyond it, and pushed everyone's older lines out of the rotated log."""
        unlogged = self.audit_budget.take(user, address)
        if unlogged is not None:
            if unlogged:
                record["unlogged_before"] = unlogged  # its lines counted, not written, since its last
            self.audit.write(record)

    def limit_target_changes(self, user: str) -> None:
        """Target changes are always audited (a URL a stolen token adds must show), so they are
        limited instead: TARGET_CHANGES_BURST, then one a minute."""
        if self.target_changes.take(user, "") is None:
            raise HTTPFailure(HTTPStatus.TOO_MANY_REQUESTS, f"more than {TARGET_CHANGES_BURST} notification target "
                              "changes in a short time", "try again in a minute", code="rate_limited")

    def add_target(self, user: str, body: dict) -> dict:
        """A new target of `user`'s: {target, secret} (the secret only here, once)."""
        self.limit_target_changes(user)
        with self.admission:  # two adds at once must not both pass max_targets
            target = check_target_request(self.cfg, body, len(self.store.targets(user)))
            self.store.add_target({**target, "user": user})
        self.audit.write({"event": "notify_add", "user": user, "target": target["id"], "kind": target["kind"],
                          "url": redacted_url(target["url"])})
        return {"target": public_target(target), **({"secret": target["secret"]} if target["secret"] else {})}

    def find_target(self, user: str, target_id: str) -> dict:
        for target in self.store.targets(user):
            if target["id"] == target_id:
                return target
        raise NotFound(f"no notification target {target_id[:20]!r} of yours", "`patchwire notify list` lists them")

    def remove_target(self, user: str, target_id: str) -> dict:
        target = self.find_target(user, target_id)
        self.limit_target_changes(user)
        self.store.remove_target(user, target_id)
        self.audit.write({"event": "notify_remove", "user": user, "target": target_id})
        return public_target(target)

    def me(self, user: str, project: Optional[str]) -> dict:
        out: Dict[str, Any] = {"user": user, "version": __version__,
                               "mirror_root": str(mirror_root(self.cfg.state_dir, user)),
                               "inline_max_bytes": pw.INLINE_MAX_BYTES}
        if project is not None:
            repo = self.open_project(user, check_name(project, "project"))
            out["mirror"] = str(repo.mirror)
            # the laptop's doctor cannot see these folders over rrsync: the box says which it cannot write
            folders = (user_root(self.cfg.state_dir, user), mirror_root(self.cfg.state_dir, user), repo.mirror, repo.home)
            out["unwritable"] = [str(p) for p in folders if p.is_dir() and not os.access(p, os.W_OK | os.X_OK)]
            self.check_ahead(user, project)
        return out

    def check_ahead(self, user: str, project: str) -> None:
        """A laptop asks /v1/me before it scans and sends (an ask's sync): meanwhile, check the
        job folder its ask will most likely take (the lowest free slot) in the background
        (ProjectRepo.check_ahead), so that the job need not. One check per project at a time;
        none while every folder of the project is busy."""
        with self.lock:
            free = set(range(self.cfg.slots)) - self.busy.get((user, project), set())
            # one check of a user's at a time, AHEAD_AT_ONCE on the box: /v1/me in a loop over
            # many projects would otherwise keep a `git status` of each running, outside every
            # limit a job has (workers, max_running, the fair queue)
            if (not free or any(u == user for u, _ in self.checking_ahead)
                    or len(self.checking_ahead) >= AHEAD_AT_ONCE):
                return
            self.checking_ahead.add((user, project))
        threading.Thread(target=self._check_ahead, args=(user, project, min(free)),
                         name=f"ahead-{project}", daemon=True).start()

    def _check_ahead(self, user: str, project: str, slot: int) -> None:
        try:
            self.repo(user, project).check_ahead(slot)
        except (PatchwireError, OSError) as e:  # the folder went (gc), say: the job checks it
            log.debug("checking the job folder of %s/%s ahead failed: %s", user, project, e)
        finally:
            with self.lock:
                self.checking_ahead.discard((user, project))

    def open_project(self, user: str, project: str, for_ask: bool = False) -> ProjectRepo:
        """The user's project, its mirror folder made on first use (a sync or an ask), within
        the user's allowlist and `max_projects`. The repository comes with the first ask, and
        is counted on its own: folders rsynced straight into the mirror root (an SSH key can
        do that) never add repositories past the cap."""
        policy = self.cfg.policy(user)
        if not policy.allows_project(project):
            raise policy_refusal(HTTPStatus.FORBIDDEN, policy, "projects",
                                 f"project {project!r} is not allowed for user {user}")
        repo = self.repo(user, project)
        with self.lock:
            own = self.user_locks.setdefault(user, threading.Lock())
        # one check-and-create at a time per user (the cap holds under concurrency); not under
        # the agent's lock: a million folders a team mate's rsync key left in their mirror root
        # took 0.37 s to list, and held every user's requests and the workers meanwhile
        with own:
            projects = user_projects(self.cfg.state_dir, user)
            repos = {p.parent.name for p in (user_root(self.cfg.state_dir, user) / "projects").glob("*/git")}
            if project not in projects:
                self._check_project_cap(policy, len(projects))
                repo.make_mirror()
            if for_ask and project not in repos:
                self._check_project_cap(policy, len(repos))
        return repo

    @staticmethod
    def _check_project_cap(policy: "Policy", count: int) -> None:
        if count >= policy.max_projects:
            raise policy_refusal(HTTPStatus.FORBIDDEN, policy, "max_projects",
                                 f"user {policy.user} has {count} projects on this box already",
                                 "remove one on the box, or ask the admin to raise the limit")

    def health(self) -> dict:
        argv0 = self.cfg.ai_command[0]
        found = shutil.which(argv0, path=ai_environment(self.cfg).get("PATH"))
        with self.lock:
            running = len(self.runs)
        return {"ok": True, "version": __version__, "time": time.time(), "queue_depth": len(self.queue.order()),
                "running": running, "workers": self.cfg.workers,
                "ai_command": STAND_IN if self.cfg.stand_in else argv0,
                **({"ai": STAND_IN_LABEL} if self.cfg.stand_in else {}),
                "ai_found": bool(found), "sandbox": self.sandbox.kind,
                **({"sandbox_warning": self.sandbox.warning} if self.sandbox.warning else {})}

    # --- jobs

    def ask(self, user: str, body: dict) -> dict:
        policy = self.cfg.policy(user)
        project = check_name(body.get("project"), "project")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > policy.max_prompt_bytes:
            raise policy_refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, policy, "max_prompt_bytes",
                                 f"the prompt has {size} bytes", "shorten it, or put the long part in a file of the project")
        tree = check_tree_id(body.get("tree"), "tree")
        if "files" in body:
            files: Any = check_manifest(body.get("files"))
            if "content" in body:
                raise BadRequest("content goes with an ask of changes (base, changed, deleted), not with files")
        else:
            files = (check_tree_id(body.get("base"), "base"), check_paths(body.get("changed"), "changed"),
                     check_paths(body.get("deleted"), "deleted"), check_content(body.get("content", [])))
            stray = {entry[0] for entry in files[3]}.difference(files[1])
            if stray:  # a file the snapshot would not hash: the mirror would hold what no tree says
                raise BadRequest(f"content names a path that is not in changed: {sorted(stray)[0]}", CONTENT_HINT)
        attempts, profiles = check_attempts(policy, body, self.cfg.ai_profiles)
        self.check_room()
        self.check_quota(policy)
        timeout_s = self.check_timeout(policy, body.get("timeout_s", min(self.cfg.timeout_s, policy.timeout_s)))
        box = ask_box(policy, body, self.cfg.project_box.get(project), f"[projects.{project}]")
        parent = self.parent_job(user, project, body.get("continue"))
        repo = self.open_project(user, project, for_ask=True)
        self.admit(policy, attempts)  # refuse early, before the snapshot's work
        started = time.monotonic()
        snapshot = repo.snapshot(tree, files) if isinstance(files, list) else repo.snapshot_changes(tree, *files)
        snapped = {"form": "full", "files": len(files)} if isinstance(files, list) else {
            "form": "changes", "changed": len(files[1]), "deleted": len(files[2]),
            **({"inline": len(files[3])} if files[3] else {})}
        snapped["ms"] = round((time.monotonic() - started) * 1000, 1)
        job = {"id": secrets.token_hex(6), "user": user, "project": project, "prompt": prompt,
               "status": "queued", "created": time.time(), "snapshot": snapshot, "tree": tree,
               "timeout_s": timeout_s, "parent": parent["id"] if parent else None, "box": box}
        with self.admission:  # again, atomically with the enqueue: concurrent asks
            self.admit(self.cfg.policy(user), attempts)
            siblings = attempt_jobs(job, attempts, profiles)
            for one in siblings:
                self.store.create_job(one)
                self.queue.put(QueueItem(one["id"], user, project, parent["slot"] if parent else None))
        for one in siblings:
            self.audit.job(one["id"], "snapshot", user=user, project=project, **snapped)
            position, estimate = self.queue_position(one["id"])
            self.store.add_event(one["id"], {"type": "queued", "project": project, "position": position,
                                             "estimate_s": estimate})
        return self.store.job(job["id"])

    def check_timeout(self, policy: "Policy", timeout_s: Any) -> int:
        ceiling = policy.timeout_s
        if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s <= 0 or (
                timeout_s > ceiling and policy.sources["timeout_s"] == "[ai] max_timeout_s"):
            raise BadRequest(f"timeout_s must be 1..{ceiling} seconds")
        if timeout_s > ceiling:
            raise policy_refusal(HTTPStatus.FORBIDDEN, policy, "timeout_s",
                                 f"timeout_s {timeout_s} is over the ceiling", f"ask with --timeout {ceiling} or less")
        return timeout_s

    def admit(self, policy: "Policy", adding: int = 1) -> None:
        """Refuse an ask over the user's queue or rate limit (429, with Retry-After)."""
        user = policy.user
        queued = len(self.queue.jobs_of(user))
        if queued + adding > policy.max_queued:
            raise policy_refusal(HTTPStatus.TOO_MANY_REQUESTS, policy, "max_queued",
                                 f"user {user} has {queued} jobs waiting already",
                                 "wait for one to start, or cancel one (patchwire jobs, patchwire cancel)")
        window = policy.rate_window()
        if not window:
            return
        count, seconds = window
        now = time.time()
        times = self.store.ask_times(user, now - seconds)
        if len(times) >= count:
            retry = max(1, int(times[-count] + seconds - now + 0.999))
            raise policy_refusal(HTTPStatus.TOO_MANY_REQUESTS, policy, "rate_limit",
                                 f"user {user} asked {len(times)} times in the last {seconds} s",
                                 f"try again in {retry} s", retry_after_s=retry)

    def check_room(self) -> None:
        """Refuse an ask while the state folder's file system is (nearly) full: the job's
        snapshot, events and diff could not be recorded, and it would end in a muddle."""
        free = free_bytes(self.cfg.state_dir)
        self.store.keep_reserve()  # given up on a full disk: held again once there is room
        if free < MIN_FREE_BYTES:
            raise HTTPFailure(HTTPStatus.INSUFFICIENT_STORAGE, f"the box's disk is full: {free // 1024} KiB free "
                              f"for {self.cfg.state_dir}", "free space on the box, then ask again",
                              code="disk_full")

    def user_bytes(self, user: str) -> int:
        """What counts toward the user's disk quota: their folder on the box (mirrors,
        repositories, job folders, AI homes) and what their jobs keep in the store."""
        return tree_size(user_root(self.cfg.state_dir, user)) + self.store.stored_bytes(user)

    def home_project(self, job: dict) -> Optional[str]:
        """The project whose own AI home the job uses (one behind a network of its own), else None."""
        return job["project"] if self.cfg.network.own_network(job["user"], job["project"]) else None

    def job_home(self, job: dict) -> Path:
        return ai_home(self.cfg.state_dir, job["user"], self.home_project(job))

    def check_quota(self, policy: "Policy") -> None:
        """Refuse an ask (507, code "quota") while what the user holds on the box (user_bytes)
        is at or over their disk quota: a job would only add to it."""
        if policy.disk_quota_mb is None:
            return
        used = self.user_bytes(policy.user)
        if used >= policy.disk_quota_mb * MIB:
            raise policy_refusal(HTTPStatus.INSUFFICIENT_STORAGE, policy, "disk_quota_mb",
                                 f"user {policy.user} uses {pw.human_bytes(used)} on this box",
                                 "remove projects you no longer need from the box, or ask its admin to "
                                 f"raise the limit (`patchwire-agent policy {policy.user}` shows it)",
                                 code="quota", used_bytes=used)

    def parent_job(self, user: str, project: str, prefix: Any) -> Optional[dict]:
        """The finished job a follow-up ask continues, if any."""
        if prefix is None:
            return None
        parent = self.find_job(user, str(prefix))
        if parent["project"] != project:
            raise BadRequest(f"job {parent['id']} belongs to project {parent['project']}, "
                             f"not {project}")
        if parent["status"] != "done":
            raise Conflict(f"job {parent['id']} is {parent['status']}: only a finished "
                           "job can be continued", code="not_done")
        if not self.store.patch_path(parent["id"]).exists():
            raise HTTPFailure(HTTPStatus.GONE, f"job {parent['id']} was pruned by `patchwire-agent gc`: "
                              "its change is no longer on the box", "ask again without --continue", code="pruned")
        return parent

    def find_job(self, user: str, prefix: str) -> dict:
        if not re.fullmatch(r"[0-9a-f]{1,32}", prefix or ""):
            raise NotFound(f"no job {prefix!r}")
        jobs = self.store.find_jobs(user, prefix, limit=2)
        if not jobs:
            raise NotFound(f"no job {prefix!r} of yours", "list them with `patchwire jobs`")
        if len(jobs) > 1:
            raise Conflict(f"job id prefix {prefix!r} is ambiguous", "give more characters",
                           code="ambiguous")
        return jobs[0]

    def cancel(self, user: str, prefix: str) -> dict:
        job = self.find_job(user, prefix)
        if job["status"] in TERMINAL:
            raise Conflict(f"job {job['id']} is already {job['status']}", code="finished")
        reason = "cancelled by " + user
        if self.queue.remove(job["id"]):
            self.finish(job["id"], "cancelled", reason)
        else:
            with self.lock:
                run = self.runs.get(job["id"])
                if run is None:  # taken by a worker, its run not made yet: run_job stops it
                    self.cancel_early[job["id"]] = reason
                ended = self.ended.setdefault(job["id"], threading.Event())
            if run:
                run.stop(reason)
            # finish() stores the end, then sets the event: either it is stored already or it
            # will wake us; bounded in case the run does not end within its kill grace
            if self.store.job(job["id"])["status"] not in TERMINAL:
                ended.wait(KILL_GRACE_S + 2)
            with self.lock:
                if self.ended.get(job["id"]) is ended and not ended.is_set():
                    del self.ended[job["id"]]
        return self.store.job(job["id"])

    def finish(self, job_id: str, status: str, reason: str = "", timings: Optional[Dict[str, float]] = None,
               **fields: Any) -> None:
        event = {"done": "finished", "failed": "failed", "cancelled": "cancelled"}[status]
        extra: Dict[str, Any] = {"stats": fields.get("stats")} if status == "done" else {"reason": reason}
        if timings:
            extra["timings"] = timings
        result = fields.get("result") or {}
        for key in ("network", "checks", "setup"):  # what the job contacted, and its setup and
            if result.get(key):  # checks: for the laptop to show beside the outcome
                extra[key] = result[key]
        self.store.add_event(job_id, {"type": event, "status": status, **extra}, status=status,
                             reason=reason or None, finished=time.time(), **fields,
                             **usage_columns(fields.get("result"), fields.get("stats")))
        with self.lock:
            ended = self.ended.pop(job_id, None)
        if ended:
            ended.set()
        job = self.store.job(job_id) or {}
        self.audit.job(job_id, "job_end", user=job.get("user"), project=job.get("project"), status=status,
                       reason=reason or None, **({"timings": timings} if timings else {}))
        if job.get("user"):
            self.notifier.job_event(job["user"], job_id, "end")

    # --- workers

    def work(self) -> None:
        while True:
            item = self.queue.take(self._claim)
            if item is None:
                return
            began = time.monotonic()
            try:
                with job_folders_lock(self.repo(item.user, item.project).home):  # gc keeps off
                    self.run_job(item)
            except Exception as e:  # a bug, or a full disk: the job fails, the worker lives on
                log.exception("job %s crashed", item.job_id)
                self._finish_after_crash(item, e)
            finally:
                with self.lock:  # how long a worker is held, for the estimates of waiting jobs
                    self.recent_runs.append(time.monotonic() - began)
                self._release_slot(item)

    def _finish_after_crash(self, item: QueueItem, error: Exception) -> None:
        """Fail a job whose run raised, its folder reset first: what the AI left there may be
        what filled the disk its end must be recorded on."""
        job_id = item.job_id
        try:
            self.repo(item.user, item.project).clean_slot(item.slot)
        except (PatchwireError, OSError) as e:
            log.warning("could not reset the job folder of %s: %s", job_id, e)
        try:
            self.finish(job_id, "failed", f"internal error in the agent: {describe_exception(error)}")
        except Exception:  # the store itself fails (disk full): the job stays running, and
            # is failed with a reason by `recover` at the next start
            log.exception("could not record the failure of job %s", job_id)

    def _claim(self, item: QueueItem) -> bool:
        """Called under the queue's lock: claims a job folder for the item when one is free
        and the user is under their max_running."""
        limit = self.cfg.policy(item.user).max_running
        with self.lock:
            if self.running.get(item.user, 0) >= limit:
                return False
            busy = self.busy.setdefault((item.user, item.project), set())
            free = set(range(self.cfg.slots)) - busy
            if item.pin is not None and item.pin < self.cfg.slots:
                free &= {item.pin}
            if not free:
                return False
            slot = min(free)
            busy.add(slot)
            item.slot = slot
            self.running[item.user] = self.running.get(item.user, 0) + 1
            self.run_began[item.job_id] = (item.user, time.monotonic())
            return True

    def _release_slot(self, item: QueueItem) -> None:
        with self.lock:
            self.busy[(item.user, item.project)].discard(item.slot)
            self.runs.pop(item.job_id, None)
            self.running[item.user] -= 1
            if not self.running[item.user]:
                del self.running[item.user]
            self.run_began.pop(item.job_id, None)
        self.queue.wake()
        self._announce_positions()

    def queue_position(self, job_id: str) -> Tuple[int, Optional[int]]:
        """(queued jobs that start before it, estimated seconds until it starts, None without
        history)."""
        planned = self._plan().get(job_id)
        if planned:
            return planned
        with self.lock:  # a worker took it already
            return 0, (0 if self.recent_runs else None)

    def _plan(self) -> Dict[str, Tuple[int, Optional[int]]]:
        """Every queued job's (place, estimate), from plan_starts over the fair order, the
        running jobs' expected rest and each user's max_running: a job of a user at their
        limit waits for one of theirs, while another user's later job takes a free worker."""
        items = self.queue.items()
        now = time.monotonic()
        with self.lock:
            known = bool(self.recent_runs)
            average = sum(self.recent_runs) / len(self.recent_runs) if known else 1.0
            running = [(user, max(0.0, average - (now - began))) for user, began in self.run_began.values()]
        users = {user for _, user in items} | {user for user, _ in running}
        limits = {user: self.cfg.policy(user).max_running for user in users}
        starts = plan_starts(items, running, self.cfg.workers, limits, average)
        return {job: (place, int(round(at)) if known else None) for job, (place, at) in starts.items()}

    def _announce_positions(self) -> None:
        """A `position` event for each waiting job whose place or estimate changed."""
        with self.announce_lock:
            plan = self._plan()
            order = list(plan)
            try:
                for job_id, now in plan.items():
                    if self.announced.get(job_id) != now:
                        self.announced[job_id] = now
                        self.store.add_event(job_id, {"type": "position", "position": now[0], "estimate_s": now[1]})
            except sqlite3.Error as e:  # progress only (the disk is full): the worker goes on
                log.warning("could not announce queue positions: %s", e)
            waiting = set(order)
            for job_id in [j for j in self.announced if j not in waiting]:
                del self.announced[job_id]

    def run_job(self, item: QueueItem) -> None:
        times = StepTimes()
        job = self.store.job(item.job_id)
        slot = item.slot
        repo = self.repo(job["user"], job["project"])
        self.store.update_job(job["id"], status="running", started=time.time(), slot=slot)
        self._announce_positions()
        parent = self.store.job(job["parent"]) if job["parent"] else None
        carry = (parent["snapshot"], parent["result"]["result_commit"]) if parent else None
        gateway = self.open_gateway(job)
        try:
            self._run_in_walls(job, repo, slot, parent, carry, times, gateway)
        finally:
            if gateway:
                gateway.close()
        threading.Thread(target=repo.maintain, name=f"upkeep-{job['project']}", daemon=True).start()

    def open_gateway(self, job: dict) -> Optional["JobGateway"]:
        """The job's way out (section "the gateway"): under a sandbox with [network] set (bwrap:
        a socket; sandbox-exec: a keyed loopback port). An older config without [network]
        keeps the box's network (a warning at start says so)."""
        if self.sandbox.kind == "none" or not self.cfg.network.configured:
            return None
        policy = self.cfg.network.policy(job["user"], job["project"])
        report = EgressReport(lambda e: self.store.add_event(job["id"], e))
        folder = socket_folder("pw-gateway-")  # gone with the gateway
        key = GatewayKey() if self.sandbox.kind == "sandbox-exec" else None
        return JobGateway(folder, policy, self.api_upstream(), self.credential, report, own_folder=True, key=key)

    def api_upstream(self) -> str:
        """[network] api_upstream, else the API the AI would have used: ANTHROPIC_BASE_URL of
        [ai] env or of the agent's environment, else Anthropic's."""
        return (self.cfg.network.api_upstream or self.cfg.ai_env.get("ANTHROPIC_BASE_URL")
                or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com")

    def _run_in_walls(self, job: dict, repo: ProjectRepo, slot: int, parent: Optional[dict],
                      carry: Optional[Tuple[str, str]], times: "StepTimes", gateway: Optional["JobGateway"]) -> None:
        argv, env, cgroup = self.confine(job, repo, slot, parent, gateway)
        output = self._job_output(job)
        run = self._new_run(job, repo, slot, argv, env, output)
        with self.lock:
            self.runs[job["id"]] = run  # from here on a cancel reaches the job
            early = self.cancel_early.pop(job["id"], None)
        if early:  # cancelled while this worker was taking it: the AI never starts
            cgroup.remove()
            self.finish(job["id"], "cancelled", early)
            return
        times.step("setup_ms")
        try:
            repo.prepare_slot(slot, job["snapshot"], carry)
            times.step("prepare_ms")
            links = repo.remove_escaping_links(slot)
            times.step("links_ms")
        except PatchwireError as e:
            cgroup.remove()
            self.finish(job["id"], "failed", f"could not prepare the job folder: {e.message}")
            return
        if links:
            self.store.add_event(job["id"], {"type": "links_removed", "paths": sorted(links)[:100],
                                             "count": len(links)})
        steps = BoxSteps(self, job, repo, slot, gateway, output)
        setup = self._setup(steps, run, cgroup, times)
        if setup is False:
            return
        self.store.add_event(job["id"], {"type": "started", "slot": slot, "sandbox": self.sandbox.kind,
                                         **({"ai": STAND_IN_LABEL} if self.cfg.stand_in else {}),
                                         **self.limits_said(cgroup), **({"continues": parent["id"]} if parent else {})})
        self.audit.job(job["id"], "job_start", user=job["user"], project=job["project"], slot=slot)
        self.notifier.job_event(job["user"], job["id"], "start")
        started = time.monotonic()
        status, reason, result = limited_run(run, cgroup)
        self._flush_output(job["id"], output)
        times.step("ai_ms")
        summary = summarize_result(result, time.monotonic() - started, run.exit_code)
        if self.cfg.stand_in:  # the job's record says it too, not only its events
            summary["ai"] = STAND_IN_LABEL
        if setup:
            summary["setup"] = setup
        if gateway:
            summary["network"] = gateway.report.summary()
            self.audit.job(job["id"], "egress", user=job["user"], project=job["project"], **summary["network"])
        if status != "done":
            self._fail_run(job["id"], repo, slot, status, reason, result=summary)
            return
        collected = self._collect(job, repo, slot, links, summary, times)
        if collected is not None:
            self._check(steps, summary, times, *collected)

    def _setup(self, steps: BoxSteps, run: AIRun, cgroup: JobCgroup, times: StepTimes) -> Any:
        """The project's setup before the AI: its report (None without one), or False when
        it failed or was cancelled and the job ended so, before any AI time."""
        job = steps.job
        status, reason, setup = steps.setup()
        if setup is not None:
            times.step("project_setup_ms")
        self._swap_run(job["id"], run)  # a cancel of the setup carries over: the AI never starts
        if status == "done":
            return setup
        cgroup.remove()
        result = {"setup": setup, **({"network": steps.gateway.report.summary()} if steps.gateway else {})}
        self._fail_run(job["id"], steps.repo, steps.slot, status, reason, result=result, timings=times.ms)
        return False

    def _check(self, steps: BoxSteps, summary: dict, times: StepTimes, stats: dict, commit: str) -> None:
        """The project's checks on the collected result, then the job's end (cancelled when a
        cancel came while a check ran)."""
        job_id = steps.job["id"]
        status, reason, checks = steps.checks(commit, self.store.patch_path(job_id))
        result = {**summary, "result_commit": commit}
        if checks is not None:
            result["checks"] = checks
            times.step("checks_ms")
        if status != "done":
            self._fail_run(job_id, steps.repo, steps.slot, status, reason, result=result)
            return
        self.finish(job_id, "done", result=result, stats=stats, timings=times.ms)

    def _job_output(self, job: dict) -> OutputBudget:
        """Where a job's setup, AI and check events go: kept within [jobs] max_output_mb."""
        return OutputBudget(lambda e: self.store.add_event(job["id"], e), int(self.cfg.max_output_mb * MIB),
                            f"[jobs] max_output_mb = {self.cfg.max_output_mb:g}")

    def _new_run(self, job: dict, repo: ProjectRepo, slot: int, argv: List[str], env: dict,
                 output: OutputBudget) -> AIRun:
        """The job's AI run of the confined `argv`, its folder watched against the user's disk quota."""
        return AIRun(argv, repo.slot_path(slot), env, job["prompt"], job["timeout_s"], output,
                     on_spawn=lambda pid: self._record_pgid(job["id"], pid),
                     watch=self.quota_watch(job, repo.slot_path(slot)))

    def _swap_run(self, job_id: str, run: AIRun) -> None:
        """Make `run` the one a cancel of the job stops; a cancel that reached the run before
        it stops this one too (before it starts: it never does)."""
        with self.lock:
            before = self.runs.get(job_id)
            self.runs[job_id] = run
        if before is not None and before is not run and before.stop_reason and before.stop_status == "cancelled":
            run.stop(before.stop_reason)

    def _record_pgid(self, job_id: str, pgid: int) -> None:
        """Note the AI's process group, for `recover` after a crash. Not worth a run: on a full
        disk this is logged and the run goes on: raised out of AIRun.run, it would leave the AI
        running unwatched."""
        try:
            self.store.update_job(job_id, pgid=pgid)
        except sqlite3.Error as e:
            log.warning("could not record the process group of job %s: %s", job_id, e)

    def _flush_output(self, job_id: str, output: OutputBudget) -> None:
        """Store the tail of the AI's output. On a full disk the job's end matters more than
        its tail: that is logged and dropped, and the end recorded next."""
        try:
            output.flush()
        except sqlite3.Error as e:
            log.warning("could not store the end of the AI's output of job %s: %s", job_id, e)

    def _collect(self, job: dict, repo: ProjectRepo, slot: int, links: Dict[str, str], summary: dict,
                 times: StepTimes) -> Optional[Tuple[dict, str]]:
        """The AI's change as the job's patch file: (stats, result commit), or None when the
        job failed with the reason (over [jobs] max_diff_mb, or git failed), its patch gone
        and folder reset."""
        try:
            repo.restore_links(slot, links)
            with self.store.open_patch(job["id"]) as patch:
                collected = repo.collect(slot, job["snapshot"], job["id"], patch, int(self.cfg.max_diff_mb * MIB))
                times.step("collect_ms")
            nested = collected[0].pop("repositories_left_out", None)
            if nested:
                self.store.add_event(job["id"], {"type": "repositories_left_out", "paths": nested[:100],
                                                 "count": len(nested)})
            times.step("patch_ms")
            return collected
        except (PatchwireError, OSError) as e:
            self.store.patch_path(job["id"]).unlink(missing_ok=True)
            self._fail_run(job["id"], repo, slot, "failed", self.collect_failure(e), result=summary)
            return None

    def confine(self, job: dict, repo: ProjectRepo, slot: int, parent: Optional[dict],
                gateway: Optional["JobGateway"] = None, command: Optional[List[str]] = None,
                name: str = "") -> Tuple[List[str], dict, JobCgroup]:
        """The AI's argv and environment for this job, inside its walls and limits: the
        user's own AI home, the sandbox, the job's network (its gateway, when there is one),
        the job's cgroups (made here, removed by the run). `command` instead of the AI: a
        [box] setup command or check, in the very same walls (cgroups named `name`)."""
        cfg, bwrap = self.cfg, self.sandbox.kind == "bwrap"
        credentials = agent_credentials()
        if gateway and gateway.credential:
            credentials = None  # the gateway adds the box's credential: the AI holds none
        home = prepare_ai_home(cfg.state_dir, job["user"], credentials, bound=bwrap, project=self.home_project(job))
        limits = cfg.limits.probe() if bwrap else AILimits(0, 0, 0)
        walls = JobWalls(repo.slot_path(slot), cfg.state_dir, repo.git_dir, home, limits,
                         secret_files=cfg.secret_files, readable=cfg.readable,
                         credentials=credentials if bwrap else None, gateway=gateway.path if gateway else None,
                         gateway_port=gateway.port if gateway else 0)
        env = {**ai_environment(cfg, home), **attempt_environment(job)}
        if gateway:
            env = gateway_ai_environment(env, holds_credential=gateway.credential is not None,
                                         port=gateway.port or GATEWAY_PORT, key=gateway.key)
        argv, env = self.sandbox.wrap(command or self.ai_argv(parent, job), env, walls,
                                      scratch=repo.home / "tmp" / f"slot{slot}")
        cgroup = JobCgroup(limits, name or job["id"])
        if bwrap:
            try:
                cgroup.create()
            except OSError as e:  # the job runs, and its started event says what is unlimited
                log.warning("could not make the cgroups of job %s: %s", job["id"], describe_exception(e))
                cgroup.remove()
                cgroup.folders.clear()
                cgroup.limits = AILimits(limits.tmp_mb, limits.max_processes, limits.max_memory_mb)
        return cgroup.wrap(argv), env, cgroup

    def limits_said(self, cgroup: JobCgroup) -> dict:
        """The `started` event's word on the limits: what holds, and why one does not."""
        if self.sandbox.kind != "bwrap":
            return {"limits": {}, "unlimited": f"no limits apply without a sandbox ({self.sandbox.kind})"}
        why = cgroup.limits.unlimited()
        return {"limits": cgroup.limits.summary(), **({"unlimited": why} if why else {})}

    def collect_failure(self, e: Exception) -> str:
        if isinstance(e, DiffTooLarge):
            return (f"the AI's change is too large: its diff is over [jobs] max_diff_mb = {self.cfg.max_diff_mb:g} "
                    "(MiB); ask for a smaller change, or ask the box's admin to raise the limit")
        return "could not collect the AI's changes: " + (e.message if isinstance(e, PatchwireError)
                                                         else describe_exception(e))

    def quota_watch(self, job: dict, folder: Path) -> Optional[Callable[[], Optional[str]]]:
        """For a job's run: a check of the user's disk quota, or None without one. The rest of
        what the user holds is measured once, at the start; the job folder and the AI home the
        job writes at every sample (tree_size: about 40 ms per 20,000 files, every
        QUOTA_SAMPLE_S: 2% of a core; bench/quota_walk.py; the sampling slows to keep it so)."""
        user = job["user"]
        policy = self.cfg.policy(user)
        if policy.disk_quota_mb is None:
            return None
        limit = int(policy.disk_quota_mb * MIB)
        written = [folder, self.job_home(job)]  # a setup command or the AI fills either
        rest = self.user_bytes(user) - sum(map(tree_size, written))

        def over() -> Optional[str]:
            used = rest + sum(map(tree_size, written))
            if used <= limit:
                return None
            return (f"the job's files took user {user} over their disk quota on the box "
                    f"({pw.human_bytes(used)}); the limit is {policy.rule('disk_quota_mb')}")
        return over

    def _fail_run(self, job_id: str, repo: ProjectRepo, slot: int, status: str, reason: str,
                  **fields: Any) -> None:
        """End a run that produced no diff. Its job folder is reset first: what the AI left
        there may be what filled the disk the job's end must be recorded on."""
        try:
            repo.clean_slot(slot)
        except (PatchwireError, OSError) as e:  # the next job's prepare_slot tries again
            log.warning("could not reset the job folder of %s: %s", job_id, e)
        self.finish(job_id, status, reason, **fields)

    def ai_argv(self, parent: Optional[dict], job: Optional[dict] = None) -> List[str]:
        """The AI command (of the job's profile, if it names one); a follow-up adds `[ai]
        resume_args` with the parent's session."""
        command = profile_command(self.cfg, job, parent)
        session = ((parent or {}).get("result") or {}).get("session_id")
        if not session:
            return list(command)
        return command + [a.replace("{session_id}", session) for a in self.cfg.resume_args]


def plan_starts(order: List[Tuple[str, str]], running: List[Tuple[str, float]], workers: int,
                limits: Dict[str, int], average: float) -> Dict[str, Tuple[int, float]]:
    """{job: (queued jobs starting before it, seconds until it starts)} for the queued (job, user)
    pairs in the fair queue's order, as the workers will take them: each running (user, seconds
    left) holds a worker; at each moment a worker is free, the first job in order whose user is
    under their limit starts, and runs `average` seconds."""
    free = sorted([left for _, left in running] + [0.0] * max(0, workers - len(running)))
    ends: Dict[str, List[float]] = {}
    for user, left in running:
        ends.setdefault(user, []).append(left)
    waiting, now = list(order), 0.0
    out: Dict[str, Tuple[int, float]] = {}
    while waiting and free:
        now = max(now, free[0])
        pick = next((w for w in waiting if sum(end > now for end in ends.get(w[1], ())) < limits.get(w[1], workers)),
                    None)
        if pick is None:  # every waiting user is at their limit: on to the next end of a run
            later = [end for user_ends in ends.values() for end in user_ends if end > now]
            if not later:
                break
            now = min(later)
            continue
        waiting.remove(pick)
        free.pop(0)
        bisect.insort(free, now + average)
        ends.setdefault(pick[1], []).append(now + average)
        out[pick[0]] = (len(out), now)
    return out


class StepTimes:
    """Milliseconds per step of a job's run, one after the other, for its `finished` event and
    the audit log's job_end line (bench/ask.py prints them): cheap enough to be always on."""

    def __init__(self):
        self.ms: Dict[str, float] = {}
        self.last = time.monotonic()

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = round((now - self.last) * 1000, 1)
        self.last = now


def limited_run(run: AIRun, cgroup: JobCgroup) -> Tuple[str, str, dict]:
    """Run the AI in its cgroups; a run that failed at a limit says which config key set it."""
    try:
        status, reason, result = run.run()
        hit = cgroup.hit()
    finally:
        cgroup.remove()
    if not hit and cgroup.limits.processes_by == "prlimit" and "fork" in reason.lower():
        hit = f"[ai] max_processes = {cgroup.limits.max_processes}"  # RLIMIT_NPROC says no more than this
    if status == "failed" and hit:
        reason = f"the AI reached its limit {hit} (raise it in agent.toml if the job needs more): {reason}"
    elif status == "failed" and "No space left on device" in reason + run.stderr_tail.decode("utf-8", "replace"):
        reason += (f" (the AI's /tmp holds [ai] tmp_mb = {cgroup.limits.tmp_mb} MB; the job folder "
                   "shares the state folder's disk)")
    return status, reason, result


def summarize_result(result: dict, elapsed: float, exit_code: Optional[int]) -> dict:
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    return {"exit_code": exit_code, "is_error": bool(result.get("is_error")),
            "subtype": result.get("subtype"), "duration_s": round(elapsed, 3),
            "num_turns": result.get("num_turns"), "session_id": result.get("session_id"),
            "tokens_in": usage.get("input_tokens"), "tokens_out": usage.get("output_tokens"),
            "cache_read_tokens": usage.get("cache_read_input_tokens"),
            "cache_write_tokens": usage.get("cache_creation_input_tokens"),
            "cost_usd": result.get("total_cost_usd")}


def policy_refusal(status: int, policy: "Policy", key: str, message: str, hint: str = "",
                   code: str = "policy", **details: Any) -> HTTPFailure:
    """A refusal that names the limit, its value and the rule that set it."""
    return HTTPFailure(status, f"{message}; the limit is {policy.rule(key)}",
                       hint or f"ask the box's admin (`patchwire-agent policy {policy.user}` shows the rules)",
                       code=code, limit=key, value=policy.values[key], rule=policy.sources[key], **details)


def config_stamp(path: Path) -> Tuple[int, int, int]:
    """What tells a changed config file: an atomic rewrite is a new inode."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def cancel_requests_dir(state_dir: Path) -> Path:
    return state_dir / "cancel-requests"


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not pw.NAME_RE.fullmatch(value):
        raise BadRequest(f"{what} must be a name of letters, digits, '.', '_' and '-' "
                         f"(at most 64)")
    return value


TREE_ID_RE = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


def check_tree_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not TREE_ID_RE.fullmatch(value):
        raise BadRequest(f"{what} must be a git tree id")
    return value


def check_paths(value: Any, what: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"{what} must be a list of paths", "send `files` (every file) or `base`, "
                         "`changed` and `deleted`")
    try:
        return [pw.check_relative_path(p) for p in value]
    except UsageError as e:
        raise BadRequest(f"{what}: {e.message}")


CONTENT_HINT = "send `content` as [[path, mode, mtime_ns, base64 bytes], ...] (regular files only)"


def check_content(value: Any) -> List[Tuple[str, str, int, bytes]]:
    """The files an ask of changes carries itself: [[path, "100644"|"100755", mtime in ns,
    base64 of the bytes], ...], at most pw.INLINE_MAX_BYTES in all (413 past it)."""
    if not isinstance(value, list):
        raise BadRequest("content must be a list of files", CONTENT_HINT)
    out, total = [], 0
    for entry in value:
        if (not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[0], str)
                or entry[1] not in ("100644", "100755") or type(entry[2]) is not int
                or not 0 <= entry[2] < 2 ** 63 or not isinstance(entry[3], str)):
            raise BadRequest(f"bad entry in content: {str(entry)[:100]}", CONTENT_HINT)
        path = check_paths([entry[0]], "content")[0]
        try:
            data = base64.b64decode(entry[3], validate=True)
        except ValueError:  # binascii.Error is one
            raise BadRequest(f"content of {path} is not base64", CONTENT_HINT)
        total += len(data)
        if total > pw.INLINE_MAX_BYTES:
            raise HTTPFailure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"content over {pw.INLINE_MAX_BYTES} bytes",
                              "send bigger files by rsync (patchwire does)", code="too_large")
        out.append((path, entry[1], entry[2], data))
    return out


def check_manifest(files: Any) -> List[Tuple[str, str, str]]:
    if not isinstance(files, list):
        raise BadRequest("files must be a list of [mode, blob, path]")
    out = []
    for entry in files:
        if (not isinstance(entry, list) or len(entry) != 3 or not all(isinstance(x, str) for x in entry)
                or entry[0] not in ("100644", "100755", "120000")):
            raise BadRequest(f"bad entry in files: {str(entry)[:100]}")
        try:
            pw.check_relative_path(entry[2])
        except UsageError as e:
            raise BadRequest(e.message)
        out.append((entry[0], entry[1], entry[2]))
    return out


# ================================================================== metrics (Prometheus text format)
# Job figures are read from the store at each scrape, so they count every job ever run on
# this state folder (counters that survive restarts); request figures live in memory.

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Request counts and a latency histogram per (method, route template, status)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, str], List[float]] = {}  # [bucket counts..., count, sum]

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(int(status)))
        with self.lock:
            cell = self.requests.setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    cell[i] += 1
            cell[-2] += 1
            cell[-1] += seconds

    def request_lines(self) -> List[str]:
        with self.lock:
            cells = sorted((key, list(cell)) for key, cell in self.requests.items())
        count = ["# HELP patchwire_http_requests_total HTTP requests answered, by route template and status.",
                 "# TYPE patchwire_http_requests_total counter"]
        hist = ["# HELP patchwire_http_request_duration_seconds Time from request to the end of the answer.",
                "# TYPE patchwire_http_request_duration_seconds histogram"]
        name = "patchwire_http_request_duration_seconds"
        for (method, route, status), cell in cells:
            labels = {"method": method, "route": route, "status": status}
            count.append(metric_line("patchwire_http_requests_total", labels, cell[-2]))
            for bound, n in zip(LATENCY_BUCKETS, cell):
                hist.append(metric_line(name + "_bucket", {**labels, "le": repr(bound)}, n))
            hist.append(metric_line(name + "_bucket", {**labels, "le": "+Inf"}, cell[-2]))
            hist.append(metric_line(name + "_count", labels, cell[-2]))
            hist.append(metric_line(name + "_sum", labels, cell[-1]))
        return count + hist


def metric_line(name: str, labels: dict, value: float) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    inside = ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items())
    number = int(value) if float(value).is_integer() else value
    return f"{name}{{{inside}}} {number}" if inside else f"{name} {number}"


def metric_family(name: str, kind: str, help_: str, samples: List[Tuple[dict, float]]) -> List[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"] + [metric_line(name, l, v) for l, v in samples]


def render_metrics(agent: "Agent") -> str:
    with agent.store.lock:
        db = agent.store.db
        by_status = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        asks = db.execute("SELECT user, COUNT(*) FROM jobs GROUP BY user ORDER BY user").fetchall()
        ai_s = db.execute("SELECT COALESCE(SUM(ai_s), 0) FROM jobs").fetchone()[0]
    with agent.lock:
        running = len(agent.runs)
    lines = metric_family("patchwire_build_info", "gauge", "Version of the agent and of Python; always 1.",
                          [({"version": __version__, "python": sys.version.split()[0]}, 1)])
    lines += metric_family("patchwire_start_time_seconds", "gauge", "When the agent started (Unix time).",
                           [({}, round(agent.started_at, 3))])
    lines += metric_family("patchwire_queue_depth", "gauge", "Jobs waiting for a worker.",
                           [({}, len(agent.queue.order()))])
    lines += metric_family("patchwire_jobs_running", "gauge", "Jobs whose AI runs now.", [({}, running)])
    lines += metric_family("patchwire_workers", "gauge", "AI runs allowed at once ([jobs] workers).",
                           [({}, agent.cfg.workers)])
    lines += metric_family("patchwire_jobs_finished_total", "counter", "Jobs that ended, by final state.",
                           [({"status": s}, by_status.get(s, 0)) for s in TERMINAL])
    lines += metric_family("patchwire_ai_seconds_total", "counter", "Seconds the AI ran, over all jobs.",
                           [({}, round(ai_s, 3))])
    lines += metric_family("patchwire_asks_total", "counter", "Asks accepted, by user.",
                           [({"user": u}, n) for u, n in asks])
    return "\n".join(lines + agent.metrics.request_lines()) + "\n"


# ================================================================== HTTP server

def route_regex(template: str) -> "re.Pattern[str]":
    """`/v1/jobs/{job}` as the regex requests are matched with: each {name} one path segment."""
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")


# (method, regex, name, needs a token), from the protocol's one table (pw.ROUTE_TABLE)
ROUTES: List[Tuple[str, "re.Pattern[str]", str, bool]] = [
    (method, route_regex(template), name, auth) for method, template, name, auth in pw.ROUTE_TABLE]
ROUTE_TEMPLATES = pw.ROUTE_TEMPLATES


class DeadlineSocketIO(socket.SocketIO):
    """The raw reader under a connection's rfile. While `deadline` is set, each read may wait
    only for the time left until it: a client trickling one byte at a time cannot stretch a
    request line, its headers or a body past their total budget (a socket timeout alone
    restarts with every byte)."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, "rb")
        self.deadline: Optional[float] = None
        self.expired = False
        self.received = 0

    def readinto(self, b) -> Optional[int]:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise socket.timeout("the request took longer than its time budget")
            self._sock.settimeout(left)  # type: ignore[attr-defined]  # SocketIO's own socket
        try:
            n = super().readinto(b)
        except socket.timeout:
            self.expired = self.deadline is not None
            raise
        self.received += n or 0
        return n


class CountingWriter(io.BufferedIOBase):
    """The response side of a connection: every write sent whole, and counted for the audit."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sent = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._sock.sendall(b)
        n = memoryview(b).nbytes
        self.sent += n
        return n

    def fileno(self) -> int:
        return self._sock.fileno()


class Connection:
    """One admitted connection as the caps see it: waiting (for a request line, headers or a
    TLS handshake) or busy with a request."""

    def __init__(self, address: str, sock: socket.socket):
        self.address = address
        self.sock = sock
        self.waiting_since: Optional[float] = time.monotonic()
        self.dropped = threading.Event()  # set when it leaves the table (evicted, or closed)

    def hang_up(self) -> None:
        # socket.socket's own shutdown, also for TLS: SSLSocket.shutdown would drop the TLS
        # state under the thread that reads; this way that read just sees the end.
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


def client_key(address: str) -> str:
    """Who a connection is from, for the caps and the penalty: its IPv4 address, or its IPv6
    address's /64 (one host commonly holds a whole /64, and would otherwise be 2^64 clients
    to the per-client caps). An IPv4 address mapped into IPv6 counts as itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ConnectionTable:
    """Open connections under caps per client address and overall. At the overall cap a new
    client takes the place of the oldest connection still waiting for its request, from the
    address holding the most such connections: clients that trickle bytes (slowloris) cannot
    crowd out everyone else. Past the caps, a few connections per address may still ask for
    /v1/health within a small budget, so monitoring sees the truth."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self.lock = threading.Lock()
        self.open: Set[Connection] = set()
        self.per_address: Dict[str, int] = {}
        self.at_cap: Dict[str, int] = {}
        self.evicted = 0

    def admit(self, address: str, sock: socket.socket) -> Optional[Connection]:
        victim = None
        with self.lock:
            if self.per_address.get(address, 0) >= self.per_client:
                return None
            if len(self.open) >= self.total:
                victim = self._oldest_waiting()
                if victim is None:
                    return None
                self._drop(victim)
                self.evicted += 1
            conn = Connection(address, sock)
            self.open.add(conn)
            self.per_address[address] = self.per_address.get(address, 0) + 1
        if victim is not None:
            log.info("connection cap reached: dropped a waiting connection of %s for %s", victim.address, address)
            victim.hang_up()
        return conn

    def _oldest_waiting(self) -> Optional[Connection]:
        waiting: Dict[str, List[Connection]] = {}
        for conn in self.open:
            if conn.waiting_since is not None:
                waiting.setdefault(conn.address, []).append(conn)
        if not waiting:
            return None
        most = max(len(conns) for conns in waiting.values())
        candidates = [c for conns in waiting.values() if len(conns) == most for c in conns]
        return min(candidates, key=lambda c: c.waiting_since or 0.0)

    def _drop(self, conn: Connection) -> None:
        conn.dropped.set()
        self.open.discard(conn)
        self.per_address[conn.address] -= 1
        if not self.per_address[conn.address]:
            del self.per_address[conn.address]

    def release(self, conn: Connection) -> None:
        with self.lock:
            if conn in self.open:
                self._drop(conn)

    def waiting(self, conn: Optional[Connection]) -> None:
        if conn is not None:
            with self.lock:
                conn.waiting_since = time.monotonic()

    def busy(self, conn: Optional[Connection]) -> bool:
        """The request is in: the connection is no longer evictable. False when it was
        evicted while its request arrived."""
        if conn is None:
            return True
        with self.lock:
            conn.waiting_since = None
            return conn in self.open

    def admit_at_cap(self, address: str) -> bool:
        with self.lock:
            mine = self.at_cap.get(address, 0)
            if sum(self.at_cap.values()) >= AT_CAP_SLOTS or mine >= AT_CAP_SLOTS_PER_CLIENT:
                return False
            self.at_cap[address] = mine + 1
            return True

    def release_at_cap(self, address: str) -> None:
        with self.lock:
            self.at_cap[address] -= 1
            if not self.at_cap[address]:
                del self.at_cap[address]

    def stats(self) -> dict:
        with self.lock:
            return {"open": len(self.open), "max": self.total, "max_per_client": self.per_client,
                    "waiting": sum(1 for c in self.open if c.waiting_since is not None),
                    "evicted": self.evicted}


class AuthFailures:
    """Wrong tokens per client address. After AUTH_FREE_FAILURES, each further one is answered
    only after a delay that doubles up to AUTH_PENALTY_MAX_S. The delay is waited in that
    connection's own thread (nobody else waits, no lock is held), the connection evictable
    meanwhile (Handler.sit_out), and the per-address connection cap bounds how many guesses
    one address has in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.failures: Dict[str, Tuple[int, float]] = {}

    def penalty(self, address: str) -> float:
        """Count one failure of `address`; the seconds to wait before answering it."""
        now = time.monotonic()
        with self.lock:
            count, last = self.failures.get(address, (0, now))
            count = 1 if now - last > AUTH_FORGET_S else count + 1
            self.failures[address] = (count, now)
            if len(self.failures) > 10000:  # bounded memory whatever the number of addresses
                self.failures = {a: v for a, v in self.failures.items() if now - v[1] <= AUTH_FORGET_S}
        extra = count - AUTH_FREE_FAILURES
        return 0.0 if extra <= 0 else min(AUTH_PENALTY_MAX_S, AUTH_PENALTY_S * 2 ** min(extra - 1, 16))


def ascii_count(text: str) -> Optional[int]:
    """A whole number written in ASCII digits, or None. (`str.isdigit` also accepts '²' and
    other digits `int` refuses; long digit strings are refused before `int` sees them.)"""
    if not re.fullmatch(r"[0-9]{1,18}", text):
        return None
    return int(text)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_values(data: bytes, over: int) -> int:
    """About how many values a JSON text holds, without parsing it: its `[`, `{` and `,`
    outside strings (a prompt of pasted numbers is one value). Counted in C (64 MB in 0.1 s);
    only when that count, strings included, is `over`, are the strings taken out first (a
    regular expression: a 7.5 MB manifest in 0.27 s)."""
    count = data.count(b"[") + data.count(b"{") + data.count(b",")
    if count <= over:
        return count
    bare = _JSON_STRING.sub(b'""', data)
    return bare.count(b"[") + bare.count(b"{") + bare.count(b",")


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes, auth and errors in one place; each route is a small `route_<name>`. Each
    request has a total time budget for its request line and headers (`header_timeout_s`)
    and one for its body (`body_timeout_s`); a connection past the caps (`conn` None) gets
    only /v1/health, within AT_CAP_BUDGET_S."""

    protocol_version = "HTTP/1.1"
    server_version = f"patchwire-agent/{__version__}"
    wfile: CountingWriter  # set in setup(); it counts the bytes sent
    sys_version = ""
    server: "AgentHTTPServer"

    def __init__(self, request, client_address, server, conn: Optional[Connection] = None):
        self.conn = conn
        super().__init__(request, client_address, server)

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
        self.connection = self.request
        self.connection.settimeout(CONNECTION_TIMEOUT)
        # each event of a stream is one small write: Nagle would hold the next one back until
        # the client acknowledged the last (up to its delayed-ACK time, ~40 ms) on a real network
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = DeadlineSocketIO(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = CountingWriter(self.connection)

    def handle(self) -> None:
        if self.server.tls is None or self.tls_handshake():
            super().handle()

    def tls_handshake(self) -> bool:
        """The TLS handshake in this connection's own thread (in accept() one idle client
        would stall everyone), within the budget of a request's headers."""
        sock = self.connection
        deadline = time.monotonic() + self.head_budget()
        sock.setblocking(False)
        try:
            while True:
                try:
                    sock.do_handshake()
                    return True
                except ssl.SSLWantReadError:
                    wait: Tuple[list, list] = ([sock], [])
                except ssl.SSLWantWriteError:
                    wait = ([], [sock])
                left = deadline - time.monotonic()
                if left <= 0 or not any(select.select(wait[0], wait[1], [], left)[:2]):
                    log.info("TLS handshake with %s took too long", self.client_address[0])
                    return False
        except OSError as e:  # ssl.SSLError included: not TLS, a bad client, or it left
            log.info("TLS handshake with %s failed: %s", self.client_address[0], e)
            return False
        finally:
            sock.settimeout(CONNECTION_TIMEOUT)

    def head_budget(self) -> float:
        return AT_CAP_BUDGET_S if self.conn is None else self.server.agent.cfg.header_timeout_s

    def handle_one_request(self) -> None:
        """One request, from its first byte to its audit line."""
        self.begin_record()
        self.reader.deadline = time.monotonic() + self.head_budget()
        self.server.connections.waiting(self.conn)
        try:
            super().handle_one_request()
        except OSError:  # the client left or broke TLS mid-request: nothing to answer
            self.close_connection = True
        # a request began (not just an idle keep-alive): bytes came, or a request line already
        # read with an earlier one (pipelined requests arrive together: each is audited)
        if self.raw_requestline or self.reader.received > self.received_before:
            if self.reader.expired and not self.started_response:
                self.answer_timeout()
            self.finish_request_record()
        if self.conn is None:  # past the caps: one request, then the slot goes back
            self.close_connection = True

    def answer_timeout(self) -> None:
        """A clear 408 for a client too slow with its request (an honest one on a bad line)."""
        self.close_connection = True
        self.status = int(HTTPStatus.REQUEST_TIMEOUT)
        body = json.dumps({"error": "the request did not arrive in time", "code": "timeout",
                           "hint": "send the request line, headers and body without pauses"}).encode() + b"\n"
        try:
            self.connection.settimeout(1.0)
            self.wfile.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass

    def dispatch(self, method: str) -> None:
        if not self.server.connections.busy(self.conn):  # evicted while its headers came in
            self.close_connection = True
            return
        self.reader.deadline = None
        self.connection.settimeout(CONNECTION_TIMEOUT)
        url = urllib.parse.urlsplit(self.path)
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        try:
            name, params, auth = self.route(method, url.path)
            if self.conn is None and name != "health":
                raise HTTPFailure(HTTPStatus.SERVICE_UNAVAILABLE, "the agent is at its connection cap",
                                  "try again in a moment; /v1/health still answers", code="busy")
            self.route_label = ROUTE_TEMPLATES[name]
            self.user = self.authenticate() if auth else ""
            try:
                getattr(self, "route_" + name)(self.user, **params)
            finally:
                self.give_back_large_body()
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
        raise NotFound(f"no such endpoint: {path}", "see the API list in the README")

    def authenticate(self) -> str:
        """The user of this request's bearer token. A wrong token is answered late once its
        address has failed often (see AuthFailures)."""
        header = self.headers.get("Authorization", "")
        try:
            return self.agent.authenticate(header)
        except HTTPFailure:
            if header[:7].lower() == "bearer ":
                delay = self.server.auth_failures.penalty(client_key(self.client_address[0]))
                self.auth_delay_s = delay
                if delay:
                    self.sit_out(delay)
            raise

    def sit_out(self, delay: float) -> None:
        """Wait `delay` before answering, evictable meanwhile as a connection waiting for its
        request is: guesses sent on every connection an address may open, from a few
        addresses, once held every place of the agent (503 busy to every user). Evicted, it
        stops waiting and hangs up."""
        table = self.server.connections
        if self.conn is None:  # past the caps only /v1/health is served, which takes no token
            return
        table.waiting(self.conn)
        if self.conn.dropped.wait(delay) or not table.busy(self.conn):
            self.close_connection = True

    # --- the audit record of each request

    def begin_record(self) -> None:
        self.started_response = False
        self.body_read = False
        self.raw_requestline = b""
        self.command, self.path = None, ""  # http.server keeps the last request's otherwise
        self.user, self.job_id, self.status = "", None, None
        self.bytes_in, self.auth_delay_s = 0, 0.0
        self.ask_ms: Dict[str, float] = {}  # POST /v1/ask: request start -> body read, -> job queued
        self.route_label = "unmatched"  # the route template, for metrics (never the raw path)
        self.request_started = time.monotonic()
        self.reader.expired = False
        self.sent_before = self.wfile.sent
        self.received_before = self.reader.received

    def send_response(self, code, message=None) -> None:
        self.status = int(code)
        super().send_response(code, message)

    def finish_request_record(self) -> None:
        """The one place where a finished request is known in full (route, user, status,
        bytes, duration): it writes the request's audit line. Never the token, never a body."""
        record = {"event": "request", "user": self.user or None, "address": self.client_address[0],
                  "method": self.command or None, "path": clip(self.path or "", 512), "status": self.status,
                  "job": self.job_id, "bytes": self.wfile.sent - self.sent_before, "bytes_in": self.bytes_in,
                  "duration_ms": round((time.monotonic() - self.request_started) * 1000, 1)}
        if self.auth_delay_s:
            record["auth_delay_s"] = self.auth_delay_s
        record.update(self.ask_ms)
        self.agent.audit_line(self.user or "", record, client_key(self.client_address[0]))
        if self.status:
            method = self.command if self.command in ("GET", "POST", "DELETE") else "other"  # bounded labels
            self.agent.metrics.observe(method, self.route_label, int(self.status),
                                       time.monotonic() - self.request_started)

    # --- request and response helpers

    def read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise LengthRequired("send the body with a Content-Length")
        text = self.headers.get("Content-Length", "").strip()
        if not text:
            raise LengthRequired("Content-Length is required")
        length = ascii_count(text)
        if length is None and re.fullmatch(r"[0-9]+", text):
            length = MAX_BODY + 1  # more digits than any body we take
        if length is None:
            raise BadRequest("Content-Length must be a number of bytes in ASCII digits")
        if length > MAX_BODY:
            self.close_connection = True
            raise HTTPFailure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY // 2**20} MiB", code="too_large")
        if length > LARGE_BODY_BYTES:
            self.wait_for_large_body_room()
        data = self.read_body(length)
        most = len(data) // BODY_BYTES_PER_VALUE + BODY_VALUES_FREE
        values = json_values(data, most)  # every body: in C, 6 ms for 4 MB
        if values > most:
            raise HTTPFailure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"the body holds {values} JSON values in {len(data)} bytes: more than any request "
                              f"of Patchwire's (one per {BODY_BYTES_PER_VALUE} bytes)", code="too_large")
        try:
            body = json.loads(data or b"null")
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise BadRequest("the body is not valid JSON")
        if pw.json_too_deep(body, MAX_JSON_DEPTH):
            raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        try:  # "\ud800" is valid JSON but no text: sqlite, git and files would refuse it later
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the body has a string that is not valid Unicode "
                             "(an unpaired surrogate escape)") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    holds_large_body = False

    def wait_for_large_body_room(self) -> None:
        """Take one of the LARGE_BODIES_AT_ONCE places (given back when the request ends), or 503."""
        if not self.agent.large_bodies.acquire(timeout=self.agent.cfg.body_timeout_s):
            self.close_connection = True
            raise HTTPFailure(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"{LARGE_BODIES_AT_ONCE} requests of over {LARGE_BODY_BYTES // 1024} KiB are being "
                              "handled already", "try again in a moment", code="busy")
        self.holds_large_body = True

    def give_back_large_body(self) -> None:
        if self.holds_large_body:
            self.holds_large_body = False
            self.agent.large_bodies.release()

    def read_body(self, length: int) -> bytes:
        """The body, within `body_timeout_s` in all however it trickles in."""
        budget = self.agent.cfg.body_timeout_s
        self.reader.deadline = time.monotonic() + budget
        try:
            data = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise HTTPFailure(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {budget:g} s",
                              "send the body without pauses", code="timeout") from None
        finally:
            self.reader.deadline = None
            self.connection.settimeout(CONNECTION_TIMEOUT)
        self.body_read = True
        self.bytes_in = len(data)
        if len(data) < length:
            self.close_connection = True
            raise BadRequest("the body ended before Content-Length bytes")
        return data

    def query_count(self, name: str, default: int) -> int:
        """A query parameter that must be a whole number (0 to MAX_QUERY_INT)."""
        value = self.query.get(name)
        number = default if value is None else ascii_count(value)
        if number is None or number > MAX_QUERY_INT:
            raise BadRequest(f"{name} must be a whole number from 0 to {MAX_QUERY_INT}")
        return number

    def send_bytes(self, status: int, data: bytes, content_type: str, **headers: str) -> None:
        self.send_head(status, len(data), content_type, **headers)
        self.wfile.write(data)

    def send_head(self, status: int, length: int, content_type: str, **headers: str) -> None:
        """The status line and headers of an answer of `length` bytes, which follow."""
        self.started_response = True
        if not self.user:  # no valid token: one answer, then the place goes back (never held by
            self.close_connection = True  # a client that pipelines requests and reads slowly)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

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
        if obj.get("retry_after_s"):
            extra["Retry_After"] = str(int(obj["retry_after_s"]))
        self.send_bytes(status, data, "application/json", **extra)

    def wants_stream(self) -> bool:
        return "application/x-ndjson" in self.headers.get("Accept", "")

    def start_ndjson(self) -> None:
        """The head of a streamed answer: NDJSON, chunked, never cached."""
        self.started_response = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def stream_events(self, job_id: str, after: int, follow: bool = True) -> None:
        """Numbered NDJSON events, chunked, flushed one by one; ends after the job's last
        event (or at once without `follow`)."""
        self.start_ndjson()
        store = self.agent.store
        quiet_since = time.monotonic()
        while True:
            events, status, seen = store.follow(job_id, after)
            for seq, kind, line in events:
                self.write_chunk(line)
                after = seq
                if kind in LAST_EVENTS:
                    follow = False
            if len(events) >= FOLLOW_BATCH:
                continue  # a batch of the stored ones: more may follow at once
            if not follow or (not events and status in TERMINAL):
                break
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= HEARTBEAT_S:
                self.write_chunk(b"\n")  # keeps proxies open and finds clients that left
                quiet_since = time.monotonic()
            else:  # an event added since `follow` read ends the wait at once
                store.wait_change(seen, HEARTBEAT_S - (time.monotonic() - quiet_since))
        self.write_chunk(b"")

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    # --- routes

    def route_health(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, {**self.agent.health(), "connections": self.server.connections.stats()})

    def route_me(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, self.agent.me(user, self.query.get("project")))

    def route_ask(self, user: str) -> None:
        body = self.read_json()
        self.ask_ms = {"body_ms": round((time.monotonic() - self.request_started) * 1000, 1)}
        job = self.agent.ask(user, body)
        del body
        self.give_back_large_body()  # the body is handled: not held while the job streams
        self.ask_ms["queued_ms"] = round((time.monotonic() - self.request_started) * 1000, 1)
        self.job_id = job["id"]
        if job.get("ask_id"):  # several attempts: the group answers (see "several attempts")
            self.answer_group(user, job["ask_id"])
        elif self.wants_stream():
            self.stream_events(job["id"], 0)
        else:
            self.send_json(HTTPStatus.ACCEPTED, public_job(job))

    def route_jobs(self, user: str) -> None:
        jobs = self.agent.store.find_jobs(user, prompt_chars=LIST_PROMPT_CHARS)
        self.send_json(HTTPStatus.OK, {"jobs": [public_job(j) for j in jobs]})

    def route_job(self, user: str, job: str) -> None:
        found = self.agent.find_job(user, job)
        self.job_id = found["id"]
        self.send_json(HTTPStatus.OK, public_job(found))

    def route_cancel(self, user: str, job: str) -> None:
        self.job_id = self.agent.find_job(user, job)["id"]
        self.send_json(HTTPStatus.OK, public_job(self.agent.cancel(user, self.job_id)))

    def route_events(self, user: str, job: str) -> None:
        after = self.query_count("after", 0)
        found = self.agent.find_job(user, job)
        self.job_id = found["id"]
        self.stream_events(found["id"], after, follow=self.query.get("follow", "1") != "0")

    def route_diff(self, user: str, job: str) -> None:
        found = self.agent.find_job(user, job)
        self.job_id = found["id"]
        if found["status"] != "done":
            raise Conflict(f"job {found['id']} is {found['status']}: it has no diff",
                           found.get("reason") or "", code="no_diff")
        try:
            patch = open(self.agent.store.patch_path(found["id"]), "rb")
        except FileNotFoundError:
            raise HTTPFailure(HTTPStatus.GONE, f"the patch of job {found['id']} was pruned by "
                              "`patchwire-agent gc`", "ask again", code="pruned")
        with patch:  # in chunks from the file: a patch of any size costs the agent 1 MiB of memory
            self.send_head(HTTPStatus.OK, os.fstat(patch.fileno()).st_size, "text/x-diff")
            shutil.copyfileobj(patch, self.wfile, MIB)

    # --- several attempts: the group of an ask

    def answer_group(self, user: str, ask_id: str) -> None:
        """POST /v1/ask with attempts: the group (202), or with Accept: NDJSON its events."""
        if self.wants_stream():
            self.stream_group_events(ask_id, user)
        else:
            self.send_json(HTTPStatus.ACCEPTED, ask_group(ask_jobs(self.agent.store, user, ask_id)))

    def route_ask_group(self, user: str, ask: str) -> None:
        self.send_json(HTTPStatus.OK, ask_group(ask_jobs(self.agent.store, user, ask)))

    def route_ask_events(self, user: str, ask: str) -> None:
        self.stream_group_events(ask, user, follow=self.query.get("follow", "1") != "0")

    def stream_group_events(self, ask: str, user: str, follow: bool = True) -> None:
        """The events of every attempt, each with its `job`, interleaved as they happen, from
        the first; ends once every attempt has sent its last event (or at once without
        `follow`). A client that reconnects skips what it saw by (job, seq)."""
        jobs = [job["id"] for job in ask_jobs(self.agent.store, user, ask)]
        self.start_ndjson()
        after, live, quiet_since = dict.fromkeys(jobs, 0), set(jobs), time.monotonic()
        while live:
            seen, before = self.agent.store.generation, sum(after.values())
            for job_id in jobs:
                if job_id in live and self._send_new_events(job_id, after):
                    live.discard(job_id)
            if sum(after.values()) > before:
                quiet_since = time.monotonic()
            if not follow:
                break
            if time.monotonic() - quiet_since >= HEARTBEAT_S:
                self.write_chunk(b"\n")
                quiet_since = time.monotonic()
            elif live:
                self.agent.store.wait_change(seen, HEARTBEAT_S - (time.monotonic() - quiet_since))
        self.write_chunk(b"")

    def _send_new_events(self, job_id: str, after: Dict[str, int]) -> bool:
        """Send the job's events after the last one sent; whether the job has ended."""
        events, status, _ = self.agent.store.follow(job_id, after[job_id])
        ended = not events and status in TERMINAL
        for seq, kind, line in events:
            self.write_chunk(line)
            after[job_id] = seq
            ended = ended or kind in LAST_EVENTS
        return ended

    def route_usage(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, usage_answer(self.agent, user, self.query))

    def route_metrics(self, user: str) -> None:
        require_admin(self.agent, user, "/metrics")
        self.send_bytes(HTTPStatus.OK, render_metrics(self.agent).encode(), PROMETHEUS_TYPE)

    def route_notify_list(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, {"targets": [public_target(t) for t in self.agent.store.targets(user)]})

    def route_notify_add(self, user: str) -> None:
        self.send_json(HTTPStatus.CREATED, self.agent.add_target(user, self.read_json()))

    def route_notify_remove(self, user: str, target: str) -> None:
        self.send_json(HTTPStatus.OK, {"target": self.agent.remove_target(user, target)})

    def route_notify_test(self, user: str, target: str) -> None:
        self.send_json(HTTPStatus.OK, self.agent.notifier.test(self.agent.find_target(user, target)))

    def route_openapi(self, user: str) -> None:
        self.send_json(HTTPStatus.OK, openapi_document())


def public_job(job: dict) -> dict:
    out = {k: v for k, v in job.items() if k not in ("user", "last_seq", "pgid")}
    out["events"] = job["last_seq"]
    return out


class AuditBudget:
    """How many request lines each client may write to the audit log: a user by name, a
    client without a valid token by its address (client_key). A token bucket each; a line
    past it is counted, and the count is written with that client's next line."""

    def __init__(self, burst: float = 0, rate: float = 0):
        self.lock = threading.Lock()
        self.buckets: "collections.OrderedDict[str, List[float]]" = collections.OrderedDict()  # key -> [tokens, time, unlogged]
        self.user_burst, self.user_rate = burst or AUDIT_BURST_USER, rate or AUDIT_RATE_USER

    def take(self, user: str, address: str) -> Optional[int]:
        """None: do not write this line. Else the lines not written before it (0 mostly)."""
        if user:
            key, burst, rate = "user " + user, self.user_burst, self.user_rate
        else:
            key, burst, rate = "address " + address, AUDIT_BURST_ANONYMOUS, AUDIT_RATE_ANONYMOUS
        now = time.monotonic()
        with self.lock:
            bucket = self.buckets.pop(key, None) or [float(burst), now, 0.0]
            self.buckets[key] = bucket  # the most recent last: the oldest go first past the cap
            if len(self.buckets) > AUDIT_CLIENTS_KEPT:
                self.buckets.popitem(last=False)
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if bucket[0] < 1.0:
                bucket[2] += 1
                return None
            bucket[0] -= 1.0
            unlogged, bucket[2] = int(bucket[2]), 0.0
            return unlogged


class AgentHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with the caps of ConnectionTable, the configured listen backlog,
    IPv4 or IPv6 as the address asks, and optional TLS (handshake in the connection's thread)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, agent: Agent, address: Tuple[str, int], tls: Optional[ssl.SSLContext] = None):
        cfg = agent.cfg
        self.agent = agent
        self.tls = tls
        self.connections = ConnectionTable(cfg.max_connections, cfg.max_connections_per_client)
        self.auth_failures = AuthFailures()
        self.request_queue_size = cfg.backlog
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, Handler)

    def get_request(self):
        sock, address = super().get_request()
        if self.tls is not None:  # no I/O here: the handshake happens in the connection's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address) -> None:
        client = client_key(client_address[0])
        conn = self.connections.admit(client, request)
        if conn is not None:
            self.start_thread(self.serve, request, client_address, conn)
        elif self.connections.admit_at_cap(client):
            self.start_thread(self.serve_at_cap, request, client_address)
        else:
            self.refuse(request)

    @staticmethod
    def start_thread(target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def serve(self, request, client_address, conn: Optional[Connection]) -> None:
        try:
            Handler(request, client_address, self, conn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if conn is not None:
                self.connections.release(conn)
            self.shutdown_request(request)

    def serve_at_cap(self, request, client_address) -> None:
        try:
            self.serve(request, client_address, None)
        finally:
            self.connections.release_at_cap(client_key(client_address[0]))

    def refuse(self, request) -> None:
        """Past every cap: a plain 503 (over TLS nothing can be said before a handshake)."""
        if self.tls is None:
            body = b'{"error": "the agent is at its connection cap", "code": "busy"}\n'
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that left or broke the protocol: one line
            log.info("connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("error serving a connection from %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host  # type: ignore[str-bytes-safe]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"  # type: ignore[str-bytes-safe]


def tls_context(cfg: AgentConfig) -> Optional[ssl.SSLContext]:
    """The server's TLS context from [server] tls_cert and tls_key, or None for plain HTTP."""
    if cfg.tls is None:
        return None
    cert, key = cfg.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise PatchwireError(f"{cfg.path}: cannot load server.tls_cert {cert} with server.tls_key {key}: "
                             f"{getattr(e, 'strerror', None) or e}",
                             "give the PEM certificate (chain) and its private key") from None
    return context


# ================================================================== OpenAPI document (GET /v1/openapi.json)
# Written by hand next to the routes it describes; tests check it covers every route in
# ROUTES and that the real server's answers match it.

def _obj(required: Sequence[str], **properties: Any) -> dict:
    return {"type": "object", "required": list(required), "properties": properties}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_S, _I, _N, _B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _event(kind: str, required: Sequence[str] = (), **properties: Any) -> dict:
    return _obj(["seq", "job", "time", "type", *required], seq=_I, job=_S, time=_N,
                type={"const": kind}, **properties)


_USAGE_NAMES = [name for name, _ in USAGE_FIGURES]
_USAGE_TYPES = {name: _N if "minutes" in name or "cost" in name else _I for name in _USAGE_NAMES}
OPENAPI_SCHEMAS = {
    "Error": {**_obj(["error", "code"], error=_S, hint=_S, code=_S,
                     paths={"type": "array", "items": _S, "description": "tree_mismatch: the paths that differ"},
                     limit={**_S, "description": "policy: the [policy] key that refused"},
                     value={"description": "policy: that key's value"},
                     rule={**_S, "description": "policy: where the value is set"},
                     retry_after_s={**_I, "description": "policy: also sent as Retry-After"},
                     used_bytes={**_I, "description": "quota: what the user's folder holds"}),
              "description": "Every error; `code` is stable, `error` and `hint` are for people."},
    "Health": _obj(["ok", "version", "time", "queue_depth", "running", "workers", "ai_command", "ai_found"],
                   ok=_B, version=_S, time=_N, queue_depth=_I, running=_I, workers=_I, ai_command=_S, ai_found=_B,
                   ai={**_S, "description": "present when the AI is the built-in stand-in (not Claude)"},
                   sandbox={**_S, "description": "what confines the AI: bwrap, sandbox-exec or none"},
                   sandbox_warning={**_S, "description": "present when the AI runs unconfined by default"},
                   connections={**_obj(["open", "max", "max_per_client", "waiting", "evicted"], open=_I, max=_I,
                                       max_per_client=_I, waiting=_I, evicted=_I),
                                "description": "the connection table: open, caps, waiting for a request, evicted"}),
    "Me": _obj(["user", "version", "mirror_root"], user=_S, version=_S, mirror_root=_S,
               mirror={**_S, "description": "with ?project=: the folder to rsync that project into"},
               inline_max_bytes={**_I, "description": "the most bytes an ask's `content` may carry"},
               unwritable={"type": "array", "items": _S,
                           "description": "folders of yours the box account cannot write (the admin's to fix)"}),
    "NotifyRequest": {**_obj(["url"], url={**_S, "description": "http(s) URL on a host in [notify] allow"},
                             kind={"enum": list(NOTIFY_KINDS), "description": "default: webhook (slack for "
                                   "hooks.slack.com, ntfy for ntfy.sh)"},
                             events={"type": "array", "items": {"enum": list(NOTIFY_EVENTS)},
                                     "description": "end (default): every end; failure: failed ends; start"},
                             include={"type": "array", "items": {"enum": list(NOTIFY_INCLUDES)},
                                      "description": "also send these (never sent otherwise)"})},
    "NotifyTarget": _obj(["id", "kind", "url", "events", "include", "created"], id=_S, kind={"enum": list(NOTIFY_KINDS)},
                         url={**_S, "description": "host and the path's last 4 characters"},
                         events={"type": "array", "items": _S}, include={"type": "array", "items": _S}, created=_N),
    "NotifyTargets": _obj(["targets"], targets={"type": "array", "items": _ref("NotifyTarget")}),
    "NotifyAdded": _obj(["target"], target=_ref("NotifyTarget"),
                        secret={**_S, "description": "webhook: the HMAC-SHA256 signing key, given this once"}),
    "NotifyRemoved": _obj(["target"], target=_ref("NotifyTarget")),
    "NotifyTested": _obj(["ok", "status", "error"], ok=_B, status=_nullable(_I), error=_nullable(_S)),
    "AskRequest": {**_obj(["project", "tree", "prompt"], project=_S, prompt=_S,
                          tree={**_S, "description": "git tree id of exactly the files the laptop sent"},
                          files={"type": "array", "items": {"type": "array", "items": _S, "minItems": 3,
                                                            "maxItems": 3},
                                 "description": "full form: [mode, blob, path] of every file"},
                          base={**_S, "description": "changes form: the tree the box's copy held before "
                                                     "this sync (409 tree_mismatch if it does not)"},
                          changed={"type": "array", "items": _S, "description": "changes form: paths sent since base"},
                          deleted={"type": "array", "items": _S,
                                   "description": "changes form: paths deleted since base"},
                          content={"type": "array", "items": {"type": "array", "minItems": 4, "maxItems": 4},
                                   "description": "changes form: [path, mode, mtime_ns, base64] of small files "
                                                  "sent with the ask (written into the mirror, then hashed "
                                                  "as changed ones); at most inline_max_bytes in all"},
                          timeout_s=_I, attempts={**_I, "description": "1..4 sibling jobs of this snapshot, "
                                                  "grouped by an ask id (policy: max_attempts); default 1"},
                          agents={"type": "array", "items": _S,
                                  "description": "an [ai.profiles.NAME] per attempt (their number is attempts)"},
                          **{"continue": {**_S, "description": "a finished job to follow up"}},
                          box={**_ref("Box"), "description": "the project's [box]: setup before the AI, "
                                                             "checks on its result"},
                          setup={**_B, "description": "run box.setup whatever its inputs (ask --setup)"}),
                   "description": "Either `files` (every file) or `base` with `changed` and `deleted` "
                                  "(what changed since base: O(changed))"},
    "Box": _obj([], setup={"type": "array", "items": _S, "maxItems": pw.MAX_BOX_COMMANDS},
                setup_when={"type": "array", "items": _S, "description": "globs from the project root: their "
                             "files' content (and the commands) decide when setup runs again"},
                setup_timeout_s=_I, checks={"type": "array", "items": _S, "maxItems": pw.MAX_BOX_COMMANDS},
                check_timeout_s={**_I, "description": "each check's own timeout"},
                force_setup={**_B, "description": "in a job: setup runs whatever its inputs"},
                setup_source={**_S, "description": "in a job: whose setup: project, or [projects.NAME]"},
                checks_source={**_S, "description": "in a job: whose checks"}),
    "StepRun": _obj(["command", "exit_code", "duration_ms", "tail"], command=_S, exit_code=_nullable(_I),
                    duration_ms=_N, tail={**_S, "description": "the end of its output (stdout and stderr)"},
                    timed_out=_B, name={**_S, "description": "checks: a short name from the command"},
                    ok={**_B, "description": "checks: exit 0 in time"}),
    "Setup": _obj(["ran"], ran=_B, why=_S, hash={**_S, "description": "of the commands and their inputs"},
                  duration_ms=_N, runs={"type": "array", "items": _ref("StepRun")}),
    "Checks": _obj(["patch_sha256", "tree", "runs"],
                   patch_sha256={**_S, "description": "sha256 of the job's patch: the one the checks vouch for"},
                   tree={**_S, "description": "the result's tree id: every check ran on exactly it"},
                   commit=_S, source={**_S, "description": "whose [box] ran: project"},
                   runs={"type": "array", "items": _ref("StepRun")}),
    "JobResult": _obj([], setup=_ref("Setup"), checks=_ref("Checks"),
                      exit_code=_nullable(_I), is_error=_B, subtype=_nullable(_S), duration_s=_N,
                      num_turns=_nullable(_I), session_id=_nullable(_S), tokens_in=_nullable(_I),
                      tokens_out=_nullable(_I), cache_read_tokens=_nullable(_I), cache_write_tokens=_nullable(_I),
                      cost_usd=_nullable(_N), result_commit=_S,
                      ai={**_S, "description": "set when the built-in stand-in ran: \"stand-in AI, not Claude\""}),
    "Stats": _obj(["files", "added", "removed", "binary"], files=_I, added=_I, removed=_I, binary=_I),
    "Job": _obj(["id", "project", "prompt", "status", "created", "events"], id=_S, project=_S, prompt=_S,
                status={"enum": ["queued", "running", "done", "failed", "cancelled"]}, reason=_nullable(_S),
                created=_N, started=_nullable(_N), finished=_nullable(_N), snapshot=_nullable(_S),
                tree=_nullable(_S), timeout_s=_nullable(_I), result=_nullable(_ref("JobResult")),
                stats=_nullable(_ref("Stats")), parent=_nullable(_S), slot=_nullable(_I),
                box={**_nullable(_ref("Box")), "description": "the job's setup and checks"},
                                events={**_I, "description": "number of the job's last event"},
                ask_id={**_nullable(_S), "description": "the ask of several attempts this job is one of"},
                profile={**_nullable(_S), "description": "the [ai.profiles.NAME] that ran it (agents)"},
                attempt={**_nullable(_I), "description": "which attempt of its ask (1..N)"}),
    "AskGroup": _obj(["id", "project", "prompt", "created", "status", "attempts", "jobs"], id=_S, project=_S,
                     prompt=_S, created=_N, status={"enum": ["running", "ended"]}, attempts=_I,
                     jobs={"type": "array", "items": _ref("Job"), "description": "the attempts, in order"}),
    "AskAnswer": {"anyOf": [_ref("Job"), _ref("AskGroup")], "description": "one job, or the group of several attempts"},
    "JobList": _obj(["jobs"], jobs={"type": "array", "items": _ref("Job")}),
    "Event": {"description": "One NDJSON line of a job's stream; `seq` numbers them from 1.", "oneOf": [
        _event("queued", ["position"], project=_S, position=_I,
               estimate_s={**_nullable(_I), "description": "seconds until it starts, from recent runs"}),
        _event("position", ["position"], position=_I, estimate_s=_nullable(_I)),
        _event("links_removed", ["paths", "count"], paths={"type": "array", "items": _S}, count=_I),
        _event("repositories_left_out", ["paths", "count"], paths={"type": "array", "items": _S}, count=_I),
        _event("started", ["slot"], slot=_I, continues=_S, sandbox=_S,
               ai={**_S, "description": "set when the AI is the built-in stand-in: \"stand-in AI, not Claude\""},
               limits={"type": "object", "description": "what holds for this run (null: no limit): "
                       "tmp_mb, max_processes, max_memory_mb", "additionalProperties": _nullable(_I)},
               unlimited={**_S, "description": "why a limit does not hold on this box"}),
        _event("session", [], session_id=_nullable(_S), model=_nullable(_S)),
        _event("text", ["text"], text=_S),
        _event("tool", ["name"], name=_nullable(_S), detail=_S),
        _event("tool_error", ["text"], text=_S),
        _event("output", ["text"], text=_S),
        _event(pw.OUTPUT_DROPPED, ["events", "bytes", "limit"],
               events={**_I, "description": "events of the AI's output left out between its head and tail"},
               bytes={**_I, "description": "their size as JSON"},
               limit={**_S, "description": "the rule that dropped them: [jobs] max_output_mb = N"}),
        _event("network", ["host"], host={**_S, "description": "the first connection of the job to this host"}),
        _event("network_refused", ["host", "count"], host=_S,
               count={**_I, "description": "refusals of this host so far (events stop at 20 per host)"}),
        _event("setup", [], step={"enum": ["start", "end", "skipped", "warning"]}, command=_S, text=_S,
               exit_code=_nullable(_I), duration_ms=_N, ok=_B, reason=_S),
        _event("check", ["name"], name=_S, step={"enum": ["start", "end"]}, command=_S, text=_S,
               exit_code=_nullable(_I), duration_ms=_N, ok=_B),
        _event("result", [], subtype=_S, is_error=_B, duration_ms=_N, num_turns=_I, session_id=_S,
               total_cost_usd=_N, usage={"type": "object"}),
        _event("finished", ["status", "stats"], status={"const": "done"}, stats=_ref("Stats"),
               timings={"type": "object", "additionalProperties": _N,
                        "description": "milliseconds per step of the run: setup_ms, prepare_ms, links_ms, "
                                       "project_setup_ms ([box] setup), ai_ms, collect_ms, patch_ms, "
                                       "checks_ms"},
               checks=_ref("Checks"), setup=_ref("Setup")),
        _event("failed", ["status", "reason"], status={"const": "failed"}, reason=_S,
               setup={**_ref("Setup"), "description": "when setup ran: the job failed there, before the AI"}),
        _event("cancelled", ["status", "reason"], status={"const": "cancelled"}, reason=_S),
    ]},
    "UsageFigures": _obj(_USAGE_NAMES, **_USAGE_TYPES),
    "UsageRow": _obj(["key", *_USAGE_NAMES], key={**_S, "description": "user, user/project or YYYY-MM-DD (UTC)"},
                     user=_S, user_removed={**_B, "description": "no longer in the config; history kept"},
                     **_USAGE_TYPES),
    "Usage": _obj(["since", "until", "group", "rows", "total", "removed_users"], since=_N, until=_N,
                  group={"enum": list(USAGE_GROUPS)}, user=_nullable(_S),
                  rows={"type": "array", "items": _ref("UsageRow")}, total=_ref("UsageFigures"),
                  removed_users={"type": "array", "items": _S}),
}

# route name: (summary, query parameters, request body schema, {status: (description, media type, schema)})
OPENAPI_ROUTES: Dict[str, tuple] = {
    "health": ("Version, queue depth and whether the AI command is found; no token needed", {}, None,
               {200: ("ok", "application/json", "Health")}),
    "me": ("Your user name and the folder to rsync a project into", {"project": _S}, None,
           {200: ("you", "application/json", "Me"), 400: "bad project name"}),
    "ask": ("Snapshot the synced files, queue the AI run", {}, "AskRequest",
            {200: ("with Accept: application/x-ndjson, the job's events as they happen",
                   "application/x-ndjson", "Event"),
             202: ("queued: the Job, or with attempts the AskGroup", "application/json", "AskAnswer"),
             400: "bad request",
             404: "no such job to continue", 409: "tree_mismatch, not_done or ambiguous",
             403: "policy: a project outside the allowlist, timeout_s over the ceiling, or attempts over "
                  "max_attempts",
             408: "the request did not arrive within its time budget",
             411: "no Content-Length, or a chunked body",
             413: "body over 64 MiB, or policy: a prompt over max_prompt_bytes",
             429: "policy: max_queued or rate_limit (with Retry-After)",
             503: "past the connection caps",
             507: "disk_full: the box's state folder is full; quota: the user's folder is over "
                  "[policy] disk_quota_mb"}),
    "jobs": ("Your jobs, newest first", {}, None, {200: ("your jobs", "application/json", "JobList")}),
    "job": ("One of your jobs; a unique id prefix is enough", {}, None,
            {200: ("the job", "application/json", "Job"), 404: "no such job of yours",
             409: "ambiguous prefix"}),
    "cancel": ("Cancel a queued or running job", {}, None,
               {200: ("the job, cancelled", "application/json", "Job"), 404: "no such job of yours",
                409: "already finished, or ambiguous prefix"}),
    "events": ("The job's events after `after`, following a live job unless follow=0",
               {"after": _I, "follow": {"enum": ["0", "1"]}}, None,
               {200: ("NDJSON, one event per line", "application/x-ndjson", "Event"),
                400: "after is not a whole number", 404: "no such job of yours", 409: "ambiguous prefix"}),
    "diff": ("The patch of a done job (git diff --binary --full-index)", {}, None,
             {200: ("the patch, as bytes", "text/x-diff", None), 404: "no such job of yours",
              409: "the job is not done (no_diff), or ambiguous prefix", 410: "pruned by gc"}),
    "ask_group": ("An ask of several attempts: its jobs with status, stats, timings and usage", {}, None,
                  {200: ("the group", "application/json", "AskGroup"), 404: "no such ask of yours",
                   409: "ambiguous prefix"}),
    "ask_events": ("The events of every attempt of an ask (each with its job), following them unless "
                   "follow=0", {"follow": {"enum": ["0", "1"]}}, None,
                   {200: ("NDJSON, one event per line", "application/x-ndjson", "Event"),
                    404: "no such ask of yours", 409: "ambiguous prefix"}),
    "usage": ("Asks, AI time, tokens, cost and changes over a time range; yours, or with an admin "
              "token everyone's", {"since": _S, "until": _S, "group": {"enum": list(USAGE_GROUPS)}, "user": _S},
              None, {200: ("the report", "application/json", "Usage"), 400: "bad group or time",
                     403: "another user's usage without an admin token"}),
    "notify_list": ("Your notification targets (never their secrets)", {}, None,
                    {200: ("your targets", "application/json", "NotifyTargets")}),
    "notify_add": ("Add a notification target: a signed JSON webhook, an ntfy topic or a Slack webhook", {},
                   "NotifyRequest", {201: ("added; a webhook's secret is in this answer only",
                                           "application/json", "NotifyAdded"),
                                     400: "bad url, kind, events or include",
                                     403: "policy: a host outside [notify] allow, or [notify] max_targets"}),
    "notify_remove": ("Remove a notification target", {}, None,
                      {200: ("removed", "application/json", "NotifyRemoved"), 404: "no such target of yours"}),
    "notify_test": ("Send a test notification to a target now (one attempt)", {}, None,
                    {200: ("what the receiver answered", "application/json", "NotifyTested"),
                     404: "no such target of yours"}),
    "openapi": ("This document", {}, None, {200: ("OpenAPI 3.1", "application/json", None)}),
    "metrics": ("Prometheus text format; admin token", {}, None,
                {200: ("metrics", PROMETHEUS_TYPE.split(";")[0], None), 403: "not an admin"}),
}


def openapi_document() -> dict:
    paths: Dict[str, dict] = {}
    for method, pattern, name, auth in ROUTES:
        # a route without its entry is still listed (tests insist every route has one)
        summary, query, body, answers = OPENAPI_ROUTES.get(name, ("(not described yet)", {}, None, {}))
        template = ROUTE_TEMPLATES[name]
        op: dict = {"operationId": name, "summary": summary, "responses": {}}
        params = [{"name": p, "in": "path", "required": True, "schema": _S,
                   "description": "a notification target's id" if p == "target" else f"a {p} id or a unique "
                                  "prefix of it"} for p in pattern.groupindex]
        params += [{"name": k, "in": "query", "required": False, "schema": v} for k, v in query.items()]
        if params:
            op["parameters"] = params
        if body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        if auth:
            op["security"] = [{"bearer": []}]
            answers = {**answers, 401: "missing or invalid token"}
        else:
            op["security"] = []
        for status, answer in sorted(answers.items()):
            op["responses"][str(status)] = _openapi_response(answer)
        op["responses"]["default"] = _openapi_response("any other error (500: internal)")
        paths.setdefault(template, {})[method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "patchwire-agent", "version": __version__,
                     "description": "Runs Claude Code on a synced project and returns a git diff. Errors are "
                                    "JSON (Error) with a fitting status; an unknown path is 404 (not_found), "
                                    "a method a path does not have is 405 (method_not_allowed)."},
            "paths": paths,
            "components": {"schemas": OPENAPI_SCHEMAS,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]}


def _openapi_response(answer: Any) -> dict:
    if isinstance(answer, str):
        return {"description": answer, "content": {"application/json": {"schema": _ref("Error")}}}
    description, media, schema = answer
    if schema:
        body = _ref(schema)
    else:
        body = _S if media.startswith("text/") else {"type": "object"}
    return {"description": description, "content": {media: {"schema": body}}}


# ================================================================== operations: shutdown, service, status, gc

RUN_FILE = "agent.json"  # in the state folder while `serve` runs: pid, start time, URL
SYSTEMD_UNIT = "patchwire-agent.service"
LAUNCHD_LABEL = "dev.patchwire.agent"


def drain_jobs(agent: "Agent", grace_s: float, hurry: threading.Event) -> None:
    """Graceful stop: no queued job starts any more (they stay queued in the store and run
    after the restart); running jobs may finish for up to `grace_s`, then are cancelled
    with the reason. `hurry` (a second signal) cuts the wait short."""
    agent.queue.close()
    with agent.lock:
        running = len(agent.runs)
    if running and grace_s:
        pw.say(f"stopping: waiting up to {grace_s:g} s for {running} running job(s) to finish "
               "(signal again to cancel them now)")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not hurry.is_set() and any(t.is_alive() for t in agent.workers):
        for t in agent.workers:
            t.join(timeout=0.1)
    reason = (f"the agent was shut down and the job did not finish within {grace_s:g} s "
              "([server] shutdown_grace_s); ask again")
    with agent.lock:
        runs = list(agent.runs.values())
    for run in runs:
        run.stop(reason)


def write_run_file(cfg: AgentConfig, url: str, started: float) -> Path:
    path = cfg.state_dir / RUN_FILE
    write_private(path, json.dumps({"pid": os.getpid(), "started": started, "url": url,
                                    "version": __version__}) + "\n")
    return path


def read_run_file(state_dir: Path) -> Optional[dict]:
    """The running server's pid file, or None when no server runs on this state folder."""
    try:
        info = json.loads((state_dir / RUN_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def open_store(cfg: AgentConfig) -> Store:
    """The state db for a command on the box, next to a running server: sqlite's busy
    timeout makes a read wait for the server's short write transactions."""
    store = existing_store(cfg)
    if store is None:
        raise PatchwireError(f"no jobs in {cfg.state_dir} yet", "has `patchwire-agent serve -c "
                             f"{cfg.path}` run? The state folder is [server] state_dir")
    return store


def existing_store(cfg: AgentConfig) -> Optional[Store]:
    """open_store, or None on a box that never served (no state db yet)."""
    return Store(cfg.state_dir) if (cfg.state_dir / "jobs.sqlite3").is_file() else None


def agent_argv(config: Path) -> List[str]:
    """This very program, the way it was started (script, zipapp or installed command)."""
    return [sys.executable, os.path.abspath(sys.argv[0]), "serve", "-c", str(config.resolve())]


def systemd_quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` are systemd's specifiers and variables."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    return json.dumps(arg) if re.search(r'[\s"\'\\;]', arg) or not arg else arg


def systemd_unit(cfg: AgentConfig, system: bool = False) -> str:
    """A user unit, or with `system` one for the system manager that runs as this user."""
    argv = agent_argv(cfg.path)
    return "\n".join([
        "[Unit]",
        "Description=patchwire-agent: runs Claude Code for Patchwire laptops",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        *([f"User={systemd_quote(current_user())}"] if system else []),
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        "WorkingDirectory=" + systemd_quote(str(cfg.path.resolve().parent)),
        # the AI command is looked up on PATH, which a user manager's default would not have
        "Environment=" + systemd_quote("PATH=" + os.environ.get("PATH", os.defpath)),
        "Restart=on-failure",
        "RestartSec=5",
        # SIGTERM to the agent only: the AI runs in the same cgroup and must be allowed to
        # finish its job during the grace time; KILL reaches whatever is left at the end
        "KillMode=mixed",
        f"TimeoutStopSec={cfg.shutdown_grace_s + int(KILL_GRACE_S) + 10}",
        "",
        "[Install]",
        "WantedBy=" + ("multi-user.target" if system else "default.target"),
        ""])


def current_user() -> str:
    import getpass
    return getpass.getuser()


def launchd_plist(cfg: AgentConfig, system: bool = False) -> bytes:
    """A LaunchAgent, or with `system` a LaunchDaemon that runs as this user."""
    import plistlib
    log_file = Path.home() / "Library" / "Logs" / "patchwire-agent.log"
    return plistlib.dumps({
        **({"UserName": current_user()} if system else {}),
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": agent_argv(cfg.path),
        "WorkingDirectory": str(cfg.path.resolve().parent),
        "EnvironmentVariables": {"PATH": os.environ.get("PATH", os.defpath)},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "ExitTimeOut": cfg.shutdown_grace_s + int(KILL_GRACE_S) + 10,
        "StandardOutPath": str(log_file),
        "StandardErrorPath": str(log_file),
    })


def service_target(kind: str, system: bool = False) -> Tuple[Path, str]:
    """Where a unit or plist goes, and the one command that starts it."""
    if system and kind == "systemd":
        return (Path("/etc/systemd/system") / SYSTEMD_UNIT,
                f"sudo systemctl daemon-reload && sudo systemctl enable --now {SYSTEMD_UNIT}")
    if system:
        path = Path("/Library/LaunchDaemons") / f"{LAUNCHD_LABEL}.plist"
        return path, f"sudo launchctl bootstrap system {path}"
    if kind == "systemd":
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return (base / "systemd" / "user" / SYSTEMD_UNIT,
                f"systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT}")
    path = Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    return path, f"launchctl bootstrap gui/$(id -u) {path}"


def entries_beneath(top: Path) -> Iterator["os.DirEntry[str]"]:
    """Every entry beneath `top`, no link followed. By scandir, whose entries carry their type
    and a file's lstat: 38 ms for 20,000 files (os.walk and an lstat each: 49 ms). A folder is
    entered after it was yielded, so its mode can be opened up first (open_up); what is
    removed while the walk goes, or cannot be read, is passed over."""
    folders = [str(top)]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:
            continue  # removed while we walked, or not a folder
        with entries:
            for entry in entries:
                yield entry
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)


def tree_size(path: Path) -> int:
    """Bytes in the files and folders under `path` (links not followed; a folder's own size:
    200,000 empty folders are 800 MB of the disk), which a running job's disk quota check
    pays every QUOTA_SAMPLE_S."""
    total = 0
    for entry in entries_beneath(path):
        with contextlib.suppress(OSError):  # removed while we walked
            total += entry.stat(follow_symlinks=False).st_size
    return total


def status_report(cfg: AgentConfig, store: Store) -> dict:
    run = read_run_file(cfg.state_dir)
    with store.lock:
        active = store.db.execute("SELECT user, status, COUNT(*) FROM jobs WHERE status IN ('queued', 'running') "
                                  "GROUP BY user, status").fetchall()
        job_users = [r[0] for r in store.db.execute("SELECT DISTINCT user FROM jobs")]
        jobs = store.db.execute("SELECT id, user, project, status, COALESCE(started, created) FROM jobs "
                                "WHERE status IN ('queued', 'running') ORDER BY created").fetchall()
    users: Dict[str, dict] = {}
    for name in sorted(set(cfg.users) | set(job_users)):  # what the disk quota counts (Agent.user_bytes)
        users[name] = {"running": 0, "queued": 0, "removed": name not in cfg.users,
                       "disk_bytes": tree_size(user_root(cfg.state_dir, name)) + store.stored_bytes(name)}
    for user, status, n in active:
        users[user][status] = n
    return {"running": bool(run), "pid": run and run["pid"], "url": run and run["url"],
            "uptime_s": round(time.time() - run["started"], 1) if run else None,
            "workers": cfg.workers, "slots": cfg.slots, "state_dir": str(cfg.state_dir),
            "state_bytes": tree_size(cfg.state_dir), "users": users,
            "jobs": [dict(zip(("id", "user", "project", "status", "since"), row)) for row in jobs]}


@contextlib.contextmanager
def job_folders_lock(home: Path, exclusive: bool = False):
    """A worker holds this shared while a job uses the project's job folders; gc takes it
    exclusively, without waiting (BlockingIOError), to remove them. flock works across
    processes and is released when its holder dies."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(home / "folders.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def gc_state(cfg: AgentConfig, store: Store, before: float, dry_run: bool) -> dict:
    """Prune what jobs finished before `before` left behind: patches and events (the job
    rows stay, so usage stays exact), their results in the projects' stores (drop_job_refs),
    and job folders of projects with no job since then.
    Never touches a queued or running job's; safe while the server runs. Works on a full
    disk: the reserve is given up first and the patches go before the events (sqlite needs
    room to delete), then the database gives the freed pages back (`db_bytes`)."""
    db_before = db_size(cfg.state_dir)
    if not dry_run:
        store.release_reserve()
    with store.lock:
        old = store.db.execute(f"SELECT id, user, project FROM jobs WHERE {ENDED_BEFORE}", (before,)).fetchall()
        events = store.db.execute(f"SELECT COUNT(*) FROM events WHERE job IN (SELECT id FROM jobs WHERE "
                                  f"{ENDED_BEFORE})", (before,)).fetchone()[0]
    patches = [store.patch_path(job_id) for job_id, _, _ in old if store.patch_path(job_id).exists()]
    out = {"before": before, "dry_run": dry_run, "jobs": len(old), "events": events,
           "patches": len(patches), "patch_bytes": sum(p.stat().st_size for p in patches),
           "results": 0, "results_kept": [],
           "job_folders": [], "folder_bytes": 0, "folders_busy": [], "db_bytes": 0}
    if not dry_run:
        for path in patches:
            path.unlink()
        delete_in_steps(store, "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE job IN "
                        f"(SELECT id FROM jobs WHERE {ENDED_BEFORE}) LIMIT {GC_STEP_ROWS})", (before,))
        with store.lock:
            unused_pages = store.db.execute("PRAGMA freelist_count").fetchone()[0]
        if events or unused_pages:  # else there is nothing to give back
            out["compact_error"] = compact_db(store)
            out["db_bytes"] = max(0, db_before - db_size(cfg.state_dir))
    drop_job_refs(cfg, old, out, dry_run)
    for user, project in unused_projects(cfg, store, before):
        try:
            with job_folders_lock(ProjectRepo(cfg.state_dir, user, project).home, exclusive=True):
                # asked for since the first look? Its worker waits for this lock: keep the folders
                if (user, project) in unused_projects(cfg, store, before):
                    prune_job_folders(ProjectRepo(cfg.state_dir, user, project), out, dry_run)
        except BlockingIOError:
            out["folders_busy"].append(f"{user}/{project}")
    if not dry_run:
        store.keep_reserve()
    return out


ENDED_BEFORE = "status IN ('done', 'failed', 'cancelled') AND finished < ?"
GC_STEP_ROWS = 2000  # events deleted per transaction: each fits in the write-ahead log the file has
GC_STEP_PAGES = 256  # pages given back per transaction


def delete_in_steps(store: Store, sql: str, params: tuple) -> None:
    """Run a DELETE ... LIMIT until it deletes nothing, each step its own transaction followed
    by a checkpoint: a step's pages go to the log's start again, so on a full disk the log
    never needs to grow (one DELETE of everything would need a log as large as its pages)."""
    while True:
        with store.lock:
            deleted = store.db.execute(sql, params).rowcount
            store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        if not deleted:
            return


def db_size(state_dir: Path) -> int:
    """Bytes of the state database and its write-ahead log."""
    return sum(p.stat().st_size for p in (state_dir / "jobs.sqlite3", state_dir / "jobs.sqlite3-wal")
               if p.exists())


def compact_db(store: Store) -> Optional[str]:
    """Give the pages that deletes freed back to the file system; why not, or None. In place
    with auto_vacuum INCREMENTAL (databases made since the job ceilings); else one VACUUM, which also
    switches the database to it (it copies the whole file once, so it needs that much room:
    without it the pages stay free inside the file, for new events). The WAL is truncated
    after, or the file would shrink and its log keep the room."""
    try:
        with store.lock:
            incremental = store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
            if not incremental:
                store.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                store.db.execute("VACUUM")
        free = -1
        while incremental:
            with store.lock:  # in steps, as delete_in_steps: the log stays small
                store.db.execute(f"PRAGMA incremental_vacuum({GC_STEP_PAGES})").fetchall()  # a page per row
                store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                left = store.db.execute("PRAGMA freelist_count").fetchone()[0]
            incremental, free = 0 < left != free, left  # until none are left, or none go any more
        with store.lock:
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.OperationalError as e:
        return str(e)
    return None


def drop_job_refs(cfg: AgentConfig, jobs: List[Tuple[str, str, str]], out: dict, dry_run: bool) -> None:
    """Delete the refs that hold the results of `jobs` [(id, user, project)] in their projects'
    stores (a follow-up of such a job is refused: 410). git's upkeep (ProjectRepo.maintain)
    then drops the objects only they held (older than its two weeks' grace: the jobs' own
    age); without this every result of every job stayed in the store."""
    by_project: Dict[Tuple[str, str], Set[str]] = {}
    for job_id, user, project in jobs:
        by_project.setdefault((user, project), set()).add(job_id)
    for (user, project), ids in sorted(by_project.items()):
        repo = ProjectRepo(cfg.state_dir, user, project)
        if not (repo.git_dir / "HEAD").is_file():
            continue  # the project was removed
        git = repo.git()
        listed = git.run("for-each-ref", "--format=%(refname)", JOB_REFS, check=False).stdout.decode().split()
        names = [name for name in listed if name[len(JOB_REFS):] in ids]
        if names and not dry_run:
            done = git.run("update-ref", "--stdin", input="".join(f"delete {n}\n" for n in names).encode(), check=False)
            if done.returncode:  # a ref locked by a job or an upkeep right now: the next gc drops them
                out["results_kept"].append(f"{user}/{project}")
                continue
        out["results"] += len(names)


def prune_job_folders(repo: ProjectRepo, out: dict, dry_run: bool) -> None:
    for folder in sorted(p for p in (repo.home / "slots").iterdir() if p.is_dir()):
        out["job_folders"].append(str(folder))
        out["folder_bytes"] += tree_size(folder)
        if not dry_run:
            remove_tree(folder)
    if not dry_run:
        repo.git()("worktree", "prune")  # the warm folder is rebuilt when next needed


def unused_projects(cfg: AgentConfig, store: Store, before: float) -> List[Tuple[str, str]]:
    """Projects with job folders whose jobs all ended before `before` (none queued or running)."""
    with store.lock:
        last = dict(((u, p), t) for u, p, t in store.db.execute(
            "SELECT user, project, MAX(CASE WHEN status IN ('queued', 'running') THEN 1e18 "
            "ELSE COALESCE(finished, created) END) FROM jobs GROUP BY user, project"))
    out = []
    for slots in sorted((cfg.state_dir / "users").glob("*/projects/*/slots")):
        key = (slots.parent.parent.parent.name, slots.parent.name)
        if last.get(key, 0) < before and any(slots.iterdir()):
            out.append(key)
    return out


def human_duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{hours}h {rest // 60}m"


# ================================================================== commands


def cmd_init(args) -> int:
    """The box's setup in one command: the config, the state folder (owned by the account that
    runs the agent, mode 700), what the box lacks and how to install it, optionally the
    service unit, and the next step for each developer."""
    path = Path(args.config)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists already", "use --force to replace it")
    if not pw.NAME_RE.fullmatch(args.user):
        raise UsageError(f"user name {args.user!r} is not valid", "use letters, digits, '.', '_' and '-'")
    account = init_account(args.account, args.service)
    token = new_token()
    state_dir = args.state_dir or str(path.resolve().parent / "patchwire-state")
    sections = {
        "server": pw.dump_toml({"listen": args.listen, "state_dir": state_dir}),
        "ai": ai_section(args.ai),
        "jobs": pw.dump_toml({"workers": 2, "slots": 2, "max_output_mb": 16, "max_diff_mb": 256}),
        "users": pw.dump_toml({"users": {args.user: {"token_sha256": token_digest(token).hex()}}}),
    }
    text = CONFIG_TEMPLATE.format(**sections)
    cfg = AgentConfig(path, pw.parse_toml(text, path))  # what we write must load
    pw.say("this box:")
    pw.print_checks([check(cfg) for check in SETUP_CHECKS])
    with acting_as(place_of(cfg.state_dir, account)):
        make_owned_state_dir(cfg.state_dir, account)  # now, while the admin is here, not at the first `user key`
    with TokenFile(args.token_file, args.user, token) as out, acting_as(place_of(path, account)):
        write_owned_config(path, text, account)
    pw.say(f"wrote {path}: the agent will listen on {agent_url(cfg)}, state in {cfg.state_dir} "
           f"({account.pw_name}'s, mode 700), AI {cfg.ai_label}")
    out.hand_out(f"user {args.user} added")
    if args.service:
        install_service(cfg, "systemd" if sys.platform.startswith("linux") else "launchd")
    pw.say(next_steps(cfg, args.user, account))
    return 0


def init_account(name: Optional[str], service: bool) -> pwd.struct_passwd:
    """The account that will run the agent and own its files: this one, or (as root)
    `--account NAME`: root's own files could not be read by an agent run as that account."""
    me = pwd.getpwuid(os.geteuid())
    if not name or name == me.pw_name:
        if me.pw_uid == 0:
            pw.say("note: run as root without --account, the config and state folder are root's: "
                   "the agent must then run as root (give --account NAME for the box account)")
        return me
    if me.pw_uid != 0:
        raise UsageError(f"--account {name}: only root makes files for another account",
                         f"run init as {name}, or as root")
    if service:
        raise UsageError("--service installs a user unit of the account that runs init",
                         f"run init --service as {name} (sudo -u {name} -H patchwire-agent init ...)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"--account {name}: no such account on this box",
                         f"make it first: sudo useradd --create-home {name}")


def place_of(path: Path, account: pwd.struct_passwd) -> Optional[os.stat_result]:
    """Whom root acts as to make `path` for `account` (init --account): that account in its own
    folders (where it could have planted links already), root in root's; refused in a third
    account's, which the agent could not use either."""
    owner = nearest_owner(path)
    if owner is not None and owner.st_uid != account.pw_uid and os.geteuid() == 0:
        raise UsageError(f"{path} would be made in a folder of {account_name(owner.st_uid)}'s, "
                         f"not {account.pw_name}'s who runs the agent", "pick a place in a folder of "
                         f"{account.pw_name}'s (its home) or of root's (/srv, /etc)")
    return owner


def make_owned_state_dir(state_dir: Path, account: pwd.struct_passwd) -> None:
    """The state folder, mode 700, and every folder made on the way, owned by `account`; an
    existing one of another account is refused with the fix (the agent could not use it)."""
    if state_dir.exists() and state_dir.stat().st_uid != account.pw_uid:
        owner = account_name(state_dir.stat().st_uid)
        raise PatchwireError(f"the state folder {state_dir} belongs to {owner}, not {account.pw_name} "
                             "who runs the agent", f"as root: sudo chown -R {account.pw_name}: {state_dir}, "
                             "or pick another --state-dir")
    made = [p for p in (state_dir, *state_dir.parents) if not p.exists()]
    make_state_dir(state_dir)
    for folder in made if os.geteuid() == 0 else ():  # the deepest first: root's parents until the end
        os.lchown(folder, account.pw_uid, account.pw_gid)


def write_owned_config(path: Path, text: str, account: pwd.struct_passwd) -> None:
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text)
    if os.geteuid() == 0:  # root's folders all the way (else acting as the account: its own already)
        for item in (path, *made):
            os.lchown(item, account.pw_uid, account.pw_gid)


def agent_url(cfg: AgentConfig) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"{'https' if cfg.tls else 'http'}://{host}:{cfg.port}"


def next_steps(cfg: AgentConfig, first: str, account: pwd.struct_passwd) -> str:
    """What the team lead does next, and what each developer runs on their laptop."""
    keys = Path(account.pw_dir) / ".ssh" / "authorized_keys"
    box = cfg.host if cfg.host not in ("127.0.0.1", "::1", "0.0.0.0", "::") else "BOX"
    c = "" if str(cfg.path) == default_config() else f" -c {cfg.path}"
    return "\n".join([
        f"next, on this box as {account.pw_name}: {first}'s SSH key, and one `user add` per developer (KEY.pub: their key)",
        f"  patchwire-agent user key {first}{c} --ssh-key {first}.pub --authorized-keys {keys}",
        f"  patchwire-agent user add NAME{c} --ssh-key NAME.pub --authorized-keys {keys} --token-file NAME.token",
        f"  patchwire-agent doctor{c}; then patchwire-agent serve{c} (or as a service: patchwire-agent service --systemd)",
        "hand each token file to its developer privately, then delete it; on each laptop:",
        "  mkdir -p ~/.config/patchwire && install -m 600 /dev/null ~/.config/patchwire/token   # paste the token",
        f"  cd ~/code/PROJECT && patchwire init --agent {agent_url(cfg)} --token-file ~/.config/patchwire/token "
        f"--ssh {account.pw_name}@{box}"])


def ai_section(ai: str) -> str:
    """The [ai] table `init` writes: Claude Code, or the built-in stand-in for trying the box."""
    said = pw.dump_toml({"command": [STAND_IN] if ai == STAND_IN else CLAUDE_COMMAND, "timeout_s": 1800,
                         "max_timeout_s": 7200, "sandbox": "auto"})
    if ai != STAND_IN:
        return said
    return (f"# [\"{STAND_IN}\"]: the built-in {STAND_IN_LABEL}, for trying the box: each job adds its prompt\n"
            f"# to {STAND_IN_FILE}. For real work: command = {json.dumps(CLAUDE_COMMAND)}\n" + said)


def write_private(path: Path, text: str) -> None:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # an atomic replace of the config must not leave it empty


class OutlivesItsReader:
    """A text stream (the agent's stdout or stderr) that survives the death of its reader.
    `serve 2>&1 | tee log` then Ctrl-C: the terminal sends SIGINT to the whole pipeline, tee
    dies at once, and the next line the agent writes raises BrokenPipeError (Python ignores
    SIGPIPE), which broke off the graceful stop. The first broken write points the file
    descriptor at /dev/null instead, so every later line (and the exit's flush) goes nowhere
    quietly while running jobs finish."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def _guard(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            return call(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def outlive_the_output_reader() -> None:
    """stdout, stderr and the log's handlers write through OutlivesItsReader from here on."""
    sys.stdout, sys.stderr = OutlivesItsReader(sys.stdout), OutlivesItsReader(sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
            handler.setStream(OutlivesItsReader(handler.stream))


def limit_malloc_arenas(environ: Optional[Dict[str, str]] = None) -> bool:
    """Two malloc arenas, as MALLOC_ARENA_MAX=2 would (unless that is set): glibc gives each new
    thread (one per connection) an arena of its own, up to 8 per core, and keeps what each
    freed. The agent's RSS grew 4.2 MB over its first 1,000 asks with them, 2.3 MB with two.
    Called before any thread starts. Whether it was set (False off glibc: macOS, musl)."""
    if (os.environ if environ is None else environ).get("MALLOC_ARENA_MAX"):
        return False
    import ctypes  # only here: serve alone needs it
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2))
    except (OSError, AttributeError):
        return False


M_ARENA_MAX = -8  # glibc's malloc.h


def cmd_serve(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    limit_malloc_arenas()
    outlive_the_output_reader()
    tls = tls_context(cfg)
    agent = Agent(cfg)
    try:
        server = AgentHTTPServer(agent, (cfg.host, cfg.port), tls)
    except OSError as e:
        raise PatchwireError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}",
                             "pick another [server] listen address, or stop what uses that port")
    agent.start()
    hurry = threading.Event()  # set by a second SIGTERM/SIGINT: cancel running jobs now

    def on_signal(signum, _frame):
        if server_stopping.is_set():
            hurry.set()
        server_stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()
    server_stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=agent.reload, daemon=True).start())
    ai = agent.health()
    run_file = write_run_file(cfg, server.url, agent.started_at)
    print(f"patchwire-agent {__version__} listening on {server.url}", flush=True)
    if cfg.allow_public and cfg.tls is None:
        pw.say("warning: allow_public without tls_cert and tls_key: tokens, prompts and diffs cross "
               "the network unencrypted")
    pw.say(f"state in {cfg.state_dir}; {len(cfg.users)} user(s); AI {cfg.ai_label}"
           + ("" if ai["ai_found"] else " NOT FOUND on PATH: asks will fail until it is installed"))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # no new requests; streams already open go on while jobs finish
        drain_jobs(agent, cfg.shutdown_grace_s, hurry)
        agent.stop()
        run_file.unlink(missing_ok=True)
    return 0


# --- users and policy: each command rewrites the config atomically; a running server
# picks the change up by itself (it watches the file; SIGHUP also reloads)

CONFIG_HEADER = ("# patchwire-agent configuration (rewritten whole by `patchwire-agent user` or `policy`: "
                 "its comments were not kept).\n# Reference: README.md, \"Agent config\" and \"Team setup\".\n\n")
RRSYNC_MISSING = ("rrsync is not installed on this box, so the key line below will not work yet. "
                  "rrsync ships with rsync 3.2.4 and later: Debian/Ubuntu `apt install rsync` "
                  "(/usr/bin/rrsync); macOS `brew install rsync` (then use the rrsync from "
                  "$(brew --prefix rsync)); elsewhere copy support/rrsync from rsync's source")


def edit_config(path: Path, change: Callable[[dict], Any]) -> Any:
    """Read, change, check and atomically replace the config, one editor at a time; the
    other keys and users stay as they were."""
    if not path.is_file():
        raise UsageError(f"{path}: no such config file", f"create it with `patchwire-agent init -c {path}`")
    # acting for the state folder's account, root is root again for a config in root's folders
    as_owner = as_root_again() if nearest_owner(path) is None else contextlib.nullcontext()
    with as_owner, open(path.parent / f".{path.name}.lock", "a") as lock:
        give_to_owner(Path(lock.name), path.stat())  # the box account edits after root, too
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = path.read_text(encoding="utf-8")
        data = pw.parse_toml(before, path)
        data.setdefault("users", {})
        result = change(data)
        text = splice_toml(before, data)
        if text is None:
            text = CONFIG_HEADER + pw.dump_toml(data)
            pw.say(f"note: {path} was rewritten whole, without its comments: its layout (inline or "
                   "dotted tables, arrays of tables) is more than the line editor changes in place")
        AgentConfig(path, pw.parse_toml(text, path))  # what we write must load
        replace_keeping_owner(path, text)
    return result


# --- editing the config in place: only the lines of what changed are rewritten, so the
# admin's comments stay. The stdlib reads TOML but cannot write it back with its comments
# (tomlkit could; Patchwire takes no dependency beyond tomli/tomli-w), so the file is split
# into tables and keys by asking the TOML reader itself where each ends, and each edit
# replaces the lines of one key or one table. The result is read back and must equal what
# was asked, else the caller rewrites the file whole.

TomlPath = Tuple[str, ...]


class TomlTable:
    """One table of a TOML file: its header line (-1 for the top level), the line after its
    last key, and each key's lines [start, end) with the value they hold."""

    def __init__(self, header: int):
        self.header = header
        self.end = header + 1
        self.keys: Dict[str, Tuple[int, int, Any]] = {}


def toml_header(line: str) -> Optional[TomlPath]:
    """The table path of a `[a."b.c"]` header line; None for any other line. `[[x]]` (an
    array of tables) is a ValueError: the line editor leaves such files to the full rewrite."""
    if not line.lstrip().startswith("["):
        return None
    try:
        node: Any = pw.parse_toml(line, Path("header"))
    except PatchwireError:
        return None
    path: List[str] = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
    if node != {} or not path:
        raise ValueError("not a plain table header")
    return tuple(path)


def locate_tables(lines: List[str]) -> Dict[TomlPath, TomlTable]:
    """Each table and key of the file; a ValueError for a shape this does not edit (a dotted
    key or an inline table, a value that never closes)."""
    tables: Dict[TomlPath, TomlTable] = {(): TomlTable(-1)}
    table, i = tables[()], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        path = toml_header(lines[i])
        if path is not None:
            if path in tables:
                raise ValueError("a table defined twice")
            table = tables[path] = TomlTable(i)
            i += 1
            continue
        end = key_end(lines, i)  # a value may span lines: it ends where the chunk reads as TOML
        (key, value), = pw.parse_toml("".join(lines[i:end]), Path("key")).items()
        if key in table.keys:  # dotted keys (a.x = 1, a.y = 2): left to the full rewrite
            raise ValueError("a key given in parts")
        table.keys[key] = (i, end, value)  # a dict here: an inline table, kept as one value
        table.end, i = end, end
    return tables


def key_end(lines: List[str], start: int) -> int:
    for end in range(start + 1, len(lines) + 1):
        with contextlib.suppress(PatchwireError):
            if len(pw.parse_toml("".join(lines[start:end]), Path("key"))) == 1:
                return end
    raise ValueError("a value that does not end")


def flat_tables(data: dict, inline: Set[TomlPath], path: TomlPath = ()) -> List[Tuple[TomlPath, dict, bool]]:
    """(path, its keys that are not tables, whether it has tables inside) for every table;
    a table the file writes inline (`env = { A = "1" }`) counts as one key's value."""
    def is_table(key: str, value: Any) -> bool:
        return isinstance(value, dict) and path + (key,) not in inline
    own = {k: v for k, v in data.items() if not is_table(k, v)}
    inner = [(k, v) for k, v in data.items() if is_table(k, v)]
    out = [(path, own, bool(inner))]
    for key, value in inner:
        out += flat_tables(value, inline, path + (key,))
    return out


def table_edits(table: TomlTable, wanted: dict) -> List[Tuple[int, int, str]]:
    """(start, end, text) replacements that make `table`'s keys those of `wanted`."""
    edits = []
    for key, (start, end, value) in table.keys.items():
        if key not in wanted:
            edits.append((start, end, ""))
        elif wanted[key] != value or type(wanted[key]) is not type(value):
            if isinstance(value, dict):  # tomli-w writes no inline tables
                raise ValueError("a changed inline table")
            edits.append((start, end, pw.dump_toml({key: wanted[key]})))
    added = {k: v for k, v in wanted.items() if k not in table.keys}
    if added:
        edits.append((table.end, table.end, pw.dump_toml(added)))
    return edits


def splice_toml(text: str, data: dict) -> Optional[str]:
    """`text` changed to hold `data`, rewriting only the lines of keys and tables that
    changed; None when the file's shape is beyond this editor (then it is rewritten whole)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    try:
        tables = locate_tables(lines)
        inline = {path + (key,) for path, table in tables.items()
                  for key, (_, _, value) in table.keys.items() if isinstance(value, dict)}
        wanted = {path: (own, nested) for path, own, nested in flat_tables(data, inline)}
        edits: List[Tuple[int, int, str]] = []
        for path, table in tables.items():
            if path in wanted:
                edits += table_edits(table, wanted[path][0])
            else:  # a table gone (a removed user): its header, its keys and the blank line above
                blank_above = table.header > 0 and not lines[table.header - 1].strip()
                edits.append((table.header - blank_above, table.end, ""))
    except ValueError:
        return None
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        lines[start:end] = [new] if new else []
    for path, (own, nested) in wanted.items():
        if path not in tables and (own or not nested):  # a new table ([users.NAME])
            lines.append("\n" + pw.dump_toml(dict_at(path, own)))
    spliced = "".join(lines)
    try:
        return spliced if pw.parse_toml(spliced, Path("edit")) == data else None
    except PatchwireError:
        return None


def dict_at(path: TomlPath, table: dict) -> dict:
    for key in reversed(path):
        table = {key: table}
    return table


# --- root acting for the box account. The admin commands may be run as root, on folders the
# box account owns; that account runs the agent, so whatever escapes a job runs as it, and it
# can plant a link at any name in its folders (the config's edit lock, a cancel request,
# authorized_keys) that root would follow, write and chown: a root file handed to it. So root
# acts as that account there (setresuid, root kept only as the saved id: what the command
# starts runs as the account alone), and is root again only for the token file the admin named.

Ids = Tuple[int, int, List[int]]  # uid, gid, groups
ACTING_AS: List[Tuple[Ids, Ids]] = []  # (the account, root) while root acts as the account


def nearest_owner(path: Path) -> Optional[os.stat_result]:
    """The nearest folder (or link) at or above `path` that root does not own: its owner could
    plant a link there, so root acts as it. None: root's own all the way up."""
    path = Path(os.path.abspath(path))
    for item in (path, *path.parents):
        try:
            st = os.lstat(item)
        except OSError:
            continue  # not made yet: its folder decides
        if st.st_uid != 0 and not stat.S_ISREG(st.st_mode):
            return st
    return None


def box_owner(config: Path) -> Optional[os.stat_result]:
    """Whom an admin command run as root acts as: the owner of the config's folders, else of
    the state folder's (a config of root's naming a state folder of the box account's)."""
    owner = nearest_owner(config)
    if owner is None:
        with contextlib.suppress(PatchwireError, OSError):
            owner = nearest_owner(AgentConfig.load(config).state_dir)
    return owner


def _become(uid: int, gid: int, groups: List[int]) -> None:
    if uid == 0 and hasattr(os, "setresuid"):  # back to root: the saved id allows it
        os.setresuid(0, 0, 0)
    elif uid == 0:
        os.seteuid(0)
    os.setgroups(groups)
    if hasattr(os, "setresgid"):
        os.setresgid(gid, gid, 0)
        if uid:
            os.setresuid(uid, uid, 0)
    else:  # macOS: only the effective ids (its commands start git alone, never a shell)
        os.setegid(gid)
        if uid:
            os.seteuid(uid)


def account_groups(uid: int, gid: int) -> List[int]:
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        return [gid]


@contextlib.contextmanager
def acting_as(owner: Optional[os.stat_result]) -> Iterator[None]:
    """Root acts as `owner`'s account inside (nothing changes for another account, or for
    root's own folders); root again after."""
    if owner is None or os.geteuid() != 0 or ACTING_AS:
        yield
        return
    account: Ids = (owner.st_uid, owner.st_gid, account_groups(owner.st_uid, owner.st_gid))
    root: Ids = (0, os.getegid(), os.getgroups())
    try:
        ACTING_AS.append((account, root))
        _become(*account)
        yield
    finally:
        ACTING_AS.pop()
        _become(*root)


@contextlib.contextmanager
def as_root_again() -> Iterator[None]:
    """Root for a moment inside acting_as: the token file goes where the admin said."""
    if not ACTING_AS:
        yield
        return
    account, root = ACTING_AS[-1]
    _become(*root)
    try:
        yield
    finally:
        _become(*account)


def as_box_account(command: Callable[[Any], int]) -> Callable[[Any], int]:
    """An admin command that, run as root, acts as the account owning the box's folders."""
    @functools.wraps(command)
    def run(args) -> int:
        with contextlib.suppress(ImportError):  # imported on use: the account may not read root's install
            import csv  # noqa: F401
            import tomli_w  # noqa: F401
        with acting_as(box_owner(Path(args.config))):
            return command(args)
    return run


def give_to_owner(path: Path, owner: os.stat_result) -> None:
    """As root, hand what an admin command made to the account that owns the config or the
    state folder: the agent runs as that account and must read and write it."""
    if os.geteuid() == 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def replace_keeping_owner(path: Path, text: str) -> None:
    """Atomically replace `path` (a temporary file beside it, renamed), with its owner and
    mode: `user add` run as root must not leave the box account's config root:root 600,
    which the running agent could no longer read."""
    old = path.stat()
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write_private(tmp, text)
        give_to_owner(tmp, old)
        os.chmod(tmp, stat.S_IMODE(old.st_mode))
        os.replace(str(tmp), str(path))
    finally:
        tmp.unlink(missing_ok=True)


def make_owned_dirs(folder: Path, cfg: AgentConfig) -> None:
    """mkdir -p, mode 700; as root, each folder made belongs to the state folder's owner
    (the config's while there is no state folder yet)."""
    owner = (cfg.state_dir if cfg.state_dir.exists() else cfg.path).stat()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for part in reversed(missing):
        part.mkdir(mode=0o700, exist_ok=True)
        give_to_owner(part, owner)


def new_token() -> str:
    return "pw_" + secrets.token_urlsafe(32)


class TokenFile:
    """Where an admin command hands out a new token: printed once, or `--token-file`, written
    (as root when root runs the command, wherever the admin said) to a new file beside that
    name (O_EXCL, mode 600) before the config changes, and renamed onto the name only once
    the config holds the token's hash. A link, a device or another account's file found at
    the name (`/tmp/ben.token` made first by someone else) is replaced, never written
    through; a refused edit leaves no token, and a token file that cannot be written stops
    the command before the config changes (no user whose token nobody has)."""

    def __init__(self, name: Optional[str], user: str, token: str):
        self.path = Path(os.path.abspath(os.path.expanduser(name))) if name else None
        self.user, self.token = user, token
        self.tmp: Optional[Path] = None

    def __enter__(self) -> "TokenFile":
        if self.path is None:
            return self
        with as_root_again():
            try:
                st: Optional[os.stat_result] = os.lstat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as e:
                raise self.cannot(e) from None
            if st is not None and not stat.S_ISREG(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise UsageError(f"--token-file {self.path} is {kind}: nothing was changed",
                                 "name a new file in a folder only you can write, e.g. ~/NAME.token")
            if st is not None and os.geteuid() not in (0, st.st_uid):  # a sticky folder would refuse the rename
                raise UsageError(f"--token-file {self.path} is another account's file: nothing was changed",
                                 "name a new file in a folder only you can write, e.g. ~/NAME.token")
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=str(self.path.parent))
                with os.fdopen(fd, "w") as f:
                    f.write(self.token + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise self.cannot(e) from None
            self.tmp = Path(tmp)
        return self

    def cannot(self, e: OSError) -> UsageError:
        return UsageError(f"cannot write the token file {self.path}: {e.strerror or e}; nothing was changed",
                          "name a file in a folder that exists and that you can write")

    def __exit__(self, kind, value, tb) -> None:
        if self.tmp is None:
            return
        with as_root_again():
            if kind is not None:
                self.tmp.unlink(missing_ok=True)
                return
            try:
                os.replace(str(self.tmp), str(self.path))  # type: ignore[arg-type]
            except OSError as e:  # the config holds the token now: it must not be lost
                self.tmp.unlink(missing_ok=True)
                pw.say(f"could not put the token in {self.path} ({e.strerror or e}): it is printed below instead")
                self.path = None

    def hand_out(self, what: str) -> None:
        if self.path:
            pw.say(f"{what}; the token of user {self.user} is in {self.path}")
        else:
            pw.say(f"{what}. The token of user {self.user}, shown this once (only its sha256 is stored): "
                   "put it in a file on that user's laptop, chmod 600")
            print(self.token, flush=True)


def existing_user(data: dict, name: str, path: Path) -> dict:
    if name not in data["users"]:
        raise UsageError(f"{path} has no user {name!r}", "see them with `patchwire-agent user list`")
    return data["users"][name]


def cmd_user_add(args) -> int:
    path, name = Path(args.config), args.name
    if not pw.NAME_RE.fullmatch(name):
        raise UsageError(f"user name {name!r} is not valid", "use letters, digits, '.', '_' and '-'")
    key = read_ssh_key(args.ssh_key) if args.ssh_key else None
    token = new_token()

    def add(data: dict) -> None:
        if name in data["users"]:
            raise UsageError(f"user {name} exists already in {path}",
                             f"give them a new token with `patchwire-agent user rotate {name}`")
        data["users"][name] = {"token_sha256": token_digest(token).hex(), **({"admin": True} if args.admin else {})}
    if key and args.authorized_keys and Path(args.authorized_keys).exists():  # refused before any change
        key_held(Path(args.authorized_keys), Path(args.authorized_keys).read_text(), f"{key} patchwire:{name}")
    if not args.reuse:
        refuse_earlier_user(AgentConfig.load(path), name)
    with TokenFile(args.token_file, name, token) as out:
        edit_config(path, add)
    cfg = AgentConfig.load(path)
    make_mirror_root(cfg, name)  # rrsync's DIR
    out.hand_out(f"added user {name}" + (" (admin)" if args.admin else ""))
    if key:
        install_key_line(rrsync_key_line(cfg.state_dir, name, key), args.authorized_keys,
                         mirror_root(cfg.state_dir, name), cfg.path.stat())
    return 0


def refuse_earlier_user(cfg: AgentConfig, name: str) -> None:
    """A name removed from the config keeps its jobs (prompts, events, patches: usage counts
    them) and its folder: a new person given it would read the old one's. Refused, unless
    the same person comes back (`--reuse`)."""
    if name in cfg.users:
        return  # `add` says it exists
    jobs = 0
    store = existing_store(cfg)
    if store is not None:
        try:
            with store.lock:
                jobs = store.db.execute("SELECT COUNT(*) FROM jobs WHERE user = ?", (name,)).fetchone()[0]
        finally:
            store.close()
    folder = user_root(cfg.state_dir, name)
    if jobs or folder.exists():
        raise UsageError(f"a user {name} was on this box before: {jobs} job(s) (their prompts, events and "
                         f"changes) are kept under that name" + (f", and their files in {folder}" if folder.exists() else ""),
                         f"a new person needs a new name: they would see the old {name}'s jobs; for the same "
                         "person again add --reuse")


def cmd_user_list(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    for name in sorted(cfg.users):
        own = cfg.user_policy.get(name, {})
        print("  ".join(filter(None, [
            name, "admin" if name in cfg.admins else "", f"{len(user_projects(cfg.state_dir, name))} project(s)",
            ("own policy: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(own.items()))) if own else ""])))
    return 0


def cmd_user_remove(args) -> int:
    path = Path(args.config)
    if args.purge:
        confirm_purge(AgentConfig.load(path), args.name, args.yes)
    if args.cancel_jobs or args.purge:  # first: the server reads it when it sees the config change
        request_cancel(AgentConfig.load(path), args.name)

    def remove(data: dict) -> None:
        existing_user(data, args.name, path)
        del data["users"][args.name]
    edit_config(path, remove)
    if not args.purge:  # (purge drops them, and says how many)
        drop_targets(AgentConfig.load(path), args.name)  # nobody is told of their jobs any more
    pw.say(f"removed user {args.name}: their token is refused from now on; their "
           + ("jobs are cancelled" if args.cancel_jobs or args.purge else "queued jobs end, a running one finishes")
           + ("" if args.purge else "; their files stay in the state folder (--purge deletes them)"))
    if args.purge:
        purge_user(AgentConfig.load(path), args.name)
    if args.authorized_keys:
        dropped = drop_key_lines(Path(args.authorized_keys), AgentConfig.load(path).state_dir, args.name)
        pw.say(f"removed {dropped} key line(s) of {args.name} from {args.authorized_keys}")
    return 0


def drop_targets(cfg: AgentConfig, user: str) -> None:
    store = existing_store(cfg)
    if store is None:
        return
    try:
        store.remove_targets(user)  # with their signing secrets
    finally:
        store.close()


def confirm_purge(cfg: AgentConfig, user: str, yes: bool) -> None:
    folder = user_root(cfg.state_dir, user)
    size = pw.human_bytes(tree_size(folder) if folder.exists() else 0)
    if not yes and not confirm_on_terminal(f"delete {folder} ({size}: mirrors, job folders, AI home) "
                                           f"and {user}'s stored patches?"):
        raise UsageError("nothing removed", "answer y to delete them, or leave out --purge")


def purge_user(cfg: AgentConfig, user: str) -> None:
    """Their folder (mirrors, repositories, job folders, AI home) and their stored patches; the
    jobs' rows stay, so usage still counts them. Their cancelled run stops within seconds: its
    job folder is deleted after it, so wait a little for it first."""
    folder = user_root(cfg.state_dir, user)
    store = open_store(cfg)
    try:
        with store.lock:
            ids = [row[0] for row in store.db.execute("SELECT id FROM jobs WHERE user = ?", (user,))]
        deadline = time.monotonic() + KILL_GRACE_S + 5
        while (any(job["user"] == user for job in store.jobs_with_status("running"))
               and time.monotonic() < deadline):
            time.sleep(0.2)
        patches = [store.patch_path(i) for i in ids if store.patch_path(i).exists()]
        targets = store.remove_targets(user)  # with their signing secrets
        with store.lock:  # the rows stay for usage; what they said goes
            store.db.execute("DELETE FROM events WHERE job IN (SELECT id FROM jobs WHERE user = ?)", (user,))
            store.db.execute("UPDATE jobs SET prompt = '', reason = NULL, box = NULL WHERE user = ?", (user,))
    finally:
        store.close()
    for patch in patches:
        patch.unlink(missing_ok=True)
    if folder.exists():
        remove_tree(folder)
    pw.say(f"deleted {folder}, {len(patches)} stored patch(es) and {targets} notification target(s) of {user}")


@as_box_account
def cmd_project(args) -> int:
    """`project remove USER PROJECT`: the mirror, repository, job folders and stored patches of
    one project. Refused while a job of it is queued or running: its folders are in use."""
    cfg = AgentConfig.load(Path(args.config))
    user, project = args.user, args.project
    if not (pw.NAME_RE.fullmatch(user) and pw.NAME_RE.fullmatch(project)):
        raise UsageError(f"{user}/{project} is not a user and project name", "use letters, digits, '.', '_' and '-'")
    repo = ProjectRepo(cfg.state_dir, user, project)
    store = open_store(cfg)
    try:
        with store.lock:
            rows = store.db.execute("SELECT id, status FROM jobs WHERE user = ? AND project = ?",
                                    (user, project)).fetchall()
        busy = [job for job, status in rows if status in ("queued", "running")]
        if busy:
            raise UsageError(f"{user}/{project} has a job queued or running ({busy[0]})",
                             f"wait for it, or cancel it (`patchwire-agent user remove {user} --cancel-jobs` "
                             "cancels all of theirs; the user can run `patchwire cancel`)")
        patches = [store.patch_path(job) for job, _ in rows if store.patch_path(job).exists()]
    finally:
        store.close()
    if not (repo.mirror.exists() or repo.home.exists() or patches):
        raise UsageError(f"user {user} has no project {project!r} on this box",
                         f"see theirs with `patchwire-agent user list` and `ls {mirror_root(cfg.state_dir, user)}`")
    if not args.yes and not confirm_on_terminal(f"delete {repo.mirror}, {repo.home} and {len(patches)} "
                                                "stored patch(es)?"):
        raise UsageError("nothing removed", "answer y to delete them (or pass --yes)")
    for patch in patches:
        patch.unlink(missing_ok=True)
    for folder in (repo.mirror, repo.home, ai_home(cfg.state_dir, user, project)):  # its own AI home, if any
        if folder.exists():
            remove_tree(folder)
    pw.say(f"removed project {project} of {user}: its next sync and ask start afresh")
    return 0


def confirm_on_terminal(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("deleting needs a confirmation and there is no terminal to ask on", "add --yes")
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_user_rotate(args) -> int:
    path = Path(args.config)
    token = new_token()
    if args.cancel_jobs:
        request_cancel(AgentConfig.load(path), args.name)

    def rotate(data: dict) -> None:
        existing_user(data, args.name, path)["token_sha256"] = token_digest(token).hex()
    with TokenFile(args.token_file, args.name, token) as out:
        edit_config(path, rotate)
    out.hand_out(f"new token for user {args.name} (the old one is refused now)")
    return 0


def cmd_user_key(args) -> int:
    """The authorized_keys line for an existing user (a new laptop, a new key)."""
    cfg = AgentConfig.load(Path(args.config))
    if args.name not in cfg.users:
        raise UsageError(f"{cfg.path} has no user {args.name!r}", "see them with `patchwire-agent user list`")
    key = read_ssh_key(args.ssh_key)
    make_mirror_root(cfg, args.name)
    install_key_line(rrsync_key_line(cfg.state_dir, args.name, key), args.authorized_keys,
                     mirror_root(cfg.state_dir, args.name), cfg.path.stat())
    return 0


def make_mirror_root(cfg: AgentConfig, user: str) -> None:
    """The user's mirror folder (rrsync's DIR), owned as make_owned_dirs says; the state
    folder above it private (700)."""
    try:
        make_owned_dirs(mirror_root(cfg.state_dir, user), cfg)
    except OSError as e:
        raise PatchwireError(f"cannot make the state folder {cfg.state_dir}: {e.strerror or e}",
                             state_dir_fix(cfg.state_dir)) from None
    make_state_dir(cfg.state_dir)  # tightened to 700 when it was there already


def request_cancel(cfg: AgentConfig, user: str) -> None:
    folder = cancel_requests_dir(cfg.state_dir)
    make_owned_dirs(folder, cfg)
    (folder / user).write_text("cancel every job of this user\n")
    give_to_owner(folder / user, folder.stat())  # the agent deletes it once applied


USER_COMMANDS = {"add": cmd_user_add, "list": cmd_user_list, "remove": cmd_user_remove, "rotate": cmd_user_rotate,
                 "key": cmd_user_key}


@as_box_account
def cmd_user(args) -> int:
    return USER_COMMANDS[args.action](args)


@as_box_account
def cmd_policy(args) -> int:
    if bool(args.name) == args.default:
        raise UsageError("name one user, or --default for [policy]",
                         "e.g. `patchwire-agent policy ben --set max_queued=5`")
    if args.set:
        set_policy(Path(args.config), args.name, [policy_setting(item) for item in args.set])
        if args.default:
            return 0
    cfg = AgentConfig.load(Path(args.config))
    if args.name not in cfg.users:
        raise UsageError(f"{cfg.path} has no user {args.name!r}", "see them with `patchwire-agent user list`")
    policy = cfg.policy(args.name)
    print(f"policy of user {args.name}" + (" (admin)" if args.name in cfg.admins else ""))
    for key in POLICY_SCHEMA:
        value = policy.values[key]
        shown = "none" if value is None else json.dumps(value)
        print(f"  {key:<17} {shown:<24} from {policy.sources[key]}")
    print(f"  on the box now: {len(user_projects(cfg.state_dir, args.name))} project(s)")
    return 0


def policy_setting(item: str) -> Tuple[str, Any]:
    """KEY=VALUE, VALUE read as TOML (5, true, ["web-*"]) or else as text ("30/hour" needs
    no quotes in a shell)."""
    key, eq, text = item.partition("=")
    if not eq or key.strip() not in POLICY_SCHEMA:
        raise UsageError(f"--set {item!r}: not KEY=VALUE with a policy key",
                         "keys: " + ", ".join(POLICY_SCHEMA))
    try:
        return key.strip(), pw.parse_toml(f"v = {text}", Path("--set"))["v"]
    except PatchwireError:
        return key.strip(), text


def set_policy(path: Path, user: Optional[str], settings: List[Tuple[str, Any]]) -> None:
    """Into [users.NAME] or [policy]; a value the config would refuse changes nothing (the
    check of edit_config names the key and what it must be)."""
    def change(data: dict) -> None:
        table = existing_user(data, user, path) if user else data.setdefault("policy", {})
        table.update(settings)
    edit_config(path, change)
    pw.say(f"set {', '.join(f'{k} = {json.dumps(v)}' for k, v in settings)} in "
           + (f"[users.{user}]" if user else "[policy]") + "; a running server applies it at once")


# --- SSH keys restricted to one user's mirror folder (rrsync)


def read_ssh_key(name: str) -> str:
    try:
        with as_root_again():  # the admin's file, wherever the admin keeps it
            line = Path(name).read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read the SSH key {name}: {e.strerror}")
    fields = line.split()
    if len(fields) < 2 or not (fields[0].startswith(("ssh-", "ecdsa-", "sk-"))) or "\n" in line:
        raise UsageError(f"{name} is not one SSH public key line", "give the .pub file, e.g. ~/.ssh/id_ed25519.pub")
    return " ".join(fields[:2])


def find_rrsync() -> Optional[str]:
    found = shutil.which("rrsync")
    for candidate in ([found] if found else []) + ["/usr/bin/rrsync", "/usr/local/bin/rrsync",
                                                   "/opt/homebrew/bin/rrsync"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def rrsync_key_line(state_dir: Path, user: str, key: str) -> str:
    """An authorized_keys line that lets the key only rsync INTO the user's mirror folder:
    `restrict` (no shell, tty or forwarding) and a forced rrsync. -munge stores each link it
    receives as "/rsyncd-munged/TARGET", which resolves nowhere (MUNGE_PREFIX). -absolute lets the laptop
    keep sending the absolute mirror path /v1/me gives it; -no-lock lets two projects of one
    user sync at once."""
    rrsync = find_rrsync()
    options = ["-wo"]
    text = Path(rrsync).read_bytes() if rrsync else b""
    if b"-munge" in text:  # links it writes never resolve (the agent does not rely on it)
        options += ["-munge"]
    if b"-absolute" in text:
        options += ["-absolute", "-no-lock"]
    else:
        pw.say(RRSYNC_MISSING if not rrsync else
               f"{rrsync} is older and lacks -absolute: the laptop's sync needs an rrsync that has it "
               "(rsync's current support/rrsync)")
        options += ["-no-lock"]
    command = f"{rrsync or 'rrsync'} {' '.join(options)} {mirror_root(state_dir, user)}"
    return f'restrict,command="{command}" {key} patchwire:{user}'


def install_key_line(line: str, authorized_keys: Optional[str], folder: Path, owner: os.stat_result) -> None:
    """Print the line, or append it to `authorized_keys`; as root, a file or folder made here
    belongs to `owner` (the config's), since sshd refuses keys in a file the account does not own."""
    if not authorized_keys:
        pw.say("add this line to ~/.ssh/authorized_keys of the box account that runs patchwire-agent:")
        print(line, flush=True)
        return
    path = Path(authorized_keys)
    made = [p for p in (path, path.parent) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = path.read_text() if path.exists() else ""
    if key_held(path, old, line):
        pw.say(f"{path} has this key for {line.rsplit(':', 1)[1]} already: nothing to add")
        return
    write_private(path, old + ("" if not old or old.endswith("\n") else "\n") + line + "\n")
    for item in made:
        give_to_owner(item, owner)
    pw.say(f"appended the key line to {path}: that key may only rsync into {folder}")


def key_held(path: Path, text: str, line: str) -> bool:  # line: `... KEYTYPE BLOB patchwire:USER`
    """Whether the authorized_keys `text` has the key of `line` for the same user already;
    refused when a line of another user (or another login) has it: sshd takes the first line
    that matches, so the key would log in as that one (a developer handing in a colleague's
    public key as their own would get the colleague's syncs)."""
    blob, user = line.split()[-2], line.split()[-1]
    for held in text.splitlines():
        fields = held.split()
        if blob not in fields or held.lstrip().startswith("#"):  # a line sshd skips
            continue
        if fields[-1] == user:
            return True
        whose = fields[-1] if fields[-1].startswith("patchwire:") else "another login (not Patchwire's)"
        raise UsageError(f"{path} has this key already, on a line of {whose}: nothing was changed",
                         "each developer needs a key of their own: ask for their own .pub (a public key "
                         "is no proof of whose it is)")
    return False


def drop_key_lines(path: Path, state_dir: Path, user: str) -> int:
    if not path.exists():
        return 0
    marker = f" {mirror_root(state_dir, user)}\""
    lines = path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if marker not in l]
    write_private(path, "".join(kept))
    return len(lines) - len(kept)
@as_box_account
def cmd_usage(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    store = open_store(cfg)
    try:
        since = parse_time(args.since, 0.0)
        until = parse_time(args.until, time.time() + 1, end_of_day=True)
        report = usage_report(store, since, until, args.by, args.user, list(cfg.users))
    finally:
        store.close()
    pw.print_usage(args, report)
    if report["removed_users"] and not (args.json or args.csv):
        pw.say("removed users (no longer in the config; their history stays): " + ", ".join(report["removed_users"]))
    return 0


def cmd_service(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    kind = "systemd" if args.systemd else "launchd"
    data = systemd_unit(cfg, args.system).encode() if kind == "systemd" else launchd_plist(cfg, args.system)
    path, start = service_target(kind, args.system)
    if args.system and args.install:
        raise UsageError("--install writes user-level units only; a system one is root's to write",
                         f"patchwire-agent service -c {args.config} --{kind} --system | sudo tee {path}")
    if not args.install:
        sys.stdout.buffer.write(data)
        if args.system:
            pw.say(f"as root, put it in {path}; then: {start}")
        return 0
    install_service(cfg, kind)
    return 0


def install_service(cfg: AgentConfig, kind: str) -> None:
    """A user-level unit (or LaunchAgent) written where its manager finds it."""
    data = systemd_unit(cfg).encode() if kind == "systemd" else launchd_plist(cfg)
    path, start = service_target(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = path.exists()
    path.write_bytes(data)
    pw.say(f"{'replaced' if replaced else 'wrote'} {path}; start it (and at every login) with:")
    print(start, flush=True)
    if kind == "systemd":
        pw.say(f"to keep it running while you are logged out: loginctl enable-linger {current_user()}")


# --- doctor: what the box needs, each line ok or the fix


def cmd_doctor(args) -> int:
    try:
        cfg = AgentConfig.load(Path(args.config))
    except PatchwireError as e:
        checks = [{"name": "config", "ok": False, "detail": e.message, "fix": e.hint or "fix the config"}]
    else:
        checks = [{"name": "config", "ok": True, "detail": f"{cfg.path}: {len(cfg.users)} user(s)"}]
        checks += [check(cfg) for check in BOX_CHECKS] + [check_sshd(cfg, Path(args.sshd_config))]
    ok = all(c["ok"] for c in checks)
    pw.output(args, {"ok": ok, "checks": checks}, lambda r: pw.print_checks(r["checks"], sys.stdout))
    return 0 if ok else 1


def box_check(name: str, ok: bool, detail: str, fix: str = "") -> dict:
    return {"name": name, "ok": ok, "detail": detail, **({"fix": fix} if not ok else {})}


def check_program(name: str, fix: str, version: Optional[Callable[[], bytes]] = None) -> dict:
    """Whether `name` is on PATH, and its first line of `--version` (`version()` says it
    differently: git's goes through pw.Git like every git call)."""
    found = shutil.which(name)
    if not found:
        return box_check(name, False, f"{name} is not installed", fix)
    said = version() if version else pw.run([found, "--version"], check=False).stdout
    first = said.decode(errors="replace").splitlines()
    return box_check(name, True, f"{' '.join(first[0].split()) if first else 'unknown version'} ({found})")


def check_git(cfg: AgentConfig) -> dict:
    return check_program("git", "install git (Debian/Ubuntu: sudo apt install git; macOS: xcode-select --install)",
                         lambda: pw.Git().run("--version", check=False).stdout)


def check_rsync(cfg: AgentConfig) -> dict:
    return check_program("rsync", "the laptops rsync into this box: install rsync (Debian/Ubuntu: sudo apt "
                                  "install rsync; macOS has it)")


def check_rrsync(cfg: AgentConfig) -> dict:
    """Only team keys (`user add --ssh-key`) need it: a missing one is said, not failed."""
    rrsync = find_rrsync()
    if not rrsync:
        return box_check("rrsync", True, "not installed; only keys made with `user add --ssh-key` need it: "
                         "Debian/Ubuntu `sudo apt install rsync` (3.2.4+ ships /usr/bin/rrsync), macOS "
                         "`brew install rsync`")
    if b"-absolute" not in Path(rrsync).read_bytes():
        return box_check("rrsync", False, f"{rrsync} lacks -absolute, which the laptop's sync needs",
                         "install rsync 3.2.4 or later (its support/rrsync), or `brew install rsync` on macOS")
    return box_check("rrsync", True, f"{rrsync} (restricted keys work)")


def check_ai(cfg: AgentConfig) -> dict:
    if cfg.stand_in:  # fine for trying the box, and said so: it is no AI at all
        return box_check("ai", True, f"the built-in {STAND_IN_LABEL}: each job adds the prompt to "
                         f"{STAND_IN_FILE}; for real work set [ai] command (README.md, \"Box\")")
    argv0 = cfg.ai_command[0]
    if not shutil.which(argv0, path=ai_environment(cfg).get("PATH")):
        return box_check("ai", False, f"the AI command {argv0!r} is not on the agent's PATH",
                         "install Claude Code (npm install -g @anthropic-ai/claude-code) and log in, "
                         "or set [ai] command")
    for arg in cfg.ai_command[1:]:
        # a path among the arguments is a script the program runs (`python3 /opt/ai.py`):
        # found or not, the program itself starts, so only this check tells before an ask fails
        if arg.startswith("-") or os.sep not in arg:
            continue
        if not os.path.exists(arg):
            return box_check("ai", False, f"the AI command's argument {arg!r} does not exist",
                             "fix the path in [ai] command")
        if not os.access(arg, os.R_OK):
            return box_check("ai", False, f"the AI command's argument {arg!r} is not readable by this account",
                             f"chmod a+r {arg}, or fix the path in [ai] command")
    return box_check("ai", True, f"{argv0} found")


def check_settings(cfg: AgentConfig) -> dict:
    """Settings that load but cannot take effect, named with the rule that sets them."""
    for user in sorted(cfg.users):
        policy = cfg.policy(user)
        if policy.max_running > cfg.workers:
            return box_check("settings", False, f"{policy.rule('max_running')} for {user} is above "
                             f"[jobs] workers = {cfg.workers}: at most {cfg.workers} job(s) run at once",
                             "lower max_running, or raise [jobs] workers")
    return box_check("settings", True, "no setting exceeds what the box can run")


def check_sandbox(cfg: AgentConfig) -> dict:
    try:
        sandbox = Sandbox.choose(cfg.sandbox)
    except PatchwireError as e:
        return box_check("sandbox", False, e.message, e.hint)
    if sandbox.warning:
        return box_check("sandbox", False, sandbox.warning,
                         "install bubblewrap (Debian/Ubuntu: sudo apt install bubblewrap), or set "
                         '[ai] sandbox = "none" to accept an unconfined AI')
    if sandbox.kind != "bwrap":
        return box_check("sandbox", True, f"the AI runs under {sandbox.kind}")
    capabilities, failure = ai_capabilities(sandbox.program, cfg)
    if failure:
        return box_check("sandbox", False, f"bwrap cannot build the AI's sandbox on this box: {failure}",
                         "every job would fail before the AI starts; run `patchwire-agent doctor` again after "
                         "the fix (a report of this line helps: the sandbox's mounts are Patchwire's)")
    return box_check("sandbox", True, f"the AI runs under bwrap with capabilities {capabilities} "
                     "(its own user namespace, --cap-drop ALL)")


NETWORK_PROBE = """
import socket, sys
for host, port in (("127.0.0.1", int(sys.argv[1])), (sys.argv[2], int(sys.argv[3]))):
    try:
        socket.create_connection((host, port), timeout=3).close()
        print("reached", host, port)
    except OSError as e:
        print("refused", host, port, e.strerror or e)
"""


def check_network(cfg: AgentConfig) -> dict:
    """[network] as it applies, proved from inside a sandbox like a job's: a port of the box
    (this doctor's own listener on loopback) and the API upstream, tried directly, are both
    out of reach; only the gateway leads out."""
    net = cfg.network
    if not net.configured:
        return box_check("network", cfg.sandbox == "none", NETWORK_MISSING, 'add [network] mode = "allowlist" to the config')
    what = (f'mode "{net.base["mode"]}", presets {", ".join(net.base["presets"]) or "none"}, '
            f'{len(net.base["allow"])} more host(s)')
    confine = network_walls(cfg.sandbox)
    if not confine:
        return box_check("network", cfg.sandbox == "none", f"{what}; not enforced without a sandbox",
                         "install bubblewrap: only a job in its own network namespace is held to [network]")
    upstream = urllib.parse.urlsplit(cfg.network.api_upstream or "https://api.anthropic.com")
    with socket.socket() as box_port:
        box_port.bind(("127.0.0.1", 0))
        box_port.listen(1)
        proc = pw.run(confine + [sys.executable, "-I", "-S", "-c", NETWORK_PROBE, str(box_port.getsockname()[1]),
                                 upstream.hostname or "", str(upstream.port or 443)], timeout=30, check=False)
    said = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or [line.split(" ")[0] for line in said.splitlines()] != ["refused", "refused"]:
        return box_check("network", False, f"{what}; from inside a job's sandbox: {said.strip() or 'it failed'}",
                         f"the job's network walls did not hold: check {Path(confine[0]).name} here")
    return box_check("network", True, f"{what}; from inside a job's sandbox neither a port of the box nor "
                     f"{upstream.hostname} is reachable directly: only the gateway leads out")


def network_walls(setting: str, platform: str = sys.platform) -> List[str]:
    """The argv prefix that puts a probe behind a job's network walls: bwrap's own namespace,
    or sandbox-exec's profile letting out only to a gateway port (none listens here); []
    where no sandbox holds the network."""
    if setting in ("auto", "bwrap") and platform.startswith("linux"):
        program, _ = probe_bwrap()
        return [program, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-user",
                "--unshare-net", "--unshare-pid", "--die-with-parent"] if program else []
    if setting in ("auto", "sandbox-exec") and platform == "darwin" and os.access(SANDBOX_EXEC, os.X_OK):
        return [SANDBOX_EXEC, "-p", "(version 1)\n(allow default)\n" + SANDBOX_NETWORK.format(port=GATEWAY_PORT)]
    return []


def ai_capabilities(bwrap: str, cfg: AgentConfig) -> Tuple[str, str]:
    """(the capability sets a process in the sandbox holds, read from inside one; "" or why
    bwrap failed). The sandbox is a job's own (bwrap_argv: its hidden folders, the state
    folder, a job folder, git dir and AI home of a probe's), so what would fail every job (the
    account's home under /home, hidden twice, did) fails here."""
    try:
        probe: Optional[Path] = Path(tempfile.mkdtemp(prefix="doctor-probe-", dir=cfg.state_dir))
    except OSError:  # no state folder yet, or not this account's to write (check_state says so)
        probe = None
    try:
        if probe is None:
            argv = bare_sandbox(bwrap, ["cat", "/proc/self/status"])
        else:
            for name in ("job", "git", "home"):
                (probe / name).mkdir()
            walls = JobWalls(probe / "job", cfg.state_dir, probe / "git", probe / "home", cfg.limits.probe(),
                             secret_files=cfg.secret_files, readable=cfg.readable)
            argv = bwrap_argv(bwrap, ["cat", "/proc/self/status"], walls, [Path(shutil.which("cat") or "/bin/cat")])
        proc = pw.run(argv, timeout=30, check=False)
    finally:
        if probe is not None:
            remove_tree(probe)
    sets = re.findall(r"^(Cap(?:Eff|Prm|Bnd)):\s*([0-9a-f]+)$", proc.stdout.decode("utf-8", "replace"), re.M)
    if proc.returncode != 0 or not sets:
        return "", pw.sanitize(proc.stderr.decode("utf-8", "replace").strip()[-400:] or f"exit {proc.returncode}")
    return ", ".join(f"{name} {value}" for name, value in sets), ""


def check_ai_path(cfg: AgentConfig) -> dict:
    """PATH folders of the AI that the sandbox hides (a toolchain in the box account's home)
    and nothing binds back: the AI would not find what lies there."""
    if cfg.sandbox == "none" or not sys.platform.startswith("linux"):
        return box_check("ai_path", True, "the sandbox hides no folder of the AI's PATH")
    if cfg.stand_in:  # the agent's own Python, bound in by the sandbox; it runs nothing from PATH
        return box_check("ai_path", True, f"the {STAND_IN_LABEL} needs nothing from PATH")
    walls = JobWalls(cfg.state_dir, cfg.state_dir, cfg.state_dir, cfg.state_dir, cfg.limits)
    hidden = ["/tmp", *walls.hidden_folders(), real(cfg.state_dir)]
    env = ai_environment(cfg)
    found = shutil.which(cfg.ai_command[0], path=env.get("PATH"))
    bound = [*cfg.readable, *[install_folder(real(Path(p)), hidden) for p in (found or "",) if p]]
    lost = [folder for folder in dict.fromkeys(env.get("PATH", "").split(os.pathsep)) if folder
            and any(is_within(real(Path(folder)), h) for h in hidden)
            and not any(is_within(real(Path(folder)), b) for b in bound if b)]
    if lost:
        return box_check("ai_path", False, f"the sandbox hides these folders of the AI's PATH: {', '.join(lost)}",
                         f'add them to [ai] readable (read-only for the AI), e.g. readable = ["{lost[0]}"]')
    return box_check("ai_path", True, "every folder of the AI's PATH is readable in its sandbox")


def check_limits(cfg: AgentConfig) -> dict:
    limits = cfg.limits.probe()
    said = ", ".join(f"{key} {'unlimited' if value is None else value}" for key, value in limits.summary().items())
    why = limits.unlimited()
    return box_check("limits", True, f"each job: {said}" + (f" ({why})" if why else ""))


def check_state(cfg: AgentConfig) -> dict:
    state = cfg.state_dir
    if not state.exists():
        return check_state_parent(state)
    mode = state.stat().st_mode & 0o777
    if mode & 0o077:
        return box_check("state", False, f"{state} is readable by other users (mode {mode:o})",
                         f"chmod 700 {state} (serve does it at start)")
    stuck = unwritable_folders(state)
    if stuck:
        return box_check("state", False, f"this account cannot write {len(stuck)} folder(s) of {state}: "
                         + ", ".join(map(str, stuck[:3])) + ("" if len(stuck) <= 3 else ", ..."),
                         f"as root: sudo chown -R {pwd.getpwuid(os.geteuid()).pw_name} {state}")
    st = os.statvfs(state)
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES * 64:
        return box_check("state", False, f"only {pw.human_bytes(free)} free for {state}",
                         "free space: asks are refused below 4 MB, and jobs need room for their folders")
    return box_check("state", True, f"{state}, private, {pw.human_bytes(free)} free")


def unwritable_folders(state: Path) -> List[Path]:
    """The folders of the state folder down to each project that this account cannot write
    (made or chowned by root, say): syncs into them and asks in them fail."""
    levels = [state, *state.glob("users"), *state.glob("users/*"), *state.glob("users/*/mirror"),
              *state.glob("users/*/projects"), *state.glob("users/*/mirror/*"), *state.glob("users/*/projects/*")]
    return [p for p in levels if p.is_dir() and not p.is_symlink() and not os.access(p, os.W_OK | os.X_OK)]


def check_state_parent(state: Path) -> dict:
    """A state folder not made yet: the nearest existing folder above it must let this account
    make it, or the first `serve` or `user key` fails."""
    parent = state.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return box_check("state", False, f"{state} does not exist and this account cannot make it "
                         f"({parent} is not writable for it)", state_dir_fix(state))
    return box_check("state", True, f"{state} will be made (mode 700) at the first start")


def check_listen(cfg: AgentConfig) -> dict:
    scheme = "https" if cfg.tls else "http"
    if cfg.allow_public and not cfg.tls:
        return box_check("listen", False, f"{scheme}://{cfg.host}:{cfg.port} may be public, without TLS",
                         "set [server] tls_cert and tls_key, or listen on a private address")
    return box_check("listen", True, f"{scheme}://{cfg.host}:{cfg.port}")


# --- the sshd side: the developers' keys go through sshd as the agent's account


SSHD_CONFIG = "/etc/ssh/sshd_config"


def check_sshd(cfg: AgentConfig, sshd_config: Path) -> dict:
    """What sshd does with the rrsync keys: the account's authorized_keys must be its own and
    writable by nobody else (sshd's StrictModes refuses it otherwise, and whoever can write it
    can add a key with a shell), and PermitUserEnvironment must be no (with it, a key's
    environment= option or ~/.ssh/environment could set LD_PRELOAD for rrsync)."""
    account = pwd.getpwuid(cfg.path.stat().st_uid)  # the config's owner runs the agent
    settings, source = sshd_settings(sshd_config)
    if settings is not None and settings.get("permituserenvironment", "no") != "no":
        return box_check("sshd", False, f"PermitUserEnvironment is {settings['permituserenvironment']} "
                         f"(from {source}): a key's environment= could change what rrsync runs with",
                         f"set PermitUserEnvironment no in {sshd_config}, then reload sshd "
                         "(sudo systemctl reload ssh)")
    said = [f"PermitUserEnvironment no (from {source})" if settings is not None else
            f"cannot tell whether PermitUserEnvironment is no ({source}; run doctor as root to ask sshd -T)"]
    for keys in authorized_keys_files(settings, account):
        wrong = wrongly_held(keys, account)
        if wrong:
            return box_check("sshd", False, wrong, f"sudo chown {account.pw_name}: {keys} {keys.parent}; "
                             f"chmod go-w {keys} {keys.parent}")
        shared = shared_key(keys)
        if shared:
            return box_check("sshd", False, f"{keys} has one key on the lines of {shared}: sshd takes the first "
                             "line that matches, so that key logs in as the first alone",
                             "each developer needs a key of their own: remove the lines that are not its owner's "
                             "(`user key NAME` refuses a key another line has)")
        said.append(f"{keys} is {account.pw_name}'s, writable by it only" if keys.exists()
                    else f"no {keys} yet (`user add --authorized-keys` makes it)")
    return box_check("sshd", True, "; ".join(said))


def shared_key(keys: Path) -> str:
    """The comments of the lines of `keys` that hold one key between them, joined, when some
    key is on two lines or more and a Patchwire line is among them ("" when none is)."""
    try:
        text = keys.read_text(errors="replace")
    except OSError:
        return ""
    holders: Dict[str, List[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or line.lstrip().startswith("#"):
            continue
        blob = next((f for f in fields if f.startswith("AAAA")), None)  # every key type's base64 starts so
        if blob:
            holders.setdefault(blob, []).append(fields[-1] if fields[-1] != blob else "(no comment)")
    for names in holders.values():
        if len(names) > 1 and any(n.startswith("patchwire:") for n in names):
            return ", ".join(names)
    return ""


def sshd_settings(sshd_config: Path) -> Tuple[Optional[Dict[str, str]], str]:
    """sshd's settings (lower-case keywords) and where they were read: `sshd -T`, which
    knows every Include and default but mostly needs root; else the file itself, where the
    first value of a keyword wins, up to the first Match block. None when neither works."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    if sshd:
        proc = pw.run([sshd, "-T", "-f", str(sshd_config)], timeout=10, check=False)
        if proc.returncode == 0:
            return parse_sshd_lines(proc.stdout.decode("utf-8", "replace").splitlines()), f"sshd -T -f {sshd_config}"
    try:
        lines = sshd_config_lines(sshd_config)
    except OSError as e:
        return None, f"cannot read {sshd_config}: {e.strerror}"
    return parse_sshd_lines(lines), str(sshd_config)


def sshd_config_lines(path: Path, depth: int = 0) -> List[str]:
    """The file's lines with its Include files read in place (relative to /etc/ssh, as sshd
    does), up to the first Match block."""
    out: List[str] = []
    for line in path.read_text(errors="replace").splitlines():
        words = line.split(None, 1)
        if words and words[0].lower() == "match":
            break
        if words and words[0].lower() == "include" and len(words) == 2 and depth < 4:
            for pattern in words[1].split():
                for name in sorted(Path("/etc/ssh").glob(pattern) if not pattern.startswith("/")
                                   else Path("/").glob(pattern.lstrip("/"))):
                    with contextlib.suppress(OSError):
                        out += sshd_config_lines(name, depth + 1)
            continue
        out.append(line)
    return out


def parse_sshd_lines(lines: List[str]) -> Dict[str, str]:
    settings: Dict[str, str] = {}
    for line in lines:
        words = line.split("#", 1)[0].replace("=", " ", 1).split(None, 1)
        if len(words) == 2:
            settings.setdefault(words[0].lower(), words[1].strip())
    return settings


def authorized_keys_files(settings: Optional[Dict[str, str]], account: pwd.struct_passwd) -> List[Path]:
    """The account's AuthorizedKeysFile entries (%h, %u, %% expanded; relative to its home)."""
    value = (settings or {}).get("authorizedkeysfile", ".ssh/authorized_keys .ssh/authorized_keys2")
    paths = []
    for entry in value.split():
        if entry.lower() == "none":
            continue
        entry = entry.replace("%%", "\0").replace("%h", account.pw_dir).replace("%u", account.pw_name)
        paths.append(Path(account.pw_dir) / entry.replace("\0", "%"))
    return [p for p in paths if p.exists()] or paths[:1]


def wrongly_held(keys: Path, account: pwd.struct_passwd) -> str:
    """Why sshd would refuse `keys` or another account could add a key to it; "" when fine."""
    for path in (keys, keys.parent):
        if not path.exists():
            continue
        st = path.stat()
        if st.st_uid != account.pw_uid:
            return f"{path} belongs to {account_name(st.st_uid)}, not {account.pw_name}: sshd refuses its keys (StrictModes)"
        if st.st_mode & 0o022:
            return (f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): they could "
                    "add a key with a shell, and sshd refuses it (StrictModes)")
    return ""


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


SETUP_CHECKS = (check_git, check_rsync, check_rrsync, check_sandbox, check_ai)
BOX_CHECKS = (check_git, check_rsync, check_rrsync, check_ai, check_settings, check_sandbox, check_network,
              check_ai_path, check_limits, check_state, check_listen)


@as_box_account
def cmd_status(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    store = open_store(cfg)
    try:
        report = status_report(cfg, store)
    finally:
        store.close()
    pw.output(args, report, print_status)
    return 0


def print_status(r: dict) -> None:
    if r["running"]:
        print(f"agent: running, pid {r['pid']}, up {human_duration(r['uptime_s'])}, {r['url']}")
    else:
        print("agent: not running")
    print(f"workers: {r['workers']}; job folders per user and project: {r['slots']}")
    print(f"state folder: {r['state_dir']}, {pw.human_bytes(r['state_bytes'])}")
    width = max([len(u) + 10 for u in r["users"]] + [4])
    print(f"{'user':<{width}} {'running':>7} {'queued':>6} {'disk':>9}")
    for name, u in r["users"].items():
        label = name + (" (removed)" if u["removed"] else "")
        print(f"{label:<{width}} {u['running']:>7} {u['queued']:>6} {pw.human_bytes(u['disk_bytes']):>9}")
    for job in r["jobs"]:
        print(f"  {job['id']}  {job['status']:<7}  {pw.human_age(time.time() - job['since']):>4}  "
              f"{job['user']}/{job['project']}")


@as_box_account
def cmd_gc(args) -> int:
    cfg = AgentConfig.load(Path(args.config))
    before = parse_time(args.older_than, 0.0)
    store = open_store(cfg)
    try:
        report = gc_state(cfg, store, before, args.dry_run)
    except sqlite3.OperationalError as e:  # the disk is full even without the patches and reserve
        raise PatchwireError(f"gc could not delete old events from the state database: {e}",
                             f"free some space on the file system of {cfg.state_dir}, then run gc again")
    finally:
        store.close()
    pw.output(args, report, print_gc)
    return 0


def print_gc(r: dict) -> None:
    verb = "would free" if r["dry_run"] else "freed"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r["before"]))
    print(f"{verb}: {r['patches']} patch(es), {pw.human_bytes(r['patch_bytes'])}, and {r['events']} event(s) "
          f"of {r['jobs']} job(s) finished before {when} (the jobs and their usage stay)")
    if r["results"]:
        print(f"{'would drop' if r['dry_run'] else 'dropped'} the stored results of {r['results']} job(s) "
              "from their projects' stores: git frees what only they held at the store's next upkeep")
    if r["results_kept"]:
        print("kept the results in the stores of " + ", ".join(r["results_kept"]) + " (busy just now): "
              "the next gc drops them")
    print(f"{verb}: {len(r['job_folders'])} job folder(s), {pw.human_bytes(r['folder_bytes'])}"
          + "".join(f"\n  {f}" for f in r["job_folders"]))
    if r["db_bytes"]:
        print(f"{verb}: {pw.human_bytes(r['db_bytes'])} of the state database")
    if r.get("compact_error"):
        print(f"could not compact the state database ({r['compact_error']}): its free pages are reused "
              "by new events; free space on the box and run gc again to give them back")
    if r["folders_busy"]:
        print("kept the job folders of " + ", ".join(r["folders_busy"]) + ": a job started in them just now")


COMMANDS = {
    "init": (cmd_init, "set the box up: check it, make the state folder, write the config with one user"),
    "serve": (cmd_serve, "run the HTTP server"),
    "user": (cmd_user, "add, list, remove users or rotate a token (a running server picks it up)"),
    "policy": (cmd_policy, "print a user's effective policy and where each value comes from, or --set it"),
    "project": (cmd_project, "remove one project of a user: its mirror, repository, job folders, patches"),
    "usage": (cmd_usage, "asks, AI minutes, tokens and cost per user, project or day (reads the state)"),
    "status": (cmd_status, "running and queued jobs by user, workers, uptime, disk per user"),
    "doctor": (cmd_doctor, "check what this box needs (git, rsync, rrsync, the AI, its sandbox, the state folder, sshd)"),
    "gc": (cmd_gc, "prune old jobs' patches and events, and unused job folders"),
    "service": (cmd_service, "print or install a systemd user unit or a launchd agent that runs serve"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchwire-agent", description=AGENT_DESCRIPTION,
                                     epilog=AGENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"patchwire-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}
    for name in p:
        if name != "user":
            add_config_option(p[name])
    p["init"].add_argument("--user", default=os.environ.get("USER") or "me", help="first user's name")
    p["init"].add_argument("--token-file", help="write the token to this file (mode 600) instead of printing it")
    p["init"].add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (default %(default)s)")
    p["init"].add_argument("--state-dir", help="where jobs, mirrors and job folders live")
    p["init"].add_argument("--force", action="store_true", help="replace an existing config")
    p["init"].add_argument("--account", help="as root: the account that runs the agent; it gets the config "
                           "and the state folder")
    p["init"].add_argument("--service", action="store_true", help="also install a user-level service unit "
                           "(systemd; launchd on macOS) that runs serve")
    p["init"].add_argument("--ai", choices=["claude", STAND_IN], default="claude",
                           help="Claude Code (default), or the built-in stand-in AI for trying the box "
                                "without a Claude login (it adds the prompt to PATCHWIRE_DEMO.md)")
    p["serve"].add_argument("-v", "--verbose", action="store_true", help="log every request")
    add_user_parsers(p["user"])
    p["policy"].add_argument("name", nargs="?", help="the user's name")
    p["project"].add_argument("action", choices=["remove"])
    p["project"].add_argument("user", help="the user's name")
    p["project"].add_argument("project", help="the project's name")
    p["project"].add_argument("--yes", action="store_true", help="delete without asking")
    p["policy"].add_argument("--default", action="store_true", help="the [policy] defaults of every user")
    p["policy"].add_argument("--set", action="append", metavar="KEY=VALUE",
                             help="set a policy key (repeatable), checked as the config is: "
                                  "max_queued=5, rate_limit=30/hour, projects='[\"web-*\"]'")
    add_ops_arguments(p)
    return parser


def default_config() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "patchwire", "agent.toml")


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=default_config(),
                        help="the agent's TOML config file (default: %(default)s)")


def add_user_parsers(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    helps = {"add": "add a user and print their token once", "list": "list the users",
             "remove": "remove a user: their token stops working at once",
             "rotate": "give a user a new token: the old one stops working at once",
             "key": "print (or append) an authorized_keys line for a user's SSH key"}
    p = {name: sub.add_parser(name, help=text, description=text) for name, text in helps.items()}
    for name, action in p.items():
        add_config_option(action)
        if name != "list":
            action.add_argument("name", help="the user's name")
    for name in ("add", "rotate"):
        p[name].add_argument("--token-file", help="write the token to this file (mode 600) instead of printing it")
    p["add"].add_argument("--admin", action="store_true", help="may also read everyone's usage and metrics")
    p["add"].add_argument("--reuse", action="store_true",
                          help="a name that was on this box before: give this user its jobs and files back")
    p["key"].add_argument("--ssh-key", metavar="FILE", required=True, help="the user's SSH public key")
    for name in ("add", "key"):
        if name == "add":
            p[name].add_argument("--ssh-key", metavar="FILE",
                                 help="the user's SSH public key: print an authorized_keys line that may only "
                                      "rsync into the user's own mirror folder (rrsync)")
        p[name].add_argument("--authorized-keys", metavar="FILE", help="append that line to FILE instead of printing it")
    p["remove"].add_argument("--authorized-keys", metavar="FILE", help="also drop the user's key lines from FILE")
    p["remove"].add_argument("--purge", action="store_true", help="also delete their mirrors, job folders, AI "
                             "home and stored patches, after confirming (cancels their jobs)")
    p["remove"].add_argument("--yes", action="store_true", help="confirm --purge without asking")
    for name in ("remove", "rotate"):
        p[name].add_argument("--cancel-jobs", action="store_true",
                             help="also cancel the user's running job (queued ones end on remove anyway)")


def add_ops_arguments(p: Dict[str, argparse.ArgumentParser]) -> None:
    pw.add_usage_arguments(p["usage"], "user")
    p["usage"].add_argument("--user", help="only this user")
    p["doctor"].add_argument("--sshd-config", default=SSHD_CONFIG, metavar="FILE",
                             help="the sshd_config of the sshd the developers' keys go through (default %(default)s)")
    for name in ("usage", "status", "gc", "doctor"):
        p[name].add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p["gc"].add_argument("--older-than", default="30d", help="jobs finished longer ago than this: "
                         "30d, 12h, or a date (default %(default)s)")
    p["gc"].add_argument("--dry-run", action="store_true", help="say what would be freed, free nothing")
    kind = p["service"].add_mutually_exclusive_group(required=True)
    kind.add_argument("--systemd", action="store_true", help="a systemd user unit (Linux)")
    kind.add_argument("--launchd", action="store_true", help="a launchd agent plist (macOS)")
    p["service"].add_argument("--install", action="store_true", help="write it to the user's unit folder "
                              "(~/.config/systemd/user or ~/Library/LaunchAgents) and print the command that starts it")
    p["service"].add_argument("--system", action="store_true", help="for the system manager (starts at boot), "
                              "running as you; printed, for root to install")


def main(argv: Optional[List[str]] = None) -> int:
    args = pw.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return pw.run_command("patchwire-agent", COMMANDS, args)


if __name__ == "__main__":
    sys.exit(main())
