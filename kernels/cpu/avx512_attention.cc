// AVX-512 decode attention. See avx512_attention.h for the contract.
//
// Layout of the per-call scratch (thread-local, reused; avx512_common.h):
//   q     [group, dpad]  query rows * scale, zero-padded to dpad = round_up(head_dim, 32)
//   acc   [group, dpad]  unnormalised output of the online softmax
//   p     [group, 64]    scores of the current block, then exp(score - m)
//   red   [8, 16, 16]    partial dot products waiting for a 16-way transposed reduction
#include "kernels/cpu/avx512_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/avx512_bf16_attention.h"
#include "kernels/cpu/avx512_common.h"
#include "kernels/cpu/avx512_fp16_attention.h"
#include "kernels/cpu/row_source.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT
// GCC 12 reports its own _mm512_reduce_* helpers as maybe-uninitialized (a known false
// positive in avx512fintrin.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace sparsekv::kernels {

#ifndef SPARSEKV_HAVE_AVX512_VARIANT

bool Avx512AttentionCompiled() { return false; }
bool Avx512Fp16ArithmeticAvailable() { return false; }
bool Avx512Bf16ArithmeticAvailable() { return false; }
void Avx512DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state) {}

#else

bool Avx512AttentionCompiled() { return true; }
bool Avx512Fp16ArithmeticAvailable() { return avx512_detail::Fp16ArithmeticAvailable(); }
bool Avx512Bf16ArithmeticAvailable() { return avx512_detail::Bf16ArithmeticAvailable(); }

namespace {

using namespace avx512_detail;  // NOLINT(build/namespaces): this file's own internals

// ---- element loaders: one 32-element word of a row (or vector) as two zmm of floats ----
// Load(ptr, mask, lo, hi) reads popcount(mask) packed elements at ptr, places them in the
// lanes whose mask bit is set (zeros elsewhere) and returns the bytes consumed. For dense rows
// the mask is the contiguous run of valid columns, so one code path serves both.

struct F16 {
  static constexpr size_t kSize = 2;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    const __m512i x = _mm512_maskz_expandloadu_epi16(mask, p);
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(x));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(x, 1));
    return static_cast<size_t>(__builtin_popcount(mask)) * 2;
  }
};

struct BF16 {
  static constexpr size_t kSize = 2;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    const __m512i x = _mm512_maskz_expandloadu_epi16(mask, p);
    *lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16));
    *hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16));
    return static_cast<size_t>(__builtin_popcount(mask)) * 2;
  }
};

struct F32 {
  static constexpr size_t kSize = 4;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    const __mmask16 m0 = static_cast<__mmask16>(mask);
    const __mmask16 m1 = static_cast<__mmask16>(mask >> 16);
    *lo = _mm512_maskz_expandloadu_ps(m0, p);
    *hi = _mm512_maskz_expandloadu_ps(m1, p + static_cast<size_t>(__builtin_popcount(m0)) * 4);
    return static_cast<size_t>(__builtin_popcount(mask)) * 4;
  }
};

// Dense loaders: the mask is contiguous low bits, so plain masked loads suffice (cheaper
// than an expand).
struct DenseF16 {
  static constexpr size_t kSize = 2;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    // A whole word converts straight from memory: one uop less than a masked load and a
    // register convert (dense compute 0.067 -> 0.056 ms per 2048 L2-resident rows).
    if (__builtin_expect(mask == 0xffffffffu, 1)) {
      *lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      *hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
      return 64;
    }
    *lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask), p));
    *hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask >> 16), p + 32));
    return static_cast<size_t>(__builtin_popcount(mask)) * 2;
  }
};

struct DenseBF16 {
  static constexpr size_t kSize = 2;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    const __m256i a = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask), p);
    const __m256i b = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask >> 16), p + 32);
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    return static_cast<size_t>(__builtin_popcount(mask)) * 2;
  }
};

struct DenseF32 {
  static constexpr size_t kSize = 4;
  SKV_AVX512 SKV_INLINE static size_t Load(const uint8_t* p, uint32_t mask, __m512* lo,
                                           __m512* hi) {
    *lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), p);
    *hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), p + 64);
    return static_cast<size_t>(__builtin_popcount(mask)) * 4;
  }
};

// ---- math helpers ----

