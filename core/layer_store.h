// Storage of one layer of one session: the published list of compressed chunks (oldest
// tokens) followed by the dense tail of DenseBlocks (newest tokens), plus the statistics that
// output-aware scoring needs (per-token attention mass, per-channel query energy).
//
// Not thread-safe: the owning Session's mutex guards every method. What a Snapshot returns
// may be read without the lock: chunks are immutable and published by swapping the list, and
// snapshot rows of dense blocks never change.
#ifndef SPARSEKV_CORE_LAYER_STORE_H_
#define SPARSEKV_CORE_LAYER_STORE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/chunk.h"
#include "core/types.h"

namespace sparsekv {

using ChunkList = std::vector<std::shared_ptr<const CompressedChunk>>;

// A run of dense rows [begin, end) of one block.
struct BlockRows {
  std::shared_ptr<DenseBlock> block;
  int begin = 0;
  int end = 0;
};

// What a decode step reads: the whole layer at one instant.
struct LayerSnapshot {
  std::shared_ptr<const ChunkList> chunks;  // token order
  std::vector<BlockRows> tail;              // token order, after the chunks
  int64_t tokens = 0;
  int64_t tail_tokens = 0;
};

// The oldest tail rows taken for compression, plus the scoring statistics at that instant.
struct CompressionInput {
  std::vector<BlockRows> rows;  // `tokens` rows in token order
  int tokens = 0;
  std::vector<float> mass;      // [kv_heads, tokens] attention mass so far
  std::vector<float> q_energy;  // [kv_heads, head_dim] sum of squared query channels
  bool queries_seen = false;
};

// A layer's contents in a form that can leave the process and come back (what a snapshot
// carries): compressed chunks byte for byte, the dense tail rows, and the scoring statistics.
struct LayerImage {
  struct Chunk {
    kernels::SectionFormat k_format;
    kernels::SectionFormat v_format;
    bool k_output_aware = false;
    bool v_output_aware = false;
    std::string data;  // CompressedChunk::Bytes(k_format, v_format, kv_heads): per KV head, K
                       // section then V section
  };
  std::vector<Chunk> chunks;  // token order
  int64_t tail_tokens = 0;
  // Rows of the first tail block already compressed (0..31): restored too, so that the tail's
  // block boundaries, and with them the kernels' summation order, stay the same and decode
  // results stay bit-identical.
  int tail_first_row = 0;
  std::string tail_k;            // [tail_tokens, kv_heads, head_dim] in the storage dtype
  std::string tail_v;            // likewise
  std::vector<float> tail_mass;  // [kv_heads, tail_tokens] attention mass received so far
  std::vector<double> q_energy;  // [kv_heads, head_dim]
  bool queries_seen = false;
};

// A layer's image taken in two steps, so that the session lock is held only for the cheap one:
// BeginExport (under the lock) keeps the published chunk list and tail rows by reference and
// copies the statistics that later steps change in place (tail attention mass, query
// energy); FinishExport copies the bytes without the lock (chunks are immutable and snapshot
// rows of dense blocks never change).
struct LayerExport {
  LayerSnapshot snap;
  int tail_first_row = 0;
  std::vector<float> tail_mass;  // [kv_heads, tail_tokens]
  std::vector<double> q_energy;  // [kv_heads, head_dim]
  bool queries_seen = false;
};

// InvalidArgument unless `f` is a section format a chunk of `layout` can have: a known kind,
// the layout's head_dim and dtype, 1..8192 tokens, group 32 or 64 dividing per-channel tokens,
// 1 <= k <= n.
absl::Status ValidateSectionFormat(const kernels::SectionFormat& f, const Layout& layout,
                                   const char* what);

class LayerStore {
 public:
  explicit LayerStore(const Layout& layout);

  // Memory of one dense tail block (kRows rows of K and V of every KV head, their attention
  // mass, the object), allocated whole when the first of its rows is appended.
  static int64_t BlockBytes(const Layout& layout);
  // Memory a layer holds whatever its tokens (the object and its scoring statistics).
  static int64_t FixedBytes(const Layout& layout);
  // Blocks that appending `tokens` rows now would allocate.
  int64_t BlocksNeeded(int64_t tokens) const;

  int64_t tokens() const { return compressed_tokens_ + tail_tokens_; }
  int64_t compressed_tokens() const { return compressed_tokens_; }
  int64_t tail_tokens() const { return tail_tokens_; }

