// AVX2 decode attention. See avx2_attention.h for the contract.
//
// Each block of up to 64 tokens is expanded once to float rows in an L1-resident buffer
// ([rows, dpad], dpad = head_dim rounded up to 8): per bitmap byte, a 256-entry table gives the
// vpermps indices that move the byte's packed values to their columns (a mask zeroes the
// others) and the value cursor advances by popcount. The group's query heads then share those
// rows for scores (8-wide FMAs, horizontal sums 8 rows at a time) and for the value
// accumulation. As in avx512_attention.cc, functions carry target attributes instead of the
// file being compiled with -mavx2, so no AVX2 copy of a standard-library template can leak
// into baseline code.
#include "kernels/cpu/avx2_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

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

// ExpandRows for per-token sections of 16-bit values: per 8 columns, one pshufb of the packed
// bits (kShuffle) and one conversion.
SKV_AVX2 void ExpandRows16(const SectionFormat* fmt, DType t, const uint8_t* data, int t0, int rows,
                           int d, int dpad, const uint8_t* end, float* out) {
  const size_t bm = BitmapBytes(d);
  const size_t vs = static_cast<size_t>(fmt->k) * 2;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* bits = data + (static_cast<size_t>(t0) + r) * bm;
    const uint8_t* src = data + fmt->bitmap_bytes() + (static_cast<size_t>(t0) + r) * vs;
    float* o = out + static_cast<size_t>(r) * dpad;
    for (int j = 0; j < dpad; j += 8) {
      const unsigned b = j < d ? bits[j >> 3] : 0u;
      __m128i x;
      if (end - src >= 16) {
        x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      } else {  // the section's last values: never read past its end
        alignas(16) uint8_t tmp[16] = {};
        std::memcpy(tmp, src, static_cast<size_t>(std::max<ptrdiff_t>(end - src, 0)));
        x = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
      x = _mm_shuffle_epi8(x, _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle.ctl[b])));
      _mm256_storeu_ps(o + j, Convert8(t, x));
      src += 2 * __builtin_popcount(b);
    }
  }
}

// Expands rows [t0, t0 + rows) of a section (or dense rows) to out [rows, dpad] floats.
// `end` bounds the values so that the last rows never read past the section.
SKV_AVX2 void ExpandRows(const SectionFormat* fmt, DType t, const uint8_t* data, int t0, int rows,
                         int d, int dpad, const uint8_t* end, float* out) {
  const size_t es = DTypeSize(t);
  if (fmt == nullptr || fmt->kind == SectionKind::kDense) {
    for (int r = 0; r < rows; ++r) {
      const uint8_t* src = data + (static_cast<size_t>(t0) + r) * d * es;
      float* o = out + static_cast<size_t>(r) * dpad;
      for (int j = 0; j < dpad; j += 8)
        _mm256_storeu_ps(o + j, Load8(t, src + j * es, std::min(8, d - j)));
    }
    return;
  }
  if (es == 2) {
    ExpandRows16(fmt, t, data, t0, rows, d, dpad, end, out);
    return;
  }
  const size_t bm = BitmapBytes(d);
  const size_t vs = static_cast<size_t>(fmt->k) * es;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* bits = data + (static_cast<size_t>(t0) + r) * bm;
    const uint8_t* src = data + fmt->bitmap_bytes() + (static_cast<size_t>(t0) + r) * vs;
    float* o = out + static_cast<size_t>(r) * dpad;
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int j = 0; j < dpad; j += 8) {
      const unsigned b = j < d ? bits[j >> 3] : 0u;
      const int cnt = __builtin_popcount(b);
      // fp32 values (16-bit ones go to ExpandRows16). Only a section's last values can lie
      // within 8 elements of its end: a pointer compare, and a division only there.
      const __m256 v =
          end - src >= static_cast<ptrdiff_t>(8 * es)
              ? Load8Full(t, src)
              : Load8(t, src, static_cast<int>((end - src) / static_cast<ptrdiff_t>(es)));
      const __m256i idx =
          _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kExpand.idx[b])));
      const __m256i bset = _mm256_set1_epi32(static_cast<int>(b));
      const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(bset, lanes), lanes);
      _mm256_storeu_ps(o + j,
                       _mm256_and_ps(_mm256_permutevar8x32_ps(v, idx), _mm256_castsi256_ps(keep)));
      src += cnt * es;
    }
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
  std::vector<float> q, acc, p, m, l, kb, vb, kf, vf;

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
    kb.assign(static_cast<size_t>(kBlock) * dpad, 0.0f);
    vb.assign(kb.size(), 0.0f);
  }
};

