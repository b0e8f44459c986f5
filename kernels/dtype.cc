#include "kernels/dtype.h"

#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekv::kernels {
namespace {

#if defined(__x86_64__)
// F16C converts 8 values per instruction with IEEE round-to-nearest-even, exactly like the
// scalar FloatToHalf (NaN payloads aside); uploads of fp32 K/V into fp16 caches run through
// here, so it sets the bulk-upload rate.
__attribute__((target("avx2,f16c"))) void FloatToHalfF16c(const float* src, uint16_t* dst,
                                                          size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = FloatToHalf(src[i]);
}

__attribute__((target("avx2,f16c"))) void HalfToFloatF16c(const uint16_t* src, float* dst,
                                                          size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}
#endif

bool HasF16c() {
#if defined(__x86_64__)
  static const bool f16c = GetCpuFeatures().avx2;
  return f16c;
#else
  return false;
#endif
}

}  // namespace

void ConvertElements(DType src_t, const void* src, DType dst_t, void* dst, size_t n) {
  if (src_t == dst_t) {
    std::memcpy(dst, src, n * DTypeSize(src_t));
    return;
  }
#if defined(__x86_64__)
  if (HasF16c()) {
    if (src_t == DType::kFloat32 && dst_t == DType::kFloat16) {
      FloatToHalfF16c(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
      return;
    }
    if (src_t == DType::kFloat16 && dst_t == DType::kFloat32) {
      HalfToFloatF16c(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
      return;
    }
  }
#endif
  for (size_t i = 0; i < n; ++i) StoreFromFloat(dst_t, dst, i, LoadAsFloat(src_t, src, i));
}

}  // namespace sparsekv::kernels
