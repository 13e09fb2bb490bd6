"""The laptop CLI as scripts and people see it: --json on every command, doctor against
broken setups, interactive init, help and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import patchwire
from conftest import Laptop, drive_pty, make_repo, script, write_config


def json_of(result) -> dict:
    lines = [l for l in result.out.splitlines() if l.strip()]
    assert len(lines) == 1, result.out
    return json.loads(lines[0])


def test_every_command_speaks_json(laptop, agent):
    dry = json_of(laptop.run("sync", "--dry-run", "--json", check=0))
    assert "README.md" in dry["files"] and dry["held_back"] == {}
    synced = json_of(laptop.run("sync", "--json", check=0))
    assert synced["files"] == len(dry["files"]) and synced["skipped"] is False and synced["sent_files"] >= 1
    again = json_of(laptop.run("sync", "--json", check=0))
    assert again["skipped"] is True and again["tree"] == synced["tree"]

    asked = laptop.ask(script({"say": "working"}, {"write": "README.md", "text": "# json\n"}),
                       "--json", "--yes", check=0)
    lines = [json.loads(l) for l in asked.out.splitlines()]
    assert [l["type"] for l in lines][:2] == ["queued", "started"]
    assert lines[-2]["type"] == "finished" and lines[-1]["type"] == "outcome"
    assert lines[-1]["applied"] is True and lines[-1]["files"] == ["README.md"]
    assert any(l["type"] == "text" and l["text"] == "working" for l in lines)
    job = lines[-1]["job"]

    diff = json_of(laptop.run("diff", job, "--json", check=0))
    assert diff["files"] == [{"path": "README.md", "old_path": "README.md", "kind": "modified",
                              "added": 1, "removed": 1, "binary": False}]
    assert "+# json" in diff["patch"]
    jobs = json_of(laptop.run("jobs", "--json", check=0))
    assert jobs["jobs"][0]["id"] == job and jobs["jobs"][0]["status"] == "done"
    shown = json_of(laptop.run("show", job, "--json", check=0))
    assert shown["job"]["id"] == job and shown["events"][-1]["type"] == "finished"
    log = json_of(laptop.run("log", "--json", check=0))
    assert log["applied"][0]["job"] == job and log["applied"][0]["files"] == ["README.md"]
    undo = json_of(laptop.run("apply", "--undo", "--json", check=0))
    assert undo == {"restored": ["README.md"]}
    applied = json_of(laptop.run("apply", job, "--yes", "--json", check=0))
    assert applied["how"] == "plain" and applied["files"] == ["README.md"]
    doctor = json_of(laptop.run("doctor", "--json", check=0))
    assert doctor["ok"] is True and {c["name"] for c in doctor["checks"]} >= {"git", "rsync", "agent", "auth", "ai"}

    # an error is a JSON document too, with the exit status
    error = laptop.run("cancel", "ffffffffffff", "--json")
    assert error.returncode == 1  # not found is an error, not a refusal (exit 3)
    assert json_of(error)["exit_status"] == 1 and "no job" in json_of(error)["error"]
    assert "patchwire: no job 'ffffffffffff'" in error.err


def test_json_errors_keep_stdout_parseable(laptop):
    result = laptop.ask("", "--json")
    assert result.returncode == 2
    assert json_of(result) == {"error": "the prompt is empty", "hint": "", "exit_status": 2}


def checks_of(result) -> dict:
    return {c["name"]: c for c in json_of(result)["checks"]}


def test_doctor_all_good(laptop):
    result = laptop.run("doctor", check=0)
    assert "FAIL" not in result.out
    for name in ("git", "rsync", "token", "agent", "clock", "auth", "ai", "mirror"):
        assert f"ok   {name}:" in result.out


def test_doctor_wrong_token(laptop, tmp_path):
    bad = tmp_path / "bad.token"
    bad.write_text("pw_not_the_right_token\n")
    os.chmod(bad, 0o600)
    result = laptop.run("doctor", env={"PATCHWIRE_TOKEN": "pw_not_the_right_token"})
    assert result.returncode == 1
    assert "FAIL auth: the agent does not accept the token from PATCHWIRE_TOKEN" in result.out
    assert "put in the token the box printed for you (or unset PATCHWIRE_TOKEN" in result.out
    assert "pw_not_the_right_token" not in result.out + result.err


def test_doctor_agent_down(laptop, agent):
    agent.stop()
    checks = checks_of(laptop.run("doctor", "--json"))
    assert checks["agent"]["ok"] is False and "cannot reach the agent" in checks["agent"]["detail"]
    assert "patchwire-agent serve" in checks["agent"]["fix"]
    assert checks["git"]["ok"] and checks["rsync"]["ok"]


def test_doctor_missing_rsync_and_ai(laptop, make_agent):
    box = make_agent(ai_command=["claude-not-installed"])
    laptop.init(box)
    write_config(laptop.root, (laptop.root / ".patchwire.toml").read_text() + '\n[sync]\nrsync = "/nonexistent/rsync"\n')
    checks = checks_of(laptop.run("doctor", "--json"))
    assert checks["rsync"]["ok"] is False and "apt install rsync" in checks["rsync"]["fix"]
    assert checks["ai"]["ok"] is False and "install Claude Code on the box" in checks["ai"]["fix"]


def test_doctor_token_file_readable_by_others(laptop, agent):
    token = agent.token_file()
    os.chmod(token, 0o644)
    checks = checks_of(laptop.run("doctor", "--json"))
    assert checks["token"]["ok"] is False and checks["token"]["fix"] == f"chmod 600 {token}"


def test_init_asks_interactively_and_verifies(tmp_path, agent):
    root = make_repo(tmp_path / "fresh", {"a.txt": b"a\n"})
    lap = Laptop(root)
    token = agent.token_file()
    out = drive(lap, ["init"], [agent.url, str(token), "none", ""])
    assert f"Agent URL [http://127.0.0.1:7433]: {agent.url}" in out  # typed on the prompt's line
    assert "ok   auth: accepted as user alice" in out
    config = (root / ".patchwire.toml").read_text()
    assert f'agent = "{agent.url}"' in config and 'project = "fresh"' in config
    assert agent.token not in config


def test_init_interactive_refuses_a_broken_setup_unless_told(tmp_path, agent):
    root = make_repo(tmp_path / "fresh", {"a.txt": b"a\n"})
    lap = Laptop(root)
    token = agent.token_file()
    out = drive(lap, ["init"], ["http://127.0.0.1:9", str(token), "none", "", "n"])
    assert "FAIL agent" in out and "nothing written" in out
    assert not (root / ".patchwire.toml").exists()


def test_init_without_a_terminal_needs_flags(tmp_path):
    root = make_repo(tmp_path / "fresh", {"a.txt": b"a\n"})
    result = Laptop(root).run("init")
    assert result.returncode == 2 and "--token-file is required" in result.err


def drive(lap: Laptop, args, answers) -> str:
    return drive_pty(lap, args, answers, prompts=(b"]:", b"[y/N]"))


def test_help_lists_exit_codes_and_commands(laptop):
    result = laptop.run("--help", check=0)
    for word in ("3 agent unreachable", "4 AI run failed", "5 patch does not apply", "130 interrupted",
                 "doctor", "log", "cancel"):
        assert word in result.out
    assert laptop.run("bogus").returncode == 2


@pytest.mark.parametrize("banner, expected", [
    ("rsync  version 2.6.9  protocol version 29\nCopyright (C) 1996-2006", "rsync 2.6.9"),
    ("openrsync: protocol version 29\nrsync version 2.6.9 compatible", "openrsync"),
    ("rsync  version 3.2.7  protocol version 31\n", "rsync 3.2.7"),
])
def test_doctor_names_the_rsync_flavour(laptop, tmp_path, banner, expected):
    fake = tmp_path / "rsync"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + banner + "\nEOF\n")
    fake.chmod(0o755)
    write_config(laptop.root, (laptop.root / ".patchwire.toml").read_text() + f'\n[sync]\nrsync = "{fake}"\n')
    checks = checks_of(laptop.run("doctor", "--json"))
    assert checks["rsync"]["ok"] and checks["rsync"]["detail"].startswith(expected)


def test_rsync_counts_from_old_and_new_stats_output():
    old = b"Number of files: 12\nNumber of files transferred: 3\nTotal file size: 9,999 bytes\n" \
          b"Total transferred file size: 1,234 bytes\n"
    new = b"Number of files: 12 (reg: 10, dir: 2)\nNumber of regular files transferred: 4\n" \
          b"Total file size: 9.999 bytes\nTotal transferred file size: 56.789 bytes\n"
    assert patchwire.rsync_counts(old) == {"files": 3, "bytes": 1234}
    assert patchwire.rsync_counts(new) == {"files": 4, "bytes": 56789}


def test_the_token_is_not_sent_to_a_redirect():
    import http.server
    import threading
    seen = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/v1/me")
            self.send_header("Content-Length", "0")
            self.end_headers()

    source = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, source):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        patchwire.Client(f"http://127.0.0.1:{source.server_address[1]}", "pw_secret").json("GET", "/v1/me")
    finally:
        source.shutdown()
        target.shutdown()
    assert seen == [None]


def test_the_client_reaches_the_agent_directly_whatever_the_proxy_variables_say(monkeypatch):
    import http.server
    import threading

    class Agent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b'{"ok": true}')

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        answer = patchwire.Client(f"http://127.0.0.1:{server.server_address[1]}", "pw_secret").json("GET", "/v1/me")
    finally:
        server.shutdown()
    assert answer == {"ok": True}


def test_init_and_cancel_speak_json(tmp_path, agent):
    root = make_repo(tmp_path / "fresh", {"a.txt": b"a\n"})
    lap = Laptop(root)
    token = agent.token_file()
    made = json_of(lap.run("init", "--json", "--agent", agent.url, "--token-file", str(token), check=0))
    assert made == {"config": str(root / ".patchwire.toml"), "agent": agent.url, "token_file": str(token),
                    "project": "fresh"}
    lap.run("sync", check=0)
    proc = subprocess.Popen(lap.program + ["ask", "--yes", script({"hang": True})], cwd=root,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lap.env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = agent.json("GET", "/v1/jobs")[1]["jobs"]
            if jobs and jobs[0]["status"] == "running":
                break
            time.sleep(0.05)
        cancelled = json_of(lap.run("cancel", jobs[0]["id"], "--json", check=0))
        assert cancelled["job"]["id"] == jobs[0]["id"] and cancelled["job"]["status"] == "cancelled"
        assert proc.wait(30) == 4
    finally:
        proc.kill()
