// fp16-arithmetic row kernels. See avx512_fp16_attention.h for the contract and the numerics.
#include "kernels/cpu/avx512_fp16_attention.h"

#include "kernels/cpu/cpu_features.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT

// AVX512-FP16 intrinsics need GCC 12 or Clang 14; older compilers build without this path
// (PrepareFp16 then leaves every call on fp32).
#if (defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && __GNUC__ >= 12)
#define SPARSEKV_HAVE_FP16_ARITHMETIC 1
#endif
// GCC 12 reports the undefined-vector helpers inside its own intrinsics (avx512fintrin.h) as
// (maybe-)uninitialized: known false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace sparsekv::kernels::avx512_detail {

#ifndef SPARSEKV_HAVE_FP16_ARITHMETIC

bool Fp16ArithmeticAvailable() { return false; }
void PrepareFp16(const DecodeAttentionParams&, Work* w) { w->f16 = false; }
bool Fp16RowScores(const RowBlock&, int, Work*) { return false; }
void Fp16RowValues(const RowBlock&, int, Work*) {}

#else

#define SKV_AVX512FP16                                                        \
  __attribute__((                                                             \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512fp16,fma," \
             "f16c,bmi2,popcnt")))

namespace {

constexpr int kNonFinite = 0x99;  // vfpclass: QNaN | +inf | -inf | SNaN

// One 32-column word of a row as 32 fp16 lanes, zeros where the mask is clear.
template <int kRows>
SKV_AVX512FP16 SKV_INLINE __m512h Word(const uint8_t* p, uint32_t mask) {
  return _mm512_castsi512_ph(Word16<kRows>(p, mask));
}

// ---- reduction of K partial sums, four heads at a time ----
// A row pair's fp16 accumulators (32 lanes per row and head) are folded three times in fp16,
// each fold one shuffle pair and one add: [a | b] per head (16 lanes each), then two heads per
// vector (8 lanes), then four (4 lanes). The 32 remaining lanes widen to two fp32 vectors and
// the last two folds, over 8 row pairs at once, are fp32; a 2-source permute puts each head's
// 16 sums in row order. ~15 uops per row for 4 heads where the per-row 32 -> 16 fold,
// conversions and a 16-way fp32 transpose took ~27 (measured 13 -> 8.5 ns per L2-resident row
// with FoldPair4's converts from memory).

// Four heads' accumulators of rows a (A) and b (B) -> 32 fp16 partial sums at dst:
// dst[0..15] = 4 lanes each of (a,h0) (a,h2) (b,h0) (b,h2); dst[16..31] the same for h1, h3.
// They stay fp16 in memory: SumSlots4 widens them with converts from memory, which need no
// shuffle-port uop (the register form and its extract take three per row pair; the shuffle
// port is this loop's bottleneck next to the expands: 9.0 -> 8.5 ns per L2-resident row).
SKV_AVX512FP16 SKV_INLINE void FoldPair4(const __m512h* A, const __m512h* B, uint16_t* dst) {
  __m512i f[4];
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_castph_si512(A[j]), b = _mm512_castph_si512(B[j]);
    f[j] =
        _mm512_castph_si512(_mm512_add_ph(_mm512_castsi512_ph(_mm512_shuffle_i64x2(a, b, 0x44)),
                                          _mm512_castsi512_ph(_mm512_shuffle_i64x2(a, b, 0xee))));
  }
  // [a_h0 b_h0 a_h1 b_h1] and [a_h2 b_h2 a_h3 b_h3], 8 lanes each
  const __m512i t01 = _mm512_castph_si512(
      _mm512_add_ph(_mm512_castsi512_ph(_mm512_shuffle_i64x2(f[0], f[1], 0x88)),
                    _mm512_castsi512_ph(_mm512_shuffle_i64x2(f[0], f[1], 0xdd))));
  const __m512i t23 = _mm512_castph_si512(
      _mm512_add_ph(_mm512_castsi512_ph(_mm512_shuffle_i64x2(f[2], f[3], 0x88)),
                    _mm512_castsi512_ph(_mm512_shuffle_i64x2(f[2], f[3], 0xdd))));
  // 128-bit lanes [a_h0 a_h2] [b_h0 b_h2] [a_h1 a_h3] [b_h1 b_h3], 4 lanes each
  const __m512i u =
      _mm512_castph_si512(_mm512_add_ph(_mm512_castsi512_ph(_mm512_unpacklo_epi64(t01, t23)),
                                        _mm512_castsi512_ph(_mm512_unpackhi_epi64(t01, t23))));
  _mm512_storeu_si512(dst, u);
}

SKV_AVX512FP16 SKV_INLINE __m512 Widen(const uint16_t* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// Halves of four FoldPair4 outputs (x, 32 halves apart) -> lane 4c + k = full sum of slot c of
// pair k.
SKV_AVX512FP16 SKV_INLINE __m512 SumSlots4(const uint16_t* x) {
  const __m512 x0 = Widen(x), x1 = Widen(x + 32), x2 = Widen(x + 64), x3 = Widen(x + 96);
  const __m512d p01 =
      _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1)));
  const __m512d p23 =
      _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(x2, x3), _mm512_unpackhi_ps(x2, x3)));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p01, p23)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(p01, p23)));
}

