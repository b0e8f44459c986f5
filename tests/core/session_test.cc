// Session: append/decode/read semantics on random data against a float64 reference.
#include "core/session.h"

#include <gtest/gtest.h>

#include <thread>

#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::OwnedTensor;
using testing::RandomTensor;
using testing::Stored;

using testing::Fixture;

class SessionDecodeTest : public ::testing::TestWithParam<std::tuple<int, int, int64_t, DType>> {};

TEST_P(SessionDecodeTest, DecodeMatchesFloat64ReferenceOverStoredValues) {
  const auto [group, head_dim, tokens, dtype] = GetParam();
  const int kv = 2, q_heads = kv * group, layers = 2;
  Fixture f(Layout{layers, kv, q_heads, head_dim, dtype});
  std::mt19937 rng(static_cast<uint32_t>(tokens * 31 + head_dim + group));
  OwnedTensor k = RandomTensor({layers, tokens, kv, head_dim}, &rng);
  OwnedTensor v = RandomTensor({layers, tokens, kv, head_dim}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  OwnedTensor q = RandomTensor({q_heads, head_dim}, &rng);
  OwnedTensor nk = RandomTensor({kv, head_dim}, &rng);
  OwnedTensor nv = RandomTensor({kv, head_dim}, &rng);

  DecodeInput in;
  in.layer = 1;
  in.q = q.view;
  in.new_k = nk.view;
  in.new_v = nv.view;
  in.want_lse = true;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  EXPECT_EQ(out.tokens_attended, tokens + 1);

  // Reference over layer 1's stored (rounded) rows plus the new token.
  const size_t layer_elems = static_cast<size_t>(tokens) * kv * head_dim;
  std::vector<double> kr, vr, qr(q.values.begin(), q.values.end());
  for (size_t i = 0; i < layer_elems; ++i) {
    kr.push_back(Stored(dtype, k.values[layer_elems + i]));
    vr.push_back(Stored(dtype, v.values[layer_elems + i]));
  }
  for (size_t i = 0; i < nk.values.size(); ++i) {
    kr.push_back(Stored(dtype, nk.values[i]));
    vr.push_back(Stored(dtype, nv.values[i]));
  }
  std::vector<double> want =
      testing::AttentionReference(qr, kr, vr, q_heads, kv, head_dim, tokens + 1);
  // The kernel accumulates in float64 from the same stored values: only the fp32 output
  // rounding and the fp32 scale differ, a few fp32 ulps.
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(out.out[i], want[i], 2e-5) << i;
  EXPECT_EQ(f.session->tokens(0), tokens);
  EXPECT_EQ(f.session->tokens(1), tokens + 1);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SessionDecodeTest,
    ::testing::Combine(::testing::Values(1, 4), ::testing::Values(64, 128),
                       // 1500 tokens x 2 KV heads: an all-dense-tail layer split over threads.
                       ::testing::Values(int64_t{1}, int64_t{27}, int64_t{129}, int64_t{1500}),
                       ::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32)));

