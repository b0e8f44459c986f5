// LayerStore: blocks allocated and released as rows come and go, and the export/restore seam
// snapshots use: a restored layer reads and decodes bit-identically, and a damaged image is
// refused whole.
#include "core/layer_store.h"

#include <gtest/gtest.h>

#include <random>

#include "core/attend.h"
#include "core/compressor.h"
#include "core/policy_plan.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::OwnedTensor;
using testing::RandomTensor;

struct Built {
  Layout layout;
  Policy policy;
  LayerStore store;
};

// A layer with two compressed chunks (per-token K, per-channel V, output-aware) and a tail of
// 45 rows with attention mass and query statistics.
void Build(const Layout& layout, SlabPoolSet* pools, LayerStore* store, std::mt19937* rng) {
  Policy policy;
  policy.k.sparsity = 0.7f;
  policy.v.sparsity = 0.5f;
  policy.v.direction = PruneDirection::kPerChannel;
  policy.chunk_tokens = 64;
  const PolicyPlan plan(layout, policy);
  OwnedTensor k = RandomTensor({64 * 2 + 45, layout.num_kv_heads, layout.head_dim}, rng);
  OwnedTensor v = RandomTensor({64 * 2 + 45, layout.num_kv_heads, layout.head_dim}, rng);
  const size_t head = layout.head_dim * sizeof(float);
  store->Append(DType::kFloat32, static_cast<const uint8_t*>(k.view.data),
                static_cast<const uint8_t*>(v.view.data), 64 * 2 + 45, head * layout.num_kv_heads,
                head);
  OwnedTensor q = RandomTensor({layout.num_q_heads, layout.head_dim}, rng);
  std::vector<double> energy(static_cast<size_t>(layout.num_kv_heads) * layout.head_dim);
  LayerStore::AccumulateQueryEnergy(layout, q.values.data(), energy.data());
  store->AddQueryEnergy(energy.data());
  const LayerSnapshot snap = store->Snapshot();
  std::vector<float> mass(snap.tail_tokens);
  for (float& m : mass) m = std::uniform_real_distribution<float>(0, 1)(*rng);
  for (int h = 0; h < layout.num_kv_heads; ++h) store->AddMass(snap, h, mass.data());
  for (int i = 0; i < 2; ++i) {
    const CompressionInput in = store->TakeOldest(64);
    store->Publish(CompressRows(layout, plan, 0, in, pools));
  }
  // A remainder chunk (as Flush makes): the tail now starts 10 rows into a block.
  store->Publish(CompressRows(layout, plan, 0, store->TakeOldest(10), pools));
}

void ExpectSameImage(const LayerImage& a, const LayerImage& b) {
  ASSERT_EQ(a.chunks.size(), b.chunks.size());
  for (size_t i = 0; i < a.chunks.size(); ++i) {
    EXPECT_EQ(a.chunks[i].data, b.chunks[i].data);
    EXPECT_EQ(a.chunks[i].k_format.k, b.chunks[i].k_format.k);
    EXPECT_EQ(a.chunks[i].v_output_aware, b.chunks[i].v_output_aware);
  }
  EXPECT_EQ(a.tail_tokens, b.tail_tokens);
  EXPECT_EQ(a.tail_first_row, b.tail_first_row);
  EXPECT_EQ(a.tail_k, b.tail_k);
  EXPECT_EQ(a.tail_v, b.tail_v);
  EXPECT_EQ(a.tail_mass, b.tail_mass);
  EXPECT_EQ(a.q_energy, b.q_energy);
  EXPECT_EQ(a.queries_seen, b.queries_seen);
}

TEST(LayerStoreTest, BlocksAreCountedAsRowsArriveAndLeave) {
  const Layout layout{1, 2, 2, 16, DType::kFloat16};
  SlabPoolSet pools;  // outlives the chunks the store holds
  LayerStore store(layout);
  std::mt19937 rng(1);
  OwnedTensor k = RandomTensor({40, 2, 16}, &rng);
  EXPECT_EQ(store.BlocksNeeded(40), 2);
  const size_t head = 16 * sizeof(float);
  EXPECT_EQ(store.Append(DType::kFloat32, static_cast<const uint8_t*>(k.view.data),
                         static_cast<const uint8_t*>(k.view.data), 40, 2 * head, head),
            2);
  EXPECT_EQ(store.BlocksNeeded(24), 0);  // 24 rows left in the second block
  EXPECT_EQ(store.BlocksNeeded(25), 1);
  const PolicyPlan plan(layout, Policy());
  const CompressionInput in = store.TakeOldest(32);
  EXPECT_EQ(store.Publish(CompressRows(layout, plan, 0, in, &pools)), 1);  // block 1 emptied
  EXPECT_EQ(store.tail_tokens(), 8);
}