// The 8 row pairs' FoldPair4 outputs at v (32 halves per pair) -> p[h * kBlock + i], i < 16,
// for the four heads, rows under `valid`.
SKV_AVX512FP16 SKV_INLINE void FinishRows4(const uint16_t* v, float* p, __mmask16 valid) {
  const __m512 lo_a = SumSlots4(v), lo_b = SumSlots4(v + 128);
  const __m512 hi_a = SumSlots4(v + 16), hi_b = SumSlots4(v + 144);
  // Row 2k of the first 8 is slot 0 (a) of pair k, row 2k+1 slot 2 (b); +16 for the next 8.
  const __m512i even = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 16, 24, 17, 25, 18, 26, 19, 27);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(4));  // slots 1 and 3
  _mm512_mask_storeu_ps(p, valid, _mm512_permutex2var_ps(lo_a, even, lo_b));
  _mm512_mask_storeu_ps(p + kBlock, valid, _mm512_permutex2var_ps(hi_a, even, hi_b));
  _mm512_mask_storeu_ps(p + 2 * kBlock, valid, _mm512_permutex2var_ps(lo_a, odd, lo_b));
  _mm512_mask_storeu_ps(p + 3 * kBlock, valid, _mm512_permutex2var_ps(hi_a, odd, hi_b));
}

