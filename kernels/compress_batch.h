// A batch of sections to compress for one call into a ComputeBackend: each job is one KV
// head's K or V rows of a chunk with its format and optional output-aware weights, written in
// the exact compressed_format.h bytes (what kernels::CompressSection writes on the CPU and
// kernels/cuda/batch_compress.h on the GPU). Plain data; the caller keeps every buffer alive
// until the call returns.
#ifndef SPARSEKV_KERNELS_COMPRESS_BATCH_H_
#define SPARSEKV_KERNELS_COMPRESS_BATCH_H_

#include <cstdint>

#include "kernels/compressed_format.h"

namespace sparsekv::kernels {

struct CompressJob {
  SectionFormat format;
  const void* rows = nullptr;              // [format.tokens, format.head_dim] in format.dtype
  const float* token_weights = nullptr;    // [format.tokens] or null (see CompressSection)
  const float* channel_weights = nullptr;  // [format.head_dim] or null
  uint8_t* out = nullptr;                  // format.bytes()
};

struct CompressBatch {
  const CompressJob* jobs = nullptr;
  int num_jobs = 0;
};

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_COMPRESS_BATCH_H_
