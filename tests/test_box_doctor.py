"""`patchwire-agent doctor`: what the box needs, each line ok or the fix; run as a process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, STAND_IN_COMMAND, tomli_w, tomllib

AGENT = [sys.executable, str(ROOT / "patchwire_agent.py")]


def agent_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(AGENT + list(args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def box(tmp_path, **ai) -> str:
    config = tmp_path / "agent.toml"
    made = agent_cli("init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t"))
    assert made.returncode == 0, made.stderr
    data = tomllib.loads(config.read_text())
    data["ai"].update({"command": STAND_IN_COMMAND, "sandbox": "none", **ai})
    config.write_text(tomli_w.dumps(data))
    return str(config)


def checks(result: subprocess.CompletedProcess) -> dict:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_a_ready_box_is_all_ok(tmp_path):
    config = box(tmp_path)
    result = agent_cli("doctor", "-c", config, "--json")
    assert result.returncode == 0, result.stdout
    found = checks(result)
    assert set(found) == {"config", "git", "rsync", "rrsync", "ai", "sandbox", "network", "ai_path", "limits", "state", "listen"}
    assert all(c["ok"] for c in found.values())
    assert found["listen"]["detail"] == "http://127.0.0.1:7433"
    human = agent_cli("doctor", "-c", config)
    assert human.returncode == 0 and "ok   ai: " in human.stdout and "FAIL" not in human.stdout


def test_a_missing_ai_and_a_shared_state_folder_each_say_the_fix(tmp_path):
    config = box(tmp_path, command=["claude-not-installed-here"])
    state = tmp_path / "patchwire-state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    result = agent_cli("doctor", "-c", config)
    assert result.returncode == 1
    assert "FAIL ai: the AI command 'claude-not-installed-here' is not on the agent's PATH" in result.stdout
    assert "npm install -g @anthropic-ai/claude-code" in result.stdout
    assert f"FAIL state: {state} is readable by other users (mode 755)" in result.stdout
    assert f"fix: chmod 700 {state}" in result.stdout


def test_a_broken_config_is_one_failed_line_not_a_traceback(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[server]\nlisten = "nowhere"\n')
    result = agent_cli("doctor", "-c", str(config), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = checks(result)
    assert list(found) == ["config"] and "server.listen" in found["config"]["detail"]
