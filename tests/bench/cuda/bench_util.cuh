// Helpers shared by the GPU benchmarks in tests/bench/cuda: flags, medians and the spin kernel
// that keeps host launch latency out of event timings.
#ifndef SPARSEKV_TESTS_BENCH_CUDA_BENCH_UTIL_CUH_
#define SPARSEKV_TESTS_BENCH_CUDA_BENCH_UTIL_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

namespace sparsekv::bench {

// The value of --name VALUE or --name=VALUE, else `fallback`.
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

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Keeps the GPU busy for ~`ns` while the host queues the timed launch behind it, so that the
// events measure GPU time only (not the host's submission latency).
static __global__ void SpinKernel(long long ns) {
  const long long start = clock64();
  const long long cycles = ns * 2;  // ~2 GHz
  while (clock64() - start < cycles) {
  }
}

}  // namespace sparsekv::bench

#endif  // SPARSEKV_TESTS_BENCH_CUDA_BENCH_UTIL_CUH_
