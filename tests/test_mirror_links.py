"""Nothing in a user's area on the box is ever followed: a user whose SSH key can rsync a
symlink into their own mirror folder (`webapp -> ../../bob/mirror/web`) gains no way to read,
hash, prune or delete another user's files through it, with or without rrsync's `-munge`.

The agent is the real process; the "attacker" puts the link where their rsync would, and the
ask is real HTTP. The rrsync test runs a real sshd with the key line `user key` prints.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import patchwire
import patchwire_agent as pa
from conftest import Laptop, ask_body, git, make_repo, script
from test_team import add_key_user, synced_laptop

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
SECRET = b"bob's secret: hunter2\n"


def bobs_project(agent) -> Path:
    """bob's mirror of project `web`, holding a secret."""
    assert agent.json("GET", "/v1/me?project=web", token=agent.tokens["bob"])[0] == 200
    web = agent.state_dir / "users/bob/mirror/web"
    (web / "secret.txt").write_bytes(SECRET)
    (web / "keep").mkdir()
    (web / "keep/more.txt").write_bytes(b"more of bob's\n")
    return web


def alice_synced(agent, tmp_path: Path) -> Laptop:
    """alice's project `laptop`, asked once (so the box holds her last snapshot)."""
    lap = synced_laptop(tmp_path, agent, "alice")
    lap.ask(script({"say": "first"}), "--yes", check=0)
    return lap


def replace_with_link(mirror: Path, target: str) -> None:
    """What alice's rsync could do to the top of her own mirror folder."""
    subprocess.run(["rm", "-rf", str(mirror)], check=True)
    os.symlink(target, mirror)


def last_tree(lap: Laptop, name: str = "laptop") -> str:
    """The tree of the laptop's last sync: the `base` of its next ask of changes."""
    project = patchwire.Project(lap.root, name)
    return json.loads(project.state_file("last_sync.json").read_text())["tree"]


def blob_in_store(agent, user: str, project: str, data: bytes) -> bool:
    blob = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                          check=True).stdout.decode().strip()
    store = agent.state_dir / "users" / user / "projects" / project / "git"
    return subprocess.run(["git", "--git-dir", str(store), "cat-file", "-e", blob]).returncode == 0


def test_a_project_folder_that_is_a_link_is_refused_and_never_followed(make_agent, tmp_path):
    agent = make_agent(users=("alice", "bob"))
    web = bobs_project(agent)
    lap = alice_synced(agent, tmp_path)
    mine = agent.state_dir / "users/alice/mirror/laptop"
    tree = last_tree(lap)
    changes = {"project": "laptop", "prompt": "x", "tree": tree, "base": tree, "changed": [], "deleted": []}
    attacks = [
        {**changes, "changed": ["secret.txt"]},  # hash bob's file into alice's store
        {**changes, "deleted": ["secret.txt", "keep/more.txt"]},  # delete through the link
        {"project": "laptop", "prompt": "x", "tree": EMPTY_TREE, "files": []},  # prune bob's folder
    ]
    for body in attacks:
        replace_with_link(mine, "../../bob/mirror/web")
        status, answer = agent.json("POST", "/v1/ask", body)
        assert status == 409, answer
        assert answer["code"] == patchwire.CODE_TREE_MISMATCH
        assert "users/alice/mirror/laptop is a symlink" in answer["error"], answer
        assert "never follows" in answer["error"]
        # the link went, a real (empty) folder took its place: a full sync fills it again
        assert mine.is_dir() and not mine.is_symlink() and os.listdir(mine) == []
        assert (web / "secret.txt").read_bytes() == SECRET
        assert (web / "keep/more.txt").read_bytes() == b"more of bob's\n"
    assert not blob_in_store(agent, "alice", "laptop", SECRET)
    # the laptop's own fallback (a full checksummed sync) puts alice back to work
    out = lap.ask(script({"write": "after.txt", "text": "ok\n"}), "--yes", check=0)
    assert (lap.root / "after.txt").read_bytes() == b"ok\n", out.err
    assert (mine / "README.md").read_bytes() == b"# alice\n"


def test_a_link_as_the_users_mirror_root_is_refused(make_agent, tmp_path):
    """Not reachable through rrsync (its root is that folder), but the agent does not rely on
    it: any link on the way from the state folder down is refused."""
    agent = make_agent(users=("alice", "bob"))
    web = bobs_project(agent)
    lap = alice_synced(agent, tmp_path)
    mirror_root = agent.state_dir / "users/alice/mirror"
    subprocess.run(["rm", "-rf", str(mirror_root)], check=True)
    os.symlink("../bob/mirror", mirror_root)
    (web.parent / "laptop").mkdir()
    (web.parent / "laptop/README.md").write_bytes(SECRET)
    tree = last_tree(lap)
    status, answer = agent.json("POST", "/v1/ask", {"project": "laptop", "prompt": "x", "tree": tree,
                                                    "base": tree, "changed": ["README.md"], "deleted": []})
    assert status == 409 and "users/alice/mirror is a symlink" in answer["error"], answer
    assert not blob_in_store(agent, "alice", "laptop", SECRET)
    assert (web.parent / "laptop/README.md").read_bytes() == SECRET


