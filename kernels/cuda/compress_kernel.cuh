// Device code of the batched (de)compression kernels (see batch_compress.h). Included only by
// compress_f16.cu and compress_bf16.cu, one per storage dtype, so that they compile in parallel.
//
// Tiles: kCompressTileRows rows of a per-token or dense section, or one token group of a
// per-channel section, numbered across the batch (jobs[].tile_begin). Block b of the launch runs
// the contiguous tiles [b * num_tiles / blocks, (b + 1) * num_tiles / blocks), one after the
// other: it finds its first tile's job by binary search and then steps through the jobs, so
// ragged batches of any mix of kinds and head_dims take one launch and the search runs once per
// block, not per tile.
//
// Per vector, one warp; lane L holds elements e * 32 + L (e < E = ceil(n / 32)), so that a
// ballot over the lanes' keep flags for slot e is exactly bitmap word e of the format.
#ifndef SPARSEKV_KERNELS_CUDA_COMPRESS_KERNEL_CUH_
#define SPARSEKV_KERNELS_CUDA_COMPRESS_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/batch_compress.h"
#include "kernels/cuda/compress_dispatch.h"
#include "kernels/cuda/device_dtype.cuh"

namespace sparsekv::kernels::cuda::internal {

inline constexpr uint32_t kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Scores.

// The CPU compressor's ranking key of one element (compress.cc: ScoreKey of
// |x| * token_weight * channel_weight, the float's bits with the sign cleared), bit for bit.
// The float products are the same IEEE round-to-nearest multiplies in the same order (no
// contraction: there is no add). NaNs need care because the GPU's multiply returns one canonical
// NaN while the CPU's (x86 and ARM) propagates its NaN operand's payload, quieted, and makes
// inf * 0 the default NaN: both are reproduced from the input bits.
template <bool kBf16>
__device__ __forceinline__ uint32_t ScoreKey(uint16_t bits, float token_w, float channel_w) {
  const uint32_t mag = bits & 0x7fffu;
  if (kBf16 ? mag > 0x7f80u : mag > 0x7c00u) {  // NaN element
    return kBf16 ? (mag << 16) | 0x00400000u : 0x7fc00000u | ((mag & 0x3ffu) << 13);
  }
  const float p = fabsf(FromBits<kBf16>(static_cast<uint16_t>(mag))) * token_w * channel_w;
  if (p != p) return 0x7fc00000u;  // inf * 0 (weights are finite)
  return __float_as_uint(p) & 0x7fffffffu;
}

// ---------------------------------------------------------------------------------------------
// Top-k of one vector, bitmap and packing.

// The warp's vector has n elements; lane L holds key[e] and val[e] of element e * 32 + L, with
// key 0 for elements at or past n. Writes the vector's bitmap ((n + 31) / 32 little-endian
// words) and its k kept values in element order. REQUIRES: 1 <= k <= n <= 32 * E, all 32 lanes
// present.
template <int E>
__device__ __forceinline__ void SelectAndPack(const uint32_t (&key)[E], const uint16_t (&val)[E],
                                              int n, int k, uint32_t* bitmap, uint16_t* values) {
  const int lane = threadIdx.x & 31;
  const uint32_t lanes_below = (1u << lane) - 1u;
  const uint32_t want = static_cast<uint32_t>(k);

  // t = the k-th largest key, as the CPU's KthLargestKey finds it: the largest t with
  // count(key >= t) >= k, by bisection; or any probe with exactly k keys at or above it (then
  // no tie crosses the cut). Invariant: count(>= lo) >= k > count(>= hi). Padding keys are 0
  // and every probe is >= 1, so they are never counted.
  uint32_t local_max = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) local_max = max(local_max, key[e]);
  uint32_t hi = __reduce_max_sync(kFullMask, local_max) + 1u;  // keys < 2^31: no overflow
  uint32_t lo = 0;
  while (hi - lo > 1u) {
    const uint32_t mid = lo + (hi - lo) / 2u;
    uint32_t c = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) c += key[e] >= mid ? 1u : 0u;
    const uint32_t count = __reduce_add_sync(kFullMask, c);
    if (count >= want) {
      lo = mid;
      if (count == want) break;
    } else {
      hi = mid;
    }
  }
  const uint32_t t = lo;

  // Keep every key above t, then keys equal to t from the lowest index until k are kept.
  uint32_t a = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) a += key[e] > t ? 1u : 0u;
  int ties_left = k - static_cast<int>(__reduce_add_sync(kFullMask, a));
  int kept_before = 0;
  uint32_t my_word = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const bool valid = e * 32 + lane < n;
    const bool tie = valid && key[e] == t;
    const uint32_t tie_bits = __ballot_sync(kFullMask, tie);
    const bool keep = key[e] > t || (tie && __popc(tie_bits & lanes_below) < ties_left);
    const uint32_t word = __ballot_sync(kFullMask, keep);
    if (keep) values[kept_before + __popc(word & lanes_below)] = val[e];
    if (lane == e) my_word = word;
    ties_left -= __popc(tie_bits);
    kept_before += __popc(word);
  }
  if (lane < (n + 31) / 32) bitmap[lane] = my_word;
}

