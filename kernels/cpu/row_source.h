// Turns the cache of one decode call (compressed chunks, then dense spans) into blocks of
// float32 rows, so that a variant can share one loop over rows. Used by the portable variant
// and as the fallback of SIMD variants for formats they do not specialise.
//
// Not thread-safe; one instance per call.
#ifndef SPARSEKV_KERNELS_CPU_ROW_SOURCE_H_
#define SPARSEKV_KERNELS_CPU_ROW_SOURCE_H_

#include <cstdint>
#include <vector>

#include "kernels/attention.h"

namespace sparsekv::kernels {

// Expands one section to float32 rows: out is [fmt.tokens, head_dim], pruned elements 0.
void ExpandSectionToFloat(const SectionFormat& fmt, const uint8_t* in, float* out);

// Online-softmax update of `state` with `rows` tokens whose K and V are float32 rows
// ([rows, head_dim] each). `scores` is scratch of rows * group floats.
void UpdateStateWithFloatRows(const float* q, float scale, const float* k, const float* v, int rows,
                              AttentionState* state, std::vector<float>* scores);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_ROW_SOURCE_H_
