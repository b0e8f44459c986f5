// AVX2 decode attention. See avx2_attention.h for the contract.
//
// Blocks of up to 64 tokens, as in avx512_attention.cc: K scores, an online-softmax update, V
// accumulation, with the next block's bytes prefetched into L2 meanwhile (prefetcher.h).
// - K rows are read and expanded in registers, 8 columns at a time, two rows at once (2 x 4
//   independent FMA chains); the partial sums of 8 rows are reduced together (Reduce8).
//   Compressed fp16/bf16 columns: one pshufb of the packed bits per bitmap byte (a 4 KB table
//   of shuffle controls that also zeroes dropped columns), then one conversion; fp32: a vpermps
//   with a 256-entry index table and a keep mask. Only rows within a load's width of the
//   section's end take the bounded (copying) load.
// - V: dense rows are read in place; compressed rows are expanded once into an L1-resident
//   fp32 buffer (a V row is read by every column slice, and re-expanding it per slice needs
//   a cursor per slice). Slices of 16-32 columns keep up to 4 heads' accumulators in the 16
//   ymm registers.
// Functions carry target attributes instead of the file being compiled with -mavx2, so no AVX2
// copy of a standard-library template can leak into baseline code.
#include "kernels/cpu/avx2_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/prefetcher.h"
#include "kernels/cpu/row_source.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEKV_HAVE_AVX2_VARIANT 1
#include <immintrin.h>
#endif

namespace sparsekv::kernels {

#ifndef SPARSEKV_HAVE_AVX2_VARIANT

bool Avx2AttentionCompiled() { return false; }
void Avx2DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state) {}

#else

bool Avx2AttentionCompiled() { return true; }

#define SKV_AVX2 __attribute__((target("avx2,fma,f16c,bmi2,popcnt")))
#define SKV_INLINE inline __attribute__((always_inline))

namespace {

constexpr int kBlock = 64;

// kExpand[b] = the 8 lane indices (one byte each) that vpermps needs to place the popcount(b)
// packed values of bitmap byte b at the lanes of b's set bits.
struct ExpandTable {
  uint64_t idx[256];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      uint64_t v = 0;
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((b >> lane) & 1) v |= static_cast<uint64_t>(k++) << (8 * lane);
      }
      idx[b] = v;
    }
  }
};
const ExpandTable kExpand;

// kShuffle[b] = the pshufb control that places the popcount(b) packed 16-bit values of bitmap
// byte b at the lanes of b's set bits and zeroes the others (0x80 bytes): one shuffle per 8
// columns on the packed fp16/bf16 bits, before conversion, instead of a permute of converted
// floats plus a keep mask.
struct ShuffleTable {
  alignas(16) uint8_t ctl[256][16];
  ShuffleTable() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (b >> lane) & 1;
        ctl[b][2 * lane] = set ? static_cast<uint8_t>(2 * k) : 0x80;
        ctl[b][2 * lane + 1] = set ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += set;
      }
    }
  }
};
const ShuffleTable kShuffle;

SKV_AVX2 SKV_INLINE __m256 Load8Full(DType t, const uint8_t* p) {
  switch (t) {
    case DType::kFloat16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    case DType::kBFloat16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    case DType::kFloat32:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
  return _mm256_setzero_ps();
}

// Reads up to 8 elements of type t at p as floats, without reading past p + n elements.
SKV_AVX2 SKV_INLINE __m256 Load8(DType t, const uint8_t* p, int n) {
  if (n >= 8) return Load8Full(t, p);
  alignas(32) uint8_t tmp[32] = {};
  std::memcpy(tmp, p, static_cast<size_t>(std::max(n, 0)) * DTypeSize(t));
  return Load8Full(t, tmp);
}

// 8 packed 16-bit values (fp16 or bf16 bits) in the low lanes of x -> 8 floats.
SKV_AVX2 SKV_INLINE __m256 Convert8(DType t, __m128i x) {
  if (t == DType::kFloat16) return _mm256_cvtph_ps(x);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}

// Expands dense rows [t0, t0 + rows) of d columns to out [rows, dpad] floats (zero padded).
SKV_AVX2 void ExpandDenseRows(DType t, const uint8_t* data, int t0, int rows, int d, int dpad,
                              float* out) {
  const size_t es = DTypeSize(t);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* src = data + (static_cast<size_t>(t0) + r) * d * es;
    float* o = out + static_cast<size_t>(r) * dpad;
    for (int j = 0; j < dpad; j += 8)
      _mm256_storeu_ps(o + j, Load8(t, src + j * es, std::min(8, d - j)));
  }
}

