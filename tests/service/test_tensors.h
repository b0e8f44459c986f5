// Random float32 proto tensors for service tests.
#ifndef SPARSEKV_TESTS_SERVICE_TEST_TENSORS_H_
#define SPARSEKV_TESTS_SERVICE_TEST_TENSORS_H_

#include <cstdint>
#include <random>
#include <vector>

#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::service {

// A [shape] float32 tensor of N(0, 1) values; `keep`, when given, receives them.
inline v1::Tensor F32(std::vector<int64_t> shape, std::mt19937* rng,
                      std::vector<float>* keep = nullptr) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  t.mutable_data()->assign(reinterpret_cast<const char*>(v.data()), n * 4);
  if (keep) *keep = v;
  return t;
}

}  // namespace sparsekv::service

#endif  // SPARSEKV_TESTS_SERVICE_TEST_TENSORS_H_
