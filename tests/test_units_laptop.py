"""Pure logic of the laptop CLI (patchwire.py), called directly on small inputs: the process
tests reach it only through a whole ask. Each case states the bytes in and out: the hunks a
partial apply renders, git's quoted names, the strict patch reader, the config schema, values
shown to a person, and following a job's event stream across dropped connections."""

from __future__ import annotations

import functools
import gc
import os
import stat
from pathlib import Path
from typing import List

import pytest

import patchwire as pw
from test_box_walls import as_who

# ------------------------------------------------------------------ Hunk.render

# Two groups of changes separated by context: group 0 replaces b, group 1 adds e2.
HUNK = pw.Hunk(b"@@ -1,5 +1,6 @@ def f():\n",
               [b" a\n", b"-b\n", b"+B\n", b" c\n", b" d\n", b"+e2\n", b" e\n"])


def test_a_hunk_groups_its_changes_by_the_context_between_them():
    assert HUNK.groups == 2
    assert HUNK.group_of == [None, 0, 0, None, None, 1, None]
    assert HUNK.group_text(1) == [b" c\n", b" d\n", b"+e2\n", b" e\n"]


@pytest.mark.parametrize("chosen, delta, expected, change", [
    ({0, 1}, 0, b"@@ -1,5 +1,6 @@ def f():\n a\n-b\n+B\n c\n d\n+e2\n e\n", 1),
    ({0}, 0, b"@@ -1,5 +1,5 @@ def f():\n a\n-b\n+B\n c\n d\n e\n", 0),
    # group 0 left out: its removal turns back into context, its addition is dropped
    ({1}, 0, b"@@ -1,5 +1,6 @@ def f():\n a\n b\n c\n d\n+e2\n e\n", 1),
    # an earlier hunk that was taken in part moves this one's new start
    ({1}, 2, b"@@ -1,5 +3,6 @@ def f():\n a\n b\n c\n d\n+e2\n e\n", 1),
])
def test_a_hunk_renders_only_the_chosen_groups(chosen, delta, expected, change):
    assert HUNK.render(chosen, delta) == (expected, change)


def test_a_hunk_with_no_group_chosen_renders_nothing():
    assert HUNK.render(set(), 0) == (None, 0)


def test_a_no_newline_marker_goes_with_the_line_it_follows():
    hunk = pw.Hunk(b"@@ -1 +1 @@\n", [b"-old\n", b"\\ No newline at end of file\n", b"+new\n",
                                      b"\\ No newline at end of file\n"])
    assert hunk.groups == 1
    text, change = hunk.render({0}, 0)
    assert text == b"@@ -1,1 +1,1 @@\n-old\n\\ No newline at end of file\n+new\n\\ No newline at end of file\n"
    assert change == 0


def test_a_malformed_hunk_header_is_refused():
    with pytest.raises(pw.PatchError, match="malformed hunk header"):
        pw.Hunk(b"@@ -x +1 @@\n", [])


# ------------------------------------------------------------------ path unquoting


@pytest.mark.parametrize("token, name", [
    (b'"a\\tb"', b"a\tb"),
    (b'"\\303\\251t\\303\\251"', "été".encode()),
    (b'"say \\"hi\\""', b'say "hi"'),
    (b'"back\\\\slash"', b"back\\slash"),
    (b'"bell\\a\\n"', b"bell\a\n"),
])
def test_git_quoted_names_read_back_to_their_bytes(token, name):
    assert pw.c_unquote(token) == name
    assert pw.read_name(token) == name
    assert token in pw.spellings(name)


@pytest.mark.parametrize("token, error", [
    (b'"unterminated', "a badly quoted name"),
    (b'"', "a badly quoted name"),
    (b'"a"b"', "a stray quote in a name"),
    (b'"bad \\q escape"', "a bad escape in a name"),
    (b'"octal \\400"', "a bad escape in a name"),
    (b'"trailing \\"', "a bad escape in a name"),
])
def test_badly_quoted_names_are_refused(token, error):
    with pytest.raises(pw.PatchRefused, match=error):
        pw.c_unquote(token)


def test_names_git_would_quote_otherwise_are_refused():
    with pytest.raises(pw.PatchRefused, match="a name quoted in a way git does not"):
        pw.read_name(b'"plain"')  # git writes it bare
    with pytest.raises(pw.PatchRefused, match="a name git would have quoted"):
        pw.read_name(b"tab\there")
    assert pw.read_name(b"plain/name.txt") == b"plain/name.txt"


