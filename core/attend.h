// Decode attention over one layer snapshot, all KV heads: chunks grouped by format, work
// split over KV heads and chunk ranges on a thread pool, partial states merged by
// log-sum-exp.
//
// Stateless; thread-safe (the snapshot is immutable).
#ifndef SPARSEKV_CORE_ATTEND_H_
#define SPARSEKV_CORE_ATTEND_H_

#include <vector>

#include "core/layer_store.h"
#include "core/types.h"
#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace sparsekv {

struct AttendOptions {
  float scale = 1.0f;
  // Arithmetic of every kernel call of the step. Decode steps pass the session policy's
  // decode_compute; steps that only feed scoring statistics (obs_q) keep kFloat32.
  kernels::DecodeCompute compute = kernels::DecodeCompute::kFloat32;
  kernels::ThreadPool* pool = nullptr;  // null: run on the calling thread
  // Below this many cached rows (tokens x KV heads) the step runs on one thread: splitting
  // costs more than it saves. 2048 rows are ~80 us of one core (D 128, GQA 4); with the pool's
  // spinning workers a split costs a few microseconds (tests/bench/RESULTS.md section 5).
  int64_t min_rows_to_split = 2048;
};

// out: [num_q_heads, head_dim]; lse: [num_q_heads] (always filled). q: [num_q_heads, head_dim].
void AttendLayer(const Layout& layout, const LayerSnapshot& snap, const float* q,
                 const kernels::Backend& backend, const AttendOptions& options, float* out,
                 float* lse);

// mass[h] receives, per tail row of `snap` in order, the probability summed over KV head h's
// query group (see kernels::AccumulateDenseMass), always in fp32 (it ranks elements for
// pruning). mass is resized to [num_kv_heads, snap.tail_tokens].
void TailMass(const Layout& layout, const LayerSnapshot& snap, const float* q, float scale,
              const float* lse, std::vector<float>* mass);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_ATTEND_H_
