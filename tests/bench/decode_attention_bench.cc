// Decode attention on a DRAM-resident cache: dense fp16 vs the fixed-k bitmap format at
// sparsity 0.5 and 0.7 (per-token K and V), 1 thread and all threads, with the machine's
// streaming read bandwidth measured in the same run. Prints markdown tables.
//
// One "step" is one layer of one decode token: every KV head of the layer attends over its
// whole cache (`group` query heads per KV head). Steps cycle over --layers copies of the cache
// so that each step reads memory the previous steps evicted from the last-level cache (the
// default working set per sparsity exceeds a 260 MiB L3), as a real decode over many layers
// does.
//
// Every configuration runs with fp32 arithmetic and, by default, every reduced arithmetic the
// CPU and dtype allow: fp16 (DecodeCompute::kFloat16: fp16 cache, AVX512-FP16) and bf16 dot
// products (kBFloat16: fp16 or bf16 cache, AVX512_BF16). Each sparse row's speedup is against
// dense with the same arithmetic, then against fp32 dense and against the best dense path of
// the run (the fastest dense row of its thread count).
//
// Flags: --tokens --kv_heads --group --head_dim --iters --layers --chunk --threads --variant
//        (portable|avx2|avx512, default the best this CPU runs) --stream_mib --dtype (f16|bf16)
//        --compute (all|both|f32|f16|bf16; default all; both = f32 and f16)
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/compressed_format.h"
#include "kernels/compute_backend.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/bench/bench_util.h"

namespace sparsekv::bench {
namespace {

using kernels::ChunkRef;
using kernels::DecodeAttentionParams;
using kernels::DType;
using kernels::SectionFormat;
using kernels::SectionKind;

struct Config {
  int64_t tokens, kv_heads, group, head_dim, iters, layers, chunk, threads, stream_mib;
  DType dtype;
  std::string variant;
  std::vector<kernels::DecodeCompute> computes;
};

const char* ComputeName(kernels::DecodeCompute m) {
  switch (m) {
    case kernels::DecodeCompute::kFloat16:
      return "f16";
    case kernels::DecodeCompute::kBFloat16:
      return "bf16";
    default:
      return "f32";
  }
}

// All layers of one sparsity: chunk sections laid out layer-major, head-major, chunk order.
struct Cache {
  double sparsity;
  SectionFormat kf, vf;
  std::vector<std::unique_ptr<uint8_t[]>> layers;  // one buffer per layer
  std::vector<ChunkRef> refs;                      // [layers][kv_heads][chunks]
  size_t bytes_per_layer = 0;                      // K + V, bitmaps + values
};

Cache Build(const Config& c, double sparsity, const std::vector<uint8_t>& k_rows,
            const std::vector<uint8_t>& v_rows) {
  Cache cache;
  cache.sparsity = sparsity;
  cache.kf = kernels::MakeSectionFormat(SectionKind::kPerToken, sparsity, c.head_dim, c.chunk, 32,
                                        c.dtype);
  cache.vf = cache.kf;
  const int64_t chunks = c.tokens / c.chunk;
  const size_t ks = cache.kf.bytes(), vs = cache.vf.bytes();
  cache.bytes_per_layer = static_cast<size_t>(c.kv_heads * chunks) * (ks + vs);
  const size_t row_bytes = c.head_dim * kernels::DTypeSize(c.dtype);
  for (int64_t l = 0; l < c.layers; ++l) {
    cache.layers.emplace_back(new uint8_t[cache.bytes_per_layer]);
    uint8_t* base = cache.layers.back().get();
    if (l == 0) {
      // Source rows are [kv_heads, tokens, head_dim]; compress chunk by chunk.
      uint8_t* out = base;
      for (int64_t h = 0; h < c.kv_heads; ++h) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const size_t off = (h * c.tokens + ch * c.chunk) * row_bytes;
          kernels::CompressSection(cache.kf, k_rows.data() + off, nullptr, nullptr, out);
          out += ks;
          kernels::CompressSection(cache.vf, v_rows.data() + off, nullptr, nullptr, out);
          out += vs;
        }
      }
    } else {
      std::memcpy(base, cache.layers[0].get(), cache.bytes_per_layer);
    }
    uint8_t* p = base;
    for (int64_t i = 0; i < c.kv_heads * chunks; ++i, p += ks + vs) {
      cache.refs.push_back({p, p + ks});
    }
  }
  return cache;
}

