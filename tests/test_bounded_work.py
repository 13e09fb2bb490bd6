"""Bounded work (issue 14): the coloured preview asks difflib about a bounded number of line
pairs per run (the rest are highlighted by their common prefix and suffix, and no text is lost),
and `--help`/`--version` start without the network modules. Speed itself is in bench/ask.py."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys

import patchwire
from conftest import ROOT

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def rewrite_patch(pairs: int, tail: str = "") -> bytes:
    head = f"diff --git a/f b/f\n--- a/f\n+++ b/f\n@@ -1,{pairs} +1,{pairs} @@\n"
    minus = "".join(f"-value_{i} = compute(red, {i}){tail}\n" for i in range(pairs))
    plus = "".join(f"+value_{i} = compute(blue, {i}){tail}\n" for i in range(pairs))
    return (head + minus + plus).encode()


def count_matchers(monkeypatch) -> list:
    made = []
    real = difflib.SequenceMatcher

    def counting(*args, **kw):
        made.append(args)
        return real(*args, **kw)
    monkeypatch.setattr(patchwire.difflib, "SequenceMatcher", counting)
    return made


def test_a_long_run_asks_difflib_only_about_its_first_pairs_and_keeps_every_character(monkeypatch):
    made = count_matchers(monkeypatch)
    files = patchwire.split_patch(rewrite_patch(200))
    out = patchwire.render_diff(files, patchwire.Style(True))
    assert len(made) == patchwire.DIFFLIB_PAIRS_PER_RUN
    assert [ANSI.sub("", l) for l in out] == patchwire.render_diff(files, patchwire.Style(False))
    last_minus, last_plus = out[4 + 199], out[4 + 399]
    # past the budget, the changed middle is still highlighted, and only it
    assert last_minus == ("\x1b[31m-value_199 = compute(\x1b[0m\x1b[41;97mred\x1b[0m"
                          "\x1b[31m, 199)\x1b[0m")
    assert last_plus == ("\x1b[32m+value_199 = compute(\x1b[0m\x1b[42;30mblue\x1b[0m"
                         "\x1b[32m, 199)\x1b[0m")


def test_very_long_lines_skip_difflib_and_unrelated_ones_stay_unhighlighted(monkeypatch):
    made = count_matchers(monkeypatch)
    files = patchwire.split_patch(rewrite_patch(3, tail=" # " + "x" * 500))
    out = patchwire.render_diff(files, patchwire.Style(True))
    assert made == [] and "\x1b[42;30mblue\x1b[0m" in out[7]
    unrelated = b"diff --git a/a b/a\n--- a/a\n+++ b/a\n@@ -1 +1 @@\n-" + b"a" * 500 + b"\n+" + b"b" * 500 + b"\n"
    out = patchwire.render_diff(patchwire.split_patch(unrelated), patchwire.Style(True))
    assert out[-1] == "\x1b[32m+" + "b" * 500 + "\x1b[0m"


def test_help_and_version_do_not_import_the_network_modules():
    for flag in ("--help", "--version"):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "patchwire.py"), flag],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "patchwire" in proc.stdout.lower()
        assert not imported & {"http.client", "email", "urllib.request", "ssl"}, flag
