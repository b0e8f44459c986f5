// The CPU ComputeBackend: one instruction-set variant's kernels, a pool of worker threads, and
// the split planning of a decode batch over them.
//
// A batch becomes tasks (item, KV head, split). An item is split along its rows only when the
// batch has fewer KV heads than threads: with many items the heads alone keep every thread
// busy and splits would only add merges. Split s of an item takes the work units (its chunks
// in order, then its tail spans) whose first row falls in rows [R*s/S, R*(s+1)/S), so an item
// that is all dense tail (sparsity 0, or young) splits as well as a pruned one. A second pass
// per (item, KV head) merges the splits by log-sum-exp, finalizes, and writes the tail
// probabilities when asked.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/backend.h"
#include "kernels/compute_backend.h"
#include "kernels/cpu/thread_pool.h"

namespace sparsekv::kernels {
namespace {

// How one item is split. Its tasks are [first_task, first_task + heads * splits), task
// first_task + s * heads + h being split s of KV head h.
struct ItemPlan {
  int splits = 1;
  int first_task = 0;
  // Per unit (the runs' chunks in order, then the tail spans) the split it belongs to; never
  // decreasing, so a split's units of a run (and of the tail) are one contiguous range. Empty
  // when splits == 1.
  std::vector<int> unit_split;
};

class CpuComputeBackend final : public ComputeBackend {
 public:
  CpuComputeBackend(const Backend& variant, int threads, std::chrono::microseconds spin,
                    int64_t min_rows_to_split)
      : variant_(variant), min_rows_to_split_(min_rows_to_split) {
    if (threads > 0) pool_ = std::make_unique<ThreadPool>(threads, spin);
  }

  const char* name() const override { return "cpu"; }
  std::string variant() const override { return variant_.variant(); }
  std::string features() const override { return variant_.features(); }
  bool Fp16Arithmetic() const override { return variant_.Fp16Arithmetic(); }
  bool Bf16Arithmetic() const override { return variant_.Bf16Arithmetic(); }
  int threads() const override { return pool_ ? pool_->size() : 0; }

  KernelStatus Decode(const DecodeBatch& batch) const override {
    int64_t rows = 0;
    int heads = 0;
    for (int i = 0; i < batch.num_items; ++i) {
      const DecodeBatchItem& it = batch.items[i];
      if (it.num_kv_heads < 1 || it.group < 1 || it.head_dim < 1 || !it.q || !it.out || !it.lse ||
          (it.num_runs > 0 && !it.runs) || (it.num_tail_spans > 0 && !it.tail)) {
        return KernelStatus::Error(KernelStatus::Code::kInvalidArgument,
                                   "decode batch item " + std::to_string(i) + " is malformed");
      }
      rows += it.tokens * it.num_kv_heads;
      heads += it.num_kv_heads;
    }
    const bool parallel = pool_ && rows >= min_rows_to_split_;
    const int workers = parallel ? pool_->size() + 1 : 1;
    std::vector<ItemPlan> plans(batch.num_items);
    int tasks = 0;
    for (int i = 0; i < batch.num_items; ++i) {
      const DecodeBatchItem& it = batch.items[i];
      ItemPlan& plan = plans[i];
      if (parallel && heads < workers && rows > 0) {
        // This item's share of the workers, in splits per head.
        const int64_t share =
            (static_cast<int64_t>(workers) * it.tokens * it.num_kv_heads + rows - 1) / rows;
        plan.splits =
            static_cast<int>(std::max<int64_t>(1, (share + it.num_kv_heads - 1) / it.num_kv_heads));
      }
      if (plan.splits > 1) AssignUnits(it, &plan);
      plan.first_task = tasks;
      tasks += it.num_kv_heads * plan.splits;
    }
    std::vector<AttentionState> states(tasks);
    // Task -> (item, its local task index) by binary search over the items' first tasks.
    auto locate = [&](int task, int* item) {
      int i = static_cast<int>(
                  std::upper_bound(plans.begin(), plans.end(), task,
                                   [](int t, const ItemPlan& p) { return t < p.first_task; }) -
                  plans.begin()) -
              1;
      *item = i;
      return task - plans[i].first_task;
    };
    auto partial = [&](int task) {
      int i = 0;
      const int local = locate(task, &i);
      const DecodeBatchItem& it = batch.items[i];
      const ItemPlan& plan = plans[i];
      RunSplit(it, plan, local % it.num_kv_heads, local / it.num_kv_heads, &states[task]);
    };
    // Per (item, head) indices for the second pass.
    std::vector<std::pair<int, int>> item_heads;
    item_heads.reserve(heads);
    for (int i = 0; i < batch.num_items; ++i)
      for (int h = 0; h < batch.items[i].num_kv_heads; ++h) item_heads.emplace_back(i, h);
    auto complete = [&](int k) {
      const auto [i, h] = item_heads[k];
      const DecodeBatchItem& it = batch.items[i];
      const ItemPlan& plan = plans[i];
      AttentionState& st = states[plan.first_task + h];
      for (int s = 1; s < plan.splits; ++s)
        MergeAttentionState(states[plan.first_task + s * it.num_kv_heads + h], &st);
      const size_t q0 = static_cast<size_t>(h) * it.group;
      FinalizeAttentionState(st, it.out + q0 * it.head_dim, it.lse + q0);
      if (it.tail_mass) TailMass(it, h);
    };
    if (parallel) {
      pool_->Run(tasks, partial);
      pool_->Run(static_cast<int>(item_heads.size()), complete);
    } else {
      for (int t = 0; t < tasks; ++t) partial(t);
      for (size_t k = 0; k < item_heads.size(); ++k) complete(static_cast<int>(k));
    }
    return KernelStatus::Ok();
  }

