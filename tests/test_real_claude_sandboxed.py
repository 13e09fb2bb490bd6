"""The real Claude Code CLI under bubblewrap (issue 9): a whole job in the confined job
folder, its session kept for a follow-up, and a shell command it is allowed to run that
writes outside failing with the file system's own error."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

import patchwire_agent as pa
from claude_cli import DUMMY_API_KEY
from conftest import Laptop, make_repo
from test_real_claude import (CLAUDE_COMMAND, FILES, PROJECT, api, cli, connect, laptop,  # noqa: F401
                              offline_env, start_box, text, tool)

pytestmark = pytest.mark.slow


@pytest.fixture
def outside():
    # a folder the AI sees (read-only): /tmp, /var/tmp and the homes are hidden from it
    path = Path(tempfile.mkdtemp(prefix="pw-outside-", dir="/srv"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_claude_runs_confined(cli, start_box, laptop, outside):
    program, why = pa.probe_bwrap()
    if not program:
        pytest.skip(f"bubblewrap cannot run here: {why}")
    box = start_box(ai={"sandbox": "bwrap", "command": CLAUDE_COMMAND + ["--allowedTools", "Bash"]})
    connect(laptop, box)
    cwd = box.job_dir
    box.api.script([
        [tool("Write", file_path=str(cwd / "inside.txt"), content="inside\n")],
        [tool("Bash", command=f"touch {outside}/x", description="Write outside")],
        [tool("Bash", command="curl -sS http://refused.example/; exit 1", description="Reach out")],
        [text("Done.")],
    ])
    result = laptop.ask("write inside, then outside", "--yes", timeout=120)
    assert result.returncode == 0, result.err
    assert (laptop.root / "inside.txt").read_bytes() == b"inside\n"
    assert not (outside / "x").exists()
    job = laptop.last_job()
    events = box.agent.events(job)
    assert [e for e in events if e["type"] == "started"][0]["sandbox"] == "bwrap"
    errors = [e["text"] for e in events if e["type"] == "tool_error"]
    assert any("Read-only file system" in e for e in errors), errors
    # its own network namespace: the gateway answered the refused host, naming the setting
    assert any('refused.example:80 is not allowed ([network] mode = "allowlist")' in e for e in errors), errors
    assert {"type": "network_refused", "host": "refused.example", "count": 1} in [
        {k: e[k] for k in ("type", "host", "count") if k in e} for e in events]
    # its API calls went through the gateway, which put the box's key in place of a placeholder
    keys = {c.get("x-api-key") for c in box.api.credentials}
    assert keys == {DUMMY_API_KEY}, box.api.credentials
    network = box.agent.json("GET", f"/v1/jobs/{job}")[1]["result"]["network"]
    assert network["contacted"]["127.0.0.1"]["allowed"] >= 2 and network["refused"] == {"refused.example": 1}
    # its session lives in alice's own AI home, not in the box account's ~/.claude
    home = box.agent.state_dir / "users/alice/home"
    assert list(home.glob(".claude/projects/*/*.jsonl")) and (home / ".claude.json").exists()
    assert not list(Path(box.agent.env["HOME"]).glob(".claude/projects/*/*.jsonl"))
    # and survives there: a follow-up resumes it
    box.api.script([[text("Resumed.")]])
    follow = laptop.ask("and now?", "--continue", "--yes", timeout=120)
    assert follow.returncode == 0, follow.err
    assert "Resumed." in follow.err
    assert "write inside, then outside" in str(box.api.requests[-1]["messages"])  # the old turns came along


def test_one_users_claude_cannot_read_or_plant_in_anothers(cli, start_box, laptop, tmp_path):
    """Each user's Claude Code keeps its transcripts and settings in that user's own AI home:
    bob's Claude, told to read alice's transcript and plant a hook in her settings, finds
    neither; alice's next job (a --continue of her session) runs as before, without the hook."""
    program, why = pa.probe_bwrap()
    if not program:
        pytest.skip(f"bubblewrap cannot run here: {why}")
    # Claude Code's own guard off (it would refuse the writes out of the cwd itself): only the
    # walls of the sandbox stand between bob's AI and alice's home
    box = start_box(ai={"sandbox": "bwrap", "command": CLAUDE_COMMAND + ["--dangerously-skip-permissions"],
                        "env": {"IS_SANDBOX": "1"}}, users=("alice", "bob"))
    connect(laptop, box)
    box.api.script([[text("Noted: ALICE-SECRET-PLAN.")]])
    assert laptop.ask("remember ALICE-SECRET-PLAN", "--yes", timeout=120).returncode == 0
    alice_home = box.agent.state_dir / "users/alice/home"
    hook = '{"hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "touch /tmp/pwned"}]}]}}'
    bob = Laptop(make_repo(tmp_path / "bob" / PROJECT, FILES))
    bob.init(box.agent, user="bob")
    box.api.script([
        [tool("Bash", command=f"cat ~/.claude/projects/*/*.jsonl {alice_home}/.claude/projects/*/*.jsonl "
                              "> stolen.txt; true", description="Read alice's transcript")],
        [tool("Bash", command=f"echo '{hook}' > ~/.claude/settings.json; echo '{hook}' > {alice_home}/.claude/settings.json",
              description="Plant a hook")],
        [text("Done.")],
    ])
    result = bob.ask("steal", "--yes", timeout=120)
    assert result.returncode == 0, result.err
    assert b"ALICE-SECRET-PLAN" not in (bob.root / "stolen.txt").read_bytes()  # bob's own transcript only
    assert b"ALICE-SECRET-PLAN" in b"".join(p.read_bytes() for p in alice_home.glob(".claude/projects/*/*.jsonl"))
    assert not (alice_home / ".claude/settings.json").exists()  # bob's hook went to bob's own home
    assert "touch /tmp/pwned" in (box.agent.state_dir / "users/bob/home/.claude/settings.json").read_text()
    _, _, data = box.agent.request("GET", f"/v1/jobs/{bob.last_job()}/events?after=0&follow=0",
                                   token=box.agent.tokens["bob"])
    errors = [e["text"] for e in map(json.loads, data.splitlines()) if e["type"] == "tool_error"]
    assert any("No such file or directory" in e for e in errors), errors
    box.api.script([[text("Resumed.")]])
    follow = laptop.ask("and now?", "--continue", "--yes", timeout=120)
    assert follow.returncode == 0 and "Resumed." in follow.err, follow.err
    assert "ALICE-SECRET-PLAN" in str(box.api.requests[-1]["messages"])
