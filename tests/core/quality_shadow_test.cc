// The quality metric end to end in core: a shadowed session's recorded decode error equals
// the error of its stored (pruned) cache against every appended row, computed in float64;
// sessions without a shadow record nothing; the shadow's bytes are counted, capped, yield to
// the budget and return on delete and eviction; an imported session has no shadow.
#include "core/quality_shadow.h"

#include <gtest/gtest.h>

#include <cmath>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "core/session_store.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::AttentionReference;
using testing::OwnedTensor;
using testing::RandomTensor;
using testing::Stored;

const Layout kLayout{2, 2, 8, 64, DType::kFloat16};

SessionStoreOptions Options(double fraction, int64_t max_bytes = 0, int64_t budget = 0) {
  SessionStoreOptions o = testing::QuietStoreOptions();
  o.decode_spin_us = 0;
  o.quality.shadow_fraction = fraction;
  o.quality.shadow_max_bytes = max_bytes;
  o.host_budget_bytes = budget;
  return o;
}

CreateSessionParams Params(const std::string& id, float sparsity) {
  CreateSessionParams p;
  p.id = id;
  p.layout = kLayout;
  p.policy.k.sparsity = p.policy.v.sparsity = sparsity;
  p.policy.chunk_tokens = 64;
  p.policy.dense_window = 16;
  return p;
}

// Appends `tokens` random rows to every layer; with obs_tokens > 0 through the observed path.
// `history`, when given, receives the stored (rounded) rows per layer, [tokens, heads, dim].
void Fill(Session* s, int64_t tokens, int64_t obs_tokens, std::mt19937* rng,
          std::vector<std::vector<double>>* history = nullptr) {
  const Layout& l = kLayout;
  OwnedTensor k = RandomTensor({l.num_layers, tokens, l.num_kv_heads, l.head_dim}, rng);
  OwnedTensor v = RandomTensor({l.num_layers, tokens, l.num_kv_heads, l.head_dim}, rng);
  OwnedTensor obs;
  if (obs_tokens > 0)
    obs = RandomTensor({l.num_layers, obs_tokens, l.num_q_heads, l.head_dim}, rng);
  ASSERT_TRUE(s->Append(0, k.view, v.view, obs.view).ok());
  if (history == nullptr) return;
  history->resize(2 * l.num_layers);
  const size_t per_layer = k.values.size() / l.num_layers;
  for (int layer = 0; layer < l.num_layers; ++layer) {
    for (size_t i = 0; i < per_layer; ++i) {
      (*history)[2 * layer].push_back(Stored(l.dtype, k.values[layer * per_layer + i]));
      (*history)[2 * layer + 1].push_back(Stored(l.dtype, v.values[layer * per_layer + i]));
    }
  }
}

std::vector<double> StoredRows(const Session& s, int layer, bool want_v) {
  std::string kb, vb;
  EXPECT_TRUE(s.Read(layer, 0, -1, &kb, &vb).ok());
  const std::string& b = want_v ? vb : kb;
  std::vector<double> out(b.size() / 2);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = kernels::LoadAsFloat(DType::kFloat16, b.data(), i);
  return out;
}

double L2RelativeError(const std::vector<double>& approx, const std::vector<double>& exact) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    diff += (approx[i] - exact[i]) * (approx[i] - exact[i]);
    norm += exact[i] * exact[i];
  }
  return std::sqrt(diff / norm);
}

absl::Status DecodeThroughBatcher(SessionStore* store, const DecodeInput& in) {
  std::promise<absl::Status> done;
  store->SubmitDecode(
      {in}, [&](absl::Status st, std::vector<DecodeOutput>) { done.set_value(std::move(st)); });
  return done.get_future().get();
}

int64_t BudgetOfSessions(const SessionStore& store) {
  int64_t sum = 0;
  for (const auto& s : store.All()) sum += s->Info().stats.bytes_accounted;
  return sum;
}

