#!/usr/bin/env python3
"""What the disk quota's watchdog costs: one measure of a job folder of N files (tree_size),
taken every QUOTA_SAMPLE_S while a job of a user with `disk_quota_mb` runs.

    python3 bench/quota_walk.py                 # 20,000 files, 7 samples
    python3 bench/quota_walk.py --files 100000

Prints the median time of a sample and the share of one core it takes at the sampling
interval. Exit status 0; 2 on bad usage. Everything happens in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import patchwire_agent as pa  # noqa: E402


def make_folder(root: Path, files: int) -> None:
    """`files` files of 1-4 KB, 100 to a folder, two levels deep (a project's shape)."""
    for n in range(files):
        folder = root / f"pkg{n // 10000}" / f"mod{n // 100}"
        if n % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{n}.py").write_bytes(b"x" * (1024 + n % 3072))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-") as tmp:
        root = Path(tmp)
        make_folder(root, args.files)
        size = pa.tree_size(root)  # the first walk warms the inode cache, as the job's own writes do
        samples = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            assert pa.tree_size(root) == size
            samples.append(time.perf_counter() - started)
    seconds = statistics.median(samples)
    every = max(pa.QUOTA_SAMPLE_S, seconds / pa.QUOTA_SAMPLE_SHARE)  # as AIRun._watch spaces them
    print(f"| files | bytes | one sample (median of {args.repeat}) | a sample every | share of a core |")
    print("|---|---|---|---|---|")
    print(f"| {args.files:,} | {size:,} | {seconds * 1000:.1f} ms | {every:.1f} s | {seconds / every * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
