#!/usr/bin/env python3
"""Warm `patchwire ask` against the script a user would write, per project size, local and over
SSH; where one ask's time goes; queue throughput; AI line -> client latency; the coloured
preview, start-up, and the agent's memory. Writes bench/RESULTS.md (its Notes part is kept).

    python3 bench/ask.py                    # everything: 200, 2,000, 20,000 files, 5 rounds (many minutes)
    python3 bench/ask.py --big              # also 100,000 files
    bash bench/real_project.sh /tmp/real && python3 bench/ask.py --big --real /tmp/real   # with the first ask
    bash build.sh && python3 bench/ask.py --big --zipapp dist/patchwire-agent   # RESULTS.md's run:
                                            # the agent's memory and streams from the shipped zipapp
    python3 bench/ask.py --sizes 200 --repeat 3 --no-write   # a quick look
    python3 bench/ask.py --only streams,memory --zipapp dist/patchwire-agent   # prints only
    python3 bench/ask.py --quick            # the smoke run of tests/test_bench.py

Parts (`--only`, comma-separated; all by default):
    asks       warm asks per size against the natural script below, with the laptop side's peak
               memory (GNU time's maximum resident set, the CLI or the script's shell with every
               process each waited for); a no-change sync against the script's rsync
    switch     a branch switch: two branches of a --switch-size (20,000) file project, a tenth of the
               files changed, a fortieth deleted and as many added; each round switches, then asks
    first      the first ask on an empty box of a real project (--real DIR; bench/real_project.sh
               DIR makes the 43,734-file npm tree RESULTS.md names): a new agent and a new box
               folder each round
    breakdown  one warm ask of a --breakdown-size (20,000) file project, one file changed: the
               laptop CLI under cProfile, its steps found by function name (scan, record, rsync,
               POST, stream, diff, vet, preview, apply; n/a when a name is gone), and the agent's
               side: its POST /v1/ask audit line (body_ms, queued_ms) and the job's step times
               (the `timings` of its `finished` event: setup, prepare, links, ai, collect, patch)
    queue      --queue-asks (40) asks from 4 users, POSTed by threads replaying the body the CLI
               sent, against [jobs] workers = 1 then 2, with an instant AI and a 100 ms one
    preview    render_diff of a 10,000-line rewrite, coloured and not
    laptop     bench/startup.py as it runs alone: Enter -> AI start at 200 files, the zipapps' start-up
               per Python, the laptop's peak memory of a warm ask at 100,000 files
    apply      bench/apply.py as it runs alone: preview and apply of a 1,000-file, 50 MB patch against
               git apply; the coloured preview of a 100,000-line diff against git diff --color
    startup    --version/--help from source, from cached bytecode, and with --zipapp the zipapps
    memory     agent VmRSS idle, after 1 ask and along --asks (5,000) asks (the CLI's first body replayed by
               two threads, a new prompt each), and the growth per ask; from source also from cached bytecode;
               with --zipapp from that zipapp (its first start, the one that unpacks it)
    streams    AI line -> client: the stand-in writes 200 stream-json lines 3 ms apart, each with
               its send time; 1 then 50 clients (each its own process and HTTP connection) note
               their arrival: median, p95, max; the agent's RSS with the 50 attached; and the
               same lines as the laptop CLI prints them (`patchwire ask`, its stderr)

Everything is real but the AI (tests/stand_in_claude.py, instant, edits one file): the agent
process on 127.0.0.1:0, rsync, git, and for the SSH rows a real sshd on loopback (tests/sshd.py)
reached through a ControlMaster by both sides. Each round, the user changes one file, then
Patchwire and the baseline run one after the other (the order alternates); figures are medians
with min and max of the same invocation, ratios the median of each round's ratio. Speed is never
asserted: see RESULTS.md.

The baseline is the natural script, what a user really writes (the "box" is a folder, or over
ssh through the same ControlMaster as Patchwire for the SSH rows; one remote command, so one
shell start-up, per ask):
    rsync -a --delete --exclude=.git ./ BOX:mirror/ &&
    ssh BOX 'cd mirror && git add -A && git commit -qm s && claude -p "..." && git add -A &&
             git diff --cached --binary -M HEAD && git reset -q --hard' > p && git apply p
(An earlier baseline fed `git ls-files | rsync --files-from=-`, 2.2x slower than this at 20,000
files: a baseline slower than what a user writes flatters Patchwire.) Its `git commit` may leave
a `git gc --auto` running in the background (a first commit of many files starts one): the bench
waits for it after the warm-up and between rounds, untimed (Baseline.settle), as its own box
would run it after the ask, not beside the next one of both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import patchwire as pw  # noqa: E402
from conftest import STAND_IN_COMMAND, AgentProcess, Laptop, script  # noqa: E402
from prepare import project_files, write_files  # noqa: E402

NOTES = "## Notes (written by hand; the bench keeps this part)"
NESTED_GITIGNORE = {"lib/.gitignore": b"*.g.dart\n*.freezed.dart\n", "assets/.gitignore": b"*.tmp\n"}


# ================================================================== helpers


def git(cwd: Path, *args: str, input: Optional[bytes] = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, input=input, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def spread(values: Sequence[float], unit: float = 1.0, fmt: str = "{:.2f}") -> str:
    """median (min-max)."""
    v = [x * unit for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def make_project(root: Path, count: int) -> None:
    """The synthetic Flutter-like project of bench/prepare.py, nested .gitignore files, some
    ignored files, committed."""
    files = project_files(count)
    files.update(NESTED_GITIGNORE)
    write_files(root, files)
    write_files(root, {"lib/x.g.dart": b"// generated\n", "build/out.bin": os.urandom(4096)})
    git(root, "init", "-q")
    git(root, "-c", "user.email=b@b", "-c", "user.name=b", "add", "-A")
    git(root, "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "base")


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of the per-round ratios a[i] / b[i] (rounds interleaved, so each pair shared
    the machine's state): steadier than a ratio of medians on a busy machine."""
    return statistics.median(x / y for x, y in zip(a, b))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ================================================================== the two ways to ask


