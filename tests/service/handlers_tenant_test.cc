// Tenant isolation in the handlers (service/handlers.h with service/auth.h's Caller): every RPC
// that names a session answers another tenant's session exactly as an unknown id, requests
// that name another tenant are PERMISSION_DENIED for users, admins see everything, and the
// per-tenant session quota holds.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "service/auth.h"
#include "service/handlers.h"
#include "tests/service/test_tensors.h"

namespace sparsekv::service {
namespace {

constexpr int kLayers = 1, kKv = 1, kQ = 2, kDim = 16;

class HandlersTenantTest : public ::testing::Test {
 protected:
  HandlersTenantTest()
      : store_(Options()),
        metrics_(&store_, BuildInfo{}),
        h_(&store_, &metrics_, BuildInfo{}, ServiceLimits{}) {}

  static SessionStoreOptions Options() {
    SessionStoreOptions o;
    o.janitor_period = absl::ZeroDuration();
    o.decode_threads = 0;
    o.max_sessions_per_tenant = 3;
    return o;
  }

  absl::Status Create(const Caller& c, const std::string& id, const std::string& tenant = "",
                      v1::Session* out = nullptr) {
    v1::CreateSessionRequest req;
    req.set_session_id(id);
    req.set_tenant(tenant);
    v1::Layout* l = req.mutable_layout();
    l->set_num_layers(kLayers);
    l->set_num_kv_heads(kKv);
    l->set_num_q_heads(kQ);
    l->set_head_dim(kDim);
    l->set_dtype(v1::DTYPE_FLOAT32);
    v1::Session s;
    return h_.CreateSession(c, req, {}, out ? out : &s);
  }

  absl::Status Append(const Caller& c, const std::string& id) {
    AppendCall call(&h_, c);
    v1::AppendKVRequest req;
    req.set_session_id(id);
    *req.mutable_k() = F32({kLayers, 8, kKv, kDim}, &rng_);
    *req.mutable_v() = F32({kLayers, 8, kKv, kDim}, &rng_);
    absl::Status st = call.Take(absl::OkStatus(), req, {});
    if (!st.ok()) return st;
    v1::AppendKVResponse out;
    return call.Finish(&out);
  }

  absl::Status Decode(const Caller& c, const std::string& id) {
    v1::DecodeRequest req;
    v1::DecodeItem* item = req.add_items();
    item->set_session_id(id);
    *item->mutable_q() = F32({kQ, kDim}, &rng_);
    v1::DecodeResponse out;
    return h_.Decode(c, req, {}, &out);
  }

  // Every RPC that names a session, as `c` on `id`: the statuses in a fixed order.
  std::vector<absl::Status> NameSession(const Caller& c, const std::string& id) {
    std::vector<absl::Status> out;
    v1::GetSessionRequest get;
    get.set_session_id(id);
    v1::Session s;
    out.push_back(h_.GetSession(c, get, &s));
    out.push_back(Append(c, id));
    out.push_back(Decode(c, id));
    v1::DecodeResponse stream_out;
    v1::DecodeRequest stream_req;
    stream_req.add_items()->set_session_id(id);
    *stream_req.mutable_items(0)->mutable_q() = F32({kQ, kDim}, &rng_);
    out.push_back(h_.DecodeStreamMessage(c, stream_req, &stream_out));
    v1::FlushRequest flush;
    flush.set_session_id(id);
    out.push_back(h_.FlushTarget(c, flush, {}).status());
    v1::ReadKVRequest read;
    read.set_session_id(id);
    out.push_back(ReadCall::Start(&h_, c, read).status());
    v1::ExportSessionRequest exp;
    exp.set_session_id(id);
    out.push_back(ExportCall::Start(&h_, c, exp).status());
    v1::DeleteSessionRequest del;
    del.set_session_id(id);
    v1::DeleteSessionResponse d;
    out.push_back(h_.DeleteSession(c, del, &d));
    return out;
  }

  std::vector<std::string> List(const Caller& c, const std::string& tenant,
                                absl::Status* st = nullptr) {
    v1::ListSessionsRequest req;
    req.set_tenant(tenant);
    v1::ListSessionsResponse resp;
    absl::Status s = h_.ListSessions(c, req, &resp);
    if (st) *st = s;
    std::vector<std::string> ids;
    for (const v1::Session& one : resp.sessions()) ids.push_back(one.id());
    return ids;
  }

