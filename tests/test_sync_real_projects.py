"""Sync that is right on real projects (issue 10): a project in a monorepo's subfolder, in a
worktree or a sparse checkout, in a folder without git; the sync record in Patchwire's own
store (a real `git push --mirror` carries none of it, the user's `git gc` cannot break it);
changes found by content; files that change or vanish while they are sent; the size cap,
heavy folders, submodules; the deny-list table sent through a real rsync; the dry run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict

import pytest

import patchwire
from conftest import Laptop, drive_pty, git, make_repo, script, snapshot_tree
from test_apply import as_walls_account
from test_box_walls import account_agent, as_who, hand_to_account

try:
    import tomllib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]
import tomli_w


def write_sync(lap: Laptop, **keys) -> None:
    path = lap.root / ".patchwire.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("sync", {}).update(keys)
    path.write_text(tomli_w.dumps(data))
    lap.run("trust", check=0)  # as the laptop's own account (some tests run it as another)


def dry(lap: Laptop) -> dict:
    return json.loads(lap.run("sync", "--dry-run", "--json", check=0).out)


def mirror_of(agent, lap: Laptop) -> Path:
    project = patchwire.default_project_name(lap.root)
    return Path(agent.json("GET", f"/v1/me?project={project}")[1]["mirror"])  # where the box keeps it


def mirror_files(agent, lap: Laptop) -> Dict[str, bytes]:
    return {rel: data for rel, (_, _, data) in snapshot_tree(mirror_of(agent, lap)).items()}


def write(root: Path, files: Dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


# ------------------------------------------------------------------ where the project's root is

MONOREPO = {
    ".gitignore": b"*.log\n/samples/app/generated/\n",
    "README.md": b"# mono\n",
    "packages/core/lib.dart": b"core\n",
    "samples/app/lib/main.dart": b"void main() {}\n",
    "samples/app/pubspec.yaml": b"name: app\n",
    "samples/other/x.dart": b"other\n",
}
LOCAL = {"samples/app/lib/new.dart": b"untracked\n", "samples/app/debug.log": b"ignored by the parent\n",
         "samples/app/generated/g.dart": b"ignored by the parent, anchored\n",
         "samples/app/.env": b"SECRET=1\n"}
APP_FILES = {"lib/main.dart", "pubspec.yaml", "lib/new.dart"}


def monorepo(tmp_path: Path) -> Path:
    top = make_repo(tmp_path / "mono", MONOREPO)
    write(top, LOCAL)
    return top


def kind_toplevel(tmp_path: Path) -> Path:
    root = make_repo(tmp_path / "app", {k[len("samples/app/"):]: v for k, v in MONOREPO.items()
                                        if k.startswith("samples/app/")})
    write(root, {"lib/new.dart": b"untracked\n", "debug.log": b"x", ".gitignore": b"*.log\n/generated/\n",
                 "generated/g.dart": b"g", ".env": b"S=1\n"})
    return root


def kind_subfolder(tmp_path: Path) -> Path:
    return monorepo(tmp_path) / "samples/app"


def kind_worktree_subfolder(tmp_path: Path) -> Path:
    top = make_repo(tmp_path / "mono", MONOREPO)
    git(top, "worktree", "add", "-q", str(tmp_path / "wt"))
    write(tmp_path / "wt", LOCAL)
    return tmp_path / "wt/samples/app"


def kind_sparse_subfolder(tmp_path: Path) -> Path:
    top = make_repo(tmp_path / "mono", MONOREPO)
    git(top, "sparse-checkout", "set", "samples/app")
    assert not (top / "packages").exists()
    write(top, LOCAL)
    return top / "samples/app"


def kind_no_git(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    write(root, {"lib/main.dart": b"void main() {}\n", "pubspec.yaml": b"name: app\n",
                 "lib/new.dart": b"untracked\n", "debug.log": b"x", "generated/g.dart": b"g",
                 ".gitignore": b"*.log\ngenerated/\n", ".env": b"S=1\n"})
    return root


def kind_ignored_by_an_enclosing_repo(tmp_path: Path) -> Path:
    home = make_repo(tmp_path / "home", {".gitignore": b"*\n!.bashrc\n", ".bashrc": b"x\n"})
    root = kind_no_git(home / "code")
    return root


KINDS = {"ignored-by-home-repo": kind_ignored_by_an_enclosing_repo, "toplevel": kind_toplevel,
         "subfolder": kind_subfolder, "worktree-subfolder": kind_worktree_subfolder,
         "sparse-subfolder": kind_sparse_subfolder, "no-git": kind_no_git}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_same_files_go_twice_in_a_row_wherever_the_root_is(tmp_path, agent, kind):
    root = KINDS[kind](tmp_path)
    lap = Laptop(root)
    lap.init(agent)
    assert (root / ".patchwire.toml").is_file()  # written where init ran, a subfolder too
    expected = APP_FILES | ({".gitignore"} if kind in ("toplevel", "no-git", "ignored-by-home-repo") else set())
    first = dry(lap)
    assert set(first["files"]) == expected, first
    assert first["held_back"] == {".env": "secret deny-list: .env"}
    for _ in range(2):  # the listing does not depend on the record of the sync before
        synced = lap.run("sync", check=0)
        assert set(dry(lap)["files"]) == expected
        assert set(mirror_files(agent, lap)) == expected
    assert "synced: nothing changed since the last sync (%d files)" % len(expected) in synced.err
    done = lap.ask(script({"append": "lib/main.dart", "text": "// by the AI\n"}), "--yes", check=0)
    assert ("not a git repository" in done.err) == (kind in ("no-git", "ignored-by-home-repo"))
    assert (root / "lib/main.dart").read_bytes() == b"void main() {}\n// by the AI\n"


def test_init_in_a_subfolder_writes_its_config_there_and_the_top_stays_clean(tmp_path, agent):
    app = kind_subfolder(tmp_path)
    lap = Laptop(app)
    lap.init(agent)
    top = app.parent.parent
    assert not (top / ".patchwire.toml").exists()
    assert json.loads(lap.run("doctor", "--json", check=0).out)["ok"] is True
    assert not (top / ".git/patchwire").exists()  # nothing of Patchwire's in the user's .git


def test_a_subfolder_project_merges_3_way_against_its_record_from_any_folder_inside(tmp_path, agent):
    app = kind_subfolder(tmp_path)
    long = "".join(f"line {i}\n" for i in range(1, 31))
    write(app, {"lib/long.txt": long.encode()})
    lap = Laptop(app)
    lap.init(agent)
    inside = Laptop(app / "lib")  # commands run anywhere inside the project
    assert set(dry(inside)["files"]) == APP_FILES | {"lib/long.txt"}
    inside.ask(script({"write": "lib/long.txt", "text": long.replace("line 5\n", "AI 5\n")}), "--no-apply", check=0)
    (app / "lib/long.txt").write_text(long.replace("line 7\n", "mine 7\n"))
    merged = inside.run("apply", "--yes", check=0)
    assert "3-way merged with your changes" in merged.err
    assert (app / "lib/long.txt").read_text() == long.replace("line 5\n", "AI 5\n").replace("line 7\n", "mine 7\n")


# ------------------------------------------------------------------ the sync record


def test_push_mirror_and_clone_carry_nothing_of_patchwire(tmp_path, agent):
    root = make_repo(tmp_path / "laptop", {"a.txt": b"a\n", "b.txt": b"b\n"})
    untracked = b"untracked, never committed: %d\n" % time.time_ns()
    staged = b"staged, never committed: %d\n" % time.time_ns()
    (root / "video.bin").write_bytes(untracked)
    (root / "b.txt").write_bytes(staged)
    git(root, "add", "b.txt")
    # what Patchwire 0.3 left in the user's repository is taken away on the first run
    git(root, "update-ref", "refs/patchwire/laptop/synced", git(root, "rev-parse", "HEAD").strip())
    (root / ".git/patchwire").mkdir()
    (root / ".git/patchwire/HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git/patchwire/last_job").write_text("abc123\n")
    lap = Laptop(root)
    lap.init(agent)
    lap.run("sync", check=0)
    assert lap.last_job() == "abc123"  # the old state file moved over
    blob = git(root, "hash-object", "video.bin").strip()
    assert subprocess.run(["git", "cat-file", "-e", blob], cwd=root).returncode != 0
    assert not (root / ".git/patchwire").exists()
    assert "patchwire" not in git(root, "for-each-ref")
    assert not (root / ".git/objects/info/alternates").exists()
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(root, "push", "-q", "--mirror", str(bare))
    refs = git(bare, "for-each-ref", "--format=%(refname)").split()
    assert refs == ["refs/heads/main"]
    for sha in (blob, git(root, "hash-object", "b.txt").strip()):
        assert subprocess.run(["git", "cat-file", "-e", sha], cwd=bare).returncode != 0
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--mirror", str(root), str(clone))
    assert git(clone, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main"]
    # and the record has them all: a 3-way merge base readable through the store
    project = patchwire.Project(root, "laptop")
    tree = json.loads(project.state_file("last_sync.json").read_text())["tree"]
    assert project.recorded(tree)
    assert project.recorded_file(tree, "video.bin") == (untracked, "100644")
    assert project.recorded_file(tree, "b.txt") == (staged, "100644")
    assert project.recorded_file(tree, "a.txt") == (b"a\n", "100644")


def test_the_users_gc_cannot_drop_what_a_record_needs(tmp_path):
    root = make_repo(tmp_path / "laptop", {"a.txt": b"a\n", "b.txt": b"b\n"})
    staged = b"staged, then unstaged and collected\n"
    (root / "b.txt").write_bytes(staged)
    git(root, "add", "b.txt")
    sha = git(root, "rev-parse", ":b.txt").strip()
    project = patchwire.Project(root, "laptop")
    tree, _ = project.record_paths(["a.txt", "b.txt"])
    (root / "b.txt").write_bytes(b"b\n")
    git(root, "reset", "-q")
    git(root, "reflog", "expire", "--expire=now", "--all")
    git(root, "gc", "-q", "--prune=now")
    assert subprocess.run(["git", "cat-file", "-e", sha], cwd=root).returncode != 0  # gone there
    again = patchwire.Project(root, "laptop")
    assert again.recorded_file(tree, "b.txt") == (staged, "100644")
    # a blob of the user's HEAD is not copied: it is read through the alternates
    head_blob = git(root, "rev-parse", "HEAD:a.txt").strip()
    own = again.private_dir / "objects" / head_blob[:2] / head_blob[2:]
    assert not own.exists() and again.recorded_file(tree, "a.txt") == (b"a\n", "100644")


@pytest.mark.parametrize("who", ["root", "account"])
def test_old_records_and_their_blobs_are_pruned(srv_place, monkeypatch, who):
    monkeypatch.setattr(patchwire, "RECORDS_KEPT", 2)
    monkeypatch.setattr(patchwire, "RECORDS_PRUNE_AT", 3)
    as_who(who, srv_place, lambda: old_records_and_their_blobs_are_pruned(srv_place))


def old_records_and_their_blobs_are_pruned(place: Path) -> None:
    root = make_repo(place / "laptop", {"a.txt": b"a\n"})
    project = patchwire.Project(root, "laptop")
    (root / "big.bin").write_bytes(b"big untracked content\n" * 1000)
    big = git(root, "hash-object", "big.bin").strip()
    trees = [project.record_paths(["a.txt", "big.bin"])[0]]
    (root / "big.bin").unlink()
    loose = project.private_dir / "objects" / big[:2] / big[2:]
    assert loose.exists()
    for n in range(3):
        if n == 2:  # git prune keeps what recent objects point to: make them all old
            hours_ago = time.time() - 7200
            for obj in (project.private_dir / "objects").glob("??/*"):
                os.utime(obj, (hours_ago, hours_ago))
        (root / "a.txt").write_text(f"a{n}\n")
        trees.append(project.record_paths(["a.txt"])[0])
    refs = git(project.private_dir, "for-each-ref", "--format=%(refname)").split()
    assert refs == sorted(f"refs/records/{t}" for t in trees[-2:])
    assert not loose.exists()
    assert not project.recorded(trees[0]) and project.recorded(trees[-1])
    assert project.recorded_file(trees[-1], "a.txt") == (b"a2\n", "100644")
    # the record of a job that may still be applied stays, however many syncs come after
    project.pin_record("abc123", trees[-1], ["abc123"])
    for n in range(3, 7):
        (root / "a.txt").write_text(f"a{n}\n")
        project.record_paths(["a.txt"])
    assert project.recorded_file(trees[-1], "a.txt") == (b"a2\n", "100644")
    project.pin_record("def456", trees[-1], ["def456"])
    assert git(project.private_dir, "for-each-ref", "--format=%(refname)", "refs/jobs/").split() == ["refs/jobs/def456"]


@pytest.mark.parametrize("who", ["root", "account"])
def test_pruning_old_records_keeps_what_undo_would_put_back(srv_place, monkeypatch, who):
    """The last apply's undo blobs (a loose copy of an edit, written when the apply replaced it)
    survive the pruning of old records an hour later; once another apply replaces the undo log,
    they may go."""
    monkeypatch.setattr(patchwire, "RECORDS_KEPT", 1)
    monkeypatch.setattr(patchwire, "RECORDS_PRUNE_AT", 2)
    as_who(who, srv_place, lambda: pruning_keeps_what_undo_would_put_back(srv_place))


def pruning_keeps_what_undo_would_put_back(place: Path) -> None:
    root = make_repo(place / "laptop", {"a.txt": b"a\n"})
    project = patchwire.Project(root, "laptop")
    project.record_paths(["a.txt"])
    (root / "a.txt").write_bytes(b"the user's edit, only here\n")
    before = patchwire.UndoLog(project).save(["a.txt"], set())
    (root / "a.txt").write_bytes(b"what the apply wrote\n")
    patchwire.UndoLog(project).record(before)
    blob = before[0]["blob"]
    loose = project.private_dir / "objects" / blob[:2] / blob[2:]

    def syncs_an_hour_later(n: int) -> None:
        for i in range(n):
            hours_ago = time.time() - 7200
            for obj in (project.private_dir / "objects").glob("??/*"):
                os.utime(obj, (hours_ago, hours_ago))
            (root / "b.txt").write_text(f"sync {i} {time.time()}\n")
            project.record_paths(["a.txt", "b.txt"])
    syncs_an_hour_later(3)
    assert loose.exists() and git(project.private_dir, "cat-file", "blob", blob) == "the user's edit, only here\n"
    assert patchwire.UndoLog(project).undo() == ["a.txt"]
    assert (root / "a.txt").read_bytes() == b"the user's edit, only here\n"
    (project.state_file("undo.json")).write_text("[]")  # a later apply's log names other blobs
    (root / "a.txt").write_bytes(b"edited again\n")  # and no record holds the edit any more
    syncs_an_hour_later(3)
    assert not loose.exists()


# ------------------------------------------------------------------ changes the stat cannot see


def test_an_edit_that_keeps_size_and_mtime_is_sent_and_force_compares_by_checksum(laptop, agent):
    laptop.run("sync", check=0)
    path = laptop.root / "src/app.py"
    before = os.stat(path)
    path.write_bytes(b"print('HELLO')\n")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    synced = laptop.run("sync", check=0)
    assert "synced 1 of 3 file(s)" in synced.err
    mirror = mirror_of(agent, laptop)
    assert (mirror / "src/app.py").read_bytes() == b"print('HELLO')\n"
    # the box's copy goes wrong behind our back, size and mtime kept: --force compares content
    stale = os.stat(mirror / "src/app.py")
    (mirror / "src/app.py").write_bytes(b"print('WRONG')\n")
    os.utime(mirror / "src/app.py", ns=(stale.st_atime_ns, stale.st_mtime_ns))
    assert "nothing changed" in laptop.run("sync", check=0).err
    forced = laptop.run("sync", "--force", check=0)
    assert "synced 1 of 3 file(s)" in forced.err
    assert (mirror / "src/app.py").read_bytes() == b"print('HELLO')\n"


def test_a_409_names_the_paths_and_the_ask_sends_them_again(laptop, agent):
    laptop.run("sync", check=0)
    # the agent's own message names the paths
    (laptop.root / "only-here.txt").write_text("x\n")
    project = patchwire.Project(laptop.root, "laptop")
    tree, manifest = project.record_paths(project.file_list(patchwire.DEFAULT_DENY, [])[0])
    status, answer = agent.json("POST", "/v1/ask", {"project": "laptop", "tree": tree, "files": manifest,
                                                    "prompt": "x"})
    assert status == 409 and answer["error"].endswith("in 1 file(s): only-here.txt")
    # the laptop sends the named paths again and the ask goes through
    laptop.run("sync", check=0)
    mirror = mirror_of(agent, laptop)
    (mirror / "README.md").write_bytes(b"# changed on the box\n")
    asked = laptop.ask(script({"write": "src/app.py", "text": "print('AI')\n"}), "--yes", check=0)
    assert "the box's copy differs from what was sent in README.md; sending again" in asked.err
    assert (mirror / "README.md").read_bytes() == b"# demo\n"
    assert (laptop.root / "src/app.py").read_bytes() == b"print('AI')\n"


def test_a_box_copy_that_differs_twice_is_named_exit_1(laptop, agent, tmp_path):
    laptop.run("sync", check=0)
    (laptop.root / "README.md").write_text("# new\n")
    spoil = tmp_path / "rsync-spoils-the-mirror"
    spoil.write_text(f"#!/bin/sh\nrsync \"$@\"; rc=$?\necho spoiled > {mirror_of(agent, laptop)}/README.md\nexit $rc\n")
    spoil.chmod(0o755)
    write_sync(laptop, rsync=str(spoil))
    before = agent.json("GET", "/v1/jobs")[1]["jobs"]
    asked = laptop.ask(script({"say": "never"}), "--yes")
    assert asked.returncode == 1, asked.err
    assert "the box's copy differs from what was sent in README.md; sending again" in asked.err
    assert "the box's copy still differs from what was sent in README.md, after sending it again" in asked.err
    assert "Traceback" not in asked.err and agent.json("GET", "/v1/jobs")[1]["jobs"] == before


def test_symlinks_count_in_synced_n_of_m(laptop):
    laptop.run("sync", check=0)
    (laptop.root / "link").symlink_to("README.md")
    assert "synced 1 of 4 file(s)" in laptop.run("sync", check=0).err


# ------------------------------------------------------------------ files that move while sent


def rsync_wrapper(tmp_path: Path, body: str) -> str:
    """An rsync that first does `body` (in the project folder), then runs the real one: a
    file changed or removed between the listing and the transfer, every time or once."""
    path = tmp_path / "rsync-wrapper"
    path.write_text(f"#!/bin/sh\n{body}\nexec rsync \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_a_file_rewritten_during_every_sync_is_named_exit_1(laptop, agent, tmp_path):
    calls = tmp_path / "calls"
    write_sync(laptop, rsync=rsync_wrapper(tmp_path, f'echo x >> {calls}; date +%N > src/app.py'))
    result = laptop.run("sync")
    assert result.returncode == 1, result.err
    assert "src/app.py changed while being sent; sending again" in result.err
    assert "src/app.py changed while being sent, twice; is a watcher running" in result.err
    assert "exclude" in result.err and "Traceback" not in result.err
    assert calls.read_text().count("x") == 2  # retried once
    before = agent.json("GET", "/v1/jobs")[1]["jobs"]
    asked = laptop.ask(script({"say": "never"}), "--yes")
    assert asked.returncode == 1 and "src/app.py changed while being sent, twice" in asked.err
    assert agent.json("GET", "/v1/jobs")[1]["jobs"] == before
    # stopped: the next sync sends it (it is remembered as unsure) and the ask goes through
    write_sync(laptop, rsync="rsync")
    laptop.ask(script({"say": "fine now"}), "--yes", check=0)
    assert (mirror_of(agent, laptop) / "src/app.py").read_bytes() == (laptop.root / "src/app.py").read_bytes()


def test_a_file_rewritten_once_during_the_sync_is_sent_again(laptop, agent, tmp_path):
    once = tmp_path / "once"
    write_sync(laptop, rsync=rsync_wrapper(tmp_path, f'[ -e {once} ] || {{ touch {once}; echo late > README.md; }}'))
    laptop.run("sync", check=0)
    assert (mirror_of(agent, laptop) / "README.md").read_bytes() == b"late\n"
    laptop.ask(script({"say": "ok"}), "--yes", check=0)


def test_a_temporary_file_that_vanishes_is_not_an_agent_error(laptop, agent, tmp_path):
    (laptop.root / "notes.txt.swp").write_bytes(b"editor swap file\n")
    write_sync(laptop, rsync=rsync_wrapper(tmp_path, "rm -f notes.txt.swp"))
    result = laptop.run("sync", check=0)
    assert "notes.txt.swp changed while being sent; sending again" in result.err
    assert "notes.txt.swp" not in mirror_files(agent, laptop)
    assert "README.md" in mirror_files(agent, laptop)


def test_a_writer_process_during_asks_is_named_never_exit_3(laptop, agent, tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "end = time.monotonic() + 60\n"
        "n = 0\n"
        "while time.monotonic() < end and os.path.exists(sys.argv[2]):\n"
        "    n += 1\n"
        "    open(sys.argv[1], 'w').write('// generated %09d\\n' % n)\n"),
        str(laptop.root / "src/gen.dart"), str(laptop.root / "README.md")])
    try:
        deadline = time.monotonic() + 30
        while not (laptop.root / "src/gen.dart").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(2):
            result = laptop.ask(script({"say": "x"}), "--yes")
            assert result.returncode == 1, result.err
            assert "src/gen.dart changed while being sent, twice; is a watcher running" in result.err
    finally:
        writer.kill()
        writer.wait()


def test_rsync_exit_codes_23_and_24_map_to_local_causes(tmp_path, laptop):
    gone, unreadable = patchwire.rsync_failures(
        b'file has vanished: "/p/root/tmp/a.swp"\n'
        b'rsync: [sender] link_stat "/p/root/./b.tmp" failed: No such file or directory (2)\n'
        b'rsync: [sender] send_files failed to open "/p/root/secret.db": Permission denied (13)\n'
        b"rsync warning: some files vanished before they could be transferred (code 24)\n", Path("/p/root"))
    assert gone == ["tmp/a.swp", "b.tmp"] and unreadable == {"secret.db": "Permission denied"}
    # a file this user cannot read (root reads everything, so rsync says it here)
    write_sync(laptop, rsync=rsync_wrapper(tmp_path, (
        'echo \'rsync: [sender] send_files failed to open "\'$PWD\'/README.md": Permission denied (13)\' >&2; '
        'exit 23')))
    result = laptop.run("sync")
    assert result.returncode == 1, result.err
    assert "cannot read README.md: Permission denied" in result.err
    assert "`chmod u+r README.md`" in result.err and "agent" not in result.err


def test_the_rsyncs_of_a_split_sync_each_report_what_vanished_and_their_counts_add_up(tmp_path, monkeypatch):
    """send_files over parts: the files each part's rsync found gone, and the files and bytes
    both sent, as one report; a part that fails otherwise is the sync's error."""
    monkeypatch.setattr(patchwire, "RSYNC_SPLIT_MIN_FILES", 4)
    root, dest = tmp_path / "project", tmp_path / "mirror"
    files = {f"{d}/f{i}.txt": b"x" * (i + 1) for d in ("a", "b") for i in range(5)}
    make_repo(root, files)
    dest.mkdir()
    cfg = types.SimpleNamespace(rsync="rsync", root=root, ssh="")  # what send_files reads of a LaptopConfig
    listed = sorted([*files, "a/gone-early.txt", "b/gone-late.txt"])
    counts = patchwire.send_files(cfg, listed, str(dest))
    assert sorted(counts["gone"]) == ["a/gone-early.txt", "b/gone-late.txt"]  # one from each part
    assert (counts["files"], counts["bytes"]) == (10, sum(len(d) for d in files.values()))
    assert all((dest / rel).read_bytes() == data for rel, data in files.items())
    # the second part's rsync fails (the first one's files went): the sync fails, naming it
    failing = tmp_path / "rsync-fails-on-b"
    failing.write_text(f"#!{sys.executable}\nimport os, sys\ndata = sys.stdin.buffer.read()\n"
                       "if b'b/' in data:\n    sys.exit('rsync: connection unexpectedly closed (code 12)')\n"
                       "r, w = os.pipe(); os.write(w, data); os.close(w); os.dup2(r, 0)\n"
                       "os.execvp('rsync', ['rsync', *sys.argv[1:]])\n")
    failing.chmod(0o755)
    cfg.rsync = str(failing)
    with pytest.raises(patchwire.AgentError, match=r"rsync failed \(exit 1\): rsync: connection unexpectedly closed"):
        patchwire.send_files(cfg, sorted(files), str(dest))


