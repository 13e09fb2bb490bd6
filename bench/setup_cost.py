"""What a project's `[box] setup` costs a warm ask once its inputs are unchanged: the same
warm `patchwire ask --yes` with and without `[box] setup` in `.patchwire.toml`, in one
interleaved run (issue 24's goal: at most 5% more). With setup, every ask hashes the files
`setup_when` matches and finds them unchanged, so setup itself does not run again.

    python3 bench/setup_cost.py [--files 2000] [--rounds 9]
    python3 bench/setup_cost.py --quick      # the smoke run of tests/test_bench.py

The real agent and CLI on this machine; the AI is the instant stand-in (so the ratio is the
worst case: a real AI's minutes would make the hashing vanish). Figures are printed, never
asserted; the ratio is the median of the rounds' ratios.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import STAND_IN_COMMAND, AgentProcess, Laptop, make_repo, script  # noqa: E402

SETUP = '\n[box]\nsetup = ["mkdir -p .deps && echo ready > .deps/ok"]\nsetup_when = ["requirements*.txt"]\n'


def project(root: Path, files: int) -> Path:
    data: Dict[str, bytes] = {f"lib/m{i // 100}/f{i}.py": b"x = %d\n" % i * 20 for i in range(files)}
    data.update({"requirements.txt": b"requests==2.32.3\n", ".gitignore": b".deps/\n"})
    return make_repo(root, data)


def timed(lap: Laptop, n: int) -> float:
    began = time.monotonic()
    lap.run("ask", "--yes", "--no-color", script({"write": "out.txt", "text": f"{n}\n"}), check=0, timeout=600)
    return time.monotonic() - began


def measure(tmp: Path, files: int, rounds: int) -> None:
    agent = AgentProcess(tmp / "box", STAND_IN_COMMAND).start()
    try:
        laps = {}
        for name in ("plain", "setup"):
            lap = Laptop(project(tmp / name, files))
            lap.init(agent)
            if name == "setup":
                toml = lap.root / ".patchwire.toml"
                toml.write_text(toml.read_text() + SETUP)
            timed(lap, -1)  # the cold ask: the first sync, the first job folder, setup's one run
            laps[name] = lap
        times: Dict[str, List[float]] = {"plain": [], "setup": []}
        for r in range(rounds):
            order = ["plain", "setup"] if r % 2 == 0 else ["setup", "plain"]
            for name in order:
                (laps[name].root / "lib/edit.py").write_text(f"# the user's edit {r}\n")
                times[name].append(timed(laps[name], r))
        ratio = statistics.median(s / p for s, p in zip(times["setup"], times["plain"]))
        for name, values in times.items():
            print(f"warm ask, {files:,} files, {name:5}: median {statistics.median(values):.3f} s "
                  f"(min {min(values):.3f}, max {max(values):.3f})")
        print(f"with setup unchanged / without: {ratio:.3f}x (goal: at most 1.05x)")
    finally:
        agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="200 files, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.files, args.rounds = 200, 2
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-setup-") as tmp:
        measure(Path(tmp), args.files, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
