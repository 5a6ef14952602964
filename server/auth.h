#ifndef MERGEGUARD_SERVER_AUTH_H_
#define MERGEGUARD_SERVER_AUTH_H_

// Bearer-token authentication. A token file maps tokens to a tenant and a
// role, one per line:
//
//   # token (or sha256:<hex of the token>)   tenant   role
//   sha256:5e884898da28047151d0e56f8dc62927...   acme     user
//   0f1e2d3c4b5a69788796a5b4c3d2e1f0             ops      admin
//
// Storing `sha256:` digests keeps the file free of usable secrets.

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace mergeguard {

// Role is what a principal may do: users run jobs, admins also register
// architectures.
enum class Role { kUser, kAdmin };

// Principal is an authenticated caller.
struct Principal {
  std::string tenant;
  Role role = Role::kUser;
};

// IsValidTenantName returns true for 1-63 characters of [a-z0-9_-] starting
// with a letter or digit: tenant names become directory names.
bool IsValidTenantName(absl::string_view tenant);

// TokenTable maps the SHA-256 (hex) of each token to its principal.
using TokenTable = std::map<std::string, Principal>;

// ParseTokenFile parses the token file format above. INVALID_ARGUMENT names
// the line, e.g. `line 3: role must be user or admin, got "root"`.
absl::StatusOr<TokenTable> ParseTokenFile(absl::string_view text);

// AuthOptions configures an Authenticator.
struct AuthOptions {
  // Token file path. Empty requires `allow_anonymous`.
  std::string tokens_file;
  // Development only: with no token file, every caller is tenant "default"
  // with the admin role.
  bool allow_anonymous = false;
};

// Authenticator checks bearer tokens against the token file. Thread-safe.
class Authenticator {
 public:
  // Create loads the token file; INVALID_ARGUMENT if it is malformed,
  // NOT_FOUND if it is missing.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(
      const AuthOptions& options);

  // Authenticate maps an `authorization` metadata value ("Bearer <token>")
  // to its principal. UNAUTHENTICATED, saying what to send, otherwise.
  absl::StatusOr<Principal> Authenticate(absl::string_view authorization) const;

  // ReloadIfChanged re-reads the token file when its modification time, size
  // or inode changed. A malformed new file is reported and the old table
  // kept, so a bad edit never locks everyone out.
  absl::Status ReloadIfChanged();

 private:
  explicit Authenticator(const AuthOptions& options) : options_(options) {}

  const AuthOptions options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenTable> table_ ABSL_GUARDED_BY(mu_);
  // Identity of the file table_ was read from.
  int64_t file_mtime_ns_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t file_size_ ABSL_GUARDED_BY(mu_) = -1;
  uint64_t file_inode_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_AUTH_H_