TEST(QualityShadowTest, RecordedErrorIsTheFloat64ErrorOfTheStoredCacheAgainstEveryRow) {
  SessionStore store(Options(1.0));
  ASSERT_TRUE(store.Create(Params("q-1", 0.7f)).ok());
  std::shared_ptr<Session> s = *store.Get("q-1");
  std::mt19937 rng(11);
  std::vector<std::vector<double>> history;
  Fill(s.get(), 200, 4, &rng, &history);  // the observed path
  Fill(s.get(), 100, 0, &rng, &history);  // the plain one
  s->Flush();
  const QualityStats before = store.Quality();
  EXPECT_EQ(before.shadow_sessions, 1);
  EXPECT_EQ(before.shadow_bytes, s->Info().stats.bytes_shadow);
  EXPECT_GT(before.shadow_bytes, 300 * kLayout.num_layers * kLayout.token_bytes());
  EXPECT_EQ(store.budget().used(), s->Info().stats.bytes_accounted);

  for (int step = 0; step < 4; ++step) {
    const Layout& l = kLayout;
    OwnedTensor q = RandomTensor({l.num_q_heads, l.head_dim}, &rng);
    OwnedTensor nk = RandomTensor({l.num_kv_heads, l.head_dim}, &rng);
    OwnedTensor nv = RandomTensor({l.num_kv_heads, l.head_dim}, &rng);
    DecodeInput in;
    in.session_id = "q-1";
    in.layer = step % 2;
    in.q = q.view;
    in.new_k = nk.view;
    in.new_v = nv.view;
    const HistogramSnapshot h0 = store.Quality().relative_error;
    const DecodeBatcherStats b0 = store.BatcherStats();
    if (step < 2) {
      ASSERT_TRUE(DecodeThroughBatcher(&store, in).ok());
      // The dense step ran as a second item of the same backend call.
      const DecodeBatcherStats b1 = store.BatcherStats();
      EXPECT_EQ(b1.batches - b0.batches, 1);
      EXPECT_EQ(b1.items - b0.items, 2);
      EXPECT_EQ(b1.items_per_batch.counts[1] - b0.items_per_batch.counts[1], 1);  // le=2
    } else {
      std::vector<DecodeOutput> out;
      ASSERT_TRUE(store.DecodeBatch({in}, &out).ok());
    }
    const HistogramSnapshot h1 = store.Quality().relative_error;
    ASSERT_EQ(h1.count - h0.count, 1) << step;
    const double got = h1.sum - h0.sum;

    for (size_t i = 0; i < nk.values.size(); ++i) {
      history[2 * in.layer].push_back(Stored(l.dtype, nk.values[i]));
      history[2 * in.layer + 1].push_back(Stored(l.dtype, nv.values[i]));
    }
    const int64_t tokens = s->tokens(in.layer);
    const std::vector<double> qd(q.values.begin(), q.values.end());
    const std::vector<double> sparse =
        AttentionReference(qd, StoredRows(*s, in.layer, false), StoredRows(*s, in.layer, true),
                           l.num_q_heads, l.num_kv_heads, l.head_dim, tokens);
    const std::vector<double> dense =
        AttentionReference(qd, history[2 * in.layer], history[2 * in.layer + 1], l.num_q_heads,
                           l.num_kv_heads, l.head_dim, tokens);
    const double want = L2RelativeError(sparse, dense);
    EXPECT_GT(want, 1e-3) << "70% pruning changes the output";
    // Both kernel outputs are within a few fp32 ulps of their float64 references.
    EXPECT_NEAR(got, want, 2e-4 + 1e-3 * want) << "step " << step;
  }
}

TEST(QualityShadowTest, SessionsWithoutAShadowRecordNothing) {
  for (const auto& [fraction, sparsity] : {std::pair{0.0, 0.7f}, std::pair{1.0, 0.0f}}) {
    SessionStore store(Options(fraction));
    ASSERT_TRUE(store.Create(Params("n-1", sparsity)).ok());
    std::shared_ptr<Session> s = *store.Get("n-1");
    std::mt19937 rng(3);
    Fill(s.get(), 100, 0, &rng);
    s->Flush();
    OwnedTensor q = RandomTensor({kLayout.num_q_heads, kLayout.head_dim}, &rng);
    DecodeInput in;
    in.session_id = "n-1";
    in.q = q.view;
    ASSERT_TRUE(DecodeThroughBatcher(&store, in).ok());
    const QualityStats st = store.Quality();
    EXPECT_EQ(st.shadow_sessions, 0) << fraction;
    EXPECT_EQ(st.shadow_bytes, 0);
    EXPECT_EQ(st.relative_error.count, 0);
    EXPECT_EQ(s->Info().stats.bytes_shadow, 0);
    EXPECT_EQ(store.BatcherStats().items, 1);
  }
}

TEST(QualityShadowTest, AShadowOverTheCapIsDroppedAndItsBytesReturn) {
  // Room for the shadow's fixed bytes and a few blocks, not for 100 rows of 2 layers.
  SessionStore store(Options(1.0, 4 * LayerStore::BlockBytes(kLayout)));
  ASSERT_TRUE(store.Create(Params("c-1", 0.5f)).ok());
  std::shared_ptr<Session> s = *store.Get("c-1");
  EXPECT_EQ(store.Quality().shadow_sessions, 1);
  std::mt19937 rng(5);
  Fill(s.get(), 100, 0, &rng);  // the append itself succeeds
  QualityStats st = store.Quality();
  EXPECT_EQ(st.shadow_sessions, 0);
  EXPECT_EQ(st.shadow_bytes, 0);
  EXPECT_EQ(st.shadow_dropped_total, 1);
  EXPECT_EQ(s->Info().stats.bytes_shadow, 0);
  EXPECT_EQ(store.budget().used(), BudgetOfSessions(store));
  OwnedTensor q = RandomTensor({kLayout.num_q_heads, kLayout.head_dim}, &rng);
  DecodeInput in;
  in.session_id = "c-1";
  in.q = q.view;
  ASSERT_TRUE(DecodeThroughBatcher(&store, in).ok());
  EXPECT_EQ(store.Quality().relative_error.count, 0);
}

