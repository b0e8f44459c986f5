// CompressedChunk: holds one pool block for its lifetime, lays out K then V per KV head at the
// section sizes, reports payload and memory bytes and its scoring flags. DenseBlock: rows are
// addressed head-major at head_dim x dtype bytes each, K, V and mass kept apart.
#include "core/chunk.h"

#include <gtest/gtest.h>

#include <cstring>
#include <ostream>
#include <random>
#include <vector>

#include "kernels/compressed_format.h"

namespace sparsekv {
namespace {

using kernels::DType;
using kernels::SectionFormat;
using kernels::SectionKind;

struct ChunkCase {
  SectionKind k_kind;
  double k_sparsity;
  SectionKind v_kind;
  double v_sparsity;
  int head_dim;
  int tokens;
  int kv_heads;
  DType dtype;
};

void PrintTo(const ChunkCase& c, std::ostream* os) {
  *os << "K kind " << static_cast<int>(c.k_kind) << " s " << c.k_sparsity << ", V kind "
      << static_cast<int>(c.v_kind) << " s " << c.v_sparsity << ", D " << c.head_dim << ", C "
      << c.tokens << ", heads " << c.kv_heads << ", " << kernels::DTypeName(c.dtype);
}

class CompressedChunkTest : public ::testing::TestWithParam<ChunkCase> {
 protected:
  SectionFormat KFormat() const {
    const ChunkCase& c = GetParam();
    return kernels::MakeSectionFormat(c.k_kind, c.k_sparsity, c.head_dim, c.tokens, 32, c.dtype);
  }
  SectionFormat VFormat() const {
    const ChunkCase& c = GetParam();
    return kernels::MakeSectionFormat(c.v_kind, c.v_sparsity, c.head_dim, c.tokens, 32, c.dtype);
  }
};

TEST_P(CompressedChunkTest, TakesOneBlockFromThePoolAndReturnsIt) {
  const ChunkCase& c = GetParam();
  const SectionFormat kf = KFormat(), vf = VFormat();
  SlabPool pool(CompressedChunk::Bytes(kf, vf, c.kv_heads));
  EXPECT_EQ(pool.used_bytes(), 0u);
  {
    CompressedChunk a(kf, vf, c.kv_heads, &pool, false, false);
    EXPECT_EQ(pool.used_bytes(), pool.block_bytes());
    {
      CompressedChunk b(kf, vf, c.kv_heads, &pool, true, true);
      EXPECT_EQ(pool.used_bytes(), 2 * pool.block_bytes());
      EXPECT_NE(a.k(0), b.k(0));
    }
    EXPECT_EQ(pool.used_bytes(), pool.block_bytes());
  }
  EXPECT_EQ(pool.used_bytes(), 0u);
}

TEST_P(CompressedChunkTest, SectionOffsetsFollowTheSectionSizes) {
  const ChunkCase& c = GetParam();
  const SectionFormat kf = KFormat(), vf = VFormat();
  const size_t bytes = CompressedChunk::Bytes(kf, vf, c.kv_heads);
  EXPECT_EQ(bytes, (kf.bytes() + vf.bytes()) * c.kv_heads);
  SlabPool pool(bytes);
  CompressedChunk chunk(kf, vf, c.kv_heads, &pool, false, false);
  const uint8_t* base = chunk.k(0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % 64, 0u);
  for (int h = 0; h < c.kv_heads; ++h) {
    EXPECT_EQ(chunk.k(h) - base, static_cast<ptrdiff_t>(h * (kf.bytes() + vf.bytes())));
    EXPECT_EQ(chunk.v(h) - chunk.k(h), static_cast<ptrdiff_t>(kf.bytes()));
    EXPECT_EQ(chunk.mutable_k(h), chunk.k(h));
    EXPECT_EQ(chunk.mutable_v(h), chunk.v(h));
  }
  // The last V section ends exactly at the payload end, inside the block.
  EXPECT_EQ(chunk.v(c.kv_heads - 1) + vf.bytes() - base, static_cast<ptrdiff_t>(bytes));
  EXPECT_LE(bytes, pool.block_bytes());

  // Every section holds its own bytes: fill each with a distinct pattern through the mutable
  // pointers, then read all back through the const ones.
  std::mt19937 rng(17);
  std::vector<std::vector<uint8_t>> want;
  for (int h = 0; h < c.kv_heads; ++h) {
    for (int s = 0; s < 2; ++s) {
      std::vector<uint8_t> p(s == 0 ? kf.bytes() : vf.bytes());
      for (uint8_t& x : p) x = static_cast<uint8_t>(rng());
      std::memcpy(s == 0 ? chunk.mutable_k(h) : chunk.mutable_v(h), p.data(), p.size());
      want.push_back(std::move(p));
    }
  }
  for (int h = 0; h < c.kv_heads; ++h) {
    EXPECT_EQ(std::memcmp(chunk.k(h), want[2 * h].data(), kf.bytes()), 0) << "K head " << h;
    EXPECT_EQ(std::memcmp(chunk.v(h), want[2 * h + 1].data(), vf.bytes()), 0) << "V head " << h;
  }
}

TEST_P(CompressedChunkTest, ReportsSizesFormatsAndFlags) {
  const ChunkCase& c = GetParam();
  const SectionFormat kf = KFormat(), vf = VFormat();
  SlabPool pool(CompressedChunk::Bytes(kf, vf, c.kv_heads));
  for (bool ka : {false, true}) {
    for (bool va : {false, true}) {
      CompressedChunk chunk(kf, vf, c.kv_heads, &pool, ka, va);
      EXPECT_EQ(chunk.tokens(), c.tokens);
      EXPECT_EQ(chunk.k_format().kind, kf.kind);
      EXPECT_EQ(chunk.k_format().k, kf.k);
      EXPECT_EQ(chunk.v_format().kind, vf.kind);
      EXPECT_EQ(chunk.v_format().k, vf.k);
      EXPECT_EQ(chunk.bytes(), CompressedChunk::Bytes(kf, vf, c.kv_heads));
      // What the budget counts: the whole (64-byte rounded) block plus the object.
      EXPECT_EQ(chunk.memory_bytes(), pool.block_bytes() + sizeof(CompressedChunk));
      EXPECT_GE(chunk.memory_bytes(), chunk.bytes());
      EXPECT_EQ(chunk.k_output_aware(), ka);
      EXPECT_EQ(chunk.v_output_aware(), va);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, CompressedChunkTest,
                         ::testing::Values(
                             // 92 + 144 B per token row: payload not a multiple of 64.
                             ChunkCase{SectionKind::kPerToken, 0.7, SectionKind::kPerToken, 0.5,
                                       128, 256, 2, DType::kFloat16},
                             ChunkCase{SectionKind::kPerChannel, 0.7, SectionKind::kPerToken, 0.3,
                                       64, 64, 3, DType::kBFloat16},
                             ChunkCase{SectionKind::kPerToken, 0.9, SectionKind::kDense, 0.0, 32,
                                       40, 1, DType::kFloat32},
                             ChunkCase{SectionKind::kDense, 0.0, SectionKind::kPerChannel, 0.8, 16,
                                       96, 4, DType::kFloat16}));

TEST(DenseBlockTest, RowSizeIsHeadDimTimesDTypeSize) {
  EXPECT_EQ(DenseBlock(2, 128, DType::kFloat16).row_bytes(), 256u);
  EXPECT_EQ(DenseBlock(2, 128, DType::kBFloat16).row_bytes(), 256u);
  EXPECT_EQ(DenseBlock(3, 64, DType::kFloat32).row_bytes(), 256u);
  EXPECT_EQ(DenseBlock(1, 8, DType::kFloat32).row_bytes(), 32u);
}

TEST(DenseBlockTest, StartsEmptyWithZeroMass) {
  DenseBlock b(3, 16, DType::kFloat16);
  EXPECT_EQ(b.begin, 0);
  EXPECT_EQ(b.rows, 0);
  for (int h = 0; h < 3; ++h) {
    for (int r = 0; r < DenseBlock::kRows; ++r) EXPECT_EQ(b.mass(h)[r], 0.0f);
  }
}

TEST(DenseBlockTest, RowsAreHeadMajorAndKeepTheirBytes) {
  constexpr int kHeads = 3, kDim = 24;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    DenseBlock b(kHeads, kDim, dtype);
    const size_t rb = b.row_bytes();
    const DenseBlock& cb = b;
    for (int h = 0; h < kHeads; ++h) {
      for (int r = 0; r < DenseBlock::kRows; ++r) {
        const ptrdiff_t want = static_cast<ptrdiff_t>((h * DenseBlock::kRows + r) * rb);
        EXPECT_EQ(b.k_row(h, r) - b.k_row(0, 0), want);
        EXPECT_EQ(b.v_row(h, r) - b.v_row(0, 0), want);
        EXPECT_EQ(cb.k_row(h, r), b.k_row(h, r));
        EXPECT_EQ(cb.v_row(h, r), b.v_row(h, r));
      }
    }
    // Write every K and V row a different random pattern, then read them all back: no row
    // overlaps another, and K and V are separate storage.
    std::mt19937 rng(23 + static_cast<int>(dtype));
    std::vector<uint8_t> k(kHeads * DenseBlock::kRows * rb), v(k.size());
    for (uint8_t& x : k) x = static_cast<uint8_t>(rng());
    for (uint8_t& x : v) x = static_cast<uint8_t>(rng());
    for (int h = 0; h < kHeads; ++h) {
      for (int r = 0; r < DenseBlock::kRows; ++r) {
        const size_t off = (static_cast<size_t>(r) * kHeads + h) * rb;  // token-major source
        std::memcpy(b.k_row(h, r), k.data() + off, rb);
        std::memcpy(b.v_row(h, r), v.data() + off, rb);
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      for (int r = 0; r < DenseBlock::kRows; ++r) {
        const size_t off = (static_cast<size_t>(r) * kHeads + h) * rb;
        EXPECT_EQ(std::memcmp(cb.k_row(h, r), k.data() + off, rb), 0) << h << "," << r;
        EXPECT_EQ(std::memcmp(cb.v_row(h, r), v.data() + off, rb), 0) << h << "," << r;
      }
    }
  }
}

TEST(DenseBlockTest, MassIsKvHeadsByRows) {
  constexpr int kHeads = 4;
  DenseBlock b(kHeads, 8, DType::kFloat16);
  for (int h = 1; h < kHeads; ++h) EXPECT_EQ(b.mass(h) - b.mass(0), h * DenseBlock::kRows);
  std::mt19937 rng(29);
  std::uniform_real_distribution<float> dist(0.01f, 1.0f);
  std::vector<float> want(kHeads * DenseBlock::kRows);
  for (float& x : want) x = dist(rng);
  for (int h = 0; h < kHeads; ++h) {
    for (int r = 0; r < DenseBlock::kRows; ++r) b.mass(h)[r] = want[h * DenseBlock::kRows + r];
  }
  // Writing rows does not touch the mass.
  std::memset(b.k_row(kHeads - 1, DenseBlock::kRows - 1), 0xff, b.row_bytes());
  std::memset(b.v_row(kHeads - 1, DenseBlock::kRows - 1), 0xff, b.row_bytes());
  for (int h = 0; h < kHeads; ++h) {
    for (int r = 0; r < DenseBlock::kRows; ++r) {
      EXPECT_EQ(b.mass(h)[r], want[h * DenseBlock::kRows + r]);
    }
  }
}

}  // namespace
}  // namespace sparsekv
