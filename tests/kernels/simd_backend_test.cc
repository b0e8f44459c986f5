// Forces each CPU variant explicitly (by name) and checks it against the float64 reference on
// the SIMD kernels' edge paths: head_dim not a multiple of 8/16/32, k not a multiple of
// anything, odd chunk sizes (33 tokens), per-channel group 64, blocks that span chunks, and
// a chunk size above the 64-token softmax block. Also checks that the variant list is ordered
// slowest first and names what this CPU supports.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cpu_features.h"
#include "tests/kernels/split_decode.h"

namespace sparsekv::kernels {
namespace {

const Backend* FindVariant(const std::string& name) {
  for (const Backend* b : CpuBackendVariants()) {
    if (b->variant() == name) return b;
  }
  return nullptr;
}

struct EdgeCase {
  int group, head_dim, chunks, chunk_tokens, cg;
  int64_t dense_tokens;
  SectionKind k_kind, v_kind;
  double sparsity;
  DType dtype;
  // Multiplies q: large gains make scores span hundreds, so most exp() terms underflow (the
  // AVX-512 exp returns 0 below -87.3 rather than a denormal).
  float q_gain = 1.0f;
};

void RunCase(const Backend& b, const EdgeCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const size_t es = DTypeSize(c.dtype);
  float max_v = 0.0f;
  auto rows = [&](int64_t n) {
    std::vector<uint8_t> out(static_cast<size_t>(n) * c.head_dim * es);
    for (size_t i = 0; i < static_cast<size_t>(n) * c.head_dim; ++i) {
      StoreFromFloat(c.dtype, out.data(), i, dist(rng));
      max_v = std::fmax(max_v, std::fabs(LoadAsFloat(c.dtype, out.data(), i)));
    }
    return out;
  };
  DecodeAttentionParams p;
  p.group = c.group;
  p.head_dim = c.head_dim;
  p.dtype = c.dtype;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.k_format = MakeSectionFormat(c.k_kind, c.sparsity, c.head_dim, c.chunk_tokens, c.cg, c.dtype);
  p.v_format = MakeSectionFormat(c.v_kind, c.sparsity, c.head_dim, c.chunk_tokens, c.cg, c.dtype);
  // Each section in its own exact-size allocation, so ASan catches any over-read.
  std::vector<std::vector<uint8_t>> secs;
  std::vector<ChunkRef> refs;
  for (int i = 0; i < c.chunks; ++i) {
    std::vector<uint8_t> kr = rows(c.chunk_tokens), vr = rows(c.chunk_tokens);
    secs.emplace_back(p.k_format.bytes());
    CompressSection(p.k_format, kr.data(), nullptr, nullptr, secs.back().data());
    secs.emplace_back(p.v_format.bytes());
    CompressSection(p.v_format, vr.data(), nullptr, nullptr, secs.back().data());
  }
  for (int i = 0; i < c.chunks; ++i) refs.push_back({secs[2 * i].data(), secs[2 * i + 1].data()});
  std::vector<uint8_t> kd = rows(c.dense_tokens), vd = rows(c.dense_tokens);
  DenseSpan span{kd.data(), vd.data(), c.dense_tokens};
  std::vector<float> q(static_cast<size_t>(c.group) * c.head_dim);
  for (float& x : q) x = c.q_gain * dist(rng);
  p.q = q.data();
  p.chunks = refs.data();
  p.num_chunks = c.chunks;
  p.spans = &span;
  p.num_spans = 1;

  std::vector<float> want(q.size()), want_lse(c.group), got(q.size()), lse(c.group);
  DecodeAttentionParams ref = p;
  ref.out = want.data();
  ref.lse = want_lse.data();
  ReferenceDecodeAttention(ref);
  const float tol = 5e-5f * std::fmax(max_v, 1.0f);
  for (int splits : {1, 2, 5}) {
    p.out = got.data();
    p.lse = lse.data();
    SplitDecode(b, p, splits);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], tol) << b.variant() << " splits " << splits << " i " << i;
    }
    for (int h = 0; h < c.group; ++h) {
      if (std::isinf(want_lse[h])) {
        EXPECT_EQ(lse[h], want_lse[h]);
      } else {
        EXPECT_NEAR(lse[h], want_lse[h], 5e-5f * std::fmax(1.0f, std::fabs(want_lse[h])));
      }
    }
  }
}

