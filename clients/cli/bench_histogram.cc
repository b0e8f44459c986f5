#include "clients/cli/bench_histogram.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace sparsekv::cli {

LatencyHistogram::LatencyHistogram() : buckets_(kNumBuckets, 0) {}

int LatencyHistogram::BucketFor(int64_t ns) {
  if (ns < 1) return 0;
  const int i =
      static_cast<int>(std::floor(std::log2(static_cast<double>(ns)) * kBucketsPerOctave)) + 1;
  return std::min(i, kNumBuckets - 1);
}

double LatencyHistogram::BucketLower(int i) {
  if (i <= 0) return 0.0;
  return std::exp2(static_cast<double>(i - 1) / kBucketsPerOctave);
}

double LatencyHistogram::BucketUpper(int i) {
  if (i <= 0) return 1.0;
  return std::exp2(static_cast<double>(i) / kBucketsPerOctave);
}

void LatencyHistogram::Record(int64_t ns) {
  if (ns < 0) ns = 0;
  ++buckets_[BucketFor(ns)];
  if (count_ == 0 || ns < min_) min_ = ns;
  if (ns > max_) max_ = ns;
  ++count_;
  sum_ += static_cast<double>(ns);
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (other.count_ == 0) return;
  for (int i = 0; i < kNumBuckets; ++i) buckets_[i] += other.buckets_[i];
  min_ = count_ == 0 ? other.min_ : std::min(min_, other.min_);
  max_ = std::max(max_, other.max_);
  count_ += other.count_;
  sum_ += other.sum_;
}

int64_t LatencyHistogram::Percentile(double q) const {
  if (count_ == 0) return 0;
  if (q <= 0) return min_;
  if (q >= 1) return max_;
  const uint64_t rank =
      std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_))));
  uint64_t seen = 0;
  for (int i = 0; i < kNumBuckets; ++i) {
    seen += buckets_[i];
    if (seen >= rank) {
      const double mid = i == 0 ? 0.0 : std::sqrt(BucketLower(i) * BucketUpper(i));
      const int64_t v = static_cast<int64_t>(std::llround(mid));
      return std::clamp(v, min_, max_);
    }
  }
  return max_;
}

std::vector<HistogramRow> HistogramRows(const LatencyHistogram& h, int rows_per_decade) {
  std::vector<HistogramRow> rows;
  if (h.count() == 0 || rows_per_decade < 1) return rows;
  // Row r holds [10^(r/rpd), 10^((r+1)/rpd)); a fine bucket goes where its lower bound is
  // (bucket 0, below 1 ns, goes to row 0). The epsilon keeps 10.0 out of the row below.
  auto row_of = [rows_per_decade](int i) {
    const double lower = std::max(1.0, LatencyHistogram::BucketLower(i));
    return static_cast<int>(std::floor(std::log10(lower) * rows_per_decade + 1e-9));
  };
  const std::vector<uint64_t>& b = h.buckets();
  int first = -1, last = -1;
  for (int i = 0; i < LatencyHistogram::kNumBuckets; ++i) {
    if (b[i] == 0) continue;
    const int r = row_of(i);
    if (first < 0 || r < first) first = r;
    last = std::max(last, r);
  }
  rows.resize(last - first + 1);
  for (int r = first; r <= last; ++r) {
    rows[r - first].lower_ns = std::pow(10.0, static_cast<double>(r) / rows_per_decade);
    rows[r - first].upper_ns = std::pow(10.0, static_cast<double>(r + 1) / rows_per_decade);
  }
  for (int i = 0; i < LatencyHistogram::kNumBuckets; ++i) {
    if (b[i] != 0) rows[row_of(i) - first].count += b[i];
  }
  return rows;
}

std::string FormatNanos(double ns) {
  struct Unit {
    double scale;
    const char* name;
  };
  static constexpr Unit kUnits[] = {{1e9, "s"}, {1e6, "ms"}, {1e3, "us"}};
  for (const Unit& u : kUnits) {
    if (ns >= u.scale) {
      const double v = ns / u.scale;
      return absl::StrFormat(v >= 100 ? "%.0f%s" : v >= 10 ? "%.1f%s" : "%.2f%s", v, u.name);
    }
  }
  return absl::StrFormat("%.0fns", ns);
}

std::string RenderHistogram(const LatencyHistogram& h, int bar_width) {
  const std::vector<HistogramRow> rows = HistogramRows(h);
  uint64_t fullest = 0;
  for (const HistogramRow& r : rows) fullest = std::max(fullest, r.count);
  std::vector<std::string> ranges;
  size_t width = 0;
  for (const HistogramRow& r : rows) {
    ranges.push_back(absl::StrCat(FormatNanos(r.lower_ns), " - ", FormatNanos(r.upper_ns)));
    width = std::max(width, ranges.back().size());
  }
  std::string out;
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint64_t c = rows[i].count;
    // A non-empty row always shows at least one '#', so rare outliers stay visible.
    int filled = fullest == 0 ? 0
                              : static_cast<int>(std::llround(static_cast<double>(c) * bar_width /
                                                              static_cast<double>(fullest)));
    if (c > 0 && filled == 0) filled = 1;
    absl::StrAppend(
        &out, "  ", std::string(width - ranges[i].size(), ' '), ranges[i], "  |",
        std::string(filled, '#'), std::string(bar_width - filled, ' '), "| ",
        absl::StrFormat("%9u  %5.1f%%", c,
                        100.0 * static_cast<double>(c) / static_cast<double>(h.count())),
        "\n");
  }
  return out;
}

std::string ProgressLine(double fraction, uint64_t requests, double elapsed_s, int width) {
  fraction = std::clamp(fraction, 0.0, 1.0);
  const int filled = static_cast<int>(fraction * width);
  const double rate = elapsed_s > 0 ? static_cast<double>(requests) / elapsed_s : 0.0;
  return absl::StrFormat("\r[%s%s] %3d%%  %u req  %.0f req/s  %.1fs ", std::string(filled, '#'),
                         std::string(width - filled, '.'),
                         static_cast<int>(fraction * 100.0 + 1e-9), requests, rate, elapsed_s);
}

}  // namespace sparsekv::cli
