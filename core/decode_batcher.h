// The decode batcher: every Decode and DecodeStream request hands its items here and finishes
// from the completion callback. One dispatcher thread takes what has queued (waiting up to
// `window` after the first request for more), admits each request (lookup, checks, bytes
// reserved: SessionStore::AdmitDecode, all or nothing per request), prepares every step
// (token appended, snapshot planned), calls the backend once per group of items of the same
// shape, and completes the requests. Under load, the requests that arrive while a batch runs
// form the next one, so the steps of many sessions share one backend call (one pass of the
// CPU's worker threads, one GPU launch) with no waiting configured.
//
// Steps of one session and layer in the same batch keep their order: each is prepared (token
// appended, snapshot taken) after the one before it, as sequential calls would.
//
// Thread-safe. Callbacks run on the dispatcher thread (or on Submit's caller when the batcher
// has stopped); they must not block.
#ifndef SPARSEKV_CORE_DECODE_BATCHER_H_
#define SPARSEKV_CORE_DECODE_BATCHER_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/histogram.h"
#include "core/mutex.h"
#include "core/session.h"

namespace sparsekv {

class SessionStore;

struct DecodeBatcherOptions {
  // How long the dispatcher waits after a request arrives for more to join its batch; zero
  // takes what has queued and goes.
  absl::Duration window = absl::ZeroDuration();
  // Items of one batch at most (the rest wait for the next).
  int max_items = 1024;
  // How long the idle dispatcher polls before sleeping on its condition variable. Default 0:
  // on the 2-vCPU VM of tests/bench/decode_batcher_bench.sh a 250 us poll after every batch
  // took the cores the clients and gRPC threads needed (one stream: 0.66x the messages per
  // second of decoding inline; without the poll 1.00x), while the backend's workers keep
  // their own poll (kernels/cpu/thread_pool.h).
  absl::Duration spin = absl::ZeroDuration();
};

struct DecodeBatcherStats {
  int64_t batches = 0;  // backend calls
  // Items they ran: one per decode step, plus one per step of a session with a quality
  // shadow (its dense attention runs in the same call).
  int64_t items = 0;
  int64_t requests = 0;               // requests completed (failed ones included)
  double backend_seconds = 0;         // time inside the backend
  HistogramSnapshot items_per_batch;  // items of each backend call
};

using DecodeDone = std::function<void(absl::Status, std::vector<DecodeOutput>)>;

class DecodeBatcher {
 public:
  // `store` must outlive the batcher.
  DecodeBatcher(SessionStore* store, DecodeBatcherOptions options);
  ~DecodeBatcher();  // Stop()
  DecodeBatcher(const DecodeBatcher&) = delete;
  DecodeBatcher& operator=(const DecodeBatcher&) = delete;

  // Queues one request's items (their tensors must stay valid until `done` runs). `done`
  // receives what SessionStore::DecodeBatch would return, and the outputs on success.
  // `tenant` confines the lookups (SessionStore::Get).
  void Submit(std::vector<DecodeInput> items, DecodeDone done, std::string tenant = {});
  // Runs what is queued, then stops the dispatcher; later Submits run on the caller's thread.
  void Stop();

  DecodeBatcherStats Stats() const;

 private:
  struct Request {
    std::vector<DecodeInput> items;
    DecodeDone done;
    std::string tenant;
  };
  void Loop();
  // Admits, prepares, runs and completes `batch`.
  void Run(std::vector<Request>* batch);

  SessionStore* const store_;
  const DecodeBatcherOptions options_;
  mutable Mutex mu_;
  std::condition_variable cv_;
  std::deque<Request> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_items_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> pending_{0};  // queue_.size(), for polling without mu_
  std::atomic<int64_t> batches_{0}, items_{0}, requests_{0}, backend_nanos_{0};
  Histogram items_per_batch_;
  std::thread dispatcher_;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_DECODE_BATCHER_H_
