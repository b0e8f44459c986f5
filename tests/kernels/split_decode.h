// Split-KV decode of one KV head for kernel tests: the CPU ComputeBackend's own split planning
// and log-sum-exp merge (what the server runs), over one variant.
#ifndef SPARSEKV_TESTS_KERNELS_SPLIT_DECODE_H_
#define SPARSEKV_TESTS_KERNELS_SPLIT_DECODE_H_

#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "kernels/compute_backend.h"

namespace sparsekv::kernels {

// Writes p.out and p.lse from `variant` split into `splits` row ranges (1 = the caller alone).
inline void SplitDecode(const Backend& variant, const DecodeAttentionParams& p, int splits) {
  ComputeBackendOptions o;
  o.threads = splits - 1;  // one split per thread, the caller included
  o.spin_us = 0;
  o.cpu_variant = &variant;
  o.min_rows_to_split = 0;
  const std::unique_ptr<ComputeBackend> backend = MakeCpuComputeBackend(o);
  ChunkRun run;
  const DecodeBatchItem item = SingleHeadItem(p, &run);
  const KernelStatus st = backend->Decode({&item, 1});
  ASSERT_TRUE(st.ok()) << st.message;
}

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_TESTS_KERNELS_SPLIT_DECODE_H_
