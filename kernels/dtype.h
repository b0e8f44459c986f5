// The cache's element types (common/dtype.h) in the kernels' namespace, plus bulk conversion.
//
// Free of any framework type so that CPU code, CUDA host code and tests share it.
#ifndef SPARSEKV_KERNELS_DTYPE_H_
#define SPARSEKV_KERNELS_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace sparsekv::kernels {

using ::sparsekv::BFloat16ToFloat;
using ::sparsekv::BitsToFloat;
using ::sparsekv::DType;
using ::sparsekv::DTypeName;
using ::sparsekv::DTypeSize;
using ::sparsekv::FloatBits;
using ::sparsekv::FloatToBFloat16;
using ::sparsekv::FloatToHalf;
using ::sparsekv::HalfToFloat;
using ::sparsekv::LoadAsFloat;
using ::sparsekv::StoreFromFloat;

// Converts n elements from `src` (type src_t) to `dst` (type dst_t). Same-type copies are a
// memcpy. REQUIRES: buffers do not overlap.
void ConvertElements(DType src_t, const void* src, DType dst_t, void* dst, size_t n);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_DTYPE_H_
