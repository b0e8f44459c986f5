#include "core/session_store.h"

#include <gtest/gtest.h>

#include <memory>
#include <random>

#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

SessionStoreOptions NoJanitor() {
  SessionStoreOptions o;
  o.janitor_period = absl::ZeroDuration();
  return o;
}

CreateSessionParams Params(std::string id = "", std::string tenant = "") {
  CreateSessionParams p;
  p.id = std::move(id);
  p.tenant = std::move(tenant);
  p.layout = Layout{2, 2, 4, 16, DType::kFloat16};
  return p;
}

TEST(SessionStoreTest, CreateGetDelete) {
  SessionStore store(NoJanitor());
  auto info = store.Create(Params());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->tenant, "default");
  EXPECT_EQ(info->ttl, absl::Hours(1));
  EXPECT_TRUE(store.Get(info->id).ok());
  EXPECT_EQ(store.Create(Params(info->id)).status().code(), absl::StatusCode::kAlreadyExists);
  auto freed = store.Delete(info->id);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(store.Get(info->id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Delete(info->id).status().code(), absl::StatusCode::kNotFound);
}

TEST(SessionStoreTest, RejectsBadIdsAndLayouts) {
  SessionStore store(NoJanitor());
  EXPECT_EQ(store.Create(Params("has space")).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Create(Params(std::string(129, 'a'))).status().code(),
            absl::StatusCode::kInvalidArgument);
  CreateSessionParams p = Params();
  p.layout.num_q_heads = 5;
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p = Params();
  p.ttl = absl::Hours(48);
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Stats().sessions, 0);
}

TEST(SessionStoreTest, ListPagesInIdOrderAndFiltersByTenant) {
  SessionStore store(NoJanitor());
  for (const char* id : {"c", "a", "e", "b", "d"}) {
    ASSERT_TRUE(store.Create(Params(id, std::string(id) < "c" ? "x" : "y")).ok());
  }
  std::vector<std::string> seen;
  std::string token;
  do {
    ListSessionsResult r = store.List("", 2, token);
    EXPECT_LE(r.sessions.size(), 2u);
    for (const auto& s : r.sessions) seen.push_back(s.id);
    token = r.next_page_token;
  } while (!token.empty());
  EXPECT_EQ(seen, (std::vector<std::string>{"a", "b", "c", "d", "e"}));
  ListSessionsResult x = store.List("x", 100, "");
  ASSERT_EQ(x.sessions.size(), 2u);
  EXPECT_EQ(x.sessions[0].id, "a");
  EXPECT_TRUE(x.next_page_token.empty());
}

TEST(SessionStoreTest, EvictsOnlyExpiredSessions) {
  SessionStore store(NoJanitor());
  CreateSessionParams p = Params("short");
  p.ttl = absl::Seconds(10);
  ASSERT_TRUE(store.Create(p).ok());
  ASSERT_TRUE(store.Create(Params("long")).ok());  // default 1 h
  EXPECT_EQ(store.EvictExpired(absl::Now() + absl::Seconds(5)), 0);
  EXPECT_EQ(store.EvictExpired(absl::Now() + absl::Seconds(60)), 1);
  EXPECT_EQ(store.Get("short").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.Get("long").ok());
  EXPECT_EQ(store.Stats().evicted_total, 1);
}