# ------------------------------------------------------------------ the patch reader

MODIFY = (b"diff --git a/src/m.py b/src/m.py\nindex 1111111..2222222 100644\n--- a/src/m.py\n+++ b/src/m.py\n"
          b"@@ -1,2 +1,2 @@\n x\n-y\n+Y\n")
NEW = (b"diff --git a/new.txt b/new.txt\nnew file mode 100644\nindex 0000000..3333333\n--- /dev/null\n"
       b"+++ b/new.txt\n@@ -0,0 +1,2 @@\n+one\n+two\n")
DELETE = (b"diff --git a/old.txt b/old.txt\ndeleted file mode 100644\nindex 4444444..0000000\n--- a/old.txt\n"
          b"+++ /dev/null\n@@ -1 +0,0 @@\n-gone\n")
RENAME = b"diff --git a/a.txt b/b.txt\nsimilarity index 100%\nrename from a.txt\nrename to b.txt\n"


def test_the_reader_splits_a_patch_into_its_files():
    files = pw.split_patch(MODIFY + NEW + DELETE + RENAME)
    assert [(f.kind, f.path, f.added, f.removed) for f in files] == [
        ("modified", "src/m.py", 1, 1), ("new", "new.txt", 2, 0), ("deleted", "old.txt", 0, 1),
        ("renamed", "b.txt", 0, 0)]
    assert files[3].old_path == "a.txt"
    assert b"".join(f.bytes for f in files) == MODIFY + NEW + DELETE + RENAME  # nothing lost
    assert files[1].whole_new_content() == b"one\ntwo\n"


def test_an_empty_patch_has_no_files():
    assert pw.split_patch(b"") == []


@pytest.mark.parametrize("patch", [
    b"not a patch at all\n",
    MODIFY.replace(b"@@ -1,2 +1,2 @@", b"@@ -1,2 +1,3 @@"),  # counts that do not add up
    MODIFY.replace(b"b/src/m.py\nindex", b"b/../m.py\nindex").replace(b"+++ b/src/m.py", b"+++ b/../m.py"),
])
def test_the_reader_refuses_what_is_not_a_clean_patch(patch):
    with pytest.raises(pw.PatchwireError):
        pw.split_patch(patch)


# ------------------------------------------------------------------ Schema

SPEC = {"name": (str, "x"), "count": (int, 3), "zero_ok": ("int>=0", 0), "ratio": (float, None),
        "flags": ("str_list", []), "env": ("str_table", {}), "on": (bool, False)}


def test_a_schema_fills_defaults_and_keeps_given_values(tmp_path):
    schema = pw.Schema(tmp_path / "c.toml", "t", SPEC)
    assert schema.read({}) == {"name": "x", "count": 3, "zero_ok": 0, "ratio": None, "flags": [], "env": {},
                               "on": False}
    given = {"name": "y", "count": 1, "zero_ok": 0, "ratio": 2, "flags": ["a"], "env": {"K": "v"}, "on": True}
    assert schema.read(given) == given


@pytest.mark.parametrize("data, message", [
    ({"nme": "y"}, "c.toml: unknown key 'nme' in [t]"),
    ({"count": 0}, "c.toml: t.count must be a positive integer, not 0"),
    ({"count": True}, "c.toml: t.count must be a positive integer, not True"),
    ({"zero_ok": -1}, "c.toml: t.zero_ok must be a whole number, 0 or more, not -1"),
    ({"ratio": 0.0}, "c.toml: t.ratio must be a positive number, not 0.0"),
    ({"flags": ["a", 1]}, "c.toml: t.flags must be a list of strings, not ['a', 1]"),
    ({"env": {"K": 1}}, "c.toml: t.env must be a table of strings, not {'K': 1}"),
    ({"on": "yes"}, "c.toml: t.on must be true or false, not 'yes'"),
    ({"name": 5}, "c.toml: t.name must be a string, not 5"),
])
def test_a_schema_names_the_file_and_the_key_it_refuses(tmp_path, data, message):
    with pytest.raises(pw.PatchwireError) as failure:
        pw.Schema(tmp_path / "c.toml", "t", SPEC).read(data)
    assert failure.value.message == f"{tmp_path}/{message}"


