// Top-k selection and (de)compression of sections, portable C++ (the reference and the
// production path: compression runs in the background and is not on the decode hot path).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekv::kernels {
namespace {

// Scores as order-preserving integers: the bits of a non-negative float order like the float
// (and a NaN's bits exceed +inf's, ranking it first).
inline uint32_t ScoreKey(float score) { return FloatBits(score) & 0x7fffffffu; }

// The largest T with |{i : keys[i] >= T}| >= k, by binary search on the key value: about 31
// counting passes over n keys, which vectorise, instead of a sort (measured ~6x faster than
// std::nth_element on n = 128 here).
uint32_t KthLargestKey(const uint32_t* keys, int n, int k) {
  uint32_t lo = 0, hi = 0;  // invariant: count(>= lo) >= k, count(>= hi) < k
  for (int i = 0; i < n; ++i) hi = std::max(hi, keys[i]);
  hi += 1;  // keys < 2^31, no overflow
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    int count = 0;
    for (int i = 0; i < n; ++i) count += keys[i] >= mid;
    if (count >= k) {
      lo = mid;
      if (count == k) break;  // exactly k at or above mid: no tie to break
    } else {
      hi = mid;
    }
  }
  return lo;
}

#if defined(__x86_64__)
#define SPARSEKV_AVX512_TARGET __attribute__((target("avx512f,avx512bw,popcnt")))

// KthLargestKey with 16 keys per compare. REQUIRES: n % 16 == 0.
SPARSEKV_AVX512_TARGET uint32_t KthLargestKeyAvx512(const uint32_t* keys, int n, int k) {
  uint32_t hi = 0;
  for (int i = 0; i < n; ++i) hi = std::max(hi, keys[i]);
  uint32_t lo = 0;
  hi += 1;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const __m512i m = _mm512_set1_epi32(static_cast<int>(mid));
    int count = 0;
    for (int i = 0; i < n; i += 16) {
      count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), m));
    }
    if (count >= k) {
      lo = mid;
      if (count == k) break;
    } else {
      hi = mid;
    }
  }
  return lo;
}
#endif

uint32_t KthLargest(const uint32_t* keys, int n, int k) {
#if defined(__x86_64__)
  static const bool avx512 = GetCpuFeatures().avx512;
  if (avx512 && n % 16 == 0) return KthLargestKeyAvx512(keys, n, k);
#endif
  return KthLargestKey(keys, n, k);
}

// Sets the bits of the k best keys in `bitmap` (BitmapBytes(n) bytes): every key above the
// k-th largest, then keys equal to it from the lowest index until k are kept.
void SelectTopK(const uint32_t* keys, int n, int k, uint8_t* bitmap) {
  std::memset(bitmap, 0, BitmapBytes(n));
  const uint32_t t = KthLargest(keys, n, k);
  int above = 0;
  for (int i = 0; i < n; ++i) above += keys[i] > t;
  int ties = k - above;
  for (int i = 0; i < n; ++i) {
    // Branch-free: ties are rare, and a data-dependent branch here mispredicts often.
    const bool tie = keys[i] == t && ties > 0;
    ties -= tie;
    const bool keep = (keys[i] > t) | tie;
    bitmap[i >> 3] |= static_cast<uint8_t>(keep << (i & 7));
  }
}

}  // namespace

