#!/usr/bin/env bash
# dockerfile-utils on both Dockerfiles (dockerfile_lint.mjs); skipped (77) without Node.js.
# Usage: dockerfile_lint_test.sh REPO_ROOT NPM_DIR
set -u
REPO=$1 NPM_DIR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
bash "$HERE/npm_env.sh" "$NPM_DIR" >/dev/null
rc=$?; [ $rc = 0 ] || exit $rc
exec node "$HERE/dockerfile_lint.mjs" "$NPM_DIR" "$REPO/deploy/docker/Dockerfile.cpu" \
  "$REPO/deploy/docker/Dockerfile.cuda"
