// Fixed-size block allocation for compressed chunks. A chunk's size is fixed by (tokens,
// head_dim, k, dtype, heads), so chunks of one session layout share a pool: blocks are carved
// from 1 MiB slabs and recycled through a free list, avoiding heap fragmentation from many
// equal-sized allocations and making chunk memory easy to account.
//
// Thread-safe.
#ifndef SPARSEKV_CORE_SLAB_POOL_H_
#define SPARSEKV_CORE_SLAB_POOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "core/mutex.h"

namespace sparsekv {

class SlabPool {
 public:
  explicit SlabPool(size_t block_bytes);
  SlabPool(const SlabPool&) = delete;
  SlabPool& operator=(const SlabPool&) = delete;

  size_t block_bytes() const { return block_bytes_; }
  // A block of block_bytes() bytes, 64-byte aligned (cache line; also fine for SIMD loads).
  uint8_t* Allocate();
  // REQUIRES: p came from this pool's Allocate and is not in use.
  void Free(uint8_t* p);

  // Bytes reserved from the system (whole slabs) and bytes handed out.
  size_t reserved_bytes() const;
  size_t used_bytes() const;

 private:
  const size_t block_bytes_;  // rounded up to 64
  const size_t blocks_per_slab_;
  mutable Mutex mu_;
  std::vector<std::unique_ptr<uint8_t[]>> slabs_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t*> free_ ABSL_GUARDED_BY(mu_);
  size_t used_ ABSL_GUARDED_BY(mu_) = 0;
};

// Pools by block size, created on first use and kept for the process lifetime.
class SlabPoolSet {
 public:
  // The pool for `block_bytes`; the pointer stays valid as long as this set.
  SlabPool* Get(size_t block_bytes);
  size_t reserved_bytes() const;

 private:
  mutable Mutex mu_;
  std::map<size_t, std::unique_ptr<SlabPool>> pools_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SLAB_POOL_H_
