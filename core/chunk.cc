#include "core/chunk.h"

namespace sparsekv {

CompressedChunk::CompressedChunk(const kernels::SectionFormat& k_format,
                                 const kernels::SectionFormat& v_format, int kv_heads,
                                 SlabPool* pool, bool k_output_aware, bool v_output_aware)
    : k_format_(k_format),
      v_format_(v_format),
      kv_heads_(kv_heads),
      pool_(pool),
      data_(pool->Allocate()),
      k_output_aware_(k_output_aware),
      v_output_aware_(v_output_aware) {}

CompressedChunk::~CompressedChunk() { pool_->Free(data_); }

DenseBlock::DenseBlock(int kv_heads, int head_dim, kernels::DType dtype)
    : row_bytes_(static_cast<size_t>(head_dim) * kernels::DTypeSize(dtype)),
      k_(static_cast<size_t>(kv_heads) * kRows * row_bytes_),
      v_(k_.size()),
      mass_(static_cast<size_t>(kv_heads) * kRows, 0.0f) {}

}  // namespace sparsekv
