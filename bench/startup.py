#!/usr/bin/env python3
"""What a user feels on the laptop before and around the AI: Enter -> AI start, the programs'
start-up (zipapp against source, per Python), and the laptop's peak memory of a warm ask; each
against the natural script, rounds interleaved, ratios the median of per-round ratios.

    python3 bench/startup.py                 # 200 files, memory at 100,000 files, 7 rounds (minutes)
    python3 bench/startup.py --quick         # memory at 500 files, 2 rounds: tests/test_bench.py
    python3 bench/startup.py --mem-files 20000 --repeat 5 --no-zipapp

Parts:
    enter      Enter -> AI start at --files (200) files, run locally: from launching `patchwire ask
               --yes` until the AI process starts (the AI command is a shell script that writes
               `date +%s.%N` to a file, then execs the stand-in, tests/stand_in_claude.py), one
               file changed by the user each round (and written out, os.sync, before the clock
               starts, for each side alike); against the natural script up to its AI:
               `rsync -a --delete --exclude=.git ./ box/ && cd box && git add -A && git commit -qm s && AI`
    startup    `patchwire --version` from the built zipapp (dist/patchwire, build.sh; its first
               start, which unpacks it, not timed) against `python3 patchwire.py --version`, under
               Python 3.9 and 3.13 (each found as the tests find them), and `python -c pass`
               with and without `-S` (what site and the .pth files of its site-packages cost
               every Python start on this machine)
    memory     the laptop's peak RSS of a warm ask at --mem-files files, one file changed: the
               largest ru_maxrss among the CLI and its children (os.wait4 on the CLI), against
               the natural script's laptop side (rsync, then `git apply` of the patch)

Everything is real but the AI: the agent on 127.0.0.1:0, rsync, git. Speed is never asserted.
Exit status 0 when every part ran.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from conftest import STAND_IN_COMMAND, AgentProcess, Laptop, script  # noqa: E402
from prepare import project_files, write_files  # noqa: E402
from pythons import find_python  # noqa: E402

TIME = "/usr/bin/time"  # GNU time: the memory part needs it (apt-get install time)
GIT_ID = ["-c", "user.email=b@b", "-c", "user.name=b"]


def git(cwd: Path, *args: str, input: Optional[bytes] = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, input=input, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def make_project(root: Path, count: int) -> None:
    """bench/prepare.py's Flutter-like project of `count` files, committed."""
    write_files(root, project_files(count))
    git(root, "init", "-q")
    git(root, *GIT_ID, "add", "-A")
    git(root, *GIT_ID, "commit", "-qm", "base")


