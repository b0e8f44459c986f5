// Fixed-size block allocation for compressed chunks. A chunk's size is fixed by (tokens,
// head_dim, k, dtype, heads), so chunks of one session layout share a pool: blocks are carved
// from slabs of at least 1 MiB and recycled, avoiding heap fragmentation from many
// equal-sized allocations and making chunk memory easy to account.
//
// Slabs are mapped from the system directly, and a slab whose blocks are all free goes back
// to the system unless the pools together keep fewer idle bytes than their high-water mark
// (SlabPoolSet's max_idle_bytes): memory returns after sessions are deleted, while a steady
// load that frees and refills chunks does not map and unmap a slab per chunk.
//
// Thread-safe.
#ifndef SPARSEKV_CORE_SLAB_POOL_H_
#define SPARSEKV_CORE_SLAB_POOL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "core/mutex.h"

namespace sparsekv {

class SlabPool {
 public:
  // `idle_bytes` (shared by the pools of one set, may be null) counts the bytes of empty slabs
  // kept; a slab that empties is kept only while that count stays under `max_idle_bytes`.
  SlabPool(size_t block_bytes, std::atomic<int64_t>* idle_bytes = nullptr,
           int64_t max_idle_bytes = 0);
  ~SlabPool();
  SlabPool(const SlabPool&) = delete;
  SlabPool& operator=(const SlabPool&) = delete;

  size_t block_bytes() const { return block_bytes_; }
  // A block of block_bytes() bytes, 64-byte aligned (cache line; also fine for SIMD loads).
  // Aborts when the system has no memory left (the byte budget is there to prevent that).
  uint8_t* Allocate();
  // REQUIRES: p came from this pool's Allocate and is not in use.
  void Free(uint8_t* p);

  // Bytes mapped from the system (whole slabs) and bytes handed out.
  size_t reserved_bytes() const;
  size_t used_bytes() const;

 private:
  struct Slab {
    uint8_t* base = nullptr;
    std::vector<uint8_t*> free;
    size_t used = 0;  // blocks handed out
  };
  void ReleaseSlab(std::map<uintptr_t, Slab>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t block_bytes_;  // rounded up to 64
  const size_t blocks_per_slab_;
  const size_t slab_bytes_;
  std::atomic<int64_t>* const idle_bytes_;
  const int64_t max_idle_bytes_;
  std::atomic<int64_t> own_idle_{0};  // used when no set shares a counter
  mutable Mutex mu_;
  std::map<uintptr_t, Slab> slabs_ ABSL_GUARDED_BY(mu_);  // by base address
  // Slabs with free blocks, lowest address first: allocating from the fullest-packed end
  // lets the others empty out and be released.
  std::set<uintptr_t> partial_ ABSL_GUARDED_BY(mu_);
  size_t used_ ABSL_GUARDED_BY(mu_) = 0;
};

// Pools by block size, created on first use and kept for the set's lifetime (an empty pool
// holds no slabs, only its map entry).
class SlabPoolSet {
 public:
  // Empty slabs kept for reuse across all pools, at most; the rest return to the system.
  explicit SlabPoolSet(int64_t max_idle_bytes = int64_t{8} << 20)
      : max_idle_bytes_(max_idle_bytes) {}

  // The pool for `block_bytes`; the pointer stays valid as long as this set.
  SlabPool* Get(size_t block_bytes);
  size_t reserved_bytes() const;

 private:
  const int64_t max_idle_bytes_;
  std::atomic<int64_t> idle_bytes_{0};
  mutable Mutex mu_;
  std::map<size_t, std::unique_ptr<SlabPool>> pools_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SLAB_POOL_H_
