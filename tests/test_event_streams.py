"""Event streams (issue 14). A stream reads a job's latest events from memory (Store.follow,
EventTail) with the same bytes sqlite holds, and an event added between a stream's read and its
wait ends the wait at once (Store.wait_change): with a bare condition, that notify was lost and
the stream slept until the next event or its 1 s timeout. The latency itself is measured by
bench/ask.py, never asserted here."""

from __future__ import annotations

import json
import threading

import patchwire_agent as pa


def new_store(tmp_path) -> pa.Store:
    store = pa.Store(tmp_path)
    store.create_job({"id": "j1", "user": "u", "project": "p", "prompt": "x", "status": "queued",
                      "created": 1.0})
    return store


def from_sqlite(store: pa.Store, after: int) -> list:
    events, _ = store.events_and_status("j1", after)
    return [(e["seq"], e["type"], json.dumps(e).encode() + b"\n") for e in events]


def test_an_event_added_between_a_streams_read_and_its_wait_ends_the_wait_at_once(tmp_path):
    store = new_store(tmp_path)
    store.add_event("j1", {"type": "text", "text": "first"})
    lines, status, seen = store.follow("j1", 0)
    assert [seq for seq, _, _ in lines] == [1] and status == "queued"
    assert store.wait_change(seen, 0) is False  # nothing new: a stream would wait
    store.add_event("j1", {"type": "text", "text": "second"})  # lands before the stream waits
    assert store.wait_change(seen, 0) is True
    lines, _, seen = store.follow("j1", 1)
    assert [json.loads(line)["text"] for _, _, line in lines] == ["second"]
    store.update_job("j1", status="running")  # a status change wakes streams too
    assert store.wait_change(seen, 0) is True
    store.close()


def test_a_waiting_stream_is_woken_by_the_next_event(tmp_path):
    store = new_store(tmp_path)
    _, _, seen = store.follow("j1", 0)
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(store.wait_change(seen, 60)))
    waiter.start()
    store.add_event("j1", {"type": "text", "text": "hello"})
    waiter.join(60)
    assert woke == [True]
    store.close()


def test_followers_get_from_memory_the_bytes_sqlite_holds_and_fall_back_when_behind(tmp_path):
    store = new_store(tmp_path)
    store.update_job("j1", status="running")
    total = 2 * pa.Store.TAIL_EVENTS + 50  # past the tail's bound: its start is dropped
    for i in range(total):
        store.add_event("j1", {"type": "text", "text": f"line {i} \u00e9\u2603"})
    tail = store.tails["j1"]
    assert tail.lines[0][0] > 1 and tail.lines[-1][0] == total and tail.status == "running"
    assert tail.after(0) is None and tail.after(total - 3) is not None
    for after in (0, 1, tail.lines[0][0] - 2, tail.lines[0][0] - 1, total - 3, total):
        lines, status, _ = store.follow("j1", after)
        assert lines == from_sqlite(store, after), after
        assert status == "running"
    store.add_event("j1", {"type": "finished", "status": "done", "stats": {}}, status="done")
    assert "j1" not in store.tails  # an ended job's followers read sqlite
    lines, status, _ = store.follow("j1", total)
    assert status == "done" and [kind for _, kind, _ in lines] == ["finished"]
    assert lines == from_sqlite(store, total)
    assert store.follow("nope", 0)[:2] == ([], None)
    store.close()


def test_a_finished_job_reports_its_step_times_in_its_event_and_the_audit_log(laptop, agent):
    from conftest import script
    laptop.ask(script({"write": "t.txt", "text": "timed\n"}), "--yes", check=0)
    job = laptop.last_job()
    finished = [e for e in agent.events(job) if e["type"] == "finished"][0]
    steps = ["setup_ms", "prepare_ms", "links_ms", "ai_ms", "collect_ms", "patch_ms"]
    assert list(finished["timings"]) == steps
    assert all(isinstance(v, (int, float)) and v >= 0 for v in finished["timings"].values())
    assert finished["timings"]["ai_ms"] > 0  # the stand-in is a process: it takes some time
    audit = [json.loads(line) for line in (agent.state_dir / "audit.log").read_text().splitlines()]
    ends = [r for r in audit if r.get("event") == "job_end" and r.get("job") == job]
    assert len(ends) == 1 and ends[0]["timings"] == finished["timings"]
    asks = [r for r in audit if r.get("event") == "request" and r.get("method") == "POST"
            and r.get("path") == "/v1/ask" and r.get("job") == job]
    assert len(asks) == 1 and 0 <= asks[0]["body_ms"] <= asks[0]["queued_ms"] <= asks[0]["duration_ms"]
