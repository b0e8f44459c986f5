#!/usr/bin/env bash
# On the GPU machine (H200), from the repository root: builds kernels/ and their GPU tests and
# benchmarks with CUDA + CMake only, runs the GPU tests, compute-sanitizer on the test binaries
# (--quick sizes; memcheck and racecheck, plus initcheck for cuda_compress_test), the decode
# benchmark and the PyTorch SDPA baseline in the same run (merged into a table), and the
# compression benchmark. Logs go to OUT_DIR (default $OUT, else /tmp/sparsekv_gpu):
#   build.log test.log sanitizer.log bench.log bench.jsonl baseline.jsonl report.md
#   compress.log compress.jsonl (cuda_compress_bench: GB/s of dense input vs a D2D copy)
#   (bench: per-token steps expanded by scatter, SPARSEKV_DECODE_SCATTER_MAX_KEEP=256; legacy:
#   bench_legacy.jsonl, the compressed modes again with the slot-by-slot expansion, the default,
#   SPARSEKV_DECODE_SCATTER_MAX_KEEP=0, for a before/after in the same run)
# Usage: bash tests/bench/cuda/run_on_device.sh [OUT_DIR]
# Env: BUILD_DIR (default build-gpu), STEPS (default "build test bench baseline legacy compress
# sanitize"), BUDGET_S (default 470: steps are cut short or skipped so that the script ends
# within it), BENCH_ARGS (extra benchmark flags, e.g. "--only 16x32768").
set -uo pipefail
cd "$(dirname "$0")/../../.."
out=${1:-${OUT:-/tmp/sparsekv_gpu}}
build=${BUILD_DIR:-build-gpu}
steps=${STEPS:-build test bench baseline legacy compress sanitize}
mkdir -p "$out"
start=$(date +%s)
status=0
has() { [[ " $steps " == *" $1 "* ]]; }
note() { echo "[$(( $(date +%s) - start ))s] $*"; }
deadline=$(( start + ${BUDGET_S:-470} ))
# Seconds a step may take: its own limit, or what is left of the budget (minus a margin).
lim() { local left=$(( deadline - $(date +%s) - 5 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv; nvcc --version | tail -2; } > "$out/report.md" 2>&1

if has build; then
  note "configure + build"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  { cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DSPARSEKV_KERNELS_ONLY=ON \
      -DSPARSEKV_ENABLE_CUDA=ON -DSPARSEKV_BUILD_TESTS=ON -DSPARSEKV_BUILD_BENCHMARKS=ON &&
    cmake --build "$build" -j "$(nproc)"; } > "$out/build.log" 2>&1 || {
    note "BUILD FAILED"; tail -40 "$out/build.log"; exit 1; }
fi

if has test; then
  note "GPU tests (ctest -L gpu)"
  timeout "$(lim 200)" ctest --test-dir "$build" -L gpu --output-on-failure -V > "$out/test.log" 2>&1 ||
    status=1
  grep -E "batch_decode_test:|compress_test:|max error|PASSED|FAILED|FAIL |tests passed|Skipped|Passed|Failed" \
    "$out/test.log" | head -40
fi

if has bench; then
  note "benchmark, scatter expansion (SPARSEKV_DECODE_SCATTER_MAX_KEEP=256)"
  SPARSEKV_DECODE_SCATTER_MAX_KEEP=256 timeout "$(lim 150)" "$build/bin/cuda_batch_decode_bench" --iters "${ITERS:-30}" \
    ${BENCH_ARGS:-} --json "$out/bench.jsonl" > "$out/bench.log" 2>&1 || status=1
  grep "^|" "$out/bench.log"
fi

if has baseline; then
  note "PyTorch SDPA baseline"
  PYTHONUNBUFFERED=1 timeout "$(lim 120)" python3 tests/bench/cuda/sdpa_baseline.py \
    --iters "${ITERS:-30}" --json "$out/baseline.jsonl" >> "$out/bench.log" 2>&1 || status=1
fi

if has legacy; then
  note "benchmark, slot-by-slot expansion (SPARSEKV_DECODE_SCATTER_MAX_KEEP=0)"
  SPARSEKV_DECODE_SCATTER_MAX_KEEP=0 timeout "$(lim 120)" "$build/bin/cuda_batch_decode_bench" \
    --iters "${ITERS:-30}" --modes s0.5,s0.7 ${BENCH_ARGS:-} --json "$out/bench_legacy.jsonl" \
    > "$out/bench_legacy.log" 2>&1 || status=1
  grep "^|" "$out/bench_legacy.log"
fi

if [ -s "$out/bench.jsonl" ] && [ -s "$out/baseline.jsonl" ]; then
  python3 tests/bench/cuda/report.py "$out/bench.jsonl" "$out/baseline.jsonl" >> "$out/report.md"
  if [ -s "$out/bench_legacy.jsonl" ]; then
    { echo; echo "Slot-by-slot expansion (SPARSEKV_DECODE_SCATTER_MAX_KEEP=0), same run:"; echo
      grep '"mode": *"dense"' "$out/bench.jsonl" | cat - "$out/bench_legacy.jsonl" > "$out/legacy_merged.jsonl"
      python3 tests/bench/cuda/report.py "$out/legacy_merged.jsonl" "$out/baseline.jsonl"
    } >> "$out/report.md"
  fi
  echo; tail -n +6 "$out/report.md"
fi

if has compress; then
  note "compression benchmark (cuda_compress_bench)"
  timeout "$(lim 120)" "$build/bin/cuda_compress_bench" --iters "${ITERS:-30}" \
    --json "$out/compress.jsonl" > "$out/compress.log" 2>&1 || status=1
  grep -E "^\||device:|SKIP" "$out/compress.log"
fi

if has ncu; then
  note "ncu profile: sparse 0.7 and dense at batch 16, context 32k"
  for m in s0.7; do
    timeout "$(lim 200)" ncu --clock-control none --kernel-name regex:BatchDecodeKernel --launch-skip 4 \
      --launch-count 2 --section SpeedOfLight --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats "$build/bin/cuda_batch_decode_bench" --only 16x32768 --modes "$m" \
      --iters 2 --warmup 1 >> "$out/bench.log" 2>&1 || echo "ncu rc=$?" >> "$out/bench.log"
  done
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Issue Slots Busy|Registers Per|Achieved Occupancy|Shared Memory|bank" "$out/bench.log" | head -40
fi

if has sanitize; then
  note "compute-sanitizer memcheck + racecheck (--quick)"
  {
    for tool in memcheck racecheck initcheck; do
      echo "=== $tool cuda_compress_test"
      extra=(); [ "$tool" = racecheck ] && extra=(--racecheck-report all)
      timeout "$(lim 60)" compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 3 \
        "$build/bin/cuda_compress_test" --quick; echo "$tool cuda_compress_test rc=$?"
    done
    echo "=== memcheck"
    timeout "$(lim 120)" compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$build/bin/cuda_batch_decode_test" --quick; echo "memcheck rc=$?"
    echo "=== racecheck"
    timeout "$(lim 120)" compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
      "$build/bin/cuda_batch_decode_test" --quick; echo "racecheck rc=$?"
  } > "$out/sanitizer.log" 2>&1
  grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$out/sanitizer.log"
fi
note "done, status $status"
exit $status
