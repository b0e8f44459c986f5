#include "core/types.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace sparsekv {

namespace {

absl::Status CheckRange(const char* field, int value, int limit, int ceiling) {
  const int max = std::min(limit, ceiling);
  if (value < 1 || value > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("layout.", field, " must be in [1, ", max, "], got ", value));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLayout(const Layout& l, const SessionLimits& limits) {
  SPARSEKV_RETURN_IF_ERROR(CheckRange("num_layers", l.num_layers, limits.max_layers, kMaxLayers));
  SPARSEKV_RETURN_IF_ERROR(
      CheckRange("num_kv_heads", l.num_kv_heads, limits.max_kv_heads, kMaxHeads));
  SPARSEKV_RETURN_IF_ERROR(CheckRange("num_q_heads", l.num_q_heads, limits.max_q_heads, kMaxHeads));
  if (l.num_q_heads % l.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("layout.num_q_heads (", l.num_q_heads,
                                                   ") must be a multiple of layout.num_kv_heads (",
                                                   l.num_kv_heads, ")"));
  }
  return CheckRange("head_dim", l.head_dim, limits.max_head_dim, kMaxHeadDim);
}

namespace {

absl::Status ValidateTensorPolicy(const TensorPolicy& p, const char* which, int layers) {
  if (!(p.sparsity >= 0.0f && p.sparsity < 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.", which, ".sparsity must be in [0, 1), got ", p.sparsity));
  }
  if (!p.layer_sparsity.empty() && static_cast<int>(p.layer_sparsity.size()) != layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.", which, ".layer_sparsity must have one entry per layer (", layers,
                     "), got ", p.layer_sparsity.size()));
  }
  for (size_t i = 0; i < p.layer_sparsity.size(); ++i) {
    const float s = p.layer_sparsity[i];
    if (!(s >= 0.0f && s < 1.0f)) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy.", which, ".layer_sparsity[", i, "] must be in [0, 1), got ", s));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidatePolicy(const Policy& p, const Layout& layout) {
  if (p.dense_window < 0 || p.dense_window > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.dense_window must be in [0, 65536], got ", p.dense_window));
  }
  if (p.group_tokens != 32 && p.group_tokens != 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.group_tokens must be 32 or 64, got ", p.group_tokens));
  }
  if (p.chunk_tokens < p.group_tokens || p.chunk_tokens % p.group_tokens != 0 ||
      p.chunk_tokens > 8192) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.chunk_tokens must be a multiple of group_tokens (", p.group_tokens,
                     ") in [", p.group_tokens, ", 8192], got ", p.chunk_tokens));
  }
  if (p.decode_compute != DecodeCompute::kFloat32 && p.decode_compute != DecodeCompute::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy.decode_compute must be kFloat32 or kFloat16, got ",
                     static_cast<int>(p.decode_compute)));
  }
  SPARSEKV_RETURN_IF_ERROR(ValidateTensorPolicy(p.k, "k", layout.num_layers));
  SPARSEKV_RETURN_IF_ERROR(ValidateTensorPolicy(p.v, "v", layout.num_layers));
  return absl::OkStatus();
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace sparsekv
