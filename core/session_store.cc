#include "core/session_store.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace sparsekv {
namespace {

// The one answer for a session that does not exist or belongs to another tenant: the two
// must be indistinguishable.
absl::Status SessionNotFound(const std::string& id) {
  return absl::NotFoundError(absl::StrCat("session \"", id, "\" not found"));
}

}  // namespace

absl::Status ValidateSessionId(const std::string& id, int max_bytes) {
  if (id.empty() || id.size() > static_cast<size_t>(max_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("session_id must be 1..", max_bytes, " characters, got ", id.size()));
  }
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == ':' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError("session_id may only contain letters, digits and . _ : -");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateLabels(const std::map<std::string, std::string>& labels,
                            const SessionLimits& lim) {
  if (labels.size() > static_cast<size_t>(lim.max_labels)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "at most ", lim.max_labels, " labels per session (--max_labels), got ", labels.size()));
  }
  for (const auto& [key, value] : labels) {
    if (key.empty() || key.size() > static_cast<size_t>(lim.max_label_key_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label keys must be 1..", lim.max_label_key_bytes, " bytes, got ", key.size()));
    }
    if (value.size() > static_cast<size_t>(lim.max_label_value_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat("label \"", key, "\": values must be at most ",
                                                     lim.max_label_value_bytes, " bytes, got ",
                                                     value.size()));
    }
  }
  return absl::OkStatus();
}

namespace {

kernels::ComputeBackendOptions CpuOptions(const SessionStoreOptions& o) {
  kernels::ComputeBackendOptions c;
  c.threads = o.decode_threads;
  c.spin_us = o.decode_spin_us;
  return c;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const kernels::ComputeBackend>> CreateBackend(
    const std::string& name, const SessionStoreOptions& options, std::string* why) {
  kernels::ComputeBackendOptions c = CpuOptions(options);
  c.name = name;
  std::unique_ptr<kernels::ComputeBackend> backend;
  SPARSEKV_RETURN_IF_ERROR(FromKernelStatus(kernels::CreateComputeBackend(c, &backend, why)));
  return std::shared_ptr<const kernels::ComputeBackend>(std::move(backend));
}

SessionStore::SessionStore(SessionStoreOptions options)
    : options_(std::move(options)),
      backend_(options_.backend ? options_.backend
                                : std::shared_ptr<const kernels::ComputeBackend>(
                                      kernels::MakeCpuComputeBackend(CpuOptions(options_)))),
      budget_(
          std::make_shared<MemoryBudget>(options_.host_budget_bytes, options_.tenant_budget_bytes)),
      rng_(std::random_device{}()) {
  env_.limits = options_.limits;
  env_.budget = budget_;
  env_.backend = backend_;
  env_.pools = std::make_shared<SlabPoolSet>();
  env_.quality = std::make_shared<QualityMonitor>(options_.quality);
  // Compression runs at a lower priority: decode steps and uploads come first, the pruner
  // takes the idle CPU (measured by tests/bench/prefill_interference_bench).
  env_.pruner = std::make_shared<BoundedExecutor>(std::max(1, options_.pruner_threads),
                                                  std::max(1, options_.pruner_queue),
                                                  /*nice=*/10);
  if (options_.janitor_period > absl::ZeroDuration()) {
    janitor_ = std::thread([this] { JanitorLoop(); });
  }
  DecodeBatcherOptions b;
  b.window = options_.decode_batch_window;
  batcher_ = std::make_unique<DecodeBatcher>(this, b);
}

SessionStore::~SessionStore() {
  batcher_->Stop();
  {
    MutexLock lock(&mu_);
    shutting_down_ = true;
    shutting_down_flag_ = true;
  }
  janitor_cv_.notify_all();
  if (janitor_.joinable()) janitor_.join();
  // Queued jobs are dropped; running ones finish (they hold their session).
  env_.pruner->Shutdown();
}

void SessionStore::JanitorLoop() {
  // Dense tail blocks (and gRPC's message buffers) come from malloc: once enough memory was
  // released, hand the freed heap pages back to the system (slabs of compressed chunks unmap
  // themselves). Counted from releases, not sampled use, so a fill and delete between two
  // ticks still trims.
  int64_t trimmed_at = budget_->released_total();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_.native());
      janitor_cv_.wait_for(lock, absl::ToChronoMilliseconds(options_.janitor_period),
                           [this] { return shutting_down_flag_; });
      if (shutting_down_flag_) return;
    }
    EvictExpired(absl::Now());
    const int64_t released = budget_->released_total();
    if (released - trimmed_at > (int64_t{16} << 20)) {
      malloc_trim(0);
      trimmed_at = released;
    }
  }
}

