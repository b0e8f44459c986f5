// Device code of the batched decode kernels (see batch_decode.h). Included only by the .cu
// files that instantiate it, one per (kernel kind, dtype), so they compile in parallel.
//
// Block = 4 warps; it runs the work units block_units[b] .. block_units[b+1]) one after the
// other. Within a unit the warps take the unit's 16-token tiles round-robin and each keeps its
// own online-softmax state (m, l, acc) for the whole GQA group; the four states are merged
// through shared memory at the end of the unit.
//
// Per warp and step (one 16-token tile):
//   1. cp.async stages the step's compressed bytes (per-token: the bitmap rows and the packed
//      values, two contiguous ranges per tensor) into a ring of kStages slots, kStages-1 steps
//      ahead of the step computed. The dense kernel stages dense rows the same way, into a padded
//      [16][2*D+16 bytes] tile; the mixed kernel copies dense rows (the short dense tail) into its
//      K/V tiles when it computes the step.
//   2. Per-token K and V are expanded into dense [16][2*D+16 bytes] tiles. Full steps whose K and
//      V keep the same count k (the server's chunks) can expand by scatter (ScatterPerToken,
//      when k <= BatchDecodeParams::scatter_max_keep; default 0 = off until measured on a GPU): the
//      tiles are zero-filled and lane = (row, K or V) stores its row's k kept values at their
//      channels, so the cost is O(k) per row instead of O(D). Other steps (partial tiles, a
//      single per-token tensor, different keeps, a row with an empty bitmap word before kept
//      ones) and all steps by default expand slot by slot:
//      lane = (row, 32-bit bitmap word), K and V interleaved. Ranks come from byte-wise popcounts
//      (SWAR) and, inside a byte, from a multiply that spreads its bits to bytes, so the eight
//      slots of a byte load their values independently (unconditional 2-byte loads, masked
//      afterwards) and leave as one 16-byte store. When the keep count is a multiple of 8 (rows of
//      packed values a multiple of 16 bytes apart, e.g. k = 64: 128 bytes), lanes take words and
//      bytes in a row-dependent order so that their loads spread over the banks (measured: 1.60 ->
//      0.99 ms at sparsity 0.5, batch 16 x 32k). Per-channel sections expand from global memory
//      (slow path: correctness first).
//   3. S^T [16 tokens, 8] = K [16, D] x Q'^T [D, 8] with mma.m16n8k16 (fp32 accumulate). The 8
//      columns are (hi, lo) parts of 4 query heads, so S = col 2h + col 2h+1 exactly; a group
//      of 8 uses two 8-column tiles (NT = 2).
//   4. Online softmax in base 2 on the accumulator fragments (row max: 3 shuffles; the
//      accumulators are rescaled only when some lane's maximum moved).
//   5. P (split into hi/lo, transposed in registers with movmatrix) feeds O^T [D, 8] +=
//      V^T [D, 16] x P'^T [16, 8], V^T read with ldmatrix.trans.
#ifndef SPARSEKV_KERNELS_CUDA_DECODE_KERNEL_CUH_
#define SPARSEKV_KERNELS_CUDA_DECODE_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/batch_decode.h"
#include "kernels/cuda/decode_dispatch.h"
#include "kernels/cuda/device_dtype.cuh"

