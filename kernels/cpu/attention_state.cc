#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/attention.h"

namespace sparsekv::kernels {

void AttentionState::Reset(int g, int d) {
  group = g;
  head_dim = d;
  m.assign(g, -std::numeric_limits<float>::infinity());
  l.assign(g, 0.0f);
  acc.assign(static_cast<size_t>(g) * d, 0.0f);
}

void AttentionState::Assign(int g, int d, const float* ms, const float* ls, const float* accs,
                            int acc_stride) {
  Reset(g, d);
  for (int h = 0; h < g; ++h) {
    m[h] = ms[h];
    l[h] = ls[h];
    std::memcpy(acc.data() + static_cast<size_t>(h) * d, accs + static_cast<size_t>(h) * acc_stride,
                d * sizeof(float));
  }
}

void MergeAttentionState(const AttentionState& other, AttentionState* into) {
  const int d = into->head_dim;
  for (int h = 0; h < into->group; ++h) {
    const float mo = other.m[h];
    const float mi = into->m[h];
    if (other.l[h] == 0.0f && !std::isnan(mo)) continue;  // other is empty
    if (into->l[h] == 0.0f && !std::isnan(mi)) {          // into is empty: copy
      into->m[h] = mo;
      into->l[h] = other.l[h];
      for (int j = 0; j < d; ++j) into->acc[h * d + j] = other.acc[h * d + j];
      continue;
    }
    const float m = std::fmax(mi, mo);
    // exp(-inf - finite) = 0; both finite here unless NaN, which then propagates.
    const float ai = std::exp(mi - m);
    const float ao = std::exp(mo - m);
    into->m[h] = std::isnan(mi) || std::isnan(mo) ? NAN : m;
    into->l[h] = into->l[h] * ai + other.l[h] * ao;
    for (int j = 0; j < d; ++j) {
      into->acc[h * d + j] = into->acc[h * d + j] * ai + other.acc[h * d + j] * ao;
    }
  }
}

void FinalizeAttentionState(const AttentionState& s, float* out, float* lse) {
  const int d = s.head_dim;
  for (int h = 0; h < s.group; ++h) {
    const bool empty = s.l[h] == 0.0f && !std::isnan(s.m[h]);
    const float inv = empty ? 0.0f : 1.0f / s.l[h];
    for (int j = 0; j < d; ++j) out[h * d + j] = empty ? 0.0f : s.acc[h * d + j] * inv;
    if (lse) {
      lse[h] = empty ? -std::numeric_limits<float>::infinity() : s.m[h] + std::log(s.l[h]);
    }
  }
}

void AccumulateDenseMass(const DecodeAttentionParams& p, const float* lse, float* mass) {
  const int d = p.head_dim;
  int64_t t = 0;
  for (int s = 0; s < p.num_spans; ++s) {
    const DenseSpan& span = p.spans[s];
    for (int64_t r = 0; r < span.tokens; ++r, ++t) {
      float total = 0.0f;
      for (int h = 0; h < p.group; ++h) {
        if (std::isinf(lse[h])) continue;  // empty cache: nothing attended
        float dot = 0.0f;
        for (int j = 0; j < d; ++j) {
          dot += p.q[h * d + j] * LoadAsFloat(p.dtype, span.k, static_cast<size_t>(r) * d + j);
        }
        // A probability: at most 1. This dot product rounds differently from the kernel's
        // score, and with extreme (finite) inputs it can overflow where the kernel's did not:
        // inf - lse gives inf, inf - inf NaN. Clamped, the mass stays finite, so one extreme
        // step cannot poison the layer's output-aware scoring (or its snapshot) for good.
        float pr = std::exp(dot * p.scale - lse[h]);
        if (std::isnan(pr)) pr = 0.0f;
        total += std::min(pr, 1.0f);
      }
      mass[t] += total;
    }
  }
}

}  // namespace sparsekv::kernels
