#!/bin/bash
# Kubernetes preStop hook of sparsekv-server (the image installs it as sparsekv-prestop).
#
# Kubernetes runs it when a pod starts terminating and sends SIGTERM only after it returns.
# The hook moves no sessions: ExportSession/ImportSession can move one to another replica, but
# nothing calls them on termination, and with --snapshot_dir the server itself writes its
# sessions after SIGTERM for its next start. So draining means: let the Services and the
# ingress stop sending new requests here, then wait until the requests and DecodeStream
# streams already under way have stopped, so that SIGTERM's --shutdown_grace cuts none of them
# and the sessions written afterwards hold everything they sent. It never fails the termination: every path
# exits 0, at the latest after SPARSEKV_DRAIN_MAX_S.
#
# Environment (seconds):
#   SPARSEKV_DRAIN_PROPAGATION_S  wait for endpoint removal to reach kube-proxy, ingress-nginx
#                                 and client resolvers before looking at traffic (default 5)
#   SPARSEKV_DRAIN_IDLE_S         traffic-free time that ends the drain (default 5)
#   SPARSEKV_DRAIN_MAX_S          longest wait for traffic to stop, after propagation (default 60)
#   SPARSEKV_METRICS_PORT         the server's /metrics port on 127.0.0.1 (default 9464)
# terminationGracePeriodSeconds must exceed PROPAGATION + MAX + the server's --shutdown_grace
# (tests/deploy checks the Kubernetes manifests for it).
set -u
propagation=${SPARSEKV_DRAIN_PROPAGATION_S:-5}
idle_needed=${SPARSEKV_DRAIN_IDLE_S:-5}
max_wait=${SPARSEKV_DRAIN_MAX_S:-60}
port=${SPARSEKV_METRICS_PORT:-9464}

log() { echo "sparsekv-prestop: $*" >&2; }

# Finished RPCs so far (sparsekv_rpc_requests_total summed; DecodeStream counts each message,
# so an open stream that is still used keeps it moving; health probes and scrapes do not).
# Bash's /dev/tcp: the runtime image has no curl. Prints nothing when /metrics is unreachable.
rpc_count() {
  { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 0
  printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  awk '/^sparsekv_rpc_requests_total/ { n++; s += $NF } END { if (n) printf "%.0f\n", s }' <&3
  exec 3<&-
}

# Milliseconds since the epoch. Bash's $SECONDS counts whole seconds from an arbitrary phase, so
# "SECONDS - start >= 2" can hold after 1.01 s; EPOCHREALTIME (bash 5) has microseconds.
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $(( t / 1000 )); }

log "waiting ${propagation}s for routing to stop sending new requests"
sleep "$propagation"

start=$(now_ms)
last=$(rpc_count)
if [ -z "$last" ]; then
  log "no /metrics on 127.0.0.1:$port; nothing to drain"
  exit 0
fi
quiet_since=$start
while :; do
  sleep 1
  now=$(rpc_count)
  if [ -z "$now" ]; then
    log "/metrics stopped answering; done"
    exit 0
  fi
  t=$(now_ms)
  if [ "$now" != "$last" ]; then
    last=$now
    quiet_since=$t
  elif [ $(( t - quiet_since )) -ge $(( idle_needed * 1000 )) ]; then
    log "no requests for ${idle_needed}s after $(( (t - start) / 1000 ))s; drained"
    exit 0
  fi
  if [ $(( t - start )) -ge $(( max_wait * 1000 )) ]; then
    log "traffic still running after ${max_wait}s; giving up the wait (SIGTERM follows)"
    exit 0
  fi
done