namespace sparsekv::kernels::cuda::internal {

// ---------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy through L2 only; src_bytes = 0 writes 16 zero bytes.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Ldsm4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                      uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldsm2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldsm4T(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                       uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldsm2T(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}

// c += a [16x16, row] * b [16x8, col]; fp32 accumulate.
template <bool kBf16>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Transposes an 8x8 matrix of 16-bit elements held one row pair per thread (the mma fragment
// layout: thread 4g+t holds row g, columns 2t and 2t+1).
__device__ __forceinline__ uint32_t MoveMatrixT(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

// ---------------------------------------------------------------------------------------------
// 16-bit conversions (ToBits / FromBits: device_dtype.cuh).

// x = hi + lo with hi = round(x) in the storage dtype; lo = round(x - hi). Returns lo16 = hi.
template <bool kBf16>
__device__ __forceinline__ uint32_t SplitHiLo(float x) {
  const uint16_t hi = ToBits<kBf16>(x);
  const uint16_t lo = ToBits<kBf16>(x - FromBits<kBf16>(hi));
  return static_cast<uint32_t>(hi) | (static_cast<uint32_t>(lo) << 16);
}
template <bool kBf16>
__device__ __forceinline__ uint32_t Pack2(float a, float b) {
  return static_cast<uint32_t>(ToBits<kBf16>(a)) | (static_cast<uint32_t>(ToBits<kBf16>(b)) << 16);
}

// ---------------------------------------------------------------------------------------------
// Steps: which rows of which segment a warp stages and computes next. Two cursors walk the same
// sequence (one issues copies kStages-1 steps ahead, one computes), so no per-step state is
// stored. All fields are warp-uniform.

struct StepCursor {
  bool valid;
  int tile;            // item-relative tile
  int tile_end;        // of the unit
  int seg;             // item-relative segment
  int seg_tile_begin;  // item-relative tile of the segment's first token
  int seg_tile_end;
  int tokens, k_kind, v_kind, group, k_keep, v_keep;
  int row0, rows;  // this step: first row in the segment, valid rows (1..16)
};

__device__ __forceinline__ void LoadSegment(const DecodeSegment* segs, int s, StepCursor* c) {
  const DecodeSegment sg = segs[s];
  c->seg = s;
  c->tokens = sg.tokens;
  c->seg_tile_begin = sg.tile_begin;
  c->seg_tile_end = sg.tile_begin + (sg.tokens + kDecodeTileTokens - 1) / kDecodeTileTokens;
  c->k_kind = sg.k_kind;
  c->v_kind = sg.v_kind;
  c->group = sg.group;
  c->k_keep = sg.k_keep;
  c->v_keep = sg.v_keep;
}

__device__ __forceinline__ void SetStepRows(StepCursor* c) {
  c->row0 = (c->tile - c->seg_tile_begin) * kDecodeTileTokens;
  c->rows = min(kDecodeTileTokens, c->tokens - c->row0);
}

// Positions the cursor on the warp's first tile of [tile_begin, tile_end).
__device__ __forceinline__ void InitCursor(const DecodeSegment* segs, int num_segs, int first_tile,
                                           int tile_end, StepCursor* c) {
  c->valid = first_tile < tile_end;
  c->tile = first_tile;
  c->tile_end = tile_end;
  if (!c->valid) return;
  // Last segment with tile_begin <= first_tile (tile_begin strictly increases).
  int lo = 0, hi = num_segs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].tile_begin <= first_tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  LoadSegment(segs, lo, c);
  SetStepRows(c);
}

__device__ __forceinline__ void AdvanceCursor(const DecodeSegment* segs, StepCursor* c) {
  if (!c->valid) return;
  c->tile += kWarps;
  if (c->tile >= c->tile_end) {
    c->valid = false;
    return;
  }
  while (c->tile >= c->seg_tile_end) LoadSegment(segs, c->seg + 1, c);
  SetStepRows(c);
}

// ---------------------------------------------------------------------------------------------
// Staging (step 1).

// Copies bytes [begin, end) of `src` (16-byte aligned base) to dst, widened to 16-byte
// boundaries; the data of byte `begin` lands at dst + (begin & 15). Offsets within a compressed
// section fit 32 bits (a section is one chunk).
__device__ __forceinline__ void StageRange(const uint8_t* src, int begin, int end, uint32_t dst,
                                           int lane) {
  const int a = begin & ~15;
  const int n = (((end + 15) & ~15) - a) >> 4;
  const uint8_t* s = src + a;
  for (int i = lane; i < n; i += 32) CpAsync16(dst + 16 * i, s + 16 * i, 16);
}

// Dense rows [row0, row0 + rows) of [tokens, D] into a [16][TilePitch(D)] tile; rows >= `rows`
// are zero-filled (cp.async with source size 0 reads nothing).
template <int D>
__device__ __forceinline__ void StageDenseRows(const uint8_t* sec, int row0, int rows, uint32_t dst,
                                               int lane) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPitch = TilePitch(D);
  for (int i = lane; i < kDecodeTileTokens * kChunks; i += 32) {
    const int r = i / kChunks, ch = i % kChunks;
    const bool live = r < rows;
    const uint8_t* s = live ? sec + (static_cast<int64_t>(row0 + r) * D * 2 + ch * 16) : sec;
    CpAsync16(dst + r * kPitch + ch * 16, s, live ? 16 : 0);
  }
}

// Stages one tensor of a step into a ring slot (see TensorStageBytes).
template <int D, bool kDenseKernel>
__device__ __forceinline__ void StageTensor(int kind, const uint8_t* sec, int tokens, int keep,
                                            int row0, int rows, uint32_t dst, int lane) {
  if (kind == kKindDense) {
    if (kDenseKernel) StageDenseRows<D>(sec, row0, rows, dst, lane);
  } else if (kind == kKindPerToken) {
    constexpr int kBm = D / 8;
    StageRange(sec, row0 * kBm, (row0 + rows) * kBm, dst, lane);
    const int vbase = tokens * kBm;
    StageRange(sec, vbase + row0 * keep * 2, vbase + (row0 + rows) * keep * 2,
               dst + PerTokenValuesOffset(D), lane);
  }
  // Per-channel sections are read from global memory when the step is computed.
}

// ---------------------------------------------------------------------------------------------
// Expansion (step 2).

// Expands one 32-bit bitmap word of a per-token row into 32 halves at dst (16-byte aligned);
// `vals` points at the word's first kept value. No slot waits for another's rank: byte ranks come
// from a SWAR popcount, ranks inside a byte from a multiply that spreads its bits to bytes, and
// every slot loads unconditionally (its index never passes the row's kept values + 1, inside the
// staged region) and is masked to zero when not kept.
__device__ __forceinline__ uint16_t LoadHalf(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
template <bool kRot>
__device__ __forceinline__ void ExpandWord(uint32_t w, const uint8_t* vals, uint8_t* dst, int rot) {
  uint32_t c = w - ((w >> 1) & 0x55555555u);
  c = (c & 0x33333333u) + ((c >> 2) & 0x33333333u);
  c = (c + (c >> 4)) & 0x0f0f0f0fu;
  const uint32_t excl2 = c * 0x02020200u;  // byte j: 2 * kept bits in bytes < j
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    // kRot: bytes in a row-dependent order, so that lanes of different rows read values at
    // different bank offsets even when rows are a multiple of 128 bytes apart (k = 64).
    const int j = kRot ? (jj + rot) & 3 : jj;
    const uint32_t b = __byte_perm(w, 0u, 0x4440 + j);
    const uint8_t* base = vals + __byte_perm(excl2, 0u, 0x4440 + j);
    const uint32_t sa = ((b & 0xfu) * 0x00204081u) & 0x01010101u;  // bit i -> byte i (i < 4)
    const uint32_t sb = ((b >> 4) * 0x00204081u) & 0x01010101u;    // bit 4+i -> byte i
    const uint32_t ra = sa * 0x02020200u;                          // byte i: 2 * kept bits below i
    const uint32_t rb = sb * 0x02020200u + ((ra >> 24) + 2 * (sa >> 24)) * 0x01010101u;
    const uint32_t ma = sa * 0xffu, mb = sb * 0xffu;  // byte i: 0xff where kept
    uint32_t x[8];
    x[0] = LoadHalf(base);
    x[1] = LoadHalf(base + __byte_perm(ra, 0u, 0x4441));
    x[2] = LoadHalf(base + __byte_perm(ra, 0u, 0x4442));
    x[3] = LoadHalf(base + __byte_perm(ra, 0u, 0x4443));
    x[4] = LoadHalf(base + __byte_perm(rb, 0u, 0x4440));
    x[5] = LoadHalf(base + __byte_perm(rb, 0u, 0x4441));
    x[6] = LoadHalf(base + __byte_perm(rb, 0u, 0x4442));
    x[7] = LoadHalf(base + __byte_perm(rb, 0u, 0x4443));
    uint4 out;
    out.x = __byte_perm(x[0], x[1], 0x5410) & __byte_perm(ma, 0u, 0x1100);
    out.y = __byte_perm(x[2], x[3], 0x5410) & __byte_perm(ma, 0u, 0x3322);
    out.z = __byte_perm(x[4], x[5], 0x5410) & __byte_perm(mb, 0u, 0x1100);
    out.w = __byte_perm(x[6], x[7], 0x5410) & __byte_perm(mb, 0u, 0x3322);
    *reinterpret_cast<uint4*>(dst + 16 * j) = out;
  }
}

// One staged per-token tensor of a step: row 0's bitmap and packed values, and where to expand.
struct PerTokenSrc {
  const uint8_t* bm;    // row 0's bitmap (4-byte aligned)
  const uint8_t* vals;  // row 0's first packed value (2-byte aligned)
  int keep;
  uint8_t* buf;  // [16][TilePitch(D)] destination
};

// The popcount of each 32-bit word of a row's bitmap (D / 32 words).
template <int D>
__device__ __forceinline__ void WordCounts(const uint8_t* row_bm, bool live, int (&cnt)[D / 32]) {
  constexpr int kWords = D / 32;
  if constexpr (kWords == 2) {
    const uint2 v = live ? *reinterpret_cast<const uint2*>(row_bm) : make_uint2(0u, 0u);
    cnt[0] = __popc(v.x);
    cnt[1] = __popc(v.y);
  } else {
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      const uint4 v =
          live ? *reinterpret_cast<const uint4*>(row_bm + 16 * q) : make_uint4(0u, 0u, 0u, 0u);
      cnt[4 * q] = __popc(v.x);
      cnt[4 * q + 1] = __popc(v.y);
      cnt[4 * q + 2] = __popc(v.z);
      cnt[4 * q + 3] = __popc(v.w);
    }
  }
}
template <int D>
__device__ __forceinline__ int RankBefore(const int (&cnt)[D / 32], int word) {
  int r = 0;
#pragma unroll
  for (int x = 0; x < D / 32; ++x) r += x < word ? cnt[x] : 0;
  return r;
}