// Rows in pairs as in the fp32 RowScores. With a multiple of 4 heads the partial sums go
// through FoldPair4 / FinishRows4; otherwise per row and head the 32 lanes are folded to 16 in
// fp16 (the two rows' halves shuffled together, one add) and the fp32 HSum16 finishes.
template <int kRows, int HT, int W>
SKV_AVX512FP16 void Scores(const RowBlock& rb, int rows, const uint16_t* q, int dpad, float* red,
                           float* p, Prefetcher* pfp) {
  const int words = W > 0 ? W : rb.words;
  const int dp = W > 0 ? 32 * W : dpad;
  // fp16 partial sums of the 4-head reduction (HT / 4 groups of 8 pairs x 32 halves).
  uint16_t* const red16 = reinterpret_cast<uint16_t*>(red);
  Prefetcher pf = *pfp;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int n = std::min(16, rows - r0);
    for (int i = 0; i < n; i += 2) {
      pf.Step(2 * Prefetcher::kUnitsPerRow);
      // An odd last row is paired with itself; its twin's sums land in a slot the reduction
      // below overwrites with zeros.
      const int ra = r0 + i;
      const int rb1 = i + 1 < n ? ra + 1 : ra;
      __m512h a0[HT], a1[HT];
      for (int h = 0; h < HT; ++h) a0[h] = a1[h] = _mm512_setzero_ph();
      const uint8_t* pa = rb.values + ra * rb.val_stride;
      const uint8_t* pb = rb.values + rb1 * rb.val_stride;
      PrefetchRowL1<kRows == kSparseRows,
                    kRows == kSparseRows ? kPairLinesSparse : kPairLinesDense>(rb, ra + kL1Ahead);
#pragma GCC unroll 8
      for (int w = 0; w < words; ++w) {
        const uint32_t ma = Mask<kRows>(rb, ra, w);
        const uint32_t mb = Mask<kRows>(rb, rb1, w);
        const __m512h x0 = Word<kRows>(pa, ma);
        const __m512h x1 = Word<kRows>(pb, mb);
        pa += WordBytes<kRows>(ma);
        pb += WordBytes<kRows>(mb);
#pragma GCC unroll 8
        for (int h = 0; h < HT; ++h) {
          const __m512h qv = _mm512_loadu_ph(q + h * dp + 32 * w);
          a0[h] = _mm512_fmadd_ph(x0, qv, a0[h]);
          a1[h] = _mm512_fmadd_ph(x1, qv, a1[h]);
        }
      }
      if (HT % 4 == 0) {
        for (int g = 0; g < HT / 4; ++g)
          FoldPair4(a0 + 4 * g, a1 + 4 * g, red16 + g * 256 + i * 16);
        continue;
      }
      for (int h = 0; h < HT; ++h) {
        const __m512i s0 = _mm512_castph_si512(a0[h]);
        const __m512i s1 = _mm512_castph_si512(a1[h]);
        // [row a lanes 0-15 + 16-31 | row b lanes 0-15 + 16-31]
        const __m512i s = _mm512_castph_si512(
            _mm512_add_ph(_mm512_castsi512_ph(_mm512_shuffle_i64x2(s0, s1, 0x44)),
                          _mm512_castsi512_ph(_mm512_shuffle_i64x2(s0, s1, 0xee))));
        _mm512_storeu_ps(red + (h * 16 + i) * 16, _mm512_cvtph_ps(_mm512_castsi512_si256(s)));
        _mm512_storeu_ps(red + (h * 16 + i + 1) * 16,
                         _mm512_cvtph_ps(_mm512_extracti64x4_epi64(s, 1)));
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    if (HT % 4 == 0) {
      // Pairs past the last row: zeros (their lanes are not stored, but stay finite).
      for (int g = 0; g < HT / 4; ++g) {
        for (int i = (n + 1) / 2 * 2; i < 16; i += 2) {
          _mm512_storeu_si512(red16 + g * 256 + i * 16, _mm512_setzero_si512());
        }
        FinishRows4(red16 + g * 256, p + 4 * g * kBlock + r0, valid);
      }
      continue;
    }
    for (int h = 0; h < HT; ++h) {
      for (int i = n; i < 16; ++i) _mm512_storeu_ps(red + (h * 16 + i) * 16, _mm512_setzero_ps());
      _mm512_mask_storeu_ps(p + h * kBlock + r0, valid, HSum16(red + h * 256));
    }
  }
  *pfp = pf;
}

template <int kRows, int HT>
SKV_AVX512FP16 void ScoresW(const RowBlock& rb, int rows, const uint16_t* q, int dpad, float* red,
                            float* p, Prefetcher* pf) {
  switch (rb.words) {
    case 2:
      return Scores<kRows, HT, 2>(rb, rows, q, dpad, red, p, pf);
    case 4:
      return Scores<kRows, HT, 4>(rb, rows, q, dpad, red, p, pf);
    case 8:
      return Scores<kRows, HT, 8>(rb, rows, q, dpad, red, p, pf);
    default:
      return Scores<kRows, HT, 0>(rb, rows, q, dpad, red, p, pf);
  }
}

template <int kRows>
SKV_AVX512FP16 void ScoresAll(const RowBlock& rb, int rows, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const uint16_t* q = w->q16.data() + h0 * w->dpad;
    float* p = w->p.data() + h0 * kBlock;
    float* red = w->red.data();
    switch (ht) {
      case 8:
        ScoresW<kRows, 8>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 4:
        ScoresW<kRows, 4>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 3:
        ScoresW<kRows, 3>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 2:
        ScoresW<kRows, 2>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      default:
        ScoresW<kRows, 1>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
    }
    h0 += ht;
  }
}

