// Session: append/decode/read semantics on random data against a float64 reference.
#include "core/session.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <string>
#include <thread>

#include "kernels/backend.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::OwnedTensor;
using testing::RandomTensor;
using testing::Stored;

using testing::Fixture;

class SessionDecodeTest : public ::testing::TestWithParam<std::tuple<int, int, int64_t, DType>> {};

TEST_P(SessionDecodeTest, DecodeMatchesFloat64ReferenceOverStoredValues) {
  const auto [group, head_dim, tokens, dtype] = GetParam();
  const int kv = 2, q_heads = kv * group, layers = 2;
  Fixture f(Layout{layers, kv, q_heads, head_dim, dtype});
  std::mt19937 rng(static_cast<uint32_t>(tokens * 31 + head_dim + group));
  OwnedTensor k = RandomTensor({layers, tokens, kv, head_dim}, &rng);
  OwnedTensor v = RandomTensor({layers, tokens, kv, head_dim}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  OwnedTensor q = RandomTensor({q_heads, head_dim}, &rng);
  OwnedTensor nk = RandomTensor({kv, head_dim}, &rng);
  OwnedTensor nv = RandomTensor({kv, head_dim}, &rng);

  DecodeInput in;
  in.layer = 1;
  in.q = q.view;
  in.new_k = nk.view;
  in.new_v = nv.view;
  in.want_lse = true;
  DecodeOutput out;
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  EXPECT_EQ(out.tokens_attended, tokens + 1);

  // Reference over layer 1's stored (rounded) rows plus the new token.
  const size_t layer_elems = static_cast<size_t>(tokens) * kv * head_dim;
  std::vector<double> kr, vr, qr(q.values.begin(), q.values.end());
  for (size_t i = 0; i < layer_elems; ++i) {
    kr.push_back(Stored(dtype, k.values[layer_elems + i]));
    vr.push_back(Stored(dtype, v.values[layer_elems + i]));
  }
  for (size_t i = 0; i < nk.values.size(); ++i) {
    kr.push_back(Stored(dtype, nk.values[i]));
    vr.push_back(Stored(dtype, nv.values[i]));
  }
  std::vector<double> want =
      testing::AttentionReference(qr, kr, vr, q_heads, kv, head_dim, tokens + 1);
  // The kernel accumulates in float64 from the same stored values: only the fp32 output
  // rounding and the fp32 scale differ, a few fp32 ulps.
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(out.out[i], want[i], 2e-5) << i;
  EXPECT_EQ(f.session->tokens(0), tokens);
  EXPECT_EQ(f.session->tokens(1), tokens + 1);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SessionDecodeTest,
    ::testing::Combine(::testing::Values(1, 4), ::testing::Values(64, 128),
                       // 1500 tokens x 2 KV heads: an all-dense-tail layer split over threads.
                       ::testing::Values(int64_t{1}, int64_t{27}, int64_t{129}, int64_t{1500}),
                       ::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32)));

