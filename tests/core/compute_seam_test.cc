// core/ reaches compute only through the ComputeBackend: a session's pruning calls
// Compress once per chunk with every KV head's K and V sections, and a backend that fails
// leaves the rows dense (counted) while decode steps stay correct.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>

#include "core/session.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::Fixture;
using testing::OwnedTensor;
using testing::RandomTensor;

// The CPU backend, recording Compress calls; fails them when asked.
class RecordingCompute final : public kernels::ComputeBackend {
 public:
  RecordingCompute() : cpu_(kernels::MakeCpuComputeBackend({})) {}
  const char* name() const override { return "recording"; }
  std::string variant() const override { return cpu_->variant(); }
  std::string features() const override { return {}; }
  bool Fp16Arithmetic() const override { return false; }
  int threads() const override { return 0; }
  kernels::KernelStatus Decode(const kernels::DecodeBatch& b) const override {
    return cpu_->Decode(b);
  }
  kernels::KernelStatus Compress(const kernels::CompressBatch& b) const override {
    calls.fetch_add(1);
    jobs.fetch_add(b.num_jobs);
    if (fail.load()) {
      return kernels::KernelStatus::Error(kernels::KernelStatus::Code::kInternal, "injected");
    }
    return cpu_->Compress(b);
  }

  mutable std::atomic<int> calls{0}, jobs{0};
  std::atomic<bool> fail{false};

 private:
  std::unique_ptr<kernels::ComputeBackend> cpu_;
};

Policy Pruned() {
  Policy p;
  p.k.sparsity = p.v.sparsity = 0.5f;
  p.chunk_tokens = 64;
  p.dense_window = 16;
  return p;
}

TEST(ComputeSeamTest, FlushCompressesEveryHeadInOneCallPerChunk) {
  auto compute = std::make_shared<RecordingCompute>();
  Fixture f(Layout{1, 4, 8, 64, DType::kFloat16}, 0, Pruned(), nullptr, compute);
  std::mt19937 rng(1);
  OwnedTensor k = RandomTensor({1, 200, 4, 64}, &rng);
  OwnedTensor v = RandomTensor({1, 200, 4, 64}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, {}).ok());
  const FlushResult r = f.session->Flush();
  ASSERT_GT(r.compressed, 0);
  const int chunks = static_cast<int>(f.session->Info().stats.chunks);
  EXPECT_GE(chunks, 1);
  EXPECT_EQ(compute->calls.load(), chunks);
  EXPECT_EQ(compute->jobs.load(), chunks * 2 * 4);  // K and V of every KV head
}

TEST(ComputeSeamTest, AFailingBackendLeavesRowsDenseAndDecodeCorrect) {
  auto compute = std::make_shared<RecordingCompute>();
  compute->fail = true;
  Fixture f(Layout{1, 2, 4, 32, DType::kFloat16}, 0, Pruned(), nullptr, compute);
  std::mt19937 rng(2);
  OwnedTensor k = RandomTensor({1, 150, 2, 32}, &rng);
  OwnedTensor v = RandomTensor({1, 150, 2, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, {}).ok());
  const FlushResult r = f.session->Flush();
  EXPECT_EQ(r.compressed, 0);
  EXPECT_EQ(f.session->Info().stats.chunks, 0);
  EXPECT_GT(f.env.counters->failed.load(), 0);
  // Every row is still there, dense: a decode step attends over all 150.
  OwnedTensor q = RandomTensor({4, 32}, &rng);
  DecodeInput in;
  in.session_id = "s";
  in.q = q.view;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  EXPECT_EQ(out.tokens_attended, 150);
  // The backend recovers: the next Flush compresses.
  compute->fail = false;
  EXPECT_GT(f.session->Flush().compressed, 0);
}

}  // namespace
}  // namespace sparsekv
