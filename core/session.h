// One inference session's KV cache: layout, policy, per-layer storage (compressed chunks and
// a dense tail), scoring statistics, background compression and stats.
//
// Thread-safe: every method may be called concurrently. A per-session mutex guards the layer
// bookkeeping for short sections only; attention and compression run outside it on immutable
// snapshots, so decode steps never wait for pruning and never see a half-built chunk.
#ifndef SPARSEKV_CORE_SESSION_H_
#define SPARSEKV_CORE_SESSION_H_

#include <condition_variable>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/attend.h"
#include "core/executor.h"
#include "core/histogram.h"
#include "core/layer_store.h"
#include "core/memory_budget.h"
#include "core/mutex.h"
#include "core/policy_plan.h"
#include "core/quality.h"
#include "core/quality_shadow.h"
#include "core/slab_pool.h"
#include "core/snapshot.h"
#include "core/types.h"
#include "kernels/compute_backend.h"

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

// Bucket bounds of SessionEnv::Counters::chunk_seconds: 10 us to 1 s (a 256-token chunk of
// 8 KV heads x D 128 takes ~1-3 ms on one core).
std::vector<double> ChunkSecondsBounds();

// Shared machinery sessions use; owned by the SessionStore, outliving every session.
struct SessionEnv {
  SessionLimits limits;
  std::shared_ptr<MemoryBudget> budget;
  std::shared_ptr<BoundedExecutor> pruner;  // background compression jobs
  std::shared_ptr<SlabPoolSet> pools;       // chunk memory
  // Every decode and observation step runs here; outlives the store.
  std::shared_ptr<const kernels::ComputeBackend> backend;
  // Picks the sessions that keep a dense shadow and records their decode error; null = none.
  std::shared_ptr<QualityMonitor> quality;
  // Process-wide pruning counters (read by metrics).
  struct Counters {
    std::atomic<int64_t> chunks{0};
    std::atomic<int64_t> tokens{0};
    std::atomic<int64_t> nanos{0};
    std::atomic<int64_t> rejected{0};  // jobs the full queue refused (retried later)
    std::atomic<int64_t> failed{0};    // chunks the backend failed to compress (rows stay dense)
    // Seconds per published chunk (every layer's chunk of a job is one observation).
    Histogram chunk_seconds{ChunkSecondsBounds()};
  };
  std::shared_ptr<Counters> counters = std::make_shared<Counters>();
};

