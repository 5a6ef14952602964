#include "core/sha256.h"

#include <gtest/gtest.h>

#include <string>

namespace mergeguard {
namespace {

// Vectors from FIPS 180-4 examples and NIST's SHA-256 test set.
TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(
      Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
      "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, IncrementalEqualsOneShot) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 7));
  for (size_t split : {0, 1, 55, 56, 63, 64, 65, 127, 999}) {
    Sha256 hasher;
    hasher.Update(absl::string_view(data).substr(0, split));
    hasher.Update(absl::string_view(data).substr(split));
    EXPECT_EQ(hasher.FinishHex(), Sha256Hex(data)) << "split " << split;
  }
}

// The SHA-extension path (when the CPU has one) must agree with the portable
// compression on every length, including block and padding boundaries.
TEST(Sha256Test, HardwareAndPortableAgree) {
  std::string data;
  uint32_t x = 12345;
  for (int i = 0; i < 5000; ++i) {
    x = x * 1103515245 + 12345;
    data.push_back(static_cast<char>(x >> 24));
  }
  for (size_t length : {0, 1, 55, 56, 63, 64, 65, 119, 128, 1000, 4999}) {
    absl::string_view piece = absl::string_view(data).substr(0, length);
    sha256_force_portable_for_testing = true;
    std::string portable = Sha256Hex(piece);
    sha256_force_portable_for_testing = false;
    EXPECT_EQ(Sha256Hex(piece), portable) << "length " << length;
  }
  sha256_force_portable_for_testing = true;
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  sha256_force_portable_for_testing = false;
}

TEST(Sha256Test, HexValidation) {
  EXPECT_TRUE(IsSha256Hex(Sha256Hex("x")));
  EXPECT_FALSE(IsSha256Hex("abc"));
  EXPECT_FALSE(IsSha256Hex(std::string(64, 'G')));
  EXPECT_FALSE(IsSha256Hex(std::string(64, 'A')));  // lowercase only
}

}  // namespace
}  // namespace mergeguard
