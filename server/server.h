#ifndef MERGEGUARD_SERVER_SERVER_H_
#define MERGEGUARD_SERVER_SERVER_H_

// MergeguardServer wires the components together: store, journal, job
// manager, auth, metrics, the gRPC server with health and reflection, and a
// housekeeping thread (free-disk, gauges, token-file reload).

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/thread_pool.h"
#include "server/architecture_registry.h"
#include "server/artifact_store.h"
#include "server/auth.h"
#include "server/job_journal.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/sanitizer_service.h"

namespace mergeguard {

// ServerOptions configures the whole server; main.cc fills it from flags.
struct ServerOptions {
  // gRPC listen address; port 0 picks a free port (see port()).
  std::string listen_address = "0.0.0.0:50051";
  // /metrics endpoint and security-metric settings.
  MetricsOptions metrics;
  // Token file and anonymous mode.
  AuthOptions auth;
  // TLS: server certificate chain and key (PEM). Both empty: plaintext.
  std::string tls_cert_file;
  std::string tls_key_file;
  // mTLS: CA bundle (PEM) that client certificates must chain to. Setting
  // it makes client certificates required.
  std::string tls_client_ca_file;
  // Store directory (root) and upload limits.
  ArtifactStoreOptions store;
  // Queue, workers and job settings.
  JobManagerOptions jobs;
  // Threads for disk work on behalf of RPCs (upload writes, download reads,
  // journal writes).
  int io_threads = 2;
  // Directory of operator-provided TorchScript architectures (*.pt).
  std::string architectures_dir;
  // How often free disk, gauges and the token file are refreshed.
  absl::Duration housekeeping_interval = absl::Seconds(1);
};

class MergeguardServer {
 public:
  // Start opens the store and journal, recovers jobs, and starts serving.
  static absl::StatusOr<std::unique_ptr<MergeguardServer>> Start(
      const ServerOptions& options);
  // The destructor shuts down immediately (use Drain first for grace).
  ~MergeguardServer();

  // port returns the bound gRPC port; metrics_port the /metrics port.
  int port() const { return port_; }
  int metrics_port() const { return metrics_->port(); }

  // Drain turns health to NOT_SERVING, refuses new uploads and jobs, waits up
  // to `timeout` for running jobs, then stops the gRPC server (cancelling
  // open streams). Queued jobs stay in the journal. Returns true when no job
  // was left running.
  bool Drain(absl::Duration timeout);

 private:
  MergeguardServer() = default;
  void HousekeepingLoop();

  ServerOptions options_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<Authenticator> auth_;
  std::unique_ptr<ThreadPool> io_;
  std::unique_ptr<ArtifactStore> store_;
  std::unique_ptr<JobJournal> journal_;
  std::unique_ptr<ArchitectureRegistry> architectures_;
  std::unique_ptr<JobManager> jobs_;
  std::atomic<bool> draining_{false};
  std::unique_ptr<SanitizerService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  absl::Notification stop_housekeeping_;
  std::thread housekeeping_;
  bool shut_down_ = false;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_SERVER_H_
