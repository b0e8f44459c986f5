#include "core/policy_plan.h"

#include <algorithm>

namespace sparsekv {
namespace {

TensorPlan PlanTensor(const TensorPolicy& p, int layer) {
  TensorPlan t;
  t.sparsity = p.SparsityFor(layer);
  t.direction = p.direction;
  t.sparse = t.sparsity > 0.0f;
  t.output_aware = t.sparse && p.scoring == Scoring::kOutputAware;
  return t;
}

}  // namespace

PolicyPlan::PolicyPlan(const Layout& layout, const Policy& policy)
    : layout_(layout),
      dense_window_(policy.dense_window),
      chunk_tokens_(policy.chunk_tokens),
      group_tokens_(policy.group_tokens) {
  layers_.reserve(static_cast<size_t>(layout.num_layers));
  for (int l = 0; l < layout.num_layers; ++l) {
    LayerPlan lp{PlanTensor(policy.k, l), PlanTensor(policy.v, l)};
    needs_mass_ |= lp.k.needs_mass() || lp.v.needs_mass();
    k_output_aware_ |= lp.k.output_aware;
    v_output_aware_ |= lp.v.output_aware;
    layers_.push_back(lp);
  }
}

kernels::SectionFormat PolicyPlan::Format(const TensorPlan& t, int tokens) const {
  kernels::SectionKind kind = t.direction == PruneDirection::kPerChannel
                                  ? kernels::SectionKind::kPerChannel
                                  : kernels::SectionKind::kPerToken;
  if (kind == kernels::SectionKind::kPerChannel && tokens % group_tokens_ != 0) {
    kind = kernels::SectionKind::kDense;
  }
  const kernels::SectionFormat f =
      kernels::MakeSectionFormat(kind, kind == kernels::SectionKind::kDense ? 0.0 : t.sparsity,
                                 layout_.head_dim, tokens, group_tokens_, layout_.dtype);
  // At low sparsity the bitmap can outweigh the pruned values: then dense is smaller and
  // loses nothing.
  const kernels::SectionFormat dense = kernels::MakeSectionFormat(
      kernels::SectionKind::kDense, 0.0, layout_.head_dim, tokens, group_tokens_, layout_.dtype);
  return f.bytes() < dense.bytes() ? f : dense;
}

kernels::SectionFormat PolicyPlan::KFormat(int layer, int tokens) const {
  return Format(this->layer(layer).k, tokens);
}

kernels::SectionFormat PolicyPlan::VFormat(int layer, int tokens) const {
  return Format(this->layer(layer).v, tokens);
}

std::vector<int> PolicyPlan::FlushChunks(int layer, int64_t tail) const {
  std::vector<int> chunks;
  int64_t eligible = std::max<int64_t>(0, tail - dense_window_);
  const bool per_channel = this->layer(layer).per_channel();
  while (eligible > 0) {
    int n = static_cast<int>(std::min<int64_t>(eligible, chunk_tokens_));
    if (n < chunk_tokens_ && per_channel) n -= n % group_tokens_;
    if (n == 0) break;
    chunks.push_back(n);
    eligible -= n;
  }
  return chunks;
}

}  // namespace sparsekv