def test_a_schema_refuses_a_value_that_is_not_a_table(tmp_path):
    with pytest.raises(pw.PatchwireError, match=r"\[t\] must be a table"):
        pw.Schema(tmp_path / "c.toml", "t", SPEC).read(["a"])
    with pytest.raises(pw.PatchwireError, match="unknown key 'x' in top level") as failure:
        pw.Schema(tmp_path / "c.toml", "", SPEC).read({"x": 1})
    assert failure.value.hint == "known keys: count, env, flags, name, on, ratio, zero_ok"


# ------------------------------------------------------------------ human_value


@pytest.mark.parametrize("value, shown", [
    (True, "yes"), (False, "no"), (0.123456, "0.1235"), (1234567.0, "1.235e+06"), (7, "7"), ("text", "text"),
    ({"in": 10, "cache": None, "ok": True}, "in 10, ok yes"), ({}, "-"), ({"x": None}, "-"),
    ([1, False, 2.5], "1, no, 2.5"), ([], "-"), ({"nested": {"a": 1, "b": [True]}}, "nested a 1, b yes"),
])
def test_human_value_reads_json_as_a_person_would(value, shown):
    assert pw.human_value(value) == shown


# ------------------------------------------------------------------ following a job's event stream


class FakeClient:
    def __init__(self, events):
        self.paths, self.event_list = [], events

    def events(self, job, after=0, follow=True):  # patchwire.Client.events, recorded
        self.paths.append(f"/v1/jobs/{job}/events?after={after}")
        yield from self.event_list

    def job(self, job):  # patchwire.Client.job: still running
        return {"id": job, "status": "running"}


class FakeSession:
    def __init__(self, client):
        self.client = client


def test_a_dropped_stream_continues_after_the_last_event_seen(monkeypatch):
    monkeypatch.setattr(pw.time, "sleep", lambda s: None)

    def first():
        yield {"seq": 1, "job": "abc", "type": "queued"}
        yield {"seq": 2, "job": "abc", "type": "started"}
        raise ConnectionResetError("connection reset by peer")
    client = FakeClient([{"seq": 3, "job": "abc", "type": "text", "text": "hi"},
                         {"seq": 4, "job": "abc", "type": "finished"}])
    seen = []
    end = pw.stream_job(FakeSession(client), first(), seen.append)
    assert end["type"] == "finished"
    assert client.paths == ["/v1/jobs/abc/events?after=2"]
    assert [e["seq"] for e in seen] == [1, 2, 3, 4]


def test_a_stream_that_never_ends_is_an_agent_error(monkeypatch):
    monkeypatch.setattr(pw.time, "sleep", lambda s: None)
    client = FakeClient([{"seq": 2, "job": "abc", "type": "text", "text": "still going"}])
    first = iter([{"seq": 1, "job": "abc", "type": "queued"}])
    with pytest.raises(pw.AgentError, match="ended before the job did"):
        pw.stream_job(FakeSession(client), first, lambda e: None)
    assert 0 < len(client.paths) <= 40  # bounded reconnections (patchwire.RECONNECT_FOR_S)


def test_write_blobs_stores_what_git_would_with_no_process(tmp_path, monkeypatch):
    git_dir = tmp_path / "store.git"
    pw.prepare_private_git_dir(git_dir)
    git = pw.Git(git_dir=git_dir)
    datas = [b"", b"hello\n", bytes(range(256)) * 4000, b"hello\n"]
    expected = [pw.Git(cwd=tmp_path).text("hash-object", "--stdin", input=d) for d in datas]
    monkeypatch.setattr(pw, "run", lambda *a, **k: pytest.fail("a process ran"))
    assert git.write_blobs(datas) == expected
    monkeypatch.undo()
    for blob, data in zip(expected, datas):
        assert git("cat-file", "blob", blob) == data
    assert git.text("fsck", "--strict", "--no-dangling") == ""
    assert pw.Git(cwd=tmp_path / "nowhere").write_blobs([]) == []


WHO = pytest.mark.parametrize("who", ["runner", "account"], ids=["as-the-runner", "as-an-ordinary-account"])


