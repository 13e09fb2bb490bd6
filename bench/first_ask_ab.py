#!/usr/bin/env python3
"""The first ask of a real project on an empty box, over SSH, three ways interleaved in one
run: the agent of another checkout (--before DIR, e.g. `git worktree add /tmp/before REV`),
this checkout's agent, and the natural script (bench/ask.py's Baseline). The laptop CLI is this
checkout's for both agents. Per round and way: a new agent and a new box folder.

    bash bench/real_project.sh /tmp/real
    git worktree add /tmp/before c418ba9
    python3 bench/first_ask_ab.py --real /tmp/real --before /tmp/before --repeat 3

Prints each round (with the agent's snapshot time and its job's time from start to end), then
the medians and the per-round ratios to the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
import ask as bench  # noqa: E402


def one_agent(tmp: Path, name: str, program: List[str], lap, ssh_server, prompt: str) -> Dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    agent = bench.AgentProcess(tmp / f"agent-{name}", bench.STAND_IN_COMMAND, program=program).start()
    try:
        lap.init(agent)
        bench.over_ssh(lap, agent, ssh_server)
        t = time.monotonic()
        bench.patchwire_ask(lap, prompt)
        took = time.monotonic() - t
        audit = [json.loads(line) for line in (agent.state_dir / "audit.log").read_text().splitlines()]
        snapshot = sum(a["ms"] for a in audit if a.get("event") == "snapshot") / 1000
        job = agent.json("GET", "/v1/jobs")[1]["jobs"][0]
        return {"s": took, "snapshot": snapshot, "job": job["finished"] - job["started"]}
    finally:
        agent.stop()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, required=True, help="a real project tree (bench/real_project.sh DIR)")
    ap.add_argument("--before", type=Path, required=True, help="a checkout whose patchwire_agent.py is 'before'")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    programs = {"before": [sys.executable, str(args.before.resolve() / "patchwire_agent.py")],
                "now": [sys.executable, str(ROOT / "patchwire_agent.py")]}
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-first-ab-") as d, ExitStack() as stack:
        tmp = Path(d)
        os.environ["HOME"] = str(tmp / "home")
        (tmp / "home").mkdir()
        root = bench.real_project(tmp, args.real)
        ssh_server = bench.start_sshd(tmp, stack)
        lap = bench.user_laptop(root)
        out: Dict[str, List[Dict[str, float]]] = {"before": [], "now": [], "script": []}
        ways = list(out)
        for r in range(args.repeat):
            for name in ways[r % 3:] + ways[:r % 3]:
                prompt = bench.script({"write": f"ai_{name}.txt", "text": f"round {r}\n" * (r + 2)})
                subprocess.run(["sync"], check=False)
                if name == "script":
                    base = bench.Baseline(root, tmp / f"box{r}", bench.script_ssh(ssh_server, root.parent))
                    t = time.monotonic()
                    base.ask(prompt)
                    out[name].append({"s": time.monotonic() - t})
                else:
                    out[name].append(one_agent(tmp / f"r{r}", name, programs[name], lap, ssh_server, prompt))
                print(f"  round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[name][-1].items()),
                      flush=True)
    print(f"\n{args.repeat} rounds interleaved, over SSH (s, median (min-max)):\n")
    print("| | before | now | script |\n|---|---|---|---|")
    print("| first ask | " + " | ".join(bench.spread([x["s"] for x in out[w]]) for w in ways) + " |")
    for key in ("snapshot", "job"):
        print(f"| {key} (agent) | " + " | ".join(bench.spread([x[key] for x in out[w]]) for w in ways[:2]) + " | |")
    for w in ways[:2]:
        ratios = [x["s"] / y["s"] for x, y in zip(out[w], out["script"])]
        print(f"\n{w} / script, per round: " + ", ".join(f"{x:.2f}x" for x in ratios) +
              f"; median {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
