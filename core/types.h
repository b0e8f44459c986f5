// Value types shared by the session layer: cache layout, pruning policy, tensor views, stats.
//
// Plain structs; no synchronisation needed.
#ifndef SPARSEKV_CORE_TYPES_H_
#define SPARSEKV_CORE_TYPES_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/limits.h"
#include "kernels/attention.h"
#include "kernels/dtype.h"

namespace sparsekv {

using kernels::DecodeCompute;

// Shape of a session's cache, fixed at creation.
struct Layout {
  int num_layers = 0;
  int num_kv_heads = 0;
  int num_q_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kFloat16;  // storage dtype

  int group_size() const { return num_q_heads / num_kv_heads; }
  // Bytes of one token of one layer, K and V together.
  int64_t token_bytes() const {
    return 2 * static_cast<int64_t>(num_kv_heads) * head_dim * kernels::DTypeSize(dtype);
  }
};

enum class PruneDirection { kPerToken, kPerChannel };
enum class Scoring { kMagnitude, kOutputAware };

struct TensorPolicy {
  float sparsity = 0.0f;
  PruneDirection direction = PruneDirection::kPerToken;
  Scoring scoring = Scoring::kOutputAware;  // measured best on real models (README)
  // [num_layers] per-layer sparsity overriding `sparsity`; empty = `sparsity` everywhere.
  // Lets a policy spend its byte budget unevenly (a sensitive layer pruned less).
  std::vector<float> layer_sparsity;

  float SparsityFor(int layer) const {
    return layer_sparsity.empty() ? sparsity : layer_sparsity[layer];
  }
  bool AnySparse() const {
    if (layer_sparsity.empty()) return sparsity > 0.0f;
    for (float s : layer_sparsity) {
      if (s > 0.0f) return true;
    }
    return false;
  }
};

struct Policy {
  TensorPolicy k;
  TensorPolicy v;
  int dense_window = 32;
  int chunk_tokens = 256;
  int group_tokens = 32;
  // Arithmetic of decode steps (kernels/attention.h): kFloat16 trades ~1e-3 relative output
  // error for less compute where the backend and an fp16 cache allow it, else runs fp32.
  DecodeCompute decode_compute = DecodeCompute::kFloat32;
};

// InvalidArgument naming the first bad field, or OK.
absl::Status ValidateLayout(const Layout& layout, const SessionLimits& limits = {});
// InvalidArgument for out-of-range values (decode_compute included), or per-layer sparsities
// not one per layer.
absl::Status ValidatePolicy(const Policy& policy, const Layout& layout);

// A borrowed, read-only tensor: `data` holds product(shape) elements of `dtype`, row-major,
// little-endian. The service checks that the byte length matches before building one.
struct TensorView {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  int64_t num_elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  bool empty() const { return data == nullptr && shape.empty(); }
};

// "[2, 3, 4]" for messages.
std::string ShapeString(const std::vector<int64_t>& shape);

// Live figures of one session; see SessionStats in the proto for field meanings.
struct SessionStats {
  std::vector<int64_t> tokens_per_layer;
  int64_t tokens_total = 0;
  int64_t bytes_dense = 0;
  int64_t bytes_compressed = 0;
  int64_t bytes_dense_equivalent = 0;
  // Everything the session holds against the byte budget: payload, dense-block slack, pool
  // rounding, scoring statistics, metadata and its quality shadow.
  int64_t bytes_accounted = 0;
  // Of bytes_accounted: the dense shadow of the quality metric (core/quality_shadow.h).
  int64_t bytes_shadow = 0;
  float achieved_sparsity_k = 0.0f;
  float achieved_sparsity_v = 0.0f;
  // What the achieved sparsities are computed from: elements of K (= of V) in compressed
  // chunks, and how many of them each keeps.
  int64_t compressed_elements = 0;
  int64_t kept_k = 0;
  int64_t kept_v = 0;
  Scoring scoring_in_force_k = Scoring::kMagnitude;
  Scoring scoring_in_force_v = Scoring::kMagnitude;
  int64_t pruning_backlog_tokens = 0;
  int64_t decode_steps = 0;
  int64_t chunks = 0;
  int64_t chunks_output_aware_k = 0;
  int64_t chunks_output_aware_v = 0;
  DecodeCompute decode_compute_in_force = DecodeCompute::kFloat32;
};

// What Session::Flush did, in tokens summed over layers.
struct FlushResult {
  int64_t compressed = 0;
  int64_t left_dense = 0;  // eligible, but their chunk did not fit a budget
};

// Everything a client can learn about a session.
struct SessionInfo {
  std::string id;
  std::string tenant;
  Layout layout;
  Policy policy;
  absl::Duration ttl;
  std::map<std::string, std::string> labels;
  absl::Time create_time;
  absl::Time last_access_time;
  SessionStats stats;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_TYPES_H_
