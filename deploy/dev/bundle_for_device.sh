#!/usr/bin/env bash
# Copies sparsekv-server and the sparsekv CLI with every shared library they need (all but
# glibc's) into a folder, so that they run on another Linux machine without Debian's gRPC,
# Abseil and prometheus-cpp packages (for example the GPU machine): run them there with
# LD_LIBRARY_PATH=FOLDER/lib FOLDER/bin/sparsekv-server ...
# Usage: bundle_for_device.sh BUILD_DIR OUT_DIR
set -euo pipefail
build=${1:?usage: bundle_for_device.sh BUILD_DIR OUT_DIR}
out=${2:?usage: bundle_for_device.sh BUILD_DIR OUT_DIR}
mkdir -p "$out/bin" "$out/lib"
for exe in sparsekv-server sparsekv; do
  cp "$build/bin/$exe" "$out/bin/"
  strip --strip-unneeded "$out/bin/$exe"  # debug info would not fit the transfer limit
  ldd "$build/bin/$exe" | awk '$3 ~ /^\// {print $3}' |
    grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$out/lib/"; done
done
du -sh "$out"
