#include "clients/cli/bench.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "clients/cli/channel.h"
#include "clients/cli/commands.h"
#include "clients/cli/json_writer.h"
#include "clients/cli/table.h"
#include "clients/cli/tensor_util.h"
#include "clients/cpp/kv_cache_client.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/grpcpp.h"

namespace sparsekv::cli {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double ProcessSelfCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

std::string CodeName(const absl::Status& s) { return absl::StatusCodeToString(s.code()); }

// Stops the main phase after a number of requests or a duration, whichever the options name.
class Budget {
 public:
  Budget(uint64_t requests, absl::Duration duration)
      : requests_(requests),
        start_ns_(NowNs()),
        end_ns_(start_ns_ + absl::ToInt64Nanoseconds(duration)) {}

  // Whether one more request may start.
  bool Claim() {
    if (stop_.load(std::memory_order_relaxed)) return false;
    if (requests_ > 0) return claimed_.fetch_add(1, std::memory_order_relaxed) < requests_;
    return NowNs() < end_ns_;
  }
  void Stop() { stop_.store(true); }
  void Done() { done_.fetch_add(1, std::memory_order_relaxed); }
  uint64_t done() const { return done_.load(std::memory_order_relaxed); }
  double elapsed_s() const { return 1e-9 * static_cast<double>(NowNs() - start_ns_); }
  double Fraction() const {
    if (requests_ > 0) return static_cast<double>(done()) / static_cast<double>(requests_);
    return 1e-9 * static_cast<double>(NowNs() - start_ns_) /
           std::max(1e-9, 1e-9 * static_cast<double>(end_ns_ - start_ns_));
  }

 private:
  const uint64_t requests_;
  const int64_t start_ns_, end_ns_;
  std::atomic<uint64_t> claimed_{0};
  std::atomic<uint64_t> done_{0};
  std::atomic<bool> stop_{false};
};

// Redraws a progress line every 200 ms while alive.
class ProgressBar {
 public:
  ProgressBar(bool enabled, const Budget* budget, std::ostream& out)
      : enabled_(enabled), budget_(budget), out_(out) {
    if (enabled_) thread_ = std::thread([this] { Loop(); });
  }
  ~ProgressBar() {
    if (!enabled_) return;
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    thread_.join();
    out_ << ProgressLine(1.0, budget_->done(), budget_->elapsed_s()) << "\n" << std::flush;
  }

 private:
  void Loop() {
    absl::MutexLock l(&mu_);
    while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Milliseconds(200))) {
      out_ << ProgressLine(budget_->Fraction(), budget_->done(), budget_->elapsed_s())
           << std::flush;
    }
  }

  const bool enabled_;
  const Budget* budget_;
  std::ostream& out_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Runs fn(worker) on n threads and waits for them.
template <typename Fn>
void RunWorkers(uint32_t n, Fn fn) {
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (uint32_t w = 0; w < n; ++w) threads.emplace_back([&fn, w] { fn(w); });
  for (std::thread& t : threads) t.join();
}

// Everything the workloads share: clients, payloads, the sessions created so far.
class Bench {
 public:
  explicit Bench(const BenchOptions& o) : o_(o) {
    const uint32_t channels = o.channels == 0 ? std::max<uint32_t>(1, o.concurrency) : o.channels;
    for (uint32_t i = 0; i < channels; ++i) {
      // A connection each (else --channels would not add connections). RunBench opened one
      // with the same flags first, so this cannot fail.
      clients_.push_back(
          NewClient(*OpenChannel(o.server, /*own_connection=*/true), o.timeout, o.server));
    }
    id_prefix_ = absl::StrCat("bench-", o.workload, "-", getpid(), "-",
                              absl::Hex(std::random_device{}() & 0xffff), "-");
    const uint64_t row = static_cast<uint64_t>(o.kv_heads) * o.head_dim;
    elem_ = WireDTypeSize(o.dtype);
    row_bytes_ = static_cast<int64_t>(row * elem_);
    // One payload serves every message: content does not change the work (bench, not eval).
    const int64_t max_rows =
        std::max<int64_t>(1, std::min<int64_t>(o.message_bytes / (2 * row_bytes_),
                                               static_cast<int64_t>(o.context) * o.layers));
    payload_ = RandomBytes(static_cast<size_t>(max_rows) * row, o.seed);
    new_kv_ = RandomBytes(row, o.seed + 1);
    q_.set_dtype(v1::DTYPE_FLOAT32);
    q_.add_shape(o.q_heads);
    q_.add_shape(o.head_dim);
    std::mt19937 rng(static_cast<uint32_t>(o.seed + 2));
    std::normal_distribution<float> normal;
    std::vector<float> q(static_cast<size_t>(o.q_heads) * o.head_dim);
    for (float& x : q) x = normal(rng);
    q_.set_data(q.data(), q.size() * sizeof(float));
  }

  ~Bench() { DeleteAll(nullptr); }

  KvCacheClient& client(uint32_t worker) { return *clients_[worker % clients_.size()]; }

