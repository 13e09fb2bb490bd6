#!/usr/bin/env python3
"""The box's side of a first ask: the project's first snapshot (every file of the mirror
hashed into the store) and the first job folder checked out from it, with the blobs as loose
objects (git's default, the agent before) against one pack (pa.FIRST_SNAPSHOT_CONFIG: bulk
checkin at deflate level 1), interleaved in one run.

    python3 bench/first_snapshot.py --real /tmp/real      # bench/real_project.sh DIR makes one
    python3 bench/first_snapshot.py --files 20000 --repeat 3

Each round and way: a new state folder, the project copied into its mirror as rsync leaves it
(not timed), `os.sync()` (not timed), then ProjectRepo.snapshot and ProjectRepo.prepare_slot
(a cold `git worktree add`), each timed. The job folder is checked: its index holds the
laptop's tree and `git status` is empty. Figures: medians, min-max, the median of each
round's ratio, and the store's size on disk.
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


def one(tmp: Path, source: Path, way: str, tree: str, manifest: List[List[str]]) -> Dict[str, float]:
    state = tmp / f"state-{way}"
    shutil.rmtree(state, ignore_errors=True)
    repo = pa.ProjectRepo(state, "alice", "demo")
    repo.mirror.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(source), str(repo.mirror)], check=True)
    pa.bulk_checkin_works = PACKED if way == "pack" else (lambda: False)  # type: ignore[assignment]
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
        ways = ["loose", "pack"]
        out: Dict[str, List[Dict[str, float]]] = {w: [] for w in ways}
        for r in range(args.repeat):
            for way in (ways if r % 2 == 0 else ways[::-1]):
                out[way].append(one(tmp, source, way, tree, manifest))
                print(f"  round {r + 1} {way}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[way][-1].items()), flush=True)
    print(f"\n{len(manifest):,} files, {args.repeat} rounds interleaved\n")
    print("| | loose objects (before) | one pack (now) | ratio |\n|---|---|---|---|")
    for key, what in (("snapshot", "first snapshot, s"), ("prepare", "first job folder, s")):
        a, b = [x[key] for x in out["loose"]], [x[key] for x in out["pack"]]
        ratios = [y / x for x, y in zip(a, b)]
        print(f"| {what} | {spread(a)} | {spread(b)} | {statistics.median(ratios):.2f}x |")
    both = [[x["snapshot"] + x["prepare"] for x in out[w]] for w in ways]
    print(f"| both, s | {spread(both[0])} | {spread(both[1])} | "
          f"{statistics.median(y / x for x, y in zip(*both)):.2f}x |")
    print(f"| store on disk, MB | {out['loose'][0]['store_mb']:.0f} | {out['pack'][0]['store_mb']:.0f} | "
          f"{out['pack'][0]['store_mb'] / out['loose'][0]['store_mb']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
