#ifndef MERGEGUARD_SERVER_METRICS_HTTP_H_
#define MERGEGUARD_SERVER_METRICS_HTTP_H_

// MetricsHttpServer serves `GET /metrics` (Prometheus text format) from a
// prometheus-cpp registry on one thread. It stands in for prometheus-cpp's
// civetweb Exposer, whose threads have a fixed 100 KiB stack that cannot
// even hold the static TLS of LibTorch's dependencies (OpenBLAS, glog), so
// pthread_create fails in this process.

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace mergeguard {

class MetricsHttpServer {
 public:
  // Start listens on `host:port` (port 0 picks a free port) and serves
  // scrapes of `registry` until destroyed.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& host, int port,
      std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void ServeLoop();
  void ServeConnection(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  // Written to wake the serving thread for shutdown.
  int wake_fds_[2] = {-1, -1};
  int port_ = 0;
  std::thread thread_;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_METRICS_HTTP_H_
