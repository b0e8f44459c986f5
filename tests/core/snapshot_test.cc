// Snapshots: a session exported to bytes and imported into another store reads and decodes
// bit-identically with the same accounting; every kind of damage (a flipped byte anywhere,
// truncation at any record boundary, another version, bad contents) is refused with a clear
// status and adds nothing.
#include "core/snapshot.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "core/session_store.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

using testing::OwnedTensor;
using testing::RandomTensor;

using testing::QuietStoreOptions;

// A session with compressed chunks (per-token K output-aware, per-channel V), a dense tail,
// labels and decode steps behind it.
std::shared_ptr<Session> Filled(SessionStore* store, DType dtype, std::mt19937* rng) {
  CreateSessionParams p;
  p.id = "snap";
  p.tenant = "team-a";
  p.layout = Layout{2, 2, 8, 32, dtype};
  p.policy.k.sparsity = 0.7f;
  p.policy.v.sparsity = 0.5f;
  p.policy.v.direction = PruneDirection::kPerChannel;
  p.policy.chunk_tokens = 64;
  p.policy.dense_window = 16;
  p.labels = {{"model", "llama"}, {"user", "u1"}};
  EXPECT_TRUE(store->Create(p).ok());
  std::shared_ptr<Session> s = *store->Get("snap");
  OwnedTensor k = RandomTensor({2, 150, 2, 32}, rng);
  OwnedTensor v = RandomTensor({2, 150, 2, 32}, rng);
  OwnedTensor obs = RandomTensor({2, 4, 8, 32}, rng);
  EXPECT_TRUE(s->Append(0, k.view, v.view, obs.view).ok());
  s->Flush();
  OwnedTensor q = RandomTensor({8, 32}, rng);
  OwnedTensor nk = RandomTensor({2, 32}, rng);
  DecodeInput in;
  in.q = q.view;
  in.new_k = nk.view;
  in.new_v = nk.view;
  DecodeOutput out;
  EXPECT_TRUE(s->Decode(in, &out).ok());
  return s;
}

TEST(SnapshotTest, ImportedSessionMatchesBitForBit) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    std::mt19937 rng(7);
    SessionStore a(QuietStoreOptions()), b(QuietStoreOptions());
    std::shared_ptr<Session> src = Filled(&a, dtype, &rng);
    const std::string bytes = SerializeSnapshot(src->Export());
    absl::StatusOr<SessionImage> image = ParseSnapshot(bytes, SessionLimits());
    ASSERT_TRUE(image.ok()) << image.status();
    absl::StatusOr<SessionInfo> info = b.Import(*image);
    ASSERT_TRUE(info.ok()) << info.status();
    std::shared_ptr<Session> dst = *b.Get("snap");
    const SessionStats sa = src->Info().stats, sb = dst->Info().stats;
    EXPECT_EQ(sb.tokens_per_layer, sa.tokens_per_layer);
    EXPECT_EQ(sb.chunks, sa.chunks);
    EXPECT_GT(sb.chunks, 0);
    EXPECT_EQ(sb.bytes_compressed, sa.bytes_compressed);
    EXPECT_EQ(sb.bytes_accounted, sa.bytes_accounted);
    EXPECT_EQ(b.Stats().bytes_used, a.Stats().bytes_used);
    EXPECT_EQ(sb.decode_steps, sa.decode_steps);
    EXPECT_EQ(sb.chunks_output_aware_k, sa.chunks_output_aware_k);
    EXPECT_EQ(dst->tenant(), "team-a");
    EXPECT_EQ(dst->Info().labels, src->Info().labels);
    for (int layer = 0; layer < 2; ++layer) {
      std::string k1, v1, k2, v2;
      ASSERT_TRUE(src->Read(layer, 0, -1, &k1, &v1).ok());
      ASSERT_TRUE(dst->Read(layer, 0, -1, &k2, &v2).ok());
      EXPECT_EQ(k1, k2);
      EXPECT_EQ(v1, v2);
      OwnedTensor q = RandomTensor({8, 32}, &rng);
      DecodeInput in;
      in.layer = layer;
      in.q = q.view;
      in.want_lse = true;
      DecodeOutput o1, o2;
      ASSERT_TRUE(src->Decode(in, &o1).ok());
      ASSERT_TRUE(dst->Decode(in, &o2).ok());
      EXPECT_EQ(o1.out, o2.out);
      EXPECT_EQ(o1.lse, o2.lse);
    }
    // The same snapshot again: the id is taken.
    EXPECT_EQ(b.Import(*image).status().code(), absl::StatusCode::kAlreadyExists);
    // Under another id it is a second, independent session.
    EXPECT_TRUE(b.Import(*image, "copy").ok());
    EXPECT_EQ(SerializeSnapshot(dst->Export()).size(), bytes.size());
  }
}