def spread(values: Sequence[float], unit: float = 1.0, fmt: str = "{:.3f}") -> str:
    """median (min-max)."""
    v = [x * unit for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of per-round ratios (each pair of rounds shared the machine's state)."""
    return statistics.median(x / y for x, y in zip(a, b))


def interleaved(repeat: int, runs: Sequence[Tuple[str, Callable[[int], float]]]) -> Dict[str, List[float]]:
    """Each round runs every function once, the order turning round by round."""
    out: Dict[str, List[float]] = {name: [] for name, _ in runs}
    for r in range(repeat):
        shift = r % len(runs)
        for name, func in list(runs[shift:]) + list(runs[:shift]):
            out[name].append(func(r))
    return out


def peak_kb(argv: Sequence[str], cwd: Path, stdin: Optional[bytes] = None, env: Optional[Dict[str, str]] = None) -> int:
    """Run argv; the largest ru_maxrss (kB) among it and its children. Through GNU time: a
    child forked (or vforked) from this big Python process starts with this process's peak as
    its own (the kernel copies it at fork and takes the old one at exec), while one forked from
    `time` starts small; Linux folds each reaped child's peak into its parent's."""
    with tempfile.NamedTemporaryFile() as out:
        proc = subprocess.run([TIME, "-f", "%M", "-o", out.name, *argv], cwd=cwd, input=stdin or b"",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return int(Path(out.name).read_text().split()[-1])


# ================================================================== the two ways to ask


class Natural:
    """The natural script, the box a folder; `ai` the AI command (stamping or not)."""

    def __init__(self, laptop: Path, box: Path, ai: Sequence[str]):
        self.laptop, self.box, self.ai = laptop, box, list(ai)
        box.mkdir(parents=True, exist_ok=True)
        git(box, "init", "-q")
        git(box, "config", "user.email", "b@b")
        git(box, "config", "user.name", "b")

    def rsync(self) -> List[str]:
        return ["rsync", "-a", "--delete", "--exclude=.git", "./", f"{self.box}/"]

    def box_side(self, prompt: str) -> bytes:
        command = (f"git add -A && git commit -qm s --allow-empty && printf %s {shlex.quote(prompt)} | "
                   f"{shlex.join(self.ai)} -p >/dev/null && git add -A && git diff --cached --binary -M HEAD "
                   f"&& git reset -q --hard")
        return subprocess.run(["sh", "-c", command], cwd=self.box, check=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL).stdout

    def ask(self, prompt: str) -> None:
        subprocess.run(self.rsync(), cwd=self.laptop, check=True, stdout=subprocess.DEVNULL)
        patch = self.box_side(prompt)
        subprocess.run(["git", "apply"], cwd=self.laptop, input=patch, check=True)

    def settle(self, timeout_s: float = 300) -> None:
        """Wait for the `git gc --auto` the script's `git commit` may have left running in the
        background (git detaches it: a first commit of 100,000 files starts one), which would
        still be writing the box's objects/ while the run's folder is removed."""
        deadline = time.monotonic() + timeout_s
        while (self.box / ".git" / "gc.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def laptop_peak_kb(self, prompt: str) -> int:
        """The laptop side only (rsync, git apply): the box side runs on the box."""
        rsync = peak_kb(self.rsync(), self.laptop)
        return max(rsync, peak_kb(["git", "apply"], self.laptop, stdin=self.box_side(prompt)))


def laptop_program(tmp: Path, way: str, root: Path = ROOT) -> Tuple[List[str], Dict[str, str]]:
    """argv and environment of the laptop CLI run `way`: "zipapp" (dist/patchwire, as shipped,
    unpacked into a SHIV_ROOT of the run's own), "module" (imported from cached bytecode, as
    an installed module would be) or "source" (`python3 patchwire.py`: compiled at each start)."""
    env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp / "pyc"), "SHIV_ROOT": str(tmp / "shiv"),
           "PATCHWIRE_TIMEOUT": "900"}  # the first ask of 100,000 files waits for the box to hash them all
    if way == "zipapp":
        return [sys.executable, str(root / "dist" / "patchwire")], env
    if way == "module":
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); import patchwire; "
                                      "sys.exit(patchwire.main())"], env
    return [sys.executable, str(root / "patchwire.py")], env


class Side:
    """A project, an agent whose AI is `ai`, the laptop set up against it (its CLI run `way`),
    and the natural script's box beside it."""

    def __init__(self, tmp: Path, name: str, count: int, ai: Sequence[str], stack: ExitStack, way: str,
                 root: Path = ROOT):
        self.root = tmp / name
        make_project(self.root, count)
        # the agent of the same checkout as the CLI: `--against` measures the whole of "before"
        agent = None if root == ROOT else [sys.executable, str(root / "patchwire_agent.py")]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # init
            self.agent = AgentProcess(tmp / f"agent-{name}", ai, program=agent).start()
        stack.callback(self.agent.stop)
        program, self.env = laptop_program(tmp, way, root)
        self.lap = Laptop(self.root, program=program, env=self.env)
        self.lap.init(self.agent)
        self.natural = Natural(self.root, tmp / f"box-{name}", ai)
        stack.callback(self.natural.settle)
        self.pw(script({"write": "ai_pw.txt", "text": "warm-up\n"}))  # the first sync: not timed
        self.natural.ask(script({"write": "ai_natural.txt", "text": "warm-up\n"}))

    def user_edit(self, r: int) -> None:
        (self.root / "lib" / "user_edit.dart").write_text(f"// the user's edit {r}\n")

    def pw_argv(self, prompt: str) -> List[str]:
        return [*self.lap.program, "ask", "--yes", "--no-color", prompt]

    def pw(self, prompt: str) -> None:
        self.lap.run(*self.pw_argv(prompt)[len(self.lap.program):], check=0, timeout=600)


# ================================================================== Enter -> AI start