  std::mt19937 rng_{14};
  SessionStore store_;
  Metrics metrics_;
  Handlers h_;
  const Caller alpha_{"alpha", Role::kUser};
  const Caller bravo_{"bravo", Role::kUser};
  const Caller admin_{"ops", Role::kAdmin};
};

TEST_F(HandlersTenantTest, AnotherTenantsSessionAnswersAsAnUnknownId) {
  ASSERT_TRUE(Create(bravo_, "b-1").ok());
  ASSERT_TRUE(Append(bravo_, "b-1").ok());
  const std::vector<absl::Status> foreign = NameSession(alpha_, "b-1");
  const std::vector<absl::Status> unknown = NameSession(alpha_, "b-1-unknown");
  ASSERT_EQ(foreign.size(), unknown.size());
  for (size_t i = 0; i < foreign.size(); ++i) {
    EXPECT_EQ(foreign[i].code(), absl::StatusCode::kNotFound) << i << ": " << foreign[i];
    // Same words, the id aside: nothing tells that the session exists.
    std::string message(foreign[i].message());
    std::string other(unknown[i].message());
    message.replace(message.find("b-1"), 3, "ID");
    other.replace(other.find("b-1-unknown"), 11, "ID");
    EXPECT_EQ(message, other) << i;
  }
  // Still there, untouched: the owner reads it, and nothing was appended by the other tenant.
  v1::GetSessionRequest get;
  get.set_session_id("b-1");
  v1::Session s;
  ASSERT_TRUE(h_.GetSession(bravo_, get, &s).ok());
  EXPECT_EQ(s.stats().tokens_per_layer(0), 8u);
  EXPECT_EQ(s.tenant(), "bravo");
}

TEST_F(HandlersTenantTest, OwnersAndAdminsReachTheSession) {
  ASSERT_TRUE(Create(alpha_, "a-1").ok());
  for (const Caller* c : {&alpha_, &admin_}) {
    ASSERT_TRUE(Append(*c, "a-1").ok());
    EXPECT_TRUE(Decode(*c, "a-1").ok());
  }
  const std::vector<absl::Status> all = NameSession(admin_, "a-1");
  for (size_t i = 0; i < all.size(); ++i) EXPECT_TRUE(all[i].ok()) << i << ": " << all[i];
}

TEST_F(HandlersTenantTest, UsersCreateAndListOnlyInTheirTenant) {
  v1::Session s;
  ASSERT_TRUE(Create(alpha_, "a-1", "", &s).ok());
  EXPECT_EQ(s.tenant(), "alpha");  // an empty tenant is the caller's
  ASSERT_TRUE(Create(alpha_, "a-2", "alpha").ok());
  EXPECT_EQ(Create(alpha_, "a-3", "bravo").code(), absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(Create(bravo_, "b-1").ok());
  ASSERT_TRUE(Create(admin_, "x-1", "bravo").ok());  // an admin files anywhere
  ASSERT_TRUE(Create(admin_, "o-1", "", &s).ok());
  EXPECT_EQ(s.tenant(), "ops");

  EXPECT_EQ(List(alpha_, ""), (std::vector<std::string>{"a-1", "a-2"}));
  EXPECT_EQ(List(alpha_, "alpha"), (std::vector<std::string>{"a-1", "a-2"}));
  absl::Status st;
  EXPECT_TRUE(List(alpha_, "bravo", &st).empty());
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(List(bravo_, ""), (std::vector<std::string>{"b-1", "x-1"}));
  EXPECT_EQ(List(admin_, ""), (std::vector<std::string>{"a-1", "a-2", "b-1", "o-1", "x-1"}));
  EXPECT_EQ(List(admin_, "bravo"), (std::vector<std::string>{"b-1", "x-1"}));
}

TEST_F(HandlersTenantTest, UsersImportOnlyIntoTheirTenant) {
  ASSERT_TRUE(Create(bravo_, "b-1").ok());
  ASSERT_TRUE(Append(bravo_, "b-1").ok());
  std::vector<v1::SessionChunk> pieces;
  {
    v1::ExportSessionRequest req;
    req.set_session_id("b-1");
    auto call = ExportCall::Start(&h_, bravo_, req);
    ASSERT_TRUE(call.ok());
    v1::SessionChunk piece;
    absl::Status st;
    while ((*call)->Next(&piece, &st)) pieces.push_back(piece);
  }
  v1::DeleteSessionRequest del;
  del.set_session_id("b-1");
  v1::DeleteSessionResponse d;
  ASSERT_TRUE(h_.DeleteSession(bravo_, del, &d).ok());
  auto import = [&](const Caller& c) {
    ImportCall call(&h_, c);
    for (const v1::SessionChunk& p : pieces) {
      absl::Status st = call.Take(absl::OkStatus(), p);
      if (!st.ok()) return st;
    }
    v1::Session out;
    return call.Finish(&out);
  };
  EXPECT_EQ(import(alpha_).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(import(bravo_).ok());
}

TEST_F(HandlersTenantTest, SessionQuotaPerTenant) {
  for (const char* id : {"a-1", "a-2", "a-3"}) ASSERT_TRUE(Create(alpha_, id).ok());
  EXPECT_EQ(Create(alpha_, "a-4").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Create(bravo_, "b-1").ok());  // other tenants are not affected
  v1::DeleteSessionRequest del;
  del.set_session_id("a-1");
  v1::DeleteSessionResponse d;
  ASSERT_TRUE(h_.DeleteSession(alpha_, del, &d).ok());
  EXPECT_TRUE(Create(alpha_, "a-4").ok());  // a deleted session frees its place
}

// A query of the wrong rank is refused by the batcher's admission; the answer is built only
// from admitted shapes (a one-dimensional q once read past its shape).
TEST_F(HandlersTenantTest, DecodeRefusesAQueryOfTheWrongRank) {
  ASSERT_TRUE(Create(alpha_, "q-rank").ok());
  ASSERT_TRUE(Append(alpha_, "q-rank").ok());
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{kQ * kDim}, std::vector<int64_t>{1, kQ, kDim}}) {
    v1::DecodeRequest req;
    v1::DecodeItem* item = req.add_items();
    item->set_session_id("q-rank");
    *item->mutable_q() = F32(shape, &rng_);
    v1::DecodeResponse out;
    const absl::Status st = h_.Decode(alpha_, req, {}, &out);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_EQ(out.results_size(), 0);
  }
  EXPECT_TRUE(Decode(alpha_, "q-rank").ok());
}

}  // namespace
}  // namespace sparsekv::service
