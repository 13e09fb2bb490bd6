"""The box tells you a job ended: a user's notification targets (`patchwire notify add URL`), a
receiver on loopback that checks each delivery's HMAC signature, retries after a 500, nothing for
another user's jobs, and hosts outside the admin's `[notify] allow` refused. Real agent, real
laptop CLI, a real HTTP receiver."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import List

import pytest

from conftest import Laptop, ask_body, make_repo, script, tomli_w, tomllib, wait_until
from test_box_walls import account_agent, hand_to_account


class Receiver(http.server.ThreadingHTTPServer):
    """Records every POST (headers, body); answers the first `failures` of them with 500."""

    def __init__(self, failures: int = 0):
        self.got: List[dict] = []
        self.failures = failures
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.got.append({"path": self.path, "headers": dict(self.headers), "body": body})
        failing = len(self.server.got) <= self.server.failures
        self.send_response(500 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def verified(secret: str, got: dict) -> dict:
    """The delivery's JSON, after checking its signature as README "Verifying a webhook" says."""
    stamp = got["headers"]["X-Patchwire-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + got["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, got["headers"]["X-Patchwire-Signature"])
    assert abs(time.time() - int(stamp)) < 300
    return json.loads(got["body"])


@pytest.fixture
def receiver():
    server = Receiver(failures=1)
    yield server
    server.shutdown()
    server.server_close()


def box_allowing(make_agent, *hosts: str, **notify):
    box = make_agent(start=False, users=("alice", "bob"))
    data = tomllib.loads(box.config.read_text())
    data["notify"] = {"allow": list(hosts), **notify}
    box.config.write_text(tomli_w.dumps(data))
    return box.start()


def laptop_of(tmp_path: Path, box, user: str) -> Laptop:
    lap = Laptop(make_repo(tmp_path / user, {"README.md": b"# demo\n"}))
    lap.init(box, user=user)
    return lap


def test_one_signed_delivery_per_finished_job_retried_after_a_500_and_none_for_others(tmp_path, make_agent,
                                                                                      receiver):
    host = receiver.url.split("//")[1]
    box = box_allowing(make_agent, host)
    alice, bob = laptop_of(tmp_path, box, "alice"), laptop_of(tmp_path, box, "bob")
    added = alice.run("notify", "add", receiver.url + "/hook", check=0)
    secret = added.out.strip()
    assert len(secret) >= 40 and "signing secret" in added.err
    listed = alice.run("notify", "list", "--json", check=0)
    assert secret not in listed.out and json.loads(listed.out)["targets"][0]["kind"] == "webhook"

    bob.ask(script({"write": "b.txt", "text": "b\n"}), "--yes", check=0)  # bob has no target
    secret_prompt = script({"write": "a.txt", "text": "a\n"}, text="the secret plan")
    alice.ask(secret_prompt, "--yes", check=0)
    job = alice.last_job()
    wait_until(lambda: len(receiver.got) >= 2, 30, "the delivery and its retry")
    time.sleep(0.5)  # a third delivery (bob's, or a repeat) would have come by now
    assert len(receiver.got) == 2, receiver.got
    first, second = receiver.got
    assert first["headers"]["X-Patchwire-Delivery"] == second["headers"]["X-Patchwire-Delivery"]
    for got in receiver.got:
        payload = verified(secret, got)
        assert payload["type"] == "job.done" and payload["job"]["id"] == job
        assert payload["job"]["stats"]["files"] == 1 and payload["user"] == "alice"
        assert "secret plan" not in got["body"].decode() and "a.txt" not in got["body"].decode()
    forged = dict(second, body=second["body"].replace(b"job.done", b"job.fail"))
    with pytest.raises(AssertionError):
        verified(secret, forged)

    audit = [json.loads(line) for line in (box.state_dir / "audit.log").read_text().splitlines()]
    attempts = [(r["attempt"], r["status"]) for r in audit if r.get("event") == "notify"]
    assert attempts == [(1, 500), (2, 204)]
    assert secret not in (box.state_dir / "audit.log").read_text()


