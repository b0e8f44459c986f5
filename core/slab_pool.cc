#include "core/slab_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace sparsekv {
namespace {
constexpr size_t kMinSlabBytes = size_t{1} << 20;
constexpr size_t kAlign = 64;
constexpr size_t kPage = 4096;

uint8_t* MapSlab(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "sparsekv: mmap of a %zu-byte slab failed\n", bytes);
    std::abort();
  }
  return static_cast<uint8_t*>(p);
}
}  // namespace

SlabPool::SlabPool(size_t block_bytes, std::atomic<int64_t>* idle_bytes, int64_t max_idle_bytes)
    : block_bytes_((std::max<size_t>(block_bytes, 1) + kAlign - 1) / kAlign * kAlign),
      blocks_per_slab_(std::max<size_t>(1, kMinSlabBytes / block_bytes_)),
      // Page-aligned mappings are 64-byte aligned too.
      slab_bytes_((blocks_per_slab_ * block_bytes_ + kPage - 1) / kPage * kPage),
      idle_bytes_(idle_bytes ? idle_bytes : &own_idle_),
      max_idle_bytes_(max_idle_bytes) {}

SlabPool::~SlabPool() {
  MutexLock lock(&mu_);
  while (!slabs_.empty()) ReleaseSlab(slabs_.begin());
}

uint8_t* SlabPool::Allocate() {
  MutexLock lock(&mu_);
  if (partial_.empty()) {
    uint8_t* base = MapSlab(slab_bytes_);
    Slab& s = slabs_[reinterpret_cast<uintptr_t>(base)];
    s.base = base;
    s.free.reserve(blocks_per_slab_);
    for (size_t i = blocks_per_slab_; i-- > 0;) s.free.push_back(base + i * block_bytes_);
    partial_.insert(reinterpret_cast<uintptr_t>(base));
    idle_bytes_->fetch_add(static_cast<int64_t>(slab_bytes_));  // empty until the next line
  }
  Slab& s = slabs_.at(*partial_.begin());
  if (s.used == 0) idle_bytes_->fetch_sub(static_cast<int64_t>(slab_bytes_));
  uint8_t* p = s.free.back();
  s.free.pop_back();
  ++s.used;
  if (s.free.empty()) partial_.erase(reinterpret_cast<uintptr_t>(s.base));
  used_ += block_bytes_;
  return p;
}

void SlabPool::Free(uint8_t* p) {
  MutexLock lock(&mu_);
  auto it = std::prev(slabs_.upper_bound(reinterpret_cast<uintptr_t>(p)));
  Slab& s = it->second;
  s.free.push_back(p);
  --s.used;
  used_ -= block_bytes_;
  partial_.insert(it->first);
  if (s.used > 0) return;
  const int64_t idle =
      idle_bytes_->fetch_add(static_cast<int64_t>(slab_bytes_)) + static_cast<int64_t>(slab_bytes_);
  if (idle > max_idle_bytes_) ReleaseSlab(it);
}

void SlabPool::ReleaseSlab(std::map<uintptr_t, Slab>::iterator it) {
  // Only empty slabs are released while the pool lives; the destructor releases the rest.
  if (it->second.used == 0) idle_bytes_->fetch_sub(static_cast<int64_t>(slab_bytes_));
  partial_.erase(it->first);
  munmap(it->second.base, slab_bytes_);
  slabs_.erase(it);
}

size_t SlabPool::reserved_bytes() const {
  MutexLock lock(&mu_);
  return slabs_.size() * slab_bytes_;
}

size_t SlabPool::used_bytes() const {
  MutexLock lock(&mu_);
  return used_;
}

SlabPool* SlabPoolSet::Get(size_t block_bytes) {
  MutexLock lock(&mu_);
  std::unique_ptr<SlabPool>& p = pools_[block_bytes];
  if (!p) p = std::make_unique<SlabPool>(block_bytes, &idle_bytes_, max_idle_bytes_);
  return p.get();
}

size_t SlabPoolSet::reserved_bytes() const {
  MutexLock lock(&mu_);
  size_t total = 0;
  for (const auto& [size, pool] : pools_) total += pool->reserved_bytes();
  return total;
}

}  // namespace sparsekv