std::shared_ptr<Session> SessionStore::FindLocked(const std::string& id,
                                                  std::string_view tenant) const {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return nullptr;
  if (!tenant.empty() && it->second->tenant() != tenant) return nullptr;
  return it->second;
}

absl::Status SessionStore::CheckTenantQuotaLocked(const std::string& tenant) const {
  const int max = options_.max_sessions_per_tenant;
  if (max <= 0) return absl::OkStatus();
  auto it = tenant_sessions_.find(tenant);
  if (it != tenant_sessions_.end() && it->second >= max) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant \"", tenant, "\" holds ", max,
                                                     " sessions (--max_sessions_per_tenant)"));
  }
  return absl::OkStatus();
}

void SessionStore::AddLocked(std::shared_ptr<Session> session) {
  ++tenant_sessions_[session->tenant()];
  const std::string id = session->id();
  sessions_.emplace(id, std::move(session));
}

std::shared_ptr<Session> SessionStore::RemoveLocked(
    std::map<std::string, std::shared_ptr<Session>>::iterator it) {
  std::shared_ptr<Session> s = std::move(it->second);
  sessions_.erase(it);
  auto t = tenant_sessions_.find(s->tenant());
  if (t != tenant_sessions_.end() && --t->second <= 0) tenant_sessions_.erase(t);
  return s;
}

std::string SessionStore::NewId() {
  for (;;) {
    std::string id = absl::StrFormat("s-%016x", rng_());
    if (sessions_.find(id) == sessions_.end()) return id;
  }
}

absl::StatusOr<SessionInfo> SessionStore::Create(CreateSessionParams params) {
  const SessionLimits& lim = options_.limits;
  if (!params.id.empty()) SPARSEKV_RETURN_IF_ERROR(ValidateSessionId(params.id, lim.max_id_bytes));
  if (params.tenant.empty()) params.tenant = "default";
  if (params.tenant.size() > static_cast<size_t>(lim.max_id_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("tenant must be at most ", lim.max_id_bytes,
                                                   " bytes, got ", params.tenant.size()));
  }
  SPARSEKV_RETURN_IF_ERROR(ValidateLabels(params.labels, lim));
  SPARSEKV_RETURN_IF_ERROR(ValidateLayout(params.layout, lim));
  SPARSEKV_RETURN_IF_ERROR(ValidatePolicy(params.policy, params.layout));
  if (params.ttl < absl::ZeroDuration() || params.ttl > options_.max_ttl) {
    return absl::InvalidArgumentError(absl::StrCat("ttl must be at most ",
                                                   absl::FormatDuration(options_.max_ttl), ", got ",
                                                   absl::FormatDuration(params.ttl)));
  }
  SessionInfo info;
  info.tenant = std::move(params.tenant);
  info.layout = params.layout;
  info.policy = params.policy;
  info.ttl = params.ttl == absl::ZeroDuration() ? options_.default_ttl : params.ttl;
  info.labels = std::move(params.labels);
  info.create_time = absl::Now();
  info.last_access_time = info.create_time;

  MutexLock lock(&mu_);
  if (shutting_down_) return absl::UnavailableError("session store is shutting down");
  if (static_cast<int>(sessions_.size()) >= options_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "session limit reached: ", options_.max_sessions, " sessions (--max_sessions)"));
  }
  SPARSEKV_RETURN_IF_ERROR(CheckTenantQuotaLocked(info.tenant));
  if (params.id.empty()) {
    info.id = NewId();
  } else if (sessions_.count(params.id)) {
    return absl::AlreadyExistsError(absl::StrCat("session \"", params.id, "\" already exists"));
  } else {
    info.id = std::move(params.id);
  }
  // The session's fixed memory is reserved before it exists; the session owns it from here.
  SPARSEKV_RETURN_IF_ERROR(budget_->Reserve(info.tenant, Session::FixedBytes(info)));
  auto session = std::make_shared<Session>(std::move(info), env_);
  AddLocked(session);
  return session->Info();
}

