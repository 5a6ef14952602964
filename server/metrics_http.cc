#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "prometheus/text_serializer.h"

namespace mergeguard {
namespace {

// A scrape request is a few hundred bytes; anything slower or larger is
// dropped so one bad client cannot stall the endpoint.
constexpr int kRequestTimeoutMs = 2000;
constexpr size_t kMaxRequestBytes = 8192;

void WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n =
        ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& host, int port,
    std::shared_ptr<prometheus::Registry> registry) {
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->registry_ = std::move(registry);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics host \"", host, "\" is not an IPv4 address"));
  }
  server->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (server->listen_fd_ < 0) return ErrnoToStatus(errno, "metrics socket");
  int one = 1;
  ::setsockopt(server->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t length = sizeof(address);
  if (::bind(server->listen_fd_, reinterpret_cast<sockaddr*>(&address),
             sizeof(address)) != 0 ||
      ::listen(server->listen_fd_, 64) != 0 ||
      ::getsockname(server->listen_fd_, reinterpret_cast<sockaddr*>(&address),
                    &length) != 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve /metrics on ", host, ":", port, ": ",
        std::strerror(errno), " (is the port in use? set --metrics_port)"));
  }
  server->port_ = ntohs(address.sin_port);
  if (::pipe2(server->wake_fds_, O_CLOEXEC) != 0) {
    return ErrnoToStatus(errno, "metrics pipe");
  }
  server->thread_ = std::thread([raw = server.get()] { raw->ServeLoop(); });
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (thread_.joinable()) {
    char byte = 0;
    ssize_t ignored = ::write(wake_fds_[1], &byte, 1);
    (void)ignored;
    thread_.join();
  }
  for (int fd : {listen_fd_, wake_fds_[0], wake_fds_[1]}) {
    if (fd >= 0) ::close(fd);
  }
}

void MetricsHttpServer::ServeLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fds_[0], POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents & POLLIN) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        ServeConnection(fd);
        ::close(fd);
      }
    }
  }
}

void MetricsHttpServer::ServeConnection(int fd) {
  std::string request;
  char buffer[1024];
  while (request.find("\r\n\r\n") == std::string::npos &&
         request.size() < kMaxRequestBytes) {
    pollfd pfd = {fd, POLLIN, 0};
    if (::poll(&pfd, 1, kRequestTimeoutMs) <= 0) return;
    ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) return;
    request.append(buffer, static_cast<size_t>(n));
  }
  if (!absl::StartsWith(request, "GET /metrics ") &&
      !absl::StartsWith(request, "GET /metrics?")) {
    WriteAll(fd,
             "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
             "Content-Length: 23\r\nConnection: close\r\n\r\ntry GET /metrics "
             "here\r\n");
    return;
  }
  std::ostringstream body;
  prometheus::TextSerializer().Serialize(body, registry_->Collect());
  const std::string text = body.str();
  WriteAll(fd,
           absl::StrCat("HTTP/1.1 200 OK\r\n"
                        "Content-Type: text/plain; version=0.0.4; "
                        "charset=utf-8\r\nContent-Length: ",
                        text.size(), "\r\nConnection: close\r\n\r\n", text));
}

}  // namespace mergeguard
