#include "service/auth.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "service/metrics.h"

namespace sparsekv::service {
namespace {

constexpr size_t kMinTokenBytes = 16;
constexpr size_t kMaxTokenBytes = 512;
constexpr size_t kMaxTenantBytes = 128;
constexpr size_t kMaxFileBytes = 1 << 20;

// True when a == b, in time that depends on the lengths only: no early exit on the first
// differing byte, so response times do not reveal how much of a guessed token was right.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() != b.size() ? 1u : 0u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

bool TokenChars(absl::string_view token) {
  for (char c : token) {
    if (c <= ' ' || c > '~') return false;
  }
  return true;
}

bool TenantChars(absl::string_view tenant) {
  for (char c : tenant) {
    const bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                    c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::Status PermissionDenied(const std::string& tenant) {
  return absl::PermissionDeniedError(
      absl::StrCat("a user token may not name tenant \"", tenant, "\" (only its own)"));
}

}  // namespace

absl::StatusOr<std::string> Caller::CreateTenant(const std::string& requested) const {
  if (requested.empty()) return tenant;
  if (!admin() && requested != tenant) return PermissionDenied(requested);
  return requested;
}

absl::StatusOr<std::string> Caller::ListTenant(const std::string& requested) const {
  if (admin()) return requested;
  return CreateTenant(requested);
}

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text) {
  if (text.size() > kMaxFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("token file is over ", kMaxFileBytes, " bytes"));
  }
  TokenTable table;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const std::vector<absl::string_view> f =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    const std::string where = absl::StrCat("token file line ", line_no, ": ");
    if (f.size() != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "expected `TOKEN TENANT ROLE`, got ", f.size(), " fields"));
    }
    if (f[0].size() < kMinTokenBytes || f[0].size() > kMaxTokenBytes || !TokenChars(f[0])) {
      return absl::InvalidArgumentError(absl::StrCat(where, "a token must be ", kMinTokenBytes,
                                                     "..", kMaxTokenBytes,
                                                     " printable ASCII characters"));
    }
    if (f[1].size() > kMaxTenantBytes || !TenantChars(f[1])) {
      return absl::InvalidArgumentError(absl::StrCat(where, "a tenant must be 1..", kMaxTenantBytes,
                                                     " characters of [A-Za-z0-9._:-]"));
    }
    Caller caller{std::string(f[1]), Role::kUser};
    if (f[2] == "admin") {
      caller.role = Role::kAdmin;
    } else if (f[2] != "user") {
      return absl::InvalidArgumentError(absl::StrCat(where, "role must be `user` or `admin`"));
    }
    if (table.Find(f[0]) != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(where, "the token appears twice"));
    }
    table.entries_.emplace_back(std::string(f[0]), std::move(caller));
  }
  if (table.entries_.empty()) return absl::InvalidArgumentError("token file has no tokens");
  return table;
}

const Caller* TokenTable::Find(absl::string_view token) const {
  const Caller* found = nullptr;
  for (const auto& [t, caller] : entries_) {
    // No break: every entry costs the same whether or not an earlier one matched.
    if (ConstantTimeEquals(t, token)) found = &caller;
  }
  return found;
}

absl::StatusOr<AuthMode> ParseAuthMode(absl::string_view text) {
  if (text == "none") return AuthMode::kNone;
  if (text == "token") return AuthMode::kToken;
  return absl::InvalidArgumentError(
      absl::StrCat("--auth must be `none` or `token`, got \"", text, "\""));
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(AuthMode mode,
                                                                     std::string token_file,
                                                                     Metrics* metrics,
                                                                     absl::Duration poll) {
  if (mode == AuthMode::kNone) {
    if (!token_file.empty()) {
      return absl::InvalidArgumentError("--auth_token_file needs --auth=token");
    }
    return std::unique_ptr<Authenticator>(new Authenticator(mode, "", metrics));
  }
  if (token_file.empty()) return absl::InvalidArgumentError("--auth=token needs --auth_token_file");
  std::unique_ptr<Authenticator> a(new Authenticator(mode, std::move(token_file), metrics));
  FileStamp stamp;
  absl::StatusOr<TokenTable> table = a->Load(&stamp);
  if (!table.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file=", a->file_, ": ", table.status().message()));
  }
  a->stamp_ = stamp;
  a->table_ = std::make_shared<const TokenTable>(*std::move(table));
  Authenticator* raw = a.get();
  a->poller_ = std::thread([raw, poll] { raw->PollLoop(poll); });
  return a;
}

Authenticator::~Authenticator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

size_t Authenticator::tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_ ? table_->size() : 0;
}

