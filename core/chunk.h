// The two kinds of token storage of one layer: immutable compressed chunks and the dense
// blocks of the tail that new tokens are appended to.
#ifndef SPARSEKV_CORE_CHUNK_H_
#define SPARSEKV_CORE_CHUNK_H_

#include <cstdint>
#include <vector>

#include "core/slab_pool.h"
#include "kernels/compressed_format.h"

namespace sparsekv {

// `tokens` consecutive tokens of every KV head of one layer, compressed. Layout of its block:
// for each KV head h: K section (k_format.bytes()) then V section (v_format.bytes()).
// Immutable after construction, so decode steps read it without locks.
class CompressedChunk {
 public:
  // Takes a block from `pool` (block_bytes() must be >= Bytes(...)).
  CompressedChunk(const kernels::SectionFormat& k_format, const kernels::SectionFormat& v_format,
                  int kv_heads, SlabPool* pool, bool k_output_aware, bool v_output_aware);
  ~CompressedChunk();
  CompressedChunk(const CompressedChunk&) = delete;
  CompressedChunk& operator=(const CompressedChunk&) = delete;

  static size_t Bytes(const kernels::SectionFormat& k, const kernels::SectionFormat& v,
                      int kv_heads) {
    return (k.bytes() + v.bytes()) * static_cast<size_t>(kv_heads);
  }

  int tokens() const { return k_format_.tokens; }
  const kernels::SectionFormat& k_format() const { return k_format_; }
  const kernels::SectionFormat& v_format() const { return v_format_; }
  // Payload bytes (bitmaps and values of every head).
  size_t bytes() const { return Bytes(k_format_, v_format_, kv_heads_); }
  // Memory the chunk holds: its pool block (payload rounded up to the pool's alignment) and
  // the object; what the byte budget counts.
  size_t memory_bytes() const { return pool_->block_bytes() + sizeof(*this); }
  // Whether K / V of this chunk were ranked output-aware (else magnitude).
  bool k_output_aware() const { return k_output_aware_; }
  bool v_output_aware() const { return v_output_aware_; }

  const uint8_t* k(int head) const {
    return data_ + head * (k_format_.bytes() + v_format_.bytes());
  }
  const uint8_t* v(int head) const { return k(head) + k_format_.bytes(); }
  // For the compressor, before publication only.
  uint8_t* mutable_k(int head) { return const_cast<uint8_t*>(k(head)); }
  uint8_t* mutable_v(int head) { return const_cast<uint8_t*>(v(head)); }

 private:
  const kernels::SectionFormat k_format_;
  const kernels::SectionFormat v_format_;
  const int kv_heads_;
  SlabPool* const pool_;
  uint8_t* const data_;
  const bool k_output_aware_;
  const bool v_output_aware_;
};

// Up to kRows tokens of every KV head of the dense tail, head-major: K [kv_heads, kRows,
// head_dim] and V likewise, plus the attention mass each token has received. Rows are
// appended at the end and consumed (compressed) from the front; a row, once written, never
// changes, so readers may read rows [begin, rows) of a snapshot without a lock while a writer
// appends after them. The counters and `mass` are guarded by the owning session's mutex.
class DenseBlock {
 public:
  static constexpr int kRows = 32;

  DenseBlock(int kv_heads, int head_dim, kernels::DType dtype);

  size_t row_bytes() const { return row_bytes_; }
  uint8_t* k_row(int head, int row) {
    return k_.data() + (static_cast<size_t>(head) * kRows + row) * row_bytes_;
  }
  uint8_t* v_row(int head, int row) {
    return v_.data() + (static_cast<size_t>(head) * kRows + row) * row_bytes_;
  }
  const uint8_t* k_row(int head, int row) const {
    return k_.data() + (static_cast<size_t>(head) * kRows + row) * row_bytes_;
  }
  const uint8_t* v_row(int head, int row) const {
    return v_.data() + (static_cast<size_t>(head) * kRows + row) * row_bytes_;
  }
  float* mass(int head) { return mass_.data() + static_cast<size_t>(head) * kRows; }

  int begin = 0;  // first live row (rows before it are compressed)
  int rows = 0;   // rows written

 private:
  const size_t row_bytes_;
  std::vector<uint8_t> k_;
  std::vector<uint8_t> v_;
  std::vector<float> mass_;  // [kv_heads, kRows]
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_CHUNK_H_