  absl::Status Connect() { return WithExitCode(clients_[0]->WaitForConnected(), kExitUnreachable); }

  // Creates a session with the bench layout; records it for deletion.
  absl::StatusOr<std::string> Create(uint32_t worker, float sparsity, BenchPhase* phase) {
    v1::CreateSessionRequest req;
    req.set_session_id(absl::StrCat(id_prefix_, next_id_.fetch_add(1)));
    v1::Layout* l = req.mutable_layout();
    l->set_num_layers(o_.layers);
    l->set_num_kv_heads(o_.kv_heads);
    l->set_num_q_heads(o_.q_heads);
    l->set_head_dim(o_.head_dim);
    l->set_dtype(o_.dtype);
    req.mutable_policy()->mutable_k()->set_sparsity(sparsity);
    req.mutable_policy()->mutable_v()->set_sparsity(sparsity);
    req.mutable_policy()->set_decode_compute(o_.decode_compute);
    req.set_ttl_seconds(3600);
    (*req.mutable_labels())["bench"] = o_.workload;
    const int64_t t0 = NowNs();
    absl::StatusOr<v1::Session> s = client(worker).CreateSession(req);
    Record(phase, s.status(), NowNs() - t0, 0);
    if (!s.ok()) return s.status();
    absl::MutexLock l2(&mu_);
    live_.insert(s->id());
    in_force_ = s->stats().decode_compute_in_force();
    return s->id();
  }

  // Uploads `tokens` tokens to every layer of `id` on one AppendKV stream.
  absl::Status Upload(uint32_t worker, const std::string& id, uint64_t tokens, BenchPhase* phase) {
    const std::vector<AppendPiece> pieces =
        PlanAppendPieces(o_.layers, static_cast<int64_t>(tokens), row_bytes_, o_.message_bytes);
    size_t next = 0;
    uint64_t bytes = 0;
    const int64_t t0 = NowNs();
    absl::StatusOr<v1::AppendKVResponse> r = client(worker).AppendKV([&](v1::AppendKVRequest* req) {
      if (next == pieces.size()) return false;
      const AppendPiece& p = pieces[next++];
      req->set_session_id(id);
      req->set_layer_begin(static_cast<uint32_t>(p.layer_begin));
      const size_t n = static_cast<size_t>(p.layer_count * p.tokens * row_bytes_);
      for (v1::Tensor* t : {req->mutable_k(), req->mutable_v()}) {
        t->set_dtype(o_.dtype);
        for (int64_t d : {p.layer_count, p.tokens, static_cast<int64_t>(o_.kv_heads),
                          static_cast<int64_t>(o_.head_dim)}) {
          t->add_shape(d);
        }
        t->set_data(payload_.data(), std::min(n, payload_.size()));
      }
      bytes += 2 * n;
      return true;
    });
    Record(phase, r.status(), NowNs() - t0, bytes);
    return r.status();
  }

  absl::Status Flush(uint32_t worker, const std::string& id, BenchPhase* phase) {
    const int64_t t0 = NowNs();
    absl::StatusOr<v1::FlushResponse> r = client(worker).Flush(id);
    Record(phase, r.status(), NowNs() - t0, 0);
    return r.status();
  }

  void Delete(uint32_t worker, const std::string& id, BenchPhase* phase) {
    const int64_t t0 = NowNs();
    absl::StatusOr<v1::DeleteSessionResponse> r = client(worker).DeleteSession(id);
    Record(phase, r.status(), NowNs() - t0, 0);
    absl::MutexLock l(&mu_);
    live_.erase(id);
  }

  // Deletes every session still alive, `concurrency` at a time.
  void DeleteAll(BenchPhase* phase) {
    std::vector<std::string> ids;
    {
      absl::MutexLock l(&mu_);
      ids.assign(live_.begin(), live_.end());
    }
    if (ids.empty()) return;
    std::vector<BenchPhase> parts(o_.concurrency);
    std::atomic<size_t> next{0};
    RunWorkers(o_.concurrency, [&](uint32_t w) {
      for (size_t i; (i = next.fetch_add(1)) < ids.size();) Delete(w, ids[i], &parts[w]);
    });
    if (phase != nullptr) {
      for (const BenchPhase& p : parts) phase->Merge(p);
    }
  }

  // A decode request for one item on `id`/`layer`, with a new token when options.append.
  void FillDecode(const std::string& id, uint32_t layer, v1::DecodeRequest* req) const {
    req->set_out_dtype(v1::DTYPE_FLOAT32);
    v1::DecodeItem* item = req->items_size() > 0 ? req->mutable_items(0) : req->add_items();
    item->set_session_id(id);
    item->set_layer(layer);
    if (!item->has_q()) *item->mutable_q() = q_;
    if (o_.append && !item->has_new_k()) {
      for (v1::Tensor* t : {item->mutable_new_k(), item->mutable_new_v()}) {
        t->set_dtype(o_.dtype);
        t->add_shape(o_.kv_heads);
        t->add_shape(o_.head_dim);
        t->set_data(new_kv_);
      }
    }
  }

