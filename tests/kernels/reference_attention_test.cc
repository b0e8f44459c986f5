// The scalar reference against a naive float64 softmax written independently here, over a
// ladder of cache lengths, GQA group sizes, head dims, dtypes and span splits.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/attention.h"
#include "kernels/backend.h"

namespace sparsekv::kernels {
namespace {

struct Case {
  int group;
  int head_dim;
  int64_t tokens;
  DType dtype;
};

// Random K/V stored in `dtype`; returns them also as the float values actually stored.
std::vector<uint8_t> RandomStored(DType dtype, size_t n, std::mt19937* rng,
                                  std::vector<double>* values) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint8_t> buf(n * DTypeSize(dtype));
  values->resize(n);
  for (size_t i = 0; i < n; ++i) {
    StoreFromFloat(dtype, buf.data(), i, dist(*rng));
    (*values)[i] = LoadAsFloat(dtype, buf.data(), i);
  }
  return buf;
}

void NaiveAttention(const std::vector<float>& q, const std::vector<double>& k,
                    const std::vector<double>& v, int group, int d, int64_t tokens, double scale,
                    std::vector<double>* out, std::vector<double>* lse) {
  out->assign(static_cast<size_t>(group) * d, 0.0);
  lse->assign(group, 0.0);
  for (int h = 0; h < group; ++h) {
    std::vector<double> s(tokens);
    double m = -INFINITY;
    for (int64_t t = 0; t < tokens; ++t) {
      double dot = 0;
      for (int j = 0; j < d; ++j) dot += q[h * d + j] * k[t * d + j];
      s[t] = dot * scale;
      m = std::max(m, s[t]);
    }
    double z = 0;
    for (int64_t t = 0; t < tokens; ++t) z += std::exp(s[t] - m);
    for (int64_t t = 0; t < tokens; ++t) {
      const double p = std::exp(s[t] - m) / z;
      for (int j = 0; j < d; ++j) (*out)[h * d + j] += p * v[t * d + j];
    }
    (*lse)[h] = m + std::log(z);
  }
}

class ReferenceAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(ReferenceAttentionTest, MatchesNaiveFloat64) {
  const Case c = GetParam();
  std::mt19937 rng(1234 + c.tokens * 7 + c.head_dim + c.group);
  std::vector<double> k, v;
  const size_t n = static_cast<size_t>(c.tokens) * c.head_dim;
  std::vector<uint8_t> kb = RandomStored(c.dtype, n, &rng, &k);
  std::vector<uint8_t> vb = RandomStored(c.dtype, n, &rng, &v);
  std::vector<float> q(static_cast<size_t>(c.group) * c.head_dim);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& x : q) x = dist(rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  // Split the cache into up to three spans to exercise span iteration.
  const size_t row = c.head_dim * DTypeSize(c.dtype);
  const int64_t a = c.tokens / 3, b = (2 * c.tokens) / 3;
  DenseSpan spans[3] = {{kb.data(), vb.data(), a},
                        {kb.data() + a * row, vb.data() + a * row, b - a},
                        {kb.data() + b * row, vb.data() + b * row, c.tokens - b}};
  std::vector<float> out(q.size()), lse(c.group);
  DecodeAttentionParams p;
  p.q = q.data();
  p.group = c.group;
  p.head_dim = c.head_dim;
  p.dtype = c.dtype;
  p.scale = scale;
  p.spans = spans;
  p.num_spans = 3;
  p.out = out.data();
  p.lse = lse.data();
  ReferenceDecodeAttention(p);

  std::vector<double> want, want_lse;
  NaiveAttention(q, k, v, c.group, c.head_dim, c.tokens, scale, &want, &want_lse);
  // Both sides use float64 on the same stored values; only the final cast to fp32 differs, so
  // the error is a few fp32 ulps of the output magnitude (|out| <= max|V| ~ 4).
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-5) << i;
  for (int h = 0; h < c.group; ++h) EXPECT_NEAR(lse[h], want_lse[h], 1e-5);
}

std::vector<Case> Ladder() {
  std::vector<Case> cases;
  for (int64_t tokens : {1, 3, 9, 27, 81, 129, 257, 1000}) {
    cases.push_back({4, 64, tokens, DType::kFloat16});
    cases.push_back({1, 128, tokens, DType::kBFloat16});
  }
  cases.push_back({8, 256, 81, DType::kFloat32});
  cases.push_back({3, 8, 33, DType::kFloat16});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Ladder, ReferenceAttentionTest, ::testing::ValuesIn(Ladder()));

TEST(ReferenceAttentionEdgeTest, EmptyCacheGivesZeroOutputAndMinusInfinityLse) {
  std::vector<float> q(8, 1.0f), out(8, 5.0f), lse(2, 0.0f);
  DecodeAttentionParams p;
  p.q = q.data();
  p.group = 2;
  p.head_dim = 4;
  p.out = out.data();
  p.lse = lse.data();
  ReferenceDecodeAttention(p);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

TEST(ReferenceAttentionEdgeTest, LargeScoresDoNotOverflow) {
  // Scores of ~1e4 would overflow exp() without the max subtraction.
  std::vector<float> q = {100.0f, 100.0f};
  std::vector<float> k = {50.0f, 50.0f, 49.0f, 49.0f};
  std::vector<float> v = {1.0f, 2.0f, 3.0f, 4.0f};
  DenseSpan span{k.data(), v.data(), 2};
  std::vector<float> out(2), lse(1);
  DecodeAttentionParams p;
  p.q = q.data();
  p.group = 1;
  p.head_dim = 2;
  p.dtype = DType::kFloat32;
  p.spans = &span;
  p.num_spans = 1;
  p.out = out.data();
  p.lse = lse.data();
  ReferenceDecodeAttention(p);
  // Second token's weight is exp(-200) relative: output equals V[0].
  EXPECT_NEAR(out[0], 1.0f, 1e-6);
  EXPECT_NEAR(out[1], 2.0f, 1e-6);
  EXPECT_NEAR(lse[0], 10000.0f, 1e-2);
}

}  // namespace
}  // namespace sparsekv::kernels