// Expands the staged per-token rows of one tensor (kTwo: of two, interleaved for
// instruction-level parallelism) into dense tiles; rows >= `rows` become zeros. Lane = (row =
// lane % 16, two 32-bit words per iteration: odd lanes the odd ones); a word's rank is the
// popcount of the row's earlier words (one shuffle per pair of words). kRot (for keep counts
// that are multiples of 8, whose rows sit at few bank offsets): odd rows take the word pairs in
// reverse order and bytes start at (row / 2) % 4 (see ExpandWord), ranks from all the row's
// word counts.
template <int D, bool kTwo, bool kRot>
__device__ __forceinline__ void ExpandPerToken(const PerTokenSrc& a, const PerTokenSrc& b, int rows,
                                               int lane) {
  constexpr int kIters = D / 64;  // two words per iteration
  constexpr int kPitch = TilePitch(D);
  const int row = lane & 15;
  const int odd = lane >> 4;
  const bool live = row < rows;
  const int rot = (row >> 1) & 3;
  const uint8_t* abm = a.bm + row * (D / 8);
  const uint8_t* bbm = kTwo ? b.bm + row * (D / 8) : nullptr;
  const uint8_t* va = a.vals + row * a.keep * 2;
  const uint8_t* vb = kTwo ? b.vals + row * b.keep * 2 : nullptr;
  int cnt_a[D / 32], cnt_b[D / 32];
  if (kRot) {
    WordCounts<D>(abm, live, cnt_a);
    if (kTwo) WordCounts<D>(bbm, live, cnt_b);
  }
  int run_a = 0, run_b = 0;  // !kRot: kept elements of the row in words before this iteration
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int word = kRot ? (2 * it + odd) ^ (kIters > 1 ? 2 * (row & 1) : 0) : 2 * it + odd;
    const uint32_t wa = live ? *reinterpret_cast<const uint32_t*>(abm + 4 * word) : 0u;
    const uint32_t wb = kTwo && live ? *reinterpret_cast<const uint32_t*>(bbm + 4 * word) : 0u;
    int ra, rb;
    if (kRot) {
      ra = RankBefore<D>(cnt_a, word);
      rb = kTwo ? RankBefore<D>(cnt_b, word) : 0;
    } else {
      const int ca = __popc(wa), cb = kTwo ? __popc(wb) : 0;
      const int other = __shfl_xor_sync(0xffffffffu, ca | (cb << 16), 16);
      ra = run_a + (odd ? (other & 0xffff) : 0);
      rb = run_b + (odd ? (other >> 16) : 0);
      run_a += ca + (other & 0xffff);
      run_b += cb + (other >> 16);
    }
    ExpandWord<kRot>(wa, va + 2 * ra, a.buf + row * kPitch + word * 64, rot);
    if (kTwo) ExpandWord<kRot>(wb, vb + 2 * rb, b.buf + row * kPitch + word * 64, rot);
  }
}

