// Pruning in sessions: Flush's exact expectations, background chunks, the decode output over
// the pruned cache against a float64 reference, output-aware scoring and its fallback, byte
// accounting, and decode steps racing the pruner.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "core/compressor.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::Fixture;
using testing::OwnedTensor;
using testing::RandomTensor;

Policy Sparse(double s, PruneDirection kd, PruneDirection vd, Scoring scoring, int chunk = 64) {
  Policy p;
  p.k = {static_cast<float>(s), kd, scoring, {}};
  p.v = {static_cast<float>(s), vd, scoring, {}};
  p.chunk_tokens = chunk;
  return p;
}

// Decode of layer 0 must equal the float64 reference over the cache as Read reconstructs it.
void ExpectDecodeMatchesReadBack(Fixture& f, const OwnedTensor& q) {
  const Layout& l = f.session->layout();
  std::string k, v;
  ASSERT_TRUE(f.session->Read(0, 0, -1, &k, &v).ok());
  const int64_t tokens = f.session->tokens(0);
  std::vector<double> kr, vr, qr(q.values.begin(), q.values.end());
  for (int64_t i = 0; i < tokens * l.num_kv_heads * l.head_dim; ++i) {
    kr.push_back(kernels::LoadAsFloat(l.dtype, k.data(), i));
    vr.push_back(kernels::LoadAsFloat(l.dtype, v.data(), i));
  }
  std::vector<double> want =
      testing::AttentionReference(qr, kr, vr, l.num_q_heads, l.num_kv_heads, l.head_dim, tokens);
  DecodeInput in;
  in.q = q.view;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  // fp32 online softmax against float64 over the same stored values.
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(out.out[i], want[i], 1e-4) << i;
}

class FlushTest
    : public ::testing::TestWithParam<std::tuple<PruneDirection, PruneDirection, double, int64_t>> {
};

