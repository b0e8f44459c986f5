// A fixed-bucket histogram that core/ fills and service/metrics reads at scrape time, so
// that core/ gathers figures without knowing Prometheus (as StoreStats are gathered).
//
// Thread-safe: Observe and Snapshot may be called concurrently.
#ifndef SPARSEKV_CORE_HISTOGRAM_H_
#define SPARSEKV_CORE_HISTOGRAM_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "core/mutex.h"

namespace sparsekv {

// What a histogram holds at one instant.
struct HistogramSnapshot {
  std::vector<double> bounds;   // upper bounds of the buckets, increasing
  std::vector<int64_t> counts;  // [bounds.size() + 1] per bucket (not cumulative); the last
                                // counts values above every bound
  int64_t count = 0;            // values observed
  double sum = 0;               // their sum
};

class Histogram {
 public:
  // REQUIRES: `bounds` increasing.
  explicit Histogram(std::vector<double> bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // Counts `value` in the first bucket whose bound is >= value (Prometheus's `le`). NaN is
  // not counted: it belongs to no bucket and would poison the sum.
  void Observe(double value);
  HistogramSnapshot Snapshot() const;

 private:
  const std::vector<double> bounds_;
  mutable Mutex mu_;
  std::vector<int64_t> counts_ ABSL_GUARDED_BY(mu_);
  int64_t count_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_HISTOGRAM_H_
