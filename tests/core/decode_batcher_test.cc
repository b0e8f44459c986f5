// The decode batcher: requests from many threads and sessions of different lengths, dtypes and
// policies, checked against the float64 reference over what each session stores; order of
// steps of one session; a failed request beside good ones; the batching window.
#include "core/decode_batcher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/session_store.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::AttentionReference;
using testing::OwnedTensor;
using testing::RandomTensor;

struct Spec {
  std::string id;
  Layout layout;
  float sparsity;
  PruneDirection direction;
  int64_t tokens;
};

SessionStoreOptions BatchingOptions(int decode_threads, absl::Duration window) {
  SessionStoreOptions o = testing::QuietStoreOptions();
  o.decode_threads = decode_threads;
  o.decode_spin_us = 0;
  o.decode_batch_window = window;
  return o;
}

void CreateFilled(SessionStore* store, const Spec& s, std::mt19937* rng) {
  CreateSessionParams p;
  p.id = s.id;
  p.layout = s.layout;
  p.policy.k.sparsity = p.policy.v.sparsity = s.sparsity;
  p.policy.k.direction = p.policy.v.direction = s.direction;
  p.policy.chunk_tokens = 64;
  p.policy.dense_window = 16;
  ASSERT_TRUE(store->Create(p).ok());
  std::shared_ptr<Session> session = *store->Get(s.id);
  const Layout& l = s.layout;
  OwnedTensor k = RandomTensor({l.num_layers, s.tokens, l.num_kv_heads, l.head_dim}, rng);
  OwnedTensor v = RandomTensor({l.num_layers, s.tokens, l.num_kv_heads, l.head_dim}, rng);
  ASSERT_TRUE(session->Append(0, k.view, v.view, {}).ok());
  session->Flush();  // compressed chunks and a dense tail
}

// What the session stores for `layer` (pruned elements 0), as float64 [tokens, heads, dim].
void StoredKv(const Session& s, int layer, std::vector<double>* k, std::vector<double>* v) {
  std::string kb, vb;
  ASSERT_TRUE(s.Read(layer, 0, -1, &kb, &vb).ok());
  const DType dt = s.layout().dtype;
  const size_t n = kb.size() / DTypeSize(dt);
  k->resize(n);
  v->resize(n);
  for (size_t i = 0; i < n; ++i) {
    (*k)[i] = kernels::LoadAsFloat(dt, kb.data(), i);
    (*v)[i] = kernels::LoadAsFloat(dt, vb.data(), i);
  }
}

TEST(DecodeBatcherTest, ConcurrentMixedRequestsMatchTheFloat64Reference) {
  const std::vector<Spec> specs = {
      {"f16-dense", {2, 2, 8, 64, DType::kFloat16}, 0.0f, PruneDirection::kPerToken, 40},
      {"f16-token", {2, 2, 8, 64, DType::kFloat16}, 0.5f, PruneDirection::kPerToken, 300},
      {"bf16-chan", {2, 4, 8, 128, DType::kBFloat16}, 0.7f, PruneDirection::kPerChannel, 200},
      {"f32-token", {1, 1, 4, 32, DType::kFloat32}, 0.7f, PruneDirection::kPerToken, 1000},
      {"f16-short", {2, 2, 2, 64, DType::kFloat16}, 0.5f, PruneDirection::kPerToken, 3},
  };
  for (int threads : {0, 2}) {
    SessionStore store(BatchingOptions(threads, absl::ZeroDuration()));
    std::mt19937 rng(7 + threads);
    for (const Spec& s : specs) CreateFilled(&store, s, &rng);
    // Each client thread sends requests of 1..3 items over random sessions and layers.
    constexpr int kClients = 6, kRequests = 12;
    std::atomic<int> failures{0}, checked{0};
    std::vector<std::thread> clients;
    for (int c = 0; c < kClients; ++c) {
      clients.emplace_back([&, c] {
        std::mt19937 r(100 * threads + c);
        for (int n = 0; n < kRequests; ++n) {
          const int count = 1 + static_cast<int>(r() % 3);
          std::vector<OwnedTensor> qs;
          std::vector<DecodeInput> items;
          std::vector<const Spec*> which;
          for (int i = 0; i < count; ++i) {
            const Spec& s = specs[r() % specs.size()];
            qs.push_back(RandomTensor({s.layout.num_q_heads, s.layout.head_dim}, &r));
            DecodeInput in;
            in.session_id = s.id;
            in.layer = static_cast<int>(r() % s.layout.num_layers);
            in.want_lse = true;
            which.push_back(&s);
            items.push_back(in);
          }
          for (int i = 0; i < count; ++i) items[i].q = qs[i].view;
          std::promise<std::pair<absl::Status, std::vector<DecodeOutput>>> result;
          store.SubmitDecode(items, [&](absl::Status st, std::vector<DecodeOutput> out) {
            result.set_value({std::move(st), std::move(out)});
          });
          auto [st, outputs] = result.get_future().get();
          if (!st.ok() || outputs.size() != items.size()) {
            ++failures;
            continue;
          }
          for (int i = 0; i < count; ++i) {
            const Layout& l = which[i]->layout;
            std::vector<double> k, v;
            StoredKv(**store.Get(which[i]->id), items[i].layer, &k, &v);
            const std::vector<double> q(qs[i].values.begin(), qs[i].values.end());
            const std::vector<double> want = AttentionReference(
                q, k, v, l.num_q_heads, l.num_kv_heads, l.head_dim, which[i]->tokens);
            double vmax = 0;
            for (double x : v) vmax = std::max(vmax, std::abs(x));
            // fp32 accumulation over at most 1000 tokens of unit-scale values.
            const double tol = 2e-5 * vmax;
            for (size_t j = 0; j < want.size(); ++j) {
              if (std::abs(outputs[i].out[j] - want[j]) > tol) {
                ++failures;
                ADD_FAILURE() << which[i]->id << " layer " << items[i].layer << " [" << j
                              << "]: " << outputs[i].out[j] << " vs " << want[j];
                break;
              }
            }
            EXPECT_EQ(outputs[i].tokens_attended, which[i]->tokens);
            EXPECT_EQ(outputs[i].lse.size(), static_cast<size_t>(l.num_q_heads));
            ++checked;
          }
        }
      });
    }
    for (auto& t : clients) t.join();
    EXPECT_EQ(failures.load(), 0) << "decode threads " << threads;
    EXPECT_GE(checked.load(), kClients * kRequests);
    const DecodeBatcherStats stats = store.BatcherStats();
    EXPECT_EQ(stats.requests, kClients * kRequests);
    EXPECT_GE(stats.items, checked.load());
    EXPECT_GE(stats.batches, 1);
  }
}

