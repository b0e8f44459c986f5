#!/usr/bin/env bash
# Installs the Debian 12 packages that building, testing and running sparsekv need.
# Idempotent: when every package is already installed it does nothing (no apt-get update).
set -euo pipefail

packages=(
  # toolchain
  g++ cmake make pkg-config git curl ca-certificates
  # fuzzing (tests/fuzz): clang and its runtimes; libFuzzer and the sanitizer runtimes come
  # from libclang-rt-14-dev (/usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer*)
  clang-14 libclang-rt-14-dev
  # libraries
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev
  # tests: Python client written from the .proto, promtool for /metrics
  python3 python3-grpcio python3-grpc-tools python3-numpy python3-matplotlib prometheus openssl
  # local scale-out (deploy/local) and its test: nginx routes gRPC by x-session-id. The
  # scripts run their own nginx with their own config; they do not use the system service.
  nginx
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
