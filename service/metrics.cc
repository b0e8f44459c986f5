#include "service/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "service/grpc_status.h"

namespace sparsekv::service {

const char* const kRpcMethods[] = {"CreateSession", "GetSession",    "ListSessions",
                                   "DeleteSession", "AppendKV",      "Decode",
                                   "DecodeStream",  "Flush",         "ReadKV",
                                   "ExportSession", "ImportSession", "GetServerInfo"};
const int kNumRpcMethods = sizeof(kRpcMethods) / sizeof(kRpcMethods[0]);

namespace {

// Gauges computed from the store when Prometheus scrapes, so they are never stale.
class StoreCollector final : public prometheus::Collectable {
 public:
  explicit StoreCollector(const SessionStore* store) : store_(store) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    const StoreStats s = store_->Stats();
    std::vector<prometheus::MetricFamily> out;
    out.push_back(Single("sparsekv_sessions", "Live sessions.", prometheus::MetricType::Gauge,
                         static_cast<double>(s.sessions), {}));
    out.push_back(Single("sparsekv_kv_bytes", "Bytes of cached K/V (payload and metadata).",
                         prometheus::MetricType::Gauge, static_cast<double>(s.bytes_used),
                         {{"tier", "host"}}));
    out.push_back(Single("sparsekv_kv_budget_bytes",
                         "Byte budget for cached K/V; 0 means unlimited.",
                         prometheus::MetricType::Gauge,
                         static_cast<double>(store_->budget().limit()), {{"tier", "host"}}));
    // By reason: the TTL is the only one today (a full budget refuses requests, it evicts
    // nothing); the label keeps dashboards stable when tiers add more.
    out.push_back(Single("sparsekv_sessions_evicted_total",
                         "Sessions removed by the server, by reason (ttl: idle past their TTL).",
                         prometheus::MetricType::Counter, static_cast<double>(s.evicted_total),
                         {{"reason", "ttl"}}));
    out.push_back(Single("sparsekv_pruned_chunks_total", "Chunks compressed (all layers).",
                         prometheus::MetricType::Counter,
                         static_cast<double>(s.chunks_compressed_total), {}));
    out.push_back(Single(
        "sparsekv_pruned_tokens_total", "Token rows compressed (tokens summed over layers).",
        prometheus::MetricType::Counter, static_cast<double>(s.tokens_compressed_total), {}));
    out.push_back(Single("sparsekv_prune_seconds_total",
                         "Time spent compressing chunks (background and Flush).",
                         prometheus::MetricType::Counter, s.compress_seconds_total, {}));
    out.push_back(HistogramFamily("sparsekv_prune_chunk_duration_seconds",
                                  "Time to compress and publish one chunk (background and Flush).",
                                  s.chunk_compress_seconds, {}));
    out.push_back(Single("sparsekv_prune_failures_total",
                         "Chunks the compute backend failed to compress (their rows stay dense).",
                         prometheus::MetricType::Counter, static_cast<double>(s.prune_failed_total),
                         {}));
    out.push_back(Single("sparsekv_pruner_rejected_total",
                         "Compression jobs refused by the full pruner queue (retried later).",
                         prometheus::MetricType::Counter,
                         static_cast<double>(s.pruner_rejected_total), {}));
    out.push_back(Single("sparsekv_pruner_queue_jobs", "Compression jobs waiting.",
                         prometheus::MetricType::Gauge, static_cast<double>(s.pruner_queued), {}));
    out.push_back(Single(
        "sparsekv_chunk_pool_reserved_bytes", "Memory reserved by the compressed-chunk slab pools.",
        prometheus::MetricType::Gauge, static_cast<double>(s.slab_reserved_bytes), {}));
    // By form: what compression saves is dense_equivalent / (dense + compressed), computed
    // from these, not guessed; "metadata" is the rest of what the budget is charged
    // (dense-block slack, pool rounding, scoring statistics, ids and labels) but the quality
    // shadows, which have their own gauge.
    const FormStats f = store_->Forms();
    const double other = static_cast<double>(std::max<int64_t>(
        0, f.bytes_accounted - f.bytes_dense - f.bytes_compressed - f.bytes_shadow));
    out.push_back(Family("sparsekv_kv_form_bytes",
                         "Bytes the live sessions hold, by form: dense rows, compressed chunks "
                         "(values and bitmaps), metadata (slack, statistics, ids); quality "
                         "shadows are sparsekv_quality_shadow_bytes.",
                         prometheus::MetricType::Gauge,
                         {{{{"tier", "host"}, {"form", "dense"}}, double(f.bytes_dense)},
                          {{{"tier", "host"}, {"form", "compressed"}}, double(f.bytes_compressed)},
                          {{{"tier", "host"}, {"form", "metadata"}}, other}}));
    out.push_back(Single("sparsekv_kv_dense_equivalent_bytes",
                         "Bytes the live sessions' tokens would take stored dense.",
                         prometheus::MetricType::Gauge, double(f.bytes_dense_equivalent),
                         {{"tier", "host"}}));
    out.push_back(Single("sparsekv_compressed_elements",
                         "Elements of K (as many of V) in compressed chunks: the denominator of "
                         "the achieved sparsity.",
                         prometheus::MetricType::Gauge, double(f.compressed_elements), {}));
    out.push_back(
        Family("sparsekv_compressed_kept_elements",
               "Elements compressed chunks keep, by tensor; achieved sparsity = 1 - "
               "kept / sparsekv_compressed_elements.",
               prometheus::MetricType::Gauge,
               {{{{"tensor", "k"}}, double(f.kept_k)}, {{{"tensor", "v"}}, double(f.kept_v)}}));
    CollectQuality(&out);
    CollectBatcher(&out);
    return out;
  }

