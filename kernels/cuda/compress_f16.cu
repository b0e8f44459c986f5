// Instantiates the batched (de)compression kernels for fp16
// (one file per dtype so that they compile in parallel).
#include "kernels/cuda/compress_dispatch.h"
#include "kernels/cuda/compress_kernel.cuh"

namespace sparsekv::kernels::cuda::internal {

cudaError_t LaunchCompressF16(const BatchCompressParams& p, bool decompress, cudaStream_t stream) {
  return LaunchCompress<false>(p, decompress, stream);
}

}  // namespace sparsekv::kernels::cuda::internal