  static void Record(BenchPhase* phase, const absl::Status& s, int64_t ns, uint64_t bytes) {
    if (phase == nullptr) return;
    ++phase->requests;
    if (s.ok()) {
      phase->latency.Record(ns);
      phase->bytes += bytes;
    } else {
      ++phase->errors[CodeName(s)];
    }
  }

  const BenchOptions& options() const { return o_; }

  // As the last session created reported it (UNSPECIFIED before the first).
  v1::DecodeCompute decode_compute_in_force() {
    absl::MutexLock l(&mu_);
    return in_force_;
  }

 private:
  // `n` elements of the storage dtype, standard normal.
  std::string RandomBytes(size_t n, uint64_t seed) const {
    std::mt19937 rng(static_cast<uint32_t>(seed));
    std::normal_distribution<float> normal;
    const DType kd = o_.dtype == v1::DTYPE_FLOAT32    ? DType::kFloat32
                     : o_.dtype == v1::DTYPE_BFLOAT16 ? DType::kBFloat16
                                                      : DType::kFloat16;
    std::string out(n * elem_, '\0');
    for (size_t i = 0; i < n; ++i) StoreFromFloat(kd, out.data(), i, normal(rng));
    return out;
  }

  const BenchOptions o_;
  std::vector<std::unique_ptr<KvCacheClient>> clients_;
  std::string id_prefix_;
  std::atomic<uint64_t> next_id_{0};
  size_t elem_ = 2;
  int64_t row_bytes_ = 0;
  std::string payload_;
  std::string new_kv_;
  v1::Tensor q_;
  absl::Mutex mu_;
  std::set<std::string> live_ ABSL_GUARDED_BY(mu_);
  v1::DecodeCompute in_force_ ABSL_GUARDED_BY(mu_) = v1::DECODE_COMPUTE_UNSPECIFIED;
};

BenchPhase Merged(const std::string& name, const std::vector<BenchPhase>& parts, double seconds) {
  BenchPhase out;
  out.name = name;
  for (const BenchPhase& p : parts) out.Merge(p);
  out.seconds = seconds;
  return out;
}

// Creates options.sessions sessions, uploads options.context tokens to each and flushes
// them when pruned; adds phases create, append (and flush) to the report.
absl::StatusOr<std::vector<std::string>> Setup(Bench& b, float sparsity, BenchReport* report) {
  const BenchOptions& o = b.options();
  const uint32_t n = o.concurrency;
  std::vector<BenchPhase> create(n), append(n), flush(n);
  std::vector<std::string> ids(o.sessions);
  std::vector<absl::Status> errors(n);
  const int64_t t0 = NowNs();
  RunWorkers(n, [&](uint32_t w) {
    for (uint32_t i = w; i < o.sessions; i += n) {
      absl::StatusOr<std::string> id = b.Create(w, sparsity, &create[w]);
      if (!id.ok()) {
        errors[w] = id.status();
        return;
      }
      ids[i] = *id;
    }
  });
  const int64_t t1 = NowNs();
  for (const absl::Status& s : errors) SPARSEKV_RETURN_IF_ERROR(s);
  if (o.context > 0) {
    RunWorkers(n, [&](uint32_t w) {
      for (uint32_t i = w; i < o.sessions && errors[w].ok(); i += n) {
        errors[w] = b.Upload(w, ids[i], o.context, &append[w]);
      }
    });
  }
  const int64_t t2 = NowNs();
  for (const absl::Status& s : errors) SPARSEKV_RETURN_IF_ERROR(s);
  report->phases.push_back(Merged("create", create, 1e-9 * static_cast<double>(t1 - t0)));
  if (o.context > 0) {
    report->phases.push_back(Merged("append", append, 1e-9 * static_cast<double>(t2 - t1)));
  }
  if (sparsity > 0 && o.context > 0) {
    RunWorkers(n, [&](uint32_t w) {
      for (uint32_t i = w; i < o.sessions && errors[w].ok(); i += n) {
        errors[w] = b.Flush(w, ids[i], &flush[w]);
      }
    });
    for (const absl::Status& s : errors) SPARSEKV_RETURN_IF_ERROR(s);
    report->phases.push_back(Merged("flush", flush, 1e-9 * static_cast<double>(NowNs() - t2)));
  }
  return ids;
}

// Unary decode steps over `ids`, layers round robin; worker w starts at session w.
void UnaryDecodeLoop(Bench& b, const std::vector<std::string>& ids, uint32_t w, Budget& budget,
                     BenchPhase* phase) {
  const BenchOptions& o = b.options();
  v1::DecodeRequest req;
  uint64_t i = 0;
  while (budget.Claim()) {
    const uint64_t step = i++;
    const std::string& id = ids[(w + step * o.concurrency) % ids.size()];
    b.FillDecode(id, static_cast<uint32_t>(step % o.layers), &req);
    const int64_t t0 = NowNs();
    absl::StatusOr<v1::DecodeResponse> r = b.client(w).Decode(req);
    Bench::Record(phase, r.status(), NowNs() - t0, 0);
    budget.Done();
  }
}

