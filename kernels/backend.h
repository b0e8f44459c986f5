// One CPU instruction-set variant's decode kernel (portable, AVX2, AVX-512), per KV head.
// The CPU ComputeBackend (kernels/compute_backend.h) runs one of them over its worker threads;
// tests and benchmarks compare the variants directly.
//
// A Backend is immutable after construction and safe to call from any number of threads.
#ifndef SPARSEKV_KERNELS_BACKEND_H_
#define SPARSEKV_KERNELS_BACKEND_H_

#include <string>
#include <vector>

#include "kernels/attention.h"

namespace sparsekv::kernels {

class Backend {
 public:
  virtual ~Backend() = default;
  // "cpu" or "cuda".
  virtual const char* name() const = 0;
  // The code path, for logs and metrics ("portable", "avx2", "avx512", ...).
  virtual std::string variant() const = 0;
  // What the device offers, for the server's start-up log (CPU: the detected instruction set
  // extensions).
  virtual std::string features() const { return {}; }
  // Attention over p's chunks and spans as an online-softmax state: *state is reset to
  // (p.group, p.head_dim) and filled. p.out and p.lse are not touched.
  virtual void DecodeAttentionPartial(const DecodeAttentionParams& p,
                                      AttentionState* state) const = 0;
  // Whether DecodeCompute::kFloat16 takes effect here (for fp16 caches); when false such
  // requests run in fp32.
  virtual bool Fp16Arithmetic() const { return false; }
  // Whether DecodeCompute::kBFloat16 takes effect here (for fp16 and bf16 caches); when false
  // such requests run in fp32.
  virtual bool Bf16Arithmetic() const { return false; }
};

// Partial + finalize: writes p.out and p.lse.
void DecodeAttention(const Backend& backend, const DecodeAttentionParams& p);

// The best CPU variant this machine supports (chosen once, on first use).
const Backend& CpuBackend();
// Every CPU variant this machine can run, slowest first; the last is CpuBackend(). For tests
// and benchmarks that compare variants.
std::vector<const Backend*> CpuBackendVariants();

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_BACKEND_H_