def stamping_ai(tmp: Path) -> Tuple[List[str], Path]:
    """An AI command that notes when it starts, then is the stand-in."""
    stamp = tmp / "ai-started"
    wrapper = tmp / "stamping-ai"
    wrapper.write_text(f"#!/bin/sh\ndate +%s.%N > {shlex.quote(str(stamp))}\nexec \"$@\"\n")
    wrapper.chmod(0o755)
    return [str(wrapper), *STAND_IN_COMMAND], stamp


def enter_figures(tmp: Path, count: int, repeat: int, stack: ExitStack, way: str,
                  against: Optional[Path]) -> Dict[str, List[float]]:
    ai, stamp = stamping_ai(tmp)
    side = Side(tmp, "enter", count, ai, stack, way)
    old = Side(tmp, "enter-before", count, ai, stack, way, against) if against else None

    def until_ai(run: Callable[[], None]) -> float:
        stamp.unlink(missing_ok=True)
        # what earlier parts wrote (a full run makes 100,000-file projects before this) is
        # written out first, for both sides alike: the latency measured is the ask's own
        os.sync()
        start = time.time()
        run()
        return float(stamp.read_text()) - start

    def pw(r: int) -> float:
        side.user_edit(r)
        return until_ai(lambda: side.pw(script({"write": "ai_pw.txt", "text": "." * (r + 1) + "\n"})))

    def natural(r: int) -> float:
        side.user_edit(r + 1000)
        return until_ai(lambda: side.natural.ask(script({"write": "ai_natural.txt", "text": "." * (r + 1) + "\n"})))

    def before(r: int) -> float:
        assert old
        old.user_edit(r)
        return until_ai(lambda: old.pw(script({"write": "ai_pw.txt", "text": "." * (r + 1) + "\n"})))

    return interleaved(repeat, [("patchwire", pw), ("natural", natural), *([("before", before)] if old else [])])


# ================================================================== start-up


def startup_pythons() -> List[str]:
    """The oldest and newest Pythons the zipapps support, and this one: the Python that runs
    the CLI in the other parts (and the other benches)."""
    this = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return sorted({"3.9", "3.13", this}, key=lambda v: tuple(map(int, v.split("."))))


def startup_figures(tmp: Path, repeat: int, zipapp: bool, against: Optional[Path]) -> Dict[str, List[float]]:
    """Seconds of `--version` per (python, way)."""
    runs: List[Tuple[str, Callable[[int], float]]] = []
    _, env = laptop_program(tmp, "module")
    env = {**os.environ, **env}

    def timed(argv: List[str]) -> Callable[[int], float]:
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, env=env)  # unpacks, writes bytecode: not timed

        def run(_: int) -> float:
            start = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
            return time.perf_counter() - start
        return run

    for version in startup_pythons():
        exe = find_python(version)
        if exe is None:
            print(f"  (no python{version} here: its rows are left out)")
            continue
        runs.append((f"{version} python -S -c pass", timed([exe, "-S", "-c", "pass"])))  # site's .pth hooks not run
        runs.append((f"{version} python -c pass", timed([exe, "-c", "pass"])))
        runs.append((f"{version} source", timed([exe, str(ROOT / "patchwire.py"), "--version"])))
        module = laptop_program(tmp, "module")[0][1:]
        runs.append((f"{version} module", timed([exe, *module, "--version"])))
        if zipapp:
            runs.append((f"{version} zipapp", timed([exe, str(ROOT / "dist" / "patchwire"), "--version"])))
        if zipapp and against:
            runs.append((f"{version} zipapp before", timed([exe, str(against / "dist" / "patchwire"), "--version"])))
    return interleaved(repeat, runs)


