"""Pure logic of the box agent (patchwire_agent.py), in process: config defaults never shared,
the AI's output parsed defensively (Claude's stream-json lines into events, how a run ended), a
reader that cannot record ends the run as failed (with a real process), events and status read
together, private folders whatever the umask, the fair queue, the job folder's clean check, and
git's numstat counted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import patchwire
import patchwire_agent as pa
from test_box_walls import hand_to_account, in_child_as_account

# ------------------------------------------------------------------ config, the AI's output, the store


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


# ------------------------------------------------------------------ the fair queue


def item(job: str, user: str, project: str = "p") -> pa.QueueItem:
    return pa.QueueItem(job, user, project)


def test_queue_is_round_robin_over_users():
    queue = pa.FairQueue()
    for job, user in (("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("c1", "carol")):
        queue.put(item(job, user))
    assert queue.order() == ["a1", "b1", "c1", "a2", "a3"]
    taken = [queue.take(lambda i: True).job_id for _ in range(5)]
    assert taken == ["a1", "b1", "c1", "a2", "a3"]


def test_queue_skips_a_busy_project_and_serves_the_next():
    queue = pa.FairQueue()
    queue.put(item("a1", "alice", "busy"))
    queue.put(item("a2", "alice", "free"))
    queue.put(item("b1", "bob", "busy"))
    first = queue.take(lambda i: i.project != "busy")
    assert first.job_id == "a2"
    assert queue.order() == ["b1", "a1"]  # alice was served: bob's turn comes first now


def test_queue_remove_and_close():
    queue = pa.FairQueue()
    queue.put(item("a1", "alice"))
    assert queue.remove("a1") and not queue.remove("a1")
    assert queue.order() == []
    queue.close()
    assert queue.take(lambda i: True) is None


# ------------------------------------------------------------------ the job folder's clean check


@pytest.fixture
def prepared(tmp_path):
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    repo.ensure()
    (repo.mirror / "a.txt").write_bytes(b"a\n")
    (repo.mirror / ".gitignore").write_bytes(b"build/\n")
    git = repo.git(repo.mirror, GIT_INDEX_FILE=str(repo.home / "t.index"))
    git("add", "-A", "-f", ".")
    tree = git.text("write-tree")
    manifest = [(m, s, p) for p, (m, s) in sorted(git.ls_files_stage().items())]
    commit = repo.snapshot(tree, manifest)
    folder = repo.prepare_slot(0, commit)
    return repo, commit, folder


def test_a_warm_job_folder_is_made_exactly_the_snapshot(prepared):
    repo, commit, folder = prepared
    (folder / "build").mkdir()
    (folder / "build" / "cache").write_bytes(b"ignored: fine")
    (folder / "stray.txt").write_bytes(b"left over")
    (folder / "a.txt").write_bytes(b"changed\n")
    (folder / "nested").mkdir()
    subprocess.run(["git", "init", "-q", str(folder / "nested")], check=True)
    assert repo.prepare_slot(0, commit) == folder
    assert (folder / "build" / "cache").read_bytes() == b"ignored: fine"
    assert not (folder / "stray.txt").exists() and not (folder / "nested").exists()
    assert (folder / "a.txt").read_bytes() == b"a\n"
    repo._check_slot_clean(0, commit)
    with pytest.raises(patchwire.PatchwireError, match="HEAD is not at"):
        repo._check_slot_clean(0, "0" * 40)


def forge_index_entry(repo, folder, path: str, blob: str) -> None:
    """What an AI that reaches the git dir can do: stage its change (real stat data of the
    changed file), then write the snapshot's blob id over the staged one and fix the index's
    checksum: git now believes the changed file is the snapshot's."""
    gitdir = repo.git_dir / "worktrees" / "slot0"
    git = ["git", "--git-dir", str(gitdir), "--work-tree", str(folder), "-c", "core.splitIndex=false"]
    then = time.time() - 10  # older than the index: not "racily clean", so git trusts its stat data
    os.utime(folder / path, (then, then))
    subprocess.run(git + ["update-index", "--add", "--", path], check=True)
    staged = subprocess.run(git + ["ls-files", "-s", "--", path], check=True, capture_output=True).stdout.split()[1]
    data = (gitdir / "index").read_bytes()[:-20]
    assert data.count(bytes.fromhex(staged.decode())) == 1
    data = data.replace(bytes.fromhex(staged.decode()), bytes.fromhex(blob))
    (gitdir / "index").write_bytes(data + hashlib.sha1(data).digest())
    assert subprocess.run(git + ["diff-files", "--quiet"]).returncode == 0  # the forgery holds


def test_a_job_folder_with_a_forged_index_is_still_made_exactly_the_snapshot(prepared):
    repo, commit, folder = prepared
    (folder / "a.txt").write_bytes(b"poisoned\n")
    forge_index_entry(repo, folder, "a.txt", repo.git().text("rev-parse", f"{commit}:a.txt"))
    assert repo.prepare_slot(0, commit) == folder
    assert (folder / "a.txt").read_bytes() == b"a\n"


def test_a_change_hidden_by_a_forged_index_is_in_the_patch_and_gone_after(prepared, tmp_path):
    repo, commit, folder = prepared
    (folder / "a.txt").write_bytes(b"poisoned\n")
    forge_index_entry(repo, folder, "a.txt", repo.git().text("rev-parse", f"{commit}:a.txt"))
    with open(tmp_path / "patch", "wb") as patch:
        stats, result = repo.collect(0, commit, "job1", patch, 1 << 20)
    assert stats == {"files": 1, "added": 1, "removed": 1, "binary": 0}
    assert b"-a\n+poisoned\n" in (tmp_path / "patch").read_bytes()
    assert repo.git()("show", f"{result}:a.txt") == b"poisoned\n"
    repo.prepare_slot(0, commit)
    assert (folder / "a.txt").read_bytes() == b"a\n"


def snapshot_of(repo, files: dict) -> str:
    """The mirror made exactly `files` ({path: bytes, or ("link", target), or ("exec", bytes)}), snapshotted."""
    pa.remove_tree(repo.mirror)
    repo.mirror.mkdir()
    write_files(repo.mirror, files)
    (repo.home / "t.index").unlink(missing_ok=True)
    git = repo.git(repo.mirror, GIT_INDEX_FILE=str(repo.home / "t.index"))
    git("add", "-A", "-f", ".")
    manifest = [(m, s, p) for p, (m, s) in sorted(git.ls_files_stage().items())]
    return repo.snapshot(git.text("write-tree"), manifest)