// Picks the expansion variant for one step's per-token tensors.
template <int D, bool kTwo>
__device__ __forceinline__ void ExpandStep(const PerTokenSrc& a, const PerTokenSrc& b, int rows,
                                           int lane) {
  if ((a.keep & 7) == 0 || (kTwo && (b.keep & 7) == 0)) {
    ExpandPerToken<D, kTwo, true>(a, b, rows, lane);
  } else {
    ExpandPerToken<D, kTwo, false>(a, b, rows, lane);
  }
}

// Scatter expansion (issue #13): cost O(kept elements) instead of O(channels). For a full step
// (16 rows) whose K and V are both per-token with the same keep count k: lane = (row = lane %
// 16, tensor = lane / 16) walks the k kept elements of its row in increasing channel order and
// stores each value into the zero-filled tile, so every lane does exactly k iterations (no
// divergence). The current bitmap word is held bit-reversed so that bfind yields the lowest
// remaining channel; the next word is loaded one word ahead. Needs every row's nonzero words to
// be contiguous from word 0 (no all-zero word before a kept element) and exactly k bits per row;
// returns false (nothing written) when some row of the warp is not so, and the caller expands
// the step with ExpandStep.
__device__ __forceinline__ uint32_t Bfind(uint32_t x) {
  uint32_t r;
  asm("bfind.u32 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}
template <int D>
__device__ __forceinline__ bool ScatterPerToken(const PerTokenSrc& a, const PerTokenSrc& b,
                                                int lane) {
  constexpr int kWords = D / 32;
  constexpr int kPitch = TilePitch(D);
  const int row = lane & 15;
  const bool second = lane >= 16;
  const int keep = a.keep;  // == b.keep (the caller checks)
  const uint8_t* bm = (second ? b.bm : a.bm) + row * (D / 8);
  uint32_t w[kWords];
  if constexpr (kWords == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(bm);
    w[0] = v.x;
    w[1] = v.y;
  } else {
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      const uint4 v = *reinterpret_cast<const uint4*>(bm + 16 * q);
      w[4 * q] = v.x;
      w[4 * q + 1] = v.y;
      w[4 * q + 2] = v.z;
      w[4 * q + 3] = v.w;
    }
  }
  uint32_t nz = 0;
  int bits = 0;
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
    nz |= (w[j] != 0u ? 1u : 0u) << j;
    bits += __popc(w[j]);
  }
  const bool ok = (nz & (nz + 1u)) == 0u && bits == keep;
  if (!__all_sync(0xffffffffu, ok)) return false;

  // Zero both tiles' payload (the 16 padding bytes of a row are never read).
  constexpr int kRowChunks = D / 8;
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = lane; i < 16 * kRowChunks; i += 32) {
    const int off = (i / kRowChunks) * kPitch + (i % kRowChunks) * 16;
    *reinterpret_cast<uint4*>(a.buf + off) = z;
    *reinterpret_cast<uint4*>(b.buf + off) = z;
  }
  __syncwarp();

  const uint16_t* vals =
      reinterpret_cast<const uint16_t*>((second ? b.vals : a.vals) + row * keep * 2);
  // Channel 32 * word + 31 - p (p: bit of the reversed word) is at wbase - 2 * p.
  uint8_t* wbase = (second ? b.buf : a.buf) + row * kPitch + 62;
  uint32_t x = __brev(w[0]);
  uint32_t next = w[1];
  // Word 2 onwards (reads run at most two words past the row: inside the staged bitmap region).
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(bm) + 2;
  auto put = [&](uint16_t v) {
    const uint32_t p = Bfind(x);
    x ^= 1u << p;
    *reinterpret_cast<uint16_t*>(wbase - 2 * static_cast<int>(p)) = v;
    if (x == 0u) {
      x = __brev(next);
      next = *wp;
      ++wp;
      wbase += 64;
    }
  };
  // Values are loaded four at a time, ahead of their stores.
  int e = 0;
  for (; e + 4 <= keep; e += 4) {
    uint16_t v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = vals[e + j];
#pragma unroll
    for (int j = 0; j < 4; ++j) put(v[j]);
  }
  for (; e < keep; ++e) put(vals[e]);
  return true;
}

