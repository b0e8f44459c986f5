#include "core/histogram.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace sparsekv {

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  MutexLock lock(&mu_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
}

HistogramSnapshot Histogram::Snapshot() const {
  HistogramSnapshot s;
  s.bounds = bounds_;
  MutexLock lock(&mu_);
  s.counts = counts_;
  s.count = count_;
  s.sum = sum_;
  return s;
}

}  // namespace sparsekv