// exp(x), ~1 ulp for x in [-87, 88]; below it flushes to 0, NaN propagates.
SKV_AVX2 SKV_INLINE __m256 Exp(__m256 in) {
  const __m256 nan = _mm256_cmp_ps(in, in, _CMP_UNORD_Q);
  const __m256 tiny = _mm256_cmp_ps(in, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  __m256 x = _mm256_min_ps(_mm256_max_ps(in, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_andnot_ps(tiny, y);
  return _mm256_blendv_ps(y, in, nan);
}

SKV_AVX2 SKV_INLINE float HSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

struct Work {
  int group = 0, d = 0, dpad = 0;
  std::vector<float> q, acc, p, m, l, red, vb, kf, vf;
  Prefetcher pf;  // the next block's bytes

  void Reset(const DecodeAttentionParams& params) {
    group = params.group;
    d = params.head_dim;
    dpad = (d + 7) / 8 * 8;
    q.assign(static_cast<size_t>(group) * dpad, 0.0f);
    for (int h = 0; h < group; ++h)
      for (int j = 0; j < d; ++j)
        q[static_cast<size_t>(h) * dpad + j] =
            params.q[static_cast<size_t>(h) * d + j] * params.scale;
    acc.assign(static_cast<size_t>(group) * dpad, 0.0f);
    p.assign(static_cast<size_t>(group) * kBlock, 0.0f);
    m.assign(group, -std::numeric_limits<float>::infinity());
    l.assign(group, 0.0f);
    red.assign(4 * 8 * 8, 0.0f);
    vb.assign(static_cast<size_t>(kBlock) * dpad, 0.0f);
  }
};

// Rows [t0, t0 + rows) of one section (per-token when fmt is set) or of dense rows at data.
struct Blk {
  const SectionFormat* fmt;  // per-token format; null: dense rows
  DType t;
  const uint8_t* data;
  const uint8_t* end;  // end of the section's values (compressed rows only)
  int t0;
  int rows;
};

// Group g (columns 8g .. 8g+7) of a dense row of d columns, as floats.
template <DType T, bool kPartial>
SKV_AVX2 SKV_INLINE __m256 DenseGroup(const uint8_t* row, int g, int d) {
  constexpr size_t es = T == DType::kFloat32 ? 4 : 2;
  const int j = 8 * g;
  if (!kPartial || j + 8 <= d) return Load8Full(T, row + j * es);
  return Load8(T, row + j * es, d - j);
}

// The next 8 columns of a compressed row: bitmap byte b, packed values at *src (advanced past
// them). `end` keeps the section's last rows from reading past its values.
template <DType T, bool kGuard>
SKV_AVX2 SKV_INLINE __m256 SparseGroup(unsigned b, const uint8_t** src, const uint8_t* end) {
  const uint8_t* s = *src;
  if constexpr (T == DType::kFloat32) {
    const __m256 v = !kGuard || end - s >= 32 ? _mm256_loadu_ps(reinterpret_cast<const float*>(s))
                                              : Load8(T, s, static_cast<int>((end - s) / 4));
    const __m256i idx =
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kExpand.idx[b])));
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i keep =
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), lanes), lanes);
    *src = s + 4 * __builtin_popcount(b);
    return _mm256_and_ps(_mm256_permutevar8x32_ps(v, idx), _mm256_castsi256_ps(keep));
  } else {
    __m128i x;
    if (!kGuard || end - s >= 16) {
      x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    } else {
      alignas(16) uint8_t tmp[16] = {};
      std::memcpy(tmp, s, static_cast<size_t>(std::max<ptrdiff_t>(end - s, 0)));
      x = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    x = _mm_shuffle_epi8(x, _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle.ctl[b])));
    *src = s + 2 * __builtin_popcount(b);
    return Convert8(T, x);
  }
}

