# shellcheck shell=bash disable=SC2034  # sourced: the scripts use the variables set here
# Shared by up.sh, drain.sh and down.sh (sourced, not run): where the state lives and how the
# router config is rendered.
#
# State directory ($SPARSEKV_LOCAL_DIR, default /tmp/sparsekv-local):
#   replicas      one line per replica: NAME ADDR PID METRICS_PORT STATE
#                 (STATE: active = in the router; draining = out of the router, sessions
#                 still being moved; drained = empty and out of the router)
#   proxy         the router's address, HOST:PORT
#   nginx.conf    rendered from nginx.conf.in; nginx.pid, logs/, tmp/ beside it
#   rN.log, rN.ready   each replica's log and ready file

LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LOCAL_DIR/../.." && pwd)
STATE_DIR=${SPARSEKV_LOCAL_DIR:-/tmp/sparsekv-local}
SERVER_BIN=${SPARSEKV_SERVER_BIN:-$REPO_ROOT/build/bin/sparsekv-server}
CLI_BIN=${SPARSEKV_CLI_BIN:-$REPO_ROOT/build/bin/sparsekv}
NGINX_BIN=${SPARSEKV_NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
# Seconds old nginx workers may keep open calls after a reload (see nginx.conf.in).
SHUTDOWN_S=${SPARSEKV_ROUTER_SHUTDOWN_S:-5}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# nginx with this state directory's prefix and config, never the system's /etc/nginx.
# -e: the error log before the config is read (Debian's nginx defaults to stderr).
router() {
  "$NGINX_BIN" -p "$STATE_DIR" -c "$STATE_DIR/nginx.conf" -e "$STATE_DIR/logs/error.log" "$@"
}

router_pid() {
  local pid
  pid=$(cat "$STATE_DIR/nginx.pid" 2>/dev/null) || return 1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# The master's worker processes, one pid a line (empty when none).
router_workers() {
  ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true
}

# Field $2 (1-based: NAME ADDR PID METRICS_PORT STATE) of replica $1.
replica_field() {
  awk -v n="$1" -v f="$2" '$1 == n { print $f }' "$STATE_DIR/replicas"
}

# Sets replica $1's STATE to $2.
set_replica_state() {
  awk -v n="$1" -v s="$2" 'BEGIN { OFS = " " } $1 == n { $5 = s } { print }' \
    "$STATE_DIR/replicas" >"$STATE_DIR/replicas.new"
  mv "$STATE_DIR/replicas.new" "$STATE_DIR/replicas"
}

# Addresses of the replicas in STATE $1, comma-separated.
replica_addrs() {
  awk -v s="$1" '$5 == s { print $2 }' "$STATE_DIR/replicas" | paste -sd, -
}

# Writes $STATE_DIR/nginx.conf from the template with the active replicas as the upstream.
# The server lines are the replicas' "HOST:PORT" strings and nothing else: nginx's consistent
# hash places each replica on its ring by that string, so a replica keeps its ring points
# (and its sessions) across re-renders that drop another replica. max_fails=0: nginx must
# never mark a replica down and send its session ids to the next one on the ring, where they
# are NOT_FOUND (or a CreateSession lands on a replica the id does not hash to).
render_router_config() {
  local servers="" addr user_line=""
  while read -r addr; do
    servers+="    server $addr max_fails=0;"$'\n'
  done < <(awk '$5 == "active" { print $2 }' "$STATE_DIR/replicas")
  [[ -n $servers ]] || die "no active replica to route to"
  servers=${servers%$'\n'}
  [[ $(id -u) -eq 0 ]] && user_line="user $(id -un) $(id -gn);"
  local conf
  conf=$(<"$LOCAL_DIR/nginx.conf.in")
  conf=${conf//@USER_LINE@/$user_line}
  conf=${conf//@STATE_DIR@/$STATE_DIR}
  conf=${conf//@SHUTDOWN_TIMEOUT@/${SHUTDOWN_S}s}
  conf=${conf//@PROXY_LISTEN@/$(cat "$STATE_DIR/proxy")}
  conf=${conf//@UPSTREAM_SERVERS@/$servers}
  # A placeholder left over would make nginx fail with a confusing message; say which.
  if [[ $conf =~ @[A-Z_]+@ ]]; then die "nginx.conf.in: unknown placeholder ${BASH_REMATCH[0]}"; fi
  printf '%s\n' "$conf" >"$STATE_DIR/nginx.conf.new"
  mv "$STATE_DIR/nginx.conf.new" "$STATE_DIR/nginx.conf"
}
