"""Applying and previewing a big patch on the laptop, against git's own tools on the same change.

    python3 bench/apply.py [--files 1000] [--mb 50] [--preview-lines 100000] [--rounds 5] [--only apply|preview]
    python3 bench/apply.py --quick      # the smoke run of tests/test_bench.py (a few seconds)

Two scenarios, each built once in a temporary folder (Patchwire's state there too):

1. **Apply a big patch.** A git project of source-like files (log-uniform sizes, 2-128 kB) and a
   copy of it as the box has it. On the box copy `--files` files change: 30% rewritten whole, 40%
   edited in a few places, 10% each new, deleted or renamed (half of those renames edited too),
   as many left alone; `git diff --cached --binary --full-index -M HEAD` there is the patch (`--mb`
   sizes the files so the patch is about that big). The laptop's base is recorded in Patchwire's
   store afresh each round (a state folder of its own), as a sync leaves it. Each round, in
   interleaved order, on freshly reset checkouts:
   - **Patchwire**: what `patchwire apply JOB` does with the patch it holds (no HTTP, no
     waiting for the person): read its headers strictly and vet it against the files here,
     render the first screenful of the coloured preview (what shows before the pager streams
     the rest, as the person reads; PatchReading), read the rest strictly and compute every
     result (PatchReading.finish: what preview() does before it returns); then
     `Applier.apply` with that reading (the undo log, then the results written, or `git apply`
     and the written files checked when a file here is not as synced). The whole coloured
     preview rendered to a file is timed too, and shown, but not counted: a pager takes it as
     the person reads.
   - **baseline**: `git apply --binary` alone, on the same patch, in a same-shaped checkout.
   Printed: medians of each, and the median of the per-round ratios Patchwire / `git apply`
   (issue 27's goal: preview and apply at most 2x).

2. **Coloured preview of a ~`--preview-lines`-line diff** (a few hundred files edited in many
   places, some rewritten). Each round, interleaved:
   - **first screen**: from the patch bytes to the first screenful (23 lines) of the coloured
     preview rendered, as preview() shows it (PatchReading: every header read strictly and the
     whole patch vetted, each body read and its result computed as the diff reaches it; goal:
     < 0.1 s); the same with every file read, vetted and computed first (before issue 27's
     lazy reading); the diff's own first screenful (past the notes and the summary, so its
     first files' bodies too); and the first screenful from the patch read already (the
     rendering alone);
   - **full render**: the whole coloured preview of the patch already read, to a file, as it
     streams to the pager (page() writes it in batches); and the whole preview from the patch
     bytes, read as it is rendered, to a file;
   - **baseline**: `git diff --color -M` between the same two commits, to a file.
   Printed: medians and the median of the per-round ratios full render / `git diff --color`
   (goal: at most 1x).

Figures are printed, never asserted; the checks that do fail the run (exit 1) are that each
side's result is git's (the trees written by Patchwire and by `git apply` are equal to the box's).
"""

import argparse
import itertools
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import patchwire as pw  # noqa: E402

GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
SCREEN = 23


def git(cwd: Path, *args: str, input: bytes = b"") -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, input=input, stdout=subprocess.PIPE,
                          check=True).stdout


# --- the files and the change


class Source:
    """Source-like text: lines of identifiers, operators and indentation, from a pool."""

    def __init__(self, rng: random.Random, tag: str):
        words = ["self", "value", "return", "if", "for", "in", "result", "items", "name", "data", "count",
                 "=", "+", "(", ")", ":", "None", "True", "len", "append", "config", "path", "#"]
        self.rng = rng
        self.pool = [("    " * rng.randint(0, 3) + " ".join(rng.choices(words, k=rng.randint(2, 12)))
                      + f"  {tag}{i}\n").encode() for i in range(6000)]
        self.line = sum(map(len, self.pool)) / len(self.pool)

    def text(self, size: int) -> bytes:
        return b"".join(self.rng.choices(self.pool, k=max(1, int(size / self.line))))

    def size(self, low: int, high: int) -> int:
        return int(low * (high / low) ** self.rng.random())


def edited(src: Source, data: bytes, places: int) -> bytes:
    lines = data.splitlines(keepends=True)
    for _ in range(places):
        at = src.rng.randrange(len(lines))
        kind = src.rng.randrange(3)
        if kind == 0:
            lines[at] = src.rng.choice(src.pool).replace(b"\n", b" # changed\n")
        elif kind == 1:
            lines[at:at] = src.rng.choices(src.pool, k=3)
        else:
            del lines[at:at + 2]
    return b"".join(lines)