// ---------------------------------------------------------------------------------------------
// Tiles.

// What a block knows about its tile.
struct Tile {
  SectionJob job;
  int64_t index;  // tile within the job
};

// Bytes of one vector's bitmap (compressed_format.h: BitmapBytes).
__device__ __forceinline__ int VectorBitmapBytes(int n) { return (n + 31) / 32 * 4; }

// A dense section is the plain [tokens, head_dim] matrix: (de)compression copies the tile's
// rows, 4 bytes per thread and step (head_dim is even and both pointers 4-byte aligned).
__device__ __forceinline__ void CopyRowsTile(const Tile& t, bool decompress) {
  const SectionFormat& f = t.job.format;
  const int64_t row_begin = t.index * kCompressTileRows;
  const int64_t rows = min(static_cast<int64_t>(kCompressTileRows), f.tokens - row_begin);
  const int64_t row_words = f.head_dim / 2;
  const int64_t begin = row_begin * row_words;
  const int64_t words = rows * row_words;
  const auto* src = reinterpret_cast<const uint32_t*>(
      decompress ? static_cast<const void*>(t.job.section) : t.job.dense);
  auto* dst =
      reinterpret_cast<uint32_t*>(decompress ? t.job.dense : static_cast<void*>(t.job.section));
  for (int64_t i = threadIdx.x; i < words; i += kCompressThreads) dst[begin + i] = src[begin + i];
}

// Per-token: warp w compresses rows w, w + kCompressWarps, ... of the tile; E = head_dim / 32.
template <bool kBf16, int E>
__device__ __forceinline__ void CompressPerTokenTile(const Tile& t) {
  constexpr int kD = E * 32;
  const SectionFormat& f = t.job.format;
  const int lane = threadIdx.x & 31;
  const int k = f.k;
  float channel_w[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    channel_w[e] = t.job.channel_weight != nullptr ? t.job.channel_weight[e * 32 + lane] : 1.0f;
  }
  const auto* x = static_cast<const uint16_t*>(t.job.dense);
  const int bitmap_bytes = VectorBitmapBytes(kD);
  auto* values =
      reinterpret_cast<uint16_t*>(t.job.section + static_cast<int64_t>(f.tokens) * bitmap_bytes);
  const int64_t row_end = min(static_cast<int64_t>(f.tokens), (t.index + 1) * kCompressTileRows);
  for (int64_t r = t.index * kCompressTileRows + threadIdx.x / 32; r < row_end;
       r += kCompressWarps) {
    const uint16_t* xr = x + r * kD;
    const float token_w = t.job.token_weight != nullptr ? t.job.token_weight[r] : 1.0f;
    uint16_t val[E];
    uint32_t key[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      val[e] = xr[e * 32 + lane];
      key[e] = ScoreKey<kBf16>(val[e], token_w, channel_w[e]);
    }
    SelectAndPack<E>(key, val, kD, k, reinterpret_cast<uint32_t*>(t.job.section + r * bitmap_bytes),
                     values + r * k);
  }
}

// Per-token decompression: lane L writes channels e * 32 + L of each row; its packed position
// is the popcount of the row's bitmap below it.
template <int E>
__device__ __forceinline__ void DecompressPerTokenTile(const Tile& t) {
  constexpr int kD = E * 32;
  const SectionFormat& f = t.job.format;
  const int lane = threadIdx.x & 31;
  const uint32_t lanes_below = (1u << lane) - 1u;
  const int k = f.k;
  const int bitmap_bytes = VectorBitmapBytes(kD);
  const auto* values = reinterpret_cast<const uint16_t*>(
      t.job.section + static_cast<int64_t>(f.tokens) * bitmap_bytes);
  auto* x = static_cast<uint16_t*>(t.job.dense);
  const int64_t row_end = min(static_cast<int64_t>(f.tokens), (t.index + 1) * kCompressTileRows);
  for (int64_t r = t.index * kCompressTileRows + threadIdx.x / 32; r < row_end;
       r += kCompressWarps) {
    const auto* bitmap = reinterpret_cast<const uint32_t*>(t.job.section + r * bitmap_bytes);
    const uint16_t* vr = values + r * k;
    int before = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const uint32_t word = bitmap[e];
      const int rank = before + __popc(word & lanes_below);
      const bool kept = ((word >> lane) & 1u) != 0u && rank < k;
      x[r * kD + e * 32 + lane] = kept ? vr[rank] : static_cast<uint16_t>(0);
      before += __popc(word);
    }
  }
}