// One DecodeStream with up to options.inflight requests outstanding: this thread sends, a
// second one receives and times each response against its request's send time.
void StreamDecodeLoop(Bench& b, const std::vector<std::string>& ids, uint32_t w, Budget& budget,
                      BenchPhase* phase) {
  const BenchOptions& o = b.options();
  const uint32_t window = std::max<uint32_t>(1, o.inflight);
  const absl::Duration life = o.requests > 0 ? absl::Hours(24) : o.duration + absl::Minutes(5);
  std::unique_ptr<DecodeStream> stream = b.client(w).OpenDecodeStream(life);
  std::vector<std::atomic<int64_t>> sent_ns(window);
  absl::Mutex mu;
  uint32_t outstanding = 0;  // guarded by mu
  bool broken = false;       // guarded by mu
  std::thread receiver([&] {
    v1::DecodeResponse resp;
    while (stream->Recv(&resp)) {
      const int64_t now = NowNs();
      const int64_t t0 = sent_ns[resp.request_id() % window].load(std::memory_order_acquire);
      if (resp.error_code() != 0) {
        ++phase->requests;
        ++phase->errors[absl::StatusCodeToString(static_cast<absl::StatusCode>(resp.error_code()))];
      } else {
        Bench::Record(phase, absl::OkStatus(), now - t0, 0);
      }
      budget.Done();
      absl::MutexLock l(&mu);
      --outstanding;
    }
    absl::MutexLock l(&mu);
    broken = true;
  });
  auto can_send = [&]() { return broken || outstanding < window; };
  v1::DecodeRequest req;
  for (uint64_t step = 0;; ++step) {
    {
      absl::MutexLock l(&mu);
      mu.Await(absl::Condition(&can_send));
      if (broken) break;
      ++outstanding;
    }
    bool sent = false;
    if (budget.Claim()) {
      b.FillDecode(ids[(w + step * o.concurrency) % ids.size()],
                   static_cast<uint32_t>(step % o.layers), &req);
      req.set_request_id(step);
      sent_ns[step % window].store(NowNs(), std::memory_order_release);
      sent = stream->Send(req);
    }
    if (!sent) {
      absl::MutexLock l(&mu);
      --outstanding;
      break;
    }
  }
  stream->WritesDone();
  receiver.join();
  const absl::Status st = stream->Finish();
  // Requests the stream never answered (it broke) count as errors with its final status.
  absl::MutexLock l(&mu);
  if (outstanding > 0) {
    phase->requests += outstanding;
    phase->errors[st.ok() ? "UNKNOWN" : CodeName(st)] += outstanding;
  } else if (!st.ok()) {
    ++phase->errors[CodeName(st)];
  }
}

// The main phase, timed and with CPU accounting; fn(worker, budget, phase) runs on every
// worker.
template <typename Fn>
void RunMain(Bench& b, const std::string& name, uint32_t workers, Fn fn, BenchReport* report,
             std::ostream& progress_out) {
  const BenchOptions& o = b.options();
  std::vector<BenchPhase> parts(workers);
  Budget budget(o.requests, o.duration);
  absl::StatusOr<double> server0 =
      o.server_pid > 0 ? ProcessCpuSeconds(o.server_pid) : absl::NotFoundError("");
  const double client0 = ProcessSelfCpuSeconds();
  const int64_t t0 = NowNs();
  {
    ProgressBar bar(o.progress, &budget, progress_out);
    RunWorkers(workers, [&](uint32_t w) { fn(w, budget, &parts[w]); });
  }
  const double seconds = 1e-9 * static_cast<double>(NowNs() - t0);
  report->client_cpu_seconds = ProcessSelfCpuSeconds() - client0;
  if (server0.ok()) {
    absl::StatusOr<double> server1 = ProcessCpuSeconds(o.server_pid);
    if (server1.ok()) report->server_cpu_seconds = *server1 - *server0;
  }
  report->main_phase = static_cast<int>(report->phases.size());
  report->phases.push_back(Merged(name, parts, seconds));
}

absl::Status RunPrefill(Bench& b, BenchReport* report, std::ostream& progress_out) {
  const BenchOptions& o = b.options();
  std::vector<BenchPhase> create(o.concurrency), del(o.concurrency);
  RunMain(
      b, "append", o.concurrency,
      [&](uint32_t w, Budget& budget, BenchPhase* phase) {
        while (budget.Claim()) {
          absl::StatusOr<std::string> id = b.Create(w, o.sparsity, &create[w]);
          if (id.ok()) {
            b.Upload(w, *id, o.context, phase).IgnoreError();
            b.Delete(w, *id, &del[w]);
          } else {
            Bench::Record(phase, id.status(), 0, 0);
          }
          budget.Done();
        }
      },
      report, progress_out);
  const double s = report->phases.back().seconds;
  report->phases.insert(report->phases.begin() + report->main_phase, Merged("create", create, s));
  ++report->main_phase;
  report->phases.push_back(Merged("delete", del, s));
  // Bytes over the time spent inside AppendKV calls: the rate of one stream, which the
  // throughput over wall time (create and delete included) understates.
  const BenchPhase& m = report->main();
  const double busy_s = m.latency.mean_ns() * static_cast<double>(m.latency.count()) / 1e9;
  if (busy_s > 0) {
    report->extras.emplace_back("per_stream_MBps", static_cast<double>(m.bytes) / 1e6 / busy_s);
  }
  return absl::OkStatus();
}

