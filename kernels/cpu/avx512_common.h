// Internals shared by the AVX-512 decode-attention files (avx512_attention.cc: fp32
// arithmetic; avx512_fp16_attention.cc: fp16 arithmetic on AVX512-FP16;
// avx512_bf16_attention.cc: bf16 dot products on AVX512_BF16): the per-call scratch, the
// prefetcher, the row-block view, row-word loads and the transposed reduction. Include only
// from those.
#ifndef SPARSEKV_KERNELS_CPU_AVX512_COMMON_H_
#define SPARSEKV_KERNELS_CPU_AVX512_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu/prefetcher.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEKV_HAVE_AVX512_VARIANT 1
#include <immintrin.h>

// Every function that uses AVX-512 carries SKV_AVX512 (a target attribute) instead of the
// file being compiled with -mavx512*: the standard-library templates instantiated there then
// stay baseline code, so the linker can never pick an AVX-512 copy of, say,
// std::vector<float>::resize for the rest of the program (an ODR trap of per-file flags).
#define SKV_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,f16c,bmi2,popcnt")))
#define SKV_INLINE inline __attribute__((always_inline))

namespace sparsekv::kernels::avx512_detail {

constexpr int kBlock = 64;  // tokens per online-softmax block (per-token and dense rows)

inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sixteen vectors v[i] (16 floats each, 64 bytes apart) -> one vector whose lane i is the sum
// of v[i]'s lanes: 45 instructions instead of 16 full horizontal reductions.
SKV_AVX512 SKV_INLINE __m512 HSum16(const float* v) {
  __m512 pair[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_loadu_ps(v + 32 * i);
    const __m512 b = _mm512_loadu_ps(v + 32 * i + 16);
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
    pair[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  __m512 quad[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(pair[2 * i]);
    const __m512d y = _mm512_castps_pd(pair[2 * i + 1]);
    // Per 128-bit lane: [a, b, c, d] lane sums of the four source vectors.
    quad[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // quad[i] holds vectors 4i..4i+3, one partial per 128-bit lane: sum the four lanes.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x44),
                                   _mm512_shuffle_f32x4(quad[0], quad[1], 0xee));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x44),
                                   _mm512_shuffle_f32x4(quad[2], quad[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
}

struct Work {
  int group = 0, d = 0, dpad = 0, words = 0;
  std::vector<float> q, acc, p, red, m, l;
  std::vector<uint32_t> dense_mask;  // [words] valid columns of each 32-column word
  std::vector<const uint8_t*> vp;    // [words, kBlock] per-row value cursors
  std::vector<float> kf, vf;         // fallback expansion buffers
  Prefetcher pf;                     // the next block's bytes
  // fp16 arithmetic (DecodeCompute::kFloat16, avx512_fp16_attention.cc): q * scale in fp16
  // [group, dpad], p as fp16 pairs [group, kBlock] (each weight in both halves of a word).
  bool f16 = false;
  std::vector<uint16_t> q16;
  std::vector<uint32_t> p16;
  // bf16 dot products (DecodeCompute::kBFloat16, avx512_bf16_attention.cc): q * scale as bf16
  // hi + lo parts [group, dpad] each (lo: q - hi rounded again; used for bf16 caches). p16
  // then holds the V weights as bf16 pairs of consecutive rows: [group, kBlock], per head 32
  // hi pairs, then 32 lo pairs (p - hi rounded again; bf16 caches only).
  bool bf16 = false;
  std::vector<uint16_t> qb_hi, qb_lo;

  void Reset(const DecodeAttentionParams& params) {
    group = params.group;
    d = params.head_dim;
    dpad = (d + 31) / 32 * 32;
    words = dpad / 32;
    q.assign(static_cast<size_t>(group) * dpad, 0.0f);
    for (int h = 0; h < group; ++h) {
      for (int j = 0; j < d; ++j) {
        q[static_cast<size_t>(h) * dpad + j] =
            params.q[static_cast<size_t>(h) * d + j] * params.scale;
      }
    }
    acc.assign(static_cast<size_t>(group) * dpad, 0.0f);
    p.assign(static_cast<size_t>(group) * kBlock, 0.0f);
    red.assign(8 * 16 * 16, 0.0f);
    m.assign(group, -std::numeric_limits<float>::infinity());
    l.assign(group, 0.0f);
    dense_mask.assign(words, 0xffffffffu);
    if (d % 32 != 0) dense_mask[words - 1] = (1u << (d % 32)) - 1;
    vp.assign(static_cast<size_t>(words) * kBlock, nullptr);
  }
};

// Rows of a block in per-token or dense layout.
struct RowBlock {
  const uint8_t* bitmaps;  // null for dense rows
  size_t bm_stride;        // bytes of bitmap per row
  const uint8_t* values;   // first row's values
  size_t val_stride;       // bytes of values per row
  const uint32_t* dense_mask;
  int words;
};

template <bool kSparse>
SKV_INLINE uint32_t RowMask(const RowBlock& rb, int r, int w) {
  return kSparse ? Load32(rb.bitmaps + r * rb.bm_stride + 4 * w) : rb.dense_mask[w];
}

// How a block's rows are stored, for the reduced-arithmetic kernels: compressed (expand by the
// bitmap words), dense with a partial last word (head_dim % 32 != 0: masked loads there) or
// dense in whole words (plain loads, no mask work in the row loops).
enum RowKind { kSparseRows, kDenseRows, kFullRows };

template <int kRows>
SKV_INLINE uint32_t Mask(const RowBlock& rb, int r, int w) {
  if (kRows == kFullRows) return 0xffffffffu;
  return RowMask<kRows == kSparseRows>(rb, r, w);
}

// One 32-column word of a row of 16-bit elements (fp16 or bf16) in 32 lanes, zeros where the
// mask is clear.
template <int kRows>
SKV_AVX512 SKV_INLINE __m512i Word16(const uint8_t* p, uint32_t mask) {
  if (kRows == kSparseRows) return _mm512_maskz_expandloadu_epi16(mask, p);
  if (kRows == kFullRows || mask == 0xffffffffu) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi16(mask, p);
}

// Bytes of 16-bit elements a row word under `mask` occupies.
template <int kRows>
SKV_INLINE size_t WordBytes(uint32_t mask) {
  return kRows == kSparseRows ? static_cast<size_t>(__builtin_popcount(mask)) * 2 : 64;
}

// Popcount of a row's first n bitmap words: where word n's packed values start.
SKV_INLINE size_t PrefixCount(const uint8_t* bm, int n) {
  size_t c = 0;
  int i = 0;
  for (; i + 2 <= n; i += 2) {
    uint64_t x;
    std::memcpy(&x, bm + 4 * i, sizeof(x));
    c += static_cast<size_t>(__builtin_popcountll(x));
  }
  if (i < n) c += static_cast<size_t>(__builtin_popcount(Load32(bm + 4 * i)));
  return c;
}

// Cursor of row r at word w0.
template <int kRows>
SKV_INLINE const uint8_t* RowCursor(const RowBlock& rb, int r, int w0) {
  const uint8_t* ptr = rb.values + r * rb.val_stride;
  if (w0 == 0) return ptr;
  return ptr +
         (kRows == kSparseRows ? 2 * PrefixCount(rb.bitmaps + r * rb.bm_stride, w0) : 64 * w0);
}

// The fp32 recomputation of one slice of fp16 (or, kBf16, bf16) rows (rare: a reduced-arithmetic
// partial sum overflowed, or the inputs are not finite): acc[h, 32*w0 .. 32*(w0+nw)) += sum_r p[h,
// r] * v_r, in the fp32 kernel's order of operations (row by row, fused multiply-adds), so it
// matches that kernel.
template <int kRows, bool kBf16 = false>
SKV_AVX512 void SliceFp32(const RowBlock& rb, int rows, int w0, int nw, int ht, const float* p,
                          float* acc, int dpad) {
  for (int r = 0; r < rows; ++r) {
    const uint8_t* ptr = RowCursor<kRows>(rb, r, w0);
    for (int z = 0; z < nw; ++z) {
      const uint32_t m = Mask<kRows>(rb, r, w0 + z);
      const __m512i x = Word16<kRows>(ptr, m);
      ptr += WordBytes<kRows>(m);
      const __m256i x0 = _mm512_castsi512_si256(x), x1 = _mm512_extracti64x4_epi64(x, 1);
      const __m512 lo = kBf16
                            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x0), 16))
                            : _mm512_cvtph_ps(x0);
      const __m512 hi = kBf16
                            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x1), 16))
                            : _mm512_cvtph_ps(x1);
      for (int h = 0; h < ht; ++h) {
        const __m512 pb = _mm512_set1_ps(p[h * kBlock + r]);
        float* o = acc + h * dpad + 32 * (w0 + z);
        _mm512_storeu_ps(o, _mm512_fmadd_ps(pb, lo, _mm512_loadu_ps(o)));
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(pb, hi, _mm512_loadu_ps(o + 16)));
      }
    }
  }
}

