#include "clients/cli/demo.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/cli/bench_histogram.h"
#include "clients/cli/channel.h"
#include "clients/cli/commands.h"
#include "clients/cli/json_writer.h"
#include "clients/cli/npy.h"
#include "clients/cli/tensor_util.h"
#include "clients/cpp/kv_cache_client.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace sparsekv::cli {
namespace {

constexpr uint32_t kRank = 16;            // low-rank directions per KV head
constexpr uint32_t kOutlierChannels = 4;  // per KV head, in K
constexpr int64_t kMessageBytes = (4 << 20) - (64 << 10);

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// splitmix64, with a cheap approximately normal draw (sum of four 16-bit uniforms, scaled to
// unit variance): the demo generates tens of millions of values and needs shape, not tails.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Normal() {
    const uint64_t r = Next();
    const float s =
        static_cast<float>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
    // Sum of 4 U[0, 65536): mean 131070, variance 4 * 65536^2 / 12.
    return (s - 131070.0f) * (1.7320508f / 65536.0f);
  }

 private:
  uint64_t state_;
};

// Deletes the sessions it holds when it goes out of scope.
struct SessionGuard {
  KvCacheClient* client = nullptr;
  std::vector<std::string> ids;
  ~SessionGuard() {
    for (const std::string& id : ids) client->DeleteSession(id).IgnoreError();
  }
};

std::string ToHalfBytes(const std::vector<float>& x) {
  std::string out(x.size() * 2, '\0');
  for (size_t i = 0; i < x.size(); ++i) {
    StoreFromFloat(DType::kFloat16, out.data(), i, x[i]);
  }
  return out;
}

uint64_t HeldBytes(const v1::SessionStats& s) { return s.bytes_dense() + s.bytes_compressed(); }

}  // namespace

SyntheticLayer MakeSyntheticLayer(uint64_t seed, uint32_t layer, uint64_t tokens, uint32_t kv_heads,
                                  uint32_t q_heads, uint32_t head_dim, uint32_t queries) {
  Rng rng(seed * 1000003ull + layer);
  const size_t D = head_dim, H = kv_heads, R = kRank;
  SyntheticLayer out;
  out.k.resize(tokens * H * D);
  out.v.resize(tokens * H * D);
  out.q.resize(static_cast<size_t>(queries) * q_heads * D);
  // Weight of direction r: 1/sqrt(1 + r), so a few directions dominate as in real heads.
  std::vector<float> weight(R);
  for (size_t r = 0; r < R; ++r) weight[r] = 1.0f / std::sqrt(1.0f + static_cast<float>(r));
  const float inv_sqrt_r = 1.0f / std::sqrt(static_cast<float>(R));
  for (size_t g = 0; g < H; ++g) {
    std::vector<float> kb(R * D), vb(R * D);  // bases [R, D]
    for (float& x : kb) x = rng.Normal();
    for (float& x : vb) x = rng.Normal();
    // Outlier channels: a large, mostly constant offset (keys of trained models have them).
    std::vector<float> offset(D, 0.0f);
    // Values share a per-head mean direction (outputs of real heads are not zero-mean).
    std::vector<float> v_mean(D);
    for (float& x : v_mean) x = 0.5f * rng.Normal();
    for (uint32_t i = 0; i < kOutlierChannels && i < D; ++i) {
      offset[rng.Next() % D] = (rng.Next() & 1 ? 1.0f : -1.0f) * (6.0f + 2.0f * rng.Normal());
    }
    std::vector<float> a(R), c(R);
    for (uint64_t t = 0; t < tokens; ++t) {
      for (size_t r = 0; r < R; ++r) a[r] = rng.Normal() * weight[r] * inv_sqrt_r;
      for (size_t r = 0; r < R; ++r) c[r] = rng.Normal() * weight[r] * inv_sqrt_r;
      float* k = &out.k[(t * H + g) * D];
      float* v = &out.v[(t * H + g) * D];
      for (size_t j = 0; j < D; ++j) {
        k[j] = offset[j] * (1.0f + 0.1f * rng.Normal()) + 0.3f * rng.Normal();
        v[j] = v_mean[j] + 0.3f * rng.Normal();
      }
      for (size_t r = 0; r < R; ++r) {
        for (size_t j = 0; j < D; ++j) {
          k[j] += 2.0f * a[r] * kb[r * D + j];
          v[j] += c[r] * vb[r * D + j];
        }
      }
    }
    // Queries of the heads in group g: in the keys' subspace, plus noise; scaled so that the
    // scores' spread is ~2 (attention concentrated on a few hundred of the tokens).
    const size_t group = q_heads / kv_heads;
    for (uint32_t s = 0; s < queries; ++s) {
      for (size_t h = g * group; h < (g + 1) * group; ++h) {
        float* q = &out.q[(static_cast<size_t>(s) * q_heads + h) * D];
        for (size_t j = 0; j < D; ++j) q[j] = 0.3f * rng.Normal();
        for (size_t r = 0; r < R; ++r) {
          const float w = rng.Normal() * weight[r] * inv_sqrt_r;
          for (size_t j = 0; j < D; ++j) q[j] += w * kb[r * D + j];
        }
      }
    }
  }
  return out;
}

