"""Running the agent as a service an admin can watch (issue 12): the systemd unit and launchd
plist, graceful shutdown, `status` and `gc`, all against the real agent process."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess

from conftest import AgentProcess, Laptop, ask_body, make_repo, pid_alive, script, wait_until
import patchwire_agent
from test_usage import post, usage, wait_job


def wait_exit(box: AgentProcess, timeout: float = 30) -> int:
    code = box.proc.wait(timeout=timeout)
    box.log.close()
    return code


# ------------------------------------------------------------------ service definitions


def test_systemd_unit_verifies_installs_and_its_command_serves(make_agent, tmp_path, neutral_env):
    box = make_agent(start=False, server={"shutdown_grace_s": 45})
    unit = box.cli("service", "--systemd", check=0).stdout
    lines = unit.splitlines()
    assert {"Restart=on-failure", "KillMode=mixed", "TimeoutStopSec=60", "WantedBy=default.target"} <= set(lines)
    if shutil.which("systemd-analyze"):
        folder = tmp_path / "unit"
        (folder / "run").mkdir(parents=True, mode=0o700)
        (folder / "patchwire-agent.service").write_text(unit)
        # a user manager needs a runtime folder; verify warns (exit 0) on keys it ignores
        verify = subprocess.run(["systemd-analyze", "verify", "--user", str(folder / "patchwire-agent.service")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                                env={**os.environ, "XDG_RUNTIME_DIR": str(folder / "run")})
        assert verify.returncode == 0 and "patchwire-agent.service" not in verify.stderr, verify.stderr
    # the unit's own command line starts the agent with this config
    exec_start = next(l for l in lines if l.startswith("ExecStart=")).split("=", 1)[1]
    argv = shlex.split(exec_start)
    assert argv[-3:] == ["serve", "-c", str(box.config)]
    box.program = argv[:-3]
    box.start()
    assert box.request("GET", "/v1/health")[0] == 200
    box.stop()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    installed = box.cli("service", "--systemd", "--install", env=env, check=0)
    target = neutral_env / ".config" / "systemd" / "user" / "patchwire-agent.service"
    assert target.read_text() == unit
    assert installed.stdout.strip() == ("systemctl --user daemon-reload && "
                                        "systemctl --user enable --now patchwire-agent.service")
    assert f"wrote {target}" in installed.stderr
    assert f"replaced {target}" in box.cli("service", "--systemd", "--install", env=env, check=0).stderr


def test_a_system_unit_runs_as_this_user_and_is_roots_to_install(make_agent, tmp_path):
    box = make_agent(start=False)
    unit = box.cli("service", "--systemd", "--system", check=0).stdout
    user = subprocess.run(["id", "-un"], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    assert f"User={user}" in unit.splitlines() and "WantedBy=multi-user.target" in unit.splitlines()
    if shutil.which("systemd-analyze"):
        (tmp_path / "patchwire-agent.service").write_text(unit)
        verify = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "patchwire-agent.service")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert verify.returncode == 0 and "patchwire-agent.service" not in verify.stderr, verify.stderr
    refused = subprocess.run(box.program + ["service", "-c", str(box.config), "--systemd", "--system", "--install"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert refused.returncode == 2 and "| sudo tee /etc/systemd/system/patchwire-agent.service" in refused.stderr
    assert not refused.stdout
    plist = plistlib.loads(subprocess.run(box.program + ["service", "-c", str(box.config), "--launchd", "--system"],
                                          stdout=subprocess.PIPE, check=True, timeout=60).stdout)
    assert plist["UserName"] == user


def test_launchd_plist_parses_and_installs(make_agent, neutral_env):
    box = make_agent(start=False)
    plist = plistlib.loads(subprocess.run(box.program + ["service", "-c", str(box.config), "--launchd"],
                                          stdout=subprocess.PIPE, check=True, timeout=60).stdout)
    assert plist["Label"] == "dev.patchwire.agent"
    assert plist["ProgramArguments"][-3:] == ["serve", "-c", str(box.config)]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"] == str(neutral_env / "Library" / "Logs" / "patchwire-agent.log")
    assert plist["EnvironmentVariables"]["PATH"] == os.environ["PATH"]
    installed = box.cli("service", "--launchd", "--install", check=0)
    target = neutral_env / "Library" / "LaunchAgents" / "dev.patchwire.agent.plist"
    assert plistlib.loads(target.read_bytes()) == plist
    assert installed.stdout.strip() == f"launchctl bootstrap gui/$(id -u) {target}"


def test_service_needs_a_kind(make_agent):
    box = make_agent(start=False)
    proc = subprocess.run(box.program + ["service", "-c", str(box.config)], stderr=subprocess.PIPE,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "one of the arguments --systemd --launchd is required" in proc.stderr


def test_systemd_words_are_quoted():
    assert patchwire_agent.systemd_quote("/opt/bin/python3") == "/opt/bin/python3"
    assert patchwire_agent.systemd_quote("/my box/100%$HOME") == '"/my box/100%%$$HOME"'


# ------------------------------------------------------------------ graceful shutdown


def test_sigterm_lets_a_running_job_finish_and_queued_jobs_wait(make_agent):
    box = make_agent(jobs={"workers": 1}, server={"shutdown_grace_s": 30})
    running = post(box, "alice", script({"say": "working"}, {"sleep": 1.5}, {"write": "r.txt", "text": "r\n"}))
    queued = post(box, "alice", script({"write": "q.txt", "text": "q\n"}))
    wait_job(box, "alice", running, until=("running",))
    box.proc.send_signal(signal.SIGTERM)
    assert wait_exit(box) == 0
    assert "waiting up to 30 s for 1 running job(s)" in box.read_log()
    assert "Traceback" not in box.read_log()
    box.start()
    assert box.json("GET", f"/v1/jobs/{running}")[1]["status"] == "done"
    assert b"+r" in box.request("GET", f"/v1/jobs/{running}/diff")[2]
    # the queued job did not start during the shutdown; it runs after the restart
    events = [e["type"] for e in box.events(queued)]
    assert "started" not in events[:events.index("queued") + 1]
    assert wait_job(box, "alice", queued)["status"] == "done"


def test_sigterm_cancels_what_outlives_the_grace_time(make_agent, tmp_path):
    box = make_agent(server={"shutdown_grace_s": 1})
    pidfile = tmp_path / "pids"
    job = post(box, "alice", script({"hang": True, "pidfile": str(pidfile)}))
    wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"), what="the AI to start")
    box.proc.send_signal(signal.SIGTERM)
    assert wait_exit(box) == 0
    leader, child = map(int, pidfile.read_text().split())
    wait_until(lambda: not pid_alive(leader) and not pid_alive(child), what="the AI's processes to end")
    box.start()
    info = box.json("GET", f"/v1/jobs/{job}")[1]
    assert info["status"] == "cancelled"
    assert "did not finish within 1 s ([server] shutdown_grace_s)" in info["reason"]


def test_a_second_signal_cancels_at_once(make_agent):
    box = make_agent(server={"shutdown_grace_s": 600})
    job = post(box, "alice", script({"hang": True}))
    wait_job(box, "alice", job, until=("running",))
    box.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "signal again to cancel them now" in box.read_log(), what="the agent to say it waits")
    box.proc.send_signal(signal.SIGINT)
    assert wait_exit(box, timeout=20) == 0
    box.start()
    assert box.json("GET", f"/v1/jobs/{job}")[1]["status"] == "cancelled"


def test_ctrl_c_in_a_pipeline_lets_the_running_job_finish(make_agent):
    """`patchwire-agent serve 2>&1 | tee log`, then Ctrl-C: the terminal sends SIGINT to the
    whole pipeline, so the reader of the agent's output dies first and every later line the
    agent writes meets a broken pipe; the agent must still wait for the running job."""
    box = make_agent(start=False, jobs={"workers": 1}, server={"shutdown_grace_s": 30})
    command = " ".join(map(shlex.quote, box.program + ["serve", "-c", str(box.config)]))
    shell = subprocess.Popen(["sh", "-c", f"{command} 2>&1 | cat"], stdout=subprocess.PIPE,
                             env=box.env, start_new_session=True)
    try:
        line = shell.stdout.readline().decode()
        assert "listening on " in line, line
        box.url = line.split("listening on ")[1].strip()
        pid = json.loads((box.state_dir / "agent.json").read_text())["pid"]
        job = post(box, "alice", script({"sleep": 1.5}, {"write": "r.txt", "text": "r\n"}))
        wait_job(box, "alice", job, until=("running",))
        os.killpg(shell.pid, signal.SIGINT)
        wait_until(lambda: not pid_alive(pid), what="the agent to stop")
    finally:
        shell.stdout.close()
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    box.start()
    info = box.json("GET", f"/v1/jobs/{job}")[1]
    assert info["status"] == "done", info


# ------------------------------------------------------------------ status and gc


def test_status_shows_jobs_by_user_uptime_and_disk(make_agent):
    box = make_agent(users=("alice", "bob"), jobs={"workers": 1})
    wait_job(box, "alice", post(box, "alice", script({"write": "a.txt", "text": "a" * 5000})))
    hung = post(box, "alice", script({"hang": True}), "second")
    wait_job(box, "alice", hung, until=("running",))  # before bob asks: the fair queue would serve him first
    queued = post(box, "bob", script({"say": "later"}))
    report = json.loads(box.cli("status", "--json", check=0).stdout)
    assert (report["running"], report["pid"], report["url"]) == (True, box.proc.pid, box.url)
    assert report["uptime_s"] >= 0 and (report["workers"], report["slots"]) == (1, 2)
    assert {u: (v["running"], v["queued"], v["removed"]) for u, v in report["users"].items()} == {
        "alice": (1, 0, False), "bob": (0, 1, False)}
    assert report["users"]["alice"]["disk_bytes"] > 5000  # the first job's files and patch
    assert report["state_bytes"] >= sum(u["disk_bytes"] for u in report["users"].values())
    text = box.cli("status", check=0).stdout
    assert f"agent: running, pid {box.proc.pid}, up 0h 0m, {box.url}" in text
    assert re.search(r"^alice +1 +0 +\d", text, re.M) and re.search(r"^bob +0 +1 +\d", text, re.M)
    assert [(j["id"], j["status"]) for j in report["jobs"]] == [(hung, "running"), (queued, "queued")]
    assert re.search(rf"^  {hung}  running +\d+s  alice/second$", text, re.M)
    box.stop()
    text = box.cli("status", check=0).stdout
    assert "agent: not running" in text
    assert re.search(r"^bob +0 +1 +\d", text, re.M)  # still queued: it runs after the restart
    box.start()
    assert wait_job(box, "bob", queued)["status"] == "done"


def sizes(paths) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for p in paths for d, _, fs in os.walk(p) for f in fs)


def test_gc_frees_what_it_says_and_keeps_what_it_must(make_agent):
    box = make_agent(jobs={"workers": 1})
    old = [post(box, "alice", script({"write": "a.txt", "text": "a\n" * 300}), "a"),
           post(box, "alice", script({"write": "b.txt", "text": "b\n"}), "b")]
    for job in old:
        wait_job(box, "alice", job)
    hung = post(box, "alice", script({"hang": True}), "c")
    wait_job(box, "alice", hung, until=("running",))
    queued = post(box, "alice", script({"write": "q.txt", "text": "q\n"}), "b")
    patches = [box.state_dir / "patches" / f"{job}.patch" for job in old]
    patch_bytes = sum(p.stat().st_size for p in patches)
    usage_before = usage(box)[1]["total"]

    projects = box.state_dir / "users" / "alice" / "projects"
    folders = {p: projects / p / "slots" / "slot0" for p in ("a", "b", "c")}
    folder_bytes = sizes([folders["a"]])
    dry = box.cli("gc", "--older-than", "0s", "--dry-run", check=0)
    assert dry.stdout.startswith("would free: 2 patch(es)") and all(p.exists() for p in patches)
    assert all(f.is_dir() for f in folders.values())

    # while the server runs: the running job's folder (c) and the queued one's (b) stay
    freed = json.loads(box.cli("gc", "--older-than", "0s", "--json", check=0).stdout)
    assert (freed["jobs"], freed["patches"], freed["patch_bytes"]) == (2, 2, patch_bytes)
    assert freed["events"] > 0 and freed["folders_busy"] == []
    assert (freed["job_folders"], freed["folder_bytes"]) == ([str(folders["a"])], folder_bytes)
    assert not any(p.exists() for p in patches) and not folders["a"].exists()
    assert folders["b"].is_dir() and folders["c"].is_dir()
    status, answer = box.json("GET", f"/v1/jobs/{old[0]}/diff")
    assert (status, answer["code"]) == (410, "pruned")
    assert box.events(old[0]) == [] and box.json("GET", f"/v1/jobs/{old[0]}")[1]["status"] == "done"
    assert [e["type"] for e in box.events(hung)][-1] in ("text", "session", "started")
    assert [e["type"] for e in box.events(queued)] == ["queued"]
    assert usage(box)[1]["total"] == usage_before  # the jobs, and so their usage, stay

    # the hung job is cancelled at the stop: its folder goes too, unless a worker holds it
    box.stop()
    with patchwire_agent.job_folders_lock(folders["c"].parent.parent):  # as a worker does
        busy = json.loads(box.cli("gc", "--older-than", "0s", "--json", check=0).stdout)
    assert busy["folders_busy"] == ["alice/c"] and busy["job_folders"] == [] and folders["c"].is_dir()
    freed = json.loads(box.cli("gc", "--older-than", "0s", "--json", check=0).stdout)
    assert freed["job_folders"] == [str(folders["c"])] and freed["patches"] == 0
    assert not folders["c"].exists() and folders["b"].is_dir()

    # after the restart the queued job runs, and a pruned project's folder is rebuilt
    box.start()
    assert wait_job(box, "alice", queued)["status"] == "done"
    again = post(box, "alice", script({"write": "a2.txt", "text": "again\n"}), "a")
    assert wait_job(box, "alice", again)["status"] == "done"
    assert b"+again" in box.request("GET", f"/v1/jobs/{again}/diff")[2]
    # nothing is older than a day: such a gc frees nothing
    lines = box.cli("gc", "--older-than", "1d", check=0).stdout.splitlines()
    assert lines[0].startswith("freed: 0 patch(es), 0 B, and 0 event(s) of 0 job(s) finished before ")
    assert lines[1:] == ["freed: 0 job folder(s), 0 B"]


def store_refs(store) -> list:
    out = subprocess.run(["git", "--git-dir", str(store), "for-each-ref", "--format=%(refname)", "refs/patchwire/"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_gc_drops_old_results_from_the_store_and_the_next_ask_still_builds_on_the_snapshot(make_agent, tmp_path):
    """Each job's result stayed in its project's store for good (a ref per job). gc drops the
    refs of the jobs it prunes, so git's upkeep frees their objects; the last snapshot keeps a
    ref of its own, so the upkeep never takes a blob the next ask builds on (the job folders,
    whose indexes also hold them, may be gone)."""
    box = make_agent(jobs={"workers": 1})
    lap = Laptop(make_repo(tmp_path / "laptop", {"README.md": b"# app\n", "src/app.py": b"x = 1\n"}))
    lap.init(box)
    lap.run("sync", check=0)
    status, job = box.json("POST", "/v1/ask", ask_body(lap, script({"write": "one.txt", "text": "only in the result\n"})))
    assert status == 202, job
    first = box.wait_job(job["id"])
    assert first["status"] == "done", first
    store = box.state_dir / "users" / "alice" / "projects" / "laptop" / "git"
    assert store_refs(store) == [f"refs/patchwire/jobs/{first['id']}", "refs/patchwire/snapshot"]

    dry = json.loads(box.cli("gc", "--older-than", "0s", "--dry-run", "--json", check=0).stdout)
    assert dry["results"] == 1 and len(store_refs(store)) == 2
    freed = box.cli("gc", "--older-than", "0s", check=0)
    assert ("dropped the stored results of 1 job(s) from their projects' stores: git frees what only they "
            "held at the store's next upkeep") in freed.stdout, freed.stdout
    assert store_refs(store) == ["refs/patchwire/snapshot"]
    assert not (store.parent / "slots" / "slot0").exists()  # no job since: its folder went too
    # the store's upkeep, however late (what only the dropped result held is older than its grace)
    subprocess.run(["git", "--git-dir", str(store), "-c", "gc.pruneExpire=now", "gc", "--quiet"], check=True)
    gone = subprocess.run(["git", "--git-dir", str(store), "cat-file", "-e", first["result"]["result_commit"]])
    assert gone.returncode != 0  # freed

    status, answer = box.json("POST", "/v1/ask", ask_body(lap, script({"say": "more"}), **{"continue": first["id"]}))
    assert (status, answer["code"]) == (410, "pruned"), answer
    assert "ask again without --continue" in answer["hint"]

    # the next ask builds on the snapshot the box kept: README.md changed, src/app.py's blob reused
    (lap.root / "README.md").write_text("# app, edited\n")
    asked = lap.run("ask", "--yes", script({"write": "two.txt", "text": "2\n"}), check=0)
    assert (lap.root / "two.txt").read_text() == "2\n", asked.out
    assert not (lap.root / "one.txt").exists()
    fsck = subprocess.run(["git", "--git-dir", str(store), "fsck", "--connectivity-only", "--no-dangling"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
