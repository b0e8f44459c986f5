// Shared harness of the reduced-arithmetic tests (fp16_arithmetic_test.cc,
// bf16_arithmetic_test.cc): random caches in every section kind with a dense span, the float64
// reference, split-KV runs through the CPU ComputeBackend and the error checks.
#ifndef SPARSEKV_TESTS_KERNELS_REDUCED_ARITHMETIC_HARNESS_H_
#define SPARSEKV_TESTS_KERNELS_REDUCED_ARITHMETIC_HARNESS_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/split_decode.h"

namespace sparsekv::kernels {

struct Shape {
  int group, head_dim, chunks, chunk_tokens;
  int64_t dense_tokens;
  SectionKind k_kind, v_kind;
  double sparsity;
  DType dtype = DType::kFloat16;
};

inline std::string Name(const Shape& s) {
  return "group " + std::to_string(s.group) + " D " + std::to_string(s.head_dim) + " chunks " +
         std::to_string(s.chunks) + "x" + std::to_string(s.chunk_tokens) + " dense " +
         std::to_string(s.dense_tokens) + " kinds " + std::to_string(static_cast<int>(s.k_kind)) +
         std::to_string(static_cast<int>(s.v_kind)) + " s " + std::to_string(s.sparsity) + " " +
         DTypeName(s.dtype);
}

// A cache and query from `gen` (K and V elements; q elements), owned buffers.
struct Problem {
  DecodeAttentionParams p;
  std::vector<std::vector<uint8_t>> secs;
  std::vector<ChunkRef> refs;
  std::vector<uint8_t> kd, vd;
  DenseSpan span{};
  std::vector<float> q;
  std::vector<float> k_all;  // every K row as float, for the score bound
  float max_v = 0.0f;
};

template <class KGen, class VGen, class QGen>
inline void Build(const Shape& s, KGen kgen, VGen vgen, QGen qgen, Problem* pr) {
  const size_t es = DTypeSize(s.dtype);
  auto rows = [&](int64_t n, bool is_k) {
    std::vector<uint8_t> out(static_cast<size_t>(n) * s.head_dim * es);
    for (size_t i = 0; i < static_cast<size_t>(n) * s.head_dim; ++i) {
      StoreFromFloat(s.dtype, out.data(), i, is_k ? kgen() : vgen());
      const float x = LoadAsFloat(s.dtype, out.data(), i);
      if (!is_k) pr->max_v = std::fmax(pr->max_v, std::fabs(x));
    }
    return out;
  };
  DecodeAttentionParams& p = pr->p;
  p.group = s.group;
  p.head_dim = s.head_dim;
  p.dtype = s.dtype;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  p.k_format = MakeSectionFormat(s.k_kind, s.sparsity, s.head_dim, s.chunk_tokens, 32, s.dtype);
  p.v_format = MakeSectionFormat(s.v_kind, s.sparsity, s.head_dim, s.chunk_tokens, 32, s.dtype);
  for (int i = 0; i < s.chunks; ++i) {
    std::vector<uint8_t> kr = rows(s.chunk_tokens, true), vr = rows(s.chunk_tokens, false);
    pr->secs.emplace_back(p.k_format.bytes());
    CompressSection(p.k_format, kr.data(), nullptr, nullptr, pr->secs.back().data());
    pr->secs.emplace_back(p.v_format.bytes());
    CompressSection(p.v_format, vr.data(), nullptr, nullptr, pr->secs.back().data());
    // The score bound uses the K the kernel sees: the pruned rows.
    std::vector<uint8_t> dense(static_cast<size_t>(s.chunk_tokens) * s.head_dim * es);
    DecompressSection(p.k_format, pr->secs[pr->secs.size() - 2].data(), dense.data());
    for (int64_t i = 0; i < static_cast<int64_t>(s.chunk_tokens) * s.head_dim; ++i) {
      pr->k_all.push_back(LoadAsFloat(s.dtype, dense.data(), i));
    }
  }
  for (int i = 0; i < s.chunks; ++i) {
    pr->refs.push_back({pr->secs[2 * i].data(), pr->secs[2 * i + 1].data()});
  }
  pr->kd = rows(s.dense_tokens, true);
  pr->vd = rows(s.dense_tokens, false);
  for (int64_t i = 0; i < s.dense_tokens * s.head_dim; ++i) {
    pr->k_all.push_back(LoadAsFloat(s.dtype, pr->kd.data(), i));
  }
  pr->span = {pr->kd.data(), pr->vd.data(), s.dense_tokens};
  pr->q.resize(static_cast<size_t>(s.group) * s.head_dim);
  for (float& x : pr->q) x = qgen();
  p.q = pr->q.data();
  p.chunks = pr->refs.data();
  p.num_chunks = s.chunks;
  p.spans = &pr->span;
  p.num_spans = 1;
}

inline void RunDecode(const Backend& b, DecodeAttentionParams p, DecodeCompute compute, int splits,
                      std::vector<float>* out, std::vector<float>* lse) {
  out->assign(static_cast<size_t>(p.group) * p.head_dim, 0.0f);
  lse->assign(p.group, 0.0f);
  p.compute = compute;
  p.out = out->data();
  p.lse = lse->data();
  SplitDecode(b, p, splits);
}

inline void Reference(const Problem& pr, std::vector<float>* out, std::vector<float>* lse) {
  DecodeAttentionParams r = pr.p;
  out->assign(pr.q.size(), 0.0f);
  lse->assign(r.group, 0.0f);
  r.out = out->data();
  r.lse = lse->data();
  ReferenceDecodeAttention(r);
}

// max over heads and tokens of sum_c |scale q_c k_c|
inline double ScoreMagnitude(const Problem& pr) {
  const int d = pr.p.head_dim;
  double best = 0;
  for (int h = 0; h < pr.p.group; ++h) {
    for (size_t t = 0; t * d < pr.k_all.size(); ++t) {
      double s = 0;
      for (int c = 0; c < d; ++c) s += std::fabs(pr.q[h * d + c] * pr.k_all[t * d + c]);
      best = std::fmax(best, s * pr.p.scale);
    }
  }
  return best;
}

// Output within rms_tol relative RMS of the reference, every element finite, lse within
// lse_tol. Prints the relative RMS when the environment variable `print_env` is set.
inline void ExpectRelRmsAccurate(const std::vector<float>& want, const std::vector<float>& want_lse,
                                 const std::vector<float>& got, const std::vector<float>& lse,
                                 double rms_tol, double lse_tol, const char* print_env) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << i;
    num += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  double lse_err = 0;
  for (size_t h = 0; h < lse.size(); ++h) {
    EXPECT_NEAR(lse[h], want_lse[h], lse_tol) << "head " << h;
    lse_err = std::fmax(lse_err, std::fabs(lse[h] - want_lse[h]));
  }
  if (getenv(print_env)) {
    std::printf("rel rms %.3g, max |lse err| %.3g (bound %.3g)\n", std::sqrt(num / den), lse_err,
                lse_tol);
  }
  EXPECT_LE(std::sqrt(num / den), rms_tol);
}

// Checks out/lse against the reference at the fp32 path's tolerance (simd_backend_test).
inline void ExpectFp32Accurate(const Problem& pr, const std::vector<float>& got,
                               const std::vector<float>& lse) {
  std::vector<float> want, want_lse;
  Reference(pr, &want, &want_lse);
  const float tol = 5e-5f * std::fmax(pr.max_v, 1.0f);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], tol) << i;
  for (size_t h = 0; h < lse.size(); ++h) {
    EXPECT_NEAR(lse[h], want_lse[h], 5e-5f * std::fmax(1.0f, std::fabs(want_lse[h])));
  }
}

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_TESTS_KERNELS_REDUCED_ARITHMETIC_HARNESS_H_
