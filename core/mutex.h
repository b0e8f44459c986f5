// The mutex type of core/: std::mutex with Abseil's thread-safety annotations.
//
// Why not absl::Mutex: Debian ships Abseil uninstrumented, so ThreadSanitizer cannot see its
// lock/unlock and reports every guarded access as a race. std::mutex goes through pthreads,
// which TSan intercepts, so core/ tests run under TSan. Annotations keep GUARDED_BY checkable
// with clang's -Wthread-safety.
#ifndef SPARSEKV_CORE_MUTEX_H_
#define SPARSEKV_CORE_MUTEX_H_

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"

namespace sparsekv {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  // For std::condition_variable waits. REQUIRES: held through a MutexLock.
  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

// Scoped lock, the only way code here takes a Mutex.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_MUTEX_H_
