// DecodeCompute::kBFloat16 (bf16 dot products for q . K on AVX512_BF16) against the float64
// reference over a ladder of lengths, section kinds and cache dtypes, and the fallbacks that
// keep it exact where bf16 cannot serve: fp32 caches and variants without AVX512_BF16 (bitwise
// equal to fp32), non-finite inputs and q beyond bf16's range (recomputed in fp32).
//
// Tolerances. bf16 has an 8-bit significand: unit roundoff u = 2^-9 = 1.95e-3. vdpbf16ps
// multiplies exactly and sums in fp32 (u32 = 2^-24 per add).
//   bf16 caches: K is exact and q * scale = hi + lo with |error| <= u^2 |q| = 2^-18 |q|, so a
//     score is off by at most (2^-18 + (head_dim / 16 + 4) u32) sum_c |scale q_c k_c| (the
//     fp32 adds of a lane, then the 16-way reduction): the lse bound below. Measured output
//     errors are 0.5e-6 to 4e-6 relative RMS over the ladder (BF16_TEST_PRINT=1 prints them);
//     1e-4 leaves headroom and still catches any indexing error, which is O(1).
//   fp16 caches: K and q * scale are each rounded to bf16, so a product is off by <= 2u
//     relative and a score by <= (2u + ...) sum_c |scale q_c k_c|. On N(0,1) data the output
//     error is 0.5e-3 to 2.7e-3 relative RMS over the ladder (the fp16 path's is ~1e-3); 1e-2
//     leaves headroom while O(1) errors fail.
// V is fp32 in this mode, so no further rounding enters the output.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/reduced_arithmetic_harness.h"

namespace sparsekv::kernels {
namespace {

constexpr double kU = 1.0 / 512;             // bf16 unit roundoff
constexpr double kU32 = 1.0 / (1 << 24);     // fp32 unit roundoff
constexpr double kSplitU = 1.0 / (1 << 18);  // q's hi + lo split

void ExpectBf16Accurate(const Problem& pr, const std::vector<float>& want,
                        const std::vector<float>& want_lse, const std::vector<float>& got,
                        const std::vector<float>& lse) {
  const double sums = (pr.p.head_dim / 16.0 + 4) * kU32;
  const bool exact_k = pr.p.dtype == DType::kBFloat16;
  const double per_score = exact_k ? kSplitU + sums : 2 * kU + kU * kU + sums;
  ExpectRelRmsAccurate(want, want_lse, got, lse, exact_k ? 1e-4 : 1e-2,
                       per_score * ScoreMagnitude(pr) + 1e-5, "BF16_TEST_PRINT");
}

// The ladder: dense-span lengths 1, 3, 9, ..., 257 after compressed chunks, every section
// kind pairing, the head tiles (1, 3, 4, 5, 8, 12, 17 heads) and head dims with whole and
// partial 32-column words.
std::vector<Shape> Ladder(DType dt) {
  const SectionKind T = SectionKind::kPerToken, C = SectionKind::kPerChannel,
                    D = SectionKind::kDense;
  std::vector<Shape> s;
  for (int64_t tokens : {1, 3, 9, 27, 81, 129, 257}) {
    s.push_back({4, 128, 2, 64, tokens, T, T, 0.7, dt});
  }
  const std::vector<Shape> more = {
      {4, 128, 3, 256, 45, T, T, 0.5, dt},   // the benchmark's shape
      {1, 64, 2, 129, 3, T, T, 0.7, dt},     // MHA, odd rows per chunk
      {2, 256, 1, 81, 27, T, T, 0.5, dt},    // D 256: 8 words
      {3, 100, 2, 33, 9, T, T, 0.7, dt},     // partial last word (D % 32 = 4)
      {5, 136, 1, 65, 70, T, T, 0.6, dt},    // tiles 4 + 1
      {8, 128, 1, 64, 1, T, T, 0.7, dt},     // tile of 8
      {12, 64, 1, 64, 2, T, T, 0.5, dt},     // 8 + 4
      {17, 64, 1, 40, 2, T, T, 0.7, dt},     // 8 + 8 + 1
      {4, 128, 2, 128, 5, D, D, 0.0, dt},    // dense chunks
      {4, 128, 0, 256, 257, D, D, 0.0, dt},  // dense span only
      {4, 128, 2, 64, 5, T, C, 0.7, dt},     // per-channel V (fp32 path), K bf16
      {4, 128, 2, 64, 5, C, T, 0.7, dt},     // per-channel K stays fp32
      {4, 128, 2, 64, 9, C, C, 0.5, dt},     // all per-channel: fp32 throughout
  };
  s.insert(s.end(), more.begin(), more.end());
  return s;
}

TEST(Bf16ArithmeticTest, MatchesFloat64ReferenceOverTheLadder) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  uint32_t seed = 31;
  for (DType dt : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    for (const Shape& s : Ladder(dt)) {
      SCOPED_TRACE(Name(s));
      std::mt19937 rng(seed++);
      std::normal_distribution<float> n01(0.0f, 1.0f);
      auto g = [&] { return n01(rng); };
      Problem pr;
      Build(s, g, g, g, &pr);
      std::vector<float> want, want_lse, got, lse, f32, f32_lse;
      Reference(pr, &want, &want_lse);
      for (int splits : {1, 3}) {
        SCOPED_TRACE("splits " + std::to_string(splits));
        RunDecode(b, pr.p, DecodeCompute::kBFloat16, splits, &got, &lse);
        if (dt == DType::kFloat32) {  // fp32 caches run fp32: bitwise the fp32 request
          RunDecode(b, pr.p, DecodeCompute::kFloat32, splits, &f32, &f32_lse);
          EXPECT_EQ(got, f32);
          EXPECT_EQ(lse, f32_lse);
          ExpectFp32Accurate(pr, got, lse);
        } else {
          ExpectBf16Accurate(pr, want, want_lse, got, lse);
        }
      }
    }
  }
}

// bf16 arithmetic must actually be in use for fp16 and bf16 caches.
TEST(Bf16ArithmeticTest, DiffersFromFp32WhereItApplies) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(3);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    Problem pr;
    Build({4, 128, 2, 256, 10, SectionKind::kPerToken, SectionKind::kPerToken, 0.7, dt}, g, g, g,
          &pr);
    std::vector<float> a, la, c, lc;
    RunDecode(b, pr.p, DecodeCompute::kFloat32, 1, &a, &la);
    RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &c, &lc);
    EXPECT_NE(la, lc);
  }
}

