// Device-side conversions between float and the 16-bit storage dtypes (fp16, bf16), held as
// raw uint16_t bits; shared by the decode and compression kernels. The host-side equivalents
// are common/dtype.h's HalfToFloat / BFloat16ToFloat / FloatToHalf / FloatToBFloat16 (same
// round-to-nearest-even; NaN payloads aside, which callers that rank NaNs handle themselves).
#ifndef SPARSEKV_KERNELS_CUDA_DEVICE_DTYPE_CUH_
#define SPARSEKV_KERNELS_CUDA_DEVICE_DTYPE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sparsekv::kernels::cuda::internal {

template <bool kBf16>
__device__ __forceinline__ uint16_t ToBits(float x) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}
template <bool kBf16>
__device__ __forceinline__ float FromBits(uint16_t b) {
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  } else {
    return __half2float(__ushort_as_half(b));
  }
}

}  // namespace sparsekv::kernels::cuda::internal

#endif  // SPARSEKV_KERNELS_CUDA_DEVICE_DTYPE_CUH_