def build_zipapp() -> None:
    build = subprocess.run(["bash", str(ROOT / "build.sh")], cwd=ROOT, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        raise SystemExit(f"build.sh failed:\n{build.stdout}{build.stderr[-3000:]}")


# ================================================================== memory


def memory_figures(tmp: Path, count: int, repeat: int, stack: ExitStack, way: str) -> Dict[str, List[float]]:
    side = Side(tmp, "memory", count, STAND_IN_COMMAND, stack, way)

    def pw(r: int) -> float:
        side.user_edit(r)
        prompt = script({"write": "ai_pw.txt", "text": "." * (r + 1) + "\n"})
        return peak_kb(side.pw_argv(prompt), side.root, env={**os.environ, **side.env}) / 1024

    def natural(r: int) -> float:
        side.user_edit(r + 1000)
        return side.natural.laptop_peak_kb(script({"write": "ai_natural.txt", "text": "." * (r + 1) + "\n"})) / 1024

    return interleaved(repeat, [("patchwire", pw), ("natural", natural)])


# ================================================================== report


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="memory at 500 files, 2 rounds, no zipapp build")
    p.add_argument("--files", type=int, default=200, help="files for Enter -> AI start (200)")
    p.add_argument("--mem-files", type=int, default=None, help="files for the memory part (100,000; quick 500)")
    p.add_argument("--repeat", type=int, default=None, help="rounds (7; quick 2)")
    p.add_argument("--no-zipapp", action="store_true", help="leave the zipapp out of the start-up part")
    p.add_argument("--no-build", action="store_true", help="use dist/patchwire as it is (no build.sh)")
    p.add_argument("--against", type=Path, default=None,
                   help="another checkout (built: its dist/) measured in the same rounds as 'before' "
                        "(enter: its CLI and its agent; startup)")
    p.add_argument("--only", default="enter,startup,memory", help="parts, comma-separated (all by default)")
    p.add_argument("--program", choices=("zipapp", "module", "source"), default=None,
                   help="how the laptop CLI runs in the enter and memory parts (zipapp; quick: module)")
    args = p.parse_args(argv)
    args.mem_files = args.mem_files or (500 if args.quick else 100000)
    args.repeat = args.repeat or (2 if args.quick else 7)
    args.no_build = args.no_build or args.quick  # quick: dist/patchwire as it was built, if it was
    args.zipapp = not args.no_zipapp and (not args.quick or (ROOT / "dist" / "patchwire").exists())
    args.program = args.program or ("module" if args.quick or not args.zipapp else "zipapp")
    return args


def table(title: str, figures: Dict[str, List[float]], base: str, unit: str, scale: float, fmt: str) -> List[str]:
    lines = [f"### {title}", "", f"| | median (min-max) {unit} | / {base} |", "|---|---|---|"]
    for name, values in figures.items():
        lines.append(f"| {name} | {spread(values, scale, fmt)} | {ratio(values, figures[base]):.2f}x |")
    return lines + [""]


def startup_table(figures: Dict[str, List[float]]) -> List[str]:
    ways = ("python -S -c pass", "python -c pass", "source", "module", "zipapp", "zipapp before")
    lines = ["### `patchwire --version`, per Python: source (compiled at each start), module (cached "
             "bytecode), zipapp (ms)", "",
             "| Python | " + " | ".join(ways) + " | zipapp / source | zipapp / module |", "|---" * 9 + "|"]
    for version in startup_pythons():
        row = {way: figures.get(f"{version} {way}") for way in ways}
        if not row["source"]:
            continue
        cells = [spread(row[way], 1000, "{:.0f}") if row[way] else "n/a" for way in ways]
        zipapp = row["zipapp"]
        cells += [f"{ratio(zipapp, row[base] or []):.2f}x" if zipapp else "n/a" for base in ("source", "module")]
        lines.append(f"| {version} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    print(f"# bench/startup.py: Python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if (args.zipapp or args.program == "zipapp") and not args.no_build:
        build_zipapp()
    out: List[str] = []
    with tempfile.TemporaryDirectory(prefix="patchwire-startup-") as name, ExitStack() as stack:
        tmp = Path(name)
        parts = args.only.split(",")
        if "enter" in parts:
            enter = enter_figures(tmp, args.files, args.repeat, stack, args.program, args.against)
            out += table(f"Enter -> AI start, {args.files:,} files, local, the CLI as {args.program} (s)", enter,
                         "natural", "s", 1.0, "{:.3f}")
            if "before" in enter:
                out += [f"patchwire / before (same rounds): {ratio(enter['patchwire'], enter['before']):.2f}x", ""]
            print("\n".join(out), flush=True)
        if "startup" in parts:
            print("\n".join(startup_table(startup_figures(tmp, args.repeat, args.zipapp, args.against))), flush=True)
        if "memory" in parts:
            memory = memory_figures(tmp, args.mem_files, max(2, args.repeat // 2), stack, args.program)
            print("\n".join(table(f"Laptop peak RSS of a warm ask, {args.mem_files:,} files, the CLI as "
                                   f"{args.program} (MB)", memory, "natural", "MB", 1.0, "{:.1f}")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