// exp(x) for x <= ~88, ~1 ulp (Cephes expf polynomial), NaN in gives NaN out, and 0 below
// -87.3 (exp there is below FLT_MIN): a denormal result would make every FMA that reads it
// take a microcode assist, and its share of a softmax whose largest term is 1 is < 1e-38.
SKV_AVX512 SKV_INLINE __m512 Exp(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  // max/min return their second operand when either is NaN: x goes second to keep NaN.
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-110.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(normal, y, n);
}

// exp(x) for x <= 0 (NaN propagates), for weights that are rounded to fp16 right after: a
// degree-5 Taylor polynomial (relative error <= 2.4e-6, 1% of an fp16 ulp) and a clamp at
// -87 (exp there is ~1e-38, zero in fp16, and never a denormal) instead of Exp's range mask:
// five instructions fewer per 16 weights.
SKV_AVX512 SKV_INLINE __m512 ExpForF16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // x second: NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 120), r, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// ---- scores ----

// p[h, r] = q_h . k_r (q pre-scaled) for HT heads and `rows` per-token/dense rows. Rows run
// in pairs: each q load feeds two FMAs, and one row's FMA chains (2 * words deep) overlap the
// other's. W is the number of 32-column words when fixed at compile time (0: rb.words).
template <class L, bool kSparse, int HT, int W>
SKV_AVX512 void RowScores(const RowBlock& rb, int rows, const float* q, int dpad, float* red,
                          float* p, Prefetcher* pfp) {
  // With W fixed, dpad = 32 * W is a constant too: GCC then addresses q with immediates
  // instead of running out of registers for 2 * HT * W row pointers.
  const int words = W > 0 ? W : rb.words;
  const int dp = W > 0 ? 32 * W : dpad;
  const uint8_t* const bitmaps = rb.bitmaps;
  const uint8_t* const values = rb.values;
  const size_t bm_stride = rb.bm_stride, val_stride = rb.val_stride;
  const uint32_t* const dense_mask = rb.dense_mask;
  Prefetcher pf = *pfp;
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const int n = std::min(16, rows - r0);
    for (int i = 0; i < n; i += 2) {
      pf.Step(2 * Prefetcher::kUnitsPerRow);
      // An odd last row is paired with itself; its twin's sums land in a slot the
      // reduction below overwrites with zeros.
      const int ra = r0 + i;
      const int rb1 = i + 1 < n ? ra + 1 : ra;
      __m512 a0[HT], a1[HT];
      for (int h = 0; h < HT; ++h) a0[h] = a1[h] = _mm512_setzero_ps();
      const uint8_t* pa = values + ra * val_stride;
      const uint8_t* pb = values + rb1 * val_stride;
      const uint8_t* ba = kSparse ? bitmaps + ra * bm_stride : nullptr;
      const uint8_t* bb = kSparse ? bitmaps + rb1 * bm_stride : nullptr;
#pragma GCC unroll 8
      for (int w = 0; w < words; ++w) {
        __m512 lo0, hi0, lo1, hi1;
        pa += L::Load(pa, kSparse ? Load32(ba + 4 * w) : dense_mask[w], &lo0, &hi0);
        pb += L::Load(pb, kSparse ? Load32(bb + 4 * w) : dense_mask[w], &lo1, &hi1);
        const float* qw = q + 32 * w;
#pragma GCC unroll 8
        for (int h = 0; h < HT; ++h) {
          const __m512 qa = _mm512_loadu_ps(qw + h * dp);
          const __m512 qb = _mm512_loadu_ps(qw + h * dp + 16);
          a0[h] = _mm512_fmadd_ps(lo0, qa, a0[h]);
          a1[h] = _mm512_fmadd_ps(lo1, qa, a1[h]);
          a0[h] = _mm512_fmadd_ps(hi0, qb, a0[h]);
          a1[h] = _mm512_fmadd_ps(hi1, qb, a1[h]);
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

// Per-channel K of one token group (GW words = 32 * GW tokens): every channel vector is
// expanded to token lanes and scattered into the scores with the broadcast query channel.
template <class L, int HT, int GW>
SKV_AVX512 void ChannelScores(const uint8_t* bitmaps, const uint8_t* values, int d, const float* q,
                              int dpad, float* p, Prefetcher* pf) {
  __m512 acc[HT][2 * GW];
  for (int h = 0; h < HT; ++h)
    for (int z = 0; z < 2 * GW; ++z) acc[h][z] = _mm512_setzero_ps();
  const uint8_t* ptr = values;
  const int step = std::max(1, Prefetcher::kUnitsPerRow * 32 * GW / d);  // d channels = G rows
  for (int j = 0; j < d; ++j) {
    pf->Step(step);
    __m512 x[2 * GW];
    for (int w = 0; w < GW; ++w) {
      ptr += L::Load(ptr, Load32(bitmaps + (j * GW + w) * 4), &x[2 * w], &x[2 * w + 1]);
    }
    for (int h = 0; h < HT; ++h) {
      const __m512 qb = _mm512_set1_ps(q[h * dpad + j]);
      for (int z = 0; z < 2 * GW; ++z) acc[h][z] = _mm512_fmadd_ps(qb, x[z], acc[h][z]);
    }
  }
  for (int h = 0; h < HT; ++h)
    for (int z = 0; z < 2 * GW; ++z) _mm512_storeu_ps(p + h * kBlock + 16 * z, acc[h][z]);
}

// ---- values ----

// acc[h, 32*w0 .. 32*(w0+NW)) += sum_r p[h, r] * v_r over the block's rows; vp[w * kBlock + r]
// is row r's value cursor at word w. The cursors are precomputed so that the row loop stores
// nothing: with a store in the loop GCC keeps spilling the accumulator array every row.
template <class L, bool kSparse, int HT, int NW>
SKV_AVX512 void RowValuesSlice(const RowBlock& rb, int rows, int w0, const float* p, float* acc,
                               int dpad, const uint8_t* const* vp, Prefetcher* pfp) {
  Prefetcher pf = *pfp;
  __m512 a[HT][2 * NW];
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < 2 * NW; ++z) a[h][z] = _mm512_loadu_ps(acc + h * dpad + 32 * w0 + 16 * z);
  const int step = std::max(1, Prefetcher::kUnitsPerRow * NW / rb.words);  // NW of the words
  for (int r = 0; r < rows; ++r) {
    pf.Step(step);
    __m512 x[2 * NW];
#pragma GCC unroll 16
    for (int w = 0; w < NW; ++w) {
      L::Load(vp[(w0 + w) * kBlock + r], RowMask<kSparse>(rb, r, w0 + w), &x[2 * w], &x[2 * w + 1]);
    }
#pragma GCC unroll 16
    for (int h = 0; h < HT; ++h) {
      const __m512 pb = _mm512_set1_ps(p[h * kBlock + r]);
#pragma GCC unroll 16
      for (int z = 0; z < 2 * NW; ++z) a[h][z] = _mm512_fmadd_ps(pb, x[z], a[h][z]);
    }
  }
#pragma GCC unroll 16
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 16
    for (int z = 0; z < 2 * NW; ++z) _mm512_storeu_ps(acc + h * dpad + 32 * w0 + 16 * z, a[h][z]);
  *pfp = pf;
}

// W: words per row when fixed at compile time (0: rb.words).
template <class L, bool kSparse, int HT, int NW, int W>
SKV_AVX512 void RowValues(const RowBlock& rb, int rows, const float* p, float* acc, int dpad,
                          const uint8_t** vp, Prefetcher* pf) {
  const int words = W > 0 ? W : rb.words;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* ptr = rb.values + r * rb.val_stride;
#pragma GCC unroll 8
    for (int w = 0; w < words; ++w) {
      vp[w * kBlock + r] = ptr;
      ptr += static_cast<size_t>(__builtin_popcount(RowMask<kSparse>(rb, r, w))) * L::kSize;
    }
  }
  int w0 = 0;
  for (; w0 + NW <= words; w0 += NW)
    RowValuesSlice<L, kSparse, HT, NW>(rb, rows, w0, p, acc, dpad, vp, pf);
  for (; w0 < words; ++w0) RowValuesSlice<L, kSparse, HT, 1>(rb, rows, w0, p, acc, dpad, vp, pf);
}

// Per-channel V of one token group: acc[h, j] += p[h, :] . v_j over the channel vectors, 16
// channels at a time through the transposed reduction.
template <class L, int HT, int GW>
SKV_AVX512 void ChannelValues(const uint8_t* bitmaps, const uint8_t* values, int d, const float* p,
                              float* acc, int dpad, float* red, Prefetcher* pf) {
  __m512 pv[HT][2 * GW];
  for (int h = 0; h < HT; ++h)
    for (int z = 0; z < 2 * GW; ++z) pv[h][z] = _mm512_loadu_ps(p + h * kBlock + 16 * z);
  const uint8_t* ptr = values;
  const int step = std::max(1, Prefetcher::kUnitsPerRow * 32 * GW / d);  // d channels = G rows
  for (int j0 = 0; j0 < d; j0 += 16) {
    const int n = std::min(16, d - j0);
    for (int i = 0; i < n; ++i) {
      const int j = j0 + i;
      pf->Step(step);
      __m512 x[2 * GW];
      for (int w = 0; w < GW; ++w) {
        ptr += L::Load(ptr, Load32(bitmaps + (j * GW + w) * 4), &x[2 * w], &x[2 * w + 1]);
      }
      for (int h = 0; h < HT; ++h) {
        __m512 t = _mm512_mul_ps(pv[h][0], x[0]);
        for (int z = 1; z < 2 * GW; ++z) t = _mm512_fmadd_ps(pv[h][z], x[z], t);
        _mm512_storeu_ps(red + (h * 16 + i) * 16, t);
      }
    }
    for (int h = 0; h < HT; ++h) {
      for (int i = n; i < 16; ++i) _mm512_storeu_ps(red + (h * 16 + i) * 16, _mm512_setzero_ps());
      float* a = acc + h * dpad + j0;  // dpad is a multiple of 32, so 16 lanes fit
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), HSum16(red + h * 256)));
    }
  }
}