# ------------------------------------------------------------------ files this user cannot read
# Root reads every file whatever its mode, so these run as the ordinary account pw-walls: the
# laptop's CLI and the agent both (rsync writes into the agent's mirror, as over SSH). A file
# git cannot read is no file that moved: the sync names it and the fix, and nothing changes.


@pytest.fixture
def walls_laptop(srv_place):
    agent = account_agent(srv_place)
    root = make_repo(srv_place / "laptop", {"README.md": b"# demo\n", "secret.txt": b"s\n", "docs/a.md": b"a\n"})
    hand_to_account(srv_place)
    agent.start()
    Laptop(root).init(agent)  # writing .patchwire.toml needs tomli_w, which the account's Python lacks
    lap = as_walls_account(Laptop(root), srv_place)  # every file under srv_place becomes the account's
    lap.run("sync", check=0)
    yield lap, agent
    agent.stop()


def state_files(place: Path) -> Dict[str, bytes]:
    """Patchwire's laptop state (the sync record, its index, last_sync.json), by bytes; the
    record's index by the entries it holds (a `git status` of the quick scan may refresh its
    stat data and untracked cache, a cache of what the files are, not the record)."""
    state = place / "home/.local/state"
    return {str(p.relative_to(state)): index_entries(p) if p.name == "index" else p.read_bytes()
            for p in sorted(state.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def index_entries(index: Path) -> bytes:
    return subprocess.run(["git", "--git-dir", str(index.parent), "ls-files", "-s", "-z"], check=True,
                          stdout=subprocess.PIPE, env={**os.environ, "GIT_INDEX_FILE": str(index)}).stdout


def refused_as_unreadable(lap: Laptop, agent, what: str, fix: str) -> None:
    """`sync` and `ask` both exit 1 naming `what` and `fix`; the record, the mirror and the
    box's jobs stay as they were."""
    place = lap.root.parent
    before = (state_files(place), mirror_files(agent, lap), agent.json("GET", "/v1/jobs")[1]["jobs"])
    for args in (["sync"], ["ask", script({"say": "never"}), "--yes"]):
        result = lap.run(*args)
        assert result.returncode == 1, result.err
        assert f"cannot read {what}: Permission denied" in result.err, result.err
        assert fix in result.err and "exclude" in result.err and ".gitignore" in result.err, result.err
        assert "changed while being" not in result.err and "Traceback" not in result.err, result.err
        assert "rsync:" not in result.err and "fatal:" not in result.err, result.err
        after = (state_files(place), mirror_files(agent, lap), agent.json("GET", "/v1/jobs")[1]["jobs"])
        assert after == before


def test_an_unreadable_file_is_named_with_the_fix_and_nothing_changes(walls_laptop):
    lap, agent = walls_laptop
    (lap.root / "secret.txt").write_bytes(b"changed\n")
    (lap.root / "secret.txt").chmod(0)
    refused_as_unreadable(lap, agent, "secret.txt", "chmod u+r secret.txt")
    (lap.root / "secret.txt").chmod(0o644)
    lap.run("sync", check=0)
    assert mirror_files(agent, lap)["secret.txt"] == b"changed\n"


def test_an_unreadable_file_in_a_full_sync_is_named(walls_laptop):
    lap, agent = walls_laptop
    (lap.root / "secret.txt").chmod(0)
    result = lap.run("sync", "--force")  # the whole listing, not the changes since the last sync
    assert result.returncode == 1, result.err
    assert "cannot read secret.txt: Permission denied" in result.err and "changed while" not in result.err, result.err


def test_an_unreadable_folder_is_named_with_the_fix(walls_laptop):
    lap, agent = walls_laptop
    (lap.root / "docs/a.md").write_bytes(b"changed\n")
    (lap.root / "docs").chmod(0)
    try:
        refused_as_unreadable(lap, agent, "the folder docs", "chmod u+rx docs")
    finally:
        (lap.root / "docs").chmod(0o755)
    lap.run("sync", check=0)
    assert mirror_files(agent, lap)["docs/a.md"] == b"changed\n"


@pytest.mark.parametrize("unreadable", ["secret.txt", "docs"])
def test_a_file_rsync_cannot_read_is_named_not_dumped(walls_laptop, unreadable):
    """git read the file, then it became unreadable before rsync sent it: rsync's exit 23 and
    its own lines become the same message, never a raw rsync dump."""
    lap, agent = walls_laptop
    (lap.root / "secret.txt").write_bytes(b"changed\n")
    (lap.root / "docs/a.md").write_bytes(b"changed\n")
    wrapper = lap.root.parent / "bin/rsync"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nchmod 0 {unreadable}\nexec rsync \"$@\"\n")
    wrapper.chmod(0o755)
    hand_to_account(wrapper.parent)
    write_sync(lap, rsync=str(wrapper))
    try:
        result = lap.run("sync")
    finally:
        (lap.root / unreadable).chmod(0o755 if unreadable == "docs" else 0o644)
    what, fix = (("secret.txt", "chmod u+r secret.txt") if unreadable == "secret.txt"
                 else ("the folder docs", "chmod u+rx docs"))
    assert result.returncode == 1, result.err
    assert f"cannot read {what}: Permission denied" in result.err, result.err
    assert fix in result.err and "exclude" in result.err, result.err
    assert "rsync:" not in result.err and "vanished" not in result.err and "Traceback" not in result.err, result.err
    write_sync(lap, rsync="rsync")
    lap.run("sync", check=0)
    assert mirror_files(agent, lap)["secret.txt"] == b"changed\n"
    assert mirror_files(agent, lap)["docs/a.md"] == b"changed\n"


def test_root_reads_a_mode_000_file_and_folder_and_sends_them(laptop, agent):
    """The same modes as root (how CI runs the CLI): root reads them, so they go as usual."""
    laptop.run("sync", check=0)
    (laptop.root / "README.md").write_bytes(b"# root reads this\n")
    (laptop.root / "README.md").chmod(0)
    (laptop.root / "src/app.py").write_bytes(b"print('root')\n")
    (laptop.root / "src").chmod(0)
    try:
        laptop.run("sync", check=0)
    finally:
        (laptop.root / "src").chmod(0o755)
    files = mirror_files(agent, laptop)
    assert files["README.md"] == b"# root reads this\n" and files["src/app.py"] == b"print('root')\n"


def test_what_git_says_it_cannot_read_is_told_from_its_other_failures():
    stderr = (b'error: open("a b.txt"): Permission denied\n'
              b'error: lstat("d/f"): Permission denied\n'
              b"e/g: Operation not permitted\n"
              b"warning: could not open directory 'h/': Permission denied\n"
              b"fatal: Unable to create '/home/me/.local/state/x/index.lock': Permission denied\n"
              b'error: open("gone.txt"): No such file or directory\n'
              b"fatal: Unable to process path a b.txt\n")
    assert patchwire.git_unreadable(stderr) == {
        "a b.txt": "Permission denied", "d/f": "Permission denied", "e/g": "Operation not permitted",
        "h/": "Permission denied"}
    gone, unreadable = patchwire.rsync_failures(
        b'rsync: [sender] link_stat "/p/d/f" failed: Permission denied (13)\n'
        b'rsync: [sender] link_stat "/p/x/y" failed: Not a directory (20)\n', Path("/p"))
    assert gone == ["x/y"] and unreadable == {"d/f": "Permission denied"}


# ------------------------------------------------------------------ size, heavy folders, submodules


def test_a_60_mb_file_is_held_back_with_a_line_and_sent_when_allowed(laptop, agent):
    with open(laptop.root / "demo.mp4", "wb") as f:
        f.truncate(60 * 1024 * 1024)  # sparse: no time spent writing it
    result = laptop.run("sync", check=0)
    assert ("held back demo.mp4: 60.0 MB, over [sync] max_file_mb = 50: raise it, or add the path to "
            "[sync] allow, to send it") in result.err
    assert "demo.mp4" not in mirror_files(agent, laptop)
    assert "held back: demo.mp4 (60.0 MB" in laptop.run("sync", "--dry-run", check=0).out
    write_sync(laptop, max_file_mb=61)
    laptop.run("sync", check=0)
    assert os.path.getsize(mirror_of(agent, laptop) / "demo.mp4") == 60 * 1024 * 1024


def test_heavy_folders_warned_and_excluded_for_patchwire_only(laptop, agent):
    write(laptop.root, {"web/node_modules/left-pad/index.js": b"module.exports = 1\n" * 50,
                        "web/node_modules/left-pad/package.json": b"{}\n", "web/app.js": b"x\n",
                        "ios/Pods/Lib/a.m": b"a\n"})
    out = laptop.run("sync", "--dry-run", check=0).out
    assert ('warning: web/node_modules/ is not ignored by git: 2 file(s), 953 B would go; to leave it out '
            'for Patchwire only, add `exclude = ["node_modules/"]` under [sync] in .patchwire.toml') in out
    assert "warning: ios/Pods/ is not ignored by git: 1 file(s)" in out
    write_sync(laptop, exclude=["node_modules", "Pods/"])
    report = dry(laptop)
    assert not report["warnings"]
    assert not [p for p in report["files"] if "node_modules" in p or "Pods" in p]
    assert "web/app.js" in report["files"] and ".patchwire.toml" not in report["files"]
    laptop.run("sync", check=0)
    assert set(mirror_files(agent, laptop)) == set(report["files"])
    # tracked files in an excluded folder stay here too (exclude is not only git's --exclude)
    git(laptop.root, "add", "-f", "web/node_modules/left-pad/package.json")
    assert "web/node_modules/left-pad/package.json" not in dry(laptop)["files"]


def test_submodules_and_nested_repositories_go_as_their_files_when_asked(tmp_path, agent):
    lib = make_repo(tmp_path / "lib", {"lib.c": b"int lib;\n", ".gitignore": b"*.o\n"})
    root = make_repo(tmp_path / "laptop", {"main.c": b"int main;\n"})
    git(root, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "vendor/lib")
    git(root, "commit", "-qm", "submodule")
    write(root, {"vendor/lib/lib.o": b"object", "vendor/lib/new.c": b"int n;\n"})
    make_repo(root / "nested", {"n.txt": b"nested\n"})
    lap = Laptop(root)
    lap.init(agent)
    report = dry(lap)
    assert report["held_back"]["vendor/lib/"].startswith("a submodule: set `submodules = true` under [sync]")
    assert report["held_back"]["nested/"].startswith("a git repository inside the project: set `submodules")
    write_sync(lap, submodules=True)
    report = dry(lap)
    assert {"vendor/lib/lib.c", "vendor/lib/new.c", "vendor/lib/.gitignore", "nested/n.txt"} <= set(report["files"])
    assert "vendor/lib/lib.o" not in report["files"] and not report["held_back"]
    lap.ask(script({"append": "vendor/lib/lib.c", "text": "int more;\n"}), "--yes", check=0)
    assert (root / "vendor/lib/lib.c").read_bytes() == b"int lib;\nint more;\n"
    assert set(mirror_files(agent, lap)) == set(report["files"])
    # a submodule that is not checked out is said so, not listed through the parent
    git(root, "submodule", "deinit", "-q", "-f", "vendor/lib")
    assert dry(lap)["held_back"]["vendor/lib/"] == "a submodule that is not checked out (git submodule update --init)"


# ------------------------------------------------------------------ the deny-list

# (path, tracked in git, held back by) ; None: it goes
DENY_TABLE = [
    (".git-credentials", False, ".git-credentials"),
    ("home/.docker/config.json", False, ".docker/config.json"),
    (".kube/config", False, ".kube/config"),
    ("infra/terraform.tfstate", False, "terraform.tfstate"),
    ("infra/terraform.tfstate.backup", False, "terraform.tfstate.*"),
    ("infra/prod.tfvars", False, "*.tfvars"),
    (".env_local", False, ".env_*"),
    (".env-prod", False, ".env-*"),
    ("web/env.local", False, "env.local"),
    (".dev.vars", False, ".dev.vars"),
    ("conf/.htpasswd", False, ".htpasswd"),
    ("putty.ppk", False, "*.ppk"),
    ("keys/release.asc", False, "*.asc"),
    ("ID_RSA", False, "id_rsa*"),
    ("Id_Ed25519.PUB", False, "id_ed25519*"),
    ("serviceAccountKey.json", False, "serviceAccountKey*.json"),
    ("functions/firebase-adminsdk-abc12.json", False, "*firebase-adminsdk*.json"),
    ("my-project-firebase-adminsdk-x1.json", False, "*firebase-adminsdk*.json"),
    ("server.key.bak", False, "*.key.bak"),
    ("deploy/secrets/db.yaml", False, "secrets/"),
    ("secrets/deep/er/token", False, "secrets/"),
    (".yarnrc.yml", False, ".yarnrc.yml"),
    ("ci/settings.xml", False, "settings.xml"),
    ("ios/AuthKey_ABC123.p8", False, "AuthKey_*.p8"),
    ("service_account_prod.json", False, "service_account*.json"),
    ("gcp-keyfile-prod.json", False, "*keyfile*.json"),
    ("android/keystore.properties", False, "keystore.properties"),
    (".ENV", False, ".env"),
    ("android/app/google-services.json", True, "google-services.json"),
    ("assets/test_cert.der", True, "*.der"),
    # these go
    ("lib/env.dart", False, None),
    ("settings.py", False, None),
    ("lib/keys.ts", False, None),
    ("docs/secrets.md", False, "secrets.*"),
    ("src/secretsanta.txt", False, None),
    ("monkey.js", False, None),
    ("terraform/main.tf", False, None),
    ("keyfile.txt", False, None),
]


def test_the_deny_list_table_through_a_real_rsync(tmp_path, agent):
    tracked = {path: b"tracked\n" for path, is_tracked, _ in DENY_TABLE if is_tracked}
    root = make_repo(tmp_path / "laptop", {"README.md": b"# r\n", **tracked})
    write(root, {path: b"secret-ish\n" for path, is_tracked, _ in DENY_TABLE if not is_tracked})
    lap = Laptop(root)
    lap.init(agent)
    report = dry(lap)
    for path, is_tracked, pattern in DENY_TABLE:
        if pattern is None:
            assert path in report["files"], path
            continue
        why = report["held_back"].get(path, "")
        assert why.startswith(f"secret deny-list: {pattern}"), (path, why)
        note = f'; tracked in git: probably not a secret; allow with `[sync] allow = ["{path}"]`'
        assert why.endswith(note) == is_tracked, why
    lap.run("sync", check=0)
    sent = mirror_files(agent, lap)
    assert set(sent) == set(report["files"])
    assert not {path for path, _, pattern in DENY_TABLE if pattern} & set(sent)
    # allow matches at any depth, like deny
    write_sync(lap, allow=["app/google-services.json", "test_cert.der"])
    lap.run("sync", check=0)
    assert {"android/app/google-services.json", "assets/test_cert.der"} <= set(mirror_files(agent, lap))


def test_matching_is_one_compiled_pass_not_fnmatch(tmp_path, monkeypatch):
    root = tmp_path / "big"
    write(root, {f"pkg{i % 20}/mod{i}.py": b"x" for i in range(2000)})
    write(root, {"pkg3/.env": b"S=1\n", "pkg4/server.pem": b"k"})

    def no_fnmatch(*args):
        raise AssertionError("fnmatch called")
    monkeypatch.setattr(patchwire.fnmatch, "fnmatchcase", no_fnmatch)
    monkeypatch.setattr(patchwire.fnmatch, "fnmatch", no_fnmatch)
    paths, held = patchwire.Project(root, "big").file_list(patchwire.DEFAULT_DENY, [])
    assert len(paths) == 2000 and set(held) == {"pkg3/.env", "pkg4/server.pem"}
    assert patchwire.denied_by("a/B/ID_RSA.pub", patchwire.DEFAULT_DENY, []) == "id_rsa*"
    assert patchwire.denied_by("x/[odd]*name?.key", ["*.KEY"], []) == "*.KEY"
    assert patchwire.denied_by("a/.env.example", patchwire.DEFAULT_DENY, [".env.example"]) is None
    assert patchwire.denied_by("config.pem", ["/config.pem"], []) == "/config.pem"
    assert patchwire.denied_by("sub/config.pem", ["/config.pem"], []) is None
    assert patchwire.denied_by("a/.aws/sso/cache/x.json", patchwire.DEFAULT_DENY, []) == ".aws/*"


# ------------------------------------------------------------------ the dry run


def test_dry_run_totals_last_list_on_request_names_escaped(laptop):
    odd = "evil\x1b[31mred\nline.txt"
    write(laptop.root, {odd: b"x\n", "docs/a.md": b"a" * 3000, ".env": b"S=1\n"})
    (laptop.root / os.fsdecode(b"raw\xff.txt")).write_bytes(b"r")  # not UTF-8
    write_sync(laptop, allow=["never-there.cfg"])
    result = laptop.run("sync", "--dry-run", check=0)
    assert result.err == ""
    lines = result.out.splitlines()
    assert lines[-1] == "would send 5 file(s), 3.0 KB; 2 held back (--list lists every file)"
    assert "by top-level folder:" in lines
    assert any(l.split() == ["docs/", "1", "file(s)", "2.9", "KB"] for l in lines)
    assert any(l.split()[:2] == ["./", "3"] for l in lines)
    assert "held back: .env (secret deny-list: .env)" in lines
    assert f"held back: raw\\xff.txt ({patchwire.NOT_UTF8})" in lines  # the box's API carries names as UTF-8
    assert any(l.startswith('warning: [sync] allow pattern "never-there.cfg" matches no file git lists') for l in lines)
    assert "README.md" not in lines and "\x1b" not in result.out
    listed = laptop.run("sync", "--dry-run", "--list", check=0).out.splitlines()
    assert "README.md" in listed and "evil^[[31mred^Jline.txt" in listed
    assert f"held back: raw\\xff.txt ({patchwire.NOT_UTF8})" in listed
    assert listed[-1].startswith("would send 5 file(s)")
    wrong = laptop.run("sync", "--list")
    assert wrong.returncode == 2 and "--list goes with --dry-run" in wrong.err


def test_dry_run_is_paged_on_a_terminal(laptop, tmp_path):
    write(laptop.root, {f"many/f{i}.txt": b"x" for i in range(60)})
    pager = tmp_path / "pager"
    pager.write_text("#!/bin/sh\nsed 's/^/PAGED: /'\n")
    pager.chmod(0o755)
    lap = Laptop(laptop.root, env={"PAGER": str(pager)})
    out = drive_pty(lap, ["sync", "--dry-run", "--list"], [], prompts=())
    assert "PAGED: many/f59.txt" in out and "PAGED: would send 63 file(s)" in out


def test_the_conflict_hint_names_the_job(laptop):
    laptop.ask(script({"write": "README.md", "text": "# by the AI\n"}), "--no-apply", check=0)
    job = laptop.last_job()
    (laptop.root / "README.md").write_bytes(b"# mine\n")
    refused = laptop.run("apply", job, "--yes", input=b"\n")
    assert refused.returncode == 5
    assert f"`patchwire diff {job}` shows the AI's change" in refused.err
    assert f"`patchwire apply {job} --keep-conflicts`" in refused.err


KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def test_secrets_under_other_names_and_behind_a_linked_folder_stay_home(laptop, agent, tmp_path):
    """A private key named `deploy_key` or `ci/github_rsa`, a keystore's backup, a token file,
    a shell history, `.env` with a newline after it, and a tracked folder swapped for a link to
    a folder outside the project (rsync would read through it): none leaves, on a first sync or
    a forced one. Files without an extension that hold no key still go."""
    elsewhere = tmp_path / "private-config"
    write(elsewhere, {"settings.ini": b"db_password = SECRET-FROM-HOME\n"})
    write(laptop.root, {"config/settings.ini": b"db_password = changeme\n"})
    subprocess.run(["git", "add", "config"], cwd=laptop.root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "config"],
                   cwd=laptop.root, check=True)
    shutil.rmtree(laptop.root / "config")
    (laptop.root / "config").symlink_to(elsewhere)
    secrets = {"deploy_key": KEY, "ci/github_rsa": KEY, "tools/signer": b"PuTTY-User-Key-File-3: ssh-ed25519\n",
               "android/upload-keystore.jks.bak": b"\xfe\xed\xfe\xed\x00\x00\x00\x02", ".vault-token": b"hvs.x\n",
               ".bash_history": b"export TOKEN=x\n", ".env\n": b"S=1\n", "kubeconfig": b"token: x\n", "ops/builder": KEY}
    write(laptop.root, {**secrets, "Makefile": b"all:\n\ttrue\n", "LICENSE": b"MIT\n"})
    for args in (("sync",), ("sync", "--force")):
        laptop.run(*args)
        sent = mirror_files(agent, laptop)
        assert not set(secrets) & set(sent) and "config/settings.ini" not in sent, sorted(sent)  # (the link goes, as a link)
        assert not [p for p, data in sent.items() if "SECRET-FROM-HOME" in str(data)]
        assert sent["Makefile"] == b"all:\n\ttrue\n" and sent["LICENSE"] == b"MIT\n"
    listed = laptop.run("sync", "--dry-run", "--list").out
    assert "ops/builder (holds a private key or keystore (PRIVATE KEY))" in listed, listed
    assert "tools/signer (holds a private key or keystore (PuTTY-User-Key-File))" in listed
    assert "beneath a folder that is a symlink" in listed, listed
