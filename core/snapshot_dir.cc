#include "core/snapshot_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "core/snapshot.h"

namespace sparsekv {
namespace {

constexpr char kTempSuffix[] = ".tmp";
// Base32 of 150 bytes is 240 characters: with "s-", ".skv" and ".tmp" 250 <= NAME_MAX (255).
constexpr size_t kMaxBase32IdBytes = 150;
constexpr size_t kMaxErrorsReported = 5;

// errno as a status: the codes say what an operator can do about it.
absl::Status PosixError(const std::string& what, const std::string& path, int err) {
  const std::string msg =
      absl::StrCat(what, " ", path, ": ", std::error_code(err, std::generic_category()).message());
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return absl::ResourceExhaustedError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    default:
      return absl::InternalError(msg);
  }
}

std::string Join(const std::string& dir, const std::string& name) {
  return absl::StrCat(dir, "/", name);
}

// Closes on every path out of a function.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // close(2) reports delayed write errors (NFS): checked where it matters.
  int Close() {
    const int rc = close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

absl::Status WriteFully(int fd, std::string_view bytes, const std::string& path) {
  while (!bytes.empty()) {
    const ssize_t n = write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return PosixError("cannot write", path, errno);
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::Status SyncDir(const std::string& dir) {
  Fd fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) return PosixError("cannot open directory", dir, errno);
  if (fsync(fd.get()) != 0) return PosixError("cannot fsync directory", dir, errno);
  return absl::OkStatus();
}

absl::Status MakeDir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) == 0 || errno == EEXIST) return absl::OkStatus();
  return PosixError("cannot create directory", dir, errno);
}

// The names of the directory's entries.
absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return PosixError("cannot list directory", dir, errno);
  std::vector<std::string> names;
  while (const dirent* e = readdir(d)) names.emplace_back(e->d_name);
  closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

