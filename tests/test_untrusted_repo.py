"""An untrusted repository against the laptop: a `.patchwire.toml` it ships is not used until
the user trusts it (its agent, token file, ssh options and rsync would send the token and the
project where it says and run its programs), and what else a repository's content can do to
a sync, an ask and an apply. Real git, the real CLI, a real agent on 127.0.0.1:0 and a real
listener standing in for the repository's own server."""
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import patchwire
from conftest import Laptop, git, make_repo, script


class Listener:
    """An HTTP server on loopback that writes down every request's path and Authorization."""

    def __init__(self):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    one = Listener()
    yield one
    one.close()


def cloned(tmp_path: Path, config: str, extra=None) -> Path:
    """A repository that ships `config` as its .patchwire.toml, cloned as a user would."""
    origin = make_repo(tmp_path / "origin", {"README.md": b"# hi\n", ".patchwire.toml": config.encode(),
                                             **(extra or {})})
    subprocess.run(["git", "clone", "-q", str(origin), str(tmp_path / "clone")], check=True)
    return tmp_path / "clone"


def test_a_shipped_config_is_refused_before_anything_is_sent_or_run(tmp_path, listener):
    token = Path(os.environ["HOME"]) / ".config/patchwire/token"
    token.parent.mkdir(parents=True)
    token.write_text("pw_users_own_token\n")
    token.chmod(0o600)
    ran = tmp_path / "ran"
    tools = {"tools/rsync": f"#!/bin/sh\necho ran >> {ran}\n".encode()}
    root = cloned(tmp_path, f'agent = "{listener.url}"\ntoken_file = "~/.config/patchwire/token"\n'
                            '[sync]\nrsync = "./tools/rsync"\nallow = ["*"]\n', tools)
    (root / "tools/rsync").chmod(0o755)
    lap = Laptop(root)
    for command in (["doctor"], ["sync"], ["sync", "--dry-run"], ["ask", "hi", "--yes"], ["jobs"], ["usage"]):
        result = lap.run(*command)
        assert result.returncode == 2, (command, result.err)
        assert f"{root / '.patchwire.toml'} is not trusted here" in result.err, result.err
        assert "run `patchwire trust` in" in result.err and "Traceback" not in result.err
    assert listener.seen == [] and not ran.exists()
    # trusting shows what it trusts, then the settings are used as written
    trusted = lap.run("trust", check=0)
    assert f"agent = \"{listener.url}\"" in trusted.out and 'sync.rsync = "./tools/rsync"' in trusted.out
    assert 'sync.allow = ["*"]' in trusted.out
    lap.run("doctor")
    assert ran.exists() and listener.seen  # the user's own choice now


def test_init_trusts_what_it_writes_and_a_changed_destination_needs_trust_again(laptop, listener):
    laptop.run("sync", check=0)  # written by init: trusted
    config = laptop.root / ".patchwire.toml"
    text = config.read_text()
    # settings that only narrow what is sent, or the box's own steps, need no new trust
    config.write_text(text + '\n[sync]\ndeny = ["*.sqlite"]\nexclude = ["big/"]\n[notify]\ndesktop = false\n')
    laptop.run("sync", check=0)
    # where the token goes does
    agent_url = text.split('agent = "')[1].split('"')[0]
    config.write_text(config.read_text().replace(agent_url, listener.url))
    refused = laptop.run("jobs")
    assert refused.returncode == 2 and "is not trusted here" in refused.err
    assert listener.seen == []
    # and so does what lets files through, or which program runs
    config.write_text(config.read_text().replace(listener.url, agent_url))
    laptop.run("sync", check=0)  # back as trusted: trusted again
    for line in ('allow = ["*.pem"]', 'rsync = "/tmp/x"', 'ssh_options = ["-oProxyCommand=sh"]', "max_file_mb = 9000",
                 "submodules = true"):
        config.write_text(text + f"\n[sync]\n{line}\n")
        assert laptop.run("sync").returncode == 2, line
    # a trust record that is not JSON trusts nothing, and trusting again mends it
    config.write_text(text)
    (patchwire.state_dir() / "trusted.json").write_text("{not json")
    assert laptop.run("sync").returncode == 2
    laptop.run("trust", check=0)
    laptop.run("sync", check=0)