// A per-channel tile is one group of G token rows, staged in shared memory as [G][head_dim]
// 16-bit elements with a row pitch of GroupTilePitchBytes(head_dim).
__device__ __forceinline__ void LoadGroupTile(const uint16_t* rows, int group, int head_dim,
                                              uint32_t* tile) {
  const int row_words = head_dim / 2;
  const int pitch_words = GroupTilePitchBytes(head_dim) / 4;
  const auto* src = reinterpret_cast<const uint32_t*>(rows);
  for (int r = threadIdx.x / 32; r < group; r += kCompressWarps) {
    for (int c = threadIdx.x & 31; c < row_words; c += 32) {
      tile[r * pitch_words + c] = src[r * row_words + c];
    }
  }
}

__device__ __forceinline__ void StoreGroupTile(const uint32_t* tile, int group, int head_dim,
                                               uint16_t* rows) {
  const int row_words = head_dim / 2;
  const int pitch_words = GroupTilePitchBytes(head_dim) / 4;
  auto* dst = reinterpret_cast<uint32_t*>(rows);
  for (int r = threadIdx.x / 32; r < group; r += kCompressWarps) {
    for (int c = threadIdx.x & 31; c < row_words; c += 32) {
      dst[r * row_words + c] = tile[r * pitch_words + c];
    }
  }
}

// Per-channel: the block stages token group t.index, then warp w compresses channels w,
// w + kCompressWarps, ... (vector group * head_dim + channel); lane L holds tokens e * 32 + L.
// E = ceil(G / 32).
template <bool kBf16, int E>
__device__ __forceinline__ void CompressPerChannelTile(const Tile& t, uint32_t* smem) {
  const SectionFormat& f = t.job.format;
  const int d = f.head_dim;
  const int g = f.group;
  const int k = f.k;
  const int lane = threadIdx.x & 31;
  const int64_t t0 = t.index * g;
  LoadGroupTile(static_cast<const uint16_t*>(t.job.dense) + t0 * d, g, d, smem);
  float token_w[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int row = e * 32 + lane;
    token_w[e] = t.job.token_weight != nullptr && row < g ? t.job.token_weight[t0 + row] : 1.0f;
  }
  __syncthreads();
  const auto* tile = reinterpret_cast<const uint16_t*>(smem);
  const int pitch = GroupTilePitchBytes(d) / 2;
  const int bitmap_bytes = VectorBitmapBytes(g);
  const int64_t vectors = f.tokens / g * static_cast<int64_t>(d);
  auto* values = reinterpret_cast<uint16_t*>(t.job.section + vectors * bitmap_bytes);
  for (int j = threadIdx.x / 32; j < d; j += kCompressWarps) {
    const float channel_w = t.job.channel_weight != nullptr ? t.job.channel_weight[j] : 1.0f;
    uint16_t val[E];
    uint32_t key[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int row = e * 32 + lane;
      val[e] = row < g ? tile[row * pitch + j] : static_cast<uint16_t>(0);
      key[e] = row < g ? ScoreKey<kBf16>(val[e], token_w[e], channel_w) : 0u;
    }
    const int64_t v = t.index * d + j;
    SelectAndPack<E>(key, val, g, k, reinterpret_cast<uint32_t*>(t.job.section + v * bitmap_bytes),
                     values + v * k);
  }
  __syncthreads();  // the block's next tile overwrites the shared tile
}

// Per-channel decompression: warps expand channels into the shared tile (every element of the
// group's [G][head_dim] is written, pruned ones as 0), then the block stores its rows.
template <int E>
__device__ __forceinline__ void DecompressPerChannelTile(const Tile& t, uint32_t* smem) {
  const SectionFormat& f = t.job.format;
  const int d = f.head_dim;
  const int g = f.group;
  const int k = f.k;
  const int lane = threadIdx.x & 31;
  const uint32_t lanes_below = (1u << lane) - 1u;
  auto* tile = reinterpret_cast<uint16_t*>(smem);
  const int pitch = GroupTilePitchBytes(d) / 2;
  const int bitmap_bytes = VectorBitmapBytes(g);
  const int64_t vectors = f.tokens / g * static_cast<int64_t>(d);
  const auto* values = reinterpret_cast<const uint16_t*>(t.job.section + vectors * bitmap_bytes);
  for (int j = threadIdx.x / 32; j < d; j += kCompressWarps) {
    const int64_t v = t.index * d + j;
    const auto* bitmap = reinterpret_cast<const uint32_t*>(t.job.section + v * bitmap_bytes);
    const uint16_t* vv = values + v * k;
    int before = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int row = e * 32 + lane;
      const uint32_t word = bitmap[e];
      const int rank = before + __popc(word & lanes_below);
      const bool kept = ((word >> lane) & 1u) != 0u && rank < k;
      if (row < g) tile[row * pitch + j] = kept ? vv[rank] : static_cast<uint16_t>(0);
      before += __popc(word);
    }
  }
  __syncthreads();
  StoreGroupTile(smem, g, d, static_cast<uint16_t*>(t.job.dense) + t.index * g * d);
  __syncthreads();  // the block's next tile overwrites the shared tile
}

