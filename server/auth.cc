#include "server/auth.h"

#include <sys/stat.h>

#include <cerrno>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/file_util.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

constexpr absl::string_view kDigestPrefix = "sha256:";
constexpr absl::string_view kBearerPrefix = "Bearer ";

struct FileIdentity {
  int64_t mtime_ns = -1;
  int64_t size = -1;
  uint64_t inode = 0;
};

absl::StatusOr<FileIdentity> StatFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("token file ", path));
  }
  FileIdentity id;
  id.mtime_ns =
      static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  id.size = st.st_size;
  id.inode = st.st_ino;
  return id;
}

}  // namespace

bool IsValidTenantName(absl::string_view tenant) {
  if (tenant.empty() || tenant.size() > 63) return false;
  if (!absl::ascii_isalnum(tenant[0])) return false;
  for (char c : tenant) {
    if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '_' ||
          c == '-')) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<TokenTable> ParseTokenFile(absl::string_view text) {
  TokenTable table;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    auto error = [&](absl::string_view problem) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file line ", line_number, ": ", problem));
    };
    if (fields.size() != 3) {
      return error(absl::StrCat("expected `<token> <tenant> <role>`, got ",
                                fields.size(), " fields"));
    }
    std::string digest;
    if (absl::StartsWith(fields[0], kDigestPrefix)) {
      digest = std::string(fields[0].substr(kDigestPrefix.size()));
      if (!IsSha256Hex(digest)) {
        return error("sha256: must be followed by 64 lowercase hex digits");
      }
    } else {
      if (fields[0].size() < 16) {
        return error(
            "tokens must be at least 16 characters (mint one with "
            "`openssl rand -hex 32`)");
      }
      digest = Sha256Hex(fields[0]);
    }
    Principal principal;
    principal.tenant = std::string(fields[1]);
    if (!IsValidTenantName(principal.tenant)) {
      return error(absl::StrCat("invalid tenant \"", fields[1],
                                "\" (1-63 of a-z, 0-9, _ and -)"));
    }
    if (fields[2] == "user") {
      principal.role = Role::kUser;
    } else if (fields[2] == "admin") {
      principal.role = Role::kAdmin;
    } else {
      return error(
          absl::StrCat("role must be user or admin, got \"", fields[2], "\""));
    }
    if (!table.emplace(digest, std::move(principal)).second) {
      return error("duplicate token");
    }
  }
  return table;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(
    const AuthOptions& options) {
  std::unique_ptr<Authenticator> auth(new Authenticator(options));
  if (options.tokens_file.empty()) {
    if (!options.allow_anonymous) {
      return absl::InvalidArgumentError(
          "no token file: pass --tokens_file (see docs/server.md), or "
          "--allow_anonymous for local development");
    }
    return auth;
  }
  ASSIGN_OR_RETURN(FileIdentity id, StatFile(options.tokens_file));
  ASSIGN_OR_RETURN(std::string text, ReadFile(options.tokens_file));
  absl::StatusOr<TokenTable> table = ParseTokenFile(text);
  if (!table.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.tokens_file, ": ", table.status().message()));
  }
  absl::MutexLock lock(&auth->mu_);
  auth->table_ = std::make_shared<const TokenTable>(*std::move(table));
  auth->file_mtime_ns_ = id.mtime_ns;
  auth->file_size_ = id.size;
  auth->file_inode_ = id.inode;
  return auth;
}

absl::StatusOr<Principal> Authenticator::Authenticate(
    absl::string_view authorization) const {
  if (options_.tokens_file.empty()) return Principal{"default", Role::kAdmin};
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "missing credentials: send the metadata `authorization: Bearer "
        "<token>` (ask the operator for a token)");
  }
  if (!absl::StartsWith(authorization, kBearerPrefix)) {
    return absl::UnauthenticatedError(
        "malformed authorization metadata: expected `Bearer <token>`");
  }
  absl::string_view token =
      absl::StripAsciiWhitespace(authorization.substr(kBearerPrefix.size()));
  std::shared_ptr<const TokenTable> table;
  {
    absl::MutexLock lock(&mu_);
    table = table_;
  }
  // Looking up the token's digest keeps comparisons independent of the
  // secret's bytes.
  auto it = table->find(Sha256Hex(token));
  if (it == table->end()) {
    return absl::UnauthenticatedError(
        "unknown or revoked token; check the token or ask the operator for a "
        "new one");
  }
  return it->second;
}

absl::Status Authenticator::ReloadIfChanged() {
  if (options_.tokens_file.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(FileIdentity id, StatFile(options_.tokens_file));
  {
    absl::MutexLock lock(&mu_);
    if (id.mtime_ns == file_mtime_ns_ && id.size == file_size_ &&
        id.inode == file_inode_) {
      return absl::OkStatus();
    }
  }
  ASSIGN_OR_RETURN(std::string text, ReadFile(options_.tokens_file));
  absl::StatusOr<TokenTable> table = ParseTokenFile(text);
  absl::MutexLock lock(&mu_);
  // Remember the identity even when invalid, so the error is reported once
  // per edit rather than every poll.
  file_mtime_ns_ = id.mtime_ns;
  file_size_ = id.size;
  file_inode_ = id.inode;
  if (!table.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(options_.tokens_file, ": ", table.status().message(),
                     "; keeping the previous tokens"));
  }
  table_ = std::make_shared<const TokenTable>(*std::move(table));
  return absl::OkStatus();
}

}  // namespace mergeguard
