"""The benchmark runs (quick mode) and its own checks hold: the job folder equals the snapshot
after every preparation and the build cache survives. Figures are printed, never asserted."""

import re
import subprocess
import sys

from conftest import ROOT


def test_prepare_benchmark_quick_run_holds_its_checks():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/prepare.py"), "--quick", "--laptop"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "build cache" in out and "intact" in out and "fresh add / warm prepare" in out


def test_ask_benchmark_quick_run_measures_patchwire_and_the_hand_written_script():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/ask.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    row = [l for l in out.splitlines() if l.startswith("| 200 | local |")]
    assert len(row) == 1 and row[0].split("|")[5].strip().endswith("x"), out  # both sides ran: a ratio
    assert " MB |" in row[0], out  # the laptop's peak of both sides (nan without /usr/bin/time)
    for part in ("## A branch switch", "## The first ask on an empty box"):
        table = out[out.index(part):].split("\n\n")[2].splitlines()
        assert table[2].endswith("x |") and table[2].startswith(("| 400 |", "| 300 |")), out
    assert "Coloured" in out and "`patchwire --help (cached bytecode)`" in out


def test_gateway_benchmark_quick_run_measures_both_paths():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gateway.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    # both paths measured; which is faster is not asserted (a loopback round trip can come out
    # a fraction of a millisecond faster through the gateway than direct)
    assert len(re.findall(r"\| \d+\.\d\dx \| [+-]\d+\.\d\d ms \|", out)) == 2 and "tunnels open" in out, out


def test_attempts_benchmark_quick_run_prints_both_wall_times():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/attempts.py"), "--sleep", "0.2", "--rounds", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "| one attempt |" in out and "| three attempts, --pick 1 |" in out, out


def test_first_snapshot_benchmark_quick_run_measures_three_ways_and_checks_each_job_folder():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/first_snapshot.py"), "--files", "300", "--repeat", "1",
                           "--adopt-from", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out  # it exits non-zero when a job folder is not the snapshot
    assert "| fast-import, the mirror moved (now) | now / before |" in out and "| first job folder, s |" in out, out


def test_setup_cost_benchmark_quick_run_prints_the_ratio():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/setup_cost.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "warm ask, 200 files, setup:" in out and "with setup unchanged / without:" in out, out


def test_startup_benchmark_quick_run_measures_enter_to_ai_start_up_and_memory_against_the_script():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/startup.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("| patchwire |", "| natural |"))]
    assert len(rows) == 4 and all(line.endswith("x |") for line in rows), out  # both sides, both parts
    assert "Enter -> AI start, 200 files" in out and "peak RSS of a warm ask, 500 files" in out, out
    assert "| 3.9 |" in out or "| 3.13 |" in out, out  # start-up under a supported Python


def test_apply_benchmark_quick_run_measures_patchwire_and_git_on_the_same_patch():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/apply.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out  # both sides left the box's tree (the bench checks it)
    assert "| **Patchwire / git apply** (median of per-round ratios) | **" in out, out
    assert "| **full render / git diff --color** (median of per-round ratios) | **" in out, out


def test_sparse_benchmark_quick_run_measures_both_projects_and_keeps_the_quick_scan():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/sparse.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out  # 1: the sparse project's sync lost git's quick scan
    rows = [line for line in out.splitlines() if line.startswith(("| sparse: 240 of 2,400 |", "| plain: 240 |"))]
    assert len(rows) == 2 and all(line.endswith("x |") for line in rows), out
    assert "quick scan kept: yes (0 absent tracked files watched)" in out, out


def test_nested_benchmark_quick_run_measures_both_projects_and_keeps_the_listing_of_changes():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/nested.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out  # 1: the project with a repository inside was fully scanned
    rows = [line for line in out.splitlines() if line.startswith(("| 2,000 and a repository of 50 |", "| 2,000 |"))]
    assert len(rows) == 2 and all(line.endswith("x |") for line in rows), out
    assert "listed by its changes: yes" in out, out
