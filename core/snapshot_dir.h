// Sessions kept as files in one directory, so that a restart loses nothing: one snapshot
// (core/snapshot.h) per session, written atomically (temp file, fsync, rename, fsync of the
// directory), read back at start-up.
//
// A file that cannot be loaded (damaged, another format version, over a budget, an id already
// loaded) is renamed NAME.bad and counted, never loaded and never fatal. Writes that fail (full
// disk, unwritable directory) leave the previous file of the session in place and are retried
// by the next Write.
//
// SnapshotDir is thread-safe: Write and Restore calls are serialised.
#ifndef SPARSEKV_CORE_SNAPSHOT_DIR_H_
#define SPARSEKV_CORE_SNAPSHOT_DIR_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/mutex.h"
#include "core/session_store.h"

namespace sparsekv {

inline constexpr char kSnapshotFileSuffix[] = ".skv";
inline constexpr char kBadFileSuffix[] = ".bad";

// The file name of session `id`: "s-" + lowercase base32 of the id + ".skv" for ids of up to
// 150 bytes (one name per id, only [a-z2-7], so also safe on case-insensitive file systems),
// else "h-" + 32 hex digits of a 128-bit hash of the id + ".skv". Any name stays under
// NAME_MAX with ".tmp" or ".bad" appended. The id that counts is the one inside the file.
std::string SnapshotFileName(std::string_view id);

// Replaces dir/name by `bytes` atomically and durably: writes dir/name.tmp, fsyncs it,
// renames it over dir/name and fsyncs the directory. On error (the message names the step,
// the path and the errno text) dir/name is as before and the temp file is removed.
absl::Status WriteFileAtomically(const std::string& dir, const std::string& name,
                                 std::string_view bytes);

struct RestoreReport {
  struct Skipped {
    std::string file;
    absl::Status why;
  };
  int restored = 0;
  int64_t bytes = 0;  // file bytes of the restored sessions
  std::vector<Skipped> skipped;
  absl::Status dir_error;  // the directory could not be created or listed: nothing restored
  // One line: counts, then each skipped file with its reason.
  std::string ToString() const;
};

struct WriteReport {
  int written = 0;
  int unchanged = 0;  // written before and not changed since
  int failed = 0;
  int removed = 0;  // files of sessions that no longer exist
  int64_t bytes = 0;
  absl::Duration duration;
  std::vector<std::string> errors;  // the first few failures, each naming its session file
  std::string ToString() const;
};

class SnapshotDir {
 public:
  explicit SnapshotDir(std::string dir) : dir_(std::move(dir)) {}

  const std::string& dir() const { return dir_; }

  // Creates the directory if missing, then imports every *.skv file into `store` in name
  // order. Files it cannot load are renamed NAME.bad; temp files of interrupted writes are
  // removed.
  RestoreReport Restore(SessionStore* store);

  // Writes every session of `store` that changed since this object last wrote it (all of them
  // the first time), then removes the *.skv files of sessions that no longer exist. A session
  // whose write fails keeps its previous file and is retried by the next call.
  WriteReport Write(const SessionStore& store);

 private:
  struct Written {
    uint64_t generation = 0;  // Session::generation() of the image in the file
    std::string file;
  };

  const std::string dir_;
  Mutex mu_;
  std::map<std::string, Written> written_ ABSL_GUARDED_BY(mu_);  // by session id
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_SNAPSHOT_DIR_H_
