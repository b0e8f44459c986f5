// Batched compression and decompression of sections on the GPU (issue #13, item 2): one launch
// turns the dense rows of many sections (one chunk of one KV head, K or V, each with its own
// format) into the exact compressed_format.h bytes that the CPU compressor writes
// (kernels::CompressSection), or back (kernels::DecompressSection), with no host
// synchronisation; the caller orders it on its stream.
//
// Semantics are the CPU's, bit for bit: every vector keeps the k elements with the highest score
//   score(t, j) = (|x[t, j]| * token_weight[t]) * channel_weight[j]   (fp32, in that order;
//                 a null weight array is all ones)
// ranked by the score's bits with the sign cleared, ties going to the lower index; a NaN score
// ranks above everything. NaN keys follow what the CPU's float multiply produces on x86 and ARM: a
// NaN element keeps its payload, quieted; inf * 0 gives the default NaN. So the kept sets, the
// bitmaps and the packed values equal CompressSection's for every input whose NaNs are quiet (a
// signalling-NaN payload is quieted here; the CPU may keep it when its compiler folds the
// multiply by a null weight's 1.0f, which changes the order only among several NaNs of one
// vector).
//
// Top-k per vector (one warp per vector, element i in lane i % 32): the k-th largest key by
// bisection on the key value with warp-wide counts (the CPU's KthLargestKey, stopping as soon as
// exactly k keys lie at or above the probe), then keys above it plus the lowest-index ties,
// found with ballots; ballots are the bitmap words and their prefix popcounts the packed
// positions. Per-channel sections go through a shared-memory tile of one token group, so that
// both the dense rows and the vectors (columns) are read without strided global loads.
//
// Host functions are thread-compatible; launches on different streams may run concurrently when
// their outputs do not overlap.
#ifndef SPARSEKV_KERNELS_CUDA_BATCH_COMPRESS_H_
#define SPARSEKV_KERNELS_CUDA_BATCH_COMPRESS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/compressed_format.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels::cuda {

// Rows per block for per-token and dense sections (per-channel: one token group per block).
inline constexpr int kCompressTileRows = 32;
// Largest per-channel group a block handles (the server uses 32 or 64).
inline constexpr int kMaxCompressGroup = 64;

// One section of a batch. Device pointers; `format` as compressed_format.h defines it.
struct SectionJob {
  SectionFormat format;  // kind, head_dim (64/128/256), tokens, group, k, dtype (fp16/bf16)
  // [format.tokens, format.head_dim] rows of format.dtype: BatchCompress reads them,
  // BatchDecompress writes them (pruned elements as +0).
  void* dense = nullptr;
  // [format.bytes()]: BatchCompress writes it, BatchDecompress reads it.
  uint8_t* section = nullptr;
  const float* token_weight = nullptr;    // [format.tokens] or null; compression only
  const float* channel_weight = nullptr;  // [format.head_dim] or null; compression only
  int64_t tile_begin = 0;                 // written by PlanBatchCompress
};

// Host-side result of PlanBatchCompress; serves BatchCompress and BatchDecompress alike.
struct BatchCompressPlan {
  int64_t num_tiles = 0;  // over all jobs
  int num_blocks = 0;     // of one launch: one wave, each block runs a contiguous tile range
  int blocks_per_sm = 0;
  int smem_bytes = 0;  // dynamic shared memory per block (per-channel group tiles)
  DType dtype = DType::kFloat16;
};

// Everything a launch reads. `jobs` is a device copy of the host jobs PlanBatchCompress filled.
struct BatchCompressParams {
  const SectionJob* jobs = nullptr;  // [num_jobs], device memory
  int num_jobs = 0;
  BatchCompressPlan plan;
};

// Validates the host copies of `jobs`, numbers their tiles (jobs[].tile_begin, in order) and
// sizes the launch: min(tiles, num_sms x resident blocks per SM) blocks. num_sms = 0 asks the
// current device. Returns cudaErrorInvalidValue when a job is not supported: kind not dense/
// per-token/per-channel, head_dim not 64/128/256, dtype not fp16/bf16 or not the same in every
// job, tokens < 1, per-channel group outside 1..kMaxCompressGroup or not dividing tokens, k
// outside 1..n for a compressed kind, a null dense or section pointer, dense/section not 4-byte
// aligned, or more than INT32_MAX tiles; or a CUDA error from the device queries.
cudaError_t PlanBatchCompress(SectionJob* jobs, int num_jobs, int num_sms, BatchCompressPlan* plan);

// Compresses every job's dense rows into its section. Returns the launch error.
// REQUIRES: p.jobs as PlanBatchCompress left them (on the device); weights, when given, finite
// and >= 0; sections do not overlap each other or any input.
cudaError_t BatchCompress(const BatchCompressParams& p, cudaStream_t stream);

// Writes every job's dense rows from its section. Returns the launch error.
// REQUIRES: p.jobs as PlanBatchCompress left them; every bitmap valid (SectionBitmapsValid:
// sections from outside the process are checked first). A bitmap with more than k bits still
// reads only the vector's k values (its extra kept elements read as 0).
cudaError_t BatchDecompress(const BatchCompressParams& p, cudaStream_t stream);

}  // namespace sparsekv::kernels::cuda

#endif  // SPARSEKV_KERNELS_CUDA_BATCH_COMPRESS_H_
