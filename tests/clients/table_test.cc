#include "clients/cli/table.h"

#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

TEST(TableTest, PadsColumnsToWidestCellAndTrimsTrailingSpace) {
  Table t({"ID", "TOKENS"});
  t.AddRow({"session-long-name", "5"});
  t.AddRow({"s", "12345678"});
  EXPECT_EQ(t.Render(),
            "ID                 TOKENS\n"
            "session-long-name  5\n"
            "s                  12345678\n");
}

TEST(TableTest, ShortRowsGetEmptyCellsAndEmptyTableIsHeaderOnly) {
  Table t({"A", "B", "C"});
  EXPECT_EQ(t.Render(), "A  B  C\n");
  t.AddRow({"x"});
  EXPECT_EQ(t.Render(), "A  B  C\nx\n");
}

}  // namespace
}  // namespace sparsekv::cli
