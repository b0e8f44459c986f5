// The paced software prefetcher shared by the SIMD decode-attention variants
// (avx512_attention.cc, avx512_fp16_attention.cc, avx2_attention.cc): while one block of rows
// computes, the next block's bytes are pulled into L2. Baseline x86-64 code (SSE prefetch
// instructions only), so any variant's target-attributed functions can inline it.
#ifndef SPARSEKV_KERNELS_CPU_PREFETCHER_H_
#define SPARSEKV_KERNELS_CPU_PREFETCHER_H_

#include <xmmintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#define SKV_PREFETCH_INLINE inline __attribute__((always_inline))

namespace sparsekv::kernels {

// Software prefetch of the next block's bytes, spread over the current block's row loops: the
// hardware prefetchers alone left compute and DRAM reads mostly serialised (measured: dense
// decode at ~50% of the streaming bandwidth without it). Prefetches are paced: the row loops
// report work done in units of 1/8 row of K or V, and each unit releases an equal share of the
// next block's lines. Bursts fill the line-fill buffers that the current block's own loads
// need: a fixed 8 lines per K row pair was ~8% slower at 70% sparsity than 4, while 4 left
// dense under-prefetched. The row loops copy the prefetcher into a local so that (cur, end,
// credit) stay in registers. Lines go to L2 (T1), not L1: the L1's 16 line-fill buffers capped
// dense decode at ~11.7 GB/s where L2-bound prefetches reach ~13.7 (dense 26.6 -> 24.0 ms per
// step, GQA 4; sparse unchanged).
struct Prefetcher {
  static constexpr int kUnitsPerRow = 8;
  const char* cur = nullptr;
  const char* end = nullptr;
  const char* next_begin[3];
  const char* next_end[3];
  int pending = 0;      // ranges added after the first
  int taken = 0;        // of those, ranges started (in the order added: the order of use)
  uint32_t lines = 0;   // lines added since Clear
  uint32_t rate = 0;    // 1/256 lines per unit
  uint32_t credit = 0;  // 1/256 lines

  void Clear() {
    cur = end = nullptr;
    pending = taken = 0;
    lines = credit = 0;
  }
  void Add(const uint8_t* p, size_t bytes) {
    if (bytes == 0) return;
    const char* b = reinterpret_cast<const char*>(p);
    lines += static_cast<uint32_t>((bytes + 63) / 64);
    if (cur >= end) {
      cur = b;
      end = b + bytes;
    } else if (pending < 3) {
      next_begin[pending] = b;
      next_end[pending] = b + bytes;
      ++pending;
    }
  }
  // Sets the pace for a block whose K and V loops report `rows` rows each: the lines are
  // spread evenly over the block's work (releasing them over its first 4/5 or 2/3 measured
  // 2-10% slower, dense most).
  void Pace(int rows) {
    const uint32_t units = static_cast<uint32_t>(std::max(rows, 1)) * 2 * kUnitsPerRow;
    rate = static_cast<uint32_t>((static_cast<uint64_t>(lines) * 256 + units - 1) / units);
  }
  // Reports `units` of work done: issues the lines it has earned.
  SKV_PREFETCH_INLINE void Step(int units) {
    credit += static_cast<uint32_t>(units) * rate;
    int n = static_cast<int>(credit >> 8);
    credit &= 0xff;
    for (; n > 0; --n) {
      if (__builtin_expect(cur >= end, 0)) {
        if (taken == pending) return;
        cur = next_begin[taken];
        end = next_end[taken];
        ++taken;
      }
      _mm_prefetch(cur, _MM_HINT_T1);
      cur += 64;
    }
  }
};

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_PREFETCHER_H_
