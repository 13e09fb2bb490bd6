#!/usr/bin/env python3
"""A sync of a sparse checkout, the way into a big monorepo: one changed file in a cone of
--cone files (`git sparse-checkout set`) of a --files repository, against the same change in a
plain project of just the cone's files, and against the natural script's rsync of each folder
(`rsync -a --delete --exclude=.git ./ mirror/`, which sees only the files there). Rounds
interleaved; medians with min and max.

    python3 bench/sparse.py                 # 40,000 files, a 4,000-file cone, 7 rounds
    python3 bench/sparse.py --quick         # 2,400 files, 240 in the cone, 2 rounds: tests/test_bench.py

Everything is real: git, rsync, the agent on 127.0.0.1:0 (no AI runs), the laptop CLI of this
checkout imported from cached bytecode (as an installed module, or the zipapp, starts). Exit
status 1 when the sparse project's sync did not keep git's quick scan (scan.json holds no
`quick` key), which is what made it slow before: the files outside the cone counted as
deleted ones to watch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import patchwire  # noqa: E402
from conftest import STAND_IN_COMMAND, AgentProcess, Laptop, git  # noqa: E402
from prepare import write_files  # noqa: E402
from startup import laptop_program, spread  # noqa: E402

TEAMS = 10


def make_repo(root: Path, per_team: int, teams: List[int], cone: bool) -> None:
    """`per_team` source-like files in each of `teams` folders, committed; with `cone`, a
    sparse checkout of team3 alone."""
    write_files(root, {f"team{t}/pkg{i // 100}/f{i}.dart": f"// team {t}, file {i}\n".encode() * (5 + i % 40)
                       for t in teams for i in range(per_team)})
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    if cone:
        git(root, "sparse-checkout", "set", "team3")


def sync_rounds(tmp: Path, agent: AgentProcess, projects: Dict[str, Path], edited: str, repeat: int,
                setup: Callable[[Laptop], None] = lambda lap: None) -> Dict[str, List[float]]:
    """Each project's laptop (the CLI from cached bytecode) set up against `agent` (`setup`
    then), synced once; then `repeat` rounds, the projects interleaved, of an edit of `edited`,
    `patchwire sync`, and the natural script's `rsync -a --delete` of the folder to one of its
    own: {"NAME sync" | "NAME rsync": seconds per round}."""
    program, env = laptop_program(tmp, "module")  # imported from cached bytecode, as installed
    laptops = {}
    for name, root in projects.items():
        (tmp / f"mirror-{name}").mkdir()
        laptops[name] = Laptop(root, program=program, env=env)
        laptops[name].init(agent)
        setup(laptops[name])
        first = laptops[name].run("sync", timeout=900)
        assert first.returncode == 0, first.err
    times: Dict[str, List[float]] = {f"{n} {w}": [] for n in projects for w in ("sync", "rsync")}
    for r in range(repeat):
        for name in (list(projects) if r % 2 == 0 else list(projects)[::-1]):
            root = projects[name]
            (root / edited).write_text(f"// the user's edit {r}\n")
            started = time.perf_counter()
            done = laptops[name].run("sync", timeout=900)
            times[f"{name} sync"].append(time.perf_counter() - started)
            assert done.returncode == 0, done.err
            started = time.perf_counter()
            subprocess.run(["rsync", "-a", "--delete", "--exclude=.git", "./", f"{tmp}/mirror-{name}/"],
                           cwd=root, check=True)
            times[f"{name} rsync"].append(time.perf_counter() - started)
    return times


def print_sync_table(times: Dict[str, List[float]], labels: Dict[str, str]) -> None:
    """The table of sync_rounds' figures, a row per project (`labels`: name -> row label)."""
    print("| project | patchwire sync | bare rsync | sync / rsync |")
    print("|---|---|---|---|")
    for name, label in labels.items():
        ratio = statistics.median(s / b for s, b in zip(times[f"{name} sync"], times[f"{name} rsync"]))
        print(f"| {label} | {spread(times[f'{name} sync'])} | {spread(times[f'{name} rsync'])} | {ratio:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40000, help="files in the repository (40,000)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2,400 files, 2 rounds")
    args = parser.parse_args(argv)
    files, repeat = (2400, 2) if args.quick else (args.files, args.repeat)
    per_team = files // TEAMS
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-sparse-") as tmp_name:
        tmp = Path(tmp_name)
        projects = {"sparse": tmp / "mono", "plain": tmp / "plain"}
        make_repo(projects["sparse"], per_team, list(range(TEAMS)), cone=True)
        make_repo(projects["plain"], per_team, [3], cone=False)
        agent = AgentProcess(tmp / "agent", STAND_IN_COMMAND).start()
        try:
            times = sync_rounds(tmp, agent, projects, "team3/pkg0/f0.dart", repeat)
            scan = json.loads(patchwire.Project(projects["sparse"], "any").state_file("scan.json").read_text())
        finally:
            agent.stop()
    cone = per_team
    print(f"### A sync of one change: a sparse checkout of {cone:,} of {files:,} files, a plain project of "
          f"{cone:,} ({repeat} rounds, s)\n")
    print_sync_table(times, {"sparse": f"sparse: {cone:,} of {files:,}", "plain": f"plain: {cone:,}"})
    ratio = statistics.median(s / p for s, p in zip(times["sparse sync"], times["plain sync"]))
    kept = isinstance(scan.get("quick"), dict)
    print(f"\nsparse / plain sync (median of per-round ratios): {ratio:.2f}x; the sparse project's quick scan "
          f"kept: {'yes' if kept else 'NO'} ({len(scan.get('absent', [])):,} absent tracked files watched)")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
