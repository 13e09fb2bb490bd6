#!/usr/bin/env python3
"""The laptop's peak memory and time against a box that sends too much: a 1 GB diff, a 1 GB
event line, a diff and a line that never end, and 300 MB of events for `show`.

    python3 bench/hostile_box.py [--size-mb 1024] [--events-mb 300] [--quick]

The box is tests/fake_box.py: its `endless` answer writes one 1 MiB piece again and again,
so the gigabyte is streamed, never built in memory (on either side). The CLI is the real one,
run by a small launcher that reads its own peak RSS from wait4 (a child keeps the high-water
mark of the process it was forked from, so the launcher stays small). Exit 0 when every run
ended with the expected outcome and under the goal of 100 MB, 1 otherwise; figures are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fake_box import FakeBox, endless  # noqa: E402

MB = 2 ** 20
GOAL_MB = 100
JOB = "abc123"
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "err = p.stderr.read()[-2000:]\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "sys.stdout.write(str(usage.ru_maxrss) + '\\n' + err.decode('utf-8', 'replace'))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def project(folder: Path, box: FakeBox) -> Path:
    root = folder / "laptop"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    token = root / ".pwtoken"
    token.write_text("pw_bench\n")
    token.chmod(0o600)
    subprocess.run([sys.executable, str(ROOT / "patchwire.py"), "init", "--agent", box.url, "--token-file",
                    str(token)], cwd=root, check=True, capture_output=True)
    return root


def measure(root: Path, *args: str) -> tuple:
    """(exit status, peak RSS in MB, seconds, the tail of stderr) of `patchwire ARGS`."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, str(ROOT / "patchwire.py"), *args],
                          cwd=root, capture_output=True, timeout=1800, env={**os.environ, "PATCHWIRE_TIMEOUT": "120"})
    peak, _, err = proc.stdout.decode().partition("\n")
    return proc.returncode, int(peak) / 1024, time.monotonic() - began, err.strip().splitlines()[-2:]


def diff_piece() -> bytes:
    body = b"".join(b"+line %d of a very long generated file\n" % i for i in range(25000))
    return b"diff --git a/big.txt b/big.txt\nnew file mode 100644\n--- /dev/null\n+++ b/big.txt\n" + body


def runs(size_mb: int, events_mb: int) -> list:
    """(name, route, lie, command, expected exit status, words expected on stderr)."""
    line = b'{"seq": 1, "job": "abc123", "type": "text", "text": "'
    event = json.dumps({"seq": 1, "job": JOB, "type": "text", "text": "thinking " * 220}).encode() + b"\n"
    piece = event * (MB // len(event))
    return [
        (f"{size_mb} MB diff, no Content-Length", "GET /v1/jobs/abc123/diff", endless(diff_piece(), size_mb * MB),
         ["diff", JOB], 3, "over the laptop's limit"),
        (f"{size_mb} MB diff, Content-Length given", "GET /v1/jobs/abc123/diff",
         endless(diff_piece(), size_mb * MB, length=str(size_mb * MB)), ["diff", JOB], 3, "announces"),
        ("a diff that never ends", "GET /v1/jobs/abc123/diff", endless(diff_piece()), ["diff", JOB], 3,
         "over the laptop's limit"),
        (f"{size_mb} MB event line", "GET /v1/jobs/abc123/events",
         endless(b"x" * MB, size_mb * MB, kind="application/x-ndjson", first=line), ["show", JOB], 3,
         "event line over"),
        ("an event line that never ends", "GET /v1/jobs/abc123/events",
         endless(b"x" * MB, None, kind="application/x-ndjson", first=line), ["show", JOB], 3, "event line over"),
        (f"show: {events_mb} MB of events", "GET /v1/jobs/abc123/events",
         endless(piece, len(piece) * events_mb, kind="application/x-ndjson"), ["show", JOB], 0, ""),
        (f"show --json: {events_mb} MB of events", "GET /v1/jobs/abc123/events",
         endless(piece, len(piece) * events_mb, kind="application/x-ndjson"), ["show", JOB, "--json"], 0, ""),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="the big diff and event line (default 1024)")
    parser.add_argument("--events-mb", type=int, default=300, help="events for show (default 300)")
    parser.add_argument("--quick", action="store_true", help="100 MB and 50 MB: a smoke run")
    args = parser.parse_args()
    size_mb, events_mb = (100, 50) if args.quick else (args.size_mb, args.events_mb)
    ok = True
    print("| run | exit | peak RSS | time | goal |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-") as tmp:
        box = FakeBox(Path(tmp) / "mirror")
        box.add_job(JOB, b"")
        root = project(Path(tmp), box)
        try:
            for name, route, lie, command, status, words in runs(size_mb, events_mb):
                box.lie(route, lie)
                code, peak, seconds, tail = measure(root, *command)
                held = code == status and words in " ".join(tail) and peak < GOAL_MB
                ok &= held
                print(f"| {name} | {code} | {peak:.0f} MB | {seconds:.1f} s | {'ok' if held else 'MISSED: ' + ' '.join(tail)} |",
                      flush=True)
        finally:
            box.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
