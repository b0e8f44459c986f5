#!/usr/bin/env bash
# End-to-end test of `sparsekv demo` and `sparsekv bench` against a real sparsekv-server.
#
# usage: cli_bench_e2e_test.sh SERVER_BIN CLI_BIN
#
# Starts the server on a free port, runs the demo (small shape) and a tiny run of every bench
# workload with --json, and checks exit status 0 and that the JSON figures are sane (requests
# done, no errors, ordered percentiles, memory saved near the format's ratio, no sessions left
# behind). Also checks exit status 3 and the start-up hint when no server answers.
set -euo pipefail

SERVER_BIN=${1:?usage: cli_bench_e2e_test.sh SERVER_BIN CLI_BIN}
CLI_BIN=${2:?usage: cli_bench_e2e_test.sh SERVER_BIN CLI_BIN}
PY=/usr/bin/python3

if [[ ! -x "$SERVER_BIN" ]]; then echo "FAIL: no server binary at $SERVER_BIN"; exit 1; fi
if [[ ! -x "$CLI_BIN" ]]; then echo "FAIL: no CLI binary at $CLI_BIN"; exit 1; fi

TMP=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  if [[ -f "$TMP/server.log" ]]; then echo "--- server log (tail) ---" >&2; tail -20 "$TMP/server.log" >&2; fi
  exit 1
}

run() {  # run WANT_RC NAME CLI_ARGS...
  local want=$1 name=$2
  shift 2
  local rc=0
  "$CLI_BIN" --server="127.0.0.1:$GRPC_PORT" --timeout=20s "$@" >"$TMP/$name.out" \
    2>"$TMP/$name.err" || rc=$?
  if [[ $rc -ne $want ]]; then
    echo "--- stdout ---" >&2; cat "$TMP/$name.out" >&2
    echo "--- stderr ---" >&2; cat "$TMP/$name.err" >&2
    fail "$name: sparsekv $* exited $rc, want $want"
  fi
  echo "ok: $name (exit $rc)"
}

