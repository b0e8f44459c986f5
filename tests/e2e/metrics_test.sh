#!/usr/bin/env bash
# End-to-end test of the Prometheus endpoint.
#
# Usage: metrics_test.sh SERVER_BIN [PROTO_DIR]
#
# Starts sparsekv-server on ephemeral ports, scrapes /metrics, makes a known set of RPCs with a
# Python client generated from the .proto, scrapes again, and checks that
# - both scrapes are valid exposition format (`promtool check metrics` exits 0, no lint
#   problems),
# - every RPC method has its code="OK" series from the first scrape, at 0,
# - sparsekv_rpc_requests_total{method,code} grew by exactly the calls made, errors under
#   their status code name (NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT, UNIMPLEMENTED),
# - the latency histogram counts, the work counters and the session gauge moved as expected,
# - the quality metric (--quality_shadow_fraction=1: the one sparse session keeps a dense
#   shadow) recorded its decode step's error, and the decode batcher's series by backend count
#   every backend call and item (the shadow's dense item included).
# Prints "N passed, M failed"; exits non-zero on any failure.
set -u

SERVER_BIN=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PROTO_DIR=${2:-$HERE/../../proto}
PY=/usr/bin/python3

fail_early() {
  echo "FAIL: $*"
  echo "0 passed, 1 failed"
  exit 1
}

[[ -n "$SERVER_BIN" ]] || fail_early "usage: $0 SERVER_BIN [PROTO_DIR]"
[[ -x "$SERVER_BIN" ]] || fail_early "server binary $SERVER_BIN missing or not executable"
command -v promtool >/dev/null || fail_early "promtool not installed (apt-get install prometheus)"
command -v curl >/dev/null || fail_early "curl not installed"
[[ -x $PY ]] || fail_early "$PY missing"

TMP=$(mktemp -d /tmp/sparsekv-metrics-test.XXXXXX)
SERVER_PID=""

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server did not exit 10 s after SIGTERM; killing"
      kill -KILL "$SERVER_PID"
    fi
    wait "$SERVER_PID" 2>/dev/null
  fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  rm -rf "$TMP"
}
trap cleanup EXIT

"$SERVER_BIN" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --ready_file="$TMP/ready" \
  --quality_shadow_fraction=1 >"$TMP/server.log" 2>&1 &
SERVER_PID=$!

GRPC_PORT=""
METRICS_PORT=""
for _ in $(seq 1 150); do  # 15 s
  if [[ -f "$TMP/ready" ]]; then
    GRPC_PORT=$(sed -n 's/^grpc_port=\([0-9]*\)$/\1/p' "$TMP/ready")
    METRICS_PORT=$(sed -n 's/^metrics_port=\([0-9]*\)$/\1/p' "$TMP/ready")
    [[ -n "$GRPC_PORT" && -n "$METRICS_PORT" ]] && break
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log"; fail_early "server exited early"; }
  sleep 0.1
done
if [[ -z "$GRPC_PORT" || -z "$METRICS_PORT" ]]; then
  cat "$TMP/server.log"
  fail_early "server not ready within 15 s"
fi
echo "server ready: grpc $GRPC_PORT, metrics $METRICS_PORT"

PASSED=0
FAILED=0
ok() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }

scrape() {  # scrape OUTFILE: GET /metrics, then promtool check metrics on it
  local out=$1
  local code
  code=$(curl -sS -o "$out" -w '%{http_code}' "http://127.0.0.1:$METRICS_PORT/metrics" \
           -D "$out.headers")
  if [[ "$code" != 200 ]]; then
    bad "GET /metrics answered HTTP $code"
    return 1
  fi
  ok "GET /metrics answered 200 ($(wc -c <"$out") bytes)"
  if grep -qi '^content-type: *text/plain' "$out.headers"; then
    ok "/metrics Content-Type is text/plain"
  else
    bad "/metrics Content-Type: $(grep -i '^content-type' "$out.headers")"
  fi
  local lint
  lint=$(promtool check metrics <"$out" 2>&1)
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    ok "promtool check metrics ($(basename "$out"))${lint:+: $lint}"
  else
    bad "promtool check metrics ($(basename "$out")) exited $rc: $lint"
  fi
}

scrape "$TMP/before.txt"

# A known set of calls; the Python part prints the expected counter deltas as JSON.
if ! HERE="$HERE" "$PY" - "$PROTO_DIR" "$GRPC_PORT" >"$TMP/calls.json" 2>"$TMP/calls.err" <<'PYEOF'
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ["HERE"])
import grpc
import server_fixture as fx
pb2, pb2_grpc = fx.load_stubs(sys.argv[1])
ch = grpc.insecure_channel("127.0.0.1:" + sys.argv[2])
stub = pb2_grpc.KvCacheServiceStub(ch)
expect = {}  # "method/code" -> count

