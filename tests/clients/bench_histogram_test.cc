#include "clients/cli/bench_histogram.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

// Bucket width is 2^(1/16) - 1 = 4.4%, so a percentile read from the bucket's geometric middle
// is within half of that of the exact value.
constexpr double kBucketTolerance = 0.022;

TEST(LatencyHistogramTest, EmptyReportsZeros) {
  LatencyHistogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.Percentile(0.5), 0);
  EXPECT_EQ(h.min_ns(), 0);
  EXPECT_EQ(h.max_ns(), 0);
  EXPECT_EQ(h.mean_ns(), 0.0);
  EXPECT_TRUE(HistogramRows(h).empty());
  EXPECT_EQ(RenderHistogram(h), "");
}

TEST(LatencyHistogramTest, BucketsAreContiguousAndContainTheirValues) {
  for (int i = 1; i < LatencyHistogram::kNumBuckets; ++i) {
    EXPECT_DOUBLE_EQ(LatencyHistogram::BucketUpper(i - 1), LatencyHistogram::BucketLower(i));
  }
  std::mt19937_64 rng(7);
  for (int n = 0; n < 10000; ++n) {
    const int64_t v = static_cast<int64_t>(rng() % (int64_t{1} << 36)) + 1;
    const int b = LatencyHistogram::BucketFor(v);
    EXPECT_LE(LatencyHistogram::BucketLower(b), static_cast<double>(v) * (1 + 1e-12)) << v;
    EXPECT_GT(LatencyHistogram::BucketUpper(b), static_cast<double>(v) * (1 - 1e-12)) << v;
  }
  EXPECT_EQ(LatencyHistogram::BucketFor(0), 0);
  EXPECT_EQ(LatencyHistogram::BucketFor(-5), 0);
  EXPECT_EQ(LatencyHistogram::BucketFor(int64_t{1} << 62), LatencyHistogram::kNumBuckets - 1);
}

TEST(LatencyHistogramTest, PercentilesMatchExactOnesWithinABucket) {
  // Log-normal latencies around 100 us, as a server produces.
  std::mt19937 rng(42);
  std::lognormal_distribution<double> dist(std::log(100e3), 0.8);
  std::vector<int64_t> values;
  LatencyHistogram h;
  for (int i = 0; i < 100000; ++i) {
    const int64_t v = static_cast<int64_t>(dist(rng));
    values.push_back(v);
    h.Record(v);
  }
  std::sort(values.begin(), values.end());
  for (double q : {0.01, 0.1, 0.5, 0.9, 0.99, 0.999}) {
    const size_t rank = static_cast<size_t>(std::ceil(q * values.size()));
    const double exact = static_cast<double>(values[rank - 1]);
    EXPECT_NEAR(static_cast<double>(h.Percentile(q)), exact, exact * kBucketTolerance) << q;
  }
  EXPECT_EQ(h.Percentile(0), values.front());
  EXPECT_EQ(h.Percentile(1), values.back());
  EXPECT_EQ(h.min_ns(), values.front());
  EXPECT_EQ(h.max_ns(), values.back());
  double sum = 0;
  for (int64_t v : values) sum += static_cast<double>(v);
  EXPECT_NEAR(h.mean_ns(), sum / values.size(), 1e-6 * sum / values.size());
}

TEST(LatencyHistogramTest, PercentileIsClampedToMinAndMax) {
  LatencyHistogram h;
  for (int i = 0; i < 10; ++i) h.Record(1000);
  // Every percentile of a constant is that constant, not the bucket's middle.
  EXPECT_EQ(h.Percentile(0.5), 1000);
  EXPECT_EQ(h.Percentile(0.999), 1000);
}

TEST(LatencyHistogramTest, SmallCountsUseCeilingRank) {
  LatencyHistogram h;
  h.Record(1000);
  h.Record(100000);
  // ceil(0.5 * 2) = 1: the first value.
  EXPECT_NEAR(h.Percentile(0.5), 1000, 1000 * kBucketTolerance);
  EXPECT_NEAR(h.Percentile(0.51), 100000, 100000 * kBucketTolerance);
}

TEST(LatencyHistogramTest, MergeEqualsRecordingEverything) {
  std::mt19937_64 rng(3);
  LatencyHistogram all, a, b;
  for (int i = 0; i < 5000; ++i) {
    const int64_t v = static_cast<int64_t>(rng() % 10000000);
    all.Record(v);
    (i % 3 == 0 ? a : b).Record(v);
  }
  LatencyHistogram merged;
  merged.Merge(a);
  merged.Merge(b);
  merged.Merge(LatencyHistogram());
  EXPECT_EQ(merged.count(), all.count());
  EXPECT_EQ(merged.buckets(), all.buckets());
  EXPECT_EQ(merged.min_ns(), all.min_ns());
  EXPECT_EQ(merged.max_ns(), all.max_ns());
  EXPECT_NEAR(merged.mean_ns(), all.mean_ns(), 1e-9 * all.mean_ns());
  for (double q : {0.5, 0.99}) EXPECT_EQ(merged.Percentile(q), all.Percentile(q));
}

TEST(HistogramRowsTest, RowsAreLogSpacedAndCountEverything) {
  LatencyHistogram h;
  for (int i = 0; i < 30; ++i) h.Record(150);    // row [100, 178) ns
  for (int i = 0; i < 10; ++i) h.Record(20000);  // row [17.8, 31.6) us
  const std::vector<HistogramRow> rows = HistogramRows(h, 4);
  ASSERT_EQ(rows.size(), 10u);  // [100 ns, 31.6 us), 4 rows per decade
  EXPECT_NEAR(rows.front().lower_ns, 100, 1e-9);
  EXPECT_NEAR(rows.front().upper_ns, 177.827941, 1e-5);
  EXPECT_EQ(rows.front().count, 30u);
  EXPECT_EQ(rows.back().count, 10u);
  uint64_t total = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    total += rows[i].count;
    if (i > 0) {
      EXPECT_DOUBLE_EQ(rows[i].lower_ns, rows[i - 1].upper_ns);
    }
  }
  EXPECT_EQ(total, 40u);
  const std::string text = RenderHistogram(h, 10);
  EXPECT_NE(text.find("|##########|"), std::string::npos) << text;  // the fullest row
  EXPECT_NE(text.find("|###       |"), std::string::npos) << text;  // 10 of 30
  EXPECT_NE(text.find("75.0%"), std::string::npos) << text;
}

TEST(FormatNanosTest, PicksUnitAndThreeDigits) {
  EXPECT_EQ(FormatNanos(850), "850ns");
  EXPECT_EQ(FormatNanos(12345), "12.3us");
  EXPECT_EQ(FormatNanos(4.56e6), "4.56ms");
  EXPECT_EQ(FormatNanos(123e6), "123ms");
  EXPECT_EQ(FormatNanos(1.5e9), "1.50s");
}

TEST(ProgressLineTest, ShowsFractionAndRate) {
  const std::string line = ProgressLine(0.5, 1000, 2.0, 10);
  EXPECT_EQ(line.substr(0, 13), "\r[#####.....]");
  EXPECT_NE(line.find(" 50%"), std::string::npos) << line;
  EXPECT_NE(line.find("500 req/s"), std::string::npos) << line;
  EXPECT_EQ(ProgressLine(7.0, 0, 0, 4).substr(0, 7), "\r[####]");  // clamped
}

}  // namespace
}  // namespace sparsekv::cli
