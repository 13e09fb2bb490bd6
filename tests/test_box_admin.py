"""Admin commands: run as root on a box whose config and state folder belong to an ordinary
account (the account that runs the agent), they leave both usable by that account; policy is
set from the command line, checked as the config is."""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import patchwire_agent as pa
from conftest import STAND_IN_COMMAND, AgentProcess, script, wait_until
from test_box_walls import ACCOUNT, EMPTY_TREE, account_or_skip, readable_copy


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


def test_user_remove_purge_confirms_then_deletes_their_files_and_key(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    body = {"project": "p", "tree": EMPTY_TREE, "files": [], "prompt": script({"write": "a.txt", "text": "hi\n"})}
    status, job = agent.json("POST", "/v1/ask", body, token=agent.tokens["bob"])
    assert status == 202, job
    deadline = time.monotonic() + 60
    while agent.json("GET", f"/v1/jobs/{job['id']}", token=agent.tokens["bob"])[1]["status"] != "done":
        assert time.monotonic() < deadline, "bob's job did not finish"
        time.sleep(0.05)
    folder, patch = agent.state_dir / "users/bob", agent.state_dir / f"patches/{job['id']}.patch"
    assert (folder / "home").is_dir() and (folder / "projects/p").is_dir() and patch.exists()
    keys = tmp_path / "authorized_keys"
    keys.write_text(pa.rrsync_key_line(agent.state_dir, "alice", "ssh-ed25519 AAAA") + "\n"
                    + pa.rrsync_key_line(agent.state_dir, "bob", "ssh-ed25519 BBBB") + "\n")
    remove = agent.program + ["user", "remove", "bob", "-c", str(agent.config), "--purge",
                              "--authorized-keys", str(keys)]
    refused = subprocess.run(remove, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "add --yes" in refused.stderr and "Traceback" not in refused.stderr
    assert folder.exists() and agent.json("GET", "/v1/me", token=agent.tokens["bob"])[0] == 200
    done = subprocess.run(remove + ["--yes"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert agent.request("GET", "/v1/me", token=agent.tokens["bob"])[0] == 401
    assert not folder.exists() and not patch.exists()
    assert "BBBB" not in keys.read_text() and "AAAA" in keys.read_text()
    assert agent.json("GET", "/v1/me", token=agent.tokens["alice"])[0] == 200
    # what the jobs said is gone too; their rows stay for usage
    store = pa.open_store(pa.AgentConfig.load(agent.config))
    try:
        assert store.job(job["id"])["prompt"] == "" and store.events(job["id"], 0) == []
    finally:
        store.close()


def test_a_removed_users_name_is_not_handed_to_someone_new_by_accident(make_agent, tmp_path, capsys):
    """A name taken out of the config keeps its jobs (prompts, events, patches) and files: a new
    person given that name read the old one's plans, and got their notification targets. Remove
    drops the targets; add refuses the name, unless the same person comes back (--reuse)."""
    agent = make_agent(users=("alice", "bob"))
    body = {"project": "p", "tree": EMPTY_TREE, "files": [], "prompt": "OLD BOB's private plan " + script({"say": "ok"})}
    status, job = agent.json("POST", "/v1/ask", body, token=agent.tokens["bob"])
    assert status == 202, job
    wait_until(lambda: agent.json("GET", f"/v1/jobs/{job['id']}", token=agent.tokens["bob"])[1]["status"] == "done",
               what="bob's job")
    config = str(agent.config)
    store = pa.open_store(pa.AgentConfig.load(agent.config))
    try:
        store.add_target({"id": "t1", "user": "bob", "kind": "webhook", "url": "https://hooks.example/bob",
                          "secret": "s", "events": ["end"], "include": ["prompt"], "created": 1.0})
    finally:
        store.close()
    assert pa.main(["user", "remove", "bob", "-c", config]) == 0
    before = agent.config.read_bytes()
    capsys.readouterr()
    assert pa.main(["user", "add", "bob", "-c", config, "--token-file", str(tmp_path / "bob.token")]) == 2
    err = capsys.readouterr().err
    assert "a user bob was on this box before: 1 job(s)" in err and "add --reuse" in err, err
    assert agent.config.read_bytes() == before and not (tmp_path / "bob.token").exists()
    assert pa.main(["user", "add", "bob", "-c", config, "--reuse", "--token-file", str(tmp_path / "bob.token")]) == 0
    token = (tmp_path / "bob.token").read_text().strip()
    assert [j["id"] for j in agent.json("GET", "/v1/jobs", token=token)[1]["jobs"]] == [job["id"]]
    store = pa.open_store(pa.AgentConfig.load(agent.config))
    try:
        assert store.targets("bob") == []  # dropped at remove: the same person adds them again
    finally:
        store.close()


def test_project_remove_deletes_one_project_and_the_next_ask_starts_afresh(make_agent):
    agent = make_agent()
    ask = {"project": "p", "tree": EMPTY_TREE, "files": [], "prompt": script({"write": "a.txt", "text": "hi\n"})}
    job = agent.json("POST", "/v1/ask", ask)[1]
    assert agent.wait_job(job["id"])["status"] == "done"
    mirror, home = agent.state_dir / "users/alice/mirror/p", agent.state_dir / "users/alice/projects/p"
    assert mirror.is_dir() and home.is_dir()
    own_home = agent.state_dir / "users/alice/homes/p"  # a project with a network of its own has one
    (own_home / ".claude").mkdir(parents=True)
    (own_home / ".claude/settings.json").write_text('{"hooks": "planted"}')
    remove = agent.program + ["project", "remove", "alice", "p", "-c", str(agent.config)]
    refused = subprocess.run(remove, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "add --yes" in refused.stderr and mirror.is_dir()
    done = subprocess.run(remove + ["--yes"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not mirror.exists() and not home.exists() and not own_home.exists()
    assert not (agent.state_dir / f"patches/{job['id']}.patch").exists()
    again = agent.json("POST", "/v1/ask", ask)[1]
    assert agent.wait_job(again["id"])["status"] == "done", agent.events(again["id"])[-1]
    gone = subprocess.run(remove + ["--yes"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0
    nothing = subprocess.run(remove + ["--yes"], capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "has no project" in nothing.stderr


def test_user_add_as_root_makes_the_authorized_keys_the_box_accounts(box_account_agent, tmp_path):
    """sshd refuses keys in a file the account does not own (StrictModes): the file and its
    folder that root's `user add` makes belong to the config's owner; an existing one keeps its."""
    agent, account = box_account_agent
    (tmp_path / "carol.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrkvBiFo0S1sTDGnWBMvpTAYbVJyXkh3Uz"
                                        "rlqz3Krrp carol@laptop\n")
    keys = agent.workdir / "home" / ".ssh" / "authorized_keys"
    added = pa.main(["user", "add", "carol", "-c", str(agent.config), "--token-file", str(tmp_path / "t"),
                     "--ssh-key", str(tmp_path / "carol.pub"), "--authorized-keys", str(keys)])
    assert added == 0
    assert owner_and_mode(keys) == (account.pw_uid, account.pw_gid, 0o600)
    assert owner_and_mode(keys.parent) == (account.pw_uid, account.pw_gid, 0o700)
    assert keys.read_text().endswith(" patchwire:carol\n")


COMMENTED = '''\
# Our box: ask Dana before changing anything.

[server]
listen = "127.0.0.1:7433"   # the tailnet address goes here
state_dir = "{state}"

[ai]
# a command over lines, and a string whose lines look like tables
command = [
    "claude",  # the CLI
    "--print",
]
env = {{ NOTE = "x" }}

[policy]
# the team agreed on 30 an hour
rate_limit = "30/hour"

# ann leads the team
[users.ann]
token_sha256 = "{digest}"
'''


# a string whose lines look like a table and a key: the editor asks the TOML reader where it ends
TRICKY = '''"quoted key" = 1
motto = """
[users.fake]
token_sha256 = "not a table"
"""
'''


def commented_config(tmp_path, tricky: str = "") -> str:
    return COMMENTED.format(state=tmp_path / "state", digest="a" * 64).replace("\n\n# ann", "\n" + tricky + "\n# ann")


def comments(text: str):
    return [line.strip() for line in text.splitlines() if "#" in line]


@pytest.mark.parametrize("change, most", [
    (lambda d: d["users"].update(ben={"token_sha256": "b" * 64}), 3),  # blank, header, key
    (lambda d: d["users"].pop("ann"), 4),  # its header, key and the blank line above; users = {} stays
    (lambda d: d["users"]["ann"].update(token_sha256="c" * 64, max_queued=5), 3),
    (lambda d: d["policy"].update(rate_limit="5/hour", projects=["web-*", "api"]), 6),
    (lambda d: d["policy"].pop("rate_limit"), 1),
    (lambda d: d.setdefault("jobs", {}).update(workers=3), 3),
])
def test_an_edit_rewrites_only_its_lines_and_keeps_every_comment(tmp_path, change, most):
    text = commented_config(tmp_path, TRICKY)
    data = pa.pw.parse_toml(text, tmp_path)
    change(data)
    spliced = pa.splice_toml(text, data)
    assert spliced is not None and pa.pw.parse_toml(spliced, tmp_path) == data
    assert comments(spliced) == comments(text)
    changed = [line for line in difflib.ndiff(text.splitlines(), spliced.splitlines()) if line[:1] in "+-"]
    assert len(changed) <= most, "\n".join(changed)  # only the edited key's or table's lines


@pytest.mark.parametrize("layout", [
    'users = { ann = { token_sha256 = "%s" } }\n' % ("a" * 64),
    '[users]\nann.token_sha256 = "%s"\nann.admin = true\n' % ("a" * 64),
    '[[extra]]\nx = 1\n[users.ann]\ntoken_sha256 = "%s"\n' % ("a" * 64),
])
def test_a_layout_beyond_the_line_editor_is_left_to_the_full_rewrite(tmp_path, layout):
    data = pa.pw.parse_toml(layout, tmp_path)
    data["users"]["ben"] = {"token_sha256": "b" * 64}
    assert pa.splice_toml(layout, data) is None


def test_user_and_policy_commands_keep_the_configs_comments_as_root_on_the_box_accounts(box_account_agent, tmp_path):
    agent, account = box_account_agent
    text = commented_config(agent.workdir).replace("[users.ann]", "[users.alice]")
    text = text.replace("a" * 64, pa.token_digest(agent.token).hex()).replace(
        "127.0.0.1:7433", "127.0.0.1:0").replace(str(agent.workdir / "state"), str(agent.state_dir))
    agent.config.write_text(text)
    config = str(agent.config)
    assert pa.main(["user", "add", "ben", "-c", config, "--token-file", str(tmp_path / "ben")]) == 0
    assert pa.main(["policy", "ben", "-c", config, "--set", "max_queued=3"]) == 0
    assert pa.main(["policy", "--default", "-c", config, "--set", "rate_limit=60/hour"]) == 0
    assert pa.main(["user", "rotate", "alice", "-c", config, "--token-file", str(tmp_path / "alice")]) == 0
    after = agent.config.read_text()
    assert [c for c in comments(after)] == [c for c in comments(text)]
    assert 'rate_limit = "60/hour"\n' in after and "[users.ben]\n" in after and "max_queued = 3\n" in after
    assert owner_and_mode(agent.config)[:2] == (account.pw_uid, account.pw_gid)
    status, me = agent.json("GET", "/v1/me", token=(tmp_path / "ben").read_text().strip())
    assert status == 200 and me["user"] == "ben"  # the running agent read the edited file
    assert pa.main(["user", "remove", "ben", "-c", config]) == 0
    assert "[users.ben]" not in agent.config.read_text()
    assert comments(agent.config.read_text()) == comments(text)


def test_a_config_beyond_the_line_editor_is_rewritten_whole_and_says_so(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text('# gone after the rewrite\nusers = { ann = { token_sha256 = "%s" } }\n' % ("a" * 64))
    assert pa.main(["user", "add", "ben", "-c", str(config), "--token-file", str(tmp_path / "t")]) == 0
    assert "was rewritten whole, without its comments" in capsys.readouterr().err
    text = config.read_text()
    assert text.startswith(pa.CONFIG_HEADER) and "# gone after" not in text and "[users.ben]" in text