 private:
  using Labels = std::vector<prometheus::ClientMetric::Label>;

  // The quality metric (core/quality.h).
  void CollectQuality(std::vector<prometheus::MetricFamily>* out) const {
    const QualityStats q = store_->Quality();
    out->push_back(HistogramFamily(
        "sparsekv_quality_relative_error",
        "Relative error ||sparse - dense||_2 / ||dense||_2 of decode outputs of the sessions "
        "with a dense shadow (--quality_shadow_fraction), one value per step and layer.",
        q.relative_error, {}));
    out->push_back(Single("sparsekv_quality_shadow_sessions",
                          "Sessions that keep a dense shadow for the quality metric.",
                          prometheus::MetricType::Gauge, double(q.shadow_sessions), {}));
    out->push_back(Single("sparsekv_quality_shadow_bytes",
                          "Bytes of the dense shadows (charged to the host budget too; capped "
                          "by --quality_shadow_max_bytes).",
                          prometheus::MetricType::Gauge, double(q.shadow_bytes), {}));
    out->push_back(Single("sparsekv_quality_shadow_dropped_total",
                          "Dense shadows given up because they would pass "
                          "--quality_shadow_max_bytes or a byte budget.",
                          prometheus::MetricType::Counter, double(q.shadow_dropped_total), {}));
  }

  // The decode batcher's backend calls (core/decode_batcher.h), by backend.
  void CollectBatcher(std::vector<prometheus::MetricFamily>* out) const {
    const DecodeBatcherStats b = store_->BatcherStats();
    const Labels backend = {{"backend", store_->backend().name()}};
    out->push_back(Single("sparsekv_decode_batches_total",
                          "Backend calls of the decode batcher (one per batch and shape).",
                          prometheus::MetricType::Counter, double(b.batches), backend));
    out->push_back(Single("sparsekv_decode_batch_items_total",
                          "Items the decode batcher's backend calls ran (one per session and "
                          "layer, plus one per step of a session with a quality shadow).",
                          prometheus::MetricType::Counter, double(b.items), backend));
    out->push_back(Single("sparsekv_decode_backend_seconds_total",
                          "Time the decode batcher spent inside backend calls.",
                          prometheus::MetricType::Counter, b.backend_seconds, backend));
    out->push_back(HistogramFamily("sparsekv_decode_batch_size_items",
                                   "Items per backend call of the decode batcher.",
                                   b.items_per_batch, backend));
  }