TEST(SessionTest, ReadReturnsStoredRowsInRequestLayout) {
  Fixture f(Layout{1, 3, 3, 8, DType::kFloat16});
  std::mt19937 rng(5);
  OwnedTensor k = RandomTensor({1, 10, 3, 8}, &rng);
  OwnedTensor v = RandomTensor({1, 10, 3, 8}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  std::string ko, vo;
  auto rows = f.session->Read(0, 2, 5, &ko, &vo);
  ASSERT_TRUE(rows.ok());
  EXPECT_EQ(*rows, 5);
  ASSERT_EQ(ko.size(), 5u * 3 * 8 * 2);
  for (size_t i = 0; i < 5 * 3 * 8; ++i) {
    EXPECT_EQ(kernels::LoadAsFloat(DType::kFloat16, ko.data(), i),
              Stored(DType::kFloat16, k.values[2 * 24 + i]));
    EXPECT_EQ(kernels::LoadAsFloat(DType::kFloat16, vo.data(), i),
              Stored(DType::kFloat16, v.values[2 * 24 + i]));
  }
  EXPECT_EQ(f.session->Read(0, 8, 5, &ko, &vo).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SessionTest, BadShapesAreNamed) {
  Fixture f(Layout{2, 2, 4, 16, DType::kFloat16});
  std::mt19937 rng(9);
  OwnedTensor k = RandomTensor({1, 4, 2, 8}, &rng);  // head_dim 8, want 16
  absl::Status st = f.session->Append(0, k.view, k.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("shape"), std::string::npos);
  OwnedTensor k2 = RandomTensor({2, 4, 2, 16}, &rng);
  st = f.session->Append(1, k2.view, k2.view, TensorView{}).status();  // layers [1, 3) of 2
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layers"), std::string::npos);
  OwnedTensor v3 = RandomTensor({2, 5, 2, 16}, &rng);
  EXPECT_EQ(f.session->Append(0, k2.view, v3.view, TensorView{}).status().code(),
            absl::StatusCode::kInvalidArgument);

  DecodeInput in;
  OwnedTensor q = RandomTensor({3, 16}, &rng);
  in.q = q.view;
  st = f.session->CheckDecode(in);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("q has shape [3, 16]"), std::string::npos);
  OwnedTensor q2 = RandomTensor({4, 16}, &rng);
  in.q = q2.view;
  in.layer = 2;
  EXPECT_EQ(f.session->CheckDecode(in).code(), absl::StatusCode::kInvalidArgument);
  in.layer = 0;
  OwnedTensor nk = RandomTensor({2, 16}, &rng);
  in.new_k = nk.view;  // without new_v
  EXPECT_EQ(f.session->CheckDecode(in).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.session->tokens(0), 0);
}

TEST(SessionTest, OverBudgetAppendChangesNothing) {
  const Layout layout{1, 1, 1, 8, DType::kFloat16};
  const int64_t fixed = Session::FixedBytes(SessionInfo{"s", "t", layout});
  // Room for the fixed bytes and one dense block (32 rows).
  Fixture f(layout, /*budget=*/fixed + LayerStore::BlockBytes(layout));
  std::mt19937 rng(11);
  OwnedTensor k = RandomTensor({1, 30, 1, 8}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  OwnedTensor k2 = RandomTensor({1, 3, 1, 8}, &rng);  // needs a second block
  absl::Status st = f.session->Append(0, k2.view, k2.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(f.session->tokens(0), 30);
  EXPECT_EQ(f.env.budget->used(), fixed + LayerStore::BlockBytes(layout));
  OwnedTensor k3 = RandomTensor({1, 2, 1, 8}, &rng);  // fits in the first block
  EXPECT_TRUE(f.session->Append(0, k3.view, k3.view, TensorView{}).ok());
  f.session.reset();
  EXPECT_EQ(f.env.budget->used(), 0);  // released on destruction
}

TEST(SessionTest, ConcurrentAppendAndDecodeStayConsistent) {
  // Decoders run while a writer appends: every decode must see a whole number of tokens and
  // produce finite output (no torn rows, no crash under sanitizers).
  Fixture f(Layout{1, 2, 4, 32, DType::kFloat16});
  std::mt19937 rng(13);
  OwnedTensor k = RandomTensor({1, 16, 2, 32}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, TensorView{}).ok());
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    std::mt19937 wrng(17);
    for (int i = 0; i < 200; ++i) {
      OwnedTensor kk = RandomTensor({1, 4, 2, 32}, &wrng);
      ASSERT_TRUE(f.session->Append(0, kk.view, kk.view, TensorView{}).ok());
    }
    stop = true;
  });
  OwnedTensor q = RandomTensor({4, 32}, &rng);
  int64_t last = 0;
  while (!stop) {
    DecodeInput in;
    in.q = q.view;
    DecodeOutput out;
    ASSERT_TRUE(f.session->Decode(in, &out).ok());
    EXPECT_EQ(out.tokens_attended % 4, 0);
    EXPECT_GE(out.tokens_attended, last);
    last = out.tokens_attended;
    for (float x : out.out) ASSERT_TRUE(std::isfinite(x));
  }
  writer.join();
  EXPECT_EQ(f.session->tokens(0), 16 + 800);
}

// Counts the DecodeAttentionPartial calls per arithmetic (and those over compressed chunks),
// then runs them on the CPU backend.
class RecordingBackend final : public kernels::Backend {
 public:
  const char* name() const override { return "recording"; }
  std::string variant() const override { return "recording"; }
  void DecodeAttentionPartial(const kernels::DecodeAttentionParams& p,
                              kernels::AttentionState* state) const override {
    (p.compute == kernels::DecodeCompute::kFloat16 ? f16_calls : f32_calls).fetch_add(1);
    if (p.num_chunks > 0 && p.compute == kernels::DecodeCompute::kFloat16) {
      f16_chunk_calls.fetch_add(1);
    }
    kernels::CpuBackend().DecodeAttentionPartial(p, state);
  }
  bool Fp16Arithmetic() const override { return true; }
  void Reset() { f32_calls = f16_calls = f16_chunk_calls = 0; }