def git_commands(monkeypatch) -> list:
    """The git commands the agent runs from here on (their first word), in order."""
    seen: list = []
    run = patchwire.Git.run
    monkeypatch.setattr(patchwire.Git, "run", lambda self, *args, **kw: seen.append(args[0]) or run(self, *args, **kw))
    return seen


def assert_folder_is(repo, folder, commit: str) -> None:
    """HEAD, the index and the folder are exactly `commit` (ignored files aside)."""
    git = repo.slot_git(0, GIT_OPTIONAL_LOCKS="0")
    assert (repo.git_dir / "worktrees/slot0/HEAD").read_text() == commit + "\n"
    assert git("status", "--porcelain", "-z", "--untracked-files=all") == b""
    # write-tree may write the index: a copy (beside it: its shared index is found there), so the seal holds
    copy = repo.git_dir / "worktrees/slot0/copy.index"
    shutil.copyfile(repo.git_dir / "worktrees/slot0/index", copy)
    assert repo.git(GIT_INDEX_FILE=str(copy)).text("write-tree") == repo.tree_of(commit)
    copy.unlink()


def cached_root_tree(index: Path) -> tuple:
    """(entries, tree id) of the root in an index's cache of trees (its TREE extension, after
    the entries; -1 entries: not valid). Entries end 8-byte aligned in a version 2 index, so the
    extension is found at a signature that follows one."""
    data = index.read_bytes()
    at = data.find(b"TREE\0")
    while at >= 0 and not data[at + 8:at + 9] == b"\0":
        at = data.find(b"TREE", at + 1)
    assert at >= 0, "no cache of trees in the index"
    body = data[at + 9:]  # the root's record: "" NUL, "<entries> <subtrees>\n", then its id when valid
    head, _, rest = body.partition(b"\n")
    entries = int(head.split(b" ")[0])
    return entries, (rest[:20].hex() if entries >= 0 else None)


SNAP1 = {"a.txt": b"a\n", "d/f": b"f\n", "x/a": b"xa\n", "x/b": b"xb\n", "k": b"k\n", "l": ("link", "k"),
         "run.sh": b"echo\n", ".gitignore": b"build/\n"}
SNAP2 = {"a.txt": b"a\n", "d": b"now a file\n", "x": b"x file\n", "l/in": b"in a folder\n", "k": b"k2\n",
         "run.sh": ("exec", b"echo\n"), ".gitignore": b"build/\n", "new/deep/n.txt": b"n\n"}


# how a folder moves by the changed paths: git's two-tree merge (many moved), or by the paths (few)
MOVES = {"merge": (10 ** 9, ["read-tree"]), "paths": (0, ["update-index", "checkout-index"])}


@pytest.mark.parametrize("way", list(MOVES))
def test_a_warm_job_folder_moves_by_the_changed_paths_only(prepared, tmp_path, monkeypatch, way):
    repo, _, folder = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)  # as for a large project
    share, moves = MOVES[way]
    monkeypatch.setattr(repo, "MERGE_MOVE_SHARE", share)
    first = snapshot_of(repo, SNAP1)
    repo.prepare_slot(0, first)
    (folder / "build").mkdir(exist_ok=True)
    (folder / "build" / "cache").write_bytes(b"kept")
    (folder / "a.txt").write_bytes(b"the AI's\n")  # the job's change, collected
    (folder / "ai.txt").write_bytes(b"new\n")
    (folder / "x" / "b").unlink()
    (folder / "newdir" / "sub").mkdir(parents=True)
    (folder / "newdir" / "sub" / "f").write_bytes(b"deep\n")
    (folder / "build" / "ignored.txt").write_bytes(b"never collected\n")
    with open(tmp_path / "patch", "wb") as patch:
        stats, result = repo.collect(0, first, "job1", patch, 1 << 20)
    assert stats == {"files": 4, "added": 3, "removed": 2, "binary": 0}
    # written without a process: the very commit `git commit-tree` makes, and its ref
    made = repo.git().text("commit-tree", repo.tree_of(result), "-p", first, "-m", "patchwire job job1")
    assert made == result == repo.git().text("rev-parse", "refs/patchwire/jobs/job1")
    assert repo.git().text("diff-tree", "-r", "--name-status", first, result).split("\n") == [
        "M\ta.txt", "A\tai.txt", "A\tnewdir/sub/f", "D\tx/b"]
    second = snapshot_of(repo, SNAP2)
    seen = git_commands(monkeypatch)
    assert repo.prepare_slot(0, second) == folder
    assert seen == ["status", "diff-tree", *moves]  # no checkout -f, no clean
    # by a merge the index's cache of trees stays whole: the result's write-tree reads no folder
    # the AI left alone (by paths each changed folder's tree is left to it)
    cached = cached_root_tree(repo.git_dir / "worktrees/slot0/index")
    assert cached == ((len(SNAP2), repo.tree_of(second)) if way == "merge" else (-1, None))
    assert_folder_is(repo, folder, second)
    assert (folder / "a.txt").read_bytes() == b"a\n" and not (folder / "ai.txt").exists()
    assert (folder / "d").read_bytes() == b"now a file\n" and (folder / "l" / "in").read_bytes() == b"in a folder\n"
    assert os.access(folder / "run.sh", os.X_OK) and (folder / "build" / "cache").read_bytes() == b"kept"
    # and back: a folder where a file was, a link where a folder was
    seen.clear()
    repo.prepare_slot(0, first)
    assert seen == ["status", "diff-tree", *moves]
    assert_folder_is(repo, folder, first)
    assert os.readlink(folder / "l") == "k" and (folder / "x" / "b").read_bytes() == b"xb\n"


@pytest.mark.parametrize("way", list(MOVES))
def test_an_ignored_file_where_a_tracked_one_comes_takes_the_snapshots_content(prepared, monkeypatch, way):
    """A build's output, ignored, where the new snapshot tracks a file: the move writes the
    snapshot's file over it (git's two-tree merge treats an ignored file as expendable)."""
    repo, _, folder = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    share, moves = MOVES[way]
    monkeypatch.setattr(repo, "MERGE_MOVE_SHARE", share)
    repo.prepare_slot(0, snapshot_of(repo, SNAP1))
    (folder / "build").mkdir(exist_ok=True)
    (folder / "build" / "out").write_bytes(b"a build's output\n")
    second = snapshot_of(repo, {**SNAP1, "build/out": b"tracked now\n"})
    seen = git_commands(monkeypatch)
    repo.prepare_slot(0, second)
    assert seen == ["status", "diff-tree", *moves]
    assert (folder / "build" / "out").read_bytes() == b"tracked now\n"
    assert_folder_is(repo, folder, second)


