"""Admin commands: run as root on a box whose config and state folder belong to an ordinary
account (the account that runs the agent), they leave both usable by that account; policy is
set from the command line, checked as the config is."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import patchwire_agent as pa
from conftest import STAND_IN_COMMAND, AgentProcess
from test_box_walls import ACCOUNT, account_or_skip, readable_copy


@pytest.fixture
def box_account_agent():
    """An agent run as the test account, its config and state folder owned by that account."""
    account = account_or_skip()
    place = Path(tempfile.mkdtemp(prefix="pw-admin-", dir="/srv" if os.access("/srv", os.W_OK) else None))
    os.chmod(place, 0o755)
    code = readable_copy(place / "code")
    program = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
               "/usr/bin/python3", str(code / "patchwire_agent.py")]
    agent = AgentProcess(place / "box", STAND_IN_COMMAND, program=program,
                         env={"HOME": str(place), "PATH": "/usr/local/bin:/usr/bin:/bin"})
    subprocess.run(["chown", "-R", f"{ACCOUNT}:", str(place / "box")], check=True)
    os.chmod(agent.config, 0o640)  # not the mode the command would pick itself
    agent.start()
    yield agent, account
    agent.stop()
    shutil.rmtree(place, ignore_errors=True)


def owner_and_mode(path: Path):
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_user_add_as_root_keeps_the_config_and_new_folders_the_box_accounts(box_account_agent):
    agent, account = box_account_agent
    before = owner_and_mode(agent.config)
    token_file = agent.workdir / "bob.token"
    assert pa.main(["user", "add", "bob", "-c", str(agent.config), "--token-file", str(token_file)]) == 0
    assert owner_and_mode(agent.config) == before
    status, me = agent.json("GET", "/v1/me", token=token_file.read_text().strip())
    assert status == 200 and me["user"] == "bob", me
    for folder in (agent.state_dir / "users/bob", agent.state_dir / "users/bob/mirror"):
        assert owner_and_mode(folder) == (account.pw_uid, account.pw_gid, 0o700), folder
    # the box account can take the edit lock after root (its own `user rotate` later)
    assert owner_and_mode(agent.config.parent / ".agent.toml.lock")[:2] == (account.pw_uid, account.pw_gid)


def test_policy_set_writes_checked_values_and_a_bad_one_changes_nothing(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    assert pa.main(["init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t")]) == 0
    assert pa.main(["policy", "ann", "-c", str(config), "--set", "max_queued=5", "--set", "rate_limit=30/hour"]) == 0
    out = capsys.readouterr().out
    assert "max_queued        5" in out and '"30/hour"' in out and "from [users.ann]" in out
    assert pa.main(["policy", "--default", "-c", str(config), "--set", 'projects=["web-*"]']) == 0
    assert pa.AgentConfig.load(config).policy("ann").projects == ["web-*"]
    before = config.read_bytes()
    assert pa.main(["policy", "ann", "-c", str(config), "--set", "rate_limit=lots"]) == 1
    assert "users.ann.rate_limit must be COUNT/UNIT" in capsys.readouterr().err
    assert pa.main(["policy", "ann", "-c", str(config), "--set", "colour=red"]) == 2
    assert "keys: projects, rate_limit" in capsys.readouterr().err
    assert pa.main(["policy", "nobody", "-c", str(config), "--set", "max_queued=1"]) == 2
    assert config.read_bytes() == before
