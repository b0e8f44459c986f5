// Who an RPC runs as: bearer tokens mapped to tenants and roles (--auth=token with
// --auth_token_file), or anyone with every right (--auth=none). The transport
// (service/kv_cache_service.cc) resolves a Caller once per call from its `authorization`
// metadata through an Authenticator and passes it to the handlers, which apply it: session
// lookups are confined to Caller::scope() (Handlers::Find), and the tenant a request names is
// checked by Caller::CreateTenant / ListTenant.
//
// Token file format (README "Auth and tenants"): UTF-8 text, one `TOKEN TENANT ROLE` per line,
// fields separated by spaces or tabs; blank lines and lines starting with `#` are ignored.
// TOKEN: 16..512 printable ASCII characters without spaces; TENANT: 1..128 of
// [A-Za-z0-9._:-]; ROLE: `user` or `admin`. A token may appear once.
//
// Tokens are compared in constant time and never logged, counted or echoed in errors: parse
// errors name the line number only.
#ifndef SPARSEKV_SERVICE_AUTH_H_
#define SPARSEKV_SERVICE_AUTH_H_

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace sparsekv::service {

class Metrics;

enum class Role { kUser, kAdmin };

// Plain value; thread-compatible.
struct Caller {
  std::string tenant;  // empty only for NoAuth()
  Role role = Role::kUser;

  // --auth=none: an admin of no tenant, so requests behave as without auth (an empty tenant
  // in CreateSession stays empty and the store files the session under "default").
  static Caller NoAuth() { return {"", Role::kAdmin}; }

  bool admin() const { return role == Role::kAdmin; }
  // The tenant session lookups are confined to: the caller's own for a user, "" (every
  // tenant) for an admin.
  std::string_view scope() const { return admin() ? std::string_view() : tenant; }
  // The tenant a new session (CreateSession, ImportSession) is filed under when the request
  // names `requested`: "" means the caller's own. PERMISSION_DENIED when a user names another.
  absl::StatusOr<std::string> CreateTenant(const std::string& requested) const;
  // The tenant filter of ListSessions when the request names `requested`: an admin's is taken
  // as it is ("" = every tenant); a user's "" means its own. PERMISSION_DENIED when a user
  // names another tenant.
  absl::StatusOr<std::string> ListTenant(const std::string& requested) const;
};

// The parsed token file: token -> Caller. Immutable after Parse; thread-safe to read.
class TokenTable {
 public:
  // InvalidArgument naming the first bad line (never its token): wrong field count, a token,
  // tenant or role outside the format above, a duplicate token; or a file without tokens, or
  // over 1 MiB.
  static absl::StatusOr<TokenTable> Parse(absl::string_view text);

  // The caller `token` belongs to, or null. Every entry is compared, each in time that
  // depends on the lengths only, so the time does not tell how much of a token matched.
  const Caller* Find(absl::string_view token) const;
  size_t size() const { return entries_.size(); }

 private:
  std::vector<std::pair<std::string, Caller>> entries_;
};

enum class AuthMode { kNone, kToken };
// "none" or "token"; InvalidArgument otherwise.
absl::StatusOr<AuthMode> ParseAuthMode(absl::string_view text);

// Resolves callers and keeps the token table current.
//
// Thread-safe: Authenticate may run on any RPC thread while the reload thread swaps tables.
class Authenticator {
 public:
  // kNone: every call is Caller::NoAuth() (`token_file` must be empty). kToken: reads
  // `token_file` now (InvalidArgument when it is missing, unreadable or malformed), then a
  // background thread checks every `poll` whether its modification time, size or inode
  // changed and rereads it (ReloadIfChanged). `metrics` (may be null) counts reloads; it must
  // outlive this object.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(
      AuthMode mode, std::string token_file, Metrics* metrics = nullptr,
      absl::Duration poll = absl::Seconds(1));
  ~Authenticator();  // stops the reload thread

  AuthMode mode() const { return mode_; }
  size_t tokens() const;

  // The caller of a call whose `authorization` metadata is `header` (nullopt when absent).
  // UNAUTHENTICATED when it is absent, not `Bearer TOKEN`, or names no token of the table.
  absl::StatusOr<Caller> Authenticate(std::optional<absl::string_view> header) const;

  // Rereads the token file if it changed since the last read. On success the new table
  // replaces the old one for every later call; on failure the old table stays, and the error
  // is logged on stderr and counted (once per change of the file). Returns the reload's
  // status (OK when nothing changed).
  absl::Status ReloadIfChanged();

 private:
  // What identifies a version of the file without reading it.
  struct FileStamp {
    int64_t mtime_ns = 0;
    int64_t size = -1;
    ino_t inode = 0;
    bool operator==(const FileStamp& o) const {
      return mtime_ns == o.mtime_ns && size == o.size && inode == o.inode;
    }
  };

  Authenticator(AuthMode mode, std::string token_file, Metrics* metrics)
      : mode_(mode), file_(std::move(token_file)), metrics_(metrics) {}
  // Reads and parses the file; `stamp` gets the version read.
  absl::StatusOr<TokenTable> Load(FileStamp* stamp) const;
  void PollLoop(absl::Duration poll);

  const AuthMode mode_;
  const std::string file_;
  Metrics* const metrics_;

  mutable std::mutex mu_;
  std::shared_ptr<const TokenTable> table_;  // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  std::mutex reload_mu_;                     // one reload at a time
  FileStamp stamp_;                          // the version last tried; guarded by reload_mu_
  std::condition_variable stop_cv_;
  std::thread poller_;
};

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_AUTH_H_