// ---- online softmax over one block ----

// Turns p[h, 0..rows) from scores into exp(score - m_new), rescales acc and l by
// exp(m_old - m_new), and zeroes p[h, rows..kBlock). The rescale factors of up to 16 heads
// come from one vector Exp: a scalar std::exp per head and block cost ~1 ns per row.
// round_f16: p is rounded to fp16 before it is summed into l and also written to w->p16 as fp16
// pairs, for the fp16 V kernel (the weights it multiplies with are then exactly the ones l
// normalises).
// bf16 / bf16_split: the same for the bf16 V kernel through Bf16Weights (bf16 pairs of rows;
// with split, exact-to-2^-18 hi + lo pairs and p kept in fp32).
enum class Weights { kFp32, kFp16, kBf16, kBf16Split };

SKV_AVX512 void SoftmaxBlock(Work* w, int rows, Weights form) {
  const bool round_f16 = form == Weights::kFp16;
  alignas(64) float bmax[16], alpha[16], mnew[16];
  for (int h0 = 0; h0 < w->group; h0 += 16) {
    const int hn = std::min(16, w->group - h0);
    _mm512_store_ps(bmax, _mm512_setzero_ps());  // unused lanes: no garbage into Exp
    for (int i = 0; i < hn; ++i) {
      const float* s = w->p.data() + (h0 + i) * kBlock;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __mmask16 nan = 0;
      for (int c = 0; c < rows; c += 16) {
        const __mmask16 valid =
            static_cast<__mmask16>(rows - c >= 16 ? 0xffffu : (1u << (rows - c)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(mx, valid, s + c);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, v);
      }
      // NaN in q or K propagates, as in the reference.
      bmax[i] = nan ? NAN : _mm512_reduce_max_ps(mx);
    }
    const __mmask16 live = static_cast<__mmask16>((1u << hn) - 1);
    const __m512 m_old = _mm512_maskz_loadu_ps(live, w->m.data() + h0);
    // max_ps returns its second operand when either is NaN: a NaN block max wins, and a NaN
    // m_old gives way to the block max (std::fmax's rule) while alpha = exp(NaN) keeps acc
    // and l NaN.
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_load_ps(bmax));
    const __mmask16 inf = _mm512_fpclass_ps_mask(m_old, 0x18);  // +-infinity: nothing yet
    const __m512 a =
        _mm512_maskz_mov_ps(static_cast<__mmask16>(~inf & live), Exp(_mm512_sub_ps(m_old, m_new)));
    _mm512_store_ps(alpha, a);
    _mm512_store_ps(mnew, m_new);
    for (int i = 0; i < hn; ++i) {
      const int h = h0 + i;
      float* s = w->p.data() + h * kBlock;
      if (alpha[i] != 1.0f) {
        float* acc = w->acc.data() + h * w->dpad;
        const __m512 av = _mm512_set1_ps(alpha[i]);
        for (int j = 0; j < w->dpad; j += 16) {
          _mm512_storeu_ps(acc + j, _mm512_mul_ps(_mm512_loadu_ps(acc + j), av));
        }
      }
      const __m512 mv = _mm512_set1_ps(mnew[i]);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < kBlock; c += 16) {
        const int left = rows - c;
        const __mmask16 valid = static_cast<__mmask16>(left >= 16  ? 0xffffu
                                                       : left <= 0 ? 0u
                                                                   : (1u << left) - 1);
        const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + c), mv);
        __m512 e = _mm512_maskz_mov_ps(valid, round_f16 ? ExpForF16(x) : Exp(x));
        if (round_f16) {
          const __m256i e16 = _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT);
          e = _mm512_cvtph_ps(e16);
          const __m512i pair = _mm512_cvtepu16_epi32(e16);
          _mm512_storeu_si512(w->p16.data() + h * kBlock + c,
                              _mm512_or_si512(pair, _mm512_slli_epi32(pair, 16)));
        }
        _mm512_storeu_ps(s + c, e);
        sum = _mm512_add_ps(sum, e);
      }
      const float total =
          form == Weights::kBf16 || form == Weights::kBf16Split
              ? Bf16Weights(s, w->p16.data() + h * kBlock,
                            form == Weights::kBf16Split ? DType::kBFloat16 : DType::kFloat16)
              : _mm512_reduce_add_ps(sum);
      w->l[h] = w->l[h] * alpha[i] + total;
      w->m[h] = mnew[i];
    }
  }
}

