"""Several attempts: the wall time of `patchwire ask -n 3 --pick 1` against one `patchwire ask
--yes`, when the AI dominates (the stand-in sleeps --sleep seconds, default 2). The real
agent and CLI on this machine; one user, so `max_running` is the box's `[jobs] workers`.

    python3 bench/attempts.py [--sleep 2] [--workers 2] [--rounds 3]

The goal of issue 25 is at most 1.6x with three attempts on two workers. With N workers,
ceil(3 / N) rounds of the AI must run one after another, so on two workers three attempts
cannot take less than twice one AI run; the figures say how far above that the rest (one
sync, one POST, the snapshot, three job folders, three diffs fetched and vetted) adds.
Figures are printed, never asserted.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import AgentProcess, Laptop, make_repo, script  # noqa: E402
from conftest import STAND_IN_COMMAND  # noqa: E402


def prompt(n: int, sleep_s: float) -> str:
    return script({"sleep": sleep_s}, {"write": f"out/round{n}.txt", "text": f"round {n}\n"})


def timed(lap: Laptop, *args: str) -> float:
    began = time.monotonic()
    lap.run(*args, check=0, timeout=600)
    return time.monotonic() - began


def measure(tmp: Path, sleep_s: float, workers: int, rounds: int) -> None:
    agent = AgentProcess(tmp / "box", STAND_IN_COMMAND, jobs={"workers": workers, "slots": 3}).start()
    try:
        root = make_repo(tmp / "laptop", {"README.md": b"# bench\n", "src/app.py": b"x = 1\n"})
        lap = Laptop(root)
        lap.init(agent)
        lap.run("sync", check=0)
        one: List[float] = []
        three: List[float] = []
        for n in range(rounds):  # interleaved: drift hits both sides alike
            one.append(timed(lap, "ask", prompt(2 * n, sleep_s), "--yes"))
            three.append(timed(lap, "ask", prompt(2 * n + 1, sleep_s), "-n", "3", "--pick", "1"))
    finally:
        agent.stop()
    a, b = statistics.median(one), statistics.median(three)
    floor = -(-3 // workers) * sleep_s
    print(f"AI sleep {sleep_s:g} s, [jobs] workers = {workers}, median of {rounds} round(s)")
    print("| ask | wall (s) | ratio to one attempt |")
    print("|---|---|---|")
    print(f"| one attempt | {a:.2f} | 1.00x |")
    print(f"| three attempts, --pick 1 | {b:.2f} | {b / a:.2f}x |")
    print(f"the AI alone bounds three attempts on {workers} worker(s) at {floor:g} s "
          f"({floor / sleep_s:g}x one AI run); overhead above that: {b - floor:.2f} s, one attempt's: {a - sleep_s:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds the stand-in AI sleeps per attempt")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pw-bench-attempts-") as tmp:
        measure(Path(tmp), args.sleep, args.workers, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