absl::Status RunDecode(Bench& b, bool stream, BenchReport* report, std::ostream& progress_out) {
  const BenchOptions& o = b.options();
  SPARSEKV_ASSIGN_OR_RETURN(std::vector<std::string> ids, Setup(b, o.sparsity, report));
  RunMain(
      b, stream ? "decode_stream" : "decode", o.concurrency,
      [&](uint32_t w, Budget& budget, BenchPhase* phase) {
        if (stream) {
          StreamDecodeLoop(b, ids, w, budget, phase);
        } else {
          UnaryDecodeLoop(b, ids, w, budget, phase);
        }
      },
      report, progress_out);
  return absl::OkStatus();
}

// Decode steps that append (unary) on pruned sessions, beside one thread that keeps
// uploading pruned sessions and deleting them.
absl::Status RunMixed(Bench& b, BenchReport* report, std::ostream& progress_out) {
  const BenchOptions& o = b.options();
  SPARSEKV_ASSIGN_OR_RETURN(std::vector<std::string> ids, Setup(b, o.sparsity, report));
  BenchPhase background;
  std::atomic<bool> decode_done{false};
  const uint32_t bg = o.concurrency;  // the last worker uploads
  RunMain(
      b, "decode", o.concurrency + 1,
      [&](uint32_t w, Budget& budget, BenchPhase* phase) {
        if (w != bg) {
          UnaryDecodeLoop(b, ids, w, budget, phase);
          return;
        }
        // Not counted against the budget: it runs until the decoders finish.
        BenchPhase create_delete;
        while (!decode_done.load()) {
          absl::StatusOr<std::string> id = b.Create(w, o.sparsity, &create_delete);
          if (!id.ok()) break;
          b.Upload(w, *id, o.context, &background).IgnoreError();
          b.Delete(w, *id, &create_delete);
          if (budget.Fraction() >= 1.0) break;
        }
      },
      report, progress_out);
  decode_done = true;
  background.name = "background_append";
  background.seconds = report->main().seconds;
  report->phases.push_back(background);
  // How far the pruner got on the decode sessions.
  uint64_t chunks = 0, backlog = 0;
  double sk = 0;
  int n = 0;
  for (const std::string& id : ids) {
    absl::StatusOr<v1::Session> s = b.client(0).GetSession(id);
    if (!s.ok()) continue;
    chunks += s->stats().chunks();
    backlog += s->stats().pruning_backlog_tokens();
    sk += s->stats().achieved_sparsity_k();
    ++n;
  }
  report->extras.emplace_back("decode_sessions_chunks", static_cast<double>(chunks));
  report->extras.emplace_back("decode_sessions_backlog_tokens", static_cast<double>(backlog));
  if (n > 0) report->extras.emplace_back("decode_sessions_achieved_sparsity_k", sk / n);
  return absl::OkStatus();
}

void WriteLatencyJson(const LatencyHistogram& h, JsonWriter& w) {
  auto us = [](int64_t ns) { return static_cast<double>(ns) / 1e3; };
  w.BeginObject();
  w.Key("min").Double(us(h.min_ns()));
  w.Key("mean").Double(h.mean_ns() / 1e3);
  w.Key("p50").Double(us(h.Percentile(0.50)));
  w.Key("p90").Double(us(h.Percentile(0.90)));
  w.Key("p99").Double(us(h.Percentile(0.99)));
  w.Key("p999").Double(us(h.Percentile(0.999)));
  w.Key("max").Double(us(h.max_ns()));
  w.EndObject();
}

double Rate(double n, double seconds) { return seconds > 0 ? n / seconds : 0.0; }

void WritePhaseJson(const BenchPhase& p, JsonWriter& w) {
  w.BeginObject();
  w.Key("name").String(p.name);
  w.Key("requests").Uint(p.requests);
  w.Key("error_count").Uint(p.error_count());
  w.Key("errors").BeginObject();
  for (const auto& [code, n] : p.errors) w.Key(code).Uint(n);
  w.EndObject();
  w.Key("seconds").Double(p.seconds);
  w.Key("throughput_rps").Double(Rate(static_cast<double>(p.requests), p.seconds));
  w.Key("bytes").Uint(p.bytes);
  w.Key("throughput_MBps").Double(Rate(static_cast<double>(p.bytes) / 1e6, p.seconds));
  w.Key("latency_us");
  WriteLatencyJson(p.latency, w);
  w.EndObject();
}

