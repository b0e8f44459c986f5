#!/usr/bin/env bash
# README command 1: install, build, and run sparsekv-server on the CPU in the foreground
# (gRPC on :50051, Prometheus metrics on :9464/metrics). Extra arguments go to the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/dev/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSPARSEKV_BUILD_TESTS=OFF \
  -DSPARSEKV_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target sparsekv-server sparsekv
echo "run: starting build/bin/sparsekv-server (Ctrl-C stops it); try: build/bin/sparsekv health"
exec ./build/bin/sparsekv-server "$@"
