"""What a newcomer meets first: SSH destinations with ports, hints that match the failure,
token trouble named precisely, not-found that is not a refusal, readable listings.

Real parts: a real sshd on a loopback port (tests/sshd.py), the real agent, the laptop CLI as a
process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import patchwire
from conftest import Laptop, make_repo, script, write_config
from sshd import free_port, running_sshd

PORTLESS_CONFIG = """\
Host {address}
    User {user}
    IdentityFile {identity}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
"""


@pytest.mark.parametrize("value, dest, port", [
    ("box", "box", None),
    ("me@box", "me@box", None),
    ("me@box:2222", "me@box", 2222),
    ("ssh://me@box:2222", "me@box", 2222),
    ("ssh://me@box/", "me@box", None),
    ("me@[fd7a:115c:a1e0::1]:2200", "me@[fd7a:115c:a1e0::1]", 2200),
    ("me@box.tail1234.ts.net", "me@box.tail1234.ts.net", None),
])
def test_ssh_destinations_with_and_without_a_port(tmp_path, value, dest, port):
    assert patchwire.parse_ssh_destination(value, tmp_path / "cfg") == (dest, port)


@pytest.mark.parametrize("value", ["box:/srv/mirror", "me@box:0", "me@box:65536", "me@box:22x", "a b",
                                   "me@@box", "ssh://me@box:22/path"])
def test_bad_ssh_destinations_are_refused_with_the_forms_that_work(tmp_path, value):
    with pytest.raises(patchwire.PatchwireError) as e:
        patchwire.parse_ssh_destination(value, tmp_path / "cfg")
    assert "is not an SSH destination" in e.value.message
    assert "USER@HOST:PORT" in e.value.hint and "~/.ssh/config" in e.value.hint


def portless_laptop(tmp_path: Path, agent, server, ssh: str) -> Laptop:
    """A project whose ssh destination carries the port: the ssh_config knows the host but no Port."""
    config = tmp_path / "ssh_config_no_port"
    config.write_text(PORTLESS_CONFIG.format(address=server.address, user=server.user,
                                             identity=server.client_key, known_hosts=server.known_hosts))
    config.chmod(0o600)
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# port\n", "src/a.txt": b"a\n"}))
    lap.init(agent, "--ssh", ssh)
    text = (lap.root / ".patchwire.toml").read_text()
    write_config(lap.root, text + f'\n[sync]\nssh_options = ["-F", "{config}"]\n')
    return lap


@pytest.mark.slow
@pytest.mark.parametrize("form", ["{user}@{address}:{port}", "ssh://{user}@{address}:{port}"])
def test_sync_and_doctor_work_with_the_port_in_the_destination(tmp_path, agent, form):
    with running_sshd(tmp_path / "sshd") as server:
        ssh = form.format(user=server.user, address=server.address, port=server.port)
        lap = portless_laptop(tmp_path, agent, server, ssh)
        synced = lap.run("sync")
        assert synced.returncode == 0, synced.err
        mirror = agent.state_dir / "users" / "alice" / "mirror" / "laptop"
        assert (mirror / "src" / "a.txt").read_bytes() == b"a\n"
        doctor = lap.run("doctor", "--json", check=0)
        checks = {c["name"]: c for c in json.loads(doctor.out)["checks"]}
        assert checks["ssh"]["ok"], checks["ssh"]
        assert f"-p {server.port}" in checks["ssh"]["detail"]



def test_a_refused_port_is_named_as_such_not_as_a_missing_key(tmp_path, agent):
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# x\n"}))
    port = free_port()
    lap.init(agent, "--ssh", f"me@127.0.0.1:{port}")
    result = lap.run("sync")
    assert result.returncode == 3, result.err
    assert f"nothing accepts SSH connections at 127.0.0.1 port {port}" in result.err
    assert "ssh-copy-id" not in result.err and "Traceback" not in result.err
    doctor = lap.run("doctor", "--json", check=1)
    ssh = {c["name"]: c for c in json.loads(doctor.out)["checks"]}["ssh"]
    assert not ssh["ok"] and f"127.0.0.1 port {port}" in ssh["fix"] and "ssh-copy-id" not in ssh["fix"]


# ------------------------------------------------------------------ the token, named precisely


def test_a_wrong_token_in_the_environment_is_blamed_on_the_environment(laptop, agent):
    result = laptop.run("jobs", env={"PATCHWIRE_TOKEN": "pw_not-a-real-token"})
    assert result.returncode == 3, result.err
    assert "PATCHWIRE_TOKEN" in result.err and "unset PATCHWIRE_TOKEN to use token_file" in result.err
    assert "token file" not in result.err.replace("the token from PATCHWIRE_TOKEN", "")
    assert "pw_not-a-real-token" not in result.out + result.err  # never print a token


def test_a_wrong_token_file_is_named(laptop, agent, tmp_path):
    wrong = tmp_path / "wrong.token"
    wrong.write_text("pw_wrong\n")
    wrong.chmod(0o600)
    text = (laptop.root / ".patchwire.toml").read_text().replace(str(agent.token_file()), str(wrong))
    write_config(laptop.root, text)
    result = laptop.run("jobs")
    assert result.returncode == 3 and f"the token file {wrong}" in result.err, result.err
    assert "pw_wrong" not in result.err


def test_an_empty_token_file_says_where_the_token_comes_from(laptop, agent):
    agent.token_file().write_text("\n")
    result = laptop.run("jobs")
    assert result.returncode == 2, result.err
    assert f"the token file {agent.token_file()} is empty" in result.err
    assert "patchwire-agent init` or `user add`" in result.err and "install -m 600" in result.err


def test_a_missing_token_file_hint_says_how_to_make_it(tmp_path, agent):
    lap = Laptop(make_repo(tmp_path / "fresh", {"a.txt": b"a\n"}))
    missing = tmp_path / "no such folder" / "token"
    result = lap.run("init", "--agent", agent.url, "--token-file", str(missing))
    assert result.returncode == 2
    assert f"the token file {missing} does not exist" in result.err
    assert "mkdir -p '%s'" % missing.parent in result.err and "install -m 600 /dev/null" in result.err


def test_every_command_warns_about_a_token_file_others_can_read(laptop, agent):
    token = agent.token_file()
    token.chmod(0o644)
    result = laptop.run("jobs", check=0)
    assert f"warning: the token file {token} is readable by other users" in result.err
    assert f"chmod 600 {token}" in result.err
    token.chmod(0o600)
    assert "warning" not in laptop.run("jobs", check=0).err


# ------------------------------------------------------------------ not found, and not an agent


def test_an_unknown_job_is_not_found_not_refused(laptop, agent):
    result = laptop.run("show", "abcd")
    assert result.returncode == 1, result.err
    assert "no job 'abcd'" in result.err and "patchwire jobs" in result.err
    assert "refused" not in result.err
    as_json = laptop.run("show", "abcd", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.out)["exit_status"] == 1


def test_a_url_that_is_not_an_agent_is_called_so(laptop, agent):
    import http.server
    import threading

    class NotAnAgent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>nothing here</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAnAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d" % server.server_address[1]
        text = (laptop.root / ".patchwire.toml").read_text().replace(agent.url, url)
        write_config(laptop.root, text)
        result = laptop.run("jobs")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 3, result.err
    assert f"{url} answered HTTP 404" in result.err and "not as a patchwire-agent would" in result.err
    assert "`patchwire-agent serve` prints" in result.err


# ------------------------------------------------------------------ listings a person reads


def test_jobs_has_a_header_and_shows_age_as_ago_and_show_prints_no_python(laptop, agent):
    laptop.ask(script({"write": "new.txt", "text": "hi\n"}), "--no-apply", check=0)
    jobs = laptop.run("jobs", check=0).out.splitlines()
    assert jobs[0].split() == ["JOB", "STATUS", "ASKED", "PROJECT", "CHANGE", "PROMPT"]
    assert " ago " in jobs[1] and "done" in jobs[1]
    shown = laptop.run("show", jobs[1].split()[0], check=0).out
    for python_only in ("True", "False", "None", "{'", "['"):
        assert python_only not in shown, shown
    assert "is_error: no" in shown


def test_exit_codes_are_written_once_and_every_listing_agrees(laptop):
    help_text = " ".join(laptop.run("--help", check=0).out.split())
    docstring = " ".join(patchwire.__doc__.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for status in patchwire.ExitStatus:
        assert f"{int(status)} {status.meaning}" in help_text
        assert f"{int(status)} {status.meaning}" in docstring
        assert f"`{int(status)}` {status.meaning}" in readme