absl::StatusOr<SessionInfo> SessionStore::Import(const SessionImage& image, const std::string& id) {
  const SessionLimits& lim = options_.limits;
  SessionInfo info = image.info;
  if (!id.empty()) info.id = id;
  SPARSEKV_RETURN_IF_ERROR(ValidateSessionId(info.id, lim.max_id_bytes));
  SPARSEKV_RETURN_IF_ERROR(ValidateLabels(info.labels, lim));
  SPARSEKV_RETURN_IF_ERROR(ValidateLayout(info.layout, lim));
  SPARSEKV_RETURN_IF_ERROR(ValidatePolicy(info.policy, info.layout));
  if (static_cast<int>(image.layers.size()) != info.layout.num_layers) {
    return absl::InvalidArgumentError("image has the wrong number of layers");
  }
  if (info.ttl > options_.max_ttl) info.ttl = options_.max_ttl;
  info.last_access_time = absl::Now();
  {
    MutexLock lock(&mu_);
    if (shutting_down_) return absl::UnavailableError("session store is shutting down");
    if (sessions_.count(info.id)) {
      return absl::AlreadyExistsError(absl::StrCat("session \"", info.id, "\" already exists"));
    }
    if (static_cast<int>(sessions_.size()) >= options_.max_sessions) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "session limit reached: ", options_.max_sessions, " sessions (--max_sessions)"));
    }
    SPARSEKV_RETURN_IF_ERROR(CheckTenantQuotaLocked(info.tenant));
  }
  SPARSEKV_RETURN_IF_ERROR(budget_->Reserve(info.tenant, Session::FixedBytes(info)));
  auto session = std::make_shared<Session>(info, env_);
  absl::Status st = session->Restore(image);
  if (!st.ok()) {
    session->Close();
    return st;
  }
  MutexLock lock(&mu_);
  if (sessions_.count(session->id())) {  // taken meanwhile
    session->Close();
    return absl::AlreadyExistsError(absl::StrCat("session \"", info.id, "\" already exists"));
  }
  AddLocked(session);
  return session->Info();
}

absl::StatusOr<std::shared_ptr<Session>> SessionStore::Get(const std::string& id,
                                                           std::string_view tenant) const {
  SPARSEKV_RETURN_IF_ERROR(ValidateSessionId(id, options_.limits.max_id_bytes));
  std::shared_ptr<Session> s;
  {
    MutexLock lock(&mu_);
    s = FindLocked(id, tenant);
    if (!s) return SessionNotFound(id);
  }
  s->Touch();
  return s;
}

ListSessionsResult SessionStore::List(const std::string& tenant, int page_size,
                                      const std::string& page_token) const {
  std::vector<std::shared_ptr<Session>> page;
  ListSessionsResult result;
  {
    MutexLock lock(&mu_);
    for (auto it = sessions_.upper_bound(page_token); it != sessions_.end(); ++it) {
      if (!tenant.empty() && it->second->tenant() != tenant) continue;
      if (static_cast<int>(page.size()) == page_size) {
        result.next_page_token = page.back()->id();
        break;
      }
      page.push_back(it->second);
    }
  }
  // Stats take each session's own lock: gather them outside the store lock.
  result.sessions.reserve(page.size());
  for (const auto& s : page) result.sessions.push_back(s->Info());
  return result;
}

std::vector<std::shared_ptr<Session>> SessionStore::All() const {
  std::vector<std::shared_ptr<Session>> all;
  MutexLock lock(&mu_);
  all.reserve(sessions_.size());
  for (const auto& [id, session] : sessions_) all.push_back(session);
  return all;
}

absl::StatusOr<int64_t> SessionStore::Delete(const std::string& id, std::string_view tenant) {
  SPARSEKV_RETURN_IF_ERROR(ValidateSessionId(id, options_.limits.max_id_bytes));
  std::shared_ptr<Session> victim;
  {
    MutexLock lock(&mu_);
    if (!FindLocked(id, tenant)) {
      return SessionNotFound(id);
    }
    victim = RemoveLocked(sessions_.find(id));
  }
  // The bytes go back to the budget now, even while a pruner job or a decode step still
  // holds the session.
  return victim->Close();
}