double MeanRowRelativeError(const std::vector<float>& got, const std::vector<float>& want,
                            size_t dim) {
  double sum = 0;
  size_t rows = 0;
  for (size_t r = 0; r + dim <= want.size(); r += dim) {
    double num = 0, den = 0;
    for (size_t j = r; j < r + dim; ++j) {
      const double d = static_cast<double>(got[j]) - want[j];
      num += d * d;
      den += static_cast<double>(want[j]) * want[j];
    }
    if (den == 0) continue;
    sum += std::sqrt(num / den);
    ++rows;
  }
  return rows == 0 ? 0.0 : sum / static_cast<double>(rows);
}

absl::Status CmdDemo(const Invocation& inv, std::ostream& out, std::ostream& err) {
  auto flag_or = [&inv](const char* name, auto value, auto fallback) {
    return inv.Has(name) ? value : fallback;
  };
  const uint32_t layers = flag_or("layers", absl::GetFlag(FLAGS_layers), 4u);
  const uint32_t kv_heads = flag_or("kv_heads", absl::GetFlag(FLAGS_kv_heads), 8u);
  const uint32_t q_heads = flag_or("q_heads", absl::GetFlag(FLAGS_q_heads), kv_heads * 4);
  const uint32_t head_dim = flag_or("head_dim", absl::GetFlag(FLAGS_head_dim), 128u);
  const uint64_t tokens = flag_or("context", absl::GetFlag(FLAGS_context), uint64_t{8192});
  const float sparsity = flag_or("sparsity", absl::GetFlag(FLAGS_sparsity), 0.7f);
  const uint32_t steps = absl::GetFlag(FLAGS_steps);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  const bool json = absl::GetFlag(FLAGS_json);
  const absl::StatusOr<v1::DecodeCompute> compute =
      ParseDecodeCompute(absl::GetFlag(FLAGS_decode_compute));
  if (!compute.ok()) {
    return UsageError(absl::StrCat("--decode_compute: ", compute.status().message()));
  }
  if (layers == 0 || kv_heads == 0 || q_heads == 0 || head_dim == 0 || tokens == 0) {
    return UsageError("--layers, --kv_heads, --q_heads, --head_dim and --context must be > 0");
  }
  if (q_heads % kv_heads != 0) return UsageError("--q_heads must be a multiple of --kv_heads");
  if (sparsity <= 0 || sparsity >= 1) return UsageError("--sparsity must be in (0, 1)");
  if (steps == 0) return UsageError("--steps must be positive");

  const std::string server = absl::GetFlag(FLAGS_server);
  SPARSEKV_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheClient> owned,
                            OpenClient(server, absl::GetFlag(FLAGS_timeout)));
  KvCacheClient& client = *owned;
  if (!client.WaitForConnected().ok()) {
    err << "No sparsekv server answers at " << server << ". Start one first, e.g.\n"
        << "  bash deploy/dev/run.sh                      # from the repository root, or\n"
        << "  build/bin/sparsekv-server --listen=127.0.0.1:50051\n"
        << "then run 'sparsekv demo' again (or pass --server=HOST:PORT).\n";
    return WithExitCode(absl::UnavailableError(absl::StrCat("cannot connect to ", server)),
                        kExitUnreachable);
  }
  const int64_t start = NowNs();

  SessionGuard guard;
  guard.client = &client;
  const std::string suffix = absl::StrCat(getpid(), "-", absl::Hex(start & 0xffffff));
  std::string ids[2];  // 0 dense, 1 pruned
  for (int i = 0; i < 2; ++i) {
    v1::CreateSessionRequest req;
    req.set_session_id(absl::StrCat("demo-", i == 0 ? "dense-" : "pruned-", suffix));
    v1::Layout* l = req.mutable_layout();
    l->set_num_layers(layers);
    l->set_num_kv_heads(kv_heads);
    l->set_num_q_heads(q_heads);
    l->set_head_dim(head_dim);
    l->set_dtype(v1::DTYPE_FLOAT16);
    req.mutable_policy()->set_decode_compute(*compute);
    if (i == 1) {
      req.mutable_policy()->mutable_k()->set_sparsity(sparsity);
      req.mutable_policy()->mutable_v()->set_sparsity(sparsity);
    }
    req.set_ttl_seconds(600);
    (*req.mutable_labels())["demo"] = "1";
    SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, client.CreateSession(req));
    ids[i] = s.id();
    guard.ids.push_back(s.id());
  }

  // Upload layer by layer (one layer's data in memory at a time), the same bytes to both.
  const int64_t row_bytes = static_cast<int64_t>(kv_heads) * head_dim * 2;
  std::vector<std::vector<float>> queries(layers);  // [steps, q_heads, head_dim] per layer
  uint64_t upload_bytes = 0;
  int64_t upload_ns = 0, generate_ns = 0;
  for (uint32_t layer = 0; layer < layers; ++layer) {
    const int64_t g0 = NowNs();
    SyntheticLayer data =
        MakeSyntheticLayer(seed, layer, tokens, kv_heads, q_heads, head_dim, steps);
    NpyArray k, v;
    k.dtype = v.dtype = NpyDType::kFloat16;
    k.shape = v.shape = {1, static_cast<int64_t>(tokens), kv_heads, head_dim};
    k.data = ToHalfBytes(data.k);
    v.data = ToHalfBytes(data.v);
    queries[layer] = std::move(data.q);
    generate_ns += NowNs() - g0;
    const std::vector<AppendPiece> pieces =
        PlanAppendPieces(1, static_cast<int64_t>(tokens), row_bytes, kMessageBytes);
    for (const std::string& id : ids) {
      size_t next = 0;
      const int64_t t0 = NowNs();
      SPARSEKV_RETURN_IF_ERROR(client
                                   .AppendKV([&](v1::AppendKVRequest* req) {
                                     if (next == pieces.size()) return false;
                                     const AppendPiece& p = pieces[next++];
                                     req->set_session_id(id);
                                     req->set_layer_begin(layer);
                                     SliceForAppend(k, p, req->mutable_k());
                                     SliceForAppend(v, p, req->mutable_v());
                                     return true;
                                   })
                                   .status());
      upload_ns += NowNs() - t0;
      upload_bytes += k.data.size() + v.data.size();
    }
  }
  const int64_t f0 = NowNs();
  SPARSEKV_ASSIGN_OR_RETURN(v1::FlushResponse flush, client.Flush(ids[1]));
  const int64_t flush_ns = NowNs() - f0;
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session dense, client.GetSession(ids[0]));
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session pruned, client.GetSession(ids[1]));

  // Decode: the same query on both sessions, alternating which goes first.
  LatencyHistogram lat[2];
  double err_sum = 0, err_max = 0;
  uint64_t compared = 0;
  v1::DecodeRequest req[2];
  for (int i = 0; i < 2; ++i) {
    req[i].set_out_dtype(v1::DTYPE_FLOAT32);
    v1::DecodeItem* item = req[i].add_items();
    item->set_session_id(ids[i]);
    item->mutable_q()->set_dtype(v1::DTYPE_FLOAT32);
    item->mutable_q()->add_shape(q_heads);
    item->mutable_q()->add_shape(head_dim);
  }
  const size_t q_elems = static_cast<size_t>(q_heads) * head_dim;
  // Two warm-up rounds over every layer, untimed, then `steps` timed rounds.
  for (int64_t round = -2; round < static_cast<int64_t>(steps); ++round) {
    for (uint32_t layer = 0; layer < layers; ++layer) {
      const size_t s = static_cast<size_t>(round < 0 ? 0 : round);
      std::vector<float> outs[2];
      for (int n = 0; n < 2; ++n) {
        const int i = (round + layer + n) % 2 == 0 ? 0 : 1;
        v1::DecodeItem* item = req[i].mutable_items(0);
        item->set_layer(layer);
        item->mutable_q()->set_data(&queries[layer][s * q_elems], q_elems * sizeof(float));
        const int64_t t0 = NowNs();
        SPARSEKV_ASSIGN_OR_RETURN(v1::DecodeResponse r, client.Decode(req[i]));
        const int64_t ns = NowNs() - t0;
        if (round >= 0) lat[i].Record(ns);
        if (r.results_size() != 1) return absl::InternalError("Decode returned no result");
        SPARSEKV_ASSIGN_OR_RETURN(outs[i], TensorToFloats(r.results(0).out()));
      }
      if (round < 0) continue;
      if (outs[0].size() != outs[1].size() || outs[0].size() != q_elems) {
        return absl::InternalError("Decode outputs have unexpected shapes");
      }
      const double e = MeanRowRelativeError(outs[1], outs[0], head_dim);
      err_sum += e;
      err_max = std::max(err_max, e);
      ++compared;
    }
  }
  const double err_mean = compared == 0 ? 0.0 : err_sum / static_cast<double>(compared);
  const uint64_t bytes_dense = HeldBytes(dense.stats());
  const uint64_t bytes_pruned = HeldBytes(pruned.stats());
  const double saved =
      bytes_dense == 0 ? 0.0
                       : 1.0 - static_cast<double>(bytes_pruned) / static_cast<double>(bytes_dense);
  const double p50_dense = static_cast<double>(lat[0].Percentile(0.5));
  const double p50_pruned = static_cast<double>(lat[1].Percentile(0.5));
  const double speedup = p50_pruned > 0 ? p50_dense / p50_pruned : 0.0;
  // The server echoes the resolved request (FLOAT32 when unspecified) and what it runs.
  const v1::DecodeCompute compute_requested = pruned.policy().decode_compute();
  const v1::DecodeCompute compute_in_force = pruned.stats().decode_compute_in_force();
  const double upload_mbps =
      upload_ns > 0 ? static_cast<double>(upload_bytes) / 1e6 / (upload_ns / 1e9) : 0.0;

  for (const std::string& id : ids) SPARSEKV_RETURN_IF_ERROR(client.DeleteSession(id).status());
  guard.ids.clear();
  const double total_s = (NowNs() - start) / 1e9;

  if (json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("server").String(server);
    w.Key("layers").Uint(layers).Key("kv_heads").Uint(kv_heads).Key("q_heads").Uint(q_heads);
    w.Key("head_dim").Uint(head_dim).Key("tokens").Uint(tokens).Key("dtype").String("float16");
    w.Key("sparsity").Float(sparsity);
    w.Key("decode_compute").String(DecodeComputeName(compute_requested));
    w.Key("decode_compute_in_force").String(DecodeComputeName(compute_in_force));
    w.Key("upload_bytes").Uint(upload_bytes).Key("upload_MBps").Double(upload_mbps);
    w.Key("flush_seconds").Double(flush_ns / 1e9);
    w.Key("tokens_compressed").Uint(flush.tokens_compressed());
    w.Key("bytes_dense_session").Uint(bytes_dense);
    w.Key("bytes_pruned_session").Uint(bytes_pruned);
    w.Key("memory_saved_ratio").Double(saved);
    w.Key("achieved_sparsity_k").Float(pruned.stats().achieved_sparsity_k());
    w.Key("achieved_sparsity_v").Float(pruned.stats().achieved_sparsity_v());
    w.Key("decode_steps").Uint(lat[0].count());
    w.Key("decode_p50_us_dense").Double(p50_dense / 1e3);
    w.Key("decode_p50_us_pruned").Double(p50_pruned / 1e3);
    w.Key("decode_speedup").Double(speedup);
    w.Key("attention_rel_error_mean").Double(err_mean);
    w.Key("attention_rel_error_max").Double(err_max);
    w.Key("seconds").Double(total_s);
    w.EndObject();
    out << w.str() << "\n";
    return absl::OkStatus();
  }
  auto mb = [](uint64_t b) { return absl::StrFormat("%.1f MB", static_cast<double>(b) / 1e6); };
  out << absl::StrFormat(
      "sparsekv demo on %s: a dense and a pruned session, %u layers x %u KV heads (%u query "
      "heads) x head_dim %u, %u tokens, float16\n",
      server, layers, kv_heads, q_heads, head_dim, tokens);
  out << absl::StrFormat(
      "  data: synthetic, per head rank-%u + noise, %u outlier channels in K (seed %u); "
      "generated in %.2fs\n",
      kRank, kOutlierChannels, seed, generate_ns / 1e9);
  out << absl::StrFormat("upload     %s to each session, %.0f MB/s (AppendKV)\n",
                         mb(upload_bytes / 2), upload_mbps);
  out << absl::StrFormat(
      "prune      %.2f of K and V per token (magnitude); the background pruner "
      "ran during upload, flush compressed the last %u token rows in %.2fs\n",
      sparsity, flush.tokens_compressed(), flush_ns / 1e9);
  out << absl::StrFormat("memory     dense %s, pruned %s: %.1f%% saved (%.2fx smaller)\n",
                         mb(bytes_dense), mb(bytes_pruned), 100.0 * saved,
                         bytes_pruned > 0 ? static_cast<double>(bytes_dense) / bytes_pruned : 0.0);
  out << absl::StrFormat(
      "sparsity   achieved K %.3f, V %.3f (the newest %u tokens stay dense)\n",
      pruned.stats().achieved_sparsity_k(), pruned.stats().achieved_sparsity_v(),
      pruned.policy().dense_window() == 0 ? 32u : pruned.policy().dense_window());
  out << absl::StrFormat(
      "compute    decode arithmetic %s in force on both sessions (requested %s)%s\n",
      DecodeComputeName(compute_in_force), DecodeComputeName(compute_requested),
      compute_requested == v1::DECODE_COMPUTE_FLOAT16 && compute_in_force != compute_requested
          ? ": the server's CPU has no AVX512-FP16"
          : "");
  out << absl::StrFormat(
      "decode     p50 dense %s, pruned %s: %.2fx %s (%u steps each, one "
      "layer per step)\n",
      FormatNanos(p50_dense), FormatNanos(p50_pruned),
      speedup >= 1 ? speedup : (speedup > 0 ? 1.0 / speedup : 0.0),
      speedup >= 1 ? "faster" : "slower", lat[0].count());
  out << absl::StrFormat(
      "error      attention output, pruned vs dense: relative error %.4f "
      "(mean over query heads and steps; worst step %.4f)\n",
      err_mean, err_max);
  out << absl::StrFormat("done       in %.1fs; both sessions deleted\n", total_s);
  return absl::OkStatus();
}

}  // namespace sparsekv::cli
