"""An ask sends only what changed (issue 14: O(changed)). After the first, the laptop finds what
changed with git's stat cache and sends the agent the base tree, the new tree and the changed
and deleted paths; the agent updates its index for those paths only and checks the tree id.
Every way the box can hold something else falls back to the full, checksummed sync, and the job
always sees exactly the laptop's files."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest

import patchwire
import patchwire_agent
from conftest import git, make_repo, script
from test_box_walls import as_who, hand_to_account, in_child_as_account
from test_sync_real_projects import mirror_of, write_sync
from test_units_laptop import WHO


def snapshots(agent) -> List[dict]:
    """The agent's audit lines for snapshots: form (changes|full) and counts."""
    lines = (agent.state_dir / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "snapshot"]


def asks(agent) -> List[int]:
    lines = (agent.state_dir / "audit.log").read_text().splitlines()
    return [r["status"] for r in map(json.loads, lines) if r.get("path") == "/v1/ask"]


def seen(laptop, path: str) -> bytes:
    """What the last job's AI read at `path` (it copied the file to seen.PATH, applied here)."""
    return (laptop.root / ("seen." + path.replace("/", "_"))).read_bytes()


def copy_steps(*paths: str) -> List[dict]:
    return [{"copy": [p, "seen." + p.replace("/", "_")]} for p in paths]


