"""`patchwire-agent doctor`: what the box needs, each line ok or the fix; run as a process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import STAND_IN_COMMAND, Laptop, agent_source, make_repo, tomli_w, tomllib
from test_box_walls import ACCOUNT, EMPTY_TREE, WallsBox, account_or_skip, readable_copy
import patchwire as pw


def box(tmp_path, **ai) -> str:
    config = tmp_path / "agent.toml"
    made = agent_source("init", "-c", str(config), "--user", "ann", "--token-file", str(tmp_path / "t"))
    assert made.returncode == 0, made.stderr
    data = tomllib.loads(config.read_text())
    data["ai"].update({"command": STAND_IN_COMMAND, "sandbox": "none", **ai})
    config.write_text(tomli_w.dumps(data))
    return str(config)


def checks(result: subprocess.CompletedProcess) -> dict:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_a_ready_box_is_all_ok(tmp_path):
    config = box(tmp_path)
    result = agent_source("doctor", "-c", config, "--json")
    assert result.returncode == 0, result.stdout
    found = checks(result)
    assert set(found) == {"config", "git", "rsync", "rrsync", "ai", "settings", "sandbox", "network", "ai_path",
                          "limits", "state", "listen", "sshd"}
    assert all(c["ok"] for c in found.values())
    assert found["listen"]["detail"] == "http://127.0.0.1:7433"
    human = agent_source("doctor", "-c", config)
    assert human.returncode == 0 and "ok   ai: " in human.stdout and "FAIL" not in human.stdout


def test_a_missing_ai_and_a_shared_state_folder_each_say_the_fix(tmp_path):
    config = box(tmp_path, command=["claude-not-installed-here"])
    state = tmp_path / "patchwire-state"
    state.mkdir(mode=0o755, exist_ok=True)  # init made it (700); another admin opened it up
    os.chmod(state, 0o755)
    result = agent_source("doctor", "-c", config)
    assert result.returncode == 1
    assert "FAIL ai: the AI command 'claude-not-installed-here' is not on the agent's PATH" in result.stdout
    assert "npm install -g @anthropic-ai/claude-code" in result.stdout
    assert f"FAIL state: {state} is readable by other users (mode 755)" in result.stdout
    assert f"fix: chmod 700 {state}" in result.stdout


def test_a_broken_config_is_one_failed_line_not_a_traceback(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[server]\nlisten = "nowhere"\n')
    result = agent_source("doctor", "-c", str(config), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = checks(result)
    assert list(found) == ["config"] and "server.listen" in found["config"]["detail"]


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrkvBiFo0S1sTDGnWBMvpTAYbVJyXkh3UZrlqz3Krrp ann@laptop\n"


def test_a_state_folder_the_account_cannot_make_is_refused_with_the_fix():
    """`init --state-dir` in a folder root owns, as the box account: init, `user key` and
    doctor each say the folder cannot be made and the admin's command, never a traceback."""
    account = account_or_skip()
    place = Path(tempfile.mkdtemp(dir="/srv"))  # root's, like /srv/patchwire on a fresh box
    try:
        os.chmod(place, 0o755)
        code = readable_copy(place / "code")
        # init writes TOML with tomli_w, installed for the tests' Python only
        shutil.copytree(Path(tomli_w.__file__).parent, code / "tomli_w")
        subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
        home = place / "home"
        home.mkdir()
        (home / "ann.pub").write_text(KEY)
        shutil.chown(home, ACCOUNT)
        as_account = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
                      "/usr/bin/python3", str(code / "patchwire_agent.py")]
        state, config = place / "state", home / "agent.toml"
        fix = f"sudo install -d -o {ACCOUNT} -m 700 {state}"

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(as_account + list(args), capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        made = run("init", "-c", str(config), "--user", "ann", "--token-file", str(home / "t"),
                   "--state-dir", str(state))
        assert made.returncode != 0 and fix in made.stderr and "Traceback" not in made.stderr, made.stderr
        assert not config.exists()
        # a config written by hand anyway: doctor fails the state folder, `user key` says the fix
        config.write_text(f'[server]\nstate_dir = "{state}"\n[users.ann]\ntoken_sha256 = "{"0" * 64}"\n')
        shutil.chown(config, ACCOUNT)
        found = checks(run("doctor", "-c", str(config), "--json"))
        assert not found["state"]["ok"] and fix in found["state"]["fix"], found["state"]
        key = run("user", "key", "ann", "-c", str(config), "--ssh-key", str(home / "ann.pub"))
        assert key.returncode != 0 and fix in key.stderr and "Traceback" not in key.stderr, key.stderr
    finally:
        shutil.rmtree(place)


def test_user_key_makes_the_state_folder_private_as_doctor_expects(tmp_path):
    config = box(tmp_path)
    state = tmp_path / "patchwire-state"
    assert state.stat().st_mode & 0o777 == 0o700  # init made it
    shutil.rmtree(state)
    (tmp_path / "ann.pub").write_text(KEY)
    key = agent_source("user", "key", "ann", "-c", config, "--ssh-key", str(tmp_path / "ann.pub"))
    assert key.returncode == 0, key.stderr
    assert state.stat().st_mode & 0o777 == 0o700
    assert checks(agent_source("doctor", "-c", config, "--json"))["state"]["ok"]


def test_a_projects_folder_the_agent_cannot_write_names_the_folder_and_the_fix():
    """Root made a user's projects folder: the ask is refused with the folder and the admin's
    command (it was a 500, "internal error in the agent"), and doctor run as the box account fails it."""
    account_or_skip()
    place = Path(tempfile.mkdtemp(dir="/srv"))
    try:
        os.chmod(place, 0o755)
        walls = WallsBox(place, "account", users=("alice",), ai={"sandbox": "none"})
        projects = walls.state / "users/alice/projects"
        projects.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", f"{ACCOUNT}:", str(walls.state)], check=True)
        os.chown(projects, 0, 0)  # the one folder root made
        body = {"project": "p", "tree": EMPTY_TREE, "files": [], "prompt": "hello"}
        status, answer = walls.agent.json("POST", "/v1/ask", body, token=walls.agent.tokens["alice"])
        assert status == 503 and answer["code"] == "box_folder", (answer, walls.agent.read_log())
        assert f"cannot write its folder {projects}" in answer["error"]
        assert f"sudo chown -R {ACCOUNT} {projects}" in answer["hint"]
        doctor = subprocess.run(walls.agent.program + ["doctor", "-c", str(walls.agent.config), "--json"],
                                capture_output=True, text=True, timeout=60, env=walls.agent.env)
        state = checks(doctor)["state"]
        assert not state["ok"] and str(projects) in state["detail"], state
        assert f"sudo chown -R {ACCOUNT} {walls.state}" in state["fix"]
        walls.agent.stop()
    finally:
        shutil.rmtree(place)


def test_rsync_refused_by_a_box_folder_is_not_called_a_refused_login():
    """rsync's own "mkdir ... failed: Permission denied (13)" (from a real rsync as an ordinary
    account) says the box's folder is not writable, not "set up a key"."""
    account = account_or_skip()
    place = Path(tempfile.mkdtemp(dir="/srv"))
    try:
        os.chmod(place, 0o755)
        (place / "src").mkdir()
        (place / "src/a.txt").write_text("a\n")
        (place / "mirror").mkdir()  # root's, like a mirror folder root made
        subprocess.run(["chmod", "-R", "a+rX", str(place)], check=True)
        sent = subprocess.run(["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
                               "rsync", "-r", f"{place}/src/", f"{place}/mirror/p/"],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode != 0 and "Permission denied" in sent.stderr, sent.stderr
        cfg = type("Cfg", (), {"ssh": "me@box", "ssh_port": None, "ssh_argv": lambda self: ["ssh"]})()
        hint = pw.ssh_failure_hint(cfg, sent.stderr)
        assert "not writable by its account" in hint and "patchwire-agent doctor" in hint, hint
        assert "ssh-copy-id" not in hint
    finally:
        shutil.rmtree(place)


def test_an_ai_script_that_is_missing_or_unreadable_fails_doctor(tmp_path):
    """`[ai] command = ["python3", "/opt/ai.py"]`: python3 is found, the script is not."""
    script_path = tmp_path / "ai.py"
    config = box(tmp_path, command=[sys.executable, str(script_path), "--print"])
    found = checks(agent_source("doctor", "-c", config, "--json"))["ai"]
    assert not found["ok"] and f"argument {str(script_path)!r} does not exist" in found["detail"], found
    assert "[ai] command" in found["fix"]


def test_max_running_above_workers_fails_doctor_with_the_rule(tmp_path):
    config = box(tmp_path)
    data = tomllib.loads(Path(config).read_text())
    data["jobs"]["workers"] = 2
    data["users"]["ann"]["max_running"] = 5
    Path(config).write_text(tomli_w.dumps(data))
    found = checks(agent_source("doctor", "-c", config, "--json"))["settings"]
    assert not found["ok"] and "[users.ann] max_running = 5 for ann is above [jobs] workers = 2" in found["detail"], found
    assert "lower max_running" in found["fix"]


def test_the_laptops_doctor_names_a_mirror_the_box_cannot_write(tmp_path):
    """Root made the project's mirror folder: rsync over rrsync would fail there, and the
    laptop's doctor (which cannot look at the box's folders) hears it from the agent."""
    account_or_skip()
    place = Path(tempfile.mkdtemp(dir="/srv"))
    try:
        os.chmod(place, 0o755)
        walls = WallsBox(place, "account", users=("alice",), ai={"sandbox": "none"})
        mirror = walls.state / "users/alice/mirror/p"
        mirror.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", f"{ACCOUNT}:", str(walls.state)], check=True)
        os.chown(mirror, 0, 0)
        lap = Laptop(make_repo(tmp_path / "laptop", {"a.txt": b"a\n"}))
        lap.init(walls.agent, "--project", "p")
        found = {c["name"]: c for c in json.loads(lap.run("doctor", "--json").out)["checks"]}
        assert not found["mirror"]["ok"] and str(mirror) in found["mirror"]["detail"], found
        assert "patchwire-agent doctor" in found["mirror"]["fix"]
        walls.agent.stop()
    finally:
        shutil.rmtree(place)


def sshd_config(folder: Path, *extra: str) -> Path:
    """An sshd_config as the box's, with its own host key and an absolute AuthorizedKeysFile."""
    from sshd import generate_key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "host").exists():
        generate_key(folder / "host", "host")
    config = folder / "sshd_config"
    config.write_text(f"HostKey {folder / 'host'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
                      + "".join(line + "\n" for line in extra))
    return config


def test_doctor_checks_the_sshd_side_authorized_keys_and_permit_user_environment(tmp_path):
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("needs openssh-server")
    config = box(tmp_path)
    sshd = sshd_config(tmp_path / "ssh")
    keys = tmp_path / "ssh" / "authorized_keys"
    found = checks(agent_source("doctor", "-c", config, "--json", "--sshd-config", str(sshd)))["sshd"]
    assert found["ok"] and f"no {keys} yet" in found["detail"], found
    assert f"PermitUserEnvironment no (from sshd -T -f {sshd})" in found["detail"]  # sshd's default
    keys.write_text(KEY)
    os.chmod(keys, 0o664)
    result = agent_source("doctor", "-c", config, "--sshd-config", str(sshd))
    assert result.returncode == 1
    assert f"FAIL sshd: {keys} is writable by other users (mode 664): they could add a key" in result.stdout
    assert f"chmod go-w {keys} {keys.parent}" in result.stdout
    os.chmod(keys, 0o600)
    found = checks(agent_source("doctor", "-c", config, "--json", "--sshd-config", str(sshd)))["sshd"]
    assert found["ok"] and f"{keys} is root's, writable by it only" in found["detail"], found
    # one key on two users' lines (a colleague's public key handed in as one's own): the first wins
    blob = KEY.split()[1]
    keys.write_text(f'restrict,command="rrsync -wo /s/users/ann/mirror" ssh-ed25519 {blob} patchwire:ann\n'
                    f'restrict,command="rrsync -wo /s/users/gus/mirror" ssh-ed25519 {blob} patchwire:gus\n')
    found = checks(agent_source("doctor", "-c", config, "--json", "--sshd-config", str(sshd)))["sshd"]
    assert not found["ok"] and "has one key on the lines of patchwire:ann, patchwire:gus" in found["detail"], found
    keys.write_text(KEY)
    sshd_config(tmp_path / "ssh", "PermitUserEnvironment yes")
    found = checks(agent_source("doctor", "-c", config, "--json", "--sshd-config", str(sshd)))["sshd"]
    assert not found["ok"] and found["detail"].startswith("PermitUserEnvironment is yes (from sshd -T"), found
    assert f"set PermitUserEnvironment no in {sshd}" in found["fix"]


def test_doctor_as_the_box_account_reads_sshd_config_itself_and_says_when_it_cannot_tell():
    """sshd -T needs the host keys, which are root's: the file is read instead, and a file the
    account cannot read is said, not guessed. A root-owned authorized_keys fails."""
    account = account_or_skip()
    place = Path(tempfile.mkdtemp(dir="/srv"))
    try:
        os.chmod(place, 0o755)
        code = readable_copy(place / "code")
        home = place / "home"
        home.mkdir()
        shutil.chown(home, ACCOUNT)
        config = home / "agent.toml"
        config.write_text(f'[server]\nstate_dir = "{home / "state"}"\n[users.ann]\ntoken_sha256 = "{"0" * 64}"\n')
        shutil.chown(config, ACCOUNT)
        ssh = place / "ssh"
        # an Include read in place: its value comes first, and the first value wins, as in sshd
        sshd = sshd_config(ssh, f"Include {ssh}/*.conf", "PermitUserEnvironment no")
        (ssh / "extra.conf").write_text("PermitUserEnvironment yes\n")
        os.chmod(ssh, 0o755)
        os.chmod(sshd, 0o644)
        keys = ssh / "authorized_keys"
        keys.write_text(KEY)
        os.chmod(keys, 0o644)
        as_account = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
                      "/usr/bin/python3", str(code / "patchwire_agent.py"), "doctor", "-c", str(config), "--json"]

        def sshd_check(path: Path) -> dict:
            ran = subprocess.run(as_account + ["--sshd-config", str(path)], capture_output=True, text=True, timeout=60)
            return checks(ran)["sshd"]
        found = sshd_check(sshd)
        assert not found["ok"] and found["detail"].startswith(f"PermitUserEnvironment is yes (from {sshd})"), found
        sshd_config(ssh)
        found = sshd_check(sshd)
        assert not found["ok"], found
        assert found["detail"] == f"{keys} belongs to root, not {ACCOUNT}: sshd refuses its keys (StrictModes)"
        assert found["fix"].startswith(f"sudo chown {ACCOUNT}: {keys} {ssh}")
        shutil.chown(keys, ACCOUNT)
        shutil.chown(ssh, ACCOUNT)
        found = sshd_check(sshd)
        assert found["ok"] and f"PermitUserEnvironment no (from {sshd})" in found["detail"], found
        os.chmod(sshd, 0o600)
        found = sshd_check(sshd)
        assert found["ok"] and found["detail"].startswith(
            f"cannot tell whether PermitUserEnvironment is no (cannot read {sshd}: Permission denied"), found
    finally:
        shutil.rmtree(place)
