// Turns the oldest dense rows of a layer into a compressed chunk: gathers rows, derives the
// output-aware weights from the scoring statistics (DESIGN.md section 3), and runs the
// backend's top-k compression over every KV head's sections.
//
// Stateless; thread-safe.
#ifndef SPARSEKV_CORE_COMPRESSOR_H_
#define SPARSEKV_CORE_COMPRESSOR_H_

#include <memory>

#include "core/chunk.h"
#include "core/layer_store.h"
#include "core/policy_plan.h"
#include "core/types.h"
#include "kernels/compute_backend.h"

namespace sparsekv {

// Compresses `in` into a chunk allocated from `pools`, all its sections in one
// ComputeBackend::Compress call (`backend` null: the CPU on the calling thread). Returns null
// when the backend fails (nothing is published then; the rows stay dense).
//
// Output-aware weights: K per-token ranks by u_j * |K| (u_j = sqrt of the query energy of
// channel j), K and V per-channel by w_t * |x| (w_t = token t's attention mass); V per-token
// output-aware is plain magnitude (w_t is constant within a row). Where the statistic is
// missing (no query seen, or no mass on any token of the chunk) the chunk falls back to
// magnitude and says so through CompressedChunk::k_output_aware()/v_output_aware().
std::shared_ptr<const CompressedChunk> CompressRows(
    const Layout& layout, const PolicyPlan& plan, int layer, const CompressionInput& in,
    SlabPoolSet* pools, const kernels::ComputeBackend* backend = nullptr);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_COMPRESSOR_H_