// Scores, softmax and value accumulation over `rows` expanded rows in w->kb / w->vb.
SKV_AVX2 void RunRows(int rows, Work* w) {
  const int dpad = w->dpad;
  const float* kb = w->kb.data();
  const float* vb = w->vb.data();
  for (int h0 = 0; h0 < w->group; h0 += 4) {
    const int ht = std::min(4, w->group - h0);
    const float* q = w->q.data() + static_cast<size_t>(h0) * dpad;
    for (int r = 0; r < rows; ++r) {
      const float* k = kb + static_cast<size_t>(r) * dpad;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int j = 0; j < dpad; j += 8) {
        const __m256 x = _mm256_loadu_ps(k + j);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + j), a0);
        if (ht > 1) a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + dpad + j), a1);
        if (ht > 2) a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + 2 * dpad + j), a2);
        if (ht > 3) a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(q + 3 * dpad + j), a3);
      }
      float* p = w->p.data() + static_cast<size_t>(h0) * kBlock + r;
      p[0] = HSum(a0);
      if (ht > 1) p[kBlock] = HSum(a1);
      if (ht > 2) p[2 * kBlock] = HSum(a2);
      if (ht > 3) p[3 * kBlock] = HSum(a3);
    }
  }
  for (int h = 0; h < w->group; ++h) {
    float* s = w->p.data() + static_cast<size_t>(h) * kBlock;
    float block_max = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int r = 0; r < rows; ++r) {
      nan |= std::isnan(s[r]);
      block_max = std::fmax(block_max, s[r]);
    }
    if (nan) block_max = NAN;
    const float m_old = w->m[h];
    const float m_new = std::isnan(block_max) ? NAN : std::fmax(m_old, block_max);
    const float alpha = std::isinf(m_old) ? 0.0f : std::exp(m_old - m_new);
    float* acc = w->acc.data() + static_cast<size_t>(h) * dpad;
    if (alpha != 1.0f) {
      for (int j = 0; j < dpad; j += 8)
        _mm256_storeu_ps(acc + j, _mm256_mul_ps(_mm256_loadu_ps(acc + j), _mm256_set1_ps(alpha)));
    }
    __m256 sum = _mm256_setzero_ps();
    for (int r = 0; r < kBlock; r += 8) {
      const __m256i ri =
          _mm256_add_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rows), ri));
      const __m256 e =
          _mm256_and_ps(valid, Exp(_mm256_sub_ps(_mm256_loadu_ps(s + r), _mm256_set1_ps(m_new))));
      _mm256_storeu_ps(s + r, e);
      sum = _mm256_add_ps(sum, e);
    }
    w->l[h] = w->l[h] * alpha + HSum(sum);
    w->m[h] = m_new;
  }
  // Values: column slices of 32 floats (4 ymm) x up to 3 heads stay in registers.
  for (int h0 = 0; h0 < w->group; h0 += 3) {
    const int ht = std::min(3, w->group - h0);
    const float* p = w->p.data() + static_cast<size_t>(h0) * kBlock;
    for (int j0 = 0; j0 < dpad; j0 += 32) {
      const int nz = std::min(4, (dpad - j0) / 8);
      __m256 a[3][4];
      for (int h = 0; h < ht; ++h)
        for (int z = 0; z < nz; ++z)
          a[h][z] =
              _mm256_loadu_ps(w->acc.data() + static_cast<size_t>(h0 + h) * dpad + j0 + 8 * z);
      for (int r = 0; r < rows; ++r) {
        const float* v = vb + static_cast<size_t>(r) * dpad + j0;
        for (int h = 0; h < ht; ++h) {
          const __m256 pb = _mm256_set1_ps(p[h * kBlock + r]);
          for (int z = 0; z < nz; ++z)
            a[h][z] = _mm256_fmadd_ps(pb, _mm256_loadu_ps(v + 8 * z), a[h][z]);
        }
      }
      for (int h = 0; h < ht; ++h)
        for (int z = 0; z < nz; ++z)
          _mm256_storeu_ps(w->acc.data() + static_cast<size_t>(h0 + h) * dpad + j0 + 8 * z,
                           a[h][z]);
    }
  }
}

SKV_AVX2 void RunAll(const DecodeAttentionParams& p, Work* w) {
  const SectionFormat& kf = p.k_format;
  const SectionFormat& vf = p.v_format;
  const bool rows_ok = kf.kind != SectionKind::kPerChannel && vf.kind != SectionKind::kPerChannel;
  for (int c = 0; c < p.num_chunks; ++c) {
    const int tokens = kf.tokens;
    if (rows_ok) {
      for (int t0 = 0; t0 < tokens; t0 += kBlock) {
        const int rows = std::min(kBlock, tokens - t0);
        ExpandRows(&kf, p.dtype, p.chunks[c].k, t0, rows, w->d, w->dpad, p.chunks[c].k + kf.bytes(),
                   w->kb.data());
        ExpandRows(&vf, p.dtype, p.chunks[c].v, t0, rows, w->d, w->dpad, p.chunks[c].v + vf.bytes(),
                   w->vb.data());
        RunRows(rows, w);
      }
      continue;
    }
    // Per-channel sections: the portable float expansion, then the same row loop.
    const size_t n = static_cast<size_t>(tokens) * w->d;
    w->kf.resize(n);
    w->vf.resize(n);
    ExpandSectionToFloat(kf, p.chunks[c].k, w->kf.data());
    ExpandSectionToFloat(vf, p.chunks[c].v, w->vf.data());
    for (int t0 = 0; t0 < tokens; t0 += kBlock) {
      const int rows = std::min(kBlock, tokens - t0);
      const auto* kd = reinterpret_cast<const uint8_t*>(w->kf.data());
      const auto* vd = reinterpret_cast<const uint8_t*>(w->vf.data());
      ExpandRows(nullptr, DType::kFloat32, kd, t0, rows, w->d, w->dpad, nullptr, w->kb.data());
      ExpandRows(nullptr, DType::kFloat32, vd, t0, rows, w->d, w->dpad, nullptr, w->vb.data());
      RunRows(rows, w);
    }
  }
  for (int s = 0; s < p.num_spans; ++s) {
    const DenseSpan& span = p.spans[s];
    const size_t row = static_cast<size_t>(w->d) * DTypeSize(p.dtype);
    for (int64_t t0 = 0; t0 < span.tokens; t0 += kBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlock, span.tokens - t0));
      ExpandRows(nullptr, p.dtype, static_cast<const uint8_t*>(span.k) + t0 * row, 0, rows, w->d,
                 w->dpad, nullptr, w->kb.data());
      ExpandRows(nullptr, p.dtype, static_cast<const uint8_t*>(span.v) + t0 * row, 0, rows, w->d,
                 w->dpad, nullptr, w->vb.data());
      RunRows(rows, w);
    }
  }
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