// Whether loads from a compressed row whose values end at row_end may reach past the
// section's end: a load starting inside the row (16 bytes of fp16/bf16, 32 of fp32) ends
// before row_end plus its width. Only a section's last rows are that close.
template <DType T>
SKV_INLINE bool NearEnd(const uint8_t* row_end, const uint8_t* end) {
  return end - row_end < (T == DType::kFloat32 ? 32 : 16);
}

// One compressed row (bitmap bytes bits, values at src) to dpad floats at o.
template <DType T, int G, bool kGuard>
SKV_AVX2 SKV_INLINE void ExpandSparseRow(const uint8_t* bits, const uint8_t* src,
                                         const uint8_t* end, int d, int dpad, float* o) {
  const int groups = G > 0 ? G : dpad / 8;
#pragma GCC unroll 32
  for (int g = 0; g < groups; ++g) {
    const unsigned m = G > 0 || 8 * g < d ? bits[g] : 0u;
    _mm256_storeu_ps(o + 8 * g, SparseGroup<T, kGuard>(m, &src, end));
  }
}

// Expands the block's compressed rows to out [rows, dpad] floats. G as in PairScores.
template <DType T, int G>
SKV_AVX2 void ExpandSparseRows(const Blk& b, int d, int dpad, float* out) {
  constexpr size_t es = T == DType::kFloat32 ? 4 : 2;
  const size_t bm = BitmapBytes(d);
  const size_t stride = static_cast<size_t>(b.fmt->k) * es;
  const uint8_t* bits = b.data + static_cast<size_t>(b.t0) * bm;
  const uint8_t* vals = b.data + b.fmt->bitmap_bytes() + static_cast<size_t>(b.t0) * stride;
  for (int r = 0; r < b.rows; ++r, bits += bm, vals += stride) {
    float* o = out + static_cast<size_t>(r) * dpad;
    if (NearEnd<T>(vals + stride, b.end)) {
      ExpandSparseRow<T, G, true>(bits, vals, b.end, d, dpad, o);
    } else {
      ExpandSparseRow<T, G, false>(bits, vals, b.end, d, dpad, o);
    }
  }
}

template <DType T>
SKV_AVX2 void ExpandSparse(const Blk& b, int d, int dpad, float* out) {
  switch (d) {
    case 64:
      return ExpandSparseRows<T, 8>(b, d, dpad, out);
    case 128:
      return ExpandSparseRows<T, 16>(b, d, dpad, out);
    default:
      return ExpandSparseRows<T, 0>(b, d, dpad, out);
  }
}

// Eight vectors v[i] (8 floats each, 32 bytes apart) -> one vector whose lane i is the sum of
// v[i]'s lanes.
SKV_AVX2 SKV_INLINE __m256 Reduce8(const float* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24));
  const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(v + 32), _mm256_loadu_ps(v + 40));
  const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(v + 48), _mm256_loadu_ps(v + 56));
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [sums of v0..v3, low half | high half]
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One K row pair's partial sums for HT heads: a0[h], a1[h] (8 lanes each). G: 8-column groups
// per row when head_dim == 8 * G (unrolled, no column checks), 0 for any head_dim. kGuard: the
// rows lie within 16 bytes of the section's end, so compressed loads are bounded.
template <DType T, bool kSparse, int HT, int G, bool kGuard>
SKV_AVX2 SKV_INLINE void PairScores(const uint8_t* ba, const uint8_t* bb, const uint8_t* sa,
                                    const uint8_t* sb, const uint8_t* end, int d, int dpad,
                                    const float* q, __m256* a0, __m256* a1) {
  const int groups = G > 0 ? G : dpad / 8;
  const int dp = G > 0 ? 8 * G : dpad;
#pragma GCC unroll 32
  for (int g = 0; g < groups; ++g) {
    __m256 x0, x1;
    if constexpr (kSparse) {
      const unsigned ma = G > 0 || 8 * g < d ? ba[g] : 0u;
      const unsigned mb = G > 0 || 8 * g < d ? bb[g] : 0u;
      x0 = SparseGroup<T, kGuard>(ma, &sa, end);
      x1 = SparseGroup<T, kGuard>(mb, &sb, end);
    } else {
      x0 = DenseGroup<T, G == 0>(sa, g, d);
      x1 = DenseGroup<T, G == 0>(sb, g, d);
    }
#pragma GCC unroll 4
    for (int h = 0; h < HT; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * dp + 8 * g);
      a0[h] = _mm256_fmadd_ps(x0, qv, a0[h]);
      a1[h] = _mm256_fmadd_ps(x1, qv, a1[h]);
    }
  }
}