def test_a_config_in_a_subfolder_is_not_trusted_for_its_parents_sake(laptop):
    sub = laptop.root / "pkg"
    sub.mkdir()
    (sub / ".patchwire.toml").write_text((laptop.root / ".patchwire.toml").read_text())
    refused = Laptop(sub).run("sync")
    assert refused.returncode == 2 and f"{sub / '.patchwire.toml'} is not trusted here" in refused.err


def test_an_ssh_destination_that_is_an_option_is_refused(tmp_path):
    root = cloned(tmp_path, 'agent = "http://127.0.0.1:9"\nssh = "-oProxyCommand=sh"\n')
    result = Laptop(root).run("trust")
    assert result.returncode != 0 and "is not an SSH destination" in result.err and "Traceback" not in result.err


def test_a_repositorys_diff_attributes_do_not_turn_an_edit_into_a_refused_binary_patch(tmp_path, agent):
    # `package-lock.json -diff` is common; `binary` says the same; a textconv driver would show
    # what a program makes of the file instead of its bytes
    root = make_repo(tmp_path / "proj", {"README.md": b"hi\n", "package-lock.json": b'{\n  "a": 1\n}\n',
                                         "notes.txt": b"one\n", "data.csv": b"x\n",
                                         ".gitattributes": b"package-lock.json -diff\nnotes.txt binary\n"
                                                           b"*.csv diff=tool\n"})
    lap = Laptop(root)
    lap.init(agent)
    lap.ask(script({"write": "package-lock.json", "text": '{\n  "a": 2\n}\n'}, {"write": "notes.txt", "text": "two\n"},
                   {"write": "data.csv", "text": "y\n"}), "--yes", check=0)
    patch = lap.run("diff", lap.last_job(), check=0).out
    assert "GIT binary patch" not in patch and '-  "a": 1\n+  "a": 2\n' in patch and "-one\n+two\n" in patch
    assert (root / "package-lock.json").read_bytes() == b'{\n  "a": 2\n}\n'
    assert (root / "notes.txt").read_bytes() == b"two\n" and (root / "data.csv").read_bytes() == b"y\n"


def test_a_repositorys_own_fsmonitor_never_runs_from_a_sync(tmp_path, agent):
    ran = tmp_path / "fsmonitor.ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$(pwd)\" >> {ran}\nexit 1\n")
    hook.chmod(0o755)
    # a project whose .git came in an archive, with a vendored repository unpacked inside it
    root = make_repo(tmp_path / "unpacked", {"README.md": b"hi\n"})
    lib = make_repo(root / "vendor/lib", {"lib.c": b"int x;\n"})
    for repo in (root, lib):
        git(repo, "config", "core.fsmonitor", str(hook))
        git(repo, "config", "core.hooksPath", str(tmp_path / "hooks"))
    lap = Laptop(root)
    lap.init(agent)
    config = root / ".patchwire.toml"
    config.write_text(config.read_text() + "\n[sync]\nsubmodules = true\n")
    lap.run("trust", check=0)
    lap.run("sync", "--dry-run", check=0)
    lap.run("sync", check=0)
    (root / "README.md").write_text("changed\n")
    lap.ask(script({"write": "vendor/lib/lib.c", "text": "int y;\n"}), "--yes", check=0)
    assert (lib / "lib.c").read_text() == "int y;\n"
    assert not ran.exists(), ran.read_text()


def clone_of(tmp_path: Path, make) -> Path:
    """A repository made by `make(folder)` (shell-made: odd names, deep paths), then cloned."""
    src = tmp_path / "origin"
    src.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=src, check=True)
    make(src)
    subprocess.run("git add -A && git -c user.name=a -c user.email=a@a commit -qm odd", shell=True, cwd=src, check=True)
    subprocess.run(["git", "clone", "-q", str(src), str(tmp_path / "clone")], check=True)
    return tmp_path / "clone"


