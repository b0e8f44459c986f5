// The narrow interface through which core/ runs kernels, with one implementation per device
// and, on the CPU, per instruction-set variant.
//
// A Backend is immutable after construction and safe to call from any number of threads.
#ifndef SPARSEKV_KERNELS_BACKEND_H_
#define SPARSEKV_KERNELS_BACKEND_H_

#include <string>
#include <vector>

#include "kernels/attention.h"

namespace sparsekv::kernels {

class ThreadPool;

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
};

// Partial + finalize: writes p.out and p.lse.
void DecodeAttention(const Backend& backend, const DecodeAttentionParams& p);

// Split-KV form: p's chunks are divided into up to `max_splits` contiguous ranges (the dense
// spans join the last one), the ranges run on `pool` (null = the calling thread) and their
// states merge by log-sum-exp. Writes p.out and p.lse. Results equal DecodeAttention's up to
// float rounding of the merge.
void ParallelDecodeAttention(const Backend& backend, const DecodeAttentionParams& p,
                             ThreadPool* pool, int max_splits);

// The best CPU variant this machine supports (chosen once, on first use).
const Backend& CpuBackend();
// Every CPU variant this machine can run, slowest first; the last is CpuBackend(). For tests
// and benchmarks that compare variants.
std::vector<const Backend*> CpuBackendVariants();

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_BACKEND_H_
