"""The whole loop with the BUILT zipapps: dist/patchwire-agent serves and dist/patchwire asks,
each run by the oldest or newest supported Python, in every pairing (a laptop on macOS's
python3.9 talks to a box on 3.13, and the other way round).

Only the AI is a stand-in (tests/stand_in_claude.py); each zipapp extracts itself into a
SHIV_ROOT of the test's own. The agent's config is written by `patchwire_agent.main(["init"])`
in this process (AgentProcess does that); the zipapp's own `init` is exercised too.
"""
from __future__ import annotations

import base64
import os
import select
import subprocess
from pathlib import Path

import pytest

import patchwire
from conftest import Laptop, make_repo, script, snapshot_tree, tomllib
from zipapps import built_zipapps, python_for  # noqa: F401 (built_zipapps: fixture)

pytestmark = pytest.mark.slow

PAIRS = [("3.9", "3.9"), ("3.13", "3.13"), ("3.9", "3.13"), ("3.13", "3.9")]  # (laptop, agent)
BINARY = bytes(range(256)) + b"\r\n\x00"

FILES = {
    "README.md": b"# zipapp demo\n",
    "src/app.py": b"def main():\n    return 1\n",
    "obsolete.txt": b"delete me\n",
    "win.txt": b"one\r\ntwo\r\n",
    "img.bin": BINARY,
    ".gitignore": b"build/\n",
}


def interpreter_of(pid: int) -> str:
    return os.path.realpath(f"/proc/{pid}/exe")


@pytest.mark.parametrize("laptop_version, agent_version", PAIRS,
                         ids=[f"laptop{a}-agent{b}" for a, b in PAIRS])
def test_whole_loop_with_built_zipapps(built_zipapps, make_agent, tmp_path, laptop_version, agent_version):
    laptop_python, agent_python = python_for(laptop_version), python_for(agent_version)
    agent_pyz, laptop_pyz = built_zipapps["patchwire-agent"], built_zipapps["patchwire"]
    box_shiv, laptop_shiv = tmp_path / "shiv-box", tmp_path / "shiv-laptop"

    agent = make_agent(program=[agent_python, str(agent_pyz)], env={"SHIV_ROOT": str(box_shiv)})
    # the agent really is the zipapp, run by the interpreter asked for
    assert interpreter_of(agent.proc.pid) == os.path.realpath(agent_python)
    assert str(agent_pyz) in Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().decode().split("\0")
    status, health = agent.json("GET", "/v1/health", token=None)
    assert status == 200 and health["version"] == patchwire.__version__ and health["ai_found"]

    root = make_repo(tmp_path / "laptop", FILES)
    (root / ".env").write_bytes(b"SECRET=never-leaves\n")
    lap = Laptop(root, program=[laptop_python, str(laptop_pyz)], env={"SHIV_ROOT": str(laptop_shiv)})
    assert lap.run("--version", check=0).out == f"patchwire {patchwire.__version__}\n"
    helped = lap.run("--help", check=0).out
    helped = " ".join(helped.split())  # however the epilog is wrapped
    assert "exit codes: 0 ok, 1 error, 2 usage, 3 agent unreachable or refused" in helped
    assert "4 AI run failed, 5 patch does not apply, 6 checks failed (ask --require-checks), 130 interrupted" in helped
    lap.init(agent)

    new_binary = BINARY[::-1]
    result = lap.ask(script(
        {"write": "src/app.py", "text": "def main():\n    return 2  # edited\n"},
        {"write": "win.txt", "b64": base64.b64encode(b"one\r\ntwo, edited\r\nthree\r\n").decode()},
        {"write": "img.bin", "b64": base64.b64encode(new_binary).decode()},
        {"write": "pkg/new_module.py", "text": "VALUE = 'caf\u00e9'\n"},
        {"delete": "obsolete.txt"},
        {"say": "Edited, added and deleted."},
    ), "--yes")
    assert result.returncode == 0, result.err
    assert "Edited, added and deleted." in result.err
    job = lap.last_job()
    assert f"applied job {job}: 5 file(s) changed" in result.err
    assert "Traceback" not in result.err

    after = {rel: data for rel, (_, _, data) in snapshot_tree(root).items()}
    assert after == {
        "README.md": b"# zipapp demo\n",
        "src/app.py": b"def main():\n    return 2  # edited\n",
        "win.txt": b"one\r\ntwo, edited\r\nthree\r\n",
        "img.bin": new_binary,
        "pkg/new_module.py": "VALUE = 'caf\u00e9'\n".encode(),
        ".gitignore": b"build/\n",
        ".env": b"SECRET=never-leaves\n",
        ".patchwire.toml": (root / ".patchwire.toml").read_bytes(),
    }
    mirror = agent.state_dir / "users" / "alice" / "mirror" / "laptop"
    assert not (mirror / ".env").exists()

    # both programs ran from their own extracted zipapps, nothing from this checkout
    assert [p.name.split("_")[0] for p in box_shiv.iterdir() if p.is_dir()] == ["patchwire-agent"]
    assert [p.name.split("_")[0] for p in laptop_shiv.iterdir() if p.is_dir()] == ["patchwire"]

    assert agent.stop() == 0


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_agent_zipapp_init_writes_a_config_its_serve_accepts(built_zipapps, tmp_path, version):
    python = python_for(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIV_")}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")
    config, token_file = tmp_path / "box" / "agent.toml", tmp_path / "alice.token"

    def agent(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([python, str(built_zipapps["patchwire-agent"]), *args], env=env,
                              capture_output=True, text=True, timeout=60, **kw)
    init = agent("init", "-c", str(config), "--user", "alice", "--token-file", str(token_file),
                 "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                 stdin=subprocess.DEVNULL)
    assert init.returncode == 0, init.stderr
    data = tomllib.loads(config.read_text())
    assert list(data["users"]) == ["alice"]
    token = token_file.read_text().strip()
    assert token and token not in config.read_text()
    assert oct(config.stat().st_mode & 0o777) == oct(0o600) == oct(token_file.stat().st_mode & 0o777)

    serve = subprocess.Popen([python, str(built_zipapps["patchwire-agent"]), "serve", "-c", str(config)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([serve.stdout], [], [], 60)
        first = serve.stdout.readline().decode() if ready else ""
        assert first.startswith(f"patchwire-agent {patchwire.__version__} listening on http://127.0.0.1:")
    finally:
        serve.terminate()
        serve.wait(timeout=20)
    assert serve.returncode == 0, serve.stderr.read().decode()