// Scores of HT query heads (q: [HT, dpad], scale applied) against the block's K rows, read and
// expanded in registers (no row buffer): p[h * kBlock + r]. Rows go in pairs so that 2 * HT
// independent FMA chains hide the FMA latency; partial sums are reduced 8 rows at a time.
template <DType T, bool kSparse, int HT, int G>
SKV_AVX2 void Scores(const Blk& b, int d, int dpad, const float* q, float* red, float* p,
                     Prefetcher* pfp) {
  constexpr size_t es = T == DType::kFloat32 ? 4 : 2;
  const size_t bm = BitmapBytes(d);
  const size_t stride = kSparse ? static_cast<size_t>(b.fmt->k) * es : static_cast<size_t>(d) * es;
  const uint8_t* const bits = kSparse ? b.data + static_cast<size_t>(b.t0) * bm : nullptr;
  const uint8_t* const vals =
      (kSparse ? b.data + b.fmt->bitmap_bytes() : b.data) + static_cast<size_t>(b.t0) * stride;
  Prefetcher pf = *pfp;
  for (int r0 = 0; r0 < b.rows; r0 += 8) {
    const int n = std::min(8, b.rows - r0);
    for (int i = 0; i < n; i += 2) {
      pf.Step(2 * Prefetcher::kUnitsPerRow);
      const int ra = r0 + i;
      const int rb = i + 1 < n ? ra + 1 : ra;  // an odd last row pairs with itself
      __m256 a0[HT], a1[HT];
      for (int h = 0; h < HT; ++h) a0[h] = a1[h] = _mm256_setzero_ps();
      const uint8_t* sa = vals + ra * stride;
      const uint8_t* sb = vals + rb * stride;
      const uint8_t* ba = kSparse ? bits + ra * bm : nullptr;
      const uint8_t* bb = kSparse ? bits + rb * bm : nullptr;
      if (kSparse && NearEnd<T>(sb + stride, b.end)) {  // rb is the later row
        PairScores<T, kSparse, HT, G, true>(ba, bb, sa, sb, b.end, d, dpad, q, a0, a1);
      } else {
        PairScores<T, kSparse, HT, G, false>(ba, bb, sa, sb, b.end, d, dpad, q, a0, a1);
      }
      for (int h = 0; h < HT; ++h) {
        _mm256_storeu_ps(red + (h * 8 + i) * 8, a0[h]);
        _mm256_storeu_ps(red + (h * 8 + i + 1) * 8, a1[h]);
      }
    }
    for (int h = 0; h < HT; ++h) {
      for (int i = n; i < 8; ++i) _mm256_storeu_ps(red + (h * 8 + i) * 8, _mm256_setzero_ps());
      const __m256 s = Reduce8(red + h * 64);
      if (n == 8) {
        _mm256_storeu_ps(p + h * kBlock + r0, s);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, s);
        std::memcpy(p + h * kBlock + r0, tmp, sizeof(float) * n);
      }
    }
  }
  *pfp = pf;
}

template <DType T, bool kSparse, int HT>
SKV_AVX2 void ScoresG(const Blk& b, int d, int dpad, const float* q, float* red, float* p,
                      Prefetcher* pf) {
  switch (d) {
    case 64:
      return Scores<T, kSparse, HT, 8>(b, d, dpad, q, red, p, pf);
    case 128:
      return Scores<T, kSparse, HT, 16>(b, d, dpad, q, red, p, pf);
    default:
      return Scores<T, kSparse, HT, 0>(b, d, dpad, q, red, p, pf);
  }
}

template <DType T, bool kSparse>
SKV_AVX2 void ScoresAll(const Blk& b, Work* w) {
  for (int h0 = 0; h0 < w->group; h0 += 4) {
    const int ht = std::min(4, w->group - h0);
    const float* q = w->q.data() + static_cast<size_t>(h0) * w->dpad;
    float* p = w->p.data() + static_cast<size_t>(h0) * kBlock;
    switch (ht) {
      case 4:
        ScoresG<T, kSparse, 4>(b, w->d, w->dpad, q, w->red.data(), p, &w->pf);
        break;
      case 3:
        ScoresG<T, kSparse, 3>(b, w->d, w->dpad, q, w->red.data(), p, &w->pf);
        break;
      case 2:
        ScoresG<T, kSparse, 2>(b, w->d, w->dpad, q, w->red.data(), p, &w->pf);
        break;
      default:
        ScoresG<T, kSparse, 1>(b, w->d, w->dpad, q, w->red.data(), p, &w->pf);
        break;
    }
  }
}