std::string ShapeText(const BenchOptions& o) {
  return absl::StrFormat(
      "%u layers x %u kv_heads (%u q_heads) x head_dim %u, %s, context %u, sparsity %.2f, "
      "%u sessions, concurrency %u%s",
      o.layers, o.kv_heads, o.q_heads, o.head_dim, WireDTypeName(o.dtype), o.context, o.sparsity,
      o.sessions, o.concurrency,
      o.workload == "decode_stream" ? absl::StrCat(", inflight ", o.inflight) : "");
}

}  // namespace

uint64_t BenchPhase::error_count() const {
  uint64_t n = 0;
  for (const auto& [code, c] : errors) n += c;
  return n;
}

void BenchPhase::Merge(const BenchPhase& other) {
  requests += other.requests;
  bytes += other.bytes;
  for (const auto& [code, n] : other.errors) errors[code] += n;
  latency.Merge(other.latency);
}

absl::StatusOr<double> ParseProcStatCpuSeconds(const std::string& stat, double ticks_per_second) {
  // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return absl::InvalidArgumentError("no ')' in stat");
  std::vector<std::string> f = absl::StrSplit(stat.substr(paren + 1), ' ', absl::SkipEmpty());
  // f[0] is field 3 (state); utime and stime are fields 14 and 15.
  if (f.size() < 13) return absl::InvalidArgumentError("stat has too few fields");
  char* end = nullptr;
  const double utime = std::strtod(f[11].c_str(), &end);
  const double stime = std::strtod(f[12].c_str(), &end);
  return (utime + stime) / ticks_per_second;
}

absl::StatusOr<double> ProcessCpuSeconds(int pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read /proc/", pid, "/stat"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseProcStatCpuSeconds(ss.str(), static_cast<double>(sysconf(_SC_CLK_TCK)));
}

absl::StatusOr<BenchOptions> BenchOptionsFromFlags(const Invocation& inv) {
  BenchOptions o;
  o.server = absl::GetFlag(FLAGS_server);
  o.timeout = absl::GetFlag(FLAGS_timeout);
  o.workload = absl::GetFlag(FLAGS_workload);
  if (o.workload != "prefill" && o.workload != "decode" && o.workload != "decode_stream" &&
      o.workload != "mixed" && o.workload != "sessions") {
    return UsageError(absl::StrCat("--workload: unknown workload '", o.workload,
                                   "' (prefill, decode, decode_stream, mixed or sessions)"));
  }
  auto flag_or = [&inv](const char* name, auto value, auto fallback) {
    return inv.Has(name) ? value : fallback;
  };
  o.sessions =
      flag_or("sessions", absl::GetFlag(FLAGS_sessions), o.workload == "sessions" ? 1000u : 4u);
  o.layers = flag_or("layers", absl::GetFlag(FLAGS_layers), 1u);
  o.kv_heads = flag_or("kv_heads", absl::GetFlag(FLAGS_kv_heads), 8u);
  o.q_heads = flag_or("q_heads", absl::GetFlag(FLAGS_q_heads), o.kv_heads * 4);
  o.head_dim = flag_or("head_dim", absl::GetFlag(FLAGS_head_dim), 128u);
  absl::StatusOr<v1::DType> dtype = ParseWireDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return UsageError(absl::StrCat("--dtype: ", dtype.status().message()));
  o.dtype = *dtype;
  o.context = flag_or("context", absl::GetFlag(FLAGS_context),
                      o.workload == "sessions" ? uint64_t{256} : uint64_t{4096});
  o.sparsity =
      flag_or("sparsity", absl::GetFlag(FLAGS_sparsity), o.workload == "mixed" ? 0.7f : 0.0f);
  absl::StatusOr<v1::DecodeCompute> compute =
      ParseDecodeCompute(absl::GetFlag(FLAGS_decode_compute));
  if (!compute.ok()) {
    return UsageError(absl::StrCat("--decode_compute: ", compute.status().message()));
  }
  o.decode_compute = *compute;
  o.duration = absl::GetFlag(FLAGS_duration);
  o.requests = absl::GetFlag(FLAGS_requests);
  o.concurrency = absl::GetFlag(FLAGS_concurrency);
  o.inflight = absl::GetFlag(FLAGS_inflight);
  o.channels = absl::GetFlag(FLAGS_channels);
  o.append = o.workload == "mixed" || absl::GetFlag(FLAGS_append);
  o.message_bytes = absl::GetFlag(FLAGS_message_bytes);
  o.server_pid = absl::GetFlag(FLAGS_server_pid);
  o.seed = absl::GetFlag(FLAGS_seed);
  if (o.layers == 0 || o.kv_heads == 0 || o.q_heads == 0 || o.head_dim == 0) {
    return UsageError("--layers, --kv_heads, --q_heads and --head_dim must be positive");
  }
  if (o.q_heads % o.kv_heads != 0) return UsageError("--q_heads must be a multiple of --kv_heads");
  if (o.sessions == 0) return UsageError("--sessions must be positive");
  if (o.sparsity < 0 || o.sparsity >= 1) return UsageError("--sparsity must be in [0, 1)");
  if (o.concurrency == 0 || o.concurrency > 1024) return UsageError("--concurrency: 1..1024");
  if (o.inflight == 0 || o.inflight > 4096) return UsageError("--inflight: 1..4096");
  if (o.message_bytes <= 0) return UsageError("--message_bytes must be positive");
  if (o.requests == 0 && o.duration <= absl::ZeroDuration()) {
    return UsageError("--duration must be positive (or give --requests)");
  }
  if (o.workload == "prefill" && o.context == 0) return UsageError("prefill needs --context > 0");
  if (inv.Has("server_pid") && o.server_pid <= 0) return UsageError("--server_pid must be > 0");
  return o;
}

