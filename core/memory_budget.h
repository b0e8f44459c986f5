// Byte budget for cached K/V on one memory tier, overall and per tenant.
//
// Thread-safe: all methods may be called concurrently.
#ifndef SPARSEKV_CORE_MEMORY_BUDGET_H_
#define SPARSEKV_CORE_MEMORY_BUDGET_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "core/mutex.h"

namespace sparsekv {

class MemoryBudget {
 public:
  // `limit_bytes` caps all tenants together, `tenant_limit_bytes` each tenant; 0 = unlimited.
  MemoryBudget(int64_t limit_bytes, int64_t tenant_limit_bytes)
      : limit_(limit_bytes), tenant_limit_(tenant_limit_bytes) {}

  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Accounts `bytes` to `tenant`. ResourceExhausted (nothing accounted) when either limit would
  // be exceeded; the message gives the request, the use and the limit.
  absl::Status Reserve(const std::string& tenant, int64_t bytes);
  // Accounts `bytes` without checking the limits: for memory that replaces memory already
  // accounted (a compressed chunk published in place of the dense rows it was built from),
  // so that background pruning never fails on a full budget.
  void Charge(const std::string& tenant, int64_t bytes);
  // Returns bytes accounted by an earlier Reserve or Charge.
  void Release(const std::string& tenant, int64_t bytes);

  int64_t used() const;
  // Bytes released since construction (memory returning to the allocator: the janitor trims
  // the heap after enough of it).
  int64_t released_total() const;
  int64_t tenant_used(const std::string& tenant) const;
  int64_t limit() const { return limit_; }
  int64_t tenant_limit() const { return tenant_limit_; }

 private:
  const int64_t limit_;
  const int64_t tenant_limit_;
  mutable Mutex mu_;
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t released_total_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, int64_t> tenant_used_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_MEMORY_BUDGET_H_