  // Appends `tokens` rows; row t of KV head h is at k + t * token_stride + h * head_stride
  // (bytes) in `src` dtype, converted to the storage dtype. Returns the blocks allocated.
  int64_t Append(kernels::DType src, const uint8_t* k, const uint8_t* v, int64_t tokens,
                 size_t token_stride, size_t head_stride);
  // Appends the rows of `staged` (the tail of another LayerStore of the same layout, built
  // outside the lock) with their attention mass. Returns the blocks allocated.
  int64_t AppendStaged(const std::vector<BlockRows>& staged);

  LayerSnapshot Snapshot() const;

  // Adds the squared channels of q ([num_q_heads, head_dim] fp32) to `sums` ([num_kv_heads,
  // head_dim], summed over each KV head's query group).
  static void AccumulateQueryEnergy(const Layout& layout, const float* q, double* sums);
  // Scoring statistics: adds `sums` (as AccumulateQueryEnergy makes them) to the layer's.
  void AddQueryEnergy(const double* sums);
  // Adds mass[t] (one entry per snapshot tail row, in order) to the rows of `snapshot` for
  // KV head `head`. Rows compressed meanwhile are skipped (their blocks are no longer read).
  void AddMass(const LayerSnapshot& snapshot, int head, const float* mass);

  // Copies out the oldest `tokens` tail rows. REQUIRES: tokens <= tail_tokens().
  CompressionInput TakeOldest(int tokens) const;
  // Replaces the oldest chunk->tokens() tail rows by `chunk`. REQUIRES: those rows are the
  // ones a TakeOldest handed out and nothing else was published since. Returns the tail
  // blocks released (all of their rows compressed).
  int64_t Publish(std::shared_ptr<const CompressedChunk> chunk);
  // The blocks Publish of a chunk of the oldest `tokens` tail rows would release now.
  int64_t BlocksReleasedBy(int tokens) const;

  // The layer as an image (chunks copied byte for byte): FinishExport(BeginExport()).
  LayerImage Export() const;
  // O(tail rows + statistics); see LayerExport.
  LayerExport BeginExport() const;
  // O(layer bytes); needs no lock.
  static LayerImage FinishExport(const Layout& layout, const LayerExport& e);
  // Fills an empty layer from `image`, chunks from `pools`. InvalidArgument naming the part
  // (and nothing changed) when a format does not fit the layout or a size disagrees with its
  // shape. Returns the dense blocks allocated (for the budget); the chunks' memory is
  // restored_chunk_bytes(). REQUIRES: tokens() == 0.
  absl::StatusOr<int64_t> Restore(const LayerImage& image, SlabPoolSet* pools);
  // Memory of every chunk of the layer (CompressedChunk::memory_bytes summed).
  int64_t chunk_memory_bytes() const;

  // Copies rows [begin, begin + count) as [count, num_kv_heads, head_dim] in the storage dtype
  // to the end of k_out / v_out (compressed rows decompressed, pruned elements 0).
  // REQUIRES: begin + count <= tokens().
  void Read(int64_t begin, int64_t count, std::string* k_out, std::string* v_out) const;

  // Bytes of the dense tail (payload rows, K and V) and of the compressed chunks.
  int64_t dense_bytes() const;
  int64_t compressed_bytes() const { return compressed_bytes_; }
  // Elements kept / stored in compressed chunks, for achieved sparsity.
  int64_t k_kept() const { return k_kept_; }
  int64_t v_kept() const { return v_kept_; }
  int64_t compressed_elements() const;
  int64_t output_aware_chunks_k() const { return output_aware_k_; }
  int64_t output_aware_chunks_v() const { return output_aware_v_; }
  int64_t chunks() const { return static_cast<int64_t>(chunks_->size()); }
  // The chunk list as published now (for tests and snapshots).
  const ChunkList& chunk_list() const { return *chunks_; }
  bool queries_seen() const { return queries_seen_; }

  // Set by Session: a background job is queued / a compression (job or Flush) is running.
  bool job_queued = false;
  bool compressing = false;

 private:
  // Counts `chunk` in and appends it to the list. REQUIRES: its rows are no longer in the tail.
  void AddChunk(std::shared_ptr<const CompressedChunk> chunk);

  const Layout layout_;
  std::shared_ptr<const ChunkList> chunks_;
  std::deque<std::shared_ptr<DenseBlock>> tail_;
  int64_t compressed_tokens_ = 0;
  int64_t tail_tokens_ = 0;
  int64_t compressed_bytes_ = 0;
  int64_t k_kept_ = 0;
  int64_t v_kept_ = 0;
  int64_t output_aware_k_ = 0;
  int64_t output_aware_v_ = 0;
  // [num_kv_heads, head_dim]; double so that sums of large finite queries do not overflow.
  std::vector<double> q_energy_;
  bool queries_seen_ = false;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_LAYER_STORE_H_
