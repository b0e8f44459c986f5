// Finds values a cache cannot hold: NaN, Inf, and finite values that overflow the storage
// dtype when rounded to it (fp32 65520 stored as fp16 becomes Inf). One NaN or Inf in a layer
// makes every later decode step over it non-finite, so requests are checked before anything
// is stored (the service's policy for non-finite input; README "Errors").
//
// Header for framework-free code; stateless and thread-safe.
#ifndef SPARSEKV_KERNELS_FINITE_CHECK_H_
#define SPARSEKV_KERNELS_FINITE_CHECK_H_

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace sparsekv::kernels {

// Index of the first of the n elements of `data` (type `src`) that is NaN or Inf, or that
// rounds to Inf when converted to `storage`; -1 when every element can be stored.
// REQUIRES: data holds n elements of `src`.
int64_t FindUnstorable(DType src, const void* data, size_t n, DType storage);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_FINITE_CHECK_H_
