// Decode attention over a KV cache: one query step, one KV head and the query heads of its
// grouped-query-attention group.
//
// Kernels assume valid input (shapes are checked by core/); they never allocate per call
// beyond small stack/scratch buffers and never fail.
#ifndef SPARSEKV_KERNELS_ATTENTION_H_
#define SPARSEKV_KERNELS_ATTENTION_H_

#include <cstdint>

#include "kernels/dtype.h"

namespace sparsekv::kernels {

// A run of consecutive dense tokens of one KV head.
struct DenseSpan {
  const void* k;   // [tokens, head_dim] in DecodeAttentionParams::dtype
  const void* v;   // [tokens, head_dim]
  int64_t tokens;  // >= 0
};

// Parameters of one decode attention call.
// REQUIRES: group >= 1, head_dim >= 1, num_spans >= 0, every span's buffers hold `tokens`
// rows, out has group * head_dim floats, lse is null or has group floats.
struct DecodeAttentionParams {
  const float* q = nullptr;  // [group, head_dim] query heads that read this KV head
  int group = 1;
  int head_dim = 0;
  DType dtype = DType::kFloat16;     // of K and V
  float scale = 1.0f;                // applied to q . k before the softmax
  const DenseSpan* spans = nullptr;  // the cache in token order (order does not change the result)
  int num_spans = 0;
  float* out = nullptr;  // [group, head_dim] softmax(scale * q K^T) V
  // [group] natural-log log-sum-exp of the scaled scores. With no tokens at all the output is
  // all zeros and lse is -infinity (an empty softmax contributes nothing to a later merge).
  float* lse = nullptr;
};

// Scalar reference: two passes (max, then sum) with float64 accumulation. It is the oracle the
// optimised paths are tested against; slow but exact to float64 rounding of fp32 inputs.
void ReferenceDecodeAttention(const DecodeAttentionParams& p);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_ATTENTION_H_
