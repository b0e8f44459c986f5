// DecodeCompute::kFloat16 (fp16 arithmetic on AVX512-FP16) against the float64 reference, and
// the fallbacks that keep it exact where fp16 cannot serve: other dtypes and variants (bitwise
// equal to fp32), fp16 overflow in K or V and non-finite inputs (recomputed in fp32, so fp32
// tolerances apply).
//
// Tolerance of the fp16 path. The unit roundoff of fp16 is u = 2^-11 = 4.9e-4. A score passes
// through the rounding of q * scale, head_dim / 32 fused multiply-adds per lane and three
// 2-way folds, all in fp16; a V element through one fp16 multiply-add per row of a 64-row
// block. On N(0,1) data that gives output errors of ~1e-3 relative RMS (measured: 0.5e-3 to
// 1.4e-3 across these shapes; FP16_TEST_PRINT=1 prints them), so 5e-3 leaves headroom while any
// indexing or permutation error (outputs of the wrong rows, heads or channels) is O(1). The
// log-sum-exp depends on the scores only: |error| <= 8 u max_t sum_c |scale q_c k_c| bounds it
// (worst case, all roundings aligned).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/reduced_arithmetic_harness.h"

namespace sparsekv::kernels {
namespace {

constexpr double kU = 1.0 / 2048;  // fp16 unit roundoff

// The fp16 tolerance of the header comment: output within 5e-3 relative RMS, every element
// finite, lse within the score bound.
void ExpectFp16Accurate(const Problem& pr, const std::vector<float>& want,
                        const std::vector<float>& want_lse, const std::vector<float>& got,
                        const std::vector<float>& lse) {
  ExpectRelRmsAccurate(want, want_lse, got, lse, 5e-3, 8 * kU * ScoreMagnitude(pr) + 1e-5,
                       "FP16_TEST_PRINT");
}

std::vector<Shape> Shapes() {
  const SectionKind T = SectionKind::kPerToken, C = SectionKind::kPerChannel,
                    D = SectionKind::kDense;
  return {
      {4, 128, 3, 256, 45, T, T, 0.7},   // the benchmark's shape, odd dense tail
      {4, 128, 2, 256, 32, T, T, 0.5},   //
      {1, 64, 2, 129, 3, T, T, 0.7},     // MHA, odd rows per chunk (odd row paired with itself)
      {2, 256, 1, 81, 27, T, T, 0.5},    // D 256: 8 words, V in slices
      {3, 100, 2, 33, 9, T, T, 0.7},     // partial last word (D % 32 = 4), 3 heads
      {5, 136, 1, 65, 70, T, T, 0.6},    // tiles 4 + 1: both K reductions in one call
      {8, 128, 1, 64, 1, T, T, 0.7},     // tile of 8 (two 4-head reduction groups)
      {12, 64, 1, 64, 2, T, T, 0.5},     // 8 + 4
      {17, 64, 1, 40, 2, T, T, 0.7},     // 8 + 8 + 1, softmax over 16 + 1 heads
      {4, 128, 2, 128, 5, D, D, 0.0},    // dense chunks: the fp16 dense path
      {4, 128, 0, 256, 257, D, D, 0.0},  // dense span only
      {4, 128, 2, 64, 5, T, C, 0.7},     // per-channel V stays fp32, K fp16
      {4, 128, 2, 64, 5, C, T, 0.7},     // per-channel K stays fp32, V fp16
  };
}

TEST(Fp16ArithmeticTest, MatchesFloat64ReferenceWithinFp16Tolerance) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  uint32_t seed = 11;
  for (const Shape& s : Shapes()) {
    SCOPED_TRACE(Name(s));
    std::mt19937 rng(seed++);
    std::normal_distribution<float> n01(0.0f, 1.0f);
    Problem pr;
    auto g = [&] { return n01(rng); };
    Build(s, g, g, g, &pr);
    std::vector<float> want, want_lse, got, lse;
    Reference(pr, &want, &want_lse);
    for (int splits : {1, 3}) {
      SCOPED_TRACE("splits " + std::to_string(splits));
      RunDecode(b, pr.p, DecodeCompute::kFloat16, splits, &got, &lse);
      ExpectFp16Accurate(pr, want, want_lse, got, lse);
    }
  }
}

// Peaked softmax (scores ~N(0, 40^2)): most weights underflow, the fp16 path's exp clamps at
// -87 instead of masking; the output is still within the fp16 tolerance.
TEST(Fp16ArithmeticTest, PeakedScoresStayWithinTolerance) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(21);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  auto qg = [&] { return 40.0f * n01(rng); };
  Problem pr;
  Build({4, 128, 2, 128, 40, SectionKind::kPerToken, SectionKind::kPerToken, 0.7}, g, g, qg, &pr);
  std::vector<float> want, want_lse, got, lse;
  Reference(pr, &want, &want_lse);
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &got, &lse);
  ExpectFp16Accurate(pr, want, want_lse, got, lse);
}