// Median seconds per step (one layer, all KV heads: one item of the CPU ComputeBackend, as
// the server runs a decode step).
double TimeSteps(const Config& c, const kernels::ComputeBackend& backend, const Cache& cache,
                 const std::vector<float>& q, kernels::DecodeCompute compute) {
  const int64_t chunks = c.tokens / c.chunk;
  std::vector<float> out(c.kv_heads * c.group * c.head_dim), lse(c.kv_heads * c.group);
  auto step = [&](int64_t layer) {
    kernels::ChunkRun run{cache.kf, cache.vf, cache.refs.data() + layer * c.kv_heads * chunks,
                          static_cast<int>(chunks)};
    kernels::DecodeBatchItem it;
    it.num_kv_heads = static_cast<int>(c.kv_heads);
    it.group = static_cast<int>(c.group);
    it.head_dim = static_cast<int>(c.head_dim);
    it.dtype = c.dtype;
    it.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    it.compute = compute;
    it.q = q.data();
    it.out = out.data();
    it.lse = lse.data();
    it.runs = &run;
    it.num_runs = 1;
    it.tokens = c.tokens;
    if (!backend.Decode({&it, 1}).ok()) std::abort();
  };
  for (int64_t l = 0; l < c.layers; ++l) step(l);  // warm-up: page faults, thread start
  std::vector<double> times;
  for (int64_t i = 0; i < c.iters; ++i) {
    const double t0 = Now();
    step(i % c.layers);
    times.push_back(Now() - t0);
  }
  return Median(times);
}