TEST(SessionStoreTest, MaxSessions) {
  SessionStoreOptions o = NoJanitor();
  o.max_sessions = 1;
  SessionStore store(o);
  ASSERT_TRUE(store.Create(Params()).ok());
  EXPECT_EQ(store.Create(Params()).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(SessionStoreTest, BatchWithOneBadItemAppendsNothing) {
  SessionStore store(NoJanitor());
  ASSERT_TRUE(store.Create(Params("a")).ok());
  std::mt19937 rng(1);
  auto q = testing::RandomTensor({4, 16}, &rng);
  auto nk = testing::RandomTensor({2, 16}, &rng);
  std::vector<DecodeInput> items(2);
  items[0].session_id = "a";
  items[0].q = q.view;
  items[0].new_k = nk.view;
  items[0].new_v = nk.view;
  items[1].session_id = "missing";
  items[1].q = q.view;
  std::vector<DecodeOutput> out;
  absl::Status st = store.DecodeBatch(items, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(st.message().find("items[1]"), std::string::npos);
  EXPECT_EQ((*store.Get("a"))->tokens(0), 0);
  items[1].session_id = "a";
  items[1].layer = 1;
  ASSERT_TRUE(store.DecodeBatch(items, &out).ok());
  EXPECT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].tokens_attended, 1);
  EXPECT_EQ(out[1].tokens_attended, 0);  // layer 1 is empty: zero output
}

TEST(SessionStoreTest, DeleteReturnsBytesToBudget) {
  SessionStoreOptions o = NoJanitor();
  o.host_budget_bytes = 1 << 20;
  SessionStore store(o);
  ASSERT_TRUE(store.Create(Params("a")).ok());
  std::mt19937 rng(2);
  auto k = testing::RandomTensor({2, 10, 2, 16}, &rng);
  std::shared_ptr<Session> s = *store.Get("a");
  const int64_t fixed = store.Stats().bytes_used;
  EXPECT_EQ(fixed, Session::FixedBytes(s->Info()));
  ASSERT_TRUE(s->Append(0, k.view, k.view, TensorView{}).ok());
  // One 32-row block per layer holds the 10 tokens.
  const int64_t held = fixed + 2 * LayerStore::BlockBytes(s->layout());
  EXPECT_EQ(store.Stats().bytes_used, held);
  EXPECT_EQ(s->Info().stats.bytes_accounted, held);
  EXPECT_GT(held, 2 * 10 * 2 * 2 * 16 * 2);  // more than the payload
  auto freed = store.Delete("a");
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, held);
  EXPECT_EQ(store.Stats().bytes_used, 0);
}

// A pruner job or a running step may still hold a deleted session: its bytes must go back to
// the budget at Delete (not at the last reference), and whatever the holder appends or
// compresses afterwards must not leak into the budget.
TEST(SessionStoreTest, DeleteReleasesBytesWhileTheSessionIsStillHeld) {
  SessionStoreOptions o = NoJanitor();
  o.host_budget_bytes = 1 << 20;
  SessionStore store(o);
  CreateSessionParams p = Params("a");
  p.policy.k.sparsity = 0.5f;
  p.policy.v.sparsity = 0.5f;
  p.policy.chunk_tokens = 32;
  ASSERT_TRUE(store.Create(p).ok());
  std::mt19937 rng(3);
  auto k = testing::RandomTensor({2, 100, 2, 16}, &rng);
  std::shared_ptr<Session> held = *store.Get("a");
  ASSERT_TRUE(held->Append(0, k.view, k.view, TensorView{}).ok());
  ASSERT_GT(store.Stats().bytes_used, 0);
  ASSERT_TRUE(store.Delete("a").ok());
  EXPECT_EQ(store.Stats().bytes_used, 0);
  // The holder keeps working on its copy: appends and compression charge nothing.
  ASSERT_TRUE(held->Append(0, k.view, k.view, TensorView{}).ok());
  held->Flush();
  EXPECT_EQ(store.Stats().bytes_used, 0);
  EXPECT_GT(held->bytes(), 0);
  held.reset();
  EXPECT_EQ(store.Stats().bytes_used, 0);
}

}  // namespace
}  // namespace sparsekv