def call(method, code, fn):
    try:
        fn()
        got = "OK"
    except grpc.RpcError as e:
        got = e.code().name
    if got != code:
        raise SystemExit("%s answered %s, expected %s" % (method, got, code))
    expect["%s/%s" % (method, code)] = expect.get("%s/%s" % (method, code), 0) + 1

layout = pb2.Layout(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=64)
for i in range(3):
    call("CreateSession", "OK", lambda: stub.CreateSession(
        pb2.CreateSessionRequest(session_id="m-%d" % i, layout=layout), timeout=10))
call("CreateSession", "ALREADY_EXISTS", lambda: stub.CreateSession(
    pb2.CreateSessionRequest(session_id="m-0", layout=layout), timeout=10))
call("CreateSession", "INVALID_ARGUMENT", lambda: stub.CreateSession(
    pb2.CreateSessionRequest(session_id="m-bad", layout=pb2.Layout(
        num_layers=1, num_kv_heads=3, num_q_heads=4, head_dim=64)), timeout=10))
call("GetSession", "OK", lambda: stub.GetSession(pb2.GetSessionRequest(session_id="m-0"),
                                                 timeout=10))
for _ in range(2):
    call("GetSession", "NOT_FOUND", lambda: stub.GetSession(
        pb2.GetSessionRequest(session_id="m-none"), timeout=10))
rng = np.random.default_rng(0)
k = rng.standard_normal((2, 10, 2, 64)).astype(np.float32)   # 2 layers x 10 tokens
req = pb2.AppendKVRequest(session_id="m-0", k=fx.make_tensor(pb2, k), v=fx.make_tensor(pb2, k))
call("AppendKV", "OK", lambda: stub.AppendKV(iter([req]), timeout=10))
q = fx.make_tensor(pb2, rng.standard_normal((4, 64)).astype(np.float32))
it0 = pb2.DecodeItem(session_id="m-0", layer=0, q=q)
it1 = pb2.DecodeItem(session_id="m-0", layer=1, q=q)
call("Decode", "OK", lambda: stub.Decode(pb2.DecodeRequest(items=[it0]), timeout=10))
call("Decode", "OK", lambda: stub.Decode(pb2.DecodeRequest(items=[it0, it1]), timeout=10))
call("Decode", "INVALID_ARGUMENT", lambda: stub.Decode(pb2.DecodeRequest(
    items=[pb2.DecodeItem(session_id="m-0", layer=9, q=q)]), timeout=10))
call("Decode", "NOT_FOUND", lambda: stub.Decode(pb2.DecodeRequest(
    items=[pb2.DecodeItem(session_id="m-none", layer=0, q=q)]), timeout=10))
stream_reqs = [pb2.DecodeRequest(items=[it0], request_id=1),
               pb2.DecodeRequest(items=[pb2.DecodeItem(session_id="m-none", layer=0, q=q)],
                                 request_id=2),
               pb2.DecodeRequest(items=[it1], request_id=3)]
# The server counts every DecodeStream message like a unary call, under the message's own
# status (service/kv_cache_service.cc), not the stream as one RPC: 2 x OK + 1 x NOT_FOUND.
resps = list(stub.DecodeStream(iter(stream_reqs), timeout=10))
if [r.error_code for r in resps] != [0, 5, 0]:
    raise SystemExit("DecodeStream error codes %s" % [r.error_code for r in resps])
expect["DecodeStream/OK"] = 2
expect["DecodeStream/NOT_FOUND"] = 1
call("ListSessions", "OK", lambda: stub.ListSessions(pb2.ListSessionsRequest(), timeout=10))
call("ReadKV", "OK", lambda: list(stub.ReadKV(pb2.ReadKVRequest(session_id="m-0"), timeout=10)))
call("GetServerInfo", "OK", lambda: stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10))
call("Flush", "OK", lambda: stub.Flush(pb2.FlushRequest(session_id="m-0"), timeout=10))
# m-3: 100 tokens of which Flush compresses all but the newest 32 (K 70%, V 50% sparse), so
# that the form gauges have compressed bytes to show.
call("CreateSession", "OK", lambda: stub.CreateSession(pb2.CreateSessionRequest(
    session_id="m-3", layout=layout, policy=pb2.Policy(k=pb2.TensorPolicy(sparsity=0.7),
                                                       v=pb2.TensorPolicy(sparsity=0.5))),
    timeout=10))
