// A decode step over one layer snapshot as a kernels::DecodeBatchItem: chunks grouped in runs
// of one format, the dense tail as spans, per KV head. The batcher collects these from many
// sessions and calls the ComputeBackend once; AttendLayer is the one-item form.
//
// Stateless; thread-safe (the snapshot is immutable and must outlive the step).
#ifndef SPARSEKV_CORE_ATTEND_H_
#define SPARSEKV_CORE_ATTEND_H_

#include <vector>

#include "absl/status/status.h"
#include "core/layer_store.h"
#include "core/types.h"
#include "kernels/compute_backend.h"

namespace sparsekv {

struct AttendOptions {
  float scale = 1.0f;
  // Arithmetic of the step. Decode steps pass the session policy's decode_compute; steps that
  // only feed scoring statistics (obs_q) keep kFloat32.
  kernels::DecodeCompute compute = kernels::DecodeCompute::kFloat32;
};

// One step's batch item and the storage its pointers use. Movable (the pointers stay valid:
// they point into the vectors' heap buffers), not copyable.
struct PlannedStep {
  kernels::DecodeBatchItem item;
  std::vector<kernels::ChunkRun> runs;
  std::vector<kernels::ChunkRef> refs;
  std::vector<kernels::DenseSpan> tail;

  PlannedStep() = default;
  PlannedStep(PlannedStep&&) = default;
  PlannedStep& operator=(PlannedStep&&) = default;
  PlannedStep(const PlannedStep&) = delete;
  PlannedStep& operator=(const PlannedStep&) = delete;
};

// Plans attention of q ([num_q_heads, head_dim]) over `snap`, writing out ([num_q_heads,
// head_dim]) and lse ([num_q_heads]) and, when tail_mass is not null, the tail probabilities
// ([num_kv_heads, snap.tail_tokens]; see kernels::DecodeBatchItem::tail_mass).
PlannedStep PlanStep(const Layout& layout, const LayerSnapshot& snap, const float* q,
                     const AttendOptions& options, float* out, float* lse, float* tail_mass);

// The backend's error as an absl::Status (Internal / Unavailable / ... with its message).
absl::Status FromKernelStatus(const kernels::KernelStatus& s);

// PlanStep + one Decode call.
absl::Status AttendLayer(const Layout& layout, const LayerSnapshot& snap, const float* q,
                         const kernels::ComputeBackend& backend, const AttendOptions& options,
                         float* out, float* lse, float* tail_mass = nullptr);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_ATTEND_H_
