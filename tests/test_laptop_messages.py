"""The laptop's messages say things as a person reads them (issue 22): a long rate-limit wait in
minutes, a revoked or unknown token sends the user to the box's admin, carriage returns from
ssh or rsync never reach a message as ^M, and a usage table fits 100 columns unless --wide.
A real agent, the real CLI and real child processes."""

from __future__ import annotations

import sys

import pytest
import tomli_w

import patchwire
from conftest import Laptop, drive_pty, make_repo, script

try:
    import tomllib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


def test_a_long_rate_limit_wait_is_said_in_minutes(make_agent, laptop):
    box = make_agent(start=False)
    data = tomllib.loads(box.config.read_text())
    data["policy"] = {"rate_limit": "1/hour"}
    box.config.write_text(tomli_w.dumps(data))
    laptop.init(box.start())
    laptop.ask(script({"say": "one"}), "--no-apply", check=0)
    refused = laptop.ask(script({"say": "two"}), "--no-apply", check=3)
    assert "asked 1 times in the last 60 min" in refused.err, refused.err
    assert "try again in 60 min" in refused.err or "try again in 59 min" in refused.err, refused.err
    assert " s\n" not in refused.err and "3600 s" not in refused.err


def test_an_unknown_or_revoked_token_sends_the_user_to_the_boxs_admin(laptop):
    refused = laptop.run("sync", env={"PATCHWIRE_TOKEN": "pw_revoked_token_0123456789"}, check=3)
    assert "ask the box's admin for a new one" in refused.err, refused.err
    assert "pw_revoked_token_0123456789" not in refused.err + refused.out


def test_carriage_returns_from_a_program_are_folded_out_of_its_error():
    said = "Permission denied (publickey).\r\nrsync: connection unexpectedly closed\r\n 10%\r 100%\r\n"
    with pytest.raises(patchwire.ProcessError) as e:
        patchwire.run([sys.executable, "-c", f"import sys; sys.stderr.write({said!r}); sys.exit(12)"])
    shown = patchwire.sanitize(str(e.value), keep_newlines=True)
    assert "^M" not in shown and "\r" not in shown
    assert "Permission denied (publickey).\n" in shown and "connection unexpectedly closed\n" in shown
    assert shown.endswith("\n 100%") and "10%" not in shown  # the progress line's last redraw


def test_the_usage_table_fits_100_columns_and_wide_shows_every_column(laptop):
    laptop.ask(script({"say": "hi"}), "--no-apply", check=0)
    narrow = laptop.run("usage", check=0)
    assert max(map(len, narrow.out.splitlines())) <= 100, narrow.out
    assert "cache wr" not in narrow.out and "--wide shows them" in narrow.err and "cache wr" in narrow.err
    wide = laptop.run("usage", "--wide", check=0)
    assert "cache wr" in wide.out.splitlines()[1] and "--wide" not in wide.err


def test_a_long_ai_failure_reason_is_cut_between_words(laptop):
    names = " ".join(f"lib/module_{n:03d}.dart" for n in range(60))  # 1,200 characters of names
    failed = laptop.ask(script({"error": f"cannot import {names}"}), "--no-apply", check=4)
    reason = failed.err.split("the AI reported an error: ", 1)[1].splitlines()[0]
    assert reason.endswith(" ...") and len(reason) < 520, reason
    assert reason[:-4].split()[-1] in names.split(), reason  # the last name whole


def test_init_in_the_home_folder_warns_and_on_a_terminal_asks_first(tmp_path, agent):
    home = make_repo(tmp_path / "home", {"notes.txt": b"n\n"})
    lap = Laptop(home, env={"HOME": str(home)})
    token = agent.token_file()
    out = drive_pty(lap, ["init"], [agent.url, str(token), "none", "", "n"], prompts=(b"]:", b"[y/N]"))
    assert f"warning: {home} is your home folder: as a project, every file under it" in out
    assert "Make all of your home folder one project? [y/N]" in out and "nothing written; cd into" in out
    assert not (home / ".patchwire.toml").exists()
    flags = lap.run("init", "--agent", agent.url, "--token-file", str(token), check=0)  # said, then written
    assert f"warning: {home} is your home folder" in flags.err and (home / ".patchwire.toml").is_file()


def test_init_with_flags_checks_the_project_against_the_boxs_allowlist(tmp_path, make_agent):
    agent = make_agent(start=False)
    data = tomllib.loads(agent.config.read_text())
    data["policy"] = {"projects": ["web-*"]}
    agent.config.write_text(tomli_w.dumps(data))
    agent.start()
    root = make_repo(tmp_path / "api", {"a.txt": b"a\n"})
    lap = Laptop(root)
    refused = lap.run("init", "--agent", agent.url, "--token-file", str(agent.token_file()))
    assert refused.returncode == 2 and "patchwire: the box does not take project api: " in refused.err
    assert '[policy] projects = ["web-*"]' in refused.err and "pick a name it allows with --project NAME" in refused.err
    assert not (root / ".patchwire.toml").exists()
    lap.run("init", "--agent", agent.url, "--token-file", str(agent.token_file()), "--project", "web-api", check=0)
    down = Laptop(make_repo(tmp_path / "other", {"a.txt": b"a\n"}))  # an agent not running yet: said, written
    later = down.run("init", "--agent", "http://127.0.0.1:9", "--token-file", str(agent.token_file()), check=0)
    assert "note: could not check project other with the agent: " in later.err
