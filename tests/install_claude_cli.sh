#!/usr/bin/env bash
# Install the real Claude Code CLI, pinned, into tests/.claude-cli/ (git-ignored)
# so tests can run it offline against tests/messages_api.py on loopback.
#
# Idempotent and quiet: does nothing when the pinned version is already there.
# 2.1.197 is the last release whose package.json accepts Node 20 (2.1.198 and
# later declare "node": ">=22.0.0"). The package pulls a native binary for this
# platform from the npm registry as an optional dependency (~235 MB); nothing
# else is downloaded.
#
# Usage: tests/install_claude_cli.sh        (CLAUDE_CLI_VERSION overrides the pin)
set -euo pipefail

VERSION="${CLAUDE_CLI_VERSION:-2.1.197}"
PREFIX="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.claude-cli"
PACKAGE_JSON="$PREFIX/node_modules/@anthropic-ai/claude-code/package.json"
BIN="$PREFIX/node_modules/.bin/claude"

installed_version() {
    [ -f "$PACKAGE_JSON" ] || return 0
    node -e 'process.stdout.write(require(process.argv[1]).version)' "$PACKAGE_JSON"
}

if [ -x "$BIN" ] && [ "$(installed_version)" = "$VERSION" ]; then
    exit 0
fi

command -v npm >/dev/null || { echo "install_claude_cli.sh: npm not found; install Node.js 20+ first" >&2; exit 1; }
mkdir -p "$PREFIX"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error \
        "@anthropic-ai/claude-code@$VERSION" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_claude_cli.sh: npm install of @anthropic-ai/claude-code@$VERSION failed (see above)" >&2
    exit 1
fi
if [ ! -x "$BIN" ] || [ "$(installed_version)" != "$VERSION" ]; then
    echo "install_claude_cli.sh: $BIN missing or not at $VERSION after npm install" >&2
    exit 1
fi
