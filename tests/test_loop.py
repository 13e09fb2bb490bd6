"""The core loop end to end with real parts: git, rsync, the agent process, the CLI process.
The AI is the stand-in claude, scripted through the prompt."""

from __future__ import annotations

import base64
import json
import os

import pytest

from conftest import Laptop, git, make_repo, pid_alive, script, snapshot_tree, tree_digest

BINARY = bytes(range(256)) * 4 + b"\x00\xff\x00"
WEIRD = "docs/notes with spaces/Résumé ünïcødé.txt"


@pytest.fixture
def rich_laptop(tmp_path, agent):
    files = {
        "edit.txt": b"line one\nline two\nline three\n",
        "gone.txt": b"delete me\n",
        "old/name.txt": b"rename me\nwith content that stays the same\nacross the rename\n",
        "run.sh": b"#!/bin/sh\necho run\n",
        "img.bin": BINARY,
        WEIRD: "caf\u00e9\n".encode(),
        ".gitattributes": b"* text=auto eol=crlf\n",
        "win.txt": b"first\r\nsecond\r\n",
        "nonl.txt": b"no final newline",
    }
    root = tmp_path / "laptop"
    make_repo(root, {k: v for k, v in files.items() if k != ".gitattributes"})
    (root / ".gitattributes").write_bytes(files[".gitattributes"])
    git(root, "add", ".gitattributes")
    git(root, "commit", "-qm", "attributes")
    # the checkout after commit must still hold the CRLF bytes we wrote
    (root / "win.txt").write_bytes(files["win.txt"])
    lap = Laptop(root)
    lap.init(agent)
    return lap


def test_round_trip_is_byte_exact(rich_laptop, agent):
    new_binary = BINARY[::-1] + b"\x01\x02"
    prompt = script(
        {"write": "edit.txt", "text": "line one\nline 2, edited\nline three\n"},
        {"write": "added/new file.txt", "text": "brand new\n"},
        {"delete": "gone.txt"},
        {"rename": ["old/name.txt", "new/name.txt"]},
        {"chmod": ["run.sh", "755"]},
        {"write": "img.bin", "b64": base64.b64encode(new_binary).decode()},
        {"write": WEIRD, "text": "caf\u00e9 cr\u00e8me\n"},
        {"write": "win.txt", "b64": base64.b64encode(b"first\r\nsecond, edited\r\nthird\r\n").decode()},
        {"write": "nonl.txt", "text": "still no final newline, edited"},
        {"say": "All done."},
    )
    result = rich_laptop.ask(prompt, "--yes", check=0)
    job = rich_laptop.last_job()
    # the laptop's tree now equals the AI's result in the job folder, byte for byte
    info = agent.wait_job(job)
    slot = agent.state_dir / "users" / "alice" / "projects" / "laptop" / "slots" / f"slot{info['slot']}"
    laptop_files = snapshot_tree(rich_laptop.root, skip=(".git", ".patchwire.toml"))  # never sent
    box_files = snapshot_tree(slot, skip=(".git",))
    assert laptop_files == box_files
    root = rich_laptop.root
    assert (root / "win.txt").read_bytes() == b"first\r\nsecond, edited\r\nthird\r\n"
    assert (root / "img.bin").read_bytes() == new_binary
    assert (root / "nonl.txt").read_bytes() == b"still no final newline, edited"
    assert (root / WEIRD).read_bytes() == "caf\u00e9 cr\u00e8me\n".encode()
    assert not (root / "gone.txt").exists() and not (root / "old").exists()
    assert (root / "new/name.txt").read_bytes().startswith(b"rename me")
    assert os.stat(root / "run.sh").st_mode & 0o111
    assert (root / "added/new file.txt").read_bytes() == b"brand new\n"
    # the progress was streamed: the AI's text and its tool uses
    assert "All done." in result.err and "> Write" in result.err and "> Bash" in result.err
    assert f"applied job {job}: 9 file(s) changed" in result.err
    # the diff carries a rename and a mode change, not delete+add
    patch = rich_laptop.run("diff", job, check=0).stdout
    assert b"rename from old/name.txt" in patch and b"new mode 100755" in patch
    assert b"GIT binary patch" in patch


