#include "tests/server/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/sha256.h"

namespace mergeguard::testing {

std::string MakeTempDir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/", prefix, "-XXXXXX");
  char* made = ::mkdtemp(pattern.data());
  return made != nullptr ? std::string(made) : std::string();
}

void RemoveTree(const std::string& path) {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
}

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string WriteTestTokens(const std::string& dir) {
  const std::string path = absl::StrCat(dir, "/tokens.txt");
  WriteFile(path,
            absl::StrCat("# token  tenant  role\n", kAcmeToken, " acme user\n",
                         kGlobexToken, "\tglobex\tuser\n",
                         "sha256:", Sha256Hex(kAdminToken), " ops admin\n"));
  return path;
}

std::string RandomBytes(size_t size, uint64_t seed) {
  std::string bytes(size, '\0');
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(&bytes[i], &state, 8);
  }
  for (; i < size; ++i) bytes[i] = static_cast<char>(i * 31 + seed);
  return bytes;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) !=
      0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("connect to port ", port));
  }
  const std::string request =
      absl::StrCat("GET ", path,
                   " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (::write(fd, request.data(), request.size()) !=
      static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return absl::InternalError("write");
  }
  std::string response;
  char buffer[65536];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n <= 0) break;
    response.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos) return absl::InternalError("no HTTP body");
  if (response.compare(0, 12, "HTTP/1.1 200") != 0 &&
      response.compare(0, 12, "HTTP/1.0 200") != 0) {
    return absl::InternalError(response.substr(0, body));
  }
  return response.substr(body + 4);
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::string& store_dir, const std::string& tokens_file,
    const std::vector<std::string>& extra_flags) {
  std::unique_ptr<ServerProcess> server(new ServerProcess());
  const std::string port_file = absl::StrCat(store_dir, ".ports");
  ::unlink(port_file.c_str());
  server->log_path_ = absl::StrCat(store_dir, ".log");
  std::vector<std::string> args = {
      absl::StrCat(MERGEGUARD_BINARY_DIR, "/bin/mergeguard-server"),
      "--port=0",
      "--listen_host=127.0.0.1",
      "--metrics_port=0",
      "--metrics_host=127.0.0.1",
      absl::StrCat("--store_dir=", store_dir),
      absl::StrCat("--tokens_file=", tokens_file),
      absl::StrCat("--port_file=", port_file),
      "--min_free_bytes=0",
      "--replica=test",
  };
  args.insert(args.end(), extra_flags.begin(), extra_flags.end());
  pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    // The server dies with the test, even when the test crashes.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    int log = ::open(server->log_path_.c_str(),
                     O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log >= 0) {
      ::dup2(log, STDOUT_FILENO);
      ::dup2(log, STDERR_FILENO);
    }
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  server->pid_ = pid;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      server->exited_ = true;
      return absl::InternalError(
          absl::StrCat("mergeguard-server exited during start:\n",
                       ReadWholeFile(server->log_path_)));
    }
    std::vector<std::string> ports = absl::StrSplit(
        ReadWholeFile(port_file), absl::ByAnyChar(" \n"), absl::SkipEmpty());
    if (ports.size() == 2 && absl::SimpleAtoi(ports[0], &server->port_) &&
        absl::SimpleAtoi(ports[1], &server->metrics_port_)) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  if (server->port_ == 0) return absl::DeadlineExceededError("no port file");
  return server;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !exited_) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
}

std::string ServerProcess::target() const {
  return absl::StrCat("127.0.0.1:", port_);
}

void ServerProcess::Signal(int signal) { ::kill(pid_, signal); }

int ServerProcess::Wait(double timeout_seconds) {
  const absl::Time deadline = absl::Now() + absl::Seconds(timeout_seconds);
  while (absl::Now() < deadline) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return -1;
}

std::unique_ptr<SanitizerClient> ServerProcess::Client(
    const std::string& token) const {
  SanitizerClientOptions options;
  options.target = target();
  options.token = token;
  options.rpc_timeout = absl::Seconds(20);
  options.transfer_timeout = absl::Seconds(300);
  return *SanitizerClient::Create(options);
}

}  // namespace mergeguard::testing
