"""Ceilings on what one job can make the box store: the AI's output ([jobs] max_output_mb),
its diff ([jobs] max_diff_mb, written to disk and streamed, never held whole in memory), the
user's folder ([policy] disk_quota_mb), a full disk (the job still ends, recorded, and its
folder is reset) and `gc` on a full disk (it frees, and the database file shrinks).

Found by an attacker (issue 19 item 5): 48 MB printed was 48 MiB more database; a 1 GB file
took the agent to 2.75 GB of memory; a job that filled its folder stayed `running`.
Each test runs the real agent with the stand-in AI and asserts on bytes, sizes and reasons.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

import patchwire_agent as pa
from conftest import Laptop, ask_body, fill_disk, make_repo, program_argv, script, tomli_w, tomllib, wait_until
from test_jobs import slot_dir

MIB = 1024 * 1024


def configure(box, change) -> None:
    """Edit the agent's TOML before it starts."""
    data = tomllib.loads(box.config.read_text())
    change(data)
    box.config.write_text(tomli_w.dumps(data))
    box.state_dir = Path(data["server"]["state_dir"])


def synced(box, root: Path, user: str = "alice", files=None) -> Laptop:
    lap = Laptop(make_repo(root / "laptop", files or {"README.md": b"# demo\n", "src/app.py": b"print(1)\n"}))
    lap.init(box, user=user)
    lap.run("sync", check=0)
    return lap


def ask(box, lap: Laptop, *steps: dict, user: str = "alice", **extra) -> tuple:
    token = box.tokens[user]
    return box.json("POST", "/v1/ask", ask_body(lap, script(*steps), **extra), token=token)


def ended(box, job: str, user: str = "alice", timeout: float = 60) -> dict:
    """The job once it has ended, read with its user's token."""
    def read():
        info = box.json("GET", f"/v1/jobs/{job}", token=box.tokens[user])[1]
        return info if info.get("status") in ("done", "failed", "cancelled") else None
    return wait_until(read, timeout, f"job {job} to end")


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def stored_bytes(box) -> int:
    return sum(p.stat().st_size for p in box.state_dir.glob("jobs.sqlite3*"))


def events_of(box, job: str, user: str = "alice") -> list:
    _, _, data = box.request("GET", f"/v1/jobs/{job}/events?after=0&follow=0", token=box.tokens[user])
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def on_small_disk(small_disk: Path, **settings):
    def change(data: dict) -> None:
        data["server"]["state_dir"] = str(small_disk / "state")
        for table, values in settings.items():
            data.setdefault(table, {}).update(values)
    return change


# ------------------------------------------------------------------ the AI's output


def test_output_over_max_output_mb_keeps_head_and_tail_and_says_how_much_was_dropped(make_agent, tmp_path):
    box = make_agent(jobs={"max_output_mb": 1})
    lap = synced(box, tmp_path)
    db_before = stored_bytes(box)
    steps = ({"say": "the first words"}, {"lines": [4000, 5000]}, {"say": "the last words"},
             {"write": "out.txt", "text": "kept\n"})
    result = lap.ask(script(*steps), "--no-apply")
    assert result.returncode == 0, result.err
    assert "not kept by the box: over [jobs] max_output_mb = 1" in result.err  # the laptop says so
    job = lap.last_job()
    events = events_of(box, job)
    [dropped] = [e for e in events if e["type"] == "output_dropped"]
    assert dropped["limit"] == "[jobs] max_output_mb = 1"
    kept = [e for e in events if e["type"] == "output"]
    assert dropped["events"] + len(kept) == 4000  # every line is either stored or counted
    assert dropped["bytes"] > 18 * MIB
    texts = [e.get("text") for e in events]
    assert "the first words" in texts and "the last words" in texts  # the head and the tail
    assert events[-1]["type"] == "finished" and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(len(json.dumps(e)) for e in events) < 1.1 * MIB
    # not the 20 MiB printed; sqlite's write-ahead log keeps up to 4 MiB whatever the job
    assert stored_bytes(box) - db_before < 6 * MIB
    assert b"+kept" in box.request("GET", f"/v1/jobs/{job}/diff")[2]


