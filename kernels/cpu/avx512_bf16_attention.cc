// bf16 dot-product kernels. See avx512_bf16_attention.h for the contract and numerics.
#include "kernels/cpu/avx512_bf16_attention.h"

#include "kernels/cpu/cpu_features.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT

// The AVX512_BF16 intrinsics used here (_mm512_dpbf16_ps, _mm512_cvtneps_pbh) are in GCC 10
// and Clang 9; older compilers build without this path (PrepareBf16 then leaves calls fp32).
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define SPARSEKV_HAVE_BF16_ARITHMETIC 1
#endif
// GCC 12 reports the undefined-vector helpers inside its own intrinsics as (maybe-)
// uninitialized: known false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace sparsekv::kernels::avx512_detail {

#ifndef SPARSEKV_HAVE_BF16_ARITHMETIC

bool Bf16ArithmeticAvailable() { return false; }
void PrepareBf16(const DecodeAttentionParams&, Work* w) { w->bf16 = false; }
bool Bf16RowScores(const RowBlock&, int, DType, Work*) { return false; }
float Bf16Weights(float*, uint32_t*, DType) { return 0.0f; }
void Bf16RowValues(const RowBlock&, int, DType, Work*) {}

#else

#define SKV_AVX512BF16                                                        \
  __attribute__((                                                             \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,fma," \
             "f16c,bmi2,popcnt")))

namespace {

// fp16 values reach the bf16 kernels scaled by 2^-112 (kF16Scale): the integer conversion
// below keeps fp16's exponent field, whose bias is 15 where bf16's is 127. q (for K) and the
// weights (for V) carry the inverse factor, so the products come out unscaled.
constexpr float kF16Scale = 0x1p112f;

// A row word of 32 16-bit elements as 32 bf16 lanes in the same order. bf16 as it is. fp16 in
// four integer instructions (measured: sparse compute 0.076 -> 0.039 ms per 2048 L2-resident
// rows against vcvtph2ps x 2 + vcvtne2ps2bf16): the magnitude's 10-bit significand is rounded
// to 7 bits (half away from zero; a carry into the exponent is the right result) and the sign
// put back, which is the bf16 of x * 2^-112. fp16 subnormals (|x| < 6.1e-5) become bf16
// subnormals, which vdpbf16ps reads as zero. inf and NaN would become finite, so they are
// flagged in *bad and the caller recomputes in fp32.
template <bool kF16>
SKV_AVX512BF16 SKV_INLINE __m512bh AsBf16(__m512i x, __mmask32* bad) {
  if (!kF16) return (__m512bh)x;
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7fff));
  *bad |= _mm512_cmpge_epu16_mask(mag, _mm512_set1_epi16(0x7c00));
  const __m512i r = _mm512_srli_epi16(_mm512_add_epi16(mag, _mm512_set1_epi16(4)), 3);
  // 0xf8: r | (x & 0x8000)
  return (__m512bh)_mm512_ternarylogic_epi32(r, x, _mm512_set1_epi16(static_cast<short>(0x8000)),
                                             0xf8);
}

SKV_AVX512BF16 SKV_INLINE __m512bh LoadBh(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

// p[h, r] = q_h . k_r for HT heads, the fp32 RowScores' structure (avx512_attention.cc): rows
// in pairs (each q load feeds both rows), 16 fp32 partial sums per row and head, finished by
// the transposed HSum16. kSplit adds q's lo part (a second vdpbf16ps per head and word).
template <int kRows, bool kF16, bool kSplit, int HT, int W>
SKV_AVX512BF16 void Scores(const RowBlock& rb, int rows, const uint16_t* qh, const uint16_t* ql,
                           int dpad, float* red, float* p, Prefetcher* pfp, __mmask32* bad_out) {
  __mmask32 bad = 0;
  const int words = W > 0 ? W : rb.words;
  const int dp = W > 0 ? 32 * W : dpad;
  Prefetcher pf = *pfp;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int n = std::min(16, rows - r0);
    for (int i = 0; i < n; i += 2) {
      pf.Step(2 * Prefetcher::kUnitsPerRow);
      // An odd last row is paired with itself; its twin's sums land in a slot the reduction
      // below overwrites with zeros.
      const int ra = r0 + i;
      const int rb1 = i + 1 < n ? ra + 1 : ra;
      __m512 a0[HT], a1[HT];
      for (int h = 0; h < HT; ++h) a0[h] = a1[h] = _mm512_setzero_ps();
      const uint8_t* pa = rb.values + ra * rb.val_stride;
      const uint8_t* pb = rb.values + rb1 * rb.val_stride;
      PrefetchRowL1<kRows == kSparseRows,
                    kRows == kSparseRows ? kPairLinesSparse : kPairLinesDense>(rb, ra + kL1Ahead);
#pragma GCC unroll 8
      for (int w = 0; w < words; ++w) {
        const uint32_t ma = Mask<kRows>(rb, ra, w);
        const uint32_t mb = Mask<kRows>(rb, rb1, w);
        const __m512bh x0 = AsBf16<kF16>(Word16<kRows>(pa, ma), &bad);
        const __m512bh x1 = AsBf16<kF16>(Word16<kRows>(pb, mb), &bad);
        pa += WordBytes<kRows>(ma);
        pb += WordBytes<kRows>(mb);
#pragma GCC unroll 8
        for (int h = 0; h < HT; ++h) {
          const __m512bh qv = LoadBh(qh + h * dp + 32 * w);
          a0[h] = _mm512_dpbf16_ps(a0[h], x0, qv);
          a1[h] = _mm512_dpbf16_ps(a1[h], x1, qv);
          if (kSplit) {
            const __m512bh qlo = LoadBh(ql + h * dp + 32 * w);
            a0[h] = _mm512_dpbf16_ps(a0[h], x0, qlo);
            a1[h] = _mm512_dpbf16_ps(a1[h], x1, qlo);
          }
        }
      }
      for (int h = 0; h < HT; ++h) {
        _mm512_storeu_ps(red + (h * 16 + i) * 16, a0[h]);
        _mm512_storeu_ps(red + (h * 16 + i + 1) * 16, a1[h]);
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int h = 0; h < HT; ++h) {
      for (int i = n; i < 16; ++i) _mm512_storeu_ps(red + (h * 16 + i) * 16, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(p + h * kBlock + r0, valid, HSum16(red + h * 256));
    }
  }
  *pfp = pf;
  *bad_out |= bad;
}

// Returns whether every element read was finite (always, for bf16 caches: their non-finite
// values make non-finite scores by themselves).
template <int kRows, bool kF16>
SKV_AVX512BF16 bool ScoresAll(const RowBlock& rb, int rows, Work* w) {
  __mmask32 bad = 0;
  // bf16 caches split q (the cache is exact in bf16, so q's rounding would be the only error);
  // for fp16 caches the rounding of K to bf16 dominates and a split would double the work.
  constexpr bool kSplit = !kF16;
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const uint16_t* qh = w->qb_hi.data() + h0 * w->dpad;
    const uint16_t* ql = w->qb_lo.data() + h0 * w->dpad;
    float* p = w->p.data() + h0 * kBlock;
    WithTile(ht, [&](auto tile) {
      WithWords(rb.words, [&](auto words) {
        Scores<kRows, kF16, kSplit, decltype(tile)::value, decltype(words)::value>(
            rb, rows, qh, ql, w->dpad, w->red.data(), p, &w->pf, &bad);
      });
    });
    h0 += ht;
  }
  return bad == 0;
}

template <bool kF16>
SKV_AVX512BF16 bool ScoresByRows(const RowBlock& rb, int rows, Work* w) {
  if (rb.bitmaps != nullptr) return ScoresAll<kSparseRows, kF16>(rb, rows, w);
  if (rb.dense_mask[rb.words - 1] == 0xffffffffu) return ScoresAll<kFullRows, kF16>(rb, rows, w);
  return ScoresAll<kDenseRows, kF16>(rb, rows, w);
}

// ---- values: two rows per vdpbf16ps ----
// vdpbf16ps sums the two bf16 halves of each 32-bit lane, so the row pair (r, r + 1) is
// interleaved per channel (vpunpck{l,h}wd: lane j holds channel c's values of both rows) and
// multiplied by the broadcast pair (p_r, p_r+1): 2 * HT instructions per pair and word where
// the fp32 kernel spends 4 * HT FMAs and two widenings per row.
//
// After vpunpcklwd / vpunpckhwd of a 32-channel word, fp32 lane 4L + j of the lo product holds
// channel 8L + j and of the hi product channel 8L + 4 + j (L the 128-bit lane, j < 4); these
// indices put channels 0-15 and 16-31 back in order.
SKV_AVX512BF16 SKV_INLINE void Deinterleave(__m512 lo, __m512 hi, __m512* c0, __m512* c1) {
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  *c0 = _mm512_permutex2var_ps(lo, i0, hi);
  *c1 = _mm512_permutex2var_ps(lo, i1, hi);
}

// acc[h, 32*w0 .. 32*(w0+NW)) += sum_r p[h, r] * v_r, fp32 sums of exact bf16 products. An odd
// last row is paired with zeros (not with itself: 0 * inf would make a NaN the fp32 path has
// not). Each row's cursor is found from its bitmap as the row is read (as in the fp16 kernel).
// A slice with inf or NaN in its rows (fp16) or sums (bf16) is recomputed in fp32 from p (the
// same weights as floats).
template <int kRows, bool kF16, bool kSplit, int HT, int NW>
SKV_AVX512BF16 void ValuesSlice(const RowBlock& rb, int rows, int w0, const uint32_t* p16,
                                const float* p, float* acc, int dpad, Prefetcher* pfp) {
  Prefetcher pf = *pfp;
  __mmask32 bad = 0;
  __m512 a[HT][2 * NW];
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < 2 * NW; ++z) a[h][z] = _mm512_setzero_ps();
  const int step = std::max(1, Prefetcher::kUnitsPerRow * NW / rb.words);
  for (int r = 0; r < rows; r += 2) {
    pf.Step(2 * step);
    if (w0 == 0) {
      PrefetchRowL1<kRows == kSparseRows, kRows == kSparseRows ? kRowLinesSparse : kRowLinesDense>(
          rb, r + kL1Ahead);
      PrefetchRowL1<kRows == kSparseRows, kRows == kSparseRows ? kRowLinesSparse : kRowLinesDense>(
          rb, r + 1 + kL1Ahead);
    }
    const bool twin = r + 1 < rows;
    const uint8_t* p0 = RowCursor<kRows>(rb, r, w0);
    const uint8_t* p1 = RowCursor<kRows>(rb, twin ? r + 1 : r, w0);
    __m512bh lo[NW], hi[NW];
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) {
      const uint32_t m0 = Mask<kRows>(rb, r, w0 + z);
      const uint32_t m1 = twin ? Mask<kRows>(rb, r + 1, w0 + z) : 0u;
      const __m512i x0 = (__m512i)AsBf16<kF16>(Word16<kRows>(p0, m0), &bad);
      const __m512i x1 =
          twin ? (__m512i)AsBf16<kF16>(Word16<kRows>(p1, m1), &bad) : _mm512_setzero_si512();
      p0 += WordBytes<kRows>(m0);
      p1 += WordBytes<kRows>(m1);
      lo[z] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
      hi[z] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
    }
#pragma GCC unroll 16
    for (int h = 0; h < HT; ++h) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(p16[h * kBlock + r / 2]));
#pragma GCC unroll 16
      for (int z = 0; z < NW; ++z) {
        a[h][2 * z] = _mm512_dpbf16_ps(a[h][2 * z], lo[z], pp);
        a[h][2 * z + 1] = _mm512_dpbf16_ps(a[h][2 * z + 1], hi[z], pp);
      }
      if (kSplit) {
        const __m512bh pl =
            (__m512bh)_mm512_set1_epi32(static_cast<int>(p16[h * kBlock + 32 + r / 2]));
#pragma GCC unroll 16
        for (int z = 0; z < NW; ++z) {
          a[h][2 * z] = _mm512_dpbf16_ps(a[h][2 * z], lo[z], pl);
          a[h][2 * z + 1] = _mm512_dpbf16_ps(a[h][2 * z + 1], hi[z], pl);
        }
      }
    }
  }
  *pfp = pf;
  if (!kF16) {
    // bf16 rows carry inf and NaN through vdpbf16ps, but p's lo part can be an exact zero
    // where fp32's weight is not: inf * 0 would be a NaN where fp32 has inf.
#pragma GCC unroll 16
    for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
      for (int z = 0; z < 2 * NW; ++z) bad |= _mm512_fpclass_ps_mask(a[h][z], 0x99);
  }
  if (__builtin_expect(bad != 0, 0)) {
    SliceFp32<kRows, !kF16>(rb, rows, w0, NW, HT, p, acc, dpad);
    return;
  }
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h) {
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) {
      __m512 c0, c1;
      Deinterleave(a[h][2 * z], a[h][2 * z + 1], &c0, &c1);
      float* o = acc + h * dpad + 32 * (w0 + z);
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c0));
      _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), c1));
    }
  }
}

