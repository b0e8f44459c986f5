// Internal to kernels/cuda: the geometry shared by the host plan and the device code of the
// batched decode kernels, and the per-(kind, dtype) entry points that decode_*.cu instantiate.
// Plain C++ so that host-only files include it.
#ifndef SPARSEKV_KERNELS_CUDA_DECODE_DISPATCH_H_
#define SPARSEKV_KERNELS_CUDA_DECODE_DISPATCH_H_

#include <cuda_runtime_api.h>

#include "kernels/cuda/batch_decode.h"
#include "kernels/cuda/host_device.h"

namespace sparsekv::kernels::cuda::internal {

inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kStages = 3;
// SectionKind values as plain ints for device code.
inline constexpr int kKindDense = 0;
inline constexpr int kKindPerToken = 1;
inline constexpr int kKindPerChannel = 2;
// The plan gives every block at least this many tiles (when there are that many).
inline constexpr int kMinTilesPerBlock = 8;

SPARSEKV_HOST_DEVICE constexpr int Round16(int x) { return (x + 15) & ~15; }
// Bytes per shared-memory row of a dense tile: 16 bytes of padding put ldmatrix's eight row
// addresses in distinct bank groups.
SPARSEKV_HOST_DEVICE constexpr int TilePitch(int head_dim) { return 2 * head_dim + 16; }
// Per-token staging: bitmap rows at offset 0, packed values after; each region has room for
// 16 rows plus up to 15 bytes of misalignment at either end.
SPARSEKV_HOST_DEVICE constexpr int PerTokenValuesOffset(int head_dim) {
  return Round16(16 * (head_dim / 8)) + 32;
}
// Stage-slot bytes of one tensor of a 16-row step. Dense tensors go through the slots only in
// the dense kernel; the mixed kernel copies them straight into its K/V tiles when it computes
// the step (dense rows are the short tail there), so that its slots are sized for compressed
// rows and more blocks fit on an SM.
SPARSEKV_HOST_DEVICE constexpr int TensorStageBytes(int kind, int head_dim, int keep,
                                                    bool dense_kernel) {
  return kind == kKindDense      ? (dense_kernel ? 16 * TilePitch(head_dim) : 0)
         : kind == kKindPerToken ? PerTokenValuesOffset(head_dim) + Round16(16 * keep * 2) + 32
                                 : 0;
}
// What a warp hands the block merge: m and l of 8 heads and [8, head_dim] accumulators, fp32.
SPARSEKV_HOST_DEVICE constexpr int MergeScratchBytes(int head_dim) {
  return (16 + 8 * head_dim) * 4;
}
// A warp's shared memory: kStages slots, then (mixed kernel) the expanded K and V tiles.
SPARSEKV_HOST_DEVICE constexpr int WarpSmemBytes(int stage_bytes, int head_dim, bool dense_kernel) {
  return kStages * stage_bytes + (dense_kernel ? 0 : 2 * 16 * TilePitch(head_dim));
}

// Launch `p` (or, with p == nullptr, report the kernel's resident blocks per SM for `smem`
// bytes of dynamic shared memory in *blocks_per_sm). Errors: cudaErrorInvalidValue for a
// head_dim other than 64/128/256, else CUDA's.
cudaError_t DecodeSparseF16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                            cudaStream_t stream, int* blocks_per_sm);
cudaError_t DecodeSparseBf16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                             cudaStream_t stream, int* blocks_per_sm);
cudaError_t DecodeDenseF16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                           cudaStream_t stream, int* blocks_per_sm);
cudaError_t DecodeDenseBf16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                            cudaStream_t stream, int* blocks_per_sm);

}  // namespace sparsekv::kernels::cuda::internal

#endif  // SPARSEKV_KERNELS_CUDA_DECODE_DISPATCH_H_
