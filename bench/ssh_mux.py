#!/usr/bin/env python3
"""SSH multiplexing: a first connection against later ones over its master (ControlMaster).

Patchwire passes `-o ControlMaster=auto -o ControlPath=... -o ControlPersist=60` to the ssh that
rsync starts, so every sync after the first skips the TCP and key exchange. This measures what
that saves against a real sshd on a loopback port (tests/sshd.py), in the same run:

    python3 bench/ssh_mux.py [--repeat 5]

It prints the median of fresh connections (no master), the first connection that starts a
master, and the median over the master, with the ratio. Exit 0 when it ran and the multiplexed
median is below the fresh one, 1 otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sshd import running_sshd  # noqa: E402


def timed_ssh(options, alias) -> float:
    began = time.monotonic()
    subprocess.run(["ssh", *options, alias, "true"], check=True, timeout=30, stdin=subprocess.DEVNULL,
                   capture_output=True)
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-ssh-") as tmp, \
            running_sshd(Path(tmp) / "sshd") as server:
        control = Path(tmp) / "cm"
        control.mkdir(mode=0o700)
        mux = [*server.ssh_options, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}/%C",
               "-o", "ControlPersist=60"]
        fresh = [timed_ssh(server.ssh_options, server.alias) for _ in range(args.repeat)]
        first = timed_ssh(mux, server.alias)
        later = [timed_ssh(mux, server.alias) for _ in range(args.repeat)]
        subprocess.run(["ssh", *mux, "-O", "exit", server.alias], capture_output=True, timeout=30)
    fresh_ms, later_ms = statistics.median(fresh) * 1000, statistics.median(later) * 1000
    print(f"fresh connection      median {fresh_ms:7.1f} ms  (min {min(fresh) * 1000:.1f}, max {max(fresh) * 1000:.1f})")
    print(f"first, starts master         {first * 1000:7.1f} ms")
    print(f"over the master       median {later_ms:7.1f} ms  (min {min(later) * 1000:.1f}, max {max(later) * 1000:.1f})")
    print(f"ratio multiplexed / fresh:   {later_ms / fresh_ms:.2f}")
    return 0 if later_ms < fresh_ms else 1


if __name__ == "__main__":
    sys.exit(main())
