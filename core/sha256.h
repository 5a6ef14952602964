#ifndef MERGEGUARD_CORE_SHA256_H_
#define MERGEGUARD_CORE_SHA256_H_

// SHA-256 (FIPS 180-4): content addresses and scenario file digests.

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mergeguard {

// Sha256 hashes a byte stream incrementally.
class Sha256 {
 public:
  Sha256();
  // Update absorbs `data`.
  void Update(const void* data, size_t size);
  void Update(absl::string_view data) { Update(data.data(), data.size()); }
  // Finish returns the 32-byte digest; the object must not be reused.
  std::array<uint8_t, 32> Finish();
  // FinishHex returns the digest as 64 lowercase hex characters.
  std::string FinishHex();

 private:
  void Compress(const uint8_t* block);
  // CompressBlocks uses the CPU's SHA extensions when present.
  void CompressBlocks(const uint8_t* data, size_t blocks);

  std::array<uint32_t, 8> state_;
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// Test-only: when true, Sha256 never uses the CPU's SHA extensions.
extern bool sha256_force_portable_for_testing;

// Sha256Hex returns the hex digest of `data`.
std::string Sha256Hex(absl::string_view data);

// Sha256File returns the hex digest of the file at `path`, read in chunks.
absl::StatusOr<std::string> Sha256File(const std::string& path);

// IsSha256Hex returns true for 64 lowercase hex characters.
bool IsSha256Hex(absl::string_view text);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_SHA256_H_