def test_secrets_and_ignored_files_never_reach_the_box(tmp_path, agent):
    root = make_repo(tmp_path / "laptop", {
        ".gitignore": b"build/\n*.log\n!keep.log\nsub/local.txt\n",
        "app.py": b"x = 1\n", "sub/.gitignore": b"cache/\n", "sub/code.py": b"y = 2\n"})
    secrets = {".env": b"API_KEY=supersecret\n", ".env.production": b"K=1\n",
               "certs/server.pem": b"-----BEGIN PRIVATE KEY-----\n", "id_rsa": b"ssh key\n",
               "android/app/upload.keystore": b"\x00ks", "config/credentials.json": b"{}",
               "sub/.ssh/config": b"Host *\n", "deploy/.aws/config": b"[default]\n",
               "sub/dir/.env.local": b"X=1\n"}
    ignored = {"build/out.o": b"obj", "debug.log": b"log", "sub/cache/x": b"c",
               "sub/local.txt": b"l", "excluded.txt": b"e"}
    for rel, data in {**secrets, **ignored, "keep.log": b"kept\n", "untracked.py": b"z = 3\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".git/info/exclude").write_text("excluded.txt\n")
    lap = Laptop(root)
    lap.init(agent)
    dry = lap.run("sync", "--dry-run", check=0)
    listed = set(json.loads(lap.run("sync", "--dry-run", "--json", check=0).out)["files"])
    assert {"app.py", "sub/code.py", "keep.log", "untracked.py", ".gitignore"} <= listed
    assert not listed & (set(secrets) | set(ignored))
    for rel in secrets:
        assert f"held back: {rel} (secret deny-list" in dry.out
    lap.run("sync", check=0)
    mirror = agent.state_dir / "users" / "alice" / "mirror" / "laptop"
    sent = set(snapshot_tree(mirror))
    assert sent == listed
    # a file deleted locally disappears from the next snapshot (and from the mirror)
    (root / "untracked.py").unlink()
    lap.ask(script({"say": "ok"}), "--yes", check=0)
    assert "untracked.py" not in set(snapshot_tree(mirror))
    assert not any(b"supersecret" in (mirror / p).read_bytes() for p in snapshot_tree(mirror))


@pytest.mark.parametrize("steps, reason", [
    ([{"write": "README.md", "text": "half done\n"}, {"exit": 3}], "exited with status 3"),
    ([{"write": "README.md", "text": "x\n"}, {"error": "500 overloaded"}], "reported an error: API Error: 500"),
    ([{"deny": "Edit"}], "denied permission to use Edit"),
])
def test_failed_ai_run_changes_nothing(laptop, agent, steps, reason):
    laptop.run("sync", check=0)
    mirror = agent.state_dir / "users" / "alice" / "mirror" / "laptop"
    before_mirror, before_laptop = tree_digest(mirror), tree_digest(laptop.root)
    result = laptop.ask(script(*steps), "--yes")
    assert result.returncode == 4, result.err
    assert reason in result.err
    assert "Traceback" not in result.err
    job = laptop.last_job()
    info = agent.wait_job(job)
    assert info["status"] == "failed" and reason in info["reason"]
    assert tree_digest(mirror) == before_mirror
    assert tree_digest(laptop.root) == before_laptop
    status, body = agent.json("GET", f"/v1/jobs/{job}/diff")
    assert status == 409 and body["code"] == "no_diff"


def test_timeout_ends_the_whole_process_group(laptop, agent, tmp_path, make_agent):
    box = make_agent(ai={"timeout_s": 1})
    lap = Laptop(laptop.root)
    lap.init(box)
    pidfile = tmp_path / "pids"
    result = lap.ask(script({"hang": True, "pidfile": str(pidfile)}), "--yes")
    assert result.returncode == 4
    assert "timed out after 1 s" in result.err
    leader, child = map(int, pidfile.read_text().split())
    for pid in (leader, child):
        assert not pid_alive(pid), f"process {pid} survived the timeout"


def test_ai_command_missing_is_a_clear_failure(laptop, make_agent):
    box = make_agent(ai_command=["no-such-claude-binary", "--print"])
    status, health = box.json("GET", "/v1/health", token=None)
    assert status == 200 and health["ai_found"] is False
    lap = Laptop(laptop.root)
    lap.init(box)
    result = lap.ask("hello", "--yes")
    assert result.returncode == 4
    assert "'no-such-claude-binary' is not installed on the box" in result.err


def test_without_a_terminal_neither_ask_nor_apply_applies_unless_yes(laptop, agent):
    """One rule for both (issue 22): `echo | patchwire ask` applied, `echo | patchwire apply` refused."""
    kept = laptop.ask(script({"write": "README.md", "text": "# changed\n"}), input=b"\n", check=0)
    job = laptop.last_job()
    assert f"pass --yes to apply without asking: `patchwire apply {job} --yes`" in kept.err
    assert (laptop.root / "README.md").read_bytes() == b"# demo\n"
    assert "+# changed" in kept.out  # the preview went to stdout
    refused = laptop.run("apply", job[:6], input=b"\n", check=2)
    assert "stdin is not a terminal" in refused.err and "--yes" in refused.err
    assert (laptop.root / "README.md").read_bytes() == b"# demo\n"
    laptop.run("apply", job[:6], "--yes", check=0)
    assert (laptop.root / "README.md").read_bytes() == b"# changed\n"


def test_no_input_means_no_apply(laptop):
    result = laptop.ask(script({"write": "README.md", "text": "# x\n"}), check=0)
    assert "kept job" in result.err
    assert (laptop.root / "README.md").read_bytes() == b"# demo\n"


def test_patch_that_no_longer_applies_changes_nothing(laptop):
    laptop.ask(script({"write": "README.md", "text": "# from the AI\n"}), "--no-apply", check=0)
    job = laptop.last_job()
    (laptop.root / "README.md").write_bytes(b"# edited here meanwhile\n")
    before = tree_digest(laptop.root)
    result = laptop.run("apply", job, "--yes")
    assert result.returncode == 5
    assert "README.md" in result.err and "overlap in README.md; nothing was changed" in result.err
    assert tree_digest(laptop.root) == before


def test_no_change_is_said_plainly(laptop):
    result = laptop.ask(script({"say": "Nothing to do."}), "--yes", check=0)
    assert "the AI made no changes" in result.err


def test_preview_is_plain_without_a_terminal_and_coloured_on_request(laptop):
    result = laptop.ask(script({"write": "README.md", "text": "# demo, edited\n"}), "--no-apply", check=0)
    assert "\x1b[" not in result.out
    assert "-# demo\n+# demo, edited" in result.out
    assert "README.md" in result.out.splitlines()[0]


def test_jobs_and_their_events_survive_an_agent_restart(laptop, agent):
    laptop.ask(script({"write": "README.md", "text": "# persisted\n"}), "--no-apply", check=0)
    job = laptop.last_job()
    events = agent.events(job)
    patch = agent.request("GET", f"/v1/jobs/{job}/diff")[2]
    agent.stop()
    agent.start()
    laptop.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file()), check=0)
    assert agent.events(job) == events
    assert agent.request("GET", f"/v1/jobs/{job}/diff")[2] == patch
    laptop.run("apply", job, "--yes", check=0)
    assert (laptop.root / "README.md").read_bytes() == b"# persisted\n"


