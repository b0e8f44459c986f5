// Instantiates the sparse batched decode kernel for bf16
// (one file per kind and dtype so that they compile in parallel).
#include "kernels/cuda/decode_dispatch.h"
#include "kernels/cuda/decode_kernel.cuh"

namespace sparsekv::kernels::cuda::internal {

cudaError_t DecodeSparseBf16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                             cudaStream_t stream, int* blocks_per_sm) {
  return DispatchDecode<true, false>(p, shape, smem, stream, blocks_per_sm);
}

}  // namespace sparsekv::kernels::cuda::internal