def test_a_file_1200_folders_deep_syncs_and_asks(tmp_path, agent):
    deep = "a/" * 1200
    patchwire.raise_open_files_limit()  # this test's own `git add` of 1,200 levels (an ordinary account: 1024)

    def make(src: Path) -> None:
        subprocess.run(f"mkdir -p {deep} && echo x > {deep}f.txt && echo hi > README.md", shell=True, cwd=src, check=True)
    root = clone_of(tmp_path, make)
    try:
        asked_deep(root, agent, deep)
    finally:  # shutil.rmtree (pytest's clean-up) recurses once per folder: rm does not
        subprocess.run(["rm", "-rf", str(tmp_path / "origin/a"), str(root / "a")], check=True)


def test_a_deep_tree_under_a_low_open_files_limit_is_listed_whole(tmp_path, agent):
    """git holds a descriptor per folder level it walks: under a soft limit of 200 (an ordinary
    account's is 1024, macOS's 256) a file 300 folders deep was left out of the listing with
    only a warning, and not sent. The CLI raises its soft limit to the hard one."""
    deep = "d/" * 300
    root = clone_of(tmp_path, lambda src: (src / "README.md").write_text("hi\n"))
    lap = Laptop(root)
    lap.init(agent)
    # not committed: git's listing of untracked files walks it, a descriptor per level
    subprocess.run(f"mkdir -p {deep} && echo x > {deep}f.txt", shell=True, cwd=root, check=True)
    try:
        low = subprocess.run(["bash", "-c", 'ulimit -Sn 200 && exec "$@"', "low", *lap.program, "sync", "--dry-run",
                              "--list", "--json"], cwd=root, env=lap.env, capture_output=True, text=True, timeout=120)
        assert low.returncode == 0, low.stderr[-2000:]
        assert deep + "f.txt" in json.loads(low.stdout)["files"], low.stdout[-500:]
        # a hard limit as low: the sync stops and says why, instead of leaving the file out
        hard = subprocess.run(["bash", "-c", 'ulimit -n 200 && exec "$@"', "low", *lap.program, "sync"],
                              cwd=root, env=lap.env, capture_output=True, text=True, timeout=120)
        assert hard.returncode != 0 and "git ran out of open files listing" in hard.stderr, hard.stderr[-2000:]
        assert "Traceback" not in hard.stderr
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "origin/d"), str(root / "d")], check=True)


def asked_deep(root: Path, agent, deep: str) -> None:
    lap = Laptop(root)
    lap.init(agent)
    dry = lap.run("sync", "--dry-run", "--json")
    assert dry.returncode == 0 and "Traceback" not in dry.err, dry.err[-2000:]
    held = json.loads(dry.out)["held_back"]
    assert held == {deep + "f.txt": patchwire.TOO_DEEP}
    lap.ask(script({"write": "README.md", "text": "deep\n"}), "--yes", check=0)
    assert (root / "README.md").read_text() == "deep\n"
    # patterns match folder by folder, however deep: a denied folder deep down holds its file back
    matcher = patchwire.PathMatcher(["secrets/"])
    assert matcher.match(deep + "secrets/x.txt") == "secrets/" and matcher.match(deep + "f.txt") is None


def test_a_name_that_is_not_utf8_is_held_back_with_a_reason_and_the_ask_works(tmp_path, agent):
    def make(src: Path) -> None:
        for name in (b"bad\xff\xfe.txt", b"caf\xc3\xa9.txt", b"ok.txt"):
            (src / os.fsdecode(name)).write_bytes(b"x\n")
    root = clone_of(tmp_path, make)
    lap = Laptop(root)
    lap.init(agent)
    dry = lap.run("sync", "--dry-run", "--json", check=0)
    held = json.loads(dry.out)["held_back"]
    assert [why for path, why in held.items() if path.startswith("bad")] == [patchwire.NOT_UTF8], held
    lap.ask(script({"write": "ok.txt", "text": "y\n"}), "--yes", check=0)
    assert (root / "ok.txt").read_text() == "y\n"
    mirror = agent.state_dir / "users/alice/mirror/clone"
    assert sorted(os.listdir(os.fsencode(mirror))) == [b"caf\xc3\xa9.txt", b"ok.txt"]