def test_an_unlisted_host_is_refused_naming_the_setting(tmp_path, make_agent, receiver):
    box = box_allowing(make_agent, "hooks.example.com")
    alice = laptop_of(tmp_path, box, "alice")
    refused = alice.run("notify", "add", receiver.url + "/hook")
    assert refused.returncode == 3 and "[notify] allow" in refused.err, refused.err
    assert json.loads(alice.run("notify", "list", "--json", check=0).out)["targets"] == []
    assert receiver.got == []


def test_slack_and_test_and_remove(tmp_path, make_agent, receiver):
    receiver.failures = 0
    box = box_allowing(make_agent, receiver.url.split("//")[1])
    alice = laptop_of(tmp_path, box, "alice")
    added = json.loads(alice.run("notify", "add", receiver.url + "/services/T0/B0/XYZsecretpath", "--kind", "slack",
                                 "--on", "failure", "--json", check=0).out)
    target = added["target"]
    assert "secret" not in added and "XYZsecretpath" not in target["url"]
    tested = alice.run("notify", "test", check=0)
    assert f"target {target['id']}: delivered" in tested.err
    assert json.loads(receiver.got[0]["body"]) == {"text": "Patchwire: a test notification from the box"}
    alice.ask(script({"write": "ok.txt", "text": "ok\n"}), "--yes", check=0)  # not a failure: nothing sent
    alice.ask(script({"error": "<!channel> & down"}), "--yes")
    wait_until(lambda: len(receiver.got) >= 2, 30, "the failure's delivery")
    text = json.loads(receiver.got[1]["body"])["text"]
    assert f"job {alice.last_job()} in alice failed" in text and "&lt;!channel&gt; &amp; down" in text
    alice.run("notify", "remove", target["id"], check=0)
    assert json.loads(alice.run("notify", "list", "--json", check=0).out)["targets"] == []


def test_an_allowed_name_that_resolves_to_the_box_gets_nothing(tmp_path, make_agent, receiver):
    """`localhost` is allowed, but it resolves to the box's loopback: the agent resolves once,
    judges the address as the gateway does, and posts nowhere off the internet unless an
    allow entry names that address itself."""
    receiver.failures = 0
    port = receiver.url.rsplit(":", 1)[1]
    box = box_allowing(make_agent, f"localhost:{port}")
    alice = laptop_of(tmp_path, box, "alice")
    alice.run("notify", "add", f"http://localhost:{port}/hook", check=0)
    tested = alice.run("notify", "test")
    assert "not an internet address" in tested.err and "[notify] allow" in tested.err, tested.err
    assert receiver.got == []
    audit = [json.loads(line) for line in (box.state_dir / "audit.log").read_text().splitlines()]
    assert [r["status"] for r in audit if r.get("event") == "notify"] == [None]