// ---- dispatch over head tiles and element types ----

// Word counts of the common head dims (64, 128, 256) get unrolled row loops.
template <class L, bool kSparse, int HT>
SKV_AVX512 void RowScoresW(const RowBlock& rb, int rows, const float* q, int dpad, float* red,
                           float* p, Prefetcher* pf) {
  switch (rb.words) {
    case 2:
      return RowScores<L, kSparse, HT, 2>(rb, rows, q, dpad, red, p, pf);
    case 4:
      return RowScores<L, kSparse, HT, 4>(rb, rows, q, dpad, red, p, pf);
    case 8:
      return RowScores<L, kSparse, HT, 8>(rb, rows, q, dpad, red, p, pf);
    default:
      return RowScores<L, kSparse, HT, 0>(rb, rows, q, dpad, red, p, pf);
  }
}

template <class L, bool kSparse, int HT, int NW>
SKV_AVX512 void RowValuesW(const RowBlock& rb, int rows, const float* p, float* acc, int dpad,
                           const uint8_t** vp, Prefetcher* pf) {
  switch (rb.words) {
    case 2:
      return RowValues<L, kSparse, HT, NW, 2>(rb, rows, p, acc, dpad, vp, pf);
    case 4:
      return RowValues<L, kSparse, HT, NW, 4>(rb, rows, p, acc, dpad, vp, pf);
    case 8:
      return RowValues<L, kSparse, HT, NW, 8>(rb, rows, p, acc, dpad, vp, pf);
    default:
      return RowValues<L, kSparse, HT, NW, 0>(rb, rows, p, acc, dpad, vp, pf);
  }
}

