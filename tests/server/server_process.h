#ifndef MERGEGUARD_TESTS_SERVER_SERVER_PROCESS_H_
#define MERGEGUARD_TESTS_SERVER_SERVER_PROCESS_H_

// Test helpers: the real mergeguard-server binary as a child process on free
// ports, temporary directories, token files and a tiny HTTP GET.

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/sanitizer_client.h"

namespace mergeguard::testing {

// Tokens written by WriteTestTokens. Each is a real token, tenant and role.
inline constexpr char kAcmeToken[] = "acme-user-token-0123456789abcdef";
inline constexpr char kGlobexToken[] = "globex-user-token-0123456789abcd";
// Stored in the file as its sha256 digest.
inline constexpr char kAdminToken[] = "ops-admin-token-0123456789abcdef";

// MakeTempDir creates a fresh directory under $TMPDIR (or /tmp).
std::string MakeTempDir(const std::string& prefix);
// RemoveTree deletes `path` recursively.
void RemoveTree(const std::string& path);
// WriteTestTokens writes a token file for the three tokens above.
std::string WriteTestTokens(const std::string& dir);
// WriteFile writes `contents` to `path`.
void WriteFile(const std::string& path, const std::string& contents);
// ReadWholeFile returns the file's contents (empty on error).
std::string ReadWholeFile(const std::string& path);
// RandomBytes returns `size` deterministic pseudo-random bytes.
std::string RandomBytes(size_t size, uint64_t seed);
// HttpGet fetches http://127.0.0.1:<port><path> and returns the body.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

// ServerProcess runs bin/mergeguard-server with `--store_dir`, a token file,
// free ports and `extra_flags`, and waits until its health is SERVING.
class ServerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::string& store_dir, const std::string& tokens_file,
      const std::vector<std::string>& extra_flags = {});
  // The destructor kills the server (SIGKILL) if it is still running.
  ~ServerProcess();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  std::string target() const;
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

  // Signal sends `signal` to the server.
  void Signal(int signal);
  // Wait waits for the server to exit and returns its exit code (128+signal
  // when killed), or -1 after `timeout_seconds`.
  int Wait(double timeout_seconds);

  // Client returns a client for `token` (empty: no token).
  std::unique_ptr<SanitizerClient> Client(const std::string& token) const;

 private:
  ServerProcess() = default;

  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::string log_path_;
  bool exited_ = false;
};

}  // namespace mergeguard::testing

#endif  // MERGEGUARD_TESTS_SERVER_SERVER_PROCESS_H_
