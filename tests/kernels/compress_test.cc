// Compression properties over random shapes: exact keep count, the kept set is the top-k by
// score with ties to the lower index, decompression restores kept values exactly, and the
// byte geometry matches DESIGN.md section 2.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/compressed_format.h"

namespace sparsekv::kernels {
namespace {

TEST(KeepCountTest, MatchesDesignFormula) {
  EXPECT_EQ(KeepCount(0.5, 128), 64);  // not 63: the reference code's off-by-one
  EXPECT_EQ(KeepCount(0.7, 128), 38);
  EXPECT_EQ(KeepCount(0.7, 64), 19);
  EXPECT_EQ(KeepCount(0.7, 8), 2);
  EXPECT_EQ(KeepCount(0.7, 32), 10);
  EXPECT_EQ(KeepCount(0.999, 16), 1);  // never empty
  EXPECT_EQ(KeepCount(0.0, 16), 16);
}

TEST(SectionFormatTest, BytesMatchDesignTable) {
  // s = 0.7, D = 128, fp16: 16 B bitmap + 38 * 2 B = 92 B per token row (0.359 of dense).
  SectionFormat f = MakeSectionFormat(SectionKind::kPerToken, 0.7, 128, 256, 32, DType::kFloat16);
  EXPECT_EQ(f.bytes(), 256u * 92);
  f = MakeSectionFormat(SectionKind::kPerToken, 0.5, 128, 256, 32, DType::kFloat16);
  EXPECT_EQ(f.bytes(), 256u * 144);
  // Per-channel, G = 32: 4 B bitmap + 10 * 2 B per channel per group.
  f = MakeSectionFormat(SectionKind::kPerChannel, 0.7, 128, 256, 32, DType::kFloat16);
  EXPECT_EQ(f.bytes(), (256u / 32) * 128 * (4 + 20));
  f = MakeSectionFormat(SectionKind::kPerChannel, 0.0, 128, 256, 32, DType::kFloat16);
  EXPECT_EQ(f.kind, SectionKind::kDense);
  EXPECT_EQ(f.bytes(), 256u * 128 * 2);
}

struct Case {
  SectionKind kind;
  double sparsity;
  int head_dim;
  int tokens;
  int group;
  DType dtype;
  bool weighted;
};

class CompressTest : public ::testing::TestWithParam<Case> {};

TEST_P(CompressTest, KeepsExactlyTopKByScoreAndRoundTrips) {
  const Case c = GetParam();
  const SectionFormat f =
      MakeSectionFormat(c.kind, c.sparsity, c.head_dim, c.tokens, c.group, c.dtype);
  std::mt19937 rng(c.head_dim * 131 + c.tokens + static_cast<int>(c.sparsity * 100));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const size_t elems = static_cast<size_t>(c.tokens) * c.head_dim;
  std::vector<uint8_t> x(elems * DTypeSize(c.dtype));
  for (size_t i = 0; i < elems; ++i) {
    // Every 17th element repeats its neighbour's magnitude to exercise tie-breaking.
    float v = dist(rng);
    if (i % 17 == 5) v = -LoadAsFloat(c.dtype, x.data(), i - 1);
    StoreFromFloat(c.dtype, x.data(), i, v);
  }
  std::vector<float> tw(c.tokens), cw(c.head_dim);
  std::uniform_real_distribution<float> w(0.0f, 2.0f);
  for (float& v : tw) v = w(rng);
  for (float& v : cw) v = w(rng);
  const float* tw_p = c.weighted ? tw.data() : nullptr;
  const float* cw_p = c.weighted ? cw.data() : nullptr;

  std::vector<uint8_t> packed(f.bytes());
  CompressSection(f, x.data(), tw_p, cw_p, packed.data());
  std::vector<uint8_t> back(x.size());
  DecompressSection(f, packed.data(), back.data());

  if (f.kind == SectionKind::kDense) {
    EXPECT_EQ(packed, x);
    EXPECT_EQ(back, x);
    return;
  }
  const int n = f.n();
  for (int v = 0; v < f.vectors(); ++v) {
    const bool per_token = f.kind == SectionKind::kPerToken;
    const int t0 = per_token ? v : (v / c.head_dim) * c.group;
    const int j0 = per_token ? 0 : v % c.head_dim;
    auto idx = [&](int i) {
      return per_token ? static_cast<size_t>(t0) * c.head_dim + i
                       : static_cast<size_t>(t0 + i) * c.head_dim + j0;
    };
    std::vector<std::pair<float, int>> ranked;
    for (int i = 0; i < n; ++i) {
      const int t = per_token ? t0 : t0 + i;
      const int j = per_token ? i : j0;
      float s = std::fabs(LoadAsFloat(c.dtype, x.data(), idx(i)));
      if (c.weighted) s = s * tw[t] * cw[j];
      ranked.push_back({s, i});
    }
    std::stable_sort(ranked.begin(), ranked.end(),
                     [](auto a, auto b) { return a.first > b.first; });
    std::vector<bool> want(n, false);
    for (int r = 0; r < f.k; ++r) want[ranked[r].second] = true;
    int kept = 0;
    for (int i = 0; i < n; ++i) {
      const bool got = BitmapTest(packed.data(), n, v, i);
      kept += got;
      ASSERT_EQ(got, want[i]) << "vector " << v << " element " << i;
      const float orig = LoadAsFloat(c.dtype, x.data(), idx(i));
      const float rt = LoadAsFloat(c.dtype, back.data(), idx(i));
      ASSERT_EQ(rt, got ? orig : 0.0f);
    }
    ASSERT_EQ(kept, f.k);
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (int d : {64, 128, 256}) {
    for (double s : {0.5, 0.7}) {
      cases.push_back({SectionKind::kPerToken, s, d, 33, 32, DType::kFloat16, false});
      cases.push_back({SectionKind::kPerToken, s, d, 64, 32, DType::kBFloat16, true});
      cases.push_back({SectionKind::kPerChannel, s, d, 64, 32, DType::kFloat16, true});
      cases.push_back({SectionKind::kPerChannel, s, d, 128, 64, DType::kFloat32, false});
    }
  }
  cases.push_back({SectionKind::kPerToken, 0.3, 8, 5, 32, DType::kFloat16, false});
  cases.push_back({SectionKind::kDense, 0.0, 64, 7, 32, DType::kFloat16, false});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CompressTest, ::testing::ValuesIn(Cases()));

TEST(SectionBitmapsValidTest, AcceptsWhatCompressionWritesAndRejectsDamage) {
  std::mt19937 rng(9);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (SectionKind kind : {SectionKind::kPerToken, SectionKind::kPerChannel}) {
    // head_dim 40: per-token bitmaps of 8 bytes whose bits 40..63 must stay clear.
    const SectionFormat f = MakeSectionFormat(kind, 0.6, 40, 64, 32, DType::kFloat32);
    std::vector<float> x(64 * 40);
    for (float& v : x) v = dist(rng);
    std::vector<uint8_t> sec(f.bytes());
    CompressSection(f, x.data(), nullptr, nullptr, sec.data());
    EXPECT_TRUE(SectionBitmapsValid(f, sec.data()));
    std::vector<uint8_t> bad = sec;
    bad[3] ^= 0x10;  // one element more or fewer in vector 0
    EXPECT_FALSE(SectionBitmapsValid(f, bad.data()));
    if (kind == SectionKind::kPerToken) {
      bad = sec;
      bad[6] |= 0x01;                                    // bit 48: past n = 40
      bad[0] ^= bad[0] & static_cast<uint8_t>(-bad[0]);  // clear one kept bit: count stays k
      EXPECT_FALSE(SectionBitmapsValid(f, bad.data()));
    }
  }
  const SectionFormat dense =
      MakeSectionFormat(SectionKind::kPerToken, 0.0, 40, 8, 32, DType::kFloat16);
  std::vector<uint8_t> any(dense.bytes(), 0xff);
  EXPECT_TRUE(SectionBitmapsValid(dense, any.data()));
}

}  // namespace
}  // namespace sparsekv::kernels