k3 = rng.standard_normal((2, 100, 2, 64)).astype(np.float32)
req3 = pb2.AppendKVRequest(session_id="m-3", k=fx.make_tensor(pb2, k3),
                           v=fx.make_tensor(pb2, k3))
call("AppendKV", "OK", lambda: stub.AppendKV(iter([req3]), timeout=10))
call("Flush", "OK", lambda: stub.Flush(pb2.FlushRequest(session_id="m-3"), timeout=10))
# m-3 prunes, so it keeps a dense shadow: its step is a sparse and a dense item.
call("Decode", "OK", lambda: stub.Decode(pb2.DecodeRequest(
    items=[pb2.DecodeItem(session_id="m-3", layer=0, q=q)]), timeout=10))
call("Flush", "NOT_FOUND", lambda: stub.Flush(pb2.FlushRequest(session_id="nope"), timeout=10))
call("ExportSession", "OK", lambda: list(stub.ExportSession(
    pb2.ExportSessionRequest(session_id="m-0"), timeout=10)))
call("ExportSession", "NOT_FOUND", lambda: list(stub.ExportSession(
    pb2.ExportSessionRequest(session_id="m-none"), timeout=10)))
call("DeleteSession", "OK", lambda: stub.DeleteSession(
    pb2.DeleteSessionRequest(session_id="m-2"), timeout=10))
call("DeleteSession", "NOT_FOUND", lambda: stub.DeleteSession(
    pb2.DeleteSessionRequest(session_id="m-2"), timeout=10))
# What the sessions hold against the budget (payload, block slack, statistics, metadata):
# sparsekv_kv_bytes{tier="host"} must equal it.
listed = []
call("ListSessions", "OK", lambda: listed.append(stub.ListSessions(pb2.ListSessionsRequest(),
                                                                   timeout=10)))
accounted = sum(s.stats.bytes_accounted for s in listed[0].sessions)
forms = {f: sum(getattr(s.stats, f) for s in listed[0].sessions)
         for f in ("bytes_dense", "bytes_compressed", "bytes_dense_equivalent")}
stats3 = [s.stats for s in listed[0].sessions if s.id == "m-3"][0]
extra = {
    # items served: 1 + 2 (Decode m-0) + 2 good stream messages + 1 (Decode m-3)
    "sparsekv_decode_items_total": 6,
    # what the backend ran: the same, plus m-3's dense shadow item
    "sparsekv_decode_batch_items_total": 7,
    "sparsekv_decode_batch_size_items_sum": 7,
    "sparsekv_quality_relative_error_count": 1,
    "sparsekv_quality_shadow_sessions": 1,
    # rows = layers x tokens appended
    "sparsekv_appended_token_rows_total": 20 + 200,
    # K and V as sent: 2 x 2*10*2*64 float32, then 2 x 2*100*2*64
    "sparsekv_appended_bytes_total": 2 * k.nbytes + 2 * k3.nbytes,
    "sparsekv_sessions": 3,
}
print(json.dumps({"rpc": expect, "extra": extra, "accounted": accounted, "forms": forms,
                  "sparsity": [stats3.achieved_sparsity_k, stats3.achieved_sparsity_v]}))
PYEOF
then
  bad "RPC calls did not go as planned: $(cat "$TMP/calls.err")"
else
  ok "RPC calls made as planned"
fi

scrape "$TMP/after.txt"

# Compare the two scrapes against the expected deltas.
"$PY" - "$TMP/before.txt" "$TMP/after.txt" "$TMP/calls.json" <<'PYEOF' >"$TMP/compare.out"
import json, re, sys

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')

def parse(path):
    series = []
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            print("FAIL: unparsable exposition line: %r" % line)
            continue
        labels = dict(LABEL.findall(m.group(3) or ""))
        series.append((m.group(1), labels, float(m.group(4))))
    return series

def value(series, name, **labels):
    """Sum over series of `name` whose labels include `labels`; None if there are none."""
    vals = [v for n, l, v in series
            if n == name and all(l.get(k) == w for k, w in labels.items())]
    return sum(vals) if vals else None

before, after = parse(sys.argv[1]), parse(sys.argv[2])
plan = json.load(open(sys.argv[3]))

methods = ["CreateSession", "GetSession", "ListSessions", "DeleteSession", "AppendKV", "Decode",
           "DecodeStream", "Flush", "ReadKV", "ExportSession", "ImportSession", "GetServerInfo"]
missing = [m for m in methods
           if value(before, "sparsekv_rpc_requests_total", method=m, code="OK") != 0.0]
