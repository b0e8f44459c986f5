// The set of live sessions: creation, lookup, paged listing, deletion, TTL eviction, the host
// byte budget, and batched decode steps across sessions.
//
// Thread-safe. Lookups hand out shared_ptr<Session>, so a request that holds a session keeps
// it alive even if it is deleted or evicted meanwhile; its bytes return to the budget when the
// last holder lets go.
#ifndef SPARSEKV_CORE_SESSION_STORE_H_
#define SPARSEKV_CORE_SESSION_STORE_H_

#include <map>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/decode_batcher.h"
#include "core/memory_budget.h"
#include "core/mutex.h"
#include "core/session.h"
#include "core/types.h"
#include "kernels/compute_backend.h"

namespace sparsekv {

struct SessionStoreOptions {
  SessionLimits limits;
  int64_t host_budget_bytes = 0;    // all sessions together; 0 = unlimited
  int64_t tenant_budget_bytes = 0;  // each tenant; 0 = unlimited
  int max_sessions = 100000;
  int max_sessions_per_tenant = 0;              // 0 = only max_sessions
  absl::Duration default_ttl = absl::Hours(1);  // for sessions that ask for none
  absl::Duration max_ttl = absl::Hours(24);
  // How often the background janitor evicts expired sessions; zero = no janitor thread (tests
  // call EvictExpired themselves).
  absl::Duration janitor_period = absl::Seconds(1);
  // Where decode steps run; null = the CPU backend made from decode_threads and
  // decode_spin_us (CreateBackend makes one by name).
  std::shared_ptr<const kernels::ComputeBackend> backend;
  int pruner_threads = 1;   // background compression threads
  int pruner_queue = 4096;  // queued compression jobs at most; more are retried later
  // CPU backend: worker threads that split a decode batch across items, KV heads and chunks;
  // -1 = one fewer than the hardware threads (the calling thread works too), 0 = no splitting.
  int decode_threads = -1;
  // How long the CPU backend's decode workers poll for work before sleeping: see
  // kernels/cpu/thread_pool.h. 0 = sleep at once (no idle CPU burnt, slower split steps).
  int decode_spin_us = 250;
  // How long the decode batcher waits after a request for more to join its batch (see
  // core/decode_batcher.h); zero = no waiting.
  absl::Duration decode_batch_window = absl::ZeroDuration();
  // false: SubmitDecode runs each request on its caller's thread, alone (DecodeBatch), as the
  // service did before the batcher; the baseline tests/bench/decode_batcher_bench.sh compares.
  bool decode_batching = true;
  // The quality metric's dense shadows (core/quality.h); off by default.
  QualityOptions quality;
};

// The backend `name` (auto | cpu | cuda) asks for, with the CPU's threads from `options`;
// *why receives a line for the start-up log on how it was chosen. InvalidArgument for an
// unknown name, Unavailable for one this build or machine cannot run.
absl::StatusOr<std::shared_ptr<const kernels::ComputeBackend>> CreateBackend(
    const std::string& name, const SessionStoreOptions& options, std::string* why);

// What CreateSession asks for.
struct CreateSessionParams {
  std::string id;      // empty = generate
  std::string tenant;  // empty = "default"
  Layout layout;
  Policy policy;
  absl::Duration ttl = absl::ZeroDuration();  // zero = options.default_ttl
  std::map<std::string, std::string> labels;
};

struct ListSessionsResult {
  std::vector<SessionInfo> sessions;  // ordered by id
  std::string next_page_token;        // empty on the last page
};

// Aggregate figures for metrics.
struct StoreStats {
  int64_t sessions = 0;
  int64_t bytes_used = 0;
  int64_t evicted_total = 0;
  int64_t chunks_compressed_total = 0;
  int64_t tokens_compressed_total = 0;  // summed over layers
  double compress_seconds_total = 0;
  int64_t pruner_rejected_total = 0;         // jobs refused by the full queue (retried later)
  int64_t prune_failed_total = 0;            // chunks the backend failed to compress
  int64_t pruner_queued = 0;                 // jobs waiting now
  int64_t slab_reserved_bytes = 0;           // chunk memory taken from the system
  HistogramSnapshot chunk_compress_seconds;  // per published chunk
};

// What the live sessions hold, by form, summed over sessions (SessionStore::FormStats).
struct FormStats {
  int64_t bytes_dense = 0;       // dense K/V rows (tails, dense chunks)
  int64_t bytes_compressed = 0;  // compressed chunks: values and bitmaps
  int64_t bytes_accounted = 0;   // everything charged: the above, slack, statistics, metadata,
                                 // quality shadows
  int64_t bytes_shadow = 0;      // quality shadows (core/quality_shadow.h)
  int64_t bytes_dense_equivalent = 0;  // the same tokens stored dense
  int64_t compressed_elements = 0;     // elements of K (= of V) in compressed chunks
  int64_t kept_k = 0;
  int64_t kept_v = 0;
};

class SessionStore {
 public:
  explicit SessionStore(SessionStoreOptions options);
  ~SessionStore();  // stops the batcher (running what it holds) and the janitor

  SessionStore(const SessionStore&) = delete;
  SessionStore& operator=(const SessionStore&) = delete;