// Asked between the expensive parts of a request (each observation query's attention): a
// non-OK status abandons the request before anything is applied (deadline passed, client
// gone, server shutting down). May be empty.
using CancelCheck = std::function<absl::Status()>;

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `info` carries id, tenant, layout, policy, ttl, labels and times; stats are ignored.
  // REQUIRES: layout and policy validated; owned by a shared_ptr (background jobs hold it);
  // FixedBytes(info) already reserved in env.budget for info.tenant (the session owns them).
  Session(SessionInfo info, SessionEnv env);

  // Memory a session holds from creation whatever its tokens: per-layer storage objects and
  // scoring statistics, id, tenant and labels.
  static int64_t FixedBytes(const SessionInfo& info);
  ~Session();  // returns the session's bytes to the budget

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::string& id() const { return info_.id; }
  const std::string& tenant() const { return info_.tenant; }
  const Layout& layout() const { return info_.layout; }
  const Policy& policy() const { return info_.policy; }
  const PolicyPlan& plan() const { return plan_; }

  // Appends tokens to layers [layer_begin, layer_begin + k.shape[0]).
  // k, v: [layers, tokens, num_kv_heads, head_dim]. obs_q, when not empty: [layers,
  // obs_tokens, num_q_heads, head_dim] observation-window queries that seed output-aware
  // scoring (each attends over the whole layer after the append).
  // All or nothing: InvalidArgument (CheckAppend), ResourceExhausted over a budget, or the
  // status `cancel` returned, and nothing is appended; OK and every row is. Returns the rows
  // appended (layers * tokens).
  absl::StatusOr<int64_t> Append(int layer_begin, const TensorView& k, const TensorView& v,
                                 const TensorView& obs_q, const CancelCheck& cancel = {});
  // The checks Append makes before touching anything: shapes against the layout, equal K/V
  // dtypes, the layer range, obs_q size, finite values (SessionLimits::reject_nonfinite).
  // InvalidArgument naming the tensor (and the index of a bad value).
  absl::Status CheckAppend(int layer_begin, const TensorView& k, const TensorView& v,
                           const TensorView& obs_q) const;

  // Checks `in` against the layout without touching the cache: InvalidArgument naming the
  // bad field (shapes, new_k/new_v dtypes equal, finite values, scale).
  absl::Status CheckDecode(const DecodeInput& in) const;

  // Bytes a decode step of `in` may add to the session (a new dense block for its token);
  // what the caller reserves with Reserve before calling DecodeReserved.
  int64_t DecodeBytes(const DecodeInput& in) const;
  // Reserves `bytes` against the host, tenant and per-session budgets for a coming change,
  // dropping the session's quality shadow first if that makes them fit. ResourceExhausted
  // (nothing reserved) when any would be exceeded.
  absl::Status Reserve(int64_t bytes);
  // Returns a reservation that will not be used.
  void Unreserve(int64_t bytes);
  // After a change that reserved `reserved` and committed `used` (CommitLocked): returns the
  // rest, or accounts the excess without a limit check (the memory exists already).
  void Settle(int64_t reserved, int64_t used);

  // Appends in.new_k / in.new_v when present, then attends over the layer's whole cache.
  // Errors as CheckDecode, plus ResourceExhausted when the new token is over a budget
  // (nothing appended then).
  absl::Status Decode(const DecodeInput& in, DecodeOutput* out);
  // Decode after the checks: REQUIRES CheckDecode(in) passed and `reserved` =
  // DecodeBytes(in) reserved (Settle squares the reservation with the use). Fails only when
  // the backend does (the new token stays appended then).
  absl::Status DecodeReserved(const DecodeInput& in, int64_t reserved, DecodeOutput* out);

  // A decode step in two halves around the backend call, so that a batcher can run the steps
  // of many sessions in one call: PrepareDecode appends the token and plans attention over a
  // snapshot (`plan.item`, pointing into the struct's own buffers and the snapshot); once the
  // backend has run plan.item, FinishDecode applies the scoring statistics and moves the
  // result out. Movable; the item's pointers stay valid when it moves.
  // A session with a quality shadow (core/quality.h) plans a second item: dense attention of
  // the same query over the shadow, run in the same backend call; FinishDecode records the
  // sparse output's relative error against it.
  struct PreparedDecode {
    struct Shadow {
      LayerSnapshot snap;
      std::vector<float> out, lse;
      PlannedStep plan;
    };
    int layer = 0;
    bool want_lse = false;
    LayerSnapshot snap;
    std::vector<float> q, out, lse, mass;
    PlannedStep plan;
    std::unique_ptr<Shadow> shadow;  // null without a shadow
    // What the backend must run for this step: plan.item, then the shadow's item if any.
    std::vector<kernels::DecodeBatchItem> items() const;
  };
  // REQUIRES as DecodeReserved.
  PreparedDecode PrepareDecode(const DecodeInput& in, int64_t reserved);
  void FinishDecode(PreparedDecode* step, DecodeOutput* out);

  // Compresses every eligible token now (all but the newest dense_window of each layer;
  // per-channel: whole groups only) and returns once published, with the tokens compressed
  // and those left dense because their chunk did not fit a budget (summed over layers).
  FlushResult Flush();

  // Reads rows [token_begin, token_begin + count) of `layer` as [count, num_kv_heads,
  // head_dim] in the storage dtype, appended to k_out / v_out; compressed rows are
  // reconstructed with pruned elements 0. count = -1 reads to the end. InvalidArgument when the
  // range is outside the layer. Returns the rows read.
  absl::StatusOr<int64_t> Read(int layer, int64_t token_begin, int64_t count, std::string* k_out,
                               std::string* v_out) const;

  // The session as an image (core/snapshot.h), every layer as it was at one instant. The
  // session lock is held only to take references to the published chunks and tail rows and to
  // copy the statistics (O(tail rows)); the bytes are copied after it is released, so an
  // export of a large session does not stall its decode steps. `generation`, when not null,
  // receives generation() at that instant.
  SessionImage Export(uint64_t* generation = nullptr) const;
  // Counts the changes to what Export returns (appends, decode steps, scoring statistics,
  // published chunks, Restore): equal values mean equal images. For checkpoints that write
  // only what changed.
  uint64_t generation() const;
  // Fills the layers of a session that holds no tokens yet from `image` (same layout), with
  // its scoring statistics and counters. A quality shadow is not restored (an image holds
  // no dense history): the session has none from here. ResourceExhausted over a budget;
  // InvalidArgument when a layer's contents do not fit the layout (LayerStore::Restore). On error
  // the caller drops the session (Close returns what it held).
  absl::Status Restore(const SessionImage& image);

  // Metadata and live stats.
  SessionInfo Info() const;
  // Records an access now (the TTL counts from the last one).
  void Touch();
  // Tokens cached in `layer` (REQUIRES: valid layer).
  int64_t tokens(int layer) const;
  int64_t bytes() const;
  absl::Time last_access() const;
  // Returns the session's bytes (its quality shadow's included) to the budget now, when the
  // store drops it (delete, TTL), not when the last reference goes: a background job or a
  // running step may still hold one. Charges made after Close are returned at once. Returns
  // the bytes released.
  int64_t Close();
  bool expired(absl::Time now) const;

 private:
  absl::Status CheckKvShape(const TensorView& t, const char* name,
                            const std::vector<int64_t>& want) const;
  void TouchLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves `bytes` of an earlier Reserve into the session's bytes; after Close they go back to
  // the budget at once.
  void CommitLocked(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Appends with observation queries: their statistics are computed on a staged copy of the
  // new rows first (cancellable), then rows and statistics are applied together.
  absl::Status AppendObserved(int layer_begin, const TensorView& k, const TensorView& v,
                              const TensorView& obs_q, const CancelCheck& cancel, int64_t* blocks);
  absl::Status CheckValues(const TensorView& t, const char* name, DType storage) const;
  // Schedules background compression of `layer` if it is eligible and idle.
  void MaybeSchedule(int layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Background job: compresses one chunk of `layer`, then reschedules itself while eligible.
  void CompressJob(int layer);
  // Compresses the oldest `tokens` tail rows of `layer` and publishes the chunk.
  // REQUIRES: the caller set layers_[layer].busy and mu_ is not held.
  // Returns false (nothing published) when the chunk would take more than its rows release
  // and that does not fit the budgets (only short remainder chunks can).
  bool CompressAndPublish(int layer, int tokens);
  // Adds the query energy of `q` to `energy` ([kv_heads, head_dim]) and, when NeedsMass, the
  // step's tail probabilities `step_mass` ([kv_heads, tail tokens], from the backend) to
  // `mass`. A step whose log-sum-exp is not finite (extreme finite inputs) adds nothing.
  // Returns whether it added.
  bool AccumulateScoring(const float* q, const float* lse, const std::vector<float>& step_mass,
                         std::vector<float>* mass, std::vector<double>* energy) const;
  // Applies what AccumulateScoring gathered. REQUIRES: mu_ held.
  void ApplyScoringLocked(int layer, const LayerSnapshot& snap, const std::vector<float>& mass,
                          const std::vector<double>& energy) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  float Scale(float requested) const;
  // Gives up the quality shadow (its growth was refused), counted as dropped.
  void DropShadowLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SessionEnv env_;
  SessionInfo info_;  // immutable after construction (stats unused)
  const PolicyPlan plan_;
  mutable Mutex mu_;
  std::condition_variable idle_cv_;  // a layer's busy flag went false
  std::vector<LayerStore> layers_ ABSL_GUARDED_BY(mu_);
  // Dense copy of every layer for the quality metric; null for most sessions.
  std::unique_ptr<QualityShadow> shadow_ ABSL_GUARDED_BY(mu_);
  const int64_t block_bytes_;                 // LayerStore::BlockBytes(layout)
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;    // held against the budget
  int64_t pending_ ABSL_GUARDED_BY(mu_) = 0;  // reserved, not yet committed
  bool closed_ ABSL_GUARDED_BY(mu_) = false;  // Close() ran: the budget holds nothing of ours
  int64_t decode_steps_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // see generation()
  absl::Time last_access_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SESSION_H_