def test_a_big_file_in_the_way_of_a_new_file_is_refused_unread(tmp_path, agent):
    # the user's own data file, over max_file_mb so the box never had it; an AI steered by the
    # repository makes a new file there
    root = make_repo(tmp_path / "proj", {"README.md": b"hi\n"})
    lap = Laptop(root)
    lap.init(agent)
    (root / "data").mkdir()
    with open(root / "data/cache.bin", "wb") as f:
        f.truncate(patchwire.IN_THE_WAY_MAX_BYTES + 1)  # sparse: no disk used
    lap.ask(script({"write": "data/cache.bin", "text": "tiny\n"}), "--no-apply", check=0)
    for extra in ([], ["--overwrite-untracked"]):
        refused = lap.run("apply", lap.last_job(), "--yes", *extra)
        assert refused.returncode == int(patchwire.ExitStatus.PATCH), refused.err
        assert "data/cache.bin is here (64.0 MB), where the patch puts a new file or a rename: too big" in refused.err
        assert "Traceback" not in refused.err
        assert (root / "data/cache.bin").stat().st_size == patchwire.IN_THE_WAY_MAX_BYTES + 1


def test_a_config_that_is_a_symlink_is_refused_and_init_replaces_the_link_not_its_target(tmp_path, agent):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    root = make_repo(tmp_path / "proj", {"README.md": b"hi\n"})
    (root / ".patchwire.toml").symlink_to(victim)
    refused = Laptop(root).run("sync")
    assert refused.returncode == 2 and ".patchwire.toml is a symlink" in refused.err and "Traceback" not in refused.err
    lap = Laptop(root)
    lap.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file()), check=0)
    assert victim.read_text() == "the user's own file\n"
    assert not (root / ".patchwire.toml").is_symlink() and "agent = " in (root / ".patchwire.toml").read_text()
    lap.run("sync", check=0)


def test_the_project_name_is_part_of_what_is_trusted(laptop):
    config = laptop.root / ".patchwire.toml"
    config.write_text(config.read_text().replace('project = "laptop"', 'project = "someone-else"'))
    assert laptop.run("sync").returncode == 2


def test_an_ssh_destination_that_is_an_option_is_refused_in_any_spelling(tmp_path):
    for value in ("-oProxyCommand=sh", "ssh://-oProxyCommand=sh", " -F/tmp/x"):
        with pytest.raises(patchwire.PatchwireError, match="is not an SSH destination"):
            patchwire.parse_ssh_destination(value, tmp_path / ".patchwire.toml")


def test_trust_show_trusts_nothing_and_a_hash_binds_trust_to_what_was_shown(tmp_path, listener):
    """`trust --show` (an editor's first step) records nothing; `trust --sha256 H` trusts only
    the settings that hash was shown for: a file changed in between is refused, still untrusted."""
    root = cloned(tmp_path, f'agent = "{listener.url}"\ntoken_file = "~/t"\n')
    lap = Laptop(root)
    shown = json.loads(lap.run("trust", "--show", "--json", check=0).out)
    assert shown["trusted"] is False and shown["settings"]["agent"] == listener.url
    assert lap.run("doctor").returncode == 2  # still refused
    (root / ".patchwire.toml").write_text('agent = "http://127.0.0.1:9"\ntoken_file = "~/t"\n')
    stale = lap.run("trust", "--sha256", shown["sha256"], "--json")
    assert stale.returncode == 2 and json.loads(stale.out)["details"]["code"] == "changed"
    assert "changed since they were shown: nothing was trusted" in stale.err
    assert json.loads(lap.run("trust", "--show", "--json", check=0).out)["trusted"] is False
    assert lap.run("trust", "--sha256", "", "--json").returncode == 2  # an empty hash is no hash
    again = json.loads(lap.run("trust", "--show", "--json", check=0).out)
    assert json.loads(lap.run("trust", "--sha256", again["sha256"], "--json", check=0).out)["trusted"] is True
    assert "is not trusted here" not in lap.run("doctor").err
    assert listener.seen == []  # the agent trusted is the one of port 9, not the listener
