#!/usr/bin/env bash
# Before/after of the decode batcher in one run: the same Release server binary with
# --decode_batching=false (each request decoded on its gRPC thread alone: the path before the
# batcher) and =true (the default), under the same `sparsekv bench` loads, alternating modes
# per load so that drift of the machine hits both. Prints a markdown table with the ratios.
# Usage: bash tests/bench/decode_batcher_bench.sh [BUILD_DIR] [OUT_DIR]
# Env: DURATION (default 6s per run), DECODE_THREADS (server --decode_threads, default -1).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
out=${2:-/tmp/sparsekv_batcher_bench}
dur=${DURATION:-6s}
mkdir -p "$out"
server_pid=0
stop_server() { [ "$server_pid" -gt 0 ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=0; }
trap stop_server EXIT

# run NAME MODE BENCH_ARGS...: one load against a fresh server in MODE (inline | batcher).
run() {
  local name=$1 mode=$2; shift 2
  local ready="$out/ready.$mode"
  rm -f "$ready"
  "$build/bin/sparsekv-server" --listen=127.0.0.1:0 --metrics_listen= --ready_file="$ready" \
    --decode_batching=$([ "$mode" = batcher ] && echo true || echo false) \
    --decode_threads="${DECODE_THREADS:--1}" 2> "$out/server.$name.$mode.log" &
  server_pid=$!
  for _ in $(seq 100); do [ -s "$ready" ] && break; sleep 0.1; done
  local port; port=$(sed -n 's/^grpc_port=//p' "$ready")
  "$build/bin/sparsekv" --server="127.0.0.1:$port" --server_pid="$server_pid" --json bench \
    --duration="$dur" "$@" > "$out/$name.$mode.json"
  stop_server
}

declare -A loads=(
  [unary_4k]="--workload=decode --context=4096"
  [stream_1]="--workload=decode_stream --context=1024 --sessions=1 --concurrency=1"
  [stream_64]="--workload=decode_stream --context=1024 --sessions=64 --concurrency=64"
  [unary_64k]="--workload=decode --context=65536 --sessions=1"
)
order=(unary_4k stream_1 stream_64 unary_64k)
for name in "${order[@]}"; do
  for mode in inline batcher; do
    echo "[$(date +%T)] $name $mode" >&2
    # shellcheck disable=SC2086
    run "$name" "$mode" ${loads[$name]}
  done
done

python3 - "$out" "${order[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print("| load | mode | requests | throughput req/s | p50 us | p99 us | server cores | errors |")
print("|---|---|---|---|---|---|---|---|")
ratios = []
for n in names:
    r = {}
    for mode in ("inline", "batcher"):
        j = json.load(open(f"{out}/{n}.{mode}.json"))
        r[mode] = j
        lat = j["latency_us"]
        print(f"| {n} | {mode} | {j['requests']} | {j['throughput_rps']:.0f} | {lat['p50']:.0f} | "
              f"{lat['p99']:.0f} | {j.get('server_cores', 0):.2f} | {j['error_count']} |")
    a, b = r["inline"], r["batcher"]
    ratios.append((n, b["throughput_rps"] / max(a["throughput_rps"], 1e-9),
                   b["latency_us"]["p50"] / max(a["latency_us"]["p50"], 1e-9)))
print()
print("| load | throughput batcher / inline | p50 batcher / inline |")
print("|---|---|---|")
for n, t, p in ratios:
    print(f"| {n} | {t:.2f}x | {p:.2f}x |")
PY
