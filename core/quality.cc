#include "core/quality.h"

#include <cmath>
#include <limits>

namespace sparsekv {
namespace {

// FNV-1a, 64 bits, then MurmurHash3's fmix64: stable across builds and processes
// (absl::Hash is neither), so a session keeps its shadow decision through restarts and
// migrations. The finalizer spreads the last characters into the top bits, which FNV alone
// leaves skewed for ids that differ only at the end (s-0 .. s-9999 at 0.25 selected 18%).
uint64_t StableHash(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

}  // namespace

QualityMonitor::QualityMonitor(QualityOptions options)
    : options_(options), errors_(ErrorBounds()) {}

std::vector<double> QualityMonitor::ErrorBounds() {
  return {1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1};
}

bool QualityMonitor::Selects(const std::string& id) const {
  if (options_.shadow_fraction <= 0) return false;
  if (options_.shadow_fraction >= 1) return true;
  // The top 53 bits as a uniform double in [0, 1).
  const double u = static_cast<double>(StableHash(id) >> 11) * 0x1p-53;
  return u < options_.shadow_fraction;
}

bool QualityMonitor::TryAddBytes(int64_t bytes) {
  const int64_t cap = options_.shadow_max_bytes;
  int64_t cur = bytes_.load();
  do {
    if (cap > 0 && cur + bytes > cap) return false;
  } while (!bytes_.compare_exchange_weak(cur, cur + bytes));
  return true;
}

void QualityMonitor::SubBytes(int64_t bytes) { bytes_.fetch_sub(bytes); }

QualityStats QualityMonitor::Stats() const {
  QualityStats s;
  s.relative_error = errors_.Snapshot();
  s.shadow_sessions = sessions_.load();
  s.shadow_bytes = bytes_.load();
  s.shadow_dropped_total = dropped_.load();
  return s;
}

double RelativeError(const float* approx, const float* exact, size_t n) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(approx[i]) - exact[i];
    diff += d * d;
    norm += static_cast<double>(exact[i]) * exact[i];
  }
  if (!(norm > 0) || !std::isfinite(norm) || !std::isfinite(diff)) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return std::sqrt(diff / norm);
}

}  // namespace sparsekv
