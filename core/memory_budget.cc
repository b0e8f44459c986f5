#include "core/memory_budget.h"

#include "absl/strings/str_cat.h"

namespace sparsekv {

absl::Status MemoryBudget::Reserve(const std::string& tenant, int64_t bytes) {
  MutexLock lock(&mu_);
  if (limit_ > 0 && used_ + bytes > limit_) {
    return absl::ResourceExhaustedError(absl::StrCat("host memory budget exceeded: request needs ",
                                                     bytes, " bytes, ", used_, " of ", limit_,
                                                     " bytes in use (--host_budget_bytes)"));
  }
  int64_t& t = tenant_used_[tenant];
  if (tenant_limit_ > 0 && t + bytes > tenant_limit_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant, "\" memory budget exceeded: request needs ", bytes, " bytes, ", t,
        " of ", tenant_limit_, " bytes in use (--tenant_budget_bytes)"));
  }
  used_ += bytes;
  t += bytes;
  return absl::OkStatus();
}

void MemoryBudget::Charge(const std::string& tenant, int64_t bytes) {
  MutexLock lock(&mu_);
  used_ += bytes;
  tenant_used_[tenant] += bytes;
}

void MemoryBudget::Release(const std::string& tenant, int64_t bytes) {
  MutexLock lock(&mu_);
  used_ -= bytes;
  released_total_ += bytes;
  auto it = tenant_used_.find(tenant);
  if (it != tenant_used_.end()) {
    it->second -= bytes;
    if (it->second == 0) tenant_used_.erase(it);
  }
}

int64_t MemoryBudget::used() const {
  MutexLock lock(&mu_);
  return used_;
}

int64_t MemoryBudget::released_total() const {
  MutexLock lock(&mu_);
  return released_total_;
}

int64_t MemoryBudget::tenant_used(const std::string& tenant) const {
  MutexLock lock(&mu_);
  auto it = tenant_used_.find(tenant);
  return it == tenant_used_.end() ? 0 : it->second;
}

}  // namespace sparsekv
