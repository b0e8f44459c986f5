// The narrow interface through which core/ runs kernels, with one implementation per device.
//
// A Backend is immutable after construction and safe to call from any number of threads.
#ifndef SPARSEKV_KERNELS_BACKEND_H_
#define SPARSEKV_KERNELS_BACKEND_H_

#include <string>

#include "kernels/attention.h"

namespace sparsekv::kernels {

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu" or "cuda".
  virtual const char* name() const = 0;
  // The code path chosen for this machine, for logs and metrics ("scalar", "avx2", ...).
  virtual std::string variant() const = 0;
  // Dense decode attention; see DecodeAttentionParams for the contract.
  virtual void DecodeAttention(const DecodeAttentionParams& p) const = 0;
};

// The CPU backend, its variant chosen once from the running CPU's features.
const Backend& CpuBackend();

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_BACKEND_H_