  mutable std::atomic<int> f32_calls{0};
  mutable std::atomic<int> f16_calls{0};
  mutable std::atomic<int> f16_chunk_calls{0};
};

TEST(SessionTest, DecodeStepsUseThePolicysComputeAndScoringStaysFloat32) {
  const int kv = 2, q_heads = 8, d = 64;
  for (DecodeCompute compute : {DecodeCompute::kFloat32, DecodeCompute::kFloat16}) {
    Policy policy;
    policy.k.sparsity = policy.v.sparsity = 0.5f;
    policy.chunk_tokens = 64;
    policy.decode_compute = compute;
    RecordingBackend backend;
    Fixture f(Layout{1, kv, q_heads, d, DType::kFloat16}, 0, policy, &backend);
    std::mt19937 rng(21);
    OwnedTensor k = RandomTensor({1, 200, kv, d}, &rng);
    OwnedTensor v = RandomTensor({1, 200, kv, d}, &rng);
    OwnedTensor obs = RandomTensor({1, 3, q_heads, d}, &rng);
    // Observation-window queries only feed scoring statistics: fp32 whatever the policy.
    ASSERT_TRUE(f.session->Append(0, k.view, v.view, obs.view).ok());
    EXPECT_GT(backend.f32_calls.load(), 0);
    EXPECT_EQ(backend.f16_calls.load(), 0);
    ASSERT_GT(f.session->Flush().compressed, 0);
    backend.Reset();
    OwnedTensor q = RandomTensor({q_heads, d}, &rng);
    DecodeInput in;
    in.q = q.view;
    DecodeOutput out;
    ASSERT_TRUE(f.session->Decode(in, &out).ok());
    if (compute == DecodeCompute::kFloat16) {
      EXPECT_EQ(backend.f32_calls.load(), 0);
      EXPECT_GT(backend.f16_chunk_calls.load(), 0);                         // compressed chunks
      EXPECT_GT(backend.f16_calls.load(), backend.f16_chunk_calls.load());  // and the tail
    } else {
      EXPECT_GT(backend.f32_calls.load(), 0);
      EXPECT_EQ(backend.f16_calls.load(), 0);
    }
    EXPECT_EQ(f.session->Info().stats.decode_compute_in_force, compute);
  }
}

TEST(SessionTest, Float16ComputeStaysCloseToFloat32AndStatsSayWhichRan) {
  // Same random cache (per-token pruned chunks plus a dense tail) in an fp32-compute and an
  // fp16-compute session; the same queries decode on both.
  const int layers = 1, kv = 2, q_heads = 8, d = 128, tokens = 700;
  Policy policy;
  policy.k.sparsity = policy.v.sparsity = 0.5f;
  Policy policy16 = policy;
  policy16.decode_compute = DecodeCompute::kFloat16;
  const Layout layout{layers, kv, q_heads, d, DType::kFloat16};
  Fixture f32(layout, 0, policy);
  Fixture f16(layout, 0, policy16);
  std::mt19937 rng(23);
  OwnedTensor k = RandomTensor({layers, tokens, kv, d}, &rng);
  OwnedTensor v = RandomTensor({layers, tokens, kv, d}, &rng);
  for (Fixture* f : {&f32, &f16}) {
    ASSERT_TRUE(f->session->Append(0, k.view, v.view, TensorView{}).ok());
    ASSERT_GT(f->session->Flush().compressed, 0);
  }
  const bool fp16_runs = kernels::CpuBackend().Fp16Arithmetic();
  bool differs = false;
  for (int step = 0; step < 4; ++step) {
    OwnedTensor q = RandomTensor({q_heads, d}, &rng);
    DecodeInput in;
    in.q = q.view;
    DecodeOutput o32, o16;
    ASSERT_TRUE(f32.session->Decode(in, &o32).ok());
    ASSERT_TRUE(f16.session->Decode(in, &o16).ok());
    // fp16 products and short sums: ~1e-3 relative error per head (kernels/attention.h).
    for (int h = 0; h < q_heads; ++h) {
      double num = 0, den = 0;
      for (int j = 0; j < d; ++j) {
        const double a = o16.out[h * d + j], b = o32.out[h * d + j];
        num += (a - b) * (a - b);
        den += b * b;
        differs |= a != b;
      }
      EXPECT_LE(std::sqrt(num / den), 1e-2) << "step " << step << " head " << h;
    }
  }
  // On a CPU with fp16 arithmetic the request must have reached the kernels.
  if (fp16_runs) {
    EXPECT_TRUE(differs);
  }
  EXPECT_EQ(f32.session->Info().stats.decode_compute_in_force, DecodeCompute::kFloat32);
  EXPECT_EQ(f16.session->Info().stats.decode_compute_in_force,
            fp16_runs ? DecodeCompute::kFloat16 : DecodeCompute::kFloat32);
  EXPECT_EQ(f16.session->Info().policy.decode_compute, DecodeCompute::kFloat16);

  // Only fp16 caches compute in fp16.
  Fixture bf16(Layout{layers, kv, q_heads, d, DType::kBFloat16}, 0, policy16);
  EXPECT_EQ(bf16.session->Info().stats.decode_compute_in_force, DecodeCompute::kFloat32);
}

}  // namespace
}  // namespace sparsekv

