// Moving session snapshots between servers, shared by `export`, `import`, `migrate` and
// `drain`.
#ifndef SPARSEKV_CLIENTS_CLI_SNAPSHOT_TRANSFER_H_
#define SPARSEKV_CLIENTS_CLI_SNAPSHOT_TRANSFER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/cpp/kv_cache_client.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::cli {

// A snapshot as transfer pieces of at most 1 MiB, each with its offset and CRC-32C.
std::vector<v1::SessionChunk> SnapshotPieces(const std::string& bytes);

// The whole snapshot of session `id` exported by `client`, its pieces checked (offsets,
// CRC-32C, last piece present). DATA_LOSS when the export arrived damaged; the server's
// error otherwise.
absl::StatusOr<std::string> ExportBytes(KvCacheClient* client, const std::string& id);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_SNAPSHOT_TRANSFER_H_
