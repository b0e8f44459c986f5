// A session's dense shadow for the quality metric (core/quality.h): every layer's K/V as
// appended, never compressed, so that a decode step can attend over the exact cache beside
// the sparse one. One LayerStore per layer that is never pruned. Its bytes are charged to the
// host and tenant budgets and to the process-wide shadow cap; when either refuses, the
// caller drops the shadow (a shadow never makes a request fail). The destructor returns
// every byte.
//
// Not thread-safe: the owning Session's mutex guards it. Snapshots are read without it, as a
// LayerStore's are.
#ifndef SPARSEKV_CORE_QUALITY_SHADOW_H_
#define SPARSEKV_CORE_QUALITY_SHADOW_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/layer_store.h"
#include "core/memory_budget.h"
#include "core/quality.h"
#include "core/types.h"

namespace sparsekv {

class QualityShadow {
 public:
  // A shadow of `layout` with its fixed bytes charged; null (counted as dropped) when the
  // cap or a budget refuses them.
  static std::unique_ptr<QualityShadow> Start(const Layout& layout, std::string tenant,
                                              std::shared_ptr<QualityMonitor> monitor,
                                              std::shared_ptr<MemoryBudget> budget);
  ~QualityShadow();
  QualityShadow(const QualityShadow&) = delete;
  QualityShadow& operator=(const QualityShadow&) = delete;

  // As LayerStore::Append / AppendStaged on `layer`, after charging the blocks the rows
  // need. False (nothing appended) when the cap or a budget refuses: drop the shadow then.
  bool Append(int layer, kernels::DType src, const uint8_t* k, const uint8_t* v, int64_t tokens,
              size_t token_stride, size_t head_stride);
  bool AppendStaged(int layer, const std::vector<BlockRows>& staged);

  LayerSnapshot Snapshot(int layer) const { return layers_[layer].Snapshot(); }
  int64_t bytes() const { return bytes_; }

 private:
  QualityShadow(const Layout& layout, std::string tenant, std::shared_ptr<QualityMonitor> monitor,
                std::shared_ptr<MemoryBudget> budget);
  // Accounts `bytes` to the cap and the budgets, all or nothing.
  bool Charge(int64_t bytes);

  const std::string tenant_;
  const std::shared_ptr<QualityMonitor> monitor_;
  const std::shared_ptr<MemoryBudget> budget_;
  const int64_t block_bytes_;
  std::vector<LayerStore> layers_;
  int64_t bytes_ = 0;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_QUALITY_SHADOW_H_
