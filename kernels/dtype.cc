#include "kernels/dtype.h"

namespace sparsekv::kernels {

void ConvertElements(DType src_t, const void* src, DType dst_t, void* dst, size_t n) {
  if (src_t == dst_t) {
    std::memcpy(dst, src, n * DTypeSize(src_t));
    return;
  }
  for (size_t i = 0; i < n; ++i) StoreFromFloat(dst_t, dst, i, LoadAsFloat(src_t, src, i));
}

}  // namespace sparsekv::kernels