template <class L, bool kSparse>
SKV_AVX512 void RowScoresAll(const RowBlock& rb, int rows, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const float* q = w->q.data() + h0 * w->dpad;
    float* p = w->p.data() + h0 * kBlock;
    float* red = w->red.data();
    switch (ht) {
      case 8:
        RowScoresW<L, kSparse, 8>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 4:
        RowScoresW<L, kSparse, 4>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 3:
        RowScoresW<L, kSparse, 3>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      case 2:
        RowScoresW<L, kSparse, 2>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
      default:
        RowScoresW<L, kSparse, 1>(rb, rows, q, w->dpad, red, p, &w->pf);
        break;
    }
    h0 += ht;
  }
}

template <class L, bool kSparse>
SKV_AVX512 void RowValuesAll(const RowBlock& rb, int rows, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 8);
    const float* p = w->p.data() + h0 * kBlock;
    float* acc = w->acc.data() + h0 * w->dpad;
    const uint8_t** vp = w->vp.data();
    switch (ht) {
      case 8:
        RowValuesW<L, kSparse, 8, 1>(rb, rows, p, acc, w->dpad, vp, &w->pf);
        break;
      case 4:
        RowValuesW<L, kSparse, 4, 2>(rb, rows, p, acc, w->dpad, vp, &w->pf);
        break;
      case 3:
        RowValuesW<L, kSparse, 3, 2>(rb, rows, p, acc, w->dpad, vp, &w->pf);
        break;
      case 2:
        RowValuesW<L, kSparse, 2, 4>(rb, rows, p, acc, w->dpad, vp, &w->pf);
        break;
      default:
        RowValuesW<L, kSparse, 1, 4>(rb, rows, p, acc, w->dpad, vp, &w->pf);
        break;
    }
    h0 += ht;
  }
}