def test_the_second_ask_sends_only_what_changed(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    (laptop.root / "README.md").write_bytes(b"# edited\n")
    (laptop.root / "src/new.py").write_bytes(b"new = 1\n")
    (laptop.root / "src/app.py").unlink()
    asked = laptop.ask(script(*copy_steps("README.md", "src/new.py")), "--yes", check=0)
    first, second = snapshots(agent)
    assert first["form"] == "full" and first["files"] == 3
    assert (second["form"], second["changed"], second["deleted"]) == ("changes", 2, 1), asked.err
    assert seen(laptop, "README.md") == b"# edited\n" and seen(laptop, "src/new.py") == b"new = 1\n"
    assert not (mirror_of(agent, laptop) / "src/app.py").exists()  # the agent deleted it
    # nothing changed: still the changes form, with nothing in it
    laptop.ask(script({"say": "third"}), "--yes", check=0)
    assert snapshots(agent)[-1] == {**snapshots(agent)[-1], "form": "changes", "changed": 2, "deleted": 0}
    assert all(status == 200 for status in asks(agent))


def test_a_sync_between_asks_keeps_the_changes_form(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    (laptop.root / "README.md").write_bytes(b"# synced alone\n")
    laptop.run("sync", check=0)
    (laptop.root / "src/app.py").write_bytes(b"print('later')\n")
    laptop.ask(script(*copy_steps("README.md", "src/app.py")), "--yes", check=0)
    last = snapshots(agent)[-1]
    assert (last["form"], last["changed"], last["deleted"]) == ("changes", 2, 0)
    assert seen(laptop, "README.md") == b"# synced alone\n" and seen(laptop, "src/app.py") == b"print('later')\n"
    assert 409 not in asks(agent)


def test_a_mirror_changed_behind_the_laptops_back_never_reaches_the_job(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    mirror = mirror_of(agent, laptop)
    (mirror / "README.md").write_bytes(b"# tampered on the box\n")  # the laptop leaves it alone
    (mirror / "src/app.py").write_bytes(b"print('tampered')\n")  # the laptop changes it too
    (laptop.root / "src/app.py").write_bytes(b"print('laptop')\n")
    laptop.ask(script(*copy_steps("README.md", "src/app.py")), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "changes"
    # the snapshot is the recorded blobs plus what was sent: never the box's own edits
    assert seen(laptop, "README.md") == b"# demo\n"
    assert seen(laptop, "src/app.py") == b"print('laptop')\n"
    assert (mirror / "src/app.py").read_bytes() == b"print('laptop')\n"


def test_a_new_box_or_a_reset_state_falls_back_to_the_full_checksummed_sync(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    mirror = mirror_of(agent, laptop)
    home = agent.state_dir / "users" / "alice" / "projects" / "laptop"
    shutil.rmtree(home)  # the box's snapshots are gone; its mirror stays, partly stale
    (mirror / "README.md").write_bytes(b"# stale\n")
    (laptop.root / "src/app.py").write_bytes(b"print('after reset')\n")
    asked = laptop.ask(script(*copy_steps("README.md", "src/app.py")), "--yes", check=0)
    assert "the box's copy is not the one this laptop last sent; sending every file, compared by checksum" in asked.err
    assert asks(agent)[-2:] == [409, 200]
    assert snapshots(agent)[-1]["form"] == "full"
    assert seen(laptop, "README.md") == b"# demo\n" and (mirror / "README.md").read_bytes() == b"# demo\n"
    assert seen(laptop, "src/app.py") == b"print('after reset')\n"
    # and the next ask is of changes again
    (laptop.root / "README.md").write_bytes(b"# next\n")
    laptop.ask(script({"say": "next"}), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "changes"


def test_a_lost_laptop_state_folder_sends_the_full_form(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    shutil.rmtree(patchwire.Project(laptop.root, "laptop").private_dir)
    (laptop.root / "README.md").write_bytes(b"# after loss\n")
    laptop.ask(script(*copy_steps("README.md")), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "full" and 409 not in asks(agent)
    assert seen(laptop, "README.md") == b"# after loss\n"


def test_a_sent_file_spoiled_on_the_box_is_refused_then_sent_by_checksum(laptop, agent, tmp_path):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    sent = b"# sent\n" + b"-" * patchwire.INLINE_SEND_MAX_BYTES  # too big to go with the ask: rsync sends it
    (laptop.root / "README.md").write_bytes(sent)
    once = tmp_path / "spoiled-once"
    spoil = tmp_path / "rsync-spoils-once"
    spoil.write_text(f"#!/bin/sh\nrsync \"$@\"; rc=$?\n[ -e {once} ] || {{ touch {once}; "
                     f"echo spoiled > {mirror_of(agent, laptop)}/README.md; }}\nexit $rc\n")
    spoil.chmod(0o755)
    write_sync(laptop, rsync=str(spoil))
    asked = laptop.ask(script(*copy_steps("README.md")), "--yes", check=0)
    assert "the box's copy differs from what was sent in README.md; sending every file, compared by checksum" in asked.err
    assert asks(agent)[-2:] == [409, 200] and seen(laptop, "README.md") == sent


def counting_rsync(tmp_path: Path) -> Path:
    """An rsync that notes each run in rsync.runs, then is rsync."""
    runs = tmp_path / "rsync.runs"
    wrapper = tmp_path / "counting-rsync"
    wrapper.write_text(f"#!/bin/sh\necho run >> {runs}\nexec rsync \"$@\"\n")
    wrapper.chmod(0o755)
    return runs


def test_small_changed_files_go_with_the_ask_into_the_mirror_as_rsync_would_write_them(laptop, agent, tmp_path):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    runs = counting_rsync(tmp_path)
    write_sync(laptop, rsync=str(tmp_path / "counting-rsync"))
    (laptop.root / "README.md").write_bytes(b"# edited\n")
    tool = laptop.root / "src/deep/tool.sh"
    tool.parent.mkdir(parents=True)
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    os.utime(tool, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    asked = laptop.ask(script(*copy_steps("README.md", "src/deep/tool.sh")), "--yes", check=0)
    assert "synced 2 of 4 file(s), 29 B with the ask" in asked.err
    assert not runs.exists(), "rsync ran"
    last = snapshots(agent)[-1]
    assert (last["form"], last["changed"], last["inline"]) == ("changes", 2, 2)
    assert seen(laptop, "README.md") == b"# edited\n" and seen(laptop, "src/deep/tool.sh") == b"#!/bin/sh\necho tool\n"
    mirror = mirror_of(agent, laptop)
    copy = (mirror / "src/deep/tool.sh").stat()
    assert (mirror / "src/deep/tool.sh").read_bytes() == tool.read_bytes() and copy.st_mode & 0o111
    assert copy.st_mtime_ns == 1_600_000_000_123_456_789 and not (mirror / "README.md").stat().st_mode & 0o111
    # the mirror holds the record: a sync sends only the two files the job applied here
    assert "synced 2 of 6 file(s)" in laptop.run("sync", check=0).err and runs.read_text() == "run\n"
    laptop.ask(script({"say": "again"}), "--yes", check=0)
    assert "inline" not in snapshots(agent)[-1] and runs.read_text() == "run\n" and 409 not in asks(agent)


def test_files_that_went_with_a_refused_ask_go_again_with_the_next(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    (laptop.root / "README.md").write_bytes(b"# carried twice\n")
    refused = laptop.ask(script({"say": "never runs"}), "--timeout", str(10 ** 9), check=None)
    assert refused.returncode != 0 and "timeout_s" in refused.err
    assert "B with the ask" in refused.err
    assert (mirror_of(agent, laptop) / "README.md").read_bytes() == b"# demo\n"  # refused before the snapshot
    laptop.ask(script(*copy_steps("README.md")), "--yes", check=0)
    assert seen(laptop, "README.md") == b"# carried twice\n"
    assert snapshots(agent)[-1]["inline"] == 1 and 409 not in asks(agent)


# ------------------------------------------------------------------ the agent's side, over HTTP


def test_the_changes_form_is_checked(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    project = patchwire.Project(laptop.root, "laptop")
    tree = json.loads(project.state_file("last_sync.json").read_text())["tree"]
    ask = {"project": "laptop", "prompt": "x", "tree": tree, "base": tree, "changed": [], "deleted": []}
    for bad, code, words in (
            ({"base": "0" * 40}, 409, "not the one the laptop last sent"),
            ({"base": "zz"}, 400, "base must be a git tree id"),
            ({"changed": ["../escape"]}, 400, "unsafe path"),
            ({"deleted": [".git/config"]}, 400, "unsafe path"),
            ({"changed": "README.md"}, 400, "changed must be a list of paths"),
            ({"tree": "1" * 40}, 409, "differs from what the laptop sent"),
            ({"changed": ["src"]}, 409, "cannot hold what the laptop sent"),  # a folder in the mirror
            ({"changed": ["README.md"]}, 409, "not the one the laptop last sent")):  # after that refusal
        status, answer = agent.json("POST", "/v1/ask", {**ask, **bad})
        assert (status, words in answer["error"]) == (code, True), (bad, answer)
        if status == 409:
            assert answer["code"] == "tree_mismatch"
    outside = agent.state_dir.parent / "outside.txt"
    outside.write_text("keep\n")
    status, _ = agent.json("POST", "/v1/ask", {**ask, "deleted": ["../outside.txt"]})
    assert status == 400 and outside.read_text() == "keep\n"


def test_the_content_an_ask_carries_is_checked_and_written_only_beneath_the_mirror(laptop, agent):
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    project = patchwire.Project(laptop.root, "laptop")
    tree = json.loads(project.state_file("last_sync.json").read_text())["tree"]
    ask = {"project": "laptop", "prompt": "x", "tree": tree, "base": tree, "changed": ["README.md"], "deleted": []}
    demo = base64.b64encode(b"# demo\n").decode()
    too_big = base64.b64encode(b"x" * (patchwire.INLINE_MAX_BYTES + 1)).decode()
    for bad, code, words in (
            ({"content": "README.md"}, 400, "content must be a list"),
            ({"content": [["README.md", "120000", 0, demo]]}, 400, "bad entry in content"),
            ({"content": [["README.md", "100644", -1, demo]]}, 400, "bad entry in content"),
            ({"content": [["README.md", "100644", 1.5, demo]]}, 400, "bad entry in content"),
            ({"content": [["README.md", "100644", 0, "not base64!"]]}, 400, "not base64"),
            ({"content": [["../escape", "100644", 0, demo]]}, 400, "unsafe path"),
            ({"content": [[".git/config", "100644", 0, demo]]}, 400, "unsafe path"),
            ({"content": [["README.md", "100644", 0, too_big]]}, 413, "content over"),
            ({"content": [["extra.txt", "100644", 0, demo]]}, 400, "not in changed: extra.txt"),
            ({"files": [], "content": []}, 400, "content goes with an ask of changes")):
        status, answer = agent.json("POST", "/v1/ask", {**ask, **bad})
        assert (status, words in answer["error"]) == (code, True), (bad, answer)
    mirror = mirror_of(agent, laptop)
    assert not (mirror / "extra.txt").exists()  # refused before anything was written
    outside = agent.state_dir.parent / "outside.txt"
    outside.write_text("keep\n")
    (mirror / "README.md").unlink()
    os.symlink(outside, mirror / "README.md")  # a link at the path itself is replaced, never followed
    status, answer = agent.json("POST", "/v1/ask", {**ask, "content": [["README.md", "100644", 0, demo]]})
    assert status == 202, answer
    assert outside.read_text() == "keep\n" and not (mirror / "README.md").is_symlink()
    assert (mirror / "README.md").read_bytes() == b"# demo\n"
    other = agent.state_dir / "users" / "bob" / "mirror" / "web"
    other.mkdir(parents=True)
    os.symlink(other, mirror / "bobs")  # a link on the way: nothing written through it
    status, answer = agent.json("POST", "/v1/ask", {**ask, "changed": ["bobs/x.txt"],
                                                    "content": [["bobs/x.txt", "100644", 0, demo]]})
    assert (status, answer["code"]) == (409, "tree_mismatch") and "symlink" in answer["error"]
    assert list(other.iterdir()) == []


@pytest.mark.parametrize("who", ["root", "account"])
def test_the_content_an_ask_carries_follows_no_link_as_root_or_as_an_ordinary_account(srv_place, who):
    """The agent's writer of an ask's files, run as root and as the ordinary account (whose
    folders and files are its own, as on a box): a link at the path is replaced, one on the
    way is refused, nothing lands outside the mirror or in another user's folder."""
    mirror, other = srv_place / "mirror", srv_place / "bob"
    mirror.mkdir()
    other.mkdir()
    outside = srv_place / "outside.txt"
    outside.write_text("keep\n")
    os.symlink(outside, mirror / "README.md")
    os.symlink(other, mirror / "bobs")
    mtime_ns = 1_700_000_000 * 10 ** 9

    def write() -> None:
        fd = os.open(str(mirror), os.O_RDONLY | os.O_DIRECTORY)
        try:
            patchwire_agent.write_content(fd, [("README.md", "100755", mtime_ns, b"# demo\n")])
            with pytest.raises((patchwire.UnsafePath, OSError)):
                patchwire_agent.write_content(fd, [("bobs/x.txt", "100644", 0, b"x\n")])
        finally:
            os.close(fd)
    if who == "account":
        hand_to_account(srv_place)
        in_child_as_account(write)
    else:
        write()
    assert outside.read_text() == "keep\n" and list(other.iterdir()) == []
    written = mirror / "README.md"
    assert not written.is_symlink() and written.read_bytes() == b"# demo\n"
    assert (written.stat().st_mode & 0o777, written.stat().st_mtime_ns) == (0o755, mtime_ns)
    assert sorted(p.name for p in mirror.iterdir()) == ["README.md", "bobs"]  # no temporary file left

def test_a_link_in_the_mirror_reads_and_deletes_nothing_of_another_user(laptop, agent):
    """The laptop's rsync can put a symlink in its mirror. Named in `changed`, git refuses to
    hash beneath it; named in `deleted`, the no-follow delete leaves its target alone: another
    user's file never reaches this user's snapshot, and is never removed."""
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    other = agent.state_dir / "users" / "bob" / "mirror" / "secret-project"
    other.mkdir(parents=True)
    (other / "secret.txt").write_bytes(b"bob's secret\n")
    secret_blob = git(laptop.root, "hash-object", str(other / "secret.txt")).strip()
    os.symlink(other, mirror_of(agent, laptop) / "bobs")
    project = patchwire.Project(laptop.root, "laptop")
    tree = json.loads(project.state_file("last_sync.json").read_text())["tree"]
    ask = {"project": "laptop", "prompt": "x", "tree": tree, "base": tree, "changed": [], "deleted": []}
    status, _ = agent.json("POST", "/v1/ask", {**ask, "deleted": ["bobs/secret.txt"]})
    assert status == 202 and (other / "secret.txt").read_bytes() == b"bob's secret\n"
    status, answer = agent.json("POST", "/v1/ask", {**ask, "changed": ["bobs/secret.txt"]})
    assert (status, answer["code"]) == (409, "tree_mismatch") and "secret" not in answer["error"].replace(
        "bobs/secret.txt", "")
    home = agent.state_dir / "users" / "alice" / "projects" / "laptop"
    found = subprocess.run(["git", "--git-dir", str(home / "git"), "cat-file", "-e", secret_blob])
    assert found.returncode != 0, "bob's file was hashed into alice's store"


# ------------------------------------------------------------------ the laptop's listing of changes


def full_listing(project: patchwire.Project, rules: patchwire.SyncRules):
    files = project.scan(rules)
    return files.paths, files.held


def recorded_paths(project: patchwire.Project) -> List[str]:
    return sorted(p.decode() for p in project.git("ls-files", "-z").split(b"\0") if p)


def record_as_a_full_listing_would(project: patchwire.Project, rules: patchwire.SyncRules,
                                   changes: patchwire.FileList, name: str) -> str:
    """Record a listing of changes; the record, what is held back and the count must be a
    full listing's. The record's tree."""
    tree = project.record(changes, rules)
    paths, held = full_listing(project, rules)
    assert recorded_paths(project) == paths, name
    assert changes.held == held, name
    assert changes.count == len(paths), name
    assert tree == patchwire.Project(project.root, "p").git.text("write-tree"), name
    return tree


MUTATIONS = [
    ("edit", lambda r: (r / "a.txt").write_text("edited\n")),
    ("touch only", lambda r: os.utime(r / "b.txt")),
    ("new untracked", lambda r: (r / "new.txt").write_text("new\n")),
    ("new in a new folder", lambda r: (r / "deep/er").mkdir(parents=True) or (r / "deep/er/x.txt").write_text("x\n")),
    ("delete", lambda r: (r / "b.txt").unlink()),
    ("now ignored", lambda r: (r / ".gitignore").write_text("*.log\nnew.txt\n")),
    ("a secret", lambda r: (r / ".env").write_text("TOKEN=1\n")),
    ("grows over the cap", lambda r: (r / "big.bin").write_bytes(b"\0" * 2 * 1024 * 1024)),
    ("shrinks under it", lambda r: (r / "big.bin").write_bytes(b"small\n")),
    ("a symlink", lambda r: os.symlink("a.txt", r / "link")),
    ("file becomes folder", lambda r: (r / "a.txt").unlink() or (r / "a.txt").mkdir() or (r / "a.txt/in").write_text("i\n")),
    # (a tuple: write_text's count of characters would end an `or` before git ran)
    ("staged", lambda r: ((r / "staged.txt").write_text("s\n"), git(r, "add", "staged.txt"))),
    ("staged then deleted", lambda r: (r / "staged.txt").unlink()),
    ("tracked but ignored", lambda r: ((r / "ign.log").write_text("l\n"), git(r, "add", "-f", "ign.log"))),
    ("a fifo", lambda r: os.mkfifo(r / "pipe")),
]


# the mutations after which the quick scan (git's untracked cache on the record's index)
# cannot tell and says so: a .gitignore that changed, the user's index listing other files
QUICK_CANNOT_TELL = {"now ignored", "staged", "tracked but ignored"}


@pytest.mark.parametrize("quick", [False, True], ids=["listing", "quick"])
def test_the_listing_of_changes_agrees_with_a_full_listing(tmp_path, quick):
    """Either scan of changes (the quick one leaving to the listing what it cannot tell)
    records what a full listing would, after each kind of change."""
    root = make_repo(tmp_path / "p", {"a.txt": b"a\n", "b.txt": b"b\n", ".gitignore": b"*.log\n",
                                      "big.bin": b"small\n"})
    project = patchwire.Project(root, "p")
    rules = patchwire.SyncRules(max_file_mb=1)
    project.record(project.scan(rules), rules)
    fell_back = set()
    for name, mutate in MUTATIONS:
        mutate(root)
        changes = project.scan_quick(rules) if quick else None
        if changes is None:
            fell_back.add(name)
            changes = project.scan_changes(rules)
        assert changes is not None, name
        tree = record_as_a_full_listing_would(project, rules, changes, name)
        # the same tree a full record makes from scratch
        fresh = tmp_path / f"fresh-{len(name)}-{name.replace(' ', '-')}"
        os.environ["XDG_STATE_HOME"], saved = str(fresh), os.environ.get("XDG_STATE_HOME")
        try:
            other = patchwire.Project(root, "p")
            assert other.record(other.scan(rules), rules) == tree, name
        finally:
            os.environ["XDG_STATE_HOME"] = saved or ""
    assert fell_back == (QUICK_CANNOT_TELL if quick else {name for name, _ in MUTATIONS})


@WHO
def test_a_repository_inside_the_project_keeps_the_listing_of_changes(srv_place, monkeypatch, who):
    """With `[sync] submodules = true` a repository inside the project (a submodule, a nested
    clone) is listed whole by its own git, and the rest of the project by the listing of
    changes, not by a full scan at every sync (a 20,000-file project with one such
    repository of 50 files: a warm ask 1.7x as long as without it). After each kind of change,
    in the project and inside that repository at once, the record is what a full listing
    makes; a repository gone, come or not checked out any more leaves it to the full scan,
    and so does a link put in its place (never listed through). Also as an ordinary account."""
    as_who(who, srv_place, functools.partial(repositories_inside, srv_place, monkeypatch))


def repositories_inside(base: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))
    files = {"a.txt": b"a\n", "b.txt": b"b\n", ".gitignore": b"*.log\n", "big.bin": b"small\n"}
    root = make_repo(base / "p", files)
    inner = make_repo(root / "vendor/lib", files)
    project = patchwire.Project(root, "p")
    rules = patchwire.SyncRules(max_file_mb=1, submodules=True)
    first = project.scan(rules)
    assert first.nested == ["vendor/lib/"] and "vendor/lib/a.txt" in first.paths
    project.record(first, rules)
    for name, mutate in MUTATIONS:
        mutate(root)
        mutate(inner)
        changes = project.scan_changes(rules)
        assert changes is not None and changes.nested == ["vendor/lib/"] and changes.quick is None, name
        record_as_a_full_listing_would(project, rules, changes, name)
    # a second repository inside: the full scan finds it, the next listing of changes lists both
    make_repo(root / "apps/one", {"main.dart": b"void main() {}\n"})
    assert project.scan_changes(rules) is None
    project.record(project.scan(rules), rules)
    (root / "apps/one/main.dart").write_text("void main() { run(); }\n")
    changes = project.scan_changes(rules)
    assert changes is not None and changes.paths == ["apps/one/main.dart"], changes and changes.paths
    record_as_a_full_listing_would(project, rules, changes, "second repository")
    # a link where the repository was, to a repository elsewhere: sent as the link, as a full
    # listing does, never the files of the repository it points to (before, they were listed
    # through it, and rsync would have sent them)
    elsewhere = make_repo(base / "elsewhere", {"secret-ish.txt": b"not the project's\n", "x.txt": b"x\n"})
    shutil.move(str(root / "apps/one"), str(base / "one-moved"))
    os.symlink(elsewhere, root / "apps/one")
    assert project.scan_changes(rules) is None
    linked = project.scan(rules)
    assert "apps/one" in linked.paths and not [p for p in linked.paths if p.startswith("apps/one/")]
    project.record(linked, rules)
    assert project.scan_changes(rules).paths == []
    os.unlink(root / "apps/one")
    shutil.move(str(base / "one-moved"), str(root / "apps/one"))
    project.record(project.scan(rules), rules)
    # no repository any more (its files now the project's own), or its folder emptied
    shutil.rmtree(root / "apps/one/.git")
    assert project.scan_changes(rules) is None
    project.record(project.scan(rules), rules)
    shutil.rmtree(inner / ".git")
    (inner / "c.txt").write_text("now the project's\n")
    assert project.scan_changes(rules) is None
    tree = project.record(project.scan(rules), rules)
    assert project.scan_changes(rules) is not None and project.scan_changes(rules).paths == []
    assert tree == record_as_a_full_listing_would(project, rules, project.scan(rules), "plain folders")


def test_a_submodule_no_longer_checked_out_leaves_the_listing_of_changes_to_the_full_scan(tmp_path):
    """A real submodule: its edits are found by the listing of changes; once `deinit`-ed (its
    folder empty, git still tracking it) the full scan holds it back, and no file of it is
    sent or taken from the project's own listing."""
    lib = make_repo(tmp_path / "lib", {"x.txt": b"x\n"})
    root = make_repo(tmp_path / "p", {"a.txt": b"a\n"})
    git(root, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "mods/lib")
    git(root, "commit", "-qm", "submodule")
    project, rules = patchwire.Project(root, "p"), patchwire.SyncRules(submodules=True)
    project.record(project.scan(rules), rules)
    (root / "mods/lib/x.txt").write_text("y\n")
    changes = project.scan_changes(rules)
    assert changes is not None and changes.paths == ["mods/lib/x.txt"] and changes.removed == []
    record_as_a_full_listing_would(project, rules, changes, "submodule edit")
    git(root, "submodule", "deinit", "-q", "-f", "mods/lib")
    assert project.scan_changes(rules) is None
    files = project.scan(rules)
    assert "mods/lib/" in files.held and not [p for p in files.paths if p.startswith("mods/")]


def quick_project(tmp_path: Path, files: dict):
    root = make_repo(tmp_path / "p", files)
    project, rules = patchwire.Project(root, "p"), patchwire.SyncRules()
    project.record(project.scan(rules), rules)
    return root, project, rules


def test_other_ignore_rules_outside_the_project_leave_the_quick_scan_to_the_listing(tmp_path):
    root, project, rules = quick_project(tmp_path, {"a.txt": b"a\n"})
    (root / "notes.txt").write_text("untracked, sent\n")
    project.record(project.scan_quick(rules), rules)
    assert "notes.txt" in recorded_paths(project)
    (root / ".git/info/exclude").write_text("notes.txt\n")
    assert project.scan_quick(rules) is None
    project.record(project.changes_since_record(rules), rules)
    assert "notes.txt" not in recorded_paths(project)
    assert project.scan_quick(rules) is not None  # the new rules are the store's now
    (root / "other.txt").write_text("o\n")
    git(root, "config", "core.excludesFile", str(tmp_path / "global-ignore"))
    (tmp_path / "global-ignore").write_text("other.txt\n")
    assert project.scan_quick(rules) is None
    project.record(project.changes_since_record(rules), rules)
    assert "other.txt" not in recorded_paths(project)
    quick = project.scan_quick(rules)
    assert quick is not None and quick.paths == []


def test_a_tracked_ignored_file_deleted_then_restored_comes_back_in_a_quick_scan(tmp_path):
    """git's untracked cache never lists an ignored file, nor a tracked one: the record keeps
    the tracked files that were absent, and the quick scan looks at them again."""
    root, project, rules = quick_project(tmp_path, {"a.txt": b"a\n", ".gitignore": b"*.log\n"})
    (root / "kept.log").write_text("forced\n")
    git(root, "add", "-f", "kept.log")
    git(root, "commit", "-qm", "forced")
    project.record(project.changes_since_record(rules), rules)
    assert "kept.log" in recorded_paths(project)
    (root / "kept.log").unlink()
    gone = project.scan_quick(rules)
    assert gone is not None and gone.removed == ["kept.log"]
    project.record(gone, rules)
    assert "kept.log" not in recorded_paths(project)
    git(root, "checkout", "--", "kept.log")
    back = project.scan_quick(rules)
    assert back is not None and back.paths == ["kept.log"] and back.count == 3
    project.record(back, rules)
    assert recorded_paths(project) == [".gitignore", "a.txt", "kept.log"]


def full_record_tree(tmp_path: Path, root: Path, rules: patchwire.SyncRules, name: str) -> str:
    """The tree a full listing records from scratch (a store of its own)."""
    os.environ["XDG_STATE_HOME"], saved = str(tmp_path / f"fresh-{name}"), os.environ.get("XDG_STATE_HOME")
    try:
        other = patchwire.Project(root, "p")
        return other.record(other.scan(rules), rules)
    finally:
        os.environ["XDG_STATE_HOME"] = saved or ""


def test_a_sparse_checkout_keeps_the_quick_scan_and_sends_what_it_holds(tmp_path):
    """Files outside a sparse checkout (skip-worktree: git keeps no file for them) are not files
    the user deleted: more of them than QUICK_MAX_ABSENT kept every sync of a sparse monorepo
    from the quick scan (0.42 s against 0.26 s for one change in a 4,000-file cone of 40,000).
    Widening or narrowing the checkout sends or drops its files; a skip-worktree file that is
    here (`update-index --skip-worktree`, to keep a local edit out of commits) still goes."""
    outside = {f"other/pkg{i // 100}/f{i}.txt": b"theirs\n" for i in range(patchwire.QUICK_MAX_ABSENT + 50)}
    root = make_repo(tmp_path / "p", {"app/a.txt": b"a\n", "app/local.cfg": b"shared\n", **outside})
    git(root, "sparse-checkout", "set", "app")
    assert not (root / "other").exists()
    project, rules = patchwire.Project(root, "p"), patchwire.SyncRules()
    files = project.scan(rules)
    assert files.absent == [] and files.paths == ["app/a.txt", "app/local.cfg"]
    assert files.outside_sparse == len(outside)  # the dry run says so
    said = patchwire.render_dry_run(patchwire.dry_run_report(files), full=False)
    assert f"not here, not sent: {len(outside):,} tracked file(s) outside your sparse checkout" in said[-2], said
    project.record(files, rules)
    (root / "app/a.txt").write_text("edited\n")
    quick = project.scan_quick(rules)
    assert quick is not None and quick.paths == ["app/a.txt"] and quick.removed == []
    project.record(quick, rules)

    git(root, "sparse-checkout", "add", "other/pkg3")  # wider: its files come, by the listing
    assert project.scan_quick(rules) is None
    project.record(project.changes_since_record(rules), rules)
    assert [p for p in recorded_paths(project) if p.startswith("other/")] == sorted(
        p for p in outside if p.startswith("other/pkg3/"))
    assert project.git.write_tree() == full_record_tree(tmp_path, root, rules, "wider")

    git(root, "sparse-checkout", "set", "app")  # narrower again: they go
    project.record(project.changes_since_record(rules), rules)
    assert recorded_paths(project) == ["app/a.txt", "app/local.cfg"]
    git(root, "update-index", "--skip-worktree", "app/local.cfg")
    (root / "app/local.cfg").write_text("my local edit\n")
    changes = project.changes_since_record(rules)
    assert changes is not None and changes.paths == ["app/local.cfg"]
    project.record(changes, rules)
    assert project.recorded_file(project.git.write_tree(), "app/local.cfg")[0] == b"my local edit\n"
    assert project.git.write_tree() == full_record_tree(tmp_path, root, rules, "narrower")


def test_a_project_in_a_subfolder_of_its_repository_is_never_scanned_quickly(tmp_path):
    """The quick scan reads the .gitignore files under the project's folder only: a parent's
    rules (here *.log) are the listing's to apply."""
    top = make_repo(tmp_path / "mono", {".gitignore": b"*.log\n", "app/a.txt": b"a\n"})
    project, rules = patchwire.Project(top / "app", "app"), patchwire.SyncRules()
    project.record(project.scan(rules), rules)
    (top / "app/debug.log").write_text("ignored by the parent\n")
    assert project.scan_quick(rules) is None
    assert project.changes_since_record(rules).paths == []


@contextlib.contextmanager
def git_traced(tmp_path: Path):
    """Every git this process starts meanwhile writes GIT_TRACE2_PERF lines to the file
    yielded (through a HOME of its own: Patchwire's git takes no GIT_* variable)."""
    trace, home = tmp_path / "trace", tmp_path / "trace-home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text(f"[trace2]\n\tperfTarget = {trace}\n")
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield trace
    finally:
        os.environ["HOME"] = saved or ""


def test_a_quick_scan_after_the_user_index_changed_runs_no_status_for_nothing(tmp_path):
    """A checkout or `git add` writes the user's index: the files it lists are compared
    first, and when they differ the quick scan leaves it to the listing before any `status`."""
    root, project, rules = quick_project(tmp_path, {"a.txt": b"a\n"})
    (root / "b.txt").write_text("b\n")
    git(root, "add", "b.txt")
    with git_traced(tmp_path) as trace:  # (a Project made here: its git takes HOME as it is made)
        assert patchwire.Project(root, "p").scan_quick(rules) is None
    commands = [line.split("|")[-1].strip() for line in trace.read_text().splitlines() if "| cmd_name" in line]
    assert "ls-files (ls-files)" in commands and not any(c.startswith("status") for c in commands), commands
    project.record(project.changes_since_record(rules), rules)
    (root / "a.txt").write_text("edited\n")
    quick = project.scan_quick(rules)  # the same index again: ls-files and status at once
    assert quick is not None and quick.paths == ["a.txt"]


def test_a_quick_scan_lists_no_folder_of_the_project(tmp_path):
    """What makes it quick: git's untracked cache, kept in the record's index, so `status`
    opens only the folders whose stat data changed (GIT_TRACE2_PERF's counters)."""
    files = {f"d{i}/e{j}/f.txt": b"x\n" for i in range(10) for j in range(10)}
    root = make_repo(tmp_path / "p", files)
    for folder, _, _ in os.walk(root):  # older than the index: git trusts a folder's stat data then
        os.utime(folder, (time.time() - 60, time.time() - 60))
    project, rules = patchwire.Project(root, "p"), patchwire.SyncRules()
    project.record(project.scan(rules), rules)
    project.record(project.scan_quick(rules), rules)  # the untracked cache made
    (root / "d3/e4/new.txt").write_text("new\n")
    with git_traced(tmp_path) as trace:
        quick = project.scan_quick(rules)
    assert quick is not None and quick.paths == ["d3/e4/new.txt"]
    opened = [int(line.rsplit(":", 1)[1]) for line in trace.read_text().splitlines()
              if "read_directo" in line and "opendir:" in line]
    assert opened == [1], opened  # the new file's folder, not all 111


@pytest.mark.parametrize("change", ["rules", "record"])
def test_the_listing_of_changes_needs_its_kept_scan(tmp_path, change):
    root = make_repo(tmp_path / "p", {"a.txt": b"a\n"})
    project = patchwire.Project(root, "p")
    rules = patchwire.SyncRules()
    project.record(project.scan(rules), rules)
    assert project.scan_changes(rules) is not None
    if change == "rules":
        assert project.scan_changes(patchwire.SyncRules(exclude=["a.txt"])) is None
    else:  # the store's index no longer holds the kept scan's tree
        project.git("update-index", "--force-remove", "a.txt")
        assert project.scan_changes(rules) is None


def test_a_nested_repository_needs_a_full_listing(tmp_path):
    root = make_repo(tmp_path / "p", {"a.txt": b"a\n"})
    project = patchwire.Project(root, "p")
    rules = patchwire.SyncRules()
    project.record(project.scan(rules), rules)
    make_repo(root / "inner", {"i.txt": b"i\n"})
    changes = project.scan_changes(rules)
    assert changes is not None and changes.held == {"inner/": "a git repository inside the project: set "
                                                    "`submodules = true` under [sync] to send its files"}
    with_submodules = patchwire.SyncRules(submodules=True)
    project.record(project.scan(with_submodules), with_submodules)
    make_repo(root / "inner2", {"j.txt": b"j\n"})
    assert project.scan_changes(with_submodules) is None
    assert Path(root / "inner2/j.txt").exists()


def test_symlinks_are_found_in_the_listing_without_a_loop_over_every_entry():
    import patchwire_agent as pa

    def rec(mode: str, path: str) -> bytes:
        return f"{mode} {'a' * 40} 0\t{path}".encode() + b"\0"
    listing = (rec("120000", "first") + rec("100644", "dir/120000 not a link") + rec("120000", "d/l 2")
               + rec("100755", "x\t120000 y") + rec("120000", "last"))
    assert pa.symlink_entries(listing) == ["first", "d/l 2", "last"]
    assert pa.symlink_entries(listing.rstrip(b"\0")) == ["first", "d/l 2", "last"]
    assert pa.symlink_entries(b"") == []


def test_a_first_snapshot_packs_its_blobs_and_later_asks_still_build_on_them(laptop, agent):
    """The first (full) snapshot stores every file in one pack (the agent reads them, git
    fast-import writes them), not a loose object per file; the job folder checked out from it and the next ask of changes see the
    laptop's bytes, binary and empty files included."""
    files = {"bin/blob.dat": bytes(range(256)) * 40, "empty.txt": b"", "one.txt": b"x",
             **{f"lib/m{i}.py": b"v = %d\n" % i * 50 for i in range(30)}}
    for rel, data in files.items():
        (laptop.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (laptop.root / rel).write_bytes(data)
    laptop.ask(script(*copy_steps("bin/blob.dat", "lib/m7.py", "empty.txt")), "--yes", check=0)
    assert seen(laptop, "bin/blob.dat") == files["bin/blob.dat"] and seen(laptop, "lib/m7.py") == files["lib/m7.py"]
    assert seen(laptop, "empty.txt") == b""
    (store,) = agent.state_dir.glob("users/*/projects/*/git")
    packs = list((store / "objects/pack").glob("*.pack"))
    assert len(packs) == 1
    packed = git(store, "show-index", input=packs[0].with_suffix(".idx").read_bytes())
    blob = git(laptop.root, "hash-object", "bin/blob.dat").strip()
    assert blob in packed and len(packed.splitlines()) >= len(files)  # the empty and 1-byte files too
    assert not (store / "objects" / blob[:2] / blob[2:]).exists()
    assert git(store, "fsck", "--no-dangling") == ""
    (laptop.root / "lib/m7.py").write_bytes(b"changed = 1\n")
    laptop.ask(script(*copy_steps("lib/m7.py", "bin/blob.dat")), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "changes"
    assert seen(laptop, "lib/m7.py") == b"changed = 1\n" and seen(laptop, "bin/blob.dat") == files["bin/blob.dat"]
    assert len(list((store / "objects/pack").glob("*.pack"))) == 1  # an ask of changes writes loose objects


def test_a_big_projects_first_job_folder_is_its_mirror_and_every_later_ask_still_sees_the_laptops_files(
        laptop, agent):
    """From ProjectRepo.ADOPT_MIN_FILES files on, the first job folder is the mirror moved into
    place (no second write of every file); the mirror starts again empty. Asks of changes, a
    lost laptop state (the full form) and a forced sync all go on from that mirror, and every
    job sees the laptop's files."""
    gen = laptop.root / "gen"
    for i in range(patchwire_agent.ProjectRepo.ADOPT_MIN_FILES + 100):
        (gen / f"d{i // 500}").mkdir(parents=True, exist_ok=True)
        (gen / f"d{i // 500}" / f"f{i}.txt").write_bytes(b"file %d\n" % i)
    laptop.ask(script(*copy_steps("README.md", "gen/d3/f1600.txt")), "--yes", check=0)
    assert seen(laptop, "gen/d3/f1600.txt") == b"file 1600\n"
    mirror = mirror_of(agent, laptop)
    assert list(mirror.iterdir()) == []  # its files are the job folder's now
    (laptop.root / "gen/d3/f1600.txt").write_bytes(b"edited\n")
    laptop.ask(script(*copy_steps("README.md", "gen/d3/f1600.txt", "gen/d9/f4999.txt")), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "changes"
    assert seen(laptop, "gen/d3/f1600.txt") == b"edited\n" and seen(laptop, "gen/d9/f4999.txt") == b"file 4999\n"
    # the laptop's state folder lost: a full sync by checksum and the full form, whose snapshot
    # reads the mirror again (refilled), and the job sees the laptop's files
    shutil.rmtree(patchwire.Project(laptop.root, "laptop").private_dir)
    (laptop.root / "gen/d3/f1600.txt").write_bytes(b"edited again\n")
    laptop.ask(script(*copy_steps("gen/d3/f1600.txt", "gen/d0/f1.txt")), "--yes", check=0)
    assert snapshots(agent)[-1]["form"] == "full"
    assert seen(laptop, "gen/d3/f1600.txt") == b"edited again\n" and seen(laptop, "gen/d0/f1.txt") == b"file 1\n"
    # a forced sync fills the mirror again, every file compared by checksum
    laptop.run("sync", "--force", check=0)
    assert (mirror / "gen/d9/f4999.txt").read_bytes() == b"file 4999\n"
    laptop.ask(script(*copy_steps("gen/d9/f4999.txt")), "--yes", check=0)
    assert seen(laptop, "gen/d9/f4999.txt") == b"file 4999\n"
    assert all(status in (200, 409) for status in asks(agent))


def record_watching_rsync(tmp_path: Path) -> Tuple[Path, Path, dict]:
    """(an rsync that marks its start, the record's notes, the environment of a git whose
    record waits (5 s at most) for that mark and notes "overlapped" or "waited", then takes
    the mark away for the next round)."""
    started, saw = tmp_path / "rsync.started", tmp_path / "record.saw"
    rsync = tmp_path / "marking-rsync"
    rsync.write_text(f"#!/bin/sh\ntouch {started}\nexec rsync \"$@\"\n")
    rsync.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "git").write_text(
        "#!/bin/sh\n"
        f"case \" $* \" in *\" update-index --add \"*)\n"
        f"  i=0; while [ ! -e {started} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done\n"
        f"  if [ -e {started} ]; then echo overlapped >> {saw}; else echo waited >> {saw}; fi; rm -f {started};;\n"
        "esac\n"
        f"exec {shutil.which('git')} \"$@\"\n")
    (bindir / "git").chmod(0o755)
    return rsync, saw, {"PATH": f"{bindir}:{os.environ['PATH']}"}


def test_a_full_sync_starts_rsync_beside_its_record_not_after_it(laptop, agent, tmp_path):
    """A first sync sends every listed file, so its rsync starts while the record hashes them:
    a git whose record waits (5 s at most) for rsync to have started shows it. Sent after the
    record, as before, the record would wait the 5 s in vain ("waited")."""
    rsync, saw, path = record_watching_rsync(tmp_path)
    write_sync(laptop, rsync=str(rsync))
    first = laptop.run("sync", env=path, check=0)
    assert "synced 3 of 3 file(s)" in first.err and saw.read_text().split() == ["overlapped"], first.err
    # and the sync was whole: the box's copy is the laptop's
    assert {p.name for p in mirror_of(agent, laptop).rglob("*") if p.is_file()} >= {"README.md"}


def many_changes(laptop, count: int = patchwire.SEND_AHEAD_MIN_FILES) -> dict:
    """`count` new files of different sizes and README.md edited: {path: bytes}."""
    files = {f"gen/part_{i % 7}/file_{i:03d}.txt": b"line %d\n" % i * (i % 13 + 1) for i in range(count - 1)}
    files["README.md"] = b"# edited with many others\n"
    for rel, data in files.items():
        (laptop.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (laptop.root / rel).write_bytes(data)
    return files


def test_a_big_listing_of_changes_starts_rsync_beside_its_record(laptop, agent, tmp_path):
    """SEND_AHEAD_MIN_FILES changed files (a branch switch): rsync sends the listed files while
    the record hashes them, as a full sync does; the box's snapshot then holds the laptop's
    tree (no 409) and the AI reads the new bytes. Before, the record came first: it waited the
    5 s in vain."""
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    files = many_changes(laptop)
    rsync, saw, path = record_watching_rsync(tmp_path)
    write_sync(laptop, rsync=str(rsync))
    synced = laptop.run("sync", env=path, check=0)
    assert saw.read_text().split() == ["overlapped"], synced.err
    count = len(files)
    assert f"synced {count} of {count + 2} file(s)" in synced.err  # and src/app.py, .patchwire.toml
    mirror = mirror_of(agent, laptop)
    assert {rel: (mirror / rel).read_bytes() for rel in files} == files
    asked = laptop.ask(script(*copy_steps("README.md", "gen/part_3/file_010.txt")), "--yes", check=0)
    assert "synced: nothing changed" in asked.err, asked.err
    assert snapshots(agent)[-1]["form"] == "changes" and 409 not in asks(agent)
    assert seen(laptop, "README.md") == files["README.md"]
    assert seen(laptop, "gen/part_3/file_010.txt") == files["gen/part_3/file_010.txt"]


def test_a_file_rewritten_while_a_big_listing_of_changes_is_sent_ahead_is_sent_again(laptop, agent, tmp_path):
    """A file rewritten after the listing, while rsync sends ahead of the record: rsync may have
    sent either version, so the round is done again, and the ask's snapshot is the laptop's
    tree (a mirror copy that is not the record's would be a 409)."""
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    files = many_changes(laptop)
    once, late = tmp_path / "once", b"rewritten while sent, and longer than before\n"
    write_sync(laptop, rsync=rsync_once(tmp_path, once, "gen/part_1/file_001.txt", late))
    asked = laptop.ask(script(*copy_steps("gen/part_1/file_001.txt")), "--yes", check=0)
    assert "gen/part_1/file_001.txt changed while being sent; sending again" in asked.err, asked.err
    assert seen(laptop, "gen/part_1/file_001.txt") == late
    assert (mirror_of(agent, laptop) / "README.md").read_bytes() == files["README.md"]
    assert snapshots(agent)[-1]["form"] == "changes" and 409 not in asks(agent)


@pytest.mark.parametrize("first", [False, True], ids=["changes", "first-sync"])
def test_a_file_rewritten_after_rsync_sent_ahead_but_before_the_record_goes_again(laptop, agent, tmp_path, first):
    """rsync sent ahead ends and finds nothing moved; then, before the record hashes it, a file
    is rewritten: the record holds bytes the box never got. The sync must look again once the
    record is made, and send that file again; before, it said it had synced, and the next
    ask's snapshot was refused (409) and every file sent again by checksum."""
    if not first:
        laptop.ask(script({"say": "first"}), "--yes", check=0)
    many_changes(laptop)
    rel, done, once = "gen/part_1/file_001.txt", tmp_path / "rsync.done", tmp_path / "once"
    late = tmp_path / "late"
    late.write_bytes(b"written by an editor after rsync, before the record\n")
    rsync = tmp_path / "ending-rsync"
    rsync.write_text(f"#!/bin/sh\nrsync \"$@\"; rc=$?; touch {done}; exit $rc\n")
    rsync.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "git").write_text(  # the record waits for rsync's end, then the file is rewritten (once)
        "#!/bin/sh\n"
        f"case \" $* \" in *\" update-index --add \"*)\n"
        f"  if [ ! -e {once} ]; then touch {once}; i=0\n"
        f"    while [ ! -e {done} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n"
        f"    sleep 0.3; cp {late} {laptop.root / rel}; fi;;\n"
        "esac\n"
        f"exec {shutil.which('git')} \"$@\"\n")
    (bindir / "git").chmod(0o755)
    write_sync(laptop, rsync=str(rsync))
    synced = laptop.run("sync", env={"PATH": f"{bindir}:{os.environ['PATH']}"}, check=0)
    assert f"{rel} changed while being sent; sending again" in synced.err, synced.err
    assert (mirror_of(agent, laptop) / rel).read_bytes() == late.read_bytes()
    write_sync(laptop, rsync="rsync")
    laptop.ask(script(*copy_steps(rel)), "--yes", check=0)
    assert seen(laptop, rel) == late.read_bytes() and 409 not in asks(agent)


def test_files_recorded_by_a_killed_sync_go_after_a_big_listing_sent_ahead(laptop, agent, tmp_path):
    """A sync killed after its record, before it noted what it sent, leaves changes that the
    next listing does not see (the record holds them) and the mirror has not: after the files
    sent ahead, the ones the record's diff names besides go too."""
    laptop.ask(script({"say": "first"}), "--yes", check=0)
    first = {f"small/f{i}.txt": b"small %d\n" % i for i in range(10)}
    for rel, data in first.items():
        (laptop.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (laptop.root / rel).write_bytes(data)
    killer = tmp_path / "killing-rsync"
    killer.write_text("#!/bin/sh\nkill -9 $PPID\nexit 255\n")  # the laptop CLI, gone after its record
    killer.chmod(0o755)
    write_sync(laptop, rsync=str(killer))
    assert laptop.run("sync", check=None).returncode == -9
    second = many_changes(laptop)
    write_sync(laptop, rsync="rsync")
    synced = laptop.run("sync", check=0)
    count = len(second)
    assert (f"synced {count} of {count + 12} file(s)" in synced.err  # sent ahead
            and f"synced 10 of {count + 12} file(s)" in synced.err), synced.err  # then the rest
    mirror = mirror_of(agent, laptop)
    wanted = {**first, **second}
    assert {rel: (mirror / rel).read_bytes() for rel in wanted} == wanted, synced.err
    laptop.ask(script(*copy_steps("small/f3.txt")), "--yes", check=0)
    assert seen(laptop, "small/f3.txt") == first["small/f3.txt"]
    assert snapshots(agent)[-1]["form"] == "changes" and 409 not in asks(agent)


def rsync_once(tmp_path: Path, once: Path, rel: str, data: bytes) -> str:
    """An rsync whose first run rewrites `rel` with `data` before sending."""
    wrapper = tmp_path / "rewriting-rsync"
    (tmp_path / "late").write_bytes(data)
    wrapper.write_text(f"#!/bin/sh\n[ -e {once} ] || {{ touch {once}; cp {tmp_path / 'late'} {rel}; }}\n"
                       "exec rsync \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("asked_before", [0, patchwire.TrackedPaths.FIND_MAX], ids=["searched", "from-a-set"])
def test_a_tracked_path_is_told_by_its_whole_record(asked_before):
    """`ls-files -z -t --cached` records: a tag, a space, the path. A path that is the end
    of another, or holds a space, is not taken for it."""
    tracked = patchwire.TrackedPaths(b"H a b\0H dir/x b\0S skipped\0M both m\0")
    tracked.asked = asked_before
    asked = [b"a b", b"b", b"dir/x b", b"x b", b"skipped", b"both m", b"m", b"a", b"H a b", b"dir"]
    assert [tracked(raw) for raw in asked] == [True, False, True, False, True, True, False, False, False, False]