@pytest.mark.parametrize("who", ["root", "account"])
@pytest.mark.parametrize("way", list(MOVES))
def test_an_ignored_link_an_earlier_ai_left_leads_no_move_outside(srv_place, monkeypatch, way, who):
    """An AI that ran unconfined left an ignored symlink to a folder outside (`out -> /elsewhere`),
    and the next snapshot tracks a file beneath that name: the move writes it in the job folder,
    never through the link, whichever way it moves; as root and as an ordinary account."""
    share, moves = MOVES[way]
    elsewhere = srv_place / "elsewhere"
    elsewhere.mkdir()

    def body() -> None:
        repo = pa.ProjectRepo(srv_place / "state", "alice", "demo")
        repo.ensure()
        monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
        monkeypatch.setattr(repo, "MERGE_MOVE_SHARE", share)
        snap = {**SNAP1, ".gitignore": b"build/\nout\n"}
        folder = repo.prepare_slot(0, snapshot_of(repo, snap))
        (folder / "out").symlink_to(elsewhere)
        assert repo.check_ahead(0)  # ignored: the folder is its index
        second = snapshot_of(repo, {**snap, "out/x": b"tracked beneath\n"})
        seen = git_commands(monkeypatch)
        repo.prepare_slot(0, second)
        assert seen == ["diff-tree", *moves]
        assert list(elsewhere.iterdir()) == []
        assert not (folder / "out").is_symlink() and (folder / "out" / "x").read_bytes() == b"tracked beneath\n"
        assert_folder_is(repo, folder, second)
    if who == "root":
        body()
    else:
        hand_to_account(srv_place)
        in_child_as_account(body)


def test_a_moved_gitignore_or_a_stray_file_resets_the_folder_whole(prepared, monkeypatch):
    repo, _, folder = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    first = snapshot_of(repo, SNAP1)
    repo.prepare_slot(0, first)
    (folder / "build").mkdir(exist_ok=True)
    (folder / "build" / "out").write_bytes(b"ignored until the .gitignore goes")
    second = snapshot_of(repo, {**SNAP1, ".gitignore": b"# nothing ignored\n"})
    seen = git_commands(monkeypatch)
    repo.prepare_slot(0, second)
    assert "checkout" in seen and "clean" in seen
    assert not (folder / "build").exists()  # no longer ignored: not the snapshot's, cleaned away
    assert_folder_is(repo, folder, second)
    (folder / "stray.txt").write_bytes(b"written after the agent's last git call")
    seen.clear()
    repo.prepare_slot(0, first)
    assert seen[:1] == ["status"] and "clean" in seen and not (folder / "stray.txt").exists()
    assert_folder_is(repo, folder, first)


def test_a_folder_checked_ahead_moves_without_a_status_of_its_own(prepared, monkeypatch):
    """check_ahead makes _move_slot's status while the laptop still scans and sends; the job's
    prepare_slot then skips it: once, and only while nothing took or reset the folder or wrote
    its index since."""
    repo, _, folder = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    first = snapshot_of(repo, SNAP1)
    repo.prepare_slot(0, first)
    second = snapshot_of(repo, SNAP2)
    seen = git_commands(monkeypatch)
    assert repo.check_ahead(0) and seen == ["status"]
    seen.clear()
    repo.prepare_slot(0, second)
    assert seen == ["diff-tree", "read-tree"]
    assert_folder_is(repo, folder, second)
    seen.clear()
    repo.prepare_slot(0, first)  # a check ahead is used once
    assert seen[:1] == ["status"]
    assert_folder_is(repo, folder, first)

    # not clean when checked: nothing is remembered, and the job's own check resets the folder
    (folder / "stray.txt").write_bytes(b"left by an earlier run")
    assert not repo.check_ahead(0)
    seen.clear()
    repo.prepare_slot(0, second)
    assert seen[:1] == ["status"] and "clean" in seen and not (folder / "stray.txt").exists()
    assert_folder_is(repo, folder, second)

    # the folder reset since the check (a job that failed is cleaned): checked again
    assert repo.check_ahead(0)
    repo.clean_slot(0)
    seen.clear()
    repo.prepare_slot(0, first)
    assert seen[:1] == ["status"]
    # its index written since the check (by anything: its inode, size, mtime and ctime): not used
    assert repo.check_ahead(0)
    os.utime(repo.git_dir / "worktrees" / "slot0" / "index")
    assert not repo._checked_ahead(0)


def test_a_job_whose_folder_is_being_checked_ahead_waits_for_that_check(prepared, monkeypatch):
    """An ask that comes while its folder's check ahead still runs (a small change goes with
    the ask itself, no rsync first) waits for that check rather than running a second status
    beside it."""
    repo, _, folder = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    repo.prepare_slot(0, snapshot_of(repo, SNAP1))
    second = snapshot_of(repo, SNAP2)
    run, seen = patchwire.Git.run, []

    def slow_status(self, *args, **kw):
        seen.append(args[0])
        if args[0] == "status":
            time.sleep(0.5)
        return run(self, *args, **kw)
    monkeypatch.setattr(patchwire.Git, "run", slow_status)
    checking = threading.Thread(target=repo.check_ahead, args=(0,))
    checking.start()
    deadline = time.monotonic() + 10
    while 0 not in repo._checking and time.monotonic() < deadline:
        time.sleep(0.005)
    repo.prepare_slot(0, second)
    checking.join(10)
    assert seen == ["status", "diff-tree", "read-tree"]
    assert_folder_is(repo, folder, second)


def test_a_user_asking_me_again_and_again_starts_one_check_at_a_time(tmp_path, monkeypatch):
    """GET /v1/me in a loop (a client, or a user's script): while a check of the project's
    folder runs, no second one starts."""
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {
        "server": {"state_dir": str(tmp_path / "state")}, "ai": {"command": ["true"], "sandbox": "none"},
        "users": {"alice": {"token_sha256": pa.token_digest("t").hex()}}})
    agent = pa.Agent(cfg)
    try:
        repo = agent.repo("alice", "demo")
        release, calls = threading.Event(), []
        monkeypatch.setattr(repo, "check_ahead", lambda slot: calls.append(slot) or release.wait(10))
        for _ in range(20):
            agent.me("alice", "demo")
        release.set()
        deadline = time.monotonic() + 10
        while agent.checking_ahead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [0] and not agent.checking_ahead
    finally:
        agent.stop()