// Steps that append to one session and layer, queued behind each other, see each other's
// tokens as sequential calls would.
TEST(DecodeBatcherTest, StepsOfOneSessionKeepTheirOrderInABatch) {
  SessionStore store(BatchingOptions(0, absl::Milliseconds(200)));
  std::mt19937 rng(3);
  const Spec s{"s", {1, 2, 4, 32, DType::kFloat16}, 0.0f, PruneDirection::kPerToken, 10};
  CreateFilled(&store, s, &rng);
  constexpr int kSteps = 4;
  std::vector<OwnedTensor> qs, ks;
  for (int i = 0; i < kSteps; ++i) {
    qs.push_back(RandomTensor({4, 32}, &rng));
    ks.push_back(RandomTensor({2, 32}, &rng));
  }
  std::vector<std::promise<std::vector<DecodeOutput>>> results(kSteps);
  for (int i = 0; i < kSteps; ++i) {
    DecodeInput in;
    in.session_id = "s";
    in.q = qs[i].view;
    in.new_k = in.new_v = ks[i].view;
    store.SubmitDecode({in}, [&results, i](absl::Status st, std::vector<DecodeOutput> out) {
      EXPECT_TRUE(st.ok()) << st;
      results[i].set_value(std::move(out));
    });
  }
  for (int i = 0; i < kSteps; ++i) {
    const std::vector<DecodeOutput> out = results[i].get_future().get();
    ASSERT_EQ(out.size(), 1u);
    EXPECT_EQ(out[0].tokens_attended, s.tokens + i + 1);
  }
  // The 200 ms window put all four in one backend call.
  EXPECT_EQ(store.BatcherStats().batches, 1);
  EXPECT_EQ(store.BatcherStats().items, kSteps);
}

TEST(DecodeBatcherTest, ARefusedRequestDoesNotTouchTheOthersInItsBatch) {
  SessionStore store(BatchingOptions(0, absl::Milliseconds(200)));
  std::mt19937 rng(4);
  const Spec s{"s", {1, 2, 4, 32, DType::kFloat16}, 0.0f, PruneDirection::kPerToken, 10};
  CreateFilled(&store, s, &rng);
  OwnedTensor q = RandomTensor({4, 32}, &rng);
  OwnedTensor bad_q = RandomTensor({3, 32}, &rng);
  OwnedTensor k = RandomTensor({2, 32}, &rng);
  DecodeInput good;
  good.session_id = "s";
  good.q = q.view;
  good.new_k = good.new_v = k.view;
  DecodeInput missing = good;
  missing.session_id = "nobody";
  DecodeInput malformed = good;
  malformed.q = bad_q.view;
  std::promise<absl::Status> a, b, c;
  store.SubmitDecode({good}, [&](absl::Status st, std::vector<DecodeOutput>) { a.set_value(st); });
  // Two items, the second bad: the request's first item appends nothing either.
  store.SubmitDecode({good, missing},
                     [&](absl::Status st, std::vector<DecodeOutput>) { b.set_value(st); });
  store.SubmitDecode({malformed},
                     [&](absl::Status st, std::vector<DecodeOutput>) { c.set_value(st); });
  EXPECT_TRUE(a.get_future().get().ok());
  const absl::Status sb = b.get_future().get();
  EXPECT_EQ(sb.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(sb.message().find("items[1]"), std::string::npos);
  EXPECT_EQ(c.get_future().get().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*store.Get("s"))->tokens(0), s.tokens + 1);
}

TEST(DecodeBatcherTest, RequestsQueuedAtStopAreRunAndLaterOnesRunOnTheCaller) {
  std::mt19937 rng(5);
  const Spec s{"s", {1, 2, 4, 32, DType::kFloat16}, 0.0f, PruneDirection::kPerToken, 10};
  auto store = std::make_unique<SessionStore>(BatchingOptions(0, absl::Seconds(30)));
  CreateFilled(store.get(), s, &rng);
  OwnedTensor q = RandomTensor({4, 32}, &rng);
  DecodeInput in;
  in.session_id = "s";
  in.q = q.view;
  std::promise<absl::Status> queued;
  // The 30 s window holds it; Stop runs it at once.
  DecodeBatcher batcher(store.get(), {absl::Seconds(30), 1024, absl::ZeroDuration()});
  batcher.Submit({in}, [&](absl::Status st, std::vector<DecodeOutput>) { queued.set_value(st); });
  batcher.Stop();
  EXPECT_TRUE(queued.get_future().get().ok());
  bool ran = false;
  batcher.Submit({in}, [&](absl::Status st, std::vector<DecodeOutput> out) {
    ran = st.ok() && out.size() == 1;
  });
  EXPECT_TRUE(ran);  // synchronously, on this thread
}

}  // namespace
}  // namespace sparsekv
