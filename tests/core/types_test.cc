#include "core/types.h"

#include <gtest/gtest.h>

namespace sparsekv {
namespace {

Layout Good() { return Layout{2, 2, 8, 64, DType::kFloat16}; }

TEST(TypesTest, ValidLayoutPasses) { EXPECT_TRUE(ValidateLayout(Good()).ok()); }

TEST(TypesTest, HeadsThatDoNotDivideAreNamed) {
  Layout l = Good();
  l.num_q_heads = 7;
  absl::Status st = ValidateLayout(l);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("multiple of layout.num_kv_heads"), std::string::npos);
}

TEST(TypesTest, ZeroFieldsAreRejected) {
  for (int field = 0; field < 4; ++field) {
    Layout l = Good();
    (field == 0   ? l.num_layers
     : field == 1 ? l.num_kv_heads
     : field == 2 ? l.num_q_heads
                  : l.head_dim) = 0;
    EXPECT_EQ(ValidateLayout(l).code(), absl::StatusCode::kInvalidArgument) << field;
  }
  Layout l = Good();
  l.head_dim = kMaxHeadDim + 1;
  EXPECT_EQ(ValidateLayout(l).code(), absl::StatusCode::kInvalidArgument);
}

TEST(TypesTest, PolicyRanges) {
  Policy p;
  EXPECT_TRUE(ValidatePolicy(p, Good()).ok());
  p.k.sparsity = 1.0f;
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p.k.sparsity = 0.7f;
  EXPECT_TRUE(ValidatePolicy(p, Good()).ok());
  p.k.sparsity = -0.1f;
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p = Policy();
  p.chunk_tokens = 48;  // not a multiple of 32
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p = Policy();
  p.k.layer_sparsity = {0.5f, 0.7f, 0.1f};  // 3 entries for 2 layers
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p.k.layer_sparsity = {0.5f, 1.0f};
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p.k.layer_sparsity = {0.5f, 0.0f};
  EXPECT_TRUE(ValidatePolicy(p, Good()).ok());
  p = Policy();
  p.group_tokens = 16;
  EXPECT_EQ(ValidatePolicy(p, Good()).code(), absl::StatusCode::kInvalidArgument);
  p = Policy();
  p.decode_compute = DecodeCompute::kFloat16;
  EXPECT_TRUE(ValidatePolicy(p, Good()).ok());
  p.decode_compute = static_cast<DecodeCompute>(7);
  absl::Status st = ValidatePolicy(p, Good());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("policy.decode_compute"), std::string::npos) << st;
}

}  // namespace
}  // namespace sparsekv
