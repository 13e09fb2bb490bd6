"""The agent's config and command line: `init` in-process, `serve` as a real process for
its startup errors, a port already taken and SIGTERM."""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

import patchwire_agent
from conftest import AGENT, STAND_IN_COMMAND, AgentProcess, tomllib

DIGEST = "ab" * 32


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ init


def test_init_prints_the_token_once_and_stores_only_its_digest(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "bob"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"  # stdout is the token and nothing else
    assert re.fullmatch(r"pw_[A-Za-z0-9_-]{40,}", token), token
    assert token not in err and str(cfg) in err and "bob" in err

    text = cfg.read_text()
    assert token not in text and token[3:] not in text
    data = tomllib.loads(text)
    assert data["users"] == {"bob": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}}
    assert mode_of(cfg) == 0o600
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 3, text
    for table in ("server", "ai", "jobs"):
        assert table in data
    assert data["server"]["listen"] == patchwire_agent.DEFAULT_LISTEN
    # what init writes, serve loads, with the token as bob's
    loaded = patchwire_agent.AgentConfig.load(cfg)
    assert loaded.users == {"bob": hashlib.sha256(token.encode()).digest()}
    assert loaded.ai_command == patchwire_agent.CLAUDE_COMMAND


def test_init_makes_a_new_token_each_time(tmp_path, capsys):
    tokens = set()
    for n in range(3):
        assert patchwire_agent.main(["init", "-c", str(tmp_path / f"{n}.toml")]) == 0
        tokens.add(capsys.readouterr().out.strip())
    assert len(tokens) == 3


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "bob"]) == 0
    first_token = capsys.readouterr().out.strip()
    before = cfg.read_bytes()
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "eve"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(cfg) in err and "exists" in err and "--force" in err
    assert "Traceback" not in err
    assert cfg.read_bytes() == before
    # --force replaces it, with a new token
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "eve", "--force"]) == 0
    second_token = capsys.readouterr().out.strip()
    assert second_token != first_token
    users = tomllib.loads(cfg.read_text())["users"]
    assert list(users) == ["eve"]
    assert users["eve"]["token_sha256"] == hashlib.sha256(second_token.encode()).hexdigest()
    assert mode_of(cfg) == 0o600


def test_init_with_a_token_file_does_not_print_the_token(tmp_path, capsys):
    cfg, token_file = tmp_path / "agent.toml", tmp_path / "secret" / "bob.token"
    token_file.parent.mkdir()
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "bob", "--token-file", str(token_file)]) == 0
    out, err = capsys.readouterr()
    token = token_file.read_text().strip()
    assert token_file.read_text() == token + "\n"
    assert mode_of(token_file) == 0o600
    assert out == ""
    assert token not in err and str(token_file) in err
    assert token not in cfg.read_text()
    assert tomllib.loads(cfg.read_text())["users"]["bob"]["token_sha256"] == \
        hashlib.sha256(token.encode()).hexdigest()