// Calls f(std::integral_constant<int, W>) with W = words when it is one of the unrolled word
// counts (head_dim 64, 128, 256), else W = 0 (the count is read at run time).
template <class F>
SKV_INLINE void WithWords(int words, F&& f) {
  switch (words) {
    case 2:
      return f(std::integral_constant<int, 2>());
    case 4:
      return f(std::integral_constant<int, 4>());
    case 8:
      return f(std::integral_constant<int, 8>());
    default:
      return f(std::integral_constant<int, 0>());
  }
}

// Calls f(std::integral_constant<int, HT>) for a head tile HT in {1, 2, 3, 4, 8} (Tile's).
template <class F>
SKV_INLINE void WithTile(int ht, F&& f) {
  switch (ht) {
    case 8:
      return f(std::integral_constant<int, 8>());
    case 4:
      return f(std::integral_constant<int, 4>());
    case 3:
      return f(std::integral_constant<int, 3>());
    case 2:
      return f(std::integral_constant<int, 2>());
    default:
      return f(std::integral_constant<int, 1>());
  }
}

// Whether every score w->p[h, 0..rows) is finite: reduced-arithmetic kernels recompute a block
// in fp32 otherwise (overflow, or non-finite inputs, which then get the fp32 path's semantics).
SKV_AVX512 SKV_INLINE bool ScoresFinite(const Work& w, int rows) {
  __mmask16 bad = 0;
  for (int h = 0; h < w.group; ++h) {
    const float* s = w.p.data() + h * kBlock;
    for (int c = 0; c < rows; c += 16) {
      const __mmask16 valid =
          static_cast<__mmask16>(rows - c >= 16 ? 0xffffu : (1u << (rows - c)) - 1);
      bad |= _mm512_mask_fpclass_ps_mask(valid, _mm512_loadu_ps(s + c), 0x99);  // NaN, +-inf
    }
  }
  return bad == 0;
}