@WHO
@pytest.mark.parametrize("by_rename", [True, False], ids=["by-rename", "unlink-and-create"])
def test_a_write_replaces_what_is_at_the_path_and_never_writes_through_it(tmp_path, srv_place, by_rename, who):
    """Both ways of writing a file (beside and renamed over, or git's unlink and create, the
    Applier's) replace a symlink or a hard link at the path with a new file, and leave
    what the old name led to as it was; a folder in the way is refused and kept. Also as an
    ordinary account (root writes where it may not), whose own file the links lead to."""
    as_who(who, srv_place, functools.partial(write_at_links, srv_place, by_rename=by_rename))


def write_at_links(base: Path, by_rename: bool) -> None:
    root, outside = base / "project", base / "outside"
    (root / "lib").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep\n")
    (root / "lib" / "link").symlink_to(outside / "secret")
    os.link(outside / "secret", root / "lib" / "hard")
    (root / "lib" / "dir").mkdir()
    (root / "lib" / "dir" / "x").write_bytes(b"x")
    for name, data, mode in (("link", b"new\n", "100644"), ("hard", b"run\n", "100755"),
                             ("made", b"fresh\n", "100644"), ("ln", b"made", "120000")):
        pw.write_worktree(root, f"lib/{name}", data, mode, by_rename=by_rename)
    assert (outside / "secret").read_bytes() == b"keep\n"
    assert not (root / "lib" / "link").is_symlink() and (root / "lib" / "link").read_bytes() == b"new\n"
    assert (root / "lib" / "hard").read_bytes() == b"run\n" and (root / "lib" / "hard").stat().st_nlink == 1
    assert stat.S_IMODE((root / "lib" / "hard").stat().st_mode) == 0o755
    assert (root / "lib" / "made").read_bytes() == b"fresh\n"
    assert os.readlink(root / "lib" / "ln") == "made"
    with pytest.raises(IsADirectoryError):
        pw.write_worktree(root, "lib/dir", b"no\n", "100644", by_rename=by_rename)
    assert (root / "lib" / "dir" / "x").read_bytes() == b"x"
    assert sorted(os.listdir(root / "lib")) == ["dir", "hard", "link", "ln", "made"]  # nothing left beside


@pytest.mark.parametrize("failing, half", [("src/c.sh", False), ("src/b.txt", True), ("src/new.txt", True)],
                         ids=["between-unlink-and-create", "half-written", "new-file-half-written"])