TEST(SessionTest, ReadReturnsStoredRowsInRequestLayout) {
  Fixture f(Layout{1, 3, 3, 8, DType::kFloat16});
  std::mt19937 rng(5);
  OwnedTensor k = RandomTensor({1, 10, 3, 8}, &rng);
  OwnedTensor v = RandomTensor({1, 10, 3, 8}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  std::string ko, vo;
  auto rows = f.session->Read(0, 2, 5, &ko, &vo);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(*rows, 5);
  ASSERT_EQ(ko.size(), 5u * 3 * 8 * 2);
  for (size_t i = 0; i < 5 * 3 * 8; ++i) {
    EXPECT_EQ(kernels::LoadAsFloat(DType::kFloat16, ko.data(), i),
              Stored(DType::kFloat16, k.values[2 * 24 + i]));
    EXPECT_EQ(kernels::LoadAsFloat(DType::kFloat16, vo.data(), i),
              Stored(DType::kFloat16, v.values[2 * 24 + i]));
  }
  EXPECT_EQ(f.session->Read(0, 8, 5, &ko, &vo).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SessionTest, BadShapesAreNamed) {
  Fixture f(Layout{2, 2, 4, 16, DType::kFloat16});
  std::mt19937 rng(9);
  OwnedTensor k = RandomTensor({1, 4, 2, 8}, &rng);  // head_dim 8, want 16
  absl::Status st = f.session->Append(0, k.view, k.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("shape"), std::string::npos);
  OwnedTensor k2 = RandomTensor({2, 4, 2, 16}, &rng);
  st = f.session->Append(1, k2.view, k2.view, TensorView{}).status();  // layers [1, 3) of 2
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layers"), std::string::npos);
  OwnedTensor v3 = RandomTensor({2, 5, 2, 16}, &rng);
  EXPECT_EQ(f.session->Append(0, k2.view, v3.view, TensorView{}).status().code(),
            absl::StatusCode::kInvalidArgument);

  DecodeInput in;
  OwnedTensor q = RandomTensor({3, 16}, &rng);
  in.q = q.view;
  st = f.session->CheckDecode(in);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("q has shape [3, 16]"), std::string::npos);
  OwnedTensor q2 = RandomTensor({4, 16}, &rng);
  in.q = q2.view;
  in.layer = 2;
  EXPECT_EQ(f.session->CheckDecode(in).code(), absl::StatusCode::kInvalidArgument);
  in.layer = 0;
  OwnedTensor nk = RandomTensor({2, 16}, &rng);
  in.new_k = nk.view;  // without new_v
  EXPECT_EQ(f.session->CheckDecode(in).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.session->tokens(0), 0);
}

TEST(SessionTest, OverBudgetAppendChangesNothing) {
  const Layout layout{1, 1, 1, 8, DType::kFloat16};
  Fixture f(layout, /*budget=*/layout.token_bytes() * 10);
  std::mt19937 rng(11);
  OwnedTensor k = RandomTensor({1, 8, 1, 8}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  OwnedTensor k2 = RandomTensor({1, 3, 1, 8}, &rng);
  absl::Status st = f.session->Append(0, k2.view, k2.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(f.session->tokens(0), 8);
  EXPECT_EQ(f.env.budget->used(), 8 * layout.token_bytes());
  f.session.reset();
  EXPECT_EQ(f.env.budget->used(), 0);  // released on destruction
}

TEST(SessionTest, ConcurrentAppendAndDecodeStayConsistent) {
  // Decoders run while a writer appends: every decode must see a whole number of tokens and
  // produce finite output (no torn rows, no crash under sanitizers).
  Fixture f(Layout{1, 2, 4, 32, DType::kFloat16});
  std::mt19937 rng(13);
  OwnedTensor k = RandomTensor({1, 16, 2, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    std::mt19937 wrng(17);
    for (int i = 0; i < 200; ++i) {
      OwnedTensor kk = RandomTensor({1, 4, 2, 32}, &wrng);
      ASSERT_TRUE(f.session->Append(0, kk.view, kk.view, TensorView{}).ok());
    }
    stop = true;
  });
  OwnedTensor q = RandomTensor({4, 32}, &rng);
  int64_t last = 0;
  while (!stop) {
    DecodeInput in;
    in.q = q.view;
    DecodeOutput out;
    ASSERT_TRUE(f.session->Decode(in, &out).ok());
    EXPECT_EQ(out.tokens_attended % 4, 0);
    EXPECT_GE(out.tokens_attended, last);
    last = out.tokens_attended;
    for (float x : out.out) ASSERT_TRUE(std::isfinite(x));
  }
  writer.join();
  EXPECT_EQ(f.session->tokens(0), 16 + 800);
}

}  // namespace
}  // namespace sparsekv
