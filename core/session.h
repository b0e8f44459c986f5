// One inference session's KV cache: layout, policy, per-layer storage and statistics.
//
// Thread-safe: every method may be called concurrently; a per-session mutex serialises
// mutations and decode steps of one session, while different sessions never contend.
#ifndef SPARSEKV_CORE_SESSION_H_
#define SPARSEKV_CORE_SESSION_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/dense_layer.h"
#include "core/memory_budget.h"
#include "core/mutex.h"
#include "core/types.h"
#include "kernels/backend.h"

namespace sparsekv {

// One session's part of a decode step (see DecodeItem in the proto).
struct DecodeInput {
  std::string session_id;
  int layer = 0;
  TensorView q;      // [num_q_heads, head_dim]
  TensorView new_k;  // empty, or [num_kv_heads, head_dim]
  TensorView new_v;  // empty, or [num_kv_heads, head_dim]
  bool want_lse = false;
  float scale = 0.0f;  // 0 = 1/sqrt(head_dim)
};

struct DecodeOutput {
  std::vector<float> out;  // [num_q_heads, head_dim]
  std::vector<float> lse;  // [num_q_heads] when requested, else empty
  int64_t tokens_attended = 0;
};

class Session {
 public:
  // `info` carries id, tenant, layout, policy, ttl, labels and times; stats are ignored.
  // REQUIRES: layout and policy validated.
  Session(SessionInfo info, std::shared_ptr<MemoryBudget> budget);
  ~Session();  // returns the session's bytes to the budget

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::string& id() const { return info_.id; }
  const std::string& tenant() const { return info_.tenant; }
  const Layout& layout() const { return info_.layout; }

  // Appends tokens to layers [layer_begin, layer_begin + k.shape[0]).
  // k, v: [layers, tokens, num_kv_heads, head_dim]. InvalidArgument on a shape that does not
  // fit the layout or a layer range outside it; ResourceExhausted over budget (nothing
  // appended then). Returns the number of rows appended (layers * tokens).
  absl::StatusOr<int64_t> Append(int layer_begin, const TensorView& k, const TensorView& v);

  // Checks `in` against the layout without touching the cache: InvalidArgument naming the
  // bad field.
  absl::Status CheckDecode(const DecodeInput& in) const;

  // Appends in.new_k / in.new_v when present, then attends over the layer's whole cache.
  // Errors as CheckDecode, plus ResourceExhausted when the new token is over budget.
  absl::Status Decode(const DecodeInput& in, const kernels::Backend& backend, DecodeOutput* out);

  // Reads rows [token_begin, token_begin + count) of `layer` as [count, num_kv_heads,
  // head_dim] in the storage dtype, appended to k_out / v_out. count = -1 reads to the end.
  // InvalidArgument when the range is outside the layer. Returns the rows read.
  absl::StatusOr<int64_t> Read(int layer, int64_t token_begin, int64_t count, std::string* k_out,
                               std::string* v_out) const;

  // Metadata and live stats.
  SessionInfo Info() const;
  // Tokens cached in `layer` (REQUIRES: valid layer).
  int64_t tokens(int layer) const;
  int64_t bytes() const;
  absl::Time last_access() const;
  bool expired(absl::Time now) const;

 private:
  absl::Status CheckKvShape(const TensorView& t, const char* name,
                            const std::vector<int64_t>& want) const;
  void Touch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::shared_ptr<MemoryBudget> budget_;
  mutable Mutex mu_;
  SessionInfo info_;  // stats unused; mutable fields below
  std::vector<DenseLayer> layers_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t decode_steps_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_access_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SESSION_H_
