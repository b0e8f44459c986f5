// Scalar float64 reference of decode attention (the test oracle).
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/attention.h"

namespace sparsekv::kernels {

void ReferenceDecodeAttention(const DecodeAttentionParams& p) {
  const int d = p.head_dim;
  int64_t total = 0;
  for (int s = 0; s < p.num_spans; ++s) total += p.spans[s].tokens;
  std::vector<double> scores(static_cast<size_t>(total));
  std::vector<double> acc(static_cast<size_t>(d));
  for (int h = 0; h < p.group; ++h) {
    const float* q = p.q + static_cast<size_t>(h) * d;
    double max_score = -std::numeric_limits<double>::infinity();
    size_t t = 0;
    for (int s = 0; s < p.num_spans; ++s) {
      const DenseSpan& span = p.spans[s];
      for (int64_t r = 0; r < span.tokens; ++r, ++t) {
        double dot = 0.0;
        for (int j = 0; j < d; ++j) {
          dot += static_cast<double>(q[j]) *
                 static_cast<double>(LoadAsFloat(p.dtype, span.k, static_cast<size_t>(r) * d + j));
        }
        scores[t] = dot * static_cast<double>(p.scale);
        if (scores[t] > max_score) max_score = scores[t];
      }
    }
    float* out = p.out + static_cast<size_t>(h) * d;
    if (total == 0) {
      for (int j = 0; j < d; ++j) out[j] = 0.0f;
      if (p.lse) p.lse[h] = -std::numeric_limits<float>::infinity();
      continue;
    }
    double denom = 0.0;
    for (double& a : acc) a = 0.0;
    t = 0;
    for (int s = 0; s < p.num_spans; ++s) {
      const DenseSpan& span = p.spans[s];
      for (int64_t r = 0; r < span.tokens; ++r, ++t) {
        const double w = std::exp(scores[t] - max_score);
        denom += w;
        for (int j = 0; j < d; ++j) {
          acc[j] += w * LoadAsFloat(p.dtype, span.v, static_cast<size_t>(r) * d + j);
        }
      }
    }
    for (int j = 0; j < d; ++j) out[j] = static_cast<float>(acc[j] / denom);
    if (p.lse) p.lse[h] = static_cast<float>(max_score + std::log(denom));
  }
}

}  // namespace sparsekv::kernels