template <class L, int GW>
SKV_AVX512 void ChannelScoresAll(const uint8_t* bm, const uint8_t* vals, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 4);
    const float* q = w->q.data() + h0 * w->dpad;
    float* p = w->p.data() + h0 * kBlock;
    switch (ht) {
      case 4:
        ChannelScores<L, 4, GW>(bm, vals, w->d, q, w->dpad, p, &w->pf);
        break;
      case 3:
        ChannelScores<L, 3, GW>(bm, vals, w->d, q, w->dpad, p, &w->pf);
        break;
      case 2:
        ChannelScores<L, 2, GW>(bm, vals, w->d, q, w->dpad, p, &w->pf);
        break;
      default:
        ChannelScores<L, 1, GW>(bm, vals, w->d, q, w->dpad, p, &w->pf);
        break;
    }
    h0 += ht;
  }
}

template <class L, int GW>
SKV_AVX512 void ChannelValuesAll(const uint8_t* bm, const uint8_t* vals, Work* w) {
  for (int h0 = 0; h0 < w->group;) {
    const int ht = Tile(w->group - h0, 4);
    const float* p = w->p.data() + h0 * kBlock;
    float* acc = w->acc.data() + h0 * w->dpad;
    float* red = w->red.data();
    switch (ht) {
      case 4:
        ChannelValues<L, 4, GW>(bm, vals, w->d, p, acc, w->dpad, red, &w->pf);
        break;
      case 3:
        ChannelValues<L, 3, GW>(bm, vals, w->d, p, acc, w->dpad, red, &w->pf);
        break;
      case 2:
        ChannelValues<L, 2, GW>(bm, vals, w->d, p, acc, w->dpad, red, &w->pf);
        break;
      default:
        ChannelValues<L, 1, GW>(bm, vals, w->d, p, acc, w->dpad, red, &w->pf);
        break;
    }
    h0 += ht;
  }
}

// One section's rows [t0, t0 + rows) (or its token group t0 / G for per-channel).
struct SectionBlock {
  const SectionFormat* fmt;  // null: dense rows at `data` with `dtype`
  DType dtype;
  const uint8_t* data;
  int t0;
  int rows;
};

RowBlock MakeRowBlock(const SectionBlock& b, const Work& w) {
  const size_t es = DTypeSize(b.dtype);
  RowBlock rb;
  rb.dense_mask = w.dense_mask.data();
  rb.words = w.words;
  const bool sparse = b.fmt != nullptr && b.fmt->kind == SectionKind::kPerToken;
  if (sparse) {
    const size_t bm = BitmapBytes(w.d);
    rb.bitmaps = b.data + b.t0 * bm;
    rb.bm_stride = bm;
    rb.val_stride = static_cast<size_t>(b.fmt->k) * es;
    rb.values = b.data + b.fmt->bitmap_bytes() + b.t0 * rb.val_stride;
  } else {
    rb.bitmaps = nullptr;
    rb.bm_stride = 0;
    rb.val_stride = static_cast<size_t>(w.d) * es;
    rb.values = b.data + b.t0 * rb.val_stride;
  }
  return rb;
}

// Per-channel group of the block: bitmaps and values of its head_dim vectors.
void ChannelGroup(const SectionBlock& b, const Work& w, const uint8_t** bm, const uint8_t** vals) {
  const SectionFormat& f = *b.fmt;
  const size_t first = static_cast<size_t>(b.t0 / f.group) * w.d;
  *bm = b.data + first * BitmapBytes(f.group);
  *vals = b.data + f.bitmap_bytes() + first * f.k * DTypeSize(b.dtype);
}