namespace sparsekv::testing {
namespace {

TEST(SessionHostileTest, DecodeRejectsNewKAndNewVOfDifferentDtypes) {
  // float32 K with float16 V of the same shape used to convert V with K's element size and
  // read past the end of V's buffer.
  const Layout layout{1, 64, 64, 64, DType::kFloat16};
  Fixture f(layout);
  std::mt19937 rng(21);
  OwnedTensor q = RandomTensor({64, 64}, &rng);
  OwnedTensor nk = RandomTensor({64, 64}, &rng);
  std::vector<uint16_t> v16(64 * 64);
  kernels::ConvertElements(DType::kFloat32, nk.values.data(), DType::kFloat16, v16.data(),
                           v16.size());
  DecodeInput in;
  in.q = q.view;
  in.new_k = nk.view;
  in.new_v = TensorView{DType::kFloat16, {64, 64}, v16.data()};
  DecodeOutput out;
  absl::Status st = f.session->Decode(in, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("new_k is float32 but new_v is float16"), std::string::npos) << st;
  EXPECT_EQ(f.session->tokens(0), 0);
}

TEST(SessionHostileTest, NonFiniteValuesAreRejectedNamingTensorAndIndex) {
  const Layout layout{2, 2, 4, 16, DType::kFloat16};
  Fixture f(layout);
  std::mt19937 rng(22);
  OwnedTensor k = RandomTensor({2, 5, 2, 16}, &rng);
  OwnedTensor v = RandomTensor({2, 5, 2, 16}, &rng);
  ASSERT_TRUE(f.session->Append(0, k.view, v.view, TensorView{}).ok());
  const int64_t used = f.env.budget->used();

  OwnedTensor bad = RandomTensor({2, 5, 2, 16}, &rng);
  bad.values[77] = std::nanf("");
  absl::Status st = f.session->Append(0, k.view, bad.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("v[flat index 77]"), std::string::npos) << st;
  bad.values[77] = 1.0f;
  bad.values[3] = 70000.0f;  // finite in fp32, Inf once stored as fp16
  st = f.session->Append(0, bad.view, v.view, TensorView{}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("k[flat index 3] = 70000 overflows"), std::string::npos) << st;
  OwnedTensor obs = RandomTensor({2, 3, 4, 16}, &rng);
  obs.values[50] = -INFINITY;
  st = f.session->Append(0, k.view, v.view, obs.view).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("obs_q[flat index 50]"), std::string::npos) << st;

