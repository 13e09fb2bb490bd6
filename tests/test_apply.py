"""Applying on the laptop: a tree that moved on (3-way), conflicts, undo, choosing files and
hunks (through a real pseudo-terminal), the apply log, and folders that are not git repos."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import conftest
from conftest import Laptop, make_repo, script, snapshot_tree, tree_digest
from test_box_walls import account_or_skip, hand_to_account, readable_copy

LONG = b"".join(b"line %d\n" % i for i in range(1, 41))


@pytest.fixture
def long_laptop(tmp_path, agent):
    root = make_repo(tmp_path / "laptop", {"long.txt": LONG, "other.txt": b"other\n",
                                           "docs/a.md": b"a\n", "docs/b.md": b"b\n"})
    lap = Laptop(root)
    lap.init(agent)
    return lap


def edited(replacements: dict) -> bytes:
    lines = LONG.decode().splitlines(keepends=True)
    for n, text in replacements.items():
        lines[n - 1] = text
    return "".join(lines).encode()


def ai_job(lap: Laptop, *steps) -> str:
    lap.ask(script(*steps), "--no-apply", check=0)
    return lap.last_job()


def test_far_local_edit_applies_plainly(long_laptop):
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({5: "line 5 by the AI\n"}).decode()})
    (long_laptop.root / "long.txt").write_bytes(edited({35: "line 35 by me\n"}))
    result = long_laptop.run("apply", job, "--yes", check=0)
    assert "3-way" not in result.err
    assert (long_laptop.root / "long.txt").read_bytes() == edited({5: "line 5 by the AI\n", 35: "line 35 by me\n"})


def test_non_overlapping_local_edit_merges(long_laptop):
    # line 7 is inside the AI hunk's context, so plain `git apply` refuses: a 3-way merge is needed
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({5: "line 5 by the AI\n"}).decode()})
    (long_laptop.root / "long.txt").write_bytes(edited({7: "line 7 by me\n"}))
    result = long_laptop.run("apply", job, "--yes", check=0)
    assert "3-way merged with your changes" in result.err
    assert (long_laptop.root / "long.txt").read_bytes() == edited({5: "line 5 by the AI\n", 7: "line 7 by me\n"})
    # the user's index and HEAD were not touched
    assert subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=long_laptop.root).returncode == 0


def test_overlapping_edit_declined_leaves_everything_byte_identical(long_laptop):
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({5: "AI five\n"}).decode()},
                 {"write": "other.txt", "text": "other, by the AI\n"})
    (long_laptop.root / "long.txt").write_bytes(edited({5: "my five\n"}))
    before = tree_digest(long_laptop.root)
    result = long_laptop.run("apply", job, "--yes", input=b"\n")
    assert result.returncode == 5
    assert "long.txt" in result.err and "<<<<<<< long.txt (yours)" in result.err
    assert "-my five" not in result.err and "my five" in result.err and "AI five" in result.err
    assert tree_digest(long_laptop.root) == before


def test_overlapping_edit_kept_with_markers_then_undo(long_laptop):
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({5: "AI five\n"}).decode()},
                 {"write": "other.txt", "text": "other, by the AI\n"})
    mine = edited({5: "my five\n"})
    (long_laptop.root / "long.txt").write_bytes(mine)
    result = long_laptop.run("apply", job, "--yes", input=b"k\n", check=0)
    assert "conflict markers to resolve in: long.txt" in result.err
    text = (long_laptop.root / "long.txt").read_bytes()
    assert b"<<<<<<< long.txt (yours)\nmy five\n=======\nAI five\n>>>>>>> long.txt (AI)\n" in text
    assert (long_laptop.root / "other.txt").read_bytes() == b"other, by the AI\n"
    long_laptop.run("apply", "--undo", check=0)
    assert (long_laptop.root / "long.txt").read_bytes() == mine
    assert (long_laptop.root / "other.txt").read_bytes() == b"other\n"


def test_undo_restores_exact_bytes_and_refuses_after_later_edits(long_laptop):
    root = long_laptop.root
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("docs/a.md")
    job = ai_job(long_laptop, {"write": "long.txt", "text": "short now\n"}, {"delete": "other.txt"},
                 {"write": "new.bin", "b64": "AAECAw=="}, {"chmod": ["docs/a.md", "755"]},
                 {"write": "run.sh", "text": "#!/bin/sh\necho changed\n"}, {"delete": "link"})
    before = tree_digest(long_laptop.root)
    long_laptop.run("apply", job, "--yes", check=0)
    assert not (long_laptop.root / "other.txt").exists()
    long_laptop.run("apply", "--undo", check=0)
    assert tree_digest(long_laptop.root) == before
    # a second undo has nothing to undo
    assert long_laptop.run("apply", "--undo").returncode == 2
    long_laptop.run("apply", job, "--yes", check=0)
    (long_laptop.root / "long.txt").write_bytes(b"edited after the apply\n")
    refused = long_laptop.run("apply", "--undo")
    assert refused.returncode == 5 and "long.txt" in refused.err
    assert (long_laptop.root / "long.txt").read_bytes() == b"edited after the apply\n"


def test_undo_refuses_after_a_mode_only_change(long_laptop):
    job = ai_job(long_laptop, {"write": "other.txt", "text": "OTHER\n"})
    long_laptop.run("apply", job, "--yes", check=0)
    (long_laptop.root / "other.txt").chmod(0o755)
    refused = long_laptop.run("apply", "--undo")
    assert refused.returncode == 5 and "other.txt" in refused.err
    assert (long_laptop.root / "other.txt").read_bytes() == b"OTHER\n"
    assert (long_laptop.root / "other.txt").stat().st_mode & 0o777 == 0o755


def test_only_and_exclude(long_laptop):
    job = ai_job(long_laptop, {"write": "docs/a.md", "text": "A\n"}, {"write": "docs/b.md", "text": "B\n"},
                 {"write": "other.txt", "text": "OTHER\n"})
    long_laptop.run("apply", job, "--yes", "--only", "docs", "--exclude", "docs/b.md", check=0)
    root = long_laptop.root
    assert (root / "docs/a.md").read_bytes() == b"A\n"
    assert (root / "docs/b.md").read_bytes() == b"b\n" and (root / "other.txt").read_bytes() == b"other\n"
    # what was left out is still in the job
    result = long_laptop.run("apply", job, "--yes", "--only", "*.txt", check=0)
    assert "stays in job" in result.err
    assert (root / "other.txt").read_bytes() == b"OTHER\n"
    log = long_laptop.run("log", check=0).out.splitlines()
    assert len(log) == 2 and f"job {job}" in log[0] and "other.txt" in log[0] and "docs/a.md" in log[1]


def test_interactive_hunks_through_a_pty(long_laptop):
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({3: "AI three\n", 30: "AI thirty\n"}).decode()},
                 {"write": "other.txt", "text": "OTHER\n"})
    out = drive_pty(long_laptop, ["apply", job, "-i"], ["?", "y", "n", "n"])
    assert "y - apply this hunk" in out  # the help line
    assert (long_laptop.root / "long.txt").read_bytes() == edited({3: "AI three\n"})
    assert (long_laptop.root / "other.txt").read_bytes() == b"other\n"


def test_interactive_split_takes_one_part(long_laptop):
    job = ai_job(long_laptop, {"write": "long.txt", "text": edited({10: "AI ten\n", 13: "AI thirteen\n"}).decode()})
    out = drive_pty(long_laptop, ["apply", job, "-i"], ["s", "n", "y"])
    assert "Apply this part (2/2)" in out
    assert (long_laptop.root / "long.txt").read_bytes() == edited({13: "AI thirteen\n"})


def test_ask_offers_hunk_choice_on_a_terminal(long_laptop):
    out = drive_pty(long_laptop, ["ask", script({"write": "other.txt", "text": "OTHER\n"},
                                               {"write": "docs/a.md", "text": "A\n"})], ["i", "y", "n"])
    assert "chooses files and hunks" in out
    assert (long_laptop.root / "docs/a.md").read_bytes() == b"A\n"
    assert (long_laptop.root / "other.txt").read_bytes() == b"other\n"


def drive_pty(lap: Laptop, args, answers) -> str:
    return conftest.drive_pty(lap, args, answers, prompts=(b",?]? ", b"for later"))


def test_not_a_git_repo_applies_plainly_and_says_no_3way(tmp_path, agent):
    root = tmp_path / "plain"
    root.mkdir()
    (root / "notes.txt").write_bytes(b"one\ntwo\n")
    lap = Laptop(root)
    lap.init(agent)
    job = ai_job(lap, {"write": "notes.txt", "text": "one\nTWO\n"})
    ok = lap.run("apply", job, "--yes", check=0)
    assert "3-way merging is not available" in ok.err
    assert (root / "notes.txt").read_bytes() == b"one\nTWO\n"
    job = ai_job(lap, {"write": "notes.txt", "text": "one\nTWO\nthree\n"})
    (root / "notes.txt").write_bytes(b"ONE\nTWO\n")
    refused = lap.run("apply", job, "--yes")
    assert refused.returncode == 5 and "3-way merging is not available outside a git repository" in refused.err
    assert (root / "notes.txt").read_bytes() == b"ONE\nTWO\n"


def test_deleted_on_both_sides_is_no_conflict(long_laptop):
    job = ai_job(long_laptop, {"delete": "other.txt"},
                 {"write": "long.txt", "text": edited({5: "AI five\n"}).decode()})
    (long_laptop.root / "other.txt").unlink()
    result = long_laptop.run("apply", job, "--yes", check=0)
    assert "3-way" in result.err
    assert not (long_laptop.root / "other.txt").exists()
    assert (long_laptop.root / "long.txt").read_bytes() == edited({5: "AI five\n"})


def test_a_write_that_fails_midway_puts_everything_back(long_laptop):
    job = ai_job(long_laptop, {"write": "docs/a.md", "text": "A by the AI\n"},
                 {"write": "other.txt", "text": "OTHER\n"})
    (long_laptop.root / "other.txt").unlink()
    (long_laptop.root / "other.txt").mkdir()  # in the way: the write of other.txt fails
    result = long_laptop.run("apply", job, "--yes", "--keep-conflicts")
    assert result.returncode == 5 and "Traceback" not in result.err, result.err
    assert "were put back, nothing was changed" in result.err
    assert (long_laptop.root / "docs/a.md").read_bytes() == b"a\n"
    assert (long_laptop.root / "other.txt").is_dir()
    assert not list(long_laptop.root.rglob("*.patchwire-tmp"))


def test_a_lone_carriage_return_survives_selective_apply(tmp_path, agent):
    root = make_repo(tmp_path / "laptop", {"cr.txt": b"one\rstill one\ntwo\n", "b.txt": b"b\n"})
    lap = Laptop(root)
    lap.init(agent)
    job = ai_job(lap, {"write": "cr.txt", "b64": "b25lDXN0aWxsIG9uZSwgZWRpdGVkCnR3bwo="},
                 {"write": "b.txt", "text": "B\n"})
    lap.run("apply", job, "--yes", "--only", "cr.txt", check=0)
    assert (root / "cr.txt").read_bytes() == b"one\rstill one, edited\ntwo\n"
    assert (root / "b.txt").read_bytes() == b"b\n"


def test_a_token_file_inside_the_project_never_leaves(tmp_path, agent):
    root = make_repo(tmp_path / "laptop", {"a.txt": b"a\n"})
    (root / ".pwtoken").write_text(agent.token + "\n")
    lap = Laptop(root)
    lap.run("init", "--agent", agent.url, "--token-file", ".pwtoken", check=0)
    dry = lap.run("sync", "--dry-run", check=0)
    assert "held back: .pwtoken (secret deny-list" in dry.out
    listed = lap.run("sync", "--dry-run", "--json", check=0)
    assert ".pwtoken" not in json.loads(listed.out)["files"]
    lap.run("sync", check=0)
    assert not (agent.state_dir / "users/alice/mirror/laptop/.pwtoken").exists()


def test_log_shows_undo_and_what_it_undid(long_laptop):
    first = ai_job(long_laptop, {"write": "docs/a.md", "text": "A\n"})
    long_laptop.run("apply", first, "--yes", check=0)
    second = ai_job(long_laptop, {"write": "other.txt", "text": "OTHER\n"})
    long_laptop.run("apply", second, "--yes", check=0)
    long_laptop.run("apply", "--undo", check=0)
    again = long_laptop.run("apply", "--undo")
    assert again.returncode == 2 and "nothing to undo" in again.err
    log = long_laptop.run("log", check=0).out.splitlines()  # newest first
    assert len(log) == 3, log
    assert f"undo of job {second}: 1 file(s) restored: other.txt" in log[0]
    assert f"job {second}" in log[1] and "(undone)" in log[1]
    assert f"job {first}" in log[2] and "(undone)" not in log[2]
    entries = json.loads(long_laptop.run("log", "--json", check=0).out)["applied"]
    assert [(e["job"], e["how"], e.get("undone", False)) for e in entries] == [
        (second, "undo", False), (second, entries[1]["how"], True), (first, entries[2]["how"], False)]


# ------------------------------------------------------------------ a git apply that fails part way
# git checks every hunk before it writes, but a write can still fail half way through the files
# (a read-only folder, a file where the patch needs a folder): git has rewritten some files by
# then. Root writes into read-only folders, so that case only shows as an ordinary account.

PART_WAY = {
    # who runs the CLI: (the patch's second file, how it is kept from being written, the fix)
    "account": ("locked/b.md", "a read-only folder", "chmod u+w locked"),
    "root": ("new/c.md", "a file named like the folder", "mv new new.mine"),
}


def as_walls_account(lap: Laptop, place: Path) -> Laptop:
    """The same project, its files and state handed to the test account, the CLI run as it."""
    account = account_or_skip()
    code = readable_copy(place / "code")
    hand_to_account(place)
    program = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups",
               "/usr/bin/python3", str(code / "patchwire.py")]
    return Laptop(lap.root, program=program)


def laptop_at(srv_place: Path, agent, files: dict) -> Laptop:
    """A project in `srv_place` (where the test account can reach it), set up for `agent`."""
    root = make_repo(srv_place / "laptop", files)
    token = srv_place / "token"
    shutil.copy(agent.token_file(), token)
    token.chmod(0o600)
    lap = Laptop(root)
    lap.run("init", "--force", "--agent", agent.url, "--token-file", str(token), check=0)
    return lap


@pytest.mark.parametrize("writer", ["git apply", "own"])
@pytest.mark.parametrize("who", sorted(PART_WAY))
def test_git_apply_failing_part_way_puts_every_file_back(srv_place, agent, who, writer):
    """Both writers: `git apply` (a binary section in the patch needs git's own reading) and
    the Applier's own writer of the results shown (every file as synced, text only)."""
    second, _, fix = PART_WAY[who]
    lap = laptop_at(srv_place, agent, {"a.md": b"a\n", "locked/b.md": b"b\n"})
    root = lap.root
    steps = [{"write": "a.md", "text": "A by the AI\n"}, {"write": second, "text": "by the AI\n"}]
    if writer == "git apply":
        steps.append({"write": "z.bin", "b64": base64.b64encode(b"\0binary\xff" * 10).decode()})
    job = ai_job(lap, *steps)
    if who == "root":
        (root / "new").write_bytes(b"mine, where the AI puts a folder\n")
    else:
        lap = as_walls_account(lap, srv_place)
        (root / "locked").chmod(0o555)
    before = snapshot_tree(root)

    failed = lap.run("apply", job, "--yes")
    assert failed.returncode == 5, failed.err
    assert "Traceback" not in failed.err, failed.err
    if writer == "git apply":
        assert f"git apply failed while writing {second}" in failed.err, failed.err
        assert "every file it had written was put back" in failed.err, failed.err
    else:
        assert f"could not write {second} (" in failed.err, failed.err
        assert "the files written so far were put back, nothing was changed" in failed.err, failed.err
    assert f"`{fix}`" in failed.err and f"run `patchwire apply {job}` again" in failed.err, failed.err
    assert snapshot_tree(root) == before  # a.md too, and no temporary file left anywhere

    # the job is still there to apply once the cause is gone
    if who == "root":
        (root / "new").rename(root / "new.mine")
    else:
        (root / "locked").chmod(0o755)
    lap.run("apply", job, "--yes", check=0)
    assert (root / "a.md").read_bytes() == b"A by the AI\n"
    assert (root / second).read_bytes() == b"by the AI\n"


def test_a_file_that_cannot_be_put_back_is_named_with_the_way_back(srv_place, agent):
    """git rewrote docs/a.md, then failed on locked/b.md; by then docs/ was made read-only too
    (a `git` on PATH that does so after `git apply`), so docs/a.md cannot be put back: the
    message names it, says how it is left, and the command it gives puts the old bytes back."""
    lap = laptop_at(srv_place, agent, {"docs/a.md": b"a\n", "locked/b.md": b"b\n"})
    root = lap.root
    job = ai_job(lap, {"write": "docs/a.md", "text": "A by the AI\n"}, {"write": "locked/b.md", "text": "B\n"},
                 {"write": "z.bin", "b64": base64.b64encode(b"\0binary\xff" * 10).decode()})  # git apply's path
    bin_dir = srv_place / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f'#!/bin/sh\n{shutil.which("git")} "$@"; rc=$?\n'
                                 f'case " $* " in *" apply --binary - "*) chmod 555 {root}/docs ;; esac\n'
                                 'exit $rc\n')
    (bin_dir / "git").chmod(0o755)
    account = as_walls_account(lap, srv_place)
    (root / "locked").chmod(0o555)

    failed = account.run("apply", job, "--yes", env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert failed.returncode == 5 and "Traceback" not in failed.err, failed.err
    assert "git apply failed while writing locked/b.md; the files it had written were put back except " \
           "docs/a.md (Permission denied: it holds what git wrote; yours: `cp -p " in failed.err, failed.err
    assert (root / "docs/a.md").read_bytes() == b"A by the AI\n" and (root / "locked/b.md").read_bytes() == b"b\n"
    assert "make locked writable (`chmod u+w locked`)" in failed.err, failed.err
    way_back = failed.err.split("yours: `", 1)[1].split("`", 1)[0]
    (root / "docs").chmod(0o755)
    put_back = subprocess.run(account.program[:4] + ["/bin/sh", "-c", way_back], cwd=root, capture_output=True)
    assert put_back.returncode == 0, put_back.stderr
    assert (root / "docs/a.md").read_bytes() == b"a\n"


def test_undo_that_cannot_write_a_file_changes_nothing_and_says_how(srv_place, agent):
    """`apply --undo` with a folder made read-only since the apply (as the test account: root
    writes there anyway): the files it undid before that one go back to what the apply left,
    the undo log stays, and once the folder is writable the same undo works."""
    lap = laptop_at(srv_place, agent, {"a.md": b"a\n", "locked/b.md": b"b\n"})
    root = lap.root
    # undone in this order: new.md removed, a.md written back, then locked/b.md fails
    job = ai_job(lap, {"write": "a.md", "text": "A by the AI\n"}, {"write": "locked/b.md", "text": "B\n"},
                 {"write": "new.md", "text": "new\n"})
    account = as_walls_account(lap, srv_place)
    account.run("apply", job, "--yes", check=0)
    (root / "locked").chmod(0o555)
    applied = snapshot_tree(root)

    failed = account.run("apply", "--undo")
    assert failed.returncode == 5 and "Traceback" not in failed.err, failed.err
    assert "cannot undo: could not write locked/b.md (Permission denied); the files undone before it are as " \
           "the apply left them, nothing was changed" in failed.err, failed.err
    assert "make locked writable (`chmod u+w locked`), then run `patchwire apply --undo` again" in failed.err
    assert snapshot_tree(root) == applied

    (root / "locked").chmod(0o755)
    account.run("apply", "--undo", check=0)
    assert (root / "a.md").read_bytes() == b"a\n" and (root / "locked/b.md").read_bytes() == b"b\n"
    assert not (root / "new.md").exists()


def test_a_3_way_write_into_a_read_only_folder_puts_everything_back(srv_place, agent):
    """The 3-way path writes the files itself: as the test account, long.txt (merged) is
    written, then locked/b.md is refused; long.txt goes back, the message names the file,
    the reason and the fix."""
    lap = laptop_at(srv_place, agent, {"long.txt": LONG, "locked/b.md": b"b\n"})
    root = lap.root
    job = ai_job(lap, {"write": "long.txt", "text": edited({5: "line 5 by the AI\n"}).decode()},
                 {"write": "locked/b.md", "text": "B\n"})
    (root / "long.txt").write_bytes(edited({7: "line 7 by me\n"}))  # inside the AI's hunk: 3-way
    account = as_walls_account(lap, srv_place)
    (root / "locked").chmod(0o555)
    before = snapshot_tree(root)

    failed = account.run("apply", job, "--yes")
    assert failed.returncode == 5 and "Traceback" not in failed.err, failed.err
    assert "could not write locked/b.md (Permission denied); the files written so far were put back, " \
           "nothing was changed" in failed.err, failed.err
    assert "make locked writable (`chmod u+w locked`)" in failed.err, failed.err
    assert snapshot_tree(root) == before
    (root / "locked").chmod(0o755)
    account.run("apply", job, "--yes", check=0)
    assert (root / "long.txt").read_bytes() == edited({5: "line 5 by the AI\n", 7: "line 7 by me\n"})
    assert (root / "locked/b.md").read_bytes() == b"B\n"


def test_a_new_file_outside_a_sparse_checkout_over_a_tracked_one_is_refused(tmp_path, agent):
    """A sparse checkout keeps no file for the paths outside it, and sends none: an AI that
    writes one of them makes a "new file", which would replace the committed file unseen (git
    clears the skip-worktree flag of a file that is there, and shows it modified). Refused,
    naming it, before any write; the rest applies with --exclude; a new file at a path git
    does not track outside the checkout is an ordinary new file."""
    root = make_repo(tmp_path / "mono", {"app/main.dart": b"void main() {}\n", "other/shared.txt": b"committed\n",
                                         "other/deep/more.txt": b"more\n"})
    conftest.git(root, "sparse-checkout", "set", "app")
    assert not (root / "other").exists()
    lap = Laptop(root)
    lap.init(agent)
    result = lap.ask(script({"write": "app/new.dart", "text": "// new\n"},
                            {"write": "other/shared.txt", "text": "the AI's, never having seen it\n"},
                            {"write": "other/brand-new.txt", "text": "new\n"}), "--yes")
    job = lap.last_job()
    assert result.returncode == 5, result.err
    assert ("other/shared.txt: tracked by git but outside your sparse checkout, where the patch puts a new file"
            in result.err and f"`patchwire apply {job} --exclude other/shared.txt`" in result.err), result.err
    assert not (root / "other").exists() and not (root / "app/new.dart").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    assert status == "?? .patchwire.toml\n", status
    rest = lap.run("apply", job, "--exclude", "other/shared.txt", "--yes")
    assert rest.returncode == 0, rest.err
    assert (root / "app/new.dart").read_bytes() == b"// new\n" and (root / "other/brand-new.txt").read_bytes() == b"new\n"
    assert not (root / "other/shared.txt").exists()
    shown = subprocess.run(["git", "show", "HEAD:other/shared.txt"], cwd=root, capture_output=True).stdout
    assert shown == b"committed\n"