// ---------------------------------------------------------------------------------------------
// Kernel and launcher.

// The job that owns tile `tile`: the last one with tile_begin <= tile (every job has >= 1 tile,
// so tile_begin strictly increases).
__device__ __forceinline__ int FindJob(const SectionJob* jobs, int num_jobs, int64_t tile) {
  int lo = 0, hi = num_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].tile_begin <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <bool kBf16, bool kDecompress>
__device__ __forceinline__ void RunTile(const Tile& t, uint32_t* smem) {
  const SectionFormat& f = t.job.format;
  switch (f.kind) {
    case SectionKind::kDense:
      CopyRowsTile(t, kDecompress);
      return;
    case SectionKind::kPerToken:
      switch (f.head_dim) {
        case 64:
          return kDecompress ? DecompressPerTokenTile<2>(t) : CompressPerTokenTile<kBf16, 2>(t);
        case 128:
          return kDecompress ? DecompressPerTokenTile<4>(t) : CompressPerTokenTile<kBf16, 4>(t);
        case 256:
          return kDecompress ? DecompressPerTokenTile<8>(t) : CompressPerTokenTile<kBf16, 8>(t);
      }
      return;
    case SectionKind::kPerChannel:
      if (f.group <= 32) {
        return kDecompress ? DecompressPerChannelTile<1>(t, smem)
                           : CompressPerChannelTile<kBf16, 1>(t, smem);
      }
      return kDecompress ? DecompressPerChannelTile<2>(t, smem)
                         : CompressPerChannelTile<kBf16, 2>(t, smem);
  }
}

// Every branch is block-uniform (the tile range and jobs are the same for all threads), so the
// __syncthreads inside the per-channel tiles are reached by every thread.
template <bool kBf16, bool kDecompress>
__global__ void __launch_bounds__(kCompressThreads)
    BatchCompressKernel(const SectionJob* __restrict__ jobs, int num_jobs, int64_t num_tiles) {
  extern __shared__ __align__(16) uint32_t smem[];
  const int64_t first = blockIdx.x * num_tiles / gridDim.x;
  const int64_t last = (blockIdx.x + 1) * num_tiles / gridDim.x;
  if (first >= last) return;
  int j = FindJob(jobs, num_jobs, first);
  Tile t;
  t.job = jobs[j];
  for (int64_t tile = first; tile < last; ++tile) {
    while (j + 1 < num_jobs && jobs[j + 1].tile_begin <= tile) t.job = jobs[++j];
    t.index = tile - t.job.tile_begin;
    RunTile<kBf16, kDecompress>(t, smem);
  }
}

template <bool kBf16>
cudaError_t LaunchCompress(const BatchCompressParams& p, bool decompress, cudaStream_t stream) {
  if (p.plan.num_tiles == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(p.plan.num_blocks);
  if (decompress) {
    BatchCompressKernel<kBf16, true><<<blocks, kCompressThreads, p.plan.smem_bytes, stream>>>(
        p.jobs, p.num_jobs, p.plan.num_tiles);
  } else {
    BatchCompressKernel<kBf16, false><<<blocks, kCompressThreads, p.plan.smem_bytes, stream>>>(
        p.jobs, p.num_jobs, p.plan.num_tiles);
  }
  return cudaGetLastError();
}

// Resident blocks per SM with `smem` bytes of dynamic shared memory: the smaller of the two
// directions' (one plan serves both).
template <bool kBf16>
cudaError_t CompressBlocksPerSm(int smem, int* blocks) {
  int a = 0, b = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &a, BatchCompressKernel<kBf16, false>, kCompressThreads, smem);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, BatchCompressKernel<kBf16, true>,
                                                      kCompressThreads, smem);
  *blocks = a < b ? a : b;
  return err;
}

}  // namespace sparsekv::kernels::cuda::internal

#endif  // SPARSEKV_KERNELS_CUDA_COMPRESS_KERNEL_CUH_