void CompressSection(const SectionFormat& fmt, const void* x, const float* token_weight,
                     const float* channel_weight, uint8_t* out) {
  const int d = fmt.head_dim;
  const size_t es = DTypeSize(fmt.dtype);
  if (fmt.kind == SectionKind::kDense) {
    std::memcpy(out, x, static_cast<size_t>(fmt.tokens) * d * es);
    return;
  }
  const int n = fmt.n();
  const size_t bm = BitmapBytes(n);
  uint8_t* bitmaps = out;
  uint8_t* values = out + fmt.bitmap_bytes();
  const auto* src = static_cast<const uint8_t*>(x);
  const bool per_token = fmt.kind == SectionKind::kPerToken;
  // |x| * weights as float for the whole section, then keys per vector.
  std::vector<float> score(static_cast<size_t>(fmt.tokens) * d);
  ConvertElements(fmt.dtype, x, DType::kFloat32, score.data(), score.size());
  for (int t = 0; t < fmt.tokens; ++t) {
    float* row = score.data() + static_cast<size_t>(t) * d;
    const float tw = token_weight ? token_weight[t] : 1.0f;
    for (int j = 0; j < d; ++j) {
      row[j] = std::fabs(row[j]) * tw * (channel_weight ? channel_weight[j] : 1.0f);
    }
  }
  std::vector<uint32_t> keys(n);
  for (int v = 0; v < fmt.vectors(); ++v) {
    // Vector v covers elements (t0 + i, j0) per-channel or (t0, i) per-token, i in [0, n).
    const int t0 = per_token ? v : (v / d) * fmt.group;
    const int j0 = per_token ? 0 : v % d;
    const size_t base = static_cast<size_t>(t0) * d + j0;
    const size_t stride = per_token ? 1 : static_cast<size_t>(d);
    for (int i = 0; i < n; ++i) keys[i] = ScoreKey(score[base + i * stride]);
    uint8_t* bitmap = bitmaps + v * bm;
    SelectTopK(keys.data(), n, fmt.k, bitmap);
    uint8_t* dst = values + static_cast<size_t>(v) * fmt.k * es;
    for (int w = 0; w < n; w += 8) {
      unsigned bits = bitmap[w >> 3];
      while (bits) {
        const int i = w + __builtin_ctz(bits);
        bits &= bits - 1;
        std::memcpy(dst, src + (base + i * stride) * es, es);
        dst += es;
      }
    }
  }
}

void DecompressSection(const SectionFormat& fmt, const uint8_t* in, void* x) {
  const int d = fmt.head_dim;
  const size_t es = DTypeSize(fmt.dtype);
  if (fmt.kind == SectionKind::kDense) {
    std::memcpy(x, in, static_cast<size_t>(fmt.tokens) * d * es);
    return;
  }
  auto* dst = static_cast<uint8_t*>(x);
  std::memset(dst, 0, static_cast<size_t>(fmt.tokens) * d * es);
  const int n = fmt.n();
  const size_t bm = BitmapBytes(n);
  const uint8_t* values = in + fmt.bitmap_bytes();
  const bool per_token = fmt.kind == SectionKind::kPerToken;
  for (int v = 0; v < fmt.vectors(); ++v) {
    const uint8_t* bitmap = in + v * bm;
    const uint8_t* src = values + static_cast<size_t>(v) * fmt.k * es;
    const int t0 = per_token ? v : (v / d) * fmt.group;
    const int j0 = per_token ? 0 : v % d;
    for (int i = 0; i < n; ++i) {
      if (!((bitmap[i >> 3] >> (i & 7)) & 1u)) continue;
      const size_t e =
          per_token ? static_cast<size_t>(t0) * d + i : static_cast<size_t>(t0 + i) * d + j0;
      std::memcpy(dst + e * es, src, es);
      src += es;
    }
  }
}

}  // namespace sparsekv::kernels

namespace sparsekv::kernels {

bool SectionBitmapsValid(const SectionFormat& fmt, const uint8_t* section) {
  if (fmt.kind == SectionKind::kDense) return true;
  const int n = fmt.n();
  const size_t bytes = BitmapBytes(n);
  for (int v = 0; v < fmt.vectors(); ++v) {
    const uint8_t* b = section + static_cast<size_t>(v) * bytes;
    int bits = 0;
    for (size_t i = 0; i < bytes; ++i) {
      uint8_t byte = b[i];
      // Bits at or past n (in the last byte or in padding bytes) must be clear.
      const int first = static_cast<int>(i) * 8;
      if (first + 8 > n) byte &= first >= n ? 0 : static_cast<uint8_t>((1u << (n - first)) - 1);
      if (byte != b[i]) return false;
      bits += __builtin_popcount(byte);
    }
    if (bits != fmt.k) return false;
  }
  return true;
}

}  // namespace sparsekv::kernels
