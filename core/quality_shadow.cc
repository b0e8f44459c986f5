#include "core/quality_shadow.h"

#include <utility>

namespace sparsekv {

QualityShadow::QualityShadow(const Layout& layout, std::string tenant,
                             std::shared_ptr<QualityMonitor> monitor,
                             std::shared_ptr<MemoryBudget> budget)
    : tenant_(std::move(tenant)),
      monitor_(std::move(monitor)),
      budget_(std::move(budget)),
      block_bytes_(LayerStore::BlockBytes(layout)) {
  layers_.reserve(layout.num_layers);
  for (int l = 0; l < layout.num_layers; ++l) layers_.emplace_back(layout);
  monitor_->ShadowStarted();  // the destructor ends it, whatever becomes of the shadow
}

std::unique_ptr<QualityShadow> QualityShadow::Start(const Layout& layout, std::string tenant,
                                                    std::shared_ptr<QualityMonitor> monitor,
                                                    std::shared_ptr<MemoryBudget> budget) {
  std::unique_ptr<QualityShadow> s(
      new QualityShadow(layout, std::move(tenant), std::move(monitor), std::move(budget)));
  if (!s->Charge(static_cast<int64_t>(sizeof(QualityShadow)) +
                 layout.num_layers * LayerStore::FixedBytes(layout))) {
    s->monitor_->CountDropped();
    return nullptr;
  }
  return s;
}

QualityShadow::~QualityShadow() {
  if (bytes_ > 0) {
    monitor_->SubBytes(bytes_);
    budget_->Release(tenant_, bytes_);
  }
  monitor_->ShadowEnded();
}

bool QualityShadow::Charge(int64_t bytes) {
  if (bytes == 0) return true;
  if (!monitor_->TryAddBytes(bytes)) return false;
  if (!budget_->Reserve(tenant_, bytes).ok()) {
    monitor_->SubBytes(bytes);
    return false;
  }
  bytes_ += bytes;
  return true;
}

bool QualityShadow::Append(int layer, kernels::DType src, const uint8_t* k, const uint8_t* v,
                           int64_t tokens, size_t token_stride, size_t head_stride) {
  LayerStore& s = layers_[layer];
  if (!Charge(s.BlocksNeeded(tokens) * block_bytes_)) return false;
  s.Append(src, k, v, tokens, token_stride, head_stride);
  return true;
}

bool QualityShadow::AppendStaged(int layer, const std::vector<BlockRows>& staged) {
  LayerStore& s = layers_[layer];
  int64_t tokens = 0;
  for (const BlockRows& r : staged) tokens += r.end - r.begin;
  if (!Charge(s.BlocksNeeded(tokens) * block_bytes_)) return false;
  s.AppendStaged(staged);
  return true;
}

}  // namespace sparsekv
