// The whole server in-process, driven over a real loopback channel: every RPC's happy path,
// its error codes, and that a bad request leaves other sessions intact.
#include "service/kv_cache_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "service/server.h"
#include "sparsekv/v1/kv_cache.grpc.pb.h"
#include "tests/service/test_tensors.h"

namespace sparsekv::service {
namespace {

constexpr int kLayers = 2, kKv = 2, kQ = 8, kDim = 32;

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.metrics_listen = "";
    o.store.host_budget_bytes = 1 << 20;
    o.store.janitor_period = absl::ZeroDuration();
    auto s = Server::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->grpc_port()),
                                       grpc::InsecureChannelCredentials());
    stub_ = v1::KvCacheService::NewStub(channel);
  }

  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return ctx;
  }

  std::string Create(const std::string& id, v1::DType dtype = v1::DTYPE_FLOAT16) {
    v1::CreateSessionRequest req;
    req.set_session_id(id);
    auto* l = req.mutable_layout();
    l->set_num_layers(kLayers);
    l->set_num_kv_heads(kKv);
    l->set_num_q_heads(kQ);
    l->set_head_dim(kDim);
    l->set_dtype(dtype);
    v1::Session s;
    grpc::Status st = stub_->CreateSession(Ctx().get(), req, &s);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return s.id();
  }

  grpc::Status Append(const std::string& id, int tokens, std::mt19937* rng,
                      v1::AppendKVResponse* resp) {
    auto ctx = Ctx();
    auto writer = stub_->AppendKV(ctx.get(), resp);
    for (int layer = 0; layer < kLayers; ++layer) {
      v1::AppendKVRequest req;
      req.set_session_id(id);
      req.set_layer_begin(layer);
      *req.mutable_k() = F32({1, tokens, kKv, kDim}, rng);
      *req.mutable_v() = F32({1, tokens, kKv, kDim}, rng);
      if (!writer->Write(req)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Decode(const std::string& id, const v1::Tensor& q, v1::DecodeResponse* resp) {
    v1::DecodeRequest req;
    auto* item = req.add_items();
    item->set_session_id(id);
    item->set_layer(1);
    *item->mutable_q() = q;
    item->set_want_lse(true);
    return stub_->Decode(Ctx().get(), req, resp);
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::KvCacheService::Stub> stub_;
};

TEST_F(ServiceTest, CreateAppendDecodeReadDelete) {
  std::mt19937 rng(1);
  const std::string id = Create("alpha");
  v1::AppendKVResponse ar;
  ASSERT_TRUE(Append(id, 40, &rng, &ar).ok());
  EXPECT_EQ(ar.messages(), 2u);
  EXPECT_EQ(ar.tokens_appended(), 80u);
  ASSERT_EQ(ar.tokens_per_layer_size(), kLayers);
  EXPECT_EQ(ar.tokens_per_layer(1), 40u);

  // Read layer 1 back and compute attention in float64 here, from the stored fp16 values.
  v1::ReadKVRequest rr;
  rr.set_session_id(id);
  rr.set_layer_begin(1);
  auto ctx = Ctx();
  auto reader = stub_->ReadKV(ctx.get(), rr);
  v1::ReadKVResponse msg;
  std::string k, v;
  while (reader->Read(&msg)) {
    EXPECT_EQ(msg.layer(), 1u);
    EXPECT_EQ(msg.k().dtype(), v1::DTYPE_FLOAT16);
    k += msg.k().data();
    v += msg.v().data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(k.size(), 40u * kKv * kDim * 2);

  std::vector<float> q;
  v1::DecodeResponse dr;
  ASSERT_TRUE(Decode(id, F32({kQ, kDim}, &rng, &q), &dr).ok());
  ASSERT_EQ(dr.results_size(), 1);
  const v1::DecodeResult& r = dr.results(0);
  EXPECT_EQ(r.tokens_attended(), 40u);
  ASSERT_EQ(r.out().data().size(), size_t{kQ} * kDim * 4);
  const float* out = reinterpret_cast<const float*>(r.out().data().data());
  const float* lse = reinterpret_cast<const float*>(r.lse().data().data());
  for (int h = 0; h < kQ; ++h) {
    const int g = h / (kQ / kKv);
    std::vector<double> s(40);
    double m = -INFINITY, z = 0;
    for (int t = 0; t < 40; ++t) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j) {
        dot += q[h * kDim + j] *
               kernels::LoadAsFloat(DType::kFloat16, k.data(), (t * kKv + g) * kDim + j);
      }
      s[t] = dot / std::sqrt(double{kDim});
      m = std::max(m, s[t]);
    }
    for (double x : s) z += std::exp(x - m);
    for (int j = 0; j < kDim; ++j) {
      double want = 0;
      for (int t = 0; t < 40; ++t) {
        want += std::exp(s[t] - m) / z *
                kernels::LoadAsFloat(DType::kFloat16, v.data(), (t * kKv + g) * kDim + j);
      }
      EXPECT_NEAR(out[h * kDim + j], want, 2e-5);
    }
    EXPECT_NEAR(lse[h], m + std::log(z), 2e-5);
  }

  v1::GetSessionRequest gr;
  gr.set_session_id(id);
  v1::Session s;
  ASSERT_TRUE(stub_->GetSession(Ctx().get(), gr, &s).ok());
  EXPECT_EQ(s.stats().tokens_total(), 80u);
  EXPECT_EQ(s.stats().bytes_dense(), 80u * kKv * kDim * 2 * 2);
  EXPECT_EQ(s.stats().decode_steps(), 1u);

  v1::DeleteSessionRequest del;
  del.set_session_id(id);
  v1::DeleteSessionResponse delr;
  ASSERT_TRUE(stub_->DeleteSession(Ctx().get(), del, &delr).ok());
  // Everything the session held: payload, dense-block slack and fixed bytes.
  EXPECT_EQ(delr.bytes_freed(), s.stats().bytes_accounted());
  EXPECT_GT(delr.bytes_freed(), 80u * kKv * kDim * 2 * 2);
  EXPECT_EQ(stub_->GetSession(Ctx().get(), gr, &s).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, BadRequestsGetClearCodesAndOthersKeepTheirData) {
  std::mt19937 rng(2);
  const std::string good = Create("good");
  v1::AppendKVResponse ar;
  ASSERT_TRUE(Append(good, 8, &rng, &ar).ok());
  v1::Tensor q = F32({kQ, kDim}, &rng);
  v1::DecodeResponse before;
  ASSERT_TRUE(Decode(good, q, &before).ok());

  v1::DecodeResponse dr;
  grpc::Status st = Decode("nope", q, &dr);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(st.error_message().find("nope"), std::string::npos);
  st = Decode(good, F32({kQ + 1, kDim}, &rng), &dr);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("q has shape"), std::string::npos);

  v1::CreateSessionRequest bad;
  bad.mutable_layout()->set_num_layers(1);
  bad.mutable_layout()->set_num_kv_heads(3);
  bad.mutable_layout()->set_num_q_heads(4);
  bad.mutable_layout()->set_head_dim(8);
  v1::Session s;
  st = stub_->CreateSession(Ctx().get(), bad, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("multiple"), std::string::npos);
  bad.mutable_layout()->set_num_kv_heads(2);
  bad.mutable_policy()->mutable_k()->set_sparsity(1.0f);
  st = stub_->CreateSession(Ctx().get(), bad, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("policy.k.sparsity"), std::string::npos);

  // Over the 1 MiB budget: 2100 tokens x (K+V) x 2 heads x 32 x 2 B = 525 KiB per layer, so the
  // second layer's message fails.
  const std::string big = Create("big");
  st = Append(big, 2100, &rng, &ar);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("budget"), std::string::npos);

  v1::DecodeResponse after;
  ASSERT_TRUE(Decode(good, q, &after).ok());
  EXPECT_EQ(after.results(0).out().data(), before.results(0).out().data());

  v1::FlushRequest fr;
  fr.set_session_id("missing");
  v1::FlushResponse fresp;
  st = stub_->Flush(Ctx().get(), fr, &fresp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, DecodeStreamAnswersEachMessageAndSurvivesErrors) {
  std::mt19937 rng(3);
  const std::string id = Create("stream", v1::DTYPE_BFLOAT16);
  auto ctx = Ctx();
  auto stream = stub_->DecodeStream(ctx.get());
  for (int i = 0; i < 5; ++i) {
    v1::DecodeRequest req;
    req.set_request_id(100 + i);
    auto* item = req.add_items();
    item->set_session_id(i == 2 ? "missing" : id);
    item->set_layer(0);
    *item->mutable_q() = F32({kQ, kDim}, &rng);
    *item->mutable_new_k() = F32({kKv, kDim}, &rng);
    *item->mutable_new_v() = F32({kKv, kDim}, &rng);
    ASSERT_TRUE(stream->Write(req));
    v1::DecodeResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.request_id(), 100u + i);
    if (i == 2) {
      EXPECT_EQ(resp.error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
      EXPECT_EQ(resp.results_size(), 0);
    } else {
      EXPECT_EQ(resp.error_code(), 0);
      EXPECT_EQ(resp.results(0).tokens_attended(), static_cast<uint64_t>(i < 2 ? i + 1 : i));
    }
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  const std::string text = server_->metrics().Serialize();
  EXPECT_NE(text.find("sparsekv_rpc_requests_total{code=\"OK\",method=\"DecodeStream\"} 4"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sparsekv_rpc_requests_total{code=\"NOT_FOUND\",method=\"DecodeStream\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("sparsekv_sessions 1"), std::string::npos);
}

TEST_F(ServiceTest, ServerInfoNamesKernelAndNoUnimplementedRpcs) {
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(Ctx().get(), v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.kernel_backend(), "cpu");
  EXPECT_FALSE(info.kernel_variant().empty());
  EXPECT_EQ(info.host_budget_bytes(), 1u << 20);
  EXPECT_EQ(info.unimplemented_rpcs_size(), 0);  // snapshots are served
}

TEST_F(ServiceTest, ListSessionsPages) {
  for (const char* id : {"a", "b", "c"}) Create(id);
  v1::ListSessionsRequest req;
  req.set_page_size(2);
  v1::ListSessionsResponse resp;
  ASSERT_TRUE(stub_->ListSessions(Ctx().get(), req, &resp).ok());
  ASSERT_EQ(resp.sessions_size(), 2);
  EXPECT_EQ(resp.next_page_token(), "b");
  req.set_page_token(resp.next_page_token());
  ASSERT_TRUE(stub_->ListSessions(Ctx().get(), req, &resp).ok());
  ASSERT_EQ(resp.sessions_size(), 1);
  EXPECT_EQ(resp.sessions(0).id(), "c");
  EXPECT_TRUE(resp.next_page_token().empty());
}

}  // namespace
}  // namespace sparsekv::service

namespace sparsekv::service {
namespace {

TEST_F(ServiceTest, DecodeComputeIsEchoedAndReportedInForce) {
  v1::CreateSessionRequest req;
  req.set_session_id("f16");
  auto* l = req.mutable_layout();
  l->set_num_layers(1);
  l->set_num_kv_heads(kKv);
  l->set_num_q_heads(kQ);
  l->set_head_dim(kDim);
  req.mutable_policy()->set_decode_compute(v1::DECODE_COMPUTE_FLOAT16);
  v1::Session s;
  ASSERT_TRUE(stub_->CreateSession(Ctx().get(), req, &s).ok());
  const v1::DecodeCompute want_in_force = server_->store().backend().Fp16Arithmetic()
                                              ? v1::DECODE_COMPUTE_FLOAT16
                                              : v1::DECODE_COMPUTE_FLOAT32;
  EXPECT_EQ(s.policy().decode_compute(), v1::DECODE_COMPUTE_FLOAT16);
  EXPECT_EQ(s.stats().decode_compute_in_force(), want_in_force);
  v1::GetSessionRequest gr;
  gr.set_session_id("f16");
  ASSERT_TRUE(stub_->GetSession(Ctx().get(), gr, &s).ok());
  EXPECT_EQ(s.policy().decode_compute(), v1::DECODE_COMPUTE_FLOAT16);
  EXPECT_EQ(s.stats().decode_compute_in_force(), want_in_force);

  // A float32 cache has no fp16 path; an unspecified request is echoed as FLOAT32.
  req.set_session_id("f16-on-f32");
  l->set_dtype(v1::DTYPE_FLOAT32);
  ASSERT_TRUE(stub_->CreateSession(Ctx().get(), req, &s).ok());
  EXPECT_EQ(s.stats().decode_compute_in_force(), v1::DECODE_COMPUTE_FLOAT32);
  req.set_session_id("default");
  req.mutable_policy()->clear_decode_compute();
  ASSERT_TRUE(stub_->CreateSession(Ctx().get(), req, &s).ok());
  EXPECT_EQ(s.policy().decode_compute(), v1::DECODE_COMPUTE_FLOAT32);
  EXPECT_EQ(s.stats().decode_compute_in_force(), v1::DECODE_COMPUTE_FLOAT32);

  req.set_session_id("bad");
  req.mutable_policy()->set_decode_compute(static_cast<v1::DecodeCompute>(5));
  grpc::Status st = stub_->CreateSession(Ctx().get(), req, &s);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("policy.decode_compute"), std::string::npos)
      << st.error_message();
  gr.set_session_id("bad");
  EXPECT_EQ(stub_->GetSession(Ctx().get(), gr, &s).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, FlushPrunesAndDecodeUsesThePrunedCache) {
  std::mt19937 rng(4);
  v1::CreateSessionRequest req;
  req.set_session_id("sparse");
  auto* l = req.mutable_layout();
  l->set_num_layers(1);
  l->set_num_kv_heads(kKv);
  l->set_num_q_heads(kQ);
  l->set_head_dim(kDim);
  req.mutable_policy()->mutable_k()->set_sparsity(0.7f);
  req.mutable_policy()->mutable_v()->set_sparsity(0.5f);
  req.mutable_policy()->set_chunk_tokens(64);
  v1::Session s;
  ASSERT_TRUE(stub_->CreateSession(Ctx().get(), req, &s).ok());
  EXPECT_EQ(s.stats().tokens_per_layer_size(), 1);
  {
    auto ctx = Ctx();
    v1::AppendKVResponse ar;
    auto writer = stub_->AppendKV(ctx.get(), &ar);
    v1::AppendKVRequest a;
    a.set_session_id("sparse");
    *a.mutable_k() = F32({1, 300, kKv, kDim}, &rng);
    *a.mutable_v() = F32({1, 300, kKv, kDim}, &rng);
    ASSERT_TRUE(writer->Write(a));
    writer->WritesDone();
    ASSERT_TRUE(writer->Finish().ok());
  }
  v1::FlushRequest fr;
  fr.set_session_id("sparse");
  v1::FlushResponse resp;
  ASSERT_TRUE(stub_->Flush(Ctx().get(), fr, &resp).ok());
  // All but the newest 32 tokens are compressed (part of it maybe already in the background).
  EXPECT_EQ(resp.stats().bytes_dense(), 32u * kKv * kDim * 2 * 2);
  EXPECT_NEAR(resp.stats().achieved_sparsity_k(), 1.0 - 10.0 / 32, 1e-6);  // k = 10 of 32
  EXPECT_NEAR(resp.stats().achieved_sparsity_v(), 0.5, 1e-6);
  EXPECT_EQ(resp.stats().bytes_compressed(),
            268u * kKv * ((4 + 10 * 2) + (4 + 16 * 2)));  // bitmap + values per row, K and V

  // Decode equals float64 attention over what ReadKV reconstructs (pruned entries zero).
  v1::ReadKVRequest rr;
  rr.set_session_id("sparse");
  auto ctx = Ctx();
  auto reader = stub_->ReadKV(ctx.get(), rr);
  v1::ReadKVResponse msg;
  std::string k, v;
  while (reader->Read(&msg)) {
    k += msg.k().data();
    v += msg.v().data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  size_t zeros = 0;
  for (size_t i = 0; i < 268u * kKv * kDim; ++i) {
    zeros += kernels::LoadAsFloat(DType::kFloat16, k.data(), i) == 0.0f;
  }
  EXPECT_EQ(zeros, 268u * kKv * (kDim - 10));
  const std::string metrics = server_->metrics().Serialize();
  EXPECT_NE(metrics.find("sparsekv_pruned_tokens_total 268"), std::string::npos) << metrics;
  std::vector<float> q;
  v1::DecodeRequest dreq;
  auto* item = dreq.add_items();
  item->set_session_id("sparse");
  *item->mutable_q() = F32({kQ, kDim}, &rng, &q);
  v1::DecodeResponse dr;
  ASSERT_TRUE(stub_->Decode(Ctx().get(), dreq, &dr).ok());
  const float* out = reinterpret_cast<const float*>(dr.results(0).out().data().data());
  for (int h = 0; h < kQ; ++h) {
    const int g = h / (kQ / kKv);
    std::vector<double> sc(300);
    double m = -INFINITY, z = 0;
    for (int t = 0; t < 300; ++t) {
      double dot = 0;
      for (int j = 0; j < kDim; ++j) {
        dot += q[h * kDim + j] *
               kernels::LoadAsFloat(DType::kFloat16, k.data(), (t * kKv + g) * kDim + j);
      }
      sc[t] = dot / std::sqrt(double{kDim});
      m = std::max(m, sc[t]);
    }
    for (double x : sc) z += std::exp(x - m);
    for (int j = 0; j < kDim; ++j) {
      double want = 0;
      for (int t = 0; t < 300; ++t) {
        want += std::exp(sc[t] - m) / z *
                kernels::LoadAsFloat(DType::kFloat16, v.data(), (t * kKv + g) * kDim + j);
      }
      EXPECT_NEAR(out[h * kDim + j], want, 5e-5);
    }
  }
}

}  // namespace
}  // namespace sparsekv::service
