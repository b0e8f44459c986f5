// Portable float32 decode attention: every chunk is expanded to float rows, then one
// block-wise online softmax runs over all rows. Correct on any CPU; the SIMD variants are
// tested against the same reference.
#include "kernels/cpu/portable_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/row_source.h"

namespace sparsekv::kernels {

void ExpandSectionToFloat(const SectionFormat& fmt, const uint8_t* in, float* out) {
  const int d = fmt.head_dim;
  const size_t es = DTypeSize(fmt.dtype);
  const size_t total = static_cast<size_t>(fmt.tokens) * d;
  if (fmt.kind == SectionKind::kDense) {
    ConvertElements(fmt.dtype, in, DType::kFloat32, out, total);
    return;
  }
  std::memset(out, 0, total * sizeof(float));
  const int n = fmt.n();
  const size_t bm = BitmapBytes(n);
  const uint8_t* values = in + fmt.bitmap_bytes();
  const bool per_token = fmt.kind == SectionKind::kPerToken;
  for (int v = 0; v < fmt.vectors(); ++v) {
    const uint8_t* bitmap = in + v * bm;
    const uint8_t* src = values + static_cast<size_t>(v) * fmt.k * es;
    float* base = per_token ? out + static_cast<size_t>(v) * d
                            : out + static_cast<size_t>((v / d) * fmt.group) * d + v % d;
    const size_t stride = per_token ? 1 : static_cast<size_t>(d);
    int kept = 0;
    for (int w = 0; w < n; w += 8) {
      unsigned bits = bitmap[w >> 3];
      while (bits) {
        const int i = w + __builtin_ctz(bits);
        bits &= bits - 1;
        base[i * stride] = LoadAsFloat(fmt.dtype, src, kept++);
      }
    }
  }
}

void UpdateStateWithFloatRows(const float* q, float scale, const float* k, const float* v, int rows,
                              AttentionState* state, std::vector<float>* scores) {
  const int d = state->head_dim;
  const int g = state->group;
  scores->resize(static_cast<size_t>(rows) * g);
  for (int h = 0; h < g; ++h) {
    const float* qh = q + static_cast<size_t>(h) * d;
    float* s = scores->data() + static_cast<size_t>(h) * rows;
    float block_max = -INFINITY;
    for (int r = 0; r < rows; ++r) {
      const float* kr = k + static_cast<size_t>(r) * d;
      float dot = 0.0f;
      for (int j = 0; j < d; ++j) dot += qh[j] * kr[j];
      s[r] = dot * scale;
      block_max = std::fmax(block_max, s[r]);
    }
    if (std::isnan(block_max) || std::isinf(block_max)) {
      // NaN in q or K: propagate instead of silently producing finite output.
      bool has_nan = false;
      for (int r = 0; r < rows; ++r) has_nan |= std::isnan(s[r]);
      if (has_nan) block_max = NAN;
    }
    const float m_old = state->m[h];
    const float m_new = std::isnan(block_max) ? NAN : std::fmax(m_old, block_max);
    const float alpha = std::isinf(m_old) ? 0.0f : std::exp(m_old - m_new);
    float* acc = state->acc.data() + static_cast<size_t>(h) * d;
    float l = state->l[h] * alpha;
    for (int j = 0; j < d; ++j) acc[j] *= alpha;
    for (int r = 0; r < rows; ++r) {
      const float p = std::exp(s[r] - m_new);
      l += p;
      const float* vr = v + static_cast<size_t>(r) * d;
      for (int j = 0; j < d; ++j) acc[j] += p * vr[j];
    }
    state->l[h] = l;
    state->m[h] = m_new;
  }
}

void PortableDecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state) {
  state->Reset(p.group, p.head_dim);
  const int d = p.head_dim;
  std::vector<float> kf, vf, scores;
  for (int c = 0; c < p.num_chunks; ++c) {
    const int rows = p.k_format.tokens;
    kf.resize(static_cast<size_t>(rows) * d);
    vf.resize(kf.size());
    ExpandSectionToFloat(p.k_format, p.chunks[c].k, kf.data());
    ExpandSectionToFloat(p.v_format, p.chunks[c].v, vf.data());
    UpdateStateWithFloatRows(p.q, p.scale, kf.data(), vf.data(), rows, state, &scores);
  }
  constexpr int64_t kBlock = 256;
  for (int s = 0; s < p.num_spans; ++s) {
    const DenseSpan& span = p.spans[s];
    const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(p.dtype);
    for (int64_t r0 = 0; r0 < span.tokens; r0 += kBlock) {
      const int rows = static_cast<int>(std::min(kBlock, span.tokens - r0));
      kf.resize(static_cast<size_t>(rows) * d);
      vf.resize(kf.size());
      ConvertElements(p.dtype, static_cast<const uint8_t*>(span.k) + r0 * row_bytes,
                      DType::kFloat32, kf.data(), kf.size());
      ConvertElements(p.dtype, static_cast<const uint8_t*>(span.v) + r0 * row_bytes,
                      DType::kFloat32, vf.data(), vf.size());
      UpdateStateWithFloatRows(p.q, p.scale, kf.data(), vf.data(), rows, state, &scores);
    }
  }
}

}  // namespace sparsekv::kernels
