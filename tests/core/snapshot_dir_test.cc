// Snapshot directories: sessions written as files come back bit-identical in another store;
// only changed sessions are rewritten and deleted ones' files removed; a write that fails
// (unusable directory, file size limit mid-write) leaves the previous file whole and no
// partial one; every damaged, foreign or unloadable file is skipped, moved aside and reported
// while the good ones load.
#include "core/snapshot_dir.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "core/snapshot.h"
#include "tests/core/test_util.h"

namespace sparsekv {
namespace {

namespace fs = std::filesystem;
using testing::OwnedTensor;
using testing::RandomTensor;

using testing::QuietStoreOptions;

// A decode step with a new token: changes the session.
void Step(Session* s, std::mt19937* rng) {
  OwnedTensor q = RandomTensor({8, 32}, rng);
  OwnedTensor nk = RandomTensor({2, 32}, rng);
  DecodeInput in;
  in.q = q.view;
  in.new_k = nk.view;
  in.new_v = nk.view;
  DecodeOutput out;
  EXPECT_TRUE(s->Decode(in, &out).ok());
}

// A session with compressed chunks, a dense tail, scoring statistics and a decode step.
std::shared_ptr<Session> Filled(SessionStore* store, const std::string& id, std::mt19937* rng) {
  CreateSessionParams p;
  p.id = id;
  p.layout = Layout{2, 2, 8, 32, DType::kFloat16};
  p.policy.k.sparsity = 0.7f;
  p.policy.v.sparsity = 0.5f;
  p.policy.chunk_tokens = 64;
  p.policy.dense_window = 16;
  p.labels = {{"model", "m"}};
  EXPECT_TRUE(store->Create(p).ok());
  std::shared_ptr<Session> s = *store->Get(id);
  OwnedTensor k = RandomTensor({2, 100, 2, 32}, rng);
  OwnedTensor v = RandomTensor({2, 100, 2, 32}, rng);
  OwnedTensor obs = RandomTensor({2, 4, 8, 32}, rng);
  EXPECT_TRUE(s->Append(0, k.view, v.view, obs.view).ok());
  s->Flush();
  Step(s.get(), rng);
  return s;
}

std::string Bytes(const Session& s) { return SerializeSnapshot(s.Export()); }

std::string ReadAll(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteAll(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

std::set<std::string> Files(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

class SnapshotDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "sparsekv-snapdir-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    dir_ = root_ / "snaps";
  }
  void TearDown() override { fs::remove_all(root_); }

  fs::path root_;
  fs::path dir_;
};

TEST(SnapshotFileNameTest, SafeDistinctAndShort) {
  const std::vector<std::string> ids = {"a",
                                        "A",
                                        ".",
                                        "..",
                                        "x:y",
                                        "x-y",
                                        "x_y",
                                        "s-0123456789abcdef",
                                        std::string(150, 'z'),
                                        std::string(151, 'z'),
                                        std::string(152, 'z'),
                                        std::string(4096, 'q')};
  std::set<std::string> names;
  for (const std::string& id : ids) {
    const std::string name = SnapshotFileName(id);
    EXPECT_TRUE(std::regex_match(name, std::regex("[sh]-[a-z0-9]+\\.skv"))) << name;
    EXPECT_LE(name.size() + 4, 255u) << id.size();  // + ".tmp" / ".bad" under NAME_MAX
    names.insert(name);
  }
  EXPECT_EQ(names.size(), ids.size());  // "a" and "A" differ on case-insensitive file systems
  EXPECT_EQ(SnapshotFileName("a"), SnapshotFileName("a"));
}

TEST(SessionGenerationTest, CountsEveryChangeAnExportSees) {
  std::mt19937 rng(7);
  SessionStore a(QuietStoreOptions());
  std::shared_ptr<Session> s = Filled(&a, "g", &rng);
  uint64_t exported = 0;
  const std::string image = Bytes(*s);
  SerializeSnapshot(s->Export(&exported));
  EXPECT_EQ(exported, s->generation());
  // Reads change nothing an export carries.
  std::string k, v;
  ASSERT_TRUE(s->Read(0, 0, -1, &k, &v).ok());
  s->Info();
  EXPECT_EQ(s->generation(), exported);
  // A decode step without a new token still changes the counters and scoring statistics.
  OwnedTensor q = RandomTensor({8, 32}, &rng);
  DecodeInput in;
  in.q = q.view;
  DecodeOutput out;
  ASSERT_TRUE(s->Decode(in, &out).ok());
  EXPECT_GT(s->generation(), exported);
  EXPECT_NE(Bytes(*s), image);
}

TEST_F(SnapshotDirTest, SessionsComeBackBitIdenticalAndOnlyChangesAreRewritten) {
  std::mt19937 rng(1);
  SessionStore a(QuietStoreOptions());
  std::vector<std::shared_ptr<Session>> sessions;
  for (const char* id : {"one", "two", "three"}) sessions.push_back(Filled(&a, id, &rng));
  SnapshotDir snaps(dir_.string());
  WriteReport w = snaps.Write(a);
  EXPECT_EQ(w.written, 3) << w.ToString();
  EXPECT_EQ(w.failed, 0) << w.ToString();
  EXPECT_GT(w.bytes, 0);
  EXPECT_EQ(Files(dir_).size(), 3u);

  w = snaps.Write(a);  // nothing changed
  EXPECT_EQ(w.written, 0) << w.ToString();
  EXPECT_EQ(w.unchanged, 3);
  Step(sessions[1].get(), &rng);
  w = snaps.Write(a);
  EXPECT_EQ(w.written, 1) << w.ToString();
  EXPECT_EQ(w.unchanged, 2);
  // A file removed behind the writer's back is written again.
  fs::remove(dir_ / SnapshotFileName("three"));
  EXPECT_EQ(snaps.Write(a).written, 1);

  SessionStore b(QuietStoreOptions());
  SnapshotDir reader(dir_.string());
  RestoreReport r = reader.Restore(&b);
  EXPECT_EQ(r.restored, 3) << r.ToString();
  EXPECT_TRUE(r.skipped.empty()) << r.ToString();
  for (const auto& s : sessions) {
    absl::StatusOr<std::shared_ptr<Session>> got = b.Get(s->id());
    ASSERT_TRUE(got.ok()) << s->id();
    EXPECT_EQ(Bytes(**got), Bytes(*s)) << s->id();
    std::string k1, v1, k2, v2;
    ASSERT_TRUE(s->Read(1, 0, -1, &k1, &v1).ok());
    ASSERT_TRUE((*got)->Read(1, 0, -1, &k2, &v2).ok());
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
  }
  EXPECT_EQ(b.Stats().bytes_used, a.Stats().bytes_used);
  // Restored from their own files: nothing to rewrite.
  EXPECT_EQ(reader.Write(b).written, 0);
}

// Checkpoints while another thread appends, decodes and the pruner publishes chunks: every
// export is a whole snapshot, and the last write after the changes restores bit-identically.
// (Under TSan, also the lock discipline of the export outside the session lock.)
TEST_F(SnapshotDirTest, WritesWhileTheSessionChanges) {
  std::mt19937 rng(8);
  SessionStore a(QuietStoreOptions());
  std::shared_ptr<Session> s = Filled(&a, "busy", &rng);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    std::mt19937 r(9);
    for (int i = 0; i < 300; ++i) {
      OwnedTensor k = RandomTensor({2, 8, 2, 32}, &r);
      OwnedTensor v = RandomTensor({2, 8, 2, 32}, &r);
      EXPECT_TRUE(s->Append(0, k.view, v.view, TensorView()).ok());
      Step(s.get(), &r);
    }
    done = true;
  });
  SnapshotDir snaps(dir_.string());
  int passes = 0;
  while (!done.load() || passes < 2) {
    WriteReport w = snaps.Write(a);
    EXPECT_EQ(w.failed, 0) << w.ToString();
    EXPECT_TRUE(ParseSnapshot(ReadAll(dir_ / SnapshotFileName("busy")), SessionLimits()).ok());
    ++passes;
  }
  writer.join();
  s->Flush();
  snaps.Write(a);
  SessionStore b(QuietStoreOptions());
  ASSERT_EQ(SnapshotDir(dir_.string()).Restore(&b).restored, 1);
  EXPECT_EQ(Bytes(**b.Get("busy")), Bytes(*s));
}

TEST_F(SnapshotDirTest, DeletedSessionsDoNotComeBack) {
  std::mt19937 rng(2);
  SessionStore a(QuietStoreOptions());
  Filled(&a, "keep", &rng);
  Filled(&a, "gone", &rng);
  SnapshotDir snaps(dir_.string());
  ASSERT_EQ(snaps.Write(a).written, 2);
  ASSERT_TRUE(a.Delete("gone").ok());
  WriteReport w = snaps.Write(a);
  EXPECT_EQ(w.removed, 1) << w.ToString();
  EXPECT_EQ(Files(dir_), std::set<std::string>{SnapshotFileName("keep")});
  SessionStore b(QuietStoreOptions());
  EXPECT_EQ(SnapshotDir(dir_.string()).Restore(&b).restored, 1);
  EXPECT_TRUE(b.Get("keep").ok());
  EXPECT_EQ(b.Get("gone").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SnapshotDirTest, UnusableDirectoryIsReportedNotFatal) {
  std::mt19937 rng(3);
  SessionStore a(QuietStoreOptions());
  Filled(&a, "s1", &rng);
  // Its parent is a regular file: fails even for root, whom permissions do not stop.
  WriteAll(root_ / "file", "x");
  SnapshotDir snaps((root_ / "file" / "snaps").string());
  WriteReport w = snaps.Write(a);
  EXPECT_EQ(w.written, 0);
  EXPECT_EQ(w.failed, 2) << w.ToString();  // the session, and listing for stale files
  ASSERT_FALSE(w.errors.empty());
  EXPECT_NE(w.errors[0].find("Not a directory"), std::string::npos) << w.ToString();
  SessionStore b(QuietStoreOptions());
  RestoreReport r = snaps.Restore(&b);
  EXPECT_FALSE(r.dir_error.ok());
  EXPECT_EQ(r.restored, 0);
  EXPECT_NE(r.ToString().find("nothing restored"), std::string::npos) << r.ToString();
}

TEST_F(SnapshotDirTest, FailedWriteLeavesThePreviousFileWhole) {
  std::mt19937 rng(4);
  SessionStore a(QuietStoreOptions());
  std::shared_ptr<Session> s = Filled(&a, "big", &rng);
  SnapshotDir snaps(dir_.string());
  ASSERT_EQ(snaps.Write(a).written, 1);
  const fs::path file = dir_ / SnapshotFileName("big");
  const std::string before = ReadAll(file);
  ASSERT_EQ(before, Bytes(*s));
  Step(s.get(), &rng);

  // A file size limit stops the next write part-way, as a full disk would.
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 4096;
  ASSERT_LT(small.rlim_cur, before.size());
  sighandler_t old_handler = signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of death
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  WriteReport w = snaps.Write(a);
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, old_handler);

  EXPECT_EQ(w.failed, 1) << w.ToString();
  EXPECT_EQ(w.written, 0);
  ASSERT_EQ(w.errors.size(), 1u);
  EXPECT_NE(w.errors[0].find("RESOURCE_EXHAUSTED"), std::string::npos) << w.errors[0];
  EXPECT_EQ(ReadAll(file), before);  // whole, and the older version
  EXPECT_EQ(Files(dir_), std::set<std::string>{SnapshotFileName("big")});  // no temp file left
  // The next write retries and succeeds.
  w = snaps.Write(a);
  EXPECT_EQ(w.written, 1) << w.ToString();
  EXPECT_EQ(ReadAll(file), Bytes(*s));
}

TEST_F(SnapshotDirTest, DamagedFilesAreSkippedMovedAsideAndReported) {
  std::mt19937 rng(5);
  SessionStore a(QuietStoreOptions());
  std::shared_ptr<Session> good = Filled(&a, "good", &rng);
  Filled(&a, "other", &rng);
  SnapshotDir snaps(dir_.string());
  ASSERT_EQ(snaps.Write(a).written, 2);
  const std::string other_file = SnapshotFileName("other");
  const std::string bytes = ReadAll(dir_ / other_file);
  fs::remove(dir_ / other_file);

  // Each damaged copy of "other" under its own name, with the code its status must carry.
  std::vector<std::pair<std::string, absl::StatusCode>> expected;
  auto put = [&](const std::string& name, const std::string& content, absl::StatusCode code) {
    WriteAll(dir_ / name, content);
    expected.emplace_back(name, code);
  };
  for (size_t pos : {size_t{3}, size_t{20}, bytes.size() / 2, bytes.size() - 30}) {
    std::string flipped = bytes;
    flipped[pos] ^= 0x10;
    put("flip-" + std::to_string(pos) + ".skv", flipped, absl::StatusCode::kDataLoss);
  }
  for (size_t len : {size_t{0}, size_t{10}, size_t{100}, bytes.size() / 3, bytes.size() - 1}) {
    put("cut-" + std::to_string(len) + ".skv", bytes.substr(0, len), absl::StatusCode::kDataLoss);
  }
  std::string version = bytes;
  version[8] = 7;
  put("version.skv", version, absl::StatusCode::kFailedPrecondition);
  std::string checksum = bytes;
  checksum[checksum.size() - 1] ^= 0xff;  // the end record's own CRC
  put("checksum.skv", checksum, absl::StatusCode::kDataLoss);
  put("zzz-duplicate.skv", ReadAll(dir_ / SnapshotFileName("good")),
      absl::StatusCode::kAlreadyExists);
  // An interrupted write's temp file, and a file that is not ours.
  WriteAll(dir_ / (other_file + ".tmp"), bytes.substr(0, 50));
  WriteAll(dir_ / "README", "not a snapshot");

  SessionStore b(QuietStoreOptions());
  SnapshotDir reader(dir_.string());
  RestoreReport r = reader.Restore(&b);
  EXPECT_EQ(r.restored, 1) << r.ToString();
  ASSERT_EQ(r.skipped.size(), expected.size()) << r.ToString();
  std::map<std::string, absl::Status> why;
  for (const auto& k : r.skipped) why[k.file] = k.why;
  for (const auto& [name, code] : expected) {
    ASSERT_TRUE(why.count(name)) << name;
    EXPECT_EQ(why[name].code(), code) << name << ": " << why[name];
    EXPECT_NE(why[name].message().find("moved to " + name + ".bad"), std::string::npos)
        << why[name];
    EXPECT_TRUE(fs::exists(dir_ / (name + ".bad"))) << name;
    EXPECT_FALSE(fs::exists(dir_ / name)) << name;
    EXPECT_NE(r.ToString().find(name), std::string::npos);
  }
  EXPECT_NE(why["version.skv"].message().find("version 7"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir_ / (other_file + ".tmp")));
  EXPECT_TRUE(fs::exists(dir_ / "README"));
  absl::StatusOr<std::shared_ptr<Session>> got = b.Get("good");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(Bytes(**got), Bytes(*good));
  EXPECT_EQ(b.Stats().sessions, 1);

  // Moved aside: not retried, and not removed by the next write.
  SessionStore c(QuietStoreOptions());
  r = SnapshotDir(dir_.string()).Restore(&c);
  EXPECT_EQ(r.restored, 1);
  EXPECT_TRUE(r.skipped.empty()) << r.ToString();
  EXPECT_EQ(reader.Write(b).removed, 0);
  EXPECT_TRUE(fs::exists(dir_ / "version.skv.bad"));
}

TEST_F(SnapshotDirTest, SessionsOverTheBudgetAreSkipped) {
  std::mt19937 rng(6);
  SessionStore a(QuietStoreOptions());
  Filled(&a, "s1", &rng);
  Filled(&a, "s2", &rng);
  SnapshotDir snaps(dir_.string());
  ASSERT_EQ(snaps.Write(a).written, 2);
  // Room for one of the two.
  SessionStoreOptions o = QuietStoreOptions();
  o.host_budget_bytes = a.Stats().bytes_used * 3 / 4;
  SessionStore b(o);
  RestoreReport r = SnapshotDir(dir_.string()).Restore(&b);
  EXPECT_EQ(r.restored, 1) << r.ToString();
  ASSERT_EQ(r.skipped.size(), 1u) << r.ToString();
  EXPECT_EQ(r.skipped[0].why.code(), absl::StatusCode::kResourceExhausted) << r.ToString();
  EXPECT_EQ(b.Stats().sessions, 1);
}

}  // namespace
}  // namespace sparsekv