def test_a_write_failing_on_a_full_disk_puts_every_file_back(tmp_path, monkeypatch, failing, half):
    """The Applier writes as git apply does, the old file unlinked before the new one is
    created: when the create fails (a full disk, a quota), or the disk fills while the file
    is written and half of it is at the path itself (no temporary beside it), the file and
    the ones written before it hold their old bytes and modes again, a file the patch was
    adding is gone, and the error says nothing was changed."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    old = {"src/a.txt": b"a\n", "src/b.txt": b"b\n" * 1000, "src/c.sh": b"#!/bin/sh\n"}
    for path, data in old.items():
        (root / path).write_bytes(data)
    (root / "src" / "c.sh").chmod(0o755)
    applier = pw.Applier(pw.Project(root, "laptop"), pw.Style(False))
    merged = {"src/a.txt": (b"A\n", "100644", 0), "src/b.txt": (b"B\n" * 2000, "100644", 0),
              "src/c.sh": (b"#!/bin/sh\nexit 1\n", "100755", 0), "src/new.txt": (b"new\n" * 2000, "100644", 0)}
    was = {**dict.fromkeys(merged), **applier.read_here(list(merged))}
    created, failed, left = [], [], []

    def create(fd, name, data, mode, mtime_ns):
        if name == failing.split("/")[-1] and not failed:  # fails once
            failed.append(name)
            if half:
                real_create(fd, name, data[:len(data) // 2], mode, mtime_ns)
                left.append(os.stat(name, dir_fd=fd).st_size)
            raise OSError(28, "No space left on device")
        if not failed:  # the put-back's writes after are not the Applier's
            created.append(name)
        real_create(fd, name, data, mode, mtime_ns)

    real_create = pw._create_at
    monkeypatch.setattr(pw, "_create_at", create)
    with pytest.raises(pw.PatchError) as refused:
        applier.write(merged, was)
    monkeypatch.undo()
    order = ["a.txt", "b.txt", "c.sh", "new.txt"]
    assert created == order[:order.index(failed[0])] and failed == [failing.split("/")[-1]]
    assert left == ([len(merged[failing][0]) // 2] if half else [])  # the half-written file was there
    assert f"could not write {failing} (No space left on device)" in refused.value.message, refused.value.message
    assert "the files written so far were put back, nothing was changed" in refused.value.message
    for path, data in old.items():
        assert (root / path).read_bytes() == data, path
    assert stat.S_IMODE((root / "src" / "c.sh").stat().st_mode) == 0o755
    assert sorted(os.listdir(root / "src")) == ["a.txt", "b.txt", "c.sh"]


@WHO
def test_a_link_raced_in_between_unlink_and_create_is_never_written_through(tmp_path, srv_place, monkeypatch, who):
    """Another process puts a symlink where the Applier just unlinked a file, before it creates
    the new one: the create refuses it (O_EXCL|O_NOFOLLOW), what the link leads to is kept,
    and the put-back replaces the link with the old file. Also as an ordinary account, the
    link leading to the account's own file (root's write would get through anyway)."""
    as_who(who, srv_place, functools.partial(race_a_link, srv_place, monkeypatch=monkeypatch))


def race_a_link(base: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))
    root, secret = base / "project", base / "secret"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.txt").write_bytes(b"a\n")
    secret.write_bytes(b"keep\n")
    applier = pw.Applier(pw.Project(root, "laptop"), pw.Style(False))
    merged = {"src/a.txt": (b"A\n", "100644", 0)}
    raced = []

    def create(fd, name, data, mode, mtime_ns):
        if not raced:
            raced.append(name)
            os.symlink(secret, name, dir_fd=fd)
        real_create(fd, name, data, mode, mtime_ns)

    real_create = pw._create_at
    monkeypatch.setattr(pw, "_create_at", create)
    with pytest.raises(pw.PatchError) as refused:
        applier.write(merged, applier.read_here(list(merged)))
    monkeypatch.undo()
    assert raced == ["a.txt"]
    assert "could not write src/a.txt (File exists)" in refused.value.message, refused.value.message
    assert "nothing was changed" in refused.value.message
    assert secret.read_bytes() == b"keep\n"
    assert not (root / "src" / "a.txt").is_symlink() and (root / "src" / "a.txt").read_bytes() == b"a\n"
    assert os.listdir(root / "src") == ["a.txt"]


def test_a_second_failed_apply_never_writes_over_the_first_ones_copy(tmp_path, monkeypatch):
    """A file that could not be put back is named with a copy of its old bytes. The file then
    holds what git wrote; a second apply failing on it copies those bytes: into a folder of its
    own, so the first copy, the only one of the user's bytes, is still there to put back."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root = tmp_path / "project"
    root.mkdir()
    (root / "a.md").write_bytes(b"what git wrote\n")
    project = pw.Project(root, "laptop")
    ways = []
    for was in (b"the user's own\n", b"what git wrote\n"):  # the first failure, then the second
        applier = pw.Applier(project, pw.Style(False), job="j1")
        said = applier.describe_left([("a.md", "Permission denied")], {"a.md": (was, "100644")})
        ways.append(said.split("yours: `", 1)[1].split("`", 1)[0])
    copies = [way.split()[2] for way in ways]
    assert ways == [f"cp -p {copy} a.md" for copy in copies] and copies[0] != copies[1], ways
    assert Path(copies[0]).read_bytes() == b"the user's own\n"
    assert Path(copies[1]).read_bytes() == b"what git wrote\n"
    assert Path(copies[0]).parent.parent == Path(copies[1]).parent.parent == project.state_file("not-put-back")


@WHO
def test_a_copy_of_a_file_not_put_back_stays_in_its_own_private_folder(tmp_path, srv_place, monkeypatch, who):
    """A lying box's path that climbs out (`..`), or one beneath a name that is a file, gets no
    copy (None: the message then gives no `cp`) and nothing is written outside the copies'
    folder, which is private (mode 700) and new for each failed apply."""
    as_who(who, srv_place, functools.partial(copy_out_of_reach, srv_place, monkeypatch=monkeypatch))


