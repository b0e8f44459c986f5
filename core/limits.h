// Limits on what one request or one session may ask for. Each is a server flag (README
// "Server flags"); the defaults keep a single client from taking the host down, and every
// limit that is memory is also counted in the byte budget.
//
// Plain struct; no synchronisation needed.
#ifndef SPARSEKV_CORE_LIMITS_H_
#define SPARSEKV_CORE_LIMITS_H_

#include <cstdint>

namespace sparsekv {

// Hard ceilings the flags may lower but not raise (kernels size stack buffers by head_dim).
inline constexpr int kMaxHeadDim = 512;
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxHeads = 1024;

struct SessionLimits {
  int max_layers = kMaxLayers;
  int max_kv_heads = kMaxHeads;
  int max_q_heads = kMaxHeads;
  int max_head_dim = kMaxHeadDim;
  int max_id_bytes = 128;  // session ids; also the tenant name
  int max_labels = 32;     // labels per session
  int max_label_key_bytes = 64;
  int max_label_value_bytes = 256;
  // Bytes one session may hold against the budget (payload, dense-block slack, scoring
  // statistics, metadata); 0 = only the host and tenant budgets apply.
  int64_t max_session_bytes = 0;
  // Observation-window queries per AppendKV message and layer: each attends over the whole
  // layer, so they bound the compute one message can ask for.
  int max_obs_tokens = 256;
  // Reject NaN/Inf in K, V, queries and obs_q, and K/V values that overflow the storage dtype
  // (INVALID_ARGUMENT naming the tensor and the index). Off: such values are stored as they
  // round, and decode steps over them are non-finite.
  bool reject_nonfinite = true;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_LIMITS_H_