SKV_AVX2 void RunScores(const Blk& b, Work* w) {
  const bool sparse = b.fmt != nullptr;
  switch (b.t) {
    case DType::kFloat16:
      return sparse ? ScoresAll<DType::kFloat16, true>(b, w)
                    : ScoresAll<DType::kFloat16, false>(b, w);
    case DType::kBFloat16:
      return sparse ? ScoresAll<DType::kBFloat16, true>(b, w)
                    : ScoresAll<DType::kBFloat16, false>(b, w);
    case DType::kFloat32:
      return sparse ? ScoresAll<DType::kFloat32, true>(b, w)
                    : ScoresAll<DType::kFloat32, false>(b, w);
  }
}

// Online-softmax update for the block's scores in w->p: running max and sum, accumulator
// rescale; p becomes the weights exp(s - m).
SKV_AVX2 void Softmax(int rows, Work* w) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int h = 0; h < w->group; ++h) {
    float* s = w->p.data() + static_cast<size_t>(h) * kBlock;
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 nan = _mm256_setzero_ps();
    for (int r = 0; r < rows; r += 8) {
      const __m256 valid =
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rows - r), iota));
      const __m256 x = _mm256_loadu_ps(s + r);
      nan = _mm256_or_ps(nan, _mm256_and_ps(valid, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(mx, x, valid));
    }
    const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float block_max = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    if (_mm256_movemask_ps(nan) != 0) block_max = NAN;
    const float m_old = w->m[h];
    const float m_new = std::isnan(block_max) ? NAN : std::fmax(m_old, block_max);
    const float alpha = std::isinf(m_old) ? 0.0f : std::exp(m_old - m_new);
    float* acc = w->acc.data() + static_cast<size_t>(h) * w->dpad;
    if (alpha != 1.0f) {
      for (int j = 0; j < w->dpad; j += 8)
        _mm256_storeu_ps(acc + j, _mm256_mul_ps(_mm256_loadu_ps(acc + j), _mm256_set1_ps(alpha)));
    }
    __m256 sum = _mm256_setzero_ps();
    for (int r = 0; r < kBlock; r += 8) {
      const __m256 valid =
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rows - r), iota));
      const __m256 e =
          _mm256_and_ps(valid, Exp(_mm256_sub_ps(_mm256_loadu_ps(s + r), _mm256_set1_ps(m_new))));
      _mm256_storeu_ps(s + r, e);
      sum = _mm256_add_ps(sum, e);
    }
    w->l[h] = w->l[h] * alpha + HSum(sum);
    w->m[h] = m_new;
  }
}

