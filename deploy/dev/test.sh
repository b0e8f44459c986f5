#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): install, build and run every test.
#   1. Release build + all tests (unit, in-process server, CLI and Python end-to-end, metrics,
#      layering).
#   2. ASan+UBSan build + all tests again.
#   3. TSan build of the core/ and kernels/ tests (TSan is unusable on gRPC code: Debian's
#      gRPC is not instrumented).
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
