// Prometheus metrics of the server: per-RPC request counters and latency histograms, work
// counters, and gauges read from the session store at scrape time.
//
// Thread-safe: Record* may be called from any RPC thread.
#ifndef SPARSEKV_SERVICE_METRICS_H_
#define SPARSEKV_SERVICE_METRICS_H_

#include <grpcpp/support/status.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/session_store.h"

namespace sparsekv::service {

struct BuildInfo {
  std::string version;
  std::string git_commit;
  std::string kernel_backend;
  std::string kernel_variant;
};

class Metrics {
 public:
  // `store` must outlive this object; its figures are read at every scrape.
  Metrics(const SessionStore* store, BuildInfo build);

  // What the HTTP exposer serves: the registry and the store gauges.
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables() const;
  // The text exposition format of everything collectables() holds (for tests and debugging).
  std::string Serialize() const;

  // One finished RPC: counts it under (method, code) and records its latency.
  void RecordRpc(const std::string& method, grpc::StatusCode code, absl::Duration latency);
  void AddDecodeItems(int64_t n) { decode_items_->Increment(static_cast<double>(n)); }
  // Token rows (layers x tokens) appended by AppendKV or decode steps.
  void AddAppendedRows(int64_t n) { appended_rows_->Increment(static_cast<double>(n)); }
  void AddReceivedBytes(int64_t n) { received_bytes_->Increment(static_cast<double>(n)); }
  // One pass of writing sessions to the snapshot directory (a checkpoint or the shutdown
  // write): session files written and failed, and how long the pass took.
  void RecordSnapshotWrite(int64_t ok, int64_t failed, absl::Duration took);
  // The start-up restore: session files loaded and skipped.
  void RecordSnapshotRestore(int64_t ok, int64_t skipped);
  // One reread of --auth_token_file after it changed: taken, or refused (the old table stays).
  void RecordTokenFileReload(bool ok);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> store_collector_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* latency_;
  prometheus::Counter* decode_items_;
  prometheus::Counter* appended_rows_;
  prometheus::Counter* received_bytes_;
  prometheus::Counter* snapshot_writes_ok_;
  prometheus::Counter* snapshot_writes_error_;
  prometheus::Counter* snapshot_restores_ok_;
  prometheus::Counter* snapshot_restores_skipped_;
  prometheus::Gauge* snapshot_last_write_seconds_;
  // Calls refused UNAUTHENTICATED / PERMISSION_DENIED, counted by RecordRpc from the code.
  prometheus::Counter* auth_unauthenticated_;
  prometheus::Counter* auth_permission_denied_;
  prometheus::Counter* token_reloads_ok_;
  prometheus::Counter* token_reloads_error_;
};

// Method names of the service, in proto order (used to pre-create label sets so that every
// series exists from the first scrape).
extern const char* const kRpcMethods[];
extern const int kNumRpcMethods;

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_METRICS_H_
