// Element types of the KV cache and exact scalar conversions between them: the one
// definition every layer shares (clients and the service convert tensors with these; kernels
// add bulk SIMD conversion on top, kernels/dtype.h).
//
// Header-only, free of any framework type (nvcc compiles it too). Conversions to fp16/bf16
// round to nearest even and keep NaN/Inf.
#ifndef SPARSEKV_COMMON_DTYPE_H_
#define SPARSEKV_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace sparsekv {

enum class DType : uint8_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

constexpr size_t DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr const char* DTypeName(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));  // Inf / NaN
  if (exp != 0) return BitsToFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsToFloat(sign);  // signed zero
  // Subnormal half: value = mant * 2^-24, exact in float.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN; NaN keeps a quiet payload bit
    return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | ((abs >> 13) & 0x3ffu) : 0u);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to Inf
  if (abs < 0x38800000u) {                        // below the smallest normal half (2^-14)
    if (abs < 0x33000000u) return sign;           // below half the smallest subnormal
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24: aligns the value to units of 2^-24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return sign | static_cast<uint16_t>(h);
}

inline float BFloat16ToFloat(uint16_t b) { return BitsToFloat(static_cast<uint32_t>(b) << 16); }

inline uint16_t FloatToBFloat16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

// Reads element i of a buffer of type t as float.
inline float LoadAsFloat(DType t, const void* base, size_t i) {
  switch (t) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kFloat16:
      return HalfToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

// Writes v as element i of a buffer of type t (rounded to nearest even).
inline void StoreFromFloat(DType t, void* base, size_t i, float v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(base)[i] = v;
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = FloatToHalf(v);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = FloatToBFloat16(v);
      return;
  }
}

// Converts n elements one at a time (for small tensors: queries, outputs, CLI files; bulk
// K/V goes through kernels::ConvertElements). REQUIRES: buffers do not overlap.
inline void ConvertScalar(DType src_t, const void* src, DType dst_t, void* dst, size_t n) {
  if (src_t == dst_t) {
    std::memcpy(dst, src, n * DTypeSize(src_t));
    return;
  }
  for (size_t i = 0; i < n; ++i) StoreFromFloat(dst_t, dst, i, LoadAsFloat(src_t, src, i));
}

}  // namespace sparsekv

#endif  // SPARSEKV_COMMON_DTYPE_H_