if missing:
    print("FAIL: first scrape lacks a zero code=\"OK\" series for %s" % missing)
else:
    print("PASS: every method has its code=\"OK\" series at 0 in the first scrape")

for key, n in sorted(plan["rpc"].items()):
    method, code = key.split("/")
    b = value(before, "sparsekv_rpc_requests_total", method=method, code=code) or 0.0
    a = value(after, "sparsekv_rpc_requests_total", method=method, code=code)
    if a is None or a - b != n:
        print('FAIL: sparsekv_rpc_requests_total{method="%s",code="%s"} went %s -> %s, '
              'expected +%d' % (method, code, b, a, n))
    else:
        print('PASS: sparsekv_rpc_requests_total{method="%s",code="%s"} +%d' % (method, code, n))

# nothing else was counted: total over all series grew by the number of calls
tb = value(before, "sparsekv_rpc_requests_total") or 0.0
ta = value(after, "sparsekv_rpc_requests_total") or 0.0
n_calls = sum(plan["rpc"].values())
if ta - tb != n_calls:
    print("FAIL: sparsekv_rpc_requests_total summed over series grew by %s, expected %d"
          % (ta - tb, n_calls))
else:
    print("PASS: sparsekv_rpc_requests_total summed over series grew by %d" % n_calls)

per_method = {}
for key, n in plan["rpc"].items():
    per_method[key.split("/")[0]] = per_method.get(key.split("/")[0], 0) + n
for method, n in sorted(per_method.items()):
    b = value(before, "sparsekv_rpc_duration_seconds_count", method=method) or 0.0
    a = value(after, "sparsekv_rpc_duration_seconds_count", method=method)
    if a is None or a - b != n:
        print('FAIL: sparsekv_rpc_duration_seconds_count{method="%s"} went %s -> %s, '
              'expected +%d' % (method, b, a, n))
    else:
        print('PASS: sparsekv_rpc_duration_seconds_count{method="%s"} +%d' % (method, n))
    inf = value(after, "sparsekv_rpc_duration_seconds_bucket", method=method, le="+Inf")
    if inf != a:
        print('FAIL: sparsekv_rpc_duration_seconds_bucket{method="%s",le="+Inf"} = %s, '
              '_count = %s' % (method, inf, a))

for name, n in sorted(plan["extra"].items()):
    b = value(before, name) or 0.0
    a = value(after, name)
    if a is None or a - b != n:
        print("FAIL: %s went %s -> %s, expected +%d" % (name, b, a, n))
    else:
        print("PASS: %s +%d" % (name, n))

# One duration per published chunk.
chunks = value(after, "sparsekv_pruned_chunks_total")
durations = value(after, "sparsekv_prune_chunk_duration_seconds_count")
if durations is None or durations != chunks:
    print("FAIL: sparsekv_prune_chunk_duration_seconds_count = %s, pruned chunks %s"
          % (durations, chunks))
else:
    print("PASS: one pruning duration per chunk (%d)" % chunks)
if value(after, "sparsekv_sessions_evicted_total", reason="ttl") is None:
    print('FAIL: sparsekv_sessions_evicted_total{reason="ttl"} missing')
else:
    print('PASS: sparsekv_sessions_evicted_total{reason="ttl"} present')
for name in ("sparsekv_kv_bytes", "sparsekv_kv_budget_bytes", "sparsekv_build_info",
             "sparsekv_sessions_evicted_total"):
    if value(after, name) is None:
        print("FAIL: %s missing" % name)
    else:
        print("PASS: %s present" % name)
# m-0 holds 2 layers x 10 tokens x 2 heads x 64 x 2 (K, V) x 2 bytes (float16) of payload in
# one 32-row block per layer, m-1 nothing; both hold their fixed bytes.
kvb = value(after, "sparsekv_kv_bytes", tier="host")
if kvb != plan["accounted"] or kvb <= 2 * 10 * 2 * 64 * 2 * 2:
    print('FAIL: sparsekv_kv_bytes{tier="host"} = %s, expected the sessions\' bytes_accounted '
          '%d (> the payload)' % (kvb, plan["accounted"]))
else:
    print('PASS: sparsekv_kv_bytes{tier="host"} = %d' % kvb)

# By form: the sums of the sessions' stats; metadata is the rest of what they are charged.
f = plan["forms"]
got = {form: value(after, "sparsekv_kv_form_bytes", tier="host", form=form)
       for form in ("dense", "compressed", "metadata")}
