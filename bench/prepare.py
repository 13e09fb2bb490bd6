#!/usr/bin/env python3
"""Job-preparation benchmark: does preparing a job folder grow with the change or with the project?

    python3 bench/prepare.py                  # 20,000 files against 200 files (default)
    python3 bench/prepare.py --quick          # 2,000 against 200, 3 rounds (CI smoke)
    python3 bench/prepare.py --files 50000 --repeat 7

For each project size it generates a synthetic Flutter-like project (nested lib/, test/, android/,
ios/, assets/, a .gitignore that ignores build/ and .dart_tool/; 1-6 KB a file) straight into the
agent's mirror, as rsync would leave it, and then drives the agent's real code:

    laptop   tree id + manifest of the files it sends (a stand-in that computes what
             patchwire.Project.record does, or with --laptop the real thing)
    agent    ProjectRepo.snapshot(tree, manifest)          -> snapshot commit   ("snapshot first")
    agent    ProjectRepo.prepare_slot(0, commit)           -> job folder        ("cold prepare",
                                                              includes `git worktree add`)
    then, --repeat times ("warm" rounds):
             the previous job leaves one edited file, one new file and one deleted file behind
             (and, made once after the cold preparation, a build cache under build/ and
             .dart_tool/, which .gitignore ignores);
             the laptop changes ONE file, records, the mirror gets it;
    agent    ProjectRepo.snapshot(...)                      ("snapshot next", median)
    agent    ProjectRepo.prepare_slot(0, commit)            ("warm prepare", median)

and, as the baseline the warm path replaces, a fresh `git worktree add --detach` of the same
snapshot commit into a new folder ("fresh add", median of --fresh-repeat), through the same git
dir and settings. Before each timed step the page cache is flushed (os.sync, not timed) so no
step pays for an earlier step's writeback. Git calls are timed per command for a breakdown.

After every preparation the job folder is checked independently of ProjectRepo's own check: HEAD
is the snapshot, `git status --porcelain --untracked-files=all` is empty, the changed file has the
laptop's bytes, the job's leftovers are gone, and the build cache is still there byte for byte.
Exit status: 0 when it ran and every check held, 1 when a check failed, 2 on bad usage.

Only the standard library and the repository's own modules are used. Everything lives in a temporary
folder under /tmp, removed at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patchwire as pw  # noqa: E402
import patchwire_agent as pa  # noqa: E402

SMALL_FILES = 200
SLOT = 0

# ================================================================== timing of git calls

# Every git call of the agent goes through patchwire.Git.run; wrapping it (in this process only)
# gives a per-command breakdown of where a snapshot or a preparation spends its time.
_calls: Optional[List[Tuple[str, float]]] = None
_orig_git_run = pw.Git.run


def _timed_git_run(self, *args, **kw):
    start = time.perf_counter()
    try:
        return _orig_git_run(self, *args, **kw)
    finally:
        if _calls is not None:
            _calls.append(("git " + (args[0] if args else "?"), time.perf_counter() - start))


pw.Git.run = _timed_git_run


def timed(func: Callable, *args, **kw):
    """(result, seconds, [(step, seconds)]) of one call."""
    global _calls
    _calls = []
    start = time.perf_counter()
    try:
        result = func(*args, **kw)
    finally:
        elapsed = time.perf_counter() - start
        steps, _calls = _calls, None
    return result, elapsed, steps


# ================================================================== a synthetic Flutter-like project

GITIGNORE = """\
# Flutter/Dart
.dart_tool/
.packages
.pub-cache/
.pub/
build/
.flutter-plugins
.flutter-plugins-dependencies
# IDE
.idea/
*.iml
.vscode/
# Android / iOS
android/.gradle/
android/local.properties
android/app/debug/
ios/Pods/
ios/.symlinks/
*.log
"""

WORDS = ("account order cart item price user session theme route token cache profile search "
         "filter payment invoice address message thread upload image avatar settings locale "
         "currency badge banner coupon review rating stock shipment tracker wallet").split()

DART_LINES = [
    "  final {T} _{w} = {T}();",
    "  late final StreamController<{T}> _{w}Controller;",
    "  Future<void> load{W}() async {{ await _{w}.refresh(); notifyListeners(); }}",
    "  {T}? get {w} => _{w}.isEmpty ? null : _{w}.first;",
    "  @override",
    "  Widget build(BuildContext context) {{ return Padding(padding: const EdgeInsets.all({n}), child: Text('{w}')); }}",
    "  // TODO({w}): handle the {w2} case when {w3} is null",
    "  void on{W}Changed(String value) => setState(() => _{w2} = value.trim());",
    "  static const double {w}Spacing = {n}.0;",
    "  if (state is {T}Loading) return const CircularProgressIndicator();",
    "  final response = await client.get(Uri.parse('$baseUrl/{w}/{n}'));",
    "  return {T}.fromJson(jsonDecode(response.body) as Map<String, dynamic>);",
    "  Map<String, dynamic> toJson() => {{'{w}': {w}, '{w2}': {w2}, 'id': id}};",
    "  expect(find.text('{w}'), findsOneWidget);",
    "  await tester.tap(find.byKey(const Key('{w}_{n}')));",
    "  await tester.pumpAndSettle();",
    "  assert({w}.length <= {n}, '{w} too long');",
    "  for (final {w} in {w2}s) {{ total += {w}.amount * {n}; }}",
    "  throw StateError('{w} not ready: ${w2}');",
    "",
]

KOTLIN_LINES = [
    "    private val {w}: {T} = {T}()",
    "    override fun on{W}(savedInstanceState: Bundle?) {{ super.on{W}(savedInstanceState) }}",
    "    fun {w}Channel(engine: FlutterEngine) = MethodChannel(engine.dartExecutor, \"{w}/{n}\")",
    "    // {w} handled by the {w2} plugin",
    "",
]


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


class Lines:
    """A pool of formatted source lines; files draw from it (fast, and still every file differs)."""

    def __init__(self, rng: random.Random, templates: List[str], size: int = 4000):
        self.pool = []
        for _ in range(size):
            w, w2, w3 = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
            self.pool.append(rng.choice(templates).format(w=w, w2=w2, w3=w3, W=_cap(w), T=_cap(w2) + _cap(w3),
                                                          n=rng.randrange(1, 999)) + "\n")
        self.mean = sum(map(len, self.pool)) / len(self.pool)

    def text(self, rng: random.Random, header: str, size: int) -> bytes:
        body = "".join(rng.choices(self.pool, k=max(1, int(size / self.mean))))
        return (header + "\n" + body + "}\n").encode()


def project_files(count: int, seed: int = 7) -> Dict[str, bytes]:
    """{path: content} of a Flutter-like project of exactly `count` files (a few KB each)."""
    rng = random.Random(seed)
    dart, kotlin = Lines(rng, DART_LINES), Lines(rng, KOTLIN_LINES)
    files: Dict[str, bytes] = {
        ".gitignore": GITIGNORE.encode(),
        "pubspec.yaml": b"name: bench_app\nversion: 1.0.0+1\nenvironment:\n  sdk: '>=3.0.0 <4.0.0'\n"
                        b"dependencies:\n  flutter:\n    sdk: flutter\n  provider: ^6.0.0\n",
        "analysis_options.yaml": b"include: package:flutter_lints/flutter.yaml\n",
        "README.md": b"# bench_app\n\nA synthetic project for patchwire's preparation benchmark.\n",
        "lib/main.dart": b"import 'package:flutter/material.dart';\n\nvoid main() => runApp(const App());\n",
        "android/app/build.gradle": b"android {\n    compileSdkVersion 34\n}\n",
        "android/app/src/main/AndroidManifest.xml": b"<manifest package=\"com.example.bench\"/>\n",
        "ios/Runner/Info.plist": b"<?xml version=\"1.0\"?>\n<plist version=\"1.0\"><dict/></plist>\n",
        "web/index.html": b"<!DOCTYPE html>\n<html><body><script src=\"main.dart.js\"></script></body></html>\n",
    }
    counters: Dict[str, int] = {}

    def place(folder: str, per_folder: int = 24) -> str:
        """The next file index in `folder`, spilling into numbered subfolders (nested tree)."""
        n = counters.get(folder, 0)
        counters[folder] = n + 1
        return f"{folder}/part_{n // per_folder:03d}" if n >= per_folder else folder

    kinds = (["lib"] * 50 + ["test"] * 25 + ["android"] * 8 + ["ios"] * 7 + ["assets"] * 10)
    i = 0
    while len(files) < count:
        kind = rng.choice(kinds)
        feature = f"feature_{rng.randrange(max(1, count // 150)):03d}"
        size = rng.randrange(1000, 6000)
        if kind == "lib":
            layer = rng.choice(["data/models", "data/repositories", "domain", "presentation/widgets",
                                "presentation/pages", "state"])
            folder = place(f"lib/src/{feature}/{layer}")
            path = f"{folder}/{rng.choice(WORDS)}_{i}.dart"
            files[path] = dart.text(rng, f"// {path}\nimport 'package:flutter/material.dart';\n"
                                f"class {_cap(rng.choice(WORDS))}{i} extends ChangeNotifier {{", size)
        elif kind == "test":
            folder = place(f"test/{feature}")
            path = f"{folder}/{rng.choice(WORDS)}_{i}_test.dart"
            files[path] = dart.text(rng, f"// {path}\nimport 'package:flutter_test/flutter_test.dart';\n"
                                f"void main() {{ testWidgets('{i}', (tester) async {{", size)
        elif kind == "android":
            folder = place(f"android/app/src/main/kotlin/com/example/bench/{feature}")
            path = f"{folder}/{_cap(rng.choice(WORDS))}{i}.kt"
            files[path] = kotlin.text(rng, f"// {path}\npackage com.example.bench\nclass Plugin{i} {{", size // 2)
        elif kind == "ios":
            folder = place(f"ios/Runner/{feature}")
            path = f"{folder}/{_cap(rng.choice(WORDS))}{i}.swift"
            files[path] = kotlin.text(rng, f"// {path}\nimport Flutter\nclass Plugin{i} {{", size // 2)
        else:
            folder = place(f"assets/{rng.choice(['images', 'icons', 'i18n'])}")
            if "i18n" in folder:
                path = f"{folder}/strings_{i}.json"
                files[path] = ("{\n" + ",\n".join(f'  "{rng.choice(WORDS)}_{k}": "{rng.choice(WORDS)}"'
                                                  for k in range(size // 30)) + "\n}\n").encode()
            else:
                path = f"{folder}/{rng.choice(WORDS)}_{i}.png"
                files[path] = b"\x89PNG\r\n\x1a\n" + rng.randbytes(size // 2)
        i += 1
    return files


def write_files(root: Path, files: Dict[str, bytes]) -> None:
    made = set()
    for path, data in files.items():
        target = root / path
        parent = target.parent
        if parent not in made:
            parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        target.write_bytes(data)


# ================================================================== checks


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def slot_git(repo: pa.ProjectRepo) -> pw.Git:
    """Our own git handle on the job folder (through its worktree git dir), for the checks."""
    return pw.Git(git_dir=repo.git_dir / "worktrees" / f"slot{SLOT}", work_tree=repo.slot_path(SLOT),
                  cwd=repo.home, env=repo.git_env)


def check_equals_snapshot(repo: pa.ProjectRepo, commit: str, label: str) -> None:
    git = slot_git(repo)
    head = git.text("rev-parse", "HEAD")
    check(head == commit, f"{label}: job folder HEAD is {head}, not the snapshot {commit}")
    dirty = git("status", "--porcelain", "-z", "--untracked-files=all", "--ignore-submodules=none")
    check(not dirty, f"{label}: job folder differs from the snapshot: {dirty[:300]!r}")
    # the index must hold exactly the snapshot's tree (status compares the worktree with the index)
    check(git.text("write-tree") == git.text("rev-parse", commit + "^{tree}"),
          f"{label}: job folder index is not the snapshot's tree")
    # these checks' own git calls may rewrite the index (a refresh): the agent would take an
    # index it did not write for a forged one and compare every file by content next time
    if hasattr(repo, "_seal_index"):  # (an agent from before the seal, for a before/after run)
        repo._seal_index(SLOT, commit)


def cache_digest(folder: Path) -> Dict[str, str]:
    out = {}
    for name in ("build", ".dart_tool"):
        for dirpath, _dirs, files in os.walk(folder / name):
            for f in files:
                p = Path(dirpath) / f
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_build_cache(folder: Path) -> Dict[str, str]:
    """A small stand-in for `flutter build`/`flutter test` output: ignored, must survive."""
    rng = random.Random(11)
    cache = {".dart_tool/package_config.json": b'{"configVersion": 2, "packages": []}\n',
             ".dart_tool/flutter_build/dart_plugin_registrant.dart": b"// generated\n"}
    for k in range(40):
        cache[f"build/app/intermediates/dex/classes{k}.dex"] = rng.randbytes(2048)
        cache[f".dart_tool/flutter_build/kernel/{k:02d}.dill"] = rng.randbytes(1024)
    write_files(folder, cache)
    return cache_digest(folder)


# ================================================================== one project size


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms" if seconds >= 0.0995 else f"{seconds * 1000:8.1f} ms"


class SizeResult:
    def __init__(self, files: int):
        self.files = files
        self.generate = 0.0
        self.record_first = 0.0
        self.record_next: List[float] = []
        self.snapshot_first = 0.0
        self.snapshot_next: List[float] = []
        self.cold = 0.0
        self.warm: List[float] = []
        self.fresh: List[float] = []
        self.warm_steps: List[List[Tuple[str, float]]] = []
        self.snapshot_steps: List[List[Tuple[str, float]]] = []
        self.collect: List[float] = []
        self.nat_snapshot: List[float] = []
        self.nat_collect: List[float] = []
        self.nat_prepare: List[float] = []
        self.collect_steps: List[List[Tuple[str, float]]] = []
        self.cache_files = 0


class Laptop:
    """The laptop's side of an ask: the tree id and manifest of the files it sends.

    The files are generated straight into the mirror (writing 20,000 files twice would double the
    run time on this disk), so the mirror doubles as the laptop's folder. By default a stand-in
    computes the same tree id as patchwire.Project.record would: a private git dir with its own
    persistent index, the files git does not ignore, `update-index --add --info-only` (hashes
    only what changed since the last call and, like the laptop, writes nothing into the box's
    object store) and `write-tree --missing-ok`. With --laptop the real Project.record runs.
    """

    def __init__(self, root: Path, name: str, tmp: Path, real: bool):
        self.root = root
        self.real = pw.Project(root, name) if real else None
        self.paths: List[str] = []
        git_dir = tmp / "laptop" / f"{name}.git"
        pw.prepare_private_git_dir(git_dir)
        self.git = pw.Git(git_dir=git_dir, work_tree=root, cwd=root,
                          env={"GIT_INDEX_FILE": str(git_dir / "laptop.index")})

    def record(self) -> Tuple[str, List[List[str]]]:
        if self.real:
            if not self.paths:
                self.paths = self.real.file_list(pw.DEFAULT_DENY, [])[0]
            return self.real.record_paths(self.paths)
        if not self.paths:  # the project's file set does not change in this benchmark
            out = self.git("ls-files", "-z", "--others", "--exclude-standard")
            self.paths = sorted(p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p)
        self.git("update-index", "--add", "--info-only", "-z", "--stdin",
                 input=b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in self.paths))
        tree = self.git.text("write-tree", "--missing-ok")
        return tree, [[mode, sha, path] for path, (mode, sha) in sorted(self.git.ls_files_stage().items())]


class Natural:
    """The box side of the script a user would write (`git add -A && git commit` before the AI,
    `git add -A && git diff --cached --binary -M HEAD` after it, `git reset --hard` to end) on
    the same project: a plain repository whose objects are borrowed from the agent's store
    (alternates), so starting it hashes nothing."""

    def __init__(self, root: Path, store: Path, commit: str, env: Dict[str, str]):
        root.mkdir()
        self.root = root
        self.git = pw.Git(git_dir=root / ".git", work_tree=root, cwd=root, env=env)
        pw.run(["git", "init", "-q", str(root)], env={**os.environ, **env})
        (root / ".git" / "objects" / "info" / "alternates").write_text(f"{store / 'objects'}\n")
        self.git("read-tree", commit)
        self.git("checkout-index", "-a", "-f")
        self.git("update-ref", "HEAD", commit)

    def snapshot(self) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", "s")

    def collect(self, patch: Path) -> None:
        self.git("add", "-A")
        with open(patch, "wb") as out:
            self.git.run("diff", "--cached", "--binary", "-M", "--no-ext-diff", "HEAD", stdout=out)

    def prepare(self) -> None:
        self.git("reset", "-q", "--hard")


def remove_fast(path: Path) -> None:
    """rm -rf (several times faster than shutil.rmtree on 20,000 files here)."""
    pw.run(["rm", "-rf", "--", str(path)])


def settle() -> None:
    """Flush earlier writes (generation, other measurements) so each timing starts from the same
    state instead of competing with background writeback."""
    os.sync()


def run_size(tmp: Path, count: int, repeat: int, fresh_repeat: int, real_laptop: bool,
             log: Callable[[str], None]) -> SizeResult:
    res = SizeResult(count)
    name = f"bench{count}"
    repo = pa.ProjectRepo(tmp / "state", "bench", name)

    start = time.perf_counter()
    files = project_files(count)
    write_files(repo.mirror, files)  # as rsync would leave it
    res.generate = time.perf_counter() - start
    log(f"[{count:,} files] generated {sum(len(v) for v in files.values()) / 1e6:.0f} MB "
        f"in {res.generate:.1f} s")

    laptop = Laptop(repo.mirror, name, tmp, real_laptop)
    settle()
    (tree, manifest), res.record_first, _ = timed(laptop.record)
    check(len(manifest) == count, f"the laptop lists {len(manifest)} files, expected {count}")
    settle()
    commit, res.snapshot_first, _ = timed(repo.snapshot, tree, manifest)
    settle()
    folder, res.cold, _ = timed(repo.prepare_slot, SLOT, commit)
    check(folder == repo.slot_path(SLOT), f"prepare_slot returned {folder}")
    check_equals_snapshot(repo, commit, f"{count} files, cold")
    log(f"[{count:,} files] laptop record {ms(res.record_first).strip()}, snapshot first "
        f"{ms(res.snapshot_first).strip()}, cold prepare {ms(res.cold).strip()}")

    cache = make_build_cache(folder)
    res.cache_files = len(cache)
    natural = Natural(tmp / f"natural{count}", repo.git_dir, commit, repo.git_env)
    editable = sorted(p for p in files if p.startswith("lib/src/"))
    rng = random.Random(3)

    for k in range(repeat):
        # what the previous job left behind in the job folder
        ai_edit, ai_delete = rng.sample(editable, 2)
        with open(folder / ai_edit, "ab") as f:
            f.write(b"// edited by the previous job\n")
        (folder / ai_delete).unlink()
        ai_new = folder / "lib" / "src" / f"ai_new_{k}.dart"
        ai_new.write_bytes(b"// a file the previous job created\n")
        settle()
        with open(tmp / "patch", "wb") as patch:
            (stats, _), t_collect, collect_steps = timed(repo.collect, SLOT, commit, f"bench{k}", patch, 1 << 30)
        check(stats["files"] == 3, f"collect saw {stats['files']} changed files, not 3")
        res.collect.append(t_collect)
        res.collect_steps.append(collect_steps)
        with open(natural.root / ai_edit, "ab") as f:  # the same job, under the natural script
            f.write(b"// edited by the previous job\n")
        (natural.root / ai_delete).unlink()
        (natural.root / "lib" / "src" / f"ai_new_{k}.dart").write_bytes(b"// a file the previous job created\n")
        settle()
        res.nat_collect.append(timed(natural.collect, tmp / "natural.patch")[1])
        settle()
        res.nat_prepare.append(timed(natural.prepare)[1])

        # the user's one change, as it arrives in the mirror
        changed = rng.choice(editable)
        data = files[changed] + f"// change {k}\n".encode()
        (repo.mirror / changed).write_bytes(data)
        (natural.root / changed).write_bytes(data)
        settle()
        res.nat_snapshot.append(timed(natural.snapshot)[1])
        settle()
        (tree, manifest), t_record, _ = timed(laptop.record)
        res.record_next.append(t_record)
        settle()
        commit, t_snap, snap_steps = timed(repo.snapshot, tree, manifest)
        res.snapshot_next.append(t_snap)
        res.snapshot_steps.append(snap_steps)
        settle()
        folder, t_warm, warm_steps = timed(repo.prepare_slot, SLOT, commit)
        res.warm.append(t_warm)
        res.warm_steps.append(warm_steps)

        label = f"{count} files, warm round {k + 1}"
        check_equals_snapshot(repo, commit, label)
        check((folder / changed).read_bytes() == data, f"{label}: {changed} is not the laptop's version")
        files[changed] = data
        check(not ai_new.exists(), f"{label}: the previous job's new file survived")
        check((folder / ai_delete).read_bytes() == files[ai_delete], f"{label}: deleted file not restored")
        check((folder / ai_edit).read_bytes() == files[ai_edit], f"{label}: the previous job's edit survived")
        now = cache_digest(folder)
        check(now == cache, f"{label}: the build cache did not survive "
                            f"({len(now)} of {len(cache)} files left, "
                            f"{sum(1 for p in cache if now.get(p) == cache[p])} unchanged)")
        log(f"[{count:,} files] warm round {k + 1}: laptop record {ms(t_record).strip()}, snapshot "
            f"{ms(t_snap).strip()}, prepare {ms(t_warm).strip()}; clean, build cache intact "
            f"({len(now)} files)")

    # the baseline: what each job would cost without a warm folder
    for k in range(fresh_repeat):
        target = repo.home / f"fresh{k}"
        settle()
        _, t_fresh, _ = timed(repo.git(), "worktree", "add", "--detach", "-f", str(target), commit)
        res.fresh.append(t_fresh)
        fresh_git = pw.Git(git_dir=repo.git_dir / "worktrees" / target.name, work_tree=target,
                           cwd=repo.home, env=repo.git_env)
        check(not fresh_git("status", "--porcelain", "-z", "--untracked-files=all"),
              f"{count} files: fresh worktree not clean")
        remove_fast(target)
        repo.git()("worktree", "prune")
        log(f"[{count:,} files] fresh git worktree add {ms(t_fresh).strip()}")
    return res


# ================================================================== report


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_breakdown(rounds: List[List[Tuple[str, float]]], total: List[float]) -> str:
    """Median time per step over the rounds, plus what is outside the steps (python)."""
    names: List[str] = []
    for steps in rounds:
        for step, _ in steps:
            if step not in names:
                names.append(step)
    parts = []
    for step in names:
        per_round = [sum(t for s, t in steps if s == step) for steps in rounds]
        parts.append(f"{step} {median(per_round) * 1000:.0f}")
    rest = [tot - sum(t for _, t in steps) for steps, tot in zip(rounds, total)]
    parts.append(f"other {median(rest) * 1000:.0f}")
    return ", ".join(parts) + " (ms, median)"


def natural_line(r: SizeResult) -> str:
    """Patchwire's step / the natural script's, per round, medians: prepare against `reset
    --hard`, collect against `add -A; diff --cached`, snapshot against `add -A; commit`."""
    def per(ours: List[float], theirs: List[float]) -> str:
        rounds = median([a / b for a, b in zip(ours, theirs)])
        return f"{ms(median(ours)).strip()} vs {ms(median(theirs)).strip()} ({rounds:.2f}x)"
    return (f"  {r.files:,} files: prepare {per(r.warm, r.nat_prepare)}; collect {per(r.collect, r.nat_collect)}; "
            f"snapshot {per(r.snapshot_next, r.nat_snapshot)}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def report(small: SizeResult, big: SizeResult, repeat: int, laptop: bool) -> str:
    rows = [("files", "snapshot first", "snapshot next", "cold prepare", "warm prepare", "(warm max)",
             "fresh wt add")]
    for r in (small, big):
        rows.append((f"{r.files:,}", ms(r.snapshot_first), ms(median(r.snapshot_next)), ms(r.cold),
                     ms(median(r.warm)), ms(max(r.warm)), ms(median(r.fresh))))
    widths = [max(len(row[i].strip()) for row in rows) for i in range(len(rows[0]))]
    lines = ["", f"Job preparation, one changed file per round (warm/next: median of {repeat} rounds; "
                 f"fresh add: median of {len(big.fresh)})", ""]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.strip().rjust(w) for cell, w in zip(row, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    w_small, w_big, f_big = median(small.warm), median(big.warm), median(big.fresh)
    lines += [
        "",
        f"warm prepare  {big.files:,} / {small.files:,} files: {ratio(w_big, w_small)}"
        f"   (project is {big.files / small.files:.0f}x larger; 1.0x = grows with the change only)",
        f"fresh add / warm prepare at {big.files:,} files:  {ratio(f_big, w_big)}"
        f"   (what the warm folder saves per job)",
        f"snapshot next {big.files:,} / {small.files:,} files: "
        f"{ratio(median(big.snapshot_next), median(small.snapshot_next))};"
        f"  snapshot first / next at {big.files:,}: "
        f"{ratio(big.snapshot_first, median(big.snapshot_next))}",
        f"(laptop's tree, {'patchwire.Project.record' if laptop else 'stand-in, update-index --info-only'}, "
        f"first / next at {big.files:,} files: {ms(big.record_first).strip()} / "
        f"{ms(median(big.record_next)).strip()}; not part of the box's preparation)",
        "",
        f"where warm prepare goes at {big.files:,} files: {step_breakdown(big.warm_steps, big.warm)}",
        f"where snapshot next goes at {big.files:,} files: "
        f"{step_breakdown(big.snapshot_steps, big.snapshot_next)}",
        f"collect (the previous job's 3 changes) {small.files:,} / {big.files:,} files: "
        f"{ms(median(small.collect)).strip()} / {ms(median(big.collect)).strip()}; where it goes at "
        f"{big.files:,}: {step_breakdown(big.collect_steps, big.collect)}",
        f"git processes per job on the box (snapshot next + prepare + collect): "
        f"{len(big.snapshot_steps[0]) + len(big.warm_steps[0]) + len(big.collect_steps[0])}",
        "",
        "against the natural script's box side on the same folder state (median of per-round ratios):",
        *(natural_line(r) for r in (small, big)),
        "",
        f"checks: job folder == snapshot after every preparation (HEAD, index tree, status "
        f"--untracked-files=all); previous job's edit/new/deleted file undone; build cache "
        f"({big.cache_files} files under build/ and .dart_tool/) intact after all "
        f"{len(small.warm) + len(big.warm)} warm preparations",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=None, help="files in the large project (default 20000)")
    ap.add_argument("--small", type=int, default=SMALL_FILES, help="files in the small project (default 200)")
    ap.add_argument("--repeat", type=int, default=None, help="warm rounds per size (default 5)")
    ap.add_argument("--fresh-repeat", type=int, default=2,
                    help="fresh `git worktree add` runs per size (default 2)")
    ap.add_argument("--quick", action="store_true", help="2,000 against 200 files, 3 rounds: a CI smoke run")
    ap.add_argument("--laptop", action="store_true",
                    help="compute each tree with the laptop's real patchwire.Project.record "
                         "(writes the laptop's blobs into its own object store)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    ap.add_argument("-q", "--quiet", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    big_n = args.files or (2000 if args.quick else 20000)
    repeat = args.repeat or (3 if args.quick else 5)
    if big_n < 20 or args.small < 20 or repeat < 1 or args.fresh_repeat < 1:
        ap.error("--files/--small need at least 20 files, --repeat/--fresh-repeat at least 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="patchwire-bench-", dir="/tmp"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "laptop-cache")  # for --laptop: Project's private dirs
    started = time.perf_counter()
    status = 1
    try:
        log(f"patchwire prepare benchmark: {big_n:,} vs {args.small:,} files, {repeat} warm rounds, "
            f"{os.cpu_count()} cpus (load {os.getloadavg()[0]:.1f}), "
            f"{pw.run(['git', '--version']).stdout.decode().strip()}, in {tmp}")
        small = run_size(tmp, args.small, repeat, args.fresh_repeat, args.laptop, log)
        big = run_size(tmp, big_n, repeat, args.fresh_repeat, args.laptop, log)
        print(report(small, big, repeat, args.laptop))
        status = 0
    except CheckFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
    except pw.PatchwireError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            remove_fast(tmp)
    print(f"\ntotal run time {time.perf_counter() - started:.0f} s (with clean-up), load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    return status


if __name__ == "__main__":
    sys.exit(main())
