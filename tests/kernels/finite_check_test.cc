// FindUnstorable: NaN/Inf in every source dtype, and finite values that round to Inf in the
// storage dtype, found at their index; values just inside the range pass.
#include "kernels/finite_check.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace sparsekv::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

template <typename T>
std::vector<T> Convert(const std::vector<float>& v, DType to) {
  std::vector<T> out(v.size());
  ConvertElements(DType::kFloat32, v.data(), to, out.data(), v.size());
  return out;
}

TEST(FiniteCheckTest, CleanRandomInputPassesInEveryDtype) {
  const std::vector<float> v = Random(10000, 1);
  for (DType storage : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), storage), -1);
    EXPECT_EQ(FindUnstorable(DType::kFloat16, Convert<uint16_t>(v, DType::kFloat16).data(),
                             v.size(), storage),
              -1);
    EXPECT_EQ(FindUnstorable(DType::kBFloat16, Convert<uint16_t>(v, DType::kBFloat16).data(),
                             v.size(), storage),
              -1);
  }
}

TEST(FiniteCheckTest, FindsTheFirstNanOrInfAtItsIndex) {
  // Indexes on both sides of the 4096-element scan blocks.
  for (size_t at : {size_t{0}, size_t{4095}, size_t{4096}, size_t{9999}}) {
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      std::vector<float> v = Random(10000, 2);
      v[at] = bad;
      if (at + 7 < v.size()) v[at + 7] = bad;  // a later one is not reported
      EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kFloat32),
                static_cast<int64_t>(at));
      EXPECT_EQ(FindUnstorable(DType::kFloat16, Convert<uint16_t>(v, DType::kFloat16).data(),
                               v.size(), DType::kFloat32),
                static_cast<int64_t>(at));
      EXPECT_EQ(FindUnstorable(DType::kBFloat16, Convert<uint16_t>(v, DType::kBFloat16).data(),
                               v.size(), DType::kFloat16),
                static_cast<int64_t>(at));
    }
  }
}

TEST(FiniteCheckTest, FiniteValuesThatOverflowTheStorageDtypeAreFound) {
  std::vector<float> v = Random(100, 3);
  v[40] = 65504.0f;   // largest fp16: stays finite
  v[41] = -65519.0f;  // rounds down to -65504
  EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kFloat16), -1);
  v[50] = 65520.0f;  // rounds to Inf in fp16
  EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kFloat16), 50);
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(v[50]))));
  EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kBFloat16), -1);
  EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kFloat32), -1);
  // fp32 near its maximum rounds to Inf in bf16; bf16 above 65504 overflows fp16.
  v[60] = std::numeric_limits<float>::max();
  EXPECT_TRUE(std::isinf(BFloat16ToFloat(FloatToBFloat16(v[60]))));
  EXPECT_EQ(FindUnstorable(DType::kFloat32, v.data(), v.size(), DType::kBFloat16), 60);
  std::vector<float> w = Random(100, 4);
  w[70] = 70000.0f;
  EXPECT_EQ(FindUnstorable(DType::kBFloat16, Convert<uint16_t>(w, DType::kBFloat16).data(),
                           w.size(), DType::kFloat16),
            70);
  EXPECT_EQ(FindUnstorable(DType::kBFloat16, Convert<uint16_t>(w, DType::kBFloat16).data(),
                           w.size(), DType::kFloat32),
            -1);
}

}  // namespace
}  // namespace sparsekv::kernels
