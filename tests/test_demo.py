"""The README's first command works and ends with an applied change."""

import os
import subprocess

from conftest import ROOT


def test_demo_script_ends_with_an_applied_change(tmp_path):
    env = {**os.environ, "PATCHWIRE_DEMO_AI": "stand-in", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "tests/demo.sh")], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert "AI = STAND-IN" in out
    assert "applied job" in out
    assert " PATCHWIRE_DEMO.md | 3 +++\n 1 file changed, 3 insertions(+)" in out  # the new file counted
    assert "PATCHWIRE_DEMO_KEEP=1" in out  # says how to keep the folder it removes
    assert "+- Add a short 'Usage' section to the README" in out
    assert not list(tmp_path.iterdir())  # it cleaned up after itself
