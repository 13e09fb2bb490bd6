"""A newcomer follows the README's "Team setup" as written: its two `sh` blocks are read out of
README.md and each line is run by bash, the box's as the box account (its own HOME) and the
laptop's as two developers, ben and cat (each their own HOME), with the stand-in AI that the
README says to add for a first try. Real parts: the agent and the CLI as processes, a real sshd
on loopback whose authorized_keys is the box account's ~/.ssh/authorized_keys, rrsync, git.

What the test changes in the README's lines, and nothing else: the example address becomes a
free loopback port, /srv/patchwire/state and the token files' folders of the test, `patchwire@box` the
test's sshd, and the two programs their paths. After `patchwire init` it adds the ssh options
a real laptop keeps in ~/.ssh/config (ssh reads that from the account's passwd home, not $HOME).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

import patchwire_agent as pa
from conftest import ROOT, Laptop, make_repo, program_argv
from sshd import free_port, generate_key, running_sshd
from test_ssh import write_sync_options

LABEL = "stand-in AI, not Claude"


def readme_blocks() -> List[List[str]]:
    """The `sh` blocks of the README's Team setup, one command a line (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Team setup\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


def substitute(line: str, subs: Dict[str, str]) -> str:
    for old, new in subs.items():
        line = line.replace(old, new)
    return line


def bash(line: str, cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stderr}\n{done.stdout}"
    return done


@pytest.fixture
def team(tmp_path):
    if not pa.find_rrsync():
        pytest.skip("rrsync is not installed (Debian: apt install rsync)")
    with running_sshd(tmp_path / "sshd") as server:
        yield server


def test_the_readme_team_setup_works_as_written_for_two_developers(tmp_path, team):
    server = team
    box_block, laptop_block = readme_blocks()
    assert box_block[0].startswith("patchwire-agent init --user ann ") and box_block[-1].startswith("patchwire-agent serve")
    home, tokens, state, port = tmp_path / "box", tmp_path / "tmp", tmp_path / "srv/patchwire/state", free_port()
    for folder in (home, tokens, state.parent):
        folder.mkdir(parents=True)
    for name in ("ann", "ben", "cat"):  # "collect the three public keys first"
        generate_key(home / name, f"{name}@laptop")
    (server.tmpdir / "authorized_keys").unlink()  # the sshd reads the box account's file
    (server.tmpdir / "authorized_keys").symlink_to(home / ".ssh/authorized_keys")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    box_env = {**env, "HOME": str(home)}
    agent = shlex.join(program_argv("patchwire-agent"))
    subs = {"--token-file ~/": f"--token-file {tokens}/", "100.101.102.103:7433": f"127.0.0.1:{port}",
            "/srv/patchwire/state": str(state), "patchwire-agent ": agent + " "}
    config, keys = home / ".config/patchwire/agent.toml", home / ".ssh/authorized_keys"

    box_block[0] = box_block[0].replace(" init ", " init --ai stand-in ", 1)  # the README's "to try the box"
    said = [bash(substitute(line, subs), home, box_env) for line in box_block[:-1]]
    init, key_ann, add_ben, add_cat, doctor = said
    assert (f"wrote {config}: the agent will listen on http://127.0.0.1:{port}, state in {state}") in init.stderr
    assert f"user ann added; the token of user ann is in {tokens}/ann.token" in init.stderr
    assert f"  cd ~/code/PROJECT && patchwire init --agent http://127.0.0.1:{port} --token-file" in init.stderr
    for step, name in ((key_ann, "ann"), (add_ben, "ben"), (add_cat, "cat")):
        assert (f"appended the key line to {keys}: that key may only rsync into {state}/users/{name}/mirror"
                in step.stderr), step.stderr
    assert f"added user ben; the token of user ben is in {tokens}/ben.token" in add_ben.stderr
    assert "added user cat (admin)" in add_cat.stderr
    shown = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith('restrict,command="')]
    for readme_line, line in zip(shown, keys.read_text().splitlines()):
        public = line.split('" ', 1)[1].rsplit(" ", 1)[0]
        expect = (readme_line.replace("/usr/bin/rrsync", pa.find_rrsync() or "").replace("/srv/patchwire/state", str(state))
                  .split('" ', 1)[0] + '" ' + public + " " + readme_line.rsplit(" ", 1)[1])
        assert line == expect
    assert len(keys.read_text().splitlines()) == 3 == len(shown)
    assert f"ok   config: {config}: 3 user(s)" in doctor.stdout and "ok   sshd: " in doctor.stdout
    assert f"ok   state: {state}, private" in doctor.stdout

    serve = subprocess.Popen(["bash", "-c", "exec " + substitute(box_block[-1], subs)], cwd=home, env=box_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout.readline().endswith(f" listening on http://127.0.0.1:{port}\n")
        jobs = {name: a_developer(tmp_path, name, laptop_block, subs, env, server, home, tokens, state)
                for name in ("ben", "cat")}
        # nobody sees another's job: ben's token asks for cat's job and is told it does not exist
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/jobs/{jobs['cat']}", headers={
            "Authorization": "Bearer " + (tokens / "ben.token").read_text().strip()})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 404 and jobs["cat"] != jobs["ben"]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    assert f"AI {LABEL}" in serve.stderr.read()


