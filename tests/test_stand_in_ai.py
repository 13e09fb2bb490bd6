"""The built-in stand-in AI (`[ai] command = ["stand-in"]`, `init --ai stand-in`): a box can be
tried and taught without a Claude login. It speaks Claude Code's stream-json from the agent's
own Python, makes one deterministic change, and says in every place that it is not Claude."""
from __future__ import annotations

import json
import subprocess

import pytest

import patchwire_agent as pa
from conftest import Laptop, agent_source, make_repo, tomllib

LABEL = "stand-in AI, not Claude"


def test_init_with_the_stand_in_writes_it_labelled_and_doctor_says_it_is_not_claude(tmp_path):
    config = tmp_path / "agent.toml"
    made = agent_source("init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t"),
                        "--ai", "stand-in")
    assert made.returncode == 0, made.stderr
    text = config.read_text()
    assert tomllib.loads(text)["ai"]["command"] == ["stand-in"]
    assert "# [\"stand-in\"]: the built-in stand-in AI, not Claude" in text
    doctor = agent_source("doctor", "-c", str(config), "--json")
    ai = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}["ai"]
    assert ai["ok"] and ai["detail"].startswith(f"the built-in {LABEL}: each job adds the prompt to PATCHWIRE_DEMO.md")
    config.write_text(text.replace('    "stand-in",\n', '    "stand-in",\n    "--fast",\n'))
    bad = agent_source("doctor", "-c", str(config))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr + bad.stdout
    assert 'ai.command ["stand-in", "--fast"]: the built-in stand-in takes no arguments' in bad.stdout
    refused = agent_source("init", "-c", str(tmp_path / "b.toml"), "--ai", "gpt")
    assert refused.returncode == 2 and "invalid choice: 'gpt'" in refused.stderr


def test_the_stand_in_speaks_claude_codes_stream_json_and_appends_the_prompt(tmp_path):
    (tmp_path / "PATCHWIRE_DEMO.md").write_text("# kept\n")
    ran = subprocess.run(pa.stand_in_argv() + ["--resume", "s-1"], input=b"Add a\n  health check",
                         cwd=tmp_path, capture_output=True, timeout=30)
    assert ran.returncode == 0 and ran.stderr == b""
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["system", "assistant", "assistant", "user", "assistant", "result"]
    assert all(line["session_id"] == "s-1" for line in lines)  # a follow-up continues its session
    assert lines[0]["subtype"] == "init" and lines[0]["model"] == LABEL
    assert lines[2]["message"]["content"][0]["name"] == "Edit"
    assert lines[-1]["result"].startswith(f"[{LABEL}] Added one line") and lines[-1]["is_error"] is False
    assert (tmp_path / "PATCHWIRE_DEMO.md").read_bytes() == b"# kept\n- Add a health check\n"


@pytest.mark.parametrize("sandbox", ["none", "auto"])
def test_an_ask_of_the_stand_in_is_labelled_everywhere_and_applies_its_one_line(make_agent, tmp_path, sandbox):
    agent = make_agent(ai_command=["stand-in"], ai={"sandbox": sandbox})
    status, health = agent.json("GET", "/v1/health", token=None)
    assert status == 200 and health["ai"] == LABEL and health["ai_command"] == "stand-in" and health["ai_found"]
    root = make_repo(tmp_path / "app", {"README.md": b"# app\n"})
    lap = Laptop(root)
    lap.init(agent)
    doctor = lap.run("doctor")
    assert f"ok   ai: the box runs the {LABEL}: each ask adds its prompt to PATCHWIRE_DEMO.md" in doctor.out + doctor.err
    asked = lap.ask("Add a health check endpoint", "--yes", check=0)
    assert f"AI started ({LABEL})" in asked.err
    assert f"[{LABEL}] I add your request, on one line, to PATCHWIRE_DEMO.md." in asked.err
    assert (root / "PATCHWIRE_DEMO.md").read_bytes() == (
        f"# Requests noted by Patchwire's {LABEL}\n\n- Add a health check endpoint\n".encode())
    assert agent.json("GET", f"/v1/jobs/{lap.last_job()}")[1]["result"]["ai"] == LABEL
    assert f"ai:       {LABEL}\n" in lap.run("show", check=0).out
    events = agent.events(lap.last_job())
    started = next(e for e in events if e["type"] == "started")
    assert started["ai"] == LABEL and started["sandbox"] == ("none" if sandbox == "none" else started["sandbox"])
    assert next(e for e in events if e["type"] == "session")["model"] == LABEL
    assert all(LABEL in e["text"] for e in events if e["type"] == "text")
    again = lap.ask("Add a readiness check", "--yes", check=0)  # the same, once more: one more line
    assert "1 file" in again.err or "PATCHWIRE_DEMO.md" in again.err
    assert (root / "PATCHWIRE_DEMO.md").read_text().splitlines()[-2:] == [
        "- Add a health check endpoint", "- Add a readiness check"]
