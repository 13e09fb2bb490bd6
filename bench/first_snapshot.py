#!/usr/bin/env python3
"""The box's side of a first ask: the project's first snapshot (every file of the mirror
hashed into the store) and the first job folder, three ways interleaved in one run: loose
objects and a checkout (git's defaults), one pack by `update-index` with bulk checkin and a
checkout (the agent before), and now: the files read by the agent into one `git fast-import`
(pa.import_files) and the mirror itself moved into place as the job folder (_adopt_mirror).

    python3 bench/first_snapshot.py --real /tmp/real      # bench/real_project.sh DIR makes one
    python3 bench/first_snapshot.py --files 20000 --repeat 3

Each round and way: a new state folder, the project copied into its mirror as rsync leaves it
(not timed), `os.sync()` (not timed), then ProjectRepo.snapshot and ProjectRepo.prepare_slot,
each timed. The job folder is checked: its index holds the laptop's tree and `git status` is
empty. Figures: medians, min-max, the median of each round's ratio, and the store's size on
disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import os
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import patchwire_agent as pa  # noqa: E402
from prepare import Laptop, project_files, write_files  # noqa: E402

PACKED = pa.bulk_checkin_works
IMPORT = pa.import_files
WAYS = {"loose": "loose objects, checkout", "pack": "bulk checkin, checkout (before)",
        "now": "fast-import, the mirror moved (now)"}


def one(tmp: Path, source: Path, way: str, tree: str, manifest: List[List[str]], adopt_from: int) -> Dict[str, float]:
    state = tmp / f"state-{way}"
    shutil.rmtree(state, ignore_errors=True)
    repo = pa.ProjectRepo(state, "alice", "demo")
    repo.mirror.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(source), str(repo.mirror)], check=True)
    pa.bulk_checkin_works = PACKED if way == "pack" else (lambda: False)  # type: ignore[assignment]
    pa.import_files = IMPORT if way == "now" else (lambda *a: False)  # type: ignore[assignment]
    repo.ADOPT_MIN_FILES = adopt_from if way == "now" else 1 << 40
    os.sync()
    t0 = time.monotonic()
    commit = repo.snapshot(tree, [(m, s, p) for m, s, p in manifest])
    t1 = time.monotonic()
    os.sync()
    t2 = time.monotonic()
    slot = repo.prepare_slot(0, commit)
    t3 = time.monotonic()
    git = repo.slot_git(0)
    if git.text("write-tree") != tree or git("status", "--porcelain", "--untracked-files=all").strip():
        raise SystemExit(f"{way}: the job folder is not the snapshot")
    size = int(subprocess.run(["du", "-sk", str(repo.git_dir)], capture_output=True, text=True).stdout.split()[0])
    shutil.rmtree(slot.parent)
    return {"snapshot": t1 - t0, "prepare": t3 - t2, "store_mb": size / 1024}


def spread(values: List[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, help="a real project tree (bench/real_project.sh DIR)")
    ap.add_argument("--files", type=int, default=20000, help="synthetic files without --real (20,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--adopt-from", type=int, default=pa.ProjectRepo.ADOPT_MIN_FILES,
                    help="files from which the mirror becomes the first job folder (the agent's: %(default)s)")
    args = ap.parse_args(argv)
    if not PACKED():
        print("note: this git is older than 2.39: the agent keeps loose objects here; both ways measured anyway")
        globals()["PACKED"] = lambda: True
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-first-") as t:
        tmp = Path(t)
        source = args.real
        if source is None:
            source = tmp / "source"
            write_files(source, project_files(args.files))
        tree, manifest = Laptop(source, "demo", tmp, real=False).record()
        ways = list(WAYS)
        out: Dict[str, List[Dict[str, float]]] = {w: [] for w in ways}
        for r in range(args.repeat):
            for way in ways[r % 3:] + ways[:r % 3]:
                out[way].append(one(tmp, source, way, tree, manifest, args.adopt_from))
                print(f"  round {r + 1} {way}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[way][-1].items()), flush=True)
    print(f"\n{len(manifest):,} files, {args.repeat} rounds interleaved\n")
    print("| | " + " | ".join(WAYS.values()) + " | now / before |\n|---|---|---|---|---|")
    for key, what in (("snapshot", "first snapshot, s"), ("prepare", "first job folder, s")):
        cols = [[x[key] for x in out[w]] for w in ways]
        ratios = [y / x for x, y in zip(cols[1], cols[2])]
        print(f"| {what} | " + " | ".join(spread(c) for c in cols) + f" | {statistics.median(ratios):.2f}x |")
    both = [[x["snapshot"] + x["prepare"] for x in out[w]] for w in ways]
    print("| both, s | " + " | ".join(spread(c) for c in both) +
          f" | {statistics.median(y / x for x, y in zip(both[1], both[2])):.2f}x |")
    sizes = [out[w][0]["store_mb"] for w in ways]
    print("| store on disk, MB | " + " | ".join(f"{x:.0f}" for x in sizes) + f" | {sizes[2] / sizes[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
