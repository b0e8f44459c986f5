// PolicyPlan: per-layer sparsity, formats and their dense fallbacks, what must be collected
// (mass, query energy), eligibility and Flush chunking, computed once from a Policy.
#include "core/policy_plan.h"

#include <gtest/gtest.h>

namespace sparsekv {
namespace {

Policy Make(float k, float v, PruneDirection kd, PruneDirection vd, Scoring s) {
  Policy p;
  p.k.sparsity = k;
  p.v.sparsity = v;
  p.k.direction = kd;
  p.v.direction = vd;
  p.k.scoring = p.v.scoring = s;
  return p;
}

TEST(PolicyPlanTest, DefaultPolicyIsDenseAndCollectsNothing) {
  const Layout layout{3, 2, 4, 64, DType::kFloat16};
  const PolicyPlan plan(layout, Policy());
  for (int l = 0; l < 3; ++l) {
    EXPECT_FALSE(plan.layer(l).k.sparse);
    EXPECT_FALSE(plan.layer(l).per_channel());
    EXPECT_EQ(plan.KFormat(l, 256).kind, kernels::SectionKind::kDense);
  }
  EXPECT_FALSE(plan.needs_mass());
  EXPECT_FALSE(plan.k_output_aware());
}

TEST(PolicyPlanTest, PerLayerSparsityAndFormats) {
  const Layout layout{2, 2, 4, 128, DType::kFloat16};
  Policy p =
      Make(0.7f, 0.5f, PruneDirection::kPerToken, PruneDirection::kPerToken, Scoring::kMagnitude);
  p.k.layer_sparsity = {0.7f, 0.0f};
  const PolicyPlan plan(layout, p);
  const kernels::SectionFormat k0 = plan.KFormat(0, 256);
  EXPECT_EQ(k0.kind, kernels::SectionKind::kPerToken);
  EXPECT_EQ(k0.k, 38);  // floor(0.3 * 128 + 0.5)
  EXPECT_EQ(k0.bytes(), 256u * (16 + 38 * 2));
  EXPECT_EQ(plan.KFormat(1, 256).kind, kernels::SectionKind::kDense);
  EXPECT_EQ(plan.VFormat(1, 256).k, 64);
  EXPECT_FALSE(plan.layer(1).k.sparse);
  EXPECT_TRUE(plan.layer(1).v.sparse);
}

TEST(PolicyPlanTest, LowSparsityAndShortPerChannelChunksAreDense) {
  const Layout layout{1, 1, 1, 128, DType::kFloat16};
  // 5% sparsity: bitmap 16 B + 122 x 2 B > 256 B dense.
  const PolicyPlan low(layout, Make(0.05f, 0.05f, PruneDirection::kPerToken,
                                    PruneDirection::kPerToken, Scoring::kMagnitude));
  EXPECT_EQ(low.KFormat(0, 64).kind, kernels::SectionKind::kDense);
  const PolicyPlan pc(layout, Make(0.7f, 0.7f, PruneDirection::kPerChannel,
                                   PruneDirection::kPerChannel, Scoring::kMagnitude));
  EXPECT_EQ(pc.KFormat(0, 64).kind, kernels::SectionKind::kPerChannel);
  EXPECT_EQ(pc.KFormat(0, 40).kind, kernels::SectionKind::kDense);  // not whole groups
}

TEST(PolicyPlanTest, MassIsNeededOnlyForOutputAwarePerChannel) {
  const Layout layout{2, 1, 1, 32, DType::kFloat16};
  EXPECT_FALSE(PolicyPlan(layout, Make(0.5f, 0.5f, PruneDirection::kPerToken,
                                       PruneDirection::kPerToken, Scoring::kOutputAware))
                   .needs_mass());
  EXPECT_TRUE(PolicyPlan(layout, Make(0.0f, 0.5f, PruneDirection::kPerToken,
                                      PruneDirection::kPerChannel, Scoring::kOutputAware))
                  .needs_mass());
  EXPECT_FALSE(PolicyPlan(layout, Make(0.5f, 0.5f, PruneDirection::kPerChannel,
                                       PruneDirection::kPerChannel, Scoring::kMagnitude))
                   .needs_mass());
  // Output-aware but dense everywhere: nothing to rank, nothing to collect.
  EXPECT_FALSE(PolicyPlan(layout, Make(0.0f, 0.0f, PruneDirection::kPerChannel,
                                       PruneDirection::kPerChannel, Scoring::kOutputAware))
                   .needs_mass());
}

TEST(PolicyPlanTest, EligibilityAndFlushChunks) {
  const Layout layout{1, 1, 1, 32, DType::kFloat16};
  Policy p =
      Make(0.5f, 0.0f, PruneDirection::kPerChannel, PruneDirection::kPerToken, Scoring::kMagnitude);
  p.dense_window = 32;
  p.chunk_tokens = 128;
  const PolicyPlan plan(layout, p);
  EXPECT_FALSE(plan.Eligible(159));
  EXPECT_TRUE(plan.Eligible(160));
  // 32 + 128 + 128 + 70: two whole chunks, then 64 (whole groups of 32); 6 stay dense.
  EXPECT_EQ(plan.FlushChunks(0, 32 + 128 + 128 + 70), (std::vector<int>{128, 128, 64}));
  EXPECT_TRUE(plan.FlushChunks(0, 32 + 31).empty());
  p.k.direction = PruneDirection::kPerToken;
  EXPECT_EQ(PolicyPlan(layout, p).FlushChunks(0, 32 + 128 + 70), (std::vector<int>{128, 70}));
}

}  // namespace
}  // namespace sparsekv
