#!/usr/bin/env bash
# Offline checks of the Grafana dashboard and of the PromQL in the alert rules
# (dashboard_check.mjs); skipped (77) where Node.js is not installed.
# Usage: dashboard_test.sh REPO_ROOT NPM_DIR
set -u
REPO=$1 NPM_DIR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
bash "$HERE/npm_env.sh" "$NPM_DIR" >/dev/null
rc=$?; [ $rc = 0 ] || exit $rc
exec node "$HERE/dashboard_check.mjs" "$NPM_DIR" "$REPO/deploy/grafana/sparsekv-dashboard.json" \
  "$REPO/deploy/prometheus/sparsekv.rules.yml"
