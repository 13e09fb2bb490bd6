"""The pieces `Applier` puts together, each on its own, with real git repositories: the 3-way
merge (ThreeWayMerge: merged bytes and conflicts from base, ours and theirs), the undo log
(UndoLog: what an apply overwrites, put back without following symlinks) and the conflict
question (ask_keep_conflicts, reading its answer from the stream it is given)."""

from __future__ import annotations

import io
import json
import os
from typing import Dict, Optional

import pytest

import patchwire as pw
from conftest import make_repo

BASE = b"".join(b"line %d\n" % i for i in range(1, 11))


def replace_line(data: bytes, number: int, new: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    lines[number - 1] = new
    return b"".join(lines)


@pytest.fixture
def project(tmp_path) -> pw.Project:
    root = make_repo(tmp_path / "proj", {"f.txt": BASE, "other.txt": b"other\n"})
    return pw.Project(root, "proj")


def tree_of(project: pw.Project, files: Dict[str, Optional[bytes]], base: Optional[str] = None) -> str:
    """A tree in Patchwire's store: `base` (or empty) with `files` set (None removes)."""
    index = project.private_dir / "test.index"
    git = project.git.with_env(GIT_INDEX_FILE=str(index))
    git("read-tree", *([base] if base else ["--empty"]))
    for path, data in files.items():
        if data is None:
            git("update-index", "--force-remove", "--", path)
        else:
            blob = git.text("hash-object", "-w", "--stdin", input=data)
            git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    tree = git.text("write-tree")
    index.unlink()
    return tree


def synced_and_patch(project: pw.Project, ai: Dict[str, Optional[bytes]]):
    """(the synced tree: the files as committed, the AI's patch on it)."""
    base = tree_of(project, {"f.txt": BASE, "other.txt": b"other\n"})
    theirs = tree_of(project, ai, base)
    return base, project.git("diff", "--binary", "--full-index", "-M", "--no-ext-diff", base, theirs)


# ------------------------------------------------------------------ the 3-way merge


def test_merge_without_conflict_takes_both_changes_and_writes_nothing(project):
    base, patch = synced_and_patch(project, {"f.txt": replace_line(BASE, 2, b"AI's line 2\n")})
    mine = replace_line(BASE, 9, b"my line 9\n")
    (project.root / "f.txt").write_bytes(mine)
    merger = pw.ThreeWayMerge(project)
    assert merger.have(base) and not merger.have("0" * 40)
    merged = merger.merge(patch, base, set())
    assert merged == {"f.txt": (replace_line(mine, 2, b"AI's line 2\n"), "100644", 0)}
    assert (project.root / "f.txt").read_bytes() == mine  # computed, not written


def test_merge_with_a_conflict_counts_it_and_marks_it(project):
    base, patch = synced_and_patch(project, {"f.txt": replace_line(BASE, 5, b"AI's line 5\n"),
                                             "other.txt": None})
    (project.root / "f.txt").write_bytes(replace_line(BASE, 5, b"my line 5\n"))
    merged = pw.ThreeWayMerge(project).merge(patch, base, set())
    data, mode, conflicts = merged["f.txt"]
    assert (mode, conflicts) == ("100644", 1)
    assert (b"<<<<<<< f.txt (yours)\nmy line 5\n=======\nAI's line 5\n>>>>>>> f.txt (AI)\n") in data
    assert data.startswith(b"line 1\n") and data.endswith(b"line 10\n")
    assert merged["other.txt"] == (None, "", 0)  # deleted by the AI, untouched here


def test_merge_of_a_file_deleted_here_and_changed_by_the_ai_is_a_conflict(project):
    base, patch = synced_and_patch(project, {"other.txt": b"other, by the AI\n"})
    (project.root / "other.txt").unlink()
    merged = pw.ThreeWayMerge(project).merge(patch, base, set())
    assert merged == {"other.txt": (b"other, by the AI\n", "100644", 1)}


def test_merge_file_reports_git_merge_file_conflict_count(project):
    merger = pw.ThreeWayMerge(project)
    base = b"a\nb\nc\nd\ne\nf\ng\n"
    clean = merger.merge_file("x", base.replace(b"a", b"A"), base, base.replace(b"g", b"G"))
    assert clean == (b"A\nb\nc\nd\ne\nf\nG\n", 0)
    data, conflicts = merger.merge_file("x", base.replace(b"a", b"1"), base, base.replace(b"a", b"2")
                                        .replace(b"g", b"3").replace(b"d", b"D"))
    assert conflicts == 1 and data.count(b"<<<<<<< x (yours)") == 1 and b"=======\n2\n>>>>>>>" in data


# ------------------------------------------------------------------ the undo log


def test_undo_log_round_trip_with_a_symlink_and_a_deleted_file(project):
    root = project.root
    os.symlink("f.txt", root / "link")
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    paths = ["f.txt", "link", "run.sh", "new.txt"]
    log = pw.UndoLog(project)
    before = log.save(paths, set())
    assert [(e["path"], e["mode"]) for e in before] == [
        ("f.txt", "100644"), ("link", "120000"), ("run.sh", "100755"), ("new.txt", None)]
    # what an apply does: rewrite, retarget the link, delete, create
    (root / "f.txt").write_bytes(b"applied\n")
    os.unlink(root / "link")
    os.symlink("other.txt", root / "link")
    os.unlink(root / "run.sh")
    (root / "new.txt").write_bytes(b"new\n")
    log.record(before)
    assert [e["after_mode"] for e in json.loads(log.path.read_text())["entries"]] == ["100644", "120000", None, "100644"]

    assert pw.UndoLog(project).undo() == paths  # a fresh log: everything it needs is on disk
    assert (root / "f.txt").read_bytes() == BASE
    assert os.readlink(root / "link") == "f.txt"
    assert (root / "run.sh").read_bytes() == b"#!/bin/sh\n" and os.stat(root / "run.sh").st_mode & 0o111
    assert not (root / "new.txt").exists() and not log.path.exists()
    with pytest.raises(pw.UsageError, match="nothing to undo"):
        log.undo()


def test_undo_refuses_when_a_file_changed_since_and_changes_nothing(project):
    log = pw.UndoLog(project)
    before = log.save(["f.txt", "other.txt"], set())
    (project.root / "f.txt").write_bytes(b"applied\n")
    (project.root / "other.txt").write_bytes(b"applied too\n")
    log.record(before)
    (project.root / "other.txt").write_bytes(b"edited after the apply\n")
    with pytest.raises(pw.PatchError, match="changed since the apply: other.txt"):
        log.undo()
    assert (project.root / "f.txt").read_bytes() == b"applied\n" and log.path.exists()


def test_undo_log_never_writes_through_a_symlinked_folder(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    log = pw.UndoLog(project)
    entry = log.save(["dir/x.txt"], set())[0]  # nothing there yet
    (project.root / "dir").symlink_to(outside)
    entry.update(blob=project.git.text("hash-object", "-w", "--stdin", input=b"planted\n"), mode="100644")
    with pytest.raises(pw.UnsafePath, match="symlink"):
        log.put_back([entry])
    assert list(outside.iterdir()) == []
    assert log.save(["dir/x.txt"], {"dir"}) == [{"path": "dir/x.txt", "blob": None, "mode": None}]


def test_undo_of_files_as_synced_points_at_the_synced_blobs_and_puts_them_back(project):
    """A file here that holds the synced bytes is not deflated into the store again for the
    undo log (the sync record's blob, here in the repository's own objects, is the one kept),
    and undo still puts it back byte for byte."""
    base, patch = synced_and_patch(project, {"f.txt": replace_line(BASE, 2, b"AI's line 2\n"),
                                             "other.txt": b"AI's other\n"})
    loose = project.private_dir / "objects"
    synced = pw.blob_id(BASE, "0" * 40)
    assert not (loose / synced[:2] / synced[2:]).exists()  # a committed file's blob: in .git only
    files = pw.vet_on_disk(project.root, pw.split_patch(patch))
    pw.compute_results(project, files, base)
    result = pw.Applier(project, pw.Style(False)).apply(patch, base, {}, files)
    assert result["how"] == "plain" and result["files"] == ["f.txt", "other.txt"]
    assert not (loose / synced[:2] / synced[2:]).exists()
    undo = {e["path"]: e["blob"] for e in json.loads(project.state_file("undo.json").read_text())["entries"]}
    assert undo["f.txt"] == synced
    assert pw.Applier(project, pw.Style(False)).undo() == ["f.txt", "other.txt"]
    assert (project.root / "f.txt").read_bytes() == BASE
    assert (project.root / "other.txt").read_bytes() == b"other\n"


# ------------------------------------------------------------------ the conflict question


CONFLICTED = {"f.txt": b"a\n<<<<<<< f.txt (yours)\nmine\n=======\nAI\n>>>>>>> f.txt (AI)\nz\n"}


@pytest.mark.parametrize("typed, keep", [("k\n", True), ("K\n", True), ("\n", False), ("n\n", False),
                                         ("", False)])
def test_conflict_question_reads_its_answer(typed, keep, capsys):
    answers = io.StringIO(typed)
    assert pw.ask_keep_conflicts(CONFLICTED, pw.Style(False), None, answers) is keep
    err = capsys.readouterr().err
    assert "1 file(s) changed both here and by the AI" in err and "  f.txt\n" in err
    assert "    <<<<<<< f.txt (yours)\n    mine\n" in err and "Type k and Enter" in err
    assert answers.read() == ""  # the one line was read


@pytest.mark.parametrize("keep", [True, False])
def test_conflict_question_not_asked_when_the_command_line_said(keep, capsys):
    answers = io.StringIO("k\n")
    assert pw.ask_keep_conflicts(CONFLICTED, pw.Style(False), keep, answers) is keep
    assert answers.read() == "k\n"  # nothing read
    assert "Type k" not in capsys.readouterr().err


def test_applier_takes_the_conflict_decision_it_is_given_then_undoes(project):
    base, patch = synced_and_patch(project, {"f.txt": replace_line(BASE, 5, b"AI's line 5\n")})
    mine = replace_line(BASE, 5, b"my line 5\n")
    (project.root / "f.txt").write_bytes(mine)
    asked = []
    refused = pw.Applier(project, pw.Style(False), job="j1", keep_conflicts=lambda c: asked.append(c) or False)
    with pytest.raises(pw.PatchError, match="overlap in f.txt; nothing was changed"):
        refused.apply(patch, base)
    assert list(asked[0]) == ["f.txt"] and b">>>>>>> f.txt (AI)" in asked[0]["f.txt"]
    assert (project.root / "f.txt").read_bytes() == mine
    with pytest.raises(pw.PatchError, match="overlap in f.txt"):  # no decision given: never markers
        pw.Applier(project, pw.Style(False)).apply(patch, base)
    result = pw.Applier(project, pw.Style(False), keep_conflicts=lambda c: True).apply(patch, base)
    assert result == {"how": "3-way", "files": ["f.txt"], "conflicts": ["f.txt"], "replaced": []}
    assert b">>>>>>> f.txt (AI)" in (project.root / "f.txt").read_bytes()
    assert pw.Applier(project, pw.Style(False)).undo() == ["f.txt"]
    assert (project.root / "f.txt").read_bytes() == mine
