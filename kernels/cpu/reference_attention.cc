// Scalar float64 reference of decode attention (the test oracle).
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/attention.h"

namespace sparsekv::kernels {
namespace {

// All rows of the cache as float64, [tokens, head_dim] for K and V, chunks first.
void GatherRows(const DecodeAttentionParams& p, std::vector<double>* k, std::vector<double>* v) {
  const int d = p.head_dim;
  std::vector<uint8_t> kbuf, vbuf;
  for (int c = 0; c < p.num_chunks; ++c) {
    const int tokens = p.k_format.tokens;
    kbuf.resize(static_cast<size_t>(tokens) * d * DTypeSize(p.dtype));
    vbuf.resize(kbuf.size());
    DecompressSection(p.k_format, p.chunks[c].k, kbuf.data());
    DecompressSection(p.v_format, p.chunks[c].v, vbuf.data());
    for (size_t i = 0; i < static_cast<size_t>(tokens) * d; ++i) {
      k->push_back(LoadAsFloat(p.dtype, kbuf.data(), i));
      v->push_back(LoadAsFloat(p.dtype, vbuf.data(), i));
    }
  }
  for (int s = 0; s < p.num_spans; ++s) {
    for (size_t i = 0; i < static_cast<size_t>(p.spans[s].tokens) * d; ++i) {
      k->push_back(LoadAsFloat(p.dtype, p.spans[s].k, i));
      v->push_back(LoadAsFloat(p.dtype, p.spans[s].v, i));
    }
  }
}

}  // namespace

void ReferenceDecodeAttention(const DecodeAttentionParams& p) {
  const int d = p.head_dim;
  std::vector<double> k, v;
  GatherRows(p, &k, &v);
  const size_t total = k.size() / d;
  std::vector<double> scores(total);
  for (int h = 0; h < p.group; ++h) {
    const float* q = p.q + static_cast<size_t>(h) * d;
    float* out = p.out + static_cast<size_t>(h) * d;
    if (total == 0) {
      for (int j = 0; j < d; ++j) out[j] = 0.0f;
      if (p.lse) p.lse[h] = -std::numeric_limits<float>::infinity();
      continue;
    }
    double max_score = -std::numeric_limits<double>::infinity();
    for (size_t t = 0; t < total; ++t) {
      double dot = 0.0;
      for (int j = 0; j < d; ++j) dot += static_cast<double>(q[j]) * k[t * d + j];
      scores[t] = dot * static_cast<double>(p.scale);
      max_score = std::fmax(max_score, scores[t]);
    }
    double denom = 0.0;
    std::vector<double> acc(d, 0.0);
    for (size_t t = 0; t < total; ++t) {
      const double w = std::exp(scores[t] - max_score);
      denom += w;
      for (int j = 0; j < d; ++j) acc[j] += w * v[t * d + j];
    }
    for (int j = 0; j < d; ++j) out[j] = static_cast<float>(acc[j] / denom);
    if (p.lse) p.lse[h] = static_cast<float>(max_score + std::log(denom));
  }
}

}  // namespace sparsekv::kernels
