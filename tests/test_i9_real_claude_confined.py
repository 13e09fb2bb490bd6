"""The real Claude Code CLI under bubblewrap (issue 9): a whole job in the confined job
folder, its session kept for a follow-up, and a shell command it is allowed to run that
writes outside failing with the file system's own error."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import patchwire_agent as pa
from test_real_claude import (CLAUDE_COMMAND, api, cli, connect, laptop, offline_env,  # noqa: F401
                              start_box, text, tool)

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
