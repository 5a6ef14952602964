#include "server/auth.h"

#include <string>

#include "absl/time/clock.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

TEST(ParseTokenFileTest, ParsesPlainAndHashedTokens) {
  auto table = ParseTokenFile(absl::StrCat(
      "# comment\n\n  plain-token-0123456789  acme user\n",
      "sha256:", Sha256Hex("hashed-token-0123456789"), "\tops\tadmin\n"));
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ(table->size(), 2u);
  EXPECT_EQ(table->at(Sha256Hex("plain-token-0123456789")).tenant, "acme");
  EXPECT_EQ(table->at(Sha256Hex("hashed-token-0123456789")).role, Role::kAdmin);
}

TEST(ParseTokenFileTest, NamesTheBadLine) {
  EXPECT_THAT(std::string(ParseTokenFile("a b\n").status().message()),
              HasSubstr("line 1"));
  EXPECT_THAT(std::string(ParseTokenFile("\nplain-token-0123456789 acme root\n")
                              .status()
                              .message()),
              HasSubstr("line 2: role must be user or admin"));
  EXPECT_THAT(std::string(ParseTokenFile("short acme user").status().message()),
              HasSubstr("at least 16"));
  EXPECT_THAT(std::string(ParseTokenFile("plain-token-0123456789 ../etc user")
                              .status()
                              .message()),
              HasSubstr("invalid tenant"));
  EXPECT_THAT(
      std::string(ParseTokenFile("sha256:abc acme user").status().message()),
      HasSubstr("64 lowercase hex"));
  EXPECT_THAT(std::string(ParseTokenFile("plain-token-0123456789 a user\n"
                                         "plain-token-0123456789 b user\n")
                              .status()
                              .message()),
              HasSubstr("duplicate"));
}

TEST(AuthenticatorTest, AuthenticatesAndReloads) {
  const std::string dir = testing::MakeTempDir("mergeguard-auth-test");
  const std::string path = dir + "/tokens";
  testing::WriteFile(path, "plain-token-0123456789 acme user\n");
  auto auth = Authenticator::Create({path, false});
  ASSERT_TRUE(auth.ok()) << auth.status();
  auto principal = (*auth)->Authenticate("Bearer plain-token-0123456789");
  ASSERT_TRUE(principal.ok());
  EXPECT_EQ(principal->tenant, "acme");
  EXPECT_EQ((*auth)->Authenticate("").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(
      std::string((*auth)->Authenticate("Basic abc").status().message()),
      HasSubstr("Bearer"));
  EXPECT_EQ((*auth)->Authenticate("Bearer wrong").status().code(),
            absl::StatusCode::kUnauthenticated);

  absl::SleepFor(absl::Milliseconds(10));  // a distinct mtime
  testing::WriteFile(path, "other-token-0123456789 globex admin\n");
  ASSERT_TRUE((*auth)->ReloadIfChanged().ok());
  EXPECT_FALSE((*auth)->Authenticate("Bearer plain-token-0123456789").ok());
  EXPECT_EQ((*auth)->Authenticate("Bearer other-token-0123456789")->tenant,
            "globex");

  testing::WriteFile(path, "garbage\n");
  EXPECT_THAT(std::string((*auth)->ReloadIfChanged().message()),
              HasSubstr("keeping the previous tokens"));
  EXPECT_TRUE((*auth)->Authenticate("Bearer other-token-0123456789").ok());
  testing::RemoveTree(dir);
}

TEST(AuthenticatorTest, RequiresATokenFileUnlessAnonymous) {
  EXPECT_EQ(Authenticator::Create({"", false}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto anonymous = Authenticator::Create({"", true});
  ASSERT_TRUE(anonymous.ok());
  EXPECT_EQ((*anonymous)->Authenticate("")->tenant, "default");
  EXPECT_EQ(
      Authenticator::Create({"/nonexistent/tokens", false}).status().code(),
      absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mergeguard
