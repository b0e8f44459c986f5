// Does a large prefill hold back other sessions' decode steps? Session A decodes while
// session B uploads a long prompt (which also keeps the background pruner busy). Prints A's
// decode latency percentiles alone and during B's upload, and their ratio, in one run.
//
// Usage: prefill_interference_bench [--prefill_tokens N] [--context N] [--steps N]
//                                   [--decode_threads N]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/session_store.h"

namespace sparsekv {
namespace {

struct Args {
  int64_t prefill_tokens = 32768;
  int64_t context = 4096;
  int steps = 300;
  int decode_threads = -1;  // SessionStoreOptions::decode_threads
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int64_t v = std::atoll(argv[i + 1]);
    if (k == "--prefill_tokens") {
      a.prefill_tokens = v;
    } else if (k == "--context") {
      a.context = v;
    } else if (k == "--steps") {
      a.steps = static_cast<int>(v);
    } else if (k == "--decode_threads") {
      a.decode_threads = static_cast<int>(v);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      std::exit(2);
    }
  }
  return a;
}

constexpr int kKv = 8, kQ = 32, kDim = 128, kLayers = 4;

std::vector<float> Random(size_t n, std::mt19937* rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(*rng);
  return v;
}

TensorView View(const std::vector<float>& v, std::vector<int64_t> shape) {
  TensorView t;
  t.dtype = DType::kFloat32;
  t.shape = std::move(shape);
  t.data = v.data();
  return t;
}

CreateSessionParams Params(const std::string& id) {
  CreateSessionParams p;
  p.id = id;
  p.layout = Layout{kLayers, kKv, kQ, kDim, DType::kFloat16};
  p.policy.k.sparsity = 0.7f;
  p.policy.v.sparsity = 0.7f;
  return p;
}

void Append(Session* s, int64_t tokens, std::mt19937* rng) {
  // Like an AppendKV stream: one message per layer and 1024 tokens.
  for (int64_t t0 = 0; t0 < tokens; t0 += 1024) {
    const int64_t n = std::min<int64_t>(1024, tokens - t0);
    const std::vector<float> k = Random(n * kKv * kDim, rng);
    for (int layer = 0; layer < kLayers; ++layer) {
      if (!s->Append(layer, View(k, {1, n, kKv, kDim}), View(k, {1, n, kKv, kDim}), TensorView{})
               .ok()) {
        std::fprintf(stderr, "append failed\n");
        std::exit(1);
      }
    }
  }
}

// Decode latencies (microseconds) of `steps` steps over all layers.
std::vector<double> DecodeSteps(Session* s, int steps, std::mt19937* rng,
                                const std::atomic<bool>* stop_early) {
  const std::vector<float> q = Random(kQ * kDim, rng);
  std::vector<double> us;
  for (int i = 0; i < steps && !(stop_early && stop_early->load()); ++i) {
    for (int layer = 0; layer < kLayers; ++layer) {
      DecodeInput in;
      in.layer = layer;
      in.q = View(q, {kQ, kDim});
      DecodeOutput out;
      const auto t0 = std::chrono::steady_clock::now();
      if (!s->Decode(in, &out).ok()) std::exit(1);
      us.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  return us;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

int Main(int argc, char** argv) {
  const Args a = Parse(argc, argv);
  SessionStoreOptions o;
  o.janitor_period = absl::ZeroDuration();
  o.decode_threads = a.decode_threads;
  SessionStore store(o);
  std::mt19937 rng(1);
  auto a_info = store.Create(Params("a"));
  auto b_info = store.Create(Params("b"));
  if (!a_info.ok() || !b_info.ok()) return 1;
  std::shared_ptr<Session> sa = *store.Get("a");
  std::shared_ptr<Session> sb = *store.Get("b");
  Append(sa.get(), a.context, &rng);
  sa->Flush();

  const std::vector<double> alone = DecodeSteps(sa.get(), a.steps, &rng, nullptr);

  std::atomic<bool> done{false};
  const auto t0 = std::chrono::steady_clock::now();
  std::thread prefill([&] {
    std::mt19937 r(2);
    Append(sb.get(), a.prefill_tokens, &r);
    done = true;
  });
  const std::vector<double> during = DecodeSteps(sa.get(), 1 << 30, &rng, &done);
  prefill.join();
  const double upload_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Let the pruner finish B's backlog, to report how long compression lagged the upload.
  while (store.Stats().pruner_queued > 0 || sb->Info().stats.pruning_backlog_tokens > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const double drained_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::printf(
      "Session A: %d layers x %d KV heads x D %d, GQA %d, fp16, K/V sparsity 0.7, "
      "context %lld tokens, decode_threads %d. Session B uploads %lld tokens x %d layers.\n\n",
      kLayers, kKv, kDim, kQ / kKv, static_cast<long long>(a.context), a.decode_threads,
      static_cast<long long>(a.prefill_tokens), kLayers);
  std::printf("| A's decode step (one layer) | samples | p50 us | p99 us | max us |\n");
  std::printf("|---|---|---|---|---|\n");
  std::printf("| alone | %zu | %.0f | %.0f | %.0f |\n", alone.size(), Percentile(alone, 0.5),
              Percentile(alone, 0.99), Percentile(alone, 1.0));
  std::printf("| during B's upload | %zu | %.0f | %.0f | %.0f |\n", during.size(),
              Percentile(during, 0.5), Percentile(during, 0.99), Percentile(during, 1.0));
  std::printf(
      "\nratio during/alone: p50 %.2fx, p99 %.2fx. B's upload took %.2f s (%.0f MB/s of "
      "fp32 K+V); its background compression finished %.2f s after the start.\n",
      Percentile(during, 0.5) / Percentile(alone, 0.5),
      Percentile(during, 0.99) / Percentile(alone, 0.99), upload_s,
      2.0 * a.prefill_tokens * kLayers * kKv * kDim * 4 / upload_s / 1e6, drained_s);
  return 0;
}

}  // namespace
}  // namespace sparsekv

int main(int argc, char** argv) { return sparsekv::Main(argc, argv); }