absl::StatusOr<Caller> Authenticator::Authenticate(std::optional<absl::string_view> header) const {
  if (mode_ == AuthMode::kNone) return Caller::NoAuth();
  if (!header) {
    return absl::UnauthenticatedError("missing `authorization: Bearer TOKEN` metadata");
  }
  absl::string_view value = absl::StripAsciiWhitespace(*header);
  // The scheme is case-insensitive (RFC 6750 follows RFC 7235).
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() || !absl::StartsWithIgnoreCase(value, kScheme)) {
    return absl::UnauthenticatedError("authorization metadata is not `Bearer TOKEN`");
  }
  value = absl::StripLeadingAsciiWhitespace(value.substr(kScheme.size()));
  std::shared_ptr<const TokenTable> table;
  {
    std::lock_guard<std::mutex> lock(mu_);
    table = table_;
  }
  const Caller* caller = table->Find(value);
  if (caller == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  return *caller;
}

absl::StatusOr<TokenTable> Authenticator::Load(FileStamp* stamp) const {
  struct stat st;
  if (stat(file_.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot stat: ", std::strerror(errno)));
  }
  stamp->mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  stamp->size = st.st_size;
  stamp->inode = st.st_ino;
  if (static_cast<uint64_t>(st.st_size) > kMaxFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("token file is over ", kMaxFileBytes, " bytes"));
  }
  std::ifstream f(file_, std::ios::binary);
  if (!f) return absl::InvalidArgumentError("cannot open for reading");
  std::ostringstream text;
  text << f.rdbuf();
  if (f.bad()) return absl::InvalidArgumentError("read failed");
  return TokenTable::Parse(text.str());
}

absl::Status Authenticator::ReloadIfChanged() {
  if (mode_ == AuthMode::kNone) return absl::OkStatus();
  std::lock_guard<std::mutex> reload(reload_mu_);
  FileStamp now;
  struct stat st;
  if (stat(file_.c_str(), &st) == 0) {
    now.mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
    now.size = st.st_size;
    now.inode = st.st_ino;
  }
  if (now == stamp_) return absl::OkStatus();
  absl::StatusOr<TokenTable> table = Load(&now);
  stamp_ = now;  // a bad version is reported once, not at every poll
  if (!table.ok()) {
    if (metrics_) metrics_->RecordTokenFileReload(false);
    std::fprintf(stderr,
                 "sparsekv-server: --auth_token_file=%s: reload failed, keeping the previous "
                 "%zu tokens: %s\n",
                 file_.c_str(), tokens(), std::string(table.status().message()).c_str());
    return table.status();
  }
  const size_t n = table->size();
  {
    std::lock_guard<std::mutex> lock(mu_);
    table_ = std::make_shared<const TokenTable>(*std::move(table));
  }
  if (metrics_) metrics_->RecordTokenFileReload(true);
  std::fprintf(stderr, "sparsekv-server: --auth_token_file=%s reloaded: %zu tokens\n",
               file_.c_str(), n);
  return absl::OkStatus();
}

void Authenticator::PollLoop(absl::Duration poll) {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      stop_cv_.wait_for(lock, absl::ToChronoNanoseconds(poll), [this] { return stop_; });
      if (stop_) return;
    }
    ReloadIfChanged().IgnoreError();  // logged and counted inside
  }
}

}  // namespace sparsekv::service
