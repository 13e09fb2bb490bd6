"""Issue 9's pure logic, in process: config defaults never shared, the AI's output parsed
defensively, a reader that cannot record ends the run as failed (with a real process),
events and status read together, private folders whatever the umask."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

import patchwire
import patchwire_agent as pa


def test_schema_defaults_are_not_shared_between_configs(tmp_path):
    schema = patchwire.Schema(tmp_path / "x.toml", "ai", pa.AI_SCHEMA)
    first, second = schema.read({}), schema.read({})
    first["command"].append("--oops")
    first["env"]["LEAK"] = "1"
    assert second["command"] == pa.CLAUDE_COMMAND and "--oops" not in pa.CLAUDE_COMMAND
    assert second["env"] == {} and pa.AI_SCHEMA["env"][1] == {}
    a = pa.AgentConfig(tmp_path / "a.toml", {})
    a.ai_command.append("--max-turns")
    assert pa.AgentConfig(tmp_path / "b.toml", {}).ai_command == pa.CLAUDE_COMMAND


def parsed(*lines: str) -> list:
    events: list = []
    parser = pa.StreamParser(events.append, Path("/job"))
    for line in lines:
        parser.feed(line.encode() + b"\n")
    return events


INIT = json.dumps({"type": "system", "subtype": "init", "session_id": "s1", "model": "m"})


@pytest.mark.parametrize("line", [
    '{"no_type": 1}', '{"type": null}', '{"type": ["a"]}', '"just a string"', "42",
    '{"type": "assistant", "message": []}', '{"type": "assistant", "message": "text"}',
    '{"type": "assistant", "message": {"content": [{"type": "tool_use", "input": "not a dict"}]}}',
    '{"type": "user", "message": 7}',
])
def test_unexpected_shapes_become_output_events(line):
    events = parsed(INIT, line, '{"type": "assistant", "message": {"content": [{"type": "text", "text": "after"}]}}')
    assert events[0]["type"] == "session"
    assert events[1] == {"type": "output", "text": line}
    assert events[2] == {"type": "text", "text": "after"}  # and the parser goes on


def test_a_result_line_of_odd_shape_still_judges():
    events: list = []
    parser = pa.StreamParser(events.append, Path("/job"))
    for line in (INIT, '{"type": "result", "subtype": "success", "is_error": false, "usage": "x", '
                       '"permission_denials": {"a": 1}, "session_id": 5}'):
        parser.feed(line.encode())
    assert parser.result["usage"] == {} and parser.result["permission_denials"] == []
    assert parser.session_id == "s1"  # a session id that is not a string is ignored
    summary = pa.summarize_result(parser.result, 1.0, 0)
    assert summary["tokens_in"] is None and summary["subtype"] == "success"


def test_a_reader_that_cannot_record_ends_the_run_as_failed(tmp_path):
    """The AI keeps printing; the store refuses the 3rd event (as a full disk does): the run
    ends as failed with that reason, not at its timeout, and the process is gone."""
    seen = []

    def emit(event):
        if len(seen) == 2:
            raise pa.sqlite3.OperationalError("database or disk is full")
        seen.append(event)

    ai = [sys.executable, "-c", "import sys\nwhile True: print('line', flush=True)"]
    run = pa.AIRun(ai, tmp_path, dict(os.environ), "prompt", timeout_s=600, emit=emit)
    status, reason, _ = run.run()  # the reason says it did not wait for the timeout
    assert (status, reason) == ("failed", "the agent could not record the AI's output: database or disk is full")
    assert run.proc.poll() is not None


def test_overlong_lines_are_cut_and_the_rest_skipped(tmp_path):
    events: list = []
    code = ("import sys; w = sys.stdout.write; w('a' * (5 * 2**20) + '\\n'); w('short\\n'); "
            "w('b' * (9 * 2**20)); w('\\n'); w('end\\n')")
    run = pa.AIRun([sys.executable, "-c", code], tmp_path, dict(os.environ), "", 60, events.append)
    assert run.run()[0] == "done"
    texts = [e["text"] for e in events]
    assert texts[1:] == ["short", texts[2], "end"] and texts[2].startswith("bbbb")
    assert texts[0].startswith("aaaa") and texts[0].endswith(" [...]") and len(texts[0]) == pa.MAX_EVENT_TEXT + 6


def test_events_and_status_are_read_together(tmp_path):
    store = pa.Store(tmp_path)
    store.create_job({"id": "j1", "user": "u", "project": "p", "prompt": "x", "status": "running",
                      "created": 1.0})
    store.add_event("j1", {"type": "text", "text": "hi"})
    assert [e["seq"] for e in store.events_and_status("j1", 0)[0]] == [1]
    store.add_event("j1", {"type": "finished"}, status="done")
    events, status = store.events_and_status("j1", 1)
    assert status == "done" and [e["type"] for e in events] == ["finished"]
    assert store.events_and_status("nope", 0) == ([], None)
    store.close()


def test_private_folders_and_files_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        state = tmp_path / "state"
        pa.make_private_dir(state)
        store = pa.Store(state)
        store.write_patch("j1", b"diff\n")
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "jobs.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "patches/j1.patch").stat().st_mode) == 0o600
