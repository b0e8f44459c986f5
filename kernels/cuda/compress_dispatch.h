// Internal to kernels/cuda: the per-dtype launchers of the batched (de)compression kernels that
// compress_f16.cu / compress_bf16.cu instantiate from compress_kernel.cuh. Plain C++ so that
// batch_compress.cc (host-only) includes it.
#ifndef SPARSEKV_KERNELS_CUDA_COMPRESS_DISPATCH_H_
#define SPARSEKV_KERNELS_CUDA_COMPRESS_DISPATCH_H_

#include <cuda_runtime_api.h>

#include "kernels/cuda/batch_compress.h"
#include "kernels/cuda/host_device.h"

namespace sparsekv::kernels::cuda::internal {

// Threads per block: 4 warps, each working on whole vectors.
inline constexpr int kCompressWarps = 4;
inline constexpr int kCompressThreads = kCompressWarps * 32;

// Bytes of one row of a per-channel group tile in shared memory: 4 bytes of padding make the
// row pitch an odd number of 32-bit words, so that the 32 lanes of a warp reading one column
// (channel) hit 32 different banks.
SPARSEKV_HOST_DEVICE constexpr int GroupTilePitchBytes(int head_dim) { return 2 * head_dim + 4; }

// Launch one kernel of p.plan.num_blocks blocks over p.plan.num_tiles tiles (nothing when there
// are no tiles). REQUIRES: p.plan.dtype is the dtype the function names.
cudaError_t LaunchCompressF16(const BatchCompressParams& p, bool decompress, cudaStream_t stream);
cudaError_t LaunchCompressBf16(const BatchCompressParams& p, bool decompress, cudaStream_t stream);

// Resident blocks per SM of either direction's kernel with `smem` bytes of dynamic shared memory.
cudaError_t CompressBlocksPerSmF16(int smem, int* blocks);
cudaError_t CompressBlocksPerSmBf16(int smem, int* blocks);

}  // namespace sparsekv::kernels::cuda::internal

#endif  // SPARSEKV_KERNELS_CUDA_COMPRESS_DISPATCH_H_
