#include "clients/cli/snapshot_transfer.h"

#include <utility>

#include "common/crc32c.h"
#include "common/status_macros.h"

namespace sparsekv::cli {

std::vector<v1::SessionChunk> SnapshotPieces(const std::string& bytes) {
  constexpr size_t kPiece = 1 << 20;
  std::vector<v1::SessionChunk> pieces;
  for (size_t off = 0; off < bytes.size(); off += kPiece) {
    v1::SessionChunk c;
    c.set_format_version(1);
    c.set_offset(off);
    c.set_data(bytes.substr(off, kPiece));
    c.set_crc32c(Crc32c(c.data()));
    c.set_last(off + kPiece >= bytes.size());
    pieces.push_back(std::move(c));
  }
  return pieces;
}

absl::StatusOr<std::string> ExportBytes(KvCacheClient* client, const std::string& id) {
  SPARSEKV_ASSIGN_OR_RETURN(std::vector<v1::SessionChunk> pieces, client->ExportSession(id));
  std::string bytes;
  for (const v1::SessionChunk& c : pieces) {
    if (c.offset() != bytes.size() || Crc32c(c.data()) != c.crc32c()) {
      return absl::DataLossError("export arrived damaged (offset or checksum)");
    }
    bytes += c.data();
  }
  if (pieces.empty() || !pieces.back().last()) {
    return absl::DataLossError("export ended before its last piece");
  }
  return bytes;
}

}  // namespace sparsekv::cli
