#!/usr/bin/env bash
# Patchwire's whole job on this one machine, end to end:
#   a throwaway git project (the "laptop"), patchwire-agent on 127.0.0.1 (the "box"),
#   a local rsync mirror instead of SSH, and the AI: `claude` when it is installed, otherwise
#   the agent's built-in stand-in (`init --ai stand-in`), clearly labelled, that makes one small edit.
# It ends with the AI's change applied to the project and shown by git.
#   PATCHWIRE_DEMO_AI=stand-in forces the stand-in; PATCHWIRE_DEMO_KEEP=1 keeps the folder.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}

need() { command -v "$1" >/dev/null || { echo "demo: $1 is missing: $2" >&2; exit 1; }; }
need git "install git"
need "$py" "install Python 3.9 or newer"
if ! command -v rsync >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "demo: installing rsync"; apt-get update -qq && apt-get install -y -qq rsync >/dev/null
    else
        echo "demo: rsync is missing: install it (macOS has it; Debian/Ubuntu: sudo apt install rsync)" >&2; exit 1
    fi
fi
"$py" -c "import tomli_w" 2>/dev/null || "$py" -m pip install -q tomli-w tomli

work=$(mktemp -d "${TMPDIR:-/tmp}/patchwire-demo.XXXXXX")
agent_pid=""
cleanup() {
    [ -z "$agent_pid" ] || kill "$agent_pid" 2>/dev/null || true
    [ -n "${PATCHWIRE_DEMO_KEEP:-}" ] && echo "demo: kept $work" || rm -rf "$work"
}
trap cleanup EXIT
export HOME="$work/home" XDG_CACHE_HOME="$work/home/.cache"
mkdir -p "$HOME"

# --- the box: an agent on a free loopback port
if [ "${PATCHWIRE_DEMO_AI:-}" != stand-in ] && command -v claude >/dev/null; then
    echo "demo: AI = Claude Code ($(command -v claude))"; ai=claude
else
    echo "demo: AI = STAND-IN (built into patchwire-agent, not Claude: it appends your prompt to PATCHWIRE_DEMO.md)"
    ai=stand-in
fi
"$py" "$repo/patchwire_agent.py" init -c "$work/box/agent.toml" --user demo --ai "$ai" \
    --token-file "$work/demo.token" --listen 127.0.0.1:0 --state-dir "$work/box/state" 2>"$work/init.log" \
    || { cat "$work/init.log" >&2; exit 1; }
"$py" "$repo/patchwire_agent.py" serve -c "$work/box/agent.toml" >"$work/agent.out" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/agent.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/.*listening on //p' "$work/agent.out")
[ -n "$url" ] || { echo "demo: the agent did not start:" >&2; cat "$work/agent.log" >&2; exit 1; }

# --- the laptop: a small git project
mkdir -p "$work/laptop" && cd "$work/laptop"
git init -q
printf '# Hello app\n\nA tiny project for the Patchwire demo.\n' > README.md
printf 'API_KEY=never-leaves-this-machine\n' > .env
printf '.env\n' > .gitignore
pw() { "$py" "$repo/patchwire.py" "$@"; }
pw init --agent "$url" --token-file "$work/demo.token" --project hello
git add README.md .gitignore .patchwire.toml
git -c user.name=demo -c user.email=demo@localhost commit -qm "initial"

pw ask --yes "Add a short 'Usage' section to the README"
echo
git add --intent-to-add .    # so that the stat below counts new files too
echo "demo: the AI's change, applied to the project in $work/laptop:"
git --no-pager diff --stat
if [ -z "${PATCHWIRE_DEMO_KEEP:-}" ]; then
    echo "demo: that folder is removed now; run with PATCHWIRE_DEMO_KEEP=1 to keep it and look around"
fi