absl::StatusOr<BenchReport> RunBench(const BenchOptions& options, std::ostream& progress_out) {
  BenchReport report;
  report.options = options;
  SPARSEKV_RETURN_IF_ERROR(OpenChannel(options.server).status());  // TLS flags usable
  Bench b(options);
  SPARSEKV_RETURN_IF_ERROR(b.Connect());
  absl::StatusOr<v1::ServerInfo> info = b.client(0).GetServerInfo();
  if (info.ok()) report.kernel_variant = info->kernel_variant();
  absl::Status st;
  const std::string& wl = options.workload;
  if (wl == "prefill") {
    st = RunPrefill(b, &report, progress_out);
  } else if (wl == "decode" || wl == "sessions") {
    st = RunDecode(b, false, &report, progress_out);
  } else if (wl == "decode_stream") {
    st = RunDecode(b, true, &report, progress_out);
  } else {
    st = RunMixed(b, &report, progress_out);
  }
  report.decode_compute_in_force = b.decode_compute_in_force();
  BenchPhase del;
  const int64_t t0 = NowNs();
  b.DeleteAll(&del);
  if (del.requests > 0) {
    del.name = "delete";
    del.seconds = 1e-9 * static_cast<double>(NowNs() - t0);
    report.phases.push_back(del);
  }
  SPARSEKV_RETURN_IF_ERROR(st);
  return report;
}

std::string BenchReportText(const BenchReport& r) {
  const BenchOptions& o = r.options;
  const BenchPhase& m = r.main();
  std::string out;
  absl::StrAppend(&out, "workload    ", o.workload, "  (", ShapeText(o), ")\n");
  absl::StrAppend(&out, "server      ", o.server, "  kernel ", r.kernel_variant,
                  "  decode_compute ", DecodeComputeName(o.decode_compute), " (in force ",
                  DecodeComputeName(r.decode_compute_in_force), ")\n");
  std::vector<std::string> errs;
  for (const auto& [code, n] : m.errors) errs.push_back(absl::StrCat(code, "=", n));
  absl::StrAppend(
      &out, absl::StrFormat("requests    %u in %.2fs  (%u errors%s)\n", m.requests, m.seconds,
                            m.error_count(),
                            errs.empty() ? "" : absl::StrCat(": ", absl::StrJoin(errs, " "))));
  absl::StrAppend(&out, absl::StrFormat("throughput  %.0f req/s", Rate(m.requests, m.seconds)));
  if (m.bytes > 0) {
    absl::StrAppend(&out,
                    absl::StrFormat("  %.1f MB/s (K+V payload)", Rate(m.bytes / 1e6, m.seconds)));
  }
  out += "\n";
  const LatencyHistogram& h = m.latency;
  absl::StrAppend(&out, "latency     p50 ", FormatNanos(h.Percentile(0.5)), "  p90 ",
                  FormatNanos(h.Percentile(0.9)), "  p99 ", FormatNanos(h.Percentile(0.99)),
                  "  p99.9 ", FormatNanos(h.Percentile(0.999)), "  max ", FormatNanos(h.max_ns()),
                  "  mean ", FormatNanos(h.mean_ns()), "\n");
  absl::StrAppend(&out, "histogram   (", m.name, ", log-spaced)\n", RenderHistogram(h));
  absl::StrAppend(&out,
                  absl::StrFormat("client cpu  %.2fs = %.2f cores over the main phase\n",
                                  r.client_cpu_seconds, Rate(r.client_cpu_seconds, m.seconds)));
  if (r.server_cpu_seconds >= 0) {
    absl::StrAppend(
        &out,
        absl::StrFormat("server cpu  %.2fs = %.2f cores (pid %d): %s req/s per server "
                        "core\n",
                        r.server_cpu_seconds, Rate(r.server_cpu_seconds, m.seconds), o.server_pid,
                        r.server_cpu_seconds > 0
                            ? absl::StrFormat("%.0f", Rate(m.requests, r.server_cpu_seconds))
                            : std::string("n/a (run too short)")));
  } else {
    out += "server cpu  unknown (pass --server_pid=PID of a local server)\n";
  }
  for (const auto& [k, v] : r.extras)
    absl::StrAppend(&out, k, "  ", absl::StrFormat("%.6g", v), "\n");
  out += "\nphases\n";
  Table t({"PHASE", "REQUESTS", "ERRORS", "SECONDS", "REQ/S", "MB/S", "P50", "P99", "MAX"});
  for (const BenchPhase& p : r.phases) {
    t.AddRow({p.name, absl::StrCat(p.requests), absl::StrCat(p.error_count()),
              absl::StrFormat("%.2f", p.seconds),
              absl::StrFormat("%.0f", Rate(p.requests, p.seconds)),
              p.bytes > 0 ? absl::StrFormat("%.1f", Rate(p.bytes / 1e6, p.seconds)) : "-",
              FormatNanos(p.latency.Percentile(0.5)), FormatNanos(p.latency.Percentile(0.99)),
              FormatNanos(p.latency.max_ns())});
  }
  out += t.Render();
  return out;
}