absl::Status SessionStore::AdmitDecode(const std::vector<DecodeInput>& items,
                                       std::string_view tenant,
                                       std::vector<std::shared_ptr<Session>>* sessions,
                                       std::vector<int64_t>* reserved) {
  auto indexed = [&](size_t i, const absl::Status& st) {
    if (items.size() == 1) return st;
    return absl::Status(st.code(), absl::StrCat("items[", i, "]: ", st.message()));
  };
  sessions->clear();
  sessions->reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    absl::StatusOr<std::shared_ptr<Session>> s = Get(items[i].session_id, tenant);
    absl::Status st = s.ok() ? (*s)->CheckDecode(items[i]) : s.status();
    if (!st.ok()) return indexed(i, st);
    sessions->push_back(*std::move(s));
  }
  // Admission: every new token's bytes, all or none.
  reserved->assign(items.size(), 0);
  for (size_t i = 0; i < items.size(); ++i) {
    (*reserved)[i] = (*sessions)[i]->DecodeBytes(items[i]);
    absl::Status st = (*sessions)[i]->Reserve((*reserved)[i]);
    if (!st.ok()) {
      for (size_t j = 0; j < i; ++j) (*sessions)[j]->Unreserve((*reserved)[j]);
      return indexed(i, st);
    }
  }
  return absl::OkStatus();
}

absl::Status SessionStore::DecodeBatch(const std::vector<DecodeInput>& items,
                                       std::vector<DecodeOutput>* outputs,
                                       std::string_view tenant) {
  std::vector<std::shared_ptr<Session>> sessions;
  std::vector<int64_t> reserved;
  SPARSEKV_RETURN_IF_ERROR(AdmitDecode(items, tenant, &sessions, &reserved));
  outputs->resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    absl::Status st = sessions[i]->DecodeReserved(items[i], reserved[i], &(*outputs)[i]);
    if (!st.ok()) {
      for (size_t j = i + 1; j < items.size(); ++j) sessions[j]->Unreserve(reserved[j]);
      return st;
    }
  }
  return absl::OkStatus();
}

void SessionStore::SubmitDecode(std::vector<DecodeInput> items, DecodeDone done,
                                std::string tenant) {
  if (options_.decode_batching) {
    batcher_->Submit(std::move(items), std::move(done), std::move(tenant));
    return;
  }
  std::vector<DecodeOutput> outputs;
  absl::Status st = DecodeBatch(items, &outputs, tenant);
  if (!st.ok()) outputs.clear();
  done(std::move(st), std::move(outputs));
}

int SessionStore::EvictExpired(absl::Time now) {
  std::vector<std::shared_ptr<Session>> victims;
  {
    MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if (it->second->expired(now)) {
        victims.push_back(RemoveLocked(it++));
      } else {
        ++it;
      }
    }
    evicted_total_ += static_cast<int64_t>(victims.size());
  }
  for (const auto& v : victims) v->Close();
  return static_cast<int>(victims.size());
}

absl::StatusOr<FlushResult> SessionStore::Flush(const std::string& id) {
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Get(id));
  return s->Flush();
}

FormStats SessionStore::Forms() const {
  FormStats f;
  for (const std::shared_ptr<Session>& s : All()) {
    const SessionStats st = s->Info().stats;
    f.bytes_dense += st.bytes_dense;
    f.bytes_compressed += st.bytes_compressed;
    f.bytes_accounted += st.bytes_accounted;
    f.bytes_shadow += st.bytes_shadow;
    f.bytes_dense_equivalent += st.bytes_dense_equivalent;
    f.compressed_elements += st.compressed_elements;
    f.kept_k += st.kept_k;
    f.kept_v += st.kept_v;
  }
  return f;
}

StoreStats SessionStore::Stats() const {
  StoreStats s;
  const SessionEnv::Counters& c = *env_.counters;
  s.chunks_compressed_total = c.chunks.load();
  s.tokens_compressed_total = c.tokens.load();
  s.compress_seconds_total = static_cast<double>(c.nanos.load()) * 1e-9;
  s.pruner_rejected_total = c.rejected.load();
  s.prune_failed_total = c.failed.load();
  s.pruner_queued = env_.pruner->queued();
  s.slab_reserved_bytes = static_cast<int64_t>(env_.pools->reserved_bytes());
  s.chunk_compress_seconds = c.chunk_seconds.Snapshot();
  {
    MutexLock lock(&mu_);
    s.sessions = static_cast<int64_t>(sessions_.size());
    s.evicted_total = evicted_total_;
  }
  s.bytes_used = budget_->used();
  return s;
}

}  // namespace sparsekv