// acc[h, 32*w0 .. 32*(w0+NW)) += sum_r p[h, r] * v_r, the sum in fp16, widened to fp32 once
// per block. p16 holds each weight twice per 32-bit word, so that a plain 32-bit broadcast (a
// load-port operation) fills all 32 lanes. Each row's cursor is found from its bitmap as the
// row is read (a precomputed cursor table cost as much as the FMAs at this speed). A slice
// whose fp16 sums are not all finite is recomputed in fp32 instead (p: fp32 weights).
template <int kRows, int HT, int NW>
SKV_AVX512FP16 void ValuesSlice(const RowBlock& rb, int rows, int w0, const uint32_t* p16,
                                const float* p, float* acc, int dpad, Prefetcher* pfp) {
  Prefetcher pf = *pfp;
  __m512h a[HT][NW];
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) a[h][z] = _mm512_setzero_ph();
  const int step = std::max(1, Prefetcher::kUnitsPerRow * NW / rb.words);
  for (int r = 0; r < rows; ++r) {
    pf.Step(step);
    if (w0 == 0) {
      PrefetchRowL1<kRows == kSparseRows, kRows == kSparseRows ? kRowLinesSparse : kRowLinesDense>(
          rb, r + kL1Ahead);
    }
    const uint8_t* ptr = RowCursor<kRows>(rb, r, w0);
    __m512h x[NW];
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) {
      const uint32_t m = Mask<kRows>(rb, r, w0 + z);
      x[z] = Word<kRows>(ptr, m);
      ptr += WordBytes<kRows>(m);
    }
#pragma GCC unroll 16
    for (int h = 0; h < HT; ++h) {
      const __m512h pb =
          _mm512_castsi512_ph(_mm512_set1_epi32(static_cast<int>(p16[h * kBlock + r])));
#pragma GCC unroll 16
      for (int z = 0; z < NW; ++z) a[h][z] = _mm512_fmadd_ph(pb, x[z], a[h][z]);
    }
  }
  *pfp = pf;
  __mmask32 bad = 0;
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) bad |= _mm512_fpclass_ph_mask(a[h][z], kNonFinite);
  if (__builtin_expect(bad != 0, 0)) {
    SliceFp32<kRows>(rb, rows, w0, NW, HT, p, acc, dpad);
    return;
  }
  // Widened by converts from memory: no shuffle-port uops (see FoldPair4).
  alignas(64) uint16_t sums[HT][NW][32];
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) _mm512_store_si512(sums[h][z], _mm512_castph_si512(a[h][z]));
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h) {
#pragma GCC unroll 16
    for (int z = 0; z < NW; ++z) {
      float* o = acc + h * dpad + 32 * (w0 + z);
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), Widen(sums[h][z])));
      _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), Widen(sums[h][z] + 16)));
    }
  }
}

