"""Several patchwire commands at once in one project (issue 22): syncs and asks started
together all succeed, none trips over git's index.lock in the laptop's record and none falls
back to sending every file by checksum. Real parallel processes, a real agent."""

from __future__ import annotations

import subprocess
from typing import List

from conftest import Laptop, script


def run_together(lap: Laptop, *argvs: List[str]) -> List[subprocess.CompletedProcess]:
    """Start every command at once, then wait for all of them."""
    procs = [subprocess.Popen(lap.program + argv, cwd=lap.root, env=lap.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def assert_clean(results: List[subprocess.CompletedProcess]) -> None:
    for r in results:
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 0, err
        assert "index.lock" not in err and "by checksum" not in err, err


def test_parallel_syncs_all_succeed_without_index_lock(laptop):
    laptop.run("sync", check=0)
    for round_ in range(8):
        for i in range(30):
            (laptop.root / f"src/m{i}.py").write_text(f"x = {round_}\n")
        assert_clean(run_together(laptop, *[["sync"]] * 4))
    assert "nothing changed" in laptop.run("sync", check=0).err


def test_parallel_asks_all_succeed_without_a_checksummed_resend(laptop):
    laptop.run("sync", check=0)
    for round_ in range(3):
        (laptop.root / "src/app.py").write_text(f"print({round_})\n")
        assert_clean(run_together(laptop, *[["ask", script({"write": f"out{i}.txt", "text": "x\n"}), "--no-apply"]
                                            for i in range(4)]))
