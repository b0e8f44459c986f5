#!/usr/bin/env bash
# Installs the npm packages pinned in package-lock.json (beside this script) into DIR, once per
# lock content, and prints DIR. Tests that validate with npm packages call it first.
#
# Usage: npm_env.sh DIR
# Exits 77 (ctest: skipped) when Node.js >= 18 or npm is missing: neither is part of a fresh
# Debian 12 machine's setup (deploy/dev/setup.sh). A failing install is a failure (exit 1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: npm_env.sh DIR}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "SKIP: node or npm not installed" >&2
  exit 77
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
  echo "SKIP: node $(node --version) is older than 18" >&2
  exit 77
fi

mkdir -p "$dir"
stamp=$dir/.lock.sha256
want=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)
# Tests run in parallel under ctest -j: one installs, the others wait for it.
exec 9>"$dir/.install.lock"
flock 9
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -d "$dir/node_modules" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  echo "npm_env: installing pinned packages into $dir" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false >&2)
  echo "$want" >"$stamp"
fi
echo "$dir"
