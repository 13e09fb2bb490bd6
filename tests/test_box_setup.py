"""`patchwire-agent init` sets a box up in one command: it says what the box lacks and how to
install it, makes the state folder owned by the account that runs the agent (mode 700), writes
the config (as root: the box account's), optionally a service unit, and prints each next step.
Run as a process, as root and as the ordinary account pw-walls."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import AGENT, tomli_w, tomllib
from test_box_walls import ACCOUNT, account_or_skip, readable_copy



def run(argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def owner_and_mode(path: Path):
    st = path.stat()
    return st.st_uid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def srv_place():
    """A root-owned folder like /srv on a fresh box, with code the test account can run."""
    place = Path(tempfile.mkdtemp(prefix="pw-setup-", dir="/srv" if os.access("/srv", os.W_OK) else None))
    os.chmod(place, 0o755)
    code = readable_copy(place / "code")
    shutil.copytree(Path(tomli_w.__file__).parent, code / "tomli_w")  # init writes TOML with it
    subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
    yield place, code
    shutil.rmtree(place, ignore_errors=True)


def as_account(code: Path, account) -> list:
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
            "/usr/bin/python3", str(code / "patchwire_agent.py")]


def test_init_says_what_the_box_lacks_and_how_to_install_it(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    made = run(AGENT + ["init", "-c", str(tmp_path / "agent.toml"), "--user", "ann", "--token-file",
                        str(tmp_path / "t")], env={"PATH": str(empty)})
    assert made.returncode == 0, made.stderr  # advice: the config is written all the same
    err = made.stderr
    assert "this box:\nFAIL git: git is not installed\n     fix: install git (Debian/Ubuntu: sudo apt install git" in err
    assert "FAIL rsync: rsync is not installed\n     fix: the laptops rsync into this box: install rsync" in err
    assert "ok   rrsync: " in err  # found in /usr/bin whatever PATH says, or "not installed; only keys ..."
    if sys.platform.startswith("linux"):
        assert "FAIL sandbox: " in err and "sudo apt install bubblewrap" in err
    assert "FAIL ai: the AI command 'claude' is not on the agent's PATH" in err
    assert "npm install -g @anthropic-ai/claude-code" in err
    assert (tmp_path / "agent.toml").is_file()


def test_init_prints_the_address_with_its_port_and_each_next_step(tmp_path):
    config = tmp_path / "agent.toml"
    made = run(AGENT + ["init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t"),
                        "--listen", "100.101.102.103:7433", "--ai", "stand-in"])
    assert made.returncode == 0, made.stderr
    me = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    home = os.path.expanduser("~" + me)
    assert (f"wrote {config}: the agent will listen on http://100.101.102.103:7433, state in "
            f"{tmp_path / 'patchwire-state'} ({me}'s, mode 700), AI stand-in AI, not Claude") in made.stderr
    assert f"user ann added; the token of user ann is in {tmp_path / 't'}" in made.stderr
    assert (f"  patchwire-agent user key ann -c {config} --ssh-key ann.pub --authorized-keys "
            f"{home}/.ssh/authorized_keys") in made.stderr
    assert (f"  patchwire-agent user add NAME -c {config} --ssh-key NAME.pub --authorized-keys "
            f"{home}/.ssh/authorized_keys --token-file NAME.token") in made.stderr
    assert ("  cd ~/code/PROJECT && patchwire init --agent http://100.101.102.103:7433 --token-file "
            f"~/.config/patchwire/token --ssh {me}@100.101.102.103") in made.stderr
    assert made.stdout == ""  # the token went to its file; stdout carries nothing else


def test_init_as_root_gives_the_config_and_state_folder_to_the_box_account(srv_place):
    account = account_or_skip()
    if os.geteuid() != 0:
        pytest.skip("needs root")
    place, code = srv_place
    home = place / "home"
    home.mkdir()
    shutil.chown(home, ACCOUNT)
    config, state = home / ".config/patchwire/agent.toml", place / "patchwire/state"
    made = run(AGENT + ["init", "-c", str(config), "--user", "ann", "--token-file", str(place / "t"),
                        "--state-dir", str(state), "--account", ACCOUNT, "--ai", "stand-in"])
    assert made.returncode == 0, made.stderr
    assert f"({ACCOUNT}'s, mode 700)" in made.stderr and "note: run as root" not in made.stderr
    for path in (config, config.parent, home / ".config", state, state.parent):  # all it made
        assert owner_and_mode(path)[0] == account.pw_uid, path
    assert owner_and_mode(config) == (account.pw_uid, 0o600) and owner_and_mode(state) == (account.pw_uid, 0o700)
    # the box account's doctor finds its config and state folder usable
    doctor = run(as_account(code, account) + ["doctor", "-c", str(config)])
    assert "ok   state: " in doctor.stdout and "ok   config: " in doctor.stdout, doctor.stdout
    # a state folder of another account is refused, nothing written
    other = place / "other-state"
    other.mkdir(mode=0o700)
    again = run(AGENT + ["init", "-c", str(place / "b.toml"), "--state-dir", str(other), "--account", ACCOUNT])
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"the state folder {other} belongs to root, not {ACCOUNT} who runs the agent" in again.stderr
    assert f"sudo chown -R {ACCOUNT}: {other}" in again.stderr and not (place / "b.toml").exists()
    refused = run(AGENT + ["init", "-c", str(place / "c.toml"), "--account", ACCOUNT, "--service"])
    assert refused.returncode == 2 and f"run init --service as {ACCOUNT}" in refused.stderr
    unknown = run(AGENT + ["init", "-c", str(place / "c.toml"), "--account", "no-such-account-pw"])
    assert unknown.returncode == 2 and "no such account on this box" in unknown.stderr


def test_init_as_the_box_account_installs_its_service_and_cannot_make_root_files(srv_place):
    account = account_or_skip()
    place, code = srv_place
    home = place / "home"
    home.mkdir()
    shutil.chown(home, ACCOUNT)
    config = home / "agent.toml"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "USER": ACCOUNT}
    made = run(as_account(code, account) + ["init", "-c", str(config), "--user", "ann", "--token-file",
                                            str(home / "t"), "--service"], env=env)
    assert made.returncode == 0, made.stderr
    unit = home / ".config/systemd/user/patchwire-agent.service"
    assert f"wrote {unit}; start it" in made.stderr
    assert made.stdout == "systemctl --user daemon-reload && systemctl --user enable --now patchwire-agent.service\n"
    assert f"ExecStart=/usr/bin/python3 {code / 'patchwire_agent.py'} serve -c {config}" in unit.read_text()
    assert owner_and_mode(home / "patchwire-state") == (account.pw_uid, 0o700)
    assert tomllib.loads(config.read_text())["users"]["ann"]["token_sha256"]
    # the box account's own user and policy commands keep init's commented config as it was
    template = config.read_text()
    for command in (["user", "add", "ben", "--token-file", str(home / "ben.token")],
                    ["policy", "ben", "--set", "max_queued=3"], ["policy", "--default", "--set", "rate_limit=30/hour"]):
        edited = run(as_account(code, account) + command + ["-c", str(config)], env=env)
        assert edited.returncode == 0 and "rewritten whole" not in edited.stderr, edited.stderr
    after = config.read_text()
    assert [l for l in after.splitlines() if l.startswith("#")] == [l for l in template.splitlines() if l.startswith("#")]
    assert after.startswith(template.split("[users.ann]")[0])  # everything above the users, byte for byte
    assert "[users.ben]\n" in after and 'rate_limit = "30/hour"' in after
    refused = run(as_account(code, account) + ["init", "-c", str(home / "b.toml"), "--account", "root"], env=env)
    assert refused.returncode == 2 and "--account root: only root makes files for another account" in refused.stderr
    assert not (home / "b.toml").exists()
