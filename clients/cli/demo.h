// `sparsekv demo`: the first thing a new user runs against a server.
//
// Creates two sessions with the same layout, one dense and one pruned (per-token magnitude,
// --sparsity of K and V, default chunking), uploads the same synthetic K/V to both, flushes
// the pruned one, runs the same decode queries on both, and reports: bytes held dense vs
// pruned (memory saved), achieved sparsity, decode p50 of each and their ratio, the relative
// error of the pruned session's attention output against the dense one's, and which decode
// arithmetic was in force (--decode_compute f16 asks both sessions for fp16). Deletes
// both sessions at the end (also on failure). Starts no server: when none answers it says
// how to start one and exits 3.
//
// The synthetic data is shaped like real K/V rather than white noise: per KV head, keys and
// values are low rank (16 directions with decaying weight) plus noise, keys carry a few
// outlier channels of large magnitude, and queries lie in the keys' subspace, so attention is
// peaked as in a trained model and pruning error is not that of random data.
//
// Thread-safety: call from one thread.
#ifndef SPARSEKV_CLIENTS_CLI_DEMO_H_
#define SPARSEKV_CLIENTS_CLI_DEMO_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "clients/cli/args.h"

namespace sparsekv::cli {

// Synthetic K/V of one layer, float32 [tokens, kv_heads, head_dim] each, and `queries`
// query sets [queries, q_heads, head_dim]. Deterministic in (seed, layer).
struct SyntheticLayer {
  std::vector<float> k;
  std::vector<float> v;
  std::vector<float> q;
};
SyntheticLayer MakeSyntheticLayer(uint64_t seed, uint32_t layer, uint64_t tokens, uint32_t kv_heads,
                                  uint32_t q_heads, uint32_t head_dim, uint32_t queries);

// Mean over rows of ||got_r - want_r|| / ||want_r||, rows of `dim` elements; rows whose
// reference is all zero are skipped. REQUIRES: got.size() == want.size(), a multiple of dim.
double MeanRowRelativeError(const std::vector<float>& got, const std::vector<float>& want,
                            size_t dim);

// The `demo` subcommand.
absl::Status CmdDemo(const Invocation& inv, std::ostream& out, std::ostream& err);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_DEMO_H_
