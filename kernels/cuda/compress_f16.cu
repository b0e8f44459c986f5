// Instantiates the batched (de)compression kernels for fp16
// (one file per dtype so that they compile in parallel).
#include "kernels/cuda/compress_dispatch.h"
#include "kernels/cuda/compress_kernel.cuh"

namespace sparsekv::kernels::cuda::internal {

cudaError_t LaunchCompressF16(const BatchCompressParams& p, bool decompress, cudaStream_t stream) {
  return LaunchCompress<false>(p, decompress, stream);
}

cudaError_t CompressBlocksPerSmF16(int smem, int* blocks) {
  return CompressBlocksPerSm<false>(smem, blocks);
}

}  // namespace sparsekv::kernels::cuda::internal