// fp16 arithmetic must actually be in use: its results differ from fp32's in the low bits.
TEST(Fp16ArithmeticTest, DiffersFromFp32WhereItApplies) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(3);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Problem pr;
  auto g = [&] { return n01(rng); };
  Build({4, 128, 2, 256, 10, SectionKind::kPerToken, SectionKind::kPerToken, 0.7}, g, g, g, &pr);
  std::vector<float> a, la, c, lc;
  RunDecode(b, pr.p, DecodeCompute::kFloat32, 1, &a, &la);
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &c, &lc);
  EXPECT_NE(a, c);
}

// Where kFloat16 cannot apply (other dtypes; variants without fp16 arithmetic) the request
// runs the fp32 path: bitwise the same result.
TEST(Fp16ArithmeticTest, RequestIsExactFp32WhereItCannotApply) {
  std::mt19937 rng(5);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  for (const Backend* b : CpuBackendVariants()) {
    for (DType dt : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      if (dt == DType::kFloat16 && b->Fp16Arithmetic()) continue;
      SCOPED_TRACE(b->variant() + " " + DTypeName(dt));
      Problem pr;
      Build({4, 128, 2, 64, 7, SectionKind::kPerToken, SectionKind::kPerToken, 0.7, dt}, g, g, g,
            &pr);
      std::vector<float> a, la, c, lc;
      RunDecode(*b, pr.p, DecodeCompute::kFloat32, 1, &a, &la);
      RunDecode(*b, pr.p, DecodeCompute::kFloat16, 1, &c, &lc);
      EXPECT_EQ(a, c);
      EXPECT_EQ(la, lc);
    }
  }
}

// Scores beyond fp16's range (|partial sums| > 65504): those blocks are recomputed in fp32.
TEST(Fp16ArithmeticTest, KOverflowFallsBackToFp32) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(9);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  // |k| ~ 3000 and |q * scale| ~ 25: products ~ 7.5e4 overflow fp16, scores stay finite in
  // fp32 (the softmax is then extremely peaked, which the reference handles too).
  auto kg = [&] { return 3000.0f * n01(rng); };
  auto vg = [&] { return n01(rng); };
  auto qg = [&] { return 25.0f * std::sqrt(128.0f) * n01(rng); };
  Problem pr;
  Build({4, 128, 2, 64, 9, SectionKind::kPerToken, SectionKind::kPerToken, 0.7}, kg, vg, qg, &pr);
  std::vector<float> got, lse;
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &got, &lse);
  ExpectFp32Accurate(pr, got, lse);
}

// V sums beyond fp16's range: |v| ~ 3e4 and near-uniform weights overflow a 64-row block sum.
TEST(Fp16ArithmeticTest, VOverflowFallsBackToFp32) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(10);
  std::uniform_real_distribution<float> pos(20000.0f, 30000.0f);
  std::normal_distribution<float> small(0.0f, 0.01f);
  auto kg = [&] { return small(rng); };
  auto vg = [&] { return pos(rng); };
  Problem pr;
  Build({4, 128, 2, 64, 9, SectionKind::kPerToken, SectionKind::kPerToken, 0.5}, kg, vg, kg, &pr);
  std::vector<float> got, lse;
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &got, &lse);
  ExpectFp32Accurate(pr, got, lse);
}

// q * scale beyond fp16: the whole call runs fp32.
TEST(Fp16ArithmeticTest, QueryBeyondFp16RunsFp32) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(12);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return 0.001f * n01(rng); };
  Problem pr;
  Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.7}, g, g, g, &pr);
  pr.q[3] = 1e6f;  // * scale 1/8 = 125000 > 65504
  std::vector<float> got, lse;
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &got, &lse);
  ExpectFp32Accurate(pr, got, lse);
}

// NaN in one head's query: that head's output is NaN (as in fp32), the others are not.
TEST(Fp16ArithmeticTest, NanInQueryPropagates) {
  const Backend& b = CpuBackend();
  if (!b.Fp16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512-FP16 on this CPU";
  std::mt19937 rng(13);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  Problem pr;
  Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.5}, g, g, g, &pr);
  pr.q[64 + 5] = NAN;  // head 1
  std::vector<float> got, lse;
  RunDecode(b, pr.p, DecodeCompute::kFloat16, 1, &got, &lse);
  EXPECT_TRUE(std::isnan(got[64]));
  EXPECT_FALSE(std::isnan(got[0]));
}

}  // namespace
}  // namespace sparsekv::kernels
