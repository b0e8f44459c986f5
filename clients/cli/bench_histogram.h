// Latency statistics of `sparsekv bench` and `sparsekv demo`: a log-bucketed histogram with
// bounded memory, its percentiles, and an ASCII rendering.
//
// Values are nanoseconds. Bucket i >= 1 holds [2^((i-1)/16), 2^(i/16)) ns, so a bucket is
// 4.4% wide and a percentile read from it is within 2.2% of the true value (it is reported as
// the bucket's geometric middle, clamped to the exact min and max). Bucket 0 holds values
// below 1 ns. 16 buckets per octave up to 2^40 ns (18 minutes) take 641 counters: a
// histogram is about 5 KiB however many values it records, so every worker thread keeps its
// own and they are merged at the end.
//
// Thread-safety: none; one histogram per thread, Merge after the threads are joined.
#ifndef SPARSEKV_CLIENTS_CLI_BENCH_HISTOGRAM_H_
#define SPARSEKV_CLIENTS_CLI_BENCH_HISTOGRAM_H_

#include <cstdint>
#include <string>
#include <vector>

namespace sparsekv::cli {

class LatencyHistogram {
 public:
  static constexpr int kBucketsPerOctave = 16;
  static constexpr int kOctaves = 40;
  static constexpr int kNumBuckets = kBucketsPerOctave * kOctaves + 1;

  LatencyHistogram();

  // Records one value in nanoseconds (negative values count as 0; values past the last bucket
  // go to it, and still update max).
  void Record(int64_t ns);
  // Adds every value `other` recorded.
  void Merge(const LatencyHistogram& other);

  uint64_t count() const { return count_; }
  int64_t min_ns() const { return count_ == 0 ? 0 : min_; }
  int64_t max_ns() const { return max_; }
  double mean_ns() const { return count_ == 0 ? 0.0 : sum_ / static_cast<double>(count_); }

  // The value at quantile q in [0, 1]: the smallest recorded value v such that at least
  // ceil(q * count) values are <= v, to bucket precision (see the file comment). q = 0 gives
  // min, q = 1 gives max, an empty histogram gives 0.
  int64_t Percentile(double q) const;

  // Index of the bucket `ns` falls into, and the bounds [lower, upper) of bucket i in ns.
  static int BucketFor(int64_t ns);
  static double BucketLower(int i);
  static double BucketUpper(int i);

  // Counts per bucket, kNumBuckets long.
  const std::vector<uint64_t>& buckets() const { return buckets_; }

 private:
  std::vector<uint64_t> buckets_;
  uint64_t count_ = 0;
  int64_t min_ = 0;
  int64_t max_ = 0;
  double sum_ = 0;
};

// One row of a rendered histogram: values in [lower_ns, upper_ns) and how many there were.
struct HistogramRow {
  double lower_ns = 0;
  double upper_ns = 0;
  uint64_t count = 0;
};

// Regroups `h` into display rows `rows_per_decade` to a decade (log-spaced: 4 gives bounds
// 1, 1.78, 3.16, 5.62, 10, ... times a power of ten), from the row holding the minimum to the
// row holding the maximum. Each fine bucket goes to the row holding its lower bound, so row
// counts are exact only to the fine bucket's width. Empty histogram: no rows.
std::vector<HistogramRow> HistogramRows(const LatencyHistogram& h, int rows_per_decade = 4);

// "850ns", "12.3us", "4.56ms", "1.23s": three significant digits.
std::string FormatNanos(double ns);

// The rows as text, one line each: range, a bar of '#' scaled to the fullest row
// (`bar_width` wide), count and share:  "  100us - 178us  |#######       |    1234  45.2%".
std::string RenderHistogram(const LatencyHistogram& h, int bar_width = 40);

// A progress line for a terminal: "\r[#####.....]  45%  12345 req  23456 req/s  5.0s"
// (`fraction` in [0, 1], clamped).
std::string ProgressLine(double fraction, uint64_t requests, double elapsed_s, int width = 30);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_BENCH_HISTOGRAM_H_
