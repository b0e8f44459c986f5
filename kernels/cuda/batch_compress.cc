// Host side of the batched (de)compression: job validation, tile numbering and the launchers.
#include "kernels/cuda/batch_compress.h"

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/compress_dispatch.h"

namespace sparsekv::kernels::cuda {
namespace {

bool Aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

// Tiles of one valid job (compress_kernel.cuh: a tile is kCompressTileRows rows, or one token
// group of a per-channel section).
int64_t JobTiles(const SectionFormat& f) {
  return f.kind == SectionKind::kPerChannel
             ? f.tokens / f.group
             : (f.tokens + kCompressTileRows - 1) / kCompressTileRows;
}

bool ValidJob(const SectionJob& j, DType dtype) {
  const SectionFormat& f = j.format;
  if (f.dtype != dtype || f.tokens < 1 ||
      (f.head_dim != 64 && f.head_dim != 128 && f.head_dim != 256)) {
    return false;
  }
  if (j.dense == nullptr || j.section == nullptr || !Aligned4(j.dense) || !Aligned4(j.section)) {
    return false;
  }
  switch (f.kind) {
    case SectionKind::kDense:
      return true;
    case SectionKind::kPerToken:
      return f.k >= 1 && f.k <= f.head_dim;
    case SectionKind::kPerChannel:
      return f.group >= 1 && f.group <= kMaxCompressGroup && f.tokens % f.group == 0 && f.k >= 1 &&
             f.k <= f.group;
  }
  return false;
}

cudaError_t Launch(const BatchCompressParams& p, bool decompress, cudaStream_t stream) {
  if (p.num_jobs < 0 || (p.num_jobs > 0 && p.jobs == nullptr) ||
      (p.num_jobs == 0 && p.plan.num_tiles != 0) ||
      (p.plan.num_tiles > 0 && p.plan.num_blocks < 1)) {
    return cudaErrorInvalidValue;
  }
  switch (p.plan.dtype) {
    case DType::kFloat16:
      return internal::LaunchCompressF16(p, decompress, stream);
    case DType::kBFloat16:
      return internal::LaunchCompressBf16(p, decompress, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t PlanBatchCompress(SectionJob* jobs, int num_jobs, int num_sms,
                              BatchCompressPlan* plan) {
  *plan = BatchCompressPlan();
  if (num_jobs < 0 || (num_jobs > 0 && jobs == nullptr)) return cudaErrorInvalidValue;
  if (num_jobs > 0) plan->dtype = jobs[0].format.dtype;
  if (plan->dtype != DType::kFloat16 && plan->dtype != DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  int64_t tiles = 0;
  for (int i = 0; i < num_jobs; ++i) {
    SectionJob& j = jobs[i];
    if (!ValidJob(j, plan->dtype)) return cudaErrorInvalidValue;
    j.tile_begin = tiles;
    tiles += JobTiles(j.format);
    if (tiles > INT32_MAX) return cudaErrorInvalidValue;  // one block per tile, grid x
    if (j.format.kind == SectionKind::kPerChannel) {
      plan->smem_bytes = std::max(
          plan->smem_bytes, j.format.group * internal::GroupTilePitchBytes(j.format.head_dim));
    }
  }
  plan->num_tiles = tiles;
  if (tiles == 0) return cudaSuccess;

  const bool bf16 = plan->dtype == DType::kBFloat16;
  cudaError_t err = bf16 ? internal::CompressBlocksPerSmBf16(plan->smem_bytes, &plan->blocks_per_sm)
                         : internal::CompressBlocksPerSmF16(plan->smem_bytes, &plan->blocks_per_sm);
  if (err != cudaSuccess) return err;
  if (plan->blocks_per_sm < 1) return cudaErrorInvalidConfiguration;
  if (num_sms <= 0) {
    int dev = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev)) !=
        cudaSuccess) {
      return err;
    }
  }
  plan->num_blocks = static_cast<int>(
      std::min<int64_t>(tiles, static_cast<int64_t>(num_sms) * plan->blocks_per_sm));
  return cudaSuccess;
}

cudaError_t BatchCompress(const BatchCompressParams& p, cudaStream_t stream) {
  return Launch(p, false, stream);
}

cudaError_t BatchDecompress(const BatchCompressParams& p, cudaStream_t stream) {
  return Launch(p, true, stream);
}

}  // namespace sparsekv::kernels::cuda
