#!/usr/bin/env bash
# Package the VS Code extension: OUT (default dist/patchwire-vscode.vsix at the repository root),
# byte-identical from one build to the next. build.sh calls it when Node is present.
#
# @vscode/vsce is pinned in package.json (devDependency, with package-lock.json); `npm ci` puts it
# in node_modules/ once, and later builds run offline from there. The package holds exactly
# package.json, extension.js, lib/, README.md and LICENSE: they are staged in a folder of their
# own with fixed modes, so tests, node_modules and the lock file never go in.
# `package.sh --install` only installs vsce (.ci/run does, before the tests).
# Environment: SOURCE_DATE_EPOCH (default: the last commit's time; vsce then fixes mtimes and order).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
install_only=$([ "${1:-}" = "--install" ] && echo 1 || true)
[ -n "$install_only" ] || out=$(realpath -m "${1:-$root/dist/patchwire-vscode.vsix}")
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 315532800)}
cd "$here"

pinned=$(node -p "require('./package.json').devDependencies['@vscode/vsce']")
have=$(node -p "try { require('./node_modules/@vscode/vsce/package.json').version } catch (e) { '' }")
if [ "$have" != "$pinned" ]; then
    echo "package.sh: installing @vscode/vsce $pinned into editors/vscode/node_modules"
    npm ci --no-audit --no-fund --loglevel=error
fi
[ -z "$install_only" ] || exit 0

# a stage of its own (a build and a test may package at once), removed when done
mkdir -p "$root/build"
stage=$(mktemp -d "$root/build/vscode-extension.XXXXXX")
trap 'rm -rf "$stage" "$stage.vsix"' EXIT
cp -R package.json extension.js lib README.md "$stage"/
cp "$root/LICENSE" "$stage"/
chmod -R u=rwX,go=rX "$stage"
mkdir -p "$(dirname "$out")"
# written beside the stage, then moved into place in one rename: never read half-written
(cd "$stage" && "$here/node_modules/.bin/vsce" package --no-dependencies --allow-missing-repository \
    --no-update-package-json --out "$stage.vsix" >/dev/null)
mv -f "$stage.vsix" "$out"
echo "built ${out#"$root"/}: $(wc -c <"$out" | tr -d ' ') bytes"