// Up to NW words per pass, as many as keep the 2 * HT * NW accumulators and the row words in
// the 32 zmm registers.
template <int kRows, bool kF16, bool kSplit, int HT, int NW>
SKV_AVX512BF16 void ValuesTile(const RowBlock& rb, int rows, const uint32_t* p16, const float* p,
                               float* acc, int dpad, Prefetcher* pf) {
  int w0 = 0;
  if constexpr (NW >= 4) {
    for (; w0 + 4 <= rb.words; w0 += 4)
      ValuesSlice<kRows, kF16, kSplit, HT, 4>(rb, rows, w0, p16, p, acc, dpad, pf);
  }
  if constexpr (NW >= 2) {
    for (; w0 + 2 <= rb.words; w0 += 2)
      ValuesSlice<kRows, kF16, kSplit, HT, 2>(rb, rows, w0, p16, p, acc, dpad, pf);
  }
  for (; w0 < rb.words; ++w0)
    ValuesSlice<kRows, kF16, kSplit, HT, 1>(rb, rows, w0, p16, p, acc, dpad, pf);
}

template <int kRows, bool kF16>
SKV_AVX512BF16 void ValuesAll(const RowBlock& rb, int rows, Work* w) {
  constexpr bool kSplit = !kF16;  // as for K: only bf16 caches are exact enough to need it
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const uint32_t* p16 = w->p16.data() + h0 * kBlock;
    float* acc = w->acc.data() + h0 * w->dpad;
    WithTile(ht, [&](auto tile) {
      constexpr int HT = decltype(tile)::value;
      constexpr int NW = HT >= 8 ? 1 : HT >= 3 ? 2 : 4;
      ValuesTile<kRows, kF16, kSplit, HT, NW>(rb, rows, p16, w->p.data() + h0 * kBlock, acc,
                                              w->dpad, &w->pf);
    });
    h0 += ht;
  }
}

