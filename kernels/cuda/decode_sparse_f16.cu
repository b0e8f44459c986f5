// Instantiates the sparse batched decode kernel for fp16
// (one file per kind and dtype so that they compile in parallel).
#include "kernels/cuda/decode_dispatch.h"
#include "kernels/cuda/decode_kernel.cuh"

namespace sparsekv::kernels::cuda::internal {

cudaError_t DecodeSparseF16(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                            cudaStream_t stream, int* blocks_per_sm) {
  return DispatchDecode<false, false>(p, shape, smem, stream, blocks_per_sm);
}

}  // namespace sparsekv::kernels::cuda::internal
