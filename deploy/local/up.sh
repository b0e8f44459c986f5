#!/usr/bin/env bash
# Starts N sparsekv-server replicas on loopback and Debian's nginx in front of them as the
# session router (hash of the x-session-id header, consistent), all as the current user, with
# every file under one state directory: no system service, nothing in /etc or /var.
#
# usage: deploy/local/up.sh N
# environment:
#   SPARSEKV_LOCAL_DIR      state directory (default /tmp/sparsekv-local); must not hold a
#                           running setup (deploy/local/down.sh stops one)
#   SPARSEKV_PROXY_PORT     the router's port on 127.0.0.1 (default 50051, the CLI's default
#                           server; 0 = a free port)
#   SPARSEKV_SERVER_FLAGS   extra flags for every replica, e.g. "--host_budget_bytes=4294967296"
#   SPARSEKV_SERVER_BIN, SPARSEKV_CLI_BIN, SPARSEKV_NGINX_BIN   the programs (default:
#                           build/bin/sparsekv-server, build/bin/sparsekv, nginx on PATH)
# Prints the router's address and the replicas; their state is in $SPARSEKV_LOCAL_DIR/replicas.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

N=${1:-}
[[ $N =~ ^[1-9][0-9]*$ ]] || die "usage: up.sh N (number of replicas, at least 1)"
[[ -x $SERVER_BIN ]] || die "no server binary at $SERVER_BIN (build it, or set SPARSEKV_SERVER_BIN)"
[[ -x $NGINX_BIN ]] || die "nginx not found (apt-get install nginx, or set SPARSEKV_NGINX_BIN)"
if [[ -f $STATE_DIR/replicas ]] && pid=$(router_pid); then
  die "$STATE_DIR already runs a setup (router pid $pid): deploy/local/down.sh first"
fi

mkdir -p "$STATE_DIR"/{logs,tmp}
rm -f "$STATE_DIR"/r*.ready "$STATE_DIR/replicas" "$STATE_DIR/nginx.pid"

proxy_port=${SPARSEKV_PROXY_PORT:-50051}
if [[ $proxy_port == 0 ]]; then
  # nginx cannot pick its own port and report it; take one the kernel hands out now.
  proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
echo "127.0.0.1:$proxy_port" >"$STATE_DIR/proxy"

# If anything below fails (set -e, die), stop what was started, so that a failed up.sh
# leaves no strays.
started=()
up=0
on_exit() {
  [[ $up == 1 ]] && return
  local p
  for p in "${started[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  if p=$(router_pid); then kill -TERM "$p"; fi
  rm -f "$STATE_DIR/replicas"
}
trap on_exit EXIT

# Replicas on ports the server picks itself (port 0): it writes them to its ready file, so
# there is no race with other programs for a port chosen in advance.
# shellcheck disable=SC2086  # SPARSEKV_SERVER_FLAGS is a list of flags
for ((i = 0; i < N; i++)); do
  nohup "$SERVER_BIN" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 \
    --ready_file="$STATE_DIR/r$i.ready" ${SPARSEKV_SERVER_FLAGS:-} \
    >"$STATE_DIR/r$i.log" 2>&1 </dev/null &
  started+=($!)
done
: >"$STATE_DIR/replicas.new"
for ((i = 0; i < N; i++)); do
  for _ in $(seq 300); do
    [[ -s $STATE_DIR/r$i.ready ]] && break
    kill -0 "${started[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  port=$(sed -n 's/^grpc_port=//p' "$STATE_DIR/r$i.ready" 2>/dev/null || true)
  metrics=$(sed -n 's/^metrics_port=//p' "$STATE_DIR/r$i.ready" 2>/dev/null || true)
  if [[ -z $port ]]; then
    tail -5 "$STATE_DIR/r$i.log" >&2 || true
    die "replica r$i did not start (log: $STATE_DIR/r$i.log)"
  fi
  echo "r$i 127.0.0.1:$port ${started[$i]} $metrics active" >>"$STATE_DIR/replicas.new"
done
mv "$STATE_DIR/replicas.new" "$STATE_DIR/replicas"

render_router_config
router -t -q
router  # daemonizes: returns once the master runs and has written nginx.pid
for _ in $(seq 50); do router_pid >/dev/null && break; sleep 0.1; done
router_pid >/dev/null || { cat "$STATE_DIR/logs/error.log" >&2; die "nginx did not start"; }
up=1

echo "router  $(cat "$STATE_DIR/proxy")  (nginx pid $(router_pid), config $STATE_DIR/nginx.conf)"
while read -r name addr pid metrics state; do
  echo "$name      $addr  (pid $pid, metrics :$metrics, $state)"
done <"$STATE_DIR/replicas"
echo "clients: --server=$(cat "$STATE_DIR/proxy") with the x-session-id header on every call"
