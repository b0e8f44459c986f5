#!/usr/bin/env bash
# Before/after of the decode batcher in one run: the same Release server binary with
# --decode_batching=false (each request decoded on its gRPC thread alone: the path before the
# batcher) and =true (the default), under the same `sparsekv bench` loads, alternating modes
# per load so that drift of the machine hits both. Prints a markdown table with the ratios.
# Usage: bash tests/bench/decode_batcher_bench.sh [BUILD_DIR] [OUT_DIR]
# Env: DURATION (default 6s per run), DECODE_THREADS (server --decode_threads, default -1),
# SPIN_US (server --decode_spin_us, default 250), LOADS (names to run, default all), REPEAT
# (runs per load and mode, alternating, default 3; the table shows each run's median).
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
    --decode_threads="${DECODE_THREADS:--1}" --decode_spin_us="${SPIN_US:-250}" 2> "$out/server.$name.$mode.log" &
  server_pid=$!
  for _ in $(seq 100); do [ -s "$ready" ] && break; sleep 0.1; done
  local port; port=$(sed -n 's/^grpc_port=//p' "$ready")
  # One retry: on a shared VM a client has (rarely) failed to connect to a server that was up.
  for attempt in 1 2; do
    if "$build/bin/sparsekv" --server="127.0.0.1:$port" --server_pid="$server_pid" --json bench \
        --duration="$dur" "$@" > "$out/$name.$mode.$rep.json"; then
      break
    fi
    echo "  client failed (attempt $attempt)" >&2
    [ "$attempt" = 2 ] && exit 1
  done
  stop_server
}

declare -A loads=(
  [unary_4k]="--workload=decode --context=4096"
  [stream_1]="--workload=decode_stream --context=1024 --sessions=1 --concurrency=1"
  [stream_64]="--workload=decode_stream --context=1024 --sessions=64 --concurrency=64"
  [stream_64_short]="--workload=decode_stream --context=64 --sessions=64 --concurrency=64"
  [unary_64k]="--workload=decode --context=65536 --sessions=1"
)
read -r -a order <<< "${LOADS:-unary_4k stream_1 stream_64 stream_64_short unary_64k}"
repeat=${REPEAT:-3}
for name in "${order[@]}"; do
  for rep in $(seq "$repeat"); do
    for mode in inline batcher; do
      echo "[$(date +%T)] $name $mode run $rep" >&2
      # shellcheck disable=SC2086
      run "$name" "$mode" ${loads[$name]}
    done
  done
done

python3 - "$out" "$repeat" "${order[@]}" <<'PY'
import json, statistics, sys
out, repeat, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"Median of {repeat} alternating runs per load and mode.")
print()
print("| load | mode | throughput req/s (runs) | p50 us (runs) | p99 us | server cores | errors |")
print("|---|---|---|---|---|---|---|")
ratios = []
for n in names:
    med = {}
    for mode in ("inline", "batcher"):
        runs = [json.load(open(f"{out}/{n}.{mode}.{r}.json")) for r in range(1, repeat + 1)]
        tp = [j["throughput_rps"] for j in runs]
        p50 = [j["latency_us"]["p50"] for j in runs]
        med[mode] = (statistics.median(tp), statistics.median(p50))
        print(f"| {n} | {mode} | {med[mode][0]:.0f} ({', '.join(f'{x:.0f}' for x in tp)}) | "
              f"{med[mode][1]:.0f} ({', '.join(f'{x:.0f}' for x in p50)}) | "
              f"{statistics.median(j['latency_us']['p99'] for j in runs):.0f} | "
              f"{statistics.median(j.get('server_cores', 0) for j in runs):.2f} | "
              f"{sum(j['error_count'] for j in runs)} |")
    ratios.append((n, med["batcher"][0] / max(med["inline"][0], 1e-9),
                   med["batcher"][1] / max(med["inline"][1], 1e-9)))
print()
print("| load | throughput batcher / inline | p50 batcher / inline |")
print("|---|---|---|")
for n, t, p in ratios:
    print(f"| {n} | {t:.2f}x | {p:.2f}x |")
PY