"$SERVER_BIN" --listen=127.0.0.1:0 --metrics_listen= --ready_file="$TMP/ready" \
  >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  [[ -s "$TMP/ready" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited during start-up"
  sleep 0.1
done
[[ -s "$TMP/ready" ]] || fail "server not ready within 10 s"
GRPC_PORT=$(sed -n 's/^grpc_port=//p' "$TMP/ready")
[[ -n "$GRPC_PORT" ]] || fail "bad ready file"

# --- demo: text and JSON (a smaller shape than the default, to keep the test fast) ----------------
run 0 demo_text demo --layers=2 --kv_heads=2 --q_heads=8 --head_dim=128 --context=2048 --steps=4
for word in "memory" "saved" "achieved K" "decode" "faster\|slower" "relative error" \
  "arithmetic f32 in force"; do
  grep -q -- "$word" "$TMP/demo_text.out" || { cat "$TMP/demo_text.out"; fail "demo lacks '$word'"; }
done
run 0 demo_json --json demo --layers=2 --kv_heads=2 --q_heads=8 --head_dim=128 --context=2048 \
  --steps=4 --decode-compute=f16
"$PY" - "$TMP/demo_json.out" <<'PYEOF' || fail "demo --json figures"
import json, sys
d = json.load(open(sys.argv[1]))
# 0.7 per-token at D = 128 keeps 38 of 128: 92 of 256 bytes per row (0.359); the newest 32
# tokens of 2048 stay dense, so the pruned session holds ~0.37 of the dense one.
assert 0.55 < d["memory_saved_ratio"] < 0.66, d
assert abs(d["achieved_sparsity_k"] - 0.703) < 0.01 and abs(d["achieved_sparsity_v"] - 0.703) < 0.01, d
assert d["decode_steps"] == 8, d
assert d["decode_p50_us_dense"] > 0 and d["decode_p50_us_pruned"] > 0 and d["decode_speedup"] > 0, d
assert 0 < d["attention_rel_error_mean"] <= d["attention_rel_error_max"] < 1, d
assert d["bytes_pruned_session"] < d["bytes_dense_session"], d
# f16 in force needs a CPU with AVX512-FP16; elsewhere the sessions run f32.
assert d["decode_compute"] == "f16" and d["decode_compute_in_force"] in ("f16", "f32"), d
print("demo:", {k: d[k] for k in ("memory_saved_ratio", "decode_speedup", "attention_rel_error_mean")})
PYEOF

# --- bench: every workload, tiny ------------------------------------------------------------------
check_bench() {  # check_bench NAME MAIN_PHASE MIN_REQUESTS
  "$PY" - "$TMP/$1.out" "$2" "$3" <<'PYEOF' || fail "bench $1 --json figures"
import json, sys
d = json.load(open(sys.argv[1]))
main, want = sys.argv[2], int(sys.argv[3])
assert d["main_phase"] == main, d["main_phase"]
assert d["requests"] >= want, d["requests"]
assert d["error_count"] == 0 and d["errors"] == {}, d["errors"]
lat = d["latency_us"]
assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"], lat
assert d["throughput_rps"] > 0 and d["seconds"] > 0, d
assert sum(r["count"] for r in d["histogram"]) == d["requests"], d["histogram"]
assert d["client_cpu_s"] >= 0, d
assert d["server_cpu_s"] >= 0 and "requests_per_server_core_s" in d, d
names = [p["name"] for p in d["phases"]]
assert main in names and "create" in names and "delete" in names, names
for p in d["phases"]:
    assert p["error_count"] == 0, p
print(sys.argv[1].split("/")[-1], d["requests"], "requests,", round(d["throughput_rps"]), "req/s, p50",
      lat["p50"], "us")
PYEOF
}
SMALL="--layers=2 --kv_heads=2 --q_heads=4 --head_dim=64 --context=300 --server_pid=$SERVER_PID"
run 0 bench_prefill --json bench --workload=prefill $SMALL --requests=4 --message_bytes=65536
check_bench bench_prefill append 4
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["bytes"] == 4*2*2*300*2*64*2, d["bytes"]; assert d["throughput_MBps"] > 0' \
  "$TMP/bench_prefill.out" || fail "prefill bytes"
run 0 bench_decode --json bench --workload=decode $SMALL --requests=200 --concurrency=2 \
  --decode_compute=f16
check_bench bench_decode decode 200
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["options"]["decode_compute"] == "f16" and d["decode_compute_in_force"] in ("f16", "f32"), d' \
  "$TMP/bench_decode.out" || fail "bench decode_compute"
run 0 bench_stream --json bench --workload=decode_stream $SMALL --requests=500 --concurrency=2 \
  --inflight=4 --append
check_bench bench_stream decode_stream 500
run 0 bench_mixed --json bench --workload=mixed $SMALL --requests=300 --sessions=2
check_bench bench_mixed decode 300
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert "background_append" in [p["name"] for p in d["phases"]]; assert d["options"]["sparsity"] > 0.69 and d["options"]["append"]' \
  "$TMP/bench_mixed.out" || fail "mixed phases"
run 0 bench_sessions --json bench --workload=sessions --layers=1 --kv_heads=1 --q_heads=1 \
  --head_dim=64 --context=16 --sessions=50 --requests=200 --concurrency=2 --server_pid=$SERVER_PID
check_bench bench_sessions decode 200
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); c=[p for p in d["phases"] if p["name"]=="create"][0]; assert c["requests"]==50, c' \
  "$TMP/bench_sessions.out" || fail "sessions create count"
# Text mode: histogram and percentiles; no progress bar (stderr is not a terminal).
run 0 bench_text bench --workload=decode $SMALL --duration=1s
grep -q "p99.9" "$TMP/bench_text.out" || fail "bench text lacks percentiles"
grep -q "|#" "$TMP/bench_text.out" || fail "bench text lacks a histogram"
[[ ! -s "$TMP/bench_text.err" ]] || { cat "$TMP/bench_text.err"; fail "bench wrote to stderr"; }
run 2 bench_bad bench --workload=nope

# Every session the runs created is gone.
run 0 list_after --json list
"$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["count"] == 0, [s["id"] for s in d["sessions"]]' \
  "$TMP/list_after.out" || fail "sessions left behind"

# --- no server: exit 3 with a hint ----------------------------------------------------------------
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
run 3 demo_down --timeout=1s demo
grep -q "deploy/dev/run.sh" "$TMP/demo_down.err" || { cat "$TMP/demo_down.err"; fail "demo gives no start hint"; }
run 3 bench_down --timeout=1s bench --requests=1
echo "PASS"
