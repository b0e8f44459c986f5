// Exactness of the fp16/bf16 conversions: round trips and round-to-nearest-even.
#include "kernels/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace sparsekv::kernels {
namespace {

TEST(DTypeTest, HalfRoundTripsEveryNonNanValue) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << "half bits " << h << " value " << f;
  }
}

TEST(DTypeTest, HalfKnownValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // rounds to infinity
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);             // tie to even (0)
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -25)), 0x0001);             // above the tie
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie to even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie to even (up)
}

// For random floats the conversion picks the nearer neighbour (property of rounding).
TEST(DTypeTest, HalfRoundsToNearest) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exp_dist(-26.0f, 16.0f);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::exp2(exp_dist(rng)) * ((i & 1) ? -1.0f : 1.0f);
    if (std::fabs(f) >= 65504.0f) continue;
    const uint16_t h = FloatToHalf(f);
    const double got = HalfToFloat(h);
    // Neighbours one ulp either side in the half encoding (same sign).
    const double up = HalfToFloat(static_cast<uint16_t>(h + 1));
    const double err = std::fabs(got - f);
    EXPECT_LE(err, std::fabs(up - f)) << f;
    if ((h & 0x7fff) != 0) {
      const double down = HalfToFloat(static_cast<uint16_t>(h - 1));
      EXPECT_LE(err, std::fabs(down - f)) << f;
    }
  }
}

TEST(DTypeTest, BFloat16RoundTripsAndRounds) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToBFloat16(f), b);
  }
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie to even
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie to even (up)
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
}

TEST(DTypeTest, ConvertElementsMatchesScalar) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> src(1000);
  for (float& x : src) x = dist(rng);
  std::vector<uint16_t> half(src.size());
  ConvertElements(DType::kFloat32, src.data(), DType::kFloat16, half.data(), src.size());
  std::vector<uint16_t> bf(src.size());
  ConvertElements(DType::kFloat16, half.data(), DType::kBFloat16, bf.data(), src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    EXPECT_EQ(half[i], FloatToHalf(src[i]));
    EXPECT_EQ(bf[i], FloatToBFloat16(HalfToFloat(half[i])));
  }
}

}  // namespace
}  // namespace sparsekv::kernels

namespace sparsekv::kernels {
namespace {

// The bulk conversions (SIMD where the CPU has it) equal the scalar ones on every finite
// half and on random floats including subnormal, overflowing and odd lengths.
TEST(DTypeTest, BulkConversionsMatchScalarExhaustively) {
  std::vector<uint16_t> halves;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    if (!std::isnan(HalfToFloat(static_cast<uint16_t>(h)))) halves.push_back(h);
  }
  std::vector<float> f(halves.size());
  ConvertElements(DType::kFloat16, halves.data(), DType::kFloat32, f.data(), f.size());
  for (size_t i = 0; i < f.size(); ++i)
    ASSERT_EQ(FloatBits(f[i]), FloatBits(HalfToFloat(halves[i])));
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> e(-30.0f, 17.0f);
  std::vector<float> x(100003);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::exp2(e(rng)) * ((i & 1) ? -1.0f : 1.0f);
  std::vector<uint16_t> h(x.size());
  ConvertElements(DType::kFloat32, x.data(), DType::kFloat16, h.data(), h.size());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(h[i], FloatToHalf(x[i])) << x[i];
}

}  // namespace
}  // namespace sparsekv::kernels
