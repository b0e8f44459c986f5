// Batched decode attention on the GPU over the compressed KV cache: one launch serves many
// (session, layer) items with ragged lengths, each a list of *segments* (compressed chunks in
// the exact compressed_format.h layout, dense chunks, dense tail rows) shared by the item's
// KV heads.
//
// Modelled on FlashInfer's decode (include/flashinfer/attention/decode.cuh): plain-data params
// with every buffer's shape in brackets, a host-side plan that splits the work evenly over the
// GPU's thread blocks (split-KV), launchers that return cudaError_t, and a log-sum-exp merge of
// the splits (done in the same launch by the last block to finish an (item, KV head)).
//
// Two kernels share the plan and params:
//   BatchDecode       any segment kinds: per-token (fast path), per-channel and dense.
//   BatchDecodeDense  dense segments only; the project's own dense baseline.
//
// Arithmetic: K and V are read in their storage dtype (fp16 or bf16); products and sums are
// fp32 on the tensor cores. The query and the softmax probabilities are split into a storage-
// dtype high part and a low part (x = hi + lo to 2^-22 relative for fp16, 2^-17 for bf16), so
// rounding them to 16 bits costs almost no accuracy: on the H200 the outputs matched the float64
// reference to 9e-7 (fp16) and 3.5e-6 (bf16) of max|V| (tests/kernels/cuda/batch_decode_test.cc).
//
// Speed (tests/bench/RESULTS.md section 8): the dense kernel reads 3.8-4.3 TB/s at batch >= 8,
// within 10% of PyTorch SDPA (cuDNN); the compressed kernel is bound by the bitmap expansion
// (~6.5 lane instructions per channel slot) at 1.0-1.3 TB/s of compressed bytes, 0.5-0.8x of
// SDPA's time, far from issue #13's targets.
//
// Limits: groups of at most 8 query heads per KV head; per-channel sections take a slow path
// (expanded from global memory); head_dim 256 per-token sections with keep > ~196 (sparsity
// below ~0.23) need more shared memory than an SM has (PlanBatchDecode returns the error).
//
// Host functions are thread-compatible; kernels on different streams with different workspaces
// may run concurrently.
#ifndef SPARSEKV_KERNELS_CUDA_BATCH_DECODE_H_
#define SPARSEKV_KERNELS_CUDA_BATCH_DECODE_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels::cuda {

// Tokens per tile: the unit of work splitting (a tile never crosses a segment).
inline constexpr int kDecodeTileTokens = 16;
// Largest GQA group (query heads per KV head) one block serves.
inline constexpr int kMaxDecodeGroup = 8;

// Shape shared by every item of one launch.
struct BatchDecodeShape {
  int num_kv_heads = 0;           // >= 1
  int group = 1;                  // query heads per KV head, 1..kMaxDecodeGroup
  int head_dim = 0;               // 64, 128 or 256
  DType dtype = DType::kFloat16;  // kFloat16 or kBFloat16: of every section and span
};

// A run of consecutive tokens, the same for every KV head of an item: one compressed chunk, or
// a dense span (a chunk stored dense, or rows of the dense tail). Its bytes for KV head h are
// at k_sections / v_sections[segment * num_kv_heads + h]:
//   kPerToken / kPerChannel: a section as compressed_format.h lays it out, with
//     SectionFormat{kind, head_dim, tokens, group, keep, dtype};
//   kDense: [tokens, head_dim] rows.
struct DecodeSegment {
  int32_t tokens = 0;      // >= 1; per-channel: a multiple of group
  int32_t tile_begin = 0;  // written by PlanBatchDecode: tiles of the item before this segment
  uint8_t k_kind = 0;      // SectionKind of K
  uint8_t v_kind = 0;      // SectionKind of V
  uint16_t group = 32;     // per-channel tokens per vector (G), else unused
  uint16_t k_keep = 0;     // kept elements per K vector (SectionFormat::k); unused for dense
  uint16_t v_keep = 0;     // kept elements per V vector
};

// One (session, layer) decode step: softmax(scale * q K^T) V for every query head over the
// item's segments [segment_begin, segment_begin + num_segments), in order (the order does not
// change the result). Query head j reads KV head j / group. An item with no segments gets zero
// output and lse = -infinity.
struct DecodeItem {
  const float* q = nullptr;  // [num_kv_heads * group, head_dim]
  float* out = nullptr;      // [num_kv_heads * group, head_dim]
  float* lse = nullptr;      // [num_kv_heads * group] natural-log log-sum-exp; may be null
  float scale = 1.0f;
  int32_t segment_begin = 0;
  int32_t num_segments = 0;
};

// A contiguous range of one (item, KV head)'s tiles, processed by one block. Units of one
// (item, KV head) are consecutive in the plan: [first_unit, first_unit + num_units).
struct DecodeWorkUnit {
  int32_t item = 0;
  int32_t kv_head = 0;
  int32_t tile_begin = 0;
  int32_t tile_end = 0;
  int32_t first_unit = 0;
  int32_t num_units = 1;
};

