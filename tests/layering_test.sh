#!/usr/bin/env bash
# Guards the layering clients -> proto <- service -> core -> kernels (and common/, the leaf
# every layer may use) by grepping #includes.
# Usage: layering_test.sh REPO_ROOT. Exits 1 listing every violation.
set -u
root=${1:?usage: layering_test.sh REPO_ROOT}
cd "$root" || exit 2
fail=0
check() {  # check FOLDER REGEX WHY [find args...]
  local dir=$1 re=$2 why=$3
  shift 3
  [ -d "$dir" ] || return 0
  local hits
  hits=$(find "$dir" -type f \( "$@" \) -print0 | xargs -0 -r grep -nE "^[[:space:]]*#[[:space:]]*include[[:space:]]*[<\"]($re)" || true)
  if [ -n "$hits" ]; then
    echo "LAYERING VIOLATION ($why):"
    echo "$hits"
    fail=1
  fi
}
src=(-name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh')
check core 'grpcpp/|grpc/|google/protobuf/|prometheus/|cuda|.*\.pb\.h|service/|clients/' \
  "core/ knows nothing of gRPC, protobuf, metrics, CUDA or the layers above" "${src[@]}"
check core 'kernels/cpu/|kernels/cuda/' \
  "core/ reaches devices only through the ComputeBackend seam (kernels/compute_backend.h)" "${src[@]}"
check kernels 'grpcpp/|grpc/|google/protobuf/|prometheus/|.*\.pb\.h|core/|service/|clients/' \
  "kernels/ knows nothing of gRPC, protobuf or sessions" "${src[@]}"
check kernels 'absl/' "files nvcc compiles must not include Abseil" -name '*.cu' -o -name '*.cuh'
check common 'grpcpp/|grpc/|google/protobuf/|prometheus/|cuda|core/|service/|clients/|kernels/' \
  "common/ is the leaf: standard library (and Abseil status) only" "${src[@]}"
check clients 'core/|service/|kernels/|grpcpp/server' \
  "clients/ talk to the server only through proto/ (dtype helpers come from common/)" "${src[@]}"
check service 'clients/|kernels/' \
  "service/ reaches compute only through core/; dtype helpers come from common/" "${src[@]}"
if [ $fail -ne 0 ]; then exit 1; fi
echo "layering ok: core, kernels, clients and service include only what their layer allows"
