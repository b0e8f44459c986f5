#include "kernels/finite_check.h"

#include <algorithm>

namespace sparsekv::kernels {
namespace {

// Smallest |x| bit patterns (sign cleared) that are not storable:
// fp32 -> fp16: |x| >= 65520 (0x477ff000) rounds to Inf (round to nearest even);
// fp32 -> bf16: |x| >= 0x7f7f8000 rounds to Inf; fp32 -> fp32: Inf/NaN only (0x7f800000).
constexpr uint32_t kF32LimitFor[3] = {0x7f800000u, 0x477ff000u, 0x7f7f8000u};

// Scans in blocks with a branch-free "any" reduction (vectorisable), and only looks for the
// index inside a block that has a bad element: clean input, the common case, costs one pass.
template <typename T, typename Bad>
int64_t Scan(const T* p, size_t n, Bad bad) {
  constexpr size_t kBlock = 4096;
  for (size_t base = 0; base < n; base += kBlock) {
    const size_t end = std::min(n, base + kBlock);
    unsigned any = 0;
    for (size_t i = base; i < end; ++i) any |= bad(p[i]) ? 1u : 0u;
    if (!any) continue;
    for (size_t i = base; i < end; ++i) {
      if (bad(p[i])) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

}  // namespace

int64_t FindUnstorable(DType src, const void* data, size_t n, DType storage) {
  switch (src) {
    case DType::kFloat32: {
      const uint32_t limit = kF32LimitFor[static_cast<int>(storage)];
      return Scan(static_cast<const uint32_t*>(data), n,
                  [limit](uint32_t x) { return (x & 0x7fffffffu) >= limit; });
    }
    case DType::kFloat16:
      // Every finite fp16 value is finite in fp32 and bf16.
      return Scan(static_cast<const uint16_t*>(data), n,
                  [](uint16_t x) { return (x & 0x7c00u) == 0x7c00u; });
    case DType::kBFloat16: {
      if (storage != DType::kFloat16) {
        return Scan(static_cast<const uint16_t*>(data), n,
                    [](uint16_t x) { return (x & 0x7f80u) == 0x7f80u; });
      }
      // bf16 -> fp16: the bf16 value widened to fp32 bits, then the fp16 limit.
      return Scan(static_cast<const uint16_t*>(data), n, [](uint16_t x) {
        return (static_cast<uint32_t>(x & 0x7fffu) << 16) >= kF32LimitFor[1];
      });
    }
  }
  return -1;
}

}  // namespace sparsekv::kernels