// Expands tokens [row0, row0 + 16) of a per-channel section (global memory) into buf; rows >=
// `rows` become zeros. Lane = channel (mod 32).
template <int D>
__device__ __forceinline__ void ExpandPerChannel(const uint8_t* sec, int tokens, int group,
                                                 int keep, int row0, int rows, uint8_t* buf,
                                                 int lane) {
  constexpr int kPitch = TilePitch(D);
  const int bm_bytes = ((group + 31) / 32) * 4;
  const int64_t vectors = static_cast<int64_t>(tokens / group) * D;
  const uint16_t* vals = reinterpret_cast<const uint16_t*>(sec + vectors * bm_bytes);
  for (int c = lane; c < D; c += 32) {
    for (int i = 0; i < kDecodeTileTokens; ++i) {
      uint16_t x = 0;
      if (i < rows) {
        const int t = row0 + i;
        const int64_t vec = static_cast<int64_t>(t / group) * D + c;
        const int bit = t % group;
        const uint32_t* words = reinterpret_cast<const uint32_t*>(sec + vec * bm_bytes);
        const uint32_t w = __ldg(words + (bit >> 5));
        if ((w >> (bit & 31)) & 1u) {
          int rank = __popc(w & ((1u << (bit & 31)) - 1u));
          for (int x2 = 0; x2 < (bit >> 5); ++x2) rank += __popc(__ldg(words + x2));
          x = __ldg(vals + vec * keep + rank);
        }
      }
      *reinterpret_cast<uint16_t*>(buf + i * kPitch + c * 2) = x;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.

// Head dims up to 128 with groups up to 4 fit 3 blocks (12 warps) per SM; register use is
// capped accordingly (170).
template <int D, int NT>
inline constexpr int kMinBlocks = (D <= 128 && NT == 1) ? 3 : 1;

template <int D, int NT, bool kBf16, bool kDense>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<D, NT>))
    BatchDecodeKernel(const BatchDecodeParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int last_flag;
  constexpr int kPitch = TilePitch(D);
  constexpr int kKB = D / 16;  // 16-channel blocks
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  const float kNegInf = -__int_as_float(0x7f800000);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int G = p.shape.group;
  const int H = p.shape.num_kv_heads;
  const int SB = p.stage_bytes;
  const int warp_bytes = WarpSmemBytes(SB, D, kDense);
  uint8_t* wsm = smem + warp * warp_bytes;
  uint8_t* kbuf = wsm + kStages * SB;
  uint8_t* vbuf = kbuf + 16 * kPitch;
  float* scratch = reinterpret_cast<float*>(wsm);  // after the pipeline drains

  const int unit_begin = p.block_units[blockIdx.x];
  const int unit_end = p.block_units[blockIdx.x + 1];
  for (int u = unit_begin; u < unit_end; ++u) {
    const DecodeWorkUnit unit = p.units[u];
    const DecodeItem item = p.items[unit.item];
    const DecodeSegment* segs = p.segments + item.segment_begin;
    const float* q = item.q + static_cast<int64_t>(unit.kv_head) * G * D;

    // --- Query fragments. Each head is scaled by 2^-e (|q'| < 1) so that its fp16 hi/lo parts
    // neither overflow nor lose the low part to underflow; 2^e goes into the score scale.
    int qexp[kMaxDecodeGroup];
#pragma unroll
    for (int h = 0; h < kMaxDecodeGroup; ++h) {
      float mx = 0.0f;
      if (h < G) {
        for (int c = lane; c < D; c += 32) mx = fmaxf(mx, fabsf(q[h * D + c]));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      qexp[h] = (mx > 0.0f && mx < __int_as_float(0x7f800000)) ? ilogbf(mx) + 1 : 0;
    }
    uint32_t qf[NT][kKB][2];
    float sc[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int hq = nt * 4 + (g >> 1);  // head of B column g
      const int hs = nt * 4 + t;         // head of accumulator columns 2t, 2t+1
      int eq = 0, es = 0;
#pragma unroll
      for (int h = 0; h < kMaxDecodeGroup; ++h) {
        if (h == hq) eq = qexp[h];
        if (h == hs) es = qexp[h];
      }
      sc[nt] = hs < G ? ldexpf(item.scale * kLog2e, es) : 0.0f;
      const bool lo_part = g & 1;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (hq < G) {
          const int c0 = kb * 16 + 2 * t;
          const int cs[4] = {c0, c0 + 1, c0 + 8, c0 + 9};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float qv = ldexpf(q[hq * D + cs[i]], -eq);
            const float hi = FromBits<kBf16>(ToBits<kBf16>(qv));
            x[i] = lo_part ? qv - hi : hi;
          }
        }
        qf[nt][kb][0] = Pack2<kBf16>(x[0], x[1]);
        qf[nt][kb][1] = Pack2<kBf16>(x[2], x[3]);
      }
    }

    float m[NT], l[NT];
    float o[NT][kKB][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      m[nt] = kNegInf;
      l[nt] = 0.0f;
#pragma unroll
      for (int i = 0; i < kKB; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) o[nt][i][j] = 0.0f;
      }
    }

    // --- Pipeline over the warp's steps.
    const int64_t ptr_base = static_cast<int64_t>(item.segment_begin) * H + unit.kv_head;
    auto section = [&](const void* const* table, int seg) {
      return static_cast<const uint8_t*>(table[ptr_base + static_cast<int64_t>(seg) * H]);
    };
    auto issue = [&](const StepCursor& c, int slot) {
      const uint32_t dst = SmemAddr(wsm + slot * SB);
      StageTensor<D, kDense>(c.k_kind, section(p.k_sections, c.seg), c.tokens, c.k_keep, c.row0,
                             c.rows, dst, lane);
      StageTensor<D, kDense>(c.v_kind, section(p.v_sections, c.seg), c.tokens, c.v_keep, c.row0,
                             c.rows, dst + TensorStageBytes(c.k_kind, D, c.k_keep, kDense), lane);
    };
    // Where a staged per-token tensor's row 0 landed in its slot region (the copies start at the
    // 16-byte boundary at or below the first byte).
    auto per_token = [&](const StepCursor& c, const uint8_t* region, int keep, uint8_t* buf) {
      const int bdelta = (c.row0 * (D / 8)) & 15;
      const int vdelta = (c.tokens * (D / 8) + c.row0 * keep * 2) & 15;
      return PerTokenSrc{region + bdelta, region + PerTokenValuesOffset(D) + vdelta, keep, buf};
    };

    StepCursor ci, cc;
    InitCursor(segs, item.num_segments, unit.tile_begin + warp, unit.tile_end, &ci);
    cc = ci;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (ci.valid) issue(ci, s);
      CpAsyncCommit();
      AdvanceCursor(segs, &ci);
    }
    int step = 0;
    while (cc.valid) {
      // The slot of step - 1, computed in the previous iteration (and synced), is free.
      if (ci.valid) issue(ci, (step + kStages - 1) % kStages);
      CpAsyncCommit();
      AdvanceCursor(segs, &ci);
      CpAsyncWait<kStages - 1>();
      __syncwarp();

      const uint8_t* slot = wsm + (step % kStages) * SB;
      const uint8_t* vslot = slot + TensorStageBytes(cc.k_kind, D, cc.k_keep, kDense);
      const int rows = cc.rows;
      const uint8_t* ktile = kbuf;
      const uint8_t* vtile = vbuf;
      if (kDense) {
        ktile = slot;
        vtile = vslot;
      } else {
        // Dense rows (the tail): straight into the tiles, now.
        const bool kd = cc.k_kind == kKindDense, vd = cc.v_kind == kKindDense;
        if (kd || vd) {
          if (kd)
            StageDenseRows<D>(section(p.k_sections, cc.seg), cc.row0, rows, SmemAddr(kbuf), lane);
          if (vd)
            StageDenseRows<D>(section(p.v_sections, cc.seg), cc.row0, rows, SmemAddr(vbuf), lane);
          CpAsyncCommit();
          CpAsyncWait<0>();
        }
        const bool kt = cc.k_kind == kKindPerToken, vt = cc.v_kind == kKindPerToken;
        if (kt && vt && rows == kDecodeTileTokens && cc.k_keep == cc.v_keep &&
            cc.k_keep <= p.scatter_max_keep &&
            ScatterPerToken<D>(per_token(cc, slot, cc.k_keep, kbuf),
                               per_token(cc, vslot, cc.v_keep, vbuf), lane)) {
          // Expanded by scatter.
        } else if (kt && vt) {
          ExpandStep<D, true>(per_token(cc, slot, cc.k_keep, kbuf),
                              per_token(cc, vslot, cc.v_keep, vbuf), rows, lane);
        } else if (kt) {
          const PerTokenSrc src = per_token(cc, slot, cc.k_keep, kbuf);
          ExpandStep<D, false>(src, src, rows, lane);
        } else if (vt) {
          const PerTokenSrc src = per_token(cc, vslot, cc.v_keep, vbuf);
          ExpandStep<D, false>(src, src, rows, lane);
        }
        if (cc.k_kind == kKindPerChannel) {
          ExpandPerChannel<D>(section(p.k_sections, cc.seg), cc.tokens, cc.group, cc.k_keep,
                              cc.row0, rows, kbuf, lane);
        }
        if (cc.v_kind == kKindPerChannel) {
          ExpandPerChannel<D>(section(p.v_sections, cc.seg), cc.tokens, cc.group, cc.v_keep,
                              cc.row0, rows, vbuf, lane);
        }
      }
      __syncwarp();

      // S^T = K Q'^T.
      float sacc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sacc[nt][j] = 0.0f;
      }
      const uint32_t kaddr = SmemAddr(ktile);
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        uint32_t a[4];
        Ldsm4(
            kaddr + ((lane & 7) + 8 * ((lane >> 3) & 1)) * kPitch + (kb * 16 + 8 * (lane >> 4)) * 2,
            a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<kBf16>(sacc[nt], a, qf[nt][kb][0], qf[nt][kb][1]);
      }

      // Online softmax (base 2). Thread holds tokens g and g+8 of head nt*4 + t.
      uint32_t pb[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float s0 = (sacc[nt][0] + sacc[nt][1]) * sc[nt];
        float s1 = (sacc[nt][2] + sacc[nt][3]) * sc[nt];
        if (g >= rows) s0 = kNegInf;
        if (g + 8 >= rows) s1 = kNegInf;
        float mx = fmaxf(s0, s1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mn = fmaxf(m[nt], mx);
        // With every score so far -inf, subtract 0: p = 0 for -inf and NaN stays NaN.
        const float mu = mn == kNegInf ? 0.0f : mn;
        const float alpha = exp2f(m[nt] - mu);
        const float p0 = exp2f(s0 - mu);
        const float p1 = exp2f(s1 - mu);
        l[nt] = l[nt] * alpha + (p0 + p1);
        m[nt] = mn;
        // The maximum rarely moves after the first tiles: skip the rescale when no lane's did.
        if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
          for (int i = 0; i < kKB; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) o[nt][i][j] *= alpha;
          }
        }
        pb[nt][0] = MoveMatrixT(SplitHiLo<kBf16>(p0));
        pb[nt][1] = MoveMatrixT(SplitHiLo<kBf16>(p1));
      }

      // O^T += V^T P'^T.
      const uint32_t vaddr = SmemAddr(vtile);
