// The token file parser, bearer-token resolution and reload (service/auth.h).
#include "service/auth.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/session_store.h"
#include "service/metrics.h"

namespace sparsekv::service {
namespace {

constexpr char kTokenA[] = "tok-alpha-0123456789";
constexpr char kTokenB[] = "tok-bravo-0123456789";
constexpr char kTokenAdmin[] = "tok-admin-0123456789";

std::string GoodFile() {
  return absl::StrCat("# tenants and roles\n", kTokenA, " alpha user\n\n", "  ", kTokenB,
                      "\tbravo\tuser  \r\n", kTokenAdmin, " ops admin");
}

TEST(TokenTableTest, ParsesTokensTenantsAndRoles) {
  absl::StatusOr<TokenTable> t = TokenTable::Parse(GoodFile());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->size(), 3u);
  const Caller* a = t->Find(kTokenA);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->tenant, "alpha");
  EXPECT_FALSE(a->admin());
  const Caller* b = t->Find(kTokenB);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->tenant, "bravo");
  const Caller* admin = t->Find(kTokenAdmin);
  ASSERT_NE(admin, nullptr);
  EXPECT_TRUE(admin->admin());
  EXPECT_EQ(admin->tenant, "ops");
}

TEST(TokenTableTest, FindsExactTokensOnly) {
  absl::StatusOr<TokenTable> t = TokenTable::Parse(GoodFile());
  ASSERT_TRUE(t.ok());
  const std::string a = kTokenA;
  EXPECT_EQ(t->Find(a.substr(0, a.size() - 1)), nullptr);  // prefix
  EXPECT_EQ(t->Find(a + "x"), nullptr);                    // longer
  EXPECT_EQ(t->Find(""), nullptr);
  std::string flipped = a;
  flipped[3] ^= 1;
  EXPECT_EQ(t->Find(flipped), nullptr);
}

TEST(TokenTableTest, RejectsMalformedFilesNamingTheLineNotTheToken) {
  const std::string secret = "secret-token-abcdefgh";
  const struct {
    std::string text;
    std::string message;
  } cases[] = {
      {absl::StrCat("# c\n", secret, " alpha\n"), "line 2: expected `TOKEN TENANT ROLE`"},
      {absl::StrCat(secret, " alpha user extra\n"), "line 1: expected"},
      {"short alpha user\n", "line 1: a token must be"},
      {absl::StrCat(secret, " al/pha user\n"), "line 1: a tenant must be"},
      {absl::StrCat(secret, " ", std::string(129, 't'), " user\n"), "a tenant must be"},
      {absl::StrCat(secret, " alpha root\n"), "line 1: role must be"},
      {absl::StrCat(secret, " alpha user\n", secret, " bravo admin\n"),
       "line 2: the token appears twice"},
      {absl::StrCat(std::string(513, 'x'), " alpha user\n"), "a token must be"},
      {"", "has no tokens"},
      {"# only comments\n\n", "has no tokens"},
      {std::string((1 << 20) + 1, '#'), "over"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<TokenTable> t = TokenTable::Parse(c.text);
    ASSERT_FALSE(t.ok()) << c.text.substr(0, 80);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(c.message), std::string::npos) << t.status();
    EXPECT_EQ(t.status().message().find(secret), std::string::npos) << t.status();
  }
}

// Random bytes and random mutations of a valid file: the parser never crashes, and whatever
// it accepts, it finds.
TEST(TokenTableTest, RandomBytesNeverCrash) {
  std::mt19937 rng(14);
  const std::string good = GoodFile();
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string text;
    if (i % 2 == 0) {
      text.resize(rng() % 200);
      for (char& c : text) c = static_cast<char>(rng() % 4 == 0 ? " \t\n#"[rng() % 4] : rng());
    } else {
      text = good;
      for (int m = 1 + rng() % 4; m > 0; --m) text[rng() % text.size()] = static_cast<char>(rng());
    }
    absl::StatusOr<TokenTable> t = TokenTable::Parse(text);
    if (!t.ok()) {
      EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    ++accepted;
    EXPECT_GE(t->size(), 1u);
  }
  EXPECT_GT(accepted, 0);  // some mutations of the good file (a tenant letter) stay valid
}

TEST(CallerTest, UsersStayInTheirTenantAdminsGoAnywhere) {
  const Caller user{"alpha", Role::kUser};
  EXPECT_EQ(user.scope(), "alpha");
  EXPECT_EQ(*user.CreateTenant(""), "alpha");
  EXPECT_EQ(*user.CreateTenant("alpha"), "alpha");
  EXPECT_EQ(user.CreateTenant("bravo").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(*user.ListTenant(""), "alpha");
  EXPECT_EQ(user.ListTenant("bravo").status().code(), absl::StatusCode::kPermissionDenied);

  const Caller admin{"ops", Role::kAdmin};
  EXPECT_EQ(admin.scope(), "");
  EXPECT_EQ(*admin.CreateTenant(""), "ops");
  EXPECT_EQ(*admin.CreateTenant("bravo"), "bravo");
  EXPECT_EQ(*admin.ListTenant(""), "");  // every tenant
  EXPECT_EQ(*admin.ListTenant("bravo"), "bravo");

  const Caller none = Caller::NoAuth();
  EXPECT_EQ(none.scope(), "");
  EXPECT_EQ(*none.CreateTenant(""), "");  // the store files it under "default"
}

class AuthenticatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = absl::StrCat(::testing::TempDir(), "/tokens-", getpid(), "-",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    Write(GoodFile());
  }
  void TearDown() override { std::remove(path_.c_str()); }

  // Replaces the file as operators should: a new file renamed over the old one.
  void Write(const std::string& text) {
    const std::string tmp = path_ + ".tmp";
    std::ofstream(tmp) << text;
    ASSERT_EQ(std::rename(tmp.c_str(), path_.c_str()), 0);
  }

  static std::string Bearer(const std::string& token) { return "Bearer " + token; }

  std::string path_;
};

