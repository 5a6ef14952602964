// mergeguard-server: the gRPC model-sanitization service. Flags become a
// ServerOptions; SIGTERM/SIGINT drain the server within --drain_timeout.

#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "core/file_util.h"
#include "server/log.h"
#include "server/server.h"

ABSL_FLAG(int, port, 50051, "gRPC port (0 picks a free one)");
ABSL_FLAG(std::string, listen_host, "0.0.0.0", "gRPC listen host");
ABSL_FLAG(int, metrics_port, 9464, "Prometheus /metrics port (0 picks one)");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "/metrics listen host");
ABSL_FLAG(bool, metrics, true, "serve /metrics");
ABSL_FLAG(std::string, store_dir, "mergeguard-store",
          "artifact store and job journal directory (durable)");
ABSL_FLAG(std::string, tokens_file, "",
          "bearer token file: `<token|sha256:hex> <tenant> <user|admin>` per "
          "line; reloaded when it changes");
ABSL_FLAG(bool, allow_anonymous, false,
          "development only: no token file, everyone is tenant `default`");
ABSL_FLAG(std::string, tls_cert, "", "server certificate chain (PEM)");
ABSL_FLAG(std::string, tls_key, "", "server private key (PEM)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "CA bundle (PEM) for client certificates; enables mTLS");
ABSL_FLAG(uint64_t, max_upload_bytes, 64ull << 30, "largest single upload");
ABSL_FLAG(uint64_t, tenant_quota_bytes, 0,
          "bytes each tenant may store; 0 = unlimited");
ABSL_FLAG(int, max_concurrent_uploads, 64, "uploads streaming at once");
ABSL_FLAG(uint64_t, min_free_bytes, 1ull << 30,
          "free-disk guard: refuse work that would leave less free");
ABSL_FLAG(int, workers, 1, "jobs running at once");
ABSL_FLAG(int, queue_capacity, 64, "jobs that may wait in the queue");
ABSL_FLAG(int, job_threads, 0, "compute threads per job (0 = all cores)");
ABSL_FLAG(int, io_threads, 2, "threads for disk work on behalf of RPCs");
ABSL_FLAG(int, max_job_attempts, 2,
          "times a job interrupted by a restart is started before it fails");
ABSL_FLAG(std::string, replica, "",
          "replica name in job ids (default: the host name)");
ABSL_FLAG(std::string, architectures_dir, "",
          "directory of operator TorchScript architectures (*.pt)");
ABSL_FLAG(double, anomaly_index_threshold, 2.0,
          "trigger anomaly index above which a job counts as suspicious");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "on SIGTERM, how long running jobs may take to finish");
ABSL_FLAG(std::string, port_file, "",
          "write `<grpc port> <metrics port>` here once serving (tests)");
ABSL_FLAG(absl::Duration, testonly_job_delay, absl::ZeroDuration(),
          "test only: each job waits this long before running");

namespace {

std::string HostName() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "local";
  return name;
}

mergeguard::ServerOptions OptionsFromFlags() {
  mergeguard::ServerOptions options;
  options.listen_address = absl::StrCat(absl::GetFlag(FLAGS_listen_host), ":",
                                        absl::GetFlag(FLAGS_port));
  options.metrics.listen_address =
      absl::GetFlag(FLAGS_metrics)
          ? absl::StrCat(absl::GetFlag(FLAGS_metrics_host), ":",
                         absl::GetFlag(FLAGS_metrics_port))
          : "";
  options.metrics.anomaly_index_threshold =
      absl::GetFlag(FLAGS_anomaly_index_threshold);
  options.auth.tokens_file = absl::GetFlag(FLAGS_tokens_file);
  options.auth.allow_anonymous = absl::GetFlag(FLAGS_allow_anonymous);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.store.root = absl::GetFlag(FLAGS_store_dir);
  options.store.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  options.store.tenant_quota_bytes = absl::GetFlag(FLAGS_tenant_quota_bytes);
  options.store.max_concurrent_uploads =
      absl::GetFlag(FLAGS_max_concurrent_uploads);
  options.store.min_free_bytes = absl::GetFlag(FLAGS_min_free_bytes);
  options.jobs.workers = absl::GetFlag(FLAGS_workers);
  options.jobs.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  options.jobs.job_threads = absl::GetFlag(FLAGS_job_threads);
  options.jobs.max_attempts = absl::GetFlag(FLAGS_max_job_attempts);
  options.jobs.replica_name = absl::GetFlag(FLAGS_replica).empty()
                                  ? HostName()
                                  : absl::GetFlag(FLAGS_replica);
  options.jobs.testonly_job_delay = absl::GetFlag(FLAGS_testonly_job_delay);
  options.io_threads = absl::GetFlag(FLAGS_io_threads);
  options.architectures_dir = absl::GetFlag(FLAGS_architectures_dir);
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "mergeguard-server --store_dir=DIR --tokens_file=FILE [--port=50051] "
      "[--metrics_port=9464] [--tls_cert=PEM --tls_key=PEM]");
  absl::ParseCommandLine(argc, argv);

  // Keep 1 MiB transfer chunks in the heap instead of mmap: each mmap'd
  // chunk is a fresh run of pages the kernel must fault in and zero, which
  // cost about 15% of upload throughput (docs/BENCHMARKS.md). Freed memory
  // above 128 MiB still goes back to the system.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 128 << 20);

  // Block the shutdown signals in every thread; main waits for them below.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<std::unique_ptr<mergeguard::MergeguardServer>> server =
      mergeguard::MergeguardServer::Start(OptionsFromFlags());
  if (!server.ok()) {
    mergeguard::LogError("cannot start: ", server.status().ToString());
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    absl::Status written = mergeguard::WriteFileAtomically(
        port_file,
        absl::StrCat((*server)->port(), " ", (*server)->metrics_port(), "\n"));
    if (!written.ok()) {
      mergeguard::LogError("cannot write --port_file: ", written.ToString());
      return 1;
    }
  }

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  mergeguard::LogInfo("received ", strsignal(signal_number));
  const bool idle = (*server)->Drain(absl::GetFlag(FLAGS_drain_timeout));
  if (!idle) {
    // A job past the deadline cannot be interrupted cleanly; its journal
    // entry still says "running", so the next start re-queues it.
    std::fflush(nullptr);
    std::_Exit(0);
  }
  server->reset();
  mergeguard::LogInfo("stopped");
  return 0;
}