def a_developer(tmp_path: Path, name: str, block: List[str], box_subs: Dict[str, str], env: Dict[str, str],
                server, box_home: Path, tokens: Path, state: Path) -> str:
    """The README's laptop block, line by line, as `name` with their own HOME and token."""
    home = tmp_path / name
    project = make_repo(home / "code/web-app", {"README.md": f"# {name}'s app\n".encode()})
    dev_env = {**env, "HOME": str(home), "EDITOR": f"cp {tokens}/{name}.token"}  # "paste the token"
    laptop = shlex.join(program_argv("patchwire"))
    port = box_subs["100.101.102.103:7433"]
    subs = {"http://100.101.102.103:7433": f"http://{port}", "patchwire@box": f"{server.user}@{server.alias}"}
    cwd, job = home, ""
    for line in block:
        line = re.sub(r"^patchwire ", laptop + " ", substitute(line, subs))
        if line.startswith("cd "):
            cwd = Path(os.path.expanduser(line[3:].strip().replace("~", str(home), 1)))
            continue
        done = bash(line, cwd, dev_env)
        if " init " in line:
            assert (f"wrote {project}/.patchwire.toml (project web-app, agent http://{port}, mirror over ssh "
                    f"{server.user}@{server.alias})") in done.stderr, done.stderr
            write_sync_options(Laptop(project), ssh_options=["-F", str(server.write_client_config(
                home / "ssh_config", box_home / name))])
            bash(f"{laptop} trust", project, dev_env)  # the setting added by hand, trusted as that developer
        elif " ask " in line:
            assert f"AI started ({LABEL})" in done.stderr, done.stderr
            assert f"[{LABEL}] I add your request, on one line, to PATCHWIRE_DEMO.md." in done.stderr
            assert "stdin is not a terminal to confirm on" in done.stderr
            job = re.search(r"kept job (\S+), not applied", done.stderr).group(1)
        else:
            token = home / ".config/patchwire/token"
            assert token.read_text() == (tokens / f"{name}.token").read_text()
            assert token.stat().st_mode & 0o777 == 0o600
    mirror = state / "users" / name / "mirror" / "web-app" / "README.md"
    assert mirror.read_bytes() == f"# {name}'s app\n".encode()  # synced over ssh into their own folder
    diff = subprocess.run(shlex.split(laptop) + ["diff", job], cwd=project, env=dev_env, capture_output=True,
                          text=True, timeout=60)
    assert "+- Add a health check endpoint" in diff.stdout, diff.stdout + diff.stderr
    return job  # its SSH master stays up: the next developer's sync, with another key, has its own
