// Helpers for core tests: random K/V tensors and a float64 attention reference.
#ifndef SPARSEKV_TESTS_CORE_TEST_UTIL_H_
#define SPARSEKV_TESTS_CORE_TEST_UTIL_H_

#include <cmath>
#include <random>
#include <vector>

#include "core/session.h"
#include "core/session_store.h"
#include "core/types.h"
#include "kernels/compute_backend.h"

namespace sparsekv::testing {

// Owns the data of a float32 TensorView.
struct OwnedTensor {
  std::vector<float> values;
  TensorView view;
};

inline OwnedTensor RandomTensor(std::vector<int64_t> shape, std::mt19937* rng) {
  OwnedTensor t;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::normal_distribution<float> dist(0.0f, 1.0f);
  t.values.resize(n);
  for (float& x : t.values) x = dist(*rng);
  t.view.dtype = DType::kFloat32;
  t.view.shape = std::move(shape);
  t.view.data = t.values.data();
  return t;
}

// Value as stored in `dtype` (rounded), as double.
inline double Stored(DType dtype, float x) {
  uint8_t buf[4];
  kernels::StoreFromFloat(dtype, buf, 0, x);
  return kernels::LoadAsFloat(dtype, buf, 0);
}

// out[h, :] = softmax(q[h] . K[g]^T * scale) V[g], g = h / group, over rows of K/V laid out
// [tokens, kv_heads, head_dim] (float64 throughout).
inline std::vector<double> AttentionReference(const std::vector<double>& q,
                                              const std::vector<double>& k,
                                              const std::vector<double>& v, int q_heads,
                                              int kv_heads, int d, int64_t tokens) {
  std::vector<double> out(static_cast<size_t>(q_heads) * d, 0.0);
  const int group = q_heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int h = 0; h < q_heads; ++h) {
    const int g = h / group;
    std::vector<double> s(tokens);
    double m = -INFINITY;
    for (int64_t t = 0; t < tokens; ++t) {
      double dot = 0;
      for (int j = 0; j < d; ++j) dot += q[h * d + j] * k[(t * kv_heads + g) * d + j];
      s[t] = dot * scale;
      m = std::max(m, s[t]);
    }
    double z = 0;
    for (double x : s) z += std::exp(x - m);
    for (int64_t t = 0; t < tokens; ++t) {
      const double p = std::exp(s[t] - m) / z;
      for (int j = 0; j < d; ++j) out[h * d + j] += p * v[(t * kv_heads + g) * d + j];
    }
  }
  return out;
}

// A session with its own environment (budget, one pruner thread, pools, decode threads);
// `backend` null = kernels::CpuBackend(); `compute`, when given, replaces the CPU
// ComputeBackend made from `backend`.
struct Fixture {
  explicit Fixture(Layout layout, int64_t budget = 0, Policy policy = Policy(),
                   const kernels::Backend* backend = nullptr,
                   std::shared_ptr<const kernels::ComputeBackend> compute = nullptr) {
    env.budget = std::make_shared<MemoryBudget>(budget, 0);
    env.pruner = std::make_shared<BoundedExecutor>(1, 1024);
    env.pools = std::make_shared<SlabPoolSet>();
    kernels::ComputeBackendOptions cpu;
    cpu.threads = 2;
    cpu.cpu_variant = backend;
    env.backend = compute ? std::move(compute) : kernels::MakeCpuComputeBackend(cpu);
    SessionInfo info;
    info.id = "s";
    info.tenant = "t";
    info.layout = layout;
    info.policy = policy;
    info.create_time = absl::Now();
    // What SessionStore::Create reserves before a session exists (the session owns it).
    env.budget->Charge(info.tenant, Session::FixedBytes(info));
    session = std::make_shared<Session>(info, env);
  }
  ~Fixture() {
    session.reset();
    env.pruner->Shutdown();
  }
  SessionEnv env;
  std::shared_ptr<Session> session;
};

// A store for tests: no janitor (no TTL evictions behind the test's back) and no decode
// threads (results independent of the machine's cores).
inline SessionStoreOptions QuietStoreOptions() {
  SessionStoreOptions o;
  o.janitor_period = absl::ZeroDuration();
  o.decode_threads = 0;
  return o;
}

}  // namespace sparsekv::testing

#endif  // SPARSEKV_TESTS_CORE_TEST_UTIL_H_