// acc[h, j0 .. j0 + 8 * NZ) += sum_r p[h, r] * v[r, j0 ..] for HT heads, V rows of type T at
// base (row_bytes apart, whole 8-column groups): the HT * NZ accumulators stay in registers.
// The first slice of a row reports the row's prefetch units (one Step per row: a Step per
// slice cost as much as the slice's FMAs).
template <DType T, int HT, int NZ>
SKV_AVX2 void ValuesSlice(const uint8_t* base, size_t row_bytes, int rows, int dpad, int j0,
                          const float* p, float* acc, Prefetcher* pfp) {
  constexpr size_t es = T == DType::kFloat32 ? 4 : 2;
  Prefetcher pf = *pfp;
  __m256 a[HT][NZ];
  for (int h = 0; h < HT; ++h)
    for (int z = 0; z < NZ; ++z) a[h][z] = _mm256_loadu_ps(acc + h * dpad + j0 + 8 * z);
  for (int r = 0; r < rows; ++r) {
    if (j0 == 0) pf.Step(Prefetcher::kUnitsPerRow);
    const uint8_t* v = base + r * row_bytes + j0 * es;
    __m256 x[NZ];
    for (int z = 0; z < NZ; ++z) x[z] = Load8Full(T, v + 8 * z * es);
    for (int h = 0; h < HT; ++h) {
      const __m256 pb = _mm256_broadcast_ss(p + h * kBlock + r);
      for (int z = 0; z < NZ; ++z) a[h][z] = _mm256_fmadd_ps(pb, x[z], a[h][z]);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int z = 0; z < NZ; ++z) _mm256_storeu_ps(acc + h * dpad + j0 + 8 * z, a[h][z]);
  *pfp = pf;
}

// Column slices of NZ groups (8 columns each), then single groups for the remainder.
template <DType T, int HT, int NZ>
SKV_AVX2 void ValuesTile(const uint8_t* base, size_t row_bytes, int rows, int dpad, const float* p,
                         float* acc, Prefetcher* pf) {
  int j0 = 0;
  for (; j0 + 8 * NZ <= dpad; j0 += 8 * NZ)
    ValuesSlice<T, HT, NZ>(base, row_bytes, rows, dpad, j0, p, acc, pf);
  for (; j0 < dpad; j0 += 8) ValuesSlice<T, HT, 1>(base, row_bytes, rows, dpad, j0, p, acc, pf);
}

template <DType T>
SKV_AVX2 void ValuesAll(const uint8_t* base, size_t row_bytes, int rows, Work* w) {
  for (int h0 = 0; h0 < w->group; h0 += 4) {
    const int ht = std::min(4, w->group - h0);
    const float* p = w->p.data() + static_cast<size_t>(h0) * kBlock;
    float* acc = w->acc.data() + static_cast<size_t>(h0) * w->dpad;
    switch (ht) {
      case 4:
        ValuesTile<T, 4, 2>(base, row_bytes, rows, w->dpad, p, acc, &w->pf);
        break;
      case 3:
        ValuesTile<T, 3, 3>(base, row_bytes, rows, w->dpad, p, acc, &w->pf);
        break;
      case 2:
        ValuesTile<T, 2, 4>(base, row_bytes, rows, w->dpad, p, acc, &w->pf);
        break;
      default:
        ValuesTile<T, 1, 4>(base, row_bytes, rows, w->dpad, p, acc, &w->pf);
        break;
    }
  }
}

// Dense rows of whole 8-column groups are read in place; compressed rows (and dense rows of
// other widths) are first expanded to fp32 rows in the L1-resident w->vb.
SKV_AVX2 void RunValues(const Blk& b, Work* w) {
  if (b.fmt == nullptr && w->d == w->dpad) {
    const size_t row = static_cast<size_t>(w->d) * DTypeSize(b.t);
    const uint8_t* base = b.data + b.t0 * row;
    switch (b.t) {
      case DType::kFloat16:
        return ValuesAll<DType::kFloat16>(base, row, b.rows, w);
      case DType::kBFloat16:
        return ValuesAll<DType::kBFloat16>(base, row, b.rows, w);
      case DType::kFloat32:
        return ValuesAll<DType::kFloat32>(base, row, b.rows, w);
    }
  }
  if (b.fmt == nullptr) {
    ExpandDenseRows(b.t, b.data, b.t0, b.rows, w->d, w->dpad, w->vb.data());
  } else if (b.t == DType::kFloat16) {
    ExpandSparse<DType::kFloat16>(b, w->d, w->dpad, w->vb.data());
  } else if (b.t == DType::kBFloat16) {
    ExpandSparse<DType::kBFloat16>(b, w->d, w->dpad, w->vb.data());
  } else {
    ExpandSparse<DType::kFloat32>(b, w->d, w->dpad, w->vb.data());
  }
  ValuesAll<DType::kFloat32>(reinterpret_cast<const uint8_t*>(w->vb.data()),
                             static_cast<size_t>(w->dpad) * sizeof(float), b.rows, w);
}

// Adds the bytes a block reads to the prefetcher.
void AddRanges(const Blk& b, int d, Prefetcher* pf) {
  const size_t es = DTypeSize(b.t);
  if (b.fmt == nullptr) {
    const size_t row = static_cast<size_t>(d) * es;
    pf->Add(b.data + b.t0 * row, b.rows * row);
    return;
  }
  const size_t bm = BitmapBytes(d);
  const size_t vs = static_cast<size_t>(b.fmt->k) * es;
  pf->Add(b.data + b.t0 * bm, b.rows * bm);
  pf->Add(b.data + b.fmt->bitmap_bytes() + b.t0 * vs, b.rows * vs);
}

// Runs blocks one behind the one most recently emitted, so that the emitted block's bytes
// are prefetched while the previous one computes (as in avx512_attention.cc).
struct Pipeline {
  Work* w;
  bool have = false;
  Blk k{}, v{};

  SKV_AVX2 void Run() {
    RunScores(k, w);
    Softmax(k.rows, w);
    RunValues(v, w);
  }
  SKV_AVX2 void Emit(const Blk& nk, const Blk& nv) {
    if (have) {
      w->pf.Clear();
      AddRanges(nk, w->d, &w->pf);
      AddRanges(nv, w->d, &w->pf);
      w->pf.Pace(k.rows);
      Run();
    }
    k = nk;
    v = nv;
    have = true;
  }
  SKV_AVX2 void Flush() {
    if (have) {
      w->pf.Clear();
      Run();
    }
    have = false;
  }
};

SKV_AVX2 void RunAll(const DecodeAttentionParams& p, Work* w) {
  const SectionFormat& kf = p.k_format;
  const SectionFormat& vf = p.v_format;
  const bool rows_ok = kf.kind != SectionKind::kPerChannel && vf.kind != SectionKind::kPerChannel;
  const SectionFormat* kfp = kf.kind == SectionKind::kPerToken ? &kf : nullptr;
  const SectionFormat* vfp = vf.kind == SectionKind::kPerToken ? &vf : nullptr;
  Pipeline pipe{w};
  for (int c = 0; c < p.num_chunks; ++c) {
    const int tokens = kf.tokens;
    const uint8_t* ck = p.chunks[c].k;
    const uint8_t* cv = p.chunks[c].v;
    if (rows_ok) {
      for (int t0 = 0; t0 < tokens; t0 += kBlock) {
        const int rows = std::min(kBlock, tokens - t0);
        pipe.Emit({kfp, p.dtype, ck, ck + kf.bytes(), t0, rows},
                  {vfp, p.dtype, cv, cv + vf.bytes(), t0, rows});
      }
      continue;
    }
    // Per-channel sections: the portable float expansion, then dense fp32 rows. The pipeline
    // is flushed first and after, as the float buffers are reused per chunk.
    pipe.Flush();
    const size_t n = static_cast<size_t>(tokens) * w->d;
    w->kf.resize(n);
    w->vf.resize(n);
    ExpandSectionToFloat(kf, ck, w->kf.data());
    ExpandSectionToFloat(vf, cv, w->vf.data());
    const auto* kd = reinterpret_cast<const uint8_t*>(w->kf.data());
    const auto* vd = reinterpret_cast<const uint8_t*>(w->vf.data());
    for (int t0 = 0; t0 < tokens; t0 += kBlock) {
      const int rows = std::min(kBlock, tokens - t0);
      pipe.Emit({nullptr, DType::kFloat32, kd, nullptr, t0, rows},
                {nullptr, DType::kFloat32, vd, nullptr, t0, rows});
    }
    pipe.Flush();
  }
  for (int s = 0; s < p.num_spans; ++s) {
    const DenseSpan& span = p.spans[s];
    const size_t row = static_cast<size_t>(w->d) * DTypeSize(p.dtype);
    for (int64_t t0 = 0; t0 < span.tokens; t0 += kBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlock, span.tokens - t0));
      // Offsets stay in 64 bits: a span may exceed 2^31 bytes.
      pipe.Emit(
          {nullptr, p.dtype, static_cast<const uint8_t*>(span.k) + t0 * row, nullptr, 0, rows},
          {nullptr, p.dtype, static_cast<const uint8_t*>(span.v) + t0 * row, nullptr, 0, rows});
    }
  }
  pipe.Flush();
}

}  // namespace

void Avx2DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state) {
  thread_local Work w;
  w.Reset(p);
  RunAll(p, &w);
  state->Assign(p.group, p.head_dim, w.m.data(), w.l.data(), w.acc.data(), w.dpad);
}

#endif  // SPARSEKV_HAVE_AVX2_VARIANT

}  // namespace sparsekv::kernels
