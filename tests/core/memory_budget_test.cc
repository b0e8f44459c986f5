#include "core/memory_budget.h"

#include <gtest/gtest.h>

namespace sparsekv {
namespace {

TEST(MemoryBudgetTest, RejectsOverLimitAndKeepsAccounting) {
  MemoryBudget b(100, 0);
  EXPECT_TRUE(b.Reserve("a", 60).ok());
  absl::Status st = b.Reserve("b", 41);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("budget"), std::string::npos);
  EXPECT_EQ(b.used(), 60);
  EXPECT_TRUE(b.Reserve("b", 40).ok());
  b.Release("a", 60);
  EXPECT_EQ(b.used(), 40);
  EXPECT_EQ(b.tenant_used("a"), 0);
  EXPECT_EQ(b.tenant_used("b"), 40);
}

TEST(MemoryBudgetTest, TenantLimitIsPerTenant) {
  MemoryBudget b(0, 50);
  EXPECT_TRUE(b.Reserve("a", 50).ok());
  EXPECT_EQ(b.Reserve("a", 1).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(b.Reserve("b", 50).ok());
  EXPECT_EQ(b.used(), 100);
}

}  // namespace
}  // namespace sparsekv