// Variants without bf16 arithmetic (portable, avx2, and avx512 on CPUs without AVX512_BF16)
// run the request in fp32: bitwise the same result, every dtype.
TEST(Bf16ArithmeticTest, RequestIsExactFp32WhereItCannotApply) {
  std::mt19937 rng(5);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  for (const Backend* b : CpuBackendVariants()) {
    if (b->Bf16Arithmetic()) continue;
    for (DType dt : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      SCOPED_TRACE(b->variant() + " " + DTypeName(dt));
      Problem pr;
      Build({4, 128, 2, 64, 7, SectionKind::kPerToken, SectionKind::kPerToken, 0.7, dt}, g, g, g,
            &pr);
      std::vector<float> a, la, c, lc;
      RunDecode(*b, pr.p, DecodeCompute::kFloat32, 1, &a, &la);
      RunDecode(*b, pr.p, DecodeCompute::kBFloat16, 1, &c, &lc);
      EXPECT_EQ(a, c);
      EXPECT_EQ(la, lc);
    }
  }
}

// q * scale that rounds to infinity in bf16 (above 3.3962e38; fp32 holds it): the products
// are non-finite, so every block is recomputed in fp32 and fp32 tolerances apply.
TEST(Bf16ArithmeticTest, QueryBeyondBf16FallsBackToFp32) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(12);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto small = [&] { return 1e-3f * n01(rng); };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    Problem pr;
    Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.7, dt}, small, small,
          small, &pr);
    pr.p.scale = 1.0f;
    pr.q[3] = 3.4e38f;  // scores ~3e35: finite in fp32
    std::vector<float> got, lse;
    RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &got, &lse);
    ExpectFp32Accurate(pr, got, lse);
  }
}

// Tiny q: q's lo part (2^-8 of q) is a bf16 denormal, which vdpbf16ps flushes to zero; the
// scores lose nothing that matters and the output stays within the bf16 tolerance.
TEST(Bf16ArithmeticTest, TinyQueryStaysAccurate) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(14);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  auto tiny = [&] { return 1e-34f * n01(rng); };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    Problem pr;
    Build({4, 128, 2, 64, 9, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, dt}, g, g, tiny,
          &pr);
    std::vector<float> want, want_lse, got, lse;
    Reference(pr, &want, &want_lse);
    RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &got, &lse);
    ExpectBf16Accurate(pr, want, want_lse, got, lse);
  }
}