def log_uniform_low(mean: float, high: float) -> float:
    """The low end of a log-uniform size range up to `high` whose mean is `mean`."""
    low, top = 1.0, high
    for _ in range(60):
        mid = (low + top) / 2
        low, top = (mid, top) if (high - mid) / math.log(high / mid) < mean else (low, mid)
    return low


def build_change(files: int, mb: float, seed: int) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
    """(the laptop's files, the box's files after the AI) for a patch of about `mb` MB:
    30% of `files` rewritten whole, 40% edited in a few places, 10% each deleted, renamed
    (half of them edited) and new. Whole files are sized so the patch reaches `mb`."""
    rng = random.Random(seed)
    old, new = Source(rng, "o"), Source(rng, "n")
    # the patch holds a rewritten file twice, a new or deleted one once
    whole = mb * 1e6 / max(1, files * 8 // 10)
    high = 128_000.0 if whole < 100_000 else whole * 1.5
    low = log_uniform_low(min(whole, high * 0.9), high)
    paths = [f"src/pkg{i % 37}/mod{i}.py" for i in range(files * 2)]  # half the project is left alone
    kinds = {path: i % 20 for i, path in enumerate(paths[:files])}
    base = {p: old.text(old.size(low, high) if kinds.get(p, 6) in (0, 1, 2, 3, 4, 5, 14, 15)
                        else old.size(2_000, 100_000)) for p in paths}
    after = dict(base)
    for i, (path, kind) in enumerate(kinds.items()):
        if kind < 6:
            after[path] = new.text(len(base[path]))
        elif kind < 14:
            after[path] = edited(old, base[path], rng.randint(1, 6))
        elif kind < 16:
            del after[path]
        elif kind < 18:
            data = after.pop(path)
            after[path.replace("src/", "lib/", 1)] = edited(old, data, 2) if kind == 16 else data
        else:
            after[f"src/new/file{i}.py"] = new.text(new.size(low, high))
    return base, after


def write_tree(root: Path, files: Dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def repo(root: Path, files: Dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q")
    write_tree(root, files)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    return root


def box_patch(tmp: Path, name: str, base: Dict[str, bytes], after: Dict[str, bytes]) -> Tuple[Path, bytes]:
    """The box's repository (base committed, the AI's files committed on top) and its patch,
    as the box makes it."""
    box = repo(tmp / name, base)
    for rel in base:
        if rel not in after:
            (box / rel).unlink()
    write_tree(box, {p: d for p, d in after.items() if base.get(p) != d})
    git(box, "add", "-A")
    patch = git(box, "diff", "--cached", "--binary", "--full-index", "-M", "--no-ext-diff", "HEAD")
    git(box, "commit", "-qm", "ai")
    return box, patch


def reset(root: Path) -> None:
    git(root, "reset", "-q", "--hard", "HEAD")
    git(root, "clean", "-qfd")


# --- timing


def timed(work: Callable[[], object]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def preview_lines(files, style) -> itertools.chain:
    """What `patchwire apply` shows before it asks (preview()): the notes, the summary, the diff;
    of a PatchReading, each file's diff once its body is read and its result computed."""
    heads, sections = (files.files, files.sections()) if isinstance(files, pw.PatchReading) else (files, files)
    return itertools.chain(pw.render_look_closely(heads, style), pw.render_summary(heads, style), [""],
                           pw.diff_lines(sections, style))


def render_to(path: Path, files) -> None:
    """The whole coloured preview written as page() streams it to a pager."""
    with open(path, "wb") as out:
        for chunk in pw.batched(preview_lines(files, pw.Style(True)), 1000):
            out.write(("\n".join(chunk) + "\n").encode("utf-8", "replace"))


def patchwire_apply(project: "pw.Project", patch: bytes, base_tree: str, out: Path) -> Dict[str, float]:
    t0 = time.perf_counter()
    reading = pw.PatchReading(project, patch, (), base_tree)
    list(itertools.islice(preview_lines(reading, pw.Style(True)), SCREEN))
    t1 = time.perf_counter()
    files = reading.finish()
    t2 = time.perf_counter()
    pw.Applier(project, pw.Style(False)).apply(patch, base_tree, {}, files)
    t3 = time.perf_counter()
    render_to(out, files)
    t4 = time.perf_counter()
    return {"preview": t1 - t0, "read": t2 - t1, "apply": t3 - t2, "total": t3 - t0, "render": t4 - t3}


def tree_of_worktree(root: Path) -> str:
    git(root, "add", "-A")
    tree = git(root, "write-tree").decode().strip()
    git(root, "reset", "-q")
    return tree


def apply_scenario(tmp: Path, files: int, mb: float, rounds: int) -> List[str]:
    base, after = build_change(files, mb, 27)
    box, patch = box_patch(tmp, "apply-box", base, after)
    laptop = repo(tmp / "apply-laptop", base)
    plain = repo(tmp / "apply-plain", base)
    (tmp / "apply.patch").write_bytes(patch)
    want = git(box, "rev-parse", "HEAD^{tree}").decode().strip()
    times: Dict[str, List[float]] = {k: [] for k in ("read", "preview", "apply", "total", "render", "git")}
    for r in range(rounds):
        reset(laptop)
        reset(plain)
        # a fresh sync record each round: the undo log's blobs are not in Patchwire's store yet,
        # as at the first apply after a sync
        os.environ["XDG_STATE_HOME"] = str(tmp / f"state-{r}")
        project = pw.Project(laptop, "laptop")
        base_tree, _ = project.record_paths(list(base))
        sides = ["pw", "git"] if r % 2 == 0 else ["git", "pw"]
        for side in sides:
            if side == "pw":
                for key, value in patchwire_apply(project, patch, base_tree, tmp / "apply-preview.txt").items():
                    times[key].append(value)
            else:
                times["git"].append(timed(lambda: git(plain, "apply", "--binary", str(tmp / "apply.patch"))))
        for root in (laptop, plain):
            if tree_of_worktree(root) != want:
                raise SystemExit(f"check failed: {root.name} after the apply is not the box's tree")
    ratio = statistics.median(t / g for t, g in zip(times["total"], times["git"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    sections = patch.count(b"\ndiff --git ") + 1
    lines = patch.count(b"\n")
    return [f"### Apply: {sections} files, {len(patch) / 1e6:.1f} MB patch, {lines:,} lines, "
            f"{rounds} rounds, Python {sys.version.split()[0]}", "",
            "| | median |", "|---|---|",
            f"| first screen of the coloured preview, from the patch bytes (PatchReading) | {med['preview']:.3f} s |",
            f"| the rest read, vetted and computed (PatchReading.finish) | {med['read']:.3f} s |",
            f"| Applier.apply (undo log, results written; git apply when not as synced) | {med['apply']:.3f} s |",
            f"| **Patchwire: preview and apply** | **{med['total']:.3f} s** |",
            f"| `git apply --binary` alone | {med['git']:.3f} s |",
            f"| **Patchwire / git apply** (median of per-round ratios) | **{ratio:.2f}x** |",
            f"| (not counted: the whole coloured preview, to a file) | {med['render']:.3f} s |", ""]


def preview_change(lines: int, seed: int) -> Tuple[Dict[str, bytes], Dict[str, bytes]]:
    """About `lines` diff lines: 400 files edited in many places, every tenth rewritten whole."""
    rng = random.Random(seed)
    old, new = Source(rng, "o"), Source(rng, "n")
    nfiles = max(4, lines // 190)
    base = {f"src/pkg{i % 17}/view{i}.py": old.text(old.size(4_000, 40_000)) for i in range(nfiles)}
    after = {}
    for i, (path, data) in enumerate(sorted(base.items())):
        after[path] = new.text(len(data) // 3) if i % 10 == 0 else edited(old, data, 25)
    return base, after


def first_screen_whole(project: "pw.Project", patch: bytes) -> list:
    """The first screen with every file read, vetted and computed first (as before issue 27's
    lazy reading; what `--yes` and `--json` still do, having no screen)."""
    files = pw.vet_on_disk(project.root, pw.split_patch(patch))
    pw.compute_results(project, files, None)
    return list(itertools.islice(preview_lines(files, pw.Style(True)), SCREEN))


def first_screen(project: "pw.Project", patch: bytes) -> list:
    """The first screen as preview() shows it: the headers read and vetted, the bodies as reached."""
    return list(itertools.islice(preview_lines(pw.PatchReading(project, patch), pw.Style(True)), SCREEN))


def first_diff_screen(project: "pw.Project", patch: bytes) -> list:
    """The diff's own first screen (past the notes and the summary): the first files' bodies too."""
    return list(itertools.islice(pw.diff_lines(pw.PatchReading(project, patch).sections(), pw.Style(True)), SCREEN))


def stream_to(path: Path, project: "pw.Project", patch: bytes) -> None:
    """The whole preview from the patch bytes, as preview() streams it: read as it is rendered."""
    reading = pw.PatchReading(project, patch)
    with open(path, "wb") as out:
        for chunk in pw.batched(preview_lines(reading, pw.Style(True)), 1000):
            out.write(("\n".join(chunk) + "\n").encode("utf-8", "replace"))
    reading.finish()


def preview_scenario(tmp: Path, lines: int, rounds: int) -> List[str]:
    base, after = preview_change(lines, 28)
    box, patch = box_patch(tmp, "preview-box", base, after)
    project = pw.Project(repo(tmp / "preview-laptop", base), "preview")
    project.record_paths(list(base))
    files = pw.vet_on_disk(project.root, pw.split_patch(patch))
    pw.compute_results(project, files, None)
    diff_lines = sum(1 for line in patch.split(b"\n") if line[:1] in (b"+", b"-", b" "))
    times: Dict[str, List[float]] = {k: [] for k in ("whole", "first", "diff", "screen", "full", "stream", "git")}
    out = tmp / "preview.txt"
    for r in range(rounds):
        for side in (["pw", "git"] if r % 2 == 0 else ["git", "pw"]):
            if side == "pw":
                times["whole"].append(timed(lambda: first_screen_whole(project, patch)))
                times["first"].append(timed(lambda: first_screen(project, patch)))
                times["diff"].append(timed(lambda: first_diff_screen(project, patch)))
                times["screen"].append(timed(lambda: list(itertools.islice(preview_lines(files, pw.Style(True)),
                                                                           SCREEN))))
                times["full"].append(timed(lambda: render_to(out, files)))
                times["stream"].append(timed(lambda: stream_to(out, project, patch)))
            else:
                with open(tmp / "git-diff.txt", "wb") as to:
                    times["git"].append(timed(lambda: subprocess.run(
                        ["git", "diff", "--color", "-M", "HEAD~", "HEAD"], cwd=box, env=GIT_ENV, stdout=to,
                        check=True)))
    ratio = statistics.median(f / g for f, g in zip(times["full"], times["git"]))
    stream_ratio = statistics.median(f / g for f, g in zip(times["stream"], times["git"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return [f"### Coloured preview: {len(files)} files, {diff_lines:,} diff lines, {rounds} rounds, "
            f"Python {sys.version.split()[0]}", "",
            "| | median |", "|---|---|",
            f"| first screen ({SCREEN} lines) from the patch bytes, every file read, vetted and computed first "
            f"| {med['whole']:.3f} s |",
            f"| **first screen from the patch bytes, read as shown** (PatchReading: headers read and vetted) "
            f"| **{med['first']:.3f} s** |",
            f"| the diff's first screen from the patch bytes, read as shown (its first files' bodies too) "
            f"| {med['diff']:.3f} s |",
            f"| first screen, the patch read and vetted already | {med['screen']:.4f} s |",
            f"| full coloured render of the patch read, to a file | {med['full']:.3f} s |",
            f"| the whole preview from the patch bytes, read as shown, to a file | {med['stream']:.3f} s |",
            f"| `git diff --color -M`, to a file | {med['git']:.3f} s |",
            f"| **full render / git diff --color** (median of per-round ratios) | **{ratio:.2f}x** |",
            f"| whole preview from the patch bytes / git diff --color | {stream_ratio:.2f}x |", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--preview-lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("apply", "preview"), help="run one scenario")
    parser.add_argument("--quick", action="store_true", help="60 files, 2 MB, 4,000 preview lines, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.mb, args.preview_lines, args.rounds = 60, 2, 4000, 2
    tmp = Path(tempfile.mkdtemp(prefix="patchwire-bench-apply-"))
    os.environ["XDG_STATE_HOME"] = str(tmp / "state")
    try:
        out = apply_scenario(tmp, args.files, args.mb, args.rounds) if args.only != "preview" else []
        out += preview_scenario(tmp, args.preview_lines, args.rounds) if args.only != "apply" else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
