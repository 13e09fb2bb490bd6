#!/usr/bin/env python3
"""A sync of a project with a repository inside it (a monorepo's submodule, a package cloned
in), sent as files with `[sync] submodules = true`: one changed file in a --files project that
holds an --inner-file repository, against the same change in the same project without it, and
against the natural script's rsync of each folder (`rsync -a --delete --exclude=.git`). Rounds
interleaved; medians with min and max.

    python3 bench/nested.py                 # 20,000 files and a 50-file repository inside, 7 rounds
    python3 bench/nested.py --quick         # 2,000 files, 2 rounds: tests/test_bench.py

Everything is real: git, rsync, the agent on 127.0.0.1:0 (no AI runs), the laptop CLI of this
checkout imported from cached bytecode (as an installed module, or the zipapp, starts). Exit
status 1 when, after the rounds, the project with the repository inside cannot be listed by
its changes (`Project.scan_changes` gives None): every sync of it was a full scan, which is
what made it slow before (1.71x the project without it, in a warm ask at 20,000 files).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import patchwire  # noqa: E402
from conftest import STAND_IN_COMMAND, AgentProcess, git  # noqa: E402
from prepare import write_files  # noqa: E402
from sparse import print_sync_table, sync_rounds  # noqa: E402
from test_sync_real_projects import write_sync  # noqa: E402


def make_project(root: Path, files: int, inner: int) -> None:
    """`files` source-like files, committed; with `inner`, a repository of that many files of
    its own at packages/shared (a nested clone: the project's git does not look into it)."""
    write_files(root, {f"lib/pkg{i // 100}/f{i}.dart": f"// file {i}\n".encode() * (5 + i % 40)
                       for i in range(files)})
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    if inner:
        shared = root / "packages/shared"
        write_files(shared, {f"lib/s{i}.dart": f"// shared {i}\n".encode() * 8 for i in range(inner)})
        git(shared, "init", "-q")
        git(shared, "add", "-A")
        git(shared, "commit", "-qm", "shared")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000, help="files in the project (20,000)")
    parser.add_argument("--inner", type=int, default=50, help="files in the repository inside (50)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2,000 files, 2 rounds")
    args = parser.parse_args(argv)
    files, repeat = (2000, 2) if args.quick else (args.files, args.repeat)
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-nested-") as tmp_name:
        tmp = Path(tmp_name)
        projects = {"nested": tmp / "mono", "plain": tmp / "plain"}
        make_project(projects["nested"], files, args.inner)
        make_project(projects["plain"], files, 0)
        agent = AgentProcess(tmp / "agent", STAND_IN_COMMAND).start()
        try:
            times = sync_rounds(tmp, agent, projects, "lib/pkg0/f0.dart", repeat,
                                setup=lambda lap: write_sync(lap, submodules=True))
            nested = projects["nested"]
            cfg = patchwire.LaptopConfig.find(nested)
            listed = patchwire.Project(nested, cfg.project).scan_changes(patchwire.SyncRules.of(cfg))
        finally:
            agent.stop()
    print(f"### A sync of one change: {files:,} files with a {args.inner}-file repository inside, "
          f"and without it ({repeat} rounds, s)\n")
    print_sync_table(times, {"nested": f"{files:,} and a repository of {args.inner}", "plain": f"{files:,}"})
    ratio = statistics.median(s / p for s, p in zip(times["nested sync"], times["plain sync"]))
    kept = listed is not None and listed.nested == ["packages/shared/"]
    print(f"\nwith / without the repository inside (median of per-round ratios): {ratio:.2f}x; "
          f"listed by its changes: {'yes' if kept else 'NO (a full scan at every sync)'}")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