std::string BenchReportJson(const BenchReport& r) {
  const BenchOptions& o = r.options;
  const BenchPhase& m = r.main();
  JsonWriter w;
  w.BeginObject();
  w.Key("workload").String(o.workload);
  w.Key("server").String(o.server);
  w.Key("kernel_variant").String(r.kernel_variant);
  w.Key("decode_compute_in_force").String(DecodeComputeName(r.decode_compute_in_force));
  w.Key("options").BeginObject();
  w.Key("sessions").Uint(o.sessions).Key("layers").Uint(o.layers);
  w.Key("kv_heads").Uint(o.kv_heads).Key("q_heads").Uint(o.q_heads);
  w.Key("head_dim").Uint(o.head_dim).Key("dtype").String(WireDTypeName(o.dtype));
  w.Key("context").Uint(o.context).Key("sparsity").Float(o.sparsity);
  w.Key("decode_compute").String(DecodeComputeName(o.decode_compute));
  w.Key("duration_s").Double(absl::ToDoubleSeconds(o.duration));
  w.Key("requests").Uint(o.requests).Key("concurrency").Uint(o.concurrency);
  w.Key("inflight").Uint(o.inflight).Key("channels").Uint(o.channels);
  w.Key("append").Bool(o.append).Key("message_bytes").Int(o.message_bytes);
  w.EndObject();
  w.Key("main_phase").String(m.name);
  w.Key("requests").Uint(m.requests);
  w.Key("error_count").Uint(m.error_count());
  w.Key("errors").BeginObject();
  for (const auto& [code, n] : m.errors) w.Key(code).Uint(n);
  w.EndObject();
  w.Key("seconds").Double(m.seconds);
  w.Key("throughput_rps").Double(Rate(m.requests, m.seconds));
  w.Key("bytes").Uint(m.bytes);
  w.Key("throughput_MBps").Double(Rate(m.bytes / 1e6, m.seconds));
  w.Key("latency_us");
  WriteLatencyJson(m.latency, w);
  w.Key("histogram").BeginArray();
  for (const HistogramRow& row : HistogramRows(m.latency)) {
    w.BeginObject().Key("lower_us").Double(row.lower_ns / 1e3);
    w.Key("upper_us").Double(row.upper_ns / 1e3).Key("count").Uint(row.count).EndObject();
  }
  w.EndArray();
  w.Key("client_cpu_s").Double(r.client_cpu_seconds);
  w.Key("client_cores").Double(Rate(r.client_cpu_seconds, m.seconds));
  if (r.server_cpu_seconds >= 0) {
    w.Key("server_pid").Int(o.server_pid);
    w.Key("server_cpu_s").Double(r.server_cpu_seconds);
    w.Key("server_cores").Double(Rate(r.server_cpu_seconds, m.seconds));
    // null when the run was shorter than the 10 ms resolution of /proc's CPU times.
    w.Key("requests_per_server_core_s");
    if (r.server_cpu_seconds > 0) {
      w.Double(Rate(m.requests, r.server_cpu_seconds));
    } else {
      w.Null();
    }
  }
  w.Key("extras").BeginObject();
  for (const auto& [k, v] : r.extras) w.Key(k).Double(v);
  w.EndObject();
  w.Key("phases").BeginArray();
  for (const BenchPhase& p : r.phases) WritePhaseJson(p, w);
  w.EndArray();
  w.EndObject();
  return w.str();
}

absl::Status CmdBench(const Invocation& inv, std::ostream& out, std::ostream& err) {
  SPARSEKV_ASSIGN_OR_RETURN(BenchOptions o, BenchOptionsFromFlags(inv));
  const bool json = absl::GetFlag(FLAGS_json);
  o.progress = !json && isatty(STDERR_FILENO) == 1;
  SPARSEKV_ASSIGN_OR_RETURN(BenchReport r, RunBench(o, err));
  out << (json ? BenchReportJson(r) + "\n" : BenchReportText(r));
  return absl::OkStatus();
}

}  // namespace sparsekv::cli
