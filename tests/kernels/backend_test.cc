// Table-driven harness: every CPU variant (and the split-KV form) against the scalar float64
// reference, on random caches made of compressed chunks in every format plus dense spans,
// over a ladder of lengths, GQA group sizes, head dims and dtypes. Errors are normalised by
// the largest |V| (the output is a convex combination of V rows).
#include "kernels/backend.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/compute_backend.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/kernels/split_decode.h"

namespace sparsekv::kernels {
namespace {

struct Case {
  int group;
  int head_dim;
  int chunks;
  int chunk_tokens;
  int64_t dense_tokens;
  SectionKind k_kind;
  SectionKind v_kind;
  double sparsity;
  DType dtype;
};

std::string Name(const Case& c) {
  return "g" + std::to_string(c.group) + "_d" + std::to_string(c.head_dim) + "_c" +
         std::to_string(c.chunks) + "x" + std::to_string(c.chunk_tokens) + "_t" +
         std::to_string(c.dense_tokens) + "_k" + std::to_string(static_cast<int>(c.k_kind)) + "v" +
         std::to_string(static_cast<int>(c.v_kind)) + "_" + DTypeName(c.dtype);
}

// Owns a random cache and the params that point into it.
struct Cache {
  std::vector<std::vector<uint8_t>> ksec, vsec;
  std::vector<ChunkRef> refs;
  std::vector<uint8_t> kd, vd;
  std::vector<DenseSpan> spans;
  std::vector<float> q;
  DecodeAttentionParams p;
  float max_v = 0.0f;
};

void Fill(const Case& c, uint32_t seed, Cache* cache) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const size_t es = DTypeSize(c.dtype);
  auto random_rows = [&](int64_t rows, std::vector<uint8_t>* out) {
    out->resize(static_cast<size_t>(rows) * c.head_dim * es);
    for (size_t i = 0; i < static_cast<size_t>(rows) * c.head_dim; ++i) {
      StoreFromFloat(c.dtype, out->data(), i, dist(rng));
      cache->max_v = std::fmax(cache->max_v, std::fabs(LoadAsFloat(c.dtype, out->data(), i)));
    }
  };
  DecodeAttentionParams& p = cache->p;
  p.group = c.group;
  p.head_dim = c.head_dim;
  p.dtype = c.dtype;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.k_format = MakeSectionFormat(c.k_kind, c.sparsity, c.head_dim, c.chunk_tokens, 32, c.dtype);
  p.v_format = MakeSectionFormat(c.v_kind, c.sparsity, c.head_dim, c.chunk_tokens, 32, c.dtype);
  std::vector<uint8_t> rows;
  for (int i = 0; i < c.chunks; ++i) {
    random_rows(c.chunk_tokens, &rows);
    cache->ksec.emplace_back(p.k_format.bytes());
    CompressSection(p.k_format, rows.data(), nullptr, nullptr, cache->ksec.back().data());
    random_rows(c.chunk_tokens, &rows);
    cache->vsec.emplace_back(p.v_format.bytes());
    CompressSection(p.v_format, rows.data(), nullptr, nullptr, cache->vsec.back().data());
  }
  for (int i = 0; i < c.chunks; ++i)
    cache->refs.push_back({cache->ksec[i].data(), cache->vsec[i].data()});
  random_rows(c.dense_tokens, &cache->kd);
  random_rows(c.dense_tokens, &cache->vd);
  // Two dense spans, to cover span iteration.
  const int64_t half = c.dense_tokens / 2;
  const size_t row = c.head_dim * es;
  cache->spans = {
      {cache->kd.data(), cache->vd.data(), half},
      {cache->kd.data() + half * row, cache->vd.data() + half * row, c.dense_tokens - half}};
  cache->q.resize(static_cast<size_t>(c.group) * c.head_dim);
  for (float& x : cache->q) x = dist(rng);
  p.q = cache->q.data();
  p.chunks = cache->refs.data();
  p.num_chunks = c.chunks;
  p.spans = cache->spans.data();
  p.num_spans = 2;
}

class BackendTest : public ::testing::TestWithParam<Case> {};

TEST_P(BackendTest, EveryVariantMatchesReference) {
  const Case c = GetParam();
  Cache cache;
  Fill(c, 99 + c.chunks * 7 + static_cast<uint32_t>(c.dense_tokens), &cache);
  const size_t n = cache.q.size();
  std::vector<float> want(n), want_lse(c.group);
  DecodeAttentionParams ref = cache.p;
  ref.out = want.data();
  ref.lse = want_lse.data();
  ReferenceDecodeAttention(ref);

  // float32 accumulation against float64: a few ulps per merge step, scaled by |V|.
  const float tol = 5e-5f * std::fmax(cache.max_v, 1.0f);
  for (const Backend* b : CpuBackendVariants()) {
    for (int splits : {1, 3}) {
      std::vector<float> out(n, NAN), lse(c.group, NAN);
      DecodeAttentionParams p = cache.p;
      p.out = out.data();
      p.lse = lse.data();
      SplitDecode(*b, p, splits);
      for (size_t i = 0; i < n; ++i) {
        ASSERT_NEAR(out[i], want[i], tol) << b->variant() << " splits " << splits << " i " << i;
      }
      for (int h = 0; h < c.group; ++h) {
        if (std::isinf(want_lse[h])) {
          EXPECT_EQ(lse[h], want_lse[h]);
        } else {
          EXPECT_NEAR(lse[h], want_lse[h], 5e-5f * std::fmax(1.0f, std::fabs(want_lse[h])))
              << b->variant();
        }
      }
    }
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  const SectionKind T = SectionKind::kPerToken, C = SectionKind::kPerChannel,
                    D = SectionKind::kDense;
  // Ladder of dense tail lengths with a few chunk counts.
  for (int64_t tokens : {0, 1, 3, 9, 27, 81, 129, 257}) {
    cases.push_back({4, 128, 2, 64, tokens, T, T, 0.7, DType::kFloat16});
  }
  for (int g : {1, 4, 8}) {
    for (int d : {64, 128, 256}) {
      cases.push_back({g, d, 3, 32, 33, T, C, 0.5, DType::kFloat16});
      cases.push_back({g, d, 2, 64, 5, C, T, 0.7, DType::kBFloat16});
    }
  }
  cases.push_back({4, 128, 4, 256, 40, C, C, 0.7, DType::kFloat16});
  cases.push_back({2, 64, 3, 32, 10, T, D, 0.7, DType::kFloat16});
  cases.push_back({2, 64, 3, 32, 10, D, T, 0.5, DType::kFloat32});
  cases.push_back({3, 8, 5, 32, 7, T, T, 0.7, DType::kFloat16});
  cases.push_back({4, 128, 0, 256, 0, T, T, 0.7, DType::kFloat16});  // empty cache
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Ladder, BackendTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return Name(info.param); });

// The CPU ComputeBackend: one batch of ragged items (every ladder case, two KV heads each,
// each head its own random cache), split over workers or not, against the reference per head;
// the tail probabilities against AccumulateDenseMass with the reference lse.
TEST(ComputeBackendTest, RaggedBatchMatchesReferenceWithTailMass) {
  const std::vector<Case> cases = Cases();
  constexpr int kHeads = 2;
  struct Item {
    Case c;
    Cache heads[kHeads];
    std::vector<ChunkRef> refs;
    std::vector<DenseSpan> tail;
    std::vector<float> q, out, lse, mass;
    ChunkRun run;
  };
  std::vector<Item> items(cases.size());
  std::vector<DecodeBatchItem> batch(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    Item& it = items[i];
    it.c = cases[i];
    for (int h = 0; h < kHeads; ++h) Fill(it.c, 1000 + 31 * i + h, &it.heads[h]);
    for (int h = 0; h < kHeads; ++h) {
      it.refs.insert(it.refs.end(), it.heads[h].refs.begin(), it.heads[h].refs.end());
      it.tail.insert(it.tail.end(), it.heads[h].spans.begin(), it.heads[h].spans.end());
      it.q.insert(it.q.end(), it.heads[h].q.begin(), it.heads[h].q.end());
    }
    const DecodeAttentionParams& p0 = it.heads[0].p;
    it.run = {p0.k_format, p0.v_format, it.refs.data(), it.c.chunks};
    it.out.assign(it.q.size(), NAN);
    it.lse.assign(static_cast<size_t>(kHeads) * it.c.group, NAN);
    it.mass.assign(static_cast<size_t>(kHeads) * it.c.dense_tokens, NAN);
    DecodeBatchItem& b = batch[i];
    b.num_kv_heads = kHeads;
    b.group = it.c.group;
    b.head_dim = it.c.head_dim;
    b.dtype = it.c.dtype;
    b.scale = p0.scale;
    b.q = it.q.data();
    b.out = it.out.data();
    b.lse = it.lse.data();
    b.runs = &it.run;
    b.num_runs = it.c.chunks > 0 ? 1 : 0;
    b.tail = it.tail.data();
    b.num_tail_spans = 2;
    b.tail_tokens = it.c.dense_tokens;
    b.tokens = static_cast<int64_t>(it.c.chunks) * it.c.chunk_tokens + it.c.dense_tokens;
    b.tail_mass = it.mass.data();
  }
  for (int threads : {0, 3}) {
    for (int64_t min_rows : {int64_t{0}, int64_t{1} << 40}) {
      ComputeBackendOptions o;
      o.threads = threads;
      o.spin_us = 0;
      o.min_rows_to_split = min_rows;
      const std::unique_ptr<ComputeBackend> backend = MakeCpuComputeBackend(o);
      ASSERT_TRUE(backend->Decode({batch.data(), static_cast<int>(batch.size())}).ok());
      for (Item& it : items) {
        for (int h = 0; h < kHeads; ++h) {
          const Cache& cache = it.heads[h];
          const size_t n = cache.q.size();
          std::vector<float> want(n), want_lse(it.c.group);
          DecodeAttentionParams ref = cache.p;
          ref.out = want.data();
          ref.lse = want_lse.data();
          ReferenceDecodeAttention(ref);
          const float tol = 5e-5f * std::fmax(cache.max_v, 1.0f);
          for (size_t j = 0; j < n; ++j) {
            ASSERT_NEAR(it.out[h * n + j], want[j], tol)
                << Name(it.c) << " head " << h << " threads " << threads;
          }
          std::vector<float> want_mass(it.c.dense_tokens, 0.0f);
          if (std::isfinite(want_lse[0])) {
            AccumulateDenseMass(ref, want_lse.data(), want_mass.data());
            for (int64_t t = 0; t < it.c.dense_tokens; ++t) {
              ASSERT_NEAR(it.mass[h * it.c.dense_tokens + t], want_mass[t],
                          1e-4f * std::fmax(1.0f, want_mass[t]))
                  << Name(it.c) << " head " << h << " row " << t;
            }
          }
        }
      }
    }
  }
}

TEST(ComputeBackendTest, RegistryPicksTheCpuAndRefusesWhatItCannotRun) {
  std::unique_ptr<ComputeBackend> b;
  std::string why;
  ComputeBackendOptions o;
  o.threads = 0;
  ASSERT_TRUE(CreateComputeBackend(o, &b, &why).ok());
  EXPECT_STREQ(b->name(), "cpu");
  EXPECT_EQ(b->variant(), CpuBackend().variant());
  EXPECT_NE(why.find("auto"), std::string::npos);
  o.name = "cuda";
  EXPECT_EQ(CreateComputeBackend(o, &b, &why).code, KernelStatus::Code::kUnavailable);
  o.name = "tpu";
  EXPECT_EQ(CreateComputeBackend(o, &b, &why).code, KernelStatus::Code::kInvalidArgument);
}

TEST(AttentionStateTest, MergeWithEmptyIsIdentity) {
  AttentionState a, empty;
  a.Reset(1, 2);
  empty.Reset(1, 2);
  a.m = {1.0f};
  a.l = {2.0f};
  a.acc = {4.0f, 6.0f};
  MergeAttentionState(empty, &a);
  EXPECT_EQ(a.m[0], 1.0f);
  EXPECT_EQ(a.l[0], 2.0f);
  MergeAttentionState(a, &empty);
  float out[2], lse;
  FinalizeAttentionState(empty, out, &lse);
  EXPECT_FLOAT_EQ(out[0], 2.0f);
  EXPECT_FLOAT_EQ(out[1], 3.0f);
  EXPECT_FLOAT_EQ(lse, 1.0f + std::log(2.0f));
}

TEST(DenseMassTest, SumsProbabilitiesOverGroupHeads) {
  // With the whole cache dense, the masses over all tokens sum to the group size.
  Case c{4, 64, 0, 32, 50, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, DType::kFloat16};
  Cache cache;
  Fill(c, 5, &cache);
  std::vector<float> out(cache.q.size()), lse(c.group);
  DecodeAttentionParams p = cache.p;
  p.out = out.data();
  p.lse = lse.data();
  ReferenceDecodeAttention(p);
  std::vector<float> mass(50, 0.0f);
  AccumulateDenseMass(p, lse.data(), mass.data());
  double total = 0;
  for (float m : mass) {
    EXPECT_GE(m, 0.0f);
    total += m;
  }
  EXPECT_NEAR(total, 4.0, 1e-4);
}

TEST(DenseMassTest, ExtremeScoresGiveFiniteBoundedMass) {
  // Finite but extreme queries: this dot product overflows (+inf, and inf - inf = NaN when
  // channels of both signs overflow). Each term is a probability: clamped to [0, 1], the mass
  // stays finite (it seeds output-aware scoring and travels in snapshots). Found by the fuzzer.
  Case c{4, 64, 0, 32, 50, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, DType::kFloat16};
  Cache cache;
  Fill(c, 6, &cache);
  std::vector<float> q(cache.q.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = (i % 3 == 0 ? -3e38f : 3e38f);
  DecodeAttentionParams p = cache.p;
  p.q = q.data();
  const std::vector<float> lse = {0.0f, 1e30f, -1e30f, 5.0f};
  std::vector<float> mass(50, 0.0f);
  AccumulateDenseMass(p, lse.data(), mass.data());
  for (float m : mass) {
    EXPECT_TRUE(std::isfinite(m)) << m;
    EXPECT_GE(m, 0.0f);
    EXPECT_LE(m, 4.0f);
  }
}

class ThreadPoolTest : public ::testing::TestWithParam<int> {};  // spin in microseconds

TEST_P(ThreadPoolTest, RunsEveryTaskOnce) {
  ThreadPool pool(2, std::chrono::microseconds(GetParam()));
  std::vector<int> hits(100, 0);
  pool.Run(100, [&](int i) { hits[i]++; });
  for (int h : hits) EXPECT_EQ(h, 1);
}

// Workers that have spun out and slept must still take the next Run's tasks; a Run right
// after another finds them spinning.
TEST_P(ThreadPoolTest, WorksAfterIdleAndBackToBack) {
  ThreadPool pool(2, std::chrono::microseconds(GetParam()));
  for (int round = 0; round < 6; ++round) {
    if (round % 2 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(3));
    std::atomic<int> sum{0};
    pool.Run(7, [&](int i) { sum.fetch_add(i + 1); });
    EXPECT_EQ(sum.load(), 28) << round;
  }
}

// Several callers at once, each blocking only on its own tasks.
TEST_P(ThreadPoolTest, ConcurrentCallersEachGetTheirOwnTasks) {
  ThreadPool pool(2, std::chrono::microseconds(GetParam()));
  std::vector<std::thread> callers;
  std::vector<int64_t> sums(4, 0);
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 50; ++round) {
        std::vector<int> hits(16, 0);
        pool.Run(16, [&](int i) { hits[i] += 1; });
        for (int h : hits) sums[c] += h;
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int64_t s : sums) EXPECT_EQ(s, 50 * 16);
}

INSTANTIATE_TEST_SUITE_P(Spin, ThreadPoolTest, ::testing::Values(0, 250, 5000));

}  // namespace
}  // namespace sparsekv::kernels