// Peaked softmax (scores ~N(0, 40^2)): the bf16 score error grows with |score|, but stays
// within the bound, and the output within tolerance.
TEST(Bf16ArithmeticTest, PeakedScoresStayWithinTolerance) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(21);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  auto qg = [&] { return 40.0f * n01(rng); };
  Problem pr;
  Build({4, 128, 2, 128, 40, SectionKind::kPerToken, SectionKind::kPerToken, 0.7, DType::kBFloat16},
        g, g, qg, &pr);
  std::vector<float> want, want_lse, got, lse;
  Reference(pr, &want, &want_lse);
  RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &got, &lse);
  ExpectBf16Accurate(pr, want, want_lse, got, lse);
}

// NaN in one head's query: that head's output is NaN (as in fp32), the others are not.
TEST(Bf16ArithmeticTest, NanInQueryPropagates) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(13);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    Problem pr;
    Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, dt}, g, g, g, &pr);
    pr.q[64 + 5] = NAN;  // head 1
    std::vector<float> got, lse;
    RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &got, &lse);
    EXPECT_TRUE(std::isnan(got[64]));
    EXPECT_FALSE(std::isnan(got[0]));
  }
}

// inf or NaN in K or V, compressed or dense: the outputs that are non-finite in fp32 are
// non-finite here too, in the same places and kinds (fp16 caches detect them in the integer
// conversion and recompute in fp32; in bf16 caches they propagate through vdpbf16ps).
TEST(Bf16ArithmeticTest, NonFiniteCacheValuesMatchFp32) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(19);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  const float inf = std::numeric_limits<float>::infinity();
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    for (float bad : {NAN, inf, -inf}) {
      for (int where = 0; where < 4; ++where) {  // K dense, V dense, K compressed, V compressed
        SCOPED_TRACE(std::string(DTypeName(dt)) + " value " + std::to_string(bad) + " where " +
                     std::to_string(where));
        Problem pr;
        Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, dt}, g, g, g,
              &pr);
        if (where == 0) StoreFromFloat(dt, pr.kd.data(), 64 + 7, bad);
        if (where == 1) StoreFromFloat(dt, pr.vd.data(), 64 + 7, bad);
        // The first kept value of chunk row 0 (K) or 5 (V): values follow the 64 rows' bitmaps.
        const size_t values = pr.p.k_format.bitmap_bytes();
        if (where == 2) StoreFromFloat(dt, pr.secs[0].data() + values, 0, bad);
        if (where == 3) StoreFromFloat(dt, pr.secs[1].data() + values, 5 * pr.p.v_format.k, bad);
        std::vector<float> a, la, c, lc;
        RunDecode(b, pr.p, DecodeCompute::kFloat32, 1, &a, &la);
        RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &c, &lc);
        int non_finite = 0;
        for (size_t i = 0; i < a.size(); ++i) {
          non_finite += !std::isfinite(a[i]);
          EXPECT_EQ(std::isnan(a[i]), std::isnan(c[i])) << i;
          if (std::isinf(a[i])) {
            EXPECT_EQ(a[i], c[i]) << i;
          }
        }
        // -inf in K may only mask a token out; the others always reach some output.
        if (std::isnan(bad) || where % 2 == 1) {
          EXPECT_GT(non_finite, 0);
        }
      }
    }
  }
}

// NaN in a K row of the dense span: every head's score of that token is NaN, so every output
// is NaN, as in fp32.
TEST(Bf16ArithmeticTest, NanInKeysPropagates) {
  const Backend& b = CpuBackend();
  if (!b.Bf16Arithmetic()) GTEST_SKIP() << b.variant() << ": no AVX512_BF16 on this CPU";
  std::mt19937 rng(17);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto g = [&] { return n01(rng); };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dt));
    Problem pr;
    Build({4, 64, 1, 64, 3, SectionKind::kPerToken, SectionKind::kPerToken, 0.5, dt}, g, g, g, &pr);
    StoreFromFloat(dt, pr.kd.data(), 64 + 7, NAN);  // dense token 1, channel 7
    std::vector<float> got, lse;
    RunDecode(b, pr.p, DecodeCompute::kBFloat16, 1, &got, &lse);
    for (int h = 0; h < 4; ++h) EXPECT_TRUE(std::isnan(got[h * 64])) << "head " << h;
  }
}

}  // namespace
}  // namespace sparsekv::kernels
