#!/usr/bin/env bash
# The preStop hook (deploy/docker/prestop.sh) against a real server: it returns soon on an
# idle server, waits while clients still send requests and returns once they stop, gives up
# at its maximum while traffic never stops, honours the propagation delay, and exits 0 when
# there is no server. Exit code 0 in every case: a failing hook must never block a shutdown.
# Usage: prestop_test.sh SERVER_BIN CLI_BIN REPO_ROOT
# Prints PASS/FAIL lines and "N passed, M failed".
set -u
SERVER=$1 CLI=$2 REPO=$3
HOOK=$REPO/deploy/docker/prestop.sh
TMP=$(mktemp -d /tmp/sparsekv-prestop-test.XXXXXX)
PASSED=0 FAILED=0
ok() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
SERVER_PID="" BENCH_PID=""
cleanup() {
  for p in $BENCH_PID $SERVER_PID; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT

"$SERVER" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --ready_file="$TMP/ready" \
  --decode_spin_us=0 >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 150); do [ -s "$TMP/ready" ] && break; sleep 0.1; done
GRPC=$(sed -n 's/^grpc_port=//p' "$TMP/ready" 2>/dev/null)
METRICS=$(sed -n 's/^metrics_port=//p' "$TMP/ready" 2>/dev/null)
if [ -z "$GRPC" ] || [ -z "$METRICS" ]; then
  cat "$TMP/server.log"; bad "server did not start"; echo "$PASSED passed, $FAILED failed"; exit 1
fi

# hook PROPAGATION IDLE MAX PORT: runs the hook; sets RC, MS (elapsed milliseconds), LOG
hook() {
  local t0=$(date +%s%N)
  SPARSEKV_DRAIN_PROPAGATION_S=$1 SPARSEKV_DRAIN_IDLE_S=$2 SPARSEKV_DRAIN_MAX_S=$3 \
    SPARSEKV_METRICS_PORT=$4 bash "$HOOK" 2>"$TMP/hook.log"
  RC=$?
  MS=$(( ($(date +%s%N) - t0) / 1000000 ))
  LOG=$(tr '\n' ' ' <"$TMP/hook.log")
}
bench() {  # bench SECONDS ITEMS_BEFORE: decode load in the background
  "$CLI" --server=127.0.0.1:$GRPC bench --workload=decode --context=256 --kv_heads=1 \
    --q_heads=4 --sessions=1 --duration="$1s" >"$TMP/bench.log" 2>&1 &
  BENCH_PID=$!
  # wait for the bench's decode phase, so that traffic is already flowing
  for _ in $(seq 50); do
    n=$(curl -s "127.0.0.1:$METRICS/metrics" | awk '/^sparsekv_decode_items_total/ {print $2}')
    [ "${n:-0}" != 0 ] && [ "${n:-0}" != "$2" ] && break
    sleep 0.1
  done
}
items() { curl -s "127.0.0.1:$METRICS/metrics" | awk '/^sparsekv_decode_items_total/ {print $2}'; }

hook 0 1 10 "$METRICS"
[ $RC = 0 ] && [ $MS -lt 3500 ] && [[ $LOG == *drained* ]] \
  && ok "idle server: drained after ${MS} ms (idle 1s)" || bad "idle server: rc $RC, ${MS} ms: $LOG"

bench 4 "$(items)"
hook 0 1 20 "$METRICS"
if kill -0 "$BENCH_PID" 2>/dev/null; then still=running; else still=finished; fi
wait "$BENCH_PID"; BENCH_PID=""
[ $RC = 0 ] && [ $MS -gt 2500 ] && [ $still = finished ] && [[ $LOG == *drained* ]] \
  && ok "busy server: waited ${MS} ms, until the 4 s of decode traffic had stopped" \
  || bad "busy server: rc $RC after ${MS} ms, bench $still: $LOG"

bench 8 "$(items)"
hook 0 1 2 "$METRICS"
[ $RC = 0 ] && [ $MS -gt 1500 ] && [ $MS -lt 5000 ] && [[ $LOG == *"giving up"* ]] \
  && ok "endless traffic: gave up at the 2 s maximum (${MS} ms), exit 0" \
  || bad "endless traffic: rc $RC after ${MS} ms: $LOG"
kill "$BENCH_PID" 2>/dev/null; wait "$BENCH_PID" 2>/dev/null; BENCH_PID=""

hook 2 1 10 "$METRICS"
[ $RC = 0 ] && [ $MS -gt 2900 ] && ok "propagation delay: waited ${MS} ms (2 s + idle 1 s)" \
  || bad "propagation delay: rc $RC after ${MS} ms: $LOG"

kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
hook 0 1 10 "$METRICS"
[ $RC = 0 ] && [ $MS -lt 1000 ] && [[ $LOG == *"nothing to drain"* ]] \
  && ok "no server: returned at once (${MS} ms), exit 0" || bad "no server: rc $RC after ${MS} ms: $LOG"

echo "$PASSED passed, $FAILED failed"
[ $FAILED = 0 ]