class Trickle:
    """A receiver that reads the request, then answers a byte every 0.2 s for as long as it is
    let (at most 30 s): what a slow or hostile receiver of one user's would do to the one
    thread that delivers everyone's notifications."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            end = time.monotonic() + 30
            answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10000
            while time.monotonic() < end and self.sent < len(answer):
                try:
                    conn.sendall(answer[self.sent:self.sent + 1])
                except OSError:
                    return
                self.sent += 1
                time.sleep(0.2)


@pytest.fixture(params=["root", "account"])
def notify_box(request, make_agent, srv_place):
    """box_allowing, with the agent run as root or as the test account (its state, the
    targets and the audit log then the account's)."""
    boxes = []  # the account's; make_agent stops its own

    def make(*hosts: str, **notify):
        if request.param == "root":
            return box_allowing(make_agent, *hosts, **notify)
        box = account_agent(srv_place, users=("alice", "bob"))
        data = tomllib.loads(box.config.read_text())
        data["notify"] = {"allow": list(hosts), **notify}
        box.config.write_text(tomli_w.dumps(data))
        hand_to_account(srv_place)
        boxes.append(box.start())
        return box
    yield make
    for box in boxes:
        box.stop()


def test_a_trickling_receiver_is_cut_off_and_the_next_delivery_goes_out(notify_box, receiver):
    receiver.failures = 0
    slow = Trickle()
    box = notify_box(receiver.url.split("//")[1], slow.url.split("//")[1], timeout_s=1.5)
    for url in (slow.url, receiver.url):  # the slow one added first: delivered to first
        status, added = box.json("POST", "/v1/notify", {"url": url + "/hook", "events": ["end"], "include": []})
        assert status == 201, added
    started = time.monotonic()
    status, job = box.json("POST", "/v1/ask", ask_body(None, script({"write": "a.txt", "text": "a\n"})))
    assert status == 202, job
    assert box.wait_job(job["id"])["status"] == "done"
    wait_until(lambda: receiver.got, 30, "the second target's delivery")
    assert time.monotonic() - started < 15  # not after the trickle's 30 s
    audit = [json.loads(line) for line in (box.state_dir / "audit.log").read_text().splitlines()]
    cut = [r for r in audit if r.get("event") == "notify" and r["url"].startswith(slow.url)][0]
    assert cut["status"] is None and cut["error"] == "no whole answer within 1.5 s ([notify] timeout_s)", cut
    assert 1400 <= cut["ms"] < 4000 and 3 <= slow.sent < 30, (cut, slow.sent)


def test_one_users_receivers_that_never_answer_hold_up_nobody_else(monkeypatch):
    """The real Notifier with its threads; only `post` (the send) is replaced: bob's never
    returns until the test lets it, as a receiver that never answers. Bob's 300 job ends hold
    one sending thread and fill his own queue (200 at most); alice's job end is still sent at
    once. Before, one thread sent everything in order: alice waited behind bob's every
    timeout, and once 1,000 were waiting hers was dropped."""
    import patchwire_agent as pa

    class Store:
        def job(self, job_id):
            return {"id": job_id, "user": job_id.split("-")[0], "status": "done"}

        def targets(self, user):
            return [{"id": f"t-{user}", "user": user, "kind": "webhook", "url": "https://x.example/", "events": ["end"],
                     "include": [], "secret": "s"}]

        def patch_path(self, job_id):
            return None

    class Config:
        users = {"alice": {}, "bob": {}}

    release, sent = threading.Event(), []

    def post(self, delivery):
        sent.append(delivery.job)
        if delivery.job.startswith("bob"):
            release.wait(30)
        return {"ok": True, "retry": False, "status": 200, "error": None}
    monkeypatch.setattr(pa.Notifier, "post", post)
    monkeypatch.setattr(pa, "job_payload", lambda job, event, target, patch: {"type": "job.done", "job": job["id"]})
    notifier = pa.Notifier(Store(), None, lambda: Config())
    notifier.start()
    try:
        for n in range(300):
            notifier.job_event("bob", f"bob-{n}", "end")
        notifier.job_event("alice", "alice-1", "end")
        wait_until(lambda: "alice-1" in sent, timeout=10, what="alice's delivery while bob's hangs")
        assert [j for j in sent if j.startswith("bob")] == ["bob-0"]  # one of bob's at a time
        assert pa.NOTIFY_PENDING_PER_USER - 1 <= len(notifier._heaps["bob"]) <= pa.NOTIFY_PENDING_PER_USER
    finally:
        release.set()
        notifier.close()


@pytest.mark.parametrize("url", ["http://[::1/x", "http://[zz]/", "https://hooks.example:port/x"])
def test_a_url_that_does_not_parse_is_a_bad_request(make_agent, url):
    agent = make_agent()
    status, answer = agent.json("POST", "/v1/notify", {"url": url})
    assert status == 400 and "is not an http:// or https:// URL" in answer["error"], answer
