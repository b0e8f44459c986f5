// The session policy interpreted once, at CreateSession: for every layer, what its K and V
// become when a chunk is compressed (format, direction, keep count, output-aware or not) and
// what the session must collect for that (query energy, tail attention mass). The pruner,
// Flush, decode steps and stats read this plan; nothing else interprets a Policy.
//
// Immutable after construction; thread-safe.
#ifndef SPARSEKV_CORE_POLICY_PLAN_H_
#define SPARSEKV_CORE_POLICY_PLAN_H_

#include <cstdint>
#include <vector>

#include "core/types.h"
#include "kernels/compressed_format.h"

namespace sparsekv {

// One tensor (K or V) of one layer.
struct TensorPlan {
  float sparsity = 0.0f;  // this layer's (TensorPolicy::SparsityFor)
  PruneDirection direction = PruneDirection::kPerToken;
  bool sparse = false;        // sparsity > 0
  bool output_aware = false;  // sparse and scored output-aware
  // Output-aware per-channel ranks tokens by the attention mass they received while dense.
  bool needs_mass() const { return output_aware && direction == PruneDirection::kPerChannel; }
  bool per_channel() const { return sparse && direction == PruneDirection::kPerChannel; }
};

struct LayerPlan {
  TensorPlan k;
  TensorPlan v;
  // A per-channel tensor compresses whole groups only (a Flush remainder stays dense).
  bool per_channel() const { return k.per_channel() || v.per_channel(); }
};

class PolicyPlan {
 public:
  // REQUIRES: layout and policy validated (ValidateLayout, ValidatePolicy).
  PolicyPlan(const Layout& layout, const Policy& policy);

  const LayerPlan& layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  int dense_window() const { return dense_window_; }
  int chunk_tokens() const { return chunk_tokens_; }
  int group_tokens() const { return group_tokens_; }

  // Section formats of a chunk of `tokens` tokens of `layer`: a per-channel section of a
  // length that is not a whole number of groups is dense, and so is any section whose bitmap
  // would make it larger than dense.
  kernels::SectionFormat KFormat(int layer, int tokens) const;
  kernels::SectionFormat VFormat(int layer, int tokens) const;

  // Whether any layer needs the dense tail's attention mass (then every decode step adds it).
  bool needs_mass() const { return needs_mass_; }
  // Whether any layer of K (V) is sparse and output-aware: the scoring stats report as in
  // force once a query was seen.
  bool k_output_aware() const { return k_output_aware_; }
  bool v_output_aware() const { return v_output_aware_; }

  // Background compression: a layer with `tail` dense rows has a whole chunk to compress.
  bool Eligible(int64_t tail) const { return tail >= dense_window_ + chunk_tokens_; }
  // Flush: the sizes of the chunks that compress all but the newest dense_window rows of a
  // layer with `tail` dense rows (whole chunks, then one remainder; per-channel layers keep a
  // remainder shorter than a group dense).
  std::vector<int> FlushChunks(int layer, int64_t tail) const;

 private:
  kernels::SectionFormat Format(const TensorPlan& t, int tokens) const;

  Layout layout_;
  int dense_window_;
  int chunk_tokens_;
  int group_tokens_;
  std::vector<LayerPlan> layers_;
  bool needs_mass_ = false;
  bool k_output_aware_ = false;
  bool v_output_aware_ = false;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_POLICY_PLAN_H_