def test_a_check_ahead_that_a_job_overtakes_is_dropped(prepared, monkeypatch):
    """A job takes the folder while the check ahead runs: what the check saw may be the folder
    that job is changing, so it is not remembered."""
    repo, _, _ = prepared
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    repo.prepare_slot(0, snapshot_of(repo, SNAP1))
    run, taken = patchwire.Git.run, []

    def overtaken(self, *args, **kw):
        out = run(self, *args, **kw)
        if args[0] == "status" and not taken:
            taken.append(True)
            with repo.lock:
                repo._used(0)  # what prepare_slot, clean_slot and reset_slot_to do first
        return out
    monkeypatch.setattr(patchwire.Git, "run", overtaken)
    assert not repo.check_ahead(0) and taken and repo._ahead == {}


def test_the_agent_checks_ahead_the_folder_an_ask_will_take_when_the_laptop_asks_me(tmp_path, monkeypatch):
    cfg = pa.AgentConfig(tmp_path / "agent.toml", {
        "server": {"state_dir": str(tmp_path / "state")},
        "ai": {"command": ["true"], "sandbox": "none"}, "jobs": {"slots": 2},
        "users": {"alice": {"token_sha256": pa.token_digest("t").hex()}}})
    agent = pa.Agent(cfg)  # no workers
    try:
        repo = agent.repo("alice", "demo")
        repo.ensure()
        monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
        repo.prepare_slot(0, snapshot_of(repo, SNAP1))

        def settled() -> None:
            deadline = time.monotonic() + 30
            while agent.checking_ahead and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not agent.checking_ahead
        assert agent.me("alice", "demo")["mirror"] == str(repo.mirror)
        settled()
        assert list(repo._ahead) == [0]
        repo._ahead.clear()
        agent.busy[("alice", "demo")] = {0}  # a job holds slot 0: slot 1 is the next ask's (no folder yet)
        agent.me("alice", "demo")
        settled()
        assert repo._ahead == {}
        agent.busy[("alice", "demo")] = {0, 1}  # every folder busy: no check at all
        agent.me("alice", "demo")
        assert not agent.checking_ahead and repo._ahead == {}
        agent.me("alice", None)  # no project named: nothing to check
        assert not agent.checking_ahead
    finally:
        agent.stop()


# ------------------------------------------------------------------ the first job folder: the mirror moved


@pytest.fixture
def first_ask(tmp_path, monkeypatch):
    """A project that has no job folder yet, its first snapshot SNAP1 taken (every project
    counts as large enough to adopt its mirror)."""
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    monkeypatch.setattr(repo, "ADOPT_MIN_FILES", 0)
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    repo.ensure()
    return repo, snapshot_of(repo, SNAP1)


def inodes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.lstat().st_ino for p in folder.rglob("*") if not p.is_dir()}


def test_a_first_job_folder_is_the_mirror_moved_into_place_not_written_again(first_ask, monkeypatch):
    repo, first = first_ask
    before = inodes(repo.mirror)
    seen = git_commands(monkeypatch)
    folder = repo.prepare_slot(0, first)
    assert "checkout" not in seen and "checkout-index" not in seen and "clean" not in seen, seen
    assert {p: i for p, i in inodes(folder).items() if p != ".git"} == before  # the very files
    assert_folder_is(repo, folder, first)
    assert os.readlink(folder / "l") == "k" and (folder / "run.sh").read_bytes() == b"echo\n"
    assert repo.mirror.is_dir() and list(repo.mirror.iterdir()) == []  # a new, empty mirror
    assert (repo.home / "mirror.sparse").exists()
    # an AI's change is collected, and the folder moves on to the next snapshot by its paths
    (folder / "a.txt").write_bytes(b"the AI's\n")
    with open(repo.home / "patch", "wb") as patch:
        stats, _ = repo.collect(0, first, "job1", patch, 1 << 20)
    assert stats["files"] == 1 and b"+the AI's" in (repo.home / "patch").read_bytes()
    # the laptop's next sync sends only what changed, into the empty mirror: an ask of changes
    (repo.mirror / "k").write_bytes(b"k2\n")
    second = repo.snapshot_changes(tree_of_files(repo, {**SNAP1, "k": b"k2\n"}), repo.tree_of(first), ["k"], [])
    assert repo.prepare_slot(0, second) == folder
    assert_folder_is(repo, folder, second)
    assert (folder / "a.txt").read_bytes() == b"a\n" and (folder / "k").read_bytes() == b"k2\n"


def write_files(folder: Path, files: dict) -> None:
    """`files` ({path: bytes, or ("link", target), or ("exec", bytes)}) written into `folder`."""
    for path, data in files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, tuple) and data[0] == "link":
            os.symlink(data[1], target)
        else:
            target.write_bytes(data[1] if isinstance(data, tuple) else data)
            target.chmod(0o755 if isinstance(data, tuple) else 0o644)


def write_mirror(repo, files: dict) -> None:
    """The mirror holding `files`, as rsync leaves it; nothing hashed."""
    write_files(repo.mirror, files)


