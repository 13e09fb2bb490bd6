"""Fast tests of pure logic that the process tests cannot pin down on their own: the fair
queue, reconnecting a dropped event stream, and the job folder's clean check."""

from __future__ import annotations

import subprocess

import pytest

import patchwire
import patchwire_agent as pa


def item(job: str, user: str, project: str = "p") -> pa.QueueItem:
    return pa.QueueItem(job, user, project)


def test_queue_is_round_robin_over_users():
    queue = pa.FairQueue()
    for job, user in (("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("c1", "carol")):
        queue.put(item(job, user))
    assert queue.order() == ["a1", "b1", "c1", "a2", "a3"]
    taken = [queue.take(lambda i: True).job_id for _ in range(5)]
    assert taken == ["a1", "b1", "c1", "a2", "a3"]


def test_queue_skips_a_busy_project_and_serves_the_next():
    queue = pa.FairQueue()
    queue.put(item("a1", "alice", "busy"))
    queue.put(item("a2", "alice", "free"))
    queue.put(item("b1", "bob", "busy"))
    first = queue.take(lambda i: i.project != "busy")
    assert first.job_id == "a2"
    assert queue.order() == ["b1", "a1"]  # alice was served: bob's turn comes first now


def test_queue_remove_and_close():
    queue = pa.FairQueue()
    queue.put(item("a1", "alice"))
    assert queue.remove("a1") and not queue.remove("a1")
    assert queue.order() == []
    queue.close()
    assert queue.take(lambda i: True) is None


class FakeClient:
    def __init__(self, events):
        self.paths, self.event_list = [], events

    def events(self, job, after=0, follow=True):  # patchwire.Client.events, recorded
        self.paths.append(f"/v1/jobs/{job}/events?after={after}")
        yield from self.event_list

    def job(self, job):  # patchwire.Client.job: still running
        return {"id": job, "status": "running"}


class FakeSession:
    def __init__(self, client):
        self.client = client


def test_a_dropped_stream_continues_after_the_last_event_seen(monkeypatch):
    monkeypatch.setattr(patchwire.time, "sleep", lambda s: None)

    def first():
        yield {"seq": 1, "job": "abc", "type": "queued"}
        yield {"seq": 2, "job": "abc", "type": "started"}
        raise ConnectionResetError("connection reset by peer")
    client = FakeClient([{"seq": 3, "job": "abc", "type": "text", "text": "hi"},
                         {"seq": 4, "job": "abc", "type": "finished"}])
    seen = []
    end = patchwire.stream_job(FakeSession(client), first(), seen.append)
    assert end["type"] == "finished"
    assert client.paths == ["/v1/jobs/abc/events?after=2"]
    assert [e["seq"] for e in seen] == [1, 2, 3, 4]


def test_a_stream_that_never_ends_is_an_agent_error(monkeypatch):
    monkeypatch.setattr(patchwire.time, "sleep", lambda s: None)
    client = FakeClient([{"seq": 2, "job": "abc", "type": "text", "text": "still going"}])
    first = iter([{"seq": 1, "job": "abc", "type": "queued"}])
    with pytest.raises(patchwire.AgentError, match="ended before the job did"):
        patchwire.stream_job(FakeSession(client), first, lambda e: None)
    assert 0 < len(client.paths) <= 40  # bounded reconnections (patchwire.RECONNECT_FOR_S)


@pytest.fixture
def prepared(tmp_path):
    repo = pa.ProjectRepo(tmp_path / "state", "alice", "demo")
    repo.ensure()
    (repo.mirror / "a.txt").write_bytes(b"a\n")
    (repo.mirror / ".gitignore").write_bytes(b"build/\n")
    git = repo.git(repo.mirror, GIT_INDEX_FILE=str(repo.home / "t.index"))
    git("add", "-A", "-f", ".")
    tree = git.text("write-tree")
    manifest = [(m, s, p) for p, (m, s) in sorted(git.ls_files_stage().items())]
    commit = repo.snapshot(tree, manifest)
    folder = repo.prepare_slot(0, commit)
    return repo, commit, folder


def test_a_warm_job_folder_is_made_exactly_the_snapshot(prepared):
    repo, commit, folder = prepared
    (folder / "build").mkdir()
    (folder / "build" / "cache").write_bytes(b"ignored: fine")
    (folder / "stray.txt").write_bytes(b"left over")
    (folder / "a.txt").write_bytes(b"changed\n")
    (folder / "nested").mkdir()
    subprocess.run(["git", "init", "-q", str(folder / "nested")], check=True)
    assert repo.prepare_slot(0, commit) == folder
    assert (folder / "build" / "cache").read_bytes() == b"ignored: fine"
    assert not (folder / "stray.txt").exists() and not (folder / "nested").exists()
    assert (folder / "a.txt").read_bytes() == b"a\n"
    repo._check_slot_clean(0, commit)
    with pytest.raises(patchwire.PatchwireError, match="HEAD is not at"):
        repo._check_slot_clean(0, "0" * 40)