template <bool kScores>
SKV_AVX512 void RunSection(const SectionBlock& b, Work* w) {
  const bool per_channel = b.fmt != nullptr && b.fmt->kind == SectionKind::kPerChannel;
  if (per_channel) {
    const uint8_t *bm, *vals;
    ChannelGroup(b, *w, &bm, &vals);
    const bool g64 = b.fmt->group == 64;
#define SKV_CHANNEL(L)                                                               \
  if (kScores) {                                                                     \
    g64 ? ChannelScoresAll<L, 2>(bm, vals, w) : ChannelScoresAll<L, 1>(bm, vals, w); \
  } else {                                                                           \
    g64 ? ChannelValuesAll<L, 2>(bm, vals, w) : ChannelValuesAll<L, 1>(bm, vals, w); \
  }
    switch (b.dtype) {
      case DType::kFloat16:
        SKV_CHANNEL(F16) break;
      case DType::kBFloat16:
        SKV_CHANNEL(BF16) break;
      case DType::kFloat32:
        SKV_CHANNEL(F32) break;
    }
#undef SKV_CHANNEL
    return;
  }
  const RowBlock rb = MakeRowBlock(b, *w);
  const bool sparse = rb.bitmaps != nullptr;
#define SKV_ROWS(LS, LD)                                                                     \
  if (kScores) {                                                                             \
    sparse ? RowScoresAll<LS, true>(rb, b.rows, w) : RowScoresAll<LD, false>(rb, b.rows, w); \
  } else {                                                                                   \
    sparse ? RowValuesAll<LS, true>(rb, b.rows, w) : RowValuesAll<LD, false>(rb, b.rows, w); \
  }
  switch (b.dtype) {
    case DType::kFloat16:
      SKV_ROWS(F16, DenseF16) break;
    case DType::kBFloat16:
      SKV_ROWS(BF16, DenseBF16) break;
    case DType::kFloat32:
      SKV_ROWS(F32, DenseF32) break;
  }
#undef SKV_ROWS
}

// Whether the fp16-arithmetic kernels take this section: fp16 per-token or dense rows.
bool Fp16Rows(const SectionBlock& b, const Work& w) {
  return w.f16 && b.dtype == DType::kFloat16 &&
         (b.fmt == nullptr || b.fmt->kind != SectionKind::kPerChannel);
}

// Whether the bf16 dot-product kernels take this section: fp16 or bf16 per-token or dense rows.
bool Bf16Rows(const SectionBlock& b, const Work& w) {
  return w.bf16 && (b.dtype == DType::kFloat16 || b.dtype == DType::kBFloat16) &&
         (b.fmt == nullptr || b.fmt->kind != SectionKind::kPerChannel);
}

SKV_AVX512 void RunBlock(const SectionBlock& k, const SectionBlock& v, Work* w) {
  // The reduced-arithmetic score kernels report a non-finite result (overflow or non-finite
  // input); the block's scores are then recomputed in fp32 (the V kernels fall back by themselves).
  const bool reduced_scores = Fp16Rows(k, *w) ? Fp16RowScores(MakeRowBlock(k, *w), k.rows, w)
                              : Bf16Rows(k, *w)
                                  ? Bf16RowScores(MakeRowBlock(k, *w), k.rows, k.dtype, w)
                                  : false;
  if (!reduced_scores) RunSection<true>(k, w);
  const bool vh = Fp16Rows(v, *w);
  const bool vb = !vh && Bf16Rows(v, *w);
  SoftmaxBlock(w, k.rows,
               vh   ? Weights::kFp16
               : vb ? (v.dtype == DType::kBFloat16 ? Weights::kBf16Split : Weights::kBf16)
                    : Weights::kFp32);
  if (vh) {
    Fp16RowValues(MakeRowBlock(v, *w), v.rows, w);
  } else if (vb) {
    Bf16RowValues(MakeRowBlock(v, *w), v.rows, v.dtype, w);
  } else {
    RunSection<false>(v, w);
  }
}

// Adds the bytes a block's section reads to the prefetcher.
void AddRanges(const SectionBlock& b, const Work& w, Prefetcher* pf) {
  const size_t es = DTypeSize(b.dtype);
  if (b.fmt == nullptr || b.fmt->kind == SectionKind::kDense) {
    const size_t row = static_cast<size_t>(w.d) * es;
    pf->Add(b.data + b.t0 * row, b.rows * row);
  } else if (b.fmt->kind == SectionKind::kPerToken) {
    const size_t bm = BitmapBytes(w.d);
    const size_t vs = static_cast<size_t>(b.fmt->k) * es;
    pf->Add(b.data + b.t0 * bm, b.rows * bm);
    pf->Add(b.data + b.fmt->bitmap_bytes() + b.t0 * vs, b.rows * vs);
  } else {
    const uint8_t *bm, *vals;
    ChannelGroup(b, w, &bm, &vals);
    pf->Add(bm, w.d * BitmapBytes(b.fmt->group));
    pf->Add(vals, static_cast<size_t>(w.d) * b.fmt->k * es);
  }
}