int Main(int argc, char** argv) {
  Config c;
  c.tokens = IntFlag(argc, argv, "tokens", 65536);
  c.kv_heads = IntFlag(argc, argv, "kv_heads", 8);
  c.group = IntFlag(argc, argv, "group", 4);
  c.head_dim = IntFlag(argc, argv, "head_dim", 128);
  c.iters = IntFlag(argc, argv, "iters", 24);
  c.layers = IntFlag(argc, argv, "layers", 4);
  c.chunk = IntFlag(argc, argv, "chunk", 256);
  c.threads = IntFlag(argc, argv, "threads", std::thread::hardware_concurrency());
  c.stream_mib = IntFlag(argc, argv, "stream_mib", 1024);
  c.dtype = Flag(argc, argv, "dtype", "f16") == "bf16" ? DType::kBFloat16 : DType::kFloat16;
  c.variant = Flag(argc, argv, "variant", "");
  const std::string compute = Flag(argc, argv, "compute", "all");
  const bool f16_ok = c.dtype == DType::kFloat16 && kernels::GetCpuFeatures().avx512_fp16;
  const bool bf16_ok = kernels::GetCpuFeatures().avx512_bf16;
  if (compute == "all" || compute == "both" || compute == "f32") {
    c.computes.push_back(kernels::DecodeCompute::kFloat32);
  }
  if ((compute == "all" || compute == "both" || compute == "f16") && f16_ok) {
    c.computes.push_back(kernels::DecodeCompute::kFloat16);
  }
  if ((compute == "all" || compute == "bf16") && bf16_ok) {
    c.computes.push_back(kernels::DecodeCompute::kBFloat16);
  }
  if (c.computes.empty()) {
    std::fprintf(stderr,
                 "--compute %s: f16 needs an fp16 cache and AVX512-FP16, bf16 needs AVX512_BF16 "
                 "(flag values: all both f32 f16 bf16)\n",
                 compute.c_str());
    return 2;
  }
  c.tokens = std::max<int64_t>(c.chunk, c.tokens / c.chunk * c.chunk);
  c.threads = std::max<int64_t>(1, c.threads);

  const kernels::Backend* backend = &kernels::CpuBackend();
  for (const kernels::Backend* b : kernels::CpuBackendVariants()) {
    if (b->variant() == c.variant) backend = b;
  }
  if (!c.variant.empty() && backend->variant() != c.variant) {
    std::fprintf(stderr, "variant %s not available on this CPU\n", c.variant.c_str());
    return 2;
  }

  std::printf("# decode_attention_bench\n\n");
  std::printf("- %s\n", kernels::CpuFeaturesSummary().c_str());
  std::printf("- cpu model: %s, %u hardware threads\n", CpuModel().c_str(),
              std::thread::hardware_concurrency());
  std::printf(
      "- variant: %s; tokens %lld x kv_heads %lld x head_dim %lld, group %lld, %s, "
      "chunk %lld, layers %lld, iters %lld (median)\n\n",
      backend->variant().c_str(), (long long)c.tokens, (long long)c.kv_heads, (long long)c.head_dim,
      (long long)c.group, kernels::DTypeName(c.dtype), (long long)c.chunk, (long long)c.layers,
      (long long)c.iters);
  std::fflush(stdout);

  // Source rows, [kv_heads, tokens, head_dim] for K and V.
  const size_t elems = static_cast<size_t>(c.kv_heads * c.tokens * c.head_dim);
  std::vector<uint8_t> k_rows(elems * 2), v_rows(elems * 2);
  Rng rng(42);
  for (size_t i = 0; i < elems; ++i) {
    kernels::StoreFromFloat(c.dtype, k_rows.data(), i, rng.Normal());
    kernels::StoreFromFloat(c.dtype, v_rows.data(), i, rng.Normal());
  }
  std::vector<float> q(c.kv_heads * c.group * c.head_dim);
  for (float& x : q) x = rng.Normal();

  std::vector<Cache> caches;
  for (double s : {0.0, 0.5, 0.7}) caches.push_back(Build(c, s, k_rows, v_rows));
  k_rows = {};
  v_rows = {};

  std::unique_ptr<kernels::ThreadPool> pool;  // for the streaming-read baseline
  if (c.threads > 1) pool = std::make_unique<kernels::ThreadPool>(static_cast<int>(c.threads - 1));
  // One thread, and c.threads (the caller + c.threads - 1 workers).
  std::vector<std::unique_ptr<kernels::ComputeBackend>> backends;
  for (int64_t t : {int64_t{1}, c.threads}) {
    kernels::ComputeBackendOptions o;
    o.threads = static_cast<int>(t - 1);
    o.cpu_variant = backend;
    backends.push_back(kernels::MakeCpuComputeBackend(o));
  }
  std::vector<float> stream_buf(static_cast<size_t>(c.stream_mib) << 18, 1.0f);

  // Format bytes (K + V per token per KV head).
  std::printf("## Bytes per token per KV head (K + V, bitmaps + values)\n\n");
  std::printf("| sparsity | k of %lld | bytes/token | vs dense |\n|---|---|---|---|\n",
              (long long)c.head_dim);
  const double dense_bpt =
      static_cast<double>(caches[0].kf.bytes() + caches[0].vf.bytes()) / c.chunk;
  for (const Cache& cache : caches) {
    const double bpt = static_cast<double>(cache.kf.bytes() + cache.vf.bytes()) / c.chunk;
    std::printf("| %.1f | %d | %.1f | %.4f |\n", cache.sparsity, cache.kf.k, bpt, bpt / dense_bpt);
  }
  std::printf("\n## Decode step (one layer: %lld KV heads x %lld tokens)\n\n",
              (long long)c.kv_heads, (long long)c.tokens);
  std::printf(
      "| threads | compute | sparsity | MB read/step | ms/step | GB/s | stream GB/s | of stream | "
      "speedup vs dense | vs f32 dense | vs best dense |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::vector<int> thread_counts = {1};
  if (c.threads > 1) thread_counts.push_back(static_cast<int>(c.threads));
  for (int t : thread_counts) {
    const double stream = StreamReadGBps(stream_buf, t, pool.get(), 5);
    // [compute][cache] seconds; printed once all are timed, so that every row can be set
    // against the best dense path of its thread count.
    std::vector<std::vector<double>> sec(c.computes.size());
    double best_dense = 0;
    for (size_t m = 0; m < c.computes.size(); ++m) {
      for (const Cache& cache : caches) {
        sec[m].push_back(TimeSteps(c, *backends[t == 1 ? 0 : 1], cache, q, c.computes[m]));
        if (cache.sparsity == 0.0 && (best_dense == 0 || sec[m].back() < best_dense)) {
          best_dense = sec[m].back();
        }
      }
    }
    const double f32_dense = sec[0][0];  // computes[0] is fp32 unless --compute f16 or bf16
    for (size_t m = 0; m < c.computes.size(); ++m) {
      for (size_t i = 0; i < caches.size(); ++i) {
        const Cache& cache = caches[i];
        const double gbps = cache.bytes_per_layer / sec[m][i] / 1e9;
        std::printf("| %d | %s | %.1f | %.1f | %.3f | %.2f | %.2f | %.2f | %.2fx | ", t,
                    ComputeName(c.computes[m]), cache.sparsity, cache.bytes_per_layer / 1e6,
                    sec[m][i] * 1e3, gbps, stream, gbps / stream, sec[m][0] / sec[m][i]);
        if (c.computes[0] == kernels::DecodeCompute::kFloat32) {
          std::printf("%.2fx | ", f32_dense / sec[m][i]);
        } else {
          std::printf("- | ");
        }
        std::printf("%.2fx |\n", best_dense / sec[m][i]);
      }
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace sparsekv::bench

int main(int argc, char** argv) { return sparsekv::bench::Main(argc, argv); }
