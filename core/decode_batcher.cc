#include "core/decode_batcher.h"

#include <chrono>
#include <map>
#include <tuple>
#include <utility>

#include "core/session_store.h"

namespace sparsekv {
namespace {

// Items one backend call can take together: the GPU kernels need one shape per launch, and
// the CPU loses nothing by the grouping (mixed shapes in one batch are rare).
using ShapeKey = std::tuple<int, int, int, int>;

ShapeKey KeyOf(const kernels::DecodeBatchItem& it) {
  return {it.num_kv_heads, it.group, it.head_dim, static_cast<int>(it.dtype)};
}

// Powers of two up to the default max_items (a shadowed step adds a second item, so a full
// batch can pass it: +Inf holds those).
std::vector<double> ItemBounds() {
  std::vector<double> b;
  for (double x = 1; x <= 1024; x *= 2) b.push_back(x);
  return b;
}

}  // namespace

DecodeBatcher::DecodeBatcher(SessionStore* store, DecodeBatcherOptions options)
    : store_(store), options_(options), items_per_batch_(ItemBounds()) {
  dispatcher_ = std::thread([this] { Loop(); });
}

DecodeBatcher::~DecodeBatcher() { Stop(); }

void DecodeBatcher::Stop() {
  {
    MutexLock lock(&mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (dispatcher_.joinable()) dispatcher_.join();
}

void DecodeBatcher::Submit(std::vector<DecodeInput> items, DecodeDone done, std::string tenant) {
  {
    MutexLock lock(&mu_);
    if (!stop_) {
      queued_items_ += static_cast<int64_t>(items.size());
      queue_.push_back({std::move(items), std::move(done), std::move(tenant)});
      pending_.fetch_add(1, std::memory_order_release);
      cv_.notify_one();
      return;
    }
  }
  // Stopped (server shutting down): run it here, alone.
  std::vector<Request> batch;
  batch.push_back({std::move(items), std::move(done), std::move(tenant)});
  Run(&batch);
}

void DecodeBatcher::Loop() {
  std::vector<Request> batch;
  for (;;) {
    // Spin first (see DecodeBatcherOptions::spin), then sleep.
    const auto spin_until =
        std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(options_.spin);
    while (pending_.load(std::memory_order_acquire) == 0 &&
           std::chrono::steady_clock::now() < spin_until) {
    }
    {
      std::unique_lock<std::mutex> lock(mu_.native());
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      if (options_.window > absl::ZeroDuration() && !stop_) {
        const auto until =
            std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(options_.window);
        cv_.wait_until(lock, until, [&] { return stop_ || queued_items_ >= options_.max_items; });
      }
      int64_t items = 0;
      while (!queue_.empty() &&
             (batch.empty() ||
              items + static_cast<int64_t>(queue_.front().items.size()) <= options_.max_items)) {
        items += static_cast<int64_t>(queue_.front().items.size());
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queued_items_ -= items;
      pending_.fetch_sub(static_cast<int64_t>(batch.size()), std::memory_order_release);
    }
    Run(&batch);
    batch.clear();
  }
}

void DecodeBatcher::Run(std::vector<Request>* batch) {
  // Admission and preparation, request by request and item by item in arrival order.
  struct Admitted {
    Request* request;
    std::vector<std::shared_ptr<Session>> sessions;
    std::vector<Session::PreparedDecode> steps;
    absl::Status status;
  };
  std::vector<Admitted> admitted;
  admitted.reserve(batch->size());
  for (Request& r : *batch) {
    Admitted a{&r, {}, {}, absl::OkStatus()};
    std::vector<int64_t> reserved;
    absl::Status st = store_->AdmitDecode(r.items, r.tenant, &a.sessions, &reserved);
    if (!st.ok()) {
      requests_.fetch_add(1);
      r.done(std::move(st), {});
      continue;
    }
    a.steps.reserve(r.items.size());
    for (size_t i = 0; i < r.items.size(); ++i)
      a.steps.push_back(a.sessions[i]->PrepareDecode(r.items[i], reserved[i]));
    admitted.push_back(std::move(a));
  }
  // One backend call per shape.
  std::map<ShapeKey, std::vector<std::pair<Admitted*, kernels::DecodeBatchItem>>> groups;
  for (Admitted& a : admitted)
    for (Session::PreparedDecode& step : a.steps)
      for (const kernels::DecodeBatchItem& item : step.items())
        groups[KeyOf(item)].emplace_back(&a, item);
  std::vector<kernels::DecodeBatchItem> items;
  for (auto& [key, members] : groups) {
    items.clear();
    for (const auto& m : members) items.push_back(m.second);
    const auto t0 = std::chrono::steady_clock::now();
    const kernels::KernelStatus ks =
        store_->backend().Decode({items.data(), static_cast<int>(items.size())});
    backend_nanos_.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
            .count());
    batches_.fetch_add(1);
    items_.fetch_add(static_cast<int64_t>(items.size()));
    items_per_batch_.Observe(static_cast<double>(items.size()));
    if (!ks.ok()) {
      for (const auto& m : members) m.first->status = FromKernelStatus(ks);
    }
  }
  for (Admitted& a : admitted) {
    requests_.fetch_add(1);
    if (!a.status.ok()) {
      a.request->done(std::move(a.status), {});
      continue;
    }
    std::vector<DecodeOutput> outputs(a.steps.size());
    for (size_t i = 0; i < a.steps.size(); ++i)
      a.sessions[i]->FinishDecode(&a.steps[i], &outputs[i]);
    a.request->done(absl::OkStatus(), std::move(outputs));
  }
}

DecodeBatcherStats DecodeBatcher::Stats() const {
  DecodeBatcherStats s;
  s.batches = batches_.load();
  s.items = items_.load();
  s.requests = requests_.load();
  s.backend_seconds = static_cast<double>(backend_nanos_.load()) * 1e-9;
  s.items_per_batch = items_per_batch_.Snapshot();
  return s;
}

}  // namespace sparsekv
