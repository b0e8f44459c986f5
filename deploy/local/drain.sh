#!/usr/bin/env bash
# Takes one replica out of the local setup that deploy/local/up.sh started, moving its
# sessions to the replicas the router now sends their ids to; then stops it.
#
# usage: deploy/local/drain.sh [--keep] NAME      (NAME as in $SPARSEKV_LOCAL_DIR/replicas: r0, r1, ...)
#   --keep   leave the drained (empty) replica running instead of stopping it
#
# The order is what makes it safe under load:
#   1. render the router config without NAME and reload nginx: new calls for NAME's session
#      ids now go to their new owners (nginx's consistent hash moves only NAME's ids);
#   2. wait until the nginx workers of the old config have exited (they finish the calls they
#      had open, at most worker_shutdown_timeout): from then on nothing reaches NAME, so its
#      sessions cannot change any more;
#   3. `sparsekv drain`: each session is exported from NAME, imported THROUGH the router with
#      its x-session-id header (so nginx itself delivers it to the replica that owns the id
#      now), checked to be on exactly one of the remaining replicas, then deleted on NAME.
# Between 1 and the end of a session's import, a call for that session reaches its new owner
# before the session does and gets NOT_FOUND: milliseconds plus the copy when no call is open
# through the old workers, up to the shutdown timeout (SPARSEKV_ROUTER_SHUTDOWN_S, 5 s) when a
# DecodeStream is (nginx cuts it then: UNAVAILABLE, the client opens a new one). Clients retry
# NOT_FOUND and UNAVAILABLE with a short backoff for longer than that, instead of recreating
# the session (a recreated session would make the import fail with ALREADY_EXISTS; the drain
# then keeps NAME's copy and reports it).
# If step 3 fails, NAME stays out of the router with the sessions not yet moved: fix the
# cause and run drain.sh NAME again (it resumes at step 3).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

keep=0
if [[ ${1:-} == --keep ]]; then keep=1; shift; fi
NAME=${1:-}
[[ -n $NAME && $# -eq 1 ]] || die "usage: drain.sh [--keep] NAME"
[[ -f $STATE_DIR/replicas ]] || die "no setup in $STATE_DIR (deploy/local/up.sh N)"
master=$(router_pid) || die "the router is not running (nginx.pid in $STATE_DIR)"
addr=$(replica_field "$NAME" 2)
[[ -n $addr ]] || die "no replica $NAME in $STATE_DIR/replicas"
state=$(replica_field "$NAME" 5)

case $state in
  active)
    [[ -n $(awk -v n="$NAME" '$1 != n && $5 == "active"' "$STATE_DIR/replicas") ]] \
      || die "$NAME is the last active replica: there is nowhere to move its sessions"
    old_workers=$(router_workers "$master")
    set_replica_state "$NAME" draining
    render_router_config
    if ! router -t -q; then
      set_replica_state "$NAME" active
      render_router_config
      die "the new router config does not pass nginx -t; nothing changed"
    fi
    router -s reload
    echo "drain.sh: router reloaded without $NAME ($addr)"
    # Step 2. nginx starts the new workers before it tells the old ones to quit, so the old
    # ones being gone also means the reload happened.
    limit=$(( (SHUTDOWN_S + 10) * 10 ))
    for ((t = 0; ; t++)); do
      left=0
      for w in $old_workers; do kill -0 "$w" 2>/dev/null && left=1; done
      [[ $left == 0 ]] && break
      ((t < limit)) || die "old nginx workers still running after $SHUTDOWN_S + 10 s"
      sleep 0.1
    done
    echo "drain.sh: the old router workers have exited; nothing reaches $NAME any more"
    ;;
  draining) echo "drain.sh: $NAME is already out of the router; resuming the session moves" ;;
  drained) echo "drain.sh: $NAME is already drained"; exit 0 ;;
  *) die "$NAME has unknown state '$state'" ;;
esac

# Step 3.
"$CLI_BIN" --server="$addr" --timeout=30s drain --via="$(cat "$STATE_DIR/proxy")" \
  --peers="$(replica_addrs active)"
set_replica_state "$NAME" drained
if [[ $keep == 0 ]]; then
  pid=$(replica_field "$NAME" 3)
  if kill -0 "$pid" 2>/dev/null && [[ $(ps -o comm= -p "$pid") == sparsekv-serve* ]]; then
    kill -TERM "$pid"
    echo "drain.sh: stopped $NAME (pid $pid)"
  fi
fi
