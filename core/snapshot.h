// A session as a self-contained byte string: what ExportSession streams, ImportSession and a
// restart read back, on this replica or another (CPU or GPU). Versioned and checksummed:
//
//   "SKVSNAP\0"  u32 version (1)
//   record*      u32 type, u64 payload bytes, payload, u32 crc32c(payload)
//     type 1: the session header (id, tenant, layout, policy, ttl, labels, counters), first
//     type 2: one layer (index, LayerImage), num_layers of them in order
//     type 3: the end (layer count, crc32c of every byte before this record), last
//
// All integers little-endian. The parser trusts nothing: every length is bounded by the bytes
// left, every count by the layout limits, every checksum verified, and a format, size or
// bitmap that does not fit the layout is refused (LayerStore::Restore checks those).
//
// Stateless functions; thread-safe.
#ifndef SPARSEKV_CORE_SNAPSHOT_H_
#define SPARSEKV_CORE_SNAPSHOT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/crc32c.h"
#include "core/layer_store.h"
#include "core/types.h"

namespace sparsekv {

inline constexpr uint32_t kSnapshotVersion = 1;

// Everything a session is, in memory.
struct SessionImage {
  SessionInfo info;  // id, tenant, layout, policy, ttl, labels, create_time; stats unused
  int64_t decode_steps = 0;
  std::vector<LayerImage> layers;  // [num_layers]
};

std::string SerializeSnapshot(const SessionImage& image);
// DataLoss for bytes that are not a whole, intact snapshot (bad magic, truncated, a checksum
// that does not match, trailing bytes); FailedPrecondition for another format version;
// InvalidArgument for contents that do not fit the limits (layout, ids, labels) — the message
// says which part.
absl::StatusOr<SessionImage> ParseSnapshot(std::string_view bytes, const SessionLimits& limits);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SNAPSHOT_H_