// Head tiles: up to 8 heads share one pass over rows (per-token/dense K), 4 elsewhere so that
// accumulators stay in the 32 zmm registers.
inline int Tile(int left, int max_tile) {
  if (left >= 8 && max_tile >= 8) return 8;
  return std::min(left, 4);
}

// Pulls kLines cache lines from row r's values (and, compressed, its bitmap line) from L2 into
// L1, a few rows ahead of use. The block Prefetcher (prefetcher.h) brings the next block
// only into L2, and a compressed row's loads form a short dependent chain (bitmap word ->
// popcount -> address of the next word's values), so L2 round trips showed in DRAM-resident
// runs. Line counts are compile-time (a runtime-counted loop or a computed jump measured ~3-7%
// slower at s = 0.7): per K row pair 4 for compressed rows (two rows of 76 or 128 bytes at
// s = 0.7 / 0.5) and 8 for dense fp16 D = 128 rows; per V row 3 and 4. Measured, ms per step
// on one thread, medians of 3-4 runs: dense 20.6 -> 19.7, s = 0.5 13.9 -> 13.2, s = 0.7
// 11.1 -> 11.0. Each T0 prefetch holds one of the 16 L1 fill buffers that demand loads need,
// so covering every line of every row exactly (a prefetch per 64 bytes plus the last byte)
// was slower. Used by the fp16-arithmetic kernels only: in the fp32 row loops, which are
// compute-bound, it measured no gain (dense 24.4 -> 24.6 ms, s = 0.7 18.1 -> 18.5).
constexpr int kL1Ahead = 4;          // rows
constexpr int kPairLinesSparse = 4;  // K, per row pair
constexpr int kPairLinesDense = 8;
constexpr int kRowLinesSparse = 3;  // V, per row
constexpr int kRowLinesDense = 4;

template <bool kSparse, int kLines>
SKV_AVX512 SKV_INLINE void PrefetchRowL1(const RowBlock& rb, int r) {
  const char* v = reinterpret_cast<const char*>(rb.values + r * rb.val_stride);
#pragma GCC unroll 8
  for (int i = 0; i < kLines; ++i) _mm_prefetch(v + 64 * i, _MM_HINT_T0);
  if (kSparse) {
    _mm_prefetch(reinterpret_cast<const char*>(rb.bitmaps + r * rb.bm_stride), _MM_HINT_T0);
  }
}

}  // namespace sparsekv::kernels::avx512_detail

#endif  // x86-64 with GCC or Clang
#endif  // SPARSEKV_KERNELS_CPU_AVX512_COMMON_H_