TEST(LayerStoreTest, RestoredLayerReadsAndDecodesBitIdentically) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    const Layout layout{1, 2, 8, 64, dtype};
    SlabPoolSet pools;
    std::mt19937 rng(2);
    LayerStore original(layout);
    Build(layout, &pools, &original, &rng);
    const LayerImage image = original.Export();
    ASSERT_EQ(image.chunks.size(), 3u);
    EXPECT_EQ(image.tail_first_row, 10);
    LayerStore restored(layout);
    absl::StatusOr<int64_t> blocks = restored.Restore(image, &pools);
    ASSERT_TRUE(blocks.ok()) << blocks.status();
    EXPECT_EQ(*blocks, 2);  // 35 tail rows from row 10 of a block: rows 10..44
    EXPECT_EQ(restored.tokens(), original.tokens());
    EXPECT_EQ(restored.compressed_bytes(), original.compressed_bytes());
    EXPECT_EQ(restored.k_kept(), original.k_kept());
    EXPECT_EQ(restored.output_aware_chunks_v(), original.output_aware_chunks_v());
    EXPECT_EQ(restored.chunk_memory_bytes(), original.chunk_memory_bytes());
    ExpectSameImage(restored.Export(), image);
    std::string k1, v1, k2, v2;
    original.Read(0, original.tokens(), &k1, &v1);
    restored.Read(0, restored.tokens(), &k2, &v2);
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
    OwnedTensor q = RandomTensor({8, 64}, &rng);
    std::vector<float> o1(8 * 64), o2(8 * 64), l1(8), l2(8);
    const auto backend = kernels::MakeCpuComputeBackend({});
    ASSERT_TRUE(AttendLayer(layout, original.Snapshot(), q.values.data(), *backend,
                            AttendOptions{0.125f}, o1.data(), l1.data())
                    .ok());
    ASSERT_TRUE(AttendLayer(layout, restored.Snapshot(), q.values.data(), *backend,
                            AttendOptions{0.125f}, o2.data(), l2.data())
                    .ok());
    EXPECT_EQ(o1, o2);
    EXPECT_EQ(l1, l2);
  }
}

TEST(LayerStoreTest, DamagedImagesAreRefusedWhole) {
  const Layout layout{1, 2, 4, 32, DType::kFloat16};
  SlabPoolSet pools;
  std::mt19937 rng(3);
  LayerStore original(layout);
  Build(layout, &pools, &original, &rng);
  const LayerImage good = original.Export();
  auto expect_refused = [&](LayerImage bad, const char* what) {
    LayerStore store(layout);
    absl::StatusOr<int64_t> st = store.Restore(bad, &pools);
    EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(store.tokens(), 0) << what;
    EXPECT_EQ(store.chunks(), 0) << what;
  };
  LayerImage bad = good;
  bad.chunks[1].data[0] ^= 0x01;  // a K bitmap keeps one element more or less
  expect_refused(bad, "flipped bitmap bit");
  bad = good;
  bad.chunks[0].data.pop_back();
  expect_refused(bad, "short chunk");
  bad = good;
  bad.chunks[0].k_format.head_dim = 64;
  expect_refused(bad, "head_dim");
  bad = good;
  bad.chunks[0].k_format.k = 33;
  expect_refused(bad, "k > n");
  bad = good;
  bad.chunks[0].v_format.tokens = 48;  // per-channel, not a whole number of groups
  expect_refused(bad, "per-channel tokens");
  bad = good;
  bad.tail_v.resize(bad.tail_v.size() - 2);
  expect_refused(bad, "tail size");
  bad = good;
  bad.tail_mass.pop_back();
  expect_refused(bad, "mass size");
  bad = good;
  bad.q_energy.clear();
  expect_refused(bad, "statistics size");
}

}  // namespace
}  // namespace sparsekv