# ------------------------------------------------------------------ the diff


def test_a_200_mb_file_never_passes_through_the_agents_memory(make_agent, tmp_path):
    box = make_agent(jobs={"max_diff_mb": 400})
    lap = synced(box, tmp_path)
    before = peak_rss(box.proc.pid)
    status, job = ask(box, lap, {"random": ["big.bin", 200]}, timeout_s=600)
    assert status == 202, job
    info = box.wait_job(job["id"], timeout=600)
    assert info["status"] == "done", info
    patch = box.state_dir / "patches" / f"{job['id']}.patch"
    size = patch.stat().st_size
    assert size > 200 * MIB  # random bytes do not compress: base85 makes them bigger
    url = urllib.parse.urlsplit(box.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("GET", f"/v1/jobs/{job['id']}/diff", headers={"Authorization": "Bearer " + box.token})
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == size
    received, head = 0, b""
    for chunk in iter(lambda: resp.read(MIB), b""):
        head = head or chunk[:200]
        received += len(chunk)
    conn.close()
    assert received == size and head.startswith(b"diff --git a/big.bin b/big.bin")
    growth = peak_rss(box.proc.pid) - before
    assert growth < 50 * MIB, f"the agent's peak memory grew by {growth // MIB} MiB for a {size // MIB} MiB patch"


def test_a_diff_over_max_diff_mb_fails_the_job_names_the_key_and_resets_its_folder(make_agent, tmp_path):
    box = make_agent(jobs={"max_diff_mb": 1})
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"write": "small.txt", "text": "small\n"}, {"random": ["big.bin", 3]})
    info = box.wait_job(job["id"])
    assert info["status"] == "failed"
    assert "its diff is over [jobs] max_diff_mb = 1" in info["reason"], info["reason"]
    assert events_of(box, job["id"])[-1]["type"] == "failed"
    folder = slot_dir(box, info["slot"])
    assert not (folder / "big.bin").exists() and not (folder / "small.txt").exists()
    assert not (box.state_dir / "patches" / f"{job['id']}.patch").exists()
    status, answer = box.json("GET", f"/v1/jobs/{job['id']}/diff")
    assert status == 409 and answer["code"] == "no_diff"
    # a change under the cap, in the same folder, goes through
    status, job = ask(box, lap, {"write": "fine.txt", "text": "fine\n"})
    assert box.wait_job(job["id"])["status"] == "done"
    assert b"+fine" in box.request("GET", f"/v1/jobs/{job['id']}/diff")[2]


def test_a_sparse_file_the_diff_would_hold_whole_fails_the_job_as_too_large(make_agent, tmp_path):
    """`truncate -s 3G` costs the AI neither disk nor memory, and its zeros compress to almost
    nothing, under any patch cap; but `git diff --binary` holds each blob whole (3 GB). A new
    blob over 4x max_diff_mb (at least 64 MiB) fails the job before any diff reads it."""
    box = make_agent(jobs={"max_diff_mb": 1})
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"run": ["truncate", "-s", "100M", "sparse.bin"], "out": "o.txt"})
    info = box.wait_job(job["id"], timeout=120)
    assert info["status"] == "failed" and "its diff is over [jobs] max_diff_mb = 1" in info["reason"], info
    folder = slot_dir(box, info["slot"])
    assert not (folder / "sparse.bin").exists()


# ------------------------------------------------------------------ the user's disk quota


