"""Names and links another account of the same machine plants, against the admin commands run
as root on the box and against the laptop's SSH socket folder.

The box account runs the agent, so whatever escapes a job runs as it, and it owns the config's
folder and the state folder: a link it leaves where an admin command run as root writes (the
config's edit lock, a cancel request, authorized_keys) must never hand it a file of root's. A
token file name in a shared folder (`/tmp/ben.token`, made first by someone else) must never
receive the token. A developer's key is theirs alone. The root-only tests make the link's owner
a real second account (pw-walls); the others run as any account.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import patchwire
import patchwire_agent as pa
from test_box_admin import box_account_agent  # noqa: F401 (a fixture)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGrkvBiFo0S1sTDGnWBMvpTAYbVJyXkh3Uzrlqz3Krrp"


def root_secret(folder: Path, name: str) -> Path:
    """A file only root may read, in a folder only root may enter."""
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    secret = folder / name
    secret.write_text(f"ROOT-ONLY {name}\n")
    os.chmod(secret, 0o600)
    return secret


def plant_link(link: Path, target: Path, account) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.chown(link.parent, account.pw_uid, account.pw_gid)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    os.lchown(link, account.pw_uid, account.pw_gid)


def untouched(secret: Path) -> None:
    st = secret.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), f"{secret} was handed over"
    assert secret.read_text() == f"ROOT-ONLY {secret.name}\n", f"{secret} was written"


def admin(capsys, *argv: str) -> tuple:
    code = pa.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


# ------------------------------------------------------------------ root on the box account's folders


@pytest.mark.parametrize("where", ["edit lock", "cancel request", "authorized_keys"])
def test_a_link_the_box_account_planted_hands_it_no_file_of_roots(box_account_agent, capsys, where):  # noqa: F811
    agent, account = box_account_agent
    config = str(agent.config)
    secret = root_secret(agent.workdir.parent / "root-only", "shadow")
    assert pa.main(["user", "add", "bob", "-c", config, "--token-file", str(agent.workdir.parent / "bob.token")]) == 0
    if where == "edit lock":  # every user add, remove, rotate and policy --set takes it
        plant_link(agent.config.parent / ".agent.toml.lock", secret, account)
        argv = ["policy", "bob", "-c", config, "--set", "max_queued=3"]
    elif where == "cancel request":  # rotate and remove --cancel-jobs write one for the agent
        plant_link(pa.cancel_requests_dir(agent.state_dir) / "bob", secret, account)
        argv = ["user", "rotate", "bob", "-c", config, "--cancel-jobs", "--token-file",
                str(agent.workdir.parent / "bob2.token")]
    else:
        keys = agent.workdir / "home" / ".ssh" / "authorized_keys"
        plant_link(keys, secret, account)
        (agent.workdir.parent / "bob.pub").write_text(KEY + " bob@laptop\n")
        argv = ["user", "key", "bob", "-c", config, "--ssh-key", str(agent.workdir.parent / "bob.pub"),
                "--authorized-keys", str(keys)]
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    code, err = admin(capsys, *argv)
    untouched(secret)
    assert code != 0 and "Permission denied" in err, err
    assert (os.getresuid(), os.getresgid(), os.getgroups()) == ids == ((0, 0, 0), (0, 0, 0), ids[2])  # root again


def test_root_acts_as_the_box_account_and_is_root_again_for_the_admins_token_file(box_account_agent, tmp_path):  # noqa: F811
    """What root's `user add` makes in the box account's folders is that account's (made as
    it, not chowned after); the token file the admin named in root's own folder is root's."""
    agent, account = box_account_agent
    token_file = tmp_path / "private" / "carl.token"  # root's folder, 700: the box account cannot enter
    token_file.parent.mkdir(mode=0o700)
    assert pa.main(["user", "add", "carl", "-c", str(agent.config), "--token-file", str(token_file)]) == 0
    st = token_file.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    status, me = agent.json("GET", "/v1/me", token=token_file.read_text().strip())
    assert status == 200 and me["user"] == "carl"
    mirror = agent.state_dir / "users" / "carl" / "mirror"
    assert (mirror.stat().st_uid, mirror.stat().st_gid) == (account.pw_uid, account.pw_gid)


def test_a_token_file_name_another_account_made_first_never_receives_the_token(box_account_agent, capsys):  # noqa: F811
    agent, account = box_account_agent
    shared = agent.workdir.parent / "shared"  # as /tmp: anyone may make a name, only its owner remove it
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)
    planted = shared / "dan.token"
    planted.write_text("planted\n")
    os.chown(planted, account.pw_uid, account.pw_gid)
    os.chmod(planted, 0o666)
    with open(planted) as theirs:  # what the account that made it can still read
        code, _ = admin(capsys, "user", "add", "dan", "-c", str(agent.config), "--token-file", str(planted))
        assert code == 0
        theirs.seek(0)
        assert theirs.read() == "planted\n"
    st = planted.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    status, me = agent.json("GET", "/v1/me", token=planted.read_text().strip())
    assert status == 200 and me["user"] == "dan"


# ------------------------------------------------------------------ token files and keys, as any account


@pytest.fixture
def box(tmp_path):
    config = tmp_path / "agent.toml"
    assert pa.main(["init", "-c", str(config), "--user", "ann", "--state-dir", str(tmp_path / "state"),
                    "--token-file", str(tmp_path / "ann.token")]) == 0
    return config


@pytest.mark.parametrize("kind", ["symlink", "fifo", "no folder"])
def test_a_token_file_that_is_not_a_new_or_regular_file_is_refused_before_any_change(box, tmp_path, capsys, kind):
    name = tmp_path / "ben.token"
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    if kind == "symlink":
        name.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(name)
    else:
        name = tmp_path / "missing" / "ben.token"
    before = box.read_bytes()
    capsys.readouterr()
    code, err = admin(capsys, "user", "add", "ben", "-c", str(box), "--token-file", str(name))
    assert code == 2, err
    expected = {"symlink": "is a symlink: nothing was changed", "fifo": "is not a regular file: nothing was changed",
                "no folder": "cannot write the token file"}[kind]
    assert expected in err, err
    assert box.read_bytes() == before and "ben" not in pa.AgentConfig.load(box).users
    assert target.read_text() == "keep\n"
    assert not list(tmp_path.glob(".ben.token.*"))  # no half-made file
    # a rotate refused the same way keeps the old token valid
    if kind == "symlink":
        code, err = admin(capsys, "user", "rotate", "ann", "-c", str(box), "--token-file", str(name))
        assert code == 2 and box.read_bytes() == before


def test_a_key_already_given_to_another_user_is_refused_before_any_change(box, tmp_path, capsys):
    """sshd takes the first line that matches: a colleague's public key handed in as one's own
    would make the colleague's syncs land in one's own mirror."""
    keys = tmp_path / "authorized_keys"
    (tmp_path / "ann.pub").write_text(KEY + " ann@laptop\n")
    (tmp_path / "gus.pub").write_text(KEY + " gus@laptop\n")  # the same key, another comment
    assert pa.main(["user", "key", "ann", "-c", str(box), "--ssh-key", str(tmp_path / "ann.pub"),
                    "--authorized-keys", str(keys)]) == 0
    lines, config = keys.read_text(), box.read_bytes()
    capsys.readouterr()
    code, err = admin(capsys, "user", "add", "gus", "-c", str(box), "--ssh-key", str(tmp_path / "gus.pub"),
                      "--authorized-keys", str(keys), "--token-file", str(tmp_path / "gus.token"))
    assert code == 2 and "has this key already, on a line of patchwire:ann: nothing was changed" in err, err
    assert keys.read_text() == lines and box.read_bytes() == config and not (tmp_path / "gus.token").exists()
    # the same key for the same user again adds nothing
    code, err = admin(capsys, "user", "key", "ann", "-c", str(box), "--ssh-key", str(tmp_path / "ann.pub"),
                      "--authorized-keys", str(keys))
    assert code == 0 and "has this key for ann already: nothing to add" in err and keys.read_text() == lines
    # a line sshd skips (commented out) holds no key
    keys.write_text("# " + KEY + " old@desk\n")
    code, err = admin(capsys, "user", "key", "ann", "-c", str(box), "--ssh-key", str(tmp_path / "ann.pub"),
                      "--authorized-keys", str(keys))
    assert code == 0 and keys.read_text().endswith(" patchwire:ann\n"), err
    # a login line of the account's own (not Patchwire's) counts too
    keys.write_text(KEY + " admin@desk\n")
    code, err = admin(capsys, "user", "key", "ann", "-c", str(box), "--ssh-key", str(tmp_path / "ann.pub"),
                      "--authorized-keys", str(keys))
    assert code == 2 and "on a line of another login (not Patchwire's)" in err
    assert keys.read_text() == KEY + " admin@desk\n"


# ------------------------------------------------------------------ the laptop's SSH socket folder


def test_the_ssh_socket_folder_is_refused_when_a_link_or_not_private(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(patchwire, "CONTROL_TMP", tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    folder = tmp_path / f"patchwire-{os.getuid()}"
    folder.symlink_to(mine)  # another account's link to a folder of yours: they could repoint it
    with pytest.raises(patchwire.PatchwireError, match="is not a private folder of yours: it is a link"):
        patchwire.control_dir()
    folder.unlink()
    assert patchwire.control_dir() == str(folder) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chmod(folder, 0o755)
    with pytest.raises(patchwire.PatchwireError, match="chmod 700"):
        patchwire.control_dir()
    # a session's private runtime folder comes first
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert patchwire.control_dir() == str(runtime / "patchwire")
    os.chmod(runtime, 0o755)  # not private: not used
    os.chmod(folder, 0o700)
    assert patchwire.control_dir() == str(folder)


def test_the_ssh_socket_folder_another_account_made_first_is_refused(tmp_path, monkeypatch):
    from test_box_walls import account_or_skip
    account = account_or_skip()
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(patchwire, "CONTROL_TMP", tmp_path)
    folder = tmp_path / f"patchwire-{os.getuid()}"
    folder.mkdir(mode=0o700)
    os.chown(folder, account.pw_uid, account.pw_gid)
    with pytest.raises(patchwire.PatchwireError, match="another account's") as refused:
        patchwire.control_dir()
    assert "set XDG_RUNTIME_DIR" in refused.value.hint



def test_root_edits_a_config_in_roots_folder_for_a_state_folder_of_the_box_accounts(tmp_path, capsys):
    """`sudo patchwire-agent init -c /etc/patchwire/agent.toml --account X`: the config (X's)
    sits in root's folder, the state folder is X's. Root acts as X for the state folder and is
    root for the config's edit (X could not write its lock or temporary file there)."""
    from test_box_walls import account_or_skip
    account = account_or_skip()
    place = Path(tempfile.mkdtemp(prefix="pw-etc-", dir="/srv" if os.access("/srv", os.W_OK) else None))
    try:
        os.chmod(place, 0o755)
        (place / "etc").mkdir(mode=0o755)
        config = place / "etc" / "agent.toml"
        assert pa.main(["init", "-c", str(config), "--account", account.pw_name, "--user", "ann",
                        "--state-dir", str(place / "state"), "--token-file", str(place / "ann.token")]) == 0
        assert config.stat().st_uid == account.pw_uid and (place / "state").stat().st_uid == account.pw_uid
        capsys.readouterr()
        code, err = admin(capsys, "user", "add", "ben", "-c", str(config), "--token-file", str(place / "ben.token"))
        assert code == 0, err
        assert "ben" in pa.AgentConfig.load(config).users and config.stat().st_uid == account.pw_uid
        mirror = place / "state" / "users" / "ben" / "mirror"
        assert mirror.stat().st_uid == account.pw_uid
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_an_ordinary_account_refuses_a_token_name_another_account_holds_before_any_change(tmp_path):
    """Run as the box account (not root), a token file name in a shared sticky folder that
    another account made first cannot be replaced (the sticky bit): refused before the config
    changes, not after it (a user whose token nobody had)."""
    from test_box_walls import ACCOUNT, account_or_skip, readable_copy
    account_or_skip()
    place = Path(tempfile.mkdtemp(prefix="pw-sticky-", dir="/srv" if os.access("/srv", os.W_OK) else None))
    try:
        os.chmod(place, 0o755)
        code = readable_copy(place / "code")
        box = place / "box"
        box.mkdir()
        shared = place / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        (shared / "ben.token").write_text("root's\n")  # made first by another account (root here)
        os.chmod(shared / "ben.token", 0o644)
        as_account = ["setpriv", f"--reuid={ACCOUNT}", f"--regid={ACCOUNT}", "--init-groups",
                      "/usr/bin/python3", str(code / "patchwire_agent.py")]
        env = {"HOME": str(box), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        assert pa.main(["init", "-c", str(box / "agent.toml"), "--user", "ann", "--state-dir", str(box / "state"),
                        "--token-file", str(box / "ann.token")]) == 0
        subprocess.run(["chown", "-R", f"{ACCOUNT}:", str(box)], check=True)  # the box account's box
        before = (box / "agent.toml").read_bytes()
        add = subprocess.run(as_account + ["user", "add", "ben", "-c", str(box / "agent.toml"), "--token-file",
                                           str(shared / "ben.token")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert add.returncode == 2 and "is another account's file: nothing was changed" in add.stderr, add.stderr
        assert (box / "agent.toml").read_bytes() == before and (shared / "ben.token").read_text() == "root's\n"
        assert [p.name for p in shared.iterdir()] == ["ben.token"]
    finally:
        shutil.rmtree(place, ignore_errors=True)