#pragma unroll
      for (int i = 0; i < kKB; ++i) {
        uint32_t a[4];
        Ldsm4T(
            vaddr + ((lane & 7) + 8 * (lane >> 4)) * kPitch + (i * 16 + 8 * ((lane >> 3) & 1)) * 2,
            a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<kBf16>(o[nt][i], a, pb[nt][0], pb[nt][1]);
      }
      __syncwarp();
      AdvanceCursor(segs, &cc);
      ++step;
    }
    CpAsyncWait<0>();
    __syncwarp();

    // --- Warp state -> scratch: m[8], l[8], acc[8][D].
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float lt = l[nt];
      lt += __shfl_xor_sync(0xffffffffu, lt, 4);
      lt += __shfl_xor_sync(0xffffffffu, lt, 8);
      lt += __shfl_xor_sync(0xffffffffu, lt, 16);
      const int hs = nt * 4 + t;
      if (g == 0) {
        scratch[hs] = m[nt];
        scratch[8 + hs] = lt;
      }
      float* acc = scratch + 16 + hs * D;
#pragma unroll
      for (int i = 0; i < kKB; ++i) {
        acc[i * 16 + g] = o[nt][i][0] + o[nt][i][1];
        acc[i * 16 + g + 8] = o[nt][i][2] + o[nt][i][3];
      }
    }
    __syncthreads();

    // --- Merge the warps; write the output or this unit's partial.
    const int warp_floats = warp_bytes / 4;
    const float* base = reinterpret_cast<const float*>(smem);
    const bool single = unit.num_units == 1;
    for (int idx = tid; idx < G * D; idx += kThreads) {
      const int h = idx / D, c = idx % D;
      float M = kNegInf;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) M = fmaxf(M, base[w * warp_floats + h]);
      const float Mu = M == kNegInf ? 0.0f : M;
      float L = 0.0f, O = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float* ws = base + w * warp_floats;
        const float f = exp2f(ws[h] - Mu);
        L += ws[8 + h] * f;
        O += ws[16 + h * D + c] * f;
      }
      const float val = L == 0.0f ? 0.0f : O / L;
      const float lse2 = L == 0.0f ? kNegInf : M + log2f(L);
      if (single) {
        const int64_t qh = static_cast<int64_t>(unit.kv_head) * G + h;
        item.out[qh * D + c] = val;
        if (c == 0 && item.lse != nullptr) item.lse[qh] = lse2 * kLn2;
      } else {
        p.partial_out[(static_cast<int64_t>(u) * G + h) * D + c] = val;
        if (c == 0) p.partial_lse[static_cast<int64_t>(u) * G + h] = lse2;
      }
    }

    if (!single) {
      // The last unit of this (item, KV head) to finish merges all of them.
      __threadfence();
      __syncthreads();
      if (tid == 0) {
        const int prev =
            atomicAdd(p.counters + static_cast<int64_t>(unit.item) * H + unit.kv_head, 1);
        last_flag = prev == unit.num_units - 1;
      }
      __syncthreads();
      if (last_flag) {
        __threadfence();
        for (int idx = tid; idx < G * D; idx += kThreads) {
          const int h = idx / D, c = idx % D;
          float M = kNegInf;
          for (int v = 0; v < unit.num_units; ++v) {
            M = fmaxf(M, __ldcg(p.partial_lse + static_cast<int64_t>(unit.first_unit + v) * G + h));
          }
          const float Mu = M == kNegInf ? 0.0f : M;
          float L = 0.0f, O = 0.0f;
          for (int v = 0; v < unit.num_units; ++v) {
            const int64_t pu = unit.first_unit + v;
            const float f = exp2f(__ldcg(p.partial_lse + pu * G + h) - Mu);
            L += f;
            O += f * __ldcg(p.partial_out + (pu * G + h) * D + c);
          }
          const int64_t qh = static_cast<int64_t>(unit.kv_head) * G + h;
          item.out[qh * D + c] = L == 0.0f ? 0.0f : O / L;
          if (c == 0 && item.lse != nullptr) {
            item.lse[qh] = L == 0.0f ? kNegInf : (M + log2f(L)) * kLn2;
          }
        }
        if (tid == 0)
          atomicExch(p.counters + static_cast<int64_t>(unit.item) * H + unit.kv_head, 0);
      }
    }
    __syncthreads();  // scratch and slots are reused by the next unit
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch over (head_dim, n-tiles) for one (kernel kind, dtype); instantiated in one .cu file
// each. With p == nullptr it only reports the kernel's resident blocks per SM for `smem` bytes.

