#!/usr/bin/env bash
# Renders both Kubernetes overlays with `kubectl kustomize`, validates them offline
# (k8s_check.mjs), then starts the real server with each overlay's ConfigMap flags file and
# checks that it serves with the byte budget the file sets and uses its snapshot directory (a
# temporary one in place of the volume's mount path). Skipped (77) where kubectl or
# Node.js is missing (neither is a Debian 12 package of deploy/dev/setup.sh).
# Usage: k8s_test.sh REPO_ROOT NPM_DIR SERVER_BIN
set -u
REPO=$1 NPM_DIR=$2 SERVER=$3
HERE=$(cd "$(dirname "$0")" && pwd)
if ! command -v kubectl >/dev/null; then echo "SKIP: kubectl not installed"; exit 77; fi
bash "$HERE/npm_env.sh" "$NPM_DIR" >/dev/null
rc=$?; [ $rc = 0 ] || exit $rc
TMP=$(mktemp -d /tmp/sparsekv-k8s-test.XXXXXX)
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null && wait $SERVER_PID; rm -rf "$TMP"' EXIT
PASSED=0 FAILED=0
ok() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }

args=()
for overlay in cpu gpu; do
  if kubectl kustomize "$REPO/deploy/k8s/overlays/$overlay" >"$TMP/$overlay.yaml" 2>"$TMP/err"; then
    ok "kubectl kustomize overlays/$overlay renders ($(grep -c '^kind:' "$TMP/$overlay.yaml") objects)"
    args+=("$overlay=$TMP/$overlay.yaml")
  else
    bad "kubectl kustomize overlays/$overlay: $(cat "$TMP/err")"
  fi
done
node "$HERE/k8s_check.mjs" "$NPM_DIR" "$REPO" "$TMP/flags" "${args[@]}" >"$TMP/check.out"
while IFS= read -r line; do
  case $line in
    PASS:*) ok "${line#PASS: }" ;;
    FAIL:*) bad "${line#FAIL: }" ;;
  esac
done <"$TMP/check.out"
grep -q ' passed, ' "$TMP/check.out" || { bad "k8s_check.mjs did not finish"; cat "$TMP/check.out"; }

# The flags the pods will read, given to the real server (listen addresses, the snapshot
# directory and the token file, which the Secret provides in a pod, overridden: later flags win).
echo "k8s-test-token-0123456789 ops admin" >"$TMP/tokens"
for overlay in cpu gpu; do
  f=$TMP/flags/$overlay.flags
  [ -f "$f" ] || { bad "$overlay: no flags file extracted"; continue; }
  rm -f "$TMP/ready"
  rm -rf "$TMP/snapshots"; mkdir "$TMP/snapshots"
  "$SERVER" --flagfile="$f" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 \
    --snapshot_dir="$TMP/snapshots" --auth_token_file="$TMP/tokens" --ready_file="$TMP/ready" \
    >"$TMP/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do [ -s "$TMP/ready" ] && break; kill -0 $SERVER_PID 2>/dev/null || break; sleep 0.1; done
  port=$(sed -n 's/^metrics_port=//p' "$TMP/ready" 2>/dev/null)
  want=$(sed -n 's/^--host_budget_bytes=//p' "$f")
  got=$(curl -s "127.0.0.1:${port:-1}/metrics" | awk '/^sparsekv_kv_budget_bytes/ {printf "%.0f", $2}')
  if [ -n "$port" ] && [ -n "$want" ] && [ "$got" = "$want" ]; then
    ok "$overlay: the server starts with the ConfigMap's flags (budget $got bytes in /metrics)"
  else
    bad "$overlay: server with $f: budget '$got', want '$want': $(tail -3 "$TMP/server.log")"
  fi
  if grep -q "snapshots in $TMP/snapshots: restored 0" "$TMP/server.log" \
    && grep -q -- '--checkpoint_interval=' "$f"; then
    ok "$overlay: the server restores from --snapshot_dir at start, with --checkpoint_interval"
  else
    bad "$overlay: no restore from --snapshot_dir logged: $(tail -3 "$TMP/server.log")"
  fi
  if grep -q -- "--auth=token: 1 tokens" "$TMP/server.log"; then
    ok "$overlay: the server requires bearer tokens (--auth=token)"
  else
    bad "$overlay: no --auth=token logged: $(tail -3 "$TMP/server.log")"
  fi
  kill $SERVER_PID; wait $SERVER_PID; rc=$?; SERVER_PID=""
  if [ $rc = 0 ] && grep -q "shutdown to $TMP/snapshots" "$TMP/server.log"; then
    ok "$overlay: SIGTERM: the server writes its snapshots and exits 0"
  else
    bad "$overlay: SIGTERM: exit $rc, log: $(tail -3 "$TMP/server.log")"
  fi
done

echo "$PASSED passed, $FAILED failed"
[ $FAILED = 0 ]