TEST_F(AuthenticatorTest, ResolvesBearerTokens) {
  auto a = Authenticator::Create(AuthMode::kToken, path_, nullptr, absl::Hours(1));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->tokens(), 3u);
  absl::StatusOr<Caller> c = (*a)->Authenticate(Bearer(kTokenA));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tenant, "alpha");
  // The scheme is case-insensitive; surrounding spaces are tolerated.
  EXPECT_TRUE((*a)->Authenticate(absl::StrCat("  bearer  ", kTokenB, " ")).ok());
  for (const std::optional<absl::string_view> bad :
       {std::optional<absl::string_view>(), std::optional<absl::string_view>(""),
        std::optional<absl::string_view>(kTokenA),
        std::optional<absl::string_view>("Basic dXNlcjpwYXNz"),
        std::optional<absl::string_view>("Bearer "),
        std::optional<absl::string_view>("Bearer tok-unknown-0123456789")}) {
    absl::StatusOr<Caller> r = (*a)->Authenticate(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated) << (bad ? *bad : "(none)");
    EXPECT_EQ(r.status().message().find("tok-"), std::string::npos) << r.status();
  }
}

TEST_F(AuthenticatorTest, NoneLetsEveryoneInAsAdmin) {
  auto a = Authenticator::Create(AuthMode::kNone, "");
  ASSERT_TRUE(a.ok());
  absl::StatusOr<Caller> c = (*a)->Authenticate(std::nullopt);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->admin());
  EXPECT_EQ(c->scope(), "");
}

TEST_F(AuthenticatorTest, RefusesBadConfigurations) {
  EXPECT_EQ(Authenticator::Create(AuthMode::kNone, path_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Authenticator::Create(AuthMode::kToken, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Authenticator::Create(AuthMode::kToken, path_ + ".missing").status().code(),
            absl::StatusCode::kInvalidArgument);
  Write("not a token file\n");
  EXPECT_EQ(Authenticator::Create(AuthMode::kToken, path_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseAuthMode("tokens").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseAuthMode("token"), AuthMode::kToken);
}

TEST_F(AuthenticatorTest, ReloadsOnChangeAndKeepsTheOldTableOnABadFile) {
  SessionStoreOptions so;
  so.janitor_period = absl::ZeroDuration();
  SessionStore store(so);
  Metrics metrics(&store, BuildInfo{});
  auto a = Authenticator::Create(AuthMode::kToken, path_, &metrics, absl::Hours(1));
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE((*a)->ReloadIfChanged().ok());  // unchanged: nothing to do
  const std::string added = "tok-charlie-0123456789";
  Write(absl::StrCat(kTokenA, " alpha user\n", added, " charlie user\n"));
  ASSERT_TRUE((*a)->ReloadIfChanged().ok());
  EXPECT_TRUE((*a)->Authenticate(Bearer(added)).ok());
  EXPECT_FALSE((*a)->Authenticate(Bearer(kTokenB)).ok());  // removed

  Write(absl::StrCat(kTokenA, " alpha\n"));  // half-written
  EXPECT_EQ((*a)->ReloadIfChanged().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*a)->Authenticate(Bearer(added)).ok());  // the previous table stays
  EXPECT_TRUE((*a)->ReloadIfChanged().ok());            // reported once per change
  std::remove(path_.c_str());
  EXPECT_EQ((*a)->ReloadIfChanged().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*a)->Authenticate(Bearer(kTokenA)).ok());

  const std::string text = metrics.Serialize();
  EXPECT_NE(text.find("sparsekv_auth_token_file_reloads_total{result=\"ok\"} 1"), std::string::npos)
      << text;
  EXPECT_NE(text.find("sparsekv_auth_token_file_reloads_total{result=\"error\"} 2"),
            std::string::npos)
      << text;
}

TEST_F(AuthenticatorTest, PollThreadPicksUpChanges) {
  auto a = Authenticator::Create(AuthMode::kToken, path_, nullptr, absl::Milliseconds(10));
  ASSERT_TRUE(a.ok());
  const std::string added = "tok-delta-0123456789";
  Write(absl::StrCat(added, " delta user\n"));
  bool seen = false;
  for (int i = 0; i < 500 && !seen; ++i) {
    seen = (*a)->Authenticate(Bearer(added)).ok();
    if (!seen) usleep(10000);
  }
  EXPECT_TRUE(seen);
}

}  // namespace
}  // namespace sparsekv::service