// Host-side result of PlanBatchDecode; upload units and block_units to the device as they are.
struct BatchDecodePlan {
  bool dense_kernel = false;
  std::vector<DecodeWorkUnit> units;  // [num_units]
  std::vector<int32_t> block_units;   // [num_blocks + 1]: block b runs units [b], [b+1])
  int num_blocks = 0;
  int stage_bytes = 0;  // shared memory per pipeline stage per warp
  int smem_bytes = 0;   // dynamic shared memory per block
  int blocks_per_sm = 0;
  int64_t total_tiles = 0;  // over all (item, KV head)
  // Workspace sizes for BatchDecodeParams.
  size_t partial_out_floats(const BatchDecodeShape& s) const {
    return units.size() * static_cast<size_t>(s.group) * s.head_dim;
  }
  size_t partial_lse_floats(const BatchDecodeShape& s) const {
    return units.size() * static_cast<size_t>(s.group);
  }
};

// Everything a launch reads and writes. Device pointers unless noted.
// REQUIRES: every section / span pointer 16-byte aligned and readable up to the next multiple
// of 16 bytes past its end (allocations padded to 16 bytes); units / block_units from
// PlanBatchDecode on the same items and segments (tile_begin as it wrote them); counters zero
// before the first launch (each launch leaves them zero); no two launches in flight share
// partial_out, partial_lse or counters.
struct BatchDecodeParams {
  BatchDecodeShape shape;
  const DecodeItem* items = nullptr;        // [num_items]
  const DecodeSegment* segments = nullptr;  // [num_segments]
  const void* const* k_sections = nullptr;  // [num_segments, num_kv_heads]
  const void* const* v_sections = nullptr;  // [num_segments, num_kv_heads]
  const DecodeWorkUnit* units = nullptr;    // [num_units]
  const int32_t* block_units = nullptr;     // [num_blocks + 1]
  float* partial_out = nullptr;             // [num_units, group, head_dim] workspace
  float* partial_lse = nullptr;             // [num_units, group] workspace (log2 domain)
  int32_t* counters = nullptr;              // [num_items, num_kv_heads] workspace
  int num_items = 0;
  int num_segments = 0;
  int num_units = 0;
  int num_blocks = 0;
  int stage_bytes = 0;  // plan.stage_bytes
  int smem_bytes = 0;   // plan.smem_bytes
  // Per-token steps whose K and V keep at most this many elements per row expand by scatter
  // (cost O(kept)); the others expand slot by slot (cost O(head_dim)). BatchDecode replaces it
  // with the environment variable SPARSEKV_DECODE_SCATTER_MAX_KEEP when that is set. Default 0
  // (slot expansion everywhere, the measured path of tests/bench/RESULTS.md section 8) until the
  // scatter path has been tested and timed on a GPU; the GPU test runs both.
  int scatter_max_keep = 0;
};

// Fills segments[].tile_begin and *plan: splits the sum over items and KV heads of their tiles
// evenly over min(resident blocks, tiles / 8) blocks (a block may run pieces of several (item,
// KV head)s; an (item, KV head) cut into several units is merged by log-sum-exp). `items` and
// `segments` are host copies of what the launch will read. num_sms = 0 asks the current device.
// Returns cudaErrorInvalidValue for an unsupported shape (head_dim not 64/128/256, group out of
// 1..8, dtype not fp16/bf16, a segment with tokens < 1 or a per-channel segment whose tokens are
// not a multiple of its group; BatchDecodeDense: a non-dense segment), or a CUDA error from the
// occupancy query.
cudaError_t PlanBatchDecode(const BatchDecodeShape& shape, bool dense_kernel,
                            const DecodeItem* items, int num_items, DecodeSegment* segments,
                            int num_segments, int num_sms, BatchDecodePlan* plan);

// Launches the fused decode over compressed and dense segments. Returns the launch error.
// REQUIRES: p as its comment says, from a plan with dense_kernel = false.
cudaError_t BatchDecode(const BatchDecodeParams& p, cudaStream_t stream);

// The same over dense segments only (every k_kind and v_kind kDense).
// REQUIRES: p from a plan with dense_kernel = true.
cudaError_t BatchDecodeDense(const BatchDecodeParams& p, cudaStream_t stream);

// Bytes of K and V one launch reads from sections and spans (bitmaps + values + dense rows),
// for bandwidth reporting. Host copies.
int64_t BatchDecodeSectionBytes(const BatchDecodeShape& shape, const DecodeItem* items,
                                int num_items, const DecodeSegment* segments);

// Bytes of one segment's K (or V) section for one KV head: SectionFormat::bytes() for the
// compressed kinds, tokens * head_dim * 2 for dense.
size_t DecodeSectionBytes(SectionKind kind, int head_dim, int tokens, int group, int keep);

}  // namespace sparsekv::kernels::cuda

#endif  // SPARSEKV_KERNELS_CUDA_BATCH_DECODE_H_
