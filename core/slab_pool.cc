#include "core/slab_pool.h"

#include <algorithm>

namespace sparsekv {
namespace {
constexpr size_t kSlabBytes = size_t{1} << 20;
constexpr size_t kAlign = 64;
}  // namespace

SlabPool::SlabPool(size_t block_bytes)
    : block_bytes_((std::max<size_t>(block_bytes, 1) + kAlign - 1) / kAlign * kAlign),
      blocks_per_slab_(std::max<size_t>(1, kSlabBytes / block_bytes_)) {}

uint8_t* SlabPool::Allocate() {
  MutexLock lock(&mu_);
  if (free_.empty()) {
    // One extra alignment unit so that the first block can be aligned.
    slabs_.emplace_back(new uint8_t[blocks_per_slab_ * block_bytes_ + kAlign]);
    const uintptr_t base = reinterpret_cast<uintptr_t>(slabs_.back().get());
    uint8_t* first = reinterpret_cast<uint8_t*>((base + kAlign - 1) / kAlign * kAlign);
    for (size_t i = blocks_per_slab_; i-- > 0;) free_.push_back(first + i * block_bytes_);
  }
  uint8_t* p = free_.back();
  free_.pop_back();
  used_ += block_bytes_;
  return p;
}

void SlabPool::Free(uint8_t* p) {
  MutexLock lock(&mu_);
  free_.push_back(p);
  used_ -= block_bytes_;
}

size_t SlabPool::reserved_bytes() const {
  MutexLock lock(&mu_);
  return slabs_.size() * (blocks_per_slab_ * block_bytes_ + kAlign);
}

size_t SlabPool::used_bytes() const {
  MutexLock lock(&mu_);
  return used_;
}

SlabPool* SlabPoolSet::Get(size_t block_bytes) {
  MutexLock lock(&mu_);
  std::unique_ptr<SlabPool>& p = pools_[block_bytes];
  if (!p) p = std::make_unique<SlabPool>(block_bytes);
  return p.get();
}

size_t SlabPoolSet::reserved_bytes() const {
  MutexLock lock(&mu_);
  size_t total = 0;
  for (const auto& [size, pool] : pools_) total += pool->reserved_bytes();
  return total;
}

}  // namespace sparsekv
