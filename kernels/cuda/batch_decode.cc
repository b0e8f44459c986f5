// Host side of the batched decode: the work plan (split-KV over blocks) and the launchers.
#include "kernels/cuda/batch_decode.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "kernels/cuda/decode_dispatch.h"

namespace sparsekv::kernels::cuda {
namespace {

using internal::kKindDense;
using internal::kKindPerChannel;
using internal::kKindPerToken;

bool ValidShape(const BatchDecodeShape& s) {
  return s.num_kv_heads >= 1 && s.group >= 1 && s.group <= kMaxDecodeGroup &&
         (s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256) &&
         (s.dtype == DType::kFloat16 || s.dtype == DType::kBFloat16);
}

bool ValidTensor(int kind, int head_dim, int tokens, int group, int keep) {
  switch (kind) {
    case kKindDense:
      return true;
    case kKindPerToken:
      return keep >= 1 && keep <= head_dim;
    case kKindPerChannel:
      return group >= 1 && tokens % group == 0 && keep >= 1 && keep <= group;
    default:
      return false;
  }
}

cudaError_t Dispatch(bool dense, const BatchDecodeParams* p, const BatchDecodeShape& shape,
                     int smem, cudaStream_t stream, int* blocks_per_sm) {
  const bool bf16 = shape.dtype == DType::kBFloat16;
  if (dense) {
    return bf16 ? internal::DecodeDenseBf16(p, shape, smem, stream, blocks_per_sm)
                : internal::DecodeDenseF16(p, shape, smem, stream, blocks_per_sm);
  }
  return bf16 ? internal::DecodeSparseBf16(p, shape, smem, stream, blocks_per_sm)
              : internal::DecodeSparseF16(p, shape, smem, stream, blocks_per_sm);
}

}  // namespace

size_t DecodeSectionBytes(SectionKind kind, int head_dim, int tokens, int group, int keep) {
  SectionFormat f;
  f.kind = kind;
  f.head_dim = head_dim;
  f.tokens = tokens;
  f.group = group;
  f.k = kind == SectionKind::kDense ? head_dim : keep;
  f.dtype = DType::kFloat16;  // both storage dtypes are 2 bytes
  return f.bytes();
}

int64_t BatchDecodeSectionBytes(const BatchDecodeShape& shape, const DecodeItem* items,
                                int num_items, const DecodeSegment* segments) {
  int64_t bytes = 0;
  for (int i = 0; i < num_items; ++i) {
    for (int s = items[i].segment_begin; s < items[i].segment_begin + items[i].num_segments; ++s) {
      const DecodeSegment& sg = segments[s];
      bytes +=
          static_cast<int64_t>(shape.num_kv_heads) *
          static_cast<int64_t>(DecodeSectionBytes(static_cast<SectionKind>(sg.k_kind),
                                                  shape.head_dim, sg.tokens, sg.group, sg.k_keep) +
                               DecodeSectionBytes(static_cast<SectionKind>(sg.v_kind),
                                                  shape.head_dim, sg.tokens, sg.group, sg.v_keep));
    }
  }
  return bytes;
}

cudaError_t PlanBatchDecode(const BatchDecodeShape& shape, bool dense_kernel,
                            const DecodeItem* items, int num_items, DecodeSegment* segments,
                            int num_segments, int num_sms, BatchDecodePlan* plan) {
  *plan = BatchDecodePlan();
  plan->dense_kernel = dense_kernel;
  if (!ValidShape(shape) || num_items < 0 || num_segments < 0) return cudaErrorInvalidValue;
  const int d = shape.head_dim;

  // Tiles per item and the largest stage a step needs.
  int stage = internal::Round16((internal::MergeScratchBytes(d) + internal::kStages - 1) /
                                internal::kStages);
  std::vector<int64_t> item_tiles(num_items, 0);
  for (int i = 0; i < num_items; ++i) {
    const DecodeItem& it = items[i];
    if (it.num_segments < 0 || it.segment_begin < 0 ||
        static_cast<int64_t>(it.segment_begin) + it.num_segments > num_segments) {
      return cudaErrorInvalidValue;
    }
    int64_t tiles = 0;
    for (int s = it.segment_begin; s < it.segment_begin + it.num_segments; ++s) {
      DecodeSegment& sg = segments[s];
      if (sg.tokens < 1 || !ValidTensor(sg.k_kind, d, sg.tokens, sg.group, sg.k_keep) ||
          !ValidTensor(sg.v_kind, d, sg.tokens, sg.group, sg.v_keep)) {
        return cudaErrorInvalidValue;
      }
      if (dense_kernel && (sg.k_kind != kKindDense || sg.v_kind != kKindDense)) {
        return cudaErrorInvalidValue;
      }
      if (tiles + sg.tokens / kDecodeTileTokens + 1 > INT32_MAX) return cudaErrorInvalidValue;
      sg.tile_begin = static_cast<int32_t>(tiles);
      tiles += (sg.tokens + kDecodeTileTokens - 1) / kDecodeTileTokens;
      stage =
          std::max(stage, internal::TensorStageBytes(sg.k_kind, d, sg.k_keep, dense_kernel) +
                              internal::TensorStageBytes(sg.v_kind, d, sg.v_keep, dense_kernel));
    }
    item_tiles[i] = tiles;
  }
  plan->stage_bytes = internal::Round16(stage);
  plan->smem_bytes = internal::kWarps * internal::WarpSmemBytes(plan->stage_bytes, d, dense_kernel);

  int blocks_per_sm = 0;
  cudaError_t err =
      Dispatch(dense_kernel, nullptr, shape, plan->smem_bytes, nullptr, &blocks_per_sm);
  if (err != cudaSuccess) return err;
  if (blocks_per_sm < 1) return cudaErrorInvalidConfiguration;
  plan->blocks_per_sm = blocks_per_sm;
  if (num_sms <= 0) {
    int dev = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev)) !=
        cudaSuccess) {
      return err;
    }
  }

  // Split the concatenation of every (item, KV head)'s tiles (item-major) into equal ranges,
  // one per block; cut (item, KV head)s at range boundaries.
  const int heads = shape.num_kv_heads;
  int64_t total = 0;
  for (int i = 0; i < num_items; ++i) total += item_tiles[i] * heads;
  plan->total_tiles = total;
  const int64_t slots = static_cast<int64_t>(num_sms) * blocks_per_sm;
  const int64_t n =
      std::max<int64_t>(1, std::min<int64_t>(slots, (total + internal::kMinTilesPerBlock - 1) /
                                                        internal::kMinTilesPerBlock));
  auto start = [&](int64_t b) { return total == 0 ? 0 : b * total / n; };
  auto block_of = [&](int64_t pos) {
    int64_t b = total == 0 ? 0 : std::min<int64_t>(n - 1, pos * n / total);
    while (b + 1 < n && start(b + 1) <= pos) ++b;
    while (b > 0 && start(b) > pos) --b;
    return b;
  };
  std::vector<int64_t> unit_block;
  int64_t pos = 0;
  for (int i = 0; i < num_items; ++i) {
    for (int h = 0; h < heads; ++h) {
      const int64_t tiles = item_tiles[i];
      const int first = static_cast<int>(plan->units.size());
      if (tiles == 0) {
        plan->units.push_back({i, h, 0, 0, first, 1});
        unit_block.push_back(block_of(std::min(pos, std::max<int64_t>(0, total - 1))));
      }
      for (int64_t a = 0; a < tiles;) {
        const int64_t b = block_of(pos + a);
        const int64_t end = std::min(tiles, start(b + 1) - pos);
        const int64_t piece_end = b + 1 < n ? end : tiles;
        plan->units.push_back(
            {i, h, static_cast<int32_t>(a), static_cast<int32_t>(piece_end), first, 1});
        unit_block.push_back(b);
        a = piece_end;
      }
      const int count = static_cast<int>(plan->units.size()) - first;
      for (int u = first; u < first + count; ++u) plan->units[u].num_units = count;
      pos += tiles;
    }
  }
  plan->num_blocks = static_cast<int>(n);
  plan->block_units.assign(n + 1, 0);
  size_t u = 0;
  for (int64_t b = 0; b <= n; ++b) {
    while (u < unit_block.size() && unit_block[u] < b) ++u;
    plan->block_units[b] = static_cast<int32_t>(u);
  }
  plan->block_units[n] = static_cast<int32_t>(plan->units.size());
  return cudaSuccess;
}

cudaError_t BatchDecode(const BatchDecodeParams& p, cudaStream_t stream) {
  if (!ValidShape(p.shape)) return cudaErrorInvalidValue;
  static const int env_max_keep = [] {
    const char* v = std::getenv("SPARSEKV_DECODE_SCATTER_MAX_KEEP");
    return v != nullptr && *v != '\0' ? std::atoi(v) : -1;
  }();
  if (env_max_keep >= 0) {
    BatchDecodeParams q = p;
    q.scatter_max_keep = env_max_keep;
    return Dispatch(false, &q, p.shape, p.smem_bytes, stream, nullptr);
  }
  return Dispatch(false, &p, p.shape, p.smem_bytes, stream, nullptr);
}

cudaError_t BatchDecodeDense(const BatchDecodeParams& p, cudaStream_t stream) {
  if (!ValidShape(p.shape)) return cudaErrorInvalidValue;
  return Dispatch(true, &p, p.shape, p.smem_bytes, stream, nullptr);
}

}  // namespace sparsekv::kernels::cuda