def tree_of_files(repo, files: dict) -> str:
    """The tree id of exactly `files` (snapshot_of's form), made in a scratch store."""
    scratch = repo.home / "scratch"
    pa.remove_tree(scratch)
    scratch.mkdir()
    write_files(scratch, files)
    subprocess.run(["git", "init", "-q", str(scratch)], check=True)
    subprocess.run(["git", "-C", str(scratch), "add", "-A", "-f", "."], check=True)
    return subprocess.run(["git", "-C", str(scratch), "write-tree"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_the_mirror_becomes_the_first_job_folder_as_an_ordinary_account_too(srv_place, monkeypatch):
    """The same move run by the test account (root reads and renames anything): the folder is
    the account's, the account's own process working in the mirror keeps it a mirror."""
    from test_box_walls import hand_to_account, in_child_as_account
    repo = pa.ProjectRepo(srv_place / "state", "alice", "demo")
    monkeypatch.setattr(repo, "ADOPT_MIN_FILES", 0)
    monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)

    def as_account() -> None:
        repo.ensure()
        first = snapshot_of(repo, SNAP1)
        kept = prepared_beside_a_writer(repo, 1, first)
        assert_folder_is_at(repo, 1, first) and os.listdir(repo.mirror)  # checked out: the mirror stays full
        first = snapshot_of(repo, SNAP1)  # the mirror written again (no process in it), and hashed
        before = inodes(repo.mirror)
        folder = repo.prepare_slot(0, first)
        assert {p: i for p, i in inodes(folder).items() if p != ".git"} == before and kept != folder
        assert folder.stat().st_uid == os.geteuid() != 0 and list(repo.mirror.iterdir()) == []
        assert_folder_is_at(repo, 0, first)
    hand_to_account(srv_place)
    in_child_as_account(as_account)


def assert_folder_is_at(repo, slot: int, commit: str) -> bool:
    """assert_folder_is for any slot: HEAD and a clean status."""
    assert (repo.git_dir / f"worktrees/slot{slot}/HEAD").read_text() == commit + "\n"
    assert repo.slot_git(slot, GIT_OPTIONAL_LOCKS="0")("status", "--porcelain", "-z", "--untracked-files=all") == b""
    return True


def test_a_full_snapshot_of_a_sparse_mirror_keeps_what_it_lacks_and_refuses_what_it_never_had(first_ask):
    repo, first = first_ask
    repo.prepare_slot(0, first)
    # the full form (a 409's resend): only the files the laptop sent again are in the mirror
    files = {**SNAP1, "a.txt": b"a2\n"}
    (repo.mirror / "a.txt").write_bytes(b"a2\n")
    manifest = full_manifest(files)
    commit = repo.snapshot(tree_of_files(repo, files), manifest)
    assert repo.tree_of(commit) == tree_of_files(repo, files)
    assert (repo.home / "mirror.sparse").exists()  # still lacks the files the job folder took
    # a file the mirror lacks and the box never hashed: not taken on trust, a 409 naming it
    with pytest.raises(pa.Conflict) as e:
        repo.snapshot(tree_of_files(repo, {**files, "never.txt": b"sent?\n"}),
                      full_manifest({**files, "never.txt": b"sent?\n"}))
    assert "never.txt" in e.value.message
    # once a full sync refilled it, the mark goes
    snapshot_of(repo, files)
    assert not (repo.home / "mirror.sparse").exists()


def test_a_fifo_in_a_first_snapshot_is_never_opened_as_an_ordinary_account_either(srv_place):
    """As the test account (the box account a team runs the agent as): a fifo rsync put where a
    file is listed is refused (409 naming it) without being opened."""
    from test_box_walls import hand_to_account, in_child_as_account
    repo = pa.ProjectRepo(srv_place / "state", "alice", "demo")

    def as_account() -> None:
        repo.ensure()
        write_mirror(repo, SNAP1)
        (repo.mirror / "k").unlink()
        os.mkfifo(repo.mirror / "k")
        writer = subprocess.Popen(["sh", "-c", f"echo woke > {repo.mirror / 'k'}"])
        try:
            with pytest.raises(pa.Conflict) as e:
                repo.snapshot(tree_of_files(repo, SNAP1), full_manifest(SNAP1))
            assert "k: unsupported file type" in e.value.message and writer.poll() is None
        finally:
            writer.kill()
            writer.wait()
    hand_to_account(srv_place)
    in_child_as_account(as_account)


def full_manifest(files: dict) -> list:
    scratch_tree = {}
    for path, data in files.items():
        raw = data[1].encode() if isinstance(data, tuple) and data[0] == "link" else (
            data[1] if isinstance(data, tuple) else data)
        mode = "120000" if isinstance(data, tuple) and data[0] == "link" else (
            "100755" if isinstance(data, tuple) else "100644")
        sha = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
        scratch_tree[path] = (mode, sha)
    return [(m, sha, p) for p, (m, sha) in sorted(scratch_tree.items())]


def test_a_mirror_changed_after_its_snapshot_still_gives_a_folder_exactly_the_snapshot(first_ask):
    repo, first = first_ask
    (repo.mirror / "a.txt").write_bytes(b"an rsync after the snapshot\n")  # before the job starts
    (repo.mirror / "stray").write_bytes(b"x")
    folder = repo.prepare_slot(0, first)
    assert_folder_is(repo, folder, first)
    assert (folder / "a.txt").read_bytes() == b"a\n" and not (folder / "stray").exists()


def test_a_mirror_a_process_works_in_stays_the_mirror(first_ask):
    """An rsync still writing (its working folder is the mirror) would write into the job
    folder: the mirror stays where it is, and the job folder is checked out."""
    repo, first = first_ask
    before = inodes(repo.mirror)
    folder = prepared_beside_a_writer(repo, 0, first)
    assert inodes(repo.mirror) == before and not (repo.home / "mirror.sparse").exists()
    assert set(inodes(folder)) - {".git"} == set(before) and not set(inodes(folder).values()) & set(before.values())
    assert_folder_is(repo, folder, first)


def prepared_beside_a_writer(repo, slot: int, commit: str) -> Path:
    """prepare_slot while a process has its working folder in the mirror (as an rsync has)."""
    writer = subprocess.Popen(["sleep", "30"], cwd=repo.mirror)
    try:
        return repo.prepare_slot(slot, commit)
    finally:
        writer.kill()
        writer.wait()


def test_a_mirror_swapped_for_a_link_is_never_followed_into_a_job_folder(first_ask, tmp_path):
    repo, first = first_ask
    outside = tmp_path / "bob"
    outside.mkdir()
    (outside / "secret").write_bytes(b"bob's\n")
    pa.remove_tree(repo.mirror)
    os.symlink(outside, repo.mirror)  # the user's rsync put a link where the folder was
    folder = repo.prepare_slot(0, first)
    assert not folder.is_symlink() and not (folder / "secret").exists()
    assert_folder_is(repo, folder, first)
    assert (outside / "secret").read_bytes() == b"bob's\n" and sorted(os.listdir(outside)) == ["secret"]


# ------------------------------------------------------------------ the first snapshot: read by the agent, one fast-import


def test_a_first_snapshot_is_one_pack_read_by_the_agent_with_stat_data_as_update_index_makes(tmp_path, monkeypatch):
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    repo.ensure()
    files = {**SNAP1, "deep/a/b/c/d.bin": bytes(range(256)) * 9000, "empty": b"", "x/exec.sh": ("exec", b"#!/bin/sh\n"),
             **{f"gen/{i % 7}/f{i}": b"%d\n" % i for i in range(120)}}
    write_mirror(repo, files)
    seen = git_commands(monkeypatch)
    commit = repo.snapshot(tree_of_files(repo, files), full_manifest(files))
    assert repo.tree_of(commit) == tree_of_files(repo, files)
    assert "update-index" in seen  # --index-info and --refresh: no blob is written loose
    loose = [p.parent.name + p.name for p in (repo.git_dir / "objects").glob("??/*")]
    kinds = repo.git()("cat-file", "--batch-check=%(objecttype)", input="\n".join(loose).encode() + b"\n").split()
    assert kinds.count(b"blob") == 1  # the link's (written by the agent): every file's is in the pack
    packs = list((repo.git_dir / "objects" / "pack").glob("*.pack"))
    assert len(packs) == 1 and not list((repo.git_dir / "objects" / "pack").glob("tmp_pack_*"))
    # the stat data are the mirror's: nothing to re-hash, the mirror is clean against the index
    git = repo.snapshot_git(os.open(repo.mirror, os.O_RDONLY))
    assert git("diff-files", "--name-only") == b"l\n"  # only the link (written by the agent, as ever) is unsure
    assert git("ls-files", "-s", "x/exec.sh").startswith(b"100755 ")


def loose_and_packed(repo) -> tuple[int, int]:
    counts = dict(line.split(": ") for line in repo.git().text("count-objects", "-v").splitlines())
    return int(counts["count"]), int(counts["in-pack"])


def store_with_loose_objects(tmp_path: Path, project: str) -> tuple:
    """(repo, its first snapshot, a tree) of a project whose store holds 2,000 loose objects
    a job's result keeps (a ref)."""
    repo = pa.ProjectRepo(tmp_path / "state", "alice", project)
    repo.ensure()
    write_mirror(repo, SNAP1)
    first = repo.snapshot(tree_of_files(repo, SNAP1), full_manifest(SNAP1))
    repo.prepare_slot(0, first)
    blobs = tmp_path / f"blobs-{project}"
    blobs.mkdir()
    for i in range(2000):
        (blobs / f"b{i}").write_bytes(b"blob %d\n" % i)
    ids = repo.git()("hash-object", "-w", "--stdin-paths", input="\n".join(
        str(blobs / f"b{i}") for i in range(2000)).encode()).split()
    tree = repo.git().text("mktree", input=b"".join(b"100644 blob %s\tb%d\n" % (oid, i) for i, oid in enumerate(ids)))
    pa.write_ref(repo.git_dir, "refs/patchwire/jobs/big", pa.pw.write_commit(repo.git_dir, tree, first, "a job"))
    return repo, first, tree


def test_one_store_upkeep_at_a_time_in_the_whole_agent(tmp_path, monkeypatch):
    """A user with many projects and many jobs never has the agent run many `git gc` at once:
    while one runs, another project's returns (and runs after its next job)."""
    monkeypatch.setattr(pa.ProjectRepo, "UPKEEP_LOOSE", 1000)
    repo, _, _ = store_with_loose_objects(tmp_path, "many")
    with pa.UPKEEP_ONE_AT_A_TIME:  # another project's upkeep is running
        repo.maintain()
    assert loose_and_packed(repo)[0] > 2000
    repo.maintain()  # not counted as done before: it runs now
    assert loose_and_packed(repo)[0] == 0


def test_the_stores_upkeep_packs_loose_objects_and_leaves_a_working_store(tmp_path, monkeypatch):
    """Past UPKEEP_LOOSE loose objects `maintain` packs them (git gc --auto, which the
    agent's git otherwise never runs: gc.auto=0); at most once per UPKEEP_EVERY_S; the
    snapshots and job folders go on as before."""
    repo, first, tree = store_with_loose_objects(tmp_path, "demo")
    blobs = tmp_path / "blobs-demo"
    loose, _ = loose_and_packed(repo)
    assert loose > 2000
    monkeypatch.setattr(pa.ProjectRepo, "UPKEEP_LOOSE", 1000)
    repo.maintain()
    loose_after, packed = loose_and_packed(repo)
    assert loose_after == 0 and packed >= 2000, (loose_after, packed)
    (blobs / "later").write_bytes(b"later\n")
    repo.git()("hash-object", "-w", str(blobs / "later"))
    repo.maintain()  # within the hour: not again
    assert loose_and_packed(repo)[0] == 1
    changed = {**SNAP1, "a.txt": b"after the upkeep\n"}
    write_mirror(repo, {"a.txt": changed["a.txt"]})
    second = repo.snapshot_changes(tree_of_files(repo, changed), tree_of_files(repo, SNAP1), ["a.txt"], [])
    folder = repo.prepare_slot(0, second)
    assert (folder / "a.txt").read_bytes() == b"after the upkeep\n"
    assert repo.git().text("rev-parse", "refs/patchwire/jobs/big^{tree}") == tree


def own_entries(index: Path) -> int:
    """The count of entries in an index file's header (a split index's own part)."""
    return int.from_bytes(index.read_bytes()[8:12], "big")


def test_the_snapshot_index_keeps_its_own_part_small_ask_after_ask(tmp_path, monkeypatch):
    """git never writes a new shared part for entries only replaced (all of them, after the
    first snapshot's refresh): the agent splits the index again, so that each ask's writes
    are of the entries it changed, not of every file."""
    monkeypatch.setattr(pa, "RESPLIT_ENTRIES", 40)
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    repo.ensure()
    files = {f"gen/{i % 7}/f{i}": b"%d\n" % i for i in range(300)}
    write_mirror(repo, files)
    for path in repo.mirror.rglob("*"):  # synced a while ago: not "racily clean", which git keeps in the own part
        os.utime(path, (time.time() - 60, time.time() - 60))
    commit = repo.snapshot(tree_of_files(repo, files), full_manifest(files))
    index = repo.home / "snapshot.index"
    assert own_entries(index) <= 40, own_entries(index)  # 300 without the new split
    for i in range(3):
        before = tree_of_files(repo, files)
        files["gen/0/f0"] = b"changed %d\n" % i
        write_mirror(repo, {"gen/0/f0": files["gen/0/f0"]})
        commit = repo.snapshot_changes(tree_of_files(repo, files), before, ["gen/0/f0"], [])
        assert repo.tree_of(commit) == tree_of_files(repo, files) and own_entries(index) <= 40


@pytest.mark.parametrize("spoil", ["fifo", "link_for_file", "link_on_the_way", "gone", "folder"])
def test_a_first_snapshot_of_anything_but_plain_files_is_left_to_update_index(tmp_path, monkeypatch, spoil):
    """What import_files will not read (never through a link, never blocking on a fifo) goes
    the old way, with the old outcome: the tree the laptop named, or a 409 naming the path.
    Nothing outside the mirror is read; no half-written pack is left."""
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    repo.ensure()
    outside = tmp_path / "bob"
    outside.mkdir()
    (outside / "f").write_bytes(b"xb\n")  # the same bytes as the listed x/b: read, the tree would match
    listed = {**SNAP1, "z/last.txt": b"after\n"}
    write_mirror(repo, listed)
    (repo.mirror / "x" / "b").unlink()
    if spoil == "fifo":
        os.mkfifo(repo.mirror / "x" / "b")
    elif spoil == "link_for_file":
        os.symlink(outside / "f", repo.mirror / "x" / "b")
    elif spoil == "link_on_the_way":
        shutil.rmtree(repo.mirror / "x")
        os.symlink(outside, repo.mirror / "x")
        (outside / "a").write_bytes(b"xa\n")
        (outside / "b").write_bytes(b"xb\n")
    elif spoil == "folder":
        (repo.mirror / "x" / "b").mkdir()
    seen = git_commands(monkeypatch)
    writer = subprocess.Popen(["sh", "-c", f"echo woke > {repo.mirror / 'x' / 'b'}"]) if spoil == "fifo" else None
    with pytest.raises(pa.Conflict) as e:
        repo.snapshot(tree_of_files(repo, listed), full_manifest(listed))
    if writer:  # its open for writing waits for a reader: the agent never opened the fifo
        assert writer.poll() is None
        writer.kill()
        writer.wait()
    assert ("x/a" if spoil == "link_on_the_way" else "x/b") in e.value.message, e.value.message
    assert not list((repo.git_dir / "objects" / "pack").glob("tmp_pack_*"))
    assert "write-tree" in seen or "update-index" in seen
    assert sorted(os.listdir(outside)) == (["a", "b", "f"] if spoil == "link_on_the_way" else ["f"])


# ------------------------------------------------------------------ numstat


@pytest.mark.parametrize("out, expected", [
    (b"", {"files": 0, "added": 0, "removed": 0, "binary": 0}),
    (b"3\t1\ta.py\x002\t0\tb c.py\x00", {"files": 2, "added": 5, "removed": 1, "binary": 0}),
    (b"-\t-\timg.png\x00", {"files": 1, "added": 0, "removed": 0, "binary": 1}),
    # a rename: empty path, then the old and new paths as their own NUL-terminated fields
    (b"0\t0\t\x00old.txt\x00new.txt\x004\t4\tz.txt\x00", {"files": 2, "added": 4, "removed": 4, "binary": 0}),
    (b"1\t0\t\x00tab\there\x00new\x00", {"files": 1, "added": 1, "removed": 0, "binary": 0}),
])
def test_numstat_counts_files_lines_and_binaries(out, expected):
    assert pa.parse_numstat(out) == expected


@pytest.mark.parametrize("large", [False, True], ids=["add-all", "by-status"])
def test_repositories_the_ai_made_are_left_out_and_its_other_changes_kept(prepared, tmp_path, monkeypatch, large):
    """An AI's `git init` without a commit stopped `git add` ("does not have a commit checked
    out"): the job failed, its other changes lost. One with a commit became a gitlink. Both
    are left out now (named in stats), and the rest of the change is collected."""
    repo, _, folder = prepared
    if large:  # the folder checked by `status` first, then `add` of what it names
        monkeypatch.setattr(repo, "BY_PATHS_MIN_INDEX_BYTES", 0)
    first = snapshot_of(repo, SNAP1)
    repo.prepare_slot(0, first)
    (folder / "a.txt").write_bytes(b"the AI's\n")
    (folder / "tools" / "empty").mkdir(parents=True)
    patchwire.Git(cwd=folder / "tools" / "empty")("init", "-q")
    made = folder / "made"
    made.mkdir()
    inner = patchwire.Git(cwd=made)
    inner("init", "-q")
    (made / "f").write_bytes(b"f\n")
    inner("add", "f")
    inner("commit", "-qm", "x")
    with open(tmp_path / "patch", "wb") as patch:
        stats, result = repo.collect(0, first, "job1", patch, 1 << 20)
    assert stats.pop("repositories_left_out") == ["made", "tools/empty"]
    assert stats == {"files": 1, "added": 1, "removed": 1, "binary": 0}
    assert repo.git().text("diff-tree", "-r", "--name-status", first, result) == "M\ta.txt"
    assert b"Subproject" not in (tmp_path / "patch").read_bytes()


def test_raw_and_numstat_finds_the_repositories_and_counts_the_rest(tmp_path):
    """One `git diff --raw --numstat -z` of a real repository: a rename (two paths), an edit, a
    binary file, and a repository made inside (a gitlink, after a path with a newline)."""
    root = tmp_path / "r"
    root.mkdir()
    git = patchwire.Git(cwd=root)
    git("init", "-q")
    (root / "a.txt").write_bytes(b"one\ntwo\n")
    (root / "old.txt").write_bytes(b"same\n" * 20)
    git("add", "-A")
    before = git.text("write-tree")
    (root / "a.txt").write_bytes(b"one\n2\nthree\n")
    (root / "old.txt").rename(root / "new name.txt")
    (root / "img.bin").write_bytes(b"\0\1\2")
    (root / "x\ny").write_bytes(b"odd\n")
    inner = root / "vendor" / "lib"
    inner.mkdir(parents=True)
    inner_git = patchwire.Git(cwd=inner)
    inner_git("init", "-q")
    (inner / "f").write_bytes(b"f\n")
    inner_git("add", "f")
    inner_git("commit", "-qm", "inner")
    git("add", "-A")
    after = git.text("write-tree")
    out = git("diff", "-M", "--raw", "--numstat", "-z", before, after)
    nested, stats, written = pa.raw_and_numstat(out)
    assert nested == ["vendor/lib"]
    # the files whose content the result adds or changes (what refuse_huge_files sizes): not a
    # pure rename, whose blob the snapshot has (renaming a big tracked file is no big diff)
    assert sorted(written) == ["a.txt", "img.bin", "x\ny"]
    assert stats == pa.parse_numstat(git("diff", "-M", "--numstat", "-z", before, after))
    assert stats == {"files": 5, "added": 4, "removed": 1, "binary": 1}
    assert pa.raw_and_numstat(b"") == ([], {"files": 0, "added": 0, "removed": 0, "binary": 0}, [])


# ------------------------------------------------------------------ StreamParser


def test_the_stream_parser_turns_claude_lines_into_events():
    events: list = []
    parser = pa.StreamParser(events.append, Path("/job"))
    for line in (b"plain output before init\n",
                 b'{"type": "system", "subtype": "init", "session_id": "s9", "model": "m1"}\n',
                 b'{"type": "assistant", "message": {"content": [{"type": "text", "text": "hi"},'
                 b' {"type": "tool_use", "name": "Edit", "input": {"file_path": "/job/src/a.py"}}]}}\n',
                 b'{"type": "user", "message": {"content": [{"type": "tool_result", "is_error": true,'
                 b' "content": [{"type": "text", "text": "denied"}]}]}}\n',
                 b'{"type": "newer_kind", "x": 1}\n',
                 b"\n",
                 b'{"type": "result", "subtype": "success", "is_error": false, "num_turns": 2, "usage": {"a": 1}}\n'):
        parser.feed(line)
    assert events == [
        {"type": "output", "text": "plain output before init"},
        {"type": "session", "session_id": "s9", "model": "m1"},
        {"type": "text", "text": "hi"},
        {"type": "tool", "name": "Edit", "detail": "src/a.py"},  # the job folder is not shown
        {"type": "tool_error", "text": "denied"},
        {"type": "result", "subtype": "success", "is_error": False, "num_turns": 2, "usage": {"a": 1}},
    ]
    assert parser.claude and parser.session_id == "s9" and parser.result["num_turns"] == 2


def test_json_from_a_command_that_is_not_claude_passes_through_as_output():
    events: list = []
    parser = pa.StreamParser(events.append, Path("/job"))
    parser.feed(b'{"type": "result", "subtype": "success"}\r\n')
    assert events == [{"type": "output", "text": '{"type": "result", "subtype": "success"}'}]
    assert parser.result is None and not parser.claude


# ------------------------------------------------------------------ AIRun.judge


def judged(code: int, result=None, claude: bool = True, stop: str = "", stderr: bytes = b""):
    run = pa.AIRun(["true"], Path("/job"), {}, "prompt", timeout_s=60, emit=lambda e: None)
    run.parser.result, run.parser.claude, run.stderr_tail = result, claude, stderr
    if stop:
        run.stop_reason = stop
    return run.judge(code)[:2]


OK = {"type": "result", "subtype": "success", "is_error": False, "result": "all done"}


@pytest.mark.parametrize("kwargs, expected", [
    ({"code": 0, "result": OK}, ("done", "")),
    ({"code": 0, "result": None, "claude": False}, ("done", "")),  # another command, exit 0
    ({"code": 0, "result": None}, ("failed", "the AI ended without a result line")),
    ({"code": 0, "result": OK, "stop": "cancelled by ann"}, ("cancelled", "cancelled by ann")),
    ({"code": 0, "result": {**OK, "subtype": "error_max_turns"}},
     ("failed", "the AI stopped at its turn limit (--max-turns in [ai] command): ask for a smaller step, "
                "or raise the limit")),
    ({"code": 0, "result": {**OK, "is_error": True, "result": "quota"}}, ("failed", "the AI reported an error: quota")),
    ({"code": 0, "result": {**OK, "subtype": "error_during_execution", "result": ""}},
     ("failed", "the AI reported an error: error_during_execution")),
    ({"code": -signal.SIGKILL, "result": OK}, ("failed", "the AI command was killed by signal SIGKILL")),
    ({"code": 2, "result": None, "claude": False, "stderr": b"usage: claude\n"},
     ("failed", "the AI command exited with status 2: usage: claude")),
    ({"code": 3, "result": None, "claude": False}, ("failed", "the AI command exited with status 3: no output")),
])
def test_the_judge_names_how_a_run_ended(kwargs, expected):
    assert judged(**kwargs) == expected


def test_permission_denials_fail_the_run_and_are_described():
    status, reason = judged(0, {**OK, "permission_denials": [{"tool_name": "Bash", "tool_input": {"command": "rm x"}},
                                                             "not a dict"]})
    assert status == "failed"
    assert "Bash" in reason


# ------------------------------------------------------------------ malloc arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_serve_limits_malloc_arenas_unless_the_environment_does():
    assert pa.limit_malloc_arenas({}) is True  # glibc accepted M_ARENA_MAX
    assert pa.limit_malloc_arenas({"MALLOC_ARENA_MAX": "8"}) is False  # the admin's word stands


def test_the_laptop_accepts_the_folder_the_agent_keeps_a_mirror_in(tmp_path):
    """The laptop's local-mode check (pw.local_mirror_problem) and the agent's layout agree."""
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "my-app")
    assert patchwire.local_mirror_problem(str(repo.mirror), "alice", "my-app", tmp_path / "code/my-app") is None
    assert patchwire.local_mirror_problem(str(repo.mirror), "bob", "my-app", tmp_path / "code/my-app")


