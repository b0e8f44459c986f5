// CPU feature detection: the features agree with what the kernel reports (/proc/cpuinfo),
// they nest (avx512 needs avx2), the summary line names them, the brand and the variant in
// use; the variant in use is the best one the features allow; results are the same on every
// call and thread; SPARSEKV_CPU_VARIANT caps what is reported (checked in child processes,
// since detection runs once per process).
#include "kernels/cpu/cpu_features.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/avx2_attention.h"
#include "kernels/cpu/avx512_attention.h"

namespace sparsekv::kernels {
namespace {

bool Capped() { return std::getenv("SPARSEKV_CPU_VARIANT") != nullptr; }

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// The first processor's "flags" and "model name" lines of /proc/cpuinfo; false if absent.
bool ReadCpuInfo(std::set<std::string>* flags, std::string* model) {
  std::ifstream in("/proc/cpuinfo");
  if (!in) return false;
  std::string line;
  bool have_flags = false;
  while (std::getline(in, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    std::string value = line.substr(colon + 1);
    if (!value.empty() && value[0] == ' ') value.erase(0, 1);
    if (key == "model name" && model->empty()) *model = value;
    if (key == "flags" && !have_flags) {
      std::istringstream words(value);
      for (std::string w; words >> w;) flags->insert(w);
      have_flags = true;
    }
  }
  return have_flags;
}

std::string ExpectedVariant(const CpuFeatures& f) {
  if (f.avx512 && Avx512AttentionCompiled()) return "avx512";
  if (f.avx2 && Avx2AttentionCompiled()) return "avx2";
  return "portable";
}

TEST(CpuFeaturesTest, FeaturesNest) {
  const CpuFeatures& f = GetCpuFeatures();
  if (f.avx512) {
    EXPECT_TRUE(f.avx2);
  }
  if (f.avx512_fp16) {
    EXPECT_TRUE(f.avx512);
  }
  if (f.avx512_bf16) {
    EXPECT_TRUE(f.avx512);
  }
}

#if defined(__x86_64__)
// Linux lists an extension in /proc/cpuinfo only when the CPU has it and the kernel enabled
// its register state: the same two conditions the detection checks through cpuid and xgetbv.
TEST(CpuFeaturesTest, AgreesWithProcCpuinfo) {
  if (Capped()) GTEST_SKIP() << "SPARSEKV_CPU_VARIANT is set";
  std::set<std::string> flags;
  std::string model;
  if (!ReadCpuInfo(&flags, &model)) GTEST_SKIP() << "no /proc/cpuinfo";
  auto has = [&](std::initializer_list<const char*> names) {
    for (const char* n : names) {
      if (flags.count(n) == 0) return false;
    }
    return true;
  };
  const CpuFeatures& f = GetCpuFeatures();
  const bool avx2 = has({"avx", "avx2", "fma", "f16c", "bmi2", "popcnt"});
  const bool avx512 = avx2 && has({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2"});
  EXPECT_EQ(f.avx2, avx2);
  EXPECT_EQ(f.avx512, avx512);
  EXPECT_EQ(f.avx512_fp16, avx512 && has({"avx512_fp16"}));
  EXPECT_EQ(f.avx512_bf16, avx512 && has({"avx512_bf16"}));
}
#endif

TEST(CpuFeaturesTest, SummaryNamesTheDetectedFeaturesBrandAndVariant) {
  const CpuFeatures& f = GetCpuFeatures();
  const std::string s = CpuFeaturesSummary();
  EXPECT_EQ(s.rfind("cpu: ", 0), 0u) << s;
  EXPECT_EQ(Contains(s, " avx2 fma f16c bmi2"), f.avx2) << s;
  EXPECT_EQ(Contains(s, "avx512f/bw/vl/dq/vbmi2"), f.avx512) << s;
  EXPECT_EQ(Contains(s, "avx512fp16"), f.avx512_fp16) << s;
  EXPECT_EQ(Contains(s, "avx512bf16"), f.avx512_bf16) << s;
  EXPECT_EQ(Contains(s, "(no SIMD variant usable)"), !f.avx2) << s;
  const std::string tail = " | variant " + CpuBackend().variant();
  ASSERT_GE(s.size(), tail.size());
  EXPECT_EQ(s.substr(s.size() - tail.size()), tail) << s;
  // A brand between "cpu: " and the first " |" (not checked against /proc/cpuinfo's model
  // name: hypervisors report different strings there, e.g. "AMD EPYC" for a cpuid brand of
  // "Oxide Virtual Turin-like Processor").
  const size_t bar = s.find(" |");
  ASSERT_NE(bar, std::string::npos) << s;
  EXPECT_GT(bar, 5u) << s;
}

// cpuid pads the 48-byte brand string with spaces, at the front on Intel and at the back on
// some VMs ("Oxide Virtual Turin-like Processor" + 14 spaces): neither shows in the log line.
TEST(CpuFeaturesTest, SummaryBrandHasNoPadding) {
  const std::string s = CpuFeaturesSummary();
  const size_t bar = s.find(" |");
  ASSERT_NE(bar, std::string::npos) << s;
  EXPECT_NE(s[bar - 1], ' ') << "'" << s << "'";
  EXPECT_NE(s[5], ' ') << "'" << s << "'";
}

TEST(CpuFeaturesTest, VariantInUseIsTheBestSupportedOne) {
  const CpuFeatures& f = GetCpuFeatures();
  const std::vector<const Backend*> variants = CpuBackendVariants();
  ASSERT_FALSE(variants.empty());
  EXPECT_EQ(variants.front()->variant(), "portable");
  EXPECT_EQ(variants.back(), &CpuBackend());
  std::set<std::string> names;
  for (const Backend* b : variants) {
    EXPECT_STREQ(b->name(), "cpu");
    EXPECT_TRUE(names.insert(b->variant()).second) << "duplicate " << b->variant();
    if (b->variant() == "avx2") {
      EXPECT_TRUE(f.avx2);
    }
    if (b->variant() == "avx512") {
      EXPECT_TRUE(f.avx512);
    }
  }
  EXPECT_EQ(CpuBackend().variant(), ExpectedVariant(f));
  // fp16 arithmetic is offered only where the CPU has it.
  if (CpuBackend().Fp16Arithmetic()) {
    EXPECT_TRUE(f.avx512_fp16);
  }
  // bf16 dot products likewise, and only in the avx512 variant.
  for (const Backend* b : CpuBackendVariants()) {
    if (b->Bf16Arithmetic()) {
      EXPECT_TRUE(f.avx512_bf16) << b->variant();
      EXPECT_EQ(b->variant(), "avx512");
    }
  }
}

TEST(CpuFeaturesTest, SameResultOnEveryCallAndThread) {
  const CpuFeatures* first = &GetCpuFeatures();
  const std::string summary = CpuFeaturesSummary();
  std::vector<const CpuFeatures*> seen(4);
  std::vector<std::string> summaries(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&seen, &summaries, i] {
      for (int rep = 0; rep < 50; ++rep) {
        seen[i] = &GetCpuFeatures();
        summaries[i] = CpuFeaturesSummary();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(seen[i], first);
    EXPECT_EQ(summaries[i], summary);
  }
  EXPECT_EQ(&GetCpuFeatures(), first);
  EXPECT_EQ(CpuFeaturesSummary(), summary);
}

// ---------------------------------------------------------------------------------------------
// SPARSEKV_CPU_VARIANT, read once per process: each case runs in a fresh child process
// ("threadsafe" death tests re-execute the binary), which sets the variable before the first
// detection and exits with the features as bits.

int Bits(const CpuFeatures& f) {
  return (f.avx2 ? 1 : 0) | (f.avx512 ? 2 : 0) | (f.avx512_fp16 ? 4 : 0) | (f.avx512_bf16 ? 8 : 0);
}

// In the child: detection with the cap, the summary on stderr, the features as exit code
// (16 when the summary or the variant disagree with the features).
[[noreturn]] void DetectWithCap(const char* cap) {
  setenv("SPARSEKV_CPU_VARIANT", cap, 1);
  const CpuFeatures& f = GetCpuFeatures();
  const std::string s = CpuFeaturesSummary();
  std::fprintf(stderr, "%s\n", s.c_str());
  const bool consistent = CpuBackend().variant() == ExpectedVariant(f) &&
                          Contains(s, "avx512") == (f.avx512 || f.avx512_bf16) &&
                          Contains(s, " avx2 ") == f.avx2;
  std::_Exit(consistent ? Bits(f) : 16);
}

class CpuVariantCapDeathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Capped()) GTEST_SKIP() << "SPARSEKV_CPU_VARIANT is set for the whole run";
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
};

TEST_F(CpuVariantCapDeathTest, PortableReportsNoExtensions) {
  EXPECT_EXIT(DetectWithCap("portable"), ::testing::ExitedWithCode(0), "variant portable");
}

TEST_F(CpuVariantCapDeathTest, Avx2DropsOnlyTheAvx512Features) {
  // The predicate runs in this (uncapped) process only.
  EXPECT_EXIT(
      DetectWithCap("avx2"),
      [](int status) {
        return WIFEXITED(status) && WEXITSTATUS(status) == (GetCpuFeatures().avx2 ? 1 : 0);
      },
      // Not computed from GetCpuFeatures(): the matcher is built in the child too,
      // and detecting there before the cap is set would make the case vacuous.
      "variant (avx2|portable)");
}

TEST_F(CpuVariantCapDeathTest, UnknownValueCapsNothing) {
  EXPECT_EXIT(
      DetectWithCap("avx9000"),
      [](int status) { return WIFEXITED(status) && WEXITSTATUS(status) == Bits(GetCpuFeatures()); },
      "variant ");
}

}  // namespace
}  // namespace sparsekv::kernels