def test_symlinks_inside_a_project_still_sync_exactly(make_agent, tmp_path):
    """A link the project tracks reaches the snapshot byte for byte, also when the mirror holds
    it munged (rrsync -munge stores `/rsyncd-munged/` + target): the agent reads the link
    itself, without ever resolving it, in both forms of an ask."""
    agent = make_agent()
    root = make_repo(tmp_path / "laptop", {"README.md": b"# x\n", "docs/guide.md": b"guide\n"})
    links = {"docs/readme-link": "../README.md", "abs-link": "/etc/hostname"}
    for name, target in links.items():
        os.symlink(target, root / name)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "links")
    lap = Laptop(root)
    lap.init(agent)
    assert lap.ask(script({"say": "first"}), "--yes", check=0).returncode == 0
    mine = agent.state_dir / "users/alice/mirror/laptop"
    for name, target in links.items():
        (mine / name).unlink()
        os.symlink("/rsyncd-munged/" + target, mine / name)  # as rrsync -munge writes them
    tree = last_tree(lap)
    changes = {"project": "laptop", "prompt": script({"say": "hi"}), "tree": tree, "base": tree,
               "changed": sorted(links), "deleted": []}
    for body in (changes, ask_body(lap, script({"say": "hi"}))):
        status, job = agent.json("POST", "/v1/ask", body)
        assert status == 202, job
        assert agent.wait_job(job["id"])["status"] == "done"
        store = agent.state_dir / "users/alice/projects/laptop/git"
        for name, target in links.items():
            blob = subprocess.run(["git", "--git-dir", str(store), "cat-file", "-p", f"{job['snapshot']}:{name}"],
                                  capture_output=True, check=True).stdout
            assert blob == target.encode()
    assert os.readlink(mine / "abs-link") == "/rsyncd-munged//etc/hostname"  # the mirror is left as is


@pytest.mark.slow
def test_the_rrsync_key_munges_links_and_a_pushed_link_reaches_nothing(make_agent, tmp_path):
    from sshd import running_sshd
    from test_ssh import close_master, write_sync_options
    if not pa.find_rrsync():
        pytest.skip("rrsync is not installed (Debian: apt install rsync)")
    agent = make_agent(users=("alice", "bob"))
    web = bobs_project(agent)
    with running_sshd(tmp_path / "sshd") as server:
        try:
            line, carol_ssh = add_key_user(agent, server, tmp_path, "carol")
            assert " -munge " in line, line
            root = make_repo(tmp_path / "carol" / "app", {"README.md": b"# carol\n"})
            os.symlink("README.md", root / "link")
            git(root, "add", "-A")
            git(root, "commit", "-qm", "a link")
            lap = Laptop(root)
            lap.init(agent, "--ssh", server.alias, user="carol")
            write_sync_options(lap, ssh_options=["-F", str(carol_ssh)])
            out = lap.ask(script({"write": "x.txt", "text": "x\n"}), "--yes", check=0)
            assert out.returncode == 0, out.err
            mine = agent.state_dir / "users/carol/mirror/app"
            assert os.readlink(mine / "link") == "/rsyncd-munged/README.md"  # munged on the box ...
            assert os.readlink(root / "link") == "README.md"  # ... exact in the snapshot and back
            # carol pushes a link over her own project folder, pointing at bob's
            evil = tmp_path / "evil"
            evil.mkdir()
            os.symlink("../../bob/mirror/web", evil / "app")
            pushed = subprocess.run(["rsync", "-a", "--force", "-e", f"ssh -F {carol_ssh}", f"{evil}/",
                                     f"{server.alias}:{mine.parent}/"], capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
            assert pushed.returncode == 0, pushed.stderr
            assert os.readlink(mine) == "/rsyncd-munged/../../bob/mirror/web"
            tree = last_tree(lap, "app")
            status, answer = agent.json("POST", "/v1/ask", {
                "project": "app", "prompt": "x", "tree": tree, "base": tree, "changed": ["secret.txt"],
                "deleted": ["keep/more.txt"]}, token=agent.tokens["carol"])
            assert status == 409 and "is a symlink" in answer["error"], answer
            assert (web / "secret.txt").read_bytes() == SECRET and (web / "keep/more.txt").exists()
            assert not blob_in_store(agent, "carol", "app", SECRET)
        finally:
            close_master(server)

