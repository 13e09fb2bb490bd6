#!/usr/bin/env bash
# Build dist/patchwire and dist/patchwire-agent: shiv zipapps that each carry both
# modules plus pure-Python tomli and tomli-w, byte-identical from one build to the next.
#
# It brings its own pinned build tools: a virtualenv in build/venv from requirements-build.txt
# (made once). Wheels are cached in wheels/: only the first build needs the network.
# dist/SHA256SUMS lets an air-gapped install check the copies: `sha256sum -c SHA256SUMS`
# (macOS: `shasum -a 256 -c SHA256SUMS`).
# Environment: PYTHON (default python3, 3.9+), SOURCE_DATE_EPOCH (default: last commit).
set -euo pipefail
cd "$(dirname "$0")"

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# One build at a time (the tests run in two workers): a second waits for the first, then builds
# the same bytes again. macOS has no flock(1); builds there are not run side by side.
mkdir -p build
if command -v flock >/dev/null; then
    exec 9>build/.build.lock
    flock 9
fi
VENV=build/venv
if ! "$VENV/bin/python" -c "import shiv" 2>/dev/null \
        || ! cmp -s requirements-build.txt "$VENV/requirements-build.txt"; then
    echo "build.sh: installing the pinned build tools into $VENV"
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r requirements-build.txt
    cp requirements-build.txt "$VENV/requirements-build.txt"
fi
PYTHON=$VENV/bin/python
STAGE=build/zipapp-site
# Pure wheels only: tomli's CPython wheels are mypyc-compiled and would tie the pyz to one Python.
PURE=(--only-binary=:all: --platform any --implementation py --abi none --python-version 3.9)

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}

if ! "$PYTHON" -m pip download -q --no-index --find-links wheels "${PURE[@]}" \
        -r requirements-zipapp.txt -d wheels 2>/dev/null; then
    echo "build.sh: downloading wheels into wheels/"
    "$PYTHON" -m pip download -q "${PURE[@]}" -r requirements-zipapp.txt -d wheels
fi

rm -rf "$STAGE"
# From find-links rather than wheel paths, so pip records no absolute direct_url.json.
"$PYTHON" -m pip install -q --no-index --find-links wheels --no-deps --no-compile \
    "${PURE[@]}" --target "$STAGE" -r requirements-zipapp.txt
cp patchwire.py patchwire_agent.py "$STAGE"/
# shiv stores file modes: make them independent of the umask.
chmod -R u=rwX,go=rX "$STAGE"

# Built into a folder of its own and moved into dist/ at the end: a program running from dist/
# (a test, a copy being made) never reads a half-written file, and a failed build leaves the last
# good one in place.
mkdir -p dist
OUT=$(mktemp -d build/out.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
# --compile-pyc: the first start after an install (which unpacks the zipapp into ~/.shiv)
# compiles every module to bytecode, in worker processes, before importing any. Without it, that
# first start compiles the modules in the process itself and keeps the compiler's ~10 MB
# (the agent, a service started once: 34-41 MB idle instead of 25-28 MB; bench/RESULTS.md).
# The bytecode is for the Python that unpacks; another version writes its own, as usual.
for app in patchwire:patchwire patchwire-agent:patchwire_agent; do
    "$PYTHON" -m shiv --reproducible --compile-pyc --python '/usr/bin/env python3' \
        --site-packages "$STAGE" -e "${app#*:}:main" -o "$OUT/${app%%:*}"
done

# A faster start: shiv's __main__ imports its bootstrap from the zip at every start (zipimport
# keeps no bytecode, so it is compiled each time) and with it compileall, subprocess, zipfile,
# hashlib and runpy: ~25 ms before our module. Once a start has unpacked the zipapp, the unpacked
# copy is all we need, so the new __main__ goes straight to it (only os and sys, the same path
# and sys.path order as shiv's); the first start, or any SHIV_* setting other than SHIV_ROOT,
# still runs shiv's bootstrap unchanged. The zip is rewritten entry by entry: still reproducible.
"$PYTHON" - "$OUT/patchwire" "$OUT/patchwire-agent" <<'PY'
import json, sys, zipfile
FAST = """# -*- coding: utf-8 -*-
# build.sh: once shiv has unpacked this zipapp, start from the unpacked copy; else shiv's bootstrap
import os, sys
def _unpacked():
    if any(k.startswith("SHIV_") and k != "SHIV_ROOT" for k in os.environ):
        return None
    root = os.environ.get("SHIV_ROOT") or os.path.expanduser("~/.shiv")
    name = os.path.basename(os.path.realpath(sys.argv[0])) + "_" + %(build_id)r
    site = os.path.join(root, name, "site-packages")
    return site if os.path.isdir(site) else None
_site = _unpacked()
if _site is None:
    import _bootstrap
    _bootstrap.bootstrap()
else:
    _at = next((i for i, p in enumerate(sys.path) if os.path.basename(p) in ("site-packages", "dist-packages")),
               len(sys.path))
    sys.path.insert(_at, _site)
    from %(module)s import %(fn)s
    sys.exit(%(fn)s())
"""
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    shebang = data[:data.index(b"\n") + 1]
    with zipfile.ZipFile(path) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    env = json.loads(dict((i.filename, d) for i, d in entries)["environment.json"])
    module, fn = env["entry_point"].split(":")
    main = (FAST % {"build_id": env["build_id"], "module": module, "fn": fn}).encode()
    with open(path, "wb") as f:
        f.write(shebang)
        with zipfile.ZipFile(f, "w") as new:
            for info, body in entries:
                new.writestr(info, main if info.filename == "__main__.py" else body)
PY

for f in patchwire patchwire-agent; do
    echo "built dist/$f: $(wc -c <"$OUT/$f" | tr -d ' ') bytes"
done

# The VS Code extension (editors/vscode/package.sh), when Node is here: npm fetches the pinned
# vsce only the first time; a failure to do so leaves the zipapps built and says why, loudly.
if command -v node >/dev/null && command -v npm >/dev/null; then
    if bash editors/vscode/package.sh "$OUT/patchwire-vscode.vsix" >/dev/null; then
        echo "built dist/patchwire-vscode.vsix: $(wc -c <"$OUT/patchwire-vscode.vsix" | tr -d ' ') bytes"
    else
        echo "build.sh: WARNING: dist/patchwire-vscode.vsix NOT built (see above)" >&2
    fi
else
    echo "build.sh: no Node.js here: dist/patchwire-vscode.vsix not built"
fi

# sha256sum's own format, written by Python so that it is the same on macOS and Linux.
"$PYTHON" - "$OUT/patchwire" "$OUT/patchwire-agent" "$OUT/patchwire-vscode.vsix" >"$OUT/SHA256SUMS" <<'PY'
import hashlib, os, sys
for path in filter(os.path.exists, sys.argv[1:]):
    with open(path, "rb") as f:
        print(f"{hashlib.sha256(f.read()).hexdigest()}  {os.path.basename(path)}")
PY
# each file replaced in one rename; SHA256SUMS last, so it never names a file not yet in place
[ -f "$OUT/patchwire-vscode.vsix" ] || rm -f dist/patchwire-vscode.vsix
for f in patchwire patchwire-agent patchwire-vscode.vsix SHA256SUMS; do
    [ ! -f "$OUT/$f" ] || mv -f "$OUT/$f" "dist/$f"
done
echo "wrote dist/SHA256SUMS"
