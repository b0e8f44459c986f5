// Decode attention over a KV cache made of compressed chunks and dense spans: one query step,
// one KV head and the query heads of its grouped-query-attention group.
//
// Kernels assume valid input (shapes are checked by core/) and never fail.
#ifndef SPARSEKV_KERNELS_ATTENTION_H_
#define SPARSEKV_KERNELS_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels {

// A run of consecutive dense tokens of one KV head.
struct DenseSpan {
  const void* k;   // [tokens, head_dim] in DecodeAttentionParams::dtype
  const void* v;   // [tokens, head_dim]
  int64_t tokens;  // >= 0
};

// One compressed chunk of one KV head: its K and V sections (see compressed_format.h).
struct ChunkRef {
  const uint8_t* k;  // k_format.bytes()
  const uint8_t* v;  // v_format.bytes()
};

// Arithmetic of a decode step. kFloat32: products and sums in fp32 (every variant; the
// default). kFloat16: for fp16 caches on CPUs with AVX512-FP16, products and short partial sums
// (at most head_dim / 32 terms per lane for K, one 64-token block for V) in fp16, everything
// longer in fp32; about 2.5x less compute, attention-output error ~1e-3 relative (see
// tests/bench/RESULTS.md). kBFloat16: for fp16 and bf16 caches on CPUs with AVX512_BF16
// (AMD Zen 4/5 and Intel CPUs without AVX512-FP16 among them), q . K and p . V as bf16 dot
// products with fp32 sums (kernels/cpu/avx512_bf16_attention.h). bf16 caches stay within a few
// 1e-6 of fp32 (q and the weights are split into two bf16 parts); fp16 caches have K, V, q and
// the weights rounded to bf16, ~3e-3 relative error on real K/V (RESULTS.md section 12). A
// request the hardware or dtype cannot serve runs kFloat32.
enum class DecodeCompute { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Parameters of one decode attention call. The cache is the chunks followed by the spans
// (order does not change the result).
// REQUIRES: group >= 1, head_dim >= 1, every buffer as its comment says; k_format/v_format
// have head_dim and dtype equal to the fields here when num_chunks > 0.
struct DecodeAttentionParams {
  const float* q = nullptr;  // [group, head_dim] query heads that read this KV head
  int group = 1;
  int head_dim = 0;
  DType dtype = DType::kFloat16;  // of dense spans and compressed values
  float scale = 1.0f;             // applied to q . k before the softmax
  DecodeCompute compute = DecodeCompute::kFloat32;
  SectionFormat k_format;  // of every chunk's K section
  SectionFormat v_format;  // of every chunk's V section
  const ChunkRef* chunks = nullptr;
  int num_chunks = 0;
  const DenseSpan* spans = nullptr;
  int num_spans = 0;
  float* out = nullptr;  // [group, head_dim] softmax(scale * q K^T) V
  // [group] natural-log log-sum-exp of the scaled scores; may be null. With no tokens at all
  // the output is all zeros and lse is -infinity (an empty softmax adds nothing to a merge).
  float* lse = nullptr;
};

// Online-softmax partial result over part of the cache, per query head h:
//   m[h] = max score seen, l[h] = sum exp(s - m[h]), acc[h, :] = sum exp(s - m[h]) * v.
// The empty state (m = -inf, l = 0, acc = 0) is the identity of Merge. A NaN score (from NaN
// in q or the cache) propagates to the output rather than being dropped.
struct AttentionState {
  int group = 0;
  int head_dim = 0;
  std::vector<float> m;    // [group]
  std::vector<float> l;    // [group]
  std::vector<float> acc;  // [group, head_dim]

  void Reset(int group, int head_dim);
  // Reset, then copies m/l ([group]) and acc rows ([group] rows of head_dim floats, acc_stride
  // floats apart: SIMD variants keep padded rows).
  void Assign(int group, int head_dim, const float* m, const float* l, const float* acc,
              int acc_stride);
};

// into = into (+) other. REQUIRES: same group and head_dim.
void MergeAttentionState(const AttentionState& other, AttentionState* into);
// out[h, :] = acc / l and lse[h] = m + log(l) (zeros and -inf for an empty state); lse may be
// null.
void FinalizeAttentionState(const AttentionState& s, float* out, float* lse);

// Scalar reference: decompresses every chunk and computes two-pass softmax with float64
// accumulation. The oracle the optimised paths are tested against; writes p.out and p.lse.
void ReferenceDecodeAttention(const DecodeAttentionParams& p);

// Adds, for every token of p.spans in order, the attention probability it received summed
// over the group's heads: mass[t] += sum_h exp(scale * q_h . k_t - lse[h]). `lse` is the
// final log-sum-exp of this step (from p.lse). Used for output-aware scoring of tokens still
// in the dense window. REQUIRES: mass has sum(spans.tokens) entries.
void AccumulateDenseMass(const DecodeAttentionParams& p, const float* lse, float* mass);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_ATTENTION_H_
