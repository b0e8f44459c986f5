// Dense K/V storage of one layer of one session: per KV head, a growing [tokens, head_dim]
// matrix for K and one for V, in the session's storage dtype.
//
// Per-head contiguous rows let decode attention stream one KV head for all query heads of its
// GQA group. Not thread-safe: the owning Session serialises access.
#ifndef SPARSEKV_CORE_DENSE_LAYER_H_
#define SPARSEKV_CORE_DENSE_LAYER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/dtype.h"

namespace sparsekv {

class DenseLayer {
 public:
  DenseLayer(int num_kv_heads, int head_dim, kernels::DType dtype);

  int64_t tokens() const { return tokens_; }
  // Payload bytes held (K and V), excluding spare vector capacity.
  int64_t bytes() const;

  // Appends `tokens` rows. k, v: [tokens, num_kv_heads, head_dim] of `src_dtype`, converted to
  // the storage dtype.
  void Append(kernels::DType src_dtype, const void* k, const void* v, int64_t tokens);

  // The whole cache of KV head `head` as one span.
  kernels::DenseSpan Span(int head) const;

  // Copies rows [begin, begin + count) as [count, num_kv_heads, head_dim] in the storage dtype
  // to the end of k_out / v_out. REQUIRES: begin + count <= tokens().
  void Read(int64_t begin, int64_t count, std::string* k_out, std::string* v_out) const;

 private:
  const int num_kv_heads_;
  const int head_dim_;
  const kernels::DType dtype_;
  const size_t row_bytes_;  // head_dim * sizeof(dtype)
  int64_t tokens_ = 0;
  std::vector<std::vector<uint8_t>> k_;  // [num_kv_heads] of [tokens, head_dim]
  std::vector<std::vector<uint8_t>> v_;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_DENSE_LAYER_H_