  static prometheus::MetricFamily HistogramFamily(const char* name, const char* help,
                                                  const HistogramSnapshot& h, Labels labels) {
    prometheus::MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = prometheus::MetricType::Histogram;
    prometheus::ClientMetric m;
    m.label = std::move(labels);
    m.histogram.sample_count = static_cast<uint64_t>(h.count);
    m.histogram.sample_sum = h.sum;
    uint64_t cumulative = 0;
    for (size_t i = 0; i < h.counts.size(); ++i) {
      cumulative += static_cast<uint64_t>(h.counts[i]);
      const double bound =
          i < h.bounds.size() ? h.bounds[i] : std::numeric_limits<double>::infinity();
      m.histogram.bucket.push_back({cumulative, bound});
    }
    f.metric.push_back(std::move(m));
    return f;
  }

  static prometheus::MetricFamily Single(const char* name, const char* help,
                                         prometheus::MetricType type, double value, Labels labels) {
    return Family(name, help, type, {{std::move(labels), value}});
  }

  // One family, one series per (labels, value).
  static prometheus::MetricFamily Family(const char* name, const char* help,
                                         prometheus::MetricType type,
                                         std::vector<std::pair<Labels, double>> series) {
    prometheus::MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = type;
    for (auto& [labels, value] : series) {
      prometheus::ClientMetric m;
      m.label = std::move(labels);
      if (type == prometheus::MetricType::Counter) {
        m.counter.value = value;
      } else {
        m.gauge.value = value;
      }
      f.metric.push_back(std::move(m));
    }
    return f;
  }

  const SessionStore* store_;
};

}  // namespace

Metrics::Metrics(const SessionStore* store, BuildInfo build)
    : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("sparsekv_rpc_requests_total")
                   .Help(
                       "Finished RPCs by method and gRPC status code; DecodeStream counts each "
                       "request message.")
                   .Register(*registry_);
  latency_ = &prometheus::BuildHistogram()
                  .Name("sparsekv_rpc_duration_seconds")
                  .Help(
                      "RPC handling time from arrival to status, by method; DecodeStream per "
                      "request message.")
                  .Register(*registry_);
  for (int i = 0; i < kNumRpcMethods; ++i) {
    requests_->Add({{"method", kRpcMethods[i]}, {"code", "OK"}});
  }
  decode_items_ = &prometheus::BuildCounter()
                       .Name("sparsekv_decode_items_total")
                       .Help("Decode items (one session, one layer) served.")
                       .Register(*registry_)
                       .Add({});
  appended_rows_ = &prometheus::BuildCounter()
                        .Name("sparsekv_appended_token_rows_total")
                        .Help("Token rows (layers x tokens) appended to caches.")
                        .Register(*registry_)
                        .Add({});
  received_bytes_ = &prometheus::BuildCounter()
                         .Name("sparsekv_appended_bytes_total")
                         .Help("K/V tensor bytes received by AppendKV, as sent on the wire.")
                         .Register(*registry_)
                         .Add({});
  auto& writes = prometheus::BuildCounter()
                     .Name("sparsekv_snapshot_writes_total")
                     .Help(
                         "Session files written to --snapshot_dir (checkpoints and the shutdown "
                         "write), by result; an error leaves the session's previous file.")
                     .Register(*registry_);
  snapshot_writes_ok_ = &writes.Add({{"result", "ok"}});
  snapshot_writes_error_ = &writes.Add({{"result", "error"}});
  auto& restores = prometheus::BuildCounter()
                       .Name("sparsekv_snapshot_restores_total")
                       .Help(
                           "Session files read from --snapshot_dir at start-up, by result; a "
                           "skipped file was renamed NAME.bad.")
                       .Register(*registry_);
  snapshot_restores_ok_ = &restores.Add({{"result", "ok"}});
  snapshot_restores_skipped_ = &restores.Add({{"result", "skipped"}});
  snapshot_last_write_seconds_ = &prometheus::BuildGauge()
                                      .Name("sparsekv_snapshot_last_write_seconds")
                                      .Help(
                                          "Duration of the last pass that wrote sessions to "
                                          "--snapshot_dir.")
                                      .Register(*registry_)
                                      .Add({});
  auto& auth_failures = prometheus::BuildCounter()
                            .Name("sparsekv_auth_failures_total")
                            .Help(
                                "Calls refused for want of a known bearer token "
                                "(unauthenticated) or for naming another tenant or an admin "
                                "operation (permission_denied); DecodeStream per message.")
                            .Register(*registry_);
  auth_unauthenticated_ = &auth_failures.Add({{"reason", "unauthenticated"}});
  auth_permission_denied_ = &auth_failures.Add({{"reason", "permission_denied"}});
  auto& reloads = prometheus::BuildCounter()
                      .Name("sparsekv_auth_token_file_reloads_total")
                      .Help(
                          "Rereads of --auth_token_file after it changed, by result; on error "
                          "the previous tokens stay in force.")
                      .Register(*registry_);
  token_reloads_ok_ = &reloads.Add({{"result", "ok"}});
  token_reloads_error_ = &reloads.Add({{"result", "error"}});
  prometheus::BuildGauge()
      .Name("sparsekv_build_info")
      .Help("Build and kernel selection of this server; value is always 1.")
      .Register(*registry_)
      .Add({{"version", build.version},
            {"git_commit", build.git_commit},
            {"kernel_backend", build.kernel_backend},
            {"kernel_variant", build.kernel_variant}})
      .Set(1);
  store_collector_ = std::make_shared<StoreCollector>(store);
}