def test_init_refuses_a_bad_user_name(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "../bob"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "'../bob'" in err and "not valid" in err
    assert not cfg.exists()


def test_init_usage_errors_exit_2(tmp_path, capsys):
    assert patchwire_agent.main(["init", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
    assert patchwire_agent.main(["frobnicate", "-c", "x"]) == 2
    assert patchwire_agent.main([]) == 2


# ------------------------------------------------------------------ serve: startup errors


def start_config(tmp_path: Path) -> str:
    """The text `init` writes, listening on an ephemeral port, with state under tmp_path."""
    cfg = tmp_path / "seed.toml"
    assert patchwire_agent.main(["init", "-c", str(cfg), "--user", "bob", "--listen", "127.0.0.1:0",
                                 "--token-file", str(tmp_path / "bob.token")]) == 0
    return cfg.read_text()


def serve(config: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """`serve` that is expected to stop by itself; a server that starts fails the test."""
    try:
        proc = subprocess.run(AGENT + ["serve", "-c", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"serve kept running: {e.stdout!r} {e.stderr!r}")
    proc.err = proc.stderr.decode("utf-8", "replace")
    return proc


def replace_line(text: str, old: str, new: str) -> str:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(old)]
    assert len(hits) == 1, (old, text)
    lines[hits[0]] = new
    return "\n".join(lines) + "\n"


# Each bad config is the seed text with one edit: a whole line replaced, a pattern replaced, or
# text added; the table gives the edit and the words the one-line error must hold.
def line(old: str, new: str):
    return lambda t: replace_line(t, old, new)


def sub(pattern: str, new: str, flags: int = 0):
    def edit(t: str) -> str:
        changed, n = re.subn(pattern, new, t, flags=flags)
        assert n == 1, (pattern, t)
        return changed
    return edit


def append(text: str):
    return lambda t: t + text


DIGEST_LINE = r'token_sha256 = "[0-9a-f]{64}"'
COMMAND_LINE = (r"^command = \[.*?\]$", re.S | re.M)


def server_not_table(t):
    server, ai = t.index("[server]"), t.index("[ai]")
    return 'server = "127.0.0.1:0"\n' + t[:server] + t[ai:]


BAD_CONFIGS = [
    ("unknown_key", line("listen = ", 'lisen = "127.0.0.1:0"'),
     ["unknown key 'lisen' in [server]", "known keys: ", " listen,", " state_dir"]),
    ("workers_text", line("workers = ", 'workers = "two"'), ["jobs.workers must be a positive integer", "'two'"]),
    ("workers_zero", line("workers = ", "workers = 0"), ["jobs.workers must be a positive integer", "not 0"]),
    ("unknown_table", append('\n[logging]\nlevel = "debug"\n'),
     ["unknown key 'logging' in top level", "known keys: ai, jobs, network, notify, policy, projects, server, users"]),
    ("bad_digest", sub(DIGEST_LINE, 'token_sha256 = "not-a-digest"'), ["users.bob.token_sha256 must be 64 hex digits"]),
    ("short_digest", sub(DIGEST_LINE, f'token_sha256 = "{DIGEST[:63]}"'),
     ["users.bob.token_sha256 must be 64 hex digits"]),
    ("no_digest", sub(DIGEST_LINE + "\n", ""), ["users.bob.token_sha256 must be 64 hex digits"]),
    ("bad_listen", line("listen = ", 'listen = "nope"'), ["server.listen must be HOST:PORT", "'nope'"]),
    ("bad_port", line("listen = ", 'listen = "127.0.0.1:70000"'),
     ["server.listen must be HOST:PORT", "'127.0.0.1:70000'"]),
    ("invalid_toml", append("\n[jobs\nworkers = 2\n"), ["not valid TOML", "line "]),
    ("empty_command", sub(COMMAND_LINE[0], "command = []", COMMAND_LINE[1]), ["ai.command must not be empty"]),
    ("command_string", sub(COMMAND_LINE[0], 'command = "claude -p"', COMMAND_LINE[1]),
     ["ai.command must be a list of strings"]),
    ("bad_env", sub(r"\[jobs\]", "env = { DEBUG = 1 }\n\n[jobs]"), ["ai.env must be a table of strings"]),
    ("bad_user_name", sub(r"\[users\.bob\]", '[users."bob smith"]'), ["user name 'bob smith' is not valid"]),
    ("workers_true", line("workers = ", "workers = true"), ["jobs.workers must be a positive integer", "not True"]),
    ("slots_float", line("slots = ", "slots = 1.5"), ["jobs.slots must be a positive integer", "not 1.5"]),
    ("users_not_table", sub(r"\[users\.bob\]\n" + DIGEST_LINE, '[users]\nbob = "secret"'),
     ["[users.bob] must be a table"]),
    ("server_not_table", server_not_table, ["server must be a table"]),
]


@pytest.mark.parametrize("edit, expected", [pytest.param(edit, expected, id=name) for name, edit, expected in BAD_CONFIGS])
def test_serve_refuses_a_bad_config(tmp_path, edit, expected):
    config = tmp_path / "agent.toml"
    config.write_text(edit(start_config(tmp_path)))
    proc = serve(config)
    assert proc.returncode == 1, proc.err
    assert proc.stdout == b""
    assert "Traceback" not in proc.err
    assert str(config) in proc.err, proc.err
    for words in expected:
        assert words in proc.err, proc.err
    assert len(proc.err.strip().splitlines()) <= 3, proc.err  # one message (and a hint), not a dump


def test_serve_names_a_missing_config(tmp_path):
    config = tmp_path / "nowhere" / "agent.toml"
    proc = serve(config)
    assert proc.returncode == 1
    assert f"{config}: no such file" in proc.err
    assert "Traceback" not in proc.err


def test_serve_reports_a_config_it_cannot_read(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_bytes(b"[server]\nlisten = \"\xff\xfe\"\n")
    proc = serve(config)
    assert proc.returncode == 1 and str(config) in proc.err and "Traceback" not in proc.err


def test_serve_on_a_port_already_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "agent.toml"
        config.write_text(replace_line(start_config(tmp_path), "listen = ", f'listen = "127.0.0.1:{port}"'))
        proc = serve(config)
    assert proc.returncode == 1, proc.err
    assert f"cannot listen on 127.0.0.1:{port}" in proc.err
    assert "Traceback" not in proc.err


def test_serve_stops_cleanly_on_sigterm(tmp_path):
    agent = AgentProcess(tmp_path / "box", STAND_IN_COMMAND).start()
    assert agent.request("GET", "/v1/health")[0] == 200
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=20) == 0
    assert "Traceback" not in agent.read_log()
    # the same config and state start again; SIGINT (Ctrl-C) stops it cleanly too
    agent.start()
    assert agent.request("GET", "/v1/health")[0] == 200
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(timeout=20) == 0
    assert "Traceback" not in agent.read_log()