def test_non_git_folder_works(tmp_path, agent):
    root = tmp_path / "plain"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"hello\n")
    (root / ".gitignore").write_bytes(b"tmp/\n")
    (root / "tmp").mkdir()
    (root / "tmp" / "junk").write_bytes(b"junk")
    lap = Laptop(root)
    lap.init(agent)
    lap.ask(script({"write": "notes.txt", "text": "hello\nworld\n"}), "--yes", check=0)
    assert (root / "notes.txt").read_bytes() == b"hello\nworld\n"
    assert not (agent.state_dir / "users/alice/mirror/plain/tmp").exists()


def test_follow_up_continues_the_previous_job(laptop, agent, tmp_path):
    laptop.ask(script({"write": "README.md", "text": "# first\n"}), "--no-apply", check=0)
    parent = laptop.last_job()
    laptop.ask(script({"append": "README.md", "text": "second\n"}), "--continue", "--yes", check=0)
    child = laptop.last_job()
    assert child != parent
    # the whole change against the synced snapshot, in one go
    assert (laptop.root / "README.md").read_bytes() == b"# first\nsecond\n"
    parent_info, child_info = agent.json("GET", f"/v1/jobs/{parent}")[1], agent.json("GET", f"/v1/jobs/{child}")[1]
    assert child_info["parent"] == parent and child_info["slot"] == parent_info["slot"]
    started = [e for e in agent.events(child) if e["type"] == "started"][0]
    assert started["continues"] == parent
    # the AI was resumed with the parent's session
    session = [e for e in agent.events(child) if e["type"] == "session"][0]["session_id"]
    assert session == parent_info["result"]["session_id"]


def test_follow_up_after_applying_the_parent_does_not_apply_twice(laptop, agent):
    laptop.ask(script({"write": "README.md", "text": "# first\n"}), "--yes", check=0)
    laptop.ask(script({"write": "src/app.py", "text": "print('two')\n"}), "--continue", "--yes", check=0)
    assert (laptop.root / "README.md").read_bytes() == b"# first\n"
    assert (laptop.root / "src/app.py").read_bytes() == b"print('two')\n"


def test_follow_up_of_a_failed_job_is_refused(laptop):
    laptop.ask(script({"exit": 2}), "--yes")
    result = laptop.ask("again", "--continue", "--yes")
    assert result.returncode == 3
    assert "only a finished job can be continued" in result.err
