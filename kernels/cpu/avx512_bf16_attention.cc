// bf16 dot-product score kernels. See avx512_bf16_attention.h for the contract and numerics.
#include "kernels/cpu/avx512_bf16_attention.h"

#include "kernels/cpu/cpu_features.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT

// The AVX512_BF16 intrinsics used here (_mm512_dpbf16_ps, _mm512_cvtne2ps_pbh) are in GCC 10
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

#else

#define SKV_AVX512BF16                                                        \
  __attribute__((                                                             \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,fma," \
             "f16c,bmi2,popcnt")))

namespace {

// A row word of 32 16-bit elements as 32 bf16 lanes in the same order: bf16 as it is, fp16
// through fp32 (exact) and one round-to-nearest-even narrowing.
template <bool kF16>
SKV_AVX512BF16 SKV_INLINE __m512bh AsBf16(__m512i x) {
  if (!kF16) return (__m512bh)x;
  const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(x));
  const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(x, 1));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

SKV_AVX512BF16 SKV_INLINE __m512bh LoadBh(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

// p[h, r] = q_h . k_r for HT heads, the fp32 RowScores' structure (avx512_attention.cc): rows
// in pairs (each q load feeds both rows), 16 fp32 partial sums per row and head, finished by
// the transposed HSum16. kSplit adds q's lo part (a second vdpbf16ps per head and word).
template <int kRows, bool kF16, bool kSplit, int HT, int W>
SKV_AVX512BF16 void Scores(const RowBlock& rb, int rows, const uint16_t* qh, const uint16_t* ql,
                           int dpad, float* red, float* p, Prefetcher* pfp) {
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
        const __m512bh x0 = AsBf16<kF16>(Word16<kRows>(pa, ma));
        const __m512bh x1 = AsBf16<kF16>(Word16<kRows>(pb, mb));
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
}

template <int kRows, bool kF16>
SKV_AVX512BF16 void ScoresAll(const RowBlock& rb, int rows, Work* w) {
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
            rb, rows, qh, ql, w->dpad, w->red.data(), p, &w->pf);
      });
    });
    h0 += ht;
  }
}

template <bool kF16>
SKV_AVX512BF16 void ScoresByRows(const RowBlock& rb, int rows, Work* w) {
  if (rb.bitmaps != nullptr) return ScoresAll<kSparseRows, kF16>(rb, rows, w);
  if (rb.dense_mask[rb.words - 1] == 0xffffffffu) return ScoresAll<kFullRows, kF16>(rb, rows, w);
  return ScoresAll<kDenseRows, kF16>(rb, rows, w);
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
  // A q beyond bf16's range (the same as fp32's) or NaN gives non-finite scores, so those
  // blocks fall back to fp32 by themselves: no whole-call check is needed.
  w->qb_hi.resize(w->q.size());
  w->qb_lo.resize(w->q.size());
  for (size_t i = 0; i < w->q.size(); i += 16) {  // dpad is a multiple of 32
    const __m512 q = _mm512_loadu_ps(w->q.data() + i);
    const __m256bh hi = _mm512_cvtneps_pbh(q);
    const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(q, Bf16Float(hi)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w->qb_hi.data() + i), (__m256i)hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w->qb_lo.data() + i), (__m256i)lo);
  }
  w->bf16 = true;
}

SKV_AVX512BF16 bool Bf16RowScores(const RowBlock& rb, int rows, DType dtype, Work* w) {
  if (dtype == DType::kFloat16) {
    ScoresByRows<true>(rb, rows, w);
  } else {
    ScoresByRows<false>(rb, rows, w);
  }
  return ScoresFinite(*w, rows);
}

#endif  // SPARSEKV_HAVE_BF16_ARITHMETIC

}  // namespace sparsekv::kernels::avx512_detail

#endif  // SPARSEKV_HAVE_AVX512_VARIANT
