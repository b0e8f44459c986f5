// Plain-text tables for the CLI's human-readable output.
//
// Columns are left-aligned and padded to their widest cell, separated by two spaces, so the
// output lines up in a terminal and still splits on whitespace in shell pipelines.
//
// Thread-safety: none; build a table on one thread.
#ifndef SPARSEKV_CLIENTS_CLI_TABLE_H_
#define SPARSEKV_CLIENTS_CLI_TABLE_H_

#include <string>
#include <utility>
#include <vector>

namespace sparsekv::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}

  // Adds a row. Rows shorter than the header are padded with empty cells; longer ones keep
  // their extra cells (printed without a heading).
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  size_t num_rows() const { return rows_.size(); }

  // The header line, then one line per row, each ending in '\n'. Trailing spaces are trimmed.
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_TABLE_H_