TEST(SnapshotTest, EveryDamageIsRefused) {
  std::mt19937 rng(8);
  SessionStore a(QuietStoreOptions());
  const std::string good = SerializeSnapshot(Filled(&a, DType::kFloat16, &rng)->Export());
  ASSERT_TRUE(ParseSnapshot(good, SessionLimits()).ok());
  // A flipped byte anywhere: magic, version, record framing, payloads, checksums.
  for (size_t pos = 0; pos < good.size(); pos += 1 + pos / 50) {
    std::string bad = good;
    bad[pos] ^= 0x5a;
    absl::Status st = ParseSnapshot(bad, SessionLimits()).status();
    EXPECT_FALSE(st.ok()) << "flip at " << pos;
    EXPECT_TRUE(st.code() == absl::StatusCode::kDataLoss ||
                st.code() == absl::StatusCode::kFailedPrecondition)
        << pos << ": " << st;
  }
  // Truncation anywhere, and trailing bytes.
  for (size_t len = 0; len < good.size(); len += 1 + len / 40) {
    EXPECT_EQ(ParseSnapshot(good.substr(0, len), SessionLimits()).status().code(),
              absl::StatusCode::kDataLoss)
        << len;
  }
  EXPECT_EQ(ParseSnapshot(good + "x", SessionLimits()).status().code(),
            absl::StatusCode::kDataLoss);
  // Another format version.
  std::string v2 = good;
  v2[8] = 2;
  absl::Status st = ParseSnapshot(v2, SessionLimits()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("version 2"), std::string::npos) << st;
  // Intact but over this server's limits.
  SessionLimits small;
  small.max_layers = 1;
  EXPECT_EQ(ParseSnapshot(good, small).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SnapshotTest, ContentsThatDoNotFitAreRefusedAndAddNothing) {
  std::mt19937 rng(9);
  SessionStore a(QuietStoreOptions());
  SessionImage image = Filled(&a, DType::kFloat16, &rng)->Export();
  ASSERT_FALSE(image.layers[1].chunks.empty());
  image.layers[1].chunks[0].data[0] ^= 0x01;  // a bitmap keeps one element more or less
  // Re-serialized, the checksums are right: only the contents are wrong.
  absl::StatusOr<SessionImage> parsed = ParseSnapshot(SerializeSnapshot(image), SessionLimits());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  SessionStore b(QuietStoreOptions());
  absl::Status st = b.Import(*parsed).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layer 1"), std::string::npos) << st;
  EXPECT_EQ(b.Stats().sessions, 0);
  EXPECT_EQ(b.Stats().bytes_used, 0);
  // Over the budget: refused whole too.
  SessionStoreOptions o = QuietStoreOptions();
  o.host_budget_bytes = 4096;
  SessionStore tight(o);
  image = a.Get("snap").value()->Export();
  EXPECT_EQ(tight.Import(image).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(tight.Stats().bytes_used, 0);
  EXPECT_EQ(tight.Stats().sessions, 0);
}

// Values an import brings are checked as an append's are (the fuzzer found a snapshot whose
// content was changed with every checksum recomputed storing NaN): with reject_nonfinite no
// NaN in dense tails or kept chunk values; scoring statistics finite and >= 0 always.
TEST(SnapshotTest, NonFiniteValuesAreRefused) {
  std::mt19937 rng(11);
  SessionStore a(QuietStoreOptions());
  const SessionImage clean = *ParseSnapshot(
      SerializeSnapshot(Filled(&a, DType::kFloat16, &rng)->Export()), SessionLimits());
  ASSERT_FALSE(clean.layers[1].tail_k.empty());
  ASSERT_FALSE(clean.layers[1].chunks.empty());
  const char kNan16[2] = {0x00, 0x7e};  // fp16 quiet NaN, little-endian
  struct Damage {
    const char* name;
    const char* message;  // part of the refusal
    bool value;           // stored K/V (refused only with reject_nonfinite)
    std::function<void(SessionImage*)> apply;
  };
  const std::vector<Damage> damages = {
      {"tail K", "dense tail K element 3", true,
       [&](SessionImage* im) { im->layers[1].tail_k.replace(6, 2, kNan16, 2); }},
      {"chunk V value", "chunk 0 KV head 1 V kept value 0", true,
       [&](SessionImage* im) {
         LayerImage::Chunk& c = im->layers[1].chunks[0];
         const size_t at = c.k_format.bytes() + c.v_format.bytes() + c.k_format.bytes() +
                           c.v_format.bitmap_bytes();
         c.data.replace(at, 2, kNan16, 2);
       }},
      {"tail mass", "tail attention mass", false,
       [](SessionImage* im) { im->layers[0].tail_mass.at(0) = std::nanf(""); }},
      {"query energy", "query energy", false,
       [](SessionImage* im) { im->layers[0].q_energy.at(0) = -1.0; }},
  };
  for (const bool reject : {true, false}) {
    SessionStoreOptions o = QuietStoreOptions();
    o.limits.reject_nonfinite = reject;
    SessionStore b(o);
    for (const Damage& d : damages) {
      SessionImage image = clean;
      d.apply(&image);
      absl::StatusOr<SessionInfo> got = b.Import(image);
      if (d.value && !reject) {
        EXPECT_TRUE(got.ok()) << d.name << ": " << got.status();
        ASSERT_TRUE(b.Delete("snap").ok());
        continue;
      }
      EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << d.name;
      EXPECT_NE(got.status().message().find(d.message), std::string::npos)
          << d.name << ": " << got.status().message();
      EXPECT_EQ(b.Stats().sessions, 0) << d.name;
      EXPECT_EQ(b.Stats().bytes_used, 0) << d.name;
    }
    EXPECT_TRUE(b.Import(clean).ok());  // the undamaged image still imports
  }
}

TEST(SnapshotTest, StringsThatAreNotUtf8AreRefused) {
  std::mt19937 rng(10);
  SessionStore a(QuietStoreOptions());
  SessionImage image = Filled(&a, DType::kFloat16, &rng)->Export();
  for (const std::string bad : {std::string("\xff"), std::string("a\xc3"),
                                std::string("\xed\xa0\x80")}) {  // invalid, cut, surrogate
    SessionImage copy = image;
    copy.info.labels["k"] = bad;
    EXPECT_EQ(ParseSnapshot(SerializeSnapshot(copy), SessionLimits()).status().code(),
              absl::StatusCode::kInvalidArgument);
    copy = image;
    copy.info.tenant = "t" + bad;
    EXPECT_EQ(ParseSnapshot(SerializeSnapshot(copy), SessionLimits()).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  image.info.labels["k"] = "caf\xc3\xa9 \xf0\x9f\x98\x80";  // valid 2- and 4-byte sequences
  EXPECT_TRUE(ParseSnapshot(SerializeSnapshot(image), SessionLimits()).ok());
}

TEST(SnapshotTest, Crc32cMatchesTheStandardCheckValue) {
  EXPECT_EQ(Crc32c("123456789"), 0xe3069283u);  // CRC-32C check value (RFC 3720)
  EXPECT_EQ(Crc32c("56789", Crc32c("1234")), 0xe3069283u);
}

}  // namespace
}  // namespace sparsekv
