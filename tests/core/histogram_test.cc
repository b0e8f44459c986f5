// Histogram: bucket placement by Prometheus's `le`, the overflow bucket, sum and count.
#include "core/histogram.h"

#include <gtest/gtest.h>

#include <cmath>

namespace sparsekv {
namespace {

TEST(HistogramTest, CountsEachValueInTheFirstBucketWhoseBoundIsAtLeastIt) {
  Histogram h({1, 2, 4});
  for (double x : {0.5, 1.0, 1.5, 4.0, 9.0}) h.Observe(x);
  const HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.bounds, (std::vector<double>{1, 2, 4}));
  EXPECT_EQ(s.counts, (std::vector<int64_t>{2, 1, 1, 1}));
  EXPECT_EQ(s.count, 5);
  EXPECT_DOUBLE_EQ(s.sum, 16.0);
}

TEST(HistogramTest, NanIsNotCounted) {
  Histogram h({1});
  h.Observe(std::nan(""));
  h.Observe(0.25);
  const HistogramSnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 1);
  EXPECT_EQ(s.counts, (std::vector<int64_t>{1, 0}));
  EXPECT_DOUBLE_EQ(s.sum, 0.25);
}

}  // namespace
}  // namespace sparsekv
