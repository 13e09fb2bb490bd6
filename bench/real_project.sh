#!/usr/bin/env bash
# A real project tree of about 43,700 files (89 MB of content, 239 MB on disk) for `python3 bench/ask.py --real DIR`: what
# `npm install` of five widely used packages puts in node_modules, kept as the project's files
# (sizes from a few bytes to 9 MB, folders up to ~10,000 files deep in one: the shapes real code has).
# Usage: bash bench/real_project.sh DIR    (needs npm and its registry; about 15 s)
set -euo pipefail
dir=${1:?usage: bash bench/real_project.sh DIR}
mkdir -p "$dir"
cd "$dir"
[ -f package.json ] || echo '{"private": true}' >package.json
npm install --no-audit --no-fund --ignore-scripts --save-exact \
    @mui/icons-material@6.5.0 @mui/material@6.5.0 date-fns@3.6.0 rxjs@7.8.2 typescript@5.9.3 >/dev/null
echo "$(find . -type f -not -path './.git/*' | wc -l) files in $dir"