  OwnedTensor q = RandomTensor({4, 16}, &rng);
  q.values[9] = std::nanf("");
  DecodeInput in;
  in.q = q.view;
  DecodeOutput out;
  st = f.session->Decode(in, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("q[flat index 9]"), std::string::npos) << st;
  q.values[9] = 0.5f;
  OwnedTensor nk = RandomTensor({2, 16}, &rng);
  nk.values[31] = INFINITY;
  in.new_k = nk.view;
  in.new_v = nk.view;
  EXPECT_EQ(f.session->Decode(in, &out).code(), absl::StatusCode::kInvalidArgument);
  // Nothing changed: the layer's later steps are finite and the statistics unbiased.
  EXPECT_EQ(f.session->tokens(0), 5);
  EXPECT_EQ(f.session->tokens(1), 5);
  EXPECT_EQ(f.env.budget->used(), used);
  in.new_k = in.new_v = TensorView{};
  ASSERT_TRUE(f.session->Decode(in, &out).ok());
  for (float x : out.out) EXPECT_TRUE(std::isfinite(x));
}

TEST(SessionHostileTest, NonFiniteValuesAreStoredWhenThePolicyAllows) {
  const Layout layout{1, 1, 1, 8, DType::kFloat32};
  Fixture f(layout);
  f.env.limits.reject_nonfinite = false;
  SessionInfo info;
  info.id = "s2";
  info.tenant = "t";
  info.layout = layout;
  f.env.budget->Charge("t", Session::FixedBytes(info));
  auto s = std::make_shared<Session>(info, f.env);
  std::mt19937 rng(23);
  OwnedTensor k = RandomTensor({1, 2, 1, 8}, &rng);
  k.values[4] = std::nanf("");
  EXPECT_TRUE(s->Append(0, k.view, k.view, TensorView{}).ok());
  EXPECT_EQ(s->tokens(0), 2);
}

TEST(SessionHostileTest, ObservedAppendCancelledMidwayAppliesNothing) {
  const Layout layout{2, 2, 4, 16, DType::kFloat16};
  Fixture f(layout);
  std::mt19937 rng(24);
  OwnedTensor k = RandomTensor({2, 40, 2, 16}, &rng);
  OwnedTensor obs = RandomTensor({2, 8, 4, 16}, &rng);
  const int64_t used = f.env.budget->used();
  int calls = 0;
  // Lets the first few observation queries run, then reports an expired deadline.
  CancelCheck cancel = [&calls]() -> absl::Status {
    return ++calls > 5 ? absl::DeadlineExceededError("deadline") : absl::OkStatus();
  };
  absl::Status st = f.session->Append(0, k.view, k.view, obs.view, cancel).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(calls, 6);
  EXPECT_EQ(f.session->tokens(0), 0);
  EXPECT_EQ(f.session->tokens(1), 0);
  EXPECT_EQ(f.env.budget->used(), used);
  EXPECT_EQ(f.session->Info().stats.scoring_in_force_k, Scoring::kMagnitude);  // no stats
  // Uncancelled, the same message applies whole, statistics included.
  ASSERT_TRUE(f.session->Append(0, k.view, k.view, obs.view, {}).ok());
  EXPECT_EQ(f.session->tokens(1), 40);
  EXPECT_EQ(f.env.budget->used(), used + 2 * 2 * LayerStore::BlockBytes(layout));
}

TEST(SessionHostileTest, ObsTokensPerMessageAreBounded) {
  const Layout layout{1, 1, 1, 8, DType::kFloat16};
  Fixture f(layout);
  std::mt19937 rng(25);
  OwnedTensor k = RandomTensor({1, 2, 1, 8}, &rng);
  OwnedTensor obs = RandomTensor({1, 257, 1, 8}, &rng);
  absl::Status st = f.session->Append(0, k.view, k.view, obs.view).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("--max_obs_tokens"), std::string::npos) << st;
}

TEST(SessionHostileTest, OneTokenChargesOneWholeBlockAndTheNext31ChargeNothing) {
  const Layout layout{1, 2, 2, 16, DType::kBFloat16};
  Fixture f(layout);
  std::mt19937 rng(26);
  const int64_t fixed = f.env.budget->used();
  OwnedTensor one = RandomTensor({1, 1, 2, 16}, &rng);
  ASSERT_TRUE(f.session->Append(0, one.view, one.view, TensorView{}).ok());
  EXPECT_EQ(f.env.budget->used(), fixed + LayerStore::BlockBytes(layout));
  OwnedTensor more = RandomTensor({1, 31, 2, 16}, &rng);
  ASSERT_TRUE(f.session->Append(0, more.view, more.view, TensorView{}).ok());
  EXPECT_EQ(f.env.budget->used(), fixed + LayerStore::BlockBytes(layout));
  ASSERT_TRUE(f.session->Append(0, one.view, one.view, TensorView{}).ok());
  EXPECT_EQ(f.env.budget->used(), fixed + 2 * LayerStore::BlockBytes(layout));
  EXPECT_EQ(f.session->Info().stats.bytes_accounted, f.env.budget->used());
}

}  // namespace
}  // namespace sparsekv::testing