  KernelStatus Compress(const CompressBatch& batch) const override {
    for (int i = 0; i < batch.num_jobs; ++i) {
      const CompressJob& j = batch.jobs[i];
      if (!j.rows || !j.out || j.format.tokens < 1 || j.format.head_dim < 1) {
        return KernelStatus::Error(KernelStatus::Code::kInvalidArgument,
                                   "compress job " + std::to_string(i) + " is malformed");
      }
    }
    for (int i = 0; i < batch.num_jobs; ++i) {
      const CompressJob& j = batch.jobs[i];
      CompressSection(j.format, j.rows, j.token_weights, j.channel_weights, j.out);
    }
    return KernelStatus::Ok();
  }

 private:
  static void AssignUnits(const DecodeBatchItem& it, ItemPlan* plan) {
    const int64_t total = std::max<int64_t>(1, it.tokens);
    int64_t row = 0;
    auto assign = [&](int64_t rows) {
      plan->unit_split.push_back(
          static_cast<int>(std::min<int64_t>(plan->splits - 1, row * plan->splits / total)));
      row += rows;
    };
    for (int r = 0; r < it.num_runs; ++r)
      for (int c = 0; c < it.runs[r].num_chunks; ++c) assign(it.runs[r].k_format.tokens);
    // Head 0's spans stand for every head's (all heads have the same rows).
    for (int s = 0; s < it.num_tail_spans; ++s) assign(it.tail[s].tokens);
  }

  DecodeAttentionParams Params(const DecodeBatchItem& it, int h) const {
    DecodeAttentionParams p;
    p.q = it.q + static_cast<size_t>(h) * it.group * it.head_dim;
    p.group = it.group;
    p.head_dim = it.head_dim;
    p.dtype = it.dtype;
    p.scale = it.scale;
    p.compute = it.compute;
    return p;
  }

  void RunSplit(const DecodeBatchItem& it, const ItemPlan& plan, int h, int s,
                AttentionState* st) const {
    st->Reset(it.group, it.head_dim);
    AttentionState part;
    // The units of split s among the n starting at `first`, as [b, e) relative to `first`.
    auto range = [&](size_t first, size_t n) {
      if (plan.splits == 1) return std::pair<size_t, size_t>(0, n);
      const auto begin = plan.unit_split.begin() + static_cast<std::ptrdiff_t>(first);
      const auto [lo, hi] = std::equal_range(begin, begin + static_cast<std::ptrdiff_t>(n), s);
      return std::pair<size_t, size_t>(lo - begin, hi - begin);
    };
    size_t first = 0;
    for (int r = 0; r < it.num_runs; ++r) {
      const ChunkRun& run = it.runs[r];
      const auto [b, e] = range(first, run.num_chunks);
      first += run.num_chunks;
      if (b == e) continue;
      DecodeAttentionParams p = Params(it, h);
      p.k_format = run.k_format;
      p.v_format = run.v_format;
      p.chunks = run.refs + static_cast<size_t>(h) * run.num_chunks + b;
      p.num_chunks = static_cast<int>(e - b);
      variant_.DecodeAttentionPartial(p, &part);
      MergeAttentionState(part, st);
    }
    const auto [b, e] = range(first, it.num_tail_spans);
    if (b != e) {
      DecodeAttentionParams p = Params(it, h);
      p.spans = it.tail + static_cast<size_t>(h) * it.num_tail_spans + b;
      p.num_spans = static_cast<int>(e - b);
      variant_.DecodeAttentionPartial(p, &part);
      MergeAttentionState(part, st);
    }
  }

  // Always fp32 (it ranks elements for pruning), whatever the item's compute.
  void TailMass(const DecodeBatchItem& it, int h) const {
    float* mass = it.tail_mass + static_cast<size_t>(h) * it.tail_tokens;
    std::fill(mass, mass + it.tail_tokens, 0.0f);
    DecodeAttentionParams p = Params(it, h);
    p.compute = DecodeCompute::kFloat32;
    p.spans = it.tail + static_cast<size_t>(h) * it.num_tail_spans;
    p.num_spans = it.num_tail_spans;
    AccumulateDenseMass(p, it.lse + static_cast<size_t>(h) * it.group, mass);
  }

  const Backend& variant_;
  const int64_t min_rows_to_split_;
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeCpuComputeBackend(const ComputeBackendOptions& options) {
  int threads = options.threads;
  if (threads < 0) threads = static_cast<int>(std::thread::hardware_concurrency()) - 1;
  return std::make_unique<CpuComputeBackend>(
      options.cpu_variant ? *options.cpu_variant : CpuBackend(), std::max(0, threads),
      std::chrono::microseconds(std::max(0, options.spin_us)), options.min_rows_to_split);
}

KernelStatus CreateComputeBackend(const ComputeBackendOptions& options,
                                  std::unique_ptr<ComputeBackend>* out, std::string* why) {
  if (options.name == "cuda") {
    return KernelStatus::Error(
        KernelStatus::Code::kUnavailable,
        "--backend=cuda: this build has no CUDA backend that holds sessions in GPU memory yet "
        "(kernels/cuda has the decode kernels only); use --backend=cpu or auto");
  }
  if (options.name != "auto" && options.name != "cpu") {
    return KernelStatus::Error(KernelStatus::Code::kInvalidArgument,
                               "unknown backend \"" + options.name + "\" (auto, cpu or cuda)");
  }
  *out = MakeCpuComputeBackend(options);
  if (why) {
    *why = options.name == "cpu" ? "backend cpu (asked for)"
                                 : "backend cpu (auto: no CUDA backend in this build)";
  }
  return KernelStatus::Ok();
}

}  // namespace sparsekv::kernels