TEST_P(FlushTest, CompressesAllButWindowKeepsTopKAndDecodesExactly) {
  const auto [kd, vd, sparsity, tokens] = GetParam();
  const Layout layout{1, 2, 8, 64, DType::kFloat16};
  Fixture f(layout, 0, Sparse(sparsity, kd, vd, Scoring::kMagnitude));
  std::mt19937 rng(static_cast<uint32_t>(tokens));
  OwnedTensor k = RandomTensor({1, tokens, 2, 64}, &rng);
  OwnedTensor v = RandomTensor({1, tokens, 2, 64}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  const int64_t compressed = f.session->Flush().compressed;
  const bool per_channel = kd == PruneDirection::kPerChannel || vd == PruneDirection::kPerChannel;
  int64_t want = std::max<int64_t>(0, tokens - 32);
  if (per_channel) {
    // Whole chunks of 64, then whole groups of 32.
    want = want / 64 * 64 + (want % 64) / 32 * 32;
  }
  EXPECT_LE(compressed, want);  // the background pruner may have done part of it
  SessionInfo info = f.session->Info();
  EXPECT_EQ(info.stats.tokens_total, tokens);
  EXPECT_EQ(info.stats.bytes_dense, (tokens - want) * layout.token_bytes());
  if (want > 0) {
    // Bytes and achieved sparsity follow the format exactly (64 = head_dim, 32 = group).
    const int kk = kernels::KeepCount(sparsity, kd == PruneDirection::kPerChannel ? 32 : 64);
    const double k_kept = static_cast<double>(kk) / (kd == PruneDirection::kPerChannel ? 32 : 64);
    EXPECT_NEAR(info.stats.achieved_sparsity_k, 1.0 - k_kept, 1e-6);
    EXPECT_LT(info.stats.bytes_compressed, want * layout.token_bytes());
  }
  // Every compressed row read back keeps exactly the magnitude top-k of its vector: check
  // per-token K rows directly.
  std::string kb, vb;
  ASSERT_TRUE(f.session->Read(0, 0, -1, &kb, &vb).ok());
  if (kd == PruneDirection::kPerToken && want > 0) {
    const int kk = kernels::KeepCount(sparsity, 64);
    for (int64_t t = 0; t < want; ++t) {
      for (int h = 0; h < 2; ++h) {
        std::vector<std::pair<float, int>> ranked;
        for (int j = 0; j < 64; ++j) {
          const float x = testing::Stored(DType::kFloat16, k.values[(t * 2 + h) * 64 + j]);
          ranked.push_back({std::fabs(x), j});
        }
        std::stable_sort(ranked.begin(), ranked.end(),
                         [](auto a, auto b) { return a.first > b.first; });
        std::vector<bool> keep(64, false);
        for (int r = 0; r < kk; ++r) keep[ranked[r].second] = true;
        for (int j = 0; j < 64; ++j) {
          const float got = kernels::LoadAsFloat(DType::kFloat16, kb.data(), (t * 2 + h) * 64 + j);
          const float orig = testing::Stored(DType::kFloat16, k.values[(t * 2 + h) * 64 + j]);
          ASSERT_EQ(got, keep[j] ? orig : 0.0f) << t << " " << h << " " << j;
        }
      }
    }
  }
  // The newest 32 rows are untouched.
  for (int64_t i = (tokens - std::min<int64_t>(tokens, 32)) * 128; i < tokens * 128; ++i) {
    ASSERT_EQ(kernels::LoadAsFloat(DType::kFloat16, vb.data(), i),
              testing::Stored(DType::kFloat16, v.values[i]));
  }
  ExpectDecodeMatchesReadBack(f, RandomTensor({8, 64}, &rng));
}

INSTANTIATE_TEST_SUITE_P(
    Ladder, FlushTest,
    ::testing::Combine(::testing::Values(PruneDirection::kPerToken, PruneDirection::kPerChannel),
                       ::testing::Values(PruneDirection::kPerToken, PruneDirection::kPerChannel),
                       ::testing::Values(0.5, 0.7),
                       // 2187 tokens x 2 KV heads is past AttendOptions::min_rows_to_split:
                       // each head's chunks and tail are split over the decode threads.
                       ::testing::Values(int64_t{1}, int64_t{27}, int64_t{81}, int64_t{129},
                                         int64_t{257}, int64_t{2187})));

TEST(PruningTest, BackgroundPrunerCompressesWholeChunksOnly) {
  const Layout layout{2, 2, 4, 32, DType::kBFloat16};
  Fixture f(
      layout, 0,
      Sparse(0.7, PruneDirection::kPerToken, PruneDirection::kPerToken, Scoring::kMagnitude, 32));
  std::mt19937 rng(3);
  OwnedTensor k = RandomTensor({2, 32 + 3 * 32 + 20, 2, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  // Eligible: tail >= W + C = 64, so 148 tokens give 3 chunks per layer and keep 52 dense.
  SessionInfo info;
  for (int i = 0; i < 500; ++i) {
    info = f.session->Info();
    if (info.stats.chunks == 6) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(info.stats.chunks, 6);
  EXPECT_EQ(info.stats.pruning_backlog_tokens, 0);
  EXPECT_EQ(info.stats.bytes_dense, 2 * 52 * layout.token_bytes());
  // Format bytes: per token per head 4 B bitmap + KeepCount(0.7, 32) = 10 values x 2 B.
  EXPECT_EQ(info.stats.bytes_compressed, 2 * 96 * 2 * 2 * (4 + 10 * 2));
  // The budget holds what the session accounts: its fixed bytes, the 2 dense blocks per layer
  // still holding tail rows 96..147, and 6 chunks of 3072 bytes (a multiple of the pools'
  // 64-byte rounding) plus their objects.
  EXPECT_EQ(f.env.budget->used(), info.stats.bytes_accounted);
  EXPECT_EQ(info.stats.bytes_accounted,
            Session::FixedBytes(info) + 4 * LayerStore::BlockBytes(layout) +
                6 * (3072 + static_cast<int64_t>(sizeof(CompressedChunk))));
  ExpectDecodeMatchesReadBack(f, RandomTensor({4, 32}, &rng));
}

TEST(PruningTest, PerLayerSparsityOverridesTheUniformOne) {
  const Layout layout{3, 2, 4, 64, DType::kFloat16};
  Policy p =
      Sparse(0.7, PruneDirection::kPerToken, PruneDirection::kPerToken, Scoring::kMagnitude, 32);
  p.k.layer_sparsity = {0.7f, 0.0f, 0.5f};  // layer 1 keeps K dense
  Fixture f(layout, 0, p);
  std::mt19937 rng(8);
  OwnedTensor k = RandomTensor({3, 96, 2, 64}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  f.session->Flush();
  for (int layer = 0; layer < 3; ++layer) {
    std::string kb, vb;
    ASSERT_TRUE(f.session->Read(layer, 0, 64, &kb, &vb).ok());
    int zeros = 0;
    for (int i = 0; i < 64 * 2 * 64; ++i)
      zeros += kernels::LoadAsFloat(DType::kFloat16, kb.data(), i) == 0.0f;
    const int want = layer == 0 ? 64 * 2 * (64 - 19) : layer == 1 ? 0 : 64 * 2 * 32;
    EXPECT_EQ(zeros, want) << "layer " << layer;
  }
  // Achieved K sparsity is the mean over the compressed tokens of all layers.
  EXPECT_NEAR(f.session->Info().stats.achieved_sparsity_k, (45.0 / 64 + 0 + 0.5) / 3, 1e-6);
}

TEST(PruningTest, OutputAwareFallsBackToMagnitudeWithoutQueries) {
  const Layout layout{1, 1, 2, 32, DType::kFloat16};
  // W + C = 96: the 63 tokens appended after the first Flush stay below the background
  // threshold, so only the second Flush compresses them, after the decode step.
  Fixture f(layout, 0,
            Sparse(0.5, PruneDirection::kPerToken, PruneDirection::kPerChannel,
                   Scoring::kOutputAware, 64));
  std::mt19937 rng(4);
  OwnedTensor k = RandomTensor({1, 96, 1, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  f.session->Flush();
  SessionInfo info = f.session->Info();
  EXPECT_EQ(info.stats.scoring_in_force_k, Scoring::kMagnitude);
  EXPECT_EQ(info.stats.chunks_output_aware_k, 0);

  // After decode queries the next chunks are ranked output-aware.
  OwnedTensor more = RandomTensor({1, 63, 1, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, more.view, more.view, TensorView{}).ok());
  DecodeInput in;
  OwnedTensor q = RandomTensor({2, 32}, &rng);
  in.q = q.view;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  f.session->Flush();
  info = f.session->Info();
  EXPECT_EQ(info.stats.scoring_in_force_k, Scoring::kOutputAware);
  EXPECT_GT(info.stats.chunks_output_aware_k, 0);
  EXPECT_GT(info.stats.chunks_output_aware_v, 0);
}

TEST(PruningTest, ObservationQueriesSeedOutputAwareScoring) {
  const Layout layout{1, 1, 2, 32, DType::kFloat16};
  Fixture f(layout, 0,
            Sparse(0.5, PruneDirection::kPerChannel, PruneDirection::kPerChannel,
                   Scoring::kOutputAware, 32));
  std::mt19937 rng(5);
  OwnedTensor k = RandomTensor({1, 96, 1, 32}, &rng);
  OwnedTensor obs = RandomTensor({1, 4, 2, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, obs.view).ok());
  f.session->Flush();
  SessionInfo info = f.session->Info();
  EXPECT_EQ(info.stats.chunks, 2);
  EXPECT_EQ(info.stats.chunks_output_aware_k, 2);
  OwnedTensor bad = RandomTensor({1, 4, 3, 32}, &rng);
  EXPECT_EQ(f.session->Append(0, k.view, k.view, bad.view).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PruningTest, OutputAwareKeepsWhatTheQueriesReadPerChannel) {
  // Per-channel output-aware ranks tokens by attention mass: a token that every query attends
  // to keeps all its channels' largest entries even when its magnitudes are small.
  const Layout layout{1, 1, 1, 32, DType::kFloat32};
  // W + C = 96 > 64 tokens: nothing is compressed before the decode step; Flush then
  // compresses one group of 32.
  Fixture f(layout, 0,
            Sparse(0.9, PruneDirection::kPerChannel, PruneDirection::kPerChannel,
                   Scoring::kOutputAware, 64));
  std::mt19937 rng(6);
  OwnedTensor k = RandomTensor({1, 64, 1, 32}, &rng);
  // The query reads channel 0 only; token 5 is the only one positive there, so it gets nearly
  // all the attention although its values (0.3) are small next to the others (|N(0,1)|).
  OwnedTensor q = RandomTensor({1, 32}, &rng);
  for (int j = 0; j < 32; ++j) q.values[j] = j == 0 ? 100.0f : 0.0f;
  for (int t = 0; t < 64; ++t) k.values[t * 32] = -std::fabs(k.values[t * 32]);
  for (int j = 0; j < 32; ++j) k.values[5 * 32 + j] = 0.3f;
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  DecodeInput in;
  in.q = q.view;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  f.session->Flush();
  std::string kb, vb;
  ASSERT_TRUE(f.session->Read(0, 0, 32, &kb, &vb).ok());
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(kernels::LoadAsFloat(DType::kFloat32, kb.data(), 5 * 32 + j), 0.3f) << j;
  }
}

TEST(PruningTest, DecodeRacingThePrunerAlwaysSeesAWholeState) {
  // Every decode step must equal the reference for "the first i chunks compressed, the rest
  // dense" for some i: never a half-published chunk.
  const Layout layout{1, 1, 4, 64, DType::kFloat16};
  const int chunk = 32, chunks = 12;
  const Policy policy =
      Sparse(0.7, PruneDirection::kPerToken, PruneDirection::kPerToken, Scoring::kMagnitude, chunk);
  std::mt19937 rng(7);
  const int64_t tokens = 32 + chunk * chunks;
  OwnedTensor k = RandomTensor({1, tokens, 1, 64}, &rng);
  OwnedTensor v = RandomTensor({1, tokens, 1, 64}, &rng);
  OwnedTensor q = RandomTensor({4, 64}, &rng);

  // Expected outputs for i = 0..chunks compressed chunks, from the kernels directly.
  std::vector<uint16_t> kh(k.values.size()), vh(v.values.size());
  kernels::ConvertElements(DType::kFloat32, k.values.data(), DType::kFloat16, kh.data(), kh.size());
  kernels::ConvertElements(DType::kFloat32, v.values.data(), DType::kFloat16, vh.data(), vh.size());
  const kernels::SectionFormat fmt = PolicyPlan(layout, policy).KFormat(/*layer=*/0, chunk);
  std::vector<uint16_t> kp = kh, vp = vh;  // fully pruned versions of the chunked rows
  std::vector<uint8_t> packed(fmt.bytes());
  for (int c = 0; c < chunks; ++c) {
    kernels::CompressSection(fmt, kh.data() + c * chunk * 64, nullptr, nullptr, packed.data());
    kernels::DecompressSection(fmt, packed.data(), kp.data() + c * chunk * 64);
    kernels::CompressSection(fmt, vh.data() + c * chunk * 64, nullptr, nullptr, packed.data());
    kernels::DecompressSection(fmt, packed.data(), vp.data() + c * chunk * 64);
  }
  std::vector<std::vector<double>> expected;
  for (int i = 0; i <= chunks; ++i) {
    std::vector<double> kr, vr, qr(q.values.begin(), q.values.end());
    for (int64_t e = 0; e < tokens * 64; ++e) {
      const bool pruned = e < static_cast<int64_t>(i) * chunk * 64;
      kr.push_back(kernels::HalfToFloat(pruned ? kp[e] : kh[e]));
      vr.push_back(kernels::HalfToFloat(pruned ? vp[e] : vh[e]));
    }
    expected.push_back(testing::AttentionReference(qr, kr, vr, 4, 1, 64, tokens));
  }

  Fixture f(layout, 0, policy);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  std::set<int> seen;
  for (int iter = 0; iter < 2000; ++iter) {
    DecodeInput in;
    in.q = q.view;
    DecodeOutput out;
    ASSERT_TRUE(f.session->Decode(in, &out).ok());
    int match = -1;
    for (int i = 0; i <= chunks && match < 0; ++i) {
      bool ok = true;
      for (size_t j = 0; j < out.out.size() && ok; ++j) {
        ok = std::fabs(out.out[j] - expected[i][j]) < 1e-4;
      }
      if (ok) match = i;
    }
    ASSERT_GE(match, 0) << "decode " << iter << " matches no published state";
    seen.insert(match);
    if (match == chunks) break;
  }
  EXPECT_EQ(*seen.rbegin(), chunks);  // the pruner finished meanwhile
}

// A Flush remainder shorter than a 32-row block releases no block: when the budget is full its
// chunk does not fit, the rows stay dense and Flush reports them left dense, not compressed.
TEST(PruningTest, FlushReportsARemainderTheBudgetCannotHold) {
  const Layout layout{1, 2, 2, 64, DType::kFloat16};
  const Policy policy =
      Sparse(0.5, PruneDirection::kPerToken, PruneDirection::kPerToken, Scoring::kMagnitude);
  SessionInfo info;
  info.id = "s";
  info.tenant = "t";
  info.layout = layout;
  info.policy = policy;
  const int64_t fixed = Session::FixedBytes(info);
  for (const bool full : {true, false}) {
    // 60 rows take two blocks; dense_window 32 leaves a 28-row remainder, inside block 0.
    const int64_t budget = fixed + 2 * LayerStore::BlockBytes(layout) + (full ? 0 : 1 << 20);
    Fixture f(layout, budget, policy);
    std::mt19937 rng(full ? 3 : 4);
    OwnedTensor k = RandomTensor({1, 60, 2, 64}, &rng);
    OwnedTensor v = RandomTensor({1, 60, 2, 64}, &rng);
    ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
    const int64_t used = f.env.budget->used();
    const FlushResult r = f.session->Flush();
    EXPECT_EQ(r.compressed, full ? 0 : 28) << full;
    EXPECT_EQ(r.left_dense, full ? 28 : 0) << full;
    const SessionStats st = f.session->Info().stats;
    EXPECT_EQ(st.bytes_dense, (full ? 60 : 32) * layout.token_bytes()) << full;
    EXPECT_EQ(st.bytes_accounted, f.env.budget->used()) << full;
    if (full) {
      EXPECT_EQ(f.env.budget->used(), used);
    }
    EXPECT_LE(f.env.budget->used(), budget) << full;
  }
}

}  // namespace
}  // namespace sparsekv
