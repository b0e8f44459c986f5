// Turns the oldest dense rows of a layer into a compressed chunk: gathers rows, derives the
// output-aware weights from the scoring statistics (DESIGN.md section 3), and runs the
// kernels' top-k compression per KV head.
//
// Stateless; thread-safe.
#ifndef SPARSEKV_CORE_COMPRESSOR_H_
#define SPARSEKV_CORE_COMPRESSOR_H_

#include <memory>

#include "core/chunk.h"
#include "core/layer_store.h"
#include "core/policy_plan.h"
#include "core/types.h"

namespace sparsekv {

// Compresses `in` into a chunk allocated from `pools`.
//
// Output-aware weights: K per-token ranks by u_j * |K| (u_j = sqrt of the query energy of
// channel j), K and V per-channel by w_t * |x| (w_t = token t's attention mass); V per-token
// output-aware is plain magnitude (w_t is constant within a row). Where the statistic is
// missing (no query seen, or no mass on any token of the chunk) the chunk falls back to
// magnitude and says so through CompressedChunk::k_output_aware()/v_output_aware().
std::shared_ptr<const CompressedChunk> CompressRows(const Layout& layout, const PolicyPlan& plan,
                                                    int layer, const CompressionInput& in,
                                                    SlabPoolSet* pools);

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_COMPRESSOR_H_