std::vector<EdgeCase> EdgeCases() {
  const SectionKind T = SectionKind::kPerToken, C = SectionKind::kPerChannel,
                    D = SectionKind::kDense;
  const DType F16 = DType::kFloat16, BF16 = DType::kBFloat16, F32 = DType::kFloat32;
  return {
      {4, 100, 3, 33, 32, 17, T, T, 0.7, F16},          // D % 32 = 4, k = 30, chunk 33
      {3, 40, 2, 33, 32, 9, T, T, 0.5, BF16},           // D % 16 = 8
      {2, 12, 2, 65, 32, 3, T, T, 0.7, F32},            // D < 16, chunk 65 (two blocks)
      {4, 128, 2, 64, 32, 5, T, T, 0.5, F32},           // fp32 rows, unrolled D = 128
      {2, 64, 1, 33, 32, 3, T, D, 0.7, F32},            // fp32, dense V rows read in place
      {5, 136, 2, 130, 32, 70, T, T, 0.63, F16},        // group 5 = tiles 4 + 1, span > one block
      {6, 128, 2, 96, 32, 1, T, T, 0.7, F16},           // group 6 = 4 + 2
      {12, 64, 1, 64, 32, 2, T, T, 0.7, BF16},          // group 12 = 8 + 4
      {16, 32, 1, 40, 32, 2, T, T, 0.5, F16},           // group 16 = 8 + 8
      {4, 128, 2, 128, 64, 5, C, C, 0.7, F16},          // per-channel group 64
      {4, 128, 2, 128, 64, 5, C, T, 0.5, BF16},         // per-channel group 64 with per-token V
      {3, 72, 2, 64, 32, 5, T, C, 0.7, F32},            // fp32 values, per-channel V, D % 32 = 8
      {4, 128, 1, 96, 48, 5, C, C, 0.7, F16},           // per-channel group 48: generic fallback
      {4, 24, 2, 64, 32, 5, C, D, 0.7, F16},            // D < 32 per-channel
      {8, 128, 3, 256, 32, 0, D, D, 0.0, F16},          // all dense sections
      {1, 256, 2, 64, 32, 300, T, T, 0.9, BF16},        // k = 26 of 256, long span
      {17, 64, 2, 64, 32, 7, T, T, 0.7, F16},           // group 17: softmax over 16 + 1 heads
      {4, 128, 2, 128, 32, 40, T, T, 0.7, F16, 40.0f},  // peaked: scores ~N(0, 40^2)
      {3, 256, 1, 96, 32, 9, T, T, 0.5, F16, 200.0f},   // peaked, D = 256 (8 words)
  };
}

TEST(SimdBackendTest, VariantsAreOrderedAndMatchCpuFeatures) {
  const std::vector<const Backend*> v = CpuBackendVariants();
  ASSERT_FALSE(v.empty());
  EXPECT_EQ(v.front()->variant(), "portable");
  EXPECT_EQ(&CpuBackend(), v.back());
  const CpuFeatures& f = GetCpuFeatures();
  EXPECT_EQ(FindVariant("avx2") != nullptr, f.avx2);
  EXPECT_EQ(FindVariant("avx512") != nullptr, f.avx512);
  const std::string summary = CpuFeaturesSummary();
  EXPECT_NE(summary.find("variant " + CpuBackend().variant()), std::string::npos) << summary;
}

class ForcedVariantTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ForcedVariantTest, MatchesReferenceOnEdgeShapes) {
  const Backend* b = FindVariant(GetParam());
  if (b == nullptr) GTEST_SKIP() << GetParam() << " not supported by this CPU";
  uint32_t seed = 7;
  for (const EdgeCase& c : EdgeCases()) {
    SCOPED_TRACE("group " + std::to_string(c.group) + " head_dim " + std::to_string(c.head_dim) +
                 " chunk " + std::to_string(c.chunk_tokens) + " kinds " +
                 std::to_string(static_cast<int>(c.k_kind)) +
                 std::to_string(static_cast<int>(c.v_kind)) + " " + DTypeName(c.dtype));
    RunCase(*b, c, seed++);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, ForcedVariantTest,
                         ::testing::Values("portable", "avx2", "avx512"),
                         [](const auto& info) { return info.param; });

TEST(SimdBackendTest, NanInQueryPropagates) {
  for (const Backend* b : CpuBackendVariants()) {
    EdgeCase c{
        4, 64, 1, 64, 32, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, DType::kFloat16};
    std::vector<uint8_t> sec_k(MakeSectionFormat(c.k_kind, 0.5, 64, 64, 32, c.dtype).bytes());
    std::vector<uint8_t> rows(64 * 64 * 2);
    for (size_t i = 0; i < 64 * 64; ++i) StoreFromFloat(c.dtype, rows.data(), i, 0.01f * (i % 17));
    DecodeAttentionParams p;
    p.group = 4;
    p.head_dim = 64;
    p.k_format = p.v_format = MakeSectionFormat(c.k_kind, 0.5, 64, 64, 32, c.dtype);
    CompressSection(p.k_format, rows.data(), nullptr, nullptr, sec_k.data());
    ChunkRef ref{sec_k.data(), sec_k.data()};
    std::vector<float> q(4 * 64, 0.1f), out(4 * 64), lse(4);
    q[64 + 5] = NAN;  // head 1 only
    p.q = q.data();
    p.chunks = &ref;
    p.num_chunks = 1;
    p.out = out.data();
    p.lse = lse.data();
    DecodeAttention(*b, p);
    EXPECT_TRUE(std::isnan(out[64])) << b->variant();
    EXPECT_FALSE(std::isnan(out[0])) << b->variant();
  }
}

}  // namespace
}  // namespace sparsekv::kernels
