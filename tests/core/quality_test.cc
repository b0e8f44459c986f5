// QualityMonitor: which sessions are shadowed, the byte cap, the relative error.
#include "core/quality.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

namespace sparsekv {
namespace {

QualityMonitor Monitor(double fraction, int64_t max_bytes = 0) {
  QualityOptions o;
  o.shadow_fraction = fraction;
  o.shadow_max_bytes = max_bytes;
  return QualityMonitor(o);
}

int Selected(const QualityMonitor& m, int n) {
  int selected = 0;
  for (int i = 0; i < n; ++i) selected += m.Selects("s-" + std::to_string(i));
  return selected;
}

TEST(QualityMonitorTest, SelectsAboutTheFractionOfIdsTheSameEveryTime) {
  EXPECT_EQ(Selected(Monitor(0), 1000), 0);
  EXPECT_EQ(Selected(Monitor(1), 1000), 1000);
  // 10000 ids at 0.25: binomial standard deviation ~43.
  const int n = Selected(Monitor(0.25), 10000);
  EXPECT_NEAR(n, 2500, 200);
  // A stable hash: another monitor (another process, a restart) picks the same ids.
  EXPECT_EQ(Selected(Monitor(0.25), 10000), n);
  QualityMonitor a = Monitor(0.25), b = Monitor(0.25);
  for (int i = 0; i < 100; ++i) {
    const std::string id = "id-" + std::to_string(i);
    EXPECT_EQ(a.Selects(id), b.Selects(id)) << id;
  }
}

TEST(QualityMonitorTest, BytesStopAtTheCapAndReturn) {
  QualityMonitor m = Monitor(1, 100);
  EXPECT_TRUE(m.TryAddBytes(60));
  EXPECT_FALSE(m.TryAddBytes(41));
  EXPECT_EQ(m.Stats().shadow_bytes, 60);
  EXPECT_TRUE(m.TryAddBytes(40));
  m.SubBytes(100);
  EXPECT_EQ(m.Stats().shadow_bytes, 0);
  QualityMonitor unlimited = Monitor(1, 0);
  EXPECT_TRUE(unlimited.TryAddBytes(int64_t{1} << 40));
}

TEST(QualityMonitorTest, ErrorsGoToTheHistogram) {
  QualityMonitor m = Monitor(1);
  m.RecordError(0.03);
  m.RecordError(std::nan(""));
  const QualityStats s = m.Stats();
  EXPECT_EQ(s.relative_error.count, 1);
  EXPECT_DOUBLE_EQ(s.relative_error.sum, 0.03);
  EXPECT_EQ(s.relative_error.bounds, QualityMonitor::ErrorBounds());
}

TEST(RelativeErrorTest, IsTheL2NormOfTheDifferenceOverTheExactNorm) {
  const float exact[] = {3, 4};
  const float approx[] = {3, 3};
  EXPECT_DOUBLE_EQ(RelativeError(approx, exact, 2), 1.0 / 5.0);
  EXPECT_DOUBLE_EQ(RelativeError(exact, exact, 2), 0.0);
  const float zeros[] = {0, 0};
  EXPECT_TRUE(std::isnan(RelativeError(approx, zeros, 2)));
  const float inf[] = {INFINITY, 0};
  EXPECT_TRUE(std::isnan(RelativeError(inf, exact, 2)));
}

}  // namespace
}  // namespace sparsekv
