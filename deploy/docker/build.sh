#!/usr/bin/env bash
# The builder stage of Dockerfile.cpu and Dockerfile.cuda: configure, build and stage the
# server, the CLI (the image's health check) and the preStop hook under DEST/usr/local/bin.
# check.py runs this same script on a developer machine, where no container engine runs.
#
# Usage: build.sh SRC_DIR BUILD_DIR DEST_DIR [extra cmake arguments]
# SPARSEKV_PREBUILT_BIN=DIR: configure as usual, then stage the binaries found in DIR instead
# of compiling them again (check.py --quick: the test build already compiled the same sources).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 SRC_DIR BUILD_DIR DEST_DIR [cmake args]" >&2; exit 2; }
src=$1 build=$2 dest=$3
shift 3

# Release, no tests or benchmarks: the image carries the two programs only. Kernel variants
# are picked at start-up from the CPU's features, so no -march flag ties the image to the
# build machine.
mkdir -p "$build"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSPARSEKV_BUILD_TESTS=OFF \
  -DSPARSEKV_BUILD_BENCHMARKS=OFF "$@" >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log" >&2; exit 1; }
if [ -n "${SPARSEKV_PREBUILT_BIN:-}" ]; then
  bin=$SPARSEKV_PREBUILT_BIN
else
  cmake --build "$build" -j"${SPARSEKV_BUILD_JOBS:-$(nproc)}" --target sparsekv-server sparsekv
  bin=$build/bin
fi
install -d "$dest/usr/local/bin"
install -m 0755 "$bin/sparsekv-server" "$bin/sparsekv" "$dest/usr/local/bin/"
strip --strip-unneeded "$dest/usr/local/bin/sparsekv-server" "$dest/usr/local/bin/sparsekv"
install -m 0755 "$src/deploy/docker/prestop.sh" "$dest/usr/local/bin/sparsekv-prestop"
echo "build.sh: staged $(ls "$dest/usr/local/bin" | tr '\n' ' ')"
