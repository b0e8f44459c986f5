// The quality metric: for a configured fraction of sessions the server keeps a dense shadow of
// the cache (core/quality_shadow.h), runs dense attention over it beside every sparse decode
// step (a second item of the same backend call) and records the relative error of the sparse
// output here, so operators see what compression costs on their own traffic. This file holds
// the process-wide side: which sessions are shadowed, the shadow byte ledger and its cap, and
// the error histogram that service/metrics exports.
//
// Thread-safe: every method may be called concurrently.
#ifndef SPARSEKV_CORE_QUALITY_H_
#define SPARSEKV_CORE_QUALITY_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/histogram.h"

namespace sparsekv {

struct QualityOptions {
  // Share of sessions (0..1) that keep a dense shadow; 0 = none. Chosen from a hash of the
  // session id, so the same ids are shadowed on every run and replica.
  double shadow_fraction = 0;
  // All shadows together at most this many bytes; a shadow that would pass it is dropped.
  // 0 = no cap beyond the host and tenant budgets (shadows are charged to them too).
  int64_t shadow_max_bytes = int64_t{256} << 20;
};

struct QualityStats {
  HistogramSnapshot relative_error;  // one value per (decode step, layer) of a shadowed session
  int64_t shadow_sessions = 0;       // sessions holding a shadow now
  int64_t shadow_bytes = 0;          // what their shadows hold (also in the budgets' use)
  int64_t shadow_dropped_total = 0;  // shadows given up: over the cap or a budget
};

class QualityMonitor {
 public:
  explicit QualityMonitor(QualityOptions options);
  QualityMonitor(const QualityMonitor&) = delete;
  QualityMonitor& operator=(const QualityMonitor&) = delete;

  // Upper bounds of the error histogram: 1e-4 .. 1 in 1-2-5 steps (fp16 rounding alone is
  // ~1e-3; errors near 1 mean the sparse output has little to do with the dense one).
  static std::vector<double> ErrorBounds();

  // Whether the session `id` is one of the shadowed fraction (a stable hash of the id).
  bool Selects(const std::string& id) const;

  // The shadow byte ledger. TryAddBytes accounts `bytes` unless that would pass
  // shadow_max_bytes (then false, nothing accounted); SubBytes returns them.
  bool TryAddBytes(int64_t bytes);
  void SubBytes(int64_t bytes);
  // A shadow started / ended (its session closed, or dropped).
  void ShadowStarted() { sessions_.fetch_add(1); }
  void ShadowEnded() { sessions_.fetch_sub(1); }
  // A shadow given up (or never started) for the cap or a budget.
  void CountDropped() { dropped_.fetch_add(1); }

  // One decode step's ||sparse - dense||_2 / ||dense||_2.
  void RecordError(double relative_error) { errors_.Observe(relative_error); }

  QualityStats Stats() const;

 private:
  const QualityOptions options_;
  Histogram errors_;
  std::atomic<int64_t> sessions_{0}, bytes_{0}, dropped_{0};
};

// ||approx - exact||_2 / ||exact||_2 over n values, summed in double; NaN when exact is all
// zeros or either holds a non-finite value (no meaningful ratio: not recorded).
double RelativeError(const float* approx, const float* exact, size_t n);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_QUALITY_H_