template <bool kF16>
SKV_AVX512BF16 void ValuesByRows(const RowBlock& rb, int rows, Work* w) {
  if (rb.bitmaps != nullptr) return ValuesAll<kSparseRows, kF16>(rb, rows, w);
  if (rb.dense_mask[rb.words - 1] == 0xffffffffu) return ValuesAll<kFullRows, kF16>(rb, rows, w);
  return ValuesAll<kDenseRows, kF16>(rb, rows, w);
}

// bf16 value of 16 floats, widened back to fp32 (exact).
SKV_AVX512BF16 SKV_INLINE __m512 Bf16Float(__m256bh b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16));
}

}  // namespace

bool Bf16ArithmeticAvailable() { return GetCpuFeatures().avx512_bf16; }

SKV_AVX512BF16 void PrepareBf16(const DecodeAttentionParams& p, Work* w) {
  w->bf16 = false;
  if (p.compute != DecodeCompute::kBFloat16 ||
      (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || !Bf16ArithmeticAvailable()) {
    return;
  }
  // A q beyond bf16's range (the same as fp32's; for fp16 caches, |q * scale| >= 2^16 once
  // scaled by kF16Scale) or NaN gives non-finite scores, so those blocks fall back to fp32 by
  // themselves: no whole-call check is needed.
  w->qb_hi.resize(w->q.size());
  w->qb_lo.resize(w->q.size());
  const __m512 scale = _mm512_set1_ps(p.dtype == DType::kFloat16 ? kF16Scale : 1.0f);
  for (size_t i = 0; i < w->q.size(); i += 16) {  // dpad is a multiple of 32
    const __m512 q = _mm512_mul_ps(_mm512_loadu_ps(w->q.data() + i), scale);
    const __m256bh hi = _mm512_cvtneps_pbh(q);
    const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(q, Bf16Float(hi)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w->qb_hi.data() + i), (__m256i)hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w->qb_lo.data() + i), (__m256i)lo);
  }
  w->p16.assign(static_cast<size_t>(w->group) * kBlock, 0u);
  w->bf16 = true;
}