def test_a_client_is_an_ipv4_address_or_an_ipv6_64():
    """The per-client caps and the wrong-token penalty count an IPv6 client by its /64: one
    host commonly holds a whole /64, 2^64 addresses that would each get their own caps."""
    assert {pa.client_key(a) for a in ("2001:db8:1:2::5", "2001:db8:1:2:ffff::9")} == {"2001:db8:1:2::/64"}
    assert pa.client_key("2001:db8:1:3::5") == "2001:db8:1:3::/64"
    assert [pa.client_key(a) for a in ("127.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0")] == [
        "127.0.0.1", "::1", "10.0.0.1", "fe80::/64"]
    table = pa.ConnectionTable(total=10, per_client=2)
    admitted = [table.admit(pa.client_key(f"2001:db8:1:2::{n}"), None) for n in range(1, 4)]
    assert [conn is not None for conn in admitted] == [True, True, False]


def test_a_git_stalled_on_a_fifo_is_let_go_and_a_slow_one_runs_on(tmp_path, monkeypatch):
    """unstalled: past GIT_STALL_S the folder's FIFOs are opened for writing and closed (the
    blocked reader gets an empty file) and removed; a command that is only slow is not stopped."""
    monkeypatch.setattr(pa, "GIT_STALL_S", 0.2)
    (tmp_path / "sub").mkdir()
    fifo = tmp_path / "sub" / ".gitignore"
    os.mkfifo(fifo)
    (tmp_path / "kept.txt").write_text("kept\n")
    started = time.monotonic()
    assert pa.unstalled(tmp_path, lambda: fifo.read_text()) == ""  # as git's open of it
    assert time.monotonic() - started < 5 and not fifo.exists() and (tmp_path / "kept.txt").exists()
    assert pa.unstalled(tmp_path, lambda: time.sleep(0.7) or 42) == 42
