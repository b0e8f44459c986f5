// CompressRows against a scalar re-implementation of its contract (core/compressor.h,
// kernels/compressed_format.h): every vector keeps the k elements with the highest
//   score(t, j) = w_t * u_j * |x[t, j]|
// ties to the lower index, where u_j = sqrt(query energy of channel j) for K per-token
// output-aware, w_t = token t's attention mass for per-channel output-aware, and both are 1
// for magnitude scoring, for V per-token, and where the statistic is missing (no query seen,
// no mass on the chunk) -- which the chunk's k_output_aware()/v_output_aware() report. Kept
// values decompress bit-exactly to the input rows, pruned ones to +0.
#include "core/compressor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/compressed_format.h"

namespace sparsekv {
namespace {

using kernels::SectionFormat;
using kernels::SectionKind;

constexpr int kGroup = 32;

// One layer's rows to compress, in dense blocks (the first starting mid-block, as after an
// earlier chunk was taken), plus their values per head for the reference.
struct Rows {
  Layout layout;
  int tokens = 0;
  // [kv_heads][tokens * head_dim] rows of each head in the storage dtype, and as floats.
  std::vector<std::vector<uint8_t>> k_bytes, v_bytes;
  std::vector<std::vector<float>> k, v;
  CompressionInput in;
};

enum class Values { kNormal, kFewLevels };

// A value of `dtype` that is never 0: N(0, 1), or one of +-{0.5, 1, 1.5, 2, 3} (exact in every
// dtype, so magnitudes tie often).
float Draw(Values values, std::mt19937* rng) {
  if (values == Values::kFewLevels) {
    static const float kLevels[] = {0.5f, 1.0f, 1.5f, 2.0f, 3.0f};
    const float x = kLevels[std::uniform_int_distribution<int>(0, 4)(*rng)];
    return std::uniform_int_distribution<int>(0, 1)(*rng) ? x : -x;
  }
  std::normal_distribution<float> dist(0.0f, 1.0f);
  float x = 0.0f;
  while (std::fabs(x) < 1e-3f) x = dist(*rng);
  return x;
}

Rows MakeRows(const Layout& layout, int tokens, int first_begin, uint32_t seed,
              Values values = Values::kNormal) {
  std::mt19937 rng(seed);
  Rows r;
  r.layout = layout;
  r.tokens = tokens;
  const int heads = layout.num_kv_heads, d = layout.head_dim;
  const size_t es = kernels::DTypeSize(layout.dtype);
  r.k_bytes.assign(heads, std::vector<uint8_t>(static_cast<size_t>(tokens) * d * es));
  r.v_bytes = r.k_bytes;
  r.k.assign(heads, std::vector<float>(static_cast<size_t>(tokens) * d));
  r.v = r.k;
  r.in.tokens = tokens;
  int t = 0;
  int begin = first_begin;
  while (t < tokens) {
    auto block = std::make_shared<DenseBlock>(heads, d, layout.dtype);
    const int end = std::min(DenseBlock::kRows, begin + (tokens - t));
    // Rows before `begin` belong to an earlier chunk: fill them with values far outside the
    // drawn range, so that gathering one of them shows up as a mismatch.
    for (int row = 0; row < begin; ++row) {
      for (int h = 0; h < heads; ++h) {
        for (int j = 0; j < d; ++j) {
          kernels::StoreFromFloat(layout.dtype, block->k_row(h, row), j, 100.0f);
          kernels::StoreFromFloat(layout.dtype, block->v_row(h, row), j, -100.0f);
        }
      }
    }
    for (int row = begin; row < end; ++row, ++t) {
      for (int h = 0; h < heads; ++h) {
        for (int j = 0; j < d; ++j) {
          const size_t e = static_cast<size_t>(t) * d + j;
          kernels::StoreFromFloat(layout.dtype, block->k_row(h, row), j, Draw(values, &rng));
          kernels::StoreFromFloat(layout.dtype, block->v_row(h, row), j, Draw(values, &rng));
          r.k[h][e] = kernels::LoadAsFloat(layout.dtype, block->k_row(h, row), j);
          r.v[h][e] = kernels::LoadAsFloat(layout.dtype, block->v_row(h, row), j);
        }
        std::memcpy(r.k_bytes[h].data() + static_cast<size_t>(t) * d * es, block->k_row(h, row),
                    d * es);
        std::memcpy(r.v_bytes[h].data() + static_cast<size_t>(t) * d * es, block->v_row(h, row),
                    d * es);
      }
    }
    block->begin = begin;
    block->rows = end;
    r.in.rows.push_back({block, begin, end});
    begin = 0;
  }
  return r;
}

// Scoring statistics with a wide spread (so that weighting changes the ranking): query energy
// [kv_heads, head_dim] and attention mass [kv_heads, tokens], all > 0.
void AddStatistics(Rows* r, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> log_w(0.0f, 1.5f);
  const int heads = r->layout.num_kv_heads;
  r->in.q_energy.resize(static_cast<size_t>(heads) * r->layout.head_dim);
  for (float& e : r->in.q_energy) e = std::exp(2.0f * log_w(rng));
  r->in.mass.resize(static_cast<size_t>(heads) * r->tokens);
  for (float& m : r->in.mass) m = std::exp(log_w(rng)) / r->tokens;
  r->in.queries_seen = true;
}

// The kept set of every vector of a section of `x` ([tokens, head_dim]) by the documented
// score, ties to the lower index: [vectors][n].
std::vector<std::vector<bool>> ReferenceKeep(const SectionFormat& f, const std::vector<float>& x,
                                             const std::vector<float>& token_w,
                                             const std::vector<float>& channel_w) {
  const int d = f.head_dim, n = f.n();
  const bool per_token = f.kind == SectionKind::kPerToken;
  std::vector<std::vector<bool>> keep(f.vectors(), std::vector<bool>(n, false));
  for (int v = 0; v < f.vectors(); ++v) {
    std::vector<float> score(n);
    for (int i = 0; i < n; ++i) {
      const int t = per_token ? v : (v / d) * f.group + i;
      const int j = per_token ? i : v % d;
      const float tw = token_w.empty() ? 1.0f : token_w[t];
      const float cw = channel_w.empty() ? 1.0f : channel_w[j];
      score[i] = std::fabs(x[static_cast<size_t>(t) * d + j]) * tw * cw;
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
    for (int i = 0; i < f.k; ++i) keep[v][order[i]] = true;
  }
  return keep;
}

struct SectionCheck {
  int mismatched_vectors = 0;      // kept set differs from the reference
  int value_errors = 0;            // decompressed element differs from input (kept) or +0
  int differs_from_magnitude = 0;  // reference itself differs from magnitude ranking
};

// Checks one compressed section against the reference with the given weights.
SectionCheck CheckSection(const SectionFormat& f, const uint8_t* section,
                          const std::vector<float>& x, const std::vector<uint8_t>& x_bytes,
                          const std::vector<float>& token_w, const std::vector<float>& channel_w) {
  SectionCheck c;
  const int d = f.head_dim, n = f.n();
  const size_t es = kernels::DTypeSize(f.dtype);
  const bool per_token = f.kind == SectionKind::kPerToken;
  const auto want = ReferenceKeep(f, x, token_w, channel_w);
  const auto magnitude = ReferenceKeep(f, x, {}, {});
  std::vector<uint8_t> out(x_bytes.size(), 0xAB);
  kernels::DecompressSection(f, section, out.data());
  const std::vector<uint8_t> zero(es, 0);
  for (int v = 0; v < f.vectors(); ++v) {
    bool same = true;
    for (int i = 0; i < n; ++i) {
      const bool kept = kernels::BitmapTest(section, n, v, i);
      same &= kept == want[v][i];
      const int t = per_token ? v : (v / d) * f.group + i;
      const int j = per_token ? i : v % d;
      const size_t off = (static_cast<size_t>(t) * d + j) * es;
      const uint8_t* expect = kept ? x_bytes.data() + off : zero.data();
      c.value_errors += std::memcmp(out.data() + off, expect, es) != 0;
    }
    c.mismatched_vectors += !same;
    c.differs_from_magnitude += want[v] != magnitude[v];
  }
  return c;
}

std::vector<float> UWeights(const Rows& r, int h) {
  const int d = r.layout.head_dim;
  std::vector<float> u(d);
  for (int j = 0; j < d; ++j) u[j] = std::sqrt(r.in.q_energy[static_cast<size_t>(h) * d + j]);
  return u;
}

std::vector<float> MassWeights(const Rows& r, int h) {
  return std::vector<float>(r.in.mass.begin() + static_cast<ptrdiff_t>(h) * r.tokens,
                            r.in.mass.begin() + static_cast<ptrdiff_t>(h + 1) * r.tokens);
}

Policy MakePolicy(double k_sparsity, PruneDirection kd, double v_sparsity, PruneDirection vd,
                  Scoring scoring) {
  Policy p;
  p.k.sparsity = static_cast<float>(k_sparsity);
  p.v.sparsity = static_cast<float>(v_sparsity);
  p.k.direction = kd;
  p.v.direction = vd;
  p.k.scoring = p.v.scoring = scoring;
  p.group_tokens = kGroup;
  return p;
}

const char* Name(PruneDirection d) {
  return d == PruneDirection::kPerToken ? "per_token" : "per_channel";
}

// ---------------------------------------------------------------------------------------------

struct RankCase {
  DType dtype;
  PruneDirection k_dir;
  PruneDirection v_dir;
  Scoring scoring;
};

std::string RankCaseString(const RankCase& c) {
  return std::string(kernels::DTypeName(c.dtype)) + "_K" + Name(c.k_dir) + "_V" + Name(c.v_dir) +
         (c.scoring == Scoring::kMagnitude ? "_magnitude" : "_output_aware");
}

void PrintTo(const RankCase& c, std::ostream* os) { *os << RankCaseString(c); }

std::string RankCaseName(const ::testing::TestParamInfo<RankCase>& info) {
  return RankCaseString(info.param);
}

class CompressRowsRankTest : public ::testing::TestWithParam<RankCase> {};

// With queries seen and mass on every token: the kept set of every vector of every head is the
// reference's with the weights the policy calls for.
TEST_P(CompressRowsRankTest, KeepsTopKByTheDocumentedScore) {
  const RankCase& c = GetParam();
  const Layout layout{1, 3, 6, 64, c.dtype};
  const Policy policy = MakePolicy(0.7, c.k_dir, 0.6, c.v_dir, c.scoring);
  const PolicyPlan plan(layout, policy);
  Rows r = MakeRows(layout, 64, /*first_begin=*/5, 1000 + static_cast<uint32_t>(c.dtype));
  AddStatistics(&r, 77);
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  ASSERT_NE(chunk, nullptr);
  ASSERT_EQ(chunk->tokens(), 64);

  const bool aware = c.scoring == Scoring::kOutputAware;
  // V per-token output-aware counts as output-aware (its weights are constant per row).
  EXPECT_EQ(chunk->k_output_aware(), aware);
  EXPECT_EQ(chunk->v_output_aware(), aware);

  const SectionFormat& kf = chunk->k_format();
  const SectionFormat& vf = chunk->v_format();
  const SectionKind k_kind =
      c.k_dir == PruneDirection::kPerToken ? SectionKind::kPerToken : SectionKind::kPerChannel;
  const SectionKind v_kind =
      c.v_dir == PruneDirection::kPerToken ? SectionKind::kPerToken : SectionKind::kPerChannel;
  ASSERT_EQ(kf.kind, k_kind);
  ASSERT_EQ(vf.kind, v_kind);
  EXPECT_EQ(kf.k, kernels::KeepCount(0.7f, kf.n()));
  EXPECT_EQ(vf.k, kernels::KeepCount(0.6f, vf.n()));

  int weighted_differs = 0;
  for (int h = 0; h < layout.num_kv_heads; ++h) {
    std::vector<float> k_tw, k_cw, v_tw;
    if (aware && c.k_dir == PruneDirection::kPerToken) k_cw = UWeights(r, h);
    if (aware && c.k_dir == PruneDirection::kPerChannel) k_tw = MassWeights(r, h);
    if (aware && c.v_dir == PruneDirection::kPerChannel) v_tw = MassWeights(r, h);
    const SectionCheck k = CheckSection(kf, chunk->k(h), r.k[h], r.k_bytes[h], k_tw, k_cw);
    const SectionCheck v = CheckSection(vf, chunk->v(h), r.v[h], r.v_bytes[h], v_tw, {});
    EXPECT_EQ(k.mismatched_vectors, 0) << "K head " << h;
    EXPECT_EQ(v.mismatched_vectors, 0) << "V head " << h;
    EXPECT_EQ(k.value_errors, 0) << "K head " << h;
    EXPECT_EQ(v.value_errors, 0) << "V head " << h;
    weighted_differs += k.differs_from_magnitude + v.differs_from_magnitude;
  }
  // Output-aware, the weights change the ranking for this data, so a CompressRows that ignored
  // them would fail the checks above (K always has weights here).
  if (aware) {
    EXPECT_GT(weighted_differs, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, CompressRowsRankTest,
    ::testing::Values(RankCase{DType::kFloat16, PruneDirection::kPerToken,
                               PruneDirection::kPerToken, Scoring::kOutputAware},
                      RankCase{DType::kFloat16, PruneDirection::kPerToken,
                               PruneDirection::kPerToken, Scoring::kMagnitude},
                      RankCase{DType::kFloat16, PruneDirection::kPerChannel,
                               PruneDirection::kPerChannel, Scoring::kOutputAware},
                      RankCase{DType::kFloat16, PruneDirection::kPerChannel,
                               PruneDirection::kPerChannel, Scoring::kMagnitude},
                      RankCase{DType::kBFloat16, PruneDirection::kPerToken,
                               PruneDirection::kPerChannel, Scoring::kOutputAware},
                      RankCase{DType::kBFloat16, PruneDirection::kPerChannel,
                               PruneDirection::kPerToken, Scoring::kMagnitude},
                      RankCase{DType::kFloat32, PruneDirection::kPerChannel,
                               PruneDirection::kPerToken, Scoring::kOutputAware},
                      RankCase{DType::kFloat32, PruneDirection::kPerToken,
                               PruneDirection::kPerToken, Scoring::kMagnitude}),
    RankCaseName);

// K per-token output-aware ranks by u_j * |K|, and that is not what magnitude keeps; V
// per-token output-aware is plain magnitude even though the chunk says output-aware.
TEST(CompressRowsTest, KPerTokenUsesQueryEnergyAndVPerTokenStaysMagnitude) {
  const Layout layout{1, 2, 2, 64, DType::kFloat16};
  const PolicyPlan plan(layout, MakePolicy(0.7, PruneDirection::kPerToken, 0.7,
                                           PruneDirection::kPerToken, Scoring::kOutputAware));
  Rows r = MakeRows(layout, 32, 0, 5);
  AddStatistics(&r, 6);
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  EXPECT_TRUE(chunk->k_output_aware());
  EXPECT_TRUE(chunk->v_output_aware());
  for (int h = 0; h < 2; ++h) {
    const SectionCheck k =
        CheckSection(chunk->k_format(), chunk->k(h), r.k[h], r.k_bytes[h], {}, UWeights(r, h));
    EXPECT_EQ(k.mismatched_vectors, 0) << h;
    EXPECT_GT(k.differs_from_magnitude, 16) << h;  // most rows rank differently
    // The other head's energies are not this head's: ranking by them does not match.
    const SectionCheck other =
        CheckSection(chunk->k_format(), chunk->k(h), r.k[h], r.k_bytes[h], {}, UWeights(r, 1 - h));
    EXPECT_GT(other.mismatched_vectors, 0) << h;
    const SectionCheck v =
        CheckSection(chunk->v_format(), chunk->v(h), r.v[h], r.v_bytes[h], {}, {});
    EXPECT_EQ(v.mismatched_vectors, 0) << h;
  }
}

// Per-channel output-aware ranks each channel's group by w_t * |x| with this head's mass.
TEST(CompressRowsTest, PerChannelUsesEachHeadsAttentionMass) {
  const Layout layout{1, 2, 4, 32, DType::kBFloat16};
  const PolicyPlan plan(layout, MakePolicy(0.75, PruneDirection::kPerChannel, 0.5,
                                           PruneDirection::kPerChannel, Scoring::kOutputAware));
  Rows r = MakeRows(layout, 96, 17, 8);
  AddStatistics(&r, 9);
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  ASSERT_EQ(chunk->k_format().kind, SectionKind::kPerChannel);
  EXPECT_TRUE(chunk->k_output_aware());
  EXPECT_TRUE(chunk->v_output_aware());
  for (int h = 0; h < 2; ++h) {
    for (bool is_k : {true, false}) {
      const SectionFormat& f = is_k ? chunk->k_format() : chunk->v_format();
      const uint8_t* s = is_k ? chunk->k(h) : chunk->v(h);
      const auto& x = is_k ? r.k[h] : r.v[h];
      const auto& xb = is_k ? r.k_bytes[h] : r.v_bytes[h];
      const SectionCheck c = CheckSection(f, s, x, xb, MassWeights(r, h), {});
      EXPECT_EQ(c.mismatched_vectors, 0) << h << (is_k ? " K" : " V");
      EXPECT_EQ(c.value_errors, 0) << h << (is_k ? " K" : " V");
      EXPECT_GT(c.differs_from_magnitude, 0) << h << (is_k ? " K" : " V");
      EXPECT_GT(CheckSection(f, s, x, xb, MassWeights(r, 1 - h), {}).mismatched_vectors, 0);
    }
  }
}

// No query seen: output-aware falls back to magnitude for every direction, says so, and the
// statistics present in the input are ignored.
TEST(CompressRowsTest, WithoutQueriesFallsBackToMagnitude) {
  for (PruneDirection dir : {PruneDirection::kPerToken, PruneDirection::kPerChannel}) {
    const Layout layout{1, 2, 2, 64, DType::kFloat16};
    const PolicyPlan plan(layout, MakePolicy(0.7, dir, 0.7, dir, Scoring::kOutputAware));
    Rows r = MakeRows(layout, 64, 3, 11);
    AddStatistics(&r, 12);
    r.in.queries_seen = false;
    SlabPoolSet pools;
    const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
    EXPECT_FALSE(chunk->k_output_aware()) << Name(dir);
    EXPECT_FALSE(chunk->v_output_aware()) << Name(dir);
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(CheckSection(chunk->k_format(), chunk->k(h), r.k[h], r.k_bytes[h], {}, {})
                    .mismatched_vectors,
                0)
          << Name(dir) << " K head " << h;
      EXPECT_EQ(CheckSection(chunk->v_format(), chunk->v(h), r.v[h], r.v_bytes[h], {}, {})
                    .mismatched_vectors,
                0)
          << Name(dir) << " V head " << h;
    }
  }
}

// Queries seen but no attention mass on the chunk's tokens: per-channel falls back (and says
// so) while K per-token in the same chunk stays output-aware.
TEST(CompressRowsTest, PerChannelWithoutMassFallsBackToMagnitude) {
  const Layout layout{1, 2, 2, 64, DType::kFloat32};
  const PolicyPlan plan(layout, MakePolicy(0.7, PruneDirection::kPerToken, 0.7,
                                           PruneDirection::kPerChannel, Scoring::kOutputAware));
  Rows r = MakeRows(layout, 64, 0, 13);
  AddStatistics(&r, 14);
  std::fill(r.in.mass.begin(), r.in.mass.end(), 0.0f);
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  EXPECT_TRUE(chunk->k_output_aware());
  EXPECT_FALSE(chunk->v_output_aware());
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(CheckSection(chunk->k_format(), chunk->k(h), r.k[h], r.k_bytes[h], {}, UWeights(r, h))
                  .mismatched_vectors,
              0);
    EXPECT_EQ(CheckSection(chunk->v_format(), chunk->v(h), r.v[h], r.v_bytes[h], {}, {})
                  .mismatched_vectors,
              0);
  }
}

// A head whose tokens received no mass ranks by magnitude while another head of the same
// chunk ranks by its mass (the statistic is missing for that head only).
TEST(CompressRowsTest, HeadWithoutMassRanksByMagnitude) {
  const Layout layout{1, 2, 2, 32, DType::kFloat16};
  const PolicyPlan plan(layout, MakePolicy(0.7, PruneDirection::kPerChannel, 0.7,
                                           PruneDirection::kPerChannel, Scoring::kOutputAware));
  Rows r = MakeRows(layout, 64, 9, 15);
  AddStatistics(&r, 16);
  std::fill(r.in.mass.begin() + r.tokens, r.in.mass.end(), 0.0f);  // head 1
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  EXPECT_TRUE(chunk->k_output_aware());  // decided per chunk, from head 0
  const SectionCheck h0 =
      CheckSection(chunk->k_format(), chunk->k(0), r.k[0], r.k_bytes[0], MassWeights(r, 0), {});
  EXPECT_EQ(h0.mismatched_vectors, 0);
  EXPECT_GT(h0.differs_from_magnitude, 0);
  EXPECT_EQ(
      CheckSection(chunk->k_format(), chunk->k(1), r.k[1], r.k_bytes[1], {}, {}).mismatched_vectors,
      0);
  EXPECT_EQ(
      CheckSection(chunk->v_format(), chunk->v(1), r.v[1], r.v_bytes[1], {}, {}).mismatched_vectors,
      0);
}

// Magnitude scoring ignores whatever statistics the layer has.
TEST(CompressRowsTest, MagnitudeScoringIgnoresStatistics) {
  for (PruneDirection dir : {PruneDirection::kPerToken, PruneDirection::kPerChannel}) {
    const Layout layout{1, 1, 1, 64, DType::kBFloat16};
    const PolicyPlan plan(layout, MakePolicy(0.5, dir, 0.8, dir, Scoring::kMagnitude));
    Rows r = MakeRows(layout, 64, 30, 17);
    AddStatistics(&r, 18);
    SlabPoolSet pools;
    const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
    EXPECT_FALSE(chunk->k_output_aware());
    EXPECT_FALSE(chunk->v_output_aware());
    EXPECT_EQ(CheckSection(chunk->k_format(), chunk->k(0), r.k[0], r.k_bytes[0], {}, {})
                  .mismatched_vectors,
              0)
        << Name(dir);
    EXPECT_EQ(CheckSection(chunk->v_format(), chunk->v(0), r.v[0], r.v_bytes[0], {}, {})
                  .mismatched_vectors,
              0)
        << Name(dir);
  }
}

// Equal scores go to the lower index: magnitudes drawn from five levels (ties in every vector)
// and, output-aware, channels with no query energy (all their scores 0).
TEST(CompressRowsTest, TiesGoToTheLowerIndex) {
  for (PruneDirection dir : {PruneDirection::kPerToken, PruneDirection::kPerChannel}) {
    for (Scoring scoring : {Scoring::kMagnitude, Scoring::kOutputAware}) {
      const Layout layout{1, 2, 2, 64, DType::kFloat16};
      const PolicyPlan plan(layout, MakePolicy(0.7, dir, 0.4, dir, scoring));
      Rows r = MakeRows(layout, 64, 1, 19, Values::kFewLevels);
      AddStatistics(&r, 20);
      // Quantized statistics so weighted scores tie too; half the channels never queried.
      for (size_t i = 0; i < r.in.q_energy.size(); ++i) {
        r.in.q_energy[i] = (i % 2 == 0) ? 0.0f : static_cast<float>(1 + i % 3);
      }
      for (size_t i = 0; i < r.in.mass.size(); ++i) r.in.mass[i] = 0.25f * (1 + i % 2);
      SlabPoolSet pools;
      const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
      const bool aware = scoring == Scoring::kOutputAware;
      for (int h = 0; h < 2; ++h) {
        std::vector<float> k_tw, k_cw, v_tw;
        if (aware && dir == PruneDirection::kPerToken) k_cw = UWeights(r, h);
        if (aware && dir == PruneDirection::kPerChannel) k_tw = v_tw = MassWeights(r, h);
        EXPECT_EQ(CheckSection(chunk->k_format(), chunk->k(h), r.k[h], r.k_bytes[h], k_tw, k_cw)
                      .mismatched_vectors,
                  0)
            << Name(dir) << " aware " << aware << " K head " << h;
        EXPECT_EQ(CheckSection(chunk->v_format(), chunk->v(h), r.v[h], r.v_bytes[h], v_tw, {})
                      .mismatched_vectors,
                  0)
            << Name(dir) << " aware " << aware << " V head " << h;
      }
    }
  }
}

// A row whose elements all have one magnitude keeps exactly its first k channels.
TEST(CompressRowsTest, AllEqualRowKeepsItsFirstKChannels) {
  const Layout layout{1, 1, 1, 64, DType::kFloat32};
  const PolicyPlan plan(layout, MakePolicy(0.75, PruneDirection::kPerToken, 0.75,
                                           PruneDirection::kPerToken, Scoring::kMagnitude));
  Rows r = MakeRows(layout, 32, 0, 21);
  // Row 3: +-1.25 everywhere.
  DenseBlock& b = *r.in.rows[0].block;
  for (int j = 0; j < 64; ++j) {
    kernels::StoreFromFloat(DType::kFloat32, b.k_row(0, 3), j, j % 3 ? 1.25f : -1.25f);
  }
  SlabPoolSet pools;
  const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  const int k = chunk->k_format().k;
  ASSERT_EQ(k, 16);
  for (int j = 0; j < 64; ++j) {
    EXPECT_EQ(kernels::BitmapTest(chunk->k(0), 64, 3, j), j < k) << "channel " << j;
  }
}

// Sections whose bitmap would not pay (low sparsity), and per-channel sections that are not
// whole groups, are stored dense: the rows verbatim.
TEST(CompressRowsTest, DenseSectionsHoldTheRowsVerbatim) {
  const Layout layout{1, 2, 2, 128, DType::kFloat16};
  struct Case {
    double sparsity;
    PruneDirection dir;
    int tokens;
  };
  for (const Case& c :
       {Case{0.05, PruneDirection::kPerToken, 64}, Case{0.7, PruneDirection::kPerChannel, 40}}) {
    const PolicyPlan plan(layout,
                          MakePolicy(c.sparsity, c.dir, c.sparsity, c.dir, Scoring::kMagnitude));
    Rows r = MakeRows(layout, c.tokens, 12, 23);
    SlabPoolSet pools;
    const auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
    ASSERT_EQ(chunk->k_format().kind, SectionKind::kDense) << c.sparsity;
    ASSERT_EQ(chunk->v_format().kind, SectionKind::kDense) << c.sparsity;
    for (int h = 0; h < 2; ++h) {
      ASSERT_EQ(chunk->k_format().bytes(), r.k_bytes[h].size());
      EXPECT_EQ(std::memcmp(chunk->k(h), r.k_bytes[h].data(), r.k_bytes[h].size()), 0) << h;
      EXPECT_EQ(std::memcmp(chunk->v(h), r.v_bytes[h].data(), r.v_bytes[h].size()), 0) << h;
    }
  }
}

// Each layer compresses at its own sparsity (TensorPolicy::layer_sparsity), K and V apart.
TEST(CompressRowsTest, UsesTheLayersOwnSparsity) {
  const Layout layout{3, 1, 1, 64, DType::kFloat16};
  Policy policy = MakePolicy(0.5, PruneDirection::kPerToken, 0.5, PruneDirection::kPerToken,
                             Scoring::kMagnitude);
  policy.k.layer_sparsity = {0.25f, 0.5f, 0.9f};
  policy.v.layer_sparsity = {0.9f, 0.75f, 0.5f};
  const PolicyPlan plan(layout, policy);
  Rows r = MakeRows(layout, 32, 0, 25);
  SlabPoolSet pools;
  for (int l = 0; l < 3; ++l) {
    const auto chunk = CompressRows(layout, plan, l, r.in, &pools);
    EXPECT_EQ(chunk->k_format().k, kernels::KeepCount(policy.k.layer_sparsity[l], 64)) << l;
    EXPECT_EQ(chunk->v_format().k, kernels::KeepCount(policy.v.layer_sparsity[l], 64)) << l;
    EXPECT_EQ(CheckSection(chunk->k_format(), chunk->k(0), r.k[0], r.k_bytes[0], {}, {})
                  .mismatched_vectors,
              0)
        << l;
    EXPECT_EQ(CheckSection(chunk->v_format(), chunk->v(0), r.v[0], r.v_bytes[0], {}, {})
                  .mismatched_vectors,
              0)
        << l;
  }
}

// The chunk's block comes from the set's pool for its payload size and goes back with it.
TEST(CompressRowsTest, ChunkMemoryComesFromThePoolForItsSize) {
  const Layout layout{1, 2, 4, 64, DType::kFloat16};
  const PolicyPlan plan(layout, MakePolicy(0.7, PruneDirection::kPerToken, 0.5,
                                           PruneDirection::kPerChannel, Scoring::kOutputAware));
  Rows r = MakeRows(layout, 64, 0, 27);
  AddStatistics(&r, 28);
  SlabPoolSet pools;
  auto chunk = CompressRows(layout, plan, 0, r.in, &pools);
  const size_t payload =
      CompressedChunk::Bytes(chunk->k_format(), chunk->v_format(), layout.num_kv_heads);
  EXPECT_EQ(chunk->bytes(), payload);
  SlabPool* pool = pools.Get(payload);
  EXPECT_EQ(pool->used_bytes(), pool->block_bytes());
  EXPECT_EQ(chunk->memory_bytes(), pool->block_bytes() + sizeof(CompressedChunk));
  chunk.reset();
  EXPECT_EQ(pool->used_bytes(), 0u);
}

}  // namespace
}  // namespace sparsekv
