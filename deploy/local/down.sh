#!/usr/bin/env bash
# Stops what deploy/local/up.sh started in $SPARSEKV_LOCAL_DIR (default /tmp/sparsekv-local):
# the router, then every replica (drained ones included). Sessions are lost: they live in
# memory. Stops only the processes recorded in the state directory, by pid.
#
# usage: deploy/local/down.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

[[ -f $STATE_DIR/replicas ]] || { echo "down.sh: nothing recorded in $STATE_DIR"; exit 0; }

# wait_gone PID...: up to 10 s for the processes to exit (they are not our children, so
# `wait` cannot be used). The replicas give running calls --shutdown_grace (5 s) on SIGTERM.
wait_gone() {
  local p
  for _ in $(seq 100); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  echo "down.sh: still running after 10 s: $*" >&2
  return 1
}

pids=()
if pid=$(router_pid); then
  kill -TERM "$pid"  # fast shutdown: open calls are cut, as the replicas stop anyway
  pids+=("$pid")
fi
while read -r _name _addr pid _metrics _state; do
  # A recycled pid could belong to someone else: only signal a sparsekv-server.
  if kill -0 "$pid" 2>/dev/null && [[ $(ps -o comm= -p "$pid") == sparsekv-serve* ]]; then
    kill -TERM "$pid"
    pids+=("$pid")
  fi
done <"$STATE_DIR/replicas"
[[ ${#pids[@]} -eq 0 ]] || wait_gone "${pids[@]}"
rm -f "$STATE_DIR/replicas" "$STATE_DIR/nginx.pid"
echo "down.sh: stopped ${#pids[@]} processes; logs stay in $STATE_DIR"