// The whole file; ResourceExhausted without reading it when it is larger than `max_bytes`
// (0 = no limit), so that a huge file cannot exhaust memory at start-up.
absl::StatusOr<std::string> ReadFile(const std::string& path, int64_t max_bytes) {
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (fd.get() < 0) return PosixError("cannot open", path, errno);
  struct stat st;
  if (fstat(fd.get(), &st) != 0) return PosixError("cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) return absl::InvalidArgumentError("not a regular file");
  if (max_bytes > 0 && st.st_size > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "file of ", st.st_size, " bytes cannot fit the host budget of ", max_bytes / 2, " bytes"));
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError("cannot read", path, errno);
    if (n == 0) break;  // shrank meanwhile: the parser reports the truncation
    done += static_cast<size_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

uint64_t Fnv1a64(std::string_view s, uint64_t basis) {
  uint64_t h = basis;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

std::string SnapshotFileName(std::string_view id) {
  if (id.size() > kMaxBase32IdBytes) {
    // Two FNV-1a hashes with different offset bases; Write refuses a second live session whose
    // name collides rather than overwriting the first one's file.
    return absl::StrFormat("h-%016x%016x%s", Fnv1a64(id, 0xcbf29ce484222325ULL),
                           Fnv1a64(id, 0x84222325cbf29ce4ULL), kSnapshotFileSuffix);
  }
  static constexpr char kAlphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
  std::string name = "s-";
  uint32_t buffer = 0;
  int bits = 0;
  for (unsigned char c : id) {
    buffer = (buffer << 8) | c;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      name.push_back(kAlphabet[(buffer >> bits) & 31]);
    }
  }
  if (bits > 0) name.push_back(kAlphabet[(buffer << (5 - bits)) & 31]);
  return absl::StrCat(name, kSnapshotFileSuffix);
}

absl::Status WriteFileAtomically(const std::string& dir, const std::string& name,
                                 std::string_view bytes) {
  const std::string path = Join(dir, name);
  const std::string tmp = path + kTempSuffix;
  absl::Status st = [&]() -> absl::Status {
    Fd fd(open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (fd.get() < 0) return PosixError("cannot create", tmp, errno);
    SPARSEKV_RETURN_IF_ERROR(WriteFully(fd.get(), bytes, tmp));
    if (fsync(fd.get()) != 0) return PosixError("cannot fsync", tmp, errno);
    if (fd.Close() != 0) return PosixError("cannot close", tmp, errno);
    if (rename(tmp.c_str(), path.c_str()) != 0) return PosixError("cannot rename", tmp, errno);
    return absl::OkStatus();
  }();
  if (!st.ok()) {
    unlink(tmp.c_str());
    return st;
  }
  // Without this the rename may not survive a power cut.
  return SyncDir(dir);
}

std::string RestoreReport::ToString() const {
  if (!dir_error.ok()) return absl::StrCat("nothing restored: ", dir_error.ToString());
  std::string s = absl::StrCat("restored ", restored, " sessions (", bytes, " bytes), skipped ",
                               skipped.size());
  for (size_t i = 0; i < skipped.size(); ++i) {
    absl::StrAppend(&s, i == 0 ? ": " : "; ", skipped[i].file, ": ", skipped[i].why.ToString());
  }
  return s;
}

std::string WriteReport::ToString() const {
  std::string s =
      absl::StrCat("wrote ", written, " sessions (", bytes, " bytes), ", unchanged, " unchanged, ",
                   removed, " removed, ", failed, " failed in ", absl::FormatDuration(duration));
  for (size_t i = 0; i < errors.size(); ++i) absl::StrAppend(&s, i == 0 ? ": " : "; ", errors[i]);
  return s;
}

RestoreReport SnapshotDir::Restore(SessionStore* store) {
  MutexLock lock(&mu_);
  RestoreReport report;
  report.dir_error = MakeDir(dir_);
  if (!report.dir_error.ok()) return report;
  absl::StatusOr<std::vector<std::string>> names = ListDir(dir_);
  if (!names.ok()) {
    report.dir_error = names.status();
    return report;
  }
  // A snapshot's bytes are about what its session is charged: a file twice the host budget
  // cannot fit.
  const int64_t limit = store->budget().limit();
  const int64_t max_bytes = limit > 0 ? 2 * limit : 0;
  for (const std::string& name : *names) {
    const std::string path = Join(dir_, name);
    if (absl::EndsWith(name, absl::StrCat(kSnapshotFileSuffix, kTempSuffix))) {
      unlink(path.c_str());  // an interrupted write: the previous file, if any, is whole
      continue;
    }
    if (!absl::EndsWith(name, kSnapshotFileSuffix)) continue;
    absl::StatusOr<std::string> bytes = ReadFile(path, max_bytes);
    absl::StatusOr<SessionImage> image =
        bytes.ok() ? ParseSnapshot(*bytes, store->limits()) : bytes.status();
    absl::StatusOr<SessionInfo> info = image.ok() ? store->Import(*image) : image.status();
    if (info.ok()) {
      ++report.restored;
      report.bytes += static_cast<int64_t>(bytes->size());
      // A session restored from its own file needs no rewrite until it changes.
      absl::StatusOr<std::shared_ptr<Session>> s = store->Get(info->id);
      if (s.ok() && name == SnapshotFileName(info->id)) {
        written_[info->id] = Written{(*s)->generation(), name};
      }
      continue;
    }
    // Moved aside so that it is neither retried at every start nor removed as stale by the
    // next Write: an operator may still want it.
    const std::string bad = path + kBadFileSuffix;
    absl::Status why = info.status();
    if (rename(path.c_str(), bad.c_str()) != 0) {
      const absl::Status moved = PosixError("cannot rename", path, errno);
      why = absl::Status(why.code(), absl::StrCat(why.message(), " (", moved.message(), ")"));
    } else {
      why = absl::Status(why.code(),
                         absl::StrCat(why.message(), " (moved to ", name, kBadFileSuffix, ")"));
    }
    report.skipped.push_back({name, std::move(why)});
  }
  return report;
}

WriteReport SnapshotDir::Write(const SessionStore& store) {
  const absl::Time start = absl::Now();
  MutexLock lock(&mu_);
  WriteReport report;
  auto fail = [&report](std::string error) {
    ++report.failed;
    if (report.errors.size() < kMaxErrorsReported) report.errors.push_back(std::move(error));
  };
  // The directory may have been removed since start-up; if it cannot be made, every write
  // below fails and says why.
  MakeDir(dir_).IgnoreError();
  std::map<std::string, std::string> live;  // file name -> session id
  std::map<std::string, Written> written;   // what written_ becomes
  for (const std::shared_ptr<Session>& s : store.All()) {
    const std::string file = SnapshotFileName(s->id());
    auto [taken, fresh] = live.emplace(file, s->id());
    if (!fresh) {
      fail(absl::StrCat(file, ": the file name of session \"", taken->second,
                        "\" too; not written"));
      continue;
    }
    auto before = written_.find(s->id());
    if (before != written_.end() && before->second.generation == s->generation() &&
        IsRegularFile(Join(dir_, file))) {
      ++report.unchanged;
      written.insert(*before);
      continue;
    }
    uint64_t generation = 0;
    const std::string bytes = SerializeSnapshot(s->Export(&generation));
    const absl::Status st = WriteFileAtomically(dir_, file, bytes);
    if (st.ok()) {
      ++report.written;
      report.bytes += static_cast<int64_t>(bytes.size());
      written[s->id()] = Written{generation, file};
    } else {
      fail(st.ToString());
      // The previous file, if any, is still there and still this session's.
      if (before != written_.end()) written.insert(*before);
    }
  }
  written_ = std::move(written);
  // Files of deleted or evicted sessions. Sessions created since All() have no file yet, so
  // nothing live is removed.
  absl::StatusOr<std::vector<std::string>> names = ListDir(dir_);
  if (!names.ok()) {
    fail(names.status().ToString());
  } else {
    for (const std::string& name : *names) {
      if (!absl::EndsWith(name, kSnapshotFileSuffix) || live.count(name)) continue;
      const std::string path = Join(dir_, name);
      if (unlink(path.c_str()) == 0) {
        ++report.removed;
      } else {
        fail(PosixError("cannot remove", path, errno).ToString());
      }
    }
    if (report.removed > 0) {
      const absl::Status st = SyncDir(dir_);
      if (!st.ok()) fail(st.ToString());
    }
  }
  report.duration = absl::Now() - start;
  return report;
}

}  // namespace sparsekv
