// Small helpers shared by the benchmarks: flag parsing, timing, a fast RNG, the machine's
// streaming read bandwidth, and CPU identification.
#ifndef SPARSEKV_TESTS_BENCH_BENCH_UTIL_H_
#define SPARSEKV_TESTS_BENCH_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekv::bench {

// --name=value or --name value; returns fallback when absent.
inline std::string Flag(int argc, char** argv, const std::string& name,
                        const std::string& fallback) {
  const std::string key = "--" + name;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == key && i + 1 < argc) return argv[i + 1];
    if (a.rfind(key + "=", 0) == 0) return a.substr(key.size() + 1);
  }
  return fallback;
}
inline int64_t IntFlag(int argc, char** argv, const std::string& name, int64_t fallback) {
  return std::stoll(Flag(argc, argv, name, std::to_string(fallback)));
}

inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// xorshift64*: fast enough to fill gigabytes.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 1) {}
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
  // Roughly normal(0, 1): the sum of four uniforms, rescaled (Irwin-Hall).
  float Normal() {
    const uint64_t x = Next();
    float sum = 0;
    for (int i = 0; i < 4; ++i) sum += static_cast<float>((x >> (16 * i)) & 0xffff) / 65536.0f;
    return (sum - 2.0f) * 1.7320508f;
  }
};

inline std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

#if defined(__x86_64__)
// kPrefetch adds software prefetches 16 KiB ahead into L2: on the 2-vCPU VM that sum reads
// ~15 GB/s where the hardware prefetchers alone reach ~13.4 (a single core's L1 fill buffers
// limit plain loads), so the better of the two is the fairer "streaming bandwidth" for kernels
// that prefetch.
template <bool kPrefetch>
__attribute__((target("avx2"))) inline double SumAvx2(const float* p, size_t n) {
  constexpr size_t kAhead = 4096;  // floats
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (kPrefetch && i + kAhead + 32 <= n) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead + 16), _MM_HINT_T1);
    }
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  double s = 0;
  for (float x : t) s += x;
  for (; i < n; ++i) s += p[i];
  return s;
}
#endif

inline double SumFloats(const float* p, size_t n, bool prefetch = false) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return prefetch ? SumAvx2<true>(p, n) : SumAvx2<false>(p, n);
#endif
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

// Streaming read bandwidth in GB/s (1e9 bytes/s): a SIMD sum over `bytes` of memory, split
// over `threads` threads (the pool plus the caller), median of `reps` passes; the better of
// the plain sum and the one with software prefetches.
inline double StreamReadGBps(const std::vector<float>& buf, int threads, kernels::ThreadPool* pool,
                             int reps) {
  double best = 0;
  for (bool prefetch : {false, true}) {
    std::vector<double> times;
    volatile double sink = 0;
    const size_t n = buf.size();
    for (int r = 0; r < reps; ++r) {
      std::vector<double> part(threads);
      const double t0 = Now();
      if (threads == 1 || pool == nullptr) {
        part[0] = SumFloats(buf.data(), n, prefetch);
      } else {
        pool->Run(threads, [&](int i) {
          const size_t b = n * i / threads, e = n * (i + 1) / threads;
          part[i] = SumFloats(buf.data() + b, e - b, prefetch);
        });
      }
      times.push_back(Now() - t0);
      for (double x : part) sink = sink + x;
    }
    best = std::max(best, n * sizeof(float) / Median(times) / 1e9);
  }
  return best;
}

}  // namespace sparsekv::bench

#endif  // SPARSEKV_TESTS_BENCH_BENCH_UTIL_H_
