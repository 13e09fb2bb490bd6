"""The agent's HTTP threads wait on conditions, never poll: an event stream wakes when its
job gets an event, even one added between the stream's last read and its wait (a bare
`Condition.wait(timeout)` sleeps through that one until the timeout). Bounded joins only:
a polling or lost-wakeup implementation blocks here for the whole wait and fails."""

from __future__ import annotations

import threading

import patchwire_agent as pa

LONG = 3600.0  # far longer than any join below: returning at all is the point


def store_with_job(tmp_path) -> pa.Store:
    store = pa.Store(tmp_path)
    store.create_job({"id": "j1", "user": "u", "project": "p", "prompt": "x", "status": "running",
                      "created": 1.0})
    return store


def waiter(store: pa.Store, after: int) -> threading.Thread:
    t = threading.Thread(target=store.wait_for_event, args=("j1", after, LONG), daemon=True)
    t.start()
    return t


def test_an_event_added_before_the_wait_wakes_it_at_once(tmp_path):
    store = store_with_job(tmp_path)
    assert store.events_and_status("j1", 0) == ([], "running")  # the stream's read: nothing yet
    store.add_event("j1", {"type": "text", "text": "landed before the wait"})
    t = waiter(store, 0)
    t.join(30)
    assert not t.is_alive(), "the wait slept through an event already stored"
    store.close()


def test_a_waiting_stream_wakes_on_the_next_event_not_on_other_changes(tmp_path):
    store = store_with_job(tmp_path)
    store.add_event("j1", {"type": "text", "text": "one"})
    store.create_job({"id": "j2", "user": "u", "project": "p", "prompt": "y", "status": "running",
                      "created": 2.0})
    store.add_event("j2", {"type": "text", "text": "another job's"})  # notifies, but not for j1
    store.update_job("j1", pgid=123)
    assert store.wait_for_event("j1", 1, 0) is False  # nothing new for j1: it would go on waiting
    assert store.wait_for_event("j1", 0, 0) is True
    assert store.wait_for_event("gone", 0, 0) is False
    t = waiter(store, 1)
    store.add_event("j1", {"type": "text", "text": "two"})
    t.join(30)
    assert not t.is_alive(), "the wait did not wake on the job's next event"
    store.close()