namespace sparsekv {
namespace {

TEST(SessionStoreLimitsTest, FixedBytesOfAHugeLayoutAreChargedAtCreate) {
  SessionStoreOptions o = NoJanitor();
  o.host_budget_bytes = 4 << 20;
  SessionStore store(o);
  CreateSessionParams p = Params("huge");
  p.layout = Layout{256, 1024, 1024, 512, DType::kFloat16};  // ~1 GiB of scoring statistics
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(store.Stats().bytes_used, 0);
  EXPECT_EQ(store.Stats().sessions, 0);
  ASSERT_TRUE(store.Create(Params("small")).ok());
  EXPECT_EQ(store.Stats().bytes_used, Session::FixedBytes((*store.Get("small"))->Info()));
}

TEST(SessionStoreLimitsTest, IdsLabelsAndTenantsAreBounded) {
  SessionStoreOptions o = NoJanitor();
  SessionStore store(o);
  const std::string long_id(100000, 'a');
  absl::Status st = store.Create(Params(long_id)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(st.message().size(), 200u);  // the id is not echoed
  st = store.Get(long_id).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_LT(st.message().size(), 200u);
  EXPECT_EQ(store.Delete(long_id).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Create(Params("t", std::string(129, 't'))).status().code(),
            absl::StatusCode::kInvalidArgument);
  CreateSessionParams p = Params("labels");
  for (int i = 0; i < 33; ++i) p.labels["k" + std::to_string(i)] = "v";
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.labels.clear();
  p.labels["big"] = std::string(257, 'x');
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.labels.clear();
  p.labels[std::string(65, 'k')] = "v";
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.labels.clear();
  p.labels["ok"] = std::string(256, 'x');
  EXPECT_TRUE(store.Create(p).ok());
  EXPECT_EQ(store.Stats().sessions, 1);
}

TEST(SessionStoreLimitsTest, LayoutMaximaComeFromTheLimits) {
  SessionStoreOptions o = NoJanitor();
  o.limits.max_layers = 4;
  o.limits.max_head_dim = 64;
  SessionStore store(o);
  CreateSessionParams p = Params("a");
  p.layout.num_layers = 5;
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.layout.num_layers = 4;
  p.layout.head_dim = 128;
  EXPECT_EQ(store.Create(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.layout.head_dim = 64;
  EXPECT_TRUE(store.Create(p).ok());
}

TEST(SessionStoreLimitsTest, ABatchWhoseSecondTokenIsOverBudgetAppendsNothing) {
  SessionStoreOptions o = NoJanitor();
  SessionStore probe(o);
  ASSERT_TRUE(probe.Create(Params("x")).ok());
  const int64_t fixed = probe.Stats().bytes_used;
  const int64_t block = LayerStore::BlockBytes(Params().layout);
  // Two sessions and room for exactly one dense block.
  o.host_budget_bytes = 2 * fixed + block;
  SessionStore store(o);
  ASSERT_TRUE(store.Create(Params("a")).ok());
  ASSERT_TRUE(store.Create(Params("b")).ok());
  std::mt19937 rng(5);
  auto q = testing::RandomTensor({4, 16}, &rng);
  auto nk = testing::RandomTensor({2, 16}, &rng);
  std::vector<DecodeInput> items(2);
  for (int i = 0; i < 2; ++i) {
    items[i].session_id = i == 0 ? "a" : "b";
    items[i].q = q.view;
    items[i].new_k = nk.view;
    items[i].new_v = nk.view;
  }
  std::vector<DecodeOutput> out;
  absl::Status st = store.DecodeBatch(items, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("items[1]"), std::string::npos) << st;
  EXPECT_EQ((*store.Get("a"))->tokens(0), 0);  // the first item was not applied
  EXPECT_EQ((*store.Get("b"))->tokens(0), 0);
  EXPECT_EQ(store.Stats().bytes_used, 2 * fixed);
  items.pop_back();  // alone, the first fits
  ASSERT_TRUE(store.DecodeBatch(items, &out).ok());
  EXPECT_EQ((*store.Get("a"))->tokens(0), 1);
  EXPECT_EQ(store.Stats().bytes_used, 2 * fixed + block);
}

TEST(SessionStoreLimitsTest, ReadsCountAsAccessForTheTtl) {
  SessionStore store(NoJanitor());
  CreateSessionParams p = Params("ttl");
  p.ttl = absl::Seconds(2);
  ASSERT_TRUE(store.Create(p).ok());
  absl::SleepFor(absl::Milliseconds(1500));
  ASSERT_TRUE(store.Get("ttl").ok());  // GetSession, ReadKV, Flush all look it up
  EXPECT_EQ(store.EvictExpired(absl::Now() + absl::Milliseconds(1000)), 0);
  EXPECT_EQ(store.EvictExpired(absl::Now() + absl::Seconds(3)), 1);
}

}  // namespace
}  // namespace sparsekv
