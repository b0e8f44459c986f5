// The fixed-k bitmap format of compressed K/V (DESIGN.md section 2) and its byte geometry.
//
// A *vector* is n elements that pruning ranks together: one token row of one KV head
// (per-token, n = head_dim) or one channel of one KV head over a group of G tokens
// (per-channel, n = G). Every vector keeps exactly k elements, so every compressed vector has
// the same size and needs no offsets.
//
// A *section* holds one of K or V of one KV head for a chunk of C tokens:
//   [vectors x bitmap_bytes]  bitmaps: bit i (LSB first within each little-endian 32-bit word)
//                             set when element i is kept. This is the DESIGN's "bit i of
//                             64-bit word i/64" layout with the unused trailing 32-bit word of
//                             odd-word vectors dropped: n = 32 takes 4 bytes, n = 128 takes 16.
//   [vectors x k]             kept values in the storage dtype, in increasing element order.
// Both parts are packed with no padding (the byte minimum); readers use unaligned loads.
// Vector order: per-token, token order; per-channel, group-major (vector g * head_dim + j is
// channel j of tokens [g*G, g*G + G)). A dense section (sparsity 0) is the plain [C, head_dim]
// matrix.
//
// Plain data and pure functions; thread-safe.
#ifndef SPARSEKV_KERNELS_COMPRESSED_FORMAT_H_
#define SPARSEKV_KERNELS_COMPRESSED_FORMAT_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/dtype.h"

namespace sparsekv::kernels {

enum class SectionKind : uint8_t {
  kDense = 0,       // not pruned: [tokens, head_dim]
  kPerToken = 1,    // n = head_dim per vector, one vector per token
  kPerChannel = 2,  // n = group per vector, head_dim vectors per group of tokens
};

// k = clamp(floor((1 - sparsity) * n + 0.5), 1, n): round half up, never empty, never more
// than n. Computed in double so that e.g. s = 0.5, n = 128 gives exactly 64.
inline int KeepCount(double sparsity, int n) {
  const double kept = std::floor((1.0 - sparsity) * n + 0.5);
  if (kept < 1.0) return 1;
  if (kept > n) return n;
  return static_cast<int>(kept);
}

inline constexpr size_t BitmapBytes(int n) { return static_cast<size_t>((n + 31) / 32) * 4; }

// Geometry of one section. REQUIRES: per-channel tokens is a multiple of group.
struct SectionFormat {
  SectionKind kind = SectionKind::kDense;
  int head_dim = 0;
  int tokens = 0;  // C: tokens per chunk
  int group = 32;  // G: tokens per per-channel vector
  int k = 0;       // kept elements per vector (unused for dense)
  DType dtype = DType::kFloat16;

  int n() const { return kind == SectionKind::kPerChannel ? group : head_dim; }
  int vectors() const {
    return kind == SectionKind::kPerChannel ? (tokens / group) * head_dim : tokens;
  }
  size_t bitmap_bytes() const {
    return kind == SectionKind::kDense ? 0 : vectors() * BitmapBytes(n());
  }
  size_t values_bytes() const {
    const size_t elems = kind == SectionKind::kDense ? static_cast<size_t>(tokens) * head_dim
                                                     : static_cast<size_t>(vectors()) * k;
    return elems * DTypeSize(dtype);
  }
  size_t bytes() const { return bitmap_bytes() + values_bytes(); }
  // Elements stored (kept) per token on average; for sparsity reporting.
  double kept_fraction() const {
    return kind == SectionKind::kDense ? 1.0 : static_cast<double>(k) / n();
  }
};

// Builds the format for a sparsity (0 gives a dense section).
inline SectionFormat MakeSectionFormat(SectionKind kind, double sparsity, int head_dim, int tokens,
                                       int group, DType dtype) {
  SectionFormat f;
  f.kind = sparsity > 0.0 ? kind : SectionKind::kDense;
  f.head_dim = head_dim;
  f.tokens = tokens;
  f.group = group;
  f.dtype = dtype;
  f.k = f.kind == SectionKind::kDense ? head_dim : KeepCount(sparsity, f.n());
  return f;
}

// Compresses one section: x is [fmt.tokens, head_dim] dense rows of fmt.dtype; out receives
// fmt.bytes(). Each vector keeps the k elements with the highest score
//   score(t, j) = token_weight[t] * channel_weight[j] * |x[t, j]|
// (a null weight array means all ones), ties going to the lower index within the vector.
// NaN scores rank above everything, so a NaN is kept and shows up instead of vanishing.
// REQUIRES: fmt valid; weights, when given, finite and >= 0.
void CompressSection(const SectionFormat& fmt, const void* x, const float* token_weight,
                     const float* channel_weight, uint8_t* out);

// Whether every bitmap of `section` (fmt.bytes() bytes, from outside the process: a snapshot)
// sets exactly fmt.k bits, none at or past n. Kernels walk the packed values by the bitmap
// bits, so a bitmap with more bits would read past its vector. Dense sections are always
// valid. REQUIRES: fmt valid.
bool SectionBitmapsValid(const SectionFormat& fmt, const uint8_t* section);

// Inverse of CompressSection: writes [fmt.tokens, head_dim] rows of fmt.dtype to x, with
// pruned elements as +0.
void DecompressSection(const SectionFormat& fmt, const uint8_t* in, void* x);

// Reads one compressed vector: returns whether element i of vector `v` is kept.
inline bool BitmapTest(const uint8_t* bitmaps, int n, int v, int i) {
  const uint8_t* b = bitmaps + static_cast<size_t>(v) * BitmapBytes(n);
  return (b[i >> 3] >> (i & 7)) & 1u;
}

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_COMPRESSED_FORMAT_H_
