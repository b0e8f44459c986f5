// SlabPool: blocks are aligned, distinct and recycled; slabs whose blocks are all free go back
// to the system past the set's idle high-water mark.
#include "core/slab_pool.h"

#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <vector>

namespace sparsekv {
namespace {

TEST(SlabPoolTest, BlocksAreAlignedDistinctAndWritable) {
  SlabPool pool(1000);
  EXPECT_EQ(pool.block_bytes(), 1024u);
  std::set<uint8_t*> seen;
  std::vector<uint8_t*> blocks;
  for (int i = 0; i < 3000; ++i) {  // spans several slabs
    uint8_t* p = pool.Allocate();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
    EXPECT_TRUE(seen.insert(p).second);
    std::memset(p, i & 0xff, pool.block_bytes());
    blocks.push_back(p);
  }
  for (int i = 0; i < 3000; ++i) EXPECT_EQ(blocks[i][1023], i & 0xff);
  EXPECT_EQ(pool.used_bytes(), 3000u * 1024);
  for (uint8_t* p : blocks) pool.Free(p);
  EXPECT_EQ(pool.used_bytes(), 0u);
}

TEST(SlabPoolTest, EmptySlabsReturnPastTheIdleMark) {
  SlabPoolSet set(/*max_idle_bytes=*/2 << 20);
  // 1,000 distinct block sizes (as many session layouts), a few blocks each.
  std::vector<std::pair<SlabPool*, uint8_t*>> blocks;
  for (size_t size = 64; size < 64 + 1000 * 64; size += 64) {
    SlabPool* pool = set.Get(size);
    for (int i = 0; i < 3; ++i) blocks.push_back({pool, pool->Allocate()});
  }
  EXPECT_GE(set.reserved_bytes(), 900u << 20);  // one slab (~1 MiB of whole blocks) per size
  for (auto& [pool, p] : blocks) pool->Free(p);
  // Everything free: at most the idle mark plus one slab stays mapped.
  EXPECT_LE(set.reserved_bytes(), (2u << 20) + (1u << 20) + 4096);
}

TEST(SlabPoolTest, ASlabWithBlocksInUseIsKept) {
  SlabPoolSet set(/*max_idle_bytes=*/0);
  SlabPool* pool = set.Get(4096);
  uint8_t* a = pool->Allocate();
  uint8_t* b = pool->Allocate();
  pool->Free(a);
  EXPECT_GT(set.reserved_bytes(), 0u);  // b still lives in it
  std::memset(b, 7, 4096);
  pool->Free(b);
  EXPECT_EQ(set.reserved_bytes(), 0u);
  uint8_t* c = pool->Allocate();  // maps a new slab
  EXPECT_GT(set.reserved_bytes(), 0u);
  pool->Free(c);
}

}  // namespace
}  // namespace sparsekv
