"""The real Claude Code CLI, run offline against tests/messages_api.py on loopback.

These tests pin down the CLI behaviour Patchwire's agent relies on: the stream-json lines, exit
codes and ``is_error`` per failure, ``--max-turns``, ``--resume``, and which tools
``--permission-mode acceptEdits`` lets through. They need ``tests/install_claude_cli.sh`` to have
run; without it they skip, except on CI (``CI=true``) where a missing CLI is a failure.

The stand-in's own tests at the bottom need no CLI.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest

from claude_cli import claude_env, require_claude_cli
from messages_api import EXHAUSTED_TEXT, FakeMessagesAPI

RUN_TIMEOUT = 60       # seconds; a normal run takes about 1 s
FAILURE_BUDGET = 10    # seconds an API failure may take to surface with bounded retries

slow = pytest.mark.slow  # each real CLI run costs about a second


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures

class Run:
    """One finished CLI run: exit code, parsed stream-json lines, stderr, wall time."""

    def __init__(self, proc: subprocess.CompletedProcess, elapsed: float):
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        self.elapsed = elapsed
        self.events: List[Dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()
                                             if line.strip()]

    def of_type(self, kind: str) -> List[Dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    @property
    def init(self) -> Dict[str, Any]:
        inits = [e for e in self.of_type("system") if e.get("subtype") == "init"]
        assert inits, "no system/init line in %r" % self.events
        return inits[0]

    @property
    def result(self) -> Dict[str, Any]:
        assert self.events and self.events[-1]["type"] == "result", self.events[-1:]
        return self.events[-1]

    def tool_uses(self) -> List[Dict[str, Any]]:
        return [block for e in self.of_type("assistant") for block in e["message"]["content"]
                if block["type"] == "tool_use"]

    def tool_results(self) -> List[Dict[str, Any]]:
        return [block for e in self.of_type("user") for block in e["message"]["content"]
                if isinstance(block, dict) and block.get("type") == "tool_result"]


@pytest.fixture
def cli() -> str:
    return require_claude_cli()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"  # not a git repo: the CLI must not need one
    path.mkdir()
    return path


@pytest.fixture
def api():
    with FakeMessagesAPI() as server:
        yield server


@pytest.fixture
def run(cli: str, api: FakeMessagesAPI, workdir: Path, tmp_path: Path):
    """Run the CLI headless in ``workdir`` with the prompt on stdin; extra flags as arguments."""
    home = tmp_path / "home"

    def run_claude(prompt: str, *flags: str, **env_extra: str) -> Run:
        argv = [cli, "--print", "--output-format", "stream-json", "--verbose",
                "--permission-mode", "acceptEdits", *flags]
        started = time.monotonic()
        proc = subprocess.run(argv, input=prompt, capture_output=True, text=True, cwd=workdir,
                              env=claude_env(home, api.base_url, **env_extra),
                              timeout=RUN_TIMEOUT)
        return Run(proc, time.monotonic() - started)

    return run_claude


def text(value: str) -> Dict[str, Any]:
    return {"type": "text", "text": value}


def tool(name: str, **tool_input: Any) -> Dict[str, Any]:
    return {"type": "tool_use", "name": name, "input": tool_input}


# ---------------------------------------------------------------------------------------------
# The CLI against the stand-in

@slow
def test_write_edit_bash_change_files_as_scripted(run, api, workdir):
    new, old, gone = workdir / "new.txt", workdir / "old.txt", workdir / "gone.txt"
    old.write_text("alpha\nbeta\n")
    gone.write_text("bye\n")
    api.script([
        [text("I'll create it."), tool("Write", file_path=str(new), content="one\ntwo\n")],
        # Two tools in one turn; Edit of a file needs a Read of it first (or its own Write).
        [tool("Read", file_path=str(old)),
         tool("Edit", file_path=str(new), old_string="two", new_string="three")],
        [tool("Edit", file_path=str(old), old_string="beta", new_string="gamma")],
        [tool("Bash", command="rm gone.txt", description="Remove gone.txt")],
        [text("Done.")],
    ])

    r = run("Make the changes.")

    assert r.returncode == 0, (r.stderr, r.events[-1:])
    assert new.read_text() == "one\nthree\n"
    assert old.read_text() == "alpha\ngamma\n"
    assert not gone.exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["new.txt", "old.txt"]

    assert r.init["cwd"] == str(workdir)
    assert r.init["permissionMode"] == "acceptEdits"
    assert {"Write", "Edit", "Bash", "Read"} <= set(r.init["tools"])
    assert [t["name"] for t in r.tool_uses()] == ["Write", "Read", "Edit", "Edit", "Bash"]
    assert all(t["id"].startswith("toolu_") for t in r.tool_uses())
    results = r.tool_results()
    assert len(results) == 5 and not any(res.get("is_error") for res in results), results

    result = r.result
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["result"] == "Done."
    assert result["session_id"] == r.init["session_id"]
    # num_turns is not the number of API calls: 2.1.197 counts one more than the tool results
    # (6 here, for 5 calls with 5 tools), so only its lower bound is asserted.
    assert result["num_turns"] >= len(api.requests) == 5
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0
    assert result["total_cost_usd"] > 0
    assert result["permission_denials"] == []
    assert api.pending == 0
    assert r.elapsed < 20


@slow
def test_each_main_request_streams_with_tools_and_the_prompt(run, api):
    api.script([[text("Hello.")]])

    r = run("Say hello.")

    assert r.returncode == 0 and r.result["result"] == "Hello."
    (body,) = api.requests
    assert body["stream"] is True and body["tools"]
    assert "Say hello." in json.dumps(body["messages"])
    # With nonessential traffic off there are no title or event-logging calls.
    assert api.side_requests == []
    assert {path for _, path in api.hits} <= {"/", "/v1/messages?beta=true"}


@slow
def test_bash_outside_file_commands_is_denied_without_allowed_tools(run, api, workdir):
    command = "python3 -c \"open('made.txt', 'w').write('x')\""
    api.script([[tool("Bash", command=command, description="Make a file")], [text("Done.")]])

    r = run("Make a file.")

    # A denial is not an error for the CLI: exit 0, is_error false, but permission_denials says it.
    assert r.returncode == 0 and r.result["is_error"] is False
    assert [d["tool_name"] for d in r.result["permission_denials"]] == ["Bash"]
    assert r.tool_results()[0]["is_error"] is True
    assert not (workdir / "made.txt").exists()


@slow
def test_bash_runs_with_allowed_tools(run, api, workdir):
    command = "python3 -c \"open('made.txt', 'w').write('x')\""
    api.script([[tool("Bash", command=command, description="Make a file")], [text("Done.")]])

    r = run("Make a file.", "--allowedTools", "Bash")

    assert r.returncode == 0 and r.result["permission_denials"] == []
    assert (workdir / "made.txt").read_text() == "x"


@slow
@pytest.mark.parametrize("status, words", [(500, "500"), (529, "529"),
                                           (401, "authenticate"), (429, "429")])
def test_api_error_fails_fast_with_is_error(run, api, workdir, status, words):
    api.script([{"error": status}] * 3)

    r = run("Anything.")

    assert r.returncode == 1
    assert r.stderr == ""
    result = r.result
    # API errors keep subtype "success": is_error and the exit code are what say it failed.
    assert result["is_error"] is True and result["subtype"] == "success"
    assert result["api_error_status"] == status
    assert words in result["result"]
    assert len(api.requests) == 1  # CLAUDE_CODE_MAX_RETRIES=0: no retry
    assert list(workdir.iterdir()) == []
    assert r.elapsed < FAILURE_BUDGET


@slow
def test_max_retries_bounds_retries_of_server_errors(run, api):
    api.script([{"error": 500}] * 5)

    r = run("Anything.", CLAUDE_CODE_MAX_RETRIES="2")

    assert r.returncode == 1 and r.result["is_error"] is True
    assert len(api.requests) == 3
    assert r.elapsed < FAILURE_BUDGET


@slow
def test_max_turns_stops_after_first_turns_tools_ran(run, api, workdir):
    target = workdir / "first.txt"
    api.script([[tool("Write", file_path=str(target), content="1\n")], [text("Done.")]])

    r = run("Two turns, please.", "--max-turns", "1")

    assert r.returncode == 1
    assert r.result["subtype"] == "error_max_turns" and r.result["is_error"] is True
    assert "result" not in r.result  # no final text on this path
    assert target.read_text() == "1\n"  # the first turn's tool already ran
    assert api.pending == 1


@slow
def test_resume_sends_the_earlier_turns(run, api):
    api.script([[text("The answer is 42.")]])
    first = run("What is the answer?")
    assert first.returncode == 0
    session_id = first.result["session_id"]

    api.script([[text("You asked about the answer.")]])
    second = run("What did I ask?", "--resume", session_id)

    assert second.returncode == 0 and second.result["result"] == "You asked about the answer."
    sent = json.dumps(api.requests[-1]["messages"])
    assert "What is the answer?" in sent
    assert "The answer is 42." in sent
    assert "What did I ask?" in sent
    # The history is sent as messages (the first prompt wrapped with context in the first user
    # message; 2.1.197 even slips in a message with role "system"), the new prompt last.
    messages = api.requests[-1]["messages"]
    assert [m["role"] for m in messages[-2:]] == ["assistant", "user"]
    assert "What did I ask?" in json.dumps(messages[-1])


# ---------------------------------------------------------------------------------------------
# The stand-in alone (no CLI)

def _post(url: str, body: Dict[str, Any]):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=5)


def _sse_events(raw: str) -> List[Dict[str, Any]]:
    events = []
    for frame in raw.strip().split("\n\n"):
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append(json.loads(data[len("data: "):]))
        assert events[-1]["type"] == name[len("event: "):]
    return events


def test_stand_in_streams_the_api_event_sequence():
    with FakeMessagesAPI([[text("Hi."), tool("Write", file_path="/x", content="y")]]) as api:
        with _post(api.base_url + "/v1/messages?beta=true",
                   {"model": "m", "stream": True, "tools": [{"name": "Write"}],
                    "messages": [{"role": "user", "content": "go"}]}) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = _sse_events(resp.read().decode())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["role"] == "assistant"
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "Write" and starts[1]["id"].startswith("toolu_")
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["index"] == 1)
    assert json.loads(partial) == {"file_path": "/x", "content": "y"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"]["output_tokens"] > 0


def test_stand_in_answers_errors_side_requests_and_unknown_paths():
    with FakeMessagesAPI([{"error": 401}]) as api:
        url = api.base_url + "/v1/messages"
        with _post(url, {"model": "m", "messages": []}) as resp:  # no tools: a side request
            assert json.load(resp)["content"][0]["type"] == "text"
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(url, {"model": "m", "tools": [{"name": "Bash"}], "messages": []})
        assert err.value.code == 401
        assert json.load(err.value) == {"type": "error", "error": {
            "type": "authentication_error", "message": "stand-in authentication_error (401)"}}
        with _post(url, {"model": "m", "tools": [{"name": "Bash"}], "messages": []}) as resp:
            message = json.load(resp)
        assert message["content"] == [text(EXHAUSTED_TEXT)]
        assert message["stop_reason"] == "end_turn"
        with _post(url + "/count_tokens", {"messages": [{"role": "user", "content": "x"}]}) as r:
            assert json.load(r)["input_tokens"] > 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(api.base_url + "/v1/models", timeout=5)
        assert err.value.code == 404 and json.load(err.value)["error"]["type"] == "not_found_error"
        assert len(api.requests) == 2 and len(api.side_requests) == 1