// Runs blocks one behind the one most recently emitted, so that the emitted block's bytes
// are prefetched while the previous one computes.
struct Pipeline {
  Work* w;
  bool have = false;
  SectionBlock k{}, v{};

  void Emit(const SectionBlock& nk, const SectionBlock& nv) {
    if (have) {
      w->pf.Clear();
      AddRanges(nk, *w, &w->pf);
      AddRanges(nv, *w, &w->pf);
      w->pf.Pace(k.rows);
      RunBlock(k, v, w);
    }
    k = nk;
    v = nv;
    have = true;
  }
  void Flush() {
    if (have) {
      w->pf.Clear();
      RunBlock(k, v, w);
    }
    have = false;
  }
};

bool Specialised(const SectionFormat& f) {
  return f.kind != SectionKind::kPerChannel || f.group == 32 || f.group == 64;
}

void RunChunk(const DecodeAttentionParams& p, const ChunkRef& c, Pipeline* pipe) {
  Work* w = pipe->w;
  const SectionFormat& kf = p.k_format;
  const SectionFormat& vf = p.v_format;
  const bool kc = kf.kind == SectionKind::kPerChannel;
  const bool vc = vf.kind == SectionKind::kPerChannel;
  const int tokens = kf.tokens;
  if (!Specialised(kf) || !Specialised(vf) || (kc && vc && kf.group != vf.group)) {
    // Not specialised: expand to float rows and run the dense fp32 path over them. The
    // pipeline is flushed first and after, as the float buffers are reused per chunk.
    pipe->Flush();
    const size_t n = static_cast<size_t>(tokens) * w->d;
    w->kf.resize(n);
    w->vf.resize(n);
    ExpandSectionToFloat(kf, c.k, w->kf.data());
    ExpandSectionToFloat(vf, c.v, w->vf.data());
    const auto* kd = reinterpret_cast<const uint8_t*>(w->kf.data());
    const auto* vd = reinterpret_cast<const uint8_t*>(w->vf.data());
    for (int t0 = 0; t0 < tokens; t0 += kBlock) {
      const int rows = std::min(kBlock, tokens - t0);
      pipe->Emit({nullptr, DType::kFloat32, kd, t0, rows},
                 {nullptr, DType::kFloat32, vd, t0, rows});
    }
    pipe->Flush();
    return;
  }
  const int block = kc ? kf.group : vc ? vf.group : kBlock;
  for (int t0 = 0; t0 < tokens; t0 += block) {
    const int rows = std::min(block, tokens - t0);
    pipe->Emit({&kf, p.dtype, c.k, t0, rows}, {&vf, p.dtype, c.v, t0, rows});
  }
}

void RunAll(const DecodeAttentionParams& p, Work* w) {
  Pipeline pipe{w};
  for (int c = 0; c < p.num_chunks; ++c) RunChunk(p, p.chunks[c], &pipe);
  for (int s = 0; s < p.num_spans; ++s) {
    const DenseSpan& span = p.spans[s];
    const auto* kd = static_cast<const uint8_t*>(span.k);
    const auto* vd = static_cast<const uint8_t*>(span.v);
    const size_t row = static_cast<size_t>(w->d) * DTypeSize(p.dtype);
    for (int64_t t0 = 0; t0 < span.tokens; t0 += kBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlock, span.tokens - t0));
      // Offsets stay in 64 bits: a span may exceed 2^31 bytes.
      pipe.Emit({nullptr, p.dtype, kd + t0 * row, 0, rows},
                {nullptr, p.dtype, vd + t0 * row, 0, rows});
    }
  }
  pipe.Flush();
}

}  // namespace

void Avx512DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state) {
  thread_local Work w;
  w.Reset(p);
  PrepareFp16(p, &w);
  PrepareBf16(p, &w);
  RunAll(p, &w);
  state->Assign(p.group, p.head_dim, w.m.data(), w.l.data(), w.acc.data(), w.dpad);
}

#endif  // SPARSEKV_HAVE_AVX512_VARIANT

}  // namespace sparsekv::kernels