shadow = value(after, "sparsekv_quality_shadow_bytes")
want = {"dense": f["bytes_dense"], "compressed": f["bytes_compressed"],
        "metadata": plan["accounted"] - f["bytes_dense"] - f["bytes_compressed"] - (shadow or 0)}
if got != want or want["compressed"] <= 0 or want["metadata"] <= 0:
    print("FAIL: sparsekv_kv_form_bytes %s, expected %s (all > 0)" % (got, want))
else:
    print("PASS: sparsekv_kv_form_bytes by form = the sessions' stats %s" % want)
deq = value(after, "sparsekv_kv_dense_equivalent_bytes", tier="host")
# 2 layers x (10 + 100) tokens x 2 heads x 64 x 2 (K, V) x 2 bytes (float16)
if deq != f["bytes_dense_equivalent"] or deq != 2 * 110 * 2 * 64 * 2 * 2:
    print("FAIL: sparsekv_kv_dense_equivalent_bytes = %s, expected %d" % (
        deq, 2 * 110 * 2 * 64 * 2 * 2))
else:
    print("PASS: sparsekv_kv_dense_equivalent_bytes = %d" % deq)
# m-3 alone has compressed chunks: 1 - kept / elements is its achieved sparsity.
el = value(after, "sparsekv_compressed_elements")
kept = [value(after, "sparsekv_compressed_kept_elements", tensor=t) for t in ("k", "v")]
sp = [1 - x / el if el else None for x in kept]
if not el or any(s is None or abs(s - w) > 1e-6 for s, w in zip(sp, plan["sparsity"])):
    print("FAIL: achieved sparsity from the metrics %s (elements %s, kept %s), the session "
          "says %s" % (sp, el, kept, plan["sparsity"]))
else:
    print("PASS: achieved sparsity from the metrics = the session's %s" % plan["sparsity"])

# Quality: m-3's shadow holds its 2 x 100 rows dense; its one step's error is a ratio in (0, 1).
if not shadow or shadow <= 2 * 100 * 2 * 64 * 2 * 2:
    print("FAIL: sparsekv_quality_shadow_bytes = %s, expected more than m-3's dense rows" % shadow)
else:
    print("PASS: sparsekv_quality_shadow_bytes = %d" % shadow)
err = [value(x, "sparsekv_quality_relative_error_sum") or 0.0 for x in (before, after)]
inf = value(after, "sparsekv_quality_relative_error_bucket", le="+Inf")
if not 0 < err[1] - err[0] < 1 or inf != value(after, "sparsekv_quality_relative_error_count"):
    print("FAIL: sparsekv_quality_relative_error sum %s -> %s, +Inf bucket %s" % (err[0], err[1], inf))
else:
    print("PASS: sparsekv_quality_relative_error recorded %.4f for m-3's step" % (err[1] - err[0]))
if value(after, "sparsekv_quality_shadow_dropped_total") != 0:
    print("FAIL: sparsekv_quality_shadow_dropped_total = %s, expected 0"
          % value(after, "sparsekv_quality_shadow_dropped_total"))
else:
    print("PASS: sparsekv_quality_shadow_dropped_total = 0")

# Batcher: one backend call per Decode request and stream message (4 or 5: the two stream
# messages may share one), as many as the items-per-call histogram counts, time > 0.
batches = [value(x, "sparsekv_decode_batches_total", backend="cpu") or 0.0 for x in (before, after)]
hist = [value(x, "sparsekv_decode_batch_size_items_count", backend="cpu") or 0.0
        for x in (before, after)]
secs = value(after, "sparsekv_decode_backend_seconds_total", backend="cpu")
if not 4 <= batches[1] - batches[0] <= 5 or hist[1] - hist[0] != batches[1] - batches[0] \
        or not secs or secs <= 0:
    print('FAIL: sparsekv_decode_batches_total{backend="cpu"} +%s, histogram count +%s, '
          'backend seconds %s' % (batches[1] - batches[0], hist[1] - hist[0], secs))
else:
    print('PASS: sparsekv_decode_batches_total{backend="cpu"} +%d = the items-per-call '
          'histogram count; backend seconds %.6f' % (batches[1] - batches[0], secs))
PYEOF
while IFS= read -r line; do
  case "$line" in
    PASS:*) ok "${line#PASS: }" ;;
    FAIL:*) bad "${line#FAIL: }" ;;
    *) echo "$line" ;;
  esac
done <"$TMP/compare.out"
[[ -s "$TMP/compare.out" ]] || bad "metric comparison produced no output"

stop_server
if [[ $FAILED -ne 0 ]]; then
  echo "--- server log (tail) ---"
  tail -n 40 "$TMP/server.log"
fi
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
