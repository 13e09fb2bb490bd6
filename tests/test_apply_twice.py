"""Applying a job twice and undoing twice (issue 22): the second apply says the job is already
applied, and when, and writes nothing (it used to 3-way merge the change with itself); the
second undo says the last apply was undone already, and when, as `log` shows it (it used to
say no apply was ever recorded). The real CLI, a real agent and a real job."""

from __future__ import annotations

from conftest import script, tree_digest


def test_a_second_apply_says_already_applied_and_changes_nothing(laptop):
    laptop.ask(script({"write": "README.md", "text": "# from the AI\n"}), "--no-apply", check=0)
    job = laptop.last_job()
    laptop.run("apply", job, "--yes", check=0)
    before = tree_digest(laptop.root)
    again = laptop.run("apply", job, "--yes", check=0)
    assert f"job {job} is already applied here (at 20" in again.err, again.err
    assert "3-way" not in again.err and "applied job" not in again.err
    assert tree_digest(laptop.root) == before
    undone = laptop.run("apply", "--undo", check=0)
    assert "restored 1 file(s)" in undone.err
    second = laptop.run("apply", "--undo", check=2)
    assert f"the last apply (job {job}) was already undone at 20" in second.err, second.err
    assert "no apply recorded" not in second.err
    assert f"undo of job {job}" in laptop.run("log", check=0).out
    assert (laptop.root / "README.md").read_bytes() == b"# demo\n"
    laptop.run("apply", job, "--yes", check=0)  # undone: it applies again
    assert (laptop.root / "README.md").read_bytes() == b"# from the AI\n"
