#!/usr/bin/env bash
# Install a real VS Code for the extension's end-to-end test (tests/test_vscode_e2e.py): code-server
# (the browser build of VS Code) with its own Node 24, pinned, into ~/.cache/patchwire-tests/code-server
# ($PATCHWIRE_CODE_SERVER_DIR, else $XDG_CACHE_HOME/patchwire-tests/code-server),
# from the npm registry only; Debian's chromium and chromedriver drive it headless.
#
# Idempotent and quiet: does nothing when the pinned version is installed completely (a marker
# file is written last, so an install that failed half-way is redone, not trusted). About 80 s
# and 800 MB the first time. Exit 3 when the registry cannot be reached (the test then skips,
# loudly); any other failure exits 1 with npm's own message.
#
# VS Code's native modules build on install; `kerberos` needs the GSSAPI headers (libkrb5-dev).
# Usage: tests/install_code_server.sh        (CODE_SERVER_VERSION overrides the pin)
set -euo pipefail

VERSION="${CODE_SERVER_VERSION:-4.139.1}"
# Outside the checkout, so a fresh clone (CI's) finds it installed: ~95 s saved a run.
DIR="${PATCHWIRE_CODE_SERVER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/patchwire-tests/code-server}"  # npm takes the folder name
MARKER="$DIR/installed-$VERSION"
[ -f "$MARKER" ] && [ -x "$DIR/bin/code-server" ] && exit 0

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ -f /usr/include/gssapi/gssapi.h ] || missing+=(libkrb5-dev)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v npm >/dev/null || { echo "install_code_server.sh: npm not found; install Node.js 20+ first" >&2; exit 1; }

rm -rf "$DIR"
mkdir -p "$DIR"
cd "$DIR"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() {
    cat "$log" >&2
    if grep -qE 'ENOTFOUND|EAI_AGAIN|ETIMEDOUT|ECONNREFUSED|ENETUNREACH|network' "$log"; then
        echo "install_code_server.sh: the npm registry cannot be reached (no network)" >&2
        exit 3
    fi
    echo "install_code_server.sh: $1 failed (see above)" >&2
    exit 1
}
npm init -y >/dev/null
# code-server needs Node 24; the npm package `node` brings that binary from the registry.
npm install --no-audit --no-fund --loglevel=error node@24 >"$log" 2>&1 || fail "npm install node@24"
export PATH=$DIR/node_modules/.bin:$PATH
npm install --no-audit --no-fund --loglevel=error --ignore-scripts "code-server@$VERSION" >"$log" 2>&1 \
    || fail "npm install code-server@$VERSION"
# Its postinstall fetches VS Code's own dependencies from the registry; it reads the Node version
# from npm's user agent, which is unset when run by hand.
(cd node_modules/code-server && \
    npm_config_user_agent="npm/$(npm --version) node/$(node --version) linux x64" sh ./postinstall.sh) \
    >"$log" 2>&1 || fail "code-server's postinstall"
mkdir -p bin
ln -sf ../node_modules/.bin/node bin/node
cat >bin/code-server <<SH
#!/bin/sh
PATH="$DIR/node_modules/.bin:\$PATH" exec "$DIR/node_modules/.bin/code-server" "\$@"
SH
chmod +x bin/code-server
"$DIR/bin/code-server" --version | head -1
touch "$MARKER"
