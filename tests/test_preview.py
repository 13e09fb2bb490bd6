"""The preview: per-file summary, coloured diff with intra-line highlights (difflib), no colour
when asked or when not on a terminal, a pager when it is long; and the sync's own ref."""

from __future__ import annotations

import io
import json
import re

import patchwire
from conftest import Laptop, drive_pty, git, script

PATCH = b"""diff --git a/app.py b/app.py
index 1111111111111111111111111111111111111111..2222222222222222222222222222222222222222 100644
--- a/app.py
+++ b/app.py
@@ -1,3 +1,3 @@
 import os
-print("hello world")
+print("hello there world")
 x = 1
diff --git a/old name.txt b/new name.txt
similarity index 100%
rename from old name.txt
rename to new name.txt
diff --git a/logo.png b/logo.png
new file mode 100644
index 0000000000000000000000000000000000000000..3333333333333333333333333333333333333333
GIT binary patch
literal 3
KcmZ?wbYK7g00008

literal 0
HcmV?d00001

"""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_lists_each_file_with_its_kind_and_counts():
    files = patchwire.split_patch(PATCH)
    lines = patchwire.render_summary(files, patchwire.Style(False))
    assert lines[0].split() == ["app.py", "modified", "+1", "-1"]
    assert lines[1].split() == ["new", "name.txt", "renamed", "+0", "-0"]
    assert lines[2].split() == ["logo.png", "new", "binary"]
    assert lines[3].strip() == "3 file(s) changed, +1 -1"


def test_intra_line_highlight_marks_only_the_changed_characters():
    style = patchwire.Style(True)
    out = patchwire.render_diff(patchwire.split_patch(PATCH), style)
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in out]
    minus = out[plain.index('-print("hello world")')]
    plus = out[plain.index('+print("hello there world")')]
    green_bg = "\x1b[42;30m"
    assert plus.count(green_bg) == 1
    assert green_bg + "there " in plus  # only the inserted word is highlighted
    assert "\x1b[41;97m" not in minus  # nothing was removed within the line
    assert "\x1b[31m" in minus


def test_unrelated_lines_are_not_highlighted_piecemeal():
    patch = (b"diff --git a/a b/a\n--- a/a\n+++ b/a\n@@ -1 +1 @@\n-completely different\n+zzzz qqq\n")
    out = patchwire.render_diff(patchwire.split_patch(patch), patchwire.Style(True))
    assert "\x1b[42;30m" not in "".join(out) and "\x1b[32m+zzzz qqq\x1b[0m" in out


def test_no_color_env_and_flag_and_non_terminals(monkeypatch):
    tty = FakeTTY()
    assert patchwire.Style.for_stream(tty).enabled
    assert not patchwire.Style.for_stream(tty, no_color=True).enabled
    assert not patchwire.Style.for_stream(io.StringIO()).enabled
    monkeypatch.setenv("NO_COLOR", "1")
    assert not patchwire.Style.for_stream(tty).enabled


def test_long_previews_go_through_the_pager(laptop, tmp_path):
    pager = tmp_path / "pager.sh"
    pager.write_text("#!/bin/sh\necho PAGER-START\ncat\necho PAGER-END\n")
    pager.chmod(0o755)
    lap = Laptop(laptop.root, env={"PAGER": str(pager)})
    body = "".join(f"line {i}\n" for i in range(200))
    out = drive_pty(lap, ["ask", "--no-apply", script({"write": "long.txt", "text": body})], [], prompts=())
    assert "PAGER-START" in out and "+line 199" in out and "PAGER-END" in out
    short = lap.ask(script({"write": "short.txt", "text": "x\n"}), "--no-apply", check=0)
    assert "PAGER-START" not in short.out  # not a terminal: no pager


def test_sync_records_its_tree_in_its_own_store_without_touching_the_repository(laptop):
    (laptop.root / "new.txt").write_bytes(b"untracked\n")
    index_before = (laptop.root / ".git/index").read_bytes()
    head_before = git(laptop.root, "rev-parse", "HEAD")
    laptop.run("sync", check=0)
    project = patchwire.Project(laptop.root, "laptop")
    tree = json.loads(project.state_file("last_sync.json").read_text())["tree"]
    assert project.recorded_file(tree, "new.txt") == (b"untracked\n", "100644")
    assert project.recorded_file(tree, "README.md") is not None
    assert git(laptop.root, "for-each-ref", "refs/patchwire/") == ""  # no ref of Patchwire's there
    assert (laptop.root / ".git/index").read_bytes() == index_before
    assert git(laptop.root, "rev-parse", "HEAD") == head_before
    assert git(laptop.root, "status", "--porcelain").splitlines() == ["?? .patchwire.toml", "?? new.txt"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_pager_starts_after_one_screenful_and_the_rest_streams_to_it(tmp_path, monkeypatch):
    """A 100,000-line diff shows at once: only the first screenful is rendered before the
    pager starts, the rest is rendered while the reader reads; quitting stops the rendering."""
    started, got = tmp_path / "started", tmp_path / "got.txt"
    pager = tmp_path / "pager.sh"
    pager.write_text(f"#!/bin/sh\ntouch {started}\ncat > {got}\n")
    pager.chmod(0o755)
    monkeypatch.setenv("PAGER", str(pager))
    monkeypatch.setenv("LINES", "40")
    monkeypatch.setattr("sys.stdout", _Terminal())
    rendered_when_shown: list = []

    def rendering(count: int):
        for i in range(count):
            if not rendered_when_shown and started.exists():
                rendered_when_shown.append(i)
            yield f"line {i}"
    patchwire.page(rendering(100_000))
    assert got.read_text() == "".join(f"line {i}\n" for i in range(100_000))
    assert rendered_when_shown and rendered_when_shown[0] < 5_000, rendered_when_shown

    pager.write_text("#!/bin/sh\nhead -n 3 > /dev/null\n")  # the reader quits at once
    pulled = []

    def counted():
        for i in range(1_000_000):
            pulled.append(i)
            yield f"line {i}"
    patchwire.page(counted())
    assert len(pulled) < 200_000  # not all rendered for nobody


def test_a_short_text_is_printed_without_a_pager(tmp_path, monkeypatch):
    pager = tmp_path / "pager.sh"
    pager.write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\ncat\n")
    pager.chmod(0o755)
    monkeypatch.setenv("PAGER", str(pager))
    monkeypatch.setenv("LINES", "40")
    out = _Terminal()
    monkeypatch.setattr("sys.stdout", out)
    patchwire.page(f"line {i}" for i in range(10))
    assert out.getvalue() == "".join(f"line {i}\n" for i in range(10)) and not (tmp_path / "started").exists()
