// Instantiates the batched (de)compression kernels for bf16
// (one file per dtype so that they compile in parallel).
#include "kernels/cuda/compress_dispatch.h"
#include "kernels/cuda/compress_kernel.cuh"

namespace sparsekv::kernels::cuda::internal {

cudaError_t LaunchCompressBf16(const BatchCompressParams& p, bool decompress, cudaStream_t stream) {
  return LaunchCompress<true>(p, decompress, stream);
}

cudaError_t CompressBlocksPerSmBf16(int smem, int* blocks) {
  return CompressBlocksPerSm<true>(smem, blocks);
}

}  // namespace sparsekv::kernels::cuda::internal