def test_an_ask_over_the_users_disk_quota_is_refused_naming_the_rule(make_agent, tmp_path, capsys):
    box = make_agent(users=("alice", "bob"), start=False)
    configure(box, lambda data: data["users"]["alice"].update({"disk_quota_mb": 1}))
    box.start()
    alice = synced(box, tmp_path / "a", files={"data.bin": os.urandom(2 * MIB), "README.md": b"# a\n"})
    bob = synced(box, tmp_path / "b", user="bob", files={"data.bin": os.urandom(2 * MIB)})
    status, answer = ask(box, alice, {"write": "x.txt", "text": "x\n"})
    assert status == 507, answer
    assert answer["code"] == "quota" and answer["limit"] == "disk_quota_mb" and answer["rule"] == "[users.alice]"
    assert "[users.alice] disk_quota_mb = 1" in answer["error"] and answer["used_bytes"] > 2 * MIB
    assert box.json("GET", "/v1/jobs")[1]["jobs"] == []  # nothing made
    result = alice.ask(script({"say": "no"}), "--no-apply")
    assert result.returncode == 3 and "disk_quota_mb" in result.err and "Traceback" not in result.err
    status, job = ask(box, bob, {"write": "y.txt", "text": "y\n"}, user="bob")  # bob has no quota
    assert status == 202 and ended(box, job["id"], "bob")["status"] == "done"
    assert pa.main(["policy", "alice", "-c", str(box.config)]) == 0
    assert "disk_quota_mb" in capsys.readouterr().out


def test_the_quota_counts_folders_too(tmp_path):
    """A team mate's rsync key can make folders in their mirror, and an AI in its job folder:
    each takes a block of the disk. Counted as nothing, 200,000 empty ones (800 MB) passed a
    quota of 1 MB."""
    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    for i in range(300):
        (tmp_path / "empty" / f"d{i}").mkdir(parents=True)
    os.symlink("/", tmp_path / "link")  # never followed
    folder = os.lstat(tmp_path / "empty").st_size
    assert folder > 0
    expected = 1000 + os.lstat(tmp_path / "link").st_size + sum(
        os.lstat(tmp_path / "empty" / name).st_size for name in os.listdir(tmp_path / "empty")) + folder
    assert pa.tree_size(tmp_path) == expected and expected > 300 * 1024


def test_a_job_growing_past_the_quota_is_stopped_failed_and_its_folder_reset(make_agent, tmp_path):
    box = make_agent(start=False)
    configure(box, lambda data: data.setdefault("policy", {}).update({"disk_quota_mb": 20}))
    box.start()
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"fill": ["big.bin", 30]}, {"hang": True}, timeout_s=120)
    assert status == 202, job
    info = box.wait_job(job["id"], timeout=30)  # the watchdog samples every 2 s, not the 120 s timeout
    assert info["status"] == "failed"
    assert "over their disk quota" in info["reason"] and "[policy] disk_quota_mb = 20" in info["reason"], info
    events = events_of(box, job["id"])
    assert events[-1]["type"] == "failed"  # the stream ends
    assert not (slot_dir(box, info["slot"]) / "big.bin").exists()
    # back under the quota: the next ask works
    status, job = ask(box, lap, {"write": "ok.txt", "text": "ok\n"})
    assert status == 202 and box.wait_job(job["id"])["status"] == "done"


def test_the_quota_counts_the_ai_home_and_what_the_jobs_keep(make_agent, tmp_path):
    """Two places a user's jobs fill the disk outside the job folder: the AI home (a setup
    command or the AI writes there; it was measured once, at the start) and the store (a job
    keeps its patch, prompt and events until `gc`: a text file of 3 MB is a small blob in the
    user's folder, but a 3 MB patch). Both count: the job writing its home is stopped, and an
    ask after jobs whose patches fill the quota is refused."""
    box = make_agent(start=False)
    configure(box, lambda data: data.setdefault("policy", {}).update({"disk_quota_mb": 5}))
    box.start()
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"run": ["sh", "-c", "head -c 8388608 /dev/urandom > \"$HOME/fill\""], "out": "o.txt"},
                      {"hang": True}, timeout_s=120)
    assert status == 202, job
    info = box.wait_job(job["id"], timeout=30)
    assert info["status"] == "failed" and "over their disk quota" in info["reason"], info
    (box.state_dir / "users/alice/home/fill").unlink()  # the user's to clear (their home is theirs)
    text = {"run": ["sh", "-c", "yes 'a line of text' | head -c 3145728 > big.txt"], "out": "o.txt"}
    for _ in range(2):
        status, job = ask(box, lap, text)
        if status != 202:
            break
        assert box.wait_job(job["id"], timeout=60)["status"] == "done"
    assert status == 507 and job["code"] == "quota", job
    assert job["used_bytes"] > 5 * MIB and pa.tree_size(box.state_dir / "users/alice") < 5 * MIB