  // InvalidArgument for a bad id, tenant, labels, layout, policy or TTL; AlreadyExists for a
  // taken id; ResourceExhausted at max_sessions, at max_sessions_per_tenant for its tenant, or
  // when the session's fixed bytes (Session::FixedBytes) do not fit the budget.
  absl::StatusOr<SessionInfo> Create(CreateSessionParams params);
  // Adds the session an image describes (an ImportSession, a restart), under its own id (or
  // `id` when not empty). Checks as Create (AlreadyExists for a taken id); ResourceExhausted
  // over a budget; InvalidArgument for contents that do not fit. Nothing is added on error.
  absl::StatusOr<SessionInfo> Import(const SessionImage& image, const std::string& id = "");
  // InvalidArgument for a malformed id (never echoed), NotFound for an unknown one. Counts as
  // an access: the session's TTL restarts. `tenant` (when not empty) confines the lookup: a
  // session of another tenant is NotFound with an unknown id's message, and not touched.
  absl::StatusOr<std::shared_ptr<Session>> Get(const std::string& id,
                                               std::string_view tenant = {}) const;
  // Sessions of `tenant` (all when empty) with id > page_token, at most page_size (1..1000).
  ListSessionsResult List(const std::string& tenant, int page_size,
                          const std::string& page_token) const;
  // Removes the session. NotFound for an unknown id (or one of another tenant than `tenant`,
  // when not empty, as in Get). Returns the bytes it held.
  absl::StatusOr<int64_t> Delete(const std::string& id, std::string_view tenant = {});

  // Compresses every eligible token of a session now (Session::Flush). NotFound for an
  // unknown id.
  absl::StatusOr<FlushResult> Flush(const std::string& id);

  // Runs every item of a decode step on the calling thread, one after another (tests, tools).
  // Errors as AdmitDecode; outputs is resized to items.size().
  absl::Status DecodeBatch(const std::vector<DecodeInput>& items,
                           std::vector<DecodeOutput>* outputs, std::string_view tenant = {});
  // The same through the decode batcher: `done` runs on its thread when the step is done
  // (the items' tensors must stay valid until then). How the service decodes.
  void SubmitDecode(std::vector<DecodeInput> items, DecodeDone done, std::string tenant = {});
  // The one validation path of a decode request: every item's session is looked up and the
  // item checked (Session::CheckDecode), then the bytes of every new token are reserved; if
  // any of that fails nothing is reserved and that item's error is returned (message prefixed
  // with its index when there are several). On success *sessions and *reserved hold, per
  // item, its session and the bytes reserved for its step (Session::PrepareDecode).
  // `tenant` confines the lookups as in Get.
  absl::Status AdmitDecode(const std::vector<DecodeInput>& items, std::string_view tenant,
                           std::vector<std::shared_ptr<Session>>* sessions,
                           std::vector<int64_t>* reserved);
  DecodeBatcherStats BatcherStats() const { return batcher_->Stats(); }
  // The quality metric: error histogram and shadow figures.
  QualityStats Quality() const { return env_.quality->Stats(); }

  // Every live session, ordered by id (snapshots to disk). Not an access: TTLs go on.
  std::vector<std::shared_ptr<Session>> All() const;
  // Sums every live session's stats: O(sessions x layers), for metrics scrapes, not per request.
  FormStats Forms() const;

  // Removes sessions idle for longer than their TTL; returns how many.
  int EvictExpired(absl::Time now);

  StoreStats Stats() const;
  const MemoryBudget& budget() const { return *budget_; }
  const SessionLimits& limits() const { return options_.limits; }
  const kernels::ComputeBackend& backend() const { return *backend_; }

 private:
  std::string NewId() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The one tenant-aware lookup: the session `id` names, or null when there is none or it
  // belongs to another tenant than `tenant` (when not empty).
  std::shared_ptr<Session> FindLocked(const std::string& id, std::string_view tenant) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ResourceExhausted when `tenant` holds max_sessions_per_tenant sessions.
  absl::Status CheckTenantQuotaLocked(const std::string& tenant) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keep tenant_sessions_ in step with sessions_.
  void AddLocked(std::shared_ptr<Session> session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::shared_ptr<Session> RemoveLocked(
      std::map<std::string, std::shared_ptr<Session>>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void JanitorLoop();

  const SessionStoreOptions options_;
  const std::shared_ptr<const kernels::ComputeBackend> backend_;
  const std::shared_ptr<MemoryBudget> budget_;
  SessionEnv env_;

  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int, std::less<>> tenant_sessions_ ABSL_GUARDED_BY(mu_);  // live, by tenant
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  int64_t evicted_total_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  // Copy of shutting_down_ for the janitor's condition-variable wait, which holds mu_ through
  // its native handle (invisible to the annotations).
  bool shutting_down_flag_ = false;
  std::condition_variable janitor_cv_;
  std::thread janitor_;
  // Last: stopped (its queue run) first, while everything it uses is still there.
  std::unique_ptr<DecodeBatcher> batcher_;
};

// OK for 1..max_bytes characters of [A-Za-z0-9._:-], else InvalidArgument (the id itself is
// not echoed: it may be huge).
absl::Status ValidateSessionId(const std::string& id, int max_bytes = 128);
// InvalidArgument when `labels` break the limits (count, key and value sizes).
absl::Status ValidateLabels(const std::map<std::string, std::string>& labels,
                            const SessionLimits& limits);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SESSION_STORE_H_