TEST(QualityShadowTest, AShadowYieldsToTheHostBudget) {
  // What the session takes without a shadow, measured; then a budget 25% above it, less than
  // the shadow's rows need: the appends succeed and the shadow goes.
  int64_t plain = 0;
  {
    SessionStore store(Options(0.0));
    ASSERT_TRUE(store.Create(Params("b-1", 0.5f)).ok());
    std::mt19937 rng(9);
    Fill(store.Get("b-1")->get(), 100, 0, &rng);
    plain = store.budget().used();
  }
  SessionStore store(Options(1.0, 0, plain + plain / 4));
  ASSERT_TRUE(store.Create(Params("b-1", 0.5f)).ok());
  std::mt19937 rng(9);
  Fill(store.Get("b-1")->get(), 100, 0, &rng);
  const QualityStats st = store.Quality();
  EXPECT_EQ(st.shadow_dropped_total, 1);
  EXPECT_EQ(st.shadow_sessions, 0);
  EXPECT_EQ(store.budget().used(), plain);
}

TEST(QualityShadowTest, ASessionsShadowMakesRoomForItsOwnRows) {
  // The budget holds the session with its shadow; the next rows fit only without the shadow.
  SessionStore store(Options(1.0));
  ASSERT_TRUE(store.Create(Params("r-1", 0.5f)).ok());
  std::mt19937 rng(21);
  Fill(store.Get("r-1")->get(), 32, 0, &rng);
  const SessionStats st = (*store.Get("r-1"))->Info().stats;
  SessionStore tight(Options(1.0, 0, st.bytes_accounted + LayerStore::BlockBytes(kLayout)));
  ASSERT_TRUE(tight.Create(Params("r-1", 0.5f)).ok());
  std::mt19937 again(21);
  Fill(tight.Get("r-1")->get(), 32, 0, &again);
  EXPECT_EQ(tight.Quality().shadow_sessions, 1);
  Fill(tight.Get("r-1")->get(), 1, 0, &again);  // one block per layer: two blocks
  EXPECT_EQ(tight.Quality().shadow_sessions, 0);
  EXPECT_EQ(tight.Quality().shadow_dropped_total, 1);
  EXPECT_EQ(tight.budget().used(), BudgetOfSessions(tight));
}

TEST(QualityShadowTest, DeleteAndEvictionReturnTheShadowsBytes) {
  SessionStore store(Options(1.0));
  CreateSessionParams evicted = Params("d-2", 0.7f);
  evicted.ttl = absl::Seconds(1);
  ASSERT_TRUE(store.Create(Params("d-1", 0.7f)).ok());
  ASSERT_TRUE(store.Create(evicted).ok());
  std::mt19937 rng(13);
  Fill(store.Get("d-1")->get(), 100, 0, &rng);
  Fill(store.Get("d-2")->get(), 100, 0, &rng);
  EXPECT_EQ(store.Quality().shadow_sessions, 2);
  const SessionStats st = (*store.Get("d-1"))->Info().stats;
  EXPECT_GT(st.bytes_shadow, 0);
  absl::StatusOr<int64_t> released = store.Delete("d-1");
  ASSERT_TRUE(released.ok());
  EXPECT_EQ(*released, st.bytes_accounted);  // the shadow's bytes included
  EXPECT_EQ(store.EvictExpired(absl::Now() + absl::Hours(1)), 1);
  const QualityStats q = store.Quality();
  EXPECT_EQ(q.shadow_sessions, 0);
  EXPECT_EQ(q.shadow_bytes, 0);
  EXPECT_EQ(q.shadow_dropped_total, 0);
  EXPECT_EQ(store.budget().used(), 0);
}

TEST(QualityShadowTest, AnImportedSessionHasNoShadow) {
  SessionStore store(Options(1.0));
  ASSERT_TRUE(store.Create(Params("i-1", 0.7f)).ok());
  std::shared_ptr<Session> s = *store.Get("i-1");
  std::mt19937 rng(17);
  Fill(s.get(), 100, 0, &rng);
  ASSERT_TRUE(store.Import(s->Export(), "i-2").ok());
  std::shared_ptr<Session> copy = *store.Get("i-2");
  EXPECT_EQ(copy->Info().stats.bytes_shadow, 0);
  EXPECT_EQ(store.Quality().shadow_sessions, 1);
  EXPECT_EQ(store.Quality().shadow_bytes, s->Info().stats.bytes_shadow);
  EXPECT_EQ(store.budget().used(), BudgetOfSessions(store));
  OwnedTensor q = RandomTensor({kLayout.num_q_heads, kLayout.head_dim}, &rng);
  DecodeInput in;
  in.session_id = "i-2";
  in.q = q.view;
  ASSERT_TRUE(DecodeThroughBatcher(&store, in).ok());
  EXPECT_EQ(store.Quality().relative_error.count, 0);
}

}  // namespace
}  // namespace sparsekv
