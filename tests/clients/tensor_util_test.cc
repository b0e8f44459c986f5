#include "clients/cli/tensor_util.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace sparsekv::cli {
namespace {

TEST(TensorUtilTest, ParsesDTypeNames) {
  EXPECT_EQ(*ParseWireDType("float16"), v1::DTYPE_FLOAT16);
  EXPECT_EQ(*ParseWireDType("BF16"), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(*ParseWireDType("float32"), v1::DTYPE_FLOAT32);
  EXPECT_EQ(ParseWireDType("int8").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorUtilTest, ParsesAndNamesDecodeCompute) {
  EXPECT_EQ(*ParseDecodeCompute("f16"), v1::DECODE_COMPUTE_FLOAT16);
  EXPECT_EQ(*ParseDecodeCompute("FP16"), v1::DECODE_COMPUTE_FLOAT16);
  EXPECT_EQ(*ParseDecodeCompute("f32"), v1::DECODE_COMPUTE_FLOAT32);
  EXPECT_EQ(*ParseDecodeCompute("float32"), v1::DECODE_COMPUTE_FLOAT32);
  EXPECT_EQ(*ParseDecodeCompute(""), v1::DECODE_COMPUTE_UNSPECIFIED);
  EXPECT_EQ(ParseDecodeCompute("bf16").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(DecodeComputeName(v1::DECODE_COMPUTE_FLOAT16), "f16");
  EXPECT_STREQ(DecodeComputeName(v1::DECODE_COMPUTE_FLOAT32), "f32");
  EXPECT_STREQ(DecodeComputeName(v1::DECODE_COMPUTE_UNSPECIFIED), "unspecified");
  // Every name parses back to its value.
  for (v1::DecodeCompute c : {v1::DECODE_COMPUTE_FLOAT32, v1::DECODE_COMPUTE_FLOAT16}) {
    EXPECT_EQ(*ParseDecodeCompute(DecodeComputeName(c)), c);
  }
}

TEST(TensorUtilTest, ConvertsEveryWireDTypeToFloat) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<float> values(12);
  for (float& x : values) x = dist(rng);
  for (v1::DType dt : {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT16, v1::DTYPE_BFLOAT16}) {
    v1::Tensor t;
    t.set_dtype(dt);
    t.add_shape(3);
    t.add_shape(4);
    std::vector<float> want(values.size());
    std::string data;
    for (size_t i = 0; i < values.size(); ++i) {
      if (dt == v1::DTYPE_FLOAT32) {
        want[i] = values[i];
        data.append(reinterpret_cast<const char*>(&values[i]), 4);
      } else {
        const uint16_t h = dt == v1::DTYPE_FLOAT16 ? kernels::FloatToHalf(values[i])
                                                   : kernels::FloatToBFloat16(values[i]);
        want[i] = dt == v1::DTYPE_FLOAT16 ? kernels::HalfToFloat(h) : kernels::BFloat16ToFloat(h);
        data.append(reinterpret_cast<const char*>(&h), 2);
      }
    }
    t.set_data(data);
    absl::StatusOr<std::vector<float>> got = TensorToFloats(t);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want) << WireDTypeName(dt);
  }
}

TEST(TensorUtilTest, TensorToFloatsRejectsBadTensors) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT32);
  t.add_shape(2);
  t.set_data(std::string(7, '\0'));
  EXPECT_EQ(TensorToFloats(t).status().code(), absl::StatusCode::kInvalidArgument);
  t.set_dtype(v1::DTYPE_UNSPECIFIED);
  t.set_data(std::string(8, '\0'));
  EXPECT_EQ(TensorToFloats(t).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorUtilTest, PlanKeepsAllLayersTogetherWhenTheyFit) {
  // 2 layers, 10 tokens, 100-byte rows; K+V of one token of both layers = 400 bytes.
  const std::vector<AppendPiece> p = PlanAppendPieces(2, 10, 100, 1000);
  ASSERT_EQ(p.size(), 5u);  // 2 tokens per piece
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_EQ(p[i].layer_begin, 0);
    EXPECT_EQ(p[i].layer_count, 2);
    EXPECT_EQ(p[i].token_begin, static_cast<int64_t>(2 * i));
    EXPECT_EQ(p[i].tokens, 2);
    EXPECT_LE(2 * p[i].layer_count * p[i].tokens * 100, 1000);
  }
}

TEST(TensorUtilTest, PlanCoversEveryRowExactlyOnce) {
  for (int64_t layers : {1, 3, 7}) {
    for (int64_t tokens : {1, 5, 33}) {
      for (int64_t budget : {1, 150, 1000, 1 << 20}) {
        const std::vector<AppendPiece> pieces = PlanAppendPieces(layers, tokens, 64, budget);
        std::vector<int> seen(static_cast<size_t>(layers * tokens), 0);
        for (const AppendPiece& p : pieces) {
          ASSERT_GE(p.tokens, 1);
          ASSERT_GE(p.layer_count, 1);
          // Over budget only when a single row cannot fit.
          if (budget >= 128) {
            EXPECT_LE(2 * p.layer_count * p.tokens * 64, budget);
          }
          for (int64_t l = p.layer_begin; l < p.layer_begin + p.layer_count; ++l) {
            for (int64_t t = p.token_begin; t < p.token_begin + p.tokens; ++t) {
              ++seen[static_cast<size_t>(l * tokens + t)];
            }
          }
        }
        for (int s : seen) ASSERT_EQ(s, 1) << layers << " " << tokens << " " << budget;
      }
    }
  }
  EXPECT_TRUE(PlanAppendPieces(2, 0, 64, 1000).empty());
}

TEST(TensorUtilTest, SliceForAppendCopiesTheRightRows) {
  NpyArray a;
  a.dtype = NpyDType::kFloat32;
  a.shape = {3, 4, 2, 2};  // layers, tokens, heads, dim
  std::vector<float> v(48);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  a.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
  v1::Tensor t;
  SliceForAppend(a, {1, 2, 1, 2}, &t);  // layers 1..2, tokens 1..2
  EXPECT_EQ(std::vector<int64_t>(t.shape().begin(), t.shape().end()),
            (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(t.dtype(), v1::DTYPE_FLOAT32);
  std::vector<float> got(16);
  ASSERT_EQ(t.data().size(), 64u);
  std::memcpy(got.data(), t.data().data(), 64);
  // Element (l, t, h, d) = l*16 + t*4 + h*2 + d.
  std::vector<float> want;
  for (int l = 1; l <= 2; ++l) {
    for (int tok = 1; tok <= 2; ++tok) {
      for (int e = 0; e < 4; ++e) want.push_back(static_cast<float>(l * 16 + tok * 4 + e));
    }
  }
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace sparsekv::cli
