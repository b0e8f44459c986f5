// Top-k selection and (de)compression of sections, portable C++ (the reference and the
// production path: compression runs in the background and is not on the decode hot path).
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/compressed_format.h"

namespace sparsekv::kernels {
namespace {

// Sort key of an element: larger is better. The score's float bits order like the float for
// non-negative values (and NaN's bits exceed +inf's, ranking it first); the low half breaks
// ties towards the lower index.
inline uint64_t RankKey(float score, int index) {
  return (static_cast<uint64_t>(FloatBits(score) & 0x7fffffffu) << 32) |
         (0xffffffffu - static_cast<uint32_t>(index));
}

// Selects the k best of n keys and sets their bits in `bitmap` (BitmapBytes(n) bytes, zeroed
// here). `keys` is scratch of n entries, reordered.
void SelectTopK(uint64_t* keys, int n, int k, uint8_t* bitmap) {
  std::memset(bitmap, 0, BitmapBytes(n));
  if (k < n) {
    std::nth_element(keys, keys + (k - 1), keys + n, [](uint64_t a, uint64_t b) { return a > b; });
  }
  for (int i = 0; i < k; ++i) {
    const int index = static_cast<int>(0xffffffffu - static_cast<uint32_t>(keys[i]));
    bitmap[index >> 3] |= static_cast<uint8_t>(1u << (index & 7));
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
  std::vector<uint64_t> keys(n);
  const auto* src = static_cast<const uint8_t*>(x);
  auto element = [&](int t, int j) { return static_cast<size_t>(t) * d + j; };
  auto score = [&](int t, int j) {
    float s = std::fabs(LoadAsFloat(fmt.dtype, x, element(t, j)));
    if (token_weight) s *= token_weight[t];
    if (channel_weight) s *= channel_weight[j];
    return s;
  };
  for (int v = 0; v < fmt.vectors(); ++v) {
    // Vector v covers elements (t(i), j(i)) for i in [0, n).
    const bool per_token = fmt.kind == SectionKind::kPerToken;
    const int t0 = per_token ? v : (v / d) * fmt.group;
    const int j0 = per_token ? 0 : v % d;
    for (int i = 0; i < n; ++i) {
      keys[i] = per_token ? RankKey(score(t0, i), i) : RankKey(score(t0 + i, j0), i);
    }
    uint8_t* bitmap = bitmaps + v * bm;
    SelectTopK(keys.data(), n, fmt.k, bitmap);
    uint8_t* dst = values + static_cast<size_t>(v) * fmt.k * es;
    for (int i = 0; i < n; ++i) {
      if (!((bitmap[i >> 3] >> (i & 7)) & 1u)) continue;
      const size_t e = per_token ? element(t0, i) : element(t0 + i, j0);
      std::memcpy(dst, src + e * es, es);
      dst += es;
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