def copy_out_of_reach(base: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))
    root = base / "project"
    root.mkdir()
    project = pw.Project(root, "laptop")
    applier = pw.Applier(project, pw.Style(False))
    kept = applier.keep_copy("docs/a.md", b"mine\n", "100755")
    assert kept is not None and kept.read_bytes() == b"mine\n" and stat.S_IMODE(kept.stat().st_mode) == 0o755
    folder = kept.parent.parent
    assert folder.parent == project.state_file("not-put-back") and stat.S_IMODE(folder.stat().st_mode) == 0o700
    before = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    for path in ("../escaped.md", "docs/../../escaped.md", "docs/a.md/under.md", "/tmp/escaped.md"):
        assert applier.keep_copy(path, b"lying\n", "100644") is None, path
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*")) == before
    assert kept.read_bytes() == b"mine\n"


def test_a_patch_read_leaves_the_collector_on_and_its_lines_frozen():
    """The million lines of a big patch are read with the cycle collector off, then frozen,
    never walked by a collection after (collector_paused)."""
    patch = b"".join(b"diff --git a/f%d b/f%d\nnew file mode 100644\n--- /dev/null\n+++ b/f%d\n@@ -0,0 +1 @@\n+x\n"
                     % (n, n, n) for n in range(50))
    gc.unfreeze()
    try:
        assert gc.isenabled()
        files = pw.split_patch(patch)
        assert gc.isenabled() and len(files) == 50
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(files) and all(o is not files for o in gc.get_objects())  # frozen: out of every generation
    finally:
        gc.unfreeze()


# ------------------------------------------------------------------ the listing against the record


def test_nul_records_splits_a_piece_at_a_time_and_loses_no_record():
    data = b"".join(b"path/%d.txt\0" % i for i in range(1000))
    for piece in (1, 7, 64, 2 ** 18):
        assert list(pw.nul_records(data, piece)) == [b"path/%d.txt" % i for i in range(1000)]
    assert list(pw.nul_records(b"a\0\0b", 1)) == [b"a", b"b"]


def test_listing_walk_finds_new_gone_and_watched_paths_in_one_pass():
    # ls-files -t: untracked ("? ") sorted, then tracked sorted; a conflicted file once per stage
    listing = b"\0".join([b"? a.b", b"? new/x", b"? zz", b"H a-b", b"M c", b"M c", b"M c", b"H d/e", b""])
    recorded = b"\0".join([b"a-b", b"b-gone", b"c", b"d/e", b"old/z", b""])
    walk = pw.ListingWalk(listing, recorded, watch={b"c", b"zz", b"b-gone"})
    assert walk.listed == {b"a.b": False, b"new/x": False, b"zz": False, b"c": True}
    assert walk.gone == [b"b-gone", b"old/z"]
    assert walk.kept == {b"c"}  # watched, listed and recorded
    assert walk.recorded == 5


def test_listing_walk_refuses_a_listing_out_of_order():
    with pytest.raises(pw.ListingOrder):
        pw.ListingWalk(b"H b\0H a\0", b"a\0b\0", watch=set())
    with pytest.raises(pw.ListingOrder):
        pw.ListingWalk(b"H a\0", b"b\0a\0", watch=set())


# ------------------------------------------------------------------ inline_content: files an ask carries


def test_an_ask_carries_only_few_small_regular_files_whose_bytes_are_the_recorded_ones(tmp_path):
    import base64
    import os

    (tmp_path / "a.txt").write_bytes(b"a\n")
    os.utime(tmp_path / "a.txt", ns=(5, 1_000_000_007))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/run.sh").write_bytes(b"#!/bin/sh\n")
    a, run = pw.blob_id(b"a\n", "0" * 40), pw.blob_id(b"#!/bin/sh\n", "0" * 40)
    wanted = {"a.txt": ("100644", a), "sub/run.sh": ("100755", run)}
    content, size = pw.inline_content(tmp_path, wanted, 1 << 20)
    assert content == [["a.txt", "100644", 1_000_000_007, base64.b64encode(b"a\n").decode()],
                       ["sub/run.sh", "100755", (tmp_path / "sub/run.sh").stat().st_mtime_ns,
                        base64.b64encode(b"#!/bin/sh\n").decode()]]
    assert size == 12
    assert pw.inline_content(tmp_path, wanted, 11) == (None, 0)  # the box takes fewer bytes
    assert pw.inline_content(tmp_path, {"a.txt": ("100644", run)}, 1 << 20) == (None, 0)  # moved since recorded
    assert pw.inline_content(tmp_path, {"a.txt": ("120000", a)}, 1 << 20) == (None, 0)  # a symlink: rsync
    assert pw.inline_content(tmp_path, {"gone.txt": ("100644", a)}, 1 << 20) == (None, 0)
    assert pw.inline_content(tmp_path, {}, 1 << 20) == (None, 0)
    many = {f"f{i}": ("100644", a) for i in range(pw.INLINE_SEND_MAX_FILES + 1)}
    assert pw.inline_content(tmp_path, many, 1 << 20) == (None, 0)
    os.symlink(tmp_path / "sub", tmp_path / "via")  # never read through a link on the way
    assert pw.inline_content(tmp_path, {"via/run.sh": ("100755", run)}, 1 << 20) == (None, 0)
    os.symlink(tmp_path / "a.txt", tmp_path / "link.txt")  # nor a link at the path
    assert pw.inline_content(tmp_path, {"link.txt": ("100644", a)}, 1 << 20) == (None, 0)


