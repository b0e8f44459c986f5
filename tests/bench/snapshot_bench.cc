// How fast sessions go to a snapshot directory and come back, against memcpy of the same bytes
// in the same run; and whether a checkpoint holds back decode steps (the session lock is held
// only for references and statistics, the bytes are copied and written outside it).
//
// Fills `--sessions` sessions of `--tokens` tokens (fp16, 8 KV heads, head_dim 128, 70%
// per-token pruning, flushed), then prints one markdown table: serialize, write (temp file,
// fsync, rename, directory fsync), restore (read, parse, import), memcpy, and the decode step
// p50 / max while idle and while a write of every session runs.
//
// Usage: snapshot_bench [--sessions N] [--tokens N] [--layers N] [--dir DIR] [--steps N]
#include <stdlib.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/snapshot.h"
#include "core/snapshot_dir.h"
#include "tests/bench/bench_util.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::QuietStoreOptions;

void Fill(SessionStore* store, const std::string& id, int layers, int64_t tokens) {
  CreateSessionParams p;
  p.id = id;
  p.layout = Layout{layers, 8, 32, 128, DType::kFloat16};
  p.policy.k.sparsity = p.policy.v.sparsity = 0.7f;
  if (!store->Create(p).ok()) std::abort();
  std::shared_ptr<Session> s = *store->Get(id);
  bench::Rng rng(std::hash<std::string>()(id));
  const int64_t step = 512;  // tokens per append
  std::vector<float> k(static_cast<size_t>(layers) * step * 8 * 128), v(k.size());
  for (int64_t done = 0; done < tokens; done += step) {
    for (float& x : k) x = static_cast<float>(rng.Next() % 2001) / 1000.0f - 1.0f;
    for (float& x : v) x = static_cast<float>(rng.Next() % 2001) / 1000.0f - 1.0f;
    TensorView kv{DType::kFloat32, {layers, step, 8, 128}, k.data()};
    TensorView vv{DType::kFloat32, {layers, step, 8, 128}, v.data()};
    if (!s->Append(0, kv, vv, TensorView()).ok()) std::abort();
  }
  s->Flush();
}

// Decode steps on `s` until `stop`; returns each step's seconds.
std::vector<double> DecodeUntil(Session* s, const std::atomic<bool>& stop, int min_steps) {
  std::vector<float> q(32 * 128, 0.01f);
  DecodeInput in;
  in.q = TensorView{DType::kFloat32, {32, 128}, q.data()};
  std::vector<double> t;
  while (!stop.load() || static_cast<int>(t.size()) < min_steps) {
    DecodeOutput out;
    const double start = bench::Now();
    if (!s->Decode(in, &out).ok()) std::abort();
    t.push_back(bench::Now() - start);
  }
  return t;
}

double Max(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

int Main(int argc, char** argv) {
  const int sessions = static_cast<int>(bench::IntFlag(argc, argv, "sessions", 4));
  const int64_t tokens = bench::IntFlag(argc, argv, "tokens", 8192);
  const int layers = static_cast<int>(bench::IntFlag(argc, argv, "layers", 8));
  const int steps = static_cast<int>(bench::IntFlag(argc, argv, "steps", 50));
  std::string dir = bench::Flag(argc, argv, "dir", "");
  std::string tmpl =
      (std::filesystem::temp_directory_path() / "sparsekv-snapbench-XXXXXX").string();
  const bool own_dir = dir.empty();
  if (own_dir) {
    if (mkdtemp(tmpl.data()) == nullptr) return 1;
    dir = tmpl;
  }

  SessionStore store(QuietStoreOptions());
  for (int i = 0; i < sessions; ++i) Fill(&store, "s" + std::to_string(i), layers, tokens);
  std::shared_ptr<Session> probe = *store.Get("s0");

  // Serialize only (Export + SerializeSnapshot), and memcpy of the same bytes.
  double start = bench::Now();
  std::vector<std::string> images;
  for (const auto& s : store.All()) images.push_back(SerializeSnapshot(s->Export()));
  const double serialize_s = bench::Now() - start;
  int64_t bytes = 0;
  for (const auto& b : images) bytes += static_cast<int64_t>(b.size());
  std::vector<std::string> copies(images.size());
  for (size_t i = 0; i < images.size(); ++i) copies[i].resize(images[i].size());
  std::vector<double> memcpy_s;
  for (int r = 0; r < 5; ++r) {
    start = bench::Now();
    for (size_t i = 0; i < images.size(); ++i) {
      std::memcpy(copies[i].data(), images[i].data(), images[i].size());
    }
    memcpy_s.push_back(bench::Now() - start);
  }

  // Decode alone, then during a full write.
  std::atomic<bool> stop{true};
  const std::vector<double> idle = DecodeUntil(probe.get(), stop, steps);
  SnapshotDir snaps(dir);
  stop = false;
  std::vector<double> during;
  std::thread decoder([&] { during = DecodeUntil(probe.get(), stop, steps); });
  const WriteReport w = snaps.Write(store);
  stop = true;
  decoder.join();
  if (w.failed != 0 || w.written != sessions) {
    std::fprintf(stderr, "write failed: %s\n", w.ToString().c_str());
    return 1;
  }

  SessionStore back(QuietStoreOptions());
  start = bench::Now();
  const RestoreReport r = SnapshotDir(dir).Restore(&back);
  const double restore_s = bench::Now() - start;
  if (r.restored != sessions) {
    std::fprintf(stderr, "restore failed: %s\n", r.ToString().c_str());
    return 1;
  }
  if (own_dir) std::filesystem::remove_all(dir);

  const double gb = static_cast<double>(bytes) / 1e9;
  std::printf(
      "snapshot_bench: %d sessions x %d layers x %lld tokens, 8 KV heads, D 128, fp16, "
      "70%% per-token; %.1f MB of snapshots; %s\n\n",
      sessions, layers, static_cast<long long>(tokens), bytes / 1e6, bench::CpuModel().c_str());
  std::printf("| step | seconds | GB/s |\n|---|---|---|\n");
  std::printf("| memcpy of the snapshot bytes (median of 5) | %.4f | %.2f |\n",
              bench::Median(memcpy_s), gb / bench::Median(memcpy_s));
  std::printf("| Export + SerializeSnapshot | %.4f | %.2f |\n", serialize_s, gb / serialize_s);
  std::printf("| SnapshotDir::Write (serialize, write, fsync, rename) | %.4f | %.2f |\n",
              absl::ToDoubleSeconds(w.duration), gb / absl::ToDoubleSeconds(w.duration));
  std::printf("| SnapshotDir::Restore (read, parse, import) | %.4f | %.2f |\n\n", restore_s,
              gb / restore_s);
  std::printf(
      "| decode step of one session (%lld tokens) | steps | p50 ms | max ms |\n"
      "|---|---|---|---|\n",
      static_cast<long long>(tokens));
  std::printf("| idle | %zu | %.3f | %.3f |\n", idle.size(), bench::Median(idle) * 1e3,
              Max(idle) * 1e3);
  std::printf("| during the write | %zu | %.3f | %.3f |\n", during.size(),
              bench::Median(during) * 1e3, Max(during) * 1e3);
  return 0;
}

}  // namespace
}  // namespace sparsekv

int main(int argc, char** argv) { return sparsekv::Main(argc, argv); }