SKV_AVX512BF16 bool Bf16RowScores(const RowBlock& rb, int rows, DType dtype, Work* w) {
  const bool inputs_finite =
      dtype == DType::kFloat16 ? ScoresByRows<true>(rb, rows, w) : ScoresByRows<false>(rb, rows, w);
  return inputs_finite && ScoresFinite(*w, rows);
}

SKV_AVX512BF16 float Bf16Weights(float* s, uint32_t* pairs, DType dtype) {
  // bf16 rows: hi + lo pairs, p stays fp32. fp16 rows (scaled by 2^-112 in AsBf16): p rounded
  // to bf16 in place and the pairs carry 2^112, a power of two, so they are still exactly the
  // weights l sums.
  const bool split = dtype == DType::kBFloat16;
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < kBlock; c += 16) {
    __m512 e = _mm512_loadu_ps(s + c);
    const __m256bh hi = _mm512_cvtneps_pbh(e);
    // 16 bf16 weights = 8 pairs of consecutive rows, one per 32-bit word.
    __m256bh out = hi;
    if (split) {
      const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(e, Bf16Float(hi)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + 32 + c / 2), (__m256i)lo);
    } else {
      e = Bf16Float(hi);
      _mm512_storeu_ps(s + c, e);
      out = _mm512_cvtneps_pbh(_mm512_mul_ps(e, _mm512_set1_ps(kF16Scale)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + c / 2), (__m256i)out);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

SKV_AVX512BF16 void Bf16RowValues(const RowBlock& rb, int rows, DType dtype, Work* w) {
  if (dtype == DType::kFloat16) return ValuesByRows<true>(rb, rows, w);
  ValuesByRows<false>(rb, rows, w);
}

#endif  // SPARSEKV_HAVE_BF16_ARITHMETIC

}  // namespace sparsekv::kernels::avx512_detail

#endif  // SPARSEKV_HAVE_AVX512_VARIANT