@WHO
def test_a_lying_box_puts_no_new_file_over_one_outside_the_sparse_checkout(srv_place, who):
    """A patch (a lying box's, a prompt-injected AI's) that calls a file new where git tracks
    one outside the user's sparse checkout is refused before any write, however it spells the
    path: exactly, in other letter case, or in another Unicode form with a character macOS
    ignores (one file there, as on any case-insensitive disk); nor a rename onto it. A path
    git does not track there is an ordinary new file. Also as an ordinary account, in its own repository."""
    as_who(who, srv_place, functools.partial(new_files_outside_a_sparse_checkout, srv_place))


def new_files_outside_a_sparse_checkout(base: Path) -> None:
    from conftest import git, make_repo
    root = make_repo(base / "mono", {"app/main.dart": b"void main() {}\n", "other/shared.txt": b"committed\n",
                                     "other/caf\u00e9.txt": b"committed\n"})
    git(root, "sparse-checkout", "set", "app")
    project = pw.Project(root, "mono")

    def new_file(path: str) -> List[pw.FilePatch]:
        raw = path.encode()
        return pw.split_patch(b"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1 @@\n"
                              b"+the box's\n" % (raw, raw, raw))

    for spelled in ("other/shared.txt", "Other/SHARED.txt", "other/cafe\u0301.txt", "other/caf\u200c\u00e9.txt"):
        with pytest.raises(pw.PatchError) as refused:
            pw.files_in_the_way(project, new_file(spelled), "j1")
        assert "tracked by git but outside your sparse checkout" in refused.value.message, spelled
        assert "`patchwire apply j1 --exclude " in refused.value.hint, spelled
    moved = pw.split_patch(b"diff --git a/app/main.dart b/other/shared.txt\nsimilarity index 100%\n"
                           b"rename from app/main.dart\nrename to other/shared.txt\n")
    with pytest.raises(pw.PatchError, match="outside your sparse checkout"):  # a rename lands there too
        pw.files_in_the_way(project, moved, "j1")
    assert pw.files_in_the_way(project, new_file("other/brand-new.txt"), "j1") == []
    assert not (root / "other").exists() and not (root / "Other").exists()
    # a repository inside the project (a nested clone or a submodule, sent with `submodules
    # = true`) with a sparse checkout of its own: its git is asked, the project's knows nothing
    inner = make_repo(root / "app/vendor/lib", {"src/a.txt": b"a\n", "docs/guide.txt": b"committed\n"})
    git(inner, "sparse-checkout", "set", "src")
    for spelled in ("app/vendor/lib/docs/guide.txt", "app/vendor/lib/DOCS/Guide.txt"):
        with pytest.raises(pw.PatchError, match="outside your sparse checkout") as refused:
            pw.files_in_the_way(project, new_file(spelled), "j2")
        assert refused.value.message.startswith(spelled + ": tracked by git"), spelled
    assert pw.files_in_the_way(project, new_file("app/vendor/lib/docs/new.txt"), "j2") == []
    assert pw.files_in_the_way(project, new_file("app/vendor/lib/other/shared.txt"), "j2") == []  # not the project's
    assert not (inner / "docs").exists()
    # and the scan counts its files outside as outside the checkout, not as deleted ones
    rules = pw.SyncRules()
    rules.submodules = True
    files = project.scan(rules)
    assert files.absent == [] and files.outside_sparse == 3, (files.absent, files.outside_sparse)  # 2 + 1
    assert "app/vendor/lib/src/a.txt" in files.paths and "app/vendor/lib/docs/guide.txt" not in files.paths