template <int D, int NT, bool kBf16, bool kDense>
cudaError_t LaunchOne(const BatchDecodeParams* p, cudaStream_t stream, int smem, int* blocks) {
  auto* kernel = BatchDecodeKernel<D, NT, kBf16, kDense>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (p == nullptr) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem);
  }
  if (p->num_blocks == 0) return cudaSuccess;
  kernel<<<p->num_blocks, kThreads, smem, stream>>>(*p);
  return cudaGetLastError();
}

template <bool kBf16, bool kDense>
cudaError_t DispatchDecode(const BatchDecodeParams* p, const BatchDecodeShape& shape, int smem,
                           cudaStream_t stream, int* blocks) {
  const bool two = shape.group > 4;
  switch (shape.head_dim) {
    case 64:
      return two ? LaunchOne<64, 2, kBf16, kDense>(p, stream, smem, blocks)
                 : LaunchOne<64, 1, kBf16, kDense>(p, stream, smem, blocks);
    case 128:
      return two ? LaunchOne<128, 2, kBf16, kDense>(p, stream, smem, blocks)
                 : LaunchOne<128, 1, kBf16, kDense>(p, stream, smem, blocks);
    case 256:
      return two ? LaunchOne<256, 2, kBf16, kDense>(p, stream, smem, blocks)
                 : LaunchOne<256, 1, kBf16, kDense>(p, stream, smem, blocks);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sparsekv::kernels::cuda::internal

#endif  // SPARSEKV_KERNELS_CUDA_DECODE_KERNEL_CUH_