class Baseline:
    """The hand-written script. `ssh` is None for a local box (a folder)."""

    def __init__(self, laptop: Path, box: Path, ssh: Optional[List[str]]):
        self.laptop, self.box, self.ssh = laptop, box, ssh
        box.mkdir(parents=True, exist_ok=True)
        git(box, "init", "-q")
        git(box, "config", "user.email", "b@b")
        git(box, "config", "user.name", "b")

    def rsync(self) -> List[str]:
        dest = f"{self.ssh[-1]}:{self.box}/" if self.ssh else f"{self.box}/"
        return ["rsync", "-a", "--delete", "--exclude=.git", *(["-e", shlex.join(self.ssh[:-1])] if self.ssh else []),
                "./", dest]

    def command(self, prompt: str) -> str:
        """The script as a user writes it: one line of shell on the laptop, one remote command.
        (rsync's quick check skips a file of the same size and mtime: the rounds' AI answers
        differ in size, or the script would send a stale file, as it would for a user.)"""
        claude = shlex.join(STAND_IN_COMMAND)
        remote = (f"cd {shlex.quote(str(self.box))} && git add -A && git commit -qm s --allow-empty && "
                  f"printf %s {shlex.quote(prompt)} | {claude} -p >/dev/null && git add -A && "
                  f"git diff --cached --binary -M HEAD && git reset -q --hard")
        box = shlex.join([*self.ssh, remote]) if self.ssh else f"sh -c {shlex.quote(remote)}"
        return f"{shlex.join(self.rsync())} >/dev/null && {box} > .git/p && git apply .git/p"

    def ask(self, prompt: str) -> float:
        """One ask; the laptop side's peak RSS in kB."""
        return run_peak(["sh", "-c", self.command(prompt)], self.laptop)

    def settle(self, timeout_s: float = 600) -> None:
        """Wait, untimed, for the `git gc --auto` the script's `git commit` may have left running
        in the background (git detaches it; a first commit of 43,737 or 100,000 files starts
        one): on a box of its own it would slow the box after the ask, here it would slow the
        next rounds of both sides and the next parts of the run."""
        deadline = time.monotonic() + timeout_s
        while (self.box / ".git" / "gc.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def run_peak(argv: Sequence[str], cwd: Path, env: Optional[dict] = None) -> float:
    """Run `argv` to its end (a failure raises, with the end of its stderr); its peak RSS in kB:
    the largest of it and of every process it waited for, as GNU time reports it (nan without
    /usr/bin/time). Not wait4 here: a child forked from this big Python process starts with its
    high-water mark, which exec keeps."""
    with tempfile.NamedTemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        timer = ["/usr/bin/time", "-f", "%M", "-o", peak.name] if os.path.exists("/usr/bin/time") else []
        proc = subprocess.run([*timer, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err)
        if proc.returncode:
            err.seek(0)
            tail = err.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"{' '.join(argv[:4])}: exit {proc.returncode}\n{tail}")
        figure = Path(peak.name).read_text().strip().splitlines()
        return float(figure[-1]) if timer and figure else float("nan")


LAPTOP_PROGRAM: List[List[str]] = []  # the laptop CLI as shipped (--zipapp's dist/patchwire), else source


def user_laptop(root: Path) -> Laptop:
    """The laptop CLI a user runs: the built zipapp with --zipapp (as shipped: bytecode cached
    after its first start), else this checkout's patchwire.py."""
    return Laptop(root, program=LAPTOP_PROGRAM[0] if LAPTOP_PROGRAM else None)


def patchwire_ask(lap: Laptop, prompt: str) -> float:
    """One `patchwire ask --yes`; its peak RSS in kB (with the git and rsync it ran)."""
    return run_peak([*lap.program, "ask", "--yes", "--no-color", prompt], lap.root, lap.env)


def script_ssh(ssh_server, tmp: Path) -> List[str]:
    """The natural script's ssh: the same options and a ControlMaster, as Patchwire's."""
    return ["ssh", *ssh_server.ssh_options, "-o", "ControlMaster=auto", "-o", f"ControlPath={tmp}/cm-%C",
            "-o", "ControlPersist=120", ssh_server.alias]


def over_ssh(lap: Laptop, agent: AgentProcess, ssh_server) -> Optional[List[str]]:
    """Point the laptop's project at `agent` with its files synced over SSH to the loopback sshd;
    the natural script's ssh command. Without a server (a quick run): local, None."""
    if ssh_server is None:
        return None
    lap.run("init", "--force", "--agent", agent.url, "--token-file", str(agent.token_file()),
            "--ssh", ssh_server.alias, check=0)
    path = lap.root / ".patchwire.toml"
    text = path.read_text()
    if "[sync]" not in text:
        text += "\n[sync]\n"
    path.write_text(text.replace("[sync]\n", "[sync]\nssh_options = " + json.dumps(ssh_server.ssh_options) + "\n", 1))
    lap.run("trust", check=0)  # the ssh options added by hand, trusted as their user would
    return script_ssh(ssh_server, lap.root.parent)


# ================================================================== warm asks per size


def run_size(tmp: Path, count: int, repeat: int, ssh_server, stack: ExitStack) -> Dict[str, List[float]]:
    """{"pw local": [...], "base local": [...], ("pw ssh", "base ssh" when ssh_server)} seconds."""
    root = tmp / f"p{count}"
    make_project(root, count)
    agent = AgentProcess(tmp / f"agent{count}", STAND_IN_COMMAND).start()
    stack.callback(agent.stop)
    lap = user_laptop(root)
    lap.init(agent)
    modes = [("local", None)]
    if ssh_server is not None:
        modes.append(("ssh", script_ssh(ssh_server, tmp)))
    out: Dict[str, List[float]] = {}
    for mode, ssh in modes:
        if ssh:
            over_ssh(lap, agent, ssh_server)
        base = Baseline(root, tmp / f"box{count}-{mode}", ssh)
        patchwire_ask(lap, script({"write": f"ai_pw_{mode}.txt", "text": "warm-up\n"}))  # cold sync
        base.ask(script({"write": f"ai_base_{mode}.txt", "text": "warm-up\n"}))
        base.settle()
        pw_t, base_t = [], []
        peaks: Dict[str, List[float]] = {"pw": [], "base": []}
        for r in range(repeat):
            (root / "lib" / "user_edit.dart").parent.mkdir(parents=True, exist_ok=True)
            (root / "lib" / "user_edit.dart").write_text(f"// the user's edit {mode} {r}\n")
            runs = [("pw", lambda: patchwire_ask(lap, script({"write": f"ai_pw_{mode}.txt", "text": f"round {r}\n" * (r + 2)}))),
                    ("base", lambda: base.ask(script({"write": f"ai_base_{mode}.txt", "text": f"round {r}\n" * (r + 2)})))]
            for name, func in (runs if r % 2 == 0 else runs[::-1]):
                start = time.perf_counter()
                peaks[name].append(func())
                (pw_t if name == "pw" else base_t).append(time.perf_counter() - start)
            base.settle()
        out[f"pw {mode}"], out[f"base {mode}"] = pw_t, base_t
        out[f"pw {mode} peak kB"], out[f"base {mode} peak kB"] = peaks["pw"], peaks["base"]
        if not ssh:  # a sync with nothing to send, against the natural script's rsync
            bare = base.rsync()
            sync_t, rsync_t = [], []
            for _ in range(repeat):
                sync_t.append(timed(lambda: lap.run("sync", check=0)))
                rsync_t.append(timed(lambda: subprocess.run(bare, cwd=root, check=True)))
            out["pw sync"], out["bare rsync"] = sync_t, rsync_t
            print(f"  {count:>7,} files no-change sync: patchwire {spread(sync_t)} s, "
                  f"bare rsync {spread(rsync_t)} s", flush=True)
        print(f"  {count:>7,} files {mode:5}: patchwire {spread(pw_t)} s, baseline {spread(base_t)} s", flush=True)
    out["agent rss kB"] = [float(rss_kb(agent.proc.pid))]
    return out


# ================================================================== a branch switch, a first ask


def make_branch(root: Path, changed: int, deleted: int, added: int) -> None:
    """Branch `other` of the committed project at `root`: `changed` files edited (a line added
    mid-file), `deleted` removed and `added` new ones; `main` checked out again."""
    tracked = sorted(p for p in git(root, "ls-files", "-z").decode().split("\0") if p.endswith(".dart"))
    git(root, "checkout", "-qb", "other")
    for i, path in enumerate(tracked[:changed]):
        f = root / path
        lines = f.read_bytes().split(b"\n")
        lines.insert(len(lines) // 2, f"  // the other branch's line {i}".encode())
        f.write_bytes(b"\n".join(lines))
    for path in tracked[changed:changed + deleted]:
        (root / path).unlink()
    for i in range(added):
        f = root / "lib" / "other" / f"part_{i // 50:02d}" / f"added_{i}.dart"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"// added on the other branch {i}\nclass Added{i} {{}}\n" + "// padding line\n" * 60)
    git(root, "-c", "user.email=b@b", "-c", "user.name=b", "add", "-A")
    git(root, "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "other")
    git(root, "checkout", "-q", "main")


def switch_figures(tmp: Path, count: int, repeat: int, ssh_server, stack: ExitStack) -> Dict[str, List[float]]:
    """Each round the user switches branch (main <-> other), then asks, both ways interleaved:
    each pays the whole switch (each has its own box)."""
    root = tmp / f"switch{count}"
    make_project(root, count)
    git(root, "branch", "-M", "main")
    make_branch(root, count // 10, count // 40, count // 40)
    agent = AgentProcess(tmp / f"agent-switch{count}", STAND_IN_COMMAND).start()
    stack.callback(agent.stop)
    lap = user_laptop(root)
    lap.init(agent)
    ssh = over_ssh(lap, agent, ssh_server)
    base = Baseline(root, tmp / f"box-switch{count}", ssh)
    patchwire_ask(lap, script({"write": "ai_pw.txt", "text": "warm-up\n"}))
    base.ask(script({"write": "ai_base.txt", "text": "warm-up\n"}))
    base.settle()
    out: Dict[str, List[float]] = {"pw": [], "base": []}
    for r in range(repeat):
        git(root, "checkout", "-q", "other" if r % 2 == 0 else "main")
        runs = [("pw", lambda: patchwire_ask(lap, script({"write": "ai_pw.txt", "text": f"round {r}\n" * (r + 2)}))),
                ("base", lambda: base.ask(script({"write": "ai_base.txt", "text": f"round {r}\n" * (r + 2)})))]
        for name, func in (runs if r % 2 == 0 else runs[::-1]):
            out[name].append(timed(func))
        base.settle()
    print(f"  branch switch at {count:,} files, ssh: patchwire {spread(out['pw'])} s, "
          f"baseline {spread(out['base'])} s, {ratio(out['pw'], out['base']):.2f}x", flush=True)
    return out


def real_project(tmp: Path, source: Path) -> Path:
    """A committed copy of the real project tree at `source` (bench/real_project.sh makes one)."""
    root = tmp / "real"
    subprocess.run(["cp", "-a", f"{source}/.", str(root)], check=True)
    if not (root / ".git").exists():
        git(root, "init", "-q")
        git(root, "-c", "user.email=b@b", "-c", "user.name=b", "add", "-A")
        git(root, "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "real")
    return root


def first_figures(tmp: Path, source: Path, repeat: int, ssh_server, stack: ExitStack) -> Dict[str, object]:
    """Each round a first ask of the real project on an empty box, both ways interleaved: a new
    agent (new mirror, no job folder) for Patchwire, a new `git init` folder for the script."""
    root = real_project(tmp, source)
    files = len(git(root, "ls-files", "-z").split(b"\0")) - 1
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and ".git" not in f.parts)
    out: Dict[str, object] = {"files": files, "bytes": size, "pw": [], "base": []}
    lap = user_laptop(root)
    for r in range(repeat):
        agent = AgentProcess(tmp / f"agent-first{r}", STAND_IN_COMMAND).start()
        stack.callback(agent.stop)
        lap.init(agent)
        ssh = over_ssh(lap, agent, ssh_server)
        base = Baseline(root, tmp / f"box-first{r}", ssh)
        runs = [("pw", lambda: patchwire_ask(lap, script({"write": "ai_pw.txt", "text": f"round {r}\n" * (r + 2)}))),
                ("base", lambda: base.ask(script({"write": "ai_base.txt", "text": f"round {r}\n" * (r + 2)})))]
        for name, func in (runs if r % 2 == 0 else runs[::-1]):
            out[name].append(timed(func))  # type: ignore[union-attr]
        agent.stop()
        base.settle()
    print(f"  first ask of the real project ({files:,} files), ssh: patchwire {spread(out['pw'])} s, "  # type: ignore[arg-type]
          f"baseline {spread(out['base'])} s, {ratio(out['pw'], out['base']):.2f}x", flush=True)  # type: ignore[arg-type]
    return out


# ================================================================== preview, start-up, memory


def preview_figures(lines: int = 10000, repeat: int = 5) -> Tuple[List[float], List[float]]:
    """(coloured, plain) seconds to render a diff of `lines` changed lines."""
    body = [b"diff --git a/f.txt b/f.txt\n", b"index 1111111..2222222 100644\n", b"--- a/f.txt\n",
            b"+++ b/f.txt\n", f"@@ -1,{lines // 2} +1,{lines // 2} @@\n".encode()]
    body += [f"-    value_{i} = compute(alpha, beta, {i * 7 % 13}, 'old text here')\n".encode() for i in range(lines // 2)]
    body += [f"+    value_{i} = compute(alpha, gamma, {i * 5 % 11}, 'new text here')\n".encode() for i in range(lines // 2)]
    files = pw.split_patch(b"".join(body))
    colour = [timed(lambda: pw.render_diff(files, pw.Style(True))) for _ in range(repeat)]
    plain = [timed(lambda: pw.render_diff(files, pw.Style(False))) for _ in range(repeat)]
    return colour, plain


def startup_figures(tmp: Path, repeat: int = 7, zipapp: Optional[Path] = None) -> Dict[str, List[float]]:
    """From source as run here (PYTHONDONTWRITEBYTECODE=1: compiled at every start), and
    imported from cached bytecode, as an installed module would be; with `zipapp`, the
    built zipapps beside it too (their first run, which unpacks them, is not timed)."""
    out = {}
    for app in ([zipapp.parent / "patchwire", zipapp] if zipapp else []):
        if app.exists():
            argv = [sys.executable, str(app), "--version"]
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
            out[f"zipapp `{app.name} --version`"] = [
                timed(lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)) for _ in range(repeat)]
    cached = {**os.environ, "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp / "pyc")}
    for args in (["--version"], ["--help"]):
        out[" ".join(args)] = [timed(lambda: subprocess.run([sys.executable, str(ROOT / "patchwire.py"), *args],
                                                            stdout=subprocess.DEVNULL, check=True))
                               for _ in range(repeat)]
        argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import patchwire; "
                                      f"sys.exit(patchwire.main({args!r}))"]
        subprocess.run(argv, stdout=subprocess.DEVNULL, env=cached)  # writes the bytecode
        out[" ".join(args) + " (cached bytecode)"] = [
            timed(lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, env=cached)) for _ in range(repeat)]
    out["python -c pass"] = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
                             for _ in range(repeat)]
    return out


def agent_memory(tmp: Path, asks: int, program: Optional[List[str]] = None) -> Dict[str, int]:
    """Agent VmRSS (kB) idle, after one ask and along `asks` asks of a 20-file project: the
    body the laptop CLI sent for its first ask, replayed with a new prompt each time by two
    threads (the laptop's own work is not what is measured: the agent's growth per ask is)."""
    root = tmp / "mem"
    make_project(root, 20)
    agent = AgentProcess(tmp / "agent-mem", STAND_IN_COMMAND, jobs={"workers": 2}, program=program).start()
    try:
        lap = user_laptop(root)
        lap.init(agent)
        idle = rss_kb(agent.proc.pid)
        body = capture_ask_body(root, script({"write": "m.txt", "text": "first\n"}))
        body.pop("files", None)  # the steady state: an ask of no change
        body = {**body, "base": body["tree"], "changed": [], "deleted": []}
        out = {"idle": idle, "after 1 ask": rss_kb(agent.proc.pid)}
        marks = sorted({m for m in (100, 500, 1000, 2000, 3000, 4000, 5000, asks) if m <= asks})
        done = [1]
        lock = threading.Lock()

        def asker(n: int) -> None:
            for i in range(n):
                status, job = agent.json("POST", "/v1/ask", {**body, "prompt": script({"write": "m.txt", "text": f"{n} {i}\n"})})
                if status != 202:
                    raise SystemExit(f"bench: ask refused: {status} {job}")
                job_end(agent, job["id"], agent.tokens["alice"])
                with lock:
                    done[0] += 1
                    if done[0] in marks:
                        out[f"after {done[0]:,} asks"] = rss_kb(agent.proc.pid)
        threads = [threading.Thread(target=asker, args=(k,)) for k in ((asks - 1) // 2, asks - 1 - (asks - 1) // 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first, last = (f"after {m:,} asks" for m in (min(marks), max(marks)))
        if max(marks) > min(marks):
            out[f"growth per ask from {min(marks):,} to {max(marks):,}, bytes"] = round(
                (out[last] - out[first]) * 1024 / (max(marks) - min(marks)))
        return out
    finally:
        agent.stop()


def percentiles(values: Sequence[float]) -> str:
    """median, p95 and max, in ms."""
    v = sorted(values)
    return (f"median {statistics.median(v) * 1000:.1f} ms, p95 {v[int(len(v) * 0.95)] * 1000:.1f} ms, "
            f"max {v[-1] * 1000:.1f} ms")


def follow_stream(agent: AgentProcess, job: str, attached, results) -> None:
    """One streaming client on its own HTTP connection (http.client, as the laptop's is):
    for each `stamp <send time>` line of the AI, when it arrived here (time.time()) against
    when the AI wrote it, and against the time the agent stored the event (ms resolution).
    Puts {"ai": [s], "store": [s], "statuses": [HTTP status]} on `results`."""
    import http.client
    host, port = agent.url.split("//")[1].rstrip("/").rsplit(":", 1)
    out: Dict[str, List[float]] = {"ai": [], "store": [], "statuses": []}
    arrived: List[Tuple[float, bytes]] = []
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", f"/v1/jobs/{job}/events", headers={
            "Authorization": "Bearer " + agent.token, "Accept": "application/x-ndjson"})
        resp = conn.getresponse()  # the agent sends its headers before it waits for events
        out["statuses"].append(resp.status)
        attached.release()
        for raw in resp:
            arrived.append((time.time(), raw))  # parsed after the stream: only the arrival is timed
    finally:
        conn.close()
        for now, raw in arrived:
            event = json.loads(raw) if raw.strip() else {}
            text = str(event.get("text", ""))
            if event.get("type") == "text" and text.startswith("stamp "):
                out["ai"].append(now - float(text[6:]))
                out["store"].append(now - event["time"])
        results.put(out)


def streaming_figures(tmp: Path, clients: Sequence[int] = (1, 50), lines: int = 200, every_s: float = 0.003,
                      program: Optional[List[str]] = None) -> Dict[object, object]:
    """AI line -> client latency, end to end: the stand-in AI writes `lines` stream-json text
    lines `every_s` apart, each carrying its own send time; `n` concurrent streaming clients
    (real HTTP) note when each line arrives. One job per entry of `clients`, against one
    agent; the agent's RSS while the most clients are attached."""
    root = tmp / "streams"
    make_project(root, 20)
    # all clients come from 127.0.0.1: lift the per-client cap (16) for this measurement
    agent = AgentProcess(tmp / "agent-streams", STAND_IN_COMMAND,
                         server={"max_connections_per_client": max(clients) + 8}, program=program).start()
    result: Dict[object, object] = {}
    try:
        lap = Laptop(root)
        lap.init(agent)
        for n in clients:
            gate = tmp / f"streams-gate-{n}"
            steps = [{"wait_file": str(gate), "max_s": 60}, {"stamps": lines, "every_s": every_s}]
            ask = subprocess.Popen(lap.program + ["ask", "--no-apply", "--no-color", script(*steps)], cwd=root,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=lap.env)
            deadline, job = time.monotonic() + 60, None
            while job is None and time.monotonic() < deadline:
                running = [j for j in agent.json("GET", "/v1/jobs")[1]["jobs"] if j["status"] == "running"]
                job = running[0]["id"] if running else None
                time.sleep(0.02)
            if job is None:
                raise SystemExit("the streaming job did not start within 60 s")
            # each client its own process (forked), as each laptop is: the bench's own GIL
            # is not part of the figure
            ctx = multiprocessing.get_context("fork")
            attached, results = ctx.Semaphore(0), ctx.Queue()
            procs = [ctx.Process(target=follow_stream, args=(agent, job, attached, results), daemon=True)
                     for _ in range(n)]
            for proc in procs:
                proc.start()
            for _ in range(n):
                attached.acquire(timeout=30)
            if n == max(clients):
                result["rss with streams kB"] = rss_kb(agent.proc.pid)
            cpu = cpu_seconds(agent.proc.pid)
            gate.write_text("go\n")  # the AI starts writing its lines
            out: Dict[str, List[float]] = {"ai": [], "store": [], "statuses": []}
            for _ in range(n):
                for key, values in results.get(timeout=120).items():
                    out[key] += values
            cpu = cpu_seconds(agent.proc.pid) - cpu
            for proc in procs:
                proc.join(10)
            ask.wait(60)
            statuses = out["statuses"]
            result[n] = {"ai": out["ai"], "store": out["store"], "expected": n * lines, "cpu": cpu,
                         "streams": f"{statuses.count(200)} of {n} streams answered 200"
                                    + (f" (others: {sorted(set(statuses) - {200})})" if set(statuses) - {200} else "")}
        result["cli"] = cli_latency(lap, lines, every_s)
    finally:
        agent.stop()
    return result


def cli_latency(lap: Laptop, lines: int, every_s: float) -> Dict[str, object]:
    """The same lines through the laptop CLI: `patchwire ask` prints each AI text line on
    stderr ("   0.1s stamp <send time>"); the delay is to when that line arrives here."""
    steps = [{"sleep": 0.3}, {"stamps": lines, "every_s": every_s}]
    ask = subprocess.Popen(lap.program + ["ask", "--no-apply", "--no-color", script(*steps)], cwd=lap.root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=lap.env)
    delays: List[float] = []
    for raw in ask.stderr:  # type: ignore[union-attr]
        now = time.time()
        text = raw.decode("utf-8", "replace")
        if " stamp " in text:
            delays.append(now - float(text.rsplit(" stamp ", 1)[1]))
    ask.wait(60)
    return {"ai": delays, "expected": lines, "exit": ask.returncode}


def capture_ask_body(root: Path, prompt: str) -> dict:
    """The body the laptop CLI POSTs to /v1/ask, caught on its way out of a real
    `patchwire ask` run in this process (whatever the sync/ask protocol puts in it)."""
    clients: List[Any] = [c for c in vars(pw).values() if isinstance(c, type) and callable(getattr(c, "ask", None))
               and "body" in inspect.signature(c.ask).parameters]
    if not clients:
        raise SystemExit("bench: no client class with an ask(body) method in patchwire.py")
    caught: List[dict] = []
    originals = {c: c.ask for c in clients}

    def catching(original):
        def ask(self, body, *args, **kwargs):
            caught.append(json.loads(json.dumps(body)))
            return original(self, body, *args, **kwargs)
        return ask
    here = os.getcwd()
    try:
        for c in clients:
            c.ask = catching(originals[c])
        os.chdir(root)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = pw.main(["ask", "--no-apply", "--no-color", prompt])
    finally:
        os.chdir(here)
        for c, original in originals.items():
            c.ask = original
    if code != 0 or not caught:
        raise SystemExit(f"bench: the ask to catch its body failed ({code}): {err.getvalue()[-500:]}")
    return caught[-1]


def job_end(agent: AgentProcess, job: str, token: str, timeout: float = 600) -> dict:
    """The job once it has ended (polled: the wall time is taken from its `finished`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = agent.json("GET", f"/v1/jobs/{job}", token=token)[1]
        if info.get("status") in ("done", "failed", "cancelled"):
            return info
        time.sleep(0.05)
    raise SystemExit(f"bench: job {job} did not end within {timeout} s")


def queue_figures(tmp: Path, asks: int = 40, users: int = 4, workers: Sequence[int] = (1, 2),
                  ai_sleeps: Sequence[float] = (0.0, 0.1)) -> List[dict]:
    """Queue throughput: `asks` asks from `users` users (one thread each, POSTing as fast as
    the agent answers) against an agent with [jobs] workers = w, for each w and each AI
    duration. The bodies are those the laptop CLI sent for its last ask (caught once per
    user, then replayed with a new prompt): the laptop's own sync is not part of the figure.
    Wall time is from the first POST to the last job's `finished` (the agent's clock)."""
    names = [f"user{i}" for i in range(users)]
    out = []
    for w in workers:
        agent = AgentProcess(tmp / f"agent-queue{w}", STAND_IN_COMMAND, users=names, jobs={"workers": w}).start()
        try:
            bodies = {}
            for name in names:
                root = tmp / f"queue{w}-{name}"
                make_project(root, 20)
                Laptop(root).init(agent, user=name)
                body = capture_ask_body(root, script({"write": "warm.txt", "text": "warm\n"}))
                # a first ask is of every file; the steady state is an ask of changes (none here)
                body.pop("files", None)
                bodies[name] = {**body, "base": body["tree"], "changed": [], "deleted": []}
            for sleep in ai_sleeps:
                jobs: Dict[str, List[str]] = {name: [] for name in names}
                refused: List[str] = []

                def submit(name: str) -> None:
                    for i in range(asks // users):
                        steps = ([{"sleep": sleep}] if sleep else []) + [{"write": f"q{i}.txt", "text": f"{i}\n"}]
                        body = {**bodies[name], "prompt": script(*steps)}
                        status, answer = agent.json("POST", "/v1/ask", body, token=agent.tokens[name])
                        if status == 202:
                            jobs[name].append(answer["id"])
                        else:
                            refused.append(f"{status} {answer.get('code')}: {answer.get('error')}")
                began = time.time()
                threads = [threading.Thread(target=submit, args=(name,)) for name in names]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(600)
                posted = time.time() - began
                ends = [job_end(agent, job, agent.tokens[name]) for name in names for job in jobs[name]]
                finished = [j for j in ends if j["status"] == "done"]
                wall = max((j["finished"] for j in ends), default=began) - began
                out.append({"workers": w, "ai_s": sleep, "asks": asks, "done": len(finished),
                            "refused": refused[:3], "wall": wall, "posted": posted,
                            "rate": len(finished) / wall if wall > 0 else 0.0})
                print(f"  workers {w}, AI {sleep * 1000:.0f} ms: {len(finished)} of {asks} done in {wall:.2f} s "
                      f"({out[-1]['rate']:.1f} jobs/s; POSTs took {posted:.2f} s)"
                      + (f"; refused: {refused[:3]}" if refused else ""), flush=True)
        finally:
            agent.stop()
    return out


# laptop steps of one ask: (label, function names in patchwire.py, any of which times it).
# Looked up by name in a cProfile of the real CLI; a name the code no longer has shows as n/a.
LAPTOP_STEPS = [("sync (all)", ["sync"]), ("  scan", ["changes_since_record", "scan_changes", "scan"]), ("  record", ["record"]),
                ("  rsync and the rest", ["rsync_argv"]), ("POST /v1/ask -> queued", ["post_ask"]),
                ("stream until done", ["stream_job"]), ("GET diff", ["diff"]), ("vet", ["vet"]),
                ("preview", ["preview"]), ("git apply", ["apply"]), ("ask (all)", ["cmd_ask"])]
AGENT_STEPS = ["setup_ms", "prepare_ms", "links_ms", "ai_ms", "collect_ms", "patch_ms"]


def laptop_profile(lap: Laptop, prompt: str, out: Path) -> Tuple[float, Dict[str, Optional[float]], List[str]]:
    """(wall seconds, {step label: seconds or None}, the 12 slowest patchwire.py functions)
    of one `patchwire ask --yes` run under cProfile."""
    import pstats
    argv = [sys.executable, "-m", "cProfile", "-o", str(out), str(ROOT / "patchwire.py"),
            "ask", "--yes", "--no-color", prompt]
    began = time.perf_counter()
    subprocess.run(argv, cwd=lap.root, env=lap.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True, timeout=600)
    wall = time.perf_counter() - began
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    ours = {key: value for key, value in stats.items() if key[0].endswith("patchwire.py")}
    by_name: Dict[str, float] = {}
    for (_, _, name), (_, _, _, cumulative, _) in ours.items():
        by_name[name] = max(by_name.get(name, 0.0), cumulative)
    steps: Dict[str, Optional[float]] = {}
    for label, names in LAPTOP_STEPS:
        found = [by_name[n] for n in names if n in by_name]
        steps[label] = max(found) if found else None
    if steps.get("  rsync and the rest") is not None:  # rsync itself runs in the child: sync minus what is ours
        own = sum(steps[k] or 0.0 for k in ("  scan", "  record"))
        steps["  rsync and the rest"] = max(0.0, (steps["sync (all)"] or 0.0) - own)
    top = sorted(ours.items(), key=lambda kv: -kv[1][3])[:12]
    return wall, steps, [f"{name} {value[3] * 1000:.0f} ms" for (_, _, name), value in top]


def breakdown_figures(tmp: Path, count: int) -> Dict[str, object]:
    """Where the time of one warm ask of a `count`-file project goes (one file changed): the
    laptop CLI under cProfile (steps looked up by function name), the agent's own step times
    (its `finished` event) and its POST /v1/ask request line (audit log: body read, job
    queued, whole request, ms)."""
    root = tmp / f"breakdown{count}"
    make_project(root, count)
    agent = AgentProcess(tmp / f"agent-breakdown{count}", STAND_IN_COMMAND).start()
    try:
        lap = Laptop(root)
        lap.init(agent)
        lap.run("ask", "--yes", "--no-color", script({"write": "ai_warm.txt", "text": "warm\n"}), check=0,
                timeout=600)  # the cold sync
        (root / "lib" / "user_edit.dart").write_text("// the user's edit\n")
        wall, steps, top = laptop_profile(lap, script({"write": "ai_breakdown.txt", "text": "1\n"}),
                                          tmp / "ask.prof")
        job = lap.last_job()
        finished = [e for e in agent.events(job) if e["type"] in ("finished", "failed")]
        timings = (finished[-1].get("timings") or {}) if finished else {}
        audit = [json.loads(line) for line in (agent.state_dir / "audit.log").read_text().splitlines()
                 if line.strip()]
        posts = [r for r in audit if r.get("event") == "request" and r.get("method") == "POST"
                 and str(r.get("path", "")).startswith("/v1/ask") and r.get("job") == job]
        request = {k: posts[-1][k] for k in ("body_ms", "queued_ms", "duration_ms", "bytes_in")
                   if posts and k in posts[-1]}
        return {"count": count, "wall": wall, "laptop": steps, "top": top, "agent": timings,
                "request": request}
    finally:
        agent.stop()


def breakdown_lines(b: Dict[str, object]) -> List[str]:
    laptop: Dict[str, Optional[float]] = b["laptop"]  # type: ignore[assignment]
    agent: Dict[str, float] = b["agent"]  # type: ignore[assignment]
    request: Dict[str, float] = b["request"]  # type: ignore[assignment]
    lines = [f"One warm `patchwire ask --yes` of a {b['count']:,}-file project, one file changed, "
             f"{b['wall']:.2f} s under cProfile (which slows Python code down).", "",
             "Laptop (cumulative ms of the function timing each step; n/a: not seen in the main thread, which "
             "is all cProfile sees: the scan runs in a thread beside the agent's answer, rsync not at all when "
             "the change goes with the ask, and an ask with --yes reads the patch once, without `vet`):", ""]
    lines += [f"- {label.strip()}{' (part of sync)' if label.startswith('  ') else ''}: "
              + (f"{v * 1000:.0f}" if v is not None else "n/a") for label, v in laptop.items()]
    lines += ["", "Agent: POST /v1/ask " + (", ".join(f"{k.replace('_ms', '')} {v:,.0f} ms" if k != "bytes_in"
                                                     else f"{v:,} bytes in" for k, v in request.items())
                                             or "n/a (no audit line)")
              + " (duration: the whole streamed request, the job included); the job's steps: "
              + (", ".join(f"{k.replace('_ms', '')} {agent[k]:,.0f}" for k in AGENT_STEPS if k in agent) or "n/a")
              + " ms.", "", "The slowest patchwire.py functions (cumulative): " + "; ".join(b["top"]) + "."]  # type: ignore[arg-type]
    return lines


def idle_rss_with_bytecode(tmp: Path) -> int:
    """Agent VmRSS (kB) idle when its modules load from cached bytecode (an installed module,
    or a zipapp built with compiled .pyc): compiling the 3,800-line sources at every start,
    as a PYTHONDONTWRITEBYTECODE=1 run from source does, leaves ~14 MB of RSS behind."""
    env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp / "pyc")}
    program = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import patchwire_agent; "
                                     "sys.exit(patchwire_agent.main(sys.argv[1:]))"]
    rss = 0
    for i in range(2):  # the first start writes the bytecode, the second reads it
        agent = AgentProcess(tmp / f"agent-pyc{i}", STAND_IN_COMMAND, program=program, env=env).start()
        try:
            time.sleep(0.5)
            rss = rss_kb(agent.proc.pid)
        finally:
            agent.stop()
    return rss


# ================================================================== report


def machine(zipapp: Optional[Path] = None) -> str:
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    rsync_version = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {os.cpu_count()} cores, "
            f"{platform.platform()}, Python {platform.python_version()}, {git_version}, {rsync_version}"
            + (f"; the agent's memory and streams from the zipapp {zipapp.name} ({zipapp.stat().st_size:,} bytes), "
               f"the laptop CLI of the asks from the zipapp patchwire beside it" if zipapp else
               "; the laptop CLI and the agent from source"))


PARTS = ("asks", "switch", "first", "breakdown", "queue", "preview", "startup", "memory", "streams", "laptop", "apply")
OTHER_BENCHES = {  # parts measured by a bench of their own, run as it runs alone, its tables kept
    "laptop": ("Enter -> AI start, start-up and the laptop's peak memory (bench/startup.py)", ["startup.py"]),
    "apply": ("A big patch and a big preview (bench/apply.py)", ["apply.py"]),
}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[200, 2000, 20000])
    ap.add_argument("--big", action="store_true", help="also 100,000 files (slow to generate)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ssh-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[200, 20000],
                    help="sizes also measured over SSH")
    ap.add_argument("--asks", type=int, default=5000, help="asks for the agent memory figure (5,000)")
    ap.add_argument("--breakdown-size", type=int, default=20000,
                    help="files in the project of the per-step breakdown (default 20,000)")
    ap.add_argument("--switch-size", type=int, default=20000,
                    help="files in the project of the branch switch (default 20,000; a tenth change, "
                         "a fortieth are deleted, as many added)")
    ap.add_argument("--real", type=Path, default=None,
                    help="a real project tree for the first ask (bench/real_project.sh DIR makes the "
                         "43,734-file one RESULTS.md names); without it the part is skipped")
    ap.add_argument("--first-repeat", type=int, default=3, help="rounds of the first ask (3)")
    ap.add_argument("--queue-asks", type=int, default=40, help="asks for the queue throughput figure (4 users)")
    ap.add_argument("--zipapp", type=Path, default=None,
                    help="the agent zipapp (e.g. dist/patchwire-agent) for the memory and start-up figures; "
                         "by default the agent runs from source")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=list(PARTS),
                    help="comma-separated parts to run (a partial run only prints): " + ",".join(PARTS))
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (tests/test_bench.py): 200 files, local, 1 round, a 200-file breakdown, "
                         "no queue, memory or stream figures")
    args = ap.parse_args(argv)
    unknown = set(args.only) - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    if args.quick:
        args.sizes, args.ssh_sizes, args.repeat, args.no_write = [200], [], 1, True
        args.breakdown_size, args.switch_size, args.first_repeat = 200, 400, 1
        args.only = [p for p in args.only if p in ("asks", "switch", "first", "breakdown", "preview", "startup")]
    if args.zipapp is not None:
        args.zipapp = args.zipapp.resolve()
    return args


def asks_lines(args, tmp: Path, stack: ExitStack) -> List[str]:
    sizes = args.sizes + ([100000] if args.big else [])
    server = start_sshd(tmp, stack) if any(s in args.ssh_sizes for s in sizes) else None
    print("warm asks (s):", flush=True)
    results = {n: run_size(tmp, n, args.repeat, server if n in args.ssh_sizes else None, stack) for n in sizes}
    lines = ["## Warm ask against the natural script", "",
             f"Seconds, median (min-max) of {args.repeat} interleaved rounds; one file changed per round; "
             "ratio: the median of the rounds' ratios.", "",
             "Laptop peak: the largest resident set of the laptop's side (the CLI or the script's shell, "
             "with every git, rsync and ssh each waited for), MB, median of the rounds.", "",
             "| files | mode | Patchwire | baseline | ratio | laptop peak, Patchwire / script |",
             "|---|---|---|---|---|---|"]
    for n, res in results.items():
        for mode in ("local", "ssh"):
            if f"pw {mode}" in res:
                a, b = res[f"pw {mode}"], res[f"base {mode}"]
                peak = (f"{statistics.median(res[f'pw {mode} peak kB']) / 1024:.0f} / "
                        f"{statistics.median(res[f'base {mode} peak kB']) / 1024:.0f} MB")
                lines.append(f"| {n:,} | {mode} | {spread(a)} | {spread(b)} | {ratio(a, b):.2f}x | {peak} |")
    lines += ["", "No-change `patchwire sync` against the script's `rsync -a --delete --exclude=.git`, local (s):", "",
              "| files | patchwire sync | bare rsync | ratio |", "|---|---|---|---|"]
    for n, res in results.items():
        a, b = res["pw sync"], res["bare rsync"]
        lines.append(f"| {n:,} | {spread(a)} | {spread(b)} | {ratio(a, b):.2f}x |")
    if len(results) > 1:
        lo, hi = min(results), max(results)
        g = statistics.median(results[hi]["pw local"]) / statistics.median(results[lo]["pw local"])
        gb = statistics.median(results[hi]["base local"]) / statistics.median(results[lo]["base local"])
        lines += ["", f"Growth {lo:,} -> {hi:,} files, local: Patchwire {g:.1f}x, baseline {gb:.1f}x."]
    return lines + [""]


def start_sshd(tmp: Path, stack: ExitStack):
    """The loopback sshd of the SSH rows, started once."""
    from sshd import running_sshd
    if not hasattr(start_sshd, "server"):
        start_sshd.server = stack.enter_context(running_sshd(tmp / "sshd"))  # type: ignore[attr-defined]
    return start_sshd.server  # type: ignore[attr-defined]


def switch_lines(args, tmp: Path, stack: ExitStack) -> List[str]:
    n = args.switch_size
    res = switch_figures(tmp, n, args.repeat, None if args.quick else start_sshd(tmp, stack), stack)
    mode = "local" if args.quick else "ssh"
    return ["## A branch switch", "",
            f"The user switches between two branches of a {n:,}-file project ({n // 10:,} files changed, "
            f"{n // 40:,} deleted, {n // 40:,} added), then asks; {args.repeat} rounds, interleaved, each way "
            f"its own box, {mode}.", "",
            "| files | Patchwire | baseline | ratio |", "|---|---|---|---|",
            f"| {n:,} | {spread(res['pw'])} | {spread(res['base'])} | {ratio(res['pw'], res['base']):.2f}x |", ""]


def first_lines(args, tmp: Path, stack: ExitStack) -> List[str]:
    source, what = args.real, f"the real project at `{args.real}` (bench/real_project.sh)"
    if source is None:
        if not args.quick:
            return ["## The first ask", "", "Not measured: no --real DIR (bench/real_project.sh DIR makes one).", ""]
        source, what = tmp / "first-source", "a synthetic 300-file project (a quick run)"
        write_files(source, project_files(300))
    res = first_figures(tmp, source, args.first_repeat, None if args.quick else start_sshd(tmp, stack), stack)
    a, b = res["pw"], res["base"]
    return ["## The first ask on an empty box", "",
            f"{what}: {res['files']:,} files, {res['bytes'] / 1e6:.0f} MB. Each round a new agent (no mirror, "
            f"no job folder) and a new `git init` box for the script; {args.first_repeat} rounds interleaved"
            f"{'' if args.quick else ', over SSH'}.", "",
            "| files | Patchwire | baseline | ratio |", "|---|---|---|---|",
            f"| {res['files']:,} | {spread(a)} | {spread(b)} | {ratio(a, b):.2f}x |", ""]  # type: ignore[arg-type]


def other_bench_lines(part: str) -> List[str]:
    """Run bench/<part's script> as a user would and keep what it printed, less a title line of
    its own (this file's command line and machine line say it)."""
    title, argv = OTHER_BENCHES[part]
    print(f"{title}:", flush=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=3600)
    out = proc.stdout
    body = out.split("\n", 1)[1] if out.startswith("# ") else out  # its own title line: this file has one
    body = "\n".join("#" + line if line.startswith("## ") or line.startswith("### ") else line
                     for line in body.splitlines())
    if proc.returncode:
        body += f"\n\n(exit {proc.returncode})"
    print(body, flush=True)
    return [f"## {title}", "", body.strip(), ""]


def queue_lines(args, tmp: Path) -> List[str]:
    print("queue throughput:", flush=True)
    rows = queue_figures(tmp, asks=args.queue_asks)
    lines = ["## Queue throughput", "",
             f"{args.queue_asks} asks from 4 users (a thread each, POSTing as fast as the agent answers the "
             "body the laptop CLI sent for its last ask, a new prompt each) against an agent with "
             "`[jobs] workers` = 1, then 2; the stand-in AI edits one file, at once or after a 100 ms "
             "sleep. Wall time from the first POST to the last job's end.", "",
             "| workers | AI | done | wall (s) | jobs/s | POSTs (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['ai_s'] * 1000:.0f} ms | {r['done']} of {r['asks']} | {r['wall']:.2f} | "
                     f"{r['rate']:.1f} | {r['posted']:.2f} |")
        if r["refused"]:
            lines.append(f"| | refused: {'; '.join(r['refused'])} | | | | |")
    for sleep in sorted({r["ai_s"] for r in rows}):
        rate = {r["workers"]: r["rate"] for r in rows if r["ai_s"] == sleep}
        if rate.get(1) and 2 in rate:
            lines.append(f"\n2 workers against 1, AI {sleep * 1000:.0f} ms: {rate[2] / rate[1]:.1f}x the jobs per second.")
    return lines + [""]


def streams_lines(tmp: Path, streams: Dict[object, object]) -> List[str]:
    lines = ["## AI line -> streaming clients", "",
             "The stand-in AI writes 200 stream-json text lines 3 ms apart, each carrying its send time "
             "(time.time()); each client (http.client on its own connection to /v1/jobs/ID/events, in its "
             "own process) notes when the line arrives. \"store\" starts at the event's stored time "
             "instead (ms resolution). Agent CPU: user + system during the job.", ""]
    cli: dict = streams.get("cli") or {}  # type: ignore[assignment]
    if cli.get("ai"):
        lines.append(f"- the laptop CLI (`patchwire ask`, each line as it prints it on stderr): {len(cli['ai'])} of "
                     f"{cli['expected']} lines; AI -> terminal {percentiles(cli['ai'])}; exit {cli['exit']}.")
    elif cli:
        lines.append(f"- the laptop CLI: no line arrived; exit {cli['exit']}.")
    for n in (k for k in streams if isinstance(k, int)):
        fig: dict = streams[n]  # type: ignore[assignment]
        who = f"{n} client{'s' if n > 1 else ''}"
        if fig["ai"]:
            lines.append(f"- {who}: {len(fig['ai'])} of {fig['expected']} lines; AI -> client "
                         f"{percentiles(fig['ai'])}; store -> client {percentiles(fig['store'])}; agent CPU "
                         f"{fig['cpu']:.2f} s; {fig['streams']}.")
        else:
            lines.append(f"- {who}: no line arrived; {fig['streams']}.")
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python3", "bench/ask.py", *(str(a) for a in (sys.argv[1:] if argv is None else argv))])
    lines = [f"# Benchmark results (`{command}`)", "", machine(args.zipapp), ""]
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-ask-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        os.environ["HOME"] = str(tmp / "home")
        (tmp / "home").mkdir()
        agent_program = [sys.executable, str(args.zipapp)] if args.zipapp else None
        if args.zipapp and (args.zipapp.parent / "patchwire").exists():
            LAPTOP_PROGRAM.append([sys.executable, str(args.zipapp.parent / "patchwire")])
        if "asks" in args.only:
            lines += asks_lines(args, tmp, stack)
        for part in (p for p in OTHER_BENCHES if p in args.only and not args.quick):
            lines += other_bench_lines(part)
        if "switch" in args.only:
            lines += switch_lines(args, tmp, stack)
        if "first" in args.only:
            lines += first_lines(args, tmp, stack)
        if "breakdown" in args.only:
            print(f"breakdown of one {args.breakdown_size:,}-file ask:", flush=True)
            part = ["## Per-step breakdown of one ask", ""] + breakdown_lines(breakdown_figures(tmp, args.breakdown_size))
            print("\n".join(part), flush=True)
            lines += part + [""]
        if "queue" in args.only:
            lines += queue_lines(args, tmp)
        if "preview" in args.only:
            colour, plain = preview_figures()
            lines += ["## Coloured preview of a 10,000-line diff", "",
                      f"Coloured {spread(colour, 1000, '{:.0f}')} ms, uncoloured {spread(plain, 1000, '{:.0f}')} ms.", ""]
            print(lines[-2], flush=True)
        if "startup" in args.only:
            start = startup_figures(tmp, 2 if args.quick else 7, args.zipapp)
            part = ["## Start-up (ms, median (min-max))", ""]
            part += [f"- `patchwire {k}`: {spread(v, 1000, '{:.0f}')}" if not k.startswith(("python", "zipapp"))
                     else f"- {k}: {spread(v, 1000, '{:.0f}')}" if k.startswith("zipapp")
                     else f"- bare `{k}`: {spread(v, 1000, '{:.0f}')}" for k, v in start.items()]
            print("\n".join(part), flush=True)
            lines += part + [""]
        mem: Dict[str, int] = {}
        if "memory" in args.only:  # first: from a zipapp, this agent is the start that unpacks it
            mem = agent_memory(tmp, args.asks, program=agent_program)
            if not args.zipapp:
                mem["idle, from cached bytecode"] = idle_rss_with_bytecode(tmp)
        streams: Dict[object, object] = {}
        if "streams" in args.only:
            streams = streaming_figures(tmp, program=agent_program)
        if mem:
            if "rss with streams kB" in streams:
                mem["with 50 streaming clients"] = streams["rss with streams kB"]  # type: ignore[assignment]
            where = (f"the zipapp {args.zipapp.name} (its first start, which unpacks it)" if args.zipapp
                     else "source (PYTHONDONTWRITEBYTECODE=1)")
            lines += ["## Agent memory (VmRSS)", "", f"Agent run from {where}: "
                      + ", ".join(f"{k}: {v:,}" if "bytes" in k else f"{k}: {v / 1024:.1f} MB"
                                  for k, v in mem.items()), ""]
            print(lines[-2], flush=True)
        if streams:
            part = streams_lines(tmp, streams)
            print("\n".join(part), flush=True)
            lines += part
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if not args.no_write and set(args.only) != set(PARTS):
        print("(--only: a partial run leaves bench/RESULTS.md alone)")
    elif not args.no_write:  # the hand-written notes at the end of the file stay
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text() if path.exists() else ""
        path.write_text(text + "\n" + (old[old.index(NOTES):] if NOTES in old else NOTES + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