// Up to NW words per pass (the widest of 8, 4, 2, 1 that fits the row): as many as keep HT * NW
// accumulators, NW row words and the weight in the 32 zmm registers.
template <int kRows, int HT, int NW>
SKV_AVX512FP16 void ValuesTile(const RowBlock& rb, int rows, const uint32_t* p16, const float* p,
                               float* acc, int dpad, Prefetcher* pf) {
  int w0 = 0;
  if constexpr (NW >= 8) {
    for (; w0 + 8 <= rb.words; w0 += 8)
      ValuesSlice<kRows, HT, 8>(rb, rows, w0, p16, p, acc, dpad, pf);
  }
  if constexpr (NW >= 4) {
    for (; w0 + 4 <= rb.words; w0 += 4)
      ValuesSlice<kRows, HT, 4>(rb, rows, w0, p16, p, acc, dpad, pf);
  }
  if constexpr (NW >= 2) {
    for (; w0 + 2 <= rb.words; w0 += 2)
      ValuesSlice<kRows, HT, 2>(rb, rows, w0, p16, p, acc, dpad, pf);
  }
  for (; w0 < rb.words; ++w0) ValuesSlice<kRows, HT, 1>(rb, rows, w0, p16, p, acc, dpad, pf);
}

template <int kRows>
SKV_AVX512FP16 void ValuesAll(const RowBlock& rb, int rows, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const uint32_t* p16 = w->p16.data() + h0 * kBlock;
    const float* p = w->p.data() + h0 * kBlock;
    float* acc = w->acc.data() + h0 * w->dpad;
    switch (ht) {
      case 8:
        ValuesTile<kRows, 8, 2>(rb, rows, p16, p, acc, w->dpad, &w->pf);
        break;
      case 4:
        ValuesTile<kRows, 4, 4>(rb, rows, p16, p, acc, w->dpad, &w->pf);
        break;
      case 3:
        ValuesTile<kRows, 3, 4>(rb, rows, p16, p, acc, w->dpad, &w->pf);
        break;
      case 2:
        ValuesTile<kRows, 2, 8>(rb, rows, p16, p, acc, w->dpad, &w->pf);
        break;
      default:
        ValuesTile<kRows, 1, 8>(rb, rows, p16, p, acc, w->dpad, &w->pf);
        break;
    }
    h0 += ht;
  }
}

}  // namespace

bool Fp16ArithmeticAvailable() { return GetCpuFeatures().avx512_fp16; }

SKV_AVX512FP16 void PrepareFp16(const DecodeAttentionParams& p, Work* w) {
  w->f16 = false;
  if (p.compute != DecodeCompute::kFloat16 || p.dtype != DType::kFloat16 ||
      !Fp16ArithmeticAvailable()) {
    return;
  }
  w->q16.resize(w->q.size());
  __mmask16 overflow = 0;
  for (size_t i = 0; i < w->q.size(); i += 16) {  // dpad is a multiple of 32
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(w->q.data() + i), _MM_FROUND_TO_NEAREST_INT);
    overflow |= _mm512_fpclass_ps_mask(_mm512_cvtph_ps(h), kNonFinite);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w->q16.data() + i), h);
  }
  if (overflow != 0) return;  // q * scale beyond fp16 (or NaN): fp32 for the whole call
  w->p16.assign(static_cast<size_t>(w->group) * kBlock, 0u);
  w->f16 = true;
}

SKV_AVX512FP16 bool Fp16RowScores(const RowBlock& rb, int rows, Work* w) {
  if (rb.bitmaps != nullptr) {
    ScoresAll<kSparseRows>(rb, rows, w);
  } else if (rb.dense_mask[rb.words - 1] == 0xffffffffu) {
    ScoresAll<kFullRows>(rb, rows, w);
  } else {
    ScoresAll<kDenseRows>(rb, rows, w);
  }
  return ScoresFinite(*w, rows);
}

SKV_AVX512FP16 void Fp16RowValues(const RowBlock& rb, int rows, Work* w) {
  if (rb.bitmaps != nullptr) return ValuesAll<kSparseRows>(rb, rows, w);
  if (rb.dense_mask[rb.words - 1] == 0xffffffffu) return ValuesAll<kFullRows>(rb, rows, w);
  return ValuesAll<kDenseRows>(rb, rows, w);
}

#endif  // SPARSEKV_HAVE_FP16_ARITHMETIC

}  // namespace sparsekv::kernels::avx512_detail

#endif  // SPARSEKV_HAVE_AVX512_VARIANT
