#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): install, build and run every test.
#   1. Release build + all tests (unit, in-process server, CLI and Python end-to-end, metrics,
#      layering).
#   2. ASan+UBSan build + all tests again.
#   3. TSan build of the core/ and kernels/ tests (TSan is unusable on gRPC code: Debian's
#      gRPC is not instrumented).
#   4. libFuzzer build (clang-14, ASan+UBSan) of tests/fuzz/request_fuzz and service_fuzz:
#      replays the crash regressions on both, then fuzzes every RPC from the committed seeds,
#      90 s without the gRPC transport and 60 s through it; any crash, leak, sanitizer report or
#      broken invariant fails it.
# Set SPARSEKV_QUICK=1 to run stage 1 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/dev/setup.sh
jobs=$(nproc)

stage() { echo; echo "=== $* ==="; }

stage "release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

if [ "${SPARSEKV_QUICK:-0}" = 1 ]; then exit 0; fi

stage "ASan+UBSan build and tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DSPARSEKV_SANITIZE=ON \
  -DSPARSEKV_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build-asan -j"$jobs"
# The pure-Python eval checks (numpy forward, oracle self-test) gain nothing from sanitizers:
# they ran in stage 1. Everything that runs our C++ runs again here.
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs" \
  -E "eval_llama_numpy_test|eval_prune_oracle_test|python_client_allocation_test|python_client_calibrate_example_test"

stage "TSan build and core/kernels tests"
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPARSEKV_TSAN=ON \
  -DSPARSEKV_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build-tsan -j"$jobs" --target core_test kernels_test
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir build-tsan --output-on-failure -L "core|kernels"

stage "libFuzzer build (clang-14, ASan+UBSan) and a bounded fuzz run"
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSPARSEKV_SANITIZE=ON -DSPARSEKV_FUZZ=ON -DSPARSEKV_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build-fuzz -j"$jobs" --target service_fuzz request_fuzz
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# -entropic=0: the entropic schedule's bookkeeping took ~40% of the CPU here (every input runs
# thousands of instrumented edges on several threads).
fuzz_args=(-entropic=0 -timeout=30 -rss_limit_mb=4096 -artifact_prefix=build-fuzz/)
shopt -s nullglob
regressions=(tests/fuzz/regressions/*)
shopt -u nullglob
if [ ${#regressions[@]} -gt 0 ]; then
  build-fuzz/bin/service_fuzz "${fuzz_args[@]}" "${regressions[@]}"
  build-fuzz/bin/request_fuzz "${fuzz_args[@]}" "${regressions[@]}"
fi
# New inputs go to a scratch corpus (the committed seeds stay as they are).
rm -rf build-fuzz/fuzz-corpus && mkdir -p build-fuzz/fuzz-corpus
# First without the transport (service/handlers.h called directly: many more executions per
# second), then through gRPC from what that found (the reactors, cancellation, framing).
build-fuzz/bin/request_fuzz "${fuzz_args[@]}" -max_total_time=90 -print_final_stats=1 \
  build-fuzz/fuzz-corpus tests/fuzz/corpus
build-fuzz/bin/service_fuzz "${fuzz_args[@]}" -max_total_time=60 -print_final_stats=1 \
  build-fuzz/fuzz-corpus tests/fuzz/corpus
