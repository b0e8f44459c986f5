#include "service/convert.h"

#include <gtest/gtest.h>

namespace sparsekv::service {
namespace {

v1::Tensor MakeTensor(v1::DType dtype, std::vector<int64_t> shape, size_t bytes) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.mutable_data()->assign(bytes, '\x01');
  return t;
}

TEST(ConvertTest, ViewTensorAcceptsConsistentTensor) {
  auto v = ViewTensor(MakeTensor(v1::DTYPE_FLOAT16, {2, 3}, 12), "q");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->dtype, DType::kFloat16);
  EXPECT_EQ(v->shape, (std::vector<int64_t>{2, 3}));
}

TEST(ConvertTest, ViewTensorNamesTheProblem) {
  struct Bad {
    v1::Tensor t;
    const char* needle;
  } cases[] = {
      {MakeTensor(v1::DTYPE_UNSPECIFIED, {2}, 8), "DTYPE_UNSPECIFIED"},
      {MakeTensor(static_cast<v1::DType>(17), {2}, 8), "enum value 17"},
      {MakeTensor(v1::DTYPE_FLOAT32, {2, 3}, 20), "needs 24"},
      {MakeTensor(v1::DTYPE_FLOAT32, {}, 0), "dimensions"},
      {MakeTensor(v1::DTYPE_FLOAT32, {0, 4}, 0), "empty"},
      {MakeTensor(v1::DTYPE_FLOAT32, {-1}, 0), "empty"},
      {MakeTensor(v1::DTYPE_FLOAT32, {int64_t{1} << 41}, 0), "too large"},
  };
  for (const Bad& c : cases) {
    auto v = ViewTensor(c.t, "q");
    ASSERT_FALSE(v.ok()) << c.needle;
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(v.status().message().find(c.needle), std::string::npos) << v.status();
    EXPECT_EQ(v.status().message().substr(0, 1), "q");
  }
}

TEST(ConvertTest, OptionalTensorMayBeUnset) {
  auto v = ViewOptionalTensor(v1::Tensor(), "new_k");
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->empty());
}

TEST(ConvertTest, CreateRequestDefaultsAndRoundTrip) {
  v1::CreateSessionRequest req;
  req.mutable_layout()->set_num_layers(3);
  req.mutable_layout()->set_num_kv_heads(2);
  req.mutable_layout()->set_num_q_heads(6);
  req.mutable_layout()->set_head_dim(64);
  req.set_ttl_seconds(30);
  (*req.mutable_labels())["model"] = "m";
  auto p = FromProto(req);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->layout.dtype, DType::kFloat16);
  EXPECT_EQ(p->policy.dense_window, 32);
  EXPECT_EQ(p->policy.chunk_tokens, 256);
  EXPECT_EQ(p->ttl, absl::Seconds(30));

  SessionInfo info;
  info.id = "x";
  info.layout = p->layout;
  info.policy = p->policy;
  info.labels = p->labels;
  info.stats.tokens_per_layer = {1, 2, 3};
  v1::Session s;
  ToProto(info, &s);
  EXPECT_EQ(s.layout().num_q_heads(), 6u);
  EXPECT_EQ(s.layout().dtype(), v1::DTYPE_FLOAT16);
  EXPECT_EQ(s.labels().at("model"), "m");
  EXPECT_EQ(s.stats().tokens_per_layer_size(), 3);
}

TEST(ConvertTest, UnknownEnumInPolicyIsRejected) {
  v1::CreateSessionRequest req;
  req.mutable_policy()->mutable_k()->set_scoring(static_cast<v1::Scoring>(9));
  auto p = FromProto(req);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("policy.k.scoring"), std::string::npos);

  req = v1::CreateSessionRequest();
  req.mutable_policy()->set_decode_compute(static_cast<v1::DecodeCompute>(3));
  p = FromProto(req);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("policy.decode_compute: unknown enum value 3"),
            std::string::npos)
      << p.status();
}

TEST(ConvertTest, DecodeComputeRoundTrips) {
  // Unspecified is the server default, fp32, and is echoed resolved.
  struct Case {
    v1::DecodeCompute wire;
    DecodeCompute core;
    v1::DecodeCompute echo;
  } cases[] = {
      {v1::DECODE_COMPUTE_UNSPECIFIED, DecodeCompute::kFloat32, v1::DECODE_COMPUTE_FLOAT32},
      {v1::DECODE_COMPUTE_FLOAT32, DecodeCompute::kFloat32, v1::DECODE_COMPUTE_FLOAT32},
      {v1::DECODE_COMPUTE_FLOAT16, DecodeCompute::kFloat16, v1::DECODE_COMPUTE_FLOAT16},
  };
  for (const Case& c : cases) {
    v1::CreateSessionRequest req;
    req.mutable_policy()->set_decode_compute(c.wire);
    auto p = FromProto(req);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->policy.decode_compute, c.core) << c.wire;
    SessionInfo info;
    info.policy = p->policy;
    info.stats.decode_compute_in_force = c.core;
    v1::Session s;
    ToProto(info, &s);
    EXPECT_EQ(s.policy().decode_compute(), c.echo);
    EXPECT_EQ(s.stats().decode_compute_in_force(), c.echo);
  }
}

TEST(ConvertTest, FloatsToTensorEncodesDtype) {
  v1::Tensor t;
  FloatsToTensor({1.0f, -2.0f}, {2}, DType::kBFloat16, &t);
  EXPECT_EQ(t.dtype(), v1::DTYPE_BFLOAT16);
  ASSERT_EQ(t.data().size(), 4u);
  EXPECT_EQ(kernels::LoadAsFloat(DType::kBFloat16, t.data().data(), 1), -2.0f);
}

}  // namespace
}  // namespace sparsekv::service
