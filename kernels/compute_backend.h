// The seam between core/ and a device: a ComputeBackend owns every computation on its device
// (batched decode attention with the tail probabilities output-aware scoring needs, and the
// top-k compression of a chunk's sections; the CPU backend also owns its worker threads and
// how a decode batch is split over them). core/ builds a DecodeBatch from session snapshots
// and calls Decode once per batch, and a CompressBatch per chunk; it never sees threads,
// instruction sets or device memory.
//
// The registry (CreateComputeBackend) picks one by name: "auto", "cpu" or "cuda".
//
// Thread-safe: Decode may be called from several threads at once.
#ifndef SPARSEKV_KERNELS_COMPUTE_BACKEND_H_
#define SPARSEKV_KERNELS_COMPUTE_BACKEND_H_

#include <memory>
#include <string>

#include "kernels/compress_batch.h"
#include "kernels/decode_batch.h"
#include "kernels/status.h"

namespace sparsekv::kernels {

class Backend;

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // "cpu" or "cuda".
  virtual const char* name() const = 0;
  // The code path ("portable", "avx2", "avx512", ...).
  virtual std::string variant() const = 0;
  // What the device offers, for the start-up log.
  virtual std::string features() const = 0;
  // Whether DecodeCompute::kFloat16 takes effect (for fp16 caches).
  virtual bool Fp16Arithmetic() const = 0;
  // Whether DecodeCompute::kBFloat16 takes effect (for fp16 and bf16 caches). Not pure, so that
  // backends without reduced arithmetic need not say so.
  virtual bool Bf16Arithmetic() const { return false; }
  // Worker threads a Decode may use besides the caller (0: the caller alone).
  virtual int threads() const = 0;
  // Runs every item of `batch`; returns when all outputs are written. InvalidArgument for an
  // item the backend cannot run (nothing is guaranteed written then).
  virtual KernelStatus Decode(const DecodeBatch& batch) const = 0;
  // Compresses every job of `batch` (exact top-k per vector, ties to the lower index: the
  // same bytes on every backend). The CPU backend runs it on the calling thread (the pruner's,
  // at low priority), never on the decode workers.
  virtual KernelStatus Compress(const CompressBatch& batch) const = 0;
};

struct ComputeBackendOptions {
  std::string name = "auto";  // auto | cpu | cuda
  // CPU: worker threads; -1 = one fewer than the hardware threads (the caller works too).
  int threads = -1;
  // CPU: how long idle workers poll before sleeping (kernels/cpu/thread_pool.h).
  int spin_us = 250;
  // CPU: the instruction-set variant; null = the best this CPU runs (kernels::CpuBackend()).
  const Backend* cpu_variant = nullptr;
  // Below this many cached rows (tokens x KV heads, summed over a batch) a batch runs on the
  // calling thread: splitting costs more than it saves. 2048 rows are ~80 us of one core
  // (D 128, GQA 4); a split over spinning workers costs a few microseconds
  // (tests/bench/RESULTS.md section 5).
  int64_t min_rows_to_split = 2048;
};

// The backend `options.name` asks for. "auto" is the CPU until a CUDA backend that holds
// sessions in GPU memory exists (kernels/cuda has the decode kernels, not yet the device
// memory tier); "cuda" is Unavailable until then, saying so. *why receives one line for the
// start-up log on how the choice was made.
KernelStatus CreateComputeBackend(const ComputeBackendOptions& options,
                                  std::unique_ptr<ComputeBackend>* out, std::string* why);

// The CPU backend over one variant, with its own pool of `options.threads` workers.
std::unique_ptr<ComputeBackend> MakeCpuComputeBackend(const ComputeBackendOptions& options);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_COMPUTE_BACKEND_H_