# ------------------------------------------------------------------ a full disk


def test_a_job_filling_the_disk_ends_failed_and_the_other_users_ask_again(make_agent, tmp_path, small_disk):
    box = make_agent(users=("alice", "bob"), start=False)
    configure(box, on_small_disk(small_disk))
    box.start()
    alice = synced(box, tmp_path / "a")
    bob = synced(box, tmp_path / "b", user="bob")
    # the disk fills at another step each time: while the AI writes, while git stores its file,
    # while the patch is written (that one stayed `running`: its end could not be recorded)
    fills = [[{"fill_until_full": "big.bin"}] + [{"say": f"still writing {n}"} for n in range(50)]]
    fills += [[{"random": ["big.bin", mib]}] for mib in (6, 7, 8)]
    for steps in fills:
        status, job = ask(box, alice, *steps, timeout_s=120)
        assert status == 202, job
        info = box.wait_job(job["id"], timeout=60)
        assert info["status"] == "failed" and info["reason"], info
        assert events_of(box, job["id"])[-1]["type"] == "failed"  # the stream ends
        assert not (slot_dir(box, info["slot"]) / "big.bin").exists()
        status, job = ask(box, bob, {"write": "b.txt", "text": "b\n"}, user="bob")
        assert status == 202, job
        assert ended(box, job["id"], "bob")["status"] == "done"


def test_gc_frees_a_full_disk_and_the_database_shrinks(make_agent, tmp_path, small_disk):
    box = make_agent(start=False)
    configure(box, on_small_disk(small_disk, jobs={"max_output_mb": 100}))  # no cap: the db fills the disk
    box.start()
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"lines": [40000, 1000]}, timeout_s=120)
    info = box.wait_job(job["id"], timeout=120)
    assert info["status"] == "failed" and "disk is full" in info["reason"], info  # recorded on a full disk
    assert events_of(box, job["id"])[-1]["type"] == "failed"
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize < 4 * MIB
    db_before = stored_bytes(box)
    assert db_before > 10 * MIB
    gc = subprocess.run(program_argv("patchwire-agent") + ["gc", "-c", str(box.config), "--older-than", "0d",
                                                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert gc.returncode == 0, gc.stderr.decode()
    report = json.loads(gc.stdout)
    assert report["events"] > 5000 and not report.get("compact_error"), report
    assert report["db_bytes"] > 10 * MIB
    assert stored_bytes(box) < db_before - 10 * MIB  # the file itself shrank
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize > 10 * MIB
    status, job = ask(box, lap, {"write": "again.txt", "text": "again\n"})
    assert status == 202, job
    assert box.wait_job(job["id"])["status"] == "done"



def test_the_box_commands_open_the_state_on_a_disk_full_to_the_last_byte(make_agent, tmp_path, small_disk):
    """`status`, `usage` and `gc` open the state database on a disk with not one byte free (gc is
    how a box admin frees one). sqlite opens a write transaction for `PRAGMA auto_vacuum` even
    on a database that has it set already, and that failed with "database or disk is full"."""
    box = make_agent(start=False)
    configure(box, on_small_disk(small_disk))
    box.start()
    lap = synced(box, tmp_path)
    status, job = ask(box, lap, {"write": "a.txt", "text": "a\n"})
    assert status == 202 and box.wait_job(job["id"])["status"] == "done"
    filler = fill_disk(small_disk)
    config = ["-c", str(box.config)]
    for argv in (["status", "--json"], ["usage", "--json"], ["gc", "--older-than", "0d", "--json"]):
        run = subprocess.run(program_argv("patchwire-agent") + argv + config, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        assert run.returncode == 0 and b"Traceback" not in run.stderr, (argv, run.stderr.decode())
        assert json.loads(run.stdout), argv
    filler.unlink()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