std::vector<std::shared_ptr<prometheus::Collectable>> Metrics::collectables() const {
  return {registry_, store_collector_};
}

std::string Metrics::Serialize() const {
  std::vector<prometheus::MetricFamily> families;
  for (const auto& c : collectables()) {
    for (auto& f : c->Collect()) families.push_back(std::move(f));
  }
  return prometheus::TextSerializer().Serialize(families);
}

void Metrics::RecordSnapshotWrite(int64_t ok, int64_t failed, absl::Duration took) {
  snapshot_writes_ok_->Increment(static_cast<double>(ok));
  snapshot_writes_error_->Increment(static_cast<double>(failed));
  snapshot_last_write_seconds_->Set(absl::ToDoubleSeconds(took));
}

void Metrics::RecordSnapshotRestore(int64_t ok, int64_t skipped) {
  snapshot_restores_ok_->Increment(static_cast<double>(ok));
  snapshot_restores_skipped_->Increment(static_cast<double>(skipped));
}

void Metrics::RecordTokenFileReload(bool ok) {
  (ok ? token_reloads_ok_ : token_reloads_error_)->Increment();
}

void Metrics::RecordRpc(const std::string& method, grpc::StatusCode code, absl::Duration latency) {
  requests_->Add({{"method", method}, {"code", GrpcCodeName(code)}}).Increment();
  // Only auth (service/auth.h) produces these two codes, so every refusal is counted here.
  if (code == grpc::StatusCode::UNAUTHENTICATED) auth_unauthenticated_->Increment();
  if (code == grpc::StatusCode::PERMISSION_DENIED) auth_permission_denied_->Increment();
  // Buckets from 50 us (small decode steps) to 10 s (bulk uploads).
  static const prometheus::Histogram::BucketBoundaries* const kBuckets =
      new prometheus::Histogram::BucketBoundaries{5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
                                                  5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,  0.25,
                                                  0.5,  1,    2.5,    5,    10};
  latency_->Add({{"method", method}}, *kBuckets).Observe(absl::ToDoubleSeconds(latency));
}

}  // namespace sparsekv::service
