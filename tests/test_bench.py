"""The benchmark runs (quick mode) and its own checks hold: the job folder equals the snapshot
after every preparation and the build cache survives. Figures are printed, never asserted."""

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
    assert len(row) == 1 and row[0].endswith("x |"), out  # both sides ran: a ratio was computed
    assert "Coloured" in out and "`patchwire --help (cached bytecode)`" in out


def test_gateway_benchmark_quick_run_measures_both_paths():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gateway.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert out.count("x | +") == 2 and "tunnels open" in out, out


def test_attempts_benchmark_quick_run_prints_both_wall_times():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/attempts.py"), "--sleep", "0.2", "--rounds", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "| one attempt |" in out and "| three attempts, --pick 1 |" in out, out


def test_setup_cost_benchmark_quick_run_prints_the_ratio():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/setup_cost.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "warm ask, 200 files, setup:" in out and "with setup unchanged / without:" in out, out


def test_apply_benchmark_quick_run_measures_patchwire_and_git_on_the_same_patch():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/apply.py"), "--quick"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out  # both sides left the box's tree (the bench checks it)
    assert "| **Patchwire / git apply** (median of per-round ratios) | **" in out, out
    assert "| **full render / git diff --color** (median of per-round ratios) | **" in out, out
