// A batch of decode steps for one call into a ComputeBackend: many (session, layer) items with
// ragged lengths, each its compressed chunks (grouped in runs of one format) and its dense
// tail, per KV head. Plain data pointing at cache memory the caller keeps alive (immutable
// snapshots) until the call returns.
#ifndef SPARSEKV_KERNELS_DECODE_BATCH_H_
#define SPARSEKV_KERNELS_DECODE_BATCH_H_

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/compressed_format.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels {

// Consecutive compressed chunks of one item sharing their K and V section formats (background
// chunks all share one; a Flush remainder may add a shorter run).
struct ChunkRun {
  SectionFormat k_format;
  SectionFormat v_format;
  // [num_kv_heads, num_chunks]: KV head h's chunks are refs[h * num_chunks, (h + 1) * num_chunks).
  const ChunkRef* refs = nullptr;
  int num_chunks = 0;
};

// One (session, layer) step: for every query head j (reading KV head j / group),
// out[j] = softmax(scale * q[j] K^T) V over the runs' chunks then the tail spans.
struct DecodeBatchItem {
  int num_kv_heads = 0;
  int group = 1;  // query heads per KV head
  int head_dim = 0;
  DType dtype = DType::kFloat16;  // of the cache
  float scale = 1.0f;
  DecodeCompute compute = DecodeCompute::kFloat32;
  const float* q = nullptr;  // [num_kv_heads * group, head_dim]
  float* out = nullptr;      // [num_kv_heads * group, head_dim]
  float* lse = nullptr;      // [num_kv_heads * group] natural log; -inf for an empty cache
  const ChunkRun* runs = nullptr;
  int num_runs = 0;
  // [num_kv_heads, num_tail_spans]: KV head h's tail rows in order.
  const DenseSpan* tail = nullptr;
  int num_tail_spans = 0;
  int64_t tail_tokens = 0;  // sum of one head's span tokens
  int64_t tokens = 0;       // chunk tokens + tail_tokens (for work splitting)
  // Optional, for output-aware scoring: [num_kv_heads, tail_tokens] receives per tail row the
  // probability this step gave it, summed over the KV head's query group (overwritten).
  float* tail_mass = nullptr;
};

struct DecodeBatch {
  const DecodeBatchItem* items = nullptr;
  int num_items = 0;
};

// The one-KV-head item of p (its chunks, then its spans; p.out and p.lse receive the result);
// *run holds the chunk run the item points to. For tests and benchmarks that build
// DecodeAttentionParams.
inline DecodeBatchItem SingleHeadItem(const DecodeAttentionParams& p, ChunkRun* run) {
  *run = {p.k_format, p.v_format, p.chunks, p.num_chunks};
  DecodeBatchItem it;
  it.num_kv_heads = 1;
  it.group = p.group;
  it.head_dim = p.head_dim;
  it.dtype = p.dtype;
  it.scale = p.scale;
  it.compute = p.compute;
  it.q = p.q;
  it.out = p.out;
  it.lse = p.lse;
  it.runs = run;
  it.num_runs = p.num_chunks > 0 ? 1 : 0;
  it.tail = p.spans;
  it.num_tail_spans = p.num_spans;
  for (int s = 0; s < p.num_spans; ++s) it.tail_tokens += p.spans[s].tokens;
  it.tokens = it.tail_tokens + static_cast<int64_t>(p.num_chunks) * p.k_format.tokens;
  return it;
}

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_DECODE_BATCH_H_
